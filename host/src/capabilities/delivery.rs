//! `jobhook:handler/delivery`: which attempt of which event this invocation is.

use std::sync::Arc;

use crate::bindings::jobhook::handler::delivery::Host;

/// Facts about one delivery, fixed for the lifetime of its sandbox.
#[derive(Debug, Clone)]
pub struct DeliveryCapability {
    /// 1 on the first attempt.
    pub attempt: u32,
    /// The engine's event id, when the event came through the event path.
    pub event_id: Option<String>,
    /// The operator's name for the handler.
    pub handler_name: Arc<str>,
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
}
