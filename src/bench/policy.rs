//! `hookwarden bench policy`: the policy gate alone, decisions per second and latency; with
//! `--ledger-entries`, a governed allow with a spend clause against a real store, its spend
//! window already holding that many entries.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::Utc;
use clap::Args;
use serde_json::json;

use super::pgstats::FreshDatabase;
use super::server::percentile;
use crate::delivery::gate::{facts, spend_windows};
use crate::ids::{DeliveryId, EventId};
use crate::outln;
use crate::policy::engine::{decide, CompiledRule, EndpointView, PolicySet};
use crate::policy::expr::Limits;
use crate::policy::gate::{judge, Verdict};
use crate::policy::meter::Budget;
use crate::store::policy::{DecisionWrite, Recorded, ToRecord};
use crate::store::spend::LedgerFill;
use crate::store::{ClaimedDelivery, IngestRequest, NewDelivery, NewEvent, Store};

#[derive(Args)]
pub struct PolicyArgs {
    /// AgentRules selecting the endpoint.
    #[arg(long, default_value_t = 20)]
    pub rules: usize,
    /// Decisions to measure.
    #[arg(long, default_value_t = 200_000)]
    pub decisions: usize,
    /// Measure allows recorded in a store instead (spend read, rules, reservation, decision
    /// and audit record committed, as the gate does), with this many committed entries
    /// already in the rule's 24 h spend window, taking turns with allows in a second
    /// database whose window is empty. One allow rule with a spend clause.
    #[arg(long)]
    pub ledger_entries: Option<u64>,
    /// With `--ledger-entries`: the PostgreSQL server to create a fresh database on (dropped
    /// after); default: SQLite in a temporary directory.
    #[arg(long, requires = "ledger_entries")]
    pub database_url: Option<String>,
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

/// The policy set of `rules` (name and YAML spec), all in namespace `payments`.
fn policy_set(rules: Vec<(String, String)>, limits: &Limits) -> anyhow::Result<PolicySet> {
    let mut compiled = Vec::new();
    let mut specs = Vec::new();
    for (name, yaml) in rules {
        let spec: crate::resources::AgentRuleSpec =
            yaml_serde::from_str(&yaml).with_context(|| format!("bench rule {yaml}"))?;
        compiled.push(CompiledRule::compile(&name, "payments", &spec, limits).map_err(anyhow::Error::msg)?);
        specs.push((name, NAMESPACE.to_owned(), serde_json::to_value(&spec)?));
    }
    Ok(PolicySet::new(compiled, &specs))
}

const NAMESPACE: &str = "payments";
const AGENT: &str = "refund-agent";

/// The event the bench's rules decide on (about 1 KB with a 10-item list): its `data`.
fn bench_data() -> serde_json::Value {
    json!({"amount_cents": 2500, "order_id": "o-123", "customer": {"id": "c-9", "tier": "gold"},
           "items": (0..10).map(|i| json!({"sku": format!("sku-{i}"), "qty": 1, "price": 250})).collect::<Vec<_>>()})
}

fn agent_labels() -> BTreeMap<String, String> {
    BTreeMap::from([("role".to_owned(), "agent".to_owned())])
}

pub(super) async fn policy(args: PolicyArgs) -> anyhow::Result<()> {
    match args.ledger_entries {
        Some(entries) => governed_allows(&args, entries).await,
        None => decisions(&args),
    }
}

/// The rules alone, in process, on one thread.
fn decisions(args: &PolicyArgs) -> anyhow::Result<()> {
    let limits = Limits::default();
    let policy = policy_set(bench_rules(args.rules), &limits)?;
    let labels = agent_labels();
    let endpoint = EndpointView { namespace: NAMESPACE, name: AGENT, labels: &labels };
    let event = json!({
        "id": "evt_bench", "source": "shop", "type": "refund.requested", "subject": "orders/1", "data": bench_data()
    });
    let totals: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(args.decisions);
    let mut outcome = None;
    for _ in 0..args.decisions.min(1000) {
        decide(&policy, &event, endpoint, &totals, chrono::Utc::now(), limits.budget());
    }
    let started = Instant::now();
    for _ in 0..args.decisions {
        let t = Instant::now();
        let decision = decide(&policy, &event, endpoint, &totals, chrono::Utc::now(), limits.budget());
        latencies.push(t.elapsed());
        outcome = Some(decision.outcome);
    }
    let elapsed = started.elapsed();
    outln!("bench policy: {} rules selecting the endpoint, {} decisions, one thread", args.rules, args.decisions)?;
    outln!("  outcome      {:?}", outcome)?;
    report(args.decisions, elapsed, latencies)
}

/// Throughput and latency per decision.
fn report(decisions: usize, elapsed: Duration, latencies: Vec<Duration>) -> anyhow::Result<()> {
    outln!("  throughput   {:.0} decisions/s", decisions as f64 / elapsed.as_secs_f64())?;
    latency("per decision", latencies)
}

/// One line of latencies: mean, p50, p99, max.
fn latency(what: &str, mut latencies: Vec<Duration>) -> anyhow::Result<()> {
    latencies.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = latencies.iter().sum::<Duration>() / u32::try_from(latencies.len().max(1)).unwrap_or(u32::MAX);
    outln!(
        "  {what} mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        us(mean),
        us(percentile(&latencies, 0.50)),
        us(percentile(&latencies, 0.99)),
        us(*latencies.last().unwrap_or(&Duration::ZERO))
    )?;
    Ok(())
}

/// The one rule of the store bench: allow, counting spend per agent over 24 h.
const SPEND_RULE: &str = "{selector: {matchLabels: {role: agent}}, decision: allow, spend: {amount: \"int(event.data.amount_cents)\", currency: USD, limit: 1000000000000000, window: 24h, overLimit: deny}}";

/// One database of the store bench: its spend window holding `entries`, and the claimed
/// deliveries to allow in it.
struct Side {
    entries: u64,
    store: Store,
    fresh: Option<FreshDatabase>,
    _dir: tempfile::TempDir,
    claimed: Vec<ClaimedDelivery>,
    filled: Duration,
    latencies: Vec<Duration>,
    reads: Vec<Duration>,
}

impl Side {
    /// A fresh database (PostgreSQL on `server`, else SQLite in a temporary directory)
    /// whose window holds `entries`, with `deliveries` claimed.
    async fn open(server: Option<&str>, entries: u64, deliveries: usize) -> anyhow::Result<Side> {
        let fresh = match server {
            Some(server) => Some(FreshDatabase::create(server).await?),
            None => None,
        };
        let dir = tempfile::tempdir()?;
        let store = match &fresh {
            Some(fresh) => Store::connect(&fresh.url).await?,
            None => Store::open_sqlite_file(&dir.path().join("bench.db")).await?,
        };
        let mut side = Side {
            entries,
            store,
            fresh,
            _dir: dir,
            claimed: Vec::new(),
            filled: Duration::ZERO,
            latencies: Vec::new(),
            reads: Vec::new(),
        };
        side.store.migrate().await?;
        let (window, now) = (spend_key().3, Utc::now());
        let day = chrono::Duration::from_std(window)?;
        let filling = Instant::now();
        let fill = LedgerFill {
            namespace: NAMESPACE.to_owned(),
            rule: "cap".to_owned(),
            key: AGENT.to_owned(),
            currency: "USD".to_owned(),
            entries,
            window,
            amount: 1,
            from: now - day + chrono::Duration::minutes(5),
            until: now - chrono::Duration::seconds(1),
        };
        side.store.fill_spend_ledger(&fill).await?;
        side.filled = filling.elapsed();
        side.claimed = claimed_deliveries(&side.store, deliveries).await?;
        Ok(side)
    }

    async fn close(self) -> anyhow::Result<()> {
        self.store.close().await;
        match self.fresh {
            Some(fresh) => fresh.drop().await,
            None => Ok(()),
        }
    }
}

/// Governed allows recorded in a database whose spend window already holds `entries`,
/// interleaved one by one (in alternating order) with allows in a database whose window
/// is empty, so that both see the same machine.
async fn governed_allows(args: &PolicyArgs, entries: u64) -> anyhow::Result<()> {
    let warmup = args.decisions.min(100);
    let mut sides = Vec::new();
    for n in if entries == 0 { vec![0] } else { vec![entries, 0] } {
        match Side::open(args.database_url.as_deref(), n, args.decisions + warmup).await {
            Ok(side) => sides.push(side),
            Err(e) => {
                for side in sides {
                    side.close().await?;
                }
                return Err(e);
            }
        }
    }
    let result = allows_in(&mut sides, args, warmup).await;
    for side in sides {
        side.close().await?;
    }
    result
}

async fn allows_in(sides: &mut [Side], args: &PolicyArgs, warmup: usize) -> anyhow::Result<()> {
    let limits = Limits::default();
    let policy = policy_set(vec![("cap".to_owned(), SPEND_RULE.to_owned())], &limits)?;
    let labels = agent_labels();
    let endpoint = EndpointView { namespace: NAMESPACE, name: AGENT, labels: &labels };
    let mut started = Instant::now();
    for n in 0..args.decisions + warmup {
        if n == warmup {
            started = Instant::now();
        }
        for i in 0..sides.len() {
            let side = &mut sides[(i + n) % sides.len()];
            let t = Instant::now();
            let read = allow(&side.store, &policy, endpoint, &side.claimed[n], limits.budget()).await?;
            if n >= warmup {
                side.latencies.push(t.elapsed());
                side.reads.push(read);
            }
        }
    }
    let elapsed = started.elapsed() / u32::try_from(sides.len()).unwrap_or(1);
    let database = if args.database_url.is_some() { "postgres (fresh databases)" } else { "sqlite" };
    outln!(
        "bench policy: governed allows with a spend clause, {database}, {} allows after {warmup} per database, \
         one at a time, the databases taking turns",
        args.decisions
    )?;
    for side in sides {
        outln!("{} ledger entries in the 24 h window (written in {:.1} s)", side.entries, side.filled.as_secs_f64())?;
        let totals = side.store.spend_totals(NAMESPACE, &[spend_key()], None, Utc::now()).await?;
        outln!("  window total {:?}", totals.values().next())?;
        report(args.decisions, elapsed, std::mem::take(&mut side.latencies))?;
        // The part that reads the window (the reservation reads it again, under its lock).
        latency("spend read", std::mem::take(&mut side.reads))?;
    }
    Ok(())
}

fn spend_key() -> (String, String, String, std::time::Duration) {
    ("cap".to_owned(), AGENT.to_owned(), "USD".to_owned(), std::time::Duration::from_secs(24 * 3600))
}

/// `count` deliveries to the agent, claimed (leased for an hour).
async fn claimed_deliveries(store: &Store, count: usize) -> anyhow::Result<Vec<ClaimedDelivery>> {
    let data = bench_data().to_string();
    for batch in (0..count).collect::<Vec<_>>().chunks(500) {
        let events = batch
            .iter()
            .map(|n| NewEvent {
                id: EventId::generate(),
                namespace: NAMESPACE.to_owned(),
                source: "shop".to_owned(),
                external_id: format!("refund-{n}"),
                event_type: "refund.requested".to_owned(),
                subject: Some("orders/1".to_owned()),
                time: None,
                data: data.clone(),
                content_type: "application/json".to_owned(),
                attributes: Default::default(),
                ingested_by: "bench".to_owned(),
                trace_id: String::new(),
                received_at: Utc::now(),
                deliveries: vec![NewDelivery {
                    id: DeliveryId::generate(),
                    endpoint: AGENT.to_owned(),
                    ordering_key: None,
                }],
                dedup_window: None,
            })
            .collect();
        store.accept_events(&[IngestRequest { idempotency: None, events }]).await?;
    }
    let mut claimed = Vec::with_capacity(count);
    while claimed.len() < count {
        let batch = store.claim_due_deliveries(Utc::now(), Duration::from_secs(3600), 500).await?;
        if batch.is_empty() {
            bail!("only {} of {count} deliveries could be claimed", claimed.len());
        }
        claimed.extend(batch);
    }
    Ok(claimed)
}

/// What the gate does for an allow: the rules learn their spend windows, the totals are
/// read, the rules decide again, and the verdict is recorded with its reservation. Returns
/// how long the read of the totals took.
async fn allow(
    store: &Store,
    policy: &PolicySet,
    endpoint: EndpointView<'_>,
    delivery: &ClaimedDelivery,
    budget: Budget,
) -> anyhow::Result<Duration> {
    let now = Utc::now();
    let event = json!({"id": delivery.event_id.as_str(), "source": delivery.source, "type": delivery.event_type,
        "subject": delivery.subject, "data": serde_json::from_str::<serde_json::Value>(&delivery.data)?});
    let probe = decide(policy, &event, endpoint, &BTreeMap::new(), now, budget);
    let reading = Instant::now();
    let totals = store.spend_totals(&delivery.namespace, &spend_windows(&probe), Some(&delivery.id), now).await?;
    let read = reading.elapsed();
    let decision = decide(policy, &event, endpoint, &totals, now, budget);
    let facts = facts(delivery, &event, "apr_bench", None);
    let Verdict::Send { reservations, enforce_limits, record } = judge(decision, &facts, now) else {
        bail!("the bench rule did not allow");
    };
    let write = DecisionWrite {
        id: delivery.id.clone(),
        lease_token: delivery.lease_token.clone(),
        namespace: delivery.namespace.clone(),
        record,
        verdict: ToRecord::Allow { reservations, enforce_limits },
    };
    let result = store.record_decisions(std::slice::from_ref(&write), now).await?.remove(0);
    if result != Recorded::Reserved {
        bail!("allow not recorded: {result:?}");
    }
    Ok(read)
}
