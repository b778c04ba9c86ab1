//! Benchmark guest: receives the job context and succeeds without doing anything else.
//!
//! `jobhook-bench` (tests/bench) uses it to measure what a delivery costs the engine itself —
//! a fresh sandbox, the context crossing into the guest, the call, the outcome — with no
//! handler work on top. The Extism peer plugin (`tests/bench/extism-plugin`) implements the same
//! logic for the peer comparison.

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct Noop;

impl Handler for Noop {
    fn run(ctx: &Context) -> Result<()> {
        // Keep the decoded context observable so the optimiser cannot drop the decoding.
        std::hint::black_box(ctx);
        Ok(())
    }
}

export_handler!(Noop);
