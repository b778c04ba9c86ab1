//! Hostile guest: calls the Keyfactor API in a loop forever, ignoring every answer.
//!
//! The engine must stop it at its per-invocation call budget and record `limit-exceeded` with
//! limit `keyfactor-calls` — whether or not an API is configured.

use std::hint::black_box;

use jobhook_sdk::keyfactor::Request;
use jobhook_sdk::{Context, Handler, Result, export_handler};

struct KeyfactorFlood;

impl Handler for KeyfactorFlood {
    fn run(_ctx: &Context) -> Result<()> {
        loop {
            let _ = black_box(
                Request::get("Certificates")
                    .query("pq.queryString", "x")
                    .send(),
            );
        }
    }
}

export_handler!(KeyfactorFlood);
