//! Scenario a: what one delivery costs — a fresh sandbox and one `run-handler` call of a handler
//! that does nothing (`guest-bench-noop`).
//!
//! Variants, all timed per call in the same process and interleaved round by round, so that a
//! change in machine load affects them alike:
//!
//! - **jobhook**: `SandboxedHandler::invoke` — what the dispatcher calls for every delivery: the pooled
//!   engine of `jobhook::Engine`, the component's `InstancePre`, a fresh `Store` with every limit,
//!   WASI locked down, capability state, the epoch deadline and the outer timeout, and the
//!   recorded `Outcome`.
//! - **baseline (on-demand)**: the plain way to do the same — an engine configured like
//!   `jobhook::Engine` but with the on-demand instance allocator, a `Store` with an empty WASI
//!   context and nothing else, and `Handler::instantiate_async(store, component, linker)`, which
//!   resolves and type-checks the imports on every call (no `InstancePre`).
//! - **floor (pooled wasmtime)**: the baseline's minimal store, but on jobhook's pooled engine
//!   with an `InstancePre`: what wasmtime alone costs, so that jobhook's own bookkeeping per
//!   delivery is visible as the difference.
//! - **jobhook, log-context**: `SandboxedHandler::invoke` of the real minimal example handler (eleven
//!   log lines through the `log` capability), for scale.
//! - **jobhook on sandbox threads**: `SandboxedHandler::invoke` on an engine with its own low-priority
//!   sandbox threads, as `jobhook serve` runs it with `[engine] sandbox_threads`: the first
//!   variant plus a hand-over to another thread and back.
//! - **jobhook, no WASI imports**: `SandboxedHandler::invoke` of the same noop source built for
//!   `wasm32-unknown-unknown` and made a component (`crate::narrow`): it imports only
//!   `jobhook:handler/types`, where the `wasm32-wasip2` build imports 13 WASI interfaces; also
//!   timed by phase on the floor's minimal store.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use jobhook::bindings::Handler as Bindings;
use jobhook::bindings::HandlerPre;
use jobhook::capabilities::Grants;
use jobhook::capabilities::Services;
use jobhook::runtime::sandbox::to_wit;
use jobhook::{
    Delivery, Engine, JobContext, LoadOptions, OutcomeKind, SandboxSpec, SandboxedHandler,
};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{InstanceAllocationStrategy, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Pool size of the jobhook engine in this benchmark: the calls are sequential, a few slots are
/// plenty.
const POOL_SLOTS: u32 = 8;

/// Sandbox threads of the engine of the `OnThreads` variant: two, one per core of the
/// two-core machines these figures come from.
const SANDBOX_THREADS: usize = 2;

/// Epoch deadline of the minimal stores, in ticks: far beyond any call here (the on-demand
/// engine has no ticker; on the pooled engine a tick is 10 ms).
const MINIMAL_DEADLINE_TICKS: u64 = 1_000_000;

/// The minimal store state of the baseline and floor variants: an empty WASI context.
pub struct MinimalState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl MinimalState {
    fn new() -> Self {
        MinimalState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for MinimalState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The same component on a raw wasmtime engine with [`MinimalState`].
pub struct RawWasmtime {
    engine: wasmtime::Engine,
    component: Component,
    linker: Linker<MinimalState>,
    pre: Option<HandlerPre<MinimalState>>,
}

impl RawWasmtime {
    /// Compiles `wasm` for `engine`; with `instance_pre`, resolves imports once up front.
    /// Imports other than WASI (the jobhook interfaces) are defined as traps: the noop handler
    /// does not call them.
    pub fn new(engine: wasmtime::Engine, wasm: &[u8], instance_pre: bool) -> anyhow::Result<Self> {
        let component = Component::new(&engine, wasm).map_err(wt)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wt)?;
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(wt)?;
        let pre = if instance_pre {
            Some(HandlerPre::new(linker.instantiate_pre(&component).map_err(wt)?).map_err(wt)?)
        } else {
            None
        };
        Ok(RawWasmtime {
            engine,
            component,
            linker,
            pre,
        })
    }

    /// A fresh store and instance, one `run-handler` call, the store dropped.
    pub async fn call(&self, context: &JobContext) -> anyhow::Result<()> {
        let mut store = Store::new(&self.engine, MinimalState::new());
        store.set_epoch_deadline(MINIMAL_DEADLINE_TICKS);
        let context = to_wit(context);
        let bindings = match &self.pre {
            Some(pre) => pre.instantiate_async(&mut store).await.map_err(wt)?,
            None => Bindings::instantiate_async(&mut store, &self.component, &self.linker)
                .await
                .map_err(wt)?,
        };
        bindings
            .call_run_handler(&mut store, &context)
            .await
            .map_err(wt)?
            .map_err(|reason| anyhow::anyhow!("the handler failed: {reason}"))
    }
}

impl RawWasmtime {
    /// Like [`RawWasmtime::call`] with `InstancePre`, timing its three phases: store creation
    /// and instantiation, the `run-handler` call, and dropping the store (which resets and
    /// returns the pool slots).
    pub async fn call_phases(&self, context: &JobContext) -> anyhow::Result<[Duration; 3]> {
        let pre = self
            .pre
            .as_ref()
            .context("phases are timed with an InstancePre")?;
        let start = Instant::now();
        let mut store = Store::new(&self.engine, MinimalState::new());
        store.set_epoch_deadline(MINIMAL_DEADLINE_TICKS);
        let bindings = pre.instantiate_async(&mut store).await.map_err(wt)?;
        let instantiated = Instant::now();
        bindings
            .call_run_handler(&mut store, &to_wit(context))
            .await
            .map_err(wt)?
            .map_err(|reason| anyhow::anyhow!("the handler failed: {reason}"))?;
        let called = Instant::now();
        drop(store);
        let dropped = Instant::now();
        Ok([
            instantiated - start,
            called - instantiated,
            dropped - called,
        ])
    }
}

/// wasmtime's error type does not implement `std::error::Error` without its `anyhow` feature.
fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// An engine configured exactly like `jobhook::Engine` (same proposals, stack, epochs, Cranelift
/// settings: `jobhook::runtime::engine::wasmtime_config`) but with the on-demand instance allocator:
/// memories, tables and instances are `mmap`ed for every instance and unmapped after it.
pub fn on_demand_engine() -> anyhow::Result<wasmtime::Engine> {
    wasmtime::Engine::new(&jobhook::runtime::engine::wasmtime_config(
        InstanceAllocationStrategy::OnDemand,
    ))
    .map_err(wt)
}

/// Everything scenario a (and b's jobhook side) needs, set up once.
pub struct DeliveryRig {
    /// A current-thread runtime: calls are sequential, no cross-thread wake-ups.
    pub runtime: tokio::runtime::Runtime,
    /// The context every call gets (the testkit's sample inventory job).
    pub context: JobContext,
    /// jobhook's engine.
    pub engine: Engine,
    /// `guest-bench-noop` loaded through jobhook's load gate.
    pub noop: SandboxedHandler,
    /// `log-context` loaded through jobhook's load gate.
    pub log_context: SandboxedHandler,
    /// `guest-bench-noop` on an engine with sandbox threads (`[engine] sandbox_threads`).
    pub noop_on_threads: SandboxedHandler,
    /// `guest-bench-noop` on an on-demand engine without `InstancePre`.
    pub baseline: RawWasmtime,
    /// `guest-bench-noop` on jobhook's pooled engine with `InstancePre`, minimal state.
    pub floor: RawWasmtime,
    /// `guest-bench-noop` without WASI imports, loaded through jobhook's load gate.
    pub narrow: SandboxedHandler,
    /// `guest-bench-noop` without WASI imports on the floor's engine and minimal state.
    pub narrow_floor: RawWasmtime,
}

impl DeliveryRig {
    /// Builds the guests (first use), compiles them three ways and checks that each variant
    /// succeeds once.
    pub fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let context = JobContext::from_json_value(&jobhook_testkit::sample_context_json())
            .context("the sample context")?;
        let engine = Engine::new(POOL_SLOTS)?;
        let noop_wasm = jobhook_testkit::guest_bytes("guest-bench-noop");
        let log_wasm = jobhook_testkit::guest_bytes("log-context");
        let (services, options) = (Services::default(), LoadOptions::default());
        let load = |wasm: Vec<u8>, name: &str| {
            let mut spec = SandboxSpec::new(name);
            spec.grants = Grants::default();
            runtime.block_on(SandboxedHandler::load(
                &engine, &services, wasm, spec, &options,
            ))
        };
        let narrow_wasm = crate::narrow::noop_without_wasi()?;
        let noop = load(noop_wasm.clone(), "bench-noop")?;
        let log_context = load(log_wasm, "log-context")?;
        let narrow = load(narrow_wasm.clone(), "bench-noop-no-wasi")?;
        let threaded = Engine::new(POOL_SLOTS)?.with_sandbox_threads(SANDBOX_THREADS)?;
        let noop_on_threads = runtime.block_on(SandboxedHandler::load(
            &threaded,
            &services,
            noop_wasm.clone(),
            SandboxSpec::new("bench-noop-threads"),
            &options,
        ))?;
        let baseline = RawWasmtime::new(on_demand_engine()?, &noop_wasm, false)?;
        let floor = RawWasmtime::new(engine.wasmtime().clone(), &noop_wasm, true)?;
        let narrow_floor = RawWasmtime::new(engine.wasmtime().clone(), &narrow_wasm, true)?;
        let rig = DeliveryRig {
            runtime,
            context,
            engine,
            noop,
            log_context,
            noop_on_threads,
            baseline,
            floor,
            narrow,
            narrow_floor,
        };
        rig.check()?;
        Ok(rig)
    }

    /// Every variant succeeds (a benchmark of failing calls would measure the wrong thing).
    fn check(&self) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            for handler in [
                &self.noop,
                &self.log_context,
                &self.noop_on_threads,
                &self.narrow,
            ] {
                let outcome = handler.invoke(&self.context, Delivery::default()).await;
                anyhow::ensure!(
                    outcome.kind == OutcomeKind::Succeeded,
                    "{:?} did not succeed: {}",
                    handler.spec().name,
                    outcome.kind
                );
            }
            self.baseline.call(&self.context).await?;
            self.narrow_floor.call(&self.context).await?;
            self.floor.call(&self.context).await
        })
    }

    /// One jobhook delivery to `handler` (one of this rig's); whether it succeeded.
    pub async fn deliver(&self, handler: &SandboxedHandler) -> bool {
        handler
            .invoke(&self.context, Delivery::default())
            .await
            .kind
            .is_success()
    }
}

/// The variants of scenario a (and b), in the order they are run in each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `SandboxedHandler::invoke` of the noop handler.
    Jobhook,
    /// On-demand engine, plain `Store`, instantiate without `InstancePre`.
    Baseline,
    /// Pooled engine, minimal `Store`, `InstancePre`.
    Floor,
    /// `SandboxedHandler::invoke` of `log-context`.
    LogContext,
    /// `SandboxedHandler::invoke` of the noop handler on sandbox threads.
    OnThreads,
    /// [`Variant::Floor`] timed by phase (instantiate, call, drop).
    FloorPhases,
    /// `SandboxedHandler::invoke` of the noop handler built without WASI imports.
    Narrow,
    /// The floor of the noop handler built without WASI imports, timed by phase.
    NarrowPhases,
}

/// Per-call times in microseconds, per variant.
#[derive(Debug, Default)]
pub struct Samples {
    /// [`Variant::Jobhook`].
    pub jobhook: Vec<f64>,
    /// [`Variant::Baseline`].
    pub baseline: Vec<f64>,
    /// [`Variant::Floor`].
    pub floor: Vec<f64>,
    /// [`Variant::LogContext`].
    pub log_context: Vec<f64>,
    /// [`Variant::OnThreads`].
    pub on_threads: Vec<f64>,
    /// [`Variant::FloorPhases`]: instantiate, call and drop times.
    pub floor_phases: [Vec<f64>; 3],
    /// [`Variant::Narrow`].
    pub narrow: Vec<f64>,
    /// [`Variant::NarrowPhases`]: instantiate, call and drop times.
    pub narrow_phases: [Vec<f64>; 3],
    /// Calls that did not succeed (should be 0).
    pub failures: u64,
}

impl Samples {
    /// Where the per-call times of `variant` go (`None` for the by-phase variants: [`phased`]).
    fn of(&mut self, variant: Variant) -> Option<&mut Vec<f64>> {
        match variant {
            Variant::Jobhook => Some(&mut self.jobhook),
            Variant::Baseline => Some(&mut self.baseline),
            Variant::Floor => Some(&mut self.floor),
            Variant::LogContext => Some(&mut self.log_context),
            Variant::OnThreads => Some(&mut self.on_threads),
            Variant::Narrow => Some(&mut self.narrow),
            Variant::FloorPhases | Variant::NarrowPhases => None,
        }
    }
}

/// For a by-phase variant, the component it times and where its phases go.
fn phased<'a>(
    rig: &'a DeliveryRig,
    samples: &'a mut Samples,
    variant: Variant,
) -> Option<(&'a RawWasmtime, &'a mut [Vec<f64>; 3])> {
    match variant {
        Variant::FloorPhases => Some((&rig.floor, &mut samples.floor_phases)),
        Variant::NarrowPhases => Some((&rig.narrow_floor, &mut samples.narrow_phases)),
        _ => None,
    }
}

/// Runs `calls` calls of `variant`, timing each; records them unless `warm_up`.
pub fn run_round(
    rig: &DeliveryRig,
    variant: Variant,
    calls: usize,
    samples: &mut Samples,
    warm_up: bool,
) {
    let mut failures = 0u64;
    if let Some((raw, all)) = phased(rig, samples, variant) {
        let mut phases: [Vec<f64>; 3] = Default::default();
        rig.runtime.block_on(async {
            for _ in 0..calls {
                match raw.call_phases(&rig.context).await {
                    Ok(p) => {
                        for (slot, d) in phases.iter_mut().zip(p) {
                            slot.push(micros(d));
                        }
                    }
                    Err(_) => failures += 1,
                }
            }
        });
        if !warm_up {
            for (all, new) in all.iter_mut().zip(phases) {
                all.extend(new);
            }
            samples.failures += failures;
        }
        return;
    }
    let mut times = Vec::with_capacity(calls);
    rig.runtime.block_on(async {
        for _ in 0..calls {
            let start = Instant::now();
            let ok = match variant {
                Variant::Jobhook => rig.deliver(&rig.noop).await,
                Variant::LogContext => rig.deliver(&rig.log_context).await,
                Variant::OnThreads => rig.deliver(&rig.noop_on_threads).await,
                Variant::Narrow => rig.deliver(&rig.narrow).await,
                // Timed by phase above; never reaches here.
                Variant::FloorPhases | Variant::NarrowPhases => false,
                Variant::Baseline => rig.baseline.call(&rig.context).await.is_ok(),
                Variant::Floor => rig.floor.call(&rig.context).await.is_ok(),
            };
            times.push(micros(start.elapsed()));
            failures += u64::from(!ok);
        }
    });
    if !warm_up {
        if let Some(all) = samples.of(variant) {
            all.extend(times);
        }
        samples.failures += failures;
    }
}

/// A duration in microseconds.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
