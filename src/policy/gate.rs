//! The policy gate of a delivery to an agent endpoint, as a use case: from the rules'
//! decision to a [`Verdict`] — send it (recording the decision and reserving its spend),
//! hold it for approvers, deny it, or try again later.
//!
//! Pure: [`judge`] takes the decision, the delivery's [`Facts`] and the time, and does no
//! I/O; the dispatcher carries the verdict out against the store (`delivery::gate`).
//! Invariants:
//! - a delivery approvers granted is sent without a new decision: the spend of its enforced
//!   rules counts whatever the limit, and the rules' decision of now is recorded beside the
//!   grant;
//! - an allow reserves exactly the decision's spend (enforced rules), within the limits;
//! - a hold's approval request is bound by [`action_hash`] to the event, the endpoint and
//!   every amount the rules named (shadow rules included), so granting it can release
//!   nothing else;
//! - every verdict but [`Verdict::Retry`] carries the record of what was decided.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::decision::{default_approval, DecisionRecord, Outcome, PolicyDecision, SpendCheck};
use crate::resources::kinds::ExpiryOutcome;
use crate::store::policy::{NewApproval, SpendReservation};

/// How many times the gate decides one delivery while other deliveries keep taking the
/// spend budget it was decided on; then it is denied ([`contended`]).
pub const DECISIONS: usize = 3;

/// How long a delivery the gate could not decide waits before it is tried again.
pub const UNDECIDED_RETRY: Duration = Duration::from_secs(1);

/// What the gate knows of a delivery besides the decision.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The `event` variable the rules saw; an approval request is bound to it.
    pub event: &'a Value,
    pub event_id: &'a str,
    pub namespace: &'a str,
    pub endpoint: &'a str,
    /// Who ingested the event (they may not approve its hold).
    pub requested_by: &'a str,
    /// Approvers granted the delivery: it is sent without passing the gate again.
    pub approved: bool,
    /// The id the approval request gets if the delivery is held.
    pub approval_id: &'a str,
    /// `console.publicUrl`: the request's link is this and `/approvals/<id>`.
    pub console: Option<&'a str>,
}

/// What to do with a delivery.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Record the decision and reserve `reservations` (within their limits when
    /// `enforce_limits`), atomically; then send it.
    Send { reservations: Vec<SpendReservation>, enforce_limits: bool, record: DecisionRecord },
    /// Hold the delivery and open `request`.
    Hold { request: Box<NewApproval>, record: DecisionRecord },
    /// End the delivery `denied`, giving `reason`.
    Deny { reason: String, record: DecisionRecord },
    /// Not decided (the store or an evaluation thread failed): give the delivery back, due
    /// again after `after`.
    Retry { after: Duration },
}

impl Verdict {
    /// The decision this verdict records, if it was decided.
    pub fn record(&self) -> Option<&DecisionRecord> {
        match self {
            Verdict::Send { record, .. } | Verdict::Hold { record, .. } | Verdict::Deny { record, .. } => Some(record),
            Verdict::Retry { .. } => None,
        }
    }
}

/// The verdict on a delivery the rules decided `decision` for at `now`.
pub fn judge(decision: PolicyDecision, facts: &Facts<'_>, now: DateTime<Utc>) -> Verdict {
    if facts.approved {
        let enforced = decision.rules.iter().filter(|r| !r.shadow).filter_map(|r| r.spend.as_ref());
        let reservations = reservations(enforced);
        return Verdict::Send { reservations, enforce_limits: false, record: DecisionRecord::Granted(decision) };
    }
    match decision.outcome {
        Outcome::Allow => Verdict::Send {
            reservations: reservations(decision.spend.iter()),
            enforce_limits: true,
            record: DecisionRecord::Evaluated(decision),
        },
        Outcome::Hold => Verdict::Hold {
            request: Box::new(approval_request(&decision, facts, now)),
            record: DecisionRecord::Evaluated(decision),
        },
        Outcome::Deny => Verdict::Deny { reason: decision.reason.clone(), record: DecisionRecord::Evaluated(decision) },
    }
}

/// The verdict on a delivery whose spend reservation another delivery beat [`DECISIONS`]
/// times in a row.
pub fn contended() -> Verdict {
    Verdict::Deny {
        reason: "the spend budget kept changing while deciding".to_owned(),
        record: DecisionRecord::Contended,
    }
}

/// The approval request of a held delivery: the strictest approval settings of the
/// holding rules, bound to the action.
fn approval_request(decision: &PolicyDecision, facts: &Facts<'_>, now: DateTime<Utc>) -> NewApproval {
    let approval = decision.approval.clone().unwrap_or_else(default_approval);
    let amounts: Vec<(String, i64)> =
        decision.rules.iter().filter_map(|r| r.spend.as_ref()).map(|s| (s.currency.clone(), s.amount)).collect();
    NewApproval {
        id: facts.approval_id.to_owned(),
        namespace: facts.namespace.to_owned(),
        event_id: facts.event_id.to_owned(),
        endpoint: facts.endpoint.to_owned(),
        rule: decision.rule.clone(),
        reason: decision.reason.clone(),
        action_hash: action_hash(facts.event, facts.namespace, facts.endpoint, &amounts),
        role: approval.role,
        quorum: approval.quorum,
        on_expiry: match approval.on_expiry {
            ExpiryOutcome::Allow => "allow".into(),
            ExpiryOutcome::Deny => "deny".into(),
        },
        expires_at: now + chrono::Duration::from_std(approval.expires_after.0).unwrap_or(chrono::Duration::MAX),
        requested_by: facts.requested_by.to_owned(),
        link: facts.console.map(|url| format!("{}/approvals/{}", url.trim_end_matches('/'), facts.approval_id)),
    }
}

fn reservations<'a>(checks: impl Iterator<Item = &'a SpendCheck>) -> Vec<SpendReservation> {
    checks
        .map(|s| SpendReservation {
            rule: s.rule.clone(),
            key: s.key.clone(),
            currency: s.currency.clone(),
            amount: s.amount,
            limit: s.limit,
            window: s.window,
        })
        .collect()
}

/// The hash an approval is bound to: the canonical event, the endpoint and the amounts,
/// so that approving it can release nothing else.
pub fn action_hash(event: &Value, namespace: &str, endpoint: &str, amounts: &[(String, i64)]) -> String {
    use sha2::{Digest, Sha256};
    let canonical =
        serde_json::json!({"event": event, "namespace": namespace, "endpoint": endpoint, "amounts": amounts});
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::decision::RuleResult;
    use crate::resources::kinds::{Approval, OverLimit};

    fn event() -> Value {
        json!({"id": "evt_1", "source": "shop", "type": "refund.requested", "subject": null, "time": null,
               "data": {"amount_cents": 1500}})
    }

    fn facts(event: &Value, approved: bool) -> Facts<'_> {
        Facts {
            event,
            event_id: "evt_1",
            namespace: "payments",
            endpoint: "refund-agent",
            requested_by: "shop-ingest",
            approved,
            approval_id: "apr_1",
            console: None,
        }
    }

    fn spend(rule: &str, amount: i64) -> SpendCheck {
        SpendCheck {
            rule: rule.to_owned(),
            key: "refund-agent".to_owned(),
            currency: "USD".to_owned(),
            amount,
            window_total: 100,
            limit: 20_000,
            window: Duration::from_secs(86_400),
            over_limit: OverLimit::Hold,
        }
    }

    fn result(rule: &str, outcome: Outcome, shadow: bool, spend: Option<SpendCheck>) -> RuleResult {
        RuleResult {
            rule: rule.to_owned(),
            outcome: Some(outcome),
            reason: format!("{rule} says so"),
            shadow,
            error: None,
            spend,
        }
    }

    /// A decision by `rule` with `rules` evaluated; the allow's spend is its enforced rules'.
    fn decided(outcome: Outcome, rule: &str, rules: Vec<RuleResult>) -> PolicyDecision {
        let spend = if outcome == Outcome::Allow {
            rules.iter().filter(|r| !r.shadow).filter_map(|r| r.spend.clone()).collect()
        } else {
            Vec::new()
        };
        PolicyDecision {
            outcome,
            rule: Some(rule.to_owned()),
            reason: format!("{rule} says so"),
            rules,
            revision: "rev".to_owned(),
            spend,
            approval: None,
        }
    }

    fn reservation(rule: &str, amount: i64) -> SpendReservation {
        let s = spend(rule, amount);
        SpendReservation { rule: s.rule, key: s.key, currency: s.currency, amount, limit: s.limit, window: s.window }
    }

    #[test]
    fn an_allow_without_spend_is_sent_reserving_nothing() {
        let (event, now) = (event(), Utc::now());
        let decision = decided(Outcome::Allow, "a", vec![result("a", Outcome::Allow, false, None)]);
        let recorded = serde_json::to_string(&decision).unwrap();
        let Verdict::Send { reservations, enforce_limits, record } = judge(decision, &facts(&event, false), now) else {
            panic!("an allow is sent");
        };
        assert!(reservations.is_empty());
        assert!(enforce_limits);
        assert_eq!(record.to_json(), recorded, "the decision is recorded as it was evaluated");
        assert_eq!(record.counted_as(), ("allow", "a"));
    }

    #[test]
    fn an_allow_with_spend_reserves_it_within_the_limits() {
        let (event, now) = (event(), Utc::now());
        let decision =
            decided(Outcome::Allow, "cap", vec![result("cap", Outcome::Allow, false, Some(spend("cap", 1500)))]);
        let Verdict::Send { reservations, enforce_limits, .. } = judge(decision, &facts(&event, false), now) else {
            panic!("an allow is sent");
        };
        assert_eq!(reservations, vec![reservation("cap", 1500)]);
        assert!(enforce_limits, "another delivery may have taken the budget since the decision");
    }

    #[test]
    fn a_delivery_approvers_granted_is_sent_whatever_the_rules_say_now() {
        let (event, now) = (event(), Utc::now());
        // Over its limit now: it holds again, but approvers already granted it.
        let rules = vec![
            result("cap", Outcome::Hold, false, Some(spend("cap", 1500))),
            result("watch", Outcome::Deny, true, Some(spend("watch", 1500))),
        ];
        let decision = decided(Outcome::Hold, "cap", rules);
        let evaluated = serde_json::to_string(&decision).unwrap();
        let Verdict::Send { reservations, enforce_limits, record } = judge(decision, &facts(&event, true), now) else {
            panic!("a granted delivery is sent");
        };
        assert_eq!(reservations, vec![reservation("cap", 1500)], "its enforced rules' spend counts; shadow rules' not");
        assert!(!enforce_limits, "approvers granted it over the limit");
        assert_eq!(
            record.to_json(),
            format!(r#"{{"outcome":"allow","reason":"granted by approvers","evaluated":{evaluated}}}"#)
        );
        assert_eq!(record.counted_as(), ("allow", "(approved)"));
        assert_eq!(record.to_value(), serde_json::from_str::<Value>(&record.to_json()).unwrap());
    }

    #[test]
    fn a_denial_ends_the_delivery_with_the_deciding_reason() {
        let (event, now) = (event(), Utc::now());
        let rules = vec![result("a", Outcome::Allow, false, None), result("frozen", Outcome::Deny, false, None)];
        let Verdict::Deny { reason, record } =
            judge(decided(Outcome::Deny, "frozen", rules), &facts(&event, false), now)
        else {
            panic!("a denial is denied");
        };
        assert_eq!(reason, "frozen says so");
        assert_eq!(record.counted_as(), ("deny", "frozen"));
        let default = PolicyDecision { rule: None, ..decided(Outcome::Deny, "none", Vec::new()) };
        let record = judge(default, &facts(&event, false), now).record().cloned().unwrap();
        assert_eq!(record.counted_as(), ("deny", "(default)"));
    }

    #[test]
    fn a_hold_opens_an_approval_request_bound_to_the_action() {
        let (event, now) = (event(), Utc::now());
        let rules = vec![result("cap", Outcome::Hold, false, Some(spend("cap", 1500)))];
        let approval = Approval {
            role: "treasurer".into(),
            quorum: 2,
            expires_after: crate::duration::DurationText(Duration::from_secs(3600)),
            on_expiry: ExpiryOutcome::Allow,
        };
        let decision = PolicyDecision { approval: Some(approval), ..decided(Outcome::Hold, "cap", rules) };
        let Verdict::Hold { request, record } = judge(decision, &facts(&event, false), now) else {
            panic!("a hold is held");
        };
        assert_eq!(request.id, "apr_1");
        assert_eq!((request.namespace.as_str(), request.event_id.as_str()), ("payments", "evt_1"));
        assert_eq!((request.endpoint.as_str(), request.rule.as_deref()), ("refund-agent", Some("cap")));
        assert_eq!(request.reason, "cap says so");
        assert_eq!((request.role.as_str(), request.quorum, request.on_expiry.as_str()), ("treasurer", 2, "allow"));
        assert_eq!(request.expires_at, now + chrono::Duration::hours(1));
        assert_eq!(request.requested_by, "shop-ingest");
        assert_eq!(request.action_hash, action_hash(&event, "payments", "refund-agent", &[("USD".into(), 1500)]));
        assert_eq!(record.counted_as(), ("hold", "cap"));
        // A holding rule that names no approval settings gets the defaults.
        let plain = decided(Outcome::Hold, "cap", vec![result("cap", Outcome::Hold, false, None)]);
        let Verdict::Hold { request, .. } = judge(plain, &facts(&event, false), now) else { panic!("held") };
        assert_eq!((request.role.as_str(), request.quorum, request.on_expiry.as_str()), ("approver", 1, "deny"));
        assert_eq!(request.action_hash, action_hash(&event, "payments", "refund-agent", &[]));
    }

    #[test]
    fn shadow_rules_bind_the_approval_but_reserve_nothing() {
        let (event, now) = (event(), Utc::now());
        let rules = vec![
            result("a", Outcome::Allow, false, Some(spend("a", 1500))),
            result("watch", Outcome::Deny, true, Some(spend("watch", 700))),
        ];
        let Verdict::Send { reservations, .. } =
            judge(decided(Outcome::Allow, "a", rules.clone()), &facts(&event, false), now)
        else {
            panic!("a shadow denial does not deny");
        };
        assert_eq!(reservations, vec![reservation("a", 1500)]);
        let mut holding = rules;
        holding[0].outcome = Some(Outcome::Hold);
        let Verdict::Hold { request, .. } = judge(decided(Outcome::Hold, "a", holding), &facts(&event, false), now)
        else {
            panic!("held");
        };
        let amounts = [("USD".to_owned(), 1500), ("USD".to_owned(), 700)];
        assert_eq!(request.action_hash, action_hash(&event, "payments", "refund-agent", &amounts));
    }

    #[test]
    fn spend_contention_that_outlasts_the_decisions_denies() {
        let Verdict::Deny { reason, record } = contended() else { panic!("contention denies") };
        assert_eq!(reason, "the spend budget kept changing while deciding");
        assert_eq!(record.to_json(), r#"{"outcome":"deny","reason":"spend budget contention"}"#);
        assert_eq!(record.counted_as(), ("deny", "(spend contention)"));
        assert!(Verdict::Retry { after: UNDECIDED_RETRY }.record().is_none(), "nothing was decided");
    }

    #[test]
    fn the_action_hash_is_stable() {
        // The SHA-256 of `{"amounts":[["USD",1500]],"endpoint":"refund-agent","event":{"data":
        // {"amount_cents":1500},"id":"evt_1",…},"namespace":"payments"}`, keys sorted:
        // stored requests keep their hash, so it must not change.
        let hash = action_hash(&event(), "payments", "refund-agent", &[("USD".into(), 1500)]);
        assert_eq!(hash, "0818feefd47f55789ec7a8a0a2cd22d1ce43db019a73ea70ce28e9b29e21faaf");
        assert_ne!(hash, action_hash(&event(), "payments", "refund-agent", &[("USD".into(), 1501)]));
        assert_ne!(hash, action_hash(&event(), "payments", "other-agent", &[("USD".into(), 1500)]));
    }
}
