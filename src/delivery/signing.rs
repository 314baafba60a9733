//! Standard Webhooks signing: `webhook-id`, `webhook-timestamp` and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per active secret).
//!
//! The exact bytes signed are the bytes sent: callers sign the body they will write.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The three headers of a signed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub id: String,
    pub timestamp: i64,
    /// Space-separated `v1,<signature>` entries.
    pub signature: String,
}

/// Signs `body` for message `id` at `timestamp` (Unix seconds) with every secret
/// (raw bytes, already decoded from `whsec_…`).
pub fn sign(id: &str, timestamp: i64, body: &[u8], secrets: &[Vec<u8>]) -> Signature {
    let signatures: Vec<String> = secrets
        .iter()
        .map(|secret| {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect();
    Signature { id: id.to_owned(), timestamp, signature: signatures.join(" ") }
}

/// The body Hookwarden sends: `{"type", "timestamp", "data"}`, `data` being the stored
/// bytes of the event's data, untouched.
pub fn body(event_type: &str, timestamp: &str, data: &str) -> String {
    let event_type = serde_json::to_string(event_type).expect("strings serialize");
    let timestamp = serde_json::to_string(timestamp).expect("strings serialize");
    format!(r#"{{"type":{event_type},"timestamp":{timestamp},"data":{data}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn the_specification_example_signs_as_published() {
        let secret = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signed = sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, &[secret]);
        assert_eq!(signed.signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_secret_signs_during_rotation() {
        let signed = sign("id", 1, b"{}", &[vec![1; 24], vec![2; 24]]);
        assert_eq!(signed.signature.split(' ').count(), 2);
        assert!(signed.signature.split(' ').all(|s| s.starts_with("v1,")));
    }

    #[test]
    fn the_body_embeds_data_byte_for_byte() {
        let b = body("order.created", "2026-11-28T10:00:00Z", r#"{ "total" : 12.50 }"#);
        assert_eq!(b, r#"{"type":"order.created","timestamp":"2026-11-28T10:00:00Z","data":{ "total" : 12.50 }}"#);
        serde_json::from_str::<serde_json::Value>(&b).unwrap();
    }
}
