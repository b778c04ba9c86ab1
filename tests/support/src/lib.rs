//! Test support shared by the workspace-level integration tests.
//!
//! Handlers used in tests are real components built from this repository's sources: the first
//! test that asks for one builds every guest crate (the examples and `tests/guests/*`) for
//! `wasm32-wasip2` in release mode, into `target/guests`. Cargo's own lock on that directory makes
//! concurrent test processes wait for one build instead of racing.

pub mod engine;
pub mod exactly_once;
pub mod memory;
pub mod postgres;
pub mod powerloss;
pub mod servicenow;
pub mod smtp;
pub mod tls;
pub mod tokens;
pub mod workflows;

/// The Keyfactor API stand-in (`tests/standin`), re-exported for tests.
pub use jobhook_standin as standin;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    // This crate lives at `<root>/tests/support`.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("../.."))
}

/// Where guest components are built.
pub fn guest_target_dir() -> PathBuf {
    workspace_root().join("target").join("guests")
}

/// The path of the component built from guest crate `package` (e.g. `log-context`,
/// `guest-trap`). Builds all guests on first use; panics with the build output if that fails.
pub fn guest(package: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_guests) {
        panic!("building the guest components failed:\n{e}");
    }
    let path = guest_target_dir()
        .join("wasm32-wasip2")
        .join("release")
        .join(format!("{}.wasm", package.replace('-', "_")));
    assert!(
        path.exists(),
        "no component was built for guest `{package}` at {}",
        path.display()
    );
    path
}

/// The bytes of guest `package`'s component.
pub fn guest_bytes(package: &str) -> Vec<u8> {
    let path = guest(package);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The package names of every guest crate: `examples/*` and `tests/guests/*`.
pub fn guest_packages() -> Vec<String> {
    let root = workspace_root();
    let mut names = Vec::new();
    for dir in [root.join("examples"), root.join("tests").join("guests")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let manifest = entry.path().join("Cargo.toml");
            let Ok(text) = std::fs::read_to_string(&manifest) else {
                continue;
            };
            let name = text.lines().find_map(|line| {
                let value = line.trim().strip_prefix("name")?.trim().strip_prefix('=')?;
                Some(value.trim().trim_matches('"').to_owned())
            });
            names.extend(name);
        }
    }
    names.sort();
    names
}

/// The cargo that runs the tests (or `cargo`), in the workspace root.
pub fn workspace_cargo() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace_root());
    command
}

fn build_guests() -> Result<(), String> {
    let mut command = workspace_cargo();
    command
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(guest_target_dir());
    for package in guest_packages() {
        command.args(["-p", &package]);
    }
    let output = command
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let hint = if stderr.contains("wasm32-wasip2") && stderr.contains("may not be installed") {
        "\nhint: run `rustup target add wasm32-wasip2`"
    } else {
        ""
    };
    Err(format!("{stderr}{hint}"))
}

/// The `jobhook-powerloss-fs` binary ([`powerloss`]), built on first use into a target
/// directory of its own (`target/powerloss-fs`): cargo gives a binary's path only to its own
/// crate's tests. Panics with the build output if the build fails.
pub fn powerloss_fs_binary() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let target = workspace_root().join("target").join("powerloss-fs");
        let output = workspace_cargo()
            .args(["build", "-p", "jobhook-powerloss-fs", "--target-dir"])
            .arg(&target)
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(target.join("debug").join("jobhook-powerloss-fs"))
    });
    match built {
        Ok(path) => path.clone(),
        Err(e) => panic!("building jobhook-powerloss-fs failed:\n{e}"),
    }
}

/// A sample context (the Keyfactor docs' inventory example) as JSON, for tests to adjust.
pub fn sample_context_json() -> serde_json::Value {
    serde_json::json!({
        "AgentId": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11",
        "Username": "KFTRAIN\\SVC_Orchestrator",
        "ClientMachine": "orchestrator.kftrain.lab",
        "JobResult": "Success",
        "JobId": "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01",
        "JobType": "WinCertInventory",
        "JobTypeId": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
        "OperationType": "Unknown",
        "CertificateId": null,
        "RequestTimestamp": "2023-05-03T23:18:48Z",
        "CurrentRetryCount": 0
    })
}

/// The value of one series in a Prometheus text page (`name{labels}` as written there), or
/// `None` when the page has no such series.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
