//! `jobhook:handler/http`: outbound HTTPS to URL prefixes the operator allow-listed for the
//! handler — a Teams, Slack or generic webhook.
//!
//! A call goes through these steps, all inside the engine until the connect:
//!
//! 1. the call budget ([`CallBudget`](crate::capabilities::gate::CallBudget); exceeding it traps the sandbox);
//! 2. the URL, parsed and normalized (`..`, `%2e%2e`, case of the host, default ports): https
//!    only (plain http only with `allow_private = true`, and then only to loopback), no
//!    user:password@, no encoded `/` or `\` in the path;
//! 3. the grant: the normalized URL must be under one of the handler's [`UrlPrefix`]es (same
//!    scheme, host and port, path prefix by whole segments) with a granted method;
//! 4. headers (no `Host`, `Content-Length`, hop-by-hop or proxy headers; no CR/LF) and the body
//!    size;
//! 5. the destination address: an IP literal is checked at once; a name is resolved by the
//!    [`address::CheckingResolver`] the client connects through, which refuses loopback,
//!    private, link-local, unique-local, multicast and unspecified addresses unless the grant
//!    says `allow_private` — the checked addresses are the ones connected to (no DNS rebinding);
//! 6. no redirects are followed (a 3xx goes back to the handler); the whole call has a
//!    timeout; the response body is read up to [`HttpConfig::max_response_bytes`] and no
//!    further.

pub mod address;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use url::Url;
use wasmtime::component::{HasSelf, Linker};

use self::address::{AddressPolicy, AddressRefused, CheckingResolver, LookupShare};
use crate::bindings::jobhook::handler::http::{Host, Request, add_to_linker};
use crate::bindings::types::{CapabilityError, Response};
use crate::capabilities::gate::{Gate, Grantable, ServiceEnv};
use crate::capabilities::outbound::{self, BodyError, GrantMethod, RedactorSet};
use crate::log_limit::LogLimit;

/// Default per-call timeout. A webhook answers in well under a second; a notification is not
/// worth holding a handler for longer than this.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Default largest request body: chat messages and JSON summaries are a few KiB; Teams caps
/// webhook payloads at 28 KiB and Slack at 40 KiB. 256 KiB leaves room without inviting bulk
/// exfiltration.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Default largest response body: webhooks answer `ok` or a small JSON document.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Longest URL a handler may send (browsers and most servers stop around 8 KiB).
pub const MAX_URL_BYTES: usize = 8 * 1024;

/// Request headers a handler may never set, by exact name (lowercase): the engine owns framing
/// (`Host`, `Content-Length`, `Expect`), the hop-by-hop headers of RFC 9110 §7.6.1, and the
/// forwarding/origin headers a receiver or its proxy may trust to decide who is calling.
/// [`forbidden_header`] adds the families ([`FORBIDDEN_HEADER_PREFIXES`],
/// [`FORBIDDEN_HEADER_SUFFIXES`]).
pub const FORBIDDEN_HEADERS: &[&str] = &[
    // Framing and routing.
    "host",
    "content-length",
    "expect",
    // Hop-by-hop (RFC 9110 §7.6.1), and the obsolete ones servers still honour.
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // Forwarding and origin: who the caller is, as a proxy would say it.
    "forwarded",
    "via",
    "true-client-ip",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Header name prefixes a handler may never use: every `Proxy-*` (proxy credentials and
/// connection control), every `X-Forwarded-*` (`-For`, `-Host`, `-Proto`, `-Port`, `-Prefix`,
/// `-Server`, `-Ssl`, `-Scheme`, `-Uri`, … — the family, not a list of members), and the
/// rewrite-target headers some front ends honour (`X-Original-URL`, `X-Rewrite-URL`, …).
pub const FORBIDDEN_HEADER_PREFIXES: &[&str] =
    &["proxy-", "x-forwarded-", "x-original-", "x-rewrite-"];

/// Header name suffixes a handler may never use: the client-address family (`X-Real-IP`,
/// `X-Client-IP`, `X-Originating-IP`, `CF-Connecting-IP`, `X-Cluster-Client-IP`,
/// `Fastly-Client-IP`, …), whatever vendor prefix it carries.
pub const FORBIDDEN_HEADER_SUFFIXES: &[&str] = &[
    "-real-ip",
    "-client-ip",
    "-originating-ip",
    "-connecting-ip",
    "-remote-ip",
    "-remote-addr",
];

/// Whether a handler may not set header `name` (any case): an exact name of
/// [`FORBIDDEN_HEADERS`], or a member of a family in [`FORBIDDEN_HEADER_PREFIXES`] or
/// [`FORBIDDEN_HEADER_SUFFIXES`].
pub fn forbidden_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    FORBIDDEN_HEADERS.contains(&name.as_str())
        || FORBIDDEN_HEADER_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
        || FORBIDDEN_HEADER_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// What a handler is told when the engine has no http service configured.
const NOT_CONFIGURED: &str = "no outbound HTTP client is configured for this engine";

/// What a handler is told about the destination (the URL may hold a webhook secret: not logged).
const WHAT: &str = "the destination";

/// Where the operator fixes a destination's certificate the engine refused: `[http]` has no CA
/// setting (its client trusts the system's roots), and the host is the handler's URL's.
pub const TRUST: outbound::TrustSettings = outbound::TrustSettings {
    section: "[http]",
    ca_key: None,
    name: "the handler's URL must name a host the certificate is issued for",
};

/// The `http` capability: outbound HTTPS to allow-listed URLs.
#[derive(Debug)]
pub struct Http;

impl Grantable for Http {
    const INTERFACE: &'static str = "http";
    const CALLS_LIMIT: &'static str = "http-calls";
    /// A webhook handler posts once or twice.
    const DEFAULT_CALLS: u32 = 5;
    const NOT_CONFIGURED: &'static str = NOT_CONFIGURED;
    const CONFIG_KEY: &'static str = "[http]";

    type Config = HttpConfig;
    type Grant = HttpGrant;
    type Service = HttpClient;
    type ConfigError = HttpConfigError;

    fn permissive_grant() -> HttpGrant {
        HttpGrant::permissive()
    }

    fn rebase(_config: &mut HttpConfig, _base: &Path) {}

    /// A plain http prefix is used only with `allow_private` (it reaches loopback only);
    /// without it every call under the prefix would be refused.
    fn check_grant(_config: &HttpConfig, grant: &HttpGrant) -> Result<(), String> {
        // An empty list would refuse every call the handler makes.
        if grant.urls.is_empty() {
            return Err(crate::capabilities::gate::empty_grant_list(
                "urls",
                "call",
                "list the URL prefixes the handler may call, e.g. urls = \
                 [\"https://hooks.example.com/\"], or remove [handlers.grants.http]",
            ));
        }
        if grant.methods.is_empty() {
            return Err(crate::capabilities::gate::empty_grant_list(
                "methods",
                "call",
                "list the methods the handler may use, e.g. methods = [\"POST\"], or leave \
                 methods out (POST)",
            ));
        }
        match grant.plain_http_prefix() {
            Some(prefix) if !grant.allow_private => Err(format!(
                "urls: {}: plain http:// is allowed only with allow_private = true (and only to \
                 loopback); use https:// or set allow_private = true",
                outbound::quote(&prefix.to_string())
            )),
            _ => Ok(()),
        }
    }

    /// Always configured (defaults apply): only granted handlers can use it.
    fn service(
        config: &HttpConfig,
        _env: &ServiceEnv,
    ) -> Result<Option<HttpClient>, HttpConfigError> {
        HttpClient::from_config(config).map(Some)
    }

    fn add_to_linker<T: Send + 'static>(
        linker: &mut Linker<T>,
        get: fn(&mut T) -> &mut Gate<Self>,
    ) -> wasmtime::Result<()> {
        add_to_linker::<T, HasSelf<Gate<Self>>>(linker, get)
    }
}

/// The outbound HTTP capability of one sandbox.
pub type HttpCapability = Gate<Http>;

impl Host for Gate<Http> {
    async fn send(
        &mut self,
        request: Request,
    ) -> wasmtime::Result<Result<Response, CapabilityError>> {
        let under_way = self.under_way();
        let (grant, service) = match self.admit()? {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(Err(refused)),
        };
        // The host only: a URL's path or query may carry a token.
        let host = url::Url::parse(&request.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| "an unparsable URL".to_owned());
        under_way.start(&format!(
            "an HTTP call ({} to {host})",
            outbound::method_name(request.method)
        ));
        let answer = service.send(grant, request).await;
        under_way.end();
        Ok(answer)
    }
}

/// A URL prefix an operator allow-lists, e.g. `https://hooks.slack.com/services/T0/B0/` or a
/// Teams Workflows trigger `https://prod-12.westeurope.logic.azure.com/workflows/…/invoke`;
/// `*` allows every https URL (the address checks still apply). Scheme, host and port must
/// match exactly (after normalization: the host's case, default ports); the path matches by
/// whole segments, so
/// `https://h/hooks/pki` allows `https://h/hooks/pki/x` but not `https://h/hooks/pki-admin`.
/// Any query is allowed (Teams puts its signature there); a prefix itself has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPrefix {
    text: String,
    /// `None` for `*`.
    url: Option<Url>,
}

/// Why a URL prefix in a grant is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("URL prefix {text:?}: {reason}")]
pub struct UrlPrefixError {
    text: String,
    reason: &'static str,
}

impl UrlPrefix {
    /// Every https URL.
    pub fn any() -> Self {
        UrlPrefix {
            text: "*".into(),
            url: None,
        }
    }

    /// Parses a prefix as written in configuration. An error quotes it without any user
    /// information.
    pub fn parse(text: &str) -> Result<Self, UrlPrefixError> {
        let error = |reason| UrlPrefixError {
            text: crate::capabilities::outbound::without_credentials(text).into_owned(),
            reason,
        };
        if text.trim() == "*" {
            return Ok(UrlPrefix::any());
        }
        let url = Url::parse(text.trim()).map_err(|_| error("not an absolute URL"))?;
        // Named first, whatever else is wrong: a credential in the URL is one to take out.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(error("must not contain a user name or password"));
        }
        if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
            return Err(error(
                "must be an https:// (or loopback http://) URL with a host",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(error(
                "must not have a query or fragment (any query is allowed under a prefix)",
            ));
        }
        // Every call to a plain http URL elsewhere is refused; a prefix naming an address that
        // is not loopback could never be used. A name is judged by what it resolves to, at the
        // call (an /etc/hosts alias of 127.0.0.1 is loopback).
        if url.scheme() == "http" && !may_be_loopback(&url) {
            return Err(error(
                "plain http:// is allowed only to a loopback host (127.0.0.1, [::1], localhost); \
                 use https://",
            ));
        }
        Ok(UrlPrefix {
            text: text.to_owned(),
            url: Some(url),
        })
    }

    /// Whether `url` (already normalized by parsing) is under this prefix.
    pub fn matches(&self, url: &Url) -> bool {
        let Some(prefix) = &self.url else {
            return url.scheme() == "https";
        };
        if prefix.scheme() != url.scheme()
            || prefix.host() != url.host()
            || prefix.port_or_known_default() != url.port_or_known_default()
        {
            return false;
        }
        let want: Vec<&str> = prefix.path().split('/').filter(|s| !s.is_empty()).collect();
        let have: Vec<&str> = url.path().split('/').filter(|s| !s.is_empty()).collect();
        want.len() <= have.len() && want.iter().zip(&have).all(|(w, h)| w == h)
    }
}

/// Whether `url`'s host may be loopback, the only destination plain http may reach: an address
/// the call's own check classes as loopback ([`address::classify`]: `::ffff:127.0.0.1` too), or
/// a name (resolved, and judged, at the call).
fn may_be_loopback(url: &Url) -> bool {
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(_)) => return true,
        None => return false,
    };
    address::classify(ip) == address::AddressClass::Loopback
}

impl std::fmt::Display for UrlPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for UrlPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for UrlPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        UrlPrefix::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn default_methods() -> Vec<GrantMethod> {
    vec![GrantMethod::Post]
}

/// What one handler may do with outbound HTTP:
///
/// ```toml
/// [handlers.grants.http]
/// urls = ["https://prod-12.westeurope.logic.azure.com/workflows/0f1e/triggers/manual/paths/invoke"]  # required
/// methods = ["POST"]                                        # default: ["POST"]
/// allow_private = false                                     # default: false
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGrant {
    /// URL prefixes the handler may call.
    pub urls: Vec<UrlPrefix>,
    /// Methods the handler may use.
    #[serde(default = "default_methods")]
    pub methods: Vec<GrantMethod>,
    /// Allow loopback, private, link-local and unique-local destinations (and plain http to
    /// loopback). For an on-premises chat server or a test receiver; off by default because it
    /// opens the operator's internal network to the handler.
    #[serde(default)]
    pub allow_private: bool,
    /// The handler's share of the engine's name lookups (not configuration: each grant read
    /// makes one, and every sandbox of the handler holds a clone of it).
    #[serde(skip)]
    pub lookups: LookupShare,
}

impl HttpGrant {
    /// The first of the prefixes that is a plain http one, if any.
    pub fn plain_http_prefix(&self) -> Option<&UrlPrefix> {
        self.urls
            .iter()
            .find(|p| p.url.as_ref().is_some_and(|u| u.scheme() == "http"))
    }

    /// Every method to every public https URL: what `jobhook run`, the author's harness, grants.
    pub fn permissive() -> Self {
        HttpGrant {
            urls: vec![UrlPrefix::any()],
            methods: GrantMethod::ALL.to_vec(),
            allow_private: false,
            lookups: LookupShare::default(),
        }
    }

    /// `POST` to `urls` (convenient for tests and examples).
    pub fn post_to(urls: &[&str], allow_private: bool) -> Result<Self, UrlPrefixError> {
        Ok(HttpGrant {
            urls: urls
                .iter()
                .map(|u| UrlPrefix::parse(u))
                .collect::<Result<_, _>>()?,
            methods: default_methods(),
            allow_private,
            lookups: LookupShare::default(),
        })
    }
}

/// The engine's outbound HTTP settings (`[http]`; every field has a default):
///
/// ```toml
/// [http]
/// timeout_ms = 5000
/// connect_timeout_ms = 3000
/// max_request_bytes = 262144
/// max_response_bytes = 1048576
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Per-call timeout, connect to last body byte, in milliseconds.
    pub timeout_ms: u64,
    /// Connect timeout in milliseconds.
    pub connect_timeout_ms: u64,
    /// Largest request body a handler may send.
    pub max_request_bytes: usize,
    /// Largest response body read.
    pub max_response_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT.as_millis() as u64,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// Why the `[http]` configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum HttpConfigError {
    /// A timeout or body limit out of its range ([`outbound::check_call_settings`]).
    #[error("{0}")]
    OutOfRange(String),
    /// The HTTP client could not be built.
    #[error("cannot build the outbound HTTP client: {0}")]
    Client(String),
}

/// The engine-wide outbound HTTP client: one connection pool per address policy, each behind
/// its own checking resolver.
#[derive(Debug)]
pub struct HttpClient {
    clients: HashMap<AddressPolicy, reqwest::Client>,
    max_request_bytes: usize,
    max_response_bytes: usize,
}

impl HttpClient {
    /// Builds the clients.
    pub fn from_config(config: &HttpConfig) -> Result<Self, HttpConfigError> {
        outbound::check_call_settings(
            "[http]",
            &[
                ("timeout_ms", config.timeout_ms),
                ("connect_timeout_ms", config.connect_timeout_ms),
            ],
            &[
                ("max_request_bytes", config.max_request_bytes),
                ("max_response_bytes", config.max_response_bytes),
            ],
        )
        .map_err(HttpConfigError::OutOfRange)?;
        let mut clients = HashMap::new();
        for policy in [
            AddressPolicy::PublicOnly,
            AddressPolicy::AllowPrivate,
            AddressPolicy::LoopbackOnly,
        ] {
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .referer(false)
                .dns_resolver(Arc::new(CheckingResolver::new(policy)))
                .timeout(Duration::from_millis(config.timeout_ms))
                .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
                .user_agent(concat!("jobhook/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| HttpConfigError::Client(e.to_string()))?;
            clients.insert(policy, client);
        }
        Ok(HttpClient {
            clients,
            max_request_bytes: config.max_request_bytes,
            max_response_bytes: config.max_response_bytes,
        })
    }

    /// Checks `request` against `grant` and the engine's rules, sends it and returns the
    /// bounded response.
    pub async fn send(
        &self,
        grant: &HttpGrant,
        request: Request,
    ) -> Result<Response, CapabilityError> {
        let denied = |m: String| CapabilityError::Denied(m);
        let url = parse_url(&request.url).map_err(|m| denied(m.into()))?;
        let policy = match (url.scheme(), grant.allow_private) {
            ("https", false) => AddressPolicy::PublicOnly,
            ("https", true) => AddressPolicy::AllowPrivate,
            ("http", true) => AddressPolicy::LoopbackOnly,
            ("http", false) => {
                return Err(denied("plain http is refused; use an https:// URL".into()));
            }
            _ => return Err(denied("only https:// URLs are allowed".into())),
        };
        if !grant.urls.iter().any(|p| p.matches(&url)) {
            return Err(CapabilityError::NotGranted(
                "the URL is not under any of the prefixes granted to this handler".into(),
            ));
        }
        if !grant.methods.contains(&GrantMethod::of(request.method)) {
            return Err(CapabilityError::NotGranted(format!(
                "{} is not granted to this handler for outbound HTTP",
                outbound::method_name(request.method)
            )));
        }
        let headers = guest_headers(&request.headers)?;
        if let Some(body) = &request.body
            && body.len() > self.max_request_bytes
        {
            return Err(CapabilityError::LimitExceeded(format!(
                "the request body is {} bytes; the limit is {} bytes",
                body.len(),
                self.max_request_bytes
            )));
        }
        // An IP literal never goes through the resolver: check it here.
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal {
            policy.check(ip).map_err(|e| denied(e.to_string()))?;
        }
        let Some(client) = self.clients.get(&policy) else {
            return Err(CapabilityError::NotAvailable(NOT_CONFIGURED.into()));
        };

        // For the log, which names where a failed call went (never the path or query, which may
        // carry a token).
        let host = crate::escape::escape(url.host_str().unwrap_or_default()).into_owned();
        let mut builder = client
            .request(outbound::method(request.method), url)
            .headers(headers);
        if let Some(body) = request.body {
            builder = builder.body(body);
        }
        // The handler's own share of name lookups (address::MAX_LOOKUPS_PER_HANDLER).
        let response = grant.lookups.scope(builder.send()).await.map_err(|e| {
            if let Some(refused) = find_source::<AddressRefused>(&e) {
                return denied(refused.to_string());
            }
            static FAILED: LogLimit = LogLimit::new(outbound::FAILURE_LOG_INTERVAL);
            let answer = outbound::transport_error(&e, WHAT, &TRUST);
            outbound::log_failure(&FAILED, e, &host, "outbound HTTP call failed", &TRUST);
            answer
        })?;
        let status = response.status().as_u16();
        let headers = outbound::response_headers(
            response.headers(),
            |name| !name.eq_ignore_ascii_case("set-cookie"),
            &RedactorSet::new(),
        );
        let body = match outbound::read_body(response, self.max_response_bytes).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return Err(CapabilityError::LimitExceeded(format!(
                    "the response is larger than {} bytes",
                    self.max_response_bytes
                )));
            }
            Err(BodyError::Transport(e)) => {
                static BROKE_OFF: LogLimit = LogLimit::new(outbound::FAILURE_LOG_INTERVAL);
                let answer = outbound::transport_error(&e, WHAT, &TRUST);
                let what = if e.is_timeout() {
                    "outbound HTTP response did not finish within [http] timeout_ms"
                } else {
                    "outbound HTTP response broke off"
                };
                outbound::log_failure(&BROKE_OFF, e, &host, what, &TRUST);
                return Err(answer);
            }
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// Parses and checks a guest URL; the error is the guest's reason.
fn parse_url(raw: &str) -> Result<Url, &'static str> {
    if raw.len() > MAX_URL_BYTES {
        return Err("the URL is too long");
    }
    if raw.chars().any(|c| c.is_control() || c == '\\') {
        return Err("the URL contains a control character or a backslash");
    }
    let mut url = Url::parse(raw).map_err(|_| "not an absolute URL")?;
    if url.cannot_be_a_base() || url.host().is_none() {
        return Err("the URL has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the URL must not contain a user name or password");
    }
    let segments: Vec<&str> = url.path().split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        // The path starts with `/` (an empty first piece) and may end with one (an empty
        // last piece); an empty segment between them (`//`) is one the prefix check would
        // skip but a server may not: `//x` is a host to some, another path to others.
        if segment.is_empty() && i != 0 && i + 1 != segments.len() {
            return Err("the URL path contains an empty segment ('//')");
        }
        check_path_segment(segment)?;
    }
    url.set_fragment(None);
    Ok(url)
}

/// Checks one path segment of a parsed URL (the parser has already resolved `.` and `..`,
/// including `%2e` forms, and refused raw backslashes above). The segment is percent-decoded
/// once and refused, by class, when it holds something some server treats as structure rather
/// than as a name:
///
/// - a separator in any encoding: `/`, `\` (`%2f`, `%5c`, …);
/// - a path parameter: `;` raw or encoded (`..;/` is traversal on Tomcat and some proxies);
/// - a second layer of encoding: `%` after decoding (`%252e%252e` is `..` to a server that
///   decodes twice);
/// - a dot segment after decoding that the parser did not resolve: `.`, `..`, and any other
///   segment of dots and spaces only, which IIS trims to one ([`outbound::is_dot_segment`]);
/// - a control character or NUL;
/// - any non-ASCII byte, which covers overlong UTF-8 (`%c0%ae` is `.` to a lenient decoder),
///   invalid UTF-8, and characters Windows best-fit maps to `.` `/` `\` (`U+FF0E`, `U+2215`).
///
/// Nothing is normalised silently: the request goes out exactly as checked, or not at all.
fn check_path_segment(segment: &str) -> Result<(), &'static str> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
    if decoded.iter().any(|b| matches!(b, b'/' | b'\\')) {
        return Err("the URL path contains an encoded slash or backslash");
    }
    if decoded.contains(&b';') {
        return Err("the URL path contains a ';' path parameter");
    }
    if decoded.contains(&b'%') {
        return Err("the URL path is percent-encoded twice");
    }
    if decoded.iter().any(|b| b.is_ascii_control()) {
        return Err("the URL path contains an encoded control character or NUL");
    }
    if !decoded.is_ascii() {
        return Err("the URL path contains non-ASCII or overlong UTF-8 bytes");
    }
    if outbound::is_dot_segment(&decoded) {
        return Err(
            "the URL path contains a segment of only dots and spaces (`.`, `..`, ` `), which a server may read as `.`, `..` or an empty segment",
        );
    }
    Ok(())
}

/// Checks the guest's headers.
fn guest_headers(guest: &[(String, String)]) -> Result<HeaderMap, CapabilityError> {
    if guest.len() > outbound::MAX_REQUEST_HEADERS {
        return Err(CapabilityError::Denied(format!(
            "more than {} headers",
            outbound::MAX_REQUEST_HEADERS
        )));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in guest {
        let (name, value) = outbound::check_header(name, value)
            .map_err(|e| CapabilityError::Denied(e.to_string()))?;
        if forbidden_header(name.as_str()) {
            return Err(CapabilityError::Denied(format!(
                "header {} is set by the engine and may not be set by a handler",
                name.as_str()
            )));
        }
        headers.append(name, value);
    }
    Ok(headers)
}

/// The first error of type `T` in `error`'s source chain.
fn find_source<'e, T: std::error::Error + 'static>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        parse_url(s).unwrap()
    }

    /// A plain http prefix every call under which would be refused is refused when read: one
    /// to a host that is not loopback, or one in a grant without `allow_private`.
    #[test]
    fn plain_http_prefixes_that_could_never_be_used_are_refused() {
        for bad in [
            "http://10.0.0.1/hooks",
            "http://192.168.1.20:8080/",
            "http://[fe80::1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://8.8.8.8/",
            "http://0.0.0.0/",
            "http://[::]/",
            "http://[fd00::1]/",
        ] {
            let e = UrlPrefix::parse(bad).unwrap_err().to_string();
            assert!(e.contains("only to a loopback host"), "{bad}: {e}");
        }
        // Loopback addresses in any spelling the call's check accepts, and names, which are
        // judged by what they resolve to at the call (an /etc/hosts alias may be loopback).
        for good in [
            "http://127.0.0.1:8080/hooks",
            "http://127.1.2.3/",
            "http://2130706433/",
            "http://0x7f.0.0.1/",
            "http://[::1]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost/",
            "http://receiver:8080/",
            "http://hooks.example.com/",
        ] {
            assert!(UrlPrefix::parse(good).is_ok(), "{good}");
        }
        let grant = |urls: &[&str], allow_private: bool| HttpGrant {
            urls: urls.iter().map(|u| UrlPrefix::parse(u).unwrap()).collect(),
            allow_private,
            ..HttpGrant::permissive()
        };
        let config = HttpConfig::default();
        let e = Http::check_grant(
            &config,
            &grant(&["https://a.example/", "http://127.0.0.1:9/x"], false),
        )
        .unwrap_err();
        assert!(
            e.starts_with("urls: \"http://127.0.0.1:9/x\": plain http:// is allowed only with allow_private = true"),
            "{e}"
        );
        assert!(Http::check_grant(&config, &grant(&["http://127.0.0.1:9/x"], true)).is_ok());
        assert!(Http::check_grant(&config, &grant(&["https://a.example/"], false)).is_ok());
    }

    #[test]
    fn prefixes_match_normalized_urls_by_segment() {
        let p = UrlPrefix::parse("https://Hooks.Example.com/hooks/pki").unwrap();
        assert!(p.matches(&url("https://hooks.example.com/hooks/pki")));
        assert!(p.matches(&url("https://hooks.example.com:443/hooks/pki/x?sig=1")));
        assert!(!p.matches(&url("https://hooks.example.com/hooks/pki-admin")));
        assert!(!p.matches(&url("https://hooks.example.com/hooks/pki/../admin")));
        assert!(!p.matches(&url("https://hooks.example.com/hooks/pki/%2e%2e/admin")));
        assert!(!p.matches(&url("https://hooks.example.com:8443/hooks/pki")));
        assert!(!p.matches(&url("http://hooks.example.com/hooks/pki")));
        assert!(!p.matches(&url("https://hooks.example.com.evil.example/hooks/pki")));
        assert!(!p.matches(&url("https://evil.example/hooks/pki")));
        assert!(UrlPrefix::any().matches(&url("https://anything.example/")));
        assert!(!UrlPrefix::any().matches(&url("http://anything.example/")));
    }

    #[test]
    fn urls_are_checked() {
        assert!(parse_url("https://u:p@hooks.example.com/").is_err());
        assert!(parse_url("https://hooks.example.com/a%2f..%2fb").is_err());
        assert!(parse_url("https://hooks.example.com/a\r\nHost: x").is_err());
        assert!(parse_url("https:\\\\hooks.example.com\\a").is_err());
        assert!(parse_url("/relative").is_err());
        assert!(parse_url("mailto:a@b").is_err());
        assert_eq!(
            url("https://hooks.example.com/a#frag").as_str(),
            "https://hooks.example.com/a"
        );
    }

    #[test]
    fn prefixes_in_config_are_checked() {
        assert!(UrlPrefix::parse("https://hooks.example.com/x?a=1").is_err());
        assert!(UrlPrefix::parse("ftp://hooks.example.com/").is_err());
        assert!(UrlPrefix::parse("https://u@hooks.example.com/").is_err());
        assert!(UrlPrefix::parse("hooks.example.com").is_err());
        // A user name or password is the problem named, before the scheme, and never echoed.
        for bad in [
            "https://u:hunter2@hooks.example.com/",
            "http://u:hunter2@hooks.example.com/",
            "ftp://u:hunter2@hooks.example.com/",
        ] {
            let e = UrlPrefix::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("must not contain a user name or password"),
                "{bad}: {e}"
            );
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = UrlPrefix::parse("https://u:hunter2@ hooks/")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not an absolute URL") && !e.contains("hunter2"),
            "{e}"
        );
        let g: HttpGrant =
            serde_json::from_str(r#"{"urls": ["https://hooks.example.com/x/"]}"#).unwrap();
        assert_eq!(g.methods, vec![GrantMethod::Post]);
        assert!(!g.allow_private);
        assert!(serde_json::from_str::<HttpGrant>(r#"{"urls": [], "hosts": []}"#).is_err());
        // `urls` is required: a grant without it allows nothing rather than everything.
        let e = serde_json::from_str::<HttpGrant>(r#"{"methods": ["POST"]}"#).unwrap_err();
        assert!(e.to_string().contains("urls"), "{e}");
    }

    #[test]
    fn guest_headers_are_checked() {
        let h = |n: &str, v: &str| guest_headers(&[(n.to_string(), v.to_string())]);
        assert!(h("Content-Type", "application/json").is_ok());
        assert!(h("Authorization", "Bearer from-a-property").is_ok());
        for bad in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "Proxy-Authorization",
            "X-Forwarded-For",
        ] {
            assert!(h(bad, "x").is_err(), "{bad}");
        }
        assert!(h("X-Note", "a\r\nHost: evil").is_err());
    }

    #[test]
    fn forbidden_headers_are_refused_by_family() {
        for bad in [
            "Forwarded",
            "X-Forwarded-For",
            "x-forwarded-port",
            "X-Forwarded-Prefix",
            "X-FORWARDED-SERVER",
            "X-Forwarded-Ssl",
            "X-Real-IP",
            "X-Client-IP",
            "X-Originating-IP",
            "True-Client-IP",
            "CF-Connecting-IP",
            "X-Cluster-Client-IP",
            "Fastly-Client-IP",
            "Connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Connection",
            "Proxy-Anything",
            "Host",
            "Content-Length",
            "X-Original-URL",
            "X-Rewrite-URL",
            "X-HTTP-Method-Override",
            "X-HTTP-Method",
            "X-Method-Override",
            "Expect",
            "Via",
            "X-Host",
            "X-Remote-IP",
            "X-Remote-Addr",
            "host",
            "EXPECT",
        ] {
            assert!(forbidden_header(bad), "{bad}");
            assert!(
                guest_headers(&[(bad.to_string(), "x".to_string())]).is_err(),
                "{bad}"
            );
        }
        for ok in [
            "Content-Type",
            "Authorization",
            "X-Signature",
            "X-Forwarded", // not a member of X-Forwarded-*
            "Accept",
        ] {
            assert!(!forbidden_header(ok), "{ok}");
        }
    }

    /// Timeouts and body limits out of range are refused at start, each named with its
    /// range: zero would fail every call, no bound would let a server hold a place or the
    /// engine's memory.
    #[test]
    fn call_settings_out_of_range_are_refused_naming_the_key() {
        assert!(HttpClient::from_config(&HttpConfig::default()).is_ok());
        type Change = fn(&mut HttpConfig);
        let changes: [(&str, Change); 6] = [
            ("timeout_ms = 0", |c| c.timeout_ms = 0),
            ("timeout_ms = 18446744073709551615", |c| {
                c.timeout_ms = u64::MAX
            }),
            ("connect_timeout_ms = 0", |c| c.connect_timeout_ms = 0),
            ("max_request_bytes = 0", |c| c.max_request_bytes = 0),
            ("max_response_bytes = 0", |c| c.max_response_bytes = 0),
            ("max_response_bytes = 67108865", |c| {
                c.max_response_bytes = outbound::MAX_BODY_LIMIT_BYTES + 1
            }),
        ];
        for (named, change) in changes {
            let mut config = HttpConfig::default();
            change(&mut config);
            let err = HttpClient::from_config(&config).unwrap_err().to_string();
            assert!(
                err.contains(&format!("[http] {named} is out of range")),
                "{err}"
            );
        }
    }

    /// A request's name lookups draw on its grant's share: with the share held, the call
    /// waits and times out; with a share of its own, the same call is made (and refused by the
    /// closed port) at once.
    #[tokio::test]
    async fn requests_look_up_names_on_their_handlers_share() {
        let client = HttpClient::from_config(&HttpConfig {
            timeout_ms: 300,
            ..HttpConfig::default()
        })
        .unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let target = format!("http://localhost:{port}/hooks");
        let grant = HttpGrant::post_to(&[&target], true).unwrap();
        let request = || Request {
            method: crate::bindings::types::Method::Post,
            url: format!("{target}/a"),
            headers: vec![],
            body: None,
        };
        let held = grant.lookups.take_all();
        let waited = client.send(&grant, request()).await;
        assert!(
            matches!(waited, Err(CapabilityError::Timeout(_))),
            "{waited:?}"
        );
        let own = HttpGrant::post_to(&[&target], true).unwrap();
        let refused = client.send(&own, request()).await;
        assert!(
            matches!(refused, Err(CapabilityError::Failed(_))),
            "{refused:?}"
        );
        drop(held);
        let refused = client.send(&grant, request()).await;
        assert!(
            matches!(refused, Err(CapabilityError::Failed(_))),
            "{refused:?}"
        );
    }

    /// A destination whose TLS certificate the engine refuses is told to the handler with
    /// why, and that `[http]` has no CA setting — the engine trusts the system's roots.
    #[tokio::test]
    async fn a_refused_destination_certificate_says_http_has_no_ca_setting() {
        let (cert, key) = outbound::refused_tls::untrusted();
        let (port, server) = outbound::refused_tls::serve(&cert, &key).await;
        let client = HttpClient::from_config(&HttpConfig::default()).unwrap();
        let target = format!("https://127.0.0.1:{port}/hooks");
        let grant = HttpGrant::post_to(&[&target], true).unwrap();
        let request = Request {
            method: crate::bindings::types::Method::Post,
            url: format!("{target}/a?token=s3cret"),
            headers: vec![],
            body: None,
        };
        match client.send(&grant, request).await {
            Err(CapabilityError::Failed(m)) => {
                assert!(
                    m.contains("the server's TLS certificate is not issued by a certificate authority the engine trusts"),
                    "{m}"
                );
                assert!(m.contains("[http] has no CA setting"), "{m}");
                assert!(!m.contains("s3cret") && !m.contains("/hooks"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        server.abort();
    }

    #[test]
    fn traversal_forms_never_go_out() {
        for bad in [
            "https://h.example/hooks/..;/admin",
            "https://h.example/hooks/a;jsessionid=1",
            "https://h.example/hooks/%3b/admin",
            "https://h.example/hooks/a%2fb",
            "https://h.example/hooks/a%2Fb",
            "https://h.example/hooks/a%5cb",
            "https://h.example/hooks/a%5Cb",
            "https://h.example/hooks/%252e%252e/admin",
            "https://h.example/hooks/%c0%ae%c0%ae/admin",
            "https://h.example/hooks/%e0%80%ae/admin",
            "https://h.example/hooks/%ef%bc%8e%ef%bc%8e/admin",
            "https://h.example/hooks/%e2%88%95admin",
            "https://h.example/hooks/a%00b",
            "https://h.example/hooks/a%0d%0ab",
            "https://h.example/hooks\\admin",
            // Dots and spaces only: IIS trims the trailing ones and resolves what is left.
            "https://h.example/hooks/pki/..%20/admin",
            "https://h.example/hooks/pki/...",
            "https://h.example/hooks/pki/..%2e",
            "https://h.example/hooks/pki/%2e%2e%20/admin",
            "https://h.example/hooks/pki/%20../admin",
            "https://h.example/hooks/pki/.%20./admin",
            "https://h.example/hooks/pki/%20",
            // Empty segments: the prefix check would not see them; a server may.
            "https://h.example//hooks/dbl",
            "https://h.example/hooks//dbl",
            "https://h.example/hooks/dbl//",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(parse_url("https://h.example/").is_ok());
        assert!(parse_url("https://h.example").is_ok());
        assert!(parse_url("https://h.example/hooks/").is_ok());
        // Dot segments the parser resolves are judged resolved (the prefix check then applies).
        assert_eq!(url("https://h.example/hooks/%2e%2e/admin").path(), "/admin");
        assert_eq!(url("https://h.example/hooks/.%2E/admin").path(), "/admin");
        assert!(parse_url("https://h.example/hooks/T0/B0/x-y_z~1%20a?sig=a;b").is_ok());
        // Dots and spaces beside a name are a name.
        assert!(parse_url("https://h.example/hooks/v1.2/a./.b/%20x%20").is_ok());
    }

    proptest::proptest! {
        /// Whatever a guest puts in a path, what goes out has no segment that decodes to a
        /// separator, a dot segment, a `;`, a `%`, a control or a non-ASCII byte.
        #[test]
        fn accepted_paths_carry_no_traversal(segments in proptest::collection::vec(
            proptest::prop_oneof![
                "[a-z0-9]{1,6}",
                proptest::strategy::Just("/".to_string()),
                proptest::strategy::Just("..".to_string()),
                proptest::strategy::Just("..;".to_string()),
                proptest::strategy::Just("..%20".to_string()),
                proptest::strategy::Just(". .".to_string()),
                proptest::strategy::Just(";".to_string()),
                "%[0-9a-fA-F]{2}",
                "%25[0-9a-fA-F]{2}",
                "%[c-fC-F][0-9a-f]%[89ab][0-9a-f]",
                "\\PC{1,3}",
            ],
            1..6,
        )) {
            let raw = format!("https://h.example/{}", segments.concat());
            if let Ok(u) = parse_url(&raw) {
                proptest::prop_assert!(!u.path().contains("//"), "{}", u);
                for segment in u.path().split('/') {
                    let decoded: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
                    proptest::prop_assert!(decoded.is_ascii(), "{}", u);
                    proptest::prop_assert!(!decoded.iter().any(|b| b"/\\;%".contains(b) || b.is_ascii_control()), "{}", u);
                    proptest::prop_assert!(decoded.is_empty() || !decoded.iter().all(|b| b" .".contains(b)), "{}", u);
                }
            }
        }

        /// Every member of a forbidden family is refused, in any case.
        #[test]
        fn header_families_are_refused_in_any_case(
            family in 0usize..3,
            member in "[A-Za-z0-9-]{0,12}",
            upper in proptest::collection::vec(proptest::bool::ANY, 40),
        ) {
            let name = match family {
                0 => format!("X-Forwarded-{member}"),
                1 => format!("Proxy-{member}"),
                _ => format!("{member}-Client-IP"),
            };
            let name: String = name
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, u)| if *u { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                .collect();
            proptest::prop_assert!(forbidden_header(&name), "{}", name);
        }
    }
}
