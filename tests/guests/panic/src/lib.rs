//! Hostile guest: panics with a recognisable message.

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct Panic;

impl Handler for Panic {
    fn run(ctx: &Context) -> Result<()> {
        panic!("handler exploded on job {}", ctx.job_id);
    }
}

export_handler!(Panic);
