//! `GET /v1/approvals`, `GET /v1/approvals/{id}`, `POST /v1/approvals/{id}/grant|deny`.
//!
//! Thin: parse the input, call the use case in [`crate::approvals`] (which authorizes
//! against the request's namespace and role), map its answer. Checks come in the order
//! `openapi.yaml` documents: query shape, role and namespace, then the values.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, FieldError};
use super::extract::{parse_object_at, read_json_body, ApiQuery};
use super::AppState;
use crate::approvals::view::ApprovalView;
use crate::approvals::{self, ApprovalError, VoteResult, STATES};
use crate::auth::{Principal, Role};

impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> Self {
        match e {
            ApprovalError::NotFound(_) => ApiError::NotFound(e.to_string()),
            ApprovalError::Forbidden(auth) => ApiError::Forbidden(auth),
            ApprovalError::Closed { .. } | ApprovalError::AlreadyVoted { .. } => ApiError::Conflict(e.to_string()),
            ApprovalError::Store(store) => store.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// One namespace; without it, every namespace the token may see.
    namespace: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
}

pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    // The role (and namespace) first, so a caller without it learns nothing from the values.
    match &params.namespace {
        Some(namespace) => principal.authorize(Role::Approver, namespace)?,
        None => principal.require_role(Role::Approver)?,
    }
    let mut errors = Vec::new();
    if let Some(s) = &params.state {
        if !STATES.contains(&s.as_str()) {
            errors.push(FieldError::new("state", format!("unknown state `{s}`; one of {}", STATES.join(", "))));
        }
    }
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 1000"));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let items =
        approvals::list(&state.store, &principal, params.namespace.as_deref(), params.state.as_deref(), limit).await?;
    Ok(Json(json!({ "items": items, "next_cursor": null })))
}

pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ApprovalView>, ApiError> {
    Ok(Json(approvals::show(&state.store, &state.catalog.current(), &principal, &id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoteIn {
    reason: String,
}

pub async fn grant(
    state: State<AppState>,
    principal: Principal,
    id: Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<VoteResult>, ApiError> {
    vote(state, principal, id, headers, body, true).await
}

pub async fn deny(
    state: State<AppState>,
    principal: Principal,
    id: Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<VoteResult>, ApiError> {
    vote(state, principal, id, headers, body, false).await
}

async fn vote(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
    grant: bool,
) -> Result<Json<VoteResult>, ApiError> {
    let bytes = read_json_body(&headers, body, 16 * 1024).await?;
    let input: VoteIn = parse_object_at(&bytes, "")?;
    let reason = input.reason.trim();
    if reason.is_empty() {
        return Err(ApiError::Validation(vec![FieldError::new("reason", "a reason is required")]));
    }
    Ok(Json(approvals::vote(&state.store, &state.wake, &principal, &id, grant, reason).await?))
}
