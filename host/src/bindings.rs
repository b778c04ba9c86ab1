//! Host-side bindings for the `jobhook:handler` world, generated from `wit/` by wasmtime.
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
