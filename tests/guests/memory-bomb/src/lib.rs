//! Hostile guest: allocates 1 MiB blocks, touching each, until something stops it.

use jobhook_sdk::{Context, Handler, Result, export_handler};

struct MemoryBomb;

impl Handler for MemoryBomb {
    fn run(_ctx: &Context) -> Result<()> {
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        loop {
            blocks.push(std::hint::black_box(vec![0xAB; 1 << 20]));
        }
    }
}

export_handler!(MemoryBomb);
