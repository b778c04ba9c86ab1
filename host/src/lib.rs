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
//!   reference, never printed), [`duration_ms`] (milliseconds in serde), [`metrics`] (Prometheus metrics), [`bindings`] (the WIT types), [`escape`] (guest and
//!   configuration text made safe to print).

#![deny(missing_docs)]

pub mod app;
pub mod bindings;
pub mod capabilities;
pub mod context;
pub mod duration_ms;
pub mod escape;
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

#[cfg(test)]
mod layout_tests {
    use std::path::Path;

    /// The README's Layout table names every folder and module of `host/src` down to the
    /// second level, so a newcomer finds a module by reading it.
    #[test]
    fn the_readme_layout_names_every_module() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
        let start = readme.find("## Layout").unwrap();
        let end = start + readme[start..].find("\n## ").unwrap();
        let layout = &readme[start..end];
        let mut missing = Vec::new();
        let src = root.join("src");
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !layout.contains(&format!("`host/src/{name}/`")) {
                    missing.push(format!("host/src/{name}/"));
                }
                for inner in std::fs::read_dir(&path).unwrap() {
                    let inner = inner.unwrap().path();
                    let file = inner.file_name().unwrap().to_string_lossy().into_owned();
                    let shown = if inner.is_dir() {
                        format!("`{file}/`")
                    } else {
                        format!("`{file}`")
                    };
                    if file != "mod.rs" && !layout.contains(&shown) {
                        missing.push(format!("host/src/{name}/{file}"));
                    }
                }
            } else if !matches!(name.as_str(), "lib.rs" | "main.rs")
                && !layout.contains(&format!("`{name}`"))
            {
                missing.push(format!("host/src/{name}"));
            }
        }
        assert!(
            missing.is_empty(),
            "README.md's Layout table does not name: {missing:?}"
        );
    }
}
