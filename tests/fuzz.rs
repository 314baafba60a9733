//! Fuzzing the two readers of hostile text: resource YAML (`parse_files_within`, the
//! apply path) and event JSON (`read_event`, `read_batch`, `validate_events`, the ingest
//! path). Whatever the input, they must not panic, must answer within a time bound, and
//! must keep the process's memory bounded; generated inputs also check that the limits
//! count what they say.
//!
//! `cargo test --test fuzz` runs 256 cases per target. A long run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use std::time::{Duration, Instant};

use hookwarden::api::cloudevents;
use hookwarden::api::events::{read_batch, read_event, validate_events};
use hookwarden::api::strict_json::{self, Problem};
use hookwarden::auth::{Principal, Role, TokenKeys};
use hookwarden::config::Secret;
use hookwarden::resources::{parse_files_within, ApplyLimits, Parsed};
use proptest::prelude::*;
use proptest::sample::select;

/// Generous for a debug build on a busy 2-core machine; a case takes milliseconds.
const CASE_TIME: Duration = Duration::from_secs(2);

/// Small limits, so that small inputs reach them.
fn small_limits() -> ApplyLimits {
    ApplyLimits {
        max_body_bytes: 1024,
        max_documents: 20,
        max_depth: 8,
        max_nodes: 500,
        max_expanded_bytes: 4096,
        max_brackets_per_document: 16,
    }
}

fn timed<T>(what: &str, input: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = f();
    let took = started.elapsed();
    assert!(took < CASE_TIME, "{what} took {took:?} on {input:?}");
    result
}

fn read_yaml(text: &str, limits: &ApplyLimits) -> Parsed {
    timed("reading YAML", text, || parse_files_within([("f.yaml", text)], limits))
}

/// Pieces of resource YAML and of YAML's trickier syntax.
const FRAGMENTS: &[&str] = &[
    "apiVersion: hookwarden/v1\n",
    "kind: Endpoint\n",
    "kind: RetryBudget\n",
    "kind: Filter\n",
    "kind: AgentRule\n",
    "metadata: {name: e, namespace: n}\n",
    "metadata:\n  name: x\n",
    "spec:\n",
    "  url: https://e.example.com/hooks\n",
    "  secrets: [{value: whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP}]\n",
    "  maxAttempts: 5\n",
    "  backoff: {base: 1s, max: 1m}\n",
    "  expression: \"event.type == 'a'\"\n",
    "---\n",
    "...\n",
    "--- ",
    "%YAML 1.2\n",
    "# comment [{\n",
    "\n",
    "  ",
    "- ",
    "? ",
    ": ",
    ", ",
    "[",
    "]",
    "{",
    "}",
    "&a ",
    "*a",
    "&b [x, y, z]\n",
    "[*a, *a, *a, *a]\n",
    "!tag ",
    "!!str ",
    "'quoted [' ",
    "\"double \\\" {\" ",
    "|\n  block [\n",
    ">-\n  folded\n",
    "x",
    "123",
    "~",
    "\t",
    "\r\n",
    "\u{feff}",
    "é",
];

fn yaml_text() -> impl Strategy<Value = String> {
    prop::collection::vec(select(FRAGMENTS), 0..200).prop_map(|parts| parts.concat())
}

/// A JSON value whose objects may repeat keys, written as text, with what an honest
/// reader knows of it.
#[derive(Clone, Debug)]
enum Json {
    Scalar(&'static str),
    Array(Vec<Json>),
    /// Keys as the reader decodes them, and whether each is written with an escape.
    Object(Vec<(&'static str, bool, Json)>),
}

impl Json {
    fn text(&self) -> String {
        match self {
            Json::Scalar(s) => (*s).to_owned(),
            Json::Array(items) => format!("[{}]", items.iter().map(Json::text).collect::<Vec<_>>().join(",")),
            Json::Object(entries) => {
                let entry = |(key, escaped, value): &(&str, bool, Json)| {
                    let key = if *escaped {
                        key.chars().map(|c| format!("\\u{:04x}", c as u32)).collect::<String>()
                    } else {
                        key.to_string()
                    };
                    format!("\"{key}\": {}", value.text())
                };
                format!("{{{}}}", entries.iter().map(entry).collect::<Vec<_>>().join(", "))
            }
        }
    }

    fn depth(&self) -> usize {
        match self {
            Json::Scalar(_) => 0,
            Json::Array(items) => 1 + items.iter().map(Json::depth).max().unwrap_or(0),
            Json::Object(entries) => 1 + entries.iter().map(|(_, _, v)| v.depth()).max().unwrap_or(0),
        }
    }

    fn repeats_a_key(&self) -> bool {
        match self {
            Json::Scalar(_) => false,
            Json::Array(items) => items.iter().any(Json::repeats_a_key),
            Json::Object(entries) => {
                let mut keys: Vec<&str> = entries.iter().map(|(k, _, _)| *k).collect();
                keys.sort_unstable();
                keys.windows(2).any(|w| w[0] == w[1]) || entries.iter().any(|(_, _, v)| v.repeats_a_key())
            }
        }
    }
}

fn json() -> impl Strategy<Value = Json> {
    let scalar =
        select(&["1", "-2.5e3", "true", "null", "\"s\"", "\"]}\\\"{[\"", "\"\\u00e9\""][..]).prop_map(Json::Scalar);
    scalar.prop_recursive(12, 64, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::vec((select(&["a", "b", "c", "a.b", ""][..]), any::<bool>(), inner), 0..4)
                .prop_map(Json::Object),
        ]
    })
}

fn principal() -> Principal {
    let keys = TokenKeys::new(&Secret::new("fuzz-secret-fuzz-secret-fuzz-secret-0123"));
    let token = keys.mint("fuzz", &[Role::Ingest], &["*".to_owned()], Duration::from_secs(3600));
    keys.authenticate(Some(&format!("Bearer {token}"))).expect("a minted token")
}

/// The peak memory of this test process, in bytes.
fn peak_memory() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_break_the_yaml_reader(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let text = String::from_utf8_lossy(&bytes);
        read_yaml(&text, &ApplyLimits::default());
        read_yaml(&text, &small_limits());
    }

    #[test]
    fn yaml_made_of_tricky_pieces_never_breaks_the_reader(text in yaml_text()) {
        let parsed = read_yaml(&text, &small_limits());
        prop_assert!(parsed.resources.len() <= small_limits().max_documents);
        read_yaml(&text, &ApplyLimits::default());
    }

    /// `l: &l [x × a]` and `big: [*l × b]` are 5 + a + b·(1 + a) values.
    #[test]
    fn aliases_count_as_every_value_they_repeat(a in 0usize..60, b in 0usize..60) {
        let text = format!("l: &l [{}]\nbig: [{}]\n", vec!["x"; a].join(", "), vec!["*l"; b].join(", "));
        let values = 5 + a + b * (1 + a);
        let limits = ApplyLimits { max_nodes: 500, ..small_limits() };
        let parsed = read_yaml(&text, &limits);
        let over = parsed.errors.iter().any(|e| e.message.contains("(apply.maxNodes)"));
        prop_assert_eq!(over, values > 500, "{} values: {:?}", values, parsed.errors);
    }

    #[test]
    fn arbitrary_bytes_never_break_event_reading(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let shown = String::from_utf8_lossy(&bytes).into_owned();
        let principal = principal();
        if let Ok(event) = timed("reading an event", &shown, || read_event(&bytes, 64)) {
            let _ = validate_events(vec![(String::new(), event)], &principal, "0af7651916cd43dd8448eb211c80319c", None);
        }
        if let Ok(events) = timed("reading a batch", &shown, || read_batch(&bytes, 1000, 64)) {
            let _ = validate_events(events, &principal, "0af7651916cd43dd8448eb211c80319c", None);
        }
        if let Ok(event) = timed("reading a structured CloudEvent", &shown, || cloudevents::read_structured(&bytes, 64)) {
            let _ = validate_events(vec![(String::new(), event)], &principal, "0af7651916cd43dd8448eb211c80319c", Some("a"));
        }
        if let Ok(events) = timed("reading a CloudEvents batch", &shown, || cloudevents::read_batch(&bytes, 1000, 64)) {
            let _ = validate_events(events, &principal, "0af7651916cd43dd8448eb211c80319c", None);
        }
        let mut headers = axum::http::HeaderMap::new();
        for (name, value) in [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "s"), ("ce-type", "t")] {
            headers.insert(name, value.parse().unwrap());
        }
        if let Ok(event) = timed("reading a binary CloudEvent", &shown, || cloudevents::read_binary(&headers, &bytes, 64)) {
            let _ = validate_events(vec![(String::new(), event)], &principal, "0af7651916cd43dd8448eb211c80319c", None);
        }
        let _ = strict_json::check(&bytes, "", 8);
    }

    /// An event is refused exactly when its JSON repeats a key or nests too deep, and a
    /// refusal names the right problem.
    #[test]
    fn event_json_is_refused_exactly_when_it_repeats_a_key_or_nests_too_deep(data in json(), max in 2usize..10) {
        let text = format!(r#"{{"source": "s", "type": "t", "data": {}}}"#, data.text());
        let too_deep = 1 + data.depth() > max;
        let repeats = data.repeats_a_key();
        match timed("checking JSON", &text, || strict_json::check(text.as_bytes(), "", max)) {
            Ok(()) => prop_assert!(!too_deep && !repeats, "accepted: {}", text),
            Err(Problem::DuplicateKey { path }) => prop_assert!(repeats, "no key repeats at {}: {}", path, text),
            Err(Problem::TooDeep { path, .. }) => prop_assert!(too_deep, "not too deep at {}: {}", path, text),
        }
        let read = read_event(text.as_bytes(), max);
        prop_assert_eq!(read.is_ok(), !too_deep && !repeats, "{}: {:?}", text, read.err());
        if let Ok(event) = read {
            prop_assert!(validate_events(vec![(String::new(), event)], &principal(), "0af7651916cd43dd8448eb211c80319c", None).is_ok());
        }
    }
}

/// The alias bomb of the review through the default limits, and whatever the other
/// targets of this binary fed the readers so far: the process never held more than this.
#[test]
fn the_fuzzed_readers_stay_within_memory() {
    let text = format!("l: &l [{}]\nbig: [{}]\n", vec!["x"; 1000].join(", "), vec!["*l"; 12_000].join(", "));
    read_yaml(&text, &ApplyLimits::default());
    let peak = peak_memory();
    assert!(peak < 512 * 1024 * 1024, "peak memory {} MiB", peak / (1024 * 1024));
}
