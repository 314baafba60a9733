//! `GET /v1/audit`, `GET /v1/audit/export` (NDJSON, streamed), `GET /v1/audit/checkpoint`.
//! Role `auditor` in the namespace (its chain); `_cluster` needs `auditor` on every namespace.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, FieldError};
use super::extract::ApiQuery;
use super::AppState;
use crate::auth::{Principal, Role};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    namespace: Option<String>,
    /// Records after this seq.
    after: Option<i64>,
    limit: Option<u32>,
}

fn chain_of(principal: &Principal, namespace: Option<String>) -> Result<String, ApiError> {
    let chain = namespace.unwrap_or_else(|| "default".to_owned());
    let scope = if chain == crate::audit::CLUSTER_CHAIN { "*" } else { chain.as_str() };
    principal.authorize(Role::Auditor, scope)?;
    Ok(chain)
}

pub async fn page(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<PageParams>,
) -> Result<Json<Value>, ApiError> {
    let chain = chain_of(&principal, params.namespace)?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Validation(vec![FieldError::new("limit", "must be between 1 and 1000")]));
    }
    let after = params.after.unwrap_or(0).max(0);
    let items = state.store.audit_records(&chain, after + 1, i64::MAX, limit).await?;
    let next_cursor = (items.len() == limit as usize).then(|| items.last().map(|r| r.seq.to_string())).flatten();
    Ok(Json(json!({ "items": items, "next_cursor": next_cursor })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    namespace: Option<String>,
    from: Option<i64>,
    to: Option<i64>,
}

/// Streams the records, then the latest checkpoint, one JSON object per line. Memory stays
/// flat whatever the chain's length: records are read a page at a time.
pub async fn export(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ExportParams>,
) -> Result<Response, ApiError> {
    let chain = chain_of(&principal, params.namespace)?;
    let from = params.from.unwrap_or(1).max(1);
    let to = params.to.unwrap_or(i64::MAX);
    if to < from {
        return Err(ApiError::Validation(vec![FieldError::new("to", "must not be below `from`")]));
    }
    let checkpoint = checkpoint_line(&state, &chain).await?;
    let store = state.store.clone();
    struct Cursor {
        next: i64,
        done: bool,
        checkpoint: Option<String>,
    }
    let stream = futures_util::stream::unfold(Cursor { next: from, done: false, checkpoint }, move |mut cursor| {
        let (store, chain) = (store.clone(), chain.clone());
        async move {
            if cursor.done {
                return cursor.checkpoint.take().map(|line| (Ok::<_, std::io::Error>(line), cursor));
            }
            match store.audit_records(&chain, cursor.next, to, 1000).await {
                Ok(records) if records.is_empty() => {
                    cursor.done = true;
                    cursor.checkpoint.take().map(|line| (Ok(line), cursor))
                }
                Ok(records) => {
                    cursor.next = records.last().map(|r| r.seq + 1).unwrap_or(i64::MAX);
                    let mut text = String::new();
                    for r in &records {
                        text.push_str(&serde_json::to_string(r).unwrap_or_default());
                        text.push('\n');
                    }
                    Some((Ok(text), cursor))
                }
                Err(e) => {
                    tracing::error!(error = %e, "audit export interrupted");
                    Some((
                        Err(std::io::Error::other("audit export interrupted")),
                        Cursor { next: i64::MAX, done: true, checkpoint: None },
                    ))
                }
            }
        }
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

async fn checkpoint_line(state: &AppState, chain: &str) -> Result<Option<String>, ApiError> {
    let latest = state.store.latest_checkpoint(chain).await?;
    Ok(latest.map(|(seq, hash, note)| {
        let line = json!({"checkpoint": {"namespace": chain, "seq": seq, "hash": hash, "note": note, "public_key": state.audit_public_key.as_str()}});
        format!("{line}\n")
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointParams {
    namespace: Option<String>,
}

pub async fn checkpoint(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<CheckpointParams>,
) -> Result<Json<Value>, ApiError> {
    let chain = chain_of(&principal, params.namespace)?;
    let (seq, hash, note) = state
        .store
        .latest_checkpoint(&chain)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no checkpoint of `{chain}` yet")))?;
    Ok(Json(
        json!({"namespace": chain, "seq": seq, "hash": hash, "note": note, "public_key": state.audit_public_key.as_str()}),
    ))
}
