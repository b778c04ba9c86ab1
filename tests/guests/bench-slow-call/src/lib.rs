//! Benchmark guest: makes one Keyfactor API `GET` to the path in property `Path` (with the
//! query in property `Query`, `name=value`) and succeeds if the answer is a 2xx.
//!
//! `jobhook-bench` points it at the stand-in's `_Test/Slow?ms=N` endpoint to hold many
//! deliveries in flight at once, each waiting in the host on a slow upstream, and reads the
//! host's memory while they wait.

use jobhook_sdk::keyfactor::Request;
use jobhook_sdk::{Context, Handler, Result, export_handler, properties};

struct SlowCall;

impl Handler for SlowCall {
    fn run(_ctx: &Context) -> Result<()> {
        let mut request = Request::get(properties::require("Path")?);
        if let Some(query) = properties::get("Query")
            && let Some((name, value)) = query.split_once('=')
        {
            request = request.query(name, value);
        }
        request.send()?.error_for_status()?;
        Ok(())
    }
}

export_handler!(SlowCall);
