//! Keeping the catalog true: the periodic job that follows the stored resources and the
//! secrets the catalog could not read yet, and what to do when an endpoint becomes
//! sendable or stops being so.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{CatalogHandle, Transition};
use crate::store::Store;

/// How often the catalog looks for new resources and for secrets that appeared.
pub const FOLLOW_PERIOD: Duration = Duration::from_secs(1);

/// Until `shutdown`: refreshes the catalog when the resources moved (other processes apply
/// too), reads again the secrets it could not, and for each endpoint whose sendability
/// changed says so in the log once (not per event), makes its waiting deliveries due at
/// once when it can be sent to again (`wake`), and wakes the status reconciler
/// (`status_changed`).
pub async fn follow(
    store: Store,
    catalog: CatalogHandle,
    status_changed: Arc<Notify>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(e) = catalog.refresh(&store).await {
            tracing::warn!(error = %e, "could not refresh the catalog");
        }
        if let Err(e) = catalog.recheck_secrets().await {
            tracing::warn!(error = %e, "could not read the endpoints' secrets again");
        }
        let transitions = catalog.take_transitions();
        for t in &transitions {
            act_on(&store, t, &wake).await;
        }
        if !transitions.is_empty() {
            status_changed.notify_one();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = catalog.transitioned() => {}
            _ = tokio::time::sleep(FOLLOW_PERIOD) => {}
        }
    }
}

/// Says what changed (a block, once), and sends what waited for an endpoint that can be
/// sent to now (a block lifted, a pause lifted).
async fn act_on(store: &Store, t: &Transition, wake: &Notify) {
    let (namespace, name) = (&t.namespace, &t.name);
    match (&t.before, &t.after) {
        (_, Some(b)) if t.before.as_ref() != Some(b) => tracing::warn!(endpoint = %name, %namespace,
            reason = b.reason.as_str(), problem = %b.message, "endpoint cannot be sent to; its deliveries wait until it can"),
        (Some(_), None) => tracing::info!(endpoint = %name, %namespace,
            "endpoint can be sent to again; its waiting deliveries go out now"),
        _ => {}
    }
    if t.sendable_again {
        match store.resume_endpoint(namespace, name).await {
            Ok(_) => wake.notify_one(),
            Err(e) => tracing::warn!(error = %e, endpoint = %name, %namespace,
                "could not make the endpoint's waiting deliveries due; they go out at their next look"),
        }
    }
}
