//! Database faults under real `hookwarden serve` processes, on a PostgreSQL cluster of the
//! test's own (`common::pg_cluster`; the shared cluster is never stopped): the database
//! stops for 10 s while two processes take events and one of them leads.
//!
//! What must hold: every ingest answer comes within 3 s (`202`, or `503` with
//! `Retry-After`), `/readyz` answers at once (503 while the database is away), nothing
//! acknowledged is lost, ingest recovers by itself, and there is never more than one
//! leader: terms (the "became leader" and "lost leadership" lines) never overlap, and every
//! leader-only write happened inside its writer's term.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::pg_cluster::PgCluster;
use common::{eventually, token, Process, TestDb};
use hookwarden::auth::Role;
use serde_json::{json, Value};
use sqlx::Connection as _;

const OUTAGE: Duration = Duration::from_secs(10);
/// The longest any ingest answer may take, outage or not.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// `/readyz` answers from a cached state: at once (generous for a loaded machine).
const READY_WITHIN: Duration = Duration::from_secs(1);
/// How soon after the database went away `/readyz` must say so.
const NOTICED_WITHIN: Duration = Duration::from_secs(3);

/// One HTTP answer as a client saw it.
#[derive(Clone, Debug)]
struct Answer {
    process: usize,
    /// The event's client id (ingest) or `readyz`.
    id: String,
    /// `None`: no answer (the client gave up after 10 s, or the connection failed).
    status: Option<u16>,
    retry_after: bool,
    sent: Instant,
    took: Duration,
}

type Answers = Arc<Mutex<Vec<Answer>>>;

fn serve(db: &TestDb, config: &std::path::Path) -> Process {
    let mut command = Process::command(db, &["--config", config.to_str().unwrap()]);
    // Leader-only writes are logged at debug under this target.
    command.env("RUST_LOG", "info,hookwarden::leadership=debug");
    Process::try_start(command).unwrap_or_else(|failed| panic!("{failed}"))
}

async fn send(request: reqwest::RequestBuilder, process: usize, id: String) -> Answer {
    let sent = Instant::now();
    let result = request.send().await;
    let took = sent.elapsed();
    match result {
        Ok(response) => Answer {
            process,
            id,
            status: Some(response.status().as_u16()),
            retry_after: response.headers().contains_key("retry-after"),
            sent,
            took,
        },
        Err(_) => Answer { process, id, status: None, retry_after: false, sent, took },
    }
}

/// Sends events to the processes in turn until `stop`.
async fn ingest(client: reqwest::Client, bases: Vec<String>, lane: usize, stop: Arc<AtomicBool>, answers: Answers) {
    let token = token("producer", &[Role::Ingest], &["*"]);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let process = (lane + n) % bases.len();
        let id = format!("e-{lane}-{n}");
        let body = json!({"id": id, "source": "outage", "type": "order.created", "data": {"n": n}});
        let request = client.post(format!("{}/v1/events", bases[process])).bearer_auth(&token).json(&body);
        let answer = send(request, process, id).await;
        answers.lock().unwrap().push(answer);
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls every process's `/readyz` until `stop`.
async fn poll_ready(client: reqwest::Client, bases: Vec<String>, stop: Arc<AtomicBool>, answers: Answers) {
    while !stop.load(Ordering::Relaxed) {
        for (process, base) in bases.iter().enumerate() {
            let answer = send(client.get(format!("{base}/readyz")), process, "readyz".into()).await;
            answers.lock().unwrap().push(answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies a new Filter every 300 ms through the processes in turn, so that the leader has
/// leader-only work all along (status for the new resource, a checkpoint of the grown
/// audit chain). Failures during the outage are expected and ignored.
async fn apply_now_and_then(client: reqwest::Client, bases: Vec<String>, stop: Arc<AtomicBool>) {
    let admin = token("admin", &[Role::Admin], &["*"]);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let yaml = format!(
            "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {{name: f-{n}}}\nspec:\n  expression: \"true\"\n"
        );
        let _ = client
            .post(format!("{}/v1/apply", bases[n % bases.len()]))
            .bearer_auth(&admin)
            .header("content-type", "application/yaml")
            .body(yaml)
            .send()
            .await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn leader_of(client: &reqwest::Client, base: &str) -> Option<bool> {
    let ready: Value = client.get(format!("{base}/readyz")).send().await.ok()?.json().await.ok()?;
    ready["controller"]["leader"].as_bool()
}

/// A leadership line of one process's log.
#[derive(Debug)]
struct Line {
    at: DateTime<Utc>,
    process: usize,
    epoch: Option<i64>,
    what: Kind,
}

#[derive(Debug, PartialEq)]
enum Kind {
    Became,
    Lost,
    /// A leader-only write, and which job made it.
    Wrote(String),
}

fn leadership_lines(processes: &[&Process]) -> Vec<Line> {
    let mut lines = Vec::new();
    for (process, server) in processes.iter().enumerate() {
        for line in server.logs.lock().unwrap().iter() {
            let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
            let message = entry["message"].as_str().unwrap_or_default();
            let what = if message.starts_with("became leader") {
                Kind::Became
            } else if message == "lost leadership" {
                Kind::Lost
            } else if message == "leader-only write" {
                Kind::Wrote(entry["job"].as_str().unwrap_or("?").to_owned())
            } else {
                continue;
            };
            let at = entry["timestamp"].as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok());
            let at = at.expect("log lines carry an RFC 3339 timestamp").with_timezone(&Utc);
            lines.push(Line { at, process, epoch: entry["epoch"].as_i64(), what });
        }
    }
    lines.sort_by_key(|l| l.at);
    lines
}

/// Checks that terms never overlap and that every leader-only write lies in its writer's
/// term; returns the problems found and the number of terms.
fn check_one_leader_at_a_time(lines: &[Line], failures: &mut Vec<String>) -> usize {
    // process -> (epoch, since) of the term it is in.
    let mut leading: Vec<Option<(Option<i64>, DateTime<Utc>)>> = vec![None; 2];
    let mut terms = 0;
    let mut writes = 0;
    let mut last_epoch: Option<i64> = None;
    for line in lines {
        match &line.what {
            Kind::Became => {
                terms += 1;
                for (other, term) in leading.iter().enumerate() {
                    if let (true, Some((_, since))) = (other != line.process, term) {
                        failures.push(format!(
                            "two leaders: process {} became leader at {} while process {other} led since {since}",
                            line.process, line.at
                        ));
                    }
                }
                match (line.epoch, last_epoch) {
                    (None, _) => failures.push(format!("process {} became leader without an epoch", line.process)),
                    (Some(e), Some(last)) if e <= last => {
                        failures.push(format!("term {e} began after term {last}: epochs must grow"))
                    }
                    _ => {}
                }
                last_epoch = line.epoch.or(last_epoch);
                leading[line.process] = Some((line.epoch, line.at));
            }
            Kind::Lost => leading[line.process] = None,
            Kind::Wrote(job) => {
                writes += 1;
                match leading[line.process] {
                    Some((epoch, _)) if epoch == line.epoch && epoch.is_some() => {}
                    Some((epoch, _)) => failures.push(format!(
                        "process {} wrote ({job}) at {} with epoch {:?} during its term {epoch:?}",
                        line.process, line.at, line.epoch
                    )),
                    None => failures.push(format!(
                        "process {} wrote ({job}) at {} while it did not lead (epoch {:?})",
                        line.process, line.at, line.epoch
                    )),
                }
            }
        }
    }
    if writes == 0 {
        failures.push("no leader-only write was logged (`leader-only write` at debug)".into());
    }
    terms
}

#[tokio::test]
async fn a_postgres_outage_gets_bounded_answers_loses_nothing_acknowledged_and_keeps_one_leader() {
    let Some(cluster) = PgCluster::start() else { return };
    let db = cluster.database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(&config, "controller: {leaderRetry: 200ms}\naudit: {checkpointInterval: 200ms}\n").unwrap();
    let first = serve(&db, &config);
    let second = serve(&db, &config);
    let bases = vec![first.base.clone(), second.base.clone()];
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    eventually(Duration::from_secs(10), "one of the two leads", || async {
        leader_of(&client, &bases[0]).await == Some(true) || leader_of(&client, &bases[1]).await == Some(true)
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let events: Answers = Arc::default();
    let ready: Answers = Arc::default();
    let mut load = tokio::task::JoinSet::new();
    for lane in 0..4 {
        load.spawn(ingest(client.clone(), bases.clone(), lane, stop.clone(), events.clone()));
    }
    load.spawn(poll_ready(client.clone(), bases.clone(), stop.clone(), ready.clone()));
    load.spawn(apply_now_and_then(client.clone(), bases.clone(), stop.clone()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = Instant::now();
    cluster.stop();
    // The fault itself: the database is away this long.
    tokio::time::sleep(OUTAGE).await;
    cluster.start_again();
    let restarted = Instant::now();

    // It recovers by itself: both processes take events again.
    for process in 0..2 {
        eventually(Duration::from_secs(20), "ingest is accepted again after the restart", || {
            let events = events.clone();
            async move {
                let answers = events.lock().unwrap();
                answers.iter().any(|a| a.process == process && a.sent > restarted && a.status == Some(202))
            }
        })
        .await;
    }
    eventually(Duration::from_secs(20), "a leader after the restart", || async {
        leader_of(&client, &bases[0]).await == Some(true) || leader_of(&client, &bases[1]).await == Some(true)
    })
    .await;
    // Let the new leader work a while (and a stale one show itself, if any).
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    let leaders = [leader_of(&client, &bases[0]).await, leader_of(&client, &bases[1]).await];

    let mut failures = Vec::new();
    let events = events.lock().unwrap().clone();
    let ready = ready.lock().unwrap().clone();

    // Every ingest answer within 3 s: 202, or 503 with Retry-After.
    let slow: Vec<&Answer> = events.iter().filter(|a| a.took > ANSWER_WITHIN || a.status.is_none()).collect();
    if !slow.is_empty() {
        let worst = slow.iter().map(|a| a.took).max().unwrap();
        failures.push(format!("{} of {} ingest answers took over 3 s (worst {worst:?})", slow.len(), events.len()));
    }
    for a in &events {
        match a.status {
            Some(202) | None => {}
            Some(503) if a.retry_after => {}
            Some(status) => {
                failures.push(format!("ingest answered {status} (retry-after: {}) to {}", a.retry_after, a.id))
            }
        }
    }
    let during = |a: &&Answer| a.sent > stopped + NOTICED_WITHIN && a.sent + a.took < restarted;
    if !events.iter().filter(during).any(|a| a.status == Some(503)) {
        failures.push("no ingest answer was a 503 while the database was away".into());
    }

    // /readyz at once, 503 while the database is away, ready again after.
    let slow_ready = ready.iter().filter(|a| a.took > READY_WITHIN || a.status.is_none()).count();
    if slow_ready > 0 {
        let worst = ready.iter().map(|a| a.took).max().unwrap();
        failures.push(format!("{slow_ready} of {} /readyz answers took over 1 s (worst {worst:?})", ready.len()));
    }
    for process in 0..2 {
        let ok_during = ready.iter().filter(during).filter(|a| a.process == process && a.status == Some(200)).count();
        if ok_during > 0 {
            failures
                .push(format!("process {process}: /readyz said ready {ok_during} times while the database was away"));
        }
        if !ready.iter().filter(during).any(|a| a.process == process && a.status == Some(503)) {
            failures.push(format!("process {process}: /readyz never answered 503 while the database was away"));
        }
    }

    // Nothing acknowledged is lost.
    let acknowledged: Vec<&str> = events.iter().filter(|a| a.status == Some(202)).map(|a| a.id.as_str()).collect();
    let mut connection = sqlx::PgConnection::connect(&db.url()).await.expect("connect after the restart");
    let stored: Vec<String> = sqlx::query_scalar("SELECT external_id FROM events WHERE source = 'outage'")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    let stored: std::collections::HashSet<String> = stored.into_iter().collect();
    let lost: Vec<&&str> = acknowledged.iter().filter(|id| !stored.contains(**id)).collect();
    if !lost.is_empty() {
        failures.push(format!("{} acknowledged events are not stored: {:?}", lost.len(), &lost[..lost.len().min(5)]));
    }

    // One leader at a time, and a new term (with a bumped epoch) after the restart.
    let lines = leadership_lines(&[&first, &second]);
    let terms = check_one_leader_at_a_time(&lines, &mut failures);
    if terms < 2 {
        failures.push(format!("{terms} terms: the restart should have ended the first and begun another"));
    }
    if leaders.iter().filter(|l| **l == Some(true)).count() != 1 {
        failures.push(format!("at the end, exactly one process must lead: {leaders:?}"));
    }
    match sqlx::query_scalar::<_, i64>("SELECT epoch FROM leadership WHERE id = 1").fetch_one(&mut connection).await {
        Ok(epoch) if epoch == terms as i64 => {}
        Ok(epoch) => failures.push(format!("the stored epoch is {epoch} after {terms} terms")),
        Err(e) => failures.push(format!("cannot read the leadership epoch: {e}")),
    }
    connection.close().await.ok();
    first.kill();
    second.kill();

    let accepted = events.iter().filter(|a| a.status == Some(202)).count();
    let refused = events.iter().filter(|a| a.status == Some(503)).count();
    let slowest = events.iter().map(|a| a.took).max().unwrap_or_default();
    eprintln!(
        "ingest: {} answers, {accepted} accepted, {refused} refused, slowest {slowest:?}; {terms} terms:",
        events.len()
    );
    for line in lines.iter().filter(|l| !matches!(l.what, Kind::Wrote(_))) {
        eprintln!("  {} process {} {:?} epoch {:?}", line.at, line.process, line.what, line.epoch);
    }
    let writes = lines.iter().filter(|l| matches!(l.what, Kind::Wrote(_))).count();
    eprintln!("  {writes} leader-only writes, each inside its writer's term");
    assert!(failures.is_empty(), "{} problems:\n- {}", failures.len(), failures.join("\n- "));
}
