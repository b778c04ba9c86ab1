//! Hostile guest: spins forever in guest code without calling the host.

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct Spin;

impl Handler for Spin {
    fn run(_ctx: &Context) -> Result<()> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export_handler!(Spin);
