//! Error messages for people, where a library's own text speaks Rust.
//!
//! serde describes a mismatch in its own terms (`invalid type: string "x", expected u32`,
//! `expected struct SecretSource`, `missing field `url``). [`field_error`] rewrites such a
//! text in plain words (`must be a whole number from 0 to 4294967295, not a text`) and
//! moves a missing field's name into the field path (`spec.url: is required`), so every
//! reader of resource files, the config file, API bodies and audit exports says the same
//! thing the same way.
//!
//! Invariant: a rewritten type, value or unknown-variant error never repeats the offending
//! value. A value written in the wrong place may be a secret (`secrets: [whsec_…]`, a
//! string where a mapping is expected), so it is described by its kind only ("a text", "a
//! whole number"), or by what is allowed instead. An unknown key is named (a typo is
//! found by its name) only when it reads as a field name ([`reads_as_a_field_name`]):
//! a secret written where a key goes (`{whsec_…: x}`) is not repeated, in the message or
//! in the path. Texts this module does not recognise are passed on unchanged.

/// The message of a missing field, whose name [`field_error`] moves into the path.
pub const REQUIRED: &str = "is required";

/// Rewrites serde's error text `message` (without its " at line L column C" suffix) about
/// the field at `path` (`""` for the top level). Returns the path to report, which names
/// a missing field itself, and the message.
pub fn field_error(path: &str, message: &str) -> (String, String) {
    if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`')) {
        let path = if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") };
        return (path, REQUIRED.to_owned());
    }
    if let Some(key) = message.strip_prefix("duplicate entry with key \"").and_then(|k| k.strip_suffix('"')) {
        if !reads_as_a_field_name(key) {
            return (path.to_owned(), "has a key given twice (not repeated: it may be a secret)".to_owned());
        }
    }
    if unknown_field(message).is_some_and(|(key, _)| !reads_as_a_field_name(key)) {
        if let Some(hidden) = hide_unknown_field(path, message) {
            return hidden;
        }
    }
    (path.to_owned(), plain(message))
}

/// serde's "unknown field" text about the key at the end of `path`, with the key left
/// out of both (the path ends with the key too); `None` for other texts.
pub fn hide_unknown_field(path: &str, message: &str) -> Option<(String, String)> {
    let (key, expected) = unknown_field(message)?;
    let parent = path.strip_suffix(key).map(|p| p.strip_suffix('.').unwrap_or(p)).unwrap_or(path);
    Some((parent.to_owned(), format!("has an unknown field (not repeated: it may be a secret); {expected}")))
}

/// The key and the expectation (`expected …`) of serde's "unknown field" text.
fn unknown_field(message: &str) -> Option<(&str, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    if let Some(key) = rest.strip_suffix("`, there are no fields") {
        return Some((key, "no fields are expected here".to_owned()));
    }
    // The expectation comes from our types and is last; the key may hold anything.
    rest.rsplit_once("`, expected ").map(|(key, expected)| (key, format!("expected {expected}")))
}

/// Whether an unknown key reads as a mistyped field name and may be named back (a typo
/// is found by its name): at most 40 letters, `_` and `-`, as every field name is. Any
/// other key (digits, base64, `whsec_…`) may be a secret written where a key goes.
pub fn reads_as_a_field_name(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 40
        && !key.starts_with("whsec_")
        && key.bytes().all(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'-')
}

/// Rewrites serde's error text (see [`field_error`]) where there is no path to move a
/// missing field into.
pub fn plain(message: &str) -> String {
    let (kind, rest) = if let Some(rest) = message.strip_prefix("invalid type: ") {
        (Mismatch::Type, rest)
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        (Mismatch::Value, rest)
    } else if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`')) {
        return format!("the field `{field}` is required");
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        // The allowed values come from our types and are last; the value may be anything.
        return match rest.rsplit_once("`, expected ") {
            Some((_, expected)) => format!("must be {expected}"),
            None => "is not one of the allowed values".to_owned(),
        };
    } else {
        return message.to_owned();
    };
    // The expectation comes from our types and is last; the value before it may hold
    // anything, ", expected " included.
    let Some((found, expected)) = rest.rsplit_once(", expected ") else {
        return message.to_owned();
    };
    let (expected, found) = (expectation(expected), found_kind(found));
    // A number out of range: naming the range says it all.
    let out_of_range = found == "a whole number" && expected.starts_with("a whole number");
    match kind {
        Mismatch::Type if !out_of_range => format!("must be {expected}, not {found}"),
        Mismatch::Type | Mismatch::Value => format!("must be {expected}"),
    }
}

enum Mismatch {
    /// The value is of the wrong kind (a text where a number belongs).
    Type,
    /// The value is of the right kind but not acceptable (a negative number for a `u32`).
    Value,
}

/// What serde expected, in words: its primitive type names and generic descriptions
/// become plain words; the descriptions our own types give (`expecting`) stay.
fn expectation(expected: &str) -> String {
    let whole = |min: &str, max: &str| format!("a whole number from {min} to {max}");
    match expected {
        "u8" => whole("0", &u8::MAX.to_string()),
        "u16" => whole("0", &u16::MAX.to_string()),
        "u32" => whole("0", &u32::MAX.to_string()),
        "u64" | "usize" => whole("0", &u64::MAX.to_string()),
        "i8" => whole(&i8::MIN.to_string(), &i8::MAX.to_string()),
        "i16" => whole(&i16::MIN.to_string(), &i16::MAX.to_string()),
        "i32" => whole(&i32::MIN.to_string(), &i32::MAX.to_string()),
        "i64" | "isize" => whole(&i64::MIN.to_string(), &i64::MAX.to_string()),
        "an integer" => "a whole number".to_owned(),
        "f32" | "f64" | "a float" => "a number".to_owned(),
        "a boolean" => "`true` or `false`".to_owned(),
        "a string" | "a borrowed string" | "path string" => "a text".to_owned(),
        "a character" | "a char" => "a single character".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a mapping".to_owned(),
        "socket address" => "an address like 127.0.0.1:8080".to_owned(),
        "null" | "unit" => "empty".to_owned(),
        other if other.starts_with("struct ") => "a mapping".to_owned(),
        other if other.starts_with("tuple struct ") || other.starts_with("a tuple of size ") => "a list".to_owned(),
        other if other.starts_with("enum ") || other.starts_with("variant identifier") => {
            "one of the allowed values".to_owned()
        }
        other => other.to_owned(),
    }
}

/// What was found, by kind only: never the value itself (see the module's invariant),
/// except a boolean, which cannot be a secret and reads best as written.
fn found_kind(found: &str) -> &'static str {
    let starts = |prefix: &str| found.starts_with(prefix);
    if starts("string ") {
        "a text"
    } else if starts("integer ") {
        "a whole number"
    } else if starts("floating point ") {
        "a decimal number"
    } else if found == "boolean `true`" {
        "`true`"
    } else if found == "boolean `false`" {
        "`false`"
    } else if starts("character ") {
        "a single character"
    } else if found == "sequence" {
        "a list"
    } else if found == "map" {
        "a mapping"
    } else if found == "unit value" || found == "null" {
        "empty"
    } else if found == "byte array" {
        "binary data"
    } else {
        "a value of another kind"
    }
}

/// The text of a YAML library error about the field at `path`, as [`field_error`] takes
/// it: without the position (callers report the line themselves) and without the
/// library's own, shorter path prefix.
pub fn yaml_text(path: &str, e: &yaml_serde::Error) -> String {
    let mut message = e.to_string();
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.contains(' ') && !path.is_empty() && path.starts_with(prefix) {
            message = rest.to_owned();
        }
    }
    message
}

/// A YAML document's error as `path: message (line N)`, in plain words, for files that
/// are read whole (the config file, policy tests).
pub fn yaml_error(e: serde_path_to_error::Error<yaml_serde::Error>) -> String {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let inner = e.into_inner();
    let (path, message) = field_error(&path, &yaml_text(&path, &inner));
    let line = inner.location().map(|l| format!(" (line {})", l.line())).unwrap_or_default();
    if path.is_empty() {
        format!("{message}{line}")
    } else {
        format!("{path}: {message}{line}")
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, …, `11th`, `21st`.
pub fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_mismatches_are_told_in_words_without_the_value() {
        let cases = [
            (r#"invalid type: string "x", expected u32"#, "must be a whole number from 0 to 4294967295, not a text"),
            ("invalid type: integer `-1`, expected u32", "must be a whole number from 0 to 4294967295"),
            ("invalid value: integer `-1`, expected u32", "must be a whole number from 0 to 4294967295"),
            (
                "invalid type: floating point `1.5`, expected i64",
                "must be a whole number from -9223372036854775808 to 9223372036854775807, not a decimal number",
            ),
            ("invalid type: integer `5`, expected a string", "must be a text, not a whole number"),
            ("invalid type: sequence, expected struct Backoff", "must be a mapping, not a list"),
            ("invalid type: map, expected a sequence", "must be a list, not a mapping"),
            (
                "invalid type: boolean `true`, expected usize",
                "must be a whole number from 0 to 18446744073709551615, not `true`",
            ),
            ("invalid type: unit value, expected a string", "must be a text, not empty"),
            ("invalid type: null, expected a boolean", "must be `true` or `false`, not empty"),
            (
                r#"invalid type: string "whsec_abc, expected x", expected a mapping with `value` or `valueFrom`"#,
                "must be a mapping with `value` or `valueFrom`, not a text",
            ),
        ];
        for (serde, plain_words) in cases {
            assert_eq!(plain(serde), plain_words, "{serde}");
        }
    }

    #[test]
    fn an_unknown_variant_is_answered_with_the_allowed_values_only() {
        assert_eq!(
            plain("unknown variant `whsec_abc`, expected one of `full`, `equal`, `none`"),
            "must be one of `full`, `equal`, `none`"
        );
        assert_eq!(plain("unknown variant `a`, expected `x`, expected `hold` or `deny`"), "must be `hold` or `deny`");
    }

    #[test]
    fn a_missing_field_becomes_the_path() {
        assert_eq!(field_error("", "missing field `type`"), ("type".into(), "is required".into()));
        assert_eq!(field_error("[1]", "missing field `type`"), ("[1].type".into(), "is required".into()));
        assert_eq!(field_error("spec", "missing field `url`"), ("spec.url".into(), "is required".into()));
        assert_eq!(plain("missing field `hash`"), "the field `hash` is required");
    }

    #[test]
    fn an_unknown_key_is_named_only_when_it_reads_as_a_field_name() {
        let typo = "unknown field `maxAttempt`, expected one of `maxAttempts`, `backoff`";
        assert_eq!(field_error("spec.maxAttempt", typo), ("spec.maxAttempt".into(), typo.into()));
        for key in ["whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "a.b`, expected `x"] {
            let serde = format!("unknown field `{key}`, expected `value` or `valueFrom`");
            let (path, message) = field_error(&format!("spec.secrets[0].{key}"), &serde);
            assert_eq!(path, "spec.secrets[0]", "{key}");
            assert!(!message.contains(key) && message.ends_with("; expected `value` or `valueFrom`"), "{message}");
        }
        let twice = field_error("spec", "duplicate entry with key \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"");
        assert_eq!(twice, ("spec".into(), "has a key given twice (not repeated: it may be a secret)".into()));
        let (path, message) = field_error("x1", "unknown field `x1`, there are no fields");
        assert_eq!((path.as_str(), message.contains("x1")), ("", false), "{message}");
    }

    #[test]
    fn other_messages_pass_unchanged() {
        let unknown = "unknown field `maxAttempt`, expected one of `maxAttempts`, `backoff`";
        assert_eq!(field_error("spec", unknown), ("spec".into(), unknown.into()));
        assert_eq!(
            plain("`soon` is not a duration like 30s, 5m or 24h"),
            "`soon` is not a duration like 30s, 5m or 24h"
        );
    }

    #[test]
    fn ordinals_read_as_english() {
        let words: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111].into_iter().map(ordinal).collect();
        assert_eq!(words, ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]);
    }
}
