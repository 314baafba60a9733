//! The threads that read apply bodies: a fixed few of their own, off the async workers.
//!
//! Reading resource YAML is CPU-bound and may hold up to the apply limits in memory for a
//! while. Reads run on [`Readers`]' threads, one at a time on each, so that
//! - they never stall the async workers (`/healthz`, ingest, delivery);
//! - at most as many run at once as there are reader threads, whoever asks;
//! - each thread's heap is reused by the next read. Reads on ever new threads would each
//!   leave their peak behind in a heap of their own (glibc gives a new thread a new
//!   arena), so the process would hold several peaks at once.
//!
//! Invariant: a read handed over runs to its end on a reader thread, even when the request
//! that asked for it is gone, and holds that thread meanwhile; a read that panics ends
//! that read only, never the thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// A handle on the reader threads; cheap to clone. The threads end when the last handle
/// is dropped and the reads already handed over are done.
#[derive(Clone)]
pub struct Readers {
    jobs: mpsc::Sender<Job>,
}

/// The read did not come back: it panicked (logged by the panic hook), or the reader
/// threads are gone.
#[derive(Debug, thiserror::Error)]
#[error("the read did not finish on a reader thread")]
pub struct ReadFailed;

impl Readers {
    /// Half the cores, at least one: reads would only take more from the async workers.
    pub fn for_this_machine() -> Readers {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Readers::start((cores / 2).max(1))
    }

    /// Starts `threads` reader threads.
    pub fn start(threads: usize) -> Readers {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("hookwarden-reader-{i}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job, not while it runs.
                    let next = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    match next {
                        Ok(job) => job(),
                        Err(mpsc::RecvError) => return,
                    }
                })
                .expect("the reader threads start");
        }
        Readers { jobs }
    }

    /// Runs `read` on a reader thread and waits for what it returns.
    pub async fn run<T: Send + 'static>(&self, read: impl FnOnce() -> T + Send + 'static) -> Result<T, ReadFailed> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if let Ok(value) = catch_unwind(AssertUnwindSafe(read)) {
                let _ = answer.send(value);
            }
        });
        self.jobs.send(job).map_err(|_| ReadFailed)?;
        answered.await.map_err(|_| ReadFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_run_on_the_reader_threads_one_at_a_time_and_survive_a_panic() {
        let readers = Readers::start(1);
        let name = || std::thread::current().name().map(str::to_owned);
        assert_eq!(readers.run(name).await.unwrap().as_deref(), Some("hookwarden-reader-0"));
        assert!(readers.run(|| panic!("a bad read")).await.is_err());
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
}
