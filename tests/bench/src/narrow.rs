//! One idea for a cheaper sandbox, measured: a component whose import list is only what it uses.
//!
//! `guest-bench-noop` built for `wasm32-wasip2` imports 13 WASI interfaces (stdio, environment,
//! exit, the terminal interfaces) that Rust's std for that target links whether the handler uses
//! them or not; each is linked into every fresh instance. The same source built for
//! `wasm32-unknown-unknown` (whose std imports nothing) and made a component by `wit-component`
//! from the type information `wit-bindgen` embeds imports only `jobhook:handler/types`. Scenario a
//! runs both, interleaved, so the difference is what narrowing the imports saves.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context as _;

/// The guest crate measured both ways.
pub const PACKAGE: &str = "guest-bench-noop";

/// The target whose Rust std imports nothing.
const TARGET: &str = "wasm32-unknown-unknown";

/// The component built from [`PACKAGE`] for `TARGET` (built once per process).
pub fn noop_without_wasi() -> anyhow::Result<Vec<u8>> {
    static BUILT: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> anyhow::Result<Vec<u8>> {
    let target_dir = jobhook_testkit::guest_target_dir();
    crate::cargo_build_release(
        TARGET,
        PACKAGE,
        &[
            "-p".as_ref(),
            PACKAGE.as_ref(),
            "--target-dir".as_ref(),
            target_dir.as_os_str(),
        ],
    )?;
    let module: PathBuf = target_dir
        .join(TARGET)
        .join("release")
        .join(format!("{}.wasm", PACKAGE.replace('-', "_")));
    let bytes =
        std::fs::read(&module).with_context(|| format!("cannot read {}", module.display()))?;
    wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|encoder| encoder.validate(true).encode())
        .with_context(|| format!("cannot make a component of {}", module.display()))
}
