//! The shared store: one PostgreSQL database that several `jobhook serve` nodes use at once, so
//! they work off one queue and none of them is a single point of failure.
//!
//! How nodes share the work:
//! - **Claiming** takes the oldest due pending delivery with `SELECT … FOR UPDATE SKIP LOCKED`
//!   inside the claiming statement: nodes claiming at the same moment skip each other's rows
//!   instead of waiting or handing out one delivery twice. The claim records the node
//!   (`owner`, a per-process id) and a lease (`lease_until`).
//! - **Leases**: a node renews the leases of what it runs every third of the lease. A node that
//!   dies stops renewing; once a lease has expired, any node's
//!   [`requeue_abandoned`](EventStore::requeue_abandoned) puts the delivery back to pending and it runs
//!   again with the next attempt number. Live claims of other nodes are never requeued.
//! - **Nothing a frozen node holds stops the others**: every pooled session bounds its own
//!   transactions, lock waits and statements relative to the lease ([`SessionLimits`]), so the
//!   server ends the session of a node frozen inside a transaction (SIGSTOP, a paused VM) and
//!   releases its row locks before its leases expire; the requeue skips rows still locked.
//! - **Fencing**: an attempt is recorded only while the delivery is still `running` under the
//!   same attempt number and owner, so a node that comes back after its lease was taken over
//!   cannot overwrite the newer attempt: every delivery ends terminal exactly once.
//! - **Leadership** ([`EventStore::try_lead`]): a session-level advisory lock held on a connection of
//!   its own for as long as the node lives. When the node dies its session ends, the lock is
//!   released, and another node's next `try_lead` gets it.
//! - **Migrations** run when a node starts, in one transaction under an advisory lock, recorded
//!   in `schema_migrations`, so nodes starting together apply each migration once.
//!
//! Time — leases, due times, idempotency retention — is the database server's clock, read
//! every third of the lease and carried forward between readings by the node's boot-time clock
//! ([`QueueClock`]): the nodes' own clocks may be wrong or step without effect on the queue.
//!
//! Store calls block; the engine makes them from `spawn_blocking`. The client is the synchronous
//! `postgres` crate, which drives each connection on a small runtime of its own: that is fine on
//! a blocking thread, but it must not run or be dropped on a thread that drives async tasks, so
//! [`PostgresStore`]'s `Drop` closes its connections on a thread of their own.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use postgres::types::ToSql;
use postgres::{Client, GenericClient, IsolationLevel, NoTls, Statement};
use uuid::Uuid;

use super::clock::QueueClock;
use super::interface::{
    ABANDONED_REASON, AttemptRecord, AttemptView, Claim, ClaimLimits, DeliveryState, DeliveryView,
    EventStore, EventView, FailedDelivery, FailedFilter, Finish, INTERRUPTED_CLASS, Idempotency,
    Inserted, MAX_FAILED_PAGE, MAX_PURGE_BATCH, MAX_RETRY_BATCH, NewEvent, PurgePosition,
    PurgeRound, RELEASED_REASON, StoreError, after, capped, purge_batch, unreadable_context,
    walk_start,
};
use super::postgres_url::{UrlError, check_url, redact_url, url_sets};
use crate::context::JobContext;
use crate::secret::Secret;

/// Connections one node keeps for store calls (the leadership connection comes on top). The
/// dispatcher claims deliveries in batches and records outcomes in batches, ingest
/// commits one short transaction per event, and nothing holds a connection while a handler
/// runs: eight keep a node's calls from queueing behind each other while a dozen nodes stay
/// far below PostgreSQL's default `max_connections` of 100.
pub const POOL_SIZE: u32 = 8;

/// How long a store call waits for a free (or new) connection before failing. The dispatcher
/// retries after a pause; an ingest call answers an error instead of hanging. Shorter than
/// ingest's commit timeout (5 s, `api::INGEST_COMMIT_TIMEOUT`) by a margin a loaded machine
/// keeps: a sender refused for want of a connection (the server is down) is told that the
/// store's database cannot be reached, not merely that it did not answer. At 5 s the two
/// raced, and under load the less specific answer won. When nothing refused a connection (a
/// frozen server holds every pooled one), the wait's answer is that the server did not answer
/// ([`LastConnect`]), as the commit timeout's is.
pub const POOL_WAIT: Duration = Duration::from_secs(4);

/// How long a store call waits for a connection, instead of [`POOL_WAIT`], when the pool holds
/// none and the database server refused its latest attempt to make one (a wrong password, no
/// connection slot left, no such database: [`StoreError::Refused`]). Only a new connection can
/// serve the call then, and the server has said it admits none until someone changes a
/// setting: waiting the whole [`POOL_WAIT`] held every ingest request 4 s for the same answer.
/// The pool keeps trying to connect meanwhile (each of its pending connections every 2 s at
/// most), and a call that finds one made within this wait takes it.
pub const REFUSED_POOL_WAIT: Duration = Duration::from_millis(500);

/// How long establishing one connection may take, unless the URL sets `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long what this node sent may stay unacknowledged by the server's host before the
/// connection is given up (`TCP_USER_TIMEOUT`), unless the URL sets `tcp_user_timeout`. A
/// server host that lost power, or a network that silently drops everything between the two,
/// sends no reset: without this, a statement on that connection waits for the kernel's
/// retransmission limit (about 15 minutes on Linux) before it fails, holding one of the pool's
/// connections and the ingest request or claim behind it. A working network acknowledges
/// within a few round trips, so 30 s gives up only on a path that is gone; the pool then
/// connects anew. (A server process that is merely stopped, its host still up, is
/// acknowledged by its kernel: this does not cut it off; ingest's own commit timeout answers
/// those requests.)
pub const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(30);

/// How long a store connection may receive nothing before the kernel probes it (TCP keepalive),
/// and how often it probes after that, unless the URL sets `keepalives_idle` /
/// `keepalives_interval`. [`UNACKNOWLEDGED_LIMIT`] alone covers only what this node sent: a
/// statement (or a connection's start-up exchange) whose bytes the server's host acknowledged
/// just before the network went silent waits for an answer with nothing unacknowledged, and
/// without probes it waited until the server's own retransmission got through after the
/// network returned (about 16 s after a 35 s silence; the default keepalive starts after two
/// hours). A probe is something sent: with the limit set, the kernel gives the connection up
/// once nothing has been received for [`UNACKNOWLEDGED_LIMIT`] and a probe is out, so a
/// connection waiting on an answer is given up as soon as one that sent into the silence is. On
/// a working network an idle pooled connection costs one probe and its acknowledgement every
/// 5 s.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// See [`KEEPALIVE_IDLE`]; 1 s is the finest Linux accepts, and sets how soon after the limit
/// a silent connection is given up.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// A pooled session the server answered on less than this long ago is handed out without first
/// answering an empty query. The check costs a round trip per store call, taken while an
/// ingest request or a claim waits; skipping it for a session that has just answered removes
/// that wait from a busy node's calls, and one that sat idle longer is still checked (as
/// HikariCP does with its 500 ms `aliveBypassWindowMs`). A session that died within the window
/// fails its statement as "unreachable" (ingest answers 503, the dispatcher retries), which any
/// statement could meet an instant after a check, and is then dropped from the pool.
const RECENTLY_ANSWERED: Duration = Duration::from_millis(500);

/// How long [`EventStore::try_lead`] waits for the leadership session to answer a liveness check.
/// A session that does not answer in time is treated as lost, and with it the lock.
const LEAD_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Server-side TCP keepalive of the leadership session, in seconds: idle, interval, count. When
/// a node's host dies without closing its socket, the server ends the session (releasing the
/// poller lock) after about idle + interval × count = 30 s instead of the OS default of hours.
const LEAD_KEEPALIVE_SECS: (u32, u32, u32) = (15, 5, 3);

/// `idle_in_transaction_session_timeout` of pooled sessions is the lease divided by this. A
/// node frozen inside a transaction (SIGSTOP, a paused VM, a partition that leaves the TCP
/// connection open) would otherwise hold that transaction's row locks for as long as it stays
/// frozen. Its leases were renewed at most a third of a lease before it froze, so they expire
/// no sooner than two thirds of a lease later; the server ends the frozen session (rolling its
/// transaction back and releasing its locks) after half a lease, so the locks are gone by the
/// time another node may take those deliveries over. jobhook never waits between the
/// statements of a transaction for anything but its own next round trip; half a lease (at
/// least 500 ms) leaves room for a node whose threads are starved of CPU for a while.
const IDLE_IN_TRANSACTION_PER_LEASE: u32 = 2;

/// `lock_timeout` of pooled sessions is the lease divided by this. Claims and requeues skip
/// locked rows, so a statement waits for a row lock only while another node's short
/// transaction touches the same row; one that waits half a lease fails (and is retried: a
/// failed batch of outcomes is recorded one by one, renewals run again on the next tick)
/// instead of waiting for ever behind a frozen node while its own leases lapse.
const LOCK_WAIT_PER_LEASE: u32 = 2;

/// `statement_timeout` of pooled sessions is the lease divided by this. Every statement of the
/// store touches a handful of rows through an index; one that runs for a whole lease is stuck
/// (a server in trouble, a client that stopped reading), and this node's leases have lapsed
/// behind it anyway.
const STATEMENT_PER_LEASE: u32 = 1;

/// The server-side bounds a pooled session sets on itself when it connects, derived from the
/// lease (see [`IDLE_IN_TRANSACTION_PER_LEASE`], [`LOCK_WAIT_PER_LEASE`],
/// [`STATEMENT_PER_LEASE`]), so that no node — frozen, partitioned or slow — can hold locks that
/// stop the others from taking over its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `idle_in_transaction_session_timeout`.
    pub idle_in_transaction: Duration,
    /// `lock_timeout`.
    pub lock_wait: Duration,
    /// `statement_timeout`.
    pub statement: Duration,
}

impl SessionLimits {
    /// The bounds for claims that last `lease` unrenewed.
    pub fn for_lease(lease: Duration) -> Self {
        // Never 0 ms: PostgreSQL reads 0 as "no limit".
        let part = |divisor: u32| (lease / divisor).max(Duration::from_millis(1));
        SessionLimits {
            idle_in_transaction: part(IDLE_IN_TRANSACTION_PER_LEASE),
            lock_wait: part(LOCK_WAIT_PER_LEASE),
            statement: part(STATEMENT_PER_LEASE),
        }
    }

    /// The `SET` statements that apply them (integers from durations, not user data).
    fn sql(&self) -> String {
        format!(
            "SET idle_in_transaction_session_timeout = {}; SET lock_timeout = {}; \
             SET statement_timeout = {}",
            self.idle_in_transaction.as_millis(),
            self.lock_wait.as_millis(),
            self.statement.as_millis()
        )
    }
}

/// Pooled sessions plan no sequential scan where an index can serve (`enable_seqscan = off`):
/// every statement of the store reaches its rows through an index, and a plan that reads a
/// whole table instead was made on statistics of a table that has since grown. PostgreSQL turns
/// a prepared statement generic after five executions and keeps that plan until the table's
/// statistics change; on a database the engine has just created it is made while `deliveries`
/// holds a few hundred rows, and autovacuum analyses the table a minute later at the soonest.
/// A claim's generic plan made then read every row of `deliveries` to find the few it had
/// chosen (a hash join where an index lookup was due): 15–26 ms per claim at 50,000–80,000
/// rows, where the index takes about 1 ms, and one node fell behind 1,000 events/s × 4 handlers
/// (`auto_explain` of `jobhook-bench`'s scenario g by hand). Planning every execution for the
/// table as it is (`plan_cache_mode = force_custom_plan`) mended the claim but cost the server
/// about 0.25 ms per claim, at over a thousand claims a second: by hand, eight interleaved runs
/// each, ingest p50 0.78–0.98 ms with generic plans, 1.16–1.62 ms with custom ones. The one
/// statement that reads a whole table on purpose, the metrics' count by state, allows it for
/// itself ([`COUNT_BY_STATE`]).
const INDEXES_ONLY: &str = "SET enable_seqscan = off";

/// Every session of the engine runs its transactions at READ COMMITTED, whatever the database,
/// the role or the server sets as `default_transaction_isolation`: the store's statements are
/// written for it. Claims, renewals and requeues skip the rows other sessions hold locked and
/// each statement sees what committed before it began; the migrations' advisory lock makes a
/// node that waited for another's schema change read the version that one committed. Under
/// SERIALIZABLE, which some DBAs make a database's default, two nodes' concurrent commits,
/// claims and renewals failed each other with serialization failures (40001): by hand, with two
/// nodes and 4 × 300 events posted, 507 refused with "the store failed", and lease renewals
/// failed. A transaction that needs another level sets it itself (an event's read: REPEATABLE
/// READ, so that its three reads agree).
const READ_COMMITTED: &str = "SET default_transaction_isolation = 'read committed'";

/// Most times a store call's transaction runs again after the server rolled it back for a
/// serialization failure (40001) or a deadlock (40P01): the server undid the whole transaction
/// and says it may succeed if run again, which every store call's single transaction is safe
/// to do. At READ COMMITTED ([`READ_COMMITTED`]) and with rows locked in one order these are
/// rare (a deadlock with a session outside the engine, an operator's transaction); three tries
/// more see a passing conflict through, and a conflict that keeps coming fails the call as
/// before instead of holding it.
const MAX_CONFLICT_RETRIES: u32 = 3;

/// Pause before a transaction runs again after a conflict ([`MAX_CONFLICT_RETRIES`]), times
/// the number of the try: room for the transaction it met to end, short against the calls'
/// own bounds (an ingest commit waits 5 s at most).
const CONFLICT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// First key of jobhook's two-key advisory locks around migrations, so they cannot collide
/// with locks of other programs using the same database (ASCII "jbhm").
const MIGRATION_LOCK: i32 = 0x6a62_686d;

/// First key of the leadership locks; the second is a hash of the role (ASCII "jbhl").
const LEAD_LOCK: i32 = 0x6a62_686c;

/// First word of the `application_name` of jobhook's sessions (unless the URL sets one); the
/// node id follows it ([`application_name`]), so an operator finds a node's sessions in
/// `pg_stat_activity` and tells the nodes apart.
const APPLICATION_NAME: &str = "jobhook";

/// The longest `application_name` PostgreSQL keeps (`NAMEDATALEN` - 1 bytes); it cuts longer
/// ones. [`application_name`] cuts to this itself, so the name a node reports is the one an
/// operator (or a test) computes from its node id.
const MAX_APPLICATION_NAME: usize = 63;

/// The schema, applied in order; `schema_migrations` records which versions have run. Never
/// edit an applied migration: append a new one.
///
/// Contexts and outcomes are `json` (kept verbatim, like the SQLite store's text), not `jsonb`:
/// `jsonb` refuses `\u0000`, which a hostile handler can put in a log line.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id          uuid PRIMARY KEY,
    received_at timestamptz NOT NULL,
    source      text NOT NULL,
    context     json NOT NULL
);
CREATE TABLE deliveries (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid NOT NULL REFERENCES events (id),
    handler       text NOT NULL,
    state         text NOT NULL
                  CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'skipped')),
    attempt       integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL,
    not_before    timestamptz NOT NULL,
    started_at    timestamptz,
    owner         text,
    lease_until   timestamptz,
    finished_at   timestamptz,
    duration_ms   double precision,
    outcome_class text,
    reason        text,
    outcome       json,
    UNIQUE (event_id, handler)
);
CREATE INDEX deliveries_due ON deliveries (not_before, id) WHERE state = 'pending';
CREATE INDEX deliveries_lease ON deliveries (lease_until) WHERE state = 'running';
CREATE INDEX deliveries_owner ON deliveries (owner) WHERE state = 'running';
CREATE TABLE attempts (
    delivery_id bigint NOT NULL REFERENCES deliveries (id),
    attempt     integer NOT NULL,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL,
    class       text NOT NULL,
    reason      text,
    terminal    boolean NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE TABLE cursors (
    name  text PRIMARY KEY,
    value text NOT NULL
);
"#,
    // Idempotency keys of ingest: the primary key is what lets two nodes racing with one key
    // commit one event (see `CLAIM_KEY`); `created_at` is what the purge walks.
    r#"
CREATE TABLE idempotency_keys (
    key         text PRIMARY KEY,
    event_id    uuid NOT NULL,
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
"#,
    // Keyfactor's message about the job (`NewEvent::message`), when the source had it.
    "ALTER TABLE events ADD COLUMN message text;",
    // Each handler's due deliveries in order, so that a claim seeks every handler with room
    // instead of walking past a saturated handler's backlog (see `CLAIM_BATCH`).
    "CREATE INDEX deliveries_handler_due ON deliveries (handler, not_before, id) \
     WHERE state = 'pending';",
    // Events by receipt time, which retention walks from its oldest end (see `PURGE_FINISHED`)
    // instead of reading the whole table every round.
    "CREATE INDEX events_received ON events (received_at, id);",
    // Failed deliveries, newest first: the list an operator reads and runs again
    // (`FAILED`, `RETRY_FAILED`), without walking the deliveries that succeeded.
    "CREATE INDEX deliveries_failed ON deliveries (id) WHERE state = 'failed';",
    // Failed deliveries counted by handler (`FAILED_BY_HANDLER`) from the index alone; written
    // only when a delivery fails for good or is run again.
    "CREATE INDEX deliveries_failed_handler ON deliveries (handler) WHERE state = 'failed';",
];

/// Why a PostgreSQL store call failed, before it becomes a [`StoreError`].
#[derive(Debug, thiserror::Error)]
enum PgError {
    /// The server or the connection reported an error.
    #[error("{}", describe(.0))]
    Db(#[from] postgres::Error),
    /// No connection became free in time, and the pool's latest attempt to connect failed
    /// without an answer from the server (nothing listens, the address is wrong, the server is
    /// starting or stopping): the server cannot be reached. The attempt's error, as the pool's
    /// own keeps it for one waiter only ([`LastConnect`]).
    #[error("no database connection within {POOL_WAIT:?}; the latest attempt to connect: {0}")]
    Pool(String),
    /// No connection became free in time, and the server answered the pool's latest attempt to
    /// connect with a refusal ([`refusal_advice`]): its error and what to check.
    #[error("{0}")]
    Refused(String),
    /// No connection became free in time, and nothing refused one: every pooled connection is
    /// held by a statement the server has not answered, and any new one is still being set up
    /// (see [`LastConnect`]).
    #[error(
        "no database connection became free within {POOL_WAIT:?}: the server has not answered \
         the statements holding them ({0})"
    )]
    PoolNoAnswer(r2d2::Error),
    /// The database holds a newer schema than this build knows.
    #[error(
        "the database schema is at version {found}, newer than this jobhook knows ({known}); \
         upgrade this node to the version the other nodes run"
    )]
    NewerSchema {
        /// Version in the database.
        found: i32,
        /// Newest version this build knows.
        known: i32,
    },
    /// Stored data could not be decoded.
    #[error("{0}")]
    Corrupt(String),
    /// The store was closed (only while it is being dropped).
    #[error("the store is closed")]
    Closed,
    /// Establishing a connection did not finish in time (see [`connect_within`]).
    #[error("{0}")]
    ConnectStalled(String),
}

/// The whole story of a client error: `postgres::Error`'s own message is only its kind ("db
/// error"); the server's message, detail and hint, or the I/O cause, come with it here.
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    crate::error_chain::chain_text(e)
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Corrupt(message) => StoreError::Corrupt(message),
            PgError::Pool(_) => StoreError::Unreachable(e.to_string()),
            PgError::Refused(why) => StoreError::Refused(why),
            PgError::PoolNoAnswer(_) | PgError::ConnectStalled(_) => {
                StoreError::NoAnswer(e.to_string())
            }
            PgError::Db(ref error) => match error.as_db_error() {
                Some(db) if db.code() == &postgres::error::SqlState::DISK_FULL => {
                    StoreError::DiskFull(e.to_string())
                }
                // A standby, or a server set read-only: "cannot execute INSERT in a read-only
                // transaction".
                Some(db) if db.code() == &postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION => {
                    StoreError::ReadOnly(e.to_string())
                }
                Some(db) if server_unavailable(db.code()) => StoreError::Unreachable(e.to_string()),
                // A connection the server refused (the leadership session's, made outside the
                // pool).
                Some(db) if refusal_advice(db).is_some() => StoreError::Refused(refused(error)),
                // The statement waited past the session's `lock_timeout` (a row another session
                // holds locked) or `statement_timeout`: the store did not answer this write in
                // time; the same write may well succeed later, so it is tried again rather than
                // taken as refused.
                Some(db) if did_not_answer_in_time(db.code()) => {
                    StoreError::NoAnswer(e.to_string())
                }
                Some(_) => StoreError::Database(e.to_string()),
                // No answer from the server: the connection broke or could not be made.
                None => StoreError::Unreachable(e.to_string()),
            },
            other => StoreError::Database(other.to_string()),
        }
    }
}

/// Whether the server's error says a statement gave up waiting: `lock_not_available` (past
/// `lock_timeout`) or `query_canceled` (past `statement_timeout`, or cancelled by an operator).
fn did_not_answer_in_time(code: &postgres::error::SqlState) -> bool {
    use postgres::error::SqlState;
    [SqlState::LOCK_NOT_AVAILABLE, SqlState::QUERY_CANCELED].contains(code)
}

/// What to check when the server refused a connection with `db`, its error; `None` when `db`
/// is no such refusal. A refusal ends the session before it began (severity FATAL) for a reason
/// that stays until someone changes a setting — unlike a server starting up or shutting down
/// ([`server_unavailable`]), which passes by itself.
fn refusal_advice(db: &postgres::error::DbError) -> Option<String> {
    use postgres::error::SqlState;
    if db.severity() != "FATAL" {
        return None;
    }
    let code = db.code();
    let advice = if [
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
    ]
    .contains(code)
    {
        "check [store] password and the user in [store] url against the role on the server, \
         and that its pg_hba.conf admits this host (a new password is read at the engine's \
         start: restart it once [store] password holds it)"
            .to_owned()
    } else if code == &SqlState::TOO_MANY_CONNECTIONS {
        format!(
            "every connection slot is taken: check the role's and the database's CONNECTION \
             LIMIT and the server's max_connections against the nodes (each uses up to {}), and \
             what else holds connections (pg_stat_activity)",
            POOL_SIZE + 1
        )
    } else if code == &SqlState::UNDEFINED_DATABASE {
        "check the database name in [store] url: it does not exist on that server (dropped or \
         renamed?)"
            .to_owned()
    } else if code == &SqlState::INSUFFICIENT_PRIVILEGE {
        "the role may not connect to that database: GRANT CONNECT ON DATABASE to it, or check \
         the user in [store] url"
            .to_owned()
    } else if code == &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE {
        "the database does not accept connections now (ALTER DATABASE … ALLOW_CONNECTIONS, or \
         it is being dropped)"
            .to_owned()
    } else {
        return None;
    };
    Some(advice)
}

/// The words for a connection the server refused: its error and what to check.
fn refused(e: &postgres::Error) -> String {
    match e.as_db_error().and_then(refusal_advice) {
        Some(advice) => format!("{}; {advice}", describe(e)),
        None => describe(e),
    }
}

/// Whether the server's error says it is not there to serve this session: a connection
/// exception (SQLSTATE class 08), or the server shutting down, crashing or starting up
/// (57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now).
fn server_unavailable(code: &postgres::error::SqlState) -> bool {
    use postgres::error::SqlState;
    code.code().starts_with("08")
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code)
}

/// A pooled connection with the statements prepared on it, so repeated calls skip a round trip.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// When the server last answered on this session (see [`RECENTLY_ANSWERED`]).
    answered_at: Instant,
}

impl Conn {
    /// Runs `f` on this session, noting when the server answered on it: with a result, or with
    /// an error of its own that leaves the session open.
    fn run<T>(&mut self, f: &impl Fn(&mut Conn) -> Result<T, PgError>) -> Result<T, PgError> {
        let result = f(self);
        let answered = match &result {
            Ok(_) => true,
            Err(PgError::Db(e)) => {
                e.as_db_error().is_some() && !session_ended(e) && !self.client.is_closed()
            }
            Err(_) => false,
        };
        if answered {
            self.answered_at = Instant::now();
        }
        result
    }

    /// `sql` prepared on this connection (once). It must be one of [`INDEXED_STATEMENTS`] or
    /// [`SCANNING_STATEMENTS`]: builds with debug assertions (the tests) refuse any other, so a
    /// statement added to the store later cannot escape the test of their plans.
    fn prepare(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        debug_assert!(
            INDEXED_STATEMENTS.contains(&sql) || SCANNING_STATEMENTS.contains(&sql),
            "a statement the plan test does not know; list it in INDEXED_STATEMENTS \
             (or in SCANNING_STATEMENTS if it reads a whole table on purpose):\n{sql}"
        );
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// Makes and checks pooled connections for r2d2.
#[derive(Debug)]
struct Manager {
    config: postgres::Config,
    limits: SessionLimits,
    /// How its latest connection attempt ended, shared with the store.
    last_connect: Arc<LastConnect>,
}

/// How the pool's latest attempt to connect ended, so that a wait for a connection that runs
/// out can say why: after an error without an answer from the server (server down, wrong
/// address) it cannot be reached; after a refusal in the server's own words (a wrong password,
/// no connection slot left, no such database: [`refusal_advice`]) it refused, and someone must
/// change a setting; after a success or a set-up that stalled (the server accepted and then
/// said nothing) it is there and not answering. r2d2 keeps only the last error's text, not its
/// kind, and hands that to the first waiter whose wait runs out only: the others were told
/// "timed out waiting for connection" and nothing of the cause. The cause is kept here for all.
#[derive(Debug, Default)]
struct LastConnect {
    kind: AtomicU8,
    /// The latest failed attempt's error (with what to check, for a refusal).
    cause: Mutex<String>,
}

impl LastConnect {
    const ANSWERED: u8 = 0;
    const STALLED: u8 = 1;
    const FAILED: u8 = 2;
    const REFUSED: u8 = 3;

    fn record<T>(&self, attempt: &Result<T, PgError>) {
        let (kind, cause) = match attempt {
            Ok(_) => (Self::ANSWERED, None),
            Err(e @ PgError::ConnectStalled(_)) => (Self::STALLED, Some(e.to_string())),
            Err(PgError::Db(e)) if e.as_db_error().and_then(refusal_advice).is_some() => {
                (Self::REFUSED, Some(refused(e)))
            }
            Err(e) => (Self::FAILED, Some(e.to_string())),
        };
        if let Some(cause) = cause {
            *self.cause.lock().unwrap_or_else(|p| p.into_inner()) = cause;
        }
        self.kind.store(kind, Ordering::Relaxed);
    }

    /// Whether the server refused the latest attempt to connect.
    fn refused(&self) -> bool {
        self.kind.load(Ordering::Relaxed) == Self::REFUSED
    }

    /// The error for a pool wait that ran out.
    fn explain(&self, e: r2d2::Error) -> PgError {
        let cause = || {
            let cause = self.cause.lock().unwrap_or_else(|p| p.into_inner());
            if cause.is_empty() {
                e.to_string()
            } else {
                cause.clone()
            }
        };
        match self.kind.load(Ordering::Relaxed) {
            Self::FAILED => PgError::Pool(cause()),
            Self::REFUSED => PgError::Refused(cause()),
            _ => PgError::PoolNoAnswer(e),
        }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = PgError;

    fn connect(&self) -> Result<Conn, PgError> {
        let settings = format!("{}; {INDEXES_ONLY}; {READ_COMMITTED}", self.limits.sql());
        let attempt = connect_within(&self.config, move |client| client.batch_execute(&settings));
        self.last_connect.record(&attempt);
        Ok(Conn {
            client: attempt?,
            statements: HashMap::new(),
            answered_at: Instant::now(),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), PgError> {
        if conn.answered_at.elapsed() < RECENTLY_ANSWERED {
            return Ok(());
        }
        conn.client.simple_query("")?;
        conn.answered_at = Instant::now();
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.is_closed()
    }
}

/// Sends the pool's connection errors to the log, naming the database without its password, at
/// most once per [`STORE_FAILURE_LOG_INTERVAL`](super::interface::STORE_FAILURE_LOG_INTERVAL) with how
/// many went untold: while the server is down or refuses the engine, each of the pool's pending
/// connections tries again every 2 s at most, which wrote about 4 lines a second per node for
/// as long as that lasted (14,000 an hour) on a disk the store and the mail outbox may share.
/// The calls that fail meanwhile are logged by their callers, with the cause, at the same rate.
#[derive(Debug)]
struct LogErrors {
    target: String,
    limit: crate::log_limit::LogLimit,
}

impl LogErrors {
    fn new(target: String) -> Self {
        LogErrors {
            target,
            limit: crate::log_limit::LogLimit::new(super::interface::STORE_FAILURE_LOG_INTERVAL),
        }
    }
}

impl r2d2::HandleError<PgError> for LogErrors {
    fn handle_error(&self, error: PgError) {
        self.limit.tell(|untold| {
            tracing::warn!(
                database = %self.target,
                more_since_last_warning = untold,
                "store database connection failed: {error}"
            )
        });
    }
}

/// Longest dropping the store waits for its connections to close. Closing takes a round trip;
/// a server that stopped answering would hold the drop (and the end of `serve`) for as long as
/// that lasts.
const STORE_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How long a connection's start-up exchange (authentication, session settings) may take once
/// its TCP connection is made. The server answers it in milliseconds.
pub const STARTUP_EXCHANGE_LIMIT: Duration = Duration::from_secs(5);

/// Connections being set up at once, at most, each on a thread of its own
/// ([`connect_within`]): the pool's three connecting threads, the leadership session and the
/// first connection at start need five; the rest is room for connections given up while the
/// server does not answer, each of which holds its thread until the server answers or the
/// kernel gives the connection up. Past the bound a new connection fails at once instead of
/// leaving one more thread waiting.
const MAX_CONNECTS_IN_PROGRESS: usize = 8;

/// Connections being set up now (see [`MAX_CONNECTS_IN_PROGRESS`]).
static CONNECTS_IN_PROGRESS: AtomicUsize = AtomicUsize::new(0);

/// A place among the connections being set up ([`CONNECTS_IN_PROGRESS`]), given back when
/// dropped (however its thread ends).
struct ConnectSlot(&'static AtomicUsize);

impl ConnectSlot {
    fn take() -> Option<ConnectSlot> {
        Self::take_from(&CONNECTS_IN_PROGRESS, MAX_CONNECTS_IN_PROGRESS)
    }

    /// A place among the `max` that `count` counts, if one is free.
    fn take_from(count: &'static AtomicUsize, max: usize) -> Option<ConnectSlot> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectSlot(count))
    }
}

impl Drop for ConnectSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a connecting thread hands its caller.
#[derive(Default)]
struct Handoff {
    result: Option<Result<Client, postgres::Error>>,
    /// The caller stopped waiting: the thread ends the connection itself.
    abandoned: bool,
}

/// Connects with `config`, runs `prepare` on the new session, and gives it up unless both are
/// done within the TCP connect timeout (per host) plus [`STARTUP_EXCHANGE_LIMIT`]. The client
/// library bounds only the TCP connect: a server or a proxy that accepts the connection and
/// then says nothing (a frozen server, a balancer in front of a dead one) held the caller for
/// good — at start the engine never listened, and in the pool its few connecting threads were
/// held, so that no connection could be made again even after the server came back. The work
/// runs on a thread of its own; a connection given up this way ends on its own once the
/// server answers or the kernel gives it up.
fn connect_within(
    config: &postgres::Config,
    prepare: impl FnOnce(&mut Client) -> Result<(), postgres::Error> + Send + 'static,
) -> Result<Client, PgError> {
    use std::sync::Condvar;
    let hosts = u32::try_from(config.get_hosts().len().max(1)).unwrap_or(u32::MAX);
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT)
        .saturating_mul(hosts)
        .saturating_add(STARTUP_EXCHANGE_LIMIT);
    let Some(slot) = ConnectSlot::take() else {
        return Err(PgError::ConnectStalled(format!(
            "{MAX_CONNECTS_IN_PROGRESS} connections to the database server are being set up \
             (those given up still wait for it to answer); not starting another"
        )));
    };
    let shared = Arc::new((Mutex::new(Handoff::default()), Condvar::new()));
    let theirs = Arc::clone(&shared);
    let config = config.clone();
    std::thread::Builder::new()
        .name("jobhook-pg-connect".into())
        .spawn(move || {
            let _slot = slot;
            let result = config.connect(NoTls).and_then(|mut client| {
                prepare(&mut client)?;
                Ok(client)
            });
            let (handoff, ready) = &*theirs;
            let mut handoff = handoff.lock().unwrap_or_else(|p| p.into_inner());
            if handoff.abandoned {
                drop(handoff);
                // Ends the session, if one was made, on this thread.
                drop(result);
            } else {
                handoff.result = Some(result);
                ready.notify_one();
            }
        })
        .map_err(|e| PgError::ConnectStalled(format!("cannot start a connecting thread: {e}")))?;
    let (handoff, ready) = &*shared;
    let handoff = handoff.lock().unwrap_or_else(|p| p.into_inner());
    let (mut handoff, _) = ready
        .wait_timeout_while(handoff, limit, |h| h.result.is_none())
        .unwrap_or_else(|p| p.into_inner());
    match handoff.result.take() {
        Some(result) => result.map_err(PgError::from),
        None => {
            handoff.abandoned = true;
            Err(PgError::ConnectStalled(format!(
                "the database server did not finish setting up a connection within {limit:?} \
                 (it accepted the connection and then did not answer)"
            )))
        }
    }
}

/// The leadership connection and the roles whose locks it holds.
struct LeadSession {
    client: Client,
    held: BTreeSet<String>,
}

/// The PostgreSQL implementation of [`EventStore`]; see the module documentation.
pub struct PostgresStore {
    /// This process's id in `owner` columns: host, process id and a random part.
    node: String,
    /// The URL with any password replaced, for messages.
    target: String,
    /// Connection settings, for re-establishing the leadership session.
    config: postgres::Config,
    /// `None` only while being dropped.
    pool: Option<r2d2::Pool<Manager>>,
    /// How the pool's latest connection attempt ended, to explain a wait that ran out.
    last_connect: Arc<LastConnect>,
    /// The leadership session, established on first need.
    lead: Arc<Mutex<Option<LeadSession>>>,
    /// The queue's time: the database server's clock, carried between readings.
    clock: QueueClock,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.target)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Closing a connection blocks on its own runtime, which panics on a thread that drives
        // async tasks (the store may be dropped at the end of `serve`): close them elsewhere.
        let pool = self.pool.take();
        let lead = self.lead.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (closed, wait) = std::sync::mpsc::channel::<()>();
        let closer = std::thread::Builder::new()
            .name("jobhook-store-close".into())
            .spawn(move || {
                drop(lead);
                drop(pool);
                let _ = closed.send(());
            });
        if closer.is_ok() {
            // A server that stopped answering never lets its connections close: past the wait
            // they are left to the process's end.
            let _ = wait.recv_timeout(STORE_CLOSE_WAIT);
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL without a password) with
    /// `password`, applies pending migrations and sets up the connection pool.
    ///
    /// Blocks: call it from a blocking context. Errors name the database with any password
    /// replaced by `***` and never contain the password.
    pub fn open(url: &str, password: Option<&Secret>) -> Result<Self, StoreError> {
        Self::open_with_lease(url, password, super::config::DEFAULT_LEASE)
    }

    /// Like [`open`](Self::open), for claims that last `lease` unrenewed: every pooled session
    /// bounds its transactions and lock waits relative to it ([`SessionLimits::for_lease`]).
    pub fn open_with_lease(
        url: &str,
        password: Option<&Secret>,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        // A URL that was checked ([`check_url`]) carries no password; one that was not is not
        // repeated at all.
        let target = match check_url(url) {
            Ok(_) => redact_url(url),
            Err(_) => "[store] url".to_owned(),
        };
        let scrub = |message: String| match password {
            Some(p) if !p.expose().is_empty() => message.replace(p.expose(), "***"),
            _ => message,
        };
        let fail = |message: String| StoreError::Open {
            path: target.clone(),
            message: scrub(message),
        };
        let mut config = parse_url(url).map_err(|e| fail(e.to_string()))?;
        if let Some(password) = password {
            config.password(password.expose());
        }
        let node = node_id();
        apply_defaults(&mut config, &node, url);
        // The migrations and the leadership session run on this one.
        let mut first = connect_within(&config, |client| client.batch_execute(READ_COMMITTED))
            .map_err(|e| {
                fail(format!(
                    "cannot connect: {e}; check [store] url and password, and that the database \
                 exists and accepts connections from this host"
                ))
            })?;
        migrate(&mut first).map_err(|e| {
            let code = |state: &postgres::error::SqlState| {
                matches!(&e, PgError::Db(db) if db.code() == Some(state))
            };
            let waited = code(&postgres::error::SqlState::LOCK_NOT_AVAILABLE);
            let read_only = code(&postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION);
            fail(if read_only {
                format!(
                    "cannot apply the schema: the server takes no writes (a standby, or \
                     default_transaction_read_only set for this database or role), and the \
                     engine writes every event it accepts; point [store] url at the primary, or \
                     turn read-only off ({e})"
                )
            } else if waited {
                format!(
                    "cannot apply the schema: another session holds a lock on the store's tables \
                     (an open transaction; see pg_locks and pg_stat_activity) and the change waited \
                     {MIGRATION_LOCK_WAIT:?} for it, so as not to hold other nodes' writes; start \
                     again once that transaction has ended ({e})"
                )
            } else {
                format!("cannot apply the schema: {e}")
            })
        })?;
        let server_now: DateTime<Utc> = first
            .query_one(SERVER_CLOCK, &[])
            .map(|row| row.get(0))
            .map_err(|e| fail(format!("cannot read the server's clock: {}", describe(&e))))?;
        let lead = prepare_lead_session(&mut first)
            .map(|()| LeadSession {
                client: first,
                held: BTreeSet::new(),
            })
            .map_err(|e| {
                fail(format!(
                    "cannot set up the leadership session: {}",
                    describe(&e)
                ))
            })?;
        let last_connect = Arc::new(LastConnect::default());
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(POOL_WAIT)
            .error_handler(Box::new(LogErrors::new(target.clone())))
            .build(Manager {
                config: config.clone(),
                limits: SessionLimits::for_lease(lease),
                last_connect: Arc::clone(&last_connect),
            })
            .map_err(|e| fail(format!("cannot open the connection pool: {e}")))?;
        let store = PostgresStore {
            node,
            target,
            config,
            pool: Some(pool),
            last_connect,
            lead: Arc::new(Mutex::new(Some(lead))),
            clock: QueueClock::new(server_now),
        };
        keep_lead_session_busy(Arc::downgrade(&store.lead));
        tracing::info!(database = %store.target, node = %store.node, "PostgreSQL store opened");
        Ok(store)
    }

    /// This node's id, as written to `deliveries.owner` for the deliveries it runs.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A pooled connection, or why none became free within [`POOL_WAIT`] — or within
    /// [`REFUSED_POOL_WAIT`] when the pool holds no connection and the server refused its
    /// latest attempt to make one.
    fn checkout(
        &self,
        pool: &r2d2::Pool<Manager>,
    ) -> Result<r2d2::PooledConnection<Manager>, PgError> {
        let wait = if self.last_connect.refused() && pool.state().connections == 0 {
            REFUSED_POOL_WAIT
        } else {
            POOL_WAIT
        };
        pool.get_timeout(wait)
            .map_err(|e| self.last_connect.explain(e))
    }

    /// Runs `f`, one transaction (or one statement), on a pooled connection. When the server
    /// ended the session inside the transaction `f` ran (`idle_in_transaction_session_timeout`:
    /// this node was frozen or starved between two statements), that transaction was rolled
    /// back whole, so `f` runs once more on another connection instead of failing the caller;
    /// when the server rolled it back for a conflict with another transaction (a serialization
    /// failure, a deadlock), it runs again on the same session, up to
    /// [`MAX_CONFLICT_RETRIES`] times.
    fn with<T>(&self, f: impl Fn(&mut Conn) -> Result<T, PgError>) -> Result<T, StoreError> {
        let pool = self.pool.as_ref().ok_or(PgError::Closed)?;
        let mut conn = self.checkout(pool)?;
        match run_through_conflicts(&mut conn, &f) {
            Err(PgError::Db(e)) if rolled_back_by_timeout(&e) => {
                tracing::info!(
                    "a store session was ended by the server inside a transaction ({}); \
                     running the transaction again",
                    describe(&e)
                );
                drop(conn);
                let mut conn = self.checkout(pool)?;
                Ok(run_through_conflicts(&mut conn, &f)?)
            }
            other => Ok(other?),
        }
    }

    /// Like [`with`](Self::with), for reads that change nothing: when the server has ended the
    /// session under it (an idle-in-transaction or statement timeout while this node's threads
    /// were starved, a server restart), the read runs once more on another connection instead
    /// of failing the caller (`GET /v1/events/{id}` would answer 500).
    fn read<T>(&self, f: impl Fn(&mut Conn) -> Result<T, PgError>) -> Result<T, StoreError> {
        let pool = self.pool.as_ref().ok_or(PgError::Closed)?;
        let mut conn = self.checkout(pool)?;
        match run_through_conflicts(&mut conn, &f) {
            // The client may not have noticed the end of the session yet (`is_closed`): a
            // FATAL error is the server saying it ends it.
            Err(PgError::Db(e)) if conn.client.is_closed() || session_ended(&e) => {
                tracing::info!(
                    "a store session was ended by the server ({}); reading again",
                    describe(&e)
                );
                drop(conn);
                let mut conn = self.checkout(pool)?;
                Ok(run_through_conflicts(&mut conn, &f)?)
            }
            other => Ok(other?),
        }
    }

    /// A new leadership session.
    fn connect_lead(&self) -> Result<LeadSession, PgError> {
        let client = connect_within(&self.config, prepare_lead_session)?;
        Ok(LeadSession {
            client,
            held: BTreeSet::new(),
        })
    }
}

/// Runs `f` on `conn`, and again, up to [`MAX_CONFLICT_RETRIES`] times, while the server rolls
/// its transaction back for a conflict with another ([`lost_a_conflict`]).
fn run_through_conflicts<T>(
    conn: &mut Conn,
    f: &impl Fn(&mut Conn) -> Result<T, PgError>,
) -> Result<T, PgError> {
    let mut tries = 0;
    loop {
        match conn.run(f) {
            Err(PgError::Db(e)) if lost_a_conflict(&e) && tries < MAX_CONFLICT_RETRIES => {
                tries += 1;
                tracing::debug!(
                    "a store transaction was rolled back for a conflict with another ({}); \
                     running it again",
                    describe(&e)
                );
                std::thread::sleep(CONFLICT_RETRY_PAUSE.saturating_mul(tries));
            }
            other => return other,
        }
    }
}

/// Whether `e` is the server rolling a transaction back because it conflicted with another:
/// a serialization failure (40001) or a deadlock (40P01). Nothing of it was committed, and the
/// server's hint is that it may succeed if run again.
fn lost_a_conflict(e: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    e.code().is_some_and(|code| {
        [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ]
        .contains(code)
    })
}

/// Whether `e` is the server ending the session (severity FATAL or PANIC).
fn session_ended(e: &postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// Whether `e` is the server ending a session that sat idle inside a transaction
/// (`idle_in_transaction_session_timeout`): that transaction was rolled back, none of it was
/// committed, and running it again in full is safe.
fn rolled_back_by_timeout(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT)
}

/// Makes the server notice a vanished leader host quickly (see [`LEAD_KEEPALIVE_SECS`]), and a
/// frozen leader process (see [`LEAD_IDLE_LIMIT`]).
fn prepare_lead_session(client: &mut Client) -> Result<(), postgres::Error> {
    let (idle, interval, count) = LEAD_KEEPALIVE_SECS;
    // Integers from constants, not user data. On a Unix-socket connection these are ignored.
    client.batch_execute(&format!(
        "SET tcp_keepalives_idle = {idle}; SET tcp_keepalives_interval = {interval}; \
         SET tcp_keepalives_count = {count}"
    ))?;
    let limit = LEAD_IDLE_LIMIT.as_millis();
    match client.batch_execute(&format!("SET idle_session_timeout = {limit}")) {
        // PostgreSQL before 14 has no such setting: a frozen leader then keeps the poller
        // until it is continued or killed, as the keepalives cannot tell it from a live one.
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_OBJECT) => {
            tracing::warn!(
                "the store's PostgreSQL server has no idle_session_timeout (before 14): a frozen \
                 node keeps the poller's leadership until it runs again or dies"
            );
            Ok(())
        }
        other => other,
    }
}

/// How often the leadership session answers a query while its node runs ([`keep_lead_session_busy`]).
const LEAD_PING: Duration = Duration::from_secs(3);

/// `idle_session_timeout` of the leadership session: the server ends it, and with it the
/// poller's lock, once it has sat idle this long. A running node's session answers every
/// [`LEAD_PING`], so only a node whose every thread has stopped (SIGSTOP, a paused VM) goes
/// quiet this long; its host's kernel still answers TCP keepalives, so nothing else would end
/// the session, and no other node could take over the poller. Five pings: a node starved of CPU
/// for a few seconds keeps it.
const LEAD_IDLE_LIMIT: Duration = Duration::from_secs(15);

/// Runs an empty query on the leadership session every [`LEAD_PING`] on a thread of its own,
/// for as long as the store lives (`lead` is its session), so that the session is idle for
/// [`LEAD_IDLE_LIMIT`] only when the whole process has stopped. A session that fails the query
/// is left for [`EventStore::try_lead`] to find lost.
fn keep_lead_session_busy(lead: std::sync::Weak<Mutex<Option<LeadSession>>>) {
    let started = std::thread::Builder::new()
        .name("jobhook-pg-lead".into())
        .spawn(move || {
            loop {
                std::thread::sleep(LEAD_PING);
                let Some(lead) = lead.upgrade() else {
                    return;
                };
                let mut session = lead.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(session) = session.as_mut()
                    && !session.client.is_closed()
                {
                    let _ = session.client.is_valid(LEAD_CHECK_TIMEOUT);
                }
            }
        });
    if let Err(e) = started {
        tracing::warn!(
            "cannot start the thread that keeps the leadership session busy ({e}): a frozen node \
             keeps the poller's leadership until it runs again or dies"
        );
    }
}

/// Applies pending migrations in one transaction, under an advisory lock so that nodes starting
/// together wait for each other instead of racing.
/// Longest a schema change waits for a lock on a table. A change to a table (an index, a
/// column) queues behind any open transaction that touched it, and every other session's
/// statement on that table then queues behind the change: a node starting during a rolling
/// upgrade, behind an operator's forgotten transaction, would hold every other node's writes
/// for as long as that transaction stays open. Past this the start fails, saying why, and
/// nothing is changed.
pub const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(10);

fn migrate(client: &mut Client) -> Result<(), PgError> {
    let mut tx = client.transaction()?;
    // "relation already exists, skipping" notices on every start are noise.
    tx.batch_execute("SET LOCAL client_min_messages = warning")?;
    // Another node applying the schema is waited for; a table lock is not, for long (see
    // `MIGRATION_LOCK_WAIT`).
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        MIGRATION_LOCK_WAIT.as_millis()
    ))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    // Another tool's `schema_migrations` (golang-migrate's version is a bigint) is told apart
    // from this one's, not met as a panic.
    let applied: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )?
        .try_get(0)
        .map_err(|e| {
            PgError::Corrupt(format!(
                "the database's schema_migrations table is not jobhook's ({e}); give jobhook a \
                 database (or schema) of its own"
            ))
        })?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if applied > known {
        return Err(PgError::NewerSchema {
            found: applied,
            known,
        });
    }
    if applied == 0 {
        // Tables of jobhook's names but no version of its schema, in the schema the migrations
        // create them in (the first of `search_path` that exists, not any of it): another
        // program's (the first migration would stop at the first of them with only "relation
        // already exists").
        let taken: Option<String> = tx
            .query_one(
                "SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c \
                 WHERE c.relnamespace = (SELECT oid FROM pg_namespace \
                                         WHERE nspname = current_schema()) \
                   AND c.relname = ANY($1::text[])",
                &[&SCHEMA_TABLES.as_slice()],
            )?
            .get(0);
        if let Some(taken) = taken {
            return Err(PgError::Corrupt(format!(
                "the database already has tables named as jobhook's ({taken}) but no jobhook \
                 schema version: they are another program's; give jobhook a database (or \
                 schema) of its own"
            )));
        }
    }
    for (version, sql) in (1i32..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(applied).unwrap_or(0))
    {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )?;
        tracing::info!(version, "store schema migration applied");
    }
    tx.commit()?;
    Ok(())
}

/// The tables the schema creates, for telling another program's tables of the same names.
const SCHEMA_TABLES: [&str; 5] = [
    "events",
    "deliveries",
    "attempts",
    "cursors",
    "idempotency_keys",
];

/// Parses a `postgres://` / `postgresql://` URL; [`check_url`] explains what is accepted.
/// Sets what `url` (which `config` was parsed from) leaves out: the session's
/// `application_name` (this node), the [`CONNECT_TIMEOUT`], the [`UNACKNOWLEDGED_LIMIT`] and
/// the keepalive probes ([`KEEPALIVE_IDLE`], [`KEEPALIVE_INTERVAL`]). A value the URL gives is
/// kept.
fn apply_defaults(config: &mut postgres::Config, node: &str, url: &str) {
    if config.get_application_name().is_none() {
        config.application_name(&application_name(node));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(UNACKNOWLEDGED_LIMIT);
    }
    // The client library reports its own two-hour keepalive default whether or not the URL
    // gave one, so the URL itself is asked.
    if !url_sets(url, "keepalives_idle") {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVE_INTERVAL);
    }
}

fn parse_url(url: &str) -> Result<postgres::Config, UrlError> {
    check_url(url)
}

/// A per-process node id: `host:pid:random`, readable in `deliveries.owner` and unique even
/// when a process id is reused.
fn node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    let random = Uuid::new_v4().simple().to_string();
    format!(
        "{host}:{}:{}",
        std::process::id(),
        random.get(..12).unwrap_or(&random)
    )
}

/// The `application_name` of the sessions of node `node` (see [`PostgresStore::node`]):
/// `jobhook <node>`, as PostgreSQL shows it in `pg_stat_activity` — characters other than
/// printable ASCII replaced by `?` and cut to [`MAX_APPLICATION_NAME`] bytes, as the server
/// would do.
pub fn application_name(node: &str) -> String {
    format!("{APPLICATION_NAME} {node}")
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(MAX_APPLICATION_NAME)
        .collect()
}

/// The second key of a role's leadership lock: FNV-1a of the role name, stable across builds
/// and platforms (unlike `std`'s hasher).
fn role_key(role: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in role.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// PostgreSQL `text` cannot hold NUL characters; free text from handlers (failure reasons) may.
/// They are replaced by U+FFFD rather than failing the record.
fn text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn attempt_number(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

const INSERT_EVENT: &str = "
    WITH event AS (
        INSERT INTO events (id, received_at, source, context, message)
        VALUES ($1, $2, $3, $4, $6)
        RETURNING id
    )
    INSERT INTO deliveries (event_id, handler, state, created_at, not_before)
    SELECT event.id, h.handler, 'pending', $2, $2
    FROM event, unnest($5::text[]) WITH ORDINALITY AS h (handler, n)
    ORDER BY h.n";

/// Takes an idempotency key for a new event, or takes over one that has outlived its retention
/// (`$5` is the cutoff). A concurrent transaction inserting the same key waits on the unique
/// index until this one ends, then finds the key held (or free, if this one rolled back): one
/// key, one event, with no check-then-insert window.
const CLAIM_KEY: &str = "
    INSERT INTO idempotency_keys (key, event_id, fingerprint, created_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (key) DO UPDATE SET event_id = excluded.event_id,
        fingerprint = excluded.fingerprint, created_at = excluded.created_at
    WHERE idempotency_keys.created_at < $5";

const HELD_KEY: &str = "SELECT event_id, fingerprint FROM idempotency_keys WHERE key = $1";

const HANDLERS_OF: &str = "SELECT handler FROM deliveries WHERE event_id = $1 ORDER BY id";

const PURGE_KEYS: &str = "
    DELETE FROM idempotency_keys
    WHERE key IN (SELECT key FROM idempotency_keys WHERE created_at < $1
                  ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Looks at the next `$2` events received before `$1` after (`$3`, `$4`) (receipt time, id), a
/// range of `events_received`, and deletes the finished ones with their deliveries and attempts,
/// in one statement; answers how many were deleted, how many looked at, and the last one looked
/// at. Every delivery of a finished event is terminal (or it has none), and a terminal delivery
/// changes again only when an operator runs it again (`RETRY_FAILED`, which locks it first: the
/// deliveries' delete here takes terminal ones only, so one made pending under it stays and the
/// event's delete then fails on it — nothing is deleted, and the next walk keeps the event). The
/// events are locked, skipping those another node's purge holds (`SKIP LOCKED`), so that nodes
/// purging at once neither wait for nor repeat each other; in `events_received` order, so that
/// locks are always taken in one order. The children's deletions are sibling statements of the
/// events' and the foreign keys are checked at the end of the statement, when the children are
/// gone.
const PURGE_FINISHED: &str = "
    WITH examined AS (
        SELECT e.id, e.received_at FROM events e
        WHERE e.received_at < $1 AND (e.received_at, e.id) > ($3, $4)
        ORDER BY e.received_at, e.id
        LIMIT $2
    ), doomed AS (
        SELECT e.id FROM events e
        WHERE e.id IN (SELECT id FROM examined)
          AND NOT EXISTS (SELECT 1 FROM deliveries d
                          WHERE d.event_id = e.id AND d.state IN ('pending', 'running'))
        FOR UPDATE SKIP LOCKED
    ), gone_attempts AS (
        DELETE FROM attempts a USING deliveries d, doomed
        WHERE a.delivery_id = d.id AND d.event_id = doomed.id
    ), gone_deliveries AS (
        DELETE FROM deliveries d USING doomed
        WHERE d.event_id = doomed.id AND d.state NOT IN ('pending', 'running')
    ), gone_events AS (
        DELETE FROM events e USING doomed WHERE e.id = doomed.id RETURNING 1
    ), last AS (
        SELECT received_at, id FROM examined ORDER BY received_at DESC, id DESC LIMIT 1
    )
    SELECT (SELECT count(*) FROM gone_events), (SELECT count(*) FROM examined),
           (SELECT received_at FROM last), (SELECT id FROM last)";

/// Failed deliveries that `$1` (handler), `$2` (event) and `$3` (an id above every one chosen)
/// select when not null, newest first, at most `$4` (`deliveries_failed`).
macro_rules! failed_where {
    () => {
        "d.state = 'failed' AND ($1::text IS NULL OR d.handler = $1)
         AND ($2::uuid IS NULL OR d.event_id = $2) AND ($3::bigint IS NULL OR d.id < $3)"
    };
}

/// The list of failed deliveries ([`EventStore::failed_deliveries`]).
const FAILED: &str = concat!(
    "SELECT d.id, d.event_id, d.handler, d.attempt, d.finished_at, d.outcome_class, d.reason
     FROM deliveries d WHERE ",
    failed_where!(),
    " ORDER BY d.id DESC LIMIT $4"
);

/// Failed deliveries made pending again, due at `$5` ([`EventStore::retry_failed`]). The rows
/// are locked first: a retention purge that deleted one first has it skipped here (gone when
/// the lock is had), and one that comes after finds a pending delivery — by its snapshot, or by
/// re-reading the row its delete waited for (`PURGE_FINISHED` deletes only terminal
/// deliveries, and its event's delete then fails on the one left: nothing is deleted).
const RETRY_FAILED: &str = concat!(
    "WITH chosen AS (
        SELECT d.id FROM deliveries d WHERE ",
    failed_where!(),
    " ORDER BY d.id DESC LIMIT $4
        FOR UPDATE
    )
    UPDATE deliveries d SET state = 'pending', not_before = $5, owner = NULL, lease_until = NULL
    FROM chosen WHERE d.id = chosen.id AND d.state = 'failed'
    RETURNING d.id"
);

const UPSERT_CURSOR: &str = "
    INSERT INTO cursors (name, value) VALUES ($1, $2)
    ON CONFLICT (name) DO UPDATE SET value = excluded.value";

/// Claims a batch in one statement. The handlers with pending deliveries are found by a loose
/// index scan of `deliveries_handler_due` (one seek per handler); for each handler not in `$2`
/// its oldest due deliveries, at most its room (`$6`/`$7`, or `$8` for a handler not listed)
/// and the batch size, are read from the same index and locked, skipping rows another node has locked (`SKIP LOCKED`); `$5`
/// of those are marked running, taken in the order by which [`ClaimLimits::choose`] shares a
/// claim between handlers: the deliveries the handler would be running before this one (its
/// share's running count, `$9`/`$10`, plus its candidates ahead of this one), then when it was
/// last served (`$9`/`$11`), then the oldest due.
///
/// One scan of every due delivery that skipped the saturated handlers would walk past their
/// whole backlog on every claim while holding the claim's locks: 6.8 ms per claim with 20,000
/// deliveries of one saturated handler waiting, against 0.44 ms this way (EXPLAIN ANALYZE on
/// PostgreSQL 15, 32-delivery batch).
const CLAIM_BATCH: &str = "
    WITH RECURSIVE pending(handler) AS (
        (SELECT handler FROM deliveries WHERE state = 'pending' ORDER BY handler LIMIT 1)
        UNION ALL
        SELECT (SELECT d.handler FROM deliveries AS d
                WHERE d.state = 'pending' AND d.handler > p.handler
                ORDER BY d.handler LIMIT 1)
        FROM pending AS p WHERE p.handler IS NOT NULL
    ), candidates AS (
        SELECT c.id, c.not_before,
               coalesce(share.running, 0) - 1
                   + row_number() OVER (PARTITION BY p.handler ORDER BY c.not_before, c.id)
                   AS running,
               coalesce(share.served, 0) AS served
        FROM pending AS p
        LEFT JOIN unnest($6::text[], $7::bigint[]) AS room(handler, room)
            ON room.handler = p.handler
        LEFT JOIN unnest($9::text[], $10::bigint[], $11::bigint[])
            AS share(handler, running, served)
            ON share.handler = p.handler
        CROSS JOIN LATERAL (
            SELECT d.id, d.not_before FROM deliveries AS d
            WHERE d.state = 'pending' AND d.handler = p.handler AND d.not_before <= $1
            ORDER BY d.not_before, d.id
            LIMIT least($5, coalesce(room.room, $8))
            FOR UPDATE OF d SKIP LOCKED
        ) AS c
        WHERE p.handler IS NOT NULL AND p.handler <> ALL ($2::text[])
    ), chosen AS (
        SELECT id FROM candidates ORDER BY running, served, not_before, id LIMIT $5
    )
    UPDATE deliveries AS d
    SET state = 'running', attempt = d.attempt + 1, started_at = $1, owner = $3, lease_until = $4
    FROM events AS e
    WHERE d.id IN (SELECT id FROM chosen) AND e.id = d.event_id
    RETURNING d.id, d.event_id, d.handler, d.attempt, e.context, d.not_before, e.source, e.message";

/// Records a batch of outcomes in one statement: `$1`–`$10` are parallel arrays, one element per
/// outcome (delivery id, attempt, new state, not-before, duration, class, reason, outcome,
/// terminal, when the attempt ended); `$11` is this node. A delivery's row is updated,
/// and its attempt recorded, only while this node still holds that attempt's claim; the ids of
/// the rows recorded are returned.
///
/// The rows are locked in id order first, as every multi-row update of `deliveries` does (see
/// `RENEW`), so that two nodes' transactions cannot wait for each other in a cycle. Each is
/// found by its primary key alone and checked once locked: `LIMIT 1` keeps the checks out of
/// the lookup, where they would let the planner read the partial index of running deliveries
/// of this owner instead. That index keeps an entry for every delivery that ran since the
/// table was last vacuumed, which the planner cannot see: 31,395 entries and 4,023 table pages
/// read to record 64 outcomes, 12–19 ms, where the primary key takes 64 lookups (`auto_explain`
/// of a by-hand run at 1,000 events/s × 4 handlers). One
/// statement instead of one per outcome: at 4,000 outcomes/s, a round trip and an executor start
/// per outcome were the largest share of the recorder's time (`jobhook-bench`, scenario g).
const FINISH_BATCH: &str = "
    WITH f AS (
        SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::timestamptz[],
                             $5::float8[], $6::text[], $7::text[], $8::json[], $9::boolean[],
                             $10::timestamptz[])
            AS f (id, attempt, state, not_before, duration_ms, class, reason, outcome, terminal,
                  finished_at)
    ), locked AS (
        SELECT d.id
        FROM (SELECT id, attempt FROM f ORDER BY id) AS o
        CROSS JOIN LATERAL (
            SELECT d.id, d.attempt, d.state, d.owner FROM deliveries AS d WHERE d.id = o.id
            LIMIT 1 FOR UPDATE
        ) AS d
        WHERE d.attempt = o.attempt AND d.state = 'running' AND d.owner = $11
    ), done AS (
        UPDATE deliveries AS d
        SET state = f.state, not_before = f.not_before, finished_at = f.finished_at,
            duration_ms = f.duration_ms, outcome_class = f.class, reason = f.reason,
            outcome = f.outcome
        FROM f
        WHERE d.id IN (SELECT id FROM locked) AND f.id = d.id AND f.attempt = d.attempt
        RETURNING d.id, d.attempt, d.started_at, f.finished_at, f.class, f.reason, f.terminal
    ), recorded AS (
        INSERT INTO attempts (delivery_id, attempt, started_at, finished_at, class, reason, terminal)
        SELECT id, attempt, started_at, finished_at, class, reason, terminal FROM done
    )
    SELECT id FROM done";

// Multi-row updates lock their rows in id order (`ORDER BY id FOR UPDATE`), as
// `finish_batch` does, so that two transactions of two nodes never wait for each other in a cycle.
// The renewal skips a row another session holds locked (an operator's open transaction, a
// statement that waits): waiting for it would hit `lock_timeout` and renew none of this node's
// leases, and other nodes would requeue every delivery it runs. A skipped row cannot be
// requeued while it is locked either (the requeue skips it too); the next renewal takes it.

const RENEW: &str = "
    UPDATE deliveries SET lease_until = $2
    WHERE id IN (SELECT id FROM deliveries WHERE owner = $1 AND state = 'running'
                 ORDER BY id FOR UPDATE SKIP LOCKED)";

// The requeue skips rows another session has locked: a node frozen inside a transaction
// holds its rows until the server ends its session (`idle_in_transaction_session_timeout`),
// and the requeue must neither wait for that nor stop at it; the next round takes them.
// Both requeues record the attempt they interrupt (class `$2`, reason `$3`, never terminal)
// in the same statement, and count the deliveries handed back.
const REQUEUE_EXPIRED: &str = "
    WITH requeued AS (
        UPDATE deliveries SET state = 'pending', owner = NULL, lease_until = NULL
        WHERE id IN (SELECT id FROM deliveries
                     WHERE state = 'running' AND (lease_until IS NULL OR lease_until < $1)
                     ORDER BY id FOR UPDATE SKIP LOCKED)
        RETURNING id, attempt, started_at
    ), recorded AS (
        INSERT INTO attempts
            (delivery_id, attempt, started_at, finished_at, class, reason, terminal)
        SELECT id, attempt, started_at, $1, $2, $3, false FROM requeued
        ON CONFLICT DO NOTHING
    )
    SELECT count(*) FROM requeued";

const RELEASE_OWN: &str = "
    WITH released AS (
        UPDATE deliveries SET state = 'pending', owner = NULL, lease_until = NULL
        WHERE id IN (SELECT id FROM deliveries WHERE state = 'running' AND owner = $1
                     ORDER BY id FOR UPDATE)
        RETURNING id, attempt, started_at
    ), recorded AS (
        INSERT INTO attempts
            (delivery_id, attempt, started_at, finished_at, class, reason, terminal)
        SELECT id, attempt, started_at, $4, $2, $3, false FROM released
        ON CONFLICT DO NOTHING
    )
    SELECT count(*) FROM released";

const EVENT: &str = "SELECT received_at, source, context, message FROM events WHERE id = $1";

const EVENT_DELIVERIES: &str = "
    SELECT id, handler, state, attempt, created_at, started_at, finished_at, duration_ms,
           outcome_class, reason, outcome
    FROM deliveries WHERE event_id = $1 ORDER BY id";

const EVENT_ATTEMPTS: &str = "
    SELECT a.delivery_id, a.attempt, a.started_at, a.finished_at, a.class, a.reason, a.terminal
    FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
    WHERE d.event_id = $1 ORDER BY a.delivery_id, a.attempt";

/// The earliest time a pending delivery of a handler with room is due: `$1`/`$2` each listed
/// handler's room, `$3` the room of those not listed (see [`EventStore::next_due`]). Each pending
/// handler is found, and its earliest due time read, by one seek of `deliveries_handler_due`,
/// as in [`CLAIM_BATCH`].
const NEXT_DUE: &str = "
    WITH RECURSIVE pending(handler) AS (
        (SELECT handler FROM deliveries WHERE state = 'pending' ORDER BY handler LIMIT 1)
        UNION ALL
        SELECT (SELECT d.handler FROM deliveries AS d
                WHERE d.state = 'pending' AND d.handler > p.handler
                ORDER BY d.handler LIMIT 1)
        FROM pending AS p WHERE p.handler IS NOT NULL
    )
    SELECT min(due.not_before)
    FROM pending AS p
    LEFT JOIN unnest($1::text[], $2::bigint[]) AS room(handler, room)
        ON room.handler = p.handler
    CROSS JOIN LATERAL (
        SELECT d.not_before FROM deliveries AS d
        WHERE d.state = 'pending' AND d.handler = p.handler
        ORDER BY d.not_before LIMIT 1
    ) AS due
    WHERE p.handler IS NOT NULL AND coalesce(room.room, $3) > 0";

/// Reads all of `deliveries`, so it runs where sequential scans are allowed again
/// ([`with_scans_allowed`]).
const COUNT_BY_STATE: &str = "SELECT state, count(*) FROM deliveries GROUP BY state ORDER BY state";

const PENDING_BY_HANDLER: &str = "SELECT handler, count(*) FROM deliveries WHERE state = 'pending'
    GROUP BY handler ORDER BY handler";

const FAILED_BY_HANDLER: &str = "SELECT handler, count(*) FROM deliveries WHERE state = 'failed'
    GROUP BY handler ORDER BY handler";

/// Every statement the store prepares on its pooled sessions that must find its rows through
/// an index (see [`INDEXES_ONLY`]); a test checks the plan PostgreSQL keeps for each.
const INDEXED_STATEMENTS: &[&str] = &[
    INSERT_EVENT,
    CLAIM_KEY,
    HELD_KEY,
    HANDLERS_OF,
    PURGE_KEYS,
    PURGE_FINISHED,
    UPSERT_CURSOR,
    CLAIM_BATCH,
    FINISH_BATCH,
    RENEW,
    REQUEUE_EXPIRED,
    RELEASE_OWN,
    EVENT,
    EVENT_DELIVERIES,
    EVENT_ATTEMPTS,
    NEXT_DUE,
    PENDING_BY_HANDLER,
    FAILED_BY_HANDLER,
    CURSOR,
    FAILED,
    RETRY_FAILED,
];

/// The prepared statements that read a whole table on purpose, each inside a transaction that
/// allows it ([`SCANS_ALLOWED`]).
const SCANNING_STATEMENTS: &[&str] = &[COUNT_BY_STATE];

/// Allows sequential scans for the rest of the transaction (see [`INDEXES_ONLY`]). No index
/// serves a count of every row, so the planner scans the table either way; with scans off it
/// prices that scan at PostgreSQL's `disable_cost` (10¹⁰), which lifts the statement over the
/// thresholds of JIT compilation and turns a hash aggregate into a sort. By hand on PostgreSQL 15
/// here, 15,000 deliveries: 126 ms for the count with scans off (JIT with inlining and
/// optimisation), 3.7 ms with scans off and JIT off, 2.1 ms with scans allowed — for every
/// scrape of the metrics.
const SCANS_ALLOWED: &str = "SET LOCAL enable_seqscan = on";

const CURSOR: &str = "SELECT value FROM cursors WHERE name = $1";

const TRY_LEAD: &str = "SELECT pg_try_advisory_lock($1, $2)";

/// The server's clock, the reference of the queue's time ([`QueueClock`]).
const SERVER_CLOCK: &str = "SELECT clock_timestamp()";

/// Runs `read` in a transaction of its own in which sequential scans are allowed
/// ([`SCANS_ALLOWED`]), for a statement that reads a whole table on purpose.
fn with_scans_allowed<T>(
    client: &mut Client,
    read: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T, postgres::Error>,
) -> Result<T, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.batch_execute(SCANS_ALLOWED)?;
    let result = read(&mut tx)?;
    tx.commit()?;
    Ok(result)
}

/// Deliveries of one state counted by handler on `conn` with `sql` (`PENDING_BY_HANDLER` or
/// `FAILED_BY_HANDLER`), in name order.
fn counted_by_handler(conn: &mut Conn, sql: &'static str) -> Result<Vec<(String, u64)>, PgError> {
    let statement = conn.prepare(sql)?;
    let rows = conn.client.query(&statement, &[])?;
    rows.into_iter()
        .map(|row| {
            let n = u64::try_from(row.try_get::<_, i64>(1)?).unwrap_or(0);
            Ok((row.try_get::<_, String>(0)?, n))
        })
        .collect()
}

/// Deliveries by state, counted on `conn` (a read of every row of `deliveries`).
fn count_by_state_on(conn: &mut Conn) -> Result<Vec<(DeliveryState, u64)>, PgError> {
    let count = conn.prepare(COUNT_BY_STATE)?;
    let rows = with_scans_allowed(&mut conn.client, |tx| tx.query(&count, &[]))?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let state = DeliveryState::parse(row.get::<_, &str>(0))?;
            Some((state, u64::try_from(row.get::<_, i64>(1)).ok()?))
        })
        .collect())
}

/// Inserts one event and its deliveries with `client`: one statement, so on a bare session it
/// commits both on its own, and inside a transaction it is part of that transaction.
fn insert_event_with(
    client: &mut impl GenericClient,
    statement: &Statement,
    event: &NewEvent,
    now: DateTime<Utc>,
) -> Result<(), postgres::Error> {
    let source = text(&event.source);
    let message = event.message.as_deref().map(text);
    let message = message.as_deref();
    let handlers: Vec<&str> = event.handlers.iter().map(String::as_str).collect();
    let context = event.context.to_json();
    client.execute(
        statement,
        &[
            &event.id,
            &now,
            &source.as_ref(),
            &context,
            &handlers,
            &message,
        ],
    )?;
    Ok(())
}

impl EventStore for PostgresStore {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn keep_time(&self) -> Result<Option<TimeDelta>, StoreError> {
        let asked = std::time::Instant::now();
        let reference: DateTime<Utc> =
            self.read(|conn| Ok(conn.client.query_one(SERVER_CLOCK, &[])?.get(0)))?;
        let step = self.clock.observe_remote(reference, asked.elapsed());
        if let Some(step) = step {
            // Every node reads the same clock, so nothing is moved: a lease, a due time and a
            // key's retention keep their meaning for all of them.
            tracing::warn!(
                step_ms = step.num_milliseconds(),
                "the database server's clock stepped by {:+.3} s; waits under way are shorter \
                 or longer by that much",
                step.num_milliseconds() as f64 / 1000.0
            );
        }
        Ok(step)
    }

    fn insert_event(&self, event: &NewEvent) -> Result<(), StoreError> {
        // One statement in its own implicit transaction: one round trip instead of three
        // (BEGIN, the insert, COMMIT) while the ingest request waits.
        self.with(|conn| {
            let insert = conn.prepare(INSERT_EVENT)?;
            insert_event_with(&mut conn.client, &insert, event, self.clock.now())?;
            Ok(())
        })
    }

    fn insert_event_once(
        &self,
        event: &NewEvent,
        key: &Idempotency,
    ) -> Result<Inserted, StoreError> {
        let now = self.clock.now();
        // Before the epoch nothing was stored: an unrepresentable cutoff means "keep all".
        let cutoff = chrono::Duration::from_std(key.retention)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .filter(|t| *t > DateTime::UNIX_EPOCH)
            .unwrap_or(DateTime::UNIX_EPOCH);
        self.with(|conn| {
            let claim = conn.prepare(CLAIM_KEY)?;
            let insert = conn.prepare(INSERT_EVENT)?;
            let held = conn.prepare(HELD_KEY)?;
            let handlers_of = conn.prepare(HANDLERS_OF)?;
            let mut tx = conn.client.transaction()?;
            let taken = tx.execute(
                &claim,
                &[&key.key, &event.id, &key.fingerprint, &now, &cutoff],
            )?;
            if taken == 1 {
                insert_event_with(&mut tx, &insert, event, now)?;
                tx.commit()?;
                return Ok(Ok(Inserted::New));
            }
            let Some(row) = tx.query_opt(&held, &[&key.key])? else {
                return Err(PgError::Corrupt(
                    "an idempotency key vanished while it was being used; retry".into(),
                ));
            };
            let original: Uuid = row.get(0);
            let fingerprint: String = row.get(1);
            if fingerprint != key.fingerprint {
                return Ok(Err(StoreError::IdempotencyConflict { event_id: original }));
            }
            let handlers = tx
                .query(&handlers_of, &[&original])?
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect();
            tx.commit()?;
            Ok(Ok(Inserted::Existing {
                event_id: original,
                handlers,
            }))
        })?
    }

    fn purge_idempotency_keys(&self, before: DateTime<Utc>, max: usize) -> Result<u64, StoreError> {
        let limit = capped(max, MAX_PURGE_BATCH);
        self.with(|conn| {
            let purge = conn.prepare(PURGE_KEYS)?;
            Ok(conn.client.execute(&purge, &[&before, &limit])?)
        })
    }

    fn purge_finished(
        &self,
        before: DateTime<Utc>,
        max: usize,
        from: Option<PurgePosition>,
    ) -> Result<PurgeRound, StoreError> {
        let limit = purge_batch(max);
        let from = from.unwrap_or_else(walk_start);
        self.with(|conn| {
            let purge = conn.prepare(PURGE_FINISHED)?;
            let after = Uuid::from_u128(from.tiebreak);
            let row = conn
                .client
                .query_one(&purge, &[&before, &limit, &from.received_at, &after])?;
            let (deleted, examined): (i64, i64) = (row.get(0), row.get(1));
            let last: Option<(DateTime<Utc>, Uuid)> = row
                .get::<_, Option<DateTime<Utc>>>(2)
                .zip(row.get::<_, Option<Uuid>>(3));
            Ok(PurgeRound {
                deleted: u64::try_from(deleted).unwrap_or(0),
                next: last
                    .filter(|_| examined >= limit)
                    .map(|(received_at, id)| PurgePosition {
                        received_at,
                        tiebreak: id.as_u128(),
                    }),
            })
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
        let excluded = limits.excluded();
        let batch = i64::try_from(limits.batch_size()).unwrap_or(1);
        let others = i64::try_from(limits.others).unwrap_or(i64::MAX);
        let (room_handlers, room): (Vec<&str>, Vec<i64>) = limits
            .room
            .iter()
            .filter(|(_, room)| **room > 0)
            .map(|(handler, room)| (handler.as_str(), i64::try_from(*room).unwrap_or(i64::MAX)))
            .unzip();
        let mut share_handlers = Vec::with_capacity(limits.shares.len());
        let mut running = Vec::with_capacity(limits.shares.len());
        let mut served = Vec::with_capacity(limits.shares.len());
        for (handler, share) in &limits.shares {
            share_handlers.push(handler.as_str());
            running.push(i64::try_from(share.running).unwrap_or(i64::MAX));
            served.push(i64::try_from(share.served).unwrap_or(i64::MAX));
        }
        let mut rows = self.with(|conn| {
            // The time the claim starts is taken once a connection is held: the wait for one
            // (up to POOL_WAIT, while the server restarts) would otherwise make a claim whose
            // lease had run out before it began, which another node requeues as abandoned
            // while this one runs it.
            let now = now.max(self.clock.now());
            let lease_until = after(now, lease);
            let claim = conn.prepare(CLAIM_BATCH)?;
            Ok(conn.client.query(
                &claim,
                &[
                    &now,
                    &excluded,
                    &self.node,
                    &lease_until,
                    &batch,
                    &room_handlers,
                    &room,
                    &others,
                    &share_handlers,
                    &running,
                    &served,
                ],
            )?)
        })?;
        // Oldest first, as the candidates were chosen (RETURNING keeps no order).
        rows.sort_by_key(|row| (row.get::<_, DateTime<Utc>>(5), row.get::<_, i64>(0)));
        rows.into_iter()
            .map(|row| {
                let event_id: Uuid = row.get(1);
                let context: serde_json::Value = row.get(4);
                let context = JobContext::from_json_value(&context)
                    .map_err(|e| unreadable_context(event_id, &e));
                Ok(Claim {
                    delivery_id: row.get(0),
                    event_id,
                    handler: row.get(2),
                    attempt: attempt_number(row.get(3)),
                    context,
                    source: row.get(6),
                    message: row.get(7),
                })
            })
            .collect()
    }

    fn renew(&self, now: DateTime<Utc>, lease: Duration) -> Result<(), StoreError> {
        self.with(|conn| {
            // From when a connection is held, as for a claim.
            let lease_until = after(now.max(self.clock.now()), lease);
            let renew = conn.prepare(RENEW)?;
            conn.client.execute(&renew, &[&self.node, &lease_until])?;
            Ok(())
        })
    }

    fn finish_batch(
        &self,
        finished: &[(&Claim, &AttemptRecord)],
    ) -> Result<Vec<Finish>, StoreError> {
        for (_, record) in finished {
            record.check()?;
        }
        let now = self.clock.now();
        let mut ids = Vec::with_capacity(finished.len());
        let mut attempts = Vec::with_capacity(finished.len());
        let mut states = Vec::with_capacity(finished.len());
        let mut not_befores = Vec::with_capacity(finished.len());
        let mut durations = Vec::with_capacity(finished.len());
        let mut classes = Vec::with_capacity(finished.len());
        let mut reasons = Vec::with_capacity(finished.len());
        let mut outcomes = Vec::with_capacity(finished.len());
        let mut terminals = Vec::with_capacity(finished.len());
        let mut ends = Vec::with_capacity(finished.len());
        for (claim, record) in finished {
            ids.push(claim.delivery_id);
            attempts.push(i32::try_from(claim.attempt).unwrap_or(i32::MAX));
            states.push(record.state.as_str());
            not_befores.push(record.retry_at.unwrap_or(now));
            durations.push(record.duration_ms());
            classes.push(text(&record.class).into_owned());
            reasons.push(record.reason.as_deref().map(|r| text(r).into_owned()));
            outcomes.push(
                record
                    .outcome
                    .as_ref()
                    .and_then(|o| serde_json::to_value(o).ok()),
            );
            terminals.push(record.state.is_terminal());
            ends.push(record.finished_at);
        }
        let recorded: HashSet<i64> = self.with(|conn| {
            let finish = conn.prepare(FINISH_BATCH)?;
            let params: [&(dyn ToSql + Sync); 11] = [
                &ids,
                &attempts,
                &states,
                &not_befores,
                &durations,
                &classes,
                &reasons,
                &outcomes,
                &terminals,
                &ends,
                &self.node,
            ];
            Ok(conn
                .client
                .query(&finish, &params)?
                .iter()
                .map(|row| row.get::<_, i64>(0))
                .collect())
        })?;
        Ok(finished
            .iter()
            .map(|(claim, _)| {
                if recorded.contains(&claim.delivery_id) {
                    Finish::Recorded
                } else {
                    tracing::info!(
                        delivery = claim.delivery_id,
                        attempt = claim.attempt,
                        "attempt not recorded: its claim was taken over after the lease expired"
                    );
                    Finish::Late
                }
            })
            .collect())
    }

    fn requeue_abandoned(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.with(|conn| {
            let requeue = conn.prepare(REQUEUE_EXPIRED)?;
            let n: i64 = conn
                .client
                .query_one(&requeue, &[&now, &INTERRUPTED_CLASS, &ABANDONED_REASON])?
                .get(0);
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn release_all(&self) -> Result<u64, StoreError> {
        self.with(|conn| {
            let release = conn.prepare(RELEASE_OWN)?;
            let n: i64 = conn
                .client
                .query_one(
                    &release,
                    &[
                        &self.node,
                        &INTERRUPTED_CLASS,
                        &RELEASED_REASON,
                        &self.clock.now(),
                    ],
                )?
                .get(0);
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn event(&self, id: Uuid) -> Result<Option<EventView>, StoreError> {
        self.read(|conn| {
            let event = conn.prepare(EVENT)?;
            let deliveries = conn.prepare(EVENT_DELIVERIES)?;
            let attempts = conn.prepare(EVENT_ATTEMPTS)?;
            // One snapshot for the three reads, so a delivery and its attempts agree.
            let mut tx = conn
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let Some(row) = tx.query_opt(&event, &[&id])? else {
                return Ok(None);
            };
            let received_at: DateTime<Utc> = row.get(0);
            let source: String = row.get(1);
            let context: serde_json::Value = row.get(2);
            let message: Option<String> = row.get(3);
            let delivery_rows = tx.query(&deliveries, &[&id])?;
            let mut attempts_of: BTreeMap<i64, Vec<AttemptView>> = BTreeMap::new();
            for a in tx.query(&attempts, &[&id])? {
                attempts_of.entry(a.get(0)).or_default().push(AttemptView {
                    attempt: attempt_number(a.get(1)),
                    started_at: a.get(2),
                    finished_at: a.get(3),
                    class: a.get(4),
                    reason: a.get(5),
                    terminal: a.get(6),
                });
            }
            tx.commit()?;
            let mut views = Vec::with_capacity(delivery_rows.len());
            for d in delivery_rows {
                let delivery_id: i64 = d.get(0);
                let state: String = d.get(2);
                let state = DeliveryState::parse(&state)
                    .ok_or_else(|| PgError::Corrupt(format!("unknown delivery state {state:?}")))?;
                let outcome: Option<serde_json::Value> = d.get(10);
                let logs = outcome
                    .as_ref()
                    .and_then(|o| o.get("logs"))
                    .and_then(|l| l.as_array().cloned())
                    .unwrap_or_default();
                views.push(DeliveryView {
                    handler: d.get(1),
                    state,
                    attempt: attempt_number(d.get(3)),
                    created_at: d.get(4),
                    started_at: d.get(5),
                    finished_at: d.get(6),
                    duration_ms: d.get(7),
                    outcome: d.get(8),
                    reason: d.get(9),
                    logs,
                    attempts: attempts_of.remove(&delivery_id).unwrap_or_default(),
                });
            }
            Ok(Some(EventView {
                id,
                received_at,
                source,
                context,
                message,
                deliveries: views,
            }))
        })
    }

    fn next_due(&self, limits: &ClaimLimits) -> Result<Option<DateTime<Utc>>, StoreError> {
        let (handlers, room): (Vec<&str>, Vec<i64>) = limits
            .room
            .iter()
            .map(|(handler, room)| (handler.as_str(), i64::try_from(*room).unwrap_or(i64::MAX)))
            .unzip();
        let others = i64::try_from(limits.others).unwrap_or(i64::MAX);
        self.with(|conn| {
            let next_due = conn.prepare(NEXT_DUE)?;
            Ok(conn
                .client
                .query_one(&next_due, &[&handlers, &room, &others])?
                .get(0))
        })
    }

    fn failed_deliveries(
        &self,
        filter: &FailedFilter,
        max: usize,
    ) -> Result<Vec<FailedDelivery>, StoreError> {
        let limit = capped(max, MAX_FAILED_PAGE);
        let handler = filter.handler.as_deref().map(text);
        self.read(|conn| {
            let statement = conn.prepare(FAILED)?;
            let rows = conn.client.query(
                &statement,
                &[&handler.as_deref(), &filter.event, &filter.before, &limit],
            )?;
            Ok(rows
                .into_iter()
                .map(|row| FailedDelivery {
                    id: row.get(0),
                    event_id: row.get(1),
                    handler: row.get(2),
                    attempt: attempt_number(row.get(3)),
                    finished_at: row.get(4),
                    outcome: row.get(5),
                    reason: row.get(6),
                })
                .collect())
        })
    }

    fn retry_failed(
        &self,
        filter: &FailedFilter,
        now: DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<i64>, StoreError> {
        let limit = capped(max, MAX_RETRY_BATCH);
        let handler = filter.handler.as_deref().map(text);
        self.with(|conn| {
            let statement = conn.prepare(RETRY_FAILED)?;
            let rows = conn.client.query(
                &statement,
                &[
                    &handler.as_deref(),
                    &filter.event,
                    &filter.before,
                    &limit,
                    &now,
                ],
            )?;
            Ok(rows.into_iter().map(|row| row.get(0)).collect())
        })
    }

    fn pending_by_handler(&self) -> Result<Vec<(String, u64)>, StoreError> {
        // The pending deliveries' index serves it (`deliveries_handler_due`).
        self.read(|conn| counted_by_handler(conn, PENDING_BY_HANDLER))
    }

    fn failed_by_handler(&self) -> Result<Vec<(String, u64)>, StoreError> {
        // The failed deliveries' index by handler serves it (`deliveries_failed_handler`).
        self.read(|conn| counted_by_handler(conn, FAILED_BY_HANDLER))
    }

    fn count_by_state(&self) -> Result<Vec<(DeliveryState, u64)>, StoreError> {
        self.with(count_by_state_on)
    }

    fn cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = text(name);
        self.with(|conn| {
            let cursor = conn.prepare(CURSOR)?;
            Ok(conn
                .client
                .query_opt(&cursor, &[&name.as_ref()])?
                .map(|row| row.get(0)))
        })
    }

    fn insert_events_with_cursor(
        &self,
        events: &[NewEvent],
        cursor_name: &str,
        cursor: &str,
    ) -> Result<(), StoreError> {
        let (name, value) = (text(cursor_name), text(cursor));
        self.with(|conn| {
            let insert = conn.prepare(INSERT_EVENT)?;
            let upsert = conn.prepare(UPSERT_CURSOR)?;
            let now = self.clock.now();
            let mut tx = conn.client.transaction()?;
            for event in events {
                insert_event_with(&mut tx, &insert, event, now)?;
            }
            tx.execute(&upsert, &[&name.as_ref(), &value.as_ref()])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn claims_are_dear(&self) -> bool {
        true
    }

    fn try_lead(&self, role: &str) -> Result<bool, StoreError> {
        let mut lead = self.lead.lock().unwrap_or_else(|p| p.into_inner());
        // A session that no longer answers has lost its locks with it (the server ends it, or
        // already has): start over on a new one.
        let lost = lead.as_mut().is_some_and(|session| {
            session.client.is_closed() || session.client.is_valid(LEAD_CHECK_TIMEOUT).is_err()
        });
        if lost && let Some(session) = lead.take() {
            if !session.held.is_empty() {
                tracing::warn!(
                    roles = ?session.held,
                    "the leadership session to the store database was lost; leadership is \
                     given up until it is won again"
                );
            }
            // Dropping a client waits until its connection has closed, which a server that
            // stopped answering never lets happen: not under this lock, but on a thread of its
            // own (one per lost session, and a new one is made only by a bounded connect).
            let closing = std::thread::Builder::new()
                .name("jobhook-pg-close".into())
                .spawn(move || drop(session));
            if let Err(e) = closing {
                tracing::warn!("cannot start a thread to close the lost leadership session: {e}");
            }
        }
        let session = match lead.as_mut() {
            Some(session) => session,
            None => lead.insert(self.connect_lead()?),
        };
        if session.held.contains(role) {
            return Ok(true);
        }
        let won: bool = session
            .client
            .query_one(TRY_LEAD, &[&LEAD_LOCK, &role_key(role)])
            .map_err(PgError::from)?
            .get(0);
        if won {
            tracing::info!(role, node = %self.node, "this node now leads");
            session.held.insert(role.to_owned());
        }
        Ok(won)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::store::conformance::{self, Backend};
    use jobhook_testkit::postgres::{TestDatabase, database_or_skip};
    use r2d2::ManageConnection as _;

    /// A fresh database on the test server; every node is a new [`PostgresStore`] on it.
    pub(crate) struct Postgres {
        db: TestDatabase,
    }

    impl Postgres {
        fn new() -> Option<Self> {
            database_or_skip().map(|db| Postgres { db })
        }
    }

    impl Backend for Postgres {
        type S = PostgresStore;

        fn node(&self) -> PostgresStore {
            PostgresStore::open(&self.db.url, Some(&Secret::new(self.db.password.clone())))
                .expect("open the PostgreSQL store")
        }

        fn shared(&self) -> bool {
            true
        }

        fn spoil_context(&self, _store: &PostgresStore, event: Uuid) {
            self.db
                .query(&format!(
                    "UPDATE events SET context = '{{\"JobId\": 7}}' WHERE id = '{event}'"
                ))
                .expect("spoil a context");
        }
    }

    conformance::suite!(Postgres::new());

    /// A database where another tool keeps its own `schema_migrations` (golang-migrate's
    /// `version bigint`): opening the store says so, instead of panicking on the column's type.
    #[test]
    fn another_tools_schema_migrations_is_an_error_that_says_so() {
        let Some(pg) = Postgres::new() else {
            return;
        };
        pg.db
            .query("CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL); \
                    GRANT ALL ON schema_migrations TO PUBLIC; \
                    INSERT INTO schema_migrations VALUES (20240101, false)")
            .expect("another tool's table");
        let e = PostgresStore::open(&pg.db.url, Some(&Secret::new(pg.db.password.clone())))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("schema_migrations table is not jobhook's"),
            "{e}"
        );
    }

    /// A database with another program's `events` table and no jobhook schema version: opening
    /// the store names the table and what to do, and leaves the table as it was.
    #[test]
    fn another_programs_tables_of_the_same_names_are_an_error_that_says_so() {
        let Some(pg) = Postgres::new() else {
            return;
        };
        pg.db
            .query(
                "CREATE TABLE events (note text); GRANT ALL ON events TO PUBLIC; \
                 INSERT INTO events VALUES ('theirs')",
            )
            .expect("another program's table");
        let e = PostgresStore::open(&pg.db.url, Some(&Secret::new(pg.db.password.clone())))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("already has tables named as jobhook's (events) but no jobhook schema"),
            "{e}"
        );
        assert!(e.contains("a database (or schema) of its own"), "{e}");
        assert!(
            pg.db
                .query("SELECT note FROM events")
                .expect("still there")
                .contains("theirs")
        );
    }

    /// Another program's `events` in `public` is no obstacle when jobhook has a schema of its
    /// own first on its `search_path` (`"$user", public`): the tables are made there.
    #[test]
    fn another_programs_tables_in_another_schema_are_left_to_it() {
        let Some(pg) = Postgres::new() else {
            return;
        };
        pg.db
            .query(
                "CREATE TABLE public.events (note text); \
                 CREATE SCHEMA jobhook AUTHORIZATION jobhook",
            )
            .expect("another program's table, and jobhook's schema");
        drop(pg.node());
        let schemas = pg
            .db
            .query(
                "SELECT table_schema FROM information_schema.tables \
                 WHERE table_name = 'deliveries'",
            )
            .expect("where the tables are");
        assert_eq!(schemas.trim(), "jobhook");
    }

    #[test]
    fn a_step_of_the_servers_clock_is_followed_and_moves_nothing() {
        let Some(pg) = Postgres::new() else {
            return;
        };
        let store = pg.node();
        assert_eq!(store.keep_time().unwrap(), None, "no step yet");
        store.insert_event(&conformance::event(&["a"])).unwrap();
        let due = store.next_due(&conformance::every_handler()).unwrap();
        // The carried time runs an hour ahead of the server's: to the node, the server's clock
        // stepped back an hour.
        let ahead = store.now() + TimeDelta::hours(1);
        store.clock.hold().follow(ahead);
        let step = store.keep_time().unwrap().expect("a step");
        assert!(
            (step + TimeDelta::hours(1)).abs() < TimeDelta::seconds(1),
            "{step}"
        );
        assert_eq!(
            store.next_due(&conformance::every_handler()).unwrap(),
            due,
            "nothing shared is moved"
        );
        assert!(
            (store.now() - Utc::now()).abs() < TimeDelta::seconds(1),
            "the server's time is followed"
        );
        assert_eq!(store.keep_time().unwrap(), None, "followed");
    }

    /// An event with one delivery, to `handler`, failed for good on `store`; the pending
    /// deliveries of the handlers in `busy` are left as they are.
    fn failed_event(store: &PostgresStore, handler: &str, busy: &[String]) -> Uuid {
        let event = conformance::event(&[handler]);
        store.insert_event(&event).expect("insert");
        let claim = store
            .claim(store.now(), busy, conformance::LEASE)
            .expect("claim")
            .expect("a claim");
        store
            .finish(&claim, &conformance::record(DeliveryState::Failed))
            .expect("finish");
        event.id
    }

    /// Waits until one session of `pg`'s database waits for a lock another holds.
    fn until_a_session_waits_for_a_lock(pg: &Postgres) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let waiting = pg
                .db
                .query(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .expect("pg_stat_activity");
            if waiting == "1" {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no session waited for the lock: {}",
                count(
                    pg,
                    "SELECT string_agg(coalesce(wait_event_type, '-') || ' ' || state || ' ' \
                     || left(query, 40), E'\n') FROM pg_stat_activity \
                     WHERE datname = current_database()"
                )
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `SELECT` of one count on `pg`'s database.
    fn count(pg: &Postgres, sql: &str) -> String {
        pg.db.query(sql).expect("count")
    }

    /// A retention purge and a run again of the same failed delivery on two nodes at once,
    /// each held open at its locks while the other runs: the delivery is never lost.
    /// - Run again first, not yet committed: the purge's delete of the delivery waits for it,
    ///   then finds it pending and leaves it; the event's delete fails on it, so the purge
    ///   deletes nothing (not its attempts either), and the next purge keeps the event.
    /// - Purge first, not yet committed: the run again waits, then finds the delivery gone
    ///   and makes nothing pending.
    #[test]
    fn a_purge_and_a_run_again_at_once_never_lose_a_delivery() {
        let Some(pg) = Postgres::new() else {
            return;
        };
        let store = pg.node();
        let config = store.config.clone();
        let later = store.now() + chrono::Duration::hours(1);

        // Run again first.
        let kept = failed_event(&store, "a", &[]);
        let mut other = config.connect(NoTls).expect("another session");
        let mut retry = other.transaction().expect("begin");
        let made_pending = retry
            .query(
                RETRY_FAILED,
                &[&Some("a"), &Some(kept), &None::<i64>, &10_i64, &store.now()],
            )
            .expect("run again");
        assert_eq!(made_pending.len(), 1);
        let purging = std::thread::spawn({
            let node = pg.node();
            move || node.purge_finished(later, 10, None)
        });
        until_a_session_waits_for_a_lock(&pg);
        retry.commit().expect("commit the run again");
        let purged = purging.join().expect("the purge's thread");
        assert!(
            purged
                .as_ref()
                .is_err_and(|e| e.to_string().contains("foreign key")),
            "the purge fails on the delivery it could not delete: {purged:?}"
        );
        assert_eq!(
            count(
                &pg,
                &format!("SELECT state FROM deliveries WHERE event_id = '{kept}'")
            ),
            "pending"
        );
        assert_eq!(
            count(
                &pg,
                &format!(
                    "SELECT count(*) FROM attempts a JOIN deliveries d ON a.delivery_id = d.id
                     WHERE d.event_id = '{kept}'"
                )
            ),
            "1",
            "its attempt is kept"
        );
        let next = store
            .purge_finished(later, 10, None)
            .expect("the next purge");
        assert_eq!(next.deleted, 0, "an event with a pending delivery is kept");

        // Purge first.
        let gone = failed_event(&store, "b", &["a".to_owned()]);
        let mut purge = other.transaction().expect("begin");
        let start = walk_start();
        let row = purge
            .query_one(
                PURGE_FINISHED,
                &[
                    &later,
                    &10_i64,
                    &start.received_at,
                    &Uuid::from_u128(start.tiebreak),
                ],
            )
            .expect("purge");
        assert_eq!(row.get::<_, i64>(0), 1, "the failed event is purged");
        let retrying = std::thread::spawn({
            let node = pg.node();
            move || {
                let filter = FailedFilter {
                    handler: Some("b".into()),
                    ..FailedFilter::default()
                };
                node.retry_failed(&filter, node.now(), 10)
            }
        });
        until_a_session_waits_for_a_lock(&pg);
        purge.commit().expect("commit the purge");
        let requeued = retrying.join().expect("the run again's thread");
        assert_eq!(requeued.expect("run again"), Vec::<i64>::new());
        assert_eq!(
            count(
                &pg,
                &format!("SELECT count(*) FROM events WHERE id = '{gone}'")
            ),
            "0"
        );
        assert_eq!(
            count(
                &pg,
                "SELECT count(*) FROM deliveries WHERE state = 'pending'"
            ),
            "1",
            "only the first event's delivery is pending"
        );
    }

    #[test]
    fn claims_seek_each_handler_instead_of_scanning_a_saturated_backlog() {
        let Some(pg) = Postgres::new() else {
            return;
        };
        let _schema = pg.node();
        // 3,000 due deliveries of a handler with no room, behind them 5 of one with room.
        pg.db
            .query(
                "INSERT INTO events (id, received_at, source, context)
                     SELECT gen_random_uuid(), now(), 'test', '{}' FROM generate_series(1, 3005);
                 INSERT INTO deliveries (event_id, handler, state, created_at, not_before)
                     SELECT id, CASE WHEN n <= 3000 THEN 'saturated' ELSE 'free' END, 'pending',
                            now(), now() - interval '1 hour' + n * interval '1 ms'
                     FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM events) AS e;
                 ANALYZE deliveries;",
            )
            .expect("fill the queue");
        let plan = pg
            .db
            .query(&format!(
                "PREPARE claim(timestamptz, text[], text, timestamptz, bigint, text[], bigint[],
                               bigint, text[], bigint[], bigint[])
                     AS {CLAIM_BATCH};
                 EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF)
                     EXECUTE claim(now(), '{{saturated}}', 'node', now() + interval '1 minute',
                                   32, '{{}}', '{{}}', 32, '{{free}}', '{{3}}', '{{1}}');"
            ))
            .expect("explain the claim");
        let walked: Vec<u64> = plan
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Rows Removed by Filter: "))
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        assert!(
            walked.iter().all(|n| *n < 100),
            "the claim walked past the saturated backlog:\n{plan}"
        );
        let claimed = pg
            .db
            .query("SELECT handler, count(*) FROM deliveries WHERE state = 'running' GROUP BY 1")
            .expect("claimed");
        assert_eq!(claimed, "free|5", "{plan}");
    }

    #[test]
    fn what_the_url_leaves_out_is_set_and_what_it_gives_is_kept() {
        let url = "postgres://jobhook@db.example/jobhook";
        let mut config = parse_url(url).expect("url");
        apply_defaults(&mut config, "node-1", url);
        assert_eq!(config.get_tcp_user_timeout(), Some(&UNACKNOWLEDGED_LIMIT));
        assert_eq!(config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(config.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        assert!(
            config
                .get_application_name()
                .is_some_and(|name| name.contains("node-1")),
            "{:?}",
            config.get_application_name()
        );
        let url = "postgres://jobhook@db.example/jobhook?tcp_user_timeout=5&connect_timeout=2\
             &application_name=mine&keepalives_idle=7200&keepalives_interval=30";
        let mut config = parse_url(url).expect("url");
        apply_defaults(&mut config, "node-1", url);
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(config.get_application_name(), Some("mine"));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(7200));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn application_names_carry_the_node_id_as_the_server_keeps_them() {
        assert_eq!(
            application_name("db1:4242:0123456789ab"),
            "jobhook db1:4242:0123456789ab"
        );
        // PostgreSQL keeps printable ASCII only, and at most 63 bytes.
        assert_eq!(application_name("h\u{e9}st\t:1:x"), "jobhook h?st?:1:x");
        let long = application_name(&format!("{}:1:0123456789ab", "h".repeat(80)));
        assert_eq!(long.len(), MAX_APPLICATION_NAME);
        assert!(long.starts_with("jobhook hhh"), "{long}");
        // A real node's id is kept whole unless the host name is very long.
        let node = node_id();
        if APPLICATION_NAME.len() + 1 + node.len() <= MAX_APPLICATION_NAME {
            assert_eq!(application_name(&node), format!("jobhook {node}"));
        }
    }

    /// A node on `backend` that has committed one event, so that its pool holds a session.
    fn a_node_with_a_session(backend: &Postgres) -> PostgresStore {
        let store = backend.node();
        store.insert_event(&conformance::event(&["a"])).unwrap();
        store
    }

    /// A session of `store`'s own pool, as the store's calls get one.
    fn pooled_session(store: &PostgresStore) -> r2d2::PooledConnection<Manager> {
        store.pool.as_ref().expect("an open store").get().unwrap()
    }

    /// A statement past the session's `statement_timeout` (SQLSTATE 57014, `query_canceled`),
    /// as a lock wait past `lock_timeout` (55P03), is the store not answering in time — retry
    /// later — not a failure of the store; another server error is one.
    #[test]
    fn a_statement_past_its_timeout_is_no_answer_and_another_error_a_failure() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = a_node_with_a_session(&backend);
        let mut conn = pooled_session(&store);
        conn.client
            .batch_execute("SET statement_timeout = '20ms'")
            .unwrap();
        let slow = conn.client.batch_execute("SELECT pg_sleep(5)").unwrap_err();
        conn.client
            .batch_execute("RESET statement_timeout")
            .unwrap();
        assert_eq!(
            slow.code(),
            Some(&postgres::error::SqlState::QUERY_CANCELED)
        );
        let told = StoreError::from(PgError::Db(slow));
        assert!(matches!(told, StoreError::NoAnswer(_)), "{told:?}");
        let wrong = conn.client.batch_execute("SELECT 1/0").unwrap_err();
        let told = StoreError::from(PgError::Db(wrong));
        assert!(matches!(told, StoreError::Database(_)), "{told:?}");
    }

    #[test]
    fn a_nodes_sessions_are_named_after_it() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = a_node_with_a_session(&backend);
        let names = backend
            .db
            .query(&format!(
                "SELECT DISTINCT application_name FROM pg_stat_activity WHERE usename = '{}'",
                jobhook_testkit::postgres::ROLE
            ))
            .unwrap();
        assert!(
            names.lines().any(|n| n == application_name(store.node())),
            "{names}"
        );
    }

    #[test]
    fn a_session_the_server_ended_while_it_sat_idle_is_replaced_before_a_call_uses_it() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = a_node_with_a_session(&backend);
        let ended = backend
            .db
            .query(&format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = '{}'",
                application_name(store.node())
            ))
            .unwrap();
        assert_ne!(ended, "0", "no session of this node to end");
        // Idle past the window: the pool checks the session, finds it gone and connects anew,
        // and the caller never sees the dead one.
        std::thread::sleep(RECENTLY_ANSWERED + Duration::from_millis(200));
        store.insert_event(&conformance::event(&["a"])).unwrap();
        assert_eq!(
            backend.db.query("SELECT count(*) FROM events").unwrap(),
            "2"
        );
    }

    /// The plan `EXPLAIN {statement}` prints on `conn`, one line per plan line.
    fn explain(client: &mut impl postgres::GenericClient, statement: &str) -> String {
        client
            .simple_query(&format!("EXPLAIN {statement}"))
            .unwrap()
            .into_iter()
            .filter_map(|message| match message {
                postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Claims and outcome records prepared on a young database (PostgreSQL may keep a generic
    /// plan after five executions) still find their rows by primary key once the tables have
    /// grown: no statement reads all of `deliveries` or `events`, and recording outcomes never
    /// goes through the partial indexes of running deliveries, whose dead entries the planner
    /// cannot see.
    #[test]
    fn statements_prepared_while_the_tables_were_small_still_seek_their_rows_once_they_have_grown()
    {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = backend.node();
        // As the dispatcher's calls get one.
        let mut conn = pooled_session(&store);
        // `events` events from `source`, each with a delivery in `state` for four handlers.
        let add = |events: u32, state: &str, source: &str| {
            backend
                .db
                .query(&format!(
                    "INSERT INTO events (id, received_at, source, context) \
                     SELECT gen_random_uuid(), now(), '{source}', '{{}}' \
                     FROM generate_series(1, {events}); \
                     INSERT INTO deliveries (event_id, handler, state, created_at, not_before) \
                     SELECT e.id, h, '{state}', now(), now() \
                     FROM events AS e, unnest('{{h1,h2,h3,h4}}'::text[]) AS h \
                     WHERE e.source = '{source}'"
                ))
                .unwrap();
        };
        // Each statement with its parameter types and the arguments it is run with.
        let statements = [
            (
                "claim",
                CLAIM_BATCH,
                "timestamptz, text[], text, timestamptz, bigint, text[], bigint[], bigint, \
                 text[], bigint[], bigint[]",
                "now(), '{}', 'probe', now() + interval '1 minute', 64, '{h1,h2,h3,h4}', \
                 '{16,16,16,16}', 0, '{h1,h2,h3,h4}', '{0,1,2,3}', '{4,3,2,1}'",
            ),
            (
                "finish",
                FINISH_BATCH,
                "bigint[], integer[], text[], timestamptz[], float8[], text[], text[], json[], \
                 boolean[], timestamptz[], text",
                "array_fill(1::bigint, ARRAY[64]), array_fill(1, ARRAY[64]), \
                 array_fill('succeeded'::text, ARRAY[64]), array_fill(now(), ARRAY[64]), \
                 array_fill(1.0::float8, ARRAY[64]), array_fill('ok'::text, ARRAY[64]), \
                 array_fill(NULL::text, ARRAY[64]), array_fill('{}'::json, ARRAY[64]), \
                 array_fill(true, ARRAY[64]), array_fill(now(), ARRAY[64]), 'probe'",
            ),
        ];
        // A database the engine has just started on: a few hundred deliveries, some due.
        add(150, "succeeded", "early");
        add(20, "pending", "early-due");
        for (name, sql, types, args) in statements {
            conn.client
                .batch_execute(&format!("PREPARE {name} ({types}) AS {sql}"))
                .unwrap();
            // More executions than PostgreSQL runs before it may keep a generic plan.
            for _ in 0..7 {
                conn.client
                    .batch_execute(&format!("BEGIN; EXECUTE {name} ({args}); ROLLBACK"))
                    .unwrap();
            }
        }
        // Minutes of service later, before autovacuum has analysed the tables.
        add(15_000, "succeeded", "later");
        add(20, "pending", "later-due");
        for (name, _, _, args) in statements {
            let plan = explain(&mut conn.client, &format!("EXECUTE {name} ({args})"));
            assert!(
                plan.contains("Index Scan using deliveries_pkey"),
                "{name}:\n{plan}"
            );
            for table in ["deliveries", "events"] {
                assert!(
                    !plan.contains(&format!("Seq Scan on {table}")),
                    "{name} reads all of {table}:\n{plan}"
                );
            }
            if name == "finish" {
                for index in ["deliveries_owner", "deliveries_lease"] {
                    assert!(!plan.contains(index), "{name} reads {index}:\n{plan}");
                }
            }
        }
    }

    /// Every statement the store prepares, with the generic plan PostgreSQL would keep for it
    /// made while the tables were small: once they have grown, none reads a whole table.
    #[test]
    fn no_statement_of_the_store_keeps_a_plan_that_reads_a_whole_table() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = a_node_with_a_session(&backend);
        let mut conn = pooled_session(&store);
        let statements = INDEXED_STATEMENTS;
        // The plan a prepared statement keeps, whatever its arguments (all NULL here).
        conn.client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .unwrap();
        let plan_of = |conn: &mut Conn, i: usize, sql: &str| {
            let params = (1..=16).filter(|n| sql.contains(&format!("${n}"))).count();
            let nulls = vec!["NULL"; params].join(", ");
            let args = if params == 0 {
                String::new()
            } else {
                format!("({nulls})")
            };
            explain(&mut conn.client, &format!("EXECUTE probe{i} {args}"))
        };
        for (i, sql) in statements.iter().enumerate() {
            conn.client
                .batch_execute(&format!("PREPARE probe{i} AS {sql}"))
                .unwrap();
            plan_of(&mut conn, i, sql);
        }
        backend
            .db
            .query(
                "INSERT INTO events (id, received_at, source, context) \
                 SELECT gen_random_uuid(), now(), 'later', '{}' FROM generate_series(1, 15000); \
                 INSERT INTO deliveries (event_id, handler, state, created_at, not_before) \
                 SELECT e.id, 'h', 'succeeded', now(), now() FROM events AS e; \
                 INSERT INTO idempotency_keys (key, event_id, fingerprint, created_at) \
                 SELECT id::text, id, 'f', now() FROM events",
            )
            .unwrap();
        for (i, sql) in statements.iter().enumerate() {
            let plan = plan_of(&mut conn, i, sql);
            assert!(!plan.contains("Seq Scan"), "{sql}\n{plan}");
        }
        // The session goes back to the pool as it came (its own statements kept).
        for i in 0..statements.len() {
            conn.client
                .batch_execute(&format!("DEALLOCATE probe{i}"))
                .unwrap();
        }
        conn.client.batch_execute("RESET plan_cache_mode").unwrap();
    }

    /// The cost the planner puts on the whole plan `EXPLAIN` printed: the upper bound of the
    /// `cost=start..total` on its first line.
    fn total_cost(plan: &str) -> f64 {
        let first = plan.lines().next().unwrap_or_default();
        let (_, cost) = first.split_once("..").expect("a cost in the plan");
        cost.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// The metrics' count by state reads all of `deliveries` in a transaction where sequential
    /// scans are allowed: on a pooled session (scans off) the planner would price its scan at
    /// `disable_cost` and compile the statement with JIT at every scrape ([`SCANS_ALLOWED`]).
    #[test]
    fn the_count_by_state_is_planned_with_sequential_scans_allowed() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = a_node_with_a_session(&backend);
        let mut conn = pooled_session(&store);
        let counts = count_by_state_on(&mut conn).unwrap();
        assert_eq!(counts, [(DeliveryState::Pending, 1)]);

        // PostgreSQL's `disable_cost`: what a plan costs at least when it scans a table where
        // sequential scans are off.
        const DISABLE_COST: f64 = 1.0e10;
        // Every statement that reads a whole table on purpose, the count among them.
        assert!(SCANNING_STATEMENTS.contains(&COUNT_BY_STATE));
        for sql in SCANNING_STATEMENTS {
            let on_the_session = explain(&mut conn.client, sql);
            assert!(
                total_cost(&on_the_session) >= DISABLE_COST,
                "sequential scans are off on a pooled session:\n{on_the_session}"
            );
            let allowed = with_scans_allowed(&mut conn.client, |tx| Ok(explain(tx, sql))).unwrap();
            assert!(total_cost(&allowed) < DISABLE_COST, "{sql}\n{allowed}");
            // The session is back to scans off for what it runs next.
            assert!(total_cost(&explain(&mut conn.client, sql)) >= DISABLE_COST);
        }
    }

    /// A server that stops answering (SIGSTOP) while this node leads: the next leadership check
    /// gives the session up within its timeout, the new session's set-up within its own bound,
    /// and the call returns. It used to drop the lost session under the leadership lock, which
    /// waited for the frozen server for good.
    #[test]
    fn a_leadership_check_against_a_frozen_server_returns_in_bounded_time() {
        let Some(db) = jobhook_testkit::postgres::private_database_or_skip() else {
            return;
        };
        let store = Arc::new(
            PostgresStore::open(&db.url, Some(&Secret::new(db.password.clone())))
                .expect("open the PostgreSQL store"),
        );
        assert!(store.try_lead("poller").expect("lead"));
        db.server().freeze().expect("freeze");
        let bound =
            LEAD_CHECK_TIMEOUT + CONNECT_TIMEOUT + STARTUP_EXCHANGE_LIMIT + Duration::from_secs(10);
        let (done, outcome) = std::sync::mpsc::channel();
        let checking = Arc::clone(&store);
        std::thread::spawn(move || {
            let _ = done.send(checking.try_lead("poller"));
        });
        let answered = outcome.recv_timeout(bound);
        db.server().thaw().expect("thaw");
        let answered = answered.unwrap_or_else(|_| {
            panic!("the leadership check did not return within {bound:?} of a frozen server")
        });
        assert!(
            !matches!(answered, Ok(true)),
            "a frozen server's lock is not reported as held: {answered:?}"
        );
    }

    /// Dropping the store while its server is frozen (the end of `serve` during a database
    /// stall) waits at most [`STORE_CLOSE_WAIT`] for its connections to close, then leaves them
    /// to the process's end.
    #[test]
    fn dropping_the_store_against_a_frozen_server_returns_in_bounded_time() {
        let Some(db) = jobhook_testkit::postgres::private_database_or_skip() else {
            return;
        };
        let store = PostgresStore::open(&db.url, Some(&Secret::new(db.password.clone())))
            .expect("open the PostgreSQL store");
        assert!(store.try_lead("poller").expect("lead"));
        db.server().freeze().expect("freeze");
        let bound = STORE_CLOSE_WAIT + Duration::from_secs(5);
        let (done, dropped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(store);
            let _ = done.send(());
        });
        let answered = dropped.recv_timeout(bound);
        db.server().thaw().expect("thaw");
        assert!(
            answered.is_ok(),
            "dropping the store did not return within {bound:?} of a frozen server"
        );
    }

    /// A node that starts with a schema change to make while another session's open
    /// transaction holds a lock on the table (a rolling upgrade behind a forgotten `BEGIN`):
    /// the start fails within the lock wait, saying why, instead of waiting (and holding every
    /// other node's writes behind it) for as long as that transaction stays open; once it has
    /// ended, the node starts and the change is made.
    #[test]
    fn a_schema_change_behind_an_open_transaction_fails_the_start_in_bounded_time() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let config = backend.node().config.clone();
        let last = MIGRATIONS.len();
        // The newest change undone, so that the next start makes it again.
        backend
            .db
            .query(&format!(
                "DROP INDEX deliveries_failed_handler; \
                 DELETE FROM schema_migrations WHERE version = {last}"
            ))
            .expect("undo the newest change");
        let mut blocker = config.connect(NoTls).expect("second session");
        blocker
            .batch_execute("BEGIN; LOCK TABLE deliveries IN ROW EXCLUSIVE MODE")
            .expect("hold a lock");
        let (url, password) = (backend.db.url.clone(), backend.db.password.clone());
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(PostgresStore::open(&url, Some(&Secret::new(password))).map(|_| ()));
        });
        let bound = MIGRATION_LOCK_WAIT + Duration::from_secs(10);
        let started = outcome.recv_timeout(bound);
        blocker.batch_execute("ROLLBACK").expect("release the lock");
        let started = started
            .unwrap_or_else(|_| panic!("the start still waited for the lock {bound:?} later"));
        let error = started.expect_err("the start fails while the lock is held");
        assert!(
            error
                .to_string()
                .contains("holds a lock on the store's tables"),
            "{error}"
        );
        let node = backend.node();
        let applied: i32 = pooled_session(&node)
            .client
            .query_one("SELECT max(version) FROM schema_migrations", &[])
            .expect("version")
            .get(0);
        assert_eq!(applied, i32::try_from(last).unwrap());
    }

    /// Past the bound on connections being set up, another is refused at once; a place is
    /// given back when its holder ends, and the count never goes below zero or past the bound
    /// whatever order the holders end in.
    #[test]
    fn connections_being_set_up_are_counted_against_their_bound() {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let held: Vec<ConnectSlot> = (0..3)
            .map(|_| ConnectSlot::take_from(&COUNT, 3).expect("a free place"))
            .collect();
        assert!(ConnectSlot::take_from(&COUNT, 3).is_none());
        assert_eq!(COUNT.load(Ordering::SeqCst), 3);
        let mut held = held.into_iter();
        // One ends on a thread of its own, as a connecting thread does.
        let one = held.next().expect("a place");
        std::thread::spawn(move || drop(one))
            .join()
            .expect("the thread ends");
        let again = ConnectSlot::take_from(&COUNT, 3).expect("the place given back");
        assert!(ConnectSlot::take_from(&COUNT, 3).is_none());
        drop(held);
        drop(again);
        assert_eq!(COUNT.load(Ordering::SeqCst), 0);
    }

    /// A wait for a pooled connection that runs out says why: "cannot be reached", with the
    /// attempt's error, after the latest attempt to connect failed without an answer (nothing
    /// listens); "refused", in the server's words, after the server refused it (a wrong
    /// password); "did not answer" while every connection is held and nothing refused one (a
    /// frozen server), or while new ones stall in their set-up. The ingest metric's reason
    /// follows (`unreachable`, `refused`, `timeout`).
    #[test]
    fn a_pool_wait_that_runs_out_says_whether_the_server_refused_or_did_not_answer() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let pool_of_one = |config: postgres::Config| {
            let last_connect = Arc::new(LastConnect::default());
            let pool = r2d2::Pool::builder()
                .max_size(1)
                .min_idle(Some(0))
                .connection_timeout(Duration::from_millis(300))
                .build_unchecked(Manager {
                    config,
                    limits: SessionLimits::for_lease(Duration::from_secs(60)),
                    last_connect: Arc::clone(&last_connect),
                });
            (pool, last_connect)
        };
        let waited = |pool: &r2d2::Pool<Manager>, last: &LastConnect| {
            let e = pool.get().err().expect("the wait runs out");
            StoreError::from(last.explain(e))
        };

        // Every connection held; the latest attempt connected.
        let (pool, last) = pool_of_one(backend.node().config.clone());
        let held = pool.get().expect("the one connection");
        assert!(
            matches!(waited(&pool, &last), StoreError::NoAnswer(ref why)
                if why.contains("has not answered")),
            "{}",
            waited(&pool, &last)
        );
        // The latest attempt stalled in its set-up: still no answer.
        last.record::<()>(&Err(PgError::ConnectStalled("stalled".into())));
        assert!(matches!(waited(&pool, &last), StoreError::NoAnswer(_)));
        drop(held);

        // Nothing listens where the pool connects: the attempt is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = closed.local_addr().expect("port").port();
        drop(closed);
        let mut refused = postgres::Config::new();
        refused.host("127.0.0.1").port(port).user("jobhook");
        let (pool, last) = pool_of_one(refused);
        let told = waited(&pool, &last);
        // The attempt's own error is in the words, for every waiter (r2d2 keeps it for one).
        assert!(
            matches!(told, StoreError::Unreachable(ref why) if why.contains("refused")),
            "{told}"
        );
        assert!(
            matches!(waited(&pool, &last), StoreError::Unreachable(ref why)
                if why.contains("refused")),
            "{}",
            waited(&pool, &last)
        );

        // The server answers, and refuses the engine: a password it does not take.
        let mut wrong = backend.node().config.clone();
        wrong.password("not-the-password");
        let (pool, last) = pool_of_one(wrong);
        let told = waited(&pool, &last);
        assert!(
            matches!(told, StoreError::Refused(ref why)
                if why.contains("password authentication failed")
                    && why.contains("check [store] password")),
            "{told}"
        );
    }

    /// A server that refuses the engine's connections once they are gone — here every slot of
    /// the database is taken (`CONNECTION LIMIT 0`): the calls are told it in the server's
    /// words with what to check, as `refused`, not "cannot be reached"; once the pool holds no
    /// connection they are told so without the whole [`POOL_WAIT`]; and once the server admits
    /// connections again the pool connects by itself.
    #[test]
    fn a_server_that_refuses_the_engines_connections_is_told_so_at_once_in_its_words() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = a_node_with_a_session(&backend);
        let name = &backend.db.name;
        backend
            .db
            .query(&format!("ALTER DATABASE {name} CONNECTION LIMIT 0"))
            .unwrap();
        backend
            .db
            .query(&format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = '{}'",
                application_name(store.node())
            ))
            .unwrap();
        // The sessions the pool held fail their next use ("unreachable") before the pool
        // connects anew and is refused.
        let deadline = Instant::now() + Duration::from_secs(30);
        let refusal = loop {
            match store.insert_event(&conformance::event(&["a"])) {
                Err(StoreError::Refused(why)) => break why,
                other => {
                    assert!(Instant::now() < deadline, "never refused: {other:?}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        assert!(
            refusal.contains("too many connections") && refusal.contains("CONNECTION LIMIT"),
            "{refusal}"
        );
        let began = Instant::now();
        let again = store.insert_event(&conformance::event(&["a"]));
        let waited = began.elapsed();
        assert!(matches!(again, Err(StoreError::Refused(_))), "{again:?}");
        assert!(
            waited < POOL_WAIT / 2,
            "a refused call waited {waited:?} for a connection"
        );
        assert_eq!(
            reason_of_refusal(&again),
            Some("refused"),
            "the ingest metric's reason"
        );

        backend
            .db
            .query(&format!("ALTER DATABASE {name} CONNECTION LIMIT -1"))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = store.insert_event(&conformance::event(&["a"])) {
            assert!(Instant::now() < deadline, "never admitted again: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A database whose default isolation is SERIALIZABLE (some DBAs set it): every session of
    /// the engine runs at READ COMMITTED, what its statements are written for, and two nodes
    /// committing events with keys, claiming and recording at once on it see no failure.
    #[test]
    fn a_serializable_database_default_is_not_what_the_engines_sessions_run_at() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let name = &backend.db.name;
        backend
            .db
            .query(&format!(
                "ALTER DATABASE {name} SET default_transaction_isolation = 'serializable'"
            ))
            .unwrap();
        let nodes = [backend.node(), backend.node()];
        for node in &nodes {
            let isolation = node
                .with(|conn| {
                    Ok(conn
                        .client
                        .query_one("SHOW transaction_isolation", &[])?
                        .get::<_, String>(0))
                })
                .unwrap();
            assert_eq!(isolation, "read committed");
            let mut lead = node.lead.lock().unwrap();
            let isolation: String = lead
                .as_mut()
                .expect("the leadership session")
                .client
                .query_one("SHOW transaction_isolation", &[])
                .unwrap()
                .get(0);
            assert_eq!(isolation, "read committed");
        }
        // The database's default is what a session of its own gets.
        assert_eq!(
            backend.db.query("SHOW transaction_isolation").unwrap(),
            "serializable"
        );

        let failures = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for (n, node) in nodes.iter().enumerate() {
                for thread in 0..2 {
                    let failures = &failures;
                    scope.spawn(move || {
                        for i in 0..60 {
                            let event = conformance::event(&["a", "b"]);
                            let key = Idempotency::new(
                                format!("key-{n}-{thread}-{i}"),
                                &event.context,
                                Duration::from_secs(3600),
                            );
                            let done =
                                node.insert_event_once(&event, &key)
                                    .map(drop)
                                    .and_then(|()| {
                                        let claims = node.claim_batch(
                                            node.now(),
                                            &ClaimLimits::any(4),
                                            Duration::from_secs(60),
                                        )?;
                                        node.renew(node.now(), Duration::from_secs(60))?;
                                        let record = conformance::record(DeliveryState::Succeeded);
                                        let finished: Vec<_> =
                                            claims.iter().map(|c| (c, &record)).collect();
                                        node.finish_batch(&finished).map(drop)
                                    });
                            if let Err(e) = done {
                                failures.lock().unwrap().push(e.to_string());
                            }
                        }
                    });
                }
            }
        });
        let failures = failures.into_inner().unwrap();
        assert!(
            failures.is_empty(),
            "{} failed, e.g. {:?}",
            failures.len(),
            failures.first()
        );
    }

    /// A transaction the server rolls back for a conflict with another — a serialization
    /// failure or a deadlock, raised here by the server itself — runs again, a bounded number
    /// of times; another error does not.
    #[test]
    fn a_transaction_rolled_back_for_a_conflict_runs_again_a_bounded_number_of_times() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let store = a_node_with_a_session(&backend);
        let raise = |code: &str| {
            format!("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{code}'; END $$")
        };
        for code in ["40001", "40P01"] {
            let runs = std::sync::atomic::AtomicU32::new(0);
            let answer = store.with(|conn| {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                if run <= 2 {
                    conn.client.batch_execute(&raise(code))?;
                }
                Ok(run)
            });
            assert_eq!(answer.unwrap(), 3, "{code}");

            let runs = std::sync::atomic::AtomicU32::new(0);
            let answer = store.with(|conn| {
                runs.fetch_add(1, Ordering::SeqCst);
                conn.client.batch_execute(&raise(code))?;
                Ok(())
            });
            assert!(
                matches!(answer, Err(StoreError::Database(ref why)) if why.contains(code)),
                "{answer:?}"
            );
            assert_eq!(runs.into_inner(), MAX_CONFLICT_RETRIES + 1, "{code}");
        }
        let runs = std::sync::atomic::AtomicU32::new(0);
        let answer = store.with(|conn| {
            runs.fetch_add(1, Ordering::SeqCst);
            conn.client.batch_execute("SELECT 1/0")?;
            Ok(())
        });
        assert!(answer.is_err());
        assert_eq!(runs.into_inner(), 1);
    }

    /// The reason `/healthz` and the ingest metric give for `result`'s error.
    fn reason_of_refusal(result: &Result<(), StoreError>) -> Option<&'static str> {
        result
            .as_ref()
            .err()
            .map(crate::sources::store_health::reason_of)
    }

    #[test]
    fn a_pooled_session_is_checked_only_when_the_server_has_not_answered_on_it_lately() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let manager = Manager {
            config: backend.node().config.clone(),
            limits: SessionLimits::for_lease(Duration::from_secs(60)),
            last_connect: Arc::default(),
        };
        // A pooled session the server has just ended.
        let ended = || {
            let mut conn = manager.connect().unwrap();
            let pid: i32 = conn
                .client
                .query_one("SELECT pg_backend_pid()", &[])
                .unwrap()
                .get(0);
            backend
                .db
                .query(&format!("SELECT pg_terminate_backend({pid})"))
                .unwrap();
            conn
        };

        // Within the window it is handed out unchecked, dead as it is...
        let mut conn = ended();
        conn.answered_at = Instant::now();
        assert!(manager.is_valid(&mut conn).is_ok());
        // ...its one statement fails as "unreachable" and is not taken for an answer, and the
        // pool sees the session broken and drops it.
        let answered_before = conn.answered_at;
        let failed = conn.run(&|conn: &mut Conn| Ok(conn.client.query_one("SELECT 1", &[])?));
        assert!(
            matches!(
                failed.map_err(StoreError::from),
                Err(StoreError::Unreachable(_))
            ),
            "a dead session's statement is not reported as unreachable"
        );
        assert_eq!(conn.answered_at, answered_before);
        assert!(manager.has_broken(&mut conn));

        // Past the window the check runs and finds it dead.
        let mut conn = ended();
        conn.answered_at = Instant::now()
            .checked_sub(RECENTLY_ANSWERED)
            .expect("a monotonic clock past the window");
        assert!(manager.is_valid(&mut conn).is_err());
    }

    #[test]
    fn role_keys_are_stable() {
        // FNV-1a test vectors: the keys must never change between releases, or two versions
        // of jobhook would both lead during a rolling upgrade.
        assert_eq!(role_key(""), 0x811c_9dc5_u32 as i32);
        assert_eq!(role_key("a"), 0xe40c_292c_u32 as i32);
        assert_ne!(role_key("poller"), role_key("pollers"));
    }

    #[test]
    fn connection_errors_name_the_database_without_the_password() {
        let Some(_db) = database_or_skip() else {
            return;
        };
        // A port nothing listens on, and a wrong password on the real server.
        let port = jobhook_testkit::engine::free_port();
        let e = PostgresStore::open(
            &format!("postgres://jobhook@127.0.0.1:{port}/jobhook"),
            Some(&Secret::new("s3cret-pw")),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot connect"), "{e}");
        assert!(!e.contains("s3cret-pw"), "{e}");
        let e = PostgresStore::open(&_db.url, Some(&Secret::new("wrong-s3cret")))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&_db.url), "{e}");
        assert!(e.contains("password authentication failed"), "{e}");
        assert!(!e.contains("wrong-s3cret"), "{e}");
    }

    #[test]
    fn works_from_spawn_blocking_and_drops_inside_async_code() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let url = backend.db.url.clone();
            let password = Secret::new(backend.db.password.clone());
            let store: std::sync::Arc<dyn EventStore> = tokio::task::spawn_blocking(move || {
                std::sync::Arc::new(PostgresStore::open(&url, Some(&password)).unwrap())
                    as std::sync::Arc<dyn EventStore>
            })
            .await
            .unwrap();
            let s = std::sync::Arc::clone(&store);
            let led = tokio::task::spawn_blocking(move || {
                s.insert_event(&conformance::event(&["a"]))?;
                s.try_lead("poller")
            })
            .await
            .unwrap()
            .unwrap();
            assert!(led);
            // The last reference goes away on a worker thread that drives async tasks.
            drop(store);
        });
    }

    #[test]
    fn a_newer_schema_is_refused_with_advice() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        drop(backend.node());
        backend
            .db
            .query("INSERT INTO schema_migrations (version) VALUES (999)")
            .unwrap();
        let e = open_refused(&backend);
        assert!(e.contains("version 999"), "{e}");
        assert!(e.contains("upgrade this node"), "{e}");
    }

    /// A server that takes no writes (a standby, `default_transaction_read_only`) is refused at
    /// start with what to do, whether the schema is current or not.
    #[test]
    fn a_read_only_database_is_refused_at_start_with_advice() {
        let Some(backend) = Postgres::new() else {
            return;
        };
        drop(backend.node());
        backend
            .db
            .query(&format!(
                "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
                backend.db.name
            ))
            .unwrap();
        let e = open_refused(&backend);
        assert!(e.contains("the server takes no writes"), "{e}");
        assert!(e.contains("point [store] url at the primary"), "{e}");
    }

    /// Why a new node could not open `backend`'s database (it must be refused).
    fn open_refused(backend: &Postgres) -> String {
        PostgresStore::open(
            &backend.db.url,
            Some(&Secret::new(backend.db.password.clone())),
        )
        .unwrap_err()
        .to_string()
    }
}
