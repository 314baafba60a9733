//! The outbox of operational events (see [`crate::operational`]).
//!
//! A transition's transaction writes its events with [`emit_in`], status `outbox`; the
//! fan-out step ([`crate::ingest::outbox`]) reads them ([`Store::outbox_events`]), decides
//! their deliveries by the catalog in force, and commits them with
//! [`Store::fan_out_outbox`]. Invariants:
//! - an event leaves the outbox exactly once: the fan-out transaction locks the rows still
//!   in the outbox (PostgreSQL skips those another process holds; SQLite has one writer)
//!   and gives deliveries only to those, and only at the resource revision they were
//!   decided by;
//! - an event about an endpoint gets no delivery to it (the caller leaves it out, and
//!   this module keeps `about_endpoint` for it to do so).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::ingest::IngestTx;
use super::sql::{sql, Tx};
use super::{EventRow, NewEvent, Store, StoreError, StoredEvent, EVENT_COLUMNS};
use crate::ids::EventId;
use crate::operational::{self, OperationalEvent, SOURCE};

/// An event waiting in the outbox, and the endpoint it must not go to.
#[derive(Clone, Debug)]
pub struct OutboxEvent {
    pub event: NewEvent,
    pub about_endpoint: Option<String>,
}

/// What [`Store::outbox_events`] read.
#[derive(Debug, Default)]
pub struct OutboxRead {
    /// The events waiting, oldest first.
    pub events: Vec<OutboxEvent>,
    /// The ids of rows waiting in the outbox that do not read as an event, with why: left
    /// where they are, so that they do not hold up the others.
    pub unreadable: Vec<(String, StoreError)>,
}

/// What a fan-out of the outbox did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxCommitted {
    /// These events left the outbox, with their deliveries (others were taken by another
    /// process meanwhile).
    Written(Vec<EventId>),
    /// Nothing written: the resources moved on to `revision`; decide again.
    Stale { revision: i64 },
}

/// Writes `events` in the outbox, in the caller's transaction: the transition and the
/// events that tell of it commit (or roll back) together. The data of an event about an
/// endpoint gets its `spec.owner`, as stored now.
pub(super) async fn emit_in(tx: &mut Tx, events: &[OperationalEvent], now: DateTime<Utc>) -> Result<(), StoreError> {
    let mut owners: HashMap<(&str, &str), Option<String>> = HashMap::new();
    for event in events {
        let owner = match &event.about_endpoint {
            None => None,
            Some(endpoint) => {
                let key = (event.namespace.as_str(), endpoint.as_str());
                match owners.entry(key) {
                    Entry::Occupied(known) => known.get().clone(),
                    Entry::Vacant(slot) => slot.insert(owner_in(tx, key.0, key.1).await?).clone(),
                }
            }
        };
        let id = EventId::generate();
        sql("INSERT INTO events (id, namespace, source, external_id, type, subject, time, data, content_type, \
             ingested_by, trace_id, received_at, status, about_endpoint) \
             VALUES ($1, $2, $3, $1, $4, $5, $6, $7, 'application/json', $3, $8, $6, 'outbox', $9)")
        .bind(id.as_str())
        .bind(&event.namespace)
        .bind(SOURCE)
        .bind(event.event_type)
        .bind(&event.subject)
        .bind(now)
        .bind(event.data_with_owner(owner.as_deref()))
        .bind(new_trace_id())
        .bind(&event.about_endpoint)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Whether event `id` is an operational event (of a reserved `hookwarden.` type). What its
/// deliveries go through (a hold, its decision, expiring or expiry, a denial for spend)
/// tells nothing, so that operational events cannot loop between agent endpoints. An event
/// that is gone is not one.
pub(super) async fn is_operational_in(tx: &mut Tx, id: &str) -> Result<bool, StoreError> {
    let event_type: Option<String> =
        sql("SELECT type FROM events WHERE id = $1").bind(id).scalar_optional(&mut *tx).await?;
    Ok(event_type.is_some_and(|t| operational::is_reserved(&t)))
}

/// The `spec.owner` of an Endpoint as stored (none when it has none, or is gone).
async fn owner_in(tx: &mut Tx, namespace: &str, name: &str) -> Result<Option<String>, StoreError> {
    let spec: Option<String> =
        sql("SELECT spec FROM resources WHERE kind = 'Endpoint' AND namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .scalar_optional(&mut *tx)
            .await?;
    // A spec that does not read (it never should) tells without an owner rather than
    // failing the transition.
    let spec: Option<serde_json::Value> = spec.and_then(|spec| serde_json::from_str(&spec).ok());
    Ok(spec.as_ref().and_then(|s| s.get("owner")).and_then(|o| o.as_str()).map(str::to_owned))
}

/// A W3C trace id of its own for each operational event.
fn new_trace_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    #[sqlx(flatten)]
    event: EventRow,
    about_endpoint: Option<String>,
}

impl Store {
    /// Up to `limit` rows waiting in the outbox, oldest first: the events, and the rows
    /// that do not read as one (see [`OutboxRead`]).
    pub async fn outbox_events(&self, limit: u32) -> Result<OutboxRead, StoreError> {
        static SELECT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT {EVENT_COLUMNS}, about_endpoint FROM events WHERE status = 'outbox' ORDER BY id LIMIT $1")
        });
        self.observed(async {
            let rows: Vec<OutboxRow> = sql(&SELECT).bind(i64::from(limit)).fetch_all(self.reader()).await?;
            let mut read = OutboxRead::default();
            for row in rows {
                let id = row.event.id.clone();
                match StoredEvent::try_from(row.event) {
                    Ok(stored) => {
                        read.events.push(OutboxEvent { event: stored.event, about_endpoint: row.about_endpoint })
                    }
                    Err(e) => read.unreadable.push((id, e)),
                }
            }
            Ok(read)
        })
        .await
    }

    /// Gives outbox events the deliveries decided for them (`event.deliveries`) by the
    /// resources at `fanned_out_at`, in one transaction, and takes them out of the outbox;
    /// events no longer in it (another process fanned them out) are left alone. On
    /// PostgreSQL, a commit that created deliveries notifies other processes' workers.
    pub async fn fan_out_outbox(&self, events: &[NewEvent], fanned_out_at: i64) -> Result<OutboxCommitted, StoreError> {
        match self {
            Store::Sqlite(s) => s.observe(s.fan_out_outbox(events, fanned_out_at).await),
            Store::Postgres(s) => s.fan_out_outbox(events, fanned_out_at).await,
        }
    }
}

/// The fan-out of outbox events inside `tx`, shared by both backends; the caller commits
/// what is `Written`.
pub(super) async fn fan_out_in<T: IngestTx>(
    tx: &mut T,
    events: &[NewEvent],
    fanned_out_at: i64,
) -> Result<OutboxCommitted, StoreError> {
    let revision = tx.resource_revision().await?;
    if revision != fanned_out_at {
        return Ok(OutboxCommitted::Stale { revision });
    }
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let locked: HashSet<EventId> = if ids.is_empty() { HashSet::new() } else { tx.lock_outbox(&ids).await? };
    let mine: Vec<&NewEvent> = events.iter().filter(|e| locked.contains(&e.id)).collect();
    let fanned: Vec<&NewEvent> = mine.iter().copied().filter(|e| !e.deliveries.is_empty()).collect();
    if !fanned.is_empty() {
        tx.insert_deliveries(&fanned).await?;
    }
    let taken: Vec<&str> = mine.iter().map(|e| e.id.as_str()).collect();
    if !taken.is_empty() {
        tx.end_outbox(&taken).await?;
    }
    Ok(OutboxCommitted::Written(mine.iter().map(|e| e.id.clone()).collect()))
}
