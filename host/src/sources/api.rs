//! The HTTP API of `jobhook serve`.
//!
//! - `POST /v1/job-complete`: a job context (same JSON as `jobhook run`); validated, committed
//!   with one delivery per matching handler, then answered `202 {"event_id": ...}`. It never
//!   waits for a handler. Bad input gets `400 {"error": ...}` saying what to fix. With an
//!   `Idempotency-Key` header a resend within the retention window is answered with the
//!   original event and commits nothing; the same key with another context gets `409`
//!   ([`super::idempotency`]). `X-Jobhook-Forwarder` names the sender ([`super::forwarders`]).
//! - `GET /v1/events/{id}`: the event and every delivery's state and outcome.
//! - `GET /v1/handlers`: loaded handlers, routing, grants, limits, health.
//! - `GET /v1/forwarders`: the forwarders this node accepted events from, and when each last did.
//! - `POST /v1/admin/reload`: reload the configuration file (as SIGHUP does).
//! - `GET /v1/deliveries/failed`, `POST /v1/admin/retry-failed`: the failed deliveries, listed
//!   and run again ([`super::failed_deliveries`]).
//! - `GET /healthz` (never authenticated) and `GET /metrics`.
//!
//! `server.tokens` guard what a sender uses (posting events, `/metrics`) and `server.admin_tokens`
//! the rest (`/healthz` is never guarded); without admin tokens, `server.tokens` guard every
//! endpoint. A guarded endpoint needs `Authorization: Bearer <token>` (`401`); a sender's token
//! on an administrator's endpoint gets `403`; an admin token opens every endpoint
//! ([`AcceptedTokens`]). A reload replaces the accepted tokens ([`BearerTokens`]).
//!
//! The ingest body is limited in size and time: a `Content-Length` over `max_body_bytes` is
//! answered `413` before any of the body is read, a chunked body that grows past it `413` as
//! soon as it does, and a body that does not arrive within `body_read_timeout` `408`; each of
//! these closes the connection after the answer (`Connection: close`), since the rest of the
//! body is not wanted.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::context::JobContext;
use crate::log_limit::LogLimit;
use crate::metrics::{CONTENT_TYPE, Metrics, StoreCounts};
use crate::queue::dispatch::{Dispatcher, HandlerSummary};
use crate::queue::store::{
    EventStore, Idempotency, Inserted, NewEvent, STORE_FAILURE_LOG_INTERVAL, STORE_READ_TIMEOUT,
    StoreError, call_within,
};
use crate::sources::failed_deliveries;
use crate::sources::forwarders::{self, Forwarders};
use crate::sources::idempotency;
use crate::sources::store_health::{self, StoreHealth};

/// Reloads the configuration: resolves to what the reload did, or to the reason the new
/// configuration was refused (the running one then stays).
pub type Reloader = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<ReloadReport, String>> + Send>> + Send + Sync,
>;

/// What a successful reload did; the reload endpoint answers with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// The handlers loaded now.
    pub handlers: Vec<String>,
    /// Handlers configured now that were not before.
    pub added: Vec<String>,
    /// Handlers whose component or settings changed: loaded again, with new sandboxes from
    /// their next delivery (one running keeps the sandbox it started in).
    pub changed: Vec<String>,
    /// Handlers configured before and not now.
    pub removed: Vec<String>,
    /// Secrets read again and now in use (by name, e.g. `server.tokens`; never a value).
    pub secrets_reloaded: Vec<String>,
    /// Settings and secrets that changed but are used only from the next start: what an
    /// operator must restart for. Each entry names the key and says so.
    pub restart_required: Vec<String>,
    /// Pending deliveries of handlers not configured now, by handler (a handler renamed or
    /// removed): they are kept, not skipped, and run once a handler of that name is configured
    /// again.
    pub waiting_for_unconfigured: std::collections::BTreeMap<String, u64>,
}

/// The bearer tokens the API accepts, by what they open. Its `Debug` counts them: the values are
/// secrets.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct AcceptedTokens {
    /// `[server] tokens`: every endpoint when there are no admin tokens; with admin tokens,
    /// only what a sender (the forwarder, a scraper) needs: [`SENDER_PATHS`]. None, beside
    /// admin tokens: those endpoints need no token.
    pub senders: Vec<String>,
    /// `[server] admin_tokens`: every endpoint.
    pub admins: Vec<String>,
}

/// How many of each, never a value.
impl std::fmt::Debug for AcceptedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptedTokens")
            .field("senders", &self.senders.len())
            .field("admins", &self.admins.len())
            .finish()
    }
}

impl AcceptedTokens {
    /// Neither kind configured: no authentication.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty() && self.admins.is_empty()
    }

    /// What `presented` opens. Every configured token is compared, in constant time each, so
    /// neither which list holds it nor a matching prefix shows in the answer's timing.
    fn access(&self, presented: Option<&str>) -> Access {
        let Some(presented) = presented else {
            return Access::None;
        };
        let matches = |list: &[String]| {
            list.iter().fold(false, |found, t| {
                found | constant_time_eq(presented.as_bytes(), t.as_bytes())
            })
        };
        let (admin, sender) = (matches(&self.admins), matches(&self.senders));
        if admin || (sender && self.admins.is_empty()) {
            Access::Everything
        } else if sender {
            Access::Sending
        } else {
            Access::None
        }
    }
}

/// What a presented token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No token, or not one of the accepted ones.
    None,
    /// A `[server] tokens` token beside admin tokens: [`SENDER_PATHS`] only.
    Sending,
    /// Every endpoint.
    Everything,
}

/// The endpoints a `[server] tokens` token opens when `[server] admin_tokens` are configured:
/// what the forwarder posts to and what a metrics scraper reads. Reading events (contexts and
/// handlers' log lines), the handlers' configuration, the forwarders' names and reloading need
/// an admin token: a token kept on the Keyfactor server opens no more than the forwarder uses.
pub const SENDER_PATHS: [&str; 2] = [INGEST_PATH, "/metrics"];

/// The accepted bearer tokens; a reload replaces them. Empty: no authentication. No `Debug`:
/// the values are secrets.
#[derive(Default)]
pub struct BearerTokens {
    current: RwLock<Arc<AcceptedTokens>>,
}

impl BearerTokens {
    /// Starts with `tokens`.
    pub fn new(tokens: AcceptedTokens) -> Self {
        BearerTokens {
            current: RwLock::new(Arc::new(tokens)),
        }
    }

    /// The tokens accepted now.
    pub fn current(&self) -> Arc<AcceptedTokens> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// From now on only `tokens` are accepted.
    pub fn replace(&self, tokens: AcceptedTokens) {
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(tokens),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(tokens),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The durable store.
    pub store: Arc<dyn EventStore>,
    /// The dispatcher (routing, handlers).
    pub dispatcher: Arc<Dispatcher>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Accepted bearer tokens; empty = no authentication.
    pub tokens: Arc<BearerTokens>,
    /// Largest request body read.
    pub max_body_bytes: usize,
    /// How long the ingest body may take to arrive.
    pub body_read_timeout: Duration,
    /// Configuration reload.
    pub reload: Reloader,
    /// How long an `Idempotency-Key` holds.
    pub idempotency_retention: Duration,
    /// The forwarders heard from.
    pub forwarders: Arc<Forwarders>,
    /// Whether the store took the latest event posted, for `/healthz`.
    pub store_health: Arc<StoreHealth>,
}

/// Where events are posted.
pub const INGEST_PATH: &str = "/v1/job-complete";

/// The router with every endpoint.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route(INGEST_PATH, post(job_complete))
        .route("/v1/events/{id}", get(event))
        .route("/v1/handlers", get(handlers))
        .route("/v1/forwarders", get(forwarder_list))
        .route(failed_deliveries::LIST_PATH, get(failed_list))
        .route("/v1/admin/reload", post(reload))
        .route(failed_deliveries::RETRY_PATH, post(retry_failed))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(refuse_web_pages))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Refuses a request a web browser makes on a page's behalf. The API's clients (the
/// forwarder, curl, a monitoring agent) send neither `Origin` nor `Sec-Fetch-Mode`; a browser
/// sends `Origin` with every `POST` and every cross-origin request, and a `Sec-Fetch-Mode`
/// other than `navigate` with every request a script makes. So a page on another site — or
/// one that reached the engine's address by DNS rebinding — cannot post events, reload the
/// configuration or run deliveries again through an operator's browser, nor read the API,
/// where no token guards it (a loopback listener without tokens). An operator opening
/// `/metrics` in the address bar (a navigation, without `Origin`) is still answered.
async fn refuse_web_pages(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let scripted = headers
        .get_all("sec-fetch-mode")
        .iter()
        .any(|mode| !mode.as_bytes().eq_ignore_ascii_case(b"navigate"));
    if headers.contains_key(header::ORIGIN) || scripted {
        return error_and_close(
            StatusCode::FORBIDDEN,
            "the API does not answer requests a web page makes (this one has an Origin or a \
             Sec-Fetch-Mode header): call it from a client such as curl or the forwarder",
        );
    }
    next.run(request).await
}

/// Whether a request's body has no framing: neither `Content-Length` nor `Transfer-Encoding`.
/// HTTP/1.1 then reads it as empty, and what the client sent after the headers as the next
/// request; the answer says why instead of "the body is empty", and closes the connection.
fn unframed(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
}

/// `411` for an [`unframed`] request whose endpoint needs `what` as its body.
fn length_required(what: &str) -> Response {
    error_and_close(
        StatusCode::LENGTH_REQUIRED,
        format!(
            "the request has neither Content-Length nor Transfer-Encoding: chunked, so it has no \
             body; send {what} with a Content-Length"
        ),
    )
}

/// The endpoints, for the answer to a request for another.
const ENDPOINTS: &str = "POST /v1/job-complete, GET /v1/events/{id}, GET /v1/handlers, \
                         GET /v1/forwarders, GET /v1/deliveries/failed, POST /v1/admin/reload, \
                         POST /v1/admin/retry-failed, GET /metrics, GET /healthz";

/// A path that is no endpoint: a JSON error listing them (the path is not echoed).
async fn no_such_endpoint() -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint; the API has {ENDPOINTS}"),
    )
}

/// An endpoint asked with another method: a JSON error listing them (axum keeps `Allow`).
async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this endpoint does not take that method; the API has {ENDPOINTS}"),
    )
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let tokens = state.tokens.current();
    let sending = SENDER_PATHS.contains(&request.uri().path());
    // `[server] tokens` guard what a sender uses and, without admin tokens, everything; admin
    // tokens guard the rest. Without sender tokens, sending is not guarded by a token (client
    // certificates may guard it: `check` refuses an unguarded listener off loopback).
    if tokens.is_empty() || (sending && tokens.senders.is_empty()) {
        return next.run(request).await;
    }
    // Two credentials: which one counts would be a guess (and a proxy may keep another).
    if request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        return error_and_close(
            StatusCode::BAD_REQUEST,
            "the request has more than one Authorization header: send one, \
             Authorization: Bearer <token>",
        );
    }
    // The scheme's name is case-insensitive (RFC 9110 §11.1): `bearer x` is `Bearer x`.
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match tokens.access(presented) {
        Access::Everything => return next.run(request).await,
        Access::Sending if sending => return next.run(request).await,
        // A valid token, asking for more than it opens: 403, not 401 (sending it again will
        // not help; another token would).
        Access::Sending => {
            return error(
                StatusCode::FORBIDDEN,
                "this token is one of [server] tokens, which open only POST /v1/job-complete \
                 and GET /metrics; this endpoint needs one of [server] admin_tokens",
            );
        }
        Access::None => {}
    }
    // An event refused: counted as ingest refusals are. A scraper or a scanner without the
    // token asking for something else is not an event.
    if request.method() == axum::http::Method::POST && request.uri().path() == INGEST_PATH {
        state.metrics.event_rejected();
    }
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (send Authorization: Bearer <token>)",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    // A client without the token keeps no connection open: it is not one of the senders the
    // connection caps are there for.
    closing(response)
}

/// Compares secrets in time that depends on neither's content nor on their lengths: both are
/// hashed to SHA-256 (which takes time by length — the presented token's own, known to its
/// sender) and the digests compared without an early exit, so timing reveals neither a matching
/// prefix nor the configured token's length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest as _, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The first coding of the request body other than none, and the header that names it: a
/// `Content-Encoding` other than `identity`, or a `Transfer-Encoding` other than `chunked` (hyper
/// takes the framing apart, not a compression before it: `gzip, chunked`). Every value of every
/// such header counts, in any case, as lists.
fn body_coding(headers: &HeaderMap) -> Option<(&'static str, String)> {
    [
        ("Content-Encoding", header::CONTENT_ENCODING, "identity"),
        ("Transfer-Encoding", header::TRANSFER_ENCODING, "chunked"),
    ]
    .into_iter()
    .find_map(|(name, header, plain)| {
        headers.get_all(header).iter().find_map(|value| {
            let text = String::from_utf8_lossy(value.as_bytes());
            text.split(',')
                .map(str::trim)
                .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(plain))
                .map(|coding| (name, coding.to_owned()))
        })
    })
}

/// What to change when a body that is not JSON at all came labelled as something else (a form,
/// XML, plain text): the engine reads every body as JSON whatever its `Content-Type` says (a
/// JSON context labelled `text/plain` is taken), so the label is named only when the body was
/// not JSON either. `None` for a body that is JSON, without a `Content-Type`, or with a JSON one
/// (`application/json`, `text/json`, any `+json`).
fn media_type_hint(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?;
    let text = String::from_utf8_lossy(value.as_bytes());
    let media = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = media == "application/json" || media == "text/json" || media.ends_with("+json");
    if json || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        return None;
    }
    Some(format!(
        "the request's Content-Type is {}: send the job context as a JSON object, with \
         Content-Type: application/json",
        crate::capabilities::outbound::quote(&text)
    ))
}

/// The response header that marks an answer to a resend (the original event, nothing new).
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

/// The member of a 400 answer that says the body was damaged on its way, not refused: the
/// event was never seen, and sending the same request again can succeed. A client that sets an
/// event aside on the engine's refusal (the forwarder: a body that is one `error` member and
/// nothing else) must not set this one aside: a proxy that cut the body short, or a link that
/// broke the chunked framing, is not the event's fault.
pub const RESEND_MEMBER: &str = "resend";

/// The answer to a body whose framing broke: 400 (the request as received is malformed), with
/// [`RESEND_MEMBER`], and the connection closed (its framing cannot be trusted any more).
fn transport_failure(message: String) -> Response {
    closing(
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "error": message, RESEND_MEMBER: true })),
        )
            .into_response(),
    )
}

/// An answer after which the connection is closed: the rest of the request body is unwanted.
fn error_and_close(status: StatusCode, message: impl Into<String>) -> Response {
    closing(error(status, message))
}

/// `response` with `Connection: close`.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn job_complete(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The listener records the peer on every request; absent only when the router is driven
    // by something else.
    let peer = peer
        .map(|Extension(ConnectInfo(peer))| peer.to_string())
        .unwrap_or_default();
    let too_large = |state: &AppState| {
        state.metrics.event_rejected();
        state.metrics.body_too_large();
        error_and_close(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the limit of {} bytes ([server] \
                 max_body_bytes); a job context is a few hundred bytes",
                state.max_body_bytes
            ),
        )
    };
    // Refused before a byte of the body is read.
    if let Some(length) = headers.get(header::CONTENT_LENGTH)
        && length
            .to_str()
            .ok()
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|l| l > state.max_body_bytes as u64)
    {
        return too_large(&state);
    }
    // A compressed body would be refused as JSON that is not JSON; say what it is.
    if let Some((name, coding)) = body_coding(&headers) {
        state.metrics.event_rejected();
        return error_and_close(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the request body has {name} {}; send the job context uncompressed, without \
                 {name}",
                crate::capabilities::outbound::quote(&coding)
            ),
        );
    }
    if unframed(&headers) {
        state.metrics.event_rejected();
        return length_required("the job context (a JSON object)");
    }
    let key = match idempotency::key_of(&headers) {
        Ok(key) => key,
        Err(e) => {
            state.metrics.event_rejected();
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let forwarder = forwarders::name_of(&headers);
    let bytes = match read_body(body, state.max_body_bytes, state.body_read_timeout).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(&state),
        Err(BodyError::TimedOut) => {
            state.metrics.event_rejected();
            state.metrics.connection_timed_out("body");
            tracing::info!(
                %peer,
                "request refused: its body did not arrive within [server] body_read_timeout_ms \
                 ({} ms)",
                state.body_read_timeout.as_millis()
            );
            return error_and_close(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms ([server] body_read_timeout_ms)",
                    state.body_read_timeout.as_millis()
                ),
            );
        }
        Err(BodyError::Broken(e)) => {
            state.metrics.event_rejected();
            tracing::info!(%peer, "request refused: its body could not be read: {e}");
            return transport_failure(format!("the request body could not be read: {e}"));
        }
    };
    let context = match JobContext::from_json_bytes(&bytes) {
        Ok(c) => c,
        Err(e) => {
            state.metrics.event_rejected();
            let hint = crate::context::serializer_hint(&bytes)
                .map(str::to_owned)
                .or_else(|| media_type_hint(&headers, &bytes))
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid job context: {e}{hint}"),
            );
        }
    };
    let handlers = state.dispatcher.registry().route(context.job_type_id);
    let key = key.map(|k| Idempotency::new(k, &context, state.idempotency_retention));
    let event = NewEvent {
        id: crate::queue::store::new_event_id(),
        source: crate::queue::store::SOURCE_API.into(),
        context,
        // Keyfactor's handler context carries no message about the job.
        message: None,
        handlers,
    };
    // The commit and what follows it run as a task of their own: a client that goes away
    // meanwhile (a connection closed or half-closed before the answer drops this handler) must
    // not leave an event committed without its acceptance counted, the dispatcher woken or the
    // forwarder's visit recorded.
    match tokio::spawn(commit_event(state.clone(), event, key, forwarder)).await {
        Ok(response) => response,
        Err(e) => {
            COMMIT_FAILURES.tell(|untold| {
                tracing::error!(more_since_last_error = untold, "commit task failed: {e}")
            });
            store_refused(&state, "error");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the event was not accepted: the store failed; retry later",
            )
        }
    }
}

/// Commits an accepted event (once, under its idempotency key) and answers: 202 with its id
/// and deliveries, 409 for a key used for another event, 503 when the store cannot take it.
async fn commit_event(
    state: AppState,
    event: NewEvent,
    key: Option<Idempotency>,
    forwarder: Option<String>,
) -> Response {
    let commit = async {
        match state.store.awaited_writes() {
            // The writer answers this task itself: no blocking thread in between.
            Some(writes) => Ok(writes
                .insert_event_awaited(&event, key.as_ref())
                .await
                .map(|inserted| (event, inserted))),
            None => {
                let store = Arc::clone(&state.store);
                tokio::task::spawn_blocking(move || match &key {
                    Some(key) => store
                        .insert_event_once(&event, key)
                        .map(|inserted| (event, inserted)),
                    None => store.insert_event(&event).map(|()| (event, Inserted::New)),
                })
                .await
            }
        }
    };
    let Ok(committed) = tokio::time::timeout(INGEST_COMMIT_TIMEOUT, commit).await else {
        COMMIT_FAILURES.tell(|untold| {
            tracing::error!(
                more_since_last_error = untold,
                "cannot commit an event: the store did not answer within {INGEST_COMMIT_TIMEOUT:?}"
            )
        });
        let (reason, message) = unavailable(&StoreError::NoAnswer(String::new()));
        store_refused(&state, reason);
        return error(StatusCode::SERVICE_UNAVAILABLE, message);
    };
    if matches!(
        committed,
        Ok(Ok(_) | Err(StoreError::IdempotencyConflict { .. }))
    ) {
        state.store_health.answered();
    }
    let (event_id, deliveries, replayed) = match committed {
        Ok(Ok((event, Inserted::New))) => {
            state
                .metrics
                .event_accepted(crate::queue::store::SOURCE_API, event.handlers.len());
            // An event no handler takes has no delivery to claim.
            if !event.handlers.is_empty() {
                state.dispatcher.wake();
            }
            (event.id, event.handlers, false)
        }
        Ok(Ok((_, Inserted::Existing { event_id, handlers }))) => {
            state.metrics.ingest_replayed();
            (event_id, handlers, true)
        }
        Ok(Err(StoreError::IdempotencyConflict { event_id })) => {
            state.metrics.event_rejected();
            state.metrics.ingest_key_conflict();
            return error(
                StatusCode::CONFLICT,
                format!(
                    "the Idempotency-Key was already used for a different event ({event_id}) \
                     within the last {} s; a new event needs a new key",
                    state.idempotency_retention.as_secs()
                ),
            );
        }
        Ok(Err(e)) => {
            COMMIT_FAILURES.tell(|untold| {
                tracing::error!(
                    more_since_last_error = untold,
                    "cannot commit an event: {e}"
                )
            });
            let (reason, message) = unavailable(&e);
            store_refused(&state, reason);
            return error(StatusCode::SERVICE_UNAVAILABLE, message);
        }
        Err(e) => {
            COMMIT_FAILURES.tell(|untold| {
                tracing::error!(more_since_last_error = untold, "commit task failed: {e}")
            });
            store_refused(&state, "error");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the event was not accepted: the store failed; retry later",
            );
        }
    };
    if let Some(name) = forwarder {
        state.forwarders.accepted(&name, chrono::Utc::now());
    }
    let mut response = (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "event_id": event_id, "deliveries": deliveries })),
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

/// Longest ingest waits for the store to commit an event before answering 503. A commit takes
/// milliseconds (p99 ~2 ms at 1,000 events/s, docs/PERFORMANCE.md); a store that has not
/// answered in 5 s is not answering — a frozen database server, a disk that stopped — and a
/// sender held longer would meet its own timeout without being told why (the forwarder's is
/// 10 s; by hand, requests to an engine whose PostgreSQL server was stopped with SIGSTOP got no
/// answer in 40 s). As for a connection that broke, whether the commit completes later is
/// unknown: resends carry an `Idempotency-Key`.
pub const INGEST_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Failed commits, told through [`STORE_FAILURE_LOG_INTERVAL`].
static COMMIT_FAILURES: LogLimit = LogLimit::new(STORE_FAILURE_LOG_INTERVAL);
/// Failed event reads, likewise.
static READ_FAILURES: LogLimit = LogLimit::new(STORE_FAILURE_LOG_INTERVAL);
/// `/metrics` answered without the delivery states, likewise.
static METRICS_FAILURES: LogLimit = LogLimit::new(STORE_FAILURE_LOG_INTERVAL);

/// Counts an event the store could not take, for `reason` (one of
/// [`crate::metrics::STORE_FAILURE_REASONS`]), and keeps it for `/healthz`.
fn store_refused(state: &AppState, reason: &'static str) {
    state.metrics.ingest_store_failed(reason);
    state.store_health.refused(reason, chrono::Utc::now());
}

/// The metric reason and the answer for an event the store could not commit. The answer names
/// the cause in words an operator can act on, without the database's own message (which the
/// log has): a file path or a server address is no business of the sender's. It says "not
/// accepted" rather than "not stored": a connection that broke during the commit leaves it
/// unknown whether the server committed, which is why resends carry an `Idempotency-Key`.
fn unavailable(e: &StoreError) -> (&'static str, String) {
    // Within the commit timeout, or past it: either way the sender hears the same.
    let resend = if matches!(e, StoreError::NoAnswer(_)) {
        " (with the same Idempotency-Key: the commit may still complete)"
    } else {
        ""
    };
    let message = format!(
        "the event was not accepted: {}; retry later{resend}",
        e.plain_cause()
    );
    (store_health::reason_of(e), message)
}

async fn event(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::try_parse(&id) else {
        return error(StatusCode::BAD_REQUEST, "the event id is not a UUID");
    };
    let read = call_within(&state.store, STORE_READ_TIMEOUT, move |store| {
        store.event(id)
    });
    match read.await {
        Ok(Some(view)) => axum::Json(view).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no event {id}")),
        // The store's own words (a database server's message, detail and hint) go to the
        // operator's log, not to the client, as for ingest.
        Err(e) => unreadable(id, &e),
    }
}

/// The answer when event `id` could not be read: the reason is logged, the client is told the
/// cause in plain words and to retry unless the data is damaged ([`StoreError::retry_helps`]):
/// `503` while the store's condition lasts, `500` for anything else.
fn unreadable(id: Uuid, why: &StoreError) -> Response {
    READ_FAILURES.tell(|untold| {
        tracing::error!(
            more_since_last_error = untold,
            "cannot read event {id}: {why}"
        )
    });
    let status = if why.is_transient() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    error(status, unreadable_message(why))
}

/// What [`unreadable`] tells the client.
fn unreadable_message(why: &StoreError) -> String {
    let retry = if why.retry_helps() {
        "; retry later"
    } else {
        ""
    };
    format!("the event could not be read: {}{retry}", why.plain_cause())
}

/// Most entries `unconfigured` of `GET /v1/handlers` lists, the first by name: a store that
/// holds deliveries under many names (renamed handlers, another node's configuration) must not
/// make every answer that long, as it must not make every scrape (the same bound).
const MAX_UNCONFIGURED_LISTED: usize = crate::metrics::MAX_PENDING_SERIES;

async fn handlers(State(state): State<AppState>) -> Response {
    let registry = state.dispatcher.registry();
    let counted = call_within(&state.store, STORE_READ_TIMEOUT, |store| {
        Ok((store.pending_by_handler()?, store.failed_by_handler()?))
    });
    type Counts = std::collections::BTreeMap<String, u64>;
    // The list is answered without the counts when the store does not answer in time.
    let counts: Option<(Counts, Counts)> = match counted.await {
        Ok((pending, failed)) => {
            Some((pending.into_iter().collect(), failed.into_iter().collect()))
        }
        Err(e) => {
            READ_FAILURES.tell(|untold| {
                tracing::warn!(
                    more_since_last_warning = untold,
                    "handlers listed without their pending and failed deliveries: {e}"
                )
            });
            None
        }
    };
    let count_of = |counts: &Counts, name: &str| counts.get(name).copied().unwrap_or(0);
    let list: Vec<HandlerSummary> = registry
        .handlers()
        .map(|h| HandlerSummary {
            pending: counts
                .as_ref()
                .map(|(pending, _)| count_of(pending, &h.config.name)),
            failed: counts
                .as_ref()
                .map(|(_, failed)| count_of(failed, &h.config.name)),
            ..HandlerSummary::of(h)
        })
        .collect();
    // Deliveries under a name no handler here has (renamed or removed, or another node's):
    // pending ones wait for a handler of that name, failed ones for retention or a retry, and
    // running ones (of a handler a reload removed) finish with the handler they started with.
    let running = state.dispatcher.running_unconfigured();
    let stored = counts
        .iter()
        .flat_map(|(pending, failed)| pending.keys().chain(failed.keys()));
    let names: std::collections::BTreeSet<&String> = stored
        .chain(running.keys())
        .filter(|name| registry.get(name).is_none())
        .collect();
    let unconfigured: Vec<Value> = names
        .into_iter()
        .take(MAX_UNCONFIGURED_LISTED)
        .map(|name| {
            let mut entry = json!({
                "name": name,
                "running": running.get(name).copied().unwrap_or(0),
            });
            if let Some((pending, failed)) = &counts {
                entry["pending"] = json!(count_of(pending, name));
                entry["failed"] = json!(count_of(failed, name));
            }
            entry
        })
        .collect();
    axum::Json(json!({ "handlers": list, "unconfigured": unconfigured })).into_response()
}

async fn forwarder_list(State(state): State<AppState>) -> Response {
    axum::Json(json!({ "forwarders": state.forwarders.list() })).into_response()
}

async fn failed_list(
    State(state): State<AppState>,
    query: Result<Query<failed_deliveries::ListQuery>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).map_err(|e| e.body_text());
    let (status, body) = failed_deliveries::list(&state.store, query).await;
    (status, axum::Json(body)).into_response()
}

async fn retry_failed(State(state): State<AppState>, request: Request) -> Response {
    let limit = failed_deliveries::MAX_RETRY_BODY;
    if let Some((name, coding)) = body_coding(request.headers()) {
        return error_and_close(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the request body has {name} {}; send it uncompressed, without {name}",
                crate::capabilities::outbound::quote(&coding)
            ),
        );
    }
    if unframed(request.headers()) {
        return length_required("a JSON object naming a handler, an event_id or both");
    }
    match read_body(request.into_body(), limit, state.body_read_timeout).await {
        Ok(body) => {
            let (status, body) =
                failed_deliveries::retry(&state.store, &state.dispatcher, &body).await;
            (status, axum::Json(body)).into_response()
        }
        Err(BodyError::TooLarge) => error_and_close(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is over {limit} bytes: a retry request names a handler, an event or both"
            ),
        ),
        Err(BodyError::TimedOut) => error_and_close(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} ms ([server] body_read_timeout_ms)",
                state.body_read_timeout.as_millis()
            ),
        ),
        Err(BodyError::Broken(_)) => error(StatusCode::BAD_REQUEST, "the body could not be read"),
    }
}

async fn reload(State(state): State<AppState>) -> Response {
    match (state.reload)().await {
        Ok(report) => axum::Json(json!({
            "reloaded": true,
            "handlers": report.handlers,
            "added": report.added,
            "changed": report.changed,
            "removed": report.removed,
            "secrets_reloaded": report.secrets_reloaded,
            "restart_required": report.restart_required,
            "waiting_for_unconfigured": report.waiting_for_unconfigured,
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("configuration refused, the running one stays: {e}"),
        ),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let registry = state.dispatcher.registry();
    axum::Json(json!({
        "status": "ok",
        "handlers": registry.handlers().count(),
        "quarantined": registry.quarantined(),
        "store": state.store_health.report(),
    }))
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let read = call_within(&state.store, STORE_READ_TIMEOUT, |store| {
        Ok((
            store.count_by_state()?,
            store.pending_by_handler()?,
            store.failed_by_handler()?,
        ))
    });
    let counts = match read.await {
        Ok(counts) => Some(counts),
        Err(e) => {
            METRICS_FAILURES.tell(|untold| {
                tracing::warn!(
                    more_since_last_warning = untold,
                    "metrics without the delivery states: {e}"
                )
            });
            None
        }
    };
    let by_state: Option<Vec<(&str, u64)>> = counts
        .as_ref()
        .map(|(counts, _, _)| counts.iter().map(|(s, n)| (s.as_str(), *n)).collect());
    let store_counts =
        by_state
            .as_deref()
            .zip(counts.as_ref())
            .map(|(by_state, (_, pending, failed))| StoreCounts {
                by_state,
                pending_by_handler: pending,
                failed_by_handler: failed,
            });
    let (known, silence) = state.forwarders.summary(chrono::Utc::now());
    state.metrics.forwarders(known, silence);
    let text = state.metrics.render(
        store_counts.as_ref(),
        state.dispatcher.registry().quarantined(),
    );
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    (headers, text).into_response()
}

/// Reads a request body of at most `limit` bytes within `timeout`.
pub async fn read_body(
    body: axum::body::Body,
    limit: usize,
    timeout: Duration,
) -> Result<bytes::Bytes, BodyError> {
    use http_body_util::BodyExt as _;
    let read = async {
        let mut body = body;
        let mut bytes = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Broken(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if data.len() > limit.saturating_sub(bytes.len()) {
                    return Err(BodyError::TooLarge);
                }
                bytes.extend_from_slice(&data);
            }
        }
        Ok(bytes.freeze())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(BodyError::TimedOut),
    }
}

/// Why a request body was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// It is longer than the limit.
    #[error("the request body is larger than the limit")]
    TooLarge,
    /// It did not arrive in time.
    #[error("the request body did not arrive within the time allowed")]
    TimedOut,
    /// The connection failed or the framing was wrong.
    #[error("the request body could not be read: {0}")]
    Broken(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ingest's 503 names the store's cause in the words every endpoint uses, and tells a
    /// sender whose commit got no answer to resend with its key.
    #[test]
    fn an_event_the_store_refused_is_answered_with_its_cause() {
        for (e, said) in [
            (
                StoreError::DiskFull("/data: ENOSPC".into()),
                "the event was not accepted: the store is out of disk space; retry later",
            ),
            (
                StoreError::ReadOnly("x".into()),
                "the event was not accepted: the store takes no writes (read-only); retry later",
            ),
            (
                StoreError::Unreachable("db:5432".into()),
                "the event was not accepted: the store's database cannot be reached; retry later",
            ),
            (
                StoreError::Refused("FATAL: password authentication failed".into()),
                "the event was not accepted: the store's database server refused the engine's \
                 connection (the engine's log says why); retry later",
            ),
            (
                StoreError::NoAnswer(String::new()),
                "the event was not accepted: the store did not answer in time; retry later (with \
                 the same Idempotency-Key: the commit may still complete)",
            ),
            (
                StoreError::Database("syntax".into()),
                "the event was not accepted: the store failed; retry later",
            ),
            // The sender keeps the event until an operator has restored the store.
            (
                StoreError::Corrupt("database disk image is malformed".into()),
                "the event was not accepted: the store's data is damaged (the engine's log says \
                 what to do); retry later",
            ),
        ] {
            assert_eq!(unavailable(&e).1, said, "{e}");
        }
    }

    /// A read is told to retry while the store's condition may pass, and not when its data is
    /// damaged: no retry reads it until an operator has restored the store.
    #[test]
    fn an_event_the_store_could_not_read_is_answered_with_what_to_do() {
        for (e, said) in [
            (
                StoreError::Unreachable("db:5432".into()),
                "the event could not be read: the store's database cannot be reached; retry later",
            ),
            (
                StoreError::Database("syntax".into()),
                "the event could not be read: the store failed; retry later",
            ),
            (
                StoreError::Corrupt("database disk image is malformed".into()),
                "the event could not be read: the store's data is damaged (the engine's log says \
                 what to do)",
            ),
        ] {
            assert_eq!(unreadable_message(&e), said, "{e}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    /// A body that is not JSON under a label that is not JSON is refused naming the label,
    /// quoted, escaped and cut short; JSON labels and JSON bodies get no such hint.
    #[test]
    fn a_body_that_is_not_json_names_a_media_type_that_is_not_json() {
        let hint = |content_type: &[u8], body: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_bytes(content_type).unwrap(),
            );
            media_type_hint(&headers, body)
        };
        let form = hint(b"application/x-www-form-urlencoded", b"JobId=1&Result=2");
        assert!(
            form.as_deref().is_some_and(|h| h.contains(
                "Content-Type is \"application/x-www-form-urlencoded\": send the job context as a JSON object"
            )),
            "{form:?}"
        );
        // A hostile label is quoted with its controls escaped, never written raw (a header
        // cannot hold a C0 control; a bidirectional override arrives as UTF-8).
        let forged = hint(b"text/xml\xe2\x80\xaegnp.exe", b"<a/>").unwrap_or_default();
        assert!(
            !forged.contains('\u{202e}') && forged.contains("\\u{202e}"),
            "{forged}"
        );
        // The rest of the class: other invisible or reordering characters (an isolate, a
        // zero-width space, a C1 control), a tab (the one control a header may hold), a quote
        // that would end the quoted label, and bytes that are not UTF-8.
        for (label, raw, escaped) in [
            (&b"text/xml\xe2\x81\xa6x"[..], "\u{2066}", "\\u{2066}"),
            (b"text/xml\xe2\x80\x8bx", "\u{200b}", "\\u{200b}"),
            (b"text/xml\xc2\x85x", "\u{85}", "\\u{85}"),
            (b"text/xml\tx", "\t", "\\t"),
            (b"text/x\"y", "x\"y", "x\\\"y"),
        ] {
            let shown = hint(label, b"<a/>").unwrap_or_default();
            assert!(
                !shown.contains(raw) && shown.contains(escaped),
                "{label:?}: {shown}"
            );
        }
        let lossy = hint(b"text/\xff\xfe", b"<a/>").unwrap_or_default();
        assert!(lossy.contains("\"text/\u{fffd}\u{fffd}\""), "{lossy}");
        // A label of 8,000 characters is repeated up to the quoting limit only.
        let long = format!("text/{}", "x".repeat(8_000));
        let cut = hint(long.as_bytes(), b"<a/>").unwrap_or_default();
        let kept = crate::excerpt::MAX_QUOTED_CHARS - "text/".len();
        assert!(
            cut.contains(&format!("\"text/{}…\"", "x".repeat(kept))),
            "{} bytes: {cut}",
            cut.len()
        );
        // JSON labels, and JSON bodies whatever their label, have nothing to change here.
        for json_type in [
            &b"application/json"[..],
            b"Application/JSON; charset=utf-8",
            b"text/json",
            b"application/problem+json",
        ] {
            assert_eq!(hint(json_type, b"JobId=1"), None);
        }
        assert_eq!(hint(b"text/plain", b"{\"JobId\": 1}"), None);
        assert_eq!(media_type_hint(&HeaderMap::new(), b"JobId=1"), None);
    }

    /// Every way a sender can say its body is compressed is caught: either header, a list in
    /// one value, a second header after a plain one, any case; the plain codings are not.
    #[test]
    fn a_compressed_body_is_found_in_every_header_and_list() {
        let with = |pairs: &[(&str, &[u8])]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(
                    axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(value).unwrap(),
                );
            }
            body_coding(&headers)
        };
        let found = |name: &str, coding: &str| Some((name_of(name), coding.to_owned()));
        fn name_of(name: &str) -> &'static str {
            if name == "ce" {
                "Content-Encoding"
            } else {
                "Transfer-Encoding"
            }
        }
        assert_eq!(with(&[("content-encoding", b"gzip")]), found("ce", "gzip"));
        assert_eq!(
            with(&[("Content-Encoding", b"identity, br")]),
            found("ce", "br")
        );
        assert_eq!(
            with(&[
                ("content-encoding", b"identity"),
                ("content-encoding", b"deflate")
            ]),
            found("ce", "deflate")
        );
        assert_eq!(
            with(&[("transfer-encoding", b"gzip, chunked")]),
            found("te", "gzip")
        );
        assert_eq!(
            with(&[("content-encoding", b"x-\xff")]).map(|f| f.0),
            Some("Content-Encoding")
        );
        let plain: [&[(&str, &[u8])]; 3] = [
            &[("content-encoding", b"IDENTITY")],
            &[("transfer-encoding", b"Chunked")],
            &[],
        ];
        for headers in plain {
            assert_eq!(with(headers), None, "{headers:?}");
        }
    }

    #[test]
    fn a_sender_token_opens_everything_only_without_admin_tokens() {
        let senders_only = AcceptedTokens {
            senders: vec!["send".into()],
            admins: vec![],
        };
        assert_eq!(senders_only.access(Some("send")), Access::Everything);
        assert_eq!(senders_only.access(Some("sen")), Access::None);
        assert_eq!(senders_only.access(None), Access::None);
        let both = AcceptedTokens {
            senders: vec!["send".into(), "send-2".into()],
            admins: vec!["admin".into()],
        };
        assert_eq!(both.access(Some("send-2")), Access::Sending);
        assert_eq!(both.access(Some("admin")), Access::Everything);
        assert_eq!(both.access(Some("admin ")), Access::None);
        assert_eq!(both.access(Some("")), Access::None);
        let admins_only = AcceptedTokens {
            senders: vec![],
            admins: vec!["admin".into()],
        };
        assert_eq!(admins_only.access(Some("admin")), Access::Everything);
        assert_eq!(admins_only.access(Some("send")), Access::None);
        assert!(AcceptedTokens::default().is_empty());
        assert!(!admins_only.is_empty());
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let body = axum::body::Body::from(vec![b'x'; 100]);
        assert_eq!(
            read_body(body, 99, Duration::from_secs(1)).await,
            Err(BodyError::TooLarge)
        );
        let body = axum::body::Body::from(vec![b'x'; 100]);
        assert_eq!(
            read_body(body, 100, Duration::from_secs(1))
                .await
                .map(|b| b.len()),
            Ok(100)
        );
    }
}
