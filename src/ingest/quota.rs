//! Ingest quotas (`spec.quotas.ingest` of a Namespace): a token bucket per namespace
//! (`perSecond` sustained, `burst` at once) and a count per UTC day (`perDay`), and the
//! IETF `RateLimit-Policy` / `RateLimit` fields that describe them
//! (draft-ietf-httpapi-ratelimit-headers-11: lists of named quota policies with `q` and
//! `w`, and of remaining quota with `r` and `t`).
//!
//! Two modes. **Local** (SQLite: one process): the bucket is here, in memory, exact.
//! **Shared** (PostgreSQL: any number of processes): the bucket is a `namespace_quota` row,
//! and each process leases tokens from it in batches ([`lease_batch`]: a twentieth of
//! `perSecond`) with one statement ([`crate::store::Store::lease_ingest_tokens`]); this
//! module then holds the tokens the process leased and spends them. Tokens leased are
//! gone from the shared bucket, so together the processes admit at most what one bucket
//! would plus the leased tokens not yet spent: at most one batch per process over (5% of
//! `perSecond` per process), and as much under while a process holds tokens it does not
//! spend. Leased tokens count against `perDay` when leased, and are dropped at the next
//! UTC midnight, so `perDay` is never exceeded.
//!
//! Pure: no I/O, time comes in as an argument. Invariants:
//! - a request takes its events from every namespace it writes to, or from none (a batch
//!   over the remaining quota of one of its namespaces is refused whole);
//! - what a request took is given back unless it was written ([`Taken::keep`]; a
//!   [`Taken`] dropped without it refunds), so a request refused later (by the
//!   EventTypes, the database) does not cost quota. The ingest writer settles it by the
//!   commit's result, not the handler: a request whose handler stopped waiting (timeout,
//!   client gone) is charged if its events were written, or may have been;
//! - namespaces without a quota cost nothing here (no lock is taken for them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, Utc};

use crate::resources::kinds::IngestQuota;

/// A namespace's ingest quota, as enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub per_second: u32,
    pub burst: u32,
    pub per_day: Option<u64>,
}

impl Limit {
    pub fn of(quota: &IngestQuota) -> Limit {
        Limit {
            per_second: quota.per_second.max(1),
            burst: quota.burst.unwrap_or(quota.per_second).max(quota.per_second).max(1),
            per_day: quota.per_day,
        }
    }

    /// `w` of the burst policy: the seconds an empty bucket takes to fill.
    fn burst_window(&self) -> u64 {
        u64::from(self.burst).div_ceil(u64::from(self.per_second)).max(1)
    }
}

/// The tokens a process leases from the shared bucket at once (at least what a request
/// needs): a twentieth of `perSecond`, at most `burst`.
pub fn lease_batch(limit: &Limit, need: u64) -> u64 {
    u64::from(limit.per_second).div_ceil(20).min(u64::from(limit.burst)).max(need).max(1)
}

/// What a lease from the shared bucket did, as the database answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Tokens leased: 0 when the bucket could not give what was needed.
    pub granted: u64,
    /// Millionths of a token left in the shared bucket.
    pub bucket_micro: i64,
    /// Events counted today in the shared bucket, the ones just leased included.
    pub used_today: u64,
}

/// A shared bucket's lease a request waits for: `need` more tokens of `namespace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseNeed {
    pub namespace: String,
    pub limit: Limit,
    pub need: u64,
}

/// Why [`Quotas::take`] could not take a request's events.
#[derive(Clone, Debug, PartialEq)]
pub enum Shortfall {
    Refused(Refusal),
    /// Shared mode: lease these from the database ([`Quotas::leased`]), then take again.
    Lease(Vec<LeaseNeed>),
}

/// What is left of a namespace's quota, for the `RateLimit` field.
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    pub namespace: String,
    pub limit: Limit,
    /// Whole tokens in the bucket.
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub full_in: u64,
    /// Events left today (when there is a `perDay`).
    pub left_today: Option<u64>,
    /// Seconds until the next UTC midnight.
    pub day_resets_in: u64,
}

impl Usage {
    /// `RateLimit-Policy`: `"burst";q=BURST;w=SECONDS` (the bucket: `burst` events, refilled
    /// at `perSecond`, so `w` is the time it takes to fill), then `"day";q=PERDAY;w=86400`.
    pub fn policy_field(&self) -> String {
        let l = &self.limit;
        let mut field = format!("\"burst\";q={};w={}", l.burst, l.burst_window());
        if let Some(per_day) = l.per_day {
            field.push_str(&format!(", \"day\";q={per_day};w=86400"));
        }
        field
    }

    /// `RateLimit`: `"burst";r=LEFT;t=SECONDS`, then `"day";r=LEFT;t=SECONDS` (to the next
    /// UTC midnight).
    pub fn field(&self) -> String {
        let mut field = format!("\"burst\";r={};t={}", self.remaining, self.full_in);
        if let Some(left) = self.left_today {
            field.push_str(&format!(", \"day\";r={left};t={}", self.day_resets_in));
        }
        field
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// Over the bucket: `retry_after` seconds until it holds the request's events.
    Rate { usage: Usage, wanted: u64, retry_after: u64 },
    /// Over `perDay`: refused until the next UTC midnight (`retry_after` seconds).
    Day { usage: Usage, wanted: u64, retry_after: u64 },
    /// More events than the namespace can ever take at once (over `burst` or `perDay`):
    /// waiting does not help, the request must be split.
    TooMany { usage: Usage, wanted: u64, most: u64 },
}

/// The events a request took; given back when dropped unless [`Taken::keep`] is called.
#[must_use = "dropping a Taken gives its events back"]
pub struct Taken {
    quotas: Option<Arc<Quotas>>,
    taken: Vec<(String, u64, NaiveDate)>,
    /// The namespace of the request closest to its limit, for the `RateLimit` fields.
    pub usage: Option<Usage>,
}

impl Taken {
    /// Nothing taken (no namespace of the request has a quota).
    pub fn nothing() -> Taken {
        Taken { quotas: None, taken: Vec::new(), usage: None }
    }

    /// The request was written: what it took stays taken.
    pub fn keep(mut self) -> Option<Usage> {
        self.taken.clear();
        self.usage.take()
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(quotas) = &self.quotas {
            quotas.give_back(&self.taken);
        }
    }
}

/// A namespace's bucket (local mode), or the tokens this process leased from the shared
/// one and what it last saw of it (shared mode).
struct Bucket {
    limit: Limit,
    /// Local: the bucket's tokens. Shared: the tokens leased and not spent.
    tokens: f64,
    at: DateTime<Utc>,
    day: NaiveDate,
    /// Local: events taken today. Shared: as the last lease saw it.
    used_today: u64,
    /// Shared: the shared bucket's tokens as the last lease saw them, refilled since
    /// (`None`: local mode).
    seen: Option<f64>,
    /// Shared: until when the last lease showed the shared bucket cannot give a single
    /// token (refused here without asking the database again).
    dry_until: Option<DateTime<Utc>>,
}

impl Bucket {
    fn new(limit: Limit, now: DateTime<Utc>, shared: bool) -> Bucket {
        let (tokens, seen) = if shared { (0.0, Some(0.0)) } else { (f64::from(limit.burst), None) };
        Bucket { limit, tokens, at: now, day: now.date_naive(), used_today: 0, seen, dry_until: None }
    }

    /// Brings the bucket to `now`: the limit in force, refilled (local mode), a new day
    /// counted from 0 (shared mode: the tokens leased the day before dropped).
    fn refresh(&mut self, limit: Limit, now: DateTime<Utc>) {
        self.limit = limit;
        let elapsed = (now - self.at).num_microseconds().unwrap_or(i64::MAX).max(0) as f64 / 1e6;
        let burst = f64::from(limit.burst);
        match &mut self.seen {
            None => self.tokens = (self.tokens + elapsed * f64::from(limit.per_second)).min(burst),
            Some(seen) => *seen = (*seen + elapsed * f64::from(limit.per_second)).min(burst),
        }
        self.at = self.at.max(now);
        if now.date_naive() > self.day {
            self.day = now.date_naive();
            self.used_today = 0;
            if self.seen.is_some() {
                self.tokens = 0.0;
            }
        }
    }

    fn usage(&self, namespace: &str, now: DateTime<Utc>) -> Usage {
        let l = self.limit;
        let (tokens, left_today) = match self.seen {
            None => (self.tokens, l.per_day.map(|d| d.saturating_sub(self.used_today))),
            // The tokens leased here are counted in the shared bucket's day already.
            Some(seen) => {
                (self.tokens + seen, l.per_day.map(|d| (d + self.tokens as u64).saturating_sub(self.used_today)))
            }
        };
        let tokens = tokens.min(f64::from(l.burst));
        let missing = (f64::from(l.burst) - tokens).max(0.0);
        Usage {
            namespace: namespace.to_owned(),
            limit: l,
            remaining: tokens.floor() as u64,
            full_in: (missing / f64::from(l.per_second)).ceil() as u64,
            left_today,
            day_resets_in: seconds_to_midnight(now),
        }
    }

    /// Shared mode: the refusal a lease of `need` would get, while the last lease showed
    /// the shared bucket cannot give a single token before `dry_until`.
    fn dry(&self, namespace: &str, wanted: u64, need: u64, now: DateTime<Utc>) -> Option<Refusal> {
        let until = self.dry_until.filter(|until| now < *until)?;
        let usage = self.usage(namespace, now);
        if self.limit.per_day.is_some_and(|d| self.used_today + need > d) {
            return Some(Refusal::Day { usage, wanted, retry_after: seconds_to_midnight(now) });
        }
        let micros = (until - now).num_microseconds().unwrap_or(0).max(0) as u64;
        Some(Refusal::Rate { usage, wanted, retry_after: micros.div_ceil(1_000_000).max(1) })
    }

    /// Why `wanted` events cannot be taken now, if they cannot.
    fn refusal(&self, namespace: &str, wanted: u64, now: DateTime<Utc>) -> Option<Refusal> {
        let l = self.limit;
        let most = l.per_day.map_or(u64::from(l.burst), |d| d.min(u64::from(l.burst)));
        if wanted > most {
            return Some(Refusal::TooMany { usage: self.usage(namespace, now), wanted, most });
        }
        // Shared mode: tokens leased were counted against the day when leased.
        if self.seen.is_none() && l.per_day.is_some_and(|d| self.used_today + wanted > d) {
            let retry_after = seconds_to_midnight(now);
            return Some(Refusal::Day { usage: self.usage(namespace, now), wanted, retry_after });
        }
        let short = wanted as f64 - self.tokens;
        if short > 0.0 {
            let retry_after = ((short / f64::from(l.per_second)).ceil() as u64).max(1);
            return Some(Refusal::Rate { usage: self.usage(namespace, now), wanted, retry_after });
        }
        None
    }
}

/// Seconds from `now` to the next UTC midnight, at least 1.
pub fn seconds_to_midnight(now: DateTime<Utc>) -> u64 {
    let next = now.date_naive().succ_opt().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|t| t.and_utc());
    next.map_or(86_400, |next| {
        let micros = (next - now).num_microseconds().unwrap_or(0).max(0) as u64;
        micros.div_ceil(1_000_000).max(1)
    })
}

/// The buckets of this process, one per namespace with a quota.
#[derive(Default)]
pub struct Quotas {
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Shared mode: the buckets are in the database, leased in batches.
    shared: bool,
}

impl Quotas {
    /// Buckets here (`shared: false`), or leased from the database's.
    pub fn new(shared: bool) -> Quotas {
        Quotas { buckets: Mutex::default(), shared }
    }

    /// Takes `wanted` events from each namespace's bucket at `now`, all or none; `wanted`
    /// holds each namespace once, with its limit. In shared mode, a namespace whose leased
    /// tokens are too few comes back as a [`Shortfall::Lease`] (nothing taken).
    pub fn take(self: &Arc<Self>, wanted: &[(String, Limit, u64)], now: DateTime<Utc>) -> Result<Taken, Shortfall> {
        if wanted.is_empty() {
            return Ok(Taken::nothing());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let mut leases = Vec::new();
        for (namespace, limit, n) in wanted {
            let bucket = buckets.entry(namespace.clone()).or_insert_with(|| Bucket::new(*limit, now, self.shared));
            bucket.refresh(*limit, now);
            if let Some(refusal) = bucket.refusal(namespace, *n, now) {
                let too_many = matches!(refusal, Refusal::TooMany { .. });
                if !self.shared || too_many {
                    return Err(Shortfall::Refused(refusal));
                }
                let need = (*n as f64 - bucket.tokens).ceil().max(1.0) as u64;
                if let Some(refusal) = bucket.dry(namespace, *n, need, now) {
                    return Err(Shortfall::Refused(refusal));
                }
                leases.push(LeaseNeed { namespace: namespace.clone(), limit: *limit, need });
            }
        }
        if !leases.is_empty() {
            return Err(Shortfall::Lease(leases));
        }
        let mut taken = Vec::with_capacity(wanted.len());
        let mut usage: Option<Usage> = None;
        for (namespace, _, n) in wanted {
            let Some(bucket) = buckets.get_mut(namespace) else { continue };
            bucket.tokens -= *n as f64;
            if !self.shared {
                bucket.used_today += n;
            }
            taken.push((namespace.clone(), *n, bucket.day));
            let this = bucket.usage(namespace, now);
            if usage.as_ref().is_none_or(|u| this.remaining < u.remaining) {
                usage = Some(this);
            }
        }
        Ok(Taken { quotas: Some(self.clone()), taken, usage })
    }

    /// Shared mode: records a lease of `need`'s namespace at `now`; refuses when the
    /// shared bucket had too few tokens (or too little of the day) to give.
    pub fn leased(&self, need: &LeaseNeed, lease: Lease, now: DateTime<Utc>) -> Result<(), Refusal> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(need.namespace.clone()).or_insert_with(|| Bucket::new(need.limit, now, true));
        bucket.refresh(need.limit, now);
        bucket.tokens += lease.granted as f64;
        bucket.used_today = lease.used_today;
        let left = lease.bucket_micro.max(0) as f64 / 1e6;
        bucket.seen = Some(left);
        let rate = f64::from(need.limit.per_second);
        bucket.dry_until = if need.limit.per_day.is_some_and(|d| lease.used_today >= d) {
            now.date_naive().succ_opt().and_then(|d| d.and_hms_opt(0, 0, 0)).map(|t| t.and_utc())
        } else if left < 1.0 {
            Some(now + chrono::Duration::microseconds(((1.0 - left) / rate * 1e6).ceil() as i64))
        } else {
            None
        };
        if lease.granted > 0 {
            return Ok(());
        }
        let usage = bucket.usage(&need.namespace, now);
        let wanted = need.need + bucket.tokens.floor() as u64;
        if need.limit.per_day.is_some_and(|d| lease.used_today + need.need > d) {
            return Err(Refusal::Day { usage, wanted, retry_after: seconds_to_midnight(now) });
        }
        let short = need.need as f64 - lease.bucket_micro.max(0) as f64 / 1e6;
        let retry_after = ((short / f64::from(need.limit.per_second)).ceil() as u64).max(1);
        Err(Refusal::Rate { usage, wanted, retry_after })
    }

    /// A refusal for a request whose leases other requests kept spending first: retry in a
    /// second.
    pub fn contended(&self, wanted: &[(String, Limit, u64)], now: DateTime<Utc>) -> Option<Refusal> {
        let (namespace, limit, n) = wanted.first()?;
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let usage = match buckets.get(namespace) {
            Some(bucket) => bucket.usage(namespace, now),
            None => Bucket::new(*limit, now, self.shared).usage(namespace, now),
        };
        Some(Refusal::Rate { usage, wanted: *n, retry_after: 1 })
    }

    fn give_back(&self, taken: &[(String, u64, NaiveDate)]) {
        if taken.is_empty() {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for (namespace, n, day) in taken {
            if let Some(bucket) = buckets.get_mut(namespace) {
                if bucket.day != *day {
                    continue;
                }
                bucket.tokens = (bucket.tokens + *n as f64).min(f64::from(bucket.limit.burst));
                if !self.shared {
                    bucket.used_today = bucket.used_today.saturating_sub(*n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn limit(per_second: u32, burst: u32, per_day: Option<u64>) -> Limit {
        Limit { per_second, burst, per_day }
    }

    fn want(n: u64, l: Limit) -> Vec<(String, Limit, u64)> {
        vec![("payments".to_owned(), l, n)]
    }

    #[test]
    fn the_bucket_admits_the_burst_then_the_rate() {
        let quotas = Arc::new(Quotas::new(false));
        let l = limit(10, 20, None);
        let t0 = at("2026-12-04T10:00:00Z");
        quotas.take(&want(20, l), t0).unwrap().keep();
        match quotas.take(&want(1, l), t0) {
            Err(Shortfall::Refused(Refusal::Rate { retry_after, usage, .. })) => {
                assert_eq!(retry_after, 1);
                assert_eq!((usage.remaining, usage.full_in), (0, 2));
            }
            other => panic!("expected a rate refusal, got {:?}", other.map(|t| t.keep())),
        }
        // A tenth of a second refills one token at 10/s.
        let usage = quotas.take(&want(1, l), t0 + chrono::Duration::milliseconds(100)).unwrap().keep().unwrap();
        assert_eq!(usage.remaining, 0);
        assert!(quotas.take(&want(5, l), t0 + chrono::Duration::milliseconds(200)).is_err());
        quotas.take(&want(5, l), t0 + chrono::Duration::milliseconds(600)).unwrap().keep();
    }

    #[test]
    fn what_is_not_kept_is_given_back() {
        let quotas = Arc::new(Quotas::new(false));
        let l = limit(1, 3, Some(3));
        let t0 = at("2026-12-04T10:00:00Z");
        drop(quotas.take(&want(3, l), t0).unwrap());
        let usage = quotas.take(&want(3, l), t0).unwrap().keep().unwrap();
        assert_eq!((usage.remaining, usage.left_today), (0, Some(0)));
    }

    #[test]
    fn per_day_refuses_until_the_next_utc_midnight_then_counts_from_zero() {
        let quotas = Arc::new(Quotas::new(false));
        let l = limit(100, 100, Some(5));
        let evening = at("2026-12-04T23:59:00Z");
        quotas.take(&want(5, l), evening).unwrap().keep();
        match quotas.take(&want(1, l), evening + chrono::Duration::seconds(30)) {
            Err(Shortfall::Refused(Refusal::Day { retry_after, usage, .. })) => {
                assert_eq!(retry_after, 30);
                assert_eq!((usage.left_today, usage.day_resets_in), (Some(0), 30));
            }
            other => panic!("expected a per-day refusal, got {:?}", other.map(|t| t.keep())),
        }
        let usage = quotas.take(&want(1, l), at("2026-12-05T00:00:00Z")).unwrap().keep().unwrap();
        assert_eq!((usage.left_today, usage.day_resets_in), (Some(4), 86_400));
    }

    #[test]
    fn a_batch_takes_from_every_namespace_or_from_none() {
        let quotas = Arc::new(Quotas::new(false));
        let (a, b) = (limit(1, 5, None), limit(1, 2, None));
        let t0 = at("2026-12-04T10:00:00Z");
        let both = |na: u64, nb: u64| vec![("a".to_owned(), a, na), ("b".to_owned(), b, nb)];
        assert!(matches!(quotas.take(&both(3, 3), t0), Err(Shortfall::Refused(Refusal::TooMany { most: 2, .. }))));
        let usage = quotas.take(&both(3, 2), t0).unwrap().keep().unwrap();
        assert_eq!(usage.namespace, "b", "the namespace closest to its limit is shown");
        assert!(matches!(quotas.take(&both(2, 1), t0), Err(Shortfall::Refused(Refusal::Rate { .. }))));
        quotas.take(&both(2, 0), t0).unwrap().keep();
    }

    #[test]
    fn shared_mode_spends_what_it_leased_and_asks_for_more_when_short() {
        let quotas = Arc::new(Quotas::new(true));
        let l = limit(100, 100, Some(1000));
        let t0 = at("2026-12-04T10:00:00Z");
        let need = match quotas.take(&want(3, l), t0) {
            Err(Shortfall::Lease(needs)) => needs.into_iter().next().unwrap(),
            other => panic!("expected a lease, got {:?}", other.map(|t| t.keep())),
        };
        assert_eq!((need.need, lease_batch(&l, need.need)), (3, 5), "a twentieth of perSecond at once");
        quotas.leased(&need, Lease { granted: 5, bucket_micro: 95_000_000, used_today: 5 }, t0).unwrap();
        let usage = quotas.take(&want(3, l), t0).unwrap().keep().unwrap();
        assert_eq!((usage.remaining, usage.left_today), (97, Some(997)));
        assert!(matches!(quotas.take(&want(3, l), t0), Err(Shortfall::Lease(_))), "2 left here: lease more");
        let refused = quotas.leased(&need, Lease { granted: 0, bucket_micro: 1_000_000, used_today: 5 }, t0);
        assert!(matches!(refused, Err(Refusal::Rate { retry_after: 1, .. })));
        let dry = quotas.leased(&need, Lease { granted: 0, bucket_micro: 0, used_today: 5 }, t0);
        assert!(matches!(dry, Err(Refusal::Rate { .. })));
        // The shared bucket is dry for a hundredth of a second: refused here meanwhile.
        let t1 = t0 + chrono::Duration::milliseconds(5);
        assert!(matches!(quotas.take(&want(3, l), t1), Err(Shortfall::Refused(Refusal::Rate { retry_after: 1, .. }))));
        let t2 = t0 + chrono::Duration::milliseconds(10);
        assert!(matches!(quotas.take(&want(3, l), t2), Err(Shortfall::Lease(_))), "then the database is asked");
        // The leftover of yesterday's lease is dropped at midnight (counted yesterday).
        let next_day = at("2026-12-05T00:00:01Z");
        assert!(matches!(quotas.take(&want(1, l), next_day), Err(Shortfall::Lease(_))));
    }

    #[test]
    fn the_fields_follow_the_draft_s_syntax() {
        let usage = Usage {
            namespace: "payments".into(),
            limit: limit(500, 1000, Some(5_000_000)),
            remaining: 998,
            full_in: 1,
            left_today: Some(4_999_998),
            day_resets_in: 3600,
        };
        assert_eq!(usage.policy_field(), "\"burst\";q=1000;w=2, \"day\";q=5000000;w=86400");
        assert_eq!(usage.field(), "\"burst\";r=998;t=1, \"day\";r=4999998;t=3600");
    }
}
