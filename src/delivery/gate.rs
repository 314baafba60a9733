//! The policy gate of an agent endpoint's delivery: decided by the rules (on an
//! evaluation thread when they run CEL), then recorded with its spend reservation, held
//! for approvers, or denied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::dispatch::Dispatcher;
use crate::catalog::{EndpointEntry, EventView};
use crate::policy::engine::{self, EndpointView as PolicyEndpoint, Outcome, PolicyDecision, PolicySet, SpendCheck};
use crate::policy::meter::Budget;
use crate::store::policy::{action_hash, AllowResult, NewApproval, SpendReservation};
use crate::store::{ClaimedDelivery, DeliveryState};

impl Dispatcher {
    /// The policy gate for an agent endpoint: true when the delivery may be sent (the
    /// decision and its spend reservation are then committed); otherwise the delivery was
    /// denied or held here.
    pub(super) async fn gate(&self, delivery: &ClaimedDelivery, ep: &EndpointEntry) -> bool {
        let catalog = self.catalog.current();
        let (policy, budget) = (catalog.policy(&delivery.namespace), catalog.budget);
        drop(catalog);
        let time = delivery.event_time.map(|t| t.to_rfc3339());
        let event = Arc::new(
            EventView {
                id: delivery.event_id.as_str(),
                namespace: &delivery.namespace,
                source: &delivery.source,
                event_type: &delivery.event_type,
                subject: delivery.subject.as_deref(),
                time,
                data: &delivery.data,
            }
            .to_json(),
        );
        let decide = |totals: BTreeMap<(String, String, String), i64>, now| {
            self.decide(policy.clone(), event.clone(), ep, totals, now, budget)
        };
        for _ in 0..3 {
            let now = Utc::now();
            // First learn which spend windows the rules look at, then read them.
            let probe = match decide(BTreeMap::new(), now).await {
                Ok(probe) => probe,
                Err(e) => return self.gate_failed(delivery, e).await,
            };
            let keys: Vec<(String, String, String, Duration)> = probe
                .rules
                .iter()
                .filter_map(|r| r.spend.as_ref())
                .map(|s| (s.rule.clone(), s.key.clone(), s.currency.clone(), s.window))
                .collect();
            // Without spend windows the probe already is the decision.
            let decision = if keys.is_empty() {
                probe
            } else {
                let totals = match self.store.spend_totals(&delivery.namespace, &keys, Some(&delivery.id), now).await {
                    Ok(totals) => totals,
                    Err(e) => return self.gate_failed(delivery, e).await,
                };
                match decide(totals, now).await {
                    Ok(decision) => decision,
                    Err(e) => return self.gate_failed(delivery, e).await,
                }
            };
            let recorded = serde_json::to_string(&decision).unwrap_or_default();
            if delivery.approved {
                count_decision("allow", "(approved)");
                // Granted by approvers: sent without a new decision; its spend counts.
                let reservations =
                    reservations(decision.rules.iter().filter(|r| !r.shadow).filter_map(|r| r.spend.as_ref()));
                let granted =
                    format!(r#"{{"outcome":"allow","reason":"granted by approvers","evaluated":{recorded}}}"#);
                return match self
                    .store
                    .allow_delivery(
                        &delivery.id,
                        &delivery.lease_token,
                        &delivery.namespace,
                        &granted,
                        &reservations,
                        false,
                        now,
                    )
                    .await
                {
                    Ok(AllowResult::Reserved) => {
                        count_spend(delivery, &reservations);
                        true
                    }
                    Ok(_) => false,
                    Err(e) => self.gate_failed(delivery, e).await,
                };
            }
            count_decision(outcome_name(decision.outcome), decision.rule.as_deref().unwrap_or("(default)"));
            tracing::info!(
                event_id = %delivery.event_id,
                delivery_id = %delivery.id,
                endpoint = %delivery.endpoint,
                outcome = outcome_name(decision.outcome),
                rule = decision.rule.as_deref().unwrap_or(""),
                reason = %decision.reason,
                revision = %decision.revision,
                trace_id = %delivery.trace_id,
                "policy decision"
            );
            match decision.outcome {
                Outcome::Allow => {
                    let reservations = reservations(decision.spend.iter());
                    match self
                        .store
                        .allow_delivery(
                            &delivery.id,
                            &delivery.lease_token,
                            &delivery.namespace,
                            &recorded,
                            &reservations,
                            true,
                            now,
                        )
                        .await
                    {
                        Ok(AllowResult::Reserved) => {
                            count_spend(delivery, &reservations);
                            return true;
                        }
                        Ok(AllowResult::LeaseLost) => return false,
                        // Another delivery took the budget meanwhile: decide again.
                        Ok(AllowResult::OverLimit(_)) => continue,
                        Err(e) => return self.gate_failed(delivery, e).await,
                    }
                }
                Outcome::Deny => {
                    let mut completion = self.refuse(delivery, DeliveryState::Denied, "denied", &decision.reason);
                    completion.decision = Some(recorded);
                    let _ = self.completions.send(completion).await;
                    return false;
                }
                Outcome::Hold => {
                    let approval = decision
                        .approval
                        .clone()
                        .unwrap_or_else(|| serde_json::from_value(serde_json::json!({})).expect("defaults"));
                    let amounts: Vec<(String, i64)> = decision
                        .rules
                        .iter()
                        .filter_map(|r| r.spend.as_ref())
                        .map(|s| (s.currency.clone(), s.amount))
                        .collect();
                    let request = NewApproval {
                        id: format!("apr_{}", ulid::Ulid::new()),
                        namespace: delivery.namespace.clone(),
                        event_id: delivery.event_id.to_string(),
                        endpoint: delivery.endpoint.clone(),
                        rule: decision.rule.clone(),
                        reason: decision.reason.clone(),
                        action_hash: action_hash(&event, &delivery.namespace, &delivery.endpoint, &amounts),
                        role: approval.role.clone(),
                        quorum: approval.quorum,
                        on_expiry: match approval.on_expiry {
                            crate::resources::kinds::ExpiryOutcome::Allow => "allow".into(),
                            crate::resources::kinds::ExpiryOutcome::Deny => "deny".into(),
                        },
                        expires_at: now
                            + chrono::Duration::from_std(approval.expires_after.0).unwrap_or(chrono::Duration::MAX),
                        requested_by: delivery.ingested_by.clone(),
                    };
                    match self.store.hold_delivery(&delivery.id, &delivery.lease_token, &recorded, &request, now).await
                    {
                        Ok(_) => metrics::counter!("hookwarden_policy_holds_total").increment(1),
                        Err(e) => {
                            self.gate_failed(delivery, e).await;
                        }
                    }
                    return false;
                }
            }
        }
        count_decision("deny", "(spend contention)");
        let mut completion =
            self.refuse(delivery, DeliveryState::Denied, "denied", "the spend budget kept changing while deciding");
        completion.decision = Some(r#"{"outcome":"deny","reason":"spend budget contention"}"#.into());
        let _ = self.completions.send(completion).await;
        false
    }

    /// The policy decision for `ep`, made on an evaluation thread when it runs CEL (see
    /// [`CatalogHandle::evaluate`]).
    async fn decide(
        &self,
        policy: Arc<PolicySet>,
        event: Arc<serde_json::Value>,
        ep: &EndpointEntry,
        totals: BTreeMap<(String, String, String), i64>,
        now: chrono::DateTime<Utc>,
        budget: Budget,
    ) -> Result<PolicyDecision, crate::threads::JobFailed> {
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

    /// The gate could not decide (database trouble): give the delivery back for later.
    async fn gate_failed(&self, delivery: &ClaimedDelivery, error: impl std::fmt::Display) -> bool {
        tracing::warn!(delivery_id = %delivery.id, error = %error, "policy gate could not decide; retrying later");
        let later = Utc::now() + chrono::Duration::seconds(1);
        let _ = self.store.release_deliveries(&[(&delivery.id, delivery.lease_token.as_str())], later).await;
        false
    }
}

/// Policy decisions by outcome and deciding rule (rule names come from resources).
fn count_decision(outcome: &'static str, rule: &str) {
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

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Hold => "hold",
        Outcome::Deny => "deny",
    }
}

fn reservations<'a>(checks: impl Iterator<Item = &'a SpendCheck>) -> Vec<SpendReservation> {
    checks
        .map(|s| SpendReservation {
            rule: s.rule.clone(),
            key: s.key.clone(),
            currency: s.currency.clone(),
            amount: s.amount,
            limit: s.limit,
            window: s.window,
        })
        .collect()
}
