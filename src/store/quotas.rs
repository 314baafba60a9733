//! The shared ingest buckets on PostgreSQL (`namespace_quota`, migration 0013): one row per
//! namespace with `spec.quotas.ingest`, leased from in batches by every process (see
//! [`crate::ingest::quota`] for the accounting and the bound it keeps).
//!
//! Invariants: a lease is one statement that refills the bucket to the caller's `now`,
//! takes up to the batch (at least what is needed, or nothing) and counts it against the
//! day, under the row's lock; tokens never go below zero nor above `burst`. SQLite keeps
//! its buckets in memory (one process), so it has no such table.

use chrono::{DateTime, Utc};

use super::sql::sql;
use super::{Store, StoreError};
use crate::ingest::quota::{Lease, Limit};

/// Millionths of a token: the bucket's unit in the database (integers only).
const MICRO: i64 = 1_000_000;

/// Refill counts at most this many microseconds of idleness (27 h: over any `burst`'s
/// refill time), so the arithmetic stays far inside 64 bits.
const MAX_IDLE_MICROS: i64 = 100_000_000_000;

const LEASE: &str = "\
WITH cur AS (\
    SELECT LEAST($2::bigint, q.tokens_micro + LEAST(GREATEST((EXTRACT(EPOCH FROM ($4::timestamptz - q.refilled_at)) \
             * 1000000)::bigint, 0), $9::bigint) * $3::bigint) AS avail, \
           CASE WHEN q.day_start < $5::timestamptz THEN 0 ELSE q.used_today END AS used \
    FROM namespace_quota q WHERE q.namespace = $1 FOR UPDATE), \
offer AS (SELECT avail, used, LEAST($6::bigint, avail / 1000000, $8::bigint - used) AS n FROM cur), \
granted AS (SELECT avail, used, CASE WHEN n >= $7::bigint THEN n ELSE 0 END AS n FROM offer) \
UPDATE namespace_quota q SET tokens_micro = g.avail - g.n * 1000000, refilled_at = GREATEST(q.refilled_at, $4), \
    day_start = GREATEST(q.day_start, $5), used_today = g.used + g.n \
FROM granted g WHERE q.namespace = $1 \
RETURNING g.n, q.tokens_micro, q.used_today";

impl Store {
    /// Leases `batch` tokens of `namespace`'s shared bucket at `now` (fewer if it holds
    /// fewer, but at least `need`, or none: `granted` 0), counted against the UTC day of
    /// `now`. `Ok(None)` on SQLite, whose buckets are in memory. One statement (three the
    /// first time a namespace is leased from, to create its row full).
    pub async fn lease_ingest_tokens(
        &self,
        namespace: &str,
        limit: &Limit,
        need: u64,
        batch: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<Lease>, StoreError> {
        let Store::Postgres(_) = self else { return Ok(None) };
        let burst = i64::from(limit.burst) * MICRO;
        let day_start = now.date_naive().and_hms_opt(0, 0, 0).map_or(now, |t| t.and_utc());
        let per_day = limit.per_day.map_or(i64::MAX, |d| d.min(i64::MAX as u64) as i64);
        let lease = || {
            sql(LEASE)
                .bind(namespace)
                .bind(burst)
                .bind(i64::from(limit.per_second))
                .bind(now)
                .bind(day_start)
                .bind(batch.min(i64::MAX as u64) as i64)
                .bind(need.min(i64::MAX as u64) as i64)
                .bind(per_day)
                .bind(MAX_IDLE_MICROS)
        };
        self.observed(async {
            let mut row: Option<(i64, i64, i64)> = lease().fetch_optional(self.writer()).await?;
            if row.is_none() {
                sql("INSERT INTO namespace_quota (namespace, tokens_micro, refilled_at, day_start, used_today) \
                     VALUES ($1, $2, $3, $4, 0) ON CONFLICT (namespace) DO NOTHING")
                .bind(namespace)
                .bind(burst)
                .bind(now)
                .bind(day_start)
                .execute(self.writer())
                .await?;
                row = lease().fetch_optional(self.writer()).await?;
            }
            let (granted, bucket_micro, used_today) = row.unwrap_or_default();
            Ok(Some(Lease { granted: granted.max(0) as u64, bucket_micro, used_today: used_today.max(0) as u64 }))
        })
        .await
    }
}
