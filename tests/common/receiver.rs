//! A recording HTTP receiver and a Standard Webhooks verifier written from the spec.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::Mac as _;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What a receiver saw of one request.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: String,
    pub answered: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

pub type Script = Arc<dyn Fn(&str, usize) -> (u16, Option<&'static str>, Duration) + Send + Sync>;

/// An HTTP receiver that records every request and answers as scripted per path and
/// per request number on that path.
#[derive(Clone)]
pub struct TestReceiver {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Received>>>,
}

impl TestReceiver {
    pub async fn start(script: Script) -> TestReceiver {
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let recorded = seen.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
            let (seen, script) = (recorded.clone(), script.clone());
            async move {
                let path = uri.path().to_owned();
                let n = seen.lock().unwrap().iter().filter(|r| r.path == path).count();
                let (status, retry_after, delay) = script(&path, n);
                let at = std::time::Instant::now();
                seen.lock().unwrap().push(Received { path, headers, body, answered: status, at });
                tokio::time::sleep(delay).await;
                let mut response: Response = (StatusCode::from_u16(status).unwrap(), "answer").into_response();
                if let Some(value) = retry_after {
                    response.headers_mut().insert("retry-after", value.parse().unwrap());
                }
                response
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestReceiver { addr, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn on(&self, path: &str) -> Vec<Received> {
        self.seen.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect()
    }
}

/// A Standard Webhooks verifier written from the specification: the signed content is
/// `{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256 keyed with the base64-decoded
/// part of the secret after `whsec_`; `webhook-signature` holds space-separated
/// `v1,<base64>` signatures, any one of which may match; timestamps are checked for age.
pub fn verify(secret: &str, headers: &HeaderMap, body: &str) -> Result<(), String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).ok_or(format!("missing {name}"));
    let (id, timestamp, signatures) =
        (header("webhook-id")?, header("webhook-timestamp")?, header("webhook-signature")?);
    let ts: i64 = timestamp.parse().map_err(|_| "bad timestamp")?;
    if (chrono::Utc::now().timestamp() - ts).abs() > 300 {
        return Err("timestamp outside the tolerance".into());
    }
    let key = base64::engine::general_purpose::STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
        .then_some(())
        .ok_or_else(|| "no signature matches".into())
}
