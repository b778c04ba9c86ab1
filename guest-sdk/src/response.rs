//! The HTTP method and response types shared by [`keyfactor`](crate::keyfactor) and
//! [`http`](crate::http).

use std::fmt;

use serde::de::DeserializeOwned;

use crate::type_name::short_type_name;
use crate::{Error, Result};

/// How many bytes of a response body [`Response::error_for_status`] quotes in its error: enough
/// for Keyfactor's `{"ErrorCode": ..., "Message": ...}` answers, small enough for a log line.
pub const ERROR_BODY_SNIPPET: usize = 256;

/// HTTP methods a handler may use with `keyfactor` and `http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `DELETE`
    Delete,
}

impl Method {
    /// The method as it appears on the wire, e.g. `"GET"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A whole HTTP response as the engine received it (the body already bounded by its limit).
///
/// A non-2xx status is *not* an error by itself: check [`is_success`](Self::is_success) or use
/// [`error_for_status`](Self::error_for_status).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// Response headers in the order received; names as the server sent them.
    pub headers: Vec<(String, String)>,
    /// The response body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with this status and body and no headers (handy in tests).
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first header named `name`, compared without regard to ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text; an error if it is not valid UTF-8.
    pub fn text(&self) -> Result<String> {
        String::from_utf8(self.body.clone()).map_err(|e| {
            Error::new(format!(
                "HTTP {} response body is not valid UTF-8 ({e})",
                self.status
            ))
        })
    }

    /// The body parsed as JSON into `T`; the error names `T` and serde's reason (line/column).
    /// Use `serde_json::Value` to read a shape leniently.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::new(format!(
                "HTTP {} response body is not the expected JSON for {} ({e})",
                self.status,
                short_type_name::<T>()
            ))
        })
    }

    /// `Ok(self)` for a 2xx status, otherwise an error naming the status and quoting at most
    /// [`ERROR_BODY_SNIPPET`] bytes of the body (on one line), which is usually where Keyfactor
    /// says what was wrong.
    pub fn error_for_status(self) -> Result<Response> {
        if self.is_success() {
            return Ok(self);
        }
        let mut message = format!("HTTP status {}", self.status);
        if let Some(reason) = reason_phrase(self.status) {
            message.push(' ');
            message.push_str(reason);
        }
        let snippet = snippet(&self.body, ERROR_BODY_SNIPPET);
        if !snippet.is_empty() {
            message.push_str(": ");
            message.push_str(&snippet);
        }
        Err(Error::new(message))
    }
}

/// At most `max` bytes of `body` as one line of text: invalid UTF-8 replaced, control characters
/// and runs of whitespace collapsed to one space, `…` appended when cut.
pub(crate) fn snippet(body: &[u8], max: usize) -> String {
    let cut = body.len() > max;
    let head = body.get(..max).unwrap_or(body);
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len() + 3);
    let mut last_space = false;
    for c in text.trim().chars() {
        if c.is_whitespace() || c.is_control() {
            if !last_space {
                out.push(' ');
            }
            last_space = true;
        } else {
            out.push(c);
            last_space = false;
        }
    }
    if cut {
        out.push('…');
    }
    out
}

/// The standard reason phrase of the statuses a handler commonly sees.
fn reason_phrase(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_range() {
        assert!(Response::new(200, "").is_success());
        assert!(Response::new(204, "").is_success());
        assert!(!Response::new(199, "").is_success());
        assert!(!Response::new(302, "").is_success());
        assert!(!Response::new(500, "").is_success());
    }

    #[test]
    fn text_and_json() {
        let r = Response::new(200, r#"[{"JobHistoryId": 2171}]"#);
        assert_eq!(r.text().unwrap_or_default(), r#"[{"JobHistoryId": 2171}]"#);
        let v: serde_json::Value = r.json().unwrap_or_default();
        assert_eq!(v[0]["JobHistoryId"], 2171);

        let bad = Response::new(200, vec![0xff, 0xfe]);
        assert!(
            bad.text()
                .unwrap_err()
                .to_string()
                .contains("not valid UTF-8")
        );
        let err = Response::new(200, "<html>")
            .json::<Vec<u32>>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("Vec<u32>"), "{err}");
    }

    #[test]
    fn header_lookup_ignores_case() {
        let r = Response {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Vec::new(),
        };
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-missing"), None);
    }

    #[test]
    fn error_for_status_quotes_a_bounded_snippet() {
        assert!(Response::new(201, "ok").error_for_status().is_ok());

        let err = Response::new(
            403,
            "{\"ErrorCode\":\"0xA0110002\",\n  \"Message\":\"denied\"}",
        )
        .error_for_status()
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "HTTP status 403 Forbidden: {\"ErrorCode\":\"0xA0110002\", \"Message\":\"denied\"}"
        );

        let huge = "é".repeat(10_000);
        let err = Response::new(500, huge)
            .error_for_status()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("HTTP status 500 Internal Server Error: é"));
        assert!(err.ends_with('…'));
        assert!(err.len() < ERROR_BODY_SNIPPET + 64, "{}", err.len());

        let err = Response::new(599, "")
            .error_for_status()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "HTTP status 599");
    }

    #[test]
    fn method_names() {
        assert_eq!(Method::Patch.to_string(), "PATCH");
    }
}
