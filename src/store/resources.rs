//! Stored resources: atomic apply (with dry run and prune), reads, deletes, status.
//!
//! Each statement is written once and runs on either backend (see [`super::sql`]).
//!
//! Invariants: one apply is one transaction (all of it lands or none); `generation` is
//! bumped only when `spec` changes; prune deletes only rows of the named apply set that
//! the apply did not name, in the namespaces the set reaches (an apply set is a name
//! within a namespace). A stored spec is read in this build's canonical form, so a
//! change in how a value is written (a duration an older build wrote as `1day`) is never
//! a change of `spec`.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::sql::{sql, Tx};
use super::{audit, endpoint_state, leadership, queue, Store, StoreError, Term};
use crate::audit::NewAuditRecord;
use crate::resources::{Kind, ResourceKey, Spec};

/// A resource as the apply wants it.
#[derive(Clone, Debug)]
pub struct DesiredResource {
    pub key: ResourceKey,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub spec: Value,
}

/// A resource as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResource {
    pub key: ResourceKey,
    pub uid: String,
    pub generation: i64,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub spec: Value,
    pub applyset: Option<String>,
    pub status: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
    Pruned,
}

/// What one apply did (or, in a dry run, would do) to one resource.
#[derive(Clone, Debug)]
pub struct ApplyOutcome {
    pub key: ResourceKey,
    pub action: ApplyAction,
    /// The generation after the apply (before it, for a pruned resource).
    pub generation: i64,
    /// The stored resource before the apply, if there was one.
    pub previous: Option<StoredResource>,
    /// An Endpoint disabled by a 410 whose spec this apply changed: enabled again, its
    /// waiting deliveries due now.
    pub reenabled: bool,
}

/// One atomic apply.
#[derive(Clone, Debug, Default)]
pub struct ApplyRequest {
    pub resources: Vec<DesiredResource>,
    /// The apply set the resources join.
    pub applyset: Option<String>,
    /// Delete members of `applyset` that `resources` does not name, in the namespaces the
    /// set reaches (`namespaces`).
    pub prune: bool,
    /// The namespaces `applyset` reaches, `None` for every one. An apply set is a name
    /// within a namespace: a tenant's `prod` and another tenant's `prod` are two sets, and
    /// an apply (a prune above all) made with a token limited to some namespaces sees and
    /// touches its set's members only there.
    pub namespaces: Option<Vec<String>>,
    /// Decide everything, write nothing.
    pub dry_run: bool,
    /// Who applies (the token subject, or `system` for the directory controller).
    pub actor: String,
    /// Set by the leader (the directory controller): the apply is refused once its term is
    /// over. `None` for applies any process may make.
    pub leader: Option<Term>,
}

/// The audit chain a change of the resource at `key` is recorded in: its namespace's, and
/// for a Namespace (cluster-scoped) the chain of the namespace it governs, so that the
/// namespace's auditors see its limits change.
fn audit_chain(key: &ResourceKey) -> &str {
    if key.kind.is_cluster_scoped() {
        &key.name
    } else {
        &key.namespace
    }
}

/// Whether an apply set limited to `namespaces` (`None`: every one) reaches `namespace`.
pub fn set_reaches(namespaces: Option<&[String]>, namespace: &str) -> bool {
    namespaces.is_none_or(|list| list.iter().any(|n| n == namespace))
}

/// The columns of a [`ResourceRow`].
const RESOURCE_COLUMNS: &str =
    "kind, namespace, name, uid, generation, labels, annotations, spec, applyset, status, created_at, updated_at";

/// One resource by key: `$1` kind, `$2` namespace, `$3` name.
static SELECT_BY_KEY: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = $1 AND namespace = $2 AND name = $3")
});

#[derive(sqlx::FromRow)]
struct ResourceRow {
    kind: String,
    namespace: String,
    name: String,
    uid: String,
    generation: i64,
    labels: String,
    annotations: String,
    spec: String,
    applyset: Option<String>,
    status: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("resource {what}: {e}"))
}

impl TryFrom<ResourceRow> for StoredResource {
    type Error = StoreError;

    fn try_from(row: ResourceRow) -> Result<Self, StoreError> {
        let kind = Kind::parse(&row.kind).ok_or_else(|| corrupt("kind", &row.kind))?;
        Ok(StoredResource {
            key: ResourceKey { kind, namespace: row.namespace, name: row.name },
            uid: row.uid,
            generation: row.generation,
            labels: serde_json::from_str(&row.labels).map_err(|e| corrupt("labels", e))?,
            annotations: serde_json::from_str(&row.annotations).map_err(|e| corrupt("annotations", e))?,
            // Compared and shown in this build's form, whoever wrote it (see `canonical_json`).
            spec: Spec::canonical_json(kind, serde_json::from_str(&row.spec).map_err(|e| corrupt("spec", e))?),
            applyset: row.applyset,
            status: row.status.as_deref().map(serde_json::from_str).transpose().map_err(|e| corrupt("status", e))?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data always serializes")
}

/// What the apply decides for one desired resource, given what is stored.
fn decide(desired: &DesiredResource, stored: Option<&StoredResource>, applyset: Option<&str>) -> (ApplyAction, i64) {
    match stored {
        None => (ApplyAction::Created, 1),
        Some(s) if s.spec != desired.spec => (ApplyAction::Configured, s.generation + 1),
        Some(s) if s.labels != desired.labels || s.annotations != desired.annotations || adopts(s, applyset) => {
            (ApplyAction::Configured, s.generation)
        }
        Some(s) => (ApplyAction::Unchanged, s.generation),
    }
}

/// Whether applying with `applyset` makes it the owner: only of a resource no set owns.
/// (A resource owned by another set is refused before the store is asked.)
fn adopts(stored: &StoredResource, applyset: Option<&str>) -> bool {
    stored.applyset.is_none() && applyset.is_some()
}

/// Whether applying `desired` over `stored` lifts an Endpoint's pause.
fn resumes(stored: &StoredResource, desired: &DesiredResource) -> bool {
    let paused = |spec: &Value| spec.get("paused") == Some(&Value::Bool(true));
    stored.key.kind == Kind::Endpoint && paused(&stored.spec) && !paused(&desired.spec)
}

impl Store {
    /// Applies resources atomically; see [`ApplyRequest`] (its `leader` fences the apply).
    pub async fn apply_resources(&self, request: &ApplyRequest) -> Result<Vec<ApplyOutcome>, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            if let Some(term) = request.leader {
                leadership::hold_term_in(&mut tx, term).await?;
            }
            let mut outcomes = apply_in(&mut tx, request).await?;
            if request.prune {
                outcomes.extend(prune_in(&mut tx, request).await?);
            }
            if request.dry_run {
                tx.rollback().await?;
                return Ok(outcomes);
            }
            let records = apply_records(request, &outcomes);
            if !records.is_empty() {
                bump_resource_revision_in(&mut tx).await?;
                audit::append_in(&mut tx, &records).await?;
            }
            tx.commit().await?;
            Ok(outcomes)
        })
        .await
    }

    /// The revision of the resources in force; every apply, prune or delete that changed
    /// anything moves it.
    pub async fn resource_revision(&self) -> Result<i64, StoreError> {
        self.observed(sql("SELECT revision FROM resource_revision WHERE id = 1").scalar(self.reader())).await
    }

    pub async fn get_resource(&self, key: &ResourceKey) -> Result<Option<StoredResource>, StoreError> {
        self.observed(async {
            let row: Option<ResourceRow> = by_key(key).fetch_optional(self.reader()).await?;
            row.map(StoredResource::try_from).transpose()
        })
        .await
    }

    /// Resources ordered by kind, namespace and name; `None` filters match everything.
    pub async fn list_resources(
        &self,
        kind: Option<Kind>,
        namespace: Option<&str>,
    ) -> Result<Vec<StoredResource>, StoreError> {
        static LIST: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT {RESOURCE_COLUMNS} FROM resources WHERE ($1 IS NULL OR kind = $1) \
                 AND ($2 IS NULL OR namespace = $2) ORDER BY kind, namespace, name"
            )
        });
        self.observed(async {
            // NULL parameters match everything.
            let list = sql(&LIST).bind(kind.map(|k| k.as_str())).bind(namespace);
            let rows: Vec<ResourceRow> = list.fetch_all(self.reader()).await?;
            rows.into_iter().map(StoredResource::try_from).collect()
        })
        .await
    }

    /// Deletes a resource (audited as `actor`); returns what was deleted.
    pub async fn delete_resource(&self, key: &ResourceKey, actor: &str) -> Result<Option<StoredResource>, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let row: Option<ResourceRow> = by_key(key).fetch_optional(&mut tx).await?;
            let Some(row) = row else { return Ok(None) };
            sql("DELETE FROM resources WHERE kind = $1 AND namespace = $2 AND name = $3")
                .bind(key.kind.as_str())
                .bind(&key.namespace)
                .bind(&key.name)
                .execute(&mut tx)
                .await?;
            let deleted = StoredResource::try_from(row)?;
            let record = NewAuditRecord::new(
                actor,
                "resource.deleted",
                audit_chain(key),
                key.to_string(),
                serde_json::json!({"kind": key.kind.as_str(), "name": key.name, "generation": deleted.generation}),
            );
            bump_resource_revision_in(&mut tx).await?;
            audit::append_in(&mut tx, &[record]).await?;
            tx.commit().await?;
            Ok(Some(deleted))
        })
        .await
    }

    /// Writes a resource's status if its generation is still `generation`; a leader-only
    /// write, refused ([`StoreError::Fenced`]) once `term` is over.
    pub async fn update_resource_status(
        &self,
        term: Term,
        key: &ResourceKey,
        generation: i64,
        status: &Value,
    ) -> Result<bool, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            leadership::hold_term_in(&mut tx, term).await?;
            let updated = sql(
                "UPDATE resources SET status = $1 WHERE kind = $2 AND namespace = $3 AND name = $4 AND generation = $5",
            )
            .bind(json_text(status))
            .bind(key.kind.as_str())
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(generation)
            .execute(&mut tx)
            .await?;
            tx.commit().await?;
            Ok(updated == 1)
        })
        .await
    }
}

/// The statement reading the resource `key`.
fn by_key(key: &ResourceKey) -> super::sql::Statement<'_> {
    sql(&SELECT_BY_KEY).bind(key.kind.as_str()).bind(&key.namespace).bind(&key.name)
}

/// Writes each desired resource as [`decide`] says; returns what it did to each.
async fn apply_in(tx: &mut Tx, request: &ApplyRequest) -> Result<Vec<ApplyOutcome>, StoreError> {
    let now = Utc::now();
    let applyset = request.applyset.as_deref();
    let mut outcomes = Vec::with_capacity(request.resources.len());
    for desired in &request.resources {
        let key = &desired.key;
        let row: Option<ResourceRow> = by_key(key).fetch_optional(&mut *tx).await?;
        let previous = row.map(StoredResource::try_from).transpose()?;
        let (action, generation) = decide(desired, previous.as_ref(), applyset);
        match action {
            ApplyAction::Created => {
                sql("INSERT INTO resources (kind, namespace, name, uid, generation, labels, annotations, spec, applyset, \
                     status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, $10, $10)")
                .bind(key.kind.as_str())
                .bind(&key.namespace)
                .bind(&key.name)
                .bind(ulid::Ulid::new().to_string().to_lowercase())
                .bind(generation)
                .bind(json_text(&desired.labels))
                .bind(json_text(&desired.annotations))
                .bind(json_text(&desired.spec))
                .bind(applyset)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            ApplyAction::Configured => {
                sql("UPDATE resources SET generation = $1, labels = $2, annotations = $3, spec = $4, \
                     applyset = COALESCE(applyset, $5), updated_at = $6 WHERE kind = $7 AND namespace = $8 AND name = $9")
                .bind(generation)
                .bind(json_text(&desired.labels))
                .bind(json_text(&desired.annotations))
                .bind(json_text(&desired.spec))
                .bind(applyset)
                .bind(now)
                .bind(key.kind.as_str())
                .bind(&key.namespace)
                .bind(&key.name)
                .execute(&mut *tx)
                .await?;
                if previous.as_ref().is_some_and(|p| resumes(p, desired)) {
                    // Deliveries a paused endpoint kept waiting go out now.
                    queue::resume_in(tx, &key.namespace, &key.name, now).await?;
                }
            }
            ApplyAction::Unchanged | ApplyAction::Pruned => {}
        }
        let reenabled = action == ApplyAction::Configured
            && key.kind == Kind::Endpoint
            && previous.as_ref().is_some_and(|p| p.generation < generation)
            && endpoint_state::enable_in(tx, &key.namespace, &key.name, Some(generation), now).await?;
        outcomes.push(ApplyOutcome { key: key.clone(), action, generation, previous, reenabled });
    }
    Ok(outcomes)
}

/// Deletes the members of the request's apply set that it does not name, where the set
/// reaches; returns them.
async fn prune_in(tx: &mut Tx, request: &ApplyRequest) -> Result<Vec<ApplyOutcome>, StoreError> {
    static MEMBERS: LazyLock<String> = LazyLock::new(|| {
        format!("SELECT {RESOURCE_COLUMNS} FROM resources WHERE applyset = $1 ORDER BY kind, namespace, name")
    });
    let Some(set) = request.applyset.as_deref() else { return Ok(Vec::new()) };
    let rows: Vec<ResourceRow> = sql(&MEMBERS).bind(set).fetch_all(&mut *tx).await?;
    let mut pruned = Vec::new();
    for row in rows {
        let stored = StoredResource::try_from(row)?;
        let reached = set_reaches(request.namespaces.as_deref(), &stored.key.namespace);
        if !reached || request.resources.iter().any(|d| d.key == stored.key) {
            continue;
        }
        sql("DELETE FROM resources WHERE kind = $1 AND namespace = $2 AND name = $3 AND applyset = $4")
            .bind(stored.key.kind.as_str())
            .bind(&stored.key.namespace)
            .bind(&stored.key.name)
            .bind(set)
            .execute(&mut *tx)
            .await?;
        pruned.push(ApplyOutcome {
            key: stored.key.clone(),
            action: ApplyAction::Pruned,
            generation: stored.generation,
            previous: Some(stored),
            reenabled: false,
        });
    }
    Ok(pruned)
}

/// The audit records of an apply: one per resource it changed, and one per endpoint it
/// enabled again.
fn apply_records(request: &ApplyRequest, outcomes: &[ApplyOutcome]) -> Vec<NewAuditRecord> {
    let actor = if request.actor.is_empty() { "system" } else { &request.actor };
    let mut records: Vec<NewAuditRecord> = outcomes
        .iter()
        .filter(|o| o.action != ApplyAction::Unchanged)
        .map(|o| {
            let action = match o.action {
                ApplyAction::Created => "resource.created",
                ApplyAction::Configured => "resource.configured",
                _ => "resource.pruned",
            };
            NewAuditRecord::new(
                actor,
                action,
                audit_chain(&o.key),
                o.key.to_string(),
                serde_json::json!({"kind": o.key.kind.as_str(), "name": o.key.name, "generation": o.generation,
                    "applyset": request.applyset}),
            )
        })
        .collect();
    records.extend(outcomes.iter().filter(|o| o.reenabled).map(|o| {
        NewAuditRecord::new(
            actor,
            "endpoint.enabled",
            &o.key.namespace,
            o.key.to_string(),
            serde_json::json!({"reason": "its spec changed since it was disabled", "generation": o.generation}),
        )
    }));
    records
}

/// Marks a change of the resources in force (see the `resource_revision` table).
async fn bump_resource_revision_in(tx: &mut Tx) -> Result<(), StoreError> {
    sql("UPDATE resource_revision SET revision = revision + 1 WHERE id = 1").execute(tx).await?;
    Ok(())
}
