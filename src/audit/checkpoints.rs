//! The leader's checkpoint job: publishes the checkpoint key in the cluster chain once per
//! term, and signs a checkpoint of each chain every `audit.checkpointEvery` records or
//! `audit.checkpointInterval`, whichever comes first (when the chain grew at all). The note
//! format is [`super::checkpoint`]'s; the records and checkpoints are the store's.
//!
//! Every write is a leader-only write fenced by the term the run is given (see
//! [`crate::controller::leadership`]): a stale leader signs nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::checkpoint::{Checkpoint, CheckpointSigner};
use super::{NewAuditRecord, CLUSTER_CHAIN};
use crate::config::AuditConfig;
use crate::controller::leadership::Leadership;
use crate::jobs::{leader_term, Failures, FirstRun, Job, JobError, Schedule};
use crate::store::{Store, StoreError, Term};

/// The audit action that records a checkpoint key in the cluster chain.
const KEY_PUBLISHED: &str = "audit.key_published";

/// Signs checkpoints while this process leads; also publishes each chain's length
/// (`hookwarden_audit_chain_length`).
pub struct SignCheckpoints {
    store: Store,
    signer: CheckpointSigner,
    config: AuditConfig,
    /// Asked before each signature: a term this process gave up signs no more.
    leadership: Leadership,
    /// When this process last signed each chain.
    last_signed: HashMap<String, Instant>,
    /// The key is in the cluster chain (checked once, by the first run that could).
    published: bool,
}

impl SignCheckpoints {
    pub fn new(store: Store, signer: CheckpointSigner, config: AuditConfig, leadership: Leadership) -> SignCheckpoints {
        SignCheckpoints { store, signer, config, leadership, last_signed: HashMap::new(), published: false }
    }

    /// Records the checkpoint key in the cluster-wide chain, once per key: reviewers learn
    /// from the chain itself which keys signed its checkpoints, and since when.
    async fn publish_key(&self, term: Term) -> Result<(), StoreError> {
        let key = self.signer.public_key();
        let records = self.store.audit_records(CLUSTER_CHAIN, 1, i64::MAX, u32::MAX).await?;
        if records.iter().any(|r| r.action == KEY_PUBLISHED && r.data["public_key"] == key.as_str()) {
            return Ok(());
        }
        let record = NewAuditRecord::new(
            "system",
            KEY_PUBLISHED,
            CLUSTER_CHAIN,
            format!("key/{}", self.signer.name),
            serde_json::json!({ "public_key": key }),
        );
        self.store.append_audit_as_leader(term, &[record]).await?;
        Leadership::wrote(term, "checkpoint key");
        tracing::info!(public_key = %key, "checkpoint key recorded in the _cluster audit chain");
        Ok(())
    }

    /// Signs and saves a checkpoint of `chain` at `(seq, hash)` when one is due.
    async fn sign_if_due(&mut self, term: Term, chain: String, seq: i64, hash: String) -> Result<(), JobError> {
        let latest = self.store.latest_checkpoint(&chain).await.map_err(JobError::store("reading a checkpoint"))?;
        let signed_seq = latest.map(|(s, _, _)| s).unwrap_or(0);
        let due = seq - signed_seq >= self.config.checkpoint_every
            || self.last_signed.get(&chain).is_none_or(|t| t.elapsed() >= self.config.checkpoint_interval);
        if seq <= signed_seq || !due {
            return Ok(());
        }
        if !self.leadership.holds(term) {
            return Ok(());
        }
        let checkpoint = Checkpoint { origin: Checkpoint::origin_for(&chain), seq, hash: hash.clone() };
        let note = self
            .signer
            .sign(&checkpoint)
            .map_err(|e| JobError::Failed(format!("cannot sign a checkpoint of chain {chain}: {e}")))?;
        self.store
            .save_checkpoint(term, &chain, seq, &hash, &note)
            .await
            .map_err(JobError::store("saving an audit checkpoint"))?;
        Leadership::wrote(term, "checkpoint");
        self.last_signed.insert(chain, Instant::now());
        Ok(())
    }
}

impl Job for SignCheckpoints {
    fn schedule(&self) -> Schedule {
        Schedule {
            name: "sign_checkpoints",
            period: (self.config.checkpoint_interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            leader_only: true,
            first_run: FirstRun::AfterPeriod,
        }
    }

    async fn run(&mut self, term: Option<Term>) -> Result<(), JobError> {
        let term = leader_term(term)?;
        let mut failures = Failures::default();
        if !self.published {
            match self.publish_key(term).await {
                Ok(()) => self.published = true,
                Err(e) => failures.note(JobError::Store { doing: "recording the checkpoint key", source: e })?,
            }
        }
        let heads = self.store.audit_heads().await.map_err(JobError::store("reading the audit chain heads"))?;
        for (chain, seq, hash) in heads {
            metrics::gauge!("hookwarden_audit_chain_length", "chain" => chain.clone()).set(seq as f64);
            if let Err(e) = self.sign_if_due(term, chain, seq, hash).await {
                failures.note(e)?;
            }
        }
        failures.result()
    }
}
