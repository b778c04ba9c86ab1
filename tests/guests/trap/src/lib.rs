//! Hostile guest: executes `unreachable` (a wasm trap) as soon as it is called.

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct Trap;

impl Handler for Trap {
    fn run(_ctx: &Context) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        core::arch::wasm32::unreachable();
        #[allow(unreachable_code)]
        Ok(())
    }
}

export_handler!(Trap);
