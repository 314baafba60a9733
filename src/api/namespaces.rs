//! `GET /v1/namespaces`, `GET /v1/namespaces/{name}`, `DELETE /v1/namespaces/{name}`:
//! namespaces with their Namespace (if they have one), the settings they run with, and
//! what they hold.
//!
//! Reading needs `viewer` in the namespace; a namespace the token may not see answers like
//! a missing one, and the list is limited to those it may see. A namespace exists as soon
//! as anything names it: one without a Namespace answers with the server's defaults. The
//! list holds the namespaces with a Namespace or any other stored resource. Deleting a
//! Namespace needs `admin` over every namespace (see [`Principal::authorize_cluster`]);
//! its namespace then runs with the defaults again.

use std::collections::BTreeSet;

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::ApiQuery;
use super::resources::{delete, document};
use super::AppState;
use crate::auth::{Principal, Role};
use crate::duration::DurationText;
use crate::resources::namespace::Settings;
use crate::resources::validate::is_dns_label;
use crate::resources::{Kind, ResourceKey, API_VERSION};
use crate::store::retention::NamespaceUsage;
use crate::store::StoredResource;

fn key(name: &str) -> ResourceKey {
    ResourceKey { kind: Kind::Namespace, namespace: String::new(), name: name.to_owned() }
}

/// The settings in force as the API shows them.
fn settings_json(settings: &Settings) -> Value {
    let text = |d| DurationText(d).to_string();
    json!({
        "retention": {
            "events": text(settings.retention.events),
            "deadLetters": text(settings.retention.dead_letters),
            "attempts": text(settings.retention.attempts),
        },
        "dedupWindow": text(settings.dedup_window),
        "maxEndpoints": settings.max_endpoints,
        "maxPayloadBytes": settings.max_payload_bytes,
        "unknownEventTypes": settings.unknown_event_types,
    })
}

/// Midnight (UTC) of the day `now` is in.
fn day_start(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive().and_hms_opt(0, 0, 0).map_or(now, |t| t.and_utc())
}

/// One namespace as a document: its Namespace (or an empty spec), and a status with the
/// settings it runs with and what it holds.
async fn namespace_document(
    state: &AppState,
    name: &str,
    stored: Option<&StoredResource>,
    endpoints: usize,
) -> Result<Value, ApiError> {
    let catalog = state.catalog.current();
    let settings = catalog.namespace_settings(name, &state.checks.namespace_defaults);
    let NamespaceUsage { events_today, events, deliveries, attempts, oldest_event, capped } =
        state.store.namespace_usage(name, day_start(Utc::now())).await?;
    let mut doc = match stored {
        Some(resource) => document(resource),
        None => json!({ "apiVersion": API_VERSION, "kind": "Namespace", "metadata": { "name": name }, "spec": {} }),
    };
    doc["status"] = json!({
        "resource": stored.is_some(),
        "settings": settings_json(&settings),
        "eventsToday": events_today,
        "rows": { "events": events, "deliveries": deliveries, "attempts": attempts },
        "oldestEvent": oldest_event,
        "endpoints": endpoints,
        "countsCapped": capped,
    });
    Ok(doc)
}

/// Every stored resource (the namespaces they name, their Endpoints).
async fn stored(state: &AppState) -> Result<Vec<StoredResource>, ApiError> {
    Ok(state.store.list_resources(None, None).await?)
}

fn endpoints_of(resources: &[StoredResource], namespace: &str) -> usize {
    resources.iter().filter(|r| r.key.kind == Kind::Endpoint && r.key.namespace == namespace).count()
}

/// The list takes no query parameters: any is refused (`400`), as on the other lists.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {}

pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(ListParams {}): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    principal.require_role(Role::Viewer)?;
    let resources = stored(&state).await?;
    let names: BTreeSet<&str> = resources
        .iter()
        .map(|r| if r.key.kind.is_cluster_scoped() { r.key.name.as_str() } else { r.key.namespace.as_str() })
        .filter(|name| principal.authorize(Role::Viewer, name).is_ok())
        .collect();
    let mut items = Vec::with_capacity(names.len());
    for name in names {
        let resource = resources.iter().find(|r| r.key == key(name));
        items.push(namespace_document(&state, name, resource, endpoints_of(&resources, name)).await?);
    }
    Ok(Json(json!({ "items": items, "next_cursor": null })))
}

pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // A namespace the token may not see answers like one that cannot exist.
    if !is_dns_label(&name) || !principal.may_access(&name) {
        return Err(ApiError::NotFound(format!("namespace `{name}` not found")));
    }
    principal.authorize(Role::Viewer, &name)?;
    let resources = stored(&state).await?;
    let resource = resources.iter().find(|r| r.key == key(&name));
    Ok(Json(namespace_document(&state, &name, resource, endpoints_of(&resources, &name)).await?))
}

pub async fn remove(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    principal.authorize_cluster()?;
    delete(&state, &principal, key(&name)).await
}
