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
//! - `GET /healthz` (never authenticated) and `GET /metrics`.
//!
//! With `server.tokens` configured every endpoint but `/healthz` needs
//! `Authorization: Bearer <token>`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use uuid::Uuid;

use crate::context::JobContext;
use crate::metrics::{CONTENT_TYPE, Metrics};
use crate::queue::dispatch::{Dispatcher, HandlerSummary};
use crate::queue::store::{EventStore, Idempotency, Inserted, NewEvent, StoreError};
use crate::sources::forwarders::{self, Forwarders};
use crate::sources::idempotency;

/// Reloads the configuration: resolves to the loaded handler names, or to the reason the new
/// configuration was refused (the running one then stays).
pub type Reloader = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>> + Send + Sync,
>;

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
    pub tokens: Arc<Vec<String>>,
    /// Largest request body read.
    pub max_body_bytes: usize,
    /// Configuration reload.
    pub reload: Reloader,
    /// How long an `Idempotency-Key` holds.
    pub idempotency_retention: Duration,
    /// The forwarders heard from.
    pub forwarders: Arc<Forwarders>,
}

/// The router with every endpoint.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/job-complete", post(job_complete))
        .route("/v1/events/{id}", get(event))
        .route("/v1/handlers", get(handlers))
        .route("/v1/forwarders", get(forwarder_list))
        .route("/v1/admin/reload", post(reload))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.tokens.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|p| {
        state.tokens.iter().fold(false, |found, t| {
            found | constant_time_eq(p.as_bytes(), t.as_bytes())
        })
    });
    if ok {
        return next.run(request).await;
    }
    state.metrics.event_rejected();
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (send Authorization: Bearer <token>)",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Compares secrets without an early exit, so timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The response header that marks an answer to a resend (the original event, nothing new).
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

async fn job_complete(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let key = match idempotency::key_of(&headers) {
        Ok(key) => key,
        Err(e) => {
            state.metrics.event_rejected();
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let forwarder = forwarders::name_of(&headers);
    let bytes = match to_bytes(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            state.metrics.event_rejected();
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "request body is larger than {} bytes, or could not be read",
                    state.max_body_bytes
                ),
            );
        }
    };
    let context = match JobContext::from_json_bytes(&bytes) {
        Ok(c) => c,
        Err(e) => {
            state.metrics.event_rejected();
            let hint = crate::context::serializer_hint(&bytes)
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
        id: Uuid::new_v4(),
        source: crate::queue::store::SOURCE_API.into(),
        context,
        // Keyfactor's handler context carries no message about the job.
        message: None,
        handlers,
    };
    let store = Arc::clone(&state.store);
    let committed = tokio::task::spawn_blocking(move || match &key {
        Some(key) => store
            .insert_event_once(&event, key)
            .map(|inserted| (event, inserted)),
        None => store.insert_event(&event).map(|()| (event, Inserted::New)),
    })
    .await;
    let (event_id, deliveries, replayed) = match committed {
        Ok(Ok((event, Inserted::New))) => {
            state.metrics.event_accepted("api");
            state.dispatcher.wake();
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
            tracing::error!("cannot commit an event: {e}");
            let (reason, message) = unavailable(&e);
            state.metrics.ingest_store_failed(reason);
            return error(StatusCode::SERVICE_UNAVAILABLE, message);
        }
        Err(e) => {
            tracing::error!("commit task failed: {e}");
            state.metrics.ingest_store_failed("error");
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

/// The metric reason and the answer for an event the store could not commit. The answer names
/// the cause in words an operator can act on, without the database's own message (which the
/// log has): a file path or a server address is no business of the sender's. It says "not
/// accepted" rather than "not stored": a connection that broke during the commit leaves it
/// unknown whether the server committed, which is why resends carry an `Idempotency-Key`.
fn unavailable(e: &StoreError) -> (&'static str, &'static str) {
    match e {
        StoreError::DiskFull(_) => (
            "disk-full",
            "the event was not accepted: the store is out of disk space; retry later",
        ),
        StoreError::Unreachable(_) => (
            "unreachable",
            "the event was not accepted: the store's database cannot be reached; retry later",
        ),
        _ => (
            "error",
            "the event was not accepted: the store failed; retry later",
        ),
    }
}

async fn event(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::try_parse(&id) else {
        return error(StatusCode::BAD_REQUEST, "the event id is not a UUID");
    };
    let store = Arc::clone(&state.store);
    match tokio::task::spawn_blocking(move || store.event(id)).await {
        Ok(Ok(Some(view))) => axum::Json(view).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no event {id}")),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn handlers(State(state): State<AppState>) -> Response {
    let registry = state.dispatcher.registry();
    let list: Vec<HandlerSummary> = registry.handlers().map(|h| HandlerSummary::of(h)).collect();
    axum::Json(json!({ "handlers": list })).into_response()
}

async fn forwarder_list(State(state): State<AppState>) -> Response {
    axum::Json(json!({ "forwarders": state.forwarders.list() })).into_response()
}

async fn reload(State(state): State<AppState>) -> Response {
    match (state.reload)().await {
        Ok(names) => axum::Json(json!({ "reloaded": true, "handlers": names })).into_response(),
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
    }))
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let store = Arc::clone(&state.store);
    let counts = tokio::task::spawn_blocking(move || store.count_by_state())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let by_state: Vec<(&str, u64)> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let (known, silence) = state.forwarders.summary(chrono::Utc::now());
    state.metrics.forwarders(known, silence);
    let text = state
        .metrics
        .render(&by_state, state.dispatcher.registry().quarantined());
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    (headers, text).into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
