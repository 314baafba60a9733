//! The delivery backlog as last sampled, and the job that samples it once a second for
//! ingest's backpressure and the gauges: queue depth and age, waiting deliveries by why
//! they wait, deliveries by state, open breakers and disabled endpoints apart, pending
//! approvals. It runs in every process: each answers ingest by its own sample.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::CatalogHandle;
use crate::jobs::{Failures, FirstRun, Job, JobError, Schedule};
use crate::store::{DeliveryState, Store, Term};

/// How often the backlog is sampled.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// Deliveries waiting (pending or retrying), as last sampled. Cheap to clone; 0 until the
/// first sample.
#[derive(Clone, Debug, Default)]
pub struct Backlog(Arc<AtomicU64>);

impl Backlog {
    pub fn waiting(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, waiting: u64) {
        self.0.store(waiting, Ordering::Relaxed);
    }
}

/// Samples the backlog into [`Backlog`] and the gauges; each reading that fails is left
/// as it was and the run reports it.
pub struct SampleBacklog {
    pub store: Store,
    pub catalog: CatalogHandle,
    pub backlog: Backlog,
}

impl Job for SampleBacklog {
    fn schedule(&self) -> Schedule {
        Schedule { name: "sample_backlog", period: SAMPLE_PERIOD, leader_only: false, first_run: FirstRun::AtOnce }
    }

    async fn run(&mut self, _: Option<Term>) -> Result<(), JobError> {
        let store = &self.store;
        let mut failures = Failures::default();
        match store.waiting_by_endpoint().await {
            Ok(waiting) => {
                let now = chrono::Utc::now();
                let depth: i64 = waiting.iter().map(|w| w.2).sum();
                self.backlog.set(depth.max(0) as u64);
                metrics::gauge!("hookwarden_delivery_queue_depth").set(depth as f64);
                let oldest = waiting.iter().map(|w| w.3).min();
                let age = oldest.map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
                metrics::gauge!("hookwarden_delivery_oldest_pending_seconds").set(age);
                let states = store.list_endpoint_states().await.unwrap_or_default();
                for (reason, count) in
                    crate::catalog::waiting_by_reason(&self.catalog.current(), &waiting, &states, now)
                {
                    metrics::gauge!("hookwarden_delivery_waiting", "reason" => reason).set(count as f64);
                }
            }
            Err(e) => failures.note(JobError::Store { doing: "sampling the delivery backlog", source: e })?,
        }
        match store.delivery_counts().await {
            Ok(counts) => {
                for state in DeliveryState::ALL.into_iter().filter(|s| !s.is_final()) {
                    let count = counts.iter().find(|(s, _)| s == state.as_str()).map(|(_, n)| *n).unwrap_or(0);
                    metrics::gauge!("hookwarden_deliveries", "state" => state.as_str()).set(count as f64);
                }
            }
            Err(e) => failures.note(JobError::Store { doing: "counting deliveries by state", source: e })?,
        }
        match store.count_blocked_endpoints(chrono::Utc::now()).await {
            Ok(blocked) => {
                metrics::gauge!("hookwarden_delivery_breakers_open").set(blocked.breakers_open as f64);
                metrics::gauge!("hookwarden_delivery_endpoints_disabled").set(blocked.disabled as f64);
            }
            Err(e) => failures.note(JobError::Store { doing: "counting blocked endpoints", source: e })?,
        }
        match store.count_pending_approvals().await {
            Ok(pending) => metrics::gauge!("hookwarden_policy_approvals_pending").set(pending as f64),
            Err(e) => failures.note(JobError::Store { doing: "counting pending approvals", source: e })?,
        }
        super::metrics().run_upkeep();
        failures.result()
    }
}
