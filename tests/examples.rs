//! The examples work as documented: the example agent verifies signatures and acts once
//! per `webhook-id`, however often a delivery arrives; the example approver prints an
//! approval request with the command that grants it, and that command does.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::receiver::{Script, TestReceiver, SECRET};
use common::{eventually, spawn_app_with, TestDb};
use serde_json::{json, Value};

/// An example receiver (a Python script) as a child process, and the lines it printed.
struct Agent {
    child: std::process::Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(dir: &std::path::Path) -> Agent {
        let db = dir.join("agent.db");
        Agent::run("examples/agent/agent.py", &["--db".as_ref(), db.as_os_str()], "AGENT_SECRET")
    }

    /// Runs `script` (under the crate's root) on a free port with `args`, its secret in
    /// the environment variable `secret_var`.
    fn run(script: &str, args: &[&std::ffi::OsStr], secret_var: &str) -> Agent {
        let mut child = Command::new("python3")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
            .args(["--port", "0"])
            .args(args)
            .env(secret_var, SECRET)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the example");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = stdout.next().expect("the example says where it listens").unwrap();
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
        self.lines.lock().unwrap().iter().filter(|l| l.trim_start().starts_with(prefix)).count()
    }

    /// The first printed line that starts with `prefix` (leading spaces aside).
    fn line(&self, prefix: &str) -> Option<String> {
        self.lines.lock().unwrap().iter().map(|l| l.trim_start()).find(|l| l.starts_with(prefix)).map(str::to_owned)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_approver_prints_a_request_and_the_command_it_prints_grants_it() {
    let approver = Agent::run("examples/notifications/approver.py", &[], "APPROVER_SECRET");
    let agent = TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await;
    let db = TestDb::sqlite();
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config.operational_events.fan_out_interval = Duration::from_millis(50);
    config.console.public_url = Some("https://console.example.com".into());
    let app = spawn_app_with(config).await;
    // approvers.yaml as shipped, pointed at the approver's port.
    let approvers =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/notifications/approvers.yaml"))
            .unwrap()
            .replace("whsec_C2FeMG0dXtHtZmJwNlpWSNC0ix4ZyIu6", SECRET)
            .replace("127.0.0.1:8091", &format!("127.0.0.1:{}", approver.port));
    let agent_endpoint = format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: refund-agent}}\nspec:\n  url: {}\n  agent: true\n  owner: refunds-team\n  secrets: [{{value: {SECRET}}}]\n",
        agent.url("/agent")
    );
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: refunds}\nspec:\n  endpointRefs: [refund-agent]\n  decision: hold\n  reason: refunds need a person\n  approval: {quorum: 1, expiresAfter: 1h}\n";
    app.apply_yaml(&format!("{approvers}---\n{agent_endpoint}---\n{rule}")).await;
    let event = json!({"id": "r-9", "source": "shop", "type": "refund.requested", "data": {"amount_cents": 1500}});
    assert_eq!(app.post_json("/v1/events", &app.admin, event.to_string()).await.status(), 202);

    eventually(Duration::from_secs(10), "the approver printed the grant command", || async {
        approver.line("grant:").is_some()
    })
    .await;
    let printed = approver.lines.lock().unwrap().join("\n");
    for expected in [
        "requested in default: agent refund-agent (owner refunds-team), rule refunds",
        "reason:  refunds need a person",
        "action:  refund.requested from shop",
        "amount_cents",
        "needs 1 grant(s) by ",
        "open:    https://console.example.com/approvals/apr_",
        "deny:    hookwarden approvals deny apr_",
    ] {
        assert!(printed.contains(expected), "{expected:?} in:\n{printed}");
    }
    assert!(agent.on("/agent").is_empty(), "held: not sent before it is granted");
    // An approver (not the submitter) runs the command as printed, with a reason of their
    // own instead of the placeholder.
    let alice = common::token("alice", &[hookwarden::auth::Role::Approver], &["default"]);
    let command = approver.line("grant:").unwrap();
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(&words[1..4], &["hookwarden", "approvals", "grant"], "{command}");
    let output = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_hookwarden"))
            .args(["approvals", "grant", words[4], "--reason", "checked the order"])
            .env("HOOKWARDEN_SERVER", &app.base)
            .env("HOOKWARDEN_TOKEN", &alice)
            .output()
            .unwrap()
    });
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    eventually(Duration::from_secs(10), "the granted action reached the agent", || async {
        agent.on("/agent").len() == 1
    })
    .await;
    eventually(Duration::from_secs(10), "the approver was told of the decision", || async {
        approver.count("approval apr_") >= 2
    })
    .await;
    let decided = approver.line(&format!("approval {} decided", words[4])).expect("a decided line");
    assert!(decided.contains("decision granted") && decided.contains("released True"), "{decided}");
}
