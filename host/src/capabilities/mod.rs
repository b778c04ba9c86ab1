//! The interfaces a handler may import, one module per capability, each with its state, its
//! host implementation and its tests.
//!
//! `properties`, `log` and `delivery` are always available; `keyfactor`, `mail` and `http` reach
//! outside the sandbox and must be granted to the handler by the operator.

pub mod delivery;
pub mod http;
pub mod keyfactor;
pub mod log;
pub mod mail;
pub mod properties;
pub mod stdio;

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{LimitExceeded, LimitKind};

/// A capability that reaches outside the sandbox and must be granted per handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// The Keyfactor Command API proxy (`jobhook:handler/keyfactor`).
    Keyfactor,
    /// E-mail through the engine's relay (`jobhook:handler/mail`).
    Mail,
    /// Outbound HTTP to allow-listed URLs (`jobhook:handler/http`).
    Http,
}

impl Capability {
    /// Every grantable capability.
    pub const ALL: [Capability; 3] = [Capability::Keyfactor, Capability::Mail, Capability::Http];

    /// The WIT interface name (without package and version).
    pub fn interface(self) -> &'static str {
        match self {
            Capability::Keyfactor => "keyfactor",
            Capability::Mail => "mail",
            Capability::Http => "http",
        }
    }

    /// The capability behind a WIT interface name, if that interface is a grantable one.
    pub fn from_interface(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.interface() == name)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.interface())
    }
}

/// The capabilities an operator granted to one handler.
pub type Grants = BTreeSet<Capability>;

/// Interfaces of the `jobhook:handler` package every handler may import without a grant.
pub const ALWAYS_AVAILABLE: [&str; 4] = ["types", "properties", "log", "delivery"];

/// Counts the calls a sandbox makes to one capability and ends the sandbox when it makes more
/// than its budget allows.
#[derive(Debug, Clone)]
pub struct CallBudget {
    kind: LimitKind,
    limit: u32,
    used: u32,
}

impl CallBudget {
    /// A budget of `limit` calls, reported as `kind` when exceeded.
    pub fn new(kind: LimitKind, limit: u32) -> Self {
        CallBudget {
            kind,
            limit,
            used: 0,
        }
    }

    /// Takes one call from the budget, or returns the error that traps the sandbox.
    pub fn take(&mut self) -> wasmtime::Result<()> {
        if self.used >= self.limit {
            return Err(wasmtime::Error::new(LimitExceeded {
                kind: self.kind,
                detail: format!(
                    "call {} refused: the budget is {} per invocation",
                    u64::from(self.used) + 1,
                    self.limit
                ),
            }));
        }
        self.used += 1;
        Ok(())
    }

    /// Calls made so far.
    pub fn used(&self) -> u32 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_exactly_its_limit() {
        let mut b = CallBudget::new(LimitKind::MailCalls, 2);
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        let e = b.take().unwrap_err();
        let hit = e.downcast_ref::<LimitExceeded>().unwrap();
        assert_eq!(hit.kind, LimitKind::MailCalls);
        assert_eq!(b.used(), 2);
    }

    #[test]
    fn capability_names_round_trip() {
        for c in Capability::ALL {
            assert_eq!(Capability::from_interface(c.interface()), Some(c));
        }
        assert_eq!(Capability::from_interface("log"), None);
    }
}
