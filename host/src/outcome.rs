//! What happened when a handler ran: the record kept for every invocation.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::limits::LimitKind;

/// Longest handler-supplied reason kept in an outcome. A hostile handler could return megabytes.
pub const MAX_REASON_BYTES: usize = 4 * 1024;

/// How an invocation ended. Serialised with a `class` tag (`succeeded`, `handler-failed`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "class", rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// `run-handler` returned `ok`.
    Succeeded,
    /// `run-handler` returned `err(reason)`: the handler says it did not complete.
    HandlerFailed {
        /// The handler's reason (bounded by [`MAX_REASON_BYTES`]).
        reason: String,
    },
    /// The handler panicked (Rust `panic!`, `unwrap` on `None`, ...).
    Panicked {
        /// The panic message and location, from the handler's stderr.
        message: String,
    },
    /// The handler trapped: `unreachable`, out-of-bounds access, invalid values across the
    /// boundary, a call to `exit`, ...
    Trapped {
        /// A stable short code, e.g. `unreachable`, `memory-out-of-bounds`, `exit`.
        code: String,
        /// wasmtime's description.
        message: String,
        /// Guest frames, innermost first, when available.
        backtrace: Vec<String>,
    },
    /// The wall-clock budget ran out (in guest code or while waiting in a host call).
    TimedOut {
        /// The budget that was exceeded, in milliseconds.
        limit_ms: u64,
        /// The capability call the handler was waiting on when the time ran out, and for how
        /// long (`the Keyfactor API (GET OrchestratorJobs/JobHistory) for 9990 ms`): a hung
        /// service, not a looping handler.
        #[serde(skip_serializing_if = "Option::is_none")]
        waiting_for: Option<String>,
    },
    /// A resource limit or host-call budget was reached.
    LimitExceeded {
        /// Which limit.
        limit: LimitKind,
        /// What was attempted against what is allowed.
        detail: String,
    },
    /// The engine could not run the handler for a reason that is not the handler's doing
    /// (e.g. every sandbox slot is in use).
    EngineError {
        /// What went wrong.
        message: String,
    },
}

/// The class of an attempt the engine, not the handler, failed.
pub const ENGINE_ERROR_CLASS: &str = "engine-error";

impl OutcomeKind {
    /// The class name: `succeeded`, `handler-failed`, `panicked`, `trapped`, `timed-out`,
    /// `limit-exceeded`, `engine-error`.
    pub fn class(&self) -> &'static str {
        match self {
            OutcomeKind::Succeeded => "succeeded",
            OutcomeKind::HandlerFailed { .. } => "handler-failed",
            OutcomeKind::Panicked { .. } => "panicked",
            OutcomeKind::Trapped { .. } => "trapped",
            OutcomeKind::TimedOut { .. } => "timed-out",
            OutcomeKind::LimitExceeded { .. } => "limit-exceeded",
            OutcomeKind::EngineError { .. } => ENGINE_ERROR_CLASS,
        }
    }

    /// Whether the handler completed successfully.
    pub fn is_success(&self) -> bool {
        matches!(self, OutcomeKind::Succeeded)
    }
}

impl fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutcomeKind::Succeeded => write!(f, "succeeded"),
            OutcomeKind::HandlerFailed { reason } => write!(f, "handler failed: {reason}"),
            OutcomeKind::Panicked { message } => write!(f, "panicked: {message}"),
            OutcomeKind::Trapped { code, message, .. } => write!(f, "trapped ({code}): {message}"),
            OutcomeKind::TimedOut {
                limit_ms,
                waiting_for: None,
            } => write!(f, "timed out after {limit_ms} ms"),
            OutcomeKind::TimedOut {
                limit_ms,
                waiting_for: Some(call),
            } => write!(f, "timed out after {limit_ms} ms, waiting for {call}"),
            OutcomeKind::LimitExceeded { limit, detail } => {
                write!(f, "{} limit exceeded: {detail}", limit.as_str())
            }
            OutcomeKind::EngineError { message } => write!(f, "engine error: {message}"),
        }
    }
}

/// One line a handler logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// The message, truncated to [`crate::limits::MAX_LOG_LINE_BYTES`].
    pub message: String,
}

/// The full record of one invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// How it ended.
    #[serde(flatten)]
    pub kind: OutcomeKind,
    /// Wall-clock time from sandbox creation to the end of the call.
    #[serde(
        rename = "duration_ms",
        serialize_with = "crate::duration_ms::serialize_fractional"
    )]
    pub duration: Duration,
    /// The handler's log lines, in order, within the log budget.
    pub logs: Vec<LogLine>,
    /// Log lines dropped because the budget was reached.
    pub logs_dropped: u64,
    /// Captured stdout (lossy UTF-8, within the output budget).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8, within the output budget).
    pub stderr: String,
    /// Bytes of stdout and stderr dropped because the budget was reached.
    pub output_dropped: u64,
    /// Bytes of linear memory the instance had grown to.
    pub memory_bytes: u64,
}

#[cfg(test)]
impl Outcome {
    /// An outcome of `kind` after `duration`, with no log lines, output or memory: for tests in
    /// which only how a delivery ended matters.
    pub(crate) fn bare(kind: OutcomeKind, duration: Duration) -> Self {
        Outcome {
            kind,
            duration,
            logs: Vec::new(),
            logs_dropped: 0,
            stdout: String::new(),
            stderr: String::new(),
            output_dropped: 0,
            memory_bytes: 0,
        }
    }
}

/// What [`truncate`] appends where it cut.
pub const TRUNCATED_MARK: &str = " [truncated]";

/// Truncates `text` to at most `max` bytes on a character boundary, marking the cut (the mark
/// comes on top of `max`).
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(TRUNCATED_MARK);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h [truncated]");
        assert_eq!(truncate("short".into(), 10), "short");
    }

    #[test]
    fn serialises_with_class_tag() {
        let o = Outcome::bare(
            OutcomeKind::LimitExceeded {
                limit: LimitKind::Memory,
                detail: "x".into(),
            },
            Duration::from_millis(3),
        );
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["class"], "limit-exceeded");
        assert_eq!(v["limit"], "memory");
        assert_eq!(v["duration_ms"], 3.0);
    }
}
