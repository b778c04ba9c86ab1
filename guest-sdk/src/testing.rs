//! A native test double of the jobhook host, for unit-testing handlers with `cargo test`.
//!
//! Only on non-wasm targets. Build a [`MockHost`] with the properties, delivery facts and canned
//! capability answers a test needs, [`install`](MockHost::install) it on the current thread (so
//! parallel tests do not interfere), run the handler, then assert on what it did:
//!
//! ```
//! use jobhook_sdk::testing::{self, MockHost};
//! use jobhook_sdk::{Context, Handler, JobResult, Result, info};
//!
//! struct Hello;
//! impl Handler for Hello {
//!     fn run(ctx: &Context) -> Result<()> {
//!         info!("{} finished: {}", ctx.job_type, ctx.job_result);
//!         Ok(())
//!     }
//! }
//!
//! let host = MockHost::new().property("RetryThreshold", "3").install();
//! let ctx = Context { job_result: JobResult::Failure, ..testing::context() };
//! assert_eq!(testing::run_handler::<Hello>(&ctx), Ok(()));
//! assert_eq!(host.logs()[0].message, "WinCertInventory finished: Failure");
//! ```
//!
//! A capability call with nothing queued for it answers
//! [`CapabilityError::NotAvailable`], like an engine without that capability configured.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::backend::{self, HttpRequest, KeyfactorRequest, MailMessage, NativeHost, SharedHost};
use crate::log::Level;
use crate::{
    CapabilityError, Context, Error, Handler, JobResult, Method, OperationType, Response, Result,
};

/// What a handler sees of the mock host, and what it did to it.
#[derive(Debug, Default)]
struct HostState {
    properties: BTreeMap<String, String>,
    attempt: u32,
    event_id: Option<String>,
    handler_name: String,
    keyfactor_replies: VecDeque<Result<Response, CapabilityError>>,
    http_replies: VecDeque<Result<Response, CapabilityError>>,
    mail_replies: VecDeque<Result<(), CapabilityError>>,
    accept_all_mail: bool,
    logs: Vec<LogLine>,
    mails: Vec<SentMail>,
    keyfactor_requests: Vec<KeyfactorCall>,
    http_requests: Vec<HttpCall>,
}

impl NativeHost for HostState {
    fn property_get(&mut self, name: &str) -> Option<String> {
        self.properties.get(name).cloned()
    }

    fn property_names(&mut self) -> Vec<String> {
        self.properties.keys().cloned().collect()
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push(LogLine {
            level,
            message: message.to_string(),
        });
    }

    fn attempt(&mut self) -> u32 {
        self.attempt
    }

    fn event_id(&mut self) -> Option<String> {
        self.event_id.clone()
    }

    fn handler_name(&mut self) -> String {
        self.handler_name.clone()
    }

    fn keyfactor_send(&mut self, r: KeyfactorRequest) -> Result<Response, CapabilityError> {
        self.keyfactor_requests.push(KeyfactorCall {
            method: r.method,
            path: r.path,
            query: r.query,
            headers: r.headers,
            body: r.body,
        });
        self.keyfactor_replies.pop_front().unwrap_or_else(|| {
            Err(CapabilityError::NotAvailable(
                "MockHost has no keyfactor response queued (use .keyfactor_response(..))".into(),
            ))
        })
    }

    fn http_send(&mut self, r: HttpRequest) -> Result<Response, CapabilityError> {
        self.http_requests.push(HttpCall {
            method: r.method,
            url: r.url,
            headers: r.headers,
            body: r.body,
        });
        self.http_replies.pop_front().unwrap_or_else(|| {
            Err(CapabilityError::NotAvailable(
                "MockHost has no http response queued (use .http_response(..))".into(),
            ))
        })
    }

    fn mail_send(&mut self, m: MailMessage) -> Result<(), CapabilityError> {
        self.mails.push(SentMail {
            from: m.from,
            to: m.to,
            cc: m.cc,
            subject: m.subject,
            body: m.body,
        });
        match self.mail_replies.pop_front() {
            Some(reply) => reply,
            None if self.accept_all_mail => Ok(()),
            None => Err(CapabilityError::NotAvailable(
                "MockHost has no mail answer queued (use .accept_mail() or .mail_ok())".into(),
            )),
        }
    }
}

/// A builder for the fake host a test installs: properties, delivery facts and the answers the
/// capability calls will get, in order.
#[derive(Debug)]
#[must_use = "a MockHost does nothing until `.install()` is called"]
pub struct MockHost {
    state: HostState,
}

impl Default for MockHost {
    fn default() -> Self {
        Self::new()
    }
}

impl MockHost {
    /// A host with no properties, attempt 1, no event id, handler name `test-handler`, and
    /// nothing queued for any capability.
    pub fn new() -> Self {
        MockHost {
            state: HostState {
                attempt: 1,
                handler_name: "test-handler".into(),
                ..HostState::default()
            },
        }
    }

    /// Sets property `name` to `value`.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.state.properties.insert(name.into(), value.into());
        self
    }

    /// Sets what [`delivery::attempt`](crate::delivery::attempt) returns.
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.state.attempt = attempt;
        self
    }

    /// Sets what [`delivery::event_id`](crate::delivery::event_id) returns.
    pub fn event_id(mut self, id: impl Into<String>) -> Self {
        self.state.event_id = Some(id.into());
        self
    }

    /// Sets what [`delivery::handler_name`](crate::delivery::handler_name) returns.
    pub fn handler_name(mut self, name: impl Into<String>) -> Self {
        self.state.handler_name = name.into();
        self
    }

    /// Queues a Keyfactor API answer with this status and body (e.g. a JSON string).
    pub fn keyfactor_response(self, status: u16, body: impl Into<Vec<u8>>) -> Self {
        self.keyfactor_reply(Ok(Response::new(status, body)))
    }

    /// Queues a Keyfactor API answer with this status and `value` as its JSON body.
    pub fn keyfactor_json(self, status: u16, value: Value) -> Self {
        self.keyfactor_response(status, value.to_string())
    }

    /// Queues a Keyfactor API call that fails with `error` (not granted, timeout, ...).
    pub fn keyfactor_error(self, error: CapabilityError) -> Self {
        self.keyfactor_reply(Err(error))
    }

    /// Queues any answer for the next Keyfactor API call, e.g. a [`Response`] with headers.
    pub fn keyfactor_reply(mut self, reply: Result<Response, CapabilityError>) -> Self {
        self.state.keyfactor_replies.push_back(reply);
        self
    }

    /// Queues an outbound HTTP answer with this status and body.
    pub fn http_response(self, status: u16, body: impl Into<Vec<u8>>) -> Self {
        self.http_reply(Ok(Response::new(status, body)))
    }

    /// Queues an outbound HTTP answer with this status and `value` as its JSON body.
    pub fn http_json(self, status: u16, value: Value) -> Self {
        self.http_response(status, value.to_string())
    }

    /// Queues an outbound HTTP call that fails with `error`.
    pub fn http_error(self, error: CapabilityError) -> Self {
        self.http_reply(Err(error))
    }

    /// Queues any answer for the next outbound HTTP call.
    pub fn http_reply(mut self, reply: Result<Response, CapabilityError>) -> Self {
        self.state.http_replies.push_back(reply);
        self
    }

    /// Accepts every mail for which no other answer is queued.
    pub fn accept_mail(mut self) -> Self {
        self.state.accept_all_mail = true;
        self
    }

    /// Queues acceptance of the next mail.
    pub fn mail_ok(mut self) -> Self {
        self.state.mail_replies.push_back(Ok(()));
        self
    }

    /// Queues a refusal of the next mail with `error`.
    pub fn mail_error(mut self, error: CapabilityError) -> Self {
        self.state.mail_replies.push_back(Err(error));
        self
    }

    /// Installs this host on the current thread until the returned guard is dropped; a host
    /// installed before is put back then.
    pub fn install(self) -> MockHostGuard {
        let state = Rc::new(RefCell::new(self.state));
        let shared: SharedHost = state.clone();
        let previous = backend::install(shared);
        MockHostGuard { state, previous }
    }
}

/// An installed [`MockHost`]: read what the handler did through it; dropping it uninstalls the
/// host.
#[derive(Debug)]
#[must_use = "the mock host is uninstalled as soon as the guard is dropped"]
pub struct MockHostGuard {
    state: Rc<RefCell<HostState>>,
    previous: Option<SharedHost>,
}

impl MockHostGuard {
    fn read<R>(&self, f: impl FnOnce(&HostState) -> R) -> R {
        f(&self.state.borrow())
    }

    /// Every log line, in order.
    pub fn logs(&self) -> Vec<LogLine> {
        self.read(|s| s.logs.clone())
    }

    /// The messages logged at `level`, in order.
    pub fn logs_at(&self, level: Level) -> Vec<String> {
        self.read(|s| {
            s.logs
                .iter()
                .filter(|l| l.level == level)
                .map(|l| l.message.clone())
                .collect()
        })
    }

    /// Whether any log line (at any level) contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.read(|s| s.logs.iter().any(|l| l.message.contains(needle)))
    }

    /// Every message handed to the mail capability, in order, whatever the answer was.
    pub fn mails(&self) -> Vec<SentMail> {
        self.read(|s| s.mails.clone())
    }

    /// Every Keyfactor API request, in order, whatever the answer was.
    pub fn keyfactor_requests(&self) -> Vec<KeyfactorCall> {
        self.read(|s| s.keyfactor_requests.clone())
    }

    /// Every outbound HTTP request, in order, whatever the answer was.
    pub fn http_requests(&self) -> Vec<HttpCall> {
        self.read(|s| s.http_requests.clone())
    }
}

impl Drop for MockHostGuard {
    fn drop(&mut self) {
        let shared: SharedHost = self.state.clone();
        backend::uninstall(&shared, self.previous.take());
    }
}

/// One line the handler logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its level.
    pub level: Level,
    /// Its text.
    pub message: String,
}

/// One message the handler asked the host to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMail {
    /// The requested sender; `None` means the operator's configured From.
    pub from: Option<String>,
    /// `To` recipients.
    pub to: Vec<String>,
    /// `Cc` recipients.
    pub cc: Vec<String>,
    /// The subject line.
    pub subject: String,
    /// The plain-text body.
    pub body: String,
}

/// One Keyfactor API request the handler made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyfactorCall {
    /// The HTTP method.
    pub method: Method,
    /// The path relative to the API base.
    pub path: String,
    /// Query parameters, unencoded, in order.
    pub query: Vec<(String, String)>,
    /// Extra headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<Vec<u8>>,
}

impl KeyfactorCall {
    /// The value of the first query parameter named `name`.
    pub fn query_value(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text, if there is a body and it is UTF-8.
    pub fn body_text(&self) -> Option<String> {
        self.body
            .as_ref()
            .and_then(|b| String::from_utf8(b.clone()).ok())
    }

    /// The body parsed as JSON, if there is a body and it is JSON.
    pub fn body_json(&self) -> Option<Value> {
        self.body
            .as_ref()
            .and_then(|b| serde_json::from_slice(b).ok())
    }
}

/// One outbound HTTP request the handler made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// The HTTP method.
    pub method: Method,
    /// The absolute URL.
    pub url: String,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<Vec<u8>>,
}

impl HttpCall {
    /// The body as UTF-8 text, if there is a body and it is UTF-8.
    pub fn body_text(&self) -> Option<String> {
        self.body
            .as_ref()
            .and_then(|b| String::from_utf8(b.clone()).ok())
    }

    /// The body parsed as JSON, if there is a body and it is JSON.
    pub fn body_json(&self) -> Option<Value> {
        self.body
            .as_ref()
            .and_then(|b| serde_json::from_slice(b).ok())
    }
}

/// Runs handler `H` on `ctx` the way the component export does, and returns what the engine
/// would record: `Ok(())`, or `Err` with the failure reason string. (A panic still panics; in a
/// component it would be a trap.)
pub fn run_handler<H: Handler>(ctx: &Context) -> Result<(), String> {
    crate::__private::outcome(H::run(ctx))
}

/// A plausible context: a successful `WinCertInventory` job on `orchestrator.kftrain.lab`, first
/// try, requested 2023-05-03 23:18:48 UTC. Change fields with struct update syntax.
pub fn context() -> Context {
    Context {
        agent_id: Uuid::from_u128(0xfa406103_0b3e_4f0b_8d3b_0c1f8e6c0a11),
        username: r"KFTRAIN\SVC_Orchestrator".into(),
        client_machine: "orchestrator.kftrain.lab".into(),
        job_result: JobResult::Success,
        job_id: Uuid::from_u128(0x0b4b411a_7c2e_4d6f_9a51_3e8f2b7c1d90),
        job_type: "WinCertInventory".into(),
        job_type_id: Uuid::from_u128(0x49b3a17d_5f1c_4a0e_9c2b_7d8e1f2a3b4c),
        operation_type: OperationType::Unknown,
        certificate_id: None,
        request_timestamp: DateTime::from_timestamp(1_683_155_928, 0),
        current_retry_count: 0,
    }
}

/// Parses a context written as JSON with the .NET field names, the format of the examples'
/// `contexts/*.json` files and of `POST /v1/job-complete`:
///
/// ```json
/// {"AgentId": "fa406103-…", "Username": "KFTRAIN\\SVC_Orchestrator",
///  "ClientMachine": "orchestrator.kftrain.lab", "JobResult": "Failure",
///  "JobId": "…", "JobType": "WinCertInventory", "JobTypeId": "…", "OperationType": 0,
///  "CertificateId": null, "RequestTimestamp": "2023-05-03T23:18:48Z", "CurrentRetryCount": 5}
/// ```
///
/// Field names match without regard to case; enums by .NET name (any case) or number;
/// timestamps in RFC 3339 or without an offset (taken as UTC). `AgentId`, `JobId`,
/// `JobTypeId`, `JobType` and `JobResult` are required; the rest default to empty, `Unknown`,
/// `null` or 0. Errors name the field.
pub fn context_from_json(json: &str) -> Result<Context> {
    let value: Value = serde_json::from_str(json)
        .map_err(|e| Error::new(format!("context is not valid JSON ({e})")))?;
    let Value::Object(fields) = value else {
        return Err(Error::new("context must be a JSON object"));
    };
    let field = |name: &str| -> Option<&Value> {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    };
    Ok(Context {
        agent_id: guid(&fields, "AgentId")?,
        username: string(field("Username"), "Username")?.unwrap_or_default(),
        client_machine: string(field("ClientMachine"), "ClientMachine")?.unwrap_or_default(),
        job_result: enumeration::<JobResult>(field("JobResult"), "JobResult")?
            .ok_or_else(|| Error::new("context field 'JobResult' is missing"))?,
        job_id: guid(&fields, "JobId")?,
        job_type: string(field("JobType"), "JobType")?
            .ok_or_else(|| Error::new("context field 'JobType' is missing"))?,
        job_type_id: guid(&fields, "JobTypeId")?,
        operation_type: enumeration::<OperationType>(field("OperationType"), "OperationType")?
            .unwrap_or_default(),
        certificate_id: integer(field("CertificateId"), "CertificateId")?,
        request_timestamp: timestamp(field("RequestTimestamp"))?,
        current_retry_count: integer(field("CurrentRetryCount"), "CurrentRetryCount")?.unwrap_or(0),
    })
}

fn guid(fields: &Map<String, Value>, name: &str) -> Result<Uuid> {
    let value = fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v);
    let text = string(value.filter(|v| !v.is_null()), name)?
        .ok_or_else(|| Error::new(format!("context field '{name}' is missing")))?;
    Uuid::parse_str(text.trim()).map_err(|e| {
        Error::new(format!(
            "context field '{name}': '{text}' is not a GUID ({e})"
        ))
    })
}

fn string(value: Option<&Value>, name: &str) -> Result<Option<String>> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::new(format!(
            "context field '{name}' must be a string, got {other}"
        ))),
    }
}

fn integer(value: Option<&Value>, name: &str) -> Result<Option<i32>> {
    match value {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::new(format!(
                    "context field '{name}' must be a 32-bit integer, got {v}"
                ))
            }),
    }
}

fn enumeration<T: std::str::FromStr<Err = Error>>(
    value: Option<&Value>,
    name: &str,
) -> Result<Option<T>> {
    let text = match value {
        None => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(Error::new(format!(
                "context field '{name}' must be a name or a number, got {other}"
            )));
        }
    };
    text.parse::<T>()
        .map(Some)
        .map_err(|e| e.context(format!("context field '{name}'")))
}

fn timestamp(value: Option<&Value>) -> Result<Option<DateTime<Utc>>> {
    let Some(text) = string(value, "RequestTimestamp")? else {
        return Ok(None);
    };
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|t| Some(t.and_utc()))
        .map_err(|e| {
            Error::new(format!(
                "context field 'RequestTimestamp': '{text}' is not an RFC 3339 timestamp ({e})"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_handler_reports_the_reason_string() {
        struct Fails;
        impl Handler for Fails {
            fn run(_: &Context) -> Result<()> {
                Err(Error::new("nope").context("checking"))
            }
        }
        assert_eq!(
            run_handler::<Fails>(&context()),
            Err("checking: nope".to_string())
        );
    }

    #[test]
    fn parses_dotnet_context_json() {
        let ctx = context_from_json(
            r#"{"AgentId": "FA406103-0B3E-4F0B-8D3B-0C1F8E6C0A11", "Username": "KFTRAIN\\SVC_Orchestrator",
                "ClientMachine": "orchestrator.kftrain.lab", "JobResult": "Failure",
                "JobId": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90", "JobType": "WinCertInventory",
                "JobTypeId": "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c", "OperationType": 0,
                "CertificateId": null, "RequestTimestamp": "2023-05-03T23:18:48Z", "CurrentRetryCount": 5}"#,
        );
        assert_eq!(
            ctx,
            Ok(Context {
                job_result: JobResult::Failure,
                current_retry_count: 5,
                ..context()
            })
        );

        let ctx = context_from_json(
            r#"{"agentid": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11", "JobResult": 2, "OperationType": "add",
                "JobId": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90", "JobType": "WinCertManagement",
                "JobTypeId": "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c", "CertificateId": 14,
                "RequestTimestamp": "2023-05-03T23:18:48.250"}"#,
        )
        .map_err(|e| e.to_string());
        let ctx = ctx.as_ref();
        assert_eq!(ctx.map(|c| c.job_result), Ok(JobResult::Success));
        assert_eq!(ctx.map(|c| c.operation_type), Ok(OperationType::Add));
        assert_eq!(ctx.map(|c| c.certificate_id), Ok(Some(14)));
        assert_eq!(
            ctx.map(|c| c.request_timestamp.map(|t| t.timestamp_millis())),
            Ok(Some(1_683_155_928_250))
        );
    }

    #[test]
    fn context_json_errors_name_the_field() {
        let cases = [
            ("[]", "must be a JSON object"),
            (r#"{"JobId": "x"}"#, "'AgentId' is missing"),
            (
                r#"{"AgentId": "nope", "JobId": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90"}"#,
                "'AgentId': 'nope' is not a GUID",
            ),
        ];
        for (json, want) in cases {
            let err = context_from_json(json).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let base = r#""AgentId": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11", "JobId": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90",
                      "JobTypeId": "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c", "JobType": "X""#;
        let err =
            context_from_json(&format!("{{{base}, \"JobResult\": \"Exploded\"}}")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("context field 'JobResult': 'Exploded'"),
            "{err}"
        );
        let err = context_from_json(&format!(
            "{{{base}, \"JobResult\": 4, \"CurrentRetryCount\": 1e99}}"
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("'CurrentRetryCount' must be a 32-bit integer"),
            "{err}"
        );
        let err = context_from_json(&format!(
            "{{{base}, \"JobResult\": 4, \"RequestTimestamp\": \"May 3\"}}"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("'RequestTimestamp'"), "{err}");
    }
}
