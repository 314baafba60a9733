//! The dispatcher's work beside the claim loops: the completion writer, which records
//! attempt outcomes in batches, and the queue upkeep, which frees the deliveries of
//! crashed workers.
//!
//! Invariants:
//! - one writer per dispatcher; each completion is guarded by its lease token, and one
//!   whose lease was lost is dropped (counted in the log), never applied twice;
//! - a batch that cannot be written is retried a few times, then dropped: its leases
//!   expire and the upkeep makes its deliveries claimable again, so an outcome may be
//!   attempted again but is never lost silently.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::store::{Completion, Store};

/// Writes completions in batches until every sender is gone. A batch that ends a delivery
/// of an ordered lane makes the lane's next delivery claimable, so it wakes a claim loop;
/// one that opened a breaker or disabled an endpoint signals `status_changed`; one that
/// wrote operational events signals `outbox`.
pub(super) async fn write_completions(
    store: Store,
    mut pending: mpsc::Receiver<Completion>,
    wake: Arc<Notify>,
    status_changed: Arc<Notify>,
    outbox: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(256);
    while pending.recv_many(&mut batch, 256).await > 0 {
        let unblocks = batch.iter().any(|c| c.ordered && c.state.is_final());
        for attempt in 0..5u32 {
            let started = std::time::Instant::now();
            let written = store.complete_attempts(&batch).await;
            metrics::histogram!("hookwarden_delivery_completion_write_seconds").record(started.elapsed().as_secs_f64());
            match written {
                Ok(report) => {
                    if report.lost > 0 {
                        tracing::warn!(
                            lost = report.lost,
                            "attempt results dropped: their lease had expired and another worker owns them"
                        );
                    }
                    for spend in &report.committed_spend {
                        metrics::counter!("hookwarden_policy_spend_committed_total", "namespace" => spend.namespace.clone(),
                            "agent" => spend.endpoint.clone(), "currency" => spend.currency.clone())
                        .increment(spend.amount.max(0) as u64);
                    }
                    if report.operational_events > 0 {
                        outbox.notify_one();
                    }
                    if report.endpoints_changed {
                        status_changed.notify_one();
                        let _ = store.notify_status().await;
                    }
                    break;
                }
                Err(e) if attempt < 4 => {
                    tracing::warn!(error = %e, "writing attempt results failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, count = batch.len(), "attempt results lost; their leases will expire and they will be retried")
                }
            }
        }
        batch.clear();
        if unblocks {
            wake.notify_one();
        }
    }
}

/// Periodically makes deliveries of crashed workers claimable again, and parks deliveries
/// that reached an endpoint after its breaker opened or it was disabled.
pub(super) async fn tend_queue(store: Store, margin: Duration, shutdown: CancellationToken) {
    let period = (margin / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        match store.release_expired_leases(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(released = n, "released deliveries whose lease expired"),
            Err(e) => tracing::warn!(error = %e, "could not release expired leases"),
        }
        match store.park_blocked_deliveries(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(parked = n, "deliveries wait for their endpoint to be sendable again"),
            Err(e) => tracing::warn!(error = %e, "could not park deliveries of blocked endpoints"),
        }
    }
}
