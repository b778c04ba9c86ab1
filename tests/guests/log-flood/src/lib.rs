//! Hostile guest: logs `lines` lines (property, default 100,000) as fast as it can, then succeeds.
//!
//! Logging past the budget is not an error: the engine must keep the first lines within the
//! line/byte budget, count the rest as dropped, and record `succeeded`.

use jobhook_sdk::{Context, Handler, Result, export_handler, info, properties};

struct LogFlood;

impl Handler for LogFlood {
    fn run(_ctx: &Context) -> Result<()> {
        let lines: u64 = properties::parse_or("lines", 100_000)?;
        for i in 0..lines {
            info!("flood line {i}");
        }
        Ok(())
    }
}

export_handler!(LogFlood);
