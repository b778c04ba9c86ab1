//! The AOT cache: handler components compiled ahead of time and kept on disk, so that a restart
//! (or a reload that keeps most handlers) does not compile every component again.
//!
//! Compiled code is executed without further validation, so the cache is built to be trusted
//! only as far as jobhook itself:
//!
//! - **Who writes it.** Only jobhook writes the cache, into a directory it creates with mode
//!   `0700`. [`AotCache::open`] refuses a directory that is a symlink, that another user owns
//!   or that its group or other users may write, and one below a directory through which
//!   another user could swap it for their own (one they own, or one they may write without
//!   the sticky bit); the engine then runs without a cache. The check is made again before
//!   every load, and the cache is used by its resolved path, so a symbolic link on the way
//!   that changes later is not followed again.
//! - **What an entry is for.** An entry is keyed by the SHA-256 of the component's bytes *and*
//!   a SHA-256 digest of the engine's [`precompile_compatibility_hash`] (wasmtime version, target,
//!   every code-generation setting). Entries of another engine configuration live in another
//!   subdirectory and are never looked at.
//! - **Whether an entry is intact.** Beside every artifact (`<key>.cwasm`) lies a seal
//!   (`<key>.seal`) naming the component digest, the engine digest and the artifact's length and
//!   SHA-256. An artifact is handed to [`Component::deserialize_file`] only after its seal
//!   matches the key and its bytes match the seal. A missing, truncated, corrupt or foreign entry
//!   is ignored and replaced by a fresh compilation — never trusted, never an error.
//! - **How it is written.** Artifact and seal each go to a temporary file in the same directory
//!   that is synced and then renamed over the final name (the seal last), so a reader sees either
//!   a whole entry or none, and a file that a running engine has memory-mapped is never modified.
//!
//! Deleting the cache directory is always safe; it is rebuilt on the next start. Entries of older
//! engine versions are not pruned automatically (each is the size of a compiled component).
//!
//! [`precompile_compatibility_hash`]: wasmtime::Engine::precompile_compatibility_hash

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

/// Version of the on-disk layout; part of every entry's directory name, so a future layout never
/// reads this one's files.
const LAYOUT: &str = "v1";

/// First line of a seal.
const SEAL_MAGIC: &str = "jobhook-aot 1";

/// Largest seal read. A seal is four short lines (about 250 bytes); anything bigger is not one.
const MAX_SEAL_BYTES: u64 = 1024;

/// Hex digits of the engine digest used in the directory name: 128 bits keep directory names
/// short while making an accidental collision between engine configurations impossible in
/// practice (the full digest is still checked in every seal).
const ENGINE_DIR_HEX: usize = 32;

#[cfg(unix)]
use crate::files::FOREIGN_WRITE_BITS;

/// Why a cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AotError {
    /// The directory could not be created or inspected.
    #[error("AOT cache {path}: {message}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The directory could be changed by someone other than jobhook's user.
    #[error(
        "AOT cache {path} is not private to this user ({why}); compiled code from it would be \
         trusted, so it is not used. Fix: `chown` it to the engine's user and `chmod 700` it, or \
         point [engine] cache_dir at a private directory"
    )]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// What [`AotCache::load_or_compile`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A valid entry was loaded; nothing was compiled.
    Hit,
    /// There was no entry: the component was compiled and (if the write worked) stored.
    Miss,
    /// An entry existed but was not used (the reason says why); the component was compiled and
    /// the entry replaced.
    Rejected(String),
}

/// An AOT cache directory for one engine configuration.
#[derive(Debug, Clone)]
pub struct AotCache {
    /// The cache's root as resolved when it was opened (no symbolic link in it).
    root: PathBuf,
    /// `<root>/<LAYOUT>-<engine digest prefix>`: entries of this engine configuration only.
    dir: PathBuf,
    /// Hex SHA-256 of the engine's compatibility hash.
    engine_digest: String,
}

impl AotCache {
    /// Opens (creating if needed, mode `0700`) the cache under `root` for `engine`, and checks
    /// that only this user can change it (see [`check_trusted`]).
    pub fn open(root: &Path, engine: &wasmtime::Engine) -> Result<Self, AotError> {
        let engine_digest = engine_digest(engine);
        let prefix = engine_digest
            .get(..ENGINE_DIR_HEX)
            .unwrap_or(&engine_digest);
        let entries = format!("{LAYOUT}-{prefix}");
        crate::files::create_private_dir(&root.join(&entries)).map_err(|e| AotError::Io {
            path: root.join(&entries),
            message: format!("cannot create the directory: {e}"),
        })?;
        let root = check_trusted(root)?;
        let dir = root.join(entries);
        check_private(&dir)?;
        Ok(AotCache {
            root,
            dir,
            engine_digest,
        })
    }

    /// The directory holding this engine configuration's entries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The compiled form of `wasm`: loaded from the cache when a valid entry exists, otherwise
    /// compiled (validating `wasm`) and stored. Blocking: call it off the async runtime.
    ///
    /// Fails only when `wasm` does not compile; every cache problem (unreadable, corrupt or
    /// foreign entry, a failed write) is logged and handled by compiling.
    pub fn load_or_compile(
        &self,
        engine: &wasmtime::Engine,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        // Trusted when opened; a directory on the way may have been opened to others since.
        if let Err(e) = check_trusted(&self.root).and_then(|_| check_private(&self.dir)) {
            tracing::warn!("compiling without the AOT cache: {e}");
            let compiled = engine.precompile_component(wasm)?;
            return Ok((
                deserialize_own(engine, &compiled)?,
                CacheOutcome::Rejected(e.to_string()),
            ));
        }
        let key = hex(&Sha256::digest(wasm));
        let (artifact, seal) = self.paths(&key);
        let outcome = match self.verified(&key, &artifact, &seal) {
            Ok(()) => {
                // SAFETY: `deserialize_file` trusts the file to be a compiled artifact of a
                // compatible engine. This one sits in a directory only this user can write
                // (checked in `open`), was written there by `store` below from
                // `Engine::precompile_component` output, and its bytes were just checked against
                // the seal, which names this component and this engine configuration. Wasmtime
                // additionally refuses artifacts of other versions and settings with an error.
                match unsafe { Component::deserialize_file(engine, &artifact) } {
                    Ok(component) => return Ok((component, CacheOutcome::Hit)),
                    Err(e) => CacheOutcome::Rejected(format!("wasmtime refused it: {e:#}")),
                }
            }
            Err(Check::Absent) => CacheOutcome::Miss,
            Err(Check::Invalid(why)) => CacheOutcome::Rejected(why),
        };
        if let CacheOutcome::Rejected(why) = &outcome {
            tracing::warn!(
                entry = %artifact.display(),
                "ignoring an AOT cache entry and compiling again: {why}"
            );
        }
        let compiled = engine.precompile_component(wasm)?;
        let component = match self.store(&key, &compiled, &artifact, &seal) {
            // SAFETY: the file was written just now from `compiled`, which this engine produced.
            Ok(()) => match unsafe { Component::deserialize_file(engine, &artifact) } {
                Ok(component) => component,
                // The file changed under us (another process replaced the entry): use the bytes
                // in memory instead.
                Err(_) => deserialize_own(engine, &compiled)?,
            },
            Err(e) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    "cannot write to the AOT cache, continuing without storing: {e}"
                );
                deserialize_own(engine, &compiled)?
            }
        };
        Ok((component, outcome))
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{key}.cwasm")),
            self.dir.join(format!("{key}.seal")),
        )
    }

    /// Checks the entry for `key`: the seal names this component and engine, and the artifact's
    /// length and SHA-256 are the seal's.
    fn verified(&self, key: &str, artifact: &Path, seal: &Path) -> Result<(), Check> {
        let seal_text = match read_capped(seal, MAX_SEAL_BYTES) {
            Ok(Some(text)) => text,
            Ok(None) => return Err(Check::Invalid("the seal is too large".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match std::fs::symlink_metadata(artifact) {
                    Ok(_) => Err(Check::Invalid("the artifact has no seal".into())),
                    Err(_) => Err(Check::Absent),
                };
            }
            Err(e) => return Err(Check::Invalid(format!("cannot read the seal: {e}"))),
        };
        let seal = Seal::parse(&seal_text)
            .ok_or_else(|| Check::Invalid("the seal is not in the expected format".into()))?;
        if seal.content != key {
            return Err(Check::Invalid("the seal is for another component".into()));
        }
        if seal.engine != self.engine_digest {
            return Err(Check::Invalid(
                "the seal is for another engine configuration".into(),
            ));
        }
        let meta = std::fs::symlink_metadata(artifact)
            .map_err(|e| Check::Invalid(format!("cannot read the artifact: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(Check::Invalid("the artifact is not a regular file".into()));
        }
        if meta.len() != seal.length {
            return Err(Check::Invalid(format!(
                "the artifact is {} bytes, its seal says {}",
                meta.len(),
                seal.length
            )));
        }
        let digest = sha256_file(artifact, seal.length)
            .map_err(|e| Check::Invalid(format!("cannot read the artifact: {e}")))?
            .ok_or_else(|| Check::Invalid("the artifact is longer than its seal says".into()))?;
        if digest != seal.artifact {
            return Err(Check::Invalid(
                "the artifact's checksum does not match its seal (corrupt or replaced)".into(),
            ));
        }
        Ok(())
    }

    /// Writes artifact, then seal, each atomically.
    fn store(
        &self,
        key: &str,
        compiled: &[u8],
        artifact: &Path,
        seal: &Path,
    ) -> std::io::Result<()> {
        write_atomically(&self.dir, artifact, compiled)?;
        let seal_text = Seal {
            content: key.to_owned(),
            engine: self.engine_digest.clone(),
            artifact: hex(&Sha256::digest(compiled)),
            length: compiled.len() as u64,
        }
        .render();
        write_atomically(&self.dir, seal, seal_text.as_bytes())?;
        // Make the renames durable; failing to is harmless (the entry is just recompiled).
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Loads bytes this process compiled a moment ago.
fn deserialize_own(engine: &wasmtime::Engine, compiled: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `compiled` is the output of `engine.precompile_component` in this process, never
    // read back from anywhere.
    unsafe { Component::deserialize(engine, compiled) }
}

/// Why an entry is not used.
enum Check {
    /// There is no entry.
    Absent,
    /// There is one, but it must not be used.
    Invalid(String),
}

/// The contents of a `.seal` file.
#[derive(Debug, PartialEq, Eq)]
struct Seal {
    /// Hex SHA-256 of the component.
    content: String,
    /// Hex SHA-256 of the engine's compatibility hash.
    engine: String,
    /// Hex SHA-256 of the artifact.
    artifact: String,
    /// Length of the artifact in bytes.
    length: u64,
}

impl Seal {
    fn render(&self) -> String {
        format!(
            "{SEAL_MAGIC}\ncontent {}\nengine {}\nartifact {} {}\n",
            self.content, self.engine, self.artifact, self.length
        )
    }

    fn parse(text: &str) -> Option<Seal> {
        let mut lines = text.lines();
        if lines.next()? != SEAL_MAGIC {
            return None;
        }
        let content = lines.next()?.strip_prefix("content ")?;
        let engine = lines.next()?.strip_prefix("engine ")?;
        let (artifact, length) = lines.next()?.strip_prefix("artifact ")?.split_once(' ')?;
        if lines.next().is_some() || ![content, engine, artifact].into_iter().all(is_sha256_hex) {
            return None;
        }
        Some(Seal {
            content: content.to_owned(),
            engine: engine.to_owned(),
            artifact: artifact.to_owned(),
            length: length.parse().ok()?,
        })
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Hex SHA-256 of the engine's compatibility hash.
///
/// `precompile_compatibility_hash` only implements [`Hash`]; it is fed to SHA-256 through
/// [`Sha256Hasher`] rather than a std hasher, whose output is not specified to be stable.
pub fn engine_digest(engine: &wasmtime::Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex(&hasher.0.finalize())
}

/// A [`Hasher`] that feeds everything written to it into SHA-256. Its `finish` is unused (and
/// returns the first 8 bytes of the digest so far); the full digest is read from the inner
/// state.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Reads a small regular file whole ([`crate::files::read_regular`]: a FIFO or device put in
/// the cache is refused, never waited on); `Ok(None)` when it is larger than `max`.
fn read_capped(path: &Path, max: u64) -> std::io::Result<Option<String>> {
    match crate::files::read_regular(path, max) {
        Ok(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text")
        }),
        Err(crate::files::ReadError::TooLarge(_)) => Ok(None),
        Err(other) => Err(other.into()),
    }
}

/// Bytes read at a time while hashing a component: large enough that a 32 MiB component takes
/// 128 reads, small enough to allocate afresh for every hash.
const HASH_READ_BYTES: usize = 256 * 1024;

/// The SHA-256 of the regular file at `path`, read through one handle that was checked to be a
/// regular file ([`crate::files::open_regular`]), and at most `max` bytes of it (`None` past
/// that: a file that grew, or a device swapped in after the length was looked at).
fn sha256_file(path: &Path, max: u64) -> std::io::Result<Option<String>> {
    let file = crate::files::open_regular(path)?;
    let mut file = file.take(max.saturating_add(1));
    let mut read: u64 = 0;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; HASH_READ_BYTES];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        read = read.saturating_add(n as u64);
        if read > max {
            return Ok(None);
        }
        hasher.update(buffer.get(..n).unwrap_or_default());
    }
    Ok(Some(hex(&hasher.finalize())))
}

/// Writes `bytes` to a new temporary file in `dir`, syncs it and renames it to `path`.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Checks that only this user can change what the cache directory `root` holds: `root` itself
/// (see [`check_private`]) and every directory above its resolved path, none of which may
/// let another user rename what it holds — one they own, or one its group or other users may
/// write without the sticky bit (a group may have other members, as the cache directory's own
/// check assumes too). Root-owned directories are trusted (`/`, `/var`,
/// `/tmp` with its sticky bit). `check` asks it too, to warn of a cache `serve` would run
/// without. Returns the resolved path, which the cache then uses.
pub(crate) fn check_trusted(root: &Path) -> Result<PathBuf, AotError> {
    check_private(root)?;
    let resolved = std::fs::canonicalize(root).map_err(|e| AotError::Io {
        path: root.to_path_buf(),
        message: e.to_string(),
    })?;
    #[cfg(unix)]
    if let Some(above) = resolved.parent() {
        let swappable = crate::files::swappable_directory(above).map_err(|e| AotError::Io {
            path: above.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some((at, why)) = swappable {
            return Err(AotError::NotPrivate {
                path: root.to_path_buf(),
                why: format!(
                    "the directory above it, {}, could let another user swap it ({why})",
                    at.display()
                ),
            });
        }
    }
    Ok(resolved)
}

/// Refuses a directory that is a symlink, or that someone other than this user owns or may
/// write: compiled code from it would be trusted. `check` asks it too, to warn of a cache
/// `serve` would run without.
pub(crate) fn check_private(dir: &Path) -> Result<(), AotError> {
    let not_private = |why: String| AotError::NotPrivate {
        path: dir.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(|e| AotError::Io {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    if !meta.file_type().is_dir() {
        return Err(not_private(
            "it is not a directory (or it is a symlink)".into(),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o777;
        if mode & FOREIGN_WRITE_BITS != 0 {
            return Err(not_private(format!(
                "its mode {mode:03o} lets other users write it"
            )));
        }
        let me = crate::files::engine_uid();
        if meta.uid() != me {
            return Err(not_private(format!(
                "it is owned by uid {}, the engine runs as uid {me}",
                meta.uid()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny component of the handler world's shape is not needed here: any valid component
    /// exercises the cache.
    const COMPONENT: &str = r#"(component
        (core module $m (func (export "f") (result i32) (i32.const 42)))
        (core instance $i (instantiate $m))
        (func (export "f") (result u32) (canon lift (core func $i "f"))))"#;

    fn engine() -> crate::Engine {
        crate::Engine::new(2).unwrap()
    }

    fn call_f(engine: &wasmtime::Engine, component: &Component) -> u32 {
        let linker = wasmtime::component::Linker::<()>::new(engine);
        let mut store = wasmtime::Store::new(engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = linker.instantiate(&mut store, component).unwrap();
        let f = instance
            .get_typed_func::<(), (u32,)>(&mut store, "f")
            .unwrap();
        f.call(&mut store, ()).unwrap().0
    }

    fn setup() -> (tempfile::TempDir, crate::Engine, AotCache, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = AotCache::open(&dir.path().join("cache"), engine.wasmtime()).unwrap();
        let wasm = wat::parse_str(COMPONENT).unwrap();
        (dir, engine, cache, wasm)
    }

    #[test]
    fn second_load_is_a_hit_and_runs() {
        let (_dir, engine, cache, wasm) = setup();
        let e = engine.wasmtime();
        let (c1, first) = cache.load_or_compile(e, &wasm).unwrap();
        assert_eq!(first, CacheOutcome::Miss);
        assert_eq!(call_f(e, &c1), 42);
        let (c2, second) = cache.load_or_compile(e, &wasm).unwrap();
        assert_eq!(second, CacheOutcome::Hit);
        assert_eq!(call_f(e, &c2), 42);
    }

    #[test]
    fn corrupt_artifact_is_ignored_and_recompiled() {
        let (_dir, engine, cache, wasm) = setup();
        let e = engine.wasmtime();
        cache.load_or_compile(e, &wasm).unwrap();
        let key = hex(&Sha256::digest(&wasm));
        let (artifact, _) = cache.paths(&key);
        // Flip one byte in the middle of the code: same length, different bytes.
        let mut bytes = std::fs::read(&artifact).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&artifact, &bytes).unwrap();

        let (component, outcome) = cache.load_or_compile(e, &wasm).unwrap();
        assert!(
            matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("checksum")),
            "{outcome:?}"
        );
        assert_eq!(call_f(e, &component), 42);
        // The entry was replaced by a good one.
        assert_eq!(
            cache.load_or_compile(e, &wasm).unwrap().1,
            CacheOutcome::Hit
        );
    }

    #[test]
    fn truncated_artifact_and_missing_seal_are_ignored() {
        let (_dir, engine, cache, wasm) = setup();
        let e = engine.wasmtime();
        cache.load_or_compile(e, &wasm).unwrap();
        let key = hex(&Sha256::digest(&wasm));
        let (artifact, seal) = cache.paths(&key);

        let bytes = std::fs::read(&artifact).unwrap();
        std::fs::write(&artifact, &bytes[..bytes.len() / 3]).unwrap();
        let (component, outcome) = cache.load_or_compile(e, &wasm).unwrap();
        assert!(matches!(outcome, CacheOutcome::Rejected(_)), "{outcome:?}");
        assert_eq!(call_f(e, &component), 42);

        std::fs::remove_file(&seal).unwrap();
        let (component, outcome) = cache.load_or_compile(e, &wasm).unwrap();
        assert!(
            matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("no seal")),
            "{outcome:?}"
        );
        assert_eq!(call_f(e, &component), 42);
    }

    /// A named pipe in place of a seal (anyone who can write the cache directory can make one)
    /// is refused at once and the entry replaced: reading it would wait for a writer for ever,
    /// holding a blocking thread per load.
    #[cfg(unix)]
    #[test]
    fn a_fifo_in_place_of_a_seal_is_refused_not_waited_on() {
        let (_dir, engine, cache, wasm) = setup();
        let key = hex(&Sha256::digest(&wasm));
        let (_, seal) = cache.paths(&key);
        cache.load_or_compile(engine.wasmtime(), &wasm).unwrap();
        std::fs::remove_file(&seal).unwrap();
        let c = std::ffi::CString::new(seal.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let e = engine.wasmtime().clone();
        std::thread::spawn(move || {
            let _ = tx.send(cache.load_or_compile(&e, &wasm).map(|(_, outcome)| outcome));
        });
        let outcome = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the load waited on the FIFO")
            .unwrap();
        assert!(
            matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("named pipe")),
            "{outcome:?}"
        );
        assert!(std::fs::symlink_metadata(&seal).unwrap().is_file());
    }

    /// A foreign file dressed up as a valid entry — garbage with a seal that matches it — gets
    /// past the checksum but not wasmtime's own checks; it is replaced, never run.
    #[test]
    fn foreign_artifact_with_a_matching_seal_is_refused_by_wasmtime_and_replaced() {
        let (_dir, engine, cache, wasm) = setup();
        let e = engine.wasmtime();
        let key = hex(&Sha256::digest(&wasm));
        let (artifact, seal) = cache.paths(&key);
        let garbage = b"\x7fELF this is not a wasmtime artifact".repeat(100);
        std::fs::write(&artifact, &garbage).unwrap();
        let forged = Seal {
            content: key.clone(),
            engine: cache.engine_digest.clone(),
            artifact: hex(&Sha256::digest(&garbage)),
            length: garbage.len() as u64,
        };
        std::fs::write(&seal, forged.render()).unwrap();

        let (component, outcome) = cache.load_or_compile(e, &wasm).unwrap();
        assert!(
            matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("wasmtime refused")),
            "{outcome:?}"
        );
        assert_eq!(call_f(e, &component), 42);
        assert_eq!(
            cache.load_or_compile(e, &wasm).unwrap().1,
            CacheOutcome::Hit
        );
    }

    #[test]
    fn entries_for_another_component_or_engine_are_not_used() {
        let (_dir, engine, cache, wasm) = setup();
        let e = engine.wasmtime();
        cache.load_or_compile(e, &wasm).unwrap();
        let key = hex(&Sha256::digest(&wasm));
        let (_, seal) = cache.paths(&key);
        let text = std::fs::read_to_string(&seal).unwrap();

        let other_engine = text.replace(&cache.engine_digest, &"0".repeat(64));
        std::fs::write(&seal, other_engine).unwrap();
        let (_, outcome) = cache.load_or_compile(e, &wasm).unwrap();
        assert!(
            matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("another engine")),
            "{outcome:?}"
        );

        let other_component = std::fs::read_to_string(&seal)
            .unwrap()
            .replace(&key, &"1".repeat(64));
        std::fs::write(&seal, other_component).unwrap();
        let (_, outcome) = cache.load_or_compile(e, &wasm).unwrap();
        assert!(
            matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("another component")),
            "{outcome:?}"
        );
    }

    #[test]
    fn invalid_components_still_fail() {
        let (_dir, engine, cache, _) = setup();
        assert!(
            cache
                .load_or_compile(engine.wasmtime(), b"\0asm\x0d\0\x01\0garbage")
                .is_err()
        );
    }

    #[test]
    fn seals_round_trip_and_reject_junk() {
        let seal = Seal {
            content: "a".repeat(64),
            engine: "b".repeat(64),
            artifact: "c".repeat(64),
            length: 1234,
        };
        assert_eq!(Seal::parse(&seal.render()), Some(seal));
        assert_eq!(Seal::parse(""), None);
        assert_eq!(Seal::parse("jobhook-aot 1\ncontent x\n"), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let engine = engine();
        let err = AotCache::open(&root, engine.wasmtime()).unwrap_err();
        assert!(matches!(err, AotError::NotPrivate { .. }), "{err}");
    }

    /// A cache in a private directory below one its group or others may write (without the
    /// sticky bit) could be renamed away and replaced by a forged one: refused, naming the
    /// directory above. A sticky one (`/tmp`) is trusted.
    #[cfg(unix)]
    #[test]
    fn a_cache_below_a_directory_others_could_swap_it_through_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let root = shared.join("cache");
        let engine = engine();
        for (mode, refused) in [
            (0o777, true),
            (0o757, true),
            (0o1777, false),
            (0o775, true),
            (0o755, false),
        ] {
            std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).unwrap();
            let opened = AotCache::open(&root, engine.wasmtime());
            assert_eq!(opened.is_err(), refused, "mode {mode:o}: {opened:?}");
            if let Err(e) = opened {
                assert!(matches!(e, AotError::NotPrivate { .. }), "{e}");
                let text = e.to_string();
                assert!(
                    text.contains(&format!("{}", shared.display())) && text.contains("swap"),
                    "{text}"
                );
            }
        }
    }

    /// A directory above a cache that was private when it was opened and is opened to others
    /// later: components are compiled, never read from or written to the cache.
    #[cfg(unix)]
    #[test]
    fn a_cache_opened_to_others_later_is_no_longer_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let engine = engine();
        let cache = AotCache::open(&shared.join("cache"), engine.wasmtime()).unwrap();
        let wasm = wat::parse_str(COMPONENT).unwrap();
        let (_, first) = cache.load_or_compile(engine.wasmtime(), &wasm).unwrap();
        assert_eq!(first, CacheOutcome::Miss);
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (component, outcome) = cache.load_or_compile(engine.wasmtime(), &wasm).unwrap();
        assert!(
            matches!(&outcome, CacheOutcome::Rejected(why) if why.contains("swap")),
            "{outcome:?}"
        );
        assert_eq!(call_f(engine.wasmtime(), &component), 42);
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (_, again) = cache.load_or_compile(engine.wasmtime(), &wasm).unwrap();
        assert_eq!(again, CacheOutcome::Hit);
    }

    #[test]
    fn the_engine_digest_is_stable_and_sha256_shaped() {
        let a = engine_digest(engine().wasmtime());
        let b = engine_digest(engine().wasmtime());
        assert_eq!(a, b);
        assert!(is_sha256_hex(&a));
    }
}
