//! The system clock stepped backwards and forwards under a running `jobhook serve`.
//!
//! The engine runs with libfaketime preloaded (Debian's `libfaketime`, which `scripts/test.sh`
//! installs): its wall clock (`CLOCK_REALTIME`) is the real one plus an offset the test writes
//! to a file, re-read on every call, while the monotonic and boot-time clocks stay real — as
//! when an operator or NTP steps a server's clock. Retries must keep their backoff (a step back
//! must not hold them for an hour, a step forward must not run them at once), an idempotency
//! key its retention, and quarantine its length. On PostgreSQL, a node whose clock steps must
//! neither take over another node's live deliveries (a step forwards) nor let its own be taken
//! over (a step backwards): the queue's time there is the database server's.
//!
//! Without libfaketime the test fails saying to install it, unless `JOBHOOK_SKIP_FAKETIME=1`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jobhook_testkit::engine::{EngineProcess, free_port};
use jobhook_testkit::postgres::{TestDatabase, database_or_skip};
use jobhook_testkit::{guest, sample_context_json};
use serde_json::{Value, json};

/// Where Debian's `libfaketime` puts the library.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Turns "libfaketime is missing" from a failure into a skip.
const SKIP_ENV: &str = "JOBHOOK_SKIP_FAKETIME";

/// The flaky handler's wait between attempts. Long enough that "ran at once" and "waited" are
/// told apart on a busy machine, short enough for a test.
const BACKOFF: Duration = Duration::from_secs(6);

/// How long quarantine holds the failing handler after three failures in a row.
const QUARANTINE: Duration = Duration::from_secs(5);

/// How long anything that is due may take to happen on a busy machine.
const SLACK: Duration = Duration::from_secs(20);

/// An hour, the size of the steps.
const HOUR: i64 = 3600;

fn engine_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_jobhook"))
}

/// The engine's clock offset from the real one, in seconds, as libfaketime reads it.
struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    fn set(&self, offset_s: i64) {
        std::fs::write(&self.file, format!("{offset_s:+}\n")).expect("write the clock offset");
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", LIBFAKETIME.to_owned()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            // Read the file on every call, so that a write steps the clock at once.
            ("FAKETIME_NO_CACHE", "1".to_owned()),
            // Only the wall clock steps; monotonic and boot-time clocks never do.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ]
    }
}

fn config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"[server]
listen = "127.0.0.1:0"
idempotency_retention_ms = 600000

[store]
data_dir = "data"
lease_ms = 3000

[quarantine]
after_failures = 3
initial_backoff_ms = {quarantine}
max_backoff_ms = {quarantine}

[[handlers]]
name = "flaky"
component = "{panic}"
job_types = ["*"]

[handlers.retry]
max_attempts = 3
backoff_ms = {backoff}
max_backoff_ms = {backoff}
"#,
        quarantine = QUARANTINE.as_millis(),
        backoff = BACKOFF.as_millis(),
        panic = guest("guest-panic").display(),
    );
    let path = dir.join("jobhook.toml");
    std::fs::write(&path, text).expect("config");
    path
}

async fn post(url: &str, body: &Value, key: Option<&str>) -> Value {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/v1/job-complete"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    let answer: Value =
        serde_json::from_str(&response.text().await.expect("answer")).expect("JSON answer");
    assert_eq!(status, 202, "{answer}");
    answer
}

/// `GET url` as JSON.
async fn get_json(url: &str) -> Value {
    let text = reqwest::get(url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: {e}: {text}"))
}

/// The `flaky` delivery of event `id`.
async fn delivery(url: &str, id: &str) -> Value {
    let event: Value = get_json(&format!("{url}/v1/events/{id}")).await;
    event["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["handler"] == "flaky"))
        .cloned()
        .unwrap_or_else(|| panic!("no flaky delivery: {event:#}"))
}

/// How many attempts of the delivery are on record.
fn attempts(d: &Value) -> usize {
    d["attempts"].as_array().map_or(0, Vec::len)
}

/// Waits until the delivery of `id` has `n` attempts on record, for at most `within`; answers
/// how long that took.
async fn until_attempts(engine: &EngineProcess, id: &str, n: usize, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let d = delivery(&engine.url, id).await;
        if attempts(&d) >= n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "attempt {n} of {id} did not come within {within:?}: {d:#}\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event_id(answer: &Value) -> String {
    answer["event_id"].as_str().expect("event_id").to_owned()
}

fn job() -> Value {
    let mut context = sample_context_json();
    context["JobId"] = json!(uuid::Uuid::new_v4().to_string());
    context
}

/// Whether libfaketime is there; fails the test saying how to install it, unless skipped.
fn have_faketime() -> bool {
    if Path::new(LIBFAKETIME).exists() {
        return true;
    }
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("SKIPPED: {LIBFAKETIME} is missing ({SKIP_ENV}=1)");
        return false;
    }
    panic!("{LIBFAKETIME} is missing: apt-get install libfaketime (or set {SKIP_ENV}=1)");
}

/// Starts `jobhook serve --config config` with its wall clock under `clock`.
fn start_faked(clock: &FakeClock, config: &Path, log: &Path) -> EngineProcess {
    let env = clock.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    EngineProcess::start_with_env(engine_bin(), config, log, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_idempotency_and_quarantine_keep_their_lengths_when_the_clock_steps() {
    if !have_faketime() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = FakeClock {
        file: dir.path().join("clock-offset"),
    };
    clock.set(0);
    let engine = start_faked(&clock, &config(dir.path()), &dir.path().join("engine.log"));

    // The first attempt fails; the retry is due BACKOFF later. Then the clock steps back an
    // hour: the retry still comes after about BACKOFF, not an hour and BACKOFF later.
    let key = "clock-step-key";
    let context = job();
    let first = post(&engine.url, &context, Some(key)).await;
    let id = event_id(&first);
    until_attempts(&engine, &id, 1, SLACK).await;
    clock.set(-HOUR);
    let waited = until_attempts(&engine, &id, 2, BACKOFF + SLACK).await;
    assert!(
        waited <= BACKOFF + SLACK,
        "the retry after a step back came {waited:?} later"
    );

    // The clock steps forwards two hours (an hour ahead of the real one) while the third
    // attempt waits: it must still wait most of BACKOFF, not run at once.
    let stepped = Instant::now();
    clock.set(HOUR);
    let waited = until_attempts(&engine, &id, 3, BACKOFF + SLACK).await;
    assert!(
        waited >= BACKOFF / 2,
        "after a step forwards the retry ran {waited:?} later, before its backoff of {BACKOFF:?}"
    );
    let d = delivery(&engine.url, &id).await;
    assert_eq!(d["state"], "failed", "{d:#}");
    assert_eq!(attempts(&d), 3, "{d:#}");

    // The idempotency key was used an hour and a bit ago by the new clock, minutes ago in
    // truth: its retention of ten minutes still holds it.
    let again = post(&engine.url, &context, Some(key)).await;
    assert_eq!(event_id(&again), id, "the key was forgotten: {again}");
    let log = engine.log_text();
    assert!(
        log.contains("the system clock stepped by"),
        "the steps are not logged:\n{log}"
    );

    // Three failures in a row: the handler is quarantined for QUARANTINE. The clock steps back
    // again; the quarantine still ends after QUARANTINE: a delivery posted after that runs.
    clock.set(-HOUR);
    let quarantined_at = stepped + waited;
    let health: Value = get_json(&format!("{}/healthz", engine.url)).await;
    assert_eq!(health["quarantined"], 1, "{health}");
    let until = quarantined_at + QUARANTINE + Duration::from_millis(500);
    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
    let later = post(&engine.url, &job(), None).await;
    let later = event_id(&later);
    until_attempts(&engine, &later, 1, SLACK).await;
    let d = delivery(&engine.url, &later).await;
    let first_class = &d["attempts"][0]["class"];
    assert_eq!(
        first_class, "panicked",
        "quarantine outlived its length: {d:#}"
    );
}

/// How long the shared-store test's handler runs: long enough for the other node to look at its
/// lease several times (every third of [`PG_LEASE_MS`]) after the step.
const SLOW_MS: u64 = 9000;

/// The shared-store test's lease.
const PG_LEASE_MS: u64 = 3000;

/// One node's configuration on `db`: one slow handler.
fn pg_config(dir: &Path, name: &str, db: &TestDatabase) -> PathBuf {
    let text = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

{store}
[[handlers]]
name = "slow"
component = "{probe}"
job_types = ["*"]
properties = {{ SleepMs = "{SLOW_MS}" }}

[handlers.limits]
timeout_ms = {timeout}
"#,
        port = free_port(),
        store = db.store_section(PG_LEASE_MS, &format!("data-{name}")),
        probe = guest("guest-attempt-probe").display(),
        timeout = SLOW_MS * 3,
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

/// Posts one event to `node`, waits until its delivery is running, and answers the event id.
async fn running_on(node: &EngineProcess) -> String {
    let id = event_id(&post(&node.url, &job(), None).await);
    let start = Instant::now();
    loop {
        let d = slow_delivery(&node.url, &id).await;
        if d["state"] == "running" {
            return id;
        }
        assert!(start.elapsed() < SLACK, "{id} never ran: {d:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn slow_delivery(url: &str, id: &str) -> Value {
    let event: Value = get_json(&format!("{url}/v1/events/{id}")).await;
    event["deliveries"][0].clone()
}

/// Waits until the delivery of `id` is terminal and checks it ran once: one attempt, which
/// succeeded, none interrupted or taken over.
async fn ran_once(url: &str, id: &str, logs: &[&EngineProcess]) {
    let start = Instant::now();
    loop {
        let d = slow_delivery(url, id).await;
        if d["state"] != "running" && d["state"] != "pending" {
            assert_eq!(d["state"], "succeeded", "{d:#}");
            assert_eq!(attempts(&d), 1, "the delivery was taken over: {d:#}");
            assert_eq!(d["attempt"], 1, "{d:#}");
            return;
        }
        let logs: Vec<String> = logs.iter().map(|e| e.log_text()).collect();
        assert!(
            start.elapsed() < Duration::from_millis(SLOW_MS) + SLACK,
            "{id} did not finish: {d:#}\n{}",
            logs.join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_steps_takes_nothing_over_and_loses_nothing_to_others() {
    if !have_faketime() {
        return;
    }
    let Some(db) = database_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("db-password"), &db.password).expect("password file");
    let clock = FakeClock {
        file: dir.path().join("clock-offset"),
    };
    clock.set(0);
    let (config_a, log_a) = (pg_config(dir.path(), "a", &db), dir.path().join("a.log"));
    let (config_b, log_b) = (pg_config(dir.path(), "b", &db), dir.path().join("b.log"));

    // B runs a delivery; A's clock steps an hour forwards. To A, B's lease looks long expired
    // by A's own clock — but leases are in the server's time, and A must leave it alone.
    let b = EngineProcess::start(engine_bin(), &config_b, &log_b);
    let on_b = running_on(&b).await;
    let a = start_faked(&clock, &config_a, &log_a);
    clock.set(HOUR);
    ran_once(&b.url, &on_b, &[&a, &b]).await;

    // A runs a delivery and its clock steps back an hour (to an hour behind the real one). Its
    // renewals must still keep its lease alive in B's eyes.
    let _ = b.terminate(Duration::from_secs(30));
    let on_a = running_on(&a).await;
    clock.set(-HOUR);
    let b = EngineProcess::start(engine_bin(), &config_b, &log_b);
    ran_once(&a.url, &on_a, &[&a, &b]).await;
}
