//! Forgetting idempotency keys no dedup window can use any more: a periodic job in every
//! process, harmless to repeat (deleting what another process deleted does nothing).
//!
//! Whether a repeated key is a duplicate is decided at ingest by its namespace's
//! `dedupWindow` (a key past it is taken over, see `store::ingest`); a key's row is kept
//! for the longest window in force, and at least `ingest.idempotencyKeyTtl`.

use std::time::Duration;

use crate::catalog::CatalogHandle;
use crate::jobs::{FirstRun, Job, JobError, Schedule};
use crate::resources::namespace::{NamespaceDefaults, Settings};
use crate::store::{Store, Term};

/// Deletes the idempotency keys older than the longest dedup window in force (at least
/// `ttl`), a few times per `ttl` (at least every ten minutes).
pub struct ForgetOldKeys {
    pub store: Store,
    pub ttl: Duration,
    pub catalog: CatalogHandle,
    pub defaults: NamespaceDefaults,
}

impl ForgetOldKeys {
    /// How long a key's row is kept now.
    fn kept_for(&self) -> Duration {
        let catalog = self.catalog.current();
        let windows = catalog.namespaces().keys().map(|name| catalog.namespace_settings(name, &self.defaults));
        windows.chain([Settings::of(None, &self.defaults)]).map(|s| s.dedup_window).fold(self.ttl, Duration::max)
    }
}

impl Job for ForgetOldKeys {
    fn schedule(&self) -> Schedule {
        Schedule {
            name: "forget_idempotency_keys",
            period: (self.ttl / 4).min(Duration::from_secs(600)),
            leader_only: false,
            first_run: FirstRun::AfterPeriod,
        }
    }

    async fn run(&mut self, _: Option<Term>) -> Result<(), JobError> {
        let kept = chrono::Duration::from_std(self.kept_for()).unwrap_or(chrono::Duration::MAX);
        let Some(cutoff) = chrono::Utc::now().checked_sub_signed(kept) else { return Ok(()) };
        let deleted = self
            .store
            .delete_idempotency_keys_before(cutoff)
            .await
            .map_err(JobError::store("deleting expired idempotency keys"))?;
        if deleted > 0 {
            tracing::info!(deleted, "forgot expired idempotency keys");
        }
        Ok(())
    }
}
