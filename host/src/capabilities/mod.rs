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
pub mod outbound;
pub mod properties;
pub mod stdio;

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

/// The capabilities an operator granted to one handler, each with its own policy. A capability
/// that is `None` is not granted: a component importing it is refused at load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// The Keyfactor API proxy, and which methods and paths it may use.
    pub keyfactor: Option<keyfactor::KeyfactorGrant>,
    /// Mail, and to whom.
    pub mail: Option<mail::MailGrant>,
    /// Outbound HTTP, and to which URL prefixes.
    pub http: Option<http::HttpGrant>,
}

impl Grants {
    /// Whether `capability` is granted.
    pub fn allows(&self, capability: Capability) -> bool {
        match capability {
            Capability::Keyfactor => self.keyfactor.is_some(),
            Capability::Mail => self.mail.is_some(),
            Capability::Http => self.http.is_some(),
        }
    }

    /// Every capability with its most permissive policy: what `jobhook run`, the handler
    /// author's harness, grants.
    pub fn permissive() -> Self {
        Grants {
            keyfactor: Some(keyfactor::KeyfactorGrant::permissive()),
            mail: Some(mail::MailGrant::permissive()),
            http: Some(http::HttpGrant::permissive()),
        }
    }

    /// The granted capabilities.
    pub fn granted(&self) -> Vec<Capability> {
        Capability::ALL
            .into_iter()
            .filter(|c| self.allows(*c))
            .collect()
    }
}

/// The engine-wide services behind the capabilities (API client, mail transport, HTTP client),
/// shared by every sandbox. A service that is `None` is not configured: calls to it answer
/// `not-available`.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// The Keyfactor API client.
    pub keyfactor: Option<std::sync::Arc<keyfactor::KeyfactorClient>>,
    /// The mail transport.
    pub mail: Option<std::sync::Arc<mail::MailTransport>>,
    /// The outbound HTTP client.
    pub http: Option<std::sync::Arc<http::HttpClient>>,
}

/// The engine-level configuration of the services, as it appears in the engine's TOML file:
///
/// ```toml
/// [keyfactor]                 # optional: without it, `keyfactor` calls answer not-available
/// base_url = "https://command.example.com/KeyfactorAPI/"
/// [keyfactor.auth]
/// kind = "basic"
/// username = 'KFTRAIN\svc-jobhook'
/// password = { env = "KEYFACTOR_PASSWORD" }
///
/// [mail]                      # optional: without it, `mail` calls answer not-available
/// from = "jobhook@example.com"
///
/// [http]                      # optional: defaults apply
/// timeout_ms = 5000
/// ```
///
/// See [`keyfactor::KeyfactorConfig`], [`mail::MailConfig`] and [`http::HttpConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    /// The Keyfactor API.
    #[serde(default)]
    pub keyfactor: Option<keyfactor::KeyfactorConfig>,
    /// Mail.
    #[serde(default)]
    pub mail: Option<mail::MailConfig>,
    /// Outbound HTTP (always available; only granted handlers can use it).
    #[serde(default)]
    pub http: http::HttpConfig,
}

/// Why the services could not be built from configuration.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// `[keyfactor]`.
    #[error(transparent)]
    Keyfactor(#[from] keyfactor::KeyfactorConfigError),
    /// `[mail]`.
    #[error(transparent)]
    Mail(#[from] mail::MailConfigError),
    /// `[http]`.
    #[error(transparent)]
    Http(#[from] http::HttpConfigError),
}

impl Services {
    /// Builds every configured service: resolves secrets, loads CA bundles, creates the mail
    /// outbox. `default_outbox` is the outbox directory used when `[mail]` names neither an
    /// outbox nor a relay. Nothing is contacted yet (an OAuth token is fetched on first use).
    pub fn from_config(
        config: &ServicesConfig,
        default_outbox: &std::path::Path,
    ) -> Result<Services, ServiceError> {
        let keyfactor = match &config.keyfactor {
            Some(c) => Some(std::sync::Arc::new(
                keyfactor::KeyfactorClient::from_config(c)?,
            )),
            None => None,
        };
        let mail = match &config.mail {
            Some(c) => Some(std::sync::Arc::new(mail::MailTransport::from_config(
                c,
                default_outbox,
            )?)),
            None => None,
        };
        let http = Some(std::sync::Arc::new(http::HttpClient::from_config(
            &config.http,
        )?));
        Ok(Services {
            keyfactor,
            mail,
            http,
        })
    }
}

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
