//! A private PostgreSQL server for tests: a throwaway cluster in a temporary directory, listening
//! only on 127.0.0.1 on a free port, stopped and deleted when dropped.
//!
//! The server binaries come from Debian's `postgresql` package (`/usr/lib/postgresql/*/bin`,
//! installed by `.ci/run`), or `JOBHOOK_PG_BINDIR`, or `pg_config --bindir`, or `initdb` on the
//! `PATH`. `initdb` and `postgres` refuse to run as root, so when the tests run as root the
//! cluster belongs to the `postgres` OS user (the package creates it) and its commands run through
//! `runuser -u postgres --`.
//!
//! Authentication is as in production: the superuser `postgres` may connect only over the
//! cluster's own Unix socket (trust, used by the test set-up), and every TCP connection needs a
//! password (SCRAM). The role [`ROLE`] gets a password generated per server and owns every test
//! database, so tests exercise the same password path as an operator's configuration.
//!
//! When PostgreSQL is missing or cannot start, [`database_or_skip`] prints a visible
//! `SKIPPED: PostgreSQL not available: <reason>` line and the test returns — unless
//! `JOBHOOK_REQUIRE_POSTGRES=1` (set by `.ci/run` once PostgreSQL is installed), in which case
//! the test fails instead, so a broken set-up cannot pass CI by skipping.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::free_port;

/// The login role that test databases belong to (what `jobhook serve` connects as).
pub const ROLE: &str = "jobhook";

/// Environment variable that turns "PostgreSQL not available" from a skip into a failure.
pub const REQUIRE_ENV: &str = "JOBHOOK_REQUIRE_POSTGRES";

/// Environment variable naming a directory with `initdb`, `pg_ctl`, `postgres` and `psql`.
pub const BINDIR_ENV: &str = "JOBHOOK_PG_BINDIR";

/// How long `pg_ctl` waits for the server to accept connections.
const START_TIMEOUT_SECS: u32 = 60;

/// Ports tried before giving up: a free port can be taken between finding it and binding it.
const START_ATTEMPTS: usize = 3;

/// Connections the test server accepts. Each store opens a leadership connection plus a small
/// pool, and tests run in parallel: well above what they need, well below the semaphores a
/// container allows.
const MAX_CONNECTIONS: u32 = 200;

/// WAL segments (16 MiB each) a durable server writes and recycles before it is handed out.
///
/// A cluster fresh from `initdb` has no segments to reuse: each new one is created, filled
/// with zeros and flushed while every commit waits for it (60 ms, every 1.5 s at 4,000
/// deliveries/s, seen in the server's log as commits of 50–70 ms). A server in service reuses
/// the segments its checkpoints recycle and does not pay that. 40 segments (640 MiB) outlast
/// the WAL after which the default `max_wal_size` (1 GB) starts a checkpoint (about 540 MB),
/// and that checkpoint recycles the segments used before it.
const WARM_WAL_SEGMENTS: u32 = 40;

/// A running throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct PostgresServer {
    bindir: PathBuf,
    base: PathBuf,
    data: PathBuf,
    port: u16,
    password: String,
    run_as_postgres: bool,
    databases: AtomicUsize,
    /// Whether commits are flushed to disk as on a production server (`fsync`,
    /// `synchronous_commit`); tests turn that off, benchmarks keep it.
    durable: bool,
}

/// One empty database on a [`PostgresServer`], owned by [`ROLE`].
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// Its name.
    pub name: String,
    /// `postgres://jobhook@127.0.0.1:PORT/NAME` — no password in it, as in a jobhook config.
    pub url: String,
    /// The password of [`ROLE`].
    pub password: String,
    server: Arc<PostgresServer>,
}

impl TestDatabase {
    /// The `[store]` section of a jobhook configuration on this database, with `lease_ms` and
    /// `data_dir`. The password is read from the file `db-password` beside the configuration
    /// (write [`TestDatabase::password`] there).
    pub fn store_section(&self, lease_ms: u64, data_dir: &str) -> String {
        format!(
            "[store]\nkind = \"postgres\"\nurl = \"{url}\"\npassword = {{ file = \"db-password\" }}\n\
             lease_ms = {lease_ms}\ndata_dir = \"{data_dir}\"\n",
            url = self.url
        )
    }

    /// Runs `sql` as the superuser in this database and returns psql's unaligned output
    /// (`-At`: one row per line, columns separated by `|`).
    pub fn query(&self, sql: &str) -> Result<String, String> {
        self.server.psql(&self.name, sql)
    }

    /// The server it lives on.
    pub fn server(&self) -> &Arc<PostgresServer> {
        &self.server
    }
}

/// A database on the shared test server, or `None` after printing why PostgreSQL is not
/// available (failing instead when `JOBHOOK_REQUIRE_POSTGRES=1`).
pub fn database_or_skip() -> Option<TestDatabase> {
    or_skip(PostgresServer::shared().and_then(|server| server.create_database()))
}

/// A database on a server of its own, for a test that stops or restarts the server (the shared
/// one serves the other tests of the process at the same moment); the server is stopped and
/// deleted when the last handle to it is dropped. Skips like [`database_or_skip`].
pub fn private_database_or_skip() -> Option<TestDatabase> {
    or_skip(
        PostgresServer::start()
            .map(Arc::new)
            .and_then(|server| server.create_database()),
    )
}

fn or_skip(database: Result<TestDatabase, String>) -> Option<TestDatabase> {
    match database {
        Ok(db) => Some(db),
        Err(reason) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("PostgreSQL is required ({REQUIRE_ENV}=1) but not available: {reason}");
            }
            // Straight to the file descriptor: the test harness captures `println!`/`eprintln!`
            // of passing tests, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: PostgreSQL not available: {reason}"
            );
            None
        }
    }
}

/// The server shared by the tests of one process, and whether its clean-up is registered.
static SHARED: Mutex<Option<Result<Arc<PostgresServer>, String>>> = Mutex::new(None);

unsafe extern "C" {
    /// C's `atexit`: the Rust test harness ends with `exit`, which runs these callbacks.
    fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
}

/// Stops the shared server when the test process exits.
extern "C" fn stop_shared() {
    let taken = match SHARED.lock() {
        Ok(mut shared) => shared.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    drop(taken);
}

impl PostgresServer {
    /// The server shared by every test of this process: started on first use, stopped when the
    /// process exits. Starting costs a second or two (`initdb`), so tests share one server and
    /// each takes its own database.
    pub fn shared() -> Result<Arc<Self>, String> {
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if shared.is_none() {
            let started = PostgresServer::start().map(Arc::new);
            if started.is_ok() {
                // SAFETY: `atexit` only stores the pointer of a function that lives as long as
                // the program; `stop_shared` does not unwind (it only takes a lock and drops).
                unsafe {
                    atexit(stop_shared);
                }
            }
            *shared = Some(started);
        }
        match shared.as_ref() {
            Some(result) => result.clone(),
            None => Err("the shared server was not started".into()),
        }
    }

    /// Starts a private server (initdb into a new temporary directory, then `pg_ctl start`)
    /// that does not flush commits to disk: it is thrown away, and tests want speed.
    pub fn start() -> Result<Self, String> {
        Self::start_with(false)
    }

    /// Like [`PostgresServer::start`], with PostgreSQL's default durability (every commit
    /// flushed to disk before it is answered): what a benchmark of a real installation needs.
    pub fn start_durable() -> Result<Self, String> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Self, String> {
        let bindir = bindir()?;
        let run_as_postgres = effective_uid_is_root();
        let owner = if run_as_postgres {
            Some(postgres_user().ok_or(
                "running as root, and there is no `postgres` OS user to own the cluster \
                 (initdb refuses to run as root); install Debian's postgresql package",
            )?)
        } else {
            None
        };
        let base = unique_dir()?;
        let mut server = PostgresServer {
            bindir,
            data: base.join("data"),
            base,
            port: 0,
            password: password(),
            run_as_postgres,
            databases: AtomicUsize::new(0),
            durable,
        };
        // From here on, dropping `server` removes the directory (and stops what was started).
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&server.base, Some(uid), Some(gid))
                .map_err(|e| format!("cannot give {} to postgres: {e}", server.base.display()))?;
        }
        server.initdb()?;
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            server.port = free_port();
            match server.pg_ctl_start() {
                Ok(()) => {
                    server.create_role()?;
                    if durable {
                        server.recycle_wal()?;
                    }
                    return Ok(server);
                }
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// Stops the server as a restart by an operator or a package upgrade does
    /// (`pg_ctl stop -m fast`): open sessions are ended, running transactions rolled back, and
    /// new connections refused until [`PostgresServer::start_again`].
    pub fn stop_fast(&self) -> Result<(), String> {
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!("pg_ctl stop failed: {}", text(&output)))
        }
    }

    /// Starts the server stopped by [`PostgresServer::stop_fast`] again, on the same port with
    /// the same data; returns once it accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// Freezes the whole server — the postmaster and every backend — with SIGSTOP, as a VM
    /// paused or a storage stall leaves it: connections stay open and the kernel keeps
    /// acknowledging what is sent, but nothing answers until [`PostgresServer::thaw`].
    pub fn freeze(&self) -> Result<(), String> {
        self.signal_all(libc::SIGSTOP)
    }

    /// Undoes [`PostgresServer::freeze`].
    pub fn thaw(&self) -> Result<(), String> {
        self.signal_all(libc::SIGCONT)
    }

    /// Sends `signal` to the postmaster (the first line of `postmaster.pid`) and then to each
    /// of its children (found in `/proc`): the postmaster first, so that with SIGSTOP no new
    /// backend is forked after the children were listed.
    fn signal_all(&self, signal: libc::c_int) -> Result<(), String> {
        let pid_file = self.data.join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
        let postmaster: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| format!("{} holds no pid", pid_file.display()))?;
        let send = |pid: i32| {
            // SAFETY: `kill` only sends a signal to the server's own processes.
            if unsafe { libc::kill(pid, signal) } == 0 {
                Ok(())
            } else {
                Err(format!(
                    "cannot signal PostgreSQL process {pid}: {}",
                    std::io::Error::last_os_error()
                ))
            }
        };
        send(postmaster)?;
        // Twice: a backend the postmaster was forking as the signal came shows up only after
        // the fork returns.
        for pass in 0..2 {
            if pass > 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            self.signal_children(postmaster, &send)?;
        }
        Ok(())
    }

    /// Sends `send` to every process whose parent is `parent`.
    fn signal_children(
        &self,
        parent: i32,
        send: &dyn Fn(i32) -> Result<(), String>,
    ) -> Result<(), String> {
        for entry in std::fs::read_dir("/proc").map_err(|e| format!("cannot read /proc: {e}"))? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // `/proc/<pid>/stat`: "pid (comm) state ppid …"; comm may hold spaces, so the
            // fields are read after its closing parenthesis.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(parent) {
                send(pid)?;
            }
        }
        Ok(())
    }

    /// The TCP port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a new, empty database owned by [`ROLE`].
    pub fn create_database(self: &Arc<Self>) -> Result<TestDatabase, String> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("jobhook_test_{n}");
        // `name` is made of ASCII letters, digits and '_' only.
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {ROLE}"))?;
        Ok(TestDatabase {
            url: format!("postgres://{ROLE}@127.0.0.1:{}/{name}", self.port),
            name,
            password: self.password.clone(),
            server: Arc::clone(self),
        })
    }

    /// Runs `sql` as the superuser over the cluster's Unix socket; returns the unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let output = Command::new(self.bindir.join("psql"))
            .arg("-X")
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-h"])
            .arg(&self.base)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(format!("psql {sql:?} failed: {}", text(&output)))
        }
    }

    /// A command of the server's bin directory, run as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        if self.run_as_postgres {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(self.bindir.join(program));
            command
        } else {
            Command::new(self.bindir.join(program))
        }
    }

    fn initdb(&self) -> Result<(), String> {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!("initdb failed: {}", text(&output)))
        }
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        // Without `durable`, durability settings are off: the cluster is thrown away.
        let durability = if self.durable {
            ""
        } else {
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let options = format!(
            "-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c max_connections={MAX_CONNECTIONS} \
             -c shared_buffers=32MB{durability}",
            port = self.port,
            socket = self.base.display(),
        );
        let log = self.base.join("postgres.log");
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args([
                "-w",
                "-t",
                &START_TIMEOUT_SECS.to_string(),
                "-o",
                &options,
                "start",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            // A failed start may leave a postmaster behind that came up late.
            self.stop();
            Err(format!(
                "pg_ctl start failed: {}; server log:\n{log}",
                text(&output)
            ))
        }
    }

    /// Makes the server what one in service is: [`WARM_WAL_SEGMENTS`] segments written, then
    /// a checkpoint that recycles them, so that the measured commits do not wait for new
    /// segments to be created.
    fn recycle_wal(&self) -> Result<(), String> {
        // Each switch needs WAL since the last one: a row inserted before it.
        self.psql(
            "postgres",
            &format!(
                "CREATE TABLE wal_warmup (n integer); \
                 DO $$ BEGIN FOR n IN 1..{WARM_WAL_SEGMENTS} LOOP \
                 INSERT INTO wal_warmup VALUES (n); PERFORM pg_switch_wal(); \
                 END LOOP; END $$; DROP TABLE wal_warmup"
            ),
        )?;
        self.psql("postgres", "CHECKPOINT").map(drop)
    }

    fn create_role(&self) -> Result<(), String> {
        // The password is generated from hex digits only, so quoting it is safe.
        self.psql(
            "postgres",
            &format!("CREATE ROLE {ROLE} LOGIN PASSWORD '{}'", self.password),
        )
        .map(drop)
    }

    fn stop(&self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
    .trim()
    .to_owned()
}

/// Where the server binaries are.
fn bindir() -> Result<PathBuf, String> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres", "psql"]
            .iter()
            .all(|p| dir.join(p).is_file())
    };
    if let Some(dir) = std::env::var_os(BINDIR_ENV).map(PathBuf::from) {
        return if has_all(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{BINDIR_ENV}={} lacks initdb, pg_ctl, postgres or psql",
                dir.display()
            ))
        };
    }
    // Debian installs each major version side by side; take the newest.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_all(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_all(&dir) {
            return Ok(dir);
        }
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_all(dir))
        .ok_or_else(|| {
            "no initdb/pg_ctl/postgres/psql found (looked in /usr/lib/postgresql/*/bin, \
             pg_config --bindir and PATH); install Debian's postgresql package \
             (apt-get install -y postgresql)"
                .to_owned()
        })
}

/// Whether this process runs as root (effective uid 0), from `/proc/self/status`.
fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` OS user, from `/etc/passwd`.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let mut fields = line.split(':').skip(2);
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    Some((uid, gid))
}

/// A new directory under the system temporary directory that the `postgres` user can reach.
/// (`/tmp` itself is world-traversable; the cluster's own data directory is private.)
fn unique_dir() -> Result<PathBuf, String> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "jobhook-pg-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot set the mode of {}: {e}", dir.display()))?;
    Ok(dir)
}

/// A password for [`ROLE`], different for every server: hex digits of the time and process id.
/// (Test-only; the point is that the connection path uses a password at all.)
fn password() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    format!(
        "t{:x}{:x}{:x}",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments the server holds beyond the one it is writing: what it can reuse.
    fn segments_ahead(server: &PostgresServer) -> u32 {
        let ahead = server
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_ls_waldir() \
                 WHERE name ~ '^[0-9A-F]{24}$' AND name > pg_walfile_name(pg_current_wal_lsn())",
            )
            .expect("list the WAL directory");
        ahead.parse().expect("a count")
    }

    #[test]
    fn a_durable_server_has_wal_segments_to_reuse_and_a_throwaway_one_does_not() {
        let (Some(durable), Some(throwaway)) = (
            or_skip(PostgresServer::start_durable().and_then(|s| Arc::new(s).create_database())),
            or_skip(PostgresServer::start().and_then(|s| Arc::new(s).create_database())),
        ) else {
            return;
        };
        let (durable, throwaway) = (
            segments_ahead(durable.server()),
            segments_ahead(throwaway.server()),
        );
        assert!(durable >= WARM_WAL_SEGMENTS, "{durable} segments ahead");
        assert!(
            throwaway < WARM_WAL_SEGMENTS / 4,
            "{throwaway} segments ahead"
        );
    }
}
