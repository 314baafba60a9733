//! The storage conformance suite: every case runs against SQLite and against PostgreSQL.

mod common;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use common::TestDb;
use hookwarden::ids::DeliveryId;
use hookwarden::ids::EventId;
use hookwarden::policy::decision::{DecisionRecord, Outcome, PolicyDecision};
use hookwarden::resources::namespace::Retention;
use hookwarden::resources::{Kind, ResourceKey};
use hookwarden::store::policy::{DecisionWrite, NewApproval, Recorded, SpendReservation, ToRecord};
use hookwarden::store::retention::{Deleted, Namespaces, Scope};
use hookwarden::store::{
    ApplyRequest, Attempt, ClaimedDelivery, Committed, Completion, DeliveryQuery, DeliveryState, DesiredResource,
    EndpointQuota, EventOutcome, EventQuery, EventStatus, IdempotencyKey, IngestRequest, NewDelivery, NewEvent,
    OutboxCommitted, RequestOutcome, Store, StoreError,
};

fn event(namespace: &str, source: &str, external_id: &str) -> NewEvent {
    let id = EventId::generate();
    NewEvent {
        external_id: external_id.to_owned(),
        id,
        namespace: namespace.to_owned(),
        source: source.to_owned(),
        event_type: "order.created".to_owned(),
        subject: Some("order/1".to_owned()),
        time: Some(Utc::now()),
        data: r#"{ "total" : 12.50, "items": [1,2 ,3], "note": "caf\u00e9" }"#.to_owned(),
        content_type: "application/json".to_owned(),
        attributes: Default::default(),
        ingested_by: "tester".to_owned(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
        received_at: Utc::now(),
        deliveries: Vec::new(),
        dedup_window: None,
    }
}

/// An event fanned out to `endpoints` (with an ordering key when given).
fn fanned_out(external_id: &str, endpoints: &[&str], key: Option<&str>) -> NewEvent {
    let mut e = event("default", "shop", external_id);
    e.received_at = Utc::now() - chrono::Duration::seconds(1);
    e.deliveries = endpoints
        .iter()
        .map(|name| NewDelivery {
            id: DeliveryId::generate(),
            endpoint: name.to_string(),
            ordering_key: key.map(str::to_owned),
        })
        .collect();
    e
}

/// A hold no rule in particular decided, as the policy gate records it.
fn held() -> DecisionRecord {
    DecisionRecord::Evaluated(PolicyDecision {
        outcome: Outcome::Hold,
        rule: None,
        reason: "hold".into(),
        rules: Vec::new(),
        revision: String::new(),
        spend: Vec::new(),
        approval: None,
    })
}

/// A pending approval request `id` for the delivery of `event` to `endpoint`, one grant
/// needed, for an hour.
fn approval_request(id: &str, event: &EventId, endpoint: &str) -> NewApproval {
    NewApproval {
        id: id.into(),
        namespace: "default".into(),
        event_id: event.to_string(),
        endpoint: endpoint.into(),
        rule: None,
        reason: "hold".into(),
        action_hash: "h".into(),
        role: "approver".into(),
        quorum: 1,
        on_expiry: "deny".into(),
        expires_at: Utc::now() + chrono::Duration::hours(1),
        requested_by: "tester".into(),
        link: None,
    }
}

fn completion(claim: &ClaimedDelivery, state: DeliveryState, success: bool) -> Completion {
    let now = Utc::now();
    Completion {
        id: claim.id.clone(),
        event_id: claim.event_id.clone(),
        lease_token: claim.lease_token.clone(),
        namespace: claim.namespace.clone(),
        endpoint: claim.endpoint.clone(),
        state,
        next_attempt_at: now,
        attempt: Attempt {
            attempt: claim.attempt,
            started_at: now,
            duration_ms: 5,
            status: Some(if success { 200 } else { 500 }),
            response: Some("ok".into()),
            error: None,
            outcome: if success { "delivered".into() } else { "retry".into() },
        },
        success: Some(success),
        breaker: Some((2, now + chrono::Duration::minutes(5))),
        disable: None,
        decision: None,
        settle_spend: true,
        ordered: claim.ordered,
        audit_outcome: true,
        operational: false,
        failing_at: None,
        dead_letters: None,
        tells: Vec::new(),
    }
}

const LEASE: std::time::Duration = std::time::Duration::from_secs(30);

async fn fan_out_is_written_with_the_event_and_claimed_once(store: &Store) {
    let e = fanned_out("f-1", &["a", "b"], None);
    store.accept_events(&[request(vec![e.clone()])]).await.unwrap();
    // A duplicate of the event creates no second set of deliveries.
    store.accept_events(&[request(vec![fanned_out("f-1", &["a", "b"], None)])]).await.unwrap();
    assert_eq!(store.deliveries_of_event(&e.id).await.unwrap().len(), 2);

    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|c| c.attempt == 1 && c.data == e.data && c.event_type == e.event_type));
    assert!(
        store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap().is_empty(),
        "leased work is not claimed twice"
    );

    // Completion needs the lease; a stale token changes nothing.
    let mut stale = completion(&claimed[0], DeliveryState::Delivered, true);
    stale.lease_token = "not-the-lease".into();
    assert_eq!(store.complete_attempts(&[stale]).await.unwrap().lost, 1, "lost lease reported");
    assert_eq!(
        store.complete_attempts(&[completion(&claimed[0], DeliveryState::Delivered, true)]).await.unwrap().lost,
        0
    );
    let (record, attempts) = store.get_delivery(&claimed[0].id).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Delivered);
    assert_eq!(attempts.len(), 1);
    assert!(record.completed_at.is_some());
}

/// A delivery as the API shows it, to compare what two reads returned.
fn shown(record: &hookwarden::store::DeliveryRecord) -> serde_json::Value {
    serde_json::to_value(record).expect("a delivery serializes")
}

async fn the_deliveries_of_many_events_and_of_one_with_its_attempts_are_read_at_once(store: &Store) {
    let (two, one, none) =
        (fanned_out("r-1", &["a", "b"], None), fanned_out("r-2", &["c"], None), fanned_out("r-3", &[], None));
    store.accept_events(&[request(vec![two.clone(), one.clone(), none.clone()])]).await.unwrap();
    assert!(store.deliveries_of_events(&[]).await.unwrap().is_empty());
    let ids = [two.id.clone(), one.id.clone(), none.id.clone(), two.id.clone()];
    let read = store.deliveries_of_events(&ids).await.unwrap();
    assert_eq!(read.len(), 2, "an event without deliveries is absent");
    for event in [&two, &one] {
        let each: Vec<_> = store.deliveries_of_event(&event.id).await.unwrap().iter().map(shown).collect();
        assert_eq!(read[&event.id].iter().map(shown).collect::<Vec<_>>(), each, "in id order, as read one by one");
    }

    // One delivery of `two` with two attempts, the other claimed but not attempted yet.
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    let first = claimed.iter().find(|c| c.event_id == two.id).expect("a delivery of the event");
    let mut retry = completion(first, DeliveryState::Retrying, false);
    retry.breaker = None;
    store.complete_attempts(&[retry]).await.unwrap();
    let again = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    store.complete_attempts(&[completion(&again[0], DeliveryState::Delivered, true)]).await.unwrap();

    let with_attempts = store.deliveries_with_attempts(&two.id).await.unwrap();
    assert_eq!(with_attempts.len(), 2);
    for (record, attempts) in &with_attempts {
        let (each, each_attempts) = store.get_delivery(&record.id).await.unwrap().unwrap();
        assert_eq!(shown(record), shown(&each));
        assert_eq!(attempts, &each_attempts, "the attempts of {}, in order", record.id);
    }
    let counts: Vec<usize> = with_attempts.iter().map(|(_, a)| a.len()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 2);
    assert!(counts.contains(&0), "a delivery without attempts is shown: {counts:?}");
    assert!(store.deliveries_with_attempts(&none.id).await.unwrap().is_empty());
}

async fn an_expired_lease_makes_the_delivery_claimable_again(store: &Store) {
    store.accept_events(&[request(vec![fanned_out("f-2", &["a"], None)])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), std::time::Duration::from_millis(1), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let later = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(store.release_expired_leases(later).await.unwrap(), 1);
    let again = store.claim_due_deliveries(later, LEASE, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2, "the crashed attempt counts");
    // The first worker's late result is dropped.
    assert_eq!(
        store.complete_attempts(&[completion(&claimed[0], DeliveryState::Delivered, true)]).await.unwrap().lost,
        1
    );
}

async fn an_ordered_lane_releases_one_delivery_at_a_time(store: &Store) {
    let (first, second) = (fanned_out("o-1", &["a"], Some("k")), fanned_out("o-2", &["a"], Some("k")));
    let other = fanned_out("o-3", &["a"], Some("other"));
    store.accept_events(&[request(vec![first.clone()])]).await.unwrap();
    store.accept_events(&[request(vec![second.clone(), other.clone()])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    let ids: Vec<_> = claimed.iter().map(|c| c.event_id.clone()).collect();
    assert_eq!(ids.len(), 2, "one per lane: {ids:?}");
    assert!(ids.contains(&first.id) && ids.contains(&other.id));
    // A retry keeps the lane blocked until it is delivered.
    let first_claim = claimed.iter().find(|c| c.event_id == first.id).unwrap();
    let mut retry_later = completion(first_claim, DeliveryState::Retrying, false);
    retry_later.next_attempt_at = Utc::now() + chrono::Duration::milliseconds(500);
    store.complete_attempts(&[retry_later]).await.unwrap();
    assert!(
        store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap().is_empty(),
        "the lane waits for its retry"
    );
    let retry = store.claim_due_deliveries(Utc::now() + chrono::Duration::seconds(1), LEASE, 10).await.unwrap();
    assert_eq!(retry.iter().map(|c| &c.event_id).collect::<Vec<_>>(), [&first.id]);
    store.complete_attempts(&[completion(&retry[0], DeliveryState::Delivered, true)]).await.unwrap();
    let next = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(next.iter().map(|c| &c.event_id).collect::<Vec<_>>(), [&second.id]);
}

async fn an_open_breaker_holds_an_endpoints_deliveries(store: &Store) {
    store.accept_events(&[request(vec![fanned_out("b-1", &["flaky", "fine"], None)])]).await.unwrap();
    store.accept_events(&[request(vec![fanned_out("b-2", &["flaky"], None)])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    let flaky: Vec<_> = claimed.iter().filter(|c| c.endpoint == "flaky").collect();
    // Two consecutive failures open the breaker (threshold 2 in `completion`).
    let mut failures: Vec<Completion> = flaky.iter().map(|c| completion(c, DeliveryState::Retrying, false)).collect();
    for f in &mut failures {
        f.next_attempt_at = Utc::now() - chrono::Duration::seconds(1);
    }
    store.complete_attempts(&failures).await.unwrap();
    let state = store.endpoint_state("default", "flaky").await.unwrap();
    assert_eq!(state.consecutive_failures, 2);
    let open_until = state.breaker_open_until.expect("the breaker opened");
    assert!(store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap().is_empty(), "nothing claimed while open");
    // The completion that opened it parked the endpoint's waiting deliveries until it closes,
    // so claims do not walk past them meanwhile.
    for f in &failures {
        let (record, _) = store.get_delivery(&f.id).await.unwrap().unwrap();
        assert_eq!(record.next_attempt_at, open_until, "parked until the breaker closes");
    }
    // A delivery that arrives while it is open is parked by the periodic upkeep.
    store.accept_events(&[request(vec![fanned_out("b-3", &["flaky"], None)])]).await.unwrap();
    assert_eq!(store.park_blocked_deliveries(Utc::now()).await.unwrap(), 1);
    assert_eq!(store.park_blocked_deliveries(Utc::now()).await.unwrap(), 0, "parked once");
    let after = Utc::now() + chrono::Duration::minutes(6);
    assert_eq!(store.claim_due_deliveries(after, LEASE, 10).await.unwrap().len(), 3, "claimable once it closes");
}

/// An Endpoint resource `name` whose spec differs by `url`.
fn endpoint_resource(name: &str, url: &str) -> DesiredResource {
    DesiredResource {
        key: ResourceKey { kind: Kind::Endpoint, namespace: "default".into(), name: name.into() },
        labels: Default::default(),
        annotations: Default::default(),
        spec: serde_json::json!({"url": url, "secrets": [{"value": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]}),
    }
}

async fn apply_one(store: &Store, desired: DesiredResource) -> hookwarden::store::ApplyOutcome {
    let request = ApplyRequest { resources: vec![desired], actor: "tester".into(), ..Default::default() };
    store.apply_resources(&request).await.unwrap().remove(0)
}

/// Disables `endpoint` as a 410 does, at `generation`; returns its other, waiting delivery.
async fn disable_by_410(store: &Store, endpoint: &str, generation: i64, tag: &str) -> DeliveryId {
    store.accept_events(&[request(vec![fanned_out(&format!("{tag}-1"), &[endpoint], None)])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    store.accept_events(&[request(vec![fanned_out(&format!("{tag}-2"), &[endpoint], None)])]).await.unwrap();
    let query =
        DeliveryQuery { namespace: "default".into(), endpoint: Some(endpoint.into()), limit: 10, ..Default::default() };
    let listed = store.list_deliveries(&query).await.unwrap();
    let waiting = listed.into_iter().find(|d| d.state == DeliveryState::Pending).unwrap();
    let mut gone = completion(&claimed[0], DeliveryState::Failed, false);
    gone.disable = Some(("the receiver answered 410 Gone".into(), generation));
    assert!(store.complete_attempts(&[gone]).await.unwrap().endpoints_changed, "disabling is reported");
    let (record, _) = store.get_delivery(&waiting.id).await.unwrap().unwrap();
    assert!(record.next_attempt_at > Utc::now() + chrono::Duration::minutes(30), "parked");
    assert!(store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap().is_empty());
    waiting.id
}

async fn a_disabled_endpoint_parks_its_deliveries_until_its_spec_changes(store: &Store) {
    assert_eq!(apply_one(store, endpoint_resource("gone", "https://a.example/hooks")).await.generation, 1);
    let waiting = disable_by_410(store, "gone", 1, "g").await;
    // The same spec again: still disabled, nothing due.
    let unchanged = apply_one(store, endpoint_resource("gone", "https://a.example/hooks")).await;
    assert!(!unchanged.reenabled);
    assert!(store.claim_due_deliveries(Utc::now() + chrono::Duration::seconds(1), LEASE, 10).await.unwrap().is_empty());
    // A new spec (generation 2) enables it in the same transaction and sends what waited.
    let changed = apply_one(store, endpoint_resource("gone", "https://b.example/hooks")).await;
    assert_eq!((changed.generation, changed.reenabled), (2, true));
    assert_eq!(store.endpoint_state("default", "gone").await.unwrap().disabled_reason, None);
    let due = store.claim_due_deliveries(Utc::now() + chrono::Duration::seconds(1), LEASE, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| &d.id).collect::<Vec<_>>(), [&waiting]);
    let chain = store.audit_records("default", 1, i64::MAX, 1000).await.unwrap();
    assert_eq!(chain.iter().filter(|r| r.action == "endpoint.enabled").count(), 1, "the enabling is audited");
}

async fn an_operator_enables_a_disabled_endpoint_without_a_spec_change(store: &Store) {
    apply_one(store, endpoint_resource("gone", "https://a.example/hooks")).await;
    let waiting = disable_by_410(store, "gone", 1, "e").await;
    let before = store.enable_endpoint("default", "gone", "operator-1").await.unwrap().expect("it was disabled");
    assert_eq!(before.disabled_reason.as_deref(), Some("the receiver answered 410 Gone"));
    let due = store.claim_due_deliveries(Utc::now() + chrono::Duration::seconds(1), LEASE, 10).await.unwrap();
    assert_eq!(due.iter().map(|d| &d.id).collect::<Vec<_>>(), [&waiting]);
    assert!(store.enable_endpoint("default", "gone", "operator-1").await.unwrap().is_none(), "nothing to enable");
    let chain = store.audit_records("default", 1, i64::MAX, 1000).await.unwrap();
    let enabled: Vec<_> = chain.iter().filter(|r| r.action == "endpoint.enabled").collect();
    assert_eq!(enabled.len(), 1);
    assert_eq!(enabled[0].actor, "operator-1");
}

/// A transition's operational events wait in the outbox, written with it; they are fanned
/// out once (of two fan-outs at once, one writes) and only at the revision decided by; a
/// delivery of an operational event tells nothing itself.
async fn operational_events_leave_the_outbox_once(store: &Store) {
    let mut owned = endpoint_resource("flaky", "https://a.example/hooks");
    owned.spec["owner"] = serde_json::json!("team-a");
    apply_one(store, owned).await;
    store.accept_events(&[request(vec![fanned_out("o-1", &["flaky"], None)])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    let report = store.complete_attempts(&[completion(&claimed[0], DeliveryState::Dead, false)]).await.unwrap();
    assert_eq!(report.operational_events, 1, "one failure of two opens nothing; the death is told");
    let waiting = store.outbox_events(10).await.unwrap().events;
    assert_eq!(waiting.len(), 1);
    let told = &waiting[0];
    assert_eq!(
        (told.event.event_type.as_str(), told.event.source.as_str()),
        ("hookwarden.delivery.dead", "hookwarden")
    );
    assert_eq!(told.about_endpoint.as_deref(), Some("flaky"));
    let data: serde_json::Value = serde_json::from_str(&told.event.data).unwrap();
    assert_eq!((data["delivery"].as_str(), data["owner"].as_str()), (Some(claimed[0].id.as_str()), Some("team-a")));
    assert_eq!(store.get_event(&told.event.id).await.unwrap().unwrap().status, EventStatus::Outbox);

    let revision = store.resource_revision().await.unwrap();
    let decided = |endpoint: &str| {
        let mut event = told.event.clone();
        event.deliveries =
            vec![NewDelivery { id: DeliveryId::generate(), endpoint: endpoint.into(), ordering_key: None }];
        event
    };
    let stale = store.fan_out_outbox(&[decided("notify")], revision - 1).await.unwrap();
    assert_eq!(stale, OutboxCommitted::Stale { revision });
    assert_eq!(store.outbox_events(10).await.unwrap().events.len(), 1, "nothing written at another revision");
    let (one, two) = ([decided("notify")], [decided("notify")]);
    let (a, b) = tokio::join!(store.fan_out_outbox(&one, revision), store.fan_out_outbox(&two, revision));
    let written: usize = [a.unwrap(), b.unwrap()]
        .into_iter()
        .map(|c| match c {
            OutboxCommitted::Written(ids) => ids.len(),
            stale => panic!("{stale:?}"),
        })
        .sum();
    assert_eq!(written, 1, "fanned out once");
    assert!(store.outbox_events(10).await.unwrap().events.is_empty());
    assert_eq!(store.get_event(&told.event.id).await.unwrap().unwrap().status, EventStatus::Accepted);
    let query =
        DeliveryQuery { namespace: "default".into(), endpoint: Some("notify".into()), limit: 10, ..Default::default() };
    assert_eq!(store.list_deliveries(&query).await.unwrap().len(), 1);

    let notify = store.claim_due_deliveries(Utc::now() + chrono::Duration::seconds(1), LEASE, 10).await.unwrap();
    assert_eq!(notify.len(), 1);
    let mut dead = completion(&notify[0], DeliveryState::Dead, false);
    dead.operational = true;
    dead.breaker = Some((1, Utc::now() + chrono::Duration::minutes(5)));
    let report = store.complete_attempts(&[dead]).await.unwrap();
    assert_eq!(report.operational_events, 0, "its breaker opened and it died, untold");
    assert!(store.endpoint_state("default", "notify").await.unwrap().breaker_open_until.is_some());
    assert!(store.outbox_events(10).await.unwrap().events.is_empty());
}

/// A row of the outbox that does not read as an event (here an id that is not one, first
/// in the outbox's order) is reported with its id and holds up none of the others.
async fn an_outbox_row_that_does_not_read_holds_up_no_other(db: &TestDb) {
    let store = db.store().await;
    let insert = "INSERT INTO events (id, namespace, source, external_id, type, data, content_type, ingested_by, \
         trace_id, received_at, status) VALUES ('0-not-an-id', 'default', 'hookwarden', '0-not-an-id', \
         'hookwarden.delivery.dead', '{}', 'application/json', 'hookwarden', '', $1, 'outbox')";
    use sqlx::Connection as _;
    if db.is_postgres() {
        let mut c = sqlx::PgConnection::connect(&db.url()).await.unwrap();
        sqlx::query(insert).bind(Utc::now()).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
        sqlx::query(insert).bind(Utc::now()).execute(&mut c).await.unwrap();
    }
    apply_one(&store, endpoint_resource("flaky", "https://a.example/hooks")).await;
    store.accept_events(&[request(vec![fanned_out("u-1", &["flaky"], None)])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    store.complete_attempts(&[completion(&claimed[0], DeliveryState::Dead, false)]).await.unwrap();
    let read = store.outbox_events(1).await.unwrap();
    assert!(read.events.is_empty(), "the limit counts the row that does not read");
    let read = store.outbox_events(10).await.unwrap();
    let unreadable: Vec<&str> = read.unreadable.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(unreadable, ["0-not-an-id"]);
    assert_eq!(read.events.len(), 1, "the told death reads all the same");
    let revision = store.resource_revision().await.unwrap();
    let written = store.fan_out_outbox(&[read.events[0].event.clone()], revision).await.unwrap();
    assert_eq!(written, OutboxCommitted::Written(vec![read.events[0].event.id.clone()]));
    let read = store.outbox_events(10).await.unwrap();
    assert!(read.events.is_empty());
    assert_eq!(read.unreadable.len(), 1, "left where it is");
}

async fn every_change_to_the_resources_moves_the_revision_and_ingest_commits_check_it(store: &Store) {
    let start = store.resource_revision().await.unwrap();
    apply_one(store, endpoint_resource("rev", "https://a.example/hooks")).await;
    let applied = store.resource_revision().await.unwrap();
    assert!(applied > start);
    apply_one(store, endpoint_resource("rev", "https://a.example/hooks")).await;
    assert_eq!(store.resource_revision().await.unwrap(), applied, "an unchanged apply is not a change");
    let stale = store.commit_events(&[request(vec![fanned_out("rv-1", &["rev"], None)])], start).await.unwrap();
    assert_eq!(stale, Committed::Stale { revision: applied });
    assert!(store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap().is_empty(), "nothing written");
    let fresh = store.commit_events(&[request(vec![fanned_out("rv-1", &["rev"], None)])], applied).await.unwrap();
    assert!(matches!(fresh, Committed::Written(_)));
    let key = ResourceKey { kind: Kind::Endpoint, namespace: "default".into(), name: "rev".into() };
    store.delete_resource(&key, "tester").await.unwrap();
    assert!(store.resource_revision().await.unwrap() > applied, "a delete is a change");
}

async fn final_deliveries_can_be_replayed_and_released_ones_keep_their_count(store: &Store) {
    store.accept_events(&[request(vec![fanned_out("r-1", &["a"], None)])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(
        store.release_deliveries(&[(&claimed[0].id, claimed[0].lease_token.as_str())], Utc::now()).await.unwrap(),
        1
    );
    let again = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(again[0].attempt, 1, "a release is not an attempt");
    assert!(
        store.replay_deliveries(&[again[0].id.clone()], "operator").await.unwrap().is_empty(),
        "in-flight work is not replayed"
    );
    store.complete_attempts(&[completion(&again[0], DeliveryState::Dead, false)]).await.unwrap();
    assert_eq!(store.replay_deliveries(&[again[0].id.clone()], "operator").await.unwrap(), [again[0].id.clone()]);
    let replayed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!((replayed[0].attempt, replayed[0].attempt_base), (2, 1));
    let listed = store
        .list_deliveries(&DeliveryQuery {
            namespace: "default".into(),
            state: Some(DeliveryState::Delivering),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(store.queue_depth().await.unwrap().0, 0);
}

/// What the dispatcher's claim may take: `(endpoint, cap)` in namespace `default`.
fn quotas(caps: &[(&str, u32)], threshold: Option<u32>) -> Vec<EndpointQuota> {
    caps.iter()
        .map(|(endpoint, cap)| EndpointQuota {
            namespace: "default".into(),
            endpoint: endpoint.to_string(),
            cap: *cap,
            breaker_threshold: threshold,
        })
        .collect()
}

async fn claim_of(store: &Store, caps: &[(&str, u32)], limit: u32) -> Vec<ClaimedDelivery> {
    store.claim_endpoint_deliveries(Utc::now(), LEASE, limit, &quotas(caps, None)).await.unwrap()
}

fn events_of(claimed: &[ClaimedDelivery]) -> Vec<EventId> {
    claimed.iter().map(|c| c.event_id.clone()).collect()
}

/// The CloudEvents attributes an event came with read back as written, with the event and
/// with each claim of its deliveries, next to its CloudEvents id and content type.
async fn an_events_cloudevents_attributes_read_back_with_it_and_its_claims(store: &Store) {
    let mut tagged = fanned_out("ce-1", &["a"], None);
    tagged.content_type = "application/vnd.shop+json".into();
    tagged.attributes = [
        ("dataschema".to_owned(), serde_json::json!("https://example.com/order.json")),
        ("priority".to_owned(), serde_json::json!(3)),
        ("sampled".to_owned(), serde_json::json!(true)),
        ("tenant".to_owned(), serde_json::json!("Grüße \"ACME\"")),
    ]
    .into();
    let plain = fanned_out("ce-2", &["b"], None);
    store.accept_events(&[request(vec![tagged.clone(), plain.clone()])]).await.unwrap();
    let read = store.get_event(&tagged.id).await.unwrap().unwrap();
    assert_eq!(read.event.attributes, tagged.attributes);
    assert!(store.get_event(&plain.id).await.unwrap().unwrap().event.attributes.is_empty());
    let claimed = claim_of(store, &[("a", 10)], 10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attributes, tagged.attributes);
    assert_eq!(
        (claimed[0].external_id.as_str(), claimed[0].content_type.as_str()),
        ("ce-1", "application/vnd.shop+json")
    );
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "the other one");
    assert!(claimed[0].attributes.is_empty());
    assert_eq!(claimed[0].external_id, "ce-2");
}

/// The lane's head stays the head when given back; the next one goes when it ends, by
/// a completion or by an approver's denial; a replayed earlier one goes before the rest.
async fn a_lane_keeps_its_order_through_release_denial_and_replay(store: &Store) {
    let lane: Vec<NewEvent> = (1..=4).map(|n| fanned_out(&format!("l-{n}"), &["a"], Some("k"))).collect();
    store.accept_events(&[request(lane[..2].to_vec())]).await.unwrap();
    store.accept_events(&[request(lane[2..].to_vec())]).await.unwrap();
    let head = claim_of(store, &[("a", 10)], 10).await;
    assert_eq!(events_of(&head), [lane[0].id.clone()], "one at a time, the first");
    store.release_deliveries(&[(&head[0].id, head[0].lease_token.as_str())], head[0].due_at).await.unwrap();
    let again = claim_of(store, &[("a", 10)], 10).await;
    assert_eq!(events_of(&again), [lane[0].id.clone()], "given back, it is still the head");
    store.complete_attempts(&[completion(&again[0], DeliveryState::Dead, false)]).await.unwrap();

    // The second is held, then denied: the third goes.
    let second = claim_of(store, &[("a", 10)], 10).await;
    assert_eq!(events_of(&second), [lane[1].id.clone()]);
    let approval = approval_request("apr_lane", &lane[1].id, "a");
    assert_eq!(hold(store, &second[0], approval, Utc::now()).await, Recorded::Held);
    assert!(claim_of(store, &[("a", 10)], 10).await.is_empty(), "a held head holds its lane");
    store.vote_on_approval("apr_lane", "approver-1", false, "no", Utc::now()).await.unwrap();
    let third = claim_of(store, &[("a", 10)], 10).await;
    assert_eq!(events_of(&third), [lane[2].id.clone()], "the denial ended the head");

    // The dead first one is replayed while the third is in flight: it goes before the fourth.
    assert_eq!(store.replay_deliveries(&[again[0].id.clone()], "operator").await.unwrap().len(), 1);
    let replayed = claim_of(store, &[("a", 10)], 10).await;
    assert_eq!(events_of(&replayed), [lane[0].id.clone()], "the replayed one, before the fourth");
    store.complete_attempts(&[completion(&third[0], DeliveryState::Delivered, true)]).await.unwrap();
    assert!(claim_of(store, &[("a", 10)], 10).await.is_empty(), "the fourth waits behind the replayed one");
    store.complete_attempts(&[completion(&replayed[0], DeliveryState::Delivered, true)]).await.unwrap();
    let last = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(events_of(&last), [lane[3].id.clone()]);
}

/// A claim takes at most each endpoint's cap of its deliveries, oldest due first (then
/// by id), and none of an endpoint it was not given.
async fn claims_take_at_most_each_endpoints_cap_oldest_first(store: &Store) {
    let mut all = Vec::new();
    for n in 0..6 {
        let mut e = fanned_out(&format!("c-{n}"), &["busy", "calm", "unnamed"], None);
        // Older first; the last two tie on their due time.
        e.received_at = Utc::now() - chrono::Duration::seconds(60 - n.min(4));
        all.push(e);
    }
    store.accept_events(&[request(all.clone())]).await.unwrap();
    let claimed = claim_of(store, &[("busy", 2), ("calm", 10)], 7).await;
    let busy: Vec<_> = claimed.iter().filter(|c| c.endpoint == "busy").map(|c| c.event_id.clone()).collect();
    assert_eq!(busy, [all[0].id.clone(), all[1].id.clone()], "the busy endpoint's two oldest");
    let calm: Vec<_> = claimed.iter().filter(|c| c.endpoint == "calm").map(|c| c.event_id.clone()).collect();
    assert_eq!(calm, all[..5].iter().map(|e| e.id.clone()).collect::<Vec<_>>(), "the calm one's oldest, ties by id");
    assert!(claimed.iter().all(|c| c.endpoint != "unnamed"));
    // Nothing more of the busy one; the rest of the calm one.
    let rest = claim_of(store, &[("busy", 0), ("calm", 10)], 10).await;
    assert_eq!(events_of(&rest), [all[5].id.clone()]);
}

/// Four deliveries to `name`, two of which failed and opened its breaker until now.
async fn half_open(store: &Store, name: &str) {
    let lane: Vec<NewEvent> = (0..4).map(|n| fanned_out(&format!("{name}-{n}"), &[name], None)).collect();
    store.accept_events(&[request(lane)]).await.unwrap();
    let claimed = claim_of(store, &[(name, 2)], 10).await;
    let failed: Vec<Completion> = claimed
        .iter()
        .map(|c| {
            let mut f = completion(c, DeliveryState::Retrying, false);
            f.breaker = Some((2, Utc::now()));
            f
        })
        .collect();
    store.complete_attempts(&failed).await.unwrap();
}

/// From the breaker's threshold on, the claim that takes the endpoint's half-open probe
/// takes one delivery of it, and no claim takes any while that probe is out.
async fn the_half_open_probe_is_taken_by_one_claim_at_a_time(store: &Store) {
    half_open(store, "e").await;
    let later = Utc::now() + chrono::Duration::seconds(1);
    let claim = |store: &Store| {
        let store = store.clone();
        async move { store.claim_endpoint_deliveries(later, LEASE, 10, &quotas(&[("e", 10)], Some(2))).await.unwrap() }
    };
    let probe = claim(store).await;
    assert_eq!(probe.len(), 1, "one probe");
    assert!(probe[0].probe);
    assert!(claim(store).await.is_empty(), "nothing while the probe is out");
    // Given back unattempted, the probe goes back with it.
    store.release_deliveries(&[(&probe[0].id, probe[0].lease_token.as_str())], probe[0].due_at).await.unwrap();
    let again = claim(store).await;
    assert_eq!(again.len(), 1);
    assert!(again[0].probe);
    // A successful probe closes the breaker: the endpoint's cap counts again.
    store.complete_attempts(&[completion(&again[0], DeliveryState::Delivered, true)]).await.unwrap();
    let closed = claim(store).await;
    assert_eq!(closed.len(), 3);
    assert!(closed.iter().all(|c| !c.probe));
}

/// `retriesPerHour` counts the retries granted to an endpoint in the last hour, in the
/// database (so for all processes on it).
async fn the_retry_budget_allows_so_many_retries_per_rolling_hour(store: &Store) {
    let t0 = Utc::now();
    let second = chrono::Duration::seconds;
    assert!(store.take_retry("ns", "e", 2, t0).await.unwrap());
    assert!(store.take_retry("ns", "e", 2, t0 + second(10)).await.unwrap());
    assert!(!store.take_retry("ns", "e", 2, t0 + second(20)).await.unwrap());
    assert!(store.take_retry("ns", "other", 2, t0 + second(20)).await.unwrap(), "per endpoint");
    assert!(store.take_retry("ns", "e", 2, t0 + second(3600)).await.unwrap(), "the first retry is an hour old");
    assert!(!store.take_retry("ns", "e", 2, t0 + second(3605)).await.unwrap());
}

/// An ordered backlog four times as long costs a claim no more database buffers: the
/// claim reads only lane heads, whatever waits behind them (PostgreSQL's EXPLAIN counts).
#[tokio::test]
async fn an_ordered_backlog_costs_a_claim_nothing_on_postgres() {
    let Some(small_db) = TestDb::postgres().await else { return };
    let Some(large_db) = TestDb::postgres().await else { return };
    let mut buffers = Vec::new();
    for (db, per_key) in [(&small_db, 25), (&large_db, 100)] {
        let store = db.store().await;
        for key in 0..10 {
            let lane: Vec<NewEvent> = (0..per_key)
                .map(|n| fanned_out(&format!("b-{key}-{n}"), &["ordered"], Some(&format!("k{key}"))))
                .collect();
            store.accept_events(&[request(lane)]).await.unwrap();
        }
        // Half the heads are in flight, half wait to be claimed; a tenth of each lane is done.
        let heads = claim_of(&store, &[("ordered", 100)], 5).await;
        assert_eq!(heads.len(), 5);
        let cost = store.claim_cost(Utc::now(), 100, &quotas(&[("ordered", 100)], None)).await.unwrap().unwrap();
        assert_eq!(cost.rows, 5, "the five heads not in flight");
        buffers.push(cost.buffers);
    }
    let (small, large) = (buffers[0], buffers[1]);
    assert!(large <= small + small / 2 + 8, "a 4x backlog cost {large} buffers against {small}");
}

fn request(events: Vec<NewEvent>) -> IngestRequest {
    IngestRequest { idempotency: None, events }
}

fn keyed(key: &str, fingerprint: &str, events: Vec<NewEvent>) -> IngestRequest {
    IngestRequest {
        idempotency: Some(IdempotencyKey {
            scope: "tester".to_owned(),
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
        }),
        events,
    }
}

fn accepted(outcome: &RequestOutcome) -> &[EventOutcome] {
    match outcome {
        RequestOutcome::Accepted(items) => items,
        other => panic!("expected Accepted, got {other:?}"),
    }
}

async fn an_accepted_event_reads_back_verbatim(store: &Store) {
    let original = event("default", "shop", "o-1");
    let outcomes = store.accept_events(&[request(vec![original.clone()])]).await.unwrap();
    assert_eq!(accepted(&outcomes[0]), &[EventOutcome { id: original.id.clone(), duplicate: false }]);

    let stored = store.get_event(&original.id).await.unwrap().expect("stored");
    assert_eq!(stored.event.data, original.data, "data must be stored byte for byte");
    assert_eq!(stored.event.source, "shop");
    assert_eq!(stored.event.external_id, "o-1");
    assert_eq!(stored.event.subject.as_deref(), Some("order/1"));
    assert_eq!(stored.event.ingested_by, "tester");
    assert_eq!(stored.event.trace_id, original.trace_id);
    // Databases keep microseconds; compare at that precision.
    assert_eq!(stored.event.received_at.timestamp_micros(), original.received_at.timestamp_micros());
    assert_eq!(stored.event.time.map(|t| t.timestamp_micros()), original.time.map(|t| t.timestamp_micros()));
    assert!(store.get_event(&EventId::generate()).await.unwrap().is_none());
}

async fn a_repeated_source_and_id_is_a_duplicate_of_the_original(store: &Store) {
    let first = event("default", "shop", "o-2");
    let again = event("default", "shop", "o-2");
    store.accept_events(&[request(vec![first.clone()])]).await.unwrap();
    let outcomes = store.accept_events(&[request(vec![again.clone()])]).await.unwrap();
    assert_eq!(accepted(&outcomes[0]), &[EventOutcome { id: first.id.clone(), duplicate: true }]);
    assert!(store.get_event(&again.id).await.unwrap().is_none(), "a duplicate writes nothing");
}

async fn the_same_id_from_another_source_or_namespace_is_a_new_event(store: &Store) {
    let a = event("default", "shop", "o-3");
    let b = event("default", "warehouse", "o-3");
    let c = event("payments", "shop", "o-3");
    let outcomes = store.accept_events(&[request(vec![a, b, c])]).await.unwrap();
    assert!(accepted(&outcomes[0]).iter().all(|o| !o.duplicate));
}

async fn duplicates_within_one_group_commit_point_to_the_first(store: &Store) {
    let first = event("default", "shop", "o-4");
    let second = event("default", "shop", "o-4");
    let third = event("default", "shop", "o-4");
    let outcomes = store.accept_events(&[request(vec![first.clone(), second]), request(vec![third])]).await.unwrap();
    assert_eq!(
        accepted(&outcomes[0]),
        &[
            EventOutcome { id: first.id.clone(), duplicate: false },
            EventOutcome { id: first.id.clone(), duplicate: true }
        ]
    );
    assert_eq!(accepted(&outcomes[1]), &[EventOutcome { id: first.id.clone(), duplicate: true }]);
}

async fn an_idempotency_key_replays_the_original_result(store: &Store) {
    let original = event("default", "shop", "o-5");
    let outcomes = store.accept_events(&[keyed("k-1", "fp-a", vec![original.clone()])]).await.unwrap();
    assert!(!accepted(&outcomes[0])[0].duplicate);

    // Same key, same request, new generated ids: the original id comes back, nothing written.
    let retry = event("default", "shop", "o-5-retry");
    let outcomes = store.accept_events(&[keyed("k-1", "fp-a", vec![retry.clone()])]).await.unwrap();
    assert_eq!(outcomes[0], RequestOutcome::Replayed(vec![original.id.clone()]));
    assert!(store.get_event(&retry.id).await.unwrap().is_none());

    // Same key, another request: refused, nothing written.
    let other = event("default", "shop", "o-5-other");
    let outcomes = store.accept_events(&[keyed("k-1", "fp-b", vec![other.clone()])]).await.unwrap();
    assert_eq!(outcomes[0], RequestOutcome::KeyReused);
    assert!(store.get_event(&other.id).await.unwrap().is_none());
}

async fn one_key_twice_in_one_group_commit_writes_once(store: &Store) {
    let first = event("default", "shop", "o-6");
    let second = event("default", "shop", "o-6-again");
    let third = event("default", "shop", "o-6-third");
    let outcomes = store
        .accept_events(&[
            keyed("k-2", "fp", vec![first.clone()]),
            keyed("k-2", "fp", vec![second.clone()]),
            keyed("k-2", "other", vec![third.clone()]),
        ])
        .await
        .unwrap();
    assert!(!accepted(&outcomes[0])[0].duplicate);
    assert_eq!(outcomes[1], RequestOutcome::Replayed(vec![first.id.clone()]));
    assert_eq!(outcomes[2], RequestOutcome::KeyReused);
    assert!(store.get_event(&second.id).await.unwrap().is_none());
    assert!(store.get_event(&third.id).await.unwrap().is_none());
}

async fn expired_idempotency_keys_are_forgotten(store: &Store) {
    let first = event("default", "shop", "o-9");
    store.accept_events(&[keyed("old-key", "fp-1", vec![first])]).await.unwrap();
    let before = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.delete_idempotency_keys_before(before).await.unwrap(), 0, "younger keys stay");
    let after = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(store.delete_idempotency_keys_before(after).await.unwrap(), 1);
    // The key is free again: a new request with it is written, not refused.
    let outcomes =
        store.accept_events(&[keyed("old-key", "fp-2", vec![event("default", "shop", "o-10")])]).await.unwrap();
    assert!(!accepted(&outcomes[0])[0].duplicate);
}

async fn keys_of_different_callers_do_not_collide(store: &Store) {
    let mut mine = keyed("shared-key", "fp", vec![event("default", "shop", "o-7")]);
    let mut theirs = keyed("shared-key", "fp", vec![event("default", "shop", "o-8")]);
    mine.idempotency.as_mut().unwrap().scope = "alice".into();
    theirs.idempotency.as_mut().unwrap().scope = "bob".into();
    let outcomes = store.accept_events(&[mine, theirs]).await.unwrap();
    assert!(!accepted(&outcomes[0])[0].duplicate);
    assert!(!accepted(&outcomes[1])[0].duplicate);
}

const WINDOW: std::time::Duration = std::time::Duration::from_secs(72 * 3600);

/// An event of `default`/`shop` with id `external_id`, received `age` before `now`, in a
/// namespace whose dedup window is [`WINDOW`]: the injected clock of the dedup window.
fn received(external_id: &str, now: DateTime<Utc>, age: chrono::Duration) -> NewEvent {
    let mut e = event("default", "shop", external_id);
    e.received_at = now - age;
    e.dedup_window = Some(WINDOW);
    e
}

async fn a_repeated_id_is_a_duplicate_within_the_dedup_window_and_a_new_event_after_it(store: &Store) {
    let now = Utc::now();
    let first = received("w-1", now, chrono::Duration::days(7));
    store.accept_events(&[request(vec![first.clone()])]).await.unwrap();
    // Three days and a minute later (past 72h): a new event, which takes the id over.
    let after = received("w-1", now, chrono::Duration::days(4) - chrono::Duration::minutes(1));
    let outcomes = store.accept_events(&[request(vec![after.clone()])]).await.unwrap();
    assert_eq!(accepted(&outcomes[0]), &[EventOutcome { id: after.id.clone(), duplicate: false }]);
    assert!(store.get_event(&after.id).await.unwrap().is_some(), "written");
    assert!(store.get_event(&first.id).await.unwrap().is_some(), "the first event is kept");
    // Within the window of the new one: a duplicate of it, not of the first.
    let within = received("w-1", now, chrono::Duration::days(4) - chrono::Duration::hours(2));
    let outcomes = store.accept_events(&[request(vec![within.clone()])]).await.unwrap();
    assert_eq!(accepted(&outcomes[0]), &[EventOutcome { id: after.id.clone(), duplicate: true }]);
    assert!(store.get_event(&within.id).await.unwrap().is_none(), "a duplicate writes nothing");
    // An event without a window (`None`) is a duplicate however old the first is.
    let mut forever = received("w-1", now, chrono::Duration::zero());
    forever.dedup_window = None;
    let outcomes = store.accept_events(&[request(vec![forever])]).await.unwrap();
    assert_eq!(accepted(&outcomes[0]), &[EventOutcome { id: after.id.clone(), duplicate: true }]);
}

async fn a_replay_past_the_window_is_delivered_again_and_one_within_it_is_not(store: &Store) {
    let now = Utc::now();
    let mut first = received("w-2", now, chrono::Duration::days(7));
    first.deliveries = fanned_out("unused", &["a"], None).deliveries;
    store.accept_events(&[request(vec![first.clone()])]).await.unwrap();
    let mut replay = received("w-2", now, chrono::Duration::zero());
    replay.deliveries = fanned_out("unused", &["a"], None).deliveries;
    store.accept_events(&[request(vec![replay.clone()])]).await.unwrap();
    let mut again = received("w-2", now, chrono::Duration::zero());
    again.deliveries = fanned_out("unused", &["a"], None).deliveries;
    store.accept_events(&[request(vec![again])]).await.unwrap();
    assert_eq!(store.deliveries_of_event(&first.id).await.unwrap().len(), 1);
    assert_eq!(store.deliveries_of_event(&replay.id).await.unwrap().len(), 1, "the week-old id is delivered again");
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    assert_eq!(claimed.len(), 2, "one delivery per window, not per repeat");
}

async fn an_idempotency_key_is_free_again_past_the_dedup_window(store: &Store) {
    let now = Utc::now();
    let old = keyed("k-w", "fp-a", vec![received("kw-1", now, chrono::Duration::days(4))]);
    store.accept_events(std::slice::from_ref(&old)).await.unwrap();
    // Within the window, another request with the key is refused.
    let other = keyed("k-w", "fp-b", vec![received("kw-2", now, chrono::Duration::days(2))]);
    assert_eq!(store.accept_events(&[other]).await.unwrap()[0], RequestOutcome::KeyReused);
    // Past it, the key is taken over: written, and replayed from then on.
    let later = keyed("k-w", "fp-b", vec![received("kw-3", now, chrono::Duration::zero())]);
    let outcomes = store.accept_events(std::slice::from_ref(&later)).await.unwrap();
    let id = accepted(&outcomes[0])[0].id.clone();
    assert_eq!(id, later.events[0].id);
    let retry = keyed("k-w", "fp-b", vec![received("kw-4", now, chrono::Duration::zero())]);
    assert_eq!(store.accept_events(&[retry]).await.unwrap()[0], RequestOutcome::Replayed(vec![id]));
}

fn scope_of_all(events: std::time::Duration) -> Vec<Scope> {
    vec![Scope {
        namespaces: Namespaces::AllBut(vec!["kept-long".into()]),
        retention: Retention { events, dead_letters: events, attempts: events },
    }]
}

/// Claims every due delivery and ends each with `state`.
async fn end_all(store: &Store, state: DeliveryState) -> usize {
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 100).await.unwrap();
    let completions: Vec<Completion> = claimed.iter().map(|c| completion(c, state, true)).collect();
    store.complete_attempts(&completions).await.unwrap();
    claimed.len()
}

async fn retention_deletes_old_events_with_their_deliveries_and_attempts_but_not_waiting_ones(store: &Store) {
    let now = Utc::now();
    let old = |id: &str, endpoints: &[&str]| {
        let mut e = received(id, now, chrono::Duration::days(40));
        e.deliveries = fanned_out("unused", endpoints, None).deliveries;
        e
    };
    let (done, waiting, bare) = (old("r-done", &["a", "b"]), old("r-waiting", &["c"]), old("r-bare", &[]));
    let mut recent = received("r-recent", now, chrono::Duration::days(1));
    recent.deliveries = fanned_out("unused", &["a"], None).deliveries;
    let mut elsewhere = old("r-elsewhere", &[]);
    elsewhere.namespace = "kept-long".into();
    store.accept_events(&[request(vec![done.clone(), bare.clone(), recent.clone(), elsewhere.clone()])]).await.unwrap();
    assert_eq!(end_all(store, DeliveryState::Delivered).await, 3);
    // Accepted after the others ended: its delivery is still pending.
    store.accept_events(&[request(vec![waiting.clone()])]).await.unwrap();
    let attempt_of_done = store.deliveries_of_event(&done.id).await.unwrap()[0].id.clone();
    assert_eq!(store.get_delivery(&attempt_of_done).await.unwrap().unwrap().1.len(), 1);

    let deleted =
        store.delete_expired(&scope_of_all(std::time::Duration::from_secs(30 * 86400)), now, 100).await.unwrap();
    assert_eq!((deleted.events, deleted.deliveries, deleted.attempts), (2, 2, 2), "{deleted:?}");
    assert!(store.get_event(&done.id).await.unwrap().is_none(), "past retention, every delivery final: gone");
    assert!(store.get_event(&bare.id).await.unwrap().is_none());
    assert!(store.deliveries_of_event(&done.id).await.unwrap().is_empty(), "with its deliveries");
    assert!(store.get_delivery(&attempt_of_done).await.unwrap().is_none(), "and their attempts");
    assert!(store.get_event(&waiting.id).await.unwrap().is_some(), "a waiting delivery keeps its event");
    assert_eq!(store.deliveries_of_event(&waiting.id).await.unwrap().len(), 1);
    assert!(store.get_event(&recent.id).await.unwrap().is_some(), "within retention: kept");
    assert!(store.get_event(&elsewhere.id).await.unwrap().is_some(), "another scope's namespace: kept");
    // The identities of the deleted events go with them (the waiting one's stays, naming
    // its event): the old ids are new events again.
    assert_eq!(deleted.identities, 2, "{deleted:?}");
    let replay = received("r-done", now, chrono::Duration::zero());
    let outcomes = store.accept_events(&[request(vec![replay.clone()])]).await.unwrap();
    assert_eq!(accepted(&outcomes[0]), &[EventOutcome { id: replay.id.clone(), duplicate: false }]);

    // Once the waiting delivery ends, its event goes too; a second pass finds nothing more.
    assert_eq!(end_all(store, DeliveryState::Dead).await, 1);
    let deleted =
        store.delete_expired(&scope_of_all(std::time::Duration::from_secs(30 * 86400)), now, 100).await.unwrap();
    assert_eq!((deleted.events, deleted.deliveries, deleted.identities), (1, 1, 1), "{deleted:?}");
    assert!(store.get_event(&waiting.id).await.unwrap().is_none());
    let deleted =
        store.delete_expired(&scope_of_all(std::time::Duration::from_secs(30 * 86400)), now, 100).await.unwrap();
    assert_eq!(deleted, Deleted::default());
}

/// An operational event waiting in the outbox has no deliveries yet: retention leaves it,
/// however old, until it is fanned out.
async fn retention_keeps_an_operational_event_until_it_is_fanned_out(store: &Store) {
    apply_one(store, endpoint_resource("flaky", "https://a.example/hooks")).await;
    store.accept_events(&[request(vec![fanned_out("ro-1", &["flaky"], None)])]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap();
    store.complete_attempts(&[completion(&claimed[0], DeliveryState::Dead, false)]).await.unwrap();
    let waiting = store.outbox_events(10).await.unwrap().events;
    assert_eq!(waiting.len(), 1, "its death is told");
    let told = waiting[0].event.clone();
    let (later, scopes) = (Utc::now() + chrono::Duration::hours(1), scope_of_all(std::time::Duration::from_secs(60)));
    store.delete_expired(&scopes, later, 100).await.unwrap();
    assert!(store.get_event(&claimed[0].event_id).await.unwrap().is_none(), "the old event and its dead delivery go");
    assert_eq!(store.outbox_events(10).await.unwrap().events.len(), 1, "the told death waits for its fan-out");
    let revision = store.resource_revision().await.unwrap();
    let written = store.fan_out_outbox(std::slice::from_ref(&told), revision).await.unwrap();
    assert_eq!(written, OutboxCommitted::Written(vec![told.id.clone()]));
    let deleted = store.delete_expired(&scopes, later, 100).await.unwrap();
    assert_eq!(deleted.events, 1, "{deleted:?}");
    assert!(store.get_event(&told.id).await.unwrap().is_none(), "fanned out (to nobody), it may go");
}

async fn retention_works_in_bounded_batches(store: &Store) {
    let now = Utc::now();
    let events: Vec<NewEvent> = (0..5).map(|i| received(&format!("b-{i}"), now, chrono::Duration::days(40))).collect();
    store.accept_events(&[request(events)]).await.unwrap();
    let scopes = scope_of_all(std::time::Duration::from_secs(30 * 86400));
    let mut batches = Vec::new();
    loop {
        let deleted = store.delete_expired(&scopes, now, 2).await.unwrap();
        if deleted.events == 0 {
            break;
        }
        batches.push(deleted.events);
    }
    assert_eq!(batches, vec![2, 2, 1]);
}

async fn a_namespace_usage_counts_what_it_holds(store: &Store) {
    let now = Utc::now();
    let today = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let mut old = event("usage", "shop", "u-1");
    old.received_at = today - chrono::Duration::days(3);
    old.deliveries = fanned_out("unused", &["a", "b"], None).deliveries;
    let mut new = event("usage", "shop", "u-2");
    new.received_at = today + chrono::Duration::seconds(1);
    store.accept_events(&[request(vec![old.clone(), new, event("other", "shop", "u-3")])]).await.unwrap();
    let usage = store.namespace_usage("usage", today).await.unwrap();
    assert_eq!((usage.events_today, usage.events, usage.deliveries, usage.attempts), (1, 2, 2, 0));
    assert_eq!(usage.oldest_event.map(|t| t.timestamp_micros()), Some(old.received_at.timestamp_micros()));
    assert!(!usage.capped);
    assert_eq!(store.namespace_usage("empty", today).await.unwrap(), Default::default());
}

async fn events_list_newest_first_by_source_and_type_with_paging(store: &Store) {
    let mut events = Vec::new();
    for i in 0..5 {
        let mut e = event("listing", if i % 2 == 0 { "shop" } else { "crm" }, &format!("l-{i}"));
        e.event_type = if i < 3 { "order.created".into() } else { "order.paid".into() };
        events.push(e);
    }
    store.accept_events(&[request(events.clone())]).await.unwrap();
    store.accept_events(&[request(vec![event("elsewhere", "shop", "l-x")])]).await.unwrap();

    let all =
        store.list_events(&EventQuery { namespace: "listing".into(), limit: 10, ..Default::default() }).await.unwrap();
    let ids: Vec<_> = all.iter().map(|s| s.event.id.clone()).collect();
    let mut expected: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
    expected.reverse();
    assert_eq!(ids, expected, "newest first, only this namespace");

    let shop = EventQuery { namespace: "listing".into(), source: Some("shop".into()), limit: 10, ..Default::default() };
    assert_eq!(store.list_events(&shop).await.unwrap().len(), 3);
    let paid = EventQuery {
        namespace: "listing".into(),
        event_type: Some("order.paid".into()),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(store.list_events(&paid).await.unwrap().len(), 2);

    let page1 =
        store.list_events(&EventQuery { namespace: "listing".into(), limit: 2, ..Default::default() }).await.unwrap();
    let cursor = page1.last().unwrap().event.id.clone();
    let page2 = store
        .list_events(&EventQuery { namespace: "listing".into(), limit: 2, before: Some(cursor), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(page2[0].event.id, expected[2]);
}

async fn concurrent_group_commits_lose_nothing_and_store_each_identity_once(store: &Store) {
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for round in 0..10 {
                // Every writer also sends "shared-{round}", which exactly one must create.
                let events = vec![
                    event("default", "race", &format!("w{writer}-{round}")),
                    event("default", "race", &format!("shared-{round}")),
                ];
                let outcomes = store.accept_events(&[request(events)]).await.unwrap();
                ids.extend(accepted(&outcomes[0]).to_vec());
            }
            ids
        });
    }
    let mut outcomes = Vec::new();
    while let Some(result) = tasks.join_next().await {
        outcomes.extend(result.unwrap());
    }
    let created: Vec<_> = outcomes.iter().filter(|o| !o.duplicate).collect();
    assert_eq!(created.len(), 8 * 10 + 10, "each own event once, each shared event once");
    let distinct: HashSet<_> = outcomes.iter().map(|o| o.id.clone()).collect();
    assert_eq!(distinct.len(), 90);
    for o in created {
        assert!(store.get_event(&o.id).await.unwrap().is_some());
    }
}

fn desired(name: &str, spec: serde_json::Value) -> hookwarden::store::DesiredResource {
    hookwarden::store::DesiredResource {
        key: hookwarden::resources::ResourceKey {
            kind: hookwarden::resources::Kind::Filter,
            namespace: "default".into(),
            name: name.into(),
        },
        labels: Default::default(),
        annotations: Default::default(),
        spec,
    }
}

async fn resources_apply_atomically_and_keep_status_per_generation(store: &Store) {
    use hookwarden::store::{ApplyAction, ApplyRequest};
    let spec = serde_json::json!({"expression": "true"});
    let request = ApplyRequest {
        resources: vec![desired("a", spec.clone()), desired("b", spec.clone())],
        applyset: Some("set".into()),
        ..Default::default()
    };
    let outcomes = store.apply_resources(&request).await.unwrap();
    assert!(outcomes.iter().all(|o| o.action == ApplyAction::Created && o.generation == 1));
    let key = outcomes[0].key.clone();

    // Status is written for the generation it describes, and not for an older one.
    let term = store.try_lead().await.unwrap().expect("the only store leads").term();
    let status = serde_json::json!({"observedGeneration": 1});
    assert!(store.update_resource_status(term, &key, 1, &status).await.unwrap());
    let changed =
        ApplyRequest { resources: vec![desired("a", serde_json::json!({"expression": "false"}))], ..request.clone() };
    assert_eq!(store.apply_resources(&changed).await.unwrap()[0].generation, 2);
    assert!(!store.update_resource_status(term, &key, 1, &status).await.unwrap(), "stale status refused");
    assert_eq!(store.get_resource(&key).await.unwrap().unwrap().status, Some(status));

    // A dry-run prune reports, and keeps, what a real one deletes.
    let prune = ApplyRequest { prune: true, dry_run: true, ..changed.clone() };
    let outcomes = store.apply_resources(&prune).await.unwrap();
    assert_eq!(outcomes.iter().filter(|o| o.action == ApplyAction::Pruned).count(), 1);
    assert_eq!(store.list_resources(None, None).await.unwrap().len(), 2);
    store.apply_resources(&ApplyRequest { dry_run: false, ..prune }).await.unwrap();
    assert_eq!(store.list_resources(None, None).await.unwrap().len(), 1);
    assert!(store.delete_resource(&key, "operator").await.unwrap().is_some());
    assert!(store.delete_resource(&key, "operator").await.unwrap().is_none());
}

async fn leadership_is_exclusive(store: &Store) {
    let first = store.try_lead().await.unwrap();
    assert!(first.is_some());
    let second = store.try_lead().await.unwrap();
    match store.backend() {
        // One process only: it always leads.
        hookwarden::store::Backend::Sqlite => assert!(second.is_some()),
        hookwarden::store::Backend::Postgres => {
            assert!(second.is_none(), "a second leader while the first holds the lock");
            first.unwrap().release().await;
            assert!(store.try_lead().await.unwrap().is_some(), "released leadership can be taken");
        }
    }
}

/// A pending approval request whose deadline has passed, for `expire_approvals`.
async fn an_overdue_approval(store: &Store) -> String {
    use hookwarden::store::policy::NewApproval;
    let e = fanned_out("overdue", &["agent"], None);
    store.accept_events(&[request(vec![e.clone()])]).await.unwrap();
    let claim = store.claim_due_deliveries(Utc::now(), LEASE, 10).await.unwrap().remove(0);
    let approval = NewApproval {
        id: "apr_overdue".into(),
        namespace: "default".into(),
        event_id: e.id.to_string(),
        endpoint: "agent".into(),
        rule: Some("hold-all".into()),
        reason: "held".into(),
        action_hash: "0".repeat(64),
        role: "approver".into(),
        quorum: 1,
        on_expiry: "deny".into(),
        expires_at: Utc::now() - chrono::Duration::seconds(1),
        requested_by: "tester".into(),
        link: None,
    };
    let now = Utc::now();
    assert_eq!(hold(store, &claim, approval.clone(), now).await, Recorded::Held);
    approval.id
}

/// Every leader-only write names its term; once a newer term began, the store refuses the
/// old term's writes (`StoreError::Fenced`) and none of them lands.
async fn leader_only_writes_of_an_ended_term_are_refused(store: &Store) {
    use hookwarden::audit::NewAuditRecord;
    let spec = serde_json::json!({"expression": "true"});
    let first = store.try_lead().await.unwrap().expect("nobody else leads");
    let old = first.term();
    let applied = ApplyRequest { resources: vec![desired("a", spec.clone())], leader: Some(old), ..Default::default() };
    let key = store.apply_resources(&applied).await.unwrap()[0].key.clone();
    let status = serde_json::json!({"observedGeneration": 1});
    assert!(store.update_resource_status(old, &key, 1, &status).await.unwrap());
    store.save_checkpoint(old, "default", 1, &"a".repeat(64), "note 1").await.unwrap();
    let approval = an_overdue_approval(store).await;

    // A new term begins (on PostgreSQL, once the old leader's lock is gone).
    first.release().await;
    let new = store.try_lead().await.unwrap().expect("the released lock can be taken").term();
    assert!(new.epoch() > old.epoch(), "epochs grow: {old:?} then {new:?}");
    let fenced = |result: Result<(), StoreError>, what: &str| match result {
        Err(StoreError::Fenced { term, current }) => {
            assert_eq!((term, current), (old.epoch(), new.epoch()), "{what}");
        }
        other => panic!("{what}: a stale leader's write must be refused, got {other:?}"),
    };
    let changed = serde_json::json!({"observedGeneration": 1, "stale": true});
    fenced(store.update_resource_status(old, &key, 1, &changed).await.map(drop), "status");
    fenced(store.save_checkpoint(old, "default", 2, &"b".repeat(64), "note 2").await, "checkpoint");
    fenced(store.expire_approvals(old, Utc::now()).await.map(drop), "expiry");
    let more = ApplyRequest { resources: vec![desired("b", spec.clone())], ..applied.clone() };
    fenced(store.apply_resources(&more).await.map(drop), "directory apply");
    let record = NewAuditRecord::new("system", "audit.key_published", "_cluster", "key/x", serde_json::json!({}));
    fenced(store.append_audit_as_leader(old, std::slice::from_ref(&record)).await.map(drop), "key record");

    // Nothing of it landed.
    assert_eq!(store.get_resource(&key).await.unwrap().unwrap().status, Some(status));
    assert_eq!(store.latest_checkpoint("default").await.unwrap().map(|c| c.0), Some(1));
    let (pending, _) = store.get_approval(&approval).await.unwrap().unwrap();
    assert_eq!(pending.state, "pending");
    assert_eq!(store.list_resources(None, None).await.unwrap().len(), 1);
    assert!(store.audit_records("_cluster", 1, i64::MAX, 10).await.unwrap().is_empty());

    // The new term writes all of it.
    assert!(store.update_resource_status(new, &key, 1, &changed).await.unwrap());
    store.save_checkpoint(new, "default", 2, &"b".repeat(64), "note 2").await.unwrap();
    assert_eq!(store.expire_approvals(new, Utc::now()).await.unwrap().len(), 1);
    store.apply_resources(&ApplyRequest { leader: Some(new), ..more }).await.unwrap();
    store.append_audit_as_leader(new, &[record]).await.unwrap();
    // Any process may still apply without a term.
    store.apply_resources(&ApplyRequest { resources: vec![desired("c", spec)], ..Default::default() }).await.unwrap();
}

async fn concurrent_audit_appends_keep_each_chain_gapless_and_linked(store: &Store) {
    use hookwarden::audit::{verify_chain, NewAuditRecord};
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..16 {
        let store = store.clone();
        tasks.spawn(async move {
            for n in 0..10 {
                let chain = if n % 2 == 0 { "payments" } else { "default" };
                let record = NewAuditRecord::new(
                    &format!("w{writer}"),
                    "test.append",
                    chain,
                    format!("t/{writer}/{n}"),
                    serde_json::json!({"n": n}),
                );
                store.append_audit(&[record.clone(), record]).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    for chain in ["payments", "default"] {
        let records = store.audit_records(chain, 1, i64::MAX, 10_000).await.unwrap();
        assert_eq!(records.len(), 160, "{chain}");
        verify_chain(&records, None).unwrap_or_else(|e| panic!("{chain}: {e}"));
    }
    let heads = store.audit_heads().await.unwrap();
    assert_eq!(
        heads.iter().map(|(c, s, _)| (c.as_str(), *s)).collect::<Vec<_>>(),
        [("default", 160), ("payments", 160)]
    );
}

async fn readiness_requires_the_migrations(store: &Store) {
    store.check_ready().await.expect("a migrated store is ready");
}

async fn an_unmigrated_database_is_not_ready(db: &TestDb) {
    let store = Store::connect(&db.url()).await.unwrap();
    let not_ready = store.check_ready().await;
    assert!(matches!(not_ready, Err(StoreError::NotMigrated { found: None, .. })), "{not_ready:?}");
    let message = not_ready.unwrap_err().to_string();
    assert!(
        message.starts_with("the database schema is not up to date (no migration applied; this build needs version "),
        "{message}"
    );
    store.migrate().await.unwrap();
    store.check_ready().await.unwrap();
    // Migrating again is a no-op.
    store.migrate().await.unwrap();
}

/// An allow decision, as the gate records it.
fn allowed() -> DecisionRecord {
    DecisionRecord::Evaluated(PolicyDecision {
        outcome: Outcome::Allow,
        rule: Some("cap".into()),
        reason: "allow".into(),
        rules: Vec::new(),
        revision: String::new(),
        spend: Vec::new(),
        approval: None,
    })
}

/// A reservation under rule `cap` in USD, limit `limit`, window `window`.
fn spend(key: &str, amount: i64, limit: i64, window: std::time::Duration) -> SpendReservation {
    SpendReservation { rule: "cap".into(), key: key.into(), currency: "USD".into(), amount, limit, window }
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

async fn allow(
    store: &Store,
    claim: &ClaimedDelivery,
    reservations: &[SpendReservation],
    now: DateTime<Utc>,
) -> Recorded {
    let verdict = ToRecord::Allow { reservations: reservations.to_vec(), enforce_limits: true };
    record(store, claim, allowed(), verdict, now).await
}

async fn hold(store: &Store, claim: &ClaimedDelivery, approval: NewApproval, now: DateTime<Utc>) -> Recorded {
    record(store, claim, held(), ToRecord::Hold(Box::new(approval)), now).await
}

/// Records one decision on `claim`, as the gate's decision writer does.
async fn record(
    store: &Store,
    claim: &ClaimedDelivery,
    decision: DecisionRecord,
    verdict: ToRecord,
    now: DateTime<Utc>,
) -> Recorded {
    let write = DecisionWrite {
        id: claim.id.clone(),
        lease_token: claim.lease_token.clone(),
        namespace: claim.namespace.clone(),
        record: decision,
        verdict,
    };
    let mut results = store.record_decisions(&[write], now).await.unwrap();
    assert_eq!(results.len(), 1);
    results.remove(0)
}

/// `count` new deliveries to endpoint `agent`, claimed.
async fn claimed_for_agent(store: &Store, prefix: &str, count: usize) -> Vec<ClaimedDelivery> {
    let events: Vec<NewEvent> = (0..count).map(|n| fanned_out(&format!("{prefix}-{n}"), &["agent"], None)).collect();
    store.accept_events(&[request(events)]).await.unwrap();
    let claimed = store.claim_due_deliveries(Utc::now(), LEASE, 100).await.unwrap();
    assert_eq!(claimed.len(), count);
    claimed
}

/// Ends `claim`'s attempt as `state` (no breaker: failures do not park the endpoint).
async fn end_attempt(store: &Store, claim: &ClaimedDelivery, state: DeliveryState) {
    let mut c = completion(claim, state, state == DeliveryState::Delivered);
    c.breaker = None;
    assert_eq!(store.complete_attempts(&[c]).await.unwrap().lost, 0);
}

/// `claim`'s attempt fails for a retry, and it is claimed again.
async fn retried(store: &Store, claim: &ClaimedDelivery) -> ClaimedDelivery {
    end_attempt(store, claim, DeliveryState::Retrying).await;
    let again = store.claim_due_deliveries(Utc::now() + chrono::Duration::seconds(1), LEASE, 10).await.unwrap();
    again.into_iter().find(|c| c.id == claim.id).expect("the retry is claimed again")
}

type Counted = Vec<(String, String, String, String, i64, i64)>;

/// Runs `query` (rows of key, bucket end and amount) on the database directly.
async fn counted(db: &TestDb, query: &str) -> Counted {
    use sqlx::Connection as _;
    if db.is_postgres() {
        let mut c = sqlx::PgConnection::connect(&db.url()).await.unwrap();
        sqlx::query_as(query).fetch_all(&mut c).await.unwrap()
    } else {
        let mut c = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
        sqlx::query_as(query).fetch_all(&mut c).await.unwrap()
    }
}

/// What the buckets hold (those not empty), and what the ledger's reserved and committed
/// entries add up to per bucket, from `after` on.
async fn buckets_and_ledger(db: &TestDb, after: i64) -> (Counted, Counted) {
    let buckets = counted(
        db,
        &format!(
            "SELECT namespace, rule, spend_key, currency, bucket_end, amount FROM spend_buckets \
             WHERE amount <> 0 AND bucket_end > {after} ORDER BY namespace, rule, spend_key, currency, bucket_end"
        ),
    )
    .await;
    let ledger = counted(
        db,
        &format!(
            "SELECT namespace, rule, spend_key, currency, bucket_end, CAST(SUM(amount) AS BIGINT) FROM spend_ledger \
             WHERE state IN ('reserved', 'committed') AND bucket_end > {after} \
             GROUP BY namespace, rule, spend_key, currency, bucket_end \
             ORDER BY namespace, rule, spend_key, currency, bucket_end"
        ),
    )
    .await;
    (buckets, ledger)
}

async fn window_total(store: &Store, key: &str, window: std::time::Duration, now: DateTime<Utc>) -> i64 {
    let keys = [("cap".to_owned(), key.to_owned(), "USD".to_owned(), window)];
    store.spend_totals("default", &keys, None, now).await.unwrap().values().sum()
}

/// Every way a ledger entry's counted amount changes moves its bucket in step: a
/// reservation, one made again after a retry (later, so in another bucket), a commit, a
/// release by a failure and by an approver's denial, and a reservation whose key changed.
async fn spend_buckets_hold_what_the_ledger_counts_after_reserve_commit_and_release(db: &TestDb) {
    let store = db.store().await;
    let d = claimed_for_agent(&store, "s", 6).await;
    let t0 = Utc::now();
    let later = t0 + chrono::Duration::seconds(10);
    let cap = |key: &str, amount| [spend(key, amount, 1_000_000, HOUR)];
    assert_eq!(allow(&store, &d[0], &cap("agent", 1000), t0).await, Recorded::Reserved);
    // Reserved, retried, reserved again for more, 10 s later.
    assert_eq!(allow(&store, &d[1], &cap("agent", 2000), t0).await, Recorded::Reserved);
    let d1 = retried(&store, &d[1]).await;
    assert_eq!(allow(&store, &d1, &cap("agent", 2500), later).await, Recorded::Reserved);
    // Committed by its delivery, released by a failure.
    assert_eq!(allow(&store, &d[2], &cap("agent", 3000), t0).await, Recorded::Reserved);
    end_attempt(&store, &d[2], DeliveryState::Delivered).await;
    assert_eq!(allow(&store, &d[3], &cap("agent", 4000), t0).await, Recorded::Reserved);
    end_attempt(&store, &d[3], DeliveryState::Failed).await;
    // The rule's `per` value changed between two allows of one delivery.
    assert_eq!(allow(&store, &d[4], &cap("agent/c1", 500), t0).await, Recorded::Reserved);
    let d4 = retried(&store, &d[4]).await;
    assert_eq!(allow(&store, &d4, &cap("agent/c2", 600), later).await, Recorded::Reserved);
    // Allowed, then held on its retry and denied by an approver.
    assert_eq!(allow(&store, &d[5], &cap("agent", 700), t0).await, Recorded::Reserved);
    let d5 = retried(&store, &d[5]).await;
    let approval = approval_request("apr_spend", &d5.event_id, "agent");
    assert_eq!(hold(&store, &d5, approval, later).await, Recorded::Held);
    store.vote_on_approval("apr_spend", "approver-1", false, "no", later).await.unwrap();

    let (buckets, ledger) = buckets_and_ledger(db, i64::MIN).await;
    assert_eq!(buckets, ledger, "the buckets hold what the ledger counts");
    assert_eq!(buckets.iter().map(|b| b.5).sum::<i64>(), 1000 + 2500 + 3000 + 600);
    let now = later + chrono::Duration::seconds(1);
    assert_eq!(window_total(&store, "agent", HOUR, now).await, 1000 + 2500 + 3000);
    assert_eq!(window_total(&store, "agent/c1", HOUR, now).await, 0);
    assert_eq!(window_total(&store, "agent/c2", HOUR, now).await, 600);
    // A delivery deciding again leaves its own reservation out.
    let keys = [("cap".to_owned(), "agent".to_owned(), "USD".to_owned(), HOUR)];
    let without_d1 = store.spend_totals("default", &keys, Some(&d1.id), now).await.unwrap();
    assert_eq!(without_d1.values().sum::<i64>(), 1000 + 3000);
}

/// Spend stops counting once its bucket has left the window (at most one bucket width, a
/// window's 1/360th, late); a later reservation prunes the bucket, and a rule whose window
/// is made longer counts it again (from the ledger, then rebuilt), limit included.
async fn spend_leaves_its_window_and_a_longer_window_counts_it_again(db: &TestDb) {
    let store = db.store().await;
    let d = claimed_for_agent(&store, "w", 4).await;
    let t0 = Utc::now();
    let width = chrono::Duration::seconds(10);
    assert_eq!(allow(&store, &d[0], &[spend("agent", 1000, 1600, HOUR)], t0).await, Recorded::Reserved);
    let hour = chrono::Duration::hours(1);
    assert_eq!(window_total(&store, "agent", HOUR, t0 + hour - chrono::Duration::seconds(1)).await, 1000);
    assert_eq!(window_total(&store, "agent", HOUR, t0 + hour).await, 1000, "late, never early");
    assert_eq!(window_total(&store, "agent", HOUR, t0 + hour + width).await, 0, "left the window");

    // Two hours on, a reservation prunes the bucket that left its window.
    let t1 = t0 + hour * 2;
    assert_eq!(allow(&store, &d[1], &[spend("agent", 500, 1600, HOUR)], t1).await, Recorded::Reserved);
    let (buckets, _) = buckets_and_ledger(db, i64::MIN).await;
    assert_eq!(buckets.iter().map(|b| b.5).collect::<Vec<_>>(), [500], "the first bucket was pruned");
    assert_eq!(window_total(&store, "agent", HOUR, t1).await, 500);

    // The rule's window becomes a day: the pruned spend counts again, against the limit too.
    let day = 24 * HOUR;
    assert_eq!(window_total(&store, "agent", day, t1).await, 1500);
    let over = allow(&store, &d[2], &[spend("agent", 200, 1600, day)], t1).await;
    assert_eq!(over, Recorded::OverLimit("cap".into()));
    assert_eq!(allow(&store, &d[2], &[spend("agent", 100, 1600, day)], t1).await, Recorded::Reserved);
    let (buckets, ledger) = buckets_and_ledger(db, i64::MIN).await;
    assert_eq!(buckets, ledger, "rebuilt from the ledger");
    assert_eq!(window_total(&store, "agent", day, t1).await, 1600);
    assert_eq!(allow(&store, &d[3], &[spend("agent", 1, 1600, day)], t1).await, Recorded::OverLimit("cap".into()));
}

/// One batch of decisions, as the decision writer commits it: each allow is checked
/// against what the batch's earlier allows reserved, so the batch fills the limit exactly
/// and the allow after it is refused; a refused allow, a lost lease and a hold in the same
/// batch write nothing of theirs but what they should; every recorded decision has its
/// audit record, appended in order on one chain.
async fn a_batch_of_decisions_reserves_up_to_the_limit_and_records_each_outcome(db: &TestDb) {
    let store = db.store().await;
    let d = claimed_for_agent(&store, "b", 8).await;
    let now = Utc::now();
    let write = |claim: &ClaimedDelivery, record: DecisionRecord, verdict: ToRecord| DecisionWrite {
        id: claim.id.clone(),
        lease_token: claim.lease_token.clone(),
        namespace: claim.namespace.clone(),
        record,
        verdict,
    };
    let spending =
        |amount| ToRecord::Allow { reservations: vec![spend("agent", amount, 1000, HOUR)], enforce_limits: true };
    let two_rules = ToRecord::Allow {
        reservations: vec![
            SpendReservation { rule: "other".into(), ..spend("agent", 10, 1000, HOUR) },
            spend("agent", 300, 1000, HOUR),
        ],
        enforce_limits: true,
    };
    let mut stolen = write(&d[3], allowed(), spending(100));
    stolen.lease_token = "not-the-lease".into();
    let heads_before = store.audit_heads().await.unwrap();
    let writes = [
        write(&d[0], allowed(), spending(400)),
        write(&d[1], allowed(), spending(350)),
        // 750 reserved: its second rule would pass, its first not; neither is written.
        write(&d[2], allowed(), two_rules),
        stolen,
        write(&d[4], held(), ToRecord::Hold(Box::new(approval_request("apr_batch", &d[4].event_id, "agent")))),
        write(&d[5], allowed(), spending(250)),
        // Exactly at the limit now: one more unit is over.
        write(&d[6], allowed(), spending(1)),
        write(&d[7], allowed(), ToRecord::Allow { reservations: Vec::new(), enforce_limits: true }),
    ];
    let results = store.record_decisions(&writes, now).await.unwrap();
    assert_eq!(
        results,
        [
            Recorded::Reserved,
            Recorded::Reserved,
            Recorded::OverLimit("cap".into()),
            Recorded::LeaseLost,
            Recorded::Held,
            Recorded::Reserved,
            Recorded::OverLimit("cap".into()),
            Recorded::Reserved,
        ]
    );
    assert_eq!(window_total(&store, "agent", HOUR, now).await, 1000, "filled to the limit, not past it");
    let other = [("other".to_owned(), "agent".to_owned(), "USD".to_owned(), HOUR)];
    assert_eq!(store.spend_totals("default", &other, None, now).await.unwrap().values().sum::<i64>(), 0);
    let (buckets, ledger) = buckets_and_ledger(db, i64::MIN).await;
    assert_eq!(buckets, ledger, "the buckets hold what the ledger counts");

    // The decisions recorded are on their deliveries; the others are untouched.
    for (claim, decided) in d.iter().zip([true, true, false, false, true, true, false, true]) {
        let (shown, _) = store.get_delivery(&claim.id).await.unwrap().expect("the delivery");
        assert_eq!(shown.decision.is_some(), decided, "{}", claim.id);
    }
    let (approval, _) = store.get_approval("apr_batch").await.unwrap().expect("the approval request");
    assert_eq!(approval.state, "pending");

    // One append: the chain grew by five decisions and one approval request, in batch order.
    let start = heads_before.iter().find(|(c, _, _)| c == "default").map_or(0, |(_, seq, _)| *seq);
    let records = store.audit_records("default", start + 1, i64::MAX, 100).await.unwrap();
    let subjects: Vec<(String, String)> = records.iter().map(|r| (r.action.clone(), r.subject.clone())).collect();
    let decision = |claim: &ClaimedDelivery| ("policy.decision".to_owned(), format!("delivery/{}", claim.id));
    assert_eq!(
        subjects,
        [
            decision(&d[0]),
            decision(&d[1]),
            decision(&d[4]),
            ("approval.requested".to_owned(), "approval/apr_batch".to_owned()),
            decision(&d[5]),
            decision(&d[7]),
        ]
    );
    assert!(records.windows(2).all(|w| w[1].seq == w[0].seq + 1 && w[1].prev_hash == w[0].hash), "gapless");
}

/// A database migrated from before the buckets counts the ledger it has, in 1-minute buckets.
/// Every migration but the buckets' runs first: the store writes the events of the ledger
/// with the columns of this build.
async fn migrating_counts_an_existing_ledger_into_buckets(db: &TestDb) {
    let backend = if db.is_postgres() { "postgres" } else { "sqlite" };
    let before = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(format!("{}/migrations/{backend}", env!("CARGO_MANIFEST_DIR"))).unwrap() {
        let path = entry.unwrap().path();
        if !path.file_name().unwrap().to_str().unwrap().starts_with("0010_") {
            std::fs::copy(&path, before.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let old = sqlx::migrate::Migrator::new(before.path()).await.unwrap();
    // The store's connection options (SQLite: its file, created) before the store migrates.
    let store = Store::connect(&db.url()).await.unwrap();
    {
        use sqlx::Connection as _;
        if db.is_postgres() {
            let mut c = sqlx::PgConnection::connect(&db.url()).await.unwrap();
            old.run(&mut c).await.unwrap();
        } else {
            let mut c = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
            old.run(&mut c).await.unwrap();
        }
    }
    // Four deliveries to the agent, written as the schema before 0010 holds them (this
    // build's ingest needs later tables), then claimed by this build.
    for n in 0..4 {
        let (event, delivery) = (EventId::generate(), DeliveryId::generate());
        let statements = [
            "INSERT INTO events (id, namespace, source, external_id, type, data, content_type, ingested_by, \
             trace_id, received_at, status) VALUES ($1, 'default', 'shop', $2, 'order.created', '{}', \
             'application/json', 'tester', '', $3, 'accepted')",
            "INSERT INTO deliveries (id, event_id, namespace, endpoint, state, next_attempt_at, created_at, \
             updated_at) VALUES ($1, $2, 'default', 'agent', 'pending', $3, $3, $3)",
        ];
        let now = Utc::now() - chrono::Duration::seconds(1);
        use sqlx::Connection as _;
        let (first, second) = ([event.as_str(), &format!("m-{n}")], [delivery.as_str(), event.as_str()]);
        for (insert, [a, b]) in statements.into_iter().zip([first, second]) {
            if db.is_postgres() {
                let mut c = sqlx::PgConnection::connect(&db.url()).await.unwrap();
                sqlx::query(insert).bind(a).bind(b).bind(now).execute(&mut c).await.unwrap();
            } else {
                let mut c = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
                sqlx::query(insert).bind(a).bind(b).bind(now).execute(&mut c).await.unwrap();
            }
        }
    }
    let d = store.claim_due_deliveries(Utc::now(), LEASE, 100).await.unwrap();
    assert_eq!(d.len(), 4);
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    let entries = [
        (&d[0], "agent", 100, "reserved", at("2026-12-01T10:00:01.5Z")),
        (&d[1], "agent", 200, "committed", at("2026-12-01T10:00:59.999Z")),
        (&d[2], "agent", 400, "released", at("2026-12-01T10:00:30Z")),
        (&d[3], "agent/x", 800, "committed", at("2026-12-01T10:01:00Z")),
    ];
    for (claim, key, amount, state, created_at) in entries {
        let insert = "INSERT INTO spend_ledger (delivery_id, namespace, rule, spend_key, currency, amount, state, \
                      created_at) VALUES ($1, 'default', 'cap', $2, 'USD', $3, $4, $5)";
        use sqlx::Connection as _;
        if db.is_postgres() {
            let mut c = sqlx::PgConnection::connect(&db.url()).await.unwrap();
            let q = sqlx::query(insert).bind(claim.id.as_str()).bind(key).bind(amount).bind(state).bind(created_at);
            q.execute(&mut c).await.unwrap();
        } else {
            let mut c = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
            let q = sqlx::query(insert).bind(claim.id.as_str()).bind(key).bind(amount).bind(state).bind(created_at);
            q.execute(&mut c).await.unwrap();
        }
    }
    store.migrate().await.unwrap();
    let (buckets, ledger) = buckets_and_ledger(db, i64::MIN).await;
    assert_eq!(buckets, ledger);
    let minute = |s: &str| at(s).timestamp_millis();
    let row = |key: &str, end: i64, amount: i64| {
        ("default".to_owned(), "cap".to_owned(), key.to_owned(), "USD".to_owned(), end, amount)
    };
    assert_eq!(
        buckets,
        [row("agent", minute("2026-12-01T10:01:00Z"), 300), row("agent/x", minute("2026-12-01T10:02:00Z"), 800)]
    );
}

async fn ingest_leases_refill_take_all_or_nothing_and_count_per_utc_day(store: &Store) {
    use hookwarden::ingest::quota::{Lease, Limit};
    let limit = Limit { per_second: 10, burst: 20, per_day: Some(30) };
    let t0 = DateTime::parse_from_rfc3339("2026-12-04T23:59:58Z").unwrap().with_timezone(&Utc);
    let lease = |need: u64, batch: u64, at: DateTime<Utc>| store.lease_ingest_tokens("shop", &limit, need, batch, at);
    let Some(first) = lease(5, 15, t0).await.unwrap() else {
        // SQLite: one process, its buckets in memory (`ingest::quota`).
        assert!(matches!(store.backend(), hookwarden::store::Backend::Sqlite));
        return;
    };
    assert_eq!(first, Lease { granted: 15, bucket_micro: 5_000_000, used_today: 15 }, "a new bucket starts full");
    // Fewer than the batch but at least what is needed: what is there.
    assert_eq!(lease(3, 15, t0).await.unwrap().unwrap(), Lease { granted: 5, bucket_micro: 0, used_today: 20 });
    // Less than needed: nothing taken.
    let later = t0 + chrono::Duration::milliseconds(500);
    assert_eq!(
        lease(6, 6, later).await.unwrap().unwrap(),
        Lease { granted: 0, bucket_micro: 5_000_000, used_today: 20 }
    );
    // Refilled at 10/s, up to the burst, and the day's count caps the grant.
    let full = t0 + chrono::Duration::milliseconds(1900);
    assert_eq!(
        lease(1, 20, full).await.unwrap().unwrap(),
        Lease { granted: 10, bucket_micro: 9_000_000, used_today: 30 }
    );
    assert_eq!(lease(1, 1, full).await.unwrap().unwrap().granted, 0, "perDay spent");
    // A new UTC day counts from zero.
    let next_day = t0 + chrono::Duration::seconds(3);
    assert_eq!(
        lease(1, 5, next_day).await.unwrap().unwrap(),
        Lease { granted: 5, bucket_micro: 15_000_000, used_today: 5 }
    );
}

macro_rules! conformance {
    ($($case:ident),* $(,)?; $($db_case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let db = super::TestDb::sqlite();
                    super::$case(&db.store().await).await;
                }
            )*
            $(
                #[tokio::test]
                async fn $db_case() {
                    super::$db_case(&super::TestDb::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(db) = super::TestDb::postgres().await else { return };
                    super::$case(&db.store().await).await;
                }
            )*
            $(
                #[tokio::test]
                async fn $db_case() {
                    let Some(db) = super::TestDb::postgres().await else { return };
                    super::$db_case(&db).await;
                }
            )*
        }
    };
}

conformance!(
    an_accepted_event_reads_back_verbatim,
    a_repeated_source_and_id_is_a_duplicate_of_the_original,
    the_same_id_from_another_source_or_namespace_is_a_new_event,
    duplicates_within_one_group_commit_point_to_the_first,
    an_idempotency_key_replays_the_original_result,
    one_key_twice_in_one_group_commit_writes_once,
    keys_of_different_callers_do_not_collide,
    expired_idempotency_keys_are_forgotten,
    events_list_newest_first_by_source_and_type_with_paging,
    a_repeated_id_is_a_duplicate_within_the_dedup_window_and_a_new_event_after_it,
    a_replay_past_the_window_is_delivered_again_and_one_within_it_is_not,
    an_idempotency_key_is_free_again_past_the_dedup_window,
    retention_deletes_old_events_with_their_deliveries_and_attempts_but_not_waiting_ones,
    retention_works_in_bounded_batches,
    retention_keeps_an_operational_event_until_it_is_fanned_out,
    a_namespace_usage_counts_what_it_holds,
    ingest_leases_refill_take_all_or_nothing_and_count_per_utc_day,
    concurrent_group_commits_lose_nothing_and_store_each_identity_once,
    readiness_requires_the_migrations,
    resources_apply_atomically_and_keep_status_per_generation,
    leadership_is_exclusive,
    leader_only_writes_of_an_ended_term_are_refused,
    fan_out_is_written_with_the_event_and_claimed_once,
    the_deliveries_of_many_events_and_of_one_with_its_attempts_are_read_at_once,
    an_expired_lease_makes_the_delivery_claimable_again,
    an_ordered_lane_releases_one_delivery_at_a_time,
    an_open_breaker_holds_an_endpoints_deliveries,
    a_disabled_endpoint_parks_its_deliveries_until_its_spec_changes,
    an_operator_enables_a_disabled_endpoint_without_a_spec_change,
    operational_events_leave_the_outbox_once,
    every_change_to_the_resources_moves_the_revision_and_ingest_commits_check_it,
    final_deliveries_can_be_replayed_and_released_ones_keep_their_count,
    concurrent_audit_appends_keep_each_chain_gapless_and_linked,
    a_lane_keeps_its_order_through_release_denial_and_replay,
    claims_take_at_most_each_endpoints_cap_oldest_first,
    the_half_open_probe_is_taken_by_one_claim_at_a_time,
    the_retry_budget_allows_so_many_retries_per_rolling_hour,
    an_events_cloudevents_attributes_read_back_with_it_and_its_claims,
    ;
    // Cases that also look at the database behind the store's back.
    an_unmigrated_database_is_not_ready,
    spend_buckets_hold_what_the_ledger_counts_after_reserve_commit_and_release,
    spend_leaves_its_window_and_a_longer_window_counts_it_again,
    a_batch_of_decisions_reserves_up_to_the_limit_and_records_each_outcome,
    migrating_counts_an_existing_ledger_into_buckets,
    an_outbox_row_that_does_not_read_holds_up_no_other,
);
