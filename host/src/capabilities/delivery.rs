//! `jobhook:handler/delivery`: which attempt of which event this invocation is, where the event
//! came from and what Keyfactor said about the job.

use std::sync::Arc;

use crate::bindings::jobhook::handler::delivery::{EventSource, Host};

/// Facts about one delivery, fixed for the lifetime of its sandbox.
#[derive(Debug, Clone)]
pub struct DeliveryCapability {
    /// 1 on the first attempt.
    pub attempt: u32,
    /// The engine's event id, when the event came through the event path.
    pub event_id: Option<String>,
    /// The operator's name for the handler.
    pub handler_name: Arc<str>,
    /// How the event reached the engine.
    pub source: EventSource,
    /// Keyfactor's text about the job, when the source had it.
    pub message: Option<String>,
}

impl Host for DeliveryCapability {
    async fn attempt(&mut self) -> wasmtime::Result<u32> {
        Ok(self.attempt)
    }

    async fn event_id(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self.event_id.clone())
    }

    async fn handler_name(&mut self) -> wasmtime::Result<String> {
        Ok(self.handler_name.to_string())
    }

    async fn source(&mut self) -> wasmtime::Result<EventSource> {
        Ok(self.source)
    }

    async fn message(&mut self) -> wasmtime::Result<Option<String>> {
        Ok(self.message.clone())
    }
}
