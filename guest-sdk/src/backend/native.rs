//! The backend on native targets: the host installed on this thread, or harmless defaults when
//! none is installed (no properties, logs to stderr, attempt 1, every capability
//! `NotAvailable`).
//!
//! The installed host is a [`NativeHost`] trait object, so this module does not need to know
//! about [`testing::MockHost`](crate::testing::MockHost), which implements and installs one.

use std::cell::RefCell;
use std::rc::Rc;

use super::{HttpRequest, KeyfactorRequest, MailMessage};
use crate::level::Level;
use crate::{CapabilityError, Response};

/// The reason capability calls give when no mock host is installed.
const NO_HOST: &str =
    "no jobhook host: this is a native build and no testing::MockHost is installed on this thread";

/// What a native build calls instead of the WIT imports: one method per import.
pub(crate) trait NativeHost: std::fmt::Debug {
    /// `properties.get`
    fn property_get(&mut self, name: &str) -> Option<String>;
    /// `properties.names`
    fn property_names(&mut self) -> Vec<String>;
    /// `log.log`
    fn log(&mut self, level: Level, message: &str);
    /// `delivery.attempt`
    fn attempt(&mut self) -> u32;
    /// `delivery.event-id`
    fn event_id(&mut self) -> Option<String>;
    /// `delivery.handler-name`
    fn handler_name(&mut self) -> String;
    /// `delivery.source`
    fn source(&mut self) -> crate::delivery::Source;
    /// `delivery.message`
    fn message(&mut self) -> Option<String>;
    /// `keyfactor.send`
    fn keyfactor_send(&mut self, request: KeyfactorRequest) -> Result<Response, CapabilityError>;
    /// `http.send`
    fn http_send(&mut self, request: HttpRequest) -> Result<Response, CapabilityError>;
    /// `mail.send`
    fn mail_send(&mut self, message: MailMessage) -> Result<(), CapabilityError>;
}

/// A host as installed on a thread, shared with whoever installed it (who reads it back).
pub(crate) type SharedHost = Rc<RefCell<dyn NativeHost>>;

thread_local! {
    /// The host installed on this thread, if any.
    static INSTALLED: RefCell<Option<SharedHost>> = const { RefCell::new(None) };
}

/// Installs `host` on the current thread and returns the host installed before, if any.
pub(crate) fn install(host: SharedHost) -> Option<SharedHost> {
    INSTALLED.with(|c| c.replace(Some(host)))
}

/// Puts `previous` back, but only if `host` is still the installed one (guards dropped out of
/// order must not uninstall someone else's host).
pub(crate) fn uninstall(host: &SharedHost, previous: Option<SharedHost>) {
    INSTALLED.with(|c| {
        if let Ok(mut current) = c.try_borrow_mut()
            && current.as_ref().is_some_and(|cur| Rc::ptr_eq(cur, host))
        {
            *current = previous;
        }
    });
}

/// Runs `f` on the host installed on this thread; `None` when there is none (or it is busy).
fn with_host<R>(f: impl FnOnce(&mut dyn NativeHost) -> R) -> Option<R> {
    let host = INSTALLED.with(|c| c.try_borrow().ok().and_then(|c| c.clone()))?;
    let mut host = host.try_borrow_mut().ok()?;
    Some(f(&mut *host))
}

fn not_available<T>() -> Result<T, CapabilityError> {
    Err(CapabilityError::NotAvailable(NO_HOST.into()))
}

pub(crate) fn property_get(name: &str) -> Option<String> {
    with_host(|h| h.property_get(name)).flatten()
}

pub(crate) fn property_names() -> Vec<String> {
    with_host(|h| h.property_names()).unwrap_or_default()
}

pub(crate) fn log(level: Level, message: &str) {
    if with_host(|h| h.log(level, message)).is_none() {
        eprintln!("[{level}] {message}");
    }
}

pub(crate) fn attempt() -> u32 {
    with_host(|h| h.attempt()).unwrap_or(1)
}

pub(crate) fn event_id() -> Option<String> {
    with_host(|h| h.event_id()).flatten()
}

pub(crate) fn handler_name() -> String {
    with_host(|h| h.handler_name()).unwrap_or_default()
}

pub(crate) fn source() -> crate::delivery::Source {
    with_host(|h| h.source()).unwrap_or(crate::delivery::Source::Direct)
}

pub(crate) fn message() -> Option<String> {
    with_host(|h| h.message()).flatten()
}

pub(crate) fn keyfactor_send(request: KeyfactorRequest) -> Result<Response, CapabilityError> {
    with_host(|h| h.keyfactor_send(request)).unwrap_or_else(not_available)
}

pub(crate) fn http_send(request: HttpRequest) -> Result<Response, CapabilityError> {
    with_host(|h| h.http_send(request)).unwrap_or_else(not_available)
}

pub(crate) fn mail_send(message: MailMessage) -> Result<(), CapabilityError> {
    with_host(|h| h.mail_send(message)).unwrap_or_else(not_available)
}
