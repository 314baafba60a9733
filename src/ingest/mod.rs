//! The ingest use case: validated events in, fan-out decided, committed by a group commit,
//! and an answer per event.
//!
//! HTTP handlers ask [`Ingestor::admit`] first (backpressure), parse, validate and
//! authorize, then hand an [`IngestRequest`] to [`Ingestor::accept`] (in `accept.rs`) and
//! map its [`Answer`]. Fan-out is decided here, by the catalog in force; the writer
//! (see [`writer`]) commits it only if the stored resources are still at the revision it
//! was decided by, and decides it again otherwise. Invariants:
//! - a request is answered `Ok` only after its events are committed, and is answered
//!   within `ingest.commitTimeout` either way (a database that is away or hangs costs a
//!   `503`, never an unbounded wait);
//! - an event accepted after an apply returned (by any process) fans out by what that
//!   apply wrote (read-your-writes through the resource revision);
//! - where fan-out could not decide for an endpoint, the answer says so; nothing is left
//!   out silently;
//! - fan-out that evaluates CEL runs on the evaluation threads
//!   ([`CatalogHandle::evaluate`]), never on an async worker.
//!
//! Before any of that, [`types`] checks the events against their namespace's EventTypes.
//! [`keys`] forgets idempotency keys once no window can use them; [`outbox`] fans out
//! the operational events that transitions wrote (see [`crate::operational`]).

mod accept;
pub mod keys;
pub mod outbox;
pub mod quota;
pub mod types;
mod writer;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::task::TaskTracker;

use crate::catalog::{Catalog, CatalogHandle, EventView, FanOutError};
use crate::config::{IngestConfig, NamespaceDefaults};
use crate::ids::DeliveryId;
use crate::store::{IngestRequest, NewDelivery, NewEvent, RequestOutcome, Store, StoreError};
use crate::telemetry::backlog::Backlog;

pub use accept::{AcceptError, Answer, DeliverySummary, EventAccepted, TooLarge};

/// Why a request was not written.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IngestError {
    #[error("ingest queue is full")]
    Overloaded,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the resources kept changing while the events were being stored")]
    ResourcesChanging,
    /// Not committed within `ingest.commitTimeout` (the database is slow or away). The
    /// events may still have been written: a retry with the same ids is a duplicate.
    #[error("the events were not committed in time")]
    TimedOut,
    #[error("could not store the events")]
    Store(#[source] Arc<StoreError>),
    /// The fan-out did not come back from its evaluation thread (a bug: evaluations catch
    /// their own panics).
    #[error(transparent)]
    FanOut(#[from] crate::threads::JobFailed),
}

impl IngestError {
    /// Whether the database could not be reached (or did not answer in time): nothing
    /// about the request itself was refused.
    pub fn is_unavailable(&self) -> bool {
        match self {
            IngestError::TimedOut => true,
            IngestError::Store(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

/// What a committed request did.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub outcome: RequestOutcome,
    /// Per event of the request, in order: its fan-out as written. Meaningful for the
    /// events this request wrote; duplicates keep the original's deliveries.
    pub fan_out: Vec<EventFanOut>,
}

/// The fan-out of one event as committed.
#[derive(Clone, Debug, Default)]
pub struct EventFanOut {
    pub deliveries: Vec<NewDelivery>,
    /// Endpoints where fan-out could not decide (skipped, or sent in the `(no key)` lane).
    pub errors: Vec<FanOutError>,
}

/// A request waiting for the writer, with the fan-out decided for it.
struct Job {
    request: IngestRequest,
    fan_out: FannedOut,
}

/// What the writer keeps of a job beside its request: how its fan-out was decided, and
/// whom to answer.
struct FannedOut {
    /// Per event, where fan-out could not decide.
    errors: Vec<Vec<FanOutError>>,
    /// The resource revision the fan-out was decided by.
    revision: Option<i64>,
    reply: oneshot::Sender<Result<Accepted, IngestError>>,
    /// What the request took of its namespaces' quotas. The writer keeps it once the
    /// events are (or may have been) written, whether or not anyone still waits for the
    /// answer; dropped anywhere else (not queued, skipped, refused), it gives them back.
    taken: quota::Taken,
}

impl Job {
    /// The handler stopped waiting (it answered 503 at its deadline, or the client left):
    /// nobody would learn of this job's commit.
    fn abandoned(&self) -> bool {
        self.fan_out.reply.is_closed()
    }
}

impl FannedOut {
    /// Decides the fan-out of every event of `request` by `catalog` (see
    /// [`fan_out_events`]).
    async fn decide(
        &mut self,
        handle: &CatalogHandle,
        catalog: Arc<Catalog>,
        request: &mut IngestRequest,
    ) -> Result<(), IngestError> {
        self.revision = catalog.revision;
        let (events, errors) = fan_out_events(handle, catalog, std::mem::take(&mut request.events)).await?;
        request.events = events;
        self.errors = errors;
        Ok(())
    }

    /// Answers the handler with what was written, and settles the quota: what the request
    /// took stays taken when its events were written, or may have been (`attempted` and
    /// the commit's result is unknown: it timed out, or the database went away); it is
    /// given back otherwise (a replay, a reused key, a refusal, a commit never tried).
    fn answer(self, request: &IngestRequest, outcome: Result<RequestOutcome, IngestError>, attempted: bool) {
        let FannedOut { errors, reply, taken, .. } = self;
        let charged = match &outcome {
            Ok(RequestOutcome::Accepted(_)) => true,
            Ok(_) => false,
            Err(e) => attempted && e.is_unavailable(),
        };
        if charged {
            let _ = taken.keep();
        }
        let answer = outcome.map(|outcome| {
            let fan_out = request
                .events
                .iter()
                .zip(errors)
                .map(|(event, errors)| EventFanOut { deliveries: event.deliveries.clone(), errors })
                .collect();
            Accepted { outcome, fan_out }
        });
        let _ = reply.send(answer);
    }
}

/// Sets the deliveries of `events` by `catalog`; returns where that failed, per event. When
/// any of them evaluates CEL, all are decided on an evaluation thread.
async fn fan_out_events(
    handle: &CatalogHandle,
    catalog: Arc<Catalog>,
    mut events: Vec<NewEvent>,
) -> Result<(Vec<NewEvent>, Vec<Vec<FanOutError>>), IngestError> {
    let evaluates_cel = events.iter().any(|e| catalog.evaluates_cel(&e.namespace, &e.event_type));
    let decide = move || {
        let errors = events.iter_mut().map(|event| fan_out(&catalog, event)).collect();
        (events, errors)
    };
    if evaluates_cel {
        Ok(handle.evaluate(decide).await?)
    } else {
        Ok(decide())
    }
}

/// Sets `event.deliveries` to the endpoints it fans out to; returns where that failed.
fn fan_out(catalog: &Catalog, event: &mut NewEvent) -> Vec<FanOutError> {
    let time = event.time.map(|t| t.to_rfc3339());
    let view = EventView {
        id: event.id.as_str(),
        namespace: &event.namespace,
        source: &event.source,
        event_type: &event.event_type,
        subject: event.subject.as_deref(),
        time,
        data: &event.data,
    };
    let result = catalog.fan_out(&view);
    event.deliveries = result
        .deliveries
        .into_iter()
        .map(|f| NewDelivery { id: DeliveryId::generate(), endpoint: f.endpoint, ordering_key: f.ordering_key })
        .collect();
    result.errors
}

/// The handle handlers submit through. Cheap to clone; the writers stop once every
/// handle is dropped and the queue is drained.
#[derive(Clone)]
pub struct Ingestor {
    queue: mpsc::Sender<Job>,
    catalog: CatalogHandle,
    /// How long [`Ingestor::submit`] waits for the commit.
    commit_timeout: std::time::Duration,
    /// For the answers: the stored deliveries of duplicates.
    store: Store,
    /// Deliveries waiting, as last sampled; [`Ingestor::admit`] refuses above `max_backlog`.
    backlog: Backlog,
    max_backlog: u64,
    /// For `unknownEventTypes`.
    config: Arc<IngestConfig>,
    /// What namespaces without a Namespace (or a setting of one) get.
    namespace_defaults: Arc<NamespaceDefaults>,
    /// The ingest quotas' buckets (`spec.quotas.ingest`), read by [`Ingestor::accept`].
    quotas: Arc<quota::Quotas>,
    clock: crate::clock::Clock,
}

/// What [`Ingestor::start`] needs besides the store and the catalog.
pub struct IngestSettings<'a> {
    pub config: &'a IngestConfig,
    /// `delivery.maxBacklog`.
    pub max_backlog: u64,
    pub backlog: Backlog,
    /// Signalled after a commit that created deliveries.
    pub wake: Arc<Notify>,
    /// `namespaceDefaults` (the dedup window of namespaces their Namespace leaves it to).
    pub namespace_defaults: NamespaceDefaults,
    /// "Now" for the ingest quotas.
    pub clock: crate::clock::Clock,
}

impl Ingestor {
    /// Starts the writer tasks on `tracker`.
    pub fn start(
        store: Store,
        catalog: CatalogHandle,
        settings: IngestSettings<'_>,
        tracker: &TaskTracker,
    ) -> Ingestor {
        let IngestSettings { config, max_backlog, backlog, wake, namespace_defaults, clock } = settings;
        let queue = writer::start(store.clone(), catalog.clone(), config, tracker, wake);
        // PostgreSQL may be shared by several processes: its buckets are in the database.
        let shared = matches!(store.backend(), crate::store::Backend::Postgres);
        Ingestor {
            queue,
            catalog,
            commit_timeout: config.commit_timeout,
            store,
            backlog,
            max_backlog,
            config: Arc::new(config.clone()),
            namespace_defaults: Arc::new(namespace_defaults),
            quotas: Arc::new(quota::Quotas::new(shared)),
            clock,
        }
    }

    /// Decides the fan-out of `request`, queues it, and waits until it is committed (or
    /// refused), at most `ingest.commitTimeout`. `taken` goes with the request: the writer
    /// settles it by the commit's result (see [`FannedOut::answer`]), also when this
    /// future times out or is dropped after the request was queued.
    pub async fn submit(&self, request: IngestRequest, taken: quota::Taken) -> Result<Accepted, IngestError> {
        let (reply, answer) = oneshot::channel();
        let mut job = Job { request, fan_out: FannedOut { errors: Vec::new(), revision: None, reply, taken } };
        job.fan_out.decide(&self.catalog, self.catalog.current(), &mut job.request).await?;
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => IngestError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => IngestError::ShuttingDown,
        })?;
        match tokio::time::timeout(self.commit_timeout, answer).await {
            Ok(answer) => answer.unwrap_or(Err(IngestError::ShuttingDown)),
            // Dropping `answer` tells the writer nobody waits for the job any more.
            Err(_) => Err(IngestError::TimedOut),
        }
    }
}
