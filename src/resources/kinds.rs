//! The resource kinds as Rust types: the contract of the YAML files.
//!
//! Field names are part of the contract (see the architecture brief): fields may be added,
//! never renamed. Every struct refuses unknown fields, so a typo is an error that names
//! the field, not a silently ignored setting. JSON Schema is generated from these types.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::DurationText;

/// Where a webhook goes and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    /// `https://…` (or `http://…`) URL the deliveries are POSTed to.
    pub url: String,
    /// Signing secrets: the first signs; during rotation all of them sign.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretSource>,
    /// Event type globs (`order.*`, `*`); empty means every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// Filters (same namespace) that an event must all pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter_refs: Vec<String>,
    /// The RetryBudget (same namespace) governing retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_ref: Option<String>,
    /// An AI agent: deliveries pass the AgentRules that select it (default deny).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent: bool,
    /// FIFO delivery per value of a CEL key over `event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Time allowed for one attempt (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationText>,
    /// Extra request headers. Their values may be credentials: GET and diffs show them as
    /// `(redacted)` unless the header is listed in `plainHeaders`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Names of `headers` (any case) whose values are not secret and are shown as set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plain_headers: Vec<String>,
    /// Paused endpoints keep their deliveries queued.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// CEL over `event` and `endpoint` that gives a map or a list: its canonical JSON
    /// (keys sorted, no whitespace) is the body sent and signed, instead of the standard
    /// `{type, timestamp, data}` envelope, e.g.
    /// `{"text": "Approval needed: " + event.data.reason}`. A delivery whose transform fails
    /// fails, and is not retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<String>,
    /// Who owns the endpoint (free text: a team, a contact), carried in the data of its
    /// operational events (`hookwarden.endpoint.*`, `hookwarden.delivery.dead`) so that a
    /// notification endpoint can route them by owner with a Filter. At most 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// How a delivery is sent: `standard` (the default: the `{type, timestamp, data}`
    /// envelope, or the transform's result) or `cloudevents` (CloudEvents binary mode: the
    /// event's attributes as `ce-` headers, the body its `data`, or the transform's
    /// result). Signed per Standard Webhooks over the body either way.
    #[serde(default, skip_serializing_if = "DeliveryFormat::is_standard")]
    pub format: DeliveryFormat,
}

/// The wire format of an endpoint's deliveries (see [`EndpointSpec::format`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "`standard` or `cloudevents`", rename_all = "lowercase")]
pub enum DeliveryFormat {
    #[default]
    Standard,
    /// CloudEvents 1.0, HTTP binding, binary content mode.
    Cloudevents,
}

impl DeliveryFormat {
    pub fn is_standard(&self) -> bool {
        *self == DeliveryFormat::Standard
    }
}

/// A signing secret, given inline or read from the server's environment or a file (only
/// those the server allows the namespace: see [`super::secret_sources`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "a mapping with `value` or `valueFrom`", deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretSource {
    /// `whsec_` followed by base64 of 24 to 64 random bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<ValueFrom>,
}

/// Exactly one of `env` (`HOOKWARDEN_SECRET_<NAMESPACE>__<NAME>`) or `file` (a path
/// relative to the namespace's secret directory).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "a mapping with `env` or `file`", deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Ordering {
    /// CEL over `event`, e.g. `event.data.order_id`.
    pub key: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// Most requests per second to this endpoint.
    pub per_second: u32,
}

/// How hard to retry, and when to give up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Attempts in all, the first included (1 to 100).
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Retries allowed per endpoint per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries_per_hour: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// A delivery still undelivered this long after its event is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_after: Option<DurationText>,
    /// 4xx statuses to retry instead of failing at once (e.g. `[404, 409]` for a receiver
    /// that is being deployed). 408, 429 and every 5xx are always retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on_status: Vec<u16>,
}

/// `min(base * 2^attempt + jitter, max)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    pub base: DurationText,
    pub max: DurationText,
    #[serde(default)]
    pub jitter: Jitter,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "`full`, `equal` or `none`", rename_all = "lowercase")]
pub enum Jitter {
    #[default]
    Full,
    Equal,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Consecutive failed attempts that open the breaker.
    pub consecutive_failures: u32,
    /// How long it stays open before one half-open probe.
    pub open_for: DurationText,
}

/// Which events an endpoint receives, decided at ingest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterSpec {
    /// Event type globs; empty means every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// CEL over `event` that must be true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

/// What an AI-agent endpoint may be sent, decided at dispatch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentRuleSpec {
    /// Agent endpoints selected by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Agent endpoints selected by name (same namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_refs: Vec<String>,
    /// CEL that must be true for the rule to apply (default: always).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_expression: Option<String>,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<Spend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// A fixed reason recorded with the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// CEL that renders the reason (a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_expression: Option<String>,
    /// Higher first when explaining; precedence is deny > hold > allow regardless.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    #[serde(default)]
    pub enforcement: Enforcement,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "`allow`, `deny` or `hold`", rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
    Hold,
}

/// A spend limit over a rolling window, per agent endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spend {
    /// CEL giving the amount in integer minor units, e.g. `int(event.data.amount_cents)`.
    pub amount: String,
    /// ISO 4217 code, e.g. `USD`.
    pub currency: String,
    /// Most minor units per window.
    pub limit: i64,
    pub window: DurationText,
    #[serde(default)]
    pub over_limit: OverLimit,
    /// Optional CEL giving a finer key (e.g. a customer id): one limit per value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "`hold` or `deny`", rename_all = "lowercase")]
pub enum OverLimit {
    #[default]
    Hold,
    Deny,
}

/// Who must approve a hold, how many, and for how long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Approval {
    #[serde(default = "default_approver_role")]
    pub role: String,
    /// Distinct approvers needed (1 to 10).
    #[serde(default = "default_quorum")]
    pub quorum: u32,
    #[serde(default = "default_expiry")]
    pub expires_after: DurationText,
    #[serde(default)]
    pub on_expiry: ExpiryOutcome,
}

fn default_approver_role() -> String {
    "approver".to_owned()
}

fn default_quorum() -> u32 {
    1
}

fn default_expiry() -> DurationText {
    DurationText(std::time::Duration::from_secs(24 * 3600))
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "`deny` or `allow`", rename_all = "lowercase")]
pub enum ExpiryOutcome {
    #[default]
    Deny,
    Allow,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "`enforce` or `audit`", rename_all = "lowercase")]
pub enum Enforcement {
    #[default]
    Enforce,
    /// Shadow mode: record what the rule would decide, enforce nothing.
    Audit,
}

/// A type of event a namespace takes: what it means, the JSON Schema (2020-12) its `data`
/// must match, examples that must match it, and whether it is deprecated. The resource's
/// name is the event type itself (`order.created`): see [`super::validate`] for the
/// characters it may hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EventTypeSpec {
    /// What an event of this type says, for the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema (draft 2020-12) for the event's `data`; none means any JSON. Compiled
    /// at apply; a `$ref` may only point inside the schema itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// Values of `data` that must match `schema` (checked at apply).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<serde_json::Value>,
    /// Events of a deprecated type are still accepted, counted and answered with a
    /// `Warning` header.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deprecated: bool,
}

/// A tenant's lifecycle and limits (cluster-scoped: `metadata.name` is the namespace it
/// governs, and there is no `metadata.namespace`). What it leaves out, and every namespace
/// without a Namespace, gets the server's `namespaceDefaults` (see [`crate::config`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceSpec {
    /// How long what the namespace stores is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// How long a repeated `(source, id)` or `Idempotency-Key` is a duplicate of the
    /// first; after it, the same id is a new event and is delivered again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    /// What happens to an event whose type has no EventType in the namespace (over the
    /// server's `ingest.unknownEventTypes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_event_types: Option<UnknownEventTypes>,
}

/// How long rows are kept after they are written. Each left out is the server default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retention {
    /// An event (with its deliveries and their attempts) is deleted this long after it was
    /// received, once every delivery of it is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<DurationText>,
    /// A dead delivery (and its attempts) is deleted this long after it died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<DurationText>,
    /// An attempt of a final delivery is deleted this long after it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<DurationText>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Quotas {
    /// Ingest rates, enforced at `POST /v1/events` and `/v1/events/batch` (`429` over them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestQuota>,
    /// Most Endpoints the namespace may hold (checked at apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_endpoints: Option<u32>,
    /// Largest `data` of one event, in bytes of its JSON text (`413` above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngestQuota {
    /// Events per second, sustained.
    pub per_second: u32,
    /// Events allowed at once above the sustained rate (default: `perSecond`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Events per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u64>,
}

/// An event whose type has no EventType in its namespace is accepted unchecked, or
/// refused (`400 unknown_event_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(expecting = "`accept` or `reject`", rename_all = "lowercase")]
pub enum UnknownEventTypes {
    #[default]
    Accept,
    Reject,
}
