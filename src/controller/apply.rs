//! One apply, from parsed documents to stored rows: validate against what is stored,
//! then write atomically. Shared by `POST /v1/apply` and the directory controller.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::resources::validate::{self, Checks};
use crate::resources::{Kind, NamespaceSpec, Parsed, ResourceError, ResourceKey, Spec};
use crate::store::resources::set_reaches;
use crate::store::{ApplyOutcome, ApplyRequest, DesiredResource, Store, StoreError};

#[derive(Clone, Debug, Default)]
pub struct ApplyOptions {
    pub applyset: Option<String>,
    pub prune: bool,
    /// The namespaces the apply set reaches, `None` for every one (see
    /// [`ApplyRequest::namespaces`]): a token's own.
    pub namespaces: Option<Vec<String>>,
    pub dry_run: bool,
    pub checks: Checks,
    /// Who applies, for the audit log.
    pub actor: String,
    /// The leader's term, when the leader applies (the watched directory): fenced by it.
    pub leader: Option<crate::store::Term>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{} invalid", if .0.len() == 1 { "1 document is".to_owned() } else { format!("{} problems make the documents", .0.len()) })]
    Invalid(Vec<ResourceError>),
    #[error("{0}")]
    Usage(String),
    #[error("could not apply")]
    Store(#[from] StoreError),
    /// Validation did not finish (it panicked: a bug).
    #[error("validation did not finish")]
    Validation(#[source] tokio::task::JoinError),
}

/// Validates the documents that parsed (references may resolve to stored resources that
/// this apply does not prune) and applies them in one transaction. The errors of the
/// documents that did not parse are reported together with every other error, and then
/// nothing is written.
pub async fn apply(store: &Store, parsed: Parsed, options: &ApplyOptions) -> Result<Vec<ApplyOutcome>, ApplyError> {
    if options.prune && options.applyset.is_none() {
        return Err(ApplyError::Usage("prune needs an apply set name (--applyset NAME)".into()));
    }
    let Parsed { resources, errors: mut parse_errors, unparsed } = parsed;
    let desired: HashSet<ResourceKey> = resources.iter().map(|l| l.resource.key()).collect();
    let stored = store.list_resources(None, None).await?;
    let mut errors = Vec::new();
    if let Some(set) = &options.applyset {
        // A resource belongs to one apply set; another set's prune must never reach it.
        for located in &resources {
            let owner = stored.iter().find(|s| s.key == located.resource.key()).and_then(|s| s.applyset.as_ref());
            if let Some(owner) = owner.filter(|o| *o != set) {
                errors.push(ResourceError::at(
                    &located.origin,
                    "metadata.name",
                    format!("belongs to apply set `{owner}`, not `{set}`; apply it with that set, or delete it first"),
                ));
            }
        }
    }
    // The stored Namespaces' specs, for their quotas (one that no longer reads sets none).
    let namespaces: HashMap<String, NamespaceSpec> = stored
        .iter()
        .filter(|s| s.key.kind == Kind::Namespace)
        .filter_map(|s| match Spec::from_json(Kind::Namespace, s.spec.clone()) {
            Ok(Spec::Namespace(spec)) => Some((s.key.name.clone(), spec)),
            _ => None,
        })
        .collect();
    let known: HashSet<ResourceKey> = stored
        .into_iter()
        .filter(|s| {
            let pruned = options.prune
                && s.applyset == options.applyset
                && set_reaches(options.namespaces.as_deref(), &s.key.namespace)
                && !desired.contains(&s.key);
            !pruned
        })
        .map(|s| s.key)
        .chain(unparsed)
        .collect();
    // Validation compiles every CEL expression and its literal patterns: CPU-bound, so off
    // the async workers.
    let checks = options.checks.clone();
    let (resources, invalid) = tokio::task::spawn_blocking(move || {
        let mut invalid = validate::validate(&resources, &known, &checks);
        invalid.extend(validate::check_endpoint_quotas(&resources, &known, &namespaces));
        (resources, invalid)
    })
    .await
    .map_err(ApplyError::Validation)?;
    errors.extend(invalid);
    if !parse_errors.is_empty() || !errors.is_empty() {
        parse_errors.extend(errors);
        return Err(ApplyError::Invalid(parse_errors));
    }
    let request = ApplyRequest {
        resources: resources
            .into_iter()
            .map(|l| DesiredResource {
                key: l.resource.key(),
                labels: l.resource.metadata.labels,
                annotations: l.resource.metadata.annotations,
                spec: l.resource.spec.to_json(),
            })
            .collect(),
        applyset: options.applyset.clone(),
        prune: options.prune,
        namespaces: options.namespaces.clone(),
        dry_run: options.dry_run,
        actor: options.actor.clone(),
        leader: options.leader,
    };
    Ok(store.apply_resources(&request).await?)
}

/// Every `*.yaml` / `*.yml` file under `path` (or `path` itself), sorted, hidden files
/// skipped; names are relative to `path` for a directory.
pub fn read_resource_files(path: &Path) -> std::io::Result<Vec<(String, String)>> {
    if path.is_file() {
        return Ok(vec![(path.display().to_string(), std::fs::read_to_string(path)?)]);
    }
    let mut files = Vec::new();
    collect(path, &mut files)?;
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let name = file.strip_prefix(path).unwrap_or(&file).display().to_string();
            Ok((name, std::fs::read_to_string(&file)?))
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    Ok(())
}
