//! `jobhook-powerloss-fs BACKING_DIR MOUNTPOINT`: a FUSE filesystem for tests that simulates a
//! power loss.
//!
//! MOUNTPOINT shows BACKING_DIR's files and directories. Writes and truncations of file data are
//! held in memory, not written to BACKING_DIR, until the file is `fsync`ed or `fdatasync`ed;
//! processes using the mount read them back as usual. On fsync the file's held changes are
//! written to the backing file, the backing file is fsync'ed, and only then does the fsync
//! return. A file opened with `O_SYNC` or `O_DSYNC` is synced after every write.
//!
//! SIGTERM or SIGINT is the power cut: the process detaches the mount and exits without writing
//! what it holds, so BACKING_DIR is left with exactly the data that was fsync'ed (plus whatever
//! it had before). Once the mount is usable the process prints `ready` on a line of its own.
//!
//! What is simplified, and why:
//! - Directory changes (create, mknod, mkdir, unlink, rmdir, rename, symlink) and metadata
//!   (mode, owner, times) are applied to BACKING_DIR at once and count as durable. A real
//!   filesystem can also lose a directory entry that was never fsync'ed (its directory was not);
//!   SQLite fsyncs the directory where it needs to, and what the tests look for is lost data
//!   pages, which this models exactly.
//! - Held data is bounded by [`fs::MAX_HELD_BYTES`] for all files together; a write that would
//!   need more fails with `ENOSPC` until something is fsync'ed. Writing it to BACKING_DIR instead
//!   would let unsynced data survive the cut.
//! - Hard links cannot be made through the mount (`EPERM`), and BACKING_DIR must be a single
//!   filesystem (entries on another one are refused with `EXDEV`): inode numbers are the backing
//!   files' own.
//! - POSIX locks are kept by the kernel for the processes using the mount (no lock requests reach
//!   this process), which is enough for SQLite connections on one machine.
//!
//! The kernel's page cache stays on (no direct I/O) because SQLite maps its `-shm` file shared
//! and writable; as there is no writeback cache, every `write` still reaches this process before
//! it returns, and pages written through a shared mapping reach it when the kernel writes them
//! back. After the cut nothing is read through the mount any more: tests open BACKING_DIR itself.

mod fs;
mod held;

use std::ffi::CString;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use fuser::{Config, MountOption};

/// The line printed once the mount is usable.
const READY: &str = "ready";

/// How often the wait for the power cut also checks that the mount is still served.
const SESSION_CHECK: Duration = Duration::from_millis(200);

/// The setuid helper that unmounts for a user other than root (Debian package `fuse3`).
const FUSERMOUNT: &str = "fusermount3";

/// Exit status when the arguments are wrong.
const USAGE_STATUS: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [backing, mountpoint] = args.as_slice() else {
        eprintln!("usage: jobhook-powerloss-fs BACKING_DIR MOUNTPOINT");
        return ExitCode::from(USAGE_STATUS);
    };
    match run(Path::new(backing), Path::new(mountpoint)) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("jobhook-powerloss-fs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Mounts, serves until the power cut, and exits the process; returns only on failure.
fn run(backing: &Path, mountpoint: &Path) -> Result<std::convert::Infallible, String> {
    let backing = backing
        .canonicalize()
        .map_err(|e| format!("backing directory {}: {e}", backing.display()))?;
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| format!("mountpoint {}: {e}", mountpoint.display()))?;
    // Modes arrive from the kernel with the caller's umask already applied; ours must not
    // apply a second one.
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe { libc::umask(0) };
    // Before any thread starts, so that every thread inherits the mask and the signals wait
    // for `sigtimedwait` below instead of killing the process with held data written or not.
    let cut_signals = block_cut_signals().map_err(|e| format!("blocking signals: {e}"))?;

    let filesystem = fs::PowerLossFs::new(&backing)
        .map_err(|e| format!("backing directory {}: {e}", backing.display()))?;
    let state = filesystem.state();
    let device_before = device(&mountpoint)?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("jobhook-powerloss-fs".into()),
        MountOption::DefaultPermissions,
    ];
    let session = fuser::spawn_mount(filesystem, &mountpoint, &config)
        .map_err(|e| format!("mounting at {}: {e}", mountpoint.display()))?;
    // A stat through the mount is answered only once the session serves requests.
    if device(&mountpoint)? == device_before {
        return Err(format!("{} did not become a mount", mountpoint.display()));
    }
    announce_ready().map_err(|e| format!("writing to stdout: {e}"))?;

    loop {
        match wait_signal(&cut_signals, SESSION_CHECK) {
            Some(_signal) => {
                fs::power_off(&state);
                detach(&mountpoint);
                // Exiting closes the FUSE device: the kernel ends the connection, and nothing
                // held is ever written.
                std::process::exit(0);
            }
            None if session.guard.is_finished() => {
                return Err(format!("{} was unmounted", mountpoint.display()));
            }
            None => {}
        }
    }
}

/// The device of `path` (a different one once the filesystem is mounted there).
fn device(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|md| md.dev())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn announce_ready() -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{READY}")?;
    out.flush()
}

/// Blocks SIGTERM and SIGINT for the calling thread (and the threads it starts) and returns
/// the set to wait for them with.
fn block_cut_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: all-zero is a valid `sigset_t` to initialise with `sigemptyset`; the calls only
    // write to `set` and the thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => Ok(set),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Waits up to `timeout` for one of the signals in `set`.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let timeout = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(i32::try_from(timeout.subsec_nanos()).unwrap_or(0)),
    };
    // SAFETY: `set` and `timeout` are valid for the call; no siginfo is asked for.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (signal > 0).then_some(signal)
}

/// Detaches the mount from the directory tree. Processes still using it get errors once this
/// process has exited; a lazy unmount does not wait for them (a powered-off disk would not).
fn detach(mountpoint: &Path) {
    if let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    // Not root: the setuid helper may unmount what we mounted. If even that fails, the mount
    // lingers (its connection ends with this process) and the test's clean-up removes it.
    if let Err(e) = Command::new(FUSERMOUNT)
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .status()
    {
        eprintln!("jobhook-powerloss-fs: running {FUSERMOUNT}: {e}");
    }
}
