//! Ordered lanes: which delivery of a lane a claim may take.
//!
//! A lane is the deliveries of one ordered endpoint with one ordering key, in id order. Its
//! head is its first delivery that is not final (pending, retrying, delivering or held);
//! only the head may be sent. Every other open delivery of the lane has `lane_behind` set,
//! so that claims read only claimable rows (`deliveries_claimable` leaves out what waits
//! behind another) and an ordered backlog costs a claim nothing, however long it is.
//!
//! Invariant: an open ordered delivery has `lane_behind` set exactly when an earlier open
//! delivery of its lane exists. Kept by:
//! - fan-out, which writes it with the delivery (ingest's transaction), and sets it on open
//!   deliveries after the new one (another transaction's, committed first);
//! - a delivery becoming final (a completion, an approval denied or expired): the lane's
//!   new first open delivery is cleared ([`end_heads_in`]);
//! - a replay, which reopens a delivery: it is computed for the replayed delivery and set
//!   on the open deliveries after it ([`reopen_in`]).
//!
//! Moves between open states (claimed, given back, parked, released after a lost lease,
//! held, granted) change nothing: the head stays the head.
//!
//! On PostgreSQL, fan-out and the two updates above first take the lanes' advisory locks
//! (transaction-scoped, in hash order), so that a delivery fanned out while its lane's
//! head ends sees that end, or is seen by it: neither can miss the other and leave a lane
//! with no head. Lane locks are taken after a transaction's audit appends, never before
//! them. SQLite has one writer, which already serializes these transactions.
//!
//! Order within a lane is delivery id order. A delivery committed after a later one of its
//! lane (ingest transactions may commit out of id order) goes before it, unless that one is
//! already in flight.

use std::sync::LazyLock;

use sqlx::{Postgres, Transaction};

use super::sql::{in_list, sql, On, PerBackend, Tx};
use super::{Backend, StoreError};

/// The open states: a delivery in one of them holds its lane.
pub(super) const OPEN_STATES: &str = "('pending', 'retrying', 'delivering', 'held')";

/// The advisory-lock class of lane locks (the two-key form, apart from every one-key lock).
pub(super) const LANE_LOCK_CLASS: i32 = 0x4c41_4e45;

/// Whether a delivery of lane `(n, ep, k)` fanned out with id `i` waits behind an open one
/// already written. Fan-out adds: or behind an earlier one of its own batch.
pub(super) fn behind_written(n: &str, ep: &str, k: &str, i: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM deliveries e WHERE e.namespace = {n} AND e.endpoint = {ep} AND e.ordering_key = {k} \
         AND e.ordering_key IS NOT NULL AND e.state IN {OPEN_STATES} AND e.id < {i})"
    )
}

/// Clears `lane_behind` of the next open delivery of each lane whose head was among the
/// deliveries `ids` (an SQL set expression). A delivery that ended while it waited behind an
/// earlier open one (it was in flight when an earlier one was replayed, see
/// [`reopen_in`]) was not its lane's head: the head is still open and nothing moves. Of one
/// that was the head no earlier open delivery exists (the invariant), so the new head is
/// the first open one after it: a read from the ended delivery on, never over the lane's
/// finished history before it.
fn end_heads_sql(ids: &str) -> String {
    format!(
        "UPDATE deliveries SET lane_behind = FALSE WHERE lane_behind AND id IN (\
         SELECT (SELECT h.id FROM deliveries h WHERE h.namespace = c.namespace AND h.endpoint = c.endpoint \
         AND h.ordering_key = c.ordering_key AND h.ordering_key IS NOT NULL AND h.state IN {OPEN_STATES} \
         AND h.id > c.id ORDER BY h.id LIMIT 1) FROM deliveries c WHERE c.id {ids} AND c.ordering_key IS NOT NULL \
         AND NOT c.lane_behind)"
    )
}

/// Sets `lane_behind` of the open deliveries after the deliveries `ids` in their lanes: one
/// index probe per delivery, as a new delivery is normally its lane's last. On PostgreSQL
/// the probe is a `LATERAL` range read from each delivery on, and the rows to update are
/// looked up by id: with a plain `IN (join)` the planner turned the update into a scan of
/// the whole table for rows not behind, so that every fan-out into an ordered endpoint
/// read every delivery (7 ms a batch at 20,000 waiting, growing with the history). SQLite's
/// planner probes per row by itself (and has no `LATERAL`).
fn behind_later_sql(backend: Backend, ids: &str) -> String {
    let later = "l.namespace = r.namespace AND l.endpoint = r.endpoint AND l.ordering_key = r.ordering_key \
                 AND l.ordering_key IS NOT NULL";
    match backend {
        Backend::Postgres => format!(
            "UPDATE deliveries SET lane_behind = TRUE WHERE NOT lane_behind AND id = ANY(ARRAY(SELECT l.id \
             FROM deliveries r CROSS JOIN LATERAL (SELECT l.id FROM deliveries l WHERE {later} \
             AND l.state IN {OPEN_STATES} AND l.id > r.id) l WHERE r.id {ids} AND r.ordering_key IS NOT NULL))"
        ),
        Backend::Sqlite => format!(
            "UPDATE deliveries SET lane_behind = TRUE WHERE NOT lane_behind AND id IN (SELECT l.id FROM deliveries r \
             JOIN deliveries l ON {later} AND l.state IN {OPEN_STATES} AND l.id > r.id \
             WHERE r.id {ids} AND r.ordering_key IS NOT NULL)"
        ),
    }
}

/// Sets `lane_behind` of the reopened deliveries `ids` (the open deliveries after them are
/// [`behind_later_sql`]'s).
fn reopen_sql(ids: &str) -> String {
    format!(
        "UPDATE deliveries SET lane_behind = {} WHERE id {ids} AND ordering_key IS NOT NULL",
        behind_written("deliveries.namespace", "deliveries.endpoint", "deliveries.ordering_key", "deliveries.id")
    )
}

/// Locks the lanes `(namespace, endpoint, key)` rows of `lanes` (an SQL query) in hash order.
fn lock_sql(lanes: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock({LANE_LOCK_CLASS}, l.h) FROM (SELECT DISTINCT \
         hashtext(x.n || '/' || x.ep || '/' || x.k) AS h FROM ({lanes}) AS x(n, ep, k) WHERE x.k IS NOT NULL ORDER BY h) l"
    )
}

/// Fanned-out ordered deliveries `ids` were written (on PostgreSQL, their lanes locked):
/// open ones after them, written by a transaction that committed first, wait behind them.
/// Runs on the ingest transaction's connection.
pub(super) async fn written_in<'c>(on: impl Into<On<'c>>, ids: &[&str]) -> Result<(), StoreError> {
    static SQL: PerBackend = PerBackend::new(|backend| behind_later_sql(backend, &in_list(backend, "$1")));
    if ids.is_empty() {
        return Ok(());
    }
    let on = on.into();
    sql(SQL.get(on.backend())).bind(ids).execute(on).await?;
    Ok(())
}

/// Takes the locks of the lanes of fan-out rows given as arrays (PostgreSQL; SQLite's one
/// writer needs none).
pub(super) async fn lock_new_lanes_in(
    tx: &mut Transaction<'static, Postgres>,
    namespaces: &[&str],
    endpoints: &[&str],
    keys: &[Option<&str>],
) -> Result<(), StoreError> {
    if keys.iter().all(Option::is_none) {
        return Ok(());
    }
    static SQL: LazyLock<String> =
        LazyLock::new(|| lock_sql("SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])"));
    sqlx::query(&SQL).bind(namespaces).bind(endpoints).bind(keys).execute(&mut **tx).await?;
    Ok(())
}

/// Locks the lanes of the deliveries `ids` (PostgreSQL; SQLite's one writer needs none).
async fn lock_lanes_of_in(tx: &mut Tx, ids: &[&str]) -> Result<(), StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        lock_sql(&format!(
            "SELECT namespace, endpoint, ordering_key FROM deliveries WHERE id {}",
            in_list(Backend::Postgres, "$1")
        ))
    });
    if tx.backend() == Backend::Postgres {
        sql(&SQL).bind(ids).execute(tx).await?;
    }
    Ok(())
}

/// The deliveries `ids` of ordered lanes became final: each lane's next open delivery
/// becomes its head.
pub(super) async fn end_heads_in(tx: &mut Tx, ids: &[&str]) -> Result<(), StoreError> {
    static SQL: PerBackend = PerBackend::new(|backend| end_heads_sql(&in_list(backend, "$1")));
    if ids.is_empty() {
        return Ok(());
    }
    lock_lanes_of_in(tx, ids).await?;
    sql(SQL.get(tx.backend())).bind(ids).execute(tx).await?;
    Ok(())
}

/// The deliveries `ids` were reopened (replayed): they wait behind what is open before
/// them, and what is open after them waits behind them.
pub(super) async fn reopen_in(tx: &mut Tx, ids: &[&str]) -> Result<(), StoreError> {
    static BEHIND_EARLIER: PerBackend = PerBackend::new(|backend| reopen_sql(&in_list(backend, "$1")));
    static BEHIND_LATER: PerBackend = PerBackend::new(|backend| behind_later_sql(backend, &in_list(backend, "$1")));
    if ids.is_empty() {
        return Ok(());
    }
    lock_lanes_of_in(tx, ids).await?;
    for statement in [&BEHIND_EARLIER, &BEHIND_LATER] {
        sql(statement.get(tx.backend())).bind(ids).execute(&mut *tx).await?;
    }
    Ok(())
}
