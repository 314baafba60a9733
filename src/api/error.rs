//! The one error type of the HTTP API and its JSON shape:
//! `{"error": {"code", "message", "details"}}`.
//!
//! `code` is a stable machine-readable string (part of the API contract); `message` is for
//! people; `details` carries field errors. 5xx bodies reveal nothing and are logged here,
//! once.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};

use crate::auth::AuthError;
use crate::ingest::quota::{Refusal, Usage};
use crate::ingest::types::{ItemViolation, TypeError};

/// One problem with one field of the input, `path` in `a.b[2].c` form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{}", summarize(.0))]
    Validation(Vec<FieldError>),
    #[error("{}: the key appears more than once in its object", .0.path)]
    DuplicateKey(FieldError),
    #[error("{0}")]
    BadRequest(String),
    /// Events whose data fails their EventType's schema; `batch`: the request was a batch
    /// (each violation names its item).
    #[error("{}", summarize_violations(.violations))]
    SchemaViolation { violations: Vec<ItemViolation>, batch: bool },
    /// Events of types without an EventType, in a namespace that refuses those.
    #[error("{}", summarize(.errors))]
    UnknownEventType { errors: Vec<FieldError>, items: Option<Vec<usize>> },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// Events whose `data` is over their namespace's `quotas.maxPayloadBytes`.
    #[error("{}", summarize(.0))]
    DataTooLarge(Vec<FieldError>),
    /// Over a namespace's `quotas.ingest` (`429`, with `Retry-After` and the `RateLimit`
    /// fields).
    #[error("{}", quota_message(.0))]
    QuotaExceeded(crate::ingest::quota::Refusal),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(&'static str),
    #[error("{0}")]
    Unauthenticated(AuthError),
    #[error("{0}")]
    Forbidden(AuthError),
    #[error("{0}")]
    NotFound(String),
    #[error("no route for {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("{} invalid: {}", if .0.len() == 1 { "a resource document is" } else { "resource documents are" }, .0.first().map(ToString::to_string).unwrap_or_default())]
    InvalidResources(Vec<crate::resources::ResourceError>),
    #[error("{0}")]
    Conflict(String),
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("the server is overloaded; retry later")]
    Overloaded,
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

fn summarize_violations(violations: &[ItemViolation]) -> String {
    match violations {
        [one] => format!("{}: {}", one.violation.path, one.violation.message),
        _ => format!("{} schema violations", violations.len()),
    }
}

impl ApiError {
    /// The refusal of a request's events by their EventTypes; `batch`: the request was
    /// `POST /v1/events/batch`, whose details name each event's index as `item`.
    pub fn from_types(error: TypeError, batch: bool) -> ApiError {
        match error {
            TypeError::Violations(violations) => ApiError::SchemaViolation { violations, batch },
            TypeError::Unknown(unknown) => ApiError::UnknownEventType {
                items: batch.then(|| unknown.iter().map(|u| u.item).collect()),
                errors: unknown
                    .into_iter()
                    .map(|u| {
                        FieldError::new(
                            "/type",
                            format!(
                                "no EventType `{}` in namespace `{}`, which refuses event types it does not know (its Namespace's unknownEventTypes, or ingest.unknownEventTypes)",
                                u.event_type, u.namespace
                            ),
                        )
                    })
                    .collect(),
            },
        }
    }
}

impl ApiError {
    /// The refusal of events whose `data` is over their namespace's `maxPayloadBytes`, each
    /// at `data` (`[3].data` in a batch).
    pub fn data_too_large(items: Vec<crate::ingest::TooLarge>, batch: bool) -> ApiError {
        ApiError::DataTooLarge(
            items
                .into_iter()
                .map(|t| {
                    let path = if batch { format!("[{}].data", t.item) } else { "data".to_owned() };
                    let message = format!(
                        "is {} bytes; namespace `{}` takes at most {} (its Namespace's spec.quotas.maxPayloadBytes)",
                        t.size, t.namespace, t.limit
                    );
                    FieldError::new(path, message)
                })
                .collect(),
        )
    }
}

fn summarize(errors: &[FieldError]) -> String {
    match errors {
        [one] => format!("{}: {}", one.path, one.message),
        _ => format!("{} fields are invalid", errors.len()),
    }
}

/// The usage, the events wanted and the seconds to wait (none: waiting does not help).
fn refusal_parts(refusal: &Refusal) -> (&Usage, u64, Option<u64>) {
    match refusal {
        Refusal::Rate { usage, wanted, retry_after } | Refusal::Day { usage, wanted, retry_after } => {
            (usage, *wanted, Some(*retry_after))
        }
        Refusal::TooMany { usage, wanted, .. } => (usage, *wanted, None),
    }
}

fn quota_message(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Rate { usage, wanted, retry_after } => format!(
            "namespace `{}` may ingest {} events per second (burst {}); {wanted} do not fit now, retry in {retry_after}s",
            usage.namespace, usage.limit.per_second, usage.limit.burst
        ),
        Refusal::Day { usage, wanted, retry_after } => format!(
            "namespace `{}` may ingest {} events per UTC day; {wanted} more are over it, retry after the next UTC midnight (in {retry_after}s)",
            usage.namespace,
            usage.limit.per_day.unwrap_or_default()
        ),
        Refusal::TooMany { usage, wanted, most } => format!(
            "namespace `{}` takes at most {most} events at once (its quotas.ingest); split the {wanted} events into smaller requests",
            usage.namespace
        ),
    }
}

/// Sets `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) to
/// `usage`.
pub fn insert_rate_limit(headers: &mut axum::http::HeaderMap, usage: &Usage) {
    // Digits, quotes, `;`, `=`, `,` and spaces: always a valid header value.
    for (name, value) in [("ratelimit-policy", usage.policy_field()), ("ratelimit", usage.field())] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

impl ApiError {
    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::Validation(_) => "validation_failed",
            ApiError::DuplicateKey(_) => "duplicate_key",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::SchemaViolation { .. } => "schema_violation",
            ApiError::UnknownEventType { .. } => "unknown_event_type",
            ApiError::PayloadTooLarge { .. } | ApiError::DataTooLarge(_) => "payload_too_large",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::RouteNotFound { .. } => "route_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InvalidResources(_) => "invalid_resources",
            ApiError::Conflict(_) => "conflict",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::Overloaded => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_)
            | ApiError::Validation(_)
            | ApiError::DuplicateKey(_)
            | ApiError::BadRequest(_)
            | ApiError::SchemaViolation { .. }
            | ApiError::UnknownEventType { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } | ApiError::DataTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::IdempotencyKeyReused | ApiError::InvalidResources(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Overloaded | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn details(&self) -> Value {
        match self {
            ApiError::Validation(errors) | ApiError::DataTooLarge(errors) => json!(errors),
            ApiError::DuplicateKey(error) => json!([error]),
            ApiError::SchemaViolation { violations, batch: true } => json!(violations),
            ApiError::SchemaViolation { violations, batch: false } => {
                json!(violations.iter().map(|v| &v.violation).collect::<Vec<_>>())
            }
            ApiError::UnknownEventType { errors, items: None } => json!(errors),
            ApiError::UnknownEventType { errors, items: Some(items) } => json!(errors
                .iter()
                .zip(items)
                .map(|(e, item)| json!({"item": item, "path": e.path, "message": e.message}))
                .collect::<Vec<_>>()),
            ApiError::InvalidResources(errors) => json!(errors),
            ApiError::PayloadTooLarge { limit } => json!({ "limit": limit }),
            ApiError::QuotaExceeded(refusal) => {
                let (usage, wanted, retry_after) = refusal_parts(refusal);
                json!({ "namespace": usage.namespace, "events": wanted, "retryAfter": retry_after })
            }
            _ => Value::Null,
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Invalid(_) | AuthError::Expired => ApiError::Unauthenticated(e),
            AuthError::MissingRole(_)
            | AuthError::NamespaceNotAllowed(_)
            | AuthError::SelfApproval
            | AuthError::ClusterScope => ApiError::Forbidden(e),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_transient() {
            tracing::error!(error = ?e, "database unavailable");
            ApiError::Unavailable("the database is unavailable; retry later".into())
        } else {
            ApiError::Internal(e.into())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(source) = &self {
            tracing::error!(error = ?source, "internal error");
        }
        let mut body =
            json!({ "error": { "code": self.code(), "message": self.to_string(), "details": self.details() } });
        // The apply contract also lists the errors at the top level.
        if let ApiError::InvalidResources(errors) = &self {
            body["errors"] = json!(errors);
        }
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthenticated(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::QuotaExceeded(refusal) => {
                let (usage, _, retry_after) = refusal_parts(refusal);
                if let Some(seconds) = retry_after {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                insert_rate_limit(headers, usage);
            }
            _ => {}
        }
        response
    }
}
