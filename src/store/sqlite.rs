//! The embedded backend: one SQLite file in WAL mode, durable commits (`synchronous=FULL`).
//!
//! SQLite allows one writer at a time, so writes go through a pool of exactly one
//! connection (no `SQLITE_BUSY` between our own writers) and reads through a separate
//! read-only pool that WAL lets run beside the writer.
//!
//! A write that fails must not poison the writes after it. On `SQLITE_FULL` (and
//! `SQLITE_IOERR`, …) SQLite may roll the whole transaction back by itself, and always does
//! when `COMMIT` fails that way. sqlx-sqlite 0.8 does not notice: it keeps its own
//! transaction depth and lowers it only when its `ROLLBACK` succeeds, which it then does
//! not ("no transaction is active"), so the connection goes back to the pool at depth 1
//! with SQLite in autocommit. From then on a plain `begin()` sends `SAVEPOINT` (which opens
//! a real transaction) and its commit `RELEASE SAVEPOINT`; after one more failed statement
//! whose `ROLLBACK TO` leaves that savepoint open, every later transaction is a savepoint
//! nested in one that is never committed: commits answer `Ok`, nothing reaches the file,
//! and a restart loses it all (the issue's lost `202`s). With `begin_with("BEGIN
//! IMMEDIATE")` sqlx refuses instead, and every write fails until a restart. So the write
//! pool checks its connection on every release and closes it when sqlx and SQLite
//! disagree, and [`begin_write`](SqliteStore::begin_write) always starts at depth 0; see
//! [`super::sqlite_write`]. Every write transaction goes through `begin_write`, and every
//! write through the one write pool.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, Transaction};

use super::ingest::{
    accept_in, decode_ids, dedup_cutoff, encode_ids, Committed, ExistingKey, Identity, IngestTx, KeyClaim,
};
use super::operational::{fan_out_in, OutboxCommitted};
use super::spend::SettledEntry;
use super::sqlite_file::Snapshot;
use super::sqlite_write::{write_pool_options, WriteHealth};
use super::{check_migrated, IdempotencyKey, IngestRequest, NewEvent, StoreError};
use crate::ids::EventId;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone, Debug)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    /// Set when opened read-only and `immutable`: how the file looked before it was read.
    snapshot: Option<std::sync::Arc<Snapshot>>,
    /// Whether writes work; `None` on a read-only store, which never writes.
    health: Option<std::sync::Arc<WriteHealth>>,
}

impl SqliteStore {
    pub async fn open_file(path: &Path) -> Result<Self, StoreError> {
        Self::open(SqliteConnectOptions::new().filename(path)).await
    }

    pub async fn connect_url(url: &str) -> Result<Self, StoreError> {
        Self::open(SqliteConnectOptions::from_str(url)?).await
    }

    async fn open(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let write = write_pool_options().acquire_timeout(Duration::from_secs(30)).connect_with(options.clone()).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { write, read, snapshot: None, health: Some(Default::default()) })
    }

    /// One read-only pool that serves as both pools: a write through it fails instead of
    /// changing the file. `options` come read-only from [`super::Store::open_read_only`].
    pub(super) async fn open_read_only(
        options: SqliteConnectOptions,
        snapshot: Option<Snapshot>,
    ) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.busy_timeout(Duration::from_secs(10)))
            .await?;
        Ok(Self { write: pool.clone(), read: pool, snapshot: snapshot.map(std::sync::Arc::new), health: None })
    }

    pub(super) fn snapshot_is_stale(&self) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.is_stale())
    }

    pub(super) fn write_pool(&self) -> &SqlitePool {
        &self.write
    }

    /// A write transaction that takes the write lock at once (`BEGIN IMMEDIATE`): one that
    /// read first and wrote later would fail at once with `SQLITE_BUSY` when another
    /// connection held the lock meanwhile, instead of waiting for it.
    ///
    /// Always a top-level transaction: sqlx refuses a custom `BEGIN` at a depth above 0
    /// rather than turning it into a savepoint, and the pool never hands out a connection
    /// whose depth or SQLite state says a transaction is still open (see the module docs).
    pub(super) async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.write.begin_with("BEGIN IMMEDIATE").await
    }

    pub(super) fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.write).await?;
        Ok(())
    }

    pub(super) async fn check_ready(&self) -> Result<(), StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&self.read)
            .await
            .or_else(|e| if is_missing_table(&e) { Ok(None) } else { Err(e) })?;
        check_migrated(found, &MIGRATOR)?;
        match &self.health {
            Some(health) => health.check(&self.write).await,
            None => Ok(()),
        }
    }

    /// Why writes fail now (a full disk, an I/O error), as last observed; cleared once a
    /// probe write commits (see [`SqliteStore::check_ready`]).
    pub(super) fn writes_failing(&self) -> Option<String> {
        self.health.as_ref().and_then(|h| h.failing())
    }

    /// Passes `result` through, remembering a failure of the database itself for
    /// [`SqliteStore::check_ready`]. Every dispatched [`super::Store`] call on SQLite goes
    /// through it.
    pub(super) fn observe<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let (Err(e), Some(health)) = (&result, &self.health) {
            health.observe(e);
        }
        result
    }

    pub(super) async fn accept_events(
        &self,
        requests: &[IngestRequest],
        fanned_out_at: Option<i64>,
    ) -> Result<Committed, StoreError> {
        let mut tx = SqliteIngest(self.begin_write().await?);
        let committed = accept_in(&mut tx, requests, fanned_out_at).await?;
        match committed {
            Committed::Written(_) => tx.0.commit().await?,
            Committed::Stale { .. } => tx.0.rollback().await?,
        }
        Ok(committed)
    }

    /// See [`super::Store::fan_out_outbox`].
    pub(super) async fn fan_out_outbox(
        &self,
        events: &[NewEvent],
        fanned_out_at: i64,
    ) -> Result<OutboxCommitted, StoreError> {
        let mut tx = SqliteIngest(self.begin_write().await?);
        let committed = fan_out_in(&mut tx, events, fanned_out_at).await?;
        match committed {
            OutboxCommitted::Written(_) => tx.0.commit().await?,
            OutboxCommitted::Stale { .. } => tx.0.rollback().await?,
        }
        Ok(committed)
    }

    pub(super) async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

fn is_missing_table(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.message().contains("no such table"))
}

struct SqliteIngest(Transaction<'static, Sqlite>);

impl IngestTx for SqliteIngest {
    async fn claim_keys(
        &mut self,
        keys: &[KeyClaim<'_>],
    ) -> Result<HashMap<(String, String), ExistingKey>, StoreError> {
        let mut existing = HashMap::new();
        for claim in keys {
            let k = claim.key;
            // A key used before its cutoff is free again: taken over.
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (scope, key, fingerprint, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 created_at = excluded.created_at, event_ids = NULL WHERE idempotency_keys.created_at < ?5",
            )
            .bind(&k.scope)
            .bind(&k.key)
            .bind(&k.fingerprint)
            .bind(claim.at)
            .bind(claim.cutoff)
            .execute(&mut *self.0)
            .await?
            .rows_affected();
            if inserted == 0 {
                let (fingerprint, ids): (String, Option<String>) =
                    sqlx::query_as("SELECT fingerprint, event_ids FROM idempotency_keys WHERE scope = ? AND key = ?")
                        .bind(&k.scope)
                        .bind(&k.key)
                        .fetch_one(&mut *self.0)
                        .await?;
                existing.insert(
                    (k.scope.clone(), k.key.clone()),
                    ExistingKey { fingerprint, event_ids: decode_ids(ids.as_deref())? },
                );
            }
        }
        Ok(existing)
    }

    async fn insert_events(&mut self, events: &[&NewEvent]) -> Result<HashSet<EventId>, StoreError> {
        let mut inserted = HashSet::with_capacity(events.len());
        for e in events {
            // The identity first: new, or first accepted before the event's dedup cutoff
            // (then taken over); else the event is a duplicate and is not written.
            let claimed = sqlx::query(
                "INSERT INTO event_identities (namespace, source, external_id, event_id, received_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (namespace, source, external_id) DO UPDATE SET \
                 event_id = excluded.event_id, received_at = excluded.received_at \
                 WHERE event_identities.received_at < ?6",
            )
            .bind(&e.namespace)
            .bind(&e.source)
            .bind(&e.external_id)
            .bind(e.id.as_str())
            .bind(e.received_at)
            .bind(dedup_cutoff(e))
            .execute(&mut *self.0)
            .await?
            .rows_affected();
            if claimed == 0 {
                continue;
            }
            let affected = sqlx::query(
                "INSERT INTO events (id, namespace, source, external_id, type, subject, time, data, content_type, \
                 ingested_by, trace_id, received_at, attributes, status) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'accepted')",
            )
            .bind(e.id.as_str())
            .bind(&e.namespace)
            .bind(&e.source)
            .bind(&e.external_id)
            .bind(&e.event_type)
            .bind(&e.subject)
            .bind(e.time)
            .bind(&e.data)
            .bind(&e.content_type)
            .bind(&e.ingested_by)
            .bind(&e.trace_id)
            .bind(e.received_at)
            .bind(super::attributes_column(&e.attributes))
            .execute(&mut *self.0)
            .await?
            .rows_affected();
            if affected == 1 {
                inserted.insert(e.id.clone());
            }
        }
        Ok(inserted)
    }

    async fn insert_deliveries(&mut self, events: &[&NewEvent]) -> Result<(), StoreError> {
        // Rows go in in id order, so an earlier one of the batch is written when a later
        // one of its lane asks whether it waits behind it.
        static INSERT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let insert = INSERT.get_or_init(|| {
            format!(
                "INSERT INTO deliveries (id, event_id, namespace, endpoint, state, next_attempt_at, ordering_key, \
                 created_at, updated_at, lane_behind) VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?7, ?8, \
                 ?6 IS NOT NULL AND {})",
                super::lanes::behind_written("?3", "?4", "?6", "?1")
            )
        });
        let mut rows: Vec<(&NewEvent, &super::NewDelivery)> =
            events.iter().flat_map(|e| e.deliveries.iter().map(move |d| (*e, d))).collect();
        rows.sort_unstable_by(|a, b| a.1.id.cmp(&b.1.id));
        for (e, d) in &rows {
            sqlx::query(insert)
                .bind(d.id.as_str())
                .bind(e.id.as_str())
                .bind(&e.namespace)
                .bind(&d.endpoint)
                .bind(e.received_at)
                .bind(&d.ordering_key)
                .bind(e.received_at)
                .bind(e.received_at)
                .execute(&mut *self.0)
                .await?;
        }
        let ordered: Vec<&str> =
            rows.iter().filter(|(_, d)| d.ordering_key.is_some()).map(|(_, d)| d.id.as_str()).collect();
        super::lanes::written_in(&mut self.0, &ordered).await
    }

    async fn find_event_ids(&mut self, identities: &[Identity]) -> Result<HashMap<Identity, EventId>, StoreError> {
        let mut found = HashMap::with_capacity(identities.len());
        for identity in identities {
            let id: Option<String> = sqlx::query_scalar(
                "SELECT event_id FROM event_identities WHERE namespace = ? AND source = ? AND external_id = ?",
            )
            .bind(&identity.0)
            .bind(&identity.1)
            .bind(&identity.2)
            .fetch_optional(&mut *self.0)
            .await?;
            if let Some(id) = id {
                let id = EventId::parse(&id).map_err(|e| StoreError::Corrupt(format!("event id `{id}`: {e}")))?;
                found.insert(identity.clone(), id);
            }
        }
        Ok(found)
    }

    async fn record_keys(&mut self, results: &[(&IdempotencyKey, Vec<EventId>)]) -> Result<(), StoreError> {
        for (k, ids) in results {
            sqlx::query("UPDATE idempotency_keys SET event_ids = ? WHERE scope = ? AND key = ?")
                .bind(encode_ids(ids))
                .bind(&k.scope)
                .bind(&k.key)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }

    async fn resource_revision(&mut self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT revision FROM resource_revision WHERE id = 1").fetch_one(&mut *self.0).await?)
    }

    async fn lock_outbox(&mut self, ids: &[&str]) -> Result<HashSet<EventId>, StoreError> {
        // The one writer holds the database: nobody else can take them meanwhile.
        let ids = serde_json::to_string(ids).expect("a list of strings always serializes");
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM events WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'outbox'",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        found
            .into_iter()
            .map(|raw| EventId::parse(&raw).map_err(|e| StoreError::Corrupt(format!("event id `{raw}`: {e}"))))
            .collect()
    }

    async fn end_outbox(&mut self, ids: &[&str]) -> Result<(), StoreError> {
        let ids = serde_json::to_string(ids).expect("a list of strings always serializes");
        sqlx::query("UPDATE events SET status = 'accepted' WHERE id IN (SELECT value FROM json_each(?1))")
            .bind(ids)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }
}

/// The deliveries claimed for lease token `$1`, with their events: by state first, as the
/// leased deliveries are few and the table is not.
pub(super) static CLAIMED_BY_TOKEN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, FALSE AS probe FROM deliveries d JOIN events e ON e.id = d.event_id \
         WHERE d.state = 'delivering' AND d.lease_token = $1 ORDER BY d.id",
        super::deliveries::CLAIMED_COLUMNS
    )
});

/// The statements of the delivery methods that SQLite runs row by row: they are prepared
/// once and run in-process, so a loop costs little here.
impl SqliteStore {
    /// Leases due deliveries to `token`; returns them with their events.
    pub(super) async fn claim_rows(
        &self,
        token: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<super::deliveries::ClaimRow>, StoreError> {
        use super::queue::CLAIMABLE;
        // One writer connection: the claim cannot race another, so no row lock is needed.
        static CLAIM: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE deliveries SET state = 'delivering', lease_token = $1, lease_until = $2, \
                 attempts = attempts + 1, updated_at = $3 WHERE id IN ({CLAIMABLE})"
            )
        });
        let claimed = sqlx::query(&CLAIM)
            .bind(token)
            .bind(lease_until)
            .bind(now)
            .bind(now)
            .bind(now)
            .bind(i64::from(limit))
            .execute(&self.write)
            .await?
            .rows_affected();
        if claimed == 0 {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(&CLAIMED_BY_TOKEN).bind(token).fetch_all(&self.write).await?)
    }

    /// Applies the completions whose lease token still matches, with their attempts;
    /// says which applied.
    pub(super) async fn write_completions_in(
        tx: &mut Transaction<'static, Sqlite>,
        completions: &[super::Completion],
        now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut applied = Vec::with_capacity(completions.len());
        for c in completions {
            let updated = sqlx::query(
                "UPDATE deliveries SET state = ?, next_attempt_at = ?, lease_token = NULL, lease_until = NULL, \
                 last_status = ?, last_error = ?, updated_at = ?, completed_at = ?, decision = COALESCE(?, decision) \
                 WHERE id = ? AND lease_token = ?",
            )
            .bind(c.state.as_str())
            .bind(c.next_attempt_at)
            .bind(c.attempt.status.map(i32::from))
            .bind(&c.attempt.error)
            .bind(now)
            .bind(c.state.is_final().then_some(now))
            .bind(&c.decision)
            .bind(c.id.as_str())
            .bind(&c.lease_token)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            applied.push(updated == 1);
            if updated != 1 {
                continue;
            }
            sqlx::query(
                "INSERT INTO delivery_attempts (delivery_id, attempt, namespace, endpoint, started_at, duration_ms, status, \
                 response, error, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(c.id.as_str())
            .bind(c.attempt.attempt as i32)
            .bind(&c.namespace)
            .bind(&c.endpoint)
            .bind(c.attempt.started_at)
            .bind(c.attempt.duration_ms)
            .bind(c.attempt.status.map(i32::from))
            .bind(&c.attempt.response)
            .bind(&c.attempt.error)
            .bind(&c.attempt.outcome)
            .execute(&mut **tx)
            .await?;
        }
        Ok(applied)
    }

    /// Commits or releases the reservations of ended deliveries: `(delivery, ledger state)`;
    /// returns the entries settled (see [`super::spend::settle_ledger_in`]).
    pub(super) async fn settle_spend_in(
        tx: &mut Transaction<'static, Sqlite>,
        settled: &[(&str, &'static str)],
    ) -> Result<Vec<SettledEntry>, StoreError> {
        let mut entries = Vec::new();
        for (id, state) in settled {
            let rows: Vec<SettledEntry> = sqlx::query_as(
                "UPDATE spend_ledger SET state = ? WHERE delivery_id = ? AND state = 'reserved' \
                 RETURNING delivery_id, namespace, rule, spend_key, currency, amount, state, bucket_end",
            )
            .bind(*state)
            .bind(*id)
            .fetch_all(&mut **tx)
            .await?;
            entries.extend(rows);
        }
        Ok(entries)
    }
}
