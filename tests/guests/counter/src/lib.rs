//! Probe guest: counts its invocations in a global. In a fresh sandbox per invocation the count
//! is always 1; any other value means state leaked from an earlier invocation.

use std::sync::atomic::{AtomicU32, Ordering};

use jobhook_sdk::{Context, Handler, Result, export_handler};

static INVOCATIONS: AtomicU32 = AtomicU32::new(0);

struct Counter;

impl Handler for Counter {
    fn run(_ctx: &Context) -> Result<()> {
        let n = INVOCATIONS.fetch_add(1, Ordering::SeqCst) + 1;
        jobhook_sdk::info!("invocation {n} of this instance");
        if n == 1 {
            Ok(())
        } else {
            Err(format!("global state survived: this instance has run {n} times").into())
        }
    }
}

export_handler!(Counter);
