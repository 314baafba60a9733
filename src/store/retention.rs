//! Retention: deleting what namespaces keep no longer, in bounded batches, and a
//! namespace's usage (what it holds) for `GET /v1/namespaces`.
//!
//! Each statement is written once (see [`super::sql`]). Invariants:
//! - an event is deleted only with its deliveries and their attempts, and only when every
//!   delivery of it is final (`delivered`, `failed`, `dead`, `denied`) and none has an
//!   approval request or spend entry (the records those keep stay whole): a waiting,
//!   retrying or held delivery keeps its event;
//! - one call deletes at most `limit` rows of each kind per scope, each kind in a short
//!   transaction of its own. The candidates are read first without locks; on PostgreSQL
//!   the deliveries about to go are then locked `FOR UPDATE SKIP LOCKED` (a delivery a
//!   replay holds is skipped, not waited for), and final deliveries are never claimed, so
//!   neither ingest nor claims wait on a retention batch;
//! - an identity (`event_identities`) is forgotten with the event it names, deleted past
//!   `retention.events`, which is never shorter than the dedup window (checked at apply):
//!   no repeat could be a duplicate of it any more. It has no age index of its own, which
//!   ingest would keep for every event.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::sql::{in_list, sql, PerBackend, Tx};
use super::{Backend, Store, StoreError};
use crate::resources::namespace::Retention;

/// The delivery states that end a delivery (a replay may start it again).
const FINAL: &str = "('delivered', 'failed', 'dead', 'denied')";

/// Which namespaces a [`Scope`] governs.
#[derive(Clone, Debug)]
pub enum Namespaces {
    /// One namespace (it has a Namespace resource).
    Only(String),
    /// Every namespace but these (the ones with a Namespace resource): the defaults.
    AllBut(Vec<String>),
}

/// A set of namespaces and what they keep.
#[derive(Clone, Debug)]
pub struct Scope {
    pub namespaces: Namespaces,
    pub retention: Retention,
}

/// What one call of [`Store::delete_expired`] deleted, by table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    pub events: u64,
    pub deliveries: u64,
    pub attempts: u64,
    pub identities: u64,
}

impl Deleted {
    /// The tables with their counts, for the metric's `table` label.
    pub fn by_table(&self) -> [(&'static str, u64); 4] {
        [
            ("events", self.events),
            ("deliveries", self.deliveries),
            ("delivery_attempts", self.attempts),
            ("event_identities", self.identities),
        ]
    }

    pub fn add(&mut self, other: Deleted) {
        self.events += other.events;
        self.deliveries += other.deliveries;
        self.attempts += other.attempts;
        self.identities += other.identities;
    }
}

/// What a namespace holds now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceUsage {
    /// Events received since `day_start` (the start of the UTC day).
    pub events_today: i64,
    pub events: i64,
    pub deliveries: i64,
    pub attempts: i64,
    /// When the oldest event it holds was received.
    pub oldest_event: Option<DateTime<Utc>>,
    /// Some count reached [`COUNT_CAP`]: it says "at least".
    pub capped: bool,
}

/// The most rows one count of [`Store::namespace_usage`] reads, so that a status read
/// costs bounded time however much a namespace holds.
pub const COUNT_CAP: i64 = 1_000_000;

/// `namespace` in the scope's namespaces, the list bound at `$1`.
fn in_scope(backend: Backend, namespaces: &Namespaces, column: &str) -> String {
    let list = in_list(backend, "$1");
    match namespaces {
        Namespaces::Only(_) => format!("{column} {list}"),
        Namespaces::AllBut(_) => format!("NOT ({column} {list})"),
    }
}

fn scope_list(namespaces: &Namespaces) -> Vec<&str> {
    match namespaces {
        Namespaces::Only(namespace) => vec![namespace.as_str()],
        Namespaces::AllBut(names) => names.iter().map(String::as_str).collect(),
    }
}

/// `now - d`, or 1970 when that is out of range (nothing stored is that old, and both
/// databases hold the time).
fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d).ok().and_then(|d| now.checked_sub_signed(d)).unwrap_or(DateTime::UNIX_EPOCH)
}

/// The row lock PostgreSQL takes on the deliveries a batch deletes.
fn skip_locked(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    }
}

/// Deletes the attempts of `deliveries`, then the deliveries themselves (if still final).
async fn delete_deliveries_in(tx: &mut Tx, deliveries: &[String]) -> Result<(u64, u64), StoreError> {
    let backend = tx.backend();
    let ids: Vec<&str> = deliveries.iter().map(String::as_str).collect();
    let attempts = sql(&format!("DELETE FROM delivery_attempts WHERE delivery_id {}", in_list(backend, "$1")))
        .bind(ids.clone())
        .execute(&mut *tx)
        .await?;
    let deleted = sql(&format!("DELETE FROM deliveries WHERE id {} AND state IN {FINAL}", in_list(backend, "$1")))
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    Ok((deleted, attempts))
}

/// Deletes the identities `($1[i], $2[i], $3[i])` that still name the event `$4[i]`, once
/// that event is gone.
static IDENTITIES_OF_DELETED: PerBackend = PerBackend::new(|backend| match backend {
    Backend::Postgres => "DELETE FROM event_identities i USING UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) \
         AS t(n, s, x, e) WHERE i.namespace = t.n AND i.source = t.s AND i.external_id = t.x AND i.event_id = t.e \
         AND NOT EXISTS (SELECT 1 FROM events WHERE id = t.e)"
        .to_owned(),
    Backend::Sqlite => "DELETE FROM event_identities WHERE (namespace, source, external_id, event_id) IN \
         (SELECT n.value, s.value, x.value, e.value FROM json_each($1) n JOIN json_each($2) s ON s.key = n.key \
         JOIN json_each($3) x ON x.key = n.key JOIN json_each($4) e ON e.key = n.key) \
         AND NOT EXISTS (SELECT 1 FROM events WHERE id = event_identities.event_id)"
        .to_owned(),
});

/// A delivery with no approval request or spend entry: its records need nothing of it.
const UNRECORDED: &str = "NOT EXISTS (SELECT 1 FROM approvals a WHERE a.delivery_id = d.id) \
     AND NOT EXISTS (SELECT 1 FROM spend_ledger s WHERE s.delivery_id = d.id)";

impl Store {
    /// One batch of retention at `now` over `scopes`: per scope, at most `limit` expired
    /// events (with their deliveries and attempts), dead deliveries, attempts and
    /// identities. Call it until a batch deletes fewer than `limit` of each.
    pub async fn delete_expired(
        &self,
        scopes: &[Scope],
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Deleted, StoreError> {
        let mut total = Deleted::default();
        for scope in scopes {
            total.add(self.delete_expired_events(scope, before(now, scope.retention.events), limit).await?);
            total.add(self.delete_dead_letters(scope, before(now, scope.retention.dead_letters), limit).await?);
            total.attempts += self.delete_old_attempts(scope, before(now, scope.retention.attempts), limit).await?;
        }
        Ok(total)
    }

    async fn delete_expired_events(
        &self,
        scope: &Scope,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<Deleted, StoreError> {
        self.observed(async {
            let backend = self.backend();
            // Any expired events, not the oldest first: on PostgreSQL the age index is a
            // BRIN index (cheap for ingest to keep), which finds old rows but does not order.
            // An operational event still in the outbox has no deliveries yet: it stays.
            let candidates: Vec<(String, String, String, String)> = sql(&format!(
                "SELECT e.id, e.namespace, e.source, e.external_id FROM events e WHERE e.received_at < $2 \
                 AND e.status <> 'outbox' AND {} \
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND \
                 (d.state NOT IN {FINAL} OR NOT ({UNRECORDED}))) LIMIT $3",
                in_scope(backend, &scope.namespaces, "e.namespace")
            ))
            .bind(scope_list(&scope.namespaces))
            .bind(cutoff)
            .bind(i64::from(limit))
            .fetch_all(self.reader())
            .await?;
            if candidates.is_empty() {
                return Ok(Deleted::default());
            }
            let events: Vec<&str> = candidates.iter().map(|c| c.0.as_str()).collect();
            let mut tx = self.begin_write().await?;
            let deliveries: Vec<String> = sql(&format!(
                "SELECT d.id FROM deliveries d WHERE d.event_id {} AND d.state IN {FINAL} ORDER BY d.id{}",
                in_list(backend, "$1"),
                skip_locked(backend)
            ))
            .bind(events.clone())
            .scalars(&mut tx)
            .await?;
            let (deleted_deliveries, attempts) = delete_deliveries_in(&mut tx, &deliveries).await?;
            // An event one of whose deliveries is still there (locked by a replay, or
            // started again) stays.
            let deleted_events = sql(&format!(
                "DELETE FROM events WHERE id {} AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)",
                in_list(backend, "$1")
            ))
            .bind(events.clone())
            .execute(&mut tx)
            .await?;
            // The identities that still name a deleted event go with it (by their key, no
            // index of their own to keep at ingest); one another event took over stays.
            let column = |f: fn(&(String, String, String, String)) -> &str| candidates.iter().map(f).collect::<Vec<_>>();
            let identities = sql(IDENTITIES_OF_DELETED.get(backend))
                .bind(column(|c| &c.1))
                .bind(column(|c| &c.2))
                .bind(column(|c| &c.3))
                .bind(events)
                .execute(&mut tx)
                .await?;
            tx.commit().await?;
            Ok(Deleted { events: deleted_events, deliveries: deleted_deliveries, attempts, identities })
        })
        .await
    }

    async fn delete_dead_letters(
        &self,
        scope: &Scope,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<Deleted, StoreError> {
        self.observed(async {
            let backend = self.backend();
            let mut tx = self.begin_write().await?;
            let deliveries: Vec<String> = sql(&format!(
                "SELECT d.id FROM deliveries d WHERE d.state = 'dead' AND d.updated_at < $2 AND {} AND {UNRECORDED} \
                 ORDER BY d.id LIMIT $3{}",
                in_scope(backend, &scope.namespaces, "d.namespace"),
                skip_locked(backend)
            ))
            .bind(scope_list(&scope.namespaces))
            .bind(cutoff)
            .bind(i64::from(limit))
            .scalars(&mut tx)
            .await?;
            if deliveries.is_empty() {
                tx.rollback().await?;
                return Ok(Deleted::default());
            }
            let (deliveries, attempts) = delete_deliveries_in(&mut tx, &deliveries).await?;
            tx.commit().await?;
            Ok(Deleted { deliveries, attempts, ..Deleted::default() })
        })
        .await
    }

    async fn delete_old_attempts(&self, scope: &Scope, cutoff: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
        let text = format!(
            "DELETE FROM delivery_attempts WHERE (delivery_id, attempt) IN (SELECT a.delivery_id, a.attempt \
             FROM delivery_attempts a WHERE a.started_at < $2 AND {} LIMIT $3)",
            in_scope(self.backend(), &scope.namespaces, "a.namespace")
        );
        let delete = sql(&text).bind(scope_list(&scope.namespaces)).bind(cutoff).bind(i64::from(limit));
        self.observed(delete.execute(self.writer())).await
    }

    /// What `namespace` holds: its events since `day_start`, its rows, its oldest event
    /// (the first by id, which is arrival order). Each count reads at most [`COUNT_CAP`]
    /// rows of the namespace's part of an index.
    pub async fn namespace_usage(
        &self,
        namespace: &str,
        day_start: DateTime<Utc>,
    ) -> Result<NamespaceUsage, StoreError> {
        self.observed(async {
            let mut counts = [0i64; 4];
            let tables = [
                ("events WHERE namespace = $1 AND received_at >= $3", Some(day_start)),
                ("events WHERE namespace = $1", None),
                ("deliveries WHERE namespace = $1", None),
                ("delivery_attempts WHERE namespace = $1", None),
            ];
            for (count, (rows, since)) in counts.iter_mut().zip(tables) {
                let text = format!("SELECT COUNT(*) FROM (SELECT 1 FROM {rows} LIMIT $2) AS capped");
                let mut statement = sql(&text).bind(namespace).bind(COUNT_CAP);
                if let Some(since) = since {
                    statement = statement.bind(since);
                }
                let (n,): (i64,) = statement.fetch_one(self.reader()).await?;
                *count = n;
            }
            let [events_today, events, deliveries, attempts] = counts;
            let oldest: Option<(DateTime<Utc>,)> =
                sql("SELECT received_at FROM events WHERE namespace = $1 ORDER BY id LIMIT 1")
                    .bind(namespace)
                    .fetch_optional(self.reader())
                    .await?;
            Ok(NamespaceUsage {
                events_today,
                events,
                deliveries,
                attempts,
                oldest_event: oldest.map(|(t,)| t),
                capped: counts.contains(&COUNT_CAP),
            })
        })
        .await
    }
}
