//! EventTypes against a real server and a real database: refused at apply when their
//! schema or examples are wrong, events checked against them at ingest, the catalog.

#[macro_use]
mod common;

use common::{json_with_status, spawn_app, spawn_app_with, token, TestDb};
use hookwarden::auth::Role;
use hookwarden::config::UnknownEventTypes;
use serde_json::{json, Value};

const ORDER_TYPE: &str = r#"
apiVersion: hookwarden/v1
kind: EventType
metadata: {name: order.created, namespace: payments}
spec:
  description: An order was placed.
  schema:
    type: object
    required: [order_id, total]
    properties:
      order_id: {type: integer}
      total: {type: integer, minimum: 0}
      currency: {enum: [EUR, USD]}
      sku: {type: string, pattern: "^[A-Z]{3}-[0-9]+$"}
      customer:
        type: object
        required: [email]
        properties: {email: {type: string}}
      items:
        type: array
        items: {type: object, properties: {qty: {type: integer, minimum: 1}}}
    additionalProperties: false
  examples: [{order_id: 1001, total: 4200}]
"#;

fn event(event_type: &str, namespace: &str, data: Value) -> Value {
    json!({"source": "shop", "type": event_type, "namespace": namespace, "data": data})
}

/// The error code and details of a refused request.
async fn refusal(response: reqwest::Response, status: u16) -> (String, Value) {
    let body = json_with_status(response, status).await;
    (body["error"]["code"].as_str().unwrap_or_default().to_owned(), body["error"]["details"].clone())
}

/// `(path, keyword)` of each violation in `details`.
fn found(details: &Value) -> Vec<(String, String)> {
    details
        .as_array()
        .unwrap_or_else(|| panic!("details are not a list: {details}"))
        .iter()
        .map(|v| {
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "no message in {v}");
            (v["path"].as_str().unwrap().to_owned(), v["keyword"].as_str().unwrap().to_owned())
        })
        .collect()
}

async fn events_in(app: &common::TestApp, namespace: &str) -> usize {
    let body = json_with_status(app.get(&format!("/v1/events?namespace={namespace}"), &app.admin).await, 200).await;
    body["items"].as_array().unwrap().len()
}

async fn data_is_checked_by_every_keyword_of_its_schema(db: TestDb) {
    let app = spawn_app(&db).await;
    app.apply_yaml(ORDER_TYPE).await;
    let valid = json!({"order_id": 1, "total": 0, "currency": "EUR", "sku": "ABC-12",
                       "customer": {"email": "a@example.com"}, "items": [{"qty": 1}, {"qty": 3}]});
    let response = app.post_json("/v1/events", &app.admin, event("order.created", "payments", valid).to_string()).await;
    json_with_status(response, 202).await;
    let cases = [
        (json!({"order_id": "1", "total": 1}), ("/data/order_id", "type")),
        (json!({"order_id": 1}), ("/data", "required")),
        (json!({"order_id": 1, "total": 1, "currency": "GBP"}), ("/data/currency", "enum")),
        (json!({"order_id": 1, "total": -1}), ("/data/total", "minimum")),
        (json!({"order_id": 1, "total": 1, "sku": "abc"}), ("/data/sku", "pattern")),
        (json!({"order_id": 1, "total": 1, "note": "x"}), ("/data", "additionalProperties")),
        (json!({"order_id": 1, "total": 1, "customer": {"email": 7}}), ("/data/customer/email", "type")),
        (json!({"order_id": 1, "total": 1, "customer": {}}), ("/data/customer", "required")),
        (json!({"order_id": 1, "total": 1, "items": [{"qty": 1}, {"qty": 0}]}), ("/data/items/1/qty", "minimum")),
        (json!({"order_id": 1, "total": 1, "items": {"qty": 1}}), ("/data/items", "type")),
    ];
    for (data, (path, keyword)) in cases {
        let response =
            app.post_json("/v1/events", &app.admin, event("order.created", "payments", data.clone()).to_string()).await;
        let (code, details) = refusal(response, 400).await;
        assert_eq!(code, "schema_violation", "{data}: {details}");
        assert_eq!(found(&details), vec![(path.to_owned(), keyword.to_owned())], "{data}");
    }
    // Every violation at once (at most 20).
    let many = json!({"order_id": "x", "total": -5, "currency": "GBP", "sku": "no"});
    let response = app.post_json("/v1/events", &app.admin, event("order.created", "payments", many).to_string()).await;
    let (_, details) = refusal(response, 400).await;
    assert_eq!(found(&details).len(), 4, "{details}");
    let wide: serde_json::Map<String, Value> = (0..40).map(|i| (format!("k{i}"), json!(i))).collect();
    let response = app
        .post_json("/v1/events", &app.admin, event("order.created", "payments", Value::Object(wide)).to_string())
        .await;
    let (_, details) = refusal(response, 400).await;
    assert!(found(&details).len() <= 20, "{details}");
    assert_eq!(events_in(&app, "payments").await, 1, "only the valid event was stored");
    // Another namespace's event of the same type is not checked by payments' schema.
    let response =
        app.post_json("/v1/events", &app.admin, event("order.created", "default", json!("any")).to_string()).await;
    json_with_status(response, 202).await;
}

async fn a_batch_with_one_bad_item_is_answered_per_item_and_writes_nothing(db: TestDb) {
    let app = spawn_app(&db).await;
    app.apply_yaml(ORDER_TYPE).await;
    let good = |id: i64| event("order.created", "payments", json!({"order_id": id, "total": 5}));
    let batch = json!([good(1), event("order.created", "payments", json!({"order_id": 2, "total": -1})), good(3)]);
    let (code, details) = refusal(app.post_json("/v1/events/batch", &app.admin, batch.to_string()).await, 400).await;
    assert_eq!(code, "schema_violation");
    assert_eq!(
        details,
        json!([{"item": 1, "path": "/data/total", "keyword": "minimum", "message": details[0]["message"]}])
    );
    assert_eq!(events_in(&app, "payments").await, 0, "nothing of the batch was written");
    let batch = json!([good(1), good(3)]);
    let body = json_with_status(app.post_json("/v1/events/batch", &app.admin, batch.to_string()).await, 202).await;
    assert_eq!(body["results"].as_array().unwrap().len(), 2);
    assert_eq!(events_in(&app, "payments").await, 2);
}

async fn unknown_types_are_accepted_or_refused_by_the_namespace_setting(db: TestDb) {
    let mut config = db.config();
    config.ingest.unknown_event_types_by_namespace.insert("payments".into(), UnknownEventTypes::Reject);
    let app = spawn_app_with(config).await;
    app.apply_yaml(ORDER_TYPE).await;
    // Accepted by default: the default namespace has no setting.
    let response =
        app.post_json("/v1/events", &app.admin, event("order.refunded", "default", json!({})).to_string()).await;
    json_with_status(response, 202).await;
    let response =
        app.post_json("/v1/events", &app.admin, event("order.refunded", "payments", json!({})).to_string()).await;
    let (code, details) = refusal(response, 400).await;
    assert_eq!(code, "unknown_event_type");
    assert_eq!(details[0]["path"], "/type");
    assert!(details[0]["message"].as_str().unwrap().contains("order.refunded"), "{details}");
    // A known type still passes there; in a batch the unknown item is named and nothing written.
    let known = event("order.created", "payments", json!({"order_id": 1, "total": 1}));
    let batch = json!([known, event("order.refunded", "payments", json!({}))]);
    let (code, details) = refusal(app.post_json("/v1/events/batch", &app.admin, batch.to_string()).await, 400).await;
    assert_eq!((code.as_str(), &details[0]["item"]), ("unknown_event_type", &json!(1)), "{details}");
    assert_eq!(events_in(&app, "payments").await, 0);
    json_with_status(app.post_json("/v1/events", &app.admin, known.to_string()).await, 202).await;
}

async fn unknown_types_are_refused_everywhere_when_the_default_says_reject(db: TestDb) {
    let mut config = db.config();
    config.ingest.unknown_event_types = UnknownEventTypes::Reject;
    let app = spawn_app_with(config).await;
    let response = app.post_json("/v1/events", &app.admin, event("anything", "default", json!({})).to_string()).await;
    assert_eq!(refusal(response, 400).await.0, "unknown_event_type");
    app.apply_yaml(
        "apiVersion: hookwarden/v1\nkind: EventType\nmetadata: {name: anything}\nspec: {description: any data}\n",
    )
    .await;
    let response =
        app.post_json("/v1/events", &app.admin, event("anything", "default", json!([1, "two"])).to_string()).await;
    json_with_status(response, 202).await;
}

async fn a_deprecated_type_is_accepted_counted_and_warned_of(db: TestDb) {
    let app = spawn_app(&db).await;
    // Series are per process: a type of this test's own.
    let name = if db.is_postgres() { "legacy.pg" } else { "legacy.sqlite" };
    app.apply_yaml(&format!(
        "apiVersion: hookwarden/v1\nkind: EventType\nmetadata: {{name: {name}}}\nspec: {{deprecated: true, schema: {{type: object}}}}\n"
    ))
    .await;
    let response = app.post_json("/v1/events", &app.admin, event(name, "default", json!({})).to_string()).await;
    let warning = response.headers().get("warning").map(|v| v.to_str().unwrap().to_owned());
    json_with_status(response, 202).await;
    assert_eq!(
        warning.as_deref(),
        Some(format!("299 hookwarden \"event type `{name}` in namespace `default` is deprecated\"").as_str())
    );
    let batch = json!([event(name, "default", json!({})), event(name, "default", json!({"a": 1}))]);
    let response = app.post_json("/v1/events/batch", &app.admin, batch.to_string()).await;
    assert_eq!(response.headers().get_all("warning").iter().count(), 1, "one warning per type");
    json_with_status(response, 202).await;
    let counted = common::metric(&app.base, "hookwarden_ingest_deprecated_total", &[("type", name)]).await;
    assert_eq!(counted, Some(3.0));
    // Still checked: a deprecated type's schema holds.
    let response = app.post_json("/v1/events", &app.admin, event(name, "default", json!(1)).to_string()).await;
    assert_eq!(refusal(response, 400).await.0, "schema_violation");
}

async fn apply_refuses_a_bad_schema_a_failing_example_and_a_remote_ref(db: TestDb) {
    let app = spawn_app(&db).await;
    let apply = |yaml: String| {
        app.client
            .post(app.url("/v1/apply"))
            .bearer_auth(&app.admin)
            .header("content-type", "application/yaml")
            .body(yaml)
            .send()
    };
    let bad_schema = ORDER_TYPE.replace("minimum: 0", "minimum: zero");
    let body = json_with_status(apply(bad_schema).await.unwrap(), 422).await;
    assert_eq!(body["errors"][0]["path"], "spec.schema.properties.total.minimum", "{body}");
    let failing_example = ORDER_TYPE.replace("total: 4200", "total: -1");
    let body = json_with_status(apply(failing_example).await.unwrap(), 422).await;
    assert_eq!(body["errors"][0]["path"], "spec.examples[0].total", "{body}");
    // A reference to another document is refused, and nothing is fetched: a receiver on
    // loopback would see the request.
    let receiver =
        common::receiver::TestReceiver::start(std::sync::Arc::new(|_, _| (200, None, std::time::Duration::ZERO))).await;
    let remote = format!(
        "apiVersion: hookwarden/v1\nkind: EventType\nmetadata: {{name: order.paid}}\nspec:\n  schema: {{$ref: \"{}\"}}\n",
        receiver.url("/order.json")
    );
    let body = json_with_status(apply(remote).await.unwrap(), 422).await;
    assert_eq!(body["errors"][0]["path"], "spec.schema", "{body}");
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("must point inside this schema"), "{body}");
    assert!(receiver.on("/order.json").is_empty(), "the remote schema was fetched");
    let stored = json_with_status(app.get("/v1/resources/eventtypes", &app.admin).await, 200).await;
    assert_eq!(stored["items"], json!([]), "nothing was applied");
}

async fn the_catalog_lists_types_with_their_subscribers_within_the_token_s_namespaces(db: TestDb) {
    let app = spawn_app(&db).await;
    let secret = common::receiver::SECRET;
    app.apply_yaml(&format!(
        r#"{ORDER_TYPE}---
apiVersion: hookwarden/v1
kind: EventType
metadata: {{name: order.paid, namespace: payments}}
spec: {{description: Paid., deprecated: true}}
---
apiVersion: hookwarden/v1
kind: EventType
metadata: {{name: invoice.sent, namespace: billing}}
spec: {{description: An invoice went out.}}
---
apiVersion: hookwarden/v1
kind: Endpoint
metadata: {{name: orders, namespace: payments}}
spec: {{url: "https://orders.example.com/hooks", secrets: [{{value: {secret}}}], eventTypes: ["order.*"]}}
---
apiVersion: hookwarden/v1
kind: Endpoint
metadata: {{name: paid-only, namespace: payments}}
spec: {{url: "https://paid.example.com/hooks", secrets: [{{value: {secret}}}], eventTypes: [order.paid]}}
---
apiVersion: hookwarden/v1
kind: Endpoint
metadata: {{name: everything, namespace: payments}}
spec: {{url: "https://all.example.com/hooks", secrets: [{{value: {secret}}}]}}
---
apiVersion: hookwarden/v1
kind: Endpoint
metadata: {{name: billing-all, namespace: billing}}
spec: {{url: "https://billing.example.com/hooks", secrets: [{{value: {secret}}}]}}
"#
    ))
    .await;
    let all = json_with_status(app.get("/v1/event-types", &app.admin).await, 200).await;
    let names: Vec<(&str, &str)> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["namespace"].as_str().unwrap(), t["name"].as_str().unwrap()))
        .collect();
    assert_eq!(names, vec![("billing", "invoice.sent"), ("payments", "order.created"), ("payments", "order.paid")]);
    let created = json_with_status(app.get("/v1/event-types/payments/order.created", &app.admin).await, 200).await;
    assert_eq!(created["description"], "An order was placed.");
    assert_eq!(created["schema"]["properties"]["total"], json!({"type": "integer", "minimum": 0}));
    assert_eq!(created["examples"], json!([{"order_id": 1001, "total": 4200}]));
    assert_eq!(created["deprecated"], false);
    assert_eq!(created["subscribers"], json!(["everything", "orders"]));
    let paid = json_with_status(app.get("/v1/event-types/payments/order.paid", &app.admin).await, 200).await;
    assert_eq!((paid["deprecated"].clone(), paid["schema"].clone()), (json!(true), Value::Null));
    assert_eq!(paid["subscribers"], json!(["everything", "orders", "paid-only"]));
    assert_eq!(all["items"][0]["subscribers"], json!(["billing-all"]), "subscribers are of the type's own namespace");

    // A token for payments sees payments only: listed, fetched, or asked for by name.
    let viewer = token("viewer", &[Role::Viewer], &["payments"]);
    let mine = json_with_status(app.get("/v1/event-types", &viewer).await, 200).await;
    assert!(mine["items"].as_array().unwrap().iter().all(|t| t["namespace"] == "payments"), "{mine}");
    assert_eq!(mine["items"].as_array().unwrap().len(), 2);
    json_with_status(app.get("/v1/event-types?namespace=payments", &viewer).await, 200).await;
    let response = app.get("/v1/event-types?namespace=billing", &viewer).await;
    assert_eq!(refusal(response, 403).await.0, "forbidden");
    let hidden = refusal(app.get("/v1/event-types/billing/invoice.sent", &viewer).await, 404).await;
    let missing = refusal(app.get("/v1/event-types/billing/no.such", &viewer).await, 404).await;
    assert_eq!(hidden.0, missing.0, "another namespace's type answers like a missing one");
    assert_eq!(refusal(app.get("/v1/event-types/payments/no.such", &viewer).await, 404).await.0, "not_found");
    let ingester = token("shop", &[Role::Ingest], &["payments"]);
    assert_eq!(refusal(app.get("/v1/event-types", &ingester).await, 403).await.0, "forbidden");

    // The CLI shows the same catalog.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .args(["get", "eventtypes", "-n", "payments"])
        .env("HOOKWARDEN_SERVER", &app.base)
        .env("HOOKWARDEN_TOKEN", &viewer)
        .output()
        .expect("run the CLI");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table} {}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0], vec!["NAMESPACE", "NAME", "DEPRECATED", "SUBSCRIBERS", "DESCRIPTION"]);
    assert_eq!(lines[1][..4], ["payments", "order.created", "false", "everything,orders"]);
    assert_eq!(lines[2][..4], ["payments", "order.paid", "true", "everything,orders,paid-only"]);
    assert_eq!(lines.len(), 3, "{table}");
}

/// An Endpoint's or Filter's `eventTypes` glob that matches no EventType of its namespace
/// applies, with a warning in the apply answer, in `hookwarden apply`'s output and in the
/// resource's status; a namespace without EventTypes warns of nothing.
async fn globs_that_match_no_event_type_are_warned_of_at_apply_and_in_status(db: TestDb) {
    let app = spawn_app(&db).await;
    let documents = format!(
        "{ORDER_TYPE}---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: orders, namespace: payments}}\nspec:\n  url: https://orders.example.com/hooks\n  secrets: [{{value: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}}]\n  eventTypes: [\"order.*\", \"ordr.created\"]\n---\napiVersion: hookwarden/v1\nkind: Filter\nmetadata: {{name: refunds, namespace: payments}}\nspec:\n  eventTypes: [\"refund.*\"]\n  expression: \"true\"\n---\napiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: anything, namespace: billing}}\nspec:\n  url: https://billing.example.com/hooks\n  secrets: [{{value: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}}]\n  eventTypes: [\"invoice.*\"]\n"
    );
    let answer = json_with_status(app.post_yaml("/v1/apply?dryRun=true", &documents).await, 200).await;
    let warnings_of = |answer: &Value, name: &str| -> Value {
        let results = answer["results"].as_array().unwrap();
        let result = results.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no {name} in {answer:#}"));
        result.get("warnings").cloned().unwrap_or(Value::Null)
    };
    let endpoint = warnings_of(&answer, "orders");
    assert_eq!(endpoint.as_array().map(Vec::len), Some(1), "a dry run warns as the apply would: {endpoint:#}");
    assert_eq!(endpoint[0]["path"], "spec.eventTypes[1]");
    assert!(endpoint[0]["message"].as_str().unwrap().contains("`ordr.created`"), "{endpoint:#}");
    assert_eq!(warnings_of(&answer, "refunds")[0]["path"], "spec.eventTypes[0]");
    assert_eq!(warnings_of(&answer, "anything"), Value::Null, "billing has no EventTypes");
    assert_eq!(warnings_of(&answer, "order.created"), Value::Null);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resources.yaml");
    std::fs::write(&path, &documents).unwrap();
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
            .args(["apply", "-f", path.to_str().unwrap()])
            .env("HOOKWARDEN_SERVER", &app.base)
            .env("HOOKWARDEN_TOKEN", &app.admin)
            .output()
            .expect("run the CLI")
    });
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed} {}", String::from_utf8_lossy(&output.stderr));
    assert!(
        printed.lines().any(|l| l.starts_with("  warning: spec.eventTypes[1]: `ordr.created` matches no EventType")),
        "{printed}"
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let shown = json_with_status(app.get("/v1/resources/Endpoint/payments/orders", &app.admin).await, 200).await;
        let other = json_with_status(app.get("/v1/resources/Endpoint/billing/anything", &app.admin).await, 200).await;
        if shown["status"]["warnings"].is_array() && other["status"]["observedGeneration"] == 1 {
            assert_eq!(shown["status"]["warnings"][0]["path"], "spec.eventTypes[1]", "{shown:#}");
            assert!(other["status"].get("warnings").is_none(), "{other:#}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no warnings in the status: {shown:#}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

on_both_databases!(
    data_is_checked_by_every_keyword_of_its_schema,
    a_batch_with_one_bad_item_is_answered_per_item_and_writes_nothing,
    unknown_types_are_accepted_or_refused_by_the_namespace_setting,
    unknown_types_are_refused_everywhere_when_the_default_says_reject,
    a_deprecated_type_is_accepted_counted_and_warned_of,
    apply_refuses_a_bad_schema_a_failing_example_and_a_remote_ref,
    the_catalog_lists_types_with_their_subscribers_within_the_token_s_namespaces,
    globs_that_match_no_event_type_are_warned_of_at_apply_and_in_status,
);
