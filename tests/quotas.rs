//! Ingest quotas (`spec.quotas.ingest`) against a real server and a real database: `429`
//! with `Retry-After` and the `RateLimit-Policy` / `RateLimit` fields over the burst and
//! over the day, the reset at UTC midnight, batches refused whole, a client that honours
//! `Retry-After`, a request whose client gave up during its commit still charged, and two
//! real processes sharing one PostgreSQL's buckets.
//!
//! Time is the server's injectable clock ([`ManualClock`]) except where a real client
//! waits (one second) or real processes run.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{json_with_status, spawn_app_with, token, Process, TestApp, TestDb};
use hookwarden::auth::Role;
use hookwarden::clock::{Clock, ManualClock};
use serde_json::{json, Value};

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

fn namespace(ingest: &str) -> String {
    format!("apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {{name: payments}}\nspec:\n  quotas:\n    ingest: {ingest}\n")
}

async fn app_at(db: &TestDb, clock: &ManualClock, ingest: &str) -> TestApp {
    let mut config = db.config();
    config.clock = Clock::manual(clock);
    let app = spawn_app_with(config).await;
    app.apply_yaml(&namespace(ingest)).await;
    app
}

fn event(namespace: &str) -> Value {
    json!({"source": "shop", "type": "order.created", "namespace": namespace, "data": {"n": 1}})
}

fn ingester() -> String {
    token("shop", &[Role::Ingest], &["*"])
}

async fn post(app: &TestApp, body: &Value) -> reqwest::Response {
    let path = if body.is_array() { "/v1/events/batch" } else { "/v1/events" };
    app.post_json(path, &ingester(), body.to_string()).await
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// `(RateLimit-Policy, RateLimit, Retry-After)` of a response.
fn fields(response: &reqwest::Response) -> (Option<String>, Option<String>, Option<String>) {
    (header(response, "ratelimit-policy"), header(response, "ratelimit"), header(response, "retry-after"))
}

async fn events_in(app: &TestApp, namespace: &str) -> usize {
    let response = app.get(&format!("/v1/events?namespace={namespace}&limit=100"), &app.admin).await;
    json_with_status(response, 200).await["items"].as_array().unwrap().len()
}

async fn over_the_burst_ingest_is_answered_429_with_retry_after_and_the_rate_limit_fields(db: TestDb) {
    let clock = ManualClock::new(at("2026-12-04T12:00:00Z"));
    let app = app_at(&db, &clock, "{perSecond: 2, burst: 3}").await;
    for remaining in [2u64, 1, 0] {
        let response = post(&app, &event("payments")).await;
        assert_eq!(response.status(), 202);
        let policy = "\"burst\";q=3;w=2".to_owned();
        let left = format!("\"burst\";r={remaining};t={}", (3 - remaining).div_ceil(2));
        assert_eq!(fields(&response), (Some(policy), Some(left), None), "a success carries the fields");
    }
    let refused = post(&app, &event("payments")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(
        fields(&refused),
        (Some("\"burst\";q=3;w=2".into()), Some("\"burst\";r=0;t=2".into()), Some("1".into()))
    );
    let body = json_with_status(refused, 429).await;
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert_eq!(body["error"]["details"], json!({"namespace": "payments", "events": 1, "retryAfter": 1}));

    // A namespace without a quota: no fields, no limit.
    let free = post(&app, &event("default")).await;
    assert_eq!(free.status(), 202);
    assert_eq!(fields(&free), (None, None, None));

    // Half a second refills one token at 2/s.
    clock.advance(Duration::from_millis(500));
    let response = post(&app, &event("payments")).await;
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "ratelimit").as_deref(), Some("\"burst\";r=0;t=2"));
    assert_eq!(events_in(&app, "payments").await, 4, "the refused event was not written");
}

async fn a_batch_over_the_remaining_quota_is_refused_whole_and_writes_nothing(db: TestDb) {
    let clock = ManualClock::new(at("2026-12-04T12:00:00Z"));
    let app = app_at(&db, &clock, "{perSecond: 1, burst: 5}").await;
    let batch = |n: usize| Value::Array((0..n).map(|_| event("payments")).collect());
    assert_eq!(post(&app, &batch(3)).await.status(), 202);
    let refused = post(&app, &batch(3)).await;
    assert_eq!(refused.status(), 429, "3 events, 2 left");
    assert_eq!(header(&refused, "retry-after").as_deref(), Some("1"));
    assert_eq!(header(&refused, "ratelimit").as_deref(), Some("\"burst\";r=2;t=3"));
    assert_eq!(events_in(&app, "payments").await, 3, "nothing of the refused batch was written");
    // A batch of events of two namespaces is refused whole too.
    let mixed = json!([event("default"), event("payments"), event("payments"), event("payments")]);
    assert_eq!(post(&app, &mixed).await.status(), 429);
    assert_eq!(events_in(&app, "default").await, 0);

    let accepted = post(&app, &batch(2)).await;
    assert_eq!(accepted.status(), 202);
    assert_eq!(header(&accepted, "ratelimit").as_deref(), Some("\"burst\";r=0;t=5"));
    // More than the burst can never pass: 429 without Retry-After, with what to do.
    clock.advance(Duration::from_secs(10));
    let too_many = post(&app, &batch(6)).await;
    assert_eq!(header(&too_many, "retry-after"), None);
    let body = json_with_status(too_many, 429).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("at most 5 events at once"), "{body}");
    assert_eq!(events_in(&app, "payments").await, 5);
}

async fn over_per_day_ingest_is_refused_until_the_next_utc_midnight(db: TestDb) {
    let clock = ManualClock::new(at("2026-12-04T23:59:30Z"));
    let app = app_at(&db, &clock, "{perSecond: 100, perDay: 3}").await;
    let policy = "\"burst\";q=100;w=1, \"day\";q=3;w=86400";
    for left in [2, 1, 0] {
        let response = post(&app, &event("payments")).await;
        assert_eq!(response.status(), 202);
        assert_eq!(header(&response, "ratelimit-policy").as_deref(), Some(policy));
        let expected = format!("\"burst\";r={};t=1, \"day\";r={left};t=30", 97 + left);
        assert_eq!(header(&response, "ratelimit"), Some(expected));
    }
    clock.advance(Duration::from_secs(20));
    let refused = post(&app, &event("payments")).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after").as_deref(), Some("10"), "until midnight, whatever the bucket holds");
    assert_eq!(header(&refused, "ratelimit").as_deref(), Some("\"burst\";r=100;t=0, \"day\";r=0;t=10"));
    let body = json_with_status(refused, 429).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("per UTC day"), "{body}");

    clock.set(at("2026-12-05T00:00:00Z"));
    let next_day = post(&app, &event("payments")).await;
    assert_eq!(next_day.status(), 202, "a new UTC day counts from zero");
    assert_eq!(header(&next_day, "ratelimit").as_deref(), Some("\"burst\";r=99;t=1, \"day\";r=2;t=86400"));
}

async fn a_client_honouring_retry_after_gets_through(db: TestDb) {
    // The system clock: the client really waits what the server asked.
    let app = spawn_app_with(db.config()).await;
    app.apply_yaml(&namespace("{perSecond: 1, burst: 1}")).await;
    assert_eq!(post(&app, &event("payments")).await.status(), 202);
    let refused = post(&app, &event("payments")).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = header(&refused, "retry-after").expect("Retry-After").parse().unwrap();
    assert_eq!(wait, 1);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let retried = post(&app, &event("payments")).await;
    assert_eq!(retried.status(), 202, "{}", retried.text().await.unwrap());
}

/// Holds the database's write lock (SQLite) or the events table's (PostgreSQL) from a
/// connection of its own, so that a commit waits until [`Blocker::release`].
enum Blocker {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Blocker {
    async fn hold(db: &TestDb) -> Blocker {
        use sqlx::Connection as _;
        if db.is_postgres() {
            let mut connection = sqlx::PgConnection::connect(&db.url()).await.unwrap();
            sqlx::query("BEGIN").execute(&mut connection).await.unwrap();
            sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE").execute(&mut connection).await.unwrap();
            Blocker::Postgres(connection)
        } else {
            let mut connection = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE").execute(&mut connection).await.unwrap();
            Blocker::Sqlite(connection)
        }
    }

    async fn release(self) {
        match self {
            Blocker::Sqlite(mut c) => sqlx::query("ROLLBACK").execute(&mut c).await.map(drop).unwrap(),
            Blocker::Postgres(mut c) => sqlx::query("ROLLBACK").execute(&mut c).await.map(drop).unwrap(),
        }
    }
}

async fn a_request_whose_client_gave_up_while_it_was_committed_is_still_charged(db: TestDb) {
    let clock = ManualClock::new(at("2026-12-04T12:00:00Z"));
    let app = app_at(&db, &clock, "{perSecond: 1, burst: 3, perDay: 3}").await;
    let batch = Value::Array((0..3).map(|_| event("payments")).collect());
    // The commit waits for the lock; the client gives up meanwhile and closes the connection,
    // so the server drops the request's handler while its job is in the writer's batch.
    let blocker = Blocker::hold(&db).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let gave_up = impatient
        .post(app.url("/v1/events/batch"))
        .bearer_auth(ingester())
        .header("content-type", "application/json")
        .body(batch.to_string())
        .send()
        .await;
    assert!(gave_up.as_ref().is_err_and(|e| e.is_timeout()), "the commit should have been waiting: {gave_up:?}");
    drop(impatient);
    // Time for the server to see the connection closed (well under ingest.commitTimeout).
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.release().await;
    common::eventually(Duration::from_secs(5), "the abandoned batch is written", || async {
        events_in(&app, "payments").await == 3
    })
    .await;

    // Its three events were written, so they count against the burst and the day.
    assert_eq!(post(&app, &event("payments")).await.status(), 429, "the burst was spent by the written batch");
    clock.advance(Duration::from_secs(10));
    let refused = post(&app, &event("payments")).await;
    let body = json_with_status(refused, 429).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("per UTC day"), "{body}");
    assert_eq!(events_in(&app, "payments").await, 3);
}

on_both_databases!(
    over_the_burst_ingest_is_answered_429_with_retry_after_and_the_rate_limit_fields,
    a_batch_over_the_remaining_quota_is_refused_whole_and_writes_nothing,
    over_per_day_ingest_is_refused_until_the_next_utc_midnight,
    a_client_honouring_retry_after_gets_through,
    a_request_whose_client_gave_up_while_it_was_committed_is_still_charged,
);

const PER_SECOND: u64 = 100;
/// What one lease takes: a twentieth of `perSecond` (see `ingest::quota::lease_batch`).
const BATCH: u64 = PER_SECOND / 20;

/// Posts one event into `payments` to the process at `base`.
async fn post_to(client: &reqwest::Client, base: &str) -> reqwest::Response {
    let request = client.post(format!("{base}/v1/events")).bearer_auth(ingester());
    let request = request.header("content-type", "application/json").body(event("payments").to_string());
    request.send().await.unwrap()
}

/// Posts events to `base` from `clients` connections until `until`; returns how many were
/// accepted.
async fn hammer(base: String, clients: usize, until: Instant) -> u64 {
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (base, accepted) = (base.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while Instant::now() < until {
                let response = post_to(&client, &base).await;
                match response.status().as_u16() {
                    202 => _ = accepted.fetch_add(1, Ordering::Relaxed),
                    429 => {}
                    other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    accepted.load(Ordering::Relaxed)
}

/// Posts to `base` until a success carries the `RateLimit` fields: the process enforces
/// the Namespace (a second process learns of it by its periodic catalog refresh).
async fn wait_until_it_enforces(base: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = post_to(&client, base).await;
        if response.headers().contains_key("ratelimit") {
            return;
        }
        assert!(Instant::now() < deadline, "the process never enforced the quota");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_postgresql_admit_within_one_batch_each_of_one_bucket() {
    let Some(db) = TestDb::postgres().await else { return };
    let first = Process::start(&db, &[]);
    let second = Process::start(&db, &[]);
    let yaml = namespace(&format!("{{perSecond: {PER_SECOND}, burst: {PER_SECOND}}}"));
    first.apply_yaml(&yaml).await;
    wait_until_it_enforces(&first.base).await;
    wait_until_it_enforces(&second.base).await;
    // Let the shared bucket fill again (burst / perSecond = 1 s).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let start = Instant::now();
    let until = start + Duration::from_secs(2);
    let (a, b) = tokio::join!(hammer(first.base.clone(), 4, until), hammer(second.base.clone(), 4, until));
    let took = start.elapsed().as_secs_f64();
    let one_bucket = PER_SECOND as f64 * (1.0 + took);
    let admitted = (a + b) as f64;
    eprintln!("admitted {a} + {b} in {took:.2}s; one bucket: {one_bucket:.0}");
    // Over: at most the tokens each process leased and had not spent when the run began.
    assert!(admitted <= one_bucket + 2.0 * BATCH as f64, "{a} + {b} admitted in {took:.2}s: over the bound");
    // Under: what each still holds at the end, and what the clients could not ask for in
    // time on a busy machine (the bound that matters here is the one above).
    assert!(admitted >= 0.75 * one_bucket - 2.0 * BATCH as f64, "{a} + {b} in {took:.2}s: far under one bucket");
    assert!(a > 0 && b > 0, "both processes admitted: {a} and {b}");
    first.kill();
    second.kill();
}
