//! The process edge: what an operator runs and configures.
//!
//! - [`config`]: the TOML configuration file, assembled from the sections each part owns;
//! - [`server`]: `jobhook serve` — wires the sources, the queue and the runtime together;
//! - [`tls`]: `[server] tls` — HTTPS and client certificates on the listener, reloadable;
//! - [`migrate`]: `jobhook import` (Keyfactor registrations to `[[handlers]]`) and
//!   `jobhook forwarder-config` (the forwarder's Keyfactor registration);
//! - [`cli`]: the `jobhook` command line;
//! - [`devtools`]: `jobhook run`'s capability flags and the Keyfactor stand-in for authors;
//! - [`loadgen`]: the `jobhook load` event driver;
//! - [`jobtypes`]: `jobhook job-types`, the instance's job-type GUIDs as configuration.

pub mod cli;
pub mod config;
pub mod devtools;
pub mod jobtypes;
pub mod loadgen;
pub mod migrate;
pub mod server;
pub mod tls;
