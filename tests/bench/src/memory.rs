//! Scenario f: host memory with 1,000 deliveries in flight, each waiting in the `keyfactor`
//! capability on a slow Keyfactor API (the stand-in's `_Test/Slow?ms=N`, run as a separate
//! `jobhook-dev standin` process so that its memory is not counted).
//!
//! Each side runs in a child process of its own (`jobhook-bench memory-child`), so that neither
//! inherits the other's heap:
//!
//! - **sandboxes**: `guest-bench-slow-call` loaded into an engine whose pool has room for all of
//!   them, then `SandboxedHandler::invoke` 1,000 times at once on a multi-threaded runtime;
//! - **baseline**: the same 1,000 requests to the same endpoint with the same HTTP client library
//!   (`reqwest`) and no sandbox — what waiting on 1,000 API calls costs anyway.
//!
//! Each child reports its resident set (`VmRSS`) before the calls and at its highest while they
//! wait, and checks that every call succeeded within twice the delay (so they really waited
//! together).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use jobhook::capabilities::Grants;
use jobhook::capabilities::Services;
use jobhook::capabilities::keyfactor::auth::{Auth, AuthConfig};
use jobhook::capabilities::keyfactor::{KeyfactorClient, KeyfactorConfig, KeyfactorGrant};
use jobhook::capabilities::properties::Properties;
use jobhook::secret::{Secret, SecretRef};
use jobhook::{Delivery, Engine, JobContext, LoadOptions, SandboxSpec, SandboxedHandler};
use serde::{Deserialize, Serialize};

/// Deliveries in flight at once (issue: 1,000).
pub const IN_FLIGHT: usize = 1_000;

/// How long the stand-in holds each request: long enough for all of them to be in flight
/// together, well inside the default handler budget (10 s) and Keyfactor call timeout (10 s).
pub const DELAY_MS: u64 = 3_000;

/// Pool slots beyond [`IN_FLIGHT`], for the warm-up call.
const POOL_SLACK: u32 = 8;

/// How often RSS is sampled while the calls wait.
const SAMPLE_PERIOD: Duration = Duration::from_millis(20);

/// What one child measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildReport {
    /// `sandbox` or `plain`.
    pub mode: String,
    /// RSS before the calls (engine, handler and client ready), KiB.
    pub idle_kib: u64,
    /// Highest RSS sampled while the calls were in flight, KiB.
    pub peak_kib: u64,
    /// Calls that succeeded.
    pub succeeded: usize,
    /// Wall time of all calls together, ms.
    pub elapsed_ms: f64,
}

/// What scenario f reports.
#[derive(Debug, Clone)]
pub struct Memory {
    /// The sandbox child.
    pub sandbox: ChildReport,
    /// The plain-HTTP child.
    pub plain: ChildReport,
    /// Load average while it ran.
    pub load_average: String,
}

impl ChildReport {
    /// Extra memory per call in flight, KiB.
    pub fn per_call_kib(&self) -> f64 {
        self.peak_kib.saturating_sub(self.idle_kib) as f64 / IN_FLIGHT as f64
    }
}

/// A `jobhook-dev standin` process on a free loopback port.
struct StandinProcess {
    child: Child,
    base_url: String,
}

impl StandinProcess {
    fn start() -> anyhow::Result<Self> {
        let port = jobhook_testkit::engine::free_port();
        let mut child = Command::new(crate::jobhook_dev_bin())
            .args(["standin", "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start `jobhook-dev standin`")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let base_url = lines
            .find_map(|l| {
                l.ok()?
                    .strip_prefix("Keyfactor API stand-in at ")
                    .map(str::to_owned)
            })
            .context("the stand-in did not start")?;
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(StandinProcess { child, base_url })
    }
}

impl Drop for StandinProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs both children against one stand-in.
pub fn measure() -> anyhow::Result<Memory> {
    let standin = StandinProcess::start()?;
    let plain = run_child("plain", &standin.base_url)?;
    let sandbox = run_child("sandbox", &standin.base_url)?;
    Ok(Memory {
        sandbox,
        plain,
        load_average: crate::machine::load_average(),
    })
}

fn run_child(mode: &str, base_url: &str) -> anyhow::Result<ChildReport> {
    let exe = std::env::current_exe()?;
    let output = Command::new(exe)
        .args(["memory-child", "--mode", mode, "--base-url", base_url])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run the memory child")?;
    anyhow::ensure!(
        output.status.success(),
        "the {mode} memory child failed ({})",
        output.status
    );
    let report: ChildReport = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("the {mode} memory child's report"))?;
    anyhow::ensure!(
        report.succeeded == IN_FLIGHT,
        "{mode}: only {} of {IN_FLIGHT} calls succeeded",
        report.succeeded
    );
    anyhow::ensure!(
        report.elapsed_ms < 2.0 * DELAY_MS as f64,
        "{mode}: the calls took {:.0} ms, so they were not all in flight together",
        report.elapsed_ms
    );
    Ok(report)
}

/// The child: `mode` is `sandbox` or `plain`. Prints its [`ChildReport`] as JSON.
pub fn child(mode: &str, base_url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        match mode {
            "sandbox" => sandboxes(base_url).await,
            "plain" => plain(base_url).await,
            other => anyhow::bail!("unknown mode {other:?}"),
        }
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Samples RSS until `done`, returning the highest value.
fn sample_peak(done: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !done.load(Ordering::Relaxed) {
            peak = peak.max(crate::machine::rss_kib().0);
            std::thread::sleep(SAMPLE_PERIOD);
        }
        peak
    })
}

async fn sandboxes(base_url: &str) -> anyhow::Result<ChildReport> {
    let engine = Engine::new(IN_FLIGHT as u32 + POOL_SLACK)?;
    let credentials = jobhook_testkit::standin::Credentials::default();
    let auth = Auth::basic(&credentials.username, &Secret::new(credentials.password))?;
    // `with_auth` uses `auth`; `config.auth` is only a placeholder (as in `jobhook run`).
    let config = KeyfactorConfig::new(
        base_url,
        AuthConfig::Bearer {
            token: SecretRef::Env(String::new()),
        },
    );
    let services = Services {
        keyfactor: Some(Arc::new(KeyfactorClient::with_auth(&config, auth)?)),
        ..Services::default()
    };
    let mut spec = SandboxSpec::new("bench-slow-call");
    spec.properties = Properties::new(BTreeMap::from([
        ("Path".to_owned(), "_Test/Slow".to_owned()),
        ("Query".to_owned(), format!("ms={DELAY_MS}")),
    ]));
    spec.grants = Grants {
        keyfactor: Some(KeyfactorGrant::read_only(&["_Test/"])?),
        ..Grants::default()
    };
    let handler = Arc::new(
        SandboxedHandler::load(
            &engine,
            &services,
            jobhook_testkit::guest_bytes("guest-bench-slow-call"),
            spec,
            &LoadOptions::default(),
        )
        .await?,
    );
    let context = Arc::new(JobContext::from_json_value(
        &jobhook_testkit::sample_context_json(),
    )?);
    // One call first: connection set-up, lazily initialised state, the component's first
    // instance.
    let warm = handler.invoke(&context, Delivery::default()).await;
    anyhow::ensure!(warm.kind.is_success(), "warm-up call: {}", warm.kind);

    let idle_kib = crate::machine::rss_kib().0;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak(Arc::clone(&done));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (handler, context) = (Arc::clone(&handler), Arc::clone(&context));
        tasks.spawn(async move { handler.invoke(&context, Delivery::default()).await });
    }
    let mut succeeded = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome {
            Ok(o) if o.kind.is_success() => succeeded += 1,
            Ok(o) => eprintln!("a delivery did not succeed: {}", o.kind),
            Err(e) => eprintln!("a delivery task failed: {e}"),
        }
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    done.store(true, Ordering::Relaxed);
    let peak_kib = sampler.join().unwrap_or(0);
    Ok(ChildReport {
        mode: "sandbox".into(),
        idle_kib,
        peak_kib,
        succeeded,
        elapsed_ms,
    })
}

async fn plain(base_url: &str) -> anyhow::Result<ChildReport> {
    let credentials = jobhook_testkit::standin::Credentials::default();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!(
        "{}/_Test/Slow?ms={DELAY_MS}",
        base_url.trim_end_matches('/')
    );
    let send = {
        let (client, url, credentials) = (client.clone(), url.clone(), credentials.clone());
        move || {
            client
                .get(&url)
                .basic_auth(&credentials.username, Some(&credentials.password))
                .header("x-keyfactor-requested-with", "APIClient")
                .send()
        }
    };
    let warm = send().await?;
    anyhow::ensure!(
        warm.status().is_success(),
        "warm-up call: {}",
        warm.status()
    );
    drop(warm);

    let idle_kib = crate::machine::rss_kib().0;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak(Arc::clone(&done));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let request = send();
        tasks.spawn(async move {
            match request.await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            }
        });
    }
    let mut succeeded = 0;
    while let Some(ok) = tasks.join_next().await {
        succeeded += usize::from(matches!(ok, Ok(true)));
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    done.store(true, Ordering::Relaxed);
    let peak_kib = sampler.join().unwrap_or(0);
    Ok(ChildReport {
        mode: "plain".into(),
        idle_kib,
        peak_kib,
        succeeded,
        elapsed_ms,
    })
}
