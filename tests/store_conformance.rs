//! The storage conformance suite: every case runs against SQLite and against PostgreSQL.

mod common;

use std::collections::HashSet;

use chrono::Utc;
use common::TestDb;
use hookwarden::ids::EventId;
use hookwarden::store::{
    EventOutcome, EventQuery, IdempotencyKey, IngestRequest, NewEvent, RequestOutcome, Store, StoreError,
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
        ingested_by: "tester".to_owned(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
        received_at: Utc::now(),
    }
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
    let status = serde_json::json!({"observedGeneration": 1});
    assert!(store.update_resource_status(&key, 1, &status).await.unwrap());
    let changed =
        ApplyRequest { resources: vec![desired("a", serde_json::json!({"expression": "false"}))], ..request.clone() };
    assert_eq!(store.apply_resources(&changed).await.unwrap()[0].generation, 2);
    assert!(!store.update_resource_status(&key, 1, &status).await.unwrap(), "stale status refused");
    assert_eq!(store.get_resource(&key).await.unwrap().unwrap().status, Some(status));

    // A dry-run prune reports, and keeps, what a real one deletes.
    let prune = ApplyRequest { prune: true, dry_run: true, ..changed.clone() };
    let outcomes = store.apply_resources(&prune).await.unwrap();
    assert_eq!(outcomes.iter().filter(|o| o.action == ApplyAction::Pruned).count(), 1);
    assert_eq!(store.list_resources(None, None).await.unwrap().len(), 2);
    store.apply_resources(&ApplyRequest { dry_run: false, ..prune }).await.unwrap();
    assert_eq!(store.list_resources(None, None).await.unwrap().len(), 1);
    assert!(store.delete_resource(&key).await.unwrap().is_some());
    assert!(store.delete_resource(&key).await.unwrap().is_none());
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

async fn readiness_requires_the_migrations(store: &Store) {
    store.check_ready().await.expect("a migrated store is ready");
}

async fn an_unmigrated_database_is_not_ready(db: &TestDb) {
    let store = Store::connect(&db.url()).await.unwrap();
    assert!(matches!(store.check_ready().await, Err(StoreError::NotMigrated { found: None, .. })));
    store.migrate().await.unwrap();
    store.check_ready().await.unwrap();
    // Migrating again is a no-op.
    store.migrate().await.unwrap();
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let db = super::TestDb::sqlite();
                    super::$case(&db.store().await).await;
                }
            )*
            #[tokio::test]
            async fn an_unmigrated_database_is_not_ready() {
                super::an_unmigrated_database_is_not_ready(&super::TestDb::sqlite()).await;
            }
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(db) = super::TestDb::postgres().await else { return };
                    super::$case(&db.store().await).await;
                }
            )*
            #[tokio::test]
            async fn an_unmigrated_database_is_not_ready() {
                let Some(db) = super::TestDb::postgres().await else { return };
                super::an_unmigrated_database_is_not_ready(&db).await;
            }
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
    concurrent_group_commits_lose_nothing_and_store_each_identity_once,
    readiness_requires_the_migrations,
    resources_apply_atomically_and_keep_status_per_generation,
    leadership_is_exclusive,
);
