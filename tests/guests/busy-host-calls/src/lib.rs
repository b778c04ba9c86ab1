//! Hostile guest: a busy loop that calls the host (`properties::get`) on every iteration, so it is
//! never in guest code for long.
//!
//! The epoch deadline is checked in the guest's loop between host calls, so the engine must still
//! stop it at its time budget and record `timed-out`.

use std::hint::black_box;

use jobhook_sdk::{Context, Handler, Result, export_handler, properties};

struct BusyHostCalls;

impl Handler for BusyHostCalls {
    fn run(_ctx: &Context) -> Result<()> {
        loop {
            black_box(properties::get("Anything"));
        }
    }
}

export_handler!(BusyHostCalls);
