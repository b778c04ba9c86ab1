//! A stand-in for the Keyfactor Command REST API: a real HTTP server implementing what job
//! complete handlers use, following `reference/keyfactor.md` (§5, §6), for tests and for handler
//! authors (`jobhook-dev standin --listen 127.0.0.1:8081`).
//!
//! Under a base path (default `/KeyfactorAPI/`) it serves:
//!
//! | endpoint | |
//! |---|---|
//! | `GET OrchestratorJobs/JobHistory` | paging, sorting and `pq.queryString` on the documented fields only ([`query`]) |
//! | `POST OrchestratorJobs/Acknowledge` | `{"JobAuditIds": [...]}` or `{"Query": "..."}` (exactly one); sets eligible runs to Status 4, `204` ([`acknowledge`]) |
//! | `GET Agents` | every agent, paged |
//! | `GET CertificateStoreTypes` (paged by `cstquery.*`), `GET CertificateStoreTypes/Name/{name}` (a list, as Command answers) | store types with their job-type GUIDs |
//! | `GET JobTypes/Custom` | custom job types |
//! | `GET Certificates/{id}`, `GET Agents/{id}`, `GET CertificateStores/{id}` | seeded objects ([`data`]) |
//! | `GET Status/Endpoints` | the endpoint list clients use as an auth probe |
//! | `ANY _Test/Echo` | echoes the request, credentials included (for hostile tests) |
//! | `ANY _Test/EchoAs?encoding=E` | echoes the `Authorization` value and the credential in it (Basic's `user:pass`, the token) in encoding `E` of [`ECHO_ENCODINGS`] |
//! | `GET _Test/Redirect` | `302` to a path outside the base (a proxy must not follow it) |
//! | `GET _Test/Large?bytes=N[&chunked=1]` | an `N`-byte body, with or without `Content-Length` |
//! | `GET _Test/Slow?ms=N` | answers after `N` ms |
//! | `GET _Test/EchoOthers?ms=N` | answers after `N` ms with the `Authorization` of every request that arrived meanwhile (a server leaking other callers' credentials) |
//!
//! and `POST /oauth2/token` (OAuth 2.0 client credentials, secret in the form or in Basic),
//! which a test can hold ([`Standin::hold_token_endpoint`]) to play a slow identity provider.
//!
//! Like the real API it answers 401 without valid credentials (Basic, a static Bearer token, or
//! a token from its token endpoint) and 400 when `x-keyfactor-requested-with` is missing. Every
//! request is recorded — method, path, query, headers, body — for assertions, including the
//! ones it refuses. Error bodies have Keyfactor's `{"ErrorCode", "Message"}` shape; their codes
//! and wording are the stand-in's own, not Keyfactor's.

pub mod acknowledge;
pub mod data;
pub mod query;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use data::Dataset;

/// Largest request body the stand-in reads; Keyfactor bodies are small.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Largest body `_Test/Large` produces.
pub const MAX_LARGE_BYTES: usize = 64 * 1024 * 1024;

/// Longest delay `_Test/Slow` honours.
pub const MAX_SLOW: Duration = Duration::from_secs(30);

/// The path of the token endpoint (outside the API base, as at a real identity provider).
pub const TOKEN_PATH: &str = "/oauth2/token";

/// The credentials the stand-in accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Basic user (`DOMAIN\user`).
    pub username: String,
    /// Basic password.
    pub password: String,
    /// Static Bearer tokens accepted as they are.
    pub bearer_tokens: Vec<String>,
    /// OAuth client id for the token endpoint.
    pub client_id: String,
    /// OAuth client secret for the token endpoint.
    pub client_secret: String,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            username: "KFTRAIN\\svc-jobhook".into(),
            password: "standin-password".into(),
            bearer_tokens: vec!["standin-static-token".into()],
            client_id: "jobhook".into(),
            client_secret: "standin-client-secret".into(),
        }
    }
}

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct StandinConfig {
    /// The API base path, e.g. `/KeyfactorAPI/` (Keyfactor's default IIS application name).
    pub base_path: String,
    /// Accepted credentials.
    pub credentials: Credentials,
    /// Lifetime of tokens from the token endpoint.
    pub token_lifetime: Duration,
    /// The data served.
    pub data: Dataset,
}

impl Default for StandinConfig {
    fn default() -> Self {
        StandinConfig {
            base_path: "/KeyfactorAPI/".into(),
            credentials: Credentials::default(),
            token_lifetime: Duration::from_secs(3600),
            data: Dataset::seeded(),
        }
    }
}

/// One request as the stand-in received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The method.
    pub method: String,
    /// The path as sent (percent-encoding kept).
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Headers, names lowercase, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The decoded query pairs.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.query.as_deref().unwrap_or_default().as_bytes())
            .into_owned()
            .collect()
    }

    /// The value of query parameter `name`.
    pub fn query_value(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

struct IssuedToken {
    token: String,
    expires: Instant,
}

struct State_ {
    config: StandinConfig,
    base: String,
    /// The JobHistory rows as they are now: `config.data.job_history`, changed by acknowledgments.
    history: Mutex<Vec<Value>>,
    requests: Mutex<Vec<RecordedRequest>>,
    tokens: Mutex<Vec<IssuedToken>>,
    issued: Mutex<u64>,
    /// While `true`, token requests are recorded but not answered.
    token_hold: tokio::sync::watch::Sender<bool>,
}

type Shared = Arc<State_>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running stand-in, bound to `127.0.0.1` on a free port; stopped when dropped.
pub struct Standin {
    addr: SocketAddr,
    state: Shared,
    shutdown: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Standin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Standin({})", self.base_url())
    }
}

impl Standin {
    /// Starts the stand-in with the default configuration on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<Standin> {
        Standin::start_with(StandinConfig::default()).await
    }

    /// Starts the stand-in with `config` on `127.0.0.1:0`.
    pub async fn start_with(config: StandinConfig) -> std::io::Result<Standin> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = shared(config);
        let (tx, rx) = oneshot::channel::<()>();
        let app = router(Arc::clone(&state));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Standin {
            addr,
            state,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The API base, e.g. `http://127.0.0.1:PORT/KeyfactorAPI/`.
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.addr, self.state.base)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.addr)
    }

    /// The accepted credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.state.config.credentials
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// The requests received so far other than those to the token endpoint.
    pub fn api_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path != TOKEN_PATH)
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }

    /// Tokens issued by the token endpoint so far.
    pub fn tokens_issued(&self) -> u64 {
        *lock(&self.state.issued)
    }

    /// Invalidates every issued token (the next API call with one gets 401).
    pub fn revoke_tokens(&self) {
        lock(&self.state.tokens).clear();
    }

    /// Holds the token endpoint: token requests are recorded, then wait (at most [`MAX_SLOW`])
    /// until [`release_token_endpoint`](Self::release_token_endpoint), as at an identity
    /// provider that hangs.
    pub fn hold_token_endpoint(&self) {
        self.state.token_hold.send_replace(true);
    }

    /// Lets held and later token requests be answered.
    pub fn release_token_endpoint(&self) {
        self.state.token_hold.send_replace(false);
    }

    /// The JobHistory rows as they are now (acknowledged runs have `Status` 4).
    pub fn job_history(&self) -> Vec<Value> {
        lock(&self.state.history).clone()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.release_token_endpoint();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves the stand-in on `listener` until the process ends (for `jobhook-dev standin`).
pub async fn serve(listener: TcpListener, config: StandinConfig) -> std::io::Result<()> {
    axum::serve(listener, router(shared(config))).await
}

fn shared(config: StandinConfig) -> Shared {
    let mut base = config.base_path.trim().to_owned();
    if !base.starts_with('/') {
        base.insert(0, '/');
    }
    if !base.ends_with('/') {
        base.push('/');
    }
    Arc::new(State_ {
        history: Mutex::new(config.data.job_history.clone()),
        config,
        base,
        requests: Mutex::new(Vec::new()),
        tokens: Mutex::new(Vec::new()),
        issued: Mutex::new(0),
        token_hold: tokio::sync::watch::Sender::new(false),
    })
}

fn router(state: Shared) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// Keyfactor's error body shape.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"ErrorCode": code, "Message": message.into()})),
    )
        .into_response()
}

fn json_response(value: Value) -> Response {
    let mut response = axum::Json(value).into_response();
    response.headers_mut().insert(
        "x-keyfactor-product-version",
        HeaderValue::from_static("11.5.0.0"),
    );
    response
}

async fn handle(State(state): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .unwrap_or_default();
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let arrived = {
        let mut requests = lock(&state.requests);
        requests.push(recorded.clone());
        requests.len()
    };

    if recorded.path == TOKEN_PATH {
        let mut hold = state.token_hold.subscribe();
        let _ = tokio::time::timeout(MAX_SLOW, hold.wait_for(|held| !*held)).await;
        return token_endpoint(&state, &parts.method, &parts.headers, &body);
    }
    let lower = recorded.path.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix(&state.base.to_ascii_lowercase())
        .map(|_| recorded.path.get(state.base.len()..).unwrap_or_default())
    else {
        return error(StatusCode::NOT_FOUND, "0xA0010404", "Not found.");
    };
    if !authorized(&state, &parts.headers) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "0xA0010401",
            "Authorization has been denied for this request.",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"KeyfactorAPI\", Bearer"),
        );
        return response;
    }
    if !parts.headers.contains_key("x-keyfactor-requested-with") {
        return error(
            StatusCode::BAD_REQUEST,
            "0xA0010400",
            "The 'x-keyfactor-requested-with' header is required.",
        );
    }
    let segments: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect();
    let segs: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let pairs = recorded.query_pairs();
    match (&parts.method, segs.as_slice()) {
        (&Method::GET, ["orchestratorjobs", "jobhistory"]) => {
            let history = lock(&state.history);
            match query::Query::from_pairs(&pairs)
                .map(|q| q.apply(&history, &state.config.data.agents))
            {
                Ok(rows) => json_response(Value::Array(rows)),
                Err(message) => error(StatusCode::BAD_REQUEST, "0xA0010400", message),
            }
        }
        (&Method::POST, ["orchestratorjobs", "acknowledge"]) => {
            let mut history = lock(&state.history);
            match acknowledge::acknowledge(
                &parts.headers,
                &body,
                &mut history,
                &state.config.data.agents,
            ) {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(message) => error(StatusCode::BAD_REQUEST, "0xA0010400", message),
            }
        }
        (&Method::GET, ["certificates", id]) => {
            let found = id.parse::<i64>().ok().and_then(|id| {
                state
                    .config
                    .data
                    .certificates
                    .iter()
                    .find(|c| c["Id"].as_i64() == Some(id))
            });
            match found {
                Some(c) => json_response(c.clone()),
                None => error(
                    StatusCode::NOT_FOUND,
                    "0xA0010404",
                    format!("Certificate with ID {id} does not exist."),
                ),
            }
        }
        (&Method::GET, ["agents"]) => paged(&state.config.data.agents, &pairs, "pq."),
        // Command binds this list's paging to its `cstquery` parameter object (the Go SDK
        // generated from its API spec: `cstquery.pageReturned`, `cstquery.returnLimit`); `pq.*`
        // names are not bound and its defaults apply.
        (&Method::GET, ["certificatestoretypes"]) => {
            paged(&state.config.data.store_types, &pairs, "cstquery.")
        }
        // A list of the matching store types, as Command answers (the Go SDK:
        // `[]CertificateStoreTypeResponse`), though at most one matches.
        (&Method::GET, ["certificatestoretypes", "name", name]) => {
            match state.config.data.store_types.iter().find(|t| {
                t["ShortName"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            }) {
                Some(t) => json_response(Value::Array(vec![t.clone()])),
                None => error(
                    StatusCode::NOT_FOUND,
                    "0xA0010404",
                    format!("Certificate store type with name {name} does not exist."),
                ),
            }
        }
        (&Method::GET, ["jobtypes", "custom"]) => {
            paged(&state.config.data.custom_job_types, &pairs, "pq.")
        }
        (&Method::GET, ["agents", id]) => {
            by_guid(&state.config.data.agents, "AgentId", id, "Agent")
        }
        (&Method::GET, ["certificatestores", id]) => {
            by_guid(&state.config.data.stores, "Id", id, "Certificate store")
        }
        (&Method::GET, ["status", "endpoints"]) => json_response(json!([
            "GET /OrchestratorJobs/JobHistory",
            "POST /OrchestratorJobs/Acknowledge",
            "GET /Certificates/{id}",
            "GET /Agents",
            "GET /CertificateStoreTypes",
            "GET /CertificateStoreTypes/Name/{name}",
            "GET /JobTypes/Custom",
            "GET /Agents/{id}",
            "GET /CertificateStores/{id}",
            "GET /Status/Endpoints"
        ])),
        (_, ["_test", "echoas", ..]) => echo_as(&recorded, &pairs),
        (_, ["_test", "echo", ..]) => echo(&recorded),
        (&Method::GET, ["_test", "redirect"]) => {
            let mut response = StatusCode::FOUND.into_response();
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/stolen"));
            response
        }
        (&Method::GET, ["_test", "large"]) => large(&pairs),
        (&Method::GET, ["_test", "echoothers"]) => {
            tokio::time::sleep(slow_ms(&pairs)).await;
            let seen: Vec<Value> = lock(&state.requests)
                .get(arrived..)
                .unwrap_or_default()
                .iter()
                .filter_map(|r| r.header("authorization"))
                .map(|a| Value::String(a.to_owned()))
                .collect();
            json_response(json!({ "Authorizations": seen }))
        }
        (&Method::GET, ["_test", "slow"]) => {
            let wait = slow_ms(&pairs);
            tokio::time::sleep(wait).await;
            json_response(json!({"slept_ms": wait.as_millis() as u64}))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "0xA0010404",
            format!("No endpoint matches {} {}.", parts.method, recorded.path),
        ),
    }
}

/// The `ms` query parameter of the slow endpoints, at most [`MAX_SLOW`].
fn slow_ms(pairs: &[(String, String)]) -> Duration {
    let ms = pairs
        .iter()
        .find(|(k, _)| k == "ms")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_millis(ms).min(MAX_SLOW)
}

/// `GET /Agents` (and the other plain lists): every item, paged by `pageReturned` and
/// `returnLimit` (defaults 1 and 50, as for every Keyfactor list) under the list's parameter
/// prefix (`pq.`, or `cstquery.` for store types) or none, as ASP.NET binds a query object;
/// the same names under another prefix are not bound.
fn paged(items: &[Value], pairs: &[(String, String)], prefix: &str) -> Response {
    let number = |name: &str, default: usize| -> Result<usize, String> {
        match pairs.iter().find(|(k, _)| {
            let k = k.to_ascii_lowercase();
            k.strip_prefix(prefix).unwrap_or(&k) == name
        }) {
            None => Ok(default),
            Some((_, v)) => match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("The value '{v}' is not valid for {name}.")),
            },
        }
    };
    let (page, limit) = match (
        number("pagereturned", 1),
        number("returnlimit", query::DEFAULT_RETURN_LIMIT),
    ) {
        (Ok(p), Ok(l)) => (p, l.min(query::MAX_RETURN_LIMIT)),
        (Err(m), _) | (_, Err(m)) => return error(StatusCode::BAD_REQUEST, "0xA0010400", m),
    };
    json_response(Value::Array(
        items
            .iter()
            .skip((page - 1).saturating_mul(limit))
            .take(limit)
            .cloned()
            .collect(),
    ))
}

fn by_guid(items: &[Value], key: &str, id: &str, what: &str) -> Response {
    match items
        .iter()
        .find(|i| i[key].as_str().is_some_and(|v| v.eq_ignore_ascii_case(id)))
    {
        Some(item) => json_response(item.clone()),
        None => error(
            StatusCode::NOT_FOUND,
            "0xA0010404",
            format!("{what} with ID {id} does not exist."),
        ),
    }
}

/// Echoes the request — every header, `Authorization` included — in the body and in response
/// headers a careless proxy might forward.
fn echo(request: &RecordedRequest) -> Response {
    let headers: serde_json::Map<String, Value> = request
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let auth = request
        .header("authorization")
        .unwrap_or_default()
        .to_owned();
    let mut response = json_response(json!({
        "Method": request.method,
        "Path": request.path,
        "Query": request.query,
        "Headers": headers,
        "Body": String::from_utf8_lossy(&request.body),
    }));
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&auth) {
        h.insert("x-echo-authorization", v.clone());
        h.insert(header::WWW_AUTHENTICATE, v.clone());
        if let Ok(cookie) = HeaderValue::from_str(&format!("session={auth}")) {
            h.insert(header::SET_COOKIE, cookie);
        }
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{auth}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
    response
}

/// The encodings `_Test/EchoAs` writes a credential in: the ways a Windows/IIS/.NET API
/// realistically escapes text (ASP.NET's JSON encoder, HTML encoding, URL encoding, base64).
pub const ECHO_ENCODINGS: &[&str] = &[
    "aspnet-json",
    "aspnet-json-lower",
    "html-named",
    "html-decimal",
    "html-hex",
    "percent-upper",
    "percent-lower-plus",
    "base64",
    "base64-nopad",
    "base64url",
    "base64url-nopad",
    "base64-offset1",
    "base64-offset2",
];

/// `text` in `encoding` (one of [`ECHO_ENCODINGS`]); `None` for an unknown encoding.
pub fn encode_as(encoding: &str, text: &str) -> Option<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let aspnet = |upper: bool| -> String {
        text.encode_utf16()
            .map(|u| match char::from_u32(u32::from(u)) {
                Some(c) if c.is_ascii_graphic() && !"+<>&'\"\\`".contains(c) => c.to_string(),
                Some(' ') => " ".into(),
                _ if upper => format!("\\u{u:04X}"),
                _ => format!("\\u{u:04x}"),
            })
            .collect()
    };
    let percent = |upper: bool| -> String {
        text.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' if !upper => "+".into(),
                _ if upper => format!("%{b:02X}"),
                _ => format!("%{b:02x}"),
            })
            .collect()
    };
    let offset = |n: usize| {
        let mut bytes = vec![b'#'; n];
        bytes.extend_from_slice(text.as_bytes());
        STANDARD.encode(bytes)
    };
    Some(match encoding {
        "aspnet-json" => aspnet(true),
        "aspnet-json-lower" => aspnet(false),
        "html-named" => text
            .chars()
            .map(|c| match c {
                '&' => "&amp;".into(),
                '<' => "&lt;".into(),
                '>' => "&gt;".into(),
                '"' => "&quot;".into(),
                '\'' => "&#39;".into(),
                '\\' => "&bsol;".into(),
                c => c.to_string(),
            })
            .collect(),
        "html-decimal" => text.chars().map(|c| format!("&#{};", c as u32)).collect(),
        "html-hex" => text
            .chars()
            .map(|c| format!("&#x{:X};", c as u32))
            .collect(),
        "percent-upper" => percent(true),
        "percent-lower-plus" => percent(false),
        "base64" => STANDARD.encode(text),
        "base64-nopad" => STANDARD_NO_PAD.encode(text),
        "base64url" => URL_SAFE.encode(text),
        "base64url-nopad" => URL_SAFE_NO_PAD.encode(text),
        "base64-offset1" => offset(1),
        "base64-offset2" => offset(2),
        _ => return None,
    })
}

/// Echoes the `Authorization` value and the credential inside it in one encoding, in a body
/// written by hand (so the escaping is exactly the encoding's, not serde's), with a
/// `Content-Length` that tells how long it is.
fn echo_as(request: &RecordedRequest, pairs: &[(String, String)]) -> Response {
    let encoding = pairs
        .iter()
        .find(|(k, _)| k == "encoding")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let auth = request.header("authorization").unwrap_or_default();
    let credential = auth
        .strip_prefix("Basic ")
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .or_else(|| auth.strip_prefix("Bearer ").map(str::to_owned))
        .unwrap_or_default();
    let password = credential
        .split_once(':')
        .map(|(_, p)| p.to_owned())
        .unwrap_or_default();
    let (Some(a), Some(c), Some(p)) = (
        encode_as(encoding, auth),
        encode_as(encoding, &credential),
        encode_as(encoding, &password),
    ) else {
        return error(StatusCode::BAD_REQUEST, "0xA0010400", "unknown encoding");
    };
    let body = if encoding.starts_with("aspnet-json") {
        format!(r#"{{"Authorization":"{a}","Credential":"{c}","Password":"{p}"}}"#)
    } else {
        format!("<p>Authorization: {a}</p>\n<p>Credential: {c}</p>\n<p>Password: {p}</p>\n")
    };
    Response::new(Body::from(body))
}

fn large(pairs: &[(String, String)]) -> Response {
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let bytes = get("bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_LARGE_BYTES);
    if get("chunked") == Some("1") {
        const CHUNK: usize = 64 * 1024;
        let chunks = (0..bytes.div_ceil(CHUNK)).map(move |i| {
            let n = CHUNK.min(bytes - i * CHUNK);
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; n]))
        });
        return Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    }
    Response::new(Body::from(vec![b'x'; bytes]))
}

fn authorized(state: &State_, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let credentials = &state.config.credentials;
    if let Some(encoded) = value.strip_prefix("Basic ") {
        return basic(encoded)
            .is_some_and(|(u, p)| u == credentials.username && p == credentials.password);
    }
    if let Some(token) = value.strip_prefix("Bearer ") {
        if credentials.bearer_tokens.iter().any(|t| t == token) {
            return true;
        }
        let now = Instant::now();
        return lock(&state.tokens)
            .iter()
            .any(|t| t.token == token && t.expires > now);
    }
    false
}

fn basic(encoded: &str) -> Option<(String, String)> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `POST /oauth2/token`: the client credentials grant (RFC 6749 §4.4), client authenticated by
/// `client_secret_post` or `client_secret_basic`.
fn token_endpoint(state: &State_, method: &Method, headers: &HeaderMap, body: &[u8]) -> Response {
    let oauth_error = |status: StatusCode, code: &str| {
        (status, axum::Json(json!({"error": code}))).into_response()
    };
    if method != Method::POST {
        return oauth_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
    }
    let form: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if get("grant_type").as_deref() != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(basic);
    let (id, secret) = match (get("client_id"), get("client_secret"), from_header) {
        (Some(id), Some(secret), _) => (id, secret),
        (_, _, Some(pair)) => pair,
        _ => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"),
    };
    let credentials = &state.config.credentials;
    if id != credentials.client_id || secret != credentials.client_secret {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let n = {
        let mut issued = lock(&state.issued);
        *issued += 1;
        *issued
    };
    let token = format!("standin-access-token-{n}");
    lock(&state.tokens).push(IssuedToken {
        token: token.clone(),
        expires: Instant::now() + state.config.token_lifetime,
    });
    axum::Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": state.config.token_lifetime.as_secs(),
    }))
    .into_response()
}
