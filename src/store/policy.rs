//! The policy gate's storage: allow and hold decisions, approval requests and their votes.
//!
//! Invariants:
//! - a decision is committed, with its audit record and its spend reservations, before its
//!   request can leave;
//! - reservations are committed when their delivery is delivered and released when it ends
//!   failed, dead or denied (by the gate, an approver or an expiry);
//! - a held delivery that an approval request ends `denied` gets its `delivery.denied`
//!   audit record in the same transaction, like every other final outcome;
//! - an approval request opened writes its `hookwarden.approval.requested` in the same
//!   transaction, unless the held delivery is of an operational event (no loops);
//! - the first final decision on an approval wins; one vote per subject.
//!
//! Spend windows are kept by [`super::spend`]; approval requests and their votes by
//! [`super::approvals`].

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::operational::emit_in;
use super::sql::{in_list, sql, PerBackend, Tx};
use super::{audit, spend, Backend, EventRow, Store, StoreError, StoredEvent, EVENT_COLUMNS};
use crate::audit::NewAuditRecord;
use crate::ids::DeliveryId;
use crate::operational::{self, OperationalEvent};
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

/// A verdict of the policy gate on a claimed delivery, to record before it may be sent
/// (see [`Store::record_decisions`]).
#[derive(Clone, Debug)]
pub struct DecisionWrite {
    pub id: DeliveryId,
    /// The claim's lease: the decision is recorded only while it holds.
    pub lease_token: String,
    pub namespace: String,
    pub record: DecisionRecord,
    pub verdict: ToRecord,
}

/// What a [`DecisionWrite`] records besides its decision.
#[derive(Clone, Debug)]
pub enum ToRecord {
    /// Send it, with `reservations` reserved; with `enforce_limits` false (a granted hold)
    /// the spend counts whatever the limit.
    Allow { reservations: Vec<SpendReservation>, enforce_limits: bool },
    /// Hold it and open this approval request.
    Hold(Box<NewApproval>),
}

/// What recording a [`DecisionWrite`] came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Allowed: the decision is written and its spend reserved; send it.
    Reserved,
    /// Held: the decision and the approval request are written.
    Held,
    /// Nothing written: the reservation would exceed this rule's limit (another delivery
    /// got there first).
    OverLimit(String),
    /// Nothing written: the lease was lost meanwhile.
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
    /// Where approvers open it (`console.publicUrl` + `/approvals/<id>`), for its
    /// `hookwarden.approval.requested`; `None` without `console.publicUrl`.
    pub link: Option<String>,
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

impl Store {
    /// Records the gate's verdicts on claimed deliveries in one transaction, each guarded
    /// by its lease, and returns what each came to, in order. An allow's spend is reserved
    /// all or none (see [`spend::reserve_in`]), checked against what the earlier writes of
    /// the batch reserved; a hold opens its approval request. Every recorded decision gets
    /// its `policy.decision` audit record (a hold also `approval.requested`), all appended
    /// at once. A store error fails the whole batch: nothing of it is written.
    pub async fn record_decisions(
        &self,
        writes: &[DecisionWrite],
        now: DateTime<Utc>,
    ) -> Result<Vec<Recorded>, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let reservations: Vec<(&str, &SpendReservation)> = writes
                .iter()
                .filter_map(|w| match &w.verdict {
                    ToRecord::Allow { reservations, .. } => {
                        Some(reservations.iter().map(|r| (w.namespace.as_str(), r)))
                    }
                    ToRecord::Hold(_) => None,
                })
                .flatten()
                .collect();
            spend::lock_keys_in(&mut tx, &reservations).await?;
            let leased = leased_in(&mut tx, writes).await?;
            let mut results = Vec::with_capacity(writes.len());
            for w in writes {
                let result = match &w.verdict {
                    _ if !leased.contains(w.id.as_str()) => Recorded::LeaseLost,
                    ToRecord::Allow { reservations, enforce_limits } => {
                        spend::reserve_in(&mut tx, &w.id, &w.namespace, reservations, *enforce_limits, now)
                            .await?
                            .unwrap_or(Recorded::Reserved)
                    }
                    ToRecord::Hold(approval) => {
                        hold_in(&mut tx, w, approval, now).await?;
                        Recorded::Held
                    }
                };
                results.push(result);
            }
            let allowed: Vec<&DecisionWrite> =
                writes.iter().zip(&results).filter(|(_, r)| **r == Recorded::Reserved).map(|(w, _)| w).collect();
            set_decisions_in(&mut tx, &allowed).await?;
            let mut records = Vec::new();
            for (w, result) in writes.iter().zip(&results) {
                match (&w.verdict, result) {
                    (_, Recorded::Reserved) => records.push(decision_record(&w.namespace, &w.id, &w.record)),
                    (ToRecord::Hold(approval), Recorded::Held) => {
                        records.push(decision_record(&w.namespace, &w.id, &w.record));
                        records.push(approval_requested(&w.id, approval));
                    }
                    _ => {}
                }
            }
            // Committed with the decisions, before any of their requests can leave.
            audit::append_in(&mut tx, &records).await?;
            tx.commit().await?;
            Ok(results)
        })
        .await
    }
}

/// The deliveries of `writes` whose lease still holds, locked until `tx` ends (PostgreSQL:
/// `FOR UPDATE`; SQLite: its one writer), so that no other claim can take them meanwhile.
async fn leased_in(tx: &mut Tx, writes: &[DecisionWrite]) -> Result<HashSet<String>, StoreError> {
    static LEASES: PerBackend = PerBackend::new(|backend| {
        let lock = if backend == Backend::Postgres { " FOR UPDATE" } else { "" };
        format!("SELECT id, lease_token FROM deliveries WHERE id {}{lock}", in_list(backend, "$1"))
    });
    let ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();
    let rows: Vec<(String, Option<String>)> = sql(LEASES.get(tx.backend())).bind(ids).fetch_all(&mut *tx).await?;
    let tokens: HashMap<String, Option<String>> = rows.into_iter().collect();
    Ok(writes
        .iter()
        .filter(|w| tokens.get(w.id.as_str()).is_some_and(|t| t.as_deref() == Some(w.lease_token.as_str())))
        .map(|w| w.id.as_str().to_owned())
        .collect())
}

/// Writes the decisions of `allowed` (their leases locked by [`leased_in`]) in one statement.
async fn set_decisions_in(tx: &mut Tx, allowed: &[&DecisionWrite]) -> Result<(), StoreError> {
    if allowed.is_empty() {
        return Ok(());
    }
    static SET: PerBackend = PerBackend::new(|backend| match backend {
        Backend::Postgres => "UPDATE deliveries AS d SET decision = v.decision \
             FROM unnest($1::text[], $2::text[]) AS v(id, decision) WHERE d.id = v.id"
            .to_owned(),
        Backend::Sqlite => "UPDATE deliveries SET decision = v.decision \
             FROM (SELECT i.value AS id, x.value AS decision FROM json_each($1) AS i \
             JOIN json_each($2) AS x ON x.key = i.key) AS v WHERE deliveries.id = v.id"
            .to_owned(),
    });
    let decisions: Vec<String> = allowed.iter().map(|w| w.record.to_json()).collect();
    let ids: Vec<&str> = allowed.iter().map(|w| w.id.as_str()).collect();
    let updated = sql(SET.get(tx.backend()))
        .bind(ids)
        .bind(decisions.iter().map(String::as_str).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    if updated != allowed.len() as u64 {
        return Err(StoreError::Corrupt(format!(
            "{updated} of {} locked deliveries took their decision",
            allowed.len()
        )));
    }
    Ok(())
}

/// Holds the delivery of `w` (its lease locked by [`leased_in`]) and opens `approval`.
async fn hold_in(tx: &mut Tx, w: &DecisionWrite, approval: &NewApproval, now: DateTime<Utc>) -> Result<(), StoreError> {
    sql("UPDATE deliveries SET state = 'held', decision = $1, lease_token = NULL, lease_until = NULL, \
         updated_at = $2 WHERE id = $3")
    .bind(w.record.to_json())
    .bind(now)
    .bind(w.id.as_str())
    .execute(&mut *tx)
    .await?;
    let a = approval;
    sql("INSERT INTO approvals (id, namespace, delivery_id, event_id, endpoint, rule, reason, action_hash, role, \
         quorum, on_expiry, expires_at, requested_by, state, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'pending', $14)")
    .bind(&a.id)
    .bind(&a.namespace)
    .bind(w.id.as_str())
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
    // Approvers are told, with the action as they see it.
    static EVENT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"));
    let event: Option<EventRow> = sql(&EVENT).bind(&a.event_id).fetch_optional(&mut *tx).await?;
    let event = event.map(StoredEvent::try_from).transpose()?;
    // A held delivery of an operational event tells nothing: agent endpoints subscribed to
    // `hookwarden.approval.*` would otherwise tell each other of their holds forever.
    if event.as_ref().is_some_and(|e| operational::is_reserved(&e.event.event_type)) {
        return Ok(());
    }
    let decision = serde_json::to_value(&w.record).unwrap_or(serde_json::Value::Null);
    let told = OperationalEvent::approval_requested(a, w.id.as_str(), event.as_ref(), &decision);
    emit_in(tx, &[told], now).await?;
    Ok(())
}

/// The `approval.requested` audit record of `approval`, for delivery `id`.
fn approval_requested(id: &DeliveryId, a: &NewApproval) -> NewAuditRecord {
    NewAuditRecord::new(
        "system",
        "approval.requested",
        &a.namespace,
        format!("approval/{}", a.id),
        serde_json::json!({"delivery_id": id.as_str(), "event_id": a.event_id, "endpoint": a.endpoint,
            "rule": a.rule, "reason": a.reason, "action_hash": a.action_hash, "role": a.role,
            "quorum": a.quorum, "expires_at": a.expires_at, "on_expiry": a.on_expiry}),
    )
}

/// The `policy.decision` audit record of delivery `id`.
fn decision_record(namespace: &str, id: &DeliveryId, decision: &DecisionRecord) -> NewAuditRecord {
    NewAuditRecord::new("system", "policy.decision", namespace, format!("delivery/{id}"), decision.to_value())
}
