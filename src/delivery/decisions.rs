//! The decision writer: the policy gate's verdicts, committed in batches. Every gated
//! delivery waits for its decision to be committed before it may be sent; while one batch
//! commits, the next gathers, so a process pays one transaction (one fsync, one append to
//! each namespace's audit chain) per batch instead of one per decision.
//!
//! Invariants:
//! - a decision is answered only once its batch committed, or failed;
//! - a batch the database refuses (not for being unavailable) is committed again one
//!   decision at a time, so that a decision the database refuses fails by itself;
//! - a decision that could not be recorded is never sent: the gate gives it back.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use crate::store::policy::{DecisionWrite, Recorded};
use crate::store::{Store, StoreError};

/// At most this many decisions are committed in one transaction.
const BATCH: usize = 256;

/// A decision waiting to be committed, and who waits for it.
pub(super) struct Pending {
    pub write: DecisionWrite,
    pub reply: oneshot::Sender<Result<Recorded, NotRecorded>>,
}

/// Why a decision was not recorded (shared by a whole batch).
#[derive(Clone, Debug, thiserror::Error)]
#[error(transparent)]
pub(super) struct NotRecorded(Arc<StoreError>);

/// Sends `write` to the writer of `decisions` and waits until it is committed.
pub(super) async fn record(decisions: &mpsc::Sender<Pending>, write: DecisionWrite) -> Result<Recorded, NotRecorded> {
    let (reply, answer) = oneshot::channel();
    let gone = || NotRecorded(Arc::new(StoreError::WritesFailing { reason: "the decision writer stopped".into() }));
    decisions.send(Pending { write, reply }).await.map_err(|_| gone())?;
    answer.await.unwrap_or_else(|_| Err(gone()))
}

/// Commits decisions in batches until every sender is gone.
pub(super) async fn write_decisions(store: Store, mut pending: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(BATCH);
    while pending.recv_many(&mut batch, BATCH).await > 0 {
        let (writes, replies): (Vec<DecisionWrite>, Vec<_>) = batch.drain(..).map(|p| (p.write, p.reply)).unzip();
        metrics::histogram!("hookwarden_policy_decision_batch_size").record(writes.len() as f64);
        let started = std::time::Instant::now();
        let written = store.record_decisions(&writes, Utc::now()).await;
        metrics::histogram!("hookwarden_policy_decision_write_seconds").record(started.elapsed().as_secs_f64());
        match written {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(error) if writes.len() > 1 && !error.is_unavailable() => {
                tracing::warn!(error = %error, decisions = writes.len(), "decision batch failed; committing decisions one by one");
                let mut unavailable: Option<NotRecorded> = None;
                for (write, reply) in writes.into_iter().zip(replies) {
                    if let Some(error) = &unavailable {
                        let _ = reply.send(Err(error.clone()));
                        continue;
                    }
                    let result = match store.record_decisions(std::slice::from_ref(&write), Utc::now()).await {
                        Ok(results) => results.into_iter().next().ok_or_else(|| {
                            NotRecorded(Arc::new(StoreError::Corrupt(
                                "a decision was recorded without a result".into(),
                            )))
                        }),
                        Err(error) => {
                            let failed = error.is_unavailable();
                            let error = NotRecorded(Arc::new(error));
                            if failed {
                                unavailable = Some(error.clone());
                            }
                            Err(error)
                        }
                    };
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                let error = NotRecorded(Arc::new(error));
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
