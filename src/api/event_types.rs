//! `GET /v1/event-types`, `GET /v1/event-types/{namespace}/{name}`: the catalog of event
//! types in force, each with its description, schema, examples, and the endpoints whose
//! `eventTypes` globs take it.
//!
//! Scoped like the resource reads: `viewer` in the namespace; a list without a namespace
//! is silently limited to the namespaces the token may see, and a type in a namespace it
//! may not see answers like a missing one. Answers come from the catalog in force (what
//! ingest checks events by), so an apply in this process shows at once, in others within
//! their refresh.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::extract::ApiQuery;
use super::AppState;
use crate::auth::{Principal, Role};
use crate::catalog::{Catalog, EventTypeEntry};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    namespace: Option<String>,
}

/// An event type as the catalog shows it.
#[derive(Debug, Serialize)]
pub struct EventTypeOut {
    namespace: String,
    name: String,
    description: Option<String>,
    /// The JSON Schema of `data`; `null`: any data.
    schema: Option<Value>,
    examples: Vec<Value>,
    deprecated: bool,
    /// Endpoints of the namespace whose `eventTypes` globs take the type (none: every
    /// type), by name. Their Filters still decide per event.
    subscribers: Vec<String>,
}

impl EventTypeOut {
    fn of(catalog: &Catalog, entry: &EventTypeEntry) -> Self {
        EventTypeOut {
            namespace: entry.namespace.clone(),
            name: entry.name.clone(),
            description: entry.description.clone(),
            schema: entry.schema.clone(),
            examples: entry.examples.clone(),
            deprecated: entry.deprecated,
            subscribers: catalog.subscribers(entry).into_iter().map(str::to_owned).collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventTypeList {
    items: Vec<EventTypeOut>,
    next_cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<EventTypeList>, ApiError> {
    match &params.namespace {
        Some(namespace) => principal.authorize(Role::Viewer, namespace)?,
        None => principal.require_role(Role::Viewer)?,
    }
    let catalog = state.catalog.current();
    let items = catalog
        .event_types(params.namespace.as_deref())
        .into_iter()
        .filter(|t| principal.authorize(Role::Viewer, &t.namespace).is_ok())
        .map(|t| EventTypeOut::of(&catalog, t))
        .collect();
    Ok(Json(EventTypeList { items, next_cursor: None }))
}

pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<EventTypeOut>, ApiError> {
    let not_found = || ApiError::NotFound(format!("no EventType `{name}` in namespace `{namespace}`"));
    // Namespaces the token may not see answer like missing types.
    if !principal.may_access(&namespace) {
        return Err(not_found());
    }
    principal.authorize(Role::Viewer, &namespace)?;
    let catalog = state.catalog.current();
    let entry = catalog.event_type(&namespace, &name).ok_or_else(not_found)?;
    Ok(Json(EventTypeOut::of(&catalog, entry)))
}
