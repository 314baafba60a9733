//! Logging set-up: human-readable by default, one JSON object per line with `--log-format
//! json`; `RUST_LOG` filters (default `info`). Logs go to standard error so that commands
//! whose output is data (`hookwarden token`) keep standard output clean.
//!
//! Metrics: the `metrics` facade with a Prometheus recorder, rendered by `GET /metrics`.
//! Names are `hookwarden_<subsystem>_<name>_{total,seconds}`; labels come from bounded
//! sets only (route templates, outcome and state names, endpoint names from resources).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it twice is harmless (the second is ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// The process's Prometheus recorder, installed on first use.
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
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests): then ours only renders zeros.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}
