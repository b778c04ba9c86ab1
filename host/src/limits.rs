//! Per-handler resource limits: the budgets every sandbox of a handler gets. Where each is
//! enforced: time and CPU in [`crate::runtime::sandbox`], memory and tables in
//! [`crate::runtime::limiter`], host-call budgets in each capability.
//!
//! Every default is a named constant with the reason for its value. Operators override them per
//! handler in configuration; the defaults are what an untrusted third-party handler gets.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Wall-clock budget for one invocation, including time spent waiting in host calls. Keyfactor
/// handlers are short (a mail, one or two API calls); 10 s is ample and bounds a stuck handler.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Total bytes across all linear memories of one instance. A Rust handler needs 1–4 MiB; 64 MiB
/// leaves room for JSON responses while keeping 1,000 concurrent sandboxes within a host's RAM.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;

/// Total elements across all tables of one instance. Rust components use a few hundred
/// function-table entries; 20,000 is wasmtime's pooling default and bounds table-growth bombs.
pub const DEFAULT_TABLE_ELEMENTS: u64 = 20_000;

/// Most `table_elements` a handler may be given: the sandbox pool's room per table
/// (`engine::pooling_config_with`), which no table can grow past whatever a handler is
/// allowed; a larger setting would be shown and never granted.
pub const MAX_TABLE_ELEMENTS: u64 = DEFAULT_TABLE_ELEMENTS * 5;

/// Core instances, memories and tables one component may create. A `wasm32-wasip2` Rust component
/// has about 3–6 core instances, 1 memory and 1–3 tables, Python 14 core instances, QuickJS 2
/// memories (docs/LANGUAGES.md); these caps stop instance-count bombs. They are the sandbox
/// pool's reservation per delivery (`engine::DEFAULT_*_PER_DELIVERY`), which the pool's
/// per-component caps default to as well: no handler's delivery can take more of the pool than
/// its share.
pub const DEFAULT_MAX_INSTANCES: usize = 16;
/// See [`DEFAULT_MAX_INSTANCES`].
pub const DEFAULT_MAX_MEMORIES: usize = 2;
/// See [`DEFAULT_MAX_INSTANCES`].
pub const DEFAULT_MAX_TABLES: usize = 4;

/// Bytes wasmtime may copy from the guest into the host in one lift (import arguments, the
/// export's result). The context and a log line are small; 4 MiB covers a large mail or request
/// body and stops a guest from making the host allocate gigabytes.
pub const DEFAULT_HOSTCALL_BYTES: usize = 4 * 1024 * 1024;

/// Least `hostcall_bytes` a handler may be given: a lift carries an import's arguments (a log
/// line, a request) or the handler's result, and a budget under 64 KiB would refuse ordinary
/// calls, so a smaller value is taken for a typo rather than a limit.
pub const MIN_HOSTCALL_BYTES: usize = 64 * 1024;

/// Most `hostcall_bytes` a handler may be given: a lift is copied whole into the engine's
/// memory, once per delivery in flight. 64 MiB matches the largest outbound body
/// (`outbound::MAX_BODY_LIMIT_BYTES`).
pub const MAX_HOSTCALL_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of stdout and of stderr kept per invocation; the rest is counted and dropped, never
/// trapped on, so a chatty handler still runs to completion.
pub const DEFAULT_OUTPUT_BYTES: usize = 64 * 1024;

/// Most `output_bytes` a handler may be given: stdout and stderr are each kept in the engine's
/// memory for the whole delivery (a guest printing without end would otherwise take it: 350
/// MB seen for one delivery at an unbounded setting).
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// Log lines kept per invocation. Enough for a verbose handler; past it lines are counted and
/// dropped so a log flood cannot grow the outcome record without bound.
pub const DEFAULT_LOG_LINES: usize = 200;

/// Log bytes kept per invocation (all lines together).
pub const DEFAULT_LOG_BYTES: usize = 64 * 1024;

/// Most `log_lines` a handler may be given: a delivery's log is stored with its outcome and
/// sent whole by `GET /v1/events/{id}`.
pub const MAX_LOG_LINES: usize = 10_000;

/// Most `log_bytes` a handler may be given (see [`MAX_LOG_LINES`]).
pub const MAX_LOG_BYTES: usize = 1024 * 1024;

/// Longest single log line kept; longer lines are truncated (on a character boundary).
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;

/// Longest Keyfactor job message (JobHistory's `Message`) kept with an event and handed to its
/// handlers by `delivery.message`; longer text is truncated on a character boundary. Command's
/// messages are a sentence or an exception's text, which this holds whole; the bound keeps one
/// JobHistory row from adding more than this to the store and to every sandbox of its event.
pub const MAX_JOB_MESSAGE_BYTES: usize = 16 * 1024;

/// The suffix of a capability's call limit in `[handlers.limits]`: `<interface>_calls`.
pub const CALLS_SUFFIX: &str = "_calls";

/// The limits of one handler's sandboxes.
///
/// Unknown keys are refused. The call budgets of the grantable capabilities are written
/// `<interface>_calls` (`keyfactor_calls = 20`); each capability has its own default
/// (`Grantable::DEFAULT_CALLS`), used when the key is left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Wall-clock budget per invocation (milliseconds in configuration).
    #[serde(rename = "timeout_ms", with = "crate::duration_ms")]
    pub timeout: Duration,
    /// Total bytes across the instance's linear memories.
    pub memory_bytes: u64,
    /// Total elements across the instance's tables.
    pub table_elements: u64,
    /// Core instances the component may create.
    pub instances: usize,
    /// Linear memories the component may create.
    pub memories: usize,
    /// Tables the component may create.
    pub tables: usize,
    /// Bytes copied from guest to host per lift.
    pub hostcall_bytes: usize,
    /// Bytes of stdout and of stderr kept.
    pub output_bytes: usize,
    /// Log lines kept.
    pub log_lines: usize,
    /// Log bytes kept.
    pub log_bytes: usize,
    /// Calls allowed per capability, by interface name (`keyfactor` for `keyfactor_calls`);
    /// a capability left out gets its own default. Every other key is refused here.
    #[serde(flatten, with = "call_limits")]
    pub calls: BTreeMap<String, u32>,
}

impl Limits {
    /// Calls a sandbox may make to the capability `interface`: the handler's
    /// `<interface>_calls`, or `default`.
    pub fn calls(&self, interface: &str, default: u32) -> u32 {
        self.calls.get(interface).copied().unwrap_or(default)
    }
}

/// `<interface>_calls = N` keys, flattened into [`Limits`]: the only keys it does not name
/// itself, so any other key is refused as unknown.
mod call_limits {
    use std::collections::BTreeMap;

    use serde::Serializer;

    use super::CALLS_SUFFIX;

    pub fn serialize<S: Serializer>(
        calls: &BTreeMap<String, u32>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(
            calls
                .iter()
                .map(|(interface, n)| (format!("{interface}{CALLS_SUFFIX}"), n)),
        )
    }
}

/// A duration written in milliseconds, read as [`crate::duration_ms`] reads it.
struct Milliseconds(Duration);

impl<'de> serde::Deserialize<'de> for Milliseconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::duration_ms::deserialize(d).map(Milliseconds)
    }
}

/// Read key by key rather than with serde's `flatten` for the `<interface>_calls` keys:
/// `flatten` buffers the table, and an error inside it (a wrong type, an unknown key) lost its
/// key and line. Read this way, each error names its key at its line; keys left out keep
/// their defaults.
impl<'de> serde::Deserialize<'de> for Limits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LimitsVisitor;

        impl<'de> serde::de::Visitor<'de> for LimitsVisitor {
            type Value = Limits;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table of limits")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Limits, A::Error> {
                let mut limits = Limits::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "timeout_ms" => limits.timeout = map.next_value::<Milliseconds>()?.0,
                        "memory_bytes" => limits.memory_bytes = map.next_value()?,
                        "table_elements" => limits.table_elements = map.next_value()?,
                        "instances" => limits.instances = map.next_value()?,
                        "memories" => limits.memories = map.next_value()?,
                        "tables" => limits.tables = map.next_value()?,
                        "hostcall_bytes" => limits.hostcall_bytes = map.next_value()?,
                        "output_bytes" => limits.output_bytes = map.next_value()?,
                        "log_lines" => limits.log_lines = map.next_value()?,
                        "log_bytes" => limits.log_bytes = map.next_value()?,
                        other => match other.strip_suffix(CALLS_SUFFIX).filter(|i| !i.is_empty()) {
                            Some(interface) => {
                                let calls = map.next_value::<u32>()?;
                                limits.calls.insert(interface.to_owned(), calls);
                            }
                            None => {
                                return Err(serde::de::Error::unknown_field(other, FIELDS));
                            }
                        },
                    }
                }
                Ok(limits)
            }
        }

        /// The keys besides `<interface>_calls`, for the unknown-key error.
        const FIELDS: &[&str] = &[
            "timeout_ms",
            "memory_bytes",
            "table_elements",
            "instances",
            "memories",
            "tables",
            "hostcall_bytes",
            "output_bytes",
            "log_lines",
            "log_bytes",
            "<capability>_calls",
        ];

        d.deserialize_map(LimitsVisitor)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: DEFAULT_TIMEOUT,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            table_elements: DEFAULT_TABLE_ELEMENTS,
            instances: DEFAULT_MAX_INSTANCES,
            memories: DEFAULT_MAX_MEMORIES,
            tables: DEFAULT_MAX_TABLES,
            hostcall_bytes: DEFAULT_HOSTCALL_BYTES,
            output_bytes: DEFAULT_OUTPUT_BYTES,
            log_lines: DEFAULT_LOG_LINES,
            log_bytes: DEFAULT_LOG_BYTES,
            calls: BTreeMap::new(),
        }
    }
}

/// Which limit stopped a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Total linear memory.
    Memory,
    /// Total table elements.
    Table,
    /// Number of core instances, memories or tables.
    Instances,
    /// The wasm stack (deep recursion).
    Stack,
    /// Bytes copied from guest to host in one call.
    HostcallBytes,
    /// Calls per invocation to a capability, named `<interface>-calls` (`keyfactor-calls`,
    /// `mail-calls`, `http-calls`; see `Grantable::CALLS_LIMIT`).
    Calls(&'static str),
}

impl LimitKind {
    /// The name used in outcomes, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Table => "table",
            LimitKind::Instances => "instances",
            LimitKind::Stack => "stack",
            LimitKind::HostcallBytes => "hostcall-bytes",
            LimitKind::Calls(name) => name,
        }
    }
}

impl Serialize for LimitKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The error a sandbox traps with when a limit is reached, so the outcome can name the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} limit exceeded: {detail}", kind = .kind.as_str())]
pub struct LimitExceeded {
    /// Which limit.
    pub kind: LimitKind,
    /// What was attempted against what was allowed.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_from_empty_config_and_unknown_keys_are_refused() {
        let parsed: Limits = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, Limits::default());
        let parsed: Limits = serde_json::from_str(r#"{"timeout_ms": 250}"#).unwrap();
        assert_eq!(parsed.timeout, Duration::from_millis(250));
        assert!(serde_json::from_str::<Limits>(r#"{"memory": 1}"#).is_err());
    }

    #[test]
    fn call_budgets_are_keyed_by_interface() {
        let parsed: Limits =
            serde_json::from_str(r#"{"keyfactor_calls": 3, "log_lines": 7}"#).unwrap();
        assert_eq!(parsed.calls("keyfactor", 20), 3);
        assert_eq!(parsed.calls("mail", 5), 5);
        assert_eq!(parsed.log_lines, 7);
        let text = serde_json::to_value(&parsed).unwrap();
        assert_eq!(text["keyfactor_calls"], 3);
        for bad in [
            r#"{"_calls": 1}"#,
            r#"{"keyfactor_calls": -1}"#,
            r#"{"calls": 1}"#,
        ] {
            assert!(serde_json::from_str::<Limits>(bad).is_err(), "{bad}");
        }
        let e = serde_json::from_str::<Limits>(r#"{"colour": 1}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
