//! `hookwarden bench policy`: the policy gate alone, decisions per second and latency.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use crate::outln;

use super::server::percentile;

#[derive(Args)]
pub struct PolicyArgs {
    /// AgentRules selecting the endpoint.
    #[arg(long, default_value_t = 20)]
    pub rules: usize,
    /// Decisions to measure.
    #[arg(long, default_value_t = 200_000)]
    pub decisions: usize,
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

pub(super) fn policy(args: PolicyArgs) -> anyhow::Result<()> {
    use crate::policy::engine::{decide, CompiledRule, EndpointView, PolicySet};
    let limits = crate::policy::expr::Limits::default();
    let mut compiled = Vec::new();
    let mut specs = Vec::new();
    for (name, yaml) in bench_rules(args.rules) {
        let spec: crate::resources::AgentRuleSpec =
            yaml_serde::from_str(&yaml).with_context(|| format!("bench rule {yaml}"))?;
        compiled.push(CompiledRule::compile(&name, "payments", &spec, &limits).map_err(anyhow::Error::msg)?);
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
