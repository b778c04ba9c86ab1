//! The codes of Keyfactor Command's `GET /OrchestratorJobs/JobHistory` rows.
//!
//! The Command API documents `Result` and `Status` as numbers ("Result: 4-Failure, 3-Warning,
//! 2-Success, 0-Unknown"; "Status: 4-Acknowledged, 3-Completed, 2-InProcess, 1-Waiting,
//! 0-Unknown, 5-CompletedWillRetry"), while some versions send the names instead (Keyfactor's
//! sample handler trace shows `"Result":"Unknown","Status":"InProcess"`). [`result_code`] and
//! [`status_code`] read either form into the documented number, so every handler that reads the
//! history agrees on what a row says.
//!
//! No `Result` 1 is documented for JobHistory, though Keyfactor's Python client (generated from
//! Command's API description) declares the numbers 0 to 4 for it; what 1 means is not
//! documented (the orchestrator protocol's "in process", perhaps), so it has no name here: it
//! reads as the number it is.

use serde_json::Value;

/// `Result` 0: the job has not reported a result (yet).
pub const RESULT_UNKNOWN: i64 = 0;
/// `Result` 2.
pub const RESULT_SUCCESS: i64 = 2;
/// `Result` 3.
pub const RESULT_WARNING: i64 = 3;
/// `Result` 4.
pub const RESULT_FAILURE: i64 = 4;

/// `Status` 0.
pub const STATUS_UNKNOWN: i64 = 0;
/// `Status` 1: scheduled, not started.
pub const STATUS_WAITING: i64 = 1;
/// `Status` 2: running; also what a handler often sees for the run that just finished, because
/// Command runs handlers before that row is final.
pub const STATUS_IN_PROCESS: i64 = 2;
/// `Status` 3.
pub const STATUS_COMPLETED: i64 = 3;
/// `Status` 4: an administrator (or a handler) acknowledged the run.
pub const STATUS_ACKNOWLEDGED: i64 = 4;
/// `Status` 5: the run failed and Command will retry the job.
pub const STATUS_COMPLETED_WILL_RETRY: i64 = 5;

/// The documented `Result` names and numbers.
pub const RESULTS: &[(&str, i64)] = &[
    ("Unknown", RESULT_UNKNOWN),
    ("Success", RESULT_SUCCESS),
    ("Warning", RESULT_WARNING),
    ("Failure", RESULT_FAILURE),
];

/// The documented `Status` names and numbers.
pub const STATUSES: &[(&str, i64)] = &[
    ("Unknown", STATUS_UNKNOWN),
    ("Waiting", STATUS_WAITING),
    ("InProcess", STATUS_IN_PROCESS),
    ("Completed", STATUS_COMPLETED),
    ("Acknowledged", STATUS_ACKNOWLEDGED),
    ("CompletedWillRetry", STATUS_COMPLETED_WILL_RETRY),
];

/// A row's `Result` as its number: a JSON number, a documented name (any case), or a number
/// written as a string. `None` for anything else.
pub fn result_code(value: &Value) -> Option<i64> {
    code(value, RESULTS)
}

/// A row's `Status` as its number, read like [`result_code`].
pub fn status_code(value: &Value) -> Option<i64> {
    code(value, STATUSES)
}

/// The documented name of `Result` number `n`.
pub fn result_name(n: i64) -> Option<&'static str> {
    name(n, RESULTS)
}

/// The documented name of `Status` number `n`.
pub fn status_name(n: i64) -> Option<&'static str> {
    name(n, STATUSES)
}

fn code(value: &Value, names: &[(&str, i64)]) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let s = s.trim();
            names
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(s))
                .map(|(_, n)| *n)
                .or_else(|| s.parse().ok())
        }
        _ => None,
    }
}

fn name(n: i64, names: &[(&'static str, i64)]) -> Option<&'static str> {
    names
        .iter()
        .find(|(_, number)| *number == n)
        .map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_numbers_read_alike() {
        for (name, n) in RESULTS {
            assert_eq!(result_code(&json!(name)), Some(*n));
            assert_eq!(result_code(&json!(name.to_uppercase())), Some(*n));
            assert_eq!(result_code(&json!(n)), Some(*n));
            assert_eq!(result_name(*n), Some(*name));
        }
        for (name, n) in STATUSES {
            assert_eq!(status_code(&json!(format!(" {name} "))), Some(*n));
            assert_eq!(status_code(&json!(n.to_string())), Some(*n));
            assert_eq!(status_name(*n), Some(*name));
        }
    }

    #[test]
    fn undocumented_values_have_no_name() {
        assert_eq!(result_name(1), None);
        assert_eq!(result_code(&json!(1)), Some(1));
        assert_eq!(result_code(&json!("InProcess")), None);
        assert_eq!(status_name(6), None);
        for value in [
            json!(null),
            json!(true),
            json!([4]),
            json!({}),
            json!(2.5),
            json!(""),
        ] {
            assert_eq!(result_code(&value), None, "{value}");
            assert_eq!(status_code(&value), None, "{value}");
        }
    }
}
