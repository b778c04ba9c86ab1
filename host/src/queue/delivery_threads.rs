//! The threads deliveries run on, apart from the event path's.
//!
//! `jobhook serve` answers ingest, health and metrics on one async runtime and runs the
//! dispatcher — its claims, every sandbox, the recorder of outcomes, the lease keeper — on a
//! second one, [`DeliveryThreads`]. Two things follow:
//!
//! - an ingest request never waits in a run queue behind sandboxes: the two kinds of work share
//!   no worker thread, so a request is polled as soon as the kernel runs one of the API's
//!   threads;
//! - the delivery threads run under Linux's `SCHED_BATCH` policy. By `sched(7)`, the scheduler
//!   then treats them as CPU-bound and "mildly disfavor\[s\]" them in wake-up decisions: a delivery
//!   thread that wakes does not preempt the thread running, such as an API thread answering an
//!   event. Their share of the CPU is that of any normal thread (unlike a higher nice value,
//!   which cost deliveries a third of their throughput beside a CPU hog), so beside other
//!   programs on a busy machine deliveries keep their share. Choosing a scheduling policy for
//!   one's own threads needs no privilege; if the kernel refuses it (a seccomp filter, a
//!   non-Linux system), they run as normal threads and nothing else changes.
//!
//! A delivery is handed over once, when the dispatcher claims it: there is no per-delivery hop
//! between the runtimes (unlike `[engine] sandbox_threads`, which moves each sandbox to threads
//! of its own and back). Measured in docs/PERFORMANCE.md.

use std::future::Future;

use crate::runtime::threads::{OwnRuntime, Scheduling};

/// The name the delivery threads carry (`/proc/<pid>/task/*/comm`, `top -H`), truncated by the
/// kernel to 15 bytes.
pub const DELIVERY_THREAD_NAME: &str = "jobhook-delivery";

/// The async runtime the dispatcher and its deliveries run on: one `SCHED_BATCH` thread per
/// core. Dropping it stops its threads without waiting for them (whatever still runs there is
/// abandoned, as at process exit).
#[derive(Debug)]
pub struct DeliveryThreads {
    runtime: OwnRuntime,
}

impl DeliveryThreads {
    /// Starts one delivery thread per core the process may use (tokio's default).
    pub fn start() -> std::io::Result<Self> {
        Ok(DeliveryThreads {
            runtime: OwnRuntime::start(DELIVERY_THREAD_NAME, None, Scheduling::Batch)?,
        })
    }

    /// Runs `future` on the delivery threads; awaiting the handle (from any runtime) waits for
    /// its end.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(future)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn deliveries_run_as_batch_on_threads_named_for_them() {
        let threads = DeliveryThreads::start().expect("start");
        let (policy, name) = threads
            .spawn(async {
                // SAFETY: reads the calling thread's policy only.
                let policy = unsafe { libc::sched_getscheduler(0) };
                (policy, std::thread::current().name().map(str::to_owned))
            })
            .await
            .expect("join");
        assert_eq!(policy, libc::SCHED_BATCH);
        assert_eq!(name.as_deref(), Some(DELIVERY_THREAD_NAME));
    }
}
