//! The policy gate end to end: spend limits under concurrency, the approval flow over
//! HTTP, and approval expiry across a restart.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receiver::{Script, TestReceiver, SECRET};
use common::{eventually, metric, spawn_app_with, token, Process, TestApp, TestDb};
use hookwarden::auth::Role;
use serde_json::{json, Value};

fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config
}

fn agent(url: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: refund-agent, labels: {{role: agent}}}}\nspec:\n  url: {url}\n  agent: true\n  secrets: [{{value: {SECRET}}}]\n"
    )
}

const CAP: &str = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: cap}\nspec:\n  selector: {matchLabels: {role: agent}}\n  decision: allow\n  spend: {amount: \"int(event.data.amount_cents)\", currency: USD, limit: LIMIT, window: 24h, overLimit: deny}\n";

/// Applies `yaml` through the API of the process at `base`.
async fn apply_at(client: &reqwest::Client, base: &str, admin: &str, yaml: String) {
    let applied = client
        .post(format!("{base}/v1/apply"))
        .bearer_auth(admin)
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 200, "{}", applied.text().await.unwrap());
}

/// `POST path` of `body` to the process at `base`.
async fn post_at(client: &reqwest::Client, base: &str, admin: &str, path: &str, body: &Value) -> reqwest::Response {
    client.post(format!("{base}{path}")).bearer_auth(admin).json(body).send().await.unwrap()
}

/// The JSON answer to `GET path` of the process at `base`.
async fn get_at(client: &reqwest::Client, base: &str, admin: &str, path: &str) -> Value {
    client.get(format!("{base}{path}")).bearer_auth(admin).send().await.unwrap().json().await.unwrap()
}

async fn count(app: &TestApp, state: &str) -> usize {
    let page: Value =
        app.get(&format!("/v1/deliveries?state={state}&limit=1000"), &app.admin).await.json().await.unwrap();
    page["items"].as_array().map(Vec::len).unwrap_or(0)
}

async fn refunds(app: &TestApp, from: usize, count: usize, cents: u64) {
    let events: Vec<Value> =
        (from..from + count).map(|n| json!({"id": format!("r-{n}"), "source": "shop", "type": "refund.requested", "data": {"amount_cents": cents}})).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for event in events {
        let (client, url, token) = (app.client.clone(), app.url("/v1/events"), app.admin.clone());
        tasks.spawn(async move { client.post(url).bearer_auth(token).json(&event).send().await.unwrap().status() });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 202);
    }
}

async fn concurrent_deliveries_never_exceed_the_spend_limit(db: TestDb) {
    // The first five requests fail (400): their reservations must be released.
    let receiver =
        TestReceiver::start(
            Arc::new(|_: &str, n: usize| (if n < 5 { 400u16 } else { 200 }, None, Duration::ZERO)) as Script
        )
        .await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(&format!("{}---\n{}", agent(&receiver.url("/agent")), CAP.replace("LIMIT", "50000"))).await;

    // Released reservations free budget again: five refunds that fail, then the race.
    refunds(&app, 0, 5, 1000).await;
    eventually(Duration::from_secs(20), "five failed", || async { count(&app, "failed").await == 5 }).await;

    // 100 concurrent refunds of 10.00 against a 500.00 cap: at most 50 go out.
    refunds(&app, 100, 100, 1000).await;
    eventually(Duration::from_secs(60), "every refund decided", || async {
        count(&app, "delivered").await + count(&app, "denied").await == 100
    })
    .await;
    assert_eq!(count(&app, "delivered").await, 50, "exactly the cap: 50 × 10.00 = 500.00");
    let sent_ok = receiver.on("/agent").iter().filter(|r| r.answered == 200).count();
    assert_eq!(sent_ok, 50);
    let denied: Value = app.get("/v1/deliveries?state=denied&limit=1", &app.admin).await.json().await.unwrap();
    let reason = denied["items"][0]["decision"]["reason"].as_str().unwrap();
    assert!(reason.contains("over the spend limit"), "{reason}");
    // Spend by agent: at least what this test allowed (tests share the process's metrics).
    let spent = [("agent", "refund-agent"), ("currency", "USD")];
    let allowed = metric(&app.base, "hookwarden_policy_spend_reserved_total", &spent).await.unwrap_or(0.0);
    assert!(allowed >= 55_000.0, "spend allowed: {allowed}");
    let decided = metric(&app.base, "hookwarden_policy_decisions_total", &[("outcome", "deny"), ("rule", "cap")]).await;
    assert!(decided.unwrap_or(0.0) >= 1.0, "denials by the cap: {decided:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_never_exceed_the_spend_limit_on_sqlite() {
    concurrent_deliveries_never_exceed_the_spend_limit(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_never_exceed_the_spend_limit_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    concurrent_deliveries_never_exceed_the_spend_limit(db).await;
}

/// Two processes on one PostgreSQL database gate the same agent's refunds at once: the
/// spend key's lock is the database's, so together they admit exactly the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_never_together_exceed_the_spend_limit() {
    let Some(db) = TestDb::postgres().await else { return };
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await;
    let args = ["--allow-private-urls", "true"];
    let (one, two) = (Process::start(&db, &args), Process::start(&db, &args));
    let admin = token("admin", &[Role::Admin], &["*"]);
    let client = reqwest::Client::new();
    let yaml = format!("{}---\n{}", agent(&receiver.url("/agent")), CAP.replace("LIMIT", "50000"));
    apply_at(&client, &one.base, &admin, yaml).await;
    // Free refunds probe until the second process fans out to the agent too.
    let mut probes = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = json!({"source": "probe", "type": "refund.requested", "data": {"amount_cents": 0}});
        probes += 1;
        let answer: Value = post_at(&client, &two.base, &admin, "/v1/events", &probe).await.json().await.unwrap();
        if answer["deliveries"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "the second process never saw the agent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 100 refunds of 10.00 against a 500.00 cap, half through each process.
    let mut sent = tokio::task::JoinSet::new();
    for n in 0..100 {
        let base = if n % 2 == 0 { one.base.clone() } else { two.base.clone() };
        let (client, admin) = (client.clone(), admin.clone());
        let event = json!({"id": format!("p-{n}"), "source": "shop", "type": "refund.requested", "data": {"amount_cents": 1000}});
        sent.spawn(async move { post_at(&client, &base, &admin, "/v1/events", &event).await.status() });
    }
    while let Some(status) = sent.join_next().await {
        assert_eq!(status.unwrap(), 202);
    }
    let count = |state: &'static str| {
        let (client, base, admin) = (client.clone(), one.base.clone(), admin.clone());
        async move {
            let page = get_at(&client, &base, &admin, &format!("/v1/deliveries?state={state}&limit=1000")).await;
            page["items"].as_array().map(Vec::len).unwrap_or(0)
        }
    };
    eventually(Duration::from_secs(60), "every refund decided", || async {
        count("delivered").await + count("denied").await == 100 + probes
    })
    .await;
    assert_eq!(count("delivered").await, 50 + probes, "exactly the cap: 50 × 10.00 = 500.00, and the free probes");
    let refunds_sent = receiver.on("/agent").iter().filter(|r| r.answered == 200).count();
    assert_eq!(refunds_sent, 50 + probes);
    one.kill();
    two.kill();
}

const HOLD: &str = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: big-refunds}\nspec:\n  endpointRefs: [refund-agent]\n  match: \"int(event.data.amount_cents) > 20000\"\n  decision: hold\n  approval: {role: approver, quorum: 2, expiresAfter: EXPIRY, onExpiry: deny}\n  reason: refunds above 200.00 need two approvers\n---\napiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: refunds}\nspec:\n  endpointRefs: [refund-agent]\n  decision: allow\n";

/// Waits for a pending approval request and returns it.
async fn first_pending(app: &TestApp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page: Value = app.get("/v1/approvals?state=pending", &app.admin).await.json().await.unwrap();
        if page["items"][0].is_object() {
            return page["items"][0].clone();
        }
        assert!(Instant::now() < deadline, "no pending approval");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn vote(app: &TestApp, token: &str, id: &str, verb: &str) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(&format!("/v1/approvals/{id}/{verb}")))
        .bearer_auth(token)
        .json(&json!({"reason": "checked the order"}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_needs_a_quorum_of_distinct_approvers_and_is_delivered_once() {
    let db = TestDb::sqlite();
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(&format!("{}---\n{}", agent(&receiver.url("/agent")), HOLD.replace("EXPIRY", "4h"))).await;
    // The shop submits the refund; it is also an approver, but not of its own request.
    let shop = token("shop", &[Role::Ingest, Role::Approver], &["*"]);
    let body = json!({"source": "shop", "type": "refund.requested", "data": {"amount_cents": 25000}});
    let response = app.client.post(app.url("/v1/events")).bearer_auth(&shop).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 202);

    let pending = first_pending(&app).await;
    let id = pending["id"].as_str().unwrap().to_owned();
    assert_eq!(pending["quorum"], 2);
    assert_eq!(pending["rule"], "big-refunds");
    assert_eq!(pending["action_hash"].as_str().unwrap().len(), 64);
    assert!(receiver.on("/agent").is_empty(), "held, not sent");
    let listed = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
            .args(["approvals", "list"])
            .env("HOOKWARDEN_SERVER", &app.base)
            .env("HOOKWARDEN_TOKEN", &app.admin)
            .output()
            .unwrap()
    });
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success() && out.contains(&id) && out.contains("two approvers"), "{out}");

    let (alice, bob, carol) = (
        token("alice", &[Role::Approver], &["default"]),
        token("bob", &[Role::Approver], &["default"]),
        token("carol", &[Role::Approver], &["default"]),
    );
    let viewer = token("vic", &[Role::Viewer], &["default"]);
    assert_eq!(vote(&app, &shop, &id, "grant").await.0, 403, "no self-approval");
    assert_eq!(vote(&app, &viewer, &id, "grant").await.0, 403, "approvers only");
    let (status, body) = vote(&app, &alice, &id, "grant").await;
    assert_eq!((status, body["state"].as_str()), (200, Some("pending")), "{body}");
    assert_eq!(vote(&app, &alice, &id, "grant").await.0, 409, "one vote per approver");
    let (status, body) = vote(&app, &bob, &id, "grant").await;
    assert_eq!((status, body["state"].as_str()), (200, Some("granted")), "{body}");
    assert_eq!(vote(&app, &carol, &id, "deny").await.0, 409, "the first final decision wins");

    eventually(Duration::from_secs(10), "delivered after the grant", || async { !receiver.on("/agent").is_empty() })
        .await;
    eventually(Duration::from_secs(10), "delivered state", || async { count(&app, "delivered").await == 1 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.on("/agent").len(), 1, "delivered exactly once, without being held again");
    let approval: Value = app.get(&format!("/v1/approvals/{id}"), &app.admin).await.json().await.unwrap();
    assert_eq!(approval["votes"].as_array().unwrap().len(), 2);
    let waited = metric(&app.base, "hookwarden_policy_approval_seconds_count", &[("outcome", "granted")]).await;
    assert!(waited.unwrap_or(0.0) >= 1.0, "approval latency recorded: {waited:?}");

    // A denial by one approver ends another hold at once.
    let body = json!({"source": "shop", "type": "refund.requested", "data": {"amount_cents": 30000}});
    app.client.post(app.url("/v1/events")).bearer_auth(&shop).json(&body).send().await.unwrap();
    let second = first_pending(&app).await["id"].as_str().unwrap().to_owned();
    assert_eq!(vote(&app, &carol, &second, "deny").await.1["state"], "denied");
    eventually(Duration::from_secs(10), "denied delivery", || async { count(&app, "denied").await == 1 }).await;
    assert_eq!(receiver.on("/agent").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_is_denied_after_a_restart() {
    let db = TestDb::sqlite();
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(&config, "allowPrivateUrls: true\ndelivery: {pollInterval: 50ms}\n").unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let admin = token("admin", &[Role::Admin], &["*"]);
    let client = reqwest::Client::new();
    let server = Process::start(&db, &args);
    let yaml = format!("{}---\n{}", agent(&receiver.url("/agent")), HOLD.replace("EXPIRY", "2s"));
    apply_at(&client, &server.base, &admin, yaml).await;
    let body = json!({"source": "shop", "type": "refund.requested", "data": {"amount_cents": 25000}});
    client.post(format!("{}/v1/events", server.base)).bearer_auth(&admin).json(&body).send().await.unwrap();
    let pending = |base: String| {
        let (client, admin) = (client.clone(), admin.clone());
        async move {
            let page = get_at(&client, &base, &admin, "/v1/approvals").await;
            page["items"][0]["state"].as_str().unwrap_or("").to_owned()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(server.base.clone()).await != "pending" {
        assert!(Instant::now() < deadline, "no hold");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let held = [("outcome", "hold"), ("rule", "big-refunds")];
    assert_eq!(metric(&server.base, "hookwarden_policy_decisions_total", &held).await, Some(1.0));
    eventually(Duration::from_secs(5), "the pending gauge", || async {
        metric(&server.base, "hookwarden_policy_approvals_pending", &[]).await == Some(1.0)
    })
    .await;
    server.kill();

    // The deadline passes while no server runs; the restarted one applies it.
    let server = Process::start(&db, &args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(server.base.clone()).await != "expired" {
        assert!(Instant::now() < deadline, "the hold never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired = metric(&server.base, "hookwarden_policy_approvals_total", &[("outcome", "expired")]).await;
    assert_eq!(expired, Some(1.0));
    eventually(Duration::from_secs(5), "no pending approvals", || async {
        metric(&server.base, "hookwarden_policy_approvals_pending", &[]).await == Some(0.0)
    })
    .await;
    let page = get_at(&client, &server.base, &admin, "/v1/deliveries?state=denied").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert!(receiver.on("/agent").is_empty());
    server.kill();
}

fn policy_test(dir: &std::path::Path) -> (i32, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .args(["policy", "test"])
        .arg(dir)
        .output()
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
    )
}

#[test]
fn the_shipped_policies_pass_their_tests() {
    let (code, out) = policy_test(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies")));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 failed"), "{out}");
}

#[test]
fn a_wrong_expectation_fails_the_policy_tests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: allow-all}\nspec:\n  selector: {matchLabels: {role: agent}}\n  decision: allow\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tests.yaml"),
        "cases:\n  - name: wrongly expects a denial\n    endpoint: {name: a, labels: {role: agent}}\n    event: {type: t, source: s, data: {}}\n    expect: {outcome: deny}\n",
    )
    .unwrap();
    let (code, out) = policy_test(dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL") && out.contains("outcome allow, expected deny"), "{out}");

    std::fs::write(
        dir.path().join("tests.yaml"),
        "cases:\n  - name: a spend total that is not a number\n    endpoint: {name: a}\n    event: {type: t, data: {}}\n    spend: {allow-all: lots}\n    expect: {outcome: deny}\n",
    )
    .unwrap();
    let (code, out) = policy_test(dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("tests.yaml: cases[0].spend.allow-all: must be a whole number from -9223372036854775808 to 9223372036854775807, not a text (line 5)"),
        "{out}"
    );
}

#[tokio::test]
async fn an_expensive_rule_is_refused_at_apply_time_with_a_clear_reason() {
    let db = TestDb::sqlite();
    let app = spawn_app_with(config_for(&db)).await;
    let deep = format!("{}true{}", "(".repeat(200), ")".repeat(200));
    let wide = vec!["event.data.a == 1"; 300].join(" || ");
    let nested = "event.data.items.all(a, a.parts.all(b, b.tags.all(c, c != 'x')))".to_owned();
    for (expression, expected) in [(deep, "levels deep"), (wide, "bytes"), (nested, "comprehensions")] {
        let rule = format!(
            "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: costly}}\nspec:\n  selector: {{matchLabels: {{role: agent}}}}\n  match: \"{expression}\"\n  decision: allow\n"
        );
        let response = app
            .client
            .post(app.url("/v1/apply"))
            .bearer_auth(&app.admin)
            .header("content-type", "application/yaml")
            .body(rule)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
        let body: Value = response.json().await.unwrap();
        let error = &body["errors"][0];
        assert_eq!(error["path"], "spec.match");
        assert!(error["message"].as_str().unwrap().contains(expected), "{body}");
    }
}

/// Retried deliveries are allowed (and reserve) again; what the ledger commits is counted
/// apart, exactly once per delivered action. A process of its own: metrics are per process.
#[tokio::test]
async fn committed_spend_is_counted_once_however_often_a_delivery_was_allowed() {
    let db = TestDb::sqlite();
    // Each action's first attempt fails (the five go out before any retry), then succeeds.
    let receiver =
        TestReceiver::start(
            Arc::new(|_: &str, n: usize| (if n < 5 { 503u16 } else { 200 }, None, Duration::ZERO)) as Script
        )
        .await;
    let server = Process::start(&db, &["--allow-private-urls", "true"]);
    let admin = token("admin", &[Role::Admin], &["*"]);
    let client = reqwest::Client::new();
    let budget = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: soon}\nspec:\n  maxAttempts: 5\n  backoff: {base: 500ms, max: 500ms, jitter: none}\n";
    let agent = agent(&receiver.url("/agent")).replace("  agent: true\n", "  agent: true\n  retryBudgetRef: soon\n");
    let yaml = format!("{budget}---\n{agent}---\n{}", CAP.replace("LIMIT", "1000000"));
    apply_at(&client, &server.base, &admin, yaml).await;
    let mut sent = tokio::task::JoinSet::new();
    for n in 0..5 {
        let (client, base, admin) = (client.clone(), server.base.clone(), admin.clone());
        let event = json!({"id": format!("c-{n}"), "source": "shop", "type": "refund.requested", "data": {"amount_cents": 1000}});
        sent.spawn(async move {
            client.post(format!("{base}/v1/events")).bearer_auth(admin).json(&event).send().await.unwrap().status()
        });
    }
    while let Some(status) = sent.join_next().await {
        assert_eq!(status.unwrap(), 202);
    }
    let labels = [("agent", "refund-agent"), ("currency", "USD")];
    eventually(Duration::from_secs(20), "five actions delivered and committed", || async {
        metric(&server.base, "hookwarden_policy_spend_committed_total", &labels).await == Some(5000.0)
    })
    .await;
    let reserved = metric(&server.base, "hookwarden_policy_spend_reserved_total", &labels).await.unwrap_or(0.0);
    assert_eq!(reserved, 10_000.0, "each action was allowed twice: before its failed attempt and its retry");
    assert_eq!(receiver.on("/agent").iter().filter(|r| r.answered == 200).count(), 5);
    server.kill();
}
