//! The examples work as documented: the example agent verifies signatures and acts once
//! per `webhook-id`, however often a delivery arrives.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::receiver::SECRET;
use common::{eventually, spawn_app_with, TestDb};
use serde_json::{json, Value};

/// The example agent as a child process, and the lines it printed.
struct Agent {
    child: std::process::Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(dir: &std::path::Path) -> Agent {
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/agent/agent.py"))
            .args(["--port", "0", "--db"])
            .arg(dir.join("agent.db"))
            .env("AGENT_SECRET", SECRET)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the example agent");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = stdout.next().expect("the agent says where it listens").unwrap();
        let port = first.rsplit(':').next().unwrap().parse().expect("a port");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in stdout.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Agent { child, port, lines }
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| l.starts_with(prefix)).count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_agent_acts_once_per_webhook_id_when_a_delivery_comes_again() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let db = TestDb::sqlite();
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    let app = spawn_app_with(config).await;
    let endpoint = format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: refund-agent, labels: {{role: agent}}}}\nspec:\n  url: http://127.0.0.1:{}/hooks\n  agent: true\n  secrets: [{{value: {SECRET}}}]\n",
        agent.port
    );
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: refunds}\nspec:\n  selector: {matchLabels: {role: agent}}\n  decision: allow\n";
    app.apply_yaml(&format!("{endpoint}---\n{rule}")).await;
    let event = json!({"id": "r-1", "source": "shop", "type": "refund.requested", "data": {"amount_cents": 500}});
    let accepted: Value = app.post_json("/v1/events", &app.admin, event.to_string()).await.json().await.unwrap();
    let delivery = accepted["deliveries"][0]["id"].as_str().unwrap().to_owned();
    let delivered = |n: usize| {
        let app = &app;
        let delivery = delivery.clone();
        async move {
            let d: Value = app.get(&format!("/v1/deliveries/{delivery}"), &app.admin).await.json().await.unwrap();
            d["state"] == "delivered" && d["attempts"].as_u64() == Some(n as u64)
        }
    };
    eventually(Duration::from_secs(10), "delivered", || delivered(1)).await;
    assert_eq!(agent.count("performed "), 1);
    // The same action again (as after a lost answer or a crash): same webhook-id.
    let replayed = app.post_json(&format!("/v1/deliveries/{delivery}/replay"), &app.admin, "").await;
    assert_eq!(replayed.status(), 200);
    eventually(Duration::from_secs(10), "delivered again", || delivered(2)).await;
    eventually(Duration::from_secs(5), "the agent saw the repeat", || async { agent.count("duplicate ") == 1 }).await;
    assert_eq!(agent.count("performed "), 1, "acted once: {:?}", agent.lines.lock().unwrap());
}

#[tokio::test]
async fn the_example_agent_refuses_a_request_whose_signature_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/hooks", agent.port))
        .header("webhook-id", "evt_forged")
        .header("webhook-timestamp", chrono::Utc::now().timestamp().to_string())
        .header("webhook-signature", "v1,bm90IGEgc2lnbmF0dXJl")
        .body(r#"{"type":"refund.requested","data":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(agent.count("performed "), 0);
}
