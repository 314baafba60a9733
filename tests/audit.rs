//! The audit chain end to end: what is recorded, export and offline verification,
//! tampering (in an export and in the database), ordering before dispatch, concurrent
//! writers across processes, and an independent verifier in another language.

#[macro_use]
mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::receiver::{Script, TestReceiver, SECRET};
use common::{spawn_app_with, token, Process, TestApp, TestDb};
use hookwarden::auth::Role;
use serde_json::{json, Value};

fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config.audit.checkpoint_interval = Duration::from_millis(200);
    config
}

fn budget(name: &str) -> String {
    format!("apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: {name}}}\nspec:\n  maxAttempts: 3\n  backoff: {{base: 1s, max: 1m}}\n")
}

async fn apply(client: &reqwest::Client, base: &str, token: &str, yaml: &str) {
    let response = client
        .post(format!("{base}/v1/apply"))
        .bearer_auth(token)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

fn cli(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_hookwarden")).args(args).output().unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
    )
}

/// Waits for a checkpoint covering at least `seq`, then exports the chain.
async fn export(app: &TestApp, seq: i64) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let key = loop {
        let r = app.get("/v1/audit/checkpoint?namespace=default", &app.admin).await;
        if r.status() == 200 {
            let body: Value = r.json().await.unwrap();
            if body["seq"].as_i64().unwrap() >= seq {
                break body["public_key"].as_str().unwrap().to_owned();
            }
        }
        assert!(Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = app.get("/v1/audit/export?namespace=default", &app.admin).await.text().await.unwrap();
    (text, key)
}

async fn changes_are_recorded_and_an_export_verifies_offline(db: TestDb) {
    let app = spawn_app_with(config_for(&db)).await;
    let client = reqwest::Client::new();
    let operator = token("olga", &[Role::Operator], &["default"]);
    apply(&client, &app.base, &operator, &[budget("a"), budget("b")].join("---\n")).await;
    apply(&client, &app.base, &operator, &budget("a").replace("maxAttempts: 3", "maxAttempts: 4")).await;
    let deleted =
        client.delete(app.url("/v1/resources/RetryBudget/default/b")).bearer_auth(&operator).send().await.unwrap();
    assert_eq!(deleted.status(), 200);

    let page: Value = app.get("/v1/audit?namespace=default", &app.admin).await.json().await.unwrap();
    let actions: Vec<(&str, &str, &str)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["actor"].as_str().unwrap(), r["subject"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("resource.created", "olga", "RetryBudget/default/a"),
            ("resource.created", "olga", "RetryBudget/default/b"),
            ("resource.configured", "olga", "RetryBudget/default/a"),
            ("resource.deleted", "olga", "RetryBudget/default/b"),
        ]
    );
    let viewer = token("vic", &[Role::Viewer], &["default"]);
    assert_eq!(app.get("/v1/audit/export?namespace=default", &viewer).await.status(), 403, "auditors only");

    let (text, key) = export(&app, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.ndjson");
    std::fs::write(&file, &text).unwrap();
    let (code, out) =
        tokio::task::block_in_place(|| cli(&["audit", "verify", file.to_str().unwrap(), "--public-key", &key]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: 4 records") && out.contains("checkpoint at seq 4"), "{out}");

    // One changed byte in a record is found and located.
    let tampered = text.replacen("olga", "olgb", 1);
    std::fs::write(&file, &tampered).unwrap();
    let (code, out) =
        tokio::task::block_in_place(|| cli(&["audit", "verify", file.to_str().unwrap(), "--public-key", &key]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: record 1: hash ") && !out.contains("Some("), "{out}");

    // The independent verifier (Python, from docs/AUDIT.md) accepts the real export.
    std::fs::write(&file, &text).unwrap();
    let python = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/audit/verify.py"))
        .arg(&file)
        .output();
    match python {
        Ok(output) => {
            let out = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success() && out.contains("OK: 4 records"),
                "{out}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Err(_) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "python3 not found: the Python verifier was not run");
        }
    }
}

async fn tampering_in_the_database_is_found(db: TestDb) {
    let app = spawn_app_with(config_for(&db)).await;
    let client = reqwest::Client::new();
    for name in ["a", "b", "c", "d", "e"] {
        apply(&client, &app.base, &app.admin, &budget(name)).await;
    }
    let (_, key) = export(&app, 5).await;
    let url = db.url();
    let verify =
        || tokio::task::block_in_place(|| cli(&["audit", "verify", "--database-url", &url, "--public-key", &key]));
    let (code, out) = verify();
    assert_eq!(code, 0, "{out}");

    raw(&url, "UPDATE audit_records SET actor = 'mallory' WHERE chain = 'default' AND seq = 3").await;
    let (code, out) = verify();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: chain `default`: record 3: hash ") && out.contains("altered"), "{out}");
    raw(&url, "UPDATE audit_records SET actor = 'admin' WHERE chain = 'default' AND seq = 3").await;
    assert_eq!(verify().0, 0, "restored");

    raw(&url, "DELETE FROM audit_records WHERE chain = 'default' AND seq = 2").await;
    let (code, out) = verify();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: chain `default`: record 3: seq 3 follows seq 1") && out.contains("missing"), "{out}");
}

/// Runs SQL directly against the database, behind the server's back.
async fn raw(url: &str, sql: &str) {
    use sqlx::Connection as _;
    if url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
}

/// The decision to allow a delivery is committed before the request leaves: the receiver
/// looks for it in the database while the request is in progress.
async fn the_decision_is_on_record_before_the_receiver_sees_the_request(db: TestDb) {
    let app = spawn_app_with(config_for(&db)).await;
    let store = app.store.clone();
    let seen: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let record = seen.clone();
    let receiver = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let (store, record) = (store.clone(), record.clone());
        async move {
            let event = hookwarden::ids::EventId::parse(headers["webhook-id"].to_str().unwrap()).unwrap();
            let deliveries = store.deliveries_of_event(&event).await.unwrap();
            let subject = format!("delivery/{}", deliveries[0].id);
            let records = store.audit_records("default", 1, i64::MAX, 10_000).await.unwrap();
            let on_record = records
                .iter()
                .any(|r| r.action == "policy.decision" && r.subject == subject && r.data["outcome"] == "allow");
            record.lock().unwrap().push((subject, on_record));
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/agent", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });
    let resources = format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: agent}}\nspec:\n  url: {url}\n  agent: true\n  secrets: [{{value: {SECRET}}}]\n---\napiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: allow}}\nspec:\n  endpointRefs: [agent]\n  decision: allow\n"
    );
    apply(&reqwest::Client::new(), &app.base, &app.admin, &resources).await;
    for n in 0..5 {
        let body = json!({"id": format!("o-{n}"), "source": "s", "type": "t", "data": {"n": n}});
        assert_eq!(app.post_json("/v1/events", &app.admin, body.to_string()).await.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "not every request arrived");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for (subject, on_record) in seen.lock().unwrap().iter() {
        assert!(on_record, "{subject}: the receiver got the request before the decision was on record");
    }
    // And the outcome follows the decision in the chain.
    let records = app.store.audit_records("default", 1, i64::MAX, 10_000).await.unwrap();
    hookwarden::audit::verify_chain(&records, None).unwrap();
    let (subject, _) = seen.lock().unwrap()[0].clone();
    let decision = records.iter().position(|r| r.subject == subject && r.action == "policy.decision").unwrap();
    let delivered = records.iter().position(|r| r.subject == subject && r.action == "delivery.delivered");
    assert!(delivered.is_none_or(|d| d > decision));
}

/// The `_cluster` chain's records, once it has a checkpoint; and the checkpoint key.
async fn cluster_chain(app: &TestApp) -> (Vec<Value>, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let key = loop {
        let r = app.get("/v1/audit/checkpoint?namespace=_cluster", &app.admin).await;
        if r.status() == 200 {
            break r.json::<Value>().await.unwrap()["public_key"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no checkpoint of the _cluster chain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let page: Value = app.get("/v1/audit?namespace=_cluster", &app.admin).await.json().await.unwrap();
    (page["items"].as_array().unwrap().clone(), key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_key_is_recorded_once_in_the_cluster_chain() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(config_for(&db)).await;
    let (records, key) = cluster_chain(&app).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "audit.key_published");
    assert_eq!(records[0]["data"]["public_key"], key.as_str());
    let namespaced = token("nadia", &[Role::Auditor], &["default"]);
    assert_eq!(app.get("/v1/audit?namespace=_cluster", &namespaced).await.status(), 403, "cluster-wide auditors only");
    app.stop().await;
    // The same key after a restart is not recorded again.
    let app = spawn_app_with(config_for(&db)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (records, again) = cluster_chain(&app).await;
    assert_eq!((records.len(), again), (1, key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_agent_outcomes_only_plain_deliveries_stay_out_of_the_chain() {
    let db = TestDb::sqlite();
    let mut config = config_for(&db);
    config.audit.delivery_outcomes = hookwarden::config::AuditedOutcomes::Agents;
    let app = spawn_app_with(config).await;
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await;
    let url = receiver.url("");
    let resources = format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: plain}}\nspec:\n  url: {url}/plain\n  secrets: [{{value: {SECRET}}}]\n---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: agent}}\nspec:\n  url: {url}/agent\n  agent: true\n  secrets: [{{value: {SECRET}}}]\n---\napiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: allow}}\nspec:\n  endpointRefs: [agent]\n  decision: allow\n"
    );
    apply(&reqwest::Client::new(), &app.base, &app.admin, &resources).await;
    let body = json!({"source": "s", "type": "t", "data": {}});
    let accepted: Value = app.post_json("/v1/events", &app.admin, body.to_string()).await.json().await.unwrap();
    let event = hookwarden::ids::EventId::parse(accepted["id"].as_str().unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let deliveries = loop {
        let deliveries = app.store.deliveries_of_event(&event).await.unwrap();
        if deliveries.len() == 2 && deliveries.iter().all(|d| d.state == hookwarden::store::DeliveryState::Delivered) {
            break deliveries;
        }
        assert!(Instant::now() < deadline, "not delivered: {deliveries:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let records = app.store.audit_records("default", 1, i64::MAX, 10_000).await.unwrap();
    for d in deliveries {
        let subject = format!("delivery/{}", d.id);
        let actions: Vec<&str> = records.iter().filter(|r| r.subject == subject).map(|r| r.action.as_str()).collect();
        let expected: &[&str] = if d.endpoint == "agent" { &["policy.decision", "delivery.delivered"] } else { &[] };
        assert_eq!(actions, expected, "{}", d.endpoint);
    }
}

on_both_databases!(
    changes_are_recorded_and_an_export_verifies_offline,
    tampering_in_the_database_is_found,
    the_decision_is_on_record_before_the_receiver_sees_the_request,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_writers_in_two_processes_keep_one_gapless_chain() {
    let Some(db) = TestDb::postgres().await else { return };
    let (one, two) = (Process::start(&db, &[]), Process::start(&db, &[]));
    let admin = token("admin", &[Role::Admin], &["*"]);
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..32 {
        let base = if writer % 2 == 0 { one.base.clone() } else { two.base.clone() };
        let admin = admin.clone();
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            for n in 0..5 {
                apply(&client, &base, &admin, &budget(&format!("w{writer}-{n}"))).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    one.kill();
    two.kill();
    let url = db.url();
    let (code, out) = tokio::task::block_in_place(|| cli(&["audit", "verify", "--database-url", &url]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: chain `default`: 160 records"), "{out}");
}
