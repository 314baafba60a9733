//! Events checked against their namespace's EventTypes before anything is queued: the
//! data of a type with a schema must match it; a type without an EventType is accepted or
//! refused by `ingest.unknownEventTypes`; a deprecated type is accepted and said so.
//!
//! Invariants: a request is checked whole before any of it is queued, so a request with
//! one refused event writes nothing; the schemas are the catalog's, compiled when it was
//! built, never here. The check runs on the handler's task: it is linear in the data
//! (`pattern` runs on a linear-time engine) and the data is bounded by
//! `ingest.maxBodyBytes`, like the JSON parsing before it.

use serde::Serialize;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::config::UnknownEventTypes;
use crate::resources::event_schema::Violation;
use crate::store::NewEvent;

/// A violation of one event of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ItemViolation {
    /// The event's index in the request (0 for a single event).
    pub item: usize,
    #[serde(flatten)]
    pub violation: Violation,
}

/// An event whose type has no EventType where the namespace refuses unknown types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownType {
    pub item: usize,
    pub namespace: String,
    pub event_type: String,
}

/// Why a request's events were refused; nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("{} event(s) of a type without an EventType", .0.len())]
    Unknown(Vec<UnknownType>),
    #[error("{} schema violation(s)", .0.len())]
    Violations(Vec<ItemViolation>),
}

/// A deprecated type some events of a request have.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deprecated {
    pub namespace: String,
    pub event_type: String,
}

/// What checking a request found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Per event, in order: whether its type is deprecated.
    pub deprecated: Vec<bool>,
}

impl Checked {
    /// The deprecated types of `events` (checked into `self`), each once, sorted.
    pub fn deprecated_types(&self, events: &[NewEvent]) -> Vec<Deprecated> {
        let mut types: Vec<Deprecated> = events
            .iter()
            .zip(&self.deprecated)
            .filter(|(_, deprecated)| **deprecated)
            .map(|(e, _)| Deprecated { namespace: e.namespace.clone(), event_type: e.event_type.clone() })
            .collect();
        types.sort();
        types.dedup();
        types
    }
}

/// Checks every event of a request against the EventTypes of `catalog`; `unknown` says
/// what a namespace does with types it has none for. Unknown types are reported before
/// violations: all of one kind, each with its index.
pub fn check_types(
    catalog: &Catalog,
    events: &[NewEvent],
    unknown: impl Fn(&str) -> UnknownEventTypes,
) -> Result<Checked, TypeError> {
    let mut unknowns = Vec::new();
    let mut violations = Vec::new();
    let mut checked = Checked { deprecated: Vec::with_capacity(events.len()) };
    for (item, event) in events.iter().enumerate() {
        let Some(entry) = catalog.event_type(&event.namespace, &event.event_type) else {
            if unknown(&event.namespace) == UnknownEventTypes::Reject {
                unknowns.push(UnknownType {
                    item,
                    namespace: event.namespace.clone(),
                    event_type: event.event_type.clone(),
                });
            }
            checked.deprecated.push(false);
            continue;
        };
        checked.deprecated.push(entry.deprecated);
        if entry.checks_data() {
            // The handler read it as JSON already: this cannot fail but for a bug.
            let found = match serde_json::from_str::<Value>(&event.data) {
                Ok(data) => entry.violations(&data),
                Err(e) => vec![Violation { path: "/data".into(), keyword: "type".into(), message: e.to_string() }],
            };
            violations.extend(found.into_iter().map(|violation| ItemViolation { item, violation }));
        }
    }
    if !unknowns.is_empty() {
        return Err(TypeError::Unknown(unknowns));
    }
    if !violations.is_empty() {
        return Err(TypeError::Violations(violations));
    }
    Ok(checked)
}
