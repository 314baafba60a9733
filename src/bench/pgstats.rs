//! The bench's view of PostgreSQL: a fresh database per run, and the counters that say what
//! a run cost the database — transactions, rows written per table, statements (when
//! `pg_stat_statements` is loaded) and WAL bytes.
//!
//! Counters are read through the bench's own connection to the bench's database. The
//! cumulative statistics (`pg_stat_database`, `pg_stat_user_tables`) reach readers up to
//! about a second after a backend's transaction ends (PostgreSQL 15 flushes them when a
//! backend goes idle, at most once a second), so a snapshot taken under load is that much
//! behind: callers let the server go idle for a couple of seconds before the last one.
//! WAL position and the `postgres` processes are the whole cluster's: other databases'
//! work during a run lands in them, so a snapshot also counts other databases' commits.

use std::collections::BTreeMap;
use std::str::FromStr as _;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions as _, Connection as _, Row as _};

/// A database `hw_bench_<ulid>` created on a server for one run. [`FreshDatabase::drop`]
/// removes it; a run that is interrupted (^C) leaves it behind, to be dropped by hand.
pub(super) struct FreshDatabase {
    server: PgConnectOptions,
    pub(super) name: String,
    /// The URL of the new database: the server's URL with the database name replaced.
    pub(super) url: String,
}

impl FreshDatabase {
    /// Creates the database on the server `server_url` points at (its database is only
    /// used to connect).
    pub(super) async fn create(server_url: &str) -> anyhow::Result<FreshDatabase> {
        let server = PgConnectOptions::from_str(server_url)?.application_name("hookwarden-bench");
        let name = format!("hw_bench_{}", ulid::Ulid::new().to_string().to_lowercase());
        let mut connection = server.connect().await.context("cannot connect to the PostgreSQL server")?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut connection).await?;
        connection.close().await?;
        let mut url = url::Url::parse(server_url)?;
        url.set_path(&format!("/{name}"));
        Ok(FreshDatabase { server, name, url: url.into() })
    }

    /// Drops the database, closing whatever is still connected to it.
    pub(super) async fn drop(self) -> anyhow::Result<()> {
        let mut connection = self.server.connect().await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut connection).await?;
        connection.close().await?;
        Ok(())
    }
}

/// Rows one table had written, from `pg_stat_user_tables`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct TableWrites {
    pub(super) inserted: i64,
    pub(super) updated: i64,
    /// Of `updated`, those that were HOT (no index entry written).
    pub(super) hot_updated: i64,
    pub(super) deleted: i64,
}

impl TableWrites {
    pub(super) fn rows(&self) -> i64 {
        self.inserted + self.updated + self.deleted
    }

    fn since(&self, before: &TableWrites) -> TableWrites {
        TableWrites {
            inserted: self.inserted - before.inserted,
            updated: self.updated - before.updated,
            hot_updated: self.hot_updated - before.hot_updated,
            deleted: self.deleted - before.deleted,
        }
    }
}

/// One normalised statement's counters, from `pg_stat_statements`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Statement {
    pub(super) query: String,
    pub(super) calls: i64,
    pub(super) rows: i64,
}

/// The database's counters at one moment, or (from [`PgSnapshot::since`]) what a run
/// added to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PgSnapshot {
    pub(super) commits: i64,
    pub(super) rollbacks: i64,
    /// Transactions committed in each other database of the cluster, by its oid (a
    /// database dropped during a run is left out of the run's count, not subtracted).
    pub(super) other_commits: BTreeMap<u32, i64>,
    /// WAL position in bytes (the whole cluster's).
    pub(super) wal_bytes: i64,
    pub(super) tables: BTreeMap<String, TableWrites>,
    /// Per `queryid`, when `pg_stat_statements` is loaded.
    pub(super) statements: Option<BTreeMap<i64, Statement>>,
    /// Pids of the backends connected to the database (the bench's own excepted).
    pub(super) backends: Vec<u32>,
}

impl PgSnapshot {
    /// Transactions committed in the other databases.
    pub(super) fn other_commits(&self) -> i64 {
        self.other_commits.values().sum()
    }

    /// What happened between `before` and `self`. Tables and statements new since `before`
    /// count whole; backends are `self`'s.
    pub(super) fn since(&self, before: &PgSnapshot) -> PgSnapshot {
        let tables = self
            .tables
            .iter()
            .map(|(name, now)| (name.clone(), now.since(&before.tables.get(name).copied().unwrap_or_default())))
            .filter(|(_, writes)| *writes != TableWrites::default())
            .collect();
        let statements = self.statements.as_ref().map(|now| {
            now.iter()
                .filter_map(|(id, s)| {
                    let earlier = before.statements.as_ref().and_then(|b| b.get(id));
                    let calls = s.calls - earlier.map_or(0, |e| e.calls);
                    let rows = s.rows - earlier.map_or(0, |e| e.rows);
                    (calls > 0).then(|| (*id, Statement { query: s.query.clone(), calls, rows }))
                })
                .collect()
        });
        PgSnapshot {
            commits: self.commits - before.commits,
            rollbacks: self.rollbacks - before.rollbacks,
            other_commits: self
                .other_commits
                .iter()
                .map(|(oid, now)| (*oid, now - before.other_commits.get(oid).copied().unwrap_or(0)))
                .collect(),
            wal_bytes: self.wal_bytes - before.wal_bytes,
            tables,
            statements,
            backends: self.backends.clone(),
        }
    }
}

/// The bench's connection to the bench's database, reading its counters.
pub(super) struct PgStats {
    connection: PgConnection,
    /// Why there are no statement counts, when there are none.
    pub(super) without_statements: Option<String>,
}

impl PgStats {
    /// Connects to the database the server under test uses. When the server has
    /// `pg_stat_statements` in `shared_preload_libraries`, creates the extension in that
    /// database (a superuser's right) and leaves the bench's own statements out of it.
    pub(super) async fn connect(url: &str) -> anyhow::Result<PgStats> {
        let options = PgConnectOptions::from_str(url)?.application_name("hookwarden-bench");
        let mut connection = options.connect().await?;
        let preloaded: String =
            sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')").fetch_one(&mut connection).await?;
        let without_statements = if !preloaded.split(',').any(|l| l.trim() == "pg_stat_statements") {
            Some("pg_stat_statements is not in this server's shared_preload_libraries".to_owned())
        } else {
            let created =
                sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&mut connection).await;
            match created {
                Err(e) => Some(format!("cannot create the pg_stat_statements extension: {e}")),
                Ok(_) => {
                    // Only a superuser may: otherwise the bench's few reads are counted too.
                    let _ = sqlx::query("SET pg_stat_statements.track = 'none'").execute(&mut connection).await;
                    None
                }
            }
        };
        Ok(PgStats { connection, without_statements })
    }

    /// The counters now, read in one transaction (so from one statistics snapshot).
    pub(super) async fn snapshot(&mut self) -> anyhow::Result<PgSnapshot> {
        let mut tx = self.connection.begin().await?;
        let row = sqlx::query(
            "SELECT d.xact_commit, d.xact_rollback,
                    ARRAY(SELECT o.datid::int8 FROM pg_stat_database o WHERE o.datid <> d.datid ORDER BY o.datid),
                    ARRAY(SELECT o.xact_commit FROM pg_stat_database o WHERE o.datid <> d.datid ORDER BY o.datid),
                    pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
                    ARRAY(SELECT pid FROM pg_stat_activity a WHERE a.datid = d.datid AND a.pid <> pg_backend_pid())
             FROM pg_stat_database d WHERE d.datname = current_database()",
        )
        .fetch_one(&mut *tx)
        .await?;
        let tables = sqlx::query(
            "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|t| {
            let writes =
                TableWrites { inserted: t.get(1), updated: t.get(2), hot_updated: t.get(3), deleted: t.get(4) };
            (t.get::<String, _>(0), writes)
        })
        .collect();
        let statements = match self.without_statements {
            Some(_) => None,
            None => Some(
                sqlx::query(
                    "SELECT queryid, query, calls, rows FROM pg_stat_statements s
                     JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()",
                )
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|s| (s.get(0), Statement { query: s.get(1), calls: s.get(2), rows: s.get(3) }))
                .collect(),
            ),
        };
        tx.commit().await?;
        let (others, other_commits): (Vec<i64>, Vec<i64>) = (row.get(2), row.get(3));
        let backends: Vec<i32> = row.get(5);
        Ok(PgSnapshot {
            commits: row.get(0),
            rollbacks: row.get(1),
            other_commits: others.into_iter().filter_map(|oid| u32::try_from(oid).ok()).zip(other_commits).collect(),
            wal_bytes: row.get(4),
            tables,
            statements,
            backends: backends.into_iter().filter_map(|p| u32::try_from(p).ok()).collect(),
        })
    }

    pub(super) async fn close(self) -> anyhow::Result<()> {
        self.connection.close().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(inserted: i64, updated: i64, hot_updated: i64, deleted: i64) -> TableWrites {
        TableWrites { inserted, updated, hot_updated, deleted }
    }

    #[test]
    fn a_delta_keeps_what_changed_and_counts_new_tables_and_statements_whole() {
        let statement = |calls, rows| Statement { query: "SELECT $1".into(), calls, rows };
        let before = PgSnapshot {
            commits: 10,
            rollbacks: 1,
            other_commits: BTreeMap::from([(1, 100), (2, 50)]),
            wal_bytes: 1_000,
            tables: BTreeMap::from([("events".into(), writes(5, 0, 0, 0)), ("resources".into(), writes(2, 1, 1, 0))]),
            statements: Some(BTreeMap::from([(7, statement(3, 3))])),
            backends: vec![1],
        };
        let after = PgSnapshot {
            commits: 25,
            rollbacks: 1,
            other_commits: BTreeMap::from([(1, 104), (3, 2)]),
            wal_bytes: 9_000,
            tables: BTreeMap::from([
                ("events".into(), writes(15, 0, 0, 0)),
                ("resources".into(), writes(2, 1, 1, 0)),
                ("deliveries".into(), writes(10, 20, 5, 0)),
            ]),
            statements: Some(BTreeMap::from([(7, statement(13, 23)), (8, statement(2, 0))])),
            backends: vec![2, 3],
        };
        let run = after.since(&before);
        // Database 2 was dropped during the run, 3 created: neither takes from the count.
        assert_eq!((run.commits, run.rollbacks, run.other_commits(), run.wal_bytes), (15, 0, 6, 8_000));
        assert_eq!(
            run.tables,
            BTreeMap::from([("events".into(), writes(10, 0, 0, 0)), ("deliveries".into(), writes(10, 20, 5, 0))])
        );
        assert_eq!(run.tables["deliveries"].rows(), 30);
        assert_eq!(run.statements, Some(BTreeMap::from([(7, statement(10, 20)), (8, statement(2, 0))])));
        assert_eq!(run.backends, vec![2, 3]);
    }
}
