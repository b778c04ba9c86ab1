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
//!   then treats them as CPU-bound and "mildly disfavor[s]" them in wake-up decisions: a delivery
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

/// The name the delivery threads carry (`/proc/<pid>/task/*/comm`, `top -H`), truncated by the
/// kernel to 15 bytes.
pub const DELIVERY_THREAD_NAME: &str = "jobhook-delivery";

/// The async runtime the dispatcher and its deliveries run on. Dropping it stops its threads
/// without waiting for them (whatever still runs there is abandoned, as at process exit).
pub struct DeliveryThreads {
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for DeliveryThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryThreads").finish_non_exhaustive()
    }
}

impl DeliveryThreads {
    /// Starts one delivery thread per core the process may use (tokio's default).
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name(DELIVERY_THREAD_NAME)
            .on_thread_start(run_as_batch)
            .enable_all()
            .build()?;
        Ok(DeliveryThreads {
            runtime: Some(runtime),
        })
    }

    /// Runs `future` on the delivery threads; awaiting the handle (from any runtime) waits for
    /// its end.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(runtime) => runtime.spawn(future),
            // Only reachable during drop; run on the caller's runtime rather than fail.
            None => tokio::spawn(future),
        }
    }
}

impl Drop for DeliveryThreads {
    fn drop(&mut self) {
        // `Runtime`'s own drop blocks, which panics inside an async context (`serve` drops it
        // at its end, on the API's runtime).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Puts the calling thread under `SCHED_BATCH` (Linux; elsewhere nothing). On Linux,
/// `sched_setscheduler` with pid 0 applies to the calling thread only.
fn run_as_batch() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` only reads `param`, which lives through the call.
        let refused = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0;
        if refused {
            tracing::warn!(
                "a delivery thread cannot use SCHED_BATCH ({}); it runs as a normal thread",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of the calling thread, as the kernel reports it.
    #[cfg(target_os = "linux")]
    fn policy() -> i32 {
        // SAFETY: no arguments but the calling thread's id (0).
        unsafe { libc::sched_getscheduler(0) }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn work_spawned_there_runs_as_batch_on_named_threads_and_the_caller_does_not() {
        let threads = DeliveryThreads::start().expect("start");
        let (there, name) = threads
            .spawn(async { (policy(), std::thread::current().name().map(str::to_owned)) })
            .await
            .expect("join");
        assert_eq!(there, libc::SCHED_BATCH);
        assert_eq!(name.as_deref(), Some(DELIVERY_THREAD_NAME));
        assert_eq!(
            policy(),
            libc::SCHED_OTHER,
            "the caller's thread is left as it was"
        );
    }
}
