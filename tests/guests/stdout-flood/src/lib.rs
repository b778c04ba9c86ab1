//! Hostile guest: writes `bytes` bytes (property, default 10 MiB) to stdout and the same to
//! stderr, in 1,000-byte lines, then succeeds.
//!
//! Output past the budget is not an error: the engine must keep the first bytes of each stream,
//! count the rest as dropped, and record `succeeded` (wasmtime's own memory pipe would trap).

use std::io::Write;

use jobhook_sdk::{Context, Handler, Result, export_handler, properties};

const LINE: usize = 1000;

struct StdoutFlood;

impl Handler for StdoutFlood {
    fn run(_ctx: &Context) -> Result<()> {
        let bytes: usize = properties::parse_or("bytes", 10 << 20)?;
        let mut line = vec![b'o'; LINE];
        line[LINE - 1] = b'\n';
        let mut stdout = std::io::stdout().lock();
        let mut stderr = std::io::stderr().lock();
        let mut written = 0;
        while written < bytes {
            let n = LINE.min(bytes - written);
            stdout
                .write_all(&line[LINE - n..])
                .map_err(|e| format!("stdout: {e}"))?;
            stderr
                .write_all(&line[LINE - n..])
                .map_err(|e| format!("stderr: {e}"))?;
            written += n;
        }
        stdout.flush().map_err(|e| format!("stdout: {e}"))?;
        Ok(())
    }
}

export_handler!(StdoutFlood);
