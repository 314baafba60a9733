//! `hookwarden bench deliver`: enqueue → signed POST → 2xx at a local receiver, steady
//! load or a backlog drained.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::json;

use crate::auth::{Role, TokenKeys};
use crate::config::Secret;
use crate::outln;

use super::server::{apply, now_us, percentile, start_receiver, ChildServer};

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

pub(super) async fn deliver(args: DeliverArgs) -> anyhow::Result<()> {
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
