//! The Keyfactor-side forwarder (`forwarder/`, C#) for real: compiled with Mono's `mcs` by
//! `forwarder/build.sh`, driven by its harness (which plays Keyfactor and checks every
//! `RunHandler` call: true, no exception, within the budget), delivering to a real
//! `jobhook serve`. What the engine stored is read back from its SQLite file and through
//! `GET /v1/events/{id}`, and compared field by field with what the harness handed over.
//!
//! Cases:
//! - (a) 1,000 varied contexts through the Command 9-10 registration arrive as 1,000 events with
//!   the same eleven fields; the Command 11+ registration too; a context the engine refuses (413,
//!   a body over its configured limit) is set aside in `rejected/` with its reason beside it, not
//!   retried.
//! - (b) the engine is down at first: every event arrives once it starts; handlers naming the
//!   spool directory two ways share one runtime.
//! - (c) a stand-in in front of the engine that is slow, answers 500/503/401, answers garbage,
//!   resets connections (some after passing the request on), answers 400/413 as a proxy would
//!   (HTML, or JSON that is not the engine's), answers 200 or 409 with an HTML page that is not
//!   the engine's: every event arrives, once, none set aside.
//! - (d) the harness is SIGKILLed mid-delivery, once every event is in the spool, and restarted
//!   in drain mode: the spool is delivered, once. (An event handed over but not yet on disk — a
//!   few milliseconds normally, about 2 s for a burst of 1,000 on a loaded machine — is lost by
//!   a kill; forwarder/README.md, "Limits".)
//! - (e) a full spool drops its oldest events and the forwarder's log counts them; the rest
//!   arrive.
//! - (f) over TLS, only with the configured CA.
//! - (g) the spool directory is deleted while the forwarder runs: it is recreated, and every
//!   later event arrives.
//! - (h) a spool file held open by another program (a scan, a backup) is sent once it is
//!   released, not set aside; the others are sent meanwhile.
//! - (i) events another process spooled into the same directory after this one started (an IIS
//!   overlapped recycle) are sent by this one.
//! - (j) built with `KEYFACTOR_LOGGING`, the forwarder logs through Keyfactor's logger (a
//!   stand-in of its API, `forwarder/shim/Logging.cs`).
//! - (k) built against enums whose member names carry other numbers than the engine's, every
//!   name the engine knows is sent (and stored) as that name; an unknown one by its number.
//! - (l) a normal process exit right after a burst of `RunHandler` calls: every accepted event
//!   is in the spool afterwards.
//! - (m) a log sink that takes 1.5 s per line while the intake queue overflows: every
//!   `RunHandler` call stays within its budget, and the drops are reported in the background.
//! - (n) a spool file listed at start-up but gone when it is sized is skipped; the spool opens.
//! - (o) an event whose body is over the engine's 64 KiB is refused before it is spooled, so it
//!   pushes no other event out of a spool near its byte limit.
//! - (p) a delivered spool file that cannot be deleted (immutable) is not sent again, and is
//!   deleted once it can be.
//! - (q) over TLS, an engine certificate the trusted CA issued for client authentication only
//!   is refused: nothing is delivered.
//! - (r) U+2028, U+2029, U+0085 and bidirectional controls in an answer's body or in the
//!   EngineUrl reach the log as spaces.
//! - (s) with two registrations (two spools), each one's `PendingEvents` counts only its own
//!   events waiting for the intake thread.
//! - (t) a spool directory that cannot be written (immutable) is reported once, not every
//!   second; the events wait in memory and arrive once it can be written again.
//! - (x) hostile values of each setting (a NUL or quotes in a path, `EngineUrl` with the
//!   endpoint path, a `Bearer ` prefix or the prefix alone, `MaxBackoffMs` below
//!   `InitialBackoffMs`, a `ForwarderName` too long or with spaces) are reported by name and
//!   replaced; blank values are unset and report nothing; `ForwarderSettings.Parse` never throws.
//! - (y) a thread that cannot start (the forwarder's internal test hook makes its starts throw)
//!   costs no `RunHandler` call and no event: it is started on a later try, and reported.
//! - (z) the in-memory queues are bounded in bytes, not only in events; an event whose strings
//!   alone are over the engine's 64 KiB is refused before it is queued.
//! - (aa) after the clock went back, new spool files still sort after older ones, and a full
//!   spool drops the oldest first.
//! - (ab) an `EngineUrl` that ends with `/v1/job-complete` is reported, and events arrive.
//! - (ac) a `TrustedCaFile` with another CA before the engine's trusts the engine's.
//! - (ad) after an outage the oldest event goes first again: the failures it was charged while
//!   the way to the engine was down (its own backoff grown to seconds) no longer hold it back.
//! - (ae) at exit, a spool whose writes hang (a disk that does not answer) costs the exit no more
//!   than its deadline, and the events it held are reported lost, with their number.
//! - (af) at exit, an event the intake thread holds and never passes on is waited for a moment,
//!   not the whole deadline: it is reported lost and every other event is in the spool.
//! - (ag) lines dropped while the log sink hangs are counted, and the count is written once the
//!   sink takes lines again: lines written and lines counted as dropped add up to those logged.
//! - (ah) `PendingEvents` read while events move from the intake to their runtime counts each
//!   event once, never twice or not at all.
//! - (ai) an event a full spool drops while its delivery is under way, and which the engine then
//!   accepts, is counted delivered, not dropped as well.
//! - (aj) other programs' files in the spool directory are left alone.
//! - (ak) an engine with the most handlers it allows, each with the longest name, answers each
//!   event with some 17 KB naming them all: understood as its answer, every event delivered once.
//! - (al) a long answer is logged as a short excerpt saying how long it was; a redirect with
//!   where it points, and it is not followed.
//! - (am) a burst behind a small in-memory queue, the engine down: every accepted event is
//!   counted once, spooled or dropped.
//! - (an) a string field over the engine's 4 KiB is refused before it is spooled, the field
//!   named; one of exactly 4 KiB arrives.
//! - (ao) the forwarder's copies of the engine's limits are the engine's.
//! - (ap) at exit, a spool that cannot be written for a moment (its first writes fail) still
//!   gets every event in memory: the flush tries again within its deadline.
//! - (aq) a `*.tmp` another live process is writing in the same spool (an IIS overlapped
//!   recycle) is left alone when this one opens the spool; an old leftover is deleted.
//! - (ar) an engine that fails every other request (a balancer with one dead node) costs a few
//!   log lines that count the short outages, not two lines per event.
//! - (au) a spool that cannot be written (a full disk) while the engine is up costs no event:
//!   each is sent to the engine straight from memory, counted so, and the log says so.
//! - (av) damaged spool files under the forwarder's own names (empty, not UTF-8, another
//!   header, a body cut short, CRLF line ends, a key it never makes, over 256 KiB) are set aside to `rejected/` with their reasons, counted
//!   rejected, and hold back none of the good events.
//! - (aw) a spool directory that cannot be made (a SpoolDirectory the process may not write)
//!   costs no event once the engine is up: each is sent from memory; the engine down
//!   meanwhile is logged, and its return.
//! - (ax) a burst behind a small in-memory queue and a spool that cannot be written, the engine
//!   up: every accepted event is counted once, sent from memory or dropped, and the engine
//!   holds exactly those counted delivered.
//! - (ay) an event the engine refuses when it is sent from memory is logged as refused and not
//!   kept (no file can be made), and holds back none of the others.
//! - (az) an event something keeps failing (a proxy's HTML 413) while the spool cannot be
//!   written holds none of those behind it in memory: they are sent from memory around it.
//! - (ba) a spool directory that cannot be made and no EngineUrl: the log says the events are
//!   held in memory only, not that they are sent to the engine.
//! - (bb, bc) an event whose key the engine already holds for another body (its 409), sent from
//!   the spool and sent from memory: counted as a conflict, logged, never sent again, and the
//!   others arrive.
//!
//! "Once" in (c) and (d) needs the engine to deduplicate by `Idempotency-Key`: there the engine
//! really did commit a request whose answer the forwarder never saw, and the forwarder resends
//! it with the same key. (a) and (b) never resend a committed event.
//!
//! Needs `mcs` and `mono` (scripts/test.sh installs them). Without them the tests fail, unless
//! `JOBHOOK_SKIP_MONO=1` asks explicitly to skip them.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use jobhook::{JobContext, JobResult, OperationType};
use jobhook_testkit::engine::{EngineProcess, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// Contexts in the main run, as the requirement states it.
const EVENTS: usize = 1000;
/// Contexts in the runs that exercise failure paths: enough for many retries and a kill in the
/// middle, few enough to keep the whole file under two minutes.
const FAILURE_EVENTS: usize = 300;
/// The bearer token the engine is configured with and the forwarder sends.
const TOKEN: &str = "forwarder-test-token.0123456789";
/// The forwarder's POST timeout against the real engine: the production default. A commit never
/// legitimately takes this long, so a slow answer cannot make those cases resend an event.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The forwarder's POST timeout against the misbehaving stand-in, whose stalls outlast it.
const STANDIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);
/// First retry delay, short so that retries happen within the test's time (production: 1 s).
const INITIAL_BACKOFF_MS: u32 = 20;
/// Longest retry delay (production: 60 s).
const MAX_BACKOFF_MS: u32 = 300;
/// How long a harness may take to deliver everything before the test gives up.
const DRAIN_SECONDS: u32 = 90;
/// A zone with a non-whole-hour offset and daylight saving time, so that a `DateTime` of kind
/// Local really has to be converted.
const HARNESS_TZ: &str = "America/St_Johns";
/// The engine's SQLite file under its data directory.
const DATABASE_FILE: &str = "jobhook.sqlite";
/// `[server] max_body_bytes` of an engine that must refuse the harness's `--invalid-every`
/// contexts (bodies of some 18 KB, forwarder/harness/Harness.cs) and take every other one
/// (under 10 KB).
const SMALL_BODY_LIMIT: usize = 16 * 1024;

/// The forwarder cases share two cores with the engine and each other: one at a time keeps
/// the RunHandler budget check meaningful.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Building the forwarder

/// The build output of `forwarder/build.sh` (`fx/` and `11/`), or None when the tests are
/// explicitly skipped. Built once per test process.
fn forwarder_build() -> Option<&'static Path> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let missing: Vec<&str> = ["mcs", "mono"]
                .into_iter()
                .filter(|tool| {
                    Command::new(tool)
                        .arg("--version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .map(|s| !s.success())
                        .unwrap_or(true)
                })
                .collect();
            if !missing.is_empty() {
                if std::env::var("JOBHOOK_SKIP_MONO").as_deref() == Ok("1") {
                    eprintln!("SKIPPED: forwarder tests (JOBHOOK_SKIP_MONO=1; missing {missing:?})");
                    return None;
                }
                panic!(
                    "the forwarder tests need {missing:?} (Mono): run scripts/test.sh, which installs \
                     mono-mcs, mono-runtime and libmono-system-net-http4.0-cil, or set \
                     JOBHOOK_SKIP_MONO=1 to skip these tests explicitly"
                );
            }
            let out = tempfile::Builder::new()
                .prefix("jobhook-forwarder-build")
                .tempdir()
                .expect("tempdir")
                .keep();
            let script = workspace_root().join("forwarder").join("build.sh");
            let output = Command::new("bash")
                .arg(&script)
                .arg(&out)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                output.status.success(),
                "forwarder/build.sh failed:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            Some(out)
        })
        .as_deref()
}

/// What every case starts with: the forwarder build, its turn (held while the guard lives) and
/// a fresh site; None when the tests are explicitly skipped.
async fn begin() -> Option<(&'static Path, tokio::sync::MutexGuard<'static, ()>, Site)> {
    let build = forwarder_build()?;
    let serial = SERIAL.lock().await;
    Some((build, serial, Site::new()))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

// ---------------------------------------------------------------------------------------------
// The engine

/// A temp directory with an engine configuration: bearer token, no handlers (every event is
/// still committed and recorded), a fixed port so the forwarder can be pointed at it before the
/// engine runs.
struct Site {
    dir: tempfile::TempDir,
    port: u16,
    /// The forwarder's POST timeout for harnesses run against this site.
    request_timeout: Duration,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("token.txt"), TOKEN).expect("token file");
        let port = free_port();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ntokens = [{{ file = \"token.txt\" }}]\n\n\
             [store]\ndata_dir = \"data\"\n"
        );
        std::fs::write(dir.path().join("jobhook.toml"), config).expect("config");
        Site {
            dir,
            port,
            request_timeout: REQUEST_TIMEOUT,
        }
    }

    /// This site with `server` added to its engine's `[server]` table and `tail` (more
    /// tables, e.g. `[[handlers]]`) after the rest of its configuration.
    fn with_engine_config(self, server: &str, tail: &str) -> Self {
        let port = self.port;
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ntokens = [{{ file = \"token.txt\" }}]\n{server}\n\n\
             [store]\ndata_dir = \"data\"\n\n{tail}"
        );
        std::fs::write(self.dir.path().join("jobhook.toml"), config).expect("config");
        self
    }

    /// This site with its engine taking bodies of at most [`SMALL_BODY_LIMIT`] bytes, so that
    /// the harness's `--invalid-every` contexts are refused by the engine (413) although
    /// nothing in them is over a limit the forwarder knows.
    fn with_small_body_limit(self) -> Self {
        self.with_engine_config(&format!("max_body_bytes = {SMALL_BODY_LIMIT}"), "")
    }

    /// This site with its engine listening with TLS, its certificate issued by a fresh test CA;
    /// returns the path of that CA's certificate.
    fn with_tls(self) -> (Self, PathBuf) {
        self.with_tls_usage("serverAuth")
    }

    /// [`Site::with_tls`] with the engine's certificate issued for `usage` (its
    /// extendedKeyUsage, e.g. `clientAuth`).
    fn with_tls_usage(self, usage: &str) -> (Self, PathBuf) {
        let site = self;
        let ca = write_rsa_pki(site.dir.path(), usage);
        let port = site.port;
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ntokens = [{{ file = \"token.txt\" }}]\n\
             tls = {{ cert = \"server.pem\", key = \"server.key\" }}\n\n\
             [store]\ndata_dir = \"data\"\n"
        );
        std::fs::write(site.dir.path().join("jobhook.toml"), config).expect("config");
        (site, ca)
    }

    fn engine_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn engine_tls_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn start_engine(&self) -> EngineProcess {
        EngineProcess::start(
            Path::new(env!("CARGO_BIN_EXE_jobhook")),
            &self.dir.path().join("jobhook.toml"),
            &self.dir.path().join("engine.log"),
        )
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every event the engine has committed, decoded with the engine's own decoder.
    fn stored_events(&self) -> Vec<(String, JobContext)> {
        let path = self.dir.path().join("data").join(DATABASE_FILE);
        if !path.exists() {
            return Vec::new();
        }
        let db = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        db.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        let mut query = db
            .prepare("SELECT id, context FROM events")
            .expect("events query");
        let rows = query
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .expect("events");
        rows.map(|row| {
            let (id, text) = row.expect("event row");
            let context = JobContext::from_json_bytes(text.as_bytes())
                .unwrap_or_else(|e| panic!("stored context of {id} does not decode: {e}\n{text}"));
            (id, context)
        })
        .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The harness

/// One context the harness handed to RunHandler, as the engine must store it.
#[derive(Debug)]
struct Expected {
    key: String,
    context: JobContext,
    /// It must never be stored: the engine refuses it, or the forwarder does before sending it
    /// (a body or a field over the engine's limit).
    invalid: bool,
}

/// A running harness (`mono harness.exe ...`).
struct Harness {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Harness {
    /// Starts `mono <build>/<variant>/harness.exe <mode> ...` against `url`.
    fn start(
        build: &Path,
        variant: &str,
        site: &Site,
        url: &str,
        mode: &str,
        extra: &[&str],
    ) -> Self {
        let stderr = site.path(&format!("harness-{variant}-{mode}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr)
            .expect("harness log");
        let mut child = Command::new("mono")
            .arg(build.join(variant).join("harness.exe"))
            .arg(mode)
            .args(["--url", url, "--token", TOKEN])
            .arg("--spool")
            .arg(site.spool())
            .args([
                "--timeout-ms",
                &site.request_timeout.as_millis().to_string(),
                "--initial-backoff-ms",
                &INITIAL_BACKOFF_MS.to_string(),
                "--max-backoff-ms",
                &MAX_BACKOFF_MS.to_string(),
                "--wait-seconds",
                &DRAIN_SECONDS.to_string(),
            ])
            .args(extra)
            .env("TZ", HARNESS_TZ)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("cannot start mono");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Harness {
            child,
            lines,
            stderr,
        }
    }

    /// Starts a `run` of `count` contexts writing what it sent to `expected`.
    fn run(
        build: &Path,
        variant: &str,
        site: &Site,
        url: &str,
        count: usize,
        expected: &Path,
        extra: &[&str],
    ) -> Self {
        let count = count.to_string();
        let expected = expected.to_string_lossy();
        let mut args = vec!["--count", &count, "--expected", &expected];
        args.extend_from_slice(extra);
        Harness::start(build, variant, site, url, "run", &args)
    }

    /// Waits for a stdout line starting with `prefix`; panics with the harness log otherwise.
    fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "the harness printed no {prefix:?} line (exit status {status:?}); its log:\n{}",
                        self.log_text()
                    );
                }
            }
        }
    }

    /// Waits for the harness to exit and asserts it succeeded (every RunHandler call within the
    /// rules, and the spool drained).
    fn wait_success(mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(u64::from(DRAIN_SECONDS) + 30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "{what}: the harness failed ({status}); its log:\n{}",
                    self.log_text()
                );
                return;
            }
            if Instant::now() >= deadline {
                let threads = self.thread_dump();
                panic!(
                    "{what}: the harness did not finish; its output and threads \
                     (SIGQUIT):\n{threads}\nits log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the harness printed that was not read yet, after asking Mono for the stack of
    /// every thread (SIGQUIT, printed on stdout): where a harness that does not finish is stuck.
    fn thread_dump(&self) -> String {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_secs(2));
        let lines: Vec<String> = self.lines.try_iter().collect();
        let text = lines.join("\n");
        let start = text.len().saturating_sub(30_000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_owned()
    }

    /// Waits at most `timeout` for the harness to exit: its exit status (None if it did not),
    /// everything it printed on stdout, and its whole log. For a case that checks several
    /// runs and reports every one that went wrong, not only the first.
    fn finish(mut self, timeout: Duration) -> (Option<std::process::ExitStatus>, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader thread ends with the output; one that still runs gives its lines so far.
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = self
            .lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            out.push(line);
        }
        let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        (status, out.join("\n"), log)
    }

    /// [`Harness::wait_success`], then the harness's whole log.
    fn wait_success_log(self, what: &str) -> String {
        let log = self.log_path();
        self.wait_success(what);
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// Panics with the harness's log if it has exited (a RunHandler call broke a rule).
    fn assert_running(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{what}: the harness exited early ({status}); its log:\n{}",
                self.log_text()
            );
        }
    }

    /// SIGKILL, like a crashed or recycled IIS worker process.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_path(&self) -> PathBuf {
        self.stderr.clone()
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        // The interesting part of a long log is its end.
        let start = text.len().saturating_sub(20_000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text[start..].to_owned()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the harness's expected file (format: forwarder/harness/Harness.cs, `ExpectedLine`).
fn read_expected(path: &Path) -> Vec<Expected> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(n, line)| {
            parse_expected(line).unwrap_or_else(|e| panic!("expected line {n}: {e}: {line:?}"))
        })
        .collect()
}

fn parse_expected(line: &str) -> Result<Expected, String> {
    let f: Vec<&str> = line.split('\t').collect();
    let [
        key,
        agent,
        user,
        machine,
        result,
        job,
        job_type,
        type_id,
        operation,
        certificate,
        timestamp,
        retry,
        validity,
    ] = f.as_slice()
    else {
        return Err(format!("{} columns instead of 13", f.len()));
    };
    let text = |b64: &str| -> Result<String, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| e.to_string())?;
        String::from_utf8(bytes).map_err(|e| e.to_string())
    };
    let guid = |s: &str| Uuid::parse_str(s).map_err(|e| format!("{s}: {e}"));
    let int = |s: &str| s.parse::<i64>().map_err(|e| format!("{s}: {e}"));
    let request_timestamp = match *timestamp {
        "null" => None,
        ticks => Some(from_unix_ticks(
            ticks.parse::<i128>().map_err(|e| e.to_string())?,
        )?),
    };
    let context = JobContext {
        agent_id: guid(agent)?,
        username: text(user)?,
        client_machine: text(machine)?,
        job_result: JobResult::from_number(int(result)?),
        job_id: guid(job)?,
        job_type: text(job_type)?,
        job_type_id: guid(type_id)?,
        operation_type: OperationType::from_number(int(operation)?),
        certificate_id: match *certificate {
            "null" => None,
            n => Some(n.parse::<i32>().map_err(|e| e.to_string())?),
        },
        request_timestamp,
        current_retry_count: retry.parse::<i32>().map_err(|e| e.to_string())?,
    };
    Ok(Expected {
        key: (*key).to_owned(),
        context,
        invalid: *validity == "invalid",
    })
}

/// A UTC time from .NET ticks (100 ns) relative to the Unix epoch.
fn from_unix_ticks(ticks: i128) -> Result<DateTime<Utc>, String> {
    let seconds = ticks.div_euclid(10_000_000);
    let nanos = ticks.rem_euclid(10_000_000) * 100;
    let seconds = i64::try_from(seconds).map_err(|e| e.to_string())?;
    let nanos = u32::try_from(nanos).map_err(|e| e.to_string())?;
    DateTime::from_timestamp(seconds, nanos).ok_or_else(|| format!("{ticks} ticks is out of range"))
}

// ---------------------------------------------------------------------------------------------
// Checks

/// Waits until every valid expected context is in the store, then checks that each is there
/// exactly once with equal fields, that nothing else is, and that the invalid ones are not.
/// `needs_idempotency` names the reason when a duplicate can only be avoided by the engine's
/// `Idempotency-Key` deduplication.
fn assert_delivered_once(site: &Site, expected: &[Expected], needs_idempotency: Option<&str>) {
    let wanted: HashMap<Uuid, &Expected> = expected.iter().map(|e| (e.context.job_id, e)).collect();
    assert_eq!(wanted.len(), expected.len(), "the harness repeated a JobId");
    let valid = expected.iter().filter(|e| !e.invalid).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let stored = site.stored_events();
        let arrived: HashSet<Uuid> = stored.iter().map(|(_, c)| c.job_id).collect();
        let missing = expected
            .iter()
            .filter(|e| !e.invalid && !arrived.contains(&e.context.job_id))
            .count();
        if missing == 0 {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {valid} events never arrived"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let mut by_job: HashMap<Uuid, Vec<&(String, JobContext)>> = HashMap::new();
    for event in &stored {
        by_job.entry(event.1.job_id).or_default().push(event);
    }
    let mut problems = Vec::new();
    let mut duplicates = 0;
    for e in expected {
        let events = by_job
            .get(&e.context.job_id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if e.invalid {
            if !events.is_empty() {
                problems.push(format!("an invalid context was stored: {:?}", events[0].0));
            }
            continue;
        }
        if events.len() > 1 {
            duplicates += 1;
        }
        for (id, context) in events {
            if *context != e.context {
                problems.push(format!(
                    "event {id} (key {}) differs:\n  stored   {context:?}\n  expected {:?}",
                    e.key, e.context
                ));
            }
        }
    }
    let unexpected = stored
        .iter()
        .filter(|(_, c)| !wanted.contains_key(&c.job_id))
        .count();
    if unexpected > 0 {
        problems.push(format!("{unexpected} stored events were never handed over"));
    }
    if duplicates > 0 {
        problems.push(format!(
            "{duplicates} events were stored more than once{}",
            needs_idempotency
                .map(|why| format!(
                    " — this case needs the engine to deduplicate by Idempotency-Key ({why})"
                ))
                .unwrap_or_default()
        ));
    }
    problems.truncate(20);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(stored.len(), valid, "stored events");
}

/// The API shows the same context as the store, for a few events.
async fn assert_api_agrees(engine: &EngineProcess, site: &Site) {
    let client = reqwest::Client::new();
    for (id, context) in site.stored_events().iter().take(20) {
        let response = client
            .get(format!("{}/v1/events/{id}", engine.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET event");
        assert_eq!(response.status().as_u16(), 200);
        let text = response.text().await.expect("event body");
        let body: serde_json::Value = serde_json::from_str(&text).expect("event JSON");
        let shown = JobContext::from_json_value(&body["context"]).expect("API context decodes");
        assert_eq!(&shown, context, "GET /v1/events/{id}");
    }
}

/// The engine lists the forwarder (named by `X-Jobhook-Forwarder`, the machine name by default)
/// with every event it accepted from it.
async fn assert_forwarder_listed(engine: &EngineProcess, accepted: usize) {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/forwarders", engine.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET forwarders");
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.expect("forwarders body");
    let body: serde_json::Value = serde_json::from_str(&text).expect("forwarders JSON");
    let list = body["forwarders"].as_array().expect("a list");
    assert_eq!(list.len(), 1, "one forwarder machine: {body}");
    assert!(
        list[0]["name"].as_str().is_some_and(|n| !n.is_empty()),
        "{body}"
    );
    assert_eq!(list[0]["accepted"], accepted as u64, "{body}");
}

/// Writes an RSA test CA (`ca.pem`) and a server certificate and key for `127.0.0.1` and
/// `localhost` (`server.pem`, `server.key`) whose extendedKeyUsage is `usage` (`serverAuth` for
/// a proper server) into `dir` with the `openssl` command, and returns
/// the CA's path. RSA, not the test kit's ECDSA certificates: with those, Mono's TLS stack (what
/// the forwarder runs on in these tests) failed the handshake with CERTIFICATE_VERIFY_FAILED even
/// with the CA trusted; with RSA it validates against `TrustedCaFile`. ECDSA on Windows is not
/// tested here.
fn write_rsa_pki(dir: &Path, usage: &str) -> PathBuf {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=jobhook forwarder test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
        ),
    )
    .expect("extensions file");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    dir.join("ca.pem")
}

/// Event files (`*.evt`) directly in `dir`; 0 if it does not exist.
fn evt_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "evt"))
                .count()
        })
        .unwrap_or(0)
}

/// Events in the spool.
fn spool_files(site: &Site) -> usize {
    evt_files(&site.spool())
}

/// Events in `rejected/` (not counting their `.reason` files).
fn rejected_files(site: &Site) -> usize {
    evt_files(&site.spool().join("rejected"))
}

/// Each event in `rejected/` has a `.reason` file beside it that contains `needle`.
fn assert_rejected_reasons(site: &Site, needle: &str) {
    let dir = site.spool().join("rejected");
    let entries = std::fs::read_dir(&dir).expect("rejected/");
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "evt") {
            continue;
        }
        let mut reason = path.clone().into_os_string();
        reason.push(".reason");
        let text = std::fs::read_to_string(&reason)
            .unwrap_or_else(|e| panic!("no reason beside {}: {e}", path.display()));
        assert!(
            text.contains(needle),
            "the reason beside {} says {text:?}",
            path.display()
        );
    }
}

/// Waits until the harness's log contains `needle`; panics with the log after 10 s or if the
/// harness exits.
fn wait_for_log(harness: &mut Harness, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(harness.log_path())
        .unwrap_or_default()
        .contains(needle)
    {
        harness.assert_running(&format!("waiting for {needle:?} in its log"));
        assert!(
            Instant::now() < deadline,
            "the harness never logged {needle:?}; its log:\n{}",
            harness.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of a harness log that contain `needle`.
fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

// ---------------------------------------------------------------------------------------------
// The cases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_every_context_arrives_as_one_event_with_the_same_fields() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let site = site.with_small_body_limit();
    let engine = site.start_engine();

    // Command 9-10: Unity sets the properties.
    let expected_fx = site.path("expected-fx.tsv");
    let harness = Harness::run(build, "fx", &site, &engine.url, EVENTS, &expected_fx, &[]);
    harness.wait_success("Command 9-10 registration");
    let mut expected = read_expected(&expected_fx);
    assert_eq!(expected.len(), EVENTS);

    // Command 11+: IOptions<Options>; a few contexts the engine must refuse.
    let expected_11 = site.path("expected-11.tsv");
    let harness = Harness::run(
        build,
        "11",
        &site,
        &engine.url,
        200,
        &expected_11,
        &["--invalid-every", "50", "--seed", "11"],
    );
    harness.wait_success("Command 11+ registration");
    let more = read_expected(&expected_11);
    let invalid = more.iter().filter(|e| e.invalid).count();
    assert_eq!(invalid, 4);
    expected.extend(more);

    assert_delivered_once(&site, &expected, None);
    assert_api_agrees(&engine, &site).await;
    assert_forwarder_listed(&engine, expected.len() - invalid).await;
    assert_eq!(spool_files(&site), 0, "the spool is empty once delivered");
    assert_eq!(
        rejected_files(&site),
        invalid,
        "each refused event is set aside"
    );
    assert_rejected_reasons(
        &site,
        &format!(
            "HTTP 413 {{\"error\":\"the request body is larger than the limit of {SMALL_BODY_LIMIT} bytes"
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_events_wait_in_the_spool_until_the_engine_starts() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected = site.path("expected.tsv");
    // Every other handler names the spool directory with a trailing separator: still one
    // directory, so one runtime (two would both send every file).
    let alias = format!("{}{}", site.spool().display(), std::path::MAIN_SEPARATOR);
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        FAILURE_EVENTS,
        &expected,
        &["--alias-spool", &alias],
    );
    harness.wait_for_line("submitted", Duration::from_secs(60));
    // Let the sender fail and back off a few times against the closed port.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    harness.assert_running("while the engine is down");
    assert!(
        spool_files(&site) > 0,
        "events wait in the spool while the engine is down"
    );
    let _engine = site.start_engine();
    let log = harness.wait_success_log("engine down at first");
    assert_delivered_once(&site, &read_expected(&expected), None);
    assert_eq!(
        count_lines(&log, "through the spool"),
        1,
        "one runtime for one spool directory, however it is written:\n{log}"
    );
    assert!(
        log.contains("BearerToken is configured with an http:// EngineUrl"),
        "a token sent over plain HTTP is reported as a configuration problem:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_misbehaving_engine_costs_retries_not_events() {
    let Some((build, _serial, mut site)) = begin().await else {
        return;
    };
    site.request_timeout = STANDIN_REQUEST_TIMEOUT;
    let engine = site.start_engine();
    let standin = Standin::start(engine.url.clone(), MISBEHAVING_ROUNDS).await;
    let expected_path = site.path("expected.tsv");
    let harness = Harness::run(
        build,
        "11",
        &site,
        &standin.url,
        FAILURE_EVENTS,
        &expected_path,
        &["--seed", "3"],
    );
    harness.wait_success("misbehaving engine");
    let expected = read_expected(&expected_path);
    assert!(
        standin.misbehaved.load(Ordering::SeqCst) >= MISBEHAVIOURS.len() * 3,
        "the stand-in did not get to misbehave"
    );
    standin.assert_keys(&expected);
    assert_delivered_once(
        &site,
        &expected,
        Some("the stand-in passed requests on to the engine and then dropped the answer"),
    );
    assert!(
        DAMAGED_ANSWERED_400.load(Ordering::SeqCst) >= MISBEHAVING_ROUNDS,
        "the engine did not answer the damaged bodies with 400"
    );
    assert_eq!(
        rejected_files(&site),
        0,
        "a 400 or 413 that is not the engine's, or the engine's 400 to a body damaged on its \
         way, sets nothing aside"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_killed_forwarder_delivers_its_spool_after_restart() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    let url = site.engine_url();
    let mut harness = Harness::run(build, "fx", &site, &url, EVENTS, &expected_path, &[]);
    harness.wait_for_line("submitted", Duration::from_secs(60));
    // RunHandler returns before the event is on disk (it never waits); what must survive a kill
    // is what is in the spool, so the kill comes after every event is there.
    harness.wait_for_line("spooled", Duration::from_secs(60));
    let _engine = site.start_engine();
    // Kill the process in the middle of delivering: some events are in, most are not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while site.stored_events().len() < 50 {
        harness.assert_running("before the kill");
        assert!(Instant::now() < deadline, "delivery never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    harness.kill();
    let left = spool_files(&site);
    assert!(
        left > 0 && left < EVENTS,
        "the kill came mid-delivery ({left} events left in the spool)"
    );

    let drain = Harness::start(build, "fx", &site, &url, "drain", &[]);
    drain.wait_success("drain after SIGKILL");
    assert_delivered_once(
        &site,
        &read_expected(&expected_path),
        Some("the event in flight when the process was killed may have been committed"),
    );
    assert_eq!(spool_files(&site), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_full_spool_drops_the_oldest_and_says_so() {
    const SENT: usize = 50;
    const KEPT: usize = 20;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    // One Keyfactor thread, so that "oldest" is "lowest index".
    let kept = KEPT.to_string();
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &["--threads", "1", "--max-spool-files", &kept],
    );
    harness.wait_for_line("spooled", Duration::from_secs(60));
    assert_eq!(
        spool_files(&site),
        KEPT,
        "the spool holds at most its limit"
    );
    let _engine = site.start_engine();
    let log = harness.wait_success_log("full spool");

    let dropped = SENT - KEPT;
    // The newest KEPT arrive. A dropped event may arrive too if the sender was already posting
    // it when the spool dropped its file (one at most: it sends one at a time) — seen when
    // Mono's first request took longer than the engine's start.
    let mut expected = read_expected(&expected_path);
    let stored: HashSet<Uuid> = site.stored_events().iter().map(|(_, c)| c.job_id).collect();
    let mut arrived_anyway = Vec::new();
    let newest = expected.split_off(dropped);
    for event in expected {
        if stored.contains(&event.context.job_id) {
            arrived_anyway.push(event);
        }
    }
    assert!(
        arrived_anyway.len() <= 1,
        "{} dropped events arrived; only one in flight may",
        arrived_anyway.len()
    );
    // Counted, not logged one by one: the first at once, the rest in the report at exit. One
    // that arrived all the same is not lost, and not counted (case ai).
    let lost = dropped - arrived_anyway.len();
    assert!(
        log.lines()
            .any(|line| line.contains("is full (20 events or")
                && line.contains(&format!(" {lost} since start"))),
        "the forwarder's log counts the {lost} dropped events that did not arrive:\n{log}"
    );
    arrived_anyway.extend(newest);
    assert_delivered_once(&site, &arrived_anyway, None);
}

// ---------------------------------------------------------------------------------------------
// A misbehaving engine

/// What the stand-in does with one request.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Answer 500 without passing the request on.
    Error500,
    /// Answer bytes that are not HTTP, then close.
    Garbage,
    /// Reset the connection (RST) without passing the request on.
    ResetFirst,
    /// Pass the request on (the engine commits it), then reset the connection.
    ResetAfter,
    /// Pass the request on, then say nothing until the forwarder's timeout has passed.
    StallAfter,
    /// Wait (less than the forwarder's timeout), then pass the request on and answer.
    Slow,
    /// Answer 401 as if the token were wrong.
    Unauthorized,
    /// Pass the request on, then answer 503 anyway.
    Error503After,
    /// Answer 400 with an HTML page, as nginx does to plain HTTP on its TLS port, without
    /// passing the request on.
    ProxyBadRequest,
    /// Answer 413 with an HTML page, as a proxy with a small body limit does, without passing
    /// the request on.
    ProxyTooLarge,
    /// Answer 400 with a JSON body that is not the engine's (`{"message":…}`, as API gateways
    /// do), without passing the request on.
    ProxyJsonBadRequest,
    /// Pass the request on with its chunked framing broken half way (what a proxy or a link
    /// that damages a body sends), and hand the engine's own answer back as it came.
    DamagedInTransit,
    /// Answer 200 with an HTML page without passing the request on: a captive portal, a
    /// misconfigured EngineUrl pointing at a web server, a load balancer's maintenance page.
    /// Not the engine's acceptance.
    HtmlOk,
    /// Answer 409 with an HTML page without passing the request on (a WAF or proxy's
    /// "Conflict" page). Not the engine's conflict.
    HtmlConflict,
    /// Behave.
    Forward,
}

/// The misbehaviour cycle; the first `MISBEHAVIOURS.len() * MISBEHAVING_ROUNDS` requests go
/// through it, the rest are passed on faithfully.
const MISBEHAVIOURS: [Behaviour; 15] = [
    Behaviour::Error500,
    // After a request that committed nothing: the event is lost if this answer deletes it.
    Behaviour::HtmlOk,
    Behaviour::Garbage,
    Behaviour::ResetFirst,
    // After a request that committed nothing, likewise.
    Behaviour::HtmlConflict,
    Behaviour::ProxyBadRequest,
    Behaviour::ResetAfter,
    Behaviour::StallAfter,
    Behaviour::ProxyTooLarge,
    Behaviour::Slow,
    Behaviour::Unauthorized,
    // After a request that committed nothing: the damaged one carries an event the engine has
    // not seen, which is lost if it is set aside.
    Behaviour::DamagedInTransit,
    Behaviour::ProxyJsonBadRequest,
    Behaviour::Error503After,
    Behaviour::Forward,
];
/// nginx's answer to plain HTTP sent to its TLS port.
const NGINX_400: &[u8] = b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title></head>\r\n\
<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n\
<center>The plain HTTP request was sent to HTTPS port</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
/// nginx's answer to a body over its `client_max_body_size`.
const NGINX_413: &[u8] = b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n\
<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
/// A web page answered with 200 by something that is not the engine.
const HTML_OK: &[u8] =
    b"<html><head><title>Welcome</title></head><body>It works!</body></html>\r\n";
/// A web page answered with 409 by something that is not the engine.
const HTML_CONFLICT: &[u8] =
    b"<html><head><title>409 Conflict</title></head><body><h1>Conflict</h1></body></html>\r\n";
const MISBEHAVING_ROUNDS: usize = 4;
/// Largest request head the stand-in reads (the forwarder's is a few hundred bytes).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body the stand-in reads (the engine's own limit is 64 KiB).
const MAX_BODY_BYTES: usize = 128 * 1024;

/// (Idempotency-Key, body) of every request the stand-in received.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An HTTP/1.1 server in front of the real engine that misbehaves in every way an engine or a
/// network can for the first requests, recording each request's idempotency key and body.
struct Standin {
    url: String,
    misbehaved: Arc<AtomicUsize>,
    seen: Seen,
}

struct Request {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Standin {
    /// A stand-in that goes through [`MISBEHAVIOURS`] `rounds` times, then behaves (0: it
    /// always behaves, and only records what it passes on).
    async fn start(engine_url: String, rounds: usize) -> Self {
        Standin::start_with(engine_url, rounds, None).await
    }

    /// A stand-in that answers every request for the first event it sees (by its key) with a
    /// proxy's HTML 413, as a gateway whose body limit that one event exceeds would, and passes
    /// every other request on: the key it picked is in `poisoned`.
    async fn poisoning_the_first(engine_url: String, poisoned: Arc<Mutex<Option<String>>>) -> Self {
        Standin::start_with(engine_url, 0, Some((poisoned, Pick::TooLarge))).await
    }

    /// A stand-in that, before passing on the first request it sees, posts the engine another
    /// event under the same key (the same context with another JobId), so the engine answers
    /// that request with its own 409: the key is in `picked`. Everything is passed on.
    async fn conflicting_the_first(engine_url: String, picked: Arc<Mutex<Option<String>>>) -> Self {
        Standin::start_with(engine_url, 0, Some((picked, Pick::Conflicting))).await
    }

    async fn start_with(
        engine_url: String,
        rounds: usize,
        picked: Option<(Arc<Mutex<Option<String>>>, Pick)>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let standin = Standin {
            url,
            misbehaved: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        let shared = Shared {
            counter: Arc::new(AtomicUsize::new(0)),
            misbehaved: standin.misbehaved.clone(),
            seen: standin.seen.clone(),
            picked,
        };
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve_connection(
                    socket,
                    rounds,
                    engine_url.clone(),
                    client.clone(),
                    shared.clone(),
                ));
            }
        });
        standin
    }

    /// Every request for one event carried that event's key, and no two events shared one.
    fn assert_keys(&self, expected: &[Expected]) {
        let key_of: HashMap<Uuid, &str> = expected
            .iter()
            .map(|e| (e.context.job_id, e.key.as_str()))
            .collect();
        let seen = self.seen.lock().expect("records");
        let mut keys_seen = HashSet::new();
        for (key, body) in seen.iter() {
            let context =
                JobContext::from_json_bytes(body).expect("the forwarder sent a valid context");
            assert_eq!(
                key_of.get(&context.job_id).copied(),
                Some(key.as_str()),
                "a request for job {} carried another key",
                context.job_id
            );
            keys_seen.insert(key.clone());
        }
        assert_eq!(keys_seen.len(), expected.len(), "one key per event");
        assert!(
            seen.len() > expected.len(),
            "some events were sent more than once"
        );
    }
}

/// What every connection of one stand-in shares.
#[derive(Clone)]
struct Shared {
    /// Requests so far (the misbehaviour cycle's position).
    counter: Arc<AtomicUsize>,
    misbehaved: Arc<AtomicUsize>,
    seen: Seen,
    /// The key of the first event seen, once picked, and what is done to it.
    picked: Option<(Arc<Mutex<Option<String>>>, Pick)>,
}

/// What a stand-in does to the first event it sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// Every request for it is answered with a proxy's HTML 413 (`Standin::poisoning_the_first`).
    TooLarge,
    /// The engine is given another event under its key first (`Standin::conflicting_the_first`).
    Conflicting,
}

async fn serve_connection(
    mut socket: TcpStream,
    rounds: usize,
    engine_url: String,
    client: reqwest::Client,
    shared: Shared,
) {
    let Shared {
        counter,
        misbehaved,
        seen,
        picked,
    } = shared;
    let mut buffer = Vec::new();
    while let Some(request) = read_request(&mut socket, &mut buffer).await {
        let key = request.header("Idempotency-Key").unwrap_or("").to_owned();
        if let Ok(mut seen) = seen.lock() {
            seen.push((key.clone(), request.body.clone()));
        }
        // Whether this request is for the picked event, and whether it is its first.
        let (this_one, first) = picked.as_ref().map_or((false, false), |(picked, _)| {
            let mut picked = picked.lock().expect("picked key");
            let first = picked.is_none();
            (picked.get_or_insert_with(|| key.clone()) == &key, first)
        });
        let pick = picked.as_ref().map(|(_, pick)| *pick);
        let poison = this_one && pick == Some(Pick::TooLarge);
        if this_one && first && pick == Some(Pick::Conflicting) {
            let (status, answer) =
                forward(&client, &engine_url, &with_another_job_id(&request)).await;
            assert_eq!(
                status,
                202,
                "the engine took the event forged under the key: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let behaviour = if poison {
            Behaviour::ProxyTooLarge
        } else if n < MISBEHAVIOURS.len() * rounds {
            MISBEHAVIOURS[n % MISBEHAVIOURS.len()]
        } else {
            Behaviour::Forward
        };
        if !matches!(behaviour, Behaviour::Forward) {
            misbehaved.fetch_add(1, Ordering::SeqCst);
        }
        let keep_going = match behaviour {
            Behaviour::Error500 => respond(&mut socket, 500, b"{\"error\":\"stand-in\"}").await,
            Behaviour::ProxyBadRequest => {
                respond_as(&mut socket, 400, "text/html", NGINX_400).await
            }
            Behaviour::ProxyTooLarge => respond_as(&mut socket, 413, "text/html", NGINX_413).await,
            Behaviour::HtmlOk => respond_as(&mut socket, 200, "text/html", HTML_OK).await,
            Behaviour::HtmlConflict => {
                respond_as(&mut socket, 409, "text/html", HTML_CONFLICT).await
            }
            Behaviour::ProxyJsonBadRequest => {
                respond(&mut socket, 400, b"{\"message\":\"Bad Request\"}").await
            }
            Behaviour::Unauthorized => respond(&mut socket, 401, b"{\"error\":\"token\"}").await,
            Behaviour::Garbage => {
                let _ = socket
                    .write_all(b"\x00\xffSURPRISE not http\r\n\r\n{{{")
                    .await;
                false
            }
            Behaviour::ResetFirst => {
                reset(socket);
                return;
            }
            Behaviour::ResetAfter => {
                forward(&client, &engine_url, &request).await;
                reset(socket);
                return;
            }
            Behaviour::StallAfter => {
                forward(&client, &engine_url, &request).await;
                tokio::time::sleep(STANDIN_REQUEST_TIMEOUT * 2).await;
                return;
            }
            Behaviour::Error503After => {
                forward(&client, &engine_url, &request).await;
                respond(&mut socket, 503, b"{\"error\":\"overloaded\"}").await
            }
            Behaviour::Slow => {
                tokio::time::sleep(STANDIN_REQUEST_TIMEOUT / 3).await;
                let (status, body) = forward(&client, &engine_url, &request).await;
                respond(&mut socket, status, &body).await
            }
            Behaviour::DamagedInTransit => {
                let answer = forward_damaged(&engine_url, &request).await;
                let _ = socket.write_all(&answer).await;
                false
            }
            Behaviour::Forward => {
                let (status, body) = forward(&client, &engine_url, &request).await;
                respond(&mut socket, status, &body).await
            }
        };
        if !keep_going {
            return;
        }
    }
}

/// Reads one request (head and Content-Length body); None at EOF or on anything unexpected.
async fn read_request(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(chunk.get(..n)?);
    };
    let head = String::from_utf8_lossy(buffer.get(..head_end)?).into_owned();
    let headers: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > MAX_BODY_BYTES {
        return None;
    }
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(chunk.get(..n)?);
    }
    let body = buffer.get(body_start..body_start + length)?.to_vec();
    buffer.drain(..body_start + length);
    Some(Request { headers, body })
}

/// Passes the request on to the engine; (status, body), or 502 if the engine cannot be reached.
async fn forward(client: &reqwest::Client, engine_url: &str, request: &Request) -> (u16, Vec<u8>) {
    let mut call = client
        .post(format!("{engine_url}/v1/job-complete"))
        .body(request.body.clone());
    for name in ["authorization", "content-type", "idempotency-key"] {
        if let Some(value) = request.header(name) {
            call = call.header(name, value);
        }
    }
    match call.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response
                .bytes()
                .await
                .map(|b| b.to_vec())
                .unwrap_or_default();
            (status, body)
        }
        Err(_) => (502, b"{\"error\":\"engine unreachable\"}".to_vec()),
    }
}

/// The JobId of the event a conflicting stand-in forges for the job `original`.
fn forged_job_id(original: Uuid) -> Uuid {
    Uuid::from_u128(original.as_u128() ^ 0xff)
}

/// The request with another JobId in its context ([`forged_job_id`]): another event under the
/// same key.
fn with_another_job_id(request: &Request) -> Request {
    let mut context: serde_json::Value =
        serde_json::from_slice(&request.body).expect("the forwarder sent JSON");
    let original = context["JobId"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .expect("a context with a JobId");
    context["JobId"] = serde_json::Value::String(forged_job_id(original).to_string());
    Request {
        headers: request.headers.clone(),
        body: serde_json::to_vec(&context).expect("JSON"),
    }
}

/// Sends the request to the engine over a plain connection with a chunked body whose framing
/// breaks after half the body, and returns the engine's answer byte for byte (head and body,
/// read to the close the engine ends it with); an empty answer if the engine cannot be reached.
async fn forward_damaged(engine_url: &str, request: &Request) -> Vec<u8> {
    let Some(address) = engine_url.strip_prefix("http://") else {
        return Vec::new();
    };
    let Ok(mut engine) = TcpStream::connect(address).await else {
        return Vec::new();
    };
    let mut head = String::from("POST /v1/job-complete HTTP/1.1\r\nHost: engine\r\n");
    for name in ["authorization", "content-type", "idempotency-key"] {
        if let Some(value) = request.header(name) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("Transfer-Encoding: chunked\r\n\r\n");
    let half = &request.body[..request.body.len() / 2];
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(format!("{:x}\r\n", half.len()).as_bytes());
    bytes.extend_from_slice(half);
    // The next chunk's size line is not hexadecimal: the framing is broken.
    bytes.extend_from_slice(b"\r\nzz\r\n");
    if engine.write_all(&bytes).await.is_err() {
        return Vec::new();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), engine.read_to_end(&mut answer)).await;
    if answer.starts_with(b"HTTP/1.1 400") {
        DAMAGED_ANSWERED_400.fetch_add(1, Ordering::SeqCst);
    }
    answer
}

/// How many damaged requests the engine answered with 400 (the forwarder tests run one at a
/// time, so one count serves).
static DAMAGED_ANSWERED_400: AtomicUsize = AtomicUsize::new(0);

/// Writes a JSON response; false if the connection is gone.
async fn respond(socket: &mut TcpStream, status: u16, body: &[u8]) -> bool {
    respond_as(socket, status, "application/json", body).await
}

/// Writes a response of the given content type; false if the connection is gone.
async fn respond_as(socket: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> bool {
    let head = format!(
        "HTTP/1.1 {status} Stand-in\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.is_ok() && socket.write_all(body).await.is_ok()
}

/// Closes with RST instead of FIN: what a crashed peer or a middlebox looks like.
fn reset(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_over_tls_the_forwarder_trusts_only_the_configured_ca() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let (site, ca) = site.with_tls();
    let _engine = site.start_engine();
    let url = site.engine_tls_url();

    // Without the engine's CA the forwarder must not deliver: the certificate is not trusted.
    let untrusted = site.path("expected-untrusted.tsv");
    let mut harness = Harness::run(build, "fx", &site, &url, 5, &untrusted, &[]);
    harness.wait_for_line("spooled", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        site.stored_events().is_empty(),
        "an engine with an untrusted certificate got events"
    );
    drop(harness);

    // Trusting the test CA (TrustedCaFile), the spooled events and new ones arrive, once.
    let expected_path = site.path("expected.tsv");
    let ca = ca.to_string_lossy();
    let harness = Harness::run(
        build,
        "11",
        &site,
        &url,
        20,
        &expected_path,
        &["--ca", &ca, "--seed", "6"],
    );
    harness.wait_success("TLS with the test CA");
    // The five spooled while the certificate was not trusted are delivered now too.
    let mut expected = read_expected(&untrusted);
    assert_eq!(expected.len(), 5);
    expected.extend(read_expected(&expected_path));
    assert_delivered_once(&site, &expected, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_spool_directory_deleted_while_running_is_recreated() {
    const SENT: usize = 40;
    const BEFORE: usize = 10;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    let resume = site.path("resume");
    let (before, resume_arg) = (BEFORE.to_string(), resume.to_string_lossy().into_owned());
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &["--pause-after", &before, "--resume-file", &resume_arg],
    );
    let paused = harness.wait_for_line("paused", Duration::from_secs(60));
    assert_eq!(paused, format!("paused {BEFORE}"));
    assert_eq!(spool_files(&site), BEFORE);
    // The sender has met the closed port, so it is retrying: reading the oldest file again
    // before each attempt.
    wait_for_log(&mut harness, "cannot deliver to");
    // Deleted with everything in it, while the forwarder runs: taken away in one step (a
    // rename), then deleted. Deleted file by file in place, the sender could meet a file gone
    // from a directory still there, and forget it as one another process sent, before it saw
    // the directory go: the count of what was lost with it would be short by those.
    let taken = site.path("spool-deleted");
    std::fs::rename(site.spool(), &taken).expect("take the spool directory away");
    std::fs::remove_dir_all(&taken).expect("delete the spool directory");
    std::fs::write(&resume, b"").expect("resume file");
    let _engine = site.start_engine();
    let log = harness.wait_success_log("spool directory deleted");

    // The first BEFORE went with the directory; every later one arrives, once. The sender may
    // have read the oldest just before the deletion and deliver it (one at most: it sends one
    // at a time).
    let mut expected = read_expected(&expected_path);
    assert_eq!(expected.len(), SENT);
    let later = expected.split_off(BEFORE);
    let stored: HashSet<Uuid> = site.stored_events().iter().map(|(_, c)| c.job_id).collect();
    let mut arrived: Vec<Expected> = expected
        .into_iter()
        .filter(|e| stored.contains(&e.context.job_id))
        .collect();
    assert!(
        arrived.len() <= 1,
        "{} events deleted with the directory arrived",
        arrived.len()
    );
    arrived.extend(later);
    assert_delivered_once(&site, &arrived, None);
    assert!(
        log.contains(&format!("({BEFORE} spooled event(s) were lost with it)")),
        "the forwarder says it recreated the directory and what was lost:\n{log}"
    );
    assert!(
        !log.contains("moved to"),
        "nothing was set aside as rejected:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_a_spool_file_held_open_is_sent_later_not_rejected() {
    const SENT: usize = 30;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &["--hold-oldest-ms", "3000"],
    );
    let held = harness.wait_for_line("holding", Duration::from_secs(60));
    let held = held.trim_start_matches("holding ").to_owned();
    // The engine starts once the file is released: for those 3 s the sender, retrying the closed
    // port every 300 ms at most, read the oldest file before each attempt and met the lock.
    harness.wait_for_line("released", Duration::from_secs(30));
    let warning = format!("cannot read spool file {held} now");
    let _engine = site.start_engine();
    let log = harness.wait_success_log("a spool file held open");

    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert_eq!(rejected_files(&site), 0, "the held file was not set aside");
    assert_eq!(
        count_lines(&log, &warning),
        1,
        "one warning for the held file:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_events_another_process_spooled_later_are_sent() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let url = site.engine_url();
    // A opens the spool first and keeps running (the engine is down).
    let expected_a = site.path("expected-a.tsv");
    let mut a = Harness::run(build, "fx", &site, &url, 20, &expected_a, &["--seed", "21"]);
    a.wait_for_line("spooled", Duration::from_secs(60));
    // B, another process on the same directory, spools its events and dies (the old worker of
    // an overlapped recycle).
    let expected_b = site.path("expected-b.tsv");
    let mut b = Harness::run(build, "fx", &site, &url, 30, &expected_b, &["--seed", "22"]);
    b.wait_for_line("spooled", Duration::from_secs(60));
    b.kill();
    assert_eq!(spool_files(&site), 50);
    a.assert_running("before the engine starts");

    let _engine = site.start_engine();
    a.wait_success("events spooled by another process");
    let mut expected = read_expected(&expected_a);
    expected.extend(read_expected(&expected_b));
    assert_delivered_once(&site, &expected, None);
    assert_eq!(spool_files(&site), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_with_keyfactor_logging_the_forwarder_logs_through_keyfactor() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    // This harness does not set the forwarder's log; it learns each event's key only from the
    // lines that reach Keyfactor's logger, and fails without them.
    let harness = Harness::run(build, "log", &site, &engine.url, 20, &expected_path, &[]);
    let log = harness.wait_success_log("KEYFACTOR_LOGGING");
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert!(
        log.contains("keyfactor log Jobhook.Forwarder.JobhookForwarder Information: forwarding to"),
        "the forwarder's lines reach Keyfactor's logger, named after the handler:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_enums_are_sent_by_name_whatever_their_numbers() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    // The "renum" build's shim gives every JobResult and OperationType name another number
    // than the engine's (Success is 1, the engine's InProcess; Add is 1, the engine's
    // Inventory; ...) and adds a member the engine does not know to each. The harness expects
    // each known name stored as that name, and an unknown one by its number.
    let harness = Harness::run(
        build,
        "renum",
        &site,
        &engine.url,
        150,
        &expected_path,
        &["--seed", "31"],
    );
    harness.wait_success("renumbered enums");
    let expected = read_expected(&expected_path);
    assert!(
        expected
            .iter()
            .any(|e| e.context.job_result == JobResult::Success),
        "some context was a Success"
    );
    assert_delivered_once(&site, &expected, None);
}

/// A run of `count` events whose spool directory cannot be made (see
/// [`spool_that_cannot_open`]), posting to `url`: every event is sent from memory, or held
/// there without a URL.
fn run_with_unusable_spool(
    build: &Path,
    site: &Site,
    url: &str,
    count: usize,
    expected: &Path,
    extra: &[&str],
) -> Harness {
    let broken = spool_that_cannot_open(site);
    let mut args = vec!["--spool", broken.as_str()];
    args.extend_from_slice(extra);
    Harness::run(build, "fx", site, url, count, expected, &args)
}

/// A spool directory that can never be made, even as root: it lies under a regular file.
fn spool_that_cannot_open(site: &Site) -> String {
    let blocker = site.path("not-a-directory");
    std::fs::write(&blocker, b"a file").expect("blocking file");
    blocker.join("spool").to_string_lossy().into_owned()
}

/// Runs the harness's `burst` mode (`count` RunHandler calls, then a normal exit) with `extra`
/// options, waits for it to succeed, and gives its log.
fn burst(build: &Path, site: &Site, count: usize, extra: &[&str], what: &str) -> String {
    let count = count.to_string();
    let mut args = vec!["--count", count.as_str()];
    args.extend_from_slice(extra);
    Harness::start(build, "fx", site, &site.engine_url(), "burst", &args).wait_success_log(what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l_a_normal_exit_writes_every_accepted_event_to_the_spool() {
    const SENT: usize = 2000;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // No engine: nothing is delivered, so every accepted event must be in the spool. The
    // harness returns from Main as soon as the last RunHandler returned, with most events still
    // in the forwarder's memory (an iisreset or app pool recycle does the same).
    // About the exit, not the budget: a bound a loaded machine does not reach.
    let log = burst(
        build,
        &site,
        SENT,
        &["--budget-ms", "1000"],
        "normal exit with events in memory",
    );
    assert_eq!(
        spool_files(&site),
        SENT,
        "every event RunHandler accepted is in the spool after a normal exit:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_a_stalled_log_sink_never_slows_run_handler() {
    const SENT: usize = 12_000;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // Every line the forwarder logs takes 1.5 s (NLog on a hung share). The intake thread
    // logs once when it starts the runtime, and meanwhile RunHandler fills the intake queue
    // past its capacity: the drops must be counted, never logged on Keyfactor's thread.
    // Half the sink's delay: a call that waited for one log line is over it, however loaded
    // the machine, and a call that did not is far under it.
    let log = burst(
        build,
        &site,
        SENT,
        &["--slow-log-ms", "1500", "--budget-ms", "750"],
        "a log sink that takes 1.5 s a line",
    );
    assert!(
        log.contains("the intake queue was full"),
        "the drops are reported, by a background thread:\n{log}"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_a_file_the_listing_finds_under_a_name_that_finds_no_file_is_skipped() {
    const SENT: usize = 20;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // A file the start-up listing finds under a name that finds no file: Mono lists a file whose
    // name is not UTF-8 so. It is not the forwarder's (its names are ASCII), so it is left
    // alone rather than sized; the spool opens and delivers.
    std::fs::create_dir_all(site.spool()).expect("spool directory");
    let gone = {
        use std::os::unix::ffi::OsStrExt;
        site.spool().join(std::ffi::OsStr::from_bytes(
            b"0000000000000000001-0000000001-\xff\xfe.evt",
        ))
    };
    std::fs::write(&gone, b"not UTF-8").expect("file");
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(build, "fx", &site, &engine.url, SENT, &expected_path, &[]);
    // Had the spool failed to open, nothing would be spooled before its retry a minute later.
    let spooled = harness.wait_for_line("spooled", Duration::from_secs(30));
    assert!(
        spooled.starts_with(&format!("spooled {SENT} ")),
        "{spooled}"
    );
    harness.wait_success("a file listed under a name that finds no file");
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert_eq!(
        std::fs::read(&gone).expect("the file is still there"),
        b"not UTF-8"
    );
}

/// A SpoolDirectory that also holds other programs' files (`C:\Windows\Temp`, a drive's root):
/// the forwarder indexes, sends, sets aside and deletes only files of its own name pattern, and
/// says once that the others are there. It used to delete every `*.tmp` at start and treat every
/// `*.evt` as an event (set aside, and deleted at once if large).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aj_other_programs_files_in_the_spool_directory_are_left_alone() {
    const SENT: usize = 6;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    std::fs::create_dir_all(site.spool()).expect("spool directory");
    let foreign: Vec<(&str, Vec<u8>)> = vec![
        ("report-draft.tmp", b"a draft".to_vec()),
        ("unrelated.txt", b"notes".to_vec()),
        ("System.evt", b"an event log, not an event".to_vec()),
        ("Application-2019.evt", vec![b'x'; 2 * 1024 * 1024]),
        (
            "0000000000000000001-0000000001-0123456789ABCDEF0123456789ABCDEF.evt",
            b"upper-case hex: not a name the forwarder writes".to_vec(),
        ),
    ];
    for (name, bytes) in &foreign {
        std::fs::write(site.spool().join(name), bytes).expect("foreign file");
    }
    // A `rejected` folder that was there before, with another program's files: the forwarder
    // sets its refused events aside there and tidies only those (a file over what rejected/
    // keeps, 64 MiB, was deleted at the first refusal).
    let rejected = site.spool().join("rejected");
    std::fs::create_dir_all(&rejected).expect("rejected folder");
    let old_report = vec![b'r'; 65 * 1024 * 1024];
    std::fs::write(rejected.join("old-report.bin"), &old_report).expect("foreign file");
    let site = site.with_small_body_limit();
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let harness = Harness::run(
        build,
        "fx",
        &site,
        &engine.url,
        SENT,
        &expected_path,
        &["--invalid-every", "3"],
    );
    let log = harness.wait_success_log("a spool directory shared with other files");
    let expected = read_expected(&expected_path);
    let invalid = expected.iter().filter(|e| e.invalid).count();
    assert_eq!(invalid, 2);
    assert_delivered_once(&site, &expected, None);
    assert_eq!(rejected_files(&site), invalid, "{log}");
    assert_eq!(
        std::fs::read(rejected.join("old-report.bin"))
            .map(|b| b.len())
            .ok(),
        Some(old_report.len()),
        "{log}"
    );
    for (name, bytes) in &foreign {
        let kept = std::fs::read(site.spool().join(name))
            .unwrap_or_else(|e| panic!("{name} is gone ({e}); the forwarder's log:\n{log}"));
        assert_eq!(&kept, bytes, "{name} was changed");
    }
    assert_eq!(
        count_lines(&log, "5 file(s) in the spool directory",),
        1,
        "{log}"
    );
    assert!(
        log.contains("give SpoolDirectory a directory of its own"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_an_oversized_event_is_refused_without_evicting_others() {
    const SENT: usize = 40;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    // A spool of 400 KB holds the 38 ordinary events; each of the two bodies of some 300 KB
    // (over the engine's 64 KiB) would push most of them out if it were spooled.
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &[
            "--threads",
            "1",
            "--huge-every",
            "20",
            "--max-spool-bytes",
            "400000",
        ],
    );
    harness.wait_for_line("spooled", Duration::from_secs(60));
    let _engine = site.start_engine();
    let log = harness.wait_success_log("oversized events");
    let expected = read_expected(&expected_path);
    assert_eq!(expected.iter().filter(|e| e.invalid).count(), 2);
    assert_delivered_once(&site, &expected, None);
    assert_eq!(rejected_files(&site), 0, "nothing oversized was spooled");
    assert!(
        !log.contains("the spool is full"),
        "nothing was pushed out of the spool:\n{log}"
    );
    assert!(
        log.contains("over the engine's limit"),
        "the refusal is reported:\n{log}"
    );
}

/// Makes a file immutable (`chattr +i`: not even root can delete it, as an antivirus or backup
/// agent's lock on Windows) for as long as it lives.
struct Immutable(PathBuf);

impl Immutable {
    fn new(path: PathBuf) -> Self {
        let status = Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .expect("chattr (e2fsprogs)");
        assert!(status.success(), "chattr +i {}", path.display());
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p_a_delivered_file_that_cannot_be_deleted_is_not_sent_again() {
    const SENT: usize = 5;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // A faithful stand-in in front of the engine, to count what the forwarder sends.
    let standin = Standin::start(site.engine_url(), 0).await;
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(build, "fx", &site, &standin.url, SENT, &expected_path, &[]);
    harness.wait_for_line("spooled", Duration::from_secs(60));
    let mut names: Vec<PathBuf> = std::fs::read_dir(site.spool())
        .expect("spool")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "evt"))
        .collect();
    names.sort();
    let locked = names.first().expect("a spooled event").clone();
    let key = std::fs::read_to_string(&locked)
        .expect("spool file")
        .lines()
        .nth(1)
        .expect("key line")
        .to_owned();
    let lock = Immutable::new(locked);
    let _engine = site.start_engine();
    let sent = |standin: &Standin| {
        standin
            .seen
            .lock()
            .expect("records")
            .iter()
            .filter(|(k, _)| *k == key)
            .count()
    };
    // Delivered (the engine answers), and then its file cannot be deleted.
    let deadline = Instant::now() + Duration::from_secs(30);
    while site.stored_events().len() < SENT {
        harness.assert_running("while delivering");
        assert!(Instant::now() < deadline, "the events were not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The sender lists the spool directory every 10 s for files it does not know: a delivered
    // file it could not delete must not be taken for a new one and sent again.
    let watch = Instant::now() + Duration::from_secs(13);
    while Instant::now() < watch && sent(&standin) < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sent(&standin),
        1,
        "the undeletable delivered event was sent again"
    );
    // Once the lock goes, the file is deleted (the retry backs off, so this takes seconds).
    drop(lock);
    let log = harness.wait_success_log("a delivered file that cannot be deleted");
    assert_eq!(sent(&standin), 1);
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert_eq!(
        count_lines(&log, "could not be deleted"),
        1,
        "one warning:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_over_tls_a_certificate_not_for_servers_is_refused_even_from_the_trusted_ca() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // The engine presents a certificate the trusted CA issued for client authentication only,
    // for the right name: it is not a server's, so nothing may be delivered to it.
    let (site, ca) = site.with_tls_usage("clientAuth");
    let _engine = site.start_engine();
    let url = site.engine_tls_url();
    let expected_path = site.path("expected.tsv");
    let ca = ca.to_string_lossy();
    let mut harness = Harness::run(build, "fx", &site, &url, 3, &expected_path, &["--ca", &ca]);
    harness.wait_for_line("spooled", Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        site.stored_events().is_empty(),
        "an engine whose certificate is for client authentication got events; the log:\n{}",
        harness.log_text()
    );
    assert_eq!(spool_files(&site), 3, "the events stay in the spool");
    wait_for_log(&mut harness, "cannot deliver to https://");
}

/// Characters a log viewer may take as a line break or obey as a bidirectional control.
const LOG_BREAKERS: [char; 14] = [
    '\u{2028}',
    '\u{2029}',
    '\u{85}',
    '\u{202a}',
    '\u{202b}',
    '\u{202c}',
    '\u{202d}',
    '\u{202e}',
    '\u{2066}',
    '\u{2067}',
    '\u{2068}',
    '\u{2069}',
    // Format characters above U+FFFF (two UTF-16 units each): tag characters, which hide text.
    '\u{e0001}',
    '\u{e0041}',
];

/// A server that answers every request with `status` and `body` (JSON); returns its URL.
async fn answer_every_request(status: u16, body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stand-in");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                while read_request(&mut socket, &mut buffer).await.is_some() {
                    if !respond(&mut socket, status, &body).await {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_line_breaks_and_bidi_controls_from_answers_and_settings_stay_out_of_the_log() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let text: String = "a b c d e f g h i j k l m n o"
        .split(' ')
        .zip(LOG_BREAKERS.iter().chain(std::iter::once(&' ')))
        .map(|(word, breaker)| format!("{word}{breaker}"))
        .collect();
    let body = format!("{{\"error\":\"{}\"}}", text.trim_end());
    let standin = answer_every_request(500, body.into_bytes()).await;
    // The EngineUrl setting may carry one too (in its path; .NET keeps U+2028 there, Mono
    // drops a bidirectional control itself), and is logged.
    let url = format!("{standin}/x\u{2028}y");
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(build, "fx", &site, &url, 1, &expected_path, &[]);
    wait_for_log(&mut harness, "HTTP 500");
    let log = std::fs::read_to_string(harness.log_path()).unwrap_or_default();
    drop(harness);
    for line in log.lines() {
        assert!(
            !line.contains(&LOG_BREAKERS[..]),
            "a log line carries a line break or a bidirectional control: {line:?}"
        );
    }
    assert!(
        log.contains("HTTP 500 {\"error\":\"a b c d e f g h i j k l m n o\"}"),
        "the answer is logged with those characters as spaces:\n{log}"
    );
    assert!(
        log.contains(&format!("cannot deliver to {standin}/x y/v1/job-complete")),
        "the URL is logged with those characters as spaces:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_each_registration_counts_only_its_own_pending_events() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // No engine: nothing leaves. The intake thread is held with a third registration's event
    // (the forwarder's test hook) while 5 events for the first and 7 for the second wait in its
    // queue: nothing moves between the intake, the runtimes and the spools while they are
    // counted.
    let url = site.engine_url();
    let mut harness = Harness::start(build, "fx", &site, &url, "pending", &[]);
    let line = harness.wait_for_line("pending", Duration::from_secs(60));
    assert_eq!(
        line, "pending a=5 b=7",
        "each registration's PendingEvents counts its own events, once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_spool_that_cannot_be_written_is_reported_once_not_every_second() {
    const SENT: usize = 5;
    const NEEDLE: &str = "cannot write to the spool";
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    let resume = site.path("resume");
    let resume_arg = resume.to_string_lossy().into_owned();
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &["--pause-after", "2", "--resume-file", &resume_arg],
    );
    harness.wait_for_line("paused", Duration::from_secs(60));
    // As a full disk does: no file can be made in the spool directory. The spool writer tries
    // again every second.
    let lock = Immutable::new(site.spool());
    std::fs::write(&resume, b"").expect("resume file");
    wait_for_log(&mut harness, NEEDLE);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = std::fs::read_to_string(harness.log_path()).unwrap_or_default();
    assert_eq!(
        count_lines(&during, NEEDLE),
        1,
        "one line for a lasting write failure, not one a second:\n{during}"
    );
    assert!(
        during.contains(": 1 since the last report, 1 since start"),
        "the first failure is reported at once:\n{during}"
    );
    drop(lock);
    harness.wait_for_line("spooled", Duration::from_secs(30));
    let _engine = site.start_engine();
    let log = harness.wait_success_log("a spool that could not be written for a while");
    assert!(
        log.contains("again after "),
        "the return to health is logged:\n{log}"
    );
    assert_delivered_once(&site, &read_expected(&expected_path), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn au_a_spool_that_cannot_be_written_sends_from_memory_to_a_running_engine() {
    const SENT: usize = 20;
    const FIRST: usize = 2;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let _engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let resume = site.path("resume");
    let resume_arg = resume.to_string_lossy().into_owned();
    let first = FIRST.to_string();
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &["--pause-after", &first, "--resume-file", &resume_arg],
    );
    harness.wait_for_line("paused", Duration::from_secs(60));
    // The first events are delivered and their files deleted: the spool is open, and empty.
    let deadline = Instant::now() + Duration::from_secs(30);
    while spool_files(&site) > 0 || site.stored_events().len() < FIRST {
        harness.assert_running("while the first events are delivered");
        assert!(
            Instant::now() < deadline,
            "the first events were not delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // As a full disk does: no file can be made in the spool directory, and it stays so.
    let lock = Immutable::new(site.spool());
    std::fs::write(&resume, b"").expect("resume file");
    let spooled = harness.wait_for_line("spooled", Duration::from_secs(60));
    assert!(
        spooled.ends_with(&format!("(sent from memory {})", SENT - FIRST)),
        "every event after the lock is sent from memory: {spooled}"
    );
    let drained = harness.wait_for_line("drained", Duration::from_secs(60));
    assert!(
        drained.contains(&format!(
            "spooled {FIRST}, sent from memory {}, delivered {SENT},",
            SENT - FIRST
        )),
        "each event counted once, spooled or sent from memory: {drained}"
    );
    let log = harness.wait_success_log("a spool that cannot be written");
    drop(lock);
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert_eq!(spool_files(&site), 0, "nothing was written meanwhile");
    for said in [
        "cannot write to the spool",
        "sent to the engine straight from memory",
    ] {
        assert!(log.contains(said), "the log says {said:?}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aw_a_spool_that_cannot_open_sends_from_memory_to_a_running_engine() {
    const SENT: usize = 10;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    // Under a regular file: it can never be made, even as root.
    let mut harness =
        run_with_unusable_spool(build, &site, &site.engine_url(), SENT, &expected_path, &[]);
    // The engine is down at first: with nothing spooled, the sends from memory say so (the
    // sender has nothing to send and nothing to say).
    wait_for_log(&mut harness, "from memory (1 failure(s) in a row");
    let _engine = site.start_engine();
    let spooled = harness.wait_for_line("spooled", Duration::from_secs(60));
    assert!(
        spooled.starts_with("spooled 0 ")
            && spooled.ends_with(&format!("(sent from memory {SENT})")),
        "every event is sent from memory: {spooled}"
    );
    // Counted once the engine had it.
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    // Said by the forwarder's background threads, a moment later at most.
    wait_for_log(&mut harness, "cannot use the spool directory");
    wait_for_log(&mut harness, "sent to the engine straight from memory");
    wait_for_log(&mut harness, "again after ");
    harness.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ba_a_spool_that_cannot_open_without_an_engine_url_says_events_stay_in_memory() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let expected_path = site.path("expected.tsv");
    // No EngineUrl: nothing can be sent, so the events wait in memory for the spool.
    let mut harness = run_with_unusable_spool(build, &site, "", 3, &expected_path, &[]);
    wait_for_log(&mut harness, "EngineUrl is not set");
    wait_for_log(&mut harness, "are held in memory only (no usable EngineUrl");
    let log = harness.log_text();
    assert!(
        !log.contains("sent to the engine straight from memory"),
        "without an EngineUrl nothing is said to be sent:\n{log}"
    );
    harness.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ay_an_event_the_engine_refuses_from_memory_is_said_and_holds_back_nothing() {
    const SENT: usize = 9;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let site = site.with_small_body_limit();
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let mut harness = run_with_unusable_spool(
        build,
        &site,
        &engine.url,
        SENT,
        &expected_path,
        &["--invalid-every", "3"],
    );
    let spooled = harness.wait_for_line("spooled", Duration::from_secs(60));
    assert!(
        spooled.ends_with(&format!("(sent from memory {SENT})")),
        "every event is sent from memory, the refused ones too: {spooled}"
    );
    let (invalid, valid): (Vec<Expected>, Vec<Expected>) = read_expected(&expected_path)
        .into_iter()
        .partition(|e| e.invalid);
    assert_eq!(invalid.len(), 3);
    assert_delivered_once(&site, &valid, None);
    // Said by the log thread, a moment after each answer.
    const REFUSED: &str = "it is not kept in rejected/";
    let said = |log: &str, key: &str| log.lines().any(|l| l.contains(REFUSED) && l.contains(key));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(harness.log_path()).unwrap_or_default();
        if invalid.iter().all(|e| said(&log, &e.key)) {
            break;
        }
        harness.assert_running("while the refusals are logged");
        assert!(
            Instant::now() < deadline,
            "each refused event is said to be refused:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    harness.kill();
}

/// Waits until the engine holds every one of `sent` events but the one `standin` keeps failing
/// (its key in `poisoned`), and until that one was tried again; panics saying which did not
/// happen.
async fn all_but_the_poisoned_arrive(
    site: &Site,
    standin: &Standin,
    poisoned: &Mutex<Option<String>>,
    sent: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while site.stored_events().len() < sent - 1 {
        assert!(
            Instant::now() < deadline,
            "{} of the {} events behind the failing one were delivered within 30 s",
            site.stored_events().len(),
            sent - 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = poisoned
        .lock()
        .expect("poisoned key")
        .clone()
        .expect("a key was poisoned");
    let tries = || {
        standin
            .seen
            .lock()
            .expect("records")
            .iter()
            .filter(|(k, _)| *k == key)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tries() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tries() >= 2,
        "the failing event is retried ({} tries)",
        tries()
    );
}

/// The picked key, how often the stand-in saw it, and the events the engine should hold: the
/// expected ones, with the forged event in the place of the picked one (never stored).
fn split_off_picked(
    standin: &Standin,
    picked: &Mutex<Option<String>>,
    expected: Vec<Expected>,
) -> (String, usize, Vec<Expected>) {
    let key = picked
        .lock()
        .expect("picked key")
        .clone()
        .expect("a key was picked");
    let tries = standin
        .seen
        .lock()
        .expect("records")
        .iter()
        .filter(|(k, _)| *k == key)
        .count();
    let held = expected
        .into_iter()
        .map(|mut e| {
            if e.key == key {
                e.context.job_id = forged_job_id(e.context.job_id);
            }
            e
        })
        .collect();
    (key, tries, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bb_a_spooled_event_the_engine_holds_under_another_body_is_not_resent() {
    const SENT: usize = 5;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let _engine = site.start_engine();
    let picked = Arc::new(Mutex::new(None));
    let standin = Standin::conflicting_the_first(site.engine_url(), picked.clone()).await;
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(build, "fx", &site, &standin.url, SENT, &expected_path, &[]);
    let drained = harness.wait_for_line("drained", Duration::from_secs(60));
    assert!(
        drained.contains(&format!("delivered {}, conflicts 1,", SENT - 1)),
        "one conflict, the others delivered: {drained}"
    );
    let log = harness.wait_success_log("a conflict");
    let (key, tries, held) = split_off_picked(&standin, &picked, read_expected(&expected_path));
    assert_eq!(tries, 1, "the conflicting event is not sent again");
    assert_delivered_once(&site, &held, None);
    assert!(
        log.contains(&format!(
            "different event with key {key} (409); this one is not resent"
        )),
        "the conflict is logged with its key:\n{log}"
    );
    assert_eq!(spool_files(&site), 0, "its file is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bc_an_event_sent_from_memory_the_engine_holds_under_another_body_is_not_resent() {
    const SENT: usize = 5;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let _engine = site.start_engine();
    let picked = Arc::new(Mutex::new(None));
    let standin = Standin::conflicting_the_first(site.engine_url(), picked.clone()).await;
    let expected_path = site.path("expected.tsv");
    let mut harness =
        run_with_unusable_spool(build, &site, &standin.url, SENT, &expected_path, &[]);
    let spooled = harness.wait_for_line("spooled", Duration::from_secs(60));
    assert!(
        spooled.starts_with("spooled 0 ")
            && spooled.ends_with(&format!("(sent from memory {SENT})")),
        "every event left memory, the conflicting one too: {spooled}"
    );
    wait_for_log(
        &mut harness,
        "(409); this one, sent from memory, is not resent",
    );
    let (key, tries, held) = split_off_picked(&standin, &picked, read_expected(&expected_path));
    assert_delivered_once(&site, &held, None);
    // A moment for a wrong second try to be made.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, tries_later, _) = split_off_picked(&standin, &picked, Vec::new());
    assert_eq!(
        (tries, tries_later),
        (1, 1),
        "the conflicting event is not sent again"
    );
    let log = harness.log_text();
    assert!(
        log.contains(&format!("different event with key {key} (409)")),
        "the conflict is logged with its key:\n{log}"
    );
    harness.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_an_event_that_keeps_failing_from_memory_holds_none_behind_it() {
    const SENT: usize = 8;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let _engine = site.start_engine();
    let poisoned = Arc::new(Mutex::new(None));
    let standin = Standin::poisoning_the_first(site.engine_url(), poisoned.clone()).await;
    let expected_path = site.path("expected.tsv");
    let mut harness = run_with_unusable_spool(
        build,
        &site,
        &standin.url,
        SENT,
        &expected_path,
        &["--threads", "1"],
    );
    // It is still tried, a second apart, and still in memory.
    all_but_the_poisoned_arrive(&site, &standin, &poisoned, SENT).await;
    harness.assert_running("after the events behind the failing one were sent");
    assert_eq!(
        site.stored_events().len(),
        SENT - 1,
        "only the failing event is not delivered"
    );
    harness.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn av_damaged_spool_files_are_set_aside_counted_and_hold_back_nothing() {
    const SENT: usize = 4;
    const NOT_OURS: &str = "is not a spool file of this forwarder";
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // Under names older than every event the run spools, so each is met first.
    std::fs::create_dir_all(site.spool()).expect("spool directory");
    // Over the largest file the forwarder writes (256 KiB), with its header and key.
    let mut oversized = b"jobhook-forwarder-spool 1\n0123456789abcdef0123456789abcdef\n".to_vec();
    oversized.resize(256 * 1024 + 1, b'x');
    let damaged: [(&[u8], &str); 7] = [
        // A power cut that kept the name but not the data.
        (b"", NOT_OURS),
        (b"jobhook-forwarder-spool 1\n\xff\xfe\n{}\n", "is not UTF-8"),
        (
            b"some-other-tool 7\n0123456789abcdef0123456789abcdef\n{}\n",
            NOT_OURS,
        ),
        // Cut short: the body line and its end are missing.
        (
            b"jobhook-forwarder-spool 1\n0123456789abcdef0123456789abcdef\n",
            NOT_OURS,
        ),
        // Saved again by a Windows editor: CRLF line ends.
        (
            b"jobhook-forwarder-spool 1\r\n0123456789abcdef0123456789abcdef\r\n{}\r\n",
            NOT_OURS,
        ),
        // A key the forwarder never makes (upper-case hex).
        (
            b"jobhook-forwarder-spool 1\n0123456789ABCDEF0123456789ABCDEF\n{}\n",
            NOT_OURS,
        ),
        (&oversized, "no event is bigger than"),
    ];
    let mut names = Vec::new();
    for (i, (bytes, _)) in damaged.iter().enumerate() {
        let name = format!("00000000000000000{i:02}-0000000001-{:032x}.evt", i + 1);
        std::fs::write(site.spool().join(&name), bytes).expect("damaged file");
        names.push(name);
    }
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(build, "fx", &site, &engine.url, SENT, &expected_path, &[]);
    let drained = harness.wait_for_line("drained", Duration::from_secs(60));
    assert!(
        drained.contains(&format!(
            "delivered {SENT}, conflicts 0, rejected {},",
            damaged.len()
        )),
        "every good event delivered, every damaged file counted rejected: {drained}"
    );
    let log = harness.wait_success_log("damaged spool files");
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert_eq!(rejected_files(&site), damaged.len(), "{log}");
    for (name, (_, why)) in names.iter().zip(damaged.iter()) {
        let reason_file = site.spool().join("rejected").join(format!("{name}.reason"));
        let reason = std::fs::read_to_string(&reason_file)
            .unwrap_or_else(|e| panic!("no reason for {name} ({e}); the log:\n{log}"));
        assert!(reason.contains(why), "{name}: {reason}");
        assert!(
            log.contains(&format!("event {name} was rejected and moved to")),
            "{name} is named in the log:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_a_hung_log_sink_holds_neither_the_spool_nor_the_process_end() {
    const SENT: usize = 1000;
    const SPOOL_FILES: usize = 100;
    /// The forwarder's wait for its shutdown (`Intake.ShutdownWait`: 5 s and a 0.5 s grace),
    /// plus the runtime's own exit and a loaded machine.
    const EXIT_BOUND: Duration = Duration::from_secs(20);
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // Every line the sink is given hangs it for ten minutes (NLog on a share that stopped
    // answering). No engine: what RunHandler accepted can only be in the spool, which holds
    // fewer than were sent, so making room for newer events happens on the writer thread and
    // again in the flush at exit. Neither may wait for the sink, nor may the process's end.
    let max_files = SPOOL_FILES.to_string();
    let mut harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "burst",
        &[
            "--count",
            &SENT.to_string(),
            "--slow-log-ms",
            "600000",
            "--max-spool-files",
            &max_files,
            // About the exit, not the budget: a bound a loaded machine does not reach.
            "--budget-ms",
            "1000",
        ],
    );
    harness.wait_for_line("submitted", Duration::from_secs(60));
    let submitted = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = harness.child.try_wait() {
            break status;
        }
        if submitted.elapsed() > EXIT_BOUND {
            let threads = harness.thread_dump();
            panic!(
                "the harness had not ended {EXIT_BOUND:?} after its last RunHandler call; its \
                 threads (SIGQUIT):\n{threads}\nits log:\n{}",
                harness.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "the harness failed ({status}); its log:\n{}",
        harness.log_text()
    );
    assert_eq!(
        spool_files(&site),
        SPOOL_FILES,
        "the spool is full of the newest events: {SENT} were accepted and the spool holds \
         {SPOOL_FILES}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v_a_registration_whose_spool_cannot_open_does_not_cost_the_others_their_events_at_exit() {
    const SENT: usize = 1000;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // Another registration's spool directory lies under a regular file, so it can never be
    // made (even as root), and that registration holds events it can never write. At a normal
    // exit both flush within the one shutdown deadline: the broken one waits out the deadline,
    // and must not take the healthy one's time with it. No engine: every accepted event of the
    // healthy registration must be in its spool. The writers are held (the forwarder's test
    // hook), so all 1,000 are in memory at the exit: a flush after the broken one's would
    // write none of them, one beside it writes them in a second or two however busy the
    // machine (8,000 written by the writer meanwhile made this depend on the machine's load).
    let broken = spool_that_cannot_open(&site);
    let log = burst(
        build,
        &site,
        SENT,
        &[
            "--broken-spool",
            &broken,
            "--budget-ms",
            "1000",
            "--hold-writers",
            "1",
        ],
        "an exit with a registration whose spool cannot open",
    );
    assert_eq!(
        spool_files(&site),
        SENT,
        "every event the healthy registration accepted is in its spool:\n{log}"
    );
    assert!(
        log.contains("accepted event(s) could not be written to the spool"),
        "the broken registration's events are reported lost:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w_an_event_that_keeps_failing_holds_none_behind_it() {
    const SENT: usize = 30;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // Something on the way answers one event, the oldest, with a proxy's 413 every time (its
    // body over a gateway's limit), which is not the engine's refusal and so is retried; every
    // other event passes. The others must not wait behind it.
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &["--threads", "1"],
    );
    harness.wait_for_line("spooled", Duration::from_secs(60));
    harness.kill();
    let _engine = site.start_engine();
    let poisoned = Arc::new(Mutex::new(None));
    let standin = Standin::poisoning_the_first(site.engine_url(), poisoned.clone()).await;
    let drain = Harness::start(
        build,
        "fx",
        &site,
        &standin.url,
        "drain",
        &["--wait-seconds", "20"],
    );
    // Its next try comes after its own backoff (half to all of a second at first).
    all_but_the_poisoned_arrive(&site, &standin, &poisoned, SENT).await;
    // The last delivered file goes a moment after the engine stored its event.
    let deadline = Instant::now() + Duration::from_secs(10);
    while spool_files(&site) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        spool_files(&site),
        1,
        "only the failing event is left in the spool"
    );
    drop(drain);
}

/// Cases the harness's `settings` mode prints (forwarder/harness/Harness.cs, `Settings`).
const SETTINGS_CASES: usize = 28;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_a_bad_setting_is_reported_and_replaced_never_thrown() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // `ForwarderSettings.Parse` runs on the intake thread for every new handler object and in
    // `PendingEvents`: a value it threw for would lose every event. Each case is one setting
    // with a value an administrator can paste (Explorer's "Copy as path" adds quotes).
    let url = site.engine_url();
    let spool = site.spool().display().to_string();
    let mut harness = Harness::start(build, "fx", &site, &url, "settings", &[]);
    let mut cases = HashMap::new();
    for _ in 0..SETTINGS_CASES {
        let line = harness.wait_for_line("case ", Duration::from_secs(30));
        let (name, rest) = line["case ".len()..]
            .split_once(": ")
            .unwrap_or_else(|| panic!("{line}"));
        cases.insert(name.to_owned(), rest.to_owned());
    }
    harness.wait_success("settings");
    let case = |name: &str| -> &str {
        cases
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no case {name}: {cases:?}"))
    };
    for (name, line) in &cases {
        assert!(!line.contains("Parse threw"), "{name}: {line}");
    }
    let has = |name: &str, needles: &[&str]| {
        let line = case(name);
        for needle in needles {
            assert!(line.contains(needle), "{name}: no {needle:?} in {line}");
        }
    };
    let own_spool = format!("spool={spool} ");
    for name in ["spool-nul", "spool-quoted", "spool-pipe"] {
        has(
            name,
            &["SpoolDirectory contains characters a path cannot have"],
        );
        assert!(
            !case(name).contains(&own_spool),
            "{name}: the default spool is used instead: {}",
            case(name)
        );
    }
    has("spool-nul", &["U+0000"]);
    // Every member of the class: a byte-order mark or a direction override is named as well, and
    // with a character no path can have, both are named in that message.
    has(
        "ca-bidi",
        &[
            "TrustedCaFile contains characters that cannot be seen (U+202E)",
            "ca=none",
        ],
    );
    has(
        "spool-nul-and-unseen",
        &["SpoolDirectory contains characters a path cannot have (U+0000, U+FEFF)"],
    );
    has(
        "spool-zero-width",
        &[
            "SpoolDirectory contains characters that cannot be seen (U+200B)",
            "type it again",
        ],
    );
    assert!(
        !case("spool-zero-width").contains(&own_spool),
        "the default spool is used instead: {}",
        case("spool-zero-width")
    );
    // A volume's root, written as such or reached with `..`: every program's directory.
    for name in ["spool-root", "spool-root-dots"] {
        has(
            name,
            &[
                "SpoolDirectory is the root of a volume (/)",
                "give a directory of the forwarder's own",
            ],
        );
        assert!(
            !case(name).contains("spool=/ "),
            "{name}: the root is not used: {}",
            case(name)
        );
    }
    has("spool-quoted", &["remove the quotes"]);
    has(
        "ca-nul",
        &[
            "TrustedCaFile contains characters a path cannot have",
            "ca=none",
        ],
    );
    has("ca-quoted", &["remove the quotes", "ca=none"]);
    has(
        "ca-relative",
        &[
            "TrustedCaFile must be an absolute path (ca.pem is relative",
            "ca=none",
        ],
    );
    has(
        "ca-http",
        &["TrustedCaFile is set but EngineUrl is http://"],
    );
    has(
        "url-endpoint",
        &[
            &format!("url={url}/v1/job-complete "),
            "remove /v1/job-complete from EngineUrl",
        ],
    );
    has(
        "url-endpoint-slash",
        &[
            &format!("url={url}/prefix/v1/job-complete "),
            "remove /v1/job-complete from EngineUrl",
        ],
    );
    has(
        "token-bearer",
        &["remove the \"Bearer \" prefix", "token=set"],
    );
    has("token-long", &["BearerToken is too long", "token=none"]);
    has(
        "token-space",
        &[
            "BearerToken contains characters a bearer token cannot have",
            "token=none",
        ],
    );
    has(
        "backoff",
        &[
            "MaxBackoffMs (1000) is less than InitialBackoffMs (5000)",
            "max_backoff_ms=5000",
        ],
    );
    // The prefix alone, however it is padded (or with its space trimmed away), is no token:
    // said so, and nothing is sent, rather than "Bearer" as the token.
    for name in [
        "token-bearer-only",
        "token-bearer-padded",
        "token-bearer-word",
    ] {
        has(
            name,
            &[
                "BearerToken is only the \"Bearer \" prefix, without a token",
                "set BearerToken to the token alone",
                "token=none",
            ],
        );
    }
    has(
        "token-bearer-tab",
        &["remove the \"Bearer \" prefix", "token=set token_chars=7 "],
    );
    // A blank value is unset, like every other blank option: the machine name, nothing said.
    for name in ["name-empty", "name-blank"] {
        let line = case(name);
        assert!(line.ends_with(" problems="), "{name}: {line}");
        assert!(
            !line.contains(" name= ") && !line.contains(" name=forwarder "),
            "{name}: the machine name is used: {line}"
        );
    }
    has("name-padded", &["name=kf-node-1 problems="]);
    assert!(
        case("name-padded").ends_with(" problems="),
        "{}",
        case("name-padded")
    );
    has(
        "name-long",
        &[
            "ForwarderName must be at most 64 visible ASCII characters",
            "it was cut",
            &format!("name={} ", "n".repeat(64)),
        ],
    );
    has("name-spaced", &["replaced by '_'", "name=kf_node_1 "]);
    // Every option blank but EngineUrl and SpoolDirectory: none is a problem.
    assert!(
        case("all-blank").ends_with(" problems="),
        "all-blank: {}",
        case("all-blank")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn y_a_thread_that_cannot_start_is_started_again_later() {
    const SENT: usize = 60;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let engine = site.start_engine();
    // The forwarder's internal test hook makes the next starts of one of its threads throw, as
    // in a process out of threads. RunHandler must neither throw nor lose an event, and the
    // thread is started on a later try. The first thread the process starts must not be one a
    // type initialiser needs: a failure there would make RunHandler throw on every call.
    let cases: [(&str, &str, Option<&str>); 5] = [
        ("", "1", Some("the intake thread could not start")),
        ("intake", "2", Some("the intake thread could not start")),
        ("spool writer", "2", Some("the spool writer thread")),
        ("notices", "2", Some("the notices thread could not start")),
        ("log", "2", None),
    ];
    let sent = SENT.to_string();
    let mut problems = Vec::new();
    for (thread, starts, needle) in cases {
        let what = format!("the first {starts} start(s) of the thread {thread:?} fail");
        let mut args = vec![
            "--count",
            sent.as_str(),
            "--fail-starts",
            starts,
            "--wait-seconds",
            "30",
        ];
        if !thread.is_empty() {
            args.extend(["--fail-thread", thread]);
        }
        // Each run's own log (a harness appends to its mode's log file).
        let _ = std::fs::remove_file(site.path("harness-fx-faults.log"));
        let harness = Harness::start(build, "fx", &site, &engine.url, "faults", &args);
        let (status, out, log) = harness.finish(Duration::from_secs(90));
        let tail = tail_of(&log, 4000);
        if !status.is_some_and(|s| s.success()) {
            problems.push(format!(
                "{what}: the harness failed ({status:?}): {out}\n{tail}"
            ));
            continue;
        }
        if !out.contains(&format!(
            "accepted {SENT}, spooled {SENT}, sent from memory 0, delivered {SENT},"
        )) {
            problems.push(format!(
                "{what}: not every event was delivered: {out}\n{tail}"
            ));
        }
        if let Some(needle) = needle
            && !log.contains(needle)
        {
            problems.push(format!("{what}: no {needle:?} in the log:\n{tail}"));
        }
        if count_lines(&log, "through the spool") != 1 {
            problems.push(format!(
                "{what}: not one runtime for the spool, however often its start failed:\n{tail}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    assert_eq!(site.stored_events().len(), SENT * cases.len());
}

/// The last `n` bytes of `text` (at a character boundary).
fn tail_of(text: &str, n: usize) -> &str {
    let start = text.len().saturating_sub(n);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// Parses `memory intake=N accepted=A dropped=D too_large=T managed_mb=M` into its numbers.
fn memory_line(line: &str) -> HashMap<String, u64> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or_else(|_| panic!("{line}"))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn z_events_in_memory_are_bounded_in_bytes_not_only_in_count() {
    const SENT: usize = 3000;
    /// Characters of each of an event's three strings, quotes: each string as long as the engine
    /// takes (4 KiB), the body (each quote escaped) some 25 KB, about 50 KB in memory as a .NET
    /// string, and the context's strings 25 KB in the intake queue.
    const CHARS: &str = "4096";
    /// At most what fits in the forwarder's 32 MiB byte limit of the runtime's queue (some 666
    /// bodies), with room to spare.
    const FIT: u64 = 700;
    /// At most what fits in that limit of the intake queue (some 1,337 contexts).
    const FIT_INTAKE: u64 = 1400;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // The spool cannot be opened (it lies under a regular file): every event waits in the
    // registration's in-memory queue. 3,000 such events are some 150 MB there without a byte
    // limit, under the default limit of 10,000 events.
    let broken = spool_that_cannot_open(&site);
    let sent = SENT.to_string();
    let mut problems = Vec::new();
    let harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "memory",
        &[
            "--count",
            &sent,
            "--field-chars",
            CHARS,
            "--escaped",
            "1",
            "--spool",
            &broken,
        ],
    );
    let (status, out, log) = harness.finish(Duration::from_secs(90));
    let tail = tail_of(&log, 4000);
    match out.lines().find(|l| l.starts_with("memory ")) {
        Some(line) if status.is_some_and(|s| s.success()) => {
            let numbers = memory_line(line);
            if numbers["dropped"] < SENT as u64 - FIT || numbers["managed_mb"] > 80 {
                problems.push(format!(
                    "a spool that cannot be opened: the runtime's queue is not bounded in bytes \
                     (at most {FIT} of {SENT} kept, 80 MB): {line}"
                ));
            }
            if !log.contains("was full") {
                problems.push(format!(
                    "a spool that cannot be opened: the drops are not reported:\n{tail}"
                ));
            }
        }
        _ => problems.push(format!(
            "a spool that cannot be opened: the harness failed ({status:?}): {out}\n{tail}"
        )),
    }

    // The intake thread never starts: every event waits in the intake queue (75 MB without a
    // byte limit). Three events over the engine's 64 KiB come first: refused at once, never
    // queued.
    let _ = std::fs::remove_file(site.path("harness-fx-memory.log"));
    let harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "memory",
        &[
            "--count",
            &sent,
            "--field-chars",
            CHARS,
            "--escaped",
            "1",
            "--huge",
            "3",
            "--fail-thread",
            "intake",
            "--fail-starts",
            "1000000",
        ],
    );
    let (status, out, log) = harness.finish(Duration::from_secs(90));
    let tail = tail_of(&log, 4000);
    match out.lines().find(|l| l.starts_with("memory ")) {
        Some(line) if status.is_some_and(|s| s.success()) => {
            let numbers = memory_line(line);
            if numbers["intake"] > FIT_INTAKE || numbers["intake"] < FIT_INTAKE / 2 {
                problems.push(format!(
                    "an intake thread that never starts: the intake queue is not bounded in bytes: {line}"
                ));
            }
            if numbers["too_large"] != 3 {
                problems.push(format!(
                    "an intake thread that never starts: the oversized events are not refused before they are queued: {line}"
                ));
            }
            // Every event handed over waits or was dropped, and each one dropped was counted
            // accepted too (the registration's counters know it), once.
            if numbers["intake"] + numbers["dropped"] != SENT as u64
                || numbers["accepted"] != numbers["dropped"]
            {
                problems.push(format!(
                    "an intake thread that never starts: the events dropped from the intake queue are not counted accepted and dropped, once each: {line}"
                ));
            }
            if !log.contains("the intake queue was full") {
                problems.push(format!(
                    "an intake thread that never starts: the drops are not reported:\n{tail}"
                ));
            }
        }
        _ => problems.push(format!(
            "an intake thread that never starts: the harness failed ({status:?}): {out}\n{tail}"
        )),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aa_after_the_clock_went_back_the_oldest_event_is_still_dropped_first() {
    const SENT: usize = 5;
    const KEPT: usize = 3;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // A file spooled while the clock was far ahead (2100-01-01), before it was set back: it is
    // older than every event spooled after it, and a full spool must drop it first.
    std::fs::create_dir_all(site.spool()).expect("spool directory");
    let ahead = "0662380416000000000-0000000001-0123456789abcdef0123456789abcdef.evt";
    std::fs::write(
        site.spool().join(ahead),
        "jobhook-forwarder-spool 1\n0123456789abcdef0123456789abcdef\n{}\n",
    )
    .expect("a file from the future");
    let expected_path = site.path("expected.tsv");
    let kept = KEPT.to_string();
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_url(),
        SENT,
        &expected_path,
        &["--threads", "1", "--max-spool-files", &kept],
    );
    harness.wait_for_line("spooled", Duration::from_secs(60));
    let mut names: Vec<String> = std::fs::read_dir(site.spool())
        .expect("spool")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".evt"))
        .collect();
    names.sort();
    assert_eq!(names.len(), KEPT, "{names:?}");
    assert!(
        !names.iter().any(|n| n == ahead),
        "the oldest file went first, whatever its name's time: {names:?}"
    );
    let _engine = site.start_engine();
    harness.wait_success("a spool after the clock went back");
    let newest = read_expected(&expected_path).split_off(SENT - KEPT);
    assert_delivered_once(&site, &newest, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_an_engine_url_with_the_endpoint_path_is_reported_and_still_delivers() {
    const SENT: usize = 10;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let engine = site.start_engine();
    let url = format!("{}/v1/job-complete", engine.url);
    let expected_path = site.path("expected.tsv");
    let harness = Harness::run(
        build,
        "fx",
        &site,
        &url,
        SENT,
        &expected_path,
        &["--wait-seconds", "20"],
    );
    let log = harness.wait_success_log("EngineUrl with the endpoint path");
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert!(
        log.contains("remove /v1/job-complete from EngineUrl"),
        "the configuration problem is reported:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_a_ca_file_with_several_certificates_trusts_the_one_that_issued_the_engine() {
    const SENT: usize = 10;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let (site, ca) = site.with_tls();
    // Another CA first in the file (a bundle of the organisation's CAs).
    let other = site.path("other");
    std::fs::create_dir_all(&other).expect("other CA directory");
    let other_ca = write_rsa_pki(&other, "serverAuth");
    let bundle = site.path("bundle.pem");
    let mut text = std::fs::read_to_string(&other_ca).expect("other CA");
    text.push_str(&std::fs::read_to_string(&ca).expect("CA"));
    std::fs::write(&bundle, text).expect("bundle");
    let _engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let bundle = bundle.to_string_lossy();
    let harness = Harness::run(
        build,
        "fx",
        &site,
        &site.engine_tls_url(),
        SENT,
        &expected_path,
        &["--ca", &bundle, "--wait-seconds", "20"],
    );
    let log = harness.wait_success_log("a CA file with two certificates");
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert!(
        log.contains("2 certificate(s)"),
        "what the file held is logged:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Exits, counts and deferrals

/// What a [`Scripted`] stand-in does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Pass it on to the engine and hand its answer back.
    Pass,
    /// Answer 503 without passing it on (the engine or the way is down).
    Refuse,
    /// Say nothing until [`Scripted::release`], then pass it on (a slow way to the engine).
    Hold,
}

/// Decides each request's [`Answer`] from its idempotency key (called in arrival order).
type Decide = Box<dyn FnMut(&str) -> Answer + Send>;

/// A stand-in in front of the engine whose answers a test scripts, request by request; records
/// every request's key and answer in arrival order.
struct Scripted {
    url: String,
    answered: Arc<Mutex<Vec<(String, Answer)>>>,
    released: tokio::sync::watch::Sender<bool>,
}

impl Scripted {
    async fn start(engine_url: String, decide: Decide) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let decide = Arc::new(Mutex::new(decide));
        let records = answered.clone();
        let (released, release) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let (client, engine_url) = (client.clone(), engine_url.clone());
                let (decide, records) = (decide.clone(), records.clone());
                let mut release = release.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    while let Some(request) = read_request(&mut socket, &mut buffer).await {
                        let key = request.header("Idempotency-Key").unwrap_or("").to_owned();
                        // Decided and recorded in one step: the record is the order of the
                        // answers.
                        let answer = {
                            let mut records = records.lock().expect("records");
                            let answer = (decide.lock().expect("script"))(&key);
                            records.push((key, answer));
                            answer
                        };
                        let (status, body) = match answer {
                            Answer::Pass => forward(&client, &engine_url, &request).await,
                            Answer::Refuse => (503, b"{\"error\":\"stand-in\"}".to_vec()),
                            Answer::Hold => {
                                if release.wait_for(|go| *go).await.is_err() {
                                    return;
                                }
                                forward(&client, &engine_url, &request).await
                            }
                        };
                        if !respond(&mut socket, status, &body).await {
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            url,
            answered,
            released,
        }
    }

    /// Lets every held request (and every later one to be held) go on.
    fn release(&self) {
        self.released.send_replace(true);
    }

    fn answered(&self) -> Vec<(String, Answer)> {
        self.answered.lock().expect("records").clone()
    }
}

/// Waits at most `bound` after its last RunHandler call for the harness to end, and asserts it
/// succeeded; gives its log.
fn wait_exit_within(mut harness: Harness, bound: Duration, what: &str) -> String {
    harness.wait_for_line("submitted", Duration::from_secs(60));
    let submitted = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = harness.child.try_wait() {
            break status;
        }
        if submitted.elapsed() > bound {
            let threads = harness.thread_dump();
            panic!(
                "{what}: the harness had not ended {bound:?} after its last RunHandler call; its \
                 threads (SIGQUIT):\n{threads}\nits log:\n{}",
                harness.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{what}: the harness failed ({status}); its log:\n{}",
        harness.log_text()
    );
    std::fs::read_to_string(harness.log_path()).unwrap_or_default()
}

/// The forwarder's wait for its shutdown (`Intake.ShutdownWait`: 5 s and a 0.5 s grace), plus
/// the runtime's own exit and a loaded machine.
const EXIT_BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ad_after_an_outage_the_oldest_event_goes_first_again() {
    const SENT: usize = 6;
    /// Refusals of the oldest event before the outage: its own backoff is then 4 to 8 s
    /// (250 ms doubled five times), far longer than the rest of the case takes.
    const OLDEST_REFUSED: usize = 6;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let engine = site.start_engine();
    // Stage 0: the oldest event (the first key seen) is refused, every other one passes: it
    // waits on its own backoff, which grows with each refusal; the events behind it pass, and
    // no outage is seen. Stage 1: the next request passes, the two after it are refused: two
    // events failing one after the other, an outage. Stage 2: everything passes.
    let stage = Arc::new(Mutex::new((0u8, 0usize, None::<String>)));
    let script = stage.clone();
    let standin = Scripted::start(
        engine.url.clone(),
        Box::new(move |key| {
            let mut script = script.lock().expect("script");
            let (stage, taken, oldest) = &mut *script;
            let oldest = oldest.get_or_insert_with(|| key.to_owned());
            match *stage {
                0 if key == oldest.as_str() => Answer::Refuse,
                0 => Answer::Pass,
                1 => {
                    *taken += 1;
                    if *taken == 3 {
                        *stage = 2;
                    }
                    if *taken == 1 {
                        Answer::Pass
                    } else {
                        Answer::Refuse
                    }
                }
                _ => Answer::Pass,
            }
        }),
    )
    .await;
    let expected_path = site.path("expected.tsv");
    let resume = site.path("resume");
    let resume_arg = resume.to_string_lossy().into_owned();
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &standin.url,
        SENT,
        &expected_path,
        &[
            "--threads",
            "1",
            "--pause-after",
            "2",
            "--resume-file",
            &resume_arg,
            "--initial-backoff-ms",
            "250",
            "--max-backoff-ms",
            "20000",
        ],
    );
    harness.wait_for_line("paused", Duration::from_secs(60));
    let oldest_tries = || {
        let oldest = stage.lock().expect("script").2.clone();
        standin
            .answered()
            .iter()
            .filter(|(key, _)| Some(key) == oldest.as_ref())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while oldest_tries() < OLDEST_REFUSED {
        harness.assert_running("waiting for the oldest event's refusals");
        assert!(
            Instant::now() < deadline,
            "the oldest event was tried {} times in 60 s",
            oldest_tries()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = standin.answered().len();
    stage.lock().expect("script").0 = 1;
    std::fs::write(&resume, b"").expect("resume file");
    harness.wait_success("after an outage");

    let expected = read_expected(&expected_path);
    assert_delivered_once(&site, &expected, None);
    let oldest = expected[0].key.clone();
    let answered = standin.answered();
    assert_eq!(
        answered.first().map(|(key, _)| key),
        Some(&oldest),
        "the first request was for the oldest event: {answered:?}"
    );
    let after: Vec<&(String, Answer)> = answered.iter().skip(before).collect();
    let (outage, recovered) = after.split_at(3.min(after.len()));
    assert!(
        outage.len() == 3 && outage.iter().all(|(key, _)| *key != oldest),
        "setup: the oldest event was tried, or too few requests came, during the outage: {after:?}"
    );
    let passed: Vec<&String> = recovered
        .iter()
        .filter(|(_, answer)| *answer == Answer::Pass)
        .map(|(key, _)| key)
        .collect();
    assert!(
        passed.len() >= 2 && *passed[1] == oldest,
        "after the first delivery that ended the outage the oldest event ({oldest}) goes next, \
         not after its own backoff: {passed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ae_a_spool_that_hangs_at_exit_costs_only_the_deadline_and_its_losses_are_counted() {
    const SENT: usize = 200;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // No engine. The spool writer is held (the forwarder's test hook), so all events are in
    // memory at the exit; then every write to the spool hangs, as on a disk that stopped
    // answering: the flush at exit never ends. The exit must not wait for it past the
    // deadline, and the events it held must be reported lost, all of them, once.
    let sent = SENT.to_string();
    let harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "burst",
        &[
            "--count",
            &sent,
            "--hold-writers",
            "1",
            "--hang-spool",
            "1",
            "--budget-ms",
            "1000",
        ],
    );
    let log = wait_exit_within(harness, EXIT_BOUND, "a spool that hangs at exit");
    let listing: Vec<String> = std::fs::read_dir(site.spool())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        spool_files(&site),
        0,
        "nothing could be written: {listing:?}\n{log}"
    );
    let lost = format!("shutting down: {SENT} accepted event(s) could not be written to the spool");
    assert_eq!(
        count_lines(&log, &lost),
        1,
        "one line counts the {SENT} events lost in the flush that did not end:\n{log}"
    );
    assert!(
        log.contains("(0 written; its flush did not end"),
        "the line says the flush did not end:\n{log}"
    );
    assert_eq!(
        count_lines(&log, "could not be written to the spool"),
        1,
        "said once:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn af_an_event_the_intake_thread_holds_at_exit_is_waited_for_a_moment_only() {
    const SENT: usize = 200;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // No engine. The intake thread takes the first event and never passes it on (the
    // forwarder's test hook, as a registration's start-up that hangs would hold it); every
    // other event waits in the intake queue behind it. At the exit the shutdown waits for that
    // event a moment, counts it lost, and writes the others to the spool within the deadline.
    let sent = SENT.to_string();
    let harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "burst",
        &[
            "--count",
            &sent,
            "--hold-intake",
            "1",
            "--budget-ms",
            "1000",
        ],
    );
    let log = wait_exit_within(harness, EXIT_BOUND, "an event held by the intake thread");
    assert_eq!(
        spool_files(&site),
        SENT - 1,
        "every event but the held one is in the spool:\n{log}"
    );
    assert_eq!(
        count_lines(
            &log,
            "shutting down: 1 accepted event(s) could not be handed to a spool writer"
        ),
        1,
        "the held event is reported lost:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ag_log_lines_dropped_behind_a_hung_sink_are_counted_and_reported() {
    /// Per-event detail lines: more than the log thread's queue for them holds (1,000).
    const SENT: u64 = 1500;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // No engine. The sink hangs on its first line while every event is spooled, each with its
    // detail line (DebugLog): what does not fit in the queue is dropped and counted. Once the
    // sink takes lines again, the count is written: lines written and lines counted as
    // dropped are every line logged.
    let sent = SENT.to_string();
    let harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "logjam",
        &["--count", &sent],
    );
    let (status, out, log) = harness.finish(Duration::from_secs(120));
    let tail = tail_of(&log, 4000);
    assert!(
        status.is_some_and(|s| s.success()),
        "the harness failed ({status:?}): {out}\n{tail}"
    );
    assert!(
        out.lines().any(|l| l == format!("spooled {SENT}")),
        "every event was spooled: {out}\n{tail}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("log "))
        .unwrap_or_else(|| panic!("no count of the log lines: {out}\n{tail}"));
    let numbers = memory_line(line);
    assert!(
        numbers["dropped"] > 0 && numbers["detail"] + numbers["dropped"] == SENT,
        "{SENT} detail lines were logged: each is written or counted as dropped, once: {line}\n{tail}"
    );
    assert!(
        log.contains(&format!(
            "the log sink was too slow: {} line(s)",
            numbers["dropped"]
        )),
        "the count reaches the log:\n{tail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ah_pending_events_counts_an_event_moving_to_its_runtime_once() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // No engine, and the spool writer is held (the forwarder's test hook): no event leaves
    // memory. In each of 100 rounds the intake thread is held while 100 events queue behind
    // it, then let go, and two threads read PendingEvents without pause until it has moved
    // them all to the runtime's queue: every read must be every event accepted so far.
    let harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "moving",
        &["--count", "100", "--rounds", "100"],
    );
    let (status, out, log) = harness.finish(Duration::from_secs(120));
    let tail = tail_of(&log, 4000);
    assert!(
        status.is_some_and(|s| s.success()),
        "the harness failed ({status:?}): {out}\n{tail}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("moving "))
        .unwrap_or_else(|| panic!("no reads: {out}\n{tail}"));
    let numbers: HashMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .collect();
    assert_eq!(numbers.get("events"), Some(&"10000"), "{line}");
    let reads: u64 = numbers["reads"].parse().expect("reads");
    assert!(reads >= 100, "at least a read a round: {line}");
    assert_eq!(
        numbers.get("wrong"),
        Some(&"0"),
        "PendingEvents counted an event twice or not at all while it moved: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_an_event_dropped_while_its_delivery_is_under_way_is_counted_once() {
    const SENT: usize = 3;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let engine = site.start_engine();
    // A spool of one event. The first event's delivery is held on its way to the engine while
    // two more are spooled: the first is dropped to make room for the second, the second for
    // the third. Then the first one's delivery goes on and the engine accepts it. It arrived:
    // it is counted delivered, and only the second is counted dropped.
    let standin = Scripted::start(
        engine.url.clone(),
        Box::new({
            let mut first = None::<String>;
            move |key| {
                if first.get_or_insert_with(|| key.to_owned()) == key {
                    Answer::Hold
                } else {
                    Answer::Pass
                }
            }
        }),
    )
    .await;
    let expected_path = site.path("expected.tsv");
    let resume = site.path("resume");
    let resume_arg = resume.to_string_lossy().into_owned();
    let mut harness = Harness::run(
        build,
        "fx",
        &site,
        &standin.url,
        SENT,
        &expected_path,
        &[
            "--threads",
            "1",
            "--max-spool-files",
            "1",
            "--pause-after",
            "1",
            "--resume-file",
            &resume_arg,
        ],
    );
    harness.wait_for_line("paused", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    while standin.answered().is_empty() {
        harness.assert_running("waiting for the first delivery");
        assert!(
            Instant::now() < deadline,
            "the first event was not sent within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&resume, b"").expect("resume file");
    harness.wait_for_line("spooled", Duration::from_secs(30));
    assert_eq!(spool_files(&site), 1, "the spool holds its one event");
    standin.release();
    let drained = harness.wait_for_line("drained", Duration::from_secs(60));
    harness.wait_success("an event dropped while it was sent");

    let expected = read_expected(&expected_path);
    let (first, second) = (expected[0].key.clone(), expected[1].key.clone());
    let answered = standin.answered();
    assert_eq!(
        answered.first().map(|(key, _)| key),
        Some(&first),
        "the held delivery was the first event's: {answered:?}"
    );
    // The first and the third arrive; the second was dropped before it was ever sent.
    let arrived: Vec<Expected> = expected.into_iter().filter(|e| e.key != second).collect();
    assert_delivered_once(&site, &arrived, None);
    assert!(
        drained.contains("accepted 3, spooled 3, sent from memory 0, delivered 2,")
            && drained.contains(" dropped 1,"),
        "two events were delivered and one dropped, each counted once: {drained}"
    );
}

/// A handler that takes every event and does nothing, written by hand in WAT: the `handler`
/// world's one export (wit/jobhook.wit, `run-handler: func(context: job-context) ->
/// result<_, string>`) over the canonical ABI. The context (more than 16 flat values) arrives
/// through memory the engine allocates with `cabi_realloc`, a bump allocator (a sandbox serves
/// one call); the result is read from the address returned, 0, where the memory's zeroes say
/// `ok`. An engine can so have hundreds of handlers without a guest crate to build.
const NOOP_HANDLER_WAT: &str = r#"(component
  (core module $m
    (memory (export "memory") 4)
    (global $next (mut i32) (i32.const 64))
    (func (export "cabi_realloc") (param i32 i32) (param $align i32) (param $size i32) (result i32)
      (local $at i32)
      (local.set $at
        (i32.and (i32.add (global.get $next) (i32.sub (local.get $align) (i32.const 1)))
                 (i32.sub (i32.const 0) (local.get $align))))
      (global.set $next (i32.add (local.get $at) (local.get $size)))
      (local.get $at))
    (func (export "run-handler") (param i32) (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (type $datetime' (record (field "seconds" s64) (field "nanoseconds" u32)))
  (export $datetime "datetime" (type $datetime'))
  (type $job-result' (enum "unknown" "in-process" "success" "warning" "failure"))
  (export $job-result "job-result" (type $job-result'))
  (type $operation-type' (enum "unknown" "inventory" "add" "remove" "create" "create-add"
                               "reenrollment" "discovery" "set-password" "fetch-logs"))
  (export $operation-type "operation-type" (type $operation-type'))
  (type $job-context' (record
    (field "agent-id" string)
    (field "username" string)
    (field "client-machine" string)
    (field "job-result" $job-result)
    (field "job-id" string)
    (field "job-type" string)
    (field "job-type-id" string)
    (field "operation-type" $operation-type)
    (field "certificate-id" (option s32))
    (field "request-timestamp" (option $datetime))
    (field "current-retry-count" s32)))
  (export $job-context "job-context" (type $job-context'))
  (func $run (param "context" $job-context) (result (result (error string)))
    (canon lift (core func $i "run-handler") (memory (core memory $i "memory"))
      (realloc (core func $i "cabi_realloc"))))
  (export "run-handler" (func $run)))"#;

/// The most bytes of the engine's answer to an event: its 202 lists every handler the event goes
/// to, at most [`MAX_HANDLERS`](jobhook::app::config::MAX_HANDLERS) names of at most
/// [`MAX_HANDLER_NAME`](jobhook::queue::registration::MAX_HANDLER_NAME) characters, each with its
/// quotes and a comma, and its frame and event id take less than one more (forwarder/src/Sender.cs,
/// `EngineLargestAnswerBytes`).
const ENGINE_LARGEST_ANSWER_BYTES: usize =
    (jobhook::app::config::MAX_HANDLERS + 1) * (jobhook::queue::registration::MAX_HANDLER_NAME + 3);

/// What the forwarder read of an answer before it knew the engine's limits: an answer past
/// it was taken for someone else's.
const OLD_ANSWER_READ_BYTES: usize = 4096;

/// An engine with as many handlers as it allows, each with a name as long as it allows and
/// taking every event: its 202 names them all, some 17 KB, over the 4 KiB the forwarder used to
/// read of an answer. Each event is delivered once and leaves the spool; none is taken for
/// another server's answer and re-posted for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ak_an_engine_with_the_most_handlers_is_understood_though_its_answer_is_long() {
    const SENT: usize = 10;
    use jobhook::app::config::MAX_HANDLERS;
    use jobhook::queue::registration::MAX_HANDLER_NAME;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let wasm = wat::parse_str(NOOP_HANDLER_WAT).expect("the no-op handler's WAT");
    std::fs::write(site.path("noop.wasm"), wasm).expect("component");
    let handlers: String = (0..MAX_HANDLERS)
        .map(|i| {
            let name = format!("{i:03}-{}", "h".repeat(MAX_HANDLER_NAME - 4));
            format!("[[handlers]]\nname = \"{name}\"\ncomponent = \"noop.wasm\"\njob_types = [\"*\"]\n\n")
        })
        .collect();
    let site = site.with_engine_config("", &handlers);
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let harness = Harness::run(
        build,
        "fx",
        &site,
        &engine.url,
        SENT,
        &expected_path,
        &["--threads", "1"],
    );
    let log = harness.wait_success_log("an engine with the most handlers");
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    assert_eq!(spool_files(&site), 0, "every event left the spool:\n{log}");
    assert!(
        !log.contains("not the engine's answer") && !log.contains("cannot deliver"),
        "the engine's long answers were taken for what they are:\n{}",
        tail_of(&log, 4000)
    );

    // What the forwarder was answered: the engine's answer to one more event, as long as the
    // engine's limits allow and over what the forwarder used to read.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/job-complete", engine.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(jobhook_testkit::sample_context_json().to_string())
        .send()
        .await
        .expect("POST an event");
    assert_eq!(response.status().as_u16(), 202);
    let answer = response.text().await.expect("the answer");
    assert!(
        answer.len() > OLD_ANSWER_READ_BYTES && answer.len() <= ENGINE_LARGEST_ANSWER_BYTES,
        "the engine's answer is {} bytes, between {OLD_ANSWER_READ_BYTES} and \
         {ENGINE_LARGEST_ANSWER_BYTES}",
        answer.len()
    );
}

/// A server that answers every request with `status`, `content_type`, `headers` and `body`;
/// returns its URL and the number of requests it was sent.
async fn answer_every_request_as(
    status: u16,
    content_type: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stand-in");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (headers, body, counted) = (headers.clone(), body.clone(), counted.clone());
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                while read_request(&mut socket, &mut buffer).await.is_some() {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut head = format!(
                        "HTTP/1.1 {status} Stand-in\r\ncontent-type: {content_type}\r\n\
                         content-length: {}\r\n",
                        body.len()
                    );
                    for (name, value) in &headers {
                        head.push_str(&format!("{name}: {value}\r\n"));
                    }
                    head.push_str("\r\n");
                    if socket.write_all(head.as_bytes()).await.is_err()
                        || socket.write_all(&body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, requests)
}

/// The longest a log line about an answer may be: the forwarder's excerpt of the answer
/// (`Sender.MaxLoggedAnswerChars`, 300) and its own words around it.
const LONGEST_ANSWER_LINE: usize = 1000;

/// A long answer that is not the engine's (a web page, 20 KB) is logged as a short excerpt,
/// saying how long it was; a redirect is logged with where it points (excerpted too), and is
/// not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn al_a_long_answer_is_logged_short_and_a_redirect_with_where_it_points() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let page = format!("<html><body>{}</body></html>", "a".repeat(20_000));
    let (standin, _) =
        answer_every_request_as(202, "text/html", Vec::new(), page.into_bytes()).await;
    let expected_path = site.path("expected.tsv");
    let mut harness = Harness::run(build, "fx", &site, &standin, 1, &expected_path, &[]);
    wait_for_log(&mut harness, "HTTP 202");
    let log = std::fs::read_to_string(harness.log_path()).unwrap_or_default();
    drop(harness);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("HTTP 202")).collect();
    assert!(!lines.is_empty(), "{log}");
    for line in &lines {
        assert!(
            line.len() <= LONGEST_ANSWER_LINE,
            "a log line carries {} characters of an answer:\n{line}",
            line.len()
        );
        assert!(
            line.contains("HTTP 202 <html><body>aaa")
                && line.contains("(cut: 20026 characters in all)")
                && line.contains("not the engine's answer"),
            "the line says what answered, how much, and that it is not the engine's: {line}"
        );
    }

    // A redirect to another server, with a long Location: logged with where it points, the
    // bearer token never sent there.
    let (elsewhere, sent_elsewhere) =
        answer_every_request_as(202, "application/json", Vec::new(), b"{}".to_vec()).await;
    let location = format!("{elsewhere}/v1/job-complete?{}", "q".repeat(1000));
    let (redirecting, _) = answer_every_request_as(
        307,
        "text/plain",
        vec![("Location".to_owned(), location.clone())],
        Vec::new(),
    )
    .await;
    let _ = std::fs::remove_dir_all(site.spool());
    let mut harness = Harness::run(build, "fx", &site, &redirecting, 1, &expected_path, &[]);
    wait_for_log(&mut harness, "HTTP 307");
    // A few more tries, none of which may go elsewhere.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let log = std::fs::read_to_string(harness.log_path()).unwrap_or_default();
    drop(harness);
    let line = log
        .lines()
        .find(|l| l.contains("HTTP 307"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&format!("HTTP 307 redirecting to {}", &location[..200]))
            && line.contains(&format!("(cut: {} characters in all)", location.len()))
            && line.contains("redirects are not followed"),
        "the redirect is logged with where it points: {line}"
    );
    assert!(
        line.len() <= LONGEST_ANSWER_LINE,
        "{} characters: {line}",
        line.len()
    );
    assert_eq!(
        sent_elsewhere.load(Ordering::SeqCst),
        0,
        "the redirect was followed:\n{log}"
    );
}

/// Events arrive faster than the spool writer writes them (a burst, the engine down, a queue of
/// 10 events): the full queue drops the oldest, but never the event being written, so that
/// every accepted event is counted once, spooled or dropped, and the spool holds exactly those
/// counted spooled.
/// The harness's `overflow` mode: `count` events handed over from two threads to a registration
/// whose in-memory queue holds 10.
fn start_overflow(build: &Path, site: &Site, count: u64, extra: &[&str]) -> Harness {
    let count = count.to_string();
    let mut args = vec![
        "--count",
        &count,
        "--threads",
        "2",
        "--max-queued-events",
        "10",
    ];
    args.extend_from_slice(extra);
    Harness::start(build, "fx", site, &site.engine_url(), "overflow", &args)
}

/// Waits for `overflow` to end: its counts line and the counts in it, or a panic with its
/// output and log if it printed none or failed.
fn overflow_counts(harness: Harness) -> (String, HashMap<String, u64>) {
    let (status, out, log) = harness.finish(Duration::from_secs(120));
    let line = out
        .lines()
        .find(|l| l.starts_with("overflow "))
        .unwrap_or_else(|| panic!("no counts ({status:?}): {out}\n{}", tail_of(&log, 4000)))
        .to_owned();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {out}\n{}",
        tail_of(&log, 4000)
    );
    let counts = memory_line(&line);
    (line, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn am_every_accepted_event_is_counted_once_spooled_or_dropped() {
    const SENT: u64 = 9000;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let harness = start_overflow(build, &site, SENT, &[]);
    let (line, n) = overflow_counts(harness);
    assert_eq!(n["accepted"], SENT, "{line}");
    assert!(
        n["dropped"] > 0 && n["spooled"] > 0,
        "the queue overflowed while events were written: {line}"
    );
    assert_eq!(
        n["spooled"] + n["dropped"],
        n["accepted"],
        "each accepted event is counted spooled or dropped, once: {line}"
    );
    assert_eq!(
        n["files"], n["spooled"],
        "the spool holds the events counted spooled: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ax_behind_a_spool_that_cannot_be_written_each_event_is_counted_once_sent_or_dropped() {
    const SENT: u64 = 3000;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let _engine = site.start_engine();
    let go = site.path("go");
    let go_arg = go.to_string_lossy().into_owned();
    let mut harness = start_overflow(build, &site, SENT, &["--pause-file", &go_arg]);
    harness.wait_for_line("opened", Duration::from_secs(60));
    // As a full disk does: the spool takes no file from here on.
    let lock = Immutable::new(site.spool());
    std::fs::write(&go, b"").expect("go file");
    let (line, n) = overflow_counts(harness);
    drop(lock);
    assert_eq!(n["accepted"], SENT, "{line}");
    assert_eq!((n["spooled"], n["files"]), (0, 0), "{line}");
    assert!(
        n["dropped"] > 0 && n["sent_from_memory"] > 0,
        "the queue overflowed while events were sent from memory: {line}"
    );
    assert_eq!(
        n["sent_from_memory"] + n["dropped"],
        n["accepted"],
        "each accepted event is counted sent or dropped, once: {line}"
    );
    // Every context is valid: each event sent was delivered, and none counted dropped was.
    assert_eq!(n["delivered"], n["sent_from_memory"], "{line}");
    assert_eq!(
        site.stored_events().len() as u64,
        n["delivered"],
        "the engine holds exactly the events counted delivered: {line}"
    );
}

/// A context with a string over the engine's 4 KiB per field is refused before it is spooled,
/// whichever way it is over: more characters than that (known in RunHandler), more bytes of
/// UTF-8 in fewer characters, or a lone surrogate sent as the three bytes of U+FFFD. It is
/// counted and reported with the field named, never sent; a field of exactly 4 KiB arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_a_string_field_over_the_engines_limit_is_refused_before_it_is_spooled() {
    const SENT: usize = 40;
    const EVERY: &str = "5";
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let engine = site.start_engine();
    let expected_path = site.path("expected.tsv");
    let harness = Harness::run(
        build,
        "fx",
        &site,
        &engine.url,
        SENT,
        &expected_path,
        &["--threads", "1", "--long-field-every", EVERY],
    );
    let log = harness.wait_success_log("string fields over the engine's limit");
    let expected = read_expected(&expected_path);
    let refused = expected.iter().filter(|e| e.invalid).count();
    assert_eq!(refused, 8);
    assert_delivered_once(&site, &expected, None);
    assert_eq!(
        rejected_files(&site),
        0,
        "nothing the engine would refuse was sent:\n{log}"
    );
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("is over the engine's limit of 4096 bytes of UTF-8"))
        .collect();
    let named = [
        "(the last: job ",
        "Username is 4097 characters, so over 4096 bytes)",
        "ClientMachine is 4098 bytes)",
        "JobType is 4098 bytes)",
    ];
    assert!(
        !reports.is_empty()
            && reports
                .iter()
                .all(|l| l.contains(named[0]) && named[1..].iter().any(|field| l.contains(field))),
        "the refusals are reported, each report naming the field and its size:\n{log}"
    );
    assert!(
        reports
            .last()
            .is_some_and(|l| l.contains(&format!("{refused} since start"))),
        "every refusal is counted:\n{log}"
    );
}

/// The value of the C# constant `name` in `source` (`const int <name> = <a> * <b> …;`, integer
/// literals multiplied), or None.
fn csharp_const(source: &str, name: &str) -> Option<usize> {
    let start = source.find(&format!("const int {name} = "))? + "const int  = ".len() + name.len();
    let expression = &source[start..start + source[start..].find(';')?];
    expression
        .split('*')
        .map(|factor| factor.trim().parse::<usize>().ok())
        .product()
}

/// The forwarder's copies of the engine's limits (it cannot link the engine's code) are the
/// engine's: the handlers an answer may list and their names' length (what it reads of an
/// answer is derived from them), the body and the string field it takes.
#[test]
fn ao_the_forwarders_copies_of_the_engines_limits_are_the_engines() {
    let read = |file: &str| {
        let path = workspace_root().join("forwarder").join("src").join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let sender = read("Sender.cs");
    let json = read("ContextJson.cs");
    for (source, name, engine) in [
        (
            &sender,
            "EngineMaxHandlers",
            jobhook::app::config::MAX_HANDLERS,
        ),
        (
            &sender,
            "EngineMaxHandlerName",
            jobhook::queue::registration::MAX_HANDLER_NAME,
        ),
        (
            &json,
            "MaxStringFieldBytes",
            jobhook::context::MAX_STRING_FIELD_BYTES,
        ),
        (&json, "MaxBodyBytes", jobhook::context::MAX_CONTEXT_BYTES),
    ] {
        assert_eq!(
            csharp_const(source, name),
            Some(engine),
            "the forwarder's {name} is not the engine's {engine}"
        );
    }
}

/// Waits until the harness's log contains `needle` or the harness has exited (its log is
/// returned either way, so the caller's assertion names what happened); at most `timeout`.
fn wait_for_log_or_exit(harness: &mut Harness, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(harness.log_path()).unwrap_or_default();
        let exited = matches!(harness.child.try_wait(), Ok(Some(_)));
        if log.contains(needle) || exited || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ap_a_spool_that_fails_for_a_moment_at_exit_still_gets_every_event() {
    const SENT: usize = 200;
    const NEEDLE: &str = "cannot write to the spool";
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // No engine, and the spool writer is held (the forwarder's test hook): every event is in
    // memory at the exit. Before the exit the spool directory is made immutable, as a disk full
    // for a moment or a scan holding new files would: the flush's first writes fail. Once that
    // is logged, the directory is writable again, well within the 5 s deadline.
    let sent = SENT.to_string();
    let exit_file = site.path("exit");
    let exit_arg = exit_file.to_string_lossy().into_owned();
    let mut harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "burst",
        &[
            "--count",
            &sent,
            "--hold-writers",
            "1",
            "--exit-file",
            &exit_arg,
            "--budget-ms",
            "1000",
        ],
    );
    harness.wait_for_line("submitted", Duration::from_secs(60));
    // The writer opens the spool (rejected/ is made first, then the directory is indexed)
    // before it waits at the hook.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !site.spool().join("rejected").is_dir() {
        assert!(Instant::now() < deadline, "the spool did not open");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let lock = Immutable::new(site.spool());
    std::fs::write(&exit_file, b"").expect("exit file");
    let failing = wait_for_log_or_exit(&mut harness, NEEDLE, Duration::from_secs(4));
    drop(lock);
    assert!(
        failing.contains(NEEDLE),
        "the flush's first write failed (the case needs it):\n{failing}"
    );
    let (status, _, log) = harness.finish(EXIT_BOUND);
    assert!(
        status.is_some_and(|s| s.success()),
        "the harness ended ({status:?}):\n{log}"
    );
    assert_eq!(
        spool_files(&site),
        SENT,
        "every event in memory is in the spool after the exit:\n{log}"
    );
    assert_eq!(
        count_lines(&log, "are lost"),
        0,
        "nothing is reported lost:\n{log}"
    );
}

/// A spool file name of this forwarder's pattern with `.tmp`: a write under way (or left by a
/// crash).
fn own_temp_name(ticks: u64, sequence: u32) -> String {
    format!(
        "{ticks:019}-{sequence:010}-{}.evt.tmp",
        Uuid::new_v4().simple()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aq_another_live_process_temp_file_is_left_alone_when_the_spool_opens() {
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    // The old worker of an overlapped recycle is writing an event into the spool as the new
    // one opens it: its `.tmp` was written a moment ago. A crash's leftover is an hour old.
    std::fs::create_dir_all(site.spool()).expect("spool");
    let live = site.spool().join(own_temp_name(638_000_000_000_000_000, 1));
    let leftover = site.spool().join(own_temp_name(638_000_000_000_000_000, 2));
    std::fs::write(&live, b"jobhook-forwarder-spool 1\n").expect("live temp file");
    std::fs::write(&leftover, b"jobhook-forwarder-spool 1\n").expect("leftover");
    std::fs::File::options()
        .write(true)
        .open(&leftover)
        .expect("leftover")
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .expect("age the leftover");
    let log = burst(
        build,
        &site,
        3,
        &["--budget-ms", "1000"],
        "open a shared spool",
    );
    assert!(
        live.exists(),
        "another live process's file being written was deleted:\n{log}"
    );
    assert!(
        !leftover.exists(),
        "a crash's leftover an hour old is deleted:\n{log}"
    );
    assert_eq!(spool_files(&site), 3, "the events are spooled:\n{log}");
}

/// A stand-in in front of the engine at `engine_url` that answers every other request with a
/// gateway's 502, as a balancer with one dead node does, and passes the others on.
async fn every_other_request_502(engine_url: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stand-in");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let requests = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (requests, client, engine_url) =
                (requests.clone(), client.clone(), engine_url.clone());
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                while let Some(request) = read_request(&mut socket, &mut buffer).await {
                    let (status, body) = if requests.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                        (502, b"<html>502 Bad Gateway</html>".to_vec())
                    } else {
                        forward(&client, &engine_url, &request).await
                    };
                    if !respond(&mut socket, status, &body).await {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ar_an_engine_failing_every_other_request_costs_a_few_lines_not_two_per_event() {
    const SENT: usize = 100;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let _engine = site.start_engine();
    let url = every_other_request_502(site.engine_url()).await;
    let expected_path = site.path("expected.tsv");
    let log = Harness::run(build, "fx", &site, &url, SENT, &expected_path, &[])
        .wait_success_log("an engine failing every other request");
    assert_delivered_once(&site, &read_expected(&expected_path), None);
    // Each failure is a short outage, and each delivery after it a recovery: about SENT of
    // each within seconds. One line of each kind a minute, and the recovery left over at the
    // exit counting what came and went: a few lines in all.
    let failures = count_lines(&log, "cannot deliver to");
    let recoveries = count_lines(&log, " again after ");
    assert!(
        (1..=2).contains(&failures) && (1..=2).contains(&recoveries),
        "{failures} failure and {recoveries} recovery line(s) for {SENT} events:\n{log}"
    );
    assert!(
        log.contains("came and went since the previous such line"),
        "the outages not logged one by one are counted:\n{log}"
    );
}

/// Once the process has begun to end, a thread that is not the shutdown's own is not started,
/// whatever asks for it: here a handler made (and called) by a ProcessExit handler that runs
/// after the forwarder's shutdown, when the notices thread had not started yet (its starts
/// failing until then); the refused call's count would start it. Started, it would run its
/// first code as the runtime tears down, which Mono aborts the process for. The events taken
/// before are all spooled. (The intake thread is started only by the first handler made and by
/// an event taken, never after the shutdown; the sender: the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_process_end_no_thread_starts_but_the_shutdowns_own() {
    const SENT: usize = 3;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let sent = SENT.to_string();
    let harness = Harness::start(
        build,
        "fx",
        &site,
        &site.engine_url(),
        "burst",
        &[
            "--count",
            &sent,
            "--budget-ms",
            "1000",
            "--fail-thread",
            "notices",
            "--fail-starts",
            "1000000",
            "--late-handler",
            "1",
        ],
    );
    let (status, out, log) = harness.finish(Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| s.success()),
        "the harness failed ({status:?}): {out}\n{log}"
    );
    let late = out.lines().find(|l| l.starts_with("late handler: "));
    assert!(
        late.is_some_and(|line| line.contains("notices thread none")),
        "a handler made at the process's end started the notices thread: {late:?}\n{log}"
    );
    assert_eq!(
        spool_files(&site),
        SENT,
        "the events taken before the exit are spooled:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_a_process_ending_as_its_sender_begins_to_send_exits_cleanly() {
    // Short runs in a row, each ending while its sender starts or begins its first send,
    // first with the engine down, then with it up (sends then end as the process does). Before
    // a sender was kept from starting once the shutdown began, one run in five to ten had the
    // runtime abort the process at exit (Mono: a class initialiser of that first send cut short by the teardown, SIGABRT);
    // twenty runs of each meet that almost always.
    const RUNS: usize = 20;
    let Some((build, _serial, site)) = begin().await else {
        return;
    };
    let mut engine = None;
    for run in 1..=2 * RUNS {
        if run == RUNS + 1 {
            engine = Some(site.start_engine());
        }
        let up = engine.is_some();
        // An empty spool each time: a spooled event would be sent at start, long before exit.
        match std::fs::remove_dir_all(site.spool()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("empty the spool: {e}"),
        }
        let log = burst(
            build,
            &site,
            3,
            &["--budget-ms", "1000"],
            &format!("run {run} (engine up: {up}), ending as its first send begins"),
        );
        let spooled = spool_files(&site);
        if up {
            assert!(
                spooled <= 3,
                "run {run}: at most the 3 events are spooled:\n{log}"
            );
        } else {
            assert_eq!(
                spooled, 3,
                "run {run}: the events stay spooled for the next start:\n{log}"
            );
        }
    }
}
