//! What an attempt's result means: delivered, retry at some time, failed, or dead.
//! Pure: the same inputs give the same decision (randomness is passed in).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::retry::retry_after;
use crate::catalog::Budget;
use crate::store::DeliveryState;

/// What came back from one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// The receiver answered.
    Response { status: u16, retry_after: Option<String> },
    /// No answer within the endpoint's timeout.
    Timeout,
    /// No connection (refused, reset, DNS, TLS), or the address is not allowed.
    Transport(String),
}

/// The decision for a delivery after one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub state: DeliveryState,
    pub next_attempt_at: DateTime<Utc>,
    pub success: bool,
    /// The receiver answered 410 Gone: disable the endpoint.
    pub disable: bool,
    /// `delivered`, `retry`, `failed` or `dead`, as recorded on the attempt.
    pub outcome: &'static str,
    pub reason: Option<String>,
}

/// Decides after attempt `attempt` (counted from the last replay) of a delivery created at
/// `created_at`. `random` is uniform in `[0, 1)`; `retries_exhausted` says the endpoint's
/// hourly retry budget is spent.
pub fn decide(
    result: &AttemptResult,
    attempt: u32,
    budget: &Budget,
    created_at: DateTime<Utc>,
    now: DateTime<Utc>,
    random: f64,
    retries_exhausted: bool,
) -> Decision {
    let done = |state, success, outcome, reason: Option<String>| Decision {
        state,
        next_attempt_at: now,
        success,
        disable: false,
        outcome,
        reason,
    };
    let (retry_in, reason) = match result {
        AttemptResult::Response { status, .. } if (200..300).contains(status) => {
            return done(DeliveryState::Delivered, true, "delivered", None);
        }
        AttemptResult::Response { status: 410, .. } => {
            let mut d =
                done(DeliveryState::Failed, false, "failed", Some("410 Gone: the endpoint was disabled".into()));
            d.disable = true;
            return d;
        }
        AttemptResult::Response { status: status @ (429 | 503), retry_after: header } => {
            let backoff = budget.backoff.delay(attempt, random);
            let delay = header.as_deref().and_then(|h| retry_after(h, now, budget.backoff.max)).unwrap_or(backoff);
            (delay, format!("HTTP {status}"))
        }
        AttemptResult::Response { status, .. }
            if *status >= 500 || *status == 408 || budget.retry_on_status.contains(status) =>
        {
            (budget.backoff.delay(attempt, random), format!("HTTP {status}"))
        }
        AttemptResult::Response { status, .. } if (300..400).contains(status) => {
            return done(
                DeliveryState::Failed,
                false,
                "failed",
                Some(format!("HTTP {status}: redirects are not followed")),
            );
        }
        AttemptResult::Response { status, .. } => {
            return done(DeliveryState::Failed, false, "failed", Some(format!("HTTP {status}")));
        }
        AttemptResult::Timeout => (budget.backoff.delay(attempt, random), "timed out".to_owned()),
        AttemptResult::Transport(error) => (budget.backoff.delay(attempt, random), error.clone()),
    };
    let next = now + chrono::Duration::from_std(retry_in).unwrap_or(chrono::Duration::MAX);
    let expired = budget
        .dead_letter_after
        .is_some_and(|age| next.signed_duration_since(created_at).to_std().unwrap_or(Duration::ZERO) > age);
    if attempt >= budget.max_attempts {
        return done(DeliveryState::Dead, false, "dead", Some(format!("{reason}; {attempt} attempts made, none left")));
    }
    if expired {
        return done(
            DeliveryState::Dead,
            false,
            "dead",
            Some(format!("{reason}; the delivery is older than its dead-letter age")),
        );
    }
    if retries_exhausted {
        return done(
            DeliveryState::Dead,
            false,
            "dead",
            Some(format!("{reason}; the endpoint's hourly retry budget is spent")),
        );
    }
    Decision {
        state: DeliveryState::Retrying,
        next_attempt_at: next,
        success: false,
        disable: false,
        outcome: "retry",
        reason: Some(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::retry::Backoff;
    use crate::resources::kinds::Jitter;

    fn budget() -> Budget {
        Budget {
            max_attempts: 3,
            backoff: Backoff { base: Duration::from_secs(10), max: Duration::from_secs(60), jitter: Jitter::None },
            retries_per_hour: None,
            breaker: None,
            dead_letter_after: Some(Duration::from_secs(3600)),
            retry_on_status: vec![404],
        }
    }

    fn decide_now(result: AttemptResult, attempt: u32) -> (Decision, DateTime<Utc>) {
        let now = Utc::now();
        (decide(&result, attempt, &budget(), now, now, 0.5, false), now)
    }

    fn response(status: u16) -> AttemptResult {
        AttemptResult::Response { status, retry_after: None }
    }

    #[test]
    fn each_status_class_gets_its_outcome() {
        assert_eq!(decide_now(response(204), 1).0.state, DeliveryState::Delivered);
        let (gone, _) = decide_now(response(410), 1);
        assert_eq!((gone.state, gone.disable), (DeliveryState::Failed, true));
        assert_eq!(decide_now(response(400), 1).0.state, DeliveryState::Failed);
        assert_eq!(decide_now(response(404), 1).0.state, DeliveryState::Retrying, "configured to retry");
        assert_eq!(decide_now(response(302), 1).0.state, DeliveryState::Failed);
        for retried in [
            response(500),
            response(503),
            response(429),
            AttemptResult::Timeout,
            AttemptResult::Transport("refused".into()),
        ] {
            let (d, now) = decide_now(retried, 1);
            assert_eq!(d.state, DeliveryState::Retrying);
            assert_eq!(d.next_attempt_at - now, chrono::Duration::seconds(10));
        }
    }

    #[test]
    fn retry_after_is_honoured_within_the_backoff_maximum() {
        let (d, now) = decide_now(AttemptResult::Response { status: 429, retry_after: Some("30".into()) }, 1);
        assert_eq!(d.next_attempt_at - now, chrono::Duration::seconds(30));
        let (d, now) = decide_now(AttemptResult::Response { status: 503, retry_after: Some("9999".into()) }, 1);
        assert_eq!(d.next_attempt_at - now, chrono::Duration::seconds(60));
    }

    #[test]
    fn the_last_attempt_and_an_old_delivery_go_to_the_dead_letters() {
        assert_eq!(decide_now(response(500), 3).0.state, DeliveryState::Dead);
        let now = Utc::now();
        let old = now - chrono::Duration::hours(2);
        assert_eq!(decide(&response(500), 1, &budget(), old, now, 0.5, false).state, DeliveryState::Dead);
        assert_eq!(decide(&response(500), 1, &budget(), now, now, 0.5, true).state, DeliveryState::Dead);
    }

    #[test]
    fn a_spent_hourly_retry_budget_ends_only_what_would_be_retried() {
        let now = Utc::now();
        let spent = |result: &AttemptResult| decide(result, 1, &budget(), now, now, 0.5, true);
        let dead = spent(&response(503));
        assert_eq!((dead.state, dead.outcome, dead.success), (DeliveryState::Dead, "dead", false));
        assert_eq!(dead.reason.as_deref(), Some("HTTP 503; the endpoint's hourly retry budget is spent"));
        assert_eq!(dead.next_attempt_at, now);
        let timed_out = spent(&AttemptResult::Timeout);
        assert_eq!(timed_out.reason.as_deref(), Some("timed out; the endpoint's hourly retry budget is spent"));
        // What is not retried anyway does not need the budget.
        assert_eq!(spent(&response(200)).state, DeliveryState::Delivered);
        assert_eq!(spent(&response(400)).state, DeliveryState::Failed);
        assert_eq!((spent(&response(410)).state, spent(&response(410)).disable), (DeliveryState::Failed, true));
        // Attempts and age are judged first: their reason is the one given.
        let last = decide(&response(503), 3, &budget(), now, now, 0.5, true);
        assert_eq!(last.reason.as_deref(), Some("HTTP 503; 3 attempts made, none left"));
    }
}
