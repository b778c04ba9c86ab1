//! Crash safety: `jobhook serve` is SIGKILLed again and again while the load driver posts events;
//! afterwards every event that got a 202 has exactly one terminal delivery per matching handler —
//! none lost, none terminal twice — and interrupted deliveries ran again with a higher attempt
//! number that the handler saw.

use std::path::Path;
use std::time::Duration;

use jobhook_testkit::engine::{EngineProcess, free_port};
use jobhook_testkit::exactly_once::{INVENTORY_TYPES, check_exactly_once};
use jobhook_testkit::guest;

/// How many times the engine is killed while events flow.
const KILLS: usize = 4;

fn config_template(port: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[store]
data_dir = "data"

[engine]
max_concurrent_deliveries = 8

[[handlers]]
name = "probe"
component = "{probe}"
job_types = ["*"]
properties = {{ SleepMs = "15" }}

[[handlers]]
name = "inventory"
component = "{probe}"
job_types = ["{a}", "{b}"]

[[handlers]]
name = "log"
component = "{log}"
job_types = ["*"]
"#,
        probe = guest("guest-attempt-probe").display(),
        log = guest("log-context").display(),
        a = INVENTORY_TYPES[0],
        b = INVENTORY_TYPES[1],
    )
}

#[test]
fn sigkill_mid_flight_loses_nothing_and_finishes_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("jobhook.toml");
    std::fs::write(&config, config_text(port)).expect("write config");
    let bin = Path::new(env!("CARGO_BIN_EXE_jobhook"));
    let log = dir.path().join("engine.log");
    let record = dir.path().join("accepted.txt");

    let engine = EngineProcess::start(bin, &config, &log);
    let url = engine.url.clone();
    let driver = load_driver(&url, 150, 5.0, &record, 1);

    let mut engine = Some(engine);
    for round in 0..KILLS {
        std::thread::sleep(Duration::from_millis(500 + 150 * round as u64));
        if let Some(e) = engine.take() {
            e.kill();
        }
        std::thread::sleep(Duration::from_millis(100));
        engine = Some(EngineProcess::start(bin, &config, &log));
    }
    let report = driver.join().expect("load driver");
    let engine = engine.expect("engine running");

    let accepted: Vec<String> = std::fs::read_to_string(&record)
        .expect("accepted ids")
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(accepted.len() > 100, "too few events accepted: {report}");

    let reruns = check_exactly_once(&engine.url, &accepted, Duration::from_secs(120));
    println!(
        "{} accepted events checked after {KILLS} SIGKILLs; {reruns} deliveries re-run; driver: {report}",
        accepted.len()
    );
    assert!(
        reruns > 0,
        "no delivery was interrupted by the kills; the test did not exercise recovery"
    );
}

fn config_text(port: u16) -> String {
    config_template(port)
}

/// A load driver (`jobhook-dev load`'s, `jobhook_dev::loadgen`) on a thread of its own, posting
/// to `url` and recording accepted event ids in `record`; joining it gives its report.
fn load_driver(
    url: &str,
    rate: u32,
    seconds: f64,
    record: &Path,
    seed: u64,
) -> std::thread::JoinHandle<String> {
    let options = jobhook_dev::loadgen::LoadOptions {
        url: url.to_owned(),
        rate,
        duration: Duration::from_secs_f64(seconds),
        token: None,
        record: Some(record.to_owned()),
        seed,
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("driver runtime");
        match runtime.block_on(jobhook_dev::loadgen::run(options)) {
            Ok(report) => serde_json::to_string(&report).unwrap_or_default(),
            Err(e) => format!("load driver failed: {e:#}"),
        }
    })
}
