//! The group-commit ingest transaction, shared by both backends.
//!
//! Many HTTP requests are written in one transaction. Within it, the first request to use
//! an idempotency key owns it and later ones replay its result; the first occurrence of a
//! `(namespace, source, external_id)` is inserted and later ones are duplicates of it. The
//! backends supply four set-sized statements ([`IngestTx`]); the decisions are made here,
//! once, so SQLite and PostgreSQL cannot drift apart.
//!
//! Both kinds of duplicate are windowed (each event's `dedup_window`, its namespace's
//! `dedupWindow`): a key first used, or an identity first accepted, longer ago than the
//! window is taken over by the new request or event, which is then new (written, fanned
//! out, delivered again). The window is measured from the first acceptance, by each
//! event's `received_at`, so a test drives it with the times it gives.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{NewEvent, StoreError};
use crate::ids::EventId;

/// An `Idempotency-Key` as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// Whose key it is (the token subject): keys of different callers never collide.
    pub scope: String,
    pub key: String,
    /// Hash of the request the key was first used with.
    pub fingerprint: String,
}

/// One ingest request: one event, or a batch that lands or fails as a whole.
#[derive(Clone, Debug)]
pub struct IngestRequest {
    pub idempotency: Option<IdempotencyKey>,
    pub events: Vec<NewEvent>,
}

/// What happened to one event of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventOutcome {
    /// The stored event's id: the new one, or the original's for a duplicate.
    pub id: EventId,
    pub duplicate: bool,
}

/// What happened to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Written now (items may still be duplicates of earlier events).
    Accepted(Vec<EventOutcome>),
    /// The idempotency key was used before with the same request: its original result.
    Replayed(Vec<EventId>),
    /// The idempotency key was used before with a different request; nothing written.
    KeyReused,
}

/// The result of a group commit whose fan-out was decided by a known resource revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Written: what happened to each request, in order.
    Written(Vec<RequestOutcome>),
    /// Nothing written: the resources in force moved past the revision the fan-out was
    /// decided by. Decide it again by `revision` and retry.
    Stale { revision: i64 },
}

/// An idempotency key to claim: used before `cutoff` (`None`: never), it is free again and
/// is taken over at `at`.
pub(crate) struct KeyClaim<'a> {
    pub key: &'a IdempotencyKey,
    pub at: DateTime<Utc>,
    pub cutoff: Option<DateTime<Utc>>,
}

/// The time before which an identity first accepted is no longer a duplicate of `event`
/// (`None`: it always is).
pub(crate) fn dedup_cutoff(event: &NewEvent) -> Option<DateTime<Utc>> {
    let window = chrono::Duration::from_std(event.dedup_window?).ok()?;
    event.received_at.checked_sub_signed(window)
}

/// `(namespace, source, external_id)`: the CloudEvents identity of an event.
pub(crate) type Identity = (String, String, String);

pub(crate) fn identity(event: &NewEvent) -> Identity {
    (event.namespace.clone(), event.source.clone(), event.external_id.clone())
}

/// A key that existed before this transaction.
pub(crate) struct ExistingKey {
    pub fingerprint: String,
    pub event_ids: Vec<EventId>,
}

/// The statements each backend runs inside its ingest transaction.
pub(crate) trait IngestTx {
    /// Inserts the keys that do not exist yet and takes over those used before their
    /// cutoff; returns the ones that already existed and were not taken over.
    async fn claim_keys(&mut self, keys: &[KeyClaim<'_>])
        -> Result<HashMap<(String, String), ExistingKey>, StoreError>;
    /// Inserts the events whose identity is new, or was first accepted before the event's
    /// [`dedup_cutoff`] (the identity then names the new event); returns the ids of those
    /// inserted.
    async fn insert_events(&mut self, events: &[&NewEvent]) -> Result<HashSet<EventId>, StoreError>;
    /// Inserts the deliveries fan-out decided on for these (newly inserted) events.
    async fn insert_deliveries(&mut self, events: &[&NewEvent]) -> Result<(), StoreError>;
    /// The ids of the events these identities name now.
    async fn find_event_ids(&mut self, identities: &[Identity]) -> Result<HashMap<Identity, EventId>, StoreError>;
    /// Binds each claimed key to the result of its request.
    async fn record_keys(&mut self, results: &[(&IdempotencyKey, Vec<EventId>)]) -> Result<(), StoreError>;
    /// The revision of the resources in force, as this transaction sees it.
    async fn resource_revision(&mut self) -> Result<i64, StoreError>;
    /// Of these events, those still in the outbox of operational events, locked until
    /// the transaction ends (see [`super::operational`]).
    async fn lock_outbox(&mut self, ids: &[&str]) -> Result<HashSet<EventId>, StoreError>;
    /// Takes these events out of the outbox: they are fanned out.
    async fn end_outbox(&mut self, ids: &[&str]) -> Result<(), StoreError>;
}

enum Plan {
    /// Write this request's events.
    Fresh,
    /// Same key and body as an earlier request of this batch: its result.
    SameAs(usize),
    Replay(Vec<EventId>),
    KeyReused,
}

/// Runs the whole ingest decision inside `tx`; the caller commits what is `Written`.
///
/// With `fanned_out_at`, nothing is written unless the resources in force are still at
/// that revision: read inside this transaction, so an apply committed before it began is
/// always seen (read-your-writes across processes).
pub(crate) async fn accept_in<T: IngestTx>(
    tx: &mut T,
    requests: &[IngestRequest],
    fanned_out_at: Option<i64>,
) -> Result<Committed, StoreError> {
    if let Some(expected) = fanned_out_at {
        let revision = tx.resource_revision().await?;
        if revision != expected {
            return Ok(Committed::Stale { revision });
        }
    }
    write_in(tx, requests).await.map(Committed::Written)
}

async fn write_in<T: IngestTx>(tx: &mut T, requests: &[IngestRequest]) -> Result<Vec<RequestOutcome>, StoreError> {
    // 1. Idempotency keys: claim new ones (sorted, so concurrent writers lock in one order).
    let mut first_with_key: HashMap<(&str, &str), usize> = HashMap::new();
    let mut to_claim: Vec<KeyClaim<'_>> = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        if let Some(k) = &request.idempotency {
            if let std::collections::hash_map::Entry::Vacant(slot) = first_with_key.entry((&k.scope, &k.key)) {
                slot.insert(i);
                to_claim.push(key_claim(k, request));
            }
        }
    }
    to_claim.sort_by(|a, b| (&a.key.scope, &a.key.key).cmp(&(&b.key.scope, &b.key.key)));
    let mut existing = if to_claim.is_empty() { HashMap::new() } else { tx.claim_keys(&to_claim).await? };

    let plans: Vec<Plan> = requests
        .iter()
        .enumerate()
        .map(|(i, request)| {
            let Some(k) = &request.idempotency else { return Plan::Fresh };
            if let Some(found) = existing.get(&(k.scope.clone(), k.key.clone())) {
                return if found.fingerprint == k.fingerprint {
                    Plan::Replay(found.event_ids.clone())
                } else {
                    Plan::KeyReused
                };
            }
            let first = first_with_key[&(k.scope.as_str(), k.key.as_str())];
            if first == i {
                Plan::Fresh
            } else if requests[first].idempotency.as_ref().map(|f| &f.fingerprint) == Some(&k.fingerprint) {
                Plan::SameAs(first)
            } else {
                Plan::KeyReused
            }
        })
        .collect();
    existing.clear();

    // 2. Events of fresh requests: the first occurrence of each identity is inserted.
    let mut first_of: HashMap<Identity, &NewEvent> = HashMap::new();
    for (request, plan) in requests.iter().zip(&plans) {
        if matches!(plan, Plan::Fresh) {
            for event in &request.events {
                first_of.entry(identity(event)).or_insert(event);
            }
        }
    }
    let mut candidates: Vec<(&Identity, &NewEvent)> = first_of.iter().map(|(k, v)| (k, *v)).collect();
    candidates.sort_by(|a, b| a.0.cmp(b.0));
    let to_insert: Vec<&NewEvent> = candidates.iter().map(|(_, e)| *e).collect();
    let mut inserted = if to_insert.is_empty() { HashSet::new() } else { tx.insert_events(&to_insert).await? };

    // 3. Identities that were already stored: look up the original ids. One that is gone
    // meanwhile (retention forgot it, past its window, between the claim and the lookup)
    // is claimed again: it is free now.
    let mut stored: HashMap<Identity, EventId> = HashMap::new();
    for round in 0.. {
        let missing: Vec<Identity> = candidates
            .iter()
            .filter(|(k, e)| !inserted.contains(&e.id) && !stored.contains_key(*k))
            .map(|(k, _)| (*k).clone())
            .collect();
        if missing.is_empty() {
            break;
        }
        stored.extend(tx.find_event_ids(&missing).await?);
        let vanished: Vec<&NewEvent> = candidates
            .iter()
            .filter(|(k, e)| !inserted.contains(&e.id) && !stored.contains_key(*k))
            .map(|(_, e)| *e)
            .collect();
        if vanished.is_empty() || round == 3 {
            break;
        }
        inserted.extend(tx.insert_events(&vanished).await?);
    }
    let fanned_out: Vec<&NewEvent> =
        to_insert.iter().copied().filter(|e| inserted.contains(&e.id) && !e.deliveries.is_empty()).collect();
    if !fanned_out.is_empty() {
        tx.insert_deliveries(&fanned_out).await?;
    }

    // 4. Outcomes, in request order; then bind fresh keys to their results.
    let mut outcomes: Vec<RequestOutcome> = Vec::with_capacity(requests.len());
    for (request, plan) in requests.iter().zip(&plans) {
        let outcome = match plan {
            Plan::Replay(ids) => RequestOutcome::Replayed(ids.clone()),
            Plan::KeyReused => RequestOutcome::KeyReused,
            Plan::SameAs(first) => RequestOutcome::Replayed(event_ids(&outcomes[*first])),
            Plan::Fresh => {
                let mut items = Vec::with_capacity(request.events.len());
                for event in &request.events {
                    let key = identity(event);
                    let first = first_of[&key];
                    let item = if inserted.contains(&first.id) {
                        EventOutcome { id: first.id.clone(), duplicate: first.id != event.id }
                    } else {
                        let id = stored.get(&key).cloned().ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "event ({}, {}) was neither inserted nor found",
                                event.source, event.external_id
                            ))
                        })?;
                        EventOutcome { id, duplicate: true }
                    };
                    items.push(item);
                }
                RequestOutcome::Accepted(items)
            }
        };
        outcomes.push(outcome);
    }

    let results: Vec<(&IdempotencyKey, Vec<EventId>)> = requests
        .iter()
        .zip(&plans)
        .zip(&outcomes)
        .filter_map(|((request, plan), outcome)| match (plan, &request.idempotency) {
            (Plan::Fresh, Some(k)) => Some((k, event_ids(outcome))),
            _ => None,
        })
        .collect();
    if !results.is_empty() {
        tx.record_keys(&results).await?;
    }
    Ok(outcomes)
}

/// A request's key, claimed when its events were received; free again before the
/// shortest dedup window of its events (a request with none, or events without a window,
/// keeps the key for as long as it is stored).
fn key_claim<'a>(key: &'a IdempotencyKey, request: &IngestRequest) -> KeyClaim<'a> {
    let at = request.events.iter().map(|e| e.received_at).min().unwrap_or_else(Utc::now);
    let cutoff = request.events.iter().map(dedup_cutoff).try_fold(None::<DateTime<Utc>>, |latest, cutoff| {
        // The latest cutoff is that of the shortest window; an event without one keeps the key.
        cutoff.map(|c| Some(latest.map_or(c, |l| l.max(c))))
    });
    KeyClaim { key, at, cutoff: cutoff.flatten() }
}

fn event_ids(outcome: &RequestOutcome) -> Vec<EventId> {
    match outcome {
        RequestOutcome::Accepted(items) => items.iter().map(|i| i.id.clone()).collect(),
        RequestOutcome::Replayed(ids) => ids.clone(),
        RequestOutcome::KeyReused => Vec::new(),
    }
}

/// Encodes the event ids bound to a key for the `event_ids` column.
pub(crate) fn encode_ids(ids: &[EventId]) -> String {
    serde_json::to_string(ids).expect("a list of strings always serializes")
}

pub(crate) fn decode_ids(raw: Option<&str>) -> Result<Vec<EventId>, StoreError> {
    match raw {
        None => Ok(Vec::new()),
        Some(text) => {
            serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("idempotency key event ids: {e}")))
        }
    }
}
