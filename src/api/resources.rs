//! `POST /v1/apply`, `GET /v1/resources/{kind}[/{namespace}/{name}]`,
//! `DELETE /v1/resources/{kind}/{namespace}/{name}`.
//!
//! Applying needs `operator` on every namespace the apply touches (pruned resources
//! included), and `admin` over every namespace when it applies or prunes a Namespace
//! (cluster-scoped, stored under the namespace `""`, which no token names); reading needs
//! `viewer`. An apply set is a name within a namespace: a prune
//! reaches its set's members in the token's namespaces only. Secret values never leave the server: every spec
//! shown is redacted (signing secrets, and header values not listed in `plainHeaders`),
//! every diff too.
//!
//! An apply body is not read at all unless the caller holds `operator` somewhere, and is
//! read only up to `apply.maxBodyBytes`; its documents are then read on a reader thread
//! (see [`crate::threads`]), within [`ApplyLimits`]. So neither a token without the role
//! nor a hostile body can stall the async workers (`/healthz`, ingest) or hold more than
//! the limits allow.

use std::collections::{BTreeSet, HashMap};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiError, FieldError};
use super::extract::{parse_json, ApiQuery};
use super::AppState;
use crate::auth::{Principal, Role};
use crate::catalog::event_types::{event_type_warnings, Warning};
use crate::controller::apply::{apply, ApplyError, ApplyOptions};
use crate::resources::diff::{diff, redact};
use crate::resources::{parse_files_within, ApplyLimits, Kind, Parsed, ResourceKey, API_VERSION};
use crate::store::resources::set_reaches;
use crate::store::{ApplyAction, ApplyOutcome, StoredResource};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplyParams {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    prune: bool,
    applyset: Option<String>,
}

/// The JSON form of an apply body, which keeps file names for error messages.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyFiles {
    files: Vec<ApplyFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyFile {
    name: String,
    content: String,
}

#[derive(Debug, Serialize)]
pub struct ApplyResult {
    kind: Kind,
    /// None for a cluster-scoped resource.
    #[serde(skip_serializing_if = "String::is_empty")]
    namespace: String,
    name: String,
    action: ApplyAction,
    generation: i64,
    /// What changed, one line per field (`~ spec.timeout: "10s" → "5s"`), secrets redacted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    diff: Vec<String>,
    /// An Endpoint a 410 had disabled, enabled again because its spec changed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reenabled: bool,
    /// What applies but likely is not meant: an Endpoint's or Filter's `eventTypes` glob
    /// that matches no EventType of its namespace (see
    /// [`crate::catalog::event_types::unmatched_event_types`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<Warning>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    dry_run: bool,
    results: Vec<ApplyResult>,
}

fn media_type(headers: &HeaderMap) -> String {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// The apply body, read but not yet parsed.
enum ApplyBody {
    Yaml(bytes::Bytes),
    Json(bytes::Bytes),
}

/// Reads the apply body (multi-document YAML, or JSON `{"files": [{"name", "content"}]}`)
/// up to `limit` bytes.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<ApplyBody, ApiError> {
    let media = media_type(headers);
    let yaml = matches!(media.as_str(), "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml");
    let json = media == "application/json";
    if !yaml && !json {
        return Err(ApiError::UnsupportedMediaType(
            "send YAML (`Content-Type: application/yaml`) or JSON files (`Content-Type: application/json`)",
        ));
    }
    let mut json_headers = headers.clone();
    json_headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    let bytes = super::extract::read_json_body(&json_headers, body, limit).await?;
    Ok(if json { ApplyBody::Json(bytes) } else { ApplyBody::Yaml(bytes) })
}

/// The documents of the body, within `limits`. Runs on the blocking pool.
fn parse_body(body: ApplyBody, limits: &ApplyLimits) -> Result<Parsed, ApiError> {
    let files: Vec<(String, String)> = match body {
        ApplyBody::Json(bytes) => {
            let files: ApplyFiles = parse_json(&bytes)?;
            files.files.into_iter().map(|f| (f.name, f.content)).collect()
        }
        ApplyBody::Yaml(bytes) => {
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| ApiError::Validation(vec![FieldError::new("(body)", "YAML must be UTF-8 text")]))?;
            vec![("(body)".to_owned(), text)]
        }
    };
    Ok(parse_files_within(files.iter().map(|(n, t)| (n.as_str(), t.as_str())), limits))
}

/// Reads the documents of the body on a reader thread (see [`crate::threads`]).
async fn read_documents(state: &AppState, body: ApplyBody) -> Result<Parsed, ApiError> {
    let limits = state.config.apply.clone();
    state.reading.run(move || parse_body(body, &limits)).await.map_err(|e| ApiError::Internal(e.into()))?
}

pub async fn apply_resources(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ApplyParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ApplyResponse>, ApiError> {
    // Before a byte of the body is read: the role somewhere (the namespaces are known only
    // once the documents are), then the size.
    principal.require_role(Role::Operator)?;
    let body = read_body(&headers, body, state.config.apply.max_body_bytes).await?;
    let parsed = read_documents(&state, body).await?;
    // Documents that did not parse are checked no further; their errors come back with
    // those of the others, which need the caller's rights first (they look at what is
    // stored).
    // An apply set is a name within a namespace: the caller's set is its members in the
    // caller's namespaces, and another tenant's set of the same name is neither seen nor
    // touched (nor named in a refusal).
    let reach = principal.namespace_scope().map(<[String]>::to_vec);
    let mut namespaces: BTreeSet<String> =
        parsed.resources.iter().map(|l| l.resource.metadata.namespace.clone()).collect();
    let mut cluster_scoped = parsed.resources.iter().any(|l| l.resource.kind().is_cluster_scoped());
    if params.prune {
        if let Some(set) = &params.applyset {
            let members = state.store.list_resources(None, None).await?;
            let reached = members
                .into_iter()
                .filter(|m| m.applyset.as_ref() == Some(set) && set_reaches(reach.as_deref(), &m.key.namespace));
            for member in reached {
                cluster_scoped |= member.key.kind.is_cluster_scoped();
                namespaces.insert(member.key.namespace);
            }
        }
    }
    // A Namespace (stored under no namespace) needs `admin` over every namespace.
    if cluster_scoped {
        principal.authorize_cluster()?;
    }
    for namespace in namespaces.iter().filter(|n| !n.is_empty()) {
        principal.authorize(Role::Operator, namespace)?;
    }
    let options = ApplyOptions {
        applyset: params.applyset,
        prune: params.prune,
        namespaces: reach,
        dry_run: params.dry_run,
        checks: state.checks.clone(),
        actor: principal.subject.clone(),
        leader: None,
    };
    let desired: Vec<(ResourceKey, Value)> = parsed
        .resources
        .iter()
        .map(|l| {
            let m = &l.resource.metadata;
            let shown = json!({"metadata": {"labels": m.labels, "annotations": m.annotations}, "spec": l.resource.spec.to_json()});
            (l.resource.key(), shown)
        })
        .collect();
    let outcomes = apply(&state.store, parsed, &options).await.map_err(|e| match e {
        ApplyError::Invalid(errors) => ApiError::InvalidResources(errors),
        ApplyError::Usage(message) => ApiError::Validation(vec![FieldError::new("applyset", message)]),
        ApplyError::Store(e) => e.into(),
        e @ ApplyError::Validation(_) => ApiError::Internal(e.into()),
    })?;
    if !params.dry_run && outcomes.iter().any(|o| o.action != ApplyAction::Unchanged) {
        refresh_catalog(&state).await;
        for o in outcomes.iter().filter(|o| o.action != ApplyAction::Unchanged) {
            tracing::info!(resource = %o.key, action = ?o.action, generation = o.generation, actor = %principal.subject, "resource applied");
            if o.reenabled {
                tracing::info!(endpoint = %o.key.name, namespace = %o.key.namespace, "endpoint enabled again: its spec changed since it answered 410");
            }
        }
        state.status_changed().await;
        if outcomes.iter().any(|o| o.reenabled) {
            state.wake.notify_one();
            let _ = state.store.notify_work().await;
        }
    }
    let mut warnings = warnings_after(&state, &desired, &outcomes).await?;
    let results = outcomes
        .iter()
        .map(|o| {
            let mut result = result(o, desired.iter().find(|(k, _)| *k == o.key).map(|(_, s)| s));
            result.warnings = warnings.remove(&o.key).unwrap_or_default();
            result
        })
        .collect();
    Ok(Json(ApplyResponse { dry_run: params.dry_run, results }))
}

/// The warnings of the resources in force once the apply is done (a dry run's as if it
/// were): what is stored, as `desired` has it, less what was pruned.
async fn warnings_after(
    state: &AppState,
    desired: &[(ResourceKey, Value)],
    outcomes: &[ApplyOutcome],
) -> Result<HashMap<ResourceKey, Vec<Warning>>, ApiError> {
    let mut in_force: HashMap<ResourceKey, Value> =
        state.store.list_resources(None, None).await?.into_iter().map(|r| (r.key, r.spec)).collect();
    for (key, shown) in desired {
        in_force.insert(key.clone(), shown["spec"].clone());
    }
    for pruned in outcomes.iter().filter(|o| o.action == ApplyAction::Pruned) {
        in_force.remove(&pruned.key);
    }
    Ok(event_type_warnings(in_force.iter()))
}

/// `desired` is `{"metadata": {"labels", "annotations"}, "spec"}` as applied.
fn result(outcome: &ApplyOutcome, desired: Option<&Value>) -> ApplyResult {
    let kind = outcome.key.kind;
    let before = outcome
        .previous
        .as_ref()
        .map(|p| json!({"metadata": {"labels": p.labels, "annotations": p.annotations}, "spec": p.spec}));
    let lines = match (outcome.action, before, desired) {
        (ApplyAction::Pruned, Some(before), _) => diff(kind, &before, &json!({})),
        (ApplyAction::Created, _, Some(after)) => diff(kind, &json!({}), after),
        (ApplyAction::Configured, Some(before), Some(after)) => diff(kind, &before, after),
        _ => Vec::new(),
    };
    ApplyResult {
        kind: outcome.key.kind,
        namespace: outcome.key.namespace.clone(),
        name: outcome.key.name.clone(),
        action: outcome.action,
        generation: outcome.generation,
        diff: lines,
        reenabled: outcome.reenabled,
        warnings: Vec::new(),
    }
}

/// A stored resource as a document, secrets redacted.
pub fn document(resource: &StoredResource) -> Value {
    let mut spec = resource.spec.clone();
    redact(resource.key.kind, &mut spec);
    let mut metadata = json!({
        "name": resource.key.name,
        "generation": resource.generation,
        "createdAt": resource.created_at,
        "updatedAt": resource.updated_at,
    });
    // A cluster-scoped resource has no namespace (and would be refused with one).
    if !resource.key.kind.is_cluster_scoped() {
        metadata["namespace"] = json!(resource.key.namespace);
    }
    if !resource.labels.is_empty() {
        metadata["labels"] = json!(resource.labels);
    }
    if !resource.annotations.is_empty() {
        metadata["annotations"] = json!(resource.annotations);
    }
    if let Some(set) = &resource.applyset {
        metadata["applyset"] = json!(set);
    }
    let mut doc =
        json!({ "apiVersion": API_VERSION, "kind": resource.key.kind.as_str(), "metadata": metadata, "spec": spec });
    if let Some(status) = &resource.status {
        doc["status"] = status.clone();
    }
    doc
}

/// Makes this process fan out by what was just written at once. Other processes follow
/// within a second, and before that their ingest commits see the revision move and fan
/// out again (see `crate::ingest`).
async fn refresh_catalog(state: &AppState) {
    if let Err(e) = state.catalog.refresh(&state.store).await {
        tracing::warn!(error = %e, "could not refresh the endpoint catalog; the periodic refresh will");
    }
}

fn parse_kind(raw: &str) -> Result<Kind, ApiError> {
    Kind::parse(raw)
        .ok_or_else(|| ApiError::NotFound(format!("unknown kind `{raw}`; one of {}", crate::resources::KIND_NAMES)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListResourcesParams {
    namespace: Option<String>,
}

pub async fn list_resources(
    State(state): State<AppState>,
    principal: Principal,
    Path(kind): Path<String>,
    ApiQuery(params): ApiQuery<ListResourcesParams>,
) -> Result<Json<Value>, ApiError> {
    let kind = parse_kind(&kind)?;
    match &params.namespace {
        Some(namespace) => principal.authorize(Role::Viewer, namespace)?,
        None => principal.require_role(Role::Viewer)?,
    }
    let stored = state.store.list_resources(Some(kind), params.namespace.as_deref()).await?;
    let items: Vec<Value> =
        stored.iter().filter(|r| principal.authorize(Role::Viewer, &r.key.namespace).is_ok()).map(document).collect();
    Ok(Json(json!({ "items": items, "next_cursor": null })))
}

async fn find(
    state: &AppState,
    principal: &Principal,
    kind: &str,
    namespace: String,
    name: String,
    role: Role,
) -> Result<(ResourceKey, StoredResource), ApiError> {
    let kind = parse_kind(kind)?;
    let key = ResourceKey { kind, namespace, name };
    let not_found =
        || ApiError::NotFound(format!("{} `{}` not found in namespace `{}`", key.kind, key.name, key.namespace));
    // Namespaces the token may not see answer like missing resources.
    if !principal.may_access(&key.namespace) {
        return Err(not_found());
    }
    principal.authorize(role, &key.namespace)?;
    let stored = state.store.get_resource(&key).await?.ok_or_else(not_found)?;
    Ok((key, stored))
}

pub async fn get_resource(
    State(state): State<AppState>,
    principal: Principal,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (_, stored) = find(&state, &principal, &kind, namespace, name, Role::Viewer).await?;
    Ok(Json(document(&stored)))
}

pub async fn delete_resource(
    State(state): State<AppState>,
    principal: Principal,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (key, _) = find(&state, &principal, &kind, namespace, name, Role::Operator).await?;
    delete(&state, &principal, key).await
}

/// Deletes the resource at `key` (the caller is authorized), audited, and refreshes the
/// catalog.
pub(super) async fn delete(state: &AppState, principal: &Principal, key: ResourceKey) -> Result<Json<Value>, ApiError> {
    let deleted = state
        .store
        .delete_resource(&key, &principal.subject)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{key} not found")))?;
    tracing::info!(resource = %key, actor = %principal.subject, "resource deleted");
    refresh_catalog(state).await;
    state.status_changed().await;
    let mut answer =
        json!({ "kind": key.kind, "name": key.name, "action": "deleted", "generation": deleted.generation });
    if !key.kind.is_cluster_scoped() {
        answer["namespace"] = json!(key.namespace);
    }
    Ok(Json(answer))
}
