//! `GET /v1/deliveries`, `GET /v1/deliveries/{id}`, `POST /v1/deliveries/{id}/replay`,
//! `POST /v1/deliveries/replay` (many).

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiError, FieldError};
use super::extract::{parse_json, ApiQuery};
use super::AppState;
use crate::auth::{Principal, Role};
use crate::ids::DeliveryId;
use crate::store::{Attempt, DeliveryQuery, DeliveryRecord, DeliveryState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    namespace: Option<String>,
    endpoint: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

fn parse_state(raw: Option<&str>, errors: &mut Vec<FieldError>) -> Option<DeliveryState> {
    let raw = raw?;
    let state = DeliveryState::parse(raw);
    if state.is_none() {
        let all: Vec<&str> = DeliveryState::ALL.iter().map(|s| s.as_str()).collect();
        errors.push(FieldError::new("state", format!("unknown state `{raw}`; one of {}", all.join(", "))));
    }
    state
}

pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let namespace = params.namespace.unwrap_or_else(|| "default".to_owned());
    principal.authorize(Role::Viewer, &namespace)?;
    let mut errors = Vec::new();
    let wanted = parse_state(params.state.as_deref(), &mut errors);
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 1000"));
    }
    let before = match params.cursor.as_deref().map(DeliveryId::parse) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            errors.push(FieldError::new("cursor", "is not a cursor this API returned"));
            None
        }
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let query =
        DeliveryQuery { namespace, endpoint: params.endpoint, state: wanted, before, limit, ..Default::default() };
    let items = state.store.list_deliveries(&query).await?;
    let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|d| d.id.to_string())).flatten();
    Ok(Json(json!({ "items": items, "next_cursor": next_cursor })))
}

#[derive(Debug, Serialize)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    record: DeliveryRecord,
    attempts_detail: Vec<Attempt>,
}

async fn find(
    state: &AppState,
    principal: &Principal,
    id: &str,
    role: Role,
) -> Result<(DeliveryRecord, Vec<Attempt>), ApiError> {
    let not_found = || ApiError::NotFound(format!("no delivery `{id}`"));
    let parsed = DeliveryId::parse(id).map_err(|_| not_found())?;
    let (record, attempts) = state.store.get_delivery(&parsed).await?.ok_or_else(not_found)?;
    if !principal.may_access(&record.namespace) {
        return Err(not_found());
    }
    principal.authorize(role, &record.namespace)?;
    Ok((record, attempts))
}

pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    let (record, attempts_detail) = find(&state, &principal, &id, Role::Viewer).await?;
    Ok(Json(DeliveryDetail { record, attempts_detail }))
}

pub async fn replay(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (record, _) = find(&state, &principal, &id, Role::Operator).await?;
    if !record.state.is_final() {
        return Err(ApiError::Conflict(format!(
            "delivery `{id}` is {}; only delivered, failed, dead or denied deliveries can be replayed",
            record.state.as_str()
        )));
    }
    let replayed = state.store.replay_deliveries(std::slice::from_ref(&record.id), &principal.subject).await?;
    if replayed.is_empty() {
        return Err(ApiError::Conflict(format!("delivery `{id}` changed state meanwhile; nothing replayed")));
    }
    tracing::info!(delivery_id = %record.id, event_id = %record.event_id, actor = %principal.subject, "delivery replayed");
    state.wake.notify_one();
    let _ = state.store.notify_work().await;
    Ok(Json(json!({ "replayed": replayed })))
}

/// Which deliveries a bulk replay takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayMany {
    namespace: String,
    endpoint: Option<String>,
    /// Default `dead`.
    state: Option<String>,
    /// Only deliveries created at or after this time.
    since: Option<DateTime<Utc>>,
    /// Only deliveries created before this time.
    until: Option<DateTime<Utc>>,
    /// At most this many (default and maximum 1000).
    limit: Option<u32>,
}

pub async fn replay_many(
    State(state): State<AppState>,
    principal: Principal,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = super::extract::read_json_body(&headers, body, 64 * 1024).await?;
    let request: ReplayMany = parse_json(&bytes)?;
    principal.authorize(Role::Operator, &request.namespace)?;
    let mut errors = Vec::new();
    let wanted = parse_state(Some(request.state.as_deref().unwrap_or("dead")), &mut errors);
    if wanted.is_some_and(|s| !s.is_final()) {
        errors.push(FieldError::new("state", "only delivered, failed, dead or denied deliveries can be replayed"));
    }
    let limit = request.limit.unwrap_or(1000);
    if !(1..=1000).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 1000"));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let query = DeliveryQuery {
        namespace: request.namespace,
        endpoint: request.endpoint,
        state: wanted,
        before: None,
        created_since: request.since,
        created_until: request.until,
        limit,
    };
    let ids: Vec<DeliveryId> = state.store.list_deliveries(&query).await?.into_iter().map(|d| d.id).collect();
    let replayed = state.store.replay_deliveries(&ids, &principal.subject).await?;
    tracing::info!(count = replayed.len(), actor = %principal.subject, "deliveries replayed");
    state.wake.notify_one();
    let _ = state.store.notify_work().await;
    Ok(Json(json!({ "replayed": replayed })))
}
