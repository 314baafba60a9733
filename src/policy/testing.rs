//! `hookwarden policy test DIR`: table-driven tests of AgentRules, run through the same
//! compile and evaluate path as the server.
//!
//! A policy folder holds AgentRule files (`*.yaml`) and one `tests.yaml`:
//!
//! ```yaml
//! cases:
//!   - name: small refunds are allowed
//!     endpoint: {name: refund-agent, labels: {role: agent}}
//!     event: {type: refund.requested, source: shop, data: {amount_cents: 1000}}
//!     spend: {daily-cap: 49000}        # optional: prior window total per rule
//!     now: "2026-11-30T10:00:00Z"      # optional
//!     expect: {outcome: allow, rule: refunds, reason: "refund of"}   # rule and reason optional
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::decision::{rule_word, Outcome};
use super::engine::{self, CompiledRule, EndpointView, PolicySet};
use super::expr::Limits;
use crate::resources::validate::{validate, Checks};
use crate::resources::{parse_files, Kind, ResourceKey, Spec};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    endpoint: EndpointIn,
    event: Value,
    #[serde(default)]
    spend: BTreeMap<String, i64>,
    now: Option<DateTime<Utc>>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointIn {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    outcome: Outcome,
    /// The deciding rule; `none` for the default denial.
    rule: Option<String>,
    /// Text the reason must contain.
    reason: Option<String>,
}

/// The result of one case.
#[derive(Debug)]
pub struct CaseResult {
    pub folder: PathBuf,
    pub name: String,
    /// `None` when it passed.
    pub failure: Option<String>,
}

/// Runs every `tests.yaml` under `dir` against the rules of its folder.
pub fn run(dir: &Path) -> Result<Vec<CaseResult>, String> {
    let mut folders = Vec::new();
    find_test_folders(dir, &mut folders).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    if folders.is_empty() {
        return Err(format!("no tests.yaml found under {}", dir.display()));
    }
    folders.sort();
    let mut results = Vec::new();
    for folder in folders {
        results.extend(run_folder(&folder)?);
    }
    Ok(results)
}

fn find_test_folders(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if dir.join("tests.yaml").is_file() {
        out.push(dir.to_owned());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() && !entry.file_name().to_string_lossy().starts_with('.') {
            find_test_folders(&entry.path(), out)?;
        }
    }
    Ok(())
}

fn run_folder(folder: &Path) -> Result<Vec<CaseResult>, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let tests_path = folder.join("tests.yaml");
    let tests: TestFile = serde_path_to_error::deserialize(yaml_serde::Deserializer::from_str(&read(&tests_path)?))
        .map_err(|e| format!("{}: {}", tests_path.display(), crate::messages::yaml_error(e)))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let is_rule_file = path.extension().is_some_and(|x| x == "yaml" || x == "yml")
            && path.file_name().is_some_and(|n| n != "tests.yaml");
        if is_rule_file {
            files.push((path.display().to_string(), read(&path)?));
        }
    }
    files.sort();
    let parsed = parse_files(files.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    let (resources, mut errors) = (parsed.resources, parsed.errors);
    // The endpoints the cases name stand in for stored ones.
    let endpoints: HashSet<ResourceKey> = resources
        .iter()
        .map(|r| r.resource.metadata.namespace.clone())
        .chain(std::iter::once("default".to_owned()))
        .flat_map(|ns| {
            tests.cases.iter().map(move |c| ResourceKey {
                kind: Kind::Endpoint,
                namespace: ns.clone(),
                name: c.endpoint.name.clone(),
            })
        })
        .chain(parsed.unparsed)
        .collect();
    errors.extend(validate(&resources, &endpoints, &Checks { allow_private_urls: true, ..Checks::default() }));
    if !errors.is_empty() {
        return Err(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"));
    }
    let mut compiled = Vec::new();
    let mut specs = Vec::new();
    let mut namespace = "default".to_owned();
    for located in &resources {
        let m = &located.resource.metadata;
        if let Spec::AgentRule(spec) = &located.resource.spec {
            compiled.push(CompiledRule::compile(&m.name, &m.namespace, spec, &Limits::default())?);
            specs.push((m.name.clone(), m.namespace.clone(), located.resource.spec.to_json()));
            namespace = m.namespace.clone();
        }
    }
    let policy = PolicySet::new(compiled, &specs);
    Ok(tests
        .cases
        .iter()
        .map(|case| {
            let ns = case.endpoint.namespace.clone().unwrap_or_else(|| namespace.clone());
            let endpoint = EndpointView { namespace: &ns, name: &case.endpoint.name, labels: &case.endpoint.labels };
            let mut totals = BTreeMap::new();
            for rule in &policy.rules {
                let spent = case.spend.get(&rule.name).copied().unwrap_or(0);
                if let Some(spend) = &rule.spend {
                    totals.insert((rule.name.clone(), case.endpoint.name.clone(), spend.currency.clone()), spent);
                }
            }
            let now = case.now.unwrap_or_else(Utc::now);
            let decision = engine::decide(&policy, &case.event, endpoint, &totals, now, Limits::default().budget());
            let mut problems = Vec::new();
            if decision.outcome != case.expect.outcome {
                let word = rule_word;
                problems.push(format!("outcome {}, expected {}", word(decision.outcome), word(case.expect.outcome)));
            }
            if let Some(rule) = &case.expect.rule {
                let actual = decision.rule.as_deref().unwrap_or("none");
                if actual != rule {
                    problems.push(format!("decided by `{actual}`, expected `{rule}`"));
                }
            }
            if let Some(text) = &case.expect.reason {
                if !decision.reason.contains(text.as_str()) {
                    problems.push(format!("reason {:?} does not contain {:?}", decision.reason, text));
                }
            }
            CaseResult {
                folder: folder.to_owned(),
                name: case.name.clone(),
                failure: (!problems.is_empty())
                    .then(|| format!("{} (reason: {})", problems.join("; "), decision.reason)),
            }
        })
        .collect())
}
