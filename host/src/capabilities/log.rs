//! `jobhook:handler/log`: levelled, bounded logging. Lines go to the engine's `tracing` log
//! (target `jobhook::guest`, with the handler's name) and into the invocation's outcome.

use std::sync::Arc;

use crate::bindings::jobhook::handler::log::{Host, Level};
use crate::escape::escape;
use crate::limits::{Limits, MAX_LOG_LINE_BYTES};
use crate::outcome::{LogLine, truncate};

/// Collects one invocation's log lines within its line and byte budgets.
#[derive(Debug)]
pub struct LogCollector {
    handler: Arc<str>,
    max_lines: usize,
    max_bytes: usize,
    bytes: usize,
    lines: Vec<LogLine>,
    dropped: u64,
}

impl LogCollector {
    /// A collector for one invocation of `handler`.
    pub fn new(handler: Arc<str>, limits: &Limits) -> Self {
        LogCollector {
            handler,
            max_lines: limits.log_lines,
            max_bytes: limits.log_bytes,
            bytes: 0,
            lines: Vec::new(),
            dropped: 0,
        }
    }

    /// Records a line, or counts it as dropped when a budget is spent.
    pub fn record(&mut self, level: Level, message: String) {
        let message = truncate(message, MAX_LOG_LINE_BYTES);
        if self.lines.len() >= self.max_lines
            || self.bytes.saturating_add(message.len()) > self.max_bytes
        {
            if self.dropped == 0 {
                tracing::warn!(
                    target: "jobhook::guest",
                    handler = %escape(&self.handler),
                    "log budget reached ({} lines, {} bytes); further lines are dropped",
                    self.max_lines,
                    self.max_bytes
                );
            }
            self.dropped += 1;
            return;
        }
        // The engine's log is line-oriented: the guest's text goes in as the last field, quoted
        // and escaped by `Debug` (controls, invisible and bidi characters, quotes and
        // backslashes), so it cannot end the line and forge the next one, reach a terminal as
        // an escape sequence, or pass for the line's own fields (`handler=` of another
        // handler) — under any subscriber. The outcome keeps the text as written (the API's
        // JSON escapes it exactly). Formatting it is done only when the engine's log shows the
        // line (at `serve`'s default filter only a handler's errors are shown; its other lines
        // are kept in its outcome only).
        if enabled(level) {
            let handler = escape(&self.handler);
            let line = message.as_str();
            match level {
                Level::Trace => tracing::trace!(target: "jobhook::guest", %handler, line),
                Level::Debug => tracing::debug!(target: "jobhook::guest", %handler, line),
                Level::Info => tracing::info!(target: "jobhook::guest", %handler, line),
                Level::Warn => tracing::warn!(target: "jobhook::guest", %handler, line),
                Level::Error => tracing::error!(target: "jobhook::guest", %handler, line),
            }
        }
        self.bytes += message.len();
        self.lines.push(LogLine {
            level: level_name(level),
            message,
        });
    }

    /// The lines kept and the number dropped.
    pub fn finish(self) -> (Vec<LogLine>, u64) {
        (self.lines, self.dropped)
    }
}

/// Whether the engine's log shows a guest line at `level`.
fn enabled(level: Level) -> bool {
    match level {
        Level::Trace => tracing::enabled!(target: "jobhook::guest", tracing::Level::TRACE),
        Level::Debug => tracing::enabled!(target: "jobhook::guest", tracing::Level::DEBUG),
        Level::Info => tracing::enabled!(target: "jobhook::guest", tracing::Level::INFO),
        Level::Warn => tracing::enabled!(target: "jobhook::guest", tracing::Level::WARN),
        Level::Error => tracing::enabled!(target: "jobhook::guest", tracing::Level::ERROR),
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Trace => "trace",
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

impl Host for LogCollector {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.record(level, message);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector(lines: usize, bytes: usize) -> LogCollector {
        let limits = Limits {
            log_lines: lines,
            log_bytes: bytes,
            ..Limits::default()
        };
        LogCollector::new("t".into(), &limits)
    }

    use crate::log_capture::Captured;

    #[test]
    fn the_engine_log_shows_escaped_exactly_the_levels_its_filter_allows_and_the_outcome_keeps_all()
    {
        let all = [
            Level::Trace,
            Level::Debug,
            Level::Info,
            Level::Warn,
            Level::Error,
        ];
        // One filter per level: each shows that level and the ones above it.
        for (i, filter) in ["trace", "debug", "info", "warn", "error"]
            .iter()
            .enumerate()
        {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(format!("jobhook::guest={filter}"))
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            let mut c = collector(100, 100_000);
            tracing::subscriber::with_default(subscriber, || {
                for level in all {
                    c.record(
                        level,
                        format!("{} line\u{1b}[2J\nforged", level_name(level)),
                    );
                }
            });
            let log = captured.text();
            assert!(
                !log.contains('\u{1b}'),
                "{filter}: a raw escape byte:\n{log}"
            );
            for (j, level) in all.iter().enumerate() {
                let line = format!("line=\"{} line\\u{{1b}}[2J\\nforged\"", level_name(*level));
                assert_eq!(log.contains(&line), j >= i, "{filter}: {line}\n{log}");
            }
            // The outcome keeps every line as written, shown in the log or not.
            let (lines, dropped) = c.finish();
            assert_eq!(dropped, 0);
            assert_eq!(lines.len(), all.len());
            assert!(
                lines
                    .iter()
                    .all(|l| l.message.contains("\u{1b}[2J\nforged"))
            );
        }
    }

    /// A line cannot pass for the fields of the engine's line: the handler's name comes
    /// first, and the text is one quoted field whose quotes, backslashes and invisible
    /// characters are escaped.
    #[test]
    fn a_line_cannot_pass_for_the_lines_own_fields() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("jobhook::guest=info")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let mut c = collector(100, 100_000);
        tracing::subscriber::with_default(subscriber, || {
            c.record(
                Level::Info,
                "ok\" handler=\"other\" outcome=succeeded \\n \u{200b}".into(),
            );
        });
        let log = captured.text();
        assert!(
            log.contains(
                "handler=t line=\"ok\\\" handler=\\\"other\\\" outcome=succeeded \\\\n \\u{200b}\""
            ),
            "{log}"
        );
    }

    #[test]
    fn lines_past_the_budget_are_counted_not_kept() {
        let mut c = collector(2, 1000);
        for i in 0..5 {
            c.record(Level::Info, format!("line {i}"));
        }
        let (lines, dropped) = c.finish();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].message, "line 1");
        assert_eq!(dropped, 3);
    }

    #[test]
    fn bytes_are_bounded_and_long_lines_truncated() {
        let mut c = collector(100, MAX_LOG_LINE_BYTES + 100);
        c.record(Level::Warn, "x".repeat(MAX_LOG_LINE_BYTES * 3));
        c.record(Level::Warn, "y".repeat(200));
        let (lines, dropped) = c.finish();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].message.len() < MAX_LOG_LINE_BYTES + 20);
        assert_eq!(lines[0].level, "warn");
        assert_eq!(dropped, 1);
    }
}
