//! Hostile guest: looks for anything of the host it can reach through WASI — environment
//! variables, arguments, the working directory, stdin, files and directories (absolute,
//! relative and `..` paths), and tries to create a file.
//!
//! The engine links WASI with an empty context: no env, no args, no preopened directories, a
//! closed stdin. The guest logs each attempt and returns `err` listing whatever it did find, so
//! the engine must record `succeeded` (it found nothing).

use std::io::Read;

use jobhook_sdk::{Context, Handler, Result, export_handler, info};

const DIRS: &[&str] = &["/", ".", "..", "/etc", "/tmp", "/proc/self", "/work"];
const FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/hostname",
    "/proc/self/environ",
    "Cargo.toml",
    "../../../../etc/passwd",
    "/dev/urandom",
];

struct Snoop;

impl Handler for Snoop {
    fn run(_ctx: &Context) -> Result<()> {
        let mut found = Vec::new();

        let vars: Vec<_> = std::env::vars_os().collect();
        info!("env: {} variables", vars.len());
        if !vars.is_empty() {
            found.push(format!("env {vars:?}"));
        }
        for name in ["PATH", "HOME", "USER", "JOBHOOK_TOKEN"] {
            if let Some(value) = std::env::var_os(name) {
                found.push(format!("env {name}={value:?}"));
            }
        }
        let args: Vec<_> = std::env::args_os().collect();
        info!("args: {} arguments", args.len());
        if !args.is_empty() {
            found.push(format!("args {args:?}"));
        }
        // wasi-libc starts every program in a fictional "/" when the host names no working
        // directory; anything else came from the host.
        match std::env::current_dir() {
            Ok(dir) if dir.as_os_str() == "/" => info!("cwd: / (wasi-libc's default)"),
            Ok(dir) => found.push(format!("cwd {}", dir.display())),
            Err(e) => info!("cwd: {e}"),
        }

        let mut stdin = Vec::new();
        match std::io::stdin().read_to_end(&mut stdin) {
            Ok(0) => info!("stdin: empty"),
            Ok(n) => found.push(format!("stdin {n} bytes")),
            Err(e) => info!("stdin: {e}"),
        }

        for dir in DIRS {
            match std::fs::read_dir(dir) {
                Ok(entries) => found.push(format!("dir {dir} ({} entries)", entries.count())),
                Err(e) => info!("read_dir {dir}: {e}"),
            }
        }
        for file in FILES {
            match std::fs::read(file) {
                Ok(bytes) => found.push(format!("file {file} ({} bytes)", bytes.len())),
                Err(e) => info!("read {file}: {e}"),
            }
        }
        match std::fs::write("/tmp/jobhook-snoop", b"was here") {
            Ok(()) => found.push("created /tmp/jobhook-snoop".into()),
            Err(e) => info!("write /tmp/jobhook-snoop: {e}"),
        }

        if found.is_empty() {
            Ok(())
        } else {
            Err(format!("found: {}", found.join("; ")).into())
        }
    }
}

export_handler!(Snoop);
