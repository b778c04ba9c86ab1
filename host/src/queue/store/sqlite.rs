//! The embedded store: one SQLite database in WAL mode under the data directory.
//!
//! Two connections:
//! - the **writer** ([`super::sqlite_writer`], its own thread) is the only one that writes:
//!   events being ingested, claims, outcomes and leases are committed together, as many as are
//!   waiting, in one transaction (group commit). An event is on disk before the ingest call
//!   answers (its commit is synced, after the write lock is released, by one sync for every
//!   event waiting), so neither a killed process nor a power loss loses an accepted event;
//!   claims and outcomes are answered without waiting for a sync — WAL mode keeps them across a
//!   killed process, and what a power loss forgets runs again, which the at-least-once contract
//!   already allows;
//! - the **reader** serves the API's and the dispatcher's reads; in WAL mode it never waits for
//!   the writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use super::clock::{QueueClock, step_between};
use super::interface::{
    ABANDONED_REASON, Answer, AttemptRecord, AttemptView, AwaitedWrites, Claim, ClaimLimits,
    DeliveryState, DeliveryView, EventStore, EventView, FailedDelivery, FailedFilter, Finish,
    INTERRUPTED_CLASS, Idempotency, Inserted, MAX_FAILED_PAGE, MAX_PURGE_BATCH, MAX_RETRY_BATCH,
    NewEvent, PurgePosition, PurgeRound, RELEASED_REASON, StoreError, after, capped, from_ms,
    purge_batch, to_ms, unreadable_context, walk_start,
};
use super::sqlite_writer::{DAMAGED_ADVICE, Durability, Grouping, Write, Writer, classify};
use crate::context::JobContext;

/// How long a writer waits for a lock held by another connection (e.g. an operator's
/// `sqlite3` shell) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between two attempts to take a lock that another connection holds (an operator's
/// `sqlite3` shell; a checkpoint). SQLite's built-in busy handler backs off in steps of 1, 2, 5,
/// 10 … 100 ms, so a commit that met a lock a few times in a row waited tens of milliseconds
/// for a lock that was free again after a few microseconds (measured: ingest p99 93 ms at 1,000
/// events/s when two connections wrote, see docs/PERFORMANCE.md). Retrying at a short, fixed
/// pause keeps that wait near the lock's real hold time.
const BUSY_RETRY_PAUSE: Duration = Duration::from_micros(100);

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "jobhook.sqlite";

/// The schema, applied in order; `PRAGMA user_version` records how many have run. The second
/// adds the per-handler index that claims use (see [`SqliteStore::claim_batch`]); the third the
/// idempotency keys of ingest ([`EventStore::insert_event_once`]): one row per key, the primary key
/// is what makes a key's event unique, `created_at` what the purge walks; the fourth Keyfactor's
/// message about the job ([`NewEvent::message`]); the fifth drops `deliveries_due`, which the
/// per-handler index serves as well ([`NEXT_DUE`]): one index fewer to update on each insert,
/// claim and outcome; the sixth indexes events by receipt time, which retention walks from its
/// oldest end ([`EVENTS_TO_PURGE`]) instead of reading the whole table every round.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
    source      TEXT NOT NULL,
    context     TEXT NOT NULL
);
CREATE TABLE deliveries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT NOT NULL REFERENCES events(id),
    handler       TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    not_before    INTEGER NOT NULL,
    started_at    INTEGER,
    owner         TEXT,
    lease_until   INTEGER,
    finished_at   INTEGER,
    duration_ms   REAL,
    outcome_class TEXT,
    reason        TEXT,
    outcome       TEXT,
    UNIQUE (event_id, handler)
);
CREATE INDEX deliveries_due ON deliveries (state, not_before, id);
CREATE TABLE attempts (
    delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    attempt     INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER NOT NULL,
    class       TEXT NOT NULL,
    reason      TEXT,
    terminal    INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE TABLE cursors (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    "CREATE INDEX deliveries_handler_due ON deliveries (state, handler, not_before, id);",
    r#"
CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
"#,
    "ALTER TABLE events ADD COLUMN message TEXT;",
    "DROP INDEX deliveries_due;",
    "CREATE INDEX events_received ON events (received_at);",
];

/// The next `?2` events received before `?1`, after (`?3`, `?4`) (receipt time, row number),
/// oldest first, each with whether it is finished: every delivery terminal, or none at all. A
/// range of `events_received`, whose entries hold the row number after the time (so the order
/// needs no sort); the check of each event's deliveries seeks their `(event_id, handler)` index.
const EVENTS_TO_PURGE: &str = "
    SELECT id, received_at, rowid,
           NOT EXISTS (SELECT 1 FROM deliveries d
                       WHERE d.event_id = e.id AND d.state IN ('pending', 'running'))
    FROM events e
    WHERE received_at < ?1 AND (received_at, rowid) > (?3, ?4)
    ORDER BY received_at, rowid
    LIMIT ?2";

/// A row number as a walk's tiebreak ([`PurgePosition`]): in the same order, from 0.
fn rowid_tiebreak(rowid: i64) -> u128 {
    u128::try_from(i128::from(rowid) - i128::from(i64::MIN)).unwrap_or(0)
}

/// The row number of a walk's tiebreak ([`rowid_tiebreak`]).
fn tiebreak_rowid(tiebreak: u128) -> i64 {
    i128::try_from(tiebreak)
        .ok()
        .and_then(|t| i64::try_from(t + i128::from(i64::MIN)).ok())
        .unwrap_or(i64::MAX)
}

/// Failed deliveries that `?1` (handler), `?2` (event) and `?3` (an id above every one
/// chosen) select when not null, newest first, at most `?4`. The handler's part of
/// `deliveries_handler_due` (`state, handler, ...`) or the event's (`UNIQUE (event_id,
/// handler)`) serves it; without either, the failed part of the first.
macro_rules! failed_where {
    () => {
        "state = 'failed' AND (?1 IS NULL OR handler = ?1) AND (?2 IS NULL OR event_id = ?2)
         AND (?3 IS NULL OR id < ?3)"
    };
}

/// The list of failed deliveries ([`EventStore::failed_deliveries`]).
const FAILED: &str = concat!(
    "SELECT id, event_id, handler, attempt, finished_at, outcome_class, reason
     FROM deliveries WHERE ",
    failed_where!(),
    " ORDER BY id DESC LIMIT ?4"
);

/// Failed deliveries made pending again, due at `?5` ([`EventStore::retry_failed`]). The
/// writer runs every write in turn, so a retention purge either deleted the event first or
/// finds a pending delivery and keeps it.
const RETRY_FAILED: &str = concat!(
    "UPDATE deliveries SET state = 'pending', not_before = ?5, owner = NULL, lease_until = NULL
     WHERE id IN (SELECT id FROM deliveries WHERE ",
    failed_where!(),
    " ORDER BY id DESC LIMIT ?4)
     RETURNING id"
);

/// The attempts of one event's deliveries ([`EventStore::purge_finished`]): children first, so
/// that the foreign keys hold at every statement.
const DELETE_ATTEMPTS_OF_EVENT: &str =
    "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_id = ?1)";

/// One event's deliveries, after their attempts.
const DELETE_DELIVERIES_OF_EVENT: &str = "DELETE FROM deliveries WHERE event_id = ?1";

/// One event, after its deliveries.
const DELETE_EVENT: &str = "DELETE FROM events WHERE id = ?1";

/// Takes an idempotency key for a new event, or takes over one that has outlived its retention
/// (`?5` is the cutoff). Changes no row when the key is held.
const CLAIM_KEY: &str = "
    INSERT INTO idempotency_keys (key, event_id, fingerprint, created_at) VALUES (?1, ?2, ?3, ?4)
    ON CONFLICT (key) DO UPDATE SET event_id = excluded.event_id,
        fingerprint = excluded.fingerprint, created_at = excluded.created_at
    WHERE idempotency_keys.created_at < ?5";

/// Inserts or replaces a row of `cursors`.
const UPSERT_CURSOR: &str = "INSERT INTO cursors (name, value) VALUES (?1, ?2)
     ON CONFLICT (name) DO UPDATE SET value = excluded.value";

/// The `cursors` row that holds the queue's time as last recorded (milliseconds), every third of
/// the lease: a store opened on a system clock behind it was stepped back while no engine ran.
const CLOCK_MARK: &str = "queue-clock";

/// `step` in the whole milliseconds the schedule is kept in, rounded down, so that no wait comes
/// out of a move longer than it went in.
fn whole_ms_down(step: TimeDelta) -> i64 {
    let whole = step.num_milliseconds();
    if TimeDelta::milliseconds(whole) > step {
        whole.saturating_sub(1)
    } else {
        whole
    }
}

/// Moves every due time, lease and idempotency key by `step` inside `tx`, and records
/// `reference` as the queue's time.
fn move_schedule(
    tx: &Connection,
    step: TimeDelta,
    reference: DateTime<Utc>,
) -> rusqlite::Result<()> {
    let by = whole_ms_down(step);
    for moved in [
        "UPDATE deliveries SET not_before = not_before + ?1 WHERE state = 'pending'",
        "UPDATE deliveries SET lease_until = lease_until + ?1 WHERE state = 'running'",
        "UPDATE idempotency_keys SET created_at = created_at + ?1",
    ] {
        tx.execute(moved, params![by])?;
    }
    tx.execute(
        UPSERT_CURSOR,
        params![CLOCK_MARK, to_ms(reference).to_string()],
    )?;
    Ok(())
}

/// The value of `cursors` row `name`, if there is one.
fn read_cursor(conn: &Connection, name: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT value FROM cursors WHERE name = ?1",
        params![name],
        |r| r.get(0),
    )
    .optional()
}

/// At open: when the system clock is behind the queue's time as last recorded, it was stepped
/// back while no engine ran (time that passed cannot be told from a step forwards, and needs
/// nothing: what was due is due). Moves the schedule back by as much, so a retry is not held
/// back by the step; answers the step.
fn catch_up_with_clock(conn: &mut Connection) -> rusqlite::Result<Option<TimeDelta>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // A mark that is not a number (edited by hand) is no evidence of a step.
    let Some(mark) = read_cursor(&tx, CLOCK_MARK)?.and_then(|m| m.parse::<i64>().ok()) else {
        return Ok(None);
    };
    let reference = Utc::now();
    let Some(step) = step_between(from_ms(mark), reference).filter(|s| *s < TimeDelta::zero())
    else {
        return Ok(None);
    };
    move_schedule(&tx, step, reference)?;
    tx.commit()?;
    Ok(Some(step))
}

/// The handlers that have pending deliveries, one index seek per handler (a loose index scan
/// of `deliveries_handler_due`) instead of a scan of every pending delivery.
macro_rules! pending_handlers {
    () => {
        "WITH RECURSIVE pending(handler) AS (
            SELECT MIN(handler) FROM deliveries WHERE state = 'pending'
            UNION ALL
            SELECT (SELECT MIN(handler) FROM deliveries
                    WHERE state = 'pending' AND handler > pending.handler)
            FROM pending WHERE pending.handler IS NOT NULL
        )"
    };
}

/// See [`pending_handlers`].
const PENDING_HANDLERS: &str = concat!(
    pending_handlers!(),
    " SELECT handler FROM pending WHERE handler IS NOT NULL"
);

/// Each pending handler and the earliest time one of its deliveries is due, one index seek
/// each, from the same index as claims ([`EventStore::next_due`] keeps those a claim could take).
const NEXT_DUE: &str = concat!(
    pending_handlers!(),
    " SELECT handler, (SELECT MIN(d.not_before) FROM deliveries d
                       WHERE d.state = 'pending' AND d.handler = pending.handler)
      FROM pending WHERE handler IS NOT NULL"
);

/// The oldest due pending deliveries of one handler (their contexts are read only for the ones
/// chosen).
const DUE_OF_HANDLER: &str = "
    SELECT d.id, d.event_id, d.handler, d.attempt, d.not_before
    FROM deliveries d
    WHERE d.state = 'pending' AND d.handler = ?1 AND d.not_before <= ?2
    ORDER BY d.not_before, d.id LIMIT ?3";

/// The SQLite implementation of [`EventStore`].
///
/// SQLite serves one engine process (`serve` holds the data directory's lock:
/// [`SqliteStore::open_exclusive`]): the claims of any earlier process are abandoned by
/// definition, so [`EventStore::requeue_abandoned`] requeues them regardless of their lease.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    node: String,
    /// The queue's time, shared with the writer's writes.
    clock: Arc<QueueClock>,
    /// The reader: reads only.
    conn: Mutex<Connection>,
    /// The one write path.
    writer: Writer,
    /// The data directory's lock ([`SqliteStore::open_exclusive`]), held while the store is open.
    /// Declared last, so dropped last: the connections and the writer go first.
    _lock: Option<std::fs::File>,
}

fn db(e: rusqlite::Error) -> StoreError {
    classify(&e)
}

impl SqliteStore {
    /// Opens the store as [`SqliteStore::open`] does, once this process holds the data
    /// directory's lock ([`lock_data_dir`]; its id in [`PID_FILE`]), which it keeps until the
    /// store is dropped (or the process ends, however it ends: the kernel releases it). A second engine on the same data
    /// directory is refused, naming the first one's process: two would each lead the poller and
    /// a stopping one would hand back the other's running deliveries. `serve` opens its store
    /// this way; tests open one database from two stores on purpose, as two processes would.
    pub fn open_exclusive(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, true)
    }

    /// Opens (creating if needed) the database in `data_dir` and applies migrations. One process
    /// at a time: see [`SqliteStore::open_exclusive`].
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, false)
    }

    /// [`SqliteStore::open`], holding the data directory's lock first when `exclusive`.
    fn open_with(data_dir: &Path, exclusive: bool) -> Result<Self, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: data_dir.display().to_string(),
            message,
        };
        crate::files::create_private_dir(data_dir)
            .map_err(|e| open_error(format!("cannot create the data directory: {e}")))?;
        // Said here, in the system's words (a read-only mount, permissions): SQLite would say
        // only "unable to open database file".
        crate::files::writable(data_dir)
            .map_err(|e| open_error(format!("the data directory is not writable ({e})")))?;
        let lock = if exclusive {
            if let Some(exposed) = exposure(data_dir) {
                tracing::warn!("{exposed}");
            }
            Some(lock_data_dir(data_dir).map_err(open_error)?)
        } else {
            None
        };
        // Said here, naming the file: SQLite would say only "attempt to write a readonly
        // database" or "unable to open database file".
        if let Some(problem) = store_files_problem(data_dir) {
            return Err(open_error(problem));
        }
        let path = data_dir.join(DATABASE_FILE);
        create_private_database(&path)
            .map_err(|e| open_error(format!("cannot create {}: {e}", path.display())))?;
        // A database that is there is looked at first on a connection that changes nothing:
        // `connect` turns on WAL mode, which is written into the file, and a file that is not
        // this jobhook's (another program's, a newer jobhook's, a damaged one) is left as it was.
        if path.exists() {
            let plain = Connection::open(&path).map_err(|e| open_error(explained(e)))?;
            plain
                .busy_timeout(BUSY_TIMEOUT)
                .map_err(|e| open_error(e.to_string()))?;
            schema_applied(&plain).map_err(open_error)?;
        }
        let mut conn = connect(&path, "NORMAL").map_err(|e| open_error(explained(e)))?;
        migrate(&mut conn).map_err(open_error)?;
        if let Some(step) = catch_up_with_clock(&mut conn).map_err(|e| open_error(e.to_string()))? {
            tracing::warn!(
                step_ms = step.num_milliseconds(),
                "the system clock is {:.3} s behind the time this store last recorded: it was \
                 stepped back while the engine was stopped; due times, leases and idempotency \
                 keys were moved back with it",
                -(step.num_milliseconds() as f64) / 1000.0
            );
        }
        // NORMAL: what must be durable is synced by the writer's syncer (see sqlite_writer).
        let writes = connect(&path, "NORMAL").map_err(|e| open_error(e.to_string()))?;
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        let checkpoints = connect(&path, "NORMAL").map_err(|e| open_error(e.to_string()))?;
        let writer = Writer::start(writes, PathBuf::from(wal), checkpoints)
            .map_err(|e| open_error(e.to_string()))?;
        Ok(SqliteStore {
            path,
            _lock: lock,
            node: Uuid::new_v4().to_string(),
            clock: Arc::new(QueueClock::new(Utc::now())),
            conn: Mutex::new(conn),
            writer,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits `events` (and `cursor`; with `key`, only if the key is free, and then exactly
    /// one event) through the writer, synced before it answers.
    fn write(
        &self,
        events: &[NewEvent],
        cursor: Option<(String, String)>,
        key: Option<Idempotency>,
    ) -> Result<Inserted, StoreError> {
        self.writer
            .write(Durability::Durable, self.insert_work(events, cursor, key))
    }

    /// The write of [`SqliteStore::write`]. Its rows are made ready here (ids formatted,
    /// contexts serialised), not in the writer, whose thread every write waits for.
    fn insert_work(
        &self,
        events: &[NewEvent],
        cursor: Option<(String, String)>,
        key: Option<Idempotency>,
    ) -> impl FnOnce(&Connection) -> Result<Inserted, StoreError> + Send + 'static {
        let clock = Arc::clone(&self.clock);
        let events: Vec<EventRows> = events.iter().map(EventRows::of).collect();
        move |tx| {
            // Read in the writer: a clock step's move of the schedule is a write of its own
            // there, so these rows are either moved with the rest or written after it.
            let now = to_ms(clock.now());
            if let Some(key) = &key {
                let event_id = events.first().map_or("", |e| e.id.as_str());
                if let Some(held) = claim_key(tx, key, event_id, now)? {
                    return held;
                }
            }
            for event in &events {
                insert_event_tx(tx, event, now).map_err(db)?;
            }
            if let Some((name, value)) = &cursor {
                tx.execute(UPSERT_CURSOR, params![name, value])
                    .map_err(db)?;
            }
            Ok(Inserted::New)
        }
    }

    /// The write of a claim batch (see [`EventStore::claim_batch`]); its rows are decoded by
    /// [`decode_claims`] once it is answered.
    fn claim_work(
        &self,
        now: DateTime<Utc>,
        limits: &ClaimLimits,
        lease: Duration,
    ) -> impl FnOnce(&Connection) -> Result<ClaimedRows, StoreError> + Send + 'static {
        let limits = limits.clone();
        let node = self.node.clone();
        let lease_until = to_ms(after(now, lease));
        let now = to_ms(now);
        move |tx| claim_rows(tx, now, &limits, lease_until, &node)
    }

    /// The write of [`EventStore::finish_batch`]. Everything but the time is made ready here,
    /// not in the writer, whose thread every write waits for.
    fn finish_work(
        &self,
        finished: &[(&Claim, &AttemptRecord)],
    ) -> Result<
        impl FnOnce(&Connection) -> Result<Vec<Finish>, StoreError> + Send + 'static,
        StoreError,
    > {
        for (_, record) in finished {
            record.check()?;
        }
        let rows: Vec<FinishRow> = finished
            .iter()
            .map(|(claim, record)| FinishRow {
                delivery_id: claim.delivery_id,
                attempt: claim.attempt,
                state: record.state.as_str(),
                terminal: record.state.is_terminal(),
                retry_at: record.retry_at.map(to_ms),
                finished_at: to_ms(record.finished_at),
                duration_ms: record.duration_ms(),
                class: record.class.clone(),
                reason: record.reason.clone(),
                outcome: record
                    .outcome
                    .as_ref()
                    .and_then(|o| serde_json::to_string(o).ok()),
            })
            .collect();
        let clock = Arc::clone(&self.clock);
        let node = self.node.clone();
        Ok(move |tx: &Connection| finish_rows(tx, to_ms(clock.now()), &rows, &node))
    }

    /// Puts the deliveries `which` selects (`?1` is this node) back in the queue, recording
    /// their interrupted attempts with `reason` at `now` — or, with `None`, at the queue's time
    /// read in the writer, as outcomes are — in one transaction.
    fn requeue(
        &self,
        which: &'static str,
        now: Option<i64>,
        reason: &'static str,
    ) -> Result<u64, StoreError> {
        let node = self.node.clone();
        let clock = Arc::clone(&self.clock);
        self.writer.write(Durability::Normal, move |tx| {
            let now = now.unwrap_or_else(|| to_ms(clock.now()));
            tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO attempts
                         (delivery_id, attempt, started_at, finished_at, class, reason, terminal)
                     SELECT id, attempt, started_at, ?2, ?3, ?4, 0 FROM deliveries WHERE {which}"
                ),
                params![node, now, INTERRUPTED_CLASS, reason],
            )
            .map_err(db)?;
            let n = tx
                .execute(
                    &format!(
                        "UPDATE deliveries SET state = 'pending', owner = NULL, lease_until = NULL
                         WHERE {which}"
                    ),
                    params![node],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written transaction behind (an
        // uncommitted transaction is rolled back when dropped), so the connection stays usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn connect(path: &Path, synchronous: &str) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_handler(Some(busy_wait))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Plans fixed at prepare time: otherwise SQLite prepares a statement again whenever a
    // bound value could change its plan, which the per-handler claim query ([`DUE_OF_HANDLER`])
    // did on every run (SQLite's own counter: over 6,000 times in a 10 s run at 1,000 events/s
    // × 4; a tenth of the writer thread's profile). The plans do not depend on the values: no
    // statistics are collected.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(conn)
}

/// The busy handler of both connections: waits [`BUSY_RETRY_PAUSE`] and tries again, for up to
/// [`BUSY_TIMEOUT`] in all (SQLite counts the attempts for each lock anew).
fn busy_wait(attempt: i32) -> bool {
    let max_attempts = BUSY_TIMEOUT.as_micros() / BUSY_RETRY_PAUSE.as_micros();
    if u128::try_from(attempt).unwrap_or(u128::MAX) >= max_attempts {
        return false;
    }
    std::thread::sleep(BUSY_RETRY_PAUSE);
    true
}

/// Takes `key` for `event_id` inside the write transaction. `None`: taken, go on and insert the
/// event. `Some(answer)`: the key is held by an earlier event within its retention, and
/// `answer` is that event (same fingerprint) or the conflict (another one).
///
/// The writer is the only connection that writes, and it holds the write lock for the whole
/// transaction: there is no window between the check and the insert.
fn claim_key(
    tx: &Connection,
    key: &Idempotency,
    event_id: &str,
    now: i64,
) -> Result<Option<Result<Inserted, StoreError>>, StoreError> {
    let retention = i64::try_from(key.retention.as_millis()).unwrap_or(i64::MAX);
    let cutoff = now.saturating_sub(retention);
    let taken = tx
        .prepare_cached(CLAIM_KEY)
        .map_err(db)?
        .execute(params![key.key, event_id, key.fingerprint, now, cutoff])
        .map_err(db)?;
    if taken == 1 {
        return Ok(None);
    }
    let (held_by, fingerprint): (String, String) = tx
        .prepare_cached("SELECT event_id, fingerprint FROM idempotency_keys WHERE key = ?1")
        .map_err(db)?
        .query_row(params![key.key], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db)?;
    let original = Uuid::parse_str(&held_by)
        .map_err(|e| StoreError::Corrupt(format!("idempotency key event id {held_by}: {e}")))?;
    if fingerprint != key.fingerprint {
        return Ok(Some(Err(StoreError::IdempotencyConflict {
            event_id: original,
        })));
    }
    let handlers = tx
        .prepare_cached("SELECT handler FROM deliveries WHERE event_id = ?1 ORDER BY id")
        .map_err(db)?
        .query_map(params![held_by], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(Some(Ok(Inserted::Existing {
        event_id: original,
        handlers,
    })))
}

/// Makes the database file at `path`, empty (which SQLite takes as a new database), readable
/// and writable by the engine's user only, unless it exists. SQLite would make it by the
/// process's umask (`0644` under the usual `022`) and its `-wal` and `-shm` with the same mode:
/// readable by every user of the machine in a data directory that is not private (one the
/// operator made; jobhook warns of it), though the store holds every job context, as the
/// backups do that are made `0600` for that reason.
fn create_private_database(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The files SQLite keeps beside [`DATABASE_FILE`] while the store is open: the write-ahead
/// log and its shared-memory index. An engine that ends without closing the store (killed, a
/// crash, a power cut) leaves them, and the next start opens them.
const DATABASE_COMPANIONS: [&str; 2] = ["-wal", "-shm"];

/// The first of the store's files in `data_dir` ([`DATABASE_FILE`] and its
/// [`DATABASE_COMPANIONS`]) that this process may not read and write, in words that name the
/// file, its owner and mode, and what to do; `None` when all that exist may be (SQLite makes
/// those that do not). SQLite itself says only "attempt to write a readonly database" or
/// "unable to open database file", without a path. The usual cause: the engine was run once as
/// another user (root, by hand), whose files it left, and the service runs as its own.
#[cfg(unix)]
fn store_files_problem(data_dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let names = std::iter::once(DATABASE_FILE.to_owned()).chain(
        DATABASE_COMPANIONS
            .iter()
            .map(|suffix| format!("{DATABASE_FILE}{suffix}")),
    );
    for name in names {
        let path = data_dir.join(name);
        // A file that is not there is made by SQLite, in a directory checked writable.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            return Some(format!(
                "{} is {}, not the store's file: move it out of the data directory",
                path.display(),
                crate::files::describe(&meta.file_type())
            ));
        }
        if let Err(e) = crate::files::read_writable(&path) {
            return Some(format!(
                "{} belongs to uid {} and has mode {:03o}: this user (uid {}) may not read and \
                 write it ({e}). The store's files must be the engine's user's: `chown` the data \
                 directory and everything in it to that user (an engine run once as another \
                 user, root say, leaves its files behind), or run the engine as their owner",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777,
                crate::files::engine_uid()
            ));
        }
    }
    None
}

/// See the Unix version: other systems' permissions are not modes.
#[cfg(not(unix))]
fn store_files_problem(_data_dir: &Path) -> Option<String> {
    None
}

/// What to tell the operator when `data_dir` lets other users read or enter it, or change it:
/// the store in it holds job contexts and handlers' log lines. A warning, not a refusal: the
/// operator may have meant it (a backup agent's group); `serve` says it at every start.
#[cfg(unix)]
fn exposure(data_dir: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(data_dir).ok()?.permissions().mode() & 0o777;
    (mode & !crate::files::PRIVATE_DIR_MODE != 0).then(|| {
        format!(
            "the data directory {} has mode {mode:03o}: other users can reach the store's job \
             contexts and handlers' log lines; `chmod 700` it (jobhook makes a new one so)",
            data_dir.display()
        )
    })
}

/// See the Unix version: other systems' permissions are not modes.
#[cfg(not(unix))]
fn exposure(_data_dir: &Path) -> Option<String> {
    None
}

/// The file in the data directory that names the process holding the directory's lock, for the
/// message another engine gets. Only a message: the lock is on the directory itself, so removing
/// or replacing this file releases nothing.
pub const PID_FILE: &str = "jobhook.pid";

/// Most bytes of [`PID_FILE`] read for the holder's process id (a number and a line end).
const MAX_PID_FILE_READ: u64 = 32;

/// Takes the lock on the directory `data_dir` itself (without waiting; the kernel drops it when
/// the process ends) and writes this process's id into its [`PID_FILE`]; or says which process
/// holds it and what to do. The directory, not a file in it, is locked: a lock file could be
/// removed or renamed while an engine runs, and the next engine would lock a new one.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, String> {
    let shown = data_dir.display();
    let dir = std::fs::File::open(data_dir)
        .map_err(|e| format!("cannot open the data directory to lock it: {e}"))?;
    match dir.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = read_pid(&data_dir.join(PID_FILE))
                .map(|pid| format!("process {pid}"))
                .unwrap_or_else(|| "another process".to_owned());
            return Err(format!(
                "another jobhook ({holder}) is using this data directory (it holds the \
                 directory's lock); one engine per SQLite store: stop that one first, or give \
                 this one another [store] data_dir (several engines share a store on PostgreSQL)"
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock the data directory {shown}: {e}"));
        }
    }
    if let Err(e) = write_pid(&data_dir.join(PID_FILE)) {
        tracing::warn!(
            "cannot write this process's id into {}: {e} (another engine's refusal will not \
             name this process)",
            data_dir.join(PID_FILE).display()
        );
    }
    Ok(dir)
}

/// Opens `path` for [`read_pid`] or [`write_pid`]: never through a symbolic link, never waiting
/// (a FIFO), and only if it is a regular file with one name that this user owns — anyone able
/// to plant a link or a hard link there gets nothing truncated or written through it.
fn open_pid_file(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(!write).write(write).create(write);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NOFOLLOW | libc::O_NONBLOCK,
    );
    let file = options.open(path)?;
    let meta = file.metadata()?;
    #[cfg(unix)]
    let ours = {
        use std::os::unix::fs::MetadataExt as _;
        meta.nlink() == 1 && meta.uid() == crate::files::engine_uid()
    };
    #[cfg(not(unix))]
    let ours = true;
    if !meta.is_file() || !ours {
        return Err(std::io::Error::other(
            "it is not a regular file of this user's with one name; remove it",
        ));
    }
    Ok(file)
}

/// The process id in `path`, if it holds one.
fn read_pid(path: &Path) -> Option<u32> {
    use std::io::Read as _;
    let mut text = String::new();
    open_pid_file(path, false)
        .ok()?
        .take(MAX_PID_FILE_READ)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

/// Writes this process's id into `path` (made if missing).
fn write_pid(path: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = open_pid_file(path, true)?;
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())
}

/// What [`backup`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// Events in the copy.
    pub events: u64,
    /// Deliveries in the copy not yet finished (pending or running when it was taken).
    pub unfinished: u64,
    /// The copy's size in bytes.
    pub bytes: u64,
}

/// Most lines of `PRAGMA quick_check` quoted when a copy is damaged: the first few say what is
/// wrong; all of them can be thousands.
const QUICK_CHECK_LINES: u32 = 5;

/// Why a backup was not written: the store could not be read or copied, or the backup could
/// not be written where it was asked for — told apart, so that a destination that cannot be
/// created is not reported as a store that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store (`cannot open the store at …`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The destination: where, and what is in the way.
    #[error("cannot write the backup to {path}: {message}")]
    Destination {
        /// The backup's path as given.
        path: String,
        /// What is in the way, and what to do.
        message: String,
    },
}

/// What stands in the way of creating the new file `to`, from the error creating it: the
/// directory it would be in does not exist, or what is already there — a directory, a file, a
/// device, a symbolic link (a backup is never written over or through any of them) — or the
/// system's own words.
fn destination_problem(to: &Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::AlreadyExists => match std::fs::symlink_metadata(to) {
            Ok(meta) if meta.file_type().is_symlink() => "it is a symbolic link; a backup is \
                never written through one: give the path of a new file"
                .to_owned(),
            Ok(meta) if meta.is_dir() => {
                "it is a directory; give the path of a new file in it".to_owned()
            }
            Ok(meta) if meta.is_file() => "a file of that name exists; a backup is never \
                written over one: give a new name"
                .to_owned(),
            Ok(meta) => format!(
                "it is {}; give the path of a new file",
                crate::files::describe(&meta.file_type())
            ),
            Err(_) => "something of that name exists; a backup is never written over it: give a \
                 new name"
                .to_owned(),
        },
        ErrorKind::NotFound => match to.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            Some(dir) => format!(
                "the directory {} does not exist; create it, or give a path in a directory that \
                 exists",
                dir.display()
            ),
            None => e.to_string(),
        },
        ErrorKind::PermissionDenied => {
            format!("{e}; give a path in a directory this user may create files in")
        }
        _ => e.to_string(),
    }
}

/// Copies the store in `data_dir` to the new file `to`, consistently, while an engine may be
/// using it (`VACUUM INTO` on a read-only connection: one read transaction, so the copy is the
/// store as of one moment, and the engine's writes go on meanwhile), then checks the copy
/// (`PRAGMA quick_check`, jobhook's schema) before saying it is good. `to` must not exist; it is
/// made readable by its owner only (it holds every stored job context). Restoring is copying it
/// back as `<data_dir>/jobhook.sqlite` while no engine runs (docs/OPERATIONS.md).
///
/// The copy is written under a name of its own in `to`'s directory ([`partial_name`]), and
/// given the name `to` only once it is checked and on disk: a backup killed part-way (SIGKILL,
/// an OOM kill, a cron job's `timeout`, a reboot) leaves no file under `to` — a partial file
/// there, once opened by any SQLite tool, became an empty but valid store that a restore
/// started an empty engine from. A copy that fails its check, or fails part-way while the
/// process lives, is removed.
pub fn backup(data_dir: &Path, to: &Path) -> Result<BackupReport, BackupError> {
    let source = data_dir.join(DATABASE_FILE);
    let open_error = |message: String| StoreError::Open {
        path: source.display().to_string(),
        message,
    };
    if !source.is_file() {
        return Err(open_error(format!(
            "there is no {DATABASE_FILE} in the data directory: is [store] data_dir the one the \
             engine uses?"
        ))
        .into());
    }
    let destination = |message: String| BackupError::Destination {
        path: to.display().to_string(),
        message,
    };
    if to.to_str().is_none() {
        return Err(destination(
            "the path is not UTF-8, which SQLite needs; give another".to_owned(),
        ));
    }
    // Said before anything is copied; the final link refuses it again if it appears meanwhile.
    if std::fs::symlink_metadata(to).is_ok() {
        let exists = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
        return Err(destination(destination_problem(to, &exists)));
    }
    let partial = partial_name(to)
        .ok_or_else(|| destination("it names no file; give the path of a new file".to_owned()))?;
    let target = partial.to_str().ok_or_else(|| {
        destination("the path is not UTF-8, which SQLite needs; give another".to_owned())
    })?;
    let mut conn = Connection::open_with_flags(&source, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| open_error(explained(e)))?;
    conn.busy_handler(Some(busy_wait))
        .map_err(|e| open_error(e.to_string()))?;
    schema_applied(&conn).map_err(open_error)?;
    // Made first, empty and private: VACUUM INTO writes into an empty file as it finds it.
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| destination(destination_problem(to, &e)))?;
    }
    let copied = conn
        .execute("VACUUM INTO ?1", [target])
        .map_err(|e| match e.sqlite_error_code() {
            // The copy is what is written: the disk that is full is the backup's.
            Some(rusqlite::ErrorCode::DiskFull) => destination(format!(
                "the disk it is on is full ({e}); free space there, or give a path on another \
                 disk"
            )),
            _ => open_error(format!("cannot copy the store: {}", explained(e))).into(),
        })
        .and_then(|_| check_copy(&partial).map_err(|e| open_error(e).into()))
        .and_then(|report| {
            put_in_place(&partial, to).map_err(destination)?;
            Ok(report)
        });
    // Gone once it has its name, or when anything failed.
    let _ = std::fs::remove_file(&partial);
    copied
}

/// Where [`backup`] writes the copy of `to` until it is checked: a hidden name in the same
/// directory (so that it becomes `to` by a link within one file system), with a random part
/// (so that two backups to one name, or a partial file a killed one left, never meet) and an
/// ending that says what it is: `.<name>.<random>.partial`. `None` when `to` names no file.
fn partial_name(to: &Path) -> Option<PathBuf> {
    let name = to.file_name()?.to_str()?;
    let random = Uuid::new_v4().simple().to_string();
    let random = random.get(..12).unwrap_or(&random);
    Some(to.with_file_name(format!(".{name}.{random}.partial")))
}

/// Gives the checked copy at `partial` the name `to`, durably: its content is flushed to disk
/// first, then it is linked as `to` (which, unlike a rename, never replaces a file made under
/// that name meanwhile), then the directory is flushed so that the name survives a power cut.
/// Where the file system has no hard links, a rename does, after one more look that `to` is
/// free. The caller removes `partial`.
fn put_in_place(partial: &Path, to: &Path) -> Result<(), String> {
    std::fs::File::open(partial)
        .and_then(|file| file.sync_all())
        .map_err(|e| format!("cannot flush the copy to disk: {e}"))?;
    match std::fs::hard_link(partial, to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(destination_problem(to, &e));
        }
        Err(_) if std::fs::symlink_metadata(to).is_err() => std::fs::rename(partial, to)
            .map_err(|e| format!("cannot give the checked copy its name: {e}"))?,
        Err(e) => return Err(destination_problem(to, &e)),
    }
    let dir = to
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // The backup is whole under its name by now: a directory that cannot be flushed (some
    // file systems refuse it) is told, not made a failure of a good backup.
    if let Err(e) = std::fs::File::open(dir).and_then(|dir| dir.sync_all()) {
        tracing::warn!(
            "the backup {} is written and checked, but its directory could not be flushed to \
             disk ({e}): a power cut soon could lose its name; run `sync` to be sure",
            to.display()
        );
    }
    Ok(())
}

/// Checks a copy [`backup`] made: SQLite's `quick_check`, jobhook's schema, and what it holds.
fn check_copy(path: &Path) -> Result<BackupReport, String> {
    let copy = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(explained)?;
    let mut problems: Vec<String> = copy
        .prepare(&format!("PRAGMA quick_check({QUICK_CHECK_LINES})"))
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(explained)?;
    if problems != ["ok"] {
        problems.truncate(QUICK_CHECK_LINES as usize);
        let said: Vec<String> = problems
            .iter()
            .map(|p| crate::escape::escape(p).into_owned())
            .collect();
        return Err(format!(
            "the copy fails SQLite's quick_check ({}); the store itself is damaged: {}",
            said.join("; "),
            DAMAGED_ADVICE
        ));
    }
    schema_applied(&copy)?;
    let count = |sql: &str| -> Result<u64, String> {
        copy.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or_default())
            .map_err(explained)
    };
    Ok(BackupReport {
        events: count("SELECT COUNT(*) FROM events")?,
        unfinished: count("SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'running')")?,
        bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or_default(),
    })
}

/// An error met opening the database, with what to do when the file is not a database or is
/// damaged (SQLite says only "file is not a database" or "database disk image is malformed").
fn explained(e: rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            format!(
                "{e}: {DATABASE_FILE} in [store] data_dir is damaged or is not jobhook's \
                 database; {DAMAGED_ADVICE}"
            )
        }
        _ => e.to_string(),
    }
}

/// Brings the database's schema to [`MIGRATIONS`]' newest, or says why it will not: a schema
/// newer than this build knows was made by a newer jobhook (this one could misread what that
/// one changed, so it is not opened: the events in it wait for a jobhook that knows it), and
/// tables without a jobhook schema version are another program's database.
fn migrate(conn: &mut Connection) -> Result<(), String> {
    let applied = schema_applied(conn)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let mut apply = || -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", index as i64 + 1)?;
            tx.commit()
        };
        apply().map_err(explained)?;
        // As the PostgreSQL store says it: an upgrade shows what it changed in the database.
        tracing::info!(version = index + 1, "store schema migration applied");
    }
    Ok(())
}

/// How many of [`MIGRATIONS`] the database has, or why it is not a store this jobhook may open
/// (see [`migrate`]). Only reads.
fn schema_applied(conn: &Connection) -> Result<usize, String> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(explained)?;
    let known = MIGRATIONS.len();
    let not_ours = "it is not jobhook's store: give [store] data_dir a directory of its own";
    let applied = usize::try_from(version).map_err(|_| {
        format!(
            "the database's schema version is {version}, which jobhook never writes; {not_ours}"
        )
    })?;
    if applied > known {
        return Err(format!(
            "the database schema is at version {applied}, newer than this jobhook knows \
             ({known}): a newer jobhook made it; run that version (or a newer one) on this data \
             directory, or give this one another [store] data_dir"
        ));
    }
    if applied == 0 {
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(explained)?;
        if tables > 0 {
            return Err(format!(
                "the database has {tables} table(s) but no jobhook schema version; {not_ours}"
            ));
        }
    }
    Ok(applied)
}

/// An event's row and its deliveries', made ready to insert (what the writer needs of a
/// [`NewEvent`], its id formatted once and its context serialised).
struct EventRows {
    id: String,
    source: String,
    context: String,
    message: Option<String>,
    handlers: Vec<String>,
}

impl EventRows {
    fn of(event: &NewEvent) -> Self {
        EventRows {
            id: event.id.to_string(),
            source: event.source.clone(),
            context: event.context.to_json().to_string(),
            message: event.message.clone(),
            handlers: event.handlers.clone(),
        }
    }
}

fn insert_event_tx(tx: &Connection, event: &EventRows, now: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO events (id, received_at, source, context, message)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        event.id,
        now,
        event.source,
        event.context,
        event.message
    ])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO deliveries (event_id, handler, state, created_at, not_before)
         VALUES (?1, ?2, 'pending', ?3, ?3)",
    )?;
    for handler in &event.handlers {
        insert.execute(params![event.id, handler, now])?;
    }
    Ok(())
}

/// A candidate row of a claim.
struct ClaimRow {
    delivery_id: i64,
    event_id: String,
    handler: String,
    attempt: i64,
    not_before: i64,
}

/// Chooses and claims the deliveries of a claim batch inside the writer's transaction; answers
/// them with their events' rows (`None` where the row before is the same event's).
/// The rows of `sql`, a `SELECT name, COUNT(*) … GROUP BY name`, as (name, count).
fn counted(conn: &Connection, sql: &str) -> Result<Vec<(String, u64)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(rows
        .into_iter()
        .map(|(name, n)| (name, u64::try_from(n).unwrap_or(0)))
        .collect())
}

fn claim_rows(
    tx: &Connection,
    now_ms: i64,
    limits: &ClaimLimits,
    lease_until: i64,
    node: &str,
) -> Result<ClaimedRows, StoreError> {
    let batch = limits.batch_size();
    // Each handler's oldest due deliveries through the per-handler index, then the batch
    // chosen among them (`ClaimLimits::choose`). One query over every pending delivery, skipping the handlers without
    // room, would walk past a saturated handler's whole backlog on every claim (4 ms per
    // claim with 20,000 waiting, against 0.04 ms without), holding the write lock meanwhile.
    let handlers = tx
        .prepare_cached(PENDING_HANDLERS)
        .map_err(db)?
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut candidates = Vec::new();
    {
        let mut due = tx.prepare_cached(DUE_OF_HANDLER).map_err(db)?;
        for handler in handlers {
            let room = limits.room_of(&handler).min(batch);
            if room == 0 {
                continue;
            }
            let limit = i64::try_from(room).unwrap_or(1);
            let rows = due
                .query_map(params![handler, now_ms, limit], |r| {
                    Ok(ClaimRow {
                        delivery_id: r.get(0)?,
                        event_id: r.get(1)?,
                        handler: r.get(2)?,
                        attempt: r.get(3)?,
                        not_before: r.get(4)?,
                    })
                })
                .map_err(db)?;
            for row in rows {
                candidates.push(row.map_err(db)?);
            }
        }
    }
    // Oldest due first, then shared between handlers when more are due than the batch takes.
    candidates.sort_by_key(|row| (row.not_before, row.delivery_id));
    let chosen = limits.choose(candidates, |row| &row.handler);
    {
        let mut update = tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'running', attempt = attempt + 1,
                     started_at = ?2, owner = ?3, lease_until = ?4
                 WHERE id = ?1",
            )
            .map_err(db)?;
        for row in &chosen {
            update
                .execute(params![row.delivery_id, now_ms, node, lease_until])
                .map_err(db)?;
        }
    }
    // An event's deliveries are claimed side by side: its context is read once for them.
    let mut texts: Vec<Option<EventRow>> = Vec::with_capacity(chosen.len());
    {
        let mut context = tx
            .prepare_cached("SELECT context, source, message FROM events WHERE id = ?1")
            .map_err(db)?;
        let mut previous: Option<&str> = None;
        for row in &chosen {
            if previous == Some(row.event_id.as_str()) {
                texts.push(None);
                continue;
            }
            let text: EventRow = context
                .query_row(params![row.event_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(db)?;
            texts.push(Some(text));
            previous = Some(&row.event_id);
        }
    }
    Ok((chosen, texts))
}

/// A finished attempt made ready for [`finish_rows`].
struct FinishRow {
    delivery_id: i64,
    attempt: u32,
    state: &'static str,
    terminal: bool,
    retry_at: Option<i64>,
    finished_at: i64,
    duration_ms: Option<f64>,
    class: String,
    reason: Option<String>,
    outcome: Option<String>,
}

/// Records finished attempts inside the writer's transaction: each one's end becomes its
/// delivery's state and joins its attempt list, unless the delivery is no longer this node's
/// attempt (late: another node took it over).
fn finish_rows(
    tx: &Connection,
    now: i64,
    rows: &[FinishRow],
    node: &str,
) -> Result<Vec<Finish>, StoreError> {
    let mut update = tx
        .prepare_cached(
            "UPDATE deliveries SET state = ?3, not_before = ?4, finished_at = ?5,
                 duration_ms = ?6, outcome_class = ?7, reason = ?8, outcome = ?9
             WHERE id = ?1 AND attempt = ?2 AND state = 'running' AND owner = ?10",
        )
        .map_err(db)?;
    let mut attempt = tx
        .prepare_cached(
            "INSERT INTO attempts (delivery_id, attempt, started_at, finished_at, class, reason, terminal)
             SELECT id, attempt, started_at, ?2, ?3, ?4, ?5 FROM deliveries WHERE id = ?1",
        )
        .map_err(db)?;
    let mut results = Vec::with_capacity(rows.len());
    for row in rows {
        let changed = update
            .execute(params![
                row.delivery_id,
                row.attempt,
                row.state,
                row.retry_at.unwrap_or(now),
                row.finished_at,
                row.duration_ms,
                row.class,
                row.reason,
                row.outcome,
                node
            ])
            .map_err(db)?;
        if changed == 1 {
            attempt
                .execute(params![
                    row.delivery_id,
                    row.finished_at,
                    row.class,
                    row.reason,
                    row.terminal
                ])
                .map_err(db)?;
            results.push(Finish::Recorded);
        } else {
            results.push(Finish::Late);
        }
    }
    Ok(results)
}

/// What a claim's write answers: the claimed rows and, for each, its event's row (`None` where
/// the row before is the same event's).
type ClaimedRows = (Vec<ClaimRow>, Vec<Option<EventRow>>);

/// Turns a claim's rows into claims, each event's context decoded once — outside the writer,
/// whose thread every write waits for.
fn decode_claims(
    chosen: Vec<ClaimRow>,
    texts: Vec<Option<EventRow>>,
) -> Result<Vec<Claim>, StoreError> {
    let mut contexts = ContextCache::default();
    chosen
        .into_iter()
        .zip(texts)
        .map(|(row, text)| {
            let event = contexts.decode(&row.event_id, text);
            let event_id = Uuid::parse_str(&row.event_id)
                .map_err(|e| StoreError::Corrupt(format!("event id {}: {e}", row.event_id)))?;
            Ok(Claim {
                delivery_id: row.delivery_id,
                event_id,
                handler: row.handler,
                attempt: u32::try_from(row.attempt.saturating_add(1)).unwrap_or(u32::MAX),
                context: event.context,
                source: event.source,
                message: event.message,
            })
        })
        .collect()
}

/// Decodes each event's context once per claim batch: an event's deliveries (one per handler)
/// are usually claimed together.
#[derive(Default)]
struct ContextCache {
    last: Option<(String, ClaimedEvent)>,
}

/// What a claim carries of its event, as read from the `events` row.
#[derive(Clone)]
struct ClaimedEvent {
    /// The context, or why it cannot be read ([`Claim::context`]).
    context: Result<JobContext, String>,
    source: String,
    message: Option<String>,
}

/// An `events` row's context (JSON text), source and message, as read for a claim.
type EventRow = (String, String, Option<String>);

impl ContextCache {
    /// The event `event_id` of a claim: the last one decoded if it is that event's, else `row`
    /// decoded. A context that cannot be decoded (or a row that was not read) is carried as its
    /// reason: it fails that event's deliveries, not the whole claim.
    fn decode(&mut self, event_id: &str, row: Option<EventRow>) -> ClaimedEvent {
        if let Some((id, event)) = &self.last
            && id == event_id
        {
            return event.clone();
        }
        let event = match row {
            None => ClaimedEvent {
                context: Err(unreadable_context(event_id, &"its row was not read")),
                source: String::new(),
                message: None,
            },
            Some((json, source, message)) => ClaimedEvent {
                context: serde_json::from_str::<serde_json::Value>(&json)
                    .map_err(|e| unreadable_context(event_id, &e))
                    .and_then(|value| {
                        JobContext::from_json_value(&value)
                            .map_err(|e| unreadable_context(event_id, &e))
                    }),
                source,
                message,
            },
        };
        self.last = Some((event_id.to_owned(), event.clone()));
        event
    }
}

/// The writer answers these to the awaiting task itself (`Writer::submit`).
impl AwaitedWrites for SqliteStore {
    fn insert_event_awaited(
        &self,
        event: &NewEvent,
        key: Option<&Idempotency>,
    ) -> Answer<Inserted> {
        let work = self.insert_work(std::slice::from_ref(event), None, key.cloned());
        self.writer.submit(Durability::Durable, work)
    }

    fn claim_batch_awaited(
        &self,
        now: DateTime<Utc>,
        limits: &ClaimLimits,
        lease: Duration,
    ) -> Answer<Vec<Claim>> {
        if limits.batch_size() == 0 {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        }
        let claimed = self
            .writer
            .submit(Durability::Normal, self.claim_work(now, limits, lease));
        Box::pin(async move {
            let (chosen, texts) = claimed.await?;
            decode_claims(chosen, texts)
        })
    }

    fn finish_batch_awaited(&self, finished: &[(&Claim, &AttemptRecord)]) -> Answer<Vec<Finish>> {
        match self.finish_work(finished) {
            Ok(work) => self.writer.submit(Durability::Normal, work),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl EventStore for SqliteStore {
    fn awaited_writes(&self) -> Option<&dyn AwaitedWrites> {
        Some(self)
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn keep_time(&self) -> Result<Option<TimeDelta>, StoreError> {
        let clock = Arc::clone(&self.clock);
        let follower = Arc::clone(&self.clock);
        // Alone in its transaction, and the clock follows a step only once its move is
        // committed, in the writer, before any later write reads the time: no row is written
        // in the old time after the move, nor in the new time before it.
        let moved = self.writer.write_with(Write {
            durability: Durability::Normal,
            grouping: Grouping::Alone,
            work: move |tx: &Connection| {
                let mut anchor = clock.hold();
                let reference = Utc::now();
                let Some(step) = anchor.step(reference) else {
                    anchor.follow(reference);
                    let mark = to_ms(anchor.now());
                    drop(anchor);
                    tx.execute(UPSERT_CURSOR, params![CLOCK_MARK, mark.to_string()])
                        .map_err(db)?;
                    return Ok(None);
                };
                move_schedule(tx, step, reference).map_err(db)?;
                Ok(Some((step, reference)))
            },
            committed: Some(Box::new(
                move |moved: &Option<(TimeDelta, DateTime<Utc>)>| {
                    if let Some((_, reference)) = moved {
                        follower.hold().follow(*reference);
                    }
                },
            )),
        })?;
        let Some((step, _)) = moved else {
            return Ok(None);
        };
        tracing::warn!(
            step_ms = step.num_milliseconds(),
            "the system clock stepped by {:+.3} s; due times, leases and idempotency keys \
             were moved with it, so every backoff and retention keeps its length",
            step.num_milliseconds() as f64 / 1000.0
        );
        Ok(Some(step))
    }

    fn insert_event(&self, event: &NewEvent) -> Result<(), StoreError> {
        self.write(std::slice::from_ref(event), None, None)
            .map(drop)
    }

    fn insert_event_once(
        &self,
        event: &NewEvent,
        key: &Idempotency,
    ) -> Result<Inserted, StoreError> {
        self.write(std::slice::from_ref(event), None, Some(key.clone()))
    }

    fn purge_idempotency_keys(&self, before: DateTime<Utc>, max: usize) -> Result<u64, StoreError> {
        let limit = capped(max, MAX_PURGE_BATCH);
        let before = to_ms(before);
        self.writer.write(Durability::Normal, move |tx| {
            let n = tx
                .execute(
                    "DELETE FROM idempotency_keys WHERE key IN
                         (SELECT key FROM idempotency_keys WHERE created_at < ?1 LIMIT ?2)",
                    params![before, limit],
                )
                .map_err(db)?;
            Ok(n as u64)
        })
    }

    fn purge_finished(
        &self,
        before: DateTime<Utc>,
        max: usize,
        from: Option<PurgePosition>,
    ) -> Result<PurgeRound, StoreError> {
        let limit = purge_batch(max);
        let before = to_ms(before);
        let from = from.unwrap_or_else(walk_start);
        let (after_at, after_row) = (to_ms(from.received_at), tiebreak_rowid(from.tiebreak));
        self.writer.write(Durability::Normal, move |tx| {
            let examined: Vec<(String, i64, i64, bool)> = tx
                .prepare_cached(EVENTS_TO_PURGE)
                .and_then(|mut select| {
                    select
                        .query_map(params![before, limit, after_at, after_row], |row| {
                            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                        })?
                        .collect()
                })
                .map_err(db)?;
            let mut deleted = 0u64;
            for (id, _, _, finished) in &examined {
                if !finished {
                    continue;
                }
                for delete in [
                    DELETE_ATTEMPTS_OF_EVENT,
                    DELETE_DELIVERIES_OF_EVENT,
                    DELETE_EVENT,
                ] {
                    tx.prepare_cached(delete)
                        .and_then(|mut delete| delete.execute(params![id]))
                        .map_err(db)?;
                }
                deleted += 1;
            }
            let next = match examined.last() {
                Some((_, received_at, row, _)) if examined.len() as i64 >= limit => {
                    Some(PurgePosition {
                        received_at: from_ms(*received_at),
                        tiebreak: rowid_tiebreak(*row),
                    })
                }
                _ => None,
            };
            Ok(PurgeRound { deleted, next })
        })
    }

    fn claim_batch(
        &self,
        now: DateTime<Utc>,
        limits: &ClaimLimits,
        lease: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        if limits.batch_size() == 0 {
            return Ok(Vec::new());
        }
        let (chosen, texts) = self
            .writer
            .write(Durability::Normal, self.claim_work(now, limits, lease))?;
        decode_claims(chosen, texts)
    }

    fn finish_batch(
        &self,
        finished: &[(&Claim, &AttemptRecord)],
    ) -> Result<Vec<Finish>, StoreError> {
        let work = self.finish_work(finished)?;
        self.writer.write(Durability::Normal, work)
    }

    fn renew(&self, now: DateTime<Utc>, lease: Duration) -> Result<(), StoreError> {
        let node = self.node.clone();
        let until = to_ms(after(now, lease));
        self.writer.write(Durability::Normal, move |tx| {
            tx.execute(
                "UPDATE deliveries SET lease_until = ?2 WHERE owner = ?1 AND state = 'running'",
                params![node, until],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn requeue_abandoned(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        // Any claim not this process's: SQLite serves one engine process.
        self.requeue(
            "state = 'running' AND (owner IS NULL OR owner <> ?1)",
            Some(to_ms(now)),
            ABANDONED_REASON,
        )
    }

    fn release_all(&self) -> Result<u64, StoreError> {
        self.requeue("state = 'running' AND owner = ?1", None, RELEASED_REASON)
    }

    fn event(&self, id: Uuid) -> Result<Option<EventView>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT received_at, source, context, message FROM events WHERE id = ?1",
                params![id.to_string()],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(db)?;
        let Some((received_at, source, context, message)) = row else {
            return Ok(None);
        };
        let context = serde_json::from_str(&context)
            .map_err(|e| StoreError::Corrupt(format!("event {id}: {e}")))?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, handler, state, attempt, created_at, started_at, finished_at,
                        duration_ms, outcome_class, reason, outcome
                 FROM deliveries WHERE event_id = ?1 ORDER BY id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![id.to_string()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, Option<f64>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                    r.get::<_, Option<String>>(10)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let mut attempts_stmt = conn
            .prepare_cached(
                "SELECT attempt, started_at, finished_at, class, reason, terminal FROM attempts
                 WHERE delivery_id = ?1 ORDER BY attempt",
            )
            .map_err(db)?;
        let mut deliveries = Vec::with_capacity(rows.len());
        for (
            delivery_id,
            handler,
            state,
            attempt,
            created_at,
            started_at,
            finished_at,
            duration_ms,
            outcome,
            reason,
            outcome_json,
        ) in rows
        {
            let state = DeliveryState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown delivery state {state:?}")))?;
            let logs = outcome_json
                .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
                .and_then(|v| v.get("logs").and_then(|l| l.as_array().cloned()))
                .unwrap_or_default();
            let attempts = attempts_stmt
                .query_map(params![delivery_id], |r| {
                    Ok(AttemptView {
                        attempt: u32::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        started_at: r.get::<_, Option<i64>>(1)?.map(from_ms),
                        finished_at: from_ms(r.get::<_, i64>(2)?),
                        class: r.get(3)?,
                        reason: r.get(4)?,
                        terminal: r.get(5)?,
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            deliveries.push(DeliveryView {
                handler,
                state,
                attempt: u32::try_from(attempt).unwrap_or(0),
                created_at: from_ms(created_at),
                started_at: started_at.map(from_ms),
                finished_at: finished_at.map(from_ms),
                duration_ms,
                outcome,
                reason,
                logs,
                attempts,
            });
        }
        Ok(Some(EventView {
            id,
            received_at: from_ms(received_at),
            source,
            context,
            message,
            deliveries,
        }))
    }

    fn failed_deliveries(
        &self,
        filter: &FailedFilter,
        max: usize,
    ) -> Result<Vec<FailedDelivery>, StoreError> {
        let limit = capped(max, MAX_FAILED_PAGE);
        let event = filter.event.map(|e| e.to_string());
        let conn = self.conn();
        let mut select = conn.prepare_cached(FAILED).map_err(db)?;
        let rows = select
            .query_map(params![filter.handler, event, filter.before, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        rows.into_iter()
            .map(
                |(id, event_id, handler, attempt, finished_at, outcome, reason)| {
                    Ok(FailedDelivery {
                        id,
                        event_id: Uuid::try_parse(&event_id).map_err(|e| {
                            StoreError::Corrupt(format!(
                                "delivery {id}: event id {event_id:?}: {e}"
                            ))
                        })?,
                        handler,
                        attempt: u32::try_from(attempt).unwrap_or(0),
                        finished_at: finished_at.map(from_ms),
                        outcome,
                        reason,
                    })
                },
            )
            .collect()
    }

    fn retry_failed(
        &self,
        filter: &FailedFilter,
        now: DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<i64>, StoreError> {
        let limit = capped(max, MAX_RETRY_BATCH);
        let (handler, event, before) = (
            filter.handler.clone(),
            filter.event.map(|e| e.to_string()),
            filter.before,
        );
        let now = to_ms(now);
        self.writer.write(Durability::Normal, move |tx| {
            tx.prepare_cached(RETRY_FAILED)
                .and_then(|mut update| {
                    update
                        .query_map(params![handler, event, before, limit, now], |r| r.get(0))?
                        .collect()
                })
                .map_err(db)
        })
    }

    fn next_due(&self, limits: &ClaimLimits) -> Result<Option<DateTime<Utc>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(NEXT_DUE).map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
            })
            .map_err(db)?;
        let mut earliest: Option<i64> = None;
        for row in rows {
            let (handler, due) = row.map_err(db)?;
            if limits.room_of(&handler) > 0 {
                earliest = earliest.into_iter().chain(due).min();
            }
        }
        Ok(earliest.map(from_ms))
    }

    fn count_by_state(&self) -> Result<Vec<(DeliveryState, u64)>, StoreError> {
        let counts = counted(
            &self.conn(),
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state",
        )?;
        Ok(counts
            .into_iter()
            .filter_map(|(s, n)| Some((DeliveryState::parse(&s)?, n)))
            .collect())
    }

    fn pending_by_handler(&self) -> Result<Vec<(String, u64)>, StoreError> {
        counted(
            &self.conn(),
            "SELECT handler, COUNT(*) FROM deliveries WHERE state = 'pending' \
             GROUP BY handler ORDER BY handler",
        )
    }

    fn failed_by_handler(&self) -> Result<Vec<(String, u64)>, StoreError> {
        // `deliveries_handler_due` begins with the state and the handler: an index walk.
        counted(
            &self.conn(),
            "SELECT handler, COUNT(*) FROM deliveries WHERE state = 'failed' \
             GROUP BY handler ORDER BY handler",
        )
    }

    fn cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        read_cursor(&self.conn(), name).map_err(db)
    }

    fn insert_events_with_cursor(
        &self,
        events: &[NewEvent],
        cursor_name: &str,
        cursor: &str,
    ) -> Result<(), StoreError> {
        self.write(
            events,
            Some((cursor_name.to_owned(), cursor.to_owned())),
            None,
        )
        .map(drop)
    }

    /// One process per database: it always leads.
    fn try_lead(&self, _role: &str) -> Result<bool, StoreError> {
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::store::conformance::{self, Backend};

    /// The system clock "steps" by `by` as the store sees it. The test cannot move the system
    /// clock, so it moves the store's world the other way: the queue's time and everything
    /// scheduled in it go back by `by`, as if they had been carried from a clock `by` behind
    /// the one the store will read next.
    fn step_system_clock(store: &SqliteStore, by: TimeDelta) {
        let mut clock = store.clock.hold();
        let carried = clock.now() - by;
        move_schedule(&store.conn(), -by, carried).unwrap();
        clock.follow(carried);
    }

    /// A backup that cannot be written where it is asked for blames the destination, not the
    /// store, and says what is there: a directory that does not exist, an existing directory,
    /// file, device or symbolic link (none written over or through); the store is named only
    /// when it is the problem. Nothing is left behind.
    #[cfg(unix)]
    #[test]
    fn a_backup_destination_that_cannot_be_written_is_named_as_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        drop(SqliteStore::open(&data).unwrap());
        let at = |name: &str| dir.path().join(name);
        std::fs::create_dir(at("a-directory")).unwrap();
        std::fs::write(at("a-file"), b"keep me").unwrap();
        std::os::unix::fs::symlink(at("nowhere"), at("dangling")).unwrap();
        for (to, says) in [
            (
                at("missing/backup.sqlite"),
                format!(
                    "cannot write the backup to {}: the directory {} does not exist; create \
                     it, or give a path in a directory that exists",
                    at("missing/backup.sqlite").display(),
                    at("missing").display()
                ),
            ),
            (
                at("a-directory"),
                format!(
                    "cannot write the backup to {}: it is a directory; give the path of a new \
                     file in it",
                    at("a-directory").display()
                ),
            ),
            (
                at("a-file"),
                format!(
                    "cannot write the backup to {}: a file of that name exists; a backup is \
                     never written over one: give a new name",
                    at("a-file").display()
                ),
            ),
            (
                PathBuf::from("/dev/null"),
                "cannot write the backup to /dev/null: it is a device".to_owned(),
            ),
            (
                at("dangling"),
                format!(
                    "cannot write the backup to {}: it is a symbolic link; a backup is never \
                     written through one: give the path of a new file",
                    at("dangling").display()
                ),
            ),
        ] {
            let e = backup(&data, &to).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, BackupError::Destination { .. }), "{text}");
            assert!(text.starts_with(&says), "{to:?}:\n{text}\n{says}");
            assert!(!text.contains("cannot open the store"), "{text}");
        }
        assert_eq!(std::fs::read(at("a-file")).unwrap(), b"keep me");
        assert!(!at("nowhere").exists(), "nothing made through the link");
        assert!(!at("missing").exists());
        // The store's own problem is the store's.
        let e = backup(&at("no-store"), &at("b.sqlite")).unwrap_err();
        assert!(matches!(e, BackupError::Store(_)), "{e}");
        assert!(e.to_string().contains("cannot open the store"), "{e}");
        let report = backup(&data, &at("b.sqlite")).unwrap();
        assert_eq!(report.events, 0);
    }

    /// A walk's tiebreak keeps the row numbers' order, from the lowest to the highest, and
    /// gives each back.
    #[test]
    fn row_numbers_as_tiebreaks_keep_their_order_and_come_back() {
        let rows = [i64::MIN, -1, 0, 1, 7, i64::MAX];
        for pair in rows.windows(2) {
            assert!(
                rowid_tiebreak(pair[0]) < rowid_tiebreak(pair[1]),
                "{pair:?}"
            );
        }
        for row in rows {
            assert_eq!(tiebreak_rowid(rowid_tiebreak(row)), row);
        }
        assert_eq!(
            tiebreak_rowid(0),
            i64::MIN,
            "the walk's start is before every row"
        );
        assert_eq!(tiebreak_rowid(u128::MAX), i64::MAX);
    }

    #[test]
    fn a_step_of_the_system_clock_moves_due_times_leases_and_keys_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.keep_time().unwrap(), None, "no step yet");
        let retention = Duration::from_secs(600);
        let key = Idempotency::new("k", &conformance::event(&["a"]).context, retention);
        store
            .insert_event_once(&conformance::event(&["a"]), &key)
            .unwrap();
        store.insert_event(&conformance::event(&["b"])).unwrap();
        let lease = Duration::from_secs(60);
        let failed = store
            .claim(store.now(), &["b".into()], lease)
            .unwrap()
            .unwrap();
        let mut retry = conformance::record(DeliveryState::Pending);
        retry.retry_at = Some(after(store.now(), Duration::from_secs(30)));
        store.finish(&failed, &retry).unwrap();
        let _running = store.claim(store.now(), &[], lease).unwrap().unwrap();
        let read = |sql: &str| -> i64 { store.conn().query_row(sql, [], |r| r.get(0)).unwrap() };
        let due = "SELECT not_before FROM deliveries WHERE state = 'pending'";
        let leased = "SELECT lease_until FROM deliveries WHERE state = 'running'";
        let keyed = "SELECT created_at FROM idempotency_keys";
        for by in [TimeDelta::hours(-1), TimeDelta::days(2)] {
            step_system_clock(&store, by);
            let start = [read(due), read(leased), read(keyed)];
            let step = store.keep_time().unwrap().expect("a step");
            assert!((step - by).abs() < TimeDelta::seconds(1), "{step} vs {by}");
            let moved = [read(due), read(leased), read(keyed)];
            for (s, m) in start.iter().zip(moved) {
                assert_eq!(m - s, whole_ms_down(step));
            }
            // Seen from the new time, the retry is as far away as it was.
            let wait = from_ms(read(due)) - store.now();
            assert!(
                wait > TimeDelta::seconds(25) && wait <= TimeDelta::seconds(30),
                "{wait}"
            );
            assert!(store.claim(store.now(), &[], lease).unwrap().is_none());
            assert_eq!(store.keep_time().unwrap(), None, "followed");
        }
        // The key is still held: its age is what passed, not the two days of the step.
        assert!(matches!(
            store
                .insert_event_once(&conformance::event(&["a"]), &key)
                .unwrap(),
            Inserted::Existing { .. }
        ));
    }

    #[test]
    fn steps_are_rounded_down_to_whole_milliseconds() {
        let us = TimeDelta::microseconds;
        assert_eq!(whole_ms_down(us(1_500)), 1);
        assert_eq!(whole_ms_down(us(-1_500)), -2);
        assert_eq!(whole_ms_down(us(-2_000)), -2);
        assert_eq!(whole_ms_down(TimeDelta::zero()), 0);
    }

    #[test]
    fn a_clock_stepped_back_while_no_engine_ran_is_caught_up_with_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            store.insert_event(&conformance::event(&["a"])).unwrap();
            let claim = store
                .claim(store.now(), &[], DEFAULT_TEST_LEASE)
                .unwrap()
                .unwrap();
            let mut retry = conformance::record(DeliveryState::Pending);
            retry.retry_at = Some(after(store.now(), Duration::from_secs(30)));
            store.finish(&claim, &retry).unwrap();
            assert_eq!(store.keep_time().unwrap(), None);
            // The process ran with a clock an hour ahead: its retry and its last recorded time
            // are an hour ahead of the clock the next process starts with.
            let hour = TimeDelta::hours(1).num_milliseconds();
            let conn = store.conn();
            conn.execute(
                "UPDATE deliveries SET not_before = not_before + ?1",
                params![hour],
            )
            .unwrap();
            conn.execute(
                "UPDATE cursors SET value = CAST(value AS INTEGER) + ?1 WHERE name = ?2",
                params![hour, CLOCK_MARK],
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let due = store
            .next_due(&conformance::every_handler())
            .unwrap()
            .expect("a retry is pending");
        let wait = due - store.now();
        assert!(
            wait > TimeDelta::seconds(25) && wait <= TimeDelta::seconds(30),
            "the retry is {wait} away"
        );
        // Opened again without a step: nothing moves.
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            store.next_due(&conformance::every_handler()).unwrap(),
            Some(due)
        );
        // A mark that is not a time is ignored, not an error.
        store
            .conn()
            .execute(UPSERT_CURSOR, params![CLOCK_MARK, "not a time"])
            .unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            store.next_due(&conformance::every_handler()).unwrap(),
            Some(due)
        );
    }

    /// A lease for tests that do not look at leases.
    const DEFAULT_TEST_LEASE: Duration = Duration::from_secs(60);

    /// A database directory; every "node" is another [`SqliteStore`] opened on it, as a
    /// restarted process would.
    struct Sqlite {
        dir: tempfile::TempDir,
    }

    impl Backend for Sqlite {
        type S = SqliteStore;

        fn node(&self) -> SqliteStore {
            SqliteStore::open(self.dir.path()).unwrap()
        }

        fn shared(&self) -> bool {
            false
        }

        fn spoil_context(&self, store: &SqliteStore, event: Uuid) {
            spoil(store, event);
        }
    }

    /// See [`Backend::spoil_context`].
    fn spoil(store: &SqliteStore, event: Uuid) {
        let changed = store
            .conn()
            .execute(
                "UPDATE events SET context = '{\"JobId\": 7}' WHERE id = ?1",
                params![event.to_string()],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }

    #[test]
    fn claims_seek_each_handler_instead_of_scanning_the_queue() {
        // A saturated handler's backlog must not be walked on every claim: both claim queries
        // and the dispatcher's question when the next delivery is due are answered from the
        // per-handler index.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let conn = store.conn();
        let plan = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows: Vec<String> = stmt
                .query_map(params, |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            rows.join("\n")
        };
        let pending = plan(PENDING_HANDLERS, &[]);
        let due = plan(DUE_OF_HANDLER, &[&"h", &0_i64, &1_i64]);
        let next_due = plan(NEXT_DUE, &[]);
        // Each handler's earliest is one seek; `MIN(not_before) WHERE state = 'pending'` over
        // this index would walk every pending delivery.
        assert!(next_due.contains("(state=? AND handler=?)"), "{next_due}");
        for plan in [pending, due, next_due] {
            assert!(plan.contains("deliveries_handler_due"), "{plan}");
            assert!(
                !plan.contains("SCAN d") && !plan.contains("SCAN deliveries"),
                "{plan}"
            );
        }
    }

    #[test]
    fn the_claim_query_is_not_prepared_again_for_each_new_time() {
        // Every claim binds a new `now`; SQLite would prepare the statement again each time
        // unless plans are fixed at prepare time (a tenth of the writer's time, measured).
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let conn = store.conn();
        let mut due = conn.prepare_cached(DUE_OF_HANDLER).unwrap();
        for now in [1_i64, 2, 3, 1_000_000] {
            let rows = due
                .query_map(params!["h", now, 8_i64], |r| r.get::<_, i64>(0))
                .unwrap()
                .count();
            assert_eq!(rows, 0);
        }
        assert_eq!(due.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    /// A data directory the store makes is its owner's only, parents included; one that exists
    /// is left as it is, and said to be open when it is.
    #[cfg(unix)]
    #[test]
    fn the_data_directory_is_made_private_and_an_open_one_is_named() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state").join("data");
        drop(SqliteStore::open_exclusive(&data).unwrap());
        for made in [&data, &dir.path().join("state")] {
            let mode = std::fs::metadata(made).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", made.display());
        }
        assert_eq!(exposure(&data), None);
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
        drop(SqliteStore::open_exclusive(&data).unwrap());
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750, "an existing directory is left as it is");
        let said = exposure(&data).expect("named");
        assert!(said.contains("has mode 750"), "{said}");
        assert!(said.contains("chmod 700"), "{said}");
    }

    /// The data directory's lock: a second exclusive open is refused while the first store is
    /// open, naming its process, and succeeds once it is dropped. The lock is the directory's:
    /// removing the id file releases nothing, garbage in it names no process, and a symbolic
    /// link or a directory planted in its place is neither followed nor a reason to refuse.
    /// Plain opens (two stores of one process, as the tests of two nodes use them) do not take
    /// it.
    #[test]
    fn one_exclusive_store_per_data_directory() {
        let refused = |dir: &Path| match SqliteStore::open_exclusive(dir) {
            Ok(_) => panic!("a second exclusive open succeeded"),
            Err(e) => e.to_string(),
        };
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join(PID_FILE);
        let first = SqliteStore::open_exclusive(dir.path()).unwrap();
        let message = refused(dir.path());
        assert!(
            message.contains(&format!(
                "another jobhook (process {}) is using this data directory",
                std::process::id()
            )),
            "{message}"
        );
        drop(SqliteStore::open(dir.path()).unwrap());
        // The id in the file is only for the message: garbage there names no process, and
        // without the file the directory is still locked.
        std::fs::write(&pid_file, "\u{1b}[2J not a pid").unwrap();
        let message = refused(dir.path());
        assert!(
            message.contains("another jobhook (another process)"),
            "{message}"
        );
        std::fs::remove_file(&pid_file).unwrap();
        let message = refused(dir.path());
        assert!(
            message.contains("another jobhook (another process)"),
            "{message}"
        );
        drop(first);
        drop(SqliteStore::open_exclusive(dir.path()).unwrap());
        assert_eq!(
            std::fs::read_to_string(&pid_file).unwrap(),
            format!("{}\n", std::process::id())
        );

        // A link planted where the id goes: nothing is written through it.
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("precious.txt");
        std::fs::write(&victim, "precious").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&victim, dir.path().join(PID_FILE)).unwrap();
        let store = SqliteStore::open_exclusive(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let message = refused(dir.path());
        assert!(
            message.contains("another jobhook (another process)"),
            "{message}"
        );
        drop(store);

        // A directory where the id goes: no id, no refusal.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(PID_FILE)).unwrap();
        drop(SqliteStore::open_exclusive(dir.path()).unwrap());

        // A FIFO where the id goes, with no reader: neither writing nor reading it waits.
        #[cfg(unix)]
        {
            let dir = tempfile::tempdir().unwrap();
            let fifo = std::ffi::CString::new(
                dir.path()
                    .join(PID_FILE)
                    .into_os_string()
                    .into_encoded_bytes(),
            )
            .unwrap();
            // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
            let store = SqliteStore::open_exclusive(dir.path()).unwrap();
            let message = refused(dir.path());
            assert!(
                message.contains("another jobhook (another process)"),
                "{message}"
            );
            drop(store);
        }
    }

    /// A new store's database, write-ahead log and its index are readable and writable by the
    /// engine's user only, whatever the umask lets files be (the test's is the usual `022`):
    /// they hold every job context.
    #[cfg(unix)]
    #[test]
    fn a_new_stores_files_are_its_users_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = SqliteStore::open(&data).unwrap();
        store.insert_event(&conformance::event(&["a"])).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let path = data.join(format!("{DATABASE_FILE}{suffix}"));
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}: {mode:03o}", path.display());
        }
    }

    /// Each migration applied at open is logged with its version, as the PostgreSQL store logs
    /// it; a store already at the newest schema logs none.
    #[test]
    fn each_migration_applied_is_logged() {
        // What opening the store in `dir` logs at INFO.
        let logged_opening = |dir: &Path| {
            let kept = crate::log_capture::Captured::default();
            let writer = kept.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::INFO)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                drop(SqliteStore::open(dir).unwrap());
            });
            kept.text()
        };
        let dir = tempfile::tempdir().unwrap();
        let text = logged_opening(dir.path());
        for version in 1..=MIGRATIONS.len() {
            assert!(
                text.contains(&format!(
                    "store schema migration applied version={version}\n"
                )),
                "{version}: {text}"
            );
        }
        let again = logged_opening(dir.path());
        assert!(!again.contains("migration applied"), "{again}");
    }

    /// A store a newer jobhook made, or another program's database, is not opened: the message
    /// says which and what to do, and the database is left as it was.
    #[test]
    fn a_newer_schema_or_another_programs_database_is_refused_and_left_alone() {
        let refused = |dir: &Path| match SqliteStore::open(dir) {
            Ok(_) => panic!("opened"),
            Err(e) => e,
        };
        let message = |setup: &dyn Fn(&Connection)| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(DATABASE_FILE);
            setup(&Connection::open(&path).unwrap());
            let e = refused(dir.path());
            let version: i64 = Connection::open(&path)
                .unwrap()
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            (e.to_string(), version)
        };
        let newer = MIGRATIONS.len() as i64 + 1;
        let (e, version) = message(&|c| c.pragma_update(None, "user_version", newer).unwrap());
        assert!(
            e.contains(&format!(
                "the database schema is at version {newer}, newer than this jobhook knows ({})",
                MIGRATIONS.len()
            )),
            "{e}"
        );
        assert!(e.contains("a newer jobhook made it"), "{e}");
        assert_eq!(version, newer);
        let (e, _) = message(&|c| c.pragma_update(None, "user_version", -3).unwrap());
        assert!(e.contains("schema version is -3"), "{e}");
        assert!(e.contains("not jobhook's store"), "{e}");
        let (e, version) = message(&|c| {
            c.execute_batch("CREATE TABLE events (x INTEGER); INSERT INTO events VALUES (1);")
                .unwrap()
        });
        // Nothing in the file changed, its journal mode included (WAL mode is written into it).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE theirs (x INTEGER); INSERT INTO theirs VALUES (1);")
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        refused(dir.path());
        assert!(
            std::fs::read(&path).unwrap() == before,
            "the refused database file changed"
        );
        let mode: String = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        assert!(
            e.contains("the database has 1 table(s) but no jobhook schema version"),
            "{e}"
        );
        assert_eq!(version, 0);
        // A file that is no database at all: what SQLite says, and what to do.
        let dir = tempfile::tempdir().unwrap();
        let garbage = vec![b'x'; 8192];
        std::fs::write(dir.path().join(DATABASE_FILE), &garbage).unwrap();
        let e = refused(dir.path()).to_string();
        assert!(e.contains("file is not a database"), "{e}");
        assert!(e.contains("is damaged or is not jobhook's database"), "{e}");
        assert!(
            std::fs::read(dir.path().join(DATABASE_FILE)).unwrap() == garbage,
            "the damaged file changed"
        );
        // The schema it knows opens, of course.
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        SqliteStore::open(dir.path()).unwrap();
    }

    #[test]
    fn a_store_made_by_the_previous_schema_loses_only_the_index_the_claims_no_longer_need() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The schema as the previous release left it, with a pending delivery in it.
            let mut conn = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 4).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute(
                "INSERT INTO events (id, received_at, source, context) VALUES ('e', 1, 's', '{}')",
                [],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO deliveries (event_id, handler, state, created_at, not_before)
                 VALUES ('e', 'h', 'pending', 1, 1234)",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let indexes: Vec<String> = store
            .conn()
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deliveries'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !indexes.iter().any(|n| n == "deliveries_due"),
            "{indexes:?}"
        );
        assert!(
            indexes.iter().any(|n| n == "deliveries_handler_due"),
            "{indexes:?}"
        );
        assert_eq!(
            store
                .next_due(&conformance::every_handler())
                .unwrap()
                .map(to_ms),
            Some(1234)
        );
    }

    conformance::suite!(Some(Sqlite {
        dir: tempfile::tempdir().unwrap()
    }));

    /// [`AwaitedWrites`] of [`SqliteStore`] do what the blocking calls do: the whole contract
    /// again, with every insert, claim and finish going through them.
    mod awaited {
        use super::*;

        /// A SQLite store whose blocking event-path writes are its awaited ones, awaited.
        struct Awaited(SqliteStore, tokio::runtime::Runtime);

        impl Awaited {
            fn wait<T>(&self, answer: Answer<T>) -> Result<T, StoreError> {
                self.1.block_on(answer)
            }
        }

        impl EventStore for Awaited {
            conformance::pass_on_the_rest!();
            fn insert_event(&self, event: &NewEvent) -> Result<(), StoreError> {
                self.wait(AwaitedWrites::insert_event_awaited(&self.0, event, None))
                    .map(drop)
            }
            fn insert_event_once(
                &self,
                event: &NewEvent,
                key: &Idempotency,
            ) -> Result<Inserted, StoreError> {
                self.wait(AwaitedWrites::insert_event_awaited(
                    &self.0,
                    event,
                    Some(key),
                ))
            }
            fn claim_batch(
                &self,
                now: DateTime<Utc>,
                limits: &ClaimLimits,
                lease: Duration,
            ) -> Result<Vec<Claim>, StoreError> {
                self.wait(AwaitedWrites::claim_batch_awaited(
                    &self.0, now, limits, lease,
                ))
            }
            fn finish_batch(
                &self,
                finished: &[(&Claim, &AttemptRecord)],
            ) -> Result<Vec<Finish>, StoreError> {
                self.wait(AwaitedWrites::finish_batch_awaited(&self.0, finished))
            }
        }

        struct AwaitedSqlite(Sqlite);

        impl Backend for AwaitedSqlite {
            type S = Awaited;

            fn node(&self) -> Awaited {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                Awaited(self.0.node(), runtime)
            }

            fn shared(&self) -> bool {
                false
            }

            fn spoil_context(&self, store: &Awaited, event: Uuid) {
                spoil(&store.0, event);
            }
        }

        conformance::suite!(Some(AwaitedSqlite(Sqlite {
            dir: tempfile::tempdir().unwrap()
        })));

        /// No blocking thread stands between the event path and the writer: with the runtime's
        /// only one held, an event is still inserted, claimed and finished.
        #[test]
        fn awaited_writes_need_no_blocking_thread() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(1)
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(writes_with_the_blocking_pool_held());
        }

        async fn writes_with_the_blocking_pool_held() {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path()).unwrap();
            let (release, held) = std::sync::mpsc::channel::<()>();
            let blocking = tokio::task::spawn_blocking(move || held.recv());
            let writes = store
                .awaited_writes()
                .expect("SQLite's writes can be awaited");
            let event = conformance::event(&["a"]);
            let done = tokio::time::timeout(Duration::from_secs(10), async {
                writes.insert_event_awaited(&event, None).await.unwrap();
                let limits = ClaimLimits::any(1);
                let claim = writes
                    .claim_batch_awaited(store.now(), &limits, DEFAULT_TEST_LEASE)
                    .await
                    .unwrap()
                    .pop()
                    .expect("the event's delivery");
                let record = conformance::record(DeliveryState::Succeeded);
                writes
                    .finish_batch_awaited(&[(&claim, &record)])
                    .await
                    .unwrap()
            })
            .await
            .expect("answered without a blocking thread");
            assert_eq!(done, vec![Finish::Recorded]);
            release.send(()).unwrap();
            blocking.await.unwrap().unwrap();
        }
    }
}
