//! Several engine nodes on one PostgreSQL database, against a real PostgreSQL server
//! started by the test set-up (`jobhook_testkit::postgres`):
//!
//! - two `jobhook serve` processes share one queue while a load driver posts to each; one node
//!   is SIGKILLed and restarted, then the other is SIGKILLed for good. Every event that got a
//!   202 from either node ends with exactly one terminal delivery per matching handler, and the
//!   deliveries the dead node was running are taken over by the survivor once their lease
//!   expires, with a higher attempt number that the handler saw;
//! - only one process leads the poller role, and another takes over when it dies;
//! - one `Idempotency-Key` posted to both nodes at the same moment commits one event.
//!
//! Without PostgreSQL the tests print `SKIPPED: PostgreSQL not available: …` and pass (they fail
//! instead under `JOBHOOK_REQUIRE_POSTGRES=1`, which `.ci/run` sets once PostgreSQL is installed).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use jobhook::queue::store::EventStore;
use jobhook::queue::store::postgres::PostgresStore;
use jobhook::secret::Secret;
use jobhook_testkit::engine::{EngineProcess, free_port};
use jobhook_testkit::exactly_once::{INVENTORY_TYPES, check_exactly_once};
use jobhook_testkit::guest;
use jobhook_testkit::postgres::{TestDatabase, database_or_skip};

/// A short lease, so that the survivor takes a dead node's deliveries over within seconds.
const LEASE_MS: u64 = 2000;

/// Events per second each load driver posts, and for how long.
const RATE: u32 = 80;
const SECONDS: f64 = 7.0;

/// Both nodes' configuration but for the port and data directory. `probe` sleeps 150 ms, so that
/// about a dozen of its deliveries are in flight on each node at any moment (80 events/s), and
/// a kill always interrupts some.
fn config_text(port: u16, db: &TestDatabase, data_dir: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[store]
kind = "postgres"
url = "{url}"
password = {{ file = "db-password" }}
lease_ms = {LEASE_MS}
data_dir = "{data_dir}"

[engine]
max_concurrent_deliveries = 32

[[handlers]]
name = "probe"
component = "{probe}"
job_types = ["*"]
properties = {{ SleepMs = "150" }}
max_concurrency = 16

[[handlers]]
name = "inventory"
component = "{probe}"
job_types = ["{a}", "{b}"]

[[handlers]]
name = "log"
component = "{log}"
job_types = ["*"]
"#,
        url = db.url,
        probe = guest("guest-attempt-probe").display(),
        log = guest("log-context").display(),
        a = INVENTORY_TYPES[0],
        b = INVENTORY_TYPES[1],
    )
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

/// The node id a `jobhook serve` logged when it opened the store (`node=…`), the last one in
/// `log` (a log is appended to across restarts).
fn node_id(log: &Path) -> String {
    let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    text.lines()
        .filter(|l| l.contains("PostgreSQL store opened"))
        .filter_map(|l| l.split("node=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|id| id.trim_matches('"').to_owned())
        .next_back()
        .unwrap_or_else(|| panic!("no node id in {}:\n{text}", log.display()))
}

/// `text` without the colour escapes of the engine's log.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC '[' parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

fn ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn two_nodes_share_one_queue_and_a_dead_nodes_work_is_taken_over() {
    let Some(db) = database_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("db-password"), &db.password).expect("password file");
    let bin = Path::new(env!("CARGO_BIN_EXE_jobhook"));
    let node = |name: &str| -> (PathBuf, PathBuf) {
        let config = dir.path().join(format!("{name}.toml"));
        let text = config_text(free_port(), &db, &format!("data-{name}"));
        std::fs::write(&config, text).expect("write config");
        (config, dir.path().join(format!("{name}.log")))
    };
    let (config_a, log_a) = node("a");
    let (config_b, log_b) = node("b");
    let (record_a, record_b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));

    let a = EngineProcess::start(bin, &config_a, &log_a);
    let b = EngineProcess::start(bin, &config_b, &log_b);
    let url_a = a.url.clone();
    let driver_a = load_driver(&url_a, RATE, SECONDS, &record_a, 1);
    let driver_b = load_driver(&b.url, RATE, SECONDS, &record_b, 2);

    // Node A dies mid-flight and comes back (as a new node with a new id) on the same port.
    std::thread::sleep(Duration::from_millis(2000));
    a.kill();
    std::thread::sleep(Duration::from_millis(1000));
    let a = EngineProcess::start(bin, &config_a, &log_a);
    assert_eq!(
        a.url, url_a,
        "the restarted node listens where its driver posts"
    );

    // Node B dies mid-flight for good: A must take over what B was running.
    std::thread::sleep(Duration::from_millis(1500));
    let b_node = node_id(&log_b);
    b.kill();
    let orphaned: Vec<i64> = db
        .query(&format!(
            "SELECT id FROM deliveries WHERE state = 'running' AND owner = '{}'",
            b_node.replace('\'', "''")
        ))
        .expect("query B's running deliveries")
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();

    let report_a = driver_a.join().expect("load driver A");
    let report_b = driver_b.join().expect("load driver B");
    let report = format!("A: {report_a}\nB: {report_b}");
    let accepted_a = ids(&record_a);
    let accepted_b = ids(&record_b);
    assert!(
        accepted_a.len() > 100 && accepted_b.len() > 100,
        "too few events accepted ({} by A, {} by B): {report}",
        accepted_a.len(),
        accepted_b.len()
    );
    let accepted: Vec<String> = accepted_a.into_iter().chain(accepted_b).collect();

    let reruns = check_exactly_once(&a.url, &accepted, Duration::from_secs(180));

    // What B was running when it died was finished by A, as a later attempt.
    for delivery in &orphaned {
        let row = db
            .query(&format!(
                "SELECT state, attempt, owner FROM deliveries WHERE id = {delivery}"
            ))
            .expect("query a taken-over delivery");
        let fields: Vec<&str> = row.split('|').collect();
        assert_eq!(
            fields.first(),
            Some(&"succeeded"),
            "delivery {delivery}: {row}"
        );
        let attempt: u32 = fields.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
        assert!(attempt >= 2, "delivery {delivery} was not re-run: {row}");
        assert_ne!(fields.get(2), Some(&b_node.as_str()), "{row}");
    }
    let owners: usize = db
        .query("SELECT count(DISTINCT owner) FROM deliveries")
        .expect("count owners")
        .parse()
        .expect("a count");
    println!(
        "{} accepted events checked on two nodes; {reruns} deliveries re-run; {} of them were \
         running on the node killed for good and were taken over; {owners} node ids ran \
         deliveries; drivers: {report}",
        accepted.len(),
        orphaned.len()
    );
    assert!(
        owners >= 3,
        "A, B and the restarted A should all have run deliveries"
    );
    assert!(
        !orphaned.is_empty(),
        "nothing was running on B when it was killed; the test did not exercise takeover"
    );
    assert!(reruns > 0, "no delivery was re-run after the kills");
}

/// Environment of [`lead_and_hold_as_a_child_process`]: the database to lead on.
const CHILD_URL: &str = "JOBHOOK_TEST_LEAD_URL";
const CHILD_PASSWORD: &str = "JOBHOOK_TEST_LEAD_PASSWORD";

/// The line the child prints once it leads.
const LEADING: &str = "LEADING poller";

#[test]
fn poller_leadership_moves_to_another_node_when_the_leader_dies() {
    let Some(db) = database_or_skip() else {
        return;
    };
    // The leader is a process of its own (this test binary, running the helper test below), so
    // that it can die the way a node dies: SIGKILL, no clean-up.
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = std::fs::File::create(dir.path().join("leader.log")).expect("leader log");
    let mut leader = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "lead_and_hold_as_a_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, &db.url)
        .env(CHILD_PASSWORD, &db.password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start the leader");
    let stdout = leader.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // With one test thread the harness prints "test NAME ... " before the test's output.
            if line.contains(LEADING) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = leader.kill();
        let _ = leader.wait();
        panic!(
            "the leader process never led: {}",
            std::fs::read_to_string(dir.path().join("leader.log")).unwrap_or_default()
        );
    }

    let password = Secret::new(db.password.clone());
    let first = PostgresStore::open(&db.url, Some(&password)).expect("open a node");
    let second = PostgresStore::open(&db.url, Some(&password)).expect("open a node");
    assert!(
        !first.try_lead("poller").expect("try_lead"),
        "a second leader while the first lives"
    );
    assert!(!second.try_lead("poller").expect("try_lead"));

    leader.kill().expect("SIGKILL the leader");
    leader.wait().expect("reap the leader");
    let died = Instant::now();
    // Its session ends with it, and with the session the lock: exactly one survivor wins.
    let winner = loop {
        if first.try_lead("poller").expect("try_lead") {
            break &first;
        }
        if second.try_lead("poller").expect("try_lead") {
            break &second;
        }
        assert!(
            died.elapsed() < Duration::from_secs(20),
            "no node took the poller over after the leader died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let loser = if std::ptr::eq(winner, &first) {
        &second
    } else {
        &first
    };
    assert!(!loser.try_lead("poller").expect("try_lead"));
    assert!(winner.try_lead("poller").expect("try_lead"));
    println!(
        "poller leadership moved to node {} {:?} after the leader was killed",
        winner.node(),
        died.elapsed()
    );
}

/// Not a test on its own: the leader process of the test above (does nothing without its
/// environment). Leads the poller role, says so, and holds it until killed.
#[test]
fn lead_and_hold_as_a_child_process() {
    let (Ok(url), Ok(password)) = (std::env::var(CHILD_URL), std::env::var(CHILD_PASSWORD)) else {
        return;
    };
    let store = PostgresStore::open(&url, Some(&Secret::new(password))).expect("open a node");
    assert!(store.try_lead("poller").expect("try_lead"));
    println!("{LEADING}");
    // Killed long before this ends; bounded so that an orphan cannot linger.
    std::thread::sleep(Duration::from_secs(120));
}

/// The forwarder resends to whichever node answers: the same `Idempotency-Key` posted to both
/// nodes at the same moment commits one event, and both nodes answer with its id.
#[test]
fn one_key_posted_to_both_nodes_at_once_commits_one_event() {
    const KEYS: usize = 20;
    let Some(db) = database_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("db-password"), &db.password).expect("password file");
    let bin = Path::new(env!("CARGO_BIN_EXE_jobhook"));
    let start = |name: &str| {
        let config = dir.path().join(format!("{name}.toml"));
        let text = config_text(free_port(), &db, &format!("data-{name}"));
        std::fs::write(&config, text).expect("write config");
        EngineProcess::start(bin, &config, &dir.path().join(format!("{name}.log")))
    };
    let (a, b) = (start("a"), start("b"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    let post = |url: String, key: String, body: String| {
        let client = client.clone();
        async move {
            let response = client
                .post(format!("{url}/v1/job-complete"))
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body)
                .send()
                .await
                .expect("POST");
            let status = response.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
            assert_eq!(status, 202, "{body}");
            body["event_id"].as_str().expect("event id").to_owned()
        }
    };
    let mut ids = Vec::new();
    for n in 0..KEYS {
        let mut context = jobhook_testkit::sample_context_json();
        context["CurrentRetryCount"] = serde_json::json!(n);
        let (body, key) = (context.to_string(), format!("two-nodes-{n}"));
        let (from_a, from_b) = runtime.block_on(async {
            tokio::join!(
                post(a.url.clone(), key.clone(), body.clone()),
                post(b.url.clone(), key.clone(), body.clone())
            )
        });
        assert_eq!(from_a, from_b, "key {key}: both nodes name the same event");
        ids.push(from_a);
    }
    let events: usize = db
        .query("SELECT count(*) FROM events")
        .expect("count events")
        .parse()
        .expect("a count");
    assert_eq!(
        events, KEYS,
        "one event per key, whichever node got it first"
    );
    let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), KEYS);
}
