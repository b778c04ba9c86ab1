//! Simulated power loss for a test's data directory, through `jobhook-powerloss-fs`
//! (`tests/powerloss-fs`).
//!
//! [`PowerLossFs::mount`] starts the filesystem: the mountpoint shows the backing directory, and
//! file data written there reaches the backing directory only when the file is fsync'ed.
//! [`PowerLossFs::cut_power`] stops it the way a power loss would: everything not fsync'ed is
//! gone, the mount is removed, and the test then opens the backing directory directly to see
//! what a restarted machine would find.
//!
//! FUSE needs `/dev/fuse` and Debian's `fuse3` package (`fusermount3`). Without them,
//! [`fuse_or_skip`] fails the test with a message saying so, unless `JOBHOOK_SKIP_FUSE=1`, in
//! which case it prints `SKIPPED: ...` and the test returns.
//!
//! The filesystem's binary is built by cargo in the test's own workspace; a test gets its path
//! from `env!("CARGO_BIN_EXE_jobhook-powerloss-fs")` (in the filesystem's own crate) or from the
//! target directory.
//!
//! This file uses only `std` and `libc`: the filesystem's own tests include it with `#[path]`,
//! so that the helper the engine's tests use is the one those tests exercise.

use std::fs::OpenOptions;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Set to `1` to skip (instead of fail) the tests that need FUSE where it is not available.
pub const SKIP_ENV: &str = "JOBHOOK_SKIP_FUSE";

/// How long [`PowerLossFs::mount`] waits for the filesystem to print `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the power cut waits for the filesystem process to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the power cut looks whether the process has exited.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// The line the filesystem prints once the mount is usable.
const READY: &str = "ready";

/// The FUSE mount helper from Debian's `fuse3` package.
const FUSERMOUNT: &str = "fusermount3";

/// The FUSE device.
const FUSE_DEVICE: &str = "/dev/fuse";

/// `Ok` when FUSE can be used here; otherwise what is missing and how to fix it.
pub fn fuse_available() -> Result<(), String> {
    if !on_path(FUSERMOUNT) {
        return Err(format!(
            "`{FUSERMOUNT}` is not installed: install the `fuse3` package (apt-get install fuse3)"
        ));
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(FUSE_DEVICE) {
        return Err(format!(
            "cannot open {FUSE_DEVICE}: {e}: install the `fuse3` package (apt-get install fuse3), \
             and in a container pass the device in"
        ));
    }
    Ok(())
}

/// Whether a test that needs FUSE can go on: `true` when FUSE is available; `false` after
/// printing `SKIPPED: ...` when it is not and `JOBHOOK_SKIP_FUSE=1`; otherwise panics, saying
/// what to install.
pub fn fuse_or_skip() -> bool {
    match fuse_available() {
        Ok(()) => true,
        Err(reason) if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") => {
            // Straight to the file descriptor: the test harness captures `eprintln!` of passing
            // tests, and a skip must be seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED: FUSE not available: {reason}");
            false
        }
        Err(reason) => panic!("this test needs FUSE: {reason} (or set {SKIP_ENV}=1 to skip it)"),
    }
}

/// A running `jobhook-powerloss-fs`: the mount stays until [`PowerLossFs::cut_power`] (or drop,
/// which cuts the power too).
#[derive(Debug)]
pub struct PowerLossFs {
    /// The filesystem process; `None` once the power is cut.
    child: Option<Child>,
    /// The mountpoint, canonical (resolved before mounting: a dead mount cannot be resolved).
    mountpoint: PathBuf,
}

impl PowerLossFs {
    /// Starts `binary` (`jobhook-powerloss-fs`) to show `backing` at `mountpoint` (an existing,
    /// empty directory) and waits up to [`READY_TIMEOUT`] until the mount is usable. Panics,
    /// saying why, if FUSE is not available or the filesystem does not become ready.
    pub fn mount(binary: &Path, backing: &Path, mountpoint: &Path) -> PowerLossFs {
        if let Err(reason) = fuse_available() {
            panic!("cannot mount {}: {reason}", mountpoint.display());
        }
        let mountpoint = mountpoint
            .canonicalize()
            .unwrap_or_else(|e| panic!("mountpoint {}: {e}", mountpoint.display()));
        let mut child = Command::new(binary)
            .arg(backing)
            .arg(&mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let stdout = child.stdout.take().expect("the child's stdout is piped");
        let (lines_tx, lines) = mpsc::channel();
        // Reads every line, so the filesystem never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut fs = PowerLossFs {
            child: Some(child),
            mountpoint,
        };
        let outcome = match lines.recv_timeout(READY_TIMEOUT) {
            Ok(line) if line == READY => return fs,
            Ok(line) => format!("it printed {line:?} instead of {READY:?}"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                format!("it did not print {READY:?} within {READY_TIMEOUT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                format!("it exited without printing {READY:?} (its stderr is above)")
            }
        };
        let stopped = match fs.cut() {
            Ok(()) => "stopped".to_owned(),
            Err(e) => e,
        };
        panic!(
            "{} did not mount {} at {}: {outcome}; {stopped}",
            binary.display(),
            backing.display(),
            fs.mountpoint.display()
        );
    }

    /// Stops the filesystem's process (SIGSTOP): from now on every operation on the mount waits,
    /// as on a network share that stopped answering, until [`PowerLossFs::thaw`] (a power cut
    /// thaws it first).
    pub fn freeze(&self) -> std::io::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a frozen filesystem run again (SIGCONT).
    pub fn thaw(&self) -> std::io::Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        let Some(child) = &self.child else {
            return Err(std::io::Error::other("the power is cut"));
        };
        let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
        // SAFETY: `kill` only sends a signal; the pid is our own child, not yet reaped.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Where the backing directory is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: SIGTERM to the filesystem, which exits without writing anything not
    /// fsync'ed; waits for it to exit, then makes sure the mount is gone (`fusermount3 -u -z` if
    /// it lingers). Files still open on the mount fail from now on. Panics if the process does
    /// not exit cleanly or the mount cannot be removed.
    pub fn cut_power(mut self) {
        if let Err(e) = self.cut() {
            panic!("power cut at {}: {e}", self.mountpoint.display());
        }
    }

    /// Stops the process and removes the mount; says what went wrong, having done all it can.
    fn cut(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let mut problems = Vec::new();
        match libc::pid_t::try_from(child.id()) {
            // SAFETY: `kill` only sends a signal; the pid is our own child, not yet reaped.
            // A frozen process would leave SIGTERM pending: it runs again first.
            Ok(pid) => unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGTERM);
            },
            Err(_) => problems.push(format!("pid {} out of range", child.id())),
        }
        match wait_at_most(&mut child, EXIT_TIMEOUT) {
            Some(status) if status.success() => {}
            Some(status) => problems.push(format!("the filesystem exited with {status}")),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                problems.push(format!(
                    "the filesystem did not exit within {EXIT_TIMEOUT:?} of SIGTERM (killed)"
                ));
            }
        }
        if is_mounted(&self.mountpoint) {
            let unmount = Command::new(FUSERMOUNT)
                .args(["-u", "-z", "--"])
                .arg(&self.mountpoint)
                .output();
            if is_mounted(&self.mountpoint) {
                problems.push(format!(
                    "still mounted after {FUSERMOUNT} -u -z: {}",
                    match unmount {
                        Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                        Err(e) => e.to_string(),
                    }
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for PowerLossFs {
    /// Cuts the power if the test did not; panics on failure unless already panicking.
    fn drop(&mut self) {
        if let Err(e) = self.cut() {
            let message = format!("power cut at {}: {e}", self.mountpoint.display());
            if std::thread::panicking() {
                let _ = writeln!(std::io::stderr(), "{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

/// Whether something is mounted at `path` (canonical) in this process's mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(table) = std::fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.as_os_str().as_bytes();
    table.split(|&b| b == b'\n').any(|line| {
        // Fields: mount id, parent id, major:minor, root, mount point, ...
        line.split(|&b| b == b' ')
            .nth(4)
            .is_some_and(|field| unescape_octal(field) == wanted)
    })
}

/// Undoes the `\ooo` escapes of `/proc/self/mountinfo` (space, tab, newline, backslash).
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let code = field
            .get(i + 1..i + 4)
            .filter(|digits| field[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match code {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, d| value * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// The child's exit status, or `None` if it is still running after `timeout`.
fn wait_at_most(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(EXIT_POLL),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Whether an executable `name` is on the `PATH`.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|md| md.is_file() && md.permissions().mode() & 0o111 != 0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::unescape_octal;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_octal(br"/tmp/a\040b\134c"), b"/tmp/a b\\c");
        assert_eq!(unescape_octal(br"/tmp/x\04"), br"/tmp/x\04");
    }
}
