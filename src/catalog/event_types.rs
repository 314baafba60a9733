//! The EventTypes in force, compiled: each type's schema compiled once, when the catalog
//! is built (so once per apply), and used by ingest for every event of the type.
//!
//! Invariant: a stored EventType is always in the catalog. If its schema no longer
//! compiles (only corrupt stored data can do that: apply compiled it), it fails closed:
//! every event of the type is refused, with why.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::resources::event_schema::{self, CompiledSchema, Violation};
use crate::resources::{Kind, Spec};
use crate::store::StoredResource;

/// One EventType, ready to check events.
#[derive(Debug)]
pub struct EventTypeEntry {
    pub namespace: String,
    pub name: String,
    pub description: Option<String>,
    /// The schema as applied (`None`: any data).
    pub schema: Option<Value>,
    pub examples: Vec<Value>,
    pub deprecated: bool,
    /// The compiled schema, or why it cannot be compiled.
    compiled: Option<Result<CompiledSchema, String>>,
}

impl EventTypeEntry {
    /// Whether checking an event of this type needs its data parsed.
    pub fn checks_data(&self) -> bool {
        self.compiled.is_some()
    }

    /// How `data` fails the schema (empty: it does not), at most
    /// [`event_schema::MAX_VIOLATIONS`].
    pub fn violations(&self, data: &Value) -> Vec<Violation> {
        match &self.compiled {
            None => Vec::new(),
            Some(Ok(schema)) => event_schema::violations(schema, data),
            Some(Err(message)) => vec![Violation {
                path: "/data".into(),
                keyword: "$schema".into(),
                message: format!(
                    "the EventType's schema cannot be used, so no event of the type is accepted: {message}"
                ),
            }],
        }
    }
}

/// The EventTypes by namespace, then name.
pub type EventTypes = HashMap<String, BTreeMap<String, Arc<EventTypeEntry>>>;

/// Compiles the stored EventTypes.
pub(super) fn build(resources: &[StoredResource]) -> EventTypes {
    let mut types = EventTypes::new();
    for resource in resources.iter().filter(|r| r.key.kind == Kind::EventType) {
        let (namespace, name) = (&resource.key.namespace, &resource.key.name);
        let entry = match Spec::from_json(Kind::EventType, resource.spec.clone()) {
            Ok(Spec::EventType(spec)) => {
                let compiled = spec.schema.as_ref().map(|s| event_schema::compile(s).map_err(|p| p.message));
                if let Some(Err(error)) = &compiled {
                    tracing::error!(event_type = %name, %namespace, %error, "event type schema cannot be compiled; its events are refused");
                }
                EventTypeEntry {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    description: spec.description,
                    schema: spec.schema,
                    examples: spec.examples,
                    deprecated: spec.deprecated,
                    compiled,
                }
            }
            _ => {
                tracing::error!(event_type = %name, %namespace, "event type cannot be read; its events are refused");
                EventTypeEntry {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    description: None,
                    schema: None,
                    examples: Vec::new(),
                    deprecated: false,
                    compiled: Some(Err("its stored spec is unreadable".into())),
                }
            }
        };
        types.entry(namespace.clone()).or_default().insert(name.clone(), Arc::new(entry));
    }
    types
}

/// A warning about a resource that applies but likely does not do what was meant: it is
/// accepted and works as written.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    /// The field it is about, `spec.eventTypes[1]`.
    pub path: String,
    pub message: String,
}

/// The warnings of an Endpoint's or a Filter's `eventTypes` globs in a namespace whose
/// EventTypes are named `types`: one per glob that matches none of them. A namespace
/// without any EventType gets none: there the globs are not meant to name catalogued types.
pub fn unmatched_event_types<'a>(globs: &[String], types: impl IntoIterator<Item = &'a str> + Clone) -> Vec<Warning> {
    if types.clone().into_iter().next().is_none() {
        return Vec::new();
    }
    globs
        .iter()
        .enumerate()
        .filter(|(_, glob)| !types.clone().into_iter().any(|t| super::fanout::glob_matches(glob, t)))
        .map(|(i, glob)| Warning {
            path: format!("spec.eventTypes[{i}]"),
            message: format!(
                "`{glob}` matches no EventType of the namespace; no event of a catalogued type reaches it"
            ),
        })
        .collect()
}

/// [`unmatched_event_types`] of each stored or applied Endpoint and Filter: `resources`
/// are `(key, spec)` of every resource in force (EventTypes included).
pub fn event_type_warnings<'a>(
    resources: impl IntoIterator<Item = (&'a crate::resources::ResourceKey, &'a Value)> + Clone,
) -> HashMap<crate::resources::ResourceKey, Vec<Warning>> {
    let mut types: HashMap<&str, Vec<&str>> = HashMap::new();
    for (key, _) in resources.clone() {
        if key.kind == Kind::EventType {
            types.entry(key.namespace.as_str()).or_default().push(key.name.as_str());
        }
    }
    let mut warnings = HashMap::new();
    for (key, spec) in resources {
        if !matches!(key.kind, Kind::Endpoint | Kind::Filter) {
            continue;
        }
        let globs: Vec<String> = spec
            .get("eventTypes")
            .and_then(Value::as_array)
            .map(|globs| globs.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();
        let in_namespace = types.get(key.namespace.as_str()).map(Vec::as_slice).unwrap_or_default();
        let found = unmatched_event_types(&globs, in_namespace.iter().copied());
        if !found.is_empty() {
            warnings.insert(key.clone(), found);
        }
    }
    warnings
}

#[cfg(test)]
mod warning_tests {
    use super::*;
    use crate::resources::ResourceKey;

    #[test]
    fn a_glob_that_matches_no_event_type_is_warned_of_where_the_namespace_has_some() {
        let types = ["order.created", "order.paid"];
        let globs = vec!["order.*".to_owned(), "invoice.*".to_owned(), "order.paid".to_owned(), "*".to_owned()];
        let found = unmatched_event_types(&globs, types);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].path, "spec.eventTypes[1]");
        assert!(found[0].message.contains("`invoice.*`"), "{}", found[0].message);
        assert_eq!(unmatched_event_types(&globs, []), vec![], "no EventTypes: nothing to warn of");
    }

    #[test]
    fn warnings_are_per_endpoint_and_filter_of_the_namespaces_with_event_types() {
        let key =
            |kind, namespace: &str, name: &str| ResourceKey { kind, namespace: namespace.into(), name: name.into() };
        let resources = [
            (key(Kind::EventType, "shop", "order.created"), serde_json::json!({})),
            (key(Kind::Endpoint, "shop", "a"), serde_json::json!({"eventTypes": ["order.*"]})),
            (key(Kind::Endpoint, "shop", "b"), serde_json::json!({"eventTypes": ["ordr.*"]})),
            (key(Kind::Filter, "shop", "f"), serde_json::json!({"eventTypes": ["refund.*"]})),
            (key(Kind::Endpoint, "other", "c"), serde_json::json!({"eventTypes": ["anything"]})),
        ];
        let warnings = event_type_warnings(resources.iter().map(|(k, s)| (k, s)));
        let mut warned: Vec<&str> = warnings.keys().map(|k| k.name.as_str()).collect();
        warned.sort();
        assert_eq!(warned, ["b", "f"]);
    }
}
