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
    bytes: Vec<u8>,
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

    /// Adds a secret: it is then found as it is, in every escaping the views decode, and as
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

    fn push(&mut self, bytes: Vec<u8>, base64: bool) {
        if bytes.len() < MIN_REDACTED_BYTES {
            return;
        }
        let needle = Needle { bytes, base64 };
        if !self.needles.contains(&needle) {
            self.needles.push(needle);
        }
    }

    /// Whether there is anything to redact.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Replaces every occurrence of every secret in `bytes`, in any encoding the views decode,
    /// with [`REDACTED`].
    pub fn redact(&self, bytes: Vec<u8>) -> Vec<u8> {
        if self.needles.is_empty() || bytes.is_empty() {
            return bytes;
        }
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        self.find_all(&bytes, &mut ranges);
        replace_ranges(bytes, ranges)
    }

    /// Records the byte range of every occurrence of every secret in `bytes`.
    fn find_all(&self, bytes: &[u8], ranges: &mut Vec<(usize, usize)>) {
        for needle in &self.needles {
            needle.find_all(bytes, ranges);
        }
    }

    /// [`redact`](Self::redact) for text.
    pub fn redact_str(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_owned();
        }
        String::from_utf8_lossy(&self.redact(text.as_bytes().to_vec())).into_owned()
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
    pub fn redact(&self, bytes: Vec<u8>) -> Vec<u8> {
        if self.is_empty() || bytes.is_empty() {
            return bytes;
        }
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for part in &self.parts {
            part.find_all(&bytes, &mut ranges);
        }
        replace_ranges(bytes, ranges)
    }

    /// [`redact`](Self::redact) for text.
    pub fn redact_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        String::from_utf8_lossy(&self.redact(text.as_bytes().to_vec())).into_owned()
    }
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

impl Needle {
    /// Records the byte range of every occurrence of the needle in `hay`, in any mix of
    /// encodings per character ([`char_ends`]), widened for base64 forms.
    fn find_all(&self, hay: &[u8], ranges: &mut Vec<(usize, usize)>) {
        let Ok(text) = std::str::from_utf8(&self.bytes) else {
            return;
        };
        let chars: Vec<char> = text.chars().collect();
        let Some(&first) = chars.first() else {
            return;
        };
        let mut first_utf8 = [0u8; 4];
        let first_byte = first.encode_utf8(&mut first_utf8).as_bytes()[0];
        let mut start = 0;
        while start < hay.len() {
            let b = hay.get(start).copied().unwrap_or_default();
            let may_start =
                b == first_byte || matches!(b, b'\\' | b'&' | b'%') || (b == b'+' && first == ' ');
            let end = if may_start {
                match_at(hay, start, &chars)
            } else {
                None
            };
            let Some(mut end) = end else {
                start += 1;
                continue;
            };
            let mut from = start;
            if self.base64 {
                // Widen over the characters that mix the secret's edge bits with others.
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
            start = end.max(start + 1);
        }
    }
}

/// Most positions a partial match is followed from at once: each character has at most a few
/// encodings, so the set stays tiny; the cap bounds hostile input.
const MAX_MATCH_FRONTIER: usize = 16;

/// Where a match of `chars` starting at `start` in `hay` ends (the longest), if there is one.
/// Every character may be written literally or in any encoding [`char_ends`] knows,
/// independently of its neighbours.
fn match_at(hay: &[u8], start: usize, chars: &[char]) -> Option<usize> {
    let mut frontier = vec![start];
    for &c in chars {
        let mut next = Vec::new();
        for &p in &frontier {
            for end in char_ends(hay, p, c) {
                if !next.contains(&end) && next.len() < MAX_MATCH_FRONTIER {
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

/// Every position where character `c`, written at `p` in `hay`, can end: literally, as a JSON
/// escape (`\"`, `\uXXXX` in either case, a surrogate pair), an HTML character reference
/// (named, decimal, hex), percent-encoded (each UTF-8 byte `%XX` in either case or literal),
/// or, for a space, `+`.
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
            // Without a `;`, a numeric reference's digits may run into the text after it:
            // every shorter digit run is a reading too.
            out.extend(
                numeric_reference_prefixes(rest, c)
                    .into_iter()
                    .map(|u| p + u),
            );
        }
        Some(b'+') if c == ' ' => out.push(p + 1),
        _ => {}
    }
    // Percent-encoded: every byte literal or %XX, at least one %XX.
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

/// An HTML character reference at the start of `s` (which starts with `&`).
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

/// The lengths of the `;`-less numeric references at the start of `s` (`&#NN`, `&#xNN`) that
/// decode to `c` using fewer digits than are there.
fn numeric_reference_prefixes(s: &[u8], c: char) -> Vec<usize> {
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
}
