//! The one wasmtime `Engine` of a jobhook process: pooling allocator, epoch interruption, and
//! every WebAssembly proposal a Rust `wasm32-wasip2` handler does not need switched off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Enabled, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use crate::runtime::aot::AotCache;
use crate::runtime::cpu_share::CpuShare;
use crate::runtime::threads::{OwnRuntime, Scheduling};

/// How often the epoch advances. Guest code is checked against its deadline at this granularity,
/// so a runaway loop is stopped at most one tick after its budget — and, until then, hands its
/// worker thread back to the async runtime once per tick (`SandboxedHandler::invoke` yields at every
/// tick). Sandboxes share those worker threads with the HTTP API, so the tick bounds how long a
/// busy handler can hold up ingest: at 10 ms (Spin's value) two looping handlers raised the
/// ingest latency at 1,000 events/s from p50 2 ms to p50 24 ms; at 1 ms (measured in
/// docs/PERFORMANCE.md, scenario d) the cost is one cheap callback per millisecond of guest
/// CPU time.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Ticks in a row with no sandbox running after which the epoch ticker sleeps until one starts
/// ([`Engine::ticking`]): an idle engine then wakes no thread a thousand times a second (an
/// idle `jobhook serve` switched to the ticker about 900 times a second, nine in ten of all its
/// wake-ups), while under a stream of deliveries, with sandboxes starting every few
/// milliseconds, it never sleeps and no start has to wake it.
pub const IDLE_TICKS_BEFORE_SLEEP: u64 = 100;

/// Hard cap on any one linear memory in the pool. Per-handler memory limits must be at or below
/// it; 1 GiB is far above any sensible handler and keeps each pooled slot's size bounded.
pub const MAX_MEMORY_PER_SANDBOX: usize = 1024 * 1024 * 1024;

/// Deepest wasm stack a handler may use. Deep recursion traps with a stack overflow at this
/// depth instead of touching the host's stack (guest code runs on its own fiber stack).
pub const MAX_WASM_STACK: usize = 512 * 1024;

/// Guest frames kept in a trap's backtrace, innermost first: enough to see where a handler
/// failed, bounded so a deep recursion cannot make an outcome record large. The engine asks
/// wasmtime to capture this many (its own default is 20), and the trap's classification keeps
/// no more than that.
pub const MAX_BACKTRACE_FRAMES: usize = 32;

/// Size of the fiber stack a sandbox runs on: the wasm stack plus room for host functions.
pub const ASYNC_STACK: usize = 2 * 1024 * 1024;

/// Size of the per-component instance metadata in the pool (`VMComponentContext`); Rust
/// components are well under it, and a component that needs more is refused at instantiation.
pub(crate) const MAX_COMPONENT_INSTANCE_SIZE: usize = 4 * 1024 * 1024;

/// Default most core instances in one component: a Rust component has 3–6, C 5, QuickJS 9,
/// CPython (componentize-py) 14 (docs/LANGUAGES.md). No more than a delivery reserves
/// ([`DEFAULT_CORE_INSTANCES_PER_DELIVERY`]; [`PoolSettings::validate`] keeps that so): a
/// component allowed more than its delivery's share of the pool would let one handler's
/// deliveries hold the pool's instances and every other handler find no sandbox free.
pub const DEFAULT_MAX_CORE_INSTANCES_PER_COMPONENT: u32 = DEFAULT_CORE_INSTANCES_PER_DELIVERY;

/// Default core instances the pool reserves per concurrent delivery: enough for a Python handler
/// (14) in every slot at once, so `max_concurrent_deliveries` Python deliveries run together. The
/// old reservation of 8 let only 9 of 16 Python deliveries run at once (the rest failed with "no
/// sandbox slot is free" and were requeued). A reserved core instance costs address space only
/// (`max_core_instance_size`, 4 MiB, never touched unless used); measured in docs/LANGUAGES.md.
pub const DEFAULT_CORE_INSTANCES_PER_DELIVERY: u32 = 16;

/// Default linear memories the pool reserves per concurrent delivery: QuickJS components take
/// 2, everything else measured 1. Each reserved memory is a slot of [`MAX_MEMORY_PER_SANDBOX`]
/// plus guard pages of address space, so this is the expensive one to raise.
pub const DEFAULT_MEMORIES_PER_DELIVERY: u32 = 2;

/// Default tables the pool reserves per concurrent delivery (every language measured uses 2).
pub const DEFAULT_TABLES_PER_DELIVERY: u32 = 4;

/// Most core instances per component or per delivery accepted in `[engine]`: far above any real
/// component (componentize-py's `--stub-wasi` needs 38), and small enough that the pool's
/// reservation (`× max_concurrent_deliveries × 4 MiB` of address space) stays bounded.
pub const MAX_CORE_INSTANCES_SETTING: u32 = 1024;

/// Most memories per component or per delivery accepted in `[engine]`: each reserved memory is
/// over 1 GiB of address space.
pub const MAX_MEMORIES_SETTING: u32 = 16;

/// Most tables per component or per delivery accepted in `[engine]`.
pub const MAX_TABLES_SETTING: u32 = 256;

/// The pooling allocator's per-component caps and per-delivery reservation (`[engine]`
/// settings). Per-handler `instances`/`memories`/`tables` limits apply within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Most core instances one component may contain (refused at instantiation above it).
    pub max_core_instances_per_component: u32,
    /// Most linear memories one component may define.
    pub max_memories_per_component: u32,
    /// Most tables one component may define.
    pub max_tables_per_component: u32,
    /// Core instances reserved per concurrent delivery (the pool holds this many times the
    /// number of sandboxes).
    pub core_instances_per_delivery: u32,
    /// Linear memories reserved per concurrent delivery.
    pub memories_per_delivery: u32,
    /// Tables reserved per concurrent delivery.
    pub tables_per_delivery: u32,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_core_instances_per_component: DEFAULT_MAX_CORE_INSTANCES_PER_COMPONENT,
            max_memories_per_component: crate::limits::DEFAULT_MAX_MEMORIES as u32,
            max_tables_per_component: crate::limits::DEFAULT_MAX_TABLES as u32,
            core_instances_per_delivery: DEFAULT_CORE_INSTANCES_PER_DELIVERY,
            memories_per_delivery: DEFAULT_MEMORIES_PER_DELIVERY,
            tables_per_delivery: DEFAULT_TABLES_PER_DELIVERY,
        }
    }
}

impl PoolSettings {
    /// Checks every value is between 1 and its `MAX_*_SETTING`, and that no component may use
    /// more of the pool than a delivery reserves (a delivery of such a component would take the
    /// reservation of others: one handler's deliveries could hold the whole pool, and every
    /// other handler's fail with "no sandbox slot is free"); the message names the settings.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (
                "max_core_instances_per_component",
                self.max_core_instances_per_component,
                MAX_CORE_INSTANCES_SETTING,
            ),
            (
                "core_instances_per_delivery",
                self.core_instances_per_delivery,
                MAX_CORE_INSTANCES_SETTING,
            ),
            (
                "max_memories_per_component",
                self.max_memories_per_component,
                MAX_MEMORIES_SETTING,
            ),
            (
                "memories_per_delivery",
                self.memories_per_delivery,
                MAX_MEMORIES_SETTING,
            ),
            (
                "max_tables_per_component",
                self.max_tables_per_component,
                MAX_TABLES_SETTING,
            ),
            (
                "tables_per_delivery",
                self.tables_per_delivery,
                MAX_TABLES_SETTING,
            ),
        ];
        for (name, value, max) in checks {
            if !(1..=max).contains(&value) {
                return Err(format!(
                    "{name} must be between 1 and {max} (it is {value})"
                ));
            }
        }
        let pairs = [
            (
                "max_core_instances_per_component",
                self.max_core_instances_per_component,
                "core_instances_per_delivery",
                self.core_instances_per_delivery,
            ),
            (
                "max_memories_per_component",
                self.max_memories_per_component,
                "memories_per_delivery",
                self.memories_per_delivery,
            ),
            (
                "max_tables_per_component",
                self.max_tables_per_component,
                "tables_per_delivery",
                self.tables_per_delivery,
            ),
        ];
        for (cap, most, reserved, each) in pairs {
            if most > each {
                return Err(format!(
                    "{cap} ({most}) is above {reserved} ({each}): a delivery of such a component \
                     would take more of the sandbox pool than a delivery reserves, and one \
                     handler could hold every slot; raise {reserved} to at least {most} as well"
                ));
            }
        }
        Ok(())
    }
}

/// Dirty bytes of a linear memory that are reset in place (copied back from the component's
/// memory image or zeroed) when its pool slot is reused, instead of being handed back to the
/// kernel and faulted in again by the next sandbox. With `PAGEMAP_SCAN` (Linux 6.7+, used when
/// available) only pages the guest actually wrote are reset, so a Rust handler's working set of a
/// few hundred KiB is reset with a `memcpy` and no `madvise` at all; without it, the lowest
/// addresses are reset, as before. Either way every sandbox starts from pristine memory; this only
/// decides how. 1 MiB covers a small handler's working set (measured: `jobhook-bench
/// pool-tuning`, docs/PERFORMANCE.md).
const MEMORY_KEEP_RESIDENT: usize = 1024 * 1024;

/// Table bytes reset in place on slot reuse (same mechanism as [`MEMORY_KEEP_RESIDENT`]).
const TABLE_KEEP_RESIDENT: usize = 64 * 1024;

/// Bytes at the top of a fiber stack that are zeroed in place on slot reuse; the rest of the
/// stack is returned to the kernel (`async_stack_zeroing` stays on, so a sandbox never sees an
/// earlier sandbox's stack). A call into a handler uses a few tens of KiB of it; keeping them
/// resident saves page faults on every delivery. Measured (`jobhook-bench pool-tuning`, same
/// run): 16 KiB would save 0.3 µs of `memset` per delivery (floor 10.9 vs 11.2 µs; the noop and
/// log-context handlers stay within it), but each stack page a heavier handler touches beyond
/// the kept part is a page fault on every delivery, and one fault costs ~2.6 µs here (keeping
/// 0 bytes: 13.9 µs, 1 fault per call) — so the margin stays.
const STACK_KEEP_RESIDENT: usize = 64 * 1024;

/// Regions the pool collects before returning them to the kernel in one `process_madvise`
/// (wasmtime's default, 1: every slot is reset when it is freed). Batching does not pay in
/// wasmtime 48: every freed sandbox queues four regions (its stack and three empty ones for
/// memory and tables), so batches of 2 or 4 still flush once per delivery, only through the
/// slower `process_madvise`, and a batch of 8 also keeps slots out of reuse; measured
/// (`jobhook-bench pool-tuning`, same run): 12.4 / 11.7 / 12.5 µs against 11.2 µs per delivery.
const DECOMMIT_BATCH_SIZE: usize = 1;

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot configure the WebAssembly engine: {0}")]
pub struct EngineError(String);

/// A wasmtime engine with its epoch ticker. Cheap to clone; the ticker stops when the last clone
/// is dropped (and no run of guest code holds it: [`Ticking`]).
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    /// Advances the epoch while guest code may run.
    ticker: Arc<Ticker>,
    aot: Option<Arc<AotCache>>,
    sandboxes: Option<Arc<SandboxThreads>>,
    cpu_share: CpuShare,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// The pooling allocator settings of an engine with room for `max_concurrent` live sandboxes,
/// with the default [`PoolSettings`].
pub fn pooling_config(max_concurrent: u32) -> PoolingAllocationConfig {
    pooling_config_with(max_concurrent, &PoolSettings::default())
}

/// The pooling allocator settings of an engine with room for `max_concurrent` live sandboxes.
pub fn pooling_config_with(
    max_concurrent: u32,
    settings: &PoolSettings,
) -> PoolingAllocationConfig {
    let n = max_concurrent.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(settings.core_instances_per_delivery.max(1)))
        .total_memories(n.saturating_mul(settings.memories_per_delivery.max(1)))
        .total_tables(n.saturating_mul(settings.tables_per_delivery.max(1)))
        .total_stacks(n)
        .max_memory_size(MAX_MEMORY_PER_SANDBOX)
        .max_component_instance_size(MAX_COMPONENT_INSTANCE_SIZE)
        .max_core_instance_size(MAX_COMPONENT_INSTANCE_SIZE)
        .max_core_instances_per_component(settings.max_core_instances_per_component.max(1))
        .max_memories_per_component(settings.max_memories_per_component.max(1))
        .max_tables_per_component(settings.max_tables_per_component.max(1))
        .table_elements(usize::try_from(crate::limits::MAX_TABLE_ELEMENTS).unwrap_or(usize::MAX))
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto)
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .async_stack_keep_resident(STACK_KEEP_RESIDENT)
        .decommit_batch_size(DECOMMIT_BATCH_SIZE);
    pool
}

/// The wasmtime configuration of every jobhook engine, with `allocation` as its instance
/// allocator (the engine uses [`pooling_config`]; the benchmarks compare it with on-demand).
pub fn wasmtime_config(allocation: InstanceAllocationStrategy) -> Config {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .allocation_strategy(allocation)
        .memory_init_cow(true)
        .epoch_interruption(true)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(ASYNC_STACK)
        .async_stack_zeroing(true)
        .cranelift_opt_level(OptLevel::Speed)
        .parallel_compilation(true)
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(MAX_BACKTRACE_FRAMES));
    // Attack-surface reduction: Rust wasm32-wasip2 handlers use none of these proposals.
    config
        .gc_support(false)
        .wasm_gc(false)
        .wasm_memory64(false)
        .wasm_function_references(false)
        .wasm_exceptions(false)
        .wasm_threads(false);
    config
}

impl Engine {
    /// An engine with room for `max_concurrent` live sandboxes and the default pool settings.
    pub fn new(max_concurrent: u32) -> Result<Self, EngineError> {
        Self::with_pool(max_concurrent, &PoolSettings::default())
    }

    /// An engine with room for `max_concurrent` live sandboxes and the pool `settings`.
    pub fn with_pool(max_concurrent: u32, settings: &PoolSettings) -> Result<Self, EngineError> {
        settings.validate().map_err(EngineError)?;
        Self::with_config(&wasmtime_config(InstanceAllocationStrategy::Pooling(
            pooling_config_with(max_concurrent, settings),
        )))
    }

    /// An engine built from `config` (a variant of [`wasmtime_config`] with [`pooling_config`])
    /// instead of jobhook's own: only for `jobhook-bench pool-tuning`, which compares
    /// `SandboxedHandler::invoke` on such variants. The settings the sandbox's limits rely on (epoch
    /// interruption, fiber stack zeroing, the wasm stack limit) are set again whatever `config`
    /// says; the epoch ticker and the CPU share are as in [`Engine::new`].
    #[doc(hidden)]
    pub fn with_config(config: &Config) -> Result<Self, EngineError> {
        let mut config = config.clone();
        config
            .epoch_interruption(true)
            .async_stack_zeroing(true)
            .max_wasm_stack(MAX_WASM_STACK);
        let inner = wasmtime::Engine::new(&config).map_err(|e| EngineError(format!("{e:#}")))?;
        // Without the ticker a runaway guest could never be interrupted: refuse to run then.
        let ticker = Ticker::start(&inner)
            .map_err(|e| EngineError(format!("cannot start the epoch ticker thread: {e}")))?;
        Ok(Engine {
            inner,
            ticker: Arc::new(ticker),
            aot: None,
            sandboxes: None,
            cpu_share: CpuShare::for_machine(EPOCH_TICK),
        })
    }

    /// The wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner
    }

    /// Keeps the epoch ticker ticking for as long as it is held, waking it if it sleeps: held
    /// by every run of guest code (`SandboxedHandler::invoke` moves it into the run itself, so
    /// it lives exactly as long as the guest can run). Guest code is interrupted only by ticks:
    /// without them a loop would run past its budget for ever.
    pub fn ticking(&self) -> Ticking {
        self.ticker.shared.running.fetch_add(1, Ordering::SeqCst);
        self.ticker.shared.started.store(true, Ordering::Relaxed);
        // Paired with the ticker's own SeqCst store and load: either it sees this sandbox
        // running and does not sleep, or this sees it asleep (or about to be) and wakes it. An
        // unpark before its park makes that park return at once.
        if self.ticker.shared.sleeping.load(Ordering::SeqCst)
            && let Some(thread) = &self.ticker.thread
        {
            thread.thread().unpark();
        }
        Ticking {
            ticker: Arc::clone(&self.ticker),
        }
    }

    /// Whether the epoch ticker sleeps now, no sandbox having run for
    /// [`IDLE_TICKS_BEFORE_SLEEP`] ticks; and how many ticks it has made since the engine
    /// started. What a test of the sleep looks at.
    pub fn ticker_state(&self) -> (bool, u64) {
        let shared = &self.ticker.shared;
        (
            shared.sleeping.load(Ordering::SeqCst),
            shared.ticks.load(Ordering::SeqCst),
        )
    }

    /// The cores that long-running deliveries share (see [`crate::runtime::cpu_share`]).
    pub fn cpu_share(&self) -> &CpuShare {
        &self.cpu_share
    }

    /// This engine, loading components through `cache` (see [`crate::runtime::aot`]).
    pub fn with_aot_cache(mut self, cache: AotCache) -> Self {
        self.aot = Some(Arc::new(cache));
        self
    }

    /// This engine with the AOT cache under `root` attached; when the directory cannot be
    /// used, the engine runs without a cache (compiling every component at start) and says why.
    pub fn with_aot_cache_at(self, root: &std::path::Path) -> Self {
        match AotCache::open(root, self.wasmtime()) {
            Ok(cache) => {
                tracing::info!(dir = %cache.dir().display(), "AOT cache in use");
                self.with_aot_cache(cache)
            }
            Err(e) => {
                tracing::warn!("running without an AOT cache: {e}");
                self
            }
        }
    }

    /// The AOT cache components are loaded through, if any.
    pub fn aot_cache(&self) -> Option<&Arc<AotCache>> {
        self.aot.as_ref()
    }

    /// This engine, running every sandbox on `threads` threads of its own, below the priority
    /// of the rest of the process (see [`SandboxThreads`]). Without it, sandboxes run on the
    /// async runtime that calls [`crate::SandboxedHandler::invoke`].
    pub fn with_sandbox_threads(mut self, threads: usize) -> Result<Self, EngineError> {
        let pool = SandboxThreads::start(threads)
            .map_err(|e| EngineError(format!("cannot start the sandbox threads: {e}")))?;
        self.sandboxes = Some(Arc::new(pool));
        Ok(self)
    }

    /// The threads sandboxes run on, if the engine has its own.
    pub fn sandbox_threads(&self) -> Option<&SandboxThreads> {
        self.sandboxes.as_deref()
    }
}

/// Nice value of the sandbox threads: ten steps below normal, so that under contention the kernel
/// gives the process's other threads — the HTTP API, the ingest writer, the dispatcher — about ten
/// times the CPU share of a thread running guest code. Lowering a thread's own priority needs no
/// privilege.
const SANDBOX_THREAD_NICE: i32 = 10;

/// A multi-threaded async runtime that only runs sandboxes, on threads of lower priority than
/// the rest of the process (Linux). Handler code is untrusted and may burn CPU up to its budget;
/// on the threads of whoever calls [`crate::SandboxedHandler::invoke`] it competes with their
/// other work (it yields every [`EPOCH_TICK`]; `serve` runs that work on delivery threads of
/// their own, [`crate::queue::delivery_threads`]), on these it only gets what the rest leaves.
///
/// The price is a hand-over to another thread and back for every delivery (tens of µs on a
/// virtual machine; measured in docs/PERFORMANCE.md, scenario a), and a low-priority thread that
/// is preempted while holding a lock the process shares (the allocator's, the kernel's memory map
/// lock during memory growth) can delay a normal-priority one. Opt-in (`[engine]
/// sandbox_threads`); scenario d of `jobhook-bench` measures both modes in one run.
#[derive(Debug)]
pub struct SandboxThreads {
    runtime: OwnRuntime,
}

impl SandboxThreads {
    fn start(threads: usize) -> std::io::Result<Self> {
        Ok(SandboxThreads {
            runtime: OwnRuntime::start(
                "jobhook-sandbox",
                Some(threads),
                Scheduling::Nice(SANDBOX_THREAD_NICE),
            )?,
        })
    }

    /// Runs `future` on the sandbox threads and waits for it. Dropping the returned future
    /// (e.g. when a delivery is interrupted at shutdown) aborts the task, so a sandbox never
    /// outlives the call that started it.
    pub async fn run<F>(&self, future: F) -> Result<F::Output, tokio::task::JoinError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.run(future).await
    }
}

/// The name of the thread that advances the epoch (`top -H` shows it).
pub const EPOCH_THREAD_NAME: &str = "jobhook-epoch";

/// A thread that advances the engine's epoch every [`EPOCH_TICK`] while guest code may run, and
/// sleeps once none has for [`IDLE_TICKS_BEFORE_SLEEP`] ticks.
struct Ticker {
    shared: Arc<TickerShared>,
    /// Its thread: woken by a run that finds it asleep, joined when the engine is dropped.
    thread: Option<JoinHandle<()>>,
}

/// What the ticker and the sandboxes share.
#[derive(Default)]
struct TickerShared {
    /// Runs of guest code under way ([`Ticking`] guards).
    running: AtomicUsize,
    /// Set by every run that starts, taken by the ticker at each tick: a stream of short runs
    /// that all fall between two ticks keeps it awake too.
    started: AtomicBool,
    /// Set by the ticker before it sleeps, cleared when it wakes.
    sleeping: AtomicBool,
    /// Ticks made, for [`Engine::ticker_state`].
    ticks: AtomicU64,
    stop: AtomicBool,
}

impl Ticker {
    fn start(engine: &wasmtime::Engine) -> std::io::Result<Self> {
        let weak = engine.weak();
        let shared = Arc::new(TickerShared::default());
        let state = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(EPOCH_THREAD_NAME.into())
            .spawn(move || {
                let mut idle = 0u64;
                while !state.stop.load(Ordering::SeqCst) {
                    let started = state.started.swap(false, Ordering::Relaxed);
                    if state.running.load(Ordering::SeqCst) == 0 && !started {
                        idle = idle.saturating_add(1);
                    } else {
                        idle = 0;
                    }
                    if idle > IDLE_TICKS_BEFORE_SLEEP {
                        state.sleeping.store(true, Ordering::SeqCst);
                        // Looked at again after saying so: a sandbox that started before the
                        // store above did not wake this thread (see `Engine::ticking`).
                        if state.running.load(Ordering::SeqCst) == 0
                            && !state.stop.load(Ordering::SeqCst)
                        {
                            std::thread::park();
                        }
                        state.sleeping.store(false, Ordering::SeqCst);
                        idle = 0;
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                    state.ticks.fetch_add(1, Ordering::SeqCst);
                }
            })?;
        Ok(Ticker {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Keeps the epoch ticker of an engine ticking while held ([`Engine::ticking`]).
#[must_use = "the ticker may sleep as soon as this is dropped"]
pub struct Ticking {
    ticker: Arc<Ticker>,
}

impl std::fmt::Debug for Ticking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticking").finish_non_exhaustive()
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        self.ticker.shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_configuration_is_valid() {
        Engine::new(4).unwrap();
    }

    /// Polls `done` until it holds; fails after far longer than it should take.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(EPOCH_TICK);
        }
    }

    #[test]
    fn the_ticker_sleeps_while_no_guest_runs_and_ticks_while_one_may() {
        let engine = Engine::new(1).unwrap();
        until("asleep when idle", || engine.ticker_state().0);
        let (_, asleep_at) = engine.ticker_state();
        std::thread::sleep(EPOCH_TICK * 20);
        assert_eq!(engine.ticker_state().1, asleep_at, "ticked while asleep");

        // A run of guest code wakes it, and it does not sleep while the run lasts, however long.
        let run = engine.ticking();
        let woken = engine.ticker_state().1;
        until("ticking again", || engine.ticker_state().1 > woken);
        let from = engine.ticker_state().1;
        until("past the idle ticks", || {
            engine.ticker_state().1 > from + 2 * IDLE_TICKS_BEFORE_SLEEP
        });
        assert!(!engine.ticker_state().0, "asleep while a guest may run");

        // Once the run ends it sleeps again; the engine's end stops the sleeping thread.
        drop(run);
        until("asleep again", || engine.ticker_state().0);
        drop(engine);
    }
}
