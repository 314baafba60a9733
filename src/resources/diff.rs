//! Readable differences between a stored resource and a desired one, and redaction of
//! secret values wherever a spec is shown.
//!
//! Invariant: an Endpoint's `secrets[].value` and every `headers` value whose header is
//! not listed in `plainHeaders` are shown as [`REDACTED`], in documents and in diffs; a
//! diff says such a value changed without showing either side.

use serde_json::Value;

use super::Kind;

/// What a shown secret value is replaced by.
pub const REDACTED: &str = "(redacted)";

/// The names of an Endpoint spec's `headers` that its `plainHeaders` does not list.
fn secret_headers(spec: &Value) -> Vec<String> {
    let plain: Vec<&str> =
        spec.get("plainHeaders").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let headers = spec.get("headers").and_then(Value::as_object).into_iter().flat_map(|h| h.keys());
    headers.filter(|name| !plain.iter().any(|p| p.eq_ignore_ascii_case(name))).cloned().collect()
}

/// Replaces every inline secret value, and every header value not listed in
/// `plainHeaders`, of a spec with [`REDACTED`].
pub fn redact(kind: Kind, spec: &mut Value) {
    if kind != Kind::Endpoint {
        return;
    }
    if let Some(secrets) = spec.get_mut("secrets").and_then(Value::as_array_mut) {
        for secret in secrets {
            if let Some(value) = secret.get_mut("value") {
                *value = Value::String(REDACTED.to_owned());
            }
        }
    }
    for name in secret_headers(spec) {
        spec["headers"][name.as_str()] = Value::String(REDACTED.to_owned());
    }
}

/// Which leaves of two documents (`{"metadata", "spec"}`) are never shown.
struct Hidden(Vec<String>);

impl Hidden {
    fn of(kind: Kind, documents: [&Value; 2]) -> Hidden {
        let mut paths = Vec::new();
        if kind == Kind::Endpoint {
            for document in documents {
                if let Some(spec) = document.get("spec") {
                    paths.extend(secret_headers(spec).into_iter().map(|name| format!("spec.headers.{name}")));
                }
            }
        }
        Hidden(paths)
    }

    fn contains(&self, path: &str) -> bool {
        (path.starts_with("spec.secrets[") && path.ends_with("].value")) || self.0.iter().any(|p| p == path)
    }

    fn show(&self, path: &str, value: &Value) -> String {
        if self.contains(path) {
            REDACTED.to_owned()
        } else {
            value.to_string()
        }
    }
}

/// What changed from `before` to `after`, two documents of `kind` (`{"metadata", "spec"}`,
/// or `{}` for none), one line per changed leaf: `~ path: old → new`, `+ path: new`,
/// `- path: old`. A secret is hidden on both sides if either side hides it.
pub fn diff(kind: Kind, before: &Value, after: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    let hidden = Hidden::of(kind, [before, after]);
    diff_in(&hidden, before, after, "", &mut lines);
    lines
}

fn diff_in(hidden: &Hidden, before: &Value, after: &Value, path: &str, lines: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff_in(hidden, x, y, &child, lines),
                    (Some(x), None) => changed(hidden, '-', x, &child, lines),
                    (None, Some(y)) => changed(hidden, '+', y, &child, lines),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let child = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => diff_in(hidden, x, y, &child, lines),
                    (Some(x), None) => changed(hidden, '-', x, &child, lines),
                    (None, Some(y)) => changed(hidden, '+', y, &child, lines),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a == b => {}
        (a, b) => {
            if hidden.contains(path) {
                lines.push(format!("~ {path}: {REDACTED} → {REDACTED} (changed)"));
            } else {
                lines.push(format!("~ {path}: {} → {}", a, b));
            }
        }
    }
}

fn leaves(hidden: &Hidden, value: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaves(hidden, v, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                leaves(hidden, v, &format!("{path}[{i}]"), out);
            }
        }
        leaf => out.push((path.to_owned(), hidden.show(path, leaf))),
    }
}

/// The lines of a subtree that was added (`+`) or removed (`-`).
fn changed(hidden: &Hidden, sign: char, value: &Value, path: &str, lines: &mut Vec<String>) {
    let mut out = Vec::new();
    leaves(hidden, value, path, &mut out);
    lines.extend(out.into_iter().map(|(p, v)| format!("{sign} {p}: {v}")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_added_and_removed_leaves_are_listed_with_paths() {
        let before =
            json!({"spec": {"url": "https://a", "timeout": "10s", "headers": {"X-A": "1"}, "plainHeaders": ["x-a"]}});
        let after = json!({"spec": {"url": "https://b", "paused": true, "headers": {}}});
        assert_eq!(
            diff(Kind::Endpoint, &before, &after),
            vec![
                "- spec.headers.X-A: \"1\"",
                "+ spec.paused: true",
                "- spec.plainHeaders[0]: \"x-a\"",
                "- spec.timeout: \"10s\"",
                "~ spec.url: \"https://a\" → \"https://b\"",
            ]
        );
    }

    #[test]
    fn secret_values_never_appear() {
        let before = json!({"spec": {"secrets": [{"value": "whsec_old"}]}});
        let after = json!({"spec": {"secrets": [{"value": "whsec_new"}, {"value": "whsec_added"}]}});
        let text = diff(Kind::Endpoint, &before, &after).join("\n");
        assert!(!text.contains("whsec_"), "{text}");
        assert!(text.contains("(changed)"));
        let mut spec = json!({"secrets": [{"value": "whsec_x"}, {"valueFrom": {"env": "X"}}]});
        redact(Kind::Endpoint, &mut spec);
        assert_eq!(spec["secrets"][0]["value"], REDACTED);
        assert_eq!(spec["secrets"][1]["valueFrom"]["env"], "X");
    }

    #[test]
    fn header_values_are_hidden_unless_plain_on_both_sides() {
        let mut spec = json!({"headers": {"Authorization": "Bearer t", "X-Team": "ops"}, "plainHeaders": ["x-team"]});
        redact(Kind::Endpoint, &mut spec);
        assert_eq!(spec["headers"], json!({"Authorization": REDACTED, "X-Team": "ops"}));
        // Made secret by the change: neither side is shown.
        let before = json!({"spec": {"headers": {"X-Team": "ops"}, "plainHeaders": ["X-Team"]}});
        let after = json!({"spec": {"headers": {"X-Team": "Bearer t", "X-New": "n"}}});
        assert_eq!(
            diff(Kind::Endpoint, &before, &after),
            vec![
                "+ spec.headers.X-New: (redacted)",
                "~ spec.headers.X-Team: (redacted) → (redacted) (changed)",
                "- spec.plainHeaders[0]: \"X-Team\"",
            ]
        );
        // Other kinds have no secrets.
        let budget = json!({"spec": {"headers": {"A": "b"}}});
        assert_eq!(diff(Kind::RetryBudget, &json!({}), &budget), vec!["+ spec.headers.A: \"b\""]);
    }
}
