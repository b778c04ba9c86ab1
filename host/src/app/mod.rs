//! The process edge: what an operator runs and configures.
//!
//! - [`config`]: the TOML configuration file, assembled from the sections each part owns;
//! - [`server`]: `jobhook serve` — wires the sources, the queue and the runtime together;
//! - [`connections`]: the listener — connection caps, read timeouts, lingering close;
//! - [`tls`]: `[server] tls` — HTTPS and client certificates on the listener, reloadable;
//! - [`secrets`]: which secrets a reload applies, and which only a restart does;
//! - [`migrate`]: `jobhook import` (Keyfactor registrations to `[[handlers]]`) and
//!   `jobhook forwarder-config` (the forwarder's Keyfactor registration);
//! - [`cli`]: the `jobhook` command line;
//! - [`engine_log`]: the engine's own log — its default filters, its writer thread, every line
//!   escaped;
//! - [`output`]: what a command prints, and what becomes of it when nobody reads it;
//! - [`engine_args`]: the engine flags of `jobhook run` and `jobhook inspect`;
//! - [`devtools`]: `jobhook run`'s capability flags;
//! - [`new_project`]: `jobhook new`, a handler project from the templates in `host/templates/`;
//! - [`component_file`]: reading a component file, with the fix for a missing cargo build output;
//! - [`jobtypes`]: `jobhook job-types`, the instance's job-type GUIDs as configuration.
//!
//! The Keyfactor API stand-in and the load driver are test tooling and live in the author's and
//! bench tool, `jobhook-dev` (`tools/dev`), not in the operator's binary.

pub mod cli;
pub mod component_file;
pub mod config;
pub mod connections;
pub mod devtools;
pub mod engine_args;
pub mod engine_log;
pub mod jobtypes;
pub mod migrate;
pub mod new_project;
pub mod output;
pub mod secrets;
pub mod server;
pub mod tls;
