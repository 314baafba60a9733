//! The production backend: PostgreSQL, shared by any number of `hookwarden serve` processes.
//!
//! Set-sized statements (`UNNEST` arrays) keep a group commit to a handful of round trips
//! whatever its size. Concurrent writers (threads or processes) meet only on unique
//! indexes with `ON CONFLICT DO NOTHING`, taken in sorted order so they cannot deadlock.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::ingest::{accept_in, decode_ids, encode_ids, ExistingKey, Identity, IngestTx};
use super::{
    check_migrated, push_event_query, EventQuery, EventRow, IdempotencyKey, IngestRequest, NewEvent, RequestOutcome,
    StoreError, StoredEvent, EVENT_COLUMNS,
};
use crate::ids::EventId;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// For the leader's own connection, outside the pool.
    options: Arc<PgConnectOptions>,
}

/// The advisory lock whose holder leads (runs the controller and periodic jobs).
const LEADER_LOCK: i64 = 0x486f_6f6b_7761_7264;

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("hookwarden");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        Ok(Self { pool, options: Arc::new(options) })
    }

    /// Takes the leader lock on a connection of its own, kept outside the pool: the lock
    /// is held exactly as long as that connection lives, so a dead leader's lock goes
    /// with its connection.
    pub(super) async fn try_lead(&self) -> Result<Option<sqlx::PgConnection>, StoreError> {
        use sqlx::ConnectOptions as _;
        let mut connection = self.options.connect().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(LEADER_LOCK).fetch_one(&mut connection).await?;
        if locked {
            Ok(Some(connection))
        } else {
            use sqlx::Connection as _;
            connection.close().await.ok();
            Ok(None)
        }
    }

    /// Tells every process listening that deliveries are due (see [`Self::listen_for_work`]).
    pub(super) async fn notify_work(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify('hookwarden_work', '')").execute(&self.pool).await?;
        Ok(())
    }

    /// A listener woken by [`Self::notify_work`] from any process.
    pub(super) async fn listen_for_work(&self) -> Result<sqlx::postgres::PgListener, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen("hookwarden_work").await?;
        Ok(listener)
    }

    fn write_pool(&self) -> &PgPool {
        &self.pool
    }

    fn read_pool(&self) -> &PgPool {
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

    pub(super) async fn accept_events(&self, requests: &[IngestRequest]) -> Result<Vec<RequestOutcome>, StoreError> {
        let mut tx = PgIngest(self.pool.begin().await?);
        let outcomes = accept_in(&mut tx, requests).await?;
        tx.0.commit().await?;
        Ok(outcomes)
    }

    pub(super) async fn get_event(&self, id: &EventId) -> Result<Option<StoredEvent>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1");
        let row: Option<EventRow> = sqlx::query_as(&sql).bind(id.as_str()).fetch_optional(&self.pool).await?;
        row.map(StoredEvent::try_from).transpose()
    }

    pub(super) async fn list_events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let mut builder = sqlx::QueryBuilder::<Postgres>::new("");
        push_event_query(&mut builder, query);
        let rows: Vec<EventRow> = builder.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter().map(StoredEvent::try_from).collect()
    }

    pub(super) async fn delete_idempotency_keys_before(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted)
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

super::resources::resource_methods!(PgStore, super::resources::numbered);
super::deliveries::delivery_methods!(PgStore, super::resources::numbered, " FOR UPDATE SKIP LOCKED");
super::policy::policy_methods!(
    PgStore,
    super::resources::numbered,
    Some("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))"),
    " FOR UPDATE"
);
super::audit::audit_methods!(
    PgStore,
    super::resources::numbered,
    Some("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))")
);

struct PgIngest(Transaction<'static, Postgres>);

fn parse_id(raw: String) -> Result<EventId, StoreError> {
    EventId::parse(&raw).map_err(|e| StoreError::Corrupt(format!("event id `{raw}`: {e}")))
}

impl IngestTx for PgIngest {
    async fn claim_keys(
        &mut self,
        keys: &[&IdempotencyKey],
    ) -> Result<HashMap<(String, String), ExistingKey>, StoreError> {
        let scopes: Vec<&str> = keys.iter().map(|k| k.scope.as_str()).collect();
        let names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
        let fingerprints: Vec<&str> = keys.iter().map(|k| k.fingerprint.as_str()).collect();
        let claimed: Vec<(String, String)> = sqlx::query_as(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, created_at) \
             SELECT s, k, f, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS t(s, k, f) \
             ON CONFLICT DO NOTHING RETURNING scope, key",
        )
        .bind(&scopes)
        .bind(&names)
        .bind(&fingerprints)
        .bind(Utc::now())
        .fetch_all(&mut *self.0)
        .await?;
        if claimed.len() == keys.len() {
            return Ok(HashMap::new());
        }
        let claimed: HashSet<(String, String)> = claimed.into_iter().collect();
        let (scopes, names): (Vec<&str>, Vec<&str>) = keys
            .iter()
            .filter(|k| !claimed.contains(&(k.scope.clone(), k.key.clone())))
            .map(|k| (k.scope.as_str(), k.key.as_str()))
            .unzip();
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
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let namespaces: Vec<&str> = events.iter().map(|e| e.namespace.as_str()).collect();
        let sources: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
        let external_ids: Vec<&str> = events.iter().map(|e| e.external_id.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let subjects: Vec<Option<&str>> = events.iter().map(|e| e.subject.as_deref()).collect();
        let times: Vec<Option<DateTime<Utc>>> = events.iter().map(|e| e.time).collect();
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        let content_types: Vec<&str> = events.iter().map(|e| e.content_type.as_str()).collect();
        let ingested_by: Vec<&str> = events.iter().map(|e| e.ingested_by.as_str()).collect();
        let trace_ids: Vec<&str> = events.iter().map(|e| e.trace_id.as_str()).collect();
        let received: Vec<DateTime<Utc>> = events.iter().map(|e| e.received_at).collect();
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO events (id, namespace, source, external_id, type, subject, time, data, content_type, \
             ingested_by, trace_id, received_at, status) \
             SELECT *, 'accepted' FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[]) \
             ON CONFLICT (namespace, source, external_id) DO NOTHING RETURNING id",
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
        sqlx::query(
            "INSERT INTO deliveries (id, event_id, namespace, endpoint, state, next_attempt_at, ordering_key, created_at, \
             updated_at) SELECT i, ev, n, ep, 'pending', t, k, t, t \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) AS x(i, ev, n, ep, k, t)",
        )
        .bind(&ids)
        .bind(&event_ids)
        .bind(&namespaces)
        .bind(&endpoints)
        .bind(&keys)
        .bind(&times)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn find_event_ids(&mut self, identities: &[Identity]) -> Result<HashMap<Identity, EventId>, StoreError> {
        let namespaces: Vec<&str> = identities.iter().map(|i| i.0.as_str()).collect();
        let sources: Vec<&str> = identities.iter().map(|i| i.1.as_str()).collect();
        let external_ids: Vec<&str> = identities.iter().map(|i| i.2.as_str()).collect();
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT e.namespace, e.source, e.external_id, e.id FROM events e \
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
}
