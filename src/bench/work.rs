//! The work a bench run cost, per delivery: the server's CPU, and on PostgreSQL the
//! `postgres` processes' CPU, transactions, statements, rows written per table and WAL
//! bytes; on SQLite the bytes the server wrote to storage.
//!
//! A [`WorkMeter`] takes a snapshot before the measured window and one after it; what lies
//! between is divided by the deliveries made. The load average before and after is kept
//! beside the figures, because the machine may be shared with other work.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::pgstats::{PgSnapshot, PgStats};
use super::procfs;

/// Statements listed by name under the total, most called first.
const TOP_STATEMENTS: usize = 12;

pub(super) struct WorkMeter {
    server_pid: u32,
    postgres: Option<PgStats>,
}

/// The counters at the start of the measured window.
pub(super) struct WorkStart {
    load: String,
    server_cpu: Duration,
    server_writes: u64,
    postgres_cpu: BTreeMap<u32, Duration>,
    postgres: Option<PgSnapshot>,
}

/// What the measured window cost.
pub(super) struct Work {
    deliveries: usize,
    load_before: String,
    load_after: String,
    server_cpu: Duration,
    server_writes: u64,
    postgres: Option<PostgresWork>,
}

struct PostgresWork {
    /// All `postgres` processes on the machine (`None`: none is visible in `/proc`).
    cpu_all: Option<Duration>,
    /// The backends connected to the bench's database at the end.
    cpu_backends: Duration,
    counters: PgSnapshot,
    without_statements: Option<String>,
}

impl WorkMeter {
    /// `database_url`: the server's PostgreSQL database, if it runs on one.
    pub(super) async fn new(server_pid: u32, database_url: Option<&str>) -> anyhow::Result<WorkMeter> {
        let postgres = match database_url {
            Some(url) => Some(PgStats::connect(url).await?),
            None => None,
        };
        Ok(WorkMeter { server_pid, postgres })
    }

    pub(super) async fn start(&mut self) -> anyhow::Result<WorkStart> {
        let postgres = match &mut self.postgres {
            Some(stats) => Some(stats.snapshot().await?),
            None => None,
        };
        Ok(WorkStart {
            load: procfs::load_average()?,
            server_cpu: procfs::cpu_time(self.server_pid)?,
            server_writes: procfs::storage_writes(self.server_pid)?,
            postgres_cpu: procfs::postgres_cpu()?,
            postgres,
        })
    }

    /// The work since `start`, to be divided by `deliveries`.
    pub(super) async fn finish(&mut self, start: WorkStart, deliveries: usize) -> anyhow::Result<Work> {
        let server_cpu = procfs::cpu_time(self.server_pid)?.saturating_sub(start.server_cpu);
        let server_writes = procfs::storage_writes(self.server_pid)?.saturating_sub(start.server_writes);
        let postgres_cpu = procfs::postgres_cpu()?;
        let postgres = match (&mut self.postgres, start.postgres) {
            (Some(stats), Some(before)) => {
                let counters = stats.snapshot().await?.since(&before);
                Some(PostgresWork {
                    cpu_all: (!start.postgres_cpu.is_empty())
                        .then(|| procfs::cpu_since(&start.postgres_cpu, &postgres_cpu, None)),
                    cpu_backends: procfs::cpu_since(&start.postgres_cpu, &postgres_cpu, Some(&counters.backends)),
                    counters,
                    without_statements: stats.without_statements.clone(),
                })
            }
            _ => None,
        };
        Ok(Work {
            deliveries,
            load_before: start.load,
            load_after: procfs::load_average()?,
            server_cpu,
            server_writes,
            postgres,
        })
    }

    pub(super) async fn close(self) -> anyhow::Result<()> {
        if let Some(stats) = self.postgres {
            stats.close().await?;
        }
        Ok(())
    }
}

impl fmt::Display for Work {
    /// Lines of the bench's output, each indented and ending in a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.deliveries.max(1) as f64;
        let per = |count: i64| count as f64 / n;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / n;
        writeln!(f, "  load average {} before, {} after (/proc/loadavg)", self.load_before, self.load_after)?;
        writeln!(f, "  server CPU   {:.3} ms per delivery", ms(self.server_cpu))?;
        let Some(pg) = &self.postgres else {
            return writeln!(
                f,
                "  storage      {:.0} bytes written by the server per delivery (SQLite WAL and checkpoints, /proc/PID/io)",
                self.server_writes as f64 / n
            );
        };
        let c = &pg.counters;
        match pg.cpu_all {
            Some(all) => writeln!(
                f,
                "  postgres CPU {:.3} ms per delivery, all postgres processes; {:.3} ms in this database's {} backends",
                ms(all),
                ms(pg.cpu_backends),
                c.backends.len()
            )?,
            None => writeln!(f, "  postgres CPU not measured: no postgres process is visible in /proc")?,
        }
        writeln!(
            f,
            "  transactions {:.2} committed per delivery, {} rolled back (pg_stat_database)",
            per(c.commits),
            c.rollbacks
        )?;
        match (&c.statements, &pg.without_statements) {
            (Some(statements), _) => {
                let total: i64 = statements.values().map(|s| s.calls).sum();
                writeln!(f, "  statements   {:.2} per delivery (pg_stat_statements), most called:", per(total))?;
                let mut top: Vec<_> = statements.values().collect();
                top.sort_by_key(|s| std::cmp::Reverse(s.calls));
                for s in top.into_iter().take(TOP_STATEMENTS) {
                    let query: String = s.query.split_whitespace().collect::<Vec<_>>().join(" ");
                    let query: String = query.chars().take(110).collect();
                    writeln!(f, "    {:6.2} calls, {:6.2} rows  {query}", per(s.calls), per(s.rows))?;
                }
            }
            (None, reason) => writeln!(
                f,
                "  statements   not counted ({}); transactions stand in",
                reason.as_deref().unwrap_or("no pg_stat_statements")
            )?,
        }
        let rows: i64 = c.tables.values().map(|t| t.rows()).sum();
        writeln!(f, "  rows written {:.2} per delivery (pg_stat_user_tables):", per(rows))?;
        let mut tables: Vec<_> = c.tables.iter().collect();
        tables.sort_by_key(|(_, t)| std::cmp::Reverse(t.rows()));
        for (name, t) in tables {
            writeln!(
                f,
                "    {name:<22} {:.2} inserted, {:.2} updated ({:.2} HOT), {:.2} deleted",
                per(t.inserted),
                per(t.updated),
                per(t.hot_updated),
                per(t.deleted)
            )?;
        }
        writeln!(
            f,
            "  WAL          {:.0} bytes per delivery (pg_current_wal_lsn, the whole cluster: other databases committed {} transactions meanwhile)",
            per(c.wal_bytes),
            c.other_commits()
        )
    }
}
