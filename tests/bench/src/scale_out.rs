//! Scenario g: scenario c on PostgreSQL — one node, then two nodes on one database — and what a
//! second node adds on a CPU-bound load.
//!
//! The database is a throwaway cluster the benchmark starts on the same machine
//! ([`jobhook_testkit::postgres`], from Debian's `postgresql` package as in the tests), with
//! PostgreSQL's default durability: every commit is flushed to disk before it is answered, as
//! on a production server.
//!
//! **Scale-out on one 2-core machine.** What a second node is for is a second machine's CPU. Here
//! each node is pinned to a core of its own (`taskset`), and the handler is CPU-bound
//! (`guest-bench-spin`: about 8 ms of arithmetic per delivery), so a node can deliver
//! about what its core can compute. A backlog is built, then deliveries finished per second are
//! counted in the database over a window with nothing arriving: one node on core 0, against two
//! nodes on cores 0 and 1. PostgreSQL and the driver are not pinned, so with one node they have
//! the second core to themselves and with two they take from both nodes: the ratio is a floor
//! for what a second machine adds. Rounds alternate one and two nodes; medians are compared.
//!
//! A virtual machine's two cores need not compute twice what one does (its neighbours, CPU
//! steal), so each round also measures the machine itself: plain arithmetic in one process
//! pinned to core 0, then in two at once pinned to cores 0 and 1 (`jobhook-bench cpu-spin`).
//! That ratio is the ceiling of the nodes' ratio in the same run.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use jobhook_dev::loadgen;
use jobhook_testkit::postgres::{PostgresServer, TestDatabase};

use crate::serve::{self, EngineSettings, HandlerDef, Server, Store, query};

/// Rate at which the backlog of a dispatch round is offered (events/s).
const BACKLOG_RATE: u32 = 1_000;

/// How long the backlog of a dispatch round is offered: with [`BACKLOG_RATE`], about twice what
/// two nodes finish in [`DISPATCH_WINDOW`] at ~8 ms of CPU each (each round prints what was
/// left, and says so when the backlog ran out).
const BACKLOG_SECONDS: f64 = 5.0;

/// How long deliveries are counted once the backlog is built.
const DISPATCH_WINDOW: Duration = Duration::from_secs(8);

/// The CPU-bound handler of the dispatch rounds.
fn spin_set() -> Vec<HandlerDef> {
    vec![HandlerDef {
        name: "spin".into(),
        package: "guest-bench-spin",
    }]
}

/// One dispatch round.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// Nodes that delivered.
    pub nodes: usize,
    /// Deliveries finished per second over the window, all nodes together.
    pub per_second: f64,
    /// Deliveries still pending at the end of the window (0: the backlog ran out, and
    /// `per_second` is a floor).
    pub backlog_left: u64,
    /// Median duration of the sandbox call (ms): what one delivery costs its core.
    pub call_ms: f64,
    /// Load average at the end of the window.
    pub load_average: String,
}

/// Everything scenario g measures.
#[derive(Debug)]
pub struct ScaleOut {
    /// Scenario c's ingest-only run on PostgreSQL, one node (the ingest baseline).
    pub bare: serve::LatencyRun,
    /// Scenario c's latency run on PostgreSQL, one node.
    pub one_node: serve::LatencyRun,
    /// The same with a second node on the same database (events sent to the first).
    pub two_nodes: serve::LatencyRun,
    /// Dispatch rounds, alternating one and two nodes.
    pub dispatch: Vec<Dispatch>,
    /// The machine's own two-core ÷ one-core ratio, once per round.
    pub machine: Vec<f64>,
}

/// Runs scenario g: latency runs of `seconds`, then `rounds` dispatch rounds of each node count.
pub async fn measure(seconds: f64, rounds: usize) -> anyhow::Result<ScaleOut> {
    let server = Arc::new(
        PostgresServer::start_durable()
            .map_err(|e| anyhow::anyhow!("PostgreSQL not available: {e}"))?,
    );
    let bare = latency_run(&server, "g-ingest-only", &serve::no_handlers(), 1, seconds).await?;
    let one_node = latency_run(&server, "g-latency", &serve::healthy_set(), 1, seconds).await?;
    let two_nodes =
        latency_run(&server, "g-latency-two", &serve::healthy_set(), 2, seconds).await?;
    let mut dispatch = Vec::new();
    let mut machine = Vec::new();
    for round in 0..rounds {
        eprintln!(
            "scenario g: the machine's own two cores ÷ one, round {}…",
            round + 1
        );
        machine.push(machine_scale()?);
        for nodes in [1, 2] {
            eprintln!(
                "scenario g: CPU-bound dispatch, {nodes} node(s) pinned, round {}…",
                round + 1
            );
            let db = database(&server)?;
            dispatch.push(
                dispatch_round(&db, &format!("g-spin-{round}"), nodes)
                    .await
                    .with_context(|| format!("dispatch round with {nodes} node(s)"))?,
            );
        }
    }
    Ok(ScaleOut {
        bare,
        one_node,
        two_nodes,
        dispatch,
        machine,
    })
}

/// Scenario c's latency run on a new database of `server` with `nodes` nodes.
async fn latency_run(
    server: &Arc<PostgresServer>,
    run: &str,
    handlers: &[HandlerDef],
    nodes: usize,
    seconds: f64,
) -> anyhow::Result<serve::LatencyRun> {
    eprintln!("scenario g: {run}, {nodes} node(s), 1,000 events/s ({seconds} s)…");
    let db = database(server)?;
    let settings = EngineSettings::default();
    serve::latency_run_on(
        run,
        handlers,
        settings,
        seconds,
        Store::Postgres(&db),
        nodes,
    )
    .await
    .with_context(|| format!("{run} on PostgreSQL"))
}

fn database(server: &Arc<PostgresServer>) -> anyhow::Result<TestDatabase> {
    server
        .create_database()
        .map_err(|e| anyhow::anyhow!("cannot create a database: {e}"))
}

/// Builds a backlog of CPU-bound deliveries through the first of `nodes` engines (node `i`
/// pinned to core `i`), then counts what they finish over [`DISPATCH_WINDOW`].
async fn dispatch_round(db: &TestDatabase, run: &str, nodes: usize) -> anyhow::Result<Dispatch> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let handlers = spin_set();
    let mut servers = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let server = Server::start_on(
            &serve::node_run(&format!("{run}-{nodes}"), i, nodes),
            &handlers,
            EngineSettings::default(),
            Store::Postgres(db),
        )?;
        server.pin_to_core(i % cores)?;
        servers.push(server);
    }
    let url = servers
        .first()
        .map(|s| s.url().to_owned())
        .context("no node started")?;
    loadgen::run(loadgen::LoadOptions {
        url,
        rate: BACKLOG_RATE,
        duration: Duration::from_secs_f64(BACKLOG_SECONDS),
        token: None,
        record: None,
        seed: 3,
        resend: false,
    })
    .await?;
    let (finished_before, _) = counts(db)?;
    let window = Instant::now();
    tokio::time::sleep(DISPATCH_WINDOW).await;
    let (finished_after, backlog_left) = counts(db)?;
    let elapsed = window.elapsed().as_secs_f64();
    let load_average = crate::machine::load_average();
    for server in servers {
        server.stop();
    }
    let call_ms = query(
        db,
        "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms), 0)
         FROM deliveries WHERE duration_ms IS NOT NULL",
    )?
    .trim()
    .parse::<f64>()
    .context("median call duration")?;
    Ok(Dispatch {
        nodes,
        per_second: finished_after.saturating_sub(finished_before) as f64 / elapsed,
        backlog_left,
        call_ms,
        load_average,
    })
}

/// Deliveries finished (any outcome) and pending, read from the database.
fn counts(db: &TestDatabase) -> anyhow::Result<(u64, u64)> {
    let text = query(
        db,
        "SELECT count(*) FILTER (WHERE state NOT IN ('pending', 'running')),
                count(*) FILTER (WHERE state = 'pending')
         FROM deliveries",
    )?;
    let (finished, pending) = text
        .trim()
        .split_once('|')
        .with_context(|| format!("unexpected count output {text:?}"))?;
    Ok((finished.parse()?, pending.parse()?))
}

/// Median of the dispatch rounds with `nodes` nodes (deliveries/s).
pub fn median_dispatch(rounds: &[Dispatch], nodes: usize) -> f64 {
    let figures: Vec<f64> = rounds
        .iter()
        .filter(|d| d.nodes == nodes)
        .map(|d| d.per_second)
        .collect();
    crate::stats::Summary::of(&figures).p50
}

/// How long each process of the machine baseline computes.
const MACHINE_SPIN: Duration = Duration::from_secs(3);

/// Rounds of arithmetic done in `duration` on this thread (the machine baseline's unit of work;
/// the same xorshift steps as `guest-bench-spin`).
pub fn spin_for(duration: Duration) -> u64 {
    let started = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rounds = 0u64;
    while started.elapsed() < duration {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x = std::hint::black_box(x);
        }
        rounds += 1;
    }
    std::hint::black_box(x);
    rounds
}

/// Arithmetic done by two processes pinned to cores 0 and 1 at once ÷ by one on core 0.
fn machine_scale() -> anyhow::Result<f64> {
    let one = spinners(&[0])?;
    let two = spinners(&[0, 1])?;
    Ok(crate::stats::ratio(two, one))
}

/// Starts one `jobhook-bench cpu-spin` per core in `cores`, each pinned to it, all at once;
/// returns the sum of what they counted.
fn spinners(cores: &[usize]) -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("cannot find jobhook-bench itself")?;
    let children = cores
        .iter()
        .map(|core| {
            Command::new("taskset")
                .arg("--cpu-list")
                .arg(core.to_string())
                .arg(&exe)
                .arg("cpu-spin")
                .arg("--millis")
                .arg(MACHINE_SPIN.as_millis().to_string())
                .stdout(Stdio::piped())
                .spawn()
                .context("cannot run taskset (util-linux)")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut total = 0.0;
    for child in children {
        let output = child.wait_with_output()?;
        anyhow::ensure!(
            output.status.success(),
            "cpu-spin failed: {}",
            output.status
        );
        total += String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse::<f64>()
            .context("cpu-spin printed no count")?;
    }
    Ok(total)
}

/// Median of the machine's two-core ÷ one-core ratios.
pub fn median_machine_scale(ratios: &[f64]) -> f64 {
    crate::stats::Summary::of(ratios).p50
}
