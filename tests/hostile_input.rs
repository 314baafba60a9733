//! Hostile input against a real server: YAML that expands, nests or repeats itself past
//! the apply limits, tokens without the role, event JSON that repeats keys or nests too
//! deep, and CEL built to be expensive (comprehensions nested over event data, patterns
//! taken from the event, loops that scan the event). None of it may crash, freeze or
//! exhaust the server, and every refusal says which limit it hit.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, json_with_status, metric, spawn_app, spawn_app_with, token, Process, TestApp, TestDb};
use hookwarden::auth::Role;
use serde_json::{json, Value};

/// `l: &l [x, x, …]` with `big: [*l, *l, …]`: a few dozen KB that expand to twelve
/// million values.
fn alias_bomb() -> String {
    format!("l: &l [{}]\nbig: [{}]\n", vec!["x"; 1000].join(", "), vec!["*l"; 12_000].join(", "))
}

/// One long text repeated by alias: 100 KB that expand to 200 MB.
fn text_bomb() -> String {
    format!("s: &s {}\nbig: [{}]\n", "x".repeat(100_000), vec!["*s"; 2_000].join(", "))
}

/// `a: [[[[…]]]]`: the YAML scanner's work grows with the square of the depth.
fn deep_flow() -> String {
    format!("a: {}{}\n", "[".repeat(60_000), "]".repeat(60_000))
}

/// Thousands of tiny documents (each without its metadata, so each is also an error).
fn many_documents(n: usize) -> String {
    "---\napiVersion: hookwarden/v1\nkind: RetryBudget\n".repeat(n)
}

/// An event whose `data` nests `depth` arrays deep.
fn deep_event(depth: usize) -> String {
    format!(r#"{{"source": "shop", "type": "order.created", "data": {}{}}}"#, "[".repeat(depth), "]".repeat(depth))
}

const DUPLICATE_AMOUNT: &str =
    r#"{"source": "shop", "type": "refund.requested", "data": {"amount_cents": 999999, "amount_cents": 500}}"#;

async fn post(app: &TestApp, path: &str, token: &str, content_type: &str, body: String) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request sent")
}

async fn apply(app: &TestApp, yaml: String) -> Value {
    let started = Instant::now();
    let body = json_with_status(post(app, "/v1/apply", &app.admin, "application/yaml", yaml).await, 422).await;
    assert!(started.elapsed() < Duration::from_secs(10), "the refusal took {:?}", started.elapsed());
    assert_eq!(body["error"]["code"], "invalid_resources", "{body}");
    body
}

fn messages(body: &Value) -> Vec<String> {
    body["errors"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap().to_owned()).collect()
}

async fn an_alias_bomb_is_refused_by_the_values_it_expands_to(db: TestDb) {
    let app = spawn_app(&db).await;
    let body = apply(&app, alias_bomb()).await;
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{body}");
    assert!(errors[0]["message"].as_str().unwrap().contains("more than 100000 values"), "{body}");
    assert!(errors[0]["message"].as_str().unwrap().contains("(apply.maxNodes)"), "{body}");
    // The line is where the value that crossed the limit stands: here the anchored list.
    assert_eq!((errors[0]["document"].as_u64(), errors[0]["line"].as_u64()), (Some(0), Some(1)), "{body}");

    let body = apply(&app, text_bomb()).await;
    assert!(messages(&body)[0].contains("(apply.maxExpandedBytes)"), "{body}");
}

async fn deep_flow_nesting_is_refused_before_the_parser_sees_it(db: TestDb) {
    let app = spawn_app(&db).await;
    let body = apply(&app, deep_flow()).await;
    let error = &body["errors"][0];
    assert!(error["message"].as_str().unwrap().contains("(apply.maxBracketsPerDocument)"), "{body}");
    assert_eq!(error["line"], 1, "{body}");
    // Within the brackets, nesting is still bounded as the values are built.
    let nested = format!(
        "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: b}}\nspec: {}{}\n",
        "[".repeat(40),
        "]".repeat(40)
    );
    let body = apply(&app, nested).await;
    assert!(messages(&body)[0].contains("deeper than 32 levels") && messages(&body)[0].contains("(apply.maxDepth)"));
}

async fn more_documents_than_allowed_are_refused(db: TestDb) {
    let app = spawn_app(&db).await;
    let body = apply(&app, many_documents(1001)).await;
    let last = body["errors"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["document"], 1000, "{body}");
    assert!(last["message"].as_str().unwrap().contains("(apply.maxDocuments)"), "{body}");
    let listed: Value = app.get("/v1/resources/RetryBudget", &app.admin).await.json().await.unwrap();
    assert_eq!(listed["items"], serde_json::json!([]), "nothing was written");
}

/// Documents are read one after another, not each from the start of the text again, and
/// the errors of the last ones still carry their lines.
async fn a_large_resource_set_applies_and_its_last_errors_keep_their_lines(db: TestDb) {
    let app = spawn_app(&db).await;
    let budget = |i: usize, attempts: &str| {
        format!("apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: b{i}}}\nspec:\n  maxAttempts: {attempts}\n  backoff: {{base: 1s, max: 1m}}\n")
    };
    let mut yaml: Vec<String> = (0..1000).map(|i| budget(i, "5")).collect();
    let body =
        json_with_status(post(&app, "/v1/apply", &app.admin, "application/yaml", yaml.join("---\n")).await, 200).await;
    assert_eq!(body["results"].as_array().unwrap().len(), 1000);

    yaml[998] = budget(998, "many");
    let body = apply(&app, yaml.join("---\n")).await;
    let error = &body["errors"][0];
    // Six lines a document and a `---` between: document 998 starts on line 998 * 7 + 1.
    assert_eq!((error["document"].as_u64(), error["line"].as_u64()), (Some(998), Some(998 * 7 + 5)), "{body}");
    assert_eq!(error["path"], "spec.maxAttempts", "{body}");
}

async fn a_token_without_the_operator_role_is_refused_before_the_body_is_read(db: TestDb) {
    let app = spawn_app(&db).await;
    let nobody = token("nobody", &[], &["*"]);
    let viewer = token("viewer", &[Role::Viewer], &["*"]);
    for (who, body) in [
        (&nobody, alias_bomb()),
        (&nobody, "not: [valid\n".to_owned()),
        (&viewer, "not: [valid\n".to_owned()),
        (&nobody, "x".repeat(5 * 1024 * 1024)),
    ] {
        let body = json_with_status(post(&app, "/v1/apply", who, "application/yaml", body).await, 403).await;
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        assert!(body.get("errors").is_none(), "nothing of the body is told: {body}");
    }
    // An operator's body over the limit is refused by its size, unread.
    let body = post(&app, "/v1/apply", &app.admin, "application/yaml", "x".repeat(1024 * 1024 + 1)).await;
    let body = json_with_status(body, 413).await;
    assert_eq!(body["error"]["details"]["limit"], 1024 * 1024, "{body}");
}

async fn an_event_that_repeats_a_key_is_refused_with_its_path(db: TestDb) {
    let app = spawn_app(&db).await;
    let body =
        json_with_status(post(&app, "/v1/events", &app.admin, "application/json", DUPLICATE_AMOUNT.into()).await, 400)
            .await;
    assert_eq!(body["error"]["code"], "duplicate_key", "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "data.amount_cents", "{body}");

    let batch = format!(r#"[{{"source": "shop", "type": "a", "data": {{}}}}, {DUPLICATE_AMOUNT}]"#);
    let body = json_with_status(post(&app, "/v1/events/batch", &app.admin, "application/json", batch).await, 400).await;
    assert_eq!(body["error"]["code"], "duplicate_key", "{body}");
    assert_eq!(body["error"]["details"][0]["path"], "[1].data.amount_cents", "{body}");

    let top = r#"{"source": "shop", "source": "elsewhere", "type": "a", "data": {}}"#;
    let body = json_with_status(post(&app, "/v1/events", &app.admin, "application/json", top.into()).await, 400).await;
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["details"][0]["path"].as_str()),
        (Some("duplicate_key"), Some("source"))
    );

    let listed: Value = app.get("/v1/events", &app.admin).await.json().await.unwrap();
    assert_eq!(listed["items"], serde_json::json!([]), "nothing was stored: {listed}");
}

async fn an_event_nested_deeper_than_the_limit_is_refused(db: TestDb) {
    let app = spawn_app(&db).await;
    let body =
        json_with_status(post(&app, "/v1/events", &app.admin, "application/json", deep_event(100_000)).await, 400)
            .await;
    assert_eq!(body["error"]["code"], "validation_failed", "{body}");
    let error = &body["error"]["details"][0];
    assert!(error["message"].as_str().unwrap().contains("(ingest.maxJsonDepth)"), "{body}");
    assert_eq!(error["path"], format!("data{}", "[0]".repeat(63)), "the event is level 1, `data` level 2: {body}");
    // Up to the limit, the event is accepted as sent.
    json_with_status(post(&app, "/v1/events", &app.admin, "application/json", deep_event(63)).await, 202).await;
    let listed: Value = app.get("/v1/events", &app.admin).await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
}

const SIGNING: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `event.data.a.all(x, event.data.a.all(y, x == y))`: with 4,000 equal elements, 16
/// million steps (seconds of CPU) from an 8 KB event.
const NESTED_ALL: &str = "event.data.a.all(x, event.data.a.all(y, x == y))";

/// One loop, but each step scans the whole list: 20,000 distinct elements take 200 million
/// comparisons. Nothing nests, so only a budget enforced while it runs can stop it.
const SCAN_IN_LOOP: &str = "event.data.a.all(x, x in event.data.a)";

/// Each element a pattern for `matches()` that is slow to compile, all different.
const MATCHES_FROM_DATA: &str = "event.data.p.exists(x, event.data.t.matches(x))";

fn filter(name: &str, namespace: &str, expression: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{expression: {}}}\n",
        json!(expression)
    )
}

fn endpoint(name: &str, namespace: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{url: \"http://127.0.0.1:9/{name}\", secrets: [{{value: {SIGNING}}}]{extra}}}\n"
    )
}

fn agent_rule(name: &str, namespace: &str, endpoint: &str, matches: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{endpointRefs: [{endpoint}], match: {}, decision: allow}}\n",
        json!(matches)
    )
}

fn distinct_elements() -> Value {
    json!({"a": (0..20_000).collect::<Vec<_>>()})
}

/// About 3 KB of distinct patterns that each take long to compile (or fail only once
/// compiled far enough).
fn patterns_from_data() -> Value {
    let patterns: Vec<String> = (0..250).map(|i| format!(r"\pL{{500}}{i}")).collect();
    json!({"p": patterns, "t": "text"})
}

fn event_in(namespace: &str, data: Value) -> String {
    json!({"source": "tenant", "type": "attack", "namespace": namespace, "data": data}).to_string()
}

async fn post_event(app: &TestApp, body: String) -> Value {
    json_with_status(post(app, "/v1/events", &app.admin, "application/json", body).await, 202).await
}

/// The fan-out error of `endpoint` in an ingest answer.
fn fanout_error<'a>(answer: &'a Value, endpoint: &str) -> &'a Value {
    answer["fanout_errors"]
        .as_array()
        .and_then(|errors| errors.iter().find(|e| e["endpoint"] == endpoint))
        .unwrap_or_else(|| panic!("no fan-out error for `{endpoint}`: {answer}"))
}

fn delivered_to(answer: &Value) -> Vec<&str> {
    let mut endpoints: Vec<&str> =
        answer["deliveries"].as_array().unwrap().iter().map(|d| d["endpoint"].as_str().unwrap()).collect();
    endpoints.sort_unstable();
    endpoints
}

async fn comprehensions_nested_over_event_data_are_refused_at_apply(db: TestDb) {
    let app = spawn_app_with(loopback_config(&db)).await;
    let cases = [
        (filter("nested", "default", NESTED_ALL), "spec.expression"),
        (
            agent_rule("nested", "default", "agent", NESTED_ALL)
                + "---\n"
                + &endpoint("agent", "default", ", agent: true"),
            "spec.match",
        ),
        (
            endpoint("ordered", "default", &format!(", ordering: {{key: {}}}", json!(format!("string({NESTED_ALL})")))),
            "spec.ordering.key",
        ),
    ];
    for (yaml, path) in cases {
        let body = apply(&app, yaml).await;
        let error = &body["errors"][0];
        assert_eq!((error["document"].as_u64(), error["path"].as_str()), (Some(0), Some(path)), "{body}");
        let message = error["message"].as_str().unwrap();
        assert!(message.starts_with("runs a comprehension over `event` inside another comprehension"), "{body}");
    }
    // Over parts of the outer element, the same nesting is linear, and accepted.
    app.apply_yaml(&filter("per-item", "default", "event.data.items.all(i, i.tags.exists(t, t == 'x'))")).await;
    // A literal pattern is compiled when it is applied, and a bad one refused then.
    let body = apply(&app, filter("bad-pattern", "default", "event.source.matches('(unclosed')")).await;
    assert!(
        messages(&body)[0].starts_with("the pattern `(unclosed` of matches() is not a valid regular expression"),
        "{body}"
    );
    let body = apply(&app, filter("huge-pattern", "default", r"event.source.matches('\\pL{500}')")).await;
    assert!(messages(&body)[0].contains("(cel.regexSizeLimit)"), "{body}");
}

/// A server configuration whose endpoints may point at loopback (they are never sent to).
fn loopback_config(db: &TestDb) -> hookwarden::config::Config {
    hookwarden::config::Config { allow_private_urls: true, ..db.config() }
}

/// A configuration whose cost budget trips first, deterministically.
fn small_cost_budget(db: &TestDb) -> hookwarden::config::Config {
    let mut config = loopback_config(db);
    config.cel.max_cost = 1000;
    config.cel.max_cpu_time = Duration::from_secs(10);
    config
}

async fn a_filter_or_ordering_key_over_its_budget_skips_or_unkeys_the_endpoint_and_is_counted(db: TestDb) {
    let app = spawn_app_with(small_cost_budget(&db)).await;
    // The metrics are the test process's: a namespace of its own per database.
    let ns = if db.is_postgres() { "budget-postgres" } else { "budget-sqlite" };
    let ordering = ", ordering: {key: \"string(size(event.data.a.map(x, x)))\"}";
    app.apply_yaml(
        &[
            filter("every", ns, "event.data.a.all(x, x >= 0)"),
            endpoint("filtered", ns, ", filterRefs: [every]"),
            endpoint("also-filtered", ns, ", filterRefs: [every]"),
            endpoint("ordered", ns, ordering),
            endpoint("plain", ns, ""),
        ]
        .join("---\n"),
    )
    .await;
    let answer = post_event(&app, event_in(ns, json!({"a": vec![0; 5000]}))).await;
    assert_eq!(delivered_to(&answer), ["ordered", "plain"], "{answer}");
    let over = "the expression exceeded its budget of 1000 cost units (cel.maxCost)";
    for skipped in ["filtered", "also-filtered"] {
        let error = fanout_error(&answer, skipped);
        assert_eq!(
            (&error["stage"], &error["skipped"], &error["filter"]),
            (&json!("filter"), &json!(true), &json!("every"))
        );
        assert_eq!(error["message"], format!("Filter `every` failed: {over}; the endpoint was skipped"), "{answer}");
    }
    let unkeyed = fanout_error(&answer, "ordered");
    assert_eq!((&unkeyed["stage"], &unkeyed["skipped"]), (&json!("ordering"), &json!(false)), "{answer}");
    assert!(unkeyed["message"].as_str().unwrap().contains(over), "{answer}");
    let ordered = answer["deliveries"].as_array().unwrap().iter().find(|d| d["endpoint"] == "ordered").unwrap();
    let delivery: Value =
        app.get(&format!("/v1/deliveries/{}", ordered["id"].as_str().unwrap()), &app.admin).await.json().await.unwrap();
    assert_eq!(delivery["ordering_key"], "(no key)", "{delivery}");
    for endpoint in ["filtered", "also-filtered", "ordered"] {
        let count =
            metric(&app.base, "hookwarden_fanout_errors_total", &[("namespace", ns), ("endpoint", endpoint)]).await;
        assert_eq!(count, Some(1.0), "{endpoint}");
    }
    // Within the budget, the same resources fan out as usual.
    let answer = post_event(&app, event_in(ns, json!({"a": vec![0; 10]}))).await;
    assert_eq!(delivered_to(&answer), ["also-filtered", "filtered", "ordered", "plain"], "{answer}");
    assert!(answer.get("fanout_errors").is_none(), "{answer}");
}

async fn a_filter_that_scans_the_event_in_a_loop_is_stopped_at_its_cpu_time(db: TestDb) {
    let app = spawn_app_with(loopback_config(&db)).await;
    app.apply_yaml(
        &[filter("scan", "default", SCAN_IN_LOOP), endpoint("scanned", "default", ", filterRefs: [scan]")]
            .join("---\n"),
    )
    .await;
    let answer = post_event(&app, event_in("default", distinct_elements())).await;
    assert_eq!(delivered_to(&answer), Vec::<&str>::new(), "{answer}");
    let message = fanout_error(&answer, "scanned")["message"].as_str().unwrap().to_owned();
    assert!(message.contains("the expression used more than its 50ms of CPU time (cel.maxCpuTime)"), "{message}");
}

async fn matches_with_patterns_from_the_event_is_bounded_by_the_budget(db: TestDb) {
    let app = spawn_app_with(loopback_config(&db)).await;
    app.apply_yaml(
        &[filter("matching", "default", MATCHES_FROM_DATA), endpoint("matched", "default", ", filterRefs: [matching]")]
            .join("---\n"),
    )
    .await;
    let answer = post_event(&app, event_in("default", patterns_from_data())).await;
    let message = fanout_error(&answer, "matched")["message"].as_str().unwrap().to_owned();
    // Which bound trips first depends on the machine; either stops it.
    assert!(message.contains("(cel.maxCost)") || message.contains("(cel.maxCpuTime)"), "{message}");
    // A pattern from the event that is fine is compiled and used.
    let fine = post_event(&app, event_in("default", json!({"p": ["^te.t$"], "t": "text"}))).await;
    assert_eq!(delivered_to(&fine), ["matched"], "{fine}");
}

async fn an_agent_rule_that_scans_the_event_denies_at_its_cpu_time(db: TestDb) {
    let app = spawn_app_with(loopback_config(&db)).await;
    app.apply_yaml(
        &[agent_rule("scan", "default", "agent", SCAN_IN_LOOP), endpoint("agent", "default", ", agent: true")]
            .join("---\n"),
    )
    .await;
    let answer = post_event(&app, event_in("default", distinct_elements())).await;
    let id = answer["deliveries"][0]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/deliveries/{id}");
    let decided = std::sync::Mutex::new(Value::Null);
    eventually(Duration::from_secs(60), "the policy decision", || async {
        let delivery: Value = app.get(&path, &app.admin).await.json().await.unwrap();
        let denied = delivery["state"] == "denied";
        *decided.lock().unwrap() = delivery;
        denied
    })
    .await;
    let delivery = decided.into_inner().unwrap();
    let reason = delivery["decision"]["reason"].as_str().unwrap();
    assert!(reason.contains("the expression used more than its 50ms of CPU time (cel.maxCpuTime)"), "{delivery}");
}

macro_rules! on_both_databases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $case() { super::$case(super::TestDb::sqlite()).await; } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $case() { let Some(db) = super::TestDb::postgres().await else { return }; super::$case(db).await; } )*
        }
    };
}

on_both_databases!(
    an_alias_bomb_is_refused_by_the_values_it_expands_to,
    deep_flow_nesting_is_refused_before_the_parser_sees_it,
    more_documents_than_allowed_are_refused,
    a_large_resource_set_applies_and_its_last_errors_keep_their_lines,
    a_token_without_the_operator_role_is_refused_before_the_body_is_read,
    an_event_that_repeats_a_key_is_refused_with_its_path,
    an_event_nested_deeper_than_the_limit_is_refused,
    comprehensions_nested_over_event_data_are_refused_at_apply,
    a_filter_or_ordering_key_over_its_budget_skips_or_unkeys_the_endpoint_and_is_counted,
    a_filter_that_scans_the_event_in_a_loop_is_stopped_at_its_cpu_time,
    matches_with_patterns_from_the_event_is_bounded_by_the_budget,
    an_agent_rule_that_scans_the_event_denies_at_its_cpu_time,
);

/// One hostile request of [`attacks_leave_healthz_answering_and_memory_bounded`].
struct Attack {
    name: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: String,
    /// The status it must get: refused, not crashed on.
    status: u16,
}

/// The resources the CEL attacks of [`attacks`] run against, a namespace each.
fn cel_targets() -> String {
    [
        filter("matching", "cel-matches", MATCHES_FROM_DATA),
        endpoint("matched", "cel-matches", ", filterRefs: [matching]"),
        filter("scan", "cel-scan", SCAN_IN_LOOP),
        endpoint("scanned", "cel-scan", ", filterRefs: [scan]"),
        agent_rule("scan", "cel-rule", "agent", SCAN_IN_LOOP),
        endpoint("agent", "cel-rule", ", agent: true"),
    ]
    .join("---\n")
}

/// Every attack the server must shrug off. Add new ones here.
fn attacks() -> Vec<Attack> {
    let yaml = |name, body| Attack { name, path: "/v1/apply", content_type: "application/yaml", body, status: 422 };
    let event = |name, body| Attack { name, path: "/v1/events", content_type: "application/json", body, status: 400 };
    // Accepted (202): what they cost is bounded while they run, at ingest or at dispatch.
    let cel_event =
        |name, body| Attack { name, path: "/v1/events", content_type: "application/json", body, status: 202 };
    vec![
        yaml("alias bomb", alias_bomb()),
        yaml("text bomb", text_bomb()),
        yaml("deep flow nesting", deep_flow()),
        yaml("deep block nesting", format!("a:\n{}x\n", "- ".repeat(60_000))),
        // As deep as the bracket limit lets flow nesting go, with the body full of values
        // at that depth: the scanner's worst case within the limits.
        yaml("wide flow at the bracket limit", format!("a: {}{}\n", "[".repeat(256), "x,".repeat(450_000))),
        yaml("8000 tiny documents", many_documents(8000)),
        event("deep event", deep_event(100_000)),
        event("repeated key", DUPLICATE_AMOUNT.to_owned()),
        yaml("Filter nesting comprehensions over the event", filter("nested", "cel-nested", NESTED_ALL)),
        yaml(
            "AgentRule nesting comprehensions over the event",
            agent_rule("nested", "cel-nested", "agent", NESTED_ALL)
                + "---\n"
                + &endpoint("agent", "cel-nested", ", agent: true"),
        ),
        cel_event("matches() with patterns from the event", event_in("cel-matches", patterns_from_data())),
        cel_event("a Filter scanning the event in a loop", event_in("cel-scan", distinct_elements())),
        cel_event("an AgentRule scanning the event in a loop", event_in("cel-rule", distinct_elements())),
    ]
}

/// Kills the server however the test ends: a failed assertion must not leave it running.
struct KillOnDrop(Option<Process>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(server) = self.0.take() {
            server.kill();
        }
    }
}

/// `VmHWM` (peak) and `VmRSS` of a process, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {status}"));
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The requirement itself is a time bound: while every attack runs, twice at once and
/// three rounds over, `/healthz` (polled every 20 ms) answers 99% of its polls within
/// 100 ms and every one within a second, and the server never holds more than 200 MiB.
/// A blocked async worker shows in the percentile; a single slow poll on a machine that
/// other builds share is the machine, not the server (one such poll took 244 ms at a load
/// average of 3 while every other answered in under 35 ms). The AgentRule attacks go on at dispatch after
/// their events are answered; the polling goes on until their decisions are made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attacks_leave_healthz_answering_and_memory_bounded() {
    const P99_LATENCY: Duration = Duration::from_millis(100);
    const MAX_LATENCY: Duration = Duration::from_secs(1);
    const MAX_MEMORY: u64 = 200 * 1024 * 1024;
    let db = TestDb::sqlite();
    let mut command = Process::command(&db, &[]);
    command.env("HOOKWARDEN_ALLOW_PRIVATE_URLS", "true");
    let server = Process::try_start(command).unwrap_or_else(|failed| panic!("{failed}"));
    let base = server.base.clone();
    let pid = server.child.id();
    let server = KillOnDrop(Some(server));
    let admin = token("admin", &[Role::Admin], &["*"]);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let applied = client
        .post(format!("{base}/v1/apply"))
        .bearer_auth(&admin)
        .header("content-type", "application/yaml")
        .body(cel_targets())
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 200, "{}", applied.text().await.unwrap_or_default());

    let done = tokio_util::sync::CancellationToken::new();
    let poller = tokio::spawn({
        let (base, done) = (base.clone(), done.clone());
        async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
            let mut latencies = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !done.is_cancelled() {
                tick.tick().await;
                let started = Instant::now();
                let status = client.get(format!("{base}/healthz")).send().await.map(|r| r.status().as_u16());
                latencies.push(started.elapsed());
                assert_eq!(status.ok(), Some(200), "/healthz must answer");
            }
            latencies
        }
    });

    // Made once: the test's own work must not crowd the machine while it measures.
    let attacks: Vec<(Attack, bytes::Bytes)> = attacks()
        .into_iter()
        .map(|a| {
            let body = bytes::Bytes::from(a.body.clone());
            (a, body)
        })
        .collect();
    let started = Instant::now();
    for _round in 0..3 {
        let mut sent = Vec::new();
        for (attack, body) in &attacks {
            for _copy in 0..2 {
                let (client, base, admin) = (client.clone(), base.clone(), admin.clone());
                let (name, status) = (attack.name, attack.status);
                let request = client
                    .post(format!("{base}{}", attack.path))
                    .bearer_auth(admin)
                    .header("content-type", attack.content_type)
                    .body(body.clone());
                sent.push(tokio::spawn(async move {
                    let response =
                        request.send().await.unwrap_or_else(|e| panic!("{name}: the server did not answer: {e}"));
                    let code = response.status().as_u16();
                    assert_eq!(code, status, "{name}: {}", response.text().await.unwrap_or_default());
                }));
            }
        }
        for request in sent {
            request.await.expect("attack request");
        }
    }
    // The AgentRule attack's deliveries are decided at dispatch: until every one is.
    eventually(Duration::from_secs(60), "the AgentRule attack's decisions", || async {
        let listed: Value = client
            .get(format!("{base}/v1/deliveries?namespace=cel-rule&state=denied"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listed["items"].as_array().map_or(0, Vec::len) == 6
    })
    .await;
    let attacked = started.elapsed();
    // Keep polling a little after the last answer: work the server carried on with
    // counts too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.cancel();
    let mut latencies = poller.await.expect("poller");
    let (peak, now) = memory_of(pid);
    drop(server);

    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let distribution = format!(
        "{} polls over {attacked:?} of attacks: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}; memory peak {} MiB, now {} MiB",
        latencies.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        latencies[latencies.len() - 1],
        peak / (1024 * 1024),
        now / (1024 * 1024)
    );
    eprintln!("{distribution}");
    assert!(latencies.len() >= 5, "too few polls to judge: {distribution}");
    assert!(at(0.99) < P99_LATENCY, "/healthz was slow: {distribution}");
    assert!(latencies[latencies.len() - 1] < MAX_LATENCY, "/healthz stalled: {distribution}");
    assert!(peak < MAX_MEMORY, "the server's memory grew too far: {distribution}");
}
