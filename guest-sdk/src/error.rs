//! The SDK's error type and the mirror of the WIT `capability-error` variant.

use std::fmt;

/// The result type of handlers and SDK calls: `Err` carries an [`Error`] by default.
///
/// The second parameter lets code name another error type while keeping the short name,
/// e.g. `Result<(), CapabilityError>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a capability call (`keyfactor`, `mail`, `http`) did not happen or did not complete.
///
/// Mirrors the WIT `capability-error` variant case for case. Every case carries the engine's
/// human-readable reason, which is safe to log or to return as the handler's failure reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CapabilityError {
    /// The operator did not grant this capability, or this use of it, to the handler.
    NotGranted(String),
    /// The engine has no configuration for this capability (e.g. no Keyfactor API base set).
    NotAvailable(String),
    /// The request was refused before anything left the engine (bad path, forbidden header,
    /// recipient outside the allow-list, ...).
    Denied(String),
    /// A size limit was reached (a body, a header, a response). A per-invocation call budget
    /// is not returned here: the call past it ends the invocation, recorded as the outcome
    /// `limit-exceeded` (docs/CAPABILITIES.md).
    LimitExceeded(String),
    /// The remote side did not answer in time.
    Timeout(String),
    /// The remote side could not be reached or answered with a transport error.
    Failed(String),
}

impl CapabilityError {
    /// The engine's reason, without the kind prefix.
    pub fn reason(&self) -> &str {
        match self {
            Self::NotGranted(r)
            | Self::NotAvailable(r)
            | Self::Denied(r)
            | Self::LimitExceeded(r)
            | Self::Timeout(r)
            | Self::Failed(r) => r,
        }
    }

    /// A short lowercase description of the kind (`"not granted"`, `"timed out"`, ...), as used
    /// in [`Display`](fmt::Display).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotGranted(_) => "not granted",
            Self::NotAvailable(_) => "not available",
            Self::Denied(_) => "denied",
            Self::LimitExceeded(_) => "limit exceeded",
            Self::Timeout(_) => "timed out",
            Self::Failed(_) => "failed",
        }
    }

    /// Whether trying again later could succeed (a timeout or a transport failure), as opposed
    /// to a refusal that only an operator can lift.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::Failed(_))
    }
}

impl fmt::Display for CapabilityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind(), self.reason())
    }
}

impl std::error::Error for CapabilityError {}

/// A handler or SDK failure: a message meant for the operator, plus the capability error behind
/// it when there is one.
///
/// Its [`Display`](fmt::Display) is what the engine records as the handler's failure reason when
/// [`Handler::run`](crate::Handler::run) returns `Err`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    capability: Option<CapabilityError>,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            capability: None,
        }
    }

    /// An error for a failed call to capability `capability` (e.g. `"keyfactor GET Agents"`),
    /// keeping the [`CapabilityError`] so callers can branch on it.
    pub fn capability(capability: impl fmt::Display, error: CapabilityError) -> Self {
        Self {
            message: format!("{capability}: {error}"),
            capability: Some(error),
        }
    }

    /// The full message, as [`Display`](fmt::Display) prints it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The capability error behind this error, if it came from a capability call.
    pub fn capability_error(&self) -> Option<&CapabilityError> {
        self.capability.as_ref()
    }

    /// The same error with `context` put in front of the message (`"context: message"`), to say
    /// what the handler was doing when it failed.
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<CapabilityError> for Error {
    fn from(error: CapabilityError) -> Self {
        Self {
            message: error.to_string(),
            capability: Some(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_error_display_names_kind_and_reason() {
        let e = CapabilityError::NotAvailable("no Keyfactor API base configured".into());
        assert_eq!(
            e.to_string(),
            "not available: no Keyfactor API base configured"
        );
        assert_eq!(e.reason(), "no Keyfactor API base configured");
        assert!(!e.is_transient());
        assert!(CapabilityError::Timeout("30s".into()).is_transient());
    }

    #[test]
    fn error_from_capability_keeps_the_cause() {
        let e = Error::capability(
            "keyfactor GET Agents",
            CapabilityError::Denied("path".into()),
        );
        assert_eq!(e.to_string(), "keyfactor GET Agents: denied: path");
        assert_eq!(
            e.capability_error(),
            Some(&CapabilityError::Denied("path".into()))
        );

        let plain: Error = CapabilityError::Failed("reset".into()).into();
        assert_eq!(plain.to_string(), "failed: reset");
        assert!(plain.capability_error().is_some());
    }

    #[test]
    fn error_conversions_and_context() {
        let e: Error = "boom".into();
        assert_eq!(e.to_string(), "boom");
        let e: Error = String::from("bang").into();
        assert_eq!(e.context("sending mail").to_string(), "sending mail: bang");
        assert!(Error::new("x").capability_error().is_none());
    }
}
