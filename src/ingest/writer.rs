//! Group commit of ingested events.
//!
//! Writer tasks take every request that is waiting (up to `maxCommitEvents` events),
//! write them in one transaction, and only after the commit answer each handler.
//! Durability costs one fsync per batch instead of one per request, so throughput grows
//! with concurrency. The commit is checked against the resource revision the batch's
//! fan-out was decided by; when the resources moved on, the catalog is refreshed and the
//! fan-out decided again before anything is written.
//!
//! Invariants: a handler is answered `Ok` only after its events are committed; the queue
//! is bounded (a full queue answers [`IngestError::Overloaded`] at once, memory never
//! grows with load); one bad request cannot fail the others of its batch.

use std::sync::Arc;

use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::task::TaskTracker;

use super::{FannedOut, IngestError, Job};
use crate::catalog::CatalogHandle;
use crate::config::IngestConfig;
use crate::store::{Committed, IngestRequest, RequestOutcome, Store};

struct Queue {
    receiver: mpsc::Receiver<Job>,
    /// A job taken from the channel that did not fit the previous batch.
    carried: Option<Job>,
}

/// Starts the writers; returns the queue they take jobs from.
pub(super) fn start(
    store: Store,
    catalog: CatalogHandle,
    config: &IngestConfig,
    tracker: &TaskTracker,
    wake: Arc<Notify>,
) -> mpsc::Sender<Job> {
    let (queue, receiver) = mpsc::channel(config.queue_capacity);
    let shared = Arc::new(Mutex::new(Queue { receiver, carried: None }));
    let writers = match (config.writers, store.backend()) {
        (0, crate::store::Backend::Sqlite) => 1,
        (0, crate::store::Backend::Postgres) => 2,
        (n, _) => n,
    };
    for _ in 0..writers {
        let writer = Writer { store: store.clone(), catalog: catalog.clone() };
        tracker.spawn(writer.run(shared.clone(), config.max_commit_events, wake.clone()));
    }
    queue
}

/// How often one batch is fanned out again before its requests are refused: only an
/// apply landing between every fan-out and its commit gets that far.
const MAX_FAN_OUT_ROUNDS: usize = 10;

struct Writer {
    store: Store,
    catalog: CatalogHandle,
}

impl Writer {
    async fn run(self, queue: Arc<Mutex<Queue>>, max_events: usize, wake: Arc<Notify>) {
        while let Some(batch) = next_batch(&queue, max_events).await {
            let fanned_out = self.commit(batch).await;
            // Other processes were notified by the commit itself (see `Store::commit_events`).
            if fanned_out {
                wake.notify_one();
            }
        }
    }

    /// Commits `batch` and answers its jobs; returns whether deliveries were written.
    async fn commit(&self, batch: Vec<Job>) -> bool {
        let (mut requests, mut fanned): (Vec<IngestRequest>, Vec<FannedOut>) =
            batch.into_iter().map(|j| (j.request, j.fan_out)).unzip();
        match self.commit_fanned_out(&mut requests, &mut fanned).await {
            Ok(outcomes) => {
                for ((request, fanned), outcome) in requests.iter().zip(fanned).zip(outcomes) {
                    fanned.answer(request, Ok(outcome));
                }
                fans_out(&requests)
            }
            Err(error) if requests.len() > 1 => {
                // Commit each request alone, so a request the database refuses fails by itself.
                tracing::warn!(error = %error, requests = requests.len(), "group commit failed; committing requests one by one");
                let mut written = false;
                for (request, fanned) in requests.iter_mut().zip(fanned) {
                    let mut one = [fanned];
                    let result = self.commit_fanned_out(std::slice::from_mut(request), &mut one).await;
                    let [fanned] = one;
                    written |= result.is_ok() && fans_out(std::slice::from_ref(request));
                    fanned.answer(request, result.map(|mut outcomes| outcomes.remove(0)));
                }
                written
            }
            Err(error) => {
                for (request, fanned) in requests.iter().zip(fanned) {
                    fanned.answer(request, Err(error.clone()));
                }
                false
            }
        }
    }

    /// Writes `requests` in one transaction, first deciding again the fan-out of any
    /// decided by a catalog older than the one in force.
    async fn commit_fanned_out(
        &self,
        requests: &mut [IngestRequest],
        fanned: &mut [FannedOut],
    ) -> Result<Vec<RequestOutcome>, IngestError> {
        for _ in 0..MAX_FAN_OUT_ROUNDS {
            let catalog = self.catalog.current();
            for (request, fanned) in requests.iter_mut().zip(fanned.iter_mut()) {
                if fanned.revision != catalog.revision {
                    fanned.decide(&catalog, request);
                }
            }
            // A catalog that never loaded matches no revision: the commit reports the
            // current one, and the refresh below loads it.
            let revision = catalog.revision.unwrap_or(-1);
            match self.store.commit_events(requests, revision).await {
                Ok(Committed::Written(outcomes)) => return Ok(outcomes),
                Ok(Committed::Stale { revision }) => {
                    tracing::debug!(revision, "resources changed since fan-out; deciding it again");
                    if let Err(e) = self.catalog.refresh(&self.store).await {
                        tracing::warn!(error = %e, "could not refresh the catalog before an ingest commit");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not store events");
                    return Err(IngestError::Store(Arc::new(e)));
                }
            }
        }
        Err(IngestError::ResourcesChanging)
    }
}

fn fans_out(requests: &[IngestRequest]) -> bool {
    requests.iter().any(|r| r.events.iter().any(|e| !e.deliveries.is_empty()))
}

/// Takes what is waiting, up to `max_events` events; waits only when nothing is.
async fn next_batch(queue: &Mutex<Queue>, max_events: usize) -> Option<Vec<Job>> {
    let mut queue = queue.lock().await;
    let first = match queue.carried.take() {
        Some(job) => job,
        None => queue.receiver.recv().await?,
    };
    let mut events = first.request.events.len();
    let mut batch = vec![first];
    while let Ok(job) = queue.receiver.try_recv() {
        if events + job.request.events.len() > max_events {
            queue.carried = Some(job);
            break;
        }
        events += job.request.events.len();
        batch.push(job);
    }
    Some(batch)
}
