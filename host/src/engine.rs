//! The one wasmtime `Engine` of a jobhook process: pooling allocator, epoch interruption, and
//! every WebAssembly proposal a Rust `wasm32-wasip2` handler does not need switched off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

/// How often the epoch advances. Guest code is checked against its deadline at this granularity,
/// so a runaway loop is stopped at most one tick after its budget (Spin uses 10 ms too).
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sandboxes that may be alive at once. Every one holds a pooled slot (memory reservation, fiber
/// stack), so this bounds the host's memory and address space; more concurrent deliveries wait.
pub const DEFAULT_MAX_CONCURRENT_SANDBOXES: u32 = 256;

/// Hard cap on any one linear memory in the pool. Per-handler memory limits must be at or below
/// it; 1 GiB is far above any sensible handler and keeps each pooled slot's size bounded.
pub const MAX_MEMORY_PER_SANDBOX: usize = 1024 * 1024 * 1024;

/// Deepest wasm stack a handler may use. Deep recursion traps with a stack overflow at this
/// depth instead of touching the host's stack (guest code runs on its own fiber stack).
pub const MAX_WASM_STACK: usize = 512 * 1024;

/// Size of the fiber stack a sandbox runs on: the wasm stack plus room for host functions.
pub const ASYNC_STACK: usize = 2 * 1024 * 1024;

/// Size of the per-component instance metadata in the pool (`VMComponentContext`); Rust
/// components are well under it, and a component that needs more is refused at instantiation.
const MAX_COMPONENT_INSTANCE_SIZE: usize = 4 * 1024 * 1024;

/// Core instances in one component: a Rust component has 3–6; the cap stops a hostile one from
/// claiming a large share of the pool.
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 32;

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot configure the WebAssembly engine: {0}")]
pub struct EngineError(String);

/// A wasmtime engine with its epoch ticker. Cheap to clone; the ticker stops when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    _ticker: Arc<Ticker>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine with room for `max_concurrent` live sandboxes.
    pub fn new(max_concurrent: u32) -> Result<Self, EngineError> {
        let n = max_concurrent.max(1);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(MAX_MEMORY_PER_SANDBOX)
            .max_component_instance_size(MAX_COMPONENT_INSTANCE_SIZE)
            .max_core_instance_size(MAX_COMPONENT_INSTANCE_SIZE)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(crate::limits::DEFAULT_MAX_MEMORIES as u32)
            .max_tables_per_component(crate::limits::DEFAULT_MAX_TABLES as u32)
            .table_elements(crate::limits::DEFAULT_TABLE_ELEMENTS as usize * 5)
            .linear_memory_keep_resident(1024 * 1024)
            .table_keep_resident(64 * 1024);

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_init_cow(true)
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .async_stack_size(ASYNC_STACK)
            .async_stack_zeroing(true)
            .cranelift_opt_level(OptLevel::Speed)
            .parallel_compilation(true);
        // Attack-surface reduction: Rust wasm32-wasip2 handlers use none of these proposals.
        config
            .gc_support(false)
            .wasm_gc(false)
            .wasm_memory64(false)
            .wasm_function_references(false)
            .wasm_exceptions(false)
            .wasm_threads(false);

        let inner = wasmtime::Engine::new(&config).map_err(|e| EngineError(format!("{e:#}")))?;
        // Without the ticker a runaway guest could never be interrupted: refuse to run then.
        let ticker = Ticker::start(&inner)
            .map_err(|e| EngineError(format!("cannot start the epoch ticker thread: {e}")))?;
        Ok(Engine {
            inner,
            _ticker: Arc::new(ticker),
        })
    }

    /// The wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner
    }
}

/// A thread that advances the engine's epoch every [`EPOCH_TICK`].
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: &wasmtime::Engine) -> std::io::Result<Self> {
        let weak = engine.weak();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("jobhook-epoch".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_configuration_is_valid() {
        Engine::new(4).unwrap();
    }
}
