//! CloudEvents 1.0 rules that ingest and delivery share: attribute names and bounds, media
//! types (what a `datacontenttype` may be, which JSON), and the percent-encoding of attribute values in the `ce-` headers of the
//! HTTP binding's binary mode.
//!
//! Invariants: an attribute name is 1 to [`MAX_NAME`] lowercase ASCII letters or digits
//! (the specification's MUST, with our bound on length); a value written into a header by
//! [`encode_header_value`] is visible ASCII, so it always makes a valid header value, and
//! [`decode_header_value`] gives it back unchanged.
//!
//! Pure: no I/O.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::Value;

/// The only `specversion` Hookwarden reads and writes.
pub const SPECVERSION: &str = "1.0";

/// The longest attribute name taken (the specification asks for at most 20; a sender may
/// go over, so the bound is looser).
pub const MAX_NAME: usize = 64;

/// At most this many other attributes (`dataschema`, extensions) per event.
pub const MAX_ATTRIBUTES: usize = 32;

/// The longest value of one other attribute, in bytes of its text.
pub const MAX_VALUE: usize = 1024;

/// Whether `name` may name an attribute: 1 to [`MAX_NAME`] of `a-z` and `0-9`.
pub fn is_attribute_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// What the HTTP binding (3.1.3.2) has percent-encoded in a header value: space, `"` and
/// `%`, besides controls and everything beyond ASCII (which `utf8_percent_encode` always
/// encodes).
const HEADER_UNSAFE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// `value` as a `ce-` header value: percent-encoded UTF-8, visible ASCII only.
pub fn encode_header_value(value: &str) -> String {
    utf8_percent_encode(value, HEADER_UNSAFE).to_string()
}

/// The attribute value a `ce-` header carries (percent-decoded); `None` when the decoded
/// bytes are not UTF-8.
pub fn decode_header_value(value: &str) -> Option<String> {
    percent_decode_str(value).decode_utf8().ok().map(|text| text.into_owned())
}

/// An attribute value as the text of a header: a string as it is, a number or a boolean
/// in its JSON form.
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Whether `content_type` names JSON: `application/json` or `application/*+json`, with or
/// without parameters, in any case.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Whether `text` is a media type as HTTP writes one (RFC 9110 8.3.1): `type/subtype`, each
/// a token, then any `; name=value` parameters (a token, or a quoted string of visible
/// ASCII, space and tab), with optional spaces or tabs around each `;`. Such a text is
/// always a valid header value: no control character, nothing beyond ASCII.
pub fn is_media_type(text: &str) -> bool {
    let essence = text.split(';').next().unwrap_or("");
    let Some((kind, subtype)) = essence.trim_end_matches([' ', '\t']).split_once('/') else { return false };
    if !is_token(kind) || !is_token(subtype) {
        return false;
    }
    // Quoted strings may hold `;`: the parameters are read from the rest as a whole.
    let mut rest = &text.as_bytes()[essence.len()..];
    while let [b';', after @ ..] = rest {
        rest = skip_whitespace(after);
        if rest.is_empty() || rest[0] == b';' {
            continue;
        }
        let name_len = rest.iter().take_while(|b| is_token_byte(**b)).count();
        let (name, after) = rest.split_at(name_len);
        let [b'=', value @ ..] = after else { return false };
        if name.is_empty() {
            return false;
        }
        let value_len = match value.first() {
            Some(b'"') => match quoted_len(value) {
                Some(n) => n,
                None => return false,
            },
            _ => value.iter().take_while(|b| is_token_byte(**b)).count(),
        };
        if value_len == 0 {
            return false;
        }
        rest = skip_whitespace(&value[value_len..]);
    }
    rest.is_empty()
}

/// `tchar` of RFC 9110 5.6.2.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(is_token_byte)
}

fn skip_whitespace(bytes: &[u8]) -> &[u8] {
    let n = bytes.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
    &bytes[n..]
}

/// The length of the quoted string `bytes` starts with, quotes included; `None` when it is
/// not closed or holds a control character or a byte beyond ASCII.
fn quoted_len(bytes: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return Some(i + 1),
            b'\\' => {
                let next = *bytes.get(i + 1)?;
                if !(next == b'\t' || (b' '..=b'~').contains(&next)) {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' '..=b'~' => i += 1,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_media_type_is_type_slash_subtype_with_token_or_quoted_parameters() {
        for good in [
            "application/json",
            "Application/JSON",
            "application/vnd.shop.order+json",
            "application/json; charset=utf-8",
            "application/json;charset=utf-8;  x=\"a; \\\"b\\\" c\"",
            "application/json ; charset=utf-8 ",
            "text/plain",
        ] {
            assert!(is_media_type(good), "{good:?}");
        }
        for bad in [
            "",
            "application",
            "application/",
            "/json",
            " application/json",
            "application /json",
            "application/json\n",
            "application/json\r\nX-Injected: 1",
            "application/json; x=\u{1}",
            "application/json; x=\"\u{1}\"",
            "application/json; x=\"open",
            "application/json; x=",
            "application/json; =y",
            "application/json; x",
            "application/json; x=a b",
            "application/jsön",
            "application/json; x=\"ü\"",
            "application/json\u{7f}",
        ] {
            assert!(!is_media_type(bad), "{bad:?}");
        }
    }

    #[test]
    fn attribute_names_are_lowercase_letters_and_digits() {
        assert!(is_attribute_name("namespace"));
        assert!(is_attribute_name("traceparent2"));
        assert!(!is_attribute_name(""));
        assert!(!is_attribute_name("Tenant"));
        assert!(!is_attribute_name("data_base64"));
        assert!(!is_attribute_name("a-b"));
        assert!(!is_attribute_name(&"a".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn header_values_are_percent_encoded_as_the_http_binding_says_and_decode_back() {
        let value = "Grüße, \"world\" 100%";
        let encoded = encode_header_value(value);
        assert_eq!(encoded, "Gr%C3%BC%C3%9Fe,%20%22world%22%20100%25");
        assert!(encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        assert_eq!(decode_header_value(&encoded).as_deref(), Some(value));
        assert_eq!(decode_header_value("2026-12-04T10:00:00Z").as_deref(), Some("2026-12-04T10:00:00Z"));
        assert_eq!(decode_header_value("%FF"), None, "not UTF-8");
    }

    #[test]
    fn json_media_types_are_json_and_its_structured_suffix() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/vnd.shop+json"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type("application/xml"));
        assert!(!is_json_media_type(""));
    }
}
