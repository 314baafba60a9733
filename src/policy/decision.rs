//! What the policy gate decides, and what is recorded of it.
//!
//! The types [`super::engine::decide`] returns (the outcome, each rule's result, the spend
//! figures) and [`DecisionRecord`], the decision as it is written on a delivery and in its
//! `policy.decision` audit record. Invariants:
//! - a record serializes to the same JSON whatever path wrote it (the store, the
//!   completion writer), and its shape is part of the API (`GET /v1/deliveries/…`) and of
//!   the audit chain: change it only with both in mind;
//! - [`DecisionRecord::counted_as`] labels come from a bounded set (outcomes) and from
//!   resource names, never from error text.

use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::resources::kinds::{Approval, OverLimit};

/// What a rule or the gate decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Allow,
    Hold,
    Deny,
}

/// What one rule found.
#[derive(Clone, Debug, Serialize)]
pub struct RuleResult {
    pub rule: String,
    /// `None` when the rule's `match` was false.
    pub outcome: Option<Outcome>,
    pub reason: String,
    pub shadow: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spend: Option<SpendCheck>,
}

/// A spend clause's figures for one delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpendCheck {
    pub rule: String,
    /// The agent endpoint, plus the `per` value when the rule has one.
    pub key: String,
    pub currency: String,
    pub amount: i64,
    pub window_total: i64,
    pub limit: i64,
    #[serde(skip)]
    pub window: Duration,
    #[serde(skip)]
    pub over_limit: OverLimit,
}

impl SpendCheck {
    /// The amount would take the window past its limit (or past what an `i64` holds).
    pub fn exceeds_limit(&self) -> bool {
        self.window_total.checked_add(self.amount).is_none_or(|total| total > self.limit)
    }
}

/// The gate's decision, with everything needed to explain it.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyDecision {
    pub outcome: Outcome,
    /// The rule that decided; `None` for the default denial.
    pub rule: Option<String>,
    pub reason: String,
    pub rules: Vec<RuleResult>,
    pub revision: String,
    /// Spend to reserve when the outcome is allow (enforced rules only).
    pub spend: Vec<SpendCheck>,
    /// For a hold: who must approve, how many, for how long (the strictest of the holding rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
}

/// `allow`, `hold` or `deny`, as rules spell them.
pub fn rule_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Hold => "hold",
        Outcome::Deny => "deny",
    }
}

/// The approval settings of a holding rule that names none.
pub fn default_approval() -> Approval {
    serde_json::from_value(serde_json::json!({})).expect("every approval field has a default")
}

/// The policy decision recorded for one delivery.
#[derive(Clone, Debug)]
pub enum DecisionRecord {
    /// The rules' decision, as evaluated.
    Evaluated(PolicyDecision),
    /// Granted by approvers: allowed without a new decision. The rules' decision of now is
    /// kept beside it (`evaluated`), for its spend and the record.
    Granted(PolicyDecision),
    /// Denied because another delivery kept taking the spend budget while this one was
    /// being decided.
    Contended,
}

/// The reason recorded for a delivery that approvers granted.
const GRANTED: &str = "granted by approvers";

/// The reason recorded for a delivery denied by spend contention.
const CONTENDED: &str = "spend budget contention";

impl Serialize for DecisionRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DecisionRecord::Evaluated(decision) => decision.serialize(serializer),
            DecisionRecord::Granted(evaluated) => {
                let mut map = serializer.serialize_map(Some(3))?;
                map.serialize_entry("outcome", &Outcome::Allow)?;
                map.serialize_entry("reason", GRANTED)?;
                map.serialize_entry("evaluated", evaluated)?;
                map.end()
            }
            DecisionRecord::Contended => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("outcome", &Outcome::Deny)?;
                map.serialize_entry("reason", CONTENDED)?;
                map.end()
            }
        }
    }
}

impl DecisionRecord {
    /// The labels of `hookwarden_policy_decisions_total`: the outcome, and the deciding
    /// rule (`(default)` for the default denial, `(approved)` and `(spend contention)` for
    /// decisions no rule made).
    pub fn counted_as(&self) -> (&'static str, &str) {
        match self {
            DecisionRecord::Evaluated(d) => (rule_word(d.outcome), d.rule.as_deref().unwrap_or("(default)")),
            DecisionRecord::Granted(_) => ("allow", "(approved)"),
            DecisionRecord::Contended => ("deny", "(spend contention)"),
        }
    }

    /// The record as stored on the delivery. Cannot fail in practice: every map key is a
    /// string.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The record as the payload of its `policy.decision` audit record.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
