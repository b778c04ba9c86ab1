//! `job-history-lookup`: Keyfactor's official sample job complete handler
//! (`Keyfactor/keyfactor-sample-jobcompletionhandler`), ported.
//!
//! For inventory jobs it asks the Keyfactor Command API for the job's history,
//! `GET OrchestratorJobs/JobHistory?pq.queryString=JobID -eq "<JobId>"`, and logs what came back.
//! Other jobs are skipped. The engine's Keyfactor identity needs the *Agent Management Read*
//! permission, like the App Pool account of the .NET sample.
//!
//! Keyfactor runs handlers before the history row of the run that just finished is final (the
//! sample's own trace shows it still `InProcess`), so the row for this run is logged as
//! reported, not trusted: the job's own result is `Context::job_result`.

use jobhook_sdk::serde_json::Value;
use jobhook_sdk::{
    Context, Error, Handler, OperationType, Result, debug, export_handler, info, job_history,
    keyfactor,
};

/// The API path the sample queries, relative to the Keyfactor API base.
pub const JOB_HISTORY_PATH: &str = "OrchestratorJobs/JobHistory";

/// How many history rows are logged one by one; the rest are counted.
pub const MAX_ROWS_LOGGED: usize = 25;

/// Whether the job is an inventory job: its type ends in `Inventory` (e.g. `WinCertInventory`,
/// any case) or its operation type is `Inventory`. (Keyfactor reports `Unknown` as the operation
/// type of store inventories, so the job type name is the usual signal.)
pub fn is_inventory(ctx: &Context) -> bool {
    ctx.operation_type == OperationType::Inventory
        || ctx.job_type.to_ascii_lowercase().ends_with("inventory")
}

/// The `pq.queryString` that selects this job's history rows.
pub fn history_query(ctx: &Context) -> String {
    format!("JobID -eq \"{}\"", ctx.job_id.hyphenated())
}

/// Looks up and logs the JobHistory of inventory jobs.
pub struct JobHistoryLookup;

impl Handler for JobHistoryLookup {
    fn run(ctx: &Context) -> Result<()> {
        if !is_inventory(ctx) {
            info!(
                "{} job {} ({}) is not an inventory job: skipped",
                ctx.job_type, ctx.job_id, ctx.operation_type
            );
            return Ok(());
        }
        debug!(
            "inventory job {} on {} ended {}",
            ctx.job_id, ctx.client_machine, ctx.job_result
        );

        let lookup = || format!("looking up the JobHistory of job {}", ctx.job_id);
        let response = keyfactor::Request::get(JOB_HISTORY_PATH)
            .query("pq.queryString", history_query(ctx))
            .send()
            .map_err(|e| e.context(lookup()))?;
        if response.status == 403 {
            return Err(Error::new(format!(
                "{}: Keyfactor answered 403 Forbidden: the identity jobhook uses for the Keyfactor \
                 API needs the Agent Management Read permission",
                lookup()
            )));
        }
        let rows: Value = response
            .error_for_status()
            .and_then(|r| r.json())
            .map_err(|e| e.context(lookup()))?;
        let Value::Array(rows) = rows else {
            return Err(Error::new(format!(
                "{}: expected a JSON array of history rows, got {}",
                lookup(),
                kind_of(&rows)
            )));
        };

        info!(
            "JobHistory for {} job {} on {}: {} row(s)",
            ctx.job_type,
            ctx.job_id,
            ctx.client_machine,
            rows.len()
        );
        for row in rows.iter().take(MAX_ROWS_LOGGED) {
            info!("{}", describe_row(row));
        }
        if rows.len() > MAX_ROWS_LOGGED {
            info!("... and {} more row(s)", rows.len() - MAX_ROWS_LOGGED);
        }
        Ok(())
    }
}

export_handler!(JobHistoryLookup);

/// One history row as a log line: `JobHistoryId 2171: Result Unknown, Status InProcess,
/// OperationStart 2023-05-06T00:30:00`. Missing fields print as `?`.
pub fn describe_row(row: &Value) -> String {
    let id = row
        .get("JobHistoryId")
        .map_or_else(|| "?".to_string(), plain);
    let result = row.get("Result").map_or_else(
        || "?".to_string(),
        |v| name_or_number(v, job_history::result_name),
    );
    let status = row.get("Status").map_or_else(
        || "?".to_string(),
        |v| name_or_number(v, job_history::status_name),
    );
    let start = row
        .get("OperationStart")
        .map_or_else(|| "?".to_string(), plain);
    format!("JobHistoryId {id}: Result {result}, Status {status}, OperationStart {start}")
}

/// A JSON value without the quotes strings get from `Display`; `null` stays `null`.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A `Result`/`Status` value for the log: the documented name of a number
/// ([`job_history`]), else the value as sent (some versions send the names).
fn name_or_number(v: &Value, names: fn(i64) -> Option<&'static str>) -> String {
    match v.as_i64().and_then(names) {
        Some(name) => name.to_string(),
        None => plain(v),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook_sdk::log::Level;
    use jobhook_sdk::testing::{self, MockHost};
    use jobhook_sdk::{CapabilityError, Method};

    fn inventory() -> Context {
        testing::context_from_json(include_str!("../contexts/inventory.json"))
            .expect("inventory.json parses")
    }

    fn management_add() -> Context {
        testing::context_from_json(include_str!("../contexts/management-add.json"))
            .expect("management-add.json parses")
    }

    /// Two rows in the shape of the sample's trace: strings for Result/Status, then numbers.
    const HISTORY: &str = r#"[
        {"JobHistoryId": 2168, "AgentMachine": "orchestrator.kftrain.lab",
         "JobId": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90", "Schedule": {"Interval": {"Minutes": 1}},
         "JobType": "WinCertInventory", "OperationStart": "2023-05-06T00:27:00",
         "OperationEnd": "2023-05-06T00:27:01", "Message": "", "Result": "Success",
         "Status": "Completed", "StorePath": "My", "ClientMachine": "iistarget.kftrain.lab"},
        {"JobHistoryId": 2171, "OperationStart": "2023-05-06T00:30:00", "OperationEnd": null,
         "Result": 0, "Status": 2}
    ]"#;

    #[test]
    fn inventory_job_queries_history_and_logs_rows() {
        let host = MockHost::new().keyfactor_response(200, HISTORY).install();
        assert_eq!(
            testing::run_handler::<JobHistoryLookup>(&inventory()),
            Ok(())
        );

        let calls = host.keyfactor_requests();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].method, Method::Get);
        assert_eq!(calls[0].path, "OrchestratorJobs/JobHistory");
        assert_eq!(
            calls[0].query,
            [(
                "pq.queryString".to_string(),
                r#"JobID -eq "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90""#.to_string()
            )]
        );
        assert_eq!(calls[0].body, None);

        let info = host.logs_at(Level::Info);
        assert_eq!(
            info,
            [
                "JobHistory for WinCertInventory job 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90 on orchestrator.kftrain.lab: 2 row(s)",
                "JobHistoryId 2168: Result Success, Status Completed, OperationStart 2023-05-06T00:27:00",
                "JobHistoryId 2171: Result Unknown, Status InProcess, OperationStart 2023-05-06T00:30:00",
            ]
        );
    }

    #[test]
    fn operation_type_inventory_also_counts() {
        let ctx = Context {
            job_type: "CustomScan".into(),
            operation_type: OperationType::Inventory,
            ..management_add()
        };
        assert!(is_inventory(&ctx));
        assert!(is_inventory(&Context {
            job_type: "k8sSecretINVENTORY".into(),
            ..management_add()
        }));
        assert!(!is_inventory(&management_add()));
    }

    #[test]
    fn management_jobs_are_skipped() {
        let host = MockHost::new().install();
        assert_eq!(
            testing::run_handler::<JobHistoryLookup>(&management_add()),
            Ok(())
        );
        assert!(host.keyfactor_requests().is_empty());
        assert!(host.logged("WinCertManagement job 426ec1ab-9d3e-4b8f-a2c6-71e5f0d4b9a3 (Add) is not an inventory job: skipped"));
    }

    #[test]
    fn server_error_fails_with_status_and_body() {
        let _host = MockHost::new()
            .keyfactor_response(
                500,
                r#"{"ErrorCode":"0xA0140001","Message":"database unavailable"}"#,
            )
            .install();
        let reason = testing::run_handler::<JobHistoryLookup>(&inventory()).unwrap_err();
        assert!(reason.starts_with("looking up the JobHistory of job 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90: HTTP status 500"), "{reason}");
        assert!(reason.contains("database unavailable"), "{reason}");
    }

    #[test]
    fn forbidden_names_the_permission() {
        let _host = MockHost::new().keyfactor_response(403, "").install();
        let reason = testing::run_handler::<JobHistoryLookup>(&inventory()).unwrap_err();
        assert!(reason.contains("Agent Management Read"), "{reason}");
    }

    #[test]
    fn capability_error_fails_with_its_reason() {
        let _host = MockHost::new()
            .keyfactor_error(CapabilityError::NotGranted(
                "keyfactor is not granted to this handler".into(),
            ))
            .install();
        let reason = testing::run_handler::<JobHistoryLookup>(&inventory()).unwrap_err();
        assert_eq!(
            reason,
            "looking up the JobHistory of job 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90: keyfactor GET \
             OrchestratorJobs/JobHistory: not granted: keyfactor is not granted to this handler"
        );

        // Nothing configured at all: NotAvailable, still a clean failure.
        let _host = MockHost::new().install();
        let reason = testing::run_handler::<JobHistoryLookup>(&inventory()).unwrap_err();
        assert!(reason.contains("not available"), "{reason}");
    }

    #[test]
    fn unexpected_bodies_fail_cleanly() {
        let _host = MockHost::new()
            .keyfactor_response(200, "<html>login</html>")
            .keyfactor_response(200, r#"{"Message":"paged"}"#)
            .install();
        let reason = testing::run_handler::<JobHistoryLookup>(&inventory()).unwrap_err();
        assert!(reason.contains("not the expected JSON"), "{reason}");
        let reason = testing::run_handler::<JobHistoryLookup>(&inventory()).unwrap_err();
        assert!(
            reason.ends_with("expected a JSON array of history rows, got an object"),
            "{reason}"
        );
    }

    #[test]
    fn many_rows_are_bounded_in_the_log() {
        let rows: Vec<Value> = (0..40)
            .map(|i| jobhook_sdk::serde_json::json!({"JobHistoryId": i}))
            .collect();
        let body = Value::Array(rows).to_string();
        let host = MockHost::new().keyfactor_response(200, body).install();
        assert_eq!(
            testing::run_handler::<JobHistoryLookup>(&inventory()),
            Ok(())
        );
        let info = host.logs_at(Level::Info);
        assert_eq!(info.len(), 1 + MAX_ROWS_LOGGED + 1);
        assert_eq!(
            info.last().map(String::as_str),
            Some("... and 15 more row(s)")
        );
        assert!(info[1].ends_with("Result ?, Status ?, OperationStart ?"));
    }

    #[test]
    fn unknown_numbers_print_as_numbers() {
        let row = jobhook_sdk::serde_json::json!({"JobHistoryId": 1, "Result": 9, "Status": "Weird", "OperationStart": null});
        assert_eq!(
            describe_row(&row),
            "JobHistoryId 1: Result 9, Status Weird, OperationStart null"
        );
        // The API documents no Result 1: it is shown as the number, not given a name.
        let row = jobhook_sdk::serde_json::json!({"JobHistoryId": 2, "Result": 1, "Status": 5, "OperationStart": null});
        assert_eq!(
            describe_row(&row),
            "JobHistoryId 2: Result 1, Status CompletedWillRetry, OperationStart null"
        );
    }
}
