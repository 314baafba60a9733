//! The Namespace resource against a real server and a real database: who may apply it,
//! its field errors, the settings and usage `GET /v1/namespaces` shows, its limits at
//! apply and at ingest, `unknownEventTypes` over the configuration, and the dedup window
//! end to end with a real receiver.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::receiver::{TestReceiver, SECRET};
use common::{eventually, json_with_status, spawn_app, spawn_app_with, token, TestDb};
use hookwarden::auth::Role;
use hookwarden::ids::EventId;
use hookwarden::store::{IngestRequest, NewEvent};
use serde_json::{json, Value};

const PAYMENTS: &str = r#"
apiVersion: hookwarden/v1
kind: Namespace
metadata: {name: payments}
spec:
  retention: {events: 30d, deadLetters: 14d, attempts: 7d}
  dedupWindow: 72h
  quotas:
    ingest: {perSecond: 500, burst: 1000, perDay: 5000000}
    maxEndpoints: 2
    maxPayloadBytes: 64
"#;

async fn apply_as(app: &common::TestApp, token: &str, yaml: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/apply"))
        .bearer_auth(token)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .expect("request sent")
}

/// `(document, path)` of each error of a refused apply.
async fn apply_errors(response: reqwest::Response) -> Vec<(u64, String, String)> {
    let body = json_with_status(response, 422).await;
    body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["document"].as_u64().unwrap(),
                e["path"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn endpoint(name: &str, namespace: &str, url: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n"
    )
}

fn event(namespace: &str, id: &str, data: Value) -> Value {
    json!({"id": id, "source": "shop", "type": "order.created", "namespace": namespace, "data": data})
}

async fn applying_a_namespace_needs_admin_over_every_namespace(db: TestDb) {
    let app = spawn_app(&db).await;
    let operator = token("ops", &[Role::Operator], &["*"]);
    let tenant_admin = token("tenant", &[Role::Admin], &["payments"]);
    for who in [&operator, &tenant_admin] {
        let body = json_with_status(apply_as(&app, who, PAYMENTS).await, 403).await;
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
    }
    let body = json_with_status(apply_as(&app, &app.admin, PAYMENTS).await, 200).await;
    assert_eq!(
        body["results"],
        json!([{"kind": "Namespace", "name": "payments", "action": "created", "generation": 1, "diff": body["results"][0]["diff"]}])
    );
    // Deleting one, too; the tenant's admin may still read its own namespace.
    let delete = |who: &str| app.client.delete(app.url("/v1/namespaces/payments")).bearer_auth(who.to_owned()).send();
    assert_eq!(delete(&tenant_admin).await.unwrap().status(), 403);
    let shown = json_with_status(app.get("/v1/namespaces/payments", &tenant_admin).await, 200).await;
    assert_eq!(shown["status"]["resource"], true);
    assert_eq!(shown["metadata"].get("namespace"), None, "cluster-scoped: no namespace");
    let deleted = json_with_status(delete(&app.admin).await.unwrap(), 200).await;
    assert_eq!((deleted["kind"].as_str(), deleted["action"].as_str()), (Some("Namespace"), Some("deleted")));
    let shown = json_with_status(app.get("/v1/namespaces/payments", &app.admin).await, 200).await;
    assert_eq!(shown["status"]["resource"], false, "the defaults again");
    // Another tenant's namespace answers like a missing one.
    assert_eq!(app.get("/v1/namespaces/other", &tenant_admin).await.status(), 404);
    // Both changes are in the audit chain of the namespace the Namespace governs.
    let page = json_with_status(app.get("/v1/audit?namespace=payments", &app.admin).await, 200).await;
    let actions: Vec<(&str, &str)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["subject"].as_str().unwrap()))
        .collect();
    assert_eq!(actions, [("resource.created", "Namespace/payments"), ("resource.deleted", "Namespace/payments")]);
}

async fn a_bad_namespace_is_refused_at_each_field_path(db: TestDb) {
    let app = spawn_app(&db).await;
    let yaml = "apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: payments, namespace: payments}\nspec: {}\n---\n\
apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: Bad_Name}\nspec:\n  retention: {events: 30s, attempts: soon}\n---\n\
apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: b}\nspec:\n  retention: {events: 1h}\n  dedupWindow: 2h\n  unknownEventTypes: maybe\n---\n\
apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: c}\nspec:\n  dedupWindow: 0s\n  quotas: {ingest: {perSecond: 0, burst: 1, perDay: 0}, maxEndpoints: 0, maxPayloadBytes: 0, maxWidgets: 1}\n---\n\
apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: d}\nspec:\n  retention: {events: 1h}\n  dedupWindow: 2h\n  quotas: {ingest: {perSecond: 0, burst: 1, perDay: 0}, maxEndpoints: 0, maxPayloadBytes: 0}\n";
    let errors = apply_errors(apply_as(&app, &app.admin, yaml).await).await;
    let paths: Vec<(u64, &str)> = errors.iter().map(|(d, p, _)| (*d, p.as_str())).collect();
    for expected in [
        (0, "metadata.namespace"),
        (1, "spec.retention.attempts"),
        (2, "spec.unknownEventTypes"),
        (3, "spec.quotas.maxWidgets"),
        (4, "spec.dedupWindow"),
        (4, "spec.quotas.ingest.perSecond"),
        (4, "spec.quotas.ingest.perDay"),
        (4, "spec.quotas.maxEndpoints"),
        (4, "spec.quotas.maxPayloadBytes"),
    ] {
        assert!(paths.contains(&expected), "missing {expected:?} in {errors:#?}");
    }
    let dedup = errors.iter().find(|(d, p, _)| *d == 4 && p == "spec.dedupWindow").unwrap();
    assert!(dedup.2.contains("retention.events"), "{dedup:?}");
    let namespaced = errors.iter().find(|(d, _, _)| *d == 0).unwrap();
    assert!(namespaced.2.contains("cluster-scoped"), "{namespaced:?}");
    // The same file's valid documents and their kind's other mistakes.
    let yaml =
        "apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: Bad_Name}\nspec:\n  retention: {events: 30s}\n";
    let errors = apply_errors(apply_as(&app, &app.admin, yaml).await).await;
    let paths: Vec<&str> = errors.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(paths, vec!["metadata.name", "spec.retention.events"], "{errors:#?}");
}

async fn a_namespace_shows_its_settings_and_what_it_holds(db: TestDb) {
    let mut config = db.config();
    config.allow_private_urls = true;
    let app = spawn_app_with(config).await;
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    app.apply_yaml(&format!("{PAYMENTS}---\n{}", endpoint("shop", "payments", &receiver.url("/hook")))).await;
    let viewer = token("viewer", &[Role::Viewer], &["payments"]);
    for id in ["o-1", "o-2"] {
        json_with_status(
            app.post_json("/v1/events", &app.admin, event("payments", id, json!({})).to_string()).await,
            202,
        )
        .await;
    }
    eventually(Duration::from_secs(10), "both delivered", || async { receiver.on("/hook").len() == 2 }).await;
    let shown = json_with_status(app.get("/v1/namespaces/payments", &viewer).await, 200).await;
    assert_eq!(shown["kind"], "Namespace");
    assert_eq!(shown["spec"]["quotas"]["maxEndpoints"], 2);
    let status = &shown["status"];
    assert_eq!(
        status["settings"],
        json!({"retention": {"events": "720h", "deadLetters": "336h", "attempts": "168h"}, "dedupWindow": "72h",
               "maxEndpoints": 2, "maxPayloadBytes": 64, "unknownEventTypes": null})
    );
    assert_eq!(status["eventsToday"], 2);
    assert_eq!(status["endpoints"], 1);
    assert_eq!(status["rows"]["events"], 2);
    assert_eq!(status["rows"]["deliveries"], 2);
    eventually(Duration::from_secs(10), "the attempts recorded", || async {
        let shown = json_with_status(app.get("/v1/namespaces/payments", &viewer).await, 200).await;
        shown["status"]["rows"]["attempts"] == 2
    })
    .await;
    assert!(status["oldestEvent"].is_string(), "{status}");
    // A namespace without a Namespace gets the server's defaults.
    let shown = json_with_status(app.get("/v1/namespaces/default", &app.admin).await, 200).await;
    assert_eq!(shown["status"]["resource"], false);
    assert_eq!(shown["status"]["settings"]["dedupWindow"], "72h");
    assert_eq!(shown["status"]["settings"]["retention"]["events"], "720h");
    // The list: the namespaces the token may see.
    let listed = json_with_status(app.get("/v1/namespaces", &viewer).await, 200).await;
    let names: Vec<&str> =
        listed["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["payments"]);
    assert_eq!(app.get("/v1/namespaces/Not_A_Label", &app.admin).await.status(), 404);
    let body = json_with_status(app.get("/v1/namespaces?namespace=payments", &app.admin).await, 400).await;
    assert_eq!(body["error"]["code"], "validation_failed", "{body}");
    // `hookwarden get namespaces`: a table of the same.
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
            .args(["get", "namespaces"])
            .env("HOOKWARDEN_SERVER", &app.base)
            .env("HOOKWARDEN_TOKEN", &viewer)
            .output()
            .expect("run the CLI")
    });
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table} {}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0][..5], ["NAME", "RESOURCE", "RETENTION", "DEDUP", "EVENTS-TODAY"]);
    assert_eq!(lines[1][..6], ["payments", "yes", "720h", "72h", "2", "2"], "{table}");
}

async fn max_endpoints_is_enforced_at_apply(db: TestDb) {
    let app = spawn_app(&db).await;
    app.apply_yaml(PAYMENTS).await;
    let one = |name: &str| endpoint(name, "payments", "https://hooks.example.com/x");
    app.apply_yaml(&format!("{}---\n{}", one("a"), one("b"))).await;
    let errors = apply_errors(apply_as(&app, &app.admin, &one("c")).await).await;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].1, "metadata.name");
    assert!(errors[0].2.contains("at most 2 Endpoints"), "{errors:#?}");
    // Re-applying one it holds is fine; another namespace is not limited.
    app.apply_yaml(&one("a")).await;
    app.apply_yaml(&endpoint("c", "default", "https://hooks.example.com/x")).await;
    // Lowering the limit under what the namespace holds is refused at the quota.
    let lower = PAYMENTS.replace("maxEndpoints: 2", "maxEndpoints: 1");
    let errors = apply_errors(apply_as(&app, &app.admin, &lower).await).await;
    assert_eq!(errors.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), vec!["spec.quotas.maxEndpoints"]);
}

async fn max_payload_bytes_is_enforced_at_ingest_with_413_at_data(db: TestDb) {
    let app = spawn_app(&db).await;
    app.apply_yaml(PAYMENTS).await;
    let big = json!({"note": "x".repeat(100)});
    let body = json_with_status(
        app.post_json("/v1/events", &app.admin, event("payments", "p-1", big.clone()).to_string()).await,
        413,
    )
    .await;
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert_eq!(body["error"]["details"][0]["path"], "data");
    assert!(body["error"]["details"][0]["message"].as_str().unwrap().contains("at most 64"), "{body}");
    let batch = json!([event("payments", "p-2", json!({})), event("payments", "p-3", big.clone())]);
    let body = json_with_status(app.post_json("/v1/events/batch", &app.admin, batch.to_string()).await, 413).await;
    assert_eq!(body["error"]["details"].as_array().unwrap().len(), 1);
    assert_eq!(body["error"]["details"][0]["path"], "[1].data");
    let listed = json_with_status(app.get("/v1/events?namespace=payments", &app.admin).await, 200).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "nothing of the batch was written");
    // Small data passes; another namespace has no limit.
    json_with_status(
        app.post_json("/v1/events", &app.admin, event("payments", "p-4", json!({})).to_string()).await,
        202,
    )
    .await;
    json_with_status(app.post_json("/v1/events", &app.admin, event("default", "p-5", big).to_string()).await, 202)
        .await;
}

async fn the_namespace_s_unknown_event_types_wins_over_the_configuration(db: TestDb) {
    let mut config = db.config();
    config.ingest.unknown_event_types = hookwarden::config::UnknownEventTypes::Reject;
    let app = spawn_app_with(config).await;
    let unknown = |namespace: &str| event(namespace, "u-1", json!({})).to_string();
    let body = json_with_status(app.post_json("/v1/events", &app.admin, unknown("open")).await, 400).await;
    assert_eq!(body["error"]["code"], "unknown_event_type");
    app.apply_yaml("apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: open}\nspec: {unknownEventTypes: accept}\n---\napiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: closed}\nspec: {unknownEventTypes: reject}\n").await;
    json_with_status(app.post_json("/v1/events", &app.admin, unknown("open")).await, 202).await;
    let body = json_with_status(app.post_json("/v1/events", &app.admin, unknown("closed")).await, 400).await;
    assert_eq!(body["error"]["code"], "unknown_event_type");
    let body = json_with_status(app.post_json("/v1/events", &app.admin, unknown("default")).await, 400).await;
    assert_eq!(body["error"]["code"], "unknown_event_type", "the configuration stays the default");
}

async fn a_repeat_past_the_dedup_window_is_delivered_again(db: TestDb) {
    let mut config = db.config();
    config.allow_private_urls = true;
    let app = spawn_app_with(config).await;
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    // A short window (a small configured delay, not a long sleep).
    app.apply_yaml(&format!(
        "apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {{name: shop}}\nspec: {{dedupWindow: 1s}}\n---\n{}",
        endpoint("hook", "shop", &receiver.url("/hook"))
    ))
    .await;
    let post = || app.post_json("/v1/events", &app.admin, event("shop", "order-7", json!({"n": 7})).to_string());
    let first = json_with_status(post().await, 202).await;
    let accepted = std::time::Instant::now();
    let repeat = json_with_status(post().await, 200).await;
    assert_eq!((repeat["duplicate"].as_bool(), &repeat["id"]), (Some(true), &first["id"]), "within the window");
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(accepted.elapsed())).await;
    let later = json_with_status(post().await, 202).await;
    assert_eq!(later["duplicate"], false, "past the window: a new event");
    assert_ne!(later["id"], first["id"]);
    eventually(Duration::from_secs(10), "delivered twice", || async { receiver.on("/hook").len() == 2 }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.on("/hook").len(), 2, "once per window, not per repeat");
}

/// An event of namespace `shop` received `age` ago (the clock retention reads), written
/// through the store.
fn stored_event(external_id: &str, age: chrono::Duration) -> NewEvent {
    NewEvent {
        id: EventId::generate(),
        namespace: "shop".into(),
        source: "shop".into(),
        external_id: external_id.into(),
        event_type: "order.created".into(),
        subject: None,
        time: None,
        data: "{}".into(),
        content_type: "application/json".into(),
        ingested_by: "tester".into(),
        trace_id: String::new(),
        received_at: chrono::Utc::now() - age,
        deliveries: Vec::new(),
        dedup_window: Some(Duration::from_secs(3600)),
        attributes: Default::default(),
    }
}

async fn the_leader_deletes_what_is_past_retention_and_counts_it(db: TestDb) {
    let mut config = db.config();
    config.retention.period = Duration::from_millis(100);
    let app = spawn_app_with(config).await;
    app.apply_yaml("apiVersion: hookwarden/v1\nkind: Namespace\nmetadata: {name: shop}\nspec: {retention: {events: 1h}, dedupWindow: 1h}\n").await;
    let (old, recent) =
        (stored_event("r-old", chrono::Duration::hours(2)), stored_event("r-new", chrono::Duration::minutes(1)));
    let request = IngestRequest { idempotency: None, events: vec![old.clone(), recent.clone()] };
    app.store.accept_events(&[request]).await.unwrap();
    eventually(Duration::from_secs(20), "the old event deleted by the leader", || async {
        app.store.get_event(&old.id).await.unwrap().is_none()
    })
    .await;
    assert!(app.store.get_event(&recent.id).await.unwrap().is_some(), "within retention: kept");
    // Counted once the batch returns, a moment after its transaction committed.
    eventually(Duration::from_secs(5), "the deletion counted", || async {
        let deleted = common::metric(&app.base, "hookwarden_retention_deleted_total", &[("table", "events")]).await;
        deleted.is_some_and(|n| n >= 1.0)
    })
    .await;
}

on_both_databases!(
    the_leader_deletes_what_is_past_retention_and_counts_it,
    applying_a_namespace_needs_admin_over_every_namespace,
    a_bad_namespace_is_refused_at_each_field_path,
    a_namespace_shows_its_settings_and_what_it_holds,
    max_endpoints_is_enforced_at_apply,
    max_payload_bytes_is_enforced_at_ingest_with_413_at_data,
    the_namespace_s_unknown_event_types_wins_over_the_configuration,
    a_repeat_past_the_dedup_window_is_delivered_again,
);
