//! Faults of what `jobhook serve` depends on, each against the real part (docs/OPERATIONS.md
//! describes what an operator sees and does for each):
//!
//! - the disk under the SQLite store fills up: a small tmpfs the test mounts holds the data
//!   directory; ingest answers 503 saying the store is out of disk space, never 202 for an event
//!   it did not commit, and once space returns it accepts again and the backlog drains, without
//!   a restart;
//! - the file system under the SQLite store turns read-only while the engine runs (an ext4
//!   image mounted `errors=remount-ro` meets an error of its own): ingest answers 503 as for a
//!   store that takes no writes, and the log says the file system is what to mend;
//! - the PostgreSQL server restarts under load: ingest answers 503 while it is down (within a
//!   bounded time, never hanging), the node reconnects by itself, and every event that got a
//!   202 is delivered exactly once;
//! - the PostgreSQL server refuses the engine (a password changed on the server): ingest
//!   answers 503 saying so at once, `/healthz` and the metric give `refused`, and the log has
//!   the server's words and what to check, the pool's connection errors once per 10 s;
//! - the network to the PostgreSQL server goes silent (an address taken off the loopback
//!   interface: no reset, no answer): ingest answers 503 in bounded time, the node gives up the
//!   connections the silence holds, and accepts events soon after the network returns;
//! - the SMTP relay and the Keyfactor API are down or never answer: the deliveries that need
//!   them fail with the capability's error as the handler's reason (or the handler's timeout),
//!   are retried by the handler's policy, `/healthz` stays ok and other handlers keep
//!   delivering;
//! - nothing reads the engine's stderr any more (a hung log collector): ingest and deliveries
//!   carry on, the lines the log cannot hold are dropped and counted in `/metrics`, and every
//!   outcome keeps its handler's lines;
//! - the reader of the engine's stdout has gone before it prints its ready line there, or the
//!   reader of its stderr goes while it serves: it serves and delivers anyway.
//!
//! The disk tests mount a tmpfs or an ext4 image, which needs root (or CAP_SYS_ADMIN; the
//! image also a loop device and e2fsprogs' `mkfs.ext4`), and the silent-network
//! test changes the loopback interface's addresses (CAP_NET_ADMIN). Without them a test prints
//! `SKIPPED: <reason>` and passes — unless `JOBHOOK_REQUIRE_FAULTS=1`
//! (`scripts/test.sh` sets it when it runs as root), in which case it fails. The one exception:
//! a root without CAP_NET_ADMIN (a container that drops it) skips the silent-network test, and a
//! machine without loop devices the read-only file system test, saying so, since no
//! installation can give them. The PostgreSQL test
//! skips and fails the same way under `JOBHOOK_REQUIRE_POSTGRES`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jobhook_testkit::engine::EngineProcess;
use jobhook_testkit::exactly_once::{INVENTORY_TYPES, check_exactly_once};
use jobhook_testkit::memory::peak_rss_kib;
use jobhook_testkit::postgres::private_database_or_skip;
use jobhook_testkit::smtp::{FLOOD_CAP_BYTES, FLOOD_SLACK_BYTES, Flood, FloodingRelay, SmtpServer};
use jobhook_testkit::standin::Standin;
use jobhook_testkit::{guest, sample_context_json};
use serde_json::{Value, json};

/// Environment variable that turns "cannot mount a tmpfs" from a skip into a failure.
const REQUIRE_FAULTS_ENV: &str = "JOBHOOK_REQUIRE_FAULTS";

/// How long an event may take to settle once nothing stands in its way.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

fn engine_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_jobhook"))
}

/// `POST /v1/job-complete` with `body`: the status and the JSON answer.
async fn post_event(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client
        .post(format!("{url}/v1/job-complete"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `GET path`: the status and the body as text.
async fn get(client: &reqwest::Client, url: &str, path: &str) -> (u16, String) {
    let response = client
        .get(format!("{url}{path}"))
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

/// `/healthz` answers 200 with `status: ok` and no quarantined handler; gives what it says.
async fn assert_healthy(client: &reqwest::Client, url: &str) -> Value {
    let (status, text) = get(client, url, "/healthz").await;
    assert_eq!(status, 200, "{text}");
    let health: Value = serde_json::from_str(&text).expect("health JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["quarantined"], 0, "{health}");
    health
}

/// `/healthz` says the store did not take the latest event, for `reason`, and no more than the
/// reason's word: `/healthz` needs no token, and the store's own message names its paths.
async fn assert_store_refusing(client: &reqwest::Client, url: &str, reason: &str) {
    let health = assert_healthy(client, url).await;
    let store = &health["store"];
    assert_eq!(store["taking_events"], false, "{health}");
    assert_eq!(store["last_refusal"]["reason"], reason, "{health}");
    assert!(store["last_refusal"]["at"].is_string(), "{health}");
    assert_eq!(
        store["last_refusal"].as_object().map(|o| o.len()),
        Some(2),
        "{health}"
    );
}

/// Polls the event until no delivery is pending or running.
async fn settled(client: &reqwest::Client, engine: &EngineProcess, id: &str) -> Value {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let (status, text) = get(client, &engine.url, &format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "event {id}: {text}");
        let event: Value = serde_json::from_str(&text).expect("event JSON");
        let done = event["deliveries"].as_array().is_some_and(|ds| {
            ds.iter()
                .all(|d| d["state"] != "pending" && d["state"] != "running")
        });
        if done {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} did not settle: {event:#}\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Posts `body` as an event, asserts it is accepted (202), and returns it once settled.
async fn post_settled(client: &reqwest::Client, engine: &EngineProcess, body: &Value) -> Value {
    let (status, body) = post_event(client, &engine.url, body).await;
    assert_eq!(status, 202, "{body}");
    settled(client, engine, &event_id(&body)).await
}

/// Polls the event until `handler`'s delivery is terminal, whatever the others do.
async fn delivered(client: &reqwest::Client, url: &str, id: &str, handler: &str) -> Value {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let (status, text) = get(client, url, &format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "event {id}: {text}");
        let event: Value = serde_json::from_str(&text).expect("event JSON");
        let d = delivery(&event, handler);
        if d["state"] != "pending" && d["state"] != "running" {
            return d.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{handler} never finished event {id}: {event:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn delivery<'a>(event: &'a Value, handler: &str) -> &'a Value {
    event["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["handler"] == handler))
        .unwrap_or_else(|| panic!("no delivery for {handler}: {event:#}"))
}

fn event_id(body: &Value) -> String {
    body["event_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no event_id in {body}"))
        .to_owned()
}

/// A fault this machine cannot inject: `None` (the test is skipped) after printing why, or a
/// failure under `JOBHOOK_REQUIRE_FAULTS=1`.
fn cannot_inject<T>(reason: String) -> Option<T> {
    if std::env::var(REQUIRE_FAULTS_ENV).is_ok_and(|v| v == "1") {
        panic!("{REQUIRE_FAULTS_ENV}=1 but {reason}");
    }
    // Straight to the file descriptor: the harness captures a passing test's output.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
    None
}

// ---------------------------------------------------------------------------------------------
// Disk full under SQLite
// ---------------------------------------------------------------------------------------------

/// Size of the tmpfs that holds the data directory.
const TMPFS_SIZE: &str = "16m";

/// Room left on the tmpfs once the filler file is written: a few dozen events' worth of WAL
/// frames, so the test sees ingest succeed first and then fail as the space runs out.
const HEADROOM: u64 = 512 * 1024;

/// Most events posted while waiting for the disk to fill; far more than [`HEADROOM`] holds.
const MAX_POSTS: usize = 5000;

/// Events posted once space has returned, on top of the backlog.
const AFTER_RECOVERY: usize = 20;

/// A tmpfs mounted for one test, unmounted when dropped (lazily, if something still holds a
/// file on it).
struct Tmpfs {
    mount_point: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `at`, or returns `None` after printing why it cannot (failing
    /// instead under `JOBHOOK_REQUIRE_FAULTS=1`).
    fn mount_or_skip(at: &Path, size: &str) -> Option<Tmpfs> {
        match Self::mount(at, size) {
            Ok(tmpfs) => Some(tmpfs),
            Err(reason) => cannot_inject(reason),
        }
    }

    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("jobhook-faults")
            .arg(at)
            .output()
            .map_err(|e| format!("cannot mount a tmpfs: cannot run mount: {e}"))?;
        if output.status.success() {
            Ok(Tmpfs {
                mount_point: at.to_owned(),
            })
        } else {
            Err(format!(
                "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        unmount(&self.mount_point);
    }
}

/// Unmounts `mount_point`; lazily if something still holds a file on it.
fn unmount(mount_point: &Path) {
    let unmounted = Command::new("umount")
        .arg(mount_point)
        .status()
        .is_ok_and(|s| s.success());
    if !unmounted {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(mount_point)
            .status();
    }
}

/// What [`config_on_tmpfs`] set up. Keep it for as long as the engine runs: the tmpfs is
/// unmounted when it is dropped.
struct OnTmpfs {
    _tmpfs: Tmpfs,
    /// The tmpfs's mount point, `dir`/disk.
    disk: PathBuf,
    /// The store's data directory on it.
    data: PathBuf,
    /// `dir`/jobhook.toml.
    config: PathBuf,
}

/// Mounts a tmpfs of `size` on `dir`/disk and writes `dir`/jobhook.toml: the engine on a free
/// port, its store on the tmpfs, then what `rest` returns (asked once the tmpfs is mounted). `None` when no tmpfs can be mounted (the test is
/// skipped, see [`Tmpfs::mount_or_skip`]).
fn config_on_tmpfs(dir: &Path, size: &str, rest: impl FnOnce() -> String) -> Option<OnTmpfs> {
    let disk = dir.join("disk");
    std::fs::create_dir(&disk).expect("mount point");
    let tmpfs = Tmpfs::mount_or_skip(&disk, size)?;
    let data = disk.join("data");
    let config = dir.join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"{data}\"\n\n{rest}",
            data = data.display(),
            rest = rest()
        ),
    )
    .expect("config");
    Some(OnTmpfs {
        _tmpfs: tmpfs,
        disk,
        data,
        config,
    })
}

/// Writes `path` until the file system is full, then gives `headroom` bytes back.
fn fill_leaving(path: &Path, headroom: u64) {
    let mut file = std::fs::File::create(path).expect("create the filler file");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("cannot write the filler file: {e}"),
        }
    }
    file.set_len(written.saturating_sub(headroom))
        .expect("shorten the filler file");
}

/// An engine whose SQLite store is on a [`TMPFS_SIZE`] tmpfs, with `handlers` (TOML), and the
/// filler file that fills the disk but for [`HEADROOM`]. Fields drop in order: the engine is
/// killed before the tmpfs is unmounted.
struct NearlyFullDisk {
    engine: EngineProcess,
    filler: PathBuf,
    tmpfs: OnTmpfs,
}

/// Starts a [`NearlyFullDisk`] in `dir`; `None` when no tmpfs can be mounted (skipped, see
/// [`Tmpfs::mount_or_skip`]).
fn engine_on_a_nearly_full_disk(
    dir: &Path,
    handlers: impl FnOnce() -> String,
) -> Option<NearlyFullDisk> {
    let tmpfs = config_on_tmpfs(dir, TMPFS_SIZE, handlers)?;
    let engine = EngineProcess::start(engine_bin(), &tmpfs.config, &dir.join("engine.log"));
    let filler = tmpfs.disk.join("filler");
    fill_leaving(&filler, HEADROOM);
    Some(NearlyFullDisk {
        engine,
        filler,
        tmpfs,
    })
}

/// The ids of the events the SQLite store in `data` holds, read on a connection of its own.
fn stored_event_ids(data: &Path) -> Vec<String> {
    let database = rusqlite::Connection::open_with_flags(
        data.join("jobhook.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the database");
    database
        .prepare("SELECT id FROM events")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()
        })
        .expect("event ids")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_events_with_503_and_ingest_resumes_when_space_returns() {
    /// Events posted while the disk stays full, after the first refusal.
    const REFUSALS_WHILE_FULL: usize = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let handlers = || {
        format!(
            "[[handlers]]\nname = \"log\"\ncomponent = \"{log}\"\njob_types = [\"*\"]\n",
            log = guest("log-context").display()
        )
    };
    let Some(disk) = engine_on_a_nearly_full_disk(dir.path(), handlers) else {
        return;
    };
    let (engine, filler) = (&disk.engine, &disk.filler);
    let client = reqwest::Client::new();

    // Post until the store runs out of space.
    let mut accepted = Vec::new();
    let mut refusal = None;
    for _ in 0..MAX_POSTS {
        let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
        match status {
            202 => accepted.push(event_id(&body)),
            503 => {
                refusal = Some(body);
                break;
            }
            other => panic!("ingest answered {other}: {body}\n{}", engine.log_text()),
        }
    }
    let refusal = refusal.unwrap_or_else(|| {
        panic!(
            "{MAX_POSTS} events accepted on a {TMPFS_SIZE} tmpfs that was full but for \
             {HEADROOM} bytes; ingest never failed"
        )
    });
    assert!(
        !accepted.is_empty(),
        "no event fitted in {HEADROOM} bytes; the test did not see ingest work before the disk filled"
    );
    let reason = refusal["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not accepted") && reason.contains("out of disk space"),
        "the 503 must say the store is out of disk space: {refusal}"
    );
    assert_store_refusing(&client, &engine.url, "disk-full").await;
    // While the disk stays full: every further event is refused the same way (or, if SQLite
    // found room in pages it already had, accepted and then delivered like the others).
    let mut refused = 1;
    for _ in 0..REFUSALS_WHILE_FULL {
        let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
        match status {
            202 => accepted.push(event_id(&body)),
            503 => {
                assert_eq!(body, refusal);
                refused += 1;
            }
            other => panic!("ingest answered {other}: {body}"),
        }
    }
    assert_healthy(&client, &engine.url).await;
    let (_, metrics) = get(&client, &engine.url, "/metrics").await;
    let failures = |reason: &str| {
        jobhook_testkit::metric_value(
            &metrics,
            &format!("jobhook_ingest_store_failures_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(failures("disk-full") > 0.0, "{metrics}");
    assert!(
        engine
            .log_text()
            .contains("cannot commit an event: the store is out of disk space"),
        "{}",
        engine.log_text()
    );
    // The log tells of the refusals, not one line per refused request (clients resending
    // through an outage would decide how much the engine writes).
    let told = engine
        .log_text()
        .lines()
        .filter(|l| l.contains("cannot commit an event"))
        .count();
    if refused >= 3 {
        assert!(
            told <= 2,
            "{refused} refusals told in {told} lines:\n{}",
            engine.log_text()
        );
    }

    // Space returns: the next event is accepted, without a restart.
    std::fs::remove_file(filler).expect("remove the filler file");
    let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
    assert_eq!(status, 202, "{body}\n{}", engine.log_text());
    accepted.push(event_id(&body));
    for _ in 0..AFTER_RECOVERY {
        let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
        assert_eq!(status, 202, "{body}");
        accepted.push(event_id(&body));
    }
    // `/healthz` says the store takes events again, and still tells the last refusal.
    let health = assert_healthy(&client, &engine.url).await;
    assert_eq!(health["store"]["taking_events"], true, "{health}");
    assert_eq!(
        health["store"]["last_refusal"]["reason"], "disk-full",
        "{health}"
    );

    // Every event that got a 202 is delivered, once.
    for id in &accepted {
        let event = settled(&client, engine, id).await;
        let log = delivery(&event, "log");
        assert_eq!(log["state"], "succeeded", "{log:#}");
        let attempts = log["attempts"].as_array().expect("attempts");
        assert_eq!(
            attempts.iter().filter(|a| a["terminal"] == true).count(),
            1,
            "{log:#}"
        );
    }
    // ... and the store holds exactly those events: none that was answered 503.
    let mut stored = stored_event_ids(&disk.tmpfs.data);
    stored.sort();
    let mut answered = accepted.clone();
    answered.sort();
    assert_eq!(
        stored, answered,
        "the store holds exactly the accepted events"
    );
    println!(
        "{} events accepted ({} before the disk filled), all delivered",
        accepted.len(),
        accepted.len() - AFTER_RECOVERY - 1
    );
}

/// Events a second of the burst that fills the disk and goes on while space is freed: with
/// four handlers, enough claims and outcomes that the WAL takes freed space within a second
/// when nothing stops it.
const BURST_RATE: u32 = 200;

/// How long the burst lasts: the disk fills in its first seconds and is freed at
/// [`BURST_FREE_AT`], and it goes on for a few seconds after that, writing far less than the
/// freed space holds.
const BURST_SECONDS: f64 = 10.0;

/// When, after the disk is found full, the filler is removed (the burst going on).
const BURST_FREE_AT: Duration = Duration::from_secs(3);

/// A burst that goes on while space is freed on a full disk does not fill it again with the
/// store's own WAL: the writes wait until the WAL is copied and its space given back, then go
/// on. Before, the first commits after the space returned took it for the WAL, no checkpoint
/// ever found room again, and ingest answered 503 for good (seen 60 s after the burst ended).
/// Every event answered 202, by the driver or here, is in the store and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn space_freed_during_a_burst_is_not_taken_back_by_the_stores_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handlers = || {
        (1..=4)
            .map(|n| {
                format!(
                    "[[handlers]]\nname = \"log{n}\"\ncomponent = \"{log}\"\njob_types = [\"*\"]\n",
                    log = guest("log-context").display()
                )
            })
            .collect::<String>()
    };
    let Some(disk) = engine_on_a_nearly_full_disk(dir.path(), handlers) else {
        return;
    };
    let (engine, filler) = (&disk.engine, &disk.filler);
    let client = reqwest::Client::new();
    let record = dir.path().join("accepted.txt");
    let driver = load_driver(&engine.url, &record, BURST_RATE, BURST_SECONDS);

    // The burst meets the full disk (a 503 for anything else does not count).
    let deadline = Instant::now() + Duration::from_secs_f64(BURST_SECONDS);
    loop {
        let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
        match status {
            503 if body["error"]
                .as_str()
                .is_some_and(|e| e.contains("out of disk space")) =>
            {
                break;
            }
            202 | 503 => {}
            other => panic!("ingest answered {other}: {body}"),
        }
        assert!(Instant::now() < deadline, "the disk never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(BURST_FREE_AT).await;
    std::fs::remove_file(filler).expect("remove the filler file");
    let report = tokio::task::spawn_blocking(move || driver.join().expect("driver"))
        .await
        .expect("join");
    assert!(
        report.contains("\"accepted\""),
        "the load driver failed: {report}"
    );

    // The burst is over; the freed space is far more than it wrote since: events are accepted.
    let mut accepted = Vec::new();
    for _ in 0..AFTER_RECOVERY {
        let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
        assert_eq!(
            status,
            202,
            "{body} after the space was freed (driver: {report})\n{}",
            engine.log_text()
        );
        accepted.push(event_id(&body));
    }
    // The writer held writes back and let them go once the WAL was copied.
    let log = engine.log_text();
    assert!(
        log.contains("no write is tried until its WAL has been copied")
            && log.contains("writing again"),
        "{log}"
    );
    for id in &accepted {
        let event = settled(&client, engine, id).await;
        for n in 1..=4 {
            assert_eq!(delivery(&event, &format!("log{n}"))["state"], "succeeded");
        }
    }
    // Nothing the driver was told is kept was lost.
    let recorded = std::fs::read_to_string(&record).expect("accepted ids");
    let stored: std::collections::HashSet<String> =
        stored_event_ids(&disk.tmpfs.data).into_iter().collect();
    let missing: Vec<&str> = recorded
        .lines()
        .filter(|id| !id.trim().is_empty() && !stored.contains(id.trim()))
        .collect();
    assert!(missing.is_empty(), "accepted but not stored: {missing:?}");
    println!(
        "driver: {report}; {} events accepted after the burst",
        accepted.len()
    );
}

/// A data directory on a file system mounted read-only: `serve` refuses to start saying so in
/// the system's words, not SQLite's "unable to open database file".
#[test]
fn a_data_directory_on_a_read_only_mount_is_refused_in_plain_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(tmpfs) = config_on_tmpfs(dir.path(), "4m", String::new) else {
        return;
    };
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&tmpfs.data)
        .expect("data directory");
    let remounted = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&tmpfs.disk)
        .status()
        .expect("run mount");
    assert!(remounted.success(), "cannot remount the tmpfs read-only");
    let output = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["serve", "--config"])
        .arg(&tmpfs.config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run jobhook serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("the data directory is not writable (Read-only file system"),
        "{stderr}"
    );
}

/// The user `serve` runs as in [`store_files_another_user_left_are_refused_naming_the_file`]
/// when the test runs as root: `nobody`, whom no file of the test belongs to.
const OTHER_UID: u32 = 65534;

/// A store whose files the engine's user may not write — left by an engine run once as another
/// user (root, by hand) before the service ran as its own — is refused at the start naming the
/// file, its owner and mode, and what to do, not with SQLite's "attempt to write a readonly
/// database" or "unable to open database file" without a path: the database itself, then a
/// write-ahead log a killed run left behind. As root, `serve` runs as [`OTHER_UID`] (root may
/// write any file); otherwise as the test's user, on files made read-only.
#[test]
fn store_files_another_user_left_are_refused_naming_the_file() {
    use std::os::unix::fs::{PermissionsExt as _, chown};
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    drop(jobhook::queue::store::sqlite::SqliteStore::open(&data).expect("a store"));
    let database = data.join("jobhook.sqlite");
    let wal = data.join("jobhook.sqlite-wal");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"{}\"\n",
            data.display()
        ),
    )
    .expect("config");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    if root {
        // The engine's user owns its directories; the files stay root's.
        for owned in [dir.path(), &data, &config] {
            chown(owned, Some(OTHER_UID), Some(OTHER_UID)).expect("chown");
        }
    } else {
        chmod(&database, 0o444);
    }
    let serve = || {
        let mut command = Command::new(engine_bin());
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG");
        if root {
            command.uid(OTHER_UID).gid(OTHER_UID);
        }
        let output = command.output().expect("run jobhook serve");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{stderr}");
        stderr
    };
    let engine_uid = if root {
        OTHER_UID
    } else {
        unsafe { libc::geteuid() }
    };
    let expected = |path: &Path, owner: u32, mode: u32| {
        format!(
            "{} belongs to uid {owner} and has mode {mode:03o}: this user (uid {engine_uid}) may \
             not read and write it",
            path.display()
        )
    };
    let owner = if root { 0 } else { engine_uid };
    let mode = std::fs::metadata(&database)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    let stderr = serve();
    assert!(
        stderr.contains(&expected(&database, owner, mode)),
        "{stderr}"
    );
    assert!(
        stderr.contains("`chown` the data directory and everything in it to that user"),
        "{stderr}"
    );

    // The database is the engine's user's again; a write-ahead log of a run as the other user
    // is left.
    std::fs::write(&wal, b"").expect("a left write-ahead log");
    if root {
        chown(&database, Some(OTHER_UID), Some(OTHER_UID)).expect("chown");
        chmod(&wal, 0o644);
    } else {
        chmod(&database, 0o600);
        chmod(&wal, 0o444);
    }
    let mode = std::fs::metadata(&wal).expect("stat").permissions().mode() & 0o7777;
    let stderr = serve();
    assert!(stderr.contains(&expected(&wal, owner, mode)), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// A file system that turns read-only under SQLite
// ---------------------------------------------------------------------------------------------

/// Size of the ext4 image the data directory is on.
const EXT4_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// An ext4 file system in an image file, mounted through a loop device with
/// `errors=remount-ro` for one test; unmounted when dropped (which frees its loop device).
struct Ext4Image {
    mount_point: PathBuf,
    /// The loop device's name (`loop3`): its entry under `/sys/fs/ext4`.
    device: String,
}

impl Ext4Image {
    /// Mounts a fresh image on `dir`/disk, or returns `None` after printing why it cannot
    /// (failing instead under `JOBHOOK_REQUIRE_FAULTS=1`, unless the machine has no loop
    /// devices at all, which no installation gives it).
    fn mount_or_skip(dir: &Path) -> Option<Ext4Image> {
        if !Path::new("/dev/loop-control").exists() {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: this machine has no loop devices (/dev/loop-control)"
            );
            return None;
        }
        match Self::mount(dir) {
            Ok(image) => Some(image),
            Err(reason) => cannot_inject(reason),
        }
    }

    fn mount(dir: &Path) -> Result<Ext4Image, String> {
        let run = |program: &str, args: &[&std::ffi::OsStr]| -> Result<(), String> {
            let output = Command::new(program)
                .args(args)
                .output()
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{program} failed (an ext4 image needs root and e2fsprogs): {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        };
        let image = dir.join("ext4.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(EXT4_IMAGE_BYTES))
            .map_err(|e| format!("cannot create the image file: {e}"))?;
        run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
        )?;
        let mount_point = dir.join("disk");
        std::fs::create_dir(&mount_point).map_err(|e| format!("mount point: {e}"))?;
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop,errors=remount-ro".as_ref(),
                image.as_os_str(),
                mount_point.as_os_str(),
            ],
        )?;
        // The mount's source, `/dev/loopN`, from the kernel's table of mounts.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let device = mounts.lines().find_map(|line| {
            let mut fields = line.split(' ');
            let source = fields.next()?;
            (fields.next()? == mount_point.to_str()?)
                .then(|| source.strip_prefix("/dev/"))
                .flatten()
                .map(str::to_owned)
        });
        let image = Ext4Image {
            mount_point,
            device: device.unwrap_or_default(),
        };
        if image.device.is_empty() {
            return Err("the ext4 image is mounted, but not from a /dev/loop device".into());
        }
        Ok(image)
    }

    /// Makes ext4 meet an error of its own (`trigger_fs_error`, the kernel's hook for testing
    /// this): with `errors=remount-ro`, the file system takes no more writes from then on.
    fn fail(&self) {
        std::fs::write(
            format!("/sys/fs/ext4/{}/trigger_fs_error", self.device),
            "jobhook test\n",
        )
        .expect("trigger an ext4 error");
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        unmount(&self.mount_point);
    }
}

/// A read transaction held open on the SQLite store from another connection: while it lasts,
/// no checkpoint can copy what was committed after it began.
struct SnapshotReader(rusqlite::Connection);

impl SnapshotReader {
    fn open(database: &Path) -> Self {
        let reader = rusqlite::Connection::open_with_flags(
            database,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the database");
        // A deferred transaction takes its snapshot at its first read.
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM events;")
            .expect("begin a read");
        Self(reader)
    }

    /// Ends the read: the checkpointer may copy everything from here on.
    fn end(self) {
        self.0.execute_batch("ROLLBACK").expect("end the read");
    }
}

/// Posts events until one is not accepted, for at most `bound` (a store turning read-only may
/// let a few through first), and checks that it was refused with 503 saying the store takes
/// no writes.
async fn refused_as_read_only_within(
    client: &reqwest::Client,
    engine: &EngineProcess,
    bound: Duration,
) {
    let since = Instant::now();
    let (status, body) = loop {
        let (status, body) = post_event(client, &engine.url, &sample_context_json()).await;
        if status != 202 || since.elapsed() > bound {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 503, "{body}\n{}", engine.log_text());
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("the store takes no writes (read-only)"),
        "{body}"
    );
}

/// A file system that turns read-only while the engine runs (ext4 after an error of its own,
/// `errors=remount-ro`): SQLite meets `EROFS` as an I/O error. Ingest is refused with 503 as
/// for any store that takes no writes (reason `read-only`), the log says what to mend, health
/// and event reads keep answering from what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_system_turned_read_only_under_the_store_is_refused_in_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(disk) = Ext4Image::mount_or_skip(dir.path()) else {
        return;
    };
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"{}\"\n",
            disk.mount_point.join("data").display()
        ),
    )
    .expect("config");
    let engine = EngineProcess::start(engine_bin(), &config, &dir.path().join("engine.log"));
    let client = reqwest::Client::new();
    // A reader's snapshot taken before the first event (an operator's `sqlite3` session) keeps
    // the checkpointer from copying that event into the database file: when the file system
    // fails, the checkpointer still has work, and fails at it, whenever it happens to look.
    // Without it the checkpointer may have copied everything and gone quiet first (nothing to
    // copy is no failure), and whether it had would be a race.
    let reader = SnapshotReader::open(&disk.mount_point.join("data").join("jobhook.sqlite"));
    let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
    assert_eq!(status, 202, "{body}");
    let kept = event_id(&body);

    disk.fail();
    // The kernel takes the file system's writes away as it handles the error: an event it
    // let through first was stored, and is answered 202.
    refused_as_read_only_within(&client, &engine, Duration::from_secs(5)).await;
    reader.end();
    let log = engine.log_text();
    assert!(
        log.contains("the file system holding the store has become read-only"),
        "{log}"
    );
    // The checkpointer, failing beside the writer, says the same instead of SQLite's "disk I/O
    // error" alone. Its first failure may come while the kernel is still handling the error,
    // before it marks the file system read-only (then it can only say "disk I/O error"); its
    // next warning, a second later (`CHECKPOINT_WARNING_INTERVAL`), names it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = engine.log_text();
        let said = log.lines().any(|line| {
            line.contains("cannot checkpoint the store's WAL")
                && line.contains("the file system holding the store has become read-only")
        });
        if said {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint failure named the read-only file system: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = get(&client, &engine.url, "/metrics").await;
    let refused = jobhook_testkit::metric_value(
        &metrics,
        "jobhook_ingest_store_failures_total{reason=\"read-only\"}",
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{metrics}");
    // Refused again, the same way, for as long as it lasts; what was stored is read.
    let (status, _) = post_event(&client, &engine.url, &sample_context_json()).await;
    assert_eq!(status, 503);
    assert_store_refusing(&client, &engine.url, "read-only").await;
    let (status, text) = get(&client, &engine.url, &format!("/v1/events/{kept}")).await;
    assert_eq!(status, 200, "{text}");
    drop(engine);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL frozen
// ---------------------------------------------------------------------------------------------

/// A PostgreSQL server that stops answering without closing anything (SIGSTOP: a paused VM, a
/// storage stall): ingest answers 503 within the commit timeout, saying the store did not
/// answer, for as long as it lasts; `/healthz` keeps answering; once the server runs again,
/// events are accepted without a restart.
#[test]
fn a_frozen_postgres_server_is_answered_with_503_in_bounded_time_and_ingest_resumes() {
    let Some((db, _dir, engine)) = engine_on_private_postgres() else {
        return;
    };
    let (runtime, client) = accepting(&engine);

    db.server().freeze().expect("freeze PostgreSQL");
    let thaw = Thaw(&db);
    // More requests than the store has connections: each is answered, in bounded time.
    runtime.block_on(each_refused_in_bounded_time(&client, &engine));
    runtime.block_on(assert_store_refusing(&client, &engine.url, "timeout"));
    let (_, metrics) = runtime.block_on(get(&client, &engine.url, "/metrics"));
    // Nothing refused the engine: every refusal says the store did not answer, whether the
    // commit or the wait for a pooled connection ran out first.
    let failures = |reason: &str| {
        jobhook_testkit::metric_value(
            &metrics,
            &format!("jobhook_ingest_store_failures_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(failures("timeout") > 0.0, "{metrics}");
    assert_eq!(failures("unreachable"), 0.0, "{metrics}");

    drop(thaw);
    accepts_again(&runtime, &client, &engine, "the thaw");
    engine.kill();
}

/// Thaws a frozen test server when dropped, whatever happened meanwhile, so that it can be
/// stopped and deleted.
struct Thaw<'a>(&'a jobhook_testkit::postgres::TestDatabase);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        let _ = self.0.server().thaw();
    }
}

/// Longest SIGTERM may take to end an engine whose store stopped answering: the connections'
/// drain and the deliveries' grace (`shutdown_grace`, 10 s each by default, here with nothing to
/// wait for), the store's wind-down ([`jobhook::app::server::STORE_WIND_DOWN`]), a second for
/// blocking calls, and a margin for a loaded machine.
const FROZEN_SHUTDOWN_BOUND: Duration = Duration::from_secs(45);

/// A PostgreSQL server frozen while the node sits idle (its pooled sessions unused, as between
/// events): `/metrics` still answers within the store read timeout, with the engine's own
/// counters and without the delivery-state series (unknown is not zero); reading an event is
/// answered 503; SIGTERM ends the process. None of them waits for the server: each used to
/// wait, on the check of an idle pooled session, until the server ran again.
#[test]
fn a_frozen_postgres_server_holds_neither_metrics_nor_event_reads_nor_shutdown() {
    use jobhook::queue::store::STORE_READ_TIMEOUT;
    let Some((db, _dir, engine)) = engine_on_private_postgres() else {
        return;
    };
    let (runtime, client, id) = accepted_one(&engine);
    runtime.block_on(settled(&client, &engine, &id));
    let (_, metrics) = runtime.block_on(get(&client, &engine.url, "/metrics"));
    assert!(
        metrics.contains("jobhook_deliveries_in_state{"),
        "the delivery states while the store answers:\n{metrics}"
    );
    // Longer than a pooled session is trusted without a check after its last answer.
    std::thread::sleep(Duration::from_secs(1));

    db.server().freeze().expect("freeze PostgreSQL");
    let thaw = Thaw(&db);
    let bound = STORE_READ_TIMEOUT + REFUSAL_MARGIN;
    let began = Instant::now();
    let (status, metrics) = runtime.block_on(get(&client, &engine.url, "/metrics"));
    let took = began.elapsed();
    assert!(took < bound, "/metrics took {took:?} (bound {bound:?})");
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics.contains("jobhook_events_accepted_total"),
        "the engine's own counters:\n{metrics}"
    );
    assert!(
        !metrics.contains("jobhook_deliveries_in_state{"),
        "no delivery-state series while the store cannot say:\n{metrics}"
    );
    let began = Instant::now();
    let (status, text) = runtime.block_on(get(&client, &engine.url, &format!("/v1/events/{id}")));
    let took = began.elapsed();
    assert!(
        took < bound,
        "reading an event took {took:?} (bound {bound:?})"
    );
    assert_eq!(status, 503, "{text}");

    let began = Instant::now();
    let log = engine.log.clone();
    let exited = engine.terminate(FROZEN_SHUTDOWN_BOUND);
    assert!(
        exited.is_some(),
        "SIGTERM did not end the engine within {FROZEN_SHUTDOWN_BOUND:?} while its store was \
         frozen; its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    println!(
        "stopped {:?} after SIGTERM with the store frozen",
        began.elapsed()
    );
    drop(thaw);
}

/// A runtime and a client for `engine`, once it has accepted one event (so its store is in
/// use before a fault is injected).
fn accepting(engine: &EngineProcess) -> (tokio::runtime::Runtime, reqwest::Client) {
    let (runtime, client, _) = accepted_one(engine);
    (runtime, client)
}

/// [`accepting`], and the id of the event it accepted.
fn accepted_one(engine: &EngineProcess) -> (tokio::runtime::Runtime, reqwest::Client, String) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let (status, body) = runtime.block_on(post_event(&client, &engine.url, &sample_context_json()));
    assert_eq!(status, 202, "{body}");
    let id = event_id(&body);
    (runtime, client, id)
}

/// Posts events until one is accepted, failing if none is within [`RECONNECT_BOUND`] after
/// `what` (the fault's end, just now).
fn accepts_again(
    runtime: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    engine: &EngineProcess,
    what: &str,
) {
    let deadline = Instant::now() + RECONNECT_BOUND;
    loop {
        let (status, body) =
            runtime.block_on(post_event(client, &engine.url, &sample_context_json()));
        if status == 202 {
            // `/healthz` says so too.
            let health = runtime.block_on(assert_healthy(client, &engine.url));
            assert_eq!(health["store"]["taking_events"], true, "{health}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not accepting events {RECONNECT_BOUND:?} after {what}: {status} {body}\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Slack on an answer's bound for a loaded machine.
const REFUSAL_MARGIN: Duration = Duration::from_secs(3);

/// Posts twelve events at once (more than the store's pool has connections) to an engine whose
/// PostgreSQL server does not answer: each is refused with 503, saying the store did not answer
/// or cannot be reached, within the ingest commit timeout plus [`REFUSAL_MARGIN`].
async fn each_refused_in_bounded_time(client: &reqwest::Client, engine: &EngineProcess) {
    use jobhook::sources::api::INGEST_COMMIT_TIMEOUT;
    let posts = (0..12).map(|_| async {
        let began = Instant::now();
        let answer = post_event(client, &engine.url, &sample_context_json()).await;
        (answer, began.elapsed())
    });
    for ((status, body), took) in futures_util::future::join_all(posts).await {
        assert_eq!(status, 503, "{body}\n{}", engine.log_text());
        let reason = body["error"].as_str().unwrap_or_default();
        assert!(
            reason.contains("did not answer in time") || reason.contains("cannot be reached"),
            "{body}"
        );
        assert!(
            took < INGEST_COMMIT_TIMEOUT + REFUSAL_MARGIN,
            "answered after {took:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The network to PostgreSQL goes silent
// ---------------------------------------------------------------------------------------------

/// The address the engine reaches PostgreSQL on in the silent-network test: from TEST-NET-1
/// (RFC 5737), which no real network uses, added to the loopback interface for the test.
const SILENT_ADDRESS: &str = "192.0.2.77";

/// An address on the loopback interface that a test can take away and give back. While it is
/// away, what is sent to it goes nowhere and nothing answers, not even a reset: what a
/// client sees when the server's host loses power or a firewall starts dropping everything.
/// Removed when dropped.
struct SilentAddress {
    address: &'static str,
}

impl SilentAddress {
    /// Adds `address` to the loopback interface, or `None` (see [`cannot_inject`]) when this
    /// machine does not allow it (needs root or CAP_NET_ADMIN).
    fn add_or_skip(address: &'static str) -> Option<Self> {
        if !has_net_admin() {
            // A container without the capability, even as root: a property of the machine,
            // said as loudly as any skip, not a broken installation to fail on.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: this process lacks CAP_NET_ADMIN, needed to take an address off the \
                 loopback interface"
            );
            return None;
        }
        // Left over from a run that was killed: take it away first.
        let _ = Self::ip("del", address);
        match Self::ip("add", address) {
            Ok(()) => Some(SilentAddress { address }),
            Err(reason) => cannot_inject(format!(
                "cannot add an address to the loopback interface (needs root or \
                 CAP_NET_ADMIN): {reason}"
            )),
        }
    }

    /// Takes the address away: from now on, nothing sent to it is answered.
    fn silence(&self) {
        Self::ip("del", self.address).expect("take the address away");
    }

    /// Gives the address back.
    fn restore(&self) {
        Self::ip("add", self.address).expect("give the address back");
    }

    fn ip(verb: &str, address: &str) -> Result<(), String> {
        let output = Command::new("ip")
            .args(["addr", verb, &format!("{address}/32"), "dev", "lo"])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }
}

impl Drop for SilentAddress {
    fn drop(&mut self) {
        let _ = Self::ip("del", self.address);
    }
}

/// Whether this process may change network interfaces (CAP_NET_ADMIN, bit 12 of the effective
/// capabilities in /proc/self/status).
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// A relay the test steers: while `holding` is set, what the server sends is kept back (read,
/// not passed on, until it is cleared), so what the node sent is acknowledged and its answer is
/// on the way when the network goes silent.
struct Relay {
    port: u16,
    holding: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn hold_answers(&self, hold: bool) {
        self.holding
            .store(hold, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Passes every connection to `address`:any port on to `to`, byte for byte, on a runtime of
/// its own (see [`Relay`]).
fn relay(runtime: &tokio::runtime::Runtime, address: &str, to: std::net::SocketAddr) -> Relay {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((address, 0)))
        .expect("relay listener");
    let port = listener.local_addr().expect("relay address").port();
    let holding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hold = holding.clone();
    runtime.spawn(async move {
        while let Ok((from, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut from_read, mut from_write) = from.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_read, &mut server_write).await;
            });
            let hold = hold.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                    while hold.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if from_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Relay { port, holding }
}

/// How long the network stays silent: past the limit on unacknowledged data, so the node has
/// given up its connections by the time the network returns.
fn silent_for() -> Duration {
    jobhook::queue::store::postgres::UNACKNOWLEDGED_LIMIT + Duration::from_secs(5)
}

/// The network between the node and its PostgreSQL server goes silent (no reset, no answer)
/// for longer than [`UNACKNOWLEDGED_LIMIT`](jobhook::queue::store::postgres::UNACKNOWLEDGED_LIMIT),
/// just after the server's host acknowledged the node's requests and before its answers got
/// back: ingest answers 503 in bounded time meanwhile, and once the network is back the node
/// accepts events within [`RECONNECT_BOUND`], because it gave up the connections the silence
/// held — both those that sent into it and those waiting on an answer with nothing of theirs
/// unacknowledged. Without the limit, the first stay stuck until the kernel's next
/// retransmission gets through (about 18 s after a 35 s silence, minutes after longer ones);
/// without the keepalive probes, the second wait until the server's retransmission does (about
/// 16 s after it), and the pool's connection threads with them.
#[test]
fn a_postgres_network_gone_silent_is_given_up_and_the_node_reconnects_when_it_returns() {
    let Some(silent) = SilentAddress::add_or_skip(SILENT_ADDRESS) else {
        return;
    };
    let Some(db) = private_database_or_skip() else {
        return;
    };
    let relays = tokio::runtime::Runtime::new().expect("relay runtime");
    let server: std::net::SocketAddr = ([127, 0, 0, 1], db.server().port()).into();
    let relay = relay(&relays, SILENT_ADDRESS, server);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("db-password"), &db.password).expect("password file");
    let config = pg_config(&db).replace(
        &format!("127.0.0.1:{}", db.server().port()),
        &format!("{SILENT_ADDRESS}:{}", relay.port),
    );
    assert!(config.contains(SILENT_ADDRESS), "{config}");
    let config_path = dir.path().join("jobhook.toml");
    std::fs::write(&config_path, config).expect("config");
    let engine = EngineProcess::start(engine_bin(), &config_path, &dir.path().join("engine.log"));
    let (runtime, client) = accepting(&engine);

    // Requests that each take a pooled connection (or start one) into the silence; the server
    // answers the first of them, and the answers are lost with the network.
    relay.hold_answers(true);
    let silenced = std::thread::scope(|scope| {
        let silencing = scope.spawn(|| {
            // Long enough for the requests to reach the server, well short of ingest's timeout.
            std::thread::sleep(ANSWERS_ON_THE_WAY);
            silent.silence();
            let silenced = Instant::now();
            relay.hold_answers(false);
            silenced
        });
        runtime.block_on(each_refused_in_bounded_time(&client, &engine));
        silencing.join().expect("silencing thread")
    });
    runtime.block_on(assert_healthy(&client, &engine.url));
    std::thread::sleep(silent_for().saturating_sub(silenced.elapsed()));

    silent.restore();
    accepts_again(&runtime, &client, &engine, "the network returned");
    engine.kill();
}

/// How long after the requests start the network goes silent (see the test above).
const ANSWERS_ON_THE_WAY: Duration = Duration::from_secs(1);

/// Longest `serve` may take to give up on a database address that accepts connections and
/// never answers: the connect timeout (5 s) and the start-up exchange's limit (5 s), plus a
/// margin for a loaded machine.
const UNANSWERED_START_BOUND: Duration = Duration::from_secs(25);

/// A `[store] url` whose address accepts connections and then says nothing (a frozen server, a
/// balancer in front of a dead one): `serve` stops with an error saying so within its bound,
/// instead of waiting for good without ever listening (seen: still waiting after 25 s). The
/// pool's connections and the leadership session are made the same way.
#[test]
fn a_postgres_address_that_never_answers_stops_the_start_with_an_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("address").port();
    // Accepts every connection and keeps it open, silent.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for socket in listener.incoming().flatten() {
            held.push(socket);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\n\
             kind = \"postgres\"\nurl = \"postgres://jobhook@127.0.0.1:{port}/jobhook\"\ndata_dir = \"data\"\n\n\
             [[handlers]]\nname = \"log\"\ncomponent = \"{log}\"\njob_types = [\"*\"]\n",
            log = guest("log-context").display()
        ),
    )
    .expect("config");
    let began = Instant::now();
    let mut child = Command::new(engine_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the engine");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if began.elapsed() > UNANSWERED_START_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve was still waiting for the database {UNANSWERED_START_BOUND:?} after it \
                 started"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read as _;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("did not finish setting up a connection"),
        "the error says what happened:\n{stderr}"
    );
    println!("serve gave up after {:?}", began.elapsed());
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL restarted under load
// ---------------------------------------------------------------------------------------------

/// A short lease, so that deliveries whose outcome could not be recorded while the server was
/// down are taken back soon after it returns.
const PG_LEASE_MS: u64 = 2000;

/// Events per second the load driver posts, and for how long.
const PG_RATE: u32 = 60;
const PG_SECONDS: f64 = 9.0;

/// How long after the load starts the server is stopped, and how long it stays down.
const PG_STOP_AFTER: Duration = Duration::from_secs(2);
const PG_DOWN_FOR: Duration = Duration::from_secs(3);

/// Longest an ingest request may take to be refused while the server is down: the store's pool
/// waits `POOL_WAIT` (4 s) for a connection, plus a margin for a loaded machine.
const REFUSAL_BOUND: Duration = Duration::from_secs(8);

/// Longest the node may take to accept events again once the server accepts connections: the
/// pool connects anew on the next call, and waits at most `POOL_WAIT` (4 s) for it; plus a
/// margin.
const RECONNECT_BOUND: Duration = Duration::from_secs(10);

fn pg_config(db: &jobhook_testkit::postgres::TestDatabase) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
# The load driver is one address with up to 256 requests in flight while the database is down
# (each waits for a connection): above the default per-client cap, which is for many senders.
max_connections_per_client = 512

{store}
[engine]
max_concurrent_deliveries = 16

[[handlers]]
name = "probe"
component = "{probe}"
job_types = ["*"]
properties = {{ SleepMs = "50" }}

[[handlers]]
name = "inventory"
component = "{probe}"
job_types = ["{a}", "{b}"]

[[handlers]]
name = "log"
component = "{log}"
job_types = ["*"]
"#,
        store = db.store_section(PG_LEASE_MS, "data"),
        probe = guest("guest-attempt-probe").display(),
        log = guest("log-context").display(),
        a = INVENTORY_TYPES[0],
        b = INVENTORY_TYPES[1],
    )
}

/// An engine on a PostgreSQL server of its own ([`pg_config`]), with the directory holding its
/// configuration; `None` (skipped) without PostgreSQL.
fn engine_on_private_postgres() -> Option<(
    jobhook_testkit::postgres::TestDatabase,
    tempfile::TempDir,
    EngineProcess,
)> {
    engine_on_private_postgres_with(pg_config)
}

/// An engine on a PostgreSQL server of its own, configured by `config` (given the database),
/// with the directory holding its configuration; `None` (skipped) without PostgreSQL.
fn engine_on_private_postgres_with(
    config: impl FnOnce(&jobhook_testkit::postgres::TestDatabase) -> String,
) -> Option<(
    jobhook_testkit::postgres::TestDatabase,
    tempfile::TempDir,
    EngineProcess,
)> {
    let db = private_database_or_skip()?;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("db-password"), &db.password).expect("password file");
    let path = dir.path().join("jobhook.toml");
    std::fs::write(&path, config(&db)).expect("config");
    let engine = EngineProcess::start(engine_bin(), &path, &dir.path().join("engine.log"));
    Some((db, dir, engine))
}

/// A load driver (`jobhook_dev::loadgen`) on a thread of its own, posting to `url` at `rate`
/// events/s for `seconds` without resending and recording accepted event ids in `record`;
/// joining it gives its report.
fn load_driver(
    url: &str,
    record: &Path,
    rate: u32,
    seconds: f64,
) -> std::thread::JoinHandle<String> {
    let options = jobhook_dev::loadgen::LoadOptions {
        url: url.to_owned(),
        rate,
        duration: Duration::from_secs_f64(seconds),
        token: None,
        record: Some(record.to_owned()),
        seed: 11,
        resend: false,
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

#[test]
fn a_postgres_restart_under_load_is_refused_with_503_and_the_node_reconnects_by_itself() {
    let Some((db, dir, engine)) = engine_on_private_postgres() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    let record = dir.path().join("accepted.txt");
    let driver = load_driver(&engine.url, &record, PG_RATE, PG_SECONDS);

    std::thread::sleep(PG_STOP_AFTER);
    db.server().stop_fast().expect("stop PostgreSQL");
    let stopped = Instant::now();

    // While it is down: ingest answers 503 naming the store's database, in bounded time.
    let began = Instant::now();
    let (status, body) = runtime.block_on(post_event(&client, &engine.url, &sample_context_json()));
    let refused_in = began.elapsed();
    assert_eq!(status, 503, "{body}\n{}", engine.log_text());
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("the store's database cannot be reached"),
        "{body}"
    );
    assert!(
        refused_in < REFUSAL_BOUND,
        "refused after {refused_in:?}, more than {REFUSAL_BOUND:?}"
    );
    runtime.block_on(assert_healthy(&client, &engine.url));

    std::thread::sleep(PG_DOWN_FOR.saturating_sub(stopped.elapsed()));
    db.server().start_again().expect("start PostgreSQL again");
    let up = Instant::now();

    // The node connects again by itself: the next events are accepted.
    let mut probes = Vec::new();
    loop {
        let (status, body) =
            runtime.block_on(post_event(&client, &engine.url, &sample_context_json()));
        if status == 202 {
            probes.push(event_id(&body));
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            up.elapsed() < RECONNECT_BOUND,
            "still refused {:?} after PostgreSQL came back: {body}\n{}",
            up.elapsed(),
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let reconnected_in = up.elapsed();
    let (_, metrics) = runtime.block_on(get(&client, &engine.url, "/metrics"));
    let unreachable = jobhook_testkit::metric_value(
        &metrics,
        "jobhook_ingest_store_failures_total{reason=\"unreachable\"}",
    );
    assert!(unreachable.is_some_and(|n| n > 0.0), "{metrics}");

    let report = driver.join().expect("load driver");
    let parsed: Value = serde_json::from_str(report.trim())
        .unwrap_or_else(|e| panic!("driver report {report:?}: {e}"));
    assert!(
        parsed["rejected"].as_u64().unwrap_or(0) > 0,
        "no request of the load driver was refused while PostgreSQL was down: {report}"
    );
    assert_eq!(
        parsed["errors"], 0,
        "a request hung past the driver's timeout or lost its connection: {report}"
    );
    let mut accepted: Vec<String> = std::fs::read_to_string(&record)
        .expect("accepted ids")
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(accepted.len() > 100, "too few events accepted: {report}");
    accepted.extend(probes);
    let reruns = check_exactly_once(&engine.url, &accepted, Duration::from_secs(120));
    let log = engine.log_text();
    assert!(
        log.contains("cannot commit an event: the store's database cannot be reached"),
        "{log}"
    );
    println!(
        "PostgreSQL down for {PG_DOWN_FOR:?}: refused in {refused_in:?}, accepting again \
         {reconnected_in:?} after it came back; {} events checked, {reruns} deliveries re-run; \
         driver: {report}",
        accepted.len()
    );
}

/// How long, at most, ingest takes to answer once the PostgreSQL server has refused the pool's
/// latest attempt to connect and the pool holds no connection: the store's wait for a
/// connection then (`REFUSED_POOL_WAIT`, 0.5 s) and the request's own round trip, well short of
/// the 4 s the pool waits when the server may yet answer.
const REFUSED_ANSWER_BOUND: Duration = Duration::from_secs(2);

/// A PostgreSQL server that refuses the engine once its sessions are gone — the role's password
/// changed on the server and not yet in `[store] password` — is told as refused, not as out of
/// reach: ingest answers 503 saying the server refused the engine's connection, without the
/// whole wait for a connection; `/healthz` and the ingest metric give `refused`; the engine's
/// log carries the server's words and what to check.
#[test]
fn a_postgres_server_that_refuses_the_engine_is_told_as_refused_in_its_words() {
    let Some((db, _dir, engine)) = engine_on_private_postgres() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    let (status, body) = runtime.block_on(post_event(&client, &engine.url, &sample_context_json()));
    assert_eq!(status, 202, "{body}\n{}", engine.log_text());

    let role = jobhook_testkit::postgres::ROLE;
    db.query(&format!(
        "ALTER ROLE {role} PASSWORD 'changed-on-the-server'"
    ))
    .expect("change the password");
    let refusing_since = Instant::now();
    db.query(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{role}'"
    ))
    .expect("end the engine's sessions");

    // The sessions the pool held fail their next use before the pool connects anew and is
    // refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) =
            runtime.block_on(post_event(&client, &engine.url, &sample_context_json()));
        let said = body["error"].as_str().unwrap_or_default();
        if status == 503 && said.contains("refused the engine's connection") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never told refused: {status} {body}\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let began = Instant::now();
    let (status, body) = runtime.block_on(post_event(&client, &engine.url, &sample_context_json()));
    let answered_in = began.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["error"],
        "the event was not accepted: the store's database server refused the engine's \
         connection (the engine's log says why); retry later",
        "{body}"
    );
    assert!(
        answered_in < REFUSED_ANSWER_BOUND,
        "refused after {answered_in:?}, more than {REFUSED_ANSWER_BOUND:?}"
    );
    runtime.block_on(assert_store_refusing(&client, &engine.url, "refused"));
    let (_, metrics) = runtime.block_on(get(&client, &engine.url, "/metrics"));
    let refused = jobhook_testkit::metric_value(
        &metrics,
        "jobhook_ingest_store_failures_total{reason=\"refused\"}",
    );
    assert!(refused.is_some_and(|n| n > 0.0), "{metrics}");
    // Failed commits are logged once per 10 s: the first, as the sessions ended, may have
    // taken the line; the refusals' comes with the next line due.
    let said = "cannot commit an event: the store's database server refused the engine's \
                connection: FATAL: password authentication failed";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !engine.log_text().contains(said) {
        assert!(
            Instant::now() < deadline,
            "no refusal in the log:\n{}",
            engine.log_text()
        );
        runtime.block_on(post_event(&client, &engine.url, &sample_context_json()));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        engine.log_text().contains("check [store] password"),
        "{}",
        engine.log_text()
    );
    // The pool's own connection errors — each of its pending connections tries again every
    // 2 s at most — are logged once per 10 s, each line counting the untold.
    let log = engine.log_text();
    let told = log.matches("store database connection failed").count();
    let bound = usize::try_from(refusing_since.elapsed().as_secs() / 10).unwrap_or(0) + 2;
    assert!(
        told <= bound,
        "{told} connection failures logged in {:?}, more than {bound}:\n{log}",
        refusing_since.elapsed()
    );
}

/// A PostgreSQL server that stops taking writes (a standby after a failover the engine's address
/// did not follow, or `default_transaction_read_only`): ingest answers 503 saying the store is
/// read-only, counted under its own reason; the outcome of a delivery that was running is kept
/// and recorded once the server takes writes again — not run a second time; events are accepted
/// again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_postgres_is_refused_in_words_and_a_running_outcome_is_recorded_once() {
    // A lease far longer than the read-only spell: a second run could only come from the
    // outcome being dropped, not from the claim running out.
    let Some((db, _dir, engine)) = slow_engine_on_private_postgres(60_000) else {
        return;
    };
    let client = reqwest::Client::new();
    let read_only = |on: bool| {
        let set = if on {
            "ALTER SYSTEM SET default_transaction_read_only = on"
        } else {
            "ALTER SYSTEM RESET default_transaction_read_only"
        };
        db.server().psql("postgres", set).expect("ALTER SYSTEM");
        db.server()
            .psql("postgres", "SELECT pg_reload_conf()")
            .expect("reload");
    };

    let running = post_and_wait_running(&client, &engine).await;
    read_only(true);
    // Refused, saying why; every session sees the setting after the reload.
    refused_as_read_only_within(&client, &engine, RECONNECT_BOUND).await;
    assert_store_refusing(&client, &engine.url, "read-only").await;
    let (_, metrics) = get(&client, &engine.url, "/metrics").await;
    let refused = jobhook_testkit::metric_value(
        &metrics,
        "jobhook_ingest_store_failures_total{reason=\"read-only\"}",
    );
    assert!(refused.is_some_and(|n| n > 0.0), "{metrics}");
    // The running delivery finishes while writes are refused: its outcome waits.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !engine
        .log_text()
        .contains("delivery outcomes not recorded yet")
    {
        assert!(
            Instant::now() < deadline,
            "the outcome was not held for a retry: {}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    read_only(false);
    let writable = Instant::now();
    loop {
        let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            writable.elapsed() < RECONNECT_BOUND,
            "still refused {:?} after the server took writes again: {body}",
            writable.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = settled(&client, &engine, &running).await;
    let d = delivery(&event, "slow");
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(
        d["attempts"].as_array().map(Vec::len),
        Some(1),
        "run once, recorded once: {d}"
    );
    let log = engine.log_text();
    assert!(
        log.contains("cannot commit an event: the store takes no writes (read-only)"),
        "{log}"
    );
}

/// An engine on a PostgreSQL server of its own with one handler, `slow`, that runs for 1.5 s on
/// every event; `None` (skipped) without PostgreSQL.
fn slow_engine_on_private_postgres(
    lease_ms: u64,
) -> Option<(
    jobhook_testkit::postgres::TestDatabase,
    tempfile::TempDir,
    EngineProcess,
)> {
    engine_on_private_postgres_with(|db| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n{store}\n[[handlers]]\nname = \"slow\"\n\
             component = \"{probe}\"\njob_types = [\"*\"]\nproperties = {{ SleepMs = \"1500\" }}\n",
            store = db.store_section(lease_ms, "data"),
            probe = guest("guest-attempt-probe").display(),
        )
    })
}

/// Posts an event and waits until its `slow` delivery runs; its id.
async fn post_and_wait_running(client: &reqwest::Client, engine: &EngineProcess) -> String {
    let (status, body) = post_event(client, &engine.url, &sample_context_json()).await;
    assert_eq!(status, 202, "{body}");
    let id = event_id(&body);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let (_, text) = get(client, &engine.url, &format!("/v1/events/{id}")).await;
        let event: Value = serde_json::from_str(&text).expect("event JSON");
        if delivery(&event, "slow")["state"] == "running" {
            return id;
        }
        assert!(Instant::now() < deadline, "never ran: {event:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running delivery's row held locked by another session (an operator's forgotten
/// transaction) for longer than the node's `lock_timeout` several times over: the outcome's
/// write times out again and again, is kept and recorded once the lock goes — the delivery is
/// neither handed back to run again nor left `running` for good — and the node's other leases
/// are renewed meanwhile (the renewal skips the locked row instead of failing on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_locked_past_the_lock_timeout_delays_its_outcome_and_strands_nothing() {
    // lock_timeout is half the lease: 2 s.
    let Some((db, _dir, engine)) = slow_engine_on_private_postgres(4_000) else {
        return;
    };
    let client = reqwest::Client::new();
    let running = post_and_wait_running(&client, &engine).await;
    let name = db.name.clone();
    let server = std::sync::Arc::clone(db.server());
    let holder = std::thread::spawn(move || {
        server.psql(
            &name,
            "BEGIN; SELECT id FROM deliveries WHERE state = 'running' FOR UPDATE; \
             SELECT pg_sleep(9); COMMIT;",
        )
    });
    // Another delivery runs meanwhile, and its lease is renewed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = post_and_wait_running(&client, &engine).await;
    holder.join().expect("lock holder").expect("psql");

    let event = settled(&client, &engine, &running).await;
    let d = delivery(&event, "slow");
    assert_eq!(d["state"], "succeeded", "{d}\n{}", engine.log_text());
    assert_eq!(
        d["attempts"].as_array().map(Vec::len),
        Some(1),
        "recorded once the lock went, not run again: {d}"
    );
    let event = settled(&client, &engine, &other).await;
    assert_eq!(delivery(&event, "slow")["state"], "succeeded", "{event:#}");
    let log = engine.log_text();
    assert!(
        log.contains("delivery outcomes not recorded yet"),
        "the outcome was not held up by the lock: {log}"
    );
    assert!(!log.contains("cannot renew delivery leases"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// The SMTP relay and the Keyfactor API down or never answering
// ---------------------------------------------------------------------------------------------

/// The retry policy of the handlers that need the relay or the API: two attempts, 200 ms apart.
const RETRY: &str = "[handlers.retry]\nmax_attempts = 2\nbackoff_ms = 200\n";

/// The wait between the two attempts, as configured in [`RETRY`].
const BACKOFF: Duration = Duration::from_millis(200);

/// A failed job that `repeated-failure-email` mails about (threshold 0) and
/// `job-history-lookup` looks up (an inventory job).
fn failed_inventory_job() -> Value {
    let mut context = sample_context_json();
    context["JobResult"] = json!("Failure");
    context["JobId"] = json!(uuid::Uuid::new_v4().to_string());
    context
}

/// A handler mailing into the outbox cannot take the disk the queue needs: once the outbox's
/// disk (here the data directory's, as by default) has less than the engine's reserve free,
/// mail is refused — the handler fails, saying why, and the operator is warned — while events
/// are still accepted and delivered; when space returns, mail is written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_outbox_filling_its_disk_is_refused_before_the_queue_runs_out() {
    use jobhook::capabilities::mail::OUTBOX_FREE_RESERVE_BYTES;
    const EVENTS: usize = 60;
    let dir = tempfile::tempdir().expect("tempdir");
    // The reserve and room for the store.
    let size = format!("{}m", OUTBOX_FREE_RESERVE_BYTES / (1024 * 1024) + 32);
    let rest = || {
        format!(
            "[quarantine]\nafter_failures = 1000\n\n[mail]\nfrom = \"jobhook@example.com\"\n\n\
             [[handlers]]\nname = \"mail\"\ncomponent = \"{mail}\"\njob_types = [\"*\"]\n\
             properties = {{ RetryThreshold = \"0\", EmailRecipients = \"pki-team@example.com\" }}\n\
             [handlers.retry]\nmax_attempts = 1\n\
             [handlers.grants.mail]\nrecipients = [\"@example.com\"]\n",
            mail = guest("repeated-failure-email").display()
        )
    };
    let Some(tmpfs) = config_on_tmpfs(dir.path(), &size, rest) else {
        return;
    };
    let engine = EngineProcess::start(engine_bin(), &tmpfs.config, &dir.path().join("engine.log"));
    let client = reqwest::Client::new();
    let outbox = tmpfs.data.join("outbox");
    let mails = || {
        std::fs::read_dir(&outbox)
            .map(|d| d.filter_map(Result::ok).count())
            .unwrap_or(0)
    };
    // Mail works while there is room.
    let event = post_settled(&client, &engine, &failed_inventory_job()).await;
    assert_eq!(delivery(&event, "mail")["state"], "succeeded", "{event:#}");
    assert_eq!(mails(), 1);

    // A little over the reserve left: mail soon meets it.
    let filler = tmpfs.disk.join("filler");
    fill_leaving(&filler, OUTBOX_FREE_RESERVE_BYTES + 64 * 1024);
    let mut refused = 0;
    for _ in 0..EVENTS {
        let (status, body) = post_event(&client, &engine.url, &failed_inventory_job()).await;
        assert_eq!(status, 202, "events are still accepted: {body}");
        let event = settled(&client, &engine, &event_id(&body)).await;
        let d = delivery(&event, "mail");
        if d["state"] != "succeeded" {
            assert!(
                d["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("mail outbox is full"),
                "{d:#}"
            );
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "{EVENTS} mails written with less than the reserve free ({} files)",
        mails()
    );
    assert!(
        engine
            .log_text()
            .contains("the mail outbox's disk has less than"),
        "{}",
        engine.log_text()
    );
    assert_healthy(&client, &engine.url).await;

    // Space returns: mail is written again, without a restart.
    std::fs::remove_file(&filler).expect("remove the filler file");
    let before = mails();
    let event = post_settled(&client, &engine, &failed_inventory_job()).await;
    assert_eq!(delivery(&event, "mail")["state"], "succeeded", "{event:#}");
    assert_eq!(mails(), before + 1);
    engine.kill();
}

/// The threads of process `pid` (`Threads:` in /proc/<pid>/status).
fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .expect("the engine's thread count")
}

/// The mail outbox's disk stops answering (an outbox on a network share that hangs; here
/// `jobhook-powerloss-fs` with its process stopped): each mail attempt ends with its
/// delivery's time budget, and the writes left waiting on the disk hold at most
/// [`MAX_OUTBOX_WRITES_IN_PROGRESS`](jobhook::capabilities::mail::MAX_OUTBOX_WRITES_IN_PROGRESS)
/// threads; past that mail is refused after a short wait for a place, saying the outbox is
/// not keeping up. Without
/// the bound, every attempt kept one more thread of the blocking pool the store's calls share
/// (seen: one per attempt), until that pool was full and every handler's deliveries stopped.
#[test]
fn a_hung_mail_outbox_disk_holds_a_bounded_number_of_threads() {
    use jobhook::capabilities::mail::MAX_OUTBOX_WRITES_IN_PROGRESS;
    use jobhook_testkit::powerloss::{PowerLossFs, fuse_or_skip};
    /// Mail attempts into the hung disk: well above the bound and its slack.
    const ATTEMPTS: usize = 40;
    /// Threads the engine may start besides the bounded writes (the blocking pool's other
    /// work, which comes and goes).
    const SLACK: usize = 8;
    if !fuse_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (backing, mount) = (dir.path().join("disk"), dir.path().join("mnt"));
    for d in [&backing, &mount] {
        std::fs::create_dir(d).expect("create dir");
    }
    let disk = PowerLossFs::mount(&jobhook_testkit::powerloss_fs_binary(), &backing, &mount);
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"{data}\"\n\n\
             [engine]\nmax_concurrent_deliveries = 64\n\n\
             [quarantine]\nafter_failures = 0\n\n\
             [mail]\nfrom = \"jobhook@example.com\"\noutbox = \"{outbox}\"\n\n\
             [[handlers]]\nname = \"mail\"\ncomponent = \"{mail}\"\njob_types = [\"*\"]\n\
             properties = {{ RetryThreshold = \"0\", EmailRecipients = \"pki-team@example.com\" }}\n\
             [handlers.limits]\ntimeout_ms = 1000\n\
             [handlers.grants.mail]\nrecipients = [\"@example.com\"]\n",
            data = dir.path().join("data").display(),
            outbox = disk.mountpoint().join("outbox").display(),
            mail = guest("repeated-failure-email").display()
        ),
    )
    .expect("config");
    let engine = EngineProcess::start(engine_bin(), &config, &dir.path().join("engine.log"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    // Mail works while the disk answers.
    let event = runtime.block_on(post_settled(&client, &engine, &failed_inventory_job()));
    assert_eq!(delivery(&event, "mail")["state"], "succeeded", "{event:#}");
    let before = threads_of(engine.pid());

    disk.freeze().expect("freeze the outbox's filesystem");
    let ids: Vec<String> = (0..ATTEMPTS)
        .map(|_| {
            let (status, body) =
                runtime.block_on(post_event(&client, &engine.url, &failed_inventory_job()));
            assert_eq!(status, 202, "{body}");
            event_id(&body)
        })
        .collect();
    let mut refused = 0;
    for id in &ids {
        let event = runtime.block_on(settled(&client, &engine, id));
        let d = delivery(&event, "mail");
        assert_ne!(d["state"], "succeeded", "no mail can be written: {d:#}");
        if d["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("outbox is not keeping up")
        {
            refused += 1;
        }
    }
    let after = threads_of(engine.pid());
    let added = after.saturating_sub(before);
    let log = engine.log_text();
    assert!(
        added <= MAX_OUTBOX_WRITES_IN_PROGRESS + SLACK,
        "{ATTEMPTS} mail attempts into a hung disk added {added} threads ({before} → {after}); \
         the bound is {MAX_OUTBOX_WRITES_IN_PROGRESS}\n{log}"
    );
    assert!(
        refused >= ATTEMPTS - MAX_OUTBOX_WRITES_IN_PROGRESS,
        "{refused} of {ATTEMPTS} refused for want of a place\n{log}"
    );
    assert!(
        log.contains("writes to the mail outbox are in progress"),
        "{log}"
    );
    println!("{ATTEMPTS} attempts: {refused} refused, {added} threads added");
    disk.thaw().expect("thaw");
    engine.kill();
    disk.cut_power();
}

/// The engine's configuration with a relay at `smtp_port` (`smtp_timeout_ms` per message) and
/// the Keyfactor API at `keyfactor` (`keyfactor_timeout_ms` per call); the mail and Keyfactor
/// handlers get `limits`.
fn capability_config(
    smtp_port: u16,
    smtp_timeout_ms: u64,
    keyfactor: &str,
    keyfactor_timeout_ms: u64,
    mail_limits: &str,
    history_limits: &str,
) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"

[store]
data_dir = "data"

[quarantine]
after_failures = 100

[mail]
from = "jobhook@example.com"

[mail.smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
timeout_ms = {smtp_timeout_ms}

[keyfactor]
base_url = "{keyfactor}"
timeout_ms = {keyfactor_timeout_ms}
connect_timeout_ms = 1000

[keyfactor.auth]
kind = "basic"
username = 'KFTRAIN\svc-jobhook'
password = {{ file = "kf-password" }}

[[handlers]]
name = "mail"
component = "{mail}"
job_types = ["*"]
properties = {{ RetryThreshold = "0", EmailRecipients = "pki-team@example.com" }}
{RETRY}{mail_limits}
[handlers.grants.mail]
recipients = ["@example.com"]

[[handlers]]
name = "history"
component = "{history}"
job_types = ["*"]
{RETRY}{history_limits}
[handlers.grants.keyfactor]
methods = ["GET"]
paths = ["OrchestratorJobs/"]

[[handlers]]
name = "log"
component = "{log}"
job_types = ["*"]
"#,
        mail = guest("repeated-failure-email").display(),
        history = guest("job-history-lookup").display(),
        log = guest("log-context").display(),
    )
}

fn start_with(config_text: &str, password: &str) -> (tempfile::TempDir, EngineProcess) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("kf-password"), password).expect("password file");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(&config, config_text).expect("config");
    let engine = EngineProcess::start(engine_bin(), &config, &dir.path().join("engine.log"));
    (dir, engine)
}

/// A Keyfactor API stand-in and an engine using it and the relay at `smtp_port` (`smtp_timeout_ms`
/// per message), both handlers without extra limits ([`capability_config`]).
async fn start_with_standin(
    smtp_port: u16,
    smtp_timeout_ms: u64,
) -> (Standin, tempfile::TempDir, EngineProcess) {
    let standin = Standin::start().await.expect("stand-in");
    let (dir, engine) = start_with(
        &capability_config(
            smtp_port,
            smtp_timeout_ms,
            &standin.base_url(),
            2000,
            "",
            "",
        ),
        &standin.credentials().password,
    );
    (standin, dir, engine)
}

/// The delivery failed after both attempts of [`RETRY`], each with `class`, the last one's
/// reason containing `reason`, the second attempt at least [`BACKOFF`] after the first ended.
fn assert_failed_by_policy(d: &Value, class: &str, reason: &str) {
    assert_eq!(d["state"], "failed", "{d:#}");
    assert_eq!(d["outcome"], class, "{d:#}");
    assert!(
        d["reason"].as_str().unwrap_or_default().contains(reason),
        "the reason must contain {reason:?}: {d:#}"
    );
    assert_eq!(d["attempt"], 2, "{d:#}");
    let attempts = d["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{d:#}");
    for (n, a) in attempts.iter().enumerate() {
        assert_eq!(a["class"], class, "{d:#}");
        assert_eq!(a["terminal"], n == 1, "{d:#}");
    }
    let time = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("timestamp {v}: {e}"))
    };
    // The wait is counted from the end of the first attempt, which the store records a moment
    // after the wait was computed: compare the starts, which are at least the wait apart.
    let waited = time(&attempts[1]["started_at"]) - time(&attempts[0]["started_at"]);
    assert!(
        waited.to_std().unwrap_or(Duration::ZERO) >= BACKOFF,
        "the retry started {waited} after the first attempt, before the policy's {BACKOFF:?}: {d:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_and_a_stopped_keyfactor_api_fail_the_deliveries_that_need_them() {
    let relay = SmtpServer::start().await.expect("SMTP server");
    let (standin, _dir, engine) = start_with_standin(relay.port(), 2000).await;
    let client = reqwest::Client::new();

    // Both up: the handlers work as configured.
    let event = post_settled(&client, &engine, &failed_inventory_job()).await;
    for handler in ["mail", "history", "log"] {
        assert_eq!(delivery(&event, handler)["state"], "succeeded", "{event:#}");
    }
    assert_eq!(relay.received().len(), 1);

    // Both stop.
    drop(relay);
    drop(standin);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let event = post_settled(&client, &engine, &failed_inventory_job()).await;
    assert_failed_by_policy(
        delivery(&event, "mail"),
        "handler-failed",
        "the mail relay could not be reached",
    );
    assert_failed_by_policy(
        delivery(&event, "history"),
        "handler-failed",
        "cannot connect to the Keyfactor API",
    );
    assert_eq!(delivery(&event, "log")["state"], "succeeded", "{event:#}");
    assert_healthy(&client, &engine.url).await;
    let log = engine.log_text();
    assert!(
        log.contains("the mail relay did not take the message"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_and_a_keyfactor_api_that_never_answer_time_out_and_other_handlers_deliver() {
    // Listening sockets that never accept: the kernel completes the TCP handshake, and then
    // nothing is ever said — a relay or an API hung with its port still open.
    let silent_relay = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_api = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let relay_port = silent_relay.local_addr().expect("addr").port();
    let api = format!(
        "http://{}/KeyfactorAPI/",
        silent_api.local_addr().expect("addr")
    );
    // The API's timeout (10 s) is longer than the handlers' budget (600 ms), so the Keyfactor
    // handler's attempts end with the handler's own timeout. The relay's timeout (300 ms)
    // bounds the whole exchange, the wait for a greeting that never comes included, so the mail
    // handler is told the relay did not answer in time, within its budget.
    let (_dir, engine) = start_with(
        &capability_config(
            relay_port,
            300,
            &api,
            10_000,
            // The mail handler's budget leaves the 300 ms relay timeout room on a busy machine.
            "[handlers.limits]\ntimeout_ms = 3000\n",
            "[handlers.limits]\ntimeout_ms = 600\n",
        ),
        "unused",
    );
    let client = reqwest::Client::new();

    let began = Instant::now();
    let (status, body) = post_event(&client, &engine.url, &failed_inventory_job()).await;
    assert_eq!(status, 202, "{body}");
    let accepted_in = began.elapsed();
    // While those two are stuck, the log handler's deliveries keep coming.
    let mut others = Vec::new();
    for _ in 0..3 {
        let (status, body) = post_event(&client, &engine.url, &sample_context_json()).await;
        assert_eq!(status, 202, "{body}");
        others.push(event_id(&body));
    }
    for id in &others {
        let log = delivered(&client, &engine.url, id, "log").await;
        assert_eq!(log["state"], "succeeded", "{log:#}");
    }
    assert_healthy(&client, &engine.url).await;

    let event = settled(&client, &engine, &event_id(&body)).await;
    assert_failed_by_policy(
        delivery(&event, "mail"),
        "handler-failed",
        "the mail relay did not answer in time",
    );
    assert_failed_by_policy(
        delivery(&event, "history"),
        "timed-out",
        "timed out after 600 ms, waiting for the Keyfactor API (GET OrchestratorJobs/JobHistory)",
    );
    assert_eq!(delivery(&event, "log")["state"], "succeeded", "{event:#}");
    assert!(
        accepted_in < Duration::from_secs(1),
        "ingest waited {accepted_in:?}"
    );
    assert_healthy(&client, &engine.url).await;
    drop((silent_relay, silent_api));
}

/// What the engine's peak resident memory may grow by while a relay floods it: its delivery of
/// the event besides (a guest instance, the outcome), and far less than the
/// [`FLOOD_CAP_BYTES`] an engine that buffers the flood takes on.
const FLOOD_RSS_GROWTH_KIB: u64 = 64 * 1024;

// Both bounds tell a read flood from a refused one only while the flood is much larger.
const _: () = assert!(
    FLOOD_SLACK_BYTES * 2 < FLOOD_CAP_BYTES && FLOOD_RSS_GROWTH_KIB * 1024 * 2 < FLOOD_CAP_BYTES
);

/// A relay that greets with a line that never ends — `220 ` and then bytes without a line end,
/// as a hostile relay, or anyone on the path before STARTTLS, can send — is cut off by the
/// engine process after its read limit: the mail delivery fails with the capability's error
/// ("sent more than ..."), both attempts long before the relay's 5 s timeout; the relay got rid
/// of no more than the limit plus the socket buffers per connection; the engine's peak memory
/// barely moves; the operator is warned; the engine stays healthy and its other handlers
/// deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_flooding_its_greeting_is_cut_off_and_the_engine_keeps_its_memory() {
    let relay = FloodingRelay::start(Flood::Greeting)
        .await
        .expect("flooding relay");
    let (_standin, _dir, engine) = start_with_standin(relay.port(), 5000).await;
    let client = reqwest::Client::new();

    // A delivery that sends no mail first, so the baseline includes a run of every handler.
    post_settled(&client, &engine, &sample_context_json()).await;
    let before = peak_rss_kib(engine.pid());

    let began = Instant::now();
    let event = post_settled(&client, &engine, &failed_inventory_job()).await;
    let took = began.elapsed();
    let after = peak_rss_kib(engine.pid());
    let floods = relay.wait_for(2, Duration::from_secs(10)).await;
    println!(
        "flooded greeting: the relay wrote {floods:?} bytes per connection; the engine's peak \
         RSS {before} KiB before, {after} KiB after; settled in {took:?}"
    );
    assert_failed_by_policy(delivery(&event, "mail"), "handler-failed", "more than");
    assert_eq!(delivery(&event, "log")["state"], "succeeded", "{event:#}");
    assert_eq!(floods.len(), 2, "{floods:?}");
    for written in &floods {
        assert!(
            *written < FLOOD_SLACK_BYTES,
            "the relay wrote {written} bytes on one connection"
        );
    }
    assert!(
        after.saturating_sub(before) < FLOOD_RSS_GROWTH_KIB,
        "the engine's peak RSS grew from {before} KiB to {after} KiB"
    );
    // Two attempts and the backoff, not two 5 s timeouts.
    assert!(took < Duration::from_secs(5), "settled in {took:?}");
    assert_healthy(&client, &engine.url).await;
    let log = engine.log_text();
    assert!(log.contains("the mail relay sent more than"), "{log}");
}

/// Writes `dir`/jobhook.toml: the engine on `listen`, its store under `dir`/data, and one
/// handler `(name, guest package)` for every job type, with `extra` lines in its table.
fn one_handler_config(
    dir: &Path,
    listen: &str,
    (name, package): (&str, &str),
    extra: &str,
) -> PathBuf {
    let config = dir.join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "{listen}"

[store]
data_dir = "data"

[[handlers]]
name = "{name}"
component = "{component}"
job_types = ["*"]
{extra}
"#,
            component = guest(package).display()
        ),
    )
    .expect("config");
    config
}

/// Lines the flooding handler of the stalled-log test logs per delivery: the default line
/// budget, so each line reaches the engine's log.
const FLOOD_LINES: usize = jobhook::limits::DEFAULT_LOG_LINES;

/// Events the stalled-log test posts: their lines are more than the engine's log holds for its
/// writer, so lines must be dropped.
const STALLED_LOG_EVENTS: usize = jobhook::app::engine_log::LOG_BUFFERED_LINES / FLOOD_LINES + 200;

/// Longest a `POST` may take while the log is stalled: ingest must not wait for the log at all.
const STALLED_POST_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_nobody_reads_costs_dropped_lines_counted_in_metrics_never_ingest_or_deliveries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = one_handler_config(
        dir.path(),
        "127.0.0.1:0",
        ("flood", "guest-log-flood"),
        &format!("properties = {{ lines = \"{FLOOD_LINES}\" }}"),
    );
    // stderr is a pipe held and never read (a log collector that hung): after its buffer's
    // 64 KiB, every write to it would block.
    let (engine, _stalled) = EngineProcess::start_with_stalled_stderr(engine_bin(), &config);
    let client = reqwest::Client::new();
    let mut ids = Vec::with_capacity(STALLED_LOG_EVENTS);
    for n in 0..STALLED_LOG_EVENTS {
        let mut context = sample_context_json();
        context["JobId"] = json!(uuid::Uuid::new_v4().to_string());
        let posted = tokio::time::timeout(
            STALLED_POST_TIMEOUT,
            post_event(&client, &engine.url, &context),
        )
        .await;
        let Ok((status, body)) = posted else {
            panic!(
                "event {n} got no answer within {STALLED_POST_TIMEOUT:?} while the log is stalled"
            );
        };
        assert_eq!(status, 202, "event {n}: {body}");
        ids.push(event_id(&body));
    }
    for id in &ids {
        let event = settled(&client, &engine, id).await;
        let d = delivery(&event, "flood");
        assert_eq!(d["state"], "succeeded", "{event:#}");
        // The outcome keeps every line whatever the engine's own log does.
        assert_eq!(
            d["logs"].as_array().map(Vec::len),
            Some(FLOOD_LINES),
            "{d:#}"
        );
    }
    assert_healthy(&client, &engine.url).await;
    let (status, metrics) = get(&client, &engine.url, "/metrics").await;
    assert_eq!(status, 200, "{metrics}");
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("jobhook_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no jobhook_log_lines_dropped_total in {metrics}"));
    assert!(
        dropped > 0,
        "{} lines went to a log nobody reads, more than it holds, and none were dropped",
        STALLED_LOG_EVENTS * FLOOD_LINES
    );
}

/// Longest `jobhook serve` may take to answer `/healthz` once started (it compiles its handler).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A `jobhook serve` of one log-context handler on a port of its own, started with both output
/// streams piped: the test decides whose reader goes, and when.
struct PipedEngine {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl PipedEngine {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = jobhook_testkit::engine::free_port();
        let config = one_handler_config(
            dir.path(),
            &format!("127.0.0.1:{port}"),
            ("log", "log-context"),
            "",
        );
        let child = Command::new(engine_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start jobhook serve");
        PipedEngine {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// Waits for `/healthz` to answer 200; panics if the engine exits first.
    async fn ready(&mut self, client: &reqwest::Client) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the engine exited ({status})");
            }
            if let Ok(r) = client.get(format!("{}/healthz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the engine never answered /healthz"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Posts an event and waits for its delivery to succeed, logging as it runs.
    async fn delivers(&self, client: &reqwest::Client) {
        let (status, body) = post_event(client, &self.url, &sample_context_json()).await;
        assert_eq!(status, 202, "{body}");
        let d = delivered(client, &self.url, &event_id(&body), "log").await;
        assert_eq!(d["state"], "succeeded", "{d:#}");
    }
}

impl Drop for PipedEngine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_whose_reader_has_gone_does_not_stop_the_engine_from_serving() {
    let mut engine = PipedEngine::start();
    // The reader of stdout is gone before the engine prints its ready line there (EPIPE).
    drop(engine.child.stdout.take());
    let mut stderr = engine.child.stderr.take().expect("piped stderr");
    let client = reqwest::Client::new();
    engine.ready(&client).await;
    engine.delivers(&client).await;
    // The log says why nothing was printed.
    drop(engine);
    let mut log = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut log).expect("read the log");
    assert!(
        log.contains("cannot print the ready line on stdout"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_whose_reader_goes_while_it_serves_does_not_stop_the_engine() {
    let mut engine = PipedEngine::start();
    let client = reqwest::Client::new();
    engine.ready(&client).await;
    engine.delivers(&client).await;
    // The log's reader goes mid-run: every line from now on fails with EPIPE.
    drop(engine.child.stderr.take());
    for _ in 0..20 {
        engine.delivers(&client).await;
    }
    assert_healthy(&client, &engine.url).await;
    assert!(
        matches!(engine.child.try_wait(), Ok(None)),
        "the engine exited"
    );
}
