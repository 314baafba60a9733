//! Closing approval requests whose deadline passed, with their rule's `onExpiry` outcome.
//!
//! Deadlines are stored with the request, so a restart forgets none: the first pass after
//! start-up closes whatever expired meanwhile. Every process may run the job; the store
//! locks each request row, so a request is closed once. An expiry that denies ends the
//! delivery `denied` with its `delivery.denied` audit record (see `store::policy`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often pending requests are checked against their deadlines.
pub const EXPIRY_PERIOD: Duration = Duration::from_millis(500);

/// Runs until `shutdown`: every [`EXPIRY_PERIOD`], closes the requests past their deadline
/// and wakes the delivery workers for deliveries an expiry released.
pub async fn expire_due_requests(store: Store, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        match store.expire_approvals(chrono::Utc::now()).await {
            Ok(expired) if !expired.is_empty() => {
                for (approval, delivery) in &expired {
                    tracing::info!(approval_id = %approval, delivery_id = %delivery, "approval request expired");
                }
                metrics::counter!("hookwarden_policy_approvals_total", "outcome" => "expired")
                    .increment(expired.len() as u64);
                wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not expire approval requests"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EXPIRY_PERIOD) => {}
        }
    }
}
