//! Approvals from the approver's side: what a request shows (the action itself, bounded),
//! listings across the namespaces a token may see (and never others), the CLI, and the
//! audit record every final delivery state gets, approver denials and expiries included.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::receiver::{Script, TestReceiver, SECRET};
use common::{eventually, json_with_status, spawn_app_with, token, TestApp, TestDb};
use hookwarden::auth::Role;
use serde_json::{json, Value};

fn config_for(db: &TestDb) -> hookwarden::config::Config {
    let mut config = db.config();
    config.allow_private_urls = true;
    config.delivery.poll_interval = Duration::from_millis(50);
    config
}

async fn answering_200() -> TestReceiver {
    TestReceiver::start(Arc::new(|_: &str, _: usize| (200u16, None, Duration::ZERO)) as Script).await
}

/// An agent endpoint `refund-agent` in `namespace` and a rule capping refunds at 200.00 a
/// day that holds (for two approvers) what goes over.
fn capped_agent(namespace: &str, url: &str) -> String {
    format!(
        "apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: refund-agent, namespace: {namespace}, labels: {{role: agent}}}}\nspec:\n  url: {url}\n  agent: true\n  secrets: [{{value: {SECRET}}}]\n---\napiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: cap, namespace: {namespace}}}\nspec:\n  selector: {{matchLabels: {{role: agent}}}}\n  match: \"event.type == 'refund.requested'\"\n  decision: allow\n  spend: {{amount: \"int(event.data.amount_cents)\", currency: USD, limit: 20000, window: 24h, overLimit: hold}}\n  approval: {{role: approver, quorum: 2, expiresAfter: 4h, onExpiry: deny}}\n  reasonExpression: \"'refund of ' + string(event.data.amount_cents) + ' cents'\"\n"
    )
}

async fn ingest(app: &TestApp, event: Value) -> String {
    let body = json_with_status(app.post_json("/v1/events", &app.admin, event.to_string()).await, 202).await;
    body["id"].as_str().unwrap().to_owned()
}

/// Waits for the approval request opened for `event` and returns its id.
async fn request_for(app: &TestApp, namespace: &str, event: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page: Value =
            app.get(&format!("/v1/approvals?namespace={namespace}"), &app.admin).await.json().await.unwrap();
        let found = page["items"].as_array().into_iter().flatten().find(|a| a["event_id"] == event);
        if let Some(request) = found {
            return request["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no approval request for {event}: {page}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn vote(app: &TestApp, token: &str, id: &str, verb: &str, reason: &str) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(&format!("/v1/approvals/{id}/{verb}")))
        .bearer_auth(token)
        .json(&json!({ "reason": reason }))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// Runs the CLI against `app` with `token`: `(success, stdout + stderr)`.
fn cli(app: &TestApp, token: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hookwarden"))
            .args(args)
            .env("HOOKWARDEN_SERVER", &app.base)
            .env("HOOKWARDEN_TOKEN", token)
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

async fn an_approver_sees_the_action_it_is_asked_to_approve(db: TestDb) {
    let receiver = answering_200().await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(&capped_agent("default", &receiver.url("/agent"))).await;
    // 50.00 goes out and counts in the window; 250.00 more would pass the 200.00 cap.
    let small = json!({"source": "shop", "type": "refund.requested", "data": {"amount_cents": 5000}});
    ingest(&app, small).await;
    eventually(Duration::from_secs(10), "the first refund sent", || async { receiver.on("/agent").len() == 1 }).await;
    let big = json!({"source": "shop", "type": "refund.requested", "subject": "order-77",
        "data": {"amount_cents": 25000, "order": "o-77"}});
    let event = ingest(&app, big).await;
    let id = request_for(&app, "default", &event).await;

    // An approver holds no `viewer`: the event itself is closed to it, its request is not.
    let alice = token("alice", &[Role::Approver], &["default"]);
    let bob = token("bob", &[Role::Approver], &["default"]);
    assert_eq!(app.get(&format!("/v1/events/{event}"), &alice).await.status(), 403);
    let shown = json_with_status(app.get(&format!("/v1/approvals/{id}"), &alice).await, 200).await;
    let e = &shown["event"];
    assert_eq!(
        (e["id"].as_str(), e["type"].as_str(), e["source"].as_str()),
        (Some(event.as_str()), Some("refund.requested"), Some("shop")),
        "{shown}"
    );
    assert_eq!(e["subject"], "order-77");
    assert_eq!(e["data"], json!({"amount_cents": 25000, "order": "o-77"}));
    assert_eq!((e["data_truncated"].as_bool(), e["data_note"].is_null()), (Some(false), true), "{shown}");
    assert_eq!(e["data_bytes"], r#"{"amount_cents":25000,"order":"o-77"}"#.len());
    assert_eq!(shown["endpoint"], "refund-agent");
    assert_eq!(shown["endpoint_detail"]["url"], receiver.url("/agent"));
    assert_eq!(shown["endpoint_detail"]["labels"], json!({"role": "agent"}));
    assert_eq!(shown["rule"], "cap");
    let reason = shown["reason"].as_str().unwrap();
    assert!(reason.starts_with("refund of 25000 cents") && reason.contains("over the spend limit"), "{reason}");
    assert_eq!(
        shown["spend"],
        json!([{"rule": "cap", "key": "refund-agent", "currency": "USD", "amount": 25000, "window_total": 5000,
            "limit": 20000, "remaining": 15000, "shadow": false}])
    );
    assert_eq!(shown["decision"]["outcome"], "hold");
    assert_eq!(shown["decision"]["rules"][0]["rule"], "cap");
    assert_eq!(shown["progress"], json!({"grants": 0, "denials": 0, "quorum": 2, "needed": 2}));
    assert!(shown["expires_at"].is_string() && shown["votes"] == json!([]), "{shown}");

    assert_eq!(vote(&app, &bob, &id, "grant", "matches the returned items").await.0, 200);
    let shown = json_with_status(app.get(&format!("/v1/approvals/{id}"), &alice).await, 200).await;
    assert_eq!(shown["progress"], json!({"grants": 1, "denials": 0, "quorum": 2, "needed": 1}));
    let votes = shown["votes"].as_array().unwrap();
    assert_eq!((votes.len(), &votes[0]["voter"], &votes[0]["vote"]), (1, &json!("bob"), &json!("grant")));
    assert_eq!(votes[0]["reason"], "matches the returned items");

    // The CLI prints the same in a readable form; `-o json` keeps the JSON.
    let (ok, out) = cli(&app, &alice, &["approvals", "show", &id]);
    assert!(ok, "{out}");
    assert!(serde_json::from_str::<Value>(&out).is_err(), "not raw JSON: {out}");
    for expected in [
        id.as_str(),
        "refund.requested",
        "order-77",
        "\"amount_cents\": 25000",
        "refund-agent",
        "cap",
        "refund of 25000 cents",
        "1 of 2 grants",
        "bob",
        "matches the returned items",
        "25000",
        "5000",
        "20000",
        "USD",
        "on expiry: deny",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from:\n{out}");
    }
    let (ok, out) = cli(&app, &alice, &["approvals", "show", &id, "-o", "json"]);
    assert!(ok, "{out}");
    let parsed: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(parsed["event"]["subject"], "order-77");

    // Large data is cut, with a note saying so and how large it was.
    let blob = "x".repeat(100_000);
    let huge = json!({"source": "shop", "type": "refund.requested", "data": {"amount_cents": 30000, "blob": blob}});
    let size = json!({"amount_cents": 30000, "blob": blob}).to_string().len();
    let event = ingest(&app, huge).await;
    let id = request_for(&app, "default", &event).await;
    let shown = json_with_status(app.get(&format!("/v1/approvals/{id}"), &alice).await, 200).await;
    let e = &shown["event"];
    assert_eq!((e["data"].is_null(), e["data_truncated"].as_bool()), (true, Some(true)), "{}", e["data_note"]);
    assert_eq!(e["data_bytes"], size);
    let preview = e["data_preview"].as_str().unwrap();
    assert!(preview.len() <= 64 * 1024 && preview.len() > 60 * 1024, "{}", preview.len());
    assert!(preview.starts_with(r#"{"amount_cents":30000,"blob":"xxx"#), "{}", &preview[..40]);
    let note = e["data_note"].as_str().unwrap();
    assert!(note.contains(&size.to_string()) && note.contains("cut"), "{note}");
    let (ok, out) = cli(&app, &alice, &["approvals", "show", &id]);
    assert!(ok && out.contains(note), "{}", &out[..out.len().min(2000)]);
}

async fn approval_listings_span_the_namespaces_a_token_may_see(db: TestDb) {
    let receiver = answering_200().await;
    let app = spawn_app_with(config_for(&db)).await;
    for namespace in ["a", "b"] {
        app.apply_yaml(&capped_agent(namespace, &receiver.url(&format!("/{namespace}")))).await;
    }
    let mut ids = BTreeMap::new();
    for namespace in ["a", "b"] {
        let refund = json!({"source": "shop", "type": "refund.requested", "namespace": namespace, "data": {"amount_cents": 90000}});
        let event = ingest(&app, refund).await;
        ids.insert(namespace, request_for(&app, namespace, &event).await);
    }
    let (in_a, in_b) = (ids["a"].clone(), ids["b"].clone());
    let listed = |token: String, query: &'static str| {
        let app = &app;
        async move {
            let page = json_with_status(app.get(&format!("/v1/approvals{query}"), &token).await, 200).await;
            let mut seen: Vec<String> = page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| format!("{}/{}", a["namespace"].as_str().unwrap(), a["id"].as_str().unwrap()))
                .collect();
            seen.sort();
            seen
        }
    };
    let (a, b) = (format!("a/{in_a}"), format!("b/{in_b}"));
    let only_a = token("ann", &[Role::Approver], &["a"]);
    assert_eq!(listed(only_a.clone(), "").await, vec![a.clone()], "every namespace of the token, no other");
    assert_eq!(listed(only_a.clone(), "?state=pending").await, vec![a.clone()]);
    assert_eq!(listed(token("abe", &[Role::Approver], &["a", "b"]), "").await, vec![a.clone(), b.clone()]);
    assert_eq!(listed(app.admin.clone(), "").await, vec![a.clone(), b.clone()], "`*` sees every namespace");
    assert_eq!(listed(app.admin.clone(), "?namespace=b").await, vec![b.clone()]);
    assert!(listed(token("cid", &[Role::Approver], &["c"]), "").await.is_empty());
    // Tenants stay apart: a token for `a` cannot list, read or vote on `b`'s requests.
    assert_eq!(app.get("/v1/approvals?namespace=b", &only_a).await.status(), 403);
    assert_eq!(app.get(&format!("/v1/approvals/{in_b}"), &only_a).await.status(), 404);
    assert_eq!(vote(&app, &only_a, &in_b, "grant", "looks fine").await.0, 404);
    assert_eq!(vote(&app, &only_a, &in_b, "deny", "looks wrong").await.0, 404);
    assert_eq!(app.get("/v1/approvals", &token("vic", &[Role::Viewer], &["*"])).await.status(), 403);
    assert_eq!(app.get(&format!("/v1/approvals/{in_a}"), &only_a).await.status(), 200);

    // The CLI: `-A` lists what the token may see, `-n` one namespace, `show` needs none.
    let (ok, out) = cli(&app, &only_a, &["approvals", "list", "-A"]);
    assert!(ok && out.contains(&in_a) && !out.contains(&in_b) && out.contains("NAMESPACE"), "{out}");
    let (ok, out) = cli(&app, &app.admin, &["approvals", "list", "--all-namespaces"]);
    assert!(ok && out.contains(&in_a) && out.contains(&in_b), "{out}");
    let (ok, out) = cli(&app, &app.admin, &["approvals", "list", "-n", "b"]);
    assert!(ok && out.contains(&in_b) && !out.contains(&in_a), "{out}");
    let (ok, out) = cli(&app, &only_a, &["approvals", "list", "-n", "b"]);
    assert!(!ok && out.contains("403"), "{out}");
    let (ok, out) = cli(&app, &only_a, &["approvals", "show", &in_a]);
    assert!(ok && out.contains(&in_a), "{out}");
    let (ok, out) = cli(&app, &only_a, &["approvals", "show", &in_b]);
    assert!(!ok && out.contains("404"), "{out}");
    let (ok, out) = cli(&app, &only_a, &["approvals", "show", &in_a, "-n", "a"]);
    assert!(!ok && out.contains("-n"), "show takes no namespace: {out}");
}

/// One endpoint per way a delivery can end, and the rules that send agent actions there.
fn every_ending(url: &str) -> String {
    let endpoint = |name: &str, types: &str, extra: &str| {
        format!("apiVersion: hookwarden/v1\nkind: Endpoint\nmetadata: {{name: {name}}}\nspec:\n  url: {url}/{name}\n  secrets: [{{value: {SECRET}}}]\n  eventTypes: [{types}]\n{extra}---\n")
    };
    let rule = |name: &str, matches: &str, decision: &str, extra: &str| {
        format!("apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {{name: {name}}}\nspec:\n  endpointRefs: [agent]\n  match: \"event.data.kind == '{matches}'\"\n  decision: {decision}\n{extra}---\n")
    };
    [
        "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: once}\nspec:\n  maxAttempts: 1\n  backoff: {base: 1s, max: 1s}\n---\n".to_owned(),
        endpoint("ok", "ok", ""),
        endpoint("bad", "bad", ""),
        endpoint("down", "down", "  retryBudgetRef: once\n"),
        endpoint("agent", "act", "  agent: true\n"),
        rule("no-deletes", "delete", "deny", "  reason: deletes are not for agents\n"),
        rule("refunds", "refund", "hold", "  approval: {quorum: 1, expiresAfter: 4h}\n"),
        rule("slow", "slow", "hold", "  approval: {quorum: 1, expiresAfter: 1s, onExpiry: deny}\n"),
        "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: the-rest}\nspec:\n  endpointRefs: [agent]\n  decision: allow\n".to_owned(),
    ]
    .concat()
}

async fn every_final_state_has_exactly_one_outcome_record(db: TestDb) {
    let receiver = TestReceiver::start(Arc::new(|path: &str, _: usize| {
        let status = match path {
            "/bad" => 400u16,
            "/down" => 503,
            _ => 200,
        };
        (status, None, Duration::ZERO)
    }) as Script)
    .await;
    let app = spawn_app_with(config_for(&db)).await;
    app.apply_yaml(&every_ending(&receiver.url(""))).await;
    let event = |kind: &str, data: Value| json!({"source": "s", "type": kind, "data": data});
    let mut expected = BTreeMap::new();
    for (what, endpoint, body, state) in [
        ("delivered", "ok", event("ok", json!({})), "delivered"),
        ("failed", "bad", event("bad", json!({})), "failed"),
        ("dead", "down", event("down", json!({})), "dead"),
        ("denied by the gate", "agent", event("act", json!({"kind": "delete"})), "denied"),
        ("denied by an approver", "agent", event("act", json!({"kind": "refund", "n": 1})), "denied"),
        ("granted, then delivered", "agent", event("act", json!({"kind": "refund", "n": 2})), "delivered"),
        ("denied by expiry", "agent", event("act", json!({"kind": "slow"})), "denied"),
    ] {
        expected.insert(ingest(&app, body).await, (what, endpoint, state));
    }
    let approver = token("alice", &[Role::Approver], &["default"]);
    for (event, (what, _, _)) in &expected {
        let verb = match *what {
            "denied by an approver" => "deny",
            "granted, then delivered" => "grant",
            _ => continue,
        };
        let id = request_for(&app, "default", event).await;
        assert_eq!(vote(&app, &approver, &id, verb, "checked by hand").await.0, 200, "{what}");
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let deliveries = loop {
        let mut deliveries = BTreeMap::new();
        for event in expected.keys() {
            let shown: Value = app.get(&format!("/v1/events/{event}"), &app.admin).await.json().await.unwrap();
            let d = &shown["deliveries"][0];
            deliveries
                .insert(event.clone(), (d["id"].as_str().unwrap().to_owned(), d["state"].as_str().unwrap().to_owned()));
        }
        if deliveries.values().all(|(_, s)| ["delivered", "failed", "dead", "denied"].contains(&s.as_str())) {
            break deliveries;
        }
        assert!(Instant::now() < deadline, "not every delivery ended: {deliveries:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };

    let page = json_with_status(app.get("/v1/audit?namespace=default&limit=1000", &app.admin).await, 200).await;
    let records = page["items"].as_array().unwrap();
    let outcomes = ["delivery.delivered", "delivery.failed", "delivery.dead", "delivery.denied"];
    for (event, (what, endpoint, state)) in &expected {
        let (delivery, actual) = &deliveries[event];
        assert_eq!(actual, state, "{what}");
        let subject = format!("delivery/{delivery}");
        let found: Vec<&Value> = records
            .iter()
            .filter(|r| r["subject"] == subject.as_str() && outcomes.contains(&r["action"].as_str().unwrap()))
            .collect();
        assert_eq!(found.len(), 1, "{what}: one outcome record, found {found:?}");
        assert_eq!(found[0]["action"], format!("delivery.{state}"), "{what}");
        assert_eq!(found[0]["data"]["endpoint"], *endpoint, "{what}");
        let error = found[0]["data"]["error"].as_str().unwrap_or("");
        match *what {
            "denied by the gate" => assert!(error.contains("deletes are not for agents"), "{error}"),
            "denied by an approver" => assert_eq!(error, "approval denied: checked by hand"),
            "denied by expiry" => assert!(error.starts_with("approval expired"), "{error}"),
            _ => {}
        }
    }
}

/// A delivery allowed once (its spend reserved), then held on its retry and denied by an
/// approver: the reservation goes back to the budget, as for every other denial.
async fn a_denied_hold_gives_back_the_spend_an_earlier_allow_reserved(db: TestDb) {
    let receiver =
        TestReceiver::start(
            Arc::new(|_: &str, n: usize| (if n == 0 { 503u16 } else { 200 }, None, Duration::ZERO)) as Script
        )
        .await;
    let app = spawn_app_with(config_for(&db)).await;
    let retry = "apiVersion: hookwarden/v1\nkind: RetryBudget\nmetadata: {name: later}\nspec:\n  maxAttempts: 5\n  backoff: {base: 1s, max: 1s, jitter: none}\n---\n";
    let agent = capped_agent("default", &receiver.url("/agent"))
        .replace("  agent: true\n", "  agent: true\n  retryBudgetRef: later\n");
    app.apply_yaml(&format!("{retry}{}", agent.replace("overLimit: hold", "overLimit: deny"))).await;
    let first = json!({"source": "shop", "type": "refund.requested", "data": {"amount_cents": 15000}});
    let first = ingest(&app, first).await;
    eventually(Duration::from_secs(10), "the first attempt (answered 503)", || async {
        receiver.on("/agent").len() == 1
    })
    .await;
    // From now on every refund needs a look; the retry of the first is held, 150.00 reserved.
    let check = "apiVersion: hookwarden/v1\nkind: AgentRule\nmetadata: {name: check}\nspec:\n  selector: {matchLabels: {role: agent}}\n  decision: hold\n  approval: {quorum: 1, expiresAfter: 4h}\n";
    app.apply_yaml(check).await;
    let held = request_for(&app, "default", &first).await;
    let approver = token("alice", &[Role::Approver], &["default"]);
    assert_eq!(vote(&app, &approver, &held, "deny", "not this one").await.0, 200);

    // 100.00 fits the 200.00 cap only if the 150.00 was given back: then it is held for a
    // look (with nothing counted in the window), else the cap would deny it.
    let second = json!({"source": "shop", "type": "refund.requested", "data": {"amount_cents": 10000}});
    let second = ingest(&app, second).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let shown: Value = app.get(&format!("/v1/events/{second}"), &app.admin).await.json().await.unwrap();
        let state = shown["deliveries"][0]["state"].as_str().unwrap_or("").to_owned();
        if state == "held" || state == "denied" {
            break (state, shown["deliveries"][0]["decision"]["reason"].clone());
        }
        assert!(Instant::now() < deadline, "the second refund was never decided");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(state.0, "held", "the denied hold kept its reservation: {}", state.1);
    let id = request_for(&app, "default", &second).await;
    let shown = json_with_status(app.get(&format!("/v1/approvals/{id}"), &approver).await, 200).await;
    assert_eq!(shown["spend"][0]["window_total"], 0, "{shown}");
    assert_eq!(receiver.on("/agent").len(), 1, "nothing more was sent");
}

on_both_databases!(
    an_approver_sees_the_action_it_is_asked_to_approve,
    approval_listings_span_the_namespaces_a_token_may_see,
    every_final_state_has_exactly_one_outcome_record,
    a_denied_hold_gives_back_the_spend_an_earlier_allow_reserved,
);
