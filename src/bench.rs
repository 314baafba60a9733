//! `hookwarden bench`: load generators that measure a real `hookwarden serve` process.
//!
//! The server runs as a child process (this same binary) so that its memory is measured
//! apart from the load generator's; both share the machine, as they would on a small host.
//! Figures and the commands that produced them are kept in `docs/PERFORMANCE.md`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::auth::{Role, TokenKeys};
use crate::config::Secret;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and latency of `POST /v1/events`.
    Ingest(IngestArgs),
}

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

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest(args) => ingest(args).await,
    }
}

/// A `hookwarden serve` child process, killed when dropped.
struct ChildServer {
    child: tokio::process::Child,
    base: String,
    _data_dir: tempfile::TempDir,
}

impl ChildServer {
    async fn start(database_url: Option<&str>, secret: &str) -> anyhow::Result<ChildServer> {
        let data_dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir.path())
            .env("HOOKWARDEN_JWT_SECRET", secret)
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = database_url {
            command.arg("--database-url").arg(url);
        }
        let child = command.spawn().context("cannot start the server")?;
        let server = ChildServer { child, base: format!("http://127.0.0.1:{port}"), _data_dir: data_dir };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = client.get(format!("{}/readyz", server.base)).send().await {
                if response.status().is_success() {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                bail!("the server did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `(current, peak)` resident memory in KiB, from `/proc`.
    fn memory_kib(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.child.id().context("the server has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

fn event_body(worker: usize, n: usize, size: usize, run: &str) -> String {
    let body = |padding: &str| {
        json!({
            "id": format!("{run}-{worker}-{n}"),
            "source": "bench",
            "type": "order.created",
            "data": {"order_id": n, "total": 1234, "padding": padding}
        })
        .to_string()
    };
    let unpadded = body("").len();
    body(&"x".repeat(size.saturating_sub(unpadded)))
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.events < args.concurrency {
        bail!("--events must be at least --concurrency, and --concurrency at least 1");
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let server = ChildServer::start(args.database_url.as_deref(), &secret).await?;
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
    println!(
        "bench ingest: database={database} events={} concurrency={} body≈{}B",
        args.events, args.concurrency, args.size
    );
    println!(
        "  throughput   {:.0} events/s ({:.2} s)",
        args.events as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!("  latency p50  {:.2} ms", percentile(&latencies, 0.50).as_secs_f64() * 1e3);
    println!("  latency p99  {:.2} ms", percentile(&latencies, 0.99).as_secs_f64() * 1e3);
    println!("  latency max  {:.2} ms", latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3);
    println!(
        "  server RSS   idle {:.1} MiB, peak under load {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    Ok(())
}
