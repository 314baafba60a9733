//! Forgetting idempotency keys after `ingest.idempotencyKeyTtl`: a periodic job in every
//! process, harmless to repeat (deleting what another process deleted does nothing).

use std::time::Duration;

use crate::jobs::{FirstRun, Job, JobError, Schedule};
use crate::store::{Store, Term};

/// Deletes the idempotency keys older than `ttl`, a few times per `ttl` (at least every
/// ten minutes).
pub struct ForgetOldKeys {
    pub store: Store,
    pub ttl: Duration,
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
        let cutoff = chrono::Utc::now() - self.ttl;
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
