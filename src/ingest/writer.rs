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
//! grows with load); one bad request cannot fail the others of its batch. No writer holds
//! requests longer than `ingest.commitTimeout` per commit: a commit that takes longer is
//! abandoned (its requests answered [`IngestError::TimedOut`]), requests whose handler
//! stopped waiting are not written, and when the database is unreachable a failed batch is
//! answered at once, not retried request by request, and so is every request waiting
//! behind it (the next batch tries the database again).

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
        let writer = Writer { store: store.clone(), catalog: catalog.clone(), commit_timeout: config.commit_timeout };
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
    /// The longest one commit may take before it is abandoned.
    commit_timeout: std::time::Duration,
}

impl Writer {
    async fn run(self, queue: Arc<Mutex<Queue>>, max_events: usize, wake: Arc<Notify>) {
        while let Some(batch) = next_batch(&queue, max_events).await {
            let Done { fanned_out, unavailable } = self.commit(batch).await;
            // Other processes were notified by the commit itself (see `Store::commit_events`).
            if fanned_out {
                wake.notify_one();
            }
            // The database just proved unreachable: whoever waits behind this batch would
            // wait as long again for the same answer.
            if let Some(error) = unavailable {
                refuse_waiting(&queue, &error).await;
            }
        }
    }

    /// Commits `batch` and answers its jobs.
    async fn commit(&self, batch: Vec<Job>) -> Done {
        let (mut requests, mut fanned): (Vec<IngestRequest>, Vec<FannedOut>) =
            batch.into_iter().map(|j| (j.request, j.fan_out)).unzip();
        match self.commit_fanned_out(&mut requests, &mut fanned).await {
            Ok(outcomes) => {
                for ((request, fanned), outcome) in requests.iter().zip(fanned).zip(outcomes) {
                    fanned.answer(request, Ok(outcome), true);
                }
                Done { fanned_out: fans_out(&requests), unavailable: None }
            }
            Err(error) if requests.len() > 1 && !error.is_unavailable() => {
                // Commit each request alone, so a request the database refuses fails by itself.
                tracing::warn!(error = %error, requests = requests.len(), "group commit failed; committing requests one by one");
                let mut done = Done { fanned_out: false, unavailable: None };
                for (request, fanned) in requests.iter_mut().zip(fanned) {
                    if fanned.reply.is_closed() {
                        continue;
                    }
                    if let Some(error) = &done.unavailable {
                        fanned.answer(request, Err(error.clone()), false);
                        continue;
                    }
                    let mut one = [fanned];
                    let result = self.commit_fanned_out(std::slice::from_mut(request), &mut one).await;
                    let [fanned] = one;
                    done.fanned_out |= result.is_ok() && fans_out(std::slice::from_ref(request));
                    done.unavailable = result.as_ref().err().filter(|e| e.is_unavailable()).cloned();
                    fanned.answer(request, result.map(|mut outcomes| outcomes.remove(0)), true);
                }
                done
            }
            Err(error) => {
                for (request, fanned) in requests.iter().zip(fanned) {
                    fanned.answer(request, Err(error.clone()), true);
                }
                Done { fanned_out: false, unavailable: error.is_unavailable().then_some(error) }
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
                    fanned.decide(&self.catalog, catalog.clone(), request).await?;
                }
            }
            // A catalog that never loaded matches no revision: the commit reports the
            // current one, and the refresh below loads it.
            let revision = catalog.revision.unwrap_or(-1);
            let commit = tokio::time::timeout(self.commit_timeout, self.store.commit_events(requests, revision));
            let Ok(committed) = commit.await else {
                tracing::error!(timeout = ?self.commit_timeout, "a group commit did not finish in time; abandoned");
                return Err(IngestError::TimedOut);
            };
            match committed {
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

/// What one batch's commit did.
struct Done {
    /// Deliveries were written.
    fanned_out: bool,
    /// The database was unreachable (or did not answer in time).
    unavailable: Option<IngestError>,
}

/// Answers every job waiting in the queue with `error`, at once.
async fn refuse_waiting(queue: &Mutex<Queue>, error: &IngestError) {
    let mut queue = queue.lock().await;
    let mut refused = 0usize;
    let carried = queue.carried.take();
    let mut next = carried.or_else(|| queue.receiver.try_recv().ok());
    while let Some(job) = next {
        if !job.abandoned() {
            job.fan_out.answer(&job.request, Err(error.clone()), false);
            refused += 1;
        }
        next = queue.receiver.try_recv().ok();
    }
    if refused > 0 {
        tracing::warn!(error = %error, refused, "the database is unavailable; refused the requests waiting for a commit");
    }
}

fn fans_out(requests: &[IngestRequest]) -> bool {
    requests.iter().any(|r| r.events.iter().any(|e| !e.deliveries.is_empty()))
}

/// Takes what is waiting, up to `max_events` events, leaving out jobs whose handler
/// stopped waiting; waits only when nothing is.
async fn next_batch(queue: &Mutex<Queue>, max_events: usize) -> Option<Vec<Job>> {
    let mut queue = queue.lock().await;
    let first = loop {
        let job = match queue.carried.take() {
            Some(job) => job,
            None => queue.receiver.recv().await?,
        };
        if !job.abandoned() {
            break job;
        }
    };
    let mut events = first.request.events.len();
    let mut batch = vec![first];
    while let Ok(job) = queue.receiver.try_recv() {
        if job.abandoned() {
            continue;
        }
        if events + job.request.events.len() > max_events {
            queue.carried = Some(job);
            break;
        }
        events += job.request.events.len();
        batch.push(job);
    }
    Some(batch)
}
