//! Hostile guest: sleeps for an hour. On `wasm32-wasip2` that is a `wasi:clocks` pollable and a
//! blocking `poll` in the host — no guest code runs, so epoch interruption never fires.
//!
//! The engine's outer wall-clock timeout must drop the call and record `timed-out` within the
//! time budget (plus a small grace).

use std::time::Duration;

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct Sleep;

impl Handler for Sleep {
    fn run(_ctx: &Context) -> Result<()> {
        std::thread::sleep(Duration::from_secs(3600));
        Err("woke up after an hour".into())
    }
}

export_handler!(Sleep);
