//! The dispatcher: claims due deliveries and hands each to an attempt task (`attempt.rs`),
//! which sends it signed and queues its outcome for the completion writer (`upkeep.rs`).
//!
//! Claims are short transactions with a lease longer than the longest attempt; no
//! transaction is open during HTTP. Completions are written in batches by one writer task,
//! each guarded by its lease token. A slow or failing endpoint holds at most
//! `perEndpointConcurrency` attempts, and a claim takes no more of an endpoint's deliveries
//! than it has free slots in this process (none while its rate limit or its breaker says
//! no), one claim at a time per process, so a busy endpoint's backlog is neither read nor
//! given back and healthy endpoints keep flowing. A claim capped by a busy endpoint claims
//! again when a slot frees. On shutdown, claiming stops, attempts in flight get
//! `shutdownGrace` to finish, and whatever is left is released for another worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::Admission;
use super::decisions::{write_decisions, Pending};
use super::http::Sender;
use super::upkeep::{tend_queue, write_completions};
use crate::catalog::{Catalog, CatalogHandle};
use crate::config::{AuditedOutcomes, DeliveryConfig};
use crate::ids::DeliveryId;
use crate::store::{ClaimedDelivery, Completion, DeadLetterAlert, DeliveryState, EndpointQuota, Store};

/// How long a paused endpoint's claimed delivery waits before it is looked at again.
/// Lifting the pause makes its deliveries due at once (see the resource apply).
const PAUSED_RECHECK: Duration = Duration::from_secs(60);

/// How long a delivery of a blocked endpoint (its secret cannot be read, its RetryBudget
/// is gone) waits before it is looked at again. When this process can send to it again,
/// its deliveries are made due at once (see `server::follow_resources`); the recheck
/// covers another process that could send them meanwhile.
const BLOCKED_RECHECK: Duration = Duration::from_secs(60);

/// How often the dispatcher looks for deleted endpoints' waiting deliveries.
const DELETED_SCAN: Duration = Duration::from_secs(5);

/// Why a claimed delivery is given back unattempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GiveBack {
    Paused,
    Blocked,
    Busy,
}

impl GiveBack {
    fn label(self) -> &'static str {
        match self {
            GiveBack::Paused => "paused",
            GiveBack::Blocked => "blocked",
            GiveBack::Busy => "busy",
        }
    }

    /// When it is due again: a paused or blocked endpoint's is looked at again later; a
    /// busy one's keeps its place in the queue (due as it was), behind nothing newer.
    fn due_again(self, delivery: &ClaimedDelivery) -> chrono::DateTime<Utc> {
        let later = |after: Duration| Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
        match self {
            GiveBack::Paused => later(PAUSED_RECHECK),
            GiveBack::Blocked => later(BLOCKED_RECHECK),
            GiveBack::Busy => delivery.due_at,
        }
    }
}

/// What the dispatcher takes from the configuration.
#[derive(Clone, Debug)]
pub struct DispatchSettings {
    pub delivery: DeliveryConfig,
    /// Send to private and loopback addresses (tests, local receivers).
    pub allow_private: bool,
    pub audited: AuditedOutcomes,
    /// Signalled when a completion opened a breaker or disabled an endpoint.
    pub status_changed: Arc<Notify>,
    /// `operationalEvents.failingShare`.
    pub failing_share: f64,
    /// Signalled when completions wrote operational events to the outbox.
    pub outbox: Arc<Notify>,
    /// `console.publicUrl`, for the links of approval requests.
    pub console: Option<String>,
    /// `operationalEvents.deadLetters` and `.deadLetterWindow`.
    pub dead_letters: DeadLetterAlert,
}

/// Shared by the claim loops and attempt tasks.
pub struct Dispatcher {
    pub(super) store: Store,
    pub(super) catalog: CatalogHandle,
    pub(super) http: Sender,
    pub(super) config: DeliveryConfig,
    pub(super) audited: AuditedOutcomes,
    /// `operationalEvents.failingShare`.
    pub(super) failing_share: f64,
    /// `console.publicUrl`.
    pub(super) console: Option<String>,
    /// When an endpoint's dead letters are told.
    pub(super) dead_letters: DeadLetterAlert,
    pub(super) wake: Arc<Notify>,
    pub(super) admission: Admission,
    pub(super) completions: mpsc::Sender<Completion>,
    /// The policy gate's verdicts, to the decision writer.
    pub(super) decisions: mpsc::Sender<Pending>,
    /// Cancelled when the shutdown grace is over: attempts still running give their
    /// delivery back instead of finishing.
    pub(super) stop_attempts: CancellationToken,
    /// Held from computing a claim's quotas until its deliveries are admitted, so that
    /// claim loops do not both take an endpoint's free slots.
    claiming: tokio::sync::Mutex<()>,
    /// Endpoints not in the catalog that have waiting deliveries (deleted): claimed so that
    /// their deliveries fail, as they would be sent if the endpoint came back.
    deleted: std::sync::Mutex<Vec<(String, String)>>,
}

/// What a claim loop does after a claim.
enum Next {
    /// It took all it asked for: more may be due.
    Claim,
    /// An endpoint's cap limited it: when a slot frees (or the rate limit allows one, or
    /// new work is signalled, or the poll interval passes).
    WhenFreed(Option<Duration>),
    /// Nothing more is due until new work is signalled or the poll interval passes.
    Idle,
}

impl Dispatcher {
    /// Starts the claim loops, the completion writer and the queue upkeep (expired leases,
    /// open breakers) on `tracker`.
    pub fn start(
        store: Store,
        catalog: CatalogHandle,
        settings: DispatchSettings,
        wake: Arc<Notify>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let DispatchSettings {
            delivery: config,
            allow_private,
            audited,
            status_changed,
            failing_share,
            outbox,
            console,
            dead_letters,
        } = settings;
        let http = Sender::new(allow_private, config.response_bytes)?;
        let (completions, pending) = mpsc::channel(8192);
        let (decisions, undecided) = mpsc::channel(8192);
        let stop_attempts = CancellationToken::new();
        let dispatcher = Arc::new(Dispatcher {
            store: store.clone(),
            catalog,
            http,
            config: config.clone(),
            audited,
            failing_share,
            console,
            dead_letters,
            wake,
            admission: Admission::new(config.per_endpoint_concurrency),
            completions,
            decisions,
            stop_attempts: stop_attempts.clone(),
            claiming: tokio::sync::Mutex::new(()),
            deleted: std::sync::Mutex::new(Vec::new()),
        });
        tracker.spawn(write_completions(store.clone(), pending, dispatcher.wake.clone(), status_changed, outbox));
        tracker.spawn(write_decisions(store.clone(), undecided));
        tracker.spawn(tend_queue(store, config.lease_margin, shutdown.clone()));
        tracker.spawn(dispatcher.clone().find_deleted_endpoints(shutdown.clone()));
        let attempts = TaskTracker::new();
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        for _ in 0..config.workers {
            let (d, attempts, in_flight, shutdown) =
                (dispatcher.clone(), attempts.clone(), in_flight.clone(), shutdown.clone());
            tracker.spawn(async move { d.claim_loop(attempts, in_flight, shutdown).await });
        }
        // Drain: once claiming stopped, give attempts their grace, then cancel the rest.
        let (grace, drained) = (config.shutdown_grace, attempts.clone());
        tracker.spawn(async move {
            shutdown.cancelled().await;
            drained.close();
            if tokio::time::timeout(grace, drained.wait()).await.is_err() {
                tracing::warn!("attempts still running after the shutdown grace; releasing them");
                stop_attempts.cancel();
                drained.wait().await;
            }
        });
        Ok(())
    }

    /// The lease for a claim: longer than the slowest endpoint's attempt.
    fn lease(&self) -> Duration {
        self.catalog.current().max_timeout() + self.config.lease_margin
    }

    /// What one claim may take of each endpoint now: its free slots in this process (see
    /// [`Admission::free_slots`]), at most `limit`; those with no free slot are left out.
    /// A paused or blocked endpoint's waiting deliveries are claimed to be parked until
    /// they are looked at again (a minute later; lifting the pause makes them due at
    /// once). Also says whether an endpoint was left out for want of a slot, and the
    /// soonest its rate limit allows one.
    fn quotas(&self, catalog: &Catalog, limit: usize) -> (Vec<EndpointQuota>, bool, Option<Duration>) {
        let now = Instant::now();
        let (mut quotas, mut busy, mut rate_wait) = (Vec::new(), false, None::<Duration>);
        for ep in catalog.endpoints() {
            if ep.spec.paused || ep.blocked.is_some() {
                let (namespace, endpoint) = (ep.namespace.clone(), ep.name.clone());
                quotas.push(EndpointQuota { namespace, endpoint, cap: limit as u32, breaker_threshold: None });
                continue;
            }
            let threshold = ep.budget.breaker.map(|b| b.0);
            let per_second = ep.spec.rate_limit.as_ref().map(|r| r.per_second);
            let free = self.admission.free_slots(&ep.namespace, &ep.name, threshold, per_second, ep.spec.agent, now);
            if let Some(wait) = free.rate_wait {
                rate_wait = Some(rate_wait.map_or(wait, |w| w.min(wait)));
            }
            if free.slots == 0 {
                busy = true;
                continue;
            }
            quotas.push(EndpointQuota {
                namespace: ep.namespace.clone(),
                endpoint: ep.name.clone(),
                cap: free.slots.min(limit) as u32,
                breaker_threshold: threshold,
            });
        }
        let deleted = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
        for (namespace, name) in deleted.iter().filter(|(n, e)| catalog.endpoint(n, e).is_none()) {
            quotas.push(EndpointQuota {
                namespace: namespace.clone(),
                endpoint: name.clone(),
                cap: limit as u32,
                breaker_threshold: None,
            });
        }
        (quotas, busy, rate_wait)
    }

    async fn claim_loop(
        self: Arc<Self>,
        attempts: TaskTracker,
        in_flight: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let mut next = Next::Claim;
        while !shutdown.is_cancelled() {
            match next {
                Next::Claim => {}
                Next::WhenFreed(rate_wait) => {
                    let wait = rate_wait.map_or(self.config.poll_interval, |w| w.min(self.config.poll_interval));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = self.admission.freed().notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Next::Idle => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                    }
                }
            }
            let turn = self.claiming.lock().await;
            let free = in_flight.available_permits().min(self.config.batch_size as usize);
            if free == 0 {
                drop(turn);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = in_flight.clone().acquire_owned() => drop(permit),
                }
                next = Next::Claim;
                continue;
            }
            let catalog = self.catalog.current();
            let (quotas, busy, rate_wait) = self.quotas(&catalog, free);
            if quotas.is_empty() {
                drop(turn);
                next = if busy { Next::WhenFreed(rate_wait) } else { Next::Idle };
                continue;
            }
            let started = Instant::now();
            let (claimed_at, lease) = (tokio::time::Instant::now(), self.lease());
            let claimed = match self.store.claim_endpoint_deliveries(Utc::now(), lease, free as u32, &quotas).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    drop(turn);
                    tracing::warn!(error = %e, "claiming deliveries failed");
                    tokio::time::sleep(self.config.poll_interval).await;
                    next = Next::Claim;
                    continue;
                }
            };
            metrics::histogram!("hookwarden_delivery_claim_seconds").record(started.elapsed().as_secs_f64());
            // Capped: some endpoint got all its cap, or had no slot: more may wait for it,
            // and a claim loop is woken when it frees a slot (see `Admission::want`).
            let mut capped = busy;
            for q in &quotas {
                let taken = claimed.iter().filter(|d| d.namespace == q.namespace && d.endpoint == q.endpoint).count();
                if taken >= q.cap as usize {
                    self.admission.want(&q.namespace, &q.endpoint);
                    capped = true;
                }
            }
            next = if claimed.len() >= free {
                Next::Claim
            } else if capped {
                Next::WhenFreed(rate_wait)
            } else {
                Next::Idle
            };
            let mut give_back = Vec::new();
            for delivery in claimed {
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                // The catalog may have changed since the quotas were computed.
                match catalog.endpoint(&delivery.namespace, &delivery.endpoint) {
                    Some(ep) if ep.spec.paused => give_back.push((delivery, GiveBack::Paused)),
                    // Not attempted, no attempt used: it waits until the endpoint can be sent to.
                    Some(ep) if ep.blocked.is_some() => give_back.push((delivery, GiveBack::Blocked)),
                    Some(ep) => match self.admission.admit(
                        &ep.namespace,
                        &ep.name,
                        ep.budget.breaker.map(|b| b.0),
                        ep.spec.agent,
                    ) {
                        Some(slot) => {
                            // Its request must start early enough to end within the lease.
                            let send_by = claimed_at + lease.saturating_sub(ep.timeout + self.config.lease_margin / 2);
                            let d = self.clone();
                            attempts.spawn(async move { d.attempt(delivery, ep, slot, permit, send_by).await });
                        }
                        // Busy (or probing) after all: it keeps its place and waits for a slot.
                        None => give_back.push((delivery, GiveBack::Busy)),
                    },
                    None => {
                        tracing::warn!(delivery_id = %delivery.id, endpoint = %delivery.endpoint, "endpoint no longer exists; delivery failed");
                        let completion =
                            self.refuse(&delivery, DeliveryState::Failed, "failed", "the endpoint no longer exists");
                        let _ = self.completions.send(completion).await;
                    }
                }
            }
            // One release per due time, not per delivery; before the next claim, so that
            // it finds them in their places.
            let mut by_time: BTreeMap<chrono::DateTime<Utc>, Vec<(&DeliveryId, &str)>> = BTreeMap::new();
            for (delivery, why) in &give_back {
                metrics::counter!("hookwarden_delivery_given_back_total", "reason" => why.label()).increment(1);
                by_time.entry(why.due_again(delivery)).or_default().push((&delivery.id, delivery.lease_token.as_str()));
            }
            for (at, claims) in by_time {
                if let Err(e) = self.store.release_deliveries(&claims, at).await {
                    tracing::warn!(error = %e, count = claims.len(), "could not give deliveries back; their leases will expire");
                }
            }
            self.resume_if_sendable_meanwhile(&catalog, &give_back).await;
            drop(turn);
        }
    }

    /// Every few seconds, learns which endpoints not in the catalog have waiting deliveries.
    async fn find_deleted_endpoints(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(DELETED_SCAN) => {}
            }
            let Ok(waiting) = self.store.waiting_by_endpoint().await else { continue };
            let catalog = self.catalog.current();
            let deleted: Vec<(String, String)> = waiting
                .into_iter()
                .filter(|(namespace, name, _, _)| catalog.endpoint(namespace, name).is_none())
                .map(|(namespace, name, _, _)| (namespace, name))
                .collect();
            let found = !deleted.is_empty();
            *self.deleted.lock().unwrap_or_else(|p| p.into_inner()) = deleted;
            if found {
                self.wake.notify_one();
            }
        }
    }

    /// Deliveries given back to wait (paused or blocked endpoints) by the catalog this
    /// claim looked at: when a newer catalog can send to their endpoint, whoever installed
    /// it may have resumed the endpoint before they were given back, so resume it again.
    async fn resume_if_sendable_meanwhile(&self, looked_at: &Arc<Catalog>, given_back: &[(ClaimedDelivery, GiveBack)]) {
        let current = self.catalog.current();
        if Arc::ptr_eq(looked_at, &current) {
            return;
        }
        let mut endpoints: Vec<(&str, &str)> = given_back
            .iter()
            .filter(|(_, why)| *why != GiveBack::Busy)
            .map(|(d, _)| (d.namespace.as_str(), d.endpoint.as_str()))
            .collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        for (namespace, name) in endpoints {
            let sendable = current.endpoint(namespace, name).is_some_and(|e| !e.spec.paused && e.blocked.is_none());
            if sendable {
                if let Err(e) = self.store.resume_endpoint(namespace, name).await {
                    tracing::warn!(error = %e, endpoint = %name, %namespace, "could not resume an endpoint's deliveries");
                }
                self.wake.notify_one();
            }
        }
    }
}
