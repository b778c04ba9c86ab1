//! Hostile guest: makes outbound HTTP calls in a loop forever, ignoring every answer.
//!
//! The engine must stop it at its per-invocation call budget and record `limit-exceeded` with
//! limit `http-calls`.

use std::hint::black_box;

use jobhook_sdk::http::Request;
use jobhook_sdk::{Context, Handler, Result, export_handler};

struct HttpFlood;

impl Handler for HttpFlood {
    fn run(_ctx: &Context) -> Result<()> {
        loop {
            let _ = black_box(
                Request::post("https://hooks.example.com/flood")
                    .body("x")
                    .send(),
            );
        }
    }
}

export_handler!(HttpFlood);
