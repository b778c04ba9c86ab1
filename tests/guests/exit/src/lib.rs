//! Hostile guest: calls `std::process::exit(3)` instead of returning from `run-handler`, which
//! reaches `wasi:cli/exit` and unwinds the whole sandbox.
//!
//! The engine must record `trapped` with code `exit`, saying the handler called exit. (The
//! status reaches the host as `exit(1)`: `wasi:cli/exit@0.2` carries only success or failure.)

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct Exit;

impl Handler for Exit {
    fn run(_ctx: &Context) -> Result<()> {
        std::process::exit(3)
    }
}

export_handler!(Exit);
