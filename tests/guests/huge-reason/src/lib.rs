//! Hostile guest: fails with an enormous reason string (property `bytes`, default 50 MiB) as the
//! `err` of `run-handler`.
//!
//! The reason is lifted out of the guest by the engine; that copy is bounded by the hostcall-bytes
//! limit, so a reason over the limit must end as `limit-exceeded` with limit `hostcall-bytes`,
//! and a reason under it as `handler-failed` with the reason truncated to the outcome's bound.

use jobhook_sdk::{Context, Handler, Result, export_handler, properties};

struct HugeReason;

impl Handler for HugeReason {
    fn run(_ctx: &Context) -> Result<()> {
        let bytes: usize = properties::parse_or("bytes", 50 << 20)?;
        Err("R".repeat(bytes).into())
    }
}

export_handler!(HugeReason);
