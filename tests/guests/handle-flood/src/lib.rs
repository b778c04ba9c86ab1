//! Hostile guest: creates `wasi:clocks` pollables in a loop and never drops them, trying to grow
//! the host's resource table without bound.
//!
//! The engine caps the handles one sandbox may hold, so creating one past the cap must fail and
//! end the run as `trapped` with a message about the resource table. Every 16 handles it logs
//! `held N`, so the test can see where the cap stopped it.

use jobhook_sdk::{Context, Handler, Result, export_handler};

#[cfg(target_arch = "wasm32")]
mod wasi {
    // The WASI 0.2.0 interfaces (the version Rust's std imports), declared inline so no extra
    // crate is needed.
    wit_bindgen::generate!({
        inline: "
            package jobhook-tests:handle-flood;
            world imports { import wasi:clocks/monotonic-clock@0.2.0; }
            package wasi:io@0.2.0 {
                interface poll {
                    resource pollable {
                        ready: func() -> bool;
                        block: func();
                    }
                    poll: func(in: list<borrow<pollable>>) -> list<u32>;
                }
            }
            package wasi:clocks@0.2.0 {
                interface monotonic-clock {
                    use wasi:io/poll@0.2.0.{pollable};
                    type instant = u64;
                    type duration = u64;
                    now: func() -> instant;
                    resolution: func() -> duration;
                    subscribe-instant: func(when: instant) -> pollable;
                    subscribe-duration: func(when: duration) -> pollable;
                }
            }
        ",
        world: "jobhook-tests:handle-flood/imports",
        generate_all,
    });
}

struct HandleFlood;

impl Handler for HandleFlood {
    fn run(_ctx: &Context) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let mut held = Vec::new();
            loop {
                held.push(wasi::wasi::clocks::monotonic_clock::subscribe_duration(
                    3_600_000_000_000,
                ));
                std::hint::black_box(&held);
                // Progress for the test, which checks where the cap stopped the loop.
                if held.len() % 16 == 0 {
                    jobhook_sdk::info!("held {}", held.len());
                }
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        Ok(())
    }
}

export_handler!(HandleFlood);
