//! The run-time bound of CEL: a budget of cost units and of CPU time, enforced while an
//! expression runs, and `matches()` with regular expressions that are compiled once and
//! bounded in size.
//!
//! The `cel` crate has no step limit or interrupt. Instead, every compiled expression
//! carries cost checkpoints (see [`super::cost::instrument`]); each one charges the meter
//! of the running [`Evaluation`] and stops the expression with an error once either
//! budget is spent:
//! - a comprehension iteration costs 1 unit;
//! - a value built by `+`, put into a list or map literal, or produced by `map` costs its
//!   size: 1 per value (lists and maps counted with every element), plus 1 per 64 bytes of
//!   text or bytes;
//! - `matches()` costs 1 plus 1 per 64 bytes of the text searched, and
//!   [`DYNAMIC_PATTERN_COST`] more when its pattern is not a literal and not in the
//!   thread's cache;
//! - the CPU time is the evaluating thread's own (`CLOCK_THREAD_CPUTIME_ID` on Linux, wall
//!   time elsewhere), read at most every [`CPU_CLOCK_EVERY`] of wall time: an evaluation
//!   waiting for the CPU (the evaluation threads yield it to requests) is not charged for
//!   the wait, so whether a Filter passes does not depend on how busy the machine is.
//!
//! Invariants:
//! - once an evaluation is over its budget it stays over: every later checkpoint fails at
//!   once, and its result is the budget error even where CEL's `||` or `&&` would have
//!   absorbed an error;
//! - a regular expression is never compiled per call: a literal pattern is compiled
//!   once with its expression, a pattern computed at run time is compiled within
//!   `cel.regexSizeLimit` into a small per-thread cache.

use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cel::common::types::{self, CelBool, CelBytes, CelList, CelMap, CelMapKey, CelString};
use cel::common::value::{CowVal, Val};
use cel::{Env, ExecutionError};

use super::expr::CompiledExpr;

/// Bounds on one evaluation (see the module documentation for what costs what).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Cost units one evaluation may spend (`cel.maxCost`).
    pub max_cost: u64,
    /// CPU time one evaluation may use (`cel.maxCpuTime`).
    pub max_cpu_time: Duration,
    /// Largest compiled form of a pattern computed at run time (`cel.regexSizeLimit`).
    pub regex_size_limit: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { max_cost: 100_000, max_cpu_time: Duration::from_millis(50), regex_size_limit: 256 * 1024 }
    }
}

/// What compiling a pattern that is not a literal costs, beyond the match: about as long
/// as a thousand comprehension iterations for a pattern near the default size limit.
pub const DYNAMIC_PATTERN_COST: u64 = 1000;

/// Patterns computed at run time that each thread keeps compiled.
pub const DYNAMIC_PATTERN_CACHE: usize = 16;

/// The compiled literal patterns of one expression, by their text.
pub type Patterns = HashMap<String, regex::Regex>;

/// Compiles `pattern` within `size_limit` (both the program and the lazy DFA's cache).
pub fn compile_pattern(pattern: &str, size_limit: usize) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern).size_limit(size_limit).dfa_size_limit(size_limit).build().map_err(|e| match e {
        regex::Error::CompiledTooBig(limit) => {
            format!("compiles to more than {limit} bytes (cel.regexSizeLimit); make it smaller or more specific")
        }
        other => format!("is not a valid regular expression: {}", other.to_string().trim()),
    })
}

/// A pattern computed at run time, the size limit it was compiled within, and what that
/// gave.
type CachedPattern = (String, usize, Result<regex::Regex, String>);

/// How often (in wall time) a checkpoint reads the thread's CPU clock, which on Linux
/// takes a system call; the other checkpoints read the cheap wall clock only.
pub const CPU_CLOCK_EVERY: Duration = Duration::from_millis(1);

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
    }
    #[cfg(not(target_os = "linux"))]
    {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
}

/// Why an evaluation was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exceeded {
    Cost,
    Time,
}

/// The meter of the evaluation running on this thread.
struct Meter {
    budget: Budget,
    /// The thread's CPU time when the evaluation started.
    cpu_started: Duration,
    /// When the CPU clock was last read.
    cpu_read_at: Instant,
    spent: u64,
    exceeded: Option<Exceeded>,
    /// The literal patterns of the expression running now.
    patterns: Option<Arc<Patterns>>,
}

impl Meter {
    fn start(budget: Budget) -> Meter {
        Meter {
            budget,
            cpu_started: thread_cpu_time(),
            cpu_read_at: Instant::now(),
            spent: 0,
            exceeded: None,
            patterns: None,
        }
    }

    /// Reads the CPU clock (`always`, or once [`CPU_CLOCK_EVERY`] passed since it was last
    /// read) and notes when the time budget is spent.
    fn check_time(&mut self, always: bool) {
        let now = Instant::now();
        if self.exceeded.is_some() || (!always && now.duration_since(self.cpu_read_at) < CPU_CLOCK_EVERY) {
            return;
        }
        self.cpu_read_at = now;
        if thread_cpu_time().saturating_sub(self.cpu_started) > self.budget.max_cpu_time {
            self.exceeded = Some(Exceeded::Time);
        }
    }

    fn charge(&mut self, units: u64) -> Result<(), ExecutionError> {
        self.spent = self.spent.saturating_add(units);
        if self.exceeded.is_none() && self.spent > self.budget.max_cost {
            self.exceeded = Some(Exceeded::Cost);
        }
        self.check_time(false);
        match self.exceeded {
            None => Ok(()),
            Some(_) => Err(ExecutionError::function_error("budget", self.message())),
        }
    }

    fn remaining(&self) -> u64 {
        self.budget.max_cost.saturating_sub(self.spent)
    }

    fn message(&self) -> String {
        match self.exceeded {
            Some(Exceeded::Time) => format!(
                "the expression used more than its {} of CPU time (cel.maxCpuTime)",
                crate::duration::DurationText(self.budget.max_cpu_time)
            ),
            _ => format!("the expression exceeded its budget of {} cost units (cel.maxCost)", self.budget.max_cost),
        }
    }
}

thread_local! {
    static METER: RefCell<Option<Meter>> = const { RefCell::new(None) };
    /// Patterns computed at run time, compiled, most recently used last.
    static DYNAMIC: RefCell<Vec<CachedPattern>> = const { RefCell::new(Vec::new()) };
    /// The standard functions, registered once per thread: building them is most of the
    /// cost of a fresh `cel::Context`. Evaluations work in inner scopes of it.
    static ROOT: cel::Context<'static, 'static> = cel::Context::with_env(Arc::new(env()));
}

/// Runs `f` with this thread's root context (standard functions, no variables), for
/// inner scopes whose variables may borrow for `'v` (see [`super::expr::json_val`]).
pub fn with_root<'v, R>(f: impl FnOnce(&cel::Context<'v, 'v>) -> R) -> R {
    ROOT.with(|root| f(root))
}

/// The standard library, our `matches()` and the cost checkpoint.
fn env() -> Env {
    let mut env = Env::stdlib();
    let string = || types::STRING_TYPE;
    env.add_overload(super::cost::COST, "cost_checkpoint", vec![types::DYN_TYPE], checkpoint)
        .expect("the checkpoint is declared once");
    env.add_overload("matches", "matches", vec![string(), string()], matches)
        .expect("matches is ours: the cel crate's regex feature is off");
    env.add_member_overload("matches", "string_matches", string(), vec![string()], matches)
        .expect("matches is ours: the cel crate's regex feature is off");
    env
}

/// Runs `f` on the meter of this thread's evaluation; without one, refuses to go on (an
/// expression never runs unmetered).
fn with_meter<R>(f: impl FnOnce(&mut Meter) -> Result<R, ExecutionError>) -> Result<R, ExecutionError> {
    METER.with(|meter| match meter.borrow_mut().as_mut() {
        Some(meter) => f(meter),
        None => Err(ExecutionError::function_error("budget", "no evaluation is running on this thread")),
    })
}

/// The cost checkpoint: charges the size of its argument and passes it through.
fn checkpoint<'b, 'v>(mut args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let value = args.pop().ok_or_else(|| ExecutionError::invalid_argument_count(1, 0))?;
    with_meter(|meter| {
        let units = size(value.as_ref(), meter.remaining());
        meter.charge(units)
    })?;
    Ok(value)
}

/// Cost units of `value` (see the module documentation), counted up to just over `cap`.
fn size(value: &dyn Val, cap: u64) -> u64 {
    let text = |len: usize| len as u64 / 64;
    let mut total = 0u64;
    let mut pending: Vec<&dyn Val> = vec![value];
    while let Some(v) = pending.pop() {
        total += 1;
        if let Some(s) = v.downcast_ref::<CelString>() {
            total += text(s.inner().len());
        } else if let Some(b) = v.downcast_ref::<CelBytes>() {
            total += text(b.inner().len());
        } else if let Some(list) = v.downcast_ref::<CelList>() {
            if total + list.inner().len() as u64 > cap {
                return cap + 1;
            }
            pending.extend(list.inner().iter().map(|e| e.as_ref()));
        } else if let Some(map) = v.downcast_ref::<CelMap>() {
            if total + 2 * map.inner().len() as u64 > cap {
                return cap + 1;
            }
            for (key, value) in map.inner() {
                total += 1 + if let CelMapKey::String(s) = key { text(s.inner().len()) } else { 0 };
                pending.push(value.as_ref());
            }
        }
        if total > cap {
            return total;
        }
    }
    total
}

/// `text.matches(pattern)` and `matches(text, pattern)`.
fn matches<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let (Some(text), Some(pattern)) = (
        args.first().and_then(|a| a.downcast_ref::<CelString>()),
        args.get(1).and_then(|a| a.downcast_ref::<CelString>()),
    ) else {
        return Err(ExecutionError::no_such_overload("matches", vec!["string".into(), "string".into()]));
    };
    let (text, pattern) = (text.inner(), pattern.inner());
    let failed = |message: String| ExecutionError::function_error("matches", format!("the pattern {message}"));
    let (literal, size_limit) = with_meter(|meter| {
        meter.charge(1 + text.len() as u64 / 64)?;
        Ok((meter.patterns.as_ref().and_then(|p| p.get(pattern).cloned()), meter.budget.regex_size_limit))
    })?;
    let regex = match literal {
        Some(regex) => regex,
        None => match cached(pattern, size_limit) {
            Some(found) => found.map_err(failed)?,
            None => {
                with_meter(|meter| meter.charge(DYNAMIC_PATTERN_COST + pattern.len() as u64 / 64))?;
                let compiled = compile_pattern(pattern, size_limit);
                remember(pattern, size_limit, compiled.clone());
                // Compiling took time: look at the clock before the search.
                with_meter(|meter| {
                    meter.check_time(true);
                    meter.charge(0)
                })?;
                compiled.map_err(failed)?
            }
        },
    };
    Ok(CowVal::owned(CelBool::from(regex.is_match(text))))
}

fn cached(pattern: &str, size_limit: usize) -> Option<Result<regex::Regex, String>> {
    DYNAMIC.with(|cache| {
        let mut cache = cache.borrow_mut();
        let at = cache.iter().position(|(p, limit, _)| p == pattern && *limit == size_limit)?;
        let entry = cache.remove(at);
        let found = entry.2.clone();
        cache.push(entry);
        Some(found)
    })
}

fn remember(pattern: &str, size_limit: usize, compiled: Result<regex::Regex, String>) {
    DYNAMIC.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() >= DYNAMIC_PATTERN_CACHE {
            drop(cache.remove(0));
        }
        cache.push((pattern.to_owned(), size_limit, compiled));
    });
}

/// One metered evaluation on this thread: a Filter, an ordering key, or every expression
/// of one policy decision. Its budget is shared by everything [`Evaluation::execute`]
/// runs until it is dropped, and the CPU time this thread uses meanwhile counts (binding
/// variables included).
///
/// **Warning**: the meter is thread-local; an `Evaluation` cannot leave its thread.
pub struct Evaluation {
    /// The evaluation this one interrupted (an evaluation inside another), put back on drop.
    outer: Option<Meter>,
    _thread: PhantomData<*const ()>,
}

impl Evaluation {
    pub fn start(budget: Budget) -> Evaluation {
        let outer = METER.with(|m| m.borrow_mut().replace(Meter::start(budget)));
        Evaluation { outer, _thread: PhantomData }
    }

    /// Runs `program` in `context`. The interpreter is third-party code: a panic in it is
    /// an error, never a crash. Over the budget (now or earlier in this evaluation), the
    /// error says which bound was passed, whatever the expression made of it.
    pub fn execute(&self, program: &CompiledExpr, context: &cel::Context<'_, '_>) -> Result<cel::Value, String> {
        if let Some(message) = self.exceeded() {
            return Err(message);
        }
        METER.with(|m| {
            if let Some(meter) = m.borrow_mut().as_mut() {
                meter.patterns = Some(program.patterns.clone());
            }
        });
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| cel::Value::resolve(&program.expr, context)));
        METER.with(|m| {
            if let Some(meter) = m.borrow_mut().as_mut() {
                meter.patterns = None;
            }
        });
        if let Some(message) = self.exceeded() {
            return Err(message);
        }
        result.map_err(|_| "the expression panicked".to_owned())?.map_err(|e| e.to_string())
    }

    /// Why this evaluation was stopped, if it was.
    pub fn exceeded(&self) -> Option<String> {
        METER.with(|m| {
            let mut meter = m.borrow_mut();
            let meter = meter.as_mut()?;
            meter.check_time(true);
            meter.exceeded.map(|_| meter.message())
        })
    }

    /// Cost units spent so far.
    pub fn spent(&self) -> u64 {
        METER.with(|m| m.borrow().as_ref().map_or(0, |meter| meter.spent))
    }
}

impl Drop for Evaluation {
    fn drop(&mut self) {
        let outer = self.outer.take();
        METER.with(|m| *m.borrow_mut() = outer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::expr::{compile, json_val, Limits};
    use serde_json::{json, Value};

    /// Runs `source` over `event` in `evaluation`.
    fn run_in(evaluation: &Evaluation, source: &str, event: &Value) -> Result<cel::Value, String> {
        let program = compile(source, &["event"], &Limits::default()).unwrap();
        with_root(|root| {
            let mut context = root.new_inner_scope();
            context.add_variable_as_val("event", json_val(event));
            evaluation.execute(&program, &context)
        })
    }

    fn run(source: &str, event: &Value, budget: Budget) -> Result<cel::Value, String> {
        run_in(&Evaluation::start(budget), source, event)
    }

    fn costing(max_cost: u64) -> Budget {
        Budget { max_cost, max_cpu_time: Duration::from_secs(60), ..Budget::default() }
    }

    const OVER_COST: &str = "the expression exceeded its budget of 1000 cost units (cel.maxCost)";

    #[test]
    fn a_loop_stops_at_the_cost_budget_while_it_runs() {
        let event = json!({"data": {"a": vec![0; 5000]}});
        assert_eq!(run("event.data.a.all(x, x >= 0)", &event, costing(10_000)), Ok(cel::Value::Bool(true)));
        assert_eq!(run("event.data.a.all(x, x >= 0)", &event, costing(1000)), Err(OVER_COST.to_owned()));
        assert_eq!(run("event.data.a.exists_one(x, x > 0)", &event, costing(1000)), Err(OVER_COST.to_owned()));
        // The budget error stands even where `||` would absorb an error.
        assert_eq!(run("event.data.a.all(x, x >= 0) || true", &event, costing(1000)), Err(OVER_COST.to_owned()));
    }

    #[test]
    fn a_loop_stops_at_its_cpu_time_while_it_runs() {
        let event = json!({"data": {"a": (0..20_000).collect::<Vec<_>>()}});
        let budget = Budget { max_cost: u64::MAX, max_cpu_time: Duration::from_millis(5), ..Budget::default() };
        let started = Instant::now();
        let result = run("event.data.a.all(x, x in event.data.a)", &event, budget);
        assert_eq!(result, Err("the expression used more than its 5ms of CPU time (cel.maxCpuTime)".to_owned()));
        // Not a speed check: without the time budget this runs for minutes in a debug build.
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    }

    #[test]
    fn values_built_are_charged_by_their_size_before_they_pile_up() {
        let event = json!({"data": {"a": vec![0; 500], "s": "x".repeat(64 * 1000)}});
        // Each of the 500 results holds the whole list: 250,000 values.
        assert!(run("size(event.data.a.map(x, event.data.a)) > 0", &event, costing(100_000)).is_err());
        assert!(run("size(event.data.a.map(x, x)) == 500", &event, costing(100_000)).is_ok());
        // A text of 64,000 bytes costs 1,001 units; doubling it, 2,001.
        assert!(run("size(event.data.s + event.data.s) > 0", &event, costing(2_000)).is_err());
        assert!(run("size(event.data.s + event.data.s) > 0", &event, costing(2_100)).is_ok());
        assert!(run("size([event.data.a, event.data.a]) == 2", &event, costing(1000)).is_err());
        assert!(run("size({'a': event.data.a}) == 1", &event, costing(1000)).is_ok());
    }

    #[test]
    fn an_evaluation_over_its_budget_stays_over_it() {
        let event = json!({"data": {"a": vec![0; 2000]}});
        let evaluation = Evaluation::start(costing(1000));
        assert_eq!(run_in(&evaluation, "event.data.a.all(x, x >= 0)", &event), Err(OVER_COST.to_owned()));
        assert_eq!(run_in(&evaluation, "true", &event), Err(OVER_COST.to_owned()), "nothing more runs");
        assert_eq!(run("true", &event, costing(1000)), Ok(cel::Value::Bool(true)), "a new one starts afresh");
    }

    #[test]
    fn an_evaluation_inside_another_gives_the_outer_one_back() {
        let event = json!({"data": {"a": vec![0; 600]}});
        let outer = Evaluation::start(costing(1000));
        assert!(run_in(&outer, "event.data.a.all(x, x >= 0)", &event).is_ok());
        let spent = outer.spent();
        assert!(run("event.data.a.all(x, x >= 0)", &event, costing(100)).is_err());
        assert_eq!(outer.spent(), spent, "the inner evaluation had a meter of its own");
        assert_eq!(run_in(&outer, "event.data.a.all(x, x >= 0)", &event), Err(OVER_COST.to_owned()));
    }

    #[test]
    fn literal_patterns_compile_with_their_expression_within_the_size_limit() {
        let limits = Limits::default();
        let invalid = compile("event.source.matches('(foo')", &["event"], &limits).unwrap_err();
        assert!(invalid.starts_with("the pattern `(foo` of matches() is not a valid regular expression"), "{invalid}");
        let huge = compile(r"matches(event.source, '\\pL{500}')", &["event"], &limits).unwrap_err();
        assert!(huge.ends_with("bytes (cel.regexSizeLimit); make it smaller or more specific"), "{huge}");
        let many: Vec<String> = (0..9).map(|i| format!("event.source.matches('a{i}')")).collect();
        let refused = compile(&many.join(" || "), &["event"], &limits).unwrap_err();
        assert!(refused.contains("(cel.maxPatterns)"), "{refused}");

        let event = json!({"source": "shop-42", "data": {}});
        let evaluation = Evaluation::start(Budget::default());
        let source = "event.source.matches('^shop-[0-9]+$') && matches(event.source, 'shop')";
        assert_eq!(run_in(&evaluation, source, &event), Ok(cel::Value::Bool(true)));
        assert!(evaluation.spent() < DYNAMIC_PATTERN_COST, "literal patterns were not compiled again");
    }

    #[test]
    fn patterns_from_data_are_size_limited_and_compiled_once_per_thread() {
        let event = json!({"data": {"t": "abc", "p": "^a.c$", "huge": r"\pL{500}", "bad": "(x"}});
        let evaluation = Evaluation::start(Budget::default());
        assert_eq!(run_in(&evaluation, "event.data.t.matches(event.data.p)", &event), Ok(cel::Value::Bool(true)));
        let first = evaluation.spent();
        assert!(first >= DYNAMIC_PATTERN_COST, "{first}");
        assert_eq!(run_in(&evaluation, "event.data.t.matches(event.data.p)", &event), Ok(cel::Value::Bool(true)));
        assert!(evaluation.spent() - first < 10, "the second call found it compiled");
        let huge = run_in(&evaluation, "event.data.t.matches(event.data.huge)", &event).unwrap_err();
        assert!(huge.contains("(cel.regexSizeLimit)"), "{huge}");
        let bad = run_in(&evaluation, "event.data.t.matches(event.data.bad)", &event).unwrap_err();
        assert!(bad.contains("is not a valid regular expression"), "{bad}");
        // Every call of a loop over distinct patterns pays for its compile.
        let patterns: Vec<String> = (0..200).map(|i| format!("^x{i}$")).collect();
        let event = json!({"data": {"t": "abc", "p": patterns}});
        let over = run("event.data.p.exists(p, event.data.t.matches(p))", &event, Budget::default());
        assert_eq!(over, Err("the expression exceeded its budget of 100000 cost units (cel.maxCost)".to_owned()));
    }
}
