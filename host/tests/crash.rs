//! Crash safety: `jobhook serve` is SIGKILLed again and again while the load driver posts events;
//! afterwards every event that got a 202 has exactly one terminal delivery per matching handler —
//! none lost, none terminal twice — and interrupted deliveries ran again with a higher attempt
//! number that the handler saw.

use std::path::Path;
use std::process::{Command, Stdio};
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
    let driver = Command::new(bin)
        .args([
            "load",
            "--url",
            &url,
            "--rate",
            "150",
            "--seconds",
            "5",
            "--record",
        ])
        .arg(&record)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the load driver");

    let mut engine = Some(engine);
    for round in 0..KILLS {
        std::thread::sleep(Duration::from_millis(500 + 150 * round as u64));
        if let Some(e) = engine.take() {
            e.kill();
        }
        std::thread::sleep(Duration::from_millis(100));
        engine = Some(EngineProcess::start(bin, &config, &log));
    }
    let output = driver.wait_with_output().expect("load driver");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
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
