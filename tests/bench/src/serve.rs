//! Scenarios c and d: `jobhook serve` (SQLite, release build) driven over loopback HTTP by the
//! load driver of `jobhook-dev load` (`jobhook_dev::loadgen`), with four handlers routed for every event.
//!
//! Each measurement starts a fresh engine process with a fresh data directory, so one phase's
//! backlog never slows the next:
//!
//! - a **latency run** offers a steady 1,000 events/s and records the ingest latency of every
//!   accepted event (request sent → `202` received) and, from the store afterwards, every
//!   delivery's latency (event committed → outcome recorded);
//! - a **throughput run** offers as much as the driver can send (it keeps at most
//!   [`loadgen::MAX_IN_FLIGHT`] requests in flight) and counts the `202`s per second; then it
//!   stops sending and counts deliveries finished per second while the backlog drains, which is
//!   what dispatch can sustain.
//!
//! The driver runs in this process on the same machine, so it competes with the engine for the
//! same cores — the figures are a floor for what the engine does with the machine to itself.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use jobhook_dev::loadgen::{self, LoadReport};
use jobhook_testkit::engine::{EngineProcess, free_port};
use jobhook_testkit::postgres::TestDatabase;

use crate::stats::Summary;

/// Deliveries counted by (handler, outcome class).
pub type OutcomeCounts = Vec<(String, String, u64)>;

/// Rate of the latency runs (issue: p99 ingest ≤ 5 ms at 1,000 events/s).
pub const LATENCY_RATE: u32 = 1_000;

/// Rate asked of the driver in a throughput run: far above what it can reach, so that it sends
/// as fast as its in-flight bound allows.
const UNBOUNDED_RATE: u32 = 1_000_000;

/// How often the engine's `/metrics` are read during a run.
const METRICS_PERIOD: Duration = Duration::from_millis(500);

/// Longest wait for the backlog of a latency run to drain before its deliveries are read.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);

/// How long deliveries are counted after a throughput run stops sending.
const DISPATCH_WINDOW: Duration = Duration::from_secs(10);

/// A handler of a run: its name and the guest package its component is built from.
#[derive(Debug, Clone)]
pub struct HandlerDef {
    /// Name in the configuration (healthy ones start with `healthy-`).
    pub name: String,
    /// Guest package (`log-context`, `guest-loop`, ...).
    pub package: &'static str,
}

/// Four copies of `log-context`, the minimal real handler (it logs all eleven context fields).
pub fn healthy_set() -> Vec<HandlerDef> {
    (1..=4)
        .map(|i| HandlerDef {
            name: format!("healthy-{i}"),
            package: "log-context",
        })
        .collect()
}

/// No handlers at all: every event is committed with no deliveries. The baseline of the ingest
/// latency — what ingest costs when nothing else competes for the machine.
pub fn no_handlers() -> Vec<HandlerDef> {
    Vec::new()
}

/// Two copies of `log-context` beside an infinite loop and a memory bomb, all with default
/// limits and quarantine.
pub fn hostile_set() -> Vec<HandlerDef> {
    vec![
        HandlerDef {
            name: "healthy-1".into(),
            package: "log-context",
        },
        HandlerDef {
            name: "healthy-2".into(),
            package: "log-context",
        },
        HandlerDef {
            name: "hostile-loop".into(),
            package: "guest-loop",
        },
        HandlerDef {
            name: "hostile-memory-bomb".into(),
            package: "guest-memory-bomb",
        },
    ]
}

/// Engine settings of a run beyond its handlers.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineSettings {
    /// `[engine] sandbox_threads`; `None` keeps the default (0: sandboxes on the API's threads).
    pub sandbox_threads: Option<usize>,
}

/// Where the engines of a run keep their queue.
#[derive(Debug, Clone, Copy)]
pub enum Store<'a> {
    /// SQLite in the engine's own data directory (the default configuration).
    Sqlite,
    /// A PostgreSQL database that every node of the run shares.
    Postgres(&'a TestDatabase),
}

/// Lease of a PostgreSQL node's claims in a run: the default (no node dies in a benchmark).
const POSTGRES_LEASE_MS: u64 = 60_000;

/// A running engine with its own data directory.
pub struct Server {
    process: EngineProcess,
    dir: PathBuf,
}

impl Server {
    /// Starts `jobhook serve` on a free loopback port with `handlers`, every one routed for
    /// every job type, on SQLite.
    pub fn start(
        run: &str,
        handlers: &[HandlerDef],
        settings: EngineSettings,
    ) -> anyhow::Result<Server> {
        Server::start_on(run, handlers, settings, Store::Sqlite)
    }

    /// Like [`Server::start`], with the queue in `store`.
    pub fn start_on(
        run: &str,
        handlers: &[HandlerDef],
        settings: EngineSettings,
        store: Store<'_>,
    ) -> anyhow::Result<Server> {
        let dir = crate::runs_dir().join(run);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let data_dir = dir.join("data");
        let store_section = match store {
            Store::Sqlite => format!("[store]\ndata_dir = '{}'\n", data_dir.display()),
            Store::Postgres(db) => {
                // The configuration reads the password from this file (`{ file = … }`).
                std::fs::write(dir.join("db-password"), &db.password)?;
                let data_dir = data_dir.to_str().context("run directory is not UTF-8")?;
                db.store_section(POSTGRES_LEASE_MS, data_dir)
            }
        };
        let config = dir.join("jobhook.toml");
        std::fs::write(
            &config,
            config_text(free_port(), &store_section, handlers, settings),
        )?;
        let bin = crate::jobhook_bin();
        anyhow::ensure!(
            bin.exists(),
            "{} does not exist: build it with `cargo build --profile bench-host -p jobhook` (scripts/bench.sh does) or set JOBHOOK_BIN",
            bin.display()
        );
        // As shipped: the default log filter. At `info` every handler's log line is formatted
        // for the engine's log as well (docs/PERFORMANCE.md measures what that costs).
        let process =
            EngineProcess::start_at_default_log_level(&bin, &config, &dir.join("engine.log"));
        Ok(Server { process, dir })
    }

    /// The engine's base URL.
    pub fn url(&self) -> &str {
        &self.process.url
    }

    /// Pins every thread of the engine, and every thread it starts later (threads inherit their
    /// creator's affinity), to CPU `core` (`taskset --all-tasks`).
    pub fn pin_to_core(&self, core: usize) -> anyhow::Result<()> {
        let status = std::process::Command::new("taskset")
            .args(["--all-tasks", "--cpu-list", "--pid"])
            .arg(core.to_string())
            .arg(self.process.pid().to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .context("cannot run taskset (util-linux)")?;
        anyhow::ensure!(status.success(), "taskset failed: {status}");
        Ok(())
    }

    /// The SQLite database of the run.
    pub fn database(&self) -> PathBuf {
        self.dir
            .join("data")
            .join(jobhook::queue::store::sqlite::DATABASE_FILE)
    }

    /// Stops the engine (SIGKILL: nothing in a benchmark run needs a graceful stop, and running
    /// hostile handlers would make a graceful one wait).
    pub fn stop(self) -> PathBuf {
        let database = self.database();
        self.process.kill();
        database
    }
}

/// The configuration of a run: loopback, the `[store]` section given, `handlers` for every job
/// type, everything else default.
pub fn config_text(
    port: u16,
    store_section: &str,
    handlers: &[HandlerDef],
    settings: EngineSettings,
) -> String {
    let mut text = format!("[server]\nlisten = \"127.0.0.1:{port}\"\n\n{store_section}");
    if let Some(threads) = settings.sandbox_threads {
        text.push_str(&format!("\n[engine]\nsandbox_threads = {threads}\n"));
    }
    for h in handlers {
        text.push_str(&format!(
            "\n[[handlers]]\nname = \"{}\"\ncomponent = '{}'\njob_types = [\"*\"]\n",
            h.name,
            jobhook_testkit::guest(h.package).display()
        ));
    }
    text
}

/// Processes that keep every core they can get busy (`yes > /dev/null`), for as long as this
/// lives: the engine and the driver then share the machine with something else, as on a real
/// server.
pub struct CpuHog(Vec<std::process::Child>);

impl CpuHog {
    /// Starts `processes` of them.
    pub fn start(processes: usize) -> anyhow::Result<CpuHog> {
        let mut hog = CpuHog(Vec::with_capacity(processes));
        for _ in 0..processes {
            let child = std::process::Command::new("yes")
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("cannot start `yes` for the CPU hog")?;
            hog.0.push(child);
        }
        Ok(hog)
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Delivery counts read from `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Deliveries finished (any outcome) since start.
    pub finished: u64,
    /// Deliveries waiting.
    pub pending: u64,
    /// Deliveries running.
    pub running: u64,
    /// Deliveries of the healthy handlers (`healthy-…`) finished since start.
    pub healthy_finished: u64,
}

/// Reads the engine's delivery counters.
pub async fn progress(client: &reqwest::Client, url: &str) -> anyhow::Result<Progress> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut p = Progress::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let value = value as u64;
        if name.starts_with("jobhook_deliveries_total{") {
            p.finished += value;
            if name.contains("handler=\"healthy-") {
                p.healthy_finished += value;
            }
        } else if name == "jobhook_deliveries_in_state{state=\"pending\"}" {
            p.pending = value;
        } else if name == "jobhook_deliveries_in_state{state=\"running\"}" {
            p.running = value;
        }
    }
    Ok(p)
}

/// What a latency run measured.
#[derive(Debug, Clone)]
pub struct LatencyRun {
    /// The driver's report (ingest latency, accepted/s).
    pub load: LoadReport,
    /// Deliveries finished per second while events were arriving.
    pub deliveries_per_second: f64,
    /// Seconds from the end of sending until nothing was pending or running.
    pub drain_seconds: f64,
    /// Whether the backlog drained within `DRAIN_LIMIT`.
    pub drained: bool,
    /// Latency (ms) from event commit to outcome recorded, healthy handlers' succeeded deliveries.
    pub healthy_latency_ms: Summary,
    /// Duration (ms) of the sandbox call alone, same deliveries.
    pub healthy_invoke_ms: Summary,
    /// Deliveries per (handler, outcome class), for the notes.
    pub outcomes: OutcomeCounts,
    /// Load average while it ran.
    pub load_average: String,
}

/// Offers [`LATENCY_RATE`] events/s for `seconds` to a fresh engine with `handlers` on SQLite.
pub async fn latency_run(
    run: &str,
    handlers: &[HandlerDef],
    settings: EngineSettings,
    seconds: f64,
) -> anyhow::Result<LatencyRun> {
    latency_run_on(run, handlers, settings, seconds, Store::Sqlite, 1).await
}

/// Offers [`LATENCY_RATE`] events/s for `seconds` to `nodes` fresh engines with `handlers`
/// sharing `store` (several nodes need PostgreSQL). Every event goes to the first node, as a
/// Keyfactor forwarder posts to one address; every node claims and delivers.
pub async fn latency_run_on(
    run: &str,
    handlers: &[HandlerDef],
    settings: EngineSettings,
    seconds: f64,
    store: Store<'_>,
    nodes: usize,
) -> anyhow::Result<LatencyRun> {
    let servers = (0..nodes.max(1))
        .map(|i| Server::start_on(&node_run(run, i, nodes), handlers, settings, store))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let urls: Vec<String> = servers.iter().map(|s| s.url().to_owned()).collect();
    let client = reqwest::Client::new();
    let before = cluster_progress(&client, &urls).await?;
    let started = Instant::now();
    let load = loadgen::run(loadgen::LoadOptions {
        url: urls.first().cloned().unwrap_or_default(),
        rate: LATENCY_RATE,
        duration: Duration::from_secs_f64(seconds),
        token: None,
        record: None,
        seed: 1,
        resend: false,
    })
    .await?;
    let load_average = crate::machine::load_average();
    let sent_for = started.elapsed();
    let after_load = cluster_progress(&client, &urls).await?;
    let deliveries_per_second =
        (after_load.finished - before.finished) as f64 / sent_for.as_secs_f64();
    let drain_start = Instant::now();
    let mut drained = false;
    // With hostile handlers beside the healthy ones, a quarantined handler's deliveries wait in
    // the store for its quarantine to end and never drain in a run: what is waited for is every
    // healthy handler's delivery of every accepted event.
    let healthy = handlers
        .iter()
        .filter(|h| h.name.starts_with("healthy-"))
        .count() as u64;
    let hostile = handlers.len() as u64 > healthy;
    let healthy_due = load.accepted.saturating_mul(healthy);
    while drain_start.elapsed() < DRAIN_LIMIT {
        let p = cluster_progress(&client, &urls).await?;
        let healthy_done =
            p.healthy_finished.saturating_sub(before.healthy_finished) >= healthy_due;
        if (p.pending == 0 && p.running == 0) || (hostile && healthy_done) {
            drained = true;
            break;
        }
        tokio::time::sleep(METRICS_PERIOD).await;
    }
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    let databases: Vec<PathBuf> = servers.into_iter().map(Server::stop).collect();
    let (healthy_latency_ms, healthy_invoke_ms, outcomes) = match (store, databases.first()) {
        (Store::Postgres(db), _) => read_postgres_deliveries(db)?,
        (Store::Sqlite, Some(database)) => read_deliveries(database)?,
        (Store::Sqlite, None) => anyhow::bail!("no engine was started"),
    };
    Ok(LatencyRun {
        load,
        deliveries_per_second,
        drain_seconds,
        drained,
        healthy_latency_ms,
        healthy_invoke_ms,
        outcomes,
        load_average,
    })
}

/// The run directory of node `i` of `nodes`: the run's own name when it is the only one.
pub fn node_run(run: &str, i: usize, nodes: usize) -> String {
    if nodes <= 1 {
        run.to_owned()
    } else {
        format!("{run}-node-{}", i + 1)
    }
}

/// The delivery counts of several nodes on one store: deliveries finished by any of them, and
/// the store's pending and running deliveries (every node reports the same store; the first is
/// read).
pub async fn cluster_progress(
    client: &reqwest::Client,
    urls: &[String],
) -> anyhow::Result<Progress> {
    let mut total = Progress::default();
    for (i, url) in urls.iter().enumerate() {
        let p = progress(client, url).await?;
        total.finished += p.finished;
        total.healthy_finished += p.healthy_finished;
        if i == 0 {
            total.pending = p.pending;
            total.running = p.running;
        }
    }
    Ok(total)
}

/// What a throughput run measured.
#[derive(Debug, Clone)]
pub struct ThroughputRun {
    /// The driver's report.
    pub load: LoadReport,
    /// Deliveries finished per second while events were arriving as fast as possible.
    pub deliveries_while_ingesting: f64,
    /// Deliveries finished per second after sending stopped, with a backlog waiting.
    pub dispatch_per_second: f64,
    /// Load average while it ran.
    pub load_average: String,
}

/// Offers events as fast as the driver can for `seconds`, then counts dispatch.
pub async fn throughput_run(
    run: &str,
    handlers: &[HandlerDef],
    seconds: f64,
) -> anyhow::Result<ThroughputRun> {
    let server = Server::start(run, handlers, EngineSettings::default())?;
    let client = reqwest::Client::new();
    let url = server.url().to_owned();
    let before = progress(&client, &url).await?;
    let started = Instant::now();
    let load = loadgen::run(loadgen::LoadOptions {
        url: url.clone(),
        rate: UNBOUNDED_RATE,
        duration: Duration::from_secs_f64(seconds),
        token: None,
        record: None,
        seed: 2,
        resend: false,
    })
    .await?;
    let load_average = crate::machine::load_average();
    let sent_for = started.elapsed();
    let at_end = progress(&client, &url).await?;
    let deliveries_while_ingesting =
        (at_end.finished - before.finished) as f64 / sent_for.as_secs_f64();
    let window_start = Instant::now();
    tokio::time::sleep(DISPATCH_WINDOW).await;
    let after = progress(&client, &url).await?;
    let dispatch_per_second =
        (after.finished - at_end.finished) as f64 / window_start.elapsed().as_secs_f64();
    if after.pending == 0 {
        eprintln!(
            "note: the backlog drained within the dispatch window; deliveries/s is a lower bound"
        );
    }
    server.stop();
    Ok(ThroughputRun {
        load,
        deliveries_while_ingesting,
        dispatch_per_second,
        load_average,
    })
}

/// Healthy deliveries' latency and call duration, and the outcome counts, from a run's store.
fn read_deliveries(database: &Path) -> anyhow::Result<(Summary, Summary, OutcomeCounts)> {
    let conn = rusqlite::Connection::open(database)
        .with_context(|| format!("cannot open {}", database.display()))?;
    let mut latency = Vec::new();
    let mut invoke = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT d.finished_at - e.received_at, d.duration_ms
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.handler LIKE 'healthy-%' AND d.state = 'succeeded'",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Option<f64>>(1)?))
    })?;
    for row in rows {
        let (ms, duration) = row?;
        latency.push(ms as f64);
        invoke.extend(duration);
    }
    let mut stmt = conn.prepare(
        "SELECT handler, COALESCE(outcome_class, state), COUNT(*) FROM deliveries
         GROUP BY 1, 2 ORDER BY 1, 2",
    )?;
    let outcomes = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .map(|r| r.map(|(h, c, n)| (h, c, u64::try_from(n).unwrap_or(0))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((Summary::of(&latency), Summary::of(&invoke), outcomes))
}

/// Runs `sql` in `db` with `psql`; answers its unaligned output (one row per line, columns
/// separated by `|`).
pub fn query(db: &TestDatabase, sql: &str) -> anyhow::Result<String> {
    db.query(sql).map_err(|e| anyhow::anyhow!("{e}"))
}

/// [`read_deliveries`] for a run on PostgreSQL: the same figures, read with `psql`.
fn read_postgres_deliveries(
    db: &TestDatabase,
) -> anyhow::Result<(Summary, Summary, OutcomeCounts)> {
    let query = |sql: &str| query(db, sql);
    let mut latency = Vec::new();
    let mut invoke = Vec::new();
    let rows = query(
        "SELECT (extract(epoch FROM d.finished_at - e.received_at) * 1000)::float8,
                d.duration_ms::float8
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.handler LIKE 'healthy-%' AND d.state = 'succeeded'",
    )?;
    for line in rows.lines() {
        let (ms, duration) = line.split_once('|').unwrap_or((line, ""));
        latency.push(
            ms.parse::<f64>()
                .with_context(|| format!("latency {ms:?}"))?,
        );
        invoke.extend(duration.parse::<f64>().ok());
    }
    let rows = query(
        "SELECT handler, COALESCE(outcome_class, state), count(*) FROM deliveries
         GROUP BY 1, 2 ORDER BY 1, 2",
    )?;
    let mut outcomes = OutcomeCounts::new();
    for line in rows.lines() {
        let mut fields = line.split('|');
        if let (Some(handler), Some(class), Some(n)) = (fields.next(), fields.next(), fields.next())
        {
            outcomes.push((handler.to_owned(), class.to_owned(), n.parse().unwrap_or(0)));
        }
    }
    Ok((Summary::of(&latency), Summary::of(&invoke), outcomes))
}
