//! `GET /healthz` (the process answers) and `GET /readyz` (it can do its work).
//!
//! Both are unauthenticated: they say whether the process works, never anything about a
//! namespace's secret references (whether they can be read, what they name).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{ApiError, AppState};

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when not shutting down and the database answered its last probe with every
/// migration applied. Answers at once: the probe runs in the background (see
/// [`crate::store::DatabaseHealth`]), so a database that hangs cannot hang this.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("the server is shutting down".into()));
    }
    // The background probe's verdict, and (at once, between probes) a write that failed for
    // a reason of the database itself.
    state.health.current().map_err(|why| ApiError::Unavailable(format!("not ready: {why}")))?;
    if let Some(why) = state.store.writes_failing() {
        return Err(ApiError::Unavailable(format!("not ready: writes to the database fail: {why}")));
    }
    let mut controller = state.controller.lock().map(|s| s.clone()).unwrap_or_default();
    controller.leader = state.leadership.is_leader();
    // Endpoints this process cannot send to (their deliveries wait): ready, but say so.
    // Not why in words: the message names the endpoint's secret references, which are
    // for its namespace's viewers (its status), not for anyone who can reach this route.
    let catalog = state.catalog.current();
    let blocked: Vec<Value> = catalog
        .blocked()
        .into_iter()
        .map(|(e, b)| json!({ "namespace": e.namespace, "name": e.name, "reason": b.reason.as_str() }))
        .collect();
    Ok(Json(json!({
        "status": "ready",
        "database": state.store.backend(),
        "controller": controller,
        "endpoints": { "blocked": blocked },
    })))
}

/// Prometheus text format.
pub async fn metrics() -> impl axum::response::IntoResponse {
    let body = crate::telemetry::metrics().render();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
