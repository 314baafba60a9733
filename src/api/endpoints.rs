//! `GET /v1/endpoints/{namespace}/{name}/health` and
//! `POST /v1/endpoints/{namespace}/{name}/enable`.
//!
//! Enabling is an operator's "recover": it clears a 410's disabling, an open breaker and
//! the failure count without a spec change, audited, and sends what waited.

use axum::extract::{Path, State};
use axum::Json;
use chrono::Utc;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::auth::{Principal, Role};
use crate::catalog::{EndpointEntry, Sendability};

/// The endpoint `namespace/name` as the caller may see it with `role`.
fn find(
    state: &AppState,
    principal: &Principal,
    namespace: &str,
    name: &str,
    role: Role,
) -> Result<std::sync::Arc<EndpointEntry>, ApiError> {
    let not_found = || ApiError::NotFound(format!("no endpoint `{name}` in namespace `{namespace}`"));
    // Namespaces the token may not see answer like missing endpoints.
    if !principal.may_access(namespace) {
        return Err(not_found());
    }
    principal.authorize(role, namespace)?;
    state.catalog.current().endpoint(namespace, name).ok_or_else(not_found)
}

pub async fn health(
    State(state): State<AppState>,
    principal: Principal,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let entry = find(&state, &principal, &namespace, &name, Role::Viewer)?;
    let now = Utc::now();
    let endpoint_state = state.store.endpoint_state(&namespace, &name).await?;
    let day = state.store.attempt_stats(&namespace, &name, now - chrono::Duration::hours(24)).await?;
    let hour = state.store.attempt_stats(&namespace, &name, now - chrono::Duration::hours(1)).await?;
    let rate = |s: &crate::store::AttemptStats| (s.attempts > 0).then(|| s.successes as f64 / s.attempts as f64);
    let mut durations = hour.durations_ms.clone();
    durations.sort_unstable();
    let average = (!durations.is_empty()).then(|| durations.iter().sum::<i64>() as f64 / durations.len() as f64);
    let p95 = (!durations.is_empty())
        .then(|| durations[((durations.len() as f64 * 0.95).ceil() as usize).clamp(1, durations.len()) - 1]);
    let breaker = match (endpoint_state.disabled_reason.as_ref(), endpoint_state.breaker_open_until) {
        (Some(_), _) => "disabled",
        (None, Some(until)) if until > now => "open",
        (None, Some(_)) => "half-open",
        (None, None) => "closed",
    };
    let sendability = Sendability::of(Some(&entry), Some(&endpoint_state), now);
    Ok(Json(json!({
        "namespace": namespace,
        "name": name,
        "state": sendability.as_str(),
        "blocked": entry.blocked,
        "successRate1h": rate(&hour),
        "successRate24h": rate(&day),
        "attempts1h": hour.attempts,
        "attempts24h": day.attempts,
        "consecutiveFailures": endpoint_state.consecutive_failures,
        "latencyMs1h": { "average": average, "p95": p95 },
        "lastSuccessAt": endpoint_state.last_success_at,
        "breaker": breaker,
        "breakerOpenUntil": endpoint_state.breaker_open_until,
        "disabledReason": endpoint_state.disabled_reason,
    })))
}

pub async fn enable(
    State(state): State<AppState>,
    principal: Principal,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &principal, &namespace, &name, Role::Operator)?;
    let before = state.store.enable_endpoint(&namespace, &name, &principal.subject).await?;
    let enabled = before.is_some();
    if let Some(before) = &before {
        tracing::info!(endpoint = %name, %namespace, actor = %principal.subject,
            disabled_reason = before.disabled_reason.as_deref().unwrap_or(""), "endpoint enabled by an operator");
        state.wake.notify_one();
        let _ = state.store.notify_work().await;
        state.status_changed().await;
    }
    Ok(Json(json!({
        "namespace": namespace,
        "name": name,
        "enabled": enabled,
        "was": before.map(|b| json!({
            "disabledReason": b.disabled_reason,
            "breakerOpenUntil": b.breaker_open_until,
            "consecutiveFailures": b.consecutive_failures,
        })),
    })))
}
