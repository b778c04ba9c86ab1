//! What the `keyfactor` and `http` capabilities share on the way out of the sandbox and back:
//! header checks, the bounded response read, scrubbing of credentials from what a server sends
//! back, and turning transport errors into guest-safe [`CapabilityError`]s.
//!
//! Everything here runs on guest-controlled input, so nothing panics and every size is bounded.

use crate::log_limit::LogLimit;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::bindings::types::{CapabilityError, Method};
use crate::excerpt::MAX_QUOTED_CHARS;

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

/// Longest response header name handed back to the guest; longer names are dropped. Real names
/// are a few dozen bytes; a long one is a server writing data into the name, where it cannot
/// be scrubbed (see [`response_headers`]).
pub const MAX_RESPONSE_HEADER_NAME_BYTES: usize = 128;

/// Smallest `max_request_bytes` / `max_response_bytes` of an outbound section: below 1 KiB no
/// real request or response fits (a server's JSON error is larger), and every call would fail.
pub const MIN_BODY_LIMIT_BYTES: usize = 1024;

/// Largest `max_request_bytes` / `max_response_bytes` of an outbound section: a body is held
/// whole in the engine's memory for every call in flight (a response then copied into the
/// guest's), so an unbounded setting would let one server's answer take the engine's memory.
/// 64 MiB is sixteen times the largest default (Keyfactor's 4 MiB).
pub const MAX_BODY_LIMIT_BYTES: usize = 64 * 1024 * 1024;

/// Largest `timeout_ms` / `connect_timeout_ms` of an outbound section (and of `[mail.smtp]`):
/// a call still unanswered after ten minutes is to a server that is gone, and every handler
/// that waits for it holds a delivery place meanwhile.
pub const MAX_CALL_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// Checks a section's call settings; `Err` names the section, the key, the value and the
/// range to choose from.
pub fn check_call_settings(
    section: &str,
    timeouts: &[(&str, u64)],
    body_limits: &[(&str, usize)],
) -> Result<(), String> {
    for (key, value) in timeouts {
        if !(1..=MAX_CALL_TIMEOUT_MS).contains(value) {
            return Err(format!(
                "{section} {key} = {value} is out of range: give 1 to {MAX_CALL_TIMEOUT_MS} \
                 (milliseconds)"
            ));
        }
    }
    for (key, value) in body_limits {
        if !(MIN_BODY_LIMIT_BYTES..=MAX_BODY_LIMIT_BYTES).contains(value) {
            return Err(format!(
                "{section} {key} = {value} is out of range: give {MIN_BODY_LIMIT_BYTES} to \
                 {MAX_BODY_LIMIT_BYTES} (bytes)"
            ));
        }
    }
    Ok(())
}

/// What replaces a credential found in a response.
pub const REDACTED: &str = "[redacted]";

/// Whether a decoded path segment is, to some server, a dot segment: nothing but dots and
/// spaces. `.` and `..` everywhere; `...`, `..%20` and `.. .` on IIS, which trims a segment's
/// trailing dots and spaces before it resolves `..` — a guest could climb out of its grant to a
/// Windows server that way. The empty segment is not one (`//` is the caller's to judge).
pub fn is_dot_segment(decoded: &[u8]) -> bool {
    !decoded.is_empty() && decoded.iter().all(|b| matches!(b, b'.' | b' '))
}

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

/// Guest input shown in a message: at most [`MAX_QUOTED_CHARS`] characters, control characters
/// escaped, so a refusal message cannot itself carry an injection or a megabyte of text. Unlike
/// [`crate::excerpt::quoted`] it escapes each character on its own (`'` too) and puts the `…`
/// inside the quotes, as guest-facing refusal messages have always read.
pub fn quote(input: &str) -> String {
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

/// A URL as written, for a message about it, without its user information (`user:password@`),
/// which no message repeats: everything before the last `@` of the authority is replaced by
/// `…`. Found in the text, not by a URL parser, so that a URL the parser refused is covered
/// too: the authority starts after `scheme:` and the slashes that follow it (or at the start,
/// without those) and ends at the first `/`, `\`, `?` or `#`. Borrowed when there is none.
pub fn without_credentials(url: &str) -> std::borrow::Cow<'_, str> {
    let is_scheme = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    let authority_start = match url.split_once(':') {
        Some((scheme, rest)) if is_scheme(scheme) && rest.starts_with(['/', '\\']) => {
            url.len() - rest.trim_start_matches(['/', '\\']).len()
        }
        _ => 0,
    };
    let Some(authority) = url.get(authority_start..) else {
        return std::borrow::Cow::Borrowed(url);
    };
    let end = authority
        .find(['/', '\\', '?', '#'])
        .unwrap_or(authority.len());
    match authority.get(..end).and_then(|a| a.rfind('@')) {
        Some(at) => std::borrow::Cow::Owned(format!(
            "{}…{}",
            url.get(..authority_start).unwrap_or_default(),
            authority.get(at..).unwrap_or_default()
        )),
        None => std::borrow::Cow::Borrowed(url),
    }
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

/// Least time between two log lines of one kind about failed outbound calls (a transport
/// failure, an answer that broke off); each line says how many more there were. A handler
/// calling a host that refuses every connection, or a server breaking off every answer, would
/// otherwise decide how much the engine writes to its log.
pub const FAILURE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Logs a failed call to `destination` (a host or an API path, never a URL) at warn through
/// `limit` ([`FAILURE_LOG_INTERVAL`]): `what` happened — with, when the server's certificate
/// was refused, why in words and the setting of `trust` that changes it
/// ([`certificate_hint`]) — the cause ([`failure_cause`]) and how many such lines went untold
/// since the last.
pub fn log_failure(
    limit: &LogLimit,
    error: reqwest::Error,
    destination: &dyn std::fmt::Display,
    what: &str,
    trust: &TrustSettings,
) {
    if let Some(untold) = limit.due() {
        let hint = certificate_hint(&error, trust);
        let cause = failure_cause(error);
        match hint {
            Some(hint) => tracing::warn!(
                destination = %destination,
                error = %cause,
                more_since_last_warning = untold,
                "{what}: {hint}"
            ),
            None => tracing::warn!(
                destination = %destination,
                error = %cause,
                more_since_last_warning = untold,
                "{what}"
            ),
        }
    }
}

/// Where the operator fixes a server certificate the engine refused, for one kind of outbound
/// TLS connection: what [`certificate_hint`] names, in the log and in what the handler is told
/// (so never a URL or a secret, only setting names).
#[derive(Debug, Clone, Copy)]
pub struct TrustSettings {
    /// The connection's configuration section: `[keyfactor]`, `[http]`, `[mail.smtp]`.
    pub section: &'static str,
    /// The key of `section` that adds CA certificates to trust (`ca_bundle`), if it has one.
    pub ca_key: Option<&'static str>,
    /// What names the host the certificate must be issued for, and that it must.
    pub name: &'static str,
}

impl TrustSettings {
    /// The fix for a certificate from an issuer the engine does not trust: the CA setting, or
    /// that there is none and what the engine trusts instead — the system's roots, which
    /// rustls-native-certs reads from `SSL_CERT_FILE` / `SSL_CERT_DIR` when they are set.
    fn issuer_fix(&self) -> String {
        match self.ca_key {
            Some(key) => format!(
                "add the issuing CA to {} {key} (a PEM file of CA certificates trusted besides \
                 the system's)",
                self.section
            ),
            None => format!(
                "{} has no CA setting: the engine trusts the system's root certificates, so add \
                 the issuing CA to the system's trust store (or point the engine's SSL_CERT_FILE \
                 environment variable at a PEM bundle that holds it)",
                self.section
            ),
        }
    }
}

/// The server's certificate check that failed in `error`'s causes, in words, with the setting
/// of `trust` that changes it: `the server's TLS certificate is not issued by a certificate
/// authority the engine trusts (…); add the issuing CA to [keyfactor] ca_bundle (…)`. `None` when
/// no certificate was refused (a refused connection, a timeout, a handshake failure of another
/// kind). The words come from rustls's verdict only, never from the server's bytes.
pub fn certificate_hint(
    error: &(dyn std::error::Error + 'static),
    trust: &TrustSettings,
) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(refused) = rustls_error(error)? else {
        return None;
    };
    let (what, fix) = match refused {
        C::UnknownIssuer => (
            "is not issued by a certificate authority the engine trusts (self-signed, or \
             from a private CA)"
                .to_owned(),
            trust.issuer_fix(),
        ),
        C::BadSignature => (
            "does not verify against the certificate authority the engine trusts for it".to_owned(),
            trust.issuer_fix(),
        ),
        C::NotValidForName | C::NotValidForNameContext { .. } => (
            "is not issued for the host name the engine connected to".to_owned(),
            trust.name.to_owned(),
        ),
        C::Expired | C::ExpiredContext { .. } => (
            "has expired".to_owned(),
            "the server needs a renewed certificate (or this machine's clock is wrong)".to_owned(),
        ),
        C::NotValidYet | C::NotValidYetContext { .. } => (
            "is not valid yet".to_owned(),
            "check this machine's clock and the server certificate's start date".to_owned(),
        ),
        C::Revoked => (
            "has been revoked".to_owned(),
            "the server needs a new certificate".to_owned(),
        ),
        // webpki's verdict for a certificate authority's own certificate presented as the
        // server's, most often a self-signed CA certificate installed on the server; rustls
        // passes it on only as text.
        other if format!("{other:?}").contains("CaUsedAsEndEntity") => (
            "is a certificate authority's certificate, not a server certificate".to_owned(),
            format!(
                "the server must present a certificate issued by that CA (a self-signed \
                 certificate must say `CA:FALSE` in its basic constraints: openssl's `req -x509` \
                 makes `CA:TRUE` unless given `-addext basicConstraints=critical,CA:FALSE`), \
                 which trusting the CA certificate does not change; to trust the CA, {}",
                trust.issuer_fix()
            ),
        ),
        // rustls's verdict can carry what the certificate holds (a purpose, an algorithm id,
        // webpki's text): escaped and cut to its first bytes.
        other => (
            format!(
                "was refused ({})",
                crate::outcome::truncate(
                    crate::escape::escape(&format!("{other:?}")).into_owned(),
                    MAX_VERDICT_BYTES
                )
            ),
            trust.issuer_fix(),
        ),
    };
    Some(format!("the server's TLS certificate {what}; {fix}"))
}

/// Longest part of a refused certificate's verdict quoted in [`certificate_hint`]: the name of
/// rustls's verdict fits; what a certificate carries in it is cut here.
const MAX_VERDICT_BYTES: usize = 128;

/// The rustls error among `error`'s causes. A TLS stream reports it inside an `io::Error`
/// (hyper's connector wraps that in another), and an `io::Error`'s `source()` skips the error
/// it wraps, so the walk goes into what each `io::Error` wraps instead.
fn rustls_error<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        current = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// A `Retry-After` value (RFC 9110 §10.2.3), at most `cap`: how long a server asked to be left
/// alone. Delta-seconds, or an HTTP date (any of the three forms §5.6.7 has a recipient read),
/// counted from now on the wall clock: a date already past asks for no pause. `None` for a
/// fraction, a sign, a date that is no date or anything else (the caller's own pause applies).
pub fn retry_after(value: &str, cap: std::time::Duration) -> Option<std::time::Duration> {
    retry_after_at(value, cap, std::time::SystemTime::now())
}

/// [`retry_after`] as of `now`.
fn retry_after_at(
    value: &str,
    cap: std::time::Duration,
    now: std::time::SystemTime,
) -> Option<std::time::Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        let date = httpdate::parse_http_date(value).ok()?;
        // A date before now (or a clock ahead of the server's): no pause.
        return Some(date.duration_since(now).unwrap_or_default().min(cap));
    }
    // All digits: a number past u64 is longer than any cap.
    let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
    Some(std::time::Duration::from_secs(seconds).min(cap))
}

/// Longest cause of a failed call written to the engine's log, in bytes: the chain of a
/// transport error is a few short messages; a server's text in it is cut here.
const MAX_CAUSE_BYTES: usize = 512;

/// Why a call failed, for the engine's log (the operator's, not the guest's): the error and
/// every cause under it (`error sending request: client error (Connect): tcp connect error:
/// Connection refused (os error 111)`), without the URL (a query or path may carry a token),
/// escaped and cut to [`MAX_CAUSE_BYTES`].
pub fn failure_cause(error: reqwest::Error) -> String {
    cause_line(&error.without_url())
}

/// `error`'s chain as one log-safe line: escaped, at most [`MAX_CAUSE_BYTES`] (and the mark).
pub fn cause_line(error: &(dyn std::error::Error + 'static)) -> String {
    let escaped = crate::escape::escape(&crate::error_chain::chain_text(error)).into_owned();
    crate::outcome::truncate(escaped, MAX_CAUSE_BYTES)
}

/// Turns a transport error into what the guest is told: timeouts as `timeout`, everything else
/// as `failed`, with `what` naming the destination in words (never a URL, which may carry a
/// token in its path or query); a refused server certificate says why and which setting of
/// `trust` changes it ([`certificate_hint`]).
pub fn transport_error(
    error: &reqwest::Error,
    what: &str,
    trust: &TrustSettings,
) -> CapabilityError {
    if error.is_timeout() {
        CapabilityError::Timeout(format!("{what} did not answer in time"))
    } else if let Some(hint) = certificate_hint(error, trust) {
        CapabilityError::Failed(format!("cannot connect to {what}: {hint}"))
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
/// The comparison is made on *decoded* characters, not on one escaping of the secret: a
/// secret matches wherever each of its characters is written, independently of its
/// neighbours, in any of the forms a Windows/IIS/.NET server realistically emits:
///
/// - literally;
/// - as a JSON string escape (`\"`, `\\`, `\/`, `\n`…, and `\uXXXX` in either case with
///   surrogate pairs joined: serde's escaping and ASP.NET's `\u002B`, `\u003C`, `\u0026`,
///   `\u0027`, escaped non-ASCII alike), so a JSON string is compared fully decoded, even
///   with the secret split across escapes;
/// - as an HTML character reference: the named ones of [`HTML_ENTITIES`], decimal `&#43;` and
///   hex `&#x2B;`/`&#X2b;`, with or without the `;`;
/// - percent-encoded, each UTF-8 byte as `%XX` in either case, and a space as `+`.
///
/// Every secret is also searched as base64 and base64url (with or without padding) at each of
/// the three byte alignments, so a secret inside a longer base64 text (`base64(user:pass)`, a
/// token inside a blob) is found too; a base64 match is widened over the up to two neighbouring
/// characters that mix the secret's edge bits with other bytes, and over its padding. Whatever
/// matches is replaced, escapes and all, by [`REDACTED`], a fixed marker whose length says
/// nothing about the secret's.
///
/// The search runs inside a host call, outside the handler's time budget, on a body a hostile
/// server chooses, so its cost is bounded by the body alone: every secret of every part of a
/// [`RedactorSet`] is searched for in one pass over the body (see `Matcher`), in time linear in
/// the body's length and, apart from sorting the secrets once per response, independent of how
/// many secrets there are.
///
/// This is defence in depth: the real Keyfactor API does not echo credentials, and the engine
/// already forwards only an allow-list of response headers. What it does not catch is written
/// down in `docs/SECURITY.md` (other transformations, compression, layered encodings, secrets
/// or echoed pieces shorter than [`MIN_REDACTED_BYTES`]).
#[derive(Clone, Default)]
pub struct Redactor {
    needles: Vec<Needle>,
}

/// One byte string to search for, and whether it is a base64 form (widened on a match).
#[derive(Clone, PartialEq, Eq)]
struct Needle {
    /// The bytes, last first: [`Matcher`] reads a body from its end.
    rev: Vec<u8>,
    base64: bool,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} needles)", self.needles.len())
    }
}

/// Secrets shorter than this are not searched for, and neither are encoded forms (base64
/// fragments) shorter than this: redacting every `"a"` would mangle bodies, and a secret this
/// short offers no protection anyway.
pub const MIN_REDACTED_BYTES: usize = 4;

/// Named HTML character references decoded before comparing: the ones .NET's `HtmlEncode`
/// emits and the HTML5 names of the ASCII punctuation a credential may hold.
pub const HTML_ENTITIES: &[(&str, char)] = &[
    ("amp", '&'),
    ("lt", '<'),
    ("gt", '>'),
    ("quot", '"'),
    ("apos", '\''),
    ("plus", '+'),
    ("sol", '/'),
    ("bsol", '\\'),
    ("equals", '='),
    ("percnt", '%'),
    ("colon", ':'),
    ("semi", ';'),
    ("excl", '!'),
    ("num", '#'),
    ("dollar", '$'),
    ("lpar", '('),
    ("rpar", ')'),
    ("ast", '*'),
    ("comma", ','),
    ("period", '.'),
    ("quest", '?'),
    ("commat", '@'),
    ("lsqb", '['),
    ("rsqb", ']'),
    ("lowbar", '_'),
    ("grave", '`'),
    ("lcub", '{'),
    ("rcub", '}'),
    ("verbar", '|'),
    ("Hat", '^'),
    ("tilde", '~'),
    ("nbsp", '\u{a0}'),
];

/// Longest HTML character reference read (`&#x0010FFFF;` and the longest name fit).
const MAX_ENTITY_BYTES: usize = 12;

impl Redactor {
    /// A redactor with nothing to find.
    pub fn new() -> Self {
        Redactor::default()
    }

    /// Adds a secret: it is then found as it is, in every escaping [`Redactor`] lists, and as
    /// base64/base64url at every alignment.
    pub fn add(&mut self, secret: &str) {
        if secret.len() < MIN_REDACTED_BYTES {
            return;
        }
        self.push(secret.as_bytes().to_vec(), false);
        for core in base64_cores(secret.as_bytes()) {
            self.push(core, true);
        }
    }

    fn push(&mut self, mut bytes: Vec<u8>, base64: bool) {
        if bytes.len() < MIN_REDACTED_BYTES {
            return;
        }
        bytes.reverse();
        let needle = Needle { rev: bytes, base64 };
        if !self.needles.contains(&needle) {
            self.needles.push(needle);
        }
    }

    /// Whether there is anything to redact.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Replaces every occurrence of every secret in `bytes`, in any encoding [`Redactor`]
    /// lists, with [`REDACTED`].
    pub fn redact(&self, bytes: Vec<u8>) -> Vec<u8> {
        if self.needles.is_empty() || bytes.is_empty() {
            return bytes;
        }
        Matcher::new([self.needles.as_slice()]).redact(bytes)
    }

    /// [`redact`](Self::redact) for text.
    pub fn redact_str(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_owned();
        }
        Matcher::new([self.needles.as_slice()]).redact_str(text)
    }
}

/// Several [`Redactor`]s applied as one, without copying their secrets: the Keyfactor client
/// combines the redactor of the credentials it was built with (made once) and those of the
/// OAuth access tokens its identities currently hold (taken per response).
#[derive(Clone, Default)]
pub struct RedactorSet {
    parts: Vec<std::sync::Arc<Redactor>>,
}

impl std::fmt::Debug for RedactorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedactorSet({} parts)", self.parts.len())
    }
}

impl RedactorSet {
    /// A set with nothing to find.
    pub fn new() -> Self {
        RedactorSet::default()
    }

    /// Whether `text` holds a secret, as it is or in base64, in any letter case: for a short
    /// text a server chose that cannot be scrubbed in place, such as a header's name, which
    /// HTTP lowercases. A plain search, for texts of at most
    /// [`MAX_RESPONSE_HEADER_NAME_BYTES`].
    pub fn found_in_any_case(&self, text: &str) -> bool {
        let folded = text.to_ascii_lowercase();
        let haystack = folded.as_bytes();
        self.parts
            .iter()
            .flat_map(|part| part.needles.iter())
            .filter(|needle| needle.rev.len() <= haystack.len())
            .any(|needle| {
                let wanted: Vec<u8> = needle
                    .rev
                    .iter()
                    .rev()
                    .map(u8::to_ascii_lowercase)
                    .collect();
                !wanted.is_empty() && haystack.windows(wanted.len()).any(|w| w == wanted)
            })
    }

    /// Adds the secrets of `redactor`.
    pub fn push(&mut self, redactor: std::sync::Arc<Redactor>) {
        if !redactor.is_empty() {
            self.parts.push(redactor);
        }
    }

    /// Whether there is anything to redact.
    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(|p| p.is_empty())
    }

    /// Replaces every occurrence of a secret of any part, in any encoding [`Redactor`]
    /// decodes, with [`REDACTED`]; overlapping finds of different parts become one marker.
    /// Every part is searched in the same single pass over `bytes`.
    pub fn redact(&self, bytes: Vec<u8>) -> Vec<u8> {
        if self.is_empty() || bytes.is_empty() {
            return bytes;
        }
        self.matcher().redact(bytes)
    }

    /// [`redact`](Self::redact) for text.
    pub fn redact_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        self.matcher().redact_str(text)
    }

    /// The secrets of every part, ready to search for (sorted once; see [`Matcher`]).
    fn matcher(&self) -> Matcher<'_> {
        Matcher::new(self.parts.iter().map(|p| p.needles.as_slice()))
    }
}

/// Most partial matches followed from one position of a body. A partial match is a stretch
/// that reads as the end of some secret; text rarely ends more than one or two secrets' ends at
/// once (secrets are random, and ends shared by several secrets count once), so this bound is
/// reached only when a secret repeats itself (`aaaa…`, `abab…`) and the body repeats it too.
/// The matcher then fails closed: it replaces everything the dropped partial matches could
/// still grow into (see [`Matcher::find`]) instead of following them, so a hostile body costs
/// at most this many steps per reading of a position, and nothing is missed.
const MAX_PARTIAL_MATCHES: usize = 32;

/// Longest stretch of a body one decoded character is read from: a `;`-less `&#x` reference
/// with [`MAX_ENTITY_BYTES`] digits (every other escape is shorter).
const MAX_READING_BYTES: usize = 3 + MAX_ENTITY_BYTES;

/// Positions of a body whose partial matches are kept while the matcher moves on: those a
/// reading can reach from the current position, and the current one.
const WINDOW: usize = MAX_READING_BYTES + 1;

/// Found ranges are merged when their list has grown to this many, and then whenever it has
/// doubled, so a body full of matches needs memory for its merged ranges only.
const MIN_RANGES_BEFORE_MERGING: usize = 1024;

/// Trie nodes of at most this many needles are stepped by a scan rather than binary searches
/// (faster for the few needles that share a deep node).
const MAX_LINEAR_STEP: usize = 8;

/// All secrets of a [`Redactor`] or [`RedactorSet`], searched for in one pass over a body.
///
/// The secrets (each reversed) are sorted once; secrets that end with the same `d` bytes then
/// lie next to each other, so a node of the trie of reversed secrets is a range of that list,
/// and one step down the trie is a binary search inside the range (a lookup table for the
/// first). The body is read from its end to its start. At each position `p`, every *reading*
/// of the bytes there — the byte itself, and where one starts, the one escape (`%XX`, `+`, a
/// JSON escape, an HTML reference, each `;`-less numeric prefix of one) — is followed from
/// where it ends: from the trie's root (a secret may end there) and from every partial match
/// that starts there, each one step per decoded byte. A partial match that reaches a secret's
/// first byte is a find `p..end`. Partial matches at one position that reached the same node
/// are one, keeping the farthest end, so their number is bounded by the trie's depths that
/// the text can end at once, and [`MAX_PARTIAL_MATCHES`] caps it.
///
/// The work is thus a bounded number of steps per byte of the body, whatever the number of
/// secrets; no position is read twice per secret, and no escape is decoded more than once.
struct Matcher<'a> {
    /// Every needle, sorted by its reversed bytes, without duplicates (a needle that is both a
    /// literal and a base64 form counts as base64: widened).
    patterns: Vec<Pattern<'a>>,
    /// The node for each last byte of a needle (the trie's first level).
    first: [Option<Node>; 256],
    /// The longest needle, in bytes.
    longest: usize,
}

/// One needle of a [`Matcher`], borrowed from its [`Redactor`].
#[derive(Clone, Copy)]
struct Pattern<'a> {
    rev: &'a [u8],
    base64: bool,
}

/// A node of the trie of reversed needles: the patterns `lo..hi`, which all end with the same
/// `depth` bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Node {
    lo: usize,
    hi: usize,
    depth: usize,
}

/// A stretch of the body that reads as the last `node.depth` bytes of some needles, from the
/// position it is kept for to `end`.
#[derive(Clone, Copy)]
struct Partial {
    node: Node,
    end: usize,
}

impl<'a> Matcher<'a> {
    fn new(parts: impl IntoIterator<Item = &'a [Needle]>) -> Self {
        let mut patterns: Vec<Pattern<'a>> = parts
            .into_iter()
            .flatten()
            .map(|n| Pattern {
                rev: &n.rev,
                base64: n.base64,
            })
            .collect();
        patterns.sort_unstable_by(|a, b| a.rev.cmp(b.rev));
        patterns.dedup_by(|later, kept| {
            let same = later.rev == kept.rev;
            kept.base64 |= same && later.base64;
            same
        });
        let longest = patterns.iter().map(|p| p.rev.len()).max().unwrap_or(0);
        let mut first = [None; 256];
        let mut lo = 0;
        while let Some(pattern) = patterns.get(lo) {
            let Some(&last) = pattern.rev.first() else {
                // Never: needles are at least MIN_REDACTED_BYTES long.
                lo += 1;
                continue;
            };
            let run = patterns.get(lo..).unwrap_or_default();
            let hi = lo + run.partition_point(|p| p.rev.first() == Some(&last));
            first[usize::from(last)] = Some(Node { lo, hi, depth: 1 });
            lo = hi;
        }
        Matcher {
            patterns,
            first,
            longest,
        }
    }

    fn redact(&self, bytes: Vec<u8>) -> Vec<u8> {
        let mut ranges = Vec::new();
        self.find(&bytes, &mut ranges);
        replace_ranges(bytes, ranges)
    }

    fn redact_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact(text.as_bytes().to_vec())).into_owned()
    }

    /// Records the byte range of every occurrence of every needle in `hay`, in any mix of
    /// encodings per character, widened for base64 forms; returns the number of trie steps
    /// taken (the work, which tests bound).
    fn find(&self, hay: &[u8], ranges: &mut Vec<(usize, usize)>) -> u64 {
        let mut steps = 0u64;
        if self.patterns.is_empty() {
            return steps;
        }
        // window[q % WINDOW]: the partial matches starting at q, for the WINDOW positions
        // after the current one that a reading can end at.
        let mut window: [Vec<Partial>; WINDOW] = std::array::from_fn(|_| Vec::new());
        let mut here: Vec<Partial> = Vec::new();
        let mut readings: Vec<Reading> = Vec::new();
        let mut merge_at = MIN_RANGES_BEFORE_MERGING;
        for p in (0..hay.len()).rev() {
            here.clear();
            // The farthest end of a partial match dropped at p, if any was.
            let mut dropped: Option<usize> = None;
            readings_at(hay, p, &mut readings);
            for reading in &readings {
                debug_assert!(reading.len <= MAX_READING_BYTES);
                let after = p + reading.len;
                // Partial matches of earlier readings may reach the same node; this reading's
                // cannot (distinct nodes stepped by the same bytes stay distinct).
                let earlier = here.len();
                let continued: &[Partial] = match window.get(after % WINDOW) {
                    Some(partials) if after < hay.len() => partials,
                    _ => &[],
                };
                let starts = std::iter::once(None).chain(continued.iter().map(Some));
                for from in starts {
                    steps += reading.count as u64;
                    let Some(node) = self.advance(from.map(|f| f.node), reading.decoded()) else {
                        continue;
                    };
                    let end = from.map_or(after, |f| f.end);
                    if let Some(base64) = self.ends_needle(node) {
                        push_range(ranges, widen(hay, p, end, base64));
                    }
                    if self.goes_on(node) {
                        keep(&mut here, earlier, Partial { node, end }, &mut dropped);
                    }
                }
            }
            if let Some(mut end) = dropped {
                // Fail closed: every partial match here is dropped, and everything one could
                // still grow into is replaced — up to its farthest end, and back over as many
                // bytes as the rest of the longest needle can be written in.
                end = here.iter().map(|h| h.end).fold(end, usize::max);
                here.clear();
                let from = p.saturating_sub(MAX_READING_BYTES.saturating_mul(self.longest));
                push_range(ranges, widen(hay, from, end, true));
            }
            if let Some(slot) = window.get_mut(p % WINDOW) {
                std::mem::swap(slot, &mut here);
            }
            if ranges.len() >= merge_at {
                merge_overlapping(ranges);
                // Leftmost last, where the next finds (further left) can join it.
                ranges.reverse();
                merge_at = ranges
                    .len()
                    .saturating_mul(2)
                    .max(MIN_RANGES_BEFORE_MERGING);
            }
        }
        steps
    }

    /// The node reached by reading `decoded` (last byte first) from `from`, or from the root.
    fn advance(&self, from: Option<Node>, decoded: &[u8]) -> Option<Node> {
        let mut bytes = decoded.iter().rev();
        let mut node = match from {
            Some(node) => node,
            None => self.first[usize::from(*bytes.next()?)]?,
        };
        for &b in bytes {
            node = self.step(node, b)?;
        }
        Some(node)
    }

    /// The child of `node` for the byte before the ones read so far.
    fn step(&self, node: Node, byte: u8) -> Option<Node> {
        let d = node.depth;
        let run = self.patterns.get(node.lo..node.hi)?;
        if let [only] = run {
            return (only.rev.get(d) == Some(&byte)).then_some(Node {
                depth: d + 1,
                ..node
            });
        }
        // A needle exactly `d` long sorts first (it is a prefix of the others); the rest are
        // sorted by their byte `d`, so those with `byte` there are one run.
        let (lo, hi) = if run.len() <= MAX_LINEAR_STEP {
            let mut found = run
                .iter()
                .enumerate()
                .filter(|(_, p)| p.rev.get(d) == Some(&byte))
                .map(|(i, _)| i);
            let lo = found.next()?;
            (lo, found.next_back().unwrap_or(lo) + 1)
        } else {
            let lo = run.partition_point(|p| p.rev.get(d).is_none_or(|&b| b < byte));
            let hi = run.partition_point(|p| p.rev.get(d).is_none_or(|&b| b <= byte));
            (lo, hi)
        };
        (lo < hi).then_some(Node {
            lo: node.lo + lo,
            hi: node.lo + hi,
            depth: d + 1,
        })
    }

    /// Whether a needle is exactly what `node` read, and if so whether it is a base64 form.
    fn ends_needle(&self, node: Node) -> Option<bool> {
        self.patterns
            .get(node.lo)
            .filter(|p| p.rev.len() == node.depth)
            .map(|p| p.base64)
    }

    /// Whether some needle is longer than what `node` read.
    fn goes_on(&self, node: Node) -> bool {
        node.hi.saturating_sub(node.lo) > 1
            || self
                .patterns
                .get(node.lo)
                .is_some_and(|p| p.rev.len() > node.depth)
    }
}

/// Adds `partial` to the partial matches of a position, as one with an equal one of an
/// earlier reading (`here[..earlier]`; the farther end is kept), or, with
/// [`MAX_PARTIAL_MATCHES`] there already, records it as dropped.
fn keep(here: &mut Vec<Partial>, earlier: usize, partial: Partial, dropped: &mut Option<usize>) {
    if let Some(same) = here
        .iter_mut()
        .take(earlier)
        .find(|h| h.node == partial.node)
    {
        same.end = same.end.max(partial.end);
    } else if here.len() < MAX_PARTIAL_MATCHES {
        here.push(partial);
    } else {
        *dropped = Some(dropped.map_or(partial.end, |d| d.max(partial.end)));
    }
}

/// `from..to`, widened for a base64 form over the up to two neighbouring characters that mix
/// the secret's edge bits with other bytes, and over its padding.
fn widen(hay: &[u8], mut from: usize, mut to: usize, base64: bool) -> (usize, usize) {
    if base64 {
        for _ in 0..2 {
            match from.checked_sub(1).and_then(|i| hay.get(i)) {
                Some(b) if is_base64_byte(*b) => from -= 1,
                _ => break,
            }
        }
        for _ in 0..2 {
            match hay.get(to) {
                Some(b) if is_base64_byte(*b) => to += 1,
                _ => break,
            }
        }
        while hay.get(to) == Some(&b'=') {
            to += 1;
        }
    }
    (from, to)
}

/// Adds a found range, as one with the last one if they overlap (finds come roughly from the
/// end of the body to its start, so most overlapping ones are neighbours in the list).
fn push_range(ranges: &mut Vec<(usize, usize)>, (from, to): (usize, usize)) {
    if let Some(last) = ranges.last_mut()
        && from < last.1
        && last.0 < to
    {
        *last = (last.0.min(from), last.1.max(to));
        return;
    }
    ranges.push((from, to));
}

/// Sorts `ranges` and makes overlapping ones one (ranges that only touch stay apart, as in
/// [`replace_ranges`]).
fn merge_overlapping(ranges: &mut Vec<(usize, usize)>) {
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for &(from, to) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if from < last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    *ranges = merged;
}

/// `bytes` with each of `ranges` (which may overlap) replaced by one [`REDACTED`].
fn replace_ranges(bytes: Vec<u8>, mut ranges: Vec<(usize, usize)>) -> Vec<u8> {
    if ranges.is_empty() {
        return bytes;
    }
    ranges.sort_unstable();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    for (start, end) in ranges {
        if end <= at {
            continue;
        }
        if start >= at {
            out.extend_from_slice(bytes.get(at..start).unwrap_or_default());
            out.extend_from_slice(REDACTED.as_bytes());
        }
        // An overlapping range only extends the one already replaced.
        at = end;
    }
    out.extend_from_slice(bytes.get(at..).unwrap_or_default());
    out
}

fn is_base64_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_')
}

/// The base64 and base64url characters of `secret` that depend on its bytes alone, at each of
/// the three alignments it can have inside a longer base64 text.
fn base64_cores(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut out = Vec::new();
    for pad in 0..3usize {
        let mut input = vec![0u8; pad];
        input.extend_from_slice(secret);
        // Characters 0..skip hold (some of) the dummy bytes; characters from
        // floor(total bits / 6) on hold bits of whatever follows.
        let skip = (pad * 8).div_ceil(6);
        let stop = input.len() * 8 / 6;
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = base64::Engine::encode(engine, &input);
            if let Some(core) = encoded.as_bytes().get(skip..stop)
                && !out.iter().any(|c: &Vec<u8>| c.as_slice() == core)
            {
                out.push(core.to_vec());
            }
        }
    }
    out
}

/// One way to read the body at a position: `len` bytes of it standing for the `count` bytes
/// of `decoded` (one byte, or one character's UTF-8).
#[derive(Clone, Copy)]
struct Reading {
    len: usize,
    decoded: [u8; 4],
    count: usize,
}

impl Reading {
    fn byte(len: usize, b: u8) -> Self {
        Reading {
            len,
            decoded: [b, 0, 0, 0],
            count: 1,
        }
    }

    fn char(len: usize, c: char) -> Self {
        let mut decoded = [0u8; 4];
        let count = c.encode_utf8(&mut decoded).len();
        Reading {
            len,
            decoded,
            count,
        }
    }

    fn decoded(&self) -> &[u8] {
        self.decoded.get(..self.count).unwrap_or_default()
    }
}

/// Every reading of `hay` at `p` (into `out`): the byte itself; a UTF-8 byte as `%XX` (either
/// case); `+` for a space; a JSON escape (`\"`, `\uXXXX` in either case, a surrogate pair); an
/// HTML character reference (named, decimal, hex, with or without `;`, and every shorter
/// `;`-less numeric one, whose digits may run into the text after it). Each is at most
/// [`MAX_READING_BYTES`] long.
fn readings_at(hay: &[u8], p: usize, out: &mut Vec<Reading>) {
    out.clear();
    let Some(rest) = hay.get(p..) else {
        return;
    };
    let Some(&first) = rest.first() else {
        return;
    };
    out.push(Reading::byte(1, first));
    match first {
        b'%' => {
            if let (Some(h), Some(l)) = (
                rest.get(1).and_then(hex_value),
                rest.get(2).and_then(hex_value),
            ) {
                out.push(Reading::byte(3, h * 16 + l));
            }
        }
        b'+' => out.push(Reading::byte(1, b' ')),
        b'\\' => {
            if let Some((c, used)) = json_escape(rest) {
                out.push(Reading::char(used, c));
            }
        }
        b'&' => html_readings(rest, out),
        _ => {}
    }
}

fn hex_value(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

fn hex4(s: &[u8]) -> Option<u32> {
    if s.len() < 4 {
        return None;
    }
    s.get(..4)?
        .iter()
        .try_fold(0u32, |acc, b| hex_value(b).map(|d| acc * 16 + u32::from(d)))
}

/// A JSON string escape at the start of `s` (which starts with `\`).
fn json_escape(s: &[u8]) -> Option<(char, usize)> {
    let c = match s.get(1)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let unit = hex4(s.get(2..)?)?;
            if (0xd800..0xdc00).contains(&unit) {
                // A high surrogate: only meaningful with the low one that follows.
                if s.get(6) == Some(&b'\\') && s.get(7) == Some(&b'u') {
                    let low = hex4(s.get(8..)?)?;
                    if (0xdc00..0xe000).contains(&low) {
                        let c = char::from_u32(0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00))?;
                        return Some((c, 12));
                    }
                }
                return None;
            }
            return Some((char::from_u32(unit)?, 6));
        }
        _ => return None,
    };
    Some((c, 2))
}

/// The readings of the HTML character reference at the start of `s` (which starts with `&`)
/// into `out`: a named one ([`HTML_ENTITIES`], with its `;`), or a numeric one with each
/// number of its digits (up to [`MAX_ENTITY_BYTES`]) that makes a character, and with its `;`
/// when that follows the digits within [`MAX_ENTITY_BYTES`].
fn html_readings(s: &[u8], out: &mut Vec<Reading>) {
    if s.get(1) != Some(&b'#') {
        let window = s.get(..s.len().min(MAX_ENTITY_BYTES)).unwrap_or_default();
        let Some(end) = window.iter().position(|&b| b == b';') else {
            return;
        };
        let Some(name) = window.get(1..end).and_then(|n| std::str::from_utf8(n).ok()) else {
            return;
        };
        if let Some((_, c)) = HTML_ENTITIES.iter().find(|(n, _)| *n == name) {
            out.push(Reading::char(end + 1, *c));
        }
        return;
    }
    let (radix, digits_at) = match s.get(2) {
        Some(b'x' | b'X') => (16, 3),
        _ => (10, 2),
    };
    let mut value: u32 = 0;
    for (i, b) in s.iter().skip(digits_at).take(MAX_ENTITY_BYTES).enumerate() {
        let Some(d) = (*b as char).to_digit(radix) else {
            break;
        };
        value = value.saturating_mul(radix).saturating_add(d);
        let Some(c) = char::from_u32(value) else {
            continue;
        };
        let used = digits_at + i + 1;
        out.push(Reading::char(used, c));
        if used < MAX_ENTITY_BYTES && s.get(used) == Some(&b';') {
            out.push(Reading::char(used + 1, c));
        }
    }
}

/// Response headers that describe the body's length or digest, and so would tell the guest how
/// long a redacted credential was (or let it test guesses against a hash): never forwarded as
/// the server sent them. The capability sets `Content-Length` itself, from what it hands over.
pub const LENGTH_REVEALING_HEADERS: &[&str] = &[
    "content-length",
    "content-range",
    "content-md5",
    "digest",
    "content-digest",
    "repr-digest",
    "x-content-length",
    "x-original-content-length",
];

/// The `Content-Length` of what the guest receives: its own length, whatever the server said.
pub fn set_content_length(headers: &mut Vec<(String, String)>, body: &[u8]) {
    headers.retain(|(name, _)| !name.eq_ignore_ascii_case("content-length"));
    headers.push(("content-length".into(), body.len().to_string()));
}

/// The response headers a guest gets: those `keep` accepts, with valid UTF-8 values of bounded
/// size, at most [`MAX_RESPONSE_HEADERS`], credentials redacted; when there are credentials to
/// redact, none of the [`LENGTH_REVEALING_HEADERS`] (the caller sets `Content-Length` from the
/// scrubbed body with [`set_content_length`]).
pub fn response_headers(
    headers: &reqwest::header::HeaderMap,
    keep: impl Fn(&str) -> bool,
    redactor: &RedactorSet,
) -> Vec<(String, String)> {
    // The secrets are sorted once for all the headers.
    let matcher = (!redactor.is_empty()).then(|| redactor.matcher());
    headers
        .iter()
        .filter(|(name, _)| keep(name.as_str()))
        // With credentials to scrub, the server's length and digest headers describe the body
        // before scrubbing.
        .filter(|(name, _)| {
            redactor.is_empty() || !LENGTH_REVEALING_HEADERS.contains(&name.as_str())
        })
        .filter_map(|(name, value)| {
            let value = value.to_str().ok()?;
            // A name holding a credential (an `x-keyfactor-*` header a server named after what
            // it was sent) cannot be scrubbed and stay a header: dropped, whatever the letter
            // case (HTTP lowercases names, so a credential is looked for folded too).
            let name_text = name.as_str();
            if name_text.len() > MAX_RESPONSE_HEADER_NAME_BYTES
                || matcher
                    .as_ref()
                    .is_some_and(|m| m.redact_str(name_text) != name_text)
                || redactor.found_in_any_case(name_text)
            {
                return None;
            }
            (value.len() <= MAX_RESPONSE_HEADER_VALUE_BYTES).then(|| {
                let value = match &matcher {
                    Some(matcher) => matcher.redact_str(value),
                    None => value.to_owned(),
                };
                (name.as_str().to_owned(), value)
            })
        })
        .take(MAX_RESPONSE_HEADERS)
        .collect()
}

/// TLS servers on a loopback port presenting certificates a client refuses, for the tests of
/// [`certificate_hint`] here and in the capabilities that name their settings with it.
#[cfg(test)]
pub(crate) mod refused_tls {
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    /// Serves TLS on 127.0.0.1 with `cert_pem` and `key_pem` until the task is aborted; every
    /// handshake is left to fail on the client's side. Returns the port and the task.
    pub(crate) async fn serve(cert_pem: &str, key_pem: &str) -> (u16, tokio::task::JoinHandle<()>) {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        (port, task)
    }

    /// A server certificate for 127.0.0.1 and localhost from a CA nobody trusts (no system
    /// store holds a CA made now): certificate and key, PEM.
    pub(crate) fn untrusted() -> (String, String) {
        let server = jobhook_testkit::tls::TestCa::new("untrusted test CA").server_cert(1);
        (server.cert_pem, server.key_pem)
    }

    /// A self-signed CA certificate for 127.0.0.1 and localhost, presented as the server's own:
    /// the `CaUsedAsEndEntity` of a CA certificate installed on a server.
    pub(crate) fn ca_as_server() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_TRUST: TrustSettings = TrustSettings {
        section: "[test]",
        ca_key: Some("ca_bundle"),
        name: "[test] url must name a host the certificate is issued for",
    };

    /// A URL quoted in a message keeps its scheme, host and path but never its user
    /// information, also when it is no URL the parser reads; one without any is unchanged.
    #[test]
    fn urls_in_messages_lose_their_user_information() {
        for (written, shown) in [
            ("https://u:p@idp/token", "https://…@idp/token"),
            ("https://user@idp", "https://…@idp"),
            ("http://a:b@c@host:8/x?y=@#z@", "http://…@host:8/x?y=@#z@"),
            ("https:\\\\u:p@idp/", "https:\\\\…@idp/"),
            ("https:u:p@idp/", "…@idp/"),
            ("u:p@idp", "…@idp"),
            ("not a url u:p@x", "…@x"),
            ("https://u:p@ idp/", "https://…@ idp/"),
        ] {
            let out = without_credentials(written);
            assert_eq!(out, shown, "{written}");
            assert!(matches!(out, std::borrow::Cow::Owned(_)), "{written}");
        }
        for kept in ["https://idp/a@b", "https://idp", "idp?x=@", ""] {
            assert!(
                matches!(without_credentials(kept), std::borrow::Cow::Borrowed(k) if k == kept),
                "{kept}"
            );
        }
        assert_eq!(without_credentials("@"), "…@");
    }

    /// `Retry-After` in seconds or as an HTTP date is read and capped; every other form a server
    /// may send — a sign, a fraction, blanks, digits past u64, a date that is none — gives no
    /// pause or the cap, never a panic.
    #[test]
    fn retry_after_is_whole_seconds_or_a_date_capped() {
        use std::time::{Duration, SystemTime};
        let cap = Duration::from_secs(60);
        // Wed, 21 Oct 2026 07:28:00 GMT
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_792_567_680);
        for (value, expected) in [
            ("30", Some(30)),
            (" 7 ", Some(7)),
            ("0", Some(0)),
            ("86400", Some(60)),
            ("99999999999999999999999", Some(60)),
            // The three forms of an HTTP date, 20 s from now.
            ("Wed, 21 Oct 2026 07:28:20 GMT", Some(20)),
            ("Wednesday, 21-Oct-26 07:28:20 GMT", Some(20)),
            ("Wed Oct 21 07:28:20 2026", Some(20)),
            // Past, far ahead, malformed.
            ("Wed, 21 Oct 2026 07:27:00 GMT", Some(0)),
            ("Thu, 01 Jan 2099 00:00:00 GMT", Some(60)),
            ("Wed, 32 Oct 2026 07:28:00 GMT", None),
            ("Wed, 21 Oct 2026 07:28:00 PST", None),
            ("-1", None),
            ("+5", None),
            ("1.5", None),
            ("", None),
            ("\u{661}", None),
        ] {
            assert_eq!(
                retry_after_at(value, cap, now),
                expected.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    /// A verdict that carries what the certificate held (webpki's own text, here 5,000
    /// bytes with a line break) is quoted escaped and cut, in a hint of bounded length.
    #[test]
    fn a_verdict_carrying_certificate_bytes_is_cut() {
        let long = format!("evil\n{}", "x".repeat(5_000));
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(std::sync::Arc::new(std::io::Error::other(long))),
        ));
        let hint = certificate_hint(&refused, &TEST_TRUST).expect("a certificate was refused");
        assert!(hint.len() < 600, "{} bytes: {hint}", hint.len());
        assert!(!hint.contains('\n'), "{hint}");
    }

    /// A refused server certificate is said in words, with the setting that fixes it, in the
    /// log line and in what the handler is told — which still holds no URL.
    #[tokio::test]
    async fn a_refused_certificate_names_the_setting_that_fixes_it() {
        let (cert, key) = refused_tls::untrusted();
        let (untrusted, task_a) = refused_tls::serve(&cert, &key).await;
        let (cert, key) = refused_tls::ca_as_server();
        let (ca_as_server, task_b) = refused_tls::serve(&cert, &key).await;
        let ca = jobhook_testkit::tls::TestCa::new("trusted test CA");
        let (cert, key) = {
            let s = ca.server_cert(2);
            (s.cert_pem, s.key_pem)
        };
        let (other_name, task_c) = refused_tls::serve(&cert, &key).await;
        let trusting = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).expect("CA"),
            )
            .resolve(
                "other.example",
                std::net::SocketAddr::from(([127, 0, 0, 1], other_name)),
            )
            .build()
            .expect("client");
        let plain = reqwest::Client::new();
        for (client, url, says, fix) in [
            (
                &plain,
                format!("https://127.0.0.1:{untrusted}/path?token=s3cret-t0ken"),
                "the server's TLS certificate is not issued by a certificate authority the engine trusts",
                "add the issuing CA to [test] ca_bundle",
            ),
            (
                &plain,
                format!("https://127.0.0.1:{ca_as_server}/path?token=s3cret-t0ken"),
                "the server's TLS certificate is a certificate authority's certificate, not a server certificate",
                "must say `CA:FALSE` in its basic constraints",
            ),
            (
                &trusting,
                format!("https://other.example:{other_name}/path?token=s3cret-t0ken"),
                "the server's TLS certificate is not issued for the host name the engine connected to",
                "[test] url must name a host",
            ),
        ] {
            let e = client.get(&url).send().await.expect_err("refused");
            let hint = certificate_hint(&e, &TEST_TRUST).expect("a certificate was refused");
            assert!(hint.contains(says) && hint.contains(fix), "{url}: {hint}");
            let told = match transport_error(&e, "the test API", &TEST_TRUST) {
                CapabilityError::Failed(told) => told,
                other => panic!("{url}: {other:?}"),
            };
            assert!(
                told.contains("cannot connect to the test API: ")
                    && told.contains(says)
                    && told.contains(fix),
                "{told}"
            );
            assert!(
                !told.contains("s3cret") && !told.contains("/path"),
                "{told}"
            );
            let kept = crate::log_capture::Captured::default();
            {
                let _guard = tracing::subscriber::set_default(kept.warnings());
                let limit = LogLimit::new(std::time::Duration::from_secs(600));
                log_failure(&limit, e, &"test.example", "test call failed", &TEST_TRUST);
            }
            let text = kept.text();
            assert!(
                text.contains(&format!("test call failed: {says}")) && text.contains(fix),
                "{text}"
            );
            assert!(
                !text.contains("s3cret") && !text.contains("/path"),
                "{text}"
            );
        }
        // A connection without a CA setting says there is none, and what is trusted instead.
        let none = TrustSettings {
            ca_key: None,
            ..TEST_TRUST
        };
        let e = plain
            .get(format!("https://127.0.0.1:{untrusted}/"))
            .send()
            .await
            .expect_err("refused");
        let hint = certificate_hint(&e, &none).expect("a certificate was refused");
        assert!(
            hint.contains("[test] has no CA setting") && hint.contains("system's trust store"),
            "{hint}"
        );
        // A failure that is not a certificate's gets no such hint.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        let e = plain
            .get(format!("https://127.0.0.1:{port}/"))
            .send()
            .await
            .expect_err("nothing listens there");
        assert_eq!(certificate_hint(&e, &TEST_TRUST), None);
        for task in [task_a, task_b, task_c] {
            task.abort();
        }
    }

    /// A cause carrying a server's text is escaped and cut to its limit before it is logged.
    #[test]
    fn a_causes_line_is_escaped_and_bounded() {
        let hostile = std::io::Error::other(format!("bad\x1b]0;owned\x07{}", "x".repeat(5000)));
        let line = cause_line(&hostile);
        assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line:?}");
        assert!(
            line.len() <= MAX_CAUSE_BYTES + crate::outcome::TRUNCATED_MARK.len(),
            "{}",
            line.len()
        );
        assert!(line.ends_with(crate::outcome::TRUNCATED_MARK), "{line}");
    }

    /// Failed calls are told at most once per interval, the line counting the untold, naming
    /// the destination as given and never the URL.
    #[tokio::test]
    async fn failed_calls_are_logged_once_per_interval_without_their_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        let kept = crate::log_capture::Captured::default();
        let _guard = tracing::subscriber::set_default(kept.warnings());
        let limit = LogLimit::new(std::time::Duration::from_secs(600));
        let client = reqwest::Client::new();
        for _ in 0..20 {
            let e = client
                .get(format!("http://127.0.0.1:{port}/path?token=s3cret-t0ken"))
                .send()
                .await
                .expect_err("nothing listens there");
            log_failure(
                &limit,
                e,
                &"receiver.example",
                "outbound HTTP call failed",
                &TEST_TRUST,
            );
        }
        let text = kept.text();
        assert_eq!(
            text.matches("outbound HTTP call failed").count(),
            1,
            "{text}"
        );
        assert!(text.contains("destination=receiver.example"), "{text}");
        assert!(
            !text.contains("s3cret") && !text.contains("/path"),
            "{text}"
        );
        assert_eq!(limit.due(), None, "the other 19 were counted as untold");
    }

    /// What the log says of a failed call names the cause under the client's own words, and
    /// never the URL (whose query may hold a token).
    #[tokio::test]
    async fn a_failed_calls_cause_is_named_without_its_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        let e = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/path?token=s3cret-t0ken"))
            .send()
            .await
            .expect_err("nothing listens there");
        let cause = failure_cause(e);
        assert!(cause.contains("Connection refused"), "{cause}");
        assert!(
            !cause.contains("s3cret") && !cause.contains("/path"),
            "{cause}"
        );
    }
    use jobhook_testkit::tokens::access_token;

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

    /// Every encoding of `secret` the redactor must see through, as a server would write it.
    fn encodings(secret: &str, pad: &[u8]) -> Vec<(String, String)> {
        use base64::Engine as _;
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let mut out = vec![
            ("raw".into(), secret.to_owned()),
            ("serde json".into(), {
                let quoted = serde_json::to_string(secret).unwrap();
                quoted[1..quoted.len() - 1].to_owned()
            }),
        ];
        for upper in [true, false] {
            let aspnet: String = secret
                .encode_utf16()
                .map(|u| {
                    let c = char::from_u32(u32::from(u));
                    match c {
                        Some(c)
                            if c.is_ascii()
                                && !"+<>&'\"\\`".contains(c)
                                && !c.is_ascii_control() =>
                        {
                            c.to_string()
                        }
                        _ if upper => format!("\\u{u:04X}"),
                        _ => format!("\\u{u:04x}"),
                    }
                })
                .collect();
            out.push((format!("asp.net json upper={upper}"), aspnet));
            let percent: String = secret
                .bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    b' ' if !upper => "+".into(),
                    _ if upper => format!("%{b:02X}"),
                    _ => format!("%{b:02x}"),
                })
                .collect();
            out.push((format!("percent upper={upper}"), percent));
        }
        let named: String = secret
            .chars()
            .map(|c| match c {
                '&' => "&amp;".into(),
                '<' => "&lt;".into(),
                '>' => "&gt;".into(),
                '"' => "&quot;".into(),
                '\'' => "&#39;".into(),
                c if !c.is_ascii() => format!("&#{};", c as u32),
                c => c.to_string(),
            })
            .collect();
        out.push(("html named".into(), named));
        out.push((
            "html decimal".into(),
            secret.chars().map(|c| format!("&#{};", c as u32)).collect(),
        ));
        out.push((
            "html hex".into(),
            secret
                .chars()
                .map(|c| format!("&#x{:X};", c as u32))
                .collect(),
        ));
        out.push((
            "html hex lower, no ;".into(),
            secret
                .chars()
                .map(|c| format!("&#x{:x}", c as u32))
                .collect(),
        ));
        let mut padded = pad.to_vec();
        padded.extend_from_slice(secret.as_bytes());
        for (name, engine) in [
            ("base64", &STANDARD),
            ("base64 no pad", &STANDARD_NO_PAD),
            ("base64url", &URL_SAFE),
            ("base64url no pad", &URL_SAFE_NO_PAD),
        ] {
            out.push((
                format!("{name} after {} bytes", pad.len()),
                engine.encode(&padded),
            ));
        }
        out
    }

    /// What must not be in a scrubbed body: the secret in each encoding, and each base64
    /// alignment's characters that depend on the secret alone.
    fn forbidden(secret: &str) -> Vec<String> {
        let mut out: Vec<String> = encodings(secret, &[])
            .into_iter()
            .filter(|(name, _)| !name.starts_with("base64"))
            .map(|(_, e)| e)
            .collect();
        out.extend(
            base64_cores(secret.as_bytes())
                .into_iter()
                .map(|c| String::from_utf8(c).unwrap()),
        );
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// For any credential and any encoding a Windows/IIS/.NET server uses, what the handler
        /// receives never contains the credential in any of those encodings, and the marker
        /// replaces it.
        #[test]
        fn no_encoding_of_a_credential_survives(
            secret in "[a-zA-Z0-9+/=&<>'\"\\\\% :é€😀]{4,24}",
            before in "[a-z {}\":,]{0,16}",
            after in "[a-z {}\":,]{0,16}",
            pad in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3),
            which in 0usize..64,
        ) {
            let mut r = Redactor::new();
            r.add(&secret);
            let all = encodings(&secret, &pad);
            let (name, encoded) = &all[which % all.len()];
            let body = format!("{before}{encoded}{after}");
            let out = String::from_utf8_lossy(&r.redact(body.clone().into_bytes())).into_owned();
            for f in forbidden(&secret) {
                proptest::prop_assert!(!out.contains(&f), "{name}: {f:?} survives in {out:?} (from {body:?})");
            }
            proptest::prop_assert!(out.contains(REDACTED), "{name}: {out:?}");
        }

        /// A credential split across JSON escapes (some characters escaped, some not) is found.
        #[test]
        fn credentials_split_across_json_escapes_are_found(
            secret in "[a-zA-Z0-9+/=&<>'\"%é]{4,24}",
            escape in proptest::collection::vec(proptest::prelude::any::<bool>(), 24),
        ) {
            let mut r = Redactor::new();
            r.add(&secret);
            let mixed: String = secret
                .chars()
                .zip(escape.iter().cycle())
                .map(|(c, e)| if *e || c == '"' { format!("\\u{:04x}", c as u32) } else { c.to_string() })
                .collect();
            let body = format!("{{\"echo\":\"{mixed}\"}}");
            let out = String::from_utf8(r.redact(body.into_bytes())).unwrap();
            proptest::prop_assert_eq!(out, "{\"echo\":\"[redacted]\"}");
        }

        /// Redaction never panics on hostile bytes, and leaves text without a secret alone.
        #[test]
        fn redaction_of_arbitrary_bytes_is_total(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut r = Redactor::new();
            r.add("S3cr3t+Pa55/word");
            let out = r.redact(body.clone());
            if !out.windows(REDACTED.len()).any(|w| w == REDACTED.as_bytes()) {
                proptest::prop_assert_eq!(out, body);
            }
        }
    }

    #[test]
    fn redaction_sees_through_each_encoding() {
        let mut r = Redactor::new();
        r.add("p+ss<w>rd&'é");
        for (body, expected) in [
            (
                r#"{"p":"p\u002Bss\u003Cw\u003Erd\u0026\u0027\u00E9"}"#,
                r#"{"p":"[redacted]"}"#,
            ),
            (
                r#"{"p":"p\u002bss\u003cw\u003erd\u0026\u0027\u00e9"}"#,
                r#"{"p":"[redacted]"}"#,
            ),
            (
                "<td>p+ss&lt;w&gt;rd&amp;&#39;&#233;</td>",
                "<td>[redacted]</td>",
            ),
            (
                "<td>&#x70;&#X2b;ss&lt;w&gt;rd&amp;&#x27;&#xE9;</td>",
                "<td>[redacted]</td>",
            ),
            ("q=p%2Bss%3Cw%3Erd%26%27%C3%A9&x=1", "q=[redacted]&x=1"),
            ("q=p%2bss%3cw%3erd%26%27%c3%a9&x=1", "q=[redacted]&x=1"),
        ] {
            assert_eq!(r.redact_str(body), expected, "{body}");
        }
        let mut r = Redactor::new();
        r.add("pass word");
        assert_eq!(r.redact_str("a=pass+word&b"), "a=[redacted]&b");
        // base64 at each alignment inside a longer base64 text, with and without padding.
        let mut r = Redactor::new();
        r.add("hunter2-secret");
        use base64::Engine as _;
        for prefix in ["", "u:", "us:"] {
            for engine in [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                let b = engine.encode(format!("{prefix}hunter2-secret"));
                let out = r.redact_str(&format!("x {b} y"));
                for core in base64_cores(b"hunter2-secret") {
                    assert!(!out.contains(std::str::from_utf8(&core).unwrap()), "{out}");
                }
                assert!(out.contains(REDACTED), "{out}");
            }
        }
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

    /// The matcher before it searched every secret in one pass: one needle at a time, from
    /// every position, each character followed through every encoding. Slow (a pass per needle
    /// per position), but plainly what [`Redactor`] promises; kept as the property tests'
    /// reference.
    mod reference {
        use super::super::{
            HTML_ENTITIES, MAX_ENTITY_BYTES, hex_value, is_base64_byte, json_escape,
        };

        /// Every range the reference finds for the needle `text` (`base64`: widened).
        pub fn find(text: &str, base64: bool, hay: &[u8], ranges: &mut Vec<(usize, usize)>) {
            let chars: Vec<char> = text.chars().collect();
            for start in 0..hay.len() {
                let Some(mut end) = match_at(hay, start, &chars) else {
                    continue;
                };
                let mut from = start;
                if base64 {
                    for _ in 0..2 {
                        match from.checked_sub(1).and_then(|i| hay.get(i)) {
                            Some(b) if is_base64_byte(*b) => from -= 1,
                            _ => break,
                        }
                    }
                    for _ in 0..2 {
                        match hay.get(end) {
                            Some(b) if is_base64_byte(*b) => end += 1,
                            _ => break,
                        }
                    }
                    while hay.get(end) == Some(&b'=') {
                        end += 1;
                    }
                }
                ranges.push((from, end));
            }
        }

        fn match_at(hay: &[u8], start: usize, chars: &[char]) -> Option<usize> {
            let mut frontier = vec![start];
            for &c in chars {
                let mut next = Vec::new();
                for &p in &frontier {
                    for end in char_ends(hay, p, c) {
                        if !next.contains(&end) {
                            next.push(end);
                        }
                    }
                }
                if next.is_empty() {
                    return None;
                }
                frontier = next;
            }
            frontier.into_iter().max()
        }

        fn char_ends(hay: &[u8], p: usize, c: char) -> Vec<usize> {
            let mut out = Vec::new();
            let Some(rest) = hay.get(p..) else {
                return out;
            };
            let mut buf = [0u8; 4];
            let utf8 = c.encode_utf8(&mut buf).as_bytes();
            if rest.starts_with(utf8) {
                out.push(p + utf8.len());
            }
            match rest.first() {
                Some(b'\\') => {
                    if let Some((d, used)) = json_escape(rest)
                        && d == c
                    {
                        out.push(p + used);
                    }
                }
                Some(b'&') => {
                    if let Some((d, used)) = html_reference(rest)
                        && d == c
                    {
                        out.push(p + used);
                    }
                    out.extend(numeric_prefixes(rest, c).into_iter().map(|u| p + u));
                }
                Some(b'+') if c == ' ' => out.push(p + 1),
                _ => {}
            }
            let mut q = 0;
            let mut escaped = false;
            for &b in utf8 {
                match (
                    rest.get(q),
                    rest.get(q + 1).and_then(hex_value),
                    rest.get(q + 2).and_then(hex_value),
                ) {
                    (Some(b'%'), Some(h), Some(l)) if h * 16 + l == b => {
                        q += 3;
                        escaped = true;
                    }
                    (Some(&x), _, _) if x == b => q += 1,
                    _ => return out,
                }
            }
            if escaped {
                out.push(p + q);
            }
            out
        }

        fn html_reference(s: &[u8]) -> Option<(char, usize)> {
            let window = s.get(..s.len().min(MAX_ENTITY_BYTES))?;
            if window.get(1) == Some(&b'#') {
                let (hex, digits_at) = match window.get(2) {
                    Some(b'x' | b'X') => (true, 3),
                    _ => (false, 2),
                };
                let digits = window
                    .get(digits_at..)?
                    .iter()
                    .take_while(|b| {
                        if hex {
                            b.is_ascii_hexdigit()
                        } else {
                            b.is_ascii_digit()
                        }
                    })
                    .count();
                if digits == 0 {
                    return None;
                }
                let text = std::str::from_utf8(window.get(digits_at..digits_at + digits)?).ok()?;
                let value = u32::from_str_radix(text, if hex { 16 } else { 10 }).ok()?;
                let c = char::from_u32(value)?;
                let mut used = digits_at + digits;
                if window.get(used) == Some(&b';') {
                    used += 1;
                }
                return Some((c, used));
            }
            let end = window.iter().position(|&b| b == b';')?;
            let name = std::str::from_utf8(window.get(1..end)?).ok()?;
            let (_, c) = HTML_ENTITIES.iter().find(|(n, _)| *n == name)?;
            Some((*c, end + 1))
        }

        fn numeric_prefixes(s: &[u8], c: char) -> Vec<usize> {
            let mut out = Vec::new();
            if s.get(1) != Some(&b'#') {
                return out;
            }
            let (radix, digits_at) = match s.get(2) {
                Some(b'x' | b'X') => (16, 3),
                _ => (10, 2),
            };
            let mut value: u32 = 0;
            for (i, b) in s.iter().skip(digits_at).take(MAX_ENTITY_BYTES).enumerate() {
                let Some(d) = (*b as char).to_digit(radix) else {
                    break;
                };
                value = value.saturating_mul(radix).saturating_add(d);
                if char::from_u32(value) == Some(c) {
                    out.push(digits_at + i + 1);
                }
            }
            out
        }
    }

    /// Which bytes of `hay` the ranges cover.
    fn covered(ranges: &[(usize, usize)], len: usize) -> Vec<bool> {
        let mut out = vec![false; len];
        for &(from, to) in ranges {
            for c in out.iter_mut().take(to).skip(from) {
                *c = true;
            }
        }
        out
    }

    /// A body made of `pieces` with the secrets between them, each character written as
    /// `styles` says: literally, `\uXXXX`, `&#NN;`, `&#xNN` (no `;`), `%XX` per byte, or `+`.
    fn mixed_body(secrets: &[String], pieces: &[String], styles: &[u8]) -> String {
        let mut body = String::new();
        let mut style = styles.iter().copied().cycle().chain(std::iter::repeat(0));
        for (piece, secret) in pieces.iter().zip(secrets.iter().cycle()) {
            body.push_str(piece);
            for c in secret.chars() {
                match style.next().unwrap_or(0) {
                    1 => body.push_str(&format!("\\u{:04x}", c as u32)),
                    2 => body.push_str(&format!("&#{};", c as u32)),
                    3 => body.push_str(&format!("&#x{:X}", c as u32)),
                    4 => {
                        for b in c.to_string().bytes() {
                            body.push_str(&format!("%{b:02X}"));
                        }
                    }
                    5 if c == ' ' => body.push('+'),
                    _ => body.push(c),
                }
            }
        }
        body
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// The one-pass matcher covers every byte the reference (one needle at a time, every
        /// start, every encoding of every character) covers, for bodies full of escapes, with
        /// several secrets at once, repetitive ones among them (whose partial matches exceed
        /// MAX_PARTIAL_MATCHES and are then replaced wholesale).
        #[test]
        fn one_pass_finds_all_the_reference_finds(
            secrets in proptest::collection::vec(
                "[a-c+/=&<>'\"\\\\%;#0-9xuA-F é€😀]{4,10}|a{30,50}|(ab){18,25}|(a%41){9,15}", 1..4),
            pieces in proptest::collection::vec(proptest::prop_oneof![
                "[a-c+/=&<>'\"\\\\%;#0-9xuA-F é]{0,6}",
                proptest::prelude::Just("%25".to_owned()),
                proptest::prelude::Just("&#".to_owned()),
                proptest::prelude::Just("\\u00".to_owned()),
                proptest::prelude::Just("&amp;".to_owned()),
                "a{0,90}",
                "(ab){0,40}",
            ], 0..12),
            styles in proptest::collection::vec(0u8..8, 1..40),
        ) {
            let mut set = RedactorSet::new();
            for s in &secrets {
                let mut r = Redactor::new();
                r.add(s);
                set.push(std::sync::Arc::new(r));
            }
            let body = mixed_body(&secrets, &pieces, &styles);
            let hay = body.as_bytes();
            let mut expected = Vec::new();
            for part in &set.parts {
                for needle in &part.needles {
                    let mut bytes = needle.rev.clone();
                    bytes.reverse();
                    let text = String::from_utf8(bytes).unwrap();
                    reference::find(&text, needle.base64, hay, &mut expected);
                }
            }
            let mut found = Vec::new();
            set.matcher().find(hay, &mut found);
            let (expected, found) = (covered(&expected, hay.len()), covered(&found, hay.len()));
            for (i, (e, f)) in expected.iter().zip(&found).enumerate() {
                proptest::prop_assert!(!e || *f, "byte {i} of {body:?} is missed ({secrets:?})");
            }
        }

        /// Whatever the body, the matcher's work is bounded per byte: each reading of a
        /// position is followed from the root and from at most MAX_PARTIAL_MATCHES partial
        /// matches, a step per decoded byte.
        #[test]
        fn work_is_bounded_per_byte_for_any_body(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            secret in "[a%&#;0-9\\\\u]{4,40}",
        ) {
            let mut r = Redactor::new();
            r.add(&secret);
            let mut ranges = Vec::new();
            let steps = Matcher::new([r.needles.as_slice()]).find(&body, &mut ranges);
            // At most 1 + 2 × MAX_ENTITY_BYTES readings of a position, each up to 4 bytes.
            let per_byte = (1 + 2 * MAX_ENTITY_BYTES as u64) * (MAX_PARTIAL_MATCHES as u64 + 1) * 4;
            proptest::prop_assert!(steps <= per_byte * body.len() as u64);
        }
    }

    /// The Keyfactor client's set: a Basic credential's forms and `tokens` access tokens'.
    fn keyfactor_like_set(tokens: u64) -> RedactorSet {
        use base64::Engine as _;
        let pair = r"KFTRAIN\svc:S3cr3t+Pa55/word";
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut basic = Redactor::new();
        basic.add(&format!("Basic {encoded}"));
        basic.add(&encoded);
        basic.add("S3cr3t+Pa55/word");
        basic.add(pair);
        let mut set = RedactorSet::new();
        set.push(std::sync::Arc::new(basic));
        for n in 0..tokens {
            let token = access_token(n);
            let mut r = Redactor::new();
            r.add(&format!("Bearer {token}"));
            r.add(&token);
            set.push(std::sync::Arc::new(r));
        }
        set
    }

    /// A credential a server echoes into a header's name drops the header; one in a value is
    /// scrubbed there.
    #[test]
    fn a_credential_in_a_response_headers_name_drops_the_header() {
        let mut r = Redactor::new();
        r.add("tok3nvalue");
        r.add("MiXeD-CaSe-Pa55");
        let mut set = RedactorSet::new();
        set.push(std::sync::Arc::new(r));
        let mut headers = reqwest::header::HeaderMap::new();
        let long = format!("x-keyfactor-{}", "a".repeat(MAX_RESPONSE_HEADER_NAME_BYTES));
        for (name, value) in [
            ("x-keyfactor-tok3nvalue", "1"),
            ("x-keyfactor-echo", "Bearer tok3nvalue"),
            // HTTP lowercases the name: the password is still in it.
            ("x-keyfactor-mixed-case-pa55", "3"),
            (long.as_str(), "4"),
            ("x-keyfactor-plain", "2"),
        ] {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                reqwest::header::HeaderValue::from_static(value),
            );
        }
        let kept = response_headers(&headers, |_| true, &set);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-keyfactor-echo", "x-keyfactor-plain"], "{kept:?}");
        assert_eq!(kept[0].1, format!("Bearer {REDACTED}"));
    }

    /// The audit's hostile bodies (a server that answers what it likes, or echoes what a handler
    /// sends): the work per byte stays a small constant, the same with 256 remembered tokens as
    /// with one password. (The matcher before made a pass per needle: over 2 000 of them here.)
    #[test]
    fn work_per_byte_does_not_grow_with_the_number_of_credentials() {
        const LEN: usize = 64 * 1024;
        /// Steps per body byte allowed; measured at most 4.5 (the `&#…` body).
        const MAX_STEPS_PER_BYTE: u64 = 8;
        let token = access_token(7);
        let fillers: Vec<(&str, Vec<u8>)> =
            vec![
            ("percent", b"%".to_vec()),
            ("percent-25", b"%25".to_vec()),
            ("numeric references", b"&#1111111111".to_vec()),
            ("json escapes", br"\u0041\u00".to_vec()),
            (
                "json",
                br#"{"Id":12345,"Thumbprint":"A1B2C3D4E5F6","IssuedDN":"CN=web01.example.com"},"#
                    .to_vec(),
            ),
            // Every token's shared beginning, over and over.
            ("token prefixes", format!("Bearer {} ", token.get(..120).unwrap()).into_bytes()),
            ("echoed tokens", format!("Bearer {token} ").into_bytes()),
        ];
        let few = keyfactor_like_set(0);
        let many = keyfactor_like_set(256);
        let needles: usize = many.parts.iter().map(|p| p.needles.len()).sum();
        assert!(needles > 2000, "{needles}");
        for (name, unit) in &fillers {
            let body: Vec<u8> = unit.iter().copied().cycle().take(LEN).collect();
            let mut ranges = Vec::new();
            let steps_few = few.matcher().find(&body, &mut ranges);
            let steps_many = many.matcher().find(&body, &mut ranges);
            for (set, steps) in [("Basic", steps_few), ("Basic + 256 tokens", steps_many)] {
                assert!(
                    steps <= MAX_STEPS_PER_BYTE * LEN as u64,
                    "{name}, {set}: {steps} steps for {LEN} bytes"
                );
            }
        }
    }

    /// A secret that repeats itself, in a body that repeats it too, has more partial matches
    /// than are followed: the matcher fails closed (replaces all they could grow into), within
    /// the same bounded work.
    #[test]
    fn too_many_partial_matches_fail_closed() {
        let password = "a".repeat(2 * MAX_PARTIAL_MATCHES);
        let mut r = Redactor::new();
        r.add(&password);
        let longest = r.needles.iter().map(|n| n.rev.len()).max().unwrap();
        let before = "x".repeat(2 * MAX_READING_BYTES * longest);
        let body = format!("{before}\"{}\",\"y\":\"kept\"", "a".repeat(10_000));
        let mut ranges = Vec::new();
        let steps = Matcher::new([r.needles.as_slice()]).find(body.as_bytes(), &mut ranges);
        assert!(steps <= (MAX_PARTIAL_MATCHES as u64 + 1) * body.len() as u64);
        let out = r.redact_str(&body);
        assert!(!out.contains(&password) && out.contains(REDACTED), "{out}");
        // Replaced: the repetition, and at most as much before it as the rest of the longest
        // needle could be written in.
        let kept = before.len() - MAX_READING_BYTES * longest - 2;
        assert!(out.starts_with(&before[..kept]), "{out}");
        assert!(out.ends_with("[redacted]\",\"y\":\"kept\""), "{out}");
        // Shorter than the bound, a repetitive secret is followed exactly.
        let mut r = Redactor::new();
        r.add(&"a".repeat(8));
        assert_eq!(
            r.redact_str("xaaaaaaay aaaaaaaaaaaa z"),
            "xaaaaaaay [redacted] z"
        );
    }
}
