//! A stand-in for a Microsoft Teams Workflows webhook trigger ("When a Teams webhook request is
//! received") on 127.0.0.1, for the `teams-notify` example's end-to-end tests.
//!
//! Like the trigger it answers `202 Accepted` to a `POST` of a message envelope carrying an
//! Adaptive Card — `{"type": "message", "attachments": [{"contentType":
//! "application/vnd.microsoft.card.adaptive", "content": {"type": "AdaptiveCard", "version":
//! "1.x", "body": [...]}}]}` — at its URL, whose query carries the signature (`sig=`); a wrong
//! or missing signature is a 401. Anything else is refused with a 400 saying what is wrong
//! (Workflows accept only Adaptive Cards; the error wording is the stand-in's own). Every
//! request is recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The trigger's path, as a Workflows URL has it.
pub const TRIGGER_PATH: &str =
    "/workflows/8d5e2c1b0a9f4e3d8c7b6a5f4e3d2c1b/triggers/manual/paths/invoke";

/// Largest body read (Teams refuses messages over about 28 KB; a little room above that).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// One request as the trigger received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The raw query.
    pub query: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

struct Shared {
    signature: String,
    received: Mutex<Vec<Received>>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Vec<Received>> {
    shared
        .received
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running trigger stand-in; stopped when dropped.
pub struct WorkflowsTrigger {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl WorkflowsTrigger {
    /// Starts it on `127.0.0.1:0`, accepting requests signed with `signature`.
    pub async fn start(signature: &str) -> std::io::Result<WorkflowsTrigger> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            signature: signature.to_owned(),
            received: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(WorkflowsTrigger {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The full trigger URL with its query and signature, what the flow shows as its HTTP POST
    /// URL.
    pub fn url(&self) -> String {
        format!(
            "{}{TRIGGER_PATH}?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={}",
            self.origin(),
            self.shared.signature
        )
    }

    /// Every request so far, refused ones included.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared).clone()
    }
}

impl Drop for WorkflowsTrigger {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

/// Why `body` is not a message envelope with Adaptive Cards, if it is not.
pub fn envelope_problem(body: &[u8]) -> Option<String> {
    let Ok(message) = serde_json::from_slice::<Value>(body) else {
        return Some("the body is not JSON".into());
    };
    if message["type"] != "message" {
        return Some("\"type\" must be \"message\"".into());
    }
    let Some(attachments) = message["attachments"].as_array().filter(|a| !a.is_empty()) else {
        return Some("\"attachments\" must be a non-empty array".into());
    };
    for attachment in attachments {
        if attachment["contentType"] != "application/vnd.microsoft.card.adaptive" {
            return Some(
                "every attachment must be an Adaptive Card (application/vnd.microsoft.card.adaptive)"
                    .into(),
            );
        }
        let card = &attachment["content"];
        if card["type"] != "AdaptiveCard" {
            return Some("an attachment's content must be an AdaptiveCard".into());
        }
        if !card["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1."))
        {
            return Some("the card needs a \"version\" such as \"1.4\"".into());
        }
        if !card["body"].is_array() {
            return Some("the card needs a \"body\" array".into());
        }
    }
    None
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .unwrap_or_default();
    let received = Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: body.to_vec(),
    };
    lock(&shared).push(received.clone());

    if received.path != TRIGGER_PATH {
        return refuse(
            StatusCode::NOT_FOUND,
            "TriggerNotFound",
            "no trigger at this path",
        );
    }
    let signed = received
        .query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair.strip_prefix("sig=") == Some(shared.signature.as_str()));
    if !signed {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "DirectApiAuthorizationRequired",
            "the request is not signed",
        );
    }
    if parts.method != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "POST only",
        );
    }
    let json = received
        .content_type
        .as_deref()
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return refuse(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "the body must be application/json",
        );
    }
    if let Some(problem) = envelope_problem(&body) {
        return refuse(StatusCode::BAD_REQUEST, "InvalidRequestContent", problem);
    }
    StatusCode::ACCEPTED.into_response()
}
