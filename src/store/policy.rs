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

use chrono::{DateTime, Utc};
use serde::Serialize;

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

/// Expands the policy methods for one backend. `$spend_lock` serializes reservations per
/// key; `$row_lock` locks an approval row for its vote.
macro_rules! policy_methods {
    ($store:ty, $sql:path, $spend_lock:expr, $row_lock:expr) => {
        impl $store {
            /// Spend counted (reserved or committed) per `(rule, key, currency)` within each window.
            pub(super) async fn spend_totals(
                &self,
                namespace: &str,
                keys: &[(String, String, String, std::time::Duration)],
                exclude: Option<&$crate::ids::DeliveryId>,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<std::collections::BTreeMap<(String, String, String), i64>, $crate::store::StoreError> {
                let mut totals = std::collections::BTreeMap::new();
                for (rule, key, currency, window) in keys {
                    let since = now - chrono::Duration::from_std(*window).unwrap_or(chrono::Duration::MAX);
                    let total: Option<i64> = sqlx::query_scalar(&$sql(
                        "SELECT CAST(SUM(amount) AS BIGINT) FROM spend_ledger WHERE namespace = ? AND rule = ? AND spend_key = ? \
                         AND currency = ? AND state IN ('reserved', 'committed') AND created_at > ? AND delivery_id <> ?",
                    ))
                    .bind(namespace)
                    .bind(rule)
                    .bind(key)
                    .bind(currency)
                    .bind(since)
                    .bind(exclude.map(|d| d.as_str()).unwrap_or(""))
                    .fetch_one(self.read_pool())
                    .await?;
                    totals.insert((rule.clone(), key.clone(), currency.clone()), total.unwrap_or(0));
                }
                Ok(totals)
            }

            /// Writes an allow decision and reserves its spend, atomically. With
            /// `enforce_limits` false (a granted hold) the spend counts whatever the limit.
            #[allow(clippy::too_many_arguments)]
            pub(super) async fn allow_delivery(
                &self,
                id: &$crate::ids::DeliveryId,
                lease_token: &str,
                namespace: &str,
                decision: &$crate::policy::decision::DecisionRecord,
                reservations: &[$crate::store::policy::SpendReservation],
                enforce_limits: bool,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::policy::AllowResult, $crate::store::StoreError> {
                use $crate::store::policy::AllowResult;
                let mut tx = self.begin_write().await?;
                let mut sorted: Vec<&$crate::store::policy::SpendReservation> = reservations.iter().collect();
                sorted.sort_by(|a, b| (&a.rule, &a.key, &a.currency).cmp(&(&b.rule, &b.key, &b.currency)));
                for r in sorted {
                    let lock: Option<&str> = $spend_lock;
                    if let Some(lock) = lock {
                        sqlx::query(&$sql(lock))
                            .bind(format!("{namespace}\u{1f}{}\u{1f}{}\u{1f}{}", r.rule, r.key, r.currency))
                            .execute(&mut *tx)
                            .await?;
                    }
                    if enforce_limits {
                        let since = now - chrono::Duration::from_std(r.window).unwrap_or(chrono::Duration::MAX);
                        let total: Option<i64> = sqlx::query_scalar(&$sql(
                            "SELECT CAST(SUM(amount) AS BIGINT) FROM spend_ledger WHERE namespace = ? AND rule = ? AND spend_key = ? \
                             AND currency = ? AND state IN ('reserved', 'committed') AND created_at > ? AND delivery_id <> ?",
                        ))
                        .bind(namespace)
                        .bind(&r.rule)
                        .bind(&r.key)
                        .bind(&r.currency)
                        .bind(since)
                        .bind(id.as_str())
                        .fetch_one(&mut *tx)
                        .await?;
                        if total.unwrap_or(0).checked_add(r.amount).is_none_or(|t| t > r.limit) {
                            tx.rollback().await?;
                            return Ok(AllowResult::OverLimit(r.rule.clone()));
                        }
                    }
                    sqlx::query(&$sql(
                        "INSERT INTO spend_ledger (delivery_id, namespace, rule, spend_key, currency, amount, state, created_at) \
                         VALUES (?, ?, ?, ?, ?, ?, 'reserved', ?) ON CONFLICT (delivery_id, rule) DO UPDATE SET \
                         amount = excluded.amount, state = 'reserved', created_at = excluded.created_at",
                    ))
                    .bind(id.as_str())
                    .bind(namespace)
                    .bind(&r.rule)
                    .bind(&r.key)
                    .bind(&r.currency)
                    .bind(r.amount)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                let updated = sqlx::query(&$sql("UPDATE deliveries SET decision = ? WHERE id = ? AND lease_token = ?"))
                    .bind(decision.to_json())
                    .bind(id.as_str())
                    .bind(lease_token)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated != 1 {
                    tx.rollback().await?;
                    return Ok(AllowResult::LeaseLost);
                }
                // Committed with the decision, before the request can leave.
                let record = $crate::audit::NewAuditRecord::new(
                    "system",
                    "policy.decision",
                    namespace,
                    format!("delivery/{id}"),
                    decision.to_value(),
                );
                Self::append_audit_in(&mut tx, &[record]).await?;
                tx.commit().await?;
                Ok(AllowResult::Reserved)
            }

            /// Holds a claimed delivery for approval; false when the lease was lost.
            pub(super) async fn hold_delivery(
                &self,
                id: &$crate::ids::DeliveryId,
                lease_token: &str,
                decision: &$crate::policy::decision::DecisionRecord,
                approval: &$crate::store::policy::NewApproval,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                let updated = sqlx::query(&$sql(
                    "UPDATE deliveries SET state = 'held', decision = ?, lease_token = NULL, lease_until = NULL, updated_at = ? \
                     WHERE id = ? AND lease_token = ?",
                ))
                .bind(decision.to_json())
                .bind(now)
                .bind(id.as_str())
                .bind(lease_token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if updated != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                let a = approval;
                sqlx::query(&$sql(
                    "INSERT INTO approvals (id, namespace, delivery_id, event_id, endpoint, rule, reason, action_hash, role, quorum, \
                     on_expiry, expires_at, requested_by, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                ))
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
                .execute(&mut *tx)
                .await?;
                let records = [
                    $crate::audit::NewAuditRecord::new(
                        "system",
                        "policy.decision",
                        &a.namespace,
                        format!("delivery/{id}"),
                        decision.to_value(),
                    ),
                    $crate::audit::NewAuditRecord::new(
                        "system",
                        "approval.requested",
                        &a.namespace,
                        format!("approval/{}", a.id),
                        serde_json::json!({"delivery_id": id.as_str(), "event_id": a.event_id, "endpoint": a.endpoint,
                            "rule": a.rule, "reason": a.reason, "action_hash": a.action_hash, "role": a.role,
                            "quorum": a.quorum, "expires_at": a.expires_at, "on_expiry": a.on_expiry}),
                    ),
                ];
                Self::append_audit_in(&mut tx, &records).await?;
                tx.commit().await?;
                Ok(true)
            }

            pub(super) async fn list_approvals(
                &self,
                query: &$crate::store::policy::ApprovalQuery,
            ) -> Result<Vec<$crate::store::policy::ApprovalRecord>, $crate::store::StoreError> {
                if query.namespaces.as_ref().is_some_and(Vec::is_empty) {
                    return Ok(Vec::new());
                }
                let mut builder = sqlx::QueryBuilder::<<$store as $crate::store::policy::HasDatabase>::Db>::new("");
                $crate::store::policy::push_approval_query(&mut builder, query);
                Ok(builder.build_query_as().fetch_all(self.read_pool()).await?)
            }

            pub(super) async fn get_approval(
                &self,
                id: &str,
            ) -> Result<Option<($crate::store::policy::ApprovalRecord, Vec<$crate::store::policy::VoteRecord>)>, $crate::store::StoreError> {
                let approval: Option<$crate::store::policy::ApprovalRecord> = sqlx::query_as(&$sql(&format!(
                    "SELECT {} FROM approvals WHERE id = ?",
                    $crate::store::policy::APPROVAL_COLUMNS
                )))
                .bind(id)
                .fetch_optional(self.read_pool())
                .await?;
                let Some(approval) = approval else { return Ok(None) };
                let votes = sqlx::query_as(&$sql(
                    "SELECT voter, vote, reason, created_at FROM approval_votes WHERE approval_id = ? ORDER BY created_at, voter",
                ))
                .bind(id)
                .fetch_all(self.read_pool())
                .await?;
                Ok(Some((approval, votes)))
            }

            /// Records one vote; decides the request when it reaches quorum (grant) or on
            /// the first deny. Expired requests are closed first.
            pub(super) async fn vote_on_approval(
                &self,
                id: &str,
                voter: &str,
                grant: bool,
                reason: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<$crate::store::policy::VoteOutcome, $crate::store::StoreError> {
                use $crate::store::policy::VoteOutcome;
                let mut tx = self.begin_write().await?;
                let row: Option<(String, String, i32, chrono::DateTime<chrono::Utc>, String, String)> = sqlx::query_as(&$sql(&format!(
                    "SELECT state, delivery_id, quorum, expires_at, on_expiry, namespace FROM approvals WHERE id = ?{}",
                    $row_lock
                )))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((state, delivery, quorum, expires_at, on_expiry, namespace)) = row else {
                    return Ok(VoteOutcome::NotFound);
                };
                if state != "pending" {
                    return Ok(VoteOutcome::Closed(state));
                }
                if expires_at <= now {
                    let closed = Self::settle_approval(&mut tx, id, &delivery, on_expiry == "allow", "expired", "the request expired", now).await?;
                    tx.commit().await?;
                    return Ok(VoteOutcome::Closed(closed));
                }
                let inserted = sqlx::query(&$sql(
                    "INSERT INTO approval_votes (approval_id, voter, vote, reason, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                ))
                .bind(id)
                .bind(voter)
                .bind(if grant { "grant" } else { "deny" })
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Ok(VoteOutcome::AlreadyVoted);
                }
                let vote = $crate::audit::NewAuditRecord::new(
                    voter,
                    "approval.vote",
                    &namespace,
                    format!("approval/{id}"),
                    serde_json::json!({"vote": if grant { "grant" } else { "deny" }, "reason": reason, "delivery_id": delivery}),
                );
                Self::append_audit_in(&mut tx, &[vote]).await?;
                if !grant {
                    Self::settle_approval(&mut tx, id, &delivery, false, "denied", reason, now).await?;
                    tx.commit().await?;
                    return Ok(VoteOutcome::Decided("denied".into()));
                }
                let grants: i64 = sqlx::query_scalar(&$sql("SELECT COUNT(*) FROM approval_votes WHERE approval_id = ? AND vote = 'grant'"))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                if grants >= i64::from(quorum) {
                    Self::settle_approval(&mut tx, id, &delivery, true, "granted", reason, now).await?;
                    tx.commit().await?;
                    return Ok(VoteOutcome::Decided("granted".into()));
                }
                tx.commit().await?;
                Ok(VoteOutcome::Counted { grants: grants as u32, quorum: quorum.max(0) as u32 })
            }

            /// Closes approval `id` as `state`; its delivery goes back to the queue
            /// (approved) when `release`, else ends denied.
            #[allow(clippy::too_many_arguments)]
            async fn settle_approval(
                tx: &mut sqlx::Transaction<'static, <$store as $crate::store::policy::HasDatabase>::Db>,
                id: &str,
                delivery: &str,
                release: bool,
                state: &str,
                reason: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<String, $crate::store::StoreError> {
                let namespace: String = sqlx::query_scalar(&$sql("SELECT namespace FROM approvals WHERE id = ?"))
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await?;
                let record = $crate::audit::NewAuditRecord::new(
                    "system",
                    &format!("approval.{state}"),
                    &namespace,
                    format!("approval/{id}"),
                    serde_json::json!({"delivery_id": delivery, "reason": reason, "released": release}),
                );
                Self::append_audit_in(tx, &[record]).await?;
                sqlx::query(&$sql("UPDATE approvals SET state = ?, decided_at = ?, decided_reason = ? WHERE id = ?"))
                    .bind(state)
                    .bind(now)
                    .bind(reason)
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
                if release {
                    sqlx::query(&$sql(
                        "UPDATE deliveries SET state = 'pending', approved = TRUE, next_attempt_at = ?, updated_at = ? \
                         WHERE id = ? AND state = 'held'",
                    ))
                    .bind(now)
                    .bind(now)
                    .bind(delivery)
                    .execute(&mut **tx)
                    .await?;
                } else {
                    let error = format!("approval {state}: {reason}");
                    let ended: Option<(String, i32)> = sqlx::query_as(&$sql(
                        "UPDATE deliveries SET state = 'denied', last_error = ?, completed_at = ?, updated_at = ? \
                         WHERE id = ? AND state = 'held' RETURNING endpoint, attempts",
                    ))
                    .bind(&error)
                    .bind(now)
                    .bind(now)
                    .bind(delivery)
                    .fetch_optional(&mut **tx)
                    .await?;
                    // The delivery's final outcome, as every other final state gets one; and
                    // any reservation of an earlier allow goes back to the budget.
                    if let Some((endpoint, attempts)) = ended {
                        sqlx::query(&$sql("UPDATE spend_ledger SET state = 'released' WHERE delivery_id = ? AND state = 'reserved'"))
                            .bind(delivery)
                            .execute(&mut **tx)
                            .await?;
                        let outcome = $crate::store::policy::denied_by_approval_record(&namespace, delivery, &endpoint, attempts, &error);
                        Self::append_audit_in(tx, &[outcome]).await?;
                        // An ordered lane's held head ended: the next one may go.
                        Self::end_lane_heads_in(tx, &[delivery]).await?;
                    }
                }
                Ok(state.to_owned())
            }

            pub(super) async fn count_pending_approvals(&self) -> Result<i64, $crate::store::StoreError> {
                Ok(sqlx::query_scalar(&$sql("SELECT COUNT(*) FROM approvals WHERE state = 'pending'"))
                    .fetch_one(self.read_pool())
                    .await?)
            }

            /// Applies the expiry outcome to every pending request past its deadline.
            pub(super) async fn expire_approvals(
                &self,
                term: $crate::store::Term,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<(String, String)>, $crate::store::StoreError> {
                let due: Vec<(String, String, String)> = sqlx::query_as(&$sql(
                    "SELECT id, delivery_id, on_expiry FROM approvals WHERE state = 'pending' AND expires_at <= ? ORDER BY expires_at LIMIT 500",
                ))
                .bind(now)
                .fetch_all(self.read_pool())
                .await?;
                let mut expired = Vec::new();
                for (id, delivery, on_expiry) in due {
                    let mut tx = self.begin_write().await?;
                    Self::hold_term_in(&mut tx, term).await?;
                    let still: Option<String> = sqlx::query_scalar(&$sql(&format!("SELECT state FROM approvals WHERE id = ?{}", $row_lock)))
                        .bind(&id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if still.as_deref() != Some("pending") {
                        continue;
                    }
                    let release = on_expiry == "allow";
                    let reason = if release { "expired; the rule allows on expiry" } else { "expired; the rule denies on expiry" };
                    Self::settle_approval(&mut tx, &id, &delivery, release, "expired", reason, now).await?;
                    tx.commit().await?;
                    expired.push((id, delivery));
                }
                Ok(expired)
            }
        }
    };
}

pub(super) use policy_methods;

/// The database type of a store, for transaction types in the shared methods.
pub(super) trait HasDatabase {
    type Db: sqlx::Database;
}

impl HasDatabase for super::SqliteStore {
    type Db = sqlx::Sqlite;
}

impl HasDatabase for super::PgStore {
    type Db = sqlx::Postgres;
}

/// The columns of an [`ApprovalRecord`], in its field order.
pub(super) const APPROVAL_COLUMNS: &str =
    "id, namespace, delivery_id, event_id, endpoint, rule, reason, action_hash, role, \
     quorum, on_expiry, expires_at, requested_by, state, created_at, decided_at, decided_reason";

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

/// Builds the `list_approvals` query, identical on both backends but for placeholders.
pub(super) fn push_approval_query<'q, DB: sqlx::Database>(
    builder: &mut sqlx::QueryBuilder<'q, DB>,
    query: &'q ApprovalQuery,
) where
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    builder.push("SELECT ").push(APPROVAL_COLUMNS).push(" FROM approvals WHERE 1 = 1");
    if let Some(namespaces) = &query.namespaces {
        builder.push(" AND namespace IN (");
        let mut list = builder.separated(", ");
        for namespace in namespaces {
            list.push_bind(namespace.as_str());
        }
        builder.push(")");
    }
    if let Some(state) = &query.state {
        builder.push(" AND state = ").push_bind(state.as_str());
    }
    builder.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
}

/// The `delivery.denied` record of a held delivery that an approver's denial or an expiry
/// ended, shaped like the outcome records of completed attempts.
pub(super) fn denied_by_approval_record(
    namespace: &str,
    delivery: &str,
    endpoint: &str,
    attempts: i32,
    error: &str,
) -> crate::audit::NewAuditRecord {
    crate::audit::NewAuditRecord::new(
        "system",
        "delivery.denied",
        namespace,
        format!("delivery/{delivery}"),
        serde_json::json!({"endpoint": endpoint, "attempt": attempts, "status": null, "error": error}),
    )
}

/// Settles a delivery's reservations when it ends: `delivered` commits them, the other
/// final states release them.
pub(super) fn ledger_state_for(state: crate::store::DeliveryState) -> Option<&'static str> {
    use crate::store::DeliveryState::*;
    match state {
        Delivered => Some("committed"),
        Failed | Dead | Denied => Some("released"),
        _ => None,
    }
}
