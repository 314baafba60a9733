//! The delivery engine end to end: real receivers on loopback ports, real databases.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receiver::{verify, Script, TestReceiver, SECRET};
use common::{eventually, spawn_app_with, TestApp, TestDb};
use serde_json::{json, Value};

fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config.delivery.lease_margin = Duration::from_secs(2);
    config
}

fn endpoint(name: &str, url: &str, types: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n  eventTypes: [\"{types}\"]\n{extra}"
    )
}

fn budget(name: &str, attempts: u32) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: {name}}}\nspec:\n  maxAttempts: {attempts}\n  backoff: {{base: 100ms, max: 1s, jitter: none}}\n"
    )
}

async fn post_event(app: &TestApp, body: Value) -> Value {
    let response = app.post_json("/v1/events", &app.admin, body.to_string()).await;
    assert_eq!(response.status(), 202);
    response.json().await.unwrap()
}

async fn delivery_states(app: &TestApp, event: &str) -> Vec<(String, String, u64)> {
    let event: Value = app.get(&format!("/v1/events/{event}"), &app.admin).await.json().await.unwrap();
    event["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["endpoint"].as_str().unwrap().to_owned(),
                d["state"].as_str().unwrap().to_owned(),
                d["attempts"].as_u64().unwrap(),
            )
        })
        .collect()
}

async fn events_fan_out_to_the_right_endpoints_signed(db: TestDb) {
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let filter = "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {name: big}\nspec:\n  expression: \"event.data.total >= 1000\"\n";
    app.apply_yaml(
        &[
            filter.to_owned(),
            endpoint("orders", &receiver.url("/orders"), "order.*", ""),
            endpoint("refunds", &receiver.url("/refunds"), "refund.*", ""),
            endpoint("big-orders", &receiver.url("/big"), "order.*", "  filterRefs: [big]\n"),
        ]
        .join("---\n"),
    )
    .await;

    let small = post_event(&app, json!({"source": "shop", "type": "order.created", "data": {"total": 500}})).await;
    let big_raw = r#"{"source":"shop","type":"order.created","data":{ "total" : 5000, "note": "caf\u00e9" }}"#;
    let big: Value = app.post_json("/v1/events", &app.admin, big_raw).await.json().await.unwrap();
    let refund = post_event(&app, json!({"source": "shop", "type": "refund.requested", "data": {"amount": 1}})).await;
    assert_eq!(small["deliveries"].as_array().unwrap().len(), 1);
    assert_eq!(big["deliveries"].as_array().unwrap().len(), 2);
    assert_eq!(refund["deliveries"][0]["endpoint"], "refunds");

    eventually(Duration::from_secs(15), "four deliveries", || async { receiver.seen.lock().unwrap().len() >= 4 }).await;
    let orders = receiver.on("/orders");
    assert_eq!(orders.len(), 2);
    assert_eq!(receiver.on("/refunds").len(), 1);
    let big_seen = receiver.on("/big");
    assert_eq!(big_seen.len(), 1, "the filter lets only the big order through");
    for r in receiver.seen.lock().unwrap().iter() {
        verify(SECRET, &r.headers, &r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert!(r.headers.get("traceparent").is_some());
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert!(body["type"].is_string() && body["timestamp"].is_string());
    }
    assert!(
        big_seen[0].body.contains(r#""data":{ "total" : 5000, "note": "caf\u00e9" }"#),
        "data byte for byte: {}",
        big_seen[0].body
    );
    assert_eq!(big_seen[0].headers["webhook-id"], big["id"].as_str().unwrap());

    let big_id = big["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), "delivered states", || async {
        delivery_states(&app, big_id).await.iter().all(|(_, state, attempts)| state == "delivered" && *attempts == 1)
    })
    .await;
    let event: Value = app.get(&format!("/v1/events/{big_id}"), &app.admin).await.json().await.unwrap();
    assert_eq!(event["deliveries"][0]["attempts_detail"][0]["status"], 204);
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in
        ["hookwarden_delivery_attempts_total", "hookwarden_ingest_events_total", "hookwarden_http_requests_total"]
    {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

async fn each_status_class_is_retried_or_not_as_documented(db: TestDb) {
    let script: Script = Arc::new(|path, n| match (path, n) {
        ("/ok", _) => (200, None, Duration::ZERO),
        ("/gone", _) => (410, None, Duration::ZERO),
        ("/busy", 0) => (429, Some("1"), Duration::ZERO),
        ("/flaky", 0) => (500, None, Duration::ZERO),
        ("/busy" | "/flaky", _) => (200, None, Duration::ZERO),
        ("/slow", _) => (200, None, Duration::from_secs(3)),
        ("/bad", _) => (400, None, Duration::ZERO),
        _ => (404, None, Duration::ZERO),
    });
    let receiver = TestReceiver::start(script).await;
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let app = spawn_app_with(config_for(&db)).await;
    let mut docs = vec![budget("quick", 3)];
    for (name, url, timeout) in [
        ("ok", receiver.url("/ok"), "5s"),
        ("gone", receiver.url("/gone"), "5s"),
        ("busy", receiver.url("/busy"), "5s"),
        ("flaky", receiver.url("/flaky"), "5s"),
        ("slow", receiver.url("/slow"), "200ms"),
        ("refused", format!("http://{refused}/x"), "5s"),
        ("bad", receiver.url("/bad"), "5s"),
    ] {
        docs.push(endpoint(name, &url, "*", &format!("  retryBudgetRef: quick\n  timeout: {timeout}\n")));
    }
    app.apply_yaml(&docs.join("---\n")).await;
    let sent = Instant::now();
    let event = post_event(&app, json!({"source": "s", "type": "t", "data": {}})).await;
    let id = event["id"].as_str().unwrap().to_owned();
    let expected = [
        ("bad", "failed", 1),
        ("busy", "delivered", 2),
        ("flaky", "delivered", 2),
        ("gone", "failed", 1),
        ("ok", "delivered", 1),
        ("refused", "dead", 3),
        ("slow", "dead", 3),
    ];
    eventually(Duration::from_secs(30), "every delivery settles", || async {
        let mut states = delivery_states(&app, &id).await;
        states.sort();
        states.iter().map(|(e, s, a)| (e.as_str(), s.as_str(), *a as i32)).collect::<Vec<_>>() == expected
    })
    .await;
    // 429 with Retry-After: 1 waited about a second before the retry.
    let busy = receiver.on("/busy");
    assert!(sent.elapsed() >= Duration::from_secs(1));
    assert_eq!(busy.len(), 2);
    let health: Value = app.get("/v1/endpoints/default/gone/health", &app.admin).await.json().await.unwrap();
    assert_eq!(health["breaker"], "disabled", "{health}");
    let health: Value = app.get("/v1/endpoints/default/ok/health", &app.admin).await.json().await.unwrap();
    assert_eq!(health["successRate1h"], 1.0, "{health}");

    // A dead delivery can be replayed; it then goes out again.
    let deliveries: Value =
        app.get("/v1/deliveries?state=dead&endpoint=refused", &app.admin).await.json().await.unwrap();
    let dead = deliveries["items"][0]["id"].as_str().unwrap().to_owned();
    let replay = app
        .client
        .post(app.url(&format!("/v1/deliveries/{dead}/replay")))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    let again = app
        .client
        .post(app.url(&format!("/v1/deliveries/{dead}/replay")))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert!(again.status() == 409 || again.status() == 200, "a replayed, unfinished delivery cannot be replayed again");
    eventually(Duration::from_secs(30), "the replay runs out of attempts again", || async {
        let d: Value = app.get(&format!("/v1/deliveries/{dead}"), &app.admin).await.json().await.unwrap();
        d["state"] == "dead" && d["attempts"] == 6
    })
    .await;
}

async fn ordered_lanes_arrive_in_order_despite_failures(db: TestDb) {
    // Fails 30% of requests, deterministically per (path, request number).
    let script: Script = Arc::new(|_, n| {
        let fail = (n.wrapping_mul(2654435761) % 100) < 30;
        (if fail { 500 } else { 200 }, None, Duration::ZERO)
    });
    let receiver = TestReceiver::start(script).await;
    let mut config = config_for(&db);
    config.delivery.per_endpoint_concurrency = 16;
    let app = spawn_app_with(config).await;
    let retry = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: patient}\nspec:\n  maxAttempts: 100\n  backoff: {base: 10ms, max: 50ms, jitter: full}\n";
    app.apply_yaml(&format!(
        "{retry}---\n{}",
        endpoint(
            "ordered",
            &receiver.url("/in"),
            "*",
            "  retryBudgetRef: patient\n  ordering: {key: \"event.data.key\"}\n"
        )
    ))
    .await;
    const EVENTS: usize = 1000;
    let batch: Vec<Value> = (0..EVENTS)
        .map(|n| json!({"source": "s", "type": "t", "data": {"key": format!("k{}", n % 10), "n": n}}))
        .collect();
    for chunk in batch.chunks(100) {
        let response = app.post_json("/v1/events/batch", &app.admin, serde_json::to_string(chunk).unwrap()).await;
        assert_eq!(response.status(), 202);
    }
    eventually(Duration::from_secs(120), "all events delivered", || async {
        receiver.on("/in").iter().filter(|r| r.answered == 200).count() >= EVENTS
    })
    .await;
    let mut lanes: HashMap<String, Vec<u64>> = HashMap::new();
    for r in receiver.on("/in").into_iter().filter(|r| r.answered == 200) {
        let body: Value = serde_json::from_str(&r.body).unwrap();
        lanes
            .entry(body["data"]["key"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(lanes.len(), 10);
    for (key, seen) in lanes {
        let expected: Vec<u64> = (0..EVENTS as u64).filter(|n| format!("k{}", n % 10) == key).collect();
        assert_eq!(seen, expected, "lane {key} out of order or incomplete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_endpoints_no_rule_allows_are_denied_and_never_called() {
    let db = TestDb::sqlite();
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await;
    let app = spawn_app_with(config_for(&db)).await;
    // A rule for other agents (by label) does not allow this one.
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: others}\nspec:\n  selector: {matchLabels: {team: elsewhere}}\n  decision: allow\n";
    app.apply_yaml(&format!("{}---\n{rule}", endpoint("agent", &receiver.url("/agent"), "*", "  agent: true\n"))).await;
    let event =
        post_event(&app, json!({"source": "s", "type": "refund.requested", "data": {"amount_cents": 100}})).await;
    let id = event["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "denied", || async {
        delivery_states(&app, &id).await == [("agent".to_owned(), "denied".to_owned(), 1)]
    })
    .await;
    let event: Value = app.get(&format!("/v1/events/{id}"), &app.admin).await.json().await.unwrap();
    let decision = &event["deliveries"][0]["decision"];
    assert_eq!(decision["outcome"], "deny");
    assert!(decision["reason"].as_str().unwrap().contains("no rule allowed it"), "{decision}");
    assert_eq!(decision["revision"].as_str().unwrap().len(), 64);
    assert!(receiver.on("/agent").is_empty(), "an agent endpoint must not be called without a policy decision");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_answers_503_when_the_delivery_backlog_is_too_long() {
    let db = TestDb::sqlite();
    let mut config = config_for(&db);
    config.delivery.max_backlog = 3;
    let app = spawn_app_with(config).await;
    // A paused endpoint keeps its deliveries queued: the backlog only grows.
    app.apply_yaml(&endpoint("paused", "http://127.0.0.1:9/x", "*", "  paused: true\n")).await;
    for n in 0..5 {
        post_event(&app, json!({"id": format!("p-{n}"), "source": "s", "type": "t", "data": {}})).await;
    }
    let mut n = 5;
    eventually(Duration::from_secs(10), "503 from ingest", || {
        n += 1;
        let body = json!({"id": format!("p-{n}"), "source": "s", "type": "t", "data": {}}).to_string();
        let app = &app;
        async move {
            let response = app.post_json("/v1/events", &app.admin, body).await;
            response.status() == 503 && response.headers().get("retry-after").is_some()
        }
    })
    .await;
}

async fn a_paused_endpoint_keeps_its_deliveries_until_the_pause_is_lifted(db: TestDb) {
    let receiver = TestReceiver::start(Arc::new(|_, _| (200, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let url = receiver.url("/paused");
    app.apply_yaml(&endpoint("later", &url, "*", "  paused: true\n")).await;
    let event = post_event(&app, json!({"source": "shop", "type": "order.created", "data": {}})).await;
    let id = event["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "claimed and put back", || async {
        let states = delivery_states(&app, &id).await;
        states[0].1 == "pending" && states[0].2 == 0 && {
            let d: Value = app.get(&format!("/v1/events/{id}"), &app.admin).await.json().await.unwrap();
            let next = d["deliveries"][0]["next_attempt_at"].as_str().unwrap().to_owned();
            chrono::DateTime::parse_from_rfc3339(&next).unwrap() > chrono::Utc::now() + chrono::Duration::seconds(30)
        }
    })
    .await;
    assert!(receiver.on("/paused").is_empty(), "nothing is sent while paused");
    // Lifting the pause sends what waited at once, not when the paused recheck comes round.
    app.apply_yaml(&endpoint("later", &url, "*", "  paused: false\n")).await;
    eventually(Duration::from_secs(5), "delivered after the pause", || async { !receiver.on("/paused").is_empty() })
        .await;
}

/// A receiver's answer is kept as text (its first bytes), and a NUL character in it,
/// which PostgreSQL's `text` cannot hold, must not fail the attempt's completion (and with
/// it the whole batch of other deliveries' completions written together).
async fn an_answer_holding_a_nul_character_is_recorded(db: TestDb) {
    let app_answer = axum::Router::new().fallback(|| async { (axum::http::StatusCode::OK, &b"ok\0\x1bdone"[..]) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/nul", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app_answer).await.unwrap() });
    let other = TestReceiver::start(Arc::new(|_, _| (200, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(&format!(
        "{}---\n{}",
        endpoint("nul", &url, "*", ""),
        endpoint("plain", &other.url("/plain"), "*", "")
    ))
    .await;
    let event = post_event(&app, json!({"source": "shop", "type": "order.created", "data": {}})).await;
    let id = event["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "both delivered once", || async {
        let mut states = delivery_states(&app, &id).await;
        states.sort();
        states == [("nul".to_owned(), "delivered".to_owned(), 1), ("plain".to_owned(), "delivered".to_owned(), 1)]
    })
    .await;
    let event: Value = app.get(&format!("/v1/events/{id}"), &app.admin).await.json().await.unwrap();
    let nul = event["deliveries"].as_array().unwrap().iter().find(|d| d["endpoint"] == "nul").unwrap();
    assert_eq!(nul["attempts_detail"][0]["response"], "ok\u{fffd}\u{1b}done", "{nul}");
    assert_eq!(other.on("/plain").len(), 1, "sent once");
}

/// JSON integers are CEL `int`s: arithmetic with integer literals works in a Filter.
async fn a_filter_computes_with_the_numbers_of_event_data(db: TestDb) {
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let filter = "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {name: even-above-five}\nspec:\n  expression: \"event.data.total % 2 == 0 && event.data.total - 5 > 0 && event.data.total * 3 / 2 <= 30 && event.data.total + -1 != 7\"\n";
    app.apply_yaml(
        &[filter.to_owned(), endpoint("even", &receiver.url("/even"), "order.*", "  filterRefs: [even-above-five]\n")]
            .join("---\n"),
    )
    .await;
    let mut fanned_out = Vec::new();
    for total in [4, 5, 6, 7, 8, 20, 22, -6] {
        let event =
            post_event(&app, json!({"source": "shop", "type": "order.created", "data": {"total": total}})).await;
        if !event["deliveries"].as_array().unwrap().is_empty() {
            fanned_out.push(total);
        }
    }
    // 4: not above five; 5, 7: odd; 8: 8 - 1 == 7; 22: 22 * 3 / 2 > 30; -6: below five.
    assert_eq!(fanned_out, [6, 20]);
    eventually(Duration::from_secs(10), "two deliveries", || async { receiver.on("/even").len() >= 2 }).await;
    let totals: Vec<i64> = receiver
        .on("/even")
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["data"]["total"].as_i64().unwrap())
        .collect();
    assert_eq!(totals.len(), 2);
    assert!(totals.contains(&6) && totals.contains(&20), "{totals:?}");
}

on_both_databases!(
    events_fan_out_to_the_right_endpoints_signed,
    each_status_class_is_retried_or_not_as_documented,
    ordered_lanes_arrive_in_order_despite_failures,
    a_paused_endpoint_keeps_its_deliveries_until_the_pause_is_lifted,
    a_filter_computes_with_the_numbers_of_event_data,
    an_answer_holding_a_nul_character_is_recorded,
);
