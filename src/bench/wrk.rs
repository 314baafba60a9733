//! The closed-loop load of `bench deliver --closed-loop-wrk`: `wrk` (an external load
//! generator, `apt-get install wrk`) running `bench/wrk-post-events.lua` against the server
//! under test, and what its summary says.
//!
//! The script is built into the binary, so the bench does not depend on where it is run
//! from; the file in `bench/` is the same script, for running wrk by hand.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};

const SCRIPT: &str = include_str!("../../bench/wrk-post-events.lua");

/// How a wrk run went, from the line the script's `done` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WrkSummary {
    pub(super) requests: u64,
    /// Answered `202`: accepted, so durably stored and due to be delivered.
    pub(super) accepted: u64,
    /// Answered anything else.
    pub(super) refused: u64,
    pub(super) duration: Duration,
    pub(super) p50: Duration,
    pub(super) p90: Duration,
    pub(super) p99: Duration,
    pub(super) max: Duration,
    /// Connect, read and write errors.
    pub(super) socket_errors: u64,
    /// Requests with no answer within wrk's `--timeout`: the server may still have
    /// accepted them.
    pub(super) timeouts: u64,
}

/// What wrk is asked to do.
pub(super) struct WrkLoad<'a> {
    pub(super) url: &'a str,
    pub(super) token: &'a str,
    pub(super) threads: usize,
    pub(super) connections: usize,
    pub(super) seconds: u64,
    /// Approximate body size in bytes.
    pub(super) size: usize,
    /// Makes the event ids distinct from other runs'.
    pub(super) run: &'a str,
}

/// Runs wrk to the end of its duration (the child is killed if this future is dropped).
pub(super) async fn run(load: &WrkLoad<'_>, scratch: &std::path::Path) -> anyhow::Result<WrkSummary> {
    let script = scratch.join("wrk-post-events.lua");
    std::fs::write(&script, SCRIPT)?;
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .arg("--latency")
        // Answers slower than wrk's default 2 s would be counted as errors though the
        // server may have accepted the event: count them as latency instead.
        .args(["--timeout", "10s"])
        .arg("-s")
        .arg(&script)
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", load.token))
        .arg(load.url)
        .arg("--")
        .arg(load.run)
        .arg(load.size.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run wrk (Debian: apt-get install wrk)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("wrk failed ({}): {stdout}", output.status);
    }
    parse_summary(&stdout).with_context(|| format!("no hookwarden-wrk line in wrk's output:\n{stdout}"))
}

/// Reads the `hookwarden-wrk key=value …` line of the script's `done`.
fn parse_summary(stdout: &str) -> Option<WrkSummary> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("hookwarden-wrk "))?;
    let fields: BTreeMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect::<Option<_>>()?;
    let field = |name: &str| fields.get(name).copied();
    let micros = |name: &str| field(name).map(Duration::from_micros);
    Some(WrkSummary {
        requests: field("requests")?,
        accepted: field("accepted")?,
        refused: field("refused")?,
        duration: micros("duration_us")?,
        p50: micros("p50_us")?,
        p90: micros("p90_us")?,
        p99: micros("p99_us")?,
        max: micros("max_us")?,
        socket_errors: field("connect_errors")? + field("read_errors")? + field("write_errors")?,
        timeouts: field("timeouts")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_summary_line_is_read_among_wrks_own_output() {
        let stdout = "Running 20s test @ http://127.0.0.1:1/v1/events\n  2 threads and 32 connections\n\
            hookwarden-wrk requests=36010 accepted=36000 refused=10 duration_us=20004000 p50_us=17012 p90_us=30000 \
            p99_us=55100 max_us=210000 connect_errors=1 read_errors=2 write_errors=3 timeouts=4\n";
        let summary = parse_summary(stdout).unwrap();
        assert_eq!(
            summary,
            WrkSummary {
                requests: 36_010,
                accepted: 36_000,
                refused: 10,
                duration: Duration::from_micros(20_004_000),
                p50: Duration::from_micros(17_012),
                p90: Duration::from_micros(30_000),
                p99: Duration::from_micros(55_100),
                max: Duration::from_micros(210_000),
                socket_errors: 6,
                timeouts: 4,
            }
        );
    }

    #[test]
    fn a_summary_with_a_missing_or_unreadable_field_is_refused() {
        assert_eq!(parse_summary("Requests/sec: 1800\n"), None);
        assert_eq!(parse_summary("hookwarden-wrk requests=1 accepted=1\n"), None);
        let unreadable = "hookwarden-wrk requests=x accepted=1 refused=0 duration_us=1 p50_us=1 p90_us=1 \
            p99_us=1 max_us=1 connect_errors=0 read_errors=0 write_errors=0 timeouts=0\n";
        assert_eq!(parse_summary(unreadable), None);
    }
}
