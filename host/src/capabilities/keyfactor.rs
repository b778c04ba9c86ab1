//! `jobhook:handler/keyfactor`: requests to the Keyfactor Command API, made by the engine with
//! the engine's credentials.
//!
//! This engine build has no Keyfactor API client configured, so every call that fits the budget
//! answers `not-available`. The budget is still enforced: a handler that floods the API is
//! stopped whether or not the API is reachable.

use crate::bindings::jobhook::handler::keyfactor::{Host, Request};
use crate::bindings::types::{CapabilityError, Response};
use crate::capabilities::CallBudget;

/// The Keyfactor capability of one sandbox.
#[derive(Debug)]
pub struct KeyfactorCapability {
    budget: CallBudget,
}

impl KeyfactorCapability {
    /// A capability with `budget` calls per invocation.
    pub fn new(budget: CallBudget) -> Self {
        KeyfactorCapability { budget }
    }
}

impl Host for KeyfactorCapability {
    async fn send(
        &mut self,
        _request: Request,
    ) -> wasmtime::Result<Result<Response, CapabilityError>> {
        self.budget.take()?;
        Ok(Err(CapabilityError::NotAvailable(
            "no Keyfactor API is configured for this engine".into(),
        )))
    }
}
