//! What every store is and passes: the [`EventStore`] interface, its errors, and the records
//! that go in and come out of it (events, claims, attempts, views), with the bounds every store
//! call keeps. The backends (`sqlite`, `postgres`) implement it; [`super::open`] picks one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::context::JobContext;
use crate::outcome::Outcome;
pub use crate::queue::delivery_state::DeliveryState;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("store database error: {0}")]
    Database(String),
    /// The store has no room for the write: the disk (or file system) holding the SQLite
    /// database is full, or the PostgreSQL server is out of disk. Nothing of the write was
    /// committed; the same write succeeds once space is freed.
    #[error("the store is out of disk space: {0}")]
    DiskFull(String),
    /// The store refuses writes: a PostgreSQL server in recovery (a standby: after a failover
    /// the engine's address may lead to the old primary) or made read-only
    /// (`default_transaction_read_only`), or a SQLite database the engine may not write.
    /// Nothing of the write was committed; the same write succeeds once the store takes writes
    /// again, which is why it is told apart from an error about one statement.
    #[error("the store takes no writes (read-only): {0}")]
    ReadOnly(String),
    /// The store's database server cannot be reached, is shutting down or starting up, or no
    /// connection to it became free in time after an attempt to connect failed (PostgreSQL).
    /// Whether a commit under way when the connection broke took effect is unknown; the pool
    /// connects again by itself once the server answers.
    #[error("the store's database cannot be reached: {0}")]
    Unreachable(String),
    /// The store's database server answered the engine's connection with a refusal of its own
    /// (PostgreSQL): a password that no longer matches, a role or host it does not admit, every
    /// connection slot of the role, the database or the server taken, a database that does not
    /// exist or that the role may not connect to. Told apart from
    /// [`Unreachable`](Self::Unreachable) because the cure differs: the server is there and
    /// said why, and someone must change a setting (the message says which) before a
    /// connection is admitted again. Nothing was committed; the pool tries again by itself,
    /// so the same call succeeds once the cause is gone.
    #[error("the store's database server refused the engine's connection: {0}")]
    Refused(String),
    /// The store took the work (or a connection to it stands) and then did not answer in time:
    /// a frozen database server, a disk that stopped, every pooled connection held by
    /// statements that have not finished. Told apart from [`Unreachable`](Self::Unreachable)
    /// because the cure differs: nothing refused the engine, something stopped answering it.
    /// Whether a commit under way takes effect later is unknown.
    #[error("the store did not answer in time: {0}")]
    NoAnswer(String),
    /// Stored data could not be decoded (corruption or a newer schema).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// A caller asked for a transition the delivery state machine does not allow.
    #[error(transparent)]
    InvalidTransition(#[from] crate::queue::delivery_state::InvalidFinish),
    /// The idempotency key was already used, within its retention window, for an event with a
    /// different context. Nothing was committed.
    #[error(
        "the idempotency key was already used for a different event ({event_id}); \
         send a new key for a new event"
    )]
    IdempotencyConflict {
        /// The event the key belongs to.
        event_id: Uuid,
    },
    /// The store could not be opened.
    #[error("cannot open the store at {path}: {message}")]
    Open {
        /// Where.
        path: String,
        /// Why.
        message: String,
    },
}

/// [`NewEvent::source`] of events posted to the event API.
pub const SOURCE_API: &str = "api";
/// [`NewEvent::source`] of events the poller made from Keyfactor's JobHistory.
pub const SOURCE_POLLER: &str = "poller";

impl StoreError {
    /// Whether the whole store is failing for a reason that passes without anyone changing the
    /// data — the disk is full, the database is read-only, the server cannot be reached or
    /// refuses the engine's connections — so that the same call succeeds later without anyone
    /// changing the data. Any other error (a refused transition, unreadable
    /// data, an error the database reported about this statement) stays as it is.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull(_)
                | StoreError::ReadOnly(_)
                | StoreError::Unreachable(_)
                | StoreError::Refused(_)
                | StoreError::NoAnswer(_)
        )
    }

    /// The failure in words a client of the API may be told and an operator can act on,
    /// without the database's own message (a file path or a server address is no business of
    /// the client's; the log has it): the five conditions that pass once their cause is gone
    /// and damaged data are named, anything else is "the store failed".
    pub fn plain_cause(&self) -> &'static str {
        match self {
            StoreError::DiskFull(_) => "the store is out of disk space",
            StoreError::ReadOnly(_) => "the store takes no writes (read-only)",
            StoreError::Unreachable(_) => "the store's database cannot be reached",
            StoreError::Refused(_) => {
                "the store's database server refused the engine's connection (the engine's log \
                 says why)"
            }
            StoreError::NoAnswer(_) => "the store did not answer in time",
            // The operator must restore or move the database aside; the log says how.
            StoreError::Corrupt(_) => {
                "the store's data is damaged (the engine's log says what to do)"
            }
            _ => "the store failed",
        }
    }

    /// Whether a client whose read or request failed so is told to retry: not when the data is
    /// damaged, which no retry mends until an operator has restored the store (the
    /// [`plain_cause`](Self::plain_cause) says where to look). An event's sender is told to
    /// retry whatever the cause: it keeps the event until the store takes it.
    pub fn retry_helps(&self) -> bool {
        !matches!(self, StoreError::Corrupt(_))
    }

    /// The same failure again, for each of several calls it stopped (meant for
    /// [`is_transient`](Self::is_transient) errors, which are about the store, not about one
    /// call; any other error is repeated by its message).
    pub fn for_each_call(&self) -> StoreError {
        match self {
            StoreError::DiskFull(why) => StoreError::DiskFull(why.clone()),
            StoreError::ReadOnly(why) => StoreError::ReadOnly(why.clone()),
            StoreError::Unreachable(why) => StoreError::Unreachable(why.clone()),
            StoreError::Refused(why) => StoreError::Refused(why.clone()),
            StoreError::NoAnswer(why) => StoreError::NoAnswer(why.clone()),
            StoreError::Corrupt(why) => StoreError::Corrupt(why.clone()),
            // Said once: not "store database error: store database error: …".
            StoreError::Database(why) => StoreError::Database(why.clone()),
            other => StoreError::Database(other.to_string()),
        }
    }
}

/// What became of a finished attempt's record ([`EventStore::finish_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Recorded: the attempt's end is the delivery's state and is in its attempt list.
    Recorded,
    /// Ignored: the attempt's claim was no longer held (its lease expired while its node was
    /// frozen, partitioned or too slow, and the delivery was requeued). Its end changes
    /// nothing, and nothing should be concluded from it (quarantine does not count it).
    Late,
}

/// An event to commit, with the handlers it is routed to.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Its id.
    pub id: Uuid,
    /// Where it came from: [`SOURCE_API`] or [`SOURCE_POLLER`].
    pub source: String,
    /// The job context.
    pub context: JobContext,
    /// Keyfactor's text about the job's outcome, when the source had it (the poller, from
    /// JobHistory's `Message`); handlers read it through `delivery.message`.
    pub message: Option<String>,
    /// Names of the matching handlers: one delivery each.
    pub handlers: Vec<String>,
}

/// How often the log tells of a failing store, separately for commits, reads (events,
/// failed deliveries) and `/metrics`: each is driven by clients, and a fleet of forwarders resending through an outage
/// (or a scraper) would write a line per request. Every refusal is still counted in `/metrics`
/// (`jobhook_ingest_store_failures_total`), and each line says how many it stands for.
pub const STORE_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Longest `GET /metrics`, `GET /v1/events/{id}` and each call of the failed deliveries' endpoints
/// wait for the store. A read takes
/// milliseconds; one held by a store that stopped answering would hold the request as long as
/// that lasts, and a scrape during a database incident must still give the engine's own
/// counters (its store failures above all). The metrics are then answered without the
/// delivery-state series, an event read with 503.
pub const STORE_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `call` on `store` on the blocking pool and waits at most `limit` for its answer. A store
/// that stopped answering (a frozen database server, a disk that hangs) is then `NoAnswer`
/// ("did not answer in time") instead of holding the caller for as long as it lasts; the
/// blocking call is left to end on its own. A panic of the call is a `Database` error.
pub async fn call_within<T: Send + 'static>(
    store: &Arc<dyn EventStore>,
    limit: Duration,
    call: impl FnOnce(&dyn EventStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    let task = tokio::task::spawn_blocking(move || call(store.as_ref()));
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => Err(StoreError::Database(format!("the store call failed: {e}"))),
        Err(_) => Err(StoreError::NoAnswer(format!("waited {limit:?} for it"))),
    }
}

/// A new event's id: a UUIDv7 (RFC 9562), whose first 48 bits are the time in milliseconds,
/// so that ids sort by when they were made, as bytes (PostgreSQL's `uuid`) and as text
/// (SQLite's `TEXT`), with 74 random bits after them.
///
/// Both stores index events and deliveries by event id. A random id (v4) lands each new event at
/// a random leaf of those indexes: every commit dirties pages spread over the whole file, and
/// the checkpoints that copy them grow with the table. A time-ordered id appends at one end. By
/// hand (SQLite, 1,000 events/s × 4 handlers for 10 s, seven interleaved pairs): ingest p99
/// median 2.58 → 1.53 ms, maxima of 30–45 ms in three of seven runs → at most 12.7 ms, the
/// checkpoints' p99 2.7–7.6 → 1.8–2.6 ms (docs/PERFORMANCE.md).
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

/// An idempotency key that makes an insert happen at most once within its retention window
/// ([`EventStore::insert_event_once`]).
///
/// The key is the client's (a forwarder's resend of the same event carries the same key); the
/// fingerprint identifies the event's content, so that the same key for a different event is a
/// conflict rather than a silent duplicate answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The client's key, already validated by the source that received it.
    pub key: String,
    /// [`fingerprint`] of the event's context.
    pub fingerprint: String,
    /// How long a key holds: a key first used longer ago than this counts as new.
    pub retention: Duration,
}

impl Idempotency {
    /// The idempotency of `key` for an event with `context`.
    pub fn new(key: impl Into<String>, context: &JobContext, retention: Duration) -> Self {
        Idempotency {
            key: key.into(),
            fingerprint: fingerprint(context),
            retention,
        }
    }
}

/// The fingerprint of a context: hex SHA-256 of the JSON of the *decoded* context.
///
/// Hashing the decoded context, not the request's bytes, means that two requests that decode to
/// the same context — differing only in whitespace, field order, the casing of field names or
/// enum names, GUID casing or braces, an enum by name or by number — are the same event, while
/// any difference in a field's value is another event.
pub fn fingerprint(context: &JobContext) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(context.to_json().to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`EventStore::insert_event_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The event was committed.
    New,
    /// The key was used before, within its retention, for the same context: nothing was
    /// committed; this is the original event.
    Existing {
        /// The original event's id.
        event_id: Uuid,
        /// Its deliveries' handlers, in the order they were created.
        handlers: Vec<String>,
    },
}

/// Most expired idempotency keys one [`EventStore::purge_idempotency_keys`] call deletes: bounds the
/// transaction, so purging never holds the write lock long enough to delay ingest noticeably.
pub const MAX_PURGE_BATCH: usize = 1000;

/// Most events one [`EventStore::purge_finished`] call looks at, and so deletes (with their
/// deliveries and attempts, a few rows each): bounds the transaction, so that retention never
/// holds SQLite's writer, or a PostgreSQL transaction's locks, long enough to delay ingest
/// noticeably — however many old events are not finished (a handler quarantined for a month
/// keeps every event routed to it; walking 200,000 such events took 130 ms of SQLite's writer
/// in every batch, by hand).
pub const MAX_EVENT_PURGE_BATCH: usize = 500;

/// Where a walk of the events by receipt time has got to ([`EventStore::purge_finished`]): the
/// last event looked at. Events sort by receipt time, then by an order of the store's own among
/// events received in the same instant: SQLite's row number (its index of receipt times holds
/// it, so no wider index is written with every event), PostgreSQL's event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgePosition {
    /// When the event was received.
    pub received_at: DateTime<Utc>,
    /// Its place among the events received at the same time, in the store's own order.
    pub tiebreak: u128,
}

/// What one [`EventStore::purge_finished`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeRound {
    /// Events deleted.
    pub deleted: u64,
    /// Where the next call goes on from; `None` when this one looked at every event left
    /// before the cutoff.
    pub next: Option<PurgePosition>,
}

/// A delivery claimed by a worker.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The delivery's id.
    pub delivery_id: i64,
    /// The event's id.
    pub event_id: Uuid,
    /// The handler to run.
    pub handler: String,
    /// This attempt's number (1 on the first run).
    pub attempt: u32,
    /// The job context, or why the stored one could not be read (a database written by
    /// another version of the engine, or edited by hand): such a delivery is not run and fails
    /// for good with that reason, and the others claimed with it run as usual.
    pub context: Result<JobContext, String>,
    /// Where the event came from ([`NewEvent::source`]).
    pub source: String,
    /// Keyfactor's text about the job ([`NewEvent::message`]).
    pub message: Option<String>,
}

/// The reason a claim carries when its event's stored context cannot be decoded (see
/// [`Claim::context`]); the same words for every store.
pub fn unreadable_context(
    event_id: impl std::fmt::Display,
    error: &dyn std::fmt::Display,
) -> String {
    format!(
        "the stored context of event {event_id} cannot be read ({error}); the delivery was not \
         run"
    )
}

/// How a claimed attempt ended, as recorded.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// The delivery's state after this attempt.
    pub state: DeliveryState,
    /// For `Pending` (a retry): not before this time.
    pub retry_at: Option<DateTime<Utc>>,
    /// The outcome class (`succeeded`, `handler-failed`, ..., or `skipped`).
    pub class: String,
    /// The reason, when not successful.
    pub reason: Option<String>,
    /// The full outcome, when the handler ran.
    pub outcome: Option<Outcome>,
    /// When the attempt ended, by the queue's clock ([`EventStore::now`]): recorded as its end
    /// however long its record then waits to be committed with others (group commit).
    pub finished_at: DateTime<Utc>,
}

impl AttemptRecord {
    /// Refuses a record that no attempt can lead to
    /// ([`crate::queue::delivery_state::check_finish`]); both stores check every record before
    /// they write it.
    pub fn check(&self) -> Result<(), StoreError> {
        crate::queue::delivery_state::check_finish(self.state, self.retry_at.is_some())?;
        Ok(())
    }

    /// How long the handler ran, in milliseconds to the microsecond, when it ran: what the API
    /// shows (`4.633`, not the float noise of `4.6329780000000005`).
    pub fn duration_ms(&self) -> Option<f64> {
        self.outcome
            .as_ref()
            .map(|o| o.duration.as_micros() as f64 / 1000.0)
    }
}

/// One attempt as stored.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    /// Attempt number.
    pub attempt: u32,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// Outcome class.
    pub class: String,
    /// Reason, when not successful.
    pub reason: Option<String>,
    /// Whether this attempt ended the delivery (no retry followed).
    pub terminal: bool,
}

/// A delivery as stored, for the API.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    /// The handler.
    pub handler: String,
    /// Current state.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempt: u32,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When the last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its current terminal state (or the last attempt ended).
    pub finished_at: Option<DateTime<Utc>>,
    /// Duration of the last attempt in milliseconds.
    pub duration_ms: Option<f64>,
    /// Outcome class of the last attempt.
    pub outcome: Option<String>,
    /// Reason of the last attempt.
    pub reason: Option<String>,
    /// Log lines of the last attempt.
    pub logs: Vec<serde_json::Value>,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptView>,
}

/// An event as stored, for the API.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    /// Its id.
    pub id: Uuid,
    /// When it was committed.
    pub received_at: DateTime<Utc>,
    /// Where it came from.
    pub source: String,
    /// The context, with the .NET field names.
    pub context: serde_json::Value,
    /// Keyfactor's text about the job, when the source had it.
    pub message: Option<String>,
    /// Its deliveries.
    pub deliveries: Vec<DeliveryView>,
}

/// Most failed deliveries one [`EventStore::failed_deliveries`] call lists: one page of the API's
/// list, read in one query.
pub const MAX_FAILED_PAGE: usize = 1000;

/// Most failed deliveries one [`EventStore::retry_failed`] call makes pending again: a bounded
/// transaction, so that running a large number again never holds the store's one writer (and
/// every ingest behind it) for long. The API goes on in batches until none is left.
pub const MAX_RETRY_BATCH: usize = 500;

/// Which failed deliveries to list or run again: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedFilter {
    /// Only this handler's.
    pub handler: Option<String>,
    /// Only this event's.
    pub event: Option<Uuid>,
    /// Only those with an id below this one: the next page of a list, newest first.
    pub before: Option<i64>,
}

/// A failed delivery, as the list of them shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedDelivery {
    /// The delivery's id: the list is newest (highest) first, and the next page starts below
    /// the last one shown.
    pub id: i64,
    /// Its event (`GET /v1/events/{id}` has the context, the log lines and every attempt).
    pub event_id: Uuid,
    /// The handler.
    pub handler: String,
    /// Attempts made.
    pub attempt: u32,
    /// When the last attempt ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Outcome class of the last attempt.
    pub outcome: Option<String>,
    /// Reason of the last attempt.
    pub reason: Option<String>,
}

/// Most deliveries one [`EventStore::claim_batch`] call claims, whatever the caller asks: bounds the
/// transaction (and the candidate query) so that a claim never holds the database's write lock
/// long enough to delay an ingest commit noticeably.
pub const MAX_CLAIM_BATCH: usize = 64;

/// The outcome class of an attempt that never reported an outcome: the node running it died,
/// froze past its lease or shut down first. The requeue that hands such a delivery back records
/// the attempt with this class (never terminal), so `GET /v1/events/{id}` lists every attempt.
pub const INTERRUPTED_CLASS: &str = "interrupted";

/// The reason recorded with an attempt whose node stopped renewing its claim.
pub const ABANDONED_REASON: &str = "the node running it stopped (crashed, was killed or froze) before it recorded an outcome; \
     it runs again";

/// The reason recorded with an attempt handed back by a node shutting down.
pub const RELEASED_REASON: &str =
    "the node running it shut down before the handler finished; it runs again";

/// What a handler has of a node's delivery slots: how a claim with fewer slots than due
/// deliveries shares them between handlers ([`ClaimLimits::choose`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    /// Its deliveries running on the node now.
    pub running: usize,
    /// When the node last claimed a delivery of it, in the node's own count of claims (0:
    /// never): of handlers with as many running, the one served longest ago goes first.
    pub served: u64,
}

/// How many deliveries a [`EventStore::claim_batch`] call may claim, in all and per handler,
/// and how to share them between handlers when there are more due than that.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Most deliveries in all (capped at [`MAX_CLAIM_BATCH`]); 0 claims nothing.
    pub max: usize,
    /// Handlers that may only get this many more claims (their concurrency cap minus what is
    /// running); 0 leaves a handler out.
    pub room: BTreeMap<String, usize>,
    /// How many of each handler not in `room` may be claimed. The dispatcher lists every
    /// handler it has loaded and passes 0: a delivery of a handler it does not have (renamed or
    /// removed by a reload, or not yet configured on this node while a change rolls out) stays
    /// pending until a node that has it claims it, instead of being claimed here and skipped
    /// for good. `usize::MAX` (see [`ClaimLimits::any`]) limits them by `max` only.
    pub others: usize,
    /// Each handler's share of the claiming node's slots; a handler not listed has none
    /// running and was never served. Only matters when more are due than the claim takes.
    pub shares: BTreeMap<String, Share>,
}

impl ClaimLimits {
    /// Up to `max` deliveries of any handlers.
    pub fn any(max: usize) -> Self {
        ClaimLimits {
            max,
            room: BTreeMap::new(),
            others: usize::MAX,
            shares: BTreeMap::new(),
        }
    }

    /// One delivery of any handler except those in `busy`.
    pub fn one_excluding(busy: &[String]) -> Self {
        ClaimLimits {
            max: 1,
            room: busy.iter().map(|h| (h.clone(), 0)).collect(),
            others: usize::MAX,
            shares: BTreeMap::new(),
        }
    }

    /// How many of `handler`'s deliveries a claim may take at most, before the batch size: its
    /// room, or `others` when `room` does not list it.
    pub fn room_of(&self, handler: &str) -> usize {
        self.room.get(handler).copied().unwrap_or(self.others)
    }

    /// The most to claim: `max`, capped at [`MAX_CLAIM_BATCH`].
    pub fn batch_size(&self) -> usize {
        self.max.min(MAX_CLAIM_BATCH)
    }

    /// Handlers with no room left, for the store's query to skip.
    pub fn excluded(&self) -> Vec<String> {
        self.room
            .iter()
            .filter(|(_, room)| **room == 0)
            .map(|(handler, _)| handler.clone())
            .collect()
    }

    /// Keeps the candidates the limits allow: at most [`ClaimLimits::batch_size`], and no more
    /// of a handler than its room. `candidates` come oldest due first (by due time, then id),
    /// and so do the ones kept.
    ///
    /// When the limits allow more than the batch takes, the batch is shared between handlers:
    /// each next delivery goes to the handler with the fewest deliveries running (on the
    /// claiming node, [`Share::running`], plus those this claim already gave it), among those
    /// to the one served longest ago ([`Share::served`]), then to the oldest due delivery;
    /// within a handler the oldest due goes first. Oldest first across handlers gave each slot
    /// that came free to the handler with the oldest backlog: slow handlers whose caps added up
    /// to the node's slots held every one of them until their backlogs had drained, and a
    /// quick handler's delivery waited behind them all. Handing out the slots one at a time
    /// this way is the same as taking the candidates in the order of `share_order`, then oldest
    /// due first: PostgreSQL's claim statement orders its candidates so; the store suite
    /// (`conformance.rs`) holds both stores to it.
    pub fn choose<T>(&self, candidates: Vec<T>, handler: impl Fn(&T) -> &str) -> Vec<T> {
        let mut taken: BTreeMap<String, usize> = BTreeMap::new();
        let mut allowed = Vec::with_capacity(candidates.len());
        for (index, candidate) in candidates.into_iter().enumerate() {
            let name = handler(&candidate);
            // Each handler's name is copied once, not once per candidate.
            let used = match taken.get_mut(name) {
                Some(used) => used,
                None => taken.entry(name.to_owned()).or_insert(0),
            };
            if *used >= self.room_of(name) {
                continue;
            }
            let order = self.share_order(name, *used);
            *used += 1;
            allowed.push((order, index, candidate));
        }
        if allowed.len() > self.batch_size() {
            allowed.sort_by_key(|(order, index, _)| (*order, *index));
            allowed.truncate(self.batch_size());
            allowed.sort_by_key(|(_, index, _)| *index);
        }
        allowed
            .into_iter()
            .map(|(_, _, candidate)| candidate)
            .collect()
    }

    /// Where `handler`'s candidate with `before` of the handler's candidates ahead of it goes
    /// in the order a claim short of slots takes them ([`ClaimLimits::choose`]), before the
    /// oldest due first: the deliveries the handler would be running before it is given this
    /// one, then when the handler was last served.
    fn share_order(&self, handler: &str, before: usize) -> (usize, u64) {
        let share = self.shares.get(handler).copied().unwrap_or_default();
        (share.running.saturating_add(before), share.served)
    }
}

/// A store call's result for an async caller to await: the call is already under way (handed
/// to SQLite's writer thread), and the future only waits for its answer.
pub type Answer<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send>>;

/// The writes of the event path, for async callers, without a blocking thread: a store whose
/// writes are answered by a thread of its own (SQLite's writer) hands them over and lets that
/// thread wake the caller. Each is [`EventStore`]'s call of the same name, with the same
/// effect and errors.
pub trait AwaitedWrites: Send + Sync {
    /// [`EventStore::insert_event_once`] with `Some(key)`, [`EventStore::insert_event`] (always
    /// [`Inserted::New`]) with `None`.
    fn insert_event_awaited(&self, event: &NewEvent, key: Option<&Idempotency>)
    -> Answer<Inserted>;

    /// [`EventStore::claim_batch`].
    fn claim_batch_awaited(
        &self,
        now: DateTime<Utc>,
        limits: &ClaimLimits,
        lease: Duration,
    ) -> Answer<Vec<Claim>>;

    /// [`EventStore::finish_batch`].
    fn finish_batch_awaited(&self, finished: &[(&Claim, &AttemptRecord)]) -> Answer<Vec<Finish>>;
}

/// The storage interface the engine runs on.
///
/// Calls block (SQLite does); async callers use `spawn_blocking`, or
/// [`EventStore::awaited_writes`] where the store offers it.
pub trait EventStore: Send + Sync + 'static {
    /// The event path's writes for async callers, if this store answers them without a
    /// blocking thread (SQLite); `None` (PostgreSQL, whose client blocks) means: call the
    /// blocking ones from `spawn_blocking`.
    fn awaited_writes(&self) -> Option<&dyn AwaitedWrites> {
        None
    }

    /// The queue's time now ([`QueueClock`](super::clock::QueueClock)): what due times, leases and idempotency
    /// retention are measured in. The `now` that callers pass to the store is this.
    fn now(&self) -> DateTime<Utc>;

    /// Reads the queue clock's reference (the system clock for SQLite, the database server's
    /// clock for PostgreSQL) and follows it; returns the step when the reading is one (more
    /// than [`STEP_TOLERANCE`](super::clock::STEP_TOLERANCE) away from the carried time).
    ///
    /// After a step, a store that is the only user of its schedule (SQLite) first moves every
    /// due time, lease and idempotency key by the step, so that each wait keeps the length it
    /// had. A shared store (PostgreSQL) follows its server's clock, which every node reads, so a
    /// node's own clock never matters to it. Called every third of the lease.
    fn keep_time(&self) -> Result<Option<TimeDelta>, StoreError>;

    /// Commits an event and one pending delivery per handler, atomically.
    fn insert_event(&self, event: &NewEvent) -> Result<(), StoreError>;

    /// Commits an event as [`EventStore::insert_event`] does, unless `key` was already used within
    /// its retention: then nothing is committed and the original event is returned, or
    /// [`StoreError::IdempotencyConflict`] when that event's context differs.
    ///
    /// The key is claimed through the database's uniqueness in the same transaction as the
    /// event, so two callers (or two nodes) racing with one key commit one event.
    fn insert_event_once(
        &self,
        event: &NewEvent,
        key: &Idempotency,
    ) -> Result<Inserted, StoreError>;

    /// Deletes up to `max` (capped at [`MAX_PURGE_BATCH`]) idempotency keys first used before
    /// `before`; returns how many.
    fn purge_idempotency_keys(&self, before: DateTime<Utc>, max: usize) -> Result<u64, StoreError>;

    /// Looks at up to `max` (1 to [`MAX_EVENT_PURGE_BATCH`]) events received before `before`,
    /// oldest first, after `from` (from the oldest when `None`), and deletes the finished ones,
    /// each with its deliveries and their attempts, in one transaction; returns how many were
    /// deleted and where to go on from. A walk is bounded per call whatever the events are:
    /// old events that are not finished are passed once per walk, not once per call.
    ///
    /// Finished: every delivery of the event is terminal (succeeded, failed, skipped), or it has
    /// none (routed to no handler). An event with a delivery pending or running is kept however
    /// old it is, and becomes finished only by its deliveries ending: a terminal delivery changes
    /// again only when an operator runs it again ([`EventStore::retry_failed`], which each store
    /// orders against this purge), so what is deleted cannot be needed by a claim. Idempotency keys are not
    /// touched: the caller keeps events at least as long as their keys
    /// (`queue::retention`). On a shared store, nodes purging at once skip each other's rows.
    fn purge_finished(
        &self,
        before: DateTime<Utc>,
        max: usize,
        from: Option<PurgePosition>,
    ) -> Result<PurgeRound, StoreError>;

    /// Claims up to `limits.max` due pending deliveries, at most as many of each handler as
    /// `limits` leaves room for, each handler's oldest first, in one transaction: marks each
    /// running, owned by this store's node with a lease until `now + lease`, and increments its
    /// attempt. When more are due than that, the claim is shared between handlers as
    /// [`ClaimLimits::choose`] says. Answered oldest due first.
    ///
    /// One transaction for many claims is what lets dispatch keep up with ingest: a claim costs
    /// a write transaction, and the engine needs one per delivery (docs/PERFORMANCE.md).
    fn claim_batch(
        &self,
        now: DateTime<Utc>,
        limits: &ClaimLimits,
        lease: Duration,
    ) -> Result<Vec<Claim>, StoreError>;

    /// Claims the oldest due pending delivery whose handler is not in `busy` (see
    /// [`EventStore::claim_batch`]).
    fn claim(
        &self,
        now: DateTime<Utc>,
        busy: &[String],
        lease: Duration,
    ) -> Result<Option<Claim>, StoreError> {
        let limits = ClaimLimits::one_excluding(busy);
        Ok(self.claim_batch(now, &limits, lease)?.into_iter().next())
    }

    /// Extends the leases of every delivery this node is running to `now + lease`.
    fn renew(&self, now: DateTime<Utc>, lease: Duration) -> Result<(), StoreError>;

    /// Records the ends of claimed attempts, all in one transaction, and says of each, in the
    /// order given, whether it was recorded. An attempt whose claim is no longer held (its lease
    /// expired and another attempt took over) is ignored ([`Finish::Late`]); the others are
    /// still recorded.
    fn finish_batch(
        &self,
        finished: &[(&Claim, &AttemptRecord)],
    ) -> Result<Vec<Finish>, StoreError>;

    /// Records the end of one claimed attempt (see [`EventStore::finish_batch`]).
    fn finish(&self, claim: &Claim, record: &AttemptRecord) -> Result<Finish, StoreError> {
        Ok(self
            .finish_batch(&[(claim, record)])?
            .into_iter()
            .next()
            .unwrap_or(Finish::Late))
    }

    /// Puts back to `pending` every running delivery whose claim is abandoned: one whose lease
    /// expired, and — for a single-node store — any claim of an earlier process. Returns how
    /// many.
    fn requeue_abandoned(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Puts every delivery this node is running back to `pending` (shutdown interrupted them);
    /// returns how many.
    fn release_all(&self) -> Result<u64, StoreError>;

    /// The event and its deliveries.
    fn event(&self, id: Uuid) -> Result<Option<EventView>, StoreError>;

    /// Up to `max` (capped at [`MAX_FAILED_PAGE`]) failed deliveries that `filter` selects,
    /// newest (highest id) first.
    fn failed_deliveries(
        &self,
        filter: &FailedFilter,
        max: usize,
    ) -> Result<Vec<FailedDelivery>, StoreError>;

    /// Makes up to `max` (capped at [`MAX_RETRY_BATCH`]) failed deliveries that `filter`
    /// selects, newest first, pending again and due at `now`, in one transaction; returns their
    /// ids. Each keeps its attempts: the next claim runs it with the next attempt number, and
    /// its retry policy counts from there (a delivery past its last retry gets one attempt).
    ///
    /// An event being deleted by retention at the same time is either deleted first (its
    /// deliveries are then not made pending, nor counted) or kept (a pending delivery keeps
    /// its event).
    fn retry_failed(
        &self,
        filter: &FailedFilter,
        now: DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<i64>, StoreError>;

    /// When the next pending delivery that a claim under `limits` could take becomes due, if
    /// one is pending: a handler's deliveries count only if `limits` leaves it room
    /// ([`ClaimLimits::room_of`]; `limits.max` does not matter). Deliveries of a handler at its
    /// cap, quarantined or not configured on this node wait for a place, the quarantine's end or
    /// a node that has the handler, not for a time: counted, one of them already overdue made
    /// the dispatcher wait for its idle poll instead of for another handler's retry due sooner.
    /// One index seek per handler with pending deliveries, as a claim.
    fn next_due(&self, limits: &ClaimLimits) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Deliveries by state, for metrics.
    fn count_by_state(&self) -> Result<Vec<(DeliveryState, u64)>, StoreError>;

    /// Pending deliveries by handler, every handler that has any: what start-up and reload
    /// compare with the handlers configured, to say which deliveries wait for a handler no node
    /// of this configuration has. Reads every pending row; not for a hot path.
    fn pending_by_handler(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Failed deliveries by handler, every handler that has any, in name order: what
    /// `GET /v1/handlers` and the metrics show an operator beside the pending ones, so that a
    /// handler whose deliveries have run out of retries is seen without paging the failed list.
    /// Reads an index of failed rows only; retention bounds how many there are.
    fn failed_by_handler(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// A durable value of the poller (e.g. the last JobHistoryId seen).
    fn cursor(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Commits events and advances a cursor in one transaction, so a restart neither loses nor
    /// repeats them.
    fn insert_events_with_cursor(
        &self,
        events: &[NewEvent],
        cursor_name: &str,
        cursor: &str,
    ) -> Result<(), StoreError>;

    /// Whether this node is the one that should run `role` (e.g. the JobHistory poller) now.
    ///
    /// Some work must run on one node only: two pollers would read the same JobHistory rows.
    /// Leadership is held until the node ends (or loses its database session), then another
    /// node's next call gets it; callers ask again before each round of such work. A single-node
    /// store always answers `true`.
    fn try_lead(&self, role: &str) -> Result<bool, StoreError>;

    /// Whether each claim is dear enough that the dispatcher should gather places before it
    /// claims (`queue::dispatch::gathers`): a transaction on a shared database server costs
    /// that server's CPU for every claim, however few deliveries it takes. SQLite's claims join
    /// the writer's group commit in-process, and waiting only delays deliveries (measured:
    /// docs/PERFORMANCE.md). Default: no.
    fn claims_are_dear(&self) -> bool {
        false
    }
}

/// `max` as a query's `LIMIT`, at most `cap`: the bound of a store call whatever it is asked.
pub(crate) fn capped(max: usize, cap: usize) -> i64 {
    i64::try_from(max.min(cap)).unwrap_or(0)
}

/// How many events one [`EventStore::purge_finished`] call looks at for `max`: at least one, at
/// most [`MAX_EVENT_PURGE_BATCH`].
pub(crate) fn purge_batch(max: usize) -> i64 {
    i64::try_from(max.clamp(1, MAX_EVENT_PURGE_BATCH)).unwrap_or(1)
}

/// A position before every event: the walk's start. Year 1, which both stores hold (and no
/// clock gives an event).
pub(crate) fn walk_start() -> PurgePosition {
    PurgePosition {
        received_at: DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).unwrap_or_default(),
        tiebreak: 0,
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The inverse of [`to_ms`].
pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub use crate::queue::delivery_state::after;

#[cfg(test)]
mod tests {
    use super::*;

    /// An error repeated for each call it stopped says what it said once, with its kind's
    /// words once (a database error was "store database error: store database error: …").
    /// A duration is shown to the microsecond, without the float noise of nanoseconds
    /// multiplied out.
    #[test]
    fn a_duration_is_shown_to_the_microsecond() {
        let mut record = crate::queue::store::conformance::record(DeliveryState::Succeeded);
        assert_eq!(record.duration_ms(), None);
        record.outcome = Some(crate::outcome::Outcome::bare(
            crate::outcome::OutcomeKind::Succeeded,
            Duration::from_nanos(4_632_978),
        ));
        assert_eq!(record.duration_ms(), Some(4.632));
    }

    #[test]
    fn an_error_repeated_for_each_call_reads_as_it_did_once() {
        for error in [
            StoreError::Database("disk I/O error".into()),
            StoreError::DiskFull("database or disk is full".into()),
            StoreError::ReadOnly("attempt to write a readonly database".into()),
            StoreError::Unreachable("connection refused".into()),
            StoreError::Refused("password authentication failed".into()),
            StoreError::NoAnswer("timed out".into()),
            // Damaged data stays damaged data, with its advice, for each call.
            StoreError::Corrupt("bad row".into()),
        ] {
            assert_eq!(error.for_each_call().to_string(), error.to_string());
        }
        let conflict = StoreError::IdempotencyConflict {
            event_id: Uuid::nil(),
        };
        assert_eq!(
            conflict.for_each_call().to_string(),
            "store database error: the idempotency key was already used for a different event \
             (00000000-0000-0000-0000-000000000000); send a new key for a new event"
        );
    }

    #[test]
    fn new_event_ids_sort_in_the_order_they_were_made() {
        // Many within one millisecond: the order must hold inside it too, not only across.
        let ids: Vec<Uuid> = (0..10_000).map(|_| new_event_id()).collect();
        for pair in ids.windows(2) {
            let [earlier, later] = pair else { continue };
            assert_eq!(later.get_version_num(), 7);
            // As PostgreSQL's `uuid` compares them (bytes) and as SQLite's `TEXT` does.
            assert!(
                earlier.as_bytes() < later.as_bytes(),
                "{earlier} !< {later}"
            );
            assert!(
                earlier.to_string() < later.to_string(),
                "{earlier} !< {later}"
            );
        }
    }

    /// A store call that does not answer within its bound is `NoAnswer` at the bound, not
    /// whenever the call ends; one that panics is a `Database` error, not a panic of the
    /// caller.
    #[tokio::test(flavor = "current_thread")]
    async fn a_store_call_past_its_bound_is_no_answer_and_a_panic_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn EventStore> = Arc::new(
            crate::queue::store::sqlite::SqliteStore::open(dir.path()).expect("open the store"),
        );
        let (release, held) = std::sync::mpsc::channel::<()>();
        let began = std::time::Instant::now();
        let slow = call_within(&store, Duration::from_millis(100), move |_| {
            let _ = held.recv_timeout(Duration::from_secs(30));
            Ok(())
        })
        .await;
        assert!(
            matches!(slow, Err(StoreError::NoAnswer(ref why)) if why.contains("100ms")),
            "{slow:?}"
        );
        assert!(slow.as_ref().is_err_and(StoreError::is_transient));
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        let _ = release.send(());

        let panicked: Result<(), StoreError> =
            call_within(&store, Duration::from_secs(30), |_| panic!("a store bug")).await;
        assert!(
            matches!(panicked, Err(StoreError::Database(ref why)) if why.contains("failed")),
            "{panicked:?}"
        );

        let answered = call_within(&store, Duration::from_secs(30), |store| {
            store.event(Uuid::nil())
        })
        .await;
        assert!(matches!(answered, Ok(None)), "{answered:?}");
    }
}
