//! jobhook: runs Keyfactor Command job complete handlers as sandboxed WebAssembly components.
//!
//! Keyfactor Command calls `IOrchestratorJobCompleteHandler.RunHandler(context)` after every
//! orchestrator job. jobhook keeps that programming model — the same context, job-type routing,
//! per-handler properties, Keyfactor API and e-mail uses — but runs each handler as a
//! `wasm32-wasip2` component in a fresh sandbox per event, with only the capabilities its operator
//! granted and with time, memory and call budgets. A handler failure of any kind becomes a
//! recorded [`Outcome`], never an engine failure.
//!
//! Modules, one per responsibility:
//! - [`context`]: the job context and its decoding from Keyfactor-style JSON;
//! - [`engine`]: the wasmtime engine (pooling, epochs, proposals switched off);
//! - [`loader`]: the load gate that checks untrusted component bytes;
//! - [`aot`]: the on-disk cache of compiled components (`[engine] cache_dir`);
//! - [`sandbox`]: a fresh store per invocation, limits, outcome classification;
//! - [`cpu_share`]: the cores deliveries that keep computing may take between them;
//! - [`limits`]: per-handler limits and the memory/table limiter;
//! - [`capabilities`]: the interfaces a handler may import;
//! - [`outcome`]: the record of one invocation;
//! - [`config`]: the TOML configuration and its validation;
//! - [`secret`]: secrets given by reference (env/file) in configuration, never printed;
//! - [`store`]: the durable store of events, deliveries and outcomes (SQLite by default);
//! - [`dispatch`]: job-type routing and the workers that run deliveries;
//! - [`quarantine`]: setting aside handlers that keep failing;
//! - [`api`]: the HTTP API; [`metrics`]: Prometheus metrics; [`server`]: `jobhook serve`;
//! - [`poller`]: turning Keyfactor's JobHistory into events where no extension can be installed;
//! - [`loadgen`]: the `jobhook load` event driver;
//! - [`devtools`]: `jobhook run`'s capability flags and the `jobhook standin` dev server;
//! - [`cli`]: the `jobhook` command line.

pub mod aot;
pub mod api;
pub mod bindings;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod context;
pub mod cpu_share;
pub mod devtools;
pub mod dispatch;
pub mod engine;
pub mod limits;
pub mod loader;
pub mod loadgen;
pub mod metrics;
pub mod outcome;
pub mod poller;
pub mod quarantine;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod store;

pub use context::{ContextError, JobContext, JobResult, OperationType};
pub use engine::Engine;
pub use limits::{LimitKind, Limits};
pub use loader::{LoadError, LoadOptions};
pub use outcome::{Outcome, OutcomeKind};
pub use sandbox::{Delivery, Handler, HandlerSpec};
