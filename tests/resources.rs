//! Declarative resources over the HTTP API and the CLI: apply, diff, validate, prune,
//! the watched directory, leadership and namespace isolation.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{eventually, spawn_app, spawn_app_with, token, Process, TestApp, TestDb};
use hookwarden::auth::Role;
use serde_json::Value;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn budget(name: &str, namespace: &str, max: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  maxAttempts: 5\n  backoff: {{base: 1s, max: {max}}}\n"
    )
}

fn endpoint(name: &str, namespace: &str, budget: &str, timeout: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{team: a}}}}\nspec:\n  url: https://{name}.example.com/hooks\n  secrets: [{{value: {SECRET}}}]\n  eventTypes: [\"order.*\"]\n  retryBudgetRef: {budget}\n  timeout: {timeout}\n"
    )
}

fn filter(name: &str, namespace: &str, expression: &str) -> String {
    format!("apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  expression: \"{expression}\"\n")
}

fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

async fn apply(app: &TestApp, token: &str, yaml: &str, query: &str) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(&format!("/v1/apply{query}")))
        .bearer_auth(token)
        .header("content-type", "application/yaml")
        .body(yaml.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn actions(body: &Value) -> Vec<(String, String)> {
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results in {body}"))
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r["action"].as_str().unwrap().to_owned()))
        .collect()
}

async fn resource(app: &TestApp, kind: &str, namespace: &str, name: &str) -> Option<Value> {
    let response = app.get(&format!("/v1/resources/{kind}/{namespace}/{name}"), &app.admin).await;
    match response.status().as_u16() {
        200 => Some(response.json().await.unwrap()),
        404 => None,
        other => panic!("unexpected {other}"),
    }
}

async fn applying_the_same_files_twice_changes_nothing(db: TestDb) {
    let app = spawn_app(&db).await;
    let yaml = docs(&[budget("standard", "payments", "1m"), endpoint("warehouse", "payments", "standard", "10s")]);
    let (status, body) = apply(&app, &app.admin, &yaml, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(actions(&body).iter().all(|(_, a)| a == "created"));
    let before = resource(&app, "Endpoint", "payments", "warehouse").await.unwrap();

    let (_, body) = apply(&app, &app.admin, &yaml, "").await;
    assert!(actions(&body).iter().all(|(_, a)| a == "unchanged"), "{body}");
    let after = resource(&app, "Endpoint", "payments", "warehouse").await.unwrap();
    assert_eq!(after["metadata"]["generation"], 1);
    assert_eq!(after["metadata"]["updatedAt"], before["metadata"]["updatedAt"], "an unchanged apply writes nothing");

    // A spec change bumps the generation; a label change alone does not.
    let changed = docs(&[budget("standard", "payments", "1m"), endpoint("warehouse", "payments", "standard", "5s")]);
    let (_, body) = apply(&app, &app.admin, &changed, "").await;
    assert_eq!(actions(&body), [("standard".into(), "unchanged".into()), ("warehouse".into(), "configured".into())]);
    assert_eq!(body["results"][1]["generation"], 2);
    assert!(body["results"][1]["diff"].to_string().contains(r#"~ spec.timeout: \"10s\" → \"5s\""#), "{body}");
    let relabelled = changed.replace("team: a", "team: b");
    let (_, body) = apply(&app, &app.admin, &relabelled, "").await;
    assert_eq!(body["results"][1]["action"], "configured");
    assert_eq!(body["results"][1]["generation"], 2);
    assert!(body["results"][1]["diff"].to_string().contains(r#"~ metadata.labels.team: \"a\" → \"b\""#), "{body}");
}

async fn an_invalid_apply_writes_nothing_and_names_every_error(db: TestDb) {
    let app = spawn_app(&db).await;
    let good = budget("standard", "default", "1m");
    let unknown_field = good.replace("maxAttempts", "maxAttempt");
    let bad_duration = budget("other", "default", "soon");
    let ill_typed = budget("typed", "default", "1m").replace("maxAttempts: 5", "maxAttempts: x");
    let dangling = endpoint("hooks", "default", "missing-budget", "10s");
    // It refers to a document that is in the apply but does not parse: that document's
    // own error says what is wrong, the reference is not reported as missing.
    let refers_to_unparsed = endpoint("typed-hooks", "default", "typed", "10s");
    let bad_cel = filter("broken", "default", "event.data.total >= ");
    let duplicate = budget("standard", "default", "2m");
    // Parse errors and validation errors come back together, in one answer.
    let yaml = docs(&[good, unknown_field, bad_duration, ill_typed, dangling, refers_to_unparsed, bad_cel, duplicate]);
    let (status, body) = apply(&app, &app.admin, &yaml, "").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_resources");
    let errors: Vec<(u64, String, String)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["file"], "(body)");
            (
                e["document"].as_u64().unwrap(),
                e["path"].as_str().unwrap().to_owned(),
                e["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let has =
        |doc: u64, path: &str, text: &str| errors.iter().any(|(d, p, m)| *d == doc && p == path && m.contains(text));
    assert!(has(1, "spec.maxAttempt", "unknown field"), "{errors:#?}");
    assert!(has(2, "spec.backoff.max", "`soon` is not a duration like 30s, 5m or 24h"), "{errors:#?}");
    assert!(has(3, "spec.maxAttempts", "must be a whole number from 0 to 4294967295, not a text"), "{errors:#?}");
    assert!(has(4, "spec.retryBudgetRef", "RetryBudget `missing-budget` not found"), "{errors:#?}");
    assert!(has(6, "spec.expression", "is not valid CEL"), "{errors:#?}");
    assert!(has(7, "metadata.name", "duplicate RetryBudget `standard`"), "{errors:#?}");
    assert_eq!(errors.len(), 6, "one error per bad document, none for the reference to `typed`: {errors:#?}");
    let listed = app.get("/v1/resources/RetryBudget", &app.admin).await.json::<Value>().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "nothing was written");
}

/// Specs stored by an older build wrote durations the way `humantime` does (`1day`,
/// `3days`, `1m 30s`); this build writes `24h`, `72h`, `90s`.
async fn durations_stored_by_an_older_build_read_as_this_build_writes_them(db: TestDb) {
    let app = spawn_app(&db).await;
    let old_spec = serde_json::json!({
        "maxAttempts": 5,
        "backoff": {"base": "1m 30s", "max": "1h", "jitter": "full"},
        "deadLetterAfter": "3days",
        "circuitBreaker": {"consecutiveFailures": 3, "openFor": "1day"},
    });
    let key = hookwarden::resources::ResourceKey {
        kind: hookwarden::resources::Kind::RetryBudget,
        namespace: "default".into(),
        name: "old".into(),
    };
    let written = app
        .store
        .apply_resources(&hookwarden::store::ApplyRequest {
            resources: vec![hookwarden::store::DesiredResource {
                key,
                labels: Default::default(),
                annotations: Default::default(),
                spec: old_spec,
            }],
            actor: "older-build".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(written[0].action, hookwarden::store::ApplyAction::Created);
    let same = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: old}\nspec:\n  maxAttempts: 5\n  backoff: {base: 90s, max: 1h}\n  deadLetterAfter: 72h\n  circuitBreaker: {consecutiveFailures: 3, openFor: 24h}\n";
    for _ in 0..2 {
        let (status, body) = apply(&app, &app.admin, same, "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(actions(&body), [("old".into(), "unchanged".into())], "{body}");
    }
    let shown = resource(&app, "RetryBudget", "default", "old").await.unwrap();
    assert_eq!(shown["spec"]["deadLetterAfter"], "72h", "{shown}");
    assert_eq!(shown["spec"]["circuitBreaker"]["openFor"], "24h", "{shown}");
    assert_eq!(shown["spec"]["backoff"]["base"], "90s", "{shown}");
    assert_eq!(shown["metadata"]["generation"], 1);
    // A real change shows in the diff, in this build's words only.
    let (_, body) = apply(&app, &app.admin, &same.replace("deadLetterAfter: 72h", "deadLetterAfter: 96h"), "").await;
    assert_eq!(actions(&body), [("old".into(), "configured".into())], "{body}");
    let diff = body["results"][0]["diff"].as_array().unwrap();
    assert_eq!(diff.len(), 1, "{body}");
    assert_eq!(diff[0], r#"~ spec.deadLetterAfter: "72h" → "96h""#, "{body}");
}

async fn a_dry_run_writes_nothing(db: TestDb) {
    let app = spawn_app(&db).await;
    let (status, body) = apply(&app, &app.admin, &budget("standard", "default", "1m"), "?dryRun=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dryRun"], true);
    assert_eq!(actions(&body), [("standard".into(), "created".into())]);
    assert!(resource(&app, "RetryBudget", "default", "standard").await.is_none());
}

async fn prune_removes_only_members_of_the_named_set_that_left(db: TestDb) {
    let app = spawn_app(&db).await;
    let (a, b, other) = (budget("a", "default", "1m"), budget("b", "default", "1m"), budget("other", "default", "1m"));
    let loose = budget("loose", "default", "1m");
    assert_eq!(apply(&app, &app.admin, &docs(&[a.clone(), b]), "?applyset=team-a").await.0, 200);
    assert_eq!(apply(&app, &app.admin, &other, "?applyset=team-b").await.0, 200);
    assert_eq!(apply(&app, &app.admin, &loose, "").await.0, 200);

    // A resource of another set cannot be taken over.
    let (status, body) = apply(&app, &app.admin, &budget("other", "default", "1m"), "?applyset=team-a").await;
    assert_eq!(status, 422, "{body}");
    assert!(body["errors"].to_string().contains("belongs to apply set `team-b`"));

    let (status, body) = apply(&app, &app.admin, &a, "?applyset=team-a&prune=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(actions(&body), [("a".into(), "unchanged".into()), ("b".into(), "pruned".into())]);
    assert!(resource(&app, "RetryBudget", "default", "b").await.is_none());
    assert!(resource(&app, "RetryBudget", "default", "other").await.is_some(), "another set is never pruned");
    assert!(resource(&app, "RetryBudget", "default", "loose").await.is_some(), "unowned resources are never pruned");
    let (status, body) = apply(&app, &app.admin, &a, "?prune=true").await;
    assert_eq!(status, 400, "prune needs an apply set: {body}");
}

/// An apply set is a name within a namespace: a tenant that uses another tenant's set name
/// neither learns that the other exists (no 403 naming its namespace) nor prunes, claims
/// or blocks the other's resources, and the other's prunes leave it alone.
async fn an_apply_set_name_belongs_to_each_tenant_apart(db: TestDb) {
    let app = spawn_app(&db).await;
    let alice = token("alice", &[Role::Operator], &["team-a"]);
    let bob = token("bob", &[Role::Operator], &["team-b"]);
    let (a1, a2) = (budget("a1", "team-a", "1m"), budget("a2", "team-a", "1m"));
    let (b1, b2) = (budget("b1", "team-b", "1m"), budget("b2", "team-b", "1m"));
    let (status, body) = apply(&app, &alice, &docs(&[a1.clone(), a2.clone()]), "?applyset=prod").await;
    assert_eq!(status, 200, "{body}");

    // Bob applies and prunes under the same name: his own set, in his namespace.
    for query in ["?applyset=prod&prune=true&dryRun=true", "?applyset=prod&prune=true"] {
        let (status, body) = apply(&app, &bob, &docs(&[b1.clone(), b2.clone()]), query).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(actions(&body), [("b1".into(), "created".into()), ("b2".into(), "created".into())], "{body}");
        assert!(!body.to_string().contains("team-a"), "nothing of team-a shows: {body}");
    }
    let (status, body) = apply(&app, &bob, &b1, "?applyset=prod&prune=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(actions(&body), [("b1".into(), "unchanged".into()), ("b2".into(), "pruned".into())], "{body}");
    for name in ["a1", "a2"] {
        assert!(resource(&app, "RetryBudget", "team-a", name).await.is_some(), "bob's prune left {name} alone");
    }

    // Alice's prune of `prod` never reaches team-b, and a prune with no documents at all
    // touches only her namespace too.
    let (status, body) = apply(&app, &alice, &a1, "?applyset=prod&prune=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(actions(&body), [("a1".into(), "unchanged".into()), ("a2".into(), "pruned".into())], "{body}");
    let (status, body) = apply(&app, &alice, "", "?applyset=prod&prune=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(actions(&body), [("a1".into(), "pruned".into())], "{body}");
    assert!(resource(&app, "RetryBudget", "team-b", "b1").await.is_some(), "alice's prunes left b1 alone");
    let (status, body) = apply(&app, &bob, "", "?applyset=prod&prune=true&dryRun=true").await;
    assert_eq!((status, actions(&body)), (200, vec![("b1".into(), "pruned".into())]), "{body}");
}

/// The review's SSRF gaps: addresses that embed a private IPv4 address, deprecated or
/// special-purpose blocks. Each is refused at apply, naming `spec.url`; nothing is sent
/// anywhere (the server only classifies the URL).
async fn endpoint_urls_that_are_not_public_are_refused_at_apply(db: TestDb) {
    let app = spawn_app(&db).await;
    let hosts = [
        "[::127.0.0.1]",
        "[::ffff:7f00:1]",
        "[64:ff9b::7f00:1]",
        "[64:ff9b::a9fe:a9fe]",
        "[2002:7f00:1::1]",
        "[2002:a9fe:a9fe::1]",
        "[fec0::1]",
        "[ff02::1]",
        "198.18.0.1",
        "192.0.0.1",
        "240.0.0.1",
        "224.0.0.1",
        "239.255.255.250",
    ];
    for host in hosts {
        let yaml = format!(
            "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: e, namespace: default}}\nspec:\n  url: http://{host}:8080/hooks\n  secrets: [{{value: {SECRET}}}]\n"
        );
        let (status, body) = apply(&app, &app.admin, &yaml, "").await;
        assert_eq!(status, 422, "{host} must be refused: {body}");
        assert_eq!(body["errors"][0]["path"], "spec.url", "{host}: {body}");
        assert!(body["errors"][0]["message"].as_str().unwrap().contains("private"), "{host}: {body}");
    }
    assert!(resource(&app, "Endpoint", "default", "e").await.is_none());
}

async fn a_watched_directory_reports_every_error_of_a_bad_change_at_once(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("budget.yaml"),
        budget("standard", "default", "1m").replace("maxAttempts: 5", "maxAttempts: x"),
    )
    .unwrap();
    std::fs::write(dir.path().join("endpoint.yaml"), endpoint("hooks", "default", "missing-budget", "10s")).unwrap();
    std::fs::write(dir.path().join("filter.yaml"), filter("broken", "default", "event.data.total >= ")).unwrap();
    let mut config = db.config();
    config.controller.resources_dir = Some(dir.path().to_owned());
    let app = spawn_app_with(config).await;
    let last_error = || async {
        let ready: Value = app.client.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
        ready["controller"]["lastError"].as_str().unwrap_or_default().to_owned()
    };
    eventually(Duration::from_secs(10), "the directory's error in /readyz", || async {
        !last_error().await.is_empty()
    })
    .await;
    let last_error = last_error().await;
    for expected in [
        "budget.yaml (document 0, line 5): spec.maxAttempts: must be a whole number from 0 to 4294967295, not a text",
        "endpoint.yaml (document 0): spec.retryBudgetRef: RetryBudget `missing-budget` not found",
        "filter.yaml (document 0): spec.expression: is not valid CEL",
    ] {
        assert!(last_error.contains(expected), "missing `{expected}` in {last_error}");
    }
    for kind in ["RetryBudget", "Endpoint", "Filter"] {
        let listed: Value = app.get(&format!("/v1/resources/{kind}"), &app.admin).await.json().await.unwrap();
        assert_eq!(listed["items"].as_array().unwrap().len(), 0, "nothing was written: {listed}");
    }
}

macro_rules! on_both_databases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $case() { super::$case(super::TestDb::sqlite()).await; } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $case() { let Some(db) = super::TestDb::postgres().await else { return }; super::$case(db).await; } )*
        }
    };
}

on_both_databases!(
    applying_the_same_files_twice_changes_nothing,
    an_invalid_apply_writes_nothing_and_names_every_error,
    durations_stored_by_an_older_build_read_as_this_build_writes_them,
    a_watched_directory_reports_every_error_of_a_bad_change_at_once,
    a_dry_run_writes_nothing,
    prune_removes_only_members_of_the_named_set_that_left,
    an_apply_set_name_belongs_to_each_tenant_apart,
    endpoint_urls_that_are_not_public_are_refused_at_apply,
);

#[tokio::test]
async fn secrets_are_never_returned() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let yaml = docs(&[budget("standard", "default", "1m"), endpoint("hooks", "default", "standard", "10s")]);
    let (_, body) = apply(&app, &app.admin, &yaml, "?dryRun=true").await;
    assert!(!body.to_string().contains("whsec_"), "{body}");
    apply(&app, &app.admin, &yaml, "").await;
    for path in ["/v1/resources/Endpoint/default/hooks", "/v1/resources/endpoints"] {
        let text = app.get(path, &app.admin).await.text().await.unwrap();
        assert!(!text.contains("whsec_") && text.contains("(redacted)"), "{text}");
    }
}

#[tokio::test]
async fn namespaces_isolate_reads_and_writes() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    apply(&app, &app.admin, &docs(&[budget("x", "a", "1m"), budget("y", "b", "1m")]), "").await;
    let operator_a = token("ops-a", &[Role::Operator], &["a"]);
    let viewer_a = token("view-a", &[Role::Viewer], &["a"]);

    assert_eq!(apply(&app, &operator_a, &budget("x2", "a", "1m"), "").await.0, 200);
    assert_eq!(apply(&app, &operator_a, &budget("y2", "b", "1m"), "").await.0, 403);
    assert_eq!(apply(&app, &viewer_a, &budget("x3", "a", "1m"), "").await.0, 403);
    assert_eq!(app.get("/v1/resources/RetryBudget/a/x", &viewer_a).await.status(), 200);
    assert_eq!(app.get("/v1/resources/RetryBudget/b/y", &viewer_a).await.status(), 404);
    assert_eq!(app.get("/v1/resources/RetryBudget?namespace=b", &viewer_a).await.status(), 403);
    let ingest_only = token("producer", &[Role::Ingest], &["*"]);
    assert_eq!(app.get("/v1/resources/RetryBudget", &ingest_only).await.status(), 403);
    let listed: Value = app.get("/v1/resources/RetryBudget", &viewer_a).await.json().await.unwrap();
    let names: Vec<&str> =
        listed["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["x", "x2"], "only namespace a is visible");
    let delete = |token: &str, path: &str| app.client.delete(app.url(path)).bearer_auth(token.to_owned()).send();
    assert_eq!(delete(&viewer_a, "/v1/resources/RetryBudget/a/x").await.unwrap().status(), 403);
    assert_eq!(delete(&operator_a, "/v1/resources/RetryBudget/b/y").await.unwrap().status(), 404);
    assert_eq!(delete(&operator_a, "/v1/resources/RetryBudget/a/x").await.unwrap().status(), 200);
    assert!(resource(&app, "RetryBudget", "b", "y").await.is_some());
}

fn cli(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_hookwarden"))
        .args(args)
        .env("HOOKWARDEN_SERVER", &app.base)
        .env("HOOKWARDEN_TOKEN", &app.admin)
        .output()
        .expect("run the CLI");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_applies_diffs_and_validates_with_documented_exit_codes() {
    let db = TestDb::sqlite();
    let app = spawn_app(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("set.yaml");
    std::fs::write(
        &file,
        docs(&[budget("standard", "default", "1m"), endpoint("hooks", "default", "standard", "10s")]),
    )
    .unwrap();
    let path = file.to_str().unwrap();

    let (code, out, err) = tokio::task::block_in_place(|| cli(&app, &["diff", "-f", path]));
    assert_eq!(code, 1, "differences before the first apply: {out}{err}");
    assert!(out.contains("endpoint/default/hooks (created)"), "{out}");

    let (code, out, err) = tokio::task::block_in_place(|| cli(&app, &["apply", "-f", path, "--dry-run"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(resource(&app, "Endpoint", "default", "hooks").await.is_none(), "--dry-run wrote something");

    let (code, out, err) = tokio::task::block_in_place(|| cli(&app, &["apply", "-f", dir.path().to_str().unwrap()]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("endpoint/default/hooks created"), "{out}");

    let (code, out, _) = tokio::task::block_in_place(|| cli(&app, &["diff", "-f", path]));
    assert_eq!(code, 0, "no differences after apply: {out}");

    std::fs::write(
        &file,
        docs(&[budget("standard", "default", "1m"), endpoint("hooks", "default", "standard", "20s")]),
    )
    .unwrap();
    let (code, out, _) = tokio::task::block_in_place(|| cli(&app, &["diff", "-f", path]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(r#"~ spec.timeout: "10s" → "20s""#), "{out}");

    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, budget("standard", "default", "1m").replace("maxAttempts", "maxAttempt")).unwrap();
    let (code, _, err) = tokio::task::block_in_place(|| cli(&app, &["diff", "-f", broken.to_str().unwrap()]));
    assert_eq!(code, 2, "an invalid file is an error, not a difference: {err}");
    assert!(err.contains("broken.yaml (document 0, line 5): spec.maxAttempt: unknown field"), "{err}");
    let (code, _, err) = tokio::task::block_in_place(|| cli(&app, &["apply", "-f", broken.to_str().unwrap()]));
    assert_eq!(code, 1, "{err}");
}

#[test]
fn validate_catches_the_same_mistakes_offline() {
    let dir = tempfile::tempdir().unwrap();
    let good = docs(&[budget("standard", "default", "1m"), endpoint("hooks", "default", "standard", "10s")]);
    std::fs::write(dir.path().join("good.yaml"), &good).unwrap();
    let run = |path: &std::path::Path| {
        let output = Command::new(env!("CARGO_BIN_EXE_hookwarden"))
            .args(["validate", "-f", path.to_str().unwrap()])
            .env_remove("HOOKWARDEN_SERVER")
            .output()
            .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, out) = run(dir.path());
    assert_eq!(code, 0, "{out}");

    let cases = [
        (
            "unknown-field.yaml",
            budget("a", "default", "1m").replace("maxAttempts", "maxAttempt"),
            "spec.maxAttempt: unknown field",
        ),
        ("bad-duration.yaml", budget("a", "default", "soon"), "spec.backoff.max: `soon` is not a duration"),
        (
            "dangling.yaml",
            endpoint("hooks", "default", "missing", "10s"),
            "spec.retryBudgetRef: RetryBudget `missing` not found",
        ),
        ("cel.yaml", filter("f", "default", "event.data.total >= "), "spec.expression: is not valid CEL"),
        (
            "duplicate.yaml",
            docs(&[budget("a", "default", "1m"), budget("a", "default", "2m")]),
            "duplicate RetryBudget `a`",
        ),
        (
            "range.yaml",
            budget("a", "default", "1m").replace("base: 1s", "base: 2m"),
            "spec.backoff.max: must be >= spec.backoff.base",
        ),
        (
            "ill-typed.yaml",
            budget("a", "default", "1m").replace("maxAttempts: 5", "maxAttempts: x"),
            "ill-typed.yaml (document 0, line 5): spec.maxAttempts: must be a whole number from 0 to 4294967295, not a text",
        ),
        (
            "missing.yaml",
            budget("a", "default", "1m").replace("  maxAttempts: 5\n", ""),
            "spec.maxAttempts: is required",
        ),
        (
            "secret-as-text.yaml",
            endpoint("hooks", "default", "missing", "10s").replace(&format!("[{{value: {SECRET}}}]"), &format!("[{SECRET}]")),
            "spec.secrets[0]: must be a mapping with `value` or `valueFrom`, not a text",
        ),
    ];
    for (name, yaml, expected) in cases {
        let case = tempfile::tempdir().unwrap();
        let path = case.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        let (code, out) = run(&path);
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(expected) && out.contains(name), "{name}: expected `{expected}` in {out}");
        assert!(!out.contains("whsec_") && !out.contains("expected u32"), "{name}: {out}");
    }
}

#[tokio::test]
async fn a_watched_directory_is_followed_and_a_bad_edit_keeps_the_last_good_state() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("budget.yaml"), budget("standard", "default", "1m")).unwrap();
    let mut config = db.config();
    config.controller.resources_dir = Some(dir.path().to_owned());
    // A long resync: following the files must come from the watcher.
    config.controller.resync = Duration::from_secs(3600);
    config.controller.debounce = Duration::from_millis(100);
    let app = spawn_app_with(config).await;
    let within = Duration::from_secs(10);

    eventually(within, "initial apply", || async {
        resource(&app, "RetryBudget", "default", "standard").await.is_some()
    })
    .await;

    std::fs::write(dir.path().join("endpoint.yaml"), endpoint("hooks", "default", "standard", "10s")).unwrap();
    eventually(within, "added file applied", || async {
        resource(&app, "Endpoint", "default", "hooks").await.is_some()
    })
    .await;

    std::fs::write(dir.path().join("endpoint.yaml"), endpoint("hooks", "default", "standard", "30s")).unwrap();
    eventually(within, "edited file applied", || async {
        resource(&app, "Endpoint", "default", "hooks").await.is_some_and(|r| r["spec"]["timeout"] == "30s")
    })
    .await;

    // An invalid edit: rejected whole, the last good state stays, the error is visible.
    std::fs::write(dir.path().join("endpoint.yaml"), endpoint("hooks", "default", "standard", "forever")).unwrap();
    eventually(within, "error in /readyz", || async {
        let ready: Value = app.client.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
        ready["controller"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("endpoint.yaml") && e.contains("spec.timeout"))
    })
    .await;
    eventually(within, "error in status", || async {
        resource(&app, "Endpoint", "default", "hooks").await.is_some_and(|r| {
            let synced = r["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Synced").cloned();
            synced.is_some_and(|c| c["status"] == "False" && c["reason"] == "InvalidChange")
        })
    })
    .await;
    assert_eq!(resource(&app, "Endpoint", "default", "hooks").await.unwrap()["spec"]["timeout"], "30s");

    // Deleting the file prunes the resource (once the directory is valid again).
    std::fs::remove_file(dir.path().join("endpoint.yaml")).unwrap();
    eventually(within, "deleted file pruned", || async {
        resource(&app, "Endpoint", "default", "hooks").await.is_none()
    })
    .await;
    let ready: Value = app.client.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert!(ready["controller"]["lastError"].is_null(), "{ready}");
    assert_eq!(ready["controller"]["leader"], true);
}

#[tokio::test]
async fn status_reports_a_reference_deleted_after_apply() {
    let db = TestDb::sqlite();
    let mut config = db.config();
    config.controller.resync = Duration::from_millis(200);
    let app = spawn_app_with(config).await;
    apply(
        &app,
        &app.admin,
        &docs(&[budget("standard", "default", "1m"), endpoint("hooks", "default", "standard", "10s")]),
        "",
    )
    .await;
    let ready = |reason: &'static str| {
        let app = &app;
        async move {
            resource(app, "Endpoint", "default", "hooks").await.is_some_and(|r| {
                r["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["reason"] == reason))
                    && r["status"]["observedGeneration"] == 1
            })
        }
    };
    eventually(Duration::from_secs(10), "Ready", || ready("Valid")).await;
    let deleted = app
        .client
        .delete(app.url("/v1/resources/RetryBudget/default/standard"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    eventually(Duration::from_secs(10), "ReferenceNotFound", || ready("ReferenceNotFound")).await;
}

#[tokio::test]
async fn exactly_one_of_two_processes_leads_and_leadership_moves_when_it_dies() {
    let Some(db) = TestDb::postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let resources = dir.path().join("resources");
    std::fs::create_dir(&resources).unwrap();
    std::fs::write(resources.join("budget.yaml"), budget("standard", "default", "1m")).unwrap();
    let config = dir.path().join("hookwarden.yaml");
    std::fs::write(&config, "controller: {leaderRetry: 200ms, resync: 300ms}\n").unwrap();
    let args = ["--config", config.to_str().unwrap(), "--resources", resources.to_str().unwrap()];
    let first = Process::start(&db, &args);
    let second = Process::start(&db, &args);
    let client = reqwest::Client::new();
    let leader = |base: String| {
        let client = client.clone();
        async move {
            let ready: Value = client.get(format!("{base}/readyz")).send().await.unwrap().json().await.unwrap();
            ready["controller"]["leader"].as_bool().unwrap()
        }
    };
    eventually(Duration::from_secs(10), "a leader", || async {
        leader(first.base.clone()).await || leader(second.base.clone()).await
    })
    .await;
    // Over several resyncs, never two leaders and always one.
    for _ in 0..10 {
        let (a, b) = (leader(first.base.clone()).await, leader(second.base.clone()).await);
        assert!(a ^ b, "exactly one leader: first={a} second={b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dead, survivor) = if leader(first.base.clone()).await { (first, second) } else { (second, first) };
    dead.kill();
    eventually(Duration::from_secs(10), "the survivor leads", || leader(survivor.base.clone())).await;
    survivor.kill();
}
