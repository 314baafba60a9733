//! What a CEL expression may cost, decided on its syntax tree before it ever runs, and the
//! checkpoints that let [`super::meter`] bound it while it runs.
//!
//! At apply time ([`Shape::of`], checked by [`super::expr::compile`]):
//! - size: source bytes, terms (AST nodes) and nesting depth are limited;
//! - comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) nest at most
//!   `cel.maxComprehensionNesting` loops deep;
//! - **a comprehension inside another one's loop may not range over input data**: its
//!   range may use only the variables of the comprehensions around it (and literals).
//!   `items.exists(i, i.tags.exists(t, …))` walks each element's own parts, so its work
//!   stays proportional to the size of the event; `a.all(x, a.all(y, …))` walks all of `a`
//!   once for each of its elements, which grows with the square of the event, and is
//!   refused.
//!
//! At run time the meter needs places to count and to look at its clock. [`instrument`]
//! rewrites the tree so that a cost checkpoint (the internal function [`COST`], which
//! passes its argument through) is evaluated
//! - once per iteration of every comprehension;
//! - on every value built by `+` (text, bytes and lists grow with it);
//! - on every element (and key) put into a list or map literal, before it is copied in,
//!   and on each value `map` produces.
//!
//! Between two checkpoints the interpreter evaluates at most one pass over the terms of
//! the expression, on values that either passed a checkpoint or are parts of the event,
//! whose size ingest bounds.

use std::collections::BTreeSet;

use cel::common::ast::{operators, CallExpr, EntryExpr, Expr};
use cel::IdedExpr;

/// The internal function of the cost checkpoints. Source text cannot name it (`@` starts
/// no identifier), so only [`instrument`] puts it in.
pub const COST: &str = "@cost";

/// What [`Shape::of`] found of an expression.
#[derive(Debug, Default)]
pub struct Shape {
    pub nodes: usize,
    pub depth: usize,
    /// The deepest nesting of comprehension loops.
    pub loops: usize,
    /// Variables bound by comprehensions (`x` in `list.all(x, …)`).
    pub bound: Vec<String>,
    /// Comprehensions inside a loop whose range reads variables from outside every
    /// enclosing comprehension: `(the comprehension's node id, those variables)`.
    pub nested_over_input: Vec<(u64, Vec<String>)>,
}

impl Shape {
    pub fn of(expr: &IdedExpr) -> Shape {
        let mut shape = Shape::default();
        shape.walk(expr, 0, 0, &mut Vec::new());
        shape
    }

    /// `e` is `depth` terms and `loops` comprehension loops deep; `scopes` holds the
    /// variables of those loops.
    fn walk(&mut self, e: &IdedExpr, depth: usize, loops: usize, scopes: &mut Vec<String>) {
        self.nodes += 1;
        self.depth = self.depth.max(depth);
        let next = depth + 1;
        let Expr::Comprehension(c) = &e.expr else {
            return for_each_child(e, |part| self.walk(part, next, loops, scopes));
        };
        let loop_vars: Vec<String> = std::iter::once(c.iter_var.clone()).chain(c.iter_var2.clone()).collect();
        self.bound.extend(loop_vars.iter().cloned());
        self.bound.push(c.accu_var.clone());
        if loops > 0 {
            let mut free = BTreeSet::new();
            free_variables(&c.iter_range, &mut scopes.clone(), &mut free);
            if !free.is_empty() {
                self.nested_over_input.push((e.id, free.into_iter().collect()));
            }
        }
        // The range, the start and the result are evaluated once, outside the loop.
        for part in [&c.iter_range, &c.accu_init, &c.result] {
            self.walk(part, next, loops, scopes);
        }
        let outer = scopes.len();
        scopes.extend(loop_vars);
        scopes.push(c.accu_var.clone());
        self.loops = self.loops.max(loops + 1);
        for part in [&c.loop_cond, &c.loop_step] {
            self.walk(part, next, loops + 1, scopes);
        }
        scopes.truncate(outer);
    }
}

/// Calls `f` on each direct part of `e`.
pub fn for_each_child<'e>(e: &'e IdedExpr, mut f: impl FnMut(&'e IdedExpr)) {
    match &e.expr {
        Expr::Call(call) => call.target.iter().map(|t| &**t).chain(&call.args).for_each(f),
        Expr::Comprehension(c) => {
            [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result].into_iter().for_each(f)
        }
        Expr::List(list) => list.elements.iter().for_each(f),
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(m) = &entry.expr {
                    f(&m.key);
                    f(&m.value);
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(field) = &entry.expr {
                    f(&field.value);
                }
            }
        }
        Expr::Select(select) => f(&select.operand),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// The variables `e` reads that `bound` does not hold, into `free`.
fn free_variables(e: &IdedExpr, bound: &mut Vec<String>, free: &mut BTreeSet<String>) {
    match &e.expr {
        Expr::Ident(name) if !bound.contains(name) => {
            free.insert(name.clone());
        }
        Expr::Comprehension(c) => {
            free_variables(&c.iter_range, bound, free);
            free_variables(&c.accu_init, bound, free);
            let outer = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            for part in [&c.loop_cond, &c.loop_step, &c.result] {
                free_variables(part, bound, free);
            }
            bound.truncate(outer);
        }
        _ => for_each_child(e, |part| free_variables(part, bound, free)),
    }
}

/// `e`, passed through a cost checkpoint.
fn checkpoint(e: &mut IdedExpr) {
    let inner = std::mem::take(e);
    *e = IdedExpr {
        id: inner.id,
        expr: Expr::Call(CallExpr { func_name: COST.to_owned(), target: None, args: vec![inner] }),
    };
}

fn is_checkpoint(e: &IdedExpr) -> bool {
    matches!(&e.expr, Expr::Call(call) if call.func_name == COST)
}

/// Adds the cost checkpoints (see the module documentation) to `e`.
///
/// The interpreter runs `map` and `filter` in place (appending to one list) only while
/// their loop keeps the shape the macros give it: a literal loop condition and a step
/// `@result + [item]`, possibly behind `cond ? … : @result`. The checkpoints keep that
/// shape: they go on the condition, on `cond` and on `item`, never on the step itself.
pub fn instrument(e: &mut IdedExpr) {
    instrument_in(e, &mut Vec::new());
}

fn instrument_in(e: &mut IdedExpr, accumulators: &mut Vec<String>) {
    match &mut e.expr {
        Expr::Call(call) => {
            for part in call.target.iter_mut().map(|t| &mut **t).chain(call.args.iter_mut()) {
                instrument_in(part, accumulators);
            }
            let extends_accumulator =
                call.args.iter().any(|a| matches!(&a.expr, Expr::Ident(name) if accumulators.contains(name)));
            if call.func_name == operators::ADD && call.target.is_none() && !extends_accumulator {
                checkpoint(e);
            }
        }
        Expr::List(list) => {
            for element in &mut list.elements {
                instrument_in(element, accumulators);
                if !matches!(element.expr, Expr::Literal(_)) && !is_checkpoint(element) {
                    checkpoint(element);
                }
            }
        }
        Expr::Map(map) => {
            for entry in &mut map.entries {
                if let EntryExpr::MapEntry(m) = &mut entry.expr {
                    for part in [&mut m.key, &mut m.value] {
                        instrument_in(part, accumulators);
                        if !matches!(part.expr, Expr::Literal(_)) {
                            checkpoint(part);
                        }
                    }
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &mut s.entries {
                if let EntryExpr::StructField(f) = &mut entry.expr {
                    instrument_in(&mut f.value, accumulators);
                }
            }
        }
        Expr::Select(select) => instrument_in(&mut select.operand, accumulators),
        Expr::Comprehension(c) => {
            for part in [&mut c.iter_range, &mut c.accu_init, &mut c.result] {
                instrument_in(part, accumulators);
            }
            accumulators.push(c.accu_var.clone());
            instrument_in(&mut c.loop_cond, accumulators);
            instrument_in(&mut c.loop_step, accumulators);
            accumulators.pop();
            // One checkpoint per iteration, on something every iteration evaluates.
            if !matches!(c.loop_cond.expr, Expr::Literal(_)) {
                checkpoint(&mut c.loop_cond);
            } else if let Some(guard) = conditional_guard(&mut c.loop_step) {
                checkpoint(guard);
            } else if let Some(item) = appended_item(&mut c.loop_step, &c.accu_var) {
                if !is_checkpoint(item) {
                    checkpoint(item);
                }
            } else {
                checkpoint(&mut c.loop_step);
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// The condition of a step `cond ? a : b`.
fn conditional_guard(step: &mut IdedExpr) -> Option<&mut IdedExpr> {
    match &mut step.expr {
        Expr::Call(call) if call.func_name == operators::CONDITIONAL && call.args.len() == 3 => call.args.first_mut(),
        _ => None,
    }
}

/// The first item of a step `accumulator + [item, …]`.
fn appended_item<'e>(step: &'e mut IdedExpr, accumulator: &str) -> Option<&'e mut IdedExpr> {
    let Expr::Call(call) = &mut step.expr else { return None };
    if call.func_name != operators::ADD || call.args.len() != 2 {
        return None;
    }
    let [lhs, rhs] = call.args.as_mut_slice() else { return None };
    match (&lhs.expr, &mut rhs.expr) {
        (Expr::Ident(name), Expr::List(list)) if name == accumulator => list.elements.first_mut(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(source: &str) -> IdedExpr {
        cel::Program::compile(source).unwrap().expression().clone()
    }

    fn nested_over_input(source: &str) -> Vec<Vec<String>> {
        Shape::of(&parsed(source)).nested_over_input.into_iter().map(|(_, read)| read).collect()
    }

    #[test]
    fn a_comprehension_over_input_inside_another_is_found() {
        let quadratic = [
            ("event.data.a.all(x, event.data.a.all(y, x == y))", vec!["event"]),
            ("event.data.a.exists(x, event.data.b.filter(y, y == x).size() > 0)", vec!["event"]),
            ("event.data.a.map(x, event.data.b[x].exists(y, y > 0))", vec!["event"]),
            ("[1, 2].all(k, event.data.a.exists(y, y == k))", vec!["event"]),
            ("event.data.a.all(x, endpoint.labels.all(k, k != x) && now > now)", vec!["endpoint"]),
        ];
        for (source, read) in quadratic {
            assert_eq!(nested_over_input(source), vec![read], "{source}");
        }
    }

    #[test]
    fn comprehensions_over_parts_of_the_outer_element_or_outside_its_loop_are_linear() {
        let linear = [
            "event.data.items.exists(i, i.tags.exists(t, t == 'x'))",
            "event.data.orders.all(o, o.items.map(i, i.qty).all(q, q > 0))",
            "event.data.a.all(x, [1, 2, 3].exists(y, y == x))",
            "event.data.a.map(x, x + 1).all(y, y > 0)",
            "event.data.a.all(x, x > 0) && event.data.b.all(y, y > 0)",
            "event.data.a.all(x, x.all(x, x > 0))",
        ];
        for source in linear {
            assert_eq!(nested_over_input(source), Vec::<Vec<String>>::new(), "{source}");
        }
    }

    #[test]
    fn loops_count_only_what_runs_inside_a_loop() {
        assert_eq!(Shape::of(&parsed("event.data.a.map(x, x).all(y, y > 0)")).loops, 1);
        assert_eq!(Shape::of(&parsed("event.data.a.all(x, x.b.exists(y, y > 0))")).loops, 2);
        assert_eq!(Shape::of(&parsed("event.type == 'a'")).loops, 0);
    }

    fn checkpoints(e: &IdedExpr) -> usize {
        let mut count = usize::from(is_checkpoint(e));
        for_each_child(e, |part| count += checkpoints(part));
        count
    }

    fn instrumented(source: &str) -> IdedExpr {
        let mut e = parsed(source);
        instrument(&mut e);
        e
    }

    #[test]
    fn checkpoints_go_on_every_loop_every_sum_and_every_computed_literal_element() {
        let table = [
            ("event.type == 'a' && event.data.total > 10", 0),
            ("event.source in ['a', 'b']", 0),
            ("'refund of ' + string(event.data.amount)", 1),
            ("[event.data.a, 1, event.data.b]", 2),
            ("{'k': event.data.a, event.type: 1}", 2),
            ("event.data.a.all(x, x > 0)", 1),
            ("event.data.a.exists(x, x > 0)", 1),
            ("event.data.a.exists_one(x, x > 0)", 1),
            ("event.data.a.map(x, x * 2)", 1),
            ("event.data.a.map(x, 1)", 1),
            ("event.data.a.filter(x, x > 0)", 2),
            ("event.data.a.map(x, x > 0, x + 1)", 2),
            ("event.data.a.all(x, x.b.exists(y, y + 1 > 0))", 3),
        ];
        for (source, expected) in table {
            assert_eq!(checkpoints(&instrumented(source)), expected, "{source}");
        }
    }

    /// The interpreter appends to one list only for a loop of this shape (see
    /// [`instrument`]); anything else would cost the square of the list.
    #[test]
    fn map_and_filter_keep_the_shape_the_interpreter_appends_in_place() {
        for source in ["event.data.a.map(x, x * 2)", "event.data.a.map(x, 1)", "event.data.a.filter(x, x > 0)"] {
            let e = instrumented(source);
            let Expr::Comprehension(c) = &e.expr else { panic!("{source}: {e:?}") };
            assert!(matches!(c.loop_cond.expr, Expr::Literal(_)), "{source}");
            let step = match &c.loop_step.expr {
                Expr::Call(call) if call.func_name == operators::CONDITIONAL => &call.args[1],
                _ => &c.loop_step,
            };
            let Expr::Call(add) = &step.expr else { panic!("{source}: {step:?}") };
            assert_eq!(add.func_name, operators::ADD, "{source}");
            assert!(matches!(&add.args[0].expr, Expr::Ident(name) if *name == c.accu_var), "{source}");
            assert!(matches!(&add.args[1].expr, Expr::List(_)), "{source}");
        }
    }
}
