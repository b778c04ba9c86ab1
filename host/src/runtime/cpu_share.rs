//! How much of the machine handlers that keep computing may take.
//!
//! A handler normally runs for well under a millisecond of guest code: it reads the context,
//! makes a call or two, and ends. One that keeps computing — an infinite loop, a memory bomb
//! filling its pages, or just heavy work — runs until its time budget (10 s by default) unless it
//! finishes first. Several of them at once used to take every core for that long: healthy
//! deliveries and the event path waited behind them (docs/PERFORMANCE.md, scenario d).
//!
//! So a delivery that has run [`FREE_TICKS`] epoch ticks of guest code becomes a *long runner*,
//! and the long runners of an engine share [`CpuShare::cores`] cores between them — a quarter of
//! the machine ([`SHARE_OF_MACHINE`]): whenever they would use more, each pauses after every tick
//! of guest code for as long as it takes to keep their total at that share. Pausing only sleeps
//! (the task gives its thread back); the time budget keeps running, so a throttled loop still ends
//! at its deadline, and no limit is any weaker. The price is paid by handlers that compute for
//! long on small machines: on two cores, even a lone long runner runs at half speed after its
//! first 20 ms.
//!
//! Past [`IDLE_AFTER_TICKS`], a long runner moves to threads at idle priority
//! ([`LongRunner::at_idle_priority`]): the event path's threads that wake on its core run at
//! once instead of after its tick.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::runtime::threads::{OwnRuntime, Scheduling};

/// Epoch ticks of guest code a delivery runs at full speed before it counts as a long runner:
/// 20 ms at the 1 ms tick, some twenty times what a typical handler needs in all, so ordinary
/// deliveries are never throttled.
pub const FREE_TICKS: u32 = 20;

/// Epoch ticks of guest code after which a long runner moves to threads at idle priority
/// ([`LongRunner::at_idle_priority`]): 100 ms at the 1 ms tick. Later than [`FREE_TICKS`]
/// because a sandbox counts the ticks of the clock at which its guest was running, not its CPU
/// time: a delivery with real work on a core shared with many others passes 20 ticks with less
/// CPU than that, and at idle priority a busy machine leaves it almost none. A loop still runs
/// at idle priority for all but the first 100 ms of its budget. (Scenario g's CPU-bound
/// deliveries, ~8 ms of arithmetic each, did not show the difference: one node 202–203 /s with
/// idle priority from the 20th tick, 200–204 /s without it in the same hour.)
pub const IDLE_AFTER_TICKS: u32 = 100;

/// The part of the machine's cores that long runners share: a quarter, so that on two cores the
/// event path and short deliveries keep one and a half cores whatever the handlers do (with half,
/// two looping handlers still held the ingest p99 at 1,000 events/s at 4× its value without them;
/// docs/PERFORMANCE.md, scenario d).
pub const SHARE_OF_MACHINE: f64 = 0.25;

/// The smallest share, whatever the machine: a tenth of a core still lets a long runner finish
/// a few ms of work within a typical time budget.
const MIN_SHARE: f64 = 0.1;

/// Longest pause after one tick, however many long runners there are: keeps a throttled handler
/// making some progress (it still has its time budget to finish in).
const MAX_PAUSE: Duration = Duration::from_millis(20);

/// The long runners of one engine and the cores they may share.
#[derive(Debug, Clone)]
pub struct CpuShare {
    long_runners: Arc<AtomicUsize>,
    cores: f64,
    /// The engine's epoch tick: the unit a pause is counted in.
    tick: Duration,
}

impl CpuShare {
    /// Long runners together get `cores` cores (at least [`MIN_SHARE`]); `tick` is the
    /// engine's epoch tick, at which a sandbox may be paused.
    pub fn new(cores: f64, tick: Duration) -> Self {
        CpuShare {
            long_runners: Arc::new(AtomicUsize::new(0)),
            tick,
            cores: if cores.is_finite() {
                cores.max(MIN_SHARE)
            } else {
                MIN_SHARE
            },
        }
    }

    /// [`SHARE_OF_MACHINE`] of this machine's cores.
    pub fn for_machine(tick: Duration) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(cores as f64 * SHARE_OF_MACHINE, tick)
    }

    /// The cores long runners share.
    pub fn cores(&self) -> f64 {
        self.cores
    }

    /// Long runners alive now.
    pub fn long_runners(&self) -> usize {
        self.long_runners.load(Ordering::Relaxed)
    }

    /// The tick counter of one new sandbox.
    pub fn sandbox(&self) -> SandboxTicks {
        SandboxTicks {
            share: self.clone(),
            ticks: 0,
            counted: false,
            long: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Counts one sandbox's ticks of guest code and says when it must pause. Counted among the long
/// runners from its [`FREE_TICKS`]th tick until it is dropped (with its store).
#[derive(Debug)]
pub struct SandboxTicks {
    share: CpuShare,
    ticks: u32,
    counted: bool,
    /// Set past [`IDLE_AFTER_TICKS`], for [`LongRunner::at_idle_priority`].
    long: Arc<AtomicBool>,
}

impl SandboxTicks {
    /// Whether this sandbox has become a long runner, for the future that runs it.
    pub fn long_runner(&self) -> LongRunner {
        LongRunner(Arc::clone(&self.long))
    }

    /// Called at every epoch tick at which the guest is running: how long it must pause before
    /// running on, if at all.
    pub fn on_tick(&mut self) -> Option<Duration> {
        self.ticks = self.ticks.saturating_add(1);
        if self.ticks <= FREE_TICKS {
            return None;
        }
        if !self.counted {
            self.counted = true;
            self.share.long_runners.fetch_add(1, Ordering::Relaxed);
        }
        if self.ticks > IDLE_AFTER_TICKS {
            self.long.store(true, Ordering::Relaxed);
        }
        pause(self.share.long_runners(), self.share.cores, self.share.tick)
    }
}

impl Drop for SandboxTicks {
    fn drop(&mut self) {
        if self.counted {
            self.share.long_runners.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether one sandbox has become a long runner (see [`SandboxTicks::long_runner`]).
#[derive(Debug)]
pub struct LongRunner(Arc<AtomicBool>);

impl LongRunner {
    /// Runs `future` (the sandbox's run, which owns its store) from the caller's task until the
    /// sandbox is past [`IDLE_AFTER_TICKS`], then moves it to the idle threads
    /// ([`idle_threads`], `SCHED_IDLE`) and waits for it there. Dropping the returned future
    /// drops the sandbox wherever it is (on the idle threads, when one of them next runs: the
    /// task is aborted). While a long runner's thread held its core for a
    /// tick of guest code, the event path's threads waking on that core waited for it: by hand,
    /// one looping handler beside three healthy ones took ingest at 1,000 events/s from p99
    /// 1.93 / 2.27 ms to 3.83 / 3.70 ms (two rounds), and neither a smaller share of the
    /// machine for long runners nor a shorter tick helped. On a thread at idle priority any
    /// thread that wakes preempts it; the long runner still gets every core nothing else wants,
    /// and its time budget runs as before (docs/PERFORMANCE.md, scenario d). The threads stay at
    /// `SCHED_IDLE` for good, which any process may ask for: taking a thread back from it needs
    /// CAP_SYS_NICE or an `RLIMIT_NICE` of 20, which an ordinary user's processes lack.
    ///
    /// The future is boxed (one allocation per delivery) so that it can move between threads
    /// after it has been polled. `Err` when the task on the idle threads panicked.
    pub fn at_idle_priority<F>(self, future: F) -> AtIdlePriority<F>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.moving_to(idle_threads, future)
    }

    /// [`LongRunner::at_idle_priority`], with the idle threads `threads` gives (`None`: they
    /// could not be started, and the run stays where it is).
    fn moving_to<F>(self, threads: IdleThreads, future: F) -> AtIdlePriority<F>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        AtIdlePriority {
            here: Some(Box::pin(future)),
            there: None,
            long: self.0,
            threads,
        }
    }
}

/// Where a long runner finds the threads it moves to ([`idle_threads`] but in tests).
type IdleThreads = fn() -> Option<&'static OwnRuntime>;

/// The name of the idle threads (`top -H` shows it).
pub const IDLE_THREAD_NAME: &str = "jobhook-idle";

/// The threads long runners move to: one per core, at `SCHED_IDLE`, started when the first
/// long runner needs them and kept for the life of the process. `None` when they could not be
/// started: long runners then stay where they are (logged once).
fn idle_threads() -> Option<&'static OwnRuntime> {
    static THREADS: OnceLock<Option<OwnRuntime>> = OnceLock::new();
    THREADS
        .get_or_init(
            || match OwnRuntime::start(IDLE_THREAD_NAME, None, Scheduling::Idle) {
                Ok(threads) => Some(threads),
                Err(e) => {
                    tracing::warn!(
                        "cannot start the idle threads ({e}); handlers that keep computing run \
                         on the delivery threads"
                    );
                    None
                }
            },
        )
        .as_ref()
}

/// The output of a future run on the idle threads, as awaited from the caller's task.
type Moved<T> = Pin<Box<dyn Future<Output = Result<T, tokio::task::JoinError>> + Send>>;

/// See [`LongRunner::at_idle_priority`].
pub struct AtIdlePriority<F: Future> {
    /// The future while it runs in the caller's task; taken when it moves.
    here: Option<Pin<Box<F>>>,
    /// The wait for it on the idle threads once it has moved.
    there: Option<Moved<F::Output>>,
    long: Arc<AtomicBool>,
    threads: IdleThreads,
}

impl<F> Future for AtIdlePriority<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is `Unpin`: the future itself is boxed.
        let this = &mut *self;
        if this.there.is_none()
            && this.long.load(Ordering::Relaxed)
            && let Some(threads) = (this.threads)()
            && let Some(future) = this.here.take()
        {
            this.there = Some(Box::pin(threads.run(future)));
        }
        match (&mut this.here, &mut this.there) {
            (_, Some(there)) => there.as_mut().poll(cx),
            (Some(here), None) => here.as_mut().poll(cx).map(Ok),
            // Not reached: the future is in one place or the other until it is dropped.
            (None, None) => Poll::Pending,
        }
    }
}

/// The pause after one tick that keeps `long_runners` within `cores` cores: each may run
/// `cores / long_runners` of the time, so it pauses `long_runners / cores - 1` ticks per tick
/// run, up to [`MAX_PAUSE`].
pub fn pause(long_runners: usize, cores: f64, tick: Duration) -> Option<Duration> {
    let cores = cores.max(MIN_SHARE);
    let runners = long_runners as f64;
    if runners <= cores {
        return None;
    }
    let ticks = runners / cores - 1.0;
    Some(tick.mul_f64(ticks).min(MAX_PAUSE))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tick the engine uses (1 ms); a pause is a whole number of ticks.
    const EPOCH_TICK: Duration = Duration::from_millis(1);

    #[cfg(target_os = "linux")]
    use crate::runtime::threads::policy_of_this_thread as policy_here;

    /// Where a poll of a run happens: the thread's name and policy.
    #[cfg(target_os = "linux")]
    fn here() -> (Option<String>, i32) {
        (
            std::thread::current().name().map(str::to_owned),
            policy_here(),
        )
    }

    /// A sandbox's run is polled in the caller's task, on the caller's thread, until it becomes
    /// a long runner, and on the idle threads at `SCHED_IDLE` from then on; the caller's thread
    /// keeps its policy throughout.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_runner_moves_to_the_idle_threads_and_the_callers_thread_keeps_its_policy() {
        let caller = here();
        assert_eq!(caller.1, libc::SCHED_OTHER);
        let mut ticks = CpuShare::new(1.0, EPOCH_TICK).sandbox();
        let long = ticks.long_runner();
        let run = async move {
            let mut seen = vec![here()];
            tokio::task::yield_now().await;
            seen.push(here());
            // Guest code running for as many ticks as make it a long runner at idle priority.
            for _ in 0..=IDLE_AFTER_TICKS {
                ticks.on_tick();
            }
            tokio::task::yield_now().await;
            seen.push(here());
            tokio::task::yield_now().await;
            seen.push(here());
            seen
        };
        let seen = long.at_idle_priority(run).await.expect("the run");
        let idle = (Some(IDLE_THREAD_NAME.to_owned()), libc::SCHED_IDLE);
        assert_eq!(seen, [caller.clone(), caller.clone(), idle.clone(), idle]);
        assert_eq!(here(), caller);
    }

    /// A delivery short of [`IDLE_AFTER_TICKS`] never moves, even as a long runner.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "current_thread")]
    async fn a_sandbox_short_of_the_idle_ticks_stays_on_the_callers_thread() {
        let caller = here();
        let mut ticks = CpuShare::new(1.0, EPOCH_TICK).sandbox();
        let long = ticks.long_runner();
        let seen = long
            .at_idle_priority(async move {
                for _ in 0..IDLE_AFTER_TICKS {
                    ticks.on_tick();
                }
                tokio::task::yield_now().await;
                here()
            })
            .await
            .expect("the run");
        assert_eq!(seen, caller);
    }

    /// Idle threads that could not be started (a limit on threads, a container's policy): a
    /// long runner keeps running where it is and finishes there.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "current_thread")]
    async fn without_idle_threads_a_long_runner_stays_on_the_callers_thread_and_finishes() {
        let caller = here();
        let mut ticks = CpuShare::new(1.0, EPOCH_TICK).sandbox();
        let long = ticks.long_runner();
        let seen = long
            .moving_to(|| None, async move {
                for _ in 0..=IDLE_AFTER_TICKS {
                    ticks.on_tick();
                }
                let mut seen = Vec::new();
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                    seen.push(here());
                }
                seen
            })
            .await
            .expect("the run");
        assert_eq!(seen, [caller.clone(), caller.clone(), caller]);
    }

    /// Dropping the wait drops the run on the idle threads too: a sandbox never outlives the
    /// delivery that started it (a delivery interrupted at shutdown).
    #[tokio::test(flavor = "current_thread")]
    async fn dropping_a_moved_long_runner_drops_its_run() {
        /// Says when it is dropped.
        struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                if let Some(tell) = self.0.take() {
                    let _ = tell.send(());
                }
            }
        }
        let (tell, told) = tokio::sync::oneshot::channel();
        let (moved, has_moved) = tokio::sync::oneshot::channel();
        let mut ticks = CpuShare::new(1.0, EPOCH_TICK).sandbox();
        let long = ticks.long_runner();
        let guard = Dropped(Some(tell));
        let mut run = long.at_idle_priority(async move {
            let _guard = guard;
            for _ in 0..=IDLE_AFTER_TICKS {
                ticks.on_tick();
            }
            tokio::task::yield_now().await;
            let _ = moved.send(std::thread::current().name().map(str::to_owned));
            std::future::pending::<()>().await;
        });
        let waited = tokio::select! {
            _ = &mut run => panic!("a pending run ended"),
            on = has_moved => on.expect("moved"),
        };
        assert_eq!(waited.as_deref(), Some(IDLE_THREAD_NAME));
        drop(run);
        tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .expect("the run was not dropped")
            .expect("told");
    }

    /// A long runner whose run panics on the idle threads (a host bug) is answered with an
    /// error, which the sandbox records as an engine error, and the idle threads go on running
    /// the next one.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_runner_that_panics_on_the_idle_threads_is_an_error_and_the_next_one_runs() {
        let share = CpuShare::new(1.0, EPOCH_TICK);
        let run_long = |panics: bool| {
            let mut ticks = share.sandbox();
            let long = ticks.long_runner();
            long.at_idle_priority(async move {
                for _ in 0..=IDLE_AFTER_TICKS {
                    ticks.on_tick();
                }
                tokio::task::yield_now().await;
                assert!(!panics, "a host bug on the idle threads");
                std::thread::current().name().map(str::to_owned)
            })
        };
        let failed = run_long(true).await.expect_err("the panic is an error");
        assert!(failed.is_panic(), "{failed}");
        let ran_on = run_long(false).await.expect("the next long runner");
        assert_eq!(ran_on.as_deref(), Some(IDLE_THREAD_NAME));
    }

    #[test]
    fn long_runners_within_the_share_never_pause() {
        assert_eq!(pause(0, 1.0, EPOCH_TICK), None);
        assert_eq!(pause(1, 1.0, EPOCH_TICK), None);
        assert_eq!(pause(2, 2.0, EPOCH_TICK), None);
        // The share is at least a tenth of a core.
        assert_eq!(pause(1, 0.0, EPOCH_TICK), pause(1, MIN_SHARE, EPOCH_TICK));
        assert!(pause(1, MIN_SHARE, EPOCH_TICK).is_some());
    }

    #[test]
    fn more_long_runners_pause_so_that_together_they_use_the_share() {
        // Four on one core: each runs one tick in four.
        assert_eq!(pause(4, 1.0, EPOCH_TICK), Some(EPOCH_TICK * 3));
        // Six on two cores: each runs one tick in three.
        assert_eq!(pause(6, 2.0, EPOCH_TICK), Some(EPOCH_TICK * 2));
        // One on half a core (a quarter of two): one tick in two.
        assert_eq!(pause(1, 0.5, EPOCH_TICK), Some(EPOCH_TICK));
        // However many there are, a pause is bounded.
        assert_eq!(pause(10_000, 1.0, EPOCH_TICK), Some(MAX_PAUSE));
    }

    #[test]
    fn a_sandbox_becomes_a_long_runner_after_its_free_ticks_until_dropped() {
        let share = CpuShare::new(1.0, EPOCH_TICK);
        let mut first = share.sandbox();
        for _ in 0..FREE_TICKS {
            assert_eq!(first.on_tick(), None);
        }
        assert_eq!(share.long_runners(), 0, "free ticks do not count");
        assert_eq!(first.on_tick(), None, "alone within the share");
        assert_eq!(share.long_runners(), 1);
        let mut second = share.sandbox();
        for _ in 0..FREE_TICKS {
            assert_eq!(second.on_tick(), None);
        }
        assert_eq!(second.on_tick(), Some(EPOCH_TICK));
        assert_eq!(first.on_tick(), Some(EPOCH_TICK), "both pause now");
        assert_eq!(share.long_runners(), 2);
        drop(second);
        assert_eq!(share.long_runners(), 1);
        assert_eq!(first.on_tick(), None);
        drop(first);
        assert_eq!(share.long_runners(), 0);
    }
}
