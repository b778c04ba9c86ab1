//! The engine's own log: which lines it shows, how they are written, and that none of them can
//! be forged.
//!
//! Lines go to stderr, one event per line. Every message and every field value is passed through
//! [`escape`] as the line is formatted, whoever logged it: a failure reason a handler wrote, the
//! body of an error answer from the Keyfactor API, a mail relay's reply, a database server's
//! message — text from outside the engine cannot end a line and forge the next one, or move an
//! operator's cursor, even where the code that logged it forgot to escape it.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
#[cfg(test)]
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::SubscriberBuilder;
use tracing_subscriber::fmt::format::{Format, Writer};

use crate::escape::escape;

/// The log filter of every command but `serve` (`jobhook run`, `inspect`, …) when `RUST_LOG` is
/// not set: the engine's errors only, so that the outcome a command prints is not repeated by
/// its log.
const COMMAND_LOG_FILTER: &str = "error";

/// The log filter of `jobhook serve` when `RUST_LOG` is not set: the engine's warnings and
/// errors — the lines docs/OPERATIONS.md tells an operator to look for (abandoned deliveries
/// requeued, a mail relay or the Keyfactor API refusing, a connection limit reached, a clock
/// step, threads the kernel would not schedule as asked) — and of the handlers' lines
/// (`jobhook::guest`) only their errors, as before: every line a handler logs is kept in its
/// deliveries' outcomes, and a handler that fails on every delivery does not fill the
/// operator's log.
pub const SERVE_LOG_FILTER: &str = "warn,jobhook::guest=error";

/// Lines the log of `jobhook serve` holds for its writer thread before it drops new ones: at the
/// ~100 bytes of a typical line some 10 MiB, several seconds of the busiest log measured
/// (~50,000 lines/s with every handler logging at `info`).
pub const LOG_BUFFERED_LINES: usize = 100_000;

/// Most bytes of `jobhook serve`'s log written in one system call: lines gathered while the
/// writer was busy go out together (its thread flushes whenever no line is waiting): the
/// busiest log measured, some 5 MB/s, in under a hundred calls a second.
const LOG_WRITE_BYTES: usize = 64 * 1024;

/// Logs go to stderr; `RUST_LOG` overrides [`COMMAND_LOG_FILTER`]. Each line is written as it is
/// logged: a command's log and its printed result stay in order.
pub fn init_tracing() {
    let (builder, refused) = subscriber(COMMAND_LOG_FILTER);
    let _ = builder.with_writer(std::io::stderr).try_init();
    // A command logs errors only (COMMAND_LOG_FILTER): said straight to stderr.
    warn_of(refused.as_deref());
}

/// Says on stderr why `RUST_LOG` is not what it looks like, whatever filter is in use: a filter
/// that shows nothing (`RUST_LOG=warning`) would hide a warning logged through it. A stderr
/// whose reader has gone loses the line, and changes nothing else.
fn warn_of(why: Option<&str>) {
    if let Some(why) = why {
        crate::app::output::print_err(&format!("warning: {why}"));
    }
}

/// Like [`init_tracing`], for `jobhook serve` (`RUST_LOG` overrides [`SERVE_LOG_FILTER`]):
/// lines go to a writer thread that writes whatever has gathered in one system call, so no
/// thread of the event path or of a sandbox ever waits for stderr (a slow pipe, a full disk
/// under the log file), and a busy log costs a fraction of a `write` per line. When
/// [`LOG_BUFFERED_LINES`] are waiting, new lines are dropped and counted
/// (`jobhook_log_lines_dropped_total` in `/metrics`) rather than blocking. Keep the guard until
/// the process ends: dropping it writes out what is still waiting.
pub fn init_serve_tracing() -> (
    crate::metrics::LogDrops,
    tracing_appender::non_blocking::WorkerGuard,
) {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFERED_LINES)
        .lossy(true)
        .thread_name("jobhook-log")
        .finish(std::io::BufWriter::with_capacity(
            LOG_WRITE_BYTES,
            std::io::stderr(),
        ));
    let drops = crate::metrics::LogDrops::new(writer.error_counter());
    let (builder, refused) = subscriber(SERVE_LOG_FILTER);
    let _ = builder.with_writer(writer).try_init();
    // Without this line a typo in RUST_LOG would silently hide what it asked for; said
    // straight to stderr, as the filter RUST_LOG asked for may show no warning.
    warn_of(refused.as_deref());
    (drops, guard)
}

/// The engine's fields formatter: each field as [`write_field`] writes it, a space between
/// those written (a field left out leaves no space behind).
struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = FieldWriter {
            writer,
            written: false,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes the fields of one line, remembering whether one was written and the first failure.
struct FieldWriter<'w> {
    writer: Writer<'w>,
    written: bool,
    result: fmt::Result,
}

impl Visit for FieldWriter<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        if self.written {
            self.result = self.writer.write_char(' ');
        }
        self.written = true;
        if self.result.is_ok() {
            self.result = write_field(&mut self.writer, field, value);
        }
    }
}

/// The engine's log filter (`RUST_LOG`, else `default_filter`) and format, before its writer is
/// chosen; with why `RUST_LOG` was not used, when it is set and cannot be read.
fn subscriber(
    default_filter: &str,
) -> (
    SubscriberBuilder<EscapedFields, Format, EnvFilter>,
    Option<String>,
) {
    let (filter, refused) = filter_from(std::env::var("RUST_LOG").ok(), default_filter);
    // Colour codes only for a terminal: a log file or pipe gets plain text, no escape bytes.
    let builder = formatted(filter).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    (builder, refused)
}

/// The filter `rust_log` (the variable's value, if set) asks for, else `default_filter`; with
/// why `rust_log` was not used when it is set and cannot be read, or why it is used but
/// likely not what was meant ([`stray_word`]).
fn filter_from(rust_log: Option<String>, default_filter: &str) -> (EnvFilter, Option<String>) {
    let Some(text) = rust_log.filter(|t| !t.trim().is_empty()) else {
        return (EnvFilter::new(default_filter), None);
    };
    match EnvFilter::try_new(&text) {
        Ok(filter) => {
            let stray = stray_word(&text).map(|word| {
                format!(
                    "RUST_LOG={}: \"{}\" is neither a level ({LEVEL_NAMES}) nor a target of \
                     jobhook's own lines ({ENGINE_TARGET}, {ENGINE_TARGET}::…); a bare word is read \
                     as a target, so it shows no line of jobhook's, not even errors: write a level, \
                     e.g. RUST_LOG=warn, or a target and its level, e.g. \
                     RUST_LOG=warn,{ENGINE_TARGET}=debug",
                    escape(&text),
                    escape(word)
                )
            });
            (filter, stray)
        }
        Err(e) => (
            EnvFilter::new(default_filter),
            Some(format!(
                "RUST_LOG={} cannot be read ({e}); the default log filter \"{default_filter}\" \
                 is used instead: write directives like \"info\" or \"info,jobhook=debug\"",
                escape(&text)
            )),
        ),
    }
}

/// The level names a `RUST_LOG` directive may be (any case; `0`–`5` too), as a warning lists
/// them.
const LEVEL_NAMES: &str = "off, error, warn, info, debug, trace";

/// The target every line of jobhook's own is logged under (its modules' paths and
/// `jobhook::guest`, the handlers' lines).
const ENGINE_TARGET: &str = "jobhook";

/// The first directive of `rust_log` that is a bare word (no `=`, no span filter) and neither a
/// level nor a target that could match one of jobhook's lines: `warning`, `verbose`, `all`.
/// `EnvFilter` reads such a word as a target at every level, which matches nothing of the
/// engine's: the log goes silent, errors included. A library's target (`wasmtime`) is such a
/// word too — it shows that library's lines and none of jobhook's, which is worth saying.
fn stray_word(rust_log: &str) -> Option<&str> {
    rust_log
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains('=') && !d.contains('['))
        .find(|word| {
            let level = word.parse::<tracing::level_filters::LevelFilter>().is_ok();
            // EnvFilter matches a target by prefix: `jobhook::queue` and `job` both match.
            let engine = word.starts_with(ENGINE_TARGET) || ENGINE_TARGET.starts_with(word);
            !level && !engine
        })
}

/// The engine's line format with `filter`.
fn formatted(filter: EnvFilter) -> SubscriberBuilder<EscapedFields, Format, EnvFilter> {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .fmt_fields(EscapedFields)
}

/// Writes one field of a line as the default format does — the message bare, any other field
/// as `name=value` — with the value [`escape`]d. Fields a `log` record carries about its origin
/// (`log.target`, `log.file`, …) are not passed here ([`FieldWriter`] leaves them out, as the
/// default format leaves them out): the line's target already says where it comes from.
fn write_field(writer: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
    let name = field.name();
    let text = format!("{value:?}");
    let text = escape(&text);
    if name == "message" {
        write!(writer, "{text}")
    } else {
        write!(writer, "{name}={text}")
    }
}

/// Builds [`MakeWriter`]s for tests: keeps what is written.
#[cfg(test)]
#[derive(Clone, Default)]
struct Kept(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Kept {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl<'a> MakeWriter<'a> for Kept {
    type Writer = Kept;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `RUST_LOG` that cannot be read is not used, and says so (escaped, one line) instead of
    /// silently hiding what it asked for; unset or blank, the default applies without a word.
    #[test]
    fn a_rust_log_that_cannot_be_read_is_named() {
        for unset in [None, Some(String::new()), Some("  ".to_owned())] {
            let (filter, refused) = filter_from(unset, "warn");
            assert!(refused.is_none());
            assert_eq!(filter.to_string(), "warn");
        }
        let (filter, refused) = filter_from(Some("info,jobhook=debug".into()), "warn");
        assert!(refused.is_none());
        assert!(filter.to_string().contains("jobhook=debug"), "{filter}");
        for bad in ["info,jobhook=bogus", "jobhook=[", "info\n,x=\u{1b}[31m"] {
            let (filter, refused) = filter_from(Some(bad.into()), "warn");
            assert_eq!(filter.to_string(), "warn", "{bad:?}");
            let why = refused.expect("refused");
            assert!(why.starts_with("RUST_LOG="), "{why}");
            assert!(
                why.contains("the default log filter \"warn\" is used"),
                "{why}"
            );
            assert!(!why.contains('\n') && !why.contains('\u{1b}'), "{why}");
        }
    }

    /// A bare word that is no level and matches none of jobhook's targets is named, with what to
    /// write instead; levels in any case, `0`–`5`, jobhook's targets and `target=level`
    /// directives are not.
    #[test]
    fn a_bare_word_that_shows_nothing_of_jobhooks_is_named() {
        for fine in [
            "warn",
            "WARN",
            "Info",
            "off",
            "trace",
            "3",
            "jobhook",
            "jobhook::queue",
            "info,jobhook=debug",
            "warn,wasmtime=info",
            "warn,[delivery]=debug",
        ] {
            assert_eq!(stray_word(fine), None, "{fine:?}");
            assert!(
                filter_from(Some(fine.into()), "warn").1.is_none(),
                "{fine:?}"
            );
        }
        for (text, word) in [
            ("warning", "warning"),
            ("verbose", "verbose"),
            ("info,all", "all"),
            ("wasmtime", "wasmtime"),
        ] {
            assert_eq!(stray_word(text), Some(word), "{text:?}");
            let (filter, why) = filter_from(Some(text.into()), "warn");
            // Used as written (the word may be a library's target); said, not refused.
            assert_ne!(filter.to_string(), "warn", "{text:?}");
            let why = why.expect("named");
            assert!(
                why.starts_with(&format!("RUST_LOG={text}: \"{word}\" is neither a level")),
                "{why}"
            );
            assert!(why.contains("e.g. RUST_LOG=warn"), "{why}");
        }
        let (_, why) = filter_from(Some("ver\u{1b}bose".into()), "warn");
        let why = why.expect("named");
        assert!(!why.contains('\u{1b}'), "{why}");
    }

    /// What the engine's format writes for the events `log` emits, at `filter`.
    fn lines(filter: &str, log: impl FnOnce()) -> String {
        let kept = Kept::default();
        let subscriber = formatted(EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(kept.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let bytes = kept.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8(bytes).expect("UTF-8")
    }

    /// A server's answer, a reason or a name with a line of its own, a terminal escape, a
    /// carriage return and a bidi override in it.
    const FORGED: &str =
        "refused\n2026-12-05T00:00:00Z ERROR jobhook: forged line\r\x1b[2J\u{202e}tail";

    #[test]
    fn text_from_outside_cannot_end_a_line_or_reach_the_terminal() {
        let text = lines("info", || {
            // The message, a field shown with Display, a field shown with Debug and a span's
            // field: each as code might log text it took from a remote server unescaped.
            let span = tracing::info_span!("delivery", handler = %FORGED);
            let _inside = span.enter();
            tracing::warn!(error = %FORGED, body = ?FORGED, "Keyfactor answered: {FORGED}");
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with('\n'), "{text:?}");
        let line = text.trim_end_matches('\n');
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() || c == '\u{202e}' || c == '\u{2028}'),
            "{line:?}"
        );
        let shown =
            "refused\\n2026-12-05T00:00:00Z ERROR jobhook: forged line\\r\\x1b[2J\\u{202e}tail";
        assert!(
            line.contains(&format!("Keyfactor answered: {shown}")),
            "{line}"
        );
        assert!(line.contains(&format!("error={shown}")), "{line}");
        assert!(line.contains(&format!("handler={shown}")), "{line}");
        // `?` already writes a string's controls visibly; escaping it again changes nothing.
        assert!(
            line.contains(r#"body="refused\n2026-12-05T00:00:00Z ERROR jobhook: forged line\r\u{1b}[2J\u{202e}tail""#),
            "{line}"
        );
    }

    #[test]
    fn plain_lines_look_as_the_default_format_writes_them() {
        let text = lines("info", || {
            tracing::info!(requeued = 3, relay = %"smtp.example:25", "abandoned deliveries requeued");
        });
        assert!(
            text.trim_end()
                .ends_with("abandoned deliveries requeued requeued=3 relay=smtp.example:25"),
            "{text}"
        );
    }

    /// The origin fields a `log` record carries (`log.target`, `log.file`, …) are left out, as
    /// the default format leaves them out: whatever they hold is not shown, and the rest of the
    /// line is.
    #[test]
    fn a_log_records_origin_fields_are_left_out() {
        let text = lines("info", || {
            tracing::warn!(
                log.target = FORGED,
                log.module_path = FORGED,
                log.file = FORGED,
                log.line = 7,
                logged = %"kept",
                "a bridged line"
            );
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains("log."), "{text}");
        assert!(!text.contains("forged"), "{text}");
        assert!(
            text.trim_end().ends_with("a bridged line logged=kept"),
            "{text}"
        );
    }

    #[test]
    fn serve_shows_the_engines_warnings_and_of_handlers_only_their_errors() {
        let text = lines(SERVE_LOG_FILTER, || {
            tracing::info!("an engine info line");
            tracing::warn!("an engine warning");
            tracing::error!("an engine error");
            tracing::warn!(target: "jobhook::guest", "a handler's warning");
            tracing::error!(target: "jobhook::guest", "a handler's error");
        });
        assert!(!text.contains("an engine info line"), "{text}");
        assert!(text.contains("an engine warning"), "{text}");
        assert!(text.contains("an engine error"), "{text}");
        assert!(!text.contains("a handler's warning"), "{text}");
        assert!(text.contains("a handler's error"), "{text}");
        let text = lines(COMMAND_LOG_FILTER, || {
            tracing::warn!("an engine warning");
            tracing::error!("an engine error");
        });
        assert!(!text.contains("an engine warning"), "{text}");
        assert!(text.contains("an engine error"), "{text}");
    }
}
