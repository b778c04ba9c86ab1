//! The FUSE filesystem: a passthrough of the backing directory whose file data changes are held
//! in memory ([`HeldData`]) until the file is fsync'ed.
//!
//! Inode numbers are the backing files' own, except that the backing directory itself is FUSE's
//! root inode 1; a backing inode numbered 1 (if any) takes the backing directory's number in
//! exchange. So `stat`, `readdir` and the kernel agree on numbers without a table of our own,
//! and the mapping is its own inverse. The backing directory must be one filesystem: entries on
//! another device are refused with `EXDEV`, as their numbers could collide.
//!
//! The kernel refers to files by inode number; [`Node`] remembers the backing path of each
//! number the kernel holds (looked up and not yet forgotten), of each open file, and of each
//! file with held data — the last so that data held for a file nobody has open is still there
//! when it is opened again. Paths follow renames made through the mount.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use crate::held::{HeldData, PAGE_SIZE};

/// Bound on the memory held writes may take, all files together. A write that would need more
/// is refused with `ENOSPC` (the test's "disk" is full until something is fsync'ed): flushing
/// to the backing file instead would make the data survive the cut, which is the one thing
/// this filesystem must not do.
pub const MAX_HELD_BYTES: usize = 256 * 1024 * 1024;

/// [`MAX_HELD_BYTES`] in held pages.
const MAX_HELD_PAGES: usize = MAX_HELD_BYTES / PAGE_SIZE;

/// How long the kernel may cache names and attributes. Every change goes through this mount,
/// so the kernel's cache cannot go stale; the value only bounds how long it trusts it.
const TTL: Duration = Duration::from_secs(1);

/// FUSE's root inode number.
const ROOT: u64 = INodeNo::ROOT.0;

/// Generation numbers: inode numbers are the backing filesystem's, which does not reuse one
/// while the kernel can still refer to it through an open file of ours.
const GENERATION: Generation = Generation(0);

/// What the mount knows about one inode.
#[derive(Debug)]
struct Node {
    /// The backing path it was last seen at (meaningless once `unlinked`).
    path: PathBuf,
    /// Lookups the kernel has not yet forgotten.
    lookups: u64,
    /// Open file handles on it.
    open_files: usize,
    /// Removed from the backing directory through the mount: reachable only through open files.
    unlinked: bool,
    /// Data changes not yet fsync'ed.
    held: Option<HeldData>,
}

/// An open file: the backing file, opened when the kernel opened ours.
#[derive(Debug)]
struct OpenFile {
    ino: u64,
    file: File,
    writable: bool,
}

/// One entry of a directory listing, read when the directory is opened.
#[derive(Debug)]
struct DirItem {
    ino: u64,
    kind: FileType,
    name: OsString,
}

/// Everything the filesystem keeps, behind one lock: requests are served one at a time.
#[derive(Debug)]
pub struct State {
    /// The backing directory's device and inode number.
    root_dev: u64,
    root_ino: u64,
    nodes: HashMap<u64, Node>,
    files: HashMap<u64, OpenFile>,
    dirs: HashMap<u64, Vec<DirItem>>,
    next_handle: u64,
    /// Pages held by all files together (bounded by [`MAX_HELD_PAGES`]).
    held_pages: usize,
    /// Set by the power cut: from then on every request fails and the backing directory is not
    /// touched again.
    powered_off: bool,
}

/// The filesystem handed to `fuser`; the state is shared with `main`, which cuts the power.
#[derive(Debug)]
pub struct PowerLossFs {
    state: Arc<Mutex<State>>,
}

impl PowerLossFs {
    /// A view of `backing` (an absolute, canonical directory path).
    pub fn new(backing: &Path) -> io::Result<Self> {
        let md = fs::metadata(backing)?;
        if !md.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", backing.display()),
            ));
        }
        let root = Node {
            path: backing.to_path_buf(),
            lookups: 0,
            open_files: 0,
            unlinked: false,
            held: None,
        };
        let state = State {
            root_dev: md.dev(),
            root_ino: md.ino(),
            nodes: HashMap::from([(ROOT, root)]),
            files: HashMap::new(),
            dirs: HashMap::new(),
            next_handle: 1,
            held_pages: 0,
            powered_off: false,
        };
        Ok(PowerLossFs {
            state: Arc::new(Mutex::new(state)),
        })
    }

    /// The state, for [`power_off`].
    pub fn state(&self) -> Arc<Mutex<State>> {
        Arc::clone(&self.state)
    }

    /// Runs `op` on the state (see [`Self::with_state`]) and answers `reply` with its result.
    fn reply_empty(&self, reply: ReplyEmpty, op: impl FnOnce(&mut State) -> Result<(), Errno>) {
        match self.with_state(op) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Runs `op` on the state unless the power is off.
    fn with_state<T>(&self, op: impl FnOnce(&mut State) -> Result<T, Errno>) -> Result<T, Errno> {
        let mut state = lock(&self.state);
        if state.powered_off {
            return Err(Errno::EIO);
        }
        op(&mut state)
    }
}

/// The power cut: once this returns, no request changes the backing directory any more, and
/// held data is never applied. An fsync being served when the cut comes completes first (a real
/// disk also finishes or does not start a flush; it never half-applies our state).
pub fn power_off(state: &Mutex<State>) {
    lock(state).powered_off = true;
}

/// Locks the state. A panic while it was held cannot leave it half-changed in a way that
/// matters more than the panic itself, so a poisoned lock is used as it is.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    /// Updates the count of held pages after one file's went from `before` to `after`.
    fn account(&mut self, before: usize, after: usize) {
        self.held_pages = self.held_pages.saturating_sub(before).saturating_add(after);
    }

    /// The FUSE inode number of a backing file.
    fn fuse_ino(&self, md: &Metadata) -> Result<u64, Errno> {
        if md.dev() != self.root_dev {
            return Err(Errno::EXDEV);
        }
        Ok(self.swap_root(md.ino()))
    }

    /// Exchanges the backing directory's inode number and 1 (see the module documentation).
    fn swap_root(&self, ino: u64) -> u64 {
        if ino == self.root_ino {
            ROOT
        } else if ino == ROOT {
            self.root_ino
        } else {
            ino
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The backing path of inode `ino`, which must still be linked.
    fn path(&self, ino: u64) -> Result<&Path, Errno> {
        let node = self.node(ino)?;
        if node.unlinked {
            return Err(Errno::ENOENT);
        }
        Ok(&node.path)
    }

    /// The backing path of `name` in directory `parent`.
    fn child_path(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    /// An open backing file of `ino`: handle `fh` if given, else any.
    fn open_file(&self, ino: u64, fh: Option<FileHandle>) -> Option<&OpenFile> {
        fh.and_then(|fh| self.files.get(&fh.0))
            .or_else(|| self.files.values().find(|f| f.ino == ino))
    }

    /// The backing file's metadata, through an open file when there is one (it may be unlinked).
    fn backing_metadata(&self, ino: u64, fh: Option<FileHandle>) -> Result<Metadata, Errno> {
        match self.open_file(ino, fh) {
            Some(open) => Ok(open.file.metadata()?),
            None => Ok(fs::symlink_metadata(self.path(ino)?)?),
        }
    }

    /// Records that the kernel now knows `ino` at `path` (one more lookup).
    fn remember(&mut self, ino: u64, path: PathBuf) {
        let node = self.nodes.entry(ino).or_insert_with(|| Node {
            path: PathBuf::new(),
            lookups: 0,
            open_files: 0,
            unlinked: false,
            held: None,
        });
        node.path = path;
        node.unlinked = false;
        node.lookups += 1;
    }

    /// Drops what is no longer needed about `ino`: the held data of a removed file nobody has
    /// open, and the node once the kernel has forgotten it, it is not open and holds no data.
    fn settle(&mut self, ino: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        let dropped = match node.held.take_if(|_| node.unlinked && node.open_files == 0) {
            Some(held) => held.page_count(),
            None => 0,
        };
        let unused = ino != ROOT && node.lookups == 0 && node.open_files == 0;
        if unused && node.held.is_none() {
            self.nodes.remove(&ino);
        }
        self.account(dropped, 0);
    }

    /// The attributes the mount shows for `ino`: the backing file's, with the size and
    /// modification time of its held data.
    fn attr(&self, ino: u64, md: &Metadata) -> FileAttr {
        let held = self.nodes.get(&ino).and_then(|node| node.held.as_ref());
        let mtime = held.map_or_else(|| time(md.mtime(), md.mtime_nsec()), HeldData::modified);
        let ctime = time(md.ctime(), md.ctime_nsec()).max(mtime);
        FileAttr {
            ino: INodeNo(ino),
            size: held.map_or(md.len(), HeldData::size),
            blocks: held.map_or(md.blocks(), |held| {
                md.blocks().max(held.size().div_ceil(STAT_BLOCK))
            }),
            atime: time(md.atime(), md.atime_nsec()),
            mtime,
            ctime,
            crtime: UNIX_EPOCH,
            kind: FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile),
            perm: (md.mode() & PERMISSION_BITS) as u16,
            nlink: u32::try_from(md.nlink()).unwrap_or(u32::MAX),
            uid: md.uid(),
            gid: md.gid(),
            rdev: u32::try_from(md.rdev()).unwrap_or(0),
            blksize: u32::try_from(md.blksize()).unwrap_or(PAGE_SIZE as u32),
            flags: 0,
        }
    }

    /// Looks up `path` (just created, or named by the kernel) and counts the lookup.
    fn entry(&mut self, path: PathBuf) -> Result<FileAttr, Errno> {
        let md = fs::symlink_metadata(&path)?;
        let ino = self.fuse_ino(&md)?;
        self.remember(ino, path);
        Ok(self.attr(ino, &md))
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let path = self.child_path(parent, name)?;
        self.entry(path)
    }

    fn forget(&mut self, ino: u64, count: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(count);
        }
        self.settle(ino);
    }

    fn getattr(&self, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let md = self.backing_metadata(ino, fh)?;
        Ok(self.attr(ino, &md))
    }

    /// Mode, owner and times are metadata and change the backing file at once; the size is file
    /// data and is held until fsync.
    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let target = match self.open_file(ino, fh) {
            Some(open) => Target::Fd(open.file.as_raw_fd()),
            None => Target::Path(c_path(self.path(ino)?)?),
        };
        if let Some(mode) = mode {
            target.chmod(mode & PERMISSION_BITS)?;
        }
        if uid.is_some() || gid.is_some() {
            target.chown(uid, gid)?;
        }
        if atime.is_some() || mtime.is_some() {
            target.set_times(atime, mtime)?;
        }
        if let Some(size) = size {
            check_range(size, 0)?;
            let backing_len = self.backing_metadata(ino, fh)?.len();
            let node = self.node_mut(ino)?;
            let held = node.held.get_or_insert_with(|| HeldData::new(backing_len));
            let before = held.page_count();
            held.truncate(size);
            let after = held.page_count();
            self.account(before, after);
        }
        if let Some(mtime) = mtime
            && let Some(held) = self.node_mut(ino)?.held.as_mut()
        {
            held.set_modified(match mtime {
                TimeOrNow::SpecificTime(time) => time,
                TimeOrNow::Now => SystemTime::now(),
            });
        }
        self.getattr(ino, fh)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        Ok(fs::read_link(self.path(ino)?)?.into_os_string().into_vec())
    }

    fn mknod(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<FileAttr, Errno> {
        let path = self.child_path(parent, name)?;
        let c = c_path(&path)?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        check(unsafe { libc::mknod(c.as_ptr(), mode, libc::dev_t::from(rdev)) })?;
        self.entry(path)
    }

    fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> Result<FileAttr, Errno> {
        let path = self.child_path(parent, name)?;
        fs::DirBuilder::new().mode(mode).create(&path)?;
        self.entry(path)
    }

    fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path) -> Result<FileAttr, Errno> {
        let path = self.child_path(parent, name)?;
        std::os::unix::fs::symlink(target, &path)?;
        self.entry(path)
    }

    /// Marks the inode at `path` (looked at before it was removed or replaced) as removed, unless
    /// another hard link keeps it in the directory tree.
    fn removed(&mut self, before: Option<Metadata>) {
        let Some(md) = before else {
            return;
        };
        let Ok(ino) = self.fuse_ino(&md) else {
            return;
        };
        if let Some(node) = self.nodes.get_mut(&ino)
            && (md.is_dir() || md.nlink() <= 1)
        {
            node.unlinked = true;
        }
        self.settle(ino);
    }

    fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let path = self.child_path(parent, name)?;
        let before = fs::symlink_metadata(&path)?;
        fs::remove_file(&path)?;
        self.removed(Some(before));
        Ok(())
    }

    fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let path = self.child_path(parent, name)?;
        let before = fs::symlink_metadata(&path)?;
        fs::remove_dir(&path)?;
        self.removed(Some(before));
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let from = self.child_path(parent, name)?;
        let to = self.child_path(new_parent, new_name)?;
        let replaced = fs::symlink_metadata(&to).ok();
        if flags.is_empty() {
            fs::rename(&from, &to)?;
        } else {
            let (c_from, c_to) = (c_path(&from)?, c_path(&to)?);
            // SAFETY: both paths are valid NUL-terminated strings for the duration of the call.
            check(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    c_from.as_ptr(),
                    libc::AT_FDCWD,
                    c_to.as_ptr(),
                    flags.bits(),
                )
            })?;
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        if !exchange {
            self.removed(replaced);
        }
        for node in self.nodes.values_mut() {
            if node.unlinked {
                continue;
            }
            if let Some(moved) = rebase(&node.path, &from, &to) {
                node.path = moved;
            } else if exchange && let Some(moved) = rebase(&node.path, &to, &from) {
                node.path = moved;
            }
        }
        Ok(())
    }

    /// Opens the backing file for a new handle. Writable handles are opened for reading too
    /// when possible: a held write of part of a page reads the rest of it from the backing file.
    fn open(&mut self, ino: u64, flags: OpenFlags) -> Result<FileHandle, Errno> {
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let node = self.node(ino)?;
        let file = if node.unlinked {
            let open = self.open_file(ino, None).ok_or(Errno::ENOENT)?;
            reopen(&open.file, writable)?
        } else {
            open_backing(&node.path, writable, None)?
        };
        if flags.0 & libc::O_TRUNC != 0 {
            self.hold_truncation(ino, &file)?;
        }
        Ok(self.add_open_file(ino, file, writable))
    }

    fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(FileAttr, FileHandle), Errno> {
        let path = self.child_path(parent, name)?;
        let writable = OpenFlags(flags).acc_mode() != OpenAccMode::O_RDONLY;
        let exclusive = flags & libc::O_EXCL != 0;
        let file = open_backing(&path, writable, Some((mode, exclusive)))?;
        let md = file.metadata()?;
        let ino = self.fuse_ino(&md)?;
        self.remember(ino, path);
        if flags & libc::O_TRUNC != 0 {
            self.hold_truncation(ino, &file)?;
        }
        let fh = self.add_open_file(ino, file, writable);
        Ok((self.attr(ino, &md), fh))
    }

    /// `O_TRUNC`: truncation to zero, held like any other.
    fn hold_truncation(&mut self, ino: u64, file: &File) -> Result<(), Errno> {
        let backing_len = file.metadata()?.len();
        let node = self.node_mut(ino)?;
        let held = node.held.get_or_insert_with(|| HeldData::new(backing_len));
        let before = held.page_count();
        held.truncate(0);
        self.account(before, 0);
        Ok(())
    }

    fn add_open_file(&mut self, ino: u64, file: File, writable: bool) -> FileHandle {
        let fh = self.next_handle;
        self.next_handle += 1;
        self.files.insert(
            fh,
            OpenFile {
                ino,
                file,
                writable,
            },
        );
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open_files += 1;
        }
        FileHandle(fh)
    }

    fn read(&self, ino: u64, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let file = &self.files.get(&fh.0).ok_or(Errno::EBADF)?.file;
        let len = size as usize;
        check_range(offset, len)?;
        match self.node(ino)?.held.as_ref() {
            Some(held) => Ok(held.read(file, offset, len)?),
            None => {
                let mut data = vec![0; len];
                let n = crate::held::Backing::read_at_most(file, &mut data, offset)?;
                data.truncate(n);
                Ok(data)
            }
        }
    }

    fn write(
        &mut self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: OpenFlags,
    ) -> Result<u32, Errno> {
        let written = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        check_range(offset, data.len())?;
        let file = &self.files.get(&fh.0).ok_or(Errno::EBADF)?.file;
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let new_pages = HeldData::new_pages_for_write(node.held.as_ref(), offset, data.len());
        if self.held_pages + new_pages > MAX_HELD_PAGES {
            return Err(Errno::ENOSPC);
        }
        let held = match node.held.as_mut() {
            Some(held) => held,
            None => node.held.insert(HeldData::new(file.metadata()?.len())),
        };
        let before = held.page_count();
        let result = held.write(file, offset, data);
        let after = held.page_count();
        self.account(before, after);
        result?;
        // A file opened O_SYNC or O_DSYNC: each write is durable when it returns.
        if flags.0 & libc::O_DSYNC != 0 {
            self.fsync(ino, fh, flags.0 & libc::O_SYNC != libc::O_SYNC)?;
        }
        Ok(written)
    }

    fn release(&mut self, fh: FileHandle) {
        if let Some(open) = self.files.remove(&fh.0) {
            if let Some(node) = self.nodes.get_mut(&open.ino) {
                node.open_files = node.open_files.saturating_sub(1);
            }
            self.settle(open.ino);
        }
    }

    /// Applies the held data of `ino` to the backing file, then syncs that file. Only after the
    /// sync succeeds is the held data dropped: if anything fails, the mount still shows it and a
    /// later fsync tries again.
    fn fsync(&mut self, ino: u64, fh: FileHandle, datasync: bool) -> Result<(), Errno> {
        let node = self.node(ino)?;
        let synced = match node.held.as_ref() {
            Some(held) => {
                let writer = self.writer(ino, fh)?;
                held.apply(&writer)?;
                writer
            }
            None => self
                .open_file(ino, Some(fh))
                .ok_or(Errno::EBADF)?
                .file
                .try_clone()?,
        };
        if datasync {
            synced.sync_data()?;
        } else {
            synced.sync_all()?;
        }
        if let Some(held) = self.node_mut(ino)?.held.take() {
            self.account(held.page_count(), 0);
        }
        self.settle(ino);
        Ok(())
    }

    /// A backing file of `ino` open for writing: handle `fh` if it was opened for writing,
    /// else another writable handle, else a handle reopened for writing.
    fn writer(&self, ino: u64, fh: FileHandle) -> Result<File, Errno> {
        let writable = self
            .files
            .get(&fh.0)
            .filter(|open| open.writable)
            .or_else(|| self.files.values().find(|f| f.ino == ino && f.writable));
        if let Some(open) = writable {
            return Ok(open.file.try_clone()?);
        }
        match self.open_file(ino, Some(fh)) {
            Some(open) => Ok(reopen(&open.file, true)?),
            None => Ok(open_backing(self.path(ino)?, true, None)?),
        }
    }

    fn opendir(&mut self, ino: u64) -> Result<FileHandle, Errno> {
        let path = self.path(ino)?.to_path_buf();
        let parent_ino = match path.parent() {
            Some(parent) if ino != ROOT => self.fuse_ino(&fs::symlink_metadata(parent)?)?,
            _ => ROOT,
        };
        let mut items = vec![
            DirItem {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirItem {
                ino: parent_ino,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            let kind = entry
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            items.push(DirItem {
                ino: self.swap_root(entry.ino()),
                kind,
                name: entry.file_name(),
            });
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.dirs.insert(fh, items);
        Ok(FileHandle(fh))
    }

    /// Fills `reply` from entry number `offset` on (the offset of an entry is its number + 1).
    fn readdir(
        &self,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<(), Errno> {
        let items = self.dirs.get(&fh.0).ok_or(Errno::EBADF)?;
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, item) in items.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(item.ino), index as u64 + 1, item.kind, &item.name) {
                break;
            }
        }
        Ok(())
    }

    fn statfs(&self) -> Result<libc::statvfs, Errno> {
        let c = c_path(self.path(ROOT)?)?;
        // SAFETY: all-zero is a valid `statvfs` (plain integers), filled in by the call.
        let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid path and `out` a valid, writable `statvfs`.
        check(unsafe { libc::statvfs(c.as_ptr(), &mut out) })?;
        Ok(out)
    }

    fn access(&self, ino: u64, mask: AccessFlags) -> Result<(), Errno> {
        let node = self.node(ino)?;
        if node.unlinked {
            return Ok(());
        }
        let c = c_path(&node.path)?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        check(unsafe { libc::access(c.as_ptr(), mask.bits()) })?;
        Ok(())
    }
}

/// The largest file size Linux allows (`MAX_LFS_FILESIZE`); the kernel keeps requests within it,
/// and [`check_range`] makes sure, so offset arithmetic cannot overflow.
const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// Refuses a range of `len` bytes at `offset` that would end past [`MAX_FILE_SIZE`].
fn check_range(offset: u64, len: usize) -> Result<(), Errno> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= MAX_FILE_SIZE => Ok(()),
        _ => Err(Errno::EFBIG),
    }
}

/// Size of the blocks `st_blocks` counts.
const STAT_BLOCK: u64 = 512;

/// The permission bits of a mode (with set-id and sticky bits).
const PERMISSION_BITS: u32 = 0o7777;

/// `path` with its prefix `from` replaced by `to`, if it starts with `from`.
fn rebase(path: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    let rest = path.strip_prefix(from).ok()?;
    Some(if rest.as_os_str().is_empty() {
        to.to_path_buf()
    } else {
        to.join(rest)
    })
}

/// Opens a backing file; `create` is `Some((mode, exclusive))` to create it. A writable open
/// asks for read access too and falls back to write-only when that is refused.
fn open_backing(path: &Path, writable: bool, create: Option<(u32, bool)>) -> io::Result<File> {
    let open = |read: bool| {
        let mut options = OpenOptions::new();
        options.read(read).write(writable);
        if let Some((mode, exclusive)) = create {
            options.mode(mode);
            if exclusive {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        options.custom_flags(libc::O_NOFOLLOW).open(path)
    };
    match open(true) {
        Err(e) if writable && e.kind() == io::ErrorKind::PermissionDenied => open(false),
        other => other,
    }
}

/// Opens again the file behind `file` (which may have been unlinked), through `/proc/self/fd`.
fn reopen(file: &File, writable: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// A backing file to change the metadata of: through an open file, or by path.
enum Target {
    Fd(std::os::fd::RawFd),
    Path(CString),
}

impl Target {
    fn chmod(&self, mode: u32) -> io::Result<()> {
        // SAFETY: the descriptor is open, the path a valid NUL-terminated string.
        check(unsafe {
            match self {
                Target::Fd(fd) => libc::fchmod(*fd, mode),
                Target::Path(c) => libc::chmod(c.as_ptr(), mode),
            }
        })
    }

    fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        // `-1` (all bits set) leaves the owner or group as it is.
        let uid = uid.unwrap_or(u32::MAX);
        let gid = gid.unwrap_or(u32::MAX);
        // SAFETY: as in `chmod`.
        check(unsafe {
            match self {
                Target::Fd(fd) => libc::fchown(*fd, uid, gid),
                Target::Path(c) => libc::lchown(c.as_ptr(), uid, gid),
            }
        })
    }

    fn set_times(&self, atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>) -> io::Result<()> {
        let times = [timespec(atime), timespec(mtime)];
        // SAFETY: as in `chmod`; `times` is an array of two `timespec`s.
        check(unsafe {
            match self {
                Target::Fd(fd) => libc::futimens(*fd, times.as_ptr()),
                Target::Path(c) => libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                ),
            }
        })
    }
}

/// A time for `utimensat`: given, now, or left as it is.
fn timespec(time: Option<TimeOrNow>) -> libc::timespec {
    let (tv_sec, tv_nsec) = match time {
        None => (0, libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => (0, libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(time)) => match time.duration_since(UNIX_EPOCH) {
            Ok(after) => (
                libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                libc::c_long::from(nanos(after)),
            ),
            Err(_) => (0, 0),
        },
    };
    libc::timespec { tv_sec, tv_nsec }
}

/// The nanoseconds of `time` past its second, in the type every `c_long` can hold.
fn nanos(time: Duration) -> i32 {
    i32::try_from(time.subsec_nanos()).unwrap_or(0)
}

/// A time from `stat`'s seconds and nanoseconds (the epoch if it cannot be represented).
fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(nsecs).unwrap_or(0));
    let whole = match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH.checked_add(Duration::from_secs(secs)),
        Err(_) => UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())),
    };
    whole
        .and_then(|whole| whole.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}

/// A path as a C string (backing paths never contain NUL; refuse one that would).
fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// A libc return value as a result.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Saturating conversion of `statvfs` counters (whose C types vary by platform) to `u64`.
fn count<T: TryInto<u64>>(value: T) -> u64 {
    value.try_into().unwrap_or(u64::MAX)
}

/// Saturating conversion of `statvfs` sizes to `u32`.
fn size32<T: TryInto<u32>>(value: T) -> u32 {
    value.try_into().unwrap_or(u32::MAX)
}

impl Filesystem for PowerLossFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> io::Result<()> {
        // Nothing to negotiate: the defaults are what this filesystem needs. No writeback cache
        // (every write reaches us, so the page cache never holds data we do not), no
        // FUSE_POSIX_LOCKS (the kernel keeps POSIX locks locally, which is all SQLite needs in
        // one process).
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.with_state(|s| s.lookup(parent.0, name)) {
            Ok(attr) => reply.entry(&TTL, &attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // After the power cut nothing matters any more; before it, this only frees memory.
        let _ = self.with_state(|s| {
            s.forget(ino.0, nlookup);
            Ok(())
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with_state(|s| s.getattr(ino.0, fh)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.with_state(|s| s.setattr(ino.0, mode, uid, gid, size, atime, mtime, fh)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with_state(|s| s.readlink(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.with_state(|s| s.mknod(parent.0, name, mode, rdev)) {
            Ok(attr) => reply.entry(&TTL, &attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.with_state(|s| s.mkdir(parent.0, name, mode)) {
            Ok(attr) => reply.entry(&TTL, &attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.reply_empty(reply, |s| s.unlink(parent.0, name))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.reply_empty(reply, |s| s.rmdir(parent.0, name))
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.with_state(|s| s.symlink(parent.0, link_name, target)) {
            Ok(attr) => reply.entry(&TTL, &attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.reply_empty(reply, |s| {
            s.rename(parent.0, name, newparent.0, newname, flags)
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // No FOPEN_KEEP_CACHE: the kernel drops its cached pages of the file on open and reads
        // them from us again. No FOPEN_DIRECT_IO: SQLite maps its `-shm` file shared and
        // writable, which needs the page cache.
        match self.with_state(|s| s.open(ino.0, flags)) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with_state(|s| s.read(ino.0, fh, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with_state(|s| s.write(ino.0, fh, offset, data, flags)) {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is no sync point: held data stays held.
        self.reply_empty(reply, |_| Ok(()))
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.reply_empty(reply, |s| {
            s.release(fh);
            Ok(())
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.reply_empty(reply, |s| s.fsync(ino.0, fh, datasync))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with_state(|s| s.opendir(ino.0)) {
            Ok(fh) => reply.opened(fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.with_state(|s| s.readdir(fh, offset, &mut reply)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.reply_empty(reply, |s| {
            s.dirs.remove(&fh.0);
            Ok(())
        })
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes were applied to the backing directory when made and count as
        // durable (see the crate documentation), so there is nothing to do.
        self.reply_empty(reply, |_| Ok(()))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.with_state(|s| s.statfs()) {
            Ok(st) => reply.statfs(
                count(st.f_blocks),
                count(st.f_bfree),
                count(st.f_bavail),
                count(st.f_files),
                count(st.f_ffree),
                size32(st.f_bsize),
                size32(st.f_namemax),
                size32(st.f_frsize),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.reply_empty(reply, |s| s.access(ino.0, mask))
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with_state(|s| s.create(parent.0, name, mode, flags)) {
            Ok((attr, fh)) => reply.created(&TTL, &attr, GENERATION, fh, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}
