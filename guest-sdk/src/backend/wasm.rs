//! The backend on `wasm32`: thin conversions around the wit-bindgen imports.

use super::{HttpRequest, KeyfactorRequest, MailMessage};
use crate::__private::bindings::jobhook::handler::{
    delivery, http as wit_http, keyfactor as wit_keyfactor, log as wit_log, mail as wit_mail,
    properties, types,
};
use crate::context::{JobResult, OperationType, RawContext};
use crate::level::Level;
use crate::{CapabilityError, Method, Response};

pub(crate) fn property_get(name: &str) -> Option<String> {
    properties::get(name)
}

pub(crate) fn property_names() -> Vec<String> {
    properties::names()
}

pub(crate) fn log(level: Level, message: &str) {
    let level = match level {
        Level::Trace => wit_log::Level::Trace,
        Level::Debug => wit_log::Level::Debug,
        Level::Info => wit_log::Level::Info,
        Level::Warn => wit_log::Level::Warn,
        Level::Error => wit_log::Level::Error,
    };
    wit_log::log(level, message);
}

pub(crate) fn attempt() -> u32 {
    delivery::attempt()
}

pub(crate) fn event_id() -> Option<String> {
    delivery::event_id()
}

pub(crate) fn handler_name() -> String {
    delivery::handler_name()
}

pub(crate) fn source() -> crate::delivery::Source {
    match delivery::source() {
        delivery::EventSource::EventApi => crate::delivery::Source::EventApi,
        delivery::EventSource::Poller => crate::delivery::Source::Poller,
        delivery::EventSource::Direct => crate::delivery::Source::Direct,
    }
}

pub(crate) fn message() -> Option<String> {
    delivery::message()
}

pub(crate) fn keyfactor_send(request: KeyfactorRequest) -> Result<Response, CapabilityError> {
    let request = wit_keyfactor::Request {
        method: method(request.method),
        path: request.path,
        query: request.query,
        headers: request.headers,
        body: request.body,
    };
    wit_keyfactor::send(&request)
        .map(response)
        .map_err(capability_error)
}

pub(crate) fn http_send(request: HttpRequest) -> Result<Response, CapabilityError> {
    let request = wit_http::Request {
        method: method(request.method),
        url: request.url,
        headers: request.headers,
        body: request.body,
    };
    wit_http::send(&request)
        .map(response)
        .map_err(capability_error)
}

pub(crate) fn mail_send(message: MailMessage) -> Result<(), CapabilityError> {
    let message = wit_mail::Message {
        from: message.from,
        to: message.to,
        cc: message.cc,
        subject: message.subject,
        body: message.body,
    };
    wit_mail::send(&message).map_err(capability_error)
}

fn method(method: Method) -> types::Method {
    match method {
        Method::Get => types::Method::Get,
        Method::Post => types::Method::Post,
        Method::Put => types::Method::Put,
        Method::Patch => types::Method::Patch,
        Method::Delete => types::Method::Delete,
    }
}

fn response(r: types::Response) -> Response {
    Response {
        status: r.status,
        headers: r.headers,
        body: r.body,
    }
}

fn capability_error(e: types::CapabilityError) -> CapabilityError {
    match e {
        types::CapabilityError::NotGranted(r) => CapabilityError::NotGranted(r),
        types::CapabilityError::NotAvailable(r) => CapabilityError::NotAvailable(r),
        types::CapabilityError::Denied(r) => CapabilityError::Denied(r),
        types::CapabilityError::LimitExceeded(r) => CapabilityError::LimitExceeded(r),
        types::CapabilityError::Timeout(r) => CapabilityError::Timeout(r),
        types::CapabilityError::Failed(r) => CapabilityError::Failed(r),
    }
}

/// Moves the fields of the WIT record into [`RawContext`]; all interpretation (GUID and time
/// parsing) happens in the natively tested `From<RawContext> for Context`.
pub(crate) fn raw_context(c: types::JobContext) -> RawContext {
    RawContext {
        agent_id: c.agent_id,
        username: c.username,
        client_machine: c.client_machine,
        job_result: match c.job_result {
            types::JobResult::Unknown => JobResult::Unknown,
            types::JobResult::InProcess => JobResult::InProcess,
            types::JobResult::Success => JobResult::Success,
            types::JobResult::Warning => JobResult::Warning,
            types::JobResult::Failure => JobResult::Failure,
        },
        job_id: c.job_id,
        job_type: c.job_type,
        job_type_id: c.job_type_id,
        operation_type: match c.operation_type {
            types::OperationType::Unknown => OperationType::Unknown,
            types::OperationType::Inventory => OperationType::Inventory,
            types::OperationType::Add => OperationType::Add,
            types::OperationType::Remove => OperationType::Remove,
            types::OperationType::Create => OperationType::Create,
            types::OperationType::CreateAdd => OperationType::CreateAdd,
            types::OperationType::Reenrollment => OperationType::Reenrollment,
            types::OperationType::Discovery => OperationType::Discovery,
            types::OperationType::SetPassword => OperationType::SetPassword,
            types::OperationType::FetchLogs => OperationType::FetchLogs,
        },
        certificate_id: c.certificate_id,
        request_timestamp: c.request_timestamp.map(|t| (t.seconds, t.nanoseconds)),
        current_retry_count: c.current_retry_count,
    }
}
