//! Nothing accepted is silently lost, and what the system knows, users can see: endpoints
//! that cannot be sent to keep their deliveries, disabled endpoints come back on every
//! path, fan-out failures are reported, applies are seen at once by every process, the
//! half-open probe cannot stick, and status is written as things happen.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::receiver::{verify, Script, TestReceiver, SECRET};
use common::{eventually, metric, spawn_app_with, Process, TestApp, TestDb};
use serde_json::{json, Value};

/// Delivery settings for fast tests; status comes only from signals (the resync is an
/// hour away, so a test that sees status proves it was signalled).
fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config.delivery.lease_margin = Duration::from_secs(2);
    config.controller.resync = Duration::from_secs(3600);
    config
}

fn endpoint(name: &str, url: &str, secret: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec:\n  url: {url}\n  secrets: [{secret}]\n  eventTypes: [\"order.*\"]\n{extra}"
    )
}

/// A secrets file root (`secrets.fileRoot`) and the `default` namespace's directory in it.
fn secret_files() -> (tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("default");
    std::fs::create_dir(&dir).unwrap();
    (root, dir)
}

/// A secret read from the file `name` of the namespace's directory.
fn from_file(name: &str) -> String {
    format!("{{valueFrom: {{file: {name}}}}}")
}

fn inline() -> String {
    format!("{{value: {SECRET}}}")
}

fn ok() -> Script {
    Arc::new(|_, _| (200, None, Duration::ZERO))
}

async fn post_event(base: &str, token: &str, body: Value) -> Value {
    let response =
        reqwest::Client::new().post(format!("{base}/v1/events")).bearer_auth(token).json(&body).send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    body
}

fn order(n: usize) -> Value {
    json!({"id": format!("o-{n}"), "source": "shop", "type": "order.created", "data": {"order_id": n, "total": 10}})
}

async fn endpoint_doc(app: &TestApp, name: &str) -> Value {
    app.get(&format!("/v1/resources/Endpoint/default/{name}"), &app.admin).await.json().await.unwrap()
}

fn condition<'a>(doc: &'a Value, kind: &str) -> Option<&'a Value> {
    doc["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind)
}

/// Waits until the endpoint's `kind` condition has `reason`.
async fn until_condition(app: &TestApp, name: &str, kind: &str, reason: &str) {
    eventually(Duration::from_secs(10), &format!("{name}: {kind} {reason}"), || async {
        condition(&endpoint_doc(app, name).await, kind).is_some_and(|c| c["reason"] == reason)
    })
    .await;
}

async fn deliveries_of(app: &TestApp, endpoint: &str) -> Vec<Value> {
    let page: Value =
        app.get(&format!("/v1/deliveries?endpoint={endpoint}&limit=1000"), &app.admin).await.json().await.unwrap();
    page["items"].as_array().cloned().unwrap_or_default()
}

async fn an_endpoint_whose_secret_file_is_missing_keeps_its_deliveries_until_it_appears(db: TestDb) {
    let receiver = TestReceiver::start(ok()).await;
    let (root, dir) = secret_files();
    let mut config = config_for(&db);
    config.secrets.file_root = Some(root.path().to_owned());
    let app = spawn_app_with(config).await;
    let path = dir.join("warehouse-secret");
    app.apply_yaml(&endpoint("warehouse", &receiver.url("/w"), &from_file("warehouse-secret"), "")).await;

    until_condition(&app, "warehouse", "Ready", "SecretUnavailable").await;
    until_condition(&app, "warehouse", "Delivering", "SecretUnavailable").await;
    let message = condition(&endpoint_doc(&app, "warehouse").await, "Ready").unwrap()["message"].clone();
    assert!(message.as_str().unwrap().contains("`warehouse-secret`"), "the status names the reference: {message}");
    // Unauthenticated, /readyz says which endpoint waits and why, not what it refers to.
    let ready: Value = app.client.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    let blocked = &ready["endpoints"]["blocked"];
    assert_eq!(
        blocked,
        &json!([{"namespace": "default", "name": "warehouse", "reason": "SecretUnavailable"}]),
        "{ready}"
    );

    for n in 0..20 {
        let accepted = post_event(&app.base, &app.admin, order(n)).await;
        assert_eq!(accepted["deliveries"][0]["endpoint"], "warehouse", "fan-out does not depend on secrets");
    }
    // They wait: claimed, given back unattempted.
    eventually(Duration::from_secs(10), "20 waiting, unattempted", || async {
        let all = deliveries_of(&app, "warehouse").await;
        all.len() == 20 && all.iter().all(|d| d["state"] == "pending" && d["attempts"] == 0)
    })
    .await;
    assert!(receiver.seen.lock().unwrap().is_empty());

    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    eventually(Duration::from_secs(15), "all 20 delivered once the file exists", || async {
        receiver.on("/w").len() >= 20
    })
    .await;
    for r in receiver.on("/w") {
        verify(SECRET, &r.headers, &r.body).unwrap();
    }
    eventually(Duration::from_secs(10), "delivered with one attempt each", || async {
        deliveries_of(&app, "warehouse").await.iter().all(|d| d["state"] == "delivered" && d["attempts"] == 1)
    })
    .await;
    until_condition(&app, "warehouse", "Ready", "Valid").await;
    let ready: Value = app.client.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["endpoints"]["blocked"], json!([]));
}

async fn a_missing_variable_is_fixed_by_a_re_apply(db: TestDb) {
    let receiver = TestReceiver::start(ok()).await;
    let app = spawn_app_with(config_for(&db)).await;
    let missing = "{valueFrom: {env: HOOKWARDEN_SECRET_DEFAULT__NEVER_SET}}";
    app.apply_yaml(&endpoint("billing", &receiver.url("/b"), missing, "")).await;
    until_condition(&app, "billing", "Ready", "SecretUnavailable").await;
    let doc = endpoint_doc(&app, "billing").await;
    let message = condition(&doc, "Ready").unwrap()["message"].as_str().unwrap();
    assert!(message.contains("HOOKWARDEN_SECRET_DEFAULT__NEVER_SET") && message.contains("not set"), "{message}");
    for n in 0..3 {
        post_event(&app.base, &app.admin, order(n)).await;
    }
    eventually(Duration::from_secs(10), "three waiting", || async {
        deliveries_of(&app, "billing").await.iter().filter(|d| d["state"] == "pending").count() == 3
    })
    .await;
    app.apply_yaml(&endpoint("billing", &receiver.url("/b"), &inline(), "")).await;
    eventually(Duration::from_secs(10), "sent after the re-apply", || async { receiver.on("/b").len() >= 3 }).await;
    until_condition(&app, "billing", "Delivering", "Active").await;
}

/// A receiver that answers 410 to its first request on `/gone`, then 200.
fn gone_once() -> Script {
    Arc::new(|path, n| (if path == "/gone" && n == 0 { 410 } else { 200 }, None, Duration::ZERO))
}

/// Applies `gone`, lets a 410 disable it, and queues three more deliveries behind it.
async fn disabled_with_three_waiting(app: &TestApp, receiver: &TestReceiver) {
    app.apply_yaml(&endpoint("gone", &receiver.url("/gone"), &inline(), "")).await;
    post_event(&app.base, &app.admin, order(0)).await;
    until_condition(app, "gone", "Delivering", "Disabled").await;
    for n in 1..4 {
        post_event(&app.base, &app.admin, order(n)).await;
    }
    let doc = endpoint_doc(app, "gone").await;
    assert_eq!(doc["status"]["delivery"]["state"], "Disabled", "{doc}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.on("/gone").len(), 1, "nothing more goes out while it is disabled");
}

async fn a_410_disabled_endpoint_comes_back_when_its_spec_changes_through_the_api(db: TestDb) {
    let receiver = TestReceiver::start(gone_once()).await;
    let app = spawn_app_with(config_for(&db)).await;
    disabled_with_three_waiting(&app, &receiver).await;
    let response = app
        .client
        .post(app.url("/v1/apply"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/yaml")
        .body(endpoint("gone", &receiver.url("/gone"), &inline(), "  timeout: 5s\n"))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"][0]["reenabled"], true, "{body}");
    eventually(Duration::from_secs(5), "the waiting deliveries go out", || async { receiver.on("/gone").len() == 4 })
        .await;
    until_condition(&app, "gone", "Delivering", "Active").await;
}

async fn an_operator_enables_a_disabled_endpoint_without_a_spec_change(db: TestDb) {
    let receiver = TestReceiver::start(gone_once()).await;
    let app = spawn_app_with(config_for(&db)).await;
    disabled_with_three_waiting(&app, &receiver).await;
    let viewer = common::token("viewer", &[hookwarden::auth::Role::Viewer], &["*"]);
    let refused = app.client.post(app.url("/v1/endpoints/default/gone/enable")).bearer_auth(&viewer).send().await;
    assert_eq!(refused.unwrap().status(), 403);
    let enabled = app.client.post(app.url("/v1/endpoints/default/gone/enable")).bearer_auth(&app.admin).send().await;
    let body: Value = enabled.unwrap().json().await.unwrap();
    assert_eq!(body["enabled"], true, "{body}");
    assert_eq!(body["was"]["disabledReason"], "the receiver answered 410 Gone");
    eventually(Duration::from_secs(5), "the waiting deliveries go out", || async { receiver.on("/gone").len() == 4 })
        .await;
    until_condition(&app, "gone", "Delivering", "Active").await;
    let again: Value = app
        .client
        .post(app.url("/v1/endpoints/default/gone/enable"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["enabled"], false);
    let chain: Value = app.get("/v1/audit?namespace=default&limit=1000", &app.admin).await.json().await.unwrap();
    let enabled: Vec<&Value> =
        chain["items"].as_array().unwrap().iter().filter(|r| r["action"] == "endpoint.enabled").collect();
    assert_eq!(enabled.len(), 1, "{chain}");
    assert_eq!(enabled[0]["actor"], "admin");
    let missing = app.client.post(app.url("/v1/endpoints/default/nobody/enable")).bearer_auth(&app.admin).send().await;
    assert_eq!(missing.unwrap().status(), 404);
}

async fn a_filter_or_ordering_key_that_fails_at_ingest_is_reported_and_counted(db: TestDb) {
    let receiver = TestReceiver::start(ok()).await;
    let app = spawn_app_with(config_for(&db)).await;
    let filter = "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {name: big}\nspec:\n  expression: \"event.data.total >= 1000\"\n";
    app.apply_yaml(
        &[
            filter.to_owned(),
            endpoint("filtered", &receiver.url("/f"), &inline(), "  filterRefs: [big]\n"),
            endpoint("ordered", &receiver.url("/o"), &inline(), "  ordering: {key: \"event.data.customer.id\"}\n"),
        ]
        .join("---\n"),
    )
    .await;
    let accepted =
        post_event(&app.base, &app.admin, json!({"source": "shop", "type": "order.created", "data": {"note": "x"}}))
            .await;
    let deliveries: Vec<&str> =
        accepted["deliveries"].as_array().unwrap().iter().map(|d| d["endpoint"].as_str().unwrap()).collect();
    assert_eq!(deliveries, ["ordered"], "the failing filter skipped `filtered`: {accepted}");
    let errors = accepted["fanout_errors"].as_array().expect("fan-out errors are reported");
    let filtered = errors.iter().find(|e| e["endpoint"] == "filtered").unwrap();
    assert_eq!(
        (&filtered["stage"], &filtered["skipped"], &filtered["filter"]),
        (&json!("filter"), &json!(true), &json!("big"))
    );
    assert!(filtered["message"].as_str().unwrap().contains("total"), "{filtered}");
    let ordered = errors.iter().find(|e| e["endpoint"] == "ordered").unwrap();
    assert_eq!((&ordered["stage"], &ordered["skipped"]), (&json!("ordering"), &json!(false)));
    for endpoint in ["filtered", "ordered"] {
        let count =
            metric(&app.base, "hookwarden_fanout_errors_total", &[("namespace", "default"), ("endpoint", endpoint)])
                .await;
        assert!(count.unwrap_or(0.0) >= 1.0, "{endpoint}: {count:?}");
    }
    // A passing event has no errors in its answer.
    let fine = post_event(
        &app.base,
        &app.admin,
        json!({"source": "shop", "type": "order.created", "data": {"total": 5000, "customer": {"id": 7}}}),
    )
    .await;
    assert_eq!(fine["deliveries"].as_array().unwrap().len(), 2);
    assert!(fine.get("fanout_errors").is_none(), "{fine}");
}

async fn status_is_written_as_soon_as_things_change(db: TestDb) {
    // The first two attempts fail: the breaker (threshold 2) opens for a second.
    let receiver = TestReceiver::start(Arc::new(|_, n| (if n < 2 { 500 } else { 200 }, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let budget = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: quick}\nspec:\n  maxAttempts: 5\n  backoff: {base: 100ms, max: 200ms, jitter: none}\n  circuitBreaker: {consecutiveFailures: 2, openFor: 1s}\n";
    app.apply_yaml(&format!(
        "{budget}---\n{}",
        endpoint("flaky", &receiver.url("/x"), &inline(), "  retryBudgetRef: quick\n")
    ))
    .await;
    eventually(Duration::from_secs(10), "status right after the apply", || async {
        let doc = endpoint_doc(&app, "flaky").await;
        doc["status"]["observedGeneration"] == 1 && condition(&doc, "Ready").is_some_and(|c| c["status"] == "True")
    })
    .await;
    post_event(&app.base, &app.admin, order(1)).await;
    until_condition(&app, "flaky", "Delivering", "BreakerOpen").await;
    let doc = endpoint_doc(&app, "flaky").await;
    assert_eq!(doc["status"]["delivery"]["breaker"], "Open", "{doc}");
    assert!(doc["status"]["delivery"]["breakerOpenUntil"].is_string());
    // It closes by itself: the reconcile asked to be requeued then.
    until_condition(&app, "flaky", "Delivering", "Active").await;
    eventually(Duration::from_secs(10), "delivered after the breaker closed", || async {
        receiver.on("/x").iter().any(|r| r.answered == 200)
    })
    .await;
}

async fn a_half_open_probe_refused_by_the_policy_gate_does_not_block_the_endpoint(db: TestDb) {
    // The first request fails and opens the breaker (threshold 1); every later one succeeds.
    let receiver = TestReceiver::start(Arc::new(|_, n| (if n == 0 { 500 } else { 200 }, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let budget = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: once}\nspec:\n  maxAttempts: 1\n  backoff: {base: 1s, max: 1s, jitter: none}\n  circuitBreaker: {consecutiveFailures: 1, openFor: 500ms}\n";
    let agent = format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: agent, labels: {{role: agent}}}}\nspec:\n  url: {}\n  agent: true\n  secrets: [{}]\n  retryBudgetRef: once\n",
        receiver.url("/agent"),
        inline()
    );
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: only-ok}\nspec:\n  selector: {matchLabels: {role: agent}}\n  match: \"event.data.ok == true\"\n  decision: allow\n";
    app.apply_yaml(&[budget, &agent, rule].join("---\n")).await;
    let action =
        |id: &str, ok: bool| json!({"id": id, "source": "shop", "type": "refund.requested", "data": {"ok": ok}});
    post_event(&app.base, &app.admin, action("first", true)).await;
    eventually(Duration::from_secs(10), "the first attempt failed", || async { receiver.on("/agent").len() == 1 })
        .await;
    // While the breaker is open, an action the gate denies waits; when it closes, it is the
    // half-open probe, and the gate ends it without a request.
    post_event(&app.base, &app.admin, action("denied", false)).await;
    eventually(Duration::from_secs(10), "the gate denied the probe", || async {
        deliveries_of(&app, "agent").await.iter().any(|d| d["state"] == "denied")
    })
    .await;
    // The probe was released: the next allowed action is sent.
    post_event(&app.base, &app.admin, action("allowed", true)).await;
    eventually(Duration::from_secs(10), "the allowed action is delivered", || async {
        receiver.on("/agent").iter().any(|r| r.answered == 200)
    })
    .await;
}

on_both_databases!(
    an_endpoint_whose_secret_file_is_missing_keeps_its_deliveries_until_it_appears,
    a_missing_variable_is_fixed_by_a_re_apply,
    a_410_disabled_endpoint_comes_back_when_its_spec_changes_through_the_api,
    an_operator_enables_a_disabled_endpoint_without_a_spec_change,
    a_filter_or_ordering_key_that_fails_at_ingest_is_reported_and_counted,
    status_is_written_as_soon_as_things_change,
    a_half_open_probe_refused_by_the_policy_gate_does_not_block_the_endpoint,
);

/// A real process: what waits is counted by reason, and the log says so once, not per event.
#[tokio::test]
async fn a_blocked_endpoint_is_logged_once_and_its_waiting_deliveries_counted() {
    let db = TestDb::sqlite();
    let receiver = TestReceiver::start(ok()).await;
    let (root, dir) = secret_files();
    let mut command = Process::command(&db, &["--allow-private-urls", "true"]);
    command.env("HOOKWARDEN_SECRETS_FILE_ROOT", root.path());
    let server = Process::try_start(command).unwrap_or_else(|failed| panic!("{failed}"));
    let admin = common::token("admin", &[hookwarden::auth::Role::Admin], &["*"]);
    let path = dir.join("secret");
    let filter = "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {name: big}\nspec:\n  expression: \"event.data.total >= 1000\"\n";
    let yaml = [
        filter.to_owned(),
        endpoint("warehouse", &receiver.url("/w"), &from_file("secret"), ""),
        endpoint("filtered", &receiver.url("/f"), &inline(), "  filterRefs: [big]\n"),
    ]
    .join("---\n");
    let applied = reqwest::Client::new()
        .post(format!("{}/v1/apply", server.base))
        .bearer_auth(&admin)
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 200);
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            post_event(&server.base, &admin, json!({"source": "shop", "type": "order.created", "data": {"n": n}}))
                .await,
        );
    }
    eventually(Duration::from_secs(10), "20 deliveries wait for the secret", || async {
        metric(&server.base, "hookwarden_delivery_waiting", &[("reason", "secret_unavailable")]).await == Some(20.0)
    })
    .await;
    let blocked = server.logged("endpoint cannot be sent to; its deliveries wait until it can");
    assert_eq!(blocked.len(), 1, "once, not per event: {blocked:?}");
    assert_eq!((&blocked[0]["endpoint"], &blocked[0]["reason"]), (&json!("warehouse"), &json!("SecretUnavailable")));
    let fan_out = server.logged("fan-out failed for an endpoint");
    assert_eq!(fan_out.len(), 20, "one line per event the filter failed on");
    assert_eq!(fan_out[0]["event_id"], ids[0]["id"]);
    assert!(fan_out[0]["error"].as_str().unwrap().contains("total"), "{:?}", fan_out[0]);

    std::fs::write(&path, SECRET).unwrap();
    eventually(Duration::from_secs(15), "delivered once the secret exists", || async { receiver.on("/w").len() >= 20 })
        .await;
    assert_eq!(server.logged("endpoint can be sent to again; its waiting deliveries go out now").len(), 1);
    eventually(Duration::from_secs(5), "nothing waits for the secret any more", || async {
        metric(&server.base, "hookwarden_delivery_waiting", &[("reason", "secret_unavailable")]).await == Some(0.0)
    })
    .await;
    server.kill();
}

/// Two processes on one PostgreSQL: an apply through one is in force for events sent to
/// the other right after it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_through_one_process_is_seen_at_once_by_another() {
    let Some(db) = TestDb::postgres().await else { return };
    let receiver = TestReceiver::start(ok()).await;
    let a = Process::start(&db, &["--allow-private-urls", "true"]);
    let b = Process::start(&db, &["--allow-private-urls", "true"]);
    let admin = common::token("admin", &[hookwarden::auth::Role::Admin], &["*"]);
    let client = reqwest::Client::new();
    // Both processes have loaded their (empty) catalogs and follow the revision by now.
    let applied = client
        .post(format!("{}/v1/apply", a.base))
        .bearer_auth(&admin)
        .header("content-type", "application/yaml")
        .body(endpoint("new", &receiver.url("/new"), &inline(), ""))
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 200);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..100 {
        let (base, admin) = (b.base.clone(), admin.clone());
        tasks.spawn(async move { post_event(&base, &admin, order(n)).await });
    }
    while let Some(accepted) = tasks.join_next().await {
        let accepted = accepted.unwrap();
        assert_eq!(accepted["deliveries"].as_array().unwrap().len(), 1, "fanned out by the apply: {accepted}");
    }
    eventually(Duration::from_secs(20), "all 100 reach the new endpoint", || async {
        receiver.on("/new").len() >= 100
    })
    .await;
    a.kill();
    b.kill();
}

/// `hookwarden get endpoints` shows readiness, delivery state and breaker in aligned columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_endpoints_shows_ready_state_and_breaker_in_aligned_columns() {
    let db = TestDb::sqlite();
    let receiver = TestReceiver::start(gone_once()).await;
    let app = spawn_app_with(config_for(&db)).await;
    let unset = "{valueFrom: {env: HOOKWARDEN_SECRET_DEFAULT__NEVER_SET}}";
    app.apply_yaml(
        &[
            endpoint("gone", &receiver.url("/gone"), &inline(), ""),
            endpoint("waiting-for-its-secret", &receiver.url("/w"), unset, ""),
        ]
        .join("---\n"),
    )
    .await;
    post_event(&app.base, &app.admin, order(0)).await;
    until_condition(&app, "gone", "Delivering", "Disabled").await;
    until_condition(&app, "waiting-for-its-secret", "Ready", "SecretUnavailable").await;
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
            .args(["get", "endpoints"])
            .env("HOOKWARDEN_SERVER", &app.base)
            .env("HOOKWARDEN_TOKEN", &app.admin)
            .output()
            .unwrap()
    });
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let out = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header = lines[0];
    for column in ["NAMESPACE", "NAME", "GENERATION", "READY", "STATE", "BREAKER"] {
        assert!(header.contains(column), "{out}");
    }
    // Every column starts where its header does.
    let at = |column: &str| header.find(column).unwrap();
    let cell = |line: &str, column: &str| line[at(column)..].split_whitespace().next().unwrap_or("").to_owned();
    let gone = lines.iter().find(|l| l.contains(" gone ")).expect("the gone row");
    assert_eq!(
        (cell(gone, "READY"), cell(gone, "STATE"), cell(gone, "BREAKER")),
        ("True".into(), "Disabled".into(), "Closed".into()),
        "{out}"
    );
    let waiting = lines.iter().find(|l| l.contains("waiting-for-its-secret")).unwrap();
    assert_eq!((cell(waiting, "READY"), cell(waiting, "STATE")), ("False".into(), "SecretUnavailable".into()), "{out}");
}
