//! Request extraction that answers every bad input with the API's error shape.
//!
//! The body is checked in this order: media type (415), size (413), JSON syntax (400
//! `malformed_json`, with line and column), then shape (400 `validation_failed`, with the
//! field path), then text: no string or key anywhere in a JSON body holds a NUL character
//! (400 `validation_failed`, with its path), since no database column of text can hold one.
//! Path and query parameters are held to the same in [`super::text`], the token's claims
//! in [`crate::auth`].

use axum::body::Body;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use super::error::{ApiError, FieldError};
use super::AppState;
use crate::auth::Principal;

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = match parts.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                ApiError::from(crate::auth::AuthError::Invalid("the Authorization header is not ASCII".into()))
            })?),
        };
        Ok(state.keys.authenticate(header)?)
    }
}

/// Whether `Content-Type` names JSON (`application/json` or `application/*+json`).
fn is_json(headers: &HeaderMap) -> bool {
    content_type(headers).is_some_and(crate::cloudevents::is_json_media_type)
}

/// The `Content-Type` header, when it is text.
pub fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

/// Reads a JSON request body of at most `limit` bytes.
pub async fn read_json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType(
            "the request body must be JSON: send `Content-Type: application/json`",
        ));
    }
    read_body(headers, body, limit).await
}

/// Reads a request body of at most `limit` bytes, whatever its media type (the caller
/// checked it).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(_) => Err(ApiError::BadRequest("the request body could not be read".into())),
    }
}

/// Parses `bytes` as `T`; errors name the line and column, or the field path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    parse_json_at(bytes, "")
}

/// Like [`parse_json`] for a value found at `prefix` (e.g. `[3]`) inside the body.
pub fn parse_json_at<T: DeserializeOwned>(bytes: &[u8], prefix: &str) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| json_error(e, prefix))?;
    deserializer.end().map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if let Some(path) = super::strict_json::find_nul(bytes, prefix) {
        return Err(ApiError::Validation(vec![FieldError::new(path, super::text::NUL_MESSAGE)]));
    }
    Ok(value)
}

/// Parses a JSON object as `T`. serde would also fill a struct from an array, by
/// position; an API that names its fields must not.
pub fn parse_object_at<T: DeserializeOwned>(bytes: &[u8], prefix: &str) -> Result<T, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let path = if prefix.is_empty() { "(body)" } else { prefix };
        // Syntax errors first, so that broken JSON is reported as such.
        parse_json_at::<serde::de::IgnoredAny>(bytes, prefix)?;
        return Err(ApiError::Validation(vec![FieldError::new(path, "must be a JSON object")]));
    }
    parse_json_at(bytes, prefix)
}

/// A shape error names the field (a missing one by its own name) in plain words (see
/// [`crate::messages`]); a syntax error is malformed JSON.
fn json_error(e: serde_path_to_error::Error<serde_json::Error>, prefix: &str) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            let path = match (prefix, path.as_str()) {
                (prefix, ".") => prefix.to_owned(),
                ("", path) => path.to_owned(),
                (prefix, path) => format!("{prefix}.{path}"),
            };
            let (path, message) = crate::messages::field_error(&path, &strip_position(&inner.to_string()));
            let path = if path.is_empty() { "(body)".to_owned() } else { path };
            ApiError::Validation(vec![FieldError::new(path, message)])
        }
        _ => ApiError::MalformedJson(inner.to_string()),
    }
}

/// serde_json appends " at line L column C" to data errors; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Query-string extractor whose rejections use the API's error shape.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::Validation(vec![FieldError::new("(query)", rejection.body_text())])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Thing {
        items: Vec<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        count: u32,
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_by_its_path() {
        let err = parse_json::<Thing>(br#"{"items":[{"count":1},{"count":"x"}]}"#).unwrap_err();
        match err {
            ApiError::Validation(errors) => assert_eq!(errors[0].path, "items[1].count"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_missing_field_is_named_by_its_own_path() {
        let err = parse_json_at::<Thing>(br#"{"items":[{"count":1},{}]}"#, "[2]").unwrap_err();
        match err {
            ApiError::Validation(errors) => {
                assert_eq!((errors[0].path.as_str(), errors[0].message.as_str()), ("[2].items[1].count", "is required"))
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = parse_json::<Thing>(b"{}").unwrap_err();
        assert!(matches!(&err, ApiError::Validation(e) if e[0].path == "items"), "{err:?}");
    }

    #[test]
    fn an_ill_typed_field_is_told_in_words_without_its_value() {
        let err = parse_json::<Thing>(br#"{"items":[{"count":"s3cret"}]}"#).unwrap_err();
        match err {
            ApiError::Validation(errors) => {
                assert_eq!(errors[0].message, "must be a whole number from 0 to 4294967295, not a text", "{errors:?}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn broken_json_is_malformed_with_its_position() {
        let err = parse_json::<Thing>(b"{\"items\": [\n}").unwrap_err();
        assert!(matches!(&err, ApiError::MalformedJson(m) if m.contains("line 2")), "{err:?}");
    }

    #[test]
    fn trailing_garbage_is_malformed() {
        assert!(matches!(parse_json::<Thing>(br#"{"items":[]} x"#), Err(ApiError::MalformedJson(_))));
    }
}
