//! How the store behaves while the database is away: every wait for a connection is
//! bounded (`database.acquireTimeout`), and whether the database answers is probed in the
//! background, so that `/readyz` reads a cached state instead of waiting on a database that
//! may not answer.
//!
//! Invariant: the cached state is at most [`PROBE_PERIOD`] + [`PROBE_TIMEOUT`] old; a probe
//! that does not answer within [`PROBE_TIMEOUT`] counts as a failure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{PgStore, SqliteStore, Store, StoreError, Term};
use crate::jobs::{FirstRun, Job, JobError, Schedule};

impl Store {
    /// Connects like [`Store::connect`], waiting at most `acquire_timeout` for a PostgreSQL
    /// connection (connecting included). The embedded database has no server to lose and
    /// keeps its own, longer waits for its single writer.
    pub async fn connect_with(url: &str, acquire_timeout: Duration) -> Result<Store, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(PgStore::connect_with(url, acquire_timeout).await?))
        } else {
            Ok(Store::Sqlite(SqliteStore::connect_url(url).await?))
        }
    }
}

/// How often the database is probed.
pub const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// How long one probe may take before it counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the database answered its last probe (and carries every migration), shared by
/// the prober and `/readyz`. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct DatabaseHealth {
    /// `None` until the first probe; `Err` holds why not, for people.
    state: Arc<Mutex<Option<Result<(), String>>>>,
}

impl DatabaseHealth {
    /// The last probe's verdict, at once.
    pub fn current(&self) -> Result<(), String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        state.unwrap_or_else(|| Err("the database has not been checked yet".into()))
    }

    /// Probes `store` once (bounded by [`PROBE_TIMEOUT`]) and keeps the verdict; logs when
    /// it changes.
    pub async fn probe(&self, store: &Store) -> Result<(), String> {
        let verdict = match tokio::time::timeout(PROBE_TIMEOUT, store.check_ready()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e}")),
            Err(_) => Err(format!("the database did not answer within {PROBE_TIMEOUT:?}")),
        };
        let previous = self.state.lock().unwrap_or_else(|p| p.into_inner()).replace(verdict.clone());
        match (&previous, &verdict) {
            (Some(Err(_)), Ok(())) => tracing::info!("the database answers again"),
            (Some(Ok(())) | None, Err(why)) => tracing::warn!(error = %why, "the database is unavailable"),
            _ => {}
        }
        verdict
    }
}

/// Probes the database every [`PROBE_PERIOD`], in every process. A probe that fails is
/// the job done, not a failed run: [`DatabaseHealth::probe`] records the verdict and logs
/// when it changes.
pub struct ProbeDatabase {
    pub store: Store,
    pub health: DatabaseHealth,
}

impl Job for ProbeDatabase {
    fn schedule(&self) -> Schedule {
        Schedule { name: "probe_database", period: PROBE_PERIOD, leader_only: false, first_run: FirstRun::AfterPeriod }
    }

    async fn run(&mut self, _: Option<Term>) -> Result<(), JobError> {
        let _ = self.health.probe(&self.store).await;
        Ok(())
    }
}
