//! Admission: whether one more attempt may start at an endpoint now — its concurrency
//! slots, its rate limit, its hourly retry budget and the breaker's half-open probe.
//!
//! Pure but for a lock: every decision takes `now`, so tests drive time. Counts are kept
//! per process. Invariants:
//! - an admitted attempt holds a [`Slot`]; dropping it frees the concurrency slot and, if
//!   it was the half-open probe, the probe — on every path (the policy gate holding or
//!   denying, a gate failure, shutdown, a panic), not only when an outcome is observed;
//! - while an endpoint is half-open (failures reached the breaker's threshold and its
//!   open period is over, or it would not have been claimed), one probe at a time.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Per-endpoint admission for one process.
pub struct Admission {
    per_endpoint: usize,
    endpoints: Mutex<HashMap<EndpointKey, Arc<Mutex<Limits>>>>,
}

/// `(namespace, name)`.
type EndpointKey = (String, String);

#[derive(Default)]
struct Limits {
    in_flight: usize,
    /// Consecutive failed attempts this process saw.
    failing: u32,
    /// A half-open probe is in flight: nothing else goes out until it ends.
    probing: bool,
    /// Start times of recent requests, for `rateLimit.perSecond`.
    recent: VecDeque<Instant>,
    /// Times of recent retries, for `retriesPerHour`.
    retries: VecDeque<Instant>,
}

fn lock(limits: &Mutex<Limits>) -> MutexGuard<'_, Limits> {
    limits.lock().unwrap_or_else(|p| p.into_inner())
}

/// One admitted attempt. Dropping it ends the attempt for admission.
pub struct Slot {
    limits: Arc<Mutex<Limits>>,
    probe: bool,
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

impl Drop for Slot {
    fn drop(&mut self) {
        let mut limits = lock(&self.limits);
        limits.in_flight = limits.in_flight.saturating_sub(1);
        if self.probe {
            limits.probing = false;
        }
    }
}

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

impl Admission {
    /// At most `per_endpoint` attempts in flight per endpoint.
    pub fn new(per_endpoint: usize) -> Admission {
        Admission { per_endpoint: per_endpoint.max(1), endpoints: Mutex::new(HashMap::new()) }
    }

    fn limits(&self, namespace: &str, name: &str) -> Arc<Mutex<Limits>> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints.entry((namespace.to_owned(), name.to_owned())).or_default().clone()
    }

    /// A slot for one attempt, or `None` when the endpoint is at its concurrency limit or
    /// half-open with its probe in flight. `breaker_threshold` is the breaker's
    /// `consecutiveFailures` (none: no breaker).
    pub fn admit(&self, namespace: &str, name: &str, breaker_threshold: Option<u32>) -> Option<Slot> {
        let limits = self.limits(namespace, name);
        let mut state = lock(&limits);
        if state.in_flight >= self.per_endpoint {
            return None;
        }
        let half_open = breaker_threshold.is_some_and(|threshold| state.failing >= threshold);
        if half_open {
            if state.probing {
                return None;
            }
            state.probing = true;
        }
        state.in_flight += 1;
        drop(state);
        Some(Slot { limits, probe: half_open })
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

    /// Counts a retry at `now`; false when `per_hour` retries were made in the last hour.
    pub fn spend_retry(&self, namespace: &str, name: &str, per_hour: u32, now: Instant) -> bool {
        let limits = self.limits(namespace, name);
        let mut state = lock(&limits);
        while state.retries.front().is_some_and(|t| now.saturating_duration_since(*t) >= HOUR) {
            state.retries.pop_front();
        }
        if state.retries.len() >= per_hour as usize {
            return false;
        }
        state.retries.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_is_limited_per_endpoint_and_freed_by_dropping_the_slot() {
        let admission = Admission::new(2);
        let a = admission.admit("ns", "a", None).unwrap();
        let _b = admission.admit("ns", "a", None).unwrap();
        assert!(admission.admit("ns", "a", None).is_none(), "a is full");
        assert!(admission.admit("ns", "other", None).is_some(), "other endpoints are unaffected");
        drop(a);
        assert!(admission.admit("ns", "a", None).is_some());
    }

    #[test]
    fn a_half_open_endpoint_lets_one_probe_through_at_a_time() {
        let admission = Admission::new(10);
        for _ in 0..3 {
            admission.admit("ns", "e", Some(3)).unwrap().observe(false);
        }
        let probe = admission.admit("ns", "e", Some(3)).unwrap();
        assert!(probe.is_probe());
        assert!(admission.admit("ns", "e", Some(3)).is_none(), "one probe at a time");
        probe.observe(true);
        drop(probe);
        let next = admission.admit("ns", "e", Some(3)).unwrap();
        assert!(!next.is_probe(), "the probe succeeded: closed again");
    }

    #[test]
    fn the_probe_is_released_when_its_attempt_ends_without_an_outcome() {
        let admission = Admission::new(10);
        admission.admit("ns", "e", Some(1)).unwrap().observe(false);
        // The gate held, denied or failed, or the process shut down: no outcome observed.
        let probe = admission.admit("ns", "e", Some(1)).unwrap();
        assert!(probe.is_probe());
        drop(probe);
        let again = admission.admit("ns", "e", Some(1)).expect("the next delivery may probe");
        assert!(again.is_probe(), "still half-open: nothing was learnt");
        // A failed probe keeps it half-open for the next one.
        again.observe(false);
        drop(again);
        assert!(admission.admit("ns", "e", Some(1)).unwrap().is_probe());
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
    fn the_retry_budget_allows_so_many_retries_per_rolling_hour() {
        let admission = Admission::new(10);
        let t0 = Instant::now();
        assert!(admission.spend_retry("ns", "e", 2, t0));
        assert!(admission.spend_retry("ns", "e", 2, t0 + Duration::from_secs(10)));
        assert!(!admission.spend_retry("ns", "e", 2, t0 + Duration::from_secs(20)));
        assert!(admission.spend_retry("ns", "e", 2, t0 + HOUR), "the first retry is an hour old");
        assert!(!admission.spend_retry("ns", "e", 2, t0 + HOUR + Duration::from_secs(5)));
    }
}
