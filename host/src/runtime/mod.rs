//! Running one handler on one context, safely.
//!
//! - [`config`]: the `[engine]` section of the configuration;
//! - [`engine`]: the wasmtime engine (pooling allocator, epoch ticker, proposals switched off);
//! - [`loader`]: the load gate for untrusted component bytes (world and grant checks, compile
//!   time bound);
//! - [`imports`]: reading a component's imports and exports from the binary, before compiling;
//! - [`aot`]: the on-disk cache of compiled components;
//! - [`sandbox`]: a fresh store per delivery, and where the time limit is enforced;
//! - [`state`]: the state of one sandbox and the linker (WASI and the capabilities);
//! - [`compat`]: the interfaces of earlier contract versions, forwarded to the current ones;
//! - [`classify`]: how a failed invocation becomes an outcome class;
//! - [`limiter`]: where the memory and table limits are enforced;
//! - [`cpu_share`]: the cores that deliveries which keep computing may take between them;
//! - [`threads`]: async runtimes on threads of their own, scheduled apart from the rest of the
//!   process.

pub mod aot;
pub mod classify;
pub mod compat;
pub mod config;
pub mod cpu_share;
pub mod engine;
pub mod imports;
pub mod limiter;
pub mod loader;
pub mod sandbox;
pub mod state;
pub mod threads;
