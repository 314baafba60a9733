//! A full disk never loses an acknowledged write (SQLite). The data directory is a small
//! tmpfs of its own, filled by a file beside the database until writes fail with
//! `SQLITE_FULL`, then emptied again. Every `202` must survive a restart, every refusal is a
//! `503` with `Retry-After`, `/readyz` says why while writes fail, and writes resume by
//! themselves once space returns.
//!
//! Mounting needs root (CI runs as root). Elsewhere the tests skip and say so on standard
//! error with [`SKIP_MARKER`], which `.ci/run` fails on. PostgreSQL is not covered here:
//! its server's disk is not the test's to fill, and the failure fixed here (a connection
//! whose transaction state went out of step with SQLite's) is the SQLite store's.

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::{eventually, token, Process, TestDb};
use hookwarden::audit::NewAuditRecord;
use hookwarden::auth::Role;
use hookwarden::ids::{DeliveryId, EventId};
use hookwarden::store::{
    Attempt, ClaimedDelivery, Completion, DeliveryState, IngestRequest, NewDelivery, NewEvent, Store, StoreError,
};
use serde_json::{json, Value};

const SKIP_MARKER: &str = "HOOKWARDEN-DISK-FULL-TESTS-SKIPPED";

/// A tmpfs of `size` mounted on a fresh directory; unmounted when dropped.
struct Tmpfs {
    mountpoint: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after saying so) where this process may not mount.
    fn mount(size: &str) -> Option<Tmpfs> {
        let mountpoint = tempfile::tempdir().expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(mountpoint.path())
            .output()
            .expect("run mount");
        if !mounted.status.success() {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{SKIP_MARKER}: cannot mount a tmpfs ({}); the disk-full tests need root",
                String::from_utf8_lossy(&mounted.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs { mountpoint })
    }

    fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// A data directory on this file system.
    fn test_db(&self) -> TestDb {
        TestDb::Sqlite { dir: tempfile::tempdir_in(self.path()).expect("data directory on the tmpfs") }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that still has a file open there does not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(self.mountpoint.path()).status();
    }
}

/// A file that takes the free space of its file system.
struct Filler {
    path: PathBuf,
}

impl Filler {
    fn new(fs: &Tmpfs) -> Filler {
        Filler { path: fs.path().join("filler") }
    }

    /// Grows the file until the file system is full.
    fn fill_up(&self) {
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path).expect("open filler");
        for chunk in [1 << 20, 1 << 12, 1] {
            let zeros = vec![0u8; chunk];
            while file.write_all(&zeros).is_ok() {}
        }
    }

    /// Fills the file system but for `bytes`.
    fn fill_leaving(&self, bytes: u64) {
        self.fill_up();
        let file = File::options().write(true).open(&self.path).expect("open filler");
        let len = file.metadata().expect("filler size").len();
        file.set_len(len.saturating_sub(bytes)).expect("shrink filler");
    }

    fn remove(&self) {
        std::fs::remove_file(&self.path).expect("remove filler");
    }
}

/// What one ingest request got.
struct Answer {
    external_id: String,
    status: u16,
    /// Hookwarden's id, for a `202`.
    id: Option<String>,
}

/// Posts one event of about 2 KiB; every answer must be a `202` or a `503` with
/// `Retry-After`.
async fn post_event(client: &reqwest::Client, base: &str, token: &str, external_id: String) -> Answer {
    let body = json!({"id": external_id, "source": "disk", "type": "filled", "data": {"pad": "x".repeat(2048)}});
    let response = client.post(format!("{base}/v1/events")).bearer_auth(token).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key("retry-after");
    let text = response.text().await.unwrap();
    let id = match status {
        202 => Some(serde_json::from_str::<Value>(&text).unwrap()["id"].as_str().unwrap().to_owned()),
        503 => {
            assert!(retry_after, "a 503 without Retry-After: {text}");
            None
        }
        other => panic!("ingest answered {other}, not 202 or 503: {text}"),
    };
    Answer { external_id, status, id }
}

async fn readyz(client: &reqwest::Client, base: &str) -> (u16, String) {
    let response = client.get(format!("{base}/readyz")).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn apply_budget(client: &reqwest::Client, base: &str, name: &str) -> reqwest::Response {
    let admin = token("admin", &[Role::Admin], &["*"]);
    let yaml = format!(
        "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: {name}}}\nspec:\n  maxAttempts: 3\n  backoff: {{base: 1s, max: 1m}}\n"
    );
    client
        .post(format!("{base}/v1/apply"))
        .bearer_auth(&admin)
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_no_acknowledged_event_and_ingest_resumes_when_space_returns() {
    let Some(fs) = Tmpfs::mount("16m") else { return };
    let db = fs.test_db();
    let filler = Filler::new(&fs);
    let ingest = token("producer", &[Role::Ingest, Role::Viewer], &["*"]);
    let client = reqwest::Client::new();
    let server = Process::start(&db, &[]);
    filler.fill_leaving(1 << 20);

    // Eight producers until the database has refused 40 requests.
    let refused = Arc::new(AtomicUsize::new(0));
    let mut producers = tokio::task::JoinSet::new();
    for producer in 0..8 {
        let (client, base, token, refused) = (client.clone(), server.base.clone(), ingest.clone(), refused.clone());
        producers.spawn(async move {
            let mut answers = Vec::new();
            for n in 0.. {
                if refused.load(Ordering::SeqCst) >= 40 {
                    break;
                }
                assert!(n < 2000, "the database never refused an event on a full disk");
                let answer = post_event(&client, &base, &token, format!("full-{producer}-{n}")).await;
                if answer.status == 503 {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
                answers.push(answer);
            }
            answers
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = producers.join_next().await {
        answers.extend(done.unwrap());
    }

    // Nothing left at all. A write smaller than a failed one may still fit in the log
    // pages that one took (and a probe that fits makes `/readyz` ready until a write fails
    // again), so keep writing until not even the probe fits.
    filler.fill_up();
    for n in 0.. {
        let answer = post_event(&client, &server.base, &ingest, format!("filled-{n}")).await;
        answers.push(answer);
        let (status, body) = readyz(&client, &server.base).await;
        if status == 503 {
            assert!(body.contains("database or disk is full"), "/readyz does not say why: {body}");
            break;
        }
        assert!(n < 200, "/readyz while writes fail answered {status}: {body}");
    }
    let apply = apply_budget(&client, &server.base, "while-full").await;
    assert_eq!(apply.status(), 503, "an apply on a full disk: {}", apply.text().await.unwrap());

    // Space returns: readiness and writes come back without a restart, readiness first
    // (nothing else writes in between).
    filler.remove();
    eventually(Duration::from_secs(10), "/readyz ready again once space returns", || {
        let (client, base) = (client.clone(), server.base.clone());
        async move { readyz(&client, &base).await.0 == 200 }
    })
    .await;
    for n in 0..40 {
        let answer = post_event(&client, &server.base, &ingest, format!("after-{n}")).await;
        assert_eq!(answer.status, 202, "ingest did not resume once space returned ({})", answer.external_id);
        answers.push(answer);
    }
    let apply = apply_budget(&client, &server.base, "after-space").await;
    assert_eq!(apply.status(), 200, "an apply once space returned: {}", apply.text().await.unwrap());

    // No graceful anything: whatever was acknowledged must already be in the file.
    server.kill();
    let server = Process::start(&db, &[]);
    let acknowledged: Vec<&Answer> = answers.iter().filter(|a| a.status == 202).collect();
    assert!(acknowledged.len() > 40, "some events were acknowledged before the disk filled");
    for answer in &acknowledged {
        let id = answer.id.as_deref().unwrap();
        let response = client.get(format!("{}/v1/events/{id}", server.base)).bearer_auth(&ingest).send().await.unwrap();
        assert_eq!(response.status(), 200, "event {} ({id}) got a 202 but is gone", answer.external_id);
    }
    let admin = token("admin", &[Role::Admin], &["*"]);
    let budget =
        client.get(format!("{}/v1/resources/RetryBudget/default/after-space", server.base)).bearer_auth(&admin);
    assert_eq!(budget.send().await.unwrap().status(), 200, "the apply answered 200 but is gone");
    server.kill();

    let verify = Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .args(["audit", "verify", "--database-url", &db.url()])
        .output()
        .expect("run audit verify");
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{report}{}", String::from_utf8_lossy(&verify.stderr));
    assert!(report.contains("OK: chain `default`: 1 records"), "the apply's audit record: {report}");
}

fn event(external_id: &str, data_bytes: usize, endpoints: &[&str]) -> NewEvent {
    NewEvent {
        id: EventId::generate(),
        namespace: "default".to_owned(),
        source: "disk".to_owned(),
        external_id: external_id.to_owned(),
        event_type: "filled".to_owned(),
        subject: None,
        time: None,
        data: json!({ "pad": "x".repeat(data_bytes) }).to_string(),
        content_type: "application/json".to_owned(),
        attributes: Default::default(),
        ingested_by: "tester".to_owned(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
        received_at: Utc::now() - chrono::Duration::seconds(1),
        deliveries: endpoints
            .iter()
            .map(|e| NewDelivery { id: DeliveryId::generate(), endpoint: e.to_string(), ordering_key: None })
            .collect(),
        dedup_window: None,
    }
}

fn request(events: Vec<NewEvent>) -> IngestRequest {
    IngestRequest { idempotency: None, events }
}

fn delivered(claim: &ClaimedDelivery) -> Completion {
    let now = Utc::now();
    Completion {
        id: claim.id.clone(),
        event_id: claim.event_id.clone(),
        lease_token: claim.lease_token.clone(),
        namespace: claim.namespace.clone(),
        endpoint: claim.endpoint.clone(),
        state: DeliveryState::Delivered,
        next_attempt_at: now,
        attempt: Attempt {
            attempt: claim.attempt,
            started_at: now,
            duration_ms: 5,
            status: Some(200),
            response: Some("ok".into()),
            error: None,
            outcome: "delivered".into(),
        },
        success: Some(true),
        breaker: None,
        disable: None,
        decision: None,
        settle_spend: true,
        ordered: claim.ordered,
        audit_outcome: true,
        operational: false,
        failing_at: None,
        dead_letters: None,
        tells: Vec::new(),
    }
}

fn audit_record(subject: &str) -> NewAuditRecord {
    NewAuditRecord::new("tester", "test.recorded", "default", subject, json!({}))
}

/// Whether `result` failed because the disk is full (and not, say, because the store
/// refused to begin a transaction).
fn failed_on_a_full_disk<T: std::fmt::Debug>(result: Result<T, StoreError>) -> bool {
    match result {
        Err(StoreError::Database(e)) => e.as_database_error().is_some_and(|d| d.message().contains("full")),
        _ => false,
    }
}

/// Completions, audit appends and ingest, each refused while the disk is full and each
/// written once space returns, seen by a store opened afresh on the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_path_of_the_sqlite_store_recovers_from_a_full_disk_and_means_what_it_says() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let db = fs.test_db();
    let filler = Filler::new(&fs);
    let store = db.store().await;
    let first = event("first", 100, &["a", "b"]);
    store.accept_events(&[request(vec![first.clone()])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), Duration::from_secs(60), 10).await.unwrap();
    assert_eq!(claimed.len(), 2);

    filler.fill_up();
    // A large event needs new pages in the log: SQLite fails it and ends the transaction.
    let refused = store.accept_events(&[request(vec![event("large", 512 << 10, &["a"])])]).await;
    assert!(failed_on_a_full_disk(refused), "a large event on a full disk");
    assert!(failed_on_a_full_disk(store.complete_attempts(&[delivered(&claimed[0])]).await), "a completion");
    assert!(failed_on_a_full_disk(store.append_audit(&[audit_record("while-full")]).await), "an audit append");
    match store.check_ready().await {
        Err(e) => assert!(e.to_string().contains("database or disk is full"), "not ready, but not saying why: {e}"),
        other => panic!("ready while writes fail: {other:?}"),
    }

    filler.remove();
    store.check_ready().await.expect("ready once space returns");
    let report = store.complete_attempts(&[delivered(&claimed[0])]).await.expect("a completion once space returns");
    assert_eq!(report.lost, 0);
    let appended = store.append_audit(&[audit_record("after-space")]).await.expect("an audit append");
    let later = event("later", 100, &["a"]);
    store.accept_events(&[request(vec![later.clone()])]).await.expect("ingest once space returns");
    store.close().await;

    // Opened afresh: what was reported written is in the file.
    let reopened = Store::open_sqlite_file(&db_file(&db)).await.unwrap();
    let (delivery, attempts) = reopened.get_delivery(&claimed[0].id).await.unwrap().expect("the completed delivery");
    assert_eq!(delivery.state, DeliveryState::Delivered, "the completion was reported written");
    assert_eq!(attempts.len(), 1, "its attempt");
    let chain = reopened.audit_records("default", 1, i64::MAX, 100).await.unwrap();
    assert!(chain.iter().any(|r| r.seq == appended[0].seq && r.subject == "after-space"), "the audit record");
    assert!(chain.iter().all(|r| r.subject != "while-full"), "a refused audit record was written");
    assert!(reopened.get_event(&later.id).await.unwrap().is_some(), "the event ingested once space returned");
    reopened.close().await;
}

fn db_file(db: &TestDb) -> PathBuf {
    match db {
        TestDb::Sqlite { dir } => dir.path().join("hookwarden.db"),
        TestDb::Postgres { .. } => unreachable!("a SQLite test"),
    }
}
