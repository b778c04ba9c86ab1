//! The engine flags of the one-shot commands (`jobhook run`, `jobhook inspect`): the sandbox
//! pool's caps, the compile time limit and the AOT cache, the same knobs `[engine]` gives `serve`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::runtime::engine::{Engine, PoolSettings};
use crate::runtime::loader::LoadOptions;

/// Sandboxes the one-shot commands need; a small pool keeps start-up cheap.
const CLI_MAX_CONCURRENT_SANDBOXES: u32 = 4;

/// The cache directory's name under the user's cache directory.
const CACHE_SUBDIR: &str = "jobhook";

/// Engine flags shared by `run` and `inspect`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Longest compilation of the component, in milliseconds (default: 60000).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    compile_timeout_ms: Option<u64>,
    /// Where compiled components are kept between runs (default: $XDG_CACHE_HOME/jobhook or
    /// ~/.cache/jobhook).
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Compile the component every time instead of using the AOT cache.
    #[arg(long)]
    no_cache: bool,
    /// Most core instances one component may contain (a Python handler has 14).
    #[arg(long, value_name = "N")]
    max_core_instances_per_component: Option<u32>,
    /// Most linear memories one component may define.
    #[arg(long, value_name = "N")]
    max_memories_per_component: Option<u32>,
    /// Most tables one component may define.
    #[arg(long, value_name = "N")]
    max_tables_per_component: Option<u32>,
    /// Core instances the sandbox pool reserves per concurrent delivery.
    #[arg(long, value_name = "N")]
    core_instances_per_delivery: Option<u32>,
    /// Linear memories the sandbox pool reserves per concurrent delivery.
    #[arg(long, value_name = "N")]
    memories_per_delivery: Option<u32>,
    /// Tables the sandbox pool reserves per concurrent delivery.
    #[arg(long, value_name = "N")]
    tables_per_delivery: Option<u32>,
}

impl EngineArgs {
    /// The load options these flags ask for.
    pub fn load_options(&self) -> LoadOptions {
        let mut options = LoadOptions::default();
        if let Some(ms) = self.compile_timeout_ms {
            options.compile_timeout = Duration::from_millis(ms);
        }
        options
    }

    /// The pool settings these flags ask for.
    pub fn pool(&self) -> PoolSettings {
        let mut pool = PoolSettings::default();
        let set = |slot: &mut u32, flag: Option<u32>| {
            if let Some(value) = flag {
                *slot = value;
            }
        };
        set(
            &mut pool.max_core_instances_per_component,
            self.max_core_instances_per_component,
        );
        set(
            &mut pool.max_memories_per_component,
            self.max_memories_per_component,
        );
        set(
            &mut pool.max_tables_per_component,
            self.max_tables_per_component,
        );
        set(
            &mut pool.core_instances_per_delivery,
            self.core_instances_per_delivery,
        );
        set(&mut pool.memories_per_delivery, self.memories_per_delivery);
        set(&mut pool.tables_per_delivery, self.tables_per_delivery);
        pool
    }

    /// The AOT cache directory these flags ask for, if any.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        self.cache_dir.clone().or_else(default_cache_dir)
    }

    /// An engine with these pool settings and (unless `--no-cache`) the AOT cache attached; a
    /// cache directory that cannot be used is reported on stderr and the engine compiles instead.
    pub fn engine(&self) -> anyhow::Result<Engine> {
        let pool = self.pool();
        pool.validate()
            .map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
        let engine = Engine::with_pool(CLI_MAX_CONCURRENT_SANDBOXES, &pool)?;
        Ok(match self.cache_dir() {
            Some(dir) => match crate::runtime::aot::AotCache::open(&dir, engine.wasmtime()) {
                Ok(cache) => engine.with_aot_cache(cache),
                Err(e) => {
                    crate::app::output::print_err(&format!(
                        "warning: compiling without the AOT cache: {e}"
                    ));
                    engine
                }
            },
            None => engine,
        })
    }
}

/// The flag of `run` and `inspect` for the `[engine]` setting `key`
/// (`compile_timeout_ms` → `--compile-timeout-ms`).
pub fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// `$XDG_CACHE_HOME/jobhook` when that is an absolute path, else `~/.cache/jobhook`; `None`
/// when neither is known (then nothing is cached).
fn default_cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|home| home.join(".cache"))
    })?;
    Some(base.join(CACHE_SUBDIR))
}
