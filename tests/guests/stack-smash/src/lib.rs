//! Hostile guest: unbounded recursion with large frames that live on Rust's *shadow* stack in
//! linear memory (a 16 KiB buffer per frame, address taken), so the 1 MiB shadow stack runs out
//! long before the wasm call stack does.
//!
//! `wasm32-wasip2` places the shadow stack at the bottom of linear memory (`--stack-first`), so
//! running off its end wraps the stack pointer below address 0 and the next store is out of
//! bounds. The engine must record `trapped` with code `memory-out-of-bounds` (never a host
//! fault), and the next sandbox must be unaffected.

use std::hint::black_box;

use jobhook_sdk::{Context, Handler, Result, export_handler};

#[inline(never)]
fn dive(depth: u64) -> u64 {
    let mut frame = [0u8; 16 * 1024];
    frame[(depth % 1024) as usize] = depth as u8;
    let frame = black_box(&mut frame);
    if black_box(depth) == u64::MAX {
        return 0;
    }
    dive(depth + 1).wrapping_add(u64::from(frame[7]))
}

struct StackSmash;

impl Handler for StackSmash {
    fn run(_ctx: &Context) -> Result<()> {
        Err(format!("recursion returned {}", dive(0)).into())
    }
}

export_handler!(StackSmash);
