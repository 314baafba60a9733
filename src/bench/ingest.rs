//! `hookwarden bench ingest`: throughput and latency of `POST /v1/events`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::json;

use crate::auth::{Role, TokenKeys};
use crate::config::Secret;
use crate::outln;

use super::server::{padded, percentile, ChildServer};

#[derive(Args)]
pub struct IngestArgs {
    /// Database of the server under test (a fresh one: the bench writes to it);
    /// default: an embedded SQLite file in a temporary directory.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Events to send in the measured run.
    #[arg(long, default_value_t = 50_000)]
    pub events: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Approximate size of each request body in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Events sent before measuring (connections, caches).
    #[arg(long, default_value_t = 2_000)]
    pub warmup: usize,
}

fn event_body(worker: usize, n: usize, size: usize, run: &str) -> String {
    padded(size, |padding| {
        json!({
            "id": format!("{run}-{worker}-{n}"),
            "source": "bench",
            "type": "order.created",
            "data": {"order_id": n, "total": 1234, "padding": padding}
        })
        .to_string()
    })
}

/// Sends `total` events over `concurrency` clients; returns each request's latency.
async fn load(
    base: &str,
    token: &str,
    total: usize,
    concurrency: usize,
    size: usize,
    run: &str,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let url = Arc::new(format!("{base}/v1/events"));
    let auth = Arc::new(format!("Bearer {token}"));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (client, url, auth, run) = (client.clone(), url.clone(), auth.clone(), run.to_owned());
        let count = total / concurrency + usize::from(worker < total % concurrency);
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            for n in 0..count {
                let body = event_body(worker, n, size, &run);
                let sent = Instant::now();
                let response = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .header("authorization", auth.as_str())
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                response.bytes().await?;
                if status.as_u16() != 202 {
                    bail!("unexpected status {status}");
                }
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::with_capacity(total);
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok((all, started.elapsed()))
}

pub(super) async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.events < args.concurrency {
        bail!("--events must be at least --concurrency, and --concurrency at least 1");
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let server = ChildServer::start(None, args.database_url.as_deref(), &secret, None).await?;
    let token = TokenKeys::new(&Secret::new(secret.clone())).mint(
        "bench",
        &[Role::Ingest],
        &["*".to_owned()],
        Duration::from_secs(3600),
    );
    let (idle_rss, _) = server.memory_kib()?;
    let run = ulid::Ulid::new().to_string();
    load(&server.base, &token, args.warmup.max(args.concurrency), args.concurrency, args.size, &format!("w{run}"))
        .await?;
    let (mut latencies, elapsed) = load(&server.base, &token, args.events, args.concurrency, args.size, &run).await?;
    let (_, peak_rss) = server.memory_kib()?;
    latencies.sort();
    let database = if args.database_url.is_some() { "postgres" } else { "sqlite" };
    outln!(
        "bench ingest: database={database} events={} concurrency={} body≈{}B",
        args.events,
        args.concurrency,
        args.size
    )?;
    outln!(
        "  throughput   {:.0} events/s ({:.2} s)",
        args.events as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    )?;
    outln!("  latency p50  {:.2} ms", percentile(&latencies, 0.50).as_secs_f64() * 1e3)?;
    outln!("  latency p99  {:.2} ms", percentile(&latencies, 0.99).as_secs_f64() * 1e3)?;
    outln!("  latency max  {:.2} ms", latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3)?;
    outln!(
        "  server RSS   idle {:.1} MiB, peak under load {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    )?;
    Ok(())
}
