//! CEL expressions: compiled once (at apply time), bounded in what they can cost.
//!
//! What can be written is bounded before anything runs: source length, nesting depth
//! (checked on the text *before* the parser sees it, so a pathological input cannot
//! exhaust the parser's stack), terms, comprehension nesting, and comprehensions nested
//! over input data (see [`super::cost`]). Every variable an expression names must be one
//! the engine provides where the expression runs; every literal pattern of `matches()` is
//! compiled here, within `cel.regexSizeLimit`. What one evaluation may cost is bounded
//! while it runs, by [`super::meter`].

use std::sync::Arc;
use std::time::Duration;

use cel::common::ast::{Expr, LiteralValue};
use cel::common::types::{CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt};
use cel::common::value::Val;
use cel::{IdedExpr, Program};
use serde::Deserialize;

use super::cost::{self, Shape};
use super::meter::{self, Budget, Patterns};
pub use super::meter::{with_root, Evaluation};

/// The `cel` section of the configuration: what an expression may be (checked when it is
/// applied, and again when the server loads it) and what one evaluation may cost
/// (enforced while it runs). The defaults fit hand-written filters and rules with room
/// to spare; see `docs/SECURITY.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Limits {
    /// Longest expression, in bytes of source.
    pub max_source_bytes: usize,
    /// Deepest nesting of brackets, operators and calls.
    pub max_nesting: usize,
    /// Most terms (nodes of the parsed expression).
    pub max_nodes: usize,
    /// Most comprehension loops (`all`, `exists`, `exists_one`, `map`, `filter`) inside
    /// one another.
    pub max_comprehension_nesting: usize,
    /// Most distinct literal patterns of `matches()` in one expression.
    pub max_patterns: usize,
    /// Largest compiled form of a pattern, in bytes (the regex crate's `size_limit`, and
    /// its `dfa_size_limit` for the lazy DFA's cache).
    pub regex_size_limit: usize,
    /// Cost units one evaluation may spend (see [`super::meter`]).
    pub max_cost: u64,
    /// CPU time one evaluation may use: a Filter, an ordering key, or all the AgentRules
    /// of one policy decision.
    #[serde(with = "crate::duration::text")]
    pub max_cpu_time: Duration,
    /// Threads that run evaluations, off the async workers (0: half the cores, at least 1).
    pub threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let budget = Budget::default();
        Self {
            max_source_bytes: 4096,
            max_nesting: 32,
            max_nodes: 500,
            max_comprehension_nesting: 2,
            max_patterns: 8,
            regex_size_limit: budget.regex_size_limit,
            max_cost: budget.max_cost,
            max_cpu_time: budget.max_cpu_time,
            threads: 0,
        }
    }
}

impl Limits {
    /// The bounds of one evaluation.
    pub fn budget(&self) -> Budget {
        Budget { max_cost: self.max_cost, max_cpu_time: self.max_cpu_time, regex_size_limit: self.regex_size_limit }
    }

    /// The evaluation threads to start.
    pub fn thread_count(&self) -> usize {
        match self.threads {
            0 => crate::threads::half_the_cores(),
            n => n,
        }
    }

    /// Refuses limits that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_source_bytes < 64 || self.max_nodes < 10 || self.max_nesting < 4 {
            return Err(
                "cel.maxSourceBytes must be at least 64, cel.maxNodes at least 10, cel.maxNesting at least 4".into()
            );
        }
        // The parser is recursive: deeper nesting than this could exhaust its stack.
        if self.max_nesting > 100 {
            return Err("cel.maxNesting must be at most 100".into());
        }
        let cpu = self.max_cpu_time;
        if self.max_cost < 100 || cpu < Duration::from_millis(1) || cpu > Duration::from_secs(10) {
            return Err("cel.maxCost must be at least 100 and cel.maxCpuTime from 1ms to 10s".into());
        }
        if self.regex_size_limit < 1024 {
            return Err("cel.regexSizeLimit must be at least 1024".into());
        }
        if self.threads > 64 {
            return Err("cel.threads must be at most 64".into());
        }
        Ok(())
    }
}

/// A compiled expression, with its cost checkpoints and its literal patterns. Cheap to
/// clone.
#[derive(Clone)]
pub struct CompiledExpr {
    source: Arc<str>,
    /// The parsed expression with the checkpoints of [`cost::instrument`].
    pub(super) expr: Arc<IdedExpr>,
    pub(super) patterns: Arc<Patterns>,
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

    /// The kind of value the expression gives whenever its syntax alone says it is not a
    /// list or a map (`a string` for `'x' + event.type`, `a bool` for a comparison or
    /// `all()`), looking into both branches of `? :`; `None` when it may be one (a
    /// literal list or map, `map()`, `filter()`, a variable or a field of one).
    pub fn scalar_result(&self) -> Option<&'static str> {
        scalar_result(&self.expr)
    }

    /// The first field named on a variable of `shapes` that the variable does not have:
    /// `(variable, field)`. `shapes` gives each variable's fields; others are not checked.
    pub fn unknown_field(&self, shapes: &[(&str, &[&str])]) -> Option<(String, String)> {
        unknown_field(&self.expr, shapes, &mut Vec::new())
    }
}

/// Runs `program` with `variables` bound (as [`json_val`] binds them), within `budget`.
/// CPU-bound for as long as the budget allows: call it off the async workers.
pub fn evaluate(
    program: &CompiledExpr,
    variables: &[(&str, &serde_json::Value)],
    budget: Budget,
) -> Result<cel::Value, String> {
    let evaluation = Evaluation::start(budget);
    with_root(|root| {
        let mut context = root.new_inner_scope();
        for (name, value) in variables {
            context.add_variable_as_val(*name, json_val(value));
        }
        evaluation.execute(program, &context)
    })
}

fn scalar_result(e: &IdedExpr) -> Option<&'static str> {
    use cel::common::ast::operators as op;
    match &e.expr {
        Expr::Literal(literal) => Some(match literal {
            LiteralValue::Boolean(_) => "a bool",
            LiteralValue::Bytes(_) => "bytes",
            LiteralValue::Double(_) => "a double",
            LiteralValue::Int(_) => "an int",
            LiteralValue::UInt(_) => "a uint",
            LiteralValue::String(_) => "a string",
            LiteralValue::Null => "null",
        }),
        Expr::Select(select) if select.test => Some("a bool"),
        Expr::Comprehension(c) => match &c.result.expr {
            // `all`, `exists` (a bool accumulator), `map`, `filter` (a list one).
            Expr::Ident(name) if *name == c.accu_var => scalar_result(&c.accu_init),
            _ => scalar_result(&c.result),
        },
        Expr::Call(call) => match (call.func_name.as_str(), call.args.as_slice()) {
            (cost::COST, [inner]) => scalar_result(inner),
            (op::CONDITIONAL, [_, yes, no]) => scalar_result(yes).or_else(|| scalar_result(no)),
            // `+` joins lists too: it gives a list or a map only if neither side is sure not to.
            (op::ADD, [a, b]) => scalar_result(a).or_else(|| scalar_result(b)),
            (
                op::LOGICAL_AND
                | op::LOGICAL_OR
                | op::LOGICAL_NOT
                | op::EQUALS
                | op::NOT_EQUALS
                | op::GREATER
                | op::GREATER_EQUALS
                | op::LESS
                | op::LESS_EQUALS
                | op::IN
                | op::NOT_STRICTLY_FALSE
                | "matches"
                | "startsWith"
                | "endsWith"
                | "contains"
                | "bool",
                _,
            ) => Some("a bool"),
            (op::SUBSTRACT | op::MULTIPLY | op::DIVIDE | op::MODULO | op::NEGATE, _) => Some("a number"),
            ("size" | "int" | "uint" | "double" | "max" | "min", _) => Some("a number"),
            ("string", _) => Some("a string"),
            ("bytes", _) => Some("bytes"),
            ("timestamp", _) => Some("a timestamp"),
            ("duration", _) => Some("a duration"),
            ("type", _) => Some("a type"),
            _ => None,
        },
        _ => None,
    }
}

fn unknown_field(e: &IdedExpr, shapes: &[(&str, &[&str])], bound: &mut Vec<String>) -> Option<(String, String)> {
    match &e.expr {
        Expr::Select(select) => {
            if let Expr::Ident(name) = &select.operand.expr {
                let shape = shapes.iter().find(|(variable, _)| variable == name && !bound.contains(name));
                if let Some((variable, fields)) = shape {
                    if !fields.contains(&select.field.as_str()) {
                        return Some(((*variable).to_owned(), select.field.clone()));
                    }
                }
            }
            unknown_field(&select.operand, shapes, bound)
        }
        Expr::Comprehension(c) => {
            let outside = [&c.iter_range, &c.accu_init];
            if let Some(found) = outside.into_iter().find_map(|part| unknown_field(part, shapes, bound)) {
                return Some(found);
            }
            let outer = bound.len();
            bound.extend(std::iter::once(c.iter_var.clone()).chain(c.iter_var2.clone()));
            bound.push(c.accu_var.clone());
            let found =
                [&c.loop_cond, &c.loop_step, &c.result].into_iter().find_map(|part| unknown_field(part, shapes, bound));
            bound.truncate(outer);
            found
        }
        _ => {
            let mut found = None;
            cost::for_each_child(e, |part| {
                if found.is_none() {
                    found = unknown_field(part, shapes, bound);
                }
            });
            found
        }
    }
}

/// Compiles `source`, allowing only the variables in `variables`.
pub fn compile(source: &str, variables: &[&str], limits: &Limits) -> Result<CompiledExpr, String> {
    if source.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if source.len() > limits.max_source_bytes {
        return Err(format!(
            "is {} bytes long; expressions are limited to {} bytes (cel.maxSourceBytes)",
            source.len(),
            limits.max_source_bytes
        ));
    }
    let nesting = text_nesting(source);
    if nesting > limits.max_nesting {
        return Err(format!(
            "nests {nesting} levels deep; expressions are limited to {} (cel.maxNesting)",
            limits.max_nesting
        ));
    }
    // The parser is third-party code: a panic in it is a refusal, not a crash.
    let program = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Program::compile(source)))
        .map_err(|_| "could not be parsed".to_owned())?
        .map_err(|e| format!("is not valid CEL: {}", e.to_string().trim()))?;

    let shape = Shape::of(program.expression());
    if shape.nodes > limits.max_nodes {
        return Err(format!(
            "has {} terms; expressions are limited to {} (cel.maxNodes)",
            shape.nodes, limits.max_nodes
        ));
    }
    if shape.depth > limits.max_nesting {
        return Err(format!(
            "nests {} levels deep; expressions are limited to {} (cel.maxNesting)",
            shape.depth, limits.max_nesting
        ));
    }
    if shape.loops > limits.max_comprehension_nesting {
        return Err(format!(
            "nests {} comprehensions (all, exists, exists_one, map, filter); at most {} are allowed (cel.maxComprehensionNesting)",
            shape.loops, limits.max_comprehension_nesting
        ));
    }
    if let Some((id, read)) = shape.nested_over_input.first() {
        let at = program
            .source_info()
            .offset_for(*id)
            .map(|(start, _)| format!(" (at character {})", start + 1))
            .unwrap_or_default();
        return Err(format!(
            "runs a comprehension over {} inside another comprehension{at}: it would run once for every element of the \
             outer one, at a cost that grows with the square of the input; iterate over a part of the outer element \
             instead (`items.all(i, i.tags.exists(t, ...))`), or move it out of the loop",
            read.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ")
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
    let patterns = literal_patterns(program.expression(), limits)?;
    let mut expr = program.expression().clone();
    cost::instrument(&mut expr);
    Ok(CompiledExpr { source: source.into(), expr: Arc::new(expr), patterns: Arc::new(patterns) })
}

/// The literal patterns of the `matches()` calls in `e`, compiled.
fn literal_patterns(e: &IdedExpr, limits: &Limits) -> Result<Patterns, String> {
    let mut texts = Vec::new();
    collect_patterns(e, &mut texts);
    texts.sort_unstable();
    texts.dedup();
    if texts.len() > limits.max_patterns {
        return Err(format!(
            "has {} different patterns in matches(); at most {} are allowed (cel.maxPatterns)",
            texts.len(),
            limits.max_patterns
        ));
    }
    texts
        .into_iter()
        .map(|text| match meter::compile_pattern(text, limits.regex_size_limit) {
            Ok(regex) => Ok((text.to_owned(), regex)),
            Err(message) => Err(format!("the pattern `{text}` of matches() {message}")),
        })
        .collect()
}

fn collect_patterns<'e>(e: &'e IdedExpr, out: &mut Vec<&'e str>) {
    if let Expr::Call(call) = &e.expr {
        let pattern = match (&call.target, call.args.as_slice()) {
            (Some(_), [pattern]) | (None, [_, pattern]) if call.func_name == "matches" => Some(pattern),
            _ => None,
        };
        if let Some(IdedExpr { expr: Expr::Literal(LiteralValue::String(text)), .. }) = pattern {
            out.push(text.inner());
        }
    }
    cost::for_each_child(e, |part| collect_patterns(part, out));
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

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &[&str] = &["event"];

    #[test]
    fn a_valid_expression_compiles() {
        compile("event.data.total >= 1000 && event.type.startsWith('order.')", EVENT, &Limits::default()).unwrap();
    }

    #[test]
    fn comprehension_variables_are_not_unknown() {
        compile("event.data.items.exists(i, i.price > 10)", EVENT, &Limits::default()).unwrap();
    }

    #[test]
    fn syntax_errors_and_unknown_variables_are_named() {
        let err = compile("event.data.total >= ", EVENT, &Limits::default()).unwrap_err();
        assert!(err.starts_with("is not valid CEL"), "{err}");
        let err = compile("evnt.data.total > 1", EVENT, &Limits::default()).unwrap_err();
        assert!(err.contains("`evnt`") && err.contains("`event`"), "{err}");
    }

    /// Evaluates `source` with `event` bound as [`json_val`] binds it.
    fn run(source: &str, event: &serde_json::Value) -> Result<cel::Value, String> {
        let program = compile(source, EVENT, &Limits::default()).unwrap();
        let evaluation = Evaluation::start(Budget::default());
        with_root(|root| {
            let mut context = root.new_inner_scope();
            context.add_variable_as_val("event", json_val(event));
            evaluation.execute(&program, &context)
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
    fn a_comprehension_nested_over_the_input_is_refused_naming_what_it_reads() {
        let err = compile("event.data.a.all(x, event.data.a.all(y, x == y))", EVENT, &Limits::default()).unwrap_err();
        assert!(
            err.starts_with("runs a comprehension over `event` inside another comprehension (at character "),
            "{err}"
        );
        assert!(err.contains("grows with the square of the input"), "{err}");
        compile("event.data.items.all(i, i.tags.exists(t, t == 'x'))", EVENT, &Limits::default()).unwrap();
    }

    #[test]
    fn expensive_expressions_are_refused_before_parsing() {
        let deep = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(compile(&deep, EVENT, &Limits { max_source_bytes: 100_000, ..Limits::default() })
            .unwrap_err()
            .contains("levels deep"));
        let long = vec!["event.data.a == 1"; 400].join(" || ");
        assert!(compile(&long, EVENT, &Limits::default()).unwrap_err().contains("bytes"));
        let wide = vec!["1"; 600].join(" + ");
        assert!(compile(&wide, EVENT, &Limits::default()).unwrap_err().contains("terms"));
        let nested = "event.data.a.all(x, x.all(y, y.all(z, z > 0)))";
        assert!(compile(nested, EVENT, &Limits::default()).unwrap_err().contains("comprehensions"));
        let negations = format!("{}true", "!".repeat(100));
        assert!(compile(&negations, EVENT, &Limits::default()).is_err());
    }
}
