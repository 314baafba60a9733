//! Closing approval requests whose deadline passed, with their rule's `onExpiry` outcome.
//!
//! Deadlines are stored with the request, so a restart forgets none: the first run after a
//! leader's term begins closes whatever expired meanwhile. The leader runs the job (a
//! leader-only [`crate::jobs::Job`]), each expiry fenced by its term (a stale leader's is
//! refused); the store also locks each request row, so a request is closed once. An expiry
//! that denies ends the delivery `denied` with its `delivery.denied` audit record (see
//! `store::policy`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::controller::leadership::Leadership;
use crate::jobs::{leader_term, FirstRun, Job, JobError, Schedule};
use crate::store::{Store, Term};

/// How often pending requests are checked against their deadlines.
pub const EXPIRY_PERIOD: Duration = Duration::from_millis(500);

/// Every [`EXPIRY_PERIOD`] while this process leads: tells approvers of requests whose
/// deadline is near, closes the requests past their deadline and wakes the delivery
/// workers for deliveries an expiry released.
pub struct ExpireDueRequests {
    pub store: Store,
    pub wake: Arc<Notify>,
    /// `operationalEvents.approvalExpiringBefore`: approvers are told this long before a
    /// deadline (`hookwarden.approval.expiring`).
    pub expiring_before: Duration,
}

impl Job for ExpireDueRequests {
    fn schedule(&self) -> Schedule {
        Schedule { name: "expire_approvals", period: EXPIRY_PERIOD, leader_only: true, first_run: FirstRun::AtOnce }
    }

    async fn run(&mut self, term: Option<Term>) -> Result<(), JobError> {
        let term = leader_term(term)?;
        let now = chrono::Utc::now();
        let expiring = self
            .store
            .tell_expiring_approvals(term, now, self.expiring_before)
            .await
            .map_err(JobError::store("telling approvers of near deadlines"))?;
        if expiring > 0 {
            Leadership::wrote(term, "expiry");
        }
        let expired =
            self.store.expire_approvals(term, now).await.map_err(JobError::store("expiring approval requests"))?;
        if expired.is_empty() {
            return Ok(());
        }
        Leadership::wrote(term, "expiry");
        for (approval, delivery) in &expired {
            tracing::info!(approval_id = %approval, delivery_id = %delivery, "approval request expired");
        }
        metrics::counter!("hookwarden_policy_approvals_total", "outcome" => "expired").increment(expired.len() as u64);
        self.wake.notify_one();
        Ok(())
    }
}
