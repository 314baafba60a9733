//! The compiled view of the endpoints and filters in force: which endpoints an event fans
//! out to, and everything dispatch needs about each endpoint.
//!
//! Built from the stored resources (CEL compiled once, secrets resolved once) and swapped
//! whole when they change, so ingest and dispatch never see half an update.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{json, Value};

use super::retry::Backoff;
use crate::policy::engine::{CompiledRule, PolicySet};
use crate::policy::expr::{self, CompiledExpr, Limits};
use crate::resources::kinds::{EndpointSpec, FilterSpec, Jitter, RetryBudgetSpec};
use crate::resources::validate::{check_whsec, EVENT_VARIABLES};
use crate::resources::{Kind, Spec};
use crate::store::{Store, StoreError, StoredResource};

/// Attempt timeout when the endpoint sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Retry settings of endpoints without a RetryBudget.
pub fn default_budget() -> Budget {
    Budget {
        max_attempts: 8,
        backoff: Backoff { base: Duration::from_secs(5), max: Duration::from_secs(3600), jitter: Jitter::Full },
        retries_per_hour: None,
        breaker: Some((10, Duration::from_secs(300))),
        dead_letter_after: Some(Duration::from_secs(72 * 3600)),
        retry_on_status: Vec::new(),
    }
}

/// A RetryBudget as dispatch uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub retries_per_hour: Option<u32>,
    /// `(consecutive failures that open it, how long it stays open)`.
    pub breaker: Option<(u32, Duration)>,
    pub dead_letter_after: Option<Duration>,
    /// 4xx statuses retried rather than failed.
    pub retry_on_status: Vec<u16>,
}

impl From<&RetryBudgetSpec> for Budget {
    fn from(spec: &RetryBudgetSpec) -> Self {
        Budget {
            max_attempts: spec.max_attempts,
            backoff: Backoff { base: spec.backoff.base.0, max: spec.backoff.max.0, jitter: spec.backoff.jitter },
            retries_per_hour: spec.retries_per_hour,
            breaker: spec.circuit_breaker.as_ref().map(|b| (b.consecutive_failures, b.open_for.0)),
            dead_letter_after: spec.dead_letter_after.map(|d| d.0),
            retry_on_status: spec.retry_on_status.clone(),
        }
    }
}

/// One endpoint, ready to match and to dispatch to.
#[derive(Clone, Debug)]
pub struct EndpointEntry {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub labels: std::collections::BTreeMap<String, String>,
    pub spec: EndpointSpec,
    pub secrets: Vec<Vec<u8>>,
    pub timeout: Duration,
    pub budget: Budget,
    filters: Vec<CompiledFilter>,
    ordering: Option<CompiledExpr>,
}

#[derive(Clone, Debug)]
struct CompiledFilter {
    event_types: Vec<String>,
    expression: Option<CompiledExpr>,
}

/// One endpoint an event fans out to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanOut {
    pub endpoint: String,
    pub ordering_key: Option<String>,
}

/// What fan-out looks at of an event.
pub struct EventView<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub source: &'a str,
    pub event_type: &'a str,
    pub subject: Option<&'a str>,
    pub time: Option<String>,
    pub data: &'a str,
}

impl EventView<'_> {
    /// The `event` variable of CEL programs.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "source": self.source,
            "type": self.event_type,
            "subject": self.subject,
            "time": self.time,
            "data": serde_json::from_str::<Value>(self.data).unwrap_or(Value::Null),
        })
    }
}

/// The compiled rules of a namespace and the `(name, namespace, spec)` they came from.
type RuleSources = (Vec<CompiledRule>, Vec<(String, String, Value)>);

/// The endpoints in force, by namespace.
#[derive(Debug, Default)]
pub struct Catalog {
    by_namespace: HashMap<String, Vec<Arc<EndpointEntry>>>,
    /// The AgentRules in force, by namespace.
    policies: HashMap<String, Arc<PolicySet>>,
    /// Changes whenever the stored resources change.
    pub fingerprint: String,
}

/// `*` matches any run of characters (dots included); everything else literally.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

fn types_match(globs: &[String], event_type: &str) -> bool {
    globs.is_empty() || globs.iter().any(|g| glob_matches(g, event_type))
}

/// Runs a boolean CEL program over `event`; anything but `true` (an error included) is false.
pub fn eval_bool(program: &CompiledExpr, event: &Value) -> Result<bool, String> {
    match eval(program, event)? {
        cel::Value::Bool(b) => Ok(b),
        other => Err(format!("expected a bool, got {}", expr::describe(&other))),
    }
}

fn eval(program: &CompiledExpr, event: &Value) -> Result<cel::Value, String> {
    expr::with_root(|root| {
        let mut context = root.new_inner_scope();
        context.add_variable_as_val("event", expr::json_val(event));
        expr::execute(program, &context)
    })
}

/// The ordering lane of an event: the key expression's value as text.
fn ordering_key(program: &CompiledExpr, event: &Value) -> String {
    match eval(program, event) {
        Ok(value) => expr::value_text(&value),
        // Keep such events ordered among themselves rather than not at all.
        Err(_) => "(no key)".to_owned(),
    }
}

impl Catalog {
    /// The endpoints `event` fans out to (namespace, type globs, filters).
    pub fn fan_out(&self, event: &EventView<'_>) -> Vec<FanOut> {
        let Some(endpoints) = self.by_namespace.get(event.namespace) else { return Vec::new() };
        let candidates: Vec<&Arc<EndpointEntry>> =
            endpoints.iter().filter(|e| types_match(&e.spec.event_types, event.event_type)).collect();
        if candidates.is_empty() {
            return Vec::new();
        }
        let needs_json =
            candidates.iter().any(|e| e.ordering.is_some() || e.filters.iter().any(|f| f.expression.is_some()));
        let json = if needs_json { event.to_json() } else { Value::Null };
        candidates
            .into_iter()
            .filter(|e| {
                e.filters.iter().all(|f| {
                    types_match(&f.event_types, event.event_type)
                        && f.expression.as_ref().is_none_or(|x| match eval_bool(x, &json) {
                            Ok(pass) => pass,
                            Err(error) => {
                                tracing::warn!(endpoint = %e.name, event_id = event.id, %error, "filter failed; event not sent");
                                false
                            }
                        })
                })
            })
            .map(|e| FanOut { endpoint: e.name.clone(), ordering_key: e.ordering.as_ref().map(|o| ordering_key(o, &json)) })
            .collect()
    }

    /// The longest attempt timeout of any endpoint (a claim's lease must outlast it).
    pub fn max_timeout(&self) -> Duration {
        self.by_namespace.values().flatten().map(|e| e.timeout).max().unwrap_or(DEFAULT_TIMEOUT)
    }

    /// Every endpoint, for health and re-enabling.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<EndpointEntry>> {
        self.by_namespace.values().flatten()
    }

    /// The AgentRules of a namespace (empty: every agent delivery is denied).
    pub fn policy(&self, namespace: &str) -> Arc<PolicySet> {
        self.policies.get(namespace).cloned().unwrap_or_default()
    }

    pub fn endpoint(&self, namespace: &str, name: &str) -> Option<Arc<EndpointEntry>> {
        self.by_namespace.get(namespace)?.iter().find(|e| e.name == name).cloned()
    }

    /// Builds the catalog from stored resources. Endpoints that cannot be used (an
    /// unreadable secret, a dangling reference) are left out and logged.
    pub fn build(resources: &[StoredResource], fingerprint: String) -> Catalog {
        let spec_of = |kind: Kind, namespace: &str, name: &str| {
            resources
                .iter()
                .find(|r| r.key.kind == kind && r.key.namespace == namespace && r.key.name == name)
                .and_then(|r| Spec::from_json(kind, r.spec.clone()).ok())
        };
        let mut by_namespace: HashMap<String, Vec<Arc<EndpointEntry>>> = HashMap::new();
        for resource in resources.iter().filter(|r| r.key.kind == Kind::Endpoint) {
            let (namespace, name) = (&resource.key.namespace, &resource.key.name);
            match Self::entry(resource, &spec_of) {
                Ok(entry) => by_namespace.entry(namespace.clone()).or_default().push(Arc::new(entry)),
                Err(error) => tracing::warn!(endpoint = %name, %namespace, %error, "endpoint left out of delivery"),
            }
        }
        let mut rules: HashMap<String, RuleSources> = HashMap::new();
        for resource in resources.iter().filter(|r| r.key.kind == Kind::AgentRule) {
            let (namespace, name) = (&resource.key.namespace, &resource.key.name);
            let compiled = match Spec::from_json(Kind::AgentRule, resource.spec.clone()) {
                Ok(Spec::AgentRule(spec)) => CompiledRule::compile(name, namespace, &spec),
                _ => Err("stored spec is unreadable".to_owned()),
            };
            match compiled {
                Ok(rule) => {
                    let entry = rules.entry(namespace.clone()).or_default();
                    entry.0.push(rule);
                    entry.1.push((name.clone(), namespace.clone(), resource.spec.clone()));
                }
                // Fail closed: a rule that cannot run (it passed validation, so this means
                // stored data went bad) stands in as a rule that denies every agent.
                Err(error) => {
                    tracing::error!(rule = %name, %namespace, %error, "agent rule cannot be compiled; its namespace's agents are denied");
                    let entry = rules.entry(namespace.clone()).or_default();
                    entry.0.push(CompiledRule::deny_all(
                        name,
                        namespace,
                        &format!("rule `{name}` cannot be compiled: {error}"),
                    ));
                    entry.1.push((name.clone(), namespace.clone(), resource.spec.clone()));
                }
            }
        }
        let policies =
            rules.into_iter().map(|(ns, (compiled, specs))| (ns, Arc::new(PolicySet::new(compiled, &specs)))).collect();
        Catalog { by_namespace, policies, fingerprint }
    }

    fn entry(
        resource: &StoredResource,
        spec_of: &impl Fn(Kind, &str, &str) -> Option<Spec>,
    ) -> Result<EndpointEntry, String> {
        let namespace = &resource.key.namespace;
        let Ok(Spec::Endpoint(spec)) = Spec::from_json(Kind::Endpoint, resource.spec.clone()) else {
            return Err("stored spec is unreadable".into());
        };
        let secrets = spec
            .secrets
            .iter()
            .map(|s| {
                let text = match (&s.value, &s.value_from) {
                    (Some(v), _) => v.clone(),
                    (None, Some(from)) => match (&from.env, &from.file) {
                        (Some(var), _) => {
                            std::env::var(var).map_err(|_| format!("environment variable `{var}` is not set"))?
                        }
                        (None, Some(file)) => std::fs::read_to_string(file)
                            .map_err(|e| format!("cannot read `{file}`: {e}"))?
                            .trim()
                            .to_owned(),
                        (None, None) => return Err("empty valueFrom".to_owned()),
                    },
                    (None, None) => return Err("empty secret".to_owned()),
                };
                check_whsec(&text)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let filters = spec
            .filter_refs
            .iter()
            .map(|name| match spec_of(Kind::Filter, namespace, name) {
                Some(Spec::Filter(FilterSpec { event_types, expression })) => Ok(CompiledFilter {
                    event_types,
                    expression: expression
                        .map(|x| expr::compile(&x, EVENT_VARIABLES, Limits::default()))
                        .transpose()?,
                }),
                _ => Err(format!("Filter `{name}` not found")),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let budget = match &spec.retry_budget_ref {
            None => default_budget(),
            Some(name) => match spec_of(Kind::RetryBudget, namespace, name) {
                Some(Spec::RetryBudget(b)) => Budget::from(&b),
                _ => return Err(format!("RetryBudget `{name}` not found")),
            },
        };
        let ordering =
            spec.ordering.as_ref().map(|o| expr::compile(&o.key, EVENT_VARIABLES, Limits::default())).transpose()?;
        Ok(EndpointEntry {
            namespace: namespace.clone(),
            name: resource.key.name.clone(),
            generation: resource.generation,
            labels: resource.labels.clone(),
            timeout: spec.timeout.map(|t| t.0).unwrap_or(DEFAULT_TIMEOUT),
            secrets,
            budget,
            filters,
            ordering,
            spec,
        })
    }
}

/// The catalog in force, shared by ingest and dispatch; swapped whole on refresh.
#[derive(Clone, Default)]
pub struct CatalogHandle(Arc<RwLock<Arc<Catalog>>>);

impl CatalogHandle {
    pub fn current(&self) -> Arc<Catalog> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds from the store when the stored resources changed; returns whether it did.
    pub async fn refresh(&self, store: &Store) -> Result<bool, StoreError> {
        let resources = store.list_resources(None, None).await?;
        let fingerprint = resources
            .iter()
            .map(|r| format!("{}:{}:{}", r.key, r.generation, r.updated_at.timestamp_micros()))
            .collect::<Vec<_>>()
            .join(",");
        if self.current().fingerprint == fingerprint {
            return Ok(false);
        }
        let catalog = Catalog::build(&resources, fingerprint);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(catalog);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_stars() {
        assert!(glob_matches("order.*", "order.created"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("*.created", "order.created"));
        assert!(glob_matches("a*b*c", "a-x-b-y-c"));
        assert!(!glob_matches("order.*", "refund.created"));
        assert!(!glob_matches("order.created", "order.created.v2"));
        assert!(!glob_matches("ab*ba", "aba"));
    }
}
