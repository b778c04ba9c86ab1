//! The one place where SDK calls meet the host.
//!
//! On `wasm32` every function calls the matching wit-bindgen import (the `wasm` module); elsewhere it goes
//! to the thread's installed [`NativeHost`] ([`native`]), which is what
//! [`testing::MockHost`](crate::testing::MockHost) installs. Each function here calls exactly one
//! import and nothing else references the imports, so a component ends up importing only the
//! interfaces whose functions its handler actually uses: the linker drops the rest, and the
//! component's import list stays its capability list.
//!
//! The backend sits below the capability modules: it takes plain data ([`KeyfactorRequest`],
//! [`HttpRequest`], [`MailMessage`]) built from their public builders, and only names the leaf
//! modules `error`, `response`, `level` and `context`, so the module graph stays acyclic.

use crate::Method;

#[cfg(target_arch = "wasm32")]
mod wasm;
#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
mod native;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::*;

/// A Keyfactor API request as the `keyfactor` interface takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyfactorRequest {
    pub(crate) method: Method,
    /// Relative to the operator's API base.
    pub(crate) path: String,
    /// Unencoded name/value pairs, in order.
    pub(crate) query: Vec<(String, String)>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Option<Vec<u8>>,
}

/// An outbound HTTP request as the `http` interface takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpRequest {
    pub(crate) method: Method,
    pub(crate) url: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Option<Vec<u8>>,
}

/// An e-mail as the `mail` interface takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MailMessage {
    /// `None`: the operator's configured From.
    pub(crate) from: Option<String>,
    pub(crate) to: Vec<String>,
    pub(crate) cc: Vec<String>,
    pub(crate) subject: String,
    pub(crate) body: String,
}
