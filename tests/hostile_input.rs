//! Hostile input against a real server: YAML that expands, nests or repeats itself past
//! the apply limits, tokens without the role, and event JSON that repeats keys or nests
//! too deep. None of it may crash, freeze or exhaust the server, and every refusal says
//! which limit it hit.

mod common;

use std::time::{Duration, Instant};

use common::{json_with_status, spawn_app, token, Process, TestApp, TestDb};
use hookwarden::auth::Role;
use serde_json::Value;

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

/// Every attack the server must shrug off. Add new ones here.
fn attacks() -> Vec<Attack> {
    let yaml = |name, body| Attack { name, path: "/v1/apply", content_type: "application/yaml", body, status: 422 };
    let event = |name, body| Attack { name, path: "/v1/events", content_type: "application/json", body, status: 400 };
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
/// three rounds over, `/healthz` answers each poll (every 20 ms) within 100 ms, and the
/// server never holds more than 200 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attacks_leave_healthz_answering_and_memory_bounded() {
    const MAX_LATENCY: Duration = Duration::from_millis(100);
    const MAX_MEMORY: u64 = 200 * 1024 * 1024;
    let db = TestDb::sqlite();
    let server = Process::start(&db, &[]);
    let base = server.base.clone();
    let pid = server.child.id();
    let server = KillOnDrop(Some(server));
    let admin = token("admin", &[Role::Admin], &["*"]);

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

    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
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
    assert!(latencies[latencies.len() - 1] < MAX_LATENCY, "/healthz was slow: {distribution}");
    assert!(peak < MAX_MEMORY, "the server's memory grew too far: {distribution}");
}
