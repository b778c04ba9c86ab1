//! The filesystem keeps what was fsync'ed and loses the rest when the power is cut: plain files,
//! and SQLite in WAL mode with two connections. Each test would pass through a plain passthrough
//! only if it did not check the loss, so each checks it.

// The testkit's helper, compiled into this test rather than depended on: it uses only std and
// libc, and the testkit crate brings the engine's HTTP stand-ins with it.
#[path = "../../support/src/powerloss.rs"]
mod powerloss;

use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use powerloss::{PowerLossFs, fuse_or_skip};
use rusqlite::Connection;
use tempfile::TempDir;

/// The filesystem under test, built by cargo with these tests.
const BINARY: &str = env!("CARGO_BIN_EXE_jobhook-powerloss-fs");

/// Rows the SQLite tests commit, one transaction each.
const ROWS: i64 = 300;

/// Rows committed durably before the SQLite test that loses data turns syncing off.
const DURABLE_ROWS: i64 = 20;

/// A backing directory and an empty mountpoint, removed when dropped.
struct Dirs {
    _root: TempDir,
    backing: PathBuf,
    mountpoint: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().expect("temporary directory");
    let backing = root.path().join("backing");
    let mountpoint = root.path().join("mnt");
    fs::create_dir(&backing).expect("backing directory");
    fs::create_dir(&mountpoint).expect("mountpoint");
    Dirs {
        _root: root,
        backing,
        mountpoint,
    }
}

fn mount(dirs: &Dirs) -> PowerLossFs {
    PowerLossFs::mount(Path::new(BINARY), &dirs.backing, &dirs.mountpoint)
}

fn read(path: &Path) -> String {
    let mut data = String::new();
    File::open(path)
        .and_then(|mut file| file.read_to_string(&mut data))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    data
}

#[test]
fn fsynced_data_survives_the_cut_and_the_rest_is_lost() {
    if !fuse_or_skip() {
        return;
    }
    let dirs = dirs();
    fs::write(dirs.backing.join("b"), "B as it was").expect("backing file b");
    fs::write(dirs.backing.join("c"), "C as it was").expect("backing file c");
    let mounted = mount(&dirs);
    let mnt = mounted.mountpoint().to_path_buf();

    let mut a = File::create(mnt.join("a")).expect("create a");
    a.write_all(b"A, fsync'ed").expect("write a");
    a.sync_all().expect("fsync a");
    drop(a);
    let mut b = File::create(mnt.join("b")).expect("open b");
    b.write_all(b"B, never fsync'ed").expect("write b");
    drop(b);
    File::options()
        .write(true)
        .open(mnt.join("c"))
        .and_then(|c| c.set_len(1))
        .expect("truncate c");

    // The mount shows every change, across closing and reopening the files...
    assert_eq!(read(&mnt.join("a")), "A, fsync'ed");
    assert_eq!(read(&mnt.join("b")), "B, never fsync'ed");
    assert_eq!(read(&mnt.join("c")), "C");
    assert_eq!(fs::metadata(mnt.join("b")).expect("stat b").len(), 17);
    // ...while the backing directory has only what was fsync'ed.
    assert_eq!(read(&dirs.backing.join("a")), "A, fsync'ed");
    assert_eq!(read(&dirs.backing.join("b")), "B as it was");

    mounted.cut_power();
    assert_eq!(read(&dirs.backing.join("a")), "A, fsync'ed");
    assert_eq!(
        read(&dirs.backing.join("b")),
        "B as it was",
        "B's unsynced write survived the power cut"
    );
    assert_eq!(
        read(&dirs.backing.join("c")),
        "C as it was",
        "C's unsynced truncation survived the power cut"
    );
}

#[test]
fn directory_changes_apply_at_once() {
    if !fuse_or_skip() {
        return;
    }
    let dirs = dirs();
    fs::write(dirs.backing.join("gone"), b"to be removed").expect("backing file");
    let mounted = mount(&dirs);
    let mnt = mounted.mountpoint().to_path_buf();

    fs::create_dir(mnt.join("d")).expect("mkdir");
    let mut x = File::create(mnt.join("d/x")).expect("create d/x");
    x.write_all(b"x, fsync'ed").expect("write d/x");
    x.sync_all().expect("fsync d/x");
    // Held data follows its file through a rename of the directory it is in.
    let mut y = File::create(mnt.join("d/y")).expect("create d/y");
    y.write_all(b"y, held").expect("write d/y");
    drop((x, y));
    fs::rename(mnt.join("d"), mnt.join("e")).expect("rename d to e");
    fs::remove_file(mnt.join("gone")).expect("unlink");
    assert_eq!(read(&mnt.join("e/x")), "x, fsync'ed");
    assert_eq!(read(&mnt.join("e/y")), "y, held");
    let mut names: Vec<_> = fs::read_dir(mnt.join("e"))
        .expect("readdir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["x", "y"]);

    mounted.cut_power();
    assert!(
        !dirs.backing.join("gone").exists(),
        "the unlink was not applied"
    );
    assert!(
        !dirs.backing.join("d").exists(),
        "the rename was not applied"
    );
    assert_eq!(read(&dirs.backing.join("e/x")), "x, fsync'ed");
    assert_eq!(
        read(&dirs.backing.join("e/y")),
        "",
        "y's unsynced write survived"
    );
}

/// A frozen filesystem holds every operation on it until it is thawed (what a network share
/// that stopped answering does), and a power cut ends a frozen one too.
#[test]
fn a_frozen_filesystem_holds_operations_until_thawed() {
    if !fuse_or_skip() {
        return;
    }
    let dirs = dirs();
    let mounted = mount(&dirs);
    let file = mounted.mountpoint().join("f");
    mounted.freeze().expect("freeze");
    let (done_tx, done) = std::sync::mpsc::channel();
    let writer = {
        let file = file.clone();
        std::thread::spawn(move || {
            let written = fs::write(&file, b"after the thaw");
            let _ = done_tx.send(());
            written
        })
    };
    assert!(
        done.recv_timeout(std::time::Duration::from_millis(500))
            .is_err(),
        "a write finished on a frozen filesystem"
    );
    mounted.thaw().expect("thaw");
    done.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the write finishes once thawed");
    writer.join().expect("writer").expect("write");
    assert_eq!(read(&file), "after the thaw");
    mounted.freeze().expect("freeze again");
    mounted.cut_power();
}

/// The payload of row `id`: a few hundred bytes, different for every row.
fn payload(id: i64) -> Vec<u8> {
    format!("row {id} ").repeat(40).into_bytes()
}

/// A connection to `path` in WAL mode with `synchronous` as given.
fn connect(path: &Path, synchronous: &str) -> Connection {
    let conn = Connection::open(path).expect("open the database on the mount");
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .expect("WAL mode");
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "synchronous", synchronous)
        .expect("synchronous");
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .expect("busy timeout");
    conn
}

fn count(conn: &Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .expect("count rows")
}

/// Inserts rows `ids`, one transaction each, alternating between the two connections.
fn insert(ids: std::ops::Range<i64>, first: &Connection, second: &Connection) {
    for id in ids {
        let conn = if id % 2 == 0 { first } else { second };
        conn.execute(
            "INSERT INTO t (id, payload) VALUES (?1, ?2)",
            (id, payload(id)),
        )
        .unwrap_or_else(|e| panic!("insert row {id}: {e}"));
    }
}

/// Opens the database in the backing directory (what the machine finds after the power comes
/// back), checks it is intact and returns its rows' ids, each checked against its payload.
fn rows_after_restart(backing: &Path) -> Vec<i64> {
    let conn = Connection::open(backing.join("test.db")).expect("open the backing database");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("integrity check");
    assert_eq!(check, "ok", "the database is damaged after the power cut");
    let mut select = conn
        .prepare("SELECT id, payload FROM t ORDER BY id")
        .expect("select rows");
    let rows = select
        .query_map([], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .expect("query rows");
    rows.map(|row| {
        let (id, data) = row.expect("read row");
        assert_eq!(data, payload(id), "row {id} has the wrong payload");
        id
    })
    .collect()
}

/// Two connections (`synchronous = FULL`) to a new database on the mount, with the test table.
fn two_connections(mounted: &PowerLossFs) -> (Connection, Connection) {
    let db = mounted.mountpoint().join("test.db");
    let first = connect(&db, "FULL");
    first
        .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        .expect("create table");
    let second = connect(&db, "FULL");
    (first, second)
}

#[test]
fn sqlite_commits_with_synchronous_full_survive_the_cut() {
    if !fuse_or_skip() {
        return;
    }
    let dirs = dirs();
    let mounted = mount(&dirs);
    let (first, second) = two_connections(&mounted);
    // Checkpoints during the run, so the database file itself is written and fsync'ed as well
    // as the WAL.
    first
        .pragma_update(None, "wal_autocheckpoint", 50)
        .expect("autocheckpoint");

    insert(0..ROWS / 2, &first, &second);
    // A checkpoint that also truncates the WAL: the truncation is held like any other change.
    first
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    insert(ROWS / 2..ROWS, &first, &second);
    assert_eq!(count(&first), ROWS);
    assert_eq!(count(&second), ROWS);

    mounted.cut_power();
    // Their files are on the dead mount: closing fails quietly, as after a real power loss
    // nothing is closed at all.
    drop((first, second));

    let ids = rows_after_restart(&dirs.backing);
    assert_eq!(
        ids,
        (0..ROWS).collect::<Vec<_>>(),
        "committed rows were lost although every commit was fsync'ed"
    );
}

#[test]
fn sqlite_commits_without_sync_are_lost_in_the_cut() {
    if !fuse_or_skip() {
        return;
    }
    let dirs = dirs();
    let mounted = mount(&dirs);
    let (first, second) = two_connections(&mounted);
    insert(0..DURABLE_ROWS, &first, &second);

    for conn in [&first, &second] {
        conn.pragma_update(None, "synchronous", "OFF")
            .expect("synchronous off");
    }
    insert(DURABLE_ROWS..ROWS, &first, &second);
    assert_eq!(count(&second), ROWS, "the mount lost rows before the cut");

    mounted.cut_power();
    drop((first, second));

    let ids = rows_after_restart(&dirs.backing);
    eprintln!("{} of {ROWS} rows survived the power cut", ids.len());
    assert_eq!(
        ids.iter()
            .copied()
            .take_while(|&id| id < DURABLE_ROWS)
            .collect::<Vec<_>>(),
        (0..DURABLE_ROWS).collect::<Vec<_>>(),
        "rows committed with synchronous = FULL were lost"
    );
    assert!(
        (ids.len() as i64) < ROWS,
        "every row survived although none after the first {DURABLE_ROWS} was fsync'ed"
    );
}

#[test]
fn a_filesystem_that_cannot_start_fails_the_mount_saying_why() {
    if !fuse_or_skip() {
        return;
    }
    let dirs = dirs();
    let missing = dirs.backing.join("missing");
    let mounting = std::panic::catch_unwind(|| {
        PowerLossFs::mount(Path::new(BINARY), &missing, &dirs.mountpoint)
    });
    let message = match mounting {
        Ok(_) => panic!("mounting a missing backing directory succeeded"),
        Err(panic) => panic.downcast::<String>().map(|m| *m).unwrap_or_default(),
    };
    assert!(
        message.contains("exited without printing \"ready\""),
        "unexpected panic: {message}"
    );
}
