//! Durability: a 202 means the event is on disk. The server process is SIGKILLed right
//! after the answers arrive, restarted on the same database, and every event is there.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{token, Process, TestDb};
use hookwarden::auth::Role;
use serde_json::{json, Value};

async fn every_acknowledged_event_survives_a_sigkill(db: TestDb) {
    const EVENTS: usize = 300;
    let ingest = token("producer", &[Role::Ingest, Role::Viewer], &["*"]);
    let server = Process::start(&db, &[]);
    let client = reqwest::Client::new();

    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, base, token) = (client.clone(), server.base.clone(), ingest.clone());
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for n in (worker..EVENTS).step_by(16) {
                let body = json!({"id": format!("e-{n}"), "source": "durability", "type": "t", "data": {"n": n}});
                let response =
                    client.post(format!("{base}/v1/events")).bearer_auth(&token).json(&body).send().await.unwrap();
                assert_eq!(response.status().as_u16(), 202);
                let body: Value = response.json().await.unwrap();
                ids.push(body["id"].as_str().unwrap().to_owned());
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(result) = tasks.join_next().await {
        ids.extend(result.unwrap());
    }
    // No graceful anything: the process dies the instant the last 202 has arrived.
    server.kill();
    assert_eq!(ids.len(), EVENTS);

    let server = Process::start(&db, &[]);
    for id in &ids {
        let response = client.get(format!("{}/v1/events/{id}", server.base)).bearer_auth(&ingest).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "event {id} was acknowledged but is gone");
    }
    let page: Value = client
        .get(format!("{}/v1/events?limit=1000", server.base))
        .bearer_auth(&ingest)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), EVENTS);
    server.kill();
}

#[tokio::test]
async fn every_acknowledged_event_survives_a_sigkill_on_sqlite() {
    every_acknowledged_event_survives_a_sigkill(TestDb::sqlite()).await;
}

#[tokio::test]
async fn every_acknowledged_event_survives_a_sigkill_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    every_acknowledged_event_survives_a_sigkill(db).await;
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let db = TestDb::sqlite();
    let mut server = Process::start(&db, &[]);
    let pid = server.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().expect("send SIGTERM");
    assert!(status.success());
    let child = &mut server.child;
    // Generous: a loaded CI machine (two cores, compilers running) is slow to schedule.
    for _ in 0..400 {
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().ok();
    panic!("the server did not stop within 20 s of SIGTERM");
}
