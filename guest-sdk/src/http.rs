//! Outbound HTTP(S) to URL prefixes the operator allow-listed for this handler, e.g. a chat
//! webhook.
//!
//! ```no_run
//! # fn main() -> jobhook_sdk::Result<()> {
//! use jobhook_sdk::http::Request;
//!
//! Request::post("https://chat.example.com/hooks/pki")
//!     .json(&jobhook_sdk::serde_json::json!({ "text": "Inventory failed" }))?
//!     .send()?
//!     .error_for_status()?;
//! # Ok(()) }
//! ```

use serde::Serialize;

pub use crate::response::{Method, Response};
use crate::{Error, Result, backend};

/// An outbound HTTP request, built step by step and sent with [`send`](Self::send).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a request does nothing until `.send()` is called"]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Request {
    /// A request with `method` for `url`, an absolute `https://` URL under one of the handler's
    /// allowed prefixes.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Request {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// A `GET` request for `url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new(Method::Get, url)
    }

    /// A `POST` request for `url`.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new(Method::Post, url)
    }

    /// A `PUT` request for `url`.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new(Method::Put, url)
    }

    /// A `PATCH` request for `url`.
    pub fn patch(url: impl Into<String>) -> Self {
        Self::new(Method::Patch, url)
    }

    /// A `DELETE` request for `url`.
    pub fn delete(url: impl Into<String>) -> Self {
        Self::new(Method::Delete, url)
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the request body to these bytes.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets the body to `value` serialised as JSON and, unless a `Content-Type` header is
    /// already set, adds `Content-Type: application/json`.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::new(format!("cannot serialise the request body as JSON ({e})")))?;
        if !self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            self.headers
                .push(("Content-Type".into(), "application/json".into()));
        }
        self.body = Some(body);
        Ok(self)
    }

    /// Sends the request and waits for the whole response.
    ///
    /// `Err` means the request did not complete; the error says `http <METHOD>: <why>` (the URL
    /// is left out on purpose: webhook URLs often embed a secret). Any HTTP status is `Ok`: see
    /// [`Response::error_for_status`].
    pub fn send(self) -> Result<Response> {
        let what = format!("http {}", self.method);
        let request = backend::HttpRequest {
            method: self.method,
            url: self.url,
            headers: self.headers,
            body: self.body,
        };
        backend::http_send(request).map_err(|e| Error::capability(what, e))
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::CapabilityError;
    use crate::testing::MockHost;

    #[test]
    fn json_sets_content_type_once() {
        let host = MockHost::new().http_response(204, "").install();
        let sent = Request::post("https://chat.example.com/hooks/x")
            .header("content-type", "application/json; charset=utf-8")
            .json(&serde_json::json!({"text": "hi"}))
            .and_then(Request::send);
        assert_eq!(sent.map(|r| r.status), Ok(204));
        let calls = host.http_requests();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].url, "https://chat.example.com/hooks/x");
        assert_eq!(calls[0].headers.len(), 1);
        assert_eq!(calls[0].body_text().as_deref(), Some(r#"{"text":"hi"}"#));

        let _ = Request::put("https://chat.example.com/y").json(&1);
    }

    #[test]
    fn errors_do_not_leak_the_url() {
        let _host = MockHost::new()
            .http_error(CapabilityError::Denied("not allowed".into()))
            .install();
        let err = Request::get("https://hooks.example.com/secret-token")
            .send()
            .unwrap_err();
        assert_eq!(err.to_string(), "http GET: denied: not allowed");
    }
}
