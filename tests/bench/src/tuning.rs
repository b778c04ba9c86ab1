//! `jobhook-bench pool-tuning`: how the pooling allocator's reset settings change the cost of a
//! fresh instance. The noop guest is instantiated and called (minimal store, `InstancePre`) on
//! engines that differ only in `linear_memory_keep_resident`, `pagemap_scan` and
//! `async_stack_keep_resident`, interleaved round by round.
//!
//! This is the measurement behind the pool settings in `host/src/engine.rs` (see
//! docs/PERFORMANCE.md, "Changes the figures justified"); the first variant is jobhook's setting
//! before issue 6, the last one its setting since.

use std::time::Instant;

use jobhook::JobContext;
use wasmtime::{Enabled, InstanceAllocationStrategy};

use crate::delivery::{RawWasmtime, micros};
use crate::stats::Summary;

/// One engine variant: a name, linear-memory keep-resident bytes, `PAGEMAP_SCAN` use and
/// fiber-stack keep-resident bytes.
struct Variant {
    name: &'static str,
    memory: usize,
    pagemap: Enabled,
    stack: usize,
}

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

const VARIANTS: &[Variant] = &[
    Variant {
        name: "memory 1 MiB memset, stack 0 (before issue 6)",
        memory: MIB,
        pagemap: Enabled::No,
        stack: 0,
    },
    Variant {
        name: "memory 0 (madvise everything)",
        memory: 0,
        pagemap: Enabled::No,
        stack: 0,
    },
    Variant {
        name: "memory 64 KiB memset",
        memory: 64 * KIB,
        pagemap: Enabled::No,
        stack: 0,
    },
    Variant {
        name: "memory 1 MiB, pagemap scan",
        memory: MIB,
        pagemap: Enabled::Auto,
        stack: 0,
    },
    Variant {
        name: "memory 1 MiB, pagemap scan, stack 16 KiB",
        memory: MIB,
        pagemap: Enabled::Auto,
        stack: 16 * KIB,
    },
    Variant {
        name: "memory 1 MiB, pagemap scan, stack 32 KiB",
        memory: MIB,
        pagemap: Enabled::Auto,
        stack: 32 * KIB,
    },
    Variant {
        name: "memory 1 MiB, pagemap scan, stack 64 KiB",
        memory: MIB,
        pagemap: Enabled::Auto,
        stack: 64 * KIB,
    },
    Variant {
        name: "memory 1 MiB, pagemap scan, stack 128 KiB",
        memory: MIB,
        pagemap: Enabled::Auto,
        stack: 128 * KIB,
    },
    Variant {
        name: "memory 4 MiB, pagemap scan, stack 64 KiB",
        memory: 4 * MIB,
        pagemap: Enabled::Auto,
        stack: 64 * KIB,
    },
    Variant {
        name: "jobhook now (engine.rs pooling_config)",
        memory: usize::MAX,
        pagemap: Enabled::Auto,
        stack: usize::MAX,
    },
];

/// Runs `rounds` rounds (after one warm-up round) of `calls` calls per variant and prints the
/// median and p99 of each.
pub fn run(rounds: usize, calls: usize) -> anyhow::Result<()> {
    let wasm = jobhook_testkit::guest_bytes("guest-bench-noop");
    let context = JobContext::from_json_value(&jobhook_testkit::sample_context_json())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rigs = Vec::new();
    for v in VARIANTS {
        let mut pool = jobhook::engine::pooling_config(8);
        if v.memory != usize::MAX {
            pool.linear_memory_keep_resident(v.memory)
                .pagemap_scan(v.pagemap);
        }
        if v.stack != usize::MAX {
            pool.async_stack_keep_resident(v.stack);
        }
        let config = jobhook::engine::wasmtime_config(InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        rigs.push((v.name, RawWasmtime::new(engine, &wasm, true)?, Vec::new()));
    }
    for round in 0..=rounds {
        for (_, rig, samples) in rigs.iter_mut() {
            runtime.block_on(async {
                for _ in 0..calls {
                    let start = Instant::now();
                    rig.call(&context).await?;
                    if round > 0 {
                        samples.push(micros(start.elapsed()));
                    }
                }
                anyhow::Ok(())
            })?;
        }
    }
    println!("load average: {}", crate::machine::load_average());
    for (name, _, samples) in &rigs {
        let s = Summary::of(samples);
        println!("{name:50} median {:6.2} µs  p99 {:6.2} µs", s.p50, s.p99);
    }
    Ok(())
}
