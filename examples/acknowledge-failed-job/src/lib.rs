//! `acknowledge-failed-job`: acknowledges a job's failed (or warning) runs in Keyfactor Command
//! through the engine's `keyfactor` capability, so they leave the failure count of the
//! Management Portal's job history once they are handled elsewhere — a ticket was opened, the
//! team was told, or the warning is known and accepted.
//!
//! The calls, as the Command API documents them:
//! 1. `GET OrchestratorJobs/JobHistory?pq.queryString=JobID -eq "<JobId>"` (sorted by
//!    `OperationStart`, newest first, at most [`MAX_RUNS`] rows): the runs of this job.
//! 2. `POST OrchestratorJobs/Acknowledge` with `{"JobAuditIds": [<JobHistoryId>, …]}` for the
//!    runs that are eligible: `Result` Failure (4) or Warning (3) — the ones `AcknowledgeOn`
//!    selects — and `Status` Completed (3) or CompletedWillRetry (5). Command answers
//!    `204 No Content`. The identity the engine uses for the Keyfactor API needs the
//!    `/agents/management/modify/` permission (Agent Management Modify).
//!
//! `JobAuditIds` are described by Keyfactor as the ids of the jobs found with
//! `GET OrchestratorJobs/JobHistory`; the only integer id a JobHistory row has is its
//! `JobHistoryId`, so that is what is sent (inferred, not stated in so many words).
//!
//! Command may call job complete handlers before the run that just ended is final in
//! JobHistory (the row can still say `InProcess`). That run is the newest one that has started
//! (rows come newest first): when it is still `InProcess`, the handler acknowledges what is
//! eligible and then fails with a reason that says so, so a `[handlers.retry]` policy brings it
//! back for that run. A `Waiting` row (a run not started: not the one that just ended) and an
//! older run left `InProcess` (an orchestrator that never reported back) do not hold it back —
//! a recurring job always has the one, and may keep the other for good.
//!
//! Properties:
//! - `AcknowledgeOn` (optional, default `Failure`): `Failure`, `Warning` or both, comma-separated
//!   — the results Command lets a run be acknowledged for; anything else is refused.
//! - `MinRetries` (optional, default 0): act only once `CurrentRetryCount` has reached it.

use jobhook_sdk::job_history::{
    self, RESULT_FAILURE, RESULT_WARNING, STATUS_ACKNOWLEDGED, STATUS_COMPLETED,
    STATUS_COMPLETED_WILL_RETRY, STATUS_IN_PROCESS,
};
use jobhook_sdk::serde_json::{Value, json};
use jobhook_sdk::{
    Context, Error, Handler, JobResult, Result, export_handler, info, keyfactor, properties,
};

/// The JobHistory endpoint, relative to the API base.
pub const JOB_HISTORY_PATH: &str = "OrchestratorJobs/JobHistory";

/// The acknowledge endpoint, relative to the API base.
pub const ACKNOWLEDGE_PATH: &str = "OrchestratorJobs/Acknowledge";

/// Most runs read and acknowledged in one delivery: a recurring job that fails every few
/// minutes collects many runs; older ones are left for the next delivery or for the portal.
pub const MAX_RUNS: usize = 100;

/// The handler's settings, read from its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The results whose runs are acknowledged (Failure and/or Warning).
    pub acknowledge_on: Vec<JobResult>,
    /// Retries needed first.
    pub min_retries: i32,
}

impl Settings {
    /// Reads and checks the properties; errors name the property and what to fix.
    pub fn from_properties() -> Result<Settings> {
        let acknowledge_on = match properties::get("AcknowledgeOn") {
            Some(v) if !v.trim().is_empty() => properties::list("AcknowledgeOn")?
                .iter()
                .map(|name| match name.parse::<JobResult>() {
                    Ok(r @ (JobResult::Failure | JobResult::Warning)) => Ok(r),
                    _ => Err(Error::new(format!(
                        "property 'AcknowledgeOn' lists '{}': Keyfactor acknowledges only \
                         Failure and Warning runs",
                        name.chars().take(32).collect::<String>()
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => vec![JobResult::Failure],
        };
        let min_retries: i32 = properties::parse_or("MinRetries", 0)?;
        if min_retries < 0 {
            return Err(Error::new(format!(
                "property 'MinRetries' must be 0 or more, got {min_retries}"
            )));
        }
        Ok(Settings {
            acknowledge_on,
            min_retries,
        })
    }

    /// Whether this job's runs are to be acknowledged.
    pub fn applies(&self, ctx: &Context) -> bool {
        self.acknowledge_on.contains(&ctx.job_result) && ctx.current_retry_count >= self.min_retries
    }

    /// The JobHistory `Result` numbers selected.
    fn results(&self) -> Vec<i64> {
        self.acknowledge_on
            .iter()
            .map(|r| match r {
                JobResult::Warning => RESULT_WARNING,
                _ => RESULT_FAILURE,
            })
            .collect()
    }
}

/// The `pq.queryString` that selects this job's runs.
pub fn history_query(ctx: &Context) -> String {
    format!("JobID -eq \"{}\"", ctx.job_id.hyphenated())
}

/// What the history says about this job's runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runs {
    /// `JobHistoryId`s of the runs that can be acknowledged now, newest first.
    pub eligible: Vec<i64>,
    /// The `JobHistoryId` of the newest run that has started, when it is still `InProcess`:
    /// most likely the run that just ended, not final in JobHistory yet.
    pub newest_in_process: Option<i64>,
}

/// Sorts the JobHistory rows of the job (newest first, as asked) into eligible runs and the
/// newest started run still in process. Rows of other jobs (a server that ignored the query)
/// and rows without a usable `JobHistoryId` are skipped.
pub fn classify(rows: &[Value], ctx: &Context, results: &[i64]) -> Runs {
    let job_id = ctx.job_id.hyphenated().to_string();
    let mut runs = Runs::default();
    let mut newest_started_seen = false;
    for row in rows.iter().take(MAX_RUNS) {
        let same_job = row
            .get("JobId")
            .and_then(Value::as_str)
            .is_some_and(|id| id.trim_matches(['{', '}']).eq_ignore_ascii_case(&job_id));
        let Some(id) = row
            .get("JobHistoryId")
            .and_then(Value::as_i64)
            .filter(|id| *id > 0)
        else {
            continue;
        };
        if !same_job {
            continue;
        }
        let result = row.get("Result").and_then(job_history::result_code);
        let status = row.get("Status").and_then(job_history::status_code);
        // Only a run known to have started can be the one that just ended: not a waiting one,
        // nor one whose status is unknown or unreadable.
        let started = matches!(
            status,
            Some(
                STATUS_IN_PROCESS
                    | STATUS_COMPLETED
                    | STATUS_ACKNOWLEDGED
                    | STATUS_COMPLETED_WILL_RETRY
            )
        );
        let newest_started = started && !newest_started_seen;
        newest_started_seen |= started;
        match status {
            Some(STATUS_IN_PROCESS) if newest_started => runs.newest_in_process = Some(id),
            Some(STATUS_COMPLETED | STATUS_COMPLETED_WILL_RETRY)
                if result.is_some_and(|r| results.contains(&r)) =>
            {
                runs.eligible.push(id);
            }
            _ => {}
        }
    }
    runs
}

/// The acknowledge request body.
pub fn acknowledge_body(ids: &[i64]) -> Value {
    json!({ "JobAuditIds": ids })
}

/// Acknowledges a job's failed or warning runs in Keyfactor Command.
pub struct AcknowledgeFailedJob;

impl Handler for AcknowledgeFailedJob {
    fn run(ctx: &Context) -> Result<()> {
        let settings = Settings::from_properties()?;
        if !settings.applies(ctx) {
            info!(
                "{} job {} ended {} (retry {}): nothing to acknowledge",
                ctx.job_type, ctx.job_id, ctx.job_result, ctx.current_retry_count
            );
            return Ok(());
        }

        let lookup = || format!("reading the JobHistory of job {}", ctx.job_id);
        let rows: Value = keyfactor::Request::get(JOB_HISTORY_PATH)
            .query("pq.queryString", history_query(ctx))
            .query("pq.sortField", "OperationStart")
            .query("pq.sortAscending", "1")
            .query("pq.returnLimit", MAX_RUNS.to_string())
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .map_err(|e| e.context(lookup()))?;
        let Value::Array(rows) = rows else {
            return Err(Error::new(format!(
                "{}: expected a JSON array of history rows",
                lookup()
            )));
        };
        let runs = classify(&rows, ctx, &settings.results());

        if !runs.eligible.is_empty() {
            let acknowledging = || {
                format!(
                    "acknowledging {} run(s) of job {}",
                    runs.eligible.len(),
                    ctx.job_id
                )
            };
            let response = keyfactor::Request::post(ACKNOWLEDGE_PATH)
                .json(&acknowledge_body(&runs.eligible))?
                .send()
                .map_err(|e| e.context(acknowledging()))?;
            if response.status == 403 {
                return Err(Error::new(format!(
                    "{}: Keyfactor answered 403 Forbidden: the identity jobhook uses for the \
                     Keyfactor API needs the Agent Management Modify permission \
                     (/agents/management/modify/)",
                    acknowledging()
                )));
            }
            response
                .error_for_status()
                .map_err(|e| e.context(acknowledging()))?;
            let ids: Vec<String> = runs.eligible.iter().map(i64::to_string).collect();
            info!(
                "acknowledged {} run(s) of {} job {} on {} (JobHistoryId {})",
                runs.eligible.len(),
                ctx.job_type,
                ctx.job_id,
                ctx.client_machine,
                ids.join(", ")
            );
        }
        if let Some(run) = runs.newest_in_process {
            return Err(Error::new(format!(
                "the newest run of job {} (JobHistoryId {run}) is not finished in JobHistory \
                 yet, so it cannot be acknowledged now; a retry policy ([handlers.retry]) runs \
                 this handler again",
                ctx.job_id
            )));
        }
        if runs.eligible.is_empty() {
            info!(
                "{} job {}: no run waits for acknowledgment",
                ctx.job_type, ctx.job_id
            );
        }
        Ok(())
    }
}

export_handler!(AcknowledgeFailedJob);

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook_sdk::testing::{self, MockHost};
    use jobhook_sdk::{CapabilityError, Method};

    fn sample(json: &str) -> Context {
        testing::context_from_json(json).expect("sample context parses")
    }

    fn failed() -> Context {
        sample(include_str!("../contexts/failed-inventory.json"))
    }

    const JOB: &str = "7a07f123-8d4e-4c5b-9f60-1b2c3d4e5f60";

    fn history() -> Value {
        json!([
            {"JobHistoryId": 2175, "JobId": JOB, "Result": 4, "Status": 5},
            {"JobHistoryId": 2164, "JobId": JOB, "Result": "Failure", "Status": "Completed"},
            {"JobHistoryId": 2163, "JobId": JOB, "Result": 4, "Status": 4},
            {"JobHistoryId": 2162, "JobId": JOB, "Result": 3, "Status": 3},
            {"JobHistoryId": 2161, "JobId": JOB, "Result": 2, "Status": 3},
            {"JobHistoryId": 2160, "JobId": "{7A07F123-8D4E-4C5B-9F60-1B2C3D4E5F60}", "Result": 4, "Status": 5},
            {"JobHistoryId": 9999, "JobId": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90", "Result": 4, "Status": 5},
            {"JobHistoryId": "2158", "JobId": JOB, "Result": 4, "Status": 5},
            {"JobId": JOB, "Result": 4, "Status": 5}
        ])
    }

    #[test]
    fn failed_runs_of_the_job_are_acknowledged_by_id() {
        let host = MockHost::new()
            .keyfactor_json(200, history())
            .keyfactor_response(204, "")
            .install();
        assert_eq!(
            testing::run_handler::<AcknowledgeFailedJob>(&failed()),
            Ok(())
        );
        let calls = host.keyfactor_requests();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].method, Method::Get);
        assert_eq!(calls[0].path, JOB_HISTORY_PATH);
        assert_eq!(
            calls[0].query_value("pq.queryString"),
            Some(r#"JobID -eq "7a07f123-8d4e-4c5b-9f60-1b2c3d4e5f60""#)
        );
        assert_eq!(calls[0].query_value("pq.sortField"), Some("OperationStart"));
        assert_eq!(calls[0].query_value("pq.sortAscending"), Some("1"));
        assert_eq!(calls[0].query_value("pq.returnLimit"), Some("100"));
        assert_eq!(calls[1].method, Method::Post);
        assert_eq!(calls[1].path, ACKNOWLEDGE_PATH);
        assert_eq!(
            calls[1].body_json(),
            Some(json!({"JobAuditIds": [2175, 2164, 2160]}))
        );
        assert!(host.logged(
            "acknowledged 3 run(s) of PEMInventory job 7a07f123-8d4e-4c5b-9f60-1b2c3d4e5f60 on orchestrator.kftrain.lab (JobHistoryId 2175, 2164, 2160)"
        ));
    }

    #[test]
    fn warnings_are_acknowledged_only_when_selected() {
        let ctx = Context {
            job_result: JobResult::Warning,
            ..failed()
        };
        let host = MockHost::new().install();
        assert_eq!(testing::run_handler::<AcknowledgeFailedJob>(&ctx), Ok(()));
        assert!(host.keyfactor_requests().is_empty());
        assert!(host.logged("nothing to acknowledge"));
        drop(host);

        let host = MockHost::new()
            .property("AcknowledgeOn", "Warning")
            .keyfactor_json(200, history())
            .keyfactor_response(204, "")
            .install();
        assert_eq!(testing::run_handler::<AcknowledgeFailedJob>(&ctx), Ok(()));
        assert_eq!(
            host.keyfactor_requests()[1].body_json(),
            Some(json!({"JobAuditIds": [2162]}))
        );
    }

    #[test]
    fn an_unfinished_run_is_acknowledged_on_a_later_attempt() {
        let rows = json!([
            {"JobHistoryId": 2171, "JobId": JOB, "Result": 0, "Status": 2},
            {"JobHistoryId": 2170, "JobId": JOB, "Result": 4, "Status": 3}
        ]);
        let host = MockHost::new()
            .keyfactor_json(200, rows)
            .keyfactor_response(204, "")
            .install();
        let reason = testing::run_handler::<AcknowledgeFailedJob>(&failed()).unwrap_err();
        assert!(
            reason.contains(
                "the newest run of job 7a07f123-8d4e-4c5b-9f60-1b2c3d4e5f60 (JobHistoryId 2171) \
                 is not finished"
            ) && reason.contains("[handlers.retry]"),
            "{reason}"
        );
        assert_eq!(
            host.keyfactor_requests()[1].body_json(),
            Some(json!({"JobAuditIds": [2170]})),
            "what is eligible is acknowledged first"
        );
    }

    /// A row whose status is unknown or unreadable is no started run: the run in process
    /// behind it is still the newest started one.
    #[test]
    fn a_row_of_unknown_status_does_not_hide_the_run_in_process() {
        let rows = json!([
            {"JobHistoryId": 2182, "JobId": JOB, "Result": 0, "Status": 0},
            {"JobHistoryId": 2181, "JobId": JOB, "Result": 0, "Status": "Bogus"},
            {"JobHistoryId": 2180, "JobId": JOB, "Result": 0, "Status": "InProcess"},
            {"JobHistoryId": 2179, "JobId": JOB, "Result": 4, "Status": 3}
        ]);
        let runs = classify(rows.as_array().unwrap(), &failed(), &[RESULT_FAILURE]);
        assert_eq!(runs.newest_in_process, Some(2180));
        assert_eq!(runs.eligible, vec![2179]);
    }

    /// A recurring job's next run waiting to start, and an old run an orchestrator never
    /// finished, are not the run that just ended: they do not fail the delivery (which would
    /// fail at every retry, for good).
    #[test]
    fn waiting_runs_and_old_runs_left_in_process_do_not_hold_the_delivery_back() {
        let rows = json!([
            {"JobHistoryId": 2180, "JobId": JOB, "Result": 0, "Status": 1},
            {"JobHistoryId": 2179, "JobId": JOB, "Result": 4, "Status": "Completed"},
            {"JobHistoryId": 2150, "JobId": JOB, "Result": 0, "Status": "InProcess"}
        ]);
        // (And a row of unknown status before the run in process does not hide it: below.)
        let host = MockHost::new()
            .keyfactor_json(200, rows)
            .keyfactor_response(204, "")
            .install();
        assert_eq!(
            testing::run_handler::<AcknowledgeFailedJob>(&failed()),
            Ok(())
        );
        assert_eq!(
            host.keyfactor_requests()[1].body_json(),
            Some(json!({"JobAuditIds": [2179]}))
        );
    }

    #[test]
    fn nothing_eligible_posts_nothing() {
        let rows = json!([{"JobHistoryId": 2163, "JobId": JOB, "Result": 4, "Status": 4}]);
        let host = MockHost::new().keyfactor_json(200, rows).install();
        assert_eq!(
            testing::run_handler::<AcknowledgeFailedJob>(&failed()),
            Ok(())
        );
        assert_eq!(host.keyfactor_requests().len(), 1);
        assert!(host.logged("no run waits for acknowledgment"));
    }

    #[test]
    fn success_and_retries_below_the_minimum_do_nothing() {
        let host = MockHost::new().install();
        let ok = sample(include_str!("../contexts/succeeded.json"));
        assert_eq!(testing::run_handler::<AcknowledgeFailedJob>(&ok), Ok(()));
        drop(host);
        let host = MockHost::new().property("MinRetries", "3").install();
        assert_eq!(
            testing::run_handler::<AcknowledgeFailedJob>(&failed()),
            Ok(())
        );
        assert!(host.keyfactor_requests().is_empty());
    }

    #[test]
    fn bad_properties_fail_with_the_property_name() {
        for (name, value, expected) in [
            ("AcknowledgeOn", "Success", "only Failure and Warning"),
            ("AcknowledgeOn", "Failure, Bogus", "'AcknowledgeOn'"),
            ("AcknowledgeOn", " , ", "lists no values"),
            ("MinRetries", "-1", "'MinRetries'"),
            ("MinRetries", "x", "'MinRetries'"),
        ] {
            let host = MockHost::new().property(name, value).install();
            let reason = testing::run_handler::<AcknowledgeFailedJob>(&failed()).unwrap_err();
            assert!(reason.contains(expected), "{name}={value}: {reason}");
            assert!(host.keyfactor_requests().is_empty());
        }
    }

    #[test]
    fn api_errors_fail_with_the_reason() {
        let _host = MockHost::new()
            .keyfactor_json(200, history())
            .keyfactor_response(403, "")
            .install();
        let reason = testing::run_handler::<AcknowledgeFailedJob>(&failed()).unwrap_err();
        assert!(reason.contains("/agents/management/modify/"), "{reason}");

        let _host = MockHost::new()
            .keyfactor_json(200, history())
            .keyfactor_response(
                400,
                r#"{"ErrorCode":"0xA0010400","Message":"not eligible"}"#,
            )
            .install();
        let reason = testing::run_handler::<AcknowledgeFailedJob>(&failed()).unwrap_err();
        assert!(
            reason.starts_with("acknowledging 3 run(s) of job") && reason.contains("not eligible"),
            "{reason}"
        );

        let _host = MockHost::new()
            .keyfactor_json(200, json!({"rows": []}))
            .install();
        let reason = testing::run_handler::<AcknowledgeFailedJob>(&failed()).unwrap_err();
        assert!(
            reason.ends_with("expected a JSON array of history rows"),
            "{reason}"
        );

        let _host = MockHost::new()
            .keyfactor_error(CapabilityError::NotGranted(
                "POST is not granted to this handler".into(),
            ))
            .install();
        let reason = testing::run_handler::<AcknowledgeFailedJob>(&failed()).unwrap_err();
        assert!(reason.contains("not granted"), "{reason}");
    }

    #[test]
    fn classify_is_bounded() {
        let rows: Vec<Value> = (1..=(MAX_RUNS as i64 + 50))
            .map(|i| json!({"JobHistoryId": i, "JobId": JOB, "Result": 4, "Status": 3}))
            .collect();
        let runs = classify(&rows, &failed(), &[RESULT_FAILURE]);
        assert_eq!(runs.eligible.len(), MAX_RUNS);
    }
}
