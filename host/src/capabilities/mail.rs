//! `jobhook:handler/mail`: e-mail through the engine's relay.
//!
//! This engine build has no mail transport configured, so every call that fits the budget
//! answers `not-available`; the budget is enforced regardless.

use crate::bindings::jobhook::handler::mail::{Host, Message};
use crate::bindings::types::CapabilityError;
use crate::capabilities::CallBudget;

/// The mail capability of one sandbox.
#[derive(Debug)]
pub struct MailCapability {
    budget: CallBudget,
}

impl MailCapability {
    /// A capability with `budget` mails per invocation.
    pub fn new(budget: CallBudget) -> Self {
        MailCapability { budget }
    }
}

impl Host for MailCapability {
    async fn send(&mut self, _message: Message) -> wasmtime::Result<Result<(), CapabilityError>> {
        self.budget.take()?;
        Ok(Err(CapabilityError::NotAvailable(
            "no mail transport is configured for this engine".into(),
        )))
    }
}
