//! The HTTP API against a real server on a loopback port and a real database.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{eventually, json_with_status, spawn_app, spawn_app_with, token, TestApp, TestDb};
use hmac::Mac as _;
use hookwarden::auth::Role;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn order(id: &str) -> Value {
    json!({"id": id, "source": "shop", "type": "order.created", "subject": "orders/1",
           "time": "2026-11-28T10:00:00Z", "data": {"order_id": id, "total": 1250}})
}

async fn error_of(response: reqwest::Response, status: u16) -> (String, Value) {
    let body = json_with_status(response, status).await;
    let code = body["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {body}")).to_owned();
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "no message in {body}");
    (code, body["error"]["details"].clone())
}

fn first_path(details: &Value) -> &str {
    details[0]["path"].as_str().unwrap_or_else(|| panic!("no field path in {details}"))
}

#[tokio::test]
async fn an_accepted_event_is_stored_verbatim_and_readable() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let raw = r#"{"source":"shop","type":"order.created","data":{ "total" : 12.50, "note":"caf\u00e9" }}"#;
    let body = json_with_status(app.post_json("/v1/events", &app.admin, raw).await, 202).await;
    let id = body["id"].as_str().unwrap();
    assert_eq!(body["duplicate"], false);

    let response = app.get(&format!("/v1/events/{id}"), &app.admin).await;
    let text = response.text().await.unwrap();
    assert!(text.contains(r#""data":{ "total" : 12.50, "note":"caf\u00e9" }"#), "data must be byte for byte: {text}");
    let event: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(event["external_id"], id, "a generated id doubles as the CloudEvents id");
    assert_eq!(event["ingested_by"], "admin");
    assert_eq!(event["namespace"], "default");
    assert_eq!(event["trace_id"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn the_trace_id_of_a_traceparent_is_kept() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let response = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/cloudevents+json; charset=utf-8")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        // Structured mode: a CloudEvent, whose `specversion` is required.
        .body(
            json!({"specversion": "1.0", "id": "t-1", "source": "shop", "type": "order.created", "data": {}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let id = json_with_status(response, 202).await["id"].as_str().unwrap().to_owned();
    let event = json_with_status(app.get(&format!("/v1/events/{id}"), &app.admin).await, 200).await;
    assert_eq!(event["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test]
async fn a_batch_is_written_in_one_piece_with_a_result_per_item() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    json_with_status(app.post_json("/v1/events", &app.admin, order("b-0").to_string()).await, 202).await;
    let batch = json!([order("b-1"), order("b-0"), order("b-2")]);
    let body = json_with_status(app.post_json("/v1/events/batch", &app.admin, batch.to_string()).await, 202).await;
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.iter().map(|r| r["duplicate"].as_bool().unwrap()).collect::<Vec<_>>(), [false, true, false]);

    // One bad item rejects the whole batch, naming the item and the field.
    let bad = json!([order("b-3"), {"source": "shop", "data": {}}]);
    let (code, details) = error_of(app.post_json("/v1/events/batch", &app.admin, bad.to_string()).await, 400).await;
    assert_eq!(code, "validation_failed");
    assert_eq!(first_path(&details), "[1].type");
    assert_eq!(details[0]["message"], "is required");
    let page = json_with_status(app.get("/v1/events?limit=100", &app.admin).await, 200).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3, "b-3 must not have been written");

    // Every item that repeats an earlier event: 200.
    let again = json!([order("b-1"), order("b-2")]);
    json_with_status(app.post_json("/v1/events/batch", &app.admin, again.to_string()).await, 200).await;
}

#[tokio::test]
async fn bad_input_gets_its_status_and_a_precise_message() {
    let db = TestDb::sqlite();
    let mut config = db.config();
    config.ingest.max_body_bytes = 4096;
    config.ingest.max_batch_items = 3;
    let app = spawn_app_with(config).await;
    let admin = app.admin.clone();
    let post = |body: String| app.post_json("/v1/events", &admin, body);

    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        ("missing source", json!({"type": "a", "data": {}}).to_string(), "validation_failed", Some("source")),
        ("missing type", json!({"source": "s", "data": {}}).to_string(), "validation_failed", Some("type")),
        (
            "ill-typed source",
            json!({"source": 5, "type": "a", "data": {}}).to_string(),
            "validation_failed",
            Some("source"),
        ),
        (
            "ill-typed data holder",
            json!({"source": "s", "type": ["a"], "data": {}}).to_string(),
            "validation_failed",
            Some("type"),
        ),
        (
            "unknown field",
            json!({"source": "s", "type": "a", "tyep": "b", "data": {}}).to_string(),
            "validation_failed",
            Some("tyep"),
        ),
        ("missing data", json!({"source": "s", "type": "a"}).to_string(), "validation_failed", Some("data")),
        ("empty type", json!({"source": "s", "type": "", "data": {}}).to_string(), "validation_failed", Some("type")),
        (
            "bad time",
            json!({"source": "s", "type": "a", "time": "yesterday", "data": {}}).to_string(),
            "validation_failed",
            Some("time"),
        ),
        (
            "bad namespace",
            json!({"source": "s", "type": "a", "namespace": "Not_A_Label", "data": {}}).to_string(),
            "validation_failed",
            Some("namespace"),
        ),
        (
            "NUL in subject",
            json!({"source": "s", "type": "a", "subject": "a\u{0}b", "data": {}}).to_string(),
            "validation_failed",
            Some("subject"),
        ),
        (
            "bad specversion",
            json!({"source": "s", "type": "a", "specversion": "0.3", "data": {}}).to_string(),
            "validation_failed",
            Some("specversion"),
        ),
        ("not an object", "[1, 2]".to_owned(), "validation_failed", Some("(body)")),
        ("malformed JSON", "{\"source\": \"s\",".to_owned(), "malformed_json", None),
        ("trailing garbage", format!("{} x", order("g")), "malformed_json", None),
        ("empty body", String::new(), "malformed_json", None),
    ];
    for (name, body, code, path) in cases {
        let (actual, details) = error_of(post(body).await, 400).await;
        assert_eq!(actual, code, "{name}");
        if let Some(path) = path {
            assert_eq!(first_path(&details), path, "{name}: {details}");
        }
    }

    // Too large: with a Content-Length, and streamed without one.
    let big = json!({"source": "s", "type": "a", "data": "x".repeat(5000)}).to_string();
    let (code, details) = error_of(post(big.clone()).await, 413).await;
    assert_eq!(code, "payload_too_large");
    assert_eq!(details["limit"], 4096);
    let (status, text) = chunked_post(&app, "/v1/events", &big).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("payload_too_large"), "{text}");

    // Not JSON.
    for content_type in [Some("text/plain"), Some("application/xml"), None] {
        let mut request = app.client.post(app.url("/v1/events")).bearer_auth(&app.admin).body(order("m").to_string());
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        assert_eq!(error_of(request.send().await.unwrap(), 415).await.0, "unsupported_media_type");
    }

    // Batches: empty, too many, bad item path.
    let (_, details) = error_of(app.post_json("/v1/events/batch", &admin, "[]").await, 400).await;
    assert_eq!(first_path(&details), "(body)");
    let four = json!([order("1"), order("2"), order("3"), order("4")]).to_string();
    let (_, details) = error_of(app.post_json("/v1/events/batch", &admin, four).await, 400).await;
    assert!(details[0]["message"].as_str().unwrap().contains("at most 3"));
    let bad_item = json!([order("5"), {"source": "s", "type": 7, "data": {}}]).to_string();
    let (_, details) = error_of(app.post_json("/v1/events/batch", &admin, bad_item).await, 400).await;
    assert_eq!(first_path(&details), "[1].type");
    assert_eq!(details[0]["message"], "must be a text, not a whole number");
    let missing_type = json!([order("6"), {"source": "s", "data": {}}]).to_string();
    let (_, details) = error_of(app.post_json("/v1/events/batch", &admin, missing_type).await, 400).await;
    assert_eq!((first_path(&details), details[0]["message"].as_str()), ("[1].type", Some("is required")));

    // Messages speak plainly and never repeat a value of the wrong type.
    let (_, details) =
        error_of(post(json!({"source": "s3cret-source", "type": ["a"], "data": {}}).to_string()).await, 400).await;
    assert_eq!(details[0]["message"], "must be a text, not a list");
    let (_, details) =
        error_of(post(json!({"source": {"k": "s3cret"}, "type": "a", "data": {}}).to_string()).await, 400).await;
    assert_eq!(details[0]["message"], "must be a text, not a mapping");
    let (_, details) = error_of(post(json!({"source": "s", "type": "a"}).to_string()).await, 400).await;
    assert_eq!(details[0]["message"], "is required");

    // Bad Idempotency-Key header.
    let response = app
        .client
        .post(app.url("/v1/events"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .header("idempotency-key", "x".repeat(300))
        .body(order("k").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response, 400).await.0, "bad_request");

    // Reads: unknown ids, bad listing parameters, unknown routes and methods.
    assert_eq!(error_of(app.get("/v1/events/evt_01J00000000000000000000000", &admin).await, 404).await.0, "not_found");
    assert_eq!(error_of(app.get("/v1/events/nonsense", &admin).await, 404).await.0, "not_found");
    let (code, details) = error_of(app.get("/v1/events?limit=0", &admin).await, 400).await;
    assert_eq!((code.as_str(), first_path(&details)), ("validation_failed", "limit"));
    assert_eq!(error_of(app.get("/v1/events?limit=abc", &admin).await, 400).await.0, "validation_failed");
    assert_eq!(error_of(app.get("/v1/events?colour=red", &admin).await, 400).await.0, "validation_failed");
    let (_, details) = error_of(app.get("/v1/events?cursor=zzz", &admin).await, 400).await;
    assert_eq!(first_path(&details), "cursor");
    assert_eq!(error_of(app.get("/v1/nothing", &admin).await, 404).await.0, "route_not_found");
    let response = app.client.delete(app.url("/v1/events")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(error_of(response, 405).await.0, "method_not_allowed");
}

/// Posts `body` with `Transfer-Encoding: chunked` (no Content-Length) over a raw socket.
async fn chunked_post(app: &TestApp, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.admin
    );
    for chunk in body.as_bytes().chunks(1000) {
        request.push_str(&format!("{:x}\r\n{}\r\n", chunk.len(), std::str::from_utf8(chunk).unwrap()));
    }
    request.push_str("0\r\n\r\n");
    // The server may answer and close before reading everything; that is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn tokens_are_checked_for_validity_role_and_namespace() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let body = order("auth-1").to_string();

    let response = app
        .client
        .post(app.url("/v1/events"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(error_of(response, 401).await.0, "unauthenticated");
    assert_eq!(error_of(app.post_json("/v1/events", "not-a-jwt", body.clone()).await, 401).await.0, "unauthenticated");
    let foreign = hookwarden::auth::TokenKeys::new(&hookwarden::config::Secret::new(
        "another-key-another-key-another-key",
    ))
    .mint("x", &[Role::Admin], &["*".into()], Duration::from_secs(60));
    assert_eq!(error_of(app.post_json("/v1/events", &foreign, body.clone()).await, 401).await.0, "unauthenticated");
    let expired = hand_made_token(json!({"sub": "late", "roles": ["admin"], "namespaces": ["*"], "exp": 1_000_000}));
    let (_, _) = error_of(app.post_json("/v1/events", &expired, body.clone()).await, 401).await;

    let viewer = token("v", &[Role::Viewer], &["*"]);
    assert_eq!(error_of(app.post_json("/v1/events", &viewer, body.clone()).await, 403).await.0, "forbidden");
    let payments_only = token("p", &[Role::Ingest], &["payments"]);
    assert_eq!(error_of(app.post_json("/v1/events", &payments_only, body.clone()).await, 403).await.0, "forbidden");
    let in_payments = json!({"source": "shop", "type": "a", "namespace": "payments", "data": {}}).to_string();
    let id = json_with_status(app.post_json("/v1/events", &payments_only, in_payments).await, 202).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Reading needs viewer in the event's namespace; other namespaces see nothing.
    assert_eq!(error_of(app.get(&format!("/v1/events/{id}"), &payments_only).await, 403).await.0, "forbidden");
    let other_viewer = token("o", &[Role::Viewer], &["default"]);
    assert_eq!(error_of(app.get(&format!("/v1/events/{id}"), &other_viewer).await, 404).await.0, "not_found");
    let payments_viewer = token("pv", &[Role::Viewer], &["payments"]);
    json_with_status(app.get(&format!("/v1/events/{id}"), &payments_viewer).await, 200).await;
    assert_eq!(error_of(app.get("/v1/events?namespace=payments", &other_viewer).await, 403).await.0, "forbidden");
}

/// HS256 by hand from RFC 7519/7515 (base64url JSON header and claims, HMAC-SHA256), as
/// any standard JWT library produces it; the service must accept it.
fn hand_made_token(claims: Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(json!({"alg": "HS256", "typ": "JWT"}).to_string());
    let payload = b64.encode(claims.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(common::JWT_SECRET.as_bytes()).unwrap();
    mac.update(format!("{header}.{payload}").as_bytes());
    format!("{header}.{payload}.{}", b64.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn a_token_minted_by_a_standard_jwt_implementation_is_accepted() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let exp = chrono::Utc::now().timestamp() + 600;
    let token =
        hand_made_token(json!({"sub": "ci-bot", "roles": ["ingest", "viewer"], "namespaces": ["default"], "exp": exp}));
    let id = json_with_status(app.post_json("/v1/events", &token, order("jwt-1").to_string()).await, 202).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let event = json_with_status(app.get(&format!("/v1/events/{id}"), &token).await, 200).await;
    assert_eq!(event["ingested_by"], "ci-bot");
}

async fn fifty_concurrent_posts_of_one_event_store_it_once(app: &TestApp) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (client, url, token) = (app.client.clone(), app.url("/v1/events"), app.admin.clone());
        tasks.spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(order("same-order").to_string())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        });
    }
    let mut statuses = Vec::new();
    let mut ids = std::collections::HashSet::new();
    while let Some(result) = tasks.join_next().await {
        let (status, body) = result.unwrap();
        assert_eq!(body["duplicate"], status == 200, "{body}");
        statuses.push(status);
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 202).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 49, "{statuses:?}");
    assert_eq!(ids.len(), 1, "every answer names the original event");
    let page = json_with_status(app.get("/v1/events", &app.admin).await, 200).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
}

async fn an_idempotency_key_returns_the_original_result(app: &TestApp) {
    let send = |key: &'static str, body: String| {
        app.client
            .post(app.url("/v1/events"))
            .bearer_auth(&app.admin)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body)
            .send()
    };
    // No CloudEvents id: only the key makes the retry recognisable.
    let body = json!({"source": "shop", "type": "order.created", "data": {"n": 1}}).to_string();
    let first = json_with_status(send("key-1", body.clone()).await.unwrap(), 202).await;
    let again = json_with_status(send("key-1", body.clone()).await.unwrap(), 200).await;
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true);
    let other = json!({"source": "shop", "type": "order.created", "data": {"n": 2}}).to_string();
    assert_eq!(error_of(send("key-1", other).await.unwrap(), 422).await.0, "idempotency_key_reused");
    let page = json_with_status(app.get("/v1/events", &app.admin).await, 200).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
}

/// The `(id, endpoint)` pairs of an answer's or an event's deliveries, in id order.
fn deliveries_of(value: &Value) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = value["deliveries"]
        .as_array()
        .unwrap_or_else(|| panic!("no deliveries in {value}"))
        .iter()
        .map(|d| (d["id"].as_str().unwrap().to_owned(), d["endpoint"].as_str().unwrap().to_owned()))
        .collect();
    pairs.sort();
    pairs
}

async fn a_duplicate_is_answered_with_the_deliveries_of_its_original(db: TestDb) {
    let mut config = db.config();
    config.allow_private_urls = true;
    let app = spawn_app_with(config).await;
    // Paused: the deliveries wait, nothing is sent.
    let endpoint = |name: &str| {
        format!("apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec:\n  url: http://127.0.0.1:9/{name}\n  secrets: [{{value: whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP}}]\n  paused: true\n")
    };
    app.apply_yaml(&[endpoint("a"), endpoint("b")].join("---\n")).await;
    let first = json_with_status(app.post_json("/v1/events", &app.admin, order("d-1").to_string()).await, 202).await;
    let original = deliveries_of(&first);
    assert_eq!(original.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(), ["a", "b"]);

    // In a batch, twice, beside a new event: each copy gets the original's deliveries.
    let batch = json!([order("d-1"), order("d-2"), order("d-1")]);
    let body = json_with_status(app.post_json("/v1/events/batch", &app.admin, batch.to_string()).await, 202).await;
    let results = body["results"].as_array().unwrap();
    for duplicate in [&results[0], &results[2]] {
        assert_eq!(duplicate["id"], first["id"]);
        assert_eq!(deliveries_of(duplicate), original, "{duplicate}");
    }
    assert_eq!(results[1]["duplicate"], false);
    let fresh = deliveries_of(&results[1]);
    assert_eq!(fresh.len(), 2);
    assert!(fresh.iter().all(|d| !original.contains(d)), "a new event gets deliveries of its own");

    // A replay by idempotency key: every event of it is a duplicate, answered likewise.
    let keyed = json!([order("d-3"), order("d-1")]).to_string();
    let send = || {
        app.client
            .post(app.url("/v1/events/batch"))
            .bearer_auth(&app.admin)
            .header("content-type", "application/json")
            .header("idempotency-key", "dup-key")
            .body(keyed.clone())
            .send()
    };
    let once = json_with_status(send().await.unwrap(), 202).await;
    let replayed = json_with_status(send().await.unwrap(), 200).await;
    for (a, b) in once["results"].as_array().unwrap().iter().zip(replayed["results"].as_array().unwrap()) {
        assert_eq!(b["id"], a["id"]);
        assert_eq!(b["duplicate"], true);
        assert_eq!(deliveries_of(b), deliveries_of(a), "{b}");
    }

    // The event shows the same deliveries, each with its (no) attempts. A paused endpoint's
    // deliveries are claimed once to be parked (leased for that moment): read them parked.
    let id = first["id"].as_str().unwrap();
    let event_id = hookwarden::ids::EventId::parse(id).unwrap();
    eventually(Duration::from_secs(10), "the original's deliveries parked", || async {
        let parked = chrono::Utc::now() + chrono::Duration::seconds(30);
        let deliveries = app.store.deliveries_of_event(&event_id).await.unwrap();
        deliveries.iter().all(|d| d.state == hookwarden::store::DeliveryState::Pending && d.next_attempt_at > parked)
    })
    .await;
    let event = json_with_status(app.get(&format!("/v1/events/{id}"), &app.admin).await, 200).await;
    assert_eq!(deliveries_of(&event), original);
    for delivery in event["deliveries"].as_array().unwrap() {
        assert_eq!(delivery["attempts_detail"], json!([]), "{delivery}");
        assert_eq!(delivery["state"], "pending", "{delivery}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_duplicate_is_answered_with_the_deliveries_of_its_original_on_sqlite() {
    a_duplicate_is_answered_with_the_deliveries_of_its_original(TestDb::sqlite()).await;
}

#[tokio::test]
async fn a_duplicate_is_answered_with_the_deliveries_of_its_original_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    a_duplicate_is_answered_with_the_deliveries_of_its_original(db).await;
}

#[tokio::test]
async fn fifty_concurrent_posts_of_one_event_store_it_once_on_sqlite() {
    let db = TestDb::sqlite();
    fifty_concurrent_posts_of_one_event_store_it_once(&spawn_app(&db).await).await;
}

#[tokio::test]
async fn fifty_concurrent_posts_of_one_event_store_it_once_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    fifty_concurrent_posts_of_one_event_store_it_once(&spawn_app(&db).await).await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_original_result_on_sqlite() {
    let db = TestDb::sqlite();
    an_idempotency_key_returns_the_original_result(&spawn_app(&db).await).await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_original_result_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    an_idempotency_key_returns_the_original_result(&spawn_app(&db).await).await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let health = json_with_status(app.client.get(app.url("/healthz")).send().await.unwrap(), 200).await;
    assert_eq!(health["status"], "ok");
    let ready = json_with_status(app.client.get(app.url("/readyz")).send().await.unwrap(), 200).await;
    assert_eq!(ready["database"], "sqlite");
    app.stop().await;
}

/// Random, mostly-broken bodies: the answer is always a 2xx or a 4xx, never a 5xx.
#[tokio::test]
async fn random_bodies_never_cause_a_server_error() {
    let db = TestDb::sqlite();
    let mut config = db.config();
    config.ingest.max_body_bytes = 8192;
    let app = spawn_app_with(config).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x486f6f6b);
    let valid = order("fuzz").to_string();
    for i in 0..600 {
        let body: Vec<u8> = match i % 6 {
            0 => (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect(),
            1 => random_json(&mut rng, 0).to_string().into_bytes(),
            2 => {
                let mut b = valid.clone().into_bytes();
                b.truncate(rng.gen_range(0..b.len()));
                b
            }
            3 => {
                let mut b = valid.clone().into_bytes();
                let at = rng.gen_range(0..b.len());
                b[at] = rng.gen();
                b
            }
            4 => {
                let mut event = order(&format!("fuzz-{i}"));
                let fields = [
                    "id",
                    "source",
                    "type",
                    "subject",
                    "time",
                    "namespace",
                    "data",
                    "specversion",
                    "datacontenttype",
                    "extra",
                ];
                let field = fields[rng.gen_range(0..fields.len())];
                if rng.gen_bool(0.3) {
                    event.as_object_mut().unwrap().remove(field);
                } else {
                    event[field] = random_json(&mut rng, 1);
                }
                event.to_string().into_bytes()
            }
            _ => Value::Array((0..rng.gen_range(0..4)).map(|_| random_json(&mut rng, 1)).collect())
                .to_string()
                .into_bytes(),
        };
        let path = if rng.gen_bool(0.7) { "/v1/events" } else { "/v1/events/batch" };
        let content_type =
            ["application/json", "application/json", "text/plain", "application/x+json"][rng.gen_range(0..4)];
        let response = app
            .client
            .post(app.url(path))
            .bearer_auth(&app.admin)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(
            status.is_success() || status.is_client_error(),
            "{status} for {path} with {:?}: {text}",
            String::from_utf8_lossy(&body)
        );
        if status.is_client_error() {
            let error: Value = serde_json::from_str(&text).expect("errors are JSON");
            assert!(error["error"]["code"].is_string());
        }
    }
    json_with_status(app.client.get(app.url("/readyz")).send().await.unwrap(), 200).await;
}

fn random_json(rng: &mut impl Rng, depth: u32) -> Value {
    match rng.gen_range(0..if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.gen()),
        2 => json!(rng.gen::<i64>()),
        3 => json!(rng.gen::<f64>() * 1e6),
        4 => {
            let pool = ["", "a", "order.created", "\u{0}", "é", "2026-11-28T10:00:00Z", "-x-", "default", "{\"x\":"];
            Value::String(pool[rng.gen_range(0..pool.len())].repeat(rng.gen_range(1..4)))
        }
        5 => Value::Array((0..rng.gen_range(0..4)).map(|_| random_json(rng, depth + 1)).collect()),
        _ => {
            let keys = ["source", "type", "data", "id", "time", "namespace", "subject", "x"];
            let mut map = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..6) {
                map.insert(keys[rng.gen_range(0..keys.len())].to_owned(), random_json(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

/// With the database's write lock held elsewhere, commits stall; a full ingest queue must
/// then answer 503 with `Retry-After` at once instead of queueing without bound.
#[tokio::test]
async fn a_full_ingest_queue_answers_503_with_retry_after() {
    use sqlx::Connection as _;
    let db = TestDb::sqlite();
    let mut config = db.config();
    config.ingest.queue_capacity = 1;
    let app = spawn_app_with(config).await;
    let mut blocker = sqlx::SqliteConnection::connect(&db.url()).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut blocker).await.unwrap();

    let (done, mut results) = tokio::sync::mpsc::unbounded_channel();
    for n in 0..6 {
        let (client, url, token, done) = (app.client.clone(), app.url("/v1/events"), app.admin.clone(), done.clone());
        tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(order(&format!("queued-{n}")).to_string())
                .send()
                .await
                .unwrap();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            done.send((status, retry_after, body)).unwrap();
        });
    }
    drop(done);
    // While the lock is held nothing can commit, so the first answers are refusals.
    let (status, retry_after, body) = results.recv().await.unwrap();
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{body}");
    assert_eq!(body["error"]["code"], "overloaded");

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let mut accepted = 0;
    while let Some((status, _, body)) = results.recv().await {
        match status {
            202 => accepted += 1,
            503 => assert_eq!(body["error"]["code"], "overloaded"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(accepted >= 1, "requests that were queued are committed once the lock is released");
}
