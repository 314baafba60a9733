//! Which process leads, and for which term: the campaign, and the handle every leader-only
//! job (the controller, checkpoint signing, approval expiry) asks before it acts.
//!
//! Invariants:
//! - this process acts as leader only while [`Leadership::term`] is `Some`; it takes a term
//!   when it wins the lock (and the store bumps the epoch), and drops it as soon as the
//!   lock's connection fails a check (every `controller.leaderCheck`, each bounded by the
//!   same period) or a fenced write finds that the term is over;
//! - every leader-only write names its term, and the store refuses it once a newer term
//!   began (see `store::leadership`), so a stale leader cannot write even before it noticed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError, Term};

/// The log target of leadership lines: terms beginning and ending, and (at debug) every
/// leader-only write with its epoch.
pub const LOG_TARGET: &str = "hookwarden::leadership";

/// This process's view of its leadership. Cheap to clone; shared by the campaign, the
/// leader-only jobs and `/readyz`.
#[derive(Clone, Debug)]
pub struct Leadership {
    term: Arc<watch::Sender<Option<Term>>>,
}

impl Default for Leadership {
    fn default() -> Self {
        Self { term: Arc::new(watch::Sender::new(None)) }
    }
}

impl Leadership {
    /// The term this process leads in, if it leads.
    pub fn term(&self) -> Option<Term> {
        *self.term.borrow()
    }

    pub fn is_leader(&self) -> bool {
        self.term().is_some()
    }

    /// Whether `term` is still this process's current term.
    pub fn holds(&self, term: Term) -> bool {
        self.term() == Some(term)
    }

    /// Waits until this process leads; returns its term.
    pub async fn acquired(&self) -> Term {
        let mut watch = self.term.subscribe();
        loop {
            if let Some(term) = *watch.borrow_and_update() {
                return term;
            }
            if watch.changed().await.is_err() {
                // The sender lives in `self`: it cannot be dropped while we wait.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until `term` is over for this process.
    pub async fn ended(&self, term: Term) {
        let mut watch = self.term.subscribe();
        while *watch.borrow_and_update() == Some(term) {
            if watch.changed().await.is_err() {
                return;
            }
        }
    }

    /// Ends `term` here at once, if it is the current one; `why` is logged.
    pub fn step_down(&self, term: Term, why: &str) {
        let ended = self.term.send_if_modified(|current| {
            if *current == Some(term) {
                *current = None;
                true
            } else {
                false
            }
        });
        if ended {
            tracing::warn!(target: LOG_TARGET, epoch = term.epoch(), reason = why, "lost leadership");
        }
    }

    /// Call with the error of a leader-only write: when it says the term is over, steps
    /// down and returns true (the caller stops acting as leader).
    pub fn fenced(&self, term: Term, error: &StoreError) -> bool {
        if let StoreError::Fenced { current, .. } = error {
            self.step_down(term, &format!("a leader-only write found term {current} in force"));
            true
        } else {
            false
        }
    }

    /// Records that a leader-only write of `job` was made in `term` (debug level).
    pub fn wrote(term: Term, job: &'static str) {
        tracing::debug!(target: LOG_TARGET, epoch = term.epoch(), job, "leader-only write");
    }

    /// Leads in `term` without a campaign, for unit tests of leader-only code.
    #[cfg(test)]
    pub(crate) fn lead_for_tests(&self, term: Term) {
        self.begin(term);
    }

    fn begin(&self, term: Term) {
        self.term.send_replace(Some(term));
        tracing::info!(target: LOG_TARGET, epoch = term.epoch(), "became leader");
    }
}

/// How the campaign runs.
#[derive(Clone, Copy, Debug)]
pub struct CampaignSettings {
    /// How often a follower tries to take the lock.
    pub retry: Duration,
    /// How often the leader checks its lock's connection (and how long a check may take).
    pub check: Duration,
    /// The longest one attempt to take the lock may take (connecting included).
    pub attempt: Duration,
}

/// Campaigns for leadership until `shutdown`: takes the lock when it is free, leads while
/// every check of the lock's connection succeeds, and steps down at the first that does
/// not (or when a fenced write ended the term).
pub async fn campaign(store: Store, leadership: Leadership, settings: CampaignSettings, shutdown: CancellationToken) {
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            attempt = tokio::time::timeout(settings.attempt, store.try_lead()) => attempt,
        };
        match attempt {
            Ok(Ok(Some(mut lease))) => {
                let term = lease.term();
                leadership.begin(term);
                let why = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break None,
                        _ = leadership.ended(term) => break None,
                        _ = tokio::time::sleep(settings.check) => {}
                    }
                    match tokio::time::timeout(settings.check, lease.check()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Some(format!("the leader lock's connection failed: {e}")),
                        Err(_) => {
                            break Some(format!(
                                "the leader lock's connection did not answer within {:?}",
                                settings.check
                            ))
                        }
                    }
                };
                // Stop acting first; the lock goes with its connection.
                if let Some(why) = why {
                    leadership.step_down(term, &why);
                } else if shutdown.is_cancelled() {
                    leadership.term.send_replace(None);
                }
                lease.release().await;
                if shutdown.is_cancelled() {
                    return;
                }
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(target: LOG_TARGET, error = %e, "could not campaign for leadership"),
            Err(_) => tracing::warn!(target: LOG_TARGET, "could not campaign for leadership: the attempt timed out"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(settings.retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fenced_write_ends_only_the_term_it_was_made_in() {
        let leadership = Leadership::default();
        assert!(!leadership.is_leader());
        let (old, new) = (Term::for_tests(1), Term::for_tests(2));
        leadership.begin(old);
        assert_eq!(leadership.acquired().await, old);
        // An error of an earlier term does not end the current one.
        leadership.begin(new);
        assert!(leadership.fenced(old, &StoreError::Fenced { term: 1, current: 2 }));
        assert!(leadership.holds(new));
        assert!(!leadership.fenced(new, &StoreError::Corrupt("x".into())), "other errors do not end a term");
        assert!(leadership.holds(new));
        let ended = leadership.ended(new);
        assert!(leadership.fenced(new, &StoreError::Fenced { term: 2, current: 3 }));
        ended.await;
        assert!(!leadership.is_leader());
    }
}
