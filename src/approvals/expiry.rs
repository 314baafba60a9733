//! Closing approval requests whose deadline passed, with their rule's `onExpiry` outcome.
//!
//! Deadlines are stored with the request, so a restart forgets none: the first pass after
//! a leader's term begins closes whatever expired meanwhile. The leader runs the job, each
//! expiry fenced by its term (a stale leader's is refused); the store also locks each
//! request row, so a request is closed once. An expiry that denies ends the delivery
//! `denied` with its `delivery.denied` audit record (see `store::policy`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::controller::leadership::Leadership;
use crate::store::Store;

/// How often pending requests are checked against their deadlines.
pub const EXPIRY_PERIOD: Duration = Duration::from_millis(500);

/// Runs until `shutdown`: every [`EXPIRY_PERIOD`] while this process leads, closes the
/// requests past their deadline and wakes the delivery workers for deliveries an expiry
/// released.
pub async fn expire_due_requests(store: Store, leadership: Leadership, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        if let Some(term) = leadership.term() {
            match store.expire_approvals(term, chrono::Utc::now()).await {
                Ok(expired) if !expired.is_empty() => {
                    Leadership::wrote(term, "expiry");
                    for (approval, delivery) in &expired {
                        tracing::info!(approval_id = %approval, delivery_id = %delivery, "approval request expired");
                    }
                    metrics::counter!("hookwarden_policy_approvals_total", "outcome" => "expired")
                        .increment(expired.len() as u64);
                    wake.notify_one();
                }
                Ok(_) => {}
                Err(e) if leadership.fenced(term, &e) => {}
                Err(e) => tracing::warn!(error = %e, "could not expire approval requests"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EXPIRY_PERIOD) => {}
        }
    }
}
