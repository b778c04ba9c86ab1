//! The backend on native targets: the thread's installed
//! [`MockHost`](crate::testing::MockHost), or harmless defaults when none is installed (no
//! properties, logs to stderr, attempt 1, every capability `NotAvailable`).

use crate::log::Level;
use crate::testing::{self, HostState};
use crate::{CapabilityError, Response, http, keyfactor, mail};

/// The reason capability calls give when no mock host is installed.
const NO_HOST: &str =
    "no jobhook host: this is a native build and no testing::MockHost is installed on this thread";

pub(crate) fn property_get(name: &str) -> Option<String> {
    testing::with_state(|s: &mut HostState| s.properties.get(name).cloned()).flatten()
}

pub(crate) fn property_names() -> Vec<String> {
    testing::with_state(|s| s.properties.keys().cloned().collect()).unwrap_or_default()
}

pub(crate) fn log(level: Level, message: &str) {
    let recorded = testing::with_state(|s| s.record_log(level, message));
    if recorded.is_none() {
        eprintln!("[{level}] {message}");
    }
}

pub(crate) fn attempt() -> u32 {
    testing::with_state(|s| s.attempt).unwrap_or(1)
}

pub(crate) fn event_id() -> Option<String> {
    testing::with_state(|s| s.event_id.clone()).flatten()
}

pub(crate) fn handler_name() -> String {
    testing::with_state(|s| s.handler_name.clone()).unwrap_or_default()
}

pub(crate) fn keyfactor_send(request: keyfactor::Request) -> Result<Response, CapabilityError> {
    testing::with_state(|s| s.keyfactor_send(request))
        .unwrap_or_else(|| Err(CapabilityError::NotAvailable(NO_HOST.into())))
}

pub(crate) fn http_send(request: http::Request) -> Result<Response, CapabilityError> {
    testing::with_state(|s| s.http_send(request))
        .unwrap_or_else(|| Err(CapabilityError::NotAvailable(NO_HOST.into())))
}

pub(crate) fn mail_send(message: mail::Message) -> Result<(), CapabilityError> {
    testing::with_state(|s| s.mail_send(message))
        .unwrap_or_else(|| Err(CapabilityError::NotAvailable(NO_HOST.into())))
}
