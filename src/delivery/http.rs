//! The HTTP side of an attempt: the client, the signed request, and what came back.
//!
//! Owns the one `reqwest::Client` of the dispatcher. Invariants:
//! - unless private addresses are allowed, no request reaches a private or loopback
//!   address: a literal address in the URL is refused before sending, and names are
//!   resolved by [`GuardedResolver`], which keeps only public addresses, so the check
//!   holds at connect time whatever the name resolved to when the endpoint was applied;
//! - the body comes in built (the standard envelope or the endpoint's transform, in the
//!   endpoint's format, see [`super::attempt`] and [`super::wire`]) and is signed and sent
//!   byte for byte as it came, with the headers it came with;
//! - no redirect is followed and no proxy is used;
//! - an attempt ends within the endpoint's timeout, and at most `delivery.responseBytes` of
//!   the answer are kept, as text every store can hold;
//! - transport errors are reported without the URL (its query may carry credentials).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::guard::{is_private_host, GuardedResolver};
use super::outcome::AttemptResult;
use super::signing;
use super::wire::Outgoing;
use crate::catalog::EndpointEntry;
use crate::store::ClaimedDelivery;

/// Sends deliveries to their endpoints.
pub struct Sender {
    client: reqwest::Client,
    allow_private: bool,
    /// How much of a response body is kept.
    response_bytes: usize,
}

impl Sender {
    /// With `allow_private`, private and loopback addresses may be sent to (tests, local
    /// receivers).
    pub fn new(allow_private: bool, response_bytes: usize) -> Result<Sender, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("Hookwarden/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .build()?;
        Ok(Sender { client, allow_private, response_bytes })
    }

    /// One HTTP request carrying `outgoing`, its body signed: `(result, first bytes of the
    /// response)`.
    pub async fn send(
        &self,
        delivery: &ClaimedDelivery,
        ep: &EndpointEntry,
        outgoing: Outgoing,
    ) -> (AttemptResult, Option<String>) {
        let Outgoing { body, content_type, headers } = outgoing;
        if !self.allow_private {
            if let Ok(url) = reqwest::Url::parse(&ep.spec.url) {
                if let Some(host) = url.host() {
                    if is_private_host(&host) {
                        return (
                            AttemptResult::Transport("the endpoint's address is private or loopback".into()),
                            None,
                        );
                    }
                }
            }
        }
        let now = Utc::now().timestamp();
        let signature = signing::sign(delivery.event_id.as_str(), now, body.as_bytes(), &ep.secrets);
        let span: [u8; 8] = rand::random();
        let mut request = self
            .client
            .post(&ep.spec.url)
            .timeout(ep.timeout)
            .header("webhook-id", &signature.id)
            .header("webhook-timestamp", signature.timestamp.to_string())
            .header("webhook-signature", &signature.signature)
            .header("traceparent", format!("00-{}-{}-01", delivery.trace_id, hex::encode(span)));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        for (name, value) in &ep.spec.headers {
            request = request.header(name, value);
        }
        let response = match tokio::time::timeout(ep.timeout, request.body(body).send()).await {
            Err(_) => return (AttemptResult::Timeout, None),
            Ok(Err(e)) if e.is_timeout() => return (AttemptResult::Timeout, None),
            Ok(Err(e)) => return (AttemptResult::Transport(transport_error(e)), None),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let snippet = read_prefix(response, self.response_bytes).await;
        (AttemptResult::Response { status, retry_after }, snippet)
    }
}

/// The error chain of a failed request, without the URL.
fn transport_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// At most `limit` bytes of the body, as text every store can hold: bytes that are not
/// UTF-8, and NUL characters (which PostgreSQL's `text` refuses, failing the whole batch
/// of completions), read as U+FFFD.
async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Option<String> {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match tokio::time::timeout(Duration::from_secs(2), response.chunk()).await {
            Ok(Ok(Some(chunk))) => bytes.extend_from_slice(&chunk[..chunk.len().min(limit - bytes.len())]),
            _ => break,
        }
    }
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(&bytes).replace('\0', "\u{fffd}"))
}
