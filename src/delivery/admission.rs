//! Admission: whether one more attempt may start at an endpoint now — its concurrency
//! slots, its rate limit and the breaker's half-open probe — and how many a claim may
//! take of its deliveries ([`Admission::free_slots`]).
//!
//! Pure but for a lock: every decision takes `now`, so tests drive time. Counts are kept
//! per process; what must hold across processes (the half-open probe, the hourly retry
//! budget) is kept in the database as well (see `store::claims`). Invariants:
//! - an admitted attempt holds a [`Slot`]; dropping it frees the concurrency slot and, if
//!   it was the half-open probe, the probe — on every path (the policy gate holding or
//!   denying, a gate failure, shutdown, a panic), not only when an outcome is observed;
//! - while an endpoint is half-open (failures reached the breaker's threshold and its
//!   open period is over, or it would not have been claimed), one probe at a time;
//! - at most `per_endpoint` requests are in flight to an endpoint; a gated endpoint's
//!   (agent's) deliveries are admitted to be decided first ([`Slot`] in its deciding
//!   phase, at most [`DECIDING_PER_SLOT`] × `per_endpoint` of them, and none while every
//!   request slot is taken),
//!   so that waiting for the policy decision to commit takes none of the endpoint's
//!   request slots, and take a request slot only to send ([`Slot::until_sending`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Per-endpoint admission for one process.
pub struct Admission {
    per_endpoint: usize,
    endpoints: Mutex<HashMap<EndpointKey, Arc<Mutex<Limits>>>>,
    /// Signalled when a slot of an endpoint that capped a claim is freed: that claim may
    /// take more.
    freed: Arc<Notify>,
}

/// What a claim may take of one endpoint's deliveries now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Free {
    /// Attempts that may start: free slots, at most what the rate limit lets start now.
    pub slots: usize,
    /// When `slots` is 0 because of the rate limit: how long until it allows one more.
    pub rate_wait: Option<Duration>,
}

/// `(namespace, name)`.
type EndpointKey = (String, String);

#[derive(Default)]
struct Limits {
    /// Requests in flight (slots in their sending phase).
    in_flight: usize,
    /// Deliveries of a gated endpoint admitted to be decided, not yet sending.
    deciding: usize,
    /// Signalled when a request slot frees, for deliveries waiting to send.
    sendable: Arc<Notify>,
    /// Consecutive failed attempts this process saw.
    failing: u32,
    /// A half-open probe is in flight: nothing else goes out until it ends.
    probing: bool,
    /// Start times of recent requests, for `rateLimit.perSecond`.
    recent: VecDeque<Instant>,
    /// A claim was capped by this endpoint's slots: the next slot it frees signals
    /// [`Admission::freed`]. Other endpoints' attempts ending wake no claim.
    wanted: bool,
}

fn lock(limits: &Mutex<Limits>) -> MutexGuard<'_, Limits> {
    limits.lock().unwrap_or_else(|p| p.into_inner())
}

/// One admitted attempt. Dropping it ends the attempt for admission.
pub struct Slot {
    limits: Arc<Mutex<Limits>>,
    probe: bool,
    /// Holds a request slot (else it is being decided).
    sending: bool,
    per_endpoint: usize,
    freed: Arc<Notify>,
}

impl Slot {
    /// Whether this attempt is the breaker's half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Learns the attempt's outcome: a success ends a run of failures (and closes the
    /// half-open breaker), a failure adds to it.
    pub fn observe(&self, success: bool) {
        let mut limits = lock(&self.limits);
        limits.failing = if success { 0 } else { limits.failing.saturating_add(1) };
    }
}

impl Slot {
    /// Takes a request slot for a delivery admitted to be decided, waiting until one is
    /// free; false (and still deciding) if none freed before `deadline`. A slot already
    /// sending returns at once.
    pub async fn until_sending(&mut self, deadline: tokio::time::Instant) -> bool {
        while !self.sending {
            let sendable = lock(&self.limits).sendable.clone();
            let freed = sendable.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut limits = lock(&self.limits);
                if limits.in_flight < self.per_endpoint {
                    limits.deciding = limits.deciding.saturating_sub(1);
                    limits.in_flight += 1;
                    self.sending = true;
                    break;
                }
            }
            tokio::select! {
                _ = &mut freed => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut limits = lock(&self.limits);
        if self.sending {
            limits.in_flight = limits.in_flight.saturating_sub(1);
            limits.sendable.notify_waiters();
        } else {
            limits.deciding = limits.deciding.saturating_sub(1);
        }
        if self.probe {
            limits.probing = false;
        }
        let wanted = std::mem::take(&mut limits.wanted);
        drop(limits);
        if wanted {
            self.freed.notify_one();
        }
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// A gated endpoint's deliveries being decided, per request slot: decisions commit in
/// batches, so while one batch commits the next gathers; with only a request slot's
/// worth deciding, the commit's latency would bound the endpoint's throughput.
pub const DECIDING_PER_SLOT: usize = 4;

impl Admission {
    /// At most `per_endpoint` attempts in flight per endpoint.
    pub fn new(per_endpoint: usize) -> Admission {
        Admission { per_endpoint: per_endpoint.max(1), endpoints: Mutex::new(HashMap::new()), freed: Arc::default() }
    }

    /// Signalled when a slot is freed (an attempt ended) at an endpoint that capped a claim:
    /// one [`Self::free_slots`] found without a slot, or one [`Self::want`] was called for.
    pub fn freed(&self) -> &Notify {
        &self.freed
    }

    /// A claim took all it could of the endpoint: the next slot it frees signals
    /// [`Self::freed`].
    pub fn want(&self, namespace: &str, name: &str) {
        lock(&self.limits(namespace, name)).wanted = true;
    }

    fn limits(&self, namespace: &str, name: &str) -> Arc<Mutex<Limits>> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints.entry((namespace.to_owned(), name.to_owned())).or_default().clone()
    }

    /// A slot for one attempt, or `None` when the endpoint is at its concurrency limit or
    /// half-open with its probe in flight. `breaker_threshold` is the breaker's
    /// `consecutiveFailures` (none: no breaker). A `gated` endpoint's slot starts in its
    /// deciding phase (at most [`DECIDING_PER_SLOT`] × `per_endpoint` deciding, none while
    /// every request slot is taken), and takes a request slot with [`Slot::until_sending`].
    pub fn admit(&self, namespace: &str, name: &str, breaker_threshold: Option<u32>, gated: bool) -> Option<Slot> {
        let limits = self.limits(namespace, name);
        let mut state = lock(&limits);
        if state.in_flight >= self.per_endpoint || (gated && state.deciding >= self.per_endpoint * DECIDING_PER_SLOT) {
            return None;
        }
        let half_open = breaker_threshold.is_some_and(|threshold| state.failing >= threshold);
        if half_open {
            if state.probing {
                return None;
            }
            state.probing = true;
        }
        if gated {
            state.deciding += 1;
        } else {
            state.in_flight += 1;
        }
        drop(state);
        Some(Slot {
            limits,
            probe: half_open,
            sending: !gated,
            per_endpoint: self.per_endpoint,
            freed: self.freed.clone(),
        })
    }

    /// How many attempts [`Self::admit`] would let start at the endpoint now: its free
    /// concurrency slots (a `gated` endpoint's: its free deciding slots); one while half-open with no probe out, none while the probe is
    /// out; at most what `per_second` lets start in the second before `now`.
    pub fn free_slots(
        &self,
        namespace: &str,
        name: &str,
        breaker_threshold: Option<u32>,
        per_second: Option<u32>,
        gated: bool,
        now: Instant,
    ) -> Free {
        let limits = self.limits(namespace, name);
        let mut state = lock(&limits);
        let mut slots = self.per_endpoint.saturating_sub(state.in_flight);
        if gated {
            slots = slots.min((self.per_endpoint * DECIDING_PER_SLOT).saturating_sub(state.deciding));
        }
        if breaker_threshold.is_some_and(|threshold| state.failing >= threshold) {
            slots = if state.probing { 0 } else { slots.min(1) };
        }
        if slots == 0 {
            state.wanted = true;
        }
        let mut rate_wait = None;
        if let Some(rate) = per_second {
            while state.recent.front().is_some_and(|t| now.saturating_duration_since(*t) >= SECOND) {
                state.recent.pop_front();
            }
            let left = (rate as usize).saturating_sub(state.recent.len());
            if left == 0 && slots > 0 {
                let oldest = state.recent.front().copied().unwrap_or(now);
                rate_wait =
                    Some(SECOND.saturating_sub(now.saturating_duration_since(oldest)).max(Duration::from_millis(1)));
            }
            slots = slots.min(left);
        }
        Free { slots, rate_wait }
    }

    /// Takes one request of `per_second` at `now`: `None` when it may go now (and it is
    /// counted), else how long to wait before asking again.
    pub fn pace(&self, namespace: &str, name: &str, per_second: u32, now: Instant) -> Option<Duration> {
        let limits = self.limits(namespace, name);
        let mut state = lock(&limits);
        while state.recent.front().is_some_and(|t| now.saturating_duration_since(*t) >= SECOND) {
            state.recent.pop_front();
        }
        if state.recent.len() < per_second as usize {
            state.recent.push_back(now);
            return None;
        }
        let oldest = state.recent[0];
        Some(SECOND.saturating_sub(now.saturating_duration_since(oldest)).max(Duration::from_millis(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_is_limited_per_endpoint_and_freed_by_dropping_the_slot() {
        let admission = Admission::new(2);
        let a = admission.admit("ns", "a", None, false).unwrap();
        let _b = admission.admit("ns", "a", None, false).unwrap();
        assert!(admission.admit("ns", "a", None, false).is_none(), "a is full");
        assert!(admission.admit("ns", "other", None, false).is_some(), "other endpoints are unaffected");
        drop(a);
        assert!(admission.admit("ns", "a", None, false).is_some());
    }

    #[tokio::test]
    async fn a_gated_endpoint_decides_without_taking_request_slots_and_sends_within_them() {
        let admission = Admission::new(2);
        let cap = 2 * DECIDING_PER_SLOT;
        let mut deciding: Vec<Slot> = (0..cap).map(|_| admission.admit("ns", "agent", None, true).unwrap()).collect();
        assert!(admission.admit("ns", "agent", None, true).is_none(), "so many deciding at most");
        assert_eq!(admission.free_slots("ns", "agent", None, None, true, Instant::now()).slots, 0);
        // Decided and given back (or denied, held): their deciding slots free.
        deciding.truncate(2);
        let soon = || tokio::time::Instant::now() + Duration::from_millis(20);
        for slot in &mut deciding {
            assert!(slot.until_sending(soon()).await, "request slots are free");
        }
        // Both send: while every request slot is taken, nothing more is decided.
        assert!(admission.admit("ns", "agent", None, true).is_none(), "request slots all taken");
        assert_eq!(admission.free_slots("ns", "agent", None, None, true, Instant::now()).slots, 0);
        let ended = deciding.pop().unwrap();
        drop(ended);
        // One request slot free: two may be decided (one sends at once, one waits for it).
        let mut next = admission.admit("ns", "agent", None, true).expect("a request slot is free");
        let mut other = admission.admit("ns", "agent", None, true).expect("deciding slots are free");
        assert!(other.until_sending(soon()).await);
        assert!(!next.until_sending(soon()).await, "no request slot before the deadline");
        let ended = deciding.pop().unwrap();
        let waiter = tokio::spawn(async move {
            let sent = next.until_sending(tokio::time::Instant::now() + Duration::from_secs(10)).await;
            (sent, next)
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(ended);
        let (sent, next) = waiter.await.unwrap();
        assert!(sent, "woken when a request slot freed");
        assert_eq!(admission.free_slots("ns", "agent", None, None, true, Instant::now()).slots, 0);
        drop(next);
        let free = admission.free_slots("ns", "agent", None, None, true, Instant::now()).slots;
        assert_eq!(free, 1, "one still sending");
        drop(other);
        assert_eq!(admission.free_slots("ns", "agent", None, None, true, Instant::now()).slots, 2);
    }

    #[test]
    fn a_half_open_endpoint_lets_one_probe_through_at_a_time() {
        let admission = Admission::new(10);
        for _ in 0..3 {
            admission.admit("ns", "e", Some(3), false).unwrap().observe(false);
        }
        let probe = admission.admit("ns", "e", Some(3), false).unwrap();
        assert!(probe.is_probe());
        assert!(admission.admit("ns", "e", Some(3), false).is_none(), "one probe at a time");
        probe.observe(true);
        drop(probe);
        let next = admission.admit("ns", "e", Some(3), false).unwrap();
        assert!(!next.is_probe(), "the probe succeeded: closed again");
    }

    #[test]
    fn the_probe_is_released_when_its_attempt_ends_without_an_outcome() {
        let admission = Admission::new(10);
        admission.admit("ns", "e", Some(1), false).unwrap().observe(false);
        // The gate held, denied or failed, or the process shut down: no outcome observed.
        let probe = admission.admit("ns", "e", Some(1), false).unwrap();
        assert!(probe.is_probe());
        drop(probe);
        let again = admission.admit("ns", "e", Some(1), false).expect("the next delivery may probe");
        assert!(again.is_probe(), "still half-open: nothing was learnt");
        // A failed probe keeps it half-open for the next one.
        again.observe(false);
        drop(again);
        assert!(admission.admit("ns", "e", Some(1), false).unwrap().is_probe());
    }

    #[test]
    fn the_rate_limit_counts_requests_in_the_last_second() {
        let admission = Admission::new(10);
        let t0 = Instant::now();
        assert_eq!(admission.pace("ns", "e", 2, t0), None);
        assert_eq!(admission.pace("ns", "e", 2, t0 + Duration::from_millis(100)), None);
        let wait = admission.pace("ns", "e", 2, t0 + Duration::from_millis(400)).unwrap();
        assert_eq!(wait, Duration::from_millis(600));
        assert_eq!(admission.pace("ns", "e", 2, t0 + Duration::from_millis(1000)), None, "the first one aged out");
    }

    #[test]
    fn free_slots_count_concurrency_the_probe_and_the_rate() {
        let admission = Admission::new(3);
        let t0 = Instant::now();
        assert_eq!(admission.free_slots("ns", "e", None, None, false, t0).slots, 3);
        let first = admission.admit("ns", "e", None, false).unwrap();
        assert_eq!(admission.free_slots("ns", "e", None, None, false, t0).slots, 2);
        // Rate: two requests started in the last second leave one of three.
        assert_eq!(admission.pace("ns", "e", 3, t0), None);
        assert_eq!(admission.pace("ns", "e", 3, t0), None);
        assert_eq!(admission.free_slots("ns", "e", None, Some(3), false, t0).slots, 1);
        assert_eq!(admission.pace("ns", "e", 3, t0), None);
        let full = admission.free_slots("ns", "e", None, Some(3), false, t0 + Duration::from_millis(400));
        assert_eq!(full, Free { slots: 0, rate_wait: Some(Duration::from_millis(600)) });
        assert_eq!(admission.free_slots("ns", "e", None, Some(3), false, t0 + SECOND).slots, 2, "the second passed");
        // Half-open: one probe, then none while it is out.
        first.observe(false);
        drop(first);
        assert_eq!(admission.free_slots("ns", "e", Some(1), None, false, t0).slots, 1);
        let probe = admission.admit("ns", "e", Some(1), false).unwrap();
        assert_eq!(admission.free_slots("ns", "e", Some(1), None, false, t0).slots, 0);
        drop(probe);
        assert_eq!(admission.free_slots("ns", "e", Some(1), None, false, t0).slots, 1);
    }

    /// An admission whose endpoint `e` is half-open (breaker threshold 1), with `probe`
    /// its half-open probe.
    fn half_open() -> (Admission, Slot) {
        let admission = Admission::new(10);
        admission.admit("ns", "e", Some(1), false).unwrap().observe(false);
        let probe = admission.admit("ns", "e", Some(1), false).unwrap();
        assert!(probe.is_probe());
        assert!(admission.admit("ns", "e", Some(1), false).is_none(), "one probe at a time");
        (admission, probe)
    }

    fn next_is_a_probe(admission: &Admission, path: &str) {
        let next = admission.admit("ns", "e", Some(1), false);
        assert!(next.is_some_and(|s| s.is_probe()), "after {path}, the next delivery may probe");
    }

    #[test]
    fn the_probe_is_released_on_every_path_that_ends_an_attempt_without_an_outcome() {
        // Admitted, then the attempt ended before any request: the gate held or denied it,
        // could not decide, or its lease was lost. The attempt returns, dropping its slot.
        for path in ["a hold", "a denial", "a gate failure", "a lost lease"] {
            let (admission, probe) = half_open();
            drop(probe);
            next_is_a_probe(&admission, path);
        }
        // Sent and failed: still half-open, the next delivery probes again.
        let (admission, probe) = half_open();
        probe.observe(false);
        drop(probe);
        next_is_a_probe(&admission, "a failed probe");
    }

    #[tokio::test]
    async fn the_probe_is_released_when_its_task_panics_or_is_cancelled() {
        let (admission, probe) = half_open();
        let panicked = tokio::spawn(async move {
            let _probe = probe;
            panic!("an attempt panicked");
        });
        assert!(panicked.await.unwrap_err().is_panic());
        next_is_a_probe(&admission, "a panic");
        // Cancelled at the end of the shutdown grace, in the middle of its request.
        let (admission, probe) = half_open();
        let running = tokio::spawn(async move {
            let _probe = probe;
            std::future::pending::<()>().await;
        });
        running.abort();
        assert!(running.await.unwrap_err().is_cancelled());
        next_is_a_probe(&admission, "a cancellation");
    }

    #[tokio::test]
    async fn dropping_a_slot_signals_that_one_is_free() {
        let admission = Admission::new(1);
        let slot = admission.admit("ns", "e", None, false).unwrap();
        assert_eq!(admission.free_slots("ns", "e", None, None, false, Instant::now()).slots, 0);
        drop(slot);
        let freed = tokio::time::timeout(Duration::from_secs(5), admission.freed().notified()).await;
        assert!(freed.is_ok(), "a claim capped by the busy endpoint is woken");
        assert_eq!(admission.free_slots("ns", "e", None, None, false, Instant::now()).slots, 1);
    }

    /// A claim capped by a busy endpoint is not woken by every other endpoint's attempts
    /// ending (beside a slow endpoint, that is every healthy attempt), only by the capped
    /// endpoint's, or by one the claim took its whole cap of.
    #[tokio::test]
    async fn only_an_endpoint_that_capped_a_claim_wakes_it() {
        let admission = Admission::new(1);
        let (slow, healthy) = (
            admission.admit("ns", "slow", None, false).unwrap(),
            admission.admit("ns", "healthy", None, false).unwrap(),
        );
        assert_eq!(admission.free_slots("ns", "slow", None, None, false, Instant::now()).slots, 0);
        let woken = || tokio::time::timeout(Duration::from_millis(50), admission.freed().notified());
        drop(healthy);
        assert!(woken().await.is_err(), "the healthy endpoint capped nothing");
        drop(slow);
        assert!(woken().await.is_ok(), "the capped endpoint freed a slot");
        // Once woken, the next slot it frees wakes nothing until a claim is capped again.
        drop(admission.admit("ns", "slow", None, false).unwrap());
        assert!(woken().await.is_err(), "no claim waits for it");
        let taken = admission.admit("ns", "healthy", None, false).unwrap();
        admission.want("ns", "healthy");
        drop(taken);
        assert!(woken().await.is_ok(), "a claim took all it could of the healthy endpoint");
    }

    #[test]
    fn failures_below_the_breaker_threshold_keep_every_slot() {
        let admission = Admission::new(3);
        for _ in 0..2 {
            admission.admit("ns", "e", Some(3), false).unwrap().observe(false);
        }
        let slots: Vec<Slot> = (0..3).map(|_| admission.admit("ns", "e", Some(3), false).unwrap()).collect();
        assert!(slots.iter().all(|s| !s.is_probe()), "two failures of three: closed");
        assert!(admission.admit("ns", "e", Some(3), false).is_none(), "and at its concurrency limit");
        // Without a breaker, failures never limit it to a probe.
        drop(slots);
        for _ in 0..5 {
            admission.admit("ns", "plain", None, false).unwrap().observe(false);
        }
        assert_eq!(admission.free_slots("ns", "plain", None, None, false, Instant::now()).slots, 3);
        // A success ends the run of failures.
        admission.admit("ns", "e", Some(3), false).unwrap().observe(true);
        admission.admit("ns", "e", Some(3), false).unwrap().observe(false);
        assert!(!admission.admit("ns", "e", Some(3), false).unwrap().is_probe());
    }

    #[test]
    fn rate_limits_are_per_endpoint_and_free_slots_do_not_count_a_request() {
        let admission = Admission::new(10);
        let t0 = Instant::now();
        assert_eq!(admission.pace("ns", "a", 1, t0), None);
        assert!(admission.pace("ns", "a", 1, t0).is_some(), "a's one request this second is taken");
        assert_eq!(admission.pace("ns", "b", 1, t0), None, "b has its own");
        assert_eq!(admission.pace("other", "a", 1, t0), None, "and so has a of another namespace");
        // Asking how many may start takes none of them.
        for _ in 0..3 {
            assert_eq!(admission.free_slots("ns", "c", None, Some(1), false, t0).slots, 1);
        }
        assert_eq!(admission.pace("ns", "c", 1, t0), None);
        let busy = admission.free_slots("ns", "c", None, Some(1), false, t0 + Duration::from_millis(250));
        assert_eq!(busy, Free { slots: 0, rate_wait: Some(Duration::from_millis(750)) });
        // With no slot free anyway, the rate does not say when to look again.
        let full = Admission::new(1);
        let _slot = full.admit("ns", "c", None, false).unwrap();
        assert_eq!(full.pace("ns", "c", 1, t0), None);
        assert_eq!(full.free_slots("ns", "c", None, Some(1), false, t0), Free { slots: 0, rate_wait: None });
    }
}
