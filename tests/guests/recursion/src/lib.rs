//! Hostile guest: unbounded recursion with tiny frames, so the *wasm* call stack (not Rust's
//! shadow stack in linear memory) runs out first.
//!
//! The engine must stop it at `max_wasm_stack` and record `limit-exceeded` with limit `stack`;
//! the host's own stack is never touched (guest code runs on its own fiber stack).

use std::hint::black_box;

use jobhook_sdk::{Context, Handler, Result, export_handler};

/// Recurses until something stops it. `black_box` keeps the call from being turned into a loop
/// and the depth check from being folded away.
#[inline(never)]
fn dive(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    black_box(dive(depth + 1)).wrapping_add(depth)
}

struct Recursion;

impl Handler for Recursion {
    fn run(_ctx: &Context) -> Result<()> {
        Err(format!("recursion returned {}", dive(0)).into())
    }
}

export_handler!(Recursion);
