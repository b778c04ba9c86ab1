//! The interfaces a handler may import, one module per capability, each with its state, its
//! host implementation and its tests.
//!
//! `properties`, `log` and `delivery` are always available. The grantable capabilities —
//! `keyfactor`, `mail` and `http` — reach outside the sandbox and must be granted to the handler
//! by the operator; each is one folder that implements [`gate::Grantable`] and is registered by
//! one line of the `grantable!` list below. From that list come the [`Capability`] names, the
//! [`Grants`] of a handler, the engine's [`Services`] and their [`ServicesConfig`] sections, and
//! the [`CapabilityStates`] of a sandbox with the linker that serves them: adding a capability
//! touches its folder and that list.

pub mod delivery;
pub mod gate;
pub mod http;
pub mod keyfactor;
pub mod log;
pub mod mail;
pub mod outbound;
pub mod properties;
pub mod stdio;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wasmtime::component::Linker;

pub use self::gate::{CallBudget, ConfiguredBy, Gate, Grantable, ServiceEnv};
use crate::limits::{LimitKind, Limits};

/// Interfaces of the `jobhook:handler` package every handler may import without a grant.
pub const ALWAYS_AVAILABLE: [&str; 4] = ["types", "properties", "log", "delivery"];

/// The grantable capabilities, one line each: `field: Name => folder::Marker`.
macro_rules! grantable {
    ($( $(#[$doc:meta])* $field:ident: $name:ident => $marker:ty ),+ $(,)?) => {
        /// A capability that reaches outside the sandbox and must be granted per handler.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum Capability {
            $( $(#[$doc])* $name, )+
        }

        impl Capability {
            /// Every grantable capability.
            pub const ALL: [Capability; [$(stringify!($name)),+].len()] = [$(Capability::$name),+];

            /// The WIT interface name (without package and version).
            pub fn interface(self) -> &'static str {
                match self {
                    $( Capability::$name => <$marker as Grantable>::INTERFACE, )+
                }
            }

            /// Calls per invocation unless a handler's limits say otherwise.
            pub fn default_calls(self) -> u32 {
                match self {
                    $( Capability::$name => <$marker as Grantable>::DEFAULT_CALLS, )+
                }
            }

            /// What configures its service in the configuration file
            /// ([`Grantable::CONFIG_KEY`]), e.g. `[keyfactor] base_url`.
            pub fn config_key(self) -> &'static str {
                match self {
                    $( Capability::$name => <$marker as Grantable>::CONFIG_KEY, )+
                }
            }
        }

        /// The capabilities an operator granted to one handler, each with its own policy. A
        /// capability that is `None` is not granted: a component importing it is refused at load.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Grants {
            $( $(#[$doc])* pub $field: Option<<$marker as Grantable>::Grant>, )+
        }

        impl Grants {
            /// Whether `capability` is granted.
            pub fn allows(&self, capability: Capability) -> bool {
                match capability {
                    $( Capability::$name => self.$field.is_some(), )+
                }
            }

            /// Every capability with its most permissive policy: what `jobhook run`, the
            /// handler author's harness, grants.
            pub fn permissive() -> Self {
                Grants {
                    $( $field: Some(<$marker as Grantable>::permissive_grant()), )+
                }
            }
        }

        /// The engine-wide services behind the capabilities, shared by every sandbox. A service
        /// that is `None` is not configured: calls to it answer `not-available`.
        #[derive(Debug, Clone, Default)]
        pub struct Services {
            $( $(#[$doc])* pub $field: Option<Arc<<$marker as Grantable>::Service>>, )+
            /// How the services are configured: what a handler calling an unconfigured one is
            /// told to set.
            pub configured_by: ConfiguredBy,
        }

        /// The engine-level sections of the capabilities in the engine's TOML file, e.g.
        /// `[keyfactor]` (without it, a grant of `keyfactor` is refused), `[mail]`,
        /// `[http]` (defaults apply). See each capability's `Config`.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ServicesConfig {
            $( $(#[$doc])* #[serde(default)] pub $field: <$marker as Grantable>::Config, )+
        }

        impl ServicesConfig {
            /// Makes every relative path in the sections relative to `base` (the configuration
            /// file's directory).
            pub fn rebase(&mut self, base: &std::path::Path) {
                $( <$marker as Grantable>::rebase(&mut self.$field, base); )+
            }
        }

        impl ServicesConfig {
            /// Checks a handler's grants against the engine's sections (see
            /// [`Grantable::configured`] and [`Grantable::check_grant`]). The same check runs
            /// when a configuration is read (against its own sections) and at a reload (against
            /// the sections the running engine started with, which only a restart replaces).
            pub fn check_grants(&self, grants: &Grants) -> Result<(), GrantRefused> {
                $( if let Some(grant) = &grants.$field {
                    let capability = Capability::$name;
                    if !<$marker as Grantable>::configured(&self.$field) {
                        return Err(GrantRefused {
                            capability,
                            problem: GrantProblem::NotConfigured,
                        });
                    }
                    <$marker as Grantable>::check_grant(&self.$field, grant).map_err(|e| {
                        GrantRefused {
                            capability,
                            problem: GrantProblem::Grant(e),
                        }
                    })?;
                } )+
                Ok(())
            }
        }

        impl Services {
            /// Builds every configured service: resolves secrets, loads CA bundles, checks the
            /// mail outbox's path (made when mail is first written). Nothing is contacted yet (an
            /// OAuth token is fetched on first use).
            pub fn from_config(
                config: &ServicesConfig,
                env: &ServiceEnv,
            ) -> Result<Services, ServiceError> {
                Ok(Services {
                    $( $field: <$marker as Grantable>::service(&config.$field, env)
                        .map_err(|e| ServiceError {
                            capability: Capability::$name,
                            reason: Box::new(e),
                        })?
                        .map(Arc::new), )+
                    configured_by: env.configured_by,
                })
            }
        }

        /// The capabilities of one sandbox, each behind its [`Gate`].
        #[derive(Debug)]
        pub struct CapabilityStates {
            $( $(#[$doc])* pub $field: Gate<$marker>, )+
        }

        impl CapabilityStates {
            /// The capabilities of a fresh sandbox of a handler with `grants` and `limits`.
            pub fn new(grants: &Grants, services: &Services, limits: &Limits) -> Self {
                CapabilityStates {
                    $( $field: Gate::new(
                        CallBudget::new(
                            LimitKind::Calls(<$marker as Grantable>::CALLS_LIMIT),
                            limits.calls(
                                <$marker as Grantable>::INTERFACE,
                                <$marker as Grantable>::DEFAULT_CALLS,
                            ),
                        ),
                        grants.$field.clone(),
                        services.$field.clone(),
                        services.configured_by,
                    ), )+
                }
            }

            /// The call a capability of this sandbox is waiting on, if any, and how long it
            /// has waited.
            pub fn waiting(&self) -> Option<(String, std::time::Duration)> {
                None $( .or_else(|| self.$field.waiting()) )+
            }

            /// Adds every grantable capability's interface to `linker`. Which of them a
            /// component may import is decided by the load gate.
            pub fn add_to_linker<T: HasCapabilities + Send + 'static>(
                linker: &mut Linker<T>,
            ) -> wasmtime::Result<()> {
                $( <$marker as Grantable>::add_to_linker(linker, |s: &mut T| {
                    &mut s.capabilities().$field
                })?; )+
                Ok(())
            }
        }
    };
}

grantable! {
    /// The Keyfactor Command API proxy (`jobhook:handler/keyfactor`).
    keyfactor: Keyfactor => keyfactor::Keyfactor,
    /// E-mail through the engine's relay (`jobhook:handler/mail`).
    mail: Mail => mail::Mail,
    /// Outbound HTTP to allow-listed URLs (`jobhook:handler/http`).
    http: Http => http::Http,
}

/// Why the engine's sections cannot serve a handler's grant ([`ServicesConfig::check_grants`]).
/// Its text, for a configuration being read, starts with the key under `handlers.grants` and
/// says what to fix in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRefused {
    /// The capability granted.
    pub capability: Capability,
    /// What is wrong.
    pub problem: GrantProblem,
}

/// What is wrong with a grant, against the engine's sections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantProblem {
    /// The engine does not configure the capability ([`Grantable::configured`]): every call
    /// would answer `not-available`.
    NotConfigured,
    /// The capability's own check refused the grant ([`Grantable::check_grant`]); the text
    /// starts with the grant's key.
    Grant(String),
}

impl fmt::Display for GrantRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let interface = self.capability.interface();
        match &self.problem {
            GrantProblem::NotConfigured => write!(
                f,
                "{interface}: the handler is granted {interface}, but this engine does not \
                 configure it ({key}), so every call would answer not-available: configure {key} \
                 or remove the grant",
                key = self.capability.config_key(),
            ),
            GrantProblem::Grant(e) => write!(f, "{interface}.{e}"),
        }
    }
}

impl std::error::Error for GrantRefused {}

impl Capability {
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

impl Grants {
    /// The granted capabilities.
    pub fn granted(&self) -> Vec<Capability> {
        Capability::ALL
            .into_iter()
            .filter(|c| self.allows(*c))
            .collect()
    }
}

/// The state of a sandbox that holds the grantable capabilities.
pub trait HasCapabilities {
    /// The sandbox's capabilities.
    fn capabilities(&mut self) -> &mut CapabilityStates;
}

/// Why a capability's service could not be built from its configuration section. Its text is
/// the reason's, which names the section and key; the reason is not also its source, so that a
/// chain of causes does not say it twice.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ServiceError {
    /// Which capability.
    pub capability: Capability,
    /// Why.
    pub reason: Box<dyn std::error::Error + Send + Sync>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::types::CapabilityError;
    use crate::limits::LimitExceeded;

    #[test]
    fn budget_allows_exactly_its_limit() {
        let mut b = CallBudget::new(LimitKind::Calls("mail-calls"), 2);
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        let e = b.take().unwrap_err();
        let hit = e.downcast_ref::<LimitExceeded>().unwrap();
        assert_eq!(hit.kind, LimitKind::Calls("mail-calls"));
        assert_eq!(b.used(), 2);
    }

    /// The `not-available` message a fresh sandbox gets from each unconfigured capability of
    /// an engine whose services are built with `configured_by`.
    fn not_available(configured_by: ConfiguredBy) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let env = ServiceEnv {
            default_outbox: dir.path().join("outbox"),
            configured_by,
        };
        let services = Services::from_config(&ServicesConfig::default(), &env).unwrap();
        assert!(services.keyfactor.is_none() && services.mail.is_none());
        let mut states =
            CapabilityStates::new(&Grants::permissive(), &services, &Limits::default());
        let message = |r: Result<_, CapabilityError>| match r {
            Err(CapabilityError::NotAvailable(m)) => m,
            other => panic!("expected not-available, got {other:?}"),
        };
        (
            message(states.keyfactor.admit().unwrap().map(|_| ())),
            message(states.mail.admit().unwrap().map(|_| ())),
        )
    }

    #[test]
    fn an_unconfigured_capability_names_what_configures_it() {
        let (keyfactor, mail) = not_available(ConfiguredBy::ConfigFile);
        assert_eq!(
            keyfactor,
            "no Keyfactor API is configured for this engine ([keyfactor] base_url)"
        );
        assert_eq!(
            mail,
            "no mail transport is configured for this engine ([mail])"
        );

        let flags = ConfiguredBy::Flags(&[("keyfactor", "--keyfactor-url")]);
        let (keyfactor, mail) = not_available(flags);
        assert_eq!(
            keyfactor,
            "no Keyfactor API is configured for this engine (--keyfactor-url)"
        );
        // Not named by the front-end: the configuration key.
        assert_eq!(
            mail,
            "no mail transport is configured for this engine ([mail])"
        );
    }

    #[test]
    fn capability_names_round_trip() {
        for c in Capability::ALL {
            assert_eq!(Capability::from_interface(c.interface()), Some(c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.interface());
        }
        assert_eq!(Capability::from_interface("log"), None);
    }
}
