//! The data of one file as the mount shows it: the backing file's bytes with the writes and
//! truncations not yet fsync'ed laid over them.
//!
//! Held writes are kept as whole pages ([`PAGE_SIZE`] bytes). A write into a page that is not
//! held yet first copies that page from the backing file, so a page is always complete and a
//! read never has to merge partial writes. Truncations are remembered as the length of the
//! backing file that is still valid (`base_len`): bytes of the backing file at or past it read
//! as zeros, as they would after a real truncation, until the held state is applied.
//!
//! Invariants, kept by every method:
//! - `base_len <= size` (the backing prefix still valid never reaches past the end of file);
//! - bytes of a held page at or past `size` are zero, so growing the file shows zeros there;
//! - no page lies wholly at or past `size`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::SystemTime;

/// The unit in which writes are held, the usual page size (and SQLite's default page size).
pub const PAGE_SIZE: usize = 4096;

/// [`PAGE_SIZE`] as a file offset.
const PAGE: u64 = PAGE_SIZE as u64;

/// Where the bytes not held come from: the backing file.
pub trait Backing {
    /// Reads into `buf` from `offset` until `buf` is full or end of file; returns how many bytes
    /// were read.
    fn read_at_most(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl Backing for File {
    fn read_at_most(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// The writes and truncations of one file since its last fsync.
#[derive(Debug)]
pub struct HeldData {
    /// Length of the backing file's prefix that is still part of the file.
    base_len: u64,
    /// The file's length as the mount shows it.
    size: u64,
    /// Held pages by page index (offset / [`PAGE_SIZE`]), each [`PAGE_SIZE`] bytes.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// When the held data last changed: the mount shows it as the file's modification time.
    modified: SystemTime,
}

impl HeldData {
    /// Nothing held yet over a backing file of `backing_len` bytes.
    pub fn new(backing_len: u64) -> Self {
        HeldData {
            base_len: backing_len,
            size: backing_len,
            pages: BTreeMap::new(),
            modified: SystemTime::now(),
        }
    }

    /// The file's length as the mount shows it.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// When the held data last changed.
    pub fn modified(&self) -> SystemTime {
        self.modified
    }

    /// Sets the modification time the mount shows (an explicit `touch` of a file with held data).
    pub fn set_modified(&mut self, time: SystemTime) {
        self.modified = time;
    }

    /// How many pages are held (the memory this file costs, in pages).
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// How many pages a write of `len` bytes at `offset` would add to `held` (all of them
    /// when nothing is held for the file yet).
    pub fn new_pages_for_write(held: Option<&HeldData>, offset: u64, len: usize) -> usize {
        let Some((first, last)) = page_span(offset, len) else {
            return 0;
        };
        (first..=last)
            .filter(|index| held.is_none_or(|held| !held.pages.contains_key(index)))
            .count()
    }

    /// Up to `len` bytes at `offset`, as the mount shows them (fewer at end of file).
    pub fn read(&self, backing: &impl Backing, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let len = clamp_len(len, self.size - offset);
        let mut out = vec![0; len];
        self.read_backing(backing, &mut out, offset)?;
        if let Some((first, last)) = page_span(offset, len) {
            for (&index, page) in self.pages.range(first..=last) {
                copy_overlap(&mut out, offset, page, index * PAGE);
            }
        }
        Ok(out)
    }

    /// Holds a write of `data` at `offset`. The caller has checked the memory bound with
    /// [`HeldData::new_pages_for_write`].
    pub fn write(&mut self, backing: &impl Backing, offset: u64, data: &[u8]) -> io::Result<()> {
        let Some((first, last)) = page_span(offset, data.len()) else {
            return Ok(());
        };
        for index in first..=last {
            if !self.pages.contains_key(&index) {
                let mut page = vec![0; PAGE_SIZE].into_boxed_slice();
                self.read_backing(backing, &mut page, index * PAGE)?;
                self.pages.insert(index, page);
            }
            if let Some(page) = self.pages.get_mut(&index) {
                copy_overlap(page, index * PAGE, data, offset);
            }
        }
        self.size = self.size.max(offset.saturating_add(data.len() as u64));
        self.modified = SystemTime::now();
        Ok(())
    }

    /// Holds a truncation (or extension) to `new_size` bytes.
    pub fn truncate(&mut self, new_size: u64) {
        if new_size < self.size {
            self.base_len = self.base_len.min(new_size);
            // Pages from the first one wholly past the new end go; the page holding the new end
            // keeps its bytes before it and zeros after.
            self.pages.split_off(&new_size.div_ceil(PAGE));
            let within = (new_size % PAGE) as usize;
            if within != 0
                && let Some(page) = self.pages.get_mut(&(new_size / PAGE))
            {
                page[within..].fill(0);
            }
        }
        self.size = new_size;
        self.modified = SystemTime::now();
    }

    /// Writes the held state to the backing file (`file`, open for writing), without syncing
    /// it: afterwards the backing file has exactly the content the mount shows.
    pub fn apply(&self, file: &File) -> io::Result<()> {
        if self.base_len < file.metadata()?.len() {
            file.set_len(self.base_len)?;
        }
        for (&index, page) in &self.pages {
            let start = index * PAGE;
            let len = clamp_len(PAGE_SIZE, self.size.saturating_sub(start));
            file.write_all_at(&page[..len], start)?;
        }
        if file.metadata()?.len() != self.size {
            file.set_len(self.size)?;
        }
        Ok(())
    }

    /// Fills `buf` with the backing file's bytes at `offset` that are still part of the file,
    /// zeros elsewhere.
    fn read_backing(&self, backing: &impl Backing, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        if offset < self.base_len {
            let valid = clamp_len(buf.len(), self.base_len - offset);
            backing.read_at_most(&mut buf[..valid], offset)?;
        }
        Ok(())
    }
}

/// The first and last page index a range of `len` bytes at `offset` touches, `None` if empty.
fn page_span(offset: u64, len: usize) -> Option<(u64, u64)> {
    let last_byte = offset.checked_add((len as u64).checked_sub(1)?)?;
    Some((offset / PAGE, last_byte / PAGE))
}

/// `len`, but no more than `limit`.
fn clamp_len(len: usize, limit: u64) -> usize {
    usize::try_from(limit).map_or(len, |limit| len.min(limit))
}

/// Copies the bytes where `src` (starting at file offset `src_at`) overlaps `dst` (starting at
/// file offset `dst_at`).
fn copy_overlap(dst: &mut [u8], dst_at: u64, src: &[u8], src_at: u64) {
    let start = dst_at.max(src_at);
    let end = (dst_at + dst.len() as u64).min(src_at + src.len() as u64);
    if start >= end {
        return;
    }
    let len = (end - start) as usize;
    let d = (start - dst_at) as usize;
    let s = (start - src_at) as usize;
    dst[d..d + len].copy_from_slice(&src[s..s + len]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory backing file.
    struct Bytes(Vec<u8>);

    impl Backing for Bytes {
        fn read_at_most(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let start = clamp_len(self.0.len(), offset);
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
    }

    fn all(held: &HeldData, backing: &Bytes) -> Vec<u8> {
        held.read(backing, 0, usize::MAX).expect("in-memory read")
    }

    #[test]
    fn unaligned_writes_keep_the_backing_bytes_around_them() {
        let backing = Bytes((0..10_000u32).map(|i| (i % 251) as u8).collect());
        let mut held = HeldData::new(10_000);
        held.write(&backing, 4000, &[7; 200]).expect("write");
        let mut expected = backing.0.clone();
        expected[4000..4200].fill(7);
        assert_eq!(all(&held, &backing), expected);
        assert_eq!(held.page_count(), 2);
        assert_eq!(
            held.read(&backing, 4090, 20).expect("read"),
            expected[4090..4110]
        );
    }

    #[test]
    fn writing_past_the_end_grows_the_file_with_zeros_between() {
        let backing = Bytes(vec![1; 100]);
        let mut held = HeldData::new(100);
        held.write(&backing, 9000, b"end").expect("write");
        assert_eq!(held.size(), 9003);
        let shown = all(&held, &backing);
        assert_eq!(&shown[..100], &[1; 100][..]);
        assert!(shown[100..9000].iter().all(|&b| b == 0));
        assert_eq!(&shown[9000..], b"end");
    }

    #[test]
    fn truncate_then_grow_shows_zeros_not_the_old_bytes() {
        let backing = Bytes(vec![9; 10_000]);
        let mut held = HeldData::new(10_000);
        held.write(&backing, 0, &[5; 10]).expect("write");
        held.truncate(5);
        held.truncate(8000);
        let shown = all(&held, &backing);
        assert_eq!(shown.len(), 8000);
        assert_eq!(&shown[..5], &[5; 5]);
        assert!(
            shown[5..].iter().all(|&b| b == 0),
            "old bytes showed through"
        );
        // A write into a page not held after the truncation reads zeros from the backing too.
        held.write(&backing, 6000, b"x").expect("write");
        let shown = all(&held, &backing);
        assert!(shown[5..6000].iter().all(|&b| b == 0));
        assert_eq!(shown[6000], b'x');
    }

    #[test]
    fn counting_new_pages() {
        let backing = Bytes(Vec::new());
        assert_eq!(HeldData::new_pages_for_write(None, 4095, 2), 2);
        assert_eq!(HeldData::new_pages_for_write(None, 0, 0), 0);
        let mut held = HeldData::new(0);
        held.write(&backing, 0, &[1; 10]).expect("write");
        assert_eq!(
            HeldData::new_pages_for_write(Some(&held), 0, PAGE_SIZE + 1),
            1
        );
    }

    #[test]
    fn apply_makes_the_backing_file_what_the_mount_shows() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![3; 20_000]).expect("backing file");
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let mut held = HeldData::new(20_000);
        held.truncate(7000);
        held.write(&file, 6999, &[4; 3000]).expect("write");
        held.truncate(9000);
        let shown = held.read(&file, 0, usize::MAX).expect("read");
        held.apply(&file).expect("apply");
        assert_eq!(std::fs::read(&path).expect("read back"), shown);
    }
}
