//! The ingest use case as handlers call it: a request's validated events in (see
//! `api::events` for parsing and validation), committed with their fan-out, and an answer
//! per event out: its deliveries (for a duplicate, the original's, as stored), and where
//! fan-out could not decide. Also counts and logs what was accepted.
//!
//! Invariants: the answer costs one store read whatever the number of duplicates in it;
//! a request whose events their EventTypes refuse is answered before anything is queued
//! (see [`super::types`]).

use std::collections::HashMap;

use serde::Serialize;

use super::quota::{lease_batch, Limit, Refusal, Shortfall, Taken, Usage};
use super::types::{check_types, Deprecated, TypeError};
use super::{Accepted, EventFanOut, IngestError, Ingestor};
use crate::catalog::FanOutError;
use crate::ids::{DeliveryId, EventId};
use crate::store::{DeliveryRecord, EventOutcome, IngestRequest, NewDelivery, RequestOutcome, StoreError};

/// The result of one event of a request.
#[derive(Debug, Serialize)]
pub struct EventAccepted {
    pub id: EventId,
    pub duplicate: bool,
    /// The event's deliveries: one per endpoint it fanned out to.
    pub deliveries: Vec<DeliverySummary>,
    /// Endpoints whose Filter or ordering key failed on this event (left out, or sent in
    /// the `(no key)` lane), so that nothing is skipped without a trace.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fanout_errors: Vec<FanOutError>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeliverySummary {
    pub id: DeliveryId,
    pub endpoint: String,
}

impl From<NewDelivery> for DeliverySummary {
    fn from(d: NewDelivery) -> Self {
        DeliverySummary { id: d.id, endpoint: d.endpoint }
    }
}

impl From<&DeliveryRecord> for DeliverySummary {
    fn from(d: &DeliveryRecord) -> Self {
        DeliverySummary { id: d.id.clone(), endpoint: d.endpoint.clone() }
    }
}

/// What a request did: a result per event, in order, and whether anything new was written
/// (`202` then, `200` for a request of duplicates or a replay).
#[derive(Debug)]
pub struct Answer {
    pub results: Vec<EventAccepted>,
    pub created: bool,
    /// The deprecated types the request's events have, each once.
    pub deprecated: Vec<Deprecated>,
    /// What is left of the quota of the request's namespace closest to its limit (none
    /// when no namespace of it has `quotas.ingest`), for the `RateLimit` fields.
    pub quota: Option<Usage>,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The events' EventTypes refuse some of them; nothing written.
    #[error(transparent)]
    Types(#[from] TypeError),
    /// Some events' `data` is larger than their namespace's `quotas.maxPayloadBytes`;
    /// nothing written.
    #[error("{} event(s) with data over their namespace's maxPayloadBytes", .0.len())]
    DataTooLarge(Vec<TooLarge>),
    /// Over a namespace's `quotas.ingest`; nothing written.
    #[error("over the ingest quota of namespace `{}`", quota_namespace(.0))]
    Quota(Refusal),
    /// The idempotency key was used before with a different request; nothing written.
    #[error("the idempotency key was used with a different request")]
    KeyReused,
    /// The request was committed, but its duplicates' deliveries could not be read.
    #[error("cannot read the deliveries of the duplicates")]
    Store(#[from] StoreError),
}

fn quota_namespace(refusal: &Refusal) -> &str {
    match refusal {
        Refusal::Rate { usage, .. } | Refusal::Day { usage, .. } | Refusal::TooMany { usage, .. } => &usage.namespace,
    }
}

/// An event whose `data` is over its namespace's `quotas.maxPayloadBytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// The event's index in the request (0 for a single event).
    pub item: usize,
    pub namespace: String,
    /// The bytes of its `data`'s JSON text.
    pub size: usize,
    pub limit: u64,
}

/// What the "event accepted" log line says of an event, kept while the event is queued.
struct LogFields {
    namespace: String,
    source: String,
    event_type: String,
}

impl Ingestor {
    /// Refuses at once while the delivery backlog is over `delivery.maxBacklog`. Cheap:
    /// call it before reading the request.
    pub fn admit(&self) -> Result<(), IngestError> {
        if self.backlog.waiting() > self.max_backlog {
            return Err(IngestError::Overloaded);
        }
        Ok(())
    }

    /// Commits `request` (see [`Ingestor::submit`]) and answers per event. Each event gets
    /// its namespace's settings first (its dedup window, the largest `data` it may have,
    /// what it does with unknown types: the Namespace's, over the configuration's).
    pub async fn accept(&self, mut request: IngestRequest) -> Result<Answer, AcceptError> {
        let catalog = self.catalog.current();
        let defaults = &self.namespace_defaults;
        let mut too_large = Vec::new();
        let mut wanted: Vec<(String, Limit, u64)> = Vec::new();
        for (item, event) in request.events.iter_mut().enumerate() {
            let settings = catalog.namespace_settings(&event.namespace, defaults);
            event.dedup_window = Some(settings.dedup_window);
            if let Some(limit) = settings.ingest_quota {
                match wanted.iter_mut().find(|(namespace, _, _)| *namespace == event.namespace) {
                    Some((_, _, n)) => *n += 1,
                    None => wanted.push((event.namespace.clone(), limit, 1)),
                }
            }
            if let Some(limit) = settings.max_payload_bytes.filter(|limit| event.data.len() as u64 > *limit) {
                too_large.push(TooLarge { item, namespace: event.namespace.clone(), size: event.data.len(), limit });
            }
        }
        if !too_large.is_empty() {
            return Err(AcceptError::DataTooLarge(too_large));
        }
        let checked = check_types(&catalog, &request.events, |namespace| {
            let set = catalog.namespace_settings(namespace, defaults).unknown_event_types;
            set.unwrap_or_else(|| self.config.unknown_event_types_in(namespace))
        })?;
        let deprecated = checked.deprecated_types(&request.events);
        let trace_id = request.events.first().map(|e| e.trace_id.clone()).unwrap_or_default();
        let fields: Vec<LogFields> = request
            .events
            .iter()
            .map(|e| LogFields {
                namespace: e.namespace.clone(),
                source: e.source.clone(),
                event_type: e.event_type.clone(),
            })
            .collect();
        // Last before the commit: a request refused for any other reason costs no quota.
        // `taken` goes to the writer, which keeps it if the events are (or may have been)
        // written, even when this future is gone by then (a timeout, a client that left).
        let mut taken = self.take_quota(&wanted).await.inspect_err(|e| {
            if let AcceptError::Quota(_) = e {
                metrics::counter!("hookwarden_ingest_events_total", "outcome" => "over_quota")
                    .increment(request.events.len() as u64);
            }
        })?;
        let usage = taken.usage.take();
        let Accepted { outcome, fan_out } = self.submit(request, taken).await?;
        // A replay or a reused key wrote nothing (the writer gave its events back).
        let quota = if matches!(outcome, RequestOutcome::Accepted(_)) { usage } else { None };
        let (outcomes, created) = match outcome {
            RequestOutcome::Accepted(items) => {
                log_accepted(&fields, &items, &fan_out, &trace_id);
                count_deprecated(&fields, &items, &checked.deprecated);
                let created = items.iter().any(|i| !i.duplicate);
                (items, created)
            }
            RequestOutcome::Replayed(ids) => {
                (ids.into_iter().map(|id| EventOutcome { id, duplicate: true }).collect(), false)
            }
            RequestOutcome::KeyReused => return Err(AcceptError::KeyReused),
        };
        // New events: the deliveries just written. Duplicates: the original's, as stored.
        let originals: Vec<EventId> = outcomes.iter().filter(|o| o.duplicate).map(|o| o.id.clone()).collect();
        let stored = self.store.deliveries_of_events(&originals).await?;
        // A replay's events were not fanned out by this request: they have no fan-out.
        let fan_out = fan_out.into_iter().chain(std::iter::repeat_with(EventFanOut::default));
        let results =
            outcomes.into_iter().zip(fan_out).map(|(outcome, fanned)| answer(outcome, fanned, &stored)).collect();
        Ok(Answer { results, created, deprecated, quota })
    }
}

impl Ingestor {
    /// Takes the request's events from its namespaces' quotas: here (SQLite), or from what
    /// this process leased of the shared buckets, leasing more where it is short
    /// (PostgreSQL: one statement per namespace short, none while the leased tokens last).
    async fn take_quota(&self, wanted: &[(String, Limit, u64)]) -> Result<Taken, AcceptError> {
        // Another request may spend what was just leased: a few rounds, then a refusal.
        for _ in 0..3 {
            let now = self.clock.now();
            let needs = match self.quotas.take(wanted, now) {
                Ok(taken) => return Ok(taken),
                Err(Shortfall::Refused(refusal)) => return Err(AcceptError::Quota(refusal)),
                Err(Shortfall::Lease(needs)) => needs,
            };
            for need in needs {
                let batch = lease_batch(&need.limit, need.need);
                let lease = self.store.lease_ingest_tokens(&need.namespace, &need.limit, need.need, batch, now).await?;
                // Leases are asked for in shared mode only, which PostgreSQL answers.
                let Some(lease) = lease else { break };
                self.quotas.leased(&need, lease, now).map_err(AcceptError::Quota)?;
            }
        }
        match self.quotas.contended(wanted, self.clock.now()) {
            Some(refusal) => Err(AcceptError::Quota(refusal)),
            None => Ok(Taken::nothing()),
        }
    }
}

/// `hookwarden_ingest_deprecated_total{type}` of the new events of deprecated types.
fn count_deprecated(fields: &[LogFields], outcomes: &[EventOutcome], deprecated: &[bool]) {
    for ((event, outcome), deprecated) in fields.iter().zip(outcomes).zip(deprecated) {
        if *deprecated && !outcome.duplicate {
            metrics::counter!("hookwarden_ingest_deprecated_total", "type" => event.event_type.clone()).increment(1);
        }
    }
}

fn answer(outcome: EventOutcome, fanned: EventFanOut, stored: &HashMap<EventId, Vec<DeliveryRecord>>) -> EventAccepted {
    let EventOutcome { id, duplicate } = outcome;
    if duplicate {
        // A batch may hold the same duplicate twice: each gets the original's deliveries.
        let deliveries = stored.get(&id).map(|d| d.iter().map(DeliverySummary::from).collect());
        EventAccepted { id, duplicate, deliveries: deliveries.unwrap_or_default(), fanout_errors: Vec::new() }
    } else {
        let deliveries = fanned.deliveries.into_iter().map(DeliverySummary::from).collect();
        EventAccepted { id, duplicate, deliveries, fanout_errors: fanned.errors }
    }
}

fn log_accepted(fields: &[LogFields], outcomes: &[EventOutcome], fan_out: &[EventFanOut], trace_id: &str) {
    let duplicates = outcomes.iter().filter(|o| o.duplicate).count() as u64;
    metrics::counter!("hookwarden_ingest_events_total", "outcome" => "accepted")
        .increment(outcomes.len() as u64 - duplicates);
    metrics::counter!("hookwarden_ingest_events_total", "outcome" => "duplicate").increment(duplicates);
    for ((event, outcome), fanned) in fields.iter().zip(outcomes).zip(fan_out) {
        if outcome.duplicate {
            continue;
        }
        tracing::info!(
            event_id = %outcome.id,
            namespace = %event.namespace,
            source = %event.source,
            event_type = %event.event_type,
            trace_id = %trace_id,
            "event accepted"
        );
        for error in &fanned.errors {
            metrics::counter!("hookwarden_fanout_errors_total", "namespace" => event.namespace.clone(),
                "endpoint" => error.endpoint.clone())
            .increment(1);
            tracing::warn!(
                event_id = %outcome.id,
                namespace = %event.namespace,
                endpoint = %error.endpoint,
                stage = error.stage,
                skipped = error.skipped,
                error = %error.message,
                trace_id = %trace_id,
                "fan-out failed for an endpoint"
            );
        }
    }
}
