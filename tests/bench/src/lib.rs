//! jobhook's benchmarks. Every figure is printed beside a baseline measured in the same
//! run on the same machine, and the ratio between them, so that figures taken on different or
//! busy machines can still be compared.
//!
//! | scenario | module | figure | baseline |
//! |---|---|---|---|
//! | a | [`delivery`] | fresh sandbox + `run-handler` via `SandboxedHandler::invoke` (pooling, `InstancePre`) | plain `Store` + instantiate on an on-demand engine |
//! | b | [`peer`] | the same jobhook delivery | the same logic as an Extism plugin, called on a reused instance |
//! | c | [`serve`] | events/s accepted by `jobhook serve`, deliveries/s, ingest latency at 1,000 events/s | (targets) |
//! | d | [`serve`] | (c) with half the handlers hostile | (c) |
//! | e | [`startup`] | start-up to ready with 20 handlers and a warm AOT cache | the same start with an empty cache |
//! | f | [`memory`] | host RSS with 1,000 deliveries waiting on a slow Keyfactor API | the same 1,000 requests made without sandboxes |
//! | g | [`scale_out`] | (c) on PostgreSQL with one node and two; deliveries/s of two nodes, each pinned to a core, CPU-bound handler | one node pinned to one core |
//!
//! `scripts/bench.sh` builds everything and runs the `jobhook-bench` binary, which runs every
//! scenario and prints (and writes) the table that `docs/PERFORMANCE.md` quotes.

pub mod delivery;
pub mod machine;
pub mod memory;
pub mod narrow;
pub mod peer;
pub mod report;
pub mod scale_out;
pub mod serve;
pub mod startup;
pub mod stats;
pub mod store_probe;
pub mod tuning;

use std::path::PathBuf;

/// The workspace root (this crate lives at `<root>/tests/bench`).
pub fn workspace_root() -> PathBuf {
    jobhook_testkit::workspace_root()
}

/// Runs `cargo build --release --target <target>` in the workspace (the test kit's
/// [`jobhook_testkit::workspace_cargo`]) with `args` (the crate and its target directory) to build
/// `what`; the error holds cargo's output and, when the target is not installed, how to add it.
pub fn cargo_build_release(
    target: &str,
    what: &str,
    args: &[&std::ffi::OsStr],
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let output = jobhook_testkit::workspace_cargo()
        .args(["build", "--release", "--target", target])
        .args(args)
        .output()
        .with_context(|| format!("cannot run cargo to build {what}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // As the test kit's guest build says it: cargo names the target "may not be installed".
        let hint = if stderr.contains(target) && stderr.contains("may not be installed") {
            format!("\nhint: run `rustup target add {target}`")
        } else {
            String::new()
        };
        anyhow::bail!("building {what} for {target} failed:\n{stderr}{hint}");
    }
    Ok(())
}

/// Where benchmark runs keep their data directories: on the same disk as the repository (not a
/// tmpfs), so that SQLite's fsyncs cost what they cost on a real installation.
pub fn runs_dir() -> PathBuf {
    workspace_root().join("target").join("bench-runs")
}

/// The `jobhook` binary the end-to-end scenarios run: `$JOBHOOK_BIN`, else the `jobhook` built
/// next to this benchmark binary (same target directory and profile — `scripts/bench.sh` builds
/// both with `--profile bench-host`).
pub fn jobhook_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("JOBHOOK_BIN") {
        return PathBuf::from(path);
    }
    sibling_bin("jobhook")
}

/// The `jobhook-dev` binary (the Keyfactor stand-in of the memory scenario): `$JOBHOOK_DEV_BIN`,
/// else the one built next to this benchmark binary, like [`jobhook_bin`].
pub fn jobhook_dev_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("JOBHOOK_DEV_BIN") {
        return PathBuf::from(path);
    }
    sibling_bin("jobhook-dev")
}

/// The binary `name` in this benchmark binary's target directory and profile.
fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            // Benches run from `<profile>/deps/`; the binaries are in `<profile>/`.
            let dir = exe.parent()?;
            let dir = if dir.ends_with("deps") {
                dir.parent()?
            } else {
                dir
            };
            Some(dir.join(name))
        })
        .unwrap_or_else(|| PathBuf::from(name))
}
