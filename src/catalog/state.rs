//! What an endpoint is doing now — sending, or why its deliveries wait — as status,
//! `/readyz`, the health route and the waiting-deliveries metric tell it, from one place.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{BlockReason, Catalog, EndpointEntry};
use crate::store::EndpointState;

/// Whether an endpoint can be sent to now, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Sendability {
    Active,
    /// A 410 disabled it until its spec changes or an operator enables it.
    Disabled,
    /// `paused: true`.
    Paused,
    /// Something it needs is missing (see [`BlockReason`]).
    Blocked(BlockReason),
    /// Its breaker is open.
    BreakerOpen,
    /// The endpoint no longer exists (its deliveries fail when claimed).
    Deleted,
}

/// Every `reason` label of `hookwarden_delivery_waiting`.
pub const WAIT_REASONS: [&str; 7] = [
    "scheduled",
    "disabled",
    "paused",
    "secret_unavailable",
    "reference_not_found",
    "breaker_open",
    "endpoint_deleted",
];

impl Sendability {
    /// Of `entry` (`None`: not in the catalog) with run-time `state` at `now`. A 410
    /// counts first, then the pause, then what is missing, then the breaker.
    pub fn of(entry: Option<&EndpointEntry>, state: Option<&EndpointState>, now: DateTime<Utc>) -> Sendability {
        let Some(entry) = entry else { return Sendability::Deleted };
        if state.is_some_and(|s| s.disabled_reason.is_some()) {
            Sendability::Disabled
        } else if entry.spec.paused {
            Sendability::Paused
        } else if let Some(blocked) = &entry.blocked {
            Sendability::Blocked(blocked.reason)
        } else if state.and_then(|s| s.breaker_open_until).is_some_and(|until| until > now) {
            Sendability::BreakerOpen
        } else {
            Sendability::Active
        }
    }

    /// The state as `status.delivery.state` and `hookwarden get endpoints` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Sendability::Active => "Active",
            Sendability::Disabled => "Disabled",
            Sendability::Paused => "Paused",
            Sendability::Blocked(reason) => reason.as_str(),
            Sendability::BreakerOpen => "BreakerOpen",
            Sendability::Deleted => "Deleted",
        }
    }

    /// The `reason` label of the waiting-deliveries metric.
    pub fn wait_label(self) -> &'static str {
        match self {
            Sendability::Active => "scheduled",
            Sendability::Disabled => "disabled",
            Sendability::Paused => "paused",
            Sendability::Blocked(reason) => reason.label(),
            Sendability::BreakerOpen => "breaker_open",
            Sendability::Deleted => "endpoint_deleted",
        }
    }
}

/// Waiting deliveries (`(namespace, endpoint, count, oldest)` rows) summed by why they
/// wait, every reason present (0 when none).
pub fn waiting_by_reason(
    catalog: &Catalog,
    waiting: &[(String, String, i64, DateTime<Utc>)],
    states: &[(String, String, EndpointState)],
    now: DateTime<Utc>,
) -> Vec<(&'static str, i64)> {
    let mut totals: Vec<(&'static str, i64)> = WAIT_REASONS.iter().map(|r| (*r, 0)).collect();
    for (namespace, endpoint, count, _) in waiting {
        let state = states.iter().find(|(n, e, _)| n == namespace && e == endpoint).map(|s| &s.2);
        let label = Sendability::of(catalog.endpoint(namespace, endpoint).as_deref(), state, now).wait_label();
        if let Some(total) = totals.iter_mut().find(|(r, _)| *r == label) {
            total.1 += count;
        }
    }
    totals
}
