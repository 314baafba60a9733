//! Signals between processes: on PostgreSQL, what other processes `NOTIFY` (work became
//! due; resources or endpoint state changed) reaches this process's in-process signals.
//! On SQLite there is one process, and nothing to forward.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Notice, Store};

/// How long to wait before listening again after the listener could not connect.
const RECONNECT_AFTER: Duration = Duration::from_secs(5);

/// Until `shutdown`: wakes this process's delivery workers (`wake`) when any process
/// enqueued work, and its status reconciler (`status_changed`) when any process changed
/// resources or endpoint state. A broken listener is connected again; meanwhile the
/// workers and the reconciler poll.
pub async fn forward_notices(
    store: Store,
    wake: Arc<Notify>,
    status_changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let mut listener = match store.listen_for_work().await {
            Ok(Some(listener)) => listener,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for notifications; workers poll meanwhile");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_AFTER) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = listener.recv() => match received {
                    Ok(Notice::Work) => wake.notify_one(),
                    Ok(Notice::Status) => status_changed.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "notifications interrupted; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}
