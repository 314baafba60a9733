//! The HTTP API: routes, shared state, and the fallbacks that keep every answer in the
//! documented error shape.
//!
//! Routes are registered through [`Routes`], which records each `(method, path)` as it adds
//! it; `tests/openapi.rs` compares that table with `openapi.yaml`, so the spec and the
//! router cannot drift apart.

pub mod approvals;
pub mod audit;
pub mod cloudevents;
pub mod deliveries;
pub mod endpoints;
pub mod error;
pub mod event_types;
pub mod events;
pub mod extract;
mod health;
pub mod namespaces;
pub mod resources;
pub mod strict_json;
pub mod text;

use std::sync::Arc;

use axum::handler::Handler;
use axum::http::{Method, Uri};
use axum::routing::{on, MethodFilter};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKeys;
use crate::ingest::Ingestor;
use crate::store::Store;
pub use error::{ApiError, FieldError};

/// Limits the handlers enforce.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    pub max_batch_items: usize,
    /// Deepest nesting of one event's JSON (see [`strict_json`]).
    pub max_json_depth: usize,
    pub apply: crate::resources::ApplyLimits,
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub ingestor: Ingestor,
    pub keys: TokenKeys,
    pub config: Arc<ApiConfig>,
    /// Cancelled when the server begins to shut down; `/readyz` then answers 503.
    pub shutdown: CancellationToken,
    /// Where validation runs (private URLs allowed? secret sources readable?).
    pub checks: crate::resources::validate::Checks,
    pub controller: crate::controller::SharedStatus,
    /// Whether this process leads now (shown by `/readyz`).
    pub leadership: crate::controller::leadership::Leadership,
    /// The database's health as last probed (`/readyz` answers from it at once).
    pub health: crate::store::DatabaseHealth,
    /// The endpoints and filters in force, for fan-out.
    pub catalog: crate::catalog::CatalogHandle,
    /// Wakes the delivery workers (new or replayed work).
    pub wake: Arc<tokio::sync::Notify>,
    /// The checkpoint verifier key (`name+id+base64`), published with every checkpoint.
    pub audit_public_key: Arc<String>,
    /// Wakes the status reconciler (this process's; other processes hear
    /// [`crate::store::Store::notify_status`]).
    pub status_changed: Arc<tokio::sync::Notify>,
    /// The threads that read apply bodies (see [`crate::threads`]).
    pub reading: crate::threads::Pool,
}

impl AppState {
    /// Resources or endpoint state changed: status is due, here and on the leader.
    pub async fn status_changed(&self) {
        self.status_changed.notify_one();
        if let Err(e) = self.store.notify_status().await {
            tracing::warn!(error = %e, "could not signal the status reconciler of other processes; it resyncs");
        }
    }
}

/// A router that remembers which `(method, path)` pairs it serves.
pub struct Routes {
    router: Router<AppState>,
    table: Vec<(Method, &'static str)>,
}

impl Routes {
    fn new() -> Self {
        Self { router: Router::new(), table: Vec::new() }
    }

    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("routes use standard methods");
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, path));
        self
    }
}

fn routes() -> Routes {
    Routes::new()
        .add(Method::GET, "/healthz", health::healthz)
        .add(Method::GET, "/readyz", health::readyz)
        .add(Method::GET, "/metrics", health::metrics)
        .add(Method::POST, "/v1/events", events::create)
        .add(Method::GET, "/v1/events", events::list)
        .add(Method::POST, "/v1/events/batch", events::create_batch)
        .add(Method::GET, "/v1/events/{id}", events::get)
        .add(Method::GET, "/v1/event-types", event_types::list)
        .add(Method::GET, "/v1/event-types/{namespace}/{name}", event_types::get)
        .add(Method::GET, "/v1/deliveries", deliveries::list)
        .add(Method::POST, "/v1/deliveries/replay", deliveries::replay_many)
        .add(Method::GET, "/v1/deliveries/{id}", deliveries::get)
        .add(Method::POST, "/v1/deliveries/{id}/replay", deliveries::replay)
        .add(Method::GET, "/v1/endpoints/{namespace}/{name}/health", endpoints::health)
        .add(Method::POST, "/v1/endpoints/{namespace}/{name}/enable", endpoints::enable)
        .add(Method::GET, "/v1/approvals", approvals::list)
        .add(Method::GET, "/v1/approvals/{id}", approvals::get)
        .add(Method::POST, "/v1/approvals/{id}/grant", approvals::grant)
        .add(Method::POST, "/v1/approvals/{id}/deny", approvals::deny)
        .add(Method::GET, "/v1/audit", audit::page)
        .add(Method::GET, "/v1/audit/export", audit::export)
        .add(Method::GET, "/v1/audit/checkpoint", audit::checkpoint)
        .add(Method::POST, "/v1/apply", resources::apply_resources)
        .add(Method::GET, "/v1/resources/{kind}", resources::list_resources)
        .add(Method::GET, "/v1/resources/{kind}/{namespace}/{name}", resources::get_resource)
        .add(Method::DELETE, "/v1/resources/{kind}/{namespace}/{name}", resources::delete_resource)
        .add(Method::GET, "/v1/namespaces", namespaces::list)
        .add(Method::GET, "/v1/namespaces/{name}", namespaces::get)
        .add(Method::DELETE, "/v1/namespaces/{name}", namespaces::remove)
}

/// Every `(method, path)` the router serves, paths in OpenAPI template form.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().table
}

/// The application router over `state`.
pub fn router(state: AppState) -> Router {
    routes()
        .router
        // Every route's parameters are text the stores can hold (see `text`).
        .route_layer(axum::middleware::from_fn(text::refuse_invalid_text))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(state)
}

/// `hookwarden_http_requests_total{route, method, status}` and request latency, by route
/// template (never the raw path: label values stay a bounded set).
async fn count_requests(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("hookwarden_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("hookwarden_http_request_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    response
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound { method: method.to_string(), path: uri.path().to_owned() }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
