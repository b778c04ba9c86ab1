//! The JobHistory poller: for sites where no extension can be installed in Keyfactor Command,
//! jobhook polls `GET OrchestratorJobs/JobHistory` and turns finished jobs into events.
//!
//! The poller queries and sorts on documented JobHistory query fields only (`OperationStart`;
//! the API documents `AgentId, Agent, JobId, Result, Status, JobType, Message, OperationStart,
//! ScheduleType, TargetPath`, and Command refuses others). The cursor ([`Cursor`]) is the latest
//! `OperationStart` already turned into events plus the `JobHistoryId`s seen within
//! [`OVERLAP`] before it; each poll asks for `OperationStart -ge (cursor - OVERLAP)` in ascending
//! `OperationStart` order and skips the ids already seen, so rows that share a timestamp, or
//! that become visible a little after later ones, are neither lost nor repeated. The cursor is a
//! small JSON document stored durably and advanced in the same transaction that commits the
//! events, so a restart neither loses nor repeats a job. The cursor stops before the first row
//! that is not finished yet (it is read again on the next poll), unless that row is older than
//! `stale_after_ms`, in which case it is skipped with a warning so that one job that never
//! completes cannot stall the poller. While it waits, a warning (once the job has run
//! [`HOLD_NOTICE`], at once for a `Status` it cannot read) and the
//! `jobhook_poller_held_since_timestamp_seconds` gauge say so ([`Poller::notice_hold`]). The
//! cursor's position never moves past the poll's own time, whatever start a row claims
//! ([`CLOCK_SLACK`]). A server that answers a later page with earlier rows (it ignores
//! `pq.pageReturned`) or rows out of `OperationStart` order fails the poll ([`Paging`]). API
//! errors back off exponentially. With several engine nodes on one shared store, only the node
//! holding the store's `poller` leadership polls.
//!
//! How the context is filled (a JobHistory row has fewer fields than the context a Keyfactor
//! extension receives; README "JobHistory poller" says what stays approximate):
//!
//! | context field      | from                                                              |
//! |--------------------|-------------------------------------------------------------------|
//! | AgentId            | `GET /Agents`: the agent whose `ClientMachine` is the row's `AgentMachine`, the one seen last (`LastSeen`) when several share the name (cached, [`AGENT_CACHE_TTL`]); nil when unknown or unreadable |
//! | Username           | that agent's `Username`, otherwise empty                          |
//! | ClientMachine      | `AgentMachine` (the orchestrator's name), else empty ([`agent_machine`]) |
//! | JobResult          | `Result` (number or name)                                         |
//! | JobId              | `JobId`                                                           |
//! | JobType            | `JobType`                                                         |
//! | JobTypeId          | `[poller.job_types]` by `JobType`, else nil                       |
//! | OperationType      | from the `JobType` name ([`operation_type_of`]), else Unknown     |
//! | CertificateId      | empty (JobHistory does not carry it)                              |
//! | RequestTimestamp   | `OperationStart` of the first run of the retry chain (this run's when it is not a retry) |
//! | CurrentRetryCount  | the number of runs of the same `JobId` right before this one that ended `Status` 5, CompletedWillRetry |
//!
//! Beside the context, the row's `Message` (why a job failed, as the orchestrator reported it)
//! goes with the event for `delivery.message` ([`message_of`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::bindings::jobhook::handler::keyfactor::Request;
use crate::bindings::types::CapabilityError;
use crate::bindings::types::Method;
use crate::capabilities::keyfactor::{KeyfactorClient, KeyfactorGrant};
use crate::context::{JobContext, JobResult, OperationType, parse_guid, parse_timestamp};
use crate::log_limit::LogLimit;
use crate::queue::dispatch::Dispatcher;
use crate::queue::store::{EventStore, NewEvent, SOURCE_POLLER, StoreError};
use crate::runtime::state::Delivery;
use crate::sources::store_health::{self, StoreHealth};

/// The name of the poller's cursor in the store.
pub const CURSOR: &str = "jobhistory";

/// How far before the cursor each poll looks again. JobHistory's `OperationStart` has a
/// resolution of one second, several jobs start in the same second, and a row can become
/// visible slightly after rows that started later (Command writes rows from several web
/// servers and orchestrators whose clocks differ by seconds). Ten minutes covers clock skew and
/// late commits with a wide margin, while keeping the re-read rows (skipped by id) few.
///
/// A row that becomes visible only after rows starting more than this after it were handled
/// (a "late row": an orchestrator or web server whose clock is more than ten minutes behind) is
/// not read. A wider overlap would cover more skew, but every poll re-reads every row of the
/// window (a site finishing one job a second re-reads 600 rows a poll at ten minutes, 1,800 at
/// thirty) and [`MAX_SEEN`] would start dropping ids at a lower job rate; that is not worth it
/// for clocks that NTP keeps within seconds. Instead the window is kept whole — the position
/// never runs ahead of this machine's clock ([`CLOCK_SLACK`]), so a server ahead cannot shrink
/// it — and a row arriving more than [`LATE_NOTICE`] late is logged, so a drifting clock is
/// noticed before rows are lost.
pub const OVERLAP: chrono::Duration = chrono::Duration::minutes(10);

/// How far a row's `OperationStart` may lie ahead of this machine's clock before it is logged as
/// a wrong clock, and how far a stored position may lie ahead before it is brought back to this
/// machine's time. The position itself never moves past the poll's time, whatever the slack:
/// it is where the next query starts (less [`OVERLAP`]), so a position ahead would skip the
/// jobs that start meanwhile. Servers kept by NTP agree to well under a second; a minute leaves
/// room for one drifting between synchronisations, or for the clocks of two engine nodes
/// (leadership moves between them), without warnings on every row.
pub const CLOCK_SLACK: chrono::Duration = chrono::Duration::minutes(1);

/// A job handled this long after a job that started later (its start this far before the
/// position) is logged: half of [`OVERLAP`], so a clock drifting behind is reported while its
/// rows are still read.
pub const LATE_NOTICE: chrono::Duration = chrono::Duration::minutes(5);

/// Least time between two warnings of one kind about rows (a start ahead of the clock or late,
/// a row skipped, a page longer than asked for): one wrong clock, or a server that sends
/// malformed rows on every poll, would otherwise write a line per row, millions of them; the
/// warning says how many it stood for.
const NOTICE_EVERY: Duration = Duration::from_secs(600);

/// How long an unfinished job must have run before the poller, waiting at it, warns that it is
/// held ([`NOTICE_EVERY`] apart). Jobs that run minutes are ordinary (an inventory of a large
/// store, a re-enrollment waiting on a CA: [`MIN_STALE_AFTER`]), and a warning for each would
/// be noise on any busy site; half an hour is longer than orchestrator jobs run, and short
/// against the day `stale_after_ms` waits by default before it skips the job. The
/// `jobhook_poller_held_since_timestamp_seconds` gauge shows every wait from its start.
pub const HOLD_NOTICE: chrono::Duration = chrono::Duration::minutes(30);

/// Times one job's earlier-runs lookup (`CurrentRetryCount`, `RequestTimestamp`) may fail, each
/// failing its poll, before the poller stops waiting for it: a passing error leaves the poll to
/// the next one, which gets the whole context; a lookup that keeps failing for one job would
/// otherwise hold back every job after it for good. After that this job — only it — becomes an
/// event with what its own row tells (`CurrentRetryCount` 0), and the log says so.
pub const LOOKUP_FAILURES_TOLERATED: u32 = 3;

/// Most jobs whose failed lookups the poller counts at once ([`LOOKUP_FAILURES_TOLERATED`]).
/// A poll stops at the first failure, so a handful are counted at a time; past this the counts
/// start over rather than grow.
const MAX_JOBS_WITH_FAILED_LOOKUPS: usize = 1_000;

/// Most `JobHistoryId`s the cursor remembers. A site finishing more jobs than this within
/// [`OVERLAP`] (over 16 jobs a second) would make the cursor document large; beyond it the
/// oldest ids are dropped and the query's lower bound moves up past them (see [`Cursor`]).
pub const MAX_SEEN: usize = 10_000;

/// Most pages one poll reads: enough to step over every row the cursor may remember (at most
/// [`MAX_SEEN`] rows inside the overlap window are skipped by id) and still reach a new one, so
/// a burst of jobs inside the window cannot stall the poller.
fn max_pages(page_size: u32) -> u32 {
    u32::try_from(MAX_SEEN).unwrap_or(u32::MAX) / page_size.max(1) + 2
}

/// Most earlier rows of one job read to count its retries. Keyfactor reschedules a failed job a
/// handful of times; a longer chain is counted as this many.
pub const MAX_RETRY_LOOKBACK: usize = 100;

/// How long the orchestrator list from `GET /Agents` is used before it is read again: agents
/// are registered rarely, and a stale entry only delays a new agent's id by this much.
pub const AGENT_CACHE_TTL: Duration = Duration::from_secs(600);

/// A machine not in the cached list makes the poller read `GET /Agents` again, at most this
/// often (a row from an agent registered since the last read).
pub const AGENT_MISS_REFRESH: Duration = Duration::from_secs(60);

/// Most agents remembered: bounds the cache and the pages read (a large site has hundreds).
pub const MAX_AGENTS: usize = 10_000;

/// Agents per `GET /Agents` page.
const AGENT_PAGE: usize = 500;

/// The agents endpoint, relative to the API base.
const AGENTS: &str = "Agents";

/// The path polled, relative to the API base.
const JOB_HISTORY: &str = "OrchestratorJobs/JobHistory";

/// Longest back-off after repeated API errors.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Longest `interval_ms`: past an hour between polls, jobs reach handlers too late to act on
/// (and the first error's back-off starts from the interval).
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// Shortest `stale_after_ms`. A job still running at a poll is waited for until it is this old;
/// past it, it is skipped and its completion never becomes an event. Jobs that run ten minutes
/// are not rare (an inventory of a large store, a re-enrollment waiting on a CA), so a shorter
/// setting would lose real completions.
pub const MIN_STALE_AFTER: Duration = Duration::from_secs(600);

/// `[poller]`: polling Keyfactor's JobHistory instead of receiving events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollerConfig {
    /// Time between polls, in milliseconds.
    pub interval_ms: u64,
    /// Rows per request (`pq.returnLimit`).
    pub page_size: u32,
    /// On the very first start (no cursor yet): `false` starts from the newest job and turns
    /// only later jobs into events; `true` turns the whole history into events.
    pub backfill: bool,
    /// An unfinished row older than this (by `OperationStart`) is skipped, in milliseconds.
    pub stale_after_ms: u64,
    /// JobType name → job type GUID, for routing (JobHistory rows carry no JobTypeId).
    pub job_types: BTreeMap<String, String>,
}

/// Time between polls by default, in milliseconds: a job's completion becomes an event within
/// half a minute, at one JobHistory query per interval.
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 30_000;

/// Rows per JobHistory request by default (`pq.returnLimit`): a page a busy interval's jobs fit
/// in, small enough that one answer stays a modest read.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// Age by default past which an unfinished row is skipped, in milliseconds: a day, far longer
/// than an orchestrator job runs, so only a job that will never finish is left behind.
pub const DEFAULT_STALE_AFTER_MS: u64 = 24 * 3600 * 1000;

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            interval_ms: DEFAULT_POLL_INTERVAL_MS,
            page_size: DEFAULT_PAGE_SIZE,
            backfill: false,
            stale_after_ms: DEFAULT_STALE_AFTER_MS,
            job_types: BTreeMap::new(),
        }
    }
}

impl PollerConfig {
    /// Checks values and parses the job type map.
    pub fn job_type_ids(&self) -> Result<BTreeMap<String, Uuid>, PollerConfigError> {
        let interval_ms = u64::try_from(MAX_POLL_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if !(1..=interval_ms).contains(&self.interval_ms) {
            return Err(PollerConfigError::Bounds(format!(
                "interval_ms = {} is out of range: give 1 to {interval_ms} (milliseconds)",
                self.interval_ms
            )));
        }
        if !(1..=1000).contains(&self.page_size) {
            return Err(PollerConfigError::Bounds(format!(
                "page_size = {} is out of range: give 1 to 1000",
                self.page_size
            )));
        }
        let stale_ms = u64::try_from(MIN_STALE_AFTER.as_millis()).unwrap_or(u64::MAX);
        if self.stale_after_ms < stale_ms {
            return Err(PollerConfigError::Bounds(format!(
                "stale_after_ms = {} is too short: give at least {stale_ms} (ten minutes); a job \
                 still running when it is this old is skipped, and its completion never becomes \
                 an event",
                self.stale_after_ms
            )));
        }
        // Rows are matched by their `JobType` lower-cased: names that differ only in case are
        // one name, and which GUID it would get is not for the map's order to decide.
        let mut ids = BTreeMap::new();
        let mut written: BTreeMap<String, &str> = BTreeMap::new();
        for (name, id) in &self.job_types {
            if let Some(problem) = job_type_name_problem(name) {
                return Err(PollerConfigError::JobTypeName {
                    name: name.clone(),
                    problem,
                });
            }
            let guid = parse_guid(id).ok_or_else(|| PollerConfigError::JobType {
                name: name.clone(),
                id: id.clone(),
            })?;
            let folded = name.to_ascii_lowercase();
            if let Some(first) = written.insert(folded.clone(), name) {
                return Err(PollerConfigError::CaseCollision {
                    first: first.to_owned(),
                    second: name.clone(),
                });
            }
            ids.insert(folded, guid);
        }
        Ok(ids)
    }
}

/// What makes a `[poller.job_types]` name one no JobHistory row carries, if anything: empty,
/// white space around it, a control character. Command's job type names are identifiers
/// (`WinCertInventory`, `Custom.FetchLogs`); such a name would never route a row.
fn job_type_name_problem(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() {
        Some(
            "is empty: give the JobType name JobHistory rows carry (`jobhook job-types` prints \
             them)",
        )
    } else if name.chars().any(char::is_control) {
        Some("holds a control character, which no JobType name has: remove it")
    } else if name.trim() != name {
        Some("has white space around it, which no JobType name has: remove it")
    } else {
        None
    }
}

/// Why a `[poller]` section was refused; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollerConfigError {
    /// `interval_ms`, `page_size` or `stale_after_ms` out of bounds: which, and the range.
    #[error("[poller] {0}")]
    Bounds(String),
    /// A `[poller.job_types]` value that is not a GUID.
    #[error(
        "[poller.job_types] {} = {} is not a GUID",
        crate::excerpt::quoted(name),
        crate::excerpt::quoted(id)
    )]
    JobType {
        /// The job type name.
        name: String,
        /// The value given.
        id: String,
    },
    /// A `[poller.job_types]` name no JobHistory row carries ([`job_type_name_problem`]).
    #[error("[poller.job_types] {} {problem}", crate::excerpt::quoted(name))]
    JobTypeName {
        /// The name as written.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Two `[poller.job_types]` names that differ only in case: rows are matched without regard
    /// to case, so one GUID would silently replace the other.
    #[error(
        "[poller.job_types] {} and {} differ only in case; JobHistory rows are matched to these \
         names without regard to case, so one GUID would replace the other: keep one of them",
        crate::excerpt::quoted(first),
        crate::excerpt::quoted(second)
    )]
    CaseCollision {
        /// The name met first (in key order).
        first: String,
        /// The other.
        second: String,
    },
}

/// Why a poller could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PollerSetupError {
    /// The `[poller]` section.
    #[error(transparent)]
    Config(#[from] PollerConfigError),
    /// The poller's own Keyfactor grant.
    #[error("the poller's Keyfactor grant: {0}")]
    Grant(String),
}

/// Why one poll failed. The poller logs it and tries again with backoff; nothing is committed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The Keyfactor API could not be called.
    #[error("GET failed: {0}")]
    Call(String),
    /// The Keyfactor API answered with an error status.
    #[error(
        "GET {path} answered {status}{}: {body}{}",
        status_note(*.status, .location.as_deref(), *.retry_after),
        refusal_hint(path, *.status)
    )]
    Status {
        /// The path asked for.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body (lossy UTF-8).
        body: String,
        /// Where a redirection pointed (`Location`).
        location: Option<String>,
        /// How long the server asked to wait (`Retry-After` in seconds, at most
        /// [`MAX_BACKOFF`]).
        retry_after: Option<Duration>,
    },
    /// The answer is not what the API documents.
    #[error("GET {0}")]
    Answer(String),
    /// The store refused the read or the commit.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The stored cursor is unreadable.
    #[error("stored poller cursor is unreadable: {0}")]
    Cursor(String),
    /// A blocking store task did not complete.
    #[error("store task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What an error status's answer adds: where a redirection pointed, with what to check (Command
/// does not redirect its API; a `[keyfactor] base_url` of `http://` for an `https://` site, or
/// without `/KeyfactorAPI/`, does), and how long the server asked the poller to wait.
fn status_note(status: u16, location: Option<&str>, retry_after: Option<Duration>) -> String {
    let mut note = String::new();
    if (300..400).contains(&status) {
        note.push_str(&crate::capabilities::keyfactor::redirect_note(location));
    }
    if let Some(after) = retry_after {
        note.push_str(&format!(
            " (it asked for {} s before the next poll)",
            after.as_secs()
        ));
    }
    note
}

/// The permission `GET OrchestratorJobs/JobHistory` needs in Command, as Keyfactor documents it
/// (`reference/keyfactor.md` §5.1 and §6: the sample handler's README, and the API reference).
const JOB_HISTORY_PERMISSION: &str =
    "JobHistory needs the Agent Management Read permission, /agents/management/read/";

/// What a 401 or 403 answer to `path` adds: what to check, worded as `jobhook job-types` words
/// it ([`crate::capabilities::keyfactor::refusal_hint`]), with the permission JobHistory needs.
fn refusal_hint(path: &str, status: u16) -> String {
    let permission = (path == JOB_HISTORY).then_some(JOB_HISTORY_PERMISSION);
    crate::capabilities::keyfactor::refusal_hint(status, permission)
}

/// A JobHistory row's status, as far as the poller cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Finished,
    Unfinished,
    /// Absent, null, or a name or number Command does not document: the poller cannot tell
    /// whether the job has ended.
    Unreadable,
}

/// A JobHistory enum field (`Status`, `Result`) as a server may write it: Command 10's own trace
/// shows names (`"Completed"`), its API spec declares numbers (`3`), and a number may come as a
/// string (`"3"`, `" 3"`). Every decoder of such a field reads it through [`coded`], so that
/// two of them cannot disagree about one row (a `"5"` read as CompletedWillRetry by one and as
/// no status at all by another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coded<'a> {
    /// A whole number, or a string holding one (white space around it ignored).
    Number(i64),
    /// Any other string, without the white space around it; names are compared without regard
    /// to case.
    Name(&'a str),
    /// Absent, null, a fraction, a number past `i64`, or neither a number nor a string.
    Unreadable,
}

/// Reads a JobHistory enum field (see [`Coded`]); `None` is a field the row does not have.
fn coded(value: Option<&Value>) -> Coded<'_> {
    match value {
        Some(Value::Number(n)) => n.as_i64().map_or(Coded::Unreadable, Coded::Number),
        Some(Value::String(s)) => {
            let s = s.trim();
            s.parse::<i64>().map_or(Coded::Name(s), Coded::Number)
        }
        _ => Coded::Unreadable,
    }
}

/// JobHistory `Status` 5, CompletedWillRetry (`reference/keyfactor.md` §3.1), by name or number:
/// the run failed and Command rescheduled it.
fn will_retry(value: Option<&Value>) -> bool {
    match coded(value) {
        Coded::Number(n) => n == 5,
        Coded::Name(name) => name.eq_ignore_ascii_case("completedwillretry"),
        Coded::Unreadable => false,
    }
}

/// The `OperationType` a Keyfactor extension would receive, as far as the `JobType` name tells:
/// the context of inventory and reenrollment jobs reports Unknown (the sample handler's traces,
/// `reference/keyfactor.md` §1.2/§3.2), so those stay Unknown; a management job is Add or
/// Remove, which JobHistory does not say, so it stays Unknown too; `…Discovery` and
/// `…FetchLogs` jobs are taken to be Discovery and FetchLogs (not confirmed by a public trace).
fn operation_type_of(job_type: &str) -> OperationType {
    let lower = job_type.to_ascii_lowercase();
    if lower.ends_with("discovery") {
        OperationType::Discovery
    } else if lower.ends_with("fetchlogs") {
        OperationType::FetchLogs
    } else {
        OperationType::Unknown
    }
}

/// Keyfactor's JobHistory `Status` (`reference/keyfactor.md` §3.1): 3 Completed,
/// 4 Acknowledged and 5 CompletedWillRetry are finished; 0 Unknown, 1 Waiting and 2 InProcess
/// are not; names or numbers ([`coded`]). Anything else is [`Status::Unreadable`].
fn status(value: Option<&Value>) -> Status {
    const FINISHED: [&str; 3] = ["completed", "acknowledged", "completedwillretry"];
    const UNFINISHED: [&str; 3] = ["unknown", "waiting", "inprocess"];
    match coded(value) {
        Coded::Number(3..=5) => Status::Finished,
        Coded::Number(0..=2) => Status::Unfinished,
        Coded::Name(name) if FINISHED.iter().any(|f| name.eq_ignore_ascii_case(f)) => {
            Status::Finished
        }
        Coded::Name(name) if UNFINISHED.iter().any(|u| name.eq_ignore_ascii_case(u)) => {
            Status::Unfinished
        }
        Coded::Number(_) | Coded::Name(_) | Coded::Unreadable => Status::Unreadable,
    }
}

/// What makes a `Status` [`Status::Unreadable`], in words for the log: whether it is missing or
/// null, or the name or number given (quoted, escaped and cut: it is the server's text).
fn status_problem(value: Option<&Value>) -> String {
    match (value, coded(value)) {
        (None, _) => "the row has no Status".to_owned(),
        (Some(Value::Null), _) => "its Status is null".to_owned(),
        (_, Coded::Number(n)) => format!("its Status is {n}, which Command does not document"),
        (_, Coded::Name(name)) => format!(
            "its Status is {}, which Command does not document",
            crate::excerpt::quoted(name)
        ),
        (_, Coded::Unreadable) => "its Status is neither a whole number nor a name".to_owned(),
    }
}

/// Keyfactor's JobHistory `Result` (`reference/keyfactor.md` §3.1), names or numbers
/// ([`coded`]); an unknown name or number is Unknown, as in a context Keyfactor gives.
fn job_result(value: Option<&Value>) -> JobResult {
    match coded(value) {
        Coded::Number(n) => JobResult::from_number(n),
        Coded::Name(name) => match name.to_ascii_lowercase().as_str() {
            "success" => JobResult::Success,
            "warning" => JobResult::Warning,
            "failure" => JobResult::Failure,
            "inprocess" => JobResult::InProcess,
            _ => JobResult::Unknown,
        },
        Coded::Unreadable => JobResult::Unknown,
    }
}

fn string(row: &Value, key: &str) -> Option<String> {
    row.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn guid(row: &Value, key: &str) -> Option<Uuid> {
    row.get(key).and_then(Value::as_str).and_then(parse_guid)
}

fn int(row: &Value, key: &str) -> Option<i32> {
    row.get(key)
        .and_then(Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
}

/// The row's `Message` (Keyfactor's text about the outcome, e.g. why the job failed), for
/// `delivery.message`, bounded as [`Delivery::job_message`] says; absent or not text is `None`.
fn message_of(row: &Value) -> Option<String> {
    Delivery::job_message(row.get("Message")?.as_str()?)
}

/// The orchestrator that ran the row's job: its `AgentMachine`, which is what a context's
/// `ClientMachine` names (`reference/keyfactor.md` §1.2, "Orchestrator name"). Never the row's
/// own `ClientMachine`: in JobHistory that is the certificate store's host (`iistarget…` beside
/// `AgentMachine` `orchestrator…` in Keyfactor's sample trace, §5.1), so a handler would be told
/// the wrong machine, and `GET /Agents` would be searched by a store's host. `None` when the row
/// has none, or only white space.
fn agent_machine(row: &Value) -> Option<String> {
    string(row, "AgentMachine").filter(|machine| !machine.trim().is_empty())
}

/// Turns a finished JobHistory row into a job context (see the module table).
fn context_of(row: &Value, job_types: &BTreeMap<String, Uuid>) -> Option<JobContext> {
    let job_type = string(row, "JobType").unwrap_or_default();
    let derived_operation = operation_type_of(&job_type);
    let job_type_id = guid(row, "JobTypeId")
        .or_else(|| job_types.get(&job_type.to_ascii_lowercase()).copied())
        .unwrap_or(Uuid::nil());
    Some(JobContext {
        agent_id: guid(row, "AgentId").unwrap_or(Uuid::nil()),
        username: string(row, "Username").unwrap_or_default(),
        client_machine: agent_machine(row).unwrap_or_default(),
        job_result: job_result(row.get("Result")),
        job_id: guid(row, "JobId")?,
        job_type,
        job_type_id,
        operation_type: match row.get("OperationType") {
            Some(Value::Number(n)) => n
                .as_i64()
                .map_or(OperationType::Unknown, OperationType::from_number),
            _ => derived_operation,
        },
        certificate_id: int(row, "CertificateId"),
        request_timestamp: row
            .get("OperationStart")
            .and_then(Value::as_str)
            .and_then(parse_timestamp),
        current_retry_count: int(row, "CurrentRetryCount").unwrap_or(0),
    })
}

/// The poller's durable position, stored as JSON under [`CURSOR`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// The latest `OperationStart` turned into an event (or skipped), but never later than the
    /// poll that handled it ([`Cursor::record_unpruned`]); `None` before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// The ids already turned into events (or skipped) whose `OperationStart` is not before
    /// [`OVERLAP`] before `since` (rows starting ahead of `since` included), with that start;
    /// at most [`MAX_SEEN`].
    #[serde(default)]
    pub seen: BTreeMap<i64, DateTime<Utc>>,
    /// When ids had to be dropped to stay within [`MAX_SEEN`]: the latest start dropped. Rows
    /// at or before it are not asked for again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub horizon: Option<DateTime<Utc>>,
    /// Rows whose `JobHistoryId` is at or below this are done, except those in `unfinished`:
    /// set by a first start without backfill (the newest id then), and by a cursor from an older
    /// jobhook, which stored only the highest id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<i64>,
    /// Ids at or below `floor` that had not finished when the floor was set (first start) or
    /// when the poller met them (an older jobhook's floor says nothing about it): the floor does
    /// not cover them, so each becomes an event when it finishes. An id leaves when its row is
    /// handled; at most [`MAX_SEEN`], beyond which the lowest are covered by the floor again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub unfinished: BTreeSet<i64>,
}

impl Cursor {
    /// Reads the stored text: this JSON document, or an older jobhook's plain id.
    pub fn parse(text: &str) -> Result<Cursor, PollError> {
        if let Ok(id) = text.trim().parse::<i64>() {
            return Ok(Cursor {
                floor: Some(id),
                ..Cursor::default()
            });
        }
        let cursor: Cursor =
            serde_json::from_str(text).map_err(|e| PollError::Cursor(e.to_string()))?;
        let remembered = cursor.seen.len().max(cursor.unfinished.len());
        if remembered > MAX_SEEN {
            return Err(PollError::Cursor(format!(
                "it remembers {remembered} ids, more than {MAX_SEEN}"
            )));
        }
        // Every time in it is one a row could have given (the years of .NET's `DateTime`):
        // the bounds computed from them must not leave chrono's range.
        let times = [("since", cursor.since), ("horizon", cursor.horizon)]
            .into_iter()
            .filter_map(|(name, t)| Some((name, t?)))
            .chain(cursor.seen.values().map(|t| ("seen", *t)));
        for (name, t) in times {
            if !crate::context::TIMESTAMP_YEARS.contains(&t.year()) {
                return Err(PollError::Cursor(format!(
                    "its {name} time {} lies outside the years {} to {}",
                    t.to_rfc3339(),
                    crate::context::TIMESTAMP_YEARS.start(),
                    crate::context::TIMESTAMP_YEARS.end()
                )));
            }
        }
        Ok(cursor)
    }

    /// The stored text.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether a row is covered by the floor (handled before this cursor format, or before a
    /// first start without backfill, and not known to have been unfinished then).
    fn below_floor(&self, id: i64) -> bool {
        self.floor.is_some_and(|f| id <= f) && !self.unfinished.contains(&id)
    }

    /// Takes a row at or below the floor out of it: it was not finished when met.
    fn exempt(&mut self, id: i64) {
        self.unfinished.insert(id);
        while self.unfinished.len() > MAX_SEEN {
            self.unfinished.pop_first();
        }
    }

    /// The start of the overlap window, to the second as the query asks for it: the ids the
    /// cursor forgets ([`Cursor::prune`]) are exactly those the query no longer returns.
    fn window_start(&self) -> Option<DateTime<Utc>> {
        self.since?.checked_sub_signed(OVERLAP).map(whole_second)
    }

    /// The lower bound of the next query, when there is one.
    fn lower_bound(&self) -> Option<DateTime<Utc>> {
        let from = self.window_start()?;
        Some(match self.horizon {
            Some(h) if h >= from => h
                .checked_add_signed(chrono::Duration::seconds(1))
                .unwrap_or(h),
            _ => from,
        })
    }

    /// Brings a position later than the poll's time (by more than [`CLOCK_SLACK`]) back to it,
    /// and says whether it did: a cursor left by a jobhook that followed a start ahead of the
    /// clock, or a clock set back. Forgotten rows of the stretch between may be read again and
    /// delivered twice; left ahead, the cursor would lose every job starting before it.
    fn hold_to(&mut self, now: DateTime<Utc>) -> bool {
        let now = whole_second(now);
        match self.since {
            Some(since) if since - now > CLOCK_SLACK => {
                self.since = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Records a handled row with its `OperationStart` as the row gives it (`start`, before any
    /// plausibility check). The position moves to that start, but never past `now` (the time of
    /// the poll): a start ahead (a server's wrong clock) would otherwise make the next query
    /// skip every job starting before it, and rows are read in start order, so every row
    /// starting before `now` has been handled. A start [`start_of`] refuses as implausible
    /// (9999-12-31, .NET's `DateTime.MaxValue`) does not move it at all. The id is remembered
    /// with its own start however far ahead, and so kept for as long as the query can return
    /// the row (for 9999-12-31, for good). A row without a start, or one before 1970, which
    /// later queries do not return, is remembered as of `now` and does not move the position.
    /// Pruned at once (see [`prune`](Self::prune)); the poller records a page's rows with
    /// [`record_unpruned`](Self::record_unpruned) and prunes after the page.
    #[cfg(test)]
    fn record(&mut self, id: i64, start: Option<DateTime<Utc>>, now: DateTime<Utc>) {
        self.record_unpruned(id, start, now);
        self.prune();
    }

    /// `record` (in the tests) without the pruning, which walks every remembered id: a page
    /// records its rows and prunes once ([`Poller::events_from`]).
    fn record_unpruned(&mut self, id: i64, start: Option<DateTime<Utc>>, now: DateTime<Utc>) {
        let now = whole_second(now);
        match start.filter(|s| *s >= DateTime::UNIX_EPOCH) {
            Some(start) => {
                let position = plausible(start, now).map(|s| s.min(now));
                if let Some(position) = position
                    && self.since.is_none_or(|s| position > s)
                {
                    self.since = Some(position);
                }
                self.seen.insert(id, start);
            }
            None => {
                self.seen.insert(id, self.since.unwrap_or(now).max(now));
            }
        }
        self.unfinished.remove(&id);
    }

    /// Forgets ids older than the overlap window, and the oldest beyond [`MAX_SEEN`].
    fn prune(&mut self) {
        if let Some(from) = self.window_start() {
            self.seen.retain(|_, start| *start >= from);
        }
        while self.seen.len() > MAX_SEEN {
            let Some(&start) = self.seen.values().min() else {
                break;
            };
            // Everything that started at that same second goes too: the bound moves past it,
            // but not past the position (ids ahead of it dropped are read, and delivered, again
            // rather than the bound moving ahead of the clock).
            self.seen.retain(|_, s| *s > start);
            let bound = self.since.map_or(start, |since| start.min(since));
            self.horizon = Some(self.horizon.map_or(bound, |h| h.max(bound)));
        }
    }
}

/// `t` without its fraction of a second: JobHistory's `OperationStart` and the query's values
/// have a resolution of one second.
fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0).unwrap_or(t)
}

/// Whether a row starting at `start` lies before the query's lower bound `bound`, compared at
/// the query's resolution: the query asks for whole seconds, so a bound with a fraction (one
/// second past a horizon taken from a row's start) still returns rows from its whole second on,
/// and those are new rows, not ones the server should have left out. A row without a start is
/// not before anything.
fn starts_before(start: Option<DateTime<Utc>>, bound: DateTime<Utc>) -> bool {
    start.is_some_and(|s| s < whole_second(bound))
}

/// What a failed Keyfactor call says, in words (the generated type's `Display` is its `Debug`).
fn capability_error_text(e: &CapabilityError) -> String {
    match e {
        CapabilityError::NotGranted(why) => format!("not granted: {why}"),
        CapabilityError::NotAvailable(why) => format!("not available: {why}"),
        CapabilityError::Denied(why) => format!("refused: {why}"),
        CapabilityError::LimitExceeded(why) => format!("over a limit: {why}"),
        CapabilityError::Timeout(why) => format!("no answer in time: {why}"),
        CapabilityError::Failed(why) => format!("failed: {why}"),
    }
}

/// The `OperationStart` query value: the API's own format (`2023-05-06T00:27:00`, UTC).
fn query_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// The orchestrators from `GET /Agents`, by `ClientMachine` (lower case): id and identity.
#[derive(Debug, Default)]
struct AgentCache {
    by_machine: HashMap<String, (Uuid, String)>,
    read_at: Option<Instant>,
}

impl AgentCache {
    /// Whether the list should be read again before looking up `machine`.
    fn stale(&self, machine: &str, now: Instant) -> bool {
        match self.read_at {
            None => true,
            Some(at) => {
                let age = now.saturating_duration_since(at);
                age > AGENT_CACHE_TTL
                    || (!self.by_machine.contains_key(machine) && age > AGENT_MISS_REFRESH)
            }
        }
    }
}

/// The pages one poll has read so far, to tell a server that does not page as asked: one that
/// ignores `pq.pageReturned` (not Command, but a gateway or proxy in front of it that drops the
/// parameter, or a server that reads only an un-prefixed `PageReturned`) answers every page
/// with the first. Read as it comes, such a server stalled the poller for good — the first page
/// never changes, since the cursor never moves past it — at [`max_pages`] requests a poll, back
/// to back (2,002 at `page_size = 5`).
#[derive(Debug, Default)]
struct Paging {
    /// The rows of the page read last.
    previous: Vec<Value>,
    /// The `JobHistoryId`s of every page read so far: at most [`max_pages`] pages of
    /// `page_size` rows, some 12,000 ids.
    ids: HashSet<i64>,
    /// The latest `OperationStart` read so far, with its row's `JobHistoryId`.
    latest: Option<(Option<i64>, DateTime<Utc>)>,
}

impl Paging {
    /// Takes in page `page`, or fails the poll when it repeats what this poll has read: every
    /// row with a `JobHistoryId` already on an earlier page, or, with no id on it, the page
    /// before row for row. Command answers a page that is partly the one before only when rows
    /// moved while they were read (a row committed late, with an earlier start); a poll that
    /// fails on that is retried.
    fn repeated(&mut self, page: u32, rows: &[Value]) -> Result<(), PollError> {
        let ids: Vec<i64> = rows
            .iter()
            .filter_map(|row| row.get("JobHistoryId").and_then(Value::as_i64))
            .collect();
        let repeats = page > 1
            && !rows.is_empty()
            && if ids.is_empty() {
                rows == self.previous.as_slice()
            } else {
                ids.iter().all(|id| self.ids.contains(id))
            };
        if repeats {
            let what = if rows == self.previous.as_slice() {
                format!("page {}'s rows", page - 1)
            } else {
                "rows of earlier pages only".to_owned()
            };
            return Err(PollError::Answer(format!(
                "{JOB_HISTORY}: the server answered page {page} with {what}: it ignores \
                 pq.pageReturned (is [keyfactor] base_url Command's API, without a proxy or \
                 gateway that drops query parameters?), or rows moved between pages while they \
                 were read; the poller cannot page through JobHistory, and stops this poll \
                 rather than ask for every page"
            )));
        }
        self.ids.extend(ids);
        self.previous = rows.to_vec();
        Ok(())
    }

    /// Fails the poll when a row starts before one read before it in this poll (rows without a
    /// readable start are not compared): the query asks for ascending `OperationStart`, and the
    /// cursor relies on it — it moves to each row's start as it goes, so rows answered out of
    /// order (a server that ignores `pq.sortAscending` or `pq.sortField`) would leave the
    /// earlier ones behind its next query's lower bound, never to be read. One comparison a row.
    fn in_order(&mut self, rows: &[Value]) -> Result<(), PollError> {
        for row in rows {
            let Some(start) = operation_start(row) else {
                continue;
            };
            let id = row.get("JobHistoryId").and_then(Value::as_i64);
            if let Some((before_id, before)) = self.latest
                && start < before
            {
                let name = |id: Option<i64>| {
                    id.map_or("a row without an id".to_owned(), |id| {
                        format!("JobHistoryId {id}")
                    })
                };
                return Err(PollError::Answer(format!(
                    "{JOB_HISTORY}: the server answered rows out of OperationStart order ({} \
                     starts at {}, after {} starting at {}): it ignores pq.sortField or \
                     pq.sortAscending, and the poller, which moves on by OperationStart, would \
                     pass over the earlier rows for good; nothing of this poll is committed",
                    name(id),
                    query_time(start),
                    name(before_id),
                    query_time(before)
                )));
            }
            self.latest = Some((id, start));
        }
        Ok(())
    }
}

/// A row handled in this poll, with what the context needs from other rows.
struct Pending {
    event: NewEvent,
    started: Option<DateTime<Utc>>,
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Events committed.
    pub events: usize,
    /// Whether there may be more to read at once (poll again without waiting).
    pub more: bool,
    /// The cursor after the poll.
    pub cursor: Cursor,
    /// The `OperationStart` of the unfinished job the poll stopped at (waiting for it to
    /// finish, or to be older than `stale_after_ms`); `None` when it stopped at none.
    pub held_since: Option<DateTime<Utc>>,
}

/// Polls JobHistory and commits events.
pub struct Poller {
    config: PollerConfig,
    job_types: BTreeMap<String, Uuid>,
    client: Arc<KeyfactorClient>,
    grant: KeyfactorGrant,
    store: Arc<dyn EventStore>,
    /// Whether the store took the latest events polled, for `/healthz` (shared with the API).
    store_health: Arc<StoreHealth>,
    dispatcher: Arc<Dispatcher>,
    agents: Mutex<AgentCache>,
    /// Rows starting ahead of this machine's clock ([`CLOCK_SLACK`]).
    ahead: LogLimit,
    /// Rows handled long after later ones ([`LATE_NOTICE`]).
    late: LogLimit,
    /// Rows passed over, and pages longer than asked for.
    skips: SkipNotices,
    /// Failed earlier-runs lookups by job run (job id, start), up to
    /// [`LOOKUP_FAILURES_TOLERATED`].
    failed_lookups: Mutex<HashMap<(Uuid, DateTime<Utc>), u32>>,
}

/// One [`LogLimit`] for each kind of row the poller passes over, so that one kind does not hide
/// another.
#[derive(Debug)]
struct SkipNotices {
    long_page: LogLimit,
    no_id: LogLimit,
    no_job_id: LogLimit,
    no_start: LogLimit,
    stale: LogLimit,
    refused: LogLimit,
    lookup: LogLimit,
    before_bound: LogLimit,
    missing_newest: LogLimit,
    held: LogLimit,
    unreadable_status: LogLimit,
    no_agent_machine: LogLimit,
}

impl Default for SkipNotices {
    fn default() -> Self {
        SkipNotices {
            long_page: LogLimit::new(NOTICE_EVERY),
            no_id: LogLimit::new(NOTICE_EVERY),
            no_job_id: LogLimit::new(NOTICE_EVERY),
            no_start: LogLimit::new(NOTICE_EVERY),
            stale: LogLimit::new(NOTICE_EVERY),
            refused: LogLimit::new(NOTICE_EVERY),
            lookup: LogLimit::new(NOTICE_EVERY),
            before_bound: LogLimit::new(NOTICE_EVERY),
            missing_newest: LogLimit::new(NOTICE_EVERY),
            held: LogLimit::new(NOTICE_EVERY),
            unreadable_status: LogLimit::new(NOTICE_EVERY),
            no_agent_machine: LogLimit::new(NOTICE_EVERY),
        }
    }
}

impl Poller {
    /// A poller; fails when the configuration is invalid.
    pub fn new(
        config: PollerConfig,
        client: Arc<KeyfactorClient>,
        store: Arc<dyn EventStore>,
        dispatcher: Arc<Dispatcher>,
    ) -> Result<Self, PollerSetupError> {
        let job_types = config.job_type_ids()?;
        let grant = KeyfactorGrant::read_only(&["OrchestratorJobs/", AGENTS])
            .map_err(|e| PollerSetupError::Grant(e.to_string()))?;
        Ok(Poller {
            config,
            job_types,
            client,
            grant,
            store,
            store_health: Arc::default(),
            dispatcher,
            agents: Mutex::new(AgentCache::default()),
            ahead: LogLimit::new(NOTICE_EVERY),
            late: LogLimit::new(NOTICE_EVERY),
            skips: SkipNotices::default(),
            failed_lookups: Mutex::new(HashMap::new()),
        })
    }

    /// Tells `health` (the API's, for `/healthz`) whether the store takes the events this
    /// poller commits; without it, nothing outside the poller hears.
    pub fn reporting_to(mut self, health: Arc<StoreHealth>) -> Self {
        self.store_health = health;
        self
    }

    /// Polls until the process ends: every interval, at once while there is more, backing off
    /// on errors.
    pub async fn run(self) {
        let interval = Duration::from_millis(self.config.interval_ms);
        let mut backoff = interval;
        loop {
            let metrics = self.dispatcher.metrics();
            if !self.leads().await {
                // The node that leads shows what holds the poller; this one waits for nothing.
                metrics.poller_held(None);
                tokio::time::sleep(interval).await;
                continue;
            }
            match crate::caught::caught(self.poll_once()).await {
                Ok(Ok(report)) => {
                    metrics.polled(Utc::now());
                    backoff = interval;
                    if report.events > 0 {
                        tracing::info!(events = report.events, since = ?report.cursor.since, "JobHistory polled");
                    }
                    if report.more {
                        continue;
                    }
                    tokio::time::sleep(interval).await;
                }
                Ok(Err(e)) => {
                    metrics.poll_failed();
                    // A server that says when to come back (429, 503) is not asked sooner.
                    let wait = match &e {
                        PollError::Status {
                            retry_after: Some(after),
                            ..
                        } => backoff.max(*after),
                        _ => backoff,
                    };
                    tracing::warn!("JobHistory poll failed, retrying in {wait:?}: {e}");
                    tokio::time::sleep(wait).await;
                    backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                }
                // A bug met on what the API answered: the poller goes on (the cursor is only
                // moved by a poll that ends), instead of ending for the life of the process.
                Err(panic) => {
                    metrics.poll_failed();
                    tracing::error!(
                        "JobHistory poll failed with an engine error ({panic}); retrying in \
                         {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Whether this node should poll now: with several nodes on one shared store only one does
    /// (the store's leadership for the role `poller`); with SQLite always.
    async fn leads(&self) -> bool {
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || store.try_lead("poller")).await {
            Ok(Ok(leads)) => leads,
            Ok(Err(e)) => {
                tracing::warn!("cannot tell whether this node leads the poller: {e}");
                false
            }
            Err(e) => {
                tracing::error!("poller leadership check failed: {e}");
                false
            }
        }
    }

    async fn get(&self, query: Vec<(String, String)>) -> Result<Vec<Value>, PollError> {
        self.get_from(JOB_HISTORY, query).await
    }

    async fn get_from(
        &self,
        path: &str,
        query: Vec<(String, String)>,
    ) -> Result<Vec<Value>, PollError> {
        let (response, location) = self
            .client
            .send_with_location(
                &self.grant,
                Request {
                    method: Method::Get,
                    path: path.into(),
                    query,
                    headers: Vec::new(),
                    body: None,
                },
            )
            .await
            .map_err(|e| {
                let hint = if matches!(e, CapabilityError::LimitExceeded(_)) {
                    " (lower [poller] page_size, or raise [keyfactor] max_response_bytes)"
                } else {
                    ""
                };
                PollError::Call(format!("{path}: {}{hint}", capability_error_text(&e)))
            })?;
        if !(200..300).contains(&response.status) {
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            };
            return Err(PollError::Status {
                path: path.to_owned(),
                status: response.status,
                body: String::from_utf8_lossy(response.body.get(..500).unwrap_or(&response.body))
                    .into_owned(),
                location,
                retry_after: header("retry-after")
                    .and_then(|v| crate::capabilities::outbound::retry_after(&v, MAX_BACKOFF)),
            });
        }
        match serde_json::from_slice::<Value>(&response.body) {
            Ok(Value::Array(rows)) => Ok(rows),
            Ok(_) => Err(PollError::Answer(format!(
                "{path} did not answer a JSON array"
            ))),
            Err(e) => Err(PollError::Answer(format!(
                "{path} answered invalid JSON: {e}"
            ))),
        }
    }

    /// One page of rows from `from` on, oldest first.
    async fn page(&self, from: Option<DateTime<Utc>>, page: u32) -> Result<Vec<Value>, PollError> {
        let mut query = Vec::new();
        if let Some(from) = from {
            query.push((
                "pq.queryString".into(),
                format!("OperationStart -ge \"{}\"", query_time(from)),
            ));
        }
        query.extend([
            ("pq.sortField".into(), "OperationStart".into()),
            ("pq.sortAscending".into(), "0".into()),
            ("pq.returnLimit".into(), self.config.page_size.to_string()),
            ("pq.pageReturned".into(), page.to_string()),
        ]);
        let mut rows = self.get(query).await?;
        // A server that ignores `pq.returnLimit` (not Command) would make one poll's work, and
        // its lookups, as large as it likes: the rows past the page are not read.
        let page_size = self.config.page_size as usize;
        if rows.len() > page_size {
            if let Some(quiet) = self.skips.long_page.due() {
                tracing::warn!(
                    rows = rows.len(),
                    asked_for = page_size,
                    more_since_last_warning = quiet,
                    "the Keyfactor API answered a JobHistory page with more rows than asked \
                     for; the rows past the page are not read (is [keyfactor] base_url Command's \
                     API?)"
                );
            }
            rows.truncate(page_size);
        }
        Ok(rows)
    }

    /// One poll: reads the rows from the cursor on and commits the finished jobs with the new
    /// cursor.
    pub async fn poll_once(&self) -> Result<PollReport, PollError> {
        let store = Arc::clone(&self.store);
        let stored = tokio::task::spawn_blocking(move || store.cursor(CURSOR)).await??;
        let mut cursor = match stored {
            Some(text) => Cursor::parse(&text)?,
            None if self.config.backfill => Cursor::default(),
            None => {
                // First start: begin after the newest jobs. Rows that share the newest start
                // come in no defined order, so the floor is the highest id on the newest page.
                // Jobs not finished yet are not covered by it (`Cursor::unfinished`): each
                // becomes an event when it finishes.
                let newest = self
                    .get(vec![
                        ("pq.sortField".into(), "OperationStart".into()),
                        ("pq.sortAscending".into(), "1".into()),
                        ("pq.returnLimit".into(), self.config.page_size.to_string()),
                        ("pq.pageReturned".into(), "1".into()),
                    ])
                    .await?;
                let now = whole_second(Utc::now());
                // The position, as `Cursor::record` places it: never past this poll's time.
                let since = newest
                    .iter()
                    .filter_map(|r| start_of(r, now))
                    .map(|s| s.min(now))
                    .max();
                let mut cursor = Cursor {
                    since,
                    ..Cursor::default()
                };
                let from = cursor.lower_bound();
                let mut floor = 0;
                let mut unfinished = BTreeSet::new();
                // The highest id, and the jobs not finished yet that later polls read again
                // (with a start in the window; any row when there is no window yet).
                let mut take = |rows: &[Value]| {
                    for row in rows {
                        let Some(id) = row.get("JobHistoryId").and_then(Value::as_i64) else {
                            continue;
                        };
                        floor = floor.max(id);
                        let read_again = from.is_none_or(|from| {
                            operation_start(row).is_some_and(|start| start >= from)
                        });
                        if read_again && status(row.get("Status")) != Status::Finished {
                            unfinished.insert(id);
                        }
                    }
                };
                take(&newest);
                // Every row later polls read again — the overlap window before the newest
                // start, which holds every row of that newest second whatever order the API
                // gives ties — so that a job running in it is known to be unfinished even when
                // it is not on the newest page.
                if let Some(from) = from {
                    let mut paging = Paging::default();
                    for page in 1..=max_pages(self.config.page_size) {
                        let rows = self.page(Some(from), page).await?;
                        paging.repeated(page, &rows)?;
                        take(&rows);
                        if rows.len() < self.config.page_size as usize {
                            break;
                        }
                    }
                }
                cursor.floor = Some(floor);
                for id in unfinished {
                    cursor.exempt(id);
                }
                self.commit(Vec::new(), &cursor).await?;
                return Ok(PollReport {
                    events: 0,
                    more: false,
                    cursor,
                    held_since: None,
                });
            }
        };
        let before = cursor.clone();
        if cursor.hold_to(Utc::now()) {
            tracing::warn!(
                stored = ?before.since,
                "the stored JobHistory position lies ahead of this machine's clock; it is \
                 brought back to the clock (a job of the stretch between may be delivered twice)"
            );
        }
        let from = cursor.lower_bound();
        let page_size = self.config.page_size as usize;
        let mut events = Vec::new();
        let mut more = false;
        let mut held_since = None;
        let last_page = max_pages(self.config.page_size);
        let mut paging = Paging::default();
        for page in 1..=last_page {
            let rows = self.page(from, page).await?;
            paging.repeated(page, &rows)?;
            paging.in_order(&rows)?;
            if page == 1 {
                self.notice_missing_newest(&rows, &cursor, from);
            }
            let full_page = rows.len() >= page_size;
            // A full page of rows from before the time asked for (each skipped) would fill every
            // poll with them, and the poller would never reach a new job: an error, counted and
            // retried, rather than a quiet stall.
            if let Some(bound) = from
                && full_page
                && rows
                    .iter()
                    .all(|r| starts_before(operation_start(r), bound))
            {
                return Err(PollError::Answer(format!(
                    "{JOB_HISTORY}: every row of a full page starts before the OperationStart \
                     asked for ({}); the server reads the query's time in a zone other than \
                     UTC (or ignores it), and the poller cannot move on: use the forwarder",
                    query_time(whole_second(bound))
                )));
            }
            held_since = self.events_from(&rows, &mut cursor, &mut events, from, Utc::now());
            if held_since.is_some() || !full_page {
                break;
            }
            if events.len() >= page_size || page == last_page {
                more = true;
                break;
            }
        }
        let mut complete = Vec::with_capacity(events.len());
        for pending in events {
            let event = self.complete(pending).await?;
            // What ingest refuses is not let in by the poller either: the context goes through
            // the same decoder as a posted one, so every rule ingest has (lengths today, any
            // added later) holds for polled events too. The row is handled.
            if let Err(e) = JobContext::from_json_value(&event.context.to_json()) {
                if let Some(quiet) = self.skips.refused.due() {
                    tracing::warn!(
                        job_id = %event.context.job_id,
                        more_since_last_warning = quiet,
                        "a JobHistory row gives a context the engine does not accept ({e}); the \
                         job is skipped"
                    );
                }
                continue;
            }
            complete.push(event);
        }
        let count = complete.len();
        if cursor != before {
            self.commit(complete, &cursor).await?;
        }
        let more = more && cursor != before;
        // A poll cut short by the page limit has not reached the job it may wait at: the gauge
        // keeps what the last poll that read to its end found.
        if !more {
            self.dispatcher.metrics().poller_held(held_since);
        }
        Ok(PollReport {
            events: count,
            more,
            cursor,
            held_since,
        })
    }

    /// Adds the events for `rows` (oldest first) not yet handled to `events`, recording them in
    /// `cursor` (pruned once, after the page); when it stopped at an unfinished row that is not
    /// stale, that row's `OperationStart`.
    fn events_from(
        &self,
        rows: &[Value],
        cursor: &mut Cursor,
        events: &mut Vec<Pending>,
        from: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let stopped = self.events_from_rows(rows, cursor, events, from, now);
        cursor.prune();
        stopped
    }

    fn events_from_rows(
        &self,
        rows: &[Value],
        cursor: &mut Cursor,
        events: &mut Vec<Pending>,
        from: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let registry = self.dispatcher.registry();
        let stale_after = chrono::Duration::milliseconds(
            i64::try_from(self.config.stale_after_ms).unwrap_or(i64::MAX),
        );
        for row in rows {
            let Some(id) = row.get("JobHistoryId").and_then(Value::as_i64) else {
                if let Some(quiet) = self.skips.no_id.due() {
                    tracing::warn!(
                        more_since_last_warning = quiet,
                        "JobHistory row without a JobHistoryId skipped"
                    );
                }
                continue;
            };
            if cursor.seen.contains_key(&id) {
                continue;
            }
            let start = operation_start(row);
            // The query asked for rows from `from` on. A row before it is one the server's
            // filter let through — the likeliest cause a server reading the query's time in
            // its own zone while it answers in UTC: such rows were handled when they were new
            // (the cursor forgets ids past the window), and would be delivered again on every
            // poll.
            if let Some(bound) = from
                && let Some(s) = start.filter(|s| starts_before(Some(*s), bound))
            {
                if let Some(quiet) = self.skips.before_bound.due() {
                    tracing::warn!(
                        job_history_id = id,
                        operation_start = %query_time(s),
                        asked_from = %query_time(bound),
                        more_since_last_warning = quiet,
                        "the Keyfactor API answered a JobHistory row that starts before the \
                         OperationStart the query asked for; it is skipped (does the server \
                         read the query's time in a zone other than UTC, the zone of its \
                         answers?)"
                    );
                }
                continue;
            }
            let started = start_of(row, now);
            let finished = status(row.get("Status")) == Status::Finished;
            if cursor.below_floor(id) {
                // The floor stands for jobs done before it was set (history, not events). One
                // still running when met was not done then: it is taken out of the floor and
                // waited for like any other. A stale one is old history, handled quietly.
                if finished || started.is_some_and(|s| now - s > stale_after) {
                    cursor.record_unpruned(id, start, now);
                    continue;
                }
                cursor.exempt(id);
            }
            if !finished {
                let Some(began) = started else {
                    // No usable start: waiting for it would stop the poller for good, since
                    // such a row never becomes stale. A start far ahead (9999-12-31) matches
                    // every later query's lower bound: it is passed over unrecorded and becomes
                    // an event once it finishes. No start, or one before 1970, matches no later
                    // query: it could never be found again, so it is handled now, with a
                    // warning, as a stale job is.
                    if start.is_some_and(|s| s > now) {
                        tracing::debug!(
                            job_history_id = id,
                            "passing over an unfinished job that starts far ahead"
                        );
                    } else {
                        if let Some(quiet) = self.skips.no_start.due() {
                            tracing::warn!(
                                job_history_id = id,
                                more_since_last_warning = quiet,
                                "skipping an unfinished job without a usable OperationStart: \
                                 no later query could find it"
                            );
                        }
                        cursor.record_unpruned(id, start, now);
                    }
                    continue;
                };
                let stale = now - began > stale_after;
                if !stale {
                    self.notice_hold(id, row.get("Status"), began, now, stale_after);
                    return Some(began);
                }
                if let Some(quiet) = self.skips.stale.due() {
                    tracing::warn!(
                        job_history_id = id,
                        more_since_last_warning = quiet,
                        "skipping a job that has not finished for too long"
                    );
                }
                cursor.record_unpruned(id, start, now);
                continue;
            }
            // A job waited for since before the position was placed (running at first start)
            // is not late, however far before the position it started.
            let position = cursor.since.filter(|_| !cursor.unfinished.contains(&id));
            self.notice_clock(id, start, position, now);
            if agent_machine(row).is_none()
                && let Some(quiet) = self.skips.no_agent_machine.due()
            {
                tracing::warn!(
                    job_history_id = id,
                    more_since_last_warning = quiet,
                    "a JobHistory row names no AgentMachine: its context's ClientMachine stays \
                     empty and its AgentId and Username are not looked up (the row's own \
                     ClientMachine is the certificate store's host, not the orchestrator)"
                );
            }
            match context_of(row, &self.job_types) {
                Some(context) => events.push(Pending {
                    event: NewEvent {
                        id: crate::queue::store::new_event_id(),
                        source: SOURCE_POLLER.into(),
                        handlers: registry.route(context.job_type_id),
                        context,
                        message: message_of(row),
                    },
                    started,
                }),
                None => {
                    if let Some(quiet) = self.skips.no_job_id.due() {
                        tracing::warn!(
                            job_history_id = id,
                            more_since_last_warning = quiet,
                            "JobHistory row without a JobId skipped"
                        );
                    }
                }
            }
            cursor.record_unpruned(id, start, now);
        }
        None
    }

    /// Logs the unfinished row a poll stopped at, `began` at its `OperationStart`: at once when
    /// its `Status` cannot be read (it is waited for as unfinished: a job still running must
    /// not become an event before it ends, and a row read as finished too early would lose its
    /// real outcome), otherwise once it has run longer than [`HOLD_NOTICE`]; each at most every
    /// [`NOTICE_EVERY`]. Either names the row, its start and when `stale_after_ms` releases it:
    /// without it a held poller looked healthy for up to a day, every poll succeeding.
    fn notice_hold(
        &self,
        id: i64,
        status_value: Option<&Value>,
        began: DateTime<Utc>,
        now: DateTime<Utc>,
        stale_after: chrono::Duration,
    ) {
        let released_at = began
            .checked_add_signed(stale_after)
            .map_or_else(|| "never".to_owned(), |t| format!("{} UTC", query_time(t)));
        if status(status_value) == Status::Unreadable {
            if let Some(quiet) = self.skips.unreadable_status.due() {
                tracing::warn!(
                    job_history_id = id,
                    operation_start = %query_time(began),
                    more_since_last_warning = quiet,
                    "a JobHistory row's Status cannot be read ({}); it is taken as unfinished, so \
                     that a job still running does not become an event before it ends, and the \
                     poller waits at it: no later job becomes an event until its Status reads \
                     as finished, or until {released_at}, when [poller] stale_after_ms skips it",
                    status_problem(status_value)
                );
            }
            return;
        }
        if now - began > HOLD_NOTICE
            && let Some(quiet) = self.skips.held.due()
        {
            tracing::warn!(
                job_history_id = id,
                operation_start = %query_time(began),
                more_since_last_warning = quiet,
                "the JobHistory poller waits at a job that has not finished after {} min: no \
                 later job becomes an event until it finishes, or until {released_at}, when \
                 [poller] stale_after_ms skips it",
                (now - began).num_minutes()
            );
        }
    }

    /// Warns when the first page for `OperationStart -ge from` holds none of the jobs the cursor
    /// has seen start at or after `from`: the server left out rows its own filter should have
    /// let through — the likeliest cause a server reading the query's time in its own zone,
    /// west of UTC, while it answers in UTC — and the jobs of that stretch would be missed.
    fn notice_missing_newest(&self, rows: &[Value], cursor: &Cursor, from: Option<DateTime<Utc>>) {
        let Some(from) = from else {
            return;
        };
        let Some((&id, &start)) = cursor
            .seen
            .iter()
            .filter(|(_, start)| **start >= from)
            .max_by_key(|(_, start)| **start)
        else {
            return;
        };
        let returned = rows.iter().filter_map(operation_start).any(|s| s >= from);
        if returned {
            return;
        }
        if let Some(quiet) = self.skips.missing_newest.due() {
            tracing::warn!(
                job_history_id = id,
                operation_start = %query_time(start),
                asked_from = %query_time(from),
                more_since_last_warning = quiet,
                "the Keyfactor API answered no JobHistory row for OperationStart from the time \
                 asked, though this job started after it: jobs may be missed (does the server \
                 read the query's time in a zone other than UTC, the zone of its answers?)"
            );
        }
    }

    /// Logs, at most every [`NOTICE_EVERY`] for each kind, a job whose start lies ahead of this
    /// machine's clock by more than [`CLOCK_SLACK`] (the cursor's position stays at the clock),
    /// or more than [`LATE_NOTICE`] before the position `since` (a clock behind: beyond
    /// [`OVERLAP`], such rows are not read at all).
    fn notice_clock(
        &self,
        id: i64,
        start: Option<DateTime<Utc>>,
        since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        let Some(start) = start else {
            return;
        };
        if start - now > CLOCK_SLACK
            && let Some(quiet) = self.ahead.due()
        {
            tracing::warn!(
                job_history_id = id,
                %start,
                more_since_last_warning = quiet,
                "a JobHistory row starts ahead of this machine's clock (a server's clock is \
                 wrong); it becomes an event, and the poller's position stays at the clock"
            );
        }
        if since.is_some_and(|since| since - start > LATE_NOTICE)
            && let Some(quiet) = self.late.due()
        {
            tracing::warn!(
                job_history_id = id,
                %start,
                more_since_last_warning = quiet,
                "a JobHistory row became visible long after jobs that started later (a clock \
                 behind?); rows later than {} min are not read",
                OVERLAP.num_minutes()
            );
        }
    }

    /// Fills what the row alone does not tell: `CurrentRetryCount` and `RequestTimestamp` from
    /// the job's earlier rows, `AgentId` and `Username` from `GET /Agents`. A failed lookup of
    /// the earlier rows fails the poll, until it has failed [`LOOKUP_FAILURES_TOLERATED`] times
    /// for this job; then the event keeps what its row tells.
    async fn complete(&self, pending: Pending) -> Result<NewEvent, PollError> {
        let Pending { mut event, started } = pending;
        if let Some(started) = started {
            let run = (event.context.job_id, started);
            let earlier = match self.earlier_runs(&event, started).await {
                Ok(earlier) => {
                    self.lookups_failed(run, false);
                    Some(earlier)
                }
                Err(e) if self.lookups_failed(run, true) <= LOOKUP_FAILURES_TOLERATED => {
                    return Err(e);
                }
                // Given up on: its count stays (until it is committed or the counts start over),
                // so that a later poll that fails on another job does not start it over.
                Err(e) => {
                    if let Some(quiet) = self.skips.lookup.due() {
                        tracing::warn!(
                            job_id = %event.context.job_id,
                            more_since_last_warning = quiet,
                            "cannot read the job's earlier runs ({e}) after \
                             {LOOKUP_FAILURES_TOLERATED} polls failed on it; it becomes an event \
                             with CurrentRetryCount and RequestTimestamp from its own row"
                        );
                    }
                    None
                }
            };
            if let Some(earlier) = earlier {
                let (retries, first) = retry_chain(&event.context.job_id, started, &earlier);
                event.context.current_retry_count = retries;
                if let Some(first) = first {
                    event.context.request_timestamp = Some(first);
                }
            }
        }
        // Without the orchestrator's name there is nothing to look up: an empty name would
        // only match an agent listed without one.
        if event.context.agent_id.is_nil()
            && !event.context.client_machine.is_empty()
            && let Some((id, username)) = self.agent(&event.context.client_machine).await
        {
            event.context.agent_id = id;
            if event.context.username.is_empty() {
                event.context.username = username;
            }
        }
        Ok(event)
    }

    /// Counts a failed earlier-runs lookup of `run` (`failed`), or forgets its count (a lookup
    /// that succeeded); the failures counted for it now.
    fn lookups_failed(&self, run: (Uuid, DateTime<Utc>), failed: bool) -> u32 {
        let mut counts = self
            .failed_lookups
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !failed {
            counts.remove(&run);
            return 0;
        }
        if counts.len() >= MAX_JOBS_WITH_FAILED_LOOKUPS && !counts.contains_key(&run) {
            counts.clear();
        }
        let count = counts.entry(run).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    /// The rows of `event`'s job that started before `started` (its earlier runs), oldest first.
    async fn earlier_runs(
        &self,
        event: &NewEvent,
        started: DateTime<Utc>,
    ) -> Result<Vec<Value>, PollError> {
        self.get(vec![
            (
                "pq.queryString".into(),
                // `JobID`, as Keyfactor's own handler sample writes the field in this query.
                format!(
                    "JobID -eq \"{}\" AND OperationStart -lt \"{}\"",
                    event.context.job_id,
                    query_time(started)
                ),
            ),
            ("pq.sortField".into(), "OperationStart".into()),
            ("pq.sortAscending".into(), "1".into()),
            ("pq.returnLimit".into(), MAX_RETRY_LOOKBACK.to_string()),
            ("pq.pageReturned".into(), "1".into()),
        ])
        .await
    }

    /// The id and identity of the orchestrator named `machine`, from the cached `GET /Agents`
    /// list (read again when old or when the machine is new). An unreadable list is logged and
    /// leaves the id empty: the permission for `/Agents` is not needed to poll.
    async fn agent(&self, machine: &str) -> Option<(Uuid, String)> {
        let key = machine.to_ascii_lowercase();
        let stale = match self.agents.lock() {
            Ok(cache) => cache.stale(&key, Instant::now()),
            Err(_) => true,
        };
        if stale {
            match self.read_agents().await {
                Ok(by_machine) => {
                    if let Ok(mut cache) = self.agents.lock() {
                        cache.by_machine = by_machine;
                        cache.read_at = Some(Instant::now());
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot read the orchestrator list, AgentId stays empty: {e}");
                    if let Ok(mut cache) = self.agents.lock() {
                        cache.read_at = Some(Instant::now());
                    }
                }
            }
        }
        self.agents
            .lock()
            .ok()
            .and_then(|cache| cache.by_machine.get(&key).cloned())
    }

    async fn read_agents(&self) -> Result<HashMap<String, (Uuid, String)>, PollError> {
        let mut by_machine = AgentsByMachine::new();
        let now = Utc::now();
        for page in 1..=MAX_AGENTS.div_ceil(AGENT_PAGE) {
            let rows = self
                .get_from(
                    AGENTS,
                    vec![
                        ("pq.returnLimit".into(), AGENT_PAGE.to_string()),
                        ("pq.pageReturned".into(), page.to_string()),
                    ],
                )
                .await?;
            for agent in &rows {
                if by_machine.len() >= MAX_AGENTS {
                    break;
                }
                remember_agent(&mut by_machine, agent, now);
            }
            if rows.len() < AGENT_PAGE {
                break;
            }
        }
        Ok(by_machine
            .into_iter()
            .map(|(machine, (id, username, _))| (machine, (id, username)))
            .collect())
    }

    async fn commit(&self, events: Vec<NewEvent>, cursor: &Cursor) -> Result<(), PollError> {
        let store = Arc::clone(&self.store);
        let deliveries: Vec<usize> = events.iter().map(|e| e.handlers.len()).collect();
        let text = cursor.to_text();
        let committed = tokio::task::spawn_blocking(move || {
            store.insert_events_with_cursor(&events, CURSOR, &text)
        })
        .await?;
        match &committed {
            Ok(()) => self.store_health.answered(),
            Err(e) => self
                .store_health
                .refused(store_health::reason_of(e), Utc::now()),
        }
        committed?;
        let metrics = self.dispatcher.metrics();
        for n in &deliveries {
            metrics.event_accepted(SOURCE_POLLER, *n);
        }
        // Events no handler takes have no delivery to claim.
        if deliveries.iter().any(|n| *n > 0) {
            self.dispatcher.wake();
        }
        Ok(())
    }
}

/// How often the run that started at `started` is a retry: the number of runs of the same job
/// right before it (newest first in `earlier`) that ended CompletedWillRetry; and when it is a
/// retry, the start of the first run of that chain (when the job was originally run).
fn retry_chain(
    job_id: &Uuid,
    started: DateTime<Utc>,
    earlier: &[Value],
) -> (i32, Option<DateTime<Utc>>) {
    let mut count: i32 = 0;
    let mut first = None;
    for row in earlier {
        // Earlier runs start before this one: `started` is as late as any of them may be.
        if guid(row, "JobId").as_ref() != Some(job_id)
            || start_of(row, started).is_none_or(|s| s >= started)
        {
            continue;
        }
        if !will_retry(row.get("Status")) {
            break;
        }
        count = count.saturating_add(1);
        first = start_of(row, started);
    }
    (count, first)
}

/// Agents by lower-case machine name: id, username and `LastSeen`.
type AgentsByMachine = HashMap<String, (Uuid, String, Option<DateTime<Utc>>)>;

/// Adds one `GET /Agents` row. Two agents may share a machine name (an orchestrator registered
/// again beside its old record): the one seen last (`LastSeen`) stands for the name, whatever
/// order the API lists them in; a row without a usable `LastSeen` does not replace one with. A
/// `LastSeen` ahead of `now` by more than [`CLOCK_SLACK`] is not usable: a record with a wrong
/// clock would otherwise stand for its name for good.
fn remember_agent(by_machine: &mut AgentsByMachine, agent: &Value, now: DateTime<Utc>) {
    let (Some(machine), Some(id)) = (string(agent, "ClientMachine"), guid(agent, "AgentId")) else {
        return;
    };
    let username = string(agent, "Username").unwrap_or_default();
    let last_seen = agent
        .get("LastSeen")
        .and_then(Value::as_str)
        .and_then(parse_timestamp)
        .filter(|seen| *seen - now <= CLOCK_SLACK);
    let key = machine.to_ascii_lowercase();
    if by_machine
        .get(&key)
        .is_some_and(|(_, _, known)| *known >= last_seen)
    {
        return;
    }
    by_machine.insert(key, (id, username, last_seen));
}

/// A row's `OperationStart` as it reads, however implausible: what the cursor remembers the row
/// by ([`Cursor::record_unpruned`] keeps the position from following it past the clock).
fn operation_start(row: &Value) -> Option<DateTime<Utc>> {
    row.get("OperationStart")
        .and_then(Value::as_str)
        .and_then(parse_timestamp)
}

/// A row's `OperationStart`, when it is plausibly when the job ran: not later than
/// [`MAX_START_AHEAD`] past `now`, not before 1970. A start beyond (.NET's `DateTime.MaxValue`
/// 9999-12-31, a signed year chrono accepts) is treated as unreadable: it does not move the
/// position, is not looked up for retries, and an unfinished job with it never becomes stale.
fn start_of(row: &Value, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    plausible(operation_start(row)?, now)
}

/// `start`, when it is a plausible `OperationStart` at `now` (see [`start_of`]).
fn plausible(start: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let latest = now.checked_add_signed(MAX_START_AHEAD).unwrap_or(now);
    (start <= latest && start >= DateTime::UNIX_EPOCH).then_some(start)
}

/// Most a JobHistory row's `OperationStart` may lie ahead of this machine's clock and still be
/// taken as when the job ran: a day covers any clock skew between two servers. (Whatever the
/// start, the position never moves past the poll's own time: [`Cursor::record_unpruned`].)
pub const MAX_START_AHEAD: chrono::Duration = chrono::Duration::days(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_JOB_MESSAGE_BYTES;
    use serde_json::json;

    /// Two agents with one machine name: the one seen last stands for it, in either order,
    /// and one without a usable `LastSeen` (none, or far ahead of the clock) never displaces one
    /// with.
    #[test]
    fn an_agent_name_given_twice_stands_for_the_one_seen_last() {
        let old = json!({"AgentId": "11111111-1111-1111-1111-111111111111",
            "ClientMachine": "Orch.Example", "Username": "OLD", "LastSeen": "2023-01-01T00:00:00"});
        let new = json!({"AgentId": "22222222-2222-2222-2222-222222222222",
            "ClientMachine": "orch.example", "Username": "NEW", "LastSeen": "2024-06-01T00:00:00Z"});
        let never = json!({"AgentId": "33333333-3333-3333-3333-333333333333",
            "ClientMachine": "ORCH.EXAMPLE", "Username": "NEVER", "LastSeen": null});
        let ahead = json!({"AgentId": "44444444-4444-4444-4444-444444444444",
            "ClientMachine": "orch.EXAMPLE", "Username": "AHEAD", "LastSeen": "9999-12-31T00:00:00"});
        let now = parse_timestamp("2024-06-01T00:00:30Z").expect("now");
        for rows in [
            [&old, &new, &never, &ahead],
            [&new, &old, &ahead, &never],
            [&ahead, &never, &new, &old],
        ] {
            let mut by_machine = AgentsByMachine::new();
            for row in rows {
                remember_agent(&mut by_machine, row, now);
            }
            assert_eq!(by_machine.len(), 1);
            let (_, username, _) = &by_machine["orch.example"];
            assert_eq!(username, "NEW", "{rows:?}");
        }
    }

    #[test]
    fn the_job_message_is_kept_bounded_and_storable() {
        let m = |v: Value| message_of(&json!({ "Message": v }));
        assert_eq!(
            m(json!("Unable to open the store file")),
            Some("Unable to open the store file".into())
        );
        assert_eq!(m(json!("")), None);
        assert_eq!(m(json!("  \r\n")), None);
        assert_eq!(m(json!(null)), None);
        assert_eq!(m(json!(42)), None);
        assert_eq!(message_of(&json!({})), None);
        assert_eq!(m(json!("a\u{0}b")), Some("a\u{FFFD}b".into()));
        let long = "é".repeat(MAX_JOB_MESSAGE_BYTES);
        let kept = m(json!(long)).expect("kept");
        assert!(kept.len() <= MAX_JOB_MESSAGE_BYTES, "{}", kept.len());
        assert!(kept.len() > MAX_JOB_MESSAGE_BYTES - 16, "{}", kept.len());
        assert!(kept.ends_with(" [truncated]"));
    }

    #[test]
    fn statuses_and_results_by_name_or_number() {
        let status = |v: Value| status(Some(&v));
        let job_result = |v: Value| job_result(Some(&v));
        assert_eq!(status(json!("Completed")), Status::Finished);
        assert_eq!(status(json!(5)), Status::Finished);
        assert_eq!(status(json!("InProcess")), Status::Unfinished);
        assert_eq!(status(json!(2)), Status::Unfinished);
        assert_eq!(job_result(json!("Failure")), JobResult::Failure);
        assert_eq!(job_result(json!(3)), JobResult::Warning);
        assert_eq!(job_result(json!("nonsense")), JobResult::Unknown);
    }

    /// A number written as a string is the number for every decoder of a row: `Status` "3" is
    /// Completed (it was read as no status at all, and held the poller for a day, while
    /// `will_retry` read "5" and `job_result` read "3"), with white space around it too; what
    /// is neither a documented name nor a documented number is unreadable, not unfinished.
    #[test]
    fn numbers_written_as_strings_read_alike_in_status_result_and_retry() {
        for (text, finished, retry, result) in [
            ("3", Status::Finished, false, JobResult::Warning),
            (" 3", Status::Finished, false, JobResult::Warning),
            ("4 ", Status::Finished, false, JobResult::Failure),
            ("5", Status::Finished, true, JobResult::Unknown),
            ("2", Status::Unfinished, false, JobResult::Success),
            ("0", Status::Unfinished, false, JobResult::Unknown),
        ] {
            let value = json!(text);
            assert_eq!(status(Some(&value)), finished, "{text:?}");
            assert_eq!(will_retry(Some(&value)), retry, "{text:?}");
            assert_eq!(job_result(Some(&value)), result, "{text:?}");
            let number: i64 = text.trim().parse().expect("digits");
            let as_number = json!(number);
            assert_eq!(status(Some(&as_number)), finished, "{number}");
            assert_eq!(will_retry(Some(&as_number)), retry, "{number}");
            assert_eq!(job_result(Some(&as_number)), result, "{number}");
        }
        assert_eq!(
            status(Some(&json!(" completedwillretry "))),
            Status::Finished
        );
        assert!(will_retry(Some(&json!(" CompletedWillRetry"))));
        assert_eq!(job_result(Some(&json!(" success "))), JobResult::Success);
        for unreadable in [
            json!(null),
            json!("Bogus"),
            json!("9"),
            json!(9),
            json!(-1),
            json!(3.5),
            json!("3.0"),
            json!(true),
            json!([3]),
            json!({"Status": 3}),
        ] {
            assert_eq!(
                status(Some(&unreadable)),
                Status::Unreadable,
                "{unreadable}"
            );
            assert!(!will_retry(Some(&unreadable)), "{unreadable}");
        }
        assert_eq!(status(None), Status::Unreadable);
        assert_eq!(job_result(None), JobResult::Unknown);
    }

    /// A page is a repeat when all its rows with ids were on earlier pages of the poll (or,
    /// without ids, it is the page before); a page that shares a row with the one before, as
    /// when a late row shifts the pages, is not; page 1 and an empty page never are.
    #[test]
    fn a_page_repeating_earlier_pages_fails_the_poll() {
        let ids = |ids: &[i64]| -> Vec<Value> {
            ids.iter().map(|id| json!({"JobHistoryId": id})).collect()
        };
        let mut paging = Paging::default();
        assert!(paging.repeated(1, &ids(&[1, 2, 3])).is_ok());
        assert!(paging.repeated(2, &ids(&[3, 4, 5])).is_ok(), "a shift");
        let e = paging
            .repeated(3, &ids(&[3, 4, 5]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("answered page 3 with page 2's rows: it ignores pq.pageReturned"),
            "{e}"
        );
        let e = paging.repeated(3, &ids(&[1, 5])).unwrap_err().to_string();
        assert!(
            e.contains("answered page 3 with rows of earlier pages only"),
            "{e}"
        );
        assert!(paging.repeated(3, &[]).is_ok());

        let mut paging = Paging::default();
        assert!(paging.repeated(1, &ids(&[1])).is_ok());
        assert!(paging.repeated(1, &ids(&[1])).is_ok(), "page 1 again");
        let anonymous = vec![json!({}), json!({})];
        let mut paging = Paging::default();
        assert!(paging.repeated(1, &anonymous).is_ok());
        assert!(paging.repeated(2, &anonymous).is_err());
        assert!(paging.repeated(3, &[json!({"x": 1})]).is_ok());
    }

    /// Starts may repeat and rows without a readable start are passed over, but a start
    /// before one read earlier in the poll, on this page or an earlier one, fails the poll.
    #[test]
    fn rows_are_checked_to_come_in_start_order_across_pages() {
        let at = |id: i64, start: &str| json!({"JobHistoryId": id, "OperationStart": start});
        let mut paging = Paging::default();
        assert!(
            paging
                .in_order(&[
                    at(1, "2023-05-06T00:27:00"),
                    at(2, "2023-05-06T00:27:00"),
                    json!({"JobHistoryId": 3}),
                    at(4, "not a time"),
                    at(5, "2023-05-06T00:28:00"),
                ])
                .is_ok()
        );
        assert!(paging.in_order(&[at(6, "2023-05-06T00:28:00")]).is_ok());
        let e = paging
            .in_order(&[at(7, "2023-05-06T00:29:00"), at(8, "2023-05-06T00:27:59")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "out of OperationStart order (JobHistoryId 8 starts at 2023-05-06T00:27:59, \
                 after JobHistoryId 7 starting at 2023-05-06T00:29:00)"
            ),
            "{e}"
        );
        let e = paging
            .in_order(&[json!({"OperationStart": "2023-05-06T00:00:00"})])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(a row without an id starts at"), "{e}");
    }

    /// A 401 or 403 answer says what to check, in the words `jobhook job-types` uses, and for
    /// JobHistory the permission it needs; other statuses add nothing.
    #[test]
    fn refusals_say_what_to_check() {
        let error = |path: &str, status: u16| {
            PollError::Status {
                path: path.to_owned(),
                status,
                body: "Unauthorized".to_owned(),
                location: None,
                retry_after: None,
            }
            .to_string()
        };
        let e = error(JOB_HISTORY, 401);
        assert!(
            e.starts_with(
                "GET OrchestratorJobs/JobHistory answered 401: Unauthorized; the Keyfactor \
                 API refused the credential: check [keyfactor.auth] (with kind = \"basic\", Basic \
                 authentication must be enabled on the KeyfactorAPI application in IIS)"
            ),
            "{e}"
        );
        let e = error(JOB_HISTORY, 403);
        assert!(
            e.ends_with(
                "check [keyfactor.auth] and the account's permissions in Command \
                 (JobHistory needs the Agent Management Read permission, \
                 /agents/management/read/)"
            ),
            "{e}"
        );
        let e = error(AGENTS, 403);
        assert!(e.ends_with("the account's permissions in Command"), "{e}");
        for status in [400, 404, 500] {
            assert!(!error(JOB_HISTORY, status).contains("[keyfactor.auth]"));
        }
    }

    #[test]
    fn a_row_becomes_a_context() {
        let mut job_types = BTreeMap::new();
        job_types.insert(
            "wincertinventory".to_owned(),
            Uuid::parse_str("49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f").unwrap(),
        );
        let row = json!({"JobHistoryId": 2168, "AgentMachine": "orchestrator.kftrain.lab",
            "JobId": "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01", "JobType": "WinCertInventory",
            "OperationStart": "2023-05-06T00:27:00", "OperationEnd": "2023-05-06T00:27:05",
            "Message": "", "Result": "Success", "Status": "Completed", "StorePath": "My",
            "ClientMachine": "iistarget.kftrain.lab"});
        let c = context_of(&row, &job_types).unwrap();
        assert_eq!(c.client_machine, "orchestrator.kftrain.lab");
        assert_eq!(c.job_result, JobResult::Success);
        assert_eq!(
            c.job_type_id.to_string(),
            "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"
        );
        assert_eq!(c.agent_id, Uuid::nil());
        assert!(c.request_timestamp.is_some());
        assert!(context_of(&json!({"JobHistoryId": 1}), &job_types).is_none());
    }

    /// A row without an orchestrator name gets an empty `ClientMachine`, never the row's own
    /// `ClientMachine`, which in JobHistory is the certificate store's host.
    #[test]
    fn a_row_without_agent_machine_leaves_client_machine_empty() {
        let job_types = BTreeMap::new();
        let base = json!({"JobHistoryId": 2168, "JobId": "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01",
            "JobType": "WinCertInventory", "OperationStart": "2023-05-06T00:27:00",
            "Result": "Success", "Status": "Completed", "ClientMachine": "iistarget.kftrain.lab"});
        for agent_machine in [
            None,
            Some(Value::Null),
            Some(json!("")),
            Some(json!("  ")),
            Some(json!(7)),
        ] {
            let mut row = base.clone();
            if let Some(value) = agent_machine.clone() {
                row["AgentMachine"] = value;
            }
            let c = context_of(&row, &job_types).expect("a context");
            assert_eq!(c.client_machine, "", "{agent_machine:?}");
        }
        let mut row = base;
        row["AgentMachine"] = json!("orchestrator.kftrain.lab");
        let c = context_of(&row, &job_types).expect("a context");
        assert_eq!(c.client_machine, "orchestrator.kftrain.lab");
    }

    #[test]
    fn the_cursor_remembers_the_overlap_window_and_stays_bounded() {
        let t0 = parse_timestamp("2023-05-06T00:00:00").unwrap();
        let now = t0 + chrono::Duration::hours(1);
        let mut c = Cursor::default();
        c.record(1, Some(t0), now);
        c.record(2, Some(t0 + chrono::Duration::minutes(5)), now);
        c.record(3, Some(t0 + OVERLAP + chrono::Duration::minutes(1)), now);
        // 1 is older than the window before the newest start; 2 is inside it.
        assert_eq!(c.seen.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(c.lower_bound(), Some(t0 + chrono::Duration::minutes(1)));
        // A row without a start is remembered but does not move `since`.
        let since = c.since;
        c.record(4, None, now);
        assert_eq!(c.since, since);
        assert!(c.seen.contains_key(&4));
        // Round trip, and an older jobhook's plain id.
        assert_eq!(Cursor::parse(&c.to_text()).unwrap(), c);
        assert_eq!(Cursor::parse("102").unwrap().floor, Some(102));
        assert!(Cursor::parse("{\"seen\": 3}").is_err());
        assert!(Cursor::parse("{\"other\": 1}").is_err());

        // More ids than MAX_SEEN inside the window: the oldest second is dropped and the query
        // bound moves past it.
        let mut c = Cursor::default();
        for id in 0..=i64::try_from(MAX_SEEN).unwrap() {
            let second = if id < 5 { 0 } else { 1 };
            c.record(id, Some(t0 + chrono::Duration::seconds(second)), now);
        }
        assert!(c.seen.len() <= MAX_SEEN);
        assert!(!c.seen.contains_key(&0));
        assert_eq!(c.horizon, Some(t0));
        assert_eq!(c.lower_bound(), Some(t0 + chrono::Duration::seconds(1)));
        // A stored cursor with a time past what a row can give is refused, not computed with.
        for field in ["since", "horizon"] {
            let text = format!(r#"{{"{field}":"+262142-12-31T23:59:59.999999999Z","floor":2175}}"#);
            let e = Cursor::parse(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("its {field} time")), "{e}");
        }
        let e = Cursor::parse(r#"{"seen":{"7":"-0001-01-01T00:00:00Z"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("its seen time"), "{e}");
        let far = Cursor {
            since: Some(t0),
            horizon: parse_timestamp("9999-12-31T23:59:59.999"),
            ..Cursor::default()
        };
        assert_eq!(Cursor::parse(&far.to_text()).unwrap(), far);
        assert!(far.lower_bound().is_some());
        // A hostile stored cursor with too many ids is refused.
        let mut big = Cursor::default();
        for id in 0..=i64::try_from(MAX_SEEN).unwrap() {
            big.seen.insert(id, t0);
        }
        assert!(Cursor::parse(&serde_json::to_string(&big).unwrap()).is_err());
    }

    #[test]
    fn the_position_never_passes_the_poll_and_rows_ahead_are_kept_until_passed() {
        let now = parse_timestamp("2023-05-06T12:00:00.750").unwrap();
        let second = parse_timestamp("2023-05-06T12:00:00").unwrap();
        let mut c = Cursor::default();
        c.record(1, Some(second - chrono::Duration::minutes(1)), now);
        c.record(2, Some(second + chrono::Duration::hours(2)), now);
        let forever = parse_timestamp("9999-12-31T23:59:59").unwrap();
        c.record(3, Some(forever), now);
        // The position is the poll's time, to the second the query asks by.
        assert_eq!(c.since, Some(second));
        assert_eq!(c.lower_bound(), Some(second - OVERLAP));
        assert_eq!(c.seen.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        // The clock passes 2 by more than the overlap: 2 is forgotten only once the query no
        // longer returns it; 3 is returned by every query and kept.
        let later = second + chrono::Duration::hours(2) + OVERLAP;
        c.record(4, Some(later), later);
        assert!(c.seen.contains_key(&2), "2 is still inside the window");
        let after = later + chrono::Duration::seconds(1);
        c.record(5, Some(after), after);
        assert!(!c.seen.contains_key(&2));
        assert!(c.lower_bound() > Some(second + chrono::Duration::hours(2)));
        assert!(c.seen.contains_key(&3));

        // Starts with a fraction of a second: what is forgotten is what the query, which asks
        // by the second, no longer returns.
        let mut c = Cursor::default();
        let base = parse_timestamp("2023-05-06T12:00:00.200").unwrap();
        c.record(1, Some(base), now);
        c.record(
            2,
            Some(base + OVERLAP + chrono::Duration::milliseconds(500)),
            now + OVERLAP + chrono::Duration::minutes(1),
        );
        assert_eq!(
            c.since,
            Some(base + OVERLAP + chrono::Duration::milliseconds(500))
        );
        assert_eq!(c.lower_bound(), Some(second));
        assert!(c.seen.contains_key(&1), "the query still returns 1");

        // A stored position ahead of the clock is brought back; one within the slack is not.
        let mut c = Cursor {
            since: Some(second + chrono::Duration::hours(2)),
            ..Cursor::default()
        };
        assert!(c.hold_to(now));
        assert_eq!(c.since, Some(second));
        c.since = Some(second + CLOCK_SLACK);
        assert!(!c.hold_to(now));
    }

    /// A bound with a fraction of a second (one second past a horizon taken from a row's start)
    /// is compared at the query's resolution: a row in the bound's whole second is new, not one
    /// the server should have left out.
    #[test]
    fn rows_before_the_bound_are_judged_to_the_second() {
        let bound = parse_timestamp("2023-05-06T12:00:01.700").unwrap();
        let at = |t: &str| Some(parse_timestamp(t).unwrap());
        assert!(!starts_before(at("2023-05-06T12:00:01.200"), bound));
        assert!(!starts_before(at("2023-05-06T12:00:01"), bound));
        assert!(!starts_before(at("2023-05-06T12:00:02"), bound));
        assert!(starts_before(at("2023-05-06T12:00:00.999"), bound));
        assert!(!starts_before(None, bound));
        // The bound as the cursor makes it past a horizon with a fraction.
        let start = parse_timestamp("2023-05-06T12:00:00.700").unwrap();
        let c = Cursor {
            since: Some(start),
            horizon: Some(start),
            ..Cursor::default()
        };
        let from = c.lower_bound().unwrap();
        assert_eq!(from, bound);
        assert!(!starts_before(at("2023-05-06T12:00:01.100"), from));
    }

    #[test]
    fn rows_unfinished_under_the_floor_are_not_covered_by_it() {
        let now = parse_timestamp("2023-05-06T12:00:00").unwrap();
        let mut c = Cursor::parse("102").unwrap();
        assert!(c.below_floor(101));
        c.exempt(101);
        assert!(!c.below_floor(101));
        assert!(c.below_floor(100));
        assert!(!c.below_floor(103));
        let text = c.to_text();
        assert!(text.contains("unfinished"), "{text}");
        assert_eq!(Cursor::parse(&text).unwrap(), c);
        c.record(101, Some(now), now);
        assert!(c.unfinished.is_empty());
        assert!(!c.to_text().contains("unfinished"));
        // Bounded: the lowest ids fall back under the floor.
        for id in 0..=i64::try_from(MAX_SEEN).unwrap() {
            c.exempt(id);
        }
        assert_eq!(c.unfinished.len(), MAX_SEEN);
        assert!(c.below_floor(0));
    }

    #[test]
    fn config_is_checked() {
        let mut c = PollerConfig::default();
        c.job_types.insert("X".into(), "nope".into());
        assert!(c.job_type_ids().is_err());
        assert!(PollerConfig::default().job_type_ids().is_ok());
        // Each bound is named with its range: an interval of 0 or of years, a page of 0 rows,
        // a staleness so short that running jobs are skipped and their completions lost.
        type Change = fn(&mut PollerConfig);
        let changes: [(Change, &str); 5] = [
            (|c| c.page_size = 0, "page_size = 0 is out of range"),
            (|c| c.page_size = 1001, "page_size = 1001 is out of range"),
            (|c| c.interval_ms = 0, "interval_ms = 0 is out of range"),
            (
                |c| c.interval_ms = u64::MAX,
                "interval_ms = 18446744073709551615 is out of range: give 1 to 3600000",
            ),
            (
                |c| c.stale_after_ms = 0,
                "stale_after_ms = 0 is too short: give at least 600000",
            ),
        ];
        for (change, says) in changes {
            let mut c = PollerConfig::default();
            change(&mut c);
            let e = c.job_type_ids().unwrap_err().to_string();
            assert!(e.starts_with("[poller] "), "{e}");
            assert!(e.contains(says), "{e}");
        }
        let c = PollerConfig {
            stale_after_ms: 600_000,
            interval_ms: 3_600_000,
            ..PollerConfig::default()
        };
        assert!(c.job_type_ids().is_ok());
    }

    /// `[poller.job_types]` names are matched to a row's `JobType` without regard to case: two
    /// names that differ only in case are refused naming both (one GUID silently replaced the
    /// other), and so are names no row can carry (empty, white space around, control
    /// characters), each quoted and escaped; distinct names of any case are taken.
    #[test]
    fn job_type_names_that_collide_or_no_row_can_carry_are_refused() {
        const G1: &str = "7B6BBC1B-D802-4B09-BEC9-F5C221083130";
        const G2: &str = "7B6BBC1B-D802-4B09-BEC9-F5C221083131";
        let with = |names: &[(&str, &str)]| PollerConfig {
            job_types: names
                .iter()
                .map(|(n, g)| ((*n).to_owned(), (*g).to_owned()))
                .collect(),
            ..PollerConfig::default()
        };
        let e = with(&[("A", G1), ("a", G2)])
            .job_type_ids()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "[poller.job_types] \"A\" and \"a\" differ only in case; JobHistory rows are matched \
             to these names without regard to case, so one GUID would replace the other: keep \
             one of them"
        );
        // The same GUID under both spellings is still two entries for one name.
        assert!(
            with(&[("WinCertInventory", G1), ("WINCERTINVENTORY", G1)])
                .job_type_ids()
                .is_err()
        );
        for (name, says) in [
            ("", "\"\" is empty"),
            ("  ", "\"  \" is empty"),
            (" A", "\" A\" has white space around it"),
            ("A\u{1b}[2J", "\"A\\u{1b}[2J\" holds a control character"),
            ("A\nB", "\"A\\nB\" holds a control character"),
        ] {
            let e = with(&[(name, G1)]).job_type_ids().unwrap_err().to_string();
            assert!(e.starts_with("[poller.job_types] "), "{name:?}: {e}");
            assert!(e.contains(says), "{name:?}: {e}");
            assert!(!e.contains(['\u{1b}', '\n']), "{name:?}: {e:?}");
        }
        let ids = with(&[("A", G1), ("B", G2), ("Custom.FetchLogs", G2)])
            .job_type_ids()
            .unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids.get("a"), parse_guid(G1).as_ref());
        assert_eq!(ids.get("custom.fetchlogs"), parse_guid(G2).as_ref());
    }
}
