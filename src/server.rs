//! Start-up and shutdown of `hookwarden serve`.
//!
//! [`Server::start`] does everything that can fail before traffic is accepted (lock the
//! SQLite database file, open and migrate the database, load or create the token key,
//! bind the port), so a test can learn the bound address before the first request and a
//! misconfiguration fails at once. A server on a SQLite file holds that file's lock until
//! [`Server::run`] has closed the database (or the process dies): one server per file.
//! [`Server::run`] serves until the cancellation token fires, then drains: in-flight
//! requests finish, the ingest queue is committed, connections close.
//!
//! Wiring only: [`Server::run`] starts the leadership campaign, the controller, the
//! periodic jobs (each in the module that owns it, all run by [`crate::jobs`]; the
//! leader-only ones act during this process's term only, fenced by it), the notices from
//! other processes, dispatch, and the HTTP API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::sync::Notify;

use crate::api::{self, ApiConfig, AppState};
use crate::approvals::expiry::ExpireDueRequests;
use crate::audit::checkpoint::CheckpointSigner;
use crate::audit::checkpoints::SignCheckpoints;
use crate::auth::{load_or_create_key, TokenKeys};
use crate::catalog::follow::FollowResources;
use crate::catalog::CatalogHandle;
use crate::config::{AuditConfig, Config};
use crate::controller::leadership::{self, CampaignSettings, Leadership};
use crate::controller::Controller;
use crate::delivery::dispatch::{DispatchSettings, Dispatcher};
use crate::ingest::keys::ForgetOldKeys;
use crate::ingest::outbox::FanOutOutbox;
use crate::ingest::{IngestSettings, Ingestor};
use crate::jobs::Jobs;
use crate::private_files;
use crate::resources::validate::Checks;
use crate::retention::EnforceRetention;
use crate::store::{sqlite_file_of_url, DatabaseHealth, DatabaseLock, DeadLetterAlert, ProbeDatabase, Store};
use crate::telemetry::backlog::{Backlog, SampleBacklog};

/// File name of the embedded database inside the data directory.
pub const DATABASE_FILE: &str = "hookwarden.db";

pub struct Server {
    listener: TcpListener,
    state: AppState,
    tracker: TaskTracker,
    idempotency_key_ttl: Duration,
    namespace_defaults: crate::config::NamespaceDefaults,
    retention: crate::config::RetentionConfig,
    controller: Controller,
    dispatch: DispatchSettings,
    wake: Arc<Notify>,
    signer: CheckpointSigner,
    audit: AuditConfig,
    campaign: CampaignSettings,
    backlog: Backlog,
    /// Held while this server uses a SQLite file; `None` on PostgreSQL and in memory.
    lock: Option<DatabaseLock>,
    /// How often the outbox of operational events is looked at, and its signal.
    fan_out_interval: Duration,
    outbox: Arc<Notify>,
    /// `operationalEvents.approvalExpiringBefore`.
    expiring_before: Duration,
}

/// Takes the lock of the SQLite database file the server will open, before anything opens
/// it: a second `serve` on the same file stops here. PostgreSQL takes many processes.
pub fn lock_database_file(config: &Config) -> anyhow::Result<Option<DatabaseLock>> {
    let file = match &config.database_url {
        None => {
            private_files::create_dir(&config.data_dir)
                .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
            config.data_dir.join(DATABASE_FILE)
        }
        Some(url) if url.expose().starts_with("sqlite:") => match sqlite_file_of_url(url.expose())? {
            Some(file) => file,
            None => return Ok(None),
        },
        Some(_) => return Ok(None),
    };
    let file = std::path::absolute(&file).unwrap_or(file);
    let lock = DatabaseLock::acquire(&file)?;
    // Before SQLite opens it: the files it makes beside the database take its mode.
    private_files::secure_database(&file)
        .with_context(|| format!("cannot make the database file {} private", file.display()))?;
    Ok(Some(lock))
}

/// Opens the configured database: `DATABASE_URL`, or the embedded SQLite file.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = match &config.database_url {
        Some(url) => Store::connect_with(url.expose(), config.database.acquire_timeout)
            .await
            .context("cannot connect to DATABASE_URL")?,
        None => {
            private_files::create_dir(&config.data_dir)
                .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
            let path = config.data_dir.join(DATABASE_FILE);
            let store = Store::open_sqlite_file(&path)
                .await
                .with_context(|| format!("cannot open SQLite database {}", path.display()))?;
            let shown = std::fs::canonicalize(&path).unwrap_or(path);
            tracing::info!(path = %shown.display(), "using the embedded SQLite database");
            store
        }
    };
    Ok(store)
}

/// Name of the generated checkpoint key file inside the data directory.
pub const AUDIT_KEY_FILE: &str = "audit-ed25519.key";

/// The checkpoint signer: `HOOKWARDEN_AUDIT_KEY` (base64 Ed25519 seed), or a key generated
/// once into the data directory.
pub fn audit_signer(config: &Config) -> anyhow::Result<CheckpointSigner> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let decode = |text: &str| -> anyhow::Result<[u8; 32]> {
        let bytes = b64.decode(text.trim()).context("the audit key is not base64")?;
        bytes.try_into().map_err(|_| anyhow::anyhow!("the audit key must be 32 bytes (an Ed25519 seed)"))
    };
    if let Some(secret) = &config.audit_key {
        return Ok(CheckpointSigner::new(&config.audit.key_name, decode(secret.expose())?));
    }
    let path = config.data_dir.join(AUDIT_KEY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        private_files::tighten(&path).with_context(|| format!("cannot make {} private", path.display()))?;
        return Ok(CheckpointSigner::new(&config.audit.key_name, decode(&text)?));
    }
    private_files::create_dir(&config.data_dir)?;
    let (signer, seed) = CheckpointSigner::generate(&config.audit.key_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            std::io::Write::write_all(&mut file, b64.encode(seed).as_bytes())?;
            file.sync_all()?;
            Ok(signer)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(CheckpointSigner::new(&config.audit.key_name, decode(&std::fs::read_to_string(&path)?)?))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// The HS256 key: configured, or generated once into the data directory; with the
/// configured leeway. For `serve` only: `hookwarden token` never generates a key.
pub fn token_keys(config: &Config) -> anyhow::Result<TokenKeys> {
    if let Some(secret) = &config.jwt_secret {
        return Ok(TokenKeys::new(secret).with_leeway(config.auth.jwt_leeway));
    }
    let (secret, path) = load_or_create_key(&config.data_dir)?;
    tracing::debug!(path = %path.display(), "token key");
    Ok(TokenKeys::new(&secret).with_leeway(config.auth.jwt_leeway))
}

impl Server {
    /// Opens and migrates the database, prepares the keys and binds the listener.
    pub async fn start(config: &Config) -> anyhow::Result<Server> {
        crate::telemetry::metrics();
        let lock = lock_database_file(config)?;
        let store = open_store(config).await?;
        store.migrate().await.context("database migration failed")?;
        let health = DatabaseHealth::default();
        // `/readyz` answers from the first probe on; a failed one is logged and retried.
        let _ = health.probe(&store).await;
        let keys = token_keys(config)?;
        let signer = audit_signer(config)?;
        private_files::warn_if_open(&config.data_dir);
        tracing::info!(public_key = %signer.public_key(), "audit checkpoints are signed with this key");
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        let tracker = TaskTracker::new();
        let wake = Arc::new(Notify::new());
        let catalog = CatalogHandle::new(config.secrets.clone(), config.cel);
        catalog.refresh(&store).await.context("cannot load the resources")?;
        let backlog = Backlog::default();
        let ingest = IngestSettings {
            config: &config.ingest,
            max_backlog: config.delivery.max_backlog,
            backlog: backlog.clone(),
            wake: wake.clone(),
            namespace_defaults: config.namespace_defaults.clone(),
            clock: config.clock.clone(),
        };
        let ingestor = Ingestor::start(store.clone(), catalog.clone(), ingest, &tracker);
        let checks = Checks {
            allow_private_urls: config.allow_private_urls,
            secrets: config.secrets.clone(),
            cel: config.cel,
            namespace_defaults: config.namespace_defaults.clone(),
        };
        let status_changed = Arc::new(Notify::new());
        let outbox = Arc::new(Notify::new());
        let leadership = Leadership::default();
        let (controller, controller_status) = Controller::new(
            store.clone(),
            config.controller.clone(),
            checks.clone(),
            catalog.clone(),
            status_changed.clone(),
            leadership.clone(),
        );
        let state = AppState {
            store,
            ingestor,
            keys,
            config: Arc::new(ApiConfig {
                max_body_bytes: config.ingest.max_body_bytes,
                max_batch_items: config.ingest.max_batch_items,
                max_json_depth: config.ingest.max_json_depth,
                apply: config.apply.clone(),
            }),
            reading: crate::threads::Pool::start("reader", crate::threads::half_the_cores()),
            shutdown: CancellationToken::new(),
            checks,
            controller: controller_status,
            leadership,
            health,
            catalog,
            wake: wake.clone(),
            audit_public_key: Arc::new(signer.public_key()),
            status_changed: status_changed.clone(),
        };
        Ok(Server {
            listener,
            state,
            tracker,
            idempotency_key_ttl: config.ingest.idempotency_key_ttl,
            namespace_defaults: config.namespace_defaults.clone(),
            retention: config.retention.clone(),
            controller,
            dispatch: DispatchSettings {
                delivery: config.delivery.clone(),
                allow_private: config.allow_private_urls,
                audited: config.audit.delivery_outcomes,
                status_changed,
                failing_share: config.operational_events.failing_share,
                outbox: outbox.clone(),
                console: config.console.public_url.clone(),
                dead_letters: DeadLetterAlert {
                    count: config.operational_events.dead_letters,
                    window: config.operational_events.dead_letter_window,
                },
            },
            wake,
            signer,
            audit: config.audit.clone(),
            campaign: CampaignSettings {
                retry: config.controller.leader_retry,
                check: config.controller.leader_check,
                attempt: config.database.acquire_timeout.max(config.controller.leader_check),
            },
            backlog,
            lock,
            fan_out_interval: config.operational_events.fan_out_interval,
            outbox,
            expiring_before: config.operational_events.approval_expiring_before,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Serves until `shutdown` is cancelled, then drains and closes the database.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            listener,
            state,
            tracker,
            idempotency_key_ttl,
            namespace_defaults,
            retention,
            controller,
            dispatch,
            wake,
            signer,
            audit,
            campaign,
            backlog,
            lock,
            fan_out_interval,
            outbox,
            expiring_before,
        } = self;
        let store = state.store.clone();
        let leadership = state.leadership.clone();
        tracker.spawn(leadership::campaign(store.clone(), leadership.clone(), campaign, shutdown.clone()));
        tracker.spawn(controller.run(shutdown.clone()));
        let jobs = Jobs::new(&tracker, leadership.clone(), shutdown.clone());
        jobs.spawn(ProbeDatabase { store: store.clone(), health: state.health.clone() });
        jobs.spawn(SignCheckpoints::new(store.clone(), signer, audit, leadership));
        jobs.spawn(FollowResources {
            store: store.clone(),
            catalog: state.catalog.clone(),
            status_changed: state.status_changed.clone(),
            wake: wake.clone(),
        });
        jobs.spawn(SampleBacklog { store: store.clone(), catalog: state.catalog.clone(), backlog });
        jobs.spawn(ExpireDueRequests { store: store.clone(), wake: wake.clone(), expiring_before });
        jobs.spawn(ForgetOldKeys {
            store: store.clone(),
            ttl: idempotency_key_ttl,
            catalog: state.catalog.clone(),
            defaults: namespace_defaults.clone(),
        });
        jobs.spawn(FanOutOutbox {
            store: store.clone(),
            catalog: state.catalog.clone(),
            wake: wake.clone(),
            signal: outbox,
            period: fan_out_interval,
            unreadable: Default::default(),
        });
        jobs.spawn(EnforceRetention {
            store: store.clone(),
            catalog: state.catalog.clone(),
            defaults: namespace_defaults,
            config: retention,
        });
        tracker.spawn(crate::store::forward_notices(
            store.clone(),
            wake.clone(),
            state.status_changed.clone(),
            shutdown.clone(),
        ));
        Dispatcher::start(store.clone(), state.catalog.clone(), dispatch, wake, &tracker, shutdown.clone())?;
        let draining = state.shutdown.clone();
        let app = api::router(state);
        tracing::info!(addr = %listener.local_addr()?, database = ?store.backend(), "hookwarden is listening");
        let signal = shutdown.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                signal.cancelled().await;
                draining.cancel();
                tracing::info!("shutting down: finishing in-flight requests");
            })
            .await
            .context("HTTP server failed")?;
        // The router (and with it every ingest handle) is gone: the writers drain and stop.
        tracker.close();
        tracker.wait().await;
        store.close().await;
        // Only now may another server open the file.
        drop(lock);
        tracing::info!("stopped");
        Ok(())
    }
}
