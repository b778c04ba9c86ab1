//! E-mail through the operator's SMTP relay (or the engine's file outbox).
//!
//! ```no_run
//! # fn main() -> jobhook_sdk::Result<()> {
//! use jobhook_sdk::mail::Message;
//!
//! Message::new()
//!     .to("pki-team@example.com")
//!     .subject("Orchestrator WinCertInventory Job Failed")
//!     .body("Orchestrator job failed too many times")
//!     .send()?;
//! # Ok(()) }
//! ```

use crate::{Error, Result, backend};

/// A plain-text e-mail, built step by step and sent with [`send`](Self::send).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "a message does nothing until `.send()` is called"]
pub struct Message {
    from: Option<String>,
    to: Vec<String>,
    cc: Vec<String>,
    subject: String,
    body: String,
}

impl Message {
    /// An empty message: no sender (the operator's configured From is used), no recipients.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the sender. The handler's grant must allow it; leave it unset to use the operator's
    /// configured From address.
    pub fn from(mut self, address: impl Into<String>) -> Self {
        self.from = Some(address.into());
        self
    }

    /// Adds one `To` recipient.
    pub fn to(mut self, address: impl Into<String>) -> Self {
        self.to.push(address.into());
        self
    }

    /// Adds every address in `addresses` as a `To` recipient.
    pub fn to_all<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.to.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// Adds one `Cc` recipient.
    pub fn cc(mut self, address: impl Into<String>) -> Self {
        self.cc.push(address.into());
        self
    }

    /// Adds every address in `addresses` as a `Cc` recipient.
    pub fn cc_all<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cc.extend(addresses.into_iter().map(Into::into));
        self
    }

    /// Sets the subject line.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = subject.into();
        self
    }

    /// Sets the plain-text body.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Hands the message to the engine for delivery.
    ///
    /// A message without any `To` or `Cc` recipient is refused here, before calling the engine.
    /// Otherwise `Err` says `mail: <why>` (e.g. a recipient outside the allow-list) and keeps the
    /// [`CapabilityError`](crate::CapabilityError).
    pub fn send(self) -> Result<()> {
        if self.to.is_empty() && self.cc.is_empty() {
            return Err(Error::new("mail: the message has no recipients"));
        }
        let message = backend::MailMessage {
            from: self.from,
            to: self.to,
            cc: self.cc,
            subject: self.subject,
            body: self.body,
        };
        backend::mail_send(message).map_err(|e| Error::capability("mail", e))
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::CapabilityError;
    use crate::testing::MockHost;

    #[test]
    fn builds_and_sends() {
        let host = MockHost::new().accept_mail().install();
        let sent = Message::new()
            .from("jobhook@example.com")
            .to("a@example.com")
            .to_all(["b@example.com", "c@example.com"])
            .cc("d@example.com")
            .subject("S")
            .body("B")
            .send();
        assert_eq!(sent, Ok(()));
        let mails = host.mails();
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].from.as_deref(), Some("jobhook@example.com"));
        assert_eq!(
            mails[0].to,
            ["a@example.com", "b@example.com", "c@example.com"]
        );
        assert_eq!(mails[0].cc, ["d@example.com"]);
        assert_eq!(
            (mails[0].subject.as_str(), mails[0].body.as_str()),
            ("S", "B")
        );
    }

    #[test]
    fn no_recipients_is_refused_locally() {
        let host = MockHost::new().accept_mail().install();
        let err = Message::new().subject("S").send().unwrap_err();
        assert_eq!(err.to_string(), "mail: the message has no recipients");
        assert!(host.mails().is_empty());
    }

    #[test]
    fn host_errors_and_default_not_available() {
        let host = MockHost::new()
            .mail_error(CapabilityError::Denied("x@evil is not allowed".into()))
            .install();
        let err = Message::new().to("x@evil").send().unwrap_err();
        assert_eq!(err.to_string(), "mail: denied: x@evil is not allowed");
        let err = Message::new().to("y@example.com").send().unwrap_err();
        assert!(matches!(
            err.capability_error(),
            Some(CapabilityError::NotAvailable(_))
        ));
        assert_eq!(host.mails().len(), 2, "every attempt is recorded");
    }
}
