//! Tenants cannot read or borrow each other's secrets, and secrets are never echoed.
//!
//! A `valueFrom` source names only what the server's operator allowed the namespace:
//! variables `HOOKWARDEN_SECRET_<NAMESPACE>__<NAME>` and files in
//! `secrets.fileRoot/<namespace>/`. A reference outside that set is refused at apply with
//! one message whether or not what it names exists; unauthenticated `/readyz` says which
//! endpoints wait, never what their references are. Error messages, logs and `/readyz`
//! never repeat a value written in a `secrets` field, and header values are shown only
//! for headers listed in `plainHeaders`.

#[macro_use]
mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::receiver::{verify, Script, TestReceiver, SECRET};
use common::{eventually, spawn_app_with, token, Process, TestApp, TestDb};
use hookwarden::auth::Role;
use serde_json::{json, Value};

/// Namespace `a`'s secret, known to the server only.
const SECRET_OF_A: &str = "whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP";

fn ok() -> Script {
    Arc::new(|_, _| (200, None, Duration::ZERO))
}

fn endpoint(namespace: &str, name: &str, url: &str, secret: &str, extra: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  url: {url}\n  secrets: [{secret}]\n{extra}"
    )
}

/// A `hookwarden serve` process with private URLs allowed and `env` set.
fn serve(db: &TestDb, env: &[(&str, &str)], extra: &[&str]) -> Process {
    let mut args = vec!["--allow-private-urls", "true"];
    args.extend_from_slice(extra);
    let mut command = Process::command(db, &args);
    for (name, value) in env {
        command.env(name, value);
    }
    Process::try_start(command).unwrap_or_else(|failed| panic!("{failed}"))
}

async fn apply(base: &str, token: &str, yaml: &str, query: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/apply{query}"))
        .bearer_auth(token)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn get(base: &str, token: &str, path: &str) -> Value {
    let response = reqwest::Client::new().get(format!("{base}{path}")).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

async fn post_event(base: &str, token: &str, namespace: &str, id: &str) {
    let event = json!({"id": id, "namespace": namespace, "source": "shop", "type": "order.created", "data": {}});
    let response =
        reqwest::Client::new().post(format!("{base}/v1/events")).bearer_auth(token).json(&event).send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

/// The one error of a refused apply: `(path, message)`.
fn only_error(status: u16, body: &Value) -> (String, String) {
    assert_eq!(status, 422, "{body}");
    let errors = body["errors"].as_array().unwrap_or_else(|| panic!("no errors in {body}"));
    assert_eq!(errors.len(), 1, "{body}");
    (errors[0]["path"].as_str().unwrap().to_owned(), errors[0]["message"].as_str().unwrap().to_owned())
}

fn condition(doc: &Value, kind: &str) -> Value {
    doc["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .cloned()
        .unwrap_or_default()
}

async fn a_namespace_cannot_sign_with_a_variable_of_another_namespace(db: TestDb) {
    let receiver = TestReceiver::start(ok()).await;
    let server = serve(&db, &[("HOOKWARDEN_SECRET_A__WAREHOUSE", SECRET_OF_A)], &[]);
    let admin = token("admin", &[Role::Admin], &["*"]);
    let operator_b = token("ops-b", &[Role::Operator, Role::Ingest], &["b"]);

    // Namespace `a` uses its own variable.
    let own = "{valueFrom: {env: HOOKWARDEN_SECRET_A__WAREHOUSE}}";
    let (status, body) =
        apply(&server.base, &admin, &endpoint("a", "warehouse", &receiver.url("/a"), own, ""), "").await;
    assert_eq!(status, 200, "{body}");
    post_event(&server.base, &admin, "a", "a-1").await;
    eventually(Duration::from_secs(10), "a's delivery", || async { !receiver.on("/a").is_empty() }).await;
    let delivered = &receiver.on("/a")[0];
    verify(SECRET_OF_A, &delivered.headers, &delivered.body).unwrap();

    // An operator of `b` names a's variable, the server's own settings, or a variable that
    // does not exist: refused alike, at apply (also a dry run), naming what b may name.
    let mut messages = Vec::new();
    for variable in ["HOOKWARDEN_SECRET_A__WAREHOUSE", "HOOKWARDEN_JWT_SECRET", "PATH", "HOOKWARDEN_SECRET_A__NOT_SET"]
    {
        let stolen = format!("{{valueFrom: {{env: {variable}}}}}");
        for query in ["?dryRun=true", ""] {
            let yaml = endpoint("b", "thief", &receiver.url("/b"), &stolen, "");
            let (status, body) = apply(&server.base, &operator_b, &yaml, query).await;
            let (path, message) = only_error(status, &body);
            assert_eq!(path, "spec.secrets[0].valueFrom.env", "{body}");
            assert!(message.contains("HOOKWARDEN_SECRET_B__"), "names the allowed form: {message}");
            assert!(!body.to_string().contains(variable), "{body}");
            messages.push(message);
        }
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "one message whatever the variable: {messages:#?}");
    post_event(&server.base, &operator_b, "b", "b-1").await;
    let listed = get(&server.base, &admin, "/v1/resources/Endpoint?namespace=b").await;
    assert_eq!(listed["items"], json!([]), "nothing was written in b");
    assert!(receiver.on("/b").is_empty());
    server.kill();
}

async fn file_sources_are_read_only_from_the_namespace_s_own_directory(db: TestDb) {
    let receiver = TestReceiver::start(ok()).await;
    let root = tempfile::tempdir().unwrap();
    for namespace in ["a", "b"] {
        std::fs::create_dir(root.path().join(namespace)).unwrap();
    }
    std::fs::write(root.path().join("a/warehouse"), format!("{SECRET_OF_A}\n")).unwrap();
    let root_text = root.path().display().to_string();
    let server = serve(&db, &[("HOOKWARDEN_SECRETS_FILE_ROOT", &root_text)], &[]);
    let admin = token("admin", &[Role::Admin], &["*"]);
    let operator_b = token("ops-b", &[Role::Operator, Role::Ingest], &["b"]);

    // Any path outside b's directory, existing or not, a device or a FIFO: one refusal.
    let a_file = root.path().join("a/warehouse").display().to_string();
    let elsewhere = tempfile::tempdir().unwrap();
    let fifo = elsewhere.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let fifo = fifo.display().to_string();
    let mut messages = Vec::new();
    let paths = ["/etc/passwd", "/dev/zero", &fifo, "/no/such/file", "../a/warehouse", "./../a/warehouse", &a_file];
    for path in paths {
        let stolen = format!("{{valueFrom: {{file: \"{path}\"}}}}");
        for query in ["?dryRun=true", ""] {
            let yaml = endpoint("b", "thief", &receiver.url("/b"), &stolen, "");
            let (status, body) = apply(&server.base, &operator_b, &yaml, query).await;
            let (error_path, message) = only_error(status, &body);
            assert_eq!(error_path, "spec.secrets[0].valueFrom.file", "{body}");
            assert!(message.contains("relative"), "names the allowed form: {message}");
            assert!(!body.to_string().contains(path.trim_start_matches("./")), "{body}");
            messages.push(message);
        }
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "one message whatever the path: {messages:#?}");
    assert!(receiver.on("/b").is_empty());

    // Namespace `a` reads its own file.
    let own = "{valueFrom: {file: warehouse}}";
    let (status, body) =
        apply(&server.base, &admin, &endpoint("a", "warehouse", &receiver.url("/a"), own, ""), "").await;
    assert_eq!(status, 200, "{body}");
    post_event(&server.base, &admin, "a", "a-1").await;
    eventually(Duration::from_secs(10), "a's delivery, signed from a's file", || async {
        !receiver.on("/a").is_empty()
    })
    .await;
    let delivered = &receiver.on("/a")[0];
    verify(SECRET_OF_A, &delivered.headers, &delivered.body).unwrap();

    // b's own file that is not there yet: b's viewers learn it from the status, and an
    // unauthenticated /readyz says only that the endpoint waits.
    let pending = "{valueFrom: {file: not-yet-there}}";
    let (status, body) =
        apply(&server.base, &operator_b, &endpoint("b", "orders", &receiver.url("/b"), pending, ""), "").await;
    assert_eq!(status, 200, "{body}");
    let viewer_b = token("view-b", &[Role::Viewer], &["b"]);
    eventually(Duration::from_secs(10), "b's status says its file cannot be read", || async {
        let doc = get(&server.base, &viewer_b, "/v1/resources/Endpoint/b/orders").await;
        let ready = condition(&doc, "Ready");
        ready["reason"] == "SecretUnavailable" && ready["message"].as_str().unwrap_or("").contains("not-yet-there")
    })
    .await;
    let ready: Value = reqwest::get(format!("{}/readyz", server.base)).await.unwrap().json().await.unwrap();
    let blocked = &ready["endpoints"]["blocked"];
    assert_eq!(blocked, &json!([{"namespace": "b", "name": "orders", "reason": "SecretUnavailable"}]), "{ready}");
    assert!(!ready.to_string().contains("not-yet-there"), "{ready}");

    post_event(&server.base, &operator_b, "b", "b-1").await;
    std::fs::write(root.path().join("b/not-yet-there"), SECRET).unwrap();
    eventually(Duration::from_secs(15), "b's delivery once its file exists", || async {
        !receiver.on("/b").is_empty()
    })
    .await;
    let delivered = &receiver.on("/b")[0];
    verify(SECRET, &delivered.headers, &delivered.body).unwrap();
    server.kill();
}

/// Secrets written where they do not belong: as a key of a secret source, of `valueFrom`,
/// beside a `value`, and of the spec (one indentation short).
const MISPLACED: [&str; 4] = [
    "whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP",
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "whsec_plR3Ck9AklJSG5QVLLuQdjzCqGP9EFGU",
    "whsec_9EFGUiEHPplR3Ck9AklJSG5QVLLuQdjz",
];

fn misplaced_secrets() -> String {
    let [key, nested, extra, unindented] = MISPLACED;
    [
        endpoint("default", "as-key", "https://a.example.com", &format!("{{{key}: x}}"), ""),
        endpoint("default", "nested", "https://b.example.com", &format!("{{valueFrom: {{{nested}: x}}}}"), ""),
        endpoint("default", "beside", "https://c.example.com", &format!("{{value: {SECRET}, {extra}: y}}"), ""),
        format!("apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: unindented}}\nspec:\n  url: https://d.example.com\n  secrets:\n  {unindented}:\n"),
    ]
    .join("---\n")
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in MISPLACED {
        assert!(!text.contains(secret), "{what} repeats a secret: {text}");
    }
}

async fn secrets_in_the_wrong_place_are_never_echoed(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("endpoints.yaml"), misplaced_secrets()).unwrap();
    let dir_text = dir.path().display().to_string();
    let server = serve(&db, &[], &["--resources", &dir_text]);
    let admin = token("admin", &[Role::Admin], &["*"]);

    let last_error = || async {
        let ready: Value = reqwest::get(format!("{}/readyz", server.base)).await.unwrap().json().await.unwrap();
        (ready["controller"]["lastError"].as_str().unwrap_or_default().to_owned(), ready.to_string())
    };
    eventually(Duration::from_secs(10), "the directory's error in /readyz", || async {
        !last_error().await.0.is_empty()
    })
    .await;
    let (error, ready) = last_error().await;
    assert_no_secret("/readyz", &ready);
    for expected in ["(document 0", "(document 1", "(document 2", "(document 3", "spec.secrets[0]"] {
        assert!(error.contains(expected), "{expected} in {error}");
    }
    let rejected = "resources directory rejected; the last good state stays in force";
    eventually(Duration::from_secs(5), "the rejection in the log", || async { !server.logged(rejected).is_empty() })
        .await;
    assert_no_secret("the log", &server.logs.lock().unwrap().join("\n"));

    for query in ["?dryRun=true", ""] {
        let (status, body) = apply(&server.base, &admin, &misplaced_secrets(), query).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["errors"].as_array().unwrap().len(), 4, "{body}");
        assert_no_secret("the apply answer", &body.to_string());
    }

    let file = dir.path().join("endpoints.yaml");
    let validated =
        Command::new(env!("CARGO_BIN_EXE_hookwarden")).arg("validate").arg("-f").arg(&file).output().unwrap();
    assert!(!validated.status.success());
    let printed = String::from_utf8_lossy(&validated.stderr).to_string() + &String::from_utf8_lossy(&validated.stdout);
    assert!(printed.contains("spec.secrets[0]"), "{printed}");
    assert_no_secret("hookwarden validate", &printed);
    server.kill();
}

fn with_headers(url: &str, headers: &str) -> String {
    endpoint("default", "crm", url, &format!("{{value: {SECRET}}}"), &format!("  eventTypes: [\"order.*\"]\n{headers}"))
}

async fn apply_app(app: &TestApp, yaml: &str, query: &str) -> (u16, Value) {
    apply(&app.base, &app.admin, yaml, query).await
}

async fn header_values_are_shown_only_for_headers_listed_as_plain(db: TestDb) {
    let receiver = TestReceiver::start(ok()).await;
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    let app = spawn_app_with(config).await;
    let url = receiver.url("/crm");
    let viewer = token("viewer", &[Role::Viewer], &["*"]);

    let first = "  headers: {Authorization: Bearer tok-first-0123, X-Team: fulfilment}\n";
    let (status, body) = apply_app(&app, &with_headers(&url, first), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_string().contains("tok-first"), "the created diff: {body}");
    let doc = get(&app.base, &viewer, "/v1/resources/Endpoint/default/crm").await;
    assert_eq!(doc["spec"]["headers"], json!({"Authorization": "(redacted)", "X-Team": "(redacted)"}), "{doc}");
    let listed = get(&app.base, &viewer, "/v1/resources/endpoints").await;
    assert!(!listed.to_string().contains("tok-first") && !listed.to_string().contains("fulfilment"), "{listed}");

    // Listed as plain, a header's value is shown; a changed secret header shows as changed.
    let second = "  headers: {Authorization: Bearer tok-second-4567, X-Team: fulfilment}\n  plainHeaders: [x-team]\n";
    let (status, body) = apply_app(&app, &with_headers(&url, second), "?dryRun=true").await;
    assert_eq!(status, 200, "{body}");
    let diff: Vec<String> = serde_json::from_value(body["results"][0]["diff"].clone()).unwrap();
    assert!(diff.contains(&"~ spec.headers.Authorization: (redacted) → (redacted) (changed)".to_owned()), "{diff:?}");
    assert!(diff.contains(&"+ spec.plainHeaders[0]: \"x-team\"".to_owned()), "{diff:?}");
    assert!(!body.to_string().contains("tok-"), "{body}");
    let (status, _) = apply_app(&app, &with_headers(&url, second), "").await;
    assert_eq!(status, 200);
    let doc = get(&app.base, &viewer, "/v1/resources/Endpoint/default/crm").await;
    assert_eq!(doc["spec"]["headers"], json!({"Authorization": "(redacted)", "X-Team": "fulfilment"}), "{doc}");

    // The receiver gets the real values.
    post_event(&app.base, &app.admin, "default", "o-1").await;
    eventually(Duration::from_secs(10), "the delivery", || async { !receiver.on("/crm").is_empty() }).await;
    let sent = &receiver.on("/crm")[0].headers;
    assert_eq!(
        (sent["authorization"].to_str().unwrap(), sent["x-team"].to_str().unwrap()),
        ("Bearer tok-second-4567", "fulfilment")
    );

    // What GET shows, applied again, is refused where a value was redacted.
    let shown = get(&app.base, &app.admin, "/v1/resources/Endpoint/default/crm").await;
    let (status, body) = apply_app(&app, &serde_json::to_string(&shown).unwrap(), "").await;
    assert_eq!(status, 422, "{body}");
    let paths: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["spec.secrets[0].value", "spec.headers.Authorization"], "{body}");
    let message = body["errors"][1]["message"].as_str().unwrap();
    assert!(message.contains("redacted") && message.contains("plainHeaders"), "{message}");
    let doc = get(&app.base, &app.admin, "/v1/resources/Endpoint/default/crm").await;
    assert_eq!(doc["metadata"]["generation"], 2, "nothing was written: {doc}");

    // plainHeaders names headers the endpoint sets.
    let typo = "  headers: {X-Team: fulfilment}\n  plainHeaders: [X-Teem]\n";
    let (status, body) = apply_app(&app, &with_headers(&url, typo), "?dryRun=true").await;
    let (path, _) = only_error(status, &body);
    assert_eq!(path, "spec.plainHeaders[0]");
}

/// The server's operator cannot widen the sets by mistake: a prefix other namespaces'
/// variables could start with, or a file root that is not an absolute directory.
#[test]
fn settings_that_would_widen_what_namespaces_may_name_stop_the_server() {
    let db = TestDb::sqlite();
    for (name, value, setting) in [
        ("HOOKWARDEN_SECRETS_ENV_PREFIX", "", "secrets.envPrefix"),
        ("HOOKWARDEN_SECRETS_ENV_PREFIX", "hookwarden_", "secrets.envPrefix"),
        ("HOOKWARDEN_SECRETS_FILE_ROOT", "relative/secrets", "secrets.fileRoot"),
    ] {
        let mut command = Process::command(&db, &[]);
        command.env(name, value);
        let failed = Process::start_must_fail(command, &format!("{name}={value:?} is refused"));
        assert_eq!(failed.code, Some(2), "{failed}");
        assert!(failed.stderr.contains(setting), "{failed}");
    }
}

on_both_databases!(
    a_namespace_cannot_sign_with_a_variable_of_another_namespace,
    file_sources_are_read_only_from_the_namespace_s_own_directory,
    secrets_in_the_wrong_place_are_never_echoed,
    header_values_are_shown_only_for_headers_listed_as_plain,
);
