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
//! Leader-only jobs here (checkpoint signing and the key it publishes) act only during
//! this process's term and write fenced by it (see [`crate::controller::leadership`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiConfig, AppState};
use crate::auth::{load_or_create_key, TokenKeys};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::audit::checkpoint::{Checkpoint, CheckpointSigner};
use crate::catalog::CatalogHandle;
use crate::config::AuditConfig;
use crate::config::Config;
use crate::controller::leadership::{self, CampaignSettings, Leadership};
use crate::controller::Controller;
use crate::delivery::worker::{DispatchSettings, Dispatcher};
use crate::ingest::Ingestor;
use crate::private_files;
use crate::resources::validate::Checks;
use crate::store::{sqlite_file_of_url, DatabaseHealth, DatabaseLock, Store, Term};

/// File name of the embedded database inside the data directory.
pub const DATABASE_FILE: &str = "hookwarden.db";

pub struct Server {
    listener: TcpListener,
    state: AppState,
    tracker: TaskTracker,
    idempotency_key_ttl: Duration,
    controller: Controller,
    dispatch: DispatchSettings,
    wake: Arc<Notify>,
    signer: CheckpointSigner,
    audit: AuditConfig,
    campaign: CampaignSettings,
    /// Held while this server uses a SQLite file; `None` on PostgreSQL and in memory.
    lock: Option<DatabaseLock>,
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
        let ingestor = Ingestor::start(store.clone(), catalog.clone(), &config.ingest, &tracker, wake.clone());
        let checks =
            Checks { allow_private_urls: config.allow_private_urls, secrets: config.secrets.clone(), cel: config.cel };
        let status_changed = Arc::new(Notify::new());
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
                max_backlog: config.delivery.max_backlog,
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
            backlog: Arc::new(AtomicU64::new(0)),
            status_changed: status_changed.clone(),
        };
        Ok(Server {
            listener,
            state,
            tracker,
            idempotency_key_ttl: config.ingest.idempotency_key_ttl,
            controller,
            dispatch: DispatchSettings {
                delivery: config.delivery.clone(),
                allow_private: config.allow_private_urls,
                audited: config.audit.delivery_outcomes,
                status_changed,
            },
            wake,
            signer,
            audit: config.audit.clone(),
            campaign: CampaignSettings {
                retry: config.controller.leader_retry,
                check: config.controller.leader_check,
                attempt: config.database.acquire_timeout.max(config.controller.leader_check),
            },
            lock,
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
            controller,
            dispatch,
            wake,
            signer,
            audit,
            campaign,
            lock,
        } = self;
        let leadership = state.leadership.clone();
        tracker.spawn(leadership::campaign(store_of(&state), leadership.clone(), campaign, shutdown.clone()));
        tracker.spawn(crate::store::watch_health(store_of(&state), state.health.clone(), shutdown.clone()));
        tracker.spawn(controller.run(shutdown.clone()));
        tracker.spawn(sign_checkpoints(store_of(&state), signer, audit, leadership.clone(), shutdown.clone()));
        tracker.spawn(crate::catalog::follow::follow(
            store_of(&state),
            state.catalog.clone(),
            state.status_changed.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(sample_backlog(store_of(&state), state.catalog.clone(), state.backlog.clone(), shutdown.clone()));
        tracker.spawn(forward_notifications(
            store_of(&state),
            wake.clone(),
            state.status_changed.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(crate::approvals::expiry::expire_due_requests(
            store_of(&state),
            leadership,
            wake.clone(),
            shutdown.clone(),
        ));
        Dispatcher::start(store_of(&state), state.catalog.clone(), dispatch, wake, &tracker, shutdown.clone())?;
        let store = state.store.clone();
        let draining = state.shutdown.clone();
        tracker.spawn(forget_old_idempotency_keys(store.clone(), idempotency_key_ttl, shutdown.clone()));
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

/// Deletes idempotency keys older than `ttl`, a few times per `ttl`, until shutdown.
/// Harmless to run in every process: deleting what another process deleted does nothing.
async fn forget_old_idempotency_keys(store: Store, ttl: Duration, shutdown: CancellationToken) {
    let period = (ttl / 4).min(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let cutoff = chrono::Utc::now() - ttl;
        match store.delete_idempotency_keys_before(cutoff).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "forgot expired idempotency keys"),
            Err(e) => tracing::warn!(error = %e, "could not delete expired idempotency keys"),
        }
    }
}

fn store_of(state: &AppState) -> Store {
    state.store.clone()
}

/// Samples the delivery backlog once a second, for ingest's backpressure and the gauges
/// (queue depth and age, waiting deliveries by why they wait, deliveries by state, open
/// breakers and disabled endpoints apart, pending approvals).
async fn sample_backlog(store: Store, catalog: CatalogHandle, backlog: Arc<AtomicU64>, shutdown: CancellationToken) {
    loop {
        match store.waiting_by_endpoint().await {
            Ok(waiting) => {
                let now = chrono::Utc::now();
                let depth: i64 = waiting.iter().map(|w| w.2).sum();
                backlog.store(depth.max(0) as u64, Ordering::Relaxed);
                metrics::gauge!("hookwarden_delivery_queue_depth").set(depth as f64);
                let oldest = waiting.iter().map(|w| w.3).min();
                let age = oldest.map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
                metrics::gauge!("hookwarden_delivery_oldest_pending_seconds").set(age);
                let states = store.list_endpoint_states().await.unwrap_or_default();
                for (reason, count) in crate::catalog::waiting_by_reason(&catalog.current(), &waiting, &states, now) {
                    metrics::gauge!("hookwarden_delivery_waiting", "reason" => reason).set(count as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not sample the delivery backlog"),
        }
        if let Ok(counts) = store.delivery_counts().await {
            for state in crate::store::DeliveryState::ALL.into_iter().filter(|s| !s.is_final()) {
                let count = counts.iter().find(|(s, _)| s == state.as_str()).map(|(_, n)| *n).unwrap_or(0);
                metrics::gauge!("hookwarden_deliveries", "state" => state.as_str()).set(count as f64);
            }
        }
        if let Ok(blocked) = store.count_blocked_endpoints(chrono::Utc::now()).await {
            metrics::gauge!("hookwarden_delivery_breakers_open").set(blocked.breakers_open as f64);
            metrics::gauge!("hookwarden_delivery_endpoints_disabled").set(blocked.disabled as f64);
        }
        if let Ok(pending) = store.count_pending_approvals().await {
            metrics::gauge!("hookwarden_policy_approvals_pending").set(pending as f64);
        }
        crate::telemetry::metrics().run_upkeep();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// On PostgreSQL, wakes this process's workers when any process enqueued work, and its
/// status reconciler when any process changed resources or endpoint state.
async fn forward_notifications(
    store: Store,
    wake: Arc<Notify>,
    status_changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    use crate::store::Notice;
    loop {
        let mut listener = match store.listen_for_work().await {
            Ok(Some(listener)) => listener,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for notifications; workers poll meanwhile");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = listener.recv() => match received {
                    Ok(Notice::Work) => wake.notify_one(),
                    Ok(Notice::Status) => status_changed.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "notifications interrupted; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

/// Records the checkpoint key in the cluster-wide chain, once per key: reviewers learn
/// from the chain itself which keys signed its checkpoints, and since when. Fenced by
/// `term`.
async fn publish_key(store: &Store, signer: &CheckpointSigner, term: Term) -> Result<(), crate::store::StoreError> {
    use crate::audit::{NewAuditRecord, CLUSTER_CHAIN};
    const ACTION: &str = "audit.key_published";
    let key = signer.public_key();
    let records = store.audit_records(CLUSTER_CHAIN, 1, i64::MAX, u32::MAX).await?;
    if records.iter().any(|r| r.action == ACTION && r.data["public_key"] == key.as_str()) {
        return Ok(());
    }
    let record = NewAuditRecord::new(
        "system",
        ACTION,
        CLUSTER_CHAIN,
        format!("key/{}", signer.name),
        serde_json::json!({ "public_key": key }),
    );
    store.append_audit_as_leader(term, &[record]).await?;
    Leadership::wrote(term, "checkpoint key");
    tracing::info!(public_key = %key, "checkpoint key recorded in the _cluster audit chain");
    Ok(())
}

/// The leader signs a checkpoint of each chain every `checkpointEvery` records or
/// `checkpointInterval`, whichever comes first (when the chain grew at all), and publishes
/// each chain's length.
async fn sign_checkpoints(
    store: Store,
    signer: CheckpointSigner,
    config: AuditConfig,
    leadership: Leadership,
    shutdown: CancellationToken,
) {
    let mut last_signed: std::collections::HashMap<String, std::time::Instant> = std::collections::HashMap::new();
    let period = (config.checkpoint_interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut published = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let Some(term) = leadership.term() else { continue };
        if !published {
            match publish_key(&store, &signer, term).await {
                Ok(()) => published = true,
                Err(e) if leadership.fenced(term, &e) => continue,
                Err(e) => tracing::warn!(error = %e, "cannot record the checkpoint key in the audit chain"),
            }
        }
        let heads = match store.audit_heads().await {
            Ok(heads) => heads,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read audit chain heads");
                continue;
            }
        };
        for (chain, seq, hash) in heads {
            metrics::gauge!("hookwarden_audit_chain_length", "chain" => chain.clone()).set(seq as f64);
            let signed_seq = match store.latest_checkpoint(&chain).await {
                Ok(latest) => latest.map(|(s, _, _)| s).unwrap_or(0),
                Err(_) => continue,
            };
            let due = seq - signed_seq >= config.checkpoint_every
                || last_signed.get(&chain).is_none_or(|t| t.elapsed() >= config.checkpoint_interval);
            if seq <= signed_seq || !due {
                continue;
            }
            if !leadership.holds(term) {
                break;
            }
            let checkpoint = Checkpoint { origin: Checkpoint::origin_for(&chain), seq, hash: hash.clone() };
            match signer.sign(&checkpoint) {
                Ok(note) => match store.save_checkpoint(term, &chain, seq, &hash, &note).await {
                    Ok(()) => {
                        Leadership::wrote(term, "checkpoint");
                        last_signed.insert(chain, std::time::Instant::now());
                    }
                    Err(e) if leadership.fenced(term, &e) => break,
                    Err(e) => tracing::warn!(error = %e, "cannot save an audit checkpoint"),
                },
                Err(e) => tracing::error!(error = %e, chain = %chain, "cannot sign an audit checkpoint"),
            }
        }
    }
}
