//! Approval requests and their votes: who decides a held delivery, and what the decision
//! does to it.
//!
//! Invariants (with those of [`super::policy`]):
//! - the first final decision on an approval wins: a vote or an expiry locks the request's
//!   row (PostgreSQL: `FOR UPDATE`; SQLite: its one writer) and acts only on a pending one;
//! - one vote per subject;
//! - a held delivery that a request ends `denied` gets its `delivery.denied` audit record,
//!   its reservations released and its lane's next delivery freed, in the same transaction;
//! - a request's decision or expiry writes its operational event
//!   (`hookwarden.approval.decided` / `.expired`) in the same transaction; its
//!   `hookwarden.approval.expiring` is written once (`expiring_told`) — except for a
//!   held delivery of an operational event, whose request tells nothing (no loops).

use chrono::{DateTime, Utc};

use super::operational::{emit_in, is_operational_in};
use super::policy::{ApprovalQuery, ApprovalRecord, VoteOutcome, VoteRecord};
use super::sql::{row_lock, sql, PerBackend, Statement, Tx};
use super::{audit, lanes, leadership, spend, Store, StoreError, Term};
use crate::audit::NewAuditRecord;
use crate::operational::{ApprovalClosed, ApprovalExpiring, ApprovalRef, OperationalEvent};

/// The columns of an [`ApprovalRecord`], in its field order.
const APPROVAL_COLUMNS: &str = "id, namespace, delivery_id, event_id, endpoint, rule, reason, action_hash, role, \
     quorum, on_expiry, expires_at, requested_by, state, created_at, decided_at, decided_reason";

impl Store {
    /// Approval requests newest first; see [`ApprovalQuery`].
    pub async fn list_approvals(&self, query: &ApprovalQuery) -> Result<Vec<ApprovalRecord>, StoreError> {
        if query.namespaces.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        self.observed(approval_query(query).fetch_all(self.reader())).await
    }

    pub async fn get_approval(&self, id: &str) -> Result<Option<(ApprovalRecord, Vec<VoteRecord>)>, StoreError> {
        static GET: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1"));
        self.observed(async {
            let approval: Option<ApprovalRecord> = sql(&GET).bind(id).fetch_optional(self.reader()).await?;
            let Some(approval) = approval else { return Ok(None) };
            let votes = sql("SELECT voter, vote, reason, created_at FROM approval_votes WHERE approval_id = $1 \
                 ORDER BY created_at, voter")
            .bind(id)
            .fetch_all(self.reader())
            .await?;
            Ok(Some((approval, votes)))
        })
        .await
    }

    /// One approver's vote; see [`VoteOutcome`]. Decides the request when it reaches quorum
    /// (grant) or on the first deny; an expired request is closed first.
    pub async fn vote_on_approval(
        &self,
        id: &str,
        voter: &str,
        grant: bool,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<VoteOutcome, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            static SELECT: PerBackend = PerBackend::new(|backend| {
                format!(
                    "SELECT state, delivery_id, quorum, expires_at, on_expiry, namespace FROM approvals WHERE id = $1{}",
                    row_lock(backend)
                )
            });
            let row: Option<(String, String, i32, DateTime<Utc>, String, String)> =
                sql(SELECT.get(tx.backend())).bind(id).fetch_optional(&mut tx).await?;
            let Some((state, delivery, quorum, expires_at, on_expiry, namespace)) = row else {
                return Ok(VoteOutcome::NotFound);
            };
            if state != "pending" {
                return Ok(VoteOutcome::Closed(state));
            }
            if expires_at <= now {
                let release = on_expiry == "allow";
                let closed = settle_in(&mut tx, id, &delivery, release, "expired", "the request expired", now).await?;
                tx.commit().await?;
                return Ok(VoteOutcome::Closed(closed));
            }
            let vote = if grant { "grant" } else { "deny" };
            let inserted = sql(
                "INSERT INTO approval_votes (approval_id, voter, vote, reason, created_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(voter)
            .bind(vote)
            .bind(reason)
            .bind(now)
            .execute(&mut tx)
            .await?;
            if inserted == 0 {
                return Ok(VoteOutcome::AlreadyVoted);
            }
            let record = NewAuditRecord::new(
                voter,
                "approval.vote",
                &namespace,
                format!("approval/{id}"),
                serde_json::json!({"vote": vote, "reason": reason, "delivery_id": delivery}),
            );
            audit::append_in(&mut tx, &[record]).await?;
            if !grant {
                settle_in(&mut tx, id, &delivery, false, "denied", reason, now).await?;
                tx.commit().await?;
                return Ok(VoteOutcome::Decided("denied".into()));
            }
            let grants: i64 = sql("SELECT COUNT(*) FROM approval_votes WHERE approval_id = $1 AND vote = 'grant'")
                .bind(id)
                .scalar(&mut tx)
                .await?;
            if grants >= i64::from(quorum) {
                settle_in(&mut tx, id, &delivery, true, "granted", reason, now).await?;
                tx.commit().await?;
                return Ok(VoteOutcome::Decided("granted".into()));
            }
            tx.commit().await?;
            Ok(VoteOutcome::Counted { grants: grants as u32, quorum: quorum.max(0) as u32 })
        })
        .await
    }

    /// Approval requests still waiting for a decision.
    pub async fn count_pending_approvals(&self) -> Result<i64, StoreError> {
        self.observed(sql("SELECT COUNT(*) FROM approvals WHERE state = 'pending'").scalar(self.reader())).await
    }

    /// Writes `hookwarden.approval.expiring` for every pending approval whose deadline is
    /// within `before` of `now` (and not past), once per request; returns how many. A
    /// leader-only write, refused ([`StoreError::Fenced`]) once `term` is over.
    pub async fn tell_expiring_approvals(
        &self,
        term: Term,
        now: DateTime<Utc>,
        before: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let until = now + chrono::Duration::from_std(before).unwrap_or(chrono::Duration::MAX);
        self.observed(async {
            let due: Vec<String> = sql("SELECT id FROM approvals WHERE state = 'pending' AND NOT expiring_told \
                 AND expires_at <= $1 AND expires_at > $2 ORDER BY expires_at LIMIT 500")
            .bind(until)
            .bind(now)
            .scalars(self.reader())
            .await?;
            let mut told = 0;
            for id in due {
                let mut tx = self.begin_write().await?;
                leadership::hold_term_in(&mut tx, term).await?;
                let row: Option<(String, String, String, String, DateTime<Utc>, i32)> =
                    sql("UPDATE approvals SET expiring_told = TRUE WHERE id = $1 AND state = 'pending' \
                     AND NOT expiring_told RETURNING namespace, endpoint, event_id, delivery_id, expires_at, quorum")
                    .bind(&id)
                    .fetch_optional(&mut tx)
                    .await?;
                let Some((namespace, endpoint, event, delivery, expires_at, quorum)) = row else { continue };
                // Marked told all the same, so that it is not looked at again.
                if is_operational_in(&mut tx, &event).await? {
                    tx.commit().await?;
                    continue;
                }
                let request = ApprovalRef {
                    namespace: &namespace,
                    endpoint: &endpoint,
                    approval: &id,
                    delivery: &delivery,
                    event: &event,
                };
                let expiring = OperationalEvent::approval_expiring(&ApprovalExpiring {
                    request,
                    expires_at,
                    quorum: quorum.max(0) as u32,
                });
                emit_in(&mut tx, &[expiring], now).await?;
                tx.commit().await?;
                told += 1;
            }
            Ok(told)
        })
        .await
    }

    /// Applies the expiry outcome of every pending approval past its deadline; returns
    /// `(approval, delivery)` of each request it closed. A leader-only write, refused
    /// ([`StoreError::Fenced`]) once `term` is over.
    pub async fn expire_approvals(&self, term: Term, now: DateTime<Utc>) -> Result<Vec<(String, String)>, StoreError> {
        static STATE: PerBackend =
            PerBackend::new(|backend| format!("SELECT state FROM approvals WHERE id = $1{}", row_lock(backend)));
        self.observed(async {
            let due: Vec<(String, String, String)> =
                sql("SELECT id, delivery_id, on_expiry FROM approvals WHERE state = 'pending' AND expires_at <= $1 \
                 ORDER BY expires_at LIMIT 500")
                .bind(now)
                .fetch_all(self.reader())
                .await?;
            let mut expired = Vec::new();
            for (id, delivery, on_expiry) in due {
                let mut tx = self.begin_write().await?;
                leadership::hold_term_in(&mut tx, term).await?;
                let still: Option<String> = sql(STATE.get(tx.backend())).bind(&id).scalar_optional(&mut tx).await?;
                if still.as_deref() != Some("pending") {
                    continue;
                }
                let release = on_expiry == "allow";
                let reason =
                    if release { "expired; the rule allows on expiry" } else { "expired; the rule denies on expiry" };
                settle_in(&mut tx, &id, &delivery, release, "expired", reason, now).await?;
                tx.commit().await?;
                expired.push((id, delivery));
            }
            Ok(expired)
        })
        .await
    }
}

/// The `list_approvals` query.
fn approval_query(query: &ApprovalQuery) -> Statement<'_> {
    static SELECT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE 1 = 1"));
    let mut statement = sql(&SELECT);
    if let Some(namespaces) = &query.namespaces {
        statement = statement.push(" AND namespace IN (");
        for (i, namespace) in namespaces.iter().enumerate() {
            statement = statement.push(if i == 0 { "" } else { ", " }).push_bind(namespace);
        }
        statement = statement.push(")");
    }
    if let Some(state) = &query.state {
        statement = statement.push(" AND state = ").push_bind(state);
    }
    statement.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit))
}

/// Closes approval `id` as `state`; its delivery goes back to the queue (approved) when
/// `release`, else ends denied. Returns `state`.
async fn settle_in(
    tx: &mut Tx,
    id: &str,
    delivery: &str,
    release: bool,
    state: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<String, StoreError> {
    let (namespace, endpoint, event): (String, String, String) =
        sql("SELECT namespace, endpoint, event_id FROM approvals WHERE id = $1").bind(id).fetch_one(&mut *tx).await?;
    if !is_operational_in(tx, &event).await? {
        let told = OperationalEvent::approval(&ApprovalClosed {
            request: ApprovalRef { namespace: &namespace, endpoint: &endpoint, approval: id, delivery, event: &event },
            state,
            reason,
            released: release,
        });
        emit_in(tx, &[told], now).await?;
    }
    let record = NewAuditRecord::new(
        "system",
        &format!("approval.{state}"),
        &namespace,
        format!("approval/{id}"),
        serde_json::json!({"delivery_id": delivery, "reason": reason, "released": release}),
    );
    audit::append_in(tx, &[record]).await?;
    sql("UPDATE approvals SET state = $1, decided_at = $2, decided_reason = $3 WHERE id = $4")
        .bind(state)
        .bind(now)
        .bind(reason)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    if release {
        sql("UPDATE deliveries SET state = 'pending', approved = TRUE, next_attempt_at = $1, updated_at = $1 \
             WHERE id = $2 AND state = 'held'")
        .bind(now)
        .bind(delivery)
        .execute(&mut *tx)
        .await?;
        return Ok(state.to_owned());
    }
    let error = format!("approval {state}: {reason}");
    let ended: Option<(String, i32)> =
        sql("UPDATE deliveries SET state = 'denied', last_error = $1, completed_at = $2, updated_at = $2 \
         WHERE id = $3 AND state = 'held' RETURNING endpoint, attempts")
        .bind(&error)
        .bind(now)
        .bind(delivery)
        .fetch_optional(&mut *tx)
        .await?;
    // The delivery's final outcome, as every other final state gets one; and any
    // reservation of an earlier allow goes back to the budget.
    if let Some((endpoint, attempts)) = ended {
        spend::settle_ledger_in(tx, &[(delivery, "released")]).await?;
        audit::append_in(tx, &[denied_record(&namespace, delivery, &endpoint, attempts, &error)]).await?;
        // An ordered lane's held head ended: the next one may go.
        lanes::end_heads_in(tx, &[delivery]).await?;
    }
    Ok(state.to_owned())
}

/// The `delivery.denied` record of a held delivery that an approver's denial or an expiry
/// ended, shaped like the outcome records of completed attempts.
fn denied_record(namespace: &str, delivery: &str, endpoint: &str, attempts: i32, error: &str) -> NewAuditRecord {
    NewAuditRecord::new(
        "system",
        "delivery.denied",
        namespace,
        format!("delivery/{delivery}"),
        serde_json::json!({"endpoint": endpoint, "attempt": attempts, "status": null, "error": error}),
    )
}
