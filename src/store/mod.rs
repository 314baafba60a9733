//! Persistence: one [`Store`] over two backends, embedded SQLite and PostgreSQL.
//!
//! Every method is one use-case-sized unit of work in one transaction; callers never see a
//! connection or a transaction. Both backends keep the same invariants, which the storage
//! conformance suite (`tests/store_conformance.rs`) checks against each:
//! - an event is stored verbatim and exactly once per `(namespace, source, external_id)`;
//! - an idempotency key maps to the result of the first request that used it, forever
//!   (until it is cleaned up), and is never bound to a different request body.
//!
//! A statement is written once, with `$n` placeholders, and runs on either backend through
//! the executor in [`sql`]; where the backends need different SQL (a PostgreSQL lock, a
//! row-lock suffix) the method chooses it by backend, as a value. Statements whose best
//! shape differs per backend (ingest, the claims, the completion batch) are written per
//! backend, in `postgres.rs`, `sqlite.rs` and `claims.rs`. The methods live by use case:
//! events here and in `ingest` (operational events' outbox in `operational`), `resources`, `queue`, `claims`, `completions`,
//! `endpoint_state`, `delivery_reads`, `policy`, `approvals`, `audit` and `leadership`.

mod approvals;
mod audit;
mod availability;
mod claims;
mod completions;
pub mod deliveries;
mod delivery_reads;
mod endpoint_state;
mod error;
mod ingest;
mod lanes;
mod leadership;
mod notices;
mod operational;
pub mod policy;
mod postgres;
mod queue;
mod quotas;
pub mod resources;
pub mod retention;
pub mod spend;
mod sql;
mod sqlite;
mod sqlite_file;
mod sqlite_write;

use std::future::Future;
use std::path::Path;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::EventId;
use sql::{sql, Pool, Tx};

pub use availability::{DatabaseHealth, ProbeDatabase};
pub use claims::{ClaimCost, EndpointQuota};
pub use deliveries::{
    Attempt, AttemptStats, BlockedEndpoints, ClaimedDelivery, CommittedSpend, Completion, CompletionReport,
    DeadLetterAlert, DeliveryQuery, DeliveryRecord, DeliveryState, EndpointState, NewDelivery,
};
pub use error::StoreError;
pub use ingest::{Committed, EventOutcome, IdempotencyKey, IngestRequest, RequestOutcome};
pub use leadership::{LeaderLease, Term};
pub use notices::forward_notices;
pub use operational::{OutboxCommitted, OutboxEvent, OutboxRead};
pub use postgres::{Notice, PgStore, WorkListener};
pub use resources::{ApplyAction, ApplyOutcome, ApplyRequest, DesiredResource, StoredResource};
pub use sqlite::SqliteStore;
pub use sqlite_file::{lock_path, sqlite_file_of_url, DatabaseLock, LockError};

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// CloudEvents context attributes beyond those an event has fields for, by name.
pub type Attributes = std::collections::BTreeMap<String, serde_json::Value>;

/// The `attributes` column: a JSON object, or NULL when there are none.
pub(crate) fn attributes_column(attributes: &Attributes) -> Option<String> {
    (!attributes.is_empty()).then(|| serde_json::to_string(attributes).expect("JSON values always serialize"))
}

/// The attributes the `attributes` column holds.
pub(crate) fn attributes_of_column(column: Option<&str>) -> Result<Attributes, StoreError> {
    match column {
        None => Ok(Attributes::new()),
        Some(text) => serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("event attributes: {e}"))),
    }
}

/// An event ready to be written: validated, with its Hookwarden id assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub id: EventId,
    pub namespace: String,
    pub source: String,
    /// The client's CloudEvents `id` (Hookwarden's id when the client sent none).
    pub external_id: String,
    pub event_type: String,
    pub subject: Option<String>,
    pub time: Option<DateTime<Utc>>,
    /// The exact JSON text of the event's `data`, as it arrived.
    pub data: String,
    pub content_type: String,
    /// The other CloudEvents context attributes it came with (`dataschema`, extension
    /// attributes), by name: strings, numbers and booleans (see [`crate::cloudevents`]).
    pub attributes: Attributes,
    /// Subject of the token that ingested the event.
    pub ingested_by: String,
    pub trace_id: String,
    pub received_at: DateTime<Utc>,
    /// The deliveries fan-out decided on; written with the event, in one transaction.
    pub deliveries: Vec<NewDelivery>,
    /// Its namespace's `dedupWindow`, set by the ingest use case: a repeat of its
    /// `(source, id)` (or of its request's `Idempotency-Key`) received within it of the
    /// first is a duplicate. `None`: always a duplicate.
    pub dedup_window: Option<std::time::Duration>,
}

/// Where an event is in its life. Delivery states live on deliveries, not here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Durably stored; fan-out happens in the same transaction.
    Accepted,
    /// An operational event written by the transaction of its transition, waiting for its
    /// fan-out (see [`crate::operational`]); `accepted` once fanned out.
    Outbox,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Accepted => "accepted",
            EventStatus::Outbox => "outbox",
        }
    }

    fn parse(raw: &str) -> Result<Self, StoreError> {
        match raw {
            "accepted" => Ok(EventStatus::Accepted),
            "outbox" => Ok(EventStatus::Outbox),
            other => Err(StoreError::Corrupt(format!("unknown event status `{other}`"))),
        }
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub event: NewEvent,
    pub status: EventStatus,
}

/// Which events `list_events` returns, newest first.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    pub namespace: String,
    pub source: Option<String>,
    pub event_type: Option<String>,
    /// Only events received before this one (the page cursor).
    pub before: Option<EventId>,
    pub limit: u32,
}

/// The store: an enum over the two backends, cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            // Failures of the database itself are remembered for `/readyz`.
            Store::Sqlite($s) => $s.observe($call),
            Store::Postgres($s) => $call,
        }
    };
}

/// How the store's methods reach the database (see [`sql`]).
impl Store {
    /// A write transaction. On SQLite it takes the write lock at once, on the one write
    /// connection (see [`SqliteStore::begin_write`]).
    async fn begin_write(&self) -> Result<Tx, StoreError> {
        Ok(match self {
            Store::Sqlite(s) => Tx::Sqlite(s.begin_write().await?),
            Store::Postgres(s) => Tx::Pg(s.begin_write().await?),
        })
    }

    /// Where reads run: on SQLite the read-only pool beside the writer.
    fn reader(&self) -> Pool<'_> {
        match self {
            Store::Sqlite(s) => Pool::Sqlite(s.read_pool()),
            Store::Postgres(s) => Pool::Pg(s.read_pool()),
        }
    }

    /// Where single-statement writes run, outside a transaction: on SQLite the one writer.
    fn writer(&self) -> Pool<'_> {
        match self {
            Store::Sqlite(s) => Pool::Sqlite(s.write_pool()),
            Store::Postgres(s) => Pool::Pg(s.write_pool()),
        }
    }

    /// Runs `work`; on SQLite, a failure of the database itself is remembered for
    /// `/readyz` (see [`SqliteStore::observe`]), as `dispatch!` does.
    async fn observed<T>(&self, work: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let result = work.await;
        match self {
            Store::Sqlite(s) => s.observe(result),
            Store::Postgres(_) => result,
        }
    }
}

impl Store {
    /// Connects to `postgres://…` or `sqlite:…` URL. Does not migrate.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(PgStore::connect(url).await?))
        } else {
            Ok(Store::Sqlite(SqliteStore::connect_url(url).await?))
        }
    }

    /// Opens (creating when missing) the embedded SQLite database file at `path`.
    pub async fn open_sqlite_file(path: &Path) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(SqliteStore::open_file(path).await?))
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the migrations this build carries that the database has not seen.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.migrate().await)
    }

    /// Why writes to the database fail now, as last observed, at once and without asking
    /// the database: on SQLite a full disk or an I/O error, until a probe write commits
    /// again ([`Store::check_ready`] runs it). Always `None` on PostgreSQL, whose server
    /// answers for itself.
    pub fn writes_failing(&self) -> Option<String> {
        match self {
            Store::Sqlite(s) => s.writes_failing(),
            Store::Postgres(_) => None,
        }
    }

    /// Succeeds when the database answers and carries every migration of this build.
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.check_ready().await)
    }

    /// Writes the events of many ingest requests in one transaction (a group commit) and
    /// says, per request, what happened. Duplicates and replays write nothing. On
    /// PostgreSQL, a commit that created deliveries notifies other processes' workers.
    ///
    /// The fan-out was decided by the resources at `fanned_out_at` (see
    /// [`Store::resource_revision`]); when they moved on meanwhile, nothing is written and
    /// the answer is [`Committed::Stale`].
    pub async fn commit_events(&self, requests: &[IngestRequest], fanned_out_at: i64) -> Result<Committed, StoreError> {
        dispatch!(self, s => s.accept_events(requests, Some(fanned_out_at)).await)
    }

    /// [`Store::commit_events`] for requests whose fan-out does not depend on the stored
    /// resources (written as given, whatever the revision): tests and tools.
    pub async fn accept_events(&self, requests: &[IngestRequest]) -> Result<Vec<RequestOutcome>, StoreError> {
        match dispatch!(self, s => s.accept_events(requests, None).await)? {
            Committed::Written(outcomes) => Ok(outcomes),
            Committed::Stale { .. } => unreachable!("an unchecked commit is never stale"),
        }
    }

    pub async fn get_event(&self, id: &EventId) -> Result<Option<StoredEvent>, StoreError> {
        static GET: LazyLock<String> = LazyLock::new(|| format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1"));
        self.observed(async {
            let row: Option<EventRow> = sql(&GET).bind(id.as_str()).fetch_optional(self.reader()).await?;
            row.map(StoredEvent::try_from).transpose()
        })
        .await
    }

    /// Events of one namespace, newest first, optionally by source and type.
    pub async fn list_events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        static SELECT: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {EVENT_COLUMNS} FROM events WHERE namespace = $1"));
        let mut statement = sql(&SELECT).bind(query.namespace.as_str());
        if let Some(source) = &query.source {
            statement = statement.push(" AND source = ").push_bind(source);
        }
        if let Some(event_type) = &query.event_type {
            statement = statement.push(" AND type = ").push_bind(event_type);
        }
        if let Some(before) = &query.before {
            statement = statement.push(" AND id < ").push_bind(before.as_str());
        }
        let statement = statement.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(query.limit));
        self.observed(async {
            let rows: Vec<EventRow> = statement.fetch_all(self.reader()).await?;
            rows.into_iter().map(StoredEvent::try_from).collect()
        })
        .await
    }

    /// Forgets idempotency keys first used before `cutoff`; returns how many.
    pub async fn delete_idempotency_keys_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let delete = sql("DELETE FROM idempotency_keys WHERE created_at < $1").bind(cutoff);
        self.observed(delete.execute(self.writer())).await
    }

    /// Wakes idle delivery workers of every process (PostgreSQL `NOTIFY`); on the
    /// embedded database the in-process signal is enough and this does nothing.
    pub async fn notify_work(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.notify_work().await,
        }
    }

    /// Wakes the status reconciler of the leading process (PostgreSQL `NOTIFY`); on the
    /// embedded database the in-process signal is enough and this does nothing.
    pub async fn notify_status(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.notify_status().await,
        }
    }

    /// On PostgreSQL, a listener for other processes' [`Store::notify_work`],
    /// [`Store::notify_status`] and ingest commits; `None` on SQLite.
    pub async fn listen_for_work(&self) -> Result<Option<WorkListener>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(s.listen_for_work().await?)),
        }
    }

    /// Closes every connection; pending work is finished first.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(s) => s.close().await,
        }
    }
}

/// The row shape shared by both backends' `events` table.
#[derive(sqlx::FromRow)]
struct EventRow {
    id: String,
    namespace: String,
    source: String,
    external_id: String,
    #[sqlx(rename = "type")]
    event_type: String,
    subject: Option<String>,
    time: Option<DateTime<Utc>>,
    data: String,
    content_type: String,
    attributes: Option<String>,
    ingested_by: String,
    trace_id: String,
    received_at: DateTime<Utc>,
    status: String,
}

const EVENT_COLUMNS: &str = "id, namespace, source, external_id, type, subject, time, data, content_type, attributes, \
     ingested_by, trace_id, received_at, status";

impl TryFrom<EventRow> for StoredEvent {
    type Error = StoreError;

    fn try_from(row: EventRow) -> Result<Self, StoreError> {
        Ok(StoredEvent {
            event: NewEvent {
                id: EventId::parse(&row.id).map_err(|e| StoreError::Corrupt(format!("event id `{}`: {e}", row.id)))?,
                namespace: row.namespace,
                source: row.source,
                external_id: row.external_id,
                event_type: row.event_type,
                subject: row.subject,
                time: row.time,
                data: row.data,
                content_type: row.content_type,
                attributes: attributes_of_column(row.attributes.as_deref())?,
                ingested_by: row.ingested_by,
                trace_id: row.trace_id,
                received_at: row.received_at,
                deliveries: Vec::new(),
                dedup_window: None,
            },
            status: EventStatus::parse(&row.status)?,
        })
    }
}

/// Compares the newest applied migration with the newest this build carries.
fn check_migrated(found: Option<i64>, migrator: &sqlx::migrate::Migrator) -> Result<(), StoreError> {
    let needed = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    match found {
        Some(v) if v >= needed => Ok(()),
        _ => Err(StoreError::NotMigrated { found, needed }),
    }
}
