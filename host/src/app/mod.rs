//! The process edge: what an operator runs and configures.
//!
//! - [`config`]: the TOML configuration file, assembled from the sections each part owns;
//! - [`server`]: `jobhook serve` — wires the sources, the queue and the runtime together;
//! - [`cli`]: the `jobhook` command line;
//! - [`engine_args`]: the engine flags of `jobhook run` and `jobhook inspect`;
//! - [`devtools`]: `jobhook run`'s capability flags and the Keyfactor stand-in for authors;
//! - [`loadgen`]: the `jobhook load` event driver.

pub mod cli;
pub mod config;
pub mod devtools;
pub mod engine_args;
pub mod loadgen;
pub mod server;
