//! Benchmark guest: spends a few milliseconds of CPU on arithmetic, then succeeds.
//!
//! `jobhook-bench` (scenario g) uses it for a CPU-bound load, where what a node can deliver per
//! second is set by the core it runs on rather than by the store: two nodes on two cores should
//! then deliver about twice what one node does, and whatever is missing is what the shared
//! database costs.

use std::hint::black_box;

use jobhook_sdk::{Context, Handler, Result, export_handler};

/// Steps of the xorshift generator per delivery: about 8 ms of one core of the benchmark machine
/// (one node pinned to one core finished ~120 of them per second).
const STEPS: u32 = 3_000_000;

struct Spin;

impl Handler for Spin {
    fn run(ctx: &Context) -> Result<()> {
        black_box(ctx);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..STEPS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x = black_box(x);
        }
        black_box(x);
        Ok(())
    }
}

export_handler!(Spin);
