//! One attempt of a claimed delivery, from admission to its queued outcome: the body (the
//! standard envelope, or the endpoint's transform, see [`super::transform`], in the
//! endpoint's format, see [`super::wire`]), the policy
//! gate (agent endpoints, see [`super::gate`]), the rate limit, the request (see
//! [`super::http`]), what its result means (see [`super::outcome`]), the hourly retry
//! budget, and the completion for the writer.
//!
//! Invariants:
//! - the body is built once per attempt, before the gate, and is the one signed and sent;
//!   a transform that cannot build it fails the delivery unsent, without a retry (the same
//!   input gives the same error) and with its error on the attempt and the audit record;
//!   when its evaluation thread cannot run it, the delivery is given back instead;
//! - an attempt runs holding its endpoint's [`Slot`] (an agent's: deciding, then taking a
//!   request slot to send, given back if none frees in time to end within the lease); it
//!   is released when the attempt ends, on every path (sent, held, denied, given back,
//!   cancelled, panicked), and the slot learns an outcome only from a send (a refused
//!   private address is a failed one);
//! - an attempt cancelled by the end of the shutdown grace gives its delivery back, due as
//!   it was, instead of recording an outcome;
//! - every attempt that ends a delivery without a request (denied, its endpoint deleted)
//!   leaves the endpoint's health and breaker untouched.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tokio::sync::OwnedSemaphorePermit;

use super::admission::Slot;
use super::dispatch::Dispatcher;
use super::gate::Gated;
use super::outcome::{decide, AttemptResult};
use super::wire::Outgoing;
use super::{signing, transform};
use crate::catalog::{EndpointEntry, EventView};
use crate::config::AuditedOutcomes;
use crate::operational;
use crate::resources::kinds::DeliveryFormat;
use crate::store::{Attempt, ClaimedDelivery, Completion, DeliveryState};
use crate::threads::JobFailed;

/// Why an attempt has no body to send.
enum Unbuilt {
    /// The transform cannot build it, and never will for this input: the reason.
    Failed(String),
    /// The evaluation thread did not run the transform: try again later.
    NotRun(JobFailed),
}

impl Dispatcher {
    /// Whether `ep`'s hourly retry budget grants one more retry, counted for all processes
    /// in the database. When the database cannot say, the retry is granted: a lost count
    /// may let one retry too many, where a refusal would end the delivery for good.
    async fn retry_granted(&self, ep: &EndpointEntry, per_hour: u32) -> bool {
        match self.store.take_retry(&ep.namespace, &ep.name, per_hour, Utc::now()).await {
            Ok(granted) => granted,
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %ep.name, namespace = %ep.namespace, "could not count a retry against the hourly budget; granting it");
                true
            }
        }
    }

    /// Whether the audit chain records the final outcomes of `ep`'s deliveries.
    fn audits_outcomes_of(&self, ep: &EndpointEntry) -> bool {
        ep.spec.agent || self.audited == AuditedOutcomes::All
    }

    /// Waits until `ep`'s rate limit allows one more request.
    async fn pace(&self, ep: &EndpointEntry) {
        let Some(rate) = ep.spec.rate_limit.as_ref().map(|r| r.per_second) else { return };
        while let Some(wait) = self.admission.pace(&ep.namespace, &ep.name, rate, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Ends a delivery without sending it.
    pub(super) fn refuse(
        &self,
        delivery: &ClaimedDelivery,
        state: DeliveryState,
        outcome: &str,
        reason: &str,
    ) -> Completion {
        let now = Utc::now();
        tracing::info!(
            event_id = %delivery.event_id,
            delivery_id = %delivery.id,
            endpoint = %delivery.endpoint,
            namespace = %delivery.namespace,
            state = state.as_str(),
            trace_id = %delivery.trace_id,
            reason,
            "delivery not sent"
        );
        Completion {
            id: delivery.id.clone(),
            event_id: delivery.event_id.clone(),
            lease_token: delivery.lease_token.clone(),
            namespace: delivery.namespace.clone(),
            endpoint: delivery.endpoint.clone(),
            state,
            next_attempt_at: now,
            attempt: Attempt {
                attempt: delivery.attempt,
                started_at: now,
                duration_ms: 0,
                status: None,
                response: None,
                error: Some(reason.to_owned()),
                outcome: outcome.to_owned(),
            },
            // Not the endpoint's doing: its health and breaker are untouched.
            success: None,
            breaker: None,
            disable: None,
            decision: None,
            // An agent delivery may hold a reservation from an earlier allow.
            settle_spend: true,
            ordered: delivery.ordered,
            audit_outcome: true,
            operational: operational::is_reserved(&delivery.event_type),
            failing_at: None,
            dead_letters: Some(self.dead_letters),
            tells: Vec::new(),
        }
    }

    /// What `delivery` sends: the standard envelope, or what the endpoint's transform
    /// builds (on an evaluation thread, within the catalog's budget), in the endpoint's
    /// format (see [`super::wire`]).
    async fn body(&self, delivery: &ClaimedDelivery, ep: &EndpointEntry) -> Result<Outgoing, Unbuilt> {
        let transformed = match &ep.transform {
            None => None,
            Some(Ok(transform)) => Some(self.render(transform.clone(), delivery, ep).await?),
            Some(Err(message)) => return Err(Unbuilt::Failed(format!("the transform cannot be compiled: {message}"))),
        };
        Ok(match ep.spec.format {
            DeliveryFormat::Cloudevents => Outgoing::cloudevents(delivery, transformed),
            DeliveryFormat::Standard => Outgoing::standard(transformed.unwrap_or_else(|| {
                let timestamp = delivery.event_time.unwrap_or(delivery.received_at);
                let timestamp = timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                signing::body(&delivery.event_type, &timestamp, &delivery.data)
            })),
        })
    }

    /// The body `transform` builds for `delivery` to `ep`.
    async fn render(
        &self,
        transform: transform::Transform,
        delivery: &ClaimedDelivery,
        ep: &EndpointEntry,
    ) -> Result<String, Unbuilt> {
        let event = EventView::of_delivery(delivery).to_json();
        let endpoint = transform::endpoint_json(&ep.namespace, &ep.name, &ep.labels);
        let budget = self.catalog.current().budget;
        match self.catalog.evaluate(move || transform.render(&event, &endpoint, budget)).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(message)) => Err(Unbuilt::Failed(format!("the transform failed: {message}"))),
            Err(e) => Err(Unbuilt::NotRun(e)),
        }
    }

    pub(super) async fn attempt(
        self: Arc<Self>,
        delivery: ClaimedDelivery,
        ep: Arc<EndpointEntry>,
        mut slot: Slot,
        _permit: OwnedSemaphorePermit,
        send_by: tokio::time::Instant,
    ) {
        let stop = self.stop_attempts.clone();
        let body = match self.body(&delivery, &ep).await {
            Ok(body) => body,
            Err(Unbuilt::Failed(reason)) => {
                metrics::counter!("hookwarden_delivery_transform_failures_total",
                    "namespace" => delivery.namespace.clone(), "endpoint" => delivery.endpoint.clone())
                .increment(1);
                let mut completion = self.refuse(&delivery, DeliveryState::Failed, "failed", &reason);
                completion.audit_outcome = self.audits_outcomes_of(&ep);
                if self.completions.send(completion).await.is_err() {
                    tracing::warn!(delivery_id = %delivery.id, "completion writer stopped; the lease will expire and the delivery be retried");
                }
                return;
            }
            Err(Unbuilt::NotRun(e)) => {
                tracing::warn!(error = %e, delivery_id = %delivery.id, "the transform could not be run; the delivery is given back");
                let later = Utc::now() + chrono::Duration::seconds(1);
                let _ = self.store.release_deliveries(&[(&delivery.id, delivery.lease_token.as_str())], later).await;
                return;
            }
        };
        if ep.spec.agent && self.gate(&delivery, &ep).await != Gated::Send {
            return;
        }
        if !slot.until_sending(send_by).await {
            // Decided, but the endpoint's requests did not free a slot in time to end
            // within the lease: given back, it is decided again when claimed again.
            tracing::warn!(delivery_id = %delivery.id, endpoint = %delivery.endpoint, "no request slot freed in time after the decision; giving the delivery back");
            metrics::counter!("hookwarden_delivery_given_back_total", "reason" => "busy").increment(1);
            let _ =
                self.store.release_deliveries(&[(&delivery.id, delivery.lease_token.as_str())], delivery.due_at).await;
            return;
        }
        self.pace(&ep).await;
        let started_at = Utc::now();
        let clock = Instant::now();
        let sent = tokio::select! {
            sent = self.http.send(&delivery, &ep, body) => sent,
            _ = stop.cancelled() => {
                let _ = self.store.release_deliveries(&[(&delivery.id, delivery.lease_token.as_str())], delivery.due_at).await;
                return;
            }
        };
        let duration_ms = clock.elapsed().as_millis() as i64;
        let (result, response) = sent;
        let now = Utc::now();
        let counted = delivery.attempt.saturating_sub(delivery.attempt_base).max(1);
        let random: f64 = rand::random();
        let mut decision = decide(&result, counted, &ep.budget, delivery.received_at, now, random, false);
        if decision.state == DeliveryState::Retrying {
            if let Some(per_hour) = ep.budget.retries_per_hour {
                if !self.retry_granted(&ep, per_hour).await {
                    decision = decide(&result, counted, &ep.budget, delivery.received_at, now, random, true);
                }
            }
        }
        let status = match &result {
            AttemptResult::Response { status, .. } => Some(*status),
            _ => None,
        };
        tracing::info!(
            event_id = %delivery.event_id,
            delivery_id = %delivery.id,
            endpoint = %delivery.endpoint,
            namespace = %delivery.namespace,
            attempt = delivery.attempt,
            outcome = decision.outcome,
            state = decision.state.as_str(),
            status,
            duration_ms,
            trace_id = %delivery.trace_id,
            reason = decision.reason.as_deref().unwrap_or(""),
            "delivery attempt"
        );
        slot.observe(decision.success);
        metrics::counter!("hookwarden_delivery_attempts_total", "outcome" => decision.outcome).increment(1);
        metrics::histogram!("hookwarden_delivery_attempt_seconds", "outcome" => decision.outcome)
            .record(duration_ms as f64 / 1000.0);
        let of_operational = operational::is_reserved(&delivery.event_type);
        if decision.state == DeliveryState::Dead {
            metrics::counter!("hookwarden_delivery_dead_letters_total").increment(1);
            if of_operational {
                // Told to nobody (that could loop): logged and counted instead.
                tracing::warn!(
                    event_id = %delivery.event_id,
                    delivery_id = %delivery.id,
                    endpoint = %delivery.endpoint,
                    namespace = %delivery.namespace,
                    event_type = %delivery.event_type,
                    "a delivery of an operational event is dead"
                );
                metrics::counter!("hookwarden_operational_dead_deliveries_total",
                    "namespace" => delivery.namespace.clone(), "endpoint" => delivery.endpoint.clone())
                .increment(1);
            }
        }
        if decision.state == DeliveryState::Retrying {
            metrics::counter!("hookwarden_delivery_retries_total").increment(1);
        }
        let breaker = ep.budget.breaker.map(|(failures, open_for)| {
            (failures, now + chrono::Duration::from_std(open_for).unwrap_or(chrono::Duration::MAX))
        });
        let completion = Completion {
            id: delivery.id.clone(),
            event_id: delivery.event_id.clone(),
            lease_token: delivery.lease_token.clone(),
            namespace: delivery.namespace.clone(),
            endpoint: delivery.endpoint.clone(),
            state: decision.state,
            next_attempt_at: decision.next_attempt_at,
            attempt: Attempt {
                attempt: delivery.attempt,
                started_at,
                duration_ms,
                status,
                response,
                error: if decision.success { None } else { decision.reason.clone() },
                outcome: decision.outcome.into(),
            },
            success: Some(decision.success),
            breaker,
            disable: decision.disable.then(|| ("the receiver answered 410 Gone".to_owned(), ep.generation)),
            decision: None,
            settle_spend: ep.spec.agent,
            ordered: delivery.ordered,
            audit_outcome: self.audits_outcomes_of(&ep),
            operational: of_operational,
            failing_at: ep
                .budget
                .breaker
                .and_then(|(failures, _)| operational::failing_at(self.failing_share, failures)),
            dead_letters: Some(self.dead_letters),
            tells: Vec::new(),
        };
        if self.completions.send(completion).await.is_err() {
            tracing::warn!(delivery_id = %delivery.id, "completion writer stopped; the lease will expire and the delivery be retried");
        }
    }
}
