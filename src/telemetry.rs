//! Logging set-up: human-readable by default, one JSON object per line with `--log-format
//! json`; `RUST_LOG` filters (default `info`). Logs go to standard error so that commands
//! whose output is data (`hookwarden token`) keep standard output clean. In both formats
//! one event is one line: the human format escapes control characters in field values
//! and messages (see `escape`), as JSON does.
//!
//! Metrics: the `metrics` facade with a Prometheus recorder, rendered by `GET /metrics`.
//! Names are `hookwarden_<subsystem>_<name>_{total,seconds}`; labels come from bounded
//! sets only (route templates, outcome and state names, endpoint and rule names from
//! resources). [`backlog`] samples the delivery backlog into its gauges, and for ingest's
//! backpressure.
//!
//! Invariants, which `promtool check metrics` and `tests/metrics.rs` hold us to:
//! - every family the code emits is listed once in [`FAMILIES`], with its kind, unit and
//!   help text, and so has a `# HELP` line;
//! - counters end in `_total`, nothing else does; durations are in seconds and say so;
//! - the counters' known label sets exist at 0 from start-up (and those of AgentRules
//!   from when the rule is loaded), so that `increase()` counts the first event after a
//!   restart instead of taking it for the series' first sample.

pub mod backlog;
mod escape;

use metrics::Unit;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it twice is harmless (the second is ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    let _ = match format {
        // Field values come from requests: escaped, so that none can forge a line.
        LogFormat::Human => builder.fmt_fields(escape::EscapedFields).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// The Prometheus type of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The word `# TYPE` lines use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A label set, as `(label, value)` pairs.
pub type Labels = &'static [(&'static str, &'static str)];

/// One metric family: what `# HELP` says of it, and which of its series exist from start-up.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub help: &'static str,
    /// Counter series registered at 0 when the recorder is installed. Only label sets
    /// that are known before any traffic: outcome names, never values from requests.
    pub zeros: &'static [Labels],
}

const fn family(name: &'static str, kind: Kind, unit: Unit, help: &'static str) -> Family {
    Family { name, kind, unit, help, zeros: &[] }
}

const fn counter(name: &'static str, help: &'static str, zeros: &'static [Labels]) -> Family {
    Family { name, kind: Kind::Counter, unit: Unit::Count, help, zeros }
}

/// Outcomes of a policy decision, as the `outcome` label of `hookwarden_policy_decisions_total`.
pub const DECISION_OUTCOMES: [&str; 3] = ["allow", "hold", "deny"];

/// Every metric family Hookwarden emits. `tests/metrics.rs` fails when code emits a
/// family that is missing here.
pub const FAMILIES: &[Family] = &[
    // HTTP
    counter(
        "hookwarden_http_requests_total",
        "HTTP requests answered, by route template, method and status code.",
        &[],
    ),
    family(
        "hookwarden_http_request_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time to answer an HTTP request, in seconds, by route template.",
    ),
    // Ingest and fan-out
    counter(
        "hookwarden_ingest_events_total",
        "Events ingested, by outcome: accepted (stored, fanned out) duplicate (a repeated source and id or idempotency key; nothing new fanned out) or over_quota (refused with 429 by the namespace's quotas.ingest; nothing written).",
        &[&[("outcome", "accepted")], &[("outcome", "duplicate")], &[("outcome", "over_quota")]],
    ),
    counter(
        "hookwarden_ingest_deprecated_total",
        "Events accepted whose type's EventType is deprecated, by type (the EventType's name: a bounded set, the applied types).",
        &[],
    ),
    counter(
        "hookwarden_fanout_errors_total",
        "Events whose fan-out to an endpoint could not be decided, by namespace and endpoint: a Filter that failed or exceeded its evaluation budget (the endpoint was skipped) or an ordering key that did (sent in the (no key) lane).",
        &[],
    ),
    // Delivery
    counter(
        "hookwarden_delivery_attempts_total",
        "Delivery attempts made, by outcome: delivered, retry, failed or dead.",
        &[&[("outcome", "delivered")], &[("outcome", "retry")], &[("outcome", "failed")], &[("outcome", "dead")]],
    ),
    family(
        "hookwarden_delivery_attempt_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Duration of a delivery attempt, in seconds, from sending the request to reading the answer, by outcome.",
    ),
    counter("hookwarden_delivery_retries_total", "Delivery attempts that failed and were scheduled for a retry.", &[&[]]),
    counter(
        "hookwarden_delivery_transform_failures_total",
        "Deliveries failed unsent because their endpoint's transform could not build the body (a CEL error, a result that is not a map or a list, or its evaluation budget exceeded), by namespace and endpoint.",
        &[],
    ),
    counter(
        "hookwarden_operational_events_total",
        "Operational events (hookwarden.*) fanned out, by type.",
        &[
            &[("type", "hookwarden.endpoint.failing")],
            &[("type", "hookwarden.endpoint.breaker_opened")],
            &[("type", "hookwarden.endpoint.breaker_closed")],
            &[("type", "hookwarden.endpoint.disabled")],
            &[("type", "hookwarden.endpoint.enabled")],
            &[("type", "hookwarden.endpoint.secret_unavailable")],
            &[("type", "hookwarden.delivery.dead")],
            &[("type", "hookwarden.dead_letters.threshold")],
            &[("type", "hookwarden.agent.spend_limit_reached")],
            &[("type", "hookwarden.approval.requested")],
            &[("type", "hookwarden.approval.decided")],
            &[("type", "hookwarden.approval.expiring")],
            &[("type", "hookwarden.approval.expired")],
        ],
    ),
    counter(
        "hookwarden_operational_unreadable_events_total",
        "Rows of the outbox of operational events that do not read as an event: logged with their id and skipped (once per process), so that they hold up no other.",
        &[&[]],
    ),
    counter(
        "hookwarden_operational_dead_deliveries_total",
        "Deliveries of operational events that ended dead, by namespace and endpoint: logged and counted instead of told as operational events, which could loop.",
        &[],
    ),
    family(
        "hookwarden_delivery_claim_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Duration of one claim of due deliveries (one database statement on PostgreSQL), in seconds.",
    ),
    family(
        "hookwarden_delivery_completion_write_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Duration of one write of a batch of attempt results (one transaction), in seconds.",
    ),
    counter(
        "hookwarden_delivery_given_back_total",
        "Claimed deliveries given back unattempted, by reason: paused or blocked (the catalog changed after the claim was planned), busy (no slot free after all).",
        &[&[("reason", "paused")], &[("reason", "blocked")], &[("reason", "busy")]],
    ),
    counter(
        "hookwarden_delivery_dead_letters_total",
        "Deliveries that became dead: out of attempts, older than deadLetterAfter, or over the endpoint's retriesPerHour.",
        &[&[]],
    ),
    family(
        "hookwarden_delivery_queue_depth",
        Kind::Gauge,
        Unit::Count,
        "Deliveries waiting to be sent (pending or retrying).",
    ),
    family(
        "hookwarden_delivery_oldest_pending_seconds",
        Kind::Gauge,
        Unit::Seconds,
        "Age in seconds of the oldest delivery waiting to be sent; 0 when none waits.",
    ),
    family(
        "hookwarden_deliveries",
        Kind::Gauge,
        Unit::Count,
        "Deliveries in each state that is still moving: pending, delivering, retrying, held.",
    ),
    family(
        "hookwarden_delivery_waiting",
        Kind::Gauge,
        Unit::Count,
        "Deliveries waiting (pending or retrying), by why: scheduled (due at their time), paused, disabled, breaker_open, secret_unavailable, reference_not_found, endpoint_deleted.",
    ),
    family(
        "hookwarden_delivery_breakers_open",
        Kind::Gauge,
        Unit::Count,
        "Endpoints whose circuit breaker is open now (disabled endpoints are counted by hookwarden_delivery_endpoints_disabled instead).",
    ),
    family(
        "hookwarden_delivery_endpoints_disabled",
        Kind::Gauge,
        Unit::Count,
        "Endpoints disabled because they answered 410 Gone; each is enabled again when its spec changes.",
    ),
    // Policy gate and approvals
    counter(
        "hookwarden_policy_decisions_total",
        "Policy decisions on agent deliveries, by outcome (allow, hold, deny) and deciding rule.",
        &[&[("outcome", "deny"), ("rule", "(default)")], &[("outcome", "allow"), ("rule", "(approved)")], &[
            ("outcome", "deny"),
            ("rule", "(spend contention)"),
        ]],
    ),
    counter("hookwarden_policy_holds_total", "Agent deliveries held for human approval.", &[&[]]),
    counter(
        "hookwarden_policy_approvals_total",
        "Approval requests closed, by outcome: granted, denied or expired.",
        &[&[("outcome", "granted")], &[("outcome", "denied")], &[("outcome", "expired")]],
    ),
    family(
        "hookwarden_policy_approvals_pending",
        Kind::Gauge,
        Unit::Count,
        "Approval requests waiting for a decision.",
    ),
    family(
        "hookwarden_policy_approval_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time in seconds from an approval request to its decision, by outcome.",
    ),
    family(
        "hookwarden_policy_decision_write_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Duration of one write of a batch of the policy gate's allow and hold decisions (one transaction), in seconds.",
    ),
    family(
        "hookwarden_policy_decision_batch_size",
        Kind::Histogram,
        Unit::Count,
        "Allow and hold decisions committed in one transaction by the decision writer.",
    ),
    counter(
        "hookwarden_policy_spend_reserved_total",
        "Spend reserved by allow decisions, in minor units of the currency, by namespace, agent endpoint and currency; a delivery allowed again after a retry reserves again.",
        &[],
    ),
    counter(
        "hookwarden_policy_spend_committed_total",
        "Spend committed in the ledger (the delivery was delivered), in minor units of the currency, by namespace, agent endpoint and currency.",
        &[],
    ),
    // Retention
    counter(
        "hookwarden_retention_deleted_total",
        "Rows deleted by retention, by table: events (with their deliveries and attempts, once every delivery is final), deliveries (those of deleted events, and dead ones past retention.deadLetters), delivery_attempts, event_identities (those of the deleted events).",
        &[],
    ),
    // Periodic jobs
    counter(
        "hookwarden_jobs_runs_total",
        "Runs of the periodic jobs, by job and outcome: ok, failed (logged; the job runs again at its next period) or fenced (a leader-only write found this process's term over, and the process stepped down).",
        &[],
    ),
    // Audit
    family(
        "hookwarden_audit_chain_length",
        Kind::Gauge,
        Unit::Count,
        "Records in each audit chain (its head's sequence number), published by the leader.",
    ),
];

/// The family called `name`, if Hookwarden emits one.
pub fn family_named(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// The process's Prometheus recorder, installed on first use, with every family described
/// and the known counter series at 0.
/// The buckets of the dispatcher's database round trips (claims, completion writes): they
/// take milliseconds, and issue 11's target is a claim p99 under 20 ms.
const CLAIM_BUCKETS: [f64; 11] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0];

pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
            .expect("static buckets are valid")
            // Humans answer approval requests in minutes or hours, not milliseconds.
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("hookwarden_policy_approval_seconds".into()),
                &[10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4.0 * 3600.0, 24.0 * 3600.0],
            )
            .expect("static buckets are valid")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("hookwarden_delivery_claim_seconds".into()),
                &CLAIM_BUCKETS,
            )
            .expect("static buckets are valid")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("hookwarden_delivery_completion_write_seconds".into()),
                &CLAIM_BUCKETS,
            )
            .expect("static buckets are valid")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("hookwarden_policy_decision_write_seconds".into()),
                &CLAIM_BUCKETS,
            )
            .expect("static buckets are valid")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("hookwarden_policy_decision_batch_size".into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            )
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests): then ours only renders zeros.
        let _ = metrics::set_global_recorder(recorder);
        describe_families();
        handle
    })
}

/// Describes every family and registers the known counter series at 0.
fn describe_families() {
    for family in FAMILIES {
        match family.kind {
            Kind::Counter => metrics::describe_counter!(family.name, family.unit, family.help),
            Kind::Gauge => metrics::describe_gauge!(family.name, family.unit, family.help),
            Kind::Histogram => metrics::describe_histogram!(family.name, family.unit, family.help),
        }
        for labels in family.zeros {
            // `increment(0)` registers the series without touching a value it already has.
            metrics::counter!(family.name, *labels).increment(0);
        }
    }
}

/// Registers `hookwarden_policy_decisions_total` at 0 for every outcome of each of `rules`
/// (AgentRule names), so that a rule's first decision after a restart or an apply is seen
/// by `increase()`. Harmless to call again for rules already registered.
pub fn register_rules<'a>(rules: impl IntoIterator<Item = &'a str>) {
    for rule in rules {
        for outcome in DECISION_OUTCOMES {
            metrics::counter!("hookwarden_policy_decisions_total", "outcome" => outcome, "rule" => rule.to_owned())
                .increment(0);
        }
    }
}
