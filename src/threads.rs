//! Pools of a fixed few threads of their own, off the async workers, for CPU-bound work:
//! reading apply bodies (the reader threads) and evaluating CEL (the evaluation threads).
//!
//! Such work may take a while and hold memory meanwhile. Jobs run on a [`Pool`]'s
//! threads, one at a time on each, so that
//! - they never stall the async workers (`/healthz`, ingest, delivery);
//! - at most as many run at once as the pool has threads, whoever asks;
//! - each thread's heap is reused by the next job. Jobs on ever new threads would each
//!   leave their peak behind in a heap of their own (glibc gives a new thread a new
//!   arena), so the process would hold several peaks at once.
//!
//! Invariant: a job handed over runs to its end on a pool thread, even when the request
//! that asked for it is gone, and holds that thread meanwhile; a job that panics ends
//! that job only, never the thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a pool's threads; cheap to clone. The threads end when the last handle is
/// dropped and the jobs already handed over are done.
#[derive(Clone)]
pub struct Pool {
    jobs: mpsc::Sender<Job>,
    name: &'static str,
}

/// The job did not come back: it panicked (logged by the panic hook), or the pool's
/// threads are gone.
#[derive(Clone, Debug, thiserror::Error)]
#[error("the job did not finish on a {0} thread")]
pub struct JobFailed(&'static str);

/// Half the cores, at least one: more would only take from the async workers.
pub fn half_the_cores() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / 2).max(1)
}

/// How a pool's threads compete for the CPU with the rest of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Normal,
    /// Below the async workers (a nice value 10 higher, on Linux): when the CPU is short,
    /// requests are answered first and the pool's jobs wait.
    Background,
}

/// How much nicer [`Priority::Background`] threads are.
const BACKGROUND_NICE: i32 = 10;

impl Pool {
    /// Starts `threads` threads named `hookwarden-{name}-N`.
    pub fn start(name: &'static str, threads: usize) -> Pool {
        Pool::start_with(name, threads, Priority::Normal)
    }

    /// Starts `threads` threads named `hookwarden-{name}-N`, at `priority`.
    pub fn start_with(name: &'static str, threads: usize, priority: Priority) -> Pool {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("hookwarden-{name}-{i}"))
                .spawn(move || {
                    if priority == Priority::Background {
                        lower_priority();
                    }
                    loop {
                        // The lock is held only while waiting for the next job, not while it runs.
                        let next = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match next {
                            Ok(job) => job(),
                            Err(mpsc::RecvError) => return,
                        }
                    }
                })
                .expect("the pool's threads start");
        }
        Pool { jobs, name }
    }

    /// Runs `work` on a thread of the pool and waits for what it returns.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, JobFailed> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if let Ok(value) = catch_unwind(AssertUnwindSafe(work)) {
                let _ = answer.send(value);
            }
        });
        self.jobs.send(job).map_err(|_| JobFailed(self.name))?;
        answered.await.map_err(|_| JobFailed(self.name))
    }
}

/// Makes the calling thread nicer by [`BACKGROUND_NICE`]. On Linux a nice value belongs
/// to a thread (`setpriority(PRIO_PROCESS, tid)` sets that thread's alone); elsewhere this
/// does nothing. Failing to is not worth stopping for: the thread still works.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
        let _ = rustix::process::setpriority_process(Some(tid), (now + BACKGROUND_NICE).min(19));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_pool_threads_one_at_a_time_and_survive_a_panic() {
        let readers = Pool::start("reader", 1);
        let name = || std::thread::current().name().map(str::to_owned);
        assert_eq!(readers.run(name).await.unwrap().as_deref(), Some("hookwarden-reader-0"));
        let failed = readers.run(|| panic!("a bad read")).await.unwrap_err();
        assert_eq!(failed.to_string(), "the job did not finish on a reader thread");
        assert_eq!(readers.run(|| 2 + 2).await.unwrap(), 4, "the thread outlives the panic");
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reads = (0..4).map(|_| {
            let (readers, running) = (readers.clone(), running.clone());
            tokio::spawn(async move {
                readers
                    .run(move || {
                        let at_once = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        at_once
                    })
                    .await
                    .unwrap()
            })
        });
        for read in reads.collect::<Vec<_>>() {
            assert_eq!(read.await.unwrap(), 1, "one thread runs one read at a time");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn background_threads_are_nicer_than_the_rest_of_the_process() {
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let ours = nice();
        let background = Pool::start_with("background", 1, Priority::Background).run(nice).await.unwrap();
        assert_eq!(background, (ours + BACKGROUND_NICE).min(19));
        assert_eq!(Pool::start("normal", 1).run(nice).await.unwrap(), ours);
        assert_eq!(nice(), ours, "only the pool's threads changed");
    }
}
