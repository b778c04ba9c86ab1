//! A `jobhook serve` child process for tests: started with a configuration, ready once it prints
//! its listening address, stopped with SIGTERM (graceful) or SIGKILL (crash).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The line prefix `jobhook serve` prints when it accepts connections, followed by
/// `http://` or `https://` and the address.
const READY_LINE: &str = "jobhook listening on ";

/// How long start-up (config, compiling every handler, opening the store) may take in a test.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the engine's log must not grow before [`EngineProcess::log_text`] reads it: its
/// writer thread writes whatever has gathered as soon as it is free, well within this.
const LOG_QUIET: Duration = Duration::from_millis(25);

/// Longest [`EngineProcess::log_text`] waits for the log to stop growing (a busy engine may
/// log without pause).
const LOG_SETTLE: Duration = Duration::from_secs(2);

/// The engine's log filter in tests: they read what it logs at `info`.
const TEST_LOG_FILTER: &str = "info";

/// A running `jobhook serve`.
pub struct EngineProcess {
    child: Option<Child>,
    /// Its base URL, e.g. `http://127.0.0.1:40123` (`https://` when it serves TLS).
    pub url: String,
    /// Where its stderr goes (appended across restarts).
    pub log: PathBuf,
}

impl EngineProcess {
    /// Starts `bin serve --config config`; stderr is appended to `log`. Panics with the log if
    /// the engine exits or does not become ready.
    pub fn start(bin: &Path, config: &Path, log: &Path) -> Self {
        Self::start_with_env(bin, config, log, &[])
    }

    /// Like [`EngineProcess::start`], with `env` added to the engine's environment (e.g. a
    /// library preloaded to move its clock).
    pub fn start_with_env(bin: &Path, config: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with_setup(bin, config, log, env, |_| {})
    }

    /// Like [`EngineProcess::start_with_env`], with `setup` applied to the command.
    fn start_with_setup(
        bin: &Path,
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
        setup: impl FnOnce(&mut Command),
    ) -> Self {
        let stderr = Self::append_to(log);
        Self::spawn(bin, config, stderr, log, Some(TEST_LOG_FILTER), env, setup).0
    }

    /// Like [`EngineProcess::start`], at the engine's own default log filter (its warnings and errors, handlers' errors only)
    /// instead of `info`: the engine as an operator runs it, for measurements — formatting
    /// every handler's log lines at `info` is work the default does not do.
    pub fn start_at_default_log_level(bin: &Path, config: &Path, log: &Path) -> Self {
        Self::spawn(bin, config, Self::append_to(log), log, None, &[], |_| {}).0
    }

    /// Like [`EngineProcess::start`], with the privileges of a service run as an ordinary
    /// user: an `RLIMIT_NICE` of 0 (the default) and no CAP_SYS_NICE — dropped from the
    /// capability bounding set, so that not even root gets it back at `exec`. Panics unless the
    /// running engine's `/proc` entries show both.
    #[cfg(target_os = "linux")]
    pub fn start_without_cap_sys_nice(bin: &Path, config: &Path, log: &Path) -> Self {
        /// `CAP_SYS_NICE` in `<linux/capability.h>`.
        const CAP_SYS_NICE: libc::c_ulong = 23;
        let lower = || {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `setrlimit` reads `none`, which lives through the call; `prctl` with
            // `PR_CAPBSET_DROP` takes integers only. Both are async-signal-safe, as `pre_exec`
            // requires, and touch only the child.
            unsafe {
                if libc::setrlimit(libc::RLIMIT_NICE, &none) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Refused (EPERM) to a process without CAP_SETPCAP, which has no CAP_SYS_NICE
                // to drop either.
                if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EPERM) {
                        return Err(e);
                    }
                }
            }
            Ok(())
        };
        let engine = Self::start_with_setup(bin, config, log, &[], |command| {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: `lower` only makes the two calls above (no allocation, no locks).
            unsafe { command.pre_exec(lower) };
        });
        // What the tests rely on, as the kernel reports it for the running engine.
        let proc_file = |name: &str| {
            let path = format!("/proc/{}/{name}", engine.pid());
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        };
        let status = proc_file("status");
        for set in ["CapPrm:", "CapEff:"] {
            let caps = status
                .lines()
                .find_map(|line| line.strip_prefix(set))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no {set} in /proc/<pid>/status:\n{status}"));
            assert_eq!(
                caps & (1 << CAP_SYS_NICE),
                0,
                "the engine still has CAP_SYS_NICE in {set} {caps:#x}"
            );
        }
        let limits = proc_file("limits");
        let nice = limits
            .lines()
            .find(|line| line.starts_with("Max nice priority"))
            .unwrap_or_else(|| panic!("no RLIMIT_NICE in /proc/<pid>/limits:\n{limits}"));
        assert_eq!(
            nice.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
            ["0", "0"],
            "{nice}"
        );
        engine
    }

    /// Like [`EngineProcess::start`], with every change of a thread's scheduling policy refused
    /// (`sched_setscheduler` fails with `EPERM`), as a container's seccomp profile may refuse
    /// it: a seccomp filter installed in the child before `exec`.
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    pub fn start_with_scheduling_refused(bin: &Path, config: &Path, log: &Path) -> Self {
        /// `AUDIT_ARCH_*` of this machine in `<linux/audit.h>`: the filter applies to its own
        /// system call numbers only.
        #[cfg(target_arch = "x86_64")]
        const AUDIT_ARCH: u32 = 0xc000_003e;
        #[cfg(target_arch = "aarch64")]
        const AUDIT_ARCH: u32 = 0xc000_00b7;
        /// Offsets of `arch` and `nr` in `struct seccomp_data`.
        const ARCH_OFFSET: u32 = 4;
        const NR_OFFSET: u32 = 0;
        let statement = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        };
        let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
        let ret = libc::BPF_RET | libc::BPF_K;
        let mut filter = vec![
            statement(load, ARCH_OFFSET),
            jump(AUDIT_ARCH, 1, 0),
            statement(ret, libc::SECCOMP_RET_ALLOW),
            statement(load, NR_OFFSET),
            jump(libc::SYS_sched_setscheduler as u32, 0, 1),
            statement(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            statement(ret, libc::SECCOMP_RET_ALLOW),
        ];
        // Runs in the child, on its copy of `filter` (made by `fork`).
        let refuse = move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_mut_ptr(),
            };
            // SAFETY: `prctl` reads `program` and the filter it points to, both alive through
            // the call; both calls are async-signal-safe, as `pre_exec` requires.
            unsafe {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &program as *const libc::sock_fprog,
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        Self::start_with_setup(bin, config, log, &[], |command| {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: `refuse` only makes the two calls above.
            unsafe { command.pre_exec(refuse) };
        })
    }

    fn append_to(log: &Path) -> Stdio {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        Stdio::from(stderr)
    }

    /// Like [`EngineProcess::start`], with stderr a pipe that is never read: the returned end
    /// is held, so once the pipe's buffer is full every write to it blocks, as a log collector
    /// that stopped reading would leave it. [`EngineProcess::log_text`] is empty.
    pub fn start_with_stalled_stderr(bin: &Path, config: &Path) -> (Self, ChildStderr) {
        let (engine, stderr) = Self::spawn(
            bin,
            config,
            Stdio::piped(),
            Path::new(""),
            Some(TEST_LOG_FILTER),
            &[],
            |_| {},
        );
        (engine, stderr.expect("piped stderr"))
    }

    /// Starts the engine; `setup` is applied to the command before it starts.
    fn spawn(
        bin: &Path,
        config: &Path,
        stderr: Stdio,
        log: &Path,
        log_filter: Option<&str>,
        env: &[(&str, &str)],
        setup: impl FnOnce(&mut Command),
    ) -> (Self, Option<ChildStderr>) {
        let mut command = Command::new(bin);
        setup(&mut command);
        command.arg("serve").arg("--config").arg(config);
        // `None`: no RUST_LOG at all, whatever this process has, so the engine's default holds.
        match log_filter {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let mut child = command
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix(READY_LINE)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => (
                EngineProcess {
                    child: Some(child),
                    url,
                    log: log.to_path_buf(),
                },
                stderr,
            ),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "jobhook serve did not become ready; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for a graceful exit; returns its status (None if it had
    /// to be killed).
    pub fn terminate(self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        self.wait(timeout)
    }

    /// Sends the signal `name` (`TERM`, `INT`, …) and returns at once.
    pub fn signal(&self, name: &str) {
        // No process (pid 0): `kill` would signal this whole process group.
        if self.child.is_none() {
            return;
        }
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status();
    }

    /// Waits up to `timeout` for the process to end by itself; returns its status (None if it
    /// had to be killed).
    pub fn wait(mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Sends SIGHUP (configuration reload).
    pub fn hangup(&self) {
        let _ = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status();
    }

    /// The engine's log so far, once it has stopped growing (see [`EngineProcess::log_bytes`]).
    pub fn log_text(&self) -> String {
        self.settle_log();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The engine's log so far as bytes, once it has stopped growing for `LOG_QUIET` (at most
    /// `LOG_SETTLE`): `serve` writes its log from a thread of its own, so a line logged just
    /// before may still be on its way to the file — and a test asserting that a line is *not*
    /// there must not pass only because it has not arrived yet.
    pub fn log_bytes(&self) -> Vec<u8> {
        self.settle_log();
        std::fs::read(&self.log).unwrap_or_default()
    }

    fn settle_log(&self) {
        let len = || std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let deadline = std::time::Instant::now() + LOG_SETTLE;
        let mut seen = len();
        loop {
            std::thread::sleep(LOG_QUIET);
            let now = len();
            if now == seen || std::time::Instant::now() >= deadline {
                break;
            }
            seen = now;
        }
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests on loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}
