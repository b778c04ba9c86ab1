//! Write Keyfactor Command *job complete handlers* as sandboxed WebAssembly components for
//! jobhook.
//!
//! A handler is a type implementing [`Handler`], exported with [`export_handler!`], and built
//! for `wasm32-wasip2`:
//!
//! ```
//! use jobhook_sdk::{Context, Handler, JobResult, Result, export_handler, info};
//!
//! pub struct Hello;
//!
//! impl Handler for Hello {
//!     fn run(ctx: &Context) -> Result<()> {
//!         if ctx.job_result == JobResult::Failure {
//!             info!("{} failed on {}", ctx.job_type, ctx.client_machine);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! export_handler!(Hello);
//! ```
//!
//! with `crate-type = ["cdylib", "rlib"]` in the handler's `Cargo.toml` and
//! `cargo build --release --target wasm32-wasip2`.
//!
//! What a handler may do besides reading its [`Context`] comes through capability modules:
//! [`properties`], [`log`] (and the [`info!`] family of macros), [`delivery`], [`keyfactor`],
//! [`mail`] and [`http`]. A component imports only the capability interfaces whose functions
//! it actually calls, and the operator must grant each one, so the import list of a built
//! handler is exactly the list of capabilities it needs.
//!
//! On native targets the same code compiles against a test double: see the `testing` module
//! (present on non-wasm targets only).

#![deny(missing_docs)]

extern crate self as jobhook_sdk;

mod backend;
mod context;
mod error;
mod level;
mod response;
mod type_name;

pub mod delivery;
pub mod http;
pub mod job_history;
pub mod keyfactor;
pub mod log;
pub mod mail;
pub mod properties;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod text;

pub use context::{Context, JobResult, OperationType};
pub use error::{CapabilityError, Error, Result};
pub use response::{ERROR_BODY_SNIPPET, Method, Response};

/// The `chrono` crate the SDK uses for [`Context::request_timestamp`].
pub use chrono;
/// The `serde_json` crate the SDK uses, e.g. for `Response::json::<serde_json::Value>()`.
pub use serde_json;
/// The `uuid` crate the SDK uses for the GUIDs in [`Context`].
pub use uuid;

/// A job complete handler: what runs, once per delivered event, after an orchestrator job
/// completes.
///
/// The counterpart of Keyfactor's `IOrchestratorJobCompleteHandler.RunHandler`. Return `Ok(())`
/// when the handler did its work (Keyfactor's `true`), or an [`Error`] saying why it could not
/// (Keyfactor's `false`, now with a reason the engine records). A panic traps the sandbox and is
/// recorded as a crash, not as a failure reason: return errors instead.
pub trait Handler {
    /// Handles one completed job.
    fn run(ctx: &Context) -> Result<()>;
}

/// Exports a [`Handler`] type as the component's `run-handler` function.
///
/// Use it once, at the crate root of a `cdylib` handler crate: `export_handler!(MyHandler);`.
/// On `wasm32` it converts the engine's job context into a [`Context`], calls
/// [`Handler::run`] and turns an `Err` into the failure reason string. On other targets it only
/// checks that the type implements [`Handler`], so the crate still builds and unit-tests
/// natively.
#[cfg(target_arch = "wasm32")]
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        const _: () = {
            struct __JobhookHandlerExport;

            impl $crate::__private::bindings::Guest for __JobhookHandlerExport {
                fn run_handler(
                    context: $crate::__private::bindings::JobContext,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::run_exported::<$handler>(context)
                }
            }

            $crate::__private::bindings::export!(
                __JobhookHandlerExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Exports a [`Handler`] type as the component's `run-handler` function.
///
/// Use it once, at the crate root of a `cdylib` handler crate: `export_handler!(MyHandler);`.
/// On `wasm32` it converts the engine's job context into a [`Context`], calls
/// [`Handler::run`] and turns an `Err` into the failure reason string. On other targets it only
/// checks that the type implements [`Handler`], so the crate still builds and unit-tests
/// natively.
#[cfg(not(target_arch = "wasm32"))]
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        const _: fn() = $crate::__private::assert_handler::<$handler>;
    };
}

/// Implementation details of the macros. Not a public API: no stability promise.
#[doc(hidden)]
pub mod __private {
    use crate::{Handler, Result};

    /// The wit-bindgen runtime, reachable from handler crates that do not depend on it.
    #[cfg(target_arch = "wasm32")]
    pub use wit_bindgen;

    /// The bindings of world `jobhook:handler/handler`, generated from the crate's copy of the
    /// WIT in `wit/` (wit-bindgen resolves `path` against this crate's `CARGO_MANIFEST_DIR`; a
    /// test keeps the copy identical to the repository's `wit/`).
    #[cfg(target_arch = "wasm32")]
    #[allow(missing_docs, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            world: "handler",
            path: "wit",
            pub_export_macro: true,
            default_bindings_module: "::jobhook_sdk::__private::bindings",
            runtime_path: "::jobhook_sdk::__private::wit_bindgen::rt",
        });
    }

    /// The body of the exported `run-handler`: convert, run, report.
    #[cfg(target_arch = "wasm32")]
    pub fn run_exported<H: Handler>(
        context: bindings::JobContext,
    ) -> ::core::result::Result<(), String> {
        let ctx = crate::Context::from(crate::backend::raw_context(context));
        outcome(H::run(&ctx))
    }

    /// What the engine records for a handler's result: the error's message as the reason.
    pub fn outcome(result: Result<()>) -> ::core::result::Result<(), String> {
        result.map_err(|e| e.to_string())
    }

    /// Compile-time check used by the native `export_handler!`.
    pub fn assert_handler<H: Handler>() {}
}
