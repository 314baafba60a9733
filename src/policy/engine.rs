//! The policy gate's decision: which AgentRules select an agent endpoint, what each says
//! about one delivery, and what they decide together (as the types of
//! [`super::decision`]).
//!
//! Pure: the caller supplies the event, the endpoint, the spend already counted in each
//! rule's window, and the time. Invariants:
//! - deny beats hold beats allow; an agent endpoint no enforced rule allows is denied;
//! - a rule that fails at run time (missing field, wrong type, overflow) denies, naming
//!   the rule and the error: an error never allows;
//! - every expression of one decision runs within one budget (see
//!   [`super::meter`]), enforced while it runs; a decision that exceeds it is a denial
//!   naming the bound, whatever rules were left to evaluate (shadow rules included);
//! - a rule in `audit` enforcement is evaluated and reported, never enforced.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cel::common::types::{CelInt, CelMap, CelMapKey, CelNull, CelString};
use cel::common::value::Val;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::decision::{default_approval, rule_word, Outcome, PolicyDecision, RuleResult, SpendCheck};
use super::expr::{self, describe, value_text as as_text, CompiledExpr, Evaluation, Limits};
use super::meter::Budget;
use crate::resources::kinds::{AgentRuleSpec, Approval, Decision as RuleDecision, Enforcement, OverLimit};
use crate::resources::validate::POLICY_VARIABLES;

/// A spend clause, compiled.
#[derive(Clone, Debug)]
pub struct CompiledSpend {
    pub amount: CompiledExpr,
    pub currency: String,
    pub limit: i64,
    pub window: Duration,
    pub over_limit: OverLimit,
    pub per: Option<CompiledExpr>,
}

/// An AgentRule, compiled once when the resources change.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    pub name: String,
    pub namespace: String,
    pub priority: i32,
    pub match_labels: Option<BTreeMap<String, String>>,
    pub endpoint_refs: Vec<String>,
    pub matches: Option<CompiledExpr>,
    pub decision: RuleDecision,
    pub spend: Option<CompiledSpend>,
    pub approval: Option<Approval>,
    pub reason: Option<String>,
    pub reason_expression: Option<CompiledExpr>,
    pub shadow: bool,
    /// Whether any expression of the rule reads `spend` (or it has a spend clause):
    /// otherwise the variable is not built.
    pub uses_spend: bool,
}

impl CompiledRule {
    pub fn compile(name: &str, namespace: &str, spec: &AgentRuleSpec, limits: &Limits) -> Result<CompiledRule, String> {
        let compile = |source: &str| expr::compile(source, POLICY_VARIABLES, limits);
        let mentions_spend = |source: &Option<String>| source.as_deref().is_some_and(|s| s.contains("spend"));
        let uses_spend =
            spec.spend.is_some() || mentions_spend(&spec.match_expression) || mentions_spend(&spec.reason_expression);
        Ok(CompiledRule {
            uses_spend,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            priority: spec.priority,
            match_labels: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            endpoint_refs: spec.endpoint_refs.clone(),
            matches: spec.match_expression.as_deref().map(compile).transpose()?,
            decision: spec.decision,
            spend: spec
                .spend
                .as_ref()
                .map(|s| {
                    Ok::<_, String>(CompiledSpend {
                        amount: compile(&s.amount)?,
                        currency: s.currency.clone(),
                        limit: s.limit,
                        window: s.window.0,
                        over_limit: s.over_limit,
                        per: s.per.as_deref().map(compile).transpose()?,
                    })
                })
                .transpose()?,
            approval: spec.approval.clone(),
            reason: spec.reason.clone(),
            reason_expression: spec.reason_expression.as_deref().map(compile).transpose()?,
            shadow: spec.enforcement == Enforcement::Audit,
        })
    }

    /// A rule that denies every agent of `namespace`, giving `reason`.
    pub fn deny_all(name: &str, namespace: &str, reason: &str) -> CompiledRule {
        CompiledRule {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            priority: i32::MAX,
            match_labels: Some(BTreeMap::new()),
            endpoint_refs: Vec::new(),
            matches: None,
            decision: RuleDecision::Deny,
            spend: None,
            approval: None,
            reason: Some(reason.to_owned()),
            reason_expression: None,
            shadow: false,
            uses_spend: false,
        }
    }

    /// Whether deciding by this rule runs any CEL.
    pub fn has_expressions(&self) -> bool {
        self.matches.is_some() || self.spend.is_some() || self.reason_expression.is_some()
    }

    /// Whether the rule governs this endpoint (same namespace; by label or by name).
    pub fn selects(&self, endpoint: &EndpointView<'_>) -> bool {
        self.namespace == endpoint.namespace
            && (self.endpoint_refs.iter().any(|r| r == endpoint.name)
                || self
                    .match_labels
                    .as_ref()
                    .is_some_and(|labels| labels.iter().all(|(k, v)| endpoint.labels.get(k) == Some(v))))
    }
}

/// The rules of a namespace, and a revision that changes whenever any of them does.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub rules: Vec<Arc<CompiledRule>>,
    /// Hex SHA-256 over the rules in force (names and specs).
    pub revision: String,
}

impl PolicySet {
    /// `rules` are `(name, namespace, spec)` of every stored AgentRule.
    pub fn new(rules: Vec<CompiledRule>, specs: &[(String, String, Value)]) -> PolicySet {
        let mut hasher = Sha256::new();
        let mut sorted: Vec<&(String, String, Value)> = specs.iter().collect();
        sorted.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        for (name, namespace, spec) in sorted {
            hasher.update(format!("{namespace}/{name}={spec}\n").as_bytes());
        }
        let mut rules: Vec<Arc<CompiledRule>> = rules.into_iter().map(Arc::new).collect();
        rules.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
        PolicySet { rules, revision: hex::encode(hasher.finalize()) }
    }
}

/// The endpoint a delivery goes to.
#[derive(Clone, Copy, Debug)]
pub struct EndpointView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Spend already counted (reserved or committed) in a rule's window, by spend key.
pub trait SpendTotals {
    fn total(&self, rule: &str, key: &str, currency: &str) -> i64;
}

impl SpendTotals for BTreeMap<(String, String, String), i64> {
    fn total(&self, rule: &str, key: &str, currency: &str) -> i64 {
        self.get(&(rule.to_owned(), key.to_owned(), currency.to_owned())).copied().unwrap_or(0)
    }
}

impl PolicySet {
    /// Whether deciding for `endpoint` runs any CEL (and so belongs on an evaluation
    /// thread).
    pub fn evaluates_cel(&self, endpoint: EndpointView<'_>) -> bool {
        self.rules.iter().any(|r| r.selects(&endpoint) && r.has_expressions())
    }
}

/// Evaluates every rule of `policy` that selects `endpoint` for `event` at `now`, all of
/// them within one `budget`. CPU-bound for as long as the budget allows: call it off the
/// async workers.
pub fn decide(
    policy: &PolicySet,
    event: &Value,
    endpoint: EndpointView<'_>,
    totals: &dyn SpendTotals,
    now: DateTime<Utc>,
    budget: Budget,
) -> PolicyDecision {
    let evaluation = Evaluation::start(budget);
    let endpoint_json = json!({ "name": endpoint.name, "namespace": endpoint.namespace, "labels": endpoint.labels });
    expr::with_root(|root| decide_in(root, policy, event, &endpoint_json, endpoint, totals, now, &evaluation))
}

#[allow(clippy::too_many_arguments)]
fn decide_in<'v>(
    root: &cel::Context<'v, 'v>,
    policy: &PolicySet,
    event: &'v Value,
    endpoint_json: &'v Value,
    endpoint: EndpointView<'_>,
    totals: &dyn SpendTotals,
    now: DateTime<Utc>,
    evaluation: &Evaluation,
) -> PolicyDecision {
    // The variables every rule shares are bound once per decision, borrowing the JSON.
    let mut base = root.new_inner_scope();
    base.add_variable_as_val("event", expr::json_val(event));
    base.add_variable_as_val("endpoint", expr::json_val(endpoint_json));
    base.add_variable_as_val("agent", expr::json_val(endpoint_json));
    base.add_variable_from_value("now", cel::Value::Timestamp(now.fixed_offset()));
    let mut results = Vec::new();
    for rule in policy.rules.iter().filter(|r| r.selects(&endpoint)) {
        results.push(evaluate(rule, evaluation, base.new_inner_scope(), endpoint, totals));
        // Fail closed: the rules left unevaluated might have denied.
        if let Some(exceeded) = evaluation.exceeded() {
            results.push(RuleResult {
                rule: rule.name.clone(),
                outcome: Some(Outcome::Deny),
                reason: format!("policy evaluation stopped at rule `{}`: {exceeded}", rule.name),
                shadow: false,
                error: Some(exceeded),
                spend: None,
            });
            break;
        }
    }
    combine(policy, results)
}

fn error_result(rule: &CompiledRule, error: String) -> RuleResult {
    RuleResult {
        rule: rule.name.clone(),
        outcome: Some(Outcome::Deny),
        reason: format!("rule `{}` failed: {error}", rule.name),
        shadow: rule.shadow,
        error: Some(error),
        spend: None,
    }
}

fn evaluate(
    rule: &CompiledRule,
    evaluation: &Evaluation,
    mut context: cel::Context<'_, '_>,
    endpoint: EndpointView<'_>,
    totals: &dyn SpendTotals,
) -> RuleResult {
    // Spend first: `spend` is a variable of every expression of the rule.
    let eval = |program: &CompiledExpr, context: &cel::Context<'_, '_>| evaluation.execute(program, context);
    let mut spend = None;
    if let Some(clause) = &rule.spend {
        let key = match &clause.per {
            None => endpoint.name.to_owned(),
            Some(per) => match eval(per, &context) {
                Ok(value) => format!("{}/{}", endpoint.name, as_text(&value)),
                Err(e) => return error_result(rule, format!("spend.per: {e}")),
            },
        };
        let amount = match eval(&clause.amount, &context) {
            Ok(cel::Value::Int(n)) if n >= 0 => n,
            Ok(cel::Value::UInt(n)) if n <= i64::MAX as u64 => n as i64,
            Ok(cel::Value::Int(n)) => return error_result(rule, format!("spend.amount is negative ({n})")),
            Ok(other) => {
                return error_result(
                    rule,
                    format!("spend.amount must be an integer amount of minor units, got {}", describe(&other)),
                )
            }
            Err(e) => return error_result(rule, format!("spend.amount: {e}")),
        };
        let window_total = totals.total(&rule.name, &key, &clause.currency);
        spend = Some(SpendCheck {
            rule: rule.name.clone(),
            key,
            currency: clause.currency.clone(),
            amount,
            window_total,
            limit: clause.limit,
            window: clause.window,
            over_limit: clause.over_limit,
        });
    }
    if rule.uses_spend {
        context.add_variable_as_val("spend", spend_val(spend.as_ref()));
    }
    finish(rule, evaluation, &context, spend)
}

/// The `spend` variable: the figures of the rule's spend clause as `int`s (minor units)
/// and its currency, or zeros and nulls when it has none.
fn spend_val(spend: Option<&SpendCheck>) -> Box<dyn Val> {
    let int = |n: i64| Box::new(CelInt::from(n)) as Box<dyn Val>;
    let null = || Box::new(CelNull) as Box<dyn Val>;
    let figures: [(&'static str, Box<dyn Val>); 5] = match spend {
        Some(s) => [
            ("total", int(s.window_total)),
            ("amount", int(s.amount)),
            ("limit", int(s.limit)),
            ("remaining", int(s.limit.saturating_sub(s.window_total))),
            ("currency", Box::new(CelString::from(s.currency.clone()))),
        ],
        None => [("total", int(0)), ("amount", int(0)), ("limit", null()), ("remaining", null()), ("currency", null())],
    };
    Box::new(CelMap::from(figures.into_iter().map(|(k, v)| (CelMapKey::from(k), v)).collect::<HashMap<_, _>>()))
}

/// The rule's match, decision, reason and spend check, with every variable in `context`.
fn finish(
    rule: &CompiledRule,
    evaluation: &Evaluation,
    context: &cel::Context<'_, '_>,
    spend: Option<SpendCheck>,
) -> RuleResult {
    let eval = |program: &CompiledExpr| evaluation.execute(program, context);
    if let Some(matches) = &rule.matches {
        match eval(matches) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => {
                return RuleResult {
                    rule: rule.name.clone(),
                    outcome: None,
                    reason: "match is false".into(),
                    shadow: rule.shadow,
                    error: None,
                    spend: None,
                };
            }
            Ok(other) => return error_result(rule, format!("match must be a bool, got {}", describe(&other))),
            Err(e) => return error_result(rule, format!("match: {e}")),
        }
    }
    let mut outcome = match rule.decision {
        RuleDecision::Allow => Outcome::Allow,
        RuleDecision::Hold => Outcome::Hold,
        RuleDecision::Deny => Outcome::Deny,
    };
    let mut reason = match (&rule.reason, &rule.reason_expression) {
        (Some(text), _) => text.clone(),
        (None, Some(program)) => match eval(program) {
            Ok(cel::Value::String(s)) => s.to_string(),
            Ok(other) => {
                return error_result(rule, format!("reasonExpression must be a string, got {}", describe(&other)))
            }
            Err(e) => return error_result(rule, format!("reasonExpression: {e}")),
        },
        (None, None) => format!("rule `{}` says {}", rule.name, rule_word(outcome)),
    };
    if let Some(s) = &spend {
        if s.exceeds_limit() {
            outcome = outcome.max(match s.over_limit {
                OverLimit::Hold => Outcome::Hold,
                OverLimit::Deny => Outcome::Deny,
            });
            reason = format!(
                "{reason}; over the spend limit: {} + {} > {} {} per {}",
                s.window_total,
                s.amount,
                s.limit,
                s.currency,
                crate::duration::DurationText(s.window)
            );
        }
    }
    RuleResult { rule: rule.name.clone(), outcome: Some(outcome), reason, shadow: rule.shadow, error: None, spend }
}

fn combine(policy: &PolicySet, rules: Vec<RuleResult>) -> PolicyDecision {
    let enforced: Vec<&RuleResult> = rules.iter().filter(|r| !r.shadow && r.outcome.is_some()).collect();
    let strongest = enforced.iter().filter_map(|r| r.outcome).max();
    let (outcome, rule, reason) = match strongest {
        None => (Outcome::Deny, None, "no rule allowed it: agent endpoints are denied by default".to_owned()),
        Some(o) => {
            let decider = enforced.iter().find(|r| r.outcome == Some(o)).expect("the strongest outcome has a rule");
            (o, Some(decider.rule.clone()), decider.reason.clone())
        }
    };
    let spend =
        if outcome == Outcome::Allow { enforced.iter().filter_map(|r| r.spend.clone()).collect() } else { Vec::new() };
    let approval = (outcome == Outcome::Hold)
        .then(|| {
            let holding: Vec<&str> =
                enforced.iter().filter(|r| r.outcome == Some(Outcome::Hold)).map(|r| r.rule.as_str()).collect();
            let approvals: Vec<Approval> = policy
                .rules
                .iter()
                .filter(|r| holding.contains(&r.name.as_str()))
                .map(|r| r.approval.clone().unwrap_or_else(default_approval))
                .collect();
            strictest(approvals)
        })
        .flatten();
    PolicyDecision { outcome, rule, reason, rules, revision: policy.revision.clone(), spend, approval }
}

/// The most demanding of several approval settings: most approvers, soonest expiry,
/// deny on expiry if any says so.
fn strictest(approvals: Vec<Approval>) -> Option<Approval> {
    approvals.into_iter().reduce(|a, b| Approval {
        role: if a.quorum >= b.quorum { a.role.clone() } else { b.role.clone() },
        quorum: a.quorum.max(b.quorum),
        expires_after: a.expires_after.min(b.expires_after),
        on_expiry: if a.on_expiry == crate::resources::kinds::ExpiryOutcome::Deny { a.on_expiry } else { b.on_expiry },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, yaml: &str) -> (CompiledRule, (String, String, Value)) {
        let spec: AgentRuleSpec = yaml_serde::from_str(yaml).unwrap();
        let compiled = CompiledRule::compile(name, "payments", &spec, &Limits::default()).unwrap();
        (compiled, (name.to_owned(), "payments".to_owned(), serde_json::to_value(&spec).unwrap()))
    }

    fn policy(rules: &[(&str, &str)]) -> PolicySet {
        let (compiled, specs): (Vec<_>, Vec<_>) = rules.iter().map(|(n, y)| rule(n, y)).unzip();
        PolicySet::new(compiled, &specs)
    }

    fn decide_for(policy: &PolicySet, data: Value, spent: i64) -> PolicyDecision {
        let labels = BTreeMap::from([("role".to_owned(), "agent".to_owned())]);
        let endpoint = EndpointView { namespace: "payments", name: "refund-agent", labels: &labels };
        let event = json!({"id": "evt_1", "type": "refund.requested", "source": "shop", "data": data});
        let mut totals = BTreeMap::new();
        for r in &policy.rules {
            totals.insert((r.name.clone(), "refund-agent".to_owned(), "USD".to_owned()), spent);
        }
        decide(policy, &event, endpoint, &totals, Utc::now(), Budget::default())
    }

    const ALLOW: &str = "{endpointRefs: [refund-agent], decision: allow}";
    const HOLD: &str = "{endpointRefs: [refund-agent], decision: hold, reason: needs a human}";
    const DENY: &str = "{selector: {matchLabels: {role: agent}}, decision: deny, reason: frozen}";
    const BROKEN: &str = "{endpointRefs: [refund-agent], match: \"event.data.missing > 1\", decision: allow}";

    #[test]
    fn precedence_is_deny_then_hold_then_allow() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Outcome, Option<&'a str>);
        let table: [Case<'_>; 6] = [
            (&[("a", ALLOW)], Outcome::Allow, Some("a")),
            (&[("a", ALLOW), ("h", HOLD)], Outcome::Hold, Some("h")),
            (&[("a", ALLOW), ("h", HOLD), ("d", DENY)], Outcome::Deny, Some("d")),
            (&[("h", HOLD), ("d", DENY)], Outcome::Deny, Some("d")),
            (&[], Outcome::Deny, None),
            (&[("other", "{endpointRefs: [someone-else], decision: allow}")], Outcome::Deny, None),
        ];
        for (rules, outcome, deciding) in table {
            let decision = decide_for(&policy(rules), json!({}), 0);
            assert_eq!((decision.outcome, decision.rule.as_deref()), (outcome, deciding), "{rules:?}");
        }
        let default = decide_for(&policy(&[]), json!({}), 0);
        assert!(default.reason.contains("no rule allowed it"));
    }

    #[test]
    fn a_rule_failing_at_run_time_denies_with_its_error() {
        let decision = decide_for(&policy(&[("a", ALLOW), ("broken", BROKEN)]), json!({"amount": 1}), 0);
        assert_eq!(decision.outcome, Outcome::Deny);
        assert_eq!(decision.rule.as_deref(), Some("broken"));
        assert!(decision.reason.contains("rule `broken` failed"), "{}", decision.reason);
        // Guarded with has(), the same rule just does not match.
        let guarded = "{endpointRefs: [refund-agent], match: \"has(event.data.missing) && event.data.missing > 1\", decision: deny}";
        let decision = decide_for(&policy(&[("a", ALLOW), ("guarded", guarded)]), json!({}), 0);
        assert_eq!(decision.outcome, Outcome::Allow);
    }

    #[test]
    fn a_result_of_the_wrong_type_is_named_by_its_cel_type() {
        let not_bool = "{endpointRefs: [refund-agent], match: \"event.data.n + 1\", decision: allow}";
        let decision = decide_for(&policy(&[("count", not_bool)]), json!({"n": 1}), 0);
        assert_eq!(decision.reason, "rule `count` failed: match must be a bool, got the int 2");
        let not_text = "{endpointRefs: [refund-agent], reasonExpression: \"event.data.tags\", decision: allow}";
        let decision = decide_for(&policy(&[("tags", not_text)]), json!({"tags": ["a"]}), 0);
        assert_eq!(decision.reason, "rule `tags` failed: reasonExpression must be a string, got a list");
        let cents = "{endpointRefs: [refund-agent], decision: allow, spend: {amount: \"event.data.a\", currency: USD, limit: 9, window: 1h}}";
        let reason = decide_for(&policy(&[("cap", cents)]), json!({"a": 12.5}), 0).reason;
        assert!(reason.ends_with("minor units, got the double 12.5"), "{reason}");
    }

    #[test]
    fn shadow_rules_are_reported_but_not_enforced() {
        let audit = "{endpointRefs: [refund-agent], decision: deny, enforcement: audit, reason: would deny}";
        let decision = decide_for(&policy(&[("a", ALLOW), ("shadow", audit)]), json!({}), 0);
        assert_eq!(decision.outcome, Outcome::Allow);
        let shadow = decision.rules.iter().find(|r| r.rule == "shadow").unwrap();
        assert_eq!((shadow.outcome, shadow.shadow), (Some(Outcome::Deny), true));
        // A shadow rule alone allows nothing.
        let only_audit = "{endpointRefs: [refund-agent], decision: allow, enforcement: audit}";
        assert_eq!(decide_for(&policy(&[("s", only_audit)]), json!({}), 0).outcome, Outcome::Deny);
    }

    #[test]
    fn spend_over_the_limit_holds_or_denies_and_within_it_reserves() {
        let capped = "{endpointRefs: [refund-agent], decision: allow, spend: {amount: \"int(event.data.amount_cents)\", currency: USD, limit: 50000, window: 24h, overLimit: hold}}";
        let p = policy(&[("cap", capped)]);
        let within = decide_for(&p, json!({"amount_cents": 1000}), 49000);
        assert_eq!(within.outcome, Outcome::Allow);
        assert_eq!(within.spend[0].amount, 1000);
        let over = decide_for(&p, json!({"amount_cents": 1001}), 49000);
        assert_eq!(over.outcome, Outcome::Hold);
        assert!(over.reason.ends_with("49000 + 1001 > 50000 USD per 24h"), "{}", over.reason);
        assert!(over.spend.is_empty(), "nothing is reserved for a hold");
        let bad = decide_for(&p, json!({"amount_cents": "ten"}), 0);
        assert_eq!(bad.outcome, Outcome::Deny, "{}", bad.reason);
    }

    #[test]
    fn spend_figures_are_ints_that_rules_can_compute_with() {
        let rule = "{endpointRefs: [refund-agent], decision: deny, reason: too close to the cap, \
            match: \"spend.remaining - spend.amount < 1000 && spend.currency == 'USD' && spend.limit == 50000\", \
            spend: {amount: \"int(event.data.amount_cents)\", currency: USD, limit: 50000, window: 24h, overLimit: hold}}";
        let p = policy(&[("a", ALLOW), ("near-cap", rule)]);
        assert_eq!(decide_for(&p, json!({"amount_cents": 1000}), 10000).outcome, Outcome::Allow);
        let near = decide_for(&p, json!({"amount_cents": 1000}), 48500);
        assert_eq!((near.outcome, near.rule.as_deref()), (Outcome::Deny, Some("near-cap")), "{}", near.reason);
        // Without a spend clause, `spend` reads as zeros and nulls.
        let unlimited =
            "{endpointRefs: [refund-agent], decision: allow, match: \"spend.total == 0 && spend.limit == null\"}";
        assert_eq!(decide_for(&policy(&[("u", unlimited)]), json!({}), 0).outcome, Outcome::Allow);
    }

    #[test]
    fn a_decision_over_its_time_budget_is_a_denial() {
        let p = policy(&[("a", ALLOW), ("b", ALLOW)]);
        let labels = BTreeMap::new();
        let endpoint = EndpointView { namespace: "payments", name: "refund-agent", labels: &labels };
        let event = json!({"type": "refund.requested", "data": {}});
        let budget = Budget { max_cpu_time: Duration::ZERO, ..Budget::default() };
        let decision = decide(&p, &event, endpoint, &BTreeMap::new(), Utc::now(), budget);
        assert_eq!(decision.outcome, Outcome::Deny);
        assert!(decision.reason.contains("used more than its 0s of CPU time (cel.maxCpuTime)"), "{}", decision.reason);
    }

    #[test]
    fn a_decision_over_its_cost_budget_is_a_denial_even_when_a_shadow_rule_spent_it() {
        let heavy = "{endpointRefs: [refund-agent], match: \"event.data.a.all(x, x >= 0)\", decision: allow, enforcement: audit}";
        let p = policy(&[("a", ALLOW), ("heavy", heavy)]);
        let labels = BTreeMap::new();
        let endpoint = EndpointView { namespace: "payments", name: "refund-agent", labels: &labels };
        let event = json!({"type": "refund.requested", "data": {"a": vec![0; 1000]}});
        let budget = Budget { max_cost: 100, ..Budget::default() };
        let decision = decide(&p, &event, endpoint, &BTreeMap::new(), Utc::now(), budget);
        assert_eq!(decision.outcome, Outcome::Deny);
        assert_eq!(
            decision.reason,
            "policy evaluation stopped at rule `heavy`: the expression exceeded its budget of 100 cost units (cel.maxCost)"
        );
        // Within the budget the shadow rule is only reported.
        let decision = decide(&p, &event, endpoint, &BTreeMap::new(), Utc::now(), Budget::default());
        assert_eq!(decision.outcome, Outcome::Allow, "{}", decision.reason);
    }

    #[test]
    fn the_revision_changes_with_the_rules() {
        assert_ne!(policy(&[("a", ALLOW)]).revision, policy(&[("a", HOLD)]).revision);
        assert_eq!(policy(&[("a", ALLOW)]).revision, policy(&[("a", ALLOW)]).revision);
    }
}
