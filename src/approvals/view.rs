//! What an approver is shown of one approval request: the action itself (the event,
//! bounded), where it goes, why it was held, the spend figures, the votes and how far the
//! quorum is. Pure: built from what the store returned, unit-tested here.
//!
//! Invariants:
//! - the event's `data` is inline JSON, byte for byte as ingested, only up to
//!   [`INLINE_DATA_BYTES`]; larger data is cut (on a character boundary) and shown as text,
//!   and the view says so (`data_truncated`, `data_note` with the full size), so a view is
//!   never silently partial and never unbounded;
//! - the spend figures and the rules' results come from the policy decision stored on the
//!   delivery, never from a new evaluation.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::store::policy::{ApprovalRecord, VoteRecord};
use crate::store::StoredEvent;

/// Largest event `data` shown inline as JSON; larger data is cut to this many bytes of text.
pub const INLINE_DATA_BYTES: usize = 64 * 1024;

/// One approval request as an approver sees it (`GET /v1/approvals/{id}`).
#[derive(Debug, Serialize)]
pub struct ApprovalView {
    #[serde(flatten)]
    pub request: ApprovalRecord,
    /// Every vote, oldest first.
    pub votes: Vec<VoteRecord>,
    pub progress: Progress,
    /// The event being delivered; `None` only if it is no longer stored.
    pub event: Option<EventShown>,
    /// The endpoint as now configured; `None` when it no longer exists.
    pub endpoint_detail: Option<EndpointShown>,
    /// The policy decision stored on the delivery, as stored: while the request is pending,
    /// the decision that held it.
    pub decision: Option<Value>,
    /// The spend figures of every rule with a spend clause, from [`ApprovalView::decision`].
    pub spend: Vec<SpendShown>,
}

/// How far the request is from its quorum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub grants: u32,
    pub denials: u32,
    pub quorum: u32,
    /// Grants still missing (0 once the quorum is reached).
    pub needed: u32,
}

impl Progress {
    pub fn of(votes: &[VoteRecord], quorum: i32) -> Progress {
        let count = |kind: &str| votes.iter().filter(|v| v.vote == kind).count() as u32;
        let (grants, quorum) = (count("grant"), quorum.max(0) as u32);
        Progress { grants, denials: count("deny"), quorum, needed: quorum.saturating_sub(grants) }
    }
}

/// The event of a held delivery, with its `data` bounded.
#[derive(Debug, Serialize)]
pub struct EventShown {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub subject: Option<String>,
    pub time: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    /// The data as ingested, when it is at most [`INLINE_DATA_BYTES`]; else `None`.
    pub data: Option<Box<RawValue>>,
    /// Size of the stored data in bytes.
    pub data_bytes: usize,
    pub data_truncated: bool,
    /// The first bytes of the data as text, when it was too large to show inline.
    pub data_preview: Option<String>,
    /// Says how large the data is and that it was cut; `None` when it is shown whole.
    pub data_note: Option<String>,
}

impl EventShown {
    pub fn of(stored: &StoredEvent) -> EventShown {
        let e = &stored.event;
        let size = e.data.len();
        let inline = (size <= INLINE_DATA_BYTES).then(|| RawValue::from_string(e.data.clone()).ok()).flatten();
        let (data_truncated, data_preview, data_note) = match inline {
            Some(_) => (false, None, None),
            None => {
                let preview = cut(&e.data, INLINE_DATA_BYTES);
                let note = if size <= INLINE_DATA_BYTES {
                    format!("data is {size} bytes but not valid JSON; shown as text")
                } else {
                    format!(
                        "data is {size} bytes, more than the {INLINE_DATA_BYTES} shown inline: cut to its first {} bytes, shown as text",
                        preview.len()
                    )
                };
                (size > INLINE_DATA_BYTES, Some(preview.to_owned()), Some(note))
            }
        };
        EventShown {
            id: e.id.to_string(),
            source: e.source.clone(),
            event_type: e.event_type.clone(),
            subject: e.subject.clone(),
            time: e.time,
            received_at: e.received_at,
            data: inline,
            data_bytes: size,
            data_truncated,
            data_preview,
            data_note,
        }
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The endpoint an approved action goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointShown {
    pub name: String,
    pub url: String,
    pub labels: BTreeMap<String, String>,
    pub agent: bool,
}

/// One rule's spend figures for the held action, in minor units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpendShown {
    pub rule: String,
    pub key: String,
    pub currency: String,
    /// This action's amount.
    pub amount: i64,
    /// Spend already counted in the rule's window when the decision was made.
    pub window_total: i64,
    pub limit: i64,
    /// `limit - window_total` (negative once a granted action went over the limit).
    pub remaining: i64,
    /// The rule is in `audit` enforcement: reported, not enforced.
    pub shadow: bool,
}

/// The spend figures of a stored decision. A delivery released by approvers stores
/// `{"outcome": "allow", "reason": "granted by approvers", "evaluated": {…}}`: its figures are
/// those of `evaluated`, the evaluation its spend was counted by.
pub fn spend_of(decision: &Value) -> Vec<SpendShown> {
    let decision = decision.get("evaluated").unwrap_or(decision);
    let rules = decision.get("rules").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    rules
        .iter()
        .filter_map(|rule| {
            let s = rule.get("spend")?;
            let int = |field: &str| s.get(field).and_then(Value::as_i64);
            let (window_total, limit) = (int("window_total")?, int("limit")?);
            Some(SpendShown {
                rule: s.get("rule").and_then(Value::as_str)?.to_owned(),
                key: s.get("key").and_then(Value::as_str).unwrap_or_default().to_owned(),
                currency: s.get("currency").and_then(Value::as_str)?.to_owned(),
                amount: int("amount")?,
                window_total,
                limit,
                remaining: limit.saturating_sub(window_total),
                shadow: rule.get("shadow").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EventId;
    use crate::store::{EventStatus, NewEvent};
    use serde_json::json;

    fn event(data: &str) -> StoredEvent {
        let now = Utc::now();
        StoredEvent {
            event: NewEvent {
                id: EventId::generate(),
                namespace: "payments".into(),
                source: "shop".into(),
                external_id: "r-1".into(),
                event_type: "refund.requested".into(),
                subject: Some("order-1".into()),
                time: None,
                data: data.to_owned(),
                content_type: "application/json".into(),
                attributes: Default::default(),
                ingested_by: "shop".into(),
                trace_id: "0".repeat(32),
                received_at: now,
                deliveries: Vec::new(),
                dedup_window: None,
            },
            status: EventStatus::Accepted,
        }
    }

    #[test]
    fn small_data_is_shown_inline_byte_for_byte() {
        let data = r#"{"amount_cents": 25000,  "note":"é"}"#;
        let shown = EventShown::of(&event(data));
        assert_eq!(shown.data.as_ref().map(|d| d.get()), Some(data));
        assert_eq!((shown.data_bytes, shown.data_truncated, shown.data_note), (data.len(), false, None));
    }

    #[test]
    fn data_over_the_inline_limit_is_cut_on_a_character_boundary_with_a_note() {
        // Three-byte characters, so the limit falls inside one.
        let data = format!("\"{}\"", "€".repeat(30_000));
        let shown = EventShown::of(&event(&data));
        let preview = shown.data_preview.unwrap();
        assert!(shown.data.is_none() && shown.data_truncated);
        assert!(preview.len() <= INLINE_DATA_BYTES && preview.len() > INLINE_DATA_BYTES - 4, "{}", preview.len());
        assert!(data.starts_with(&preview));
        let note = shown.data_note.unwrap();
        assert!(note.contains(&format!("data is {} bytes", data.len())) && note.contains("cut"), "{note}");
    }

    #[test]
    fn data_of_exactly_the_limit_is_still_inline() {
        let data = format!("\"{}\"", "x".repeat(INLINE_DATA_BYTES - 2));
        let shown = EventShown::of(&event(&data));
        assert!(shown.data.is_some() && !shown.data_truncated);
    }

    #[test]
    fn progress_counts_grants_towards_the_quorum() {
        let vote = |voter: &str, vote: &str| VoteRecord {
            voter: voter.into(),
            vote: vote.into(),
            reason: "r".into(),
            created_at: Utc::now(),
        };
        assert_eq!(Progress::of(&[], 2), Progress { grants: 0, denials: 0, quorum: 2, needed: 2 });
        let votes = [vote("a", "grant"), vote("b", "grant"), vote("c", "deny")];
        assert_eq!(Progress::of(&votes, 2), Progress { grants: 2, denials: 1, quorum: 2, needed: 0 });
    }

    #[test]
    fn spend_figures_come_from_the_stored_decision_or_its_evaluation() {
        let held = json!({"outcome": "hold", "rules": [
            {"rule": "cap", "shadow": false, "spend": {"rule": "cap", "key": "agent", "currency": "USD", "amount": 25000, "window_total": 5000, "limit": 20000}},
            {"rule": "other", "shadow": true}
        ]});
        let expected = SpendShown {
            rule: "cap".into(),
            key: "agent".into(),
            currency: "USD".into(),
            amount: 25000,
            window_total: 5000,
            limit: 20000,
            remaining: 15000,
            shadow: false,
        };
        assert_eq!(spend_of(&held), std::slice::from_ref(&expected));
        let granted = json!({"outcome": "allow", "reason": "granted by approvers", "evaluated": held});
        assert_eq!(spend_of(&granted), [expected]);
        assert!(spend_of(&json!({"outcome": "deny", "reason": "spend budget contention"})).is_empty());
    }
}
