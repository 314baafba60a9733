//! The delivery queue: claims with leases, guarded completions, attempts, endpoint state.
//!
//! SQL is written once with `?` placeholders and expanded per backend by
//! [`delivery_methods!`], like the resource methods; the few statements whose best shape
//! differs per backend (claims, completion writes) live with each backend.
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

use super::sql::Tx;
use super::{PgStore, SqliteStore, StoreError};
use crate::ids::{DeliveryId, EventId};

/// States of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Delivering,
    Retrying,
    Delivered,
    Failed,
    Dead,
    Held,
    Denied,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 8] = [
        DeliveryState::Pending,
        DeliveryState::Delivering,
        DeliveryState::Retrying,
        DeliveryState::Delivered,
        DeliveryState::Failed,
        DeliveryState::Dead,
        DeliveryState::Held,
        DeliveryState::Denied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivering => "delivering",
            DeliveryState::Retrying => "retrying",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Dead => "dead",
            DeliveryState::Held => "held",
            DeliveryState::Denied => "denied",
        }
    }

    pub fn parse(raw: &str) -> Option<DeliveryState> {
        DeliveryState::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// Final states: nothing more happens unless an operator replays.
    pub fn is_final(self) -> bool {
        matches!(self, DeliveryState::Delivered | DeliveryState::Failed | DeliveryState::Dead | DeliveryState::Denied)
    }
}

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

/// What a batch of completions does to one endpoint's health, folded in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HealthDelta<'a> {
    pub namespace: &'a str,
    pub endpoint: &'a str,
    /// A success was among the attempts: the failure count restarts after it.
    pub reset: bool,
    /// Failures after the last success (all of them when there was none).
    pub failures: i32,
    /// Failures that open the breaker (`i64::MAX` without a breaker), and until when it
    /// then stays open: of the batch's last attempt that had a breaker.
    pub threshold: i64,
    pub open_until: Option<DateTime<Utc>>,
}

/// One [`HealthDelta`] per endpoint that attempts were made at, sorted by endpoint (the
/// order in which writers lock endpoint state). Completions that sent nothing (`success`
/// is `None`) leave health alone.
pub(super) fn health_deltas<'a>(completions: &[&'a Completion]) -> Vec<HealthDelta<'a>> {
    let mut deltas: std::collections::BTreeMap<(&str, &str), HealthDelta<'a>> = std::collections::BTreeMap::new();
    for c in completions {
        let Some(success) = c.success else { continue };
        let delta = deltas.entry((&c.namespace, &c.endpoint)).or_insert_with(|| HealthDelta {
            namespace: &c.namespace,
            endpoint: &c.endpoint,
            reset: false,
            failures: 0,
            threshold: i64::MAX,
            open_until: None,
        });
        if success {
            delta.reset = true;
            delta.failures = 0;
        } else {
            delta.failures = delta.failures.saturating_add(1);
            if let Some((threshold, until)) = c.breaker {
                delta.threshold = i64::from(threshold);
                delta.open_until = Some(until);
            }
        }
    }
    deltas.into_values().collect()
}

/// The audit records a written completion carries: its policy decision, its final
/// outcome (when audited), and the endpoint's disabling.
pub(super) fn completion_audit_records(c: &Completion) -> Vec<crate::audit::NewAuditRecord> {
    use crate::audit::NewAuditRecord;
    let subject = format!("delivery/{}", c.id);
    let mut records = Vec::new();
    if let Some(decision) = &c.decision {
        records.push(NewAuditRecord::new(
            "system",
            "policy.decision",
            &c.namespace,
            subject.clone(),
            serde_json::from_str(decision).unwrap_or_else(|_| serde_json::Value::String(decision.clone())),
        ));
    }
    if c.state.is_final() && c.audit_outcome {
        records.push(NewAuditRecord::new(
            "system",
            &format!("delivery.{}", c.state.as_str()),
            &c.namespace,
            subject,
            serde_json::json!({"endpoint": c.endpoint, "attempt": c.attempt.attempt, "status": c.attempt.status,
                "error": c.attempt.error}),
        ));
    }
    if let Some((reason, generation)) = &c.disable {
        records.push(NewAuditRecord::new(
            "system",
            "endpoint.disabled",
            &c.namespace,
            format!("Endpoint/{}/{}", c.namespace, c.endpoint),
            serde_json::json!({"reason": reason, "generation": generation}),
        ));
    }
    records
}

/// The claim of every endpoint's deliveries (see [`super::claims`] for the dispatcher's):
/// due deliveries not waiting behind an earlier one of their lane, nor blocked by an open
/// breaker or a disabled endpoint, oldest due first. PostgreSQL appends `FOR UPDATE SKIP
/// LOCKED`.
pub(super) fn claimable() -> String {
    "SELECT c.id FROM deliveries c \
     WHERE c.state IN ('pending', 'retrying') AND NOT c.lane_behind AND c.next_attempt_at <= ? \
     AND NOT EXISTS (SELECT 1 FROM endpoint_state s WHERE s.namespace = c.namespace AND s.name = c.endpoint \
          AND (s.disabled_reason IS NOT NULL OR s.breaker_open_until > ?)) \
     ORDER BY c.next_attempt_at, c.id LIMIT ?"
        .to_owned()
}

/// Endpoints that nothing is sent to now. A disabled endpoint counts as disabled only,
/// whatever its breaker says, as its health does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedEndpoints {
    pub breakers_open: i64,
    pub disabled: i64,
}

/// How far ahead a disabled endpoint's deliveries are parked; re-enabling it makes them
/// due at once, in the same transaction.
const DISABLED_PARK: chrono::Duration = chrono::Duration::hours(1);

/// Until when the waiting deliveries of an endpoint that was just disabled are parked.
pub(super) fn disabled_until(now: DateTime<Utc>) -> DateTime<Utc> {
    now + DISABLED_PARK
}

/// What a claim returns of each delivery and its event, from `d` (the claimed
/// deliveries) joined with `e` (their events).
pub(super) const CLAIMED_COLUMNS: &str = "d.id, d.event_id, d.namespace, d.endpoint, d.attempts, d.attempt_base, \
     e.type AS event_type, e.data, e.time AS event_time, e.received_at, e.trace_id, e.source, e.subject, e.ingested_by, \
     d.approved, d.ordering_key IS NOT NULL AS ordered, d.next_attempt_at AS due_at";

/// See the backends' `resume_in`.
pub(super) async fn resume_in(
    tx: &mut Tx,
    namespace: &str,
    endpoint: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    match tx {
        Tx::Pg(tx) => PgStore::resume_in(tx, namespace, endpoint, now).await,
        Tx::Sqlite(tx) => SqliteStore::resume_in(tx, namespace, endpoint, now).await,
    }
}

/// See the backends' `enable_in`.
pub(super) async fn enable_in(
    tx: &mut Tx,
    namespace: &str,
    endpoint: &str,
    older_than: Option<i64>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    match tx {
        Tx::Pg(tx) => PgStore::enable_in(tx, namespace, endpoint, older_than, now).await,
        Tx::Sqlite(tx) => SqliteStore::enable_in(tx, namespace, endpoint, older_than, now).await,
    }
}

/// Expands the delivery methods for one backend. Each backend supplies the statements
/// whose best shape differs: `claim_rows`, `write_completions_in` and `settle_spend_in`.
macro_rules! delivery_methods {
    ($store:ty, $sql:path) => {
        impl $store {
            pub(super) async fn claim_due_deliveries(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                lease: std::time::Duration,
                limit: u32,
            ) -> Result<Vec<$crate::store::deliveries::ClaimedDelivery>, $crate::store::StoreError> {
                let token = ulid::Ulid::new().to_string();
                let lease_until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
                let rows = self.claim_rows(&token, lease_until, now, limit).await?;
                rows.into_iter().map(|r| r.into_claimed(&token)).collect()
            }

            /// Moves the due deliveries of endpoints whose breaker is open to the end of the
            /// open period, and those of disabled endpoints an hour ahead; returns how many
            /// moved. The completion that opens a breaker or disables does this too; this
            /// catches deliveries fanned out to the endpoint since.
            pub(super) async fn park_blocked_deliveries(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                let blocked: Vec<(String, String, Option<chrono::DateTime<chrono::Utc>>, bool)> = sqlx::query_as(&$sql(
                    "SELECT namespace, name, breaker_open_until, disabled_reason IS NOT NULL FROM endpoint_state \
                     WHERE breaker_open_until > ? OR disabled_reason IS NOT NULL",
                ))
                .bind(now)
                .fetch_all(self.read_pool())
                .await?;
                let mut parked = 0;
                let mut tx = self.begin_write().await?;
                for (namespace, endpoint, open_until, disabled) in blocked {
                    let until = match open_until {
                        _ if disabled => $crate::store::deliveries::disabled_until(now),
                        Some(until) => until,
                        None => continue,
                    };
                    parked += Self::park_in(&mut tx, &namespace, &endpoint, until).await?;
                }
                tx.commit().await?;
                Ok(parked)
            }

            /// Parks an endpoint's waiting deliveries until `until`, when it may be sent to
            /// again (its breaker closes; it was disabled), so that claims do not walk past
            /// them in the due index meanwhile. Returns how many moved.
            pub(super) async fn park_in(
                tx: &mut sqlx::Transaction<'static, <$store as $crate::store::sql::HasDatabase>::Db>,
                namespace: &str,
                endpoint: &str,
                until: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                Ok(sqlx::query(&$sql(
                    "UPDATE deliveries SET next_attempt_at = ? WHERE namespace = ? AND endpoint = ? \
                     AND state IN ('pending', 'retrying') AND next_attempt_at < ?",
                ))
                .bind(until)
                .bind(namespace)
                .bind(endpoint)
                .bind(until)
                .execute(&mut **tx)
                .await?
                .rows_affected())
            }

            /// Makes an endpoint's waiting deliveries due (its pause was lifted, or it was
            /// re-enabled), parked ones and later retries alike: those never attempted at
            /// their place in the queue (due when they were created, before what came
            /// since), retries `now`.
            pub(super) async fn resume_in(
                tx: &mut sqlx::Transaction<'static, <$store as $crate::store::sql::HasDatabase>::Db>,
                namespace: &str,
                endpoint: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                Ok(sqlx::query(&$sql(
                    "UPDATE deliveries SET next_attempt_at = CASE WHEN attempts = 0 THEN created_at ELSE ? END \
                     WHERE namespace = ? AND endpoint = ? AND state IN ('pending', 'retrying') AND next_attempt_at > ?",
                ))
                .bind(now)
                .bind(namespace)
                .bind(endpoint)
                .bind(now)
                .execute(&mut **tx)
                .await?
                .rows_affected())
            }

            /// Makes deliveries whose lease ran out (a crashed worker) claimable again.
            pub(super) async fn release_expired_leases(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                let released = sqlx::query(&$sql(
                    // Due as when it was claimed: it keeps its place in the queue.
                    "UPDATE deliveries SET state = 'retrying', lease_token = NULL, lease_until = NULL, \
                     updated_at = ? WHERE state = 'delivering' AND lease_until < ?",
                ))
                .bind(now)
                .bind(now)
                .execute(self.write_pool())
                .await?
                .rows_affected();
                Ok(released)
            }

            /// Gives claimed deliveries back without an attempt (shutdown, a paused or busy
            /// endpoint), due again at `at`.
            pub(super) async fn release_deliveries(
                &self,
                claims: &[(&$crate::ids::DeliveryId, &str)],
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let mut released = 0;
                for (id, token) in claims {
                    released += sqlx::query(&$sql(
                        "UPDATE deliveries SET state = CASE WHEN attempts <= 1 THEN 'pending' ELSE 'retrying' END, \
                         attempts = attempts - 1, lease_token = NULL, lease_until = NULL, next_attempt_at = ?, updated_at = ? \
                         WHERE id = ? AND lease_token = ?",
                    ))
                    .bind(at)
                    .bind(chrono::Utc::now())
                    .bind(id.as_str())
                    .bind(*token)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                // A half-open probe among them goes back too: the next claim may probe.
                Self::release_probes_in(&mut tx, claims).await?;
                tx.commit().await?;
                Ok(released)
            }

            /// Writes attempt results whose lease is still held; says how many leases were
            /// lost and whether an endpoint's breaker opened or it was disabled.
            ///
            /// One transaction of set-sized statements per batch, whatever its size: the
            /// deliveries and their attempts, spend reservations, one health update per
            /// endpoint, and the audit records. Locks are taken in one order (deliveries,
            /// endpoint state sorted by name, spend, audit chains sorted), so concurrent
            /// writers cannot deadlock.
            pub(super) async fn complete_attempts(
                &self,
                completions: &[$crate::store::deliveries::Completion],
            ) -> Result<$crate::store::deliveries::CompletionReport, $crate::store::StoreError> {
                use $crate::store::deliveries::{completion_audit_records, health_deltas, CompletionReport};
                let now = chrono::Utc::now();
                let mut tx = self.begin_write().await?;
                let applied = Self::write_completions_in(&mut tx, completions, now).await?;
                let kept: Vec<&$crate::store::deliveries::Completion> =
                    completions.iter().zip(&applied).filter(|(_, applied)| **applied).map(|(c, _)| c).collect();
                let lost = (completions.len() - kept.len()) as u64;
                let mut report = CompletionReport { lost, ..CompletionReport::default() };
                if kept.is_empty() {
                    tx.commit().await?;
                    return Ok(report);
                }
                let settled: Vec<(&str, &'static str)> = kept
                    .iter()
                    .filter(|c| c.settle_spend)
                    .filter_map(|c| $crate::store::policy::ledger_state_for(c.state).map(|s| (c.id.as_str(), s)))
                    .collect();
                if !settled.is_empty() {
                    for (id, currency, amount) in Self::settle_spend_in(&mut tx, &settled).await? {
                        if let Some(c) = kept.iter().find(|c| c.id.as_str() == id) {
                            report.committed_spend.push($crate::store::deliveries::CommittedSpend {
                                namespace: c.namespace.clone(),
                                endpoint: c.endpoint.clone(),
                                currency,
                                amount,
                            });
                        }
                    }
                }
                for delta in health_deltas(&kept) {
                    let open_until: Option<chrono::DateTime<chrono::Utc>> =
                    // The batch's attempts at one endpoint, folded: a success restarts the
                    // count from the failures after it; the breaker opens when the count
                    // reaches the threshold.
                        sqlx::query_scalar(&$sql(
                        "INSERT INTO endpoint_state (namespace, name, consecutive_failures, breaker_open_until, last_success_at) \
                         VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, name) DO UPDATE SET \
                         consecutive_failures = CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.consecutive_failures \
                             ELSE endpoint_state.consecutive_failures + excluded.consecutive_failures END, \
                         breaker_open_until = CASE WHEN (CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.consecutive_failures \
                             ELSE endpoint_state.consecutive_failures + excluded.consecutive_failures END) >= ? THEN ? \
                             WHEN excluded.last_success_at IS NOT NULL THEN NULL ELSE endpoint_state.breaker_open_until END, \
                         last_success_at = COALESCE(excluded.last_success_at, endpoint_state.last_success_at) \
                         RETURNING breaker_open_until",
                    ))
                    .bind(delta.namespace)
                    .bind(delta.endpoint)
                    .bind(delta.failures)
                    .bind(delta.open_until.filter(|_| i64::from(delta.failures) >= delta.threshold))
                    .bind(delta.reset.then_some(now))
                    .bind(delta.threshold)
                    .bind(delta.open_until)
                    .fetch_one(&mut *tx)
                    .await?;
                    if let Some(until) = open_until.filter(|until| *until > now) {
                        Self::park_in(&mut tx, delta.namespace, delta.endpoint, until).await?;
                        report.endpoints_changed = true;
                    }
                }
                // Half-open probes end with their attempt (its endpoint state is locked above).
                // Only endpoints with a breaker have probes; an attempt at one says so.
                let tokens: Vec<(&$crate::ids::DeliveryId, &str)> = kept
                    .iter()
                    .filter(|c| c.breaker.is_some() || c.success.is_none())
                    .map(|c| (&c.id, c.lease_token.as_str()))
                    .collect();
                Self::release_probes_in(&mut tx, &tokens).await?;
                for c in &kept {
                    if let Some((reason, generation)) = &c.disable {
                        sqlx::query(&$sql(
                            "UPDATE endpoint_state SET disabled_reason = ?, disabled_generation = ? WHERE namespace = ? AND name = ?",
                        ))
                        .bind(reason)
                        .bind(generation)
                        .bind(&c.namespace)
                        .bind(&c.endpoint)
                        .execute(&mut *tx)
                        .await?;
                        let until = $crate::store::deliveries::disabled_until(now);
                        Self::park_in(&mut tx, &c.namespace, &c.endpoint, until).await?;
                        report.endpoints_changed = true;
                    }
                }
                let records: Vec<$crate::audit::NewAuditRecord> =
                    kept.iter().flat_map(|c| completion_audit_records(c)).collect();
                if !records.is_empty() {
                    Self::append_audit_in(&mut tx, &records).await?;
                }
                // Last, after the audit appends (the lock order of `super::lanes`).
                let ended: Vec<&str> = kept.iter().filter(|c| c.ordered && c.state.is_final()).map(|c| c.id.as_str()).collect();
                Self::end_lane_heads_in(&mut tx, &ended).await?;
                tx.commit().await?;
                Ok(report)
            }

            pub(super) async fn get_delivery(
                &self,
                id: &$crate::ids::DeliveryId,
            ) -> Result<Option<($crate::store::deliveries::DeliveryRecord, Vec<$crate::store::deliveries::Attempt>)>, $crate::store::StoreError> {
                use $crate::store::deliveries::{AttemptRow, DeliveryRecord, DeliveryRow};
                let row: Option<DeliveryRow> = sqlx::query_as(&$sql(
                    "SELECT id, event_id, namespace, endpoint, state, attempts, next_attempt_at, ordering_key, last_status, \
                     last_error, created_at, updated_at, completed_at, decision FROM deliveries WHERE id = ?",
                ))
                .bind(id.as_str())
                .fetch_optional(self.read_pool())
                .await?;
                let Some(row) = row else { return Ok(None) };
                let attempts: Vec<AttemptRow> = sqlx::query_as(&$sql(
                    "SELECT attempt, started_at, duration_ms, status, response, error, outcome FROM delivery_attempts \
                     WHERE delivery_id = ? ORDER BY attempt",
                ))
                .bind(id.as_str())
                .fetch_all(self.read_pool())
                .await?;
                Ok(Some((DeliveryRecord::try_from(row)?, attempts.into_iter().map(Into::into).collect())))
            }

            pub(super) async fn deliveries_of_event(
                &self,
                event: &$crate::ids::EventId,
            ) -> Result<Vec<$crate::store::deliveries::DeliveryRecord>, $crate::store::StoreError> {
                use $crate::store::deliveries::{DeliveryRecord, DeliveryRow};
                let rows: Vec<DeliveryRow> = sqlx::query_as(&$sql(
                    "SELECT id, event_id, namespace, endpoint, state, attempts, next_attempt_at, ordering_key, last_status, \
                     last_error, created_at, updated_at, completed_at, decision FROM deliveries WHERE event_id = ? ORDER BY id",
                ))
                .bind(event.as_str())
                .fetch_all(self.read_pool())
                .await?;
                rows.into_iter().map(DeliveryRecord::try_from).collect()
            }

            pub(super) async fn list_deliveries(
                &self,
                q: &$crate::store::deliveries::DeliveryQuery,
            ) -> Result<Vec<$crate::store::deliveries::DeliveryRecord>, $crate::store::StoreError> {
                use $crate::store::deliveries::{DeliveryRecord, DeliveryRow};
                let rows: Vec<DeliveryRow> = sqlx::query_as(&$sql(
                    "SELECT id, event_id, namespace, endpoint, state, attempts, next_attempt_at, ordering_key, last_status, \
                     last_error, created_at, updated_at, completed_at, decision FROM deliveries WHERE namespace = ? \
                     AND (? IS NULL OR endpoint = ?) AND (? IS NULL OR state = ?) AND (? IS NULL OR id < ?) \
                     AND (? IS NULL OR created_at >= ?) AND (? IS NULL OR created_at < ?) ORDER BY id DESC LIMIT ?",
                ))
                .bind(&q.namespace)
                .bind(&q.endpoint)
                .bind(&q.endpoint)
                .bind(q.state.map(|s| s.as_str()))
                .bind(q.state.map(|s| s.as_str()))
                .bind(q.before.as_ref().map(|b| b.as_str()))
                .bind(q.before.as_ref().map(|b| b.as_str()))
                .bind(q.created_since)
                .bind(q.created_since)
                .bind(q.created_until)
                .bind(q.created_until)
                .bind(i64::from(q.limit))
                .fetch_all(self.read_pool())
                .await?;
                rows.into_iter().map(DeliveryRecord::try_from).collect()
            }

            /// Puts final deliveries back in the queue, due now; returns the ids replayed.
            /// Deliveries not in a final state are left alone.
            pub(super) async fn replay_deliveries(
                &self,
                ids: &[$crate::ids::DeliveryId],
                actor: &str,
            ) -> Result<Vec<$crate::ids::DeliveryId>, $crate::store::StoreError> {
                let now = chrono::Utc::now();
                let mut tx = self.begin_write().await?;
                let mut replayed = Vec::new();
                for id in ids {
                    let updated = sqlx::query(&$sql(
                        "UPDATE deliveries SET state = 'pending', attempt_base = attempts, next_attempt_at = ?, \
                         last_error = NULL, completed_at = NULL, updated_at = ?, approved = FALSE \
                         WHERE id = ? AND state IN ('delivered', 'failed', 'dead', 'denied')",
                    ))
                    .bind(now)
                    .bind(now)
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if updated == 1 {
                        let namespace: String = sqlx::query_scalar(&$sql("SELECT namespace FROM deliveries WHERE id = ?"))
                            .bind(id.as_str())
                            .fetch_one(&mut *tx)
                            .await?;
                        let record = $crate::audit::NewAuditRecord::new(actor, "delivery.replayed", &namespace, format!("delivery/{id}"), serde_json::json!({}));
                        Self::append_audit_in(&mut tx, &[record]).await?;
                        replayed.push(id.clone());
                    }
                }
                let reopened: Vec<&str> = replayed.iter().map(|id| id.as_str()).collect();
                Self::reopen_lanes_in(&mut tx, &reopened).await?;
                tx.commit().await?;
                Ok(replayed)
            }

            pub(super) async fn endpoint_state(
                &self,
                namespace: &str,
                name: &str,
            ) -> Result<$crate::store::deliveries::EndpointState, $crate::store::StoreError> {
                let row: Option<(i32, Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>, Option<String>, Option<i64>)> =
                    sqlx::query_as(&$sql(
                        "SELECT consecutive_failures, breaker_open_until, last_success_at, disabled_reason, disabled_generation \
                         FROM endpoint_state WHERE namespace = ? AND name = ?",
                    ))
                    .bind(namespace)
                    .bind(name)
                    .fetch_optional(self.read_pool())
                    .await?;
                Ok(row
                    .map(|(failures, open_until, last_success, reason, generation)| $crate::store::deliveries::EndpointState {
                        consecutive_failures: failures.max(0) as u32,
                        breaker_open_until: open_until,
                        last_success_at: last_success,
                        disabled_reason: reason,
                        disabled_generation: generation,
                    })
                    .unwrap_or_default())
            }

            /// Enables an endpoint again and makes its waiting deliveries due `now`. With
            /// `older_than` (an apply that changed its spec), only an endpoint a 410 disabled
            /// at an older generation; without it (an operator's explicit enable), also an
            /// open breaker and a run of failures are cleared. True when anything changed.
            pub(super) async fn enable_in(
                tx: &mut sqlx::Transaction<'static, <$store as $crate::store::sql::HasDatabase>::Db>,
                namespace: &str,
                endpoint: &str,
                older_than: Option<i64>,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                let clear = "UPDATE endpoint_state SET disabled_reason = NULL, disabled_generation = NULL, \
                     consecutive_failures = 0, breaker_open_until = NULL WHERE namespace = ? AND name = ? AND ";
                let updated = match older_than {
                    Some(generation) => {
                        sqlx::query(&$sql(&format!("{clear}disabled_generation < ?")))
                            .bind(namespace)
                            .bind(endpoint)
                            .bind(generation)
                            .execute(&mut **tx)
                            .await?
                    }
                    None => {
                        sqlx::query(&$sql(&format!(
                            "{clear}(disabled_reason IS NOT NULL OR breaker_open_until IS NOT NULL OR consecutive_failures > 0)"
                        )))
                        .bind(namespace)
                        .bind(endpoint)
                        .execute(&mut **tx)
                        .await?
                    }
                }
                .rows_affected();
                if updated == 1 {
                    // What waited while it was disabled (or its breaker open) goes out now.
                    Self::resume_in(tx, namespace, endpoint, now).await?;
                }
                Ok(updated == 1)
            }

            /// An operator's explicit enable (audited as `actor`): see [`Self::enable_in`].
            /// Returns the state it was in before, when it was not sendable.
            pub(super) async fn enable_endpoint(
                &self,
                namespace: &str,
                name: &str,
                actor: &str,
            ) -> Result<Option<$crate::store::deliveries::EndpointState>, $crate::store::StoreError> {
                let now = chrono::Utc::now();
                let before = self.endpoint_state(namespace, name).await?;
                let mut tx = self.begin_write().await?;
                if !Self::enable_in(&mut tx, namespace, name, None, now).await? {
                    tx.rollback().await?;
                    return Ok(None);
                }
                let record = $crate::audit::NewAuditRecord::new(
                    actor,
                    "endpoint.enabled",
                    namespace,
                    format!("Endpoint/{namespace}/{name}"),
                    serde_json::json!({"reason": "enabled by an operator", "disabledReason": before.disabled_reason,
                        "breakerOpenUntil": before.breaker_open_until, "consecutiveFailures": before.consecutive_failures}),
                );
                Self::append_audit_in(&mut tx, &[record]).await?;
                tx.commit().await?;
                Ok(Some(before))
            }

            /// Makes an endpoint's waiting deliveries due now (it became sendable again in
            /// this process, e.g. its secret can be read now); returns how many.
            pub(super) async fn resume_endpoint(&self, namespace: &str, name: &str) -> Result<u64, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let resumed = Self::resume_in(&mut tx, namespace, name, chrono::Utc::now()).await?;
                tx.commit().await?;
                Ok(resumed)
            }

            /// The run-time state of every endpoint that has any, by `(namespace, name)`.
            pub(super) async fn list_endpoint_states(
                &self,
            ) -> Result<Vec<(String, String, $crate::store::deliveries::EndpointState)>, $crate::store::StoreError> {
                let rows: Vec<(String, String, i32, Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>, Option<String>, Option<i64>)> =
                    sqlx::query_as(
                        "SELECT namespace, name, consecutive_failures, breaker_open_until, last_success_at, disabled_reason, \
                         disabled_generation FROM endpoint_state ORDER BY namespace, name",
                    )
                    .fetch_all(self.read_pool())
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|(namespace, name, failures, open_until, last_success, reason, generation)| {
                        let state = $crate::store::deliveries::EndpointState {
                            consecutive_failures: failures.max(0) as u32,
                            breaker_open_until: open_until,
                            last_success_at: last_success,
                            disabled_reason: reason,
                            disabled_generation: generation,
                        };
                        (namespace, name, state)
                    })
                    .collect())
            }

            /// Deliveries waiting to be sent (pending or retrying) per endpoint:
            /// `(namespace, endpoint, count, oldest created_at)`.
            pub(super) async fn waiting_by_endpoint(
                &self,
            ) -> Result<Vec<(String, String, i64, chrono::DateTime<chrono::Utc>)>, $crate::store::StoreError> {
                Ok(sqlx::query_as(
                    "SELECT namespace, endpoint, COUNT(*), MIN(created_at) FROM deliveries \
                     WHERE state IN ('pending', 'retrying') GROUP BY namespace, endpoint",
                )
                .fetch_all(self.read_pool())
                .await?)
            }

            pub(super) async fn attempt_stats(
                &self,
                namespace: &str,
                name: &str,
                since: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::deliveries::AttemptStats, $crate::store::StoreError> {
                let rows: Vec<(i64, String)> = sqlx::query_as(&$sql(
                    "SELECT duration_ms, outcome FROM delivery_attempts WHERE namespace = ? AND endpoint = ? AND started_at >= ? \
                     ORDER BY started_at DESC LIMIT 100000",
                ))
                .bind(namespace)
                .bind(name)
                .bind(since)
                .fetch_all(self.read_pool())
                .await?;
                Ok($crate::store::deliveries::AttemptStats {
                    attempts: rows.len() as u64,
                    successes: rows.iter().filter(|(_, o)| o == "delivered").count() as u64,
                    durations_ms: rows.into_iter().map(|(d, _)| d).collect(),
                })
            }

            /// Deliveries waiting to be sent (pending or retrying), and the oldest one's age.
            pub(super) async fn queue_depth(
                &self,
            ) -> Result<(u64, Option<chrono::DateTime<chrono::Utc>>), $crate::store::StoreError> {
                let (count, oldest): (i64, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(&$sql(
                    "SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE state IN ('pending', 'retrying')",
                ))
                .fetch_one(self.read_pool())
                .await?;
                Ok((count.max(0) as u64, oldest))
            }

            /// Endpoints whose breaker is open now, and (apart) those that are disabled.
            pub(super) async fn count_blocked_endpoints(
                &self,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::deliveries::BlockedEndpoints, $crate::store::StoreError> {
                let (breakers_open, disabled): (i64, i64) = sqlx::query_as(&$sql(
                    "SELECT COUNT(*) FILTER (WHERE disabled_reason IS NULL AND breaker_open_until > ?), \
                     COUNT(*) FILTER (WHERE disabled_reason IS NOT NULL) FROM endpoint_state",
                ))
                .bind(now)
                .fetch_one(self.read_pool())
                .await?;
                Ok($crate::store::deliveries::BlockedEndpoints { breakers_open, disabled })
            }

            /// Counts of deliveries in the states that are still moving. Final states grow
            /// without bound and are counted by the attempt counters instead, so this stays
            /// cheap however much history the table holds.
            pub(super) async fn delivery_counts(&self) -> Result<Vec<(String, i64)>, $crate::store::StoreError> {
                Ok(sqlx::query_as(&$sql(
                    "SELECT state, COUNT(*) FROM deliveries WHERE state IN ('pending', 'retrying', 'delivering', 'held') GROUP BY state",
                ))
                .fetch_all(self.read_pool())
                .await?)
            }
        }
    };
}

pub(super) use delivery_methods;

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(endpoint: &str, success: Option<bool>, breaker: Option<(u32, DateTime<Utc>)>) -> Completion {
        let now = Utc::now();
        Completion {
            id: DeliveryId::generate(),
            lease_token: "t".into(),
            namespace: "ns".into(),
            endpoint: endpoint.into(),
            state: DeliveryState::Retrying,
            next_attempt_at: now,
            attempt: Attempt {
                attempt: 1,
                started_at: now,
                duration_ms: 1,
                status: None,
                response: None,
                error: None,
                outcome: "retry".into(),
            },
            success,
            breaker,
            disable: None,
            decision: None,
            settle_spend: false,
            ordered: false,
            audit_outcome: true,
        }
    }

    #[test]
    fn health_deltas_fold_each_endpoints_attempts_in_order() {
        let until = Utc::now();
        let batch = [
            completion("b", Some(false), Some((3, until))),
            completion("a", Some(false), None),
            completion("b", Some(true), None),
            completion("a", None, None),
            completion("b", Some(false), Some((3, until))),
            completion("b", Some(false), Some((3, until))),
            completion("c", None, None),
        ];
        let refs: Vec<&Completion> = batch.iter().collect();
        let deltas = health_deltas(&refs);
        // Sorted by endpoint; `c` sent nothing, so it has no delta.
        assert_eq!(deltas.iter().map(|d| d.endpoint).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!((deltas[0].reset, deltas[0].failures, deltas[0].threshold), (false, 1, i64::MAX));
        // `b`: the success restarts the count; two failures follow it.
        assert_eq!((deltas[1].reset, deltas[1].failures, deltas[1].threshold), (true, 2, 3));
        assert_eq!(deltas[1].open_until, Some(until));
    }
}
