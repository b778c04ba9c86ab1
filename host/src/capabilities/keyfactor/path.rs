//! Guest paths and queries against the Keyfactor API base: checked, normalized and resolved so
//! that a request can only ever land *under* the configured base.
//!
//! A guest writes a path relative to the base, like a .NET handler does with the `HttpClient`
//! Keyfactor hands it (`client.GetAsync("OrchestratorJobs/JobHistory")`). The checks, in order:
//!
//! - not empty, at most [`MAX_PATH_BYTES`];
//! - not a URL: no scheme (`https:`, `javascript:`; RFC 3986 forbids `:` in the first segment
//!   of a relative path anyway), not scheme-relative (`//host/...`);
//! - only printable ASCII: no control characters (CR/LF), no backslash (IIS treats `\` as `/`),
//!   no `?`/`#` (the query is a separate list; a fragment means nothing to an API);
//! - every `%` starts a valid escape; segments are decoded and the *decoded* segment must not be
//!   empty, `.`/`..` or dots and spaces only (IIS trims trailing dots and spaces), and must not
//!   contain `/`, `\`, `%` (double encoding), `?`, `#` or anything outside printable ASCII;
//! - one leading `/` is tolerated and a trailing `/` is kept.
//!
//! The decoded segments are then re-encoded by the engine (everything but RFC 3986 unreserved
//! characters is percent-encoded), appended to the base path, and the result is checked once
//! more: same origin as the base, path under the base path.
//!
//! Base URL semantics: the base is a directory. `https://host/KeyfactorAPI/` (with the trailing
//! slash Keyfactor's own `HttpClient.BaseAddress` has) and `https://host/KeyfactorAPI` mean the
//! same thing here, and `Certificates/14` resolves to `https://host/KeyfactorAPI/Certificates/14`
//! with either. (.NET's `HttpClient` would silently drop `KeyfactorAPI` for the second form;
//! jobhook does not copy that trap.)

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use url::Url;

/// Longest path a guest may send. Keyfactor paths are short (`CertificateStores/{guid}/...`);
/// 2 KiB is generous and keeps URLs under every server's request-line limit.
pub const MAX_PATH_BYTES: usize = 2048;

/// Query parameters per request. Keyfactor's paging and query parameters are a handful.
pub const MAX_QUERY_PARAMS: usize = 64;

/// Bytes of all query names and values together, before encoding. A `pq.queryString` with a
/// dozen clauses is under 1 KiB; 8 KiB stays under IIS's default query-string limit (16 KiB)
/// even after percent-encoding has grown it.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// Characters left as they are when encoding a path segment or a query part: RFC 3986
/// unreserved (`A-Z a-z 0-9 - . _ ~`). Everything else is percent-encoded, so no character of
/// the guest's can mean anything to a server's URL parser.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a path or query was refused. The messages are what the guest is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Empty path.
    #[error("the path is empty; name an API path such as `OrchestratorJobs/JobHistory`")]
    Empty,
    /// Too long.
    #[error("the path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    /// An absolute URL (has a scheme).
    #[error(
        "the path looks like an absolute URL; give a path relative to the Keyfactor API base, such as `Certificates/14`"
    )]
    Absolute,
    /// `//host/...`.
    #[error("the path starts with `//` (a scheme-relative URL naming another host)")]
    SchemeRelative,
    /// A character that is never allowed in the raw path.
    #[error("the path contains {0}, which is not allowed in a Keyfactor API path")]
    BadCharacter(&'static str),
    /// A `%` not followed by two hex digits.
    #[error("the path contains a `%` that does not start a valid percent-escape")]
    BadEscape,
    /// An empty segment (`a//b`).
    #[error("the path contains an empty segment (`//`)")]
    EmptySegment,
    /// `.`, `..` or dots and spaces only, plain or encoded.
    #[error(
        "the path contains a segment of only dots and spaces (`.`, `..`, `. `, ` `; plain or percent-encoded), which IIS reads as `.`, `..` or an empty segment; traversal is not allowed"
    )]
    DotSegment,
    /// A decoded segment with a forbidden character (encoded `/`, `\`, `%`, ...).
    #[error("the path contains {0} in percent-encoded form, which is not allowed")]
    BadEncoded(&'static str),
    /// The query is unusable.
    #[error("{0}")]
    Query(String),
    /// The resolved URL left the base (a bug, refused all the same).
    #[error("the request would leave the Keyfactor API base; refused")]
    OutsideBase,
}

/// A checked path relative to the API base: decoded segments, ASCII, no traversal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPath {
    segments: Vec<String>,
    trailing_slash: bool,
}

impl ApiPath {
    /// Checks and normalizes a guest path (see the module documentation for the rules).
    pub fn parse(raw: &str) -> Result<ApiPath, PathError> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong);
        }
        if raw.starts_with("//") || raw.starts_with("\\\\") || raw.starts_with("/\\") {
            return Err(PathError::SchemeRelative);
        }
        if has_scheme(raw) {
            return Err(PathError::Absolute);
        }
        for c in raw.chars() {
            let what = match c {
                '\\' => "a backslash",
                '?' => "`?` (pass query parameters in the request's query list)",
                '#' => "`#` (a fragment)",
                c if c.is_ascii_control() => "a control character (CR, LF, TAB, NUL, ...)",
                c if !c.is_ascii() => {
                    "a non-ASCII character (percent-encode it, or use an ASCII id)"
                }
                _ => continue,
            };
            return Err(PathError::BadCharacter(what));
        }
        let rest = raw.strip_prefix('/').unwrap_or(raw);
        if rest.is_empty() {
            return Err(PathError::Empty);
        }
        let (rest, trailing_slash) = match rest.strip_suffix('/') {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let mut segments = Vec::new();
        for raw_segment in rest.split('/') {
            segments.push(decode_segment(raw_segment)?);
        }
        if let Some(first) = segments.first()
            && first.contains(':')
        {
            // RFC 3986 §4.2: a relative-path reference's first segment has no colon.
            return Err(PathError::Absolute);
        }
        Ok(ApiPath {
            segments,
            trailing_slash,
        })
    }

    /// The decoded segments.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The path as the engine encodes it on the wire (without the base).
    pub fn encoded(&self) -> String {
        let mut out = String::new();
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            out.extend(utf8_percent_encode(segment, ENCODE));
        }
        if self.trailing_slash {
            out.push('/');
        }
        out
    }
}

impl fmt::Display for ApiPath {
    /// The normalized, decoded form (`OrchestratorJobs/JobHistory`), for logs and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("/"))?;
        if self.trailing_slash {
            f.write_str("/")?;
        }
        Ok(())
    }
}

/// Whether `raw` starts with `scheme:` (RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )).
fn has_scheme(raw: &str) -> bool {
    let Some(colon) = raw.find(':') else {
        return false;
    };
    let scheme = raw.get(..colon).unwrap_or_default();
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn decode_segment(raw: &str) -> Result<String, PathError> {
    if raw.is_empty() {
        return Err(PathError::EmptySegment);
    }
    // Every `%` must start a valid escape (percent_decode would pass a lone `%` through).
    let bytes = raw.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let ok = matches!(
                (bytes.get(i + 1), bytes.get(i + 2)),
                (Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit()
            );
            if !ok {
                return Err(PathError::BadEscape);
            }
        }
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| PathError::BadEncoded("bytes that are not UTF-8"))?;
    for c in decoded.chars() {
        let what = match c {
            '/' => "a slash (`%2F`)",
            '\\' => "a backslash (`%5C`)",
            '%' => "a percent sign (double encoding)",
            '?' => "`?`",
            '#' => "`#`",
            c if c.is_ascii_control() => "a control character",
            c if !c.is_ascii() => "a non-ASCII character",
            _ => continue,
        };
        return Err(PathError::BadEncoded(what));
    }
    if crate::capabilities::outbound::is_dot_segment(decoded.as_bytes()) {
        return Err(PathError::DotSegment);
    }
    Ok(decoded.into_owned())
}

/// A path prefix an operator grants, e.g. `OrchestratorJobs/` or `Certificates`; `*` grants
/// every path. Matching is per segment and ignores ASCII case (IIS does): `Certificates/`
/// grants `Certificates`, `certificates/14` and `Certificates/14/History`, and
/// `Certificates/1` does *not* grant `Certificates/14`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPrefix {
    text: String,
    /// `None` for `*`.
    segments: Option<Vec<String>>,
}

impl PathPrefix {
    /// Every path.
    pub fn any() -> Self {
        PathPrefix {
            text: "*".into(),
            segments: None,
        }
    }

    /// Parses a prefix as written in configuration.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        if text.trim() == "*" {
            return Ok(PathPrefix::any());
        }
        let path = ApiPath::parse(text)?;
        Ok(PathPrefix {
            text: text.to_owned(),
            segments: Some(path.segments),
        })
    }

    /// Whether `path` is under this prefix.
    pub fn matches(&self, path: &ApiPath) -> bool {
        let Some(prefix) = &self.segments else {
            return true;
        };
        prefix.len() <= path.segments.len()
            && prefix
                .iter()
                .zip(&path.segments)
                .all(|(p, s)| p.eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for PathPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for PathPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        PathPrefix::parse(&text)
            .map_err(|e| serde::de::Error::custom(format!("path prefix {text:?}: {e}")))
    }
}

/// Why an API base URL is unusable (configuration error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseError {
    /// Not a URL (shown without any user information).
    #[error("`{0}` is not an absolute URL such as https://command.example.com/KeyfactorAPI/")]
    NotUrl(String),
    /// Neither https nor loopback http.
    #[error(
        "the Keyfactor API base must use https (plain http is accepted only for a loopback host such as 127.0.0.1, e.g. the stand-in)"
    )]
    Insecure,
    /// Has user:password@.
    #[error(
        "the Keyfactor API base must not contain a user name or password; configure [keyfactor.auth] instead"
    )]
    Userinfo,
    /// Has ?query or #fragment.
    #[error("the Keyfactor API base must not have a query or fragment")]
    QueryOrFragment,
}

/// The configured API base: an `https` (or loopback `http`) URL whose path is a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase {
    url: Url,
}

impl ApiBase {
    /// Parses and normalizes the base (a missing trailing `/` is added).
    pub fn parse(text: &str) -> Result<Self, BaseError> {
        let not_url =
            || BaseError::NotUrl(crate::capabilities::outbound::without_credentials(text).into());
        let mut url = Url::parse(text.trim()).map_err(|_| not_url())?;
        // Named first, whatever else is wrong: a credential in the URL is one to take out.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(BaseError::Userinfo);
        }
        if url.cannot_be_a_base() || url.host().is_none() {
            return Err(not_url());
        }
        match url.scheme() {
            "https" => {}
            "http" if is_loopback_host(&url) => {}
            _ => return Err(BaseError::Insecure),
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(BaseError::QueryOrFragment);
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(ApiBase { url })
    }

    /// The base URL (always ends with `/`).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The full URL of `path` with `query` under this base. Fails only for an unusable query
    /// (or if the result would leave the base, which the checks on `path` rule out).
    pub fn resolve(&self, path: &ApiPath, query: &[(String, String)]) -> Result<Url, PathError> {
        let mut url = self.url.clone();
        url.set_path(&format!("{}{}", self.url.path(), path.encoded()));
        let query = encode_query(query)?;
        url.set_query(query.as_deref());
        if url.origin() != self.url.origin()
            || !url.path().starts_with(self.url.path())
            || url.fragment().is_some()
        {
            return Err(PathError::OutsideBase);
        }
        Ok(url)
    }
}

/// Whether the URL's host is a loopback address or `localhost`.
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Encodes the guest's query list (`None` when empty); refuses control characters (CR/LF),
/// empty names and oversized lists.
pub fn encode_query(query: &[(String, String)]) -> Result<Option<String>, PathError> {
    if query.is_empty() {
        return Ok(None);
    }
    if query.len() > MAX_QUERY_PARAMS {
        return Err(PathError::Query(format!(
            "more than {MAX_QUERY_PARAMS} query parameters"
        )));
    }
    let total: usize = query.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_QUERY_BYTES {
        return Err(PathError::Query(format!(
            "the query parameters are longer than {MAX_QUERY_BYTES} bytes together"
        )));
    }
    let mut out = String::new();
    for (name, value) in query {
        if name.is_empty() {
            return Err(PathError::Query(
                "a query parameter has an empty name".into(),
            ));
        }
        if name.chars().chain(value.chars()).any(char::is_control) {
            return Err(PathError::Query(format!(
                "query parameter {} contains a control character (CR, LF, TAB, NUL, ...)",
                crate::capabilities::outbound::quote(name)
            )));
        }
        if !out.is_empty() {
            out.push('&');
        }
        out.extend(utf8_percent_encode(name, ENCODE));
        out.push('=');
        out.extend(utf8_percent_encode(value, ENCODE));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base() -> ApiBase {
        ApiBase::parse("https://command.example.com/KeyfactorAPI/").unwrap()
    }

    fn resolve(path: &str) -> Result<String, PathError> {
        let path = ApiPath::parse(path)?;
        Ok(base().resolve(&path, &[])?.to_string())
    }

    #[test]
    fn relative_paths_resolve_under_the_base() {
        assert_eq!(
            resolve("Certificates/14").unwrap(),
            "https://command.example.com/KeyfactorAPI/Certificates/14"
        );
        assert_eq!(
            resolve("/OrchestratorJobs/JobHistory").unwrap(),
            "https://command.example.com/KeyfactorAPI/OrchestratorJobs/JobHistory"
        );
        assert_eq!(
            resolve("Certificates/").unwrap(),
            "https://command.example.com/KeyfactorAPI/Certificates/"
        );
        assert_eq!(
            resolve("CertificateStoreTypes/Name/My Type").unwrap(),
            "https://command.example.com/KeyfactorAPI/CertificateStoreTypes/Name/My%20Type"
        );
        assert_eq!(
            resolve("Name/a%20b;c=d").unwrap(),
            "https://command.example.com/KeyfactorAPI/Name/a%20b%3Bc%3Dd"
        );
    }

    #[test]
    fn a_base_without_trailing_slash_is_a_directory() {
        let b = ApiBase::parse("https://command.example.com/KeyfactorAPI").unwrap();
        assert_eq!(
            b.url().as_str(),
            "https://command.example.com/KeyfactorAPI/"
        );
        let url = b
            .resolve(&ApiPath::parse("Certificates/14").unwrap(), &[])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://command.example.com/KeyfactorAPI/Certificates/14"
        );
        let root = ApiBase::parse("https://command.example.com").unwrap();
        assert_eq!(root.url().as_str(), "https://command.example.com/");
    }

    #[test]
    fn bases_are_checked() {
        assert_eq!(
            ApiBase::parse("command/KeyfactorAPI"),
            Err(BaseError::NotUrl("command/KeyfactorAPI".into()))
        );
        assert_eq!(
            ApiBase::parse("http://command.example.com/"),
            Err(BaseError::Insecure)
        );
        assert!(ApiBase::parse("http://127.0.0.1:8081/KeyfactorAPI/").is_ok());
        assert!(ApiBase::parse("http://localhost/KeyfactorAPI/").is_ok());
        assert!(ApiBase::parse("http://[::1]:8/KeyfactorAPI/").is_ok());
        assert_eq!(ApiBase::parse("ftp://x/"), Err(BaseError::Insecure));
        assert_eq!(ApiBase::parse("https://u:p@x/"), Err(BaseError::Userinfo));
        // The user information is the problem named, also of a URL with another one, and a
        // URL the parser refused is quoted without it.
        assert_eq!(ApiBase::parse("http://u:p@x/"), Err(BaseError::Userinfo));
        assert_eq!(ApiBase::parse("ftp://u@x/"), Err(BaseError::Userinfo));
        let e = ApiBase::parse("https://u:p@ x/").unwrap_err();
        assert_eq!(e, BaseError::NotUrl("https://…@ x/".into()));
        assert!(!e.to_string().contains("u:p"), "{e}");
        assert_eq!(
            ApiBase::parse("https://x/?a=1"),
            Err(BaseError::QueryOrFragment)
        );
    }

    #[test]
    fn every_trick_is_refused() {
        use PathError::*;
        let cases: &[(&str, PathError)] = &[
            ("", Empty),
            ("/", Empty),
            ("https://evil.example/x", Absolute),
            ("HTTP://evil.example/x", Absolute),
            ("javascript:alert(1)", Absolute),
            ("a%3Ab/c", Absolute),
            ("//evil.example/x", SchemeRelative),
            ("\\\\evil.example\\x", SchemeRelative),
            ("/\\evil.example", SchemeRelative),
            ("Certificates\\..\\Agents", BadCharacter("a backslash")),
            ("../Agents", DotSegment),
            ("Certificates/../../x", DotSegment),
            ("Certificates/./14", DotSegment),
            ("Certificates/%2e%2e/x", DotSegment),
            ("Certificates/%2E./x", DotSegment),
            ("Certificates/.%2e/x", DotSegment),
            ("Certificates/... /x", DotSegment),
            ("Certificates/..%2fAgents", BadEncoded("a slash (`%2F`)")),
            ("Certificates%2f..%2fAgents", BadEncoded("a slash (`%2F`)")),
            ("Certificates/%5c..", BadEncoded("a backslash (`%5C`)")),
            (
                "Certificates/%252e%252e/x",
                BadEncoded("a percent sign (double encoding)"),
            ),
            ("Certificates/%", BadEscape),
            ("Certificates/%zz", BadEscape),
            (
                "Certificates/%c0%ae%c0%ae/x",
                BadEncoded("bytes that are not UTF-8"),
            ),
            ("Certificates//14", EmptySegment),
            (
                "Certificates/14?x=1",
                BadCharacter("`?` (pass query parameters in the request's query list)"),
            ),
            ("Certificates/14#x", BadCharacter("`#` (a fragment)")),
            (
                "Certificates/14\r\nHost: evil",
                BadCharacter("a control character (CR, LF, TAB, NUL, ...)"),
            ),
            ("Certificates/%0d%0aX", BadEncoded("a control character")),
            (
                "Certificates/\u{ff0e}\u{ff0e}/x",
                BadCharacter("a non-ASCII character (percent-encode it, or use an ASCII id)"),
            ),
            (
                "Certificates/%ef%bc%8e/x",
                BadEncoded("a non-ASCII character"),
            ),
        ];
        for (path, expected) in cases {
            assert_eq!(
                ApiPath::parse(path).as_ref().err(),
                Some(expected),
                "{path:?}"
            );
        }
        assert_eq!(
            ApiPath::parse(&"a".repeat(MAX_PATH_BYTES + 1)),
            Err(TooLong)
        );
        // `@` in a relative path names no user: it is encoded, not interpreted.
        assert_eq!(
            resolve("user@evil.example").unwrap(),
            "https://command.example.com/KeyfactorAPI/user%40evil.example"
        );
    }

    #[test]
    fn queries_are_encoded_and_checked() {
        let path = ApiPath::parse("OrchestratorJobs/JobHistory").unwrap();
        let q = vec![
            (
                "pq.queryString".to_string(),
                r#"JobID -eq "0b4b411a" AND x=y&z"#.to_string(),
            ),
            ("pq.returnLimit".to_string(), "10".to_string()),
        ];
        let url = base().resolve(&path, &q).unwrap();
        assert_eq!(
            url.query(),
            Some("pq.queryString=JobID%20-eq%20%220b4b411a%22%20AND%20x%3Dy%26z&pq.returnLimit=10")
        );
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(pairs, q);
        let bad = vec![("a".to_string(), "1\r\nHost: evil".to_string())];
        assert!(matches!(
            base().resolve(&path, &bad),
            Err(PathError::Query(_))
        ));
        let bad = vec![(String::new(), "1".to_string())];
        assert!(matches!(
            base().resolve(&path, &bad),
            Err(PathError::Query(_))
        ));
        let many = vec![("a".to_string(), "b".to_string()); MAX_QUERY_PARAMS + 1];
        assert!(matches!(
            base().resolve(&path, &many),
            Err(PathError::Query(_))
        ));
    }

    #[test]
    fn prefixes_match_whole_segments_ignoring_case() {
        let p = |s: &str| ApiPath::parse(s).unwrap();
        let jobs = PathPrefix::parse("OrchestratorJobs/").unwrap();
        assert!(jobs.matches(&p("OrchestratorJobs/JobHistory")));
        assert!(jobs.matches(&p("orchestratorjobs/jobhistory")));
        assert!(jobs.matches(&p("OrchestratorJobs")));
        assert!(!jobs.matches(&p("OrchestratorJobsX/1")));
        assert!(!jobs.matches(&p("Agents/1")));
        let one = PathPrefix::parse("Certificates/1").unwrap();
        assert!(one.matches(&p("Certificates/1/History")));
        assert!(!one.matches(&p("Certificates/14")));
        assert!(
            PathPrefix::parse("*")
                .unwrap()
                .matches(&p("Anything/at/all"))
        );
        assert!(PathPrefix::parse("../x").is_err());
        let parsed: Vec<PathPrefix> = serde_json::from_str(r#"["Certificates/", "*"]"#).unwrap();
        assert_eq!(parsed[0].to_string(), "Certificates/");
        assert!(serde_json::from_str::<Vec<PathPrefix>>(r#"["//evil"]"#).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the guest sends, a path that is accepted resolves under the base.
        #[test]
        fn accepted_paths_never_leave_the_base(raw in "\\PC{0,40}|[a-zA-Z0-9%./\\\\:@?#;~ -]{0,40}") {
            if let Ok(path) = ApiPath::parse(&raw) {
                let url = base().resolve(&path, &[]).unwrap();
                prop_assert_eq!(url.origin(), base().url().origin());
                prop_assert!(url.path().starts_with("/KeyfactorAPI/"));
                prop_assert!(url.path().len() > "/KeyfactorAPI/".len());
                prop_assert!(url.query().is_none() && url.fragment().is_none());
                // No traversal survives: every segment of the result is a real name.
                for segment in url.path().split('/').skip(2) {
                    prop_assert!(segment != "." && segment != "..");
                    prop_assert!(!segment.to_ascii_lowercase().contains("%2e%2e"));
                }
                // Parsing is stable: the normalized form parses to the same path.
                prop_assert_eq!(ApiPath::parse(&path.to_string()).ok(), Some(path));
            }
        }

        /// Paths assembled from the pieces traversal tricks are made of: whatever is accepted
        /// stays under the base and has no dot segment in any encoding.
        #[test]
        fn tricky_pieces_never_escape(pieces in proptest::collection::vec(proptest::sample::select(vec![
            "..", ".", "%2e", "%2E", "%2e%2e", "%252e", "%2f", "%2F", "%5c", "\\", "/", "//", "a", "Certificates",
            "%25", ":", "http:", "@", "%00", "%0d%0a", " ", "?", "#", "~", "%c0%ae", "%ef%bc%8e", ";", "%3b",
        ]), 0..10)) {
            let raw: String = pieces.concat();
            if let Ok(path) = ApiPath::parse(&raw) {
                let url = base().resolve(&path, &[]).unwrap();
                prop_assert_eq!(url.origin(), base().url().origin());
                prop_assert!(url.path().starts_with("/KeyfactorAPI/"));
                for segment in path.segments() {
                    prop_assert!(!segment.chars().all(|c| c == '.' || c == ' '));
                    prop_assert!(!segment.contains(['/', '\\', '%']));
                }
                let lower = url.path().to_ascii_lowercase();
                prop_assert!(!lower.contains("/../") && !lower.contains("/./") && !lower.contains("%2e"));
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%25"));
            }
        }

        /// Arbitrary bytes-as-text never panic the path, query or prefix parsers.
        #[test]
        fn parsers_never_panic(raw in "\\PC*", key in ".{0,20}", value in ".{0,40}") {
            let _ = ApiPath::parse(&raw);
            let _ = PathPrefix::parse(&raw);
            let _ = ApiBase::parse(&raw);
            let _ = encode_query(&[(key, value)]);
        }

        /// Accepted queries round-trip exactly and never add parameters.
        #[test]
        fn queries_round_trip(pairs in proptest::collection::vec(("[^\\p{Cc}]{1,10}", "[^\\p{Cc}]{0,20}"), 0..5)) {
            let path = ApiPath::parse("OrchestratorJobs/JobHistory").unwrap();
            let url = base().resolve(&path, &pairs).unwrap();
            let back: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            prop_assert_eq!(back, pairs);
        }
    }
}
