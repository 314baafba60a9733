//! Operational events: what Hookwarden tells of its own transitions (a breaker opened, a
//! delivery died, ...), as ordinary events that users subscribe to with ordinary Endpoints
//! and Filters (`eventTypes: ["hookwarden.*"]`). The types and their data are documented,
//! with a JSON Schema each, in `docs/operational-events.md`.
//!
//! This module is pure (it reads no clock and does no I/O): the types, the events' shape
//! (an approval's action as [`crate::approvals::view`] shows it), and which health changes
//! are transitions to tell. The store writes them ([`crate::store`]'s outbox), ingest fans them
//! out ([`crate::ingest::outbox`]). Invariants:
//! - an operational event is written by the transaction of the transition it tells of, not
//!   yet fanned out (status `outbox`): one per transition, whichever process made it, and
//!   none for a transition rolled back;
//! - its type is one of [`TYPES`], all under [`RESERVED_PREFIX`], which ingest through the
//!   API refuses, so an event of such a type always comes from Hookwarden;
//! - it is never delivered to the endpoint it is about ([`OperationalEvent::about_endpoint`]),
//!   and a delivery of an operational event tells nothing itself (its completion is
//!   `operational`): notifications cannot loop, and a notification endpoint that fails is
//!   logged and counted instead (`hookwarden_operational_dead_deliveries_total`);
//! - the data of every event about an endpoint carries that endpoint's `spec.owner`
//!   (`null` without one), read in the same transaction.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::approvals::view::{spend_of, EventShown};
use crate::policy::decision::{Outcome, PolicyDecision, SpendCheck};
use crate::store::policy::NewApproval;
use crate::store::StoredEvent;

/// The `source` of every operational event.
pub const SOURCE: &str = "hookwarden";

/// Event types under this prefix are Hookwarden's own.
pub const RESERVED_PREFIX: &str = "hookwarden.";

/// Whether `event_type` is reserved for operational events.
pub fn is_reserved(event_type: &str) -> bool {
    event_type.starts_with(RESERVED_PREFIX)
}

pub const ENDPOINT_FAILING: &str = "hookwarden.endpoint.failing";
pub const ENDPOINT_BREAKER_OPENED: &str = "hookwarden.endpoint.breaker_opened";
pub const ENDPOINT_BREAKER_CLOSED: &str = "hookwarden.endpoint.breaker_closed";
pub const ENDPOINT_DISABLED: &str = "hookwarden.endpoint.disabled";
pub const ENDPOINT_ENABLED: &str = "hookwarden.endpoint.enabled";
pub const ENDPOINT_SECRET_UNAVAILABLE: &str = "hookwarden.endpoint.secret_unavailable";
pub const DELIVERY_DEAD: &str = "hookwarden.delivery.dead";
pub const DEAD_LETTERS_THRESHOLD: &str = "hookwarden.dead_letters.threshold";
pub const AGENT_SPEND_LIMIT_REACHED: &str = "hookwarden.agent.spend_limit_reached";
pub const APPROVAL_REQUESTED: &str = "hookwarden.approval.requested";
pub const APPROVAL_DECIDED: &str = "hookwarden.approval.decided";
pub const APPROVAL_EXPIRING: &str = "hookwarden.approval.expiring";
pub const APPROVAL_EXPIRED: &str = "hookwarden.approval.expired";

/// Every operational event type emitted today (each is documented with its schema).
pub const TYPES: [&str; 13] = [
    ENDPOINT_FAILING,
    ENDPOINT_BREAKER_OPENED,
    ENDPOINT_BREAKER_CLOSED,
    ENDPOINT_DISABLED,
    ENDPOINT_ENABLED,
    ENDPOINT_SECRET_UNAVAILABLE,
    DELIVERY_DEAD,
    DEAD_LETTERS_THRESHOLD,
    AGENT_SPEND_LIMIT_REACHED,
    APPROVAL_REQUESTED,
    APPROVAL_DECIDED,
    APPROVAL_EXPIRING,
    APPROVAL_EXPIRED,
];

/// Longest `spec.owner` of an Endpoint, in bytes.
pub const MAX_OWNER_BYTES: usize = 256;

/// One operational event, as the transition's transaction writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct OperationalEvent {
    pub event_type: &'static str,
    pub namespace: String,
    /// The CloudEvents `subject`: what the event is about (`Endpoint/ns/name`,
    /// `delivery/dlv_…`).
    pub subject: String,
    /// The endpoint it is about: it is never delivered there, and its owner is added to
    /// the data.
    pub about_endpoint: Option<String>,
    /// The data, without `owner` (the store adds it).
    pub data: Map<String, Value>,
}

impl OperationalEvent {
    /// An event about endpoint `namespace/endpoint`; `data` (an object) gets `namespace`
    /// and `endpoint` besides its own fields.
    pub fn endpoint(event_type: &'static str, namespace: &str, endpoint: &str, data: Value) -> OperationalEvent {
        let mut fields = match data {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        fields.insert("namespace".into(), json!(namespace));
        fields.insert("endpoint".into(), json!(endpoint));
        OperationalEvent {
            event_type,
            namespace: namespace.to_owned(),
            subject: format!("Endpoint/{namespace}/{endpoint}"),
            about_endpoint: Some(endpoint.to_owned()),
            data: fields,
        }
    }

    /// `hookwarden.delivery.dead`: a delivery ended dead (its RetryBudget ran out).
    pub fn delivery_dead(dead: &DeadDelivery<'_>) -> OperationalEvent {
        let mut event = OperationalEvent::endpoint(
            DELIVERY_DEAD,
            dead.namespace,
            dead.endpoint,
            json!({"event": dead.event, "delivery": dead.delivery, "attempts": dead.attempts,
                "lastStatus": dead.last_status, "lastError": dead.last_error}),
        );
        event.subject = format!("delivery/{}", dead.delivery);
        event
    }

    /// `hookwarden.approval.decided` (granted or denied) or `.expired`: an approval request
    /// closed. It is about the agent endpoint the held delivery is for.
    pub fn approval(closed: &ApprovalClosed<'_>) -> OperationalEvent {
        let mut data = json!({"reason": closed.reason, "released": closed.released});
        let event_type = match closed.state {
            "expired" => APPROVAL_EXPIRED,
            decided => {
                data["decision"] = json!(decided);
                APPROVAL_DECIDED
            }
        };
        closed.request.told(event_type, data)
    }

    /// `hookwarden.approval.requested`: a delivery to an agent endpoint is held for
    /// `approval`, with the action as approvers see it (`GET /v1/approvals/{id}`'s `event`,
    /// its data bounded, and its `spend` figures from the holding `decision`) and where they
    /// open it (`link`, with `console.publicUrl`).
    pub fn approval_requested(
        approval: &NewApproval,
        delivery: &str,
        event: Option<&StoredEvent>,
        decision: &Value,
    ) -> OperationalEvent {
        let action = event.map(|e| serde_json::to_value(EventShown::of(e)).unwrap_or(Value::Null));
        let spend = serde_json::to_value(spend_of(decision)).unwrap_or(Value::Null);
        let mut told = OperationalEvent::endpoint(
            APPROVAL_REQUESTED,
            &approval.namespace,
            &approval.endpoint,
            json!({"approval": approval.id, "delivery": delivery, "event": approval.event_id,
                "rule": approval.rule, "reason": approval.reason, "role": approval.role, "quorum": approval.quorum,
                "expiresAt": timestamp(approval.expires_at), "onExpiry": approval.on_expiry,
                "link": approval.link, "action": action, "spend": spend}),
        );
        told.subject = format!("approval/{}", approval.id);
        told
    }

    /// `hookwarden.approval.expiring`: an approval request's deadline is near
    /// (`operationalEvents.approvalExpiringBefore`), and it is still pending.
    pub fn approval_expiring(expiring: &ApprovalExpiring<'_>) -> OperationalEvent {
        let data = json!({"expiresAt": timestamp(expiring.expires_at), "quorum": expiring.quorum});
        expiring.request.told(APPROVAL_EXPIRING, data)
    }

    /// `hookwarden.agent.spend_limit_reached`: the policy gate denied a delivery to an
    /// agent endpoint because a rule's spend limit would be passed.
    pub fn spend_limit_reached(denied: &SpendDenied<'_>) -> OperationalEvent {
        let s = denied.spend;
        let mut told = OperationalEvent::endpoint(
            AGENT_SPEND_LIMIT_REACHED,
            denied.namespace,
            denied.endpoint,
            json!({"delivery": denied.delivery, "event": denied.event, "rule": s.rule, "spendKey": s.key,
                "currency": s.currency, "amount": s.amount, "windowTotal": s.window_total, "limit": s.limit,
                "windowSeconds": s.window.as_secs(), "reason": denied.reason}),
        );
        told.subject = format!("delivery/{}", denied.delivery);
        told
    }

    /// The data as stored: the event's fields and, for an event about an endpoint, its
    /// `owner` (`null` when it has none).
    pub fn data_with_owner(&self, owner: Option<&str>) -> String {
        let mut data = self.data.clone();
        if self.about_endpoint.is_some() {
            data.insert("owner".into(), json!(owner));
        }
        Value::Object(data).to_string()
    }
}

/// What `hookwarden.delivery.dead` tells.
pub struct DeadDelivery<'a> {
    pub namespace: &'a str,
    pub endpoint: &'a str,
    pub event: &'a str,
    pub delivery: &'a str,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<&'a str>,
}

/// An approval request, as its operational events name it.
pub struct ApprovalRef<'a> {
    pub namespace: &'a str,
    /// The agent endpoint of the held delivery.
    pub endpoint: &'a str,
    pub approval: &'a str,
    pub delivery: &'a str,
    pub event: &'a str,
}

impl ApprovalRef<'_> {
    /// An event of `event_type` about this request (and its agent endpoint), with `data`
    /// besides the ids.
    fn told(&self, event_type: &'static str, data: Value) -> OperationalEvent {
        let mut data = data;
        data["approval"] = json!(self.approval);
        data["delivery"] = json!(self.delivery);
        data["event"] = json!(self.event);
        let mut told = OperationalEvent::endpoint(event_type, self.namespace, self.endpoint, data);
        told.subject = format!("approval/{}", self.approval);
        told
    }
}

/// What `hookwarden.approval.decided` and `.expired` tell.
pub struct ApprovalClosed<'a> {
    pub request: ApprovalRef<'a>,
    /// `granted`, `denied` or `expired`.
    pub state: &'a str,
    pub reason: &'a str,
    /// The delivery goes out (granted, or expired with `onExpiry: allow`).
    pub released: bool,
}

/// What `hookwarden.approval.expiring` tells.
pub struct ApprovalExpiring<'a> {
    pub request: ApprovalRef<'a>,
    pub expires_at: DateTime<Utc>,
    pub quorum: u32,
}

/// What `hookwarden.agent.spend_limit_reached` tells.
pub struct SpendDenied<'a> {
    pub namespace: &'a str,
    /// The agent endpoint.
    pub endpoint: &'a str,
    pub delivery: &'a str,
    pub event: &'a str,
    /// The deciding rule's spend clause, over its limit.
    pub spend: &'a SpendCheck,
    /// The decision's reason.
    pub reason: &'a str,
}

/// The spend clause a denial is for: the deciding rule's, when the amount would pass its
/// limit (a denial for any other reason has none).
pub fn spend_denial(decision: &PolicyDecision) -> Option<&SpendCheck> {
    if decision.outcome != Outcome::Deny {
        return None;
    }
    let rule = decision.rule.as_deref()?;
    let decider = decision.rules.iter().find(|r| r.rule == rule && !r.shadow && r.outcome == Some(Outcome::Deny))?;
    decider.spend.as_ref().filter(|s| s.exceeds_limit())
}

/// An instant as the data of operational events writes it (RFC 3339, milliseconds, `Z`).
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The consecutive failures at which an endpoint is told `failing`: `share` of its
/// breaker's `threshold`, rounded up, at least 1. `None` when that count is not below the
/// threshold (reaching the threshold opens the breaker, which is told instead).
pub fn failing_at(share: f64, threshold: u32) -> Option<u32> {
    let at = (share * f64::from(threshold)).ceil().max(1.0);
    (at < f64::from(threshold)).then_some(at as u32)
}

/// One endpoint's health before and after a batch of attempt results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthChange {
    /// A success was among the attempts: the count restarted from 0.
    pub reset: bool,
    /// Failures the batch added after its last success (all of them without one).
    pub failures: u32,
    /// The count after the batch.
    pub after: u32,
    /// Failures that open the breaker (`None`: the endpoint has no breaker).
    pub threshold: Option<u32>,
    /// See [`failing_at`].
    pub failing_at: Option<u32>,
    /// The breaker was open (or half-open) before the batch.
    pub was_open: bool,
}

impl HealthChange {
    /// The transitions the change makes, in the order they happened: the breaker closed
    /// (a success after it opened), the count reached the `failing` share, the breaker
    /// opened. Each is told when its count is crossed, not while it stays above it, so a
    /// failed half-open probe (which keeps the breaker open) tells nothing new.
    pub fn transitions(&self) -> Vec<&'static str> {
        let mut told = Vec::new();
        // The count the batch's failures started from.
        let base = if self.reset { 0 } else { self.after.saturating_sub(self.failures) };
        let crossed = |at: u32| base < at && at <= self.after;
        if self.reset && self.was_open {
            told.push(ENDPOINT_BREAKER_CLOSED);
        }
        if self.failing_at.is_some_and(crossed) {
            told.push(ENDPOINT_FAILING);
        }
        if self.threshold.is_some_and(crossed) {
            told.push(ENDPOINT_BREAKER_OPENED);
        }
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(reset: bool, failures: u32, after: u32, was_open: bool) -> HealthChange {
        HealthChange { reset, failures, after, threshold: Some(4), failing_at: failing_at(0.5, 4), was_open }
    }

    #[test]
    fn only_types_under_the_prefix_are_reserved() {
        assert!(is_reserved("hookwarden.endpoint.disabled"));
        assert!(is_reserved("hookwarden.anything"));
        assert!(!is_reserved("hookwarden"));
        assert!(!is_reserved("order.hookwarden.created"));
        assert!(TYPES.iter().all(|t| is_reserved(t)));
    }

    #[test]
    fn failing_is_a_share_of_the_threshold_below_it() {
        assert_eq!(failing_at(0.5, 4), Some(2));
        assert_eq!(failing_at(0.5, 5), Some(3));
        assert_eq!(failing_at(0.01, 5), Some(1));
        assert_eq!(failing_at(1.0, 5), None, "at the threshold the breaker opens instead");
        assert_eq!(failing_at(0.5, 1), None);
    }

    #[test]
    fn each_count_is_told_when_crossed_and_not_again() {
        assert_eq!(change(false, 1, 1, false).transitions(), Vec::<&str>::new());
        assert_eq!(change(false, 1, 2, false).transitions(), [ENDPOINT_FAILING]);
        assert_eq!(change(false, 1, 3, false).transitions(), Vec::<&str>::new());
        assert_eq!(change(false, 1, 4, false).transitions(), [ENDPOINT_BREAKER_OPENED]);
        // A failed half-open probe keeps the breaker open: nothing new.
        assert_eq!(change(false, 1, 5, true).transitions(), Vec::<&str>::new());
        // One batch may cross both.
        assert_eq!(change(false, 4, 4, false).transitions(), [ENDPOINT_FAILING, ENDPOINT_BREAKER_OPENED]);
        // A success closes an open breaker; failures after it count from 0.
        assert_eq!(change(true, 0, 0, true).transitions(), [ENDPOINT_BREAKER_CLOSED]);
        assert_eq!(change(true, 2, 2, false).transitions(), [ENDPOINT_FAILING]);
        assert_eq!(change(true, 0, 0, false).transitions(), Vec::<&str>::new());
        let no_breaker = HealthChange { threshold: None, failing_at: None, ..change(false, 9, 9, false) };
        assert!(no_breaker.transitions().is_empty());
    }

    #[test]
    fn every_type_is_counted_from_zero() {
        let family = crate::telemetry::family_named("hookwarden_operational_events_total").unwrap();
        let counted: Vec<&str> = family.zeros.iter().map(|labels| labels[0].1).collect();
        assert_eq!(counted, TYPES);
    }

    #[test]
    fn the_owner_is_added_to_events_about_an_endpoint() {
        let event = OperationalEvent::endpoint(ENDPOINT_ENABLED, "ns", "ep", json!({"by": "operator"}));
        assert_eq!(event.subject, "Endpoint/ns/ep");
        let data: Value = serde_json::from_str(&event.data_with_owner(Some("team-a"))).unwrap();
        assert_eq!(data, json!({"by": "operator", "namespace": "ns", "endpoint": "ep", "owner": "team-a"}));
        let data: Value = serde_json::from_str(&event.data_with_owner(None)).unwrap();
        assert_eq!(data["owner"], Value::Null);
    }
}
