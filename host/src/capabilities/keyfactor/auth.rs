//! The engine's credentials for the Keyfactor API: HTTP Basic (`DOMAIN\user` + password, for
//! an AD identity provider), a static Bearer token, or OAuth 2.0 client credentials (Keyfactor
//! Command with an OAuth identity provider), with the token cached and refreshed.
//!
//! The guest never sees any of it: the `Authorization` header is added after all guest input
//! has been checked, and [`Auth::static_redactor`] and [`Auth::token_redactors`] list every
//! form in which a credential could come back in a response, so the capability can scrub it.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use url::Url;

use super::path::is_loopback_host;
use crate::bindings::types::CapabilityError;
use crate::capabilities::outbound::{self, Redactor, RedactorSet};
use crate::secret::{Secret, SecretError, SecretRef};

/// Refresh a cached token this long before the identity provider says it expires, so a token
/// never expires between being picked and reaching Keyfactor (clock skew, slow requests).
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Lifetime assumed when the token response has no `expires_in`. Short, so a token of unknown
/// life is not used for long; a 401 also forces a refresh.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Longest a token is used, whatever `expires_in` says. Identity providers issue client
/// credentials tokens for minutes to hours; a larger number (a misconfigured or hostile server
/// answering "forever", up to 2⁶⁴ − 1 seconds, which would overflow the engine's clock
/// arithmetic) is held to a day, after which the engine asks again.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// A token's lifetime from the token response's `expires_in` (seconds; absent: the default),
/// at most [`MAX_TOKEN_LIFETIME`].
fn token_lifetime(expires_in: Option<u64>) -> Duration {
    expires_in
        .map(|s| Duration::from_secs(s.min(MAX_TOKEN_LIFETIME.as_secs())))
        .unwrap_or(DEFAULT_TOKEN_LIFETIME)
}

/// How long a token of `lifetime` is used before it is refreshed: a margin before expiry, but
/// never less than half the lifetime (a 90 s token would otherwise be refreshed after 30 s, a
/// 30 s token immediately).
fn use_token_for(lifetime: Duration) -> Duration {
    lifetime
        .saturating_sub(TOKEN_REFRESH_MARGIN)
        .max(lifetime / 2)
}

/// Largest token response read. Access tokens (JWTs) are a few KiB.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// The longest a Keyfactor call can take, connect to last body byte: the ceiling of
/// `[keyfactor] timeout_ms` ([`outbound::MAX_CALL_TIMEOUT_MS`], which the capability's
/// `MAX_CALL_TIMEOUT` is too). No response still in flight can be older.
pub const LONGEST_CALL: Duration = Duration::from_millis(outbound::MAX_CALL_TIMEOUT_MS);

/// How long an OAuth access token stays on the redaction list after it was replaced (by a
/// refresh or after a 401). A replaced token may still come back — in the answer to a call that
/// sent it and is still in flight, in a server's log of earlier requests, in an error page — so
/// it is scrubbed for an hour more. Longer than [`LONGEST_CALL`], so however often
/// tokens change, none is forgotten while a response that could carry it is outstanding.
pub const TOKEN_REMEMBERED_FOR: Duration = Duration::from_secs(60 * 60);

/// Replaced tokens of one identity kept before the oldest are forgotten early: a token endpoint
/// answering `expires_in = 0`, or a server answering 401 to every call, replaces a token per
/// call. Even then only tokens replaced longer than [`LONGEST_CALL`] ago are dropped
/// for room, so the guarantee for calls in flight holds; the list is bounded by the calls one
/// identity can make in that time.
pub const MAX_REMEMBERED_TOKENS: usize = 256;

/// At most one token refresh per this long comes from Keyfactor's 401s, per identity. A handler
/// chooses its paths, and one that answers 401 to any token lets it refuse the identity's token
/// on every call: each replacement would be a token request to the identity provider (which
/// may limit or refuse them, and a refused refresh pauses every handler of the identity) and one
/// more token on the redaction list that every response is scanned against. A token revoked or
/// expired early is still replaced at the first 401; a 401 within this long of the last
/// refresh a 401 caused is answered to the handler as it is.
pub const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// After a failed token request, how long every call with that identity is answered with its
/// failure instead of asking again: an identity provider that is down or refusing is asked
/// once per pause, not once per Keyfactor call of every sandbox and every poll (each of which
/// also wrote a warning). A provider's `Retry-After` may ask for longer, up to
/// [`MAX_TOKEN_FAILURE_PAUSE`].
pub const TOKEN_FAILURE_PAUSE: Duration = Duration::from_secs(5);

/// Longest pause a provider's `Retry-After` can set after a failed token request: longer
/// would keep handlers without a token well after the provider is back.
pub const MAX_TOKEN_FAILURE_PAUSE: Duration = Duration::from_secs(60);

/// How the engine authenticates to Keyfactor (`[keyfactor.auth]`).
///
/// ```toml
/// [keyfactor.auth]
/// kind = "basic"
/// username = 'KFTRAIN\svc-jobhook'
/// password = { env = "KEYFACTOR_PASSWORD" }
///
/// # or: kind = "bearer", token = { file = "/run/secrets/keyfactor-token" }
/// # or: kind = "oauth2", token_url = "https://idp.example.com/realms/kf/protocol/openid-connect/token",
/// #     client_id = "jobhook", client_secret = { env = "KEYFACTOR_CLIENT_SECRET" },
/// #     scopes = ["keyfactor-api"], audience = "keyfactor"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "RawAuth")]
pub enum AuthConfig {
    /// HTTP Basic: `Authorization: Basic base64(username:password)`.
    Basic {
        /// The user, usually `DOMAIN\user`.
        username: String,
        /// The password, by reference.
        password: SecretRef,
    },
    /// A static token: `Authorization: Bearer <token>`.
    Bearer {
        /// The token, by reference.
        token: SecretRef,
    },
    /// OAuth 2.0 client credentials grant; the token is fetched on first use, cached, refreshed
    /// [`TOKEN_REFRESH_MARGIN`] before it expires and once more when Keyfactor answers 401.
    Oauth2 {
        /// The identity provider's token endpoint (https, or http on loopback).
        token_url: String,
        /// The client id.
        client_id: String,
        /// The client secret, by reference; sent in the form body (`client_secret_post`).
        client_secret: SecretRef,
        /// Scopes to request (joined with spaces), if the provider needs them.
        #[serde(default)]
        scopes: Vec<String>,
        /// An `audience` parameter, for providers that need one (Auth0, ...).
        #[serde(default)]
        audience: Option<String>,
    },
}

/// `[keyfactor.auth]` as written: every key any kind has, checked against `kind` once read. A
/// plain table rather than an internally tagged enum, which serde reads by buffering the table
/// first: an error inside (a literal secret, an unknown key) then lost its line and was
/// reported at the top of the file. Read this way, such an error names its key and line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    kind: AuthKind,
    username: Option<String>,
    password: Option<SecretRef>,
    token: Option<SecretRef>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretRef>,
    scopes: Option<Vec<String>>,
    audience: Option<String>,
}

/// The `kind` of `[keyfactor.auth]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AuthKind {
    Basic,
    Bearer,
    Oauth2,
}

impl AuthKind {
    fn name(self) -> &'static str {
        match self {
            AuthKind::Basic => "basic",
            AuthKind::Bearer => "bearer",
            AuthKind::Oauth2 => "oauth2",
        }
    }

    /// The keys this kind takes, besides `kind`.
    fn keys(self) -> &'static [&'static str] {
        match self {
            AuthKind::Basic => &["username", "password"],
            AuthKind::Bearer => &["token"],
            AuthKind::Oauth2 => &[
                "token_url",
                "client_id",
                "client_secret",
                "scopes",
                "audience",
            ],
        }
    }
}

impl TryFrom<RawAuth> for AuthConfig {
    type Error = String;

    fn try_from(raw: RawAuth) -> Result<Self, String> {
        let kind = raw.kind;
        let given = [
            ("username", raw.username.is_some()),
            ("password", raw.password.is_some()),
            ("token", raw.token.is_some()),
            ("token_url", raw.token_url.is_some()),
            ("client_id", raw.client_id.is_some()),
            ("client_secret", raw.client_secret.is_some()),
            ("scopes", raw.scopes.is_some()),
            ("audience", raw.audience.is_some()),
        ];
        if let Some((key, _)) = given
            .iter()
            .find(|(key, set)| *set && !kind.keys().contains(key))
        {
            return Err(format!(
                "`{key}` is not a key of kind = \"{}\" (its keys: {})",
                kind.name(),
                kind.keys().join(", ")
            ));
        }
        let needs = |key: &str| format!("kind = \"{}\" needs `{key}`", kind.name());
        // Checked here too, not only when the credentials are resolved: an error raised while
        // the configuration is read carries its line.
        if let Some(problem) = raw.username.as_deref().and_then(basic_user_problem) {
            return Err(format!("`username` {problem}"));
        }
        if let Some(problem) = oauth_client_problem(
            raw.client_id.as_deref().unwrap_or("client"),
            raw.scopes.as_deref().unwrap_or_default(),
        ) {
            return Err(problem);
        }
        Ok(match kind {
            AuthKind::Basic => AuthConfig::Basic {
                username: raw.username.ok_or_else(|| needs("username"))?,
                password: raw.password.ok_or_else(|| needs("password"))?,
            },
            AuthKind::Bearer => AuthConfig::Bearer {
                token: raw.token.ok_or_else(|| needs("token"))?,
            },
            AuthKind::Oauth2 => AuthConfig::Oauth2 {
                token_url: raw.token_url.ok_or_else(|| needs("token_url"))?,
                client_id: raw.client_id.ok_or_else(|| needs("client_id"))?,
                client_secret: raw.client_secret.ok_or_else(|| needs("client_secret"))?,
                scopes: raw.scopes.unwrap_or_default(),
                audience: raw.audience,
            },
        })
    }
}

/// What is wrong with a Basic user name, if anything: the server splits `user:password` at the
/// first `:`, so a user name holding one logs in as what comes before it (RFC 7617 forbids it,
/// and control characters in either part); an empty one is a mistake. The name is never quoted:
/// a `user:password` pasted whole would show its password.
pub fn basic_user_problem(username: &str) -> Option<&'static str> {
    if username.is_empty() {
        Some("is empty: give the Keyfactor account (for an Active Directory one, DOMAIN\\user)")
    } else if username.chars().any(char::is_control) {
        Some(
            "holds a control character (a line break, a tab, ...), which HTTP Basic \
             authentication cannot carry (RFC 7617): remove it",
        )
    } else if username.contains(':') {
        Some(
            "holds a ':', which HTTP Basic authentication cannot carry: the server reads the \
             user name up to the first ':' and the rest as the start of the password (RFC 7617); \
             give the account's name alone",
        )
    } else {
        None
    }
}

/// What is wrong with a secret sent as it is read (a Basic password, an OAuth client secret),
/// if anything: a control character, which no such credential holds — a second line ending or
/// a lone carriage return at the end of a secret file, a NUL — and which the server would take
/// as part of it, or refuse. Only a secret file's one last line ending is not part of the
/// secret ([`crate::secret`]).
fn secret_problem(secret: &Secret) -> Option<&'static str> {
    secret.expose().chars().any(char::is_control).then_some(
        "holds a control character (a line break, a carriage return, a NUL, ...), which is sent \
         as part of it: only a secret file's one last line ending is left out; fix the secret",
    )
}

/// What is wrong with an OAuth client's `client_id` or `scopes`, if anything, naming the key:
/// an empty client id, or one with a control character; a scope that is empty or holds a
/// space, a control character, `"` or `\\` — scopes are sent joined by spaces, so such a scope
/// is sent as two or as none (RFC 6749 §3.3).
fn oauth_client_problem(client_id: &str, scopes: &[String]) -> Option<String> {
    if client_id.is_empty() {
        return Some(
            "`client_id` is empty: give the client registered with the identity provider".into(),
        );
    }
    if client_id.chars().any(char::is_control) {
        return Some(
            "`client_id` holds a control character (a line break, a tab, ...), which no client \
             id has: remove it"
                .into(),
        );
    }
    for scope in scopes {
        if scope.is_empty() {
            return Some("`scopes` holds an empty scope: remove it".into());
        }
        if scope
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\')
        {
            return Some(format!(
                "`scopes`: scope {} holds white space, a control character, '\"' or '\\', \
                 which a scope cannot (RFC 6749 §3.3: scopes are sent joined by spaces); give \
                 each scope as an entry of its own",
                crate::excerpt::quoted(scope)
            ));
        }
    }
    None
}

/// Why the auth configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// A secret could not be resolved.
    #[error("[keyfactor.auth]: {0}")]
    Secret(#[from] SecretError),
    /// The token URL is unusable (shown without any user information).
    #[error(
        "[keyfactor.auth] token_url {0:?} must be an https URL (http only for a loopback host)"
    )]
    TokenUrl(String),
    /// The token URL carries a user name or password (which is not repeated).
    #[error(
        "[keyfactor.auth] token_url must not contain a user name or password: the engine \
         authenticates to the identity provider with client_id and client_secret"
    )]
    TokenUrlCredentials,
    /// The credential cannot go into an HTTP header.
    #[error("[keyfactor.auth]: the {0} contains characters that cannot be sent in an HTTP header")]
    NotHeaderSafe(&'static str),
    /// A credential the server would read otherwise than written: what, and why (never the
    /// value).
    #[error("[keyfactor.auth]: {0}")]
    Credential(String),
}

/// Resolved credentials, ready to use.
#[derive(Debug)]
pub enum Auth {
    /// Basic or static Bearer: one header value for every request.
    Static {
        /// The `Authorization` value (marked sensitive).
        header: HeaderValue,
        /// What to scrub from responses.
        redactor: Arc<Redactor>,
    },
    /// OAuth 2.0 client credentials.
    OAuth2(Box<OAuth2>),
}

impl Auth {
    /// Resolves the secrets of `config`.
    pub fn from_config(config: &AuthConfig) -> Result<Auth, AuthConfigError> {
        match config {
            AuthConfig::Basic { username, password } => {
                let secret = password.resolve()?;
                if let Some(problem) = secret_problem(&secret) {
                    return Err(AuthConfigError::Credential(format!(
                        "the password from {} {problem} (and HTTP Basic authentication cannot \
                         carry one, RFC 7617)",
                        crate::escape::escape(&password.to_string())
                    )));
                }
                Auth::basic(username, &secret)
            }
            AuthConfig::Bearer { token: reference } => {
                let token = reference.resolve()?;
                if let Some(problem) = crate::secret::bearer_token_problem(token.expose()) {
                    return Err(AuthConfigError::Credential(format!(
                        "the token from {} {problem}",
                        crate::escape::escape(&reference.to_string())
                    )));
                }
                let header = sensitive(&format!("Bearer {}", token.expose()), "token")?;
                let mut redactor = Redactor::new();
                redactor.add(&format!("Bearer {}", token.expose()));
                redactor.add(token.expose());
                Ok(Auth::Static {
                    header,
                    redactor: Arc::new(redactor),
                })
            }
            AuthConfig::Oauth2 {
                token_url,
                client_id,
                client_secret,
                scopes,
                audience,
            } => {
                let unusable =
                    || AuthConfigError::TokenUrl(outbound::without_credentials(token_url).into());
                let url = Url::parse(token_url).map_err(|_| unusable())?;
                // Named first, whatever else is wrong: a credential in the URL is one to take out.
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(AuthConfigError::TokenUrlCredentials);
                }
                let secure =
                    url.scheme() == "https" || (url.scheme() == "http" && is_loopback_host(&url));
                if !secure {
                    return Err(unusable());
                }
                if let Some(problem) = oauth_client_problem(client_id, scopes) {
                    return Err(AuthConfigError::Credential(problem));
                }
                let reference = client_secret;
                let client_secret = reference.resolve()?;
                if let Some(problem) = secret_problem(&client_secret) {
                    return Err(AuthConfigError::Credential(format!(
                        "the client secret from {} {problem}",
                        crate::escape::escape(&reference.to_string())
                    )));
                }
                let mut secret_redactor = Redactor::new();
                secret_redactor.add(client_secret.expose());
                Ok(Auth::OAuth2(Box::new(OAuth2 {
                    token_url: url,
                    client_id: client_id.clone(),
                    client_secret,
                    secret_redactor: Arc::new(secret_redactor),
                    scopes: scopes.join(" "),
                    audience: audience.clone(),
                    cache: Mutex::new(None),
                    last_failure: std::sync::Mutex::new(None),
                    issued: RwLock::new(VecDeque::new()),
                    forced_at: std::sync::Mutex::new(None),
                })))
            }
        }
    }

    /// HTTP Basic with a password the program already holds; a user name or password the
    /// server would read otherwise than written is refused ([`basic_user_problem`]).
    pub fn basic(username: &str, password: &Secret) -> Result<Auth, AuthConfigError> {
        if let Some(problem) = basic_user_problem(username) {
            return Err(AuthConfigError::Credential(format!(
                "the user name {problem}"
            )));
        }
        if let Some(problem) = secret_problem(password) {
            return Err(AuthConfigError::Credential(format!(
                "the password {problem} (and HTTP Basic authentication cannot carry one, RFC 7617)"
            )));
        }
        let pair = format!("{username}:{}", password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
        let header = sensitive(&format!("Basic {encoded}"), "user name or password")?;
        // The whole header value first, so an echo shows `[redacted]`, not `Basic [redacted]`.
        let mut redactor = Redactor::new();
        redactor.add(&format!("Basic {encoded}"));
        redactor.add(&encoded);
        redactor.add(password.expose());
        redactor.add(&pair);
        Ok(Auth::Static {
            header,
            redactor: Arc::new(redactor),
        })
    }

    /// The `Authorization` value to send now, fetching or refreshing a token if needed. A token
    /// is on [`token_redactors`](Self::token_redactors) before this returns it, so before it
    /// can reach any server.
    pub async fn authorization(
        &self,
        http: &reqwest::Client,
    ) -> Result<HeaderValue, CapabilityError> {
        match self {
            Auth::Static { header, .. } => Ok(header.clone()),
            Auth::OAuth2(oauth) => oauth.authorization(http).await,
        }
    }

    /// What to scrub for the credentials known from the configuration: every form of the Basic
    /// pair and password or of the static token, or the OAuth client secret. Fixed for the
    /// life of this `Auth`, so a client builds it into its redactor once.
    pub fn static_redactor(&self) -> Arc<Redactor> {
        match self {
            Auth::Static { redactor, .. } => Arc::clone(redactor),
            Auth::OAuth2(oauth) => Arc::clone(&oauth.secret_redactor),
        }
    }

    /// Adds what to scrub for the OAuth access tokens this identity holds or recently held
    /// (none for a static credential) to `out`. Never waits: a token fetch in progress, this
    /// identity's or another's, does not delay it (the fetch lock is not taken; the list is
    /// behind its own short lock, held only to copy or replace it).
    pub fn token_redactors(&self, out: &mut RedactorSet) {
        if let Auth::OAuth2(oauth) = self {
            for token in oauth
                .issued
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
            {
                out.push(Arc::clone(&token.1));
            }
        }
    }

    /// Keyfactor refused `used` (401). Returns whether a retry can send another credential:
    /// when `used` has been replaced since it was sent, or when it is still the cached token and
    /// no 401 forced a refresh within [`FORCED_REFRESH_INTERVAL`] — then it is made due for a
    /// refresh but kept, so
    /// that a refresh the identity provider refuses leaves the token in use until it expires
    /// (as for a refresh at its time) instead of leaving every handler of the identity without
    /// one.
    pub async fn rejected(&self, used: &HeaderValue) -> bool {
        match self {
            Auth::Static { .. } => false,
            Auth::OAuth2(oauth) => {
                let mut cache = oauth.cache.lock().await;
                let now = Instant::now();
                match cache.as_mut() {
                    Some(token) if token.header == *used => {
                        let mut forced = oauth.forced_at.lock().unwrap_or_else(|p| p.into_inner());
                        if forced.is_some_and(|at| {
                            now.saturating_duration_since(at) < FORCED_REFRESH_INTERVAL
                        }) {
                            return false;
                        }
                        *forced = Some(now);
                        token.refresh_at = token.refresh_at.min(now);
                        true
                    }
                    _ => true,
                }
            }
        }
    }
}

fn sensitive(value: &str, what: &'static str) -> Result<HeaderValue, AuthConfigError> {
    let mut header =
        HeaderValue::from_str(value).map_err(|_| AuthConfigError::NotHeaderSafe(what))?;
    header.set_sensitive(true);
    Ok(header)
}

/// An OAuth 2.0 client-credentials client with a one-token cache.
pub struct OAuth2 {
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    /// Every form of the client secret, built once.
    secret_redactor: Arc<Redactor>,
    scopes: String,
    audience: Option<String>,
    /// The current token. A `tokio` mutex, held across the fetch, so that concurrent sandboxes
    /// of handlers using this identity wait for one token request instead of each sending their
    /// own. Only this identity's calls take it: redaction reads [`issued`](Self::issued).
    cache: Mutex<Option<CachedToken>>,
    /// When the last token request failed, until when its answer stands ([`TOKEN_FAILURE_PAUSE`]
    /// or the provider's `Retry-After`), and the answer: a call that waited for
    /// [`cache`](Self::cache) while that request was made, or comes before the pause ends, takes
    /// it instead of asking again, so calls queued behind an identity provider that does not
    /// answer each wait for one request's timeout, not for one per call ahead of them, and a
    /// provider that is down is not asked once per call. Never held across an `.await`.
    last_failure: std::sync::Mutex<Option<FailedFetch>>,
    /// What to scrub for the current token and those it replaced recently (see
    /// [`publish_at`](Self::publish_at)), each with when it was issued, newest last. A fetched
    /// token is added here before it is cached or handed to anyone, so every token a server could
    /// have received from this engine is on the list. A `std::sync::RwLock`, never held across
    /// an `.await`.
    issued: RwLock<VecDeque<(Instant, Arc<Redactor>)>>,
    /// When a 401 last made the token due for a refresh ([`FORCED_REFRESH_INTERVAL`]). Never
    /// held across an `.await`.
    forced_at: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

struct CachedToken {
    header: HeaderValue,
    refresh_at: Instant,
    /// When the provider said it expires: until then it is still sent when a refresh fails.
    expires_at: Instant,
}

/// A token request that failed: when, until when its answer stands, and the answer.
struct FailedFetch {
    at: Instant,
    stands_until: Instant,
    error: CapabilityError,
}

/// Why a token request failed: what calls are told, and how long to wait before asking again
/// (the provider's `Retry-After`, when it gave one).
struct FetchFailure {
    error: CapabilityError,
    retry_after: Option<Duration>,
}

impl From<CapabilityError> for FetchFailure {
    fn from(error: CapabilityError) -> Self {
        FetchFailure {
            error,
            retry_after: None,
        }
    }
}

/// A `Retry-After` of delta-seconds or an HTTP date (RFC 9110 §10.2.3), capped at
/// [`MAX_TOKEN_FAILURE_PAUSE`]; `None` when absent or unreadable (then the default pause applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    outbound::retry_after(value, MAX_TOKEN_FAILURE_PAUSE)
}

/// What to check when the identity provider refused a token request with `status`.
fn refusal_advice(status: reqwest::StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 401 | 403 => {
            "the identity provider refused the Keyfactor token request; check [keyfactor.auth] \
             client_id, client_secret, scopes and audience"
        }
        429 => "the identity provider is limiting token requests; they are paused",
        500..=599 => "the identity provider is unavailable; token requests are paused",
        _ => "the identity provider refused the Keyfactor token request",
    }
}

/// The fields of a token response the engine uses (RFC 6749 §5.1).
#[derive(Debug, PartialEq, Eq)]
struct TokenResponse {
    access_token: String,
    token_type: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// Reads a token response, or says which field is wrong and how, in words for the log —
    /// never the value, which for `access_token` is the credential itself. `expires_in` may be
    /// a number or a string holding one: Microsoft's v1 endpoint (Azure AD v1, AD FS) writes
    /// `"3599"`, and Go's `golang.org/x/oauth2`, which Keyfactor's own tools use, takes both.
    /// A null `token_type` or `expires_in` is one left out.
    fn parse(body: &[u8]) -> Result<TokenResponse, String> {
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| "the token response is not JSON".to_owned())?;
        let serde_json::Value::Object(fields) = value else {
            return Err("the token response is not a JSON object".to_owned());
        };
        let field = |name: &str| fields.get(name).filter(|v| !v.is_null());
        let access_token = match field("access_token") {
            None => return Err("the token response has no access_token".to_owned()),
            Some(serde_json::Value::String(token)) => token.clone(),
            Some(_) => return Err("the token response's access_token is not a string".to_owned()),
        };
        let token_type = match field("token_type") {
            None => None,
            Some(serde_json::Value::String(kind)) => Some(kind.clone()),
            Some(_) => return Err("the token response's token_type is not a string".to_owned()),
        };
        let expires_in = field("expires_in")
            .map(seconds)
            .transpose()
            .map_err(|problem| format!("the token response's expires_in {problem}"))?;
        Ok(TokenResponse {
            access_token,
            token_type,
            expires_in,
        })
    }
}

/// `expires_in` as a number of seconds: a whole number, written as a JSON number (`3599`, or
/// `3599.0`) or as a string holding one (`"3599"`, white space around it ignored); past
/// `u64::MAX` it is read as that ([`token_lifetime`] holds it to a day anyway). Otherwise what
/// is wrong with it: negative, a fraction, or not a number at all.
fn seconds(value: &serde_json::Value) -> Result<u64, &'static str> {
    let whole = |n: f64| {
        if !n.is_finite() {
            Err("is not a number of seconds")
        } else if n < 0.0 {
            Err("is negative")
        } else if n.fract() != 0.0 {
            Err("is not a whole number of seconds")
        } else {
            // Saturates past u64::MAX.
            Ok(n as u64)
        }
    };
    match value {
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(n), _) => Ok(n),
            (None, Some(n)) => whole(n),
            (None, None) => Err("is not a number of seconds"),
        },
        serde_json::Value::String(text) => {
            let text = text.trim();
            if let Ok(n) = text.parse::<u64>() {
                Ok(n)
            } else if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                Ok(u64::MAX)
            } else {
                text.parse::<f64>()
                    .map_err(|_| "is a string that is not a number of seconds")
                    .and_then(whole)
            }
        }
        _ => Err("is neither a number nor a string holding one"),
    }
}

/// An error response from the token endpoint (RFC 6749 §5.2); only `error` is logged.
#[derive(Deserialize)]
struct TokenError {
    error: String,
}

/// Where the operator fixes an identity provider certificate the engine refused: the token
/// request goes through the Keyfactor client, so `[keyfactor] ca_bundle` is trusted for it too.
const TRUST: outbound::TrustSettings = outbound::TrustSettings {
    section: "[keyfactor]",
    ca_key: Some("ca_bundle"),
    name: "the token_url of [keyfactor.auth] (or of the identity in use) must name a host the \
           certificate is issued for",
};

/// What the guest is told when no token could be had; the details go to the engine log.
const TOKEN_UNAVAILABLE: &str =
    "the engine could not obtain a Keyfactor access token (the engine log says why)";

impl OAuth2 {
    async fn authorization(&self, http: &reqwest::Client) -> Result<HeaderValue, CapabilityError> {
        let asked = Instant::now();
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok(token.header.clone());
        }
        // Due for a refresh but not expired: what a failed refresh still leaves usable.
        let unexpired = cache
            .as_ref()
            .filter(|token| Instant::now() < token.expires_at)
            .map(|token| token.header.clone());
        if let Some(failed) = self
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && (failed.at >= asked || Instant::now() < failed.stands_until)
        {
            return unexpired.ok_or_else(|| failed.error.clone());
        }
        let (token, redactor) = match self.fetch(http).await {
            Ok(fetched) => fetched,
            Err(FetchFailure { error, retry_after }) => {
                let at = Instant::now();
                let pause = retry_after.unwrap_or(TOKEN_FAILURE_PAUSE);
                *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(FailedFetch {
                    at,
                    stands_until: at.checked_add(pause).unwrap_or(at),
                    error: error.clone(),
                });
                return unexpired.ok_or(error);
            }
        };
        // Published before the token is cached or returned, so before it is ever sent.
        self.publish(redactor);
        let header = token.header.clone();
        *cache = Some(token);
        Ok(header)
    }

    /// Puts a new token's redactor on the [`issued`](Self::issued) list, dropping the oldest
    /// beyond [`MAX_REMEMBERED_TOKENS`].
    fn publish(&self, redactor: Redactor) {
        self.publish_at(redactor, Instant::now());
    }

    /// [`publish`](Self::publish) at `now`: the oldest token is dropped when the one that
    /// replaced it is older than [`TOKEN_REMEMBERED_FOR`], or, with more than
    /// [`MAX_REMEMBERED_TOKENS`] listed, older than [`LONGEST_CALL`].
    fn publish_at(&self, redactor: Redactor, now: Instant) {
        let mut issued = self
            .issued
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        issued.push_back((now, Arc::new(redactor)));
        // The oldest entry was replaced when the second was issued.
        while let Some(&(replaced_at, _)) = issued.get(1) {
            let replaced_for = now.saturating_duration_since(replaced_at);
            let crowded = issued.len() > MAX_REMEMBERED_TOKENS && replaced_for > LONGEST_CALL;
            if replaced_for > TOKEN_REMEMBERED_FOR || crowded {
                issued.pop_front();
            } else {
                break;
            }
        }
    }

    async fn fetch(&self, http: &reqwest::Client) -> Result<(CachedToken, Redactor), FetchFailure> {
        let unavailable = || CapabilityError::Failed(TOKEN_UNAVAILABLE.into());
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            form.append_pair("client_id", &self.client_id);
            form.append_pair("client_secret", self.client_secret.expose());
            if !self.scopes.is_empty() {
                form.append_pair("scope", &self.scopes);
            }
            if let Some(audience) = &self.audience {
                form.append_pair("audience", audience);
            }
            form.finish()
        };
        let started = Instant::now();
        let response = http
            .post(self.token_url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| {
                let answer = match outbound::transport_error(&e, "the identity provider", &TRUST) {
                    CapabilityError::Timeout(m) => CapabilityError::Timeout(m),
                    _ => unavailable(),
                };
                match outbound::certificate_hint(&e, &TRUST) {
                    Some(hint) => tracing::warn!(
                        error = %outbound::failure_cause(e),
                        token_url = %self.token_url,
                        "Keyfactor token request failed: {hint}"
                    ),
                    None => tracing::warn!(
                        error = %outbound::failure_cause(e),
                        token_url = %self.token_url,
                        "Keyfactor token request failed"
                    ),
                }
                answer
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = outbound::read_body(response, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(|_| {
                tracing::warn!(token_url = %self.token_url, "Keyfactor token response unreadable or too large");
                unavailable()
            })?;
        if !status.is_success() {
            let error = serde_json::from_slice::<TokenError>(&body)
                .map(|e| e.error)
                .unwrap_or_default();
            let retry_after = retry_after(&headers);
            tracing::warn!(
                token_url = %self.token_url,
                status = status.as_u16(),
                error = %outbound::quote(&error),
                paused_s = retry_after.unwrap_or(TOKEN_FAILURE_PAUSE).as_secs(),
                "{}",
                refusal_advice(status)
            );
            return Err(FetchFailure {
                error: unavailable(),
                retry_after,
            });
        }
        let token = TokenResponse::parse(&body).map_err(|problem| {
            tracing::warn!(token_url = %self.token_url, "{problem}");
            unavailable()
        })?;
        if let Some(kind) = &token.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            tracing::warn!(token_type = %outbound::quote(kind), "the identity provider issued a token that is not a Bearer token");
            return Err(unavailable().into());
        }
        let mut header =
            HeaderValue::from_str(&format!("Bearer {}", token.access_token)).map_err(|_| {
                tracing::warn!(
                    "the access token contains characters that cannot be sent in a header"
                );
                unavailable()
            })?;
        header.set_sensitive(true);
        let lifetime = token_lifetime(token.expires_in);
        let use_for = use_token_for(lifetime);
        let mut redactor = Redactor::new();
        redactor.add(&format!("Bearer {}", token.access_token));
        redactor.add(&token.access_token);
        tracing::debug!(
            lifetime_s = lifetime.as_secs(),
            took_ms = started.elapsed().as_millis() as u64,
            "fetched a Keyfactor access token"
        );
        Ok((
            CachedToken {
                header,
                // Cannot overflow (the lifetime is at most a day); if it did, the token would
                // be refreshed at once rather than the engine panic.
                refresh_at: started.checked_add(use_for).unwrap_or(started),
                expires_at: started.checked_add(lifetime).unwrap_or(started),
            },
            redactor,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_expires_in_gives_a_refresh_time_the_clock_can_hold() {
        let now = Instant::now();
        for (expires_in, lifetime, used_for) in [
            (None, DEFAULT_TOKEN_LIFETIME, Duration::from_secs(240)),
            (Some(0), Duration::ZERO, Duration::ZERO),
            (Some(30), Duration::from_secs(30), Duration::from_secs(15)),
            (
                Some(3600),
                Duration::from_secs(3600),
                Duration::from_secs(3540),
            ),
            (
                Some(86_400 * 365),
                MAX_TOKEN_LIFETIME,
                Duration::from_secs(86_340),
            ),
            // "Forever", and the largest number JSON can carry into a u64.
            (
                Some(i64::MAX as u64),
                MAX_TOKEN_LIFETIME,
                Duration::from_secs(86_340),
            ),
            (
                Some(u64::MAX),
                MAX_TOKEN_LIFETIME,
                Duration::from_secs(86_340),
            ),
        ] {
            let lifetime_seen = token_lifetime(expires_in);
            assert_eq!(lifetime_seen, lifetime, "{expires_in:?}");
            assert_eq!(use_token_for(lifetime_seen), used_for, "{expires_in:?}");
            assert!(now.checked_add(use_token_for(lifetime_seen)).is_some());
        }
    }

    #[test]
    fn auth_config_parses_each_kind() {
        let basic: AuthConfig = serde_json::from_str(
            r#"{"kind": "basic", "username": "KFTRAIN\\svc", "password": {"env": "P"}}"#,
        )
        .unwrap();
        assert!(matches!(basic, AuthConfig::Basic { .. }));
        let oauth: AuthConfig = serde_json::from_str(
            r#"{"kind": "oauth2", "token_url": "https://idp/token", "client_id": "c",
                "client_secret": {"file": "/s"}, "scopes": ["a", "b"]}"#,
        )
        .unwrap();
        assert!(matches!(oauth, AuthConfig::Oauth2 { .. }));
        assert!(
            serde_json::from_str::<AuthConfig>(r#"{"kind": "bearer", "token": "literal"}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<AuthConfig>(
                r#"{"kind": "bearer", "token": {"env": "T"}, "extra": 1}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<AuthConfig>(r#"{"kind": "ntlm"}"#).is_err());
    }

    #[test]
    fn basic_credentials_are_encoded_and_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "pa:ss\n").unwrap();
        let auth = Auth::from_config(&AuthConfig::Basic {
            username: r"KFTRAIN\svc".into(),
            password: SecretRef::File(file),
        })
        .unwrap();
        let Auth::Static { header, redactor } = &auth else {
            panic!("static")
        };
        assert!(header.is_sensitive());
        // base64("KFTRAIN\svc:pa:ss")
        assert_eq!(header.to_str().unwrap(), "Basic S0ZUUkFJTlxzdmM6cGE6c3M=");
        assert_eq!(
            redactor.redact_str("x S0ZUUkFJTlxzdmM6cGE6c3M= pa:ss Basic S0ZUUkFJTlxzdmM6cGE6c3M="),
            "x [redacted] [redacted] [redacted]"
        );
        let debug = format!("{auth:?}");
        assert!(!debug.contains("S0ZUUkFJTlxzdmM6cGE6c3M="), "{debug}");
        assert!(!debug.contains("pa:ss"), "{debug}");
    }

    #[test]
    fn every_form_of_each_credential_is_redacted_in_any_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "p+ss/w=rd&<é>").unwrap();
        let auth = Auth::from_config(&AuthConfig::Basic {
            username: r"KFTRAIN\svc".into(),
            password: SecretRef::File(pw.clone()),
        })
        .unwrap();
        let Auth::Static { redactor, .. } = &auth else {
            panic!("static")
        };
        let pair = base64::engine::general_purpose::STANDARD.encode("KFTRAIN\\svc:p+ss/w=rd&<é>");
        for echoed in [
            r#"{"p":"p\u002Bss/w=rd\u0026\u003C\u00E9\u003E"}"#.to_owned(),
            "p&#43;ss&#x2F;w&#61;rd&amp;&lt;&#233;&gt;".to_owned(),
            "p%2Bss%2Fw%3Drd%26%3C%C3%A9%3E".to_owned(),
            format!("Basic {pair}"),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("xKFTRAIN\\svc:p+ss/w=rd&<é>"),
        ] {
            let out = redactor.redact_str(&echoed);
            assert!(out.contains(outbound::REDACTED), "{echoed} -> {out}");
            assert!(
                !out.contains("ss/w=rd") && !out.contains(&pair),
                "{echoed} -> {out}"
            );
        }
        // OAuth: the client secret is redacted before any token exists.
        let secret = dir.path().join("cs");
        std::fs::write(&secret, "cl+ent<secret>").unwrap();
        let oauth = Auth::from_config(&AuthConfig::Oauth2 {
            token_url: "https://idp.example.com/token".into(),
            client_id: "c".into(),
            client_secret: SecretRef::File(secret),
            scopes: vec![],
            audience: None,
        })
        .unwrap();
        let r = oauth.static_redactor();
        assert_eq!(
            r.redact_str(r#"{"s":"cl\u002Bent\u003Csecret\u003E"}"#),
            r#"{"s":"[redacted]"}"#
        );
        // No token yet, so no token redactor; the client secret is not one of them.
        let mut tokens = RedactorSet::new();
        oauth.token_redactors(&mut tokens);
        assert!(tokens.is_empty());
    }

    #[test]
    fn replaced_tokens_stay_redacted_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cs");
        std::fs::write(&secret, "client-secret").unwrap();
        let auth = Auth::from_config(&AuthConfig::Oauth2 {
            token_url: "https://idp.example.com/token".into(),
            client_id: "c".into(),
            client_secret: SecretRef::File(secret),
            scopes: vec![],
            audience: None,
        })
        .unwrap();
        let Auth::OAuth2(oauth) = &auth else {
            panic!("oauth")
        };
        let token = |n: usize| format!("access-token-{n}");
        let redactor = |n: usize| {
            let mut r = Redactor::new();
            r.add(&token(n));
            r
        };
        let found = |n: usize| {
            let mut set = RedactorSet::new();
            auth.token_redactors(&mut set);
            set.redact_str(&token(n)) == outbound::REDACTED
        };
        let start = Instant::now();
        let call = LONGEST_CALL;
        // Far more replacements than the cap within one call's time: none is forgotten, as a
        // response still in flight may carry any of them.
        let churn = MAX_REMEMBERED_TOKENS + 50;
        for n in 0..churn {
            oauth.publish_at(redactor(n), start);
        }
        assert!((0..churn).all(found));
        // Once they were replaced longer than a call can last, the cap applies, oldest first.
        oauth.publish_at(redactor(churn), start + call + Duration::from_secs(1));
        assert!(!found(0) && !found(churn - MAX_REMEMBERED_TOKENS));
        assert!((churn - MAX_REMEMBERED_TOKENS + 1..=churn).all(found));
        // An hour after being replaced a token is forgotten; the one replaced just now is not.
        let later = start + TOKEN_REMEMBERED_FOR + call + Duration::from_secs(2);
        oauth.publish_at(redactor(churn + 1), later);
        assert!(!found(churn - 1));
        assert!(found(churn) && found(churn + 1));
    }

    /// An OAuth2 identity asking for tokens at `http://127.0.0.1:{port}/token`, its client
    /// secret in a file under `dir`.
    fn oauth_on_loopback(port: u16, dir: &std::path::Path) -> Auth {
        let secret = dir.join("cs");
        std::fs::write(&secret, "client-secret").unwrap();
        Auth::from_config(&AuthConfig::Oauth2 {
            token_url: format!("http://127.0.0.1:{port}/token"),
            client_id: "c".into(),
            client_secret: SecretRef::File(secret),
            scopes: vec![],
            audience: None,
        })
        .unwrap()
    }

    /// An identity provider that accepts connections and never answers: calls that queued
    /// behind the one token request in flight take its failure instead of each asking again,
    /// so together they wait about one request's timeout, not one per call ahead of them (as
    /// they did: eight calls took eight timeouts, one after the other).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_queued_behind_a_failing_token_request_share_its_failure() {
        const CALLS: usize = 8;
        const TIMEOUT: Duration = Duration::from_secs(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let auth = Arc::new(oauth_on_loopback(port, dir.path()));
        let http = reqwest::Client::builder().timeout(TIMEOUT).build().unwrap();
        let began = Instant::now();
        let calls: Vec<_> = (0..CALLS)
            .map(|_| {
                let (auth, http) = (Arc::clone(&auth), http.clone());
                tokio::spawn(async move { auth.authorization(&http).await })
            })
            .collect();
        for call in calls {
            assert!(call.await.unwrap().is_err(), "no token can be had");
        }
        let took = began.elapsed();
        assert!(
            took < TIMEOUT * 4,
            "{CALLS} calls behind an identity provider that never answers took {took:?} \
             (one request's timeout is {TIMEOUT:?})"
        );
    }

    /// A loopback identity provider answering its `n`th token request (from 0) with
    /// `answer(n)`, a whole HTTP response; its port, and how many requests it has had.
    async fn token_endpoint(
        answer: impl Fn(usize) -> String + Send + 'static,
    ) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&asked);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = vec![0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(answer(n).as_bytes()).await;
            }
        });
        (port, asked)
    }

    /// A token response: `access_token` and `expires_in` (seconds).
    fn token_answer(token: &str, expires_in: u64) -> String {
        let body = format!("{{\"access_token\":\"{token}\",\"expires_in\":{expires_in}}}");
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// A 200 token response with `body` as it is.
    fn token_body(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// `expires_in` as Microsoft's v1 endpoint and AD FS write it, a string, is read like the
    /// number (the whole token was refused, and with it every Keyfactor call); so is a whole
    /// number written as a float. A value refused names the field and its problem, never the
    /// value (a negative `expires_in` was called "not the expected JSON (access_token,
    /// expires_in)", though both were there).
    #[test]
    fn a_token_response_reads_expires_in_as_a_number_or_a_string_holding_one() {
        let with = |expires_in: &str| {
            TokenResponse::parse(
                format!(
                    r#"{{"access_token":"tok","token_type":"Bearer","expires_in":{expires_in}}}"#
                )
                .as_bytes(),
            )
        };
        for (expires_in, seconds) in [
            ("3599", Some(3599)),
            ("\"3599\"", Some(3599)),
            ("\" 3599 \"", Some(3599)),
            ("3599.0", Some(3599)),
            ("\"3599.0\"", Some(3599)),
            ("0", Some(0)),
            ("null", None),
            ("\"99999999999999999999999\"", Some(u64::MAX)),
            ("1e300", Some(u64::MAX)),
        ] {
            assert_eq!(
                with(expires_in).map(|t| t.expires_in),
                Ok(seconds),
                "{expires_in}"
            );
        }
        assert_eq!(
            TokenResponse::parse(br#"{"access_token":"tok"}"#),
            Ok(TokenResponse {
                access_token: "tok".into(),
                token_type: None,
                expires_in: None
            })
        );
        for (expires_in, says) in [
            ("-5", "is negative"),
            ("\"-5\"", "is negative"),
            ("-3599.0", "is negative"),
            ("3599.5", "is not a whole number of seconds"),
            ("\"3599.5\"", "is not a whole number of seconds"),
            ("\"soon\"", "is a string that is not a number of seconds"),
            ("\"\"", "is a string that is not a number of seconds"),
            ("\"inf\"", "is not a number of seconds"),
            ("true", "is neither a number nor a string holding one"),
            ("[3599]", "is neither a number nor a string holding one"),
        ] {
            let e = with(expires_in).expect_err(expires_in);
            assert_eq!(e, format!("the token response's expires_in {says}"));
        }
        // The other fields: named, and the access token never quoted.
        for (body, says) in [
            (
                r#"{"access_token": 987654321}"#,
                "the token response's access_token is not a string",
            ),
            (
                r#"{"access_token": null, "expires_in": 3599}"#,
                "the token response has no access_token",
            ),
            (
                r#"{"expires_in": 3599}"#,
                "the token response has no access_token",
            ),
            (
                r#"{"access_token":"tok","token_type":["Bearer"]}"#,
                "the token response's token_type is not a string",
            ),
            (r#"["tok"]"#, "the token response is not a JSON object"),
            (
                "access_token=tok&expires_in=3599",
                "the token response is not JSON",
            ),
        ] {
            assert_eq!(
                TokenResponse::parse(body.as_bytes()),
                Err(says.to_owned()),
                "{body}"
            );
        }
    }

    /// Through the identity provider: a token whose `expires_in` is a string is fetched and
    /// used; one whose `expires_in` is negative is refused, and the log names the field.
    #[tokio::test]
    async fn a_token_with_expires_in_as_a_string_is_used() {
        let (port, _) = token_endpoint(|_| {
            token_body(
                r#"{"access_token":"goodtoken123456","expires_in":"3599","token_type":"Bearer","ext_expires_in":"3599","expires_on":"1700000000"}"#,
            )
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let auth = oauth_on_loopback(port, dir.path());
        let http = reqwest::Client::new();
        let header = auth.authorization(&http).await.expect("a token");
        assert_eq!(header.to_str().ok(), Some("Bearer goodtoken123456"));

        let (port, _) =
            token_endpoint(|_| token_body(r#"{"access_token":"secret-token-9","expires_in":-5}"#))
                .await;
        let auth = oauth_on_loopback(port, dir.path());
        let kept = crate::log_capture::Captured::default();
        let _guard = tracing::subscriber::set_default(kept.warnings());
        assert!(auth.authorization(&http).await.is_err());
        let text = kept.text();
        assert!(
            text.contains("the token response's expires_in is negative"),
            "{text}"
        );
        assert!(
            !text.contains("secret-token-9") && !text.contains("-5"),
            "{text}"
        );
    }

    /// A refusal with `status` and, when given, `Retry-After` (seconds).
    fn refusal(status: &str, retry_after: Option<u64>) -> String {
        let wait = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
        format!("HTTP/1.1 {status}\r\n{wait}Content-Length: 0\r\nConnection: close\r\n\r\n")
    }

    /// An identity provider answering 503 with `Retry-After`: twenty calls in a row ask it
    /// once (each asked before, writing a warning each, and the warning told to check the
    /// client's credentials whatever the status); the line says it is unavailable, and the
    /// pause holds no longer than the provider asked, within [`MAX_TOKEN_FAILURE_PAUSE`].
    #[tokio::test]
    async fn a_provider_that_is_down_is_asked_once_per_pause_and_named_as_down() {
        let (port, asked) = token_endpoint(|_| refusal("503 Service Unavailable", Some(1))).await;
        let dir = tempfile::tempdir().unwrap();
        let auth = oauth_on_loopback(port, dir.path());
        let kept = crate::log_capture::Captured::default();
        let _guard = tracing::subscriber::set_default(kept.warnings());
        let http = reqwest::Client::new();
        for _ in 0..20 {
            assert!(auth.authorization(&http).await.is_err());
        }
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        let text = kept.text();
        assert_eq!(text.matches("identity provider").count(), 1, "{text}");
        assert!(text.contains("is unavailable"), "{text}");
        assert!(!text.contains("client_secret"), "{text}");
        // Retry-After: 1 — asked again once it has passed.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(auth.authorization(&http).await.is_err());
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A refresh that fails while the cached token has not expired yet keeps using that token
    /// until it expires (calls failed from the refresh time on before, for the whole pause).
    #[tokio::test]
    async fn a_failed_refresh_keeps_the_unexpired_token_in_use() {
        let (port, _) = token_endpoint(|n| match n {
            0 => token_answer("first-token", 2),
            _ => refusal("503 Service Unavailable", None),
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let auth = oauth_on_loopback(port, dir.path());
        let http = reqwest::Client::new();
        let first = auth.authorization(&http).await.expect("a token");
        // Past its refresh time (half of its 2 s), before it expires: the refresh fails.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(auth.authorization(&http).await.ok(), Some(first.clone()));
        assert_eq!(auth.authorization(&http).await.ok(), Some(first));
        // Expired: no token.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(auth.authorization(&http).await.is_err());
    }

    /// A handler whose calls Keyfactor answers 401 cannot make the identity's token be thrown
    /// away again and again: the first 401 replaces it at once, further 401s within
    /// [`FORCED_REFRESH_INTERVAL`] keep it (no token request), and when the identity provider
    /// refuses a later replacement the refused token stays in use until it expires instead of
    /// every handler of the identity being left without one (as it was: the token was
    /// forgotten at every 401).
    #[tokio::test]
    async fn a_401_forces_at_most_one_refresh_per_interval_and_never_leaves_no_token() {
        // Two tokens (an hour each), then 429 with Retry-After.
        let (port, asked) = token_endpoint(|n| match n {
            0 | 1 => token_answer(&format!("token-{n}"), 3600),
            _ => refusal("429 Too Many Requests", Some(30)),
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let auth = oauth_on_loopback(port, dir.path());
        let Auth::OAuth2(oauth) = &auth else {
            panic!("an OAuth2 identity")
        };
        let http = reqwest::Client::new();
        // As if the last refresh a 401 forced were `by` ago.
        let age = |by: Duration| {
            let mut forced = oauth.forced_at.lock().unwrap();
            *forced = forced.map(|at| at.checked_sub(by).expect("an earlier instant"));
        };
        let asked_so_far = || asked.load(std::sync::atomic::Ordering::SeqCst);
        let first = auth.authorization(&http).await.expect("a token");
        // The first 401 replaces it at once (a token revoked early).
        assert!(auth.rejected(&first).await);
        let second = auth.authorization(&http).await.expect("a token");
        assert_ne!(second, first);
        assert_eq!(asked_so_far(), 2);
        // Refused again and again within the interval: kept, no retry is worth it, no token
        // request.
        for _ in 0..20 {
            assert!(!auth.rejected(&second).await);
            assert_eq!(auth.authorization(&http).await.ok(), Some(second.clone()));
        }
        // A call that sent the old one and comes back 401 after the replacement retries with
        // the new one; no token request.
        assert!(auth.rejected(&first).await);
        assert_eq!(auth.authorization(&http).await.ok(), Some(second.clone()));
        assert_eq!(asked_so_far(), 2);
        // Once the interval has passed a 401 forces a refresh again; the provider refuses it,
        // and the refused token stays in use.
        age(FORCED_REFRESH_INTERVAL);
        assert!(auth.rejected(&second).await);
        for _ in 0..5 {
            assert_eq!(auth.authorization(&http).await.ok(), Some(second.clone()));
        }
        assert_eq!(
            asked_so_far(),
            3,
            "asked once, then paused by its Retry-After"
        );
        // Every token issued is still scrubbed.
        let mut set = RedactorSet::default();
        auth.token_redactors(&mut set);
        let scrubbed = String::from_utf8(set.redact(b"token-0 and token-1".to_vec())).unwrap();
        assert!(!scrubbed.contains("token-"), "{scrubbed}");
    }

    #[test]
    fn a_retry_after_is_read_in_seconds_or_as_a_date_and_capped() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(reqwest::header::RETRY_AFTER, "30".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(30)));
        headers.insert(reqwest::header::RETRY_AFTER, "86400".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_TOKEN_FAILURE_PAUSE));
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(
            retry_after(&headers),
            Some(Duration::ZERO),
            "a date gone by"
        );
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "Fri, 01 Jan 2100 00:00:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(MAX_TOKEN_FAILURE_PAUSE));
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
        for (status, words) in [
            (401, "client_secret"),
            (429, "limiting"),
            (503, "unavailable"),
        ] {
            let advice = refusal_advice(reqwest::StatusCode::from_u16(status).unwrap());
            assert!(advice.contains(words), "{status}: {advice}");
        }
    }

    /// Credentials the server would read otherwise than written are refused, naming the key
    /// and never echoing the value: a Basic user name with a `:` (the server splits the pair
    /// at the first one: `a:b` logs in as `a`), a control character or nothing; a Basic
    /// password with a control character (RFC 7617 forbids both); a Bearer token that is not
    /// one word of visible ASCII; an OAuth client id or secret with a control character or
    /// empty, and a scope that would be sent as two or none.
    #[test]
    fn credentials_the_server_would_misread_are_refused_naming_the_key() {
        let parse = |value: serde_json::Value| {
            serde_json::from_value::<AuthConfig>(value)
                .unwrap_err()
                .to_string()
        };
        for (username, says) in [
            ("a:b", "holds a ':'"),
            ("svc\r\nX-Injected: 1", "holds a control character"),
            ("svc\t", "holds a control character"),
            ("", "is empty"),
        ] {
            let e = parse(serde_json::json!({
                "kind": "basic", "username": username, "password": {"env": "P"}
            }));
            assert!(
                e.contains("`username`") && e.contains(says),
                "{username:?}: {e}"
            );
            assert!(!e.contains("a:b") && !e.contains("Injected"), "{e}");
            // The same from `jobhook run`'s flags, which build the credential directly.
            let e = Auth::basic(username, &Secret::new("pw"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("user name") && e.contains(says),
                "{username:?}: {e}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            SecretRef::File(path)
        };
        for (text, says) in [
            ("pw\n\n", "control character"),
            ("pw\r", "control character"),
            ("p\0w", "control character"),
        ] {
            let e = Auth::from_config(&AuthConfig::Basic {
                username: "svc".into(),
                password: file("pw", text),
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("the password") && e.contains(says),
                "{text:?}: {e}"
            );
            assert!(e.contains("pw"), "names the file: {e}");
        }
        assert!(
            Auth::from_config(&AuthConfig::Basic {
                username: r"KFTRAIN\svc".into(),
                password: file("pw", "pa:ss w\u{e9}rd\n"),
            })
            .is_ok(),
            "a ':', a space or a letter outside ASCII in a password is the password's"
        );
        for (text, says) in [
            ("two words", "visible ASCII characters, without spaces"),
            ("tab\there", "visible ASCII characters, without spaces"),
            ("Bearer abc", "remove the `Bearer ` at its start"),
            ("caf\u{e9}", "visible ASCII characters, without spaces"),
        ] {
            let e = Auth::from_config(&AuthConfig::Bearer {
                token: file("token", text),
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("the token from file") && e.contains(says),
                "{text:?}: {e}"
            );
            assert!(!e.contains(text), "{e}");
        }
        assert!(
            Auth::from_config(&AuthConfig::Bearer {
                token: file("token", "eyJhbGciOi.J9-_~+/=\n"),
            })
            .is_ok()
        );
        let oauth = |client_id: &str, secret: &str, scopes: &[&str]| {
            Auth::from_config(&AuthConfig::Oauth2 {
                token_url: "https://idp.example.com/token".into(),
                client_id: client_id.into(),
                client_secret: file("secret", secret),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                audience: None,
            })
            .map(drop)
            .map_err(|e| e.to_string())
        };
        assert!(oauth("jobhook", "s3cret", &["api", "keyfactor:read"]).is_ok());
        for (client_id, secret, scopes, says) in [
            ("", "s", &[][..], "`client_id` is empty"),
            (
                "job\nhook",
                "s",
                &[][..],
                "`client_id` holds a control character",
            ),
            ("jobhook", "s\u{7}", &[][..], "the client secret from file"),
            ("jobhook", "s", &["two words"][..], "scope \"two words\""),
            ("jobhook", "s", &[""][..], "an empty scope"),
        ] {
            let e = oauth(client_id, secret, scopes).unwrap_err();
            assert!(e.contains(says), "{client_id:?} {scopes:?}: {e}");
        }
        // At parse time too, with the key.
        let e = parse(serde_json::json!({
            "kind": "oauth2", "token_url": "https://idp/token", "client_id": "",
            "client_secret": {"env": "S"}
        }));
        assert!(e.contains("`client_id` is empty"), "{e}");
        let e = parse(serde_json::json!({
            "kind": "oauth2", "token_url": "https://idp/token", "client_id": "c",
            "client_secret": {"env": "S"}, "scopes": ["a b"]
        }));
        assert!(e.contains("scope \"a b\""), "{e}");
    }

    #[test]
    fn token_urls_must_be_secure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "secret").unwrap();
        let with_url = |u: &str| {
            Auth::from_config(&AuthConfig::Oauth2 {
                token_url: u.into(),
                client_id: "c".into(),
                client_secret: SecretRef::File(file.clone()),
                scopes: vec![],
                audience: None,
            })
        };
        assert!(with_url("https://idp.example.com/token").is_ok());
        assert!(with_url("http://127.0.0.1:9/token").is_ok());
        assert!(with_url("http://idp.example.com/token").is_err());
        assert!(with_url("https://u:p@idp.example.com/token").is_err());
        assert!(with_url("not a url").is_err());
        // A user name or password in the URL is named as the problem, whatever else is wrong
        // with it, and never repeated.
        for url in [
            "https://u:p@idp.example.com/token",
            "http://u:p@idp.example.com/token",
            "https://u@idp.example.com/token",
        ] {
            let e = with_url(url).unwrap_err().to_string();
            assert!(
                e.contains("token_url must not contain a user name or password")
                    && e.contains("client_id and client_secret"),
                "{url}: {e}"
            );
            assert!(
                !e.contains("u:p") && !e.contains("https URL") && !e.contains("u@"),
                "{e}"
            );
        }
        let e = with_url("https://u:p@ idp/token").unwrap_err().to_string();
        assert!(e.contains("…@ idp/token") && !e.contains("u:p"), "{e}");
        let e = with_url("http://idp.example.com/token")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be an https URL"), "{e}");
    }
}
