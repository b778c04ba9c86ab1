//! The one gate every grantable capability passes through, and the contract a capability
//! implements to be one.
//!
//! A grantable capability (keyfactor, mail, http, …) is one folder under `capabilities/` that
//! implements [`Grantable`]: its engine-level configuration section, its per-handler grant, its
//! engine-wide service, how it links its WIT interface, and its call budget. Every sandbox holds
//! one [`Gate`] per capability; every call goes through [`Gate::admit`], which takes one call
//! from the budget (trapping the sandbox when it is spent), refuses the call when the handler
//! has no grant, and answers `not-available` when the engine has no service configured — in
//! that order, the same for every capability.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use wasmtime::component::Linker;

use crate::bindings::types::CapabilityError;
use crate::limits::{LimitExceeded, LimitKind};

/// What the engine gives a capability when it builds its service.
#[derive(Debug, Clone)]
pub struct ServiceEnv {
    /// Where mail goes when `[mail]` names neither an outbox nor a relay (in the data
    /// directory).
    pub default_outbox: PathBuf,
    /// Which front-end configures the services: what a handler is told to set when it calls a
    /// capability that has none.
    pub configured_by: ConfiguredBy,
}

/// How the running engine's capability services are configured, so that a handler calling a
/// capability with no service is told what to set in the terms of the front-end that started
/// the engine. The capabilities know their configuration sections; the flags of a command line
/// are the command line's business and come from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConfiguredBy {
    /// The configuration file (`jobhook serve`, `jobhook check`): each capability is named by
    /// its section and key ([`Grantable::CONFIG_KEY`]).
    #[default]
    ConfigFile,
    /// Command-line flags (`jobhook run`): for a capability's interface name, the flags that
    /// configure it. A capability not listed is named by its configuration key.
    Flags(&'static [(&'static str, &'static str)]),
}

impl ConfiguredBy {
    /// What configures capability `C`: a configuration key or a command-line flag.
    pub fn setting<C: Grantable>(&self) -> &'static str {
        match self {
            ConfiguredBy::ConfigFile => C::CONFIG_KEY,
            ConfiguredBy::Flags(flags) => flags
                .iter()
                .find(|(interface, _)| *interface == C::INTERFACE)
                .map_or(C::CONFIG_KEY, |(_, flag)| *flag),
        }
    }

    /// What a handler calling `C` is told when the engine has no service for it.
    pub fn not_configured<C: Grantable>(&self) -> String {
        format!("{} ({})", C::NOT_CONFIGURED, self.setting::<C>())
    }
}

/// A capability that reaches outside the sandbox and must be granted per handler.
pub trait Grantable: Sized + Send + 'static {
    /// Its WIT interface (`jobhook:handler/<INTERFACE>`), which is also the name of its sections:
    /// `[<INTERFACE>]`, `[handlers.grants.<INTERFACE>]` and `[handlers.limits] <INTERFACE>_calls`.
    const INTERFACE: &'static str;
    /// Its call limit as named in outcomes and metrics (`<INTERFACE>-calls`).
    const CALLS_LIMIT: &'static str;
    /// Calls per invocation unless the handler's limits say otherwise.
    const DEFAULT_CALLS: u32;
    /// What a handler is told when the engine has no service for it, followed by what to set
    /// ([`ConfiguredBy::not_configured`]).
    const NOT_CONFIGURED: &'static str;
    /// What configures the service in the configuration file, e.g. `[keyfactor] base_url`.
    const CONFIG_KEY: &'static str;

    /// The engine-level section `[<INTERFACE>]` (its default: the section left out).
    type Config: Default + Clone + fmt::Debug + PartialEq + Eq + Serialize + DeserializeOwned;
    /// A handler's grant `[handlers.grants.<INTERFACE>]`: what it may do with the capability.
    type Grant: Clone + fmt::Debug + PartialEq + Eq + Serialize + DeserializeOwned + Send + Sync;
    /// The engine-wide service behind the capability (API client, mail transport, …), shared by
    /// every sandbox.
    type Service: fmt::Debug + Send + Sync + 'static;
    /// Why the service cannot be built from its section.
    type ConfigError: std::error::Error + Send + Sync + 'static;

    /// Every permission the capability has: what `jobhook run`, the author's harness, grants.
    fn permissive_grant() -> Self::Grant;

    /// Makes the relative paths of the section (CA bundles, secret files, directories) relative
    /// to `base`, the configuration file's directory.
    fn rebase(config: &mut Self::Config, base: &Path);

    /// Checks a handler's grant against the engine's section when the configuration is read
    /// (e.g. that a named identity exists); `Err` says what is wrong, starting with the grant's
    /// key. Most grants stand alone: the default accepts every grant.
    fn check_grant(config: &Self::Config, grant: &Self::Grant) -> Result<(), String> {
        let _ = (config, grant);
        Ok(())
    }

    /// Whether the section configures the service at all ([`Grantable::service`] would give
    /// `Some`). A grant of a capability the engine does not configure is refused when the
    /// configuration is read: every call of the handler would answer `not-available`. The
    /// default: the capability works on its defaults.
    fn configured(config: &Self::Config) -> bool {
        let _ = config;
        true
    }

    /// Builds the service from the section: `None` when the section leaves the capability
    /// unconfigured (its calls then answer `not-available`). Secrets are resolved here; nothing
    /// is contacted yet.
    fn service(
        config: &Self::Config,
        env: &ServiceEnv,
    ) -> Result<Option<Self::Service>, Self::ConfigError>;

    /// Adds the capability's WIT interface to `linker`, served by the gate `get` finds in the
    /// store's state.
    fn add_to_linker<T: Send + 'static>(
        linker: &mut Linker<T>,
        get: fn(&mut T) -> &mut Gate<Self>,
    ) -> wasmtime::Result<()>;
}

/// The refusal of a grant whose list `key` is empty: every `use` under it would be refused, so
/// the grant is refused when the configuration is loaded, saying what to `write` instead
/// ([`Grantable::check_grant`]).
pub fn empty_grant_list(key: &str, use_: &str, write: &str) -> String {
    format!("{key}: the list is empty, so every {use_} would be refused: {write}")
}

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

/// Longest description of a call under way kept for an outcome: a method and a path or host,
/// cut here (a handler chooses the path).
const MAX_CALL_DESCRIPTION_BYTES: usize = 256;

/// The call a capability is waiting on, if any: what and since when. Marked when the call
/// starts and cleared when it ends; a delivery whose time runs out while it waits drops the
/// call mid-way, so the mark stays, and the outcome says what the handler was waiting for (a
/// hung API, not a looping handler).
#[derive(Debug, Default)]
pub struct CallUnderWay(std::sync::Mutex<Option<(String, std::time::Instant)>>);

impl CallUnderWay {
    /// Marks a call to `what` as under way from now. `what` may hold a handler's text (a path,
    /// a host): it is escaped and cut here, whoever describes the call.
    pub fn start(&self, what: &str) {
        let what = crate::outcome::truncate(
            crate::escape::escape(what).into_owned(),
            MAX_CALL_DESCRIPTION_BYTES,
        );
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((what, std::time::Instant::now()));
    }

    /// The call ended.
    pub fn end(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The call under way and how long it has waited.
    pub fn waiting(&self) -> Option<(String, std::time::Duration)> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(what, since)| (what.clone(), since.elapsed()))
    }
}

/// One capability in one sandbox: its call budget, the handler's grant (`None`: not granted),
/// the engine's service (`None`: not configured, with how the engine is configured to say
/// what to set) and the call under way.
pub struct Gate<C: Grantable> {
    budget: CallBudget,
    grant: Option<C::Grant>,
    service: Option<Arc<C::Service>>,
    configured_by: ConfiguredBy,
    under_way: Arc<CallUnderWay>,
}

impl<C: Grantable> Gate<C> {
    /// A gate with `budget`, the handler's `grant` and the engine's `service`, configured as
    /// `configured_by` says.
    pub fn new(
        budget: CallBudget,
        grant: Option<C::Grant>,
        service: Option<Arc<C::Service>>,
        configured_by: ConfiguredBy,
    ) -> Self {
        Gate {
            budget,
            grant,
            service,
            configured_by,
            under_way: Arc::default(),
        }
    }

    /// The mark of this capability's call under way (for the call to set and clear around its
    /// wait).
    pub fn under_way(&self) -> Arc<CallUnderWay> {
        Arc::clone(&self.under_way)
    }

    /// The call under way, if one is, and how long it has waited.
    pub fn waiting(&self) -> Option<(String, std::time::Duration)> {
        self.under_way.waiting()
    }

    /// Lets one call through: takes it from the budget (`Err`: the sandbox traps with
    /// `limit-exceeded`), then hands out the grant and the service, or the error the guest gets
    /// when the capability is not granted or not configured.
    #[allow(clippy::type_complexity)]
    pub fn admit(
        &mut self,
    ) -> wasmtime::Result<Result<(&C::Grant, &Arc<C::Service>), CapabilityError>> {
        self.budget.take()?;
        let Some(grant) = &self.grant else {
            return Ok(Err(CapabilityError::NotGranted(format!(
                "the {} capability is not granted to this handler",
                C::INTERFACE
            ))));
        };
        let Some(service) = &self.service else {
            return Ok(Err(CapabilityError::NotAvailable(
                self.configured_by.not_configured::<C>(),
            )));
        };
        Ok(Ok((grant, service)))
    }
}

impl<C: Grantable> fmt::Debug for Gate<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("capability", &C::INTERFACE)
            .field("budget", &self.budget)
            .field("granted", &self.grant.is_some())
            .field("configured", &self.service.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a handler puts in a call's description (a Keyfactor path, an http host) reaches an
    /// outcome and the log: every kind of control text comes out escaped, on one line, and a
    /// long one is cut; a call that ended leaves no mark.
    #[test]
    fn a_call_under_way_is_described_escaped_and_bounded() {
        let mark = CallUnderWay::default();
        for hostile in [
            "Certificates/\nWARN forged line",
            "Certificates/\u{1b}[31mred",
            "Certificates/\u{202e}txt.exe",
            "Certificates/\u{0}nul\r",
            &"x".repeat(10_000),
        ] {
            mark.start(&format!("the Keyfactor API (GET {hostile})"));
            let (told, _) = mark.waiting().expect("under way");
            assert!(
                !told.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{told:?}"
            );
            assert!(
                told.len() <= MAX_CALL_DESCRIPTION_BYTES + crate::outcome::TRUNCATED_MARK.len(),
                "{} bytes",
                told.len()
            );
            mark.end();
            assert_eq!(mark.waiting(), None);
        }
    }
}
