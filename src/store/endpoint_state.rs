//! The run-time state of endpoints: health (failures, breaker, last success), disabling
//! by a 410, and enabling again.
//!
//! Invariant: an endpoint enabled again (by an operator, or by an apply that changed the
//! spec of one a 410 disabled) has its waiting deliveries due in the same transaction, so
//! nothing stays parked behind a block that is gone; the same transaction writes its
//! `hookwarden.endpoint.enabled` (see [`crate::operational`]). Health is written by completions
//! ([`super::completions`]).

use chrono::{DateTime, Utc};

use super::deliveries::{BlockedEndpoints, EndpointState};
use super::operational::emit_in;
use super::queue::resume_in;
use super::sql::{sql, Tx};
use super::{audit, Store, StoreError};
use crate::audit::NewAuditRecord;
use crate::operational::{OperationalEvent, ENDPOINT_ENABLED, ENDPOINT_SECRET_UNAVAILABLE};

/// The columns of an [`EndpointStateRow`].
const STATE_COLUMNS: &str =
    "consecutive_failures, breaker_open_until, last_success_at, disabled_reason, disabled_generation";

#[derive(sqlx::FromRow)]
struct EndpointStateRow {
    consecutive_failures: i32,
    breaker_open_until: Option<DateTime<Utc>>,
    last_success_at: Option<DateTime<Utc>>,
    disabled_reason: Option<String>,
    disabled_generation: Option<i64>,
}

impl From<EndpointStateRow> for EndpointState {
    fn from(r: EndpointStateRow) -> Self {
        EndpointState {
            consecutive_failures: r.consecutive_failures.max(0) as u32,
            breaker_open_until: r.breaker_open_until,
            last_success_at: r.last_success_at,
            disabled_reason: r.disabled_reason,
            disabled_generation: r.disabled_generation,
        }
    }
}

#[derive(sqlx::FromRow)]
struct NamedEndpointStateRow {
    namespace: String,
    name: String,
    #[sqlx(flatten)]
    state: EndpointStateRow,
}

impl Store {
    pub async fn endpoint_state(&self, namespace: &str, name: &str) -> Result<EndpointState, StoreError> {
        static GET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT {STATE_COLUMNS} FROM endpoint_state WHERE namespace = $1 AND name = $2")
        });
        self.observed(async {
            let row: Option<EndpointStateRow> =
                sql(&GET).bind(namespace).bind(name).fetch_optional(self.reader()).await?;
            Ok(row.map(EndpointState::from).unwrap_or_default())
        })
        .await
    }

    /// An operator's explicit enable (audited as `actor`): clears a 410's disabling, an
    /// open breaker and the failure count, and makes the waiting deliveries due now. Returns
    /// the state before, or `None` when the endpoint was sendable already (nothing written).
    pub async fn enable_endpoint(
        &self,
        namespace: &str,
        name: &str,
        actor: &str,
    ) -> Result<Option<EndpointState>, StoreError> {
        let now = Utc::now();
        let before = self.endpoint_state(namespace, name).await?;
        self.observed(async {
            let mut tx = self.begin_write().await?;
            if !enable_in(&mut tx, namespace, name, None, now).await? {
                tx.rollback().await?;
                return Ok(None);
            }
            let record = NewAuditRecord::new(
                actor,
                "endpoint.enabled",
                namespace,
                format!("Endpoint/{namespace}/{name}"),
                serde_json::json!({"reason": "enabled by an operator", "disabledReason": before.disabled_reason,
                    "breakerOpenUntil": before.breaker_open_until, "consecutiveFailures": before.consecutive_failures}),
            );
            audit::append_in(&mut tx, &[record]).await?;
            tx.commit().await?;
            Ok(Some(before))
        })
        .await
    }

    /// Makes an endpoint's waiting deliveries due now (it became sendable again in this
    /// process, e.g. its secret can be read now); returns how many.
    pub async fn resume_endpoint(&self, namespace: &str, name: &str) -> Result<u64, StoreError> {
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let resumed = resume_in(&mut tx, namespace, name, Utc::now()).await?;
            tx.commit().await?;
            Ok(resumed)
        })
        .await
    }

    /// Records that the endpoint's secret cannot be read (`problem`), and writes its
    /// `hookwarden.endpoint.secret_unavailable`, unless that is recorded already (by this
    /// or another process): told once until [`Store::clear_secret_unavailable`]. True when
    /// it was told now.
    pub async fn mark_secret_unavailable(
        &self,
        namespace: &str,
        name: &str,
        problem: &str,
    ) -> Result<bool, StoreError> {
        let now = Utc::now();
        self.observed(async {
            let mut tx = self.begin_write().await?;
            let marked: Option<i32> = sql("INSERT INTO endpoint_state (namespace, name, secret_unavailable) \
                 VALUES ($1, $2, $3) ON CONFLICT (namespace, name) DO UPDATE SET secret_unavailable = excluded.secret_unavailable \
                 WHERE endpoint_state.secret_unavailable IS NULL RETURNING 1")
            .bind(namespace)
            .bind(name)
            .bind(problem)
            .scalar_optional(&mut tx)
            .await?;
            if marked.is_none() {
                tx.rollback().await?;
                return Ok(false);
            }
            let told = OperationalEvent::endpoint(
                ENDPOINT_SECRET_UNAVAILABLE,
                namespace,
                name,
                serde_json::json!({"problem": problem}),
            );
            emit_in(&mut tx, &[told], now).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    /// The endpoint's secret can be read again: a later failure is told again.
    pub async fn clear_secret_unavailable(&self, namespace: &str, name: &str) -> Result<(), StoreError> {
        let clear = sql("UPDATE endpoint_state SET secret_unavailable = NULL \
             WHERE namespace = $1 AND name = $2 AND secret_unavailable IS NOT NULL")
        .bind(namespace)
        .bind(name);
        self.observed(clear.execute(self.writer())).await.map(|_| ())
    }

    /// The run-time state of every endpoint that has any, by `(namespace, name)`.
    pub async fn list_endpoint_states(&self) -> Result<Vec<(String, String, EndpointState)>, StoreError> {
        static LIST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!("SELECT namespace, name, {STATE_COLUMNS} FROM endpoint_state ORDER BY namespace, name")
        });
        self.observed(async {
            let rows: Vec<NamedEndpointStateRow> = sql(&LIST).fetch_all(self.reader()).await?;
            Ok(rows.into_iter().map(|r| (r.namespace, r.name, r.state.into())).collect())
        })
        .await
    }

    /// Endpoints whose breaker is open now, and those disabled by a 410, counted apart.
    pub async fn count_blocked_endpoints(&self, now: DateTime<Utc>) -> Result<BlockedEndpoints, StoreError> {
        self.observed(async {
            let (breakers_open, disabled): (i64, i64) =
                sql("SELECT COUNT(*) FILTER (WHERE disabled_reason IS NULL AND breaker_open_until > $1), \
                 COUNT(*) FILTER (WHERE disabled_reason IS NOT NULL) FROM endpoint_state")
                .bind(now)
                .fetch_one(self.reader())
                .await?;
            Ok(BlockedEndpoints { breakers_open, disabled })
        })
        .await
    }
}

/// Enables an endpoint again and makes its waiting deliveries due `now`. With
/// `older_than` (an apply that changed its spec), only an endpoint a 410 disabled at an
/// older generation; without it (an operator's explicit enable), also an open breaker and
/// a run of failures are cleared. True when anything changed.
pub(super) async fn enable_in(
    tx: &mut Tx,
    namespace: &str,
    endpoint: &str,
    older_than: Option<i64>,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    const CLEAR: &str = "UPDATE endpoint_state SET disabled_reason = NULL, disabled_generation = NULL, \
         consecutive_failures = 0, breaker_open_until = NULL WHERE namespace = $1 AND name = $2 AND ";
    static OLDER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| format!("{CLEAR}disabled_generation < $3"));
    static BLOCKED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("{CLEAR}(disabled_reason IS NOT NULL OR breaker_open_until IS NOT NULL OR consecutive_failures > 0)")
    });
    let updated = match older_than {
        Some(generation) => sql(&OLDER).bind(namespace).bind(endpoint).bind(generation),
        None => sql(&BLOCKED).bind(namespace).bind(endpoint),
    }
    .execute(&mut *tx)
    .await?;
    if updated == 1 {
        // What waited while it was disabled (or its breaker open) goes out now.
        resume_in(tx, namespace, endpoint, now).await?;
        let by = if older_than.is_some() { "apply" } else { "operator" };
        let told = OperationalEvent::endpoint(ENDPOINT_ENABLED, namespace, endpoint, serde_json::json!({"by": by}));
        emit_in(tx, &[told], now).await?;
    }
    Ok(updated == 1)
}
