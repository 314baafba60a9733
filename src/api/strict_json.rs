//! JSON that means one thing to every reader: no key twice in one object, and nesting
//! bounded.
//!
//! Events are stored and forwarded byte for byte, so what the policy gate judged must be
//! what the receiver reads. A repeated key means different things to different parsers
//! (serde_json keeps the last value, others keep the first), so an object that repeats a
//! key is refused anywhere in an event, `data` included, at any depth (400
//! `duplicate_key`, with the path). Nesting is bounded by `ingest.maxJsonDepth`: `data` is
//! held as raw text, which serde_json skips at any depth, but the readers after us (the
//! fan-out's CEL values, an agent's parser) recurse.
//!
//! [`find_nul`] walks any JSON body the same way for the one thing no database column can
//! hold: a NUL character (`\u0000`) in a string or a key, named by its path.
//!
//! [`check`] and [`find_nul`] are meant for text serde_json has accepted as JSON. On anything else it stops
//! quietly at the first byte it does not expect and leaves the error to the parser; it
//! never panics. It keeps its own stack, so nothing recurses however deep the input.

use std::collections::HashSet;

/// What [`check`] refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// `path` names the repeated key.
    DuplicateKey { path: String },
    /// `path` names the array or object that opens one level too many.
    TooDeep { path: String, limit: usize },
}

enum Frame {
    Object { keys: HashSet<String>, key: Option<String> },
    Array { index: usize },
}

/// What the scanner expects next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Value,
    ValueOrClose,
    Key,
    KeyOrClose,
    Colon,
    CommaOrClose,
}

/// Checks the JSON text `bytes`, whose path in the request is `prefix` (`""` for the body,
/// `[3]` for an item of a batch): no object repeats a key, and arrays and objects nest at
/// most `max_depth` deep (the outermost is depth 1).
pub fn check(bytes: &[u8], prefix: &str, max_depth: usize) -> Result<(), Problem> {
    match scan(bytes, prefix, Rules { max_depth, unique_keys: true, nul: false }) {
        Ok(()) => Ok(()),
        Err(Stop::Problem(problem)) => Err(problem),
        // Not looked for under these rules.
        Err(Stop::Nul(_)) => Ok(()),
    }
}

/// The path of the first string or key of the JSON text `bytes` (at `prefix` in the
/// request) that holds a NUL character, written `\u0000` in JSON (a raw NUL byte is no
/// JSON at all). PostgreSQL's `text` cannot hold one. Cheap when there is none: the
/// structure is only walked when the escape appears somewhere in the text.
pub fn find_nul(bytes: &[u8], prefix: &str) -> Option<String> {
    if !bytes.windows(6).any(|w| w == b"\\u0000") {
        return None;
    }
    match scan(bytes, prefix, Rules { max_depth: usize::MAX, unique_keys: false, nul: true }) {
        Err(Stop::Nul(path)) => Some(path),
        _ => None,
    }
}

/// What a scan looks for.
struct Rules {
    max_depth: usize,
    unique_keys: bool,
    nul: bool,
}

/// Why a scan stopped early.
enum Stop {
    Problem(Problem),
    /// The path of a string or key holding a NUL character.
    Nul(String),
}

fn scan(bytes: &[u8], prefix: &str, rules: Rules) -> Result<(), Stop> {
    let max_depth = rules.max_depth;
    let mut stack: Vec<Frame> = Vec::new();
    let mut want = Want::Value;
    let mut at = 0;
    loop {
        while bytes.get(at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            at += 1;
        }
        let Some(&byte) = bytes.get(at) else { return Ok(()) };
        match (want, byte) {
            (Want::Value | Want::ValueOrClose, b'{' | b'[') => {
                if stack.len() >= max_depth {
                    return Err(Stop::Problem(Problem::TooDeep { path: path(prefix, &stack), limit: max_depth }));
                }
                at += 1;
                if byte == b'{' {
                    stack.push(Frame::Object { keys: HashSet::new(), key: None });
                    want = Want::KeyOrClose;
                } else {
                    stack.push(Frame::Array { index: 0 });
                    want = Want::ValueOrClose;
                }
            }
            (Want::ValueOrClose | Want::KeyOrClose | Want::CommaOrClose, b']' | b'}') => {
                at += 1;
                stack.pop();
                if stack.is_empty() {
                    return Ok(());
                }
                want = Want::CommaOrClose;
            }
            (Want::Value | Want::ValueOrClose, _) => {
                at = match byte {
                    b'"' => match string_end(bytes, at) {
                        Some((_, true)) if rules.nul => return Err(Stop::Nul(value_path(prefix, &stack))),
                        Some((end, _)) => end,
                        None => return Ok(()),
                    },
                    _ => scalar_end(bytes, at),
                };
                if stack.is_empty() {
                    return Ok(());
                }
                want = Want::CommaOrClose;
            }
            (Want::Key | Want::KeyOrClose, b'"') => {
                let Some((end, nul)) = string_end(bytes, at) else { return Ok(()) };
                let Some(key) = decode_key(&bytes[at..end]) else { return Ok(()) };
                at = end;
                if nul && rules.nul {
                    let object = path(prefix, &stack[..stack.len().saturating_sub(1)]);
                    return Err(Stop::Nul(join(&object, &Segment::Key(&key))));
                }
                if let Some(Frame::Object { keys, key: current }) = stack.last_mut() {
                    if rules.unique_keys && !keys.insert(key.clone()) {
                        let object = path(prefix, &stack[..stack.len() - 1]);
                        return Err(Stop::Problem(Problem::DuplicateKey { path: join(&object, &Segment::Key(&key)) }));
                    }
                    *current = Some(key);
                }
                want = Want::Colon;
            }
            (Want::Colon, b':') => {
                at += 1;
                want = Want::Value;
            }
            (Want::CommaOrClose, b',') => {
                at += 1;
                want = match stack.last_mut() {
                    Some(Frame::Array { index }) => {
                        *index += 1;
                        Want::Value
                    }
                    Some(Frame::Object { .. }) => Want::Key,
                    None => return Ok(()),
                };
            }
            // Not JSON: the parser says what is wrong.
            _ => return Ok(()),
        }
    }
}

/// The index just past the string that starts with the quote at `start`, and whether the
/// string holds the escape `\u0000`.
fn string_end(bytes: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut at = start + 1;
    let mut nul = false;
    loop {
        match bytes.get(at)? {
            b'"' => return Some((at + 1, nul)),
            b'\\' => {
                nul |= bytes.get(at + 1..at + 6) == Some(&b"u0000"[..]);
                at += 2;
            }
            _ => at += 1,
        }
    }
}

/// The path of a value inside the innermost frame of `stack`; the body itself is `(body)`.
fn value_path(prefix: &str, stack: &[Frame]) -> String {
    match path(prefix, stack) {
        path if path.is_empty() => "(body)".to_owned(),
        path => path,
    }
}

/// The index just past a number, `true`, `false` or `null` starting at `start`.
fn scalar_end(bytes: &[u8], start: usize) -> usize {
    let mut at = start;
    while bytes.get(at).is_some_and(|b| !matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at.max(start + 1)
}

/// A key as every parser reads it, escapes decoded (`"\u0061"` is `"a"`).
fn decode_key(quoted: &[u8]) -> Option<String> {
    if !quoted.contains(&b'\\') {
        return std::str::from_utf8(quoted.get(1..quoted.len().checked_sub(1)?)?).ok().map(str::to_owned);
    }
    serde_json::from_slice(quoted).ok()
}

enum Segment<'k> {
    Key(&'k str),
    Index(usize),
}

/// `a.b[2].c`; a key that is not a plain name is written `["a.b"]`.
fn join(path: &str, segment: &Segment<'_>) -> String {
    match segment {
        Segment::Index(i) => format!("{path}[{i}]"),
        Segment::Key(key)
            if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            if path.is_empty() {
                (*key).to_owned()
            } else {
                format!("{path}.{key}")
            }
        }
        Segment::Key(key) => format!("{path}[{}]", serde_json::to_string(key).unwrap_or_default()),
    }
}

/// The path of the value the innermost frame of `stack` is at.
fn path(prefix: &str, stack: &[Frame]) -> String {
    stack.iter().fold(prefix.to_owned(), |path, frame| match frame {
        Frame::Object { key: Some(key), .. } => join(&path, &Segment::Key(key)),
        Frame::Object { key: None, .. } => path,
        Frame::Array { index } => join(&path, &Segment::Index(*index)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(json: &str) -> Option<String> {
        match check(json.as_bytes(), "", 64) {
            Err(Problem::DuplicateKey { path }) => Some(path),
            _ => None,
        }
    }

    #[test]
    fn a_repeated_key_is_named_by_its_path_at_any_depth() {
        assert_eq!(
            duplicate(r#"{"data": {"amount_cents": 999999, "amount_cents": 500}}"#).unwrap(),
            "data.amount_cents"
        );
        assert_eq!(duplicate(r#"{"a": [1, {"b": {"c": 1, "c": 2}}]}"#).unwrap(), "a[1].b.c");
        assert_eq!(duplicate(r#"{"source": "x", "source": "y"}"#).unwrap(), "source");
        // The same key after its escapes are decoded, and keys that are not plain names.
        assert_eq!(duplicate(r#"{"d": {"a.b": 1, "a\u002eb": 2}}"#).unwrap(), r#"d["a.b"]"#);
        assert_eq!(duplicate(r#"{"a": {"x": 1}, "b": {"x": 1}, "c": [{"x": 1}, {"x": 2}]}"#), None);
        assert_eq!(duplicate(r#"{"k": "a\"b", "k2": "}", "k3": {}}"#), None, "strings are skipped whole");
    }

    #[test]
    fn nesting_is_refused_at_the_level_over_the_limit() {
        let nested = |n: usize| format!("{{\"data\": {}{}}}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check(nested(3).as_bytes(), "[2]", 4), Ok(()));
        assert_eq!(
            check(nested(4).as_bytes(), "[2]", 4),
            Err(Problem::TooDeep { path: "[2].data[0][0][0]".into(), limit: 4 })
        );
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(check(deep.as_bytes(), "", 64), Err(Problem::TooDeep { limit: 64, .. })));
    }

    #[test]
    fn a_nul_character_is_found_by_its_path_in_values_and_keys() {
        let nul = |json: &str| find_nul(json.as_bytes(), "");
        assert_eq!(nul(r#"{"reason": "a\u0000b"}"#).as_deref(), Some("reason"));
        assert_eq!(nul(r#"{"data": {"k": [1, "x", "\u0000"]}}"#).as_deref(), Some("data.k[2]"));
        assert_eq!(nul(r#"{"data": {"a\u0000b": 1}}"#).as_deref(), Some(r#"data["a\u0000b"]"#));
        assert_eq!(nul(r#""\u0000""#).as_deref(), Some("(body)"));
        assert_eq!(find_nul(br#"{"type": "\u0000"}"#, "[3]").as_deref(), Some("[3].type"));
        // An escaped backslash followed by `u0000` is text, not a NUL; nor is a `\u0001`.
        assert_eq!(nul(r#"{"a": "\\u0000", "b": "\u0001", "c": {"x": 1}, "c2": {"x": 2}}"#), None);
        // Repeated keys and depth are not this function's business.
        assert_eq!(nul(r#"{"a": 1, "a": [[[[[[[[[[1]]]]]]]]]]}"#), None);
    }

    #[test]
    fn anything_that_is_not_json_is_left_to_the_parser() {
        for text in ["", "{", "{\"a\"", "{\"a\": }", "[1,,]", "\"unterminated", "{\"\\", "}}}", "{\"a\":1 \"b\":2}"] {
            assert_eq!(check(text.as_bytes(), "", 64), Ok(()), "{text}");
        }
    }
}
