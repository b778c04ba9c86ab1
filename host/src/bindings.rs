//! Host-side bindings for the `jobhook:handler` world, generated from `wit/` by wasmtime: the
//! current contract, and each earlier version the engine still runs components for (kept
//! verbatim under `wit/released/`).
//!
//! Every import is `async` (the Keyfactor, mail and HTTP capabilities wait on the network) and
//! `trappable` (a host call may end the sandbox, e.g. when a call budget is exhausted). The export
//! is called with `call_async` so that guest code runs on its own fiber stack and can be
//! interrupted by the epoch deadline.

/// The generated code: the WIT interfaces as Rust modules (documented in `wit/jobhook.wit`).
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

pub use generated::jobhook::handler::types;
pub use generated::*;

/// The interfaces of contract 0.1.0 (`wit/released/0.1.0`), linked beside the current ones so
/// that components built against 0.1.0 keep running ([`crate::runtime::compat`] forwards each
/// call to the current implementation). Its `types` are the current `types`: 0.2.0 left them
/// unchanged, and the component model compares types by shape, not by package version.
#[allow(missing_docs)]
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/released/0.1.0",
        world: "handler",
        imports: { default: async | trappable },
        with: { "jobhook:handler/types@0.1.0": crate::bindings::types },
    });
}
