//! Claims under pressure, end to end with real receivers on both databases: a slow
//! endpoint's backlog is not claimed beyond its free slots while its healthy neighbour
//! keeps flowing, and a backlog drains oldest first.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::receiver::{Script, TestReceiver, SECRET};
use common::{eventually, spawn_app_with, TestApp, TestDb};
use hookwarden::store::{DeliveryQuery, DeliveryRecord, DeliveryState};
use serde_json::{json, Value};

/// Two slots per endpoint and small claims, so that a claim could take more of an
/// endpoint's deliveries than it can send.
fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config.delivery.lease_margin = Duration::from_secs(2);
    config.delivery.per_endpoint_concurrency = 2;
    config.delivery.batch_size = 10;
    config
}

fn endpoint(name: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n{extra}"
    )
}

/// Posts events numbered `from..from + count`, `per_batch` to a request.
async fn post_events(app: &TestApp, from: usize, count: usize, per_batch: usize) {
    let numbers: Vec<usize> = (from..from + count).collect();
    for chunk in numbers.chunks(per_batch) {
        let batch: Vec<Value> = chunk.iter().map(|n| json!({"source": "s", "type": "t", "data": {"n": n}})).collect();
        let response = app.post_json("/v1/events/batch", &app.admin, serde_json::to_string(&batch).unwrap()).await;
        assert_eq!(response.status(), 202);
    }
}

async fn deliveries_of(app: &TestApp, endpoint: &str) -> Vec<DeliveryRecord> {
    let query = DeliveryQuery {
        namespace: "default".into(),
        endpoint: Some(endpoint.into()),
        limit: 1000,
        ..Default::default()
    };
    app.store.list_deliveries(&query).await.unwrap()
}

/// The `data.n` of each request the receiver got on `path`, in arrival order.
fn numbers_on(receiver: &TestReceiver, path: &str) -> Vec<usize> {
    receiver
        .on(path)
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.body).unwrap()["data"]["n"].as_u64().unwrap() as usize)
        .collect()
}

async fn a_slow_endpoint_is_claimed_only_up_to_its_free_slots(db: TestDb) {
    const EVENTS: usize = 40;
    // The slow endpoint's receiver holds every request far longer than the test runs.
    let script: Script = Arc::new(|path, _| match path {
        "/slow" => (200, None, Duration::from_secs(60)),
        _ => (200, None, Duration::ZERO),
    });
    let receiver = TestReceiver::start(script).await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(&format!(
        "{}---\n{}",
        endpoint("slow", &receiver.url("/slow"), "  timeout: 90s\n"),
        endpoint("healthy", &receiver.url("/healthy"), "")
    ))
    .await;
    post_events(&app, 0, EVENTS, 20).await;
    eventually(Duration::from_secs(30), "every healthy delivery", || async {
        deliveries_of(&app, "healthy").await.iter().filter(|d| d.state == DeliveryState::Delivered).count() == EVENTS
    })
    .await;
    // Let claims run a while longer beside the held requests.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.on("/slow").len(), 2, "the slow endpoint has two slots");
    let slow = deliveries_of(&app, "slow").await;
    let in_flight = slow.iter().filter(|d| d.state == DeliveryState::Delivering).count();
    assert_eq!(in_flight, 2, "claimed: only what its slots could send");
    let waiting: Vec<&DeliveryRecord> = slow.iter().filter(|d| d.state == DeliveryState::Pending).collect();
    assert_eq!(waiting.len(), EVENTS - 2);
    for d in waiting {
        // Never claimed and given back: untouched since fan-out.
        assert_eq!((d.attempts, d.updated_at), (0, d.created_at), "delivery {} was claimed and given back", d.id);
    }
}

/// An agent endpoint's requests take its slots only to send: a stuck receiver holds its
/// two; a few more deliveries may have been decided meanwhile (at most
/// `DECIDING_PER_SLOT` per slot), which wait for a slot until they could no longer end
/// within their lease and are then given back; while every request slot is taken, nothing
/// more is claimed or decided. Its healthy agent neighbour is decided and delivered
/// throughout.
async fn a_stuck_agent_endpoint_decides_no_more_than_it_can_send(db: TestDb) {
    const EVENTS: usize = 20;
    let script: Script = Arc::new(|path, _| match path {
        "/stuck" => (200, None, Duration::from_secs(60)),
        _ => (200, None, Duration::ZERO),
    });
    let receiver = TestReceiver::start(script).await;
    let app = spawn_app_with(config_for(&db)).await;
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: allow}\nspec:\n  endpointRefs: [stuck, healthy]\n  decision: allow\n";
    app.apply_yaml(&format!(
        "{}---\n{}---\n{rule}",
        endpoint("stuck", &receiver.url("/stuck"), "  agent: true\n  timeout: 90s\n"),
        endpoint("healthy", &receiver.url("/healthy"), "  agent: true\n")
    ))
    .await;
    post_events(&app, 0, EVENTS, 10).await;
    eventually(Duration::from_secs(30), "every healthy delivery", || async {
        deliveries_of(&app, "healthy").await.iter().filter(|d| d.state == DeliveryState::Delivered).count() == EVENTS
    })
    .await;
    // The lease is the longest timeout (90 s) plus the 2 s margin: a decided delivery waits
    // at most a second for a request slot.
    let decided_and_waiting = || async {
        let stuck = deliveries_of(&app, "stuck").await;
        let decided = stuck.iter().filter(|d| d.decision.is_some()).count();
        let sending = stuck.iter().filter(|d| d.state == DeliveryState::Delivering).count();
        (decided, sending)
    };
    eventually(Duration::from_secs(10), "the waiting decided deliveries given back", || async {
        decided_and_waiting().await.1 == 2
    })
    .await;
    let (decided, _) = decided_and_waiting().await;
    let most = 2 * hookwarden::delivery::admission::DECIDING_PER_SLOT;
    assert!((2..=most).contains(&decided), "{decided} decided: at most {most} for two request slots");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(decided_and_waiting().await, (decided, 2), "nothing more decided while both slots are taken");
    assert_eq!(receiver.on("/stuck").len(), 2, "the stuck endpoint has two slots");
    let untouched =
        deliveries_of(&app, "stuck").await.iter().filter(|d| d.decision.is_none() && d.attempts == 0).count();
    assert_eq!(untouched, EVENTS - decided, "the rest never claimed");
}

/// A backlog is drained oldest first while new events keep arriving: nothing claimed and
/// given back goes behind newer deliveries.
async fn a_backlog_drains_oldest_first(db: TestDb) {
    const BACKLOG: usize = 40;
    const MORE: usize = 40;
    let receiver = TestReceiver::start(Arc::new(|_, _| (200, None, Duration::from_millis(20)))).await;
    let app = spawn_app_with(config_for(&db)).await;
    let url = receiver.url("/drain");
    app.apply_yaml(&endpoint("backlog", &url, "  paused: true\n")).await;
    post_events(&app, 0, BACKLOG, 20).await;
    eventually(Duration::from_secs(10), "the backlog parked while paused", || async {
        let waiting = deliveries_of(&app, "backlog").await;
        let parked = chrono::Utc::now() + chrono::Duration::seconds(30);
        waiting.len() == BACKLOG
            && waiting.iter().all(|d| d.state == DeliveryState::Pending && d.next_attempt_at > parked)
    })
    .await;
    // Lifting the pause makes all of it due at once; more events arrive while it drains.
    app.apply_yaml(&endpoint("backlog", &url, "  paused: false\n")).await;
    post_events(&app, BACKLOG, MORE, 2).await;
    eventually(Duration::from_secs(30), "everything delivered", || async {
        receiver.on("/drain").len() >= BACKLOG + MORE
    })
    .await;
    let arrived = numbers_on(&receiver, "/drain");
    // Two at a time: a delivery may overtake the one beside it, nothing older waits longer.
    for (i, n) in arrived.iter().enumerate() {
        assert!(n.abs_diff(i) <= 2, "event {n} arrived {i}th: {arrived:?}");
    }
}

on_both_databases!(
    a_slow_endpoint_is_claimed_only_up_to_its_free_slots,
    a_stuck_agent_endpoint_decides_no_more_than_it_can_send,
    a_backlog_drains_oldest_first
);
