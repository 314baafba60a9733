//! Transformations: an Endpoint's `spec.transform`, a CEL expression over `event` and
//! `endpoint` whose result, a map or a list, is the body sent instead of the standard
//! `{type, timestamp, data}` envelope (see [`super::signing::body`]).
//!
//! Invariants:
//! - a transform is compiled and cost-checked like every CEL program
//!   ([`expr::compile`], within `cel.*`), and type-checked, at apply: it names only
//!   `event` and `endpoint` and only fields they have, and its syntax does not say it
//!   gives something other than a map or a list (`'text: ' + event.type` is refused);
//! - the body is the canonical JSON of the result: keys sorted (by code point), no
//!   whitespace, integers exact (also beyond 2^53, where RFC 8785 would round them),
//!   doubles in their shortest exact form. The same event and endpoint give the same
//!   bytes, and those bytes are the ones signed and sent;
//! - a result that is not a map or a list, or has no JSON form (a map key that is not a
//!   string, a NaN), is an error, and so is an evaluation that fails or passes its budget
//!   (`cel.maxCost`, `cel.maxCpuTime`). The same input gives the same error, so the
//!   delivery fails at once, without retries.
//!
//! Pure: no I/O. Rendering is CPU-bound for as long as the budget allows: dispatch runs it
//! on an evaluation thread.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::policy::expr::{self, CompiledExpr, Limits};
use crate::policy::meter::Budget;
use crate::resources::validate::TRANSFORM_VARIABLES;

/// The fields of the `event` variable (as fan-out and the policy gate bind it).
const EVENT_FIELDS: &[&str] = &["id", "source", "type", "subject", "time", "data"];
/// The fields of the `endpoint` variable ([`endpoint_json`]).
const ENDPOINT_FIELDS: &[&str] = &["name", "namespace", "labels"];

/// A compiled `spec.transform`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Transform {
    program: CompiledExpr,
}

impl Transform {
    /// Compiles `source` within `limits`; the error says what is wrong (the caller names
    /// the field).
    pub fn compile(source: &str, limits: &Limits) -> Result<Transform, String> {
        let program = expr::compile(source, TRANSFORM_VARIABLES, limits)?;
        if let Some((variable, field)) =
            program.unknown_field(&[("event", EVENT_FIELDS), ("endpoint", ENDPOINT_FIELDS)])
        {
            let fields = if variable == "event" { EVENT_FIELDS } else { ENDPOINT_FIELDS };
            return Err(format!(
                "reads `{variable}.{field}`, but `{variable}` has no field `{field}`; its fields are {}",
                fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(kind) = program.scalar_result() {
            return Err(format!(
                "gives {kind}; a transform must give a map (sent as a JSON object) or a list (a JSON array)"
            ));
        }
        Ok(Transform { program })
    }

    pub fn source(&self) -> &str {
        self.program.source()
    }

    /// The body for `event` (the `event` variable of CEL, see
    /// [`crate::catalog::EventView::to_json`]) sent to `endpoint` ([`endpoint_json`]):
    /// canonical JSON text, or why there is none.
    pub fn render(&self, event: &Value, endpoint: &Value, budget: Budget) -> Result<String, String> {
        let value = expr::evaluate(&self.program, &[("event", event), ("endpoint", endpoint)], budget)?;
        if !matches!(value, cel::Value::Map(_) | cel::Value::List(_)) {
            return Err(format!(
                "gave {}; a transform must give a map (sent as a JSON object) or a list (a JSON array)",
                expr::describe(&value)
            ));
        }
        let json = to_json(&value, &mut String::new())?;
        Ok(serde_json::to_string(&json).expect("JSON values always serialize"))
    }
}

/// The `endpoint` variable of a transform: the same fields AgentRules see.
pub fn endpoint_json(namespace: &str, name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({ "name": name, "namespace": namespace, "labels": labels })
}

/// `value` as JSON; `path` is where it is in the result (`.items[2]`), for errors.
///
/// Bytes are written as standard base64, timestamps as RFC 3339 in UTC and durations as
/// seconds with an `s` (`"1.5s"`), as CEL's JSON mapping of protobuf does.
fn to_json(value: &cel::Value, path: &mut String) -> Result<Value, String> {
    let at = |path: &str| if path.is_empty() { "the result".to_owned() } else { format!("`{path}` of the result") };
    Ok(match value {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Int(i) => Value::from(*i),
        cel::Value::UInt(u) => Value::from(*u),
        cel::Value::Float(f) => match serde_json::Number::from_f64(*f) {
            Some(n) => Value::Number(n),
            None => return Err(format!("{} is the double {f}, which JSON cannot hold", at(path))),
        },
        cel::Value::String(s) => Value::String(s.to_string()),
        cel::Value::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice())),
        cel::Value::Timestamp(t) => {
            Value::String(t.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        }
        cel::Value::Duration(d) => Value::String(duration_text(*d)),
        cel::Value::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(to_json(item, path)?);
                path.truncate(len);
            }
            Value::Array(out)
        }
        cel::Value::Map(map) => {
            let mut entries = Vec::with_capacity(map.map.len());
            for (key, item) in map.map.iter() {
                let cel::objects::Key::String(key) = key else {
                    return Err(format!(
                        "{} has the key {key}, which is not a string: JSON object keys are strings (write `string(…)` or a quoted key)",
                        at(path)
                    ));
                };
                entries.push((key, item));
            }
            // Inserted in order, so that the keys are sorted whatever map serde_json keeps.
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let mut out = Map::new();
            for (key, item) in entries {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                out.insert(key.to_string(), to_json(item, path)?);
                path.truncate(len);
            }
            Value::Object(out)
        }
        other => return Err(format!("{} is {}, which has no JSON form", at(path), expr::describe(other))),
    })
}

/// A duration as protobuf's JSON writes one: seconds, a fraction only when needed, `s`.
fn duration_text(d: chrono::Duration) -> String {
    let sign = if d < chrono::Duration::zero() { "-" } else { "" };
    let d = d.abs();
    let (seconds, nanos) = (d.num_seconds(), d.subsec_nanos());
    if nanos == 0 {
        return format!("{sign}{seconds}s");
    }
    let fraction = format!("{nanos:09}");
    format!("{sign}{seconds}.{}s", fraction.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Value {
        json!({"id": "evt_1", "source": "shop", "type": "approval.requested", "subject": null, "time": null,
               "data": {"reason": "refund of 120 EUR", "link": "https://console.example.com/a/1", "amount": 12000,
                        "big": 18_446_744_073_709_551_615u64, "rate": 2.0, "tags": ["a", "b"]}})
    }

    fn endpoint() -> Value {
        endpoint_json("payments", "chat", &BTreeMap::from([("team".to_owned(), "billing".to_owned())]))
    }

    fn render(source: &str) -> Result<String, String> {
        Transform::compile(source, &Limits::default()).unwrap().render(&event(), &endpoint(), Budget::default())
    }

    #[test]
    fn the_body_is_the_canonical_json_of_what_the_expression_built() {
        let body = render(r#"{"text": "Approval needed: " + event.data.reason + " — " + event.data.link, "channel": endpoint.labels.team}"#)
            .unwrap();
        assert_eq!(
            body,
            r#"{"channel":"billing","text":"Approval needed: refund of 120 EUR — https://console.example.com/a/1"}"#
        );
        let body = render(
            r#"{"severity": event.data.amount > 10000 ? "critical" : "warning", "dedup_key": endpoint.name + "/" + event.id,
                "summary": {"big": event.data.big, "rate": event.data.rate, "tags": event.data.tags, "none": event.subject}}"#,
        )
        .unwrap();
        assert_eq!(
            body,
            r#"{"dedup_key":"chat/evt_1","severity":"critical","summary":{"big":18446744073709551615,"none":null,"rate":2.0,"tags":["a","b"]}}"#,
            "keys sorted, integers exact"
        );
        assert_eq!(render("event.data.tags.map(t, {'tag': t})").unwrap(), r#"[{"tag":"a"},{"tag":"b"}]"#);
    }

    #[test]
    fn the_same_input_gives_the_same_bytes() {
        let source = "{'a': 1, 'b': event.data, 'c': [event.type, endpoint.namespace], 'd': endpoint.labels}";
        let first = render(source).unwrap();
        for _ in 0..20 {
            assert_eq!(render(source).unwrap(), first);
        }
    }

    #[test]
    fn values_without_a_json_form_of_their_own_take_cels_json_mapping() {
        let body = render(
            "{'b': b'hi', 't': timestamp('2026-11-28T10:00:00+01:00'), 'd': duration('90s'), 'f': duration('1500ms')}",
        )
        .unwrap();
        assert_eq!(body, r#"{"b":"aGk=","d":"90s","f":"1.5s","t":"2026-11-28T09:00:00Z"}"#);
    }

    #[test]
    fn a_result_that_is_no_json_object_or_array_is_an_error_naming_it() {
        let err = render("event.data.reason").unwrap_err();
        assert!(err.starts_with("gave a string; a transform must give a map"), "{err}");
        let err = render("event.data.amount").unwrap_err();
        assert!(err.starts_with("gave the int 12000"), "{err}");
        let err = render("{'n': {'deep': [1, {1: 'x'}]}}").unwrap_err();
        assert!(err.contains("`.n.deep[1]` of the result has the key 1, which is not a string"), "{err}");
        let err = render("{'x': double(event.data.amount) / 0.0}").unwrap_err();
        assert!(err.contains("`.x` of the result is the double inf, which JSON cannot hold"), "{err}");
    }

    #[test]
    fn an_evaluation_error_is_cels_own() {
        let err = render("{'text': event.data.missing}").unwrap_err();
        assert!(err.contains("missing"), "{err}");
        let err = Transform::compile("event.data.tags.map(t, event.data.tags.map(u, [t, u]))", &Limits::default())
            .unwrap_err();
        assert!(err.contains("inside another comprehension"), "{err}");
    }

    #[test]
    fn an_expression_over_its_budget_stops_with_the_budget_error() {
        let program = Transform::compile("[event.data.tags].map(x, x + x + x + x)", &Limits::default()).unwrap();
        let budget = Budget { max_cost: 2, ..Budget::default() };
        let err = program.render(&event(), &endpoint(), budget).unwrap_err();
        assert!(err.contains("cel.maxCost"), "{err}");
    }

    #[test]
    fn types_and_fields_are_checked_when_compiled() {
        let refused = [
            ("'Approval needed: ' + event.data.reason", "gives a string;"),
            ("event.data.amount > 10", "gives a bool;"),
            ("event.data.tags.all(t, t != '')", "gives a bool;"),
            ("size(event.data.tags)", "gives a number;"),
            ("event.type == 'a' ? {'a': 1} : 'none'", "gives a string;"),
            ("42", "gives an int;"),
            ("{'text': event.dta.reason}", "reads `event.dta`, but `event` has no field `dta`"),
            ("{'who': endpoint.owner}", "reads `endpoint.owner`, but `endpoint` has no field `owner`"),
            ("{'x': agent.name}", "uses unknown variable `agent`"),
        ];
        for (source, expected) in refused {
            let err = Transform::compile(source, &Limits::default()).unwrap_err();
            assert!(err.contains(expected), "{source}: {err}");
        }
        let accepted = [
            "event.data",
            "event.data.tags + ['c']",
            "event.type == 'a' ? {'a': 1} : [event.data]",
            "event.data.tags.filter(t, t != 'a')",
            "event.data.tags.map(event, {'tag': event.size()})",
        ];
        for source in accepted {
            Transform::compile(source, &Limits::default()).unwrap_or_else(|e| panic!("{source}: {e}"));
        }
    }
}
