//! `POST OrchestratorJobs/Acknowledge`, as the Command API documents it (KFDOCS
//! `OrchestratorJobsPOSTAcknowledge.htm`; the request model `AcknowledgeJobRequest` of
//! `keyfactor-go-client-sdk`):
//!
//! - the body is `{"JobAuditIds": [<integer>, …]}` or `{"Query": "<query>"}` — "either a list of
//!   one or more JobAuditIds or a Query is required, but not both";
//! - a run is eligible when its `Result` is Failure (4) or Warning (3) and its `Status` is
//!   Completed (3) or CompletedWillRetry (5); acknowledging sets `Status` to Acknowledged (4);
//! - success is `204 No Content`.
//!
//! What the stand-in decides on its own, stricter than the documentation says Command is (so a
//! handler's mistake shows up in a test instead of in production): the request must say
//! `Content-Type: application/json`; keys other than the two are refused; every JobAuditId
//! must be the `JobHistoryId` of a row (the docs point at JobHistory for the ids; the field
//! name differs, so this mapping is inferred) and eligible; a `Query` is a JobHistory
//! `pq.queryString` ([`crate::query`]) and acknowledges the eligible rows it selects. Every
//! refusal is a 400 whose message says what is wrong.

use axum::http::{HeaderMap, header};
use serde_json::Value;

use crate::query::{MAX_RETURN_LIMIT, Query};

/// Most ids one request may name; a handler acknowledges a few runs at a time.
pub const MAX_IDS: usize = 1000;

/// `Result` values a run can be acknowledged for: Warning, Failure.
const ELIGIBLE_RESULTS: [i64; 2] = [3, 4];

/// `Status` values a run can be acknowledged in: Completed, CompletedWillRetry.
const ELIGIBLE_STATUSES: [i64; 2] = [3, 5];

/// `Status` Acknowledged.
const ACKNOWLEDGED: i64 = 4;

/// Checks the request and acknowledges the runs it names in `history`; the error is the message
/// of the 400 answer. Nothing changes unless every named run can be acknowledged.
pub fn acknowledge(
    headers: &HeaderMap,
    body: &[u8],
    history: &mut [Value],
    agents: &[Value],
) -> Result<(), String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return Err(format!(
            "The request body must be application/json, not '{content_type}'."
        ));
    }
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| format!("The request body is not valid JSON ({e})."))?;
    let Value::Object(fields) = request else {
        return Err("The request body must be a JSON object.".into());
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !k.eq_ignore_ascii_case("JobAuditIds") && !k.eq_ignore_ascii_case("Query"))
    {
        return Err(format!(
            "Unknown field '{unknown}': the request takes JobAuditIds or Query."
        ));
    }
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    };
    let indexes = match (get("JobAuditIds"), get("Query")) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(
                "Either a list of one or more JobAuditIds or a Query is required, but not both."
                    .into(),
            );
        }
        (Some(ids), None) => by_ids(ids, history)?,
        (None, Some(query)) => by_query(query, history, agents)?,
    };
    for &i in &indexes {
        if let Some(row) = history.get_mut(i) {
            row["Status"] = Value::from(ACKNOWLEDGED);
        }
    }
    Ok(())
}

fn number(row: &Value, key: &str) -> Option<i64> {
    row.get(key).and_then(Value::as_i64)
}

fn eligible(row: &Value) -> bool {
    number(row, "Result").is_some_and(|r| ELIGIBLE_RESULTS.contains(&r))
        && number(row, "Status").is_some_and(|s| ELIGIBLE_STATUSES.contains(&s))
}

/// The rows named by `JobAuditIds`: a non-empty array of integers, each an eligible run.
fn by_ids(ids: &Value, history: &[Value]) -> Result<Vec<usize>, String> {
    let Value::Array(ids) = ids else {
        return Err("JobAuditIds must be an array of integers.".into());
    };
    if ids.is_empty() {
        return Err("JobAuditIds must list at least one id.".into());
    }
    if ids.len() > MAX_IDS {
        return Err(format!("JobAuditIds lists more than {MAX_IDS} ids."));
    }
    let mut indexes = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(id) = id.as_i64() else {
            return Err(format!("JobAuditIds must be integers; got {id}."));
        };
        let Some(index) = history
            .iter()
            .position(|row| number(row, "JobHistoryId") == Some(id))
        else {
            return Err(format!("No orchestrator job with the ID {id} was found."));
        };
        if history.get(index).is_none_or(|row| !eligible(row)) {
            return Err(format!(
                "The orchestrator job with the ID {id} cannot be acknowledged: only jobs with a \
                 result of Failed or Warning and a status of Completed or CompletedWillRetry can."
            ));
        }
        indexes.push(index);
    }
    Ok(indexes)
}

/// The eligible rows a JobHistory query selects.
fn by_query(query: &Value, history: &[Value], agents: &[Value]) -> Result<Vec<usize>, String> {
    let Value::String(query) = query else {
        return Err("Query must be a string.".into());
    };
    if query.trim().is_empty() {
        return Err("Query must not be empty.".into());
    }
    let pairs = [
        ("pq.queryString".to_owned(), query.clone()),
        ("pq.returnLimit".to_owned(), MAX_RETURN_LIMIT.to_string()),
    ];
    let selected = Query::from_pairs(&pairs)?.apply(history, agents);
    Ok(selected
        .iter()
        .filter(|row| eligible(row))
        .filter_map(|row| {
            let id = number(row, "JobHistoryId")?;
            history
                .iter()
                .position(|r| number(r, "JobHistoryId") == Some(id))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{self, Dataset};
    use axum::http::HeaderValue;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        h
    }

    fn status(history: &[Value], id: i64) -> i64 {
        history
            .iter()
            .find(|r| number(r, "JobHistoryId") == Some(id))
            .and_then(|r| number(r, "Status"))
            .unwrap()
    }

    #[test]
    fn ids_of_eligible_runs_are_acknowledged() {
        let data = Dataset::seeded();
        let mut history = data.job_history.clone();
        acknowledge(
            &json_headers(),
            br#"{"JobAuditIds": [2175, 2160]}"#,
            &mut history,
            &data.agents,
        )
        .unwrap();
        assert_eq!(status(&history, 2175), ACKNOWLEDGED);
        assert_eq!(status(&history, 2160), ACKNOWLEDGED);
        assert_eq!(status(&history, 2164), 5, "not named, not changed");
        // Acknowledged runs cannot be acknowledged again.
        let again = acknowledge(
            &json_headers(),
            br#"{"JobAuditIds": [2175]}"#,
            &mut history,
            &data.agents,
        );
        assert!(again.unwrap_err().contains("cannot be acknowledged"));
    }

    #[test]
    fn a_query_acknowledges_the_eligible_rows_it_selects() {
        let data = Dataset::seeded();
        let mut history = data.job_history.clone();
        let body =
            serde_json::json!({"Query": format!("JobId -eq \"{}\"", data::INVENTORY_JOB_ID)});
        acknowledge(
            &json_headers(),
            body.to_string().as_bytes(),
            &mut history,
            &data.agents,
        )
        .unwrap();
        assert_eq!(status(&history, 2170), ACKNOWLEDGED, "the Warning run");
        assert_eq!(status(&history, 2171), 2, "InProcess stays");
        assert_eq!(status(&history, 2169), 3, "Success stays");
    }

    #[test]
    fn every_wrong_shape_is_refused_and_changes_nothing() {
        let data = Dataset::seeded();
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (b"[2175]", "JSON object"),
            (br#"{}"#, "Either a list"),
            (
                br#"{"JobAuditIds": [2175], "Query": "JobId -eq \"x\""}"#,
                "but not both",
            ),
            (br#"{"JobAuditIds": []}"#, "at least one"),
            (br#"{"JobAuditIds": "2175"}"#, "array of integers"),
            (br#"{"JobAuditIds": ["2175"]}"#, "must be integers"),
            (
                br#"{"JobAuditIds": [424242]}"#,
                "No orchestrator job with the ID 424242",
            ),
            (
                br#"{"JobAuditIds": [2175, 2168]}"#,
                "2168 cannot be acknowledged",
            ),
            (br#"{"JobIds": [2175]}"#, "Unknown field 'JobIds'"),
            (br#"{"Query": 5}"#, "Query must be a string"),
            (
                br#"{"Query": "JobHistoryId -eq 2175"}"#,
                "not a valid query field",
            ),
        ];
        for (body, expected) in cases {
            let mut history = data.job_history.clone();
            let err = acknowledge(&json_headers(), body, &mut history, &data.agents).unwrap_err();
            assert!(
                err.contains(expected),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(history, data.job_history, "nothing changed");
        }
        let mut history = data.job_history.clone();
        let err = acknowledge(
            &HeaderMap::new(),
            br#"{"JobAuditIds": [2175]}"#,
            &mut history,
            &data.agents,
        )
        .unwrap_err();
        assert!(err.contains("application/json"), "{err}");
    }
}
