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
use crate::outln;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and latency of `POST /v1/events`.
    Ingest(IngestArgs),
    /// End-to-end deliveries: enqueue → signed POST → 2xx at a local receiver.
    Deliver(DeliverArgs),
    /// The policy gate alone: decisions per second and latency per decision.
    Policy(PolicyArgs),
}

#[derive(Args)]
pub struct PolicyArgs {
    /// AgentRules selecting the endpoint.
    #[arg(long, default_value_t = 20)]
    pub rules: usize,
    /// Decisions to measure.
    #[arg(long, default_value_t = 200_000)]
    pub decisions: usize,
}

#[derive(Args)]
pub struct DeliverArgs {
    /// Database of the server under test (a fresh one); default: embedded SQLite.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Events offered per second (0: as fast as the clients go).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Concurrent ingest clients.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Also fan every event out to an endpoint that never answers in time.
    #[arg(long)]
    pub with_timing_out_endpoint: bool,
    /// Also fan every event out to an endpoint that answers after 10 s (within its
    /// timeout): its backlog grows for the whole run beside the healthy endpoint.
    #[arg(long)]
    pub with_slow_endpoint: bool,
    /// Instead of a steady load: ingest this many events while the endpoint is paused,
    /// then lift the pause and time how long the backlog takes to deliver.
    #[arg(long)]
    pub backlog: Option<usize>,
    /// The endpoint is ordered, by a key of this many values (`event.data.key`): with
    /// `--backlog`, the backlog waits in that many lanes.
    #[arg(long)]
    pub ordered_keys: Option<usize>,
    /// The server's `audit.deliveryOutcomes`: `all` records every final outcome in the
    /// audit chain, `agents` only agent endpoints' (so none here: auditing off).
    #[arg(long, value_enum, default_value_t = AuditOutcomes::All)]
    pub audit_outcomes: AuditOutcomes,
    /// The `hookwarden` binary to run as the server (default: this one), to measure
    /// another build under the same load, back to back.
    #[arg(long)]
    pub server_binary: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AuditOutcomes {
    All,
    Agents,
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
        BenchCommand::Deliver(args) => deliver(args).await,
        BenchCommand::Policy(args) => policy(args),
    }
}

/// A `hookwarden serve` child process, killed when dropped.
struct ChildServer {
    child: tokio::process::Child,
    base: String,
    _data_dir: tempfile::TempDir,
}

impl ChildServer {
    async fn start(
        binary: Option<&std::path::Path>,
        database_url: Option<&str>,
        secret: &str,
        config: Option<&str>,
    ) -> anyhow::Result<ChildServer> {
        let data_dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let binary = match binary {
            Some(path) => path.to_owned(),
            None => std::env::current_exe()?,
        };
        let mut command = tokio::process::Command::new(binary);
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
        if let Some(yaml) = config {
            let path = data_dir.path().join("bench-config.yaml");
            std::fs::write(&path, yaml)?;
            command.arg("--config").arg(path);
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

    /// CPU time (user + system) the server has used so far.
    fn cpu_time(&self) -> anyhow::Result<Duration> {
        let pid = self.child.id().context("the server has exited")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).context("unreadable /proc stat");
        let (user, system) = (ticks(11)?, ticks(12)?);
        // Linux reports CPU time in clock ticks of 1/100 s (USER_HZ).
        Ok(Duration::from_millis((user + system) * 10))
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

/// The bench's receiver: answers `/ok` at once and records enqueue→2xx latency from the
/// event's `sent_us`; `/slow` never answers within the endpoint's timeout; `/ten-seconds`
/// answers after 10 s.
async fn start_receiver() -> anyhow::Result<(String, Arc<std::sync::Mutex<Vec<Duration>>>)> {
    let latencies: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
    let recorded = latencies.clone();
    let app = axum::Router::new()
        .route(
            "/ok",
            axum::routing::post(move |body: String| {
                let recorded = recorded.clone();
                async move {
                    let now = now_us();
                    let sent = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|b| b["data"]["sent_us"].as_u64());
                    if let Some(sent) = sent {
                        recorded
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Duration::from_micros(now.saturating_sub(sent)));
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
        .route(
            "/slow",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                axum::http::StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/ten-seconds",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                axum::http::StatusCode::NO_CONTENT
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, latencies))
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

async fn deliver(args: DeliverArgs) -> anyhow::Result<()> {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let audited = match args.audit_outcomes {
        AuditOutcomes::All => "all",
        AuditOutcomes::Agents => "agents",
    };
    let config = format!(
        "allowPrivateUrls: true\ndelivery: {{pollInterval: 100ms, perEndpointConcurrency: 64, maxInFlight: 512}}\n\
         audit: {{deliveryOutcomes: {audited}}}\n"
    );
    let server =
        ChildServer::start(args.server_binary.as_deref(), args.database_url.as_deref(), &secret, Some(&config)).await?;
    let token = TokenKeys::new(&Secret::new(secret.clone())).mint(
        "bench",
        &[Role::Admin],
        &["*".to_owned()],
        Duration::from_secs(3600),
    );
    let (receiver, latencies) = start_receiver().await?;
    let signing = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ordering = match args.ordered_keys {
        Some(0) => bail!("--ordered-keys must be at least 1"),
        Some(_) => "  ordering: {key: \"event.data.key\"}\n",
        None => "",
    };
    let healthy = |paused: bool| {
        format!(
            "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: healthy}}\nspec:\n  url: {receiver}/ok\n  secrets: [{{value: {signing}}}]\n  paused: {paused}\n{ordering}"
        )
    };
    let mut resources = healthy(args.backlog.is_some());
    if args.with_slow_endpoint {
        resources.push_str(&format!(
            "---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: slow}}\nspec:\n  url: {receiver}/ten-seconds\n  secrets: [{{value: {signing}}}]\n  timeout: 15s\n"
        ));
    }
    if args.with_timing_out_endpoint {
        resources.push_str(&format!(
            "---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: timing-out}}\nspec:\n  url: {receiver}/slow\n  secrets: [{{value: {signing}}}]\n  timeout: 1s\n"
        ));
    }
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    apply(&client, &server.base, &token, resources).await?;
    let database = if args.database_url.is_some() { "postgres" } else { "sqlite" };
    let events = format!("{}/v1/events", server.base);

    if let Some(backlog) = args.backlog {
        // Drain: the backlog is ingested while the endpoint is paused, then the pause is
        // lifted and the time until the last delivery arrives is measured.
        offer(&client, &events, &token, args.concurrency, 0, backlog, None, args.ordered_keys).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let audit_before = chain_length(&client, &server.base).await?;
        let claims_before = claim_histogram(&client, &server.base).await?;
        let cost = claim_cost_of_healthy(args.database_url.as_deref()).await?;
        let cpu_before = server.cpu_time()?;
        let started = Instant::now();
        apply(&client, &server.base, &token, healthy(false)).await?;
        let deadline = started + Duration::from_secs(300);
        while latencies.lock().unwrap_or_else(|p| p.into_inner()).len() < backlog {
            if Instant::now() > deadline {
                bail!("the backlog did not drain within 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let cpu = server.cpu_time()? - cpu_before;
        let claims = claim_histogram(&client, &server.base).await?.since(&claims_before);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let appended = chain_length(&client, &server.base).await? - audit_before;
        let lanes = args.ordered_keys.map_or("unordered".to_owned(), |k| format!("ordered over {k} keys"));
        outln!("bench deliver: database={database} backlog={backlog} ({lanes}) audited outcomes={audited}")?;
        outln!(
            "  drained      {backlog} deliveries in {:.2} s: {:.0} deliveries/s",
            elapsed.as_secs_f64(),
            backlog as f64 / elapsed.as_secs_f64()
        )?;
        outln!("  claims       {claims}")?;
        if let Some(cost) = cost {
            outln!(
                "  first claim  {} database buffers with the whole backlog waiting ({} deliveries claimable)",
                cost.buffers,
                cost.rows
            )?;
        }
        outln!("  server CPU   {:.3} ms per delivery", cpu.as_secs_f64() * 1e3 / backlog as f64)?;
        outln!("  audit        {appended:.0} records appended, {:.0}/s", appended / elapsed.as_secs_f64())?;
        return Ok(());
    }

    // The leader publishes chain lengths every second or so: let it count the apply.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let audit_before = chain_length(&client, &server.base).await?;
    let total = if args.rate == 0 { usize::MAX } else { args.rate as usize * args.seconds as usize };
    let cpu_before = server.cpu_time()?;
    let started = Instant::now();
    let claims_before = claim_histogram(&client, &server.base).await?;
    let offered = offer(
        &client,
        &events,
        &token,
        args.concurrency,
        args.rate,
        total,
        Some(started + Duration::from_secs(args.seconds)),
        args.ordered_keys,
    )
    .await?;
    // Wait for the queue to drain (bounded).
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let received = latencies.lock().unwrap_or_else(|p| p.into_inner()).len();
        if received >= offered || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let cpu = server.cpu_time()? - cpu_before;
    let claims = claim_histogram(&client, &server.base).await?.since(&claims_before);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let appended = chain_length(&client, &server.base).await? - audit_before;
    let mut latencies = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    latencies.sort();
    if latencies.is_empty() {
        bail!("nothing was delivered");
    }
    let delivered = latencies.len();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    outln!(
        "bench deliver: database={database} rate={} seconds={} concurrency={} timing-out endpoint={} slow endpoint={} audited outcomes={audited}",
        args.rate, args.seconds, args.concurrency, args.with_timing_out_endpoint, args.with_slow_endpoint
    )?;
    outln!("  offered      {offered} events, delivered {delivered} to the healthy endpoint")?;
    outln!(
        "  throughput   {:.0} deliveries/s (first send to last 2xx, {:.1} s)",
        delivered as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    )?;
    outln!(
        "  enqueue→2xx  p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.95)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO))
    )?;
    outln!(
        "  server CPU   {:.2} ms per delivered event (ingest included)",
        cpu.as_secs_f64() * 1e3 / delivered as f64
    )?;
    outln!("  claims       {claims}")?;
    outln!("  audit        {appended:.0} records appended, {:.0}/s", appended / elapsed.as_secs_f64())?;
    Ok(())
}

/// The server's `hookwarden_delivery_claim_seconds` histogram: `(upper bound, count)`
/// per bucket, cumulative as Prometheus gives them.
struct ClaimHistogram(Vec<(f64, f64)>);

async fn claim_histogram(client: &reqwest::Client, base: &str) -> anyhow::Result<ClaimHistogram> {
    let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let buckets = text
        .lines()
        .filter_map(|l| l.strip_prefix("hookwarden_delivery_claim_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, count.trim().parse().ok()?))
        })
        .collect();
    Ok(ClaimHistogram(buckets))
}

impl ClaimHistogram {
    /// The claims made since `before`.
    fn since(&self, before: &ClaimHistogram) -> ClaimHistogram {
        let earlier = |le: f64| before.0.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
        ClaimHistogram(self.0.iter().map(|(le, count)| (*le, count - earlier(*le))).collect())
    }

    /// The upper bound of the bucket holding quantile `q` (the histogram's resolution).
    fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.0.last()?.1;
        self.0.iter().find(|(_, count)| *count >= q * total).map(|(le, _)| *le)
    }
}

impl std::fmt::Display for ClaimHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return write!(f, "not reported by this server (no hookwarden_delivery_claim_seconds)");
        }
        let total = self.0.last().map_or(0.0, |b| b.1);
        let bound = |q| match self.quantile_bound(q) {
            Some(le) if le.is_finite() => format!("≤ {} ms", le * 1e3),
            Some(_) => "> 5 s".to_owned(),
            None => "-".to_owned(),
        };
        write!(
            f,
            "{total:.0} claims, p50 {}, p99 {} (hookwarden_delivery_claim_seconds buckets)",
            bound(0.5),
            bound(0.99)
        )
    }
}

/// On PostgreSQL, what claiming the healthy endpoint's deliveries costs now, as the bench's
/// server would claim them (64 slots, 100 at most).
async fn claim_cost_of_healthy(database_url: Option<&str>) -> anyhow::Result<Option<crate::store::ClaimCost>> {
    let Some(url) = database_url else { return Ok(None) };
    let store = crate::store::Store::connect(url).await?;
    let quota = crate::store::EndpointQuota {
        namespace: "default".into(),
        endpoint: "healthy".into(),
        cap: 64,
        breaker_threshold: None,
    };
    // An older server's schema may not have what this claim reads: then there is no figure.
    let cost = store.claim_cost(chrono::Utc::now(), 100, &[quota]).await.unwrap_or(None);
    store.close().await;
    Ok(cost)
}

async fn apply(client: &reqwest::Client, base: &str, token: &str, yaml: String) -> anyhow::Result<()> {
    let applied = client
        .post(format!("{base}/v1/apply"))
        .bearer_auth(token)
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await?;
    if !applied.status().is_success() {
        bail!("apply failed: {}", applied.text().await?);
    }
    Ok(())
}

/// Sends up to `total` events from `concurrency` clients, open-loop at `rate` events/s
/// (event n is due at n / rate s; 0: as fast as answers come), until `deadline`; every
/// answer must be `202`. With `keys`, event n's `data.key` is one of that many. Returns
/// how many were accepted.
#[allow(clippy::too_many_arguments)]
async fn offer(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    concurrency: usize,
    rate: u32,
    total: usize,
    deadline: Option<Instant>,
    keys: Option<usize>,
) -> anyhow::Result<usize> {
    let started = Instant::now();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (client, url, token, sent, accepted) =
            (client.clone(), url.to_owned(), token.to_owned(), sent.clone(), accepted.clone());
        tasks.spawn(async move {
            loop {
                let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                    return anyhow::Ok(());
                }
                if rate > 0 {
                    let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate));
                    tokio::time::sleep_until(due.into()).await;
                }
                let key = keys.map(|k| format!("k{}", n % k));
                let body = json!({"source": "bench", "type": "order.created",
                    "data": {"n": n, "worker": worker, "sent_us": now_us(), "key": key}});
                let response = client.post(&url).bearer_auth(&token).json(&body).send().await?;
                if response.status().as_u16() != 202 {
                    bail!("ingest answered {}", response.status());
                }
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(accepted.load(std::sync::atomic::Ordering::Relaxed))
}

/// Records in the `default` audit chain, from the server's metrics (0 before the first).
async fn chain_length(client: &reqwest::Client, base: &str) -> anyhow::Result<f64> {
    let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("hookwarden_audit_chain_length{chain=\"default\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// The rules of the policy bench: varied, like a real rule set (label and name selectors,
/// matches on type and data, a spend clause, rendered reasons, one shadow rule).
fn bench_rules(count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| {
            let yaml = match i % 5 {
                0 => format!("{{selector: {{matchLabels: {{role: agent}}}}, match: \"event.type == 'refund.requested' && int(event.data.amount_cents) < {}\", decision: allow, reasonExpression: \"'refund of ' + string(event.data.amount_cents)\"}}", 100_000 + i),
                1 => "{endpointRefs: [refund-agent], match: \"has(event.data.customer) && event.data.customer.tier == 'gold'\", decision: allow, reason: gold customer}".to_owned(),
                2 => format!("{{selector: {{matchLabels: {{role: agent}}}}, match: \"int(event.data.amount_cents) > {}\", decision: hold, approval: {{quorum: 2}}}}", 500_000 + i),
                3 => "{selector: {matchLabels: {role: agent}}, decision: allow, spend: {amount: \"int(event.data.amount_cents)\", currency: USD, limit: 100000000, window: 24h, overLimit: hold}}".to_owned(),
                _ => "{selector: {matchLabels: {role: agent}}, match: \"event.source in ['legacy-crm', 'unverified']\", decision: deny, enforcement: audit}".to_owned(),
            };
            (format!("rule-{i}"), yaml)
        })
        .collect()
}

fn policy(args: PolicyArgs) -> anyhow::Result<()> {
    use crate::policy::engine::{decide, CompiledRule, EndpointView, EvalBudget, PolicySet};
    let mut compiled = Vec::new();
    let mut specs = Vec::new();
    for (name, yaml) in bench_rules(args.rules) {
        let spec: crate::resources::AgentRuleSpec =
            yaml_serde::from_str(&yaml).with_context(|| format!("bench rule {yaml}"))?;
        compiled.push(CompiledRule::compile(&name, "payments", &spec).map_err(anyhow::Error::msg)?);
        specs.push((name, "payments".to_owned(), serde_json::to_value(&spec)?));
    }
    let policy = PolicySet::new(compiled, &specs);
    let labels = std::collections::BTreeMap::from([("role".to_owned(), "agent".to_owned())]);
    let endpoint = EndpointView { namespace: "payments", name: "refund-agent", labels: &labels };
    let event = json!({
        "id": "evt_bench", "source": "shop", "type": "refund.requested", "subject": "orders/1",
        "data": {"amount_cents": 2500, "order_id": "o-123", "customer": {"id": "c-9", "tier": "gold"},
                 "items": (0..10).map(|i| json!({"sku": format!("sku-{i}"), "qty": 1, "price": 250})).collect::<Vec<_>>()}
    });
    let totals: std::collections::BTreeMap<(String, String, String), i64> = std::collections::BTreeMap::new();
    let mut latencies = Vec::with_capacity(args.decisions);
    let mut outcome = None;
    for _ in 0..args.decisions.min(1000) {
        decide(&policy, &event, endpoint, &totals, chrono::Utc::now(), EvalBudget::default());
    }
    let started = Instant::now();
    for _ in 0..args.decisions {
        let t = Instant::now();
        let decision = decide(&policy, &event, endpoint, &totals, chrono::Utc::now(), EvalBudget::default());
        latencies.push(t.elapsed());
        outcome = Some(decision.outcome);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    outln!("bench policy: {} rules selecting the endpoint, {} decisions, one thread", args.rules, args.decisions)?;
    outln!("  outcome      {:?}", outcome)?;
    outln!("  throughput   {:.0} decisions/s", args.decisions as f64 / elapsed.as_secs_f64())?;
    outln!(
        "  per decision p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        us(percentile(&latencies, 0.50)),
        us(percentile(&latencies, 0.99)),
        us(*latencies.last().unwrap_or(&Duration::ZERO))
    )?;
    Ok(())
}
