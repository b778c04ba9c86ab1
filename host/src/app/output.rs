//! What a command prints, and what becomes of it when nobody reads it any more.
//!
//! `print!` and `eprintln!` panic when the write fails — with `EPIPE` when the reader of the
//! stream has exited (`jobhook inspect x | head -1`, a log collector that died). A command's
//! output to a reader that has gone ends the command quietly ([`EXIT_STDOUT_CLOSED`]); a line
//! for stderr that cannot be written is lost, and the command ends as it would have.

use std::io::Write as _;

/// Exit code of a command whose output could not be written because the reader of stdout had
/// gone: what a shell reports for a process SIGPIPE ended, as most command-line tools end there.
pub const EXIT_STDOUT_CLOSED: u8 = 128 + 13;

/// The reader of stdout has gone: the command's output could not be written.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// `error` and its causes as one message, `outer: cause: …` as `{error:#}` writes it, leaving
/// out a cause whose text the message already holds: an error that quotes its cause in its own
/// text and also names it as its source would otherwise be read two or three times over.
pub fn error_text(error: &anyhow::Error) -> String {
    crate::error_chain::chain_text(error.as_ref())
}

/// Writes `text` to stdout. A reader that has gone is a [`StdoutClosed`] error (the command
/// line ends with [`EXIT_STDOUT_CLOSED`]), not a panic as with `print!`.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
    }
}

/// Writes a line to stderr, for an error or warning of a command. Unlike `eprintln!`, a stderr
/// whose reader has gone is no panic: the line is lost.
pub fn print_err(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error quoting its source in its own text, wrapped twice: each text once.
    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("environment variable X is not set")]
        struct Unset;
        #[derive(Debug, thiserror::Error)]
        #[error("[keyfactor.auth]: {0}")]
        struct Auth(#[from] Unset);
        let error = anyhow::Error::new(Auth(Unset)).context("jobhook.toml: capability services");
        assert_eq!(
            format!("{error:#}"),
            "jobhook.toml: capability services: [keyfactor.auth]: environment variable X is not \
             set: environment variable X is not set"
        );
        assert_eq!(
            error_text(&error),
            "jobhook.toml: capability services: [keyfactor.auth]: environment variable X is not set"
        );
        // Causes that say something new are all kept.
        let error = anyhow::anyhow!("no such file").context("cannot read h.wasm");
        assert_eq!(error_text(&error), "cannot read h.wasm: no such file");
    }
}
