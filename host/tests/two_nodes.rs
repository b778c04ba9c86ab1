//! Several engine nodes on one PostgreSQL database, against a real PostgreSQL server started by
//! the test set-up (`jobhook_testkit::postgres`):
//!
//! - two `jobhook serve` processes share one queue while a load driver posts to each; one node
//!   is SIGKILLed and restarted, then the other is SIGKILLed for good. Every event that got a
//!   202 from either node ends with exactly one terminal delivery per matching handler, and the
//!   deliveries the dead node was running are taken over by the survivor once their lease
//!   expires, with a higher attempt number that the handler saw;
//! - only one process leads the poller role, and another takes over when it dies;
//! - one `Idempotency-Key` posted to both nodes at the same moment commits one event;
//! - a node frozen with SIGSTOP — inside a transaction that holds row locks on its deliveries,
//!   and between transactions — cannot stop the other from taking its deliveries over; what it
//!   finishes after waking is refused, and every accepted event still ends exactly once.
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

{store}
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
        store = db.store_section(LEASE_MS, data_dir),
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
    keyed: Keyed,
) -> std::thread::JoinHandle<String> {
    let options = jobhook_dev::loadgen::LoadOptions {
        url: url.to_owned(),
        rate,
        duration: Duration::from_secs_f64(seconds),
        token: None,
        record: Some(record.to_owned()),
        seed,
        resend: keyed == Keyed::AsTheForwarder,
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

/// Whether a load driver sends its events with idempotency keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyed {
    /// Plain events: each is committed by one statement.
    No,
    /// As the Keyfactor forwarder does: every event with an `Idempotency-Key`, resent until it
    /// gets an answer; each is committed by a transaction that takes its key first.
    AsTheForwarder,
}

/// The node id a `jobhook serve` logged when it opened the store (`node=…`), the last one in
/// `log` (a log is appended to across restarts).
fn node_id(engine: &EngineProcess) -> String {
    let text = strip_ansi(&engine.log_text());
    text.lines()
        .filter(|l| l.contains("PostgreSQL store opened"))
        .filter_map(|l| l.split("node=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|id| id.trim_matches('"').to_owned())
        .next_back()
        .unwrap_or_else(|| panic!("no node id in {}:\n{text}", engine.log.display()))
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
    let driver_a = load_driver(&url_a, RATE, SECONDS, &record_a, 1, Keyed::No);
    let driver_b = load_driver(&b.url, RATE, SECONDS, &record_b, 2, Keyed::No);

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
    let b_node = node_id(&b);
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
    leadership_moves_when_the_leader(Ends::Killed);
}

/// A leader frozen whole (SIGSTOP, a paused VM): its host's kernel still answers keepalives, so
/// only its session's silence ends it (`idle_session_timeout`, 15 s past its last query; a
/// running node queries every 3 s) — then another node takes the poller over.
#[test]
fn poller_leadership_moves_to_another_node_when_the_leader_freezes() {
    leadership_moves_when_the_leader(Ends::Frozen);
}

/// How the leader stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// SIGKILL: its session ends with it.
    Killed,
    /// SIGSTOP: its session stays open, and silent.
    Frozen,
}

fn leadership_moves_when_the_leader(ends: Ends) {
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

    // Its session ends with it (killed), or is ended by the server once silent (frozen), and
    // with the session the lock: exactly one survivor wins.
    let bound = match ends {
        Ends::Killed => {
            leader.kill().expect("SIGKILL the leader");
            leader.wait().expect("reap the leader");
            Duration::from_secs(20)
        }
        Ends::Frozen => {
            let pid = libc::pid_t::try_from(leader.id()).expect("pid");
            // SAFETY: a signal to the child this test started and has not reaped.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
            Duration::from_secs(40)
        }
    };
    let died = Instant::now();
    let winner = loop {
        if first.try_lead("poller").expect("try_lead") {
            break &first;
        }
        if second.try_lead("poller").expect("try_lead") {
            break &second;
        }
        assert!(
            died.elapsed() < bound,
            "no node took the poller over within {bound:?} after the leader was {ends:?}"
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
    if ends == Ends::Frozen {
        assert!(
            died.elapsed() >= Duration::from_secs(10),
            "taken over {:?} after the freeze: before the session's idle limit",
            died.elapsed()
        );
        let _ = leader.kill();
        let _ = leader.wait();
    }
    println!(
        "poller leadership moved to node {} {:?} after the leader was {ends:?}",
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

/// A node frozen (SIGSTOP) while the other keeps working, inside a transaction and between
/// transactions; Linux only (it reads thread states from `/proc`).
#[cfg(target_os = "linux")]
mod frozen_node {
    use super::*;

    use std::hash::{BuildHasher, Hasher};

    use jobhook::queue::store::postgres::{SessionLimits, application_name};
    use postgres::{Client, NoTls};

    /// Events per second each load driver posts in each situation, and for how long: enough
    /// that B always has deliveries running, little enough that A alone drains everything
    /// within seconds while B is frozen.
    const RATE: u32 = 40;
    const LOAD_SECONDS: f64 = 12.0;

    /// Every handler's `timeout_ms` here. Handler deadlines are wall-clock, so a node frozen
    /// for longer than a handler's timeout finds the handlers it was running timed out when it
    /// wakes and counts those (refused) attempts towards quarantine (docs/OPERATIONS.md, "Known
    /// weakness"). This test is about takeover: it keeps every freeze shorter than this and
    /// checks that it did.
    const HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

    /// How long, and in how many freezes at most, the test tries to catch B in the state it
    /// wants (inside a transaction that holds row locks, or between transactions); the load
    /// keeps B busy for all of it.
    const CATCH_SEARCH: Duration = Duration::from_secs(8);
    const CATCH_TRIES: u32 = 400;

    /// Longest pause between two tries, drawn at random so that the freezes do not fall into
    /// step with the node's own timers.
    const CATCH_PAUSE: Duration = Duration::from_millis(25);

    /// How long the process's threads may take to stop after SIGSTOP, and the server to finish
    /// the statements the node had sent before it stopped.
    const SETTLE: Duration = Duration::from_millis(1000);

    /// Slack on top of the protocol's own delays for a machine whose two cores are shared with
    /// compilers: scheduling delays of A's lease task, its claim, and the watcher's polls.
    const MARGIN: Duration = Duration::from_secs(3);

    /// How often the test looks at the database while it waits.
    const POLL: Duration = Duration::from_millis(20);

    /// The line a node logs for each late result the store refuses (`finish_batch` of the
    /// PostgreSQL store).
    const REFUSED: &str = "attempt not recorded: its claim was taken over after the lease expired";

    /// How soon after the freeze every delivery B was running must have been claimed again by
    /// A: B renewed its leases at most a lease before (so they expire within one lease), a
    /// transaction B was frozen in is ended by the server after `idle_in_transaction` (less
    /// than the two thirds of a lease a renewed claim still has — counted in full anyway),
    /// A's requeue runs every third of a lease, and then A claims them; plus [`MARGIN`].
    fn takeover_bound() -> Duration {
        let lease = Duration::from_millis(LEASE_MS);
        lease + SessionLimits::for_lease(lease).idle_in_transaction + lease / 3 + MARGIN
    }

    /// Where B is frozen.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Situation {
        /// Inside a transaction (a keyed ingest's, with a lock on the key and what it
        /// inserted, or any other B keeps open across round trips): the server ends that
        /// session only after its idle-in-transaction timeout. Recording outcomes and renewing
        /// leases are single statements, so such a transaction normally holds none of B's
        /// running deliveries; how many it held is reported either way.
        InTransaction,
        /// With none of its sessions inside a transaction.
        BetweenTransactions,
    }

    /// SIGSTOPs and SIGCONTs one process. A process it left stopped is continued when it is
    /// dropped, also when the test fails, so that no stopped process is left behind (the
    /// engine's own guard, dropped after this one, then kills it).
    struct Freezer {
        pid: libc::pid_t,
        frozen: bool,
    }

    impl Freezer {
        fn new(pid: u32) -> Self {
            Freezer {
                pid: libc::pid_t::try_from(pid).expect("a pid"),
                frozen: false,
            }
        }

        /// Stops the process and waits until every thread of it has stopped.
        fn freeze(&mut self) {
            signal(self.pid, libc::SIGSTOP);
            self.frozen = true;
            let sent = Instant::now();
            while !all_threads_stopped(self.pid) {
                assert!(
                    sent.elapsed() < SETTLE,
                    "process {} did not stop within {SETTLE:?} of SIGSTOP",
                    self.pid
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn thaw(&mut self) {
            signal(self.pid, libc::SIGCONT);
            self.frozen = false;
        }
    }

    impl Drop for Freezer {
        fn drop(&mut self) {
            if self.frozen {
                // SAFETY: kill(2) with a child's pid and a valid signal has no memory effects.
                unsafe {
                    libc::kill(self.pid, libc::SIGCONT);
                }
            }
        }
    }

    fn signal(pid: libc::pid_t, signal: libc::c_int) {
        // SAFETY: kill(2) with a child's pid and a valid signal has no memory effects.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Whether every thread of `pid` is stopped (state `T` in `/proc/PID/task/TID/stat`).
    fn all_threads_stopped(pid: libc::pid_t) -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.filter_map(Result::ok).all(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // "TID (comm) STATE ...": the command may contain spaces and parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state == 'T' || state == 't')
        })
    }

    /// A random pause of up to [`CATCH_PAUSE`].
    fn random_pause() -> Duration {
        let random = std::hash::RandomState::new().build_hasher().finish();
        CATCH_PAUSE.mul_f64((random % 1000) as f64 / 1000.0)
    }

    /// A connection of the test's own to the database, to watch the nodes' sessions and rows.
    fn watcher(db: &TestDatabase) -> Client {
        let mut config: postgres::Config = db.url.parse().expect("test database URL");
        config
            .password(&db.password)
            .application_name("jobhook-test-watcher")
            .connect(NoTls)
            .expect("connect to the test database")
    }

    /// One session of a node, as `pg_stat_activity` shows it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Session {
        pid: i32,
        state: String,
        in_transaction: bool,
        query: String,
    }

    /// The sessions named `app`.
    fn sessions(watch: &mut Client, app: &str) -> Vec<Session> {
        watch
            .query(
                "SELECT pid, coalesce(state, ''), xact_start IS NOT NULL, coalesce(query, '') \
                 FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid",
                &[&app],
            )
            .expect("pg_stat_activity")
            .iter()
            .map(|row| Session {
                pid: row.get(0),
                state: row.get(1),
                in_transaction: row.get(2),
                query: row
                    .get::<_, String>(3)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            })
            .collect()
    }

    /// The sessions named `app` once the server has finished every statement the (stopped)
    /// node had sent: none active, and the same in two looks a moment apart (a message still in
    /// the socket would change them). `None` if they do not settle within [`SETTLE`].
    fn settled_sessions(watch: &mut Client, app: &str) -> Option<Vec<Session>> {
        let started = Instant::now();
        let mut last: Option<Vec<Session>> = None;
        while started.elapsed() < SETTLE {
            std::thread::sleep(Duration::from_millis(10));
            let now = sessions(watch, app);
            if now.iter().any(|s| s.state == "active") {
                last = None;
                continue;
            }
            if last.as_ref() == Some(&now) {
                return Some(now);
            }
            last = Some(now);
        }
        None
    }

    /// Deliveries running under `node` (id, attempt), as committed.
    fn running_under(watch: &mut Client, node: &str) -> Vec<(i64, i32)> {
        watch
            .query(
                "SELECT id, attempt FROM deliveries WHERE state = 'running' AND owner = $1 \
                 ORDER BY id",
                &[&node],
            )
            .expect("running deliveries")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// How many of the deliveries running under `node` are row-locked by some transaction
    /// (all of them, less those a `SKIP LOCKED` read can lock).
    fn locked_under(watch: &mut Client, node: &str) -> i64 {
        watch
            .query_one(
                "SELECT (SELECT count(*) FROM deliveries WHERE state = 'running' AND owner = $1) \
                      - (SELECT count(*) FROM (SELECT id FROM deliveries \
                         WHERE state = 'running' AND owner = $1 FOR SHARE SKIP LOCKED) AS free)",
                &[&node],
            )
            .expect("locked deliveries")
            .get(0)
    }

    /// What the test caught B doing when it froze it.
    struct Caught {
        /// Freezes it took.
        tries: u32,
        /// When B's threads had all stopped.
        at: Instant,
        /// The deliveries running under B then (id, attempt).
        running: Vec<(i64, i32)>,
        /// The session B was frozen in a transaction on, that transaction's last statement,
        /// and how many of B's running deliveries it held locked.
        transaction: Option<(i32, String, i64)>,
    }

    /// Freezes B until it is caught in `situation` with deliveries running; each miss resumes
    /// it and tries again after a random pause. Fails when it cannot within [`CATCH_SEARCH`]
    /// or [`CATCH_TRIES`].
    fn catch(
        freezer: &mut Freezer,
        watch: &mut Client,
        app: &str,
        node: &str,
        situation: Situation,
    ) -> Caught {
        let started = Instant::now();
        let mut seen = Vec::new();
        for tries in 1..=CATCH_TRIES {
            freezer.freeze();
            let at = Instant::now();
            if let Some(now) = settled_sessions(watch, app) {
                let running = running_under(watch, node);
                let open: Vec<&Session> = now.iter().filter(|s| s.in_transaction).collect();
                match situation {
                    Situation::InTransaction if !running.is_empty() => {
                        if let Some(session) =
                            open.iter().find(|s| s.state == "idle in transaction")
                        {
                            let locked = locked_under(watch, node);
                            return Caught {
                                tries,
                                at,
                                running,
                                transaction: Some((session.pid, session.query.clone(), locked)),
                            };
                        }
                    }
                    Situation::BetweenTransactions if !running.is_empty() && open.is_empty() => {
                        return Caught {
                            tries,
                            at,
                            running,
                            transaction: None,
                        };
                    }
                    _ => {}
                }
                seen = now;
            }
            freezer.thaw();
            if started.elapsed() > CATCH_SEARCH {
                break;
            }
            std::thread::sleep(random_pause());
        }
        panic!(
            "could not catch B {situation:?} with deliveries running within {CATCH_SEARCH:?} \
             ({CATCH_TRIES} tries at most); its sessions at the last try: {seen:#?}"
        );
    }

    /// Waits until the server has ended session `pid`; returns when, after `since`.
    fn session_ended(watch: &mut Client, pid: i32, since: Instant, bound: Duration) -> Duration {
        loop {
            let alive: i64 = watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .expect("pg_stat_activity")
                .get(0);
            if alive == 0 {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < bound,
                "the server had not ended the frozen transaction's session {pid} {:?} after \
                 the freeze (bound {bound:?})",
                since.elapsed()
            );
            std::thread::sleep(POLL);
        }
    }

    /// How long after `since` every one of `running` (B's deliveries at the freeze) was no
    /// longer B's (requeued), and then claimed again by A with a higher attempt number. Fails
    /// after `bound`.
    fn taken_over(
        watch: &mut Client,
        running: &[(i64, i32)],
        b_node: &str,
        a_node: &str,
        since: Instant,
        bound: Duration,
    ) -> (Duration, Duration) {
        let ids: Vec<i64> = running.iter().map(|(id, _)| *id).collect();
        let mut requeued = None;
        loop {
            let rows = watch
                .query(
                    "SELECT id, attempt, owner, state FROM deliveries WHERE id = ANY($1) \
                     ORDER BY id",
                    &[&ids],
                )
                .expect("taken-over deliveries");
            let elapsed = since.elapsed();
            let owner = |i: usize| rows[i].get::<_, Option<String>>(2);
            let left_b = (0..rows.len()).all(|i| owner(i).as_deref() != Some(b_node));
            if left_b && requeued.is_none() {
                requeued = Some(elapsed);
            }
            let claimed_by_a = rows.len() == running.len()
                && rows
                    .iter()
                    .zip(running)
                    .enumerate()
                    .all(|(i, (row, (_, before)))| {
                        row.get::<_, i32>(1) > *before && owner(i).as_deref() == Some(a_node)
                    });
            if claimed_by_a {
                return (requeued.unwrap_or(elapsed), elapsed);
            }
            assert!(
                elapsed < bound,
                "B's deliveries at the freeze {running:?} were not all claimed by A {elapsed:?} \
                 after it (bound {bound:?}); now: {:?}",
                rows.iter()
                    .map(|r| (
                        r.get::<_, i64>(0),
                        r.get::<_, i32>(1),
                        r.get::<_, Option<String>>(2),
                        r.get::<_, String>(3)
                    ))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Whether `log` has a refusal line for `delivery`'s `attempt`.
    fn refused(log: &str, delivery: i64, attempt: i32) -> bool {
        let (delivery, attempt) = (format!("delivery={delivery}"), format!("attempt={attempt}"));
        log.lines().any(|line| {
            line.contains(REFUSED)
                && line.split_whitespace().any(|w| w == delivery)
                && line.split_whitespace().any(|w| w == attempt)
        })
    }

    /// The configuration of [`config_text`] with every handler's timeout at [`HANDLER_TIMEOUT`].
    fn frozen_config_text(port: u16, db: &TestDatabase, data_dir: &str) -> String {
        let mut config: toml::Table = config_text(port, db, data_dir)
            .parse()
            .expect("the test configuration is TOML");
        let timeout_ms = i64::try_from(HANDLER_TIMEOUT.as_millis()).expect("timeout");
        let handlers = config
            .get_mut("handlers")
            .and_then(toml::Value::as_array_mut)
            .expect("[[handlers]]");
        for handler in handlers.iter_mut().filter_map(toml::Value::as_table_mut) {
            let mut limits = toml::Table::new();
            limits.insert("timeout_ms".into(), toml::Value::Integer(timeout_ms));
            handler.insert("limits".into(), toml::Value::Table(limits));
        }
        config.to_string()
    }

    /// `GET url` as JSON.
    fn get_json(url: &str) -> serde_json::Value {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let response = reqwest::get(url).await.expect("GET");
            assert_eq!(response.status().as_u16(), 200, "GET {url}");
            serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON")
        })
    }

    /// What one situation measured.
    struct Measured {
        situation: Situation,
        tries: u32,
        running: usize,
        transaction: Option<(String, i64, Duration)>,
        requeued: Duration,
        taken_over: Duration,
        frozen_for: Duration,
        events: usize,
        reruns: u64,
    }

    /// The two `jobhook serve` nodes and what the test watches them with.
    struct Nodes<'a> {
        db: &'a TestDatabase,
        dir: &'a Path,
        a: &'a EngineProcess,
        b: &'a EngineProcess,
        a_node: String,
        b_node: String,
        b_app: String,
        watch: Client,
    }

    /// Load on both nodes; B frozen in `situation`; A takes B's deliveries over and everything
    /// accepted settles exactly once while B stays frozen; B wakes, its late results are
    /// refused, nothing becomes terminal twice, and B works again.
    fn freeze_once(nodes: &mut Nodes<'_>, freezer: &mut Freezer, situation: Situation) -> Measured {
        let name = format!("{situation:?}");
        let record_a = nodes.dir.join(format!("{name}-a.txt"));
        let record_b = nodes.dir.join(format!("{name}-b.txt"));
        let seed = if situation == Situation::InTransaction {
            10
        } else {
            20
        };
        let driver_a = load_driver(
            &nodes.a.url,
            RATE,
            LOAD_SECONDS,
            &record_a,
            seed + 1,
            Keyed::No,
        );
        // B's events carry keys when it is to be caught inside a transaction: a plain event is
        // one statement, a keyed one (what the forwarder sends) a transaction of several.
        let b_keyed = if situation == Situation::InTransaction {
            Keyed::AsTheForwarder
        } else {
            Keyed::No
        };
        let driver_b = load_driver(
            &nodes.b.url,
            RATE,
            LOAD_SECONDS,
            &record_b,
            seed + 2,
            b_keyed,
        );

        let caught = catch(
            freezer,
            &mut nodes.watch,
            &nodes.b_app,
            &nodes.b_node,
            situation,
        );
        let bound = takeover_bound();
        let transaction = caught.transaction.as_ref().map(|(pid, query, locked)| {
            let ended = session_ended(&mut nodes.watch, *pid, caught.at, bound);
            (query.clone(), *locked, ended)
        });
        let (requeued, taken_over) = taken_over(
            &mut nodes.watch,
            &caught.running,
            &nodes.b_node,
            &nodes.a_node,
            caught.at,
            bound,
        );

        // Everything accepted so far settles on A alone, exactly once, while B stays frozen.
        let report_a = driver_a.join().expect("load driver A");
        let mut accepted: Vec<String> = ids(&record_a);
        let from_b = ids(&record_b);
        let before_wake = from_b.len();
        assert!(
            accepted.len() > 100 && !from_b.is_empty(),
            "too few events accepted ({} by A, {} by B before the freeze): A: {report_a}",
            accepted.len(),
            from_b.len()
        );
        accepted.extend(from_b);
        let reruns = check_exactly_once(&nodes.a.url, &accepted, Duration::from_secs(180));
        for (id, before) in &caught.running {
            let row = nodes
                .db
                .query(&format!(
                    "SELECT state, attempt > {before}, owner FROM deliveries WHERE id = {id}"
                ))
                .expect("a taken-over delivery");
            assert_eq!(
                row,
                format!("succeeded|t|{}", nodes.a_node),
                "delivery {id}, attempt {before} on B at the freeze, was not finished by A"
            );
        }
        let frozen_for = caught.at.elapsed();
        assert!(
            frozen_for < HANDLER_TIMEOUT,
            "B was frozen for {frozen_for:?}, longer than its handlers' timeout: the test's \
             premise (see HANDLER_TIMEOUT) does not hold"
        );

        // B wakes: each of its late results is refused, and logged as such.
        freezer.thaw();
        let woke = Instant::now();
        loop {
            let log = strip_ansi(&nodes.b.log_text());
            let missing: Vec<&(i64, i32)> = caught
                .running
                .iter()
                .filter(|(id, attempt)| !refused(&log, *id, *attempt))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                woke.elapsed() < Duration::from_secs(30),
                "30 s after waking, B had not logged {REFUSED:?} for {missing:?}; its log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // B's requests cut off by the freeze have timed out or been answered late.
        let report_b = driver_b.join().expect("load driver B");
        accepted.extend(ids(&record_b).into_iter().skip(before_wake));

        // B is healthy again: nothing quarantined, and it runs and records new deliveries.
        let health = get_json(&format!("{}/healthz", nodes.b.url));
        assert_eq!(health["status"], "ok", "{health}");
        assert_eq!(health["quarantined"], 0, "{health}");
        let since_wake: String = nodes.db.query("SELECT now()").expect("now");
        let record_after = nodes.dir.join(format!("{name}-after.txt"));
        let after = load_driver(&nodes.b.url, 20, 1.5, &record_after, seed + 3, Keyed::No);
        let report_after = after.join().expect("load driver B after waking");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done: i64 = nodes
                .db
                .query(&format!(
                    "SELECT count(*) FROM deliveries WHERE owner = '{}' \
                     AND state = 'succeeded' AND finished_at > '{since_wake}'",
                    nodes.b_node.replace('\'', "''")
                ))
                .expect("B's deliveries after waking")
                .parse()
                .expect("a count");
            if done > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "B ran no delivery to the end after waking; B after waking: {report_after}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        accepted.extend(ids(&record_after));
        // Nothing became terminal twice through B's late results; read through B.
        check_exactly_once(&nodes.b.url, &accepted, Duration::from_secs(180));
        println!("{name}: drivers: A: {report_a}\nB: {report_b}\nB after waking: {report_after}");
        Measured {
            situation,
            tries: caught.tries,
            running: caught.running.len(),
            transaction,
            requeued,
            taken_over,
            frozen_for,
            events: accepted.len(),
            reruns,
        }
    }

    #[test]
    fn a_frozen_node_cannot_stop_the_other_from_taking_over() {
        let Some(db) = database_or_skip() else {
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db-password"), &db.password).expect("password file");
        let bin = Path::new(env!("CARGO_BIN_EXE_jobhook"));
        let start = |name: &str| {
            let config = dir.path().join(format!("{name}.toml"));
            let text = frozen_config_text(free_port(), &db, &format!("data-{name}"));
            std::fs::write(&config, text).expect("write config");
            EngineProcess::start(bin, &config, &dir.path().join(format!("{name}.log")))
        };
        let a = start("a");
        let b = start("b");
        // Dropped before `b`: a stopped B is continued before it is killed.
        let mut freezer = Freezer::new(b.pid());
        let (a_node, b_node) = (node_id(&a), node_id(&b));
        let mut nodes = Nodes {
            db: &db,
            dir: dir.path(),
            a: &a,
            b: &b,
            b_app: application_name(&b_node),
            a_node,
            b_node,
            watch: watcher(&db),
        };
        let named = sessions(&mut nodes.watch, &nodes.b_app);
        assert!(
            !named.is_empty(),
            "no session of B is named {:?} in pg_stat_activity",
            nodes.b_app
        );

        let mut measured = Vec::new();
        for situation in [Situation::InTransaction, Situation::BetweenTransactions] {
            measured.push(freeze_once(&mut nodes, &mut freezer, situation));
        }
        for m in &measured {
            let transaction = match &m.transaction {
                Some((query, locked, ended)) => format!(
                    "in a transaction holding {locked} of its running deliveries locked (last \
                     statement: {query:?}), which the server ended {:.2} s after the freeze; ",
                    ended.as_secs_f64()
                ),
                None => "with no transaction open; ".into(),
            };
            println!(
                "FROZEN {:?}: caught after {} tries {transaction}{} running deliveries requeued \
                 {:.2} s and all claimed by A {:.2} s after the freeze (bound {:.2} s); {} \
                 events exactly once, {} re-runs; frozen for {:.1} s",
                m.situation,
                m.tries,
                m.running,
                m.requeued.as_secs_f64(),
                m.taken_over.as_secs_f64(),
                takeover_bound().as_secs_f64(),
                m.events,
                m.reruns,
                m.frozen_for.as_secs_f64()
            );
        }
    }
}
