//! Retention on the leader: deleting what each namespace keeps no longer, by its
//! Namespace's `retention` and `dedupWindow` over the server's `namespaceDefaults`.
//!
//! The work is the store's ([`Store::delete_expired`]: bounded batches, short
//! transactions, events with deliveries that are not final never deleted); this module
//! decides the scopes from the catalog in force and paces the batches, so a large
//! backlog is worked off over several runs instead of in one long one. Progress is counted
//! in `hookwarden_retention_deleted_total{table}` and logged per run.

use chrono::Utc;

use crate::catalog::{Catalog, CatalogHandle};
use crate::config::RetentionConfig;
use crate::jobs::{FirstRun, Job, JobError, Schedule};
use crate::resources::namespace::{NamespaceDefaults, Settings};
use crate::store::retention::{Deleted, Namespaces, Scope};
use crate::store::{Store, Term};

/// Batches per run, at most: what is left waits for the next run.
const BATCHES_PER_RUN: usize = 200;

/// The scopes retention works on: each namespace with a Namespace by its settings, and
/// every other namespace by the defaults.
pub fn scopes(catalog: &Catalog, defaults: &NamespaceDefaults) -> Vec<Scope> {
    let mut named: Vec<String> = catalog.namespaces().keys().cloned().collect();
    named.sort();
    let scope = |namespaces: Namespaces, settings: Settings| Scope { namespaces, retention: settings.retention };
    let mut scopes: Vec<Scope> = named
        .iter()
        .map(|name| scope(Namespaces::Only(name.clone()), catalog.namespace_settings(name, defaults)))
        .collect();
    scopes.push(scope(Namespaces::AllBut(named), Settings::of(None, defaults)));
    scopes
}

/// Deletes what is past retention, in batches, at most [`BATCHES_PER_RUN`] per run; a
/// leader-only job, every `retention.period`.
pub struct EnforceRetention {
    pub store: Store,
    pub catalog: CatalogHandle,
    pub defaults: NamespaceDefaults,
    /// `retention` in the configuration: the period and the batch size.
    pub config: RetentionConfig,
}

impl Job for EnforceRetention {
    fn schedule(&self) -> Schedule {
        Schedule { name: "retention", period: self.config.period, leader_only: true, first_run: FirstRun::AfterPeriod }
    }

    async fn run(&mut self, _: Option<Term>) -> Result<(), JobError> {
        let scopes = scopes(&self.catalog.current(), &self.defaults);
        let mut total = Deleted::default();
        for _ in 0..BATCHES_PER_RUN {
            let deleted = self
                .store
                .delete_expired(&scopes, Utc::now(), self.config.batch_size)
                .await
                .map_err(JobError::store("deleting rows past retention"))?;
            for (table, count) in deleted.by_table() {
                metrics::counter!("hookwarden_retention_deleted_total", "table" => table).increment(count);
            }
            let full = deleted.by_table().iter().any(|(_, count)| *count >= u64::from(self.config.batch_size));
            total.add(deleted);
            if !full {
                break;
            }
        }
        if total != Deleted::default() {
            tracing::info!(
                events = total.events,
                deliveries = total.deliveries,
                attempts = total.attempts,
                identities = total.identities,
                "retention deleted rows past their namespaces' retention"
            );
        }
        Ok(())
    }
}
