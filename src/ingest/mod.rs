//! Group commit of ingested events.
//!
//! HTTP handlers hand their validated request to the [`Ingestor`] and wait; writer tasks
//! take every request that is waiting (up to `maxCommitEvents` events), write them in one
//! transaction, and only after the commit answer each handler. Durability costs one fsync
//! per batch instead of one per request, so throughput grows with concurrency.
//!
//! Invariants: a handler is answered `Ok` only after its events are committed; the queue
//! is bounded (a full queue answers [`IngestError::Overloaded`] at once, memory never
//! grows with load); one bad request cannot fail the others of its batch.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex, Notify};
use tokio_util::task::TaskTracker;

use crate::config::IngestConfig;
use crate::store::{IngestRequest, RequestOutcome, Store, StoreError};

/// Why a request was not written.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest queue is full")]
    Overloaded,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("could not store the events")]
    Store(#[source] Arc<StoreError>),
}

struct Job {
    request: IngestRequest,
    reply: oneshot::Sender<Result<RequestOutcome, IngestError>>,
}

/// The handle handlers submit through. Cheap to clone; the writers stop once every
/// handle is dropped and the queue is drained.
#[derive(Clone)]
pub struct Ingestor {
    queue: mpsc::Sender<Job>,
}

struct Queue {
    receiver: mpsc::Receiver<Job>,
    /// A job taken from the channel that did not fit the previous batch.
    carried: Option<Job>,
}

impl Ingestor {
    /// Starts the writer tasks on `tracker`.
    /// `wake` is signalled after a commit that created deliveries.
    pub fn start(store: Store, config: &IngestConfig, tracker: &TaskTracker, wake: Arc<Notify>) -> Ingestor {
        let (queue, receiver) = mpsc::channel(config.queue_capacity);
        let shared = Arc::new(Mutex::new(Queue { receiver, carried: None }));
        let writers = match (config.writers, store.backend()) {
            (0, crate::store::Backend::Sqlite) => 1,
            (0, crate::store::Backend::Postgres) => 2,
            (n, _) => n,
        };
        for _ in 0..writers {
            tracker.spawn(write_batches(store.clone(), shared.clone(), config.max_commit_events, wake.clone()));
        }
        Ingestor { queue }
    }

    /// Queues `request` and waits until it is committed (or refused).
    pub async fn submit(&self, request: IngestRequest) -> Result<RequestOutcome, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.queue.try_send(Job { request, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => IngestError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => IngestError::ShuttingDown,
        })?;
        answer.await.unwrap_or(Err(IngestError::ShuttingDown))
    }
}

async fn write_batches(store: Store, queue: Arc<Mutex<Queue>>, max_events: usize, wake: Arc<Notify>) {
    while let Some(batch) = next_batch(&queue, max_events).await {
        let fanned_out = batch.iter().any(|j| j.request.events.iter().any(|e| !e.deliveries.is_empty()));
        commit(&store, batch).await;
        // Other processes were notified by the commit itself (see `Store::accept_events`).
        if fanned_out {
            wake.notify_one();
        }
    }
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

async fn commit(store: &Store, batch: Vec<Job>) {
    let (requests, replies): (Vec<IngestRequest>, Vec<_>) = batch.into_iter().map(|j| (j.request, j.reply)).unzip();
    match store.accept_events(&requests).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(error) if requests.len() > 1 => {
            // Commit each request alone, so a request the database refuses fails by itself.
            tracing::warn!(error = %error, requests = requests.len(), "group commit failed; committing requests one by one");
            for (request, reply) in requests.iter().zip(replies) {
                let result = store
                    .accept_events(std::slice::from_ref(request))
                    .await
                    .map(|mut outcomes| outcomes.remove(0))
                    .map_err(|e| IngestError::Store(Arc::new(e)));
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for reply in replies {
                let _ = reply.send(Err(IngestError::Store(error.clone())));
            }
        }
    }
}
