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
//! - [`sandbox`]: a fresh store per invocation, limits, outcome classification;
//! - [`limits`]: per-handler limits and the memory/table limiter;
//! - [`capabilities`]: the interfaces a handler may import;
//! - [`outcome`]: the record of one invocation;
//! - [`cli`]: the `jobhook` command line.

pub mod bindings;
pub mod capabilities;
pub mod cli;
pub mod context;
pub mod engine;
pub mod limits;
pub mod loader;
pub mod outcome;
pub mod sandbox;

pub use context::{ContextError, JobContext, JobResult, OperationType};
pub use engine::Engine;
pub use limits::{LimitKind, Limits};
pub use loader::{LoadError, LoadOptions};
pub use outcome::{Outcome, OutcomeKind};
pub use sandbox::{Delivery, Handler, HandlerSpec};
