//! jobhook: runs Keyfactor Command job complete handlers as sandboxed WebAssembly components.
//!
//! Keyfactor Command calls `IOrchestratorJobCompleteHandler.RunHandler(context)` after every
//! orchestrator job. jobhook keeps that programming model — the same context, job-type routing,
//! per-handler properties, Keyfactor API and e-mail uses — but runs each handler as a
//! `wasm32-wasip2` component in a fresh sandbox per event, with only the capabilities its operator
//! granted and with time, memory and call budgets. A handler failure of any kind becomes a
//! recorded [`Outcome`], never an engine failure.
//!
//! The folders follow the data flow of one event:
//!
//! ```text
//! sources/ ──► queue/ ──────────────► runtime/ ─────────► capabilities/
//! api, poller  store, dispatch,        engine, loader,     properties, log, keyfactor,
//!              delivery state,         sandbox, limits     mail, http, …
//!              quarantine                     │
//!                  ▲                          ▼
//!                  └──────────── outcome (recorded per delivery)
//! ```
//!
//! - [`sources`]: where events come from — the HTTP API and the JobHistory poller;
//! - [`queue`]: the durable store, routing and dispatch of deliveries, the delivery state
//!   machine (retry and failure), quarantine of handlers that keep failing;
//! - [`runtime`]: the wasmtime engine, the load gate, the AOT cache, the per-delivery sandbox
//!   and where its time, CPU and memory limits are enforced;
//! - [`capabilities`]: the interfaces a handler may import, each in its own module;
//! - [`app`]: the process edge — configuration file, `jobhook serve` (with its TLS listener),
//!   the CLI, its dev tools and the migration to and from Keyfactor registrations;
//! - shared vocabulary at the top: [`context`] (the job context and its decoding), [`outcome`]
//!   (the record of one invocation), [`limits`] (per-handler budgets), [`secret`] (secrets by
//!   reference, never printed), [`duration_ms`] (milliseconds in serde), [`metrics`] (Prometheus metrics), [`bindings`] (the WIT types).

#![deny(missing_docs)]

pub mod app;
pub mod bindings;
pub mod capabilities;
pub mod context;
pub mod duration_ms;
pub mod limits;
pub mod metrics;
pub mod outcome;
pub mod queue;
pub mod runtime;
pub mod secret;
pub mod sources;

pub use context::{ContextError, JobContext, JobResult, OperationType};
pub use limits::{LimitKind, Limits};
pub use outcome::{Outcome, OutcomeKind};
pub use runtime::engine::Engine;
pub use runtime::loader::{LoadError, LoadOptions};
pub use runtime::sandbox::SandboxedHandler;
pub use runtime::state::{Delivery, SandboxSpec};
