//! The production backend: PostgreSQL, shared by any number of `hookwarden serve` processes.
//!
//! Set-sized statements (`UNNEST` arrays) keep a group commit to a handful of round trips
//! whatever its size. Concurrent writers (threads or processes) meet only on unique
//! indexes with `ON CONFLICT DO NOTHING`, taken in sorted order so they cannot deadlock.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::ingest::{
    accept_in, decode_ids, dedup_cutoff, encode_ids, Committed, ExistingKey, Identity, IngestTx, KeyClaim,
};
use super::operational::{fan_out_in, OutboxCommitted};
use super::spend::SettledEntry;
use super::{check_migrated, IdempotencyKey, IngestRequest, NewEvent, StoreError};
use crate::ids::EventId;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// For the leader's own connection, outside the pool.
    pub(super) options: Arc<PgConnectOptions>,
    /// This process's name in work notifications, so that its listener skips its own
    /// (the in-process signal already woke its workers).
    pub(super) instance: Arc<str>,
}

/// The notification channel that wakes idle delivery workers.
const WORK_CHANNEL: &str = "hookwarden_work";
/// The notification channel that wakes the leader's status reconciler.
const STATUS_CHANNEL: &str = "hookwarden_status";

/// What another process signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Deliveries became due.
    Work,
    /// Resources or endpoint state changed: status is due.
    Status,
}

/// Notifications from other processes.
pub struct WorkListener {
    listener: sqlx::postgres::PgListener,
    own: Arc<str>,
}

impl WorkListener {
    /// Waits for the next notification another process sent.
    pub async fn recv(&mut self) -> Result<Notice, StoreError> {
        loop {
            let notification = self.listener.recv().await?;
            if notification.payload() != &*self.own {
                return Ok(if notification.channel() == STATUS_CHANNEL { Notice::Status } else { Notice::Work });
            }
        }
    }
}

impl PgStore {
    /// Connects with the default `database.acquireTimeout`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, crate::config::DatabaseConfig::default().acquire_timeout).await
    }

    /// A pool whose every wait for a connection (connecting included) ends after
    /// `acquire_timeout`, so that a request is answered in bounded time while the server
    /// is away. Idle connections are tested before use, so the pool heals by itself
    /// once the server is back.
    pub async fn connect_with(url: &str, acquire_timeout: Duration) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("hookwarden");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(true)
            .connect_with(options.clone())
            .await?;
        Ok(Self { pool, options: Arc::new(options), instance: ulid::Ulid::new().to_string().into() })
    }

    /// Tells every process listening that deliveries are due (see [`Self::listen_for_work`]).
    pub(super) async fn notify_work(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)").bind(WORK_CHANNEL).bind(&*self.instance).execute(&self.pool).await?;
        Ok(())
    }

    /// Tells the leader, wherever it runs, that resources or endpoint state changed.
    pub(super) async fn notify_status(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)").bind(STATUS_CHANNEL).bind(&*self.instance).execute(&self.pool).await?;
        Ok(())
    }

    /// A listener woken by [`Self::notify_work`] (and by ingest commits that fanned out)
    /// and [`Self::notify_status`] from every other process.
    pub(super) async fn listen_for_work(&self) -> Result<WorkListener, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen_all([WORK_CHANNEL, STATUS_CHANNEL]).await?;
        Ok(WorkListener { listener, own: self.instance.clone() })
    }

    pub(super) fn write_pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    pub(super) fn read_pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx takes an advisory lock, so processes starting together migrate once.
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn check_ready(&self) -> Result<(), StoreError> {
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(&self.pool).await?;
        let found: Option<i64> = if exists {
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success").fetch_one(&self.pool).await?
        } else {
            None
        };
        check_migrated(found, &MIGRATOR)
    }

    pub(super) async fn accept_events(
        &self,
        requests: &[IngestRequest],
        fanned_out_at: Option<i64>,
    ) -> Result<Committed, StoreError> {
        let mut tx = PgIngest(self.begin_write().await?, &self.instance);
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
        let mut tx = PgIngest(self.begin_write().await?, &self.instance);
        let committed = fan_out_in(&mut tx, events, fanned_out_at).await?;
        match committed {
            OutboxCommitted::Written(_) => tx.0.commit().await?,
            OutboxCommitted::Stale { .. } => tx.0.rollback().await?,
        }
        Ok(committed)
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// The ingest transaction, and the name work notifications carry.
struct PgIngest<'a>(Transaction<'static, Postgres>, &'a str);

impl PgIngest<'_> {
    /// Claims the identities of `events` (sorted by identity, so that concurrent writers
    /// lock them in one order): new ones are inserted, those first accepted before the
    /// event's dedup cutoff are taken over. Returns the events that claimed theirs.
    async fn claim_identities<'e>(&mut self, events: &[&'e NewEvent]) -> Result<Vec<&'e NewEvent>, StoreError> {
        let columns = |events: &[&NewEvent]| {
            let text = |f: fn(&NewEvent) -> &str| events.iter().map(|e| f(e).to_owned()).collect::<Vec<String>>();
            (
                text(|e| e.id.as_str()),
                text(|e| &e.namespace),
                text(|e| &e.source),
                text(|e| &e.external_id),
                events.iter().map(|e| e.received_at).collect::<Vec<DateTime<Utc>>>(),
            )
        };
        let (ids, namespaces, sources, external_ids, received) = columns(events);
        let mut claimed: HashSet<String> = sqlx::query_scalar::<_, String>(
            "INSERT INTO event_identities (event_id, namespace, source, external_id, received_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) \
             ON CONFLICT DO NOTHING RETURNING event_id",
        )
        .bind(&ids)
        .bind(&namespaces)
        .bind(&sources)
        .bind(&external_ids)
        .bind(&received)
        .fetch_all(&mut *self.0)
        .await?
        .into_iter()
        .collect();
        // Only an identity past its event's window may be taken over.
        let rest: Vec<&NewEvent> =
            events.iter().copied().filter(|e| !claimed.contains(e.id.as_str()) && dedup_cutoff(e).is_some()).collect();
        if !rest.is_empty() {
            let (ids, namespaces, sources, external_ids, received) = columns(&rest);
            let cutoffs: Vec<Option<DateTime<Utc>>> = rest.iter().copied().map(dedup_cutoff).collect();
            let taken: Vec<String> = sqlx::query_scalar(
                "UPDATE event_identities i SET event_id = t.ev, received_at = t.r \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[]) \
                 AS t(ev, n, s, x, r, c) \
                 WHERE i.namespace = t.n AND i.source = t.s AND i.external_id = t.x AND i.received_at < t.c \
                 RETURNING t.ev",
            )
            .bind(&ids)
            .bind(&namespaces)
            .bind(&sources)
            .bind(&external_ids)
            .bind(&received)
            .bind(&cutoffs)
            .fetch_all(&mut *self.0)
            .await?;
            claimed.extend(taken);
        }
        Ok(events.iter().copied().filter(|e| claimed.contains(e.id.as_str())).collect())
    }
}

fn parse_id(raw: String) -> Result<EventId, StoreError> {
    EventId::parse(&raw).map_err(|e| StoreError::Corrupt(format!("event id `{raw}`: {e}")))
}

impl IngestTx for PgIngest<'_> {
    async fn claim_keys(
        &mut self,
        keys: &[KeyClaim<'_>],
    ) -> Result<HashMap<(String, String), ExistingKey>, StoreError> {
        let scopes: Vec<&str> = keys.iter().map(|k| k.key.scope.as_str()).collect();
        let names: Vec<&str> = keys.iter().map(|k| k.key.key.as_str()).collect();
        let fingerprints: Vec<&str> = keys.iter().map(|k| k.key.fingerprint.as_str()).collect();
        let times: Vec<DateTime<Utc>> = keys.iter().map(|k| k.at).collect();
        let mut claimed: HashSet<(String, String)> = sqlx::query_as::<_, (String, String)>(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, created_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[]) \
             ON CONFLICT DO NOTHING RETURNING scope, key",
        )
        .bind(&scopes)
        .bind(&names)
        .bind(&fingerprints)
        .bind(&times)
        .fetch_all(&mut *self.0)
        .await?
        .into_iter()
        .collect();
        if claimed.len() == keys.len() {
            return Ok(HashMap::new());
        }
        // Keys used before their window: free again, taken over (the row is locked, so a
        // concurrent claim of the same key waits and then finds it in use).
        let rest: Vec<&KeyClaim<'_>> =
            keys.iter().filter(|k| !claimed.contains(&(k.key.scope.clone(), k.key.key.clone()))).collect();
        let cutoffs: Vec<Option<DateTime<Utc>>> = rest.iter().map(|k| k.cutoff).collect();
        let taken: Vec<(String, String)> = sqlx::query_as(
            "UPDATE idempotency_keys i SET fingerprint = t.f, created_at = t.a, event_ids = NULL \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[]) AS t(s, k, f, a, c) \
             WHERE i.scope = t.s AND i.key = t.k AND i.created_at < t.c RETURNING i.scope, i.key",
        )
        .bind(rest.iter().map(|k| k.key.scope.as_str()).collect::<Vec<_>>())
        .bind(rest.iter().map(|k| k.key.key.as_str()).collect::<Vec<_>>())
        .bind(rest.iter().map(|k| k.key.fingerprint.as_str()).collect::<Vec<_>>())
        .bind(rest.iter().map(|k| k.at).collect::<Vec<_>>())
        .bind(&cutoffs)
        .fetch_all(&mut *self.0)
        .await?;
        claimed.extend(taken);
        let (scopes, names): (Vec<&str>, Vec<&str>) = rest
            .iter()
            .filter(|k| !claimed.contains(&(k.key.scope.clone(), k.key.key.clone())))
            .map(|k| (k.key.scope.as_str(), k.key.key.as_str()))
            .unzip();
        if scopes.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
            "SELECT i.scope, i.key, i.fingerprint, i.event_ids FROM idempotency_keys i \
             JOIN UNNEST($1::text[], $2::text[]) AS t(s, k) ON i.scope = t.s AND i.key = t.k",
        )
        .bind(&scopes)
        .bind(&names)
        .fetch_all(&mut *self.0)
        .await?;
        rows.into_iter()
            .map(|(scope, key, fingerprint, ids)| {
                Ok(((scope, key), ExistingKey { fingerprint, event_ids: decode_ids(ids.as_deref())? }))
            })
            .collect()
    }

    async fn insert_events(&mut self, events: &[&NewEvent]) -> Result<HashSet<EventId>, StoreError> {
        let events = self.claim_identities(events).await?;
        if events.is_empty() {
            return Ok(HashSet::new());
        }
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let namespaces: Vec<&str> = events.iter().map(|e| e.namespace.as_str()).collect();
        let sources: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
        let external_ids: Vec<&str> = events.iter().map(|e| e.external_id.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let subjects: Vec<Option<&str>> = events.iter().map(|e| e.subject.as_deref()).collect();
        let times: Vec<Option<DateTime<Utc>>> = events.iter().map(|e| e.time).collect();
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        let content_types: Vec<&str> = events.iter().map(|e| e.content_type.as_str()).collect();
        let attributes: Vec<Option<String>> = events.iter().map(|e| super::attributes_column(&e.attributes)).collect();
        let ingested_by: Vec<&str> = events.iter().map(|e| e.ingested_by.as_str()).collect();
        let trace_ids: Vec<&str> = events.iter().map(|e| e.trace_id.as_str()).collect();
        let received: Vec<DateTime<Utc>> = events.iter().map(|e| e.received_at).collect();
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO events (id, namespace, source, external_id, type, subject, time, data, content_type, \
             ingested_by, trace_id, received_at, attributes, status) \
             SELECT *, 'accepted' FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[], \
             $13::text[]) \
             RETURNING id",
        )
        .bind(&ids)
        .bind(&namespaces)
        .bind(&sources)
        .bind(&external_ids)
        .bind(&types)
        .bind(&subjects)
        .bind(&times)
        .bind(&data)
        .bind(&content_types)
        .bind(&ingested_by)
        .bind(&trace_ids)
        .bind(&received)
        .bind(&attributes)
        .fetch_all(&mut *self.0)
        .await?;
        inserted.into_iter().map(parse_id).collect()
    }

    async fn insert_deliveries(&mut self, events: &[&NewEvent]) -> Result<(), StoreError> {
        let rows: Vec<(&NewEvent, &super::NewDelivery)> =
            events.iter().flat_map(|e| e.deliveries.iter().map(move |d| (*e, d))).collect();
        let ids: Vec<&str> = rows.iter().map(|(_, d)| d.id.as_str()).collect();
        let event_ids: Vec<&str> = rows.iter().map(|(e, _)| e.id.as_str()).collect();
        let namespaces: Vec<&str> = rows.iter().map(|(e, _)| e.namespace.as_str()).collect();
        let endpoints: Vec<&str> = rows.iter().map(|(_, d)| d.endpoint.as_str()).collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|(_, d)| d.ordering_key.as_deref()).collect();
        let times: Vec<DateTime<Utc>> = rows.iter().map(|(e, _)| e.received_at).collect();
        // The lanes first: a lane's head ending meanwhile is seen here, or sees these.
        super::lanes::lock_new_lanes_in(&mut self.0, &namespaces, &endpoints, &keys).await?;
        // Other processes' workers are notified in the same statement; PostgreSQL delivers
        // the notification when (and only if) the transaction commits.
        static INSERT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let insert = INSERT.get_or_init(|| {
            format!(
                "WITH x AS (SELECT *, ROW_NUMBER() OVER (PARTITION BY n, ep, k ORDER BY i) AS nth \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) AS x(i, ev, n, ep, k, t)), \
                 d AS (INSERT INTO deliveries (id, event_id, namespace, endpoint, state, next_attempt_at, ordering_key, \
                 created_at, updated_at, lane_behind) SELECT i, ev, n, ep, 'pending', t, k, t, t, \
                 k IS NOT NULL AND (nth > 1 OR {}) FROM x RETURNING 1) \
                 SELECT pg_notify($7, $8) WHERE EXISTS (SELECT 1 FROM d)",
                super::lanes::behind_written("x.n", "x.ep", "x.k", "x.i")
            )
        });
        sqlx::query(insert)
            .bind(&ids)
            .bind(&event_ids)
            .bind(&namespaces)
            .bind(&endpoints)
            .bind(&keys)
            .bind(&times)
            .bind(WORK_CHANNEL)
            .bind(self.1)
            .execute(&mut *self.0)
            .await?;
        let ordered: Vec<&str> =
            rows.iter().filter(|(_, d)| d.ordering_key.is_some()).map(|(_, d)| d.id.as_str()).collect();
        super::lanes::written_in(&mut self.0, &ordered).await
    }

    async fn find_event_ids(&mut self, identities: &[Identity]) -> Result<HashMap<Identity, EventId>, StoreError> {
        let namespaces: Vec<&str> = identities.iter().map(|i| i.0.as_str()).collect();
        let sources: Vec<&str> = identities.iter().map(|i| i.1.as_str()).collect();
        let external_ids: Vec<&str> = identities.iter().map(|i| i.2.as_str()).collect();
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT e.namespace, e.source, e.external_id, e.event_id FROM event_identities e \
             JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS t(n, s, x) \
             ON e.namespace = t.n AND e.source = t.s AND e.external_id = t.x",
        )
        .bind(&namespaces)
        .bind(&sources)
        .bind(&external_ids)
        .fetch_all(&mut *self.0)
        .await?;
        rows.into_iter().map(|(n, s, x, id)| Ok(((n, s, x), parse_id(id)?))).collect()
    }

    async fn record_keys(&mut self, results: &[(&IdempotencyKey, Vec<EventId>)]) -> Result<(), StoreError> {
        let scopes: Vec<&str> = results.iter().map(|(k, _)| k.scope.as_str()).collect();
        let names: Vec<&str> = results.iter().map(|(k, _)| k.key.as_str()).collect();
        let ids: Vec<String> = results.iter().map(|(_, ids)| encode_ids(ids)).collect();
        sqlx::query(
            "UPDATE idempotency_keys i SET event_ids = t.ids \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS t(s, k, ids) WHERE i.scope = t.s AND i.key = t.k",
        )
        .bind(&scopes)
        .bind(&names)
        .bind(&ids)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn resource_revision(&mut self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT revision FROM resource_revision WHERE id = 1").fetch_one(&mut *self.0).await?)
    }

    async fn lock_outbox(&mut self, ids: &[&str]) -> Result<HashSet<EventId>, StoreError> {
        // Rows another process's fan-out holds are skipped, not waited for; once it
        // commits they are out of the outbox.
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM events WHERE id = ANY($1::text[]) AND status = 'outbox' ORDER BY id FOR UPDATE SKIP LOCKED",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        found.into_iter().map(parse_id).collect()
    }

    async fn end_outbox(&mut self, ids: &[&str]) -> Result<(), StoreError> {
        sqlx::query("UPDATE events SET status = 'accepted' WHERE id = ANY($1::text[])")
            .bind(ids)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }
}

/// The statements of the delivery methods that PostgreSQL runs set-sized: a batch of
/// any size costs one round trip each.
impl PgStore {
    /// Leases due deliveries to `token` and returns them with their events, in one
    /// statement; rows another claim has locked are skipped, not waited for.
    pub(super) async fn claim_rows(
        &self,
        token: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<super::deliveries::ClaimRow>, StoreError> {
        use super::deliveries::CLAIMED_COLUMNS;
        use super::queue::CLAIMABLE;
        static CLAIM: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH d AS (UPDATE deliveries SET state = 'delivering', lease_token = $1, lease_until = $2, \
                 attempts = attempts + 1, updated_at = $3 WHERE id IN ({CLAIMABLE} FOR UPDATE SKIP LOCKED) RETURNING *) \
                 SELECT {CLAIMED_COLUMNS}, FALSE AS probe FROM d JOIN events e ON e.id = d.event_id ORDER BY d.id"
            )
        });
        Ok(sqlx::query_as(&CLAIM)
            .bind(token)
            .bind(lease_until)
            .bind(now)
            .bind(now)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Applies the completions whose lease token still matches, and inserts their
    /// attempts, in one statement; says which applied.
    pub(super) async fn write_completions_in(
        tx: &mut Transaction<'static, Postgres>,
        completions: &[super::Completion],
        now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        let ids: Vec<&str> = completions.iter().map(|c| c.id.as_str()).collect();
        let tokens: Vec<&str> = completions.iter().map(|c| c.lease_token.as_str()).collect();
        let states: Vec<&str> = completions.iter().map(|c| c.state.as_str()).collect();
        let next: Vec<DateTime<Utc>> = completions.iter().map(|c| c.next_attempt_at).collect();
        let statuses: Vec<Option<i32>> = completions.iter().map(|c| c.attempt.status.map(i32::from)).collect();
        let errors: Vec<Option<&str>> = completions.iter().map(|c| c.attempt.error.as_deref()).collect();
        let finals: Vec<bool> = completions.iter().map(|c| c.state.is_final()).collect();
        let decisions: Vec<Option<&str>> = completions.iter().map(|c| c.decision.as_deref()).collect();
        let attempts: Vec<i32> = completions.iter().map(|c| c.attempt.attempt as i32).collect();
        let started: Vec<DateTime<Utc>> = completions.iter().map(|c| c.attempt.started_at).collect();
        let durations: Vec<i64> = completions.iter().map(|c| c.attempt.duration_ms).collect();
        let responses: Vec<Option<&str>> = completions.iter().map(|c| c.attempt.response.as_deref()).collect();
        let outcomes: Vec<&str> = completions.iter().map(|c| c.attempt.outcome.as_str()).collect();
        // The attempts are inserted for the deliveries the update applied to; both
        // sub-statements run whatever the final SELECT reads.
        let updated: Vec<String> = sqlx::query_scalar(
            "WITH t AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int4[], \
             $6::text[], $7::bool[], $8::text[], $10::int4[], $11::timestamptz[], $12::int8[], $13::text[], $14::text[]) \
             AS t(id, token, state, next_at, status, error, final, decision, attempt, started_at, duration_ms, response, \
             outcome)), \
             done AS (UPDATE deliveries d SET state = t.state, next_attempt_at = t.next_at, lease_token = NULL, \
             lease_until = NULL, last_status = t.status, last_error = t.error, updated_at = $9, \
             completed_at = CASE WHEN t.final THEN $9::timestamptz END, decision = COALESCE(t.decision, d.decision) \
             FROM t WHERE d.id = t.id AND d.lease_token = t.token RETURNING d.id, d.namespace, d.endpoint), \
             attempts AS (INSERT INTO delivery_attempts (delivery_id, attempt, namespace, endpoint, started_at, \
             duration_ms, status, response, error, outcome) \
             SELECT t.id, t.attempt, done.namespace, done.endpoint, t.started_at, t.duration_ms, t.status, t.response, \
             t.error, t.outcome FROM t JOIN done ON done.id = t.id ON CONFLICT DO NOTHING) \
             SELECT id FROM done",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&states)
        .bind(&next)
        .bind(&statuses)
        .bind(&errors)
        .bind(&finals)
        .bind(&decisions)
        .bind(now)
        .bind(&attempts)
        .bind(&started)
        .bind(&durations)
        .bind(&responses)
        .bind(&outcomes)
        .fetch_all(&mut **tx)
        .await?;
        let updated: HashSet<String> = updated.into_iter().collect();
        Ok(completions.iter().map(|c| updated.contains(c.id.as_str())).collect())
    }

    /// Commits or releases the reservations of ended deliveries: `(delivery, ledger state)`;
    /// returns the entries settled (see [`super::spend::settle_ledger_in`]).
    pub(super) async fn settle_spend_in(
        tx: &mut Transaction<'static, Postgres>,
        settled: &[(&str, &'static str)],
    ) -> Result<Vec<SettledEntry>, StoreError> {
        let (ids, states): (Vec<&str>, Vec<&str>) = settled.iter().copied().unzip();
        Ok(sqlx::query_as(
            "UPDATE spend_ledger l SET state = t.state FROM UNNEST($1::text[], $2::text[]) AS t(id, state) \
             WHERE l.delivery_id = t.id AND l.state = 'reserved' \
             RETURNING l.delivery_id, l.namespace, l.rule, l.spend_key, l.currency, l.amount, l.state, l.bucket_end",
        )
        .bind(&ids)
        .bind(&states)
        .fetch_all(&mut **tx)
        .await?)
    }
}
