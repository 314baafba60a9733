//! Deliveries: their states, what a claim hands out, attempts and completions, and the
//! rows they are read from (written once for both backends, as are their conversions).
//!
//! The use cases live beside, by what they do: [`super::queue`] (claims of every endpoint,
//! releases, parking, replay), [`super::claims`] (the dispatcher's claims),
//! [`super::completions`] (attempt results), [`super::endpoint_state`] (health, enabling)
//! and [`super::delivery_reads`] (the API's and the metrics' reads).
//!
//! Invariants:
//! - a delivery is claimed by one worker at a time: PostgreSQL claims with
//!   `FOR UPDATE SKIP LOCKED`; SQLite serializes writers on its one write connection;
//! - a completion applies only if it carries the current lease token (one row or none);
//!   a lost lease drops the result, never overwrites a newer one;
//! - in an ordered lane, a delivery is claimable only when no earlier delivery of the
//!   lane is still pending, retrying, delivering or held: it is the lane's head, and the
//!   others carry `lane_behind` (kept by [`super::lanes`]), so claims never read them;
//! - claims take due deliveries in due order, then id (oldest first); the dispatcher's
//!   claims take at most each endpoint's free slots (see [`super::claims`]);
//! - nothing is claimed for an endpoint whose breaker is open or that was disabled; its
//!   waiting deliveries are parked (due later) meanwhile, so claims need not walk past them;
//! - a batch of completions is one transaction of set-sized statements on PostgreSQL.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::StoreError;
/// Where a delivery is in its life: a domain type, stored as its name.
pub use crate::delivery::state::DeliveryState;
use crate::ids::{DeliveryId, EventId};
use crate::operational::OperationalEvent;

/// A delivery created by fan-out, in the ingest transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDelivery {
    pub id: DeliveryId,
    pub endpoint: String,
    pub ordering_key: Option<String>,
}

/// A claimed delivery with what dispatch needs of its event.
#[derive(Clone, Debug)]
pub struct ClaimedDelivery {
    pub id: DeliveryId,
    /// Attempts made before the last replay (the budget counts from here).
    pub attempt_base: u32,
    pub event_id: EventId,
    pub namespace: String,
    pub endpoint: String,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
    pub lease_token: String,
    pub event_type: String,
    pub data: String,
    /// The event's `datacontenttype`.
    pub content_type: String,
    /// The client's CloudEvents `id` of the event (see [`super::NewEvent::external_id`]).
    pub external_id: String,
    /// The event's other CloudEvents attributes (see [`super::NewEvent::attributes`]).
    pub attributes: super::Attributes,
    pub event_time: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub trace_id: String,
    pub source: String,
    pub subject: Option<String>,
    /// Who ingested the event (it may not approve its own hold).
    pub ingested_by: String,
    /// Granted by approvers: sent without passing the gate again.
    pub approved: bool,
    /// In an ordered lane: its end may unblock the next delivery of the lane.
    pub ordered: bool,
    /// When it was due: given back unattempted, it keeps its place in the queue.
    pub due_at: DateTime<Utc>,
    /// This claim holds its endpoint's half-open probe (shared by every process).
    pub probe: bool,
}

/// One recorded attempt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attempt {
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub status: Option<u16>,
    pub response: Option<String>,
    pub error: Option<String>,
    /// `delivered`, `retry`, `failed` or `dead`.
    pub outcome: String,
}

/// The result of one attempt, to be written if the lease is still ours.
#[derive(Clone, Debug)]
pub struct Completion {
    pub id: DeliveryId,
    /// The delivery's event (for `hookwarden.delivery.dead`).
    pub event_id: EventId,
    pub lease_token: String,
    pub namespace: String,
    pub endpoint: String,
    pub state: DeliveryState,
    pub next_attempt_at: DateTime<Utc>,
    pub attempt: Attempt,
    /// How the attempt counts for the endpoint's health: a success, a failure, or (for a
    /// delivery ended without a request) not at all.
    pub success: Option<bool>,
    /// `(failures that open the breaker, until when it then stays open)`.
    pub breaker: Option<(u32, DateTime<Utc>)>,
    /// Disable the endpoint (it answered 410 Gone), at this generation.
    pub disable: Option<(String, i64)>,
    /// The policy decision, when this completion records one (a denial).
    pub decision: Option<String>,
    /// Whether the delivery may hold spend reservations to settle (agent endpoints): plain
    /// deliveries skip that statement.
    pub settle_spend: bool,
    /// In an ordered lane (see [`ClaimedDelivery::ordered`]).
    pub ordered: bool,
    /// Record a final outcome in the audit chain (see `audit.deliveryOutcomes`).
    pub audit_outcome: bool,
    /// A delivery of an operational event: what it does to its endpoint (a breaker
    /// opened, its death) and what it tells itself (`tells`, a denial for spend) are not
    /// written as operational events, so that they cannot loop (see [`crate::operational`]).
    pub operational: bool,
    /// The consecutive failures at which the endpoint is told `hookwarden.endpoint.failing`
    /// (see [`crate::operational::failing_at`]); with `breaker`.
    pub failing_at: Option<u32>,
    /// When the endpoint's dead letters are told `hookwarden.dead_letters.threshold`.
    pub dead_letters: Option<DeadLetterAlert>,
    /// Operational events the attempt itself tells (a denial for spend), written with the
    /// completion when it applies.
    pub tells: Vec<OperationalEvent>,
}

/// `hookwarden.dead_letters.threshold` is told when an endpoint's deliveries that ended
/// dead within the last `window` reach `count` (once per crossing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetterAlert {
    pub count: u32,
    pub window: std::time::Duration,
}

/// A delivery as shown.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryRecord {
    pub id: DeliveryId,
    pub event_id: EventId,
    pub namespace: String,
    pub endpoint: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub ordering_key: Option<String>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The policy gate's decision (agent endpoints), with its explanation.
    pub decision: Option<serde_json::Value>,
}

/// Filters of `list_deliveries`; newest first.
#[derive(Clone, Debug, Default)]
pub struct DeliveryQuery {
    pub namespace: String,
    pub endpoint: Option<String>,
    pub state: Option<DeliveryState>,
    pub before: Option<DeliveryId>,
    /// Only deliveries created at or after this time.
    pub created_since: Option<DateTime<Utc>>,
    /// Only deliveries created before this time.
    pub created_until: Option<DateTime<Utc>>,
    pub limit: u32,
}

/// What writing a batch of completions did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompletionReport {
    /// Completions dropped because their lease had expired and another worker owns them.
    pub lost: u64,
    /// An endpoint's breaker opened or a 410 disabled it: its status changed.
    pub endpoints_changed: bool,
    /// Spend reservations the batch committed (its deliveries were delivered).
    pub committed_spend: Vec<CommittedSpend>,
    /// Operational events the batch's transitions wrote to the outbox.
    pub operational_events: usize,
}

/// Spend that moved from reserved to committed in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedSpend {
    pub namespace: String,
    /// The agent endpoint.
    pub endpoint: String,
    pub currency: String,
    /// Minor units.
    pub amount: i64,
}

/// What the engine knows of an endpoint at run time.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EndpointState {
    pub consecutive_failures: u32,
    pub breaker_open_until: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub disabled_generation: Option<i64>,
}

/// Attempt statistics of an endpoint since some time.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AttemptStats {
    pub attempts: u64,
    pub successes: u64,
    pub durations_ms: Vec<i64>,
}

/// The columns of a [`DeliveryRow`], from `d`.
pub(super) const DELIVERY_COLUMNS: &str = "d.id, d.event_id, d.namespace, d.endpoint, d.state, d.attempts, \
     d.next_attempt_at, d.ordering_key, d.last_status, d.last_error, d.created_at, d.updated_at, d.completed_at, \
     d.decision";

/// The columns of an [`AttemptRow`], from `a`.
pub(super) const ATTEMPT_COLUMNS: &str =
    "a.attempt, a.started_at, a.duration_ms, a.status, a.response, a.error, a.outcome";

#[derive(sqlx::FromRow)]
pub(super) struct DeliveryRow {
    pub id: String,
    pub event_id: String,
    pub namespace: String,
    pub endpoint: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub ordering_key: Option<String>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub decision: Option<String>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("delivery {what}: {e}"))
}

impl TryFrom<DeliveryRow> for DeliveryRecord {
    type Error = StoreError;

    fn try_from(r: DeliveryRow) -> Result<Self, StoreError> {
        Ok(DeliveryRecord {
            id: DeliveryId::parse(&r.id).map_err(|e| corrupt("id", e))?,
            event_id: EventId::parse(&r.event_id).map_err(|e| corrupt("event id", e))?,
            namespace: r.namespace,
            endpoint: r.endpoint,
            state: DeliveryState::parse(&r.state).ok_or_else(|| corrupt("state", &r.state))?,
            attempts: r.attempts.max(0) as u32,
            next_attempt_at: r.next_attempt_at,
            ordering_key: r.ordering_key,
            last_status: r.last_status.map(|s| s as u16),
            last_error: r.last_error,
            created_at: r.created_at,
            updated_at: r.updated_at,
            completed_at: r.completed_at,
            decision: r
                .decision
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| corrupt("decision", e))?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ClaimRow {
    pub id: String,
    pub event_id: String,
    pub namespace: String,
    pub endpoint: String,
    pub attempts: i32,
    pub attempt_base: i32,
    pub event_type: String,
    pub data: String,
    pub content_type: String,
    pub external_id: String,
    pub attributes: Option<String>,
    pub event_time: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub trace_id: String,
    pub source: String,
    pub subject: Option<String>,
    pub ingested_by: String,
    pub approved: bool,
    pub ordered: bool,
    pub due_at: DateTime<Utc>,
    pub probe: bool,
}

impl ClaimRow {
    pub(super) fn into_claimed(self, lease_token: &str) -> Result<ClaimedDelivery, StoreError> {
        Ok(ClaimedDelivery {
            id: DeliveryId::parse(&self.id).map_err(|e| corrupt("id", e))?,
            event_id: EventId::parse(&self.event_id).map_err(|e| corrupt("event id", e))?,
            namespace: self.namespace,
            endpoint: self.endpoint,
            attempt: self.attempts.max(1) as u32,
            attempt_base: self.attempt_base.max(0) as u32,
            lease_token: lease_token.to_owned(),
            event_type: self.event_type,
            data: self.data,
            content_type: self.content_type,
            external_id: self.external_id,
            attributes: super::attributes_of_column(self.attributes.as_deref())?,
            event_time: self.event_time,
            received_at: self.received_at,
            trace_id: self.trace_id,
            source: self.source,
            subject: self.subject,
            ingested_by: self.ingested_by,
            approved: self.approved,
            ordered: self.ordered,
            due_at: self.due_at,
            probe: self.probe,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AttemptRow {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub status: Option<i32>,
    pub response: Option<String>,
    pub error: Option<String>,
    pub outcome: String,
}

impl From<AttemptRow> for Attempt {
    fn from(r: AttemptRow) -> Self {
        Attempt {
            attempt: r.attempt.max(0) as u32,
            started_at: r.started_at,
            duration_ms: r.duration_ms,
            status: r.status.map(|s| s as u16),
            response: r.response,
            error: r.error,
            outcome: r.outcome,
        }
    }
}

/// Endpoints that nothing is sent to now. A disabled endpoint counts as disabled only,
/// whatever its breaker says, as its health does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedEndpoints {
    pub breakers_open: i64,
    pub disabled: i64,
}

/// What a claim returns of each delivery and its event, from `d` (the claimed
/// deliveries) joined with `e` (their events).
pub(super) const CLAIMED_COLUMNS: &str = "d.id, d.event_id, d.namespace, d.endpoint, d.attempts, d.attempt_base, \
     e.type AS event_type, e.data, e.content_type, e.external_id, e.attributes, e.time AS event_time, e.received_at, \
     e.trace_id, e.source, e.subject, e.ingested_by, \
     d.approved, d.ordering_key IS NOT NULL AS ordered, d.next_attempt_at AS due_at";
