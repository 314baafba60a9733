//! Spend windows: reservations against a rule's limit, kept in per-key time buckets.
//!
//! Spend windows are kept incrementally. Every ledger entry counts in one time bucket of
//! its spend key (`spend_buckets`: namespace, rule, key, currency and the bucket's end);
//! a window's total is the sum of the buckets that end inside it, so a decision reads at
//! most about [`BUCKETS_PER_WINDOW`] rows however long the window's history. A bucket is
//! as wide as its window divided by [`BUCKETS_PER_WINDOW`] (a 24 h window: 4 minutes) and
//! counts whole while its end is inside the window: spend leaves a window at most one
//! bucket width late, never early, so a limit is never exceeded.
//!
//! Invariants:
//! - a spend reservation is checked and written in one transaction, serialized per spend
//!   key (PostgreSQL: a transaction-scoped advisory lock; SQLite: its single writer), so
//!   concurrent deliveries can never together exceed a limit;
//! - a key's buckets hold the sum of its reserved and committed entries, per bucket: every
//!   change of an entry's counted amount (a reservation, a reservation made again, a
//!   release) changes its bucket in the same transaction, under the key's lock;
//! - buckets that left the window are pruned by the reservations of their key, which
//!   record how far (`spend_windows.counted_from`); a window reaching further back (a rule's
//!   window made longer) counts the ledger there and rebuilds those buckets from it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::policy::{Recorded, SpendReservation};
use super::sql::{sql, On, Statement, Tx};
use super::{Backend, DeliveryState, PgStore, SqliteStore, Store, StoreError};
use crate::ids::DeliveryId;

impl Store {
    /// Spend counted per `(rule, key, currency)`, each in its own window, leaving out the
    /// reservation of `exclude` (a delivery deciding again after a retry).
    pub async fn spend_totals(
        &self,
        namespace: &str,
        keys: &[(String, String, String, std::time::Duration)],
        exclude: Option<&DeliveryId>,
        now: DateTime<Utc>,
    ) -> Result<BTreeMap<(String, String, String), i64>, StoreError> {
        self.observed(async {
            let mut totals = BTreeMap::new();
            for (rule, key, currency, window) in keys {
                let spend = SpendKey { namespace, rule, key, currency };
                let since = window_start(now, *window);
                let read = read_window(self.reader(), &spend, since, exclude.map(|d| d.as_str()).unwrap_or("")).await?;
                totals.insert((rule.clone(), key.clone(), currency.clone()), read.total(&spend, since));
            }
            Ok(totals)
        })
        .await
    }
}

/// A window is counted in at most this many buckets, plus the one it starts in.
pub const BUCKETS_PER_WINDOW: i64 = 360;

/// The window's share of spend a key's pruned buckets may lag behind before its next
/// reservation prunes them: 1/16 of the window (about 90 buckets at once).
const PRUNE_SLACK: i64 = 16;

/// The width, in milliseconds, of the buckets that spend under `window` counts in.
fn bucket_width(window: std::time::Duration) -> i64 {
    (window_millis(window) / BUCKETS_PER_WINDOW).max(1)
}

fn window_millis(window: std::time::Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
}

/// The end (milliseconds since the epoch) of the bucket that spend at `at` under `window`
/// counts in: the first multiple of the bucket width after `at`.
fn bucket_end(at: DateTime<Utc>, window: std::time::Duration) -> i64 {
    let width = bucket_width(window);
    at.timestamp_millis().div_euclid(width).saturating_add(1).saturating_mul(width)
}

/// The start (milliseconds since the epoch, rounded down) of the window that ends `now`:
/// a bucket counts while its end is after it.
fn window_start(now: DateTime<Utc>, window: std::time::Duration) -> i64 {
    chrono::Duration::from_std(window)
        .ok()
        .and_then(|w| now.checked_sub_signed(w))
        .map_or(i64::MIN, |since| since.timestamp_millis())
}

/// The spend key of a window: what a limit counts separately.
struct SpendKey<'a> {
    namespace: &'a str,
    rule: &'a str,
    key: &'a str,
    currency: &'a str,
}

impl SpendKey<'_> {
    /// The order keys are locked in.
    fn order(&self) -> (&str, &str, &str, &str) {
        (self.namespace, self.rule, self.key, self.currency)
    }

    /// The key's advisory lock on PostgreSQL, which serializes everything that writes its
    /// buckets. Taken in `(rule, key, currency)` order within a namespace.
    async fn lock_in(&self, tx: &mut Tx) -> Result<(), StoreError> {
        if tx.backend() == Backend::Postgres {
            sql("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(format!("{}\u{1f}{}\u{1f}{}\u{1f}{}", self.namespace, self.rule, self.key, self.currency))
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// Binds the key as `$1`…`$4`.
    fn bind<'s>(&self, statement: Statement<'s>) -> Statement<'s>
    where
        Self: 's,
    {
        statement.bind(self.namespace).bind(self.rule).bind(self.key).bind(self.currency)
    }
}

/// A delivery's ledger entry for a rule, as a window read finds it.
#[derive(Clone, Debug)]
struct OwnEntry {
    key: String,
    currency: String,
    amount: i64,
    /// Reserved or committed (not released).
    counted: bool,
    bucket_end: i64,
}

/// One read of a spend window.
#[derive(Debug)]
struct WindowRead {
    /// Buckets ending at or before this were pruned (`i64::MIN`: none).
    counted_from: i64,
    /// The buckets ending inside the window and after `counted_from`.
    buckets: i64,
    /// The ledger entries counted in buckets inside the window that were pruned.
    gap: i64,
    /// The end of the key's oldest bucket.
    oldest: Option<i64>,
    /// The excluded delivery's entry for the rule, whatever its key.
    own: Option<OwnEntry>,
}

impl WindowRead {
    /// Spend counted in the window of `key` starting at `since`, leaving out the excluded
    /// delivery's own entry.
    fn total(&self, key: &SpendKey<'_>, since: i64) -> i64 {
        let own = self
            .own
            .as_ref()
            .filter(|o| o.counted && o.key == key.key && o.currency == key.currency && o.bucket_end > since)
            .map_or(0, |o| o.amount);
        self.buckets.saturating_add(self.gap).saturating_sub(own)
    }
}

/// `$1`…`$4` the key, `$5` the window's start, `$6` `i64::MIN`, `$7` the delivery whose entry
/// for the rule is read too. The buckets are summed from the later of the window's start
/// and `counted_from`; the ledger only where buckets were pruned inside the window (after a
/// window was made longer), which is nowhere otherwise.
const WINDOW: &str = "SELECT w.counted_from, \
     (SELECT CAST(COALESCE(SUM(b.amount), 0) AS BIGINT) FROM spend_buckets b WHERE b.namespace = $1 AND b.rule = $2 \
      AND b.spend_key = $3 AND b.currency = $4 \
      AND b.bucket_end > CASE WHEN w.counted_from > $5 THEN w.counted_from ELSE $5 END) AS buckets, \
     CASE WHEN w.counted_from > $5 THEN (SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM spend_ledger l \
      WHERE l.namespace = $1 AND l.rule = $2 AND l.spend_key = $3 AND l.currency = $4 \
      AND l.state IN ('reserved', 'committed') AND l.bucket_end > $5 AND l.bucket_end <= w.counted_from) \
      ELSE 0 END AS gap, \
     (SELECT MIN(b.bucket_end) FROM spend_buckets b WHERE b.namespace = $1 AND b.rule = $2 AND b.spend_key = $3 \
      AND b.currency = $4) AS oldest, \
     o.spend_key, o.currency, o.amount, o.state, o.bucket_end \
     FROM (SELECT COALESCE((SELECT counted_from FROM spend_windows WHERE namespace = $1 AND rule = $2 \
      AND spend_key = $3 AND currency = $4), $6) AS counted_from) AS w \
     LEFT JOIN spend_ledger o ON o.delivery_id = $7 AND o.rule = $2";

type WindowRow = (i64, i64, i64, Option<i64>, Option<String>, Option<String>, Option<i64>, Option<String>, Option<i64>);

/// Reads the window of `key` that starts at `since` (see [`WINDOW`]).
async fn read_window<'c>(
    on: impl Into<On<'c>>,
    key: &SpendKey<'_>,
    since: i64,
    delivery: &str,
) -> Result<WindowRead, StoreError> {
    let (counted_from, buckets, gap, oldest, own_key, currency, amount, state, bucket_end): WindowRow =
        key.bind(sql(WINDOW)).bind(since).bind(i64::MIN).bind(delivery).fetch_one(on).await?;
    let own = match (own_key, currency, amount, state, bucket_end) {
        (Some(key), Some(currency), Some(amount), Some(state), Some(bucket_end)) => {
            Some(OwnEntry { key, currency, amount, counted: state != "released", bucket_end })
        }
        _ => None,
    };
    Ok(WindowRead { counted_from, buckets, gap, oldest, own })
}

/// Adds `amount` (negative: takes it away) to `key`'s bucket ending at `bucket_end`. Only
/// an addition creates the bucket: what is taken away from a pruned bucket no longer
/// counted anyway.
async fn add_to_bucket_in(tx: &mut Tx, key: &SpendKey<'_>, bucket_end: i64, amount: i64) -> Result<(), StoreError> {
    let statement = if amount >= 0 {
        "INSERT INTO spend_buckets (namespace, rule, spend_key, currency, bucket_end, amount) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (namespace, rule, spend_key, currency, bucket_end) \
         DO UPDATE SET amount = spend_buckets.amount + excluded.amount"
    } else {
        "UPDATE spend_buckets SET amount = amount + $6 WHERE namespace = $1 AND rule = $2 AND spend_key = $3 \
         AND currency = $4 AND bucket_end = $5"
    };
    key.bind(sql(statement)).bind(bucket_end).bind(amount).execute(tx).await?;
    Ok(())
}

/// Counts the ledger of `key` into its buckets ending after `after` and at most `up_to`,
/// replacing what they held: the sum of the reserved and committed entries of each (the
/// migration's backfill, per key and range).
async fn count_ledger_in(tx: &mut Tx, key: &SpendKey<'_>, after: i64, up_to: i64) -> Result<(), StoreError> {
    key.bind(sql("DELETE FROM spend_buckets WHERE namespace = $1 AND rule = $2 AND spend_key = $3 AND currency = $4 \
         AND bucket_end > $5 AND bucket_end <= $6"))
        .bind(after)
        .bind(up_to)
        .execute(&mut *tx)
        .await?;
    key.bind(sql("INSERT INTO spend_buckets (namespace, rule, spend_key, currency, bucket_end, amount) \
         SELECT namespace, rule, spend_key, currency, bucket_end, SUM(amount) FROM spend_ledger \
         WHERE namespace = $1 AND rule = $2 AND spend_key = $3 AND currency = $4 AND state IN ('reserved', 'committed') \
         AND bucket_end > $5 AND bucket_end <= $6 GROUP BY namespace, rule, spend_key, currency, bucket_end"))
    .bind(after)
    .bind(up_to)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Records that `key`'s buckets ending at or before `counted_from` may be missing.
async fn set_counted_from_in(tx: &mut Tx, key: &SpendKey<'_>, counted_from: i64) -> Result<(), StoreError> {
    key.bind(sql("INSERT INTO spend_windows (namespace, rule, spend_key, currency, counted_from) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (namespace, rule, spend_key, currency) \
         DO UPDATE SET counted_from = excluded.counted_from"))
        .bind(counted_from)
        .execute(tx)
        .await?;
    Ok(())
}

/// Keeps `key`'s buckets to what its window starting at `since` needs, after `read`
/// (under the key's lock): rebuilds those the window reaches that were pruned, or prunes
/// those that left it once they are [`PRUNE_SLACK`] behind.
async fn tend_buckets_in(
    tx: &mut Tx,
    key: &SpendKey<'_>,
    read: &WindowRead,
    since: i64,
    window: std::time::Duration,
) -> Result<(), StoreError> {
    if read.counted_from > since {
        count_ledger_in(tx, key, since, read.counted_from).await?;
        set_counted_from_in(tx, key, since).await?;
    } else if read.oldest.is_some_and(|oldest| oldest <= since.saturating_sub(window_millis(window) / PRUNE_SLACK)) {
        key.bind(sql("DELETE FROM spend_buckets WHERE namespace = $1 AND rule = $2 AND spend_key = $3 \
             AND currency = $4 AND bucket_end <= $5"))
            .bind(since)
            .execute(&mut *tx)
            .await?;
        set_counted_from_in(tx, key, since).await?;
    }
    Ok(())
}

/// Takes the locks of the spend keys that `reservations` (`(namespace, reservation)`)
/// reserve under, once each and in one order (PostgreSQL: advisory locks; SQLite: its one
/// writer serializes), before [`reserve_in`] checks and writes them.
pub(super) async fn lock_keys_in(tx: &mut Tx, reservations: &[(&str, &SpendReservation)]) -> Result<(), StoreError> {
    let mut keys: Vec<SpendKey<'_>> = reservations
        .iter()
        .map(|(namespace, r)| SpendKey { namespace, rule: &r.rule, key: &r.key, currency: &r.currency })
        .collect();
    keys.sort_by(|a, b| a.order().cmp(&b.order()));
    keys.dedup_by(|a, b| a.order() == b.order());
    for key in &keys {
        key.lock_in(tx).await?;
    }
    Ok(())
}

/// Reserves `reservations` for delivery `id` inside `tx`, under their keys' locks (see
/// [`lock_keys_in`]): with `enforce_limits`, all or none — every window is checked first,
/// and when one would exceed its rule's limit nothing is written and that rule is
/// returned ([`Recorded::OverLimit`]). A delivery reserving again (after a retry, or
/// replayed) replaces its entry: the old amount leaves its bucket, the new one counts in
/// the bucket of `now`. A check sees what reservations earlier in `tx` wrote.
pub(super) async fn reserve_in(
    tx: &mut Tx,
    id: &DeliveryId,
    namespace: &str,
    reservations: &[SpendReservation],
    enforce_limits: bool,
    now: DateTime<Utc>,
) -> Result<Option<Recorded>, StoreError> {
    let mut checked = Vec::with_capacity(reservations.len());
    for r in reservations {
        let key = SpendKey { namespace, rule: &r.rule, key: &r.key, currency: &r.currency };
        let since = window_start(now, r.window);
        let read = read_window(&mut *tx, &key, since, id.as_str()).await?;
        tend_buckets_in(tx, &key, &read, since, r.window).await?;
        if enforce_limits && read.total(&key, since).checked_add(r.amount).is_none_or(|t| t > r.limit) {
            return Ok(Some(Recorded::OverLimit(r.rule.clone())));
        }
        checked.push((r, key, read));
    }
    for (r, key, read) in checked {
        if let Some(own) = read.own.as_ref().filter(|o| o.counted) {
            let old = SpendKey { namespace, rule: &r.rule, key: &own.key, currency: &own.currency };
            if (old.key, old.currency) != (key.key, key.currency) {
                // The rule's `per` value changed since: its old key's bucket, under that key's lock.
                old.lock_in(tx).await?;
            }
            add_to_bucket_in(tx, &old, own.bucket_end, -own.amount).await?;
        }
        let end = bucket_end(now, r.window);
        sql("INSERT INTO spend_ledger (delivery_id, namespace, rule, spend_key, currency, amount, state, created_at, \
             bucket_end) VALUES ($1, $2, $3, $4, $5, $6, 'reserved', $7, $8) ON CONFLICT (delivery_id, rule) DO UPDATE SET \
             spend_key = excluded.spend_key, currency = excluded.currency, amount = excluded.amount, state = 'reserved', \
             created_at = excluded.created_at, bucket_end = excluded.bucket_end")
        .bind(id.as_str())
        .bind(namespace)
        .bind(&r.rule)
        .bind(&r.key)
        .bind(&r.currency)
        .bind(r.amount)
        .bind(now)
        .bind(end)
        .execute(&mut *tx)
        .await?;
        add_to_bucket_in(tx, &key, end, r.amount).await?;
    }
    Ok(None)
}

/// A ledger entry a delivery's end settled: its new state, and what it had counted where.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(super) struct SettledEntry {
    pub delivery_id: String,
    pub namespace: String,
    pub rule: String,
    pub spend_key: String,
    pub currency: String,
    pub amount: i64,
    pub state: String,
    pub bucket_end: i64,
}

/// Settles the reservations of ended deliveries, `(delivery, ledger state)` (see
/// [`ledger_state_for`]): a committed one keeps counting; a released one leaves its bucket,
/// each key's buckets under its lock, keys in order. Returns what was committed:
/// `(delivery, currency, amount)`.
pub(super) async fn settle_ledger_in(
    tx: &mut Tx,
    settled: &[(&str, &'static str)],
) -> Result<Vec<(String, String, i64)>, StoreError> {
    if settled.is_empty() {
        return Ok(Vec::new());
    }
    let entries = match tx {
        Tx::Pg(tx) => PgStore::settle_spend_in(tx, settled).await?,
        Tx::Sqlite(tx) => SqliteStore::settle_spend_in(tx, settled).await?,
    };
    let mut released: BTreeMap<(&str, &str, &str, &str), BTreeMap<i64, i64>> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.state == "released") {
        let bucket = released.entry((&e.namespace, &e.rule, &e.spend_key, &e.currency)).or_default();
        *bucket.entry(e.bucket_end).or_default() += e.amount;
    }
    for ((namespace, rule, key, currency), buckets) in released {
        let key = SpendKey { namespace, rule, key, currency };
        key.lock_in(tx).await?;
        for (bucket_end, amount) in buckets {
            add_to_bucket_in(tx, &key, bucket_end, -amount).await?;
        }
    }
    Ok(entries.into_iter().filter(|e| e.state == "committed").map(|e| (e.delivery_id, e.currency, e.amount)).collect())
}

/// Settles a delivery's reservations when it ends: `delivered` commits them, the other
/// final states release them.
pub(super) fn ledger_state_for(state: DeliveryState) -> Option<&'static str> {
    use DeliveryState::*;
    match state {
        Delivered => Some("committed"),
        Failed | Dead | Denied => Some("released"),
        _ => None,
    }
}

/// Ledger entries to write at once, for a benchmark of the spend windows
/// ([`Store::fill_spend_ledger`]).
#[derive(Clone, Debug)]
pub struct LedgerFill {
    pub namespace: String,
    pub rule: String,
    pub key: String,
    pub currency: String,
    /// Committed entries, spread evenly over `from..until`, `amount` each, counted in the
    /// buckets of a rule with this window.
    pub entries: u64,
    pub window: std::time::Duration,
    pub amount: i64,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

impl Store {
    /// Writes `fill.entries` committed ledger entries (with the delivered deliveries and the
    /// one event they reference) in a few set-sized statements: `generate_series` on
    /// PostgreSQL, a recursive CTE on SQLite; then counts them into their key's buckets, and
    /// lets the database catch up (vacuum and checkpoint).
    ///
    /// **Warning**: for benchmarks on a database of their own; the entries are made up.
    pub async fn fill_spend_ledger(&self, fill: &LedgerFill) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let (series, created_at) = match tx.backend() {
            Backend::Postgres => (
                "SELECT i FROM generate_series(1, $1::bigint) AS i",
                "timestamptz 'epoch' + (t * interval '1 millisecond')",
            ),
            Backend::Sqlite => (
                "WITH RECURSIVE s(i) AS (SELECT 1 WHERE $1 >= 1 UNION ALL SELECT i + 1 FROM s WHERE i < $1) SELECT i FROM s",
                "strftime('%Y-%m-%dT%H:%M:%f+00:00', t / 1000.0, 'unixepoch')",
            ),
        };
        let event = format!("evt_fill_{}", ulid::Ulid::new());
        sql("INSERT INTO events (id, namespace, source, external_id, type, data, content_type, ingested_by, trace_id, \
             received_at, status) VALUES ($1, $2, 'bench', $1, 'bench.fill', '{}', 'application/json', 'bench', '', $3, \
             'accepted')")
        .bind(event.as_str())
        .bind(&fill.namespace)
        .bind(fill.from)
        .execute(&mut tx)
        .await?;
        let entries = i64::try_from(fill.entries).unwrap_or(i64::MAX);
        sql(&format!(
            "INSERT INTO deliveries (id, event_id, namespace, endpoint, state, attempts, next_attempt_at, created_at, \
             updated_at, completed_at) SELECT $2 || '_' || i, $2, $3, 'fill-' || i, 'delivered', 1, $4, $4, $4, $4 \
             FROM ({series}) AS n"
        ))
        .bind(entries)
        .bind(event.as_str())
        .bind(&fill.namespace)
        .bind(fill.from)
        .execute(&mut tx)
        .await?;
        let span = (fill.until - fill.from).num_milliseconds().max(0);
        sql(&format!(
            "INSERT INTO spend_ledger (delivery_id, namespace, rule, spend_key, currency, amount, state, created_at, \
             bucket_end) SELECT $2 || '_' || i, $3, $4, $5, $6, $7, 'committed', {created_at}, (t / $10 + 1) * $10 \
             FROM (SELECT i, $8 + i * $9 / ($1 + 1) AS t FROM ({series}) AS n) AS f"
        ))
        .bind(entries)
        .bind(event.as_str())
        .bind(&fill.namespace)
        .bind(&fill.rule)
        .bind(&fill.key)
        .bind(&fill.currency)
        .bind(fill.amount)
        .bind(fill.from.timestamp_millis())
        .bind(span)
        .bind(bucket_width(fill.window))
        .execute(&mut tx)
        .await?;
        // Counted as the migration counts the entries it finds.
        let key = SpendKey { namespace: &fill.namespace, rule: &fill.rule, key: &fill.key, currency: &fill.currency };
        count_ledger_in(&mut tx, &key, i64::MIN, i64::MAX).await?;
        tx.commit().await?;
        // What writing a million rows leaves to do in the background (PostgreSQL's
        // autovacuum and checkpoint, SQLite's WAL checkpoint) is done now, so that it does
        // not slow what is measured next.
        let settle: &[&str] = match self.backend() {
            Backend::Postgres => &["VACUUM (ANALYZE) events, deliveries, spend_ledger, spend_buckets", "CHECKPOINT"],
            Backend::Sqlite => &["PRAGMA wal_checkpoint(TRUNCATE)"],
        };
        for statement in settle {
            sql(statement).execute(self.writer()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

    #[test]
    fn a_day_is_counted_in_four_minute_buckets_and_spend_counts_in_the_one_after_it() {
        assert_eq!(bucket_width(DAY), 240_000);
        assert_eq!(bucket_width(std::time::Duration::from_secs(3600)), 10_000);
        let bucket = at("2026-12-01T10:04:00Z").timestamp_millis();
        assert_eq!(bucket_end(at("2026-12-01T10:00:00.001Z"), DAY), bucket);
        assert_eq!(bucket_end(at("2026-12-01T10:03:59.999Z"), DAY), bucket);
        // On the boundary, the next bucket: its end is always after the spend.
        assert_eq!(bucket_end(at("2026-12-01T10:00:00Z"), DAY), bucket);
        assert_eq!(bucket_end(at("2026-12-01T10:04:00Z"), DAY), bucket + 240_000);
    }

    #[test]
    fn spend_leaves_a_window_at_most_one_bucket_late_and_never_early() {
        for window in [DAY, std::time::Duration::from_secs(3600), std::time::Duration::from_millis(700)] {
            let width = chrono::Duration::milliseconds(bucket_width(window));
            let spent = at("2026-12-01T10:00:00.123456Z");
            let end = bucket_end(spent, window);
            let window_length = chrono::Duration::from_std(window).unwrap();
            // Counted while the exact window holds it (`spent > since`)...
            let last_exact = spent + window_length - chrono::Duration::nanoseconds(1);
            assert!(end > window_start(last_exact, window), "{window:?}");
            // ...and gone once one bucket width more has passed.
            assert!(end <= window_start(spent + window_length + width, window), "{window:?}");
        }
    }

    #[test]
    fn tiny_windows_have_one_millisecond_buckets_and_huge_ones_do_not_overflow() {
        assert_eq!(bucket_width(std::time::Duration::from_millis(5)), 1);
        let now = at("2026-12-01T10:00:00Z");
        assert_eq!(window_start(now, std::time::Duration::MAX), i64::MIN);
        assert!(bucket_end(now, std::time::Duration::MAX) > now.timestamp_millis());
    }
}
