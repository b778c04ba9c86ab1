//! Async runtimes of their own, whose threads the kernel schedules apart from the rest of the
//! process: the opt-in sandbox threads ([`crate::runtime::engine::SandboxThreads`], nice 10) and
//! `serve`'s delivery threads ([`crate::queue::delivery_threads`], `SCHED_BATCH`); and
//! [`IdleWhile`], which holds the calling thread at idle priority while a long-running sandbox
//! is polled ([`crate::runtime::cpu_share`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

/// How the threads of an [`OwnRuntime`] are scheduled (Linux; elsewhere they are normal
/// threads). Both only lower a thread's claim on the CPU, which needs no privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// A nice value above normal: a smaller share of the CPU under contention.
    Nice(i32),
    /// `SCHED_BATCH`: a normal share, but "mildly disfavored" in wake-up decisions
    /// (`sched(7)`): a thread that wakes does not preempt the thread running.
    Batch,
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
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = scheduling;
    Ok(())
}

/// Set once a thread could not leave `SCHED_IDLE` (see [`IdleWhile`]): logged once.
#[cfg(target_os = "linux")]
static STUCK_IDLE: AtomicBool = AtomicBool::new(false);

/// Holds the calling thread at `SCHED_IDLE` until dropped, then gives it back the policy it
/// had: a thread at `SCHED_IDLE` runs only when no other thread wants its core, and any thread
/// that wakes preempts it (`sched(7)`). Both switches are the calling thread's own and need no
/// privilege; leaving `SCHED_IDLE` for `SCHED_OTHER` or `SCHED_BATCH` is allowed to a thread
/// whose nice value is within its `RLIMIT_NICE`, which [`IdleWhile::enter`] checks once per
/// process before it switches any thread.
#[derive(Debug)]
pub struct IdleWhile {
    /// The policy to give back (`SCHED_OTHER` or `SCHED_BATCH`).
    before: i32,
    /// Created and dropped on the same thread: the policy is that thread's.
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl IdleWhile {
    /// Switches the calling thread to `SCHED_IDLE`, or does nothing (`None`) when its policy is
    /// neither `SCHED_OTHER` nor `SCHED_BATCH` (real-time, or already idle), when the kernel
    /// refuses, or when this process could not leave `SCHED_IDLE` again.
    pub fn enter() -> Option<Self> {
        #[cfg(target_os = "linux")]
        {
            let before = policy_of_this_thread();
            if before != libc::SCHED_OTHER && before != libc::SCHED_BATCH {
                return None;
            }
            if idle_refused().is_some() {
                return None;
            }
            set_policy(libc::SCHED_IDLE).ok()?;
            Some(IdleWhile {
                before,
                _this_thread: std::marker::PhantomData,
            })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }
}

impl Drop for IdleWhile {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Err(e) = set_policy(self.before)
            && !STUCK_IDLE.swap(true, Ordering::Relaxed)
        {
            tracing::warn!("a thread cannot leave SCHED_IDLE ({e}); it runs on at idle priority");
        }
    }
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

/// Why threads of this process cannot run a long runner at idle priority (go to `SCHED_IDLE`
/// and come back), or `None` when they can: the probe [`IdleWhile::enter`] relies on, run now
/// if it has not run yet. `serve` prints it at start-up. The usual cause is an unprivileged
/// process whose `RLIMIT_NICE` is below 20 (the default is 0): any thread may lower itself to
/// `SCHED_IDLE`, but only one allowed nice 0 by that limit (or with CAP_SYS_NICE) may leave it.
pub fn idle_priority_refused() -> Option<String> {
    #[cfg(target_os = "linux")]
    return idle_refused().map(|refusal| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `getrlimit` writes the limit into `limit`, which lives through the call.
        if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } == 0 {
            format!("{refusal} (RLIMIT_NICE {})", limit.rlim_cur)
        } else {
            refusal.to_owned()
        }
    });
    #[cfg(not(target_os = "linux"))]
    Some("idle priority is Linux's (SCHED_IDLE)".to_owned())
}

/// Why a thread of this process cannot go to `SCHED_IDLE` and come back (`None`: it can),
/// tried once on a thread of its own (a seccomp filter or an `RLIMIT_NICE` could allow the
/// first and refuse the second, which would leave a delivery thread at idle priority).
#[cfg(target_os = "linux")]
fn idle_refused() -> Option<&'static str> {
    static REFUSAL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REFUSAL
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("jobhook-probe".into())
                .spawn(idle_round_trip)
                .map_err(|e| format!("cannot start a thread to try it: {e}"))
                .and_then(|probe| {
                    probe
                        .join()
                        .map_err(|_| "the thread that tried it panicked".to_owned())
                })
                .and_then(|tried| tried)
                .err()
        })
        .as_deref()
}

/// Takes the calling thread from `SCHED_OTHER` to `SCHED_IDLE` and back, or says which step was
/// refused. It starts from `SCHED_OTHER` whatever the thread had (a new thread inherits its
/// creator's policy), so that the answer does not depend on which thread asked first.
#[cfg(target_os = "linux")]
fn idle_round_trip() -> Result<(), String> {
    set_policy(libc::SCHED_OTHER).map_err(|e| format!("a thread cannot take SCHED_OTHER: {e}"))?;
    set_policy(libc::SCHED_IDLE).map_err(|e| format!("a thread cannot take SCHED_IDLE: {e}"))?;
    set_policy(libc::SCHED_OTHER)
        .map_err(|e| format!("a thread cannot leave SCHED_IDLE for SCHED_OTHER: {e}"))
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

    /// `IdleWhile` on a thread of its own whose policy is first set to `policy`: the policy
    /// inside, and after it is dropped.
    fn idle_while_on_a_thread_at(policy: i32) -> (Option<i32>, i32) {
        std::thread::spawn(move || {
            set_policy(policy).expect("a non-real-time policy");
            let inside = IdleWhile::enter().map(|_idle| policy_of_this_thread());
            (inside, policy_of_this_thread())
        })
        .join()
        .expect("join")
    }

    #[test]
    fn idle_while_gives_back_the_policy_it_found() {
        // The delivery threads' policy and a normal thread's.
        for policy in [libc::SCHED_BATCH, libc::SCHED_OTHER] {
            assert_eq!(
                idle_while_on_a_thread_at(policy),
                (Some(libc::SCHED_IDLE), policy),
                "{policy}"
            );
        }
        // Already idle: nothing to enter, and it stays idle.
        assert_eq!(
            idle_while_on_a_thread_at(libc::SCHED_IDLE),
            (None, libc::SCHED_IDLE)
        );
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

    /// The probe behind `IdleWhile` answers the same whatever the policy of the thread that
    /// runs it (its probe thread inherits the policy of the first caller): a real-time one
    /// could not have come back to its policy at priority 0.
    #[test]
    fn the_idle_probe_does_not_depend_on_the_thread_that_runs_it() {
        for policy in [libc::SCHED_OTHER, libc::SCHED_BATCH, libc::SCHED_IDLE] {
            let can = std::thread::spawn(move || {
                set_policy(policy).expect("a non-real-time policy");
                idle_round_trip()
            })
            .join()
            .expect("join");
            assert_eq!(can, Ok(()), "{policy}");
        }
        for policy in [libc::SCHED_FIFO, libc::SCHED_RR] {
            let from_real_time =
                std::thread::spawn(move || real_time_or_skip(policy).then(idle_round_trip))
                    .join()
                    .expect("join");
            assert!(from_real_time.is_none_or(|tried| tried.is_ok()), "{policy}");
        }
    }

    /// A real-time thread (an operator may run the engine so) is not lowered to idle priority,
    /// and keeps its policy: `IdleWhile` could not give it back (it sets priority 0).
    #[test]
    fn idle_while_leaves_a_real_time_thread_alone() {
        for policy in [libc::SCHED_FIFO, libc::SCHED_RR] {
            let seen = std::thread::spawn(move || {
                real_time_or_skip(policy).then(|| {
                    let inside = IdleWhile::enter().map(|_idle| policy_of_this_thread());
                    (inside, policy_of_this_thread())
                })
            })
            .join()
            .expect("join");
            if let Some(seen) = seen {
                assert_eq!(seen, (None, policy));
            }
        }
    }

    #[test]
    fn idle_while_gives_back_the_policy_when_what_it_covers_panics() {
        let after = std::thread::spawn(|| {
            set_policy(libc::SCHED_BATCH).expect("batch");
            let panicked = std::panic::catch_unwind(|| {
                let _idle = IdleWhile::enter().expect("idle");
                assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE);
                panic!("a host bug while a long runner is polled");
            });
            assert!(panicked.is_err());
            policy_of_this_thread()
        })
        .join()
        .expect("join");
        assert_eq!(after, libc::SCHED_BATCH);
    }

    #[tokio::test]
    async fn each_runtime_schedules_its_own_threads_and_leaves_the_callers_alone() {
        let before = scheduling_here();
        for (scheduling, expected) in [
            (Scheduling::Batch, (libc::SCHED_BATCH, before.1)),
            (Scheduling::Nice(10), (libc::SCHED_OTHER, 10)),
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
