//! The CloudEvents HTTP binding on `POST /v1/events` and `POST /v1/events/batch`: which
//! content mode a request uses ([`Mode`]), and reading an event from each.
//!
//! - **structured**: `Content-Type: application/cloudevents+json`, one event in the JSON
//!   format; `specversion` ("1.0"), `source` and `type` are required (`id` too, by the
//!   specification; without one Hookwarden assigns its own, as for its envelope).
//! - **batched**: `Content-Type: application/cloudevents-batch+json`, a JSON array of such
//!   events, on either route.
//! - **binary**: any `ce-` header; the attributes are `ce-` headers (percent-decoded, see
//!   [`crate::cloudevents`]), the body is `data`, JSON by its `Content-Type`
//!   (`application/json` or `application/*+json`; absent means `application/json`), an
//!   empty body is no data.
//! - otherwise Hookwarden's own envelope (`application/json`), read by
//!   [`super::events::read_event`] as before.
//!
//! Invariants: every attribute is read by one interpreter ([`Attributes::into_event`])
//! whichever carrier it came in, so the modes agree on what they accept; an error names
//! the attribute where it was sent (`type`, `[2].type`, `header:ce-type`); what is not one
//! of Hookwarden's own fields (`dataschema`, extension attributes) is kept, bounded in
//! number and size ([`crate::cloudevents::MAX_ATTRIBUTES`]), as strings, numbers and
//! booleans. Data that is not JSON (`data_base64`, a binary body of another media type, a
//! `datacontenttype` that is not JSON) is refused: Hookwarden stores and forwards JSON.

use std::collections::BTreeMap;

use axum::http::{header, HeaderMap};
use serde_json::value::RawValue;
use serde_json::Value;

use super::error::{ApiError, FieldError};
use super::events::{check_strict, read_items, EventIn};
use super::extract::{content_type, parse_json_at, parse_object_at};
use crate::cloudevents::{self as ce, is_attribute_name, is_json_media_type};
use crate::store::Attributes as Extra;

/// How a request carries its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Hookwarden's own envelope (`application/json`).
    Envelope,
    Structured,
    Binary,
    Batch,
}

pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

impl Mode {
    /// The mode by the HTTP binding's rules: the media type names the structured and
    /// batched modes; any `ce-` header makes the rest binary mode.
    pub fn of(headers: &HeaderMap) -> Mode {
        let essence = content_type(headers)
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .unwrap_or_default();
        if essence == STRUCTURED {
            Mode::Structured
        } else if essence == BATCH {
            Mode::Batch
        } else if headers.keys().any(|name| name.as_str().starts_with("ce-")) {
            Mode::Binary
        } else {
            Mode::Envelope
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Envelope => "envelope",
            Mode::Structured => "structured",
            Mode::Binary => "binary",
            Mode::Batch => "batch",
        }
    }
}

/// Where an event's attributes came from, for the paths of errors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Carrier {
    /// Members of a JSON object (Hookwarden's envelope or the JSON format).
    #[default]
    Body,
    /// `ce-` headers (binary mode); `datacontenttype` is `Content-Type`.
    Headers,
}

/// The path of attribute `name` of the event at `prefix` (`""`, `[2]`) carried by `carrier`.
pub fn attribute_path(carrier: Carrier, prefix: &str, name: &str) -> String {
    match (carrier, prefix) {
        (Carrier::Headers, _) if name == "datacontenttype" => "header:content-type".to_owned(),
        (Carrier::Headers, _) if name == "data" => "data".to_owned(),
        (Carrier::Headers, _) => format!("header:ce-{name}"),
        (Carrier::Body, "") => name.to_owned(),
        (Carrier::Body, prefix) => format!("{prefix}.{name}"),
    }
}

/// An event's attributes by name, each as JSON (a header's value as a JSON string), and
/// the errors found so far.
struct Attributes<'a> {
    members: BTreeMap<String, Box<RawValue>>,
    carrier: Carrier,
    prefix: &'a str,
    errors: Vec<FieldError>,
}

impl Attributes<'_> {
    fn path(&self, name: &str) -> String {
        attribute_path(self.carrier, self.prefix, name)
    }

    fn error(&mut self, name: &str, message: impl Into<String>) {
        let path = self.path(name);
        self.errors.push(FieldError::new(path, message));
    }

    /// An error about the header `ce-{attribute}` itself.
    fn header_error(&mut self, attribute: &str, message: &str) {
        self.errors.push(FieldError::new(format!("header:ce-{attribute}"), message));
    }

    /// Takes the optional text attribute `name` (`null` is absent, as in the JSON format).
    fn text(&mut self, name: &str) -> Option<String> {
        let raw = self.members.remove(name)?;
        match serde_json::from_str::<Option<String>>(raw.get()) {
            Ok(text) => text,
            Err(_) => {
                self.error(name, "must be a string");
                None
            }
        }
    }

    /// Takes the required text attribute `name`.
    fn required(&mut self, name: &str) -> Option<String> {
        let text = self.text(name);
        if text.is_none() && !self.errors.iter().any(|e| e.path == self.path(name)) {
            self.error(name, "is required in a CloudEvent");
        }
        text
    }

    /// Reads the event: the attributes Hookwarden has fields for, `data`, and every other
    /// attribute kept as it came.
    fn into_event(mut self) -> Result<EventIn, ApiError> {
        let specversion = self.required("specversion");
        if specversion.as_deref().is_some_and(|v| v != ce::SPECVERSION) {
            self.error("specversion", "must be \"1.0\", the CloudEvents version Hookwarden reads");
        }
        // CloudEvents requires an `id`; without one, Hookwarden assigns its own, as for
        // its envelope (such an event is never a duplicate).
        let id = self.text("id");
        let source = self.required("source");
        let event_type = self.required("type");
        let subject = self.text("subject");
        let time = self.text("time");
        let namespace = self.text("namespace");
        let datacontenttype = self.text("datacontenttype");
        if datacontenttype.as_deref().is_some_and(|t| !is_json_media_type(t)) {
            self.error(
                "datacontenttype",
                "must be a JSON media type (application/json or application/*+json): Hookwarden stores and forwards JSON data",
            );
        }
        if self.members.remove("data_base64").is_some() {
            self.error(
                "data_base64",
                "binary data is not supported: Hookwarden stores and forwards JSON data; send it as JSON in `data`",
            );
        }
        let data = self.members.remove("data").unwrap_or_else(null);
        let attributes = self.others();
        if !self.errors.is_empty() {
            return Err(ApiError::Validation(self.errors));
        }
        let (Some(source), Some(event_type)) = (source, event_type) else {
            return Err(ApiError::Internal(anyhow::anyhow!("a required attribute was missing without an error")));
        };
        Ok(EventIn {
            id,
            source,
            event_type,
            subject,
            time,
            namespace,
            specversion,
            datacontenttype,
            data,
            attributes,
            carrier: self.carrier,
        })
    }

    /// The attributes left once Hookwarden's own are taken: `dataschema` and extensions,
    /// each a string, a number or a boolean.
    fn others(&mut self) -> Extra {
        let members = std::mem::take(&mut self.members);
        if members.len() > ce::MAX_ATTRIBUTES {
            let path = if self.prefix.is_empty() { "(body)".to_owned() } else { self.prefix.to_owned() };
            self.errors.push(FieldError::new(
                path,
                format!(
                    "has {} attributes besides those Hookwarden reads; at most {} are allowed",
                    members.len(),
                    ce::MAX_ATTRIBUTES
                ),
            ));
            return Extra::new();
        }
        let mut kept = Extra::new();
        for (name, raw) in members {
            if !is_attribute_name(&name) {
                let message =
                    format!("is not a CloudEvents attribute name: 1 to {} lowercase letters and digits", ce::MAX_NAME);
                if self.carrier == Carrier::Headers || crate::messages::reads_as_a_field_name(&name) {
                    self.error(&name, message);
                } else {
                    // A key that does not read as a name may be a secret: not repeated.
                    let path = if self.prefix.is_empty() { "(body)".to_owned() } else { self.prefix.to_owned() };
                    self.errors
                        .push(FieldError::new(path, format!("has a member whose name {message} (not repeated)")));
                }
                continue;
            }
            match serde_json::from_str::<Value>(raw.get()) {
                Ok(Value::Null) => {}
                Ok(Value::String(s)) if s.len() > ce::MAX_VALUE => {
                    self.error(&name, format!("must be at most {} bytes long", ce::MAX_VALUE));
                }
                Ok(value @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => {
                    kept.insert(name, value);
                }
                _ => self.error(&name, "must be a string, a number or a boolean (a CloudEvents attribute value)"),
            }
        }
        kept
    }
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

/// One event in the JSON format at `prefix` of the body (structured mode, or an item of a
/// batch): [`check_strict`], then its members.
pub fn read_structured_at(bytes: &[u8], prefix: &str, max_depth: usize) -> Result<EventIn, ApiError> {
    check_strict(bytes, prefix, max_depth)?;
    let members: BTreeMap<String, Box<RawValue>> = parse_object_at(bytes, prefix)?;
    Attributes { members, carrier: Carrier::Body, prefix, errors: Vec::new() }.into_event()
}

/// The body of a structured-mode request.
pub fn read_structured(bytes: &[u8], max_depth: usize) -> Result<EventIn, ApiError> {
    parse_json_at::<serde::de::IgnoredAny>(bytes, "")?;
    read_structured_at(bytes, "", max_depth)
}

/// The body of a batched-mode request: a JSON array of events in the JSON format.
pub fn read_batch(bytes: &[u8], max_items: usize, max_json_depth: usize) -> Result<Vec<(String, EventIn)>, ApiError> {
    read_items(bytes, max_items, |raw, prefix| read_structured_at(raw, prefix, max_json_depth))
}

/// Refuses a binary-mode request whose body is not JSON, before the body is read.
pub fn check_binary_media_type(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(value) if value.to_str().is_ok_and(is_json_media_type) => Ok(()),
        Some(_) => Err(ApiError::UnsupportedMediaType(
            "in CloudEvents binary mode the body is the event's data, which must be JSON: send `Content-Type: application/json` (or application/*+json)",
        )),
    }
}

/// A binary-mode request: the attributes from its `ce-` headers, the data its body (see
/// [`check_binary_media_type`]).
pub fn read_binary(headers: &HeaderMap, body: &[u8], max_depth: usize) -> Result<EventIn, ApiError> {
    let mut attributes =
        Attributes { members: BTreeMap::new(), carrier: Carrier::Headers, prefix: "", errors: Vec::new() };
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else { continue };
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            attributes.header_error(attribute, "appears more than once; an attribute has one value");
            continue;
        };
        if attribute == "datacontenttype" {
            attributes.header_error(
                attribute,
                "is not used in binary mode: the data's media type is the Content-Type header",
            );
            continue;
        }
        if attribute == "data" {
            attributes.header_error(attribute, "is not an attribute: in binary mode the body is the data");
            continue;
        }
        let text = value.to_str().ok().and_then(ce::decode_header_value);
        let Some(text) = text else {
            attributes.header_error(attribute, "must be visible ASCII, other characters percent-encoded as UTF-8");
            continue;
        };
        if text.contains('\0') {
            attributes.header_error(attribute, super::text::NUL_MESSAGE);
            continue;
        }
        let json = serde_json::value::to_raw_value(&text).expect("strings serialize");
        attributes.members.insert(attribute.to_owned(), json);
    }
    if let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let json = serde_json::value::to_raw_value(value.trim()).expect("strings serialize");
        attributes.members.insert("datacontenttype".to_owned(), json);
    }
    if !body.iter().all(u8::is_ascii_whitespace) {
        parse_json_at::<serde::de::IgnoredAny>(body, "data")?;
        check_strict(body, "data", max_depth)?;
        // JSON that serde_json accepted is UTF-8.
        let text = std::str::from_utf8(body).map_err(|_| ApiError::MalformedJson("the body is not UTF-8".into()))?;
        let data = RawValue::from_string(text.trim().to_owned()).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        attributes.members.insert("data".to_owned(), data);
    }
    attributes.into_event()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(err: ApiError) -> Vec<(String, String)> {
        match err {
            ApiError::Validation(errors) => errors.into_iter().map(|e| (e.path, e.message)).collect(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_mode_is_told_by_the_media_type_then_by_ce_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(Mode::of(&headers), Mode::Envelope);
        headers.insert("content-type", "application/json".parse().unwrap());
        assert_eq!(Mode::of(&headers), Mode::Envelope);
        headers.insert("ce-type", "order.created".parse().unwrap());
        assert_eq!(Mode::of(&headers), Mode::Binary);
        headers.insert("content-type", "Application/CloudEvents+JSON; charset=utf-8".parse().unwrap());
        assert_eq!(Mode::of(&headers), Mode::Structured, "structured mode ignores ce- headers");
        headers.insert("content-type", "application/cloudevents-batch+json".parse().unwrap());
        assert_eq!(Mode::of(&headers), Mode::Batch);
    }

    #[test]
    fn a_structured_event_needs_the_required_attributes_and_keeps_the_others() {
        let err = read_structured(br#"{"type": "a", "data": 1}"#, 64).unwrap_err();
        let found = paths(err);
        for field in ["specversion", "source"] {
            assert!(found.contains(&(field.to_owned(), "is required in a CloudEvent".to_owned())), "{found:?}");
        }
        let event = read_structured(
            br#"{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "dataschema": "https://x/s.json",
                "tenant": "acme", "priority": 3, "sampled": true, "subject": null}"#,
            64,
        )
        .unwrap();
        assert_eq!(event.data.get(), "null", "no data is null data");
        assert_eq!(event.subject, None);
        let kept: Vec<&str> = event.attributes.keys().map(String::as_str).collect();
        assert_eq!(kept, ["dataschema", "priority", "sampled", "tenant"]);
        assert_eq!(event.attributes["priority"], 3);
    }

    #[test]
    fn structured_mode_refuses_what_hookwarden_cannot_carry_by_its_path() {
        let err = read_structured(
            br#"{"specversion": "0.3", "id": "1", "source": "s", "type": "t", "data_base64": "AAE=",
                "datacontenttype": "text/plain", "Tenant": "x", "nested": {"a": 1}}"#,
            64,
        )
        .unwrap_err();
        let found: Vec<String> = paths(err).into_iter().map(|(p, _)| p).collect();
        assert_eq!(found, ["specversion", "datacontenttype", "data_base64", "Tenant", "nested"]);
        let err = read_batch(
            br#"[{"specversion": "1.0", "id": "1", "source": "s", "type": "t"}, {"specversion": "1.0"}]"#,
            10,
            64,
        )
        .unwrap_err();
        let found: Vec<String> = paths(err).into_iter().map(|(p, _)| p).collect();
        assert_eq!(found, ["[1].source", "[1].type"]);
    }

    #[test]
    fn binary_mode_reads_percent_encoded_headers_and_names_them_in_errors() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "A234-1234"),
            ("ce-source", "/shop"),
            ("ce-type", "order.created"),
            ("ce-subject", "Gr%C3%BC%C3%9Fe%20100%25"),
            ("ce-tenant", "acme"),
        ] {
            headers.insert(axum::http::HeaderName::from_static(name), value.parse().unwrap());
        }
        let event = read_binary(&headers, br#" {"total": 1} "#, 64).unwrap();
        assert_eq!(event.subject.as_deref(), Some("Grüße 100%"));
        assert_eq!(event.data.get(), r#"{"total": 1}"#);
        assert_eq!(event.datacontenttype, None, "no Content-Type: JSON by default");
        assert_eq!(event.attributes["tenant"], "acme");
        assert_eq!(event.carrier, Carrier::Headers);
        assert_eq!(read_binary(&headers, b"", 64).unwrap().data.get(), "null", "an empty body is no data");

        headers.remove("ce-type");
        headers.insert("ce-specversion", "2.0".parse().unwrap());
        headers.insert("ce-datacontenttype", "application/json".parse().unwrap());
        headers.insert("ce-bad_name", "x".parse().unwrap());
        headers.insert("ce-emoji", "%F0%9F%98%80%FF".parse().unwrap());
        headers.insert("ce-data", "{}".parse().unwrap());
        let mut found: Vec<String> =
            paths(read_binary(&headers, b"{}", 64).unwrap_err()).into_iter().map(|(p, _)| p).collect();
        found.sort();
        assert_eq!(
            found,
            [
                "header:ce-bad_name",
                "header:ce-data",
                "header:ce-datacontenttype",
                "header:ce-emoji",
                "header:ce-specversion",
                "header:ce-type"
            ]
        );
        assert!(matches!(read_binary(&headers, b"{", 64), Err(ApiError::MalformedJson(_))));
    }

    #[test]
    fn binary_mode_takes_json_media_types_only() {
        let mut headers = HeaderMap::new();
        assert!(check_binary_media_type(&headers).is_ok());
        headers.insert("content-type", "application/vnd.shop.order+json".parse().unwrap());
        assert!(check_binary_media_type(&headers).is_ok());
        headers.insert("content-type", "text/plain".parse().unwrap());
        assert!(matches!(check_binary_media_type(&headers), Err(ApiError::UnsupportedMediaType(_))));
    }
}
