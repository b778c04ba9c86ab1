//! `jobhook-bench`: runs every benchmark scenario and prints one table of figures, each with its
//! same-run baseline and the ratio. `scripts/bench.sh` builds what it needs and runs it.
//!
//! ```text
//! jobhook-bench                 # everything (about five minutes on two cores)
//! jobhook-bench --quick         # shorter runs, for checking that it works
//! jobhook-bench --only a,b      # some scenarios
//! jobhook-bench pool-tuning     # the pool-setting comparison behind host/src/runtime/engine.rs
//! ```
//!
//! The table is printed on stdout and written, with the raw figures as JSON, to
//! `target/bench-runs/report.{md,json}` (or `--out DIR`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use jobhook_bench::delivery::{DeliveryRig, Samples, Variant, run_round};
use jobhook_bench::machine::{Machine, load_average};
use jobhook_bench::peer::{ExtismPeer, PeerCall};
use jobhook_bench::report::{Report, Row, num};
use jobhook_bench::stats::{Summary, latency_ratio, ratio};
use jobhook_bench::{memory, scale_out, serve, startup};

/// The performance targets.
mod target {
    /// a: median per-delivery overhead, µs.
    pub const DELIVERY_MEDIAN_US: f64 = 10.0;
    /// b: jobhook fresh instance ÷ Extism reused call.
    pub const PEER_RATIO: f64 = 1.0;
    /// c: accepted events per second.
    pub const ACCEPTED_PER_SECOND: f64 = 5_000.0;
    /// c: ingest p99 at 1,000 events/s with 4 handlers ÷ the same without handlers.
    pub const INGEST_P99_RATIO: f64 = 1.5;
    /// c: deliveries/s at 1,000 events/s ÷ offered (4 × accepted).
    pub const KEEP_UP_RATIO: f64 = 0.99;
    /// c: delivery latency (event committed → outcome recorded) at 1,000 events/s, p50, ms.
    pub const DELIVERY_P50_MS: f64 = 20.0;
    /// c: the same, p99, ms.
    pub const DELIVERY_P99_MS: f64 = 250.0;
    /// c: deliveries/s dispatch sustains with a backlog waiting.
    pub const DISPATCH_PER_SECOND: f64 = 20_000.0;
    /// d: ingest p99 with hostile handlers ÷ without.
    pub const HOSTILE_P99_RATIO: f64 = 1.5;
    /// d: healthy-delivery latency (p50 and p99) with hostile handlers ÷ without.
    pub const HOSTILE_LATENCY_RATIO: f64 = 1.5;
    /// g: deliveries/s of two nodes on one PostgreSQL database ÷ one node, CPU-bound handler,
    /// each node on a core of its own.
    pub const SCALE_OUT_RATIO: f64 = 1.7;
}

/// Handlers routed for every event in scenarios c and d.
const HANDLERS_PER_EVENT: f64 = 4.0;

/// Runs the benchmarks and prints figures with same-run baselines.
#[derive(Debug, Parser)]
#[command(name = "jobhook-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Shorter runs (fewer samples, 5-second load phases): for checking that everything works,
    /// not for quoting.
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (comma-separated letters a–g).
    #[arg(long, value_delimiter = ',')]
    only: Vec<char>,
    /// Where report.md and report.json are written.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only build what the benchmarks run (guest components, Extism plugin), then exit.
    #[arg(long)]
    prepare: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compare pooling-allocator reset settings on the per-delivery cost (the measurement
    /// behind the pool settings in host/src/runtime/engine.rs).
    PoolTuning {
        /// Rounds per variant (after one warm-up round).
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Calls per round and variant.
        #[arg(long, default_value_t = 500)]
        calls: usize,
    },
    /// Time the SQLite store alone: claim and finish one delivery after another on one thread,
    /// then scenario c's mix of ingest, claims and outcomes without HTTP or sandboxes.
    StoreProbe {
        /// Only the mixed workload.
        #[arg(long)]
        mixed: bool,
    },
    /// (internal) scenario g's machine baseline: counts rounds of arithmetic for a while on
    /// one thread and prints the count.
    #[command(hide = true)]
    CpuSpin {
        #[arg(long)]
        millis: u64,
    },
    /// (internal) one side of scenario f, in a process of its own.
    #[command(hide = true)]
    MemoryChild {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        base_url: String,
    },
}

/// How long and how often things are measured.
struct Plan {
    rounds: usize,
    calls_per_round: usize,
    load_seconds: f64,
    startup_repetitions: usize,
    scale_out_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 5,
                calls_per_round: 200,
                load_seconds: 5.0,
                startup_repetitions: 1,
                scale_out_rounds: 1,
            }
        } else {
            Plan {
                rounds: 30,
                calls_per_round: 300,
                load_seconds: 20.0,
                startup_repetitions: 3,
                scale_out_rounds: 3,
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match &cli.command {
        Some(Command::MemoryChild { mode, base_url }) => Some(memory::child(mode, base_url)),
        Some(Command::CpuSpin { millis }) => {
            println!(
                "{}",
                scale_out::spin_for(std::time::Duration::from_millis(*millis))
            );
            Some(Ok(()))
        }
        Some(Command::StoreProbe { mixed: true }) => Some(jobhook_bench::store_probe::mixed()),
        Some(Command::StoreProbe { mixed: false }) => Some(jobhook_bench::store_probe::run()),
        Some(Command::PoolTuning { rounds, calls }) => {
            Some(jobhook_bench::tuning::run(*rounds, *calls))
        }
        None => None,
    };
    if let Some(result) = command {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.prepare {
        return match prepare() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the guest components (the noop also without WASI imports) and the Extism plugin.
fn prepare() -> anyhow::Result<()> {
    eprintln!("building the guest components and the Extism plugin…");
    let _ = jobhook_testkit::guest("guest-bench-noop");
    let _ = jobhook_testkit::guest("guest-bench-spin");
    jobhook_bench::narrow::noop_without_wasi()?;
    jobhook_bench::peer::plugin_path()?;
    Ok(())
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let plan = Plan::new(cli.quick);
    let wanted = |s: char| cli.only.is_empty() || cli.only.contains(&s);
    let mut report = Report {
        machine: Machine::describe(),
        started: chrono_now(),
        load_at_start: load_average(),
        load_at_end: String::new(),
        rows: Vec::new(),
        skipped: Vec::new(),
        notes: Vec::new(),
    };
    if cli.quick {
        report
            .notes
            .push("--quick run: short phases and few samples; not for quoting".into());
    }
    if ['c', 'd', 'e', 'g'].into_iter().any(wanted) {
        report.notes.push(
            "c, d, e, g: every engine runs as shipped, at its default log filter (errors only; handlers' log lines go to their outcomes)".into(),
        );
    }
    eprintln!("building the guest components (first use)…");
    let _ = jobhook_testkit::guest("guest-bench-noop");

    if wanted('a') || wanted('b') {
        eprintln!("scenarios a/b: per-delivery overhead and the Extism peer…");
        if let Err(e) = deliveries(&plan, wanted('b'), &mut report) {
            report.skipped.push(("a/b".into(), format!("{e:#}")));
        }
    }
    if wanted('e') {
        eprintln!("scenario e: start-up with 20 handlers, cold and with the AOT cache…");
        match startup::measure(plan.startup_repetitions) {
            Ok(s) => startup_rows(&s, &mut report),
            Err(e) => report.skipped.push(("e".into(), format!("{e:#}"))),
        }
    }
    if wanted('f') {
        eprintln!("scenario f: memory with 1,000 deliveries in flight…");
        match memory::measure() {
            Ok(m) => memory_rows(&m, &mut report),
            Err(e) => report.skipped.push(("f".into(), format!("{e:#}"))),
        }
    }
    if wanted('c') || wanted('d') {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        if let Err(e) = runtime.block_on(end_to_end(&plan, wanted('d'), &mut report)) {
            report.skipped.push(("c/d".into(), format!("{e:#}")));
        }
    }
    if wanted('g') {
        eprintln!("scenario g: scenario c on PostgreSQL, one node and two…");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        match runtime.block_on(scale_out::measure(plan.load_seconds, plan.scale_out_rounds)) {
            Ok(g) => scale_out_rows(&g, &mut report),
            Err(e) => report.skipped.push(("g".into(), format!("{e:#}"))),
        }
    }
    report.load_at_end = load_average();

    let markdown = report.markdown();
    println!("{markdown}");
    let out = cli.out.clone().unwrap_or_else(jobhook_bench::runs_dir);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.md"), &markdown)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!("written to {}", out.join("report.md").display());
    Ok(())
}

fn chrono_now() -> String {
    // RFC 3339 without a date crate: `date` is on every machine this runs on.
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The medians of instantiate / call / drop times, as one figure.
fn phases(times: &[Vec<f64>; 3]) -> String {
    let [instantiate, call, drop_store] = times.each_ref().map(|t| Summary::of(t).p50);
    format!(
        "{} / {} / {} µs",
        num(instantiate),
        num(call),
        num(drop_store)
    )
}

fn us(s: &Summary) -> String {
    format!("{} µs (p99 {} µs)", num(s.p50), num(s.p99))
}

/// Scenarios a and b: all variants interleaved round by round.
fn deliveries(plan: &Plan, with_peer: bool, report: &mut Report) -> anyhow::Result<()> {
    let rig = DeliveryRig::new()?;
    let mut peer = if with_peer {
        match ExtismPeer::new() {
            Ok(p) => Some(p),
            Err(e) => {
                report.skipped.push(("b".into(), format!("{e:#}")));
                None
            }
        }
    } else {
        None
    };
    let variants = [
        Variant::Jobhook,
        Variant::Baseline,
        Variant::Floor,
        Variant::LogContext,
        Variant::OnThreads,
        Variant::FloorPhases,
        Variant::Narrow,
        Variant::NarrowPhases,
    ];
    let peer_calls = [PeerCall::Reused, PeerCall::ReusedRaw, PeerCall::Fresh];
    let mut samples = Samples::default();
    let mut peer_samples: [Vec<f64>; 3] = Default::default();
    let mut peer_failures = 0;
    for round in 0..=plan.rounds {
        let warm_up = round == 0;
        for v in variants {
            run_round(&rig, v, plan.calls_per_round, &mut samples, warm_up);
        }
        if let Some(peer) = peer.as_mut() {
            for (i, call) in peer_calls.iter().enumerate() {
                let (times, failures) = peer.round(*call, &rig.context, plan.calls_per_round);
                if !warm_up && let Some(slot) = peer_samples.get_mut(i) {
                    slot.extend(times);
                    peer_failures += failures;
                }
            }
        }
    }
    anyhow::ensure!(
        samples.failures == 0 && peer_failures == 0,
        "{} jobhook and {peer_failures} Extism calls failed during measurement",
        samples.failures
    );
    let load = load_average();
    let jobhook = Summary::of(&samples.jobhook);
    let baseline = Summary::of(&samples.baseline);
    let floor = Summary::of(&samples.floor);
    let log_context = Summary::of(&samples.log_context);
    let on_threads = Summary::of(&samples.on_threads);
    let narrow = Summary::of(&samples.narrow);
    report.rows.push(
        Row::new(
            "a",
            "per-delivery overhead: fresh sandbox + run-handler (`SandboxedHandler::invoke`, noop handler), median",
            us(&jobhook),
        )
        .against(
            format!("on-demand engine, plain Store + instantiate: {}", us(&baseline)),
            ratio(jobhook.p50, baseline.p50),
        )
        .target(
            format!("≤ {} µs", target::DELIVERY_MEDIAN_US),
            jobhook.p50 <= target::DELIVERY_MEDIAN_US,
        )
        .load(load.clone()),
    );
    report.rows.push(
        Row::new(
            "a",
            "of which wasmtime alone: pooled engine, InstancePre, empty Store, same guest",
            us(&floor),
        )
        .against(
            format!("jobhook: {} µs", num(jobhook.p50)),
            ratio(floor.p50, jobhook.p50),
        )
        .load(load.clone()),
    );
    report.rows.push(
        Row::new(
            "a",
            "wasmtime alone, by phase: new Store + instantiate / run-handler call / drop (slot reset), medians",
            phases(&samples.floor_phases),
        )
        .load(load.clone()),
    );
    report.rows.push(
        Row::new(
            "a",
            "`SandboxedHandler::invoke` of the same noop built without WASI imports (`wasm32-unknown-unknown` + wit-component: imports only jobhook types)",
            us(&narrow),
        )
        .against(
            format!("noop for wasm32-wasip2 (13 WASI imports): {} µs", num(jobhook.p50)),
            ratio(narrow.p50, jobhook.p50),
        )
        .load(load.clone()),
    );
    report.rows.push(
        Row::new(
            "a",
            "wasmtime alone without WASI imports, by phase: new Store + instantiate / run-handler call / drop, medians",
            phases(&samples.narrow_phases),
        )
        .load(load.clone()),
    );
    report.rows.push(
        Row::new(
            "a",
            "`SandboxedHandler::invoke` of log-context (11 log lines through the log capability)",
            us(&log_context),
        )
        .against(
            format!("noop: {} µs", num(jobhook.p50)),
            ratio(log_context.p50, jobhook.p50),
        )
        .load(load.clone()),
    );
    report.rows.push(
        Row::new(
            "a",
            "`SandboxedHandler::invoke` on the engine's own sandbox threads (opt-in `[engine] sandbox_threads`)",
            us(&on_threads),
        )
        .against(
            format!("in the caller's runtime: {} µs", num(jobhook.p50)),
            ratio(on_threads.p50, jobhook.p50),
        )
        .load(load.clone()),
    );
    if peer.is_some() {
        let [reused, raw, fresh] = peer_samples.map(|s| Summary::of(&s));
        report.rows.push(
            Row::new(
                "b",
                "jobhook fresh sandbox ÷ Extism reused plugin call (`run_handler`: JSON context decoded)",
                format!("jobhook {} µs", num(jobhook.p50)),
            )
            .against(format!("Extism reused: {}", us(&reused)), ratio(jobhook.p50, reused.p50))
            .target(
                format!("≤ {}", target::PEER_RATIO),
                ratio(jobhook.p50, reused.p50) <= target::PEER_RATIO,
            )
            .load(load.clone()),
        );
        report.rows.push(
            Row::new(
                "b",
                "jobhook fresh sandbox of the noop without WASI imports ÷ Extism reused plugin call",
                format!("jobhook {} µs", num(narrow.p50)),
            )
            .against(format!("Extism reused: {}", us(&reused)), ratio(narrow.p50, reused.p50))
            .load(load.clone()),
        );
        report.rows.push(
            Row::new(
                "b",
                "jobhook fresh sandbox ÷ Extism reused call that ignores its input (`run_handler_raw`)",
                format!("jobhook {} µs", num(jobhook.p50)),
            )
            .against(format!("Extism reused, raw: {}", us(&raw)), ratio(jobhook.p50, raw.p50))
            .load(load.clone()),
        );
        report.rows.push(
            Row::new(
                "b",
                "jobhook fresh sandbox ÷ Extism fresh plugin per call (`Plugin::new_from_compiled`)",
                format!("jobhook {} µs", num(jobhook.p50)),
            )
            .against(format!("Extism fresh: {}", us(&fresh)), ratio(jobhook.p50, fresh.p50))
            .load(load),
        );
    }
    report.notes.push(format!(
        "a/b: {} rounds × {} calls per variant, interleaved; per-call times; first round discarded as warm-up",
        plan.rounds, plan.calls_per_round
    ));
    Ok(())
}

fn startup_rows(s: &startup::Startup, report: &mut Report) {
    report.rows.push(
        Row::new(
            "e",
            "start-up to ready, 20 handlers, empty AOT cache (compile + write), median",
            format!("{} ms", num(s.cold_ms.p50)),
        )
        .load(s.load_average.clone()),
    );
    report.rows.push(
        Row::new(
            "e",
            "start-up to ready, 20 handlers, warm AOT cache (checked, then mapped), median",
            format!("{} ms", num(s.warm_ms.p50)),
        )
        .against(
            format!("cold: {} ms", num(s.cold_ms.p50)),
            ratio(s.warm_ms.p50, s.cold_ms.p50),
        )
        .load(s.load_average.clone()),
    );
    report.notes.push(format!(
        "e: {} cold and {} warm starts; 20 components of {:.1} MiB in all; cache {:.1} MiB",
        s.cold_ms.n,
        s.warm_ms.n,
        s.component_bytes as f64 / 1048576.0,
        s.cache_bytes as f64 / 1048576.0
    ));
}

fn memory_rows(m: &memory::Memory, report: &mut Report) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    report.rows.push(
        Row::new(
            "f",
            "host RSS with 1,000 deliveries in flight on a slow Keyfactor API (peak; idle before)",
            format!(
                "{} MiB ({} MiB idle)",
                num(mib(m.sandbox.peak_kib)),
                num(mib(m.sandbox.idle_kib))
            ),
        )
        .against(
            format!(
                "same 1,000 requests without sandboxes: {} MiB ({} MiB idle)",
                num(mib(m.plain.peak_kib)),
                num(mib(m.plain.idle_kib))
            ),
            ratio(m.sandbox.peak_kib as f64, m.plain.peak_kib as f64),
        )
        .load(m.load_average.clone()),
    );
    report.rows.push(
        Row::new(
            "f",
            "memory per delivery in flight ((peak − idle) ÷ 1,000)",
            format!("{} KiB", num(m.sandbox.per_call_kib())),
        )
        .against(
            format!("per plain request: {} KiB", num(m.plain.per_call_kib())),
            ratio(m.sandbox.per_call_kib(), m.plain.per_call_kib()),
        )
        .load(m.load_average.clone()),
    );
    report.notes.push(format!(
        "f: each call waited {} ms at the stand-in; all 1,000 finished in {:.0} ms (sandboxes) and {:.0} ms (plain)",
        memory::DELAY_MS,
        m.sandbox.elapsed_ms,
        m.plain.elapsed_ms
    ));
}

/// Scenario c's steady runs at 1,000 events/s — without handlers (the baseline), then with the
/// four healthy ones — and their rows; with `hog`, as many `yes > /dev/null` processes run beside
/// the engine the whole time (a machine something else is busy on).
async fn steady_rows(
    seconds: f64,
    hog: Option<usize>,
    report: &mut Report,
) -> anyhow::Result<serve::LatencyRun> {
    let defaults = serve::EngineSettings::default();
    let (scenario, suffix, tag) = match hog {
        None => ("c", String::new(), ""),
        Some(n) => ("c+hog", format!(", beside a CPU hog (`yes` × {n})"), "-hog"),
    };
    let _hog = hog.map(serve::CpuHog::start).transpose()?;
    eprintln!("scenario {scenario}: latency run at 1,000 events/s without handlers ({seconds} s)…");
    let bare = serve::latency_run(
        &format!("ingest-only{tag}"),
        &serve::no_handlers(),
        defaults,
        seconds,
    )
    .await
    .context("ingest-only latency run")?;
    eprintln!("scenario {scenario}: latency run at 1,000 events/s ({seconds} s)…");
    let healthy = serve::latency_run(
        &format!("latency{tag}"),
        &serve::healthy_set(),
        defaults,
        seconds,
    )
    .await
    .context("latency run")?;
    latency_rows(scenario, &suffix, &bare, &healthy, report);
    Ok(healthy)
}

/// The rows of a latency run at 1,000 events/s (`healthy`) against the ingest-only run of the
/// same configuration (`bare`): ingest latency, deliveries keeping up, delivery latency.
fn latency_rows(
    scenario: &'static str,
    suffix: &str,
    bare: &serve::LatencyRun,
    healthy: &serve::LatencyRun,
    report: &mut Report,
) {
    let l = &healthy.load;
    let ingest_ratio = ratio(l.latency_ms.p99, bare.load.latency_ms.p99);
    report.rows.push(
        Row::new(
            scenario,
            format!("ingest latency at 1,000 events/s, p50 / p99{suffix}"),
            format!("{} / {} ms", num(l.latency_ms.p50), num(l.latency_ms.p99)),
        )
        .against(
            format!(
                "no handlers (ingest alone): {} / {} ms",
                num(bare.load.latency_ms.p50),
                num(bare.load.latency_ms.p99)
            ),
            ingest_ratio,
        )
        .target(
            format!("p99 ratio ≤ {}", target::INGEST_P99_RATIO),
            ingest_ratio <= target::INGEST_P99_RATIO,
        )
        .load(healthy.load_average.clone()),
    );
    let offered = HANDLERS_PER_EVENT * l.accepted_per_second;
    let keep_up = ratio(healthy.deliveries_per_second, offered);
    report.rows.push(
        Row::new(
            scenario,
            format!("deliveries/s at 1,000 events/s{suffix}"),
            format!("{} /s", num(healthy.deliveries_per_second)),
        )
        .against(
            format!(
                "offered: 4 × {} = {} /s",
                num(l.accepted_per_second),
                num(offered)
            ),
            keep_up,
        )
        .target(
            format!("ratio ≥ {}", target::KEEP_UP_RATIO),
            keep_up >= target::KEEP_UP_RATIO,
        )
        .load(healthy.load_average.clone()),
    );
    let d = &healthy.healthy_latency_ms;
    report.rows.push(
        Row::new(
            scenario,
            format!("delivery latency at 1,000 events/s (event committed → outcome recorded), p50 / p99{suffix}"),
            format!("{} / {} ms", num(d.p50), num(d.p99)),
        )
        .against(
            format!(
                "sandbox call alone: {} / {} ms",
                num(healthy.healthy_invoke_ms.p50),
                num(healthy.healthy_invoke_ms.p99)
            ),
            f64::NAN,
        )
        .target(
            format!(
                "p50 ≤ {} ms, p99 ≤ {} ms",
                target::DELIVERY_P50_MS,
                target::DELIVERY_P99_MS
            ),
            d.n > 0 && d.p50 <= target::DELIVERY_P50_MS && d.p99 <= target::DELIVERY_P99_MS,
        )
        .load(healthy.load_average.clone()),
    );
    report.notes.push(format!(
        "{scenario}: ingest-only run accepted {} /s of 1,000 offered; latency run accepted {} /s",
        num(bare.load.accepted_per_second),
        num(l.accepted_per_second)
    ));
    report.notes.push(format!(
        "{scenario}: latency run sent {} events in {:.1} s ({} rejected, {} errors); backlog {} {:.1} s after sending stopped",
        l.sent,
        l.seconds,
        l.rejected,
        l.errors,
        if healthy.drained { "drained" } else { "had NOT drained" },
        healthy.drain_seconds
    ));
}

/// Scenarios c and d.
async fn end_to_end(plan: &Plan, hostile: bool, report: &mut Report) -> anyhow::Result<()> {
    let seconds = plan.load_seconds;
    let defaults = serve::EngineSettings::default();
    eprintln!("scenario c: throughput run ({seconds} s + dispatch window)…");
    let throughput = serve::throughput_run("throughput", &serve::healthy_set(), seconds)
        .await
        .context("throughput run")?;
    eprintln!("scenario c: the disk's fsync latency ({seconds} s)…");
    let disk = jobhook_bench::store_probe::fsync_probe(std::time::Duration::from_secs_f64(seconds))
        .context("fsync probe")?;
    report.rows.push(
        Row::new(
            "c",
            "disk under the data directories: 4 KiB write + fsync, back to back (what every ingest commit waits for), p50 / p99 / max",
            format!(
                "{} / {} / {} ms; {} of {} syncs over {} ms",
                num(disk.latency_ms.p50),
                num(disk.latency_ms.p99),
                num(disk.latency_ms.max),
                disk.stalls,
                disk.latency_ms.n,
                jobhook_bench::store_probe::FSYNC_STALL.as_millis()
            ),
        )
        .load(load_average()),
    );
    let healthy = steady_rows(seconds, None, report).await?;
    let accepted = throughput.load.accepted_per_second;
    report.rows.push(
        Row::new(
            "c",
            format!(
                "accepted events/s (`jobhook serve`, SQLite, 4 handlers per event; driver on the same cores, ≤ {} requests in flight: the connections the engine allows one client, less {} for the benchmark's own reads)",
                jobhook_dev::loadgen::MAX_IN_FLIGHT,
                jobhook_dev::loadgen::OBSERVER_CONNECTIONS
            ),
            format!("{} /s", num(accepted)),
        )
        .target(
            format!("≥ {}", target::ACCEPTED_PER_SECOND),
            accepted >= target::ACCEPTED_PER_SECOND,
        )
        .load(throughput.load_average.clone()),
    );
    report.rows.push(
        Row::new(
            "c",
            "deliveries/s dispatch sustains (backlog waiting, no ingest)",
            format!("{} /s", num(throughput.dispatch_per_second)),
        )
        .against(
            format!(
                "needed for the accepted rate: 4 × {} = {} /s",
                num(accepted),
                num(HANDLERS_PER_EVENT * accepted)
            ),
            ratio(
                throughput.dispatch_per_second,
                HANDLERS_PER_EVENT * accepted,
            ),
        )
        .target(
            format!("≥ {} /s", target::DISPATCH_PER_SECOND),
            throughput.dispatch_per_second >= target::DISPATCH_PER_SECOND,
        )
        .load(throughput.load_average.clone()),
    );
    report.rows.push(
        Row::new(
            "c",
            "deliveries/s while ingesting at full speed",
            format!("{} /s", num(throughput.deliveries_while_ingesting)),
        )
        .load(throughput.load_average.clone()),
    );
    let t = &throughput.load;
    report.notes.push(format!(
        "c: throughput run sent {} events in {:.1} s ({} accepted, {} rejected, {} errors)",
        t.sent, t.seconds, t.accepted, t.rejected, t.errors
    ));
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    eprintln!("scenario c: the latency runs again beside a CPU hog (`yes` × {cores})…");
    steady_rows(seconds, Some(cores), report).await?;
    let l = &healthy.load;
    if !hostile {
        return Ok(());
    }
    eprintln!(
        "scenario d: latency run at 1,000 events/s with 2 of 4 handlers hostile ({seconds} s)…"
    );
    let bad = serve::latency_run("hostile", &serve::hostile_set(), defaults, seconds)
        .await
        .context("hostile latency run")?;
    let b = &bad.load;
    let p99_ratio = ratio(b.latency_ms.p99, l.latency_ms.p99);
    report.rows.push(
        Row::new(
            "d",
            "ingest latency p99 at 1,000 events/s, 2 of 4 handlers hostile (infinite loop, memory bomb)",
            format!("{} ms (p50 {} ms)", num(b.latency_ms.p99), num(b.latency_ms.p50)),
        )
        .against(
            format!("(c): {} ms (p50 {} ms)", num(l.latency_ms.p99), num(l.latency_ms.p50)),
            p99_ratio,
        )
        .target(format!("ratio ≤ {}", target::HOSTILE_P99_RATIO), p99_ratio <= target::HOSTILE_P99_RATIO)
        .load(bad.load_average.clone()),
    );
    report.rows.push(
        Row::new(
            "d",
            "healthy-delivery latency p50 (event committed → outcome recorded; in ratios, under 1 ms counts as 1 ms: the store's times are whole milliseconds)",
            format!("{} ms", num(bad.healthy_latency_ms.p50)),
        )
        .against(
            format!("(c): {} ms", num(healthy.healthy_latency_ms.p50)),
            latency_ratio(bad.healthy_latency_ms.p50, healthy.healthy_latency_ms.p50),
        )
        .target(
            format!("ratio ≤ {}", target::HOSTILE_LATENCY_RATIO),
            latency_ratio(bad.healthy_latency_ms.p50, healthy.healthy_latency_ms.p50)
                <= target::HOSTILE_LATENCY_RATIO,
        )
        .load(bad.load_average.clone()),
    );
    report.rows.push(
        Row::new(
            "d",
            "healthy-delivery latency p99",
            format!("{} ms", num(bad.healthy_latency_ms.p99)),
        )
        .against(
            format!("(c): {} ms", num(healthy.healthy_latency_ms.p99)),
            latency_ratio(bad.healthy_latency_ms.p99, healthy.healthy_latency_ms.p99),
        )
        .target(
            format!("ratio ≤ {}", target::HOSTILE_LATENCY_RATIO),
            latency_ratio(bad.healthy_latency_ms.p99, healthy.healthy_latency_ms.p99)
                <= target::HOSTILE_LATENCY_RATIO,
        )
        .load(bad.load_average.clone()),
    );
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    eprintln!(
        "scenario d: the same with sandboxes on {cores} low-priority threads of their own ({seconds} s)…"
    );
    let own_threads = serve::EngineSettings {
        sandbox_threads: Some(cores),
    };
    let bad_own = serve::latency_run(
        "hostile-sandbox-threads",
        &serve::hostile_set(),
        own_threads,
        seconds,
    )
    .await
    .context("hostile latency run, sandbox threads")?;
    let o = &bad_own.load;
    report.rows.push(
        Row::new(
            "d",
            format!("ingest latency p99, same hostile run, sandboxes on {cores} threads of their own at nice 10 (`[engine] sandbox_threads = {cores}`)"),
            format!("{} ms (p50 {} ms)", num(o.latency_ms.p99), num(o.latency_ms.p50)),
        )
        .against(
            format!("(c): {} ms (p50 {} ms)", num(l.latency_ms.p99), num(l.latency_ms.p50)),
            ratio(o.latency_ms.p99, l.latency_ms.p99),
        )
        .load(bad_own.load_average.clone()),
    );
    report.rows.push(
        Row::new(
            "d",
            "healthy-delivery latency p50 / p99 with sandbox threads",
            format!(
                "{} / {} ms",
                num(bad_own.healthy_latency_ms.p50),
                num(bad_own.healthy_latency_ms.p99)
            ),
        )
        .against(
            format!(
                "(c): {} / {} ms",
                num(healthy.healthy_latency_ms.p50),
                num(healthy.healthy_latency_ms.p99)
            ),
            latency_ratio(
                bad_own.healthy_latency_ms.p99,
                healthy.healthy_latency_ms.p99,
            ),
        )
        .load(bad_own.load_average.clone()),
    );
    let outcomes: Vec<String> = bad
        .outcomes
        .iter()
        .filter(|(h, _, _)| h.starts_with("hostile"))
        .map(|(h, c, n)| format!("{h} {c} ×{n}"))
        .collect();
    report.notes.push(format!(
        "d: accepted {} /s of 1,000 offered ({} errors); hostile deliveries: {}; backlog {} {:.1} s after sending stopped",
        num(b.accepted_per_second),
        b.errors,
        outcomes.join(", "),
        if bad.drained { "drained" } else { "had NOT drained" },
        bad.drain_seconds
    ));
    Ok(())
}

/// Scenario g's rows: c's latency rows on PostgreSQL with one node and two, then the CPU-bound
/// dispatch of two pinned nodes against one.
fn scale_out_rows(g: &scale_out::ScaleOut, report: &mut Report) {
    latency_rows("g", ", PostgreSQL, one node", &g.bare, &g.one_node, report);
    latency_rows(
        "g",
        ", PostgreSQL, two nodes (events sent to the first)",
        &g.bare,
        &g.two_nodes,
        report,
    );
    let one = scale_out::median_dispatch(&g.dispatch, 1);
    let two = scale_out::median_dispatch(&g.dispatch, 2);
    let scale = ratio(two, one);
    let machine = scale_out::median_machine_scale(&g.machine);
    report.rows.push(
        Row::new(
            "g",
            format!(
                "the machine itself: arithmetic done by two processes pinned to cores 0 and 1 ÷ by one on core 0 (median of {}; the ceiling of the row below)",
                g.machine.len()
            ),
            format!("{machine:.2}×"),
        )
        .load(
            g.dispatch
                .first()
                .map(|d| d.load_average.clone())
                .unwrap_or_default(),
        ),
    );
    let rounds = g.dispatch.iter().filter(|d| d.nodes == 2).count();
    report.rows.push(
        Row::new(
            "g",
            format!(
                "deliveries/s of a CPU-bound handler, two nodes on one PostgreSQL database, each pinned to its own core (median of {rounds})"
            ),
            format!("{} /s", num(two)),
        )
        .against(format!("one node pinned to one core: {} /s", num(one)), scale)
        .target(
            format!("ratio ≥ {}", target::SCALE_OUT_RATIO),
            scale >= target::SCALE_OUT_RATIO,
        )
        .load(
            g.dispatch
                .last()
                .map(|d| d.load_average.clone())
                .unwrap_or_default(),
        ),
    );
    let rounds: Vec<String> = g
        .dispatch
        .iter()
        .map(|d| {
            format!(
                "{} node(s) {} /s (sandbox call p50 {} ms, {} left pending{})",
                d.nodes,
                num(d.per_second),
                num(d.call_ms),
                d.backlog_left,
                if d.backlog_left == 0 {
                    ", backlog ran out: a floor"
                } else {
                    ""
                }
            )
        })
        .collect();
    report.notes.push(format!(
        "g: dispatch rounds in order: {}",
        rounds.join("; ")
    ));
}
