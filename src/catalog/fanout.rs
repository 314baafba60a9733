//! Fan-out: which endpoints of its namespace an event goes to, decided at ingest.
//!
//! An endpoint gets an event when one of its `eventTypes` globs matches and every Filter
//! it names passes (an operational event, only one that names `hookwarden.…` types).
//! Invariants:
//! - fan-out never depends on secrets or on the endpoint being sendable now: such an
//!   endpoint still gets its deliveries, which wait;
//! - a Filter that cannot decide (its expression fails on this event or exceeds its
//!   evaluation budget, or it no longer exists) skips the endpoint and is reported as a
//!   [`FanOutError`], never silently;
//! - an ordering key that cannot be computed (a failure or its budget exceeded) puts the
//!   event in the `(no key)` lane (kept in order among themselves) and is reported too;
//! - each Filter is evaluated at most once per event, however many endpoints name it;
//!   each evaluation has a budget of its own (`cel.maxCost`, `cel.timeout`).
//!
//! Fan-out that evaluates CEL is CPU-bound for as long as the budgets allow: ingest runs
//! it on the evaluation threads (see [`Catalog::evaluates_cel`]).

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::{eval, Catalog, EndpointEntry, FilterRef};
use crate::operational;
use crate::policy::expr;
use crate::policy::meter::Budget;
use crate::store::ClaimedDelivery;

/// The lane of events whose ordering key could not be computed.
pub const NO_KEY: &str = "(no key)";

/// What fan-out looks at of an event.
pub struct EventView<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub source: &'a str,
    pub event_type: &'a str,
    pub subject: Option<&'a str>,
    pub time: Option<String>,
    pub data: &'a str,
}

impl<'a> EventView<'a> {
    /// The event of a claimed delivery, as CEL at dispatch sees it (the same fields, in
    /// the same form, as fan-out saw at ingest).
    pub fn of_delivery(delivery: &'a ClaimedDelivery) -> EventView<'a> {
        EventView {
            id: delivery.event_id.as_str(),
            namespace: &delivery.namespace,
            source: &delivery.source,
            event_type: &delivery.event_type,
            subject: delivery.subject.as_deref(),
            time: delivery.event_time.map(|t| t.to_rfc3339()),
            data: &delivery.data,
        }
    }

    /// The `event` variable of CEL programs.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "source": self.source,
            "type": self.event_type,
            "subject": self.subject,
            "time": self.time,
            "data": serde_json::from_str::<Value>(self.data).unwrap_or(Value::Null),
        })
    }
}

/// One endpoint an event fans out to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanOut {
    pub endpoint: String,
    pub ordering_key: Option<String>,
}

/// Where fan-out failed for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FanOutError {
    pub endpoint: String,
    /// `filter` (the endpoint was skipped) or `ordering` (delivered in the `(no key)` lane).
    pub stage: &'static str,
    /// The Filter that failed, for `filter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub message: String,
    /// Whether the event was left out for this endpoint.
    pub skipped: bool,
}

/// The fan-out of one event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FanOutResult {
    pub deliveries: Vec<FanOut>,
    pub errors: Vec<FanOutError>,
}

/// `*` matches any run of characters (dots included); everything else literally.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

pub(super) fn types_match(globs: &[String], event_type: &str) -> bool {
    globs.is_empty() || globs.iter().any(|g| glob_matches(g, event_type))
}

impl Catalog {
    /// The endpoints of `namespace` whose event types match `event_type`. An operational
    /// event (`hookwarden.*`) goes only to endpoints that name it by a glob of that prefix:
    /// `*`, or no `eventTypes`, does not subscribe to Hookwarden's own events.
    fn candidates<'c>(&'c self, namespace: &str, event_type: &str) -> impl Iterator<Item = &'c EndpointEntry> {
        let endpoints = self.by_namespace.get(namespace).map(Vec::as_slice).unwrap_or_default();
        let event_type = event_type.to_owned();
        let reserved = operational::is_reserved(&event_type);
        endpoints.iter().map(|e| &**e).filter(move |e| {
            if reserved {
                e.spec.event_types.iter().any(|g| operational::is_reserved(g) && glob_matches(g, &event_type))
            } else {
                types_match(&e.spec.event_types, &event_type)
            }
        })
    }

    /// Whether the fan-out of an event of `event_type` in `namespace` evaluates CEL (a
    /// Filter's expression or an ordering key).
    pub fn evaluates_cel(&self, namespace: &str, event_type: &str) -> bool {
        self.candidates(namespace, event_type)
            .any(|e| e.ordering.is_some() || e.filters.iter().any(FilterRef::needs_event))
    }

    /// The endpoints `event` fans out to (namespace, type globs, filters), and where that
    /// could not be decided.
    pub fn fan_out(&self, event: &EventView<'_>) -> FanOutResult {
        let mut result = FanOutResult::default();
        let candidates: Vec<&EndpointEntry> = self.candidates(event.namespace, event.event_type).collect();
        if candidates.is_empty() {
            return result;
        }
        let json = if self.evaluates_cel(event.namespace, event.event_type) { event.to_json() } else { Value::Null };
        let mut decided = Decided { json: &json, budget: self.budget, filters: HashMap::new() };
        for endpoint in candidates {
            match decided.passes(endpoint, event.event_type) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    result.errors.push(error);
                    continue;
                }
            }
            let ordering_key = endpoint.ordering.as_ref().map(|program| match program {
                Ok(program) => match eval(program, &json, self.budget) {
                    Ok(value) => expr::value_text(&value),
                    Err(message) => {
                        result.errors.push(ordering_error(endpoint, message));
                        NO_KEY.to_owned()
                    }
                },
                Err(message) => {
                    result.errors.push(ordering_error(endpoint, message.clone()));
                    NO_KEY.to_owned()
                }
            });
            result.deliveries.push(FanOut { endpoint: endpoint.name.clone(), ordering_key });
        }
        result
    }
}

fn ordering_error(endpoint: &EndpointEntry, message: String) -> FanOutError {
    FanOutError {
        endpoint: endpoint.name.clone(),
        stage: "ordering",
        filter: None,
        message: format!("the ordering key failed: {message}; the event goes to the `{NO_KEY}` lane"),
        skipped: false,
    }
}

/// The Filters already evaluated for one event, by name, and what that needs.
struct Decided<'j> {
    json: &'j Value,
    budget: Budget,
    filters: HashMap<String, Result<cel::Value, String>>,
}

impl Decided<'_> {
    /// Whether every Filter of `endpoint` lets the event through; the first that cannot
    /// decide is the error.
    fn passes(&mut self, endpoint: &EndpointEntry, event_type: &str) -> Result<bool, FanOutError> {
        let skipped = |filter: &str, message: String| FanOutError {
            endpoint: endpoint.name.clone(),
            stage: "filter",
            filter: Some(filter.to_owned()),
            message,
            skipped: true,
        };
        for filter in &endpoint.filters {
            match filter {
                FilterRef::Missing { name } => {
                    return Err(skipped(name, format!("Filter `{name}` does not exist; the endpoint was skipped")))
                }
                FilterRef::Broken { name, message } => {
                    return Err(skipped(
                        name,
                        format!("Filter `{name}` cannot be used ({message}); the endpoint was skipped"),
                    ))
                }
                FilterRef::Compiled { name, event_types, expression } => {
                    if !types_match(event_types, event_type) {
                        return Ok(false);
                    }
                    let Some(program) = expression else { continue };
                    let (json, budget) = (self.json, self.budget);
                    let value = self.filters.entry(name.clone()).or_insert_with(|| eval(program, json, budget));
                    match value {
                        Ok(cel::Value::Bool(true)) => {}
                        Ok(cel::Value::Bool(false)) => return Ok(false),
                        Ok(other) => {
                            return Err(skipped(
                                name,
                                format!(
                                    "Filter `{name}` gave {} instead of true or false; the endpoint was skipped",
                                    expr::value_text(other)
                                ),
                            ))
                        }
                        Err(message) => {
                            return Err(skipped(
                                name,
                                format!("Filter `{name}` failed: {message}; the endpoint was skipped"),
                            ))
                        }
                    }
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_stars() {
        assert!(glob_matches("order.*", "order.created"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("*.created", "order.created"));
        assert!(glob_matches("a*b*c", "a-x-b-y-c"));
        assert!(!glob_matches("order.*", "refund.created"));
        assert!(!glob_matches("order.created", "order.created.v2"));
        assert!(!glob_matches("ab*ba", "aba"));
    }
}
