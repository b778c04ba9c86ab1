//! Hostile guest: passes one enormous string (property `bytes`, default 100 MiB) to the `log`
//! import.
//!
//! The engine copies import arguments out of the guest only within the hostcall-bytes limit, so a
//! message over it must end the run as `limit-exceeded` with limit `hostcall-bytes` before the
//! host allocates it; a message under it is logged truncated to the longest line kept.

use jobhook_sdk::log::{self, Level};
use jobhook_sdk::{Context, Handler, Result, export_handler, properties};

struct HugeLog;

impl Handler for HugeLog {
    fn run(_ctx: &Context) -> Result<()> {
        let bytes: usize = properties::parse_or("bytes", 100 << 20)?;
        log::log(Level::Info, &"L".repeat(bytes));
        Ok(())
    }
}

export_handler!(HugeLog);
