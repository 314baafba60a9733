//! `POST /v1/events`, `POST /v1/events/batch`, `GET /v1/events`, `GET /v1/events/{id}`.
//!
//! The handlers parse, validate and authorize, then call the ingest use case
//! ([`crate::ingest::Ingestor::accept`]) and map its answer: an accepted event is answered
//! 202 only after its transaction committed. Validation happens before anything is queued,
//! and every problem of a request is reported at once with its field path.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::error::{ApiError, FieldError};
use super::extract::{parse_json, parse_object_at, read_json_body, ApiQuery};
use super::strict_json::{self, Problem};
use super::AppState;
use crate::auth::{Principal, Role};
use crate::ids::EventId;
use crate::ingest::types::Deprecated;
use crate::ingest::{AcceptError, Answer, EventAccepted, IngestError};
use crate::resources::validate::is_dns_label;
use crate::store::{EventQuery, IdempotencyKey, IngestRequest, NewEvent, StoredEvent};

/// A CloudEvents-shaped event as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    id: Option<String>,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: Option<String>,
    time: Option<String>,
    namespace: Option<String>,
    specversion: Option<String>,
    datacontenttype: Option<String>,
    data: Box<RawValue>,
}

#[derive(Debug, Serialize)]
pub struct BatchAccepted {
    pub results: Vec<EventAccepted>,
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Overloaded => ApiError::Overloaded,
            IngestError::ShuttingDown => ApiError::Unavailable("the server is shutting down".into()),
            IngestError::ResourcesChanging => {
                ApiError::Unavailable("the resources kept changing while the events were stored; retry".into())
            }
            IngestError::TimedOut => {
                ApiError::Unavailable("the events were not stored in time; retry later (with the same ids)".into())
            }
            // The writer logged the cause.
            IngestError::Store(_) => ApiError::Unavailable("the events could not be stored; retry later".into()),
            e @ IngestError::FanOut(_) => ApiError::Internal(e.into()),
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::Ingest(e) => e.into(),
            AcceptError::Types(e) => ApiError::from_types(e, false),
            AcceptError::KeyReused => ApiError::IdempotencyKeyReused,
            AcceptError::Store(e) => e.into(),
            AcceptError::DataTooLarge(items) => ApiError::data_too_large(items, false),
            AcceptError::Quota(refusal) => ApiError::QuotaExceeded(refusal),
        }
    }
}

const DEFAULT_NAMESPACE: &str = "default";

/// Checks one field: non-empty, bounded, no NUL (PostgreSQL text cannot hold one).
fn check_text(errors: &mut Vec<FieldError>, path: &str, value: &str, max: usize) {
    if value.is_empty() {
        errors.push(FieldError::new(path, "must not be empty"));
    } else if value.len() > max {
        errors.push(FieldError::new(path, format!("must be at most {max} bytes long")));
    } else if value.contains('\0') {
        errors.push(FieldError::new(path, "must not contain NUL characters"));
    }
}

/// What is known about the request every event of it shares.
struct Context<'a> {
    principal: &'a Principal,
    trace_id: &'a str,
    received_at: DateTime<Utc>,
}

impl EventIn {
    /// Validates the event; `prefix` is the path of the event in the body (`""` or `[3]`).
    fn into_new_event(self, prefix: &str, ctx: &Context<'_>, errors: &mut Vec<FieldError>) -> Option<NewEvent> {
        let before = errors.len();
        let path = |field: &str| if prefix.is_empty() { field.to_owned() } else { format!("{prefix}.{field}") };
        let id = EventId::generate();
        if let Some(external) = &self.id {
            check_text(errors, &path("id"), external, 256);
        }
        check_text(errors, &path("source"), &self.source, 1024);
        check_text(errors, &path("type"), &self.event_type, 256);
        if let Some(subject) = &self.subject {
            check_text(errors, &path("subject"), subject, 1024);
        }
        let namespace = self.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        if !is_dns_label(&namespace) {
            errors.push(FieldError::new(
                path("namespace"),
                "must be a DNS label: 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit",
            ));
        }
        if let Some(version) = &self.specversion {
            if version != "1.0" {
                errors.push(FieldError::new(path("specversion"), "must be \"1.0\" when present"));
            }
        }
        let content_type = self.datacontenttype.unwrap_or_else(|| "application/json".to_owned());
        check_text(errors, &path("datacontenttype"), &content_type, 256);
        let time = match self.time.as_deref().map(DateTime::parse_from_rfc3339) {
            None => None,
            Some(Ok(t)) => Some(t.with_timezone(&Utc)),
            Some(Err(e)) => {
                errors.push(FieldError::new(path("time"), format!("must be an RFC 3339 timestamp ({e})")));
                None
            }
        };
        if errors.len() > before {
            return None;
        }
        Some(NewEvent {
            external_id: self.id.unwrap_or_else(|| id.to_string()),
            id,
            namespace,
            source: self.source,
            event_type: self.event_type,
            subject: self.subject,
            time,
            data: self.data.get().to_owned(),
            content_type,
            ingested_by: ctx.principal.subject.clone(),
            trace_id: ctx.trace_id.to_owned(),
            received_at: ctx.received_at,
            deliveries: Vec::new(),
            dedup_window: None,
        })
    }
}

/// The trace id of a valid W3C `traceparent`, else a new one.
fn trace_id(headers: &HeaderMap) -> String {
    let from_header = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(|v| {
        let mut parts = v.split('-');
        let (version, trace) = (parts.next()?, parts.next()?);
        let valid = version.len() == 2
            && trace.len() == 32
            && trace.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && trace.bytes().any(|b| b != b'0');
        valid.then(|| trace.to_owned())
    });
    from_header.unwrap_or_else(|| {
        use rand::RngCore;
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        hex::encode(bytes)
    })
}

/// The `Idempotency-Key` header, bound to the caller and to the exact request.
fn idempotency_key(
    headers: &HeaderMap,
    principal: &Principal,
    route: &str,
    body: &[u8],
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into()))?;
    let mut hasher = Sha256::new();
    hasher.update(route.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    Ok(Some(IdempotencyKey {
        scope: principal.subject.clone(),
        key: key.to_owned(),
        fingerprint: hex::encode(hasher.finalize()),
    }))
}

fn validation(errors: Vec<FieldError>) -> Result<(), ApiError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(errors))
    }
}

fn status(created: bool) -> StatusCode {
    if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    }
}

/// Applies the field rules to the events read from a request (every problem at once),
/// then checks that `principal` may ingest into their namespaces.
pub fn validate_events(
    events: Vec<(String, EventIn)>,
    principal: &Principal,
    trace_id: &str,
) -> Result<Vec<NewEvent>, ApiError> {
    let ctx = Context { principal, trace_id, received_at: Utc::now() };
    let mut errors = Vec::new();
    let events: Vec<NewEvent> =
        events.into_iter().filter_map(|(prefix, e)| e.into_new_event(&prefix, &ctx, &mut errors)).collect();
    validation(errors)?;
    for event in &events {
        principal.authorize(Role::Ingest, &event.namespace)?;
    }
    Ok(events)
}

/// Validates the events, checks the caller may ingest into their namespaces, and hands
/// them to the ingest use case.
async fn ingest(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    route: &str,
    body: &[u8],
    events: Vec<(String, EventIn)>,
) -> Result<Answer, ApiError> {
    state.ingestor.admit()?;
    let idempotency = idempotency_key(headers, principal, route, body)?;
    let trace = trace_id(headers);
    let events = validate_events(events, principal, &trace)?;
    let batch = route == "/v1/events/batch";
    state.ingestor.accept(IngestRequest { idempotency, events }).await.map_err(|e| match e {
        AcceptError::Types(e) => ApiError::from_types(e, batch),
        AcceptError::DataTooLarge(items) => ApiError::data_too_large(items, batch),
        e => e.into(),
    })
}

/// A `Warning` header (RFC 9111 form, code 299) per deprecated type of the request.
fn warn_deprecated(response: &mut Response, deprecated: &[Deprecated]) {
    for d in deprecated {
        let text =
            format!("299 hookwarden \"event type `{}` in namespace `{}` is deprecated\"", d.event_type, d.namespace);
        // EventType names and namespaces are plain ASCII: this always converts.
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
}

/// The headers of an accepted request: a `Warning` per deprecated type, and the
/// `RateLimit` fields where a namespace of the request has a quota.
fn finish(response: &mut Response, deprecated: &[Deprecated], quota: Option<&crate::ingest::quota::Usage>) {
    warn_deprecated(response, deprecated);
    if let Some(usage) = quota {
        super::error::insert_rate_limit(response.headers_mut(), usage);
    }
}

/// Refuses an event's JSON (at `prefix` in the body) that repeats a key or nests too deep;
/// see [`strict_json`].
fn check_strict(json: &[u8], prefix: &str, max_depth: usize) -> Result<(), ApiError> {
    strict_json::check(json, prefix, max_depth).map_err(|problem| match problem {
        Problem::DuplicateKey { path } => ApiError::DuplicateKey(FieldError::new(
            path,
            "appears more than once in its object; every key may appear once, since the event is forwarded as sent",
        )),
        Problem::TooDeep { path, limit } => ApiError::Validation(vec![FieldError::new(
            path,
            format!("nests arrays and objects deeper than {limit} levels; at most {limit} are allowed (ingest.maxJsonDepth)"),
        )]),
    })
}

/// The body of `POST /v1/events` as an event: JSON syntax, then [`check_strict`], then
/// the shape.
pub fn read_event(bytes: &[u8], max_json_depth: usize) -> Result<EventIn, ApiError> {
    parse_json::<serde::de::IgnoredAny>(bytes)?;
    check_strict(bytes, "", max_json_depth)?;
    parse_object_at(bytes, "")
}

/// The body of `POST /v1/events/batch` as events with their paths (`[3]`): JSON syntax,
/// the number of items, then [`check_strict`] and the shape of each.
pub fn read_batch(bytes: &[u8], max_items: usize, max_json_depth: usize) -> Result<Vec<(String, EventIn)>, ApiError> {
    let items: Vec<&RawValue> = parse_json_borrowed(bytes)?;
    if items.is_empty() {
        return Err(ApiError::Validation(vec![FieldError::new("(body)", "the batch must hold at least one event")]));
    }
    if items.len() > max_items {
        return Err(ApiError::Validation(vec![FieldError::new(
            "(body)",
            format!("the batch holds {} events; at most {max_items} are allowed", items.len()),
        )]));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let prefix = format!("[{i}]");
            check_strict(raw.get().as_bytes(), &prefix, max_json_depth)?;
            parse_object_at::<EventIn>(raw.get().as_bytes(), &prefix).map(|e| (prefix, e))
        })
        .collect()
}

/// The batch body as borrowed raw items: one syntax pass, items parsed one by one after.
fn parse_json_borrowed(bytes: &[u8]) -> Result<Vec<&RawValue>, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let items =
        serde::Deserialize::deserialize(&mut deserializer).map_err(|e: serde_json::Error| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::Validation(vec![FieldError::new("(body)", "must be a JSON array of events")])
            }
            _ => ApiError::MalformedJson(e.to_string()),
        })?;
    deserializer.end().map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(items)
}

pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_json_body(&headers, body, state.config.max_body_bytes).await?;
    let event = read_event(&bytes, state.config.max_json_depth)?;
    let Answer { mut results, created, deprecated, quota } =
        ingest(&state, &principal, &headers, "/v1/events", &bytes, vec![(String::new(), event)]).await?;
    let result = results.pop().ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no result for a single event")))?;
    let mut response = (status(created), Json(result)).into_response();
    finish(&mut response, &deprecated, quota.as_ref());
    Ok(response)
}

pub async fn create_batch(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_json_body(&headers, body, state.config.max_body_bytes).await?;
    let events = read_batch(&bytes, state.config.max_batch_items, state.config.max_json_depth)?;
    let Answer { results, created, deprecated, quota } =
        ingest(&state, &principal, &headers, "/v1/events/batch", &bytes, events).await?;
    let mut response = (status(created), Json(BatchAccepted { results })).into_response();
    finish(&mut response, &deprecated, quota.as_ref());
    Ok(response)
}

/// An event as the API shows it; `data` is the stored JSON text, byte for byte.
#[derive(Debug, Serialize)]
pub struct EventOut {
    id: EventId,
    namespace: String,
    source: String,
    external_id: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: Option<String>,
    time: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
    datacontenttype: String,
    data: Box<RawValue>,
    ingested_by: String,
    trace_id: String,
    status: crate::store::EventStatus,
    deliveries: Vec<DeliveryOut>,
}

/// A delivery with its attempts.
#[derive(Debug, Serialize)]
pub struct DeliveryOut {
    #[serde(flatten)]
    pub record: crate::store::DeliveryRecord,
    pub attempts_detail: Vec<crate::store::Attempt>,
}

impl TryFrom<StoredEvent> for EventOut {
    type Error = ApiError;

    fn try_from(stored: StoredEvent) -> Result<Self, ApiError> {
        let e = stored.event;
        let data = RawValue::from_string(e.data)
            .map_err(|err| ApiError::Internal(anyhow::anyhow!("stored data of {} is not JSON: {err}", e.id)))?;
        Ok(EventOut {
            id: e.id,
            namespace: e.namespace,
            source: e.source,
            external_id: e.external_id,
            event_type: e.event_type,
            subject: e.subject,
            time: e.time,
            received_at: e.received_at,
            datacontenttype: e.content_type,
            data,
            ingested_by: e.ingested_by,
            trace_id: e.trace_id,
            status: stored.status,
            deliveries: Vec::new(),
        })
    }
}

pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<EventOut>, ApiError> {
    let not_found = || ApiError::NotFound(format!("no event `{id}`"));
    let id_parsed = EventId::parse(&id).map_err(|_| not_found())?;
    let stored = state.store.get_event(&id_parsed).await?.ok_or_else(not_found)?;
    // A namespace the caller may not see answers like a missing event: nothing leaks.
    if !principal.may_access(&stored.event.namespace) {
        return Err(not_found());
    }
    principal.authorize(Role::Viewer, &stored.event.namespace)?;
    let mut out = EventOut::try_from(stored)?;
    out.deliveries = state
        .store
        .deliveries_with_attempts(&out.id)
        .await?
        .into_iter()
        .map(|(record, attempts_detail)| DeliveryOut { record, attempts_detail })
        .collect();
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    namespace: Option<String>,
    source: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EventList {
    items: Vec<EventOut>,
    next_cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<EventList>, ApiError> {
    let namespace = params.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    principal.authorize(Role::Viewer, &namespace)?;
    let limit = params.limit.unwrap_or(100);
    let mut errors = Vec::new();
    if !(1..=1000).contains(&limit) {
        errors.push(FieldError::new("limit", "must be between 1 and 1000"));
    }
    let before = match params.cursor.as_deref().map(EventId::parse) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            errors.push(FieldError::new("cursor", "is not a cursor this API returned"));
            None
        }
    };
    validation(errors)?;
    let query = EventQuery { namespace, source: params.source, event_type: params.event_type, before, limit };
    let stored = state.store.list_events(&query).await?;
    let next_cursor = if stored.len() == limit as usize { stored.last().map(|s| s.event.id.to_string()) } else { None };
    let items = stored.into_iter().map(EventOut::try_from).collect::<Result<_, _>>()?;
    Ok(Json(EventList { items, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_gives_its_trace_id_and_anything_else_a_new_one() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(trace_id(&headers), "4bf92f3577b34da6a3ce929d0e0e4736");
        headers.insert("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse().unwrap());
        let generated = trace_id(&headers);
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, "00000000000000000000000000000000");
    }
}
