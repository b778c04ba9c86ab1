//! The one place where SDK calls meet the host.
//!
//! On `wasm32` every function calls the matching wit-bindgen import ([`wasm`]); elsewhere it goes
//! to the thread's installed [`testing::MockHost`](crate::testing::MockHost) ([`native`]). Each
//! function here calls exactly one import and nothing else references the imports, so a
//! component ends up importing only the interfaces whose functions its handler actually uses:
//! the linker drops the rest, and the component's import list stays its capability list.

#[cfg(target_arch = "wasm32")]
mod wasm;
#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
mod native;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::*;
