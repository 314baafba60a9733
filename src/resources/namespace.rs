//! The settings a namespace runs with: its Namespace's spec over the server's defaults
//! (`namespaceDefaults` in the configuration). Pure: ingest, retention and the API read a
//! namespace's [`Settings`] from here, so none of them decides a default of its own.

use std::time::Duration;

use serde::Deserialize;

use super::kinds::{NamespaceSpec, UnknownEventTypes};

/// The shortest retention a Namespace or the configuration may give.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);
/// The longest retention or dedup window (ten years): times stay far inside what the
/// databases and `chrono` hold.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// `namespaceDefaults` in the configuration: what every namespace gets unless its
/// Namespace says otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct NamespaceDefaults {
    pub retention: RetentionDefaults,
    /// How long a repeated `(source, id)` or `Idempotency-Key` is a duplicate.
    #[serde(with = "crate::duration::text")]
    pub dedup_window: Duration,
}

/// `namespaceDefaults.retention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RetentionDefaults {
    #[serde(with = "crate::duration::text")]
    pub events: Duration,
    #[serde(with = "crate::duration::text")]
    pub dead_letters: Duration,
    #[serde(with = "crate::duration::text")]
    pub attempts: Duration,
}

impl Default for RetentionDefaults {
    fn default() -> Self {
        Self {
            events: Duration::from_secs(30 * 24 * 3600),
            dead_letters: Duration::from_secs(14 * 24 * 3600),
            attempts: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for NamespaceDefaults {
    fn default() -> Self {
        Self { retention: RetentionDefaults::default(), dedup_window: Duration::from_secs(72 * 3600) }
    }
}

impl NamespaceDefaults {
    /// What cannot work: a retention under [`MIN_RETENTION`], a window of zero, anything
    /// over [`MAX_DURATION`], a dedup window longer than events are kept (a duplicate
    /// would be answered with an event that is gone).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let r = &self.retention;
        let mut problems = Vec::new();
        for (path, d) in [
            ("retention.events", r.events),
            ("retention.deadLetters", r.dead_letters),
            ("retention.attempts", r.attempts),
        ] {
            if let Some(message) = retention_problem(d) {
                problems.push((path, message));
            }
        }
        if let Some(message) = window_problem(self.dedup_window) {
            problems.push(("dedupWindow", message));
        } else if self.dedup_window > r.events {
            problems.push(("dedupWindow", "must not be longer than retention.events".to_owned()));
        }
        problems
    }
}

/// Why `d` cannot be a retention, if it cannot.
pub fn retention_problem(d: Duration) -> Option<String> {
    if d < MIN_RETENTION {
        Some("must be at least 1m".to_owned())
    } else if d > MAX_DURATION {
        Some("must be at most 87600h (ten years)".to_owned())
    } else {
        None
    }
}

/// Why `d` cannot be a dedup window, if it cannot.
pub fn window_problem(d: Duration) -> Option<String> {
    if d.is_zero() {
        Some("must be greater than 0s".to_owned())
    } else if d > MAX_DURATION {
        Some("must be at most 87600h (ten years)".to_owned())
    } else {
        None
    }
}

/// How long each kind of row is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub events: Duration,
    pub dead_letters: Duration,
    pub attempts: Duration,
}

/// A namespace's settings in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub retention: Retention,
    pub dedup_window: Duration,
    pub max_endpoints: Option<u32>,
    pub max_payload_bytes: Option<u64>,
    /// `quotas.ingest`: the events the namespace may write per second, at once and per day.
    pub ingest_quota: Option<crate::ingest::quota::Limit>,
    /// `None`: the configuration's `ingest.unknownEventTypes[ByNamespace]` decides.
    pub unknown_event_types: Option<UnknownEventTypes>,
}

impl Settings {
    /// The settings of a namespace whose Namespace is `spec` (`None`: it has none).
    pub fn of(spec: Option<&NamespaceSpec>, defaults: &NamespaceDefaults) -> Settings {
        let retention = spec.and_then(|s| s.retention.as_ref());
        let pick = |value: Option<crate::duration::DurationText>, default: Duration| value.map_or(default, |d| d.0);
        let quotas = spec.and_then(|s| s.quotas.as_ref());
        Settings {
            retention: Retention {
                events: pick(retention.and_then(|r| r.events), defaults.retention.events),
                dead_letters: pick(retention.and_then(|r| r.dead_letters), defaults.retention.dead_letters),
                attempts: pick(retention.and_then(|r| r.attempts), defaults.retention.attempts),
            },
            dedup_window: pick(spec.and_then(|s| s.dedup_window), defaults.dedup_window),
            max_endpoints: quotas.and_then(|q| q.max_endpoints),
            max_payload_bytes: quotas.and_then(|q| q.max_payload_bytes),
            ingest_quota: quotas.and_then(|q| q.ingest.as_ref()).map(crate::ingest::quota::Limit::of),
            unknown_event_types: spec.and_then(|s| s.unknown_event_types),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::DurationText;
    use crate::resources::kinds::Retention as RetentionSpec;

    #[test]
    fn a_namespace_without_a_resource_gets_the_defaults_and_one_with_overrides_what_it_sets() {
        let defaults = NamespaceDefaults::default();
        let plain = Settings::of(None, &defaults);
        assert_eq!(plain.dedup_window, Duration::from_secs(72 * 3600));
        assert_eq!(plain.retention.events, Duration::from_secs(30 * 24 * 3600));
        assert_eq!((plain.max_endpoints, plain.unknown_event_types), (None, None));
        let spec = NamespaceSpec {
            retention: Some(RetentionSpec {
                attempts: Some(DurationText(Duration::from_secs(3600))),
                ..Default::default()
            }),
            dedup_window: Some(DurationText(Duration::from_secs(60))),
            unknown_event_types: Some(UnknownEventTypes::Reject),
            ..Default::default()
        };
        let set = Settings::of(Some(&spec), &defaults);
        assert_eq!(set.dedup_window, Duration::from_secs(60));
        assert_eq!(set.retention.attempts, Duration::from_secs(3600));
        assert_eq!(set.retention.events, defaults.retention.events, "what the spec leaves out is the default");
        assert_eq!(set.unknown_event_types, Some(UnknownEventTypes::Reject));
    }

    #[test]
    fn defaults_that_cannot_work_are_named() {
        assert_eq!(NamespaceDefaults::default().problems(), vec![]);
        let bad = NamespaceDefaults {
            retention: RetentionDefaults { attempts: Duration::from_secs(1), ..Default::default() },
            dedup_window: Duration::from_secs(31 * 24 * 3600),
        };
        let paths: Vec<&str> = bad.problems().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths, vec!["retention.attempts", "dedupWindow"]);
    }
}
