//! Text that every store can hold, for every route at once: path and query parameters are
//! UTF-8 without NUL characters once percent-decoded.
//!
//! PostgreSQL's `text` cannot hold a NUL character and refuses the whole statement that
//! binds one; SQLite stores it. A parameter with one is bad input, refused here with 400
//! `validation_failed` naming the parameter, before any handler (or the token check) sees
//! the request, so both databases answer alike and no route can forget it. A query that
//! is not UTF-8 once decoded (`%FF`) is refused the same way rather than read with
//! replacement characters. JSON bodies are held to the same by
//! [`super::extract::parse_json_at`], the token's claims by [`crate::auth`].
//!
//! Invariant: a request that reaches a handler has UTF-8 path and query parameters
//! without NUL characters.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, FieldError};

/// The message for a text holding a NUL character.
pub const NUL_MESSAGE: &str = "must not contain NUL characters";

const NOT_UTF8_MESSAGE: &str = "must be UTF-8 text once percent-decoded";

/// The middleware (a `route_layer`, so that the route's template is known): refuses a
/// request whose path or query parameters are not text every store can hold.
pub async fn refuse_invalid_text(request: Request, next: Next) -> Response {
    let template = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let uri = request.uri();
    let problem =
        path_problem(template.as_deref().unwrap_or(""), uri.path()).or_else(|| uri.query().and_then(query_problem));
    match problem {
        Some(error) => ApiError::Validation(vec![error]).into_response(),
        None => next.run(request).await,
    }
}

/// The first path parameter of `path` (matched by the route `template`, such as
/// `/v1/approvals/{id}`) that is not UTF-8 or holds a NUL, named as in the template.
fn path_problem(template: &str, path: &str) -> Option<FieldError> {
    let mut names = template.split('/');
    for segment in path.split('/') {
        let name = names.next().unwrap_or("");
        let name = name.strip_prefix('{').and_then(|n| n.strip_suffix('}')).unwrap_or("(path)");
        if let Some(message) = problem_of(&decode(segment, false)) {
            return Some(FieldError::new(name, message));
        }
    }
    None
}

/// The first query parameter of `query` (`a=1&b=2`, `+` for a space) whose name or value
/// is not UTF-8 or holds a NUL, named by its name (or `(query)` when the name is the
/// problem).
fn query_problem(query: &str) -> Option<FieldError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key, true);
        if let Some(message) = problem_of(&key) {
            return Some(FieldError::new("(query)", format!("a parameter name {message}")));
        }
        if let Some(message) = problem_of(&decode(value, true)) {
            return Some(FieldError::new(String::from_utf8_lossy(&key), message));
        }
    }
    None
}

fn problem_of(bytes: &[u8]) -> Option<&'static str> {
    match std::str::from_utf8(bytes) {
        Err(_) => Some(NOT_UTF8_MESSAGE),
        Ok(text) if text.contains('\0') => Some(NUL_MESSAGE),
        Ok(_) => None,
    }
}

/// Percent-decodes `text` (a `%` not followed by two hex digits stays as it is, as axum
/// and serde_urlencoded read it); in a query, `+` is a space.
fn decode(text: &str, query: bool) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = |i: usize| bytes.get(i).and_then(|b| (*b as char).to_digit(16));
        match bytes[at] {
            b'%' => match (hex(at + 1), hex(at + 2)) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    at += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if query => out.push(b' '),
            byte => out.push(byte),
        }
        at += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_or_broken_text_in_a_path_parameter_is_named_by_the_template() {
        let found = |template, path| path_problem(template, path).map(|e| (e.path, e.message));
        assert_eq!(
            found("/v1/approvals/{id}", "/v1/approvals/apr%00x"),
            Some(("id".to_owned(), NUL_MESSAGE.to_owned()))
        );
        assert_eq!(
            found("/v1/resources/{kind}/{namespace}/{name}", "/v1/resources/Endpoint/a%FFb/x"),
            Some(("namespace".to_owned(), NOT_UTF8_MESSAGE.to_owned()))
        );
        assert_eq!(found("/v1/approvals/{id}", "/v1/approvals/caf%C3%A9%20x%"), None);
        assert_eq!(found("", "/v1/x%00"), Some(("(path)".to_owned(), NUL_MESSAGE.to_owned())));
    }

    #[test]
    fn a_nul_or_broken_text_in_a_query_parameter_is_named_by_its_name() {
        let found = |query| query_problem(query).map(|e| (e.path, e.message));
        assert_eq!(found("limit=5&source=a%00b"), Some(("source".to_owned(), NUL_MESSAGE.to_owned())));
        assert_eq!(found("type=%FF"), Some(("type".to_owned(), NOT_UTF8_MESSAGE.to_owned())));
        assert_eq!(found("a%00=1").map(|(path, _)| path).as_deref(), Some("(query)"));
        assert_eq!(found("source=caf%C3%A9+au+lait&&type=a%2Bb&x"), None);
    }
}
