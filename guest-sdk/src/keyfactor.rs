//! The Keyfactor Command API, through the engine.
//!
//! The handler names a path relative to the operator-configured API base (like the
//! `HttpClient.BaseAddress` Keyfactor hands to .NET handlers, e.g.
//! `https://command.example.com/KeyfactorAPI/`). The engine adds the credentials and the
//! `x-keyfactor-requested-with` / `x-keyfactor-api-version` headers: the handler never sees a
//! host name or a credential.
//!
//! ```no_run
//! # fn main() -> jobhook_sdk::Result<()> {
//! use jobhook_sdk::keyfactor::Request;
//!
//! let history: jobhook_sdk::serde_json::Value = Request::get("OrchestratorJobs/JobHistory")
//!     .query("pq.queryString", r#"JobID -eq "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90""#)
//!     .send()?
//!     .error_for_status()?
//!     .json()?;
//! # Ok(()) }
//! ```

use serde::Serialize;

pub use crate::response::{Method, Response};
use crate::{Error, Result, backend};

/// A request to the Keyfactor Command API, built step by step and sent with [`send`](Self::send).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a request does nothing until `.send()` is called"]
pub struct Request {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Request {
    /// A request with `method` for `path`, relative to the API base (e.g. `Agents`,
    /// `OrchestratorJobs/JobHistory`; no scheme, host or `..`). A leading `/` is tolerated.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Request {
            method,
            path: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// A `GET` request for `path`.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::Get, path)
    }

    /// A `POST` request for `path`.
    pub fn post(path: impl Into<String>) -> Self {
        Self::new(Method::Post, path)
    }

    /// A `PUT` request for `path`.
    pub fn put(path: impl Into<String>) -> Self {
        Self::new(Method::Put, path)
    }

    /// A `PATCH` request for `path`.
    pub fn patch(path: impl Into<String>) -> Self {
        Self::new(Method::Patch, path)
    }

    /// A `DELETE` request for `path`.
    pub fn delete(path: impl Into<String>) -> Self {
        Self::new(Method::Delete, path)
    }

    /// Adds query parameter `name=value`, unencoded: the engine encodes it (e.g.
    /// `("pq.queryString", "JobID -eq \"…\"")`).
    pub fn query(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.query.push((name.into(), value.into()));
        self
    }

    /// Adds a header. The engine accepts only a small allow-list of extra headers and refuses
    /// the request ([`CapabilityError::Denied`](crate::CapabilityError::Denied)) otherwise;
    /// authentication and the `x-keyfactor-*` headers are always the engine's.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the request body to these bytes.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets the request body to `value` serialised as JSON (Keyfactor's only body format; the
    /// engine sends it as `application/json`). Fails only if `value` cannot be serialised.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::new(format!("cannot serialise the request body as JSON ({e})")))?;
        self.body = Some(body);
        Ok(self)
    }

    /// Sends the request and waits for the whole response.
    ///
    /// `Err` means the request did not complete (not granted, denied, timed out, ...); the
    /// error says `keyfactor <METHOD> <path>: <why>` and keeps the
    /// [`CapabilityError`](crate::CapabilityError). Any HTTP status, including 4xx and 5xx,
    /// is `Ok`: see [`Response::error_for_status`].
    pub fn send(self) -> Result<Response> {
        let what = format!("keyfactor {} {}", self.method, self.path);
        let request = backend::KeyfactorRequest {
            method: self.method,
            path: self.path,
            query: self.query,
            headers: self.headers,
            body: self.body,
        };
        backend::keyfactor_send(request).map_err(|e| Error::capability(what, e))
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::CapabilityError;
    use crate::testing::MockHost;

    #[test]
    fn builds_and_sends_through_the_host() {
        let host = MockHost::new()
            .keyfactor_response(200, r#"{"ok":true}"#)
            .install();
        let response = Request::post("Certificates/Metadata")
            .query("a", "1")
            .header("Accept", "application/json")
            .json(&serde_json::json!({"Id": 14}))
            .and_then(Request::send)
            .and_then(Response::error_for_status);
        assert_eq!(response.map(|r| r.body), Ok(br#"{"ok":true}"#.to_vec()));

        let calls = host.keyfactor_requests();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].method, Method::Post);
        assert_eq!(calls[0].path, "Certificates/Metadata");
        assert_eq!(calls[0].query_value("a"), Some("1"));
        assert_eq!(
            calls[0].headers,
            vec![("Accept".to_string(), "application/json".to_string())]
        );
        assert_eq!(calls[0].body_json(), Some(serde_json::json!({"Id": 14})));
    }

    #[test]
    fn capability_errors_name_the_request() {
        let _host = MockHost::new()
            .keyfactor_error(CapabilityError::NotGranted(
                "keyfactor is not granted".into(),
            ))
            .install();
        let err = Request::delete("Agents/1").send().unwrap_err();
        assert_eq!(
            err.to_string(),
            "keyfactor DELETE Agents/1: not granted: keyfactor is not granted"
        );
        assert!(matches!(
            err.capability_error(),
            Some(CapabilityError::NotGranted(_))
        ));
    }

    #[test]
    fn nothing_queued_is_not_available() {
        let _host = MockHost::new().install();
        let err = Request::get("Agents").send().unwrap_err();
        assert!(matches!(
            err.capability_error(),
            Some(CapabilityError::NotAvailable(_))
        ));
    }
}
