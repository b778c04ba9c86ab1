//! A stand-in for ServiceNow's Table API on 127.0.0.1, for the `servicenow-incident` example's
//! end-to-end tests: `GET` and `POST /api/now/table/incident`, in the shapes ServiceNow
//! documents (the Table API reference: `{"result": [...]}` for a query, `201 {"result":
//! {...}}` with a `Location` header for an insert, `sysparm_query` with `=` and `^`,
//! `sysparm_fields`, `sysparm_limit`).
//!
//! It is strict where ServiceNow is lenient, so that a handler's mistake fails a test: it
//! wants Basic or Bearer credentials it knows (401 otherwise), `Accept` allowing JSON, and for
//! an insert `Content-Type: application/json`, a JSON object of string values, only the incident
//! fields in [`INCIDENT_FIELDS`], a `short_description` and a `correlation_id`, `urgency` and
//! `impact` of `1`–`3`, a `short_description` of at most 160 characters, and sys_ids (32 hex
//! characters) in `caller_id` and `assignment_group`. Like an instance with default settings,
//! a query on a field it does not know ignores that part of the query. Error bodies have
//! ServiceNow's `{"error": {"message", "detail"}, "status": "failure"}` shape; their wording is
//! the stand-in's own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The fields an insert may set: those the example sends and a few more of the incident form.
pub const INCIDENT_FIELDS: &[&str] = &[
    "short_description",
    "description",
    "urgency",
    "impact",
    "caller_id",
    "assignment_group",
    "correlation_id",
    "correlation_display",
    "category",
    "subcategory",
    "contact_type",
    "cmdb_ci",
];

/// Fields a query may filter on (anything else is ignored, as an instance does by default).
const QUERY_FIELDS: &[&str] = &["correlation_id", "active", "number", "sys_id", "state"];

/// Largest request body read; an incident is a few KiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The longest `short_description` accepted: the field's usual length on a default instance
/// (not stated in the Table API reference).
pub const MAX_SHORT_DESCRIPTION: usize = 160;

/// One request as the stand-in received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRequest {
    /// The method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The raw query string.
    pub query: Option<String>,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl TableRequest {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of query parameter `name`, decoded.
    pub fn query_value(&self, name: &str) -> Option<String> {
        query_pairs(self.query.as_deref())
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

#[derive(Default)]
struct Inner {
    requests: Vec<TableRequest>,
    records: Vec<Map<String, Value>>,
}

struct Shared {
    username: String,
    password: String,
    token: String,
    inner: Mutex<Inner>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared
        .inner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running Table API stand-in; stopped when dropped.
pub struct TableApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TableApi {
    /// Starts it on `127.0.0.1:0`, accepting Basic `username:password` and Bearer `token`.
    pub async fn start(username: &str, password: &str, token: &str) -> std::io::Result<TableApi> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            username: username.to_owned(),
            password: password.to_owned(),
            token: token.to_owned(),
            inner: Mutex::new(Inner::default()),
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
        Ok(TableApi {
            addr,
            shared,
            shutdown: Some(tx),
        })
    }

    /// The instance URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, refused ones included.
    pub fn requests(&self) -> Vec<TableRequest> {
        lock(&self.shared).requests.clone()
    }

    /// The incident records stored so far.
    pub fn records(&self) -> Vec<Map<String, Value>> {
        lock(&self.shared).records.clone()
    }

    /// Sets `field` of every stored record to `value` (e.g. `active` to `"false"` when an
    /// incident is resolved).
    pub fn set_all(&self, field: &str, value: &str) {
        for record in &mut lock(&self.shared).records {
            record.insert(field.to_owned(), Value::String(value.to_owned()));
        }
    }
}

impl Drop for TableApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    url_decode_pairs(query.unwrap_or_default())
}

/// `application/x-www-form-urlencoded` pairs (what a query string is).
fn url_decode_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(v) = hex {
                    out.push(v);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// ServiceNow's error body.
fn failure(status: StatusCode, message: &str, detail: impl Into<String>) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "detail": detail.into()}, "status": "failure"}),
        ),
    )
        .into_response()
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(encoded) = value.strip_prefix("Basic ") {
        let expected = format!("{}:{}", shared.username, shared.password);
        return base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .is_ok_and(|d| d == expected.as_bytes());
    }
    value.strip_prefix("Bearer ") == Some(shared.token.as_str())
}

fn accepts_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|accept| {
            accept.split(',').any(|t| {
                let t = t.split(';').next().unwrap_or_default().trim();
                t.eq_ignore_ascii_case("application/json") || t == "*/*"
            })
        })
}

/// The fields of `record` named in `sysparm_fields` (all when absent).
fn project(record: &Map<String, Value>, fields: Option<&str>) -> Value {
    match fields {
        None => Value::Object(record.clone()),
        Some(list) => Value::Object(
            list.split(',')
                .map(str::trim)
                .filter_map(|f| record.get(f).map(|v| (f.to_owned(), v.clone())))
                .collect(),
        ),
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .unwrap_or_default();
    let recorded = TableRequest {
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
    lock(&shared).requests.push(recorded.clone());

    if recorded.path != "/api/now/table/incident" {
        return failure(
            StatusCode::BAD_REQUEST,
            "Invalid table",
            format!("No table behind {}", recorded.path),
        );
    }
    if !authorized(&shared, &parts.headers) {
        return failure(
            StatusCode::UNAUTHORIZED,
            "User Not Authenticated",
            "Required to provide Auth information",
        );
    }
    if !accepts_json(&parts.headers) {
        return failure(
            StatusCode::NOT_ACCEPTABLE,
            "Invalid Accept header",
            "Accept must allow application/json",
        );
    }
    let pairs = query_pairs(recorded.query.as_deref());
    let param = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match parts.method {
        Method::GET => {
            let conditions: Vec<(&str, &str)> = param("sysparm_query")
                .unwrap_or_default()
                .split('^')
                .filter_map(|c| c.split_once('='))
                .filter(|(field, _)| QUERY_FIELDS.contains(field))
                .collect();
            let limit = match param("sysparm_limit").map(str::parse::<usize>) {
                None => 10_000,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "Invalid sysparm_limit",
                        "sysparm_limit must be a number",
                    );
                }
            };
            let inner = lock(&shared);
            let result: Vec<Value> = inner
                .records
                .iter()
                .filter(|r| {
                    conditions
                        .iter()
                        .all(|(f, v)| r.get(*f).and_then(Value::as_str) == Some(*v))
                })
                .take(limit)
                .map(|r| project(r, param("sysparm_fields")))
                .collect();
            axum::Json(json!({ "result": result })).into_response()
        }
        Method::POST => insert(&shared, &parts.headers, &body, param("sysparm_fields")),
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not supported",
            "the stand-in serves GET and POST",
        ),
    }
}

fn is_sys_id(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

fn insert(shared: &Shared, headers: &HeaderMap, body: &[u8], fields: Option<&str>) -> Response {
    let bad = |detail: String| failure(StatusCode::BAD_REQUEST, "Invalid request", detail);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        return failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Invalid Content-Type",
            format!("expected application/json, got '{content_type}'"),
        );
    }
    let Ok(Value::Object(input)) = serde_json::from_slice::<Value>(body) else {
        return bad("the body must be a JSON object".into());
    };
    let mut record = Map::new();
    for (name, value) in &input {
        if !INCIDENT_FIELDS.contains(&name.as_str()) {
            return bad(format!("unknown or read-only field '{name}'"));
        }
        let Value::String(text) = value else {
            return bad(format!("field '{name}' must be a string"));
        };
        record.insert(name.clone(), Value::String(text.clone()));
    }
    let text = |name: &str| record.get(name).and_then(Value::as_str).unwrap_or_default();
    if text("short_description").trim().is_empty() {
        return bad("short_description is required".into());
    }
    if text("short_description").chars().count() > MAX_SHORT_DESCRIPTION {
        return bad(format!(
            "short_description is longer than {MAX_SHORT_DESCRIPTION} characters"
        ));
    }
    if text("correlation_id").trim().is_empty() {
        return bad("correlation_id is required".into());
    }
    for level in ["urgency", "impact"] {
        if record.contains_key(level) && !matches!(text(level), "1" | "2" | "3") {
            return bad(format!("{level} must be \"1\", \"2\" or \"3\""));
        }
    }
    for reference in ["caller_id", "assignment_group"] {
        if record.contains_key(reference) && !is_sys_id(text(reference)) {
            return bad(format!("{reference} must be a sys_id"));
        }
    }
    let mut inner = lock(shared);
    let n = inner.records.len() + 1;
    let sys_id = format!("{n:032x}");
    record.insert("sys_id".into(), json!(sys_id));
    record.insert("number".into(), json!(format!("INC{:07}", 10_000 + n)));
    record.insert("active".into(), json!("true"));
    record.insert("state".into(), json!("1"));
    for level in ["urgency", "impact"] {
        record.entry(level).or_insert_with(|| json!("3"));
    }
    let result = project(&record, fields);
    inner.records.push(record);
    let mut response =
        (StatusCode::CREATED, axum::Json(json!({ "result": result }))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/now/table/incident/{sys_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}
