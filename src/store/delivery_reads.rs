//! Reading deliveries for the API and the metrics: one delivery with its attempts, lists,
//! queue depth and counts, and the deliveries of events, one statement per call whatever
//! their number: the deliveries of many events at once (the originals of an ingest
//! request's duplicates), and the deliveries of one event with all their attempts
//! (`GET /v1/events/{id}`).
//!
//! Each statement is written once (see [`super::sql`]); the rows and their conversion are
//! shared (`store::deliveries`).

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};

use super::deliveries::{
    Attempt, AttemptRow, AttemptStats, DeliveryQuery, DeliveryRecord, DeliveryRow, ATTEMPT_COLUMNS, DELIVERY_COLUMNS,
};
use super::sql::{in_list, sql, PerBackend};
use super::{Store, StoreError};
use crate::ids::{DeliveryId, EventId};

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

    pub async fn get_delivery(&self, id: &DeliveryId) -> Result<Option<(DeliveryRecord, Vec<Attempt>)>, StoreError> {
        static GET: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.id = $1"));
        static ATTEMPTS: LazyLock<String> = LazyLock::new(|| {
            format!("SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts a WHERE a.delivery_id = $1 ORDER BY a.attempt")
        });
        self.observed(async {
            let row: Option<DeliveryRow> = sql(&GET).bind(id.as_str()).fetch_optional(self.reader()).await?;
            let Some(row) = row else { return Ok(None) };
            let attempts: Vec<AttemptRow> = sql(&ATTEMPTS).bind(id.as_str()).fetch_all(self.reader()).await?;
            Ok(Some((DeliveryRecord::try_from(row)?, attempts.into_iter().map(Into::into).collect())))
        })
        .await
    }

    pub async fn deliveries_of_event(&self, event: &EventId) -> Result<Vec<DeliveryRecord>, StoreError> {
        static SELECT: LazyLock<String> = LazyLock::new(|| {
            format!("SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.event_id = $1 ORDER BY d.id")
        });
        self.observed(async {
            let rows: Vec<DeliveryRow> = sql(&SELECT).bind(event.as_str()).fetch_all(self.reader()).await?;
            rows.into_iter().map(DeliveryRecord::try_from).collect()
        })
        .await
    }

    /// Deliveries of one namespace, newest first; see [`DeliveryQuery`] (`None` filters
    /// match everything).
    pub async fn list_deliveries(&self, q: &DeliveryQuery) -> Result<Vec<DeliveryRecord>, StoreError> {
        static LIST: LazyLock<String> = LazyLock::new(|| {
            format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries d WHERE d.namespace = $1 \
                 AND ($2 IS NULL OR d.endpoint = $2) AND ($3 IS NULL OR d.state = $3) AND ($4 IS NULL OR d.id < $4) \
                 AND ($5 IS NULL OR d.created_at >= $5) AND ($6 IS NULL OR d.created_at < $6) \
                 ORDER BY d.id DESC LIMIT $7"
            )
        });
        let list = sql(&LIST)
            .bind(&q.namespace)
            .bind(&q.endpoint)
            .bind(q.state.map(|s| s.as_str()))
            .bind(q.before.as_ref().map(|b| b.as_str()))
            .bind(q.created_since)
            .bind(q.created_until)
            .bind(i64::from(q.limit));
        self.observed(async {
            let rows: Vec<DeliveryRow> = list.fetch_all(self.reader()).await?;
            rows.into_iter().map(DeliveryRecord::try_from).collect()
        })
        .await
    }

    /// Waiting (pending or retrying) deliveries per endpoint: `(namespace, endpoint, count,
    /// oldest created_at)`.
    pub async fn waiting_by_endpoint(&self) -> Result<Vec<(String, String, i64, DateTime<Utc>)>, StoreError> {
        let select = sql("SELECT namespace, endpoint, COUNT(*), MIN(created_at) FROM deliveries \
             WHERE state IN ('pending', 'retrying') GROUP BY namespace, endpoint");
        self.observed(select.fetch_all(self.reader())).await
    }

    /// The attempts at an endpoint since `since`, newest first (at most 100,000 are read).
    pub async fn attempt_stats(
        &self,
        namespace: &str,
        name: &str,
        since: DateTime<Utc>,
    ) -> Result<AttemptStats, StoreError> {
        self.observed(async {
            let rows: Vec<(i64, String)> =
                sql("SELECT duration_ms, outcome FROM delivery_attempts WHERE namespace = $1 AND endpoint = $2 \
                 AND started_at >= $3 ORDER BY started_at DESC LIMIT 100000")
                .bind(namespace)
                .bind(name)
                .bind(since)
                .fetch_all(self.reader())
                .await?;
            Ok(AttemptStats {
                attempts: rows.len() as u64,
                successes: rows.iter().filter(|(_, o)| o == "delivered").count() as u64,
                durations_ms: rows.into_iter().map(|(d, _)| d).collect(),
            })
        })
        .await
    }

    /// Deliveries waiting (pending or retrying) and when the oldest was created.
    pub async fn queue_depth(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        self.observed(async {
            let (count, oldest): (i64, Option<DateTime<Utc>>) =
                sql("SELECT COUNT(*), MIN(created_at) FROM deliveries WHERE state IN ('pending', 'retrying')")
                    .fetch_one(self.reader())
                    .await?;
            Ok((count.max(0) as u64, oldest))
        })
        .await
    }

    /// Counts of deliveries in the states that are still moving. Final states grow without
    /// bound and are counted by the attempt counters instead, so this stays cheap however
    /// much history the table holds.
    pub async fn delivery_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let select = sql("SELECT state, COUNT(*) FROM deliveries \
             WHERE state IN ('pending', 'retrying', 'delivering', 'held') GROUP BY state");
        self.observed(select.fetch_all(self.reader())).await
    }
}
