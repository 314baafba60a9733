//! The compiled view of the resources in force, used by ingest (fan-out), dispatch (each
//! endpoint's settings, signing keys and AgentRules) and the API (status, health).
//!
//! Built from the stored resources at one revision (CEL compiled once, secrets resolved
//! once) and swapped whole when the revision moves, so nobody sees half an update.
//! Invariants:
//! - every stored Endpoint is in the catalog, sendable or not: what it cannot do now
//!   (its secrets cannot be read, its RetryBudget is gone) is a [`Blocked`] reason, and its
//!   deliveries wait for it instead of being left out of fan-out;
//! - a catalog is never replaced by one built from an older revision.

pub mod event_types;
mod fanout;
pub mod follow;
pub mod secrets;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

pub use event_types::EventTypeEntry;
pub use fanout::{glob_matches, EventView, FanOut, FanOutError, FanOutResult, NO_KEY};
pub use state::{waiting_by_reason, Sendability, WAIT_REASONS};

use crate::delivery::retry::Backoff;
use crate::delivery::transform::Transform;
use crate::policy::engine::{CompiledRule, PolicySet};
use crate::policy::expr::{self, CompiledExpr, Limits};
use crate::policy::meter;
use crate::resources::kinds::{EndpointSpec, FilterSpec, Jitter, NamespaceSpec, RetryBudgetSpec};
use crate::resources::namespace::{NamespaceDefaults, Settings};
use crate::resources::secret_sources::SecretsConfig;
use crate::resources::validate::EVENT_VARIABLES;
use crate::resources::{Kind, Spec};
use crate::store::{Store, StoreError, StoredResource};
use crate::threads::{JobFailed, Pool, Priority};

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

/// Why an endpoint cannot be sent to now; its deliveries wait until it can.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Blocked {
    pub reason: BlockReason,
    /// What is missing, naming the reference, never a secret's value. For the
    /// namespace's viewers (its status) and the log; unauthenticated `/readyz` leaves it
    /// out.
    pub message: String,
}

/// The kinds of [`Blocked`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum BlockReason {
    /// A `valueFrom` secret cannot be read (yet) on this server.
    SecretUnavailable,
    /// Its RetryBudget no longer exists.
    ReferenceNotFound,
}

impl BlockReason {
    /// The condition reason shown in status (`Ready=False`).
    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::SecretUnavailable => "SecretUnavailable",
            BlockReason::ReferenceNotFound => "ReferenceNotFound",
        }
    }

    /// The `reason` label of the waiting-deliveries metric.
    pub fn label(self) -> &'static str {
        match self {
            BlockReason::SecretUnavailable => "secret_unavailable",
            BlockReason::ReferenceNotFound => "reference_not_found",
        }
    }
}

/// One endpoint, ready to match and to dispatch to.
#[derive(Clone, Debug)]
pub struct EndpointEntry {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub labels: BTreeMap<String, String>,
    pub spec: EndpointSpec,
    /// The signing keys, in order; empty while `blocked`.
    pub secrets: Vec<Vec<u8>>,
    /// Why it cannot be sent to now (its deliveries wait), or `None`.
    pub blocked: Option<Blocked>,
    pub timeout: Duration,
    pub budget: Budget,
    filters: Vec<FilterRef>,
    /// The ordering key's program, or why it cannot be compiled.
    ordering: Option<Result<CompiledExpr, String>>,
    /// The transform that builds the body, or why it cannot be compiled (a delivery then
    /// fails with that reason).
    pub transform: Option<Result<Transform, String>>,
}

/// A Filter an endpoint names, as fan-out can use it.
#[derive(Clone, Debug)]
enum FilterRef {
    Compiled {
        name: String,
        event_types: Vec<String>,
        expression: Option<CompiledExpr>,
    },
    /// Named by the endpoint but not stored (deleted since).
    Missing {
        name: String,
    },
    /// Stored, but its spec cannot be read or compiled.
    Broken {
        name: String,
        message: String,
    },
}

impl FilterRef {
    fn needs_event(&self) -> bool {
        matches!(self, FilterRef::Compiled { expression: Some(_), .. })
    }
}

/// The compiled rules of a namespace and the `(name, namespace, spec)` they came from.
type RuleSources = (Vec<CompiledRule>, Vec<(String, String, Value)>);

/// The resources in force, compiled.
#[derive(Debug, Default)]
pub struct Catalog {
    by_namespace: HashMap<String, Vec<Arc<EndpointEntry>>>,
    /// The AgentRules in force, by namespace.
    policies: HashMap<String, Arc<PolicySet>>,
    /// The EventTypes in force, their schemas compiled.
    event_types: Arc<event_types::EventTypes>,
    /// The Namespaces in force, by name (a namespace without one is not here).
    namespaces: Arc<HashMap<String, NamespaceSpec>>,
    /// The resource revision it was built from (`None`: nothing loaded yet).
    pub revision: Option<i64>,
    /// The bounds of each evaluation: a Filter, an ordering key, a policy decision.
    pub budget: meter::Budget,
}

/// Runs a CEL program over `event`, within `budget`.
fn eval(program: &CompiledExpr, event: &Value, budget: meter::Budget) -> Result<cel::Value, String> {
    expr::evaluate(program, &[("event", event)], budget)
}

impl Catalog {
    /// The longest attempt timeout of any endpoint (a claim's lease must outlast it).
    pub fn max_timeout(&self) -> Duration {
        self.endpoints().map(|e| e.timeout).max().unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The settings `namespace` runs with: its Namespace over `defaults`.
    pub fn namespace_settings(&self, namespace: &str, defaults: &NamespaceDefaults) -> Settings {
        Settings::of(self.namespaces.get(namespace), defaults)
    }

    /// The Namespaces in force, by name.
    pub fn namespaces(&self) -> &HashMap<String, NamespaceSpec> {
        &self.namespaces
    }

    /// Every endpoint.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<EndpointEntry>> {
        self.by_namespace.values().flatten()
    }

    /// Every endpoint that cannot be sent to now, with why, sorted by namespace and name.
    pub fn blocked(&self) -> Vec<(&EndpointEntry, &Blocked)> {
        let mut blocked: Vec<(&EndpointEntry, &Blocked)> =
            self.endpoints().filter_map(|e| e.blocked.as_ref().map(|b| (&**e, b))).collect();
        blocked.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        blocked
    }

    /// The AgentRules of a namespace (empty: every agent delivery is denied).
    pub fn policy(&self, namespace: &str) -> Arc<PolicySet> {
        self.policies.get(namespace).cloned().unwrap_or_default()
    }

    /// The names of the AgentRules in force, in every namespace (a name may repeat).
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.policies.values().flat_map(|p| p.rules.iter()).map(|r| r.name.as_str())
    }

    /// The EventType `name` of `namespace`, if there is one.
    pub fn event_type(&self, namespace: &str, name: &str) -> Option<&Arc<EventTypeEntry>> {
        self.event_types.get(namespace)?.get(name)
    }

    /// The EventTypes of `namespace` (every namespace when `None`), by namespace and name.
    pub fn event_types<'a>(&'a self, namespace: Option<&'a str>) -> Vec<&'a Arc<EventTypeEntry>> {
        let mut types: Vec<&Arc<EventTypeEntry>> = self
            .event_types
            .iter()
            .filter(|(ns, _)| namespace.is_none_or(|wanted| wanted == ns.as_str()))
            .flat_map(|(_, types)| types.values())
            .collect();
        types.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        types
    }

    /// The endpoints of the type's namespace whose `eventTypes` globs take it (no globs:
    /// every type), by name. Filters are not looked at: they decide per event.
    pub fn subscribers(&self, event_type: &EventTypeEntry) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .by_namespace
            .get(&event_type.namespace)
            .into_iter()
            .flatten()
            .filter(|e| {
                e.spec.event_types.is_empty() || e.spec.event_types.iter().any(|g| glob_matches(g, &event_type.name))
            })
            .map(|e| e.name.as_str())
            .collect();
        names.sort_unstable();
        names
    }

    pub fn endpoint(&self, namespace: &str, name: &str) -> Option<Arc<EndpointEntry>> {
        self.by_namespace.get(namespace)?.iter().find(|e| e.name == name).cloned()
    }

    /// Builds the catalog from the resources stored at `revision`, reading the secret
    /// sources `secrets` allows and compiling CEL within `limits`. Reads files: call it
    /// off the async workers.
    pub fn build(
        resources: &[StoredResource],
        revision: Option<i64>,
        secrets: &SecretsConfig,
        limits: &Limits,
    ) -> Catalog {
        let spec_of = |kind: Kind, namespace: &str, name: &str| {
            resources
                .iter()
                .find(|r| r.key.kind == kind && r.key.namespace == namespace && r.key.name == name)
                .map(|r| Spec::from_json(kind, r.spec.clone()))
        };
        let mut by_namespace: HashMap<String, Vec<Arc<EndpointEntry>>> = HashMap::new();
        for resource in resources.iter().filter(|r| r.key.kind == Kind::Endpoint) {
            let (namespace, name) = (&resource.key.namespace, &resource.key.name);
            match Self::entry(resource, &spec_of, secrets, limits) {
                Ok(entry) => by_namespace.entry(namespace.clone()).or_default().push(Arc::new(entry)),
                // Only a stored spec that no longer reads (corrupt data) gets here.
                Err(error) => tracing::error!(endpoint = %name, %namespace, %error, "endpoint cannot be read"),
            }
        }
        let mut rules: HashMap<String, RuleSources> = HashMap::new();
        for resource in resources.iter().filter(|r| r.key.kind == Kind::AgentRule) {
            let (namespace, name) = (&resource.key.namespace, &resource.key.name);
            let compiled = match Spec::from_json(Kind::AgentRule, resource.spec.clone()) {
                Ok(Spec::AgentRule(spec)) => CompiledRule::compile(name, namespace, &spec, limits),
                _ => Err("stored spec is unreadable".to_owned()),
            };
            let entry = rules.entry(namespace.clone()).or_default();
            match compiled {
                Ok(rule) => entry.0.push(rule),
                // Fail closed: a rule that cannot run (it passed validation, so this means
                // stored data went bad) stands in as a rule that denies every agent.
                Err(error) => {
                    tracing::error!(rule = %name, %namespace, %error, "agent rule cannot be compiled; its namespace's agents are denied");
                    entry.0.push(CompiledRule::deny_all(
                        name,
                        namespace,
                        &format!("rule `{name}` cannot be compiled: {error}"),
                    ));
                }
            }
            entry.1.push((name.clone(), namespace.clone(), resource.spec.clone()));
        }
        let policies =
            rules.into_iter().map(|(ns, (compiled, specs))| (ns, Arc::new(PolicySet::new(compiled, &specs)))).collect();
        let event_types = Arc::new(event_types::build(resources));
        let namespaces = resources
            .iter()
            .filter(|r| r.key.kind == Kind::Namespace)
            .filter_map(|r| match Spec::from_json(Kind::Namespace, r.spec.clone()) {
                Ok(Spec::Namespace(spec)) => Some((r.key.name.clone(), spec)),
                // It passed validation when applied: only stored data gone bad gets here,
                // and the namespace then runs with the server's defaults.
                _ => {
                    tracing::error!(namespace = %r.key.name, "Namespace cannot be read; the namespace gets the defaults");
                    None
                }
            })
            .collect();
        Catalog {
            by_namespace,
            policies,
            event_types,
            namespaces: Arc::new(namespaces),
            revision,
            budget: limits.budget(),
        }
    }

    fn entry(
        resource: &StoredResource,
        spec_of: &impl Fn(Kind, &str, &str) -> Option<Result<Spec, serde_json::Error>>,
        secrets: &SecretsConfig,
        limits: &Limits,
    ) -> Result<EndpointEntry, String> {
        let namespace = &resource.key.namespace;
        let Ok(Spec::Endpoint(spec)) = Spec::from_json(Kind::Endpoint, resource.spec.clone()) else {
            return Err("stored spec is unreadable".into());
        };
        let filters = spec
            .filter_refs
            .iter()
            .map(|name| match spec_of(Kind::Filter, namespace, name) {
                None => FilterRef::Missing { name: name.clone() },
                Some(Ok(Spec::Filter(FilterSpec { event_types, expression }))) => {
                    match expression.map(|x| expr::compile(&x, EVENT_VARIABLES, limits)).transpose() {
                        Ok(expression) => FilterRef::Compiled { name: name.clone(), event_types, expression },
                        Err(message) => FilterRef::Broken { name: name.clone(), message },
                    }
                }
                Some(_) => FilterRef::Broken { name: name.clone(), message: "its stored spec is unreadable".into() },
            })
            .collect();
        let (budget, budget_missing) = match &spec.retry_budget_ref {
            None => (default_budget(), None),
            Some(name) => match spec_of(Kind::RetryBudget, namespace, name) {
                Some(Ok(Spec::RetryBudget(b))) => (Budget::from(&b), None),
                _ => (default_budget(), Some(format!("RetryBudget `{name}` does not exist"))),
            },
        };
        let ordering = spec.ordering.as_ref().map(|o| expr::compile(&o.key, EVENT_VARIABLES, limits));
        let transform = spec.transform.as_ref().map(|source| Transform::compile(source, limits));
        let mut entry = EndpointEntry {
            namespace: namespace.clone(),
            name: resource.key.name.clone(),
            generation: resource.generation,
            labels: resource.labels.clone(),
            timeout: spec.timeout.map(|t| t.0).unwrap_or(DEFAULT_TIMEOUT),
            secrets: Vec::new(),
            blocked: budget_missing.map(|message| Blocked { reason: BlockReason::ReferenceNotFound, message }),
            budget,
            filters,
            ordering,
            transform,
            spec,
        };
        entry.resolve_secrets(secrets);
        Ok(entry)
    }
}

impl EndpointEntry {
    /// Reads the signing secrets; when one cannot be had the endpoint is blocked (unless
    /// something else blocks it already). Reads files: off the async workers.
    fn resolve_secrets(&mut self, config: &SecretsConfig) {
        let keys = self.spec.secrets.iter().map(|source| secrets::resolve(config, &self.namespace, source));
        match keys.collect::<Result<Vec<_>, String>>() {
            Ok(keys) => self.secrets = keys,
            Err(message) => {
                self.secrets.clear();
                if self.blocked.is_none() {
                    self.blocked = Some(Blocked { reason: BlockReason::SecretUnavailable, message });
                }
            }
        }
    }
}

/// Why the catalog could not be refreshed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("building the catalog failed: {0}")]
    Build(String),
}

/// An endpoint whose sendability changed when a catalog was installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub namespace: String,
    pub name: String,
    /// What blocked it before (`None`: nothing, or it did not exist).
    pub before: Option<Blocked>,
    /// What blocks it now (`None`: nothing).
    pub after: Option<Blocked>,
    /// It could not be sent to before (blocked or paused) and can be now: its waiting
    /// deliveries were given back to wait, and are due at once.
    pub sendable_again: bool,
}

impl EndpointEntry {
    /// Whether dispatch sends to it (as far as the catalog knows: a 410 or an open breaker
    /// is run-time state, parked in the store).
    fn sendable(&self) -> bool {
        !self.spec.paused && self.blocked.is_none()
    }
}

struct Shared {
    /// Where `valueFrom` sources may be read from.
    secrets: SecretsConfig,
    /// What CEL may be and cost.
    limits: Limits,
    /// The threads CEL is evaluated on (see [`CatalogHandle::evaluate`]).
    evaluators: Pool,
    current: RwLock<Arc<Catalog>>,
    /// Transitions not yet acted on (see [`follow::FollowResources`]).
    transitions: std::sync::Mutex<Vec<Transition>>,
    /// Signalled when `transitions` grew.
    transitioned: tokio::sync::Notify,
}

/// The catalog in force, shared by ingest, dispatch and the API; swapped whole. Every
/// swap records which endpoints became blocked or sendable, whoever made it, so that
/// acting on it (the log line, sending what waited) never depends on when anyone looked.
#[derive(Clone)]
pub struct CatalogHandle(Arc<Shared>);

impl CatalogHandle {
    /// An empty catalog that reads the secret sources `secrets` allows and compiles and
    /// evaluates CEL within `limits`, on evaluation threads of its own.
    pub fn new(secrets: SecretsConfig, limits: Limits) -> CatalogHandle {
        CatalogHandle(Arc::new(Shared {
            secrets,
            limits,
            // Below the async workers: a heavy expression waits for the CPU, requests do not.
            evaluators: Pool::start_with("cel", limits.thread_count(), Priority::Background),
            current: RwLock::default(),
            transitions: std::sync::Mutex::default(),
            transitioned: tokio::sync::Notify::new(),
        }))
    }

    /// Runs `work`, which evaluates CEL, on an evaluation thread: off the async workers,
    /// and at most `cel.threads` at once whoever asks.
    pub async fn evaluate<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, JobFailed> {
        self.0.evaluators.run(work).await
    }

    pub fn current(&self) -> Arc<Catalog> {
        self.0.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds from the store when the stored resources moved past the catalog's
    /// revision; returns whether it did. The decision counters of the AgentRules it loads
    /// exist (at 0) from then on.
    pub async fn refresh(&self, store: &Store) -> Result<bool, CatalogError> {
        // The revision first: the resources read after it are at least that new, so the
        // catalog is never labelled newer than what it holds.
        let revision = store.resource_revision().await?;
        if self.current().revision == Some(revision) {
            return Ok(false);
        }
        let resources = store.list_resources(None, None).await?;
        let shared = self.0.clone();
        let catalog = tokio::task::spawn_blocking(move || {
            Catalog::build(&resources, Some(revision), &shared.secrets, &shared.limits)
        })
        .await
        .map_err(|e| CatalogError::Build(e.to_string()))?;
        crate::telemetry::register_rules(catalog.rule_names());
        Ok(self.install(catalog))
    }

    /// Tries again to read the secrets that could not be read; installs a catalog with
    /// those now found and returns whether it did.
    pub async fn recheck_secrets(&self) -> Result<bool, CatalogError> {
        let current = self.current();
        let waiting =
            |e: &EndpointEntry| e.blocked.as_ref().is_some_and(|b| b.reason == BlockReason::SecretUnavailable);
        if !current.endpoints().any(|e| waiting(e)) {
            return Ok(false);
        }
        let shared = self.0.clone();
        let rechecked = tokio::task::spawn_blocking(move || {
            let mut changed = false;
            let mut by_namespace = HashMap::with_capacity(current.by_namespace.len());
            for (namespace, entries) in &current.by_namespace {
                let entries: Vec<Arc<EndpointEntry>> = entries
                    .iter()
                    .map(|entry| {
                        if !waiting(entry) {
                            return entry.clone();
                        }
                        let mut again = EndpointEntry { blocked: None, ..(**entry).clone() };
                        again.resolve_secrets(&shared.secrets);
                        changed |= again.blocked != entry.blocked;
                        Arc::new(again)
                    })
                    .collect();
                by_namespace.insert(namespace.clone(), entries);
            }
            changed.then(|| Catalog {
                by_namespace,
                policies: current.policies.clone(),
                event_types: current.event_types.clone(),
                namespaces: current.namespaces.clone(),
                revision: current.revision,
                budget: current.budget,
            })
        })
        .await
        .map_err(|e| CatalogError::Build(e.to_string()))?;
        Ok(rechecked.is_some_and(|catalog| self.install(catalog)))
    }

    /// Takes the transitions recorded since the last call.
    pub fn take_transitions(&self) -> Vec<Transition> {
        std::mem::take(&mut *self.0.transitions.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until a swap recorded a transition.
    pub async fn transitioned(&self) {
        self.0.transitioned.notified().await
    }

    /// Swaps `catalog` in unless one built from a newer revision is in force already, and
    /// records which endpoints' sendability it changes (blocked or not, paused or not).
    fn install(&self, catalog: Catalog) -> bool {
        let mut slot = self.0.current.write().unwrap_or_else(|p| p.into_inner());
        if slot.revision > catalog.revision {
            return false;
        }
        let transitions: Vec<Transition> = catalog
            .endpoints()
            .filter_map(|e| {
                let old = slot.endpoint(&e.namespace, &e.name);
                let before = old.as_ref().and_then(|old| old.blocked.clone());
                let sendable_again = old.is_some_and(|old| !old.sendable()) && e.sendable();
                (before != e.blocked || sendable_again).then(|| Transition {
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    before,
                    after: e.blocked.clone(),
                    sendable_again,
                })
            })
            .collect();
        *slot = Arc::new(catalog);
        drop(slot);
        if !transitions.is_empty() {
            self.0.transitions.lock().unwrap_or_else(|p| p.into_inner()).extend(transitions);
            self.0.transitioned.notify_one();
        }
        true
    }
}
