//! Error messages about secret sources never repeat what was written in them.
//!
//! Invariant: a message about a field within `spec.secrets` names only the fields a
//! secret source has (`value`, `valueFrom`, `env`, `file`) and what is allowed; its path
//! stops at the last of those fields. Whatever else was written there (a secret as a key,
//! a duplicate key, a value of the wrong kind) may be the secret itself.

/// The field names of a secret source, the only words a message about one may quote.
const SECRET_SOURCE_FIELDS: [&str; 4] = ["value", "valueFrom", "env", "file"];

/// Within `spec.secrets`, a key or value the types do not know may be a secret written in
/// the wrong place (`secrets: [{whsec_…: x}]` makes the secret a key): the path stops at
/// the last field a secret source has, and a message quoting anything but those fields is
/// replaced by one that names what is allowed.
pub(super) fn conceal_in_secrets(path: String, message: String) -> (String, String) {
    if path.strip_prefix("spec.secrets").is_none_or(|r| !r.is_empty() && !r.starts_with('[')) {
        return (path, message);
    }
    let (path, message) = crate::messages::hide_unknown_field(&path, &message).unwrap_or((path, message));
    let rest = &path["spec.secrets".len()..];
    // `spec.secrets`, then `[N]`, then `.value` or `.valueFrom`, then `.env` or `.file`.
    let mut known = "spec.secrets".len();
    let index = rest.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(n, _)| n);
    if let Some(index) = index.filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
        known += index.len() + 2;
        for fields in [["valueFrom", "value"], ["env", "file"]] {
            let after = &path[known..];
            let is_next = |f: &str| {
                after
                    .strip_prefix('.')
                    .and_then(|a| a.strip_prefix(f))
                    .is_some_and(|a| a.is_empty() || a.starts_with('.'))
            };
            let Some(field) = fields.into_iter().find(|f| is_next(f)) else { break };
            known += field.len() + 1;
            if field != "valueFrom" {
                break;
            }
        }
    }
    let shown = path[..known].to_owned();
    let quotes_only_fields = message.split('`').skip(1).step_by(2).all(|q| SECRET_SOURCE_FIELDS.contains(&q));
    if quotes_only_fields && !message.contains('"') && !message.contains('\'') {
        (shown, message)
    } else {
        let allowed = "is not a valid secret source (details not shown: they may hold a secret); it is a mapping with `value`, or `valueFrom` with `env` or `file`";
        (shown, allowed.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{parse_file, ResourceError};

    fn only_error(yaml: &str) -> ResourceError {
        let parsed = parse_file("f.yaml", yaml);
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);
        parsed.errors[0].clone()
    }

    #[test]
    fn a_secret_written_as_a_key_is_never_repeated() {
        let secret = "whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP";
        let cases = [
            (format!("[{{{secret}: x}}]"), "spec.secrets[0]", "expected `value` or `valueFrom`"),
            (format!("[{{value: {secret}, {secret}.x: y}}]"), "spec.secrets[0]", "expected `value` or `valueFrom`"),
            (format!("[{{valueFrom: {{{secret}: x}}}}]"), "spec.secrets[0].valueFrom", "expected `env` or `file`"),
            (format!("[{{valueFrom: {{env: [{secret}]}}}}]"), "spec.secrets[0].valueFrom.env", "must be a text"),
            (format!("[{{{secret}: x, {secret}: y}}]"), "spec.secrets[0]", "given twice"),
        ];
        for (secrets, path, message) in cases {
            let yaml = format!("apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: e}}\nspec:\n  url: https://e.example.com\n  secrets: {secrets}\n");
            let error = only_error(&yaml);
            assert!(!error.to_string().contains("whsec_"), "{error}");
            assert_eq!(error.path, path, "{error}");
            assert!(error.message.contains(message), "{error}");
        }
        // Elsewhere an unknown field is named: it is how a typo is found.
        let budget = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: b}\nspec:\n  maxAttempt: 5\n  backoff: {base: 1s, max: 1m}\n";
        let error = only_error(budget);
        assert!(error.message.contains("unknown field `maxAttempt`"), "{error}");
    }

    #[test]
    fn a_path_inside_a_secret_source_is_cut_at_its_last_known_field() {
        for (path, shown) in [
            ("spec.secrets", "spec.secrets"),
            ("spec.secrets[3]", "spec.secrets[3]"),
            ("spec.secrets[3].valueFrom.file", "spec.secrets[3].valueFrom.file"),
            ("spec.secrets[3].valueFrom.env.x", "spec.secrets[3].valueFrom.env"),
            ("spec.secrets[3].valueFromX", "spec.secrets[3]"),
            ("spec.secrets[3].value.whsec_x", "spec.secrets[3].value"),
            ("spec.secrets[x]", "spec.secrets"),
            ("spec.secretsX", "spec.secretsX"),
        ] {
            assert_eq!(conceal_in_secrets(path.into(), "is required".into()).0, shown, "{path}");
        }
    }
}
