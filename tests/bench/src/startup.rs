//! Scenario e: start-up to ready — from starting `jobhook serve` to its "listening" line — with
//! 20 handlers, each a different component, so that every one is compiled on a cold start.
//!
//! **Cold**: the AOT cache directory is removed before the start, so every component is
//! validated, compiled and written to the cache. **Warm**: the cache is left from the previous
//! start, so every component is loaded from it (checked against its seal, then memory-mapped).
//! Starts alternate cold, warm, cold, warm, … and the medians are reported.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use jobhook_testkit::engine::{EngineProcess, free_port};

use crate::stats::Summary;

/// The 20 components: the four examples and sixteen guests of the hostile corpus, all distinct.
/// Start-up cost depends only on their size and number, not on what they do when called.
pub const COMPONENTS: [&str; 20] = [
    "log-context",
    "repeated-failure-email",
    "job-history-lookup",
    "webhook-notify",
    "guest-abort",
    "guest-attempt-probe",
    "guest-big-panic",
    "guest-busy-host-calls",
    "guest-counter",
    "guest-exit",
    "guest-handle-flood",
    "guest-http-flood",
    "guest-huge-alloc",
    "guest-huge-log",
    "guest-huge-reason",
    "guest-keyfactor-flood",
    "guest-log-flood",
    "guest-loop",
    "guest-mail-flood",
    "guest-memory-bomb",
];

/// Start-up times in milliseconds.
#[derive(Debug, Clone)]
pub struct Startup {
    /// Starts with an empty cache.
    pub cold_ms: Summary,
    /// Starts with the cache of the previous start.
    pub warm_ms: Summary,
    /// Total size of the 20 components, bytes.
    pub component_bytes: u64,
    /// Size of the cache after a start, bytes.
    pub cache_bytes: u64,
    /// Load average while it ran.
    pub load_average: String,
}

/// Measures `repetitions` cold and `repetitions` warm starts.
pub fn measure(repetitions: usize) -> anyhow::Result<Startup> {
    let dir = crate::runs_dir().join("startup");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("data");
    let cache = data.join("cache");
    let config = dir.join("jobhook.toml");
    let mut component_bytes = 0;
    // The services the grants below need; nothing is contacted at start.
    std::fs::write(dir.join("kf-token"), "start-up-benchmark")?;
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\n\n[store]\ndata_dir = '{}'\n\n\
         [keyfactor]\nbase_url = \"https://keyfactor.example.com/KeyfactorAPI\"\n\
         auth = {{ kind = \"bearer\", token = {{ file = \"kf-token\" }} }}\n\n\
         [mail]\nfrom = \"jobhook@example.com\"\n",
        free_port(),
        data.display()
    );
    for (i, package) in COMPONENTS.iter().enumerate() {
        let path = jobhook_testkit::guest(package);
        component_bytes += std::fs::metadata(&path)?.len();
        // Every capability granted, so that any component passes the load gate; nothing here
        // is ever called.
        text.push_str(&format!(
            "\n[[handlers]]\nname = \"h{i:02}-{package}\"\ncomponent = '{}'\njob_types = [\"*\"]\n\
             [handlers.grants.keyfactor]\npaths = [\"*\"]\n\
             [handlers.grants.mail]\nrecipients = [\"*\"]\n\
             [handlers.grants.http]\nurls = [\"https://hooks.example.com/\"]\n",
            path.display()
        ));
    }
    std::fs::write(&config, text)?;
    let bin = crate::jobhook_bin();
    anyhow::ensure!(bin.exists(), "{} does not exist", bin.display());

    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..repetitions {
        if cache.exists() {
            std::fs::remove_dir_all(&cache)?;
        }
        cold.push(start_once(&bin, &config, &dir)?);
        warm.push(start_once(&bin, &config, &dir)?);
    }
    Ok(Startup {
        cold_ms: Summary::of(&cold),
        warm_ms: Summary::of(&warm),
        component_bytes,
        cache_bytes: dir_size(&cache),
        load_average: crate::machine::load_average(),
    })
}

/// One start: milliseconds until the engine prints its listening line; then it is stopped.
fn start_once(bin: &Path, config: &Path, dir: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let engine = EngineProcess::start_at_default_log_level(bin, config, &dir.join("engine.log"));
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    engine
        .terminate(std::time::Duration::from_secs(10))
        .context("the engine did not stop on SIGTERM")?;
    Ok(ms)
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
