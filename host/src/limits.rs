//! Per-handler resource limits: the budgets every sandbox of a handler gets. Where each is
//! enforced: time and CPU in [`crate::runtime::sandbox`], memory and tables in
//! [`crate::runtime::limiter`], host-call budgets in each capability.
//!
//! Every default is a named constant with the reason for its value. Operators override them per
//! handler in configuration; the defaults are what an untrusted third-party handler gets.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Wall-clock budget for one invocation, including time spent waiting in host calls. Keyfactor
/// handlers are short (a mail, one or two API calls); 10 s is ample and bounds a stuck handler.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Total bytes across all linear memories of one instance. A Rust handler needs 1–4 MiB; 64 MiB
/// leaves room for JSON responses while keeping 1,000 concurrent sandboxes within a host's RAM.
pub const DEFAULT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;

/// Total elements across all tables of one instance. Rust components use a few hundred
/// function-table entries; 20,000 is wasmtime's pooling default and bounds table-growth bombs.
pub const DEFAULT_TABLE_ELEMENTS: u64 = 20_000;

/// Core instances, memories and tables one component may create. A `wasm32-wasip2` Rust component
/// has about 3–6 core instances, 1 memory and 1–3 tables; these caps stop instance-count bombs.
pub const DEFAULT_MAX_INSTANCES: usize = 32;
/// See [`DEFAULT_MAX_INSTANCES`].
pub const DEFAULT_MAX_MEMORIES: usize = 4;
/// See [`DEFAULT_MAX_INSTANCES`].
pub const DEFAULT_MAX_TABLES: usize = 16;

/// Bytes wasmtime may copy from the guest into the host in one lift (import arguments, the
/// export's result). The context and a log line are small; 4 MiB covers a large mail or request
/// body and stops a guest from making the host allocate gigabytes.
pub const DEFAULT_HOSTCALL_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of stdout and of stderr kept per invocation; the rest is counted and dropped, never
/// trapped on, so a chatty handler still runs to completion.
pub const DEFAULT_OUTPUT_BYTES: usize = 64 * 1024;

/// Log lines kept per invocation. Enough for a verbose handler; past it lines are counted and
/// dropped so a log flood cannot grow the outcome record without bound.
pub const DEFAULT_LOG_LINES: usize = 200;

/// Log bytes kept per invocation (all lines together).
pub const DEFAULT_LOG_BYTES: usize = 64 * 1024;

/// Longest single log line kept; longer lines are truncated (on a character boundary).
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;

/// Keyfactor API calls per invocation. The documented samples make one or two; 20 allows a small
/// paging loop and stops an API flood from one event.
pub const DEFAULT_KEYFACTOR_CALLS: u32 = 20;

/// Mails per invocation. A notification handler sends one.
pub const DEFAULT_MAIL_CALLS: u32 = 5;

/// Outbound webhook calls per invocation.
pub const DEFAULT_HTTP_CALLS: u32 = 5;

/// The limits of one handler's sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Keyfactor API calls allowed.
    pub keyfactor_calls: u32,
    /// Mails allowed.
    pub mail_calls: u32,
    /// Outbound HTTP calls allowed.
    pub http_calls: u32,
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
            keyfactor_calls: DEFAULT_KEYFACTOR_CALLS,
            mail_calls: DEFAULT_MAIL_CALLS,
            http_calls: DEFAULT_HTTP_CALLS,
        }
    }
}

/// Which limit stopped a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    /// Keyfactor API calls per invocation.
    KeyfactorCalls,
    /// Mails per invocation.
    MailCalls,
    /// Outbound HTTP calls per invocation.
    HttpCalls,
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
            LimitKind::KeyfactorCalls => "keyfactor-calls",
            LimitKind::MailCalls => "mail-calls",
            LimitKind::HttpCalls => "http-calls",
        }
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
}
