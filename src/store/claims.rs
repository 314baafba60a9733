//! The dispatcher's claims: per endpoint, at most its free slots, oldest due first; the
//! breaker's half-open probe and the hourly retry budget, shared by every process.
//!
//! A claim names the endpoints it may send to with a cap each (its free concurrency slots
//! in the calling process, none while its rate limit says no) and reads each endpoint's
//! due deliveries from `deliveries_claimable` (by endpoint, then due time and id), at most
//! the cap of each, then the oldest `limit` of those. So a claim reads `O(endpoints +
//! claimed)` index entries: a busy endpoint's backlog is never read, claimed and given
//! back, and an ordered backlog is not read at all (see [`super::lanes`]).
//!
//! Invariants:
//! - at most one claim at a time holds an endpoint's half-open probe (its breaker's
//!   failures reached the threshold and its open period is over): a claim takes the probe
//!   with a conditional update of `endpoint_state` (its lease token, until its lease ends)
//!   and then one delivery of the endpoint; without the probe it takes none. The probe's
//!   completion or release clears it; a crashed holder's, or one held for approval,
//!   expires with its lease;
//! - `retriesPerHour`: a retry is granted only while fewer than that many were granted to
//!   the endpoint in the last hour, counted in the database under a lock (PostgreSQL: the
//!   endpoint's advisory lock; SQLite: the one writer), so the bound holds for all
//!   processes together.

use chrono::{DateTime, Utc};

use super::deliveries::{ClaimRow, CLAIMED_COLUMNS};
use super::sql::{in_list, sql, PerBackend, Tx};
use super::{Backend, ClaimedDelivery, PgStore, SqliteStore, Store, StoreError};
use crate::ids::DeliveryId;

/// What one claim may take of one endpoint's deliveries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointQuota {
    pub namespace: String,
    pub endpoint: String,
    /// At most this many (its free slots in this process).
    pub cap: u32,
    /// The breaker's `consecutiveFailures`, when it has a breaker: from that many failures
    /// on, one probe at a time across processes.
    pub breaker_threshold: Option<u32>,
}

/// What a claim costs the database, as PostgreSQL's `EXPLAIN (ANALYZE, BUFFERS)` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimCost {
    /// Shared buffers hit or read by the whole statement.
    pub buffers: u64,
    /// Deliveries it would have claimed.
    pub rows: u64,
}

/// The advisory-lock class of retry-budget locks (two-key form).
const RETRY_LOCK_CLASS: i32 = 0x5245_5452;

/// Due, not waiting behind its lane, of endpoint `(n, e)`.
fn due_of(alias: &str, n: &str, e: &str, now: &str) -> String {
    format!(
        "{alias}.namespace = {n} AND {alias}.endpoint = {e} AND {alias}.state IN ('pending', 'retrying') \
         AND NOT {alias}.lane_behind AND {alias}.next_attempt_at <= {now}"
    )
}

/// The whole claim in one statement: `$1..$4` the quotas (namespaces, endpoints, caps,
/// thresholds), `$5` now, `$6` the lease token, `$7` lease end, `$8` the limit.
fn pg_claim_sql() -> String {
    format!(
        "WITH q AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int4[]) AS q(n, e, cap, threshold)), \
         s AS (SELECT q.n, q.e, q.cap, q.threshold, COALESCE(st.consecutive_failures, 0) AS failures FROM q \
               LEFT JOIN endpoint_state st ON st.namespace = q.n AND st.name = q.e \
               WHERE st.namespace IS NULL OR (st.disabled_reason IS NULL \
               AND (st.breaker_open_until IS NULL OR st.breaker_open_until <= $5))), \
         probe AS (UPDATE endpoint_state st SET probe_token = $6, probe_until = $7 FROM s \
               WHERE st.namespace = s.n AND st.name = s.e AND s.threshold IS NOT NULL AND s.failures >= s.threshold \
               AND (st.probe_until IS NULL OR st.probe_until < $5) \
               AND EXISTS (SELECT 1 FROM deliveries c WHERE {due}) RETURNING st.namespace, st.name), \
         quota AS (SELECT s.n, s.e, s.threshold IS NOT NULL AND s.failures >= s.threshold AS half_open, \
               CASE WHEN s.threshold IS NULL OR s.failures < s.threshold THEN s.cap \
               WHEN EXISTS (SELECT 1 FROM probe p WHERE p.namespace = s.n AND p.name = s.e) THEN 1 ELSE 0 END AS cap \
               FROM s), \
         picked AS (SELECT x.id FROM quota CROSS JOIN LATERAL (SELECT c.id, c.next_attempt_at FROM deliveries c \
               WHERE {due_quota} ORDER BY c.next_attempt_at, c.id LIMIT quota.cap FOR UPDATE SKIP LOCKED) x \
               ORDER BY quota.half_open DESC, x.next_attempt_at, x.id LIMIT $8), \
         d AS (UPDATE deliveries SET state = 'delivering', lease_token = $6, lease_until = $7, attempts = attempts + 1, \
               updated_at = $5 WHERE id IN (SELECT id FROM picked) RETURNING *) \
         SELECT {CLAIMED_COLUMNS}, EXISTS (SELECT 1 FROM probe p WHERE p.namespace = d.namespace AND p.name = d.endpoint) \
         AS probe FROM d JOIN events e ON e.id = d.event_id ORDER BY d.id",
        due = due_of("c", "s.n", "s.e", "$5"),
        due_quota = due_of("c", "quota.n", "quota.e", "$5"),
    )
}

/// The columns of a quota list, as PostgreSQL arrays.
type QuotaArrays<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<i64>, Vec<Option<i32>>);

fn quota_arrays(quotas: &[EndpointQuota]) -> QuotaArrays<'_> {
    (
        quotas.iter().map(|q| q.namespace.as_str()).collect(),
        quotas.iter().map(|q| q.endpoint.as_str()).collect(),
        quotas.iter().map(|q| i64::from(q.cap)).collect(),
        quotas.iter().map(|q| q.breaker_threshold.map(|t| t.min(i32::MAX as u32) as i32)).collect(),
    )
}

impl Store {
    /// The dispatcher's claim: up to `limit` due deliveries for `lease`, at most each
    /// quota's cap of its endpoint's, oldest due first; of an endpoint that is half-open,
    /// one, and only by the claim that takes its probe (see the module docs).
    pub async fn claim_endpoint_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: std::time::Duration,
        limit: u32,
        quotas: &[EndpointQuota],
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        match self {
            Store::Sqlite(s) => s.observe(s.claim_endpoint_deliveries(now, lease, limit, quotas).await),
            Store::Postgres(s) => s.claim_endpoint_deliveries(now, lease, limit, quotas).await,
        }
    }

    /// What [`Self::claim_endpoint_deliveries`] would cost now, in database buffers
    /// (PostgreSQL; `None` on SQLite, which counts none). Runs the claim and rolls it back.
    pub async fn claim_cost(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        quotas: &[EndpointQuota],
    ) -> Result<Option<ClaimCost>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(s.claim_cost(now, limit, quotas).await?)),
        }
    }

    /// Grants one retry of an endpoint with `retriesPerHour: per_hour` at `now`: false when
    /// that many were granted to it in the hour before, by any process (see the module
    /// docs).
    pub async fn take_retry(
        &self,
        namespace: &str,
        endpoint: &str,
        per_hour: u32,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            if tx.backend() == Backend::Postgres {
                sql("SELECT pg_advisory_xact_lock($1, hashtext($2 || '/' || $3))")
                    .bind(RETRY_LOCK_CLASS)
                    .bind(namespace)
                    .bind(endpoint)
                    .execute(&mut tx)
                    .await?;
            }
            sql("DELETE FROM endpoint_retries WHERE namespace = $1 AND endpoint = $2 AND at <= $3")
                .bind(namespace)
                .bind(endpoint)
                .bind(now - chrono::Duration::hours(1))
                .execute(&mut tx)
                .await?;
            let granted = sql("INSERT INTO endpoint_retries (namespace, endpoint, at) SELECT $1, $2, $3 \
                 WHERE (SELECT COUNT(*) FROM endpoint_retries WHERE namespace = $1 AND endpoint = $2) < $4")
            .bind(namespace)
            .bind(endpoint)
            .bind(now)
            .bind(i64::from(per_hour))
            .execute(&mut tx)
            .await?;
            tx.commit().await?;
            Ok(granted == 1)
        })
        .await
    }
}

/// Clears the half-open probes that the claims `(delivery, lease token)` hold. Probes held
/// are few: one read finds none for most calls, and the deliveries are read only for a
/// token that holds one. (One statement joining the deliveries got a plan, once prepared,
/// that read the whole deliveries table on every completion batch.)
pub(super) async fn release_probes_in(tx: &mut Tx, claims: &[(&DeliveryId, &str)]) -> Result<(), StoreError> {
    static HELD: PerBackend = PerBackend::new(|backend| {
        format!("SELECT probe_token FROM endpoint_state WHERE probe_token {}", in_list(backend, "$1"))
    });
    if claims.is_empty() {
        return Ok(());
    }
    let mut tokens: Vec<&str> = claims.iter().map(|(_, token)| *token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let held: Vec<String> = sql(HELD.get(tx.backend())).bind(tokens.as_slice()).scalars(&mut *tx).await?;
    for (id, token) in claims.iter().filter(|(_, token)| held.iter().any(|h| h == token)) {
        sql("UPDATE endpoint_state SET probe_token = NULL, probe_until = NULL WHERE probe_token = $1 \
             AND (namespace, name) IN (SELECT namespace, endpoint FROM deliveries WHERE id = $2)")
        .bind(*token)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

impl PgStore {
    /// Leases at most each quota's cap of its endpoint's due deliveries, at most `limit` in
    /// all, oldest due first; see the module doc.
    pub(super) async fn claim_endpoint_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: std::time::Duration,
        limit: u32,
        quotas: &[EndpointQuota],
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let token = ulid::Ulid::new().to_string();
        let lease_until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        static CLAIM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (namespaces, endpoints, caps, thresholds) = quota_arrays(quotas);
        let rows: Vec<ClaimRow> = sqlx::query_as(CLAIM.get_or_init(pg_claim_sql))
            .bind(&namespaces)
            .bind(&endpoints)
            .bind(&caps)
            .bind(&thresholds)
            .bind(now)
            .bind(&token)
            .bind(lease_until)
            .bind(i64::from(limit))
            .fetch_all(self.write_pool())
            .await?;
        rows.into_iter().map(|r| r.into_claimed(&token)).collect()
    }

    /// The cost of [`Self::claim_endpoint_deliveries`] now, measured by running it under
    /// `EXPLAIN (ANALYZE, BUFFERS)` in a transaction that is rolled back.
    pub(super) async fn claim_cost(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        quotas: &[EndpointQuota],
    ) -> Result<ClaimCost, StoreError> {
        let (namespaces, endpoints, caps, thresholds) = quota_arrays(quotas);
        let mut tx = self.begin_write().await?;
        let plan: serde_json::Value =
            sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", pg_claim_sql()))
                .bind(&namespaces)
                .bind(&endpoints)
                .bind(&caps)
                .bind(&thresholds)
                .bind(now)
                .bind("cost")
                .bind(now)
                .bind(i64::from(limit))
                .fetch_one(&mut *tx)
                .await?;
        tx.rollback().await?;
        let root = &plan[0]["Plan"];
        let count = |field: &str| root[field].as_u64().unwrap_or(0);
        Ok(ClaimCost { buffers: count("Shared Hit Blocks") + count("Shared Read Blocks"), rows: count("Actual Rows") })
    }
}

/// The state of an endpoint a claim looks at: `(failures, open until, disabled, probe until)`.
type ClaimState = (i32, Option<DateTime<Utc>>, bool, Option<DateTime<Utc>>);

impl SqliteStore {
    /// See [`PgStore::claim_endpoint_deliveries`]: the same claim, one endpoint at a time
    /// on the one writer connection (in-process statements, prepared once).
    pub(super) async fn claim_endpoint_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: std::time::Duration,
        limit: u32,
        quotas: &[EndpointQuota],
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        static DUE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let due = DUE.get_or_init(|| {
            format!(
                "SELECT c.next_attempt_at, c.id FROM deliveries c INDEXED BY deliveries_claimable WHERE {} \
                 ORDER BY c.next_attempt_at, c.id LIMIT ?4",
                due_of("c", "?1", "?2", "?3")
            )
        });
        let token = ulid::Ulid::new().to_string();
        let lease_until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let mut tx = self.begin_write().await?;
        // `(half-open, due, id, quota)`, sorted: the probes first, then the oldest due.
        let mut picked: Vec<(bool, DateTime<Utc>, String, usize)> = Vec::new();
        for (i, quota) in quotas.iter().enumerate() {
            let state: Option<ClaimState> = sqlx::query_as(
                "SELECT consecutive_failures, breaker_open_until, disabled_reason IS NOT NULL, probe_until \
                 FROM endpoint_state WHERE namespace = ? AND name = ?",
            )
            .bind(&quota.namespace)
            .bind(&quota.endpoint)
            .fetch_optional(&mut *tx)
            .await?;
            let (failures, open_until, disabled, probe_until) = state.unwrap_or((0, None, false, None));
            if disabled || open_until.is_some_and(|until| until > now) {
                continue;
            }
            let half_open = quota.breaker_threshold.is_some_and(|t| i64::from(failures) >= i64::from(t));
            let cap = match half_open {
                true if probe_until.is_some_and(|until| until >= now) => continue,
                true => 1,
                false => quota.cap,
            };
            let rows: Vec<(DateTime<Utc>, String)> = sqlx::query_as(due)
                .bind(&quota.namespace)
                .bind(&quota.endpoint)
                .bind(now)
                .bind(i64::from(cap))
                .fetch_all(&mut *tx)
                .await?;
            picked.extend(rows.into_iter().map(|(at, id)| (half_open, at, id, i)));
        }
        picked.sort_unstable_by(|a, b| (!a.0, a.1, &a.2).cmp(&(!b.0, b.1, &b.2)));
        picked.truncate(limit as usize);
        if picked.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let mut probes = Vec::new();
        for (_, _, _, i) in picked.iter().filter(|p| p.0) {
            let quota = &quotas[*i];
            sqlx::query("UPDATE endpoint_state SET probe_token = ?, probe_until = ? WHERE namespace = ? AND name = ?")
                .bind(&token)
                .bind(lease_until)
                .bind(&quota.namespace)
                .bind(&quota.endpoint)
                .execute(&mut *tx)
                .await?;
            probes.push((quota.namespace.as_str(), quota.endpoint.as_str()));
        }
        let ids: Vec<&str> = picked.iter().map(|p| p.2.as_str()).collect();
        sqlx::query(
            "UPDATE deliveries SET state = 'delivering', lease_token = ?, lease_until = ?, attempts = attempts + 1, \
             updated_at = ? WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(&token)
        .bind(lease_until)
        .bind(now)
        .bind(serde_json::to_string(&ids).unwrap_or_default())
        .execute(&mut *tx)
        .await?;
        let rows: Vec<ClaimRow> =
            sqlx::query_as(&super::sqlite::CLAIMED_BY_TOKEN).bind(&token).fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.into_iter()
            .map(|mut r| {
                r.probe = probes.contains(&(r.namespace.as_str(), r.endpoint.as_str()));
                r.into_claimed(&token)
            })
            .collect()
    }
}
