//! Service configuration: defaults → optional YAML file → `HOOKWARDEN_*` environment → CLI
//! flags, then [`Config::validate`], which fails fast on values that cannot work.
//!
//! Every default lives in [`Config::default`] and is documented in the README's
//! "Configuration" table; nothing else in the crate invents one.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::policy::expr::Limits as CelLimits;
pub use crate::resources::namespace::NamespaceDefaults;
pub use crate::resources::secret_sources::SecretsConfig;

/// A secret value whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. **Warning**: never log or return what this gives.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// How log lines are written to standard error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Everything `hookwarden serve` needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address the HTTP API binds to.
    pub listen: SocketAddr,
    /// `postgres://…` or `sqlite://…`; `None` means the embedded SQLite file in `data_dir`.
    pub database_url: Option<Secret>,
    /// Where the embedded database and the generated signing key live.
    pub data_dir: PathBuf,
    /// HS256 key for bearer tokens; generated into `data_dir` on the embedded default.
    pub jwt_secret: Option<Secret>,
    pub log_format: LogFormat,
    pub ingest: IngestConfig,
    pub database: DatabaseConfig,
    /// Accept endpoint URLs on loopback, private and link-local addresses.
    pub allow_private_urls: bool,
    pub controller: ControllerConfig,
    pub delivery: DeliveryConfig,
    pub audit: AuditConfig,
    pub auth: AuthConfig,
    /// Ed25519 seed (base64) of the checkpoint key; generated into the data dir when unset.
    pub audit_key: Option<Secret>,
    /// Which `valueFrom` secret sources each namespace may name.
    pub secrets: SecretsConfig,
    /// Bounds on `POST /v1/apply` and the resource YAML it reads.
    pub apply: crate::resources::ApplyLimits,
    /// What CEL expressions may be, and what one evaluation may cost.
    pub cel: CelLimits,
    pub operational_events: OperationalEventsConfig,
    pub console: ConsoleConfig,
    /// Retention and the dedup window of namespaces their Namespace leaves them to.
    pub namespace_defaults: NamespaceDefaults,
    pub retention: RetentionConfig,
    /// "Now" for the ingest quotas: the system clock; tests set a
    /// [`crate::clock::ManualClock`].
    pub clock: crate::clock::Clock,
}

/// The resource controller: the watched directory, status reconciliation, leadership.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ControllerConfig {
    /// A directory of resource files kept applied (with prune) by the leader.
    pub resources_dir: Option<PathBuf>,
    /// The apply set the directory's resources belong to.
    pub applyset: String,
    /// How often the leader re-reads the directory and reconciles status, whatever the
    /// file watcher said (watch events can be missed).
    #[serde(with = "crate::duration::text")]
    pub resync: Duration,
    /// How long file changes must settle before the directory is applied.
    #[serde(with = "crate::duration::text")]
    pub debounce: Duration,
    /// How often a follower tries to take over leadership.
    #[serde(with = "crate::duration::text")]
    pub leader_retry: Duration,
    /// How often the leader checks its lock's connection; a check that fails, or takes
    /// longer than this, ends its term at once.
    #[serde(with = "crate::duration::text")]
    pub leader_check: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resources_dir: None,
            applyset: "resources-dir".to_owned(),
            resync: Duration::from_secs(30),
            debounce: Duration::from_millis(300),
            leader_retry: Duration::from_secs(5),
            leader_check: Duration::from_secs(1),
        }
    }
}

/// The leader's retention job (see [`crate::retention`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RetentionConfig {
    /// How often the leader deletes what is past retention.
    #[serde(with = "crate::duration::text")]
    pub period: Duration,
    /// Rows of each table one batch deletes per scope (one short transaction each).
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { period: Duration::from_secs(60), batch_size: 500 }
    }
}

/// Connections to PostgreSQL.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DatabaseConfig {
    /// The longest a request waits for a connection (connecting included) before it is
    /// answered `503`: while the server is away, requests fail fast instead of hanging.
    #[serde(with = "crate::duration::text")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { acquire_timeout: Duration::from_secs(2) }
    }
}

/// Bearer-token checks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuthConfig {
    /// How long after its `exp` a token is still accepted, for clocks that drift apart.
    /// Whole seconds (JWT times are), at most [`AuthConfig::MAX_JWT_LEEWAY`].
    #[serde(with = "crate::duration::text")]
    pub jwt_leeway: Duration,
}

impl AuthConfig {
    /// A longer leeway would keep expired tokens working for longer than clock drift
    /// explains.
    pub const MAX_JWT_LEEWAY: Duration = Duration::from_secs(300);
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { jwt_leeway: Duration::from_secs(5) }
    }
}

/// The audit chain's signed checkpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AuditConfig {
    /// Sign a checkpoint once a chain grew by this many records…
    pub checkpoint_every: i64,
    /// …or this long after the last one, if it grew at all.
    #[serde(with = "crate::duration::text")]
    pub checkpoint_interval: Duration,
    /// The key's name in signed notes.
    pub key_name: String,
    /// Which deliveries' final outcomes are recorded in the chain.
    pub delivery_outcomes: AuditedOutcomes,
}

/// Whose final delivery outcomes the audit chain records. Policy decisions, approvals,
/// replays, endpoint disables and resource changes are recorded either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuditedOutcomes {
    /// Every delivery's (the default).
    #[default]
    All,
    /// Only agent endpoints' deliveries: plain webhooks keep their outcome on the delivery
    /// and its attempts, outside the chain.
    Agents,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            key_name: "hookwarden".to_owned(),
            delivery_outcomes: AuditedOutcomes::All,
        }
    }
}

/// The delivery engine.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DeliveryConfig {
    /// Claim loops per process.
    pub workers: usize,
    /// Most deliveries one claim takes.
    pub batch_size: u32,
    /// Most attempts in flight per process.
    pub max_in_flight: usize,
    /// Most attempts in flight per endpoint per process.
    pub per_endpoint_concurrency: usize,
    /// Added to the longest endpoint timeout to make a claim's lease.
    #[serde(with = "crate::duration::text")]
    pub lease_margin: Duration,
    /// How often idle workers look for due work when nothing woke them.
    #[serde(with = "crate::duration::text")]
    pub poll_interval: Duration,
    /// How long attempts in flight may finish after SIGTERM.
    #[serde(with = "crate::duration::text")]
    pub shutdown_grace: Duration,
    /// Deliveries waiting above which ingest answers 503.
    pub max_backlog: u64,
    /// Bytes of each response body kept with the attempt.
    pub response_bytes: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_size: 100,
            max_in_flight: 512,
            per_endpoint_concurrency: 32,
            lease_margin: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(10),
            max_backlog: 1_000_000,
            response_bytes: 1024,
        }
    }
}

/// Where people open what Hookwarden tells them of.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConsoleConfig {
    /// The base URL (`https://…`) of a console where approvers open a request: the
    /// `link` of `hookwarden.approval.requested` is this and `/approvals/<id>`.
    pub public_url: Option<String>,
}

/// Operational events (`hookwarden.*`, see `docs/operational-events.md`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OperationalEventsConfig {
    /// `hookwarden.endpoint.failing` is emitted when an endpoint's consecutive failures
    /// reach this share of its breaker's threshold (rounded up, at least 1; not emitted
    /// when that is the threshold itself: `breaker_opened` tells it). Above 0, at most 1.
    pub failing_share: f64,
    /// How often each process looks for operational events to fan out when nothing
    /// signalled one (its own transitions signal at once).
    #[serde(with = "crate::duration::text")]
    pub fan_out_interval: Duration,
    /// `hookwarden.dead_letters.threshold` is emitted when this many of an endpoint's
    /// deliveries ended dead within `deadLetterWindow` (once per crossing).
    pub dead_letters: u32,
    #[serde(with = "crate::duration::text")]
    pub dead_letter_window: Duration,
    /// `hookwarden.approval.expiring` is emitted this long before a pending approval
    /// request's deadline (at once for a request opened closer to it than that).
    #[serde(with = "crate::duration::text")]
    pub approval_expiring_before: Duration,
}

impl Default for OperationalEventsConfig {
    fn default() -> Self {
        Self {
            failing_share: 0.5,
            fan_out_interval: Duration::from_millis(500),
            dead_letters: 10,
            dead_letter_window: Duration::from_secs(3600),
            approval_expiring_before: Duration::from_secs(15 * 60),
        }
    }
}

/// Limits and batching of `POST /v1/events`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct IngestConfig {
    /// Largest accepted request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Most events in one `POST /v1/events/batch`.
    pub max_batch_items: usize,
    /// Requests waiting for a commit before ingest answers 503 with `Retry-After`.
    pub queue_capacity: usize,
    /// Most events written by one group commit.
    pub max_commit_events: usize,
    /// Concurrent group-commit writers (0 = 1 on SQLite, 2 on PostgreSQL).
    pub writers: usize,
    /// How long an `Idempotency-Key` is remembered (e.g. `24h`).
    #[serde(with = "crate::duration::text")]
    pub idempotency_key_ttl: Duration,
    /// The longest a request waits for its events to commit (its wait in the queue
    /// included) before it is answered `503`; a commit that takes longer is abandoned.
    #[serde(with = "crate::duration::text")]
    pub commit_timeout: Duration,
    /// Deepest nesting of arrays and objects in one event, the event itself at depth 1.
    pub max_json_depth: usize,
    /// What happens to an event whose type has no EventType in its namespace.
    pub unknown_event_types: UnknownEventTypes,
    /// `unknownEventTypes` of particular namespaces, over the one above.
    pub unknown_event_types_by_namespace: std::collections::BTreeMap<String, UnknownEventTypes>,
}

/// `ingest.unknownEventTypes`, the same setting a Namespace's `unknownEventTypes` gives.
pub use crate::resources::kinds::UnknownEventTypes;

impl IngestConfig {
    /// What `namespace` does with event types it has no EventType for.
    pub fn unknown_event_types_in(&self, namespace: &str) -> UnknownEventTypes {
        self.unknown_event_types_by_namespace.get(namespace).copied().unwrap_or(self.unknown_event_types)
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 256 * 1024,
            max_batch_items: 1000,
            queue_capacity: 10_000,
            max_commit_events: 1000,
            writers: 0,
            idempotency_key_ttl: Duration::from_secs(24 * 3600),
            commit_timeout: Duration::from_millis(2500),
            max_json_depth: 64,
            unknown_event_types: UnknownEventTypes::Accept,
            unknown_event_types_by_namespace: std::collections::BTreeMap::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: None,
            data_dir: PathBuf::from(".hookwarden"),
            jwt_secret: None,
            log_format: LogFormat::Human,
            ingest: IngestConfig::default(),
            database: DatabaseConfig::default(),
            allow_private_urls: false,
            controller: ControllerConfig::default(),
            delivery: DeliveryConfig::default(),
            audit: AuditConfig::default(),
            auth: AuthConfig::default(),
            audit_key: None,
            secrets: SecretsConfig::default(),
            apply: crate::resources::ApplyLimits::default(),
            cel: CelLimits::default(),
            operational_events: OperationalEventsConfig::default(),
            console: ConsoleConfig::default(),
            namespace_defaults: NamespaceDefaults::default(),
            retention: RetentionConfig::default(),
            clock: crate::clock::Clock::system(),
        }
    }
}

/// The optional config file (`--config FILE`); every field may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub database_url: Option<Secret>,
    pub data_dir: Option<PathBuf>,
    pub jwt_secret: Option<Secret>,
    pub log_format: Option<LogFormat>,
    pub ingest: Option<IngestConfig>,
    pub database: Option<DatabaseConfig>,
    pub allow_private_urls: Option<bool>,
    pub controller: Option<ControllerConfig>,
    pub delivery: Option<DeliveryConfig>,
    pub audit: Option<AuditConfig>,
    pub auth: Option<AuthConfig>,
    pub secrets: Option<SecretsConfig>,
    pub apply: Option<crate::resources::ApplyLimits>,
    pub cel: Option<CelLimits>,
    pub operational_events: Option<OperationalEventsConfig>,
    pub console: Option<ConsoleConfig>,
    pub namespace_defaults: Option<NamespaceDefaults>,
    pub retention: Option<RetentionConfig>,
}

/// Values taken from the environment or the command line; set ones win over the file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub database_url: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub jwt_secret: Option<String>,
    pub log_format: Option<LogFormat>,
    pub max_body_bytes: Option<usize>,
    pub allow_private_urls: Option<bool>,
    pub resources_dir: Option<PathBuf>,
    pub applyset: Option<String>,
    pub audit_key: Option<String>,
    pub jwt_leeway: Option<Duration>,
    pub secrets_file_root: Option<PathBuf>,
    pub secrets_env_prefix: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Layers the optional file and the overrides on the defaults, then validates.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = file {
            config.apply_file(read_file_config(path)?);
        }
        config.apply_overrides(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply_file(&mut self, file: FileConfig) {
        let FileConfig {
            listen,
            database_url,
            data_dir,
            jwt_secret,
            log_format,
            ingest,
            database,
            allow_private_urls,
            controller,
            delivery,
            audit,
            auth,
            secrets,
            apply,
            cel,
            operational_events,
            console,
            namespace_defaults,
            retention,
        } = file;
        if let Some(v) = operational_events {
            self.operational_events = v;
        }
        if let Some(v) = console {
            self.console = v;
        }
        if let Some(v) = namespace_defaults {
            self.namespace_defaults = v;
        }
        if let Some(v) = retention {
            self.retention = v;
        }
        if let Some(v) = cel {
            self.cel = v;
        }
        if let Some(v) = secrets {
            self.secrets = v;
        }
        if let Some(v) = apply {
            self.apply = v;
        }
        if let Some(v) = auth {
            self.auth = v;
        }
        if let Some(v) = database {
            self.database = v;
        }
        if let Some(v) = audit {
            self.audit = v;
        }
        if let Some(v) = delivery {
            self.delivery = v;
        }
        if let Some(v) = allow_private_urls {
            self.allow_private_urls = v;
        }
        if let Some(v) = controller {
            self.controller = v;
        }
        if let Some(v) = listen {
            self.listen = v;
        }
        if database_url.is_some() {
            self.database_url = database_url;
        }
        if let Some(v) = data_dir {
            self.data_dir = v;
        }
        if jwt_secret.is_some() {
            self.jwt_secret = jwt_secret;
        }
        if let Some(v) = log_format {
            self.log_format = v;
        }
        if let Some(v) = ingest {
            self.ingest = v;
        }
    }

    fn apply_overrides(&mut self, o: Overrides) {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.database_url.filter(|v| !v.is_empty()) {
            self.database_url = Some(Secret::new(v));
        }
        if let Some(v) = o.data_dir {
            self.data_dir = v;
        }
        if let Some(v) = o.jwt_secret.filter(|v| !v.is_empty()) {
            self.jwt_secret = Some(Secret::new(v));
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        if let Some(v) = o.max_body_bytes {
            self.ingest.max_body_bytes = v;
        }
        if let Some(v) = o.allow_private_urls {
            self.allow_private_urls = v;
        }
        if let Some(v) = o.resources_dir {
            self.controller.resources_dir = Some(v);
        }
        if let Some(v) = o.applyset {
            self.controller.applyset = v;
        }
        if let Some(v) = o.audit_key.filter(|v| !v.is_empty()) {
            self.audit_key = Some(Secret::new(v));
        }
        if let Some(v) = o.jwt_leeway {
            self.auth.jwt_leeway = v;
        }
        if let Some(v) = o.secrets_file_root {
            self.secrets.file_root = Some(v);
        }
        if let Some(v) = o.secrets_env_prefix {
            self.secrets.env_prefix = v;
        }
    }

    /// Refuses settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if let Some((path, message)) = self.namespace_defaults.problems().into_iter().next() {
            return Err(ConfigError::Invalid(format!("namespaceDefaults.{path} {message}")));
        }
        if self.retention.period < Duration::from_millis(100) {
            return invalid("retention.period must be at least 100ms");
        }
        if !(1..=10_000).contains(&self.retention.batch_size) {
            return invalid("retention.batchSize must be between 1 and 10000");
        }
        let i = &self.ingest;
        if i.max_body_bytes < 1024 {
            return invalid("ingest.maxBodyBytes must be at least 1024");
        }
        if i.max_batch_items == 0 {
            return invalid("ingest.maxBatchItems must be at least 1");
        }
        if i.queue_capacity == 0 {
            return invalid("ingest.queueCapacity must be at least 1");
        }
        if i.max_commit_events < i.max_batch_items {
            return invalid(
                "ingest.maxCommitEvents must be at least ingest.maxBatchItems, or a full batch could never commit",
            );
        }
        if i.idempotency_key_ttl < Duration::from_secs(60) {
            return invalid("ingest.idempotencyKeyTtl must be at least 1m");
        }
        if i.writers > 64 {
            return invalid("ingest.writers must be at most 64");
        }
        if i.commit_timeout < Duration::from_millis(100) || self.database.acquire_timeout < Duration::from_millis(100) {
            return invalid("ingest.commitTimeout and database.acquireTimeout must be at least 100ms");
        }
        if !(2..=100).contains(&i.max_json_depth) {
            return invalid("ingest.maxJsonDepth must be from 2 (an event with an object in it) to 100");
        }
        if let Some(bad) =
            i.unknown_event_types_by_namespace.keys().find(|n| !crate::resources::validate::is_dns_label(n))
        {
            return Err(ConfigError::Invalid(format!(
                "ingest.unknownEventTypesByNamespace: `{bad}` is not a namespace (a DNS label)"
            )));
        }
        self.apply.validate().map_err(ConfigError::Invalid)?;
        self.cel.validate().map_err(ConfigError::Invalid)?;
        if self.audit.checkpoint_every < 1 || self.audit.checkpoint_interval < Duration::from_millis(100) {
            return invalid("audit.checkpointEvery must be at least 1 and audit.checkpointInterval at least 100ms");
        }
        if self.audit.key_name.is_empty()
            || self.audit.key_name.contains(char::is_whitespace)
            || self.audit.key_name.contains('+')
        {
            return invalid("audit.keyName must be non-empty, without spaces or '+'");
        }
        let leeway = self.auth.jwt_leeway;
        if leeway > AuthConfig::MAX_JWT_LEEWAY || leeway.subsec_nanos() != 0 {
            return invalid("auth.jwtLeeway (HOOKWARDEN_JWT_LEEWAY) must be whole seconds, at most 5m: a longer one keeps expired tokens working");
        }
        let d = &self.delivery;
        if d.workers == 0 || d.batch_size == 0 || d.max_in_flight == 0 || d.per_endpoint_concurrency == 0 {
            return invalid("delivery.workers, delivery.batchSize, delivery.maxInFlight and delivery.perEndpointConcurrency must be at least 1");
        }
        if d.lease_margin < Duration::from_millis(100) {
            return invalid("delivery.leaseMargin must be at least 100ms: a lease shorter than an attempt would let two workers send the same delivery");
        }
        if d.poll_interval.is_zero() {
            return invalid("delivery.pollInterval must be above 0");
        }
        let o = &self.operational_events;
        if !(o.failing_share > 0.0 && o.failing_share <= 1.0) {
            return invalid("operationalEvents.failingShare must be above 0 and at most 1");
        }
        if o.fan_out_interval < Duration::from_millis(10) {
            return invalid("operationalEvents.fanOutInterval must be at least 10ms");
        }
        if o.dead_letters == 0
            || o.dead_letter_window.is_zero()
            || o.dead_letter_window > Duration::from_secs(7 * 86_400)
        {
            return invalid("operationalEvents.deadLetters must be at least 1 and operationalEvents.deadLetterWindow above 0, at most 7d");
        }
        if let Some(url) = &self.console.public_url {
            let parsed = reqwest::Url::parse(url).ok().filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.query().is_none()
                    && u.fragment().is_none()
            });
            if parsed.is_none() || url.len() > 2048 {
                return invalid(
                    "console.publicUrl must be an http(s) URL without a query or fragment, at most 2048 bytes",
                );
            }
        }
        let c = &self.controller;
        if c.applyset.is_empty() || c.applyset.len() > 253 {
            return invalid("controller.applyset must be 1 to 253 characters");
        }
        if c.resync < Duration::from_millis(100)
            || c.debounce.is_zero()
            || c.leader_retry < Duration::from_millis(50)
            || c.leader_check < Duration::from_millis(50)
        {
            return invalid("controller.resync must be at least 100ms, controller.debounce above 0, controller.leaderRetry and controller.leaderCheck at least 50ms");
        }
        self.secrets.validate().map_err(ConfigError::Invalid)?;
        if let Some(dir) = &c.resources_dir {
            if !dir.is_dir() {
                return Err(ConfigError::Invalid(format!("the resources directory {} does not exist", dir.display())));
            }
        }
        if let Some(url) = &self.database_url {
            let url = url.expose();
            let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
            if !postgres && !url.starts_with("sqlite:") {
                return invalid("DATABASE_URL must start with postgres://, postgresql:// or sqlite:");
            }
            if postgres && self.jwt_secret.is_none() {
                return invalid(
                    "HOOKWARDEN_JWT_SECRET must be set when running on PostgreSQL, so that every process accepts the same tokens",
                );
            }
        }
        if let Some(secret) = &self.jwt_secret {
            if secret.expose().len() < 32 {
                return invalid("HOOKWARDEN_JWT_SECRET must be at least 32 bytes long");
            }
        }
        Ok(())
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_file_config(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })
}

/// Parses the config file's text; errors name the field path and the line, in plain
/// words (see [`crate::messages`]).
fn parse_file_config(text: &str) -> Result<FileConfig, String> {
    serde_path_to_error::deserialize(yaml_serde::Deserializer::from_str(text)).map_err(crate::messages::yaml_error)
}

#[cfg(test)]
mod tests;
