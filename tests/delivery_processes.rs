//! The delivery engine across real processes: a SIGKILL in the middle of deliveries, and
//! two processes sharing one PostgreSQL.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receiver::{Script, TestReceiver, SECRET};
use common::{apply_at as apply, Process, TestDb};
use serde_json::{json, Value};

const CONFIG: &str = "allowPrivateUrls: true\ndelivery: {pollInterval: 50ms, leaseMargin: 1s}\n";

fn admin() -> String {
    common::token("admin", &[hookwarden::auth::Role::Admin], &["*"])
}

fn endpoint(url: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: sink}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n  timeout: 1s\n"
    )
}

/// Posts `count` events numbered from `from` in batches; returns their ids.
async fn post_events(base: &str, from: usize, count: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    let numbers: Vec<usize> = (from..from + count).collect();
    for chunk in numbers.chunks(100) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|n| json!({"id": format!("e-{n}"), "source": "s", "type": "t", "data": {"n": n}}))
            .collect();
        let response =
            client.post(format!("{base}/v1/events/batch")).bearer_auth(admin()).json(&batch).send().await.unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        for r in body["results"].as_array().unwrap() {
            assert_eq!(r["deliveries"].as_array().unwrap().len(), 1, "every event fans out to the sink");
            ids.push(r["id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

/// Successful deliveries per webhook-id.
fn delivered(receiver: &TestReceiver) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in receiver.on("/sink").into_iter().filter(|r| r.answered == 200) {
        *counts.entry(r.headers["webhook-id"].to_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    counts
}

async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn every_delivery_arrives_after_a_sigkill_mid_delivery(db: TestDb) {
    const EVENTS: usize = 300;
    // Slow answers keep attempts in flight when the process dies.
    let receiver =
        TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::from_millis(20))) as Script).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let first = Process::start(&db, &args);
    apply(&first.base, &endpoint(&receiver.url("/sink"))).await;
    let ids = post_events(&first.base, 0, EVENTS).await;
    eventually(Duration::from_secs(30), "some deliveries", || receiver.on("/sink").len() >= 50).await;
    first.kill();
    let at_kill = delivered(&receiver).len();
    assert!(at_kill < EVENTS, "the kill came too late to interrupt anything");

    let second = Process::start(&db, &args);
    eventually(Duration::from_secs(60), "every delivery after the restart", || delivered(&receiver).len() == EVENTS)
        .await;
    let counts = delivered(&receiver);
    for id in &ids {
        assert!(counts.contains_key(id), "event {id} never arrived");
    }
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    // Only attempts in flight at the kill may be sent twice: at most one claim's worth.
    assert!(duplicates <= 100, "{duplicates} duplicates");
    second.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delivery_arrives_after_a_sigkill_mid_delivery_on_sqlite() {
    every_delivery_arrives_after_a_sigkill_mid_delivery(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delivery_arrives_after_a_sigkill_mid_delivery_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    every_delivery_arrives_after_a_sigkill_mid_delivery(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_deliver_everything_exactly_once() {
    let Some(db) = TestDb::postgres().await else { return };
    const EVENTS: usize = 5000;
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let (one, two) = (Process::start(&db, &args), Process::start(&db, &args));
    apply(&one.base, &endpoint(&receiver.url("/sink"))).await;
    common::wait_until_it_fans_out(&two.base, "t").await;
    let base = receiver.on("/sink").len();
    let (a, b) = tokio::join!(post_events(&one.base, 0, EVENTS / 2), post_events(&two.base, EVENTS / 2, EVENTS / 2));
    let ids: Vec<String> = a.into_iter().chain(b).collect();
    eventually(Duration::from_secs(120), "all deliveries", || receiver.on("/sink").len() >= base + EVENTS).await;
    // Give a moment for any duplicate to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = delivered(&receiver);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "event {id} delivered {:?} times", counts.get(id));
    }
    one.kill();
    two.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_or_releases_attempts_in_flight() {
    let db = TestDb::sqlite();
    // The first three requests hang far longer than the shutdown grace.
    let receiver = TestReceiver::start(Arc::new(|_: &str, n: usize| {
        (200u16, None, if n < 3 { Duration::from_secs(4) } else { Duration::ZERO })
    }) as Script)
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(
        &config,
        "allowPrivateUrls: true\ndelivery: {pollInterval: 50ms, leaseMargin: 30s, shutdownGrace: 300ms}\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut server = Process::start(&db, &args);
    apply(&server.base, &endpoint(&receiver.url("/sink")).replace("timeout: 1s", "timeout: 10s")).await;
    post_events(&server.base, 0, 3).await;
    eventually(Duration::from_secs(10), "three attempts in flight", || receiver.on("/sink").len() == 3).await;

    let stopped = Instant::now();
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let child = &mut server.child;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        // The grace is 300 ms; the bound leaves room for a loaded machine, not for a 40 s lease.
        assert!(stopped.elapsed() < Duration::from_secs(10), "shutdown did not respect its grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}");

    // Released, not left leased for 40 s: a new process delivers them at once.
    let again = Process::start(&db, &args);
    // The hung requests were recorded when they arrived; the three after them are the resends.
    eventually(Duration::from_secs(10), "released deliveries sent again", || receiver.on("/sink").len() >= 6).await;
    let resent: std::collections::HashSet<String> =
        receiver.on("/sink")[3..].iter().map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned()).collect();
    assert_eq!(resent.len(), 3);
    again.kill();
}

/// The sink with the RetryBudget whose spec lines are `budget`.
fn endpoint_with_budget(url: &str, budget: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: shared}}\nspec:\n{budget}---\n{}  retryBudgetRef: shared\n",
        endpoint(url)
    )
}

/// Two processes on one database with the endpoint `yaml` applied, both sending to it.
async fn two_processes_with(db: &TestDb, yaml: &str) -> (Process, Process, tempfile::TempDir, usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(
        &config,
        "allowPrivateUrls: true\ndelivery: {pollInterval: 50ms, leaseMargin: 1s, perEndpointConcurrency: 4}\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let (one, two) = (Process::start(db, &args), Process::start(db, &args));
    apply(&one.base, yaml).await;
    let probes = common::wait_until_it_fans_out(&two.base, "t").await["deliveries"].as_array().unwrap().len();
    (one, two, dir, probes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_hourly_retry_budget() {
    let Some(db) = TestDb::postgres().await else { return };
    const EVENTS: usize = 40;
    const BUDGET: usize = 5;
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (500u16, None, Duration::ZERO)) as Script).await;
    let budget =
        format!("  maxAttempts: 50\n  backoff: {{base: 20ms, max: 50ms, jitter: none}}\n  retriesPerHour: {BUDGET}\n");
    let (one, two, _dir, probes) =
        two_processes_with(&db, &endpoint_with_budget(&receiver.url("/sink"), &budget)).await;
    let (a, b) = tokio::join!(post_events(&one.base, 0, EVENTS / 2), post_events(&two.base, EVENTS / 2, EVENTS / 2));
    let deliveries = a.len() + b.len() + probes;
    let store = db.store().await;
    let dead = hookwarden::store::DeliveryQuery {
        namespace: "default".into(),
        state: Some(hookwarden::store::DeliveryState::Dead),
        limit: 1000,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.list_deliveries(&dead).await.unwrap().len() < deliveries {
        assert!(Instant::now() < deadline, "the deliveries did not all end dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every delivery's first attempt, and the budget's retries: across both processes.
    assert_eq!(receiver.on("/sink").len(), deliveries + BUDGET, "retries beyond {BUDGET} per hour in all");
    one.kill();
    two.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_send_one_half_open_probe_at_a_time() {
    let Some(db) = TestDb::postgres().await else { return };
    const ANSWER: Duration = Duration::from_millis(300);
    let receiver = TestReceiver::start(Arc::new(|_: &str, _: usize| (500u16, None, ANSWER)) as Script).await;
    let budget = "  maxAttempts: 100\n  backoff: {base: 20ms, max: 50ms, jitter: none}\n  circuitBreaker: {consecutiveFailures: 3, openFor: 1s}\n";
    let (one, two, _dir, _) = two_processes_with(&db, &endpoint_with_budget(&receiver.url("/sink"), budget)).await;
    tokio::join!(post_events(&one.base, 0, 20), post_events(&two.base, 20, 20));
    let store = db.store().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.endpoint_state("default", "sink").await.unwrap().breaker_open_until.is_none() {
        assert!(Instant::now() < deadline, "the breaker never opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // What was sent before the breaker opened has been answered by then.
    let half_open_from = Instant::now() + ANSWER + Duration::from_millis(100);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let probes: Vec<Instant> = receiver.on("/sink").iter().map(|r| r.at).filter(|at| *at >= half_open_from).collect();
    assert!(probes.len() >= 2, "the half-open endpoint was probed {} times", probes.len());
    for pair in probes.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= ANSWER, "a probe went out {gap:?} after another, which was still in flight");
    }
    one.kill();
    two.kill();
}
