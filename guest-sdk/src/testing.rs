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

mod context_json;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use chrono::DateTime;
use serde_json::Value;
use uuid::Uuid;

use crate::backend::{self, HttpRequest, KeyfactorRequest, MailMessage, NativeHost, SharedHost};
use crate::delivery::Source;
use crate::log::Level;
use crate::{
    CapabilityError, Context, Handler, JobResult, Method, OperationType, Response, Result,
};

/// What a handler sees of the mock host, and what it did to it.
#[derive(Debug, Default)]
struct HostState {
    properties: BTreeMap<String, String>,
    attempt: u32,
    event_id: Option<String>,
    handler_name: String,
    source: Option<Source>,
    message: Option<String>,
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

    fn source(&mut self) -> Source {
        self.source.unwrap_or(Source::Direct)
    }

    fn message(&mut self) -> Option<String> {
        self.message.clone()
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

    /// Sets what [`delivery::source`](crate::delivery::source) returns (default:
    /// [`Source::Direct`]).
    pub fn source(mut self, source: Source) -> Self {
        self.state.source = Some(source);
        self
    }

    /// Sets what [`delivery::message`](crate::delivery::message) returns (default: `None`).
    pub fn message(mut self, text: impl Into<String>) -> Self {
        self.state.message = Some(text.into());
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
/// It accepts exactly the documents the engine accepts, with the same values, so a test cannot
/// pass on a context the engine would refuse:
///
/// - field names match without regard to case (a field given twice is an error); unknown
///   fields are ignored;
/// - every field is required except `CertificateId` and `RequestTimestamp` (absent or `null`:
///   `None`); `null` in `Username`, `ClientMachine` or `JobType` is the empty string;
/// - GUIDs hyphenated, braced or as 32 hex digits;
/// - `JobResult` and `OperationType` by .NET name (any case) or number, unknown numbers being
///   `Unknown`; `CertificateId` and `CurrentRetryCount` as 32-bit numbers or strings holding one;
/// - timestamps in RFC 3339 or without an offset (taken as UTC);
/// - at most 64 KiB in all and 4 KiB per string field.
///
/// Errors name the field, e.g. `context field 'JobId' is missing`.
pub fn context_from_json(json: &str) -> Result<Context> {
    context_json::decode(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

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
            r#"{"agentid": "{fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11}", "JobResult": 2, "OperationType": "add",
                "JobId": "0b4b411a7c2e4d6f9a513e8f2b7c1d90", "JobType": null, "Username": null,
                "clientMachine": "m", "JobTypeId": "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c",
                "CertificateId": "14", "RequestTimestamp": "2023-05-03 23:18:48.250",
                "CurrentRetryCount": " 1 ", "Client": {"BaseAddress": "ignored"}}"#,
        )
        .map_err(|e| e.to_string());
        let ctx = ctx.as_ref();
        assert_eq!(ctx.map(|c| c.agent_id), Ok(context().agent_id));
        assert_eq!(ctx.map(|c| c.job_id), Ok(context().job_id));
        assert_eq!(ctx.map(|c| c.job_result), Ok(JobResult::Success));
        assert_eq!(ctx.map(|c| c.operation_type), Ok(OperationType::Add));
        assert_eq!(
            ctx.map(|c| (c.username.as_str(), c.job_type.as_str())),
            Ok(("", ""))
        );
        assert_eq!(ctx.map(|c| c.certificate_id), Ok(Some(14)));
        assert_eq!(ctx.map(|c| c.current_retry_count), Ok(1));
        assert_eq!(
            ctx.map(|c| c.request_timestamp.map(|t| t.timestamp_millis())),
            Ok(Some(1_683_155_928_250))
        );
    }

    /// A complete context with `extra` fields added (or, under an existing name, replacing).
    fn with(extra: &str) -> String {
        let mut value: Value = serde_json::from_str(
            r#"{"AgentId": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11", "Username": "u",
                "ClientMachine": "m", "JobResult": "Failure",
                "JobId": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90", "JobType": "X",
                "JobTypeId": "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c", "OperationType": 0,
                "CurrentRetryCount": 0}"#,
        )
        .unwrap_or_default();
        let extra: Value = serde_json::from_str(&format!("{{{extra}}}")).unwrap_or_default();
        if let (Value::Object(base), Value::Object(extra)) = (&mut value, extra) {
            base.extend(extra);
        }
        value.to_string()
    }

    fn without(field: &str) -> String {
        let mut value: Value = serde_json::from_str(&with("")).unwrap_or_default();
        if let Value::Object(map) = &mut value {
            map.remove(field);
        }
        value.to_string()
    }

    #[test]
    fn context_json_errors_name_the_field() {
        assert!(context_from_json(&with("")).is_ok());
        let cases = [
            ("[]".to_string(), "must be a JSON object, got an array"),
            ("{".to_string(), "context is not valid JSON"),
            (" ".repeat(64 * 1024 + 1), "the limit is 65536 bytes"),
            (without("AgentId"), "context field 'AgentId' is missing"),
            (without("Username"), "context field 'Username' is missing"),
            (
                without("OperationType"),
                "context field 'OperationType' is missing",
            ),
            (
                without("CurrentRetryCount"),
                "context field 'CurrentRetryCount' is missing",
            ),
            (
                with(r#""JobResult": null"#),
                "context field 'JobResult' is missing",
            ),
            (
                with(r#""AgentId": "nope""#),
                "context field 'AgentId': 'nope' is not a GUID",
            ),
            (
                with(r#""JobId": "urn:uuid:0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90""#),
                "context field 'JobId'",
            ),
            (
                with(r#""JobTypeId": 7"#),
                "'JobTypeId': expected a GUID string, got a number",
            ),
            (
                with(r#""jobresult": 4"#),
                "'JobResult' is given more than once",
            ),
            (
                with(r#""JobResult": "Exploded""#),
                "context field 'JobResult': 'Exploded'",
            ),
            (
                with(r#""JobResult": 2.5"#),
                "context field 'JobResult': 2.5",
            ),
            (
                with(r#""OperationType": true"#),
                "'OperationType': expected a name or a number",
            ),
            (
                with(r#""Username": 5"#),
                "'Username': expected a string, got a number",
            ),
            (
                with(&format!(r#""JobType": "{}""#, "x".repeat(4097))),
                "'JobType': is 4097 bytes long",
            ),
            (
                with(r#""CurrentRetryCount": 1e99"#),
                "'CurrentRetryCount': 1e+99 must be a 32-bit whole number",
            ),
            (
                with(r#""CertificateId": "lots""#),
                "'CertificateId': \"lots\" must be",
            ),
            (
                with(r#""CertificateId": []"#),
                "'CertificateId': expected a whole number",
            ),
            (
                with(r#""RequestTimestamp": "May 3""#),
                "'RequestTimestamp': 'May 3'",
            ),
            (
                with(r#""RequestTimestamp": 12"#),
                "'RequestTimestamp': expected an ISO 8601",
            ),
        ];
        for (json, want) in cases {
            let err = context_from_json(&json)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn context_json_optional_fields_and_unknown_numbers() {
        for extra in ["", r#""CertificateId": null, "RequestTimestamp": null"#] {
            let ctx = context_from_json(&with(extra)).map_err(|e| e.to_string());
            assert_eq!(
                ctx.map(|c| (c.certificate_id, c.request_timestamp)),
                Ok((None, None))
            );
        }
        let ctx = context_from_json(&with(r#""JobResult": 17, "OperationType": "-1""#));
        assert_eq!(
            ctx.map(|c| (c.job_result, c.operation_type)),
            Ok((JobResult::Unknown, OperationType::Unknown))
        );
        let ctx = context_from_json(&with(r#""RequestTimestamp": "2023-05-04T01:18:48+02:00""#));
        assert_eq!(
            ctx.map(|c| c.request_timestamp),
            Ok(context().request_timestamp)
        );
    }
}
