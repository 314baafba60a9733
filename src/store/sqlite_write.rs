//! The SQLite store's one write connection after a failed write: kept in step with SQLite
//! or replaced, and whether writes work at all (for `/readyz`).
//!
//! Invariants:
//! - The write connection goes back to its pool only when sqlx's transaction depth is 0
//!   *and* SQLite agrees that no transaction is open ([`check_in_step`], run by the pool
//!   on every release). Otherwise it is closed (SQLite rolls back whatever it still held)
//!   and the next write opens a fresh one. So every write transaction starts as a real
//!   top-level `BEGIN IMMEDIATE` and a commit that returns `Ok` ran `COMMIT` on it: never a
//!   `RELEASE SAVEPOINT` inside a transaction nobody commits.
//! - Once a write failed for a reason of the database itself (a full disk, an I/O error,
//!   a lock held elsewhere), [`WriteHealth`] remembers why until a probe write commits
//!   again; `/readyz` runs that probe, so readiness comes back by itself when space does.

use std::sync::Mutex;

use futures_util::future::BoxFuture;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::Connection as _;

use super::StoreError;

/// The write pool's options: one connection, checked on every release.
pub(super) fn write_pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new().max_connections(1).min_connections(1).after_release(release_if_in_step)
}

fn release_if_in_step(
    conn: &mut SqliteConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        match check_in_step(conn).await {
            Ok(()) => Ok(true),
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    "the SQLite write connection is out of step with its transaction after a failed write; \
                     closing it (the next write opens a fresh one)"
                );
                Ok(false)
            }
        }
    })
}

/// Why a write connection cannot be used again.
#[derive(Debug, thiserror::Error)]
pub(super) enum OutOfStep {
    #[error("sqlx still counts a transaction that SQLite ended (its ROLLBACK failed)")]
    DepthLeft,
    #[error("SQLite refused a BEGIN: a transaction is still open, or the connection is failing")]
    TransactionOpen(#[source] sqlx::Error),
    #[error("the connection does not answer")]
    Broken(#[source] sqlx::Error),
}

/// Succeeds when no transaction is open on `conn`, by sqlx's count and by SQLite's.
///
/// sqlx-sqlite counts transactions itself and changes the count only when its
/// `BEGIN`/`COMMIT`/`ROLLBACK` succeeds. SQLite ends a transaction by itself on some errors
/// (`SQLITE_FULL`, `SQLITE_IOERR`, …, and always when `COMMIT` fails that way); the
/// `ROLLBACK` sqlx sends when the transaction is dropped then fails ("no transaction is
/// active") and the count stays at 1, which is what this catches.
pub(super) async fn check_in_step(conn: &mut SqliteConnection) -> Result<(), OutOfStep> {
    // A dropped transaction queued its ROLLBACK on the connection's worker; a ping is
    // answered after it, so the count read next is the one it left.
    conn.ping().await.map_err(OutOfStep::Broken)?;
    if conn.is_in_transaction() {
        return Err(OutOfStep::DepthLeft);
    }
    // `BEGIN` succeeds only outside a transaction. Sent as raw SQL, the pair leaves
    // sqlx's count alone; a deferred `BEGIN` takes no lock.
    raw(conn, "BEGIN").await.map_err(OutOfStep::TransactionOpen)?;
    raw(conn, "ROLLBACK").await.map_err(OutOfStep::Broken)?;
    Ok(())
}

/// Runs `sql` as a plain statement, outside sqlx's transaction bookkeeping.
async fn raw(conn: &mut SqliteConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(conn).await.map(drop)
}

/// Whether writes to the database work, as far as this process has seen.
#[derive(Debug, Default)]
pub(super) struct WriteHealth {
    /// Why the last failed write failed, until a probe write commits.
    failing: Mutex<Option<String>>,
}

impl WriteHealth {
    /// Remembers `error` when it says that the database itself failed, rather than the
    /// request.
    pub(super) fn observe(&self, error: &StoreError) {
        if let StoreError::Database(e) = error {
            if let Some(reason) = storage_failure(e) {
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            }
        }
    }

    pub(super) fn failing(&self) -> Option<String> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Succeeds when no write failed since the last probe, or when a probe write commits
    /// now; otherwise says why writes fail.
    pub(super) async fn check(&self, write: &SqlitePool) -> Result<(), StoreError> {
        if self.failing().is_none() {
            return Ok(());
        }
        match probe(write).await {
            Ok(()) => {
                tracing::info!("writes to the database work again");
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                let reason = storage_failure(&e).unwrap_or_else(|| e.to_string());
                *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                Err(StoreError::WritesFailing { reason })
            }
        }
    }
}

/// A write transaction that changes nothing but still writes a page: it sets the header's
/// `user_version` (which Hookwarden does not use) to the value it has, which SQLite writes
/// out anyway, so the commit must append to the log like any other (an `UPDATE` to the
/// same value writes nothing and would commit on a full disk).
///
/// A probe is small: on a nearly full disk it can fit where a larger write did not (in
/// log pages a failed commit took, say), so readiness may come and go until space
/// returns; every failed write marks it not ready again.
async fn probe(write: &SqlitePool) -> Result<(), sqlx::Error> {
    let mut tx = write.begin_with("BEGIN IMMEDIATE").await?;
    let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *tx).await?;
    sqlx::query(&format!("PRAGMA user_version = {version}")).execute(&mut *tx).await?;
    tx.commit().await
}

/// SQLite's primary result codes that say the database could not do the work, whatever
/// the statement: `SQLITE_BUSY`, `SQLITE_LOCKED`, `SQLITE_NOMEM`, `SQLITE_READONLY`,
/// `SQLITE_IOERR`, `SQLITE_CORRUPT`, `SQLITE_FULL`, `SQLITE_CANTOPEN`, `SQLITE_PROTOCOL`,
/// `SQLITE_NOTADB`.
const STORAGE_FAILURES: [i32; 10] = [5, 6, 7, 8, 10, 11, 13, 14, 15, 26];

/// The reason, when `e` is a failure of the database rather than of the request: one of
/// [`STORAGE_FAILURES`] (classified by code, never by message), or no connection to use.
fn storage_failure(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => {
            let code: i32 = d.code()?.parse().ok()?;
            STORAGE_FAILURES.contains(&(code & 0xff)).then(|| d.message().to_owned())
        }
        sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed | sqlx::Error::PoolTimedOut => Some(e.to_string()),
        _ => None,
    }
}
