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

use super::cloudevents::{self, attribute_path, Carrier, Mode};
use super::error::{ApiError, FieldError};
use super::extract::{parse_json, parse_object_at, read_body, read_json_body, ApiQuery};
use super::strict_json::{self, Problem};
use super::AppState;
use crate::auth::{Principal, Role};
use crate::ids::EventId;
use crate::ingest::types::Deprecated;
use crate::ingest::{AcceptError, Answer, EventAccepted, IngestError};
use crate::resources::validate::is_dns_label;
use crate::store::{Attributes, EventQuery, IdempotencyKey, IngestRequest, NewEvent, StoredEvent};

/// A CloudEvents-shaped event as clients send it: Hookwarden's envelope (read by serde,
/// no other member allowed), or a CloudEvent of any content mode (read by
/// [`super::cloudevents`], which fills the fields serde skips).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    pub(super) id: Option<String>,
    pub(super) source: String,
    #[serde(rename = "type")]
    pub(super) event_type: String,
    pub(super) subject: Option<String>,
    pub(super) time: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) specversion: Option<String>,
    pub(super) datacontenttype: Option<String>,
    pub(super) data: Box<RawValue>,
    /// A CloudEvent's other attributes (`dataschema`, extensions); the envelope has none.
    #[serde(skip)]
    pub(super) attributes: Attributes,
    /// Where the attributes were sent, for the paths of errors.
    #[serde(skip)]
    pub(super) carrier: Carrier,
}

/// The query of `POST /v1/events` and `POST /v1/events/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestParams {
    /// The namespace of the events that do not name their own.
    namespace: Option<String>,
}

impl IngestParams {
    /// The namespace the query gives, checked.
    fn namespace(self) -> Result<Option<String>, ApiError> {
        match self.namespace {
            Some(namespace) if !is_dns_label(&namespace) => {
                Err(ApiError::Validation(vec![FieldError::new("query:namespace", DNS_LABEL)]))
            }
            namespace => Ok(namespace),
        }
    }
}

const DNS_LABEL: &str =
    "must be a DNS label: 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";

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
    /// The namespace of events that name none (the query's), else `default`.
    namespace: Option<&'a str>,
}

impl EventIn {
    /// Validates the event; `prefix` is the path of the event in the body (`""` or `[3]`).
    fn into_new_event(self, prefix: &str, ctx: &Context<'_>, errors: &mut Vec<FieldError>) -> Option<NewEvent> {
        let before = errors.len();
        let carrier = self.carrier;
        let path = |field: &str| attribute_path(carrier, prefix, field);
        let id = EventId::generate();
        if let Some(external) = &self.id {
            check_text(errors, &path("id"), external, 256);
        }
        check_text(errors, &path("source"), &self.source, 1024);
        check_text(errors, &path("type"), &self.event_type, 256);
        if crate::operational::is_reserved(&self.event_type) {
            errors.push(FieldError::new(
                path("type"),
                format!(
                    "types starting with `{}` are reserved for Hookwarden's operational events",
                    crate::operational::RESERVED_PREFIX
                ),
            ));
        }
        if let Some(subject) = &self.subject {
            check_text(errors, &path("subject"), subject, 1024);
        }
        // The query's namespace was checked once for the request.
        let namespace = self.namespace.unwrap_or_else(|| ctx.namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned());
        if !is_dns_label(&namespace) {
            errors.push(FieldError::new(path("namespace"), DNS_LABEL));
        }
        if let Some(version) = &self.specversion {
            if version != "1.0" {
                errors.push(FieldError::new(path("specversion"), "must be \"1.0\" when present"));
            }
        }
        let content_type = self.datacontenttype.unwrap_or_else(|| "application/json".to_owned());
        let before_type = errors.len();
        check_text(errors, &path("datacontenttype"), &content_type, 256);
        // Delivered as a `Content-Type` header (CloudEvents binary mode): it must make one.
        if errors.len() == before_type && !crate::cloudevents::is_media_type(&content_type) {
            errors.push(FieldError::new(
                path("datacontenttype"),
                "must be a media type (`type/subtype`, then `; name=value` parameters) of visible ASCII, without control characters",
            ));
        }
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
            attributes: self.attributes,
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

/// The `Idempotency-Key` header, bound to the caller and to the exact request: its route,
/// its body and, where they say what the events are, its query and `ce-` headers.
fn idempotency_key(
    headers: &HeaderMap,
    principal: &Principal,
    request: &Submission<'_>,
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| ApiError::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into()))?;
    let mut hasher = Sha256::new();
    hasher.update(request.route.as_bytes());
    hasher.update([0]);
    hasher.update(request.body);
    // A JSON body holds no NUL byte, so this cannot be mistaken for one. The envelope
    // without a query adds nothing: its keys keep the fingerprints they had.
    let context = request_context(request.mode, headers, request.namespace);
    if !context.is_empty() {
        hasher.update([0]);
        hasher.update(context.as_bytes());
    }
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

/// What besides its route and body tells what a request's events are: the content mode,
/// the binary mode's `ce-` headers and `Content-Type`, and the query's namespace. Empty
/// for the envelope without a query.
fn request_context(mode: Mode, headers: &HeaderMap, namespace: Option<&str>) -> String {
    let mut context = String::new();
    if mode != Mode::Envelope {
        context.push_str(&format!("mode={}\n", mode.name()));
    }
    if mode == Mode::Binary {
        let mut lines: Vec<String> = headers
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("ce-") || name.as_str() == "content-type")
            .map(|(name, value)| format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())))
            .collect();
        lines.sort();
        context.extend(lines);
    }
    if let Some(namespace) = namespace {
        context.push_str(&format!("namespace={namespace}\n"));
    }
    context
}

/// Applies the field rules to the events read from a request (every problem at once),
/// then checks that `principal` may ingest into their namespaces. `namespace` is that of
/// events that name none (a checked DNS label; `default` when `None`).
pub fn validate_events(
    events: Vec<(String, EventIn)>,
    principal: &Principal,
    trace_id: &str,
    namespace: Option<&str>,
) -> Result<Vec<NewEvent>, ApiError> {
    let ctx = Context { principal, trace_id, received_at: Utc::now(), namespace };
    let mut errors = Vec::new();
    let events: Vec<NewEvent> =
        events.into_iter().filter_map(|(prefix, e)| e.into_new_event(&prefix, &ctx, &mut errors)).collect();
    validation(errors)?;
    for event in &events {
        principal.authorize(Role::Ingest, &event.namespace)?;
    }
    Ok(events)
}

/// One ingest request as read: where it came, how, and what it holds.
struct Submission<'a> {
    route: &'static str,
    mode: Mode,
    /// The body holds an array of events (the answer names each by its index).
    batch: bool,
    body: &'a [u8],
    /// The query's namespace.
    namespace: Option<&'a str>,
}

/// Validates the events, checks the caller may ingest into their namespaces, and hands
/// them to the ingest use case.
async fn ingest(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    request: Submission<'_>,
    events: Vec<(String, EventIn)>,
) -> Result<Answer, ApiError> {
    state.ingestor.admit()?;
    let idempotency = idempotency_key(headers, principal, &request)?;
    let trace = trace_id(headers);
    let events = validate_events(events, principal, &trace, request.namespace)?;
    state.ingestor.accept(IngestRequest { idempotency, events }).await.map_err(|e| match e {
        AcceptError::Types(e) => ApiError::from_types(e, request.batch),
        AcceptError::DataTooLarge(items) => ApiError::data_too_large(items, request.batch),
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
pub(super) fn check_strict(json: &[u8], prefix: &str, max_depth: usize) -> Result<(), ApiError> {
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
    read_items(bytes, max_items, |raw, prefix| {
        check_strict(raw, prefix, max_json_depth)?;
        parse_object_at::<EventIn>(raw, prefix)
    })
}

/// A batch body as events with their paths (`[3]`): JSON syntax, the number of items, then
/// `read` of each (its bytes and path).
pub(super) fn read_items(
    bytes: &[u8],
    max_items: usize,
    read: impl Fn(&[u8], &str) -> Result<EventIn, ApiError>,
) -> Result<Vec<(String, EventIn)>, ApiError> {
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
            read(raw.get().as_bytes(), &prefix).map(|e| (prefix, e))
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

/// The answer to an ingest request: one event's, or a batch's (every event's, in order).
fn answered(Answer { mut results, created, deprecated, quota }: Answer, batch: bool) -> Result<Response, ApiError> {
    let mut response = if batch {
        (status(created), Json(BatchAccepted { results })).into_response()
    } else {
        let result =
            results.pop().ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no result for a single event")))?;
        (status(created), Json(result)).into_response()
    };
    finish(&mut response, &deprecated, quota.as_ref());
    Ok(response)
}

/// `POST /v1/events`: one event in Hookwarden's envelope or a CloudEvent in structured or
/// binary mode, or a batch in the CloudEvents batched mode (see [`super::cloudevents`]).
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<IngestParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let namespace = params.namespace()?;
    let (limit, depth) = (state.config.max_body_bytes, state.config.max_json_depth);
    let mode = Mode::of(&headers);
    let bytes = if mode == Mode::Binary {
        cloudevents::check_binary_media_type(&headers)?;
        read_body(&headers, body, limit).await?
    } else {
        read_json_body(&headers, body, limit).await?
    };
    let events = match mode {
        Mode::Envelope => vec![(String::new(), read_event(&bytes, depth)?)],
        Mode::Structured => vec![(String::new(), cloudevents::read_structured(&bytes, depth)?)],
        Mode::Binary => vec![(String::new(), cloudevents::read_binary(&headers, &bytes, depth)?)],
        Mode::Batch => cloudevents::read_batch(&bytes, state.config.max_batch_items, depth)?,
    };
    let batch = mode == Mode::Batch;
    let request = Submission { route: "/v1/events", mode, batch, body: &bytes, namespace: namespace.as_deref() };
    answered(ingest(&state, &principal, &headers, request, events).await?, batch)
}

/// `POST /v1/events/batch`: an array of events in Hookwarden's envelope, or of CloudEvents
/// in the batched mode.
pub async fn create_batch(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<IngestParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let namespace = params.namespace()?;
    let mode = match Mode::of(&headers) {
        Mode::Batch => Mode::Batch,
        Mode::Structured => {
            return Err(ApiError::UnsupportedMediaType(
                "POST /v1/events/batch takes an array: send `Content-Type: application/cloudevents-batch+json`, or one CloudEvent to POST /v1/events",
            ))
        }
        // As before CloudEvents: `ce-` headers mean nothing to a batch.
        Mode::Envelope | Mode::Binary => Mode::Envelope,
    };
    let bytes = read_json_body(&headers, body, state.config.max_body_bytes).await?;
    let (max_items, depth) = (state.config.max_batch_items, state.config.max_json_depth);
    let events = match mode {
        Mode::Batch => cloudevents::read_batch(&bytes, max_items, depth)?,
        _ => read_batch(&bytes, max_items, depth)?,
    };
    let request =
        Submission { route: "/v1/events/batch", mode, batch: true, body: &bytes, namespace: namespace.as_deref() };
    answered(ingest(&state, &principal, &headers, request, events).await?, true)
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
    /// Its other CloudEvents attributes (`dataschema`, extensions), when it had any.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    attributes: Attributes,
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
            attributes: e.attributes,
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
