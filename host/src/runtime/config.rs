//! `[engine]`: how many deliveries run at once, on which threads, the sandbox pool's caps and
//! the load gate's bounds.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::engine::PoolSettings;

/// Deliveries running at once across all handlers (one pool slot each; more wait in the durable
/// queue). Most of a delivery's place is spent waiting for the store, not computing — a sandbox
/// runs for tens of microseconds — so this is sized for deliveries in flight, not for cores:
/// four handlers at 1,000 events/s each need some 20–40 on two busy cores, and 16 left them
/// behind (docs/PERFORMANCE.md, scenario c). Handlers that keep computing are held to a quarter
/// of the machine whatever this is ([`crate::runtime::cpu_share`]).
pub const DEFAULT_MAX_CONCURRENT_DELIVERIES: usize = 64;

/// Most `[engine] max_concurrent_deliveries` accepted. `serve` sizes its sandbox pool to it, and
/// every pool slot reserves address space for its linear memories (about 8 GiB, nearly all of it
/// never touched): 4,096 slots reserve some 32 TiB of the 128 TiB a 64-bit Linux process has,
/// and far more deliveries than a node can usefully run at once.
pub const MAX_CONCURRENT_DELIVERIES: usize = 4096;

/// Most linear-memory slots the sandbox pool may reserve: `max_concurrent_deliveries` ×
/// `memories_per_delivery`. Each slot reserves about 4 GiB of address space (a memory of at
/// most 1 GiB and its guard regions), so this is the 32 TiB [`MAX_CONCURRENT_DELIVERIES`]
/// reserves at the default two memories per delivery. Each setting within its own range could
/// otherwise ask for more than the 128 TiB a process has, and the engine would fail to start
/// with an error from `mmap` that names no setting.
pub const MAX_MEMORY_SLOTS: usize = MAX_CONCURRENT_DELIVERIES * 2;

/// Most `[engine] sandbox_threads` accepted: more threads than sandboxes could ever run at once
/// only cost memory (a thread stack each).
pub const MAX_SANDBOX_THREADS: usize = 256;

/// Most `[engine] max_component_bytes` accepted: 1 GiB, thirty times the default. Compilation
/// time and memory grow with a component's size; past this a handler is not a handler.
pub const MAX_COMPONENT_BYTES: usize = 1 << 30;

/// The AOT cache directory inside the data directory, when `[engine] cache_dir` is not set.
pub const DEFAULT_CACHE_DIR: &str = "cache";

/// `[engine]`: concurrency and load-gate settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Deliveries running at once across all handlers.
    pub max_concurrent_deliveries: usize,
    /// Largest component accepted, in bytes.
    pub max_component_bytes: usize,
    /// Longest compilation of one component, in milliseconds.
    #[serde(rename = "compile_timeout_ms", with = "crate::duration_ms")]
    pub compile_timeout: Duration,
    /// Where `serve` keeps compiled components between runs (see [`crate::runtime::aot`]); relative
    /// paths are relative to the config file. Default: `cache` in the data directory.
    pub cache_dir: Option<PathBuf>,
    /// Threads of their own that run sandboxes at nice 10, below the rest of the process
    /// ([`crate::runtime::engine::SandboxThreads`]). 0 (the default) runs sandboxes on the
    /// dispatcher's threads, which `serve` already keeps apart from the API's
    /// ([`crate::queue::delivery_threads`]). See docs/PERFORMANCE.md (scenario d) for the
    /// trade-off.
    pub sandbox_threads: usize,
    /// Most core instances one component may contain (the pool refuses more at instantiation).
    pub max_core_instances_per_component: u32,
    /// Most linear memories one component may define.
    pub max_memories_per_component: u32,
    /// Most tables one component may define.
    pub max_tables_per_component: u32,
    /// Core instances the pool reserves per concurrent delivery; a delivery of a component with
    /// more waits for a free share (Python: 14, QuickJS: 9, Rust: 3).
    pub core_instances_per_delivery: u32,
    /// Linear memories the pool reserves per concurrent delivery (QuickJS: 2, others: 1).
    pub memories_per_delivery: u32,
    /// Tables the pool reserves per concurrent delivery.
    pub tables_per_delivery: u32,
}

impl EngineConfig {
    /// The pooling allocator settings of this section.
    pub fn pool(&self) -> PoolSettings {
        PoolSettings {
            max_core_instances_per_component: self.max_core_instances_per_component,
            max_memories_per_component: self.max_memories_per_component,
            max_tables_per_component: self.max_tables_per_component,
            core_instances_per_delivery: self.core_instances_per_delivery,
            memories_per_delivery: self.memories_per_delivery,
            tables_per_delivery: self.tables_per_delivery,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        let pool = PoolSettings::default();
        EngineConfig {
            max_concurrent_deliveries: DEFAULT_MAX_CONCURRENT_DELIVERIES,
            max_component_bytes: crate::runtime::loader::DEFAULT_MAX_COMPONENT_BYTES,
            compile_timeout: crate::runtime::loader::DEFAULT_COMPILE_TIMEOUT,
            cache_dir: None,
            sandbox_threads: 0,
            max_core_instances_per_component: pool.max_core_instances_per_component,
            max_memories_per_component: pool.max_memories_per_component,
            max_tables_per_component: pool.max_tables_per_component,
            core_instances_per_delivery: pool.core_instances_per_delivery,
            memories_per_delivery: pool.memories_per_delivery,
            tables_per_delivery: pool.tables_per_delivery,
        }
    }
}
