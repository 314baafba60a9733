//! Text no database can hold (a NUL character, or bytes that are not UTF-8) is bad input
//! on every route, answered alike on SQLite and PostgreSQL: 400 naming the parameter or
//! the field, 401 for a token whose claims hold one, 422 with its line for resource YAML.
//! Never a 503 "database unavailable" (PostgreSQL refuses a NUL in `text`), and never a
//! store call that would see it.
//!
//! Every route of the router is walked, so a new route is covered without a new test;
//! each route with a JSON body must be listed in [`body_cases`] or [`NO_BODY`].

mod common;

use common::{spawn_app, token, TestApp, TestDb};
use hookwarden::api::route_table;
use hookwarden::auth::Role;
use reqwest::Method;
use serde_json::Value;

/// A value for each path parameter of the router's templates.
fn sample(param: &str) -> &'static str {
    match param {
        "kind" => "Endpoint",
        "namespace" => "default",
        "name" => "x",
        "id" => "x1",
        other => panic!("no sample value for the path parameter `{other}`: add one"),
    }
}

/// `template` with every parameter set to its sample, except `bad`, set to `value`.
fn fill(template: &str, bad: Option<&str>, value: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(param) if Some(param) == bad => value.to_owned(),
            Some(param) => sample(param).to_owned(),
            None => segment.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn params(template: &str) -> Vec<&str> {
    template.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect()
}

/// POST routes that take no body.
const NO_BODY: &[&str] = &["/v1/deliveries/{id}/replay", "/v1/endpoints/{namespace}/{name}/enable"];

/// For each POST route with a body: `(content type, a valid body, bodies with a NUL and
/// the path the answer must name)`.
fn body_cases(template: &str) -> (&'static str, &'static str, Vec<(&'static str, &'static str)>) {
    let event = r#"{"source": "shop", "type": "order.created", "data": {"k": 1}}"#;
    match template {
        "/v1/events" => (
            "application/json",
            event,
            vec![
                (r#"{"source": "sh\u0000op", "type": "order.created", "data": {}}"#, "source"),
                (r#"{"source": "shop", "type": "order.created", "data": {"k": ["a", "b\u0000"]}}"#, "data.k[1]"),
                (r#"{"source": "shop", "type": "order.created", "data": {"k\u0000": 1}}"#, r#"data["k\u0000"]"#),
            ],
        ),
        "/v1/events/batch" => (
            "application/json",
            r#"[{"source": "shop", "type": "order.created", "data": {}}]"#,
            vec![(
                r#"[{"source": "s", "type": "t", "data": {}}, {"source": "s", "type": "t\u0000", "data": {}}]"#,
                "[1].type",
            )],
        ),
        "/v1/deliveries/replay" => (
            "application/json",
            r#"{"namespace": "default"}"#,
            vec![(r#"{"namespace": "default", "endpoint": "a\u0000b"}"#, "endpoint")],
        ),
        "/v1/approvals/{id}/grant" | "/v1/approvals/{id}/deny" => {
            ("application/json", r#"{"reason": "ok"}"#, vec![(r#"{"reason": "fine\u0000 by me"}"#, "reason")])
        }
        "/v1/apply" => (
            "application/json",
            r#"{"files": []}"#,
            vec![
                (r#"{"files": [{"name": "a.yaml", "content": "kind: \u0000"}]}"#, "files[0].content"),
                (r#"{"files": [{"name": "a\u0000.yaml", "content": ""}]}"#, "files[0].name"),
            ],
        ),
        other => panic!("POST {other} takes a body: list its cases here, or the route in NO_BODY"),
    }
}

async fn send(
    app: &TestApp,
    method: &Method,
    path: &str,
    token: &str,
    body: Option<(&str, &str)>,
) -> reqwest::Response {
    let mut request = app.client.request(method.clone(), app.url(path)).bearer_auth(token);
    if let Some((content_type, body)) = body {
        request = request.header("content-type", content_type).body(body.to_owned());
    }
    request.send().await.expect("request sent")
}

/// The answer must be `status` with `code`, naming `path` first when given.
async fn refused(response: reqwest::Response, status: u16, code: &str, path: Option<&str>, what: &str) -> Value {
    let actual = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "{what}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    if let Some(path) = path {
        assert_eq!(body["error"]["details"][0]["path"], path, "{what}: {body}");
    }
    body
}

/// The body a route is sent with when its body is not what is tested.
fn valid_body(method: &Method, template: &str) -> Option<(&'static str, &'static str)> {
    (*method == Method::POST && !NO_BODY.contains(&template)).then(|| {
        let (content_type, body, _) = body_cases(template);
        (content_type, body)
    })
}

async fn no_route_stores_or_answers_text_it_cannot_hold(db: TestDb) {
    let app = spawn_app(&db).await;
    let admin = &app.admin;
    let nul_subject = token("mallory\0admin", &[Role::Admin], &["*"]);
    let nul_namespace = token("mallory", &[Role::Admin], &["default", "pay\0ments"]);
    for (method, template) in route_table() {
        let what = |input: &str| format!("{method} {template} with {input}");
        let body = valid_body(&method, template);

        // A NUL in each path parameter, then bytes that are not UTF-8.
        for param in params(template) {
            let path = fill(template, Some(param), "a%00b");
            let response = send(&app, &method, &path, admin, body).await;
            refused(response, 400, "validation_failed", Some(param), &what(&format!("a NUL in {{{param}}}"))).await;
            let path = fill(template, Some(param), "a%FFb");
            let response = send(&app, &method, &path, admin, body).await;
            refused(response, 400, "validation_failed", Some(param), &what(&format!("%FF in {{{param}}}"))).await;
        }

        // A NUL in a query parameter, whether the route reads it or not.
        let path = fill(template, None, "");
        for query in ["namespace=a%00b", "limit=1&source=%00", "type=%FF"] {
            let name = query.rsplit('&').next().unwrap().split('=').next().unwrap();
            let response = send(&app, &method, &format!("{path}?{query}"), admin, body).await;
            refused(response, 400, "validation_failed", Some(name), &what(&format!("?{query}"))).await;
        }

        // A NUL in a string of the body.
        if method == Method::POST && !NO_BODY.contains(&template) {
            let (content_type, _, cases) = body_cases(template);
            for (bad, field) in cases {
                let response = send(&app, &method, &path, admin, Some((content_type, bad))).await;
                refused(response, 400, "validation_failed", Some(field), &what(&format!("the body {bad}"))).await;
            }
        }

        // A token whose subject or namespaces hold a NUL.
        if template.starts_with("/v1/") {
            for (token, claim) in [(&nul_subject, "sub"), (&nul_namespace, "namespaces")] {
                let response = send(&app, &method, &path, token, body).await;
                let answer =
                    refused(response, 401, "unauthenticated", None, &what(&format!("a NUL in `{claim}`"))).await;
                let message = answer["error"]["message"].as_str().unwrap();
                assert!(message.contains(&format!("claim `{claim}`")), "{}: {answer}", what(claim));
            }
        }
    }

    // Resource YAML: a NUL in any text is refused with its line, and nothing is written.
    let yaml = "apiVersion: hookwarden/v1\nkind: Filter\nmetadata: {name: f, namespace: default}\nspec:\n  eventTypes: [\"a\"]\n  expression: \"event.type == 'a\\0'\"\n";
    let response = send(&app, &Method::POST, "/v1/apply", admin, Some(("application/yaml", yaml))).await;
    let answer = refused(response, 422, "invalid_resources", None, "YAML with a NUL").await;
    assert_eq!(answer["errors"][0]["line"], 6, "{answer}");
    assert!(answer["errors"][0]["message"].as_str().unwrap().contains("NUL"), "{answer}");

    // Nothing of it reached the store, and the same text without the NUL works.
    let events = common::json_with_status(app.get("/v1/events", admin).await, 200).await;
    assert_eq!(events["items"].as_array().unwrap().len(), 0, "{events}");
    let filters = common::json_with_status(app.get("/v1/resources/Filter", admin).await, 200).await;
    assert_eq!(filters["items"].as_array().unwrap().len(), 0, "{filters}");
    let event = r#"{"source": "shop", "type": "order.created", "data": {"note": "caf\u00e9 \\u0000 is text"}}"#;
    common::json_with_status(app.post_json("/v1/events", admin, event).await, 202).await;
    common::json_with_status(app.get("/v1/events?source=shop", admin).await, 200).await;
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

on_both_databases!(no_route_stores_or_answers_text_it_cannot_hold);
