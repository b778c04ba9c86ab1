//! Reading the operator's files — the configuration, secrets, certificates and CA bundles —
//! the one way they are all read: regular files only, never more than a limit; and making the
//! engine's own directories (the store's data directory, the AOT cache) its user's only.
//!
//! A FIFO with no writer blocks `open` for good, and a device or socket never ends: a path
//! that names one by mistake (or a secret file replaced by a pipe) would hang `check`, the
//! start and every reload after it. The file is opened without blocking and refused unless it
//! is a regular file; its size is not trusted (it may grow, or be a lie): at most one byte past
//! the limit is read.

use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Why a file was not read. The caller says which file and which setting; these say why.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The path names something that is not a regular file.
    #[error("it is {0}, not a regular file; give the path of a file")]
    NotRegular(&'static str),
    /// The file holds more than the limit.
    #[error("it holds more than {0} bytes, the limit")]
    TooLarge(u64),
}

impl From<ReadError> for std::io::Error {
    /// For readers that speak `io::Error`: an I/O failure as it was, a refusal of the file's
    /// kind or size as `InvalidInput` with its words.
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidInput, other.to_string()),
        }
    }
}

/// Makes `dir` and any missing directory above it readable and writable by this user only
/// (`0700`): what the engine keeps there (job contexts, handlers' log lines, compiled code) is
/// no other user's to read or change. A directory that exists is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, PRIVATE_DIR_MODE);
    builder.create(dir)
}

/// The user id the engine runs as (effective): whom its files should belong to.
#[cfg(unix)]
pub fn engine_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Permission bits that let someone other than the owner change a file or a directory's
/// contents (group and others' write).
#[cfg(unix)]
pub const FOREIGN_WRITE_BITS: u32 = 0o022;

/// The sticky bit: in a directory with it, only an entry's owner (or the directory's, or root)
/// may rename or remove the entry, whoever else may write the directory (`/tmp`).
#[cfg(unix)]
pub const STICKY_BIT: u32 = 0o1000;

/// Why someone other than the engine's user and root could rename or replace what directory
/// `dir` holds: `mode 777` (its group or other users may write it, without the sticky bit), or
/// `owned by uid N` (its owner can, whatever its mode); `None` if only they can.
#[cfg(unix)]
pub fn foreign_control(dir: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir)?;
    let mode = meta.mode();
    let owner = meta.uid();
    Ok(
        if mode & FOREIGN_WRITE_BITS != 0 && mode & STICKY_BIT == 0 {
            Some(format!("mode {:03o}", mode & 0o777))
        } else if owner != engine_uid() && owner != 0 {
            Some(format!("owned by uid {owner}"))
        } else {
            None
        },
    )
}

/// How someone other than the engine's user and root could change what the engine reads at
/// `path` (links followed, as it is read): by its mode (group or others' write), by its owner
/// (another user can change their own file, whatever its mode), or by a directory on its way
/// that they control (they can replace the file, or a whole directory renamed and put back
/// with theirs). Empty when only the engine's user and root can; `None` when the file cannot
/// be looked at (reading it says why).
#[cfg(unix)]
pub fn foreign_changes(path: &Path) -> Option<Vec<String>> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode() & 0o777;
    let mut problems = Vec::new();
    if mode & FOREIGN_WRITE_BITS != 0 {
        problems.push(format!(
            "its mode {mode:03o} lets others than its owner change it"
        ));
    }
    let owner = meta.uid();
    if owner != engine_uid() && owner != 0 {
        problems.push(format!(
            "it belongs to uid {owner}, not the engine's user, and its owner can change it"
        ));
    }
    // The directory of the path as written and, through a symbolic link, of the file read, and
    // every directory above them.
    let written = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .and_then(|w| std::fs::canonicalize(w).ok());
    let target = std::fs::canonicalize(path)
        .ok()
        .and_then(|t| t.parent().map(Path::to_path_buf));
    let mut said = Vec::new();
    for dir in [written, target].into_iter().flatten() {
        let Ok(Some((at, why))) = swappable_directory(&dir) else {
            continue;
        };
        if said.contains(&at) {
            continue;
        }
        problems.push(if at == dir {
            format!(
                "its directory {} ({why}) lets others replace it",
                at.display()
            )
        } else {
            format!(
                "the directory {} above it ({why}) lets others replace it",
                at.display()
            )
        });
        said.push(at);
    }
    Some(problems)
}

/// What to tell the operator when a file that decides what the engine does — its
/// configuration, a handler's component, a CA the engine trusts — can be changed by someone
/// other than the engine's user and root ([`foreign_changes`]): they would choose what runs
/// with the credentials the engine holds, or whom it trusts. A warning, not a refusal, as for
/// secret files. `what` names the file's role.
#[cfg(unix)]
pub fn trusted_file_exposure(path: &Path, what: &str) -> Option<String> {
    let problems = foreign_changes(path)?;
    if problems.is_empty() {
        return None;
    }
    Some(format!(
        "{what} {}: {}; whoever can change it decides what the engine does with the \
         credentials it holds: make it the engine's user's (or root's) and `chmod go-w` it, in \
         a directory only they may write",
        crate::escape::escape(&path.display().to_string()),
        problems.join("; ")
    ))
}

/// See the Unix version: other systems' permissions are not modes.
#[cfg(not(unix))]
pub fn trusted_file_exposure(_path: &Path, _what: &str) -> Option<String> {
    None
}

/// The first of directory `dir` (resolved) and the directories above it that someone other
/// than the engine's user and root controls ([`foreign_control`]), with why: through it, what
/// lies below can be swapped for something of theirs.
#[cfg(unix)]
pub fn swappable_directory(dir: &Path) -> std::io::Result<Option<(PathBuf, String)>> {
    let resolved = std::fs::canonicalize(dir)?;
    for at in resolved.ancestors() {
        if let Some(why) = foreign_control(at)? {
            return Ok(Some((at.to_path_buf(), why)));
        }
    }
    Ok(None)
}

/// Whether this process may create and write files in directory `dir` (asked of the system,
/// which knows the user, groups, ACLs and read-only mounts; nothing is written).
#[cfg(unix)]
pub fn writable(dir: &Path) -> std::io::Result<()> {
    allowed(dir, libc::W_OK | libc::X_OK)
}

/// Whether this process may read and write the file `path` (asked of the system, as
/// [`writable`] asks; nothing is read or written).
#[cfg(unix)]
pub fn read_writable(path: &Path) -> std::io::Result<()> {
    allowed(path, libc::R_OK | libc::W_OK)
}

/// Whether the system grants this process `mode` (`R_OK`, `W_OK`, `X_OK`) on `path`.
#[cfg(unix)]
fn allowed(path: &Path, mode: libc::c_int) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path contains a NUL character",
        )
    })?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call; faccessat() only reads
    // it. AT_EACCESS: asked for the effective user and groups, which the engine's file
    // operations use (plain access() asks for the real ones).
    if unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mode, libc::AT_EACCESS) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere only the read-only attribute is known.
#[cfg(not(unix))]
pub fn writable(dir: &Path) -> std::io::Result<()> {
    if std::fs::metadata(dir)?.permissions().readonly() {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "read-only",
        ))
    } else {
        Ok(())
    }
}

/// Elsewhere only the read-only attribute is known.
#[cfg(not(unix))]
pub fn read_writable(path: &Path) -> std::io::Result<()> {
    writable(path)
}

/// The mode [`create_private_dir`] makes directories with: their owner only.
#[cfg(unix)]
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Opens the regular file at `path` for reading (symbolic links followed): a FIFO, a device or
/// a directory is refused at once, never read (a FIFO nobody writes to would hold the reader
/// for ever). What is read from the handle is what was checked, whatever the path names later.
pub fn open_regular(path: &Path) -> Result<std::fs::File, ReadError> {
    let file = open_without_blocking(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(ReadError::NotRegular(describe(&kind)));
    }
    Ok(file)
}

/// Reads the regular file at `path` (symbolic links followed), at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge(max));
    }
    Ok(bytes)
}

#[cfg(unix)]
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
    // It changes nothing for a regular file, the only kind read past this.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// What a file that is not a regular one is, in words: `a named pipe (FIFO)`, `a socket`,
/// `a device`, `a directory`.
pub fn describe(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if kind.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is not a regular file is refused at once, naming what it is; a FIFO nobody writes
    /// to does not hold the caller.
    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        let err = read_regular(&fifo, 1024).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(err.to_string().contains("named pipe (FIFO)"), "{err}");
        for (path, named) in [
            (dir.path().to_path_buf(), "a directory"),
            ("/dev/zero".into(), "a device"),
        ] {
            let err = read_regular(&path, 1024).unwrap_err();
            assert!(err.to_string().contains(named), "{path:?}: {err}");
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(matches!(
            read_regular(&link, 1024),
            Err(ReadError::NotRegular(_))
        ));
    }

    /// A regular file is read whole up to the limit, through a symbolic link too; one byte
    /// more is refused.
    #[test]
    fn regular_files_are_read_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_regular(&file, 10).unwrap(), b"0123456789");
        assert!(matches!(
            read_regular(&file, 9),
            Err(ReadError::TooLarge(9))
        ));
        #[cfg(unix)]
        {
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&file, &link).unwrap();
            assert_eq!(read_regular(&link, 10).unwrap(), b"0123456789");
        }
        let missing = read_regular(&dir.path().join("missing"), 10).unwrap_err();
        assert!(matches!(missing, ReadError::Io(_)), "{missing}");
    }
}
