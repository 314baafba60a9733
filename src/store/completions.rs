//! Writing attempt results: a batch of completions in one transaction, each applied only
//! while its lease is held, with what follows from it (attempts, spend settled, endpoint
//! health and breakers, disabling, the operational events of those transitions (see
//! [`crate::operational`]), audit records, ordered lanes moving on).
//!
//! Invariants (with those of [`super::deliveries`]):
//! - a completion applies only if it carries the current lease token (one row or none); a
//!   lost lease drops the result, never overwrites a newer one;
//! - a batch is one transaction of set-sized statements on PostgreSQL, whatever its size;
//! - locks are taken in one order (deliveries, endpoint state sorted by name, spend, audit
//!   chains sorted, lanes last), so concurrent writers cannot deadlock.
//!
//! The delivery updates with their attempts, and the ledger's part of the spend settlement,
//! are shaped per backend (`write_completions_in` and `settle_spend_in` in `postgres.rs`
//! and `sqlite.rs`); the rest is written once.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::deliveries::{CommittedSpend, Completion, CompletionReport, DeadLetterAlert, DeliveryState};
use super::operational::emit_in;
use super::queue::{disabled_until, park_in};
use super::sql::{row_lock, sql, PerBackend, Tx};
use super::{audit, claims, lanes, spend, PgStore, SqliteStore, Store, StoreError};
use crate::audit::NewAuditRecord;
use crate::ids::DeliveryId;
use crate::operational::{self, DeadDelivery, HealthChange, OperationalEvent};

impl Store {
    /// Writes attempt results guarded by their lease; see [`CompletionReport`]: how many
    /// leases were lost, and whether an endpoint's breaker opened or it was disabled.
    pub async fn complete_attempts(&self, completions: &[Completion]) -> Result<CompletionReport, StoreError> {
        self.observed(async {
            let now = Utc::now();
            let mut tx = self.begin_write().await?;
            let applied = match &mut tx {
                Tx::Pg(tx) => PgStore::write_completions_in(tx, completions, now).await?,
                Tx::Sqlite(tx) => SqliteStore::write_completions_in(tx, completions, now).await?,
            };
            let kept: Vec<&Completion> =
                completions.iter().zip(&applied).filter(|(_, applied)| **applied).map(|(c, _)| c).collect();
            let lost = (completions.len() - kept.len()) as u64;
            let mut report = CompletionReport { lost, ..CompletionReport::default() };
            if kept.is_empty() {
                tx.commit().await?;
                return Ok(report);
            }
            report.committed_spend = settle_spend_in(&mut tx, &kept).await?;
            // The operational events of the batch's transitions, written with them.
            let mut told: Vec<OperationalEvent> = Vec::new();
            for delta in health_deltas(&kept) {
                // Whether a success closes the breaker: read first, under the row's lock
                // (only for an endpoint with a breaker, so that plain ones pay nothing).
                let was_open =
                    delta.tells && delta.reset && delta.has_breaker && breaker_set_in(&mut tx, &delta).await?;
                let (after, open_until) = record_health_in(&mut tx, &delta, now).await?;
                if let Some(until) = open_until.filter(|until| *until > now) {
                    park_in(&mut tx, delta.namespace, delta.endpoint, until).await?;
                    report.endpoints_changed = true;
                }
                if delta.tells {
                    told.extend(health_events(&delta, after, open_until, was_open));
                }
            }
            // Half-open probes end with their attempt (its endpoint state is locked above).
            // Only endpoints with a breaker have probes; an attempt at one says so.
            let tokens: Vec<(&DeliveryId, &str)> = kept
                .iter()
                .filter(|c| c.breaker.is_some() || c.success.is_none())
                .map(|c| (&c.id, c.lease_token.as_str()))
                .collect();
            claims::release_probes_in(&mut tx, &tokens).await?;
            for c in &kept {
                if let Some((reason, generation)) = &c.disable {
                    // The first 410 disables it (and is told); later ones of the batch, or
                    // of deliveries in flight meanwhile, only write the reason again.
                    const DISABLE: &str = "UPDATE endpoint_state SET disabled_reason = $1, disabled_generation = $2 \
                         WHERE namespace = $3 AND name = $4";
                    static FIRST: std::sync::LazyLock<String> =
                        std::sync::LazyLock::new(|| format!("{DISABLE} AND disabled_reason IS NULL"));
                    let disable = |text: &'static str| {
                        sql(text).bind(reason).bind(*generation).bind(&c.namespace).bind(&c.endpoint)
                    };
                    let first = disable(FIRST.as_str()).execute(&mut tx).await? == 1;
                    if !first {
                        disable(DISABLE).execute(&mut tx).await?;
                    }
                    park_in(&mut tx, &c.namespace, &c.endpoint, disabled_until(now)).await?;
                    report.endpoints_changed = true;
                    if first && !c.operational {
                        told.push(OperationalEvent::endpoint(
                            operational::ENDPOINT_DISABLED,
                            &c.namespace,
                            &c.endpoint,
                            serde_json::json!({"reason": reason, "status": c.attempt.status,
                                "response": c.attempt.response}),
                        ));
                    }
                }
            }
            told.extend(kept.iter().filter(|c| c.state == DeliveryState::Dead && !c.operational).map(|c| {
                OperationalEvent::delivery_dead(&DeadDelivery {
                    namespace: &c.namespace,
                    endpoint: &c.endpoint,
                    event: c.event_id.as_str(),
                    delivery: c.id.as_str(),
                    attempts: c.attempt.attempt,
                    last_status: c.attempt.status,
                    last_error: c.attempt.error.as_deref(),
                })
            }));
            told.extend(dead_letter_events_in(&mut tx, &kept, now).await?);
            told.extend(kept.iter().filter(|c| !c.operational).flat_map(|c| c.tells.iter().cloned()));
            if !told.is_empty() {
                emit_in(&mut tx, &told, now).await?;
                report.operational_events = told.len();
            }
            let records: Vec<NewAuditRecord> = kept.iter().flat_map(|c| completion_audit_records(c)).collect();
            if !records.is_empty() {
                audit::append_in(&mut tx, &records).await?;
            }
            // Last, after the audit appends (the lock order of `super::lanes`).
            let ended: Vec<&str> =
                kept.iter().filter(|c| c.ordered && c.state.is_final()).map(|c| c.id.as_str()).collect();
            lanes::end_heads_in(&mut tx, &ended).await?;
            tx.commit().await?;
            Ok(report)
        })
        .await
    }
}

/// Commits the spend reservations of the delivered among `kept`, and releases those of the
/// others that ended; returns what was committed.
async fn settle_spend_in(tx: &mut Tx, kept: &[&Completion]) -> Result<Vec<CommittedSpend>, StoreError> {
    let settled: Vec<(&str, &'static str)> = kept
        .iter()
        .filter(|c| c.settle_spend)
        .filter_map(|c| spend::ledger_state_for(c.state).map(|s| (c.id.as_str(), s)))
        .collect();
    Ok(spend::settle_ledger_in(tx, &settled)
        .await?
        .into_iter()
        .filter_map(|(id, currency, amount)| {
            let c = kept.iter().find(|c| c.id.as_str() == id)?;
            Some(CommittedSpend { namespace: c.namespace.clone(), endpoint: c.endpoint.clone(), currency, amount })
        })
        .collect())
}

/// `hookwarden.dead_letters.threshold` of each endpoint whose dead letters within its
/// alert's window crossed its count with the deaths of this batch (written already, in
/// this transaction). The endpoints' state rows are locked by then (their health was
/// folded), so concurrent batches count one after the other and a crossing is told once.
async fn dead_letter_events_in(
    tx: &mut Tx,
    kept: &[&Completion],
    now: DateTime<Utc>,
) -> Result<Vec<OperationalEvent>, StoreError> {
    let mut deaths: BTreeMap<(&str, &str), (i64, DeadLetterAlert)> = BTreeMap::new();
    for c in kept.iter().filter(|c| c.state == DeliveryState::Dead && !c.operational) {
        if let Some(alert) = c.dead_letters {
            deaths.entry((&c.namespace, &c.endpoint)).or_insert((0, alert)).0 += 1;
        }
    }
    let mut told = Vec::new();
    for ((namespace, endpoint), (died, alert)) in deaths {
        let since = now - chrono::Duration::from_std(alert.window).unwrap_or(chrono::Duration::MAX);
        let dead: i64 = sql("SELECT COUNT(*) FROM deliveries WHERE namespace = $1 AND endpoint = $2 \
             AND state = 'dead' AND completed_at > $3")
        .bind(namespace)
        .bind(endpoint)
        .bind(since)
        .scalar(&mut *tx)
        .await?;
        let count = i64::from(alert.count);
        if dead - died < count && count <= dead {
            told.push(OperationalEvent::endpoint(
                operational::DEAD_LETTERS_THRESHOLD,
                namespace,
                endpoint,
                serde_json::json!({"deadLetters": dead, "threshold": alert.count,
                    "windowSeconds": alert.window.as_secs()}),
            ));
        }
    }
    Ok(told)
}

/// Whether the endpoint's breaker is open or half-open (set, not yet closed by a
/// success), locking its state on PostgreSQL (SQLite's one writer holds it already).
async fn breaker_set_in(tx: &mut Tx, delta: &HealthDelta<'_>) -> Result<bool, StoreError> {
    static SELECT: PerBackend = PerBackend::new(|backend| {
        format!("SELECT breaker_open_until FROM endpoint_state WHERE namespace = $1 AND name = $2{}", row_lock(backend))
    });
    let until: Option<Option<DateTime<Utc>>> =
        sql(SELECT.get(tx.backend())).bind(delta.namespace).bind(delta.endpoint).scalar_optional(&mut *tx).await?;
    Ok(until.flatten().is_some())
}

/// The operational events of one endpoint's health change (see [`HealthChange`]).
fn health_events(
    delta: &HealthDelta<'_>,
    after: i32,
    open_until: Option<DateTime<Utc>>,
    was_open: bool,
) -> Vec<OperationalEvent> {
    let threshold = u32::try_from(delta.threshold).ok();
    let change = HealthChange {
        reset: delta.reset,
        failures: delta.failures.max(0) as u32,
        after: after.max(0) as u32,
        threshold,
        failing_at: delta.failing_at,
        was_open,
    };
    change
        .transitions()
        .into_iter()
        .map(|told| {
            let data = match told {
                operational::ENDPOINT_BREAKER_OPENED => serde_json::json!({"consecutiveFailures": after,
                    "breakerThreshold": threshold, "openUntil": open_until.map(operational::timestamp)}),
                operational::ENDPOINT_FAILING => serde_json::json!({"consecutiveFailures": after,
                    "failingAt": delta.failing_at, "breakerThreshold": threshold}),
                _ => serde_json::json!({}),
            };
            OperationalEvent::endpoint(told, delta.namespace, delta.endpoint, data)
        })
        .collect()
}

/// Folds one endpoint's attempts of the batch into its health: a success restarts the
/// count from the failures after it; the breaker opens when the count reaches the
/// threshold. Returns the count after it, and until when the breaker is open now, if it is.
async fn record_health_in(
    tx: &mut Tx,
    delta: &HealthDelta<'_>,
    now: DateTime<Utc>,
) -> Result<(i32, Option<DateTime<Utc>>), StoreError> {
    sql("INSERT INTO endpoint_state (namespace, name, consecutive_failures, breaker_open_until, last_success_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (namespace, name) DO UPDATE SET \
         consecutive_failures = CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.consecutive_failures \
             ELSE endpoint_state.consecutive_failures + excluded.consecutive_failures END, \
         breaker_open_until = CASE WHEN (CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.consecutive_failures \
             ELSE endpoint_state.consecutive_failures + excluded.consecutive_failures END) >= $6 THEN $7 \
             WHEN excluded.last_success_at IS NOT NULL THEN NULL ELSE endpoint_state.breaker_open_until END, \
         last_success_at = COALESCE(excluded.last_success_at, endpoint_state.last_success_at) \
         RETURNING consecutive_failures, breaker_open_until")
    .bind(delta.namespace)
    .bind(delta.endpoint)
    .bind(delta.failures)
    .bind(delta.open_until.filter(|_| i64::from(delta.failures) >= delta.threshold))
    .bind(delta.reset.then_some(now))
    .bind(delta.threshold)
    .bind(delta.open_until)
    .fetch_one(tx)
    .await
}

/// What a batch of completions does to one endpoint's health, folded in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HealthDelta<'a> {
    namespace: &'a str,
    endpoint: &'a str,
    /// A success was among the attempts: the failure count restarts after it.
    reset: bool,
    /// Failures after the last success (all of them when there was none).
    failures: i32,
    /// Failures that open the breaker (`i64::MAX` without a breaker), and until when it
    /// then stays open: of the batch's last attempt that had a breaker.
    threshold: i64,
    open_until: Option<DateTime<Utc>>,
    /// The failures at which the endpoint is told `failing` (of the same attempt).
    failing_at: Option<u32>,
    /// An attempt of the batch was of an ordinary event: the change is told (one made by
    /// deliveries of operational events alone is not, so that they cannot loop).
    tells: bool,
    /// An attempt of the batch was at the endpoint with a breaker.
    has_breaker: bool,
}

/// One [`HealthDelta`] per endpoint that attempts were made at, sorted by endpoint (the
/// order in which writers lock endpoint state). Completions that sent nothing (`success`
/// is `None`) leave health alone.
fn health_deltas<'a>(completions: &[&'a Completion]) -> Vec<HealthDelta<'a>> {
    let mut deltas: BTreeMap<(&str, &str), HealthDelta<'a>> = BTreeMap::new();
    for c in completions {
        let Some(success) = c.success else { continue };
        let delta = deltas.entry((&c.namespace, &c.endpoint)).or_insert_with(|| HealthDelta {
            namespace: &c.namespace,
            endpoint: &c.endpoint,
            reset: false,
            failures: 0,
            threshold: i64::MAX,
            open_until: None,
            failing_at: None,
            tells: false,
            has_breaker: false,
        });
        delta.tells |= !c.operational;
        delta.has_breaker |= c.breaker.is_some();
        if success {
            delta.reset = true;
            delta.failures = 0;
        } else {
            delta.failures = delta.failures.saturating_add(1);
            if let Some((threshold, until)) = c.breaker {
                delta.threshold = i64::from(threshold);
                delta.open_until = Some(until);
                delta.failing_at = c.failing_at;
            }
        }
    }
    deltas.into_values().collect()
}

/// The audit records a written completion carries: its policy decision, its final
/// outcome (when audited), and the endpoint's disabling.
fn completion_audit_records(c: &Completion) -> Vec<NewAuditRecord> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EventId;
    use crate::store::deliveries::Attempt;

    fn completion(endpoint: &str, success: Option<bool>, breaker: Option<(u32, DateTime<Utc>)>) -> Completion {
        let now = Utc::now();
        Completion {
            id: DeliveryId::generate(),
            event_id: EventId::generate(),
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
            operational: false,
            failing_at: None,
            dead_letters: None,
            tells: Vec::new(),
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
