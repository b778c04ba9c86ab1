//! Async runtimes of their own, whose threads the kernel schedules apart from the rest of the
//! process: the opt-in sandbox threads ([`crate::runtime::engine::SandboxThreads`], nice 10),
//! `serve`'s delivery threads ([`crate::queue::delivery_threads`], `SCHED_BATCH`) and the idle
//! threads that long-running sandboxes move to ([`crate::runtime::cpu_share`], `SCHED_IDLE`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

/// How the threads of an [`OwnRuntime`] are scheduled (Linux; elsewhere they are normal
/// threads). Each only lowers a thread's claim on the CPU, which needs no privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// A nice value above normal: a smaller share of the CPU under contention.
    Nice(i32),
    /// `SCHED_BATCH`: a normal share, but "mildly disfavored" in wake-up decisions
    /// (`sched(7)`): a thread that wakes does not preempt the thread running.
    Batch,
    /// `SCHED_IDLE`: runs only when no other thread wants its core, and any thread that wakes
    /// preempts it (`sched(7)`). A thread never leaves it: coming back would need CAP_SYS_NICE
    /// or an `RLIMIT_NICE` of 20, which an ordinary user's processes do not have.
    Idle,
}

/// Set once a thread could not be given its scheduling: the warning is logged once per
/// process, not once for every thread a runtime starts (blocking-pool threads come and go).
static REFUSED: AtomicBool = AtomicBool::new(false);

/// A multi-threaded async runtime on threads of its own. Dropping it stops its threads without
/// waiting for them: `Runtime`'s own drop blocks, which panics inside an async context (these
/// are usually dropped at the end of `serve`); whatever still runs there is abandoned.
#[derive(Debug)]
pub struct OwnRuntime {
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl OwnRuntime {
    /// Starts `threads` worker threads (default: one per core the process may use) named
    /// `name`, each scheduled as `scheduling` — the blocking pool's threads too.
    pub fn start(
        name: &str,
        threads: Option<usize>,
        scheduling: Scheduling,
    ) -> std::io::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = threads {
            builder.worker_threads(threads.max(1));
        }
        let runtime = builder
            .thread_name(name)
            .on_thread_start(move || {
                if let Err(e) = schedule_this_thread(scheduling)
                    && !REFUSED.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        "threads cannot be scheduled as {scheduling:?} ({e}); they run as normal threads"
                    );
                }
            })
            .enable_all()
            .build()?;
        Ok(OwnRuntime {
            runtime: Some(runtime),
        })
    }

    /// Runs `future` on these threads and waits for it (from any runtime). Dropping the
    /// returned future aborts the task, so what it runs never outlives the caller's wait.
    pub async fn run<F>(&self, future: F) -> Result<F::Output, tokio::task::JoinError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let mut task = AbortOnDrop(self.spawn(future));
        (&mut task.0).await
    }

    /// Runs `future` on these threads; awaiting the handle (from any runtime) waits for its
    /// end.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(runtime) => runtime.spawn(future),
            // Unreachable: only `drop` takes the runtime out.
            None => tokio::spawn(future),
        }
    }
}

/// Aborts a task when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Schedules the calling thread as `scheduling`. On Linux, both calls with pid 0 apply to the
/// calling thread only (nice values and policies are per thread).
fn schedule_this_thread(scheduling: Scheduling) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        match scheduling {
            Scheduling::Nice(nice) => {
                // SAFETY: `setpriority` only reads its arguments.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Scheduling::Batch => set_policy(libc::SCHED_BATCH)?,
            Scheduling::Idle => set_policy(libc::SCHED_IDLE)?,
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = scheduling;
    Ok(())
}

/// The calling thread's scheduling policy (`SCHED_OTHER`, `SCHED_BATCH`, `SCHED_IDLE`, …).
#[cfg(target_os = "linux")]
pub fn policy_of_this_thread() -> i32 {
    // SAFETY: reads the calling thread's policy only.
    unsafe { libc::sched_getscheduler(0) }
}

/// Sets the calling thread's policy (one of the non-real-time ones, priority 0).
#[cfg(target_os = "linux")]
fn set_policy(policy: i32) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` only reads `param`, which lives through the call; pid 0 is
    // the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's policy and nice value, as the kernel reports them.
    fn scheduling_here() -> (i32, i32) {
        // SAFETY: only reads the calling thread's nice value.
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        (policy_of_this_thread(), nice)
    }

    /// Makes the calling thread real-time (`policy`, priority 1), which needs CAP_SYS_NICE
    /// or an `RLIMIT_RTPRIO` above 0: where neither is given, prints why and returns false —
    /// or fails under `JOBHOOK_REQUIRE_FAULTS=1`, as the test script runs.
    fn real_time_or_skip(policy: i32) -> bool {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: reads `param`, which lives through the call; pid 0 is this thread.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
            return true;
        }
        let e = std::io::Error::last_os_error();
        if std::env::var("JOBHOOK_REQUIRE_FAULTS").is_ok_and(|v| v == "1") {
            panic!("JOBHOOK_REQUIRE_FAULTS=1 but a thread cannot be made real-time: {e}");
        }
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: a thread cannot be made real-time here ({e})"
        );
        false
    }

    /// A runtime started from a real-time thread (an operator may run the engine so; the idle
    /// threads start from whichever thread first has a long runner) still gets the scheduling
    /// it asks for, not its creator's: a new thread inherits its creator's policy.
    #[test]
    fn a_runtime_started_from_a_real_time_thread_schedules_its_threads_as_asked() {
        for creator in [libc::SCHED_FIFO, libc::SCHED_RR] {
            for (scheduling, expected) in [
                (Scheduling::Idle, libc::SCHED_IDLE),
                (Scheduling::Batch, libc::SCHED_BATCH),
            ] {
                let seen = std::thread::spawn(move || {
                    real_time_or_skip(creator).then(|| {
                        let threads =
                            OwnRuntime::start("jobhook-test", Some(1), scheduling).expect("start");
                        let waiter = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a runtime to wait on");
                        waiter
                            .block_on(threads.run(async { policy_of_this_thread() }))
                            .expect("join")
                    })
                })
                .join()
                .expect("join");
                if let Some(seen) = seen {
                    assert_eq!(seen, expected, "{scheduling:?} from {creator}");
                }
            }
        }
    }

    #[tokio::test]
    async fn each_runtime_schedules_its_own_threads_and_leaves_the_callers_alone() {
        let before = scheduling_here();
        for (scheduling, expected) in [
            (Scheduling::Batch, (libc::SCHED_BATCH, before.1)),
            (Scheduling::Nice(10), (libc::SCHED_OTHER, 10)),
            (Scheduling::Idle, (libc::SCHED_IDLE, before.1)),
        ] {
            let threads = OwnRuntime::start("jobhook-test", Some(1), scheduling).expect("start");
            let (there, name) = threads
                .spawn(async {
                    (
                        scheduling_here(),
                        std::thread::current().name().map(str::to_owned),
                    )
                })
                .await
                .expect("join");
            assert_eq!(there, expected, "{scheduling:?}");
            assert_eq!(name.as_deref(), Some("jobhook-test"));
            // A blocking-pool thread of the runtime is scheduled the same way.
            let blocking = threads
                .spawn(async { tokio::task::spawn_blocking(scheduling_here).await })
                .await
                .expect("join")
                .expect("join blocking");
            assert_eq!(blocking, expected, "{scheduling:?}, blocking pool");
        }
        assert_eq!(
            scheduling_here(),
            before,
            "the caller's thread is left as it was"
        );
    }
}
