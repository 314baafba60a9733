//! `openapi.yaml` and the router describe the same routes, no more, no fewer.

use std::collections::BTreeSet;

use serde_json::Value;

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).expect("openapi.yaml");
    yaml_serde::from_str(&text).expect("openapi.yaml is valid YAML")
}

#[test]
fn the_spec_and_the_router_serve_the_same_routes() {
    let spec = spec();
    let methods = ["get", "post", "put", "patch", "delete", "head", "options"];
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .filter(|k| methods.contains(&k.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> =
        hookwarden::api::route_table().into_iter().map(|(m, p)| (m.to_string(), p.to_owned())).collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not in openapi.yaml: {undocumented:?}; in openapi.yaml but not served: {unserved:?}"
    );
}

#[test]
fn the_spec_is_openapi_3_1_and_every_operation_documents_its_responses() {
    let spec = spec();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if !operation.is_object() || operation.get("responses").is_none() {
                continue;
            }
            assert!(operation["operationId"].is_string(), "{method} {path} has no operationId");
            let responses = operation["responses"].as_object().unwrap();
            assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path} documents no success");
            let secured =
                operation.get("security").map(|s| s.as_array().is_some_and(|a| !a.is_empty())).unwrap_or(true);
            if secured {
                assert!(responses.contains_key("401"), "{method} {path} is secured but documents no 401");
            }
        }
    }
}

/// `docs/hookwarden.schema.json` (what editors load) is what `hookwarden schema` prints.
#[test]
fn the_published_resource_schema_is_current() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/hookwarden.schema.json")).unwrap();
    let published: Value = serde_json::from_str(&text).unwrap();
    assert!(
        published == hookwarden::resources::json_schema(),
        "docs/hookwarden.schema.json is stale: run `cargo run -- schema > docs/hookwarden.schema.json`"
    );
}
