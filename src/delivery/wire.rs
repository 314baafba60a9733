//! What a delivery's request carries besides its signature: the body, its media type and,
//! for an endpoint with `format: cloudevents`, the event's attributes as the `ce-` headers
//! of CloudEvents binary mode (HTTP binding 3.1).
//!
//! Invariants:
//! - `standard`: the body as built (the `{type, timestamp, data}` envelope or the
//!   transform's result), `Content-Type: application/json`, no `ce-` header;
//! - `cloudevents`: `ce-specversion: 1.0`, `ce-id` (the id the client gave the event, else
//!   Hookwarden's), `ce-source`, `ce-type`, `ce-subject` and `ce-time` when the event has
//!   them, and one `ce-` header per other attribute it came with (`dataschema`,
//!   extensions), every value percent-encoded ([`crate::cloudevents::encode_header_value`]).
//!   The body is the event's `data` byte for byte (its `datacontenttype` as
//!   `Content-Type` when that is JSON, else `application/json`); an event without data
//!   (`null`) has an empty body and no `Content-Type`. With a transform, the body is the
//!   transform's result (`application/json`) and the headers are still the event's;
//! - the body here is the one signed and sent.
//!
//! Pure: no I/O.

use crate::cloudevents::{encode_header_value, is_json_media_type, is_media_type, value_text, SPECVERSION};
use crate::store::ClaimedDelivery;

/// A delivery's request content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub body: String,
    /// `Content-Type`; `None` sends none (an empty body).
    pub content_type: Option<String>,
    /// Further headers (the `ce-` headers), lowercase names.
    pub headers: Vec<(String, String)>,
}

impl Outgoing {
    /// A JSON body and nothing else: the standard format.
    pub fn standard(body: String) -> Outgoing {
        Outgoing { body, content_type: Some("application/json".to_owned()), headers: Vec::new() }
    }

    /// `delivery` in CloudEvents binary mode; `transformed` is the transform's result,
    /// when the endpoint has one, sent as the data.
    pub fn cloudevents(delivery: &ClaimedDelivery, transformed: Option<String>) -> Outgoing {
        let mut headers = vec![
            ("ce-specversion".to_owned(), SPECVERSION.to_owned()),
            ("ce-id".to_owned(), encode_header_value(&delivery.external_id)),
            ("ce-source".to_owned(), encode_header_value(&delivery.source)),
            ("ce-type".to_owned(), encode_header_value(&delivery.event_type)),
        ];
        if let Some(subject) = &delivery.subject {
            headers.push(("ce-subject".to_owned(), encode_header_value(subject)));
        }
        if let Some(time) = delivery.event_time {
            headers.push(("ce-time".to_owned(), time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)));
        }
        for (name, value) in &delivery.attributes {
            headers.push((format!("ce-{name}"), encode_header_value(&value_text(value))));
        }
        let (body, content_type) = match transformed {
            Some(body) => (body, Some("application/json".to_owned())),
            None if delivery.data.trim() == "null" => (String::new(), None),
            // A row stored before ingest checked media types may hold one that is no header
            // value: JSON data then goes as `application/json`.
            None if is_json_media_type(&delivery.content_type) && is_media_type(&delivery.content_type) => {
                (delivery.data.clone(), Some(delivery.content_type.clone()))
            }
            None => (delivery.data.clone(), Some("application/json".to_owned())),
        };
        Outgoing { body, content_type, headers }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::ids::{DeliveryId, EventId};

    fn delivery(data: &str) -> ClaimedDelivery {
        let at = Utc.with_ymd_and_hms(2026, 12, 4, 10, 0, 0).unwrap();
        ClaimedDelivery {
            id: DeliveryId::generate(),
            attempt_base: 0,
            event_id: EventId::generate(),
            namespace: "payments".into(),
            endpoint: "ce".into(),
            attempt: 1,
            lease_token: "t".into(),
            event_type: "order.created".into(),
            data: data.into(),
            content_type: "application/vnd.shop+json".into(),
            external_id: "A 1".into(),
            attributes: [
                ("tenant".to_owned(), serde_json::json!("Grüße")),
                ("priority".to_owned(), serde_json::json!(3)),
            ]
            .into(),
            event_time: Some(at),
            received_at: at,
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            source: "/shop".into(),
            subject: None,
            ingested_by: "shop".into(),
            approved: false,
            ordered: false,
            due_at: at,
            probe: false,
        }
    }

    #[test]
    fn binary_mode_carries_the_attributes_in_headers_and_the_data_as_the_body() {
        let out = Outgoing::cloudevents(&delivery(r#"{ "total" : 12.50 }"#), None);
        assert_eq!(out.body, r#"{ "total" : 12.50 }"#, "byte for byte");
        assert_eq!(out.content_type.as_deref(), Some("application/vnd.shop+json"));
        let headers: Vec<(&str, &str)> = out.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(
            headers,
            [
                ("ce-specversion", "1.0"),
                ("ce-id", "A%201"),
                ("ce-source", "/shop"),
                ("ce-type", "order.created"),
                ("ce-time", "2026-12-04T10:00:00Z"),
                ("ce-priority", "3"),
                ("ce-tenant", "Gr%C3%BC%C3%9Fe"),
            ]
        );
    }

    #[test]
    fn no_data_is_an_empty_body_and_a_transform_gives_the_data() {
        let out = Outgoing::cloudevents(&delivery("null"), None);
        assert_eq!((out.body.as_str(), out.content_type), ("", None));
        let out = Outgoing::cloudevents(&delivery("null"), Some(r#"{"text":"hi"}"#.into()));
        assert_eq!((out.body.as_str(), out.content_type.as_deref()), (r#"{"text":"hi"}"#, Some("application/json")));
        assert!(out.headers.contains(&("ce-type".to_owned(), "order.created".to_owned())));
        let mut plain = delivery("1");
        plain.content_type = "text/plain".into();
        assert_eq!(Outgoing::cloudevents(&plain, None).content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn a_stored_content_type_that_is_no_header_value_is_sent_as_application_json() {
        for stored in ["application/json\n", "application/json; x=\u{1}", "application/vnd.shop+json\r\nX-Injected: 1"]
        {
            let mut old = delivery(r#"{"total":1}"#);
            old.content_type = stored.into();
            let out = Outgoing::cloudevents(&old, None);
            assert_eq!(out.content_type.as_deref(), Some("application/json"), "{stored:?}");
            let value = out.content_type.unwrap();
            assert!(reqwest::header::HeaderValue::from_str(&value).is_ok());
            assert_eq!(out.body, r#"{"total":1}"#, "the data is still sent");
        }
    }
}
