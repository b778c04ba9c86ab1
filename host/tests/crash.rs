//! Crash safety: `jobhook serve` is SIGKILLed again and again while the load driver posts events;
//! afterwards every event that got a 202 has exactly one terminal delivery per matching handler —
//! none lost, none terminal twice — and interrupted deliveries ran again with a higher attempt
//! number that the handler saw. With resends under an idempotency key (as the forwarder does),
//! every event sent is committed exactly once.
//!
//! Power loss goes further than SIGKILL: what the page cache held is lost too. The data
//! directory sits on `jobhook-powerloss-fs` (a FUSE view that keeps file data in memory until
//! it is fsync'ed, `tests/powerloss-fs`); the power is cut under load, and an engine started on
//! what reached the disk must still have every event that was answered 202 — and every mail a
//! delivery recorded as succeeded wrote to the outbox, whole.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jobhook_testkit::engine::{EngineProcess, free_port};
use jobhook_testkit::exactly_once::{INVENTORY_TYPES, check_exactly_once};
use jobhook_testkit::powerloss::{PowerLossFs, fuse_or_skip};
use jobhook_testkit::{guest, powerloss_fs_binary, sample_context_json};
use serde_json::{Value, json};

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

/// One run: the load driver (resending under an idempotency key if `resend`) posts events for
/// five seconds while the engine is SIGKILLed [`KILLS`] times and started again. Returns the
/// directory, the engine that is left running, the accepted event ids the driver recorded and
/// its report as JSON.
fn run_with_kills(resend: bool) -> (tempfile::TempDir, EngineProcess, Vec<String>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("jobhook.toml");
    std::fs::write(&config, config_text(port)).expect("write config");
    let bin = Path::new(env!("CARGO_BIN_EXE_jobhook"));
    let log = dir.path().join("engine.log");
    let record = dir.path().join("accepted.txt");

    let engine = EngineProcess::start(bin, &config, &log);
    let url = engine.url.clone();
    let driver = load_driver(&url, 150, 5.0, &record, 1, resend);

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
    (dir, engine, accepted, report)
}

#[test]
fn sigkill_mid_flight_loses_nothing_and_finishes_nothing_twice() {
    let (_dir, engine, accepted, report) = run_with_kills(false);
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

/// The forwarder's way: every request that failed or timed out (connection reset by the kill)
/// is resent with the same `Idempotency-Key` until it is answered. Every event sent is then
/// committed exactly once: one event per key, no event without a key, none lost.
#[test]
fn resends_with_an_idempotency_key_across_sigkills_commit_each_event_once() {
    let (dir, engine, accepted, report) = run_with_kills(true);
    let report: serde_json::Value = serde_json::from_str(report.trim()).expect("driver JSON");
    let sent = report["sent"].as_u64().expect("sent");
    assert!(sent > 100, "too few events sent: {report}");
    assert!(
        report["resent"].as_u64().unwrap_or(0) > 0,
        "no request was resent; the kills did not hit a request: {report}"
    );
    assert_eq!(report["unanswered"], 0, "{report}");
    assert_eq!(report["rejected"], 0, "{report}");
    assert_eq!(
        accepted.len() as u64,
        sent,
        "every event answered 202: {report}"
    );

    // Every event committed is one of the answers, once, under its own key.
    let distinct: BTreeSet<&String> = accepted.iter().collect();
    let database = rusqlite::Connection::open_with_flags(
        dir.path().join("data").join("jobhook.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database");
    let count = |sql: &str| -> u64 {
        database
            .query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .expect(sql)
    };
    let events = count("SELECT count(*) FROM events");
    let keys = count("SELECT count(*) FROM idempotency_keys");
    let keyed_events = count("SELECT count(DISTINCT event_id) FROM idempotency_keys");
    assert_eq!(
        distinct.len() as u64,
        sent,
        "two keys answered with one event"
    );
    assert_eq!(events, sent, "duplicate events committed: {report}");
    assert_eq!((keys, keyed_events), (sent, sent));
    let stored: BTreeSet<String> = database
        .prepare("SELECT event_id FROM idempotency_keys")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()
        })
        .expect("keys");
    let answered: BTreeSet<String> = accepted.iter().cloned().collect();
    assert_eq!(
        stored, answered,
        "each key's event is the one its answer named"
    );

    let reruns = check_exactly_once(&engine.url, &accepted, Duration::from_secs(120));
    println!(
        "{sent} events sent with resends across {KILLS} SIGKILLs: {events} committed, \
         {reruns} deliveries re-run; driver: {report}"
    );
}

fn config_text(port: u16) -> String {
    config_template(port)
}

/// A temporary directory holding `disk` (what reached the disk) and `mnt`, where the power-loss
/// filesystem shows it: (the directory, disk, the filesystem mounted on mnt).
fn power_loss_disk() -> (tempfile::TempDir, PathBuf, PowerLossFs) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mount) = (dir.path().join("disk"), dir.path().join("mnt"));
    for d in [&backing, &mount] {
        std::fs::create_dir(d).expect("create dir");
    }
    let disk = PowerLossFs::mount(&powerloss_fs_binary(), &backing, &mount);
    (dir, backing, disk)
}

#[test]
fn power_loss_under_load_loses_no_event_that_was_answered_202() {
    if !fuse_or_skip() {
        return;
    }
    let (dir, backing, disk) = power_loss_disk();
    // One configuration with the data directory on the mount, one on what reached the disk.
    let port = free_port();
    let with_data_in = |name: &str, data: &Path| {
        let text = config_template(port).replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", data.display()),
        );
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    };
    let before = with_data_in("before.toml", &disk.mountpoint().join("data"));
    let after = with_data_in("after.toml", &backing.join("data"));
    let bin = Path::new(env!("CARGO_BIN_EXE_jobhook"));
    let log = dir.path().join("engine.log");
    let record = dir.path().join("accepted.txt");

    let engine = EngineProcess::start(bin, &before, &log);
    let driver = load_driver(&engine.url, 150, 4.0, &record, 3, false);
    std::thread::sleep(Duration::from_millis(2500));
    // The power goes: the disk keeps only what was fsync'ed, and the process dies with it.
    disk.cut_power();
    engine.kill();
    let report = driver.join().expect("load driver");
    let accepted: Vec<String> = std::fs::read_to_string(&record)
        .expect("accepted ids")
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(accepted.len() > 100, "too few events accepted: {report}");

    let engine = EngineProcess::start(bin, &after, &log);
    let reruns = check_exactly_once(&engine.url, &accepted, Duration::from_secs(120));
    println!(
        "{} events answered 202 before the power cut, all on disk after it; {reruns} \
         deliveries re-run; driver: {report}",
        accepted.len()
    );
}

/// Mails that are on record as sent (their delivery settled as succeeded) when the power goes.
const MAILS_BEFORE_CUT: usize = 20;

/// Mails posted just before the cut, some of them being written when the power goes.
const MAILS_IN_FLIGHT: usize = 20;

/// How long an event may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The engine with only `repeated-failure-email` (threshold 0: every failed job is mailed about)
/// and its data directory, and so the default outbox, at `data`.
fn mail_config(port: u16, data: &Path) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[store]
data_dir = "{data}"

[mail]
from = "jobhook@example.com"

[[handlers]]
name = "mail"
component = "{mail}"
job_types = ["*"]
properties = {{ RetryThreshold = "0", EmailRecipients = "pki-team@example.com" }}
[handlers.grants.mail]
recipients = ["@example.com"]
"#,
        data = data.display(),
        mail = guest("repeated-failure-email").display(),
    )
}

/// Posts a failed job with a `JobId` of its own; returns the event id and the job id.
async fn post_failed_job(client: &reqwest::Client, url: &str) -> (String, String) {
    let job = uuid::Uuid::new_v4().to_string();
    let mut context = sample_context_json();
    context["JobResult"] = json!("Failure");
    context["JobId"] = json!(job);
    let response = client
        .post(format!("{url}/v1/job-complete"))
        .header("content-type", "application/json")
        .body(context.to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(
        response.status().as_u16(),
        202,
        "the event was not accepted"
    );
    let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
    let event = body["event_id"].as_str().expect("event_id").to_owned();
    (event, job)
}

/// The `mail` delivery of event `id` once it has settled.
async fn settled_mail(client: &reqwest::Client, url: &str, id: &str) -> Value {
    let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
    let event = jobhook_testkit::exactly_once::settled(client, url, id, deadline).await;
    event["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["handler"] == "mail"))
        .cloned()
        .unwrap_or_else(|| panic!("no mail delivery: {event:#}"))
}

/// The `.eml` files of `outbox` and their bytes (temporary files, which start with a dot, are
/// not mail).
fn outbox_mails(outbox: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(outbox) else {
        return Vec::new();
    };
    let mut mails: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("outbox entry"))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.ends_with(".eml") && !name.starts_with('.'))
                .then(|| (name, std::fs::read(e.path()).expect("read mail")))
        })
        .collect();
    mails.sort();
    mails
}

/// Whether `mail` is a whole message from `repeated-failure-email`: headers, the blank line,
/// and the body through its last line (the job's request time, quoted-printable or not).
fn is_whole_mail(mail: &[u8]) -> bool {
    let text = String::from_utf8_lossy(mail);
    let Some((headers, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    headers.contains("To: pki-team@example.com")
        && body.contains("Orchestrator Job failed too many times:")
        && body.ends_with("2023-05-03 23:18:48 UTC\r\n")
}

/// Mail survives a power cut: a handler mails into the outbox on the power-loss filesystem, the
/// power is cut once some deliveries are on record as succeeded (and while others write), and
/// after the restart every delivery recorded as succeeded has its mail in the outbox, whole,
/// under its final name — and no `.eml` there is empty or cut short.
#[test]
fn power_loss_after_a_mail_was_recorded_as_sent_keeps_the_mail() {
    if !fuse_or_skip() {
        return;
    }
    let (dir, backing, disk) = power_loss_disk();
    let port = free_port();
    let before = dir.path().join("before.toml");
    let after = dir.path().join("after.toml");
    std::fs::write(&before, mail_config(port, &disk.mountpoint().join("data"))).expect("config");
    std::fs::write(&after, mail_config(port, &backing.join("data"))).expect("config");
    let bin = Path::new(env!("CARGO_BIN_EXE_jobhook"));
    let log = dir.path().join("engine.log");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();

    let engine = EngineProcess::start(bin, &before, &log);
    let mut sent = Vec::new();
    for _ in 0..MAILS_BEFORE_CUT {
        let (event, job) = runtime.block_on(post_failed_job(&client, &engine.url));
        let d = runtime.block_on(settled_mail(&client, &engine.url, &event));
        assert_eq!(d["state"], "succeeded", "{d:#}\n{}", engine.log_text());
        sent.push((event, job));
    }
    let mut in_flight = Vec::new();
    for _ in 0..MAILS_IN_FLIGHT {
        in_flight.push(runtime.block_on(post_failed_job(&client, &engine.url)));
    }
    // The power goes: the disk keeps only what was fsync'ed, and the process dies with it.
    disk.cut_power();
    engine.kill();

    let engine = EngineProcess::start(bin, &after, &log);
    let outbox = backing.join("data").join("outbox");
    let mut recorded = 0;
    for (i, (event, job)) in sent.iter().chain(&in_flight).enumerate() {
        let d = runtime.block_on(settled_mail(&client, &engine.url, event));
        if i < MAILS_BEFORE_CUT {
            // On record before the cut — durably: the in-flight events' 202s waited for the
            // sync of the write-ahead log behind these outcomes — so not run again: its mail
            // is the one written before the cut.
            assert_eq!(d["state"], "succeeded", "{d:#}");
            assert_eq!(d["attempt"], 1, "re-run after the restart: {d:#}");
        }
        if d["state"] != "succeeded" {
            continue;
        }
        recorded += 1;
        let needle = format!("JobId: {job}");
        let mails = outbox_mails(&outbox);
        let found = mails
            .iter()
            .any(|(_, m)| is_whole_mail(m) && String::from_utf8_lossy(m).contains(&needle));
        assert!(
            found,
            "event {event} (job {job}) is on record as mailed, but no whole .eml holds it; \
             the outbox has {} .eml files, sizes {:?}",
            mails.len(),
            mails.iter().map(|(_, m)| m.len()).collect::<Vec<_>>()
        );
    }
    // Nothing an outbox consumer would send is empty or cut short.
    for (name, mail) in outbox_mails(&outbox) {
        assert!(
            is_whole_mail(&mail),
            "{name} is not a whole message ({} bytes):\n{}",
            mail.len(),
            String::from_utf8_lossy(&mail)
        );
    }
    println!(
        "{recorded} mails on record as sent across the power cut, all whole in the outbox; {} \
         .eml files",
        outbox_mails(&outbox).len()
    );
    engine.kill();
}

/// A load driver (`jobhook-dev load`'s, `jobhook_dev::loadgen`) on a thread of its own, posting
/// to `url` and recording accepted event ids in `record`; joining it gives its report.
fn load_driver(
    url: &str,
    rate: u32,
    seconds: f64,
    record: &Path,
    seed: u64,
    resend: bool,
) -> std::thread::JoinHandle<String> {
    let options = jobhook_dev::loadgen::LoadOptions {
        url: url.to_owned(),
        rate,
        duration: Duration::from_secs_f64(seconds),
        token: None,
        record: Some(record.to_owned()),
        seed,
        resend,
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
