//! The dispatcher: claims due deliveries, sends them signed, and records the outcome.
//!
//! Claims are short transactions with a lease longer than the longest attempt; no
//! transaction is open during HTTP. Completions are written in batches by one writer task,
//! each guarded by its lease token. A slow or failing endpoint holds at most
//! `perEndpointConcurrency` attempts, and a claim takes no more of an endpoint's deliveries
//! than it has free slots in this process (none while its rate limit or its breaker says
//! no), one claim at a time per process, so a busy endpoint's backlog is neither read nor given back and healthy
//! endpoints keep flowing. A claim capped by a busy endpoint claims again when a slot
//! frees. On shutdown, claiming stops, attempts in flight get `shutdownGrace` to finish,
//! and whatever is left is released for another worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::collections::BTreeMap;

use super::admission::{Admission, Slot};
use super::outcome::{decide, AttemptResult};
use super::signing;
use crate::catalog::{Catalog, CatalogHandle, EndpointEntry, EventView};
use crate::config::{AuditedOutcomes, DeliveryConfig};
use crate::ids::DeliveryId;
use crate::policy::engine::{self, EndpointView as PolicyEndpoint, Outcome, PolicyDecision, PolicySet, SpendCheck};
use crate::policy::meter::Budget;
use crate::store::policy::{action_hash, AllowResult, NewApproval, SpendReservation};
use crate::store::{Attempt, ClaimedDelivery, Completion, DeliveryState, EndpointQuota, Store};

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
}

/// Shared by the claim loops and attempt tasks.
pub struct Dispatcher {
    store: Store,
    catalog: CatalogHandle,
    http: reqwest::Client,
    config: DeliveryConfig,
    allow_private: bool,
    audited: AuditedOutcomes,
    wake: Arc<Notify>,
    admission: Admission,
    completions: mpsc::Sender<Completion>,
    /// Cancelled when the shutdown grace is over: attempts still running give their
    /// delivery back instead of finishing.
    stop_attempts: CancellationToken,
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
        let DispatchSettings { delivery: config, allow_private, audited, status_changed } = settings;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("Hookwarden/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(super::guard::GuardedResolver { allow_private }))
            .build()?;
        let (completions, pending) = mpsc::channel(8192);
        let stop_attempts = CancellationToken::new();
        let dispatcher = Arc::new(Dispatcher {
            store: store.clone(),
            catalog,
            http,
            config: config.clone(),
            allow_private,
            audited,
            wake,
            admission: Admission::new(config.per_endpoint_concurrency),
            completions,
            stop_attempts: stop_attempts.clone(),
            claiming: tokio::sync::Mutex::new(()),
            deleted: std::sync::Mutex::new(Vec::new()),
        });
        tracker.spawn(write_completions(store.clone(), pending, dispatcher.wake.clone(), status_changed));
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
            let free = self.admission.free_slots(&ep.namespace, &ep.name, threshold, per_second, now);
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
            let claimed =
                match self.store.claim_endpoint_deliveries(Utc::now(), self.lease(), free as u32, &quotas).await {
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
            // Capped: some endpoint got all its cap, or had no slot: more may wait for it.
            let capped = busy
                || quotas.iter().any(|q| {
                    claimed.iter().filter(|d| d.namespace == q.namespace && d.endpoint == q.endpoint).count()
                        >= q.cap as usize
                });
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
                    Some(ep) => match self.admission.admit(&ep.namespace, &ep.name, ep.budget.breaker.map(|b| b.0)) {
                        Some(slot) => {
                            let d = self.clone();
                            attempts.spawn(async move { d.attempt(delivery, ep, slot, permit).await });
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

    /// Whether `ep`'s hourly retry budget grants one more retry, counted for all processes
    /// in the database. When the database cannot say, the retry is granted: a lost count
    /// may let one retry too many, where a refusal would end the delivery for good.
    async fn retry_granted(&self, ep: &EndpointEntry, per_hour: u32) -> bool {
        match self.store.take_retry(&ep.namespace, &ep.name, per_hour, Utc::now()).await {
            Ok(granted) => granted,
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %ep.name, namespace = %ep.namespace, "could not count a retry against the hourly budget; granting it");
                true
            }
        }
    }

    /// Waits until `ep`'s rate limit allows one more request.
    async fn pace(&self, ep: &EndpointEntry) {
        let Some(rate) = ep.spec.rate_limit.as_ref().map(|r| r.per_second) else { return };
        while let Some(wait) = self.admission.pace(&ep.namespace, &ep.name, rate, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Ends a delivery without sending it.
    fn refuse(&self, delivery: &ClaimedDelivery, state: DeliveryState, outcome: &str, reason: &str) -> Completion {
        let now = Utc::now();
        tracing::info!(
            event_id = %delivery.event_id,
            delivery_id = %delivery.id,
            endpoint = %delivery.endpoint,
            namespace = %delivery.namespace,
            state = state.as_str(),
            trace_id = %delivery.trace_id,
            reason,
            "delivery not sent"
        );
        Completion {
            id: delivery.id.clone(),
            lease_token: delivery.lease_token.clone(),
            namespace: delivery.namespace.clone(),
            endpoint: delivery.endpoint.clone(),
            state,
            next_attempt_at: now,
            attempt: Attempt {
                attempt: delivery.attempt,
                started_at: now,
                duration_ms: 0,
                status: None,
                response: None,
                error: Some(reason.to_owned()),
                outcome: outcome.to_owned(),
            },
            // Not the endpoint's doing: its health and breaker are untouched.
            success: None,
            breaker: None,
            disable: None,
            decision: None,
            // An agent delivery may hold a reservation from an earlier allow.
            settle_spend: true,
            ordered: delivery.ordered,
            audit_outcome: true,
        }
    }

    async fn attempt(
        self: Arc<Self>,
        delivery: ClaimedDelivery,
        ep: Arc<EndpointEntry>,
        slot: Slot,
        _permit: OwnedSemaphorePermit,
    ) {
        let stop = self.stop_attempts.clone();
        if ep.spec.agent && !self.gate(&delivery, &ep).await {
            return;
        }
        self.pace(&ep).await;
        let started_at = Utc::now();
        let clock = Instant::now();
        let sent = tokio::select! {
            sent = self.send(&delivery, &ep) => sent,
            _ = stop.cancelled() => {
                let _ = self.store.release_deliveries(&[(&delivery.id, delivery.lease_token.as_str())], delivery.due_at).await;
                return;
            }
        };
        let duration_ms = clock.elapsed().as_millis() as i64;
        let (result, response) = sent;
        let now = Utc::now();
        let counted = delivery.attempt.saturating_sub(delivery.attempt_base).max(1);
        let random: f64 = rand::random();
        let mut decision = decide(&result, counted, &ep.budget, delivery.received_at, now, random, false);
        if decision.state == crate::store::DeliveryState::Retrying {
            if let Some(per_hour) = ep.budget.retries_per_hour {
                if !self.retry_granted(&ep, per_hour).await {
                    decision = decide(&result, counted, &ep.budget, delivery.received_at, now, random, true);
                }
            }
        }
        let status = match &result {
            AttemptResult::Response { status, .. } => Some(*status),
            _ => None,
        };
        tracing::info!(
            event_id = %delivery.event_id,
            delivery_id = %delivery.id,
            endpoint = %delivery.endpoint,
            namespace = %delivery.namespace,
            attempt = delivery.attempt,
            outcome = decision.outcome,
            state = decision.state.as_str(),
            status,
            duration_ms,
            trace_id = %delivery.trace_id,
            reason = decision.reason.as_deref().unwrap_or(""),
            "delivery attempt"
        );
        slot.observe(decision.success);
        metrics::counter!("hookwarden_delivery_attempts_total", "outcome" => decision.outcome).increment(1);
        metrics::histogram!("hookwarden_delivery_attempt_seconds", "outcome" => decision.outcome)
            .record(duration_ms as f64 / 1000.0);
        if decision.state == crate::store::DeliveryState::Dead {
            metrics::counter!("hookwarden_delivery_dead_letters_total").increment(1);
        }
        if decision.state == crate::store::DeliveryState::Retrying {
            metrics::counter!("hookwarden_delivery_retries_total").increment(1);
        }
        let breaker = ep.budget.breaker.map(|(failures, open_for)| {
            (failures, now + chrono::Duration::from_std(open_for).unwrap_or(chrono::Duration::MAX))
        });
        let completion = Completion {
            id: delivery.id.clone(),
            lease_token: delivery.lease_token.clone(),
            namespace: delivery.namespace.clone(),
            endpoint: delivery.endpoint.clone(),
            state: decision.state,
            next_attempt_at: decision.next_attempt_at,
            attempt: Attempt {
                attempt: delivery.attempt,
                started_at,
                duration_ms,
                status,
                response,
                error: if decision.success { None } else { decision.reason.clone() },
                outcome: decision.outcome.into(),
            },
            success: Some(decision.success),
            breaker,
            disable: decision.disable.then(|| ("the receiver answered 410 Gone".to_owned(), ep.generation)),
            decision: None,
            settle_spend: ep.spec.agent,
            ordered: delivery.ordered,
            audit_outcome: ep.spec.agent || self.audited == AuditedOutcomes::All,
        };
        if self.completions.send(completion).await.is_err() {
            tracing::warn!(delivery_id = %delivery.id, "completion writer stopped; the lease will expire and the delivery be retried");
        }
    }

    /// The policy gate for an agent endpoint: true when the delivery may be sent (the
    /// decision and its spend reservation are then committed); otherwise the delivery was
    /// denied or held here.
    async fn gate(&self, delivery: &ClaimedDelivery, ep: &EndpointEntry) -> bool {
        let catalog = self.catalog.current();
        let (policy, budget) = (catalog.policy(&delivery.namespace), catalog.budget);
        drop(catalog);
        let time = delivery.event_time.map(|t| t.to_rfc3339());
        let event = Arc::new(
            EventView {
                id: delivery.event_id.as_str(),
                namespace: &delivery.namespace,
                source: &delivery.source,
                event_type: &delivery.event_type,
                subject: delivery.subject.as_deref(),
                time,
                data: &delivery.data,
            }
            .to_json(),
        );
        let decide = |totals: BTreeMap<(String, String, String), i64>, now| {
            self.decide(policy.clone(), event.clone(), ep, totals, now, budget)
        };
        for _ in 0..3 {
            let now = Utc::now();
            // First learn which spend windows the rules look at, then read them.
            let probe = match decide(BTreeMap::new(), now).await {
                Ok(probe) => probe,
                Err(e) => return self.gate_failed(delivery, e).await,
            };
            let keys: Vec<(String, String, String, Duration)> = probe
                .rules
                .iter()
                .filter_map(|r| r.spend.as_ref())
                .map(|s| (s.rule.clone(), s.key.clone(), s.currency.clone(), s.window))
                .collect();
            // Without spend windows the probe already is the decision.
            let decision = if keys.is_empty() {
                probe
            } else {
                let totals = match self.store.spend_totals(&delivery.namespace, &keys, Some(&delivery.id), now).await {
                    Ok(totals) => totals,
                    Err(e) => return self.gate_failed(delivery, e).await,
                };
                match decide(totals, now).await {
                    Ok(decision) => decision,
                    Err(e) => return self.gate_failed(delivery, e).await,
                }
            };
            let recorded = serde_json::to_string(&decision).unwrap_or_default();
            if delivery.approved {
                count_decision("allow", "(approved)");
                // Granted by approvers: sent without a new decision; its spend counts.
                let reservations =
                    reservations(decision.rules.iter().filter(|r| !r.shadow).filter_map(|r| r.spend.as_ref()));
                let granted =
                    format!(r#"{{"outcome":"allow","reason":"granted by approvers","evaluated":{recorded}}}"#);
                return match self
                    .store
                    .allow_delivery(
                        &delivery.id,
                        &delivery.lease_token,
                        &delivery.namespace,
                        &granted,
                        &reservations,
                        false,
                        now,
                    )
                    .await
                {
                    Ok(AllowResult::Reserved) => {
                        count_spend(delivery, &reservations);
                        true
                    }
                    Ok(_) => false,
                    Err(e) => self.gate_failed(delivery, e).await,
                };
            }
            count_decision(outcome_name(decision.outcome), decision.rule.as_deref().unwrap_or("(default)"));
            tracing::info!(
                event_id = %delivery.event_id,
                delivery_id = %delivery.id,
                endpoint = %delivery.endpoint,
                outcome = outcome_name(decision.outcome),
                rule = decision.rule.as_deref().unwrap_or(""),
                reason = %decision.reason,
                revision = %decision.revision,
                trace_id = %delivery.trace_id,
                "policy decision"
            );
            match decision.outcome {
                Outcome::Allow => {
                    let reservations = reservations(decision.spend.iter());
                    match self
                        .store
                        .allow_delivery(
                            &delivery.id,
                            &delivery.lease_token,
                            &delivery.namespace,
                            &recorded,
                            &reservations,
                            true,
                            now,
                        )
                        .await
                    {
                        Ok(AllowResult::Reserved) => {
                            count_spend(delivery, &reservations);
                            return true;
                        }
                        Ok(AllowResult::LeaseLost) => return false,
                        // Another delivery took the budget meanwhile: decide again.
                        Ok(AllowResult::OverLimit(_)) => continue,
                        Err(e) => return self.gate_failed(delivery, e).await,
                    }
                }
                Outcome::Deny => {
                    let mut completion = self.refuse(delivery, DeliveryState::Denied, "denied", &decision.reason);
                    completion.decision = Some(recorded);
                    let _ = self.completions.send(completion).await;
                    return false;
                }
                Outcome::Hold => {
                    let approval = decision
                        .approval
                        .clone()
                        .unwrap_or_else(|| serde_json::from_value(serde_json::json!({})).expect("defaults"));
                    let amounts: Vec<(String, i64)> = decision
                        .rules
                        .iter()
                        .filter_map(|r| r.spend.as_ref())
                        .map(|s| (s.currency.clone(), s.amount))
                        .collect();
                    let request = NewApproval {
                        id: format!("apr_{}", ulid::Ulid::new()),
                        namespace: delivery.namespace.clone(),
                        event_id: delivery.event_id.to_string(),
                        endpoint: delivery.endpoint.clone(),
                        rule: decision.rule.clone(),
                        reason: decision.reason.clone(),
                        action_hash: action_hash(&event, &delivery.namespace, &delivery.endpoint, &amounts),
                        role: approval.role.clone(),
                        quorum: approval.quorum,
                        on_expiry: match approval.on_expiry {
                            crate::resources::kinds::ExpiryOutcome::Allow => "allow".into(),
                            crate::resources::kinds::ExpiryOutcome::Deny => "deny".into(),
                        },
                        expires_at: now
                            + chrono::Duration::from_std(approval.expires_after.0).unwrap_or(chrono::Duration::MAX),
                        requested_by: delivery.ingested_by.clone(),
                    };
                    match self.store.hold_delivery(&delivery.id, &delivery.lease_token, &recorded, &request, now).await
                    {
                        Ok(_) => metrics::counter!("hookwarden_policy_holds_total").increment(1),
                        Err(e) => {
                            self.gate_failed(delivery, e).await;
                        }
                    }
                    return false;
                }
            }
        }
        count_decision("deny", "(spend contention)");
        let mut completion =
            self.refuse(delivery, DeliveryState::Denied, "denied", "the spend budget kept changing while deciding");
        completion.decision = Some(r#"{"outcome":"deny","reason":"spend budget contention"}"#.into());
        let _ = self.completions.send(completion).await;
        false
    }

    /// The gate could not decide (database trouble): give the delivery back for later.
    /// The policy decision for `ep`, made on an evaluation thread when it runs CEL (see
    /// [`CatalogHandle::evaluate`]).
    async fn decide(
        &self,
        policy: Arc<PolicySet>,
        event: Arc<serde_json::Value>,
        ep: &EndpointEntry,
        totals: BTreeMap<(String, String, String), i64>,
        now: chrono::DateTime<Utc>,
        budget: Budget,
    ) -> Result<PolicyDecision, crate::threads::JobFailed> {
        let endpoint = PolicyEndpoint { namespace: &ep.namespace, name: &ep.name, labels: &ep.labels };
        if !policy.evaluates_cel(endpoint) {
            return Ok(engine::decide(&policy, &event, endpoint, &totals, now, budget));
        }
        let (namespace, name, labels) = (ep.namespace.clone(), ep.name.clone(), ep.labels.clone());
        self.catalog
            .evaluate(move || {
                let endpoint = PolicyEndpoint { namespace: &namespace, name: &name, labels: &labels };
                engine::decide(&policy, &event, endpoint, &totals, now, budget)
            })
            .await
    }

    async fn gate_failed(&self, delivery: &ClaimedDelivery, error: impl std::fmt::Display) -> bool {
        tracing::warn!(delivery_id = %delivery.id, error = %error, "policy gate could not decide; retrying later");
        let later = Utc::now() + chrono::Duration::seconds(1);
        let _ = self.store.release_deliveries(&[(&delivery.id, delivery.lease_token.as_str())], later).await;
        false
    }

    /// One HTTP request: `(result, first bytes of the response)`.
    async fn send(&self, delivery: &ClaimedDelivery, ep: &EndpointEntry) -> (AttemptResult, Option<String>) {
        if !self.allow_private {
            if let Ok(url) = reqwest::Url::parse(&ep.spec.url) {
                if let Some(host) = url.host() {
                    if super::guard::is_private_host(&host) {
                        return (
                            AttemptResult::Transport("the endpoint's address is private or loopback".into()),
                            None,
                        );
                    }
                }
            }
        }
        let timestamp = delivery.event_time.unwrap_or(delivery.received_at);
        let body = signing::body(
            &delivery.event_type,
            &timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            &delivery.data,
        );
        let now = Utc::now().timestamp();
        let signature = signing::sign(delivery.event_id.as_str(), now, body.as_bytes(), &ep.secrets);
        let span: [u8; 8] = rand::random();
        let mut request = self
            .http
            .post(&ep.spec.url)
            .timeout(ep.timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &signature.id)
            .header("webhook-timestamp", signature.timestamp.to_string())
            .header("webhook-signature", &signature.signature)
            .header("traceparent", format!("00-{}-{}-01", delivery.trace_id, hex::encode(span)));
        for (name, value) in &ep.spec.headers {
            request = request.header(name, value);
        }
        let response = match tokio::time::timeout(ep.timeout, request.body(body).send()).await {
            Err(_) => return (AttemptResult::Timeout, None),
            Ok(Err(e)) if e.is_timeout() => return (AttemptResult::Timeout, None),
            Ok(Err(e)) => return (AttemptResult::Transport(transport_error(e)), None),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let snippet = read_prefix(response, self.config.response_bytes).await;
        (AttemptResult::Response { status, retry_after }, snippet)
    }
}

/// The error chain of a failed request, without the URL's query.
fn transport_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// At most `limit` bytes of the body, as text every store can hold: bytes that are not
/// UTF-8, and NUL characters (which PostgreSQL's `text` refuses, failing the whole batch
/// of completions), read as U+FFFD.
async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Option<String> {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match tokio::time::timeout(Duration::from_secs(2), response.chunk()).await {
            Ok(Ok(Some(chunk))) => bytes.extend_from_slice(&chunk[..chunk.len().min(limit - bytes.len())]),
            _ => break,
        }
    }
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(&bytes).replace('\0', "\u{fffd}"))
}

/// Writes completions in batches until every sender is gone. A batch that ends a delivery
/// of an ordered lane makes the lane's next delivery claimable, so it wakes a claim loop;
/// one that opened a breaker or disabled an endpoint signals `status_changed`.
async fn write_completions(
    store: Store,
    mut pending: mpsc::Receiver<Completion>,
    wake: Arc<Notify>,
    status_changed: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(256);
    while pending.recv_many(&mut batch, 256).await > 0 {
        let unblocks = batch.iter().any(|c| c.ordered && c.state.is_final());
        for attempt in 0..5u32 {
            match store.complete_attempts(&batch).await {
                Ok(report) => {
                    if report.lost > 0 {
                        tracing::warn!(
                            lost = report.lost,
                            "attempt results dropped: their lease had expired and another worker owns them"
                        );
                    }
                    for spend in &report.committed_spend {
                        metrics::counter!("hookwarden_policy_spend_committed_total", "namespace" => spend.namespace.clone(),
                            "agent" => spend.endpoint.clone(), "currency" => spend.currency.clone())
                        .increment(spend.amount.max(0) as u64);
                    }
                    if report.endpoints_changed {
                        status_changed.notify_one();
                        let _ = store.notify_status().await;
                    }
                    break;
                }
                Err(e) if attempt < 4 => {
                    tracing::warn!(error = %e, "writing attempt results failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, count = batch.len(), "attempt results lost; their leases will expire and they will be retried")
                }
            }
        }
        batch.clear();
        if unblocks {
            wake.notify_one();
        }
    }
}

/// Periodically makes deliveries of crashed workers claimable again, and parks deliveries
/// that reached an endpoint after its breaker opened or it was disabled.
async fn tend_queue(store: Store, margin: Duration, shutdown: CancellationToken) {
    let period = (margin / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        match store.release_expired_leases(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(released = n, "released deliveries whose lease expired"),
            Err(e) => tracing::warn!(error = %e, "could not release expired leases"),
        }
        match store.park_blocked_deliveries(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(parked = n, "deliveries wait for their endpoint to be sendable again"),
            Err(e) => tracing::warn!(error = %e, "could not park deliveries of blocked endpoints"),
        }
    }
}

/// Policy decisions by outcome and deciding rule (rule names come from resources).
fn count_decision(outcome: &'static str, rule: &str) {
    metrics::counter!("hookwarden_policy_decisions_total", "outcome" => outcome, "rule" => rule.to_owned())
        .increment(1);
}

/// Spend reserved per agent endpoint and currency, in minor units: every reservation an
/// allow made, so a delivery allowed again after a retry counts again. What the ledger
/// committed is `hookwarden_policy_spend_committed_total`.
fn count_spend(delivery: &ClaimedDelivery, reservations: &[SpendReservation]) {
    for r in reservations {
        metrics::counter!("hookwarden_policy_spend_reserved_total", "namespace" => delivery.namespace.clone(),
            "agent" => delivery.endpoint.clone(), "currency" => r.currency.clone())
        .increment(r.amount.max(0) as u64);
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Hold => "hold",
        Outcome::Deny => "deny",
    }
}

fn reservations<'a>(checks: impl Iterator<Item = &'a SpendCheck>) -> Vec<SpendReservation> {
    checks
        .map(|s| SpendReservation {
            rule: s.rule.clone(),
            key: s.key.clone(),
            currency: s.currency.clone(),
            amount: s.amount,
            limit: s.limit,
            window: s.window,
        })
        .collect()
}
