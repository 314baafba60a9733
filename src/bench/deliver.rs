//! `hookwarden bench deliver`: enqueue → signed POST → 2xx at a local receiver, under an
//! open-loop load (the bench's own clients at a set rate), a closed-loop one (`wrk`), or a
//! backlog drained; and what each delivery cost the server and the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::json;

use crate::auth::{Role, TokenKeys};
use crate::config::Secret;
use crate::outln;

use super::pgstats::FreshDatabase;
use super::server::{apply, now_us, padded, percentile, received, start_receiver, ChildServer, Receiver};
use super::work::WorkMeter;
use super::wrk::{self, WrkLoad};

#[derive(Args)]
pub struct DeliverArgs {
    /// Database of the server under test (a fresh one, or see `--fresh-database`);
    /// default: embedded SQLite in a temporary directory, fresh for each run.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Create a database `hw_bench_<ulid>` on the PostgreSQL server of `--database-url`
    /// (whose own database is only used to connect), run on it, and drop it after.
    #[arg(long, requires = "database_url")]
    pub fresh_database: bool,
    /// Events offered per second (0: as fast as the clients go).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Concurrent ingest clients (with `--closed-loop-wrk`: wrk's connections).
    #[arg(long, visible_alias = "connections", default_value_t = 32)]
    pub concurrency: usize,
    /// Closed loop: `wrk` (installed apart) posts events as fast as answers come, from
    /// `--connections` connections for `--seconds`, instead of the bench's open-loop clients.
    #[arg(long, conflicts_with_all = ["backlog", "rate"])]
    pub closed_loop_wrk: bool,
    /// wrk's threads, with `--closed-loop-wrk`.
    #[arg(long, default_value_t = 2)]
    pub wrk_threads: usize,
    /// Approximate size of each event's request body, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// The endpoint is an agent (`agent: true`) governed by one AgentRule that allows
    /// every event: each delivery is decided, and the decision recorded, before it is sent.
    #[arg(long)]
    pub governed: bool,
    /// Also fan every event out to an endpoint that never answers in time.
    #[arg(long)]
    pub with_timing_out_endpoint: bool,
    /// Also fan every event out to an endpoint that answers after 10 s (within its
    /// timeout): its backlog grows for the whole run beside the healthy endpoint.
    #[arg(long)]
    pub with_slow_endpoint: bool,
    /// Also fan every event out to a second endpoint that answers at once, at a receiver of
    /// its own (not counted): the control for `--with-slow-endpoint`, the same fan-out
    /// without slow answers.
    #[arg(long)]
    pub with_second_endpoint: bool,
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
    /// A `spec.transform` (CEL) on the healthy endpoint, built into each body. The bench's
    /// receiver times deliveries by the body's `data.sent_us`, so keep it:
    /// `{"text": "order " + string(event.data.n), "data": {"sent_us": event.data.sent_us}}`.
    #[arg(long)]
    pub transform: Option<String>,
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

/// How long the server is left idle before the last counters are read: PostgreSQL's
/// cumulative statistics reach readers up to a second late, and the leader publishes the
/// audit chain's length about every second.
const SETTLE: Duration = Duration::from_secs(2);

pub(super) async fn deliver(args: DeliverArgs) -> anyhow::Result<()> {
    if args.ordered_keys == Some(0) {
        bail!("--ordered-keys must be at least 1");
    }
    let fresh = match (&args.database_url, args.fresh_database) {
        (Some(server), true) => Some(FreshDatabase::create(server).await?),
        _ => None,
    };
    let database_url = fresh.as_ref().map(|f| f.url.clone()).or_else(|| args.database_url.clone());
    let database = match (&fresh, &database_url) {
        (Some(fresh), _) => format!("postgres (fresh database {})", fresh.name),
        (None, Some(_)) => "postgres".to_owned(),
        (None, None) => "sqlite".to_owned(),
    };
    let result = run(&args, database_url.as_deref(), &database).await;
    // The server under test has been stopped by now (dropped at the end of `run`).
    let dropped = match fresh {
        Some(fresh) => fresh.drop().await,
        None => Ok(()),
    };
    result.and(dropped)
}

/// The server under test with the bench's resources applied, and what drives it.
struct Bench {
    server: ChildServer,
    client: reqwest::Client,
    token: String,
    receiver: Receiver,
    receiver_base: String,
    events: String,
}

impl Bench {
    /// The healthy endpoint (the one whose deliveries are counted), as a resource.
    fn healthy(&self, args: &DeliverArgs, paused: bool) -> String {
        let ordering = if args.ordered_keys.is_some() { "  ordering: {key: \"event.data.key\"}\n" } else { "" };
        let agent = if args.governed { "  agent: true\n" } else { "" };
        // A JSON string is a YAML scalar too.
        let transform = args.transform.as_ref().map(|t| format!("  transform: {}\n", json!(t))).unwrap_or_default();
        format!(
            "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: healthy}}\nspec:\n  url: {}/ok\n  secrets: [{{value: {SIGNING}}}]\n  paused: {paused}\n{ordering}{agent}{transform}",
            self.receiver_base
        )
    }
}

const SIGNING: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn run(args: &DeliverArgs, database_url: Option<&str>, database: &str) -> anyhow::Result<()> {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let audited = match args.audit_outcomes {
        AuditOutcomes::All => "all",
        AuditOutcomes::Agents => "agents",
    };
    let config = format!(
        "allowPrivateUrls: true\ndelivery: {{pollInterval: 100ms, perEndpointConcurrency: 64, maxInFlight: 512}}\n\
         audit: {{deliveryOutcomes: {audited}}}\n"
    );
    let server = ChildServer::start(args.server_binary.as_deref(), database_url, &secret, Some(&config)).await?;
    let token = TokenKeys::new(&Secret::new(secret.clone())).mint(
        "bench",
        &[Role::Admin],
        &["*".to_owned()],
        Duration::from_secs(3600),
    );
    let (receiver_base, receiver) = start_receiver().await?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let events = format!("{}/v1/events", server.base);
    let bench = Bench { server, client, token, receiver, receiver_base, events };
    let mut resources = bench.healthy(args, args.backlog.is_some());
    if args.governed {
        resources.push_str(
            "---\napiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: allow-all}\nspec:\n  endpointRefs: [healthy]\n  decision: allow\n",
        );
    }
    let receiver_base = &bench.receiver_base;
    if args.with_slow_endpoint {
        resources.push_str(&format!(
            "---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: slow}}\nspec:\n  url: {receiver_base}/ten-seconds\n  secrets: [{{value: {SIGNING}}}]\n  timeout: 15s\n"
        ));
    }
    if args.with_second_endpoint {
        let (second_base, _uncounted) = start_receiver().await?;
        resources.push_str(&format!(
            "---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: second}}\nspec:\n  url: {second_base}/ok\n  secrets: [{{value: {SIGNING}}}]\n"
        ));
    }
    if args.with_timing_out_endpoint {
        resources.push_str(&format!(
            "---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: timing-out}}\nspec:\n  url: {receiver_base}/slow\n  secrets: [{{value: {SIGNING}}}]\n  timeout: 1s\n"
        ));
    }
    apply(&bench.client, &bench.server.base, &bench.token, resources).await?;
    let mut meter = WorkMeter::new(bench.server.pid()?, database_url).await?;
    let endpoint = if args.governed { "governed (agent, one AgentRule allowing all)" } else { "plain" };
    let endpoint = match &args.transform {
        Some(transform) => format!("{endpoint}, transform {transform}"),
        None => endpoint.to_owned(),
    };
    let described = format!("database={database} endpoint={endpoint} audited outcomes={audited} body≈{}B", args.size);
    let result = match args.backlog {
        Some(backlog) => drain(args, &bench, &mut meter, database_url, backlog, &described).await,
        None if args.closed_loop_wrk => closed_loop(args, &bench, &mut meter, &described).await,
        None => open_loop(args, &bench, &mut meter, &described).await,
    };
    meter.close().await?;
    result
}

/// The backlog is ingested while the endpoint is paused, then the pause is lifted and the
/// time until the last delivery arrives is measured.
async fn drain(
    args: &DeliverArgs,
    bench: &Bench,
    meter: &mut WorkMeter,
    database_url: Option<&str>,
    backlog: usize,
    described: &str,
) -> anyhow::Result<()> {
    let Bench { server, client, token, receiver, events, .. } = bench;
    let offered =
        offer(client, events, token, args.concurrency, 0, backlog, None, args.ordered_keys, args.size).await?;
    if offered.refused > 0 {
        bail!("ingest refused {} of the backlog's events", offered.refused);
    }
    let before = ServerCounts::read(bench).await?;
    let cost = claim_cost_of_healthy(database_url).await?;
    let work = meter.start().await?;
    let started = Instant::now();
    apply(client, &server.base, token, bench.healthy(args, false)).await?;
    let deadline = started + Duration::from_secs(300);
    while received(receiver).delivered() < backlog {
        if Instant::now() > deadline {
            bail!("the backlog did not drain within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let Counted { claims, writes, decisions, appended } = before.since(bench).await?;
    let work = meter.finish(work, backlog).await?;
    let lanes = args.ordered_keys.map_or("unordered".to_owned(), |k| format!("ordered over {k} keys"));
    outln!("bench deliver: {described} backlog={backlog} ({lanes})")?;
    outln!(
        "  drained      {backlog} deliveries in {:.2} s: {:.0} deliveries/s",
        elapsed.as_secs_f64(),
        backlog as f64 / elapsed.as_secs_f64()
    )?;
    outln!("  claims       {claims}")?;
    outln!("  completions  {writes}")?;
    if decisions.counted() {
        outln!("  decisions    {decisions}")?;
    }
    if let Some(cost) = cost {
        outln!(
            "  first claim  {} database buffers with the whole backlog waiting ({} deliveries claimable)",
            cost.buffers,
            cost.rows
        )?;
    }
    crate::out!("{work}")?;
    outln!("  audit        {appended:.0} records appended, {:.0}/s", appended / elapsed.as_secs_f64())?;
    Ok(())
}

/// The bench's own clients offer events at `--rate`; every event is sent at its time
/// whether earlier answers have come or not (while clients are free).
async fn open_loop(args: &DeliverArgs, bench: &Bench, meter: &mut WorkMeter, described: &str) -> anyhow::Result<()> {
    let Bench { client, token, receiver, events, .. } = bench;
    let before = ServerCounts::read(bench).await?;
    let total = if args.rate == 0 { usize::MAX } else { args.rate as usize * args.seconds as usize };
    let work = meter.start().await?;
    let started = Instant::now();
    let offered = offer(
        client,
        events,
        token,
        args.concurrency,
        args.rate,
        total,
        Some(started + Duration::from_secs(args.seconds)),
        args.ordered_keys,
        args.size,
    )
    .await?;
    let Offered { accepted: offered, refused, latencies: ingest } = offered;
    wait_for_deliveries(receiver, offered).await;
    let Counted { claims, writes, decisions, appended } = before.since(bench).await?;
    let (delivered, duplicates, elapsed, mut latencies) = {
        let received = received(receiver);
        let elapsed = received.last.map_or(started.elapsed(), |last| last - started);
        (received.delivered(), received.duplicates(), elapsed, received.latencies.clone())
    };
    let work = meter.finish(work, delivered).await?;
    latencies.sort();
    if latencies.is_empty() {
        bail!("nothing was delivered");
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    outln!(
        "bench deliver: {described} open loop: rate={} seconds={} concurrency={} timing-out endpoint={} slow endpoint={} second endpoint={}",
        args.rate,
        args.seconds,
        args.concurrency,
        args.with_timing_out_endpoint,
        args.with_slow_endpoint,
        args.with_second_endpoint
    )?;
    // Clients wait for their answers: when answers are slow, fewer events go out than fall due.
    let due = if args.rate == 0 { String::new() } else { format!(" of {} due", args.rate as u64 * args.seconds) };
    outln!("  offered      {offered}{due} events accepted (202), {refused} refused")?;
    if let Some(max) = ingest.last() {
        outln!(
            "  ingest time  p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (request sent to answer)",
            ms(percentile(&ingest, 0.50)),
            ms(percentile(&ingest, 0.90)),
            ms(percentile(&ingest, 0.99)),
            ms(*max)
        )?;
    }
    outln!("  delivered    {}", delivery_count(offered, delivered, duplicates))?;
    outln!(
        "  throughput   {:.0} deliveries/s (first send to last delivery, {:.1} s)",
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
    crate::out!("{work}")?;
    outln!("  claims       {claims}")?;
    outln!("  completions  {writes}")?;
    if decisions.counted() {
        outln!("  decisions    {decisions}")?;
    }
    outln!("  audit        {appended:.0} records appended, {:.0}/s", appended / elapsed.as_secs_f64())?;
    Ok(())
}

/// `wrk` posts events from `--connections` connections, each sending its next event when
/// the previous answer has come (as users' clients do), for `--seconds`.
async fn closed_loop(args: &DeliverArgs, bench: &Bench, meter: &mut WorkMeter, described: &str) -> anyhow::Result<()> {
    let Bench { server, token, receiver, events, .. } = bench;
    let before = ServerCounts::read(bench).await?;
    let run = ulid::Ulid::new().to_string();
    let load = WrkLoad {
        url: events,
        token,
        threads: args.wrk_threads,
        connections: args.concurrency,
        seconds: args.seconds,
        size: args.size,
        run: &run,
    };
    let work = meter.start().await?;
    let started = Instant::now();
    let summary = wrk::run(&load, server.data_dir()).await?;
    let accepted = usize::try_from(summary.accepted)?;
    wait_for_deliveries(receiver, accepted).await;
    let Counted { claims, writes, decisions, appended } = before.since(bench).await?;
    let (delivered, duplicates, elapsed) = {
        let received = received(receiver);
        let elapsed = received.last.map_or(started.elapsed(), |last| last - started);
        (received.delivered(), received.duplicates(), elapsed)
    };
    let work = meter.finish(work, delivered).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    outln!(
        "bench deliver: {described} closed loop: wrk -t{} -c{} -d{}s",
        args.wrk_threads,
        args.concurrency,
        args.seconds
    )?;
    outln!(
        "  ingest       {} events accepted (202) in {:.1} s, {:.0}/s; {} refused, {} socket errors, {} timeouts",
        summary.accepted,
        summary.duration.as_secs_f64(),
        summary.accepted as f64 / summary.duration.as_secs_f64(),
        summary.refused,
        summary.socket_errors,
        summary.timeouts
    )?;
    outln!(
        "  ingest time  p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (wrk --latency)",
        ms(summary.p50),
        ms(summary.p90),
        ms(summary.p99),
        ms(summary.max)
    )?;
    outln!("  delivered    {}", delivery_count(accepted, delivered, duplicates))?;
    outln!(
        "  throughput   {:.0} deliveries/s (wrk's start to the last delivery, {:.1} s)",
        delivered as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    )?;
    crate::out!("{work}")?;
    outln!("  claims       {claims}")?;
    outln!("  completions  {writes}")?;
    if decisions.counted() {
        outln!("  decisions    {decisions}")?;
    }
    outln!("  audit        {appended:.0} records appended, {:.0}/s", appended / elapsed.as_secs_f64())?;
    Ok(())
}

/// Waits (at most a minute) until `accepted` events have been delivered.
async fn wait_for_deliveries(receiver: &Receiver, accepted: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while received(receiver).delivered() < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the server counted before a measured run: its audit chain, its claims and its
/// completion writes.
struct ServerCounts {
    audit: f64,
    claims: Histogram,
    writes: Histogram,
    decisions: Histogram,
}

/// What the server counted during a measured run.
struct Counted {
    claims: Histogram,
    writes: Histogram,
    /// The decision writer's batches (governed runs).
    decisions: Histogram,
    appended: f64,
}

impl ServerCounts {
    /// Read once the apply before the run is counted: the leader publishes chain lengths
    /// every second or so.
    async fn read(bench: &Bench) -> anyhow::Result<ServerCounts> {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let audit = chain_length(&bench.client, &bench.server.base).await?;
        let (claims, writes, decisions) = histograms(&bench.client, &bench.server.base).await?;
        Ok(ServerCounts { audit, claims, writes, decisions })
    }

    /// After the last delivery: the claims and completion writes made since, and (once the
    /// chain length has been published again) the audit records appended since.
    async fn since(&self, bench: &Bench) -> anyhow::Result<Counted> {
        let (claims, writes, decisions) = histograms(&bench.client, &bench.server.base).await?;
        let (claims, writes) = (claims.since(&self.claims), writes.since(&self.writes));
        let decisions = decisions.since(&self.decisions);
        tokio::time::sleep(SETTLE).await;
        let appended = chain_length(&bench.client, &bench.server.base).await? - self.audit;
        Ok(Counted { claims, writes, decisions, appended })
    }
}

/// Whether every accepted event was delivered, once. A load generator stopping at its
/// deadline may leave requests unanswered that the server went on to accept: those are
/// delivered beyond `accepted`.
fn delivery_count(accepted: usize, delivered: usize, duplicates: usize) -> String {
    let verdict = if delivered >= accepted && duplicates == 0 { "nothing lost" } else { "NOT ALL DELIVERED ONCE" };
    let beyond = match delivered.checked_sub(accepted) {
        Some(0) => String::new(),
        Some(more) => format!(", {more} more that were in flight when the load stopped"),
        None => format!(", {} accepted and never delivered", accepted - delivered),
    };
    format!("{delivered} distinct events delivered to the healthy endpoint, {duplicates} twice{beyond}: {verdict}")
}

/// One of the server's latency histograms: its name, what it counts (a plural noun), and
/// `(upper bound, count)` per bucket, cumulative as Prometheus gives them.
struct Histogram {
    name: &'static str,
    counts: &'static str,
    buckets: Vec<(f64, f64)>,
}

/// The server's claim, completion-write and decision-write histograms now.
async fn histograms(client: &reqwest::Client, base: &str) -> anyhow::Result<(Histogram, Histogram, Histogram)> {
    let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let read = |name: &'static str, counts: &'static str| {
        let prefix = format!("{name}_bucket{{le=\"");
        let buckets = text
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, count.trim().parse().ok()?))
            })
            .collect();
        Histogram { name, counts, buckets }
    };
    Ok((
        read("hookwarden_delivery_claim_seconds", "claims"),
        read("hookwarden_delivery_completion_write_seconds", "completion writes"),
        read("hookwarden_policy_decision_write_seconds", "decision writes"),
    ))
}

impl Histogram {
    /// What was counted since `before`.
    fn since(&self, before: &Histogram) -> Histogram {
        let earlier = |le: f64| before.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
        let buckets = self.buckets.iter().map(|(le, count)| (*le, count - earlier(*le))).collect();
        Histogram { name: self.name, counts: self.counts, buckets }
    }

    /// The upper bound of the bucket holding quantile `q` (the histogram's resolution).
    /// Whether anything was counted.
    fn counted(&self) -> bool {
        self.buckets.last().is_some_and(|(_, count)| *count > 0.0)
    }

    fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        self.buckets.iter().find(|(_, count)| *count >= q * total).map(|(le, _)| *le)
    }
}

impl std::fmt::Display for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.buckets.is_empty() {
            return write!(f, "not reported by this server (no {})", self.name);
        }
        let total = self.buckets.last().map_or(0.0, |b| b.1);
        let bound = |q| match self.quantile_bound(q) {
            Some(le) if le.is_finite() => format!("≤ {} ms", le * 1e3),
            Some(_) => "> 5 s".to_owned(),
            None => "-".to_owned(),
        };
        write!(f, "{total:.0} {}, p50 {}, p99 {} ({} buckets)", self.counts, bound(0.5), bound(0.99), self.name)
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

/// Sends up to `total` events of about `size` bytes from `concurrency` clients, open-loop
/// at `rate` events/s (event n is due at n / rate s; 0: as fast as answers come), until
/// `deadline`. With `keys`, event n's `data.key` is one of that many. An answer other than
/// `202` is counted as refused (an overloaded server's `503`), a failed request ends the run.
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
    size: usize,
) -> anyhow::Result<Offered> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let started = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (client, url, token, sent) = (client.clone(), url.to_owned(), token.to_owned(), sent.clone());
        tasks.spawn(async move {
            let mut answers = Offered::default();
            loop {
                let n = sent.fetch_add(1, Relaxed);
                if n >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                    return anyhow::Ok(answers);
                }
                if rate > 0 {
                    let due = started + Duration::from_secs_f64(n as f64 / f64::from(rate));
                    tokio::time::sleep_until(due.into()).await;
                }
                let key = keys.map(|k| format!("k{}", n % k));
                let sent_us = now_us();
                let body = padded(size, |padding| {
                    json!({"source": "bench", "type": "order.created",
                        "data": {"n": n, "worker": worker, "sent_us": sent_us, "key": key, "padding": padding}})
                    .to_string()
                });
                let request = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                answers.latencies.push(request.elapsed());
                let counter =
                    if response.status().as_u16() == 202 { &mut answers.accepted } else { &mut answers.refused };
                *counter += 1;
            }
        });
    }
    let mut all = Offered::default();
    while let Some(answers) = tasks.join_next().await {
        let answers = answers??;
        all.accepted += answers.accepted;
        all.refused += answers.refused;
        all.latencies.extend(answers.latencies);
    }
    all.latencies.sort();
    Ok(all)
}

/// The answers to the events [`offer`] sent.
#[derive(Default)]
struct Offered {
    accepted: usize,
    refused: usize,
    /// How long each answer took, shortest first.
    latencies: Vec<Duration>,
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
