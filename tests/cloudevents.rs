//! CloudEvents on the wire, end to end on both databases: events built and sent by the
//! official CloudEvents SDK for Python (`cloudevents` on PyPI, scripts in
//! tests/cloudevents/) in structured, binary and batched mode are accepted and delivered
//! to receivers on loopback; deliveries of an endpoint with `format: cloudevents` are
//! parsed by the same SDK and verified by the official Standard Webhooks verifier; and
//! what each mode refuses, by its path.
//!
//! Without the SDK the SDK tests print `HOOKWARDEN-CLOUDEVENTS-SDK-SKIPPED` and pass;
//! `.ci/run` installs the SDK first and fails when the marker appears.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::receiver::{Received, TestReceiver, SECRET};
use common::{json_with_status, spawn_app_with, TestApp, TestDb};
use serde_json::{json, Value};

/// The marker `.ci/run` looks for to fail a run whose SDK tests were skipped.
const SKIP_MARKER: &str = "HOOKWARDEN-CLOUDEVENTS-SDK-SKIPPED";

/// The Python that runs the SDK scripts: `HOOKWARDEN_TEST_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("HOOKWARDEN_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Whether the SDK can be imported; says so past the test harness's capture when not.
fn sdk_available() -> bool {
    let imported = Command::new(python())
        .args(["-c", "import cloudevents.core.bindings.http, cloudevents.core.formats.json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !imported {
        let _ = writeln!(
            std::io::stderr().lock(),
            "{SKIP_MARKER}: the CloudEvents SDK for Python is not importable by `{}`; `python3 -m pip install cloudevents==2.2.0` runs these tests",
            python()
        );
    }
    imported
}

/// Runs the SDK script `name` (in tests/cloudevents/) with `env`, feeding it `input`; its
/// standard output, or the test fails with its standard error.
fn run_script(name: &str, env: &[(&str, &str)], input: &str) -> String {
    let script = format!("{}/tests/cloudevents/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(python())
        .arg(&script)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = child.wait_with_output().expect("python runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{name} failed ({}): {stderr}", output.status);
    String::from_utf8(output.stdout).unwrap()
}

fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config
}

/// An Endpoint in namespace `shop` for `com.example.*`, with `extra` spec lines.
fn endpoint(name: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  url: {url}\n  secrets: [{{value: {SECRET}}}]\n  eventTypes: [\"com.example.*\"]\n{extra}"
    )
}

/// Waits until `path` of `receiver` got `count` requests; returns them.
async fn received(receiver: &TestReceiver, path: &str, count: usize) -> Vec<Received> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let seen = receiver.on(path);
        if seen.len() >= count {
            return seen;
        }
        assert!(std::time::Instant::now() < deadline, "{path} got {} of {count} deliveries", seen.len());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The requests as the SDK's `from_http` reads them (tests/cloudevents/parse.py).
fn parsed_by_sdk(requests: &[Received]) -> Vec<Value> {
    let input: Vec<Value> = requests
        .iter()
        .map(|r| {
            let headers: BTreeMap<&str, &str> =
                r.headers.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
            json!({"headers": headers, "body": r.body})
        })
        .collect();
    let input = serde_json::to_string(&input).unwrap();
    let out = tokio::task::block_in_place(|| run_script("parse.py", &[], &input));
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

/// The SDK's events by their `subject`.
fn by_subject(events: Vec<Value>) -> BTreeMap<String, Value> {
    events.into_iter().map(|e| (e["attributes"]["subject"].as_str().unwrap().to_owned(), e)).collect()
}

async fn events_sent_by_the_sdk_in_every_mode_are_accepted_and_delivered(db: TestDb) {
    if !sdk_available() {
        return;
    }
    let receiver = TestReceiver::start(Arc::new(|_, _| (204, None, Duration::ZERO))).await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(
        &[
            endpoint("plain", &receiver.url("/plain"), ""),
            endpoint("ce", &receiver.url("/ce"), "  format: cloudevents\n"),
            endpoint(
                "ce-transformed",
                &receiver.url("/ce-transformed"),
                "  format: cloudevents\n  transform: '{\"order\": event.data.order_id, \"for\": event.subject}'\n",
            ),
        ]
        .join("---\n"),
    )
    .await;
    // The script talks to the server on this runtime: its worker is handed on meanwhile.
    let out = tokio::task::block_in_place(|| {
        run_script("send.py", &[("HOOKWARDEN_URL", app.base.as_str()), ("HOOKWARDEN_TOKEN", app.admin.as_str())], "")
    });
    let answers: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let modes: Vec<&str> = answers.iter().map(|a| a["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["structured", "binary", "batch"]);
    for answer in &answers {
        assert_eq!(answer["status"], 202, "{answer:#}");
    }
    let batch = answers[2]["body"]["results"].as_array().unwrap();
    assert_eq!(batch.len(), 2, "{:#}", answers[2]);
    for result in [&answers[0]["body"], &answers[1]["body"], &batch[0], &batch[1]] {
        assert_eq!(result["deliveries"].as_array().unwrap().len(), 3, "fanned out to all three: {result:#}");
    }

    // The standard format: the envelope, with the data as the SDK sent it.
    let plain = received(&receiver, "/plain", 4).await;
    let mut totals: Vec<(i64, i64)> = plain
        .iter()
        .map(|r| {
            let body: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(body["type"], "com.example.order.created");
            assert_eq!(body["timestamp"], "2026-12-04T10:30:00.250Z", "the event's time");
            assert!(r.headers.get("ce-id").is_none(), "no ce- headers in the standard format");
            (body["data"]["order_id"].as_i64().unwrap(), body["data"]["total"].as_i64().unwrap())
        })
        .collect();
    totals.sort();
    assert_eq!(totals, [(1, 4200), (2, 99), (3, 1), (4, 2)]);

    // format: cloudevents, parsed by the SDK, signed over the exact body.
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    let ce = received(&receiver, "/ce", 4).await;
    for r in &ce {
        verifier.verify(r.body.as_bytes(), &r.headers).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        let mut altered = r.body.clone().into_bytes();
        altered.push(b' ');
        assert!(verifier.verify(&altered, &r.headers).is_err(), "the signature covers those exact bytes");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    let events = by_subject(parsed_by_sdk(&ce));
    let subjects: Vec<&str> = events.keys().map(String::as_str).collect();
    assert_eq!(subjects, ["orders/1", "orders/2 für Jürgen", "orders/3", "orders/4"]);
    let structured = &events["orders/1"];
    assert_eq!(
        structured["attributes"],
        json!({"specversion": "1.0", "id": "sdk-structured-1", "source": "/sdk/python",
               "type": "com.example.order.created", "subject": "orders/1",
               "time": "2026-12-04T10:30:00.250000+00:00", "datacontenttype": "application/json",
               "tenant": "acme"}),
        "every attribute but Hookwarden's `namespace`"
    );
    assert_eq!(structured["data"], json!({"order_id": 1, "total": 4200}));
    let binary = &events["orders/2 für Jürgen"];
    assert_eq!(binary["attributes"]["id"], "sdk-binary-1");
    assert_eq!(binary["attributes"]["priority"], "high");
    assert_eq!(binary["data"], json!({"order_id": 2, "total": 99}));
    assert_eq!(events["orders/4"]["attributes"]["id"], "sdk-batch-2");

    // With a transform: the event's attributes, the transform's result as the data.
    let transformed = received(&receiver, "/ce-transformed", 4).await;
    for r in &transformed {
        verifier.verify(r.body.as_bytes(), &r.headers).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    }
    let events = by_subject(parsed_by_sdk(&transformed));
    assert_eq!(events["orders/3"]["data"], json!({"order": 3, "for": "orders/3"}));
    assert_eq!(events["orders/3"]["attributes"]["id"], "sdk-batch-1");
    app.stop().await;
}

/// `POST /v1/events` with `headers` and `body` as the admin.
async fn post(app: &TestApp, path: &str, headers: &[(&str, &str)], body: &str) -> reqwest::Response {
    let mut request = app.client.post(app.url(path)).bearer_auth(&app.admin).body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("request sent")
}

/// The error code and the `(path, message)` of each detail of a refused request.
async fn refused(response: reqwest::Response, status: u16) -> (String, Vec<String>) {
    let body = json_with_status(response, status).await;
    let paths = body["error"]["details"]
        .as_array()
        .map(|d| d.iter().map(|e| e["path"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default();
    (body["error"]["code"].as_str().unwrap().to_owned(), paths)
}

const BINARY: &[(&str, &str)] =
    &[("ce-specversion", "1.0"), ("ce-id", "b-1"), ("ce-source", "/curl"), ("ce-type", "order.created")];

const ORDER_TYPE: &str = "apiVersion: hookwarden/v1\nkind: EventType\nmetadata: {name: order.created, namespace: shop}\nspec:\n  schema: {type: object, required: [total], properties: {total: {type: integer, minimum: 0}}}\n";

async fn each_mode_refuses_what_it_cannot_take_by_its_path_and_keeps_ingest_rules(db: TestDb) {
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(ORDER_TYPE).await;
    let structured = [("content-type", "application/cloudevents+json")];
    let batch = [("content-type", "application/cloudevents-batch+json")];

    // Binary mode: a body that is not JSON, a missing attribute, the schema of the type.
    let mut text = BINARY.to_vec();
    text.push(("content-type", "text/plain"));
    assert_eq!(
        refused(post(&app, "/v1/events?namespace=shop", &text, "hi").await, 415).await.0,
        "unsupported_media_type"
    );
    let (code, paths) = refused(post(&app, "/v1/events", &BINARY[..3], "{}").await, 400).await;
    assert_eq!((code.as_str(), paths), ("validation_failed", vec!["header:ce-type".to_owned()]));
    let (code, paths) = refused(post(&app, "/v1/events?namespace=shop", BINARY, r#"{"total": -1}"#).await, 400).await;
    assert_eq!((code.as_str(), paths), ("schema_violation", vec!["/data/total".to_owned()]));
    let (code, paths) = refused(post(&app, "/v1/events", BINARY, r#"{"a": 1, "a": 2}"#).await, 400).await;
    assert_eq!((code.as_str(), paths), ("duplicate_key", vec!["data.a".to_owned()]));

    // Structured mode: `specversion` is required, binary data refused.
    let no_version = json!({"id": "s-1", "source": "/curl", "type": "order.created", "data": {"total": 1}});
    let (code, paths) = refused(post(&app, "/v1/events", &structured, &no_version.to_string()).await, 400).await;
    assert_eq!((code.as_str(), paths), ("validation_failed", vec!["specversion".to_owned()]));
    let base64 =
        json!({"specversion": "1.0", "id": "s-1", "source": "/curl", "type": "order.created", "data_base64": "AAE="});
    let (_, paths) = refused(post(&app, "/v1/events", &structured, &base64.to_string()).await, 400).await;
    assert_eq!(paths, ["data_base64"]);
    // The envelope still refuses what it never took.
    let extension = json!({"source": "/curl", "type": "order.created", "tenant": "acme", "data": {}});
    let (code, _) =
        refused(post(&app, "/v1/events", &[("content-type", "application/json")], &extension.to_string()).await, 400)
            .await;
    assert_eq!(code, "validation_failed");

    // Batched mode: the item and attribute at fault; nothing of the batch is written.
    let items = json!([
        {"specversion": "1.0", "id": "k-1", "source": "/curl", "type": "order.created", "namespace": "shop", "data": {"total": 1}},
        {"specversion": "1.0", "id": "k-2", "source": "/curl", "namespace": "shop", "data": {"total": 1}},
    ]);
    let (_, paths) = refused(post(&app, "/v1/events/batch", &batch, &items.to_string()).await, 400).await;
    assert_eq!(paths, ["[1].type"]);
    let mut bad_data = items.clone();
    bad_data[1]["type"] = json!("order.created");
    bad_data[1]["data"] = json!({"total": "ten"});
    let body = json_with_status(post(&app, "/v1/events", &batch, &bad_data.to_string()).await, 400).await;
    assert_eq!(body["error"]["details"][0]["item"], 1, "{body:#}");
    assert_eq!(body["error"]["details"][0]["path"], "/data/total", "{body:#}");
    let listed = json_with_status(app.get("/v1/events?namespace=shop", &app.admin).await, 200).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "nothing of a refused batch is written");
    assert_eq!(
        refused(post(&app, "/v1/events/batch", &structured, &no_version.to_string()).await, 415).await.0,
        "unsupported_media_type"
    );

    // The query's namespace: checked, and the event's own comes first.
    let (_, paths) = refused(post(&app, "/v1/events?namespace=Not_A_Label", BINARY, "{}").await, 400).await;
    assert_eq!(paths, ["query:namespace"]);
    let mut own = BINARY.to_vec();
    own.push(("ce-namespace", "default"));
    let accepted =
        json_with_status(post(&app, "/v1/events?namespace=shop", &own, r#"{"total": "any"}"#).await, 202).await;
    let shown =
        json_with_status(app.get(&format!("/v1/events/{}", accepted["id"].as_str().unwrap()), &app.admin).await, 200)
            .await;
    assert_eq!(shown["namespace"], "default", "the event's namespace over the query's");

    // Binary mode without a Content-Type is JSON; its attributes are kept and shown.
    let mut tagged = BINARY.to_vec();
    tagged.extend([("ce-id", "b-2"), ("ce-tenant", "acme%20corp"), ("ce-dataschema", "https://example.com/o.json")]);
    tagged.retain(|(n, v)| *n != "ce-id" || *v == "b-2");
    let accepted =
        json_with_status(post(&app, "/v1/events?namespace=shop", &tagged, r#"{"total": 5}"#).await, 202).await;
    let id = accepted["id"].as_str().unwrap().to_owned();
    let shown = json_with_status(app.get(&format!("/v1/events/{id}"), &app.admin).await, 200).await;
    assert_eq!(shown["external_id"], "b-2");
    assert_eq!(shown["datacontenttype"], "application/json");
    assert_eq!(shown["attributes"], json!({"dataschema": "https://example.com/o.json", "tenant": "acme corp"}));

    // The same CloudEvent again is a duplicate; an Idempotency-Key binds the headers too.
    let again = json_with_status(post(&app, "/v1/events?namespace=shop", &tagged, r#"{"total": 5}"#).await, 200).await;
    assert_eq!((&again["id"], &again["duplicate"]), (&json!(id), &json!(true)));
    let with_id = |ce_id: &'static str| {
        let mut headers: Vec<(&str, &str)> = BINARY.iter().filter(|(n, _)| *n != "ce-id").copied().collect();
        headers.extend([("ce-id", ce_id), ("idempotency-key", "k-binary")]);
        headers
    };
    let first =
        json_with_status(post(&app, "/v1/events?namespace=shop", &with_id("b-3"), r#"{"total": 6}"#).await, 202).await;
    let replayed =
        json_with_status(post(&app, "/v1/events?namespace=shop", &with_id("b-3"), r#"{"total": 6}"#).await, 200).await;
    assert_eq!(replayed["id"], first["id"]);
    let (code, _) =
        refused(post(&app, "/v1/events?namespace=shop", &with_id("b-4"), r#"{"total": 6}"#).await, 422).await;
    assert_eq!(code, "idempotency_key_reused", "same body, other headers: another request");
    let (code, _) =
        refused(post(&app, "/v1/events?namespace=default", &with_id("b-3"), r#"{"total": 6}"#).await, 422).await;
    assert_eq!(code, "idempotency_key_reused", "same body and headers, another query: another request");
    app.stop().await;
}

/// A `datacontenttype` is sent as the `Content-Type` of CloudEvents deliveries: one that
/// could not be a header value (a control character) or is no media type is refused at
/// ingest, in every mode, by its path; nothing of the request is written.
async fn a_datacontenttype_that_is_no_media_type_is_refused_in_every_mode_by_its_path(db: TestDb) {
    let app = spawn_app_with(config_for(&db)).await;
    let envelope = [("content-type", "application/json")];
    let structured = [("content-type", "application/cloudevents+json")];
    let batch = [("content-type", "application/cloudevents-batch+json")];
    for bad in ["application/json\n", "application/json; x=\u{1}", "application/json; x", "json"] {
        let event = json!({"source": "/curl", "type": "order.created", "datacontenttype": bad, "data": {}});
        let (code, paths) = refused(post(&app, "/v1/events", &envelope, &event.to_string()).await, 400).await;
        assert_eq!((code.as_str(), paths), ("validation_failed", vec!["datacontenttype".to_owned()]), "{bad:?}");
        let fine = json!({"source": "/curl", "type": "order.created", "data": {}});
        let (_, paths) =
            refused(post(&app, "/v1/events/batch", &envelope, &json!([fine, event]).to_string()).await, 400).await;
        assert_eq!(paths, ["[1].datacontenttype"], "{bad:?}");
    }
    // CloudEvents modes: JSON by its essence, but not a media type a header can carry.
    for bad in ["application/json\r\nX-Injected: 1", "application/cloudevents+json; x=\"\u{7}\""] {
        let event = json!({"specversion": "1.0", "id": "c-1", "source": "/curl", "type": "order.created",
                           "datacontenttype": bad, "data": {}});
        let (code, paths) = refused(post(&app, "/v1/events", &structured, &event.to_string()).await, 400).await;
        assert_eq!((code.as_str(), paths), ("validation_failed", vec!["datacontenttype".to_owned()]), "{bad:?}");
        let mut second = event.clone();
        second["id"] = json!("c-2");
        second["datacontenttype"] = json!("application/json");
        let items = json!([second, event]).to_string();
        let (_, paths) = refused(post(&app, "/v1/events/batch", &batch, &items).await, 400).await;
        assert_eq!(paths, ["[1].datacontenttype"], "{bad:?}");
    }
    // Binary mode: the Content-Type is the datacontenttype.
    let mut binary = BINARY.to_vec();
    binary.push(("content-type", "application/json; charset"));
    let (code, paths) = refused(post(&app, "/v1/events", &binary, "{}").await, 400).await;
    assert_eq!((code.as_str(), paths), ("validation_failed", vec!["header:content-type".to_owned()]));

    let listed = json_with_status(app.get("/v1/events?namespace=default", &app.admin).await, 200).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "nothing of a refused request is written");
    // A media type with parameters, quoted or not, is taken.
    let fine = json!({"source": "/curl", "type": "order.created", "datacontenttype": "application/json; charset=utf-8; v=\"1; 2\"", "data": {}});
    json_with_status(post(&app, "/v1/events", &envelope, &fine.to_string()).await, 202).await;
    app.stop().await;
}

on_both_databases!(
    events_sent_by_the_sdk_in_every_mode_are_accepted_and_delivered,
    each_mode_refuses_what_it_cannot_take_by_its_path_and_keeps_ingest_rules,
    a_datacontenttype_that_is_no_media_type_is_refused_in_every_mode_by_its_path,
);
