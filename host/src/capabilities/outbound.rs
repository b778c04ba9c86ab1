//! What the `keyfactor` and `http` capabilities share on the way out of the sandbox and back:
//! header checks, the bounded response read, scrubbing of credentials from what a server sends
//! back, and turning transport errors into guest-safe [`CapabilityError`]s.
//!
//! Everything here runs on guest-controlled input, so nothing panics and every size is bounded.

use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::bindings::types::{CapabilityError, Method};

/// Longest header name a guest may send. Real header names are short; the cap keeps refusal
/// messages small.
pub const MAX_HEADER_NAME_BYTES: usize = 64;

/// Longest header value a guest may send. 1 KiB fits any `Accept`/`Content-Type`/API-version
/// value and the bodies of chat-webhook signature headers.
pub const MAX_HEADER_VALUE_BYTES: usize = 1024;

/// Headers a guest may send in one request.
pub const MAX_REQUEST_HEADERS: usize = 16;

/// Response headers handed back to the guest; the rest are dropped (an endless stream of
/// headers from a hostile server must not become an endless copy into the guest).
pub const MAX_RESPONSE_HEADERS: usize = 64;

/// Longest response header value handed back to the guest; longer values are dropped.
pub const MAX_RESPONSE_HEADER_VALUE_BYTES: usize = 4096;

/// What replaces a credential found in a response.
pub const REDACTED: &str = "[redacted]";

/// The wire method of a WIT method.
pub fn method(m: Method) -> reqwest::Method {
    match m {
        Method::Get => reqwest::Method::GET,
        Method::Post => reqwest::Method::POST,
        Method::Put => reqwest::Method::PUT,
        Method::Patch => reqwest::Method::PATCH,
        Method::Delete => reqwest::Method::DELETE,
    }
}

/// The method's name as an operator writes it in a grant (`GET`, `POST`, ...).
pub fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
        Method::Delete => "DELETE",
    }
}

/// An HTTP method as an operator writes it in a grant (`"GET"`, any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum GrantMethod {
    /// `GET`
    #[serde(alias = "get", alias = "Get")]
    Get,
    /// `POST`
    #[serde(alias = "post", alias = "Post")]
    Post,
    /// `PUT`
    #[serde(alias = "put", alias = "Put")]
    Put,
    /// `PATCH`
    #[serde(alias = "patch", alias = "Patch")]
    Patch,
    /// `DELETE`
    #[serde(alias = "delete", alias = "Delete")]
    Delete,
}

impl GrantMethod {
    /// Every method.
    pub const ALL: [GrantMethod; 5] = [
        GrantMethod::Get,
        GrantMethod::Post,
        GrantMethod::Put,
        GrantMethod::Patch,
        GrantMethod::Delete,
    ];

    /// The grant form of a WIT method.
    pub fn of(m: Method) -> Self {
        match m {
            Method::Get => GrantMethod::Get,
            Method::Post => GrantMethod::Post,
            Method::Put => GrantMethod::Put,
            Method::Patch => GrantMethod::Patch,
            Method::Delete => GrantMethod::Delete,
        }
    }
}

impl GrantMethod {
    /// The WIT form.
    pub fn wit(self) -> Method {
        match self {
            GrantMethod::Get => Method::Get,
            GrantMethod::Post => Method::Post,
            GrantMethod::Put => Method::Put,
            GrantMethod::Patch => Method::Patch,
            GrantMethod::Delete => Method::Delete,
        }
    }
}

/// Why a guest header was refused. Messages quote at most a short, sanitized piece of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderRefused {
    /// The name is empty or too long.
    #[error("header names must be 1 to {MAX_HEADER_NAME_BYTES} bytes long")]
    NameLength,
    /// The name is not an HTTP token.
    #[error(
        "header name {} contains characters that are not allowed in an HTTP header name",
        quote(.0)
    )]
    NameCharacters(String),
    /// The value is too long.
    #[error("the value of header {0} is longer than {MAX_HEADER_VALUE_BYTES} bytes")]
    ValueLength(String),
    /// The value has control or non-ASCII characters.
    #[error(
        "the value of header {0} contains control or non-ASCII characters (CR/LF are never allowed)"
    )]
    ValueCharacters(String),
}

/// Checks one guest header and converts it for the wire. Refuses names that are not HTTP tokens
/// and values with control characters (CR/LF header injection, NUL).
pub fn check_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), HeaderRefused> {
    if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES {
        return Err(HeaderRefused::NameLength);
    }
    if !name.bytes().all(is_token_byte) {
        return Err(HeaderRefused::NameCharacters(name.to_owned()));
    }
    if value.len() > MAX_HEADER_VALUE_BYTES {
        return Err(HeaderRefused::ValueLength(name.to_owned()));
    }
    // Visible ASCII, space and tab only: no CR/LF (header injection), no NUL, no obs-text.
    if !value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return Err(HeaderRefused::ValueCharacters(name.to_owned()));
    }
    let header_name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| HeaderRefused::NameCharacters(name.to_owned()))?;
    let header_value = HeaderValue::from_str(value)
        .map_err(|_| HeaderRefused::ValueCharacters(name.to_owned()))?;
    Ok((header_name, header_value))
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Guest input shown in a message: at most 64 characters, control characters escaped, so a
/// refusal message cannot itself carry an injection or a megabyte of text.
pub fn quote(input: &str) -> String {
    const MAX_QUOTED_CHARS: usize = 64;
    let mut out = String::from("\"");
    for (i, c) in input.chars().enumerate() {
        if i == MAX_QUOTED_CHARS {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    out
}

/// Why a response body was not read whole.
#[derive(Debug)]
pub enum BodyError {
    /// Longer than the limit (by `Content-Length` or by counting).
    TooLarge,
    /// The transport failed mid-body.
    Transport(reqwest::Error),
}

/// Reads a response body, but never more than `max` bytes: a declared `Content-Length` over the
/// limit is refused before reading, and an undeclared or lying one is cut off as soon as the
/// count passes the limit.
pub async fn read_body(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
    if let Some(len) = response.content_length()
        && len > max as u64
    {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len().saturating_add(chunk.len()) > max {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Turns a transport error into what the guest is told: timeouts as `timeout`, everything else
/// as `failed`, with `what` naming the destination in words (never a URL, which may carry a
/// token in its path or query).
pub fn transport_error(error: &reqwest::Error, what: &str) -> CapabilityError {
    if error.is_timeout() {
        CapabilityError::Timeout(format!("{what} did not answer in time"))
    } else if error.is_connect() {
        CapabilityError::Failed(format!("cannot connect to {what}"))
    } else if error.is_body() || error.is_decode() {
        CapabilityError::Failed(format!("{what} broke off its response"))
    } else {
        CapabilityError::Failed(format!("the request to {what} failed"))
    }
}

/// Finds and replaces credentials in what a server sends back, so that a server which echoes
/// the request (an echo endpoint, a verbose error page, a compromised proxy) cannot hand the
/// engine's credentials to the guest.
///
/// This is defence in depth: the real Keyfactor API does not echo credentials, and the engine
/// already forwards only an allow-list of response headers.
#[derive(Clone, Default)]
pub struct Redactor {
    needles: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} needles)", self.needles.len())
    }
}

/// Secrets shorter than this are not searched for: redacting every `"a"` would mangle bodies,
/// and a secret this short offers no protection anyway.
pub const MIN_REDACTED_BYTES: usize = 4;

impl Redactor {
    /// A redactor with nothing to find.
    pub fn new() -> Self {
        Redactor::default()
    }

    /// Adds a secret, and its JSON-escaped form (how an echoing JSON endpoint would show it).
    pub fn add(&mut self, secret: &str) {
        if secret.len() < MIN_REDACTED_BYTES {
            return;
        }
        let mut push = |needle: Vec<u8>| {
            if !self.needles.contains(&needle) {
                self.needles.push(needle);
            }
        };
        push(secret.as_bytes().to_vec());
        if let Ok(json) = serde_json::to_string(secret) {
            let escaped = json.trim_matches('"');
            if escaped != secret {
                push(escaped.as_bytes().to_vec());
            }
        }
    }

    /// Whether there is anything to redact.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Replaces every occurrence of every secret in `bytes` with [`REDACTED`].
    pub fn redact(&self, bytes: Vec<u8>) -> Vec<u8> {
        let mut bytes = bytes;
        for needle in &self.needles {
            if contains(&bytes, needle) {
                bytes = replace_all(&bytes, needle, REDACTED.as_bytes());
            }
        }
        bytes
    }

    /// [`redact`](Self::redact) for text.
    pub fn redact_str(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_owned();
        }
        String::from_utf8_lossy(&self.redact(text.as_bytes().to_vec())).into_owned()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle, 0).is_some()
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = *needle.first()?;
    let rest = haystack.get(from..)?;
    let mut offset = 0;
    while let Some(pos) = rest.get(offset..)?.iter().position(|&b| b == first) {
        let start = offset + pos;
        if rest.get(start..start + needle.len()) == Some(needle) {
            return Some(from + start);
        }
        offset = start + 1;
    }
    None
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut at = 0;
    while let Some(pos) = find(haystack, needle, at) {
        out.extend_from_slice(haystack.get(at..pos).unwrap_or_default());
        out.extend_from_slice(with);
        at = pos + needle.len();
    }
    out.extend_from_slice(haystack.get(at..).unwrap_or_default());
    out
}

/// The response headers a guest gets: those `keep` accepts, with valid UTF-8 values of bounded
/// size, at most [`MAX_RESPONSE_HEADERS`], credentials redacted.
pub fn response_headers(
    headers: &reqwest::header::HeaderMap,
    keep: impl Fn(&str) -> bool,
    redactor: &Redactor,
) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| keep(name.as_str()))
        .filter_map(|(name, value)| {
            let value = value.to_str().ok()?;
            (value.len() <= MAX_RESPONSE_HEADER_VALUE_BYTES)
                .then(|| (name.as_str().to_owned(), redactor.redact_str(value)))
        })
        .take(MAX_RESPONSE_HEADERS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_refuse_injection() {
        assert!(check_header("Accept", "application/json").is_ok());
        assert!(check_header("Accept", "a\r\nX-Evil: 1").is_err());
        assert!(check_header("Accept", "a\nb").is_err());
        assert!(check_header("Accept", "a\0b").is_err());
        assert!(check_header("Acc ept", "x").is_err());
        assert!(check_header("Accept:", "x").is_err());
        assert!(check_header("", "x").is_err());
        assert!(check_header("X-Note", "caf\u{e9}").is_err());
        assert!(check_header(&"a".repeat(65), "x").is_err());
        assert!(check_header("a", &"v".repeat(MAX_HEADER_VALUE_BYTES + 1)).is_err());
    }

    proptest::proptest! {
        /// Header checks never panic, and what they accept carries no line break or NUL.
        #[test]
        fn accepted_headers_cannot_inject(name in "\\PC{0,20}|[A-Za-z-]{1,12}", value in "\\PC{0,40}|[ -~\r\n\t]{0,40}") {
            if let Ok((n, v)) = check_header(&name, &value) {
                proptest::prop_assert!(!n.as_str().contains(['\r', '\n', ':', ' ']));
                proptest::prop_assert!(!v.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
            }
        }
    }

    #[test]
    fn quoting_is_bounded_and_escaped() {
        assert_eq!(quote("a\r\nb"), r#""a\r\nb""#);
        assert!(quote(&"x".repeat(1000)).len() < 80);
    }

    #[test]
    fn redaction_finds_plain_and_json_escaped_secrets() {
        let mut r = Redactor::new();
        r.add(r#"KFTRAIN\svc:pa"ss"#);
        r.add("abc"); // too short: ignored
        let body = br#"{"a":"KFTRAIN\\svc:pa\"ss","b":"KFTRAIN\svc:pa"ss","c":"abc"}"#.to_vec();
        let out = String::from_utf8(r.redact(body)).unwrap();
        assert_eq!(out, r#"{"a":"[redacted]","b":"[redacted]","c":"abc"}"#);
        assert_eq!(r.redact_str("xxKFTRAIN\\svc:pa\"ssyy"), "xx[redacted]yy");
        assert_eq!(r.redact(Vec::new()), Vec::<u8>::new());
    }
}
