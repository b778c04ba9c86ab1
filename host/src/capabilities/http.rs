//! `jobhook:handler/http`: outbound HTTP to URL prefixes the operator allow-listed.
//!
//! This engine build has no allow-listed destinations, so every call that fits the budget
//! answers `not-available`; the budget is enforced regardless.

use crate::bindings::jobhook::handler::http::{Host, Request};
use crate::bindings::types::{CapabilityError, Response};
use crate::capabilities::CallBudget;

/// The outbound HTTP capability of one sandbox.
#[derive(Debug)]
pub struct HttpCapability {
    budget: CallBudget,
}

impl HttpCapability {
    /// A capability with `budget` calls per invocation.
    pub fn new(budget: CallBudget) -> Self {
        HttpCapability { budget }
    }
}

impl Host for HttpCapability {
    async fn send(
        &mut self,
        _request: Request,
    ) -> wasmtime::Result<Result<Response, CapabilityError>> {
        self.budget.take()?;
        Ok(Err(CapabilityError::NotAvailable(
            "no outbound HTTP destinations are configured for this engine".into(),
        )))
    }
}
