//! Hostile guest: one enormous allocation (2 GiB − 64 KiB, the largest a `Vec` may be on a 32-bit
//! target; `vec![0u8; 3 << 30]` would only panic with "capacity overflow" before allocating).
//!
//! The allocator asks for the whole block with one `memory.grow`; the engine's limiter must
//! refuse it and record `limit-exceeded` with limit `memory`, having never committed the memory.

use std::hint::black_box;

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct HugeAlloc;

impl Handler for HugeAlloc {
    fn run(_ctx: &Context) -> Result<()> {
        let size = black_box((1usize << 31) - 64 * 1024);
        let block = black_box(vec![0u8; size]);
        Err(format!("allocated {} bytes", block.len()).into())
    }
}

export_handler!(HugeAlloc);
