//! When to try again: `min(base * 2^attempt + jitter, max)`, and how to read a receiver's
//! `Retry-After`. Pure functions of their inputs (randomness is passed in).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::resources::kinds::Jitter;

/// Backoff settings, as resolved from the endpoint's RetryBudget (or the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// The delay before the retry that follows failed attempt number `attempt` (1 = the
    /// first attempt failed). `random` is uniform in `[0, 1)`.
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exponent).min(self.max);
        let random = random.clamp(0.0, 1.0);
        let jittered = match self.jitter {
            Jitter::None => raw,
            // Full jitter: anywhere in [0, raw].
            Jitter::Full => raw.mul_f64(random),
            // Equal jitter: half fixed, half random.
            Jitter::Equal => raw / 2 + (raw / 2).mul_f64(random),
        };
        jittered.min(self.max)
    }
}

/// Reads `Retry-After` (delay-seconds or an HTTP date), bounded by `max`.
pub fn retry_after(value: &str, now: DateTime<Utc>, max: Duration) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
        (at - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(delay.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let b = Backoff { base: S(5), max: S(60), jitter: Jitter::None };
        let delays: Vec<u64> = (1..=6).map(|a| b.delay(a, 0.5).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert_eq!(b.delay(1000, 0.5), S(60), "no overflow for huge attempt numbers");
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let full = Backoff { base: S(10), max: S(60), jitter: Jitter::Full };
        assert_eq!(full.delay(2, 0.0), S(0));
        assert_eq!(full.delay(2, 0.5), S(10));
        let equal = Backoff { jitter: Jitter::Equal, ..full };
        assert_eq!(equal.delay(2, 0.0), S(10));
        assert_eq!(equal.delay(2, 0.999_999).as_secs(), 19);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_bounded() {
        let now = DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(retry_after("7", now, S(60)), Some(S(7)));
        assert_eq!(retry_after("3600", now, S(60)), Some(S(60)));
        assert_eq!(retry_after("Sat, 28 Nov 2026 10:00:30 GMT", now, S(60)), Some(S(30)));
        assert_eq!(retry_after("soon", now, S(60)), None);
    }
}
