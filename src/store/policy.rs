//! The policy gate's storage: spend reservations, approval requests and their votes.
//!
//! Invariants:
//! - a spend reservation is checked and written in one transaction, serialized per spend
//!   key (PostgreSQL: a transaction-scoped advisory lock; SQLite: its single writer), so
//!   concurrent deliveries can never together exceed a limit;
//! - reservations are committed when their delivery is delivered and released when it ends
//!   failed, dead or denied (by the gate, an approver or an expiry);
//! - a held delivery that an approval request ends `denied` gets its `delivery.denied`
//!   audit record in the same transaction, like every other final outcome;
//! - the first final decision on an approval wins; one vote per subject.
//!
//! Approval requests and their votes are kept by [`super::approvals`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::sql::{sql, Tx};
use super::{audit, Backend, DeliveryState, Store, StoreError};
use crate::audit::NewAuditRecord;
use crate::ids::DeliveryId;
use crate::policy::decision::DecisionRecord;

/// Spend to reserve for one delivery under one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendReservation {
    pub rule: String,
    pub key: String,
    pub currency: String,
    pub amount: i64,
    pub limit: i64,
    pub window: std::time::Duration,
}

/// The result of recording an allow decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowResult {
    /// Decision written and spend reserved: send it.
    Reserved,
    /// The reservation would exceed this rule's limit (another delivery got there first).
    OverLimit(String),
    /// The lease was lost meanwhile; do nothing.
    LeaseLost,
}

/// A new approval request, bound to one action.
#[derive(Clone, Debug)]
pub struct NewApproval {
    pub id: String,
    pub namespace: String,
    pub event_id: String,
    pub endpoint: String,
    pub rule: Option<String>,
    pub reason: String,
    pub action_hash: String,
    pub role: String,
    pub quorum: u32,
    pub on_expiry: String,
    pub expires_at: DateTime<Utc>,
    pub requested_by: String,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct ApprovalRecord {
    pub id: String,
    pub namespace: String,
    pub delivery_id: String,
    pub event_id: String,
    pub endpoint: String,
    pub rule: Option<String>,
    pub reason: String,
    pub action_hash: String,
    pub role: String,
    pub quorum: i32,
    pub on_expiry: String,
    pub expires_at: DateTime<Utc>,
    pub requested_by: String,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct VoteRecord {
    pub voter: String,
    pub vote: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// What a vote did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VoteOutcome {
    /// Counted; the request is still pending (more grants needed).
    Counted {
        grants: u32,
        quorum: u32,
    },
    /// This vote decided the request (`granted` or `denied`).
    Decided(String),
    /// The request was already decided, or expired: the vote is refused.
    Closed(String),
    AlreadyVoted,
    NotFound,
}

/// Which approval requests `list_approvals` returns: newest first, at most `limit`.
#[derive(Clone, Debug)]
pub struct ApprovalQuery {
    /// Only these namespaces; `None` for every namespace (a token for `*`). An empty list
    /// matches nothing.
    pub namespaces: Option<Vec<String>>,
    /// Only requests in this state (`pending`, `granted`, `denied`, `expired`).
    pub state: Option<String>,
    pub limit: u32,
}

/// Spend counted (reserved or committed) of `$1` namespace, `$2` rule, `$3` key, `$4`
/// currency since `$5`, leaving out delivery `$6`.
const SPEND_TOTAL: &str = "SELECT CAST(SUM(amount) AS BIGINT) FROM spend_ledger WHERE namespace = $1 AND rule = $2 \
     AND spend_key = $3 AND currency = $4 AND state IN ('reserved', 'committed') AND created_at > $5 AND delivery_id <> $6";

impl Store {
    /// Spend counted per `(rule, key, currency)`, each in its own window, leaving out the
    /// reservation of `exclude` (a delivery deciding again after a retry).
    pub async fn spend_totals(
        &self,
        namespace: &str,
        keys: &[(String, String, String, std::time::Duration)],
        exclude: Option<&DeliveryId>,
        now: DateTime<Utc>,
    ) -> Result<BTreeMap<(String, String, String), i64>, StoreError> {
        self.observed(async {
            let mut totals = BTreeMap::new();
            for (rule, key, currency, window) in keys {
                let total: Option<i64> = sql(SPEND_TOTAL)
                    .bind(namespace)
                    .bind(rule)
                    .bind(key)
                    .bind(currency)
                    .bind(since(now, *window))
                    .bind(exclude.map(|d| d.as_str()).unwrap_or(""))
                    .scalar(self.reader())
                    .await?;
                totals.insert((rule.clone(), key.clone(), currency.clone()), total.unwrap_or(0));
            }
            Ok(totals)
        })
        .await
    }

    /// Records an allow decision and reserves its spend atomically (see [`AllowResult`]).
    /// With `enforce_limits` false (a granted hold) the spend counts whatever the limit.
    #[allow(clippy::too_many_arguments)]
    pub async fn allow_delivery(
        &self,
        id: &DeliveryId,
        lease_token: &str,
        namespace: &str,
        decision: &DecisionRecord,
        reservations: &[SpendReservation],
        enforce_limits: bool,
        now: DateTime<Utc>,
    ) -> Result<AllowResult, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let mut sorted: Vec<&SpendReservation> = reservations.iter().collect();
            sorted.sort_by(|a, b| (&a.rule, &a.key, &a.currency).cmp(&(&b.rule, &b.key, &b.currency)));
            for r in sorted {
                if let Some(over) = reserve_in(&mut tx, id, namespace, r, enforce_limits, now).await? {
                    tx.rollback().await?;
                    return Ok(over);
                }
            }
            let updated = sql("UPDATE deliveries SET decision = $1 WHERE id = $2 AND lease_token = $3")
                .bind(decision.to_json())
                .bind(id.as_str())
                .bind(lease_token)
                .execute(&mut tx)
                .await?;
            if updated != 1 {
                tx.rollback().await?;
                return Ok(AllowResult::LeaseLost);
            }
            // Committed with the decision, before the request can leave.
            audit::append_in(&mut tx, &[decision_record(namespace, id, decision)]).await?;
            tx.commit().await?;
            Ok(AllowResult::Reserved)
        })
        .await
    }

    /// Holds a claimed delivery and opens its approval request; false if the lease was lost.
    pub async fn hold_delivery(
        &self,
        id: &DeliveryId,
        lease_token: &str,
        decision: &DecisionRecord,
        approval: &NewApproval,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let updated = sql(
                "UPDATE deliveries SET state = 'held', decision = $1, lease_token = NULL, lease_until = NULL, \
                 updated_at = $2 WHERE id = $3 AND lease_token = $4",
            )
            .bind(decision.to_json())
            .bind(now)
            .bind(id.as_str())
            .bind(lease_token)
            .execute(&mut tx)
            .await?;
            if updated != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
            let a = approval;
            sql("INSERT INTO approvals (id, namespace, delivery_id, event_id, endpoint, rule, reason, action_hash, role, \
                 quorum, on_expiry, expires_at, requested_by, state, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'pending', $14)")
            .bind(&a.id)
            .bind(&a.namespace)
            .bind(id.as_str())
            .bind(&a.event_id)
            .bind(&a.endpoint)
            .bind(&a.rule)
            .bind(&a.reason)
            .bind(&a.action_hash)
            .bind(&a.role)
            .bind(a.quorum as i32)
            .bind(&a.on_expiry)
            .bind(a.expires_at)
            .bind(&a.requested_by)
            .bind(now)
            .execute(&mut tx)
            .await?;
            let records = [
                decision_record(&a.namespace, id, decision),
                NewAuditRecord::new(
                    "system",
                    "approval.requested",
                    &a.namespace,
                    format!("approval/{}", a.id),
                    serde_json::json!({"delivery_id": id.as_str(), "event_id": a.event_id, "endpoint": a.endpoint,
                        "rule": a.rule, "reason": a.reason, "action_hash": a.action_hash, "role": a.role,
                        "quorum": a.quorum, "expires_at": a.expires_at, "on_expiry": a.on_expiry}),
                ),
            ];
            audit::append_in(&mut tx, &records).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }
}

/// The `policy.decision` audit record of delivery `id`.
fn decision_record(namespace: &str, id: &DeliveryId, decision: &DecisionRecord) -> NewAuditRecord {
    NewAuditRecord::new("system", "policy.decision", namespace, format!("delivery/{id}"), decision.to_value())
}

/// The start of a spend window that ends `now`.
fn since(now: DateTime<Utc>, window: std::time::Duration) -> DateTime<Utc> {
    now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX)
}

/// Reserves `r` for delivery `id` inside `tx`, serialized per spend key (PostgreSQL: an
/// advisory lock; SQLite: its one writer); with `enforce_limits`, refuses instead
/// ([`AllowResult::OverLimit`]) when the reservation would exceed the rule's limit.
async fn reserve_in(
    tx: &mut Tx,
    id: &DeliveryId,
    namespace: &str,
    r: &SpendReservation,
    enforce_limits: bool,
    now: DateTime<Utc>,
) -> Result<Option<AllowResult>, StoreError> {
    if tx.backend() == Backend::Postgres {
        sql("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("{namespace}\u{1f}{}\u{1f}{}\u{1f}{}", r.rule, r.key, r.currency))
            .execute(&mut *tx)
            .await?;
    }
    if enforce_limits {
        let total: Option<i64> = sql(SPEND_TOTAL)
            .bind(namespace)
            .bind(&r.rule)
            .bind(&r.key)
            .bind(&r.currency)
            .bind(since(now, r.window))
            .bind(id.as_str())
            .scalar(&mut *tx)
            .await?;
        if total.unwrap_or(0).checked_add(r.amount).is_none_or(|t| t > r.limit) {
            return Ok(Some(AllowResult::OverLimit(r.rule.clone())));
        }
    }
    sql("INSERT INTO spend_ledger (delivery_id, namespace, rule, spend_key, currency, amount, state, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'reserved', $7) ON CONFLICT (delivery_id, rule) DO UPDATE SET \
         amount = excluded.amount, state = 'reserved', created_at = excluded.created_at")
    .bind(id.as_str())
    .bind(namespace)
    .bind(&r.rule)
    .bind(&r.key)
    .bind(&r.currency)
    .bind(r.amount)
    .bind(now)
    .execute(tx)
    .await?;
    Ok(None)
}

/// Settles a delivery's reservations when it ends: `delivered` commits them, the other
/// final states release them.
pub(super) fn ledger_state_for(state: DeliveryState) -> Option<&'static str> {
    use DeliveryState::*;
    match state {
        Delivered => Some("committed"),
        Failed | Dead | Denied => Some("released"),
        _ => None,
    }
}

/// Ledger entries to write at once, for a benchmark of the spend windows
/// ([`Store::fill_spend_ledger`]).
#[derive(Clone, Debug)]
pub struct LedgerFill {
    pub namespace: String,
    pub rule: String,
    pub key: String,
    pub currency: String,
    /// Committed entries, spread evenly over `from..until`, `amount` each.
    pub entries: u64,
    pub amount: i64,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

impl Store {
    /// Writes `fill.entries` committed ledger entries (with the delivered deliveries and the
    /// one event they reference) in a few set-sized statements: `generate_series` on
    /// PostgreSQL, a recursive CTE on SQLite.
    ///
    /// **Warning**: for benchmarks on a database of their own; the entries are made up.
    pub async fn fill_spend_ledger(&self, fill: &LedgerFill) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let (series, created_at) = match tx.backend() {
            Backend::Postgres => (
                "SELECT i FROM generate_series(1, $1::bigint) AS i",
                "timestamptz 'epoch' + (t * interval '1 millisecond')",
            ),
            Backend::Sqlite => (
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $1) SELECT i FROM s",
                "strftime('%Y-%m-%dT%H:%M:%f+00:00', t / 1000.0, 'unixepoch')",
            ),
        };
        let event = format!("evt_fill_{}", ulid::Ulid::new());
        sql("INSERT INTO events (id, namespace, source, external_id, type, data, content_type, ingested_by, trace_id, \
             received_at, status) VALUES ($1, $2, 'bench', $1, 'bench.fill', '{}', 'application/json', 'bench', '', $3, \
             'accepted')")
        .bind(event.as_str())
        .bind(&fill.namespace)
        .bind(fill.from)
        .execute(&mut tx)
        .await?;
        let entries = i64::try_from(fill.entries).unwrap_or(i64::MAX);
        sql(&format!(
            "INSERT INTO deliveries (id, event_id, namespace, endpoint, state, attempts, next_attempt_at, created_at, \
             updated_at, completed_at) SELECT $2 || '_' || i, $2, $3, 'fill-' || i, 'delivered', 1, $4, $4, $4, $4 \
             FROM ({series}) AS n"
        ))
        .bind(entries)
        .bind(event.as_str())
        .bind(&fill.namespace)
        .bind(fill.from)
        .execute(&mut tx)
        .await?;
        let span = (fill.until - fill.from).num_milliseconds().max(0);
        sql(&format!(
            "INSERT INTO spend_ledger (delivery_id, namespace, rule, spend_key, currency, amount, state, created_at) \
             SELECT $2 || '_' || i, $3, $4, $5, $6, $7, 'committed', {created_at} \
             FROM (SELECT i, $8 + i * $9 / ($1 + 1) AS t FROM ({series}) AS n) AS f"
        ))
        .bind(entries)
        .bind(event.as_str())
        .bind(&fill.namespace)
        .bind(&fill.rule)
        .bind(&fill.key)
        .bind(&fill.currency)
        .bind(fill.amount)
        .bind(fill.from.timestamp_millis())
        .bind(span)
        .execute(&mut tx)
        .await?;
        tx.commit().await
    }
}
