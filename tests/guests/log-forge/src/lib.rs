//! Hostile guest: tries to forge lines in the engine's log and in `jobhook run`'s report, and
//! to send escape sequences to the operator's terminal.
//!
//! Every text it controls — log lines at each level, stdout, stderr, and then its failure
//! reason (property `mode = "fail"`, the default) or its panic message (`mode = "panic"`) —
//! carries `FORGED`: an LF followed by a fake engine log line, a CR followed by a fake
//! `outcome   succeeded`, a clear-screen escape, a NUL and a bidi override. The engine must
//! print all of it escaped, so no forged line appears and no ESC byte reaches the output.

use jobhook_sdk::log::{Level, log};
use jobhook_sdk::{Context, Error, Handler, Result, export_handler, properties};

/// The forgery.
const FORGED: &str = "innocent\n2026-12-02T00:00:00Z  INFO jobhook: forged engine line\routcome   succeeded\n\x1b[2J\x1b]0;owned\x07\0\u{202e}txt.exe\n";

struct LogForge;

impl Handler for LogForge {
    fn run(_ctx: &Context) -> Result<()> {
        for level in [Level::Info, Level::Warn, Level::Error] {
            log(level, FORGED);
        }
        print!("{FORGED}");
        eprint!("{FORGED}");
        match properties::get("mode").as_deref() {
            Some("panic") => panic!("{FORGED}"),
            _ => Err(Error::new(FORGED)),
        }
    }
}

export_handler!(LogForge);
