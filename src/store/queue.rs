//! The delivery queue's upkeep and claims of every endpoint: leases taken and given
//! back, crashed workers' leases released, blocked endpoints' deliveries parked and
//! resumed, final deliveries replayed. (The dispatcher's claims are [`super::claims`];
//! the invariants are those of [`super::deliveries`].)
//!
//! The claim itself is one statement on PostgreSQL and two on SQLite's one writer, so
//! each backend writes its own (`claim_rows` in `postgres.rs` and `sqlite.rs`); the rest
//! is written once.

use chrono::{DateTime, Utc};

use super::deliveries::ClaimedDelivery;
use super::sql::{sql, Tx};
use super::{audit, claims, lanes, Store, StoreError};
use crate::audit::NewAuditRecord;
use crate::ids::DeliveryId;

/// How far ahead a disabled endpoint's deliveries are parked; re-enabling it makes them
/// due at once, in the same transaction.
const DISABLED_PARK: chrono::Duration = chrono::Duration::hours(1);

/// Until when the waiting deliveries of an endpoint that was just disabled are parked.
pub(super) fn disabled_until(now: DateTime<Utc>) -> DateTime<Utc> {
    now + DISABLED_PARK
}

/// The claim of every endpoint's deliveries (see [`super::claims`] for the dispatcher's):
/// due deliveries not waiting behind an earlier one of their lane, nor blocked by an open
/// breaker or a disabled endpoint, oldest due first: `$4` now, `$5` now, `$6` the limit
/// (`$1..$3` are the claim's own). PostgreSQL appends `FOR UPDATE SKIP LOCKED`.
pub(super) const CLAIMABLE: &str = "SELECT c.id FROM deliveries c \
     WHERE c.state IN ('pending', 'retrying') AND NOT c.lane_behind AND c.next_attempt_at <= $4 \
     AND NOT EXISTS (SELECT 1 FROM endpoint_state s WHERE s.namespace = c.namespace AND s.name = c.endpoint \
          AND (s.disabled_reason IS NOT NULL OR s.breaker_open_until > $5)) \
     ORDER BY c.next_attempt_at, c.id LIMIT $6";

impl Store {
    /// Claims up to `limit` due deliveries for `lease`.
    pub async fn claim_due_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: std::time::Duration,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let token = ulid::Ulid::new().to_string();
        let lease_until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        self.observed(async {
            let rows = match self {
                Store::Sqlite(s) => s.claim_rows(&token, lease_until, now, limit).await?,
                Store::Postgres(s) => s.claim_rows(&token, lease_until, now, limit).await?,
            };
            rows.into_iter().map(|r| r.into_claimed(&token)).collect()
        })
        .await
    }

    /// Makes deliveries of crashed workers (lease ran out) claimable again.
    pub async fn release_expired_leases(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        // Due as when it was claimed: it keeps its place in the queue.
        let release = sql("UPDATE deliveries SET state = 'retrying', lease_token = NULL, lease_until = NULL, \
             updated_at = $1 WHERE state = 'delivering' AND lease_until < $1")
        .bind(now);
        self.observed(release.execute(self.writer())).await
    }

    /// Returns claimed deliveries unattempted (shutdown, a paused or busy endpoint), due
    /// again at `at`.
    pub async fn release_deliveries(
        &self,
        claims: &[(&DeliveryId, &str)],
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let mut released = 0;
            for (id, token) in claims {
                released +=
                    sql("UPDATE deliveries SET state = CASE WHEN attempts <= 1 THEN 'pending' ELSE 'retrying' END, \
                     attempts = attempts - 1, lease_token = NULL, lease_until = NULL, next_attempt_at = $1, \
                     updated_at = $2 WHERE id = $3 AND lease_token = $4")
                    .bind(at)
                    .bind(Utc::now())
                    .bind(id.as_str())
                    .bind(*token)
                    .execute(&mut tx)
                    .await?;
            }
            // A half-open probe among them goes back too: the next claim may probe.
            claims::release_probes_in(&mut tx, claims).await?;
            tx.commit().await?;
            Ok(released)
        })
        .await
    }

    /// Moves due deliveries of endpoints whose breaker is open to when it closes, and
    /// those of disabled endpoints an hour ahead; returns how many moved. The completion
    /// that opens a breaker or disables does this too; this catches deliveries fanned out
    /// to the endpoint since.
    pub async fn park_blocked_deliveries(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.observed(async {
            let blocked: Vec<(String, String, Option<DateTime<Utc>>, bool)> =
                sql("SELECT namespace, name, breaker_open_until, disabled_reason IS NOT NULL FROM endpoint_state \
                 WHERE breaker_open_until > $1 OR disabled_reason IS NOT NULL")
                .bind(now)
                .fetch_all(self.reader())
                .await?;
            let mut parked = 0;
            let mut tx = self.begin_write().await?;
            for (namespace, endpoint, open_until, disabled) in blocked {
                let until = match open_until {
                    _ if disabled => disabled_until(now),
                    Some(until) => until,
                    None => continue,
                };
                parked += park_in(&mut tx, &namespace, &endpoint, until).await?;
            }
            tx.commit().await?;
            Ok(parked)
        })
        .await
    }

    /// Puts final deliveries back in the queue, due now; returns those replayed (audited
    /// as `actor`). Deliveries not in a final state are left alone.
    pub async fn replay_deliveries(&self, ids: &[DeliveryId], actor: &str) -> Result<Vec<DeliveryId>, StoreError> {
        self.observed(async {
            let now = Utc::now();
            let mut tx = self.begin_write().await?;
            let mut replayed = Vec::new();
            for id in ids {
                let namespace: Option<String> =
                    sql("UPDATE deliveries SET state = 'pending', attempt_base = attempts, next_attempt_at = $1, \
                     last_error = NULL, completed_at = NULL, updated_at = $1, approved = FALSE \
                     WHERE id = $2 AND state IN ('delivered', 'failed', 'dead', 'denied') RETURNING namespace")
                    .bind(now)
                    .bind(id.as_str())
                    .scalar_optional(&mut tx)
                    .await?;
                if let Some(namespace) = namespace {
                    let record = NewAuditRecord::new(
                        actor,
                        "delivery.replayed",
                        &namespace,
                        format!("delivery/{id}"),
                        serde_json::json!({}),
                    );
                    audit::append_in(&mut tx, &[record]).await?;
                    replayed.push(id.clone());
                }
            }
            let reopened: Vec<&str> = replayed.iter().map(|id| id.as_str()).collect();
            lanes::reopen_in(&mut tx, &reopened).await?;
            tx.commit().await?;
            Ok(replayed)
        })
        .await
    }
}

/// Parks an endpoint's waiting deliveries until `until`, when it may be sent to again (its
/// breaker closes; it was disabled), so that claims do not walk past them in the due index
/// meanwhile. Returns how many moved.
pub(super) async fn park_in(
    tx: &mut Tx,
    namespace: &str,
    endpoint: &str,
    until: DateTime<Utc>,
) -> Result<u64, StoreError> {
    sql("UPDATE deliveries SET next_attempt_at = $1 WHERE namespace = $2 AND endpoint = $3 \
         AND state IN ('pending', 'retrying') AND next_attempt_at < $1")
    .bind(until)
    .bind(namespace)
    .bind(endpoint)
    .execute(tx)
    .await
}

/// Makes an endpoint's waiting deliveries due (its pause was lifted, or it was
/// re-enabled), parked ones and later retries alike: those never attempted at their place
/// in the queue (due when they were created, before what came since), retries `now`.
pub(super) async fn resume_in(
    tx: &mut Tx,
    namespace: &str,
    endpoint: &str,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    sql("UPDATE deliveries SET next_attempt_at = CASE WHEN attempts = 0 THEN created_at ELSE $1 END \
         WHERE namespace = $2 AND endpoint = $3 AND state IN ('pending', 'retrying') AND next_attempt_at > $1")
    .bind(now)
    .bind(namespace)
    .bind(endpoint)
    .execute(tx)
    .await
}
