//! The human log of a real `hookwarden serve`: text from requests cannot forge a log line
//! or reach the terminal as an escape sequence.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, token, JWT_SECRET};
use hookwarden::auth::Role;

/// A line as an attacker would forge it, in the human format's own shape.
const FORGED: &str = "2026-12-02T00:00:00.000000Z  INFO hookwarden::auth: token accepted sub=root roles=admin";

#[tokio::test]
async fn an_event_source_cannot_forge_a_line_of_the_human_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "human", "--data-dir"])
        .arg(dir.path())
        .env("HOOKWARDEN_JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hookwarden serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("serve logged that it listens").expect("read log");
        if line.contains("hookwarden is listening") {
            let addr = line.split_whitespace().find_map(|w| w.strip_prefix("addr=")).expect("addr= in the line");
            break addr.to_owned();
        }
    };
    let logs = Arc::new(Mutex::new(Vec::new()));
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            kept.lock().unwrap().push(line);
        }
    });

    let source = format!("shop\n{FORGED}\r\x1b[2K\x1b[31mred");
    let event = serde_json::json!({"source": source, "type": "order.created", "data": {}});
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/events"))
        .bearer_auth(token("ingester", &[Role::Ingest], &["default"]))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let accepted = || logs.lock().unwrap().iter().find(|l| l.contains("event accepted")).cloned();
    eventually(Duration::from_secs(10), "the event accepted line", || async { accepted().is_some() }).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let logs = logs.lock().unwrap();
    assert!(!logs.iter().any(|l| l.starts_with(FORGED) || l.starts_with("\r")), "a forged line: {logs:#?}");
    assert!(!logs.iter().any(|l| l.contains('\x1b') || l.contains('\r')), "an escape reached the log: {logs:#?}");
    let line = logs.iter().find(|l| l.contains("event accepted")).unwrap();
    assert!(line.contains(&format!(r"source=shop\n{FORGED}\r\u{{1b}}[2K\u{{1b}}[31mred ")), "{line}");
}
