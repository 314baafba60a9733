//! Endpoint transforms end to end: real receivers on loopback, real databases, the
//! official Standard Webhooks verifier, and `hookwarden transform test` as a process.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::receiver::{TestReceiver, SECRET};
use common::{json_with_status, metric, spawn_app_with, TestApp, TestDb};
use serde_json::{json, Value};

fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config
}

/// An Endpoint document whose `spec.transform` is `transform` (a YAML scalar).
fn endpoint(name: &str, url: &str, transform: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}, labels: {{team: billing}}}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n  eventTypes: [\"approval.*\"]\n  transform: {transform}\n"
    )
}

async fn post_event(app: &TestApp, body: Value) -> String {
    let answer = json_with_status(app.post_json("/v1/events", &app.admin, body.to_string()).await, 202).await;
    answer["id"].as_str().unwrap().to_owned()
}

/// The deliveries of `event` once every one of them is in a final state.
async fn final_deliveries(app: &TestApp, event: &str) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let shown: Value = app.get(&format!("/v1/events/{event}"), &app.admin).await.json().await.unwrap();
        let deliveries = shown["deliveries"].as_array().cloned().unwrap_or_default();
        let done = |d: &Value| ["delivered", "failed", "dead"].contains(&d["state"].as_str().unwrap_or(""));
        if !deliveries.is_empty() && deliveries.iter().all(done) {
            return deliveries;
        }
        assert!(std::time::Instant::now() < deadline, "not every delivery ended: {deliveries:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn the_body_is_what_the_transform_built_and_its_signature_verifies(db: TestDb) {
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let chat = r#"'{"text": "Approval needed: " + event.data.reason + " — " + event.data.link}'"#;
    let incident = r#"'{"summary": event.type + ": " + event.data.reason, "severity": event.data.amount >= 10000 ? "critical" : "warning", "dedup_key": endpoint.name + ":" + event.data.approval_id, "routing": {"team": endpoint.labels.team, "ids": [event.data.approval_id, event.data.big_id]}}'"#;
    app.apply_yaml(
        &[endpoint("chat", &receiver.url("/chat"), chat), endpoint("pager", &receiver.url("/pager"), incident)]
            .join("---\n"),
    )
    .await;
    let event = post_event(
        &app,
        json!({"source": "hookwarden", "type": "approval.requested", "data": {
            "reason": "refund of 120 €", "link": "https://console.example.com/approvals/apr_1",
            "amount": 12000, "approval_id": "apr_1", "big_id": 9_007_199_254_740_993u64}}),
    )
    .await;
    let deliveries = final_deliveries(&app, &event).await;
    assert!(deliveries.iter().all(|d| d["state"] == "delivered"), "{deliveries:#?}");

    let chat = receiver.on("/chat");
    assert_eq!(chat.len(), 1);
    assert_eq!(
        chat[0].body,
        r#"{"text":"Approval needed: refund of 120 € — https://console.example.com/approvals/apr_1"}"#
    );
    let pager = receiver.on("/pager");
    assert_eq!(pager.len(), 1);
    assert_eq!(
        pager[0].body,
        r#"{"dedup_key":"pager:apr_1","routing":{"ids":["apr_1",9007199254740993],"team":"billing"},"severity":"critical","summary":"approval.requested: refund of 120 €"}"#,
        "keys sorted, no whitespace, integers exact"
    );
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    for received in [&chat[0], &pager[0]] {
        assert_eq!(received.headers["content-type"], "application/json");
        assert_eq!(received.headers["webhook-id"], event.as_str());
        verifier.verify(received.body.as_bytes(), &received.headers).unwrap_or_else(|e| panic!("{e}: {received:?}"));
        let mut altered = received.body.clone().into_bytes();
        altered.push(b' ');
        assert!(verifier.verify(&altered, &received.headers).is_err(), "the signature covers those exact bytes");
    }
}

async fn an_erroring_transform_fails_the_delivery_with_its_cel_error_once(db: TestDb) {
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let transform = r#"'{"text": "Approval needed: " + event.data.reason}'"#;
    let name = if db.is_postgres() { "chat-pg" } else { "chat-sqlite" };
    app.apply_yaml(&endpoint(name, &receiver.url("/chat"), transform)).await;
    // No `reason`: the expression fails on this event, and would on every retry.
    let event = post_event(&app, json!({"source": "shop", "type": "approval.requested", "data": {"amount": 1}})).await;
    let deliveries = final_deliveries(&app, &event).await;
    assert_eq!(deliveries.len(), 1);
    let delivery = &deliveries[0];
    assert_eq!(delivery["state"], "failed", "{delivery:#}");
    assert_eq!(delivery["attempts"], 1, "not retried: {delivery:#}");
    let error = delivery["last_error"].as_str().unwrap();
    assert!(error.starts_with("the transform failed: ") && error.contains("reason"), "{error}");
    let attempt = &delivery["attempts_detail"][0];
    assert_eq!(attempt["outcome"], "failed");
    assert_eq!(attempt["error"], error);
    assert_eq!(attempt["status"], Value::Null, "nothing was sent");
    assert!(receiver.seen.lock().unwrap().is_empty(), "nothing was sent");

    let page = json_with_status(app.get("/v1/audit?namespace=default&limit=1000", &app.admin).await, 200).await;
    let subject = format!("delivery/{}", delivery["id"].as_str().unwrap());
    let records: Vec<&Value> = page["items"].as_array().unwrap().iter().filter(|r| r["subject"] == subject).collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["action"], "delivery.failed");
    assert_eq!(records[0]["data"]["error"], error, "the audit record carries the CEL error");
    let failures = metric(&app.base, "hookwarden_delivery_transform_failures_total", &[("endpoint", name)]).await;
    assert_eq!(failures, Some(1.0));

    // The receiver keeps answering; the failed delivery stays failed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shown: Value = app.get(&format!("/v1/events/{event}"), &app.admin).await.json().await.unwrap();
    assert_eq!(shown["deliveries"][0]["attempts"], 1);
    assert!(receiver.seen.lock().unwrap().is_empty());
}

async fn an_expensive_or_ill_typed_transform_is_refused_at_apply(db: TestDb) {
    let app = spawn_app_with(config_for(&db)).await;
    let refused = [
        (
            r#"'event.data.items.map(i, event.data.items.map(j, {"pair": [i, j]}))'"#,
            "runs a comprehension over `event` inside another comprehension",
        ),
        (&format!("'[{}]'", vec!["event.data.a + 1"; 200].join(", ")), "cel.maxNodes"),
        (r#"'"Approval needed: " + event.data.reason'"#, "gives a string; a transform must give a map"),
        (r#"'{"text": event.dat.reason}'"#, "`event` has no field `dat`"),
        (r#"'{"text": now}'"#, "unknown variable `now`"),
    ];
    for (transform, expected) in refused {
        let response = app
            .client
            .post(app.url("/v1/apply"))
            .bearer_auth(&app.admin)
            .header("content-type", "application/yaml")
            .body(endpoint("chat", "http://127.0.0.1:9/chat", transform))
            .send()
            .await
            .unwrap();
        let body = json_with_status(response, 422).await;
        let errors = body["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1, "{body:#}");
        assert_eq!(errors[0]["path"], "spec.transform", "{body:#}");
        let message = errors[0]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{transform}: {message}");
    }
    let stored = json_with_status(app.get("/v1/resources/endpoints?namespace=default", &app.admin).await, 200).await;
    assert_eq!(stored["items"].as_array().map(Vec::len), Some(0), "nothing was applied: {stored:#}");
}

async fn an_agent_endpoint_gets_the_transformed_body_once_the_gate_allows_it(db: TestDb) {
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let agent = endpoint("agent", &receiver.url("/agent"), r#"'{"task": "approve " + event.data.reason}'"#)
        .replace("spec:\n", "spec:\n  agent: true\n");
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: allow}\nspec:\n  endpointRefs: [agent]\n  decision: allow\n";
    app.apply_yaml(&format!("{agent}---\n{rule}")).await;
    let sent = post_event(&app, json!({"source": "s", "type": "approval.requested", "data": {"reason": "x"}})).await;
    let failing = post_event(&app, json!({"source": "s", "type": "approval.requested", "data": {}})).await;
    assert_eq!(final_deliveries(&app, &sent).await[0]["state"], "delivered");
    let failed = final_deliveries(&app, &failing).await;
    assert_eq!(failed[0]["state"], "failed");
    assert!(failed[0]["last_error"].as_str().unwrap().starts_with("the transform failed: "), "{failed:#?}");
    let received = receiver.on("/agent");
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, r#"{"task":"approve x"}"#);
    standardwebhooks::Webhook::new(SECRET).unwrap().verify(received[0].body.as_bytes(), &received[0].headers).unwrap();

    // The failing one was never put to the gate: no decision, no spend, only its outcome.
    let page = json_with_status(app.get("/v1/audit?namespace=default&limit=1000", &app.admin).await, 200).await;
    let actions_on = |delivery: &Value| -> Vec<String> {
        let subject = format!("delivery/{}", delivery["id"].as_str().unwrap());
        let items = page["items"].as_array().unwrap().iter();
        items.filter(|r| r["subject"] == subject.as_str()).map(|r| r["action"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(actions_on(&failed[0]), ["delivery.failed"]);
    let delivered = final_deliveries(&app, &sent).await;
    assert!(actions_on(&delivered[0]).contains(&"policy.decision".to_owned()), "{:?}", actions_on(&delivered[0]));
}

on_both_databases!(
    the_body_is_what_the_transform_built_and_its_signature_verifies,
    an_erroring_transform_fails_the_delivery_with_its_cel_error_once,
    an_expensive_or_ill_typed_transform_is_refused_at_apply,
    an_agent_endpoint_gets_the_transformed_body_once_the_gate_allows_it,
);

/// Runs `hookwarden transform test` with `args`: `(exit code, standard output, standard error)`.
fn transform_test(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .current_dir(dir)
        .args(["transform", "test"])
        .args(args)
        .output()
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn transform_test_prints_the_body_offline_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    // No server runs: the URL is never reached.
    let chat = endpoint(
        "chat",
        "https://chat.example.com/hooks",
        r#"'{"text": "Approval needed: " + event.data.reason, "team": endpoint.labels.team, "at": event.time}'"#,
    );
    write("endpoint.yaml", &chat);
    write(
        "event.json",
        r#"{"source": "hookwarden", "type": "approval.requested", "time": "2026-11-28T10:00:00+01:00", "data": {"reason": "refund of 120 €"}}"#,
    );
    let (code, out, err) = transform_test(dir.path(), &["-f", "endpoint.yaml", "--event", "event.json"]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(
        out,
        "{\"at\":\"2026-11-28T09:00:00+00:00\",\"team\":\"billing\",\"text\":\"Approval needed: refund of 120 €\"}\n"
    );

    // The transform fails on this event, as the delivery would.
    write("no-reason.json", r#"{"source": "hookwarden", "type": "approval.requested", "data": {}}"#);
    let (code, out, err) = transform_test(dir.path(), &["-f", "endpoint.yaml", "--event", "no-reason.json"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.starts_with("the transform failed: ") && err.contains("reason"), "{err}");

    // Apply would refuse the transform: the file, document and field are named.
    write("typo.yaml", &chat.replace("event.data.reason", "event.dat.reason"));
    let (code, _, err) = transform_test(dir.path(), &["-f", "typo.yaml", "--event", "event.json"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("typo.yaml (document 0): spec.transform: reads `event.dat`"), "{err}");

    // Input that cannot be used: exit 2, the problem named.
    write("unknown-field.json", r#"{"source": "s", "typ": "approval.requested", "data": {}}"#);
    write("repeated.json", r#"{"source": "s", "type": "a", "data": {"k": 1, "k": 2}}"#);
    write("two.yaml", &format!("{chat}---\n{}", chat.replace("name: chat", "name: pager")));
    let cases: [(&[&str], &str); 5] = [
        (&["-f", "endpoint.yaml", "--event", "unknown-field.json"], "unknown-field.json: typ: unknown field `typ`"),
        (&["-f", "endpoint.yaml", "--event", "repeated.json"], "repeated.json: data.k: the key appears more than once"),
        (
            &["-f", "two.yaml", "--event", "event.json"],
            "2 Endpoints have a `spec.transform` (`chat`, `pager`): choose one with --endpoint",
        ),
        (
            &["-f", "endpoint.yaml", "--event", "event.json", "--endpoint", "pager"],
            "no Endpoint `pager` in the files (found: `chat`)",
        ),
        (&["-f", "endpoint.yaml", "--event", "missing.json"], "cannot read missing.json"),
    ];
    for (args, expected) in cases {
        let (code, out, err) = transform_test(dir.path(), args);
        assert_eq!((code, out.as_str()), (2, ""), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let (code, out, _) =
        transform_test(dir.path(), &["-f", "two.yaml", "--event", "event.json", "--endpoint", "pager"]);
    assert_eq!(code, 0);
    assert!(out.contains("Approval needed"), "{out}");
}

#[test]
fn the_notification_examples_build_the_bodies_their_readme_shows() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/notifications");
    let readme = std::fs::read_to_string(examples.join("README.md")).unwrap();
    let (code, out, err) = transform_test(&examples, &["-f", "chat.yaml", "--event", "events/deploy-failed.json"]);
    assert_eq!(code, 0, "{err}");
    let chat = r#"{"text":"Deploy failed: checkout v2.14.1 (platform): health check failed after 3 minutes — https://ci.example.com/deploys/8812"}"#;
    assert_eq!(out.trim_end(), chat);
    assert!(readme.contains(&format!("# {chat}\n")), "the README shows the body");

    let (code, out, err) =
        transform_test(&examples, &["-f", "incident.yaml", "--event", "events/monitor-triggered.json"]);
    assert_eq!(code, 0, "{err}");
    let body: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(body["event_action"], "trigger");
    assert_eq!(body["dedup_key"], "checkout-incidents/mon_42");
    assert_eq!(body["payload"]["severity"], "critical");
    assert_eq!(body["payload"]["component"], "checkout");
    assert_eq!(body["payload"]["custom_details"]["value"], 2300);
    let shown = r#"# {"dedup_key":"checkout-incidents/mon_42","event_action":"trigger","payload":{"#;
    assert!(readme.contains(shown) && out.starts_with(&shown[2..]), "{out}");

    let (code, out, err) = transform_test(&examples, &["-f", "ops-chat.yaml", "--event", "events/breaker-opened.json"]);
    assert_eq!(code, 0, "{err}");
    let ops = r#"{"text":"hookwarden.endpoint.breaker_opened: warehouse (owner: fulfilment-team)"}"#;
    assert_eq!(out.trim_end(), ops);
    assert!(readme.contains(&format!("# {ops}\n")), "the README shows the body");
}
