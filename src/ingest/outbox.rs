//! The fan-out of operational events (see [`crate::operational`]): the transitions'
//! transactions leave them in the outbox; this job, in every process, gives them their
//! deliveries by the catalog in force, as ingest does for the events it accepts.
//!
//! Invariants (with those of the store's outbox):
//! - each event is fanned out once, by whichever process commits first; the others' work
//!   is left out by the commit;
//! - the fan-out is committed only at the resource revision it was decided by (decided
//!   again otherwise), like an ingest commit;
//! - an event about an endpoint is never delivered to that endpoint;
//! - a row of the outbox that does not read as an event holds up no other: it is left
//!   there, logged with its id and counted once per process
//!   (`hookwarden_operational_unreadable_events_total`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::fan_out_events;
use crate::catalog::CatalogHandle;
use crate::jobs::{FirstRun, Job, JobError, Schedule};
use crate::store::{OutboxCommitted, Store, Term};

/// Most events one round takes from the outbox.
const ROUND: u32 = 256;

/// Rounds of one run before it waits for the next period (the outbox is drained in a few
/// runs however much a burst of transitions wrote).
const ROUNDS: usize = 8;

/// Fans out what waits in the outbox, every `period` and whenever `signal` is notified.
pub struct FanOutOutbox {
    pub store: Store,
    pub catalog: CatalogHandle,
    /// Signalled after deliveries were written.
    pub wake: Arc<Notify>,
    /// Signalled by this process's transitions that wrote operational events.
    pub signal: Arc<Notify>,
    pub period: Duration,
    /// Ids of outbox rows that do not read as an event, already logged and counted.
    pub unreadable: HashSet<String>,
}

impl Job for FanOutOutbox {
    fn schedule(&self) -> Schedule {
        Schedule {
            name: "fan_out_operational_events",
            period: self.period,
            leader_only: false,
            first_run: FirstRun::AtOnce,
        }
    }

    fn due_early(&self) -> impl std::future::Future<Output = ()> + Send {
        let signal = self.signal.clone();
        async move { signal.notified().await }
    }

    async fn run(&mut self, _term: Option<Term>) -> Result<(), JobError> {
        for _ in 0..ROUNDS {
            let read =
                self.store.outbox_events(ROUND).await.map_err(JobError::store("reading the operational events"))?;
            let full = read.events.len() + read.unreadable.len() == ROUND as usize;
            for (id, error) in &read.unreadable {
                // Left in the outbox, told once per process; the others go on.
                if self.unreadable.insert(id.clone()) {
                    tracing::error!(event_id = %id, error = %error,
                        "an operational event in the outbox does not read");
                    metrics::counter!("hookwarden_operational_unreadable_events_total").increment(1);
                }
            }
            let waiting = read.events;
            if waiting.is_empty() {
                return Ok(());
            }
            let (events, about): (Vec<_>, Vec<_>) = waiting.into_iter().map(|w| (w.event, w.about_endpoint)).unzip();
            let catalog = self.catalog.current();
            let revision = catalog.revision.unwrap_or(-1);
            let (mut events, errors) = fan_out_events(&self.catalog, catalog, events)
                .await
                .map_err(|e| JobError::Failed(format!("fanning out operational events: {e}")))?;
            for ((event, about), errors) in events.iter_mut().zip(&about).zip(&errors) {
                // Never to the endpoint it is about (a notification endpoint's own trouble).
                event.deliveries.retain(|d| Some(&d.endpoint) != about.as_ref());
                for error in errors {
                    tracing::warn!(event_id = %event.id, event_type = %event.event_type, endpoint = %error.endpoint,
                        message = %error.message, "the fan-out of an operational event could not decide for an endpoint");
                }
            }
            match self.store.fan_out_outbox(&events, revision).await {
                Ok(OutboxCommitted::Written(ids)) => {
                    let delivered = events.iter().filter(|e| ids.contains(&e.id));
                    let mut fanned_out = false;
                    for event in delivered {
                        fanned_out |= !event.deliveries.is_empty();
                        tracing::info!(event_id = %event.id, event_type = %event.event_type, namespace = %event.namespace,
                            deliveries = event.deliveries.len(), "operational event fanned out");
                        metrics::counter!("hookwarden_operational_events_total", "type" => event.event_type.clone())
                            .increment(1);
                    }
                    if fanned_out {
                        self.wake.notify_one();
                    }
                }
                Ok(OutboxCommitted::Stale { revision }) => {
                    tracing::debug!(revision, "resources changed since the outbox's fan-out; deciding it again");
                    if let Err(e) = self.catalog.refresh(&self.store).await {
                        tracing::warn!(error = %e, "could not refresh the catalog before the outbox's fan-out");
                    }
                    continue;
                }
                Err(e) => return Err(JobError::Store { doing: "fanning out operational events", source: e }),
            }
            if !full {
                return Ok(());
            }
        }
        Ok(())
    }
}
