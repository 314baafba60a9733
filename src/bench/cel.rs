//! `hookwarden bench cel`: what Filters and AgentRules built to be expensive cost a real
//! server.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::auth::{Role, TokenKeys};
use crate::config::Secret;
use crate::outln;

use super::server::{poll_health, ChildServer};

#[derive(Args)]
pub struct CelArgs {
    /// Database of the server under test (a fresh one); default: embedded SQLite.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Elements of the event list the nested comprehensions run over.
    #[arg(long, default_value_t = 4000)]
    pub elements: usize,
    /// Elements of the event list `x in list` runs over inside a comprehension.
    #[arg(long, default_value_t = 20_000)]
    pub scan_elements: usize,
    /// Bytes of regular expressions in the event whose patterns `matches()` compiles.
    #[arg(long, default_value_t = 3000)]
    pub pattern_bytes: usize,
    /// Only the attacks whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
}

/// One hostile CEL resource of `bench cel`, and the event that makes it work.
struct CelAttack {
    name: &'static str,
    /// `Filter` or `AgentRule`: where the expression goes.
    kind: &'static str,
    expression: String,
    data: serde_json::Value,
}

fn cel_attacks(args: &CelArgs) -> Vec<CelAttack> {
    let equal = vec![0; args.elements];
    let distinct: Vec<usize> = (0..args.scan_elements).collect();
    // Distinct patterns (so nothing can be cached), each slow to compile.
    let mut patterns = Vec::new();
    let mut bytes = 0;
    while bytes < args.pattern_bytes {
        let pattern = format!(r"\pL{{500}}{}", patterns.len());
        bytes += pattern.len() + 4;
        patterns.push(pattern);
    }
    let nested = "event.data.a.all(x, event.data.a.all(y, x == y))";
    let scan = "event.data.a.all(x, x in event.data.a)";
    vec![
        CelAttack { name: "filter-nested-all", kind: "Filter", expression: nested.into(), data: json!({"a": equal}) },
        CelAttack {
            name: "filter-matches-from-data",
            kind: "Filter",
            expression: "event.data.p.exists(x, event.data.t.matches(x))".into(),
            data: json!({"p": patterns, "t": "text"}),
        },
        CelAttack {
            name: "filter-scan-in-loop",
            kind: "Filter",
            expression: scan.into(),
            data: json!({"a": distinct}),
        },
        CelAttack { name: "rule-nested-all", kind: "AgentRule", expression: nested.into(), data: json!({"a": equal}) },
        CelAttack {
            name: "rule-scan-in-loop",
            kind: "AgentRule",
            expression: scan.into(),
            data: json!({"a": distinct}),
        },
    ]
}

pub(super) async fn cel(args: CelArgs) -> anyhow::Result<()> {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let config = "allowPrivateUrls: true\ndelivery: {pollInterval: 100ms}\n";
    let server = ChildServer::start(None, args.database_url.as_deref(), &secret, Some(config)).await?;
    let token = TokenKeys::new(&Secret::new(secret.clone())).mint(
        "bench",
        &[Role::Admin],
        &["*".to_owned()],
        Duration::from_secs(3600),
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let database = if args.database_url.is_some() { "postgres" } else { "sqlite" };
    outln!("bench cel: database={database}")?;
    let signing = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    for (i, attack) in cel_attacks(&args).into_iter().enumerate() {
        if args.only.as_deref().is_some_and(|only| !attack.name.contains(only)) {
            continue;
        }
        let namespace = format!("attack-{i}");
        let quoted = serde_json::to_string(&attack.expression)?;
        let resources = if attack.kind == "Filter" {
            format!(
                "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {{name: hostile, namespace: {namespace}}}\nspec: {{expression: {quoted}}}\n---\n\
                 apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: target, namespace: {namespace}}}\n\
                 spec: {{url: \"http://127.0.0.1:9/x\", secrets: [{{value: {signing}}}], filterRefs: [hostile]}}\n"
            )
        } else {
            format!(
                "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: hostile, namespace: {namespace}}}\n\
                 spec: {{endpointRefs: [agent], match: {quoted}, decision: allow}}\n---\n\
                 apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: agent, namespace: {namespace}}}\n\
                 spec: {{url: \"http://127.0.0.1:9/x\", agent: true, secrets: [{{value: {signing}}}]}}\n"
            )
        };
        let applied = client
            .post(format!("{}/v1/apply", server.base))
            .bearer_auth(&token)
            .header("content-type", "application/yaml")
            .body(resources)
            .send()
            .await?;
        outln!("  {} ({}: {})", attack.name, attack.kind, attack.expression)?;
        if !applied.status().is_success() {
            let body: serde_json::Value = applied.json().await?;
            let message = body["errors"][0]["message"].as_str().unwrap_or("").to_owned();
            outln!("    apply        refused: {message}")?;
            continue;
        }
        let event = json!({"source": "bench", "type": "attack", "namespace": namespace, "data": attack.data});
        let body = event.to_string();
        let (done, poller) = poll_health(&server.base);
        let cpu_before = server.cpu_time()?;
        let started = Instant::now();
        let response = client
            .post(format!("{}/v1/events", server.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = response.status();
        let answered = started.elapsed();
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        let mut settled = answered;
        let outcome;
        if attack.kind == "AgentRule" {
            // The rule runs at dispatch: wait for the delivery's decision.
            let id = answer["deliveries"][0]["id"].as_str().unwrap_or_default().to_owned();
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let delivery: serde_json::Value = client
                    .get(format!("{}/v1/deliveries/{id}", server.base))
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .json()
                    .await?;
                let state = delivery["state"].as_str().unwrap_or_default().to_owned();
                if !["pending", "delivering"].contains(&state.as_str()) || Instant::now() > deadline {
                    settled = started.elapsed();
                    let reason = delivery["decision"]["reason"].as_str().unwrap_or_default();
                    outcome = format!("delivery {state}: {reason}");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else {
            let errors = answer["fanout_errors"].as_array().cloned().unwrap_or_default();
            let message = errors.first().and_then(|e| e["message"].as_str()).unwrap_or("none");
            outcome = format!(
                "{} deliveries, {} fan-out errors: {message}",
                answer["deliveries"].as_array().map_or(0, Vec::len),
                errors.len()
            );
        }
        let cpu = server.cpu_time()? - cpu_before;
        done.cancel();
        let slowest = poller.await?;
        let kib = body.len() as f64 / 1024.0;
        outln!("    ingest       {status} after {:.3} s ({kib:.1} KiB event)", answered.as_secs_f64())?;
        if attack.kind == "AgentRule" {
            outln!("    decision     after {:.3} s", settled.as_secs_f64())?;
        }
        outln!("    outcome      {}", outcome.chars().take(240).collect::<String>())?;
        outln!("    server CPU   {:.2} s", cpu.as_secs_f64())?;
        outln!("    /healthz     slowest answer {:.1} ms", slowest.as_secs_f64() * 1e3)?;
    }
    let (_, peak) = server.memory_kib()?;
    outln!("  server RSS peak {:.1} MiB", peak as f64 / 1024.0)?;
    Ok(())
}
