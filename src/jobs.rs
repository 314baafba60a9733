//! Periodic jobs: one loop that every job of `serve` runs in, so that each job's module
//! holds only what one run does.
//!
//! A [`Job`] says what one run does and, in its [`Schedule`], its name, its period,
//! whether it runs on the leader only, and whether its first run waits a period. [`run`]
//! drives it until shutdown. Invariants:
//! - a leader-only job runs only while this process holds a term, and each run is given
//!   that term to fence its writes with; while it does not lead, it waits for a term
//!   without polling;
//! - shutdown is seen at once while a job waits; a run in progress is not cancelled (each
//!   store call is bounded by `database.acquireTimeout`), and no run starts after it;
//! - a failed run is logged once (with the job's name) and counted in
//!   `hookwarden_jobs_runs_total{outcome="failed"}`; the loop goes on at the next period.
//!   A run whose leader-only write found its term over ends the term (see
//!   [`Leadership::fenced`]) and counts as `fenced`, not as a failure.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::controller::leadership::Leadership;
use crate::store::{StoreError, Term};

/// When a job's first run happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstRun {
    /// At once: at start-up, or for a leader-only job as soon as a term begins.
    AtOnce,
    /// After one period (from start-up, or from the beginning of a term).
    AfterPeriod,
}

/// How a job is run.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// A short snake_case name, for logs and the `job` label (a bounded set: one per job).
    pub name: &'static str,
    /// The wait between the end of one run and the start of the next.
    pub period: Duration,
    /// Runs only while this process leads (its writes are fenced by the term).
    pub leader_only: bool,
    pub first_run: FirstRun,
}

/// Why a run failed. [`run`] logs it once and counts it.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A store call failed; `doing` says which, in words (`"reading the audit heads"`).
    #[error("{doing}: {source}")]
    Store {
        doing: &'static str,
        #[source]
        source: StoreError,
    },
    /// Anything else, in words.
    #[error("{0}")]
    Failed(String),
    /// A run over many items met more than one failure and went on; the first is shown.
    #[error("{first} (and {more} more in this run)")]
    Several { first: Box<JobError>, more: usize },
}

impl JobError {
    /// For `map_err`: a store error met while `doing`.
    pub fn store(doing: &'static str) -> impl FnOnce(StoreError) -> JobError {
        move |source| JobError::Store { doing, source }
    }
}

/// The failures of a run that goes on past them (one over many chains, endpoints...),
/// reported as one at its end. A fenced store error ends the run at once instead: the term
/// is over, nothing more may be written in it.
#[derive(Debug, Default)]
pub struct Failures {
    first: Option<JobError>,
    more: usize,
}

impl Failures {
    /// Notes `error`; `Err` when the run must stop now (the term is over).
    pub fn note(&mut self, error: JobError) -> Result<(), JobError> {
        if let JobError::Store { source: StoreError::Fenced { .. }, .. } = error {
            return Err(error);
        }
        match self.first {
            None => self.first = Some(error),
            Some(_) => self.more += 1,
        }
        Ok(())
    }

    /// The run's result: `Ok` when nothing was noted.
    pub fn result(self) -> Result<(), JobError> {
        match (self.first, self.more) {
            (None, _) => Ok(()),
            (Some(first), 0) => Err(first),
            (Some(first), more) => Err(JobError::Several { first: Box::new(first), more }),
        }
    }
}

/// The term a leader-only run is given ([`run`] gives one to every run of such a job).
pub fn leader_term(term: Option<Term>) -> Result<Term, JobError> {
    term.ok_or_else(|| JobError::Failed("a leader-only job ran without a term".into()))
}

/// One periodic job: what one run does.
pub trait Job: Send + 'static {
    fn schedule(&self) -> Schedule;

    /// One run. `term` is `Some` for a leader-only job (the term it runs in: fence every
    /// leader-only write with it) and `None` for the others.
    fn run(&mut self, term: Option<Term>) -> impl Future<Output = Result<(), JobError>> + Send;

    /// Resolves when a run is due before the period ends (a signal the job listens to);
    /// by default never.
    fn due_early(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// What every job of a process shares: the tracker it runs on, the leadership it asks,
/// the shutdown it stops at. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    tracker: TaskTracker,
    leadership: Leadership,
    shutdown: CancellationToken,
}

impl Jobs {
    pub fn new(tracker: &TaskTracker, leadership: Leadership, shutdown: CancellationToken) -> Jobs {
        Jobs { tracker: tracker.clone(), leadership, shutdown }
    }

    /// Runs `job` on the tracker until shutdown.
    pub fn spawn(&self, job: impl Job) {
        self.tracker.spawn(run(job, self.leadership.clone(), self.shutdown.clone()));
    }
}

/// Outcomes of a run, as the `outcome` label of `hookwarden_jobs_runs_total`.
pub const RUN_OUTCOMES: [&str; 3] = ["ok", "failed", "fenced"];

/// Runs `job` by its schedule until `shutdown`.
pub async fn run(mut job: impl Job, leadership: Leadership, shutdown: CancellationToken) {
    let schedule = job.schedule();
    for outcome in RUN_OUTCOMES {
        metrics::counter!("hookwarden_jobs_runs_total", "job" => schedule.name, "outcome" => outcome).increment(0);
    }
    let mut wait = schedule.first_run == FirstRun::AfterPeriod;
    loop {
        if wait {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(schedule.period) => {}
                _ = job.due_early() => {}
            }
        }
        wait = true;
        let term = if schedule.leader_only {
            match leadership.term() {
                Some(term) => Some(term),
                None => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = leadership.acquired() => {}
                    }
                    // A new term: its first run follows the schedule.
                    wait = schedule.first_run == FirstRun::AfterPeriod;
                    continue;
                }
            }
        } else {
            None
        };
        if shutdown.is_cancelled() {
            return;
        }
        let outcome = match job.run(term).await {
            Ok(()) => "ok",
            Err(JobError::Store { source, .. }) if term.is_some_and(|t| leadership.fenced(t, &source)) => "fenced",
            Err(e) => {
                tracing::warn!(job = schedule.name, error = %e, "a periodic job failed; it runs again at its next period");
                "failed"
            }
        };
        metrics::counter!("hookwarden_jobs_runs_total", "job" => schedule.name, "outcome" => outcome).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::{mpsc, Notify};

    use super::*;

    const SOON: Duration = Duration::from_millis(5);
    /// Only a bound on a wait that must end; never reached when the code is right.
    const BOUND: Duration = Duration::from_secs(10);

    /// Reports each run's term on a channel; fails the runs it is told to.
    struct Probe {
        schedule: Schedule,
        runs: mpsc::UnboundedSender<Option<Term>>,
        failures: u32,
        fail_with: fn() -> JobError,
        early: Arc<Notify>,
    }

    fn probe(name: &'static str, period: Duration, leader_only: bool, first_run: FirstRun) -> (Probe, Runs) {
        let (runs, seen) = mpsc::unbounded_channel();
        let schedule = Schedule { name, period, leader_only, first_run };
        let early = Arc::new(Notify::new());
        let job = Probe { schedule, runs, failures: 0, fail_with: || JobError::Failed("boom".into()), early };
        (job, Runs(seen))
    }

    struct Runs(mpsc::UnboundedReceiver<Option<Term>>);

    impl Runs {
        async fn next(&mut self) -> Option<Term> {
            tokio::time::timeout(BOUND, self.0.recv()).await.expect("a run within the bound").expect("the job lives")
        }

        /// No run came during `quiet` (a short wait: proving that something does not
        /// happen takes some time).
        async fn none_during(&mut self, quiet: Duration) -> bool {
            tokio::time::timeout(quiet, self.0.recv()).await.is_err()
        }
    }

    impl Job for Probe {
        fn schedule(&self) -> Schedule {
            self.schedule
        }

        async fn run(&mut self, term: Option<Term>) -> Result<(), JobError> {
            let _ = self.runs.send(term);
            if self.failures > 0 {
                self.failures -= 1;
                return Err((self.fail_with)());
            }
            Ok(())
        }

        fn due_early(&self) -> impl Future<Output = ()> + Send {
            let early = self.early.clone();
            async move { early.notified().await }
        }
    }

    fn spawn(job: Probe, leadership: &Leadership, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
        // The recorder counts from its installation on.
        crate::telemetry::metrics();
        tokio::spawn(run(job, leadership.clone(), shutdown.clone()))
    }

    fn runs_counted(job: &str, outcome: &str) -> f64 {
        let page = crate::telemetry::metrics().render();
        let series = format!("hookwarden_jobs_runs_total{{job=\"{job}\",outcome=\"{outcome}\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.trim().parse().expect("a number"))
            .unwrap_or_else(|| panic!("{series} is not on the page"))
    }

    #[tokio::test]
    async fn shutdown_stops_a_job_that_waits_for_its_period() {
        let (job, mut runs) = probe("test_waits", Duration::from_secs(3600), false, FirstRun::AfterPeriod);
        let shutdown = CancellationToken::new();
        let task = spawn(job, &Leadership::default(), &shutdown);
        shutdown.cancel();
        tokio::time::timeout(BOUND, task).await.expect("stopped without waiting out the period").expect("no panic");
        assert!(runs.0.try_recv().is_err(), "no run happened");
    }

    #[tokio::test]
    async fn a_first_run_at_once_does_not_wait_a_period_and_a_signal_brings_the_next() {
        let (job, mut runs) = probe("test_at_once", Duration::from_secs(3600), false, FirstRun::AtOnce);
        let early = job.early.clone();
        let shutdown = CancellationToken::new();
        let task = spawn(job, &Leadership::default(), &shutdown);
        assert_eq!(runs.next().await, None, "an everywhere job runs without a term");
        early.notify_one();
        assert_eq!(runs.next().await, None);
        shutdown.cancel();
        tokio::time::timeout(BOUND, task).await.expect("stopped").expect("no panic");
    }

    #[tokio::test]
    async fn a_leader_only_job_runs_only_during_a_term_and_is_given_it() {
        let (job, mut runs) = probe("test_leader_only", SOON, true, FirstRun::AtOnce);
        let leadership = Leadership::default();
        let shutdown = CancellationToken::new();
        let task = spawn(job, &leadership, &shutdown);
        assert!(runs.none_during(Duration::from_millis(100)).await, "no run while this process does not lead");
        let term = Term::for_tests(7);
        leadership.lead_for_tests(term);
        assert_eq!(runs.next().await, Some(term));
        assert_eq!(runs.next().await, Some(term), "runs again each period");
        leadership.step_down(term, "test");
        // A run that had begun before the step-down may still report; then none.
        let mut stopped = false;
        for _ in 0..3 {
            if runs.none_during(Duration::from_millis(100)).await {
                stopped = true;
                break;
            }
        }
        assert!(stopped, "the runs stopped with the term");
        shutdown.cancel();
        tokio::time::timeout(BOUND, task).await.expect("stopped while waiting for a term").expect("no panic");
    }

    #[tokio::test]
    async fn a_failing_run_is_logged_and_counted_and_the_job_runs_again() {
        let (mut job, mut runs) = probe("test_failing", SOON, false, FirstRun::AtOnce);
        job.failures = 2;
        let logs = Logs::default();
        let _subscriber = tracing::subscriber::set_default(logs.subscriber());
        let shutdown = CancellationToken::new();
        let task = spawn(job, &Leadership::default(), &shutdown);
        for _ in 0..3 {
            runs.next().await;
        }
        // The third run succeeded; its count is written when it returns.
        runs.next().await;
        shutdown.cancel();
        tokio::time::timeout(BOUND, task).await.expect("stopped").expect("no panic");
        assert_eq!(runs_counted("test_failing", "failed"), 2.0);
        assert!(runs_counted("test_failing", "ok") >= 1.0);
        let logged = logs.text();
        assert_eq!(logged.matches("a periodic job failed").count(), 2, "{logged}");
        assert!(logged.contains("job=\"test_failing\"") || logged.contains("job=test_failing"), "{logged}");
        assert!(logged.contains("boom"), "{logged}");
    }

    #[tokio::test]
    async fn a_run_that_finds_its_term_over_ends_it_and_is_not_a_failure() {
        let (mut job, mut runs) = probe("test_fenced", SOON, true, FirstRun::AtOnce);
        job.failures = 1;
        job.fail_with = || JobError::Store { doing: "writing", source: StoreError::Fenced { term: 3, current: 4 } };
        let leadership = Leadership::default();
        let term = Term::for_tests(3);
        leadership.lead_for_tests(term);
        let shutdown = CancellationToken::new();
        let task = spawn(job, &leadership, &shutdown);
        assert_eq!(runs.next().await, Some(term));
        tokio::time::timeout(BOUND, leadership.ended(term)).await.expect("the fenced run ended the term");
        shutdown.cancel();
        tokio::time::timeout(BOUND, task).await.expect("stopped").expect("no panic");
        assert_eq!(runs_counted("test_fenced", "fenced"), 1.0);
        assert_eq!(runs_counted("test_fenced", "failed"), 0.0);
    }

    /// Log lines written while its subscriber is the default (this thread's: the tests run
    /// on a current-thread runtime).
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Logs {
        fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
            let logs = self.clone();
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || logs.clone()).finish()
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for Logs {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
