//! Readable differences between a stored resource and a desired one, and redaction of
//! secret values wherever a spec is shown.

use serde_json::Value;

use super::Kind;

/// What a shown secret value is replaced by.
pub const REDACTED: &str = "(redacted)";

/// Replaces every inline secret value of a spec with [`REDACTED`].
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
}

fn is_secret_path(path: &str) -> bool {
    path.starts_with("spec.secrets[") && path.ends_with("].value")
}

fn show(path: &str, value: &Value) -> String {
    if is_secret_path(path) {
        REDACTED.to_owned()
    } else {
        value.to_string()
    }
}

/// One line per changed leaf: `~ path: old → new`, `+ path: new`, `- path: old`.
pub fn diff(before: &Value, after: &Value, path: &str, lines: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff(x, y, &child, lines),
                    (Some(x), None) => removed(x, &child, lines),
                    (None, Some(y)) => added(y, &child, lines),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for i in 0..a.len().max(b.len()) {
                let child = format!("{path}[{i}]");
                match (a.get(i), b.get(i)) {
                    (Some(x), Some(y)) => diff(x, y, &child, lines),
                    (Some(x), None) => removed(x, &child, lines),
                    (None, Some(y)) => added(y, &child, lines),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a == b => {}
        (a, b) => {
            if is_secret_path(path) {
                lines.push(format!("~ {path}: {REDACTED} → {REDACTED} (changed)"));
            } else {
                lines.push(format!("~ {path}: {} → {}", show(path, a), show(path, b)));
            }
        }
    }
}

fn leaves(value: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaves(v, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                leaves(v, &format!("{path}[{i}]"), out);
            }
        }
        leaf => out.push((path.to_owned(), show(path, leaf))),
    }
}

fn removed(value: &Value, path: &str, lines: &mut Vec<String>) {
    let mut out = Vec::new();
    leaves(value, path, &mut out);
    lines.extend(out.into_iter().map(|(p, v)| format!("- {p}: {v}")));
}

fn added(value: &Value, path: &str, lines: &mut Vec<String>) {
    let mut out = Vec::new();
    leaves(value, path, &mut out);
    lines.extend(out.into_iter().map(|(p, v)| format!("+ {p}: {v}")));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_added_and_removed_leaves_are_listed_with_paths() {
        let before = json!({"spec": {"url": "https://a", "timeout": "10s", "headers": {"X-A": "1"}}});
        let after = json!({"spec": {"url": "https://b", "paused": true, "headers": {}}});
        let mut lines = Vec::new();
        diff(&before, &after, "", &mut lines);
        assert_eq!(
            lines,
            vec![
                "- spec.headers.X-A: \"1\"",
                "+ spec.paused: true",
                "- spec.timeout: \"10s\"",
                "~ spec.url: \"https://a\" → \"https://b\"",
            ]
        );
    }

    #[test]
    fn secret_values_never_appear() {
        let before = json!({"spec": {"secrets": [{"value": "whsec_old"}]}});
        let after = json!({"spec": {"secrets": [{"value": "whsec_new"}, {"value": "whsec_added"}]}});
        let mut lines = Vec::new();
        diff(&before, &after, "", &mut lines);
        let text = lines.join("\n");
        assert!(!text.contains("whsec_"), "{text}");
        assert!(text.contains("(changed)"));
        let mut spec = json!({"secrets": [{"value": "whsec_x"}, {"valueFrom": {"env": "X"}}]});
        redact(Kind::Endpoint, &mut spec);
        assert_eq!(spec["secrets"][0]["value"], REDACTED);
        assert_eq!(spec["secrets"][1]["valueFrom"]["env"], "X");
    }
}
