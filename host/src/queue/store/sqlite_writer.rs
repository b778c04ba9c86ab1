//! The SQLite store's one write path: a thread that owns the only connection that writes, and
//! commits every write that is waiting — events being ingested, claims, outcomes, lease renewals
//! — in one transaction (group commit), and a thread that makes the events durable.
//!
//! Before it, ingest and dispatch wrote through two connections that took turns at SQLite's one
//! write lock, each retrying on a timer while the other held it, and an ingest commit held that
//! lock through its fsync: every claim and outcome behind it waited for the disk, which here
//! sometimes takes tens of milliseconds for one sync. Now nobody waits for a lock: a write waits
//! at most for the transaction under way, then goes into the next one with everything else that
//! arrived meanwhile.
//!
//! Every transaction is committed with `synchronous = NORMAL`: WAL mode keeps it across a
//! killed process, and what a power loss forgets of claims and outcomes at worst runs a
//! delivery again. A write that must survive a power loss ([`Durability::Durable`]: an accepted
//! event, whose sender is told it is kept) is answered only once the WAL file holding its
//! commit has been synced, by the **syncer** thread — after the write lock is released, so the
//! writer goes on committing while the disk syncs, and one `fdatasync` covers every durable
//! write committed before it. That is as durable as `synchronous = FULL`: a commit's frames are
//! either still in the WAL (synced here) or were checkpointed into the database file, which
//! SQLite syncs after every checkpoint before the WAL is reused.
//!
//! A third thread, the **checkpointer**, copies the WAL into the database file (SQLite's
//! checkpoint, with its two syncs) on a connection of its own, so that the writer does not stop
//! for it.
//!
//! Each write runs in a savepoint of its own, so one write's error fails that write alone; a
//! write is answered only once its transaction is committed.
//!
//! A write is answered to a thread that waits for it ([`Writer::write`]) or to a task that
//! awaits it ([`Writer::submit`]). The second is how ingest, claims and outcomes go: the writer
//! (or the syncer) wakes the task itself, with no blocking-pool thread in between — each such
//! thread was two more wake-ups on the way of every event's answer and every claim, and on a
//! busy machine each wake-up is a wait in a run queue.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use rusqlite::{Connection, TransactionBehavior};

use super::interface::{Answer, StoreError};

/// Most writes committed in one transaction: bounds how long the first write of a group waits
/// and the size of one WAL commit.
const MAX_GROUP_COMMIT: usize = 512;

/// How often the checkpointer copies what the WAL holds into the database file. At 1,000
/// events/s with four deliveries each the WAL grows by some 8 MB/s (events, claims, outcomes
/// with their logs). Small, frequent checkpoints keep the tail of ingest short: each copies
/// and syncs what 10 ms wrote (~80 KB) instead of what 50 ms did, and every event's sync of the
/// WAL shares the disk with them. Measured: ingest p99 at that load lower in six of six pairs
/// than with 50 ms (4.32 → 2.72, 9.21 → 3.85, 6.56 → 2.49 ms …), 1 s was worse than 50 ms in
/// three of three; dispatch with a backlog unchanged (docs/PERFORMANCE.md).
const CHECKPOINT_PERIOD: std::time::Duration = std::time::Duration::from_millis(10);

/// Longest the checkpointer waits between two looks while nothing is written: once a checkpoint
/// has copied the whole WAL and nothing was committed since, each wait doubles from
/// [`CHECKPOINT_PERIOD`] up to this. An idle engine's checkpointer then wakes once a second
/// instead of a hundred times (a tenth of an idle engine's wake-ups once the epoch ticker
/// sleeps), and the first commit after a quiet spell is copied within a second; under any
/// load it looks every [`CHECKPOINT_PERIOD`] as before.
const IDLE_CHECKPOINT_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Least time between two warnings of failing checkpoints: a failure that repeats (a
/// read-only file, a full disk) is logged once in this time, with how many there were, not a
/// hundred times a second. The checkpointer itself keeps trying every [`CHECKPOINT_PERIOD`]:
/// once space is freed on a full disk, the first checkpoint that fits must come before the
/// writes that would take that space again.
const CHECKPOINT_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The WAL size (pages) at which the writer checkpoints by itself, in case the checkpointer
/// falls behind: ten times SQLite's default, so that in normal running the writer never stops
/// for a checkpoint's copying and syncs, and the WAL stays bounded (~40 MB) whatever happens.
const WRITER_CHECKPOINT_PAGES: i64 = 10_000;

/// Statements the writer keeps prepared (rusqlite's default is 16): every write's own, the
/// savepoint's three, and room to spare, so that none is evicted and parsed again under load.
const WRITER_STATEMENT_CACHE: usize = 64;

/// The savepoint each write runs in, through cached statements: rusqlite's `Savepoint` parses
/// its SQL on every use, about a sixth of the writer thread's profile with a backlog.
const SAVEPOINT: &str = "SAVEPOINT write";
const RELEASE: &str = "RELEASE write";
const ROLLBACK_TO: &str = "ROLLBACK TO write";

/// Whether a write must be on disk before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Answered once the WAL holding its commit is synced: an accepted event must survive a
    /// power loss, since its sender was told it is kept.
    Durable,
    /// Answered once committed: survives a killed process; what a power loss forgets is run
    /// again (at-least-once).
    Normal,
}

/// Whether a write may share its transaction with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// Committed with whatever else is waiting.
    Shared,
    /// In a transaction of its own, whose [`OnCommit`] hook runs before any later write runs
    /// (a normal write is answered by then too; a durable one once synced): for a write whose
    /// result changes what later writes see (a clock step moves the schedule; the queue's clock
    /// follows only once the move is committed).
    Alone,
}

/// What runs in the writer thread once a write is committed, with its result, before any
/// later write runs.
pub type OnCommit<R> = Box<dyn FnOnce(&R) + Send>;

/// A write handed to the writer thread.
trait Job: Send {
    fn durability(&self) -> Durability;
    fn grouping(&self) -> Grouping;
    /// Runs the write inside the group's transaction; its result, an error passed through
    /// `explain` ([`commit_group`]), is kept for [`Job::answer`]. Answers the error when the
    /// write failed (its savepoint is rolled back).
    fn run(
        &mut self,
        tx: &Connection,
        explain: &dyn Fn(StoreError) -> StoreError,
    ) -> Option<StoreError>;
    /// Runs its [`OnCommit`] hook, if it has one and the write succeeded: called in the writer
    /// right after the transaction commits, before any later write runs — whatever its
    /// durability (a durable write's answer waits for the sync; its hook does not).
    fn on_commit(&mut self);
    /// Answers the caller: its own result when the transaction was committed, `failed` when it
    /// was not.
    fn answer(self: Box<Self>, failed: Option<StoreError>);
}

/// Where a write's result goes.
enum Reply<R> {
    /// To a thread blocked in [`Writer::write_with`].
    Waiting(mpsc::SyncSender<Result<R, StoreError>>),
    /// To a task awaiting [`Writer::submit`]'s future.
    Awaited(tokio::sync::oneshot::Sender<Result<R, StoreError>>),
}

/// A write as a function of the transaction, its result, and where it goes.
struct Pending<F, R> {
    work: Option<F>,
    result: Option<Result<R, StoreError>>,
    durability: Durability,
    grouping: Grouping,
    done: Reply<R>,
    /// Runs in the writer thread once the write is committed, before any later write.
    committed: Option<OnCommit<R>>,
}

impl<F, R> Job for Pending<F, R>
where
    F: FnOnce(&Connection) -> Result<R, StoreError> + Send,
    R: Send,
{
    fn durability(&self) -> Durability {
        self.durability
    }

    fn grouping(&self) -> Grouping {
        self.grouping
    }

    fn run(
        &mut self,
        tx: &Connection,
        explain: &dyn Fn(StoreError) -> StoreError,
    ) -> Option<StoreError> {
        let result = match self.work.take() {
            Some(work) => work(tx).map_err(explain),
            None => Err(StoreError::Database("a write ran twice".into())),
        };
        let error = result.as_ref().err().map(StoreError::for_each_call);
        self.result = Some(result);
        error
    }

    fn on_commit(&mut self) {
        if let (Some(Ok(value)), Some(committed)) = (&self.result, self.committed.take()) {
            committed(value);
        }
    }

    fn answer(self: Box<Self>, failed: Option<StoreError>) {
        let result = match (failed, self.result) {
            (Some(e), _) => Err(e),
            (None, Some(result)) => result,
            (None, None) => Err(StoreError::Database("a write was never run".into())),
        };
        // A caller that is gone (a task whose future was dropped) gets nothing: the write
        // stands, as a blocking caller's would.
        match self.done {
            Reply::Waiting(done) => {
                let _ = done.send(result);
            }
            Reply::Awaited(done) => {
                let _ = done.send(result);
            }
        }
    }
}

/// The handle callers write through; the thread ends when it is dropped.
#[derive(Debug)]
pub struct Writer {
    /// Shared by every caller as it is (an `mpsc::Sender` is `Sync`): no lock on the way in.
    jobs: mpsc::Sender<Box<dyn Job>>,
    /// Dropped with the writer: tells the checkpointer to stop.
    _checkpoints: mpsc::Sender<()>,
}

/// What [`Writer::write_with`] is asked to do.
pub struct Write<F, R> {
    /// The write.
    pub work: F,
    /// Whether it must be synced before it is answered.
    pub durability: Durability,
    /// Whether it may share its transaction.
    pub grouping: Grouping,
    /// Runs in the writer thread once the write is committed, before any later write runs.
    pub committed: Option<OnCommit<R>>,
}

impl Writer {
    /// Starts the writer thread on `conn`, which must be the only connection that writes, the
    /// syncer thread on `wal`, the database's write-ahead log, and the checkpointer on
    /// `checkpoints`, a connection of its own to the same database.
    pub fn start(
        conn: Connection,
        wal: PathBuf,
        checkpoints: Connection,
    ) -> Result<Writer, StoreError> {
        let thread_error =
            |e: std::io::Error| StoreError::Database(format!("cannot start a store thread: {e}"));
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)
            .map_err(|e| classify(&e))?;
        // The savepoints' journal stays in memory: past 64 KiB in a transaction SQLite would
        // otherwise spill it to a temporary file. This setting would also keep a large sort in
        // memory; the writer's queries take their order from indexes and build nothing large.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(|e| classify(&e))?;
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
        let (sender, receiver) = mpsc::channel();
        let (synced, to_sync) = mpsc::channel();
        let (stop, stopped) = mpsc::channel();
        let probe = wal.clone();
        let checkpointed = wal.clone();
        let wrote = Arc::new(AtomicBool::new(true));
        let written = Arc::clone(&wrote);
        std::thread::Builder::new()
            .name("jobhook-store-sync".into())
            .spawn(move || sync_loop(&wal, &to_sync))
            .map_err(thread_error)?;
        std::thread::Builder::new()
            .name("jobhook-store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoints, &checkpointed, &written, &stopped))
            .map_err(thread_error)?;
        std::thread::Builder::new()
            .name("jobhook-store-writer".into())
            .spawn(move || write_loop(conn, probe, &wrote, &receiver, &synced))
            .map_err(thread_error)?;
        Ok(Writer {
            jobs: sender,
            _checkpoints: stop,
        })
    }

    /// Runs `work` in the next transaction and waits until that transaction is committed (or
    /// failed).
    pub fn write<R, F>(&self, durability: Durability, work: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.write_with(Write {
            work,
            durability,
            grouping: Grouping::Shared,
            committed: None,
        })
    }

    /// [`Writer::write`] with every choice spelled out.
    pub fn write_with<R, F>(&self, write: Write<F, R>) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let (done, result) = mpsc::sync_channel(1);
        self.send(write, Reply::Waiting(done))?;
        result.recv().unwrap_or_else(|_| Err(writer_stopped()))
    }

    /// [`Writer::write`] for async callers: hands `work` to the writer at once and returns a
    /// future of its answer. No thread waits for it; whoever answers (the writer, or the syncer
    /// for a durable write) wakes the awaiting task. The write is done whether or not the
    /// future is awaited.
    pub fn submit<R, F>(&self, durability: Durability, work: F) -> Answer<R>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let write = Write {
            work,
            durability,
            grouping: Grouping::Shared,
            committed: None,
        };
        let sent = self.send(write, Reply::Awaited(done));
        Box::pin(async move {
            sent?;
            result.await.unwrap_or_else(|_| Err(writer_stopped()))
        })
    }

    fn send<R, F>(&self, write: Write<F, R>, done: Reply<R>) -> Result<(), StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let job = Box::new(Pending {
            work: Some(write.work),
            result: None,
            durability: write.durability,
            grouping: write.grouping,
            done,
            committed: write.committed,
        });
        self.jobs.send(job).map_err(|_| writer_stopped())
    }
}

/// The answer of a write whose writer thread is gone.
fn writer_stopped() -> StoreError {
    StoreError::Database("the store's writer has stopped".into())
}

/// Takes every write that is waiting (up to [`MAX_GROUP_COMMIT`]), commits them together, answers
/// each (the durable ones through the syncer), and starts over; a write that must be alone gets
/// a transaction of its own, in order.
fn write_loop(
    conn: Connection,
    wal: PathBuf,
    wrote: &AtomicBool,
    receiver: &mpsc::Receiver<Box<dyn Job>>,
    syncer: &mpsc::Sender<Vec<Box<dyn Job>>>,
) {
    let mut conn = WriteConnection {
        conn,
        wal,
        reclaiming: false,
    };
    while let Ok(first) = receiver.recv() {
        let mut waiting = vec![first];
        while waiting.len() < MAX_GROUP_COMMIT {
            match receiver.try_recv() {
                Ok(job) => waiting.push(job),
                Err(_) => break,
            }
        }
        let mut group = Vec::with_capacity(waiting.len());
        let mut committed = Vec::new();
        let changes = conn.conn.total_changes();
        for job in waiting {
            if job.grouping() == Grouping::Alone {
                committed.extend(conn.commit(std::mem::take(&mut group)));
                committed.extend(conn.commit(vec![job]));
            } else {
                group.push(job);
            }
        }
        committed.extend(conn.commit(group));
        // For the checkpointer: the WAL may have grown. A round that changed no row (a lease
        // renewal with nothing running, an idle engine's) wrote nothing to it.
        if conn.conn.total_changes() != changes {
            wrote.store(true, Ordering::Relaxed);
        }
        if committed.is_empty() {
            continue;
        }
        if let Err(mpsc::SendError(unsynced)) = syncer.send(committed) {
            let stopped = StoreError::Database("the store's syncer has stopped".into());
            for job in unsynced {
                job.answer(Some(stopped.for_each_call()));
            }
        }
    }
}

/// The writer's connection, and whether the disk ran out of space under it.
struct WriteConnection {
    conn: Connection,
    /// The database's write-ahead log: asked whether its file system still takes writes when
    /// a commit fails ([`read_only_file_system_or`]).
    wal: PathBuf,
    /// Set when a write failed for want of disk space. The checkpoints have been failing too
    /// (copying the WAL grows the database file), so every commit went into the WAL; once space
    /// is freed, commits would go on filling it with the WAL, and no checkpoint would ever find
    /// room again — the store stuck full with the space its own WAL holds. So, until a
    /// checkpoint has copied the whole WAL into the database file ([`reclaim_wal`]), no write is
    /// tried.
    reclaiming: bool,
}

impl WriteConnection {
    /// [`commit_group`], first giving the WAL's space back if a write ran out of space before.
    fn commit(&mut self, group: Vec<Box<dyn Job>>) -> Vec<Box<dyn Job>> {
        if group.is_empty() {
            return group;
        }
        if self.reclaiming {
            match reclaim_wal(&self.conn) {
                Err(full @ StoreError::DiskFull(_)) => return fail_all(group, &full),
                Ok(()) => {
                    tracing::info!(
                        "the store's WAL is copied into the database file; writing again"
                    );
                }
                // Not this condition: the writes say for themselves what is wrong.
                Err(_) => {}
            }
            self.reclaiming = false;
        }
        let wal = &self.wal;
        let explain = |e: StoreError| read_only_file_system_or(e, wal);
        let (durable, out_of_space) = commit_group(&mut self.conn, group, &explain);
        if out_of_space {
            tracing::warn!(
                "the store is out of disk space: no write is tried until its WAL has been copied \
                 into the database file (free space on the data directory's file system)"
            );
        }
        self.reclaiming = out_of_space;
        durable
    }
}

/// Copies what the WAL holds into the database file: a passive checkpoint, which waits for no
/// reader and never holds up the writer. `DiskFull` while there is no room yet for the database
/// file to grow (tried again before the next write); once it succeeds, the database file holds
/// the WAL's pages (all of them, or all a reader still on the WAL lets it copy: that reader is
/// not held against the writes), and the next commits start the WAL over instead of growing it.
fn reclaim_wal(conn: &Connection) -> Result<(), StoreError> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .map_err(|e| classify(&e))
}

/// Answers every write of `group` with `e`.
fn fail_all(group: Vec<Box<dyn Job>>, e: &StoreError) -> Vec<Box<dyn Job>> {
    for job in group {
        job.answer(Some(e.for_each_call()));
    }
    Vec::new()
}

/// Commits `group` in one transaction, each write in its own savepoint, and answers each write
/// that needs no sync; returns the committed durable ones, which the syncer answers once the
/// WAL is synced, and whether a write failed for want of disk space.
/// Every failure (a write's own, or the transaction's: its start, a rollback of all of it, its
/// commit) is passed through `explain` before the writes are answered with it.
fn commit_group(
    conn: &mut Connection,
    mut group: Vec<Box<dyn Job>>,
    explain: &dyn Fn(StoreError) -> StoreError,
) -> (Vec<Box<dyn Job>>, bool) {
    let out_of_space = |e: &StoreError| matches!(e, StoreError::DiskFull(_));
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let e = explain(classify(&e));
            return (fail_all(group, &e), out_of_space(&e));
        }
    };
    let mut lost = None;
    let mut full = false;
    for job in &mut group {
        let error = run_in_savepoint(&tx, job.as_mut(), explain);
        full |= error.as_ref().is_some_and(out_of_space);
        // SQLite may answer some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY, SQLITE_NOMEM)
        // by rolling back the whole transaction, not just the failed savepoint: then the
        // writes before this one are gone too, and the ones after it would commit each on its
        // own. Fail the whole group instead, so nobody is told a write is committed when it
        // is not.
        if let Some(e) = error
            && tx.is_autocommit()
        {
            lost = Some(rolled_back(&e));
            break;
        }
    }
    if let Some(e) = lost {
        drop(tx);
        let full = out_of_space(&e);
        return (fail_all(group, &e), full);
    }
    if let Err(e) = tx.commit() {
        let e = explain(classify(&e));
        return (fail_all(group, &e), full || out_of_space(&e));
    }
    for job in &mut group {
        job.on_commit();
    }
    let (durable, answered): (Vec<_>, Vec<_>) = group
        .into_iter()
        .partition(|job| job.durability() == Durability::Durable);
    for job in answered {
        job.answer(None);
    }
    (durable, full)
}

/// Runs `job` in a savepoint of its own: kept when it succeeds, rolled back when it fails (its
/// error, passed through `explain`, is returned), so that one write's failure undoes that write
/// alone.
fn run_in_savepoint(
    tx: &Connection,
    job: &mut dyn Job,
    explain: &dyn Fn(StoreError) -> StoreError,
) -> Option<StoreError> {
    let step = |sql: &str| -> rusqlite::Result<()> {
        tx.prepare_cached(sql)?.execute([])?;
        Ok(())
    };
    if let Err(e) = step(SAVEPOINT) {
        return Some(explain(classify(&e)));
    }
    match job.run(tx, explain) {
        None => step(RELEASE).err().map(|e| explain(classify(&e))),
        Some(e) => {
            // If SQLite rolled back the whole transaction, the savepoint is gone with it and
            // this fails too; `commit_group` sees that and fails the whole group.
            let _ = step(ROLLBACK_TO).and_then(|()| step(RELEASE));
            Some(e)
        }
    }
}

/// Every [`CHECKPOINT_PERIOD`] until the writer is gone, copies what the WAL holds into the
/// database file without waiting for anyone (a passive checkpoint: it never holds up the writer
/// or a reader, and copies what it can). SQLite starts the WAL over once all of it is copied.
/// A failure is told as the writer's are: a file system turned read-only under `wal` says so
/// and what to do, where SQLite says only "disk I/O error".
///
/// While nothing is written (`wrote`, set by the writer after every round, is found clear) and
/// the last checkpoint copied the whole WAL, it looks less and less often ([`next_look`]).
fn checkpoint_loop(
    conn: &Connection,
    wal: &std::path::Path,
    wrote: &AtomicBool,
    stop: &mpsc::Receiver<()>,
) {
    let warnings = crate::log_limit::LogLimit::new(CHECKPOINT_WARNING_INTERVAL);
    let mut wait = CHECKPOINT_PERIOD;
    let mut copied_all = false;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(wait) {
        let quiet = copied_all && !wrote.swap(false, Ordering::Relaxed);
        wait = next_look(wait, quiet);
        if quiet {
            continue;
        }
        let checkpointed = checkpoint(conn);
        copied_all = matches!(checkpointed, Ok(true));
        if let Err(e) = checkpointed
            && let Some(untold) = warnings.due()
        {
            let e = read_only_file_system_or(classify(&e), wal);
            tracing::warn!(
                failures = untold + 1,
                "cannot checkpoint the store's WAL (trying again every {} ms): {e}",
                CHECKPOINT_PERIOD.as_millis()
            );
        }
    }
}

/// A passive checkpoint: whether it copied the whole WAL into the database file (not when a
/// reader's snapshot or a writer held part of it back).
fn checkpoint(conn: &Connection) -> rusqlite::Result<bool> {
    // One row: whether it was blocked, the WAL's frames, the frames copied.
    let (blocked, frames, copied) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?;
    Ok(blocked == 0 && copied >= frames)
}

/// How long the checkpointer waits after a wait of `wait`: twice as long, up to
/// [`IDLE_CHECKPOINT_PERIOD`], while `quiet` (the last checkpoint copied the whole WAL and
/// nothing was written since); otherwise [`CHECKPOINT_PERIOD`] (something was written, or a
/// checkpoint failed or was held back by a reader).
fn next_look(wait: std::time::Duration, quiet: bool) -> std::time::Duration {
    if quiet {
        wait.saturating_mul(2).min(IDLE_CHECKPOINT_PERIOD)
    } else {
        CHECKPOINT_PERIOD
    }
}

/// Answers committed durable writes once the WAL file is synced: takes every batch that is
/// waiting, syncs once, answers them all.
fn sync_loop(wal: &std::path::Path, batches: &mpsc::Receiver<Vec<Box<dyn Job>>>) {
    while let Ok(mut waiting) = batches.recv() {
        while let Ok(more) = batches.try_recv() {
            waiting.extend(more);
        }
        let failed = sync_file(wal).err();
        for job in waiting {
            job.answer(failed.as_ref().map(StoreError::for_each_call));
        }
    }
}

/// Syncs the data of `path` to disk. Opened anew each time, so that a WAL file SQLite has
/// replaced is never mistaken for the one it wrote to (one `open` beside an `fdatasync` that
/// takes a hundred times as long).
fn sync_file(path: &std::path::Path) -> Result<(), StoreError> {
    let synced = std::fs::File::open(path).and_then(|f| f.sync_data());
    synced.map_err(|e| file_error(format!("cannot sync {}: {e}", path.display()), &e))
}

/// The [`StoreError`] of `e`, a store file's operation that failed as `message` says: `ENOSPC`
/// is [`StoreError::DiskFull`], `EROFS` (the file system turned read-only) a
/// [`StoreError::ReadOnly`] saying what to do, anything else a database error.
fn file_error(message: String, e: &std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::StorageFull => StoreError::DiskFull(message),
        std::io::ErrorKind::ReadOnlyFilesystem => {
            StoreError::ReadOnly(format!("{message}; {READ_ONLY_FILE_SYSTEM_ADVICE}"))
        }
        _ => StoreError::Database(message),
    }
}

/// The [`StoreError`] of a SQLite error: `SQLITE_FULL` (the file system holding the database
/// has no space left; SQLite reports `ENOSPC` this way) is [`StoreError::DiskFull`] and
/// `SQLITE_READONLY` [`StoreError::ReadOnly`], so that ingest can say so and the dispatcher
/// retries its records; a damaged file is [`StoreError::Corrupt`] with what to do; everything
/// else is a database error.
pub fn classify(e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => StoreError::DiskFull(e.to_string()),
        Some(rusqlite::ErrorCode::ReadOnly) => StoreError::ReadOnly(e.to_string()),
        // Found at run time (a restored copy that was taken badly, a failing disk): said with
        // what to do, for as long as the engine meets it.
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreError::Corrupt(format!(
                "{e}: the store's database file is damaged; {DAMAGED_ADVICE}"
            ))
        }
        _ => StoreError::Database(e.to_string()),
    }
}

/// What to do when the file system holding the store has turned read-only under it.
const READ_ONLY_FILE_SYSTEM_ADVICE: &str = "the file system holding the store has become \
     read-only (Linux does so to a file system that meets an error, `errors=remount-ro`): see \
     the system log, check and repair the file system, mount it read-write again and restart \
     jobhook";

/// `e`, or a [`StoreError::ReadOnly`] saying what to do when the file system holding the store
/// has turned read-only under the engine. SQLite reports that as a plain I/O error (its writes
/// meet `EROFS`), but what the operator must mend is the file system, not the store; and the
/// engine then answers as for any store that takes no writes (ingest 503, reason `read-only`,
/// outcomes kept until it takes them).
fn read_only_file_system_or(e: StoreError, wal: &std::path::Path) -> StoreError {
    let StoreError::Database(reason) = e else {
        return e;
    };
    // Opening a file for writing asks the kernel whether its file system takes writes; nothing
    // is written, and the file is closed at once.
    match std::fs::OpenOptions::new().write(true).open(wal) {
        Err(probe) if probe.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
            file_error(reason, &probe)
        }
        _ => StoreError::Database(reason),
    }
}

/// What to do with a damaged database file.
pub const DAMAGED_ADVICE: &str = "stop every jobhook using it and restore it from a backup (one \
     `jobhook backup` wrote, or a copy of jobhook.sqlite with its -wal file taken while no engine \
     ran), or move it aside to start an empty store (the events in it are then not delivered)";

/// The error every write of a group gets when one write's error rolled the whole transaction
/// back: of the same kind as that error, saying what happened.
fn rolled_back(cause: &StoreError) -> StoreError {
    match cause {
        StoreError::DiskFull(reason) => {
            StoreError::DiskFull(format!("{reason} (the whole transaction was rolled back)"))
        }
        StoreError::ReadOnly(reason) => {
            StoreError::ReadOnly(format!("{reason} (the whole transaction was rolled back)"))
        }
        // Still damaged data, with its advice: not an error of one statement.
        StoreError::Corrupt(reason) => {
            StoreError::Corrupt(format!("{reason} (the whole transaction was rolled back)"))
        }
        other => StoreError::Database(format!("the whole transaction was rolled back: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's codes for a whole store that fails (full, read-only, damaged) are told apart,
    /// each with its own kind; a damaged file says what to do.
    #[test]
    fn sqlite_errors_are_classified_by_what_to_do() {
        let error =
            |code: i32| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        assert!(matches!(
            classify(&error(rusqlite::ffi::SQLITE_FULL)),
            StoreError::DiskFull(_)
        ));
        assert!(matches!(
            classify(&error(rusqlite::ffi::SQLITE_READONLY)),
            StoreError::ReadOnly(_)
        ));
        for code in [rusqlite::ffi::SQLITE_CORRUPT, rusqlite::ffi::SQLITE_NOTADB] {
            let classified = classify(&error(code));
            assert!(matches!(classified, StoreError::Corrupt(_)), "{classified}");
            assert!(
                classified.to_string().contains("restore it from a backup"),
                "{classified}"
            );
        }
        assert!(matches!(
            classify(&error(rusqlite::ffi::SQLITE_IOERR)),
            StoreError::Database(_)
        ));
        // The other writes of a group one of them rolled back keep its kind, and a damaged
        // file's advice, whatever the kind.
        for code in [
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_CORRUPT,
            rusqlite::ffi::SQLITE_IOERR,
        ] {
            let cause = classify(&error(code));
            let each = rolled_back(&cause);
            assert_eq!(
                std::mem::discriminant(&each),
                std::mem::discriminant(&cause),
                "{each}"
            );
            assert!(each.to_string().contains("rolled back"), "{each}");
            if code == rusqlite::ffi::SQLITE_CORRUPT {
                assert!(
                    each.to_string().contains("restore it from a backup"),
                    "{each}"
                );
                assert_eq!(
                    each.plain_cause(),
                    "the store's data is damaged (the engine's log says what to do)"
                );
            }
        }
    }

    /// A job that runs `write`, and where its answer arrives: what [`Writer::write_with`] sends,
    /// for a test to send itself (and so choose what is queued behind what).
    fn pending<R: Send + 'static>(
        write: Write<impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static, R>,
    ) -> (Box<dyn Job>, mpsc::Receiver<Result<R, StoreError>>) {
        let (done, answer) = mpsc::sync_channel(1);
        let job = Box::new(Pending {
            work: Some(write.work),
            result: None,
            durability: write.durability,
            grouping: write.grouping,
            done: Reply::Waiting(done),
            committed: write.committed,
        });
        (job, answer)
    }

    /// [`pending`] of a shared write of `durability` without a hook.
    fn job<R: Send + 'static>(
        durability: Durability,
        work: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> (Box<dyn Job>, mpsc::Receiver<Result<R, StoreError>>) {
        pending(Write {
            work,
            durability,
            grouping: Grouping::Shared,
            committed: None,
        })
    }

    fn table() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("db.sqlite")).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (v TEXT);")
            .unwrap();
        (dir, conn)
    }

    /// A writer on `conn` in `dir`, syncing `wal` there.
    fn start(dir: &tempfile::TempDir, conn: Connection, wal: &str) -> Writer {
        let checkpoints = Connection::open(dir.path().join("db.sqlite")).unwrap();
        Writer::start(conn, dir.path().join(wal), checkpoints).unwrap()
    }

    #[test]
    fn an_idle_checkpointer_looks_less_and_less_often_and_at_once_after_a_write() {
        let mut wait = CHECKPOINT_PERIOD;
        let mut waits = Vec::new();
        for _ in 0..10 {
            wait = next_look(wait, true);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000]);
        // Written since, or a checkpoint that did not copy everything (or failed): tried again
        // soon — the writer may be waiting for the WAL's space after a full disk.
        assert_eq!(next_look(wait, false), CHECKPOINT_PERIOD);
    }

    /// A checkpoint held back by a reader's snapshot has not copied the whole WAL, so the
    /// checkpointer does not start waiting longer; once the reader is gone, it has.
    #[test]
    fn a_checkpoint_a_reader_holds_back_has_not_copied_everything() {
        let (dir, conn) = table();
        conn.execute("INSERT INTO t VALUES ('before')", []).unwrap();
        let reader = Connection::open(dir.path().join("db.sqlite")).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        // Written after the reader's snapshot: a passive checkpoint cannot copy it yet.
        conn.execute("INSERT INTO t VALUES ('after')", []).unwrap();
        let checkpoints = Connection::open(dir.path().join("db.sqlite")).unwrap();
        assert!(!checkpoint(&checkpoints).unwrap());
        reader.execute_batch("COMMIT").unwrap();
        assert!(checkpoint(&checkpoints).unwrap());
    }

    #[test]
    fn after_a_quiet_spell_the_first_writes_are_checkpointed_within_the_idle_period() {
        let (dir, conn) = table();
        let writer = start(&dir, conn, "db.sqlite-wal");
        let database = dir.path().join("db.sqlite");
        let grown = |from: u64, what: &str| {
            let deadline = std::time::Instant::now() + IDLE_CHECKPOINT_PERIOD * 10;
            loop {
                let now = std::fs::metadata(&database).unwrap().len();
                if now > from {
                    return now;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "never checkpointed {what}"
                );
                std::thread::sleep(CHECKPOINT_PERIOD);
            }
        };
        let empty = std::fs::metadata(&database).unwrap().len();
        for _ in 0..200 {
            writer.write(Durability::Normal, insert("row")).unwrap();
        }
        let first = grown(empty, "the first writes");
        // Quiet long enough for the checkpointer to wait its longest.
        std::thread::sleep(IDLE_CHECKPOINT_PERIOD * 2);
        for _ in 0..400 {
            writer
                .write(
                    Durability::Normal,
                    insert("a longer row, to need more pages"),
                )
                .unwrap();
        }
        grown(first, "the writes after the quiet spell");
    }

    #[test]
    fn the_checkpointer_copies_the_wal_into_the_database_file() {
        let (dir, conn) = table();
        let writer = start(&dir, conn, "db.sqlite-wal");
        let database = dir.path().join("db.sqlite");
        let before = std::fs::metadata(&database).unwrap().len();
        for _ in 0..200 {
            writer.write(Durability::Normal, insert("row")).unwrap();
        }
        // The writer's own checkpoints start only at WRITER_CHECKPOINT_PAGES, far above what
        // these rows take: only the checkpointer grows the database file.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::metadata(&database).unwrap().len() <= before {
            assert!(std::time::Instant::now() < deadline, "never checkpointed");
            std::thread::sleep(CHECKPOINT_PERIOD);
        }
    }

    #[test]
    fn a_write_that_panics_is_answered_with_an_error_as_is_every_later_write() {
        let (dir, conn) = table();
        let writer = start(&dir, conn, "db.sqlite-wal");
        writer.write(Durability::Normal, insert("before")).unwrap();
        // A bug in a write ends the writer thread; its caller is told, not left waiting...
        let panicked = writer.write(
            Durability::Normal,
            |_: &Connection| -> Result<(), StoreError> { panic!("a bug in a write") },
        );
        assert!(
            matches!(&panicked, Err(StoreError::Database(m)) if m.contains("writer has stopped")),
            "{panicked:?}"
        );
        // ...and so is everyone after it, durable or not, waiting or awaiting.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for durability in [Durability::Normal, Durability::Durable] {
            let later = writer.write(durability, insert("after"));
            let awaited = runtime.block_on(writer.submit(durability, insert("after")));
            for later in [later, awaited] {
                assert!(
                    matches!(&later, Err(StoreError::Database(m)) if m.contains("writer has stopped")),
                    "{later:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_awaited_write_is_answered_as_a_waiting_one_is() {
        let (dir, conn) = table();
        // A durable write whose log cannot be synced is not answered as kept...
        let writer = start(&dir, conn, "no-such-wal");
        let durable = writer.submit(Durability::Durable, insert("durable")).await;
        assert!(
            matches!(&durable, Err(StoreError::Database(m)) if m.contains("cannot sync")),
            "{durable:?}"
        );
        writer
            .submit(Durability::Normal, insert("normal"))
            .await
            .unwrap();
        // ...with the real log it is; a write's result and its own error come back.
        let (dir, conn) = table();
        let writer = start(&dir, conn, "db.sqlite-wal");
        writer
            .submit(Durability::Durable, insert("durable"))
            .await
            .unwrap();
        let count = writer
            .submit(Durability::Normal, |tx: &Connection| {
                tx.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                    .map_err(|e| classify(&e))
            })
            .await;
        assert_eq!(count.unwrap(), 1);
        let refused = writer
            .submit(Durability::Normal, |tx: &Connection| {
                tx.execute("INSERT INTO no_such_table VALUES (1)", [])
                    .map_err(|e| classify(&e))
            })
            .await;
        assert!(
            matches!(&refused, Err(StoreError::Database(m)) if m.contains("no_such_table")),
            "{refused:?}"
        );
    }

    #[test]
    fn an_awaited_write_is_done_even_when_nobody_awaits_it() {
        let (dir, conn) = table();
        let writer = start(&dir, conn, "db.sqlite-wal");
        drop(writer.submit(Durability::Durable, insert("dropped")));
        // Writes are run in the order they were handed over.
        let count = writer.write(Durability::Normal, |tx: &Connection| {
            tx.query_row("SELECT count(*) FROM t WHERE v = 'dropped'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| classify(&e))
        });
        assert_eq!(count.unwrap(), 1);
    }

    #[test]
    fn a_failing_checkpointer_keeps_going_and_stops_with_its_writer() {
        let (dir, conn) = table();
        conn.execute("INSERT INTO t VALUES ('row')", []).unwrap();
        let read_only = Connection::open_with_flags(
            dir.path().join("db.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        // The premise: a checkpoint on this connection fails.
        assert!(
            read_only
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .is_err()
        );
        let (stop, stopped) = mpsc::channel();
        let (ended, end) = mpsc::channel();
        let log = crate::log_capture::Captured::default();
        let subscriber = log.warnings();
        let wal = dir.path().join("db.sqlite-wal");
        std::thread::spawn(move || {
            // Its warnings, on this thread, kept for the count below.
            tracing::subscriber::with_default(subscriber, || {
                checkpoint_loop(&read_only, &wal, &AtomicBool::new(false), &stopped);
            });
            let _ = ended.send(());
        });
        // Many failures later (one every CHECKPOINT_PERIOD), it has not given up...
        std::thread::sleep(CHECKPOINT_PERIOD * 30);
        assert!(
            end.try_recv().is_err(),
            "the checkpointer ended after a failure"
        );
        // ...and the writer's end stops it at once.
        drop(stop);
        end.recv_timeout(CHECKPOINT_PERIOD * 5)
            .expect("the checkpointer outlived its writer");
        // Well within CHECKPOINT_WARNING_INTERVAL: one warning for all those failures.
        assert!(CHECKPOINT_PERIOD * 35 < CHECKPOINT_WARNING_INTERVAL);
        let text = log.text();
        assert_eq!(
            text.matches("cannot checkpoint the store's WAL").count(),
            1,
            "{text}"
        );
    }

    fn insert(v: &'static str) -> impl FnOnce(&Connection) -> Result<(), StoreError> {
        move |tx| {
            tx.execute("INSERT INTO t VALUES (?1)", [v])
                .map(drop)
                .map_err(|e| classify(&e))
        }
    }

    /// Answers to the writes of a group.
    type Answers = Vec<mpsc::Receiver<Result<(), StoreError>>>;

    /// A table whose trigger refuses the value `poison` with `raise` (`ROLLBACK` ends the whole
    /// transaction, `ABORT` only the statement), and a group of three inserts of `durability`,
    /// the second of them `poison`, with their answers.
    fn poisoned_group(
        raise: &str,
        durability: Durability,
    ) -> (tempfile::TempDir, Connection, Vec<Box<dyn Job>>, Answers) {
        let (dir, conn) = table();
        conn.execute_batch(&format!(
            "CREATE TEMP TRIGGER poison BEFORE INSERT ON t WHEN NEW.v = 'poison'
             BEGIN SELECT RAISE({raise}, 'refused'); END;"
        ))
        .unwrap();
        let (group, answers) = ["a", "poison", "b"]
            .into_iter()
            .map(|v| job(durability, insert(v)))
            .unzip();
        (dir, conn, group, answers)
    }

    /// The answers to a group of three inserts whose second a trigger refuses with `raise`
    /// (`ROLLBACK` ends the whole transaction, `ABORT` only the statement), and how many rows
    /// were committed.
    fn group_with_poison(raise: &str) -> (Vec<bool>, i64) {
        let (_dir, mut conn, group, answers) = poisoned_group(raise, Durability::Durable);
        for synced in commit_group(&mut conn, group, &|e| e).0 {
            synced.answer(None);
        }
        let committed = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let answered = answers.iter().map(|a| a.recv().unwrap().is_ok()).collect();
        (answered, committed)
    }

    #[test]
    fn a_write_that_rolls_back_the_transaction_fails_the_whole_group() {
        // Nobody is told their write is committed when the transaction it was in is gone.
        assert_eq!(
            group_with_poison("ROLLBACK"),
            (vec![false, false, false], 0)
        );
        // A write that fails alone fails alone.
        assert_eq!(group_with_poison("ABORT"), (vec![true, false, true], 2));
    }

    /// What a store file's failed operation (the syncer's `fdatasync`, the writer's probe)
    /// becomes: a full disk, a file system turned read-only (saying what to mend), or an error.
    #[test]
    fn a_file_error_is_told_by_what_the_file_system_said() {
        let told = |errno: i32| {
            file_error(
                "cannot sync jobhook.sqlite-wal".into(),
                &std::io::Error::from_raw_os_error(errno),
            )
        };
        assert!(matches!(told(libc::ENOSPC), StoreError::DiskFull(_)));
        match told(libc::EROFS) {
            StoreError::ReadOnly(why) => assert!(
                why.starts_with("cannot sync jobhook.sqlite-wal; ")
                    && why.contains("mount it read-write again and restart jobhook"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        for errno in [libc::EIO, libc::ENOENT, libc::EACCES] {
            assert!(matches!(told(errno), StoreError::Database(_)), "{errno}");
        }
    }

    #[test]
    fn every_failure_is_explained_before_it_is_answered() {
        // What the writer's explanation of a read-only file system does to an I/O error.
        let explain = |e: StoreError| match e {
            StoreError::Database(reason) => StoreError::ReadOnly(reason),
            other => other,
        };
        // A write that fails alone (ABORT), and one that takes its transaction with it.
        for (raise, answered_ok) in [("ABORT", [true, false, true]), ("ROLLBACK", [false; 3])] {
            let (_dir, mut conn, group, answers) = poisoned_group(raise, Durability::Normal);
            assert!(commit_group(&mut conn, group, &explain).0.is_empty());
            for (answer, ok) in answers.iter().zip(answered_ok) {
                match answer.recv().unwrap() {
                    Ok(()) => assert!(ok, "{raise}: a failed write was answered Ok"),
                    Err(e) => assert!(
                        !ok && matches!(e, StoreError::ReadOnly(_)),
                        "{raise}: {e:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn a_failed_write_leaves_none_of_its_changes_and_the_others_all_of_theirs() {
        let (_dir, mut conn) = table();
        conn.execute_batch(
            "CREATE TEMP TRIGGER poison BEFORE INSERT ON t WHEN NEW.v = 'poison'
             BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
        // The middle write inserts a row, then fails: its savepoint takes that row back.
        let half_done = |tx: &Connection| {
            insert("x")(tx)?;
            insert("poison")(tx)
        };
        let (first, a) = job(Durability::Normal, insert("a"));
        let (middle, m) = job(Durability::Normal, half_done);
        let (last, b) = job(Durability::Normal, insert("b"));
        assert!(
            commit_group(&mut conn, vec![first, middle, last], &|e| e)
                .0
                .is_empty()
        );
        assert!(a.recv().unwrap().is_ok());
        assert!(m.recv().unwrap().is_err());
        assert!(b.recv().unwrap().is_ok());
        let mut rows = conn.prepare("SELECT v FROM t ORDER BY v").unwrap();
        let rows: Vec<String> = rows
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, ["a", "b"]);
    }

    #[test]
    fn a_durable_write_is_answered_only_once_the_wal_is_synced() {
        let (dir, conn) = table();
        // A log that cannot be synced (it does not exist): the durable write is committed but
        // its sender must not be told it is kept; a write that needs no sync is answered.
        let writer = start(&dir, conn, "no-such-wal");
        let durable = writer.write(Durability::Durable, insert("durable"));
        assert!(
            matches!(&durable, Err(StoreError::Database(m)) if m.contains("cannot sync")),
            "{durable:?}"
        );
        writer.write(Durability::Normal, insert("normal")).unwrap();
        // With the real log, both are answered.
        let (dir, conn) = table();
        let writer = start(&dir, conn, "db.sqlite-wal");
        writer
            .write(Durability::Durable, insert("durable"))
            .unwrap();
        writer.write(Durability::Normal, insert("normal")).unwrap();
    }

    #[test]
    fn no_later_write_runs_before_a_write_alone_has_its_hook_run() {
        for durability in [Durability::Normal, Durability::Durable] {
            let (dir, conn) = table();
            let writer = start(&dir, conn, "db.sqlite-wal");
            // The writer is held in a write while an alone write and then a later shared one
            // queue up behind it, so that it takes both in the same round.
            let (entered, running) = mpsc::channel::<()>();
            let (release, held) = mpsc::channel::<()>();
            let (hold, _) = job(Durability::Normal, move |_: &Connection| {
                let _ = entered.send(());
                let _ = held.recv();
                Ok(())
            });
            writer.jobs.send(hold).unwrap();
            running.recv().unwrap();
            let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
            let (path, hook_seen) = (dir.path().join("db.sqlite"), std::sync::Arc::clone(&seen));
            let (alone, alone_answer) = pending(Write {
                work: insert("alone"),
                durability,
                grouping: Grouping::Alone,
                // Read through another connection: what the hook sees is committed.
                committed: Some(Box::new(move |_: &()| {
                    let other = Connection::open(&path).unwrap();
                    let count = |v: &str| -> i64 {
                        other
                            .query_row("SELECT count(*) FROM t WHERE v = ?1", [v], |r| r.get(0))
                            .unwrap()
                    };
                    *hook_seen.lock().unwrap() = Some((count("alone"), count("later")));
                })),
            });
            writer.jobs.send(alone).unwrap();
            let (later, later_answer) = job(durability, insert("later"));
            writer.jobs.send(later).unwrap();
            release.send(()).unwrap();
            alone_answer.recv().unwrap().unwrap();
            // By the time its caller is answered, the hook has run; it saw its own write
            // committed and the later write not yet run.
            assert_eq!(*seen.lock().unwrap(), Some((1, 0)), "{durability:?}");
            later_answer.recv().unwrap().unwrap();
        }
    }

    #[test]
    fn writes_from_many_threads_at_once_are_all_answered_each_after_its_commit() {
        let (dir, conn) = table();
        let writer = std::sync::Arc::new(start(&dir, conn, "db.sqlite-wal"));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let writer = std::sync::Arc::clone(&writer);
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        writer.write(Durability::Durable, insert("many")).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let other = Connection::open(dir.path().join("db.sqlite")).unwrap();
        let n: i64 = other
            .query_row("SELECT count(*) FROM t WHERE v = 'many'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 400);
    }
}
