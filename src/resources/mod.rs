//! Declarative resources: the kinds, their YAML documents, validation and diffs.
//!
//! Pure logic only: parsing, validation and diffing take text and return values; the store
//! writes, the API and CLI carry. A resource document is Kubernetes-shaped:
//! `apiVersion: hookwarden/v1`, `kind`, `metadata` (`name`, `namespace`, `labels`), `spec`,
//! and a `status` that only the controller writes (ignored on apply).

mod conceal;
pub mod diff;
pub mod event_schema;
pub mod kinds;
pub mod limits;
pub mod namespace;
pub mod secret_sources;
pub mod validate;

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use kinds::{AgentRuleSpec, EndpointSpec, EventTypeSpec, FilterSpec, NamespaceSpec, RetryBudgetSpec};
pub use limits::ApplyLimits;
use limits::Budget;

pub const API_VERSION: &str = "hookwarden/v1";
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds of resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Endpoint,
    RetryBudget,
    Filter,
    AgentRule,
    EventType,
    /// Cluster-scoped: a tenant's lifecycle and limits (see [`Kind::is_cluster_scoped`]).
    Namespace,
}

/// The kinds by name, for messages.
pub const KIND_NAMES: &str = "Endpoint, RetryBudget, Filter, AgentRule, EventType, Namespace";

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Namespace, Kind::RetryBudget, Kind::Filter, Kind::Endpoint, Kind::AgentRule, Kind::EventType];

    /// A cluster-scoped resource has a name and no namespace: it is stored under the
    /// namespace `""`, which no token's namespaces and no namespace-scoped document can
    /// name, and applying or deleting it needs `admin` over every namespace.
    pub fn is_cluster_scoped(self) -> bool {
        self == Kind::Namespace
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Endpoint => "Endpoint",
            Kind::RetryBudget => "RetryBudget",
            Kind::Filter => "Filter",
            Kind::AgentRule => "AgentRule",
            Kind::EventType => "EventType",
            Kind::Namespace => "Namespace",
        }
    }

    /// Accepts `Endpoint`, `endpoint`, `endpoints` (as kubectl does).
    pub fn parse(name: &str) -> Option<Kind> {
        let lower = name.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        Kind::ALL.into_iter().find(|k| k.as_str().to_ascii_lowercase() == singular)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a resource: unique per kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

/// `Kind/namespace/name`, or `Kind/name` for a cluster-scoped resource.
impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// `metadata` of a document. Server-written fields are accepted (so that `get -o yaml`
/// output can be applied again) and ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    /// A DNS label: 1-63 of a-z, 0-9 and '-', starting and ending alphanumeric. An
    /// EventType's name is its event type: 1-253 of a-z, A-Z, 0-9, '.', '_' and '-',
    /// starting and ending alphanumeric.
    pub name: String,
    /// The tenant boundary; `default` when omitted. A Namespace (cluster-scoped) has none.
    #[serde(default = "default_namespace", skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Read-only: bumped by the server when `spec` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Read-only: the apply set that owns the resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applyset: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

/// One YAML document of kind `S`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document<S> {
    /// Always `hookwarden/v1`.
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
    /// Written by the controller; ignored on apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// The spec of a resource, by kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Endpoint(EndpointSpec),
    RetryBudget(RetryBudgetSpec),
    Filter(FilterSpec),
    AgentRule(AgentRuleSpec),
    EventType(EventTypeSpec),
    Namespace(NamespaceSpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Endpoint(_) => Kind::Endpoint,
            Spec::RetryBudget(_) => Kind::RetryBudget,
            Spec::Filter(_) => Kind::Filter,
            Spec::AgentRule(_) => Kind::AgentRule,
            Spec::EventType(_) => Kind::EventType,
            Spec::Namespace(_) => Kind::Namespace,
        }
    }

    /// The spec as JSON, in the one canonical form the store compares.
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Spec::Endpoint(s) => serde_json::to_value(s),
            Spec::RetryBudget(s) => serde_json::to_value(s),
            Spec::Filter(s) => serde_json::to_value(s),
            Spec::AgentRule(s) => serde_json::to_value(s),
            Spec::EventType(s) => serde_json::to_value(s),
            Spec::Namespace(s) => serde_json::to_value(s),
        };
        value.expect("specs are plain data and always serialize")
    }

    /// A stored spec in this build's canonical form: read through the current types and
    /// written again, so that what an older build wrote (a duration as `1day`) compares
    /// and shows as this build writes it (`24h`), and re-applying the same file stays
    /// `unchanged`. A spec that no longer reads is returned as stored.
    pub fn canonical_json(kind: Kind, stored: serde_json::Value) -> serde_json::Value {
        use serde::de::Deserialize as _;
        let canonical = match kind {
            Kind::Endpoint => EndpointSpec::deserialize(&stored).map(Spec::Endpoint),
            Kind::RetryBudget => RetryBudgetSpec::deserialize(&stored).map(Spec::RetryBudget),
            Kind::Filter => FilterSpec::deserialize(&stored).map(Spec::Filter),
            Kind::AgentRule => AgentRuleSpec::deserialize(&stored).map(Spec::AgentRule),
            Kind::EventType => EventTypeSpec::deserialize(&stored).map(Spec::EventType),
            Kind::Namespace => NamespaceSpec::deserialize(&stored).map(Spec::Namespace),
        };
        canonical.map(|spec| spec.to_json()).unwrap_or(stored)
    }

    /// Reads a stored spec back.
    pub fn from_json(kind: Kind, value: serde_json::Value) -> Result<Spec, serde_json::Error> {
        Ok(match kind {
            Kind::Endpoint => Spec::Endpoint(serde_json::from_value(value)?),
            Kind::RetryBudget => Spec::RetryBudget(serde_json::from_value(value)?),
            Kind::Filter => Spec::Filter(serde_json::from_value(value)?),
            Kind::AgentRule => Spec::AgentRule(serde_json::from_value(value)?),
            Kind::EventType => Spec::EventType(serde_json::from_value(value)?),
            Kind::Namespace => Spec::Namespace(serde_json::from_value(value)?),
        })
    }
}

/// A parsed resource, before or after it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub metadata: Metadata,
    pub spec: Spec,
}

impl Resource {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    pub fn key(&self) -> ResourceKey {
        ResourceKey { kind: self.kind(), namespace: self.metadata.namespace.clone(), name: self.metadata.name.clone() }
    }
}

/// Where a document came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: String,
    /// Index of the document in its file, from 0.
    pub document: usize,
}

/// A resource and where it was read.
#[derive(Clone, Debug)]
pub struct Located {
    pub origin: Origin,
    pub resource: Resource,
}

/// A problem with one field of one document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResourceError {
    pub file: String,
    pub document: usize,
    /// Field path such as `spec.backoff.max`; empty for the document as a whole.
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub message: String,
}

impl ResourceError {
    pub fn at(origin: &Origin, path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: origin.file.clone(),
            document: origin.document,
            path: path.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {}", self.file, self.document)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        write!(f, "): ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// What reading resource files gave: the documents that parsed, the errors of those that
/// did not, and the keys those name.
#[derive(Debug, Default)]
pub struct Parsed {
    pub resources: Vec<Located>,
    pub errors: Vec<ResourceError>,
    /// Kind, namespace and name of documents that did not parse but say them: references
    /// to them are not reported as missing (the document's own error says what is wrong).
    pub unparsed: HashSet<ResourceKey>,
}

/// Parses every document of a multi-document YAML text within the default
/// [`ApplyLimits`]. Empty documents are skipped.
pub fn parse_file(file: &str, text: &str) -> Parsed {
    let limits = ApplyLimits::default();
    let mut parsed = Parsed::default();
    read_text(&mut parsed, &mut Budget::new(&limits), file, text);
    parsed
}

/// Reads the documents of one text into `parsed`, spending `budget`.
///
/// Each document is read twice, and nothing before it again: once into a counted value
/// (the limits, `apiVersion` and `kind`), then into its kind's typed shape, for field
/// paths with lines. The second reading walks a second iterator over the same text in
/// step with the first, so a text of N documents costs two passes, not N.
fn read_text(parsed: &mut Parsed, budget: &mut Budget<'_>, file: &str, text: &str) {
    let limits = budget.limits();
    if let Err(e) = limits::check_brackets(text, limits.max_brackets_per_document) {
        let origin = Origin { file: file.to_owned(), document: e.document };
        parsed.errors.push(ResourceError { line: Some(e.line), ..ResourceError::at(&origin, "", e.to_string()) });
        return;
    }
    let mut typed = TypedDocuments { documents: yaml_serde::Deserializer::from_str(text), next: 0 };
    let lines = LineStarts::of(text);
    for (index, document) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let origin = Origin { file: file.to_owned(), document: index };
        if let Err(limit) = budget.take_document() {
            parsed.errors.push(ResourceError::at(&origin, "", limit.message(limits)));
            break;
        }
        let value = match budget.read_value(document) {
            Ok(value) => value,
            Err((e, limit)) => {
                let mut error = yaml_error(&origin, String::new(), &e);
                if let Some(limit) = limit {
                    error.message = limit.message(limits);
                }
                parsed.errors.push(error);
                // A syntax error ends the stream: later documents cannot be read. Neither
                // can anything once the read's budget is spent.
                match limit {
                    Some(limit) if !limit.ends_the_read() => continue,
                    _ => break,
                }
            }
        };
        if value.is_null() {
            continue;
        }
        let Some(document) = typed.take(index) else {
            parsed.errors.push(ResourceError::at(&origin, "", "document disappeared while reading"));
            break;
        };
        match parse_document(&origin, text, &lines, document, &value) {
            Ok(resource) => parsed.resources.push(Located { origin, resource }),
            Err(e) => {
                parsed.errors.push(e);
                parsed.unparsed.extend(named_key(&value));
            }
        }
    }
}

/// The documents of a text, read a second time in step with the first reading.
struct TypedDocuments<'t> {
    documents: yaml_serde::Deserializer<'t>,
    /// The index of the document `documents` yields next.
    next: usize,
}

impl<'t> TypedDocuments<'t> {
    /// Document `index`, skipping (but not re-reading) those before it.
    fn take(&mut self, index: usize) -> Option<yaml_serde::Deserializer<'t>> {
        while self.next < index {
            self.documents.next()?;
            self.next += 1;
        }
        self.next += 1;
        self.documents.next()
    }
}

/// Where each line of a text starts, so that a line can be found without counting the
/// lines before it again.
struct LineStarts(Vec<usize>);

impl LineStarts {
    fn of(text: &str) -> Self {
        Self(std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect())
    }

    /// The text from the start of `line` (from 1) on.
    fn from<'t>(&self, text: &'t str, line: usize) -> &'t str {
        let start = line.checked_sub(1).and_then(|i| self.0.get(i)).copied().unwrap_or(text.len());
        &text[start..]
    }
}

/// The key a document that did not parse names, if it names one.
fn named_key(value: &yaml_serde::Value) -> Option<ResourceKey> {
    let kind = Kind::ALL.into_iter().find(|k| value.get("kind").and_then(|v| v.as_str()) == Some(k.as_str()))?;
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str()?.to_owned();
    let namespace = match metadata.get("namespace") {
        None if kind.is_cluster_scoped() => String::new(),
        None => DEFAULT_NAMESPACE.to_owned(),
        Some(namespace) => namespace.as_str()?.to_owned(),
    };
    Some(ResourceKey { kind, namespace, name })
}

/// A YAML library error as a resource error at `path`, in plain words (see
/// [`crate::messages`]); a missing field's name joins the path. Within `spec.secrets`
/// what the types do not know is never repeated (see [`conceal::conceal_in_secrets`]).
fn yaml_error(origin: &Origin, path: String, e: &yaml_serde::Error) -> ResourceError {
    let mut text = crate::messages::yaml_text(&path, e);
    let mut path = path;
    // Where we know no path (a duplicate key, found while reading the document), the
    // library names one itself: `spec.secrets[0]: duplicate entry with key "…"`.
    if path.is_empty() {
        let named = text
            .split_once(": ")
            .filter(|(p, _)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-[]".contains(&b)));
        if let Some((named, rest)) = named {
            (path, text) = (named.to_owned(), rest.to_owned());
        }
    }
    let (path, message) = crate::messages::field_error(&path, &text);
    let (path, message) = conceal::conceal_in_secrets(path, message);
    ResourceError {
        file: origin.file.clone(),
        document: origin.document,
        path,
        line: e.location().map(|l| l.line()),
        message,
    }
}

fn parse_document(
    origin: &Origin,
    text: &str,
    lines: &LineStarts,
    document: yaml_serde::Deserializer<'_>,
    value: &yaml_serde::Value,
) -> Result<Resource, ResourceError> {
    let Some(map) = value.as_mapping() else {
        return Err(ResourceError::at(
            origin,
            "",
            "a resource document must be a mapping with apiVersion, kind, metadata and spec",
        ));
    };
    match map.get("apiVersion").and_then(|v| v.as_str()) {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(ResourceError::at(origin, "apiVersion", format!("must be `{API_VERSION}`, not `{other}`")))
        }
        None => return Err(ResourceError::at(origin, "apiVersion", format!("missing; must be `{API_VERSION}`"))),
    }
    let kind_name = map
        .get("kind")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ResourceError::at(origin, "kind", format!("missing; one of {KIND_NAMES}")))?;
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.as_str() == kind_name)
        .ok_or_else(|| ResourceError::at(origin, "kind", format!("unknown kind `{kind_name}`; one of {KIND_NAMES}")))?;
    if kind.is_cluster_scoped() && value.get("metadata").and_then(|m| m.get("namespace")).is_some() {
        return Err(ResourceError::at(
            origin,
            "metadata.namespace",
            format!("a {kind} is cluster-scoped: give `metadata.name` only (the namespace it governs)"),
        ));
    }
    // The document again, in the typed shape, for field paths with lines.
    let (metadata, spec) = match kind {
        Kind::Endpoint => typed_document(origin, text, lines, document).map(|(m, s)| (m, Spec::Endpoint(s)))?,
        Kind::RetryBudget => typed_document(origin, text, lines, document).map(|(m, s)| (m, Spec::RetryBudget(s)))?,
        Kind::Filter => typed_document(origin, text, lines, document).map(|(m, s)| (m, Spec::Filter(s)))?,
        Kind::AgentRule => typed_document(origin, text, lines, document).map(|(m, s)| (m, Spec::AgentRule(s)))?,
        Kind::EventType => typed_document(origin, text, lines, document).map(|(m, s)| (m, Spec::EventType(s)))?,
        Kind::Namespace => typed_document(origin, text, lines, document).map(|(m, s)| (m, Spec::Namespace(s)))?,
    };
    let metadata = if kind.is_cluster_scoped() { Metadata { namespace: String::new(), ..metadata } } else { metadata };
    Ok(Resource { metadata, spec })
}

fn typed_document<S: DeserializeOwned>(
    origin: &Origin,
    text: &str,
    lines: &LineStarts,
    document: yaml_serde::Deserializer<'_>,
) -> Result<(Metadata, S), ResourceError> {
    let parsed: Document<S> = serde_path_to_error::deserialize(document).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let mut error = yaml_error(origin, path, e.inner());
        // A missing field has no line of its own: the enclosing mapping's is the best.
        if error.message != crate::messages::REQUIRED {
            error.line = error.line.map(|line| refine_line(lines.from(text, line), line, &error.path));
        }
        error
    })?;
    Ok((parsed.metadata, parsed.spec))
}

/// The YAML library reports some errors (those raised while reading a value, such as a
/// bad duration) at the start of the enclosing mapping. Moves such a line forward to the
/// line that holds the failing key, if one does before the document ends. `rest` is the
/// text from the start of the reported line on.
fn refine_line(rest: &str, reported: usize, path: &str) -> usize {
    let Some(key) = path.rsplit('.').next().map(|k| k.split('[').next().unwrap_or(k)).filter(|k| !k.is_empty()) else {
        return reported;
    };
    let needle = format!("{key}:");
    for (i, line) in rest.lines().enumerate() {
        if line.starts_with("---") && i > 0 {
            break;
        }
        let code = line.split(" #").next().unwrap_or(line);
        let found = code.match_indices(&needle).any(|(at, _)| {
            at == 0 || !code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        if found {
            return reported + i;
        }
    }
    reported
}

/// Parses several named texts, each within the default [`ApplyLimits`] on its own (files
/// the operator keeps: a directory, a command line); errors of all of them are returned
/// together.
pub fn parse_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Parsed {
    let limits = ApplyLimits::default();
    let mut all = Parsed::default();
    for (name, text) in files {
        read_text(&mut all, &mut Budget::new(&limits), name, text);
    }
    all
}

/// Parses several named texts within one budget of `limits` for all of them together
/// (one apply request: many files must not multiply its limits).
pub fn parse_files_within<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>, limits: &ApplyLimits) -> Parsed {
    let mut budget = Budget::new(limits);
    let mut all = Parsed::default();
    for (name, text) in files {
        read_text(&mut all, &mut budget, name, text);
    }
    all
}

/// The JSON Schema of every kind: a `oneOf` keyed by `kind`, definitions shared at the root.
pub fn json_schema() -> serde_json::Value {
    let mut definitions = serde_json::Map::new();
    let mut kind_schema = |kind: Kind, mut schema: serde_json::Value| {
        schema["properties"]["kind"] = serde_json::json!({ "const": kind.as_str() });
        schema["properties"]["apiVersion"] = serde_json::json!({ "const": API_VERSION });
        schema["title"] = serde_json::json!(kind.as_str());
        if let Some(object) = schema.as_object_mut() {
            object.remove("$schema");
            if let Some(serde_json::Value::Object(defs)) = object.remove("$defs") {
                definitions.extend(defs);
            }
        }
        schema
    };
    let kinds = vec![
        kind_schema(Kind::Endpoint, schemars::schema_for!(Document<EndpointSpec>).to_value()),
        kind_schema(Kind::RetryBudget, schemars::schema_for!(Document<RetryBudgetSpec>).to_value()),
        kind_schema(Kind::Filter, schemars::schema_for!(Document<FilterSpec>).to_value()),
        kind_schema(Kind::AgentRule, schemars::schema_for!(Document<AgentRuleSpec>).to_value()),
        kind_schema(Kind::EventType, schemars::schema_for!(Document<EventTypeSpec>).to_value()),
        kind_schema(Kind::Namespace, schemars::schema_for!(Document<NamespaceSpec>).to_value()),
    ];
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Hookwarden resource (hookwarden/v1)",
        "oneOf": kinds,
        "$defs": definitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: &str = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: standard}\nspec:\n  maxAttempts: 5\n  backoff: {base: 1s, max: 1m}\n";

    fn only_error(yaml: &str) -> ResourceError {
        let parsed = parse_file("f.yaml", yaml);
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);
        parsed.errors[0].clone()
    }

    #[test]
    fn ill_typed_fields_are_told_in_plain_words_at_their_line() {
        let error = only_error(&BUDGET.replace("maxAttempts: 5", "maxAttempts: x"));
        assert_eq!(
            error.to_string(),
            "f.yaml (document 0, line 5): spec.maxAttempts: must be a whole number from 0 to 4294967295, not a text"
        );
        let error = only_error(&BUDGET.replace("base: 1s", "base: ten seconds"));
        assert_eq!(
            error.to_string(),
            "f.yaml (document 0, line 6): spec.backoff.base: `ten seconds` is not a duration like 30s, 5m or 24h"
        );
        let error = only_error(&BUDGET.replace("backoff: {base: 1s, max: 1m}", "backoff: [1s, 1m]"));
        assert_eq!((error.path.as_str(), error.message.as_str()), ("spec.backoff", "must be a mapping, not a list"));
    }

    #[test]
    fn a_missing_field_is_named_by_its_path() {
        let error = only_error(&BUDGET.replace("  maxAttempts: 5\n", ""));
        assert_eq!((error.path.as_str(), error.message.as_str()), ("spec.maxAttempts", "is required"));
    }

    #[test]
    fn a_secret_in_the_wrong_shape_is_never_repeated() {
        let secret = "whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP";
        for secrets in [format!("[{secret}]"), format!("[{{value: [{secret}]}}]"), format!("[{{valueFrom: {secret}}}]")]
        {
            let yaml = format!("apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: e}}\nspec:\n  url: https://e.example.com\n  secrets: {secrets}\n");
            let error = only_error(&yaml);
            assert!(!error.to_string().contains("whsec_"), "{error}");
            assert!(error.path.starts_with("spec.secrets[0]"), "{error}");
        }
        let error = only_error(&format!(
            "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: e}}\nspec:\n  url: https://e.example.com\n  secrets: [{secret}]\n"
        ));
        assert_eq!(error.message, "must be a mapping with `value` or `valueFrom`, not a text");
    }

    #[test]
    fn a_namespace_is_cluster_scoped() {
        let yaml = "apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: payments}\nspec: {dedupWindow: 24h}\n";
        let parsed = parse_file("f.yaml", yaml);
        assert_eq!(parsed.errors, vec![]);
        let resource = &parsed.resources[0].resource;
        assert_eq!(
            resource.key(),
            ResourceKey { kind: Kind::Namespace, namespace: String::new(), name: "payments".into() }
        );
        let error = only_error(&yaml.replace("{name: payments}", "{name: payments, namespace: default}"));
        assert_eq!(error.path, "metadata.namespace");
        assert!(error.message.contains("cluster-scoped"), "{error}");
        assert_eq!(Kind::parse("namespaces"), Some(Kind::Namespace));
    }

    #[test]
    fn documents_that_do_not_parse_still_say_what_they_name() {
        let parsed = parse_file("f.yaml", &BUDGET.replace("maxAttempts: 5", "maxAttempts: x"));
        let key = ResourceKey { kind: Kind::RetryBudget, namespace: "default".into(), name: "standard".into() };
        assert_eq!(parsed.unparsed, HashSet::from([key]));
    }
}
