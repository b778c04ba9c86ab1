//! Hostile guest: calls `std::process::abort()`, which on `wasm32-wasip2` executes `unreachable`.
//!
//! The engine must record `trapped` with code `unreachable` (not a panic: nothing is printed).

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct Abort;

impl Handler for Abort {
    fn run(_ctx: &Context) -> Result<()> {
        std::process::abort()
    }
}

export_handler!(Abort);
