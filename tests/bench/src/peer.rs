//! Scenario b: the peer. The logic of `guest-bench-noop` as an Extism plugin
//! (`tests/bench/extism-plugin`, built with `extism-pdk` for `wasm32-unknown-unknown`), run by
//! the `extism` crate (1.30.0, on its own wasmtime 43).
//!
//! The comparison is jobhook's fresh sandbox per delivery against Extism's *reused*
//! plugin instance — Extism's normal mode, where one instance serves call after call. Each call
//! serialises the context to JSON (the host's share of the work, as building the WIT record is
//! inside jobhook's figure) and calls `run_handler`, which decodes it and succeeds. Also timed:
//! `run_handler_raw` (input ignored: the cheapest Extism call) and a fresh Extism plugin per call
//! (`Plugin::new_from_compiled`, Extism's equivalent of jobhook's fresh sandbox).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::Context as _;
use extism::{CompiledPlugin, Manifest, Plugin, PluginBuilder, Wasm};
use jobhook::JobContext;

use crate::delivery::micros;

/// The plugin crate, relative to the workspace root.
const PLUGIN_CRATE: &str = "tests/bench/extism-plugin";

/// The target Extism plugins are built for.
const PLUGIN_TARGET: &str = "wasm32-unknown-unknown";

/// Builds the plugin (once per process) and returns the path of its `.wasm`.
pub fn plugin_path() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_plugin().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_plugin() -> anyhow::Result<PathBuf> {
    let root = crate::workspace_root();
    let target_dir = root.join("target").join("extism-plugin");
    let manifest = root.join(PLUGIN_CRATE).join("Cargo.toml");
    crate::cargo_build_release(
        PLUGIN_TARGET,
        "the Extism plugin",
        &[
            "--manifest-path".as_ref(),
            manifest.as_os_str(),
            "--target-dir".as_ref(),
            target_dir.as_os_str(),
        ],
    )?;
    Ok(target_dir
        .join(PLUGIN_TARGET)
        .join("release")
        .join("jobhook_bench_extism_plugin.wasm"))
}

/// The Extism side of scenario b.
pub struct ExtismPeer {
    compiled: CompiledPlugin,
    plugin: Plugin,
}

/// Which plugin function a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCall {
    /// `run_handler` on the reused instance (the baseline).
    Reused,
    /// `run_handler_raw` on the reused instance.
    ReusedRaw,
    /// `run_handler` on a fresh plugin instance.
    Fresh,
}

impl ExtismPeer {
    /// Compiles the plugin and creates the instance that is reused. No WASI, no host functions,
    /// no timeout, no memory limit: Extism's defaults, its fastest configuration.
    pub fn new() -> anyhow::Result<Self> {
        let wasm = std::fs::read(plugin_path()?).context("reading the Extism plugin")?;
        let manifest = Manifest::new([Wasm::data(wasm)]);
        let compiled = CompiledPlugin::new(PluginBuilder::new(manifest).with_wasi(false))?;
        let plugin = Plugin::new_from_compiled(&compiled)?;
        let mut peer = ExtismPeer { compiled, plugin };
        let context = JobContext::from_json_value(&jobhook_testkit::sample_context_json())?;
        for call in [PeerCall::Reused, PeerCall::ReusedRaw, PeerCall::Fresh] {
            peer.call(call, &context)
                .with_context(|| format!("the Extism plugin's {call:?} call failed"))?;
        }
        Ok(peer)
    }

    /// One call: the context serialised to JSON, then the plugin function.
    pub fn call(&mut self, call: PeerCall, context: &JobContext) -> anyhow::Result<()> {
        let input = serde_json::to_vec(&context.to_json())?;
        match call {
            PeerCall::Reused => self.plugin.call::<&[u8], ()>("run_handler", &input),
            PeerCall::ReusedRaw => self.plugin.call::<&[u8], ()>("run_handler_raw", &input),
            PeerCall::Fresh => {
                let mut plugin = Plugin::new_from_compiled(&self.compiled)?;
                plugin.call::<&[u8], ()>("run_handler", &input)
            }
        }
    }

    /// Times `calls` calls; returns the per-call times in microseconds and the failures.
    pub fn round(&mut self, call: PeerCall, context: &JobContext, calls: usize) -> (Vec<f64>, u64) {
        let mut times = Vec::with_capacity(calls);
        let mut failures = 0;
        for _ in 0..calls {
            let start = Instant::now();
            let ok = self.call(call, context).is_ok();
            times.push(micros(start.elapsed()));
            failures += u64::from(!ok);
        }
        (times, failures)
    }
}
