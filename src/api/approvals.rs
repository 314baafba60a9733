//! `GET /v1/approvals`, `GET /v1/approvals/{id}`, `POST /v1/approvals/{id}/grant|deny`.
//!
//! Votes need the role the holding rule names (`approver` by default) in the namespace;
//! the subject that submitted the event cannot vote on it; the first final decision wins
//! and every later vote gets 409.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, FieldError};
use super::extract::{parse_object_at, read_json_body, ApiQuery};
use super::AppState;
use crate::auth::{AuthError, Principal, Role};
use crate::store::policy::{ApprovalRecord, VoteOutcome};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    namespace: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
}

const STATES: [&str; 4] = ["pending", "granted", "denied", "expired"];

pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let namespace = params.namespace.unwrap_or_else(|| "default".to_owned());
    principal.authorize(Role::Approver, &namespace)?;
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
    let items = state.store.list_approvals(&namespace, params.state.as_deref(), limit).await?;
    Ok(Json(json!({ "items": items, "next_cursor": null })))
}

async fn find(state: &AppState, principal: &Principal, id: &str) -> Result<(ApprovalRecord, Value), ApiError> {
    let not_found = || ApiError::NotFound(format!("no approval request `{id}`"));
    let (approval, votes) = state.store.get_approval(id).await?.ok_or_else(not_found)?;
    if !principal.may_access(&approval.namespace) {
        return Err(not_found());
    }
    let votes = json!(votes);
    Ok((approval, votes))
}

pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (approval, votes) = find(&state, &principal, &id).await?;
    principal.authorize(Role::Approver, &approval.namespace)?;
    let mut body = json!(approval);
    body["votes"] = votes;
    Ok(Json(body))
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
) -> Result<Json<Value>, ApiError> {
    vote(state, principal, id, headers, body, true).await
}

pub async fn deny(
    state: State<AppState>,
    principal: Principal,
    id: Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    vote(state, principal, id, headers, body, false).await
}

async fn vote(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
    grant: bool,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_json_body(&headers, body, 16 * 1024).await?;
    let input: VoteIn = parse_object_at(&bytes, "")?;
    if input.reason.trim().is_empty() {
        return Err(ApiError::Validation(vec![FieldError::new("reason", "a reason is required")]));
    }
    let (approval, _) = find(&state, &principal, &id).await?;
    let role = match approval.role.as_str() {
        "admin" => Role::Admin,
        "operator" => Role::Operator,
        _ => Role::Approver,
    };
    principal.authorize(role, &approval.namespace)?;
    if principal.subject == approval.requested_by {
        return Err(ApiError::Forbidden(AuthError::SelfApproval));
    }
    let outcome = state.store.vote_on_approval(&id, &principal.subject, grant, input.reason.trim(), Utc::now()).await?;
    let verb = if grant { "grant" } else { "deny" };
    tracing::info!(approval_id = %id, voter = %principal.subject, vote = verb, outcome = ?outcome, "approval vote");
    match outcome {
        VoteOutcome::Counted { grants, quorum } => {
            Ok(Json(json!({ "id": id, "state": "pending", "grants": grants, "quorum": quorum })))
        }
        VoteOutcome::Decided(decided) => {
            let outcome = if grant { "granted" } else { "denied" };
            metrics::counter!("hookwarden_policy_approvals_total", "outcome" => outcome).increment(1);
            let waited = (Utc::now() - approval.created_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("hookwarden_policy_approval_seconds", "outcome" => outcome).record(waited);
            if grant {
                state.wake.notify_one();
                let _ = state.store.notify_work().await;
            }
            Ok(Json(json!({ "id": id, "state": decided })))
        }
        VoteOutcome::Closed(closed) => Err(ApiError::Conflict(format!("approval request `{id}` is already {closed}"))),
        VoteOutcome::AlreadyVoted => {
            Err(ApiError::Conflict(format!("`{}` already voted on `{id}`", principal.subject)))
        }
        VoteOutcome::NotFound => Err(ApiError::NotFound(format!("no approval request `{id}`"))),
    }
}
