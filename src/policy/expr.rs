//! CEL expressions: compiled once (at apply time), bounded in what they can cost.
//!
//! The `cel` crate has no cost limit of its own, so what can be written is bounded here,
//! before anything runs: source length, nesting depth (checked on the text *before* the
//! parser sees it, so a pathological input cannot exhaust the parser's stack), number of
//! AST nodes and comprehension nesting. Every variable an expression names must be one
//! the engine provides where the expression runs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr};
use cel::common::types::{CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt};
use cel::common::value::Val;
use cel::{IdedExpr, Program};

/// Limits on what an expression may be.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_source_bytes: usize,
    pub max_nesting: usize,
    pub max_nodes: usize,
    pub max_comprehension_nesting: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_source_bytes: 4096, max_nesting: 32, max_nodes: 500, max_comprehension_nesting: 2 }
    }
}

/// A compiled expression. Cheap to clone.
#[derive(Clone)]
pub struct CompiledExpr {
    source: Arc<str>,
    program: Arc<Program>,
}

impl std::fmt::Debug for CompiledExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CompiledExpr").field(&self.source).finish()
    }
}

impl CompiledExpr {
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn program(&self) -> &Program {
        &self.program
    }
}

/// Compiles `source`, allowing only the variables in `variables`.
pub fn compile(source: &str, variables: &[&str], limits: Limits) -> Result<CompiledExpr, String> {
    if source.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if source.len() > limits.max_source_bytes {
        return Err(format!(
            "is {} bytes long; expressions are limited to {} bytes",
            source.len(),
            limits.max_source_bytes
        ));
    }
    let nesting = text_nesting(source);
    if nesting > limits.max_nesting {
        return Err(format!("nests {nesting} levels deep; expressions are limited to {}", limits.max_nesting));
    }
    // The parser is third-party code: a panic in it is a refusal, not a crash.
    let program = std::panic::catch_unwind(AssertUnwindSafe(|| Program::compile(source)))
        .map_err(|_| "could not be parsed".to_owned())?
        .map_err(|e| format!("is not valid CEL: {}", e.to_string().trim()))?;

    let mut shape = Shape::default();
    shape.walk(program.expression(), 0, 0);
    if shape.nodes > limits.max_nodes {
        return Err(format!("has {} terms; expressions are limited to {}", shape.nodes, limits.max_nodes));
    }
    if shape.depth > limits.max_nesting {
        return Err(format!("nests {} levels deep; expressions are limited to {}", shape.depth, limits.max_nesting));
    }
    if shape.comprehensions > limits.max_comprehension_nesting {
        return Err(format!(
            "nests {} comprehensions (all, exists, map, filter); at most {} are allowed",
            shape.comprehensions, limits.max_comprehension_nesting
        ));
    }
    let references = program.references();
    let mut unknown: Vec<&str> = references
        .variables()
        .into_iter()
        .filter(|v| !variables.contains(v) && !shape.bound.iter().any(|b| b == v))
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    if !unknown.is_empty() {
        return Err(format!(
            "uses unknown variable{} {}; available here: {}",
            if unknown.len() == 1 { "" } else { "s" },
            unknown.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", "),
            variables.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(CompiledExpr { source: source.into(), program: Arc::new(program) })
}

thread_local! {
    /// The standard functions, registered once per thread: building them is most of the
    /// cost of a fresh `cel::Context`. Evaluations work in inner scopes of it.
    static ROOT: cel::Context<'static, 'static> = cel::Context::default();
}

/// Runs `f` with this thread's root context (standard functions, no variables), for
/// inner scopes whose variables may borrow for `'v` (see [`json_val`]).
pub fn with_root<'v, R>(f: impl FnOnce(&cel::Context<'v, 'v>) -> R) -> R {
    ROOT.with(|root| f(root))
}

/// Runs `program` in `context`. The interpreter is third-party code: a panic in it is an
/// error, never a crash.
pub fn execute(program: &CompiledExpr, context: &cel::Context<'_, '_>) -> Result<cel::Value, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| program.program().execute(context)))
        .map_err(|_| "the expression panicked".to_owned())?
        .map_err(|e| e.to_string())
}

/// `value` as a CEL value that borrows its strings from `value`, without copying the text
/// and without going through `cel::Value`, which the crate converts once more when a
/// variable is bound.
///
/// JSON numbers written without a fraction or exponent are `int` when they fit in one
/// (as in Kubernetes CEL and cel-python), `uint` above that, and `double` otherwise, so
/// that `event.data.total % 2 == 0` and `event.data.total - 5 > 0` work with integer
/// literals. (`cel::to_value` makes every positive number a `uint`, with which `2` and
/// `5` have no overload.)
pub fn json_val(value: &serde_json::Value) -> Box<dyn Val + '_> {
    use serde_json::Value as Json;
    match value {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Box::new(CelInt::from(i)),
            (None, Some(u)) => Box::new(CelUInt::from(u)),
            (None, None) => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        Json::String(s) => Box::new(CelString::from(s.as_str())),
        Json::Array(items) => Box::new(CelList::from(items.iter().map(json_val).collect::<Vec<_>>())),
        Json::Object(fields) => Box::new(CelMap::from(
            fields
                .iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), json_val(v)))
                .collect::<std::collections::HashMap<_, _>>(),
        )),
    }
}

/// A value as text: strings as they are, numbers and bools in decimal, others debug-printed.
pub fn value_text(value: &cel::Value) -> String {
    match value {
        cel::Value::String(s) => s.to_string(),
        cel::Value::Int(i) => i.to_string(),
        cel::Value::UInt(u) => u.to_string(),
        cel::Value::Float(f) => f.to_string(),
        cel::Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// A value for messages: its CEL type, with the value of a number or a bool (`the int
/// 1`, `a string`), never Rust's debug form.
pub fn describe(value: &cel::Value) -> String {
    match value {
        cel::Value::Int(i) => format!("the int {i}"),
        cel::Value::UInt(u) => format!("the uint {u}"),
        cel::Value::Float(f) => format!("the double {f}"),
        cel::Value::Bool(b) => format!("the bool {b}"),
        cel::Value::String(_) => "a string".to_owned(),
        cel::Value::Bytes(_) => "bytes".to_owned(),
        cel::Value::List(_) => "a list".to_owned(),
        cel::Value::Map(_) => "a map".to_owned(),
        cel::Value::Null => "null".to_owned(),
        cel::Value::Duration(_) => "a duration".to_owned(),
        cel::Value::Timestamp(_) => "a timestamp".to_owned(),
        other => format!("a value of type {}", other.type_of()),
    }
}

/// Deepest nesting of brackets outside string literals.
fn text_nesting(source: &str) -> usize {
    let (mut depth, mut max, mut unary_run) = (0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        if quote.is_none() && !c.is_whitespace() && c != '!' && c != '-' {
            unary_run = 0;
        }
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            // Unary operators nest without brackets: `!!!!x`, `----x`.
            '!' | '-' => {
                unary_run += 1;
                max = max.max(depth + unary_run);
            }
            _ => {}
        }
    }
    max
}

#[derive(Default)]
struct Shape {
    nodes: usize,
    depth: usize,
    comprehensions: usize,
    /// Variables bound by comprehensions (`x` in `list.all(x, …)`).
    bound: Vec<String>,
}

impl Shape {
    fn walk(&mut self, e: &IdedExpr, depth: usize, comprehensions: usize) {
        self.nodes += 1;
        self.depth = self.depth.max(depth);
        self.comprehensions = self.comprehensions.max(comprehensions);
        let next = depth + 1;
        match &e.expr {
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    self.walk(target, next, comprehensions);
                }
                for arg in &call.args {
                    self.walk(arg, next, comprehensions);
                }
            }
            Expr::Comprehension(c) => {
                self.bound.push(c.iter_var.clone());
                self.bound.push(c.accu_var.clone());
                for part in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                    self.walk(part, next, comprehensions + 1);
                }
            }
            Expr::List(list) => {
                for element in &list.elements {
                    self.walk(element, next, comprehensions);
                }
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(m) = &entry.expr {
                        self.walk(&m.key, next, comprehensions);
                        self.walk(&m.value, next, comprehensions);
                    }
                }
            }
            Expr::Struct(s) => {
                for entry in &s.entries {
                    if let EntryExpr::StructField(f) = &entry.expr {
                        self.walk(&f.value, next, comprehensions);
                    }
                }
            }
            Expr::Select(select) => self.walk(&select.operand, next, comprehensions),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &[&str] = &["event"];

    #[test]
    fn a_valid_expression_compiles() {
        compile("event.data.total >= 1000 && event.type.startsWith('order.')", EVENT, Limits::default()).unwrap();
    }

    #[test]
    fn comprehension_variables_are_not_unknown() {
        compile("event.data.items.exists(i, i.price > 10)", EVENT, Limits::default()).unwrap();
    }

    #[test]
    fn syntax_errors_and_unknown_variables_are_named() {
        let err = compile("event.data.total >= ", EVENT, Limits::default()).unwrap_err();
        assert!(err.starts_with("is not valid CEL"), "{err}");
        let err = compile("evnt.data.total > 1", EVENT, Limits::default()).unwrap_err();
        assert!(err.contains("`evnt`") && err.contains("`event`"), "{err}");
    }

    /// Evaluates `source` with `event` bound as [`json_val`] binds it.
    fn run(source: &str, event: &serde_json::Value) -> Result<cel::Value, String> {
        let program = compile(source, EVENT, Limits::default()).unwrap();
        with_root(|root| {
            let mut context = root.new_inner_scope();
            context.add_variable_as_val("event", json_val(event));
            execute(&program, &context)
        })
    }

    #[test]
    fn json_values_bind_as_cel_values() {
        let event = serde_json::json!({
            "type": "refund.requested",
            "data": {"amount_cents": 2500, "delta": -3, "rate": 0.5, "ok": true, "none": null,
                     "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}], "tags": {"tier": "gold"}}
        });
        let sources = [
            "event.type.startsWith('refund.')",
            "int(event.data.amount_cents) > 2000 && event.data.amount_cents == 2500",
            "event.data.delta < 0 && event.data.rate == 0.5 && event.data.ok && event.data.none == null",
            "event.data.items.exists(i, i.sku == 'b' && i.qty == 1) && size(event.data.items) == 2",
            "has(event.data.tags.tier) && !has(event.data.tags.missing) && 'tier' in event.data.tags",
            "event.data.items.map(i, i.sku) == ['a', 'b']",
        ];
        for source in sources {
            assert_eq!(run(source, &event), Ok(cel::Value::Bool(true)), "{source}");
        }
        assert!(run("event.data.missing > 1", &event).is_err(), "a missing field is an error");
    }

    #[test]
    fn json_integers_are_ints_larger_ones_uints_and_the_rest_doubles() {
        let event = serde_json::json!({"data": {
            "total": 4, "negative": -7, "zero": 0, "max": i64::MAX, "big": u64::MAX, "half": 0.5, "whole": 2.0
        }});
        // cel::Value's == treats 4 and 4u as equal: look at the variant itself.
        let value = |field: &str| run(&format!("event.data.{field}"), &event).unwrap();
        assert!(matches!(value("total"), cel::Value::Int(4)), "{:?}", value("total"));
        assert!(matches!(value("negative"), cel::Value::Int(-7)), "{:?}", value("negative"));
        assert!(matches!(value("zero"), cel::Value::Int(0)), "{:?}", value("zero"));
        assert!(matches!(value("max"), cel::Value::Int(i64::MAX)), "{:?}", value("max"));
        assert!(matches!(value("big"), cel::Value::UInt(u64::MAX)), "{:?}", value("big"));
        assert!(matches!(value("half"), cel::Value::Float(0.5)), "{:?}", value("half"));
        assert!(matches!(value("whole"), cel::Value::Float(2.0)), "{:?}", value("whole"));
    }

    #[test]
    fn arithmetic_on_json_integers_works_with_integer_literals() {
        let event = serde_json::json!({"data": {"total": 42, "count": 5, "negative": -3, "rate": 1.5,
                                                 "big": 18_446_744_073_709_551_615u64}});
        let sources = [
            "event.data.total % 2 == 0",
            "event.data.total - 5 > 0",
            "event.data.total + 8 == 50",
            "event.data.total * 2 == 84",
            "event.data.total / 4 == 10",
            "event.data.total / event.data.count == 8 && event.data.total % event.data.count == 2",
            "event.data.negative * -1 == 3 && event.data.negative + 3 == 0",
            "event.data.total > 41 && event.data.total >= 42 && event.data.total < 43 && event.data.total <= 42",
            "event.data.total != 41 && event.data.negative < 0",
            "event.data.rate * 2.0 == 3.0 && event.data.rate > 1.0",
            "event.data.big == 18446744073709551615u && event.data.big % 2u == 1u",
        ];
        for source in sources {
            assert_eq!(run(source, &event), Ok(cel::Value::Bool(true)), "{source}");
        }
        assert_eq!(run("event.data.total - 50", &event), Ok(cel::Value::Int(-8)), "ints go below zero");
    }

    #[test]
    fn expensive_expressions_are_refused_before_parsing() {
        let deep = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(compile(&deep, EVENT, Limits { max_source_bytes: 100_000, ..Limits::default() })
            .unwrap_err()
            .contains("levels deep"));
        let long = vec!["event.data.a == 1"; 400].join(" || ");
        assert!(compile(&long, EVENT, Limits::default()).unwrap_err().contains("bytes"));
        let wide = vec!["1"; 600].join(" + ");
        assert!(compile(&wide, EVENT, Limits::default()).unwrap_err().contains("terms"));
        let nested = "event.data.a.all(x, x.all(y, y.all(z, z > 0)))";
        assert!(compile(nested, EVENT, Limits::default()).unwrap_err().contains("comprehensions"));
        let negations = format!("{}true", "!".repeat(100));
        assert!(compile(&negations, EVENT, Limits::default()).is_err());
    }
}
