//! The JSON Schema of an EventType's `data`: checked and compiled, and events' data checked
//! against it.
//!
//! Pure logic: no I/O. Invariants:
//! - a schema is draft 2020-12 and is compiled with every reference kept inside it: a
//!   `$ref` to another document is refused at apply, never fetched (the crate is built
//!   without its HTTP and file resolvers, and the compiler is told to retrieve nothing);
//! - `pattern` runs on the `regex` engine (linear time): a pattern the engine cannot take
//!   (look-around, back-references) is refused at apply, so no event can make a pattern
//!   backtrack without end;
//! - a schema is bounded ([`MAX_SCHEMA_BYTES`], [`MAX_SCHEMA_DEPTH`]) and so is what a
//!   check reports ([`MAX_VIOLATIONS`], [`MAX_MESSAGE_CHARS`]);
//! - compiling happens at apply (to refuse a bad schema) and when the catalog is built
//!   (to use it), never per event.

use serde::Serialize;
use serde_json::Value;

/// The largest schema, as compact JSON.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// The deepest nesting of a schema's objects and arrays, the schema itself at depth 1.
pub const MAX_SCHEMA_DEPTH: usize = 32;
/// The most violations reported for one event.
pub const MAX_VIOLATIONS: usize = 20;
/// The longest message of one violation (a message may quote the data).
pub const MAX_MESSAGE_CHARS: usize = 300;

/// The only `$schema` a schema may declare (it may declare none).
pub const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// A compiled schema, ready to check events' data.
pub type CompiledSchema = jsonschema::Validator;

/// One way an event's data fails its type's schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON Pointer into the event, e.g. `/data/total`.
    pub path: String,
    /// The schema keyword that failed: `minimum`, `required`, `type` …
    pub keyword: String,
    pub message: String,
}

/// A problem with a spec's schema or examples: `path` is a resource field path
/// (`spec.schema.properties.total.minimum`, `spec.examples[1].total`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaProblem {
    pub path: String,
    pub message: String,
}

/// Compiles `schema` within the bounds; `Err` names where it is wrong, as a field path
/// under `spec.schema`.
pub fn compile(schema: &Value) -> Result<CompiledSchema, SchemaProblem> {
    let problem = |path: String, message: String| SchemaProblem { path, message };
    let size = serde_json::to_vec(schema).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_SCHEMA_BYTES {
        return Err(problem(
            "spec.schema".into(),
            format!("is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES} are allowed"),
        ));
    }
    if depth(schema) > MAX_SCHEMA_DEPTH {
        return Err(problem(
            "spec.schema".into(),
            format!("nests objects and arrays deeper than {MAX_SCHEMA_DEPTH} levels"),
        ));
    }
    if let Some(declared) = schema.get("$schema") {
        if declared.as_str() != Some(DRAFT_2020_12) {
            return Err(problem(
                "spec.schema.$schema".into(),
                format!("must be `{DRAFT_2020_12}` (draft 2020-12) when given"),
            ));
        }
    }
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .offline()
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(schema)
        .map_err(|e| {
            let pointer = e.instance_path().as_str().to_owned();
            let message = match e.kind() {
                jsonschema::error::ValidationErrorKind::Referencing(reason) => format!(
                    "a `$ref` must point inside this schema: other documents are never fetched ({})",
                    bounded(&reason.to_string())
                ),
                _ => format!("is not a valid JSON Schema (draft 2020-12): {}", bounded(&e.to_string())),
            };
            problem(field_path("spec.schema", schema, &pointer), message)
        })
}

/// Compiles the schema of a spec and checks its examples against it: every problem.
pub fn check_spec(schema: Option<&Value>, examples: &[Value]) -> Vec<SchemaProblem> {
    let Some(schema) = schema else { return Vec::new() };
    let compiled = match compile(schema) {
        Ok(compiled) => compiled,
        Err(problem) => return vec![problem],
    };
    let mut problems = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        for error in compiled.iter_errors(example).take(MAX_VIOLATIONS) {
            let at = format!("spec.examples[{i}]");
            problems.push(SchemaProblem {
                path: field_path(&at, example, error.instance_path().as_str()),
                message: format!(
                    "does not match the schema ({}): {}",
                    error.kind().keyword(),
                    bounded(&error.to_string())
                ),
            });
        }
    }
    problems
}

/// How `data` fails `schema`: at most [`MAX_VIOLATIONS`], paths from the event's root.
pub fn violations(schema: &CompiledSchema, data: &Value) -> Vec<Violation> {
    schema
        .iter_errors(data)
        .take(MAX_VIOLATIONS)
        .map(|e| Violation {
            path: format!("/data{}", e.instance_path().as_str()),
            keyword: e.kind().keyword().to_owned(),
            message: bounded(&e.to_string()),
        })
        .collect()
}

/// At most [`MAX_MESSAGE_CHARS`] of `text`.
fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A JSON Pointer into `value` as a field path under `prefix`: `/a/0/b` over
/// `{"a": [{"b": …}]}` is `prefix.a[0].b`.
fn field_path(prefix: &str, value: &Value, pointer: &str) -> String {
    let mut path = prefix.to_owned();
    let mut at = Some(value);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Some(Value::Array(items)) if segment.parse::<usize>().is_ok() => {
                at = segment.parse::<usize>().ok().and_then(|i| items.get(i));
                path.push_str(&format!("[{segment}]"));
            }
            _ => {
                at = at.and_then(|v| v.get(&segment));
                path.push('.');
                path.push_str(&segment);
            }
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn order() -> Value {
        json!({
            "type": "object",
            "required": ["order_id", "total"],
            "properties": {
                "order_id": {"type": "integer"},
                "total": {"type": "integer", "minimum": 0},
                "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"}}}},
            },
            "additionalProperties": false,
        })
    }

    #[test]
    fn data_that_fails_is_told_by_path_and_keyword() {
        let schema = compile(&order()).unwrap();
        assert_eq!(violations(&schema, &json!({"order_id": 1, "total": 5})), vec![]);
        let found = violations(&schema, &json!({"order_id": "x", "total": -1, "items": [{"sku": "abc"}], "extra": 1}));
        let found: Vec<(&str, &str)> = found.iter().map(|v| (v.path.as_str(), v.keyword.as_str())).collect();
        for expected in [
            ("/data/order_id", "type"),
            ("/data/total", "minimum"),
            ("/data/items/0/sku", "pattern"),
            ("/data", "additionalProperties"),
        ] {
            assert!(found.contains(&expected), "{expected:?} not in {found:?}");
        }
        let below = violations(&schema, &json!({"order_id": 1, "total": -1}));
        assert_eq!(below[0].message, "-1 is less than the minimum of 0", "the README shows this message");
        let missing = violations(&schema, &json!({"order_id": 1}));
        assert_eq!((missing[0].path.as_str(), missing[0].keyword.as_str()), ("/data", "required"));
    }

    #[test]
    fn violations_are_bounded() {
        let schema = compile(&json!({"type": "array", "items": {"type": "string"}})).unwrap();
        let data = Value::Array((0..100).map(|i| json!(i)).collect());
        assert_eq!(violations(&schema, &data).len(), MAX_VIOLATIONS);
        let long = compile(&json!({"type": "string"})).unwrap();
        let message = &violations(&long, &json!({"a": "x".repeat(10_000)}))[0].message;
        assert!(message.chars().count() <= MAX_MESSAGE_CHARS + 1, "{message}");
    }

    #[test]
    fn an_invalid_schema_is_refused_at_its_path() {
        let problem = compile(&json!({"properties": {"total": {"minimum": "zero"}}})).unwrap_err();
        assert_eq!(problem.path, "spec.schema.properties.total.minimum", "{problem:?}");
        let problem = compile(&json!({"$schema": "http://json-schema.org/draft-07/schema#"})).unwrap_err();
        assert_eq!(problem.path, "spec.schema.$schema");
    }

    #[test]
    fn a_remote_ref_is_refused_and_never_fetched() {
        let problem = compile(&json!({"$ref": "https://schemas.example.com/order.json"})).unwrap_err();
        assert!(problem.message.starts_with("a `$ref` must point inside this schema"), "{problem:?}");
        let problem = compile(&json!({"$ref": "file:///etc/passwd"})).unwrap_err();
        assert!(problem.message.starts_with("a `$ref` must point inside this schema"), "{problem:?}");
        let local = json!({"$defs": {"id": {"type": "integer"}}, "properties": {"id": {"$ref": "#/$defs/id"}}});
        assert!(compile(&local).is_ok());
    }

    #[test]
    fn a_backtracking_pattern_is_refused() {
        assert!(compile(&json!({"type": "string", "pattern": "^(a+)\\1$"})).is_err());
    }

    #[test]
    fn oversized_and_overdeep_schemas_are_refused() {
        let mut deep = json!({"type": "object"});
        for _ in 0..MAX_SCHEMA_DEPTH {
            deep = json!({"properties": {"a": deep}});
        }
        assert!(compile(&deep).unwrap_err().message.contains("deeper"));
        let wide = json!({"enum": vec!["x".repeat(100); 1000]});
        assert!(compile(&wide).unwrap_err().message.contains("bytes"));
    }

    #[test]
    fn an_example_that_fails_is_refused_at_its_path() {
        let problems =
            check_spec(Some(&order()), &[json!({"order_id": 1, "total": 2}), json!({"order_id": 1, "total": -2})]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "spec.examples[1].total");
        assert!(problems[0].message.contains("minimum"), "{problems:?}");
    }
}
