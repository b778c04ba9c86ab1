//! Crash safety: `jobhook serve` is SIGKILLed again and again while the load driver posts events;
//! afterwards every event that got a 202 has exactly one terminal delivery per matching handler —
//! none lost, none terminal twice — and interrupted deliveries ran again with a higher attempt
//! number that the handler saw.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobhook_testkit::engine::{EngineProcess, free_port};
use jobhook_testkit::guest;
use serde_json::Value;

/// Job types of the load driver's mix that the `inventory` handler is registered for.
const INVENTORY_TYPES: [&str; 2] = [
    "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
    "7b6bbc1b-d802-4b09-bec9-f5c221083130",
];

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

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    let mut reruns = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &accepted {
        let event = runtime.block_on(settled(&client, &engine, id, deadline));
        let job_type_id = event["context"]["JobTypeId"].as_str().unwrap_or("");
        let mut expected: BTreeSet<&str> = ["probe", "log"].into();
        if INVENTORY_TYPES.contains(&job_type_id) {
            expected.insert("inventory");
        }
        let deliveries = event["deliveries"].as_array().expect("deliveries");
        let handlers: BTreeSet<&str> = deliveries
            .iter()
            .filter_map(|d| d["handler"].as_str())
            .collect();
        assert_eq!(handlers, expected, "event {id}: {event:#}");
        assert_eq!(deliveries.len(), expected.len(), "event {id}: {event:#}");
        for d in deliveries {
            assert_eq!(d["state"], "succeeded", "event {id}: {d:#}");
            let attempt = d["attempt"].as_u64().expect("attempt");
            let attempts = d["attempts"].as_array().expect("attempts");
            let terminal: Vec<&Value> = attempts.iter().filter(|a| a["terminal"] == true).collect();
            assert_eq!(
                terminal.len(),
                1,
                "event {id}: terminal more than once: {d:#}"
            );
            assert_eq!(terminal[0]["attempt"].as_u64(), Some(attempt), "{d:#}");
            if attempt > 1 {
                reruns += 1;
            }
            if d["handler"] != "log" {
                let seen = d["logs"][0]["message"].as_str().unwrap_or("");
                assert_eq!(
                    seen,
                    format!("attempt {attempt} of event {id}"),
                    "the handler must see the attempt number: {d:#}"
                );
            }
        }
    }
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

async fn settled(
    client: &reqwest::Client,
    engine: &EngineProcess,
    id: &str,
    deadline: Instant,
) -> Value {
    loop {
        let response = client
            .get(format!("{}/v1/events/{id}", engine.url))
            .send()
            .await
            .expect("GET event");
        assert_eq!(
            response.status().as_u16(),
            200,
            "accepted event {id} is missing"
        );
        let event: Value =
            serde_json::from_slice(&response.bytes().await.expect("body")).expect("event JSON");
        let done = event["deliveries"].as_array().is_some_and(|ds| {
            ds.iter()
                .all(|d| d["state"] != "pending" && d["state"] != "running")
        });
        if done {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} never settled: {event:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
