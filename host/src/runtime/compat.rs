//! Components built against an earlier contract version: contract 0.1.0's interfaces, linked
//! beside the current ones, each call forwarded to the current implementation.
//!
//! 0.2.0 only added functions (`delivery.source`, `delivery.message`), so every 0.1.0 function
//! has a current twin with the same meaning; the only work here is moving a request record from
//! the 0.1.0 binding's Rust type to the current one. Grants, budgets and limits apply exactly as
//! for a current component, because the call lands in the same gate. A component built against
//! 0.1.0 is the test of this module (`tests/guests/contract-0-1`).

use wasmtime::component::{HasSelf, Linker};

use crate::bindings::jobhook::handler as current;
use crate::bindings::types::{CapabilityError, Response};
use crate::bindings::v0_1::jobhook::handler as v0_1;
use crate::capabilities::delivery::DeliveryCapability;
use crate::capabilities::http::Http;
use crate::capabilities::keyfactor::Keyfactor;
use crate::capabilities::log::LogCollector;
use crate::capabilities::mail::Mail;
use crate::capabilities::properties::Properties;
use crate::capabilities::{Gate, HasCapabilities};

/// The instance name of 0.1.0's `types`, which defines types only (0.2.0's types stand in for
/// them, see [`crate::bindings::v0_1`]); it must still exist for a component to import it.
const TYPES_0_1: &str = "jobhook:handler/types@0.1.0";

/// Where each 0.1.0 interface finds its state in a sandbox's state `T`.
pub struct StateAccess<T> {
    /// The handler's properties.
    pub properties: fn(&mut T) -> &mut Properties,
    /// The invocation's log.
    pub log: fn(&mut T) -> &mut LogCollector,
    /// The delivery's facts.
    pub delivery: fn(&mut T) -> &mut DeliveryCapability,
}

/// Adds contract 0.1.0's interfaces to `linker`, served by the same state as the current ones.
pub fn add_to_linker<T: HasCapabilities + Send + 'static>(
    linker: &mut Linker<T>,
    access: StateAccess<T>,
) -> wasmtime::Result<()> {
    linker.instance(TYPES_0_1)?;
    v0_1::properties::add_to_linker::<_, HasSelf<Properties>>(linker, access.properties)?;
    v0_1::log::add_to_linker::<_, HasSelf<LogCollector>>(linker, access.log)?;
    v0_1::delivery::add_to_linker::<_, HasSelf<DeliveryCapability>>(linker, access.delivery)?;
    v0_1::keyfactor::add_to_linker::<_, HasSelf<Gate<Keyfactor>>>(linker, |s| {
        &mut s.capabilities().keyfactor
    })?;
    v0_1::mail::add_to_linker::<_, HasSelf<Gate<Mail>>>(linker, |s| &mut s.capabilities().mail)?;
    v0_1::http::add_to_linker::<_, HasSelf<Gate<Http>>>(linker, |s| &mut s.capabilities().http)?;
    Ok(())
}

impl v0_1::properties::Host for Properties {
    async fn get(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        current::properties::Host::get(self, name).await
    }

    async fn names(&mut self) -> wasmtime::Result<Vec<String>> {
        current::properties::Host::names(self).await
    }
}

impl v0_1::log::Host for LogCollector {
    async fn log(&mut self, level: v0_1::log::Level, message: String) -> wasmtime::Result<()> {
        use current::log::Level as Now;
        use v0_1::log::Level as Then;
        let level = match level {
            Then::Trace => Now::Trace,
            Then::Debug => Now::Debug,
            Then::Info => Now::Info,
            Then::Warn => Now::Warn,
            Then::Error => Now::Error,
        };
        current::log::Host::log(self, level, message).await
    }
}

impl v0_1::delivery::Host for DeliveryCapability {
    async fn attempt(&mut self) -> wasmtime::Result<u32> {
        current::delivery::Host::attempt(self).await
    }

    async fn event_id(&mut self) -> wasmtime::Result<Option<String>> {
        current::delivery::Host::event_id(self).await
    }

    async fn handler_name(&mut self) -> wasmtime::Result<String> {
        current::delivery::Host::handler_name(self).await
    }
}

impl v0_1::keyfactor::Host for Gate<Keyfactor> {
    async fn send(
        &mut self,
        request: v0_1::keyfactor::Request,
    ) -> wasmtime::Result<Result<Response, CapabilityError>> {
        let v0_1::keyfactor::Request {
            method,
            path,
            query,
            headers,
            body,
        } = request;
        let request = current::keyfactor::Request {
            method,
            path,
            query,
            headers,
            body,
        };
        current::keyfactor::Host::send(self, request).await
    }
}

impl v0_1::mail::Host for Gate<Mail> {
    async fn send(
        &mut self,
        message: v0_1::mail::Message,
    ) -> wasmtime::Result<Result<(), CapabilityError>> {
        let v0_1::mail::Message {
            from,
            to,
            cc,
            subject,
            body,
        } = message;
        let message = current::mail::Message {
            from,
            to,
            cc,
            subject,
            body,
        };
        current::mail::Host::send(self, message).await
    }
}

impl v0_1::http::Host for Gate<Http> {
    async fn send(
        &mut self,
        request: v0_1::http::Request,
    ) -> wasmtime::Result<Result<Response, CapabilityError>> {
        let v0_1::http::Request {
            method,
            url,
            headers,
            body,
        } = request;
        let request = current::http::Request {
            method,
            url,
            headers,
            body,
        };
        current::http::Host::send(self, request).await
    }
}
