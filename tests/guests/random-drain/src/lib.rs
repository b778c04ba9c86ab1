//! Hostile guest: asks `wasi:random` for 1 GiB of random bytes in one call (or the property
//! `bytes`), trying to make the host allocate (and spend CPU filling) a gigabyte.
//!
//! The engine caps one random request at 64 KiB (`max_random_size`), so the call must fail
//! before the host allocates, ending the run as `trapped` with a message naming the limit. A
//! request within the cap returns its bytes and the handler fails saying how many it got.

use jobhook_sdk::{Context, Handler, Result, export_handler};

#[cfg(target_arch = "wasm32")]
mod wasi {
    // `wasi:random/random@0.2.0` as in WASI 0.2.0 (the version Rust's std imports), declared
    // inline so no extra crate is needed.
    wit_bindgen::generate!({
        inline: "
            package jobhook-tests:random-drain;
            world imports { import wasi:random/random@0.2.0; }
            package wasi:random@0.2.0 {
                interface random {
                    get-random-bytes: func(len: u64) -> list<u8>;
                    get-random-u64: func() -> u64;
                }
            }
        ",
        world: "jobhook-tests:random-drain/imports",
        generate_all,
    });
}

struct RandomDrain;

impl Handler for RandomDrain {
    fn run(_ctx: &Context) -> Result<()> {
        #[cfg(target_arch = "wasm32")]
        {
            let asked: u64 = jobhook_sdk::properties::parse_or("bytes", 1 << 30)?;
            let bytes = wasi::wasi::random::random::get_random_bytes(asked);
            Err(format!("got {} random bytes", bytes.len()).into())
        }
        #[cfg(not(target_arch = "wasm32"))]
        Ok(())
    }
}

export_handler!(RandomDrain);
