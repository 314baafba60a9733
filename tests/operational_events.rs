//! Operational events end to end: real transitions (a receiver answering 500 until the
//! breaker opens, a 410, dead letters, an operator's enable) on real databases, told to a
//! notification endpoint on loopback subscribed with `eventTypes: ["hookwarden.*"]`; each
//! received event verified with the official Standard Webhooks verifier and its `data`
//! checked against the schema documented in docs/operational-events.md.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receiver::{Received, Script, TestReceiver, SECRET};
use common::{json_with_status, metric, spawn_app_with, Process, TestApp, TestDb};
use serde_json::{json, Value};

fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config.operational_events.fan_out_interval = Duration::from_millis(50);
    config
}

/// An Endpoint document; `extra` is more of its spec (indented two spaces).
fn endpoint(name: &str, url: &str, event_types: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n  eventTypes: [{event_types}]\n{extra}"
    )
}

fn budget(name: &str, spec: &str) -> String {
    format!("apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: {name}}}\nspec:\n{spec}")
}

/// The schema of every documented type's `data`, read from docs/operational-events.md: the
/// first `json` block after the type's `### `heading.
fn documented_schemas() -> BTreeMap<String, jsonschema::Validator> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operational-events.md")).unwrap();
    let mut schemas = BTreeMap::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(heading) = line.strip_prefix("### `").and_then(|h| h.strip_suffix('`')) else { continue };
        let block: String = lines
            .by_ref()
            .skip_while(|l| *l != "```json")
            .skip(1)
            .take_while(|l| *l != "```")
            .collect::<Vec<_>>()
            .join("\n");
        let schema: Value = serde_json::from_str(&block).unwrap_or_else(|e| panic!("schema of {heading}: {e}"));
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .offline()
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(&schema)
            .unwrap_or_else(|e| panic!("schema of {heading}: {e}"));
        schemas.insert(heading.to_owned(), validator);
    }
    schemas
}

#[test]
fn every_emitted_type_is_documented_with_a_schema() {
    let schemas = documented_schemas();
    for t in hookwarden::operational::TYPES {
        assert!(schemas.contains_key(t), "{t} has no schema in docs/operational-events.md");
    }
    assert_eq!(schemas.len(), hookwarden::operational::TYPES.len(), "a documented type that is not emitted");
}

/// One operational event as a notification endpoint received it.
#[derive(Debug)]
struct Told {
    event_type: String,
    data: Value,
    id: String,
}

/// The operational events received on `path`, each checked: signed (the official
/// verifier), of a documented type, its data valid against that type's schema.
fn told(receiver: &TestReceiver, path: &str) -> Vec<Told> {
    let schemas = documented_schemas();
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    receiver
        .on(path)
        .iter()
        .filter(|r| r.answered < 300)
        .map(|r: &Received| {
            verifier.verify(r.body.as_bytes(), &r.headers).unwrap_or_else(|e| panic!("{e}: {r:?}"));
            let body: Value = serde_json::from_str(&r.body).unwrap();
            let event_type = body["type"].as_str().unwrap().to_owned();
            let schema = schemas.get(&event_type).unwrap_or_else(|| panic!("undocumented type {event_type}"));
            let errors: Vec<String> = schema.iter_errors(&body["data"]).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{event_type} data {} against its schema: {errors:?}", body["data"]);
            Told { event_type, data: body["data"].clone(), id: r.headers["webhook-id"].to_str().unwrap().to_owned() }
        })
        .collect()
}

/// Waits until `path` received `count` operational events, then a while longer (many
/// fan-out periods) to see that no more come; returns them.
async fn settled(receiver: &TestReceiver, path: &str, count: usize) -> Vec<Told> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while told(receiver, path).len() < count {
        assert!(Instant::now() < deadline, "only {:?} arrived", told(receiver, path));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(750)).await;
    let all = told(receiver, path);
    assert_eq!(all.len(), count, "more than one event per transition: {all:#?}");
    all
}

fn types_of(told: &[Told]) -> Vec<&str> {
    let mut types: Vec<&str> = told.iter().map(|t| t.event_type.as_str()).collect();
    types.sort_unstable();
    types
}

async fn post_event(app: &TestApp, event_type: &str) -> String {
    let body = json!({"source": "shop", "type": event_type, "data": {"n": 1}});
    let answer = json_with_status(app.post_json("/v1/events", &app.admin, body.to_string()).await, 202).await;
    answer["id"].as_str().unwrap().to_owned()
}

fn answering(script: impl Fn(&str, usize) -> u16 + Send + Sync + 'static) -> Script {
    Arc::new(move |path, n| (script(path, n), None, Duration::ZERO))
}

async fn reserved_types_are_refused_at_ingest(db: TestDb) {
    let app = spawn_app_with(config_for(&db)).await;
    for path in ["/v1/events", "/v1/events/batch"] {
        let event = json!({"source": "shop", "type": "hookwarden.endpoint.disabled", "data": {}});
        let body = if path.ends_with("batch") { json!([event]) } else { event };
        let answer = json_with_status(app.post_json(path, &app.admin, body.to_string()).await, 400).await;
        let details = &answer["error"]["details"];
        let expected = if path.ends_with("batch") { "[0].type" } else { "type" };
        assert_eq!(details[0]["path"], expected, "{answer}");
        assert!(details[0]["message"].as_str().unwrap().contains("reserved"), "{answer}");
    }
    // In CloudEvents binary mode too, named where it was sent.
    let binary = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(&app.admin)
        .header("ce-specversion", "1.0")
        .header("ce-id", "op-1")
        .header("ce-source", "/shop")
        .header("ce-type", "hookwarden.approval.requested")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let answer = json_with_status(binary, 400).await;
    assert_eq!(answer["error"]["details"][0]["path"], "header:ce-type", "{answer}");
    // A type that only looks alike is an ordinary one.
    post_event(&app, "order.hookwarden.created").await;
}

async fn a_breaker_that_opens_and_closes_is_told_once_per_transition(db: TestDb) {
    // Four failures open the breaker; the half-open probe succeeds and closes it.
    let receiver = TestReceiver::start(answering(|path, n| match path {
        "/flaky" if n < 4 => 500,
        _ => 204,
    }))
    .await;
    let app = spawn_app_with(config_for(&db)).await;
    let retry = "  maxAttempts: 100\n  backoff: {base: 10ms, max: 20ms, jitter: none}\n  circuitBreaker: {consecutiveFailures: 4, openFor: 300ms}\n";
    app.apply_yaml(
        &[
            budget("breaking", retry),
            endpoint(
                "flaky",
                &receiver.url("/flaky"),
                "\"order.*\"",
                "  retryBudgetRef: breaking\n  owner: payments-team <pay@example.com>\n",
            ),
            endpoint("notify", &receiver.url("/notify"), "\"hookwarden.*\"", ""),
        ]
        .join("---\n"),
    )
    .await;
    post_event(&app, "order.created").await;
    let all = settled(&receiver, "/notify", 3).await;
    assert_eq!(
        types_of(&all),
        ["hookwarden.endpoint.breaker_closed", "hookwarden.endpoint.breaker_opened", "hookwarden.endpoint.failing"]
    );
    for t in &all {
        assert_eq!(t.data["endpoint"], "flaky");
        assert_eq!(t.data["namespace"], "default");
        assert_eq!(t.data["owner"], "payments-team <pay@example.com>", "the owner is carried");
    }
    let failing = all.iter().find(|t| t.event_type.ends_with("failing")).unwrap();
    assert_eq!((failing.data["failingAt"].as_u64(), failing.data["breakerThreshold"].as_u64()), (Some(2), Some(4)));
    let opened = all.iter().find(|t| t.event_type.ends_with("opened")).unwrap();
    assert_eq!(opened.data["consecutiveFailures"], 4);
    assert_eq!(receiver.on("/flaky").len(), 5, "four failures and the probe");
    // Each is an ordinary stored event of the namespace, from `hookwarden`.
    for t in &all {
        let shown = json_with_status(app.get(&format!("/v1/events/{}", t.id), &app.admin).await, 200).await;
        assert_eq!(shown["source"], "hookwarden");
        assert_eq!(shown["subject"], "Endpoint/default/flaky");
        assert_eq!(shown["status"], "accepted");
        assert_eq!(shown["deliveries"].as_array().unwrap().len(), 1, "to the notification endpoint only: {shown}");
    }
}

async fn a_410_is_told_as_disabled_and_enabling_is_told(db: TestDb) {
    let receiver = TestReceiver::start(answering(|path, _| if path == "/gone" { 410 } else { 204 })).await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(
        &[
            endpoint("gone", &receiver.url("/gone"), "\"order.*\"", ""),
            endpoint("notify", &receiver.url("/notify"), "\"hookwarden.endpoint.*\", \"hookwarden.delivery.*\"", ""),
        ]
        .join("---\n"),
    )
    .await;
    post_event(&app, "order.created").await;
    // The delivery that met the 410 is `failed` (not dead): only the disabling is told.
    let all = settled(&receiver, "/notify", 1).await;
    assert_eq!(types_of(&all), ["hookwarden.endpoint.disabled"]);
    let disabled = &all[0];
    assert_eq!(disabled.data["status"], 410);
    assert_eq!(disabled.data["response"], "answer", "with the receiver's answer");
    assert_eq!(disabled.data["owner"], Value::Null, "no owner: null");

    // Enabling is told once.
    let enabled = json_with_status(app.post_json("/v1/endpoints/default/gone/enable", &app.admin, "").await, 200).await;
    assert_eq!(enabled["enabled"], true, "{enabled}");
    let all = settled(&receiver, "/notify", 2).await;
    let told_enabled: Vec<&Told> = all.iter().filter(|t| t.event_type == "hookwarden.endpoint.enabled").collect();
    assert_eq!(told_enabled.len(), 1, "{all:#?}");
    assert_eq!(told_enabled[0].data["by"], "operator");
    // Enabling what is sendable already changes nothing, and tells nothing.
    let again = json_with_status(app.post_json("/v1/endpoints/default/gone/enable", &app.admin, "").await, 200).await;
    assert_eq!(again["enabled"], false);
    settled(&receiver, "/notify", 2).await;
    // Another 410 disables it again; an apply that changes its spec enables it, told so.
    post_event(&app, "order.created").await;
    settled(&receiver, "/notify", 3).await;
    app.apply_yaml(&endpoint("gone", &receiver.url("/gone"), "\"order.*\"", "  owner: new-team\n")).await;
    let all = settled(&receiver, "/notify", 4).await;
    let by: Vec<&str> =
        all.iter().filter(|t| t.event_type.ends_with("enabled")).map(|t| t.data["by"].as_str().unwrap()).collect();
    assert_eq!(by.iter().filter(|b| **b == "apply").count(), 1, "{all:#?}");
    let by_apply = all.iter().find(|t| t.data["by"] == "apply").unwrap();
    assert_eq!(by_apply.data["owner"], "new-team", "the owner of the spec just applied");
    assert_eq!(all.iter().filter(|t| t.event_type.ends_with("disabled")).count(), 2);
}

async fn a_dead_letter_is_told_with_its_attempts_and_last_error(db: TestDb) {
    let receiver = TestReceiver::start(answering(|path, _| if path == "/down" { 503 } else { 204 })).await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(
        &[
            budget("short", "  maxAttempts: 3\n  backoff: {base: 10ms, max: 20ms, jitter: none}\n"),
            endpoint("down", &receiver.url("/down"), "\"order.*\"", "  retryBudgetRef: short\n  owner: fulfilment\n"),
            endpoint("notify", &receiver.url("/notify"), "\"hookwarden.*\"", ""),
        ]
        .join("---\n"),
    )
    .await;
    let event = post_event(&app, "order.created").await;
    let all = settled(&receiver, "/notify", 1).await;
    assert_eq!(types_of(&all), ["hookwarden.delivery.dead"], "no breaker: no failing, no breaker_opened");
    let dead = &all[0].data;
    assert_eq!((dead["event"].as_str(), dead["endpoint"].as_str()), (Some(event.as_str()), Some("down")));
    assert_eq!((dead["attempts"].as_u64(), dead["lastStatus"].as_u64()), (Some(3), Some(503)));
    assert!(dead["lastError"].as_str().is_some_and(|e| !e.is_empty()), "{dead}");
    assert_eq!(dead["owner"], "fulfilment");
    assert_eq!(receiver.on("/down").len(), 3);
}

async fn dead_letters_reaching_the_count_are_told_once_per_crossing(db: TestDb) {
    let receiver = TestReceiver::start(answering(|path, _| if path == "/down" { 500 } else { 204 })).await;
    let mut config = config_for(&db);
    config.operational_events.dead_letters = 3;
    let app = spawn_app_with(config).await;
    app.apply_yaml(
        &[
            budget("once", "  maxAttempts: 1\n  backoff: {base: 10ms, max: 20ms, jitter: none}\n"),
            endpoint("down", &receiver.url("/down"), "\"order.*\"", "  retryBudgetRef: once\n"),
            endpoint("notify", &receiver.url("/notify"), "\"hookwarden.dead_letters.*\"", ""),
        ]
        .join("---\n"),
    )
    .await;
    for _ in 0..5 {
        post_event(&app, "order.created").await;
    }
    let dead_ones = || async {
        let page = json_with_status(app.get("/v1/deliveries?endpoint=down&state=dead", &app.admin).await, 200).await;
        page["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while dead_ones().await.len() < 5 {
        assert!(Instant::now() < deadline, "the deliveries did not all die");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let all = settled(&receiver, "/notify", 1).await;
    assert_eq!(types_of(&all), ["hookwarden.dead_letters.threshold"], "five dead letters, one crossing");
    assert_eq!((all[0].data["threshold"].as_u64(), all[0].data["windowSeconds"].as_u64()), (Some(3), Some(3600)));
    assert!(all[0].data["deadLetters"].as_i64().is_some_and(|n| (3..=5).contains(&n)), "{:?}", all[0].data);
    // Three replayed: two dead letters left, below the count; when they die again the count
    // crosses it again.
    let body = json!({"namespace": "default", "endpoint": "down", "state": "dead", "limit": 3});
    let replayed =
        json_with_status(app.post_json("/v1/deliveries/replay", &app.admin, body.to_string()).await, 200).await;
    assert_eq!(replayed["replayed"].as_array().unwrap().len(), 3, "{replayed}");
    settled(&receiver, "/notify", 2).await;
    assert_eq!(receiver.on("/down").len(), 8);
}

async fn a_secret_that_cannot_be_read_is_told_once(db: TestDb) {
    let receiver = TestReceiver::start(answering(|_, _| 204)).await;
    let app = spawn_app_with(config_for(&db)).await;
    // A variable the namespace may name, which no test sets.
    let unset = "HOOKWARDEN_SECRET_DEFAULT__NEVER_SET_IN_TESTS";
    let unreadable = format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: locked}}\nspec:\n  url: {}\n  secrets: [{{valueFrom: {{env: {unset}}}}}]\n  eventTypes: [\"order.*\"]\n  owner: vault-team\n",
        receiver.url("/locked")
    );
    app.apply_yaml(&[endpoint("notify", &receiver.url("/notify"), "\"hookwarden.*\"", ""), unreadable].join("---\n"))
        .await;
    post_event(&app, "order.created").await;
    // The catalog reads it again every second; it is told once all the same.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = settled(&receiver, "/notify", 1).await;
    assert_eq!(types_of(&all), ["hookwarden.endpoint.secret_unavailable"]);
    assert_eq!((all[0].data["endpoint"].as_str(), all[0].data["owner"].as_str()), (Some("locked"), Some("vault-team")));
    assert!(all[0].data["problem"].as_str().unwrap().contains(unset), "{:?}", all[0].data);
    assert!(receiver.on("/locked").is_empty());
}

async fn a_failing_notification_endpoint_is_not_told_about_itself_and_it_settles(db: TestDb) {
    // Everything fails: the endpoint that takes orders and operational events alike, and
    // the notification endpoint.
    let receiver = TestReceiver::start(answering(|_, _| 500)).await;
    let app = spawn_app_with(config_for(&db)).await;
    // Metrics are per test process: a name of its own for each database's run.
    let notify = if db.is_postgres() { "notify-pg" } else { "notify-sqlite" };
    let short = "  maxAttempts: 2\n  backoff: {base: 10ms, max: 20ms, jitter: none}\n";
    app.apply_yaml(
        &[
            budget("breaking", &format!("{short}  circuitBreaker: {{consecutiveFailures: 2, openFor: 10m}}\n")),
            budget("short", short),
            endpoint("both", &receiver.url("/both"), "\"order.*\", \"hookwarden.*\"", "  retryBudgetRef: breaking\n"),
            endpoint(notify, &receiver.url("/notify"), "\"hookwarden.*\"", "  retryBudgetRef: short\n"),
        ]
        .join("---\n"),
    )
    .await;
    post_event(&app, "order.created").await;
    // `both` fails its order twice: failing (at 1), breaker_opened (at 2), delivery.dead;
    // told to `notify` only, which fails each twice, and whose failures tell nothing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead = metric(&app.base, "hookwarden_operational_dead_deliveries_total", &[("endpoint", notify)]).await;
        if dead == Some(3.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the notification endpoint's deliveries did not all die: {dead:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let count_events = || async {
        let page = json_with_status(app.get("/v1/events?limit=100", &app.admin).await, 200).await;
        page["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    let settled_at = count_events().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = count_events().await;
    assert_eq!(settled_at, later, "events kept coming");
    let mut types = later.clone();
    types.sort_unstable();
    assert_eq!(
        types,
        [
            "hookwarden.delivery.dead",
            "hookwarden.endpoint.breaker_opened",
            "hookwarden.endpoint.failing",
            "order.created"
        ]
    );
    let bodies = |path: &str| -> Vec<Value> {
        receiver.on(path).iter().map(|r| serde_json::from_str::<Value>(&r.body).unwrap()).collect()
    };
    assert!(bodies("/both").iter().all(|b| b["type"] == "order.created"), "`both` was told about itself");
    assert_eq!(bodies("/both").len(), 2);
    let notify = bodies("/notify");
    assert_eq!(notify.len(), 6, "three events, two attempts each");
    assert!(notify.iter().all(|b| b["data"]["endpoint"] == "both"), "`notify` was told about itself");
}

async fn approvals_requested_expiring_decided_and_expired_are_told_once_each(db: TestDb) {
    let receiver = TestReceiver::start(answering(|_, _| 204)).await;
    let mut config = config_for(&db);
    config.console.public_url = Some("https://console.example.com/".into());
    let app = spawn_app_with(config).await;
    let rule = |name: &str, kind: &str, approval: &str| {
        format!("apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: {name}}}\nspec:\n  endpointRefs: [agent]\n  match: \"event.data.kind == '{kind}'\"\n  decision: hold\n  approval: {approval}\n")
    };
    app.apply_yaml(
        &[
            endpoint("agent", &receiver.url("/agent"), "\"act\"", "  agent: true\n  owner: refunds-team\n"),
            endpoint("notify", &receiver.url("/notify"), "\"hookwarden.approval.*\"", ""),
            // Held for going over its spend limit.
            "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: refunds}\nspec:\n  endpointRefs: [agent]\n  match: \"event.data.kind == 'refund'\"\n  decision: allow\n  spend: {amount: \"1500\", currency: USD, limit: 1000, window: 24h, overLimit: hold}\n  approval: {quorum: 1, expiresAfter: 4h}\n".to_owned(),
            rule("slow", "slow", "{quorum: 1, expiresAfter: 2s, onExpiry: deny}"),
        ]
        .join("---\n"),
    )
    .await;
    let act = |kind: &str| json!({"source": "shop", "type": "act", "data": {"kind": kind}});
    let refund = json_with_status(app.post_json("/v1/events", &app.admin, act("refund").to_string()).await, 202).await;
    let refund = refund["id"].as_str().unwrap().to_owned();
    let slow = json_with_status(app.post_json("/v1/events", &app.admin, act("slow").to_string()).await, 202).await;
    let slow = slow["id"].as_str().unwrap().to_owned();
    // The refund's request, granted by an approver.
    let approver = common::token("alice", &[hookwarden::auth::Role::Approver], &["default"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let approval = loop {
        let page = json_with_status(app.get("/v1/approvals?namespace=default", &app.admin).await, 200).await;
        if let Some(found) = page["items"].as_array().unwrap().iter().find(|a| a["event_id"] == refund.as_str()) {
            break found["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no approval request: {page}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let granted = app
        .client
        .post(app.url(&format!("/v1/approvals/{approval}/grant")))
        .bearer_auth(&approver)
        .json(&json!({"reason": "checked by hand"}))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 200);
    // The slow one is opened closer to its deadline than `approvalExpiringBefore` (15m):
    // told `expiring` at once, then `expired`; the refund's (4h) is not expiring.
    let all = settled(&receiver, "/notify", 5).await;
    assert_eq!(
        types_of(&all),
        [
            "hookwarden.approval.decided",
            "hookwarden.approval.expired",
            "hookwarden.approval.expiring",
            "hookwarden.approval.requested",
            "hookwarden.approval.requested"
        ]
    );
    let expiring = all.iter().find(|t| t.event_type.ends_with("expiring")).unwrap();
    assert_eq!(expiring.data["event"], slow.as_str());
    let requested = all.iter().find(|t| t.event_type.ends_with("requested") && t.data["event"] == refund.as_str());
    let requested = &requested.unwrap().data;
    assert_eq!(requested["approval"], approval.as_str());
    assert_eq!(requested["link"], format!("https://console.example.com/approvals/{approval}"));
    assert_eq!((requested["quorum"].as_u64(), requested["rule"].as_str()), (Some(1), Some("refunds")));
    assert_eq!(requested["action"]["type"], "act");
    assert_eq!(requested["action"]["data"], json!({"kind": "refund"}), "the action as approvers see it");
    assert_eq!(requested["owner"], "refunds-team");
    let spend = &requested["spend"][0];
    assert_eq!(
        (spend["rule"].as_str(), spend["amount"].as_i64(), spend["limit"].as_i64()),
        (Some("refunds"), Some(1500), Some(1000))
    );
    assert_eq!(spend["remaining"], 1000, "{requested}");
    let decided = all.iter().find(|t| t.event_type.ends_with("decided")).unwrap();
    assert_eq!(decided.data["approval"], approval.as_str());
    assert_eq!(decided.data["event"], refund.as_str());
    assert_eq!((decided.data["decision"].as_str(), decided.data["released"].as_bool()), (Some("granted"), Some(true)));
    assert_eq!(decided.data["reason"], "checked by hand");
    assert_eq!(decided.data["owner"], "refunds-team");
    let expired = all.iter().find(|t| t.event_type.ends_with("expired")).unwrap();
    assert_eq!(
        (expired.data["event"].as_str(), expired.data["released"].as_bool()),
        (Some(slow.as_str()), Some(false))
    );
    // The agent endpoint got the granted action only, never an event about itself.
    let agent = receiver.on("/agent");
    assert_eq!(agent.len(), 1);
    assert_eq!(serde_json::from_str::<Value>(&agent[0].body).unwrap()["type"], "act");
}

async fn a_denial_for_spend_is_told_and_other_decisions_are_not(db: TestDb) {
    let receiver = TestReceiver::start(answering(|_, _| 204)).await;
    let app = spawn_app_with(config_for(&db)).await;
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: cap}\nspec:\n  endpointRefs: [agent]\n  decision: allow\n  spend: {amount: \"int(event.data.cents)\", currency: USD, limit: 1000, window: 24h, overLimit: deny}\n";
    app.apply_yaml(
        &[
            endpoint("agent", &receiver.url("/agent"), "\"act\"", "  agent: true\n"),
            endpoint("notify", &receiver.url("/notify"), "\"hookwarden.agent.*\"", ""),
            rule.to_owned(),
        ]
        .join("---\n"),
    )
    .await;
    let act = |cents: i64| json!({"source": "shop", "type": "act", "data": {"cents": cents}}).to_string();
    json_with_status(app.post_json("/v1/events", &app.admin, act(600)).await, 202).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.on("/agent").is_empty() {
        assert!(Instant::now() < deadline, "the allowed action was not sent");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let over = json_with_status(app.post_json("/v1/events", &app.admin, act(500)).await, 202).await;
    let all = settled(&receiver, "/notify", 1).await;
    assert_eq!(types_of(&all), ["hookwarden.agent.spend_limit_reached"]);
    let data = &all[0].data;
    assert_eq!((data["endpoint"].as_str(), data["rule"].as_str()), (Some("agent"), Some("cap")));
    assert_eq!(
        (data["amount"].as_i64(), data["windowTotal"].as_i64(), data["limit"].as_i64()),
        (Some(500), Some(600), Some(1000))
    );
    assert_eq!(data["event"], over["id"]);
    assert_eq!(receiver.on("/agent").len(), 1, "the denied action was not sent");
}

/// The types of every stored event, sorted.
async fn stored_types(app: &TestApp) -> Vec<String> {
    let page = json_with_status(app.get("/v1/events?limit=100", &app.admin).await, 200).await;
    let mut types: Vec<String> =
        page["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect();
    types.sort_unstable();
    types
}

/// Two agent endpoints `a` and `b`, both subscribed to `act` and to `hookwarden.*`, under
/// `rule` (an AgentRule for both); one `act` event posted. What the gate does to the `act`
/// deliveries is told to the other agent, whose gate decides that delivery in turn: it must
/// tell nothing, or the two would tell each other forever.
async fn two_agents_told_of_each_other(db: &TestDb, rule: &str) -> (TestApp, TestReceiver) {
    let receiver = TestReceiver::start(answering(|_, _| 204)).await;
    let app = spawn_app_with(config_for(db)).await;
    let agent =
        |name: &str| endpoint(name, &receiver.url(&format!("/{name}")), "\"act\", \"hookwarden.*\"", "  agent: true\n");
    app.apply_yaml(&[agent("a"), agent("b"), rule.to_owned()].join("---\n")).await;
    post_event(&app, "act").await;
    (app, receiver)
}

/// Waits until the stored events are `expected` and stay so (many fan-out periods).
async fn events_settle_at(app: &TestApp, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let types = stored_types(app).await;
        if types == expected {
            break;
        }
        assert!(types.len() <= expected.len(), "operational events loop: {types:?}");
        assert!(Instant::now() < deadline, "events did not settle at {expected:?}: {types:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stored_types(app).await, expected, "events kept coming");
}

async fn holds_of_operational_events_tell_nothing_so_agents_do_not_loop(db: TestDb) {
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: hold-all}\nspec:\n  endpointRefs: [a, b]\n  decision: hold\n  approval: {quorum: 1, expiresAfter: 3s, onExpiry: deny}\n";
    let (app, receiver) = two_agents_told_of_each_other(&db, rule).await;
    let approvals = || async {
        let page = json_with_status(app.get("/v1/approvals?namespace=default&limit=100", &app.admin).await, 200).await;
        page["items"].as_array().unwrap().clone()
    };
    // An approver denies a held delivery of an operational event: its decision tells nothing.
    let act = stored_types(&app).await;
    assert_eq!(act.len(), 1, "{act:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let of_operational = loop {
        let events = json_with_status(app.get("/v1/events?limit=100&type=act", &app.admin).await, 200).await;
        let act_id = events["items"][0]["id"].as_str().unwrap().to_owned();
        if let Some(found) =
            approvals().await.iter().find(|a| a["event_id"] != act_id.as_str() && a["state"] == "pending")
        {
            break found["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no held delivery of an operational event: {:?}", approvals().await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let approver = common::token("alice", &[hookwarden::auth::Role::Approver], &["default"]);
    let denied = app
        .client
        .post(app.url(&format!("/v1/approvals/{of_operational}/deny")))
        .bearer_auth(&approver)
        .json(&json!({"reason": "no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 200);
    // Each `act` hold is told requested, expiring (3s is within 15m) and expired, to the
    // other agent; those deliveries are held (and denied or expired) telling nothing.
    let expected = [
        "act",
        "hookwarden.approval.expired",
        "hookwarden.approval.expired",
        "hookwarden.approval.expiring",
        "hookwarden.approval.expiring",
        "hookwarden.approval.requested",
        "hookwarden.approval.requested",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = approvals().await;
        if all.len() == 8 && all.iter().all(|a| a["state"] != "pending") {
            break;
        }
        assert!(all.len() <= 8, "holds loop: {} approval requests", all.len());
        assert!(Instant::now() < deadline, "approval requests still pending: {all:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    events_settle_at(&app, &expected).await;
    assert_eq!(approvals().await.len(), 8, "two holds of `act`, one of each of their six events");
    assert!(receiver.on("/a").is_empty() && receiver.on("/b").is_empty(), "a held delivery was sent");
}

async fn denials_for_spend_of_operational_events_tell_nothing_so_agents_do_not_loop(db: TestDb) {
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: cap}\nspec:\n  endpointRefs: [a, b]\n  decision: allow\n  spend: {amount: \"1500\", currency: USD, limit: 1000, window: 24h, overLimit: deny}\n";
    let (app, receiver) = two_agents_told_of_each_other(&db, rule).await;
    // Both `act` deliveries are denied for spend and told to the other agent, whose
    // delivery of it is denied for spend too, telling nothing.
    events_settle_at(&app, &["act", "hookwarden.agent.spend_limit_reached", "hookwarden.agent.spend_limit_reached"])
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = json_with_status(app.get("/v1/deliveries?limit=100", &app.admin).await, 200).await;
        let states: Vec<&str> =
            page["items"].as_array().unwrap().iter().map(|d| d["state"].as_str().unwrap()).collect();
        if states == ["denied"; 4] {
            break;
        }
        assert!(Instant::now() < deadline, "not four denied deliveries: {page}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(receiver.on("/a").is_empty() && receiver.on("/b").is_empty(), "a denied delivery was sent");
}

on_both_databases!(
    holds_of_operational_events_tell_nothing_so_agents_do_not_loop,
    denials_for_spend_of_operational_events_tell_nothing_so_agents_do_not_loop,
    a_denial_for_spend_is_told_and_other_decisions_are_not,
    approvals_requested_expiring_decided_and_expired_are_told_once_each,
    reserved_types_are_refused_at_ingest,
    a_breaker_that_opens_and_closes_is_told_once_per_transition,
    a_410_is_told_as_disabled_and_enabling_is_told,
    a_dead_letter_is_told_with_its_attempts_and_last_error,
    dead_letters_reaching_the_count_are_told_once_per_crossing,
    a_secret_that_cannot_be_read_is_told_once,
    a_failing_notification_endpoint_is_not_told_about_itself_and_it_settles,
);

/// Two `serve` processes on one PostgreSQL, both making transitions and both fanning out
/// the outbox: each dead delivery is told exactly once, and so is the crossing of the
/// dead-letter count that both processes' deaths make together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_tell_each_transition_once() {
    let Some(db) = TestDb::postgres().await else { return };
    const EVENTS: usize = 30;
    let receiver = TestReceiver::start(answering(|path, _| if path == "/down" { 500 } else { 204 })).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(
        &config,
        "allowPrivateUrls: true\ndelivery: {pollInterval: 50ms, leaseMargin: 1s}\noperationalEvents: {fanOutInterval: 10ms}\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let (one, two) = (Process::start(&db, &args), Process::start(&db, &args));
    let admin = common::token("admin", &[hookwarden::auth::Role::Admin], &["*"]);
    let client = reqwest::Client::new();
    let yaml = [
        budget("once", "  maxAttempts: 1\n  backoff: {base: 10ms, max: 20ms, jitter: none}\n"),
        endpoint("down", &receiver.url("/down"), "\"order.*\"", "  retryBudgetRef: once\n"),
        endpoint("notify", &receiver.url("/notify"), "\"hookwarden.*\"", ""),
    ]
    .join("---\n");
    common::apply_at(&one.base, &yaml).await;
    // The probe that fans out dies too.
    let probe = common::wait_until_it_fans_out(&two.base, "order.probe").await;
    let mut posted = vec![probe["id"].as_str().unwrap().to_owned()];
    for n in 0..EVENTS {
        let base = if n % 2 == 0 { &one.base } else { &two.base };
        let event = json!({"source": "shop", "type": "order.created", "data": {"n": n}});
        let r: Value = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(&admin)
            .json(&event)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["deliveries"].as_array().unwrap().len(), 1, "{r}");
        posted.push(r["id"].as_str().unwrap().to_owned());
    }
    // Each death, and the one crossing of `operationalEvents.deadLetters` (10).
    let all = settled(&receiver, "/notify", posted.len() + 1).await;
    let crossings: Vec<&Told> = all.iter().filter(|t| t.event_type == "hookwarden.dead_letters.threshold").collect();
    assert_eq!(crossings.len(), 1, "{crossings:#?}");
    let all: Vec<&Told> = all.iter().filter(|t| t.event_type == "hookwarden.delivery.dead").collect();
    let mut told_events: Vec<&str> = all.iter().map(|t| t.data["event"].as_str().unwrap()).collect();
    told_events.sort_unstable();
    posted.sort_unstable();
    assert_eq!(told_events, posted, "each dead delivery told once");
    let mut ids: Vec<&str> = all.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), posted.len(), "one event per transition, one delivery each");
    // Neither process's fan-out met the other's (a duplicate delivery refused by the
    // database would fail the run).
    for process in [&one, &two] {
        let failed: Vec<_> = process
            .logged("a periodic job failed; it runs again at its next period")
            .into_iter()
            .filter(|l| l["job"] == "fan_out_operational_events")
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
    }
    one.kill();
    two.kill();
}
