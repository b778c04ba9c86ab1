//! `jobhook-bench pool-tuning`: how engine settings change the cost of a fresh sandbox. For each
//! variant — jobhook's `pooling_config`/`wasmtime_config` with a few settings changed — a
//! `jobhook::Engine` is built, and on it, interleaved round by round with every other variant:
//! the noop guest with a minimal store and `InstancePre` (the wasmtime floor, timed by phase:
//! new store + instantiate / `run-handler` / drop), and `SandboxedHandler::invoke` of the noop and the
//! log-context handlers; with the minor page faults per call of each (a fault per call means a
//! reset setting hands back pages that the next sandbox touches again; one costs more than a
//! few µs on a virtual machine).
//!
//! This is the measurement behind the pool settings in `host/src/runtime/engine.rs` (see
//! docs/PERFORMANCE.md, "Changes the figures justified"); the first variant is jobhook's setting
//! before the pool tuning, the last one its setting now. Only figures from the same run compare: the
//! machine's speed drifts by a third between runs when something else runs on it.
//! `JOBHOOK_TUNING_ONLY=<text>` runs only the variants whose name contains `<text>` (for
//! profiling one of them with `perf`).

use std::time::Instant;

use jobhook::capabilities::Services;
use jobhook::{
    Delivery, Engine, JobContext, LoadOptions, OutcomeKind, SandboxSpec, SandboxedHandler,
};
use wasmtime::{Config, Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::delivery::{RawWasmtime, micros};
use crate::stats::Summary;

/// One engine variant: a name and what it changes on top of jobhook's pool and engine settings.
struct Variant {
    name: &'static str,
    pool: fn(&mut PoolingAllocationConfig),
    config: fn(&mut Config),
}

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn unchanged_pool(_: &mut PoolingAllocationConfig) {}
fn unchanged_config(_: &mut Config) {}

const VARIANTS: &[Variant] = &[
    // How a pool slot is reset (the settings behind MEMORY_KEEP_RESIDENT and
    // STACK_KEEP_RESIDENT in engine.rs).
    Variant {
        name: "memory 1 MiB memset, stack 0 (before the pool tuning)",
        pool: |p| {
            p.linear_memory_keep_resident(MIB)
                .pagemap_scan(Enabled::No)
                .async_stack_keep_resident(0);
        },
        config: unchanged_config,
    },
    Variant {
        name: "memory 0 (madvise everything), stack 0",
        pool: |p| {
            p.linear_memory_keep_resident(0)
                .pagemap_scan(Enabled::No)
                .async_stack_keep_resident(0);
        },
        config: unchanged_config,
    },
    Variant {
        name: "memory 1 MiB pagemap scan, stack 0",
        pool: |p| {
            p.async_stack_keep_resident(0);
        },
        config: unchanged_config,
    },
    // The memory reset by memset with today's stack setting: cheaper than the scan for a guest
    // whose whole memory is kept (one linked with a small shadow stack), far dearer for one
    // whose written pages lie past the kept part (a Rust guest's default 1 MiB stack).
    Variant {
        name: "memory 1 MiB memset (no pagemap scan)",
        pool: |p| {
            p.pagemap_scan(Enabled::No);
        },
        config: unchanged_config,
    },
    Variant {
        name: "memory 256 KiB memset (no pagemap scan)",
        pool: |p| {
            p.linear_memory_keep_resident(256 * KIB)
                .pagemap_scan(Enabled::No);
        },
        config: unchanged_config,
    },
    Variant {
        name: "stack keep 16 KiB",
        pool: |p| {
            p.async_stack_keep_resident(16 * KIB);
        },
        config: unchanged_config,
    },
    Variant {
        name: "stack keep 32 KiB",
        pool: |p| {
            p.async_stack_keep_resident(32 * KIB);
        },
        config: unchanged_config,
    },
    Variant {
        name: "stack keep 128 KiB",
        pool: |p| {
            p.async_stack_keep_resident(128 * KIB);
        },
        config: unchanged_config,
    },
    Variant {
        name: "memory keep 4 MiB",
        pool: |p| {
            p.linear_memory_keep_resident(4 * MIB);
        },
        config: unchanged_config,
    },
    Variant {
        name: "table keep 0",
        pool: |p| {
            p.table_keep_resident(0);
        },
        config: unchanged_config,
    },
    // Follow-up (target 10 µs): settings that could cut the fixed per-delivery cost.
    Variant {
        name: "decommit batch 2",
        pool: |p| {
            p.decommit_batch_size(2);
        },
        config: unchanged_config,
    },
    Variant {
        name: "decommit batch 4",
        pool: |p| {
            p.decommit_batch_size(4);
        },
        config: unchanged_config,
    },
    Variant {
        name: "decommit batch 8",
        pool: |p| {
            p.decommit_batch_size(8);
        },
        config: unchanged_config,
    },
    Variant {
        name: "max unused warm slots 0",
        pool: |p| {
            p.max_unused_warm_slots(0);
        },
        config: unchanged_config,
    },
    Variant {
        name: "async stack 1 MiB",
        pool: unchanged_pool,
        config: |c| {
            c.async_stack_size(MIB);
        },
    },
    Variant {
        name: "memory reservation 64 MiB, guard 64 KiB",
        pool: |p| {
            p.max_memory_size(64 * MIB);
        },
        config: |c| {
            c.memory_reservation(64 * MIB as u64)
                .memory_guard_size(64 * KIB as u64);
        },
    },
    Variant {
        name: "no guard before linear memory",
        pool: unchanged_pool,
        config: |c| {
            c.guard_before_linear_memory(false);
        },
    },
    Variant {
        name: "eager table init",
        pool: unchanged_pool,
        config: |c| {
            c.table_lazy_init(false);
        },
    },
    Variant {
        name: "jobhook now (engine.rs pooling_config)",
        pool: unchanged_pool,
        config: unchanged_config,
    },
];

/// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10), or 0
/// where that file does not exist.
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|stat| {
            // The command name (field 2) may contain spaces; fields are counted after it.
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split(' ').nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// What one variant measured: per-call times in µs and page faults.
#[derive(Default)]
struct Measured {
    floor: Vec<f64>,
    phases: [Vec<f64>; 3],
    noop: Vec<f64>,
    log: Vec<f64>,
    faults: [u64; 3],
}

/// Runs `rounds` rounds (after one warm-up round) of `calls` calls of each measurement per
/// variant and prints their medians and page faults per call (floor / the two handlers).
pub fn run(rounds: usize, calls: usize) -> anyhow::Result<()> {
    let wasm = jobhook_testkit::guest_bytes("guest-bench-noop");
    let log_wasm = jobhook_testkit::guest_bytes("log-context");
    let context = JobContext::from_json_value(&jobhook_testkit::sample_context_json())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let only = std::env::var("JOBHOOK_TUNING_ONLY").ok();
    let (services, options) = (Services::default(), LoadOptions::default());
    let mut rigs = Vec::new();
    for v in VARIANTS {
        if only.as_deref().is_some_and(|only| !v.name.contains(only)) {
            continue;
        }
        let mut pool = jobhook::runtime::engine::pooling_config(8);
        (v.pool)(&mut pool);
        let mut config =
            jobhook::runtime::engine::wasmtime_config(InstanceAllocationStrategy::Pooling(pool));
        (v.config)(&mut config);
        let engine = Engine::with_config(&config)?;
        let floor = RawWasmtime::new(engine.wasmtime().clone(), &wasm, true)?;
        let load = |wasm: &[u8], name: &str| {
            runtime.block_on(SandboxedHandler::load(
                &engine,
                &services,
                wasm.to_vec(),
                SandboxSpec::new(name),
                &options,
            ))
        };
        let noop = load(&wasm, "bench-noop")?;
        let log = load(&log_wasm, "log-context")?;
        rigs.push((v.name, floor, noop, log, Measured::default()));
    }
    for round in 0..=rounds {
        for (_, floor, noop, log, m) in rigs.iter_mut() {
            let record = round > 0;
            let before = minor_faults();
            runtime.block_on(async {
                for _ in 0..calls {
                    let phases = floor.call_phases(&context).await?;
                    if record {
                        m.floor.push(phases.iter().map(|d| micros(*d)).sum());
                        for (all, d) in m.phases.iter_mut().zip(phases) {
                            all.push(micros(d));
                        }
                    }
                }
                anyhow::Ok(())
            })?;
            let after_floor = minor_faults();
            for (handler, samples) in [(&*noop, &mut m.noop), (&*log, &mut m.log)] {
                runtime.block_on(async {
                    for _ in 0..calls {
                        let start = Instant::now();
                        let outcome = handler.invoke(&context, Delivery::default()).await;
                        let elapsed = start.elapsed();
                        anyhow::ensure!(outcome.kind == OutcomeKind::Succeeded, "{}", outcome.kind);
                        if record {
                            samples.push(micros(elapsed));
                        }
                    }
                    anyhow::Ok(())
                })?;
            }
            let after_noop_and_log = minor_faults();
            if record {
                m.faults[0] += after_floor - before;
                m.faults[1] += after_noop_and_log - after_floor;
            }
        }
    }
    println!("load average: {}", crate::machine::load_average());
    println!(
        "medians in µs; floor = minimal store + InstancePre (new+instantiate / call / drop); \
         invoke = SandboxedHandler::invoke"
    );
    println!(
        "{:46} {:>6} {:>20} {:>7} {:>7} {:>7}",
        "variant", "floor", "phases", "noop", "log", "faults"
    );
    for (name, _, _, _, m) in &rigs {
        let [a, b, c] = m.phases.clone().map(|p| Summary::of(&p).p50);
        let per_call = |faults: u64, n: usize| faults as f64 / n.max(1) as f64;
        println!(
            "{name:46} {:6.2} {:>20} {:7.2} {:7.2} {:3.1}/{:3.1}",
            Summary::of(&m.floor).p50,
            format!("{a:.2}/{b:.2}/{c:.2}"),
            Summary::of(&m.noop).p50,
            Summary::of(&m.log).p50,
            per_call(m.faults[0], m.floor.len()),
            per_call(m.faults[1], m.noop.len() + m.log.len()),
        );
    }
    Ok(())
}
