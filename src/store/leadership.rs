//! Leadership terms in the database: the one `leadership` row's epoch, and the lease that
//! holds a term.
//!
//! Invariants:
//! - a term begins by bumping the epoch (PostgreSQL: on the connection that holds the
//!   leader advisory lock, once it holds it), so no two terms share an epoch and a later
//!   term has a larger one;
//! - every leader-only write calls `hold_term_in` first, in its own transaction: it reads
//!   the epoch (PostgreSQL: `FOR SHARE`, so a new term's bump waits until the write has
//!   committed or rolled back) and refuses with [`StoreError::Fenced`] unless it is still
//!   the writer's. A stale leader's write fails instead of landing beside the new leader's.

use std::time::Duration;

use chrono::Utc;

use super::sql::{sql, Tx};
use super::{Backend, PgStore, SqliteStore, Store, StoreError};

/// One leader's term, named by its epoch. Leader-only store methods take it and refuse to
/// write once a newer term began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Term(i64);

impl Term {
    pub fn epoch(self) -> i64 {
        self.0
    }

    /// A term that no database began, for unit tests of code that only passes terms on.
    #[cfg(test)]
    pub(crate) fn for_tests(epoch: i64) -> Term {
        Term(epoch)
    }
}

/// Leadership, held while this value lives.
pub struct LeaderLease {
    term: Term,
    /// On PostgreSQL, the connection holding the advisory lock; `None` on the embedded
    /// database, whose only process always leads.
    connection: Option<sqlx::PgConnection>,
}

/// How long a lease's connection may take to close before it is dropped instead.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

impl LeaderLease {
    pub fn term(&self) -> Term {
        self.term
    }

    /// Succeeds while the term holds: the lock's connection answers and the epoch is
    /// still this term's. Any error means the term is over (the lock may be gone with its
    /// connection). **Warning**: it waits as long as the connection does; callers bound it.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        let Some(connection) = self.connection.as_mut() else { return Ok(()) };
        let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM leadership WHERE id = 1").fetch_one(connection).await?;
        fenced(self.term, epoch)
    }

    /// Gives leadership up at once: the lock is released before its connection closes,
    /// so another process can take it as soon as this returns (a closed connection's lock
    /// goes only when its server backend has exited, a little later).
    pub async fn release(self) {
        if let Some(mut connection) = self.connection {
            use sqlx::Connection as _;
            // A dead server may never answer; dropping closes the socket anyway.
            let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LEADER_LOCK).execute(&mut connection);
            let _ = tokio::time::timeout(CLOSE_WITHIN, unlock).await;
            let _ = tokio::time::timeout(CLOSE_WITHIN, connection.close()).await;
        }
    }
}

/// Refuses, inside a leader-only write's transaction, unless `term` is current. On
/// PostgreSQL it holds the epoch (`FOR SHARE`) until the transaction ends; on SQLite the
/// transaction holds the write lock from its start.
pub(super) async fn hold_term_in(tx: &mut Tx, term: Term) -> Result<(), StoreError> {
    let select = match tx.backend() {
        Backend::Postgres => "SELECT epoch FROM leadership WHERE id = 1 FOR SHARE",
        Backend::Sqlite => "SELECT epoch FROM leadership WHERE id = 1",
    };
    let epoch: i64 = sql(select).scalar(tx).await?;
    fenced(term, epoch)
}

fn fenced(term: Term, current: i64) -> Result<(), StoreError> {
    if current == term.0 {
        Ok(())
    } else {
        Err(StoreError::Fenced { term: term.0, current })
    }
}

impl Store {
    /// Tries to become the leader, beginning a new [`Term`]; `None` while another process
    /// leads. On the embedded database there is only one process, which always leads.
    pub async fn try_lead(&self) -> Result<Option<LeaderLease>, StoreError> {
        match self {
            Store::Sqlite(s) => s.try_lead().await,
            Store::Postgres(s) => s.try_lead().await,
        }
    }
}

/// Who holds a term, as the `leadership` row shows it to operators.
fn holder(instance: &str) -> String {
    format!("pid {} ({instance})", std::process::id())
}

/// The advisory lock whose holder leads (runs the controller and the periodic jobs).
const LEADER_LOCK: i64 = 0x486f_6f6b_7761_7264;

impl PgStore {
    /// Takes the leader lock on a connection of its own, kept outside the pool (the lock
    /// is held exactly as long as that connection lives, so a dead leader's lock goes
    /// with its connection), then begins a term on it. `None` while another process leads.
    pub(super) async fn try_lead(&self) -> Result<Option<LeaderLease>, StoreError> {
        use sqlx::{ConnectOptions as _, Connection as _};
        let mut connection = self.options.connect().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(LEADER_LOCK).fetch_one(&mut connection).await?;
        if !locked {
            connection.close().await.ok();
            return Ok(None);
        }
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE leadership SET epoch = epoch + 1, holder = $1, since = $2 WHERE id = 1 RETURNING epoch",
        )
        .bind(holder(&self.instance))
        .bind(Utc::now())
        .fetch_one(&mut connection)
        .await?;
        Ok(Some(LeaderLease { term: Term(epoch), connection: Some(connection) }))
    }
}

impl SqliteStore {
    /// The only process leads: each call begins a new term.
    pub(super) async fn try_lead(&self) -> Result<Option<LeaderLease>, StoreError> {
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE leadership SET epoch = epoch + 1, holder = ?, since = ? WHERE id = 1 RETURNING epoch",
        )
        .bind(holder("embedded"))
        .bind(Utc::now())
        .fetch_one(self.write_pool())
        .await?;
        Ok(Some(LeaderLease { term: Term(epoch), connection: None }))
    }
}
