//! `jobhook:handler/keyfactor`: requests to the Keyfactor Command API, made by the engine with
//! the engine's credentials, on behalf of a handler that never sees a host name or a secret.
//!
//! A call goes through these steps, and everything up to the send happens inside the engine:
//!
//! 1. the call budget ([`CallBudget`](crate::capabilities::gate::CallBudget); exceeding it traps the sandbox);
//! 2. the grant: the capability must be granted, and the method and the path must be in the
//!    handler's [`KeyfactorGrant`] (`not-granted` otherwise);
//! 3. the request: path and query checked and resolved under the base ([`path`]), headers from
//!    a small allow-list ([`GUEST_HEADERS`]), body within [`KeyfactorConfig::max_request_bytes`]
//!    (`denied` / `limit-exceeded` otherwise);
//! 4. the send: the engine adds `Authorization` ([`auth`]), `x-keyfactor-requested-with:
//!    APIClient`, `x-keyfactor-api-version`, `Accept`/`Content-Type: application/json`;
//!    redirects are never followed (a 3xx is returned to the handler as it is), the whole call
//!    has a timeout, and with OAuth a 401 retries once with a fresh token, at most one such
//!    refresh per [`auth::FORCED_REFRESH_INTERVAL`] (a handler cannot make the identity's token
//!    be replaced on every call);
//! 5. the response: read up to [`KeyfactorConfig::max_response_bytes`] and no further, only an
//!    allow-list of headers forwarded ([`forwarded_response_header`]), and every form of every
//!    identity's credential scrubbed from headers and body ([`KeyfactorClient::send`]).
//!
//! TLS uses rustls with the system's root certificates plus, optionally, an operator CA bundle
//! (`ca_bundle`) for a Keyfactor server with an internal CA. No proxy is used.

pub mod auth;
pub mod path;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use wasmtime::component::{HasSelf, Linker};

use self::auth::{Auth, AuthConfig, AuthConfigError};
use self::path::{ApiBase, ApiPath, BaseError, PathPrefix};
use crate::bindings::jobhook::handler::keyfactor::{Host, Request, add_to_linker};
use crate::bindings::types::{CapabilityError, Method, Response};
use crate::capabilities::gate::{Gate, Grantable, ServiceEnv};
pub use crate::capabilities::outbound::GrantMethod;
use crate::capabilities::outbound::{self, BodyError, RedactorSet};
use crate::log_limit::LogLimit;
use crate::secret::rebase;

/// Default per-call timeout. A Keyfactor API call normally answers in well under a second; 10 s
/// covers a slow JobHistory query and matches the default handler budget, which bounds the call
/// anyway.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest `timeout_ms` accepted. A call, connect to last body byte, ends within it, which is
/// what lets the engine forget a replaced OAuth token once [`auth::TOKEN_REMEMBERED_FOR`]
/// (longer than this) has passed: no response still in flight can carry it by then.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_millis(outbound::MAX_CALL_TIMEOUT_MS);

/// Default connect timeout: the Keyfactor server is on the operator's network.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default largest request body. Keyfactor request bodies (metadata updates, custom job fields)
/// are a few KiB; 1 MiB leaves room for a certificate import.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Default largest response body. `OrchestratorJobs/JobStatus/Data` can return up to 2 MB of
/// custom job data; 4 MiB fits that and a 1,000-row JobHistory page, and stays well inside a
/// handler's 64 MiB memory.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The API version sent when the handler does not ask for another (Keyfactor's default is v1).
pub const DEFAULT_API_VERSION: &str = "1";

/// Headers a handler may set on a Keyfactor request, lowercase. Everything else is refused:
/// `Authorization`, `Cookie`, `Host`, `X-Forwarded-*` and the rest are the engine's business.
/// `x-certificateformat` is how Keyfactor's API is asked for the format of a certificate it
/// returns (`POST Certificates/Recover`, `Certificates/Download`, `Enrollment/PFX`,
/// `Enrollment/CSR`).
pub const GUEST_HEADERS: &[&str] = &[
    "accept",
    "content-type",
    "x-keyfactor-api-version",
    "x-certificateformat",
];

/// The values Keyfactor documents for `x-certificateformat`, compared in any case (its own API
/// documentation spells one `Zip` in one version and `ZIP` in another). The union over the
/// endpoints that read the header, as Command's API specification lists them:
/// `Enrollment/CSR` PEM, DER; `Enrollment/PFX` PFX, Zip, STORE (and, in API version 2, PEM,
/// JKS, REPLACE); `Certificates/Recover` PFX, PEM; `Certificates/Download` DER, PEM, P7B. Which
/// one an endpoint accepts is Keyfactor's to answer; the engine only keeps the header to the
/// documented words, so that it cannot carry anything else.
pub const CERTIFICATE_FORMATS: &[&str] =
    &["PEM", "DER", "PFX", "Zip", "STORE", "P7B", "JKS", "REPLACE"];

/// Longest `x-keyfactor-api-version` value (`1`, `1.0`, `2.0` in practice).
const MAX_API_VERSION_BYTES: usize = 8;

/// What a handler is told when the engine has no keyfactor service configured.
const NOT_CONFIGURED: &str = "no Keyfactor API is configured for this engine";

/// What the handler is told instead of the base URL.
const WHAT: &str = "the Keyfactor API";

/// Where the operator fixes a Keyfactor API certificate the engine refused.
pub const TRUST: outbound::TrustSettings = outbound::TrustSettings {
    section: "[keyfactor]",
    ca_key: Some("ca_bundle"),
    name: "[keyfactor] base_url must name a host the certificate is issued for",
};

/// The `keyfactor` capability: the Keyfactor Command API proxy.
#[derive(Debug)]
pub struct Keyfactor;

impl Grantable for Keyfactor {
    const INTERFACE: &'static str = "keyfactor";
    const CALLS_LIMIT: &'static str = "keyfactor-calls";
    /// The documented samples make one or two calls; 20 allows a small paging loop and stops an
    /// API flood from one event.
    const DEFAULT_CALLS: u32 = 20;
    const NOT_CONFIGURED: &'static str = NOT_CONFIGURED;
    const CONFIG_KEY: &'static str = "[keyfactor] base_url";

    type Config = Option<KeyfactorConfig>;
    type Grant = KeyfactorGrant;
    type Service = KeyfactorClient;
    type ConfigError = KeyfactorConfigError;

    fn permissive_grant() -> KeyfactorGrant {
        KeyfactorGrant::permissive()
    }

    fn rebase(config: &mut Option<KeyfactorConfig>, base: &Path) {
        let Some(k) = config.as_mut() else {
            return;
        };
        k.ca_bundle = k.ca_bundle.as_ref().map(|p| base.join(p));
        for auth in std::iter::once(&mut k.auth).chain(k.identities.values_mut()) {
            match auth {
                AuthConfig::Basic { password, .. } => rebase(password, base),
                AuthConfig::Bearer { token } => rebase(token, base),
                AuthConfig::Oauth2 { client_secret, .. } => rebase(client_secret, base),
            }
        }
    }

    fn configured(config: &Option<KeyfactorConfig>) -> bool {
        config.is_some()
    }

    fn check_grant(config: &Option<KeyfactorConfig>, grant: &KeyfactorGrant) -> Result<(), String> {
        // An empty list would refuse every call the handler makes.
        if grant.paths.is_empty() {
            return Err(crate::capabilities::gate::empty_grant_list(
                "paths",
                "call",
                "list the path prefixes the handler may call, e.g. paths = [\"Certificates/\"] \
                 (\"*\" for every path), or remove [handlers.grants.keyfactor]",
            ));
        }
        if grant.methods.is_empty() {
            return Err(crate::capabilities::gate::empty_grant_list(
                "methods",
                "call",
                "list the methods the handler may use, e.g. methods = [\"GET\"], or leave \
                 methods out (GET)",
            ));
        }
        let Some(name) = &grant.identity else {
            return Ok(());
        };
        let known = config
            .as_ref()
            .map(|k| k.identities.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        if known.contains(name) {
            return Ok(());
        }
        Err(format!(
            "identity: {} is not a Keyfactor identity of this engine (configured under [keyfactor.identities]: {})",
            outbound::quote(name),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known
                    .iter()
                    .map(|k| outbound::quote(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))
    }

    fn service(
        config: &Option<KeyfactorConfig>,
        _env: &ServiceEnv,
    ) -> Result<Option<KeyfactorClient>, KeyfactorConfigError> {
        config
            .as_ref()
            .map(KeyfactorClient::from_config)
            .transpose()
    }

    fn add_to_linker<T: Send + 'static>(
        linker: &mut Linker<T>,
        get: fn(&mut T) -> &mut Gate<Self>,
    ) -> wasmtime::Result<()> {
        add_to_linker::<T, HasSelf<Gate<Self>>>(linker, get)
    }
}

/// The Keyfactor capability of one sandbox.
pub type KeyfactorCapability = Gate<Keyfactor>;

impl Host for Gate<Keyfactor> {
    async fn send(
        &mut self,
        request: Request,
    ) -> wasmtime::Result<Result<Response, CapabilityError>> {
        let under_way = self.under_way();
        let (grant, service) = match self.admit()? {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(Err(refused)),
        };
        under_way.start(&format!(
            "the Keyfactor API ({} {})",
            outbound::method_name(request.method),
            request.path
        ));
        let answer = service.send(grant, request).await;
        under_way.end();
        Ok(answer)
    }
}

fn default_methods() -> Vec<GrantMethod> {
    vec![GrantMethod::Get]
}

/// What one handler may do with the Keyfactor API:
///
/// ```toml
/// [handlers.grants.keyfactor]
/// methods = ["GET"]                               # default: ["GET"]
/// paths = ["OrchestratorJobs/", "Certificates/"]  # required; "*" for every path
/// identity = "pki-reader"                         # optional: a [keyfactor.identities.<name>]
/// ```
///
/// Paths are prefixes relative to the API base, matched per segment and ignoring case (see
/// [`PathPrefix`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyfactorGrant {
    /// Methods the handler may use.
    #[serde(default = "default_methods")]
    pub methods: Vec<GrantMethod>,
    /// Path prefixes the handler may call.
    pub paths: Vec<PathPrefix>,
    /// The Keyfactor identity the handler acts as: a name under `[keyfactor.identities]`.
    /// Without it the handler uses the engine's credential (`[keyfactor.auth]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl KeyfactorGrant {
    /// Every method on every path: what `jobhook run`, the author's harness, grants.
    pub fn permissive() -> Self {
        KeyfactorGrant {
            methods: GrantMethod::ALL.to_vec(),
            paths: vec![PathPrefix::any()],
            identity: None,
        }
    }

    /// `GET` on `paths` (convenient for tests and examples).
    pub fn read_only(paths: &[&str]) -> Result<Self, path::PathError> {
        Ok(KeyfactorGrant {
            methods: default_methods(),
            paths: paths
                .iter()
                .map(|p| PathPrefix::parse(p))
                .collect::<Result<_, _>>()?,
            identity: None,
        })
    }

    /// Why `method` on `path` is not granted, if it is not.
    fn refusal(&self, method: Method, path: &ApiPath) -> Option<String> {
        if !self.methods.contains(&GrantMethod::of(method)) {
            return Some(format!(
                "{} is not granted to this handler for the Keyfactor API (granted: {})",
                outbound::method_name(method),
                self.methods
                    .iter()
                    .map(|m| outbound::method_name(m.wit()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !self.paths.iter().any(|p| p.matches(path)) {
            return Some(format!(
                "path {} is not granted to this handler (granted prefixes: {})",
                outbound::quote(&path.to_string()),
                self.paths
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        None
    }
}

/// The engine's Keyfactor API settings (`[keyfactor]`):
///
/// ```toml
/// [keyfactor]
/// base_url = "https://command.example.com/KeyfactorAPI/"
/// api_version = "1"                     # default
/// ca_bundle = "/etc/jobhook/kf-ca.pem"  # optional, added to the system roots
/// timeout_ms = 10000                    # per call
///
/// [keyfactor.auth]
/// kind = "basic"
/// username = 'KFTRAIN\svc-jobhook'
/// password = { env = "KEYFACTOR_PASSWORD" }
///
/// # Optional named identities, for handlers that act as their own API identity
/// # ([handlers.grants.keyfactor] identity = "pki-reader"); same kinds as [keyfactor.auth].
/// [keyfactor.identities.pki-reader]
/// kind = "bearer"
/// token = { file = "/run/secrets/kf-pki-reader" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyfactorConfig {
    /// The API base, e.g. `https://command.example.com/KeyfactorAPI/`; a missing trailing `/` is
    /// added (the base is always a directory). https only, except loopback http.
    pub base_url: String,
    /// Sent as `x-keyfactor-api-version` unless the handler asks for another.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// The engine's credentials: what a handler whose grant names no identity acts as.
    pub auth: AuthConfig,
    /// Named credentials a handler's grant can pick (`identity = "<name>"`), so that each
    /// handler acts as its own Keyfactor API identity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identities: BTreeMap<String, AuthConfig>,
    /// A PEM file of extra CA certificates to trust besides the system's.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// Per-call timeout, connect to last body byte, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connect timeout in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Largest request body a handler may send.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Largest response body read; a larger answer is `limit-exceeded`.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

fn default_api_version() -> String {
    DEFAULT_API_VERSION.into()
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT.as_millis() as u64
}
fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT.as_millis() as u64
}
fn default_max_request_bytes() -> usize {
    DEFAULT_MAX_REQUEST_BYTES
}
fn default_max_response_bytes() -> usize {
    DEFAULT_MAX_RESPONSE_BYTES
}

impl KeyfactorConfig {
    /// Settings with every default, for `base_url` and `auth`.
    pub fn new(base_url: impl Into<String>, auth: AuthConfig) -> Self {
        KeyfactorConfig {
            base_url: base_url.into(),
            api_version: default_api_version(),
            auth,
            identities: BTreeMap::new(),
            ca_bundle: None,
            timeout_ms: default_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// Why the `[keyfactor]` configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyfactorConfigError {
    /// The base URL.
    #[error("[keyfactor] base_url: {0}")]
    Base(#[from] BaseError),
    /// The API version.
    #[error("[keyfactor] api_version {0:?} must be a version number such as \"1\" or \"2.0\"")]
    ApiVersion(String),
    /// The credentials.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// The credentials of a named identity.
    #[error("[keyfactor.identities.{name}]: {source}")]
    Identity {
        /// The identity.
        name: String,
        /// What is wrong with its credentials.
        source: AuthConfigError,
    },
    /// The CA bundle.
    #[error("[keyfactor] ca_bundle {path}: {reason}")]
    CaBundle {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A timeout or body limit out of its range ([`outbound::check_call_settings`]; a call's
    /// timeout at most [`MAX_CALL_TIMEOUT`]).
    #[error("{0}")]
    OutOfRange(String),
    /// The HTTP client could not be built.
    #[error("cannot build the Keyfactor HTTP client: {0}")]
    Client(String),
}

/// The engine-wide Keyfactor API client, shared by every sandbox.
///
/// Every response any handler receives is scrubbed of every identity's credential, its own or
/// another's (see [`send`](Self::send) for why a token fetched meanwhile is included).
#[derive(Debug)]
pub struct KeyfactorClient {
    base: ApiBase,
    api_version: HeaderValue,
    auth: Auth,
    identities: BTreeMap<String, Auth>,
    /// Every form of every credential known from the configuration (passwords, Basic pairs,
    /// static tokens, OAuth client secrets) of `auth` and every identity: they are fixed when
    /// the client is built, so this is built once with it, not per call.
    static_redactor: RedactorSet,
    http: reqwest::Client,
    max_request_bytes: usize,
    max_response_bytes: usize,
}

impl KeyfactorClient {
    /// Builds the client: checks the base, resolves the secrets, loads the CA bundle.
    pub fn from_config(config: &KeyfactorConfig) -> Result<Self, KeyfactorConfigError> {
        let auth = Auth::from_config(&config.auth)?;
        let mut identities = BTreeMap::new();
        for (name, identity) in &config.identities {
            let identity =
                Auth::from_config(identity).map_err(|source| KeyfactorConfigError::Identity {
                    // The operator's key, shown as the configuration would quote it.
                    name: crate::escape::escape(name).into_owned(),
                    source,
                })?;
            identities.insert(name.clone(), identity);
        }
        Self::build(config, auth, identities)
    }

    /// Builds the client with credentials the program already holds (`config.auth` and
    /// `config.identities` are not used), e.g. the stand-in's for `jobhook-dev run
    /// --keyfactor-standin`.
    pub fn with_auth(config: &KeyfactorConfig, auth: Auth) -> Result<Self, KeyfactorConfigError> {
        Self::build(config, auth, BTreeMap::new())
    }

    fn build(
        config: &KeyfactorConfig,
        auth: Auth,
        identities: BTreeMap<String, Auth>,
    ) -> Result<Self, KeyfactorConfigError> {
        let base = ApiBase::parse(&config.base_url)?;
        if !valid_api_version(&config.api_version) {
            return Err(KeyfactorConfigError::ApiVersion(config.api_version.clone()));
        }
        let api_version = HeaderValue::from_str(&config.api_version)
            .map_err(|_| KeyfactorConfigError::ApiVersion(config.api_version.clone()))?;
        outbound::check_call_settings(
            "[keyfactor]",
            &[
                ("timeout_ms", config.timeout_ms),
                ("connect_timeout_ms", config.connect_timeout_ms),
            ],
            &[
                ("max_request_bytes", config.max_request_bytes),
                ("max_response_bytes", config.max_response_bytes),
            ],
        )
        .map_err(KeyfactorConfigError::OutOfRange)?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .referer(false)
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .user_agent(concat!("jobhook/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_bundle {
            for cert in load_ca_bundle(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| KeyfactorConfigError::Client(e.to_string()))?;
        let mut static_redactor = RedactorSet::new();
        for credential in std::iter::once(&auth).chain(identities.values()) {
            static_redactor.push(credential.static_redactor());
        }
        Ok(KeyfactorClient {
            base,
            api_version,
            auth,
            identities,
            static_redactor,
            http,
            max_request_bytes: config.max_request_bytes,
            max_response_bytes: config.max_response_bytes,
        })
    }

    /// The API base every path is resolved against.
    pub fn base_url(&self) -> &url::Url {
        self.base.url()
    }

    /// Checks `request` against `grant` and the engine's rules, sends it with the engine's
    /// credentials and returns the bounded, scrubbed response.
    ///
    /// The response is scrubbed of every identity's credential ([`redactor`](Self::redactor)),
    /// and the OAuth access tokens in it are looked up only after the last byte of the body has
    /// been read. That keeps the guarantee without making one handler's call wait for another
    /// identity's token fetch: a fetched token goes on its identity's list before it is handed
    /// to any call, so before any server can have received it from this engine; a server can
    /// put a token into this response only before the response's last byte; so every token it
    /// could have learnt from this engine and echoed here — including one fetched by another
    /// handler's call while this one was waiting for its answer — is on a list when the lists
    /// are read. A fetch still in flight at that moment holds a token no server has received
    /// from this engine yet.
    pub async fn send(
        &self,
        grant: &KeyfactorGrant,
        request: Request,
    ) -> Result<Response, CapabilityError> {
        self.send_with_location(grant, request)
            .await
            .map(|(response, _)| response)
    }

    /// [`send`](Self::send) for the engine's own callers (the poller, `jobhook job-types`):
    /// also the `Location` the server answered, whole (scrubbed like the rest, `None` when it
    /// gave none). A handler is never told the API's host, so its response keeps a `Location`
    /// below the base only; the operator, who configured that host, is told where a redirection
    /// pointed, whatever it names.
    pub async fn send_with_location(
        &self,
        grant: &KeyfactorGrant,
        request: Request,
    ) -> Result<(Response, Option<String>), CapabilityError> {
        let path =
            ApiPath::parse(&request.path).map_err(|e| CapabilityError::Denied(e.to_string()))?;
        if let Some(reason) = grant.refusal(request.method, &path) {
            return Err(CapabilityError::NotGranted(reason));
        }
        let url = self
            .base
            .resolve(&path, &request.query)
            .map_err(|e| CapabilityError::Denied(e.to_string()))?;
        let headers = self.request_headers(&request.headers)?;
        if let Some(body) = &request.body
            && body.len() > self.max_request_bytes
        {
            return Err(CapabilityError::LimitExceeded(format!(
                "the request body is {} bytes; the limit is {} bytes",
                body.len(),
                self.max_request_bytes
            )));
        }

        let auth = match &grant.identity {
            None => &self.auth,
            Some(name) => self.identities.get(name).ok_or_else(|| {
                CapabilityError::NotAvailable(format!(
                    "the Keyfactor identity {} of this handler's grant is not configured for this engine",
                    outbound::quote(name)
                ))
            })?,
        };
        let method = outbound::method(request.method);
        let started = Instant::now();
        let mut retried = false;
        let response = loop {
            let authorization = auth.authorization(&self.http).await?;
            let mut builder = self
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .header(header::AUTHORIZATION, authorization.clone());
            if let Some(body) = &request.body {
                builder = builder.body(body.clone());
            }
            let response = builder.send().await.map_err(|e| {
                static FAILED: LogLimit = LogLimit::new(outbound::FAILURE_LOG_INTERVAL);
                let answer = outbound::transport_error(&e, WHAT, &TRUST);
                outbound::log_failure(&FAILED, e, &path, "Keyfactor API call failed", &TRUST);
                answer
            })?;
            if response.status() == reqwest::StatusCode::UNAUTHORIZED
                && !retried
                && auth.rejected(&authorization).await
            {
                // An OAuth token can be revoked or expire early: fetch a fresh one, once.
                retried = true;
                continue;
            }
            break response;
        };
        let status = response.status().as_u16();
        let received_headers = response.headers().clone();
        let body = outbound::read_body(response, self.max_response_bytes).await;
        // Only now, with the whole answer in hand, which tokens to scrub (see above).
        let redactor = self.redactor();
        let mut headers =
            outbound::response_headers(&received_headers, forwarded_response_header, &redactor);
        let location = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("location"))
            .map(|(_, value)| value.clone());
        // The handler never sees the API's host: an absolute `Location` becomes the path below
        // the base, as the handler names paths; one elsewhere is dropped.
        headers.retain_mut(|(name, value)| {
            if !name.eq_ignore_ascii_case("location") {
                return true;
            }
            match location_for_guest(value, self.base_url()) {
                Some(shown) => {
                    *value = shown;
                    true
                }
                None => false,
            }
        });
        let body = match body {
            Ok(body) => redactor.redact(body),
            Err(BodyError::TooLarge) => {
                return Err(CapabilityError::LimitExceeded(format!(
                    "the Keyfactor API response is larger than {} bytes",
                    self.max_response_bytes
                )));
            }
            Err(BodyError::Transport(e)) => {
                static BROKE_OFF: LogLimit = LogLimit::new(outbound::FAILURE_LOG_INTERVAL);
                let answer = outbound::transport_error(&e, WHAT, &TRUST);
                let what = if e.is_timeout() {
                    "Keyfactor API response did not finish within [keyfactor] timeout_ms"
                } else {
                    "Keyfactor API response broke off"
                };
                outbound::log_failure(&BROKE_OFF, e, &path, what, &TRUST);
                return Err(answer);
            }
        };
        // The length the guest sees is that of what it gets, never the server's (which, after
        // a redaction, would tell how long the credential was).
        outbound::set_content_length(&mut headers, &body);
        tracing::debug!(
            method = %method,
            path = %path,
            status,
            ms = started.elapsed().as_millis() as u64,
            "Keyfactor API call"
        );
        Ok((
            Response {
                status,
                headers,
                body,
            },
            location,
        ))
    }

    /// What no handler may receive: every identity's credential, its own or another's — the
    /// configured ones (built once) and the OAuth access tokens every identity holds or
    /// recently held, as they are now. Never waits for a token fetch.
    fn redactor(&self) -> RedactorSet {
        let mut redactor = self.static_redactor.clone();
        for credential in std::iter::once(&self.auth).chain(self.identities.values()) {
            credential.token_redactors(&mut redactor);
        }
        redactor
    }

    /// The engine's headers with the handler's allow-listed ones applied over them.
    fn request_headers(&self, guest: &[(String, String)]) -> Result<HeaderMap, CapabilityError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("x-keyfactor-requested-with"),
            HeaderValue::from_static("APIClient"),
        );
        headers.insert(
            HeaderName::from_static("x-keyfactor-api-version"),
            self.api_version.clone(),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if guest.len() > outbound::MAX_REQUEST_HEADERS {
            return Err(CapabilityError::Denied(format!(
                "more than {} headers",
                outbound::MAX_REQUEST_HEADERS
            )));
        }
        for (name, value) in guest {
            let (name, value) = outbound::check_header(name, value)
                .map_err(|e| CapabilityError::Denied(e.to_string()))?;
            if !GUEST_HEADERS.contains(&name.as_str()) {
                return Err(CapabilityError::Denied(format!(
                    "header {} may not be set by a handler; the Keyfactor capability accepts only {} (authentication is the engine's)",
                    name.as_str(),
                    GUEST_HEADERS.join(", ")
                )));
            }
            if name.as_str() == "x-keyfactor-api-version"
                && !value.to_str().is_ok_and(valid_api_version)
            {
                return Err(CapabilityError::Denied(
                    "x-keyfactor-api-version must be a version number such as 1 or 2.0".into(),
                ));
            }
            if name.as_str() == "x-certificateformat"
                && !value.to_str().is_ok_and(|v| {
                    CERTIFICATE_FORMATS
                        .iter()
                        .any(|f| f.eq_ignore_ascii_case(v))
                })
            {
                return Err(CapabilityError::Denied(format!(
                    "x-certificateformat must be one of {}",
                    CERTIFICATE_FORMATS.join(", ")
                )));
            }
            headers.insert(name, value);
        }
        Ok(headers)
    }
}

/// Whether `v` looks like an API version: digits and dots, short.
fn valid_api_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_API_VERSION_BYTES
        && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && v.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

/// Response headers handed to the handler: what describes the content, paging and caching, and
/// Keyfactor's own `x-keyfactor-*`; never `Set-Cookie`, `WWW-Authenticate` or anything else a
/// server might use to send credentials or session state back.
pub fn forwarded_response_header(name: &str) -> bool {
    const FORWARDED: &[&str] = &[
        "content-type",
        "content-length",
        "content-language",
        "date",
        "etag",
        "last-modified",
        "location",
        "retry-after",
        "x-total-count",
    ];
    let name = name.to_ascii_lowercase();
    FORWARDED.contains(&name.as_str()) || name.starts_with("x-keyfactor-")
}

/// What an answer that redirects adds to its error, for the operator: where it pointed (the
/// `Location` as [`KeyfactorClient::send_with_location`] gives it, quoted and escaped, without
/// any user information), that redirections are not followed, and what to check — Command does
/// not redirect its API; a `[keyfactor] base_url` of `http://` for an `https://` site, or
/// without `/KeyfactorAPI/`, is redirected.
pub fn redirect_note(location: Option<&str>) -> String {
    let to = match location {
        Some(location) => format!(
            " to {}",
            outbound::quote(&outbound::without_credentials(location))
        ),
        None => " without a Location".to_owned(),
    };
    format!(
        " (a redirection{to}; redirections are not followed: is [keyfactor] base_url the API's \
         own address, https and ending in /KeyfactorAPI/?)"
    )
}

/// What an answer of 401 or 403 from the Keyfactor API adds to its error, for the operator: for
/// 401 the setting that holds the credential, and what makes IIS refuse a right one (Basic
/// authentication not enabled on the `KeyfactorAPI` application: docs/CAPABILITIES.md); for 403
/// that setting and the account's permissions in Command, with `permission` — the one the call
/// needs, where Keyfactor documents it — in parentheses. Empty for any other status.
/// `jobhook job-types` and the JobHistory poller both say it, so that their words cannot drift
/// apart.
pub fn refusal_hint(status: u16, permission: Option<&str>) -> String {
    match status {
        401 => "; the Keyfactor API refused the credential: check [keyfactor.auth] (with kind = \
                \"basic\", Basic authentication must be enabled on the KeyfactorAPI application \
                in IIS)"
            .to_owned(),
        403 => format!(
            "; the Keyfactor API refused this account the request: check [keyfactor.auth] and \
             the account's permissions in Command{}",
            permission.map_or_else(String::new, |p| format!(" ({p})"))
        ),
        _ => String::new(),
    }
}

/// A base no `Location` names: a relative reference resolved against it keeps its host only if
/// it names none.
const RELATIVE_PROBE: &str = "https://relative.invalid/";

/// What a handler is shown of a response's `Location`: a relative reference as it is (it names
/// no host); an absolute one below the API base as the path below it (`/Certificates/5`, as the
/// handler names paths); an absolute one anywhere else — another host, another scheme, above
/// the base — not at all, since it would tell the handler a host name it is never given.
fn location_for_guest(value: &str, base: &url::Url) -> Option<String> {
    let absolute = match url::Url::parse(value) {
        Ok(url) => url,
        // No scheme: relative, shown as it is unless it names a host all the same — `//host`,
        // and what a URL parser reads alike (`\\host`, `/\host`, after spaces or tabs).
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            let probe = url::Url::parse(RELATIVE_PROBE).ok()?;
            let resolved = probe.join(value).ok()?;
            return (resolved.origin() == probe.origin()).then(|| value.to_owned());
        }
        Err(_) => return None,
    };
    if absolute.origin() != base.origin() {
        return None;
    }
    let below = absolute.path().strip_prefix(base.path())?;
    let mut shown = format!("/{below}");
    if let Some(query) = absolute.query() {
        shown.push('?');
        shown.push_str(query);
    }
    Some(shown)
}

/// Largest `[keyfactor] ca_bundle` read: an internal CA's chain is a few KiB, a system's whole
/// bundle a few hundred.
const MAX_CA_BUNDLE_BYTES: u64 = 1024 * 1024;

fn load_ca_bundle(
    path: &std::path::Path,
) -> Result<Vec<reqwest::Certificate>, KeyfactorConfigError> {
    let error = |reason: String| KeyfactorConfigError::CaBundle {
        path: path.to_owned(),
        reason,
    };
    let pem = crate::files::read_regular(path, MAX_CA_BUNDLE_BYTES).map_err(|e| match e {
        crate::files::ReadError::TooLarge(_) => error(format!(
            "the file holds more than {MAX_CA_BUNDLE_BYTES} bytes; a bundle of certificates is \
             far smaller"
        )),
        e => error(e.to_string()),
    })?;
    // A byte-order mark (a Windows editor's UTF-8) would hide the first certificate from the
    // PEM reader, which looks for "-----BEGIN" at the start of a line: one CA lost silently.
    let pem = pem.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&pem);
    let certs = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| error(format!("not a PEM certificate bundle ({e})")))?;
    if certs.is_empty() {
        return Err(error("the file holds no PEM certificate".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_never_names_the_apis_host() {
        let base = url::Url::parse("https://kf.example.com/KeyfactorAPI/").unwrap();
        for (sent, shown) in [
            (
                "https://kf.example.com/KeyfactorAPI/Certificates/5",
                Some("/Certificates/5"),
            ),
            (
                "https://KF.example.com:443/KeyfactorAPI/Certificates?id=5",
                Some("/Certificates?id=5"),
            ),
            (
                "/KeyfactorAPI/Certificates/5",
                Some("/KeyfactorAPI/Certificates/5"),
            ),
            ("Certificates/5", Some("Certificates/5")),
            ("https://kf.example.com/Other/5", None),
            ("http://kf.example.com/KeyfactorAPI/Certificates/5", None),
            ("https://evil.example/KeyfactorAPI/Certificates/5", None),
            ("//kf.example.com/KeyfactorAPI/Certificates/5", None),
            ("https://kf.example.com:8443/KeyfactorAPI/x", None),
            // Other spellings of the API's own address.
            ("HTTPS://kf.example.com/KeyfactorAPI/x", Some("/x")),
            ("https://user:pw@kf.example.com/KeyfactorAPI/x", Some("/x")),
            ("https:\\\\kf.example.com\\KeyfactorAPI\\x", Some("/x")),
            // Only starts with the base's text, leaves it, or hides its `/`.
            ("https://kf.example.com/KeyfactorAPIX/x", None),
            ("https://kf.example.com/KeyfactorAPI", None),
            ("https://kf.example.com/KeyfactorAPI/../Other/5", None),
            ("https://kf.example.com/KeyfactorAPI/%2e%2e/Other/5", None),
            ("https://kf.example.com/KeyfactorAPI%2FCertificates", None),
            // Relative references that name a host all the same.
            ("\\\\kf.example.com\\KeyfactorAPI\\x", None),
            ("/\\kf.example.com/KeyfactorAPI/x", None),
            ("\\/kf.example.com/KeyfactorAPI/x", None),
            ("\t//kf.example.com/KeyfactorAPI/x", None),
            (" //kf.example.com/KeyfactorAPI/x", None),
            ("//evil.example/x", None),
        ] {
            assert_eq!(location_for_guest(sent, &base).as_deref(), shown, "{sent}");
        }
        let base = url::Url::parse("https://[2001:db8::1]/KeyfactorAPI/").unwrap();
        for (sent, shown) in [
            ("https://[2001:db8:0::1]:443/KeyfactorAPI/x", Some("/x")),
            ("https://[2001:db8::2]/KeyfactorAPI/x", None),
            ("//[2001:db8::1]/KeyfactorAPI/x", None),
        ] {
            assert_eq!(location_for_guest(sent, &base).as_deref(), shown, "{sent}");
        }
    }

    /// A bundle saved by a Windows editor (a byte-order mark, CRLF) keeps every certificate:
    /// the mark would hide the first from the PEM reader.
    #[test]
    fn a_ca_bundle_with_a_byte_order_mark_keeps_its_first_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (
            jobhook_testkit::tls::TestCa::new("one"),
            jobhook_testkit::tls::TestCa::new("two"),
        );
        let path = dir.path().join("bundle.pem");
        let text = format!("\u{feff}{}{}", one.cert_pem, two.cert_pem).replace('\n', "\r\n");
        std::fs::write(&path, text).unwrap();
        assert_eq!(load_ca_bundle(&path).unwrap().len(), 2);
    }

    /// A device (which never ends) is refused as not a file; a file past the limit at the
    /// limit.
    #[cfg(unix)]
    #[test]
    fn a_ca_bundle_that_never_ends_or_is_too_large_is_refused() {
        let e = load_ca_bundle(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(
            e.to_string().contains("is a device, not a regular file"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let large = dir.path().join("bundle.pem");
        std::fs::write(&large, vec![b'A'; MAX_CA_BUNDLE_BYTES as usize + 1]).unwrap();
        let e = load_ca_bundle(&large).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("holds more than {MAX_CA_BUNDLE_BYTES} bytes")),
            "{e}"
        );
    }

    #[test]
    fn grants_parse_with_defaults_and_refuse_unknown_keys() {
        let g: KeyfactorGrant =
            serde_json::from_str(r#"{"paths": ["OrchestratorJobs/", "Certificates/"]}"#).unwrap();
        assert_eq!(g.methods, vec![GrantMethod::Get]);
        assert_eq!(g.paths.len(), 2);
        let g: KeyfactorGrant =
            serde_json::from_str(r#"{"methods": ["get", "POST"], "paths": ["*"]}"#).unwrap();
        assert_eq!(g.methods, vec![GrantMethod::Get, GrantMethod::Post]);
        assert!(serde_json::from_str::<KeyfactorGrant>(r#"{"methods": ["GET"]}"#).is_err());
        assert!(serde_json::from_str::<KeyfactorGrant>(r#"{"paths": [], "path": []}"#).is_err());
        assert!(
            serde_json::from_str::<KeyfactorGrant>(r#"{"methods": ["TRACE"], "paths": []}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<KeyfactorGrant>(r#"{"paths": ["../x"]}"#).is_err());
        let g: KeyfactorGrant =
            serde_json::from_str(r#"{"paths": ["*"], "identity": "pki-reader"}"#).unwrap();
        assert_eq!(g.identity.as_deref(), Some("pki-reader"));
    }

    #[test]
    fn grants_name_only_configured_identities() {
        let mut config: KeyfactorConfig = serde_json::from_str(
            r#"{"base_url": "https://kf/KeyfactorAPI", "auth": {"kind": "bearer", "token": {"env": "T"}},
                "identities": {"pki-reader": {"kind": "bearer", "token": {"env": "R"}}}}"#,
        )
        .unwrap();
        let mut grant = KeyfactorGrant::permissive();
        assert!(Keyfactor::check_grant(&Some(config.clone()), &grant).is_ok());
        grant.identity = Some("pki-reader".into());
        assert!(Keyfactor::check_grant(&Some(config.clone()), &grant).is_ok());
        grant.identity = Some("pki-writer".into());
        let why = Keyfactor::check_grant(&Some(config.clone()), &grant).unwrap_err();
        assert!(
            why.contains("\"pki-writer\"") && why.contains("pki-reader"),
            "{why}"
        );
        config.identities.clear();
        assert!(Keyfactor::check_grant(&Some(config), &grant).is_err());
        assert!(Keyfactor::check_grant(&None, &grant).is_err());
    }

    #[test]
    fn grant_refusals_name_what_is_granted() {
        let g = KeyfactorGrant::read_only(&["OrchestratorJobs/"]).unwrap();
        let p = ApiPath::parse("Agents/1").unwrap();
        let why = g.refusal(Method::Get, &p).unwrap();
        assert!(
            why.contains("\"Agents/1\"") && why.contains("OrchestratorJobs/"),
            "{why}"
        );
        let p = ApiPath::parse("OrchestratorJobs/JobHistory").unwrap();
        assert_eq!(g.refusal(Method::Get, &p), None);
        let why = g.refusal(Method::Delete, &p).unwrap();
        assert!(why.starts_with("DELETE is not granted"), "{why}");
    }

    #[test]
    fn config_parses_with_defaults() {
        let c: KeyfactorConfig = serde_json::from_str(
            r#"{"base_url": "https://kf/KeyfactorAPI", "auth": {"kind": "bearer", "token": {"env": "T"}}}"#,
        )
        .unwrap();
        assert_eq!(c.api_version, "1");
        assert_eq!(c.timeout_ms, 10_000);
        assert_eq!(c.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
        assert!(serde_json::from_str::<KeyfactorConfig>(r#"{"base_url": "https://kf/", "auth": {"kind": "bearer", "token": {"env": "T"}}, "proxy": "x"}"#).is_err());
    }

    #[test]
    fn ca_bundles_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "this is not a certificate").unwrap();
        let missing = dir.path().join("missing.pem");
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken-value").unwrap();
        for bundle in [not_pem, missing] {
            let mut config = KeyfactorConfig::new(
                "https://kf.example.com/KeyfactorAPI/",
                AuthConfig::Bearer {
                    token: crate::secret::SecretRef::File(token.clone()),
                },
            );
            config.ca_bundle = Some(bundle.clone());
            let err = KeyfactorClient::from_config(&config).unwrap_err();
            assert!(
                matches!(err, KeyfactorConfigError::CaBundle { .. }),
                "{bundle:?}: {err}"
            );
            assert!(err.to_string().contains("ca_bundle"), "{err}");
        }
    }

    /// A call may wait at most [`MAX_CALL_TIMEOUT`]: the redactor forgets a replaced OAuth
    /// token only after that long, so a longer call could receive one it no longer knows.
    #[test]
    fn call_timeouts_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken-value").unwrap();
        let config = |timeout_ms: u64| {
            let mut c = KeyfactorConfig::new(
                "https://kf.example.com/KeyfactorAPI/",
                AuthConfig::Bearer {
                    token: crate::secret::SecretRef::File(token.clone()),
                },
            );
            c.timeout_ms = timeout_ms;
            c
        };
        let longest = u64::try_from(MAX_CALL_TIMEOUT.as_millis()).unwrap();
        assert!(KeyfactorClient::from_config(&config(longest)).is_ok());
        for bad in [0, longest + 1, u64::MAX] {
            let err = KeyfactorClient::from_config(&config(bad)).unwrap_err();
            assert!(
                matches!(err, KeyfactorConfigError::OutOfRange(_)),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("[keyfactor] timeout_ms"), "{err}");
            assert!(err.to_string().contains("600000"), "{err}");
        }
        // The connect timeout and both body limits are bounded too, each named: a zero limit
        // would fail every call, an unbounded one let a server's answer take the memory.
        type Change = fn(&mut KeyfactorConfig);
        let changes: [(&str, Change); 5] = [
            ("connect_timeout_ms = 0", |c| c.connect_timeout_ms = 0),
            ("connect_timeout_ms = 18446744073709551615", |c| {
                c.connect_timeout_ms = u64::MAX
            }),
            ("max_request_bytes = 0", |c| c.max_request_bytes = 0),
            ("max_response_bytes = 0", |c| c.max_response_bytes = 0),
            ("max_response_bytes = 18446744073709551615", |c| {
                c.max_response_bytes = usize::MAX
            }),
        ];
        for (named, change) in changes {
            let mut c = config(10_000);
            change(&mut c);
            let err = KeyfactorClient::from_config(&c).unwrap_err().to_string();
            assert!(
                err.contains(&format!("[keyfactor] {named} is out of range")),
                "{err}"
            );
        }
    }

    /// A Keyfactor API whose TLS certificate the engine refuses is told to the handler (and,
    /// through [`outbound::log_failure`], to the log) with the setting that fixes it.
    #[tokio::test]
    async fn a_refused_api_certificate_names_ca_bundle() {
        let (cert, key) = outbound::refused_tls::untrusted();
        let (port, server) = outbound::refused_tls::serve(&cert, &key).await;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken-value").unwrap();
        let client = KeyfactorClient::from_config(&KeyfactorConfig::new(
            format!("https://127.0.0.1:{port}/KeyfactorAPI/"),
            AuthConfig::Bearer {
                token: crate::secret::SecretRef::File(token),
            },
        ))
        .unwrap();
        let request = Request {
            method: Method::Get,
            path: "Certificates/14".into(),
            query: vec![],
            headers: vec![],
            body: None,
        };
        match client.send(&KeyfactorGrant::permissive(), request).await {
            Err(CapabilityError::Failed(m)) => {
                assert!(
                    m.starts_with("cannot connect to the Keyfactor API: the server's TLS certificate is not issued by a certificate authority the engine trusts"),
                    "{m}"
                );
                assert!(m.contains("[keyfactor] ca_bundle"), "{m}");
                assert!(!m.contains("127.0.0.1") && !m.contains("t0ken"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        server.abort();
    }

    /// Every format Keyfactor documents for `x-certificateformat` passes, in any case, and
    /// anything else is still denied.
    #[test]
    fn certificate_formats_are_the_documented_ones() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken-value").unwrap();
        let client = KeyfactorClient::from_config(&KeyfactorConfig::new(
            "https://kf.example.com/KeyfactorAPI/",
            AuthConfig::Bearer {
                token: crate::secret::SecretRef::File(token),
            },
        ))
        .unwrap();
        let with = |value: &str| {
            client.request_headers(&[("X-CertificateFormat".to_owned(), value.to_owned())])
        };
        for ok in [
            "PEM", "DER", "PFX", "Zip", "ZIP", "STORE", "store", "P7B", "JKS", "REPLACE", "pfx",
        ] {
            let headers = with(ok).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
            assert_eq!(
                headers.get("x-certificateformat").map(|v| v.to_str().ok()),
                Some(Some(ok)),
                "{ok}"
            );
        }
        for bad in ["CER", "P12", "PEM, PFX", "", " PFX", "ZIPX", "Zi"] {
            match with(bad) {
                Err(CapabilityError::Denied(m)) => {
                    assert!(m.contains("DER, PFX, Zip, STORE"), "{bad}: {m}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn api_versions() {
        for ok in ["1", "1.0", "2.0"] {
            assert!(valid_api_version(ok));
        }
        for bad in ["", "v1", ".1", "1\r\n", "123456789"] {
            assert!(!valid_api_version(bad), "{bad}");
        }
    }

    #[test]
    fn only_safe_response_headers_are_forwarded() {
        for keep in [
            "Content-Type",
            "Content-Language",
            "Date",
            "ETag",
            "Last-Modified",
            "Retry-After",
            "x-keyfactor-product-version",
            "Location",
            "X-Total-Count",
        ] {
            assert!(forwarded_response_header(keep), "{keep}");
        }
        for drop in [
            "set-cookie",
            "www-authenticate",
            "authorization",
            "x-echo-authorization",
            "proxy-authenticate",
            // Length and digest headers describe the body before redaction.
            "content-range",
            "content-md5",
            "digest",
            "content-digest",
            "repr-digest",
            "x-original-content-length",
        ] {
            assert!(!forwarded_response_header(drop), "{drop}");
        }
    }
}
