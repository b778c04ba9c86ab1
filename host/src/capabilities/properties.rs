//! `jobhook:handler/properties`: the operator's per-handler configuration, like the
//! `<property>` elements of a web.config registration or the `Options` of a Command 11 manifest.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::bindings::jobhook::handler::properties::Host;

/// The properties of one handler. Shared by all its sandboxes; read-only for the guest.
/// `Debug` shows names only: values may be resolved secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Properties {
    values: Arc<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

impl Properties {
    /// Properties from name/value pairs.
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Properties {
            values: Arc::new(values),
        }
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The names of all properties, sorted.
    pub fn names(&self) -> Vec<String> {
        self.values.keys().cloned().collect()
    }
}

/// Why `name` cannot be a property name, if it cannot: empty, or holding a control character (a
/// handler reads a property by name; a line break or an escape in one is a mistake, and would be
/// carried into every listing of the handler). One rule for the configuration and `jobhook run`,
/// so that a handler is never tried with a name the engine would refuse.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("a property name is empty")
    } else if name.chars().any(char::is_control) {
        Some("a property name must not hold control characters (line breaks, tabs, escapes)")
    } else {
        None
    }
}

impl Host for Properties {
    async fn get(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self.values.get(&name).cloned())
    }

    async fn names(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.values.keys().cloned().collect())
    }
}
