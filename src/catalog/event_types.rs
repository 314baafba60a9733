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
