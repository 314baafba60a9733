//! The resource controller: keeps a watched directory applied, and every resource's
//! `status` true to what is stored and to what the engine knows of each endpoint.
//!
//! Exactly one process leads (on PostgreSQL, whoever holds the advisory lock; on SQLite,
//! the only process; see [`leadership`]), and only during its term: every write it makes
//! here is fenced by that term. The leader reconciles on file events (debounced), at once
//! when any process signals a change (an apply, a delete, an enable, a breaker opening, a
//! 410, a secret appearing: see `status_changed`), when a reconcile asked to be requeued
//! (an open breaker closes), and on a periodic resync, since signals can be missed.
//! Reconciling is idempotent: it acts on current state only, and says what it needs next
//! ([`Action`]: requeue after a while, or wait for a change); a reconcile that failed gets
//! its next step from a separate error policy instead (retry soon, or stop leading after a
//! fenced write), as kube-runtime's controllers do. An invalid directory is
//! rejected as a whole; the last good state stays in force and the error shows in the
//! logs, in `/readyz` and in the resources' status.

pub mod apply;
pub mod leadership;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use self::apply::{apply, read_resource_files, ApplyError, ApplyOptions};
use self::leadership::Leadership;
use crate::catalog::event_types::event_type_warnings;
use crate::catalog::{CatalogHandle, Sendability};
use crate::config::ControllerConfig;
use crate::resources::validate::{self, Checks};
use crate::resources::{parse_files, Kind, Located, Metadata, Origin, Resource, ResourceKey, Spec};
use crate::store::{ApplyAction, Store, StoreError, StoredResource, Term};

/// What `/readyz` shows of the controller.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerStatus {
    /// Filled in from [`Leadership`] when shown.
    pub leader: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<DateTime<Utc>>,
    /// Why the directory's last change was rejected; `None` once it applies cleanly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Shared between the controller task and the API.
pub type SharedStatus = Arc<Mutex<ControllerStatus>>;

pub struct Controller {
    store: Store,
    config: ControllerConfig,
    checks: Checks,
    status: SharedStatus,
    catalog: CatalogHandle,
    /// Signalled when resources or endpoint state changed: status is due now.
    status_changed: Arc<Notify>,
    leadership: Leadership,
}

/// What a reconcile asks for next, besides the periodic resync (kube-runtime's `Action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reconcile again after this long (something changes by itself then: a breaker closes).
    Requeue(Duration),
    /// Nothing changes by itself: wait for a signal or the resync.
    AwaitChange,
}

impl Controller {
    pub fn new(
        store: Store,
        config: ControllerConfig,
        checks: Checks,
        catalog: CatalogHandle,
        status_changed: Arc<Notify>,
        leadership: Leadership,
    ) -> (Controller, SharedStatus) {
        let status = Arc::new(Mutex::new(ControllerStatus {
            resources_dir: config.resources_dir.as_ref().map(|d| d.display().to_string()),
            ..ControllerStatus::default()
        }));
        (Controller { store, config, checks, status: status.clone(), catalog, status_changed, leadership }, status)
    }

    fn update(&self, f: impl FnOnce(&mut ControllerStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut status);
    }

    /// Leads whenever this process holds a term (see [`leadership::campaign`]), until
    /// `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let term = tokio::select! {
                _ = shutdown.cancelled() => return,
                term = self.leadership.acquired() => term,
            };
            tracing::info!(epoch = term.epoch(), "running the resource controller");
            self.lead(term, &shutdown).await;
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Reconciles until `term` ends (or `shutdown`).
    async fn lead(&self, term: Term, shutdown: &CancellationToken) {
        let (changes, mut changed) = mpsc::channel::<()>(1);
        // Keep the watcher alive for as long as we lead.
        let _watcher = self.config.resources_dir.as_ref().and_then(|dir| match watch(dir, changes) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::error!(error = %e, dir = %dir.display(), "cannot watch the resources directory; relying on resync");
                None
            }
        });
        let mut next = self.act_on(term, self.reconcile(term).await);
        let mut resync = tokio::time::interval(self.config.resync);
        resync.tick().await;
        loop {
            let requeue = match next {
                Action::Requeue(after) => after,
                Action::AwaitChange => self.config.resync,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.leadership.ended(term) => break,
                Some(()) = changed.recv() => {
                    // Let a burst of writes (an editor's save, a git checkout) settle.
                    while let Ok(Some(())) = tokio::time::timeout(self.config.debounce, changed.recv()).await {}
                    next = self.act_on(term, self.reconcile(term).await);
                }
                _ = self.status_changed.notified() => next = self.act_on(term, self.reconcile_status(term).await),
                _ = tokio::time::sleep(requeue) => next = self.act_on(term, self.reconcile_status(term).await),
                _ = resync.tick() => next = self.act_on(term, self.reconcile(term).await),
            }
        }
    }

    /// One pass: apply the directory (if any), then bring every status up to date. A
    /// rejected directory is not an error here: it shows in the status (`Synced`) and the
    /// last good state stays in force.
    pub async fn reconcile(&self, term: Term) -> Result<Action, StoreError> {
        if let Some(dir) = &self.config.resources_dir {
            self.sync_directory(dir, term).await;
        }
        self.reconcile_status(term).await
    }

    /// What to do after a reconcile: its own answer, or the error policy's.
    fn act_on(&self, term: Term, reconciled: Result<Action, StoreError>) -> Action {
        reconciled.unwrap_or_else(|e| self.error_policy(term, &e))
    }

    /// The error policy (kube-runtime's `error_policy`): after a write that found the term
    /// over, wait (the term ends, and with it this leader's loop); after any other failure,
    /// try again soon rather than at the next resync.
    fn error_policy(&self, term: Term, error: &StoreError) -> Action {
        if self.leadership.fenced(term, error) {
            return Action::AwaitChange;
        }
        tracing::warn!(error = %error, "could not reconcile resource status; retrying");
        Action::Requeue(RETRY_AFTER_ERROR)
    }

    /// Applies the directory with prune; returns the error that rejected it, if any.
    async fn sync_directory(&self, dir: &std::path::Path, term: Term) -> Option<String> {
        if !self.leadership.holds(term) {
            return None;
        }
        let result = async {
            let files = read_resource_files(dir).map_err(|e| Some(format!("cannot read {}: {e}", dir.display())))?;
            let parsed = parse_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())));
            let options = ApplyOptions {
                applyset: Some(self.config.applyset.clone()),
                prune: true,
                // The operator's directory: its set reaches every namespace.
                namespaces: None,
                dry_run: false,
                checks: self.checks.clone(),
                actor: "system".to_owned(),
                leader: Some(term),
            };
            apply(&self.store, parsed, &options).await.map_err(|e| match e {
                ApplyError::Store(e) if self.leadership.fenced(term, &e) => None,
                e => Some(describe(&e)),
            })
        }
        .await;
        match result {
            // The term is over: not this process's business any more.
            Err(None) => None,
            Ok(outcomes) => {
                if outcomes.iter().any(|o| o.action != ApplyAction::Unchanged) {
                    Leadership::wrote(term, "directory");
                }
                for o in outcomes.iter().filter(|o| o.action != ApplyAction::Unchanged) {
                    tracing::info!(resource = %o.key, action = ?o.action, generation = o.generation, "resource applied from directory");
                }
                self.update(|s| {
                    s.last_sync = Some(Utc::now());
                    s.last_error = None;
                });
                None
            }
            Err(Some(message)) => {
                let changed = self.status.lock().map(|s| s.last_error.as_deref() != Some(&message)).unwrap_or(true);
                if changed {
                    tracing::error!(dir = %dir.display(), error = %message, "resources directory rejected; the last good state stays in force");
                }
                self.update(|s| s.last_error = Some(message.clone()));
                Some(message)
            }
        }
    }

    /// Writes `status` (observedGeneration, conditions, an endpoint's delivery state, the
    /// directory's last sync result) on every resource where it changed; asks to be
    /// requeued when an open breaker closes.
    async fn reconcile_status(&self, term: Term) -> Result<Action, StoreError> {
        let sync_error = self.status.lock().ok().and_then(|s| s.last_error.clone());
        let sync_error = sync_error.as_deref();
        let stored = self.store.list_resources(None, None).await?;
        let states = self.store.list_endpoint_states().await?;
        let catalog = self.catalog.current();
        let now = Utc::now();
        let keys: HashSet<ResourceKey> = stored.iter().map(|s| s.key.clone()).collect();
        let mut warnings = event_type_warnings(stored.iter().map(|s| (&s.key, &s.spec)));
        let mut next = Action::AwaitChange;
        for resource in &stored {
            let mut status = json!({ "observedGeneration": resource.generation });
            let mut conditions = vec![ready_condition(resource, &keys, &self.checks)];
            if resource.key.kind == Kind::Endpoint {
                let (namespace, name) = (&resource.key.namespace, &resource.key.name);
                let entry = catalog.endpoint(namespace, name);
                let state = states.iter().find(|(n, e, _)| n == namespace && e == name).map(|s| &s.2);
                let blocked = entry.as_ref().and_then(|e| e.blocked.as_ref());
                if let (Some(blocked), true) = (blocked, conditions[0]["status"] == "True") {
                    conditions[0] = condition("Ready", false, blocked.reason.as_str(), &blocked.message);
                }
                let endpoint = endpoint_status(entry.as_deref(), state, now);
                conditions.push(endpoint.condition);
                status["delivery"] = endpoint.delivery;
                if let Some(closes) = endpoint.breaker_closes_in {
                    next = earlier(next, Action::Requeue(closes));
                }
            }
            if self.config.resources_dir.is_some()
                && resource.applyset.as_deref() == Some(self.config.applyset.as_str())
            {
                conditions.push(match sync_error {
                    None => condition("Synced", true, "Applied", "in step with the resources directory"),
                    Some(message) => condition("Synced", false, "InvalidChange", message),
                });
            }
            status["conditions"] = json!(conditions);
            if let Some(warnings) = warnings.remove(&resource.key) {
                status["warnings"] = json!(warnings);
            }
            if !same_status(resource.status.as_ref(), &status) {
                if !self.leadership.holds(term) {
                    return Ok(Action::AwaitChange);
                }
                let status = stamp(resource.status.as_ref(), status);
                self.store.update_resource_status(term, &resource.key, resource.generation, &status).await?;
                Leadership::wrote(term, "status");
            }
        }
        Ok(next)
    }
}

/// How soon a failed status reconcile is tried again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

fn earlier(a: Action, b: Action) -> Action {
    match (a, b) {
        (Action::Requeue(x), Action::Requeue(y)) => Action::Requeue(x.min(y)),
        (Action::AwaitChange, other) | (other, Action::AwaitChange) => other,
    }
}

/// An endpoint's `Delivering` condition and `status.delivery`.
struct EndpointStatus {
    condition: Value,
    delivery: Value,
    /// How soon its open breaker closes (its status changes by itself then).
    breaker_closes_in: Option<Duration>,
}

fn endpoint_status(
    entry: Option<&crate::catalog::EndpointEntry>,
    state: Option<&crate::store::EndpointState>,
    now: DateTime<Utc>,
) -> EndpointStatus {
    let sendability = Sendability::of(entry, state, now);
    let open_until = state.and_then(|s| s.breaker_open_until);
    let breaker = match open_until {
        Some(until) if until > now => "Open",
        Some(_) => "HalfOpen",
        None => "Closed",
    };
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let message = match sendability {
        Sendability::Active => "deliveries go out".to_owned(),
        Sendability::Disabled => format!(
            "disabled: {}; changing its spec or `hookwarden endpoints enable` sends what waits",
            state.and_then(|s| s.disabled_reason.as_deref()).unwrap_or("the receiver answered 410 Gone")
        ),
        Sendability::Paused => "paused: deliveries wait until the pause is lifted".to_owned(),
        Sendability::Blocked(_) => {
            let why = entry.and_then(|e| e.blocked.as_ref()).map(|b| b.message.as_str()).unwrap_or("blocked");
            format!("{why}; deliveries wait without using attempts")
        }
        Sendability::BreakerOpen => format!(
            "the breaker is open until {}; deliveries wait without using attempts",
            open_until.map(at).unwrap_or_default()
        ),
        Sendability::Deleted => "not in the catalog yet".to_owned(),
    };
    let mut delivery = json!({ "state": sendability.as_str(), "breaker": breaker });
    if let Some(until) = open_until.filter(|until| *until > now) {
        delivery["breakerOpenUntil"] = json!(at(until));
    }
    if let Some(reason) = state.and_then(|s| s.disabled_reason.as_ref()) {
        delivery["disabledReason"] = json!(reason);
    }
    EndpointStatus {
        condition: condition("Delivering", sendability == Sendability::Active, sendability.as_str(), &message),
        delivery,
        breaker_closes_in: open_until
            .filter(|until| *until > now)
            .and_then(|until| (until - now).to_std().ok())
            .map(|d| d + Duration::from_millis(50)),
    }
}

fn describe(e: &ApplyError) -> String {
    match e {
        ApplyError::Invalid(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        ApplyError::Usage(m) => m.clone(),
        ApplyError::Store(e) => format!("database error: {e}"),
        e @ ApplyError::Validation(_) => e.to_string(),
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str) -> Value {
    json!({ "type": kind, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message })
}

/// Ready when the stored spec still validates against what is stored now (references
/// may have been deleted since it was applied).
fn ready_condition(resource: &StoredResource, keys: &HashSet<ResourceKey>, checks: &Checks) -> Value {
    let spec = match Spec::from_json(resource.key.kind, resource.spec.clone()) {
        Ok(spec) => spec,
        // In plain words, which never repeat a value (it may be a secret).
        Err(e) => {
            let message = format!("stored spec cannot be read: {}", crate::messages::plain(&e.to_string()));
            return condition("Ready", false, "Unreadable", &message);
        }
    };
    let located = Located {
        origin: Origin { file: "(stored)".into(), document: 0 },
        resource: Resource {
            metadata: Metadata {
                name: resource.key.name.clone(),
                namespace: resource.key.namespace.clone(),
                labels: resource.labels.clone(),
                annotations: resource.annotations.clone(),
                generation: None,
                applyset: None,
                created_at: None,
                updated_at: None,
            },
            spec,
        },
    };
    let errors = validate::validate(std::slice::from_ref(&located), keys, checks);
    if errors.is_empty() {
        condition("Ready", true, "Valid", "applied and valid")
    } else {
        let reason =
            if errors.iter().any(|e| e.message.contains("not found")) { "ReferenceNotFound" } else { "Invalid" };
        let message = errors.iter().map(|e| format!("{}: {}", e.path, e.message)).collect::<Vec<_>>().join("; ");
        condition("Ready", false, reason, &message)
    }
}

/// Compares statuses ignoring `lastTransitionTime`.
fn same_status(old: Option<&Value>, new: &Value) -> bool {
    let Some(old) = old else { return false };
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(conditions) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in conditions {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(old) == *new
}

/// Adds `lastTransitionTime` to each condition: kept from `old` when the condition's
/// status did not change, now otherwise.
fn stamp(old: Option<&Value>, mut new: Value) -> Value {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let previous = |kind: &Value| -> Option<Value> {
        old?.get("conditions")?.as_array()?.iter().find(|c| c.get("type") == Some(kind)).cloned()
    };
    if let Some(conditions) = new.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conditions {
            let kept = previous(&c["type"])
                .filter(|p| p.get("status") == c.get("status"))
                .and_then(|p| p.get("lastTransitionTime").cloned());
            c["lastTransitionTime"] = kept.unwrap_or_else(|| Value::String(now.clone()));
        }
    }
    new
}

/// Signals `changes` whenever something under `dir` changes.
fn watch(dir: &std::path::Path, changes: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already holds a pending signal; one is enough.
            let _ = changes.try_send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_times_are_kept_while_a_condition_holds() {
        let old = json!({"observedGeneration": 1, "conditions": [
            {"type": "Ready", "status": "True", "reason": "Valid", "message": "ok", "lastTransitionTime": "2020-01-01T00:00:00Z"}]});
        let same = json!({"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True", "reason": "Valid", "message": "ok"}]});
        assert!(same_status(Some(&old), &same));
        let flipped = json!({"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "False", "reason": "Invalid", "message": "x"}]});
        assert!(!same_status(Some(&old), &flipped));
        let stamped = stamp(
            Some(&old),
            json!({"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True", "reason": "Valid", "message": "ok"}]}),
        );
        assert_eq!(stamped["conditions"][0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
        let stamped = stamp(Some(&old), flipped);
        assert_ne!(stamped["conditions"][0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
    }
}
