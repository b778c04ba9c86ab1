//! Per-handler resource limits and the `ResourceLimiter` that enforces the memory and table
//! budgets of one sandbox.
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
    #[serde(rename = "timeout_ms", with = "duration_ms")]
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

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
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

/// Enforces the memory and table budgets as totals across the whole instance (wasmtime's own
/// `StoreLimits` only bounds each memory separately). Memories and tables only grow within one
/// sandbox, so the running totals are exact.
#[derive(Debug)]
pub struct SandboxLimiter {
    memory_limit: u64,
    table_limit: u64,
    instances: usize,
    memories: usize,
    tables: usize,
    memory_used: u64,
    tables_used: u64,
    /// The growth last granted, taken back if the grow then fails.
    pending_memory: u64,
    pending_table: u64,
}

impl SandboxLimiter {
    /// A limiter for one sandbox with the handler's limits.
    pub fn new(limits: &Limits) -> Self {
        SandboxLimiter {
            memory_limit: limits.memory_bytes,
            table_limit: limits.table_elements,
            instances: limits.instances,
            memories: limits.memories,
            tables: limits.tables,
            memory_used: 0,
            tables_used: 0,
            pending_memory: 0,
            pending_table: 0,
        }
    }

    /// Bytes of linear memory in use across the instance.
    pub fn memory_used(&self) -> u64 {
        self.memory_used
    }
}

impl wasmtime::ResourceLimiter for SandboxLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = (desired as u64).saturating_sub(current as u64);
        let total = self.memory_used.saturating_add(delta);
        if total > self.memory_limit {
            return Err(wasmtime::Error::new(LimitExceeded {
                kind: LimitKind::Memory,
                detail: format!(
                    "growing linear memory to {desired} bytes would use {total} bytes in total; \
                     the limit is {} bytes",
                    self.memory_limit
                ),
            }));
        }
        self.memory_used = total;
        self.pending_memory = delta;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_used = self.memory_used.saturating_sub(self.pending_memory);
        self.pending_memory = 0;
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = (desired as u64).saturating_sub(current as u64);
        let total = self.tables_used.saturating_add(delta);
        if total > self.table_limit {
            return Err(wasmtime::Error::new(LimitExceeded {
                kind: LimitKind::Table,
                detail: format!(
                    "growing a table to {desired} elements would use {total} elements in total; \
                     the limit is {}",
                    self.table_limit
                ),
            }));
        }
        self.tables_used = total;
        self.pending_table = delta;
        Ok(true)
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.tables_used = self.tables_used.saturating_sub(self.pending_table);
        self.pending_table = 0;
        Ok(())
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        self.memories
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn memory_is_totalled_across_memories() {
        let limits = Limits {
            memory_bytes: 100,
            ..Limits::default()
        };
        let mut l = SandboxLimiter::new(&limits);
        assert!(l.memory_growing(0, 60, None).unwrap());
        // A second memory: each alone is under the limit, together they are over it.
        let err = l.memory_growing(0, 60, None).unwrap_err();
        let hit = err.downcast_ref::<LimitExceeded>().unwrap();
        assert_eq!(hit.kind, LimitKind::Memory);
        assert_eq!(l.memory_used(), 60);
        assert!(l.memory_growing(60, 100, None).unwrap());
        assert_eq!(l.memory_used(), 100);
    }

    #[test]
    fn a_failed_grow_is_given_back() {
        let limits = Limits {
            memory_bytes: 100,
            ..Limits::default()
        };
        let mut l = SandboxLimiter::new(&limits);
        assert!(l.memory_growing(0, 80, None).unwrap());
        l.memory_grow_failed(wasmtime::format_err!("os said no"))
            .unwrap();
        assert_eq!(l.memory_used(), 0);
    }

    #[test]
    fn tables_are_totalled() {
        let limits = Limits {
            table_elements: 10,
            ..Limits::default()
        };
        let mut l = SandboxLimiter::new(&limits);
        assert!(l.table_growing(0, 6, None).unwrap());
        let err = l.table_growing(0, 6, None).unwrap_err();
        assert_eq!(
            err.downcast_ref::<LimitExceeded>().unwrap().kind,
            LimitKind::Table
        );
    }

    #[test]
    fn defaults_parse_from_empty_config_and_unknown_keys_are_refused() {
        let parsed: Limits = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, Limits::default());
        let parsed: Limits = serde_json::from_str(r#"{"timeout_ms": 250}"#).unwrap();
        assert_eq!(parsed.timeout, Duration::from_millis(250));
        assert!(serde_json::from_str::<Limits>(r#"{"memory": 1}"#).is_err());
    }
}
