//! Reading the deliveries of events, one statement per call whatever their number: the
//! deliveries of many events at once (the originals of an ingest request's duplicates),
//! and the deliveries of one event with all their attempts (`GET /v1/events/{id}`).
//!
//! Each statement is written once (see [`super::sql`]); the rows and their conversion are
//! shared (`store::deliveries`).

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};

use super::deliveries::{Attempt, AttemptRow, DeliveryRecord, DeliveryRow};
use super::sql::{in_list, sql, PerBackend};
use super::{Store, StoreError};
use crate::ids::EventId;

/// The columns of a [`DeliveryRow`], from `d`.
const DELIVERY_COLUMNS: &str = "d.id, d.event_id, d.namespace, d.endpoint, d.state, d.attempts, d.next_attempt_at, \
     d.ordering_key, d.last_status, d.last_error, d.created_at, d.updated_at, d.completed_at, d.decision";

/// The columns of an [`AttemptRow`], from `a` (`NULL` for a delivery without attempts).
const ATTEMPT_COLUMNS: &str = "a.attempt, a.started_at, a.duration_ms, a.status, a.response, a.error, a.outcome";

/// A delivery with one of its attempts, or with none: a row of `deliveries LEFT JOIN
/// delivery_attempts`.
#[derive(sqlx::FromRow)]
struct DeliveryAttemptRow {
    #[sqlx(flatten)]
    delivery: DeliveryRow,
    attempt: Option<i32>,
    started_at: Option<DateTime<Utc>>,
    duration_ms: Option<i64>,
    status: Option<i32>,
    response: Option<String>,
    error: Option<String>,
    outcome: Option<String>,
}

impl DeliveryAttemptRow {
    /// The attempt of this row, if the delivery has any.
    fn take_attempt(&mut self) -> Result<Option<Attempt>, StoreError> {
        let Some(attempt) = self.attempt else { return Ok(None) };
        let missing =
            || StoreError::Corrupt(format!("attempt {attempt} of delivery {} is incomplete", self.delivery.id));
        Ok(Some(Attempt::from(AttemptRow {
            attempt,
            started_at: self.started_at.ok_or_else(missing)?,
            duration_ms: self.duration_ms.ok_or_else(missing)?,
            status: self.status,
            response: self.response.take(),
            error: self.error.take(),
            outcome: self.outcome.take().ok_or_else(missing)?,
        })))
    }
}

/// The deliveries of one event (`$1`) with their attempts, one row per attempt (or per
/// delivery without any), ordered for [`with_attempts`].
static WITH_ATTEMPTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {DELIVERY_COLUMNS}, {ATTEMPT_COLUMNS} FROM deliveries d \
         LEFT JOIN delivery_attempts a ON a.delivery_id = d.id WHERE d.event_id = $1 ORDER BY d.id, a.attempt"
    )
});

/// Rows ordered by delivery, then attempt, grouped into deliveries with their attempts.
fn with_attempts(rows: Vec<DeliveryAttemptRow>) -> Result<Vec<(DeliveryRecord, Vec<Attempt>)>, StoreError> {
    let mut deliveries: Vec<(DeliveryRecord, Vec<Attempt>)> = Vec::new();
    for mut row in rows {
        let attempt = row.take_attempt()?;
        let same = deliveries.last().is_some_and(|(d, _)| d.id.as_str() == row.delivery.id);
        if !same {
            deliveries.push((DeliveryRecord::try_from(row.delivery)?, Vec::new()));
        }
        if let (Some(attempt), Some((_, attempts))) = (attempt, deliveries.last_mut()) {
            attempts.push(attempt);
        }
    }
    Ok(deliveries)
}

/// The deliveries of each event, by event id, each event's in id order.
fn by_event(rows: Vec<DeliveryRow>) -> Result<HashMap<EventId, Vec<DeliveryRecord>>, StoreError> {
    let mut events: HashMap<EventId, Vec<DeliveryRecord>> = HashMap::new();
    for row in rows {
        let record = DeliveryRecord::try_from(row)?;
        events.entry(record.event_id.clone()).or_default().push(record);
    }
    Ok(events)
}

impl Store {
    /// The deliveries of every event of `events`, by event id, each event's in id order (an
    /// event without deliveries is absent). One statement, however many events.
    pub async fn deliveries_of_events(
        &self,
        events: &[EventId],
    ) -> Result<HashMap<EventId, Vec<DeliveryRecord>>, StoreError> {
        if events.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<&str> = events.iter().map(EventId::as_str).collect();
        static SELECT: PerBackend = PerBackend::new(|backend| {
            format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.event_id {} ORDER BY d.event_id, d.id",
                in_list(backend, "$1")
            )
        });
        let reader = self.reader();
        let select = sql(SELECT.get(reader.backend())).bind(ids);
        let rows: Vec<DeliveryRow> = self.observed(select.fetch_all(reader)).await?;
        by_event(rows)
    }

    /// The deliveries of `event` in id order, each with its attempts in order. One
    /// statement, so the attempts shown are those of the deliveries shown.
    pub async fn deliveries_with_attempts(
        &self,
        event: &EventId,
    ) -> Result<Vec<(DeliveryRecord, Vec<Attempt>)>, StoreError> {
        let rows: Vec<DeliveryAttemptRow> =
            self.observed(sql(&WITH_ATTEMPTS).bind(event.as_str()).fetch_all(self.reader())).await?;
        with_attempts(rows)
    }
}
