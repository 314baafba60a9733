//! `/metrics` as Prometheus and its linter see it, from real `hookwarden serve` processes
//! (each has a recorder of its own, so what a test reads is that server's alone): every
//! family has help text, counters exist at 0 from start-up, open breakers and disabled
//! endpoints are told apart; and every family the source emits is described.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::receiver::{Script, TestReceiver, SECRET};
use common::{eventually, metric, token, Process, TestDb};
use hookwarden::auth::Role;
use hookwarden::telemetry::{family_named, Kind, FAMILIES};
use serde_json::{json, Value};

/// A server process killed when the test ends, passed or not.
struct Server(Option<Process>);

impl Server {
    fn start(db: &TestDb) -> Server {
        Server(Some(Process::start(db, &["--allow-private-urls", "true"])))
    }

    fn base(&self) -> &str {
        &self.0.as_ref().expect("running").base
    }

    fn kill(mut self) {
        if let Some(process) = self.0.take() {
            process.kill();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut process) = self.0.take() {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

fn admin() -> String {
    token("admin", &[Role::Admin], &["*"])
}

async fn apply(base: &str, yaml: &str) {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/apply"))
        .bearer_auth(admin())
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .expect("apply sent");
    let status = response.status();
    assert_eq!(status, 200, "{}", response.text().await.unwrap_or_default());
}

async fn post_event(base: &str, body: Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/events"))
        .bearer_auth(admin())
        .json(&body)
        .send()
        .await
        .expect("event sent");
    // 202 for a new event, 200 for a repeated one.
    assert!([200, 202].contains(&response.status().as_u16()), "ingest answered {}", response.status());
}

async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics")).await.expect("GET /metrics").text().await.expect("metrics body")
}

fn endpoint(name: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n{extra}"
    )
}

/// Answers 200 on `/ok`, 410 on `/gone`, 500 everywhere else.
fn receiver_script() -> Script {
    Arc::new(|path, _| match path {
        "/ok" => (200, None, Duration::ZERO),
        "/gone" => (410, None, Duration::ZERO),
        _ => (500, None, Duration::ZERO),
    })
}

const QUICK_BUDGET: &str = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: quick}\nspec:\n  maxAttempts: 2\n  backoff: {base: 10ms, max: 20ms, jitter: none}\n";

/// `(name, type, help)` of every family in an exposition text, in order; `help` is `None`
/// when the family has no `# HELP` line before its `# TYPE` line.
fn families_of(text: &str) -> Vec<(String, String, Option<String>)> {
    let mut help: Option<(String, String)> = None;
    let mut families = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name.to_owned(), text.to_owned()));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("a TYPE line names a type");
            let described = help.take().filter(|(n, _)| n == name).map(|(_, text)| text);
            families.push((name.to_owned(), kind.to_owned(), described));
        }
    }
    families
}

async fn every_family_on_a_live_metrics_page_has_help_text(db: TestDb) {
    let receiver = TestReceiver::start(receiver_script()).await;
    let server = Server::start(&db);
    let base = server.base();
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: small-refunds}\nspec:\n  endpointRefs: [agent]\n  decision: allow\n  spend: {amount: \"int(event.data.amount_cents)\", currency: USD, limit: 100000, window: 24h, overLimit: deny}\n";
    apply(
        base,
        &[
            QUICK_BUDGET.to_owned(),
            endpoint("ok", &receiver.url("/ok"), "  eventTypes: [\"order.*\"]\n"),
            endpoint("flaky", &receiver.url("/flaky"), "  eventTypes: [\"order.*\"]\n  retryBudgetRef: quick\n"),
            endpoint("agent", &receiver.url("/ok"), "  eventTypes: [\"refund.*\"]\n  agent: true\n"),
            rule.to_owned(),
        ]
        .join("---\n"),
    )
    .await;
    post_event(base, json!({"id": "o-1", "source": "s", "type": "order.created", "data": {}})).await;
    post_event(base, json!({"id": "o-1", "source": "s", "type": "order.created", "data": {}})).await;
    post_event(base, json!({"id": "r-1", "source": "s", "type": "refund.requested", "data": {"amount_cents": 5}}))
        .await;
    eventually(Duration::from_secs(30), "delivered, retried and dead-lettered", || async {
        metric(base, "hookwarden_delivery_attempts_total", &[("outcome", "delivered")]).await >= Some(2.0)
            && metric(base, "hookwarden_delivery_dead_letters_total", &[]).await >= Some(1.0)
            && metric(base, "hookwarden_policy_spend_reserved_total", &[("agent", "agent")]).await >= Some(5.0)
    })
    .await;

    let families = families_of(&metrics_text(base).await);
    // Enough of them that the check below means something: HTTP, ingest, delivery, policy.
    assert!(families.len() >= 12, "only {} families on /metrics: {families:?}", families.len());
    let undescribed: Vec<&String> =
        families.iter().filter(|(_, _, help)| help.as_deref().is_none_or(str::is_empty)).map(|(n, _, _)| n).collect();
    assert!(undescribed.is_empty(), "families without # HELP text: {undescribed:?}");
    for (name, kind, _) in &families {
        let family = family_named(name).unwrap_or_else(|| panic!("{name} is on /metrics but not in FAMILIES"));
        assert_eq!(kind, family.kind.as_str(), "{name}: type on /metrics differs from FAMILIES");
    }
    server.kill();
}

/// Counter series that must exist, at 0, before anything happened.
const ZEROS: &[(&str, &[(&str, &str)])] = &[
    ("hookwarden_ingest_events_total", &[("outcome", "accepted")]),
    ("hookwarden_ingest_events_total", &[("outcome", "duplicate")]),
    ("hookwarden_delivery_attempts_total", &[("outcome", "delivered")]),
    ("hookwarden_delivery_attempts_total", &[("outcome", "retry")]),
    ("hookwarden_delivery_attempts_total", &[("outcome", "failed")]),
    ("hookwarden_delivery_attempts_total", &[("outcome", "dead")]),
    ("hookwarden_delivery_retries_total", &[]),
    ("hookwarden_delivery_dead_letters_total", &[]),
    ("hookwarden_policy_holds_total", &[]),
    ("hookwarden_policy_decisions_total", &[("outcome", "deny"), ("rule", "(default)")]),
    ("hookwarden_policy_decisions_total", &[("outcome", "allow"), ("rule", "(approved)")]),
    ("hookwarden_policy_approvals_total", &[("outcome", "granted")]),
    ("hookwarden_policy_approvals_total", &[("outcome", "denied")]),
    ("hookwarden_policy_approvals_total", &[("outcome", "expired")]),
];

async fn a_fresh_server_shows_its_counters_at_zero(db: TestDb) {
    let server = Server::start(&db);
    for (name, labels) in ZEROS {
        assert_eq!(metric(server.base(), name, labels).await, Some(0.0), "{name}{labels:?} at start-up");
    }
    // An AgentRule's decisions exist at 0 once it is applied, and again after a restart.
    let rule = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: refunds}\nspec:\n  selector: {matchLabels: {role: agent}}\n  match: \"event.type == 'refund.requested'\"\n  decision: hold\n";
    apply(server.base(), rule).await;
    for outcome in ["allow", "hold", "deny"] {
        let labels = [("outcome", outcome), ("rule", "refunds")];
        assert_eq!(metric(server.base(), "hookwarden_policy_decisions_total", &labels).await, Some(0.0), "{outcome}");
    }
    server.kill();
    let server = Server::start(&db);
    for outcome in ["allow", "hold", "deny"] {
        let labels = [("outcome", outcome), ("rule", "refunds")];
        let value = metric(server.base(), "hookwarden_policy_decisions_total", &labels).await;
        assert_eq!(value, Some(0.0), "{outcome} after a restart");
    }
    server.kill();
}

async fn open_breakers_and_disabled_endpoints_are_counted_apart(db: TestDb) {
    let receiver = TestReceiver::start(receiver_script()).await;
    let server = Server::start(&db);
    let base = server.base();
    let breaking = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: breaking}\nspec:\n  maxAttempts: 10\n  backoff: {base: 10ms, max: 20ms, jitter: none}\n  circuitBreaker: {consecutiveFailures: 2, openFor: 10m}\n";
    apply(
        base,
        &[
            breaking.to_owned(),
            endpoint("gone", &receiver.url("/gone"), ""),
            endpoint("failing", &receiver.url("/failing"), "  retryBudgetRef: breaking\n"),
        ]
        .join("---\n"),
    )
    .await;
    post_event(base, json!({"source": "s", "type": "t", "data": {}})).await;
    let client = reqwest::Client::new();
    let breaker = |name: &'static str| {
        let client = client.clone();
        async move {
            let url = format!("{base}/v1/endpoints/default/{name}/health");
            let health: Value = client.get(url).bearer_auth(admin()).send().await.unwrap().json().await.unwrap();
            health["breaker"].as_str().unwrap_or_default().to_owned()
        }
    };
    eventually(Duration::from_secs(20), "the 410 disables one endpoint, failures open the other's breaker", || async {
        breaker("gone").await == "disabled" && breaker("failing").await == "open"
    })
    .await;
    eventually(Duration::from_secs(10), "one open breaker and one disabled endpoint on /metrics", || async {
        metric(base, "hookwarden_delivery_breakers_open", &[]).await == Some(1.0)
            && metric(base, "hookwarden_delivery_endpoints_disabled", &[]).await == Some(1.0)
    })
    .await;
    server.kill();
}

/// Names emitted by `counter!`/`gauge!`/`histogram!` with a literal name in `text`.
fn emitted_in(text: &str) -> Vec<(String, Kind)> {
    let mut found = Vec::new();
    for (token, kind) in [("counter!(", Kind::Counter), ("gauge!(", Kind::Gauge), ("histogram!(", Kind::Histogram)] {
        for (at, _) in text.match_indices(token) {
            // `describe_counter!(` describes; it does not emit.
            if text[..at].ends_with('_') {
                continue;
            }
            let rest = text[at + token.len()..].trim_start();
            if let Some(literal) = rest.strip_prefix('"') {
                let name = &literal[..literal.find('"').expect("a closed string literal")];
                found.push((name.to_owned(), kind));
            }
        }
    }
    found
}

fn rust_files(dir: &std::path::Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn every_family_the_source_emits_is_described_with_its_kind() {
    let mut files = Vec::new();
    rust_files(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let mut emitted = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source file");
        emitted.extend(emitted_in(&text).into_iter().map(|(name, kind)| (file.display().to_string(), name, kind)));
    }
    assert!(emitted.len() >= 20, "the scan found only {emitted:?}");
    for (file, name, kind) in &emitted {
        let family =
            family_named(name).unwrap_or_else(|| panic!("{file} emits {name}, which FAMILIES does not describe"));
        assert_eq!(family.kind, *kind, "{file} emits {name} as a {kind:?}; FAMILIES says {:?}", family.kind);
    }
}

#[test]
fn family_names_follow_the_conventions_promtool_checks() {
    for (i, family) in FAMILIES.iter().enumerate() {
        let name = family.name;
        assert!(name.starts_with("hookwarden_"), "{name}");
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{name}: snake_case");
        assert!(!family.help.trim().is_empty(), "{name}: help text");
        assert_eq!(family.kind == Kind::Counter, name.ends_with("_total"), "{name}: _total is for counters only");
        if family.unit == metrics::Unit::Seconds {
            assert!(name.ends_with("_seconds"), "{name}: a duration says it is in seconds");
        }
        for reserved in ["_bucket", "_count", "_sum"] {
            assert!(!name.ends_with(reserved), "{name}: {reserved} is reserved for histogram series");
        }
        assert!(family.zeros.is_empty() || family.kind == Kind::Counter, "{name}: only counters start at 0");
        assert!(FAMILIES[..i].iter().all(|f| f.name != name), "{name} is listed twice");
    }
}

on_both_databases!(
    every_family_on_a_live_metrics_page_has_help_text,
    a_fresh_server_shows_its_counters_at_zero,
    open_breakers_and_disabled_endpoints_are_counted_apart,
);
