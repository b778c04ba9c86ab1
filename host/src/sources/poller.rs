//! The JobHistory poller: for sites where no extension can be installed in Keyfactor Command,
//! jobhook polls `GET OrchestratorJobs/JobHistory` and turns finished jobs into events.
//!
//! The cursor is the highest `JobHistoryId` already turned into events. It is stored durably and
//! advanced in the same transaction that commits the events, so a restart neither loses nor
//! repeats a job. Rows are read in ascending `JobHistoryId` order; the cursor stops before the
//! first row that is not finished yet (it is read again on the next poll), unless that row is
//! older than `stale_after_ms`, in which case it is skipped with a warning so that one job that
//! never completes cannot stall the poller. API errors back off exponentially. With several
//! engine nodes on one shared store, only the node holding the store's `poller` leadership polls.
//!
//! How the context is filled from a JobHistory row (the row has fewer fields than the context a
//! Keyfactor extension receives):
//!
//! | context field      | from the row                                                      |
//! |--------------------|-------------------------------------------------------------------|
//! | AgentId            | `AgentId` when present, otherwise the nil GUID                    |
//! | Username           | `Username` when present, otherwise empty                          |
//! | ClientMachine      | `AgentMachine` (the orchestrator's name), else `ClientMachine`    |
//! | JobResult          | `Result` (name or number)                                         |
//! | JobId              | `JobId`                                                           |
//! | JobType            | `JobType`                                                         |
//! | JobTypeId          | `JobTypeId` when present, else `[poller.job_types]` by `JobType`, else nil |
//! | OperationType      | `OperationType` when present, otherwise Unknown                   |
//! | CertificateId      | `CertificateId` when present, otherwise empty                     |
//! | RequestTimestamp   | `OperationStart`                                                  |
//! | CurrentRetryCount  | `CurrentRetryCount` when present, otherwise 0                     |

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::bindings::jobhook::handler::keyfactor::Request;
use crate::bindings::types::Method;
use crate::capabilities::keyfactor::{KeyfactorClient, KeyfactorGrant};
use crate::context::{JobContext, JobResult, OperationType, parse_guid, parse_timestamp};
use crate::queue::dispatch::Dispatcher;
use crate::queue::store::{EventStore, NewEvent, StoreError};

/// The name of the poller's cursor in the store.
pub const CURSOR: &str = "jobhistory";

/// The path polled, relative to the API base.
const JOB_HISTORY: &str = "OrchestratorJobs/JobHistory";

/// Longest back-off after repeated API errors.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

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

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            interval_ms: 30_000,
            page_size: 100,
            backfill: false,
            stale_after_ms: 24 * 3600 * 1000,
            job_types: BTreeMap::new(),
        }
    }
}

impl PollerConfig {
    /// Checks values and parses the job type map.
    pub fn job_type_ids(&self) -> Result<BTreeMap<String, Uuid>, PollerConfigError> {
        if self.interval_ms == 0 || self.page_size == 0 || self.page_size > 1000 {
            return Err(PollerConfigError::Bounds);
        }
        self.job_types
            .iter()
            .map(|(name, id)| {
                parse_guid(id)
                    .map(|g| (name.to_ascii_lowercase(), g))
                    .ok_or_else(|| PollerConfigError::JobType {
                        name: name.clone(),
                        id: id.clone(),
                    })
            })
            .collect()
    }
}

/// Why a `[poller]` section was refused; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollerConfigError {
    /// `interval_ms` or `page_size` out of bounds.
    #[error("[poller] interval_ms must be at least 1 and page_size between 1 and 1000")]
    Bounds,
    /// A `[poller.job_types]` value that is not a GUID.
    #[error("[poller.job_types] {name} = {id:?} is not a GUID")]
    JobType {
        /// The job type name.
        name: String,
        /// The value given.
        id: String,
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
    #[error("GET {JOB_HISTORY} failed: {0}")]
    Call(String),
    /// The Keyfactor API answered with an error status.
    #[error("GET {JOB_HISTORY} answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the body (lossy UTF-8).
        body: String,
    },
    /// The answer is not what the API documents.
    #[error("GET {JOB_HISTORY} {0}")]
    Answer(String),
    /// The store refused the read or the commit.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The stored cursor is unreadable.
    #[error("stored poller cursor {0:?} is not a number")]
    Cursor(String),
    /// A blocking store task did not complete.
    #[error("store task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A JobHistory row's status, as far as the poller cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Finished,
    Unfinished,
}

/// Keyfactor's JobHistory `Status`: 3 Completed, 4 Acknowledged and 5 CompletedWillRetry are
/// finished; 0 Unknown, 1 Waiting and 2 InProcess are not. Names or numbers.
fn status(value: &Value) -> Status {
    let finished = match value {
        Value::Number(n) => matches!(n.as_i64(), Some(3..=5)),
        Value::String(s) => ["completed", "acknowledged", "completedwillretry"]
            .contains(&s.to_ascii_lowercase().as_str()),
        _ => false,
    };
    if finished {
        Status::Finished
    } else {
        Status::Unfinished
    }
}

fn job_result(value: &Value) -> JobResult {
    match value {
        Value::Number(n) => n
            .as_i64()
            .map_or(JobResult::Unknown, JobResult::from_number),
        Value::String(s) => {
            let s = s.to_ascii_lowercase();
            match s.as_str() {
                "success" => JobResult::Success,
                "warning" => JobResult::Warning,
                "failure" => JobResult::Failure,
                "inprocess" => JobResult::InProcess,
                other => other
                    .parse::<i64>()
                    .map_or(JobResult::Unknown, JobResult::from_number),
            }
        }
        _ => JobResult::Unknown,
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

/// Turns a finished JobHistory row into a job context (see the module table).
fn context_of(row: &Value, job_types: &BTreeMap<String, Uuid>) -> Option<JobContext> {
    let job_type = string(row, "JobType").unwrap_or_default();
    let job_type_id = guid(row, "JobTypeId")
        .or_else(|| job_types.get(&job_type.to_ascii_lowercase()).copied())
        .unwrap_or(Uuid::nil());
    Some(JobContext {
        agent_id: guid(row, "AgentId").unwrap_or(Uuid::nil()),
        username: string(row, "Username").unwrap_or_default(),
        client_machine: string(row, "AgentMachine")
            .or_else(|| string(row, "ClientMachine"))
            .unwrap_or_default(),
        job_result: job_result(row.get("Result").unwrap_or(&Value::Null)),
        job_id: guid(row, "JobId")?,
        job_type,
        job_type_id,
        operation_type: match row.get("OperationType") {
            Some(Value::Number(n)) => n
                .as_i64()
                .map_or(OperationType::Unknown, OperationType::from_number),
            _ => OperationType::Unknown,
        },
        certificate_id: int(row, "CertificateId"),
        request_timestamp: row
            .get("OperationStart")
            .and_then(Value::as_str)
            .and_then(parse_timestamp),
        current_retry_count: int(row, "CurrentRetryCount").unwrap_or(0),
    })
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Events committed.
    pub events: usize,
    /// Whether a full page came back (poll again at once).
    pub more: bool,
    /// The cursor after the poll.
    pub cursor: Option<i64>,
}

/// Polls JobHistory and commits events.
pub struct Poller {
    config: PollerConfig,
    job_types: BTreeMap<String, Uuid>,
    client: Arc<KeyfactorClient>,
    grant: KeyfactorGrant,
    store: Arc<dyn EventStore>,
    dispatcher: Arc<Dispatcher>,
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
        let grant = KeyfactorGrant::read_only(&["OrchestratorJobs/"])
            .map_err(|e| PollerSetupError::Grant(e.to_string()))?;
        Ok(Poller {
            config,
            job_types,
            client,
            grant,
            store,
            dispatcher,
        })
    }

    /// Polls until the process ends: every interval, at once while pages are full, backing off
    /// on errors.
    pub async fn run(self) {
        let interval = Duration::from_millis(self.config.interval_ms);
        let mut backoff = interval;
        loop {
            if !self.leads().await {
                tokio::time::sleep(interval).await;
                continue;
            }
            match self.poll_once().await {
                Ok(report) => {
                    backoff = interval;
                    if report.events > 0 {
                        tracing::info!(events = report.events, cursor = ?report.cursor, "JobHistory polled");
                    }
                    if report.more {
                        continue;
                    }
                    tokio::time::sleep(interval).await;
                }
                Err(e) => {
                    tracing::warn!("JobHistory poll failed, retrying in {backoff:?}: {e}");
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
        let response = self
            .client
            .send(
                &self.grant,
                Request {
                    method: Method::Get,
                    path: JOB_HISTORY.into(),
                    query,
                    headers: Vec::new(),
                    body: None,
                },
            )
            .await
            .map_err(|e| PollError::Call(format!("{e:?}")))?;
        if !(200..300).contains(&response.status) {
            return Err(PollError::Status {
                status: response.status,
                body: String::from_utf8_lossy(response.body.get(..500).unwrap_or(&response.body))
                    .into_owned(),
            });
        }
        match serde_json::from_slice::<Value>(&response.body) {
            Ok(Value::Array(rows)) => Ok(rows),
            Ok(_) => Err(PollError::Answer("did not answer a JSON array".into())),
            Err(e) => Err(PollError::Answer(format!("answered invalid JSON: {e}"))),
        }
    }

    /// One poll: reads the page after the cursor and commits the finished jobs with the new
    /// cursor.
    pub async fn poll_once(&self) -> Result<PollReport, PollError> {
        let store = Arc::clone(&self.store);
        let cursor = tokio::task::spawn_blocking(move || store.cursor(CURSOR)).await??;
        let cursor = match cursor {
            Some(text) => text
                .parse::<i64>()
                .map_err(|_| PollError::Cursor(text.clone()))?,
            None if self.config.backfill => 0,
            None => {
                // First start: begin after the newest job.
                let newest = self
                    .get(vec![
                        ("pq.sortField".into(), "JobHistoryId".into()),
                        ("pq.sortAscending".into(), "1".into()),
                        ("pq.returnLimit".into(), "1".into()),
                        ("pq.pageReturned".into(), "1".into()),
                    ])
                    .await?;
                let start = newest
                    .first()
                    .and_then(|r| r.get("JobHistoryId"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                self.commit(Vec::new(), start).await?;
                return Ok(PollReport {
                    events: 0,
                    more: false,
                    cursor: Some(start),
                });
            }
        };
        let rows = self
            .get(vec![
                (
                    "pq.queryString".into(),
                    format!("JobHistoryId -gt {cursor}"),
                ),
                ("pq.sortField".into(), "JobHistoryId".into()),
                ("pq.sortAscending".into(), "0".into()),
                ("pq.returnLimit".into(), self.config.page_size.to_string()),
                ("pq.pageReturned".into(), "1".into()),
            ])
            .await?;
        let full_page = rows.len() >= self.config.page_size as usize;
        let (events, next) = self.events_from(&rows, cursor, Utc::now());
        let count = events.len();
        if next != cursor {
            self.commit(events, next).await?;
        }
        Ok(PollReport {
            events: count,
            more: full_page && next != cursor,
            cursor: Some(next),
        })
    }

    /// The events for `rows` (ascending) after `cursor`, and the new cursor: up to, not
    /// including, the first unfinished row that is not stale.
    fn events_from(&self, rows: &[Value], cursor: i64, now: DateTime<Utc>) -> (Vec<NewEvent>, i64) {
        let registry = self.dispatcher.registry();
        let stale_after = chrono::Duration::milliseconds(
            i64::try_from(self.config.stale_after_ms).unwrap_or(i64::MAX),
        );
        let mut sorted: Vec<(i64, &Value)> = rows
            .iter()
            .filter_map(|r| Some((r.get("JobHistoryId")?.as_i64()?, r)))
            .filter(|(id, _)| *id > cursor)
            .collect();
        sorted.sort_by_key(|(id, _)| *id);
        let mut next = cursor;
        let mut events = Vec::new();
        for (id, row) in sorted {
            if status(row.get("Status").unwrap_or(&Value::Null)) == Status::Unfinished {
                let started = row
                    .get("OperationStart")
                    .and_then(Value::as_str)
                    .and_then(parse_timestamp);
                let stale = started.is_some_and(|t| now - t > stale_after);
                if !stale {
                    break;
                }
                tracing::warn!(
                    job_history_id = id,
                    "skipping a job that has not finished for too long"
                );
                next = id;
                continue;
            }
            match context_of(row, &self.job_types) {
                Some(context) => events.push(NewEvent {
                    id: Uuid::new_v4(),
                    source: "poller".into(),
                    handlers: registry.route(context.job_type_id),
                    context,
                }),
                None => tracing::warn!(
                    job_history_id = id,
                    "JobHistory row without a JobId skipped"
                ),
            }
            next = id;
        }
        (events, next)
    }

    async fn commit(&self, events: Vec<NewEvent>, cursor: i64) -> Result<(), PollError> {
        let store = Arc::clone(&self.store);
        let count = events.len();
        tokio::task::spawn_blocking(move || {
            store.insert_events_with_cursor(&events, CURSOR, &cursor.to_string())
        })
        .await??;
        if count > 0 {
            self.dispatcher.wake();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_and_results_by_name_or_number() {
        assert_eq!(status(&json!("Completed")), Status::Finished);
        assert_eq!(status(&json!(5)), Status::Finished);
        assert_eq!(status(&json!("InProcess")), Status::Unfinished);
        assert_eq!(status(&json!(2)), Status::Unfinished);
        assert_eq!(status(&Value::Null), Status::Unfinished);
        assert_eq!(job_result(&json!("Failure")), JobResult::Failure);
        assert_eq!(job_result(&json!(3)), JobResult::Warning);
        assert_eq!(job_result(&json!("nonsense")), JobResult::Unknown);
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

    #[test]
    fn config_is_checked() {
        let mut c = PollerConfig::default();
        c.job_types.insert("X".into(), "nope".into());
        assert!(c.job_type_ids().is_err());
        let c = PollerConfig {
            page_size: 0,
            ..PollerConfig::default()
        };
        assert!(c.job_type_ids().is_err());
    }
}
