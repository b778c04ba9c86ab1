//! Hostile guest: panics with a 1 MiB message.
//!
//! The panic message reaches the engine only through the bounded stderr capture: the engine must
//! record `panicked` with a message bounded by the outcome's reason limit.

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct BigPanic;

impl Handler for BigPanic {
    fn run(_ctx: &Context) -> Result<()> {
        panic!("{}", "P".repeat(1 << 20));
    }
}

export_handler!(BigPanic);
