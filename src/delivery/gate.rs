//! The policy gate of an agent endpoint's delivery, carried out against the store: the
//! rules decide (on an evaluation thread when they run CEL), [`policy::gate::judge`] gives
//! the verdict, and this module writes it.
//!
//! Invariants:
//! - a delivery is sent only once its decision is recorded and its spend reserved, in one
//!   transaction guarded by its lease (the decision writer's batch, see
//!   [`super::decisions`]);
//! - when another delivery took the spend budget between the decision and the reservation,
//!   the gate decides again, at most [`policy::gate::DECISIONS`] times, then denies;
//! - a gate that cannot decide (the store or an evaluation thread failed) gives the
//!   delivery back to be tried again: an error never sends and never denies;
//! - every decision is counted in `hookwarden_policy_decisions_total`, and each the rules
//!   made is logged as `policy decision`.
//!
//! [`policy::gate::judge`]: crate::policy::gate::judge
//! [`policy::gate::DECISIONS`]: crate::policy::gate::DECISIONS

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::decisions::{self, NotRecorded};
use super::dispatch::Dispatcher;
use crate::catalog::{EndpointEntry, EventView};
use crate::operational::{self, OperationalEvent, SpendDenied};
use crate::policy::decision::{rule_word, DecisionRecord, PolicyDecision};
use crate::policy::engine::{self, EndpointView as PolicyEndpoint, PolicySet};
use crate::policy::gate::{self, Facts, Verdict};
use crate::policy::meter::Budget;
use crate::store::policy::{DecisionWrite, Recorded, SpendReservation, ToRecord};
use crate::store::{ClaimedDelivery, DeliveryState, StoreError};
use crate::threads::JobFailed;

/// What carrying out a verdict came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Gated {
    /// Decided and recorded, spend reserved: send it.
    Send,
    /// Another delivery took the spend budget meanwhile: decide again.
    DecideAgain,
    /// Not to be sent now: held, denied, given back, or its lease was lost.
    Stop,
}

impl Dispatcher {
    /// The policy gate for a delivery to an agent endpoint: [`Gated::Send`] when it may be
    /// sent; otherwise it was held, denied or given back here (or its lease was lost).
    pub(super) async fn gate(&self, delivery: &ClaimedDelivery, ep: &EndpointEntry) -> Gated {
        let catalog = self.catalog.current();
        let (policy, budget) = (catalog.policy(&delivery.namespace), catalog.budget);
        drop(catalog);
        let event = Arc::new(EventView::of_delivery(delivery).to_json());
        for _ in 0..gate::DECISIONS {
            let now = Utc::now();
            let verdict = match self.decide_spend(&policy, &event, ep, delivery, now, budget).await {
                Ok(decision) => {
                    let approval_id = format!("apr_{}", ulid::Ulid::new());
                    gate::judge(decision, &facts(delivery, &event, &approval_id, self.console.as_deref()), now)
                }
                Err(e) => Verdict::Retry { after: undecided(delivery, e) },
            };
            match self.carry_out(delivery, verdict).await {
                Gated::DecideAgain => continue,
                done => return done,
            }
        }
        self.carry_out(delivery, gate::contended()).await
    }

    /// The rules' decision with the spend already counted in their windows: a first
    /// decision learns which windows the rules look at, then they are read and the rules
    /// decide again (without spend windows the first decision is the one).
    async fn decide_spend(
        &self,
        policy: &Arc<PolicySet>,
        event: &Arc<serde_json::Value>,
        ep: &EndpointEntry,
        delivery: &ClaimedDelivery,
        now: DateTime<Utc>,
        budget: Budget,
    ) -> Result<PolicyDecision, Undecided> {
        let decide = |totals| self.decide(policy.clone(), event.clone(), ep, totals, now, budget);
        let probe = decide(BTreeMap::new()).await?;
        let keys = spend_windows(&probe);
        if keys.is_empty() {
            return Ok(probe);
        }
        let totals = self.store.spend_totals(&delivery.namespace, &keys, Some(&delivery.id), now).await?;
        Ok(decide(totals).await?)
    }

    /// The policy decision for `ep`, made on an evaluation thread when it runs CEL (see
    /// [`crate::catalog::CatalogHandle::evaluate`]).
    async fn decide(
        &self,
        policy: Arc<PolicySet>,
        event: Arc<serde_json::Value>,
        ep: &EndpointEntry,
        totals: BTreeMap<(String, String, String), i64>,
        now: DateTime<Utc>,
        budget: Budget,
    ) -> Result<PolicyDecision, JobFailed> {
        let endpoint = PolicyEndpoint { namespace: &ep.namespace, name: &ep.name, labels: &ep.labels };
        if !policy.evaluates_cel(endpoint) {
            return Ok(engine::decide(&policy, &event, endpoint, &totals, now, budget));
        }
        let (namespace, name, labels) = (ep.namespace.clone(), ep.name.clone(), ep.labels.clone());
        self.catalog
            .evaluate(move || {
                let endpoint = PolicyEndpoint { namespace: &namespace, name: &name, labels: &labels };
                engine::decide(&policy, &event, endpoint, &totals, now, budget)
            })
            .await
    }

    /// Writes `verdict` for `delivery`.
    async fn carry_out(&self, delivery: &ClaimedDelivery, verdict: Verdict) -> Gated {
        if let Some(record) = verdict.record() {
            count_decision(record.counted_as());
            if let DecisionRecord::Evaluated(decision) = record {
                tracing::info!(
                    event_id = %delivery.event_id,
                    delivery_id = %delivery.id,
                    endpoint = %delivery.endpoint,
                    outcome = rule_word(decision.outcome),
                    rule = decision.rule.as_deref().unwrap_or(""),
                    reason = %decision.reason,
                    revision = %decision.revision,
                    trace_id = %delivery.trace_id,
                    "policy decision"
                );
            }
        }
        let write = |record, verdict| DecisionWrite {
            id: delivery.id.clone(),
            lease_token: delivery.lease_token.clone(),
            namespace: delivery.namespace.clone(),
            record,
            verdict,
        };
        match verdict {
            Verdict::Send { reservations, enforce_limits, record } => {
                let spend = reservations.clone();
                match decisions::record(
                    &self.decisions,
                    write(record, ToRecord::Allow { reservations, enforce_limits }),
                )
                .await
                {
                    Ok(Recorded::Reserved) => {
                        count_spend(delivery, &spend);
                        Gated::Send
                    }
                    Ok(Recorded::OverLimit(_)) => Gated::DecideAgain,
                    Ok(Recorded::LeaseLost | Recorded::Held) => Gated::Stop,
                    Err(e) => self.retry_later(delivery, undecided(delivery, e.into())).await,
                }
            }
            Verdict::Hold { request, record } => {
                match decisions::record(&self.decisions, write(record, ToRecord::Hold(request))).await {
                    Ok(Recorded::Held) => metrics::counter!("hookwarden_policy_holds_total").increment(1),
                    Ok(_) => {}
                    Err(e) => {
                        self.retry_later(delivery, undecided(delivery, e.into())).await;
                    }
                }
                Gated::Stop
            }
            Verdict::Deny { reason, record } => {
                let mut completion = self.refuse(delivery, DeliveryState::Denied, "denied", &reason);
                if let DecisionRecord::Evaluated(decision) = &record {
                    if let Some(spend) = operational::spend_denial(decision) {
                        completion.tells.push(OperationalEvent::spend_limit_reached(&SpendDenied {
                            namespace: &delivery.namespace,
                            endpoint: &delivery.endpoint,
                            delivery: delivery.id.as_str(),
                            event: delivery.event_id.as_str(),
                            spend,
                            reason: &reason,
                        }));
                    }
                }
                completion.decision = Some(record.to_json());
                let _ = self.completions.send(completion).await;
                Gated::Stop
            }
            Verdict::Retry { after } => self.retry_later(delivery, after).await,
        }
    }

    /// Gives `delivery` back, due again `after` from now.
    async fn retry_later(&self, delivery: &ClaimedDelivery, after: Duration) -> Gated {
        let later = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
        let _ = self.store.release_deliveries(&[(&delivery.id, delivery.lease_token.as_str())], later).await;
        Gated::Stop
    }
}

/// What the verdict on `delivery` is judged by: the `event` its rules saw, and the id its
/// approval request gets if it is held.
pub(crate) fn facts<'a>(
    delivery: &'a ClaimedDelivery,
    event: &'a serde_json::Value,
    approval_id: &'a str,
    console: Option<&'a str>,
) -> Facts<'a> {
    Facts {
        event,
        event_id: delivery.event_id.as_str(),
        namespace: &delivery.namespace,
        endpoint: &delivery.endpoint,
        requested_by: &delivery.ingested_by,
        approved: delivery.approved,
        approval_id,
        console,
    }
}

/// The spend windows a decision's rules looked at, `(rule, key, currency, window)`: what
/// [`crate::store::Store::spend_totals`] reads before the rules decide with them.
pub(crate) fn spend_windows(decision: &PolicyDecision) -> Vec<(String, String, String, Duration)> {
    decision
        .rules
        .iter()
        .filter_map(|r| r.spend.as_ref())
        .map(|s| (s.rule.clone(), s.key.clone(), s.currency.clone(), s.window))
        .collect()
}

/// Why the gate could not decide or record its verdict.
#[derive(Debug, thiserror::Error)]
enum Undecided {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Evaluation(#[from] JobFailed),
    #[error(transparent)]
    Recording(#[from] NotRecorded),
}

/// Notes that the gate could not decide `delivery`; how long until it is tried again.
fn undecided(delivery: &ClaimedDelivery, error: Undecided) -> Duration {
    tracing::warn!(delivery_id = %delivery.id, error = %error, "policy gate could not decide; retrying later");
    gate::UNDECIDED_RETRY
}

/// Policy decisions by outcome and deciding rule (rule names come from resources).
fn count_decision((outcome, rule): (&'static str, &str)) {
    metrics::counter!("hookwarden_policy_decisions_total", "outcome" => outcome, "rule" => rule.to_owned())
        .increment(1);
}

/// Spend reserved per agent endpoint and currency, in minor units: every reservation an
/// allow made, so a delivery allowed again after a retry counts again. What the ledger
/// committed is `hookwarden_policy_spend_committed_total`.
fn count_spend(delivery: &ClaimedDelivery, reservations: &[SpendReservation]) {
    for r in reservations {
        metrics::counter!("hookwarden_policy_spend_reserved_total", "namespace" => delivery.namespace.clone(),
            "agent" => delivery.endpoint.clone(), "currency" => r.currency.clone())
        .increment(r.amount.max(0) as u64);
    }
}
