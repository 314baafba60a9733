//! Validation of parsed resources, before anything is written.
//!
//! Every problem is reported, each naming its file, document and field path. What needs
//! no database (ranges, names, CEL, references within the applied set) runs the same in
//! `hookwarden validate` and on the server; the server adds the resources already stored
//! to the set references may resolve to. Secret sources are checked for their form only
//! (a `valueFrom` must name a source of its namespace's allowed set, see
//! [`super::secret_sources`]): whether one can be read is learnt by the catalog and shown
//! in the endpoint's status.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;

use super::kinds::{
    AgentRuleSpec, Decision, DeliveryFormat, EndpointSpec, EventTypeSpec, FilterSpec, NamespaceSpec, RetryBudgetSpec,
    SecretSource,
};
use super::namespace::{retention_problem, window_problem, NamespaceDefaults, Settings};
use super::secret_sources::SecretsConfig;
use super::{Kind, Located, Origin, ResourceError, ResourceKey, Spec};
pub use crate::delivery::guard::{is_private_host, is_private_ip};
use crate::delivery::transform::Transform;
use crate::policy::expr::{self, Limits};

/// Variables of CEL evaluated over an event alone (filters, ordering keys).
pub const EVENT_VARIABLES: &[&str] = &["event"];
/// Variables of CEL evaluated by the policy gate (agent rules).
pub const POLICY_VARIABLES: &[&str] = &["event", "endpoint", "agent", "spend", "now"];
/// Variables of an endpoint's transform (see [`crate::delivery::transform`]).
pub const TRANSFORM_VARIABLES: &[&str] = &["event", "endpoint"];

/// Checks that depend on where validation runs.
#[derive(Clone, Debug, Default)]
pub struct Checks {
    /// Accept endpoint URLs on loopback, private and link-local addresses.
    pub allow_private_urls: bool,
    /// The secret sources each namespace may name.
    pub secrets: SecretsConfig,
    /// What CEL may be (`cel` in the configuration).
    pub cel: Limits,
    /// What a Namespace leaves out (`namespaceDefaults` in the configuration).
    pub namespace_defaults: NamespaceDefaults,
}

/// Validates `resources`; references may resolve to them or to `stored`.
pub fn validate(resources: &[Located], stored: &HashSet<ResourceKey>, checks: &Checks) -> Vec<ResourceError> {
    let mut errors = Vec::new();
    let mut seen: HashMap<ResourceKey, &Origin> = HashMap::new();
    for located in resources {
        let key = located.resource.key();
        if let Some(first) = seen.get(&key) {
            errors.push(ResourceError::at(
                &located.origin,
                "metadata.name",
                format!(
                    "duplicate {} `{}` in namespace `{}`: also defined in {} (document {})",
                    key.kind, key.name, key.namespace, first.file, first.document
                ),
            ));
        } else {
            seen.insert(key, &located.origin);
        }
    }
    let known = |kind: Kind, namespace: &str, name: &str| {
        let key = ResourceKey { kind, namespace: namespace.to_owned(), name: name.to_owned() };
        seen.contains_key(&key) || stored.contains(&key)
    };
    for located in resources {
        let mut v = Validator { origin: &located.origin, errors: &mut errors, checks };
        let metadata = &located.resource.metadata;
        v.metadata(metadata, located.resource.kind());
        let namespace = metadata.namespace.as_str();
        let reference = |v: &mut Validator<'_>, path: &str, kind: Kind, name: &str| {
            if !known(kind, namespace, name) {
                v.error(
                    path,
                    format!("{kind} `{name}` not found in namespace `{namespace}` (neither in this apply nor stored)"),
                );
            }
        };
        match &located.resource.spec {
            Spec::Endpoint(spec) => {
                v.endpoint(namespace, spec);
                for (i, name) in spec.filter_refs.iter().enumerate() {
                    reference(&mut v, &format!("spec.filterRefs[{i}]"), Kind::Filter, name);
                }
                if let Some(name) = &spec.retry_budget_ref {
                    reference(&mut v, "spec.retryBudgetRef", Kind::RetryBudget, name);
                }
            }
            Spec::RetryBudget(spec) => v.retry_budget(spec),
            Spec::Filter(spec) => v.filter(spec),
            Spec::AgentRule(spec) => {
                v.agent_rule(spec);
                for (i, name) in spec.endpoint_refs.iter().enumerate() {
                    reference(&mut v, &format!("spec.endpointRefs[{i}]"), Kind::Endpoint, name);
                }
            }
            Spec::EventType(spec) => v.event_type(spec),
            Spec::Namespace(spec) => v.namespace(spec),
        }
    }
    errors
}

/// Checks each namespace's `quotas.maxEndpoints` against the Endpoints it would hold after
/// an apply: those `known` (stored and not pruned, or applied) of kind Endpoint. The
/// Namespace in force is the applied one, else `stored` (the stored Namespaces' specs, by
/// name). Each Endpoint document applied to a namespace over its limit is named.
pub fn check_endpoint_quotas(
    resources: &[Located],
    known: &HashSet<ResourceKey>,
    stored: &HashMap<String, NamespaceSpec>,
) -> Vec<ResourceError> {
    let mut specs: HashMap<&str, &NamespaceSpec> = stored.iter().map(|(name, spec)| (name.as_str(), spec)).collect();
    for located in resources {
        if let Spec::Namespace(spec) = &located.resource.spec {
            specs.insert(located.resource.metadata.name.as_str(), spec);
        }
    }
    let applied: Vec<ResourceKey> = resources.iter().map(|l| l.resource.key()).collect();
    let mut held: HashMap<&str, HashSet<&str>> = HashMap::new();
    for key in known.iter().chain(&applied).filter(|k| k.kind == Kind::Endpoint) {
        held.entry(key.namespace.as_str()).or_default().insert(key.name.as_str());
    }
    let mut errors = Vec::new();
    for located in resources {
        let Spec::Namespace(spec) = &located.resource.spec else { continue };
        let name = located.resource.metadata.name.as_str();
        let count = held.get(name).map_or(0, HashSet::len);
        if let Some(limit) = spec.quotas.as_ref().and_then(|q| q.max_endpoints).filter(|l| count > *l as usize) {
            errors.push(ResourceError::at(
                &located.origin,
                "spec.quotas.maxEndpoints",
                format!("namespace `{name}` would hold {count} Endpoints, more than {limit}: delete some first"),
            ));
        }
    }
    for located in resources.iter().filter(|l| l.resource.kind() == Kind::Endpoint) {
        let namespace = located.resource.metadata.namespace.as_str();
        let Some(limit) = specs.get(namespace).and_then(|s| s.quotas.as_ref()).and_then(|q| q.max_endpoints) else {
            continue;
        };
        let count = held.get(namespace).map_or(0, HashSet::len);
        if count > limit as usize {
            errors.push(ResourceError::at(
                &located.origin,
                "metadata.name",
                format!(
                    "namespace `{namespace}` may hold at most {limit} Endpoints (its Namespace's spec.quotas.maxEndpoints); with this apply it would hold {count}"
                ),
            ));
        }
    }
    errors
}

/// Namespaces and names are DNS labels.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

const DNS_LABEL_RULE: &str =
    "must be a DNS label: 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";

/// An EventType is named by its event type, which may hold dots (`order.created`): 1-253
/// characters of a-z, A-Z, 0-9, '.', '_' and '-', starting and ending with a letter or
/// digit. No '/' or ':', so that the name stays one segment of a URL path.
pub fn is_event_type_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

const EVENT_TYPE_NAME_RULE: &str = "an EventType's name is its event type: 1-253 characters of a-z, A-Z, 0-9, '.', '_' and '-', starting and ending with a letter or digit";

struct Validator<'a> {
    origin: &'a Origin,
    errors: &'a mut Vec<ResourceError>,
    checks: &'a Checks,
}

impl Validator<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ResourceError::at(self.origin, path, message));
    }

    fn cel(&mut self, path: &str, source: &str, variables: &[&str]) {
        if let Err(message) = expr::compile(source, variables, &self.checks.cel) {
            self.error(path, message);
        }
    }

    fn metadata(&mut self, m: &super::Metadata, kind: Kind) {
        if kind == Kind::EventType {
            if !is_event_type_name(&m.name) {
                self.error("metadata.name", EVENT_TYPE_NAME_RULE);
            }
        } else if !is_dns_label(&m.name) {
            self.error("metadata.name", DNS_LABEL_RULE);
        }
        // A cluster-scoped resource has no namespace (it was refused with one when read).
        if !kind.is_cluster_scoped() && !is_dns_label(&m.namespace) {
            self.error("metadata.namespace", DNS_LABEL_RULE);
        }
        for (key, value) in &m.labels {
            let valid_key = !key.is_empty()
                && key.len() <= 253
                && key.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !valid_key {
                self.error(
                    &format!("metadata.labels.{key}"),
                    "label keys are 1-253 characters of a-z, A-Z, 0-9, '-', '_', '.', '/'",
                );
            }
            if value.len() > 63 || !value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                self.error(
                    &format!("metadata.labels.{key}"),
                    "label values are at most 63 characters of a-z, A-Z, 0-9, '-', '_', '.'",
                );
            }
        }
    }

    fn event_type_globs(&mut self, path: &str, globs: &[String]) {
        for (i, glob) in globs.iter().enumerate() {
            let valid = !glob.is_empty()
                && glob.len() <= 256
                && glob.chars().all(|c| c.is_ascii_alphanumeric() || "._-*:/".contains(c));
            if !valid {
                self.error(
                    &format!("{path}[{i}]"),
                    "event type globs are 1-256 characters of letters, digits, '.', '_', '-', ':', '/' and '*'",
                );
            }
        }
    }

    fn endpoint(&mut self, namespace: &str, spec: &EndpointSpec) {
        self.url(&spec.url);
        if spec.secrets.is_empty() {
            self.error("spec.secrets", "at least one signing secret is required");
        }
        for (i, secret) in spec.secrets.iter().enumerate() {
            self.secret(&format!("spec.secrets[{i}]"), namespace, secret);
        }
        self.event_type_globs("spec.eventTypes", &spec.event_types);
        if let Some(ordering) = &spec.ordering {
            self.cel("spec.ordering.key", &ordering.key, EVENT_VARIABLES);
        }
        if let Some(source) = &spec.transform {
            if let Err(message) = Transform::compile(source, &self.checks.cel) {
                self.error("spec.transform", message);
            }
        }
        if let Some(owner) = &spec.owner {
            if owner.is_empty() || owner.len() > crate::operational::MAX_OWNER_BYTES {
                self.error("spec.owner", format!("must be 1 to {} bytes long", crate::operational::MAX_OWNER_BYTES));
            } else if owner.chars().any(char::is_control) {
                self.error("spec.owner", "must not contain control characters");
            }
        }
        if let Some(rate) = &spec.rate_limit {
            if !(1..=100_000).contains(&rate.per_second) {
                self.error("spec.rateLimit.perSecond", "must be between 1 and 100000");
            }
        }
        if let Some(timeout) = spec.timeout {
            let d = timeout.as_duration();
            if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(300) {
                self.error("spec.timeout", "must be between 100ms and 5m");
            }
        }
        for (name, value) in &spec.headers {
            let path = format!("spec.headers.{name}");
            match axum::http::HeaderName::from_bytes(name.as_bytes()) {
                Err(_) => self.error(&path, "is not a valid HTTP header name"),
                Ok(header) => {
                    let reserved =
                        ["content-type", "content-length", "host", "traceparent", "transfer-encoding", "connection"];
                    if reserved.contains(&header.as_str()) || header.as_str().starts_with("webhook-") {
                        self.error(&path, "is set by Hookwarden itself and cannot be overridden");
                    } else if spec.format == DeliveryFormat::Cloudevents && header.as_str().starts_with("ce-") {
                        self.error(
                            &path,
                            "is set from the event's attributes with `format: cloudevents` and cannot be overridden",
                        );
                    }
                }
            }
            if axum::http::HeaderValue::from_str(value).is_err() {
                self.error(&path, "is not a valid HTTP header value");
            }
            if value == super::diff::REDACTED {
                self.error(&path, "is `(redacted)`, which is shown in place of a header value not listed in `plainHeaders`: give the real value");
            }
        }
        for (i, name) in spec.plain_headers.iter().enumerate() {
            if !spec.headers.keys().any(|header| header.eq_ignore_ascii_case(name)) {
                self.error(&format!("spec.plainHeaders[{i}]"), "names no header of `spec.headers`");
            }
        }
    }

    fn url(&mut self, raw: &str) {
        let url = match reqwest::Url::parse(raw) {
            Ok(url) => url,
            Err(e) => return self.error("spec.url", format!("is not a valid URL ({e})")),
        };
        if url.scheme() != "https" && url.scheme() != "http" {
            return self.error("spec.url", "must be an http:// or https:// URL");
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.error("spec.url", "must not carry credentials; use spec.headers");
        }
        let Some(host) = url.host() else { return self.error("spec.url", "must name a host") };
        if !self.checks.allow_private_urls && is_private_host(&host) {
            self.error(
                "spec.url",
                "points to a loopback, private or link-local address; set HOOKWARDEN_ALLOW_PRIVATE_URLS=true to allow it",
            );
        }
    }

    fn secret(&mut self, path: &str, namespace: &str, secret: &SecretSource) {
        match (&secret.value, &secret.value_from) {
            (Some(value), None) => {
                if let Err(message) = check_whsec(value) {
                    self.error(&format!("{path}.value"), message);
                }
            }
            // Only the form: whether a source can be read is the catalog's to learn (and
            // to report in the endpoint's status), not an apply's.
            (None, Some(from)) => match (&from.env, &from.file) {
                (Some(var), None) => {
                    if let Err(message) = self.checks.secrets.check_env(namespace, var) {
                        self.error(&format!("{path}.valueFrom.env"), message);
                    }
                }
                (None, Some(file)) => {
                    if let Err(message) = self.checks.secrets.check_file(namespace, file) {
                        self.error(&format!("{path}.valueFrom.file"), message);
                    }
                }
                _ => self.error(&format!("{path}.valueFrom"), "must have exactly one of `env` or `file`"),
            },
            _ => self.error(path, "must have exactly one of `value` or `valueFrom`"),
        }
    }

    fn retry_budget(&mut self, spec: &RetryBudgetSpec) {
        if !(1..=100).contains(&spec.max_attempts) {
            self.error("spec.maxAttempts", "must be between 1 and 100");
        }
        if spec.backoff.base.as_duration().is_zero() {
            self.error("spec.backoff.base", "must be greater than 0s");
        }
        if spec.backoff.max < spec.backoff.base {
            self.error("spec.backoff.max", "must be >= spec.backoff.base");
        }
        if spec.retries_per_hour == Some(0) {
            self.error("spec.retriesPerHour", "must be at least 1 (leave it out for no limit)");
        }
        if let Some(breaker) = &spec.circuit_breaker {
            if breaker.consecutive_failures == 0 {
                self.error("spec.circuitBreaker.consecutiveFailures", "must be at least 1");
            }
            if breaker.open_for.as_duration().is_zero() {
                self.error("spec.circuitBreaker.openFor", "must be greater than 0s");
            }
        }
        if spec.dead_letter_after.is_some_and(|d| d.as_duration().is_zero()) {
            self.error("spec.deadLetterAfter", "must be greater than 0s");
        }
        for (i, status) in spec.retry_on_status.iter().enumerate() {
            if !(400..500).contains(status) || *status == 410 {
                self.error(
                    &format!("spec.retryOnStatus[{i}]"),
                    "must be a 4xx status other than 410 (5xx are always retried)",
                );
            }
        }
    }

    fn event_type(&mut self, spec: &EventTypeSpec) {
        if spec.description.as_ref().is_some_and(|d| d.len() > 4096) {
            self.error("spec.description", "must be at most 4096 bytes long");
        }
        if spec.schema.is_none() && !spec.examples.is_empty() {
            self.error("spec.examples", "examples need a `schema` to be checked against");
        }
        for problem in super::event_schema::check_spec(spec.schema.as_ref(), &spec.examples) {
            self.error(&problem.path, problem.message);
        }
    }

    fn namespace(&mut self, spec: &NamespaceSpec) {
        let before = self.errors.len();
        if let Some(retention) = &spec.retention {
            let fields = [
                ("spec.retention.events", retention.events),
                ("spec.retention.deadLetters", retention.dead_letters),
                ("spec.retention.attempts", retention.attempts),
            ];
            for (path, d) in fields {
                if let Some(message) = d.and_then(|d| retention_problem(d.0)) {
                    self.error(path, message);
                }
            }
        }
        if let Some(message) = spec.dedup_window.and_then(|d| window_problem(d.0)) {
            self.error("spec.dedupWindow", message);
        } else if self.errors.len() == before {
            // Compared only when the retention itself is valid.
            let settings = Settings::of(Some(spec), &self.checks.namespace_defaults);
            if settings.dedup_window > settings.retention.events {
                self.error(
                    "spec.dedupWindow",
                    format!(
                        "must not be longer than retention.events ({}): a duplicate would be answered with an event that is gone",
                        crate::duration::DurationText(settings.retention.events)
                    ),
                );
            }
        }
        let Some(quotas) = &spec.quotas else { return };
        if let Some(ingest) = &quotas.ingest {
            if !(1..=1_000_000).contains(&ingest.per_second) {
                self.error("spec.quotas.ingest.perSecond", "must be between 1 and 1000000");
            }
            if let Some(burst) = ingest.burst {
                if burst < ingest.per_second || burst > 10_000_000 {
                    self.error("spec.quotas.ingest.burst", "must be at least perSecond and at most 10000000");
                }
            }
            if ingest.per_day == Some(0) {
                self.error("spec.quotas.ingest.perDay", "must be at least 1 (leave it out for no daily limit)");
            }
        }
        if quotas.max_endpoints == Some(0) {
            self.error("spec.quotas.maxEndpoints", "must be at least 1 (leave it out for no limit)");
        }
        if let Some(bytes) = quotas.max_payload_bytes {
            if !(1..=1 << 30).contains(&bytes) {
                self.error("spec.quotas.maxPayloadBytes", "must be between 1 and 1073741824");
            }
        }
    }

    fn filter(&mut self, spec: &FilterSpec) {
        if spec.event_types.is_empty() && spec.expression.is_none() {
            self.error("spec", "a Filter needs `eventTypes`, `expression`, or both");
        }
        self.event_type_globs("spec.eventTypes", &spec.event_types);
        if let Some(expression) = &spec.expression {
            self.cel("spec.expression", expression, EVENT_VARIABLES);
        }
    }

    fn agent_rule(&mut self, spec: &AgentRuleSpec) {
        if spec.selector.is_none() && spec.endpoint_refs.is_empty() {
            self.error("spec", "an AgentRule needs `selector` or `endpointRefs` to say which agents it governs");
        }
        if let Some(source) = &spec.match_expression {
            self.cel("spec.match", source, POLICY_VARIABLES);
        }
        if let Some(source) = &spec.reason_expression {
            self.cel("spec.reasonExpression", source, POLICY_VARIABLES);
        }
        if spec.reason.is_some() && spec.reason_expression.is_some() {
            self.error("spec.reasonExpression", "give `reason` or `reasonExpression`, not both");
        }
        if let Some(spend) = &spec.spend {
            self.cel("spec.spend.amount", &spend.amount, POLICY_VARIABLES);
            if let Some(per) = &spend.per {
                self.cel("spec.spend.per", per, POLICY_VARIABLES);
            }
            if spend.currency.len() != 3 || !spend.currency.chars().all(|c| c.is_ascii_uppercase()) {
                self.error("spec.spend.currency", "must be an ISO 4217 code such as USD");
            }
            if spend.limit <= 0 {
                self.error("spec.spend.limit", "must be a positive amount in minor units");
            }
            if spend.window.as_duration().is_zero() {
                self.error("spec.spend.window", "must be greater than 0s");
            }
        }
        if let Some(approval) = &spec.approval {
            if !(1..=10).contains(&approval.quorum) {
                self.error("spec.approval.quorum", "must be between 1 and 10");
            }
            if approval.expires_after.as_duration().is_zero() {
                self.error("spec.approval.expiresAfter", "must be greater than 0s");
            }
            if !["admin", "operator", "approver"].contains(&approval.role.as_str()) {
                self.error("spec.approval.role", "must be `approver`, `operator` or `admin`");
            }
        }
        if spec.decision != Decision::Hold && spec.spend.is_none() && spec.approval.is_some() {
            self.error("spec.approval", "only applies to `decision: hold` or a spend clause that holds");
        }
    }
}

/// A Standard Webhooks secret: `whsec_` and base64 of 24 to 64 bytes.
pub fn check_whsec(value: &str) -> Result<Vec<u8>, String> {
    if value == super::diff::REDACTED {
        return Err("is redacted: secrets are never shown, so give the real value or use `valueFrom`".into());
    }
    let encoded = value.strip_prefix("whsec_").ok_or("must start with `whsec_` (Standard Webhooks secret format)")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "must be `whsec_` followed by standard base64".to_owned())?;
    if !(24..=64).contains(&bytes.len()) {
        return Err(format!("decodes to {} bytes; secrets are 24 to 64 random bytes", bytes.len()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::parse_file;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn errors_of(yaml: &str, checks: Checks) -> Vec<ResourceError> {
        let mut parsed = parse_file("test.yaml", yaml);
        parsed.errors.extend(validate(&parsed.resources, &parsed.unparsed, &checks));
        parsed.errors
    }

    fn paths(errors: &[ResourceError]) -> Vec<(usize, String)> {
        errors.iter().map(|e| (e.document, e.path.clone())).collect()
    }

    #[test]
    fn a_complete_valid_set_has_no_errors() {
        let yaml = format!(
            r#"
apiVersion: hookwarden/v1
kind: RetryBudget
metadata: {{name: standard, namespace: payments}}
spec:
  maxAttempts: 8
  backoff: {{base: 5s, max: 1h, jitter: full}}
  retriesPerHour: 500
  circuitBreaker: {{consecutiveFailures: 10, openFor: 5m}}
  deadLetterAfter: 72h
---
apiVersion: hookwarden/v1
kind: Filter
metadata: {{name: large-orders, namespace: payments}}
spec:
  eventTypes: ["order.*"]
  expression: "event.data.total >= 1000"
---
apiVersion: hookwarden/v1
kind: Endpoint
metadata: {{name: refund-agent, namespace: payments, labels: {{role: agent}}}}
spec:
  url: https://agents.example.com/refunds
  agent: true
  secrets: [{{value: {SECRET}}}]
  eventTypes: ["refund.requested"]
  filterRefs: [large-orders]
  retryBudgetRef: standard
  ordering: {{key: "event.data.order_id"}}
  timeout: 10s
---
apiVersion: hookwarden/v1
kind: AgentRule
metadata: {{name: refunds, namespace: payments}}
spec:
  selector: {{matchLabels: {{role: agent}}}}
  match: "event.type == 'refund.requested'"
  decision: allow
  spend: {{amount: "int(event.data.amount_cents)", currency: USD, limit: 50000, window: 24h, overLimit: hold}}
  approval: {{role: approver, quorum: 2, expiresAfter: 4h, onExpiry: deny}}
  reasonExpression: "'refund of ' + string(event.data.amount_cents) + ' cents'"
"#
        );
        assert_eq!(errors_of(&yaml, Checks::default()), vec![]);
    }

    #[test]
    fn each_kind_of_mistake_is_named_by_document_and_path() {
        let yaml = format!(
            r#"
apiVersion: hookwarden/v1
kind: RetryBudget
metadata: {{name: standard}}
spec: {{maxAttempts: 3, backoff: {{base: 1m, max: 5s}}}}
---
apiVersion: hookwarden/v1
kind: RetryBudget
metadata: {{name: standard}}
spec: {{maxAttempts: 3, backoff: {{base: 1s, max: 5s}}}}
---
apiVersion: hookwarden/v1
kind: Endpoint
metadata: {{name: hooks}}
spec: {{url: "http://127.0.0.1/x", secrets: [{{value: {SECRET}}}], retryBudgetRef: missing, filterRefs: [nope]}}
---
apiVersion: hookwarden/v1
kind: Filter
metadata: {{name: broken}}
spec: {{expression: "event.data.total >= "}}
"#
        );
        let errors = errors_of(&yaml, Checks::default());
        let found = paths(&errors);
        for expected in [
            (0, "spec.backoff.max"),
            (1, "metadata.name"),
            (2, "spec.url"),
            (2, "spec.retryBudgetRef"),
            (2, "spec.filterRefs[0]"),
            (3, "spec.expression"),
        ] {
            assert!(found.contains(&(expected.0, expected.1.to_owned())), "missing {expected:?} in {errors:#?}");
        }
        let backoff = errors.iter().find(|e| e.path == "spec.backoff.max").unwrap();
        assert_eq!(backoff.message, "must be >= spec.backoff.base");
    }

    #[test]
    fn unknown_fields_and_bad_durations_name_the_field_and_line() {
        let yaml = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: a}\nspec:\n  maxAttempts: 3\n  backof: {base: 1s, max: 2s}\n---\napiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: b}\nspec:\n  maxAttempts: 3\n  backoff: {base: soon, max: 2s}\n";
        let errors = errors_of(yaml, Checks::default());
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_eq!((errors[0].document, errors[0].path.as_str()), (0, "spec.backof"));
        assert!(errors[0].message.contains("unknown field `backof`"), "{}", errors[0].message);
        assert_eq!(errors[0].line, Some(6));
        assert_eq!((errors[1].document, errors[1].path.as_str()), (1, "spec.backoff.base"));
        assert!(errors[1].message.contains("`soon` is not a duration"), "{}", errors[1].message);
        assert_eq!(errors[1].line, Some(13));
    }

    #[test]
    fn a_bad_value_in_a_block_mapping_is_reported_on_its_own_line() {
        let yaml = format!(
            "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: a}}\nspec:\n  url: https://a.example.com\n  secrets: [{{value: {SECRET}}}]\n  # the timeout: below is wrong\n  timeout: ten seconds\n"
        );
        let errors = errors_of(&yaml, Checks::default());
        assert_eq!((errors[0].path.as_str(), errors[0].line), ("spec.timeout", Some(8)), "{errors:#?}");
    }

    #[test]
    fn a_cloudevents_endpoint_may_not_set_ce_headers_and_the_format_is_one_of_two() {
        let endpoint = |format: &str| {
            format!(
                "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: a}}\nspec:\n  url: https://a.example.com\n  secrets: [{{value: {SECRET}}}]\n  format: {format}\n  headers: {{ce-source: x, x-team: billing}}\n"
            )
        };
        assert_eq!(errors_of(&endpoint("standard"), Checks::default()), vec![]);
        let errors = errors_of(&endpoint("cloudevents"), Checks::default());
        assert_eq!(paths(&errors), vec![(0, "spec.headers.ce-source".to_owned())], "{errors:#?}");
        let errors = errors_of(&endpoint("cloudevent"), Checks::default());
        assert_eq!(paths(&errors), vec![(0, "spec.format".to_owned())], "{errors:#?}");
        assert!(
            errors[0].message.contains("standard") && errors[0].message.contains("cloudevents"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn dns_labels_are_recognised() {
        assert!(is_dns_label("payments"));
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("Payments"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
    }

    #[test]
    fn event_type_names_may_hold_dots_and_other_names_may_not() {
        let yaml = "apiVersion: hookwarden/v1\nkind: EventType\nmetadata: {name: order.created_v2, namespace: payments}\nspec:\n  schema: {type: object, required: [total], properties: {total: {type: integer, minimum: 0}}}\n  examples: [{total: 1}]\n";
        assert_eq!(errors_of(yaml, Checks::default()), vec![]);
        for bad in [".order", "order.", "order/created", "order:created", ""] {
            let errors = errors_of(&yaml.replace("order.created_v2", &format!("'{bad}'")), Checks::default());
            assert_eq!(paths(&errors), vec![(0, "metadata.name".to_owned())], "{bad}: {errors:#?}");
        }
        let budget = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: a.b}\nspec: {maxAttempts: 3, backoff: {base: 1s, max: 2s}}\n";
        assert_eq!(paths(&errors_of(budget, Checks::default())), vec![(0, "metadata.name".to_owned())]);
    }

    #[test]
    fn an_event_type_with_a_bad_schema_or_example_is_refused_at_its_path() {
        let yaml = "apiVersion: hookwarden/v1\nkind: EventType\nmetadata: {name: order.created}\nspec:\n  schema: {type: object, properties: {total: {type: integer, minimum: 0}}}\n  examples: [{total: -1}]\n---\napiVersion: hookwarden/v1\nkind: EventType\nmetadata: {name: order.paid}\nspec:\n  schema: {type: objekt}\n";
        let errors = errors_of(yaml, Checks::default());
        assert_eq!(
            paths(&errors),
            vec![(0, "spec.examples[0].total".to_owned()), (1, "spec.schema.type".to_owned())],
            "{errors:#?}"
        );
    }

    #[test]
    fn secrets_must_have_the_standard_webhooks_form() {
        assert!(check_whsec(SECRET).is_ok());
        assert!(check_whsec("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(check_whsec("whsec_c2hvcnQ=").unwrap_err().contains("bytes"));
    }

    #[test]
    fn an_owner_is_free_text_bounded_and_on_one_line() {
        let endpoint = |owner: &str| {
            format!("apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: ep}}\nspec:\n  url: https://a.example.com/hooks\n  secrets: [{{value: {SECRET}}}]\n  owner: {owner}\n")
        };
        assert_eq!(errors_of(&endpoint("\"payments-team <pay@example.com>\""), Checks::default()), vec![]);
        for bad in [format!("\"{}\"", "x".repeat(257)), "\"\"".to_owned(), "\"two\\nlines\"".to_owned()] {
            let errors = errors_of(&endpoint(&bad), Checks::default());
            assert_eq!(paths(&errors), [(0, "spec.owner".to_owned())], "{bad}");
        }
    }
}
