//! Keeping the catalog true: the periodic job that follows the stored resources and the
//! secrets the catalog could not read yet, and what to do when an endpoint becomes
//! sendable or stops being so (a secret that cannot be read is recorded in the store, which
//! tells it once as `hookwarden.endpoint.secret_unavailable`). It runs in every process
//! (each has its own catalog).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{BlockReason, Blocked, CatalogHandle, Transition};
use crate::jobs::{Failures, FirstRun, Job, JobError, Schedule};
use crate::store::{Store, Term};

/// How often the catalog looks for new resources and for secrets that appeared.
pub const FOLLOW_PERIOD: Duration = Duration::from_secs(1);

/// Each run refreshes the catalog when the resources moved (other processes apply too),
/// reads again the secrets it could not, and for each endpoint whose sendability changed
/// says so in the log once (not per event), makes its waiting deliveries due at once when
/// it can be sent to again (`wake`), and wakes the status reconciler (`status_changed`).
/// A transition of the catalog (an apply in this process) brings the next run forward.
pub struct FollowResources {
    pub store: Store,
    pub catalog: CatalogHandle,
    pub status_changed: Arc<Notify>,
    pub wake: Arc<Notify>,
}

impl Job for FollowResources {
    fn schedule(&self) -> Schedule {
        Schedule { name: "follow_resources", period: FOLLOW_PERIOD, leader_only: false, first_run: FirstRun::AtOnce }
    }

    async fn run(&mut self, _: Option<Term>) -> Result<(), JobError> {
        let mut failures = Failures::default();
        if let Err(e) = self.catalog.refresh(&self.store).await {
            failures.note(JobError::Failed(format!("could not refresh the catalog: {e}")))?;
        }
        if let Err(e) = self.catalog.recheck_secrets().await {
            failures.note(JobError::Failed(format!("could not read the endpoints' secrets again: {e}")))?;
        }
        let transitions = self.catalog.take_transitions();
        for t in &transitions {
            act_on(&self.store, t, &self.wake).await;
        }
        if !transitions.is_empty() {
            self.status_changed.notify_one();
        }
        failures.result()
    }

    fn due_early(&self) -> impl std::future::Future<Output = ()> + Send {
        let catalog = self.catalog.clone();
        async move { catalog.transitioned().await }
    }
}

/// Says what changed (a block, once), and sends what waited for an endpoint that can be
/// sent to now (a block lifted, a pause lifted).
async fn act_on(store: &Store, t: &Transition, wake: &Notify) {
    let (namespace, name) = (&t.namespace, &t.name);
    match (&t.before, &t.after) {
        (_, Some(b)) if t.before.as_ref() != Some(b) => tracing::warn!(endpoint = %name, %namespace,
            reason = b.reason.as_str(), problem = %b.message, "endpoint cannot be sent to; its deliveries wait until it can"),
        (Some(_), None) => tracing::info!(endpoint = %name, %namespace,
            "endpoint can be sent to again; its waiting deliveries go out now"),
        _ => {}
    }
    // Told once to the namespace (whichever process finds it first), and again after it
    // could be read for a while.
    let unreadable = |b: &Option<Blocked>| b.as_ref().filter(|b| b.reason == BlockReason::SecretUnavailable).cloned();
    match (unreadable(&t.before), unreadable(&t.after)) {
        (None, Some(now)) => {
            if let Err(e) = store.mark_secret_unavailable(namespace, name, &now.message).await {
                tracing::warn!(error = %e, endpoint = %name, %namespace, "could not record that the endpoint's secret cannot be read");
            }
        }
        (Some(_), None) => {
            if let Err(e) = store.clear_secret_unavailable(namespace, name).await {
                tracing::warn!(error = %e, endpoint = %name, %namespace, "could not record that the endpoint's secret can be read");
            }
        }
        _ => {}
    }
    if t.sendable_again {
        match store.resume_endpoint(namespace, name).await {
            Ok(_) => wake.notify_one(),
            Err(e) => tracing::warn!(error = %e, endpoint = %name, %namespace,
                "could not make the endpoint's waiting deliveries due; they go out at their next look"),
        }
    }
}
