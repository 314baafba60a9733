//! Stored resources: atomic apply (with dry run and prune), reads, deletes, status.
//!
//! The SQL is written once with `?` placeholders and expanded for each backend by
//! [`resource_methods!`]; PostgreSQL's `$n` placeholders are produced by [`numbered`].
//!
//! Invariants: one apply is one transaction (all of it lands or none); `generation` is
//! bumped only when `spec` changes; prune deletes only rows of the named apply set that
//! the apply did not name, in the namespaces the set reaches (an apply set is a name
//! within a namespace). A stored spec is read in this build's canonical form, so a
//! change in how a value is written (a duration an older build wrote as `1day`) is never
//! a change of `spec`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::StoreError;
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
    pub leader: Option<super::Term>,
}

/// Whether an apply set limited to `namespaces` (`None`: every one) reaches `namespace`.
pub fn set_reaches(namespaces: Option<&[String]>, namespace: &str) -> bool {
    namespaces.is_none_or(|list| list.iter().any(|n| n == namespace))
}

#[derive(sqlx::FromRow)]
pub(super) struct ResourceRow {
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

/// `?` placeholders as PostgreSQL's `$1, $2, …`.
pub(super) fn numbered(sql: &str) -> Cow<'static, str> {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

pub(super) fn unchanged(sql: &str) -> Cow<'static, str> {
    Cow::Owned(sql.to_owned())
}

pub(super) fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data always serializes")
}

/// What the apply decides for one desired resource, given what is stored.
pub(super) fn decide(
    desired: &DesiredResource,
    stored: Option<&StoredResource>,
    applyset: Option<&str>,
) -> (ApplyAction, i64) {
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
pub(super) fn resumes(stored: &StoredResource, desired: &DesiredResource) -> bool {
    let paused = |spec: &Value| spec.get("paused") == Some(&Value::Bool(true));
    stored.key.kind == Kind::Endpoint && paused(&stored.spec) && !paused(&desired.spec)
}

/// Expands the resource methods for one backend.
macro_rules! resource_methods {
    ($store:ty, $sql:path) => {
        impl $store {
            pub(super) async fn apply_resources(
                &self,
                request: &$crate::store::resources::ApplyRequest,
            ) -> Result<Vec<$crate::store::resources::ApplyOutcome>, $crate::store::StoreError> {
                use $crate::store::resources::{decide, json_text, ApplyAction, ApplyOutcome, ResourceRow, StoredResource};
                let now = chrono::Utc::now();
                let applyset = request.applyset.as_deref();
                let mut tx = self.begin_write().await?;
                if let Some(term) = request.leader {
                    Self::hold_term_in(&mut tx, term).await?;
                }
                let mut outcomes = Vec::with_capacity(request.resources.len());
                for desired in &request.resources {
                    let key = &desired.key;
                    let row: Option<ResourceRow> = sqlx::query_as(&$sql(concat!(
                        "SELECT kind, namespace, name, uid, generation, labels, annotations, spec, applyset, status, created_at, updated_at ",
                        "FROM resources WHERE kind = ? AND namespace = ? AND name = ?"
                    )))
                    .bind(key.kind.as_str())
                    .bind(&key.namespace)
                    .bind(&key.name)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let previous = row.map(StoredResource::try_from).transpose()?;
                    let (action, generation) = decide(desired, previous.as_ref(), applyset);
                    match action {
                        ApplyAction::Created => {
                            sqlx::query(&$sql(
                                "INSERT INTO resources (kind, namespace, name, uid, generation, labels, annotations, spec, applyset, status, created_at, updated_at) \
                                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                            ))
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
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        }
                        ApplyAction::Configured => {
                            sqlx::query(&$sql(
                                "UPDATE resources SET generation = ?, labels = ?, annotations = ?, spec = ?, applyset = COALESCE(applyset, ?), \
                                 updated_at = ? WHERE kind = ? AND namespace = ? AND name = ?",
                            ))
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
                            if previous.as_ref().is_some_and(|p| $crate::store::resources::resumes(p, desired)) {
                                // Deliveries a paused endpoint kept waiting go out now.
                                Self::resume_in(&mut tx, &key.namespace, &key.name, now).await?;
                            }
                        }
                        ApplyAction::Unchanged | ApplyAction::Pruned => {}
                    }
                    let reenabled = action == ApplyAction::Configured
                        && key.kind == $crate::resources::Kind::Endpoint
                        && previous.as_ref().is_some_and(|p| p.generation < generation)
                        && Self::enable_in(&mut tx, &key.namespace, &key.name, Some(generation), now).await?;
                    outcomes.push(ApplyOutcome { key: key.clone(), action, generation, previous, reenabled });
                }
                if let (true, Some(set)) = (request.prune, applyset) {
                    let rows: Vec<ResourceRow> = sqlx::query_as(&$sql(concat!(
                        "SELECT kind, namespace, name, uid, generation, labels, annotations, spec, applyset, status, created_at, updated_at ",
                        "FROM resources WHERE applyset = ? ORDER BY kind, namespace, name"
                    )))
                    .bind(set)
                    .fetch_all(&mut *tx)
                    .await?;
                    for row in rows {
                        let stored = StoredResource::try_from(row)?;
                        let reached = $crate::store::resources::set_reaches(request.namespaces.as_deref(), &stored.key.namespace);
                        if !reached || request.resources.iter().any(|d| d.key == stored.key) {
                            continue;
                        }
                        sqlx::query(&$sql("DELETE FROM resources WHERE kind = ? AND namespace = ? AND name = ? AND applyset = ?"))
                            .bind(stored.key.kind.as_str())
                            .bind(&stored.key.namespace)
                            .bind(&stored.key.name)
                            .bind(set)
                            .execute(&mut *tx)
                            .await?;
                        outcomes.push(ApplyOutcome {
                            key: stored.key.clone(),
                            action: ApplyAction::Pruned,
                            generation: stored.generation,
                            previous: Some(stored),
                            reenabled: false,
                        });
                    }
                }
                if request.dry_run {
                    tx.rollback().await?;
                    return Ok(outcomes);
                }
                let mut records: Vec<$crate::audit::NewAuditRecord> = outcomes
                    .iter()
                    .filter(|o| o.action != ApplyAction::Unchanged)
                    .map(|o| {
                        let action = match o.action {
                            ApplyAction::Created => "resource.created",
                            ApplyAction::Configured => "resource.configured",
                            _ => "resource.pruned",
                        };
                        $crate::audit::NewAuditRecord::new(
                            if request.actor.is_empty() { "system" } else { &request.actor },
                            action,
                            &o.key.namespace,
                            o.key.to_string(),
                            serde_json::json!({"kind": o.key.kind.as_str(), "name": o.key.name, "generation": o.generation,
                                "applyset": request.applyset}),
                        )
                    })
                    .collect();
                records.extend(outcomes.iter().filter(|o| o.reenabled).map(|o| {
                    $crate::audit::NewAuditRecord::new(
                        if request.actor.is_empty() { "system" } else { &request.actor },
                        "endpoint.enabled",
                        &o.key.namespace,
                        o.key.to_string(),
                        serde_json::json!({"reason": "its spec changed since it was disabled", "generation": o.generation}),
                    )
                }));
                if !records.is_empty() {
                    Self::bump_resource_revision_in(&mut tx).await?;
                    Self::append_audit_in(&mut tx, &records).await?;
                }
                tx.commit().await?;
                Ok(outcomes)
            }

            /// Marks a change of the resources in force (see the `resource_revision` table).
            async fn bump_resource_revision_in(
                tx: &mut sqlx::Transaction<'static, <$store as $crate::store::policy::HasDatabase>::Db>,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query("UPDATE resource_revision SET revision = revision + 1 WHERE id = 1").execute(&mut **tx).await?;
                Ok(())
            }

            /// The revision of the resources in force: it changes with every apply, prune
            /// or delete that changed anything.
            pub(super) async fn resource_revision(&self) -> Result<i64, $crate::store::StoreError> {
                Ok(sqlx::query_scalar("SELECT revision FROM resource_revision WHERE id = 1")
                    .fetch_one(self.read_pool())
                    .await?)
            }

            pub(super) async fn get_resource(
                &self,
                key: &$crate::resources::ResourceKey,
            ) -> Result<Option<$crate::store::resources::StoredResource>, $crate::store::StoreError> {
                use $crate::store::resources::{ResourceRow, StoredResource};
                let row: Option<ResourceRow> = sqlx::query_as(&$sql(concat!(
                    "SELECT kind, namespace, name, uid, generation, labels, annotations, spec, applyset, status, created_at, updated_at ",
                    "FROM resources WHERE kind = ? AND namespace = ? AND name = ?"
                )))
                .bind(key.kind.as_str())
                .bind(&key.namespace)
                .bind(&key.name)
                .fetch_optional(self.read_pool())
                .await?;
                row.map(StoredResource::try_from).transpose()
            }

            pub(super) async fn list_resources(
                &self,
                kind: Option<$crate::resources::Kind>,
                namespace: Option<&str>,
            ) -> Result<Vec<$crate::store::resources::StoredResource>, $crate::store::StoreError> {
                use $crate::store::resources::{ResourceRow, StoredResource};
                // NULL parameters match everything.
                let rows: Vec<ResourceRow> = sqlx::query_as(&$sql(concat!(
                    "SELECT kind, namespace, name, uid, generation, labels, annotations, spec, applyset, status, created_at, updated_at ",
                    "FROM resources WHERE (? IS NULL OR kind = ?) AND (? IS NULL OR namespace = ?) ORDER BY kind, namespace, name"
                )))
                .bind(kind.map(|k| k.as_str()))
                .bind(kind.map(|k| k.as_str()))
                .bind(namespace)
                .bind(namespace)
                .fetch_all(self.read_pool())
                .await?;
                rows.into_iter().map(StoredResource::try_from).collect()
            }

            pub(super) async fn delete_resource(
                &self,
                key: &$crate::resources::ResourceKey,
                actor: &str,
            ) -> Result<Option<$crate::store::resources::StoredResource>, $crate::store::StoreError> {
                use $crate::store::resources::{ResourceRow, StoredResource};
                let mut tx = self.begin_write().await?;
                let row: Option<ResourceRow> = sqlx::query_as(&$sql(concat!(
                    "SELECT kind, namespace, name, uid, generation, labels, annotations, spec, applyset, status, created_at, updated_at ",
                    "FROM resources WHERE kind = ? AND namespace = ? AND name = ?"
                )))
                .bind(key.kind.as_str())
                .bind(&key.namespace)
                .bind(&key.name)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else { return Ok(None) };
                sqlx::query(&$sql("DELETE FROM resources WHERE kind = ? AND namespace = ? AND name = ?"))
                    .bind(key.kind.as_str())
                    .bind(&key.namespace)
                    .bind(&key.name)
                    .execute(&mut *tx)
                    .await?;
                let deleted = StoredResource::try_from(row)?;
                let record = $crate::audit::NewAuditRecord::new(
                    actor,
                    "resource.deleted",
                    &key.namespace,
                    key.to_string(),
                    serde_json::json!({"kind": key.kind.as_str(), "name": key.name, "generation": deleted.generation}),
                );
                Self::bump_resource_revision_in(&mut tx).await?;
                Self::append_audit_in(&mut tx, &[record]).await?;
                tx.commit().await?;
                Ok(Some(deleted))
            }

            /// Writes `status` when the resource is still at `generation`; false otherwise.
            /// Fenced: refused once `term` is over.
            pub(super) async fn update_resource_status(
                &self,
                term: $crate::store::Term,
                key: &$crate::resources::ResourceKey,
                generation: i64,
                status: &serde_json::Value,
            ) -> Result<bool, $crate::store::StoreError> {
                let mut tx = self.begin_write().await?;
                Self::hold_term_in(&mut tx, term).await?;
                let updated = sqlx::query(&$sql(
                    "UPDATE resources SET status = ? WHERE kind = ? AND namespace = ? AND name = ? AND generation = ?",
                ))
                .bind($crate::store::resources::json_text(status))
                .bind(key.kind.as_str())
                .bind(&key.namespace)
                .bind(&key.name)
                .bind(generation)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                tx.commit().await?;
                Ok(updated == 1)
            }
        }
    };
}

pub(super) use resource_methods;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(numbered("a = ? AND b = ?"), "a = $1 AND b = $2");
    }
}
