//! The job context a handler receives: Keyfactor's `OrchestratorJobCompleteHandlerContext` with
//! idiomatic Rust types.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::Error;

/// Everything Keyfactor Command tells a job complete handler about the job that just finished.
///
/// Field for field the .NET `OrchestratorJobCompleteHandlerContext` (its `Client` is replaced by
/// the [`keyfactor`](crate::keyfactor) module). The fields are public so tests can build contexts
/// with struct update syntax: `Context { job_result: JobResult::Failure, ..testing::context() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// `AgentId`: the orchestrator that ran the job.
    pub agent_id: Uuid,
    /// `Username`: the account the orchestrator authenticated as (e.g. `KFTRAIN\SVC_Orchestrator`).
    pub username: String,
    /// `ClientMachine`: the orchestrator's name, usually an FQDN.
    pub client_machine: String,
    /// `JobResult`: the final status of the job.
    pub job_result: JobResult,
    /// `JobId`: the same for recurring jobs (e.g. inventory), new for one-time jobs.
    pub job_id: Uuid,
    /// `JobType`: store type short name + capability, e.g. `WinCertInventory`.
    pub job_type: String,
    /// `JobTypeId`: the job type GUID (unique per Keyfactor instance for store types).
    pub job_type_id: Uuid,
    /// `OperationType`: e.g. `Add`/`Remove` for management jobs; inventory jobs report `Unknown`.
    pub operation_type: OperationType,
    /// `CertificateId`: Keyfactor's id of the certificate concerned, if any.
    pub certificate_id: Option<i32>,
    /// `RequestTimestamp`: when the job was requested, if known.
    pub request_timestamp: Option<DateTime<Utc>>,
    /// `CurrentRetryCount`: 0 on the first run, +1 on each automatic reschedule of a failed job.
    pub current_retry_count: i32,
}

/// Keyfactor's `OrchestratorJobStatusJobResult`: how the job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum JobResult {
    /// `Unknown` (0): also what any unrecognised wire number becomes.
    #[default]
    Unknown,
    /// `InProcess` (1).
    InProcess,
    /// `Success` (2).
    Success,
    /// `Warning` (3).
    Warning,
    /// `Failure` (4).
    Failure,
}

/// Keyfactor's `CertStoreOperationType`: what a certificate store job did.
///
/// Inventory and reenrollment jobs usually report `Unknown`; management jobs report `Add` or
/// `Remove`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OperationType {
    /// `Unknown` (0): also what any unrecognised wire number becomes.
    #[default]
    Unknown,
    /// `Inventory` (1).
    Inventory,
    /// `Add` (2).
    Add,
    /// `Remove` (3).
    Remove,
    /// `Create` (4).
    Create,
    /// `CreateAdd` (5).
    CreateAdd,
    /// `Reenrollment` (6).
    Reenrollment,
    /// `Discovery` (7).
    Discovery,
    /// `SetPassword` (8).
    SetPassword,
    /// `FetchLogs` (9).
    FetchLogs,
}

/// Implements `number`, `from_number`, `name`, `Display` and a case-insensitive `FromStr` for a
/// fieldless enum from one table, so the three stay in step.
macro_rules! keyfactor_enum {
    ($ty:ident, $what:literal, { $($variant:ident = $num:literal),+ $(,)? }) => {
        impl $ty {
            /// Every value, in Keyfactor's numeric order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// Keyfactor's numeric value (as the Command API and the agent protocol use it).
            pub fn number(self) -> i32 {
                match self { $($ty::$variant => $num),+ }
            }

            /// The value for Keyfactor's number `n`; numbers Keyfactor does not define give
            /// `Unknown` rather than an error, so a newer Keyfactor never loses an event.
            pub fn from_number(n: i64) -> Self {
                match n { $($num => $ty::$variant,)+ _ => $ty::Unknown }
            }

            /// The .NET member name, e.g. `"Failure"`.
            pub fn name(self) -> &'static str {
                match self { $($ty::$variant => stringify!($variant)),+ }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = Error;

            /// Parses the .NET member name, ignoring ASCII case, or its number.
            fn from_str(s: &str) -> Result<Self, Error> {
                let s = s.trim();
                if let Ok(n) = s.parse::<i64>() {
                    return Ok(Self::from_number(n));
                }
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name().eq_ignore_ascii_case(s))
                    .ok_or_else(|| Error::new(format!("'{s}' is not a {}", $what)))
            }
        }
    };
}

keyfactor_enum!(JobResult, "job result (Unknown, InProcess, Success, Warning, Failure)", {
    Unknown = 0,
    InProcess = 1,
    Success = 2,
    Warning = 3,
    Failure = 4,
});

keyfactor_enum!(OperationType, "operation type (Unknown, Inventory, Add, Remove, Create, CreateAdd, Reenrollment, Discovery, SetPassword, FetchLogs)", {
    Unknown = 0,
    Inventory = 1,
    Add = 2,
    Remove = 3,
    Create = 4,
    CreateAdd = 5,
    Reenrollment = 6,
    Discovery = 7,
    SetPassword = 8,
    FetchLogs = 9,
});

/// Parses a GUID the way the context conversion does: any form `uuid` accepts, and
/// [`Uuid::nil()`] for anything else, so a malformed value can never fail a delivery.
pub(crate) fn guid_or_nil(text: &str) -> Uuid {
    Uuid::parse_str(text.trim()).unwrap_or(Uuid::nil())
}

/// Converts WIT `datetime` parts to a UTC time; `None` when the instant is outside chrono's range
/// or `nanoseconds` is not below one second.
pub(crate) fn datetime_from_parts(seconds: i64, nanoseconds: u32) -> Option<DateTime<Utc>> {
    if nanoseconds >= 1_000_000_000 {
        return None;
    }
    DateTime::from_timestamp(seconds, nanoseconds)
}

/// The WIT `job-context` record with plain types, so the conversion into [`Context`] is one
/// total, natively tested function; the wasm export only moves fields into this struct.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawContext {
    pub agent_id: String,
    pub username: String,
    pub client_machine: String,
    pub job_result: JobResult,
    pub job_id: String,
    pub job_type: String,
    pub job_type_id: String,
    pub operation_type: OperationType,
    pub certificate_id: Option<i32>,
    /// `(seconds, nanoseconds)` since the Unix epoch.
    pub request_timestamp: Option<(i64, u32)>,
    pub current_retry_count: i32,
}

impl From<RawContext> for Context {
    fn from(raw: RawContext) -> Self {
        Context {
            agent_id: guid_or_nil(&raw.agent_id),
            username: raw.username,
            client_machine: raw.client_machine,
            job_result: raw.job_result,
            job_id: guid_or_nil(&raw.job_id),
            job_type: raw.job_type,
            job_type_id: guid_or_nil(&raw.job_type_id),
            operation_type: raw.operation_type,
            certificate_id: raw.certificate_id,
            request_timestamp: raw
                .request_timestamp
                .and_then(|(s, n)| datetime_from_parts(s, n)),
            current_retry_count: raw.current_retry_count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_follow_keyfactor() {
        let results: Vec<(i32, String)> = JobResult::ALL
            .iter()
            .map(|r| (r.number(), r.to_string()))
            .collect();
        assert_eq!(
            results,
            [
                (0, "Unknown"),
                (1, "InProcess"),
                (2, "Success"),
                (3, "Warning"),
                (4, "Failure")
            ]
            .map(|(n, s)| (n, s.to_string()))
        );
        for (i, op) in OperationType::ALL.iter().enumerate() {
            assert_eq!(op.number() as usize, i);
            assert_eq!(OperationType::from_number(i as i64), *op);
        }
        assert_eq!(OperationType::CreateAdd.to_string(), "CreateAdd");
        assert_eq!(OperationType::FetchLogs.number(), 9);
    }

    #[test]
    fn unknown_numbers_become_unknown() {
        assert_eq!(JobResult::from_number(7), JobResult::Unknown);
        assert_eq!(JobResult::from_number(-1), JobResult::Unknown);
        assert_eq!(OperationType::from_number(10), OperationType::Unknown);
    }

    #[test]
    fn from_str_accepts_names_any_case_and_numbers() {
        assert_eq!("failure".parse::<JobResult>(), Ok(JobResult::Failure));
        assert_eq!(" Success ".parse::<JobResult>(), Ok(JobResult::Success));
        assert_eq!("4".parse::<JobResult>(), Ok(JobResult::Failure));
        assert_eq!(
            "createadd".parse::<OperationType>(),
            Ok(OperationType::CreateAdd)
        );
        let err = "Exploded".parse::<JobResult>().unwrap_err();
        assert!(
            err.to_string().contains("'Exploded' is not a job result"),
            "{err}"
        );
    }

    fn raw() -> RawContext {
        RawContext {
            agent_id: "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11".into(),
            username: r"KFTRAIN\SVC_Orchestrator".into(),
            client_machine: "orchestrator.kftrain.lab".into(),
            job_result: JobResult::Failure,
            job_id: "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90".into(),
            job_type: "WinCertInventory".into(),
            job_type_id: "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c".into(),
            operation_type: OperationType::Unknown,
            certificate_id: Some(14),
            request_timestamp: Some((1_683_155_928, 0)),
            current_retry_count: 2,
        }
    }

    #[test]
    fn converts_a_well_formed_record() {
        let ctx = Context::from(raw());
        assert_eq!(
            ctx.agent_id.to_string(),
            "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11"
        );
        assert_eq!(
            ctx.job_type_id.to_string(),
            "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c"
        );
        assert_eq!(ctx.job_result, JobResult::Failure);
        assert_eq!(ctx.certificate_id, Some(14));
        assert_eq!(
            ctx.request_timestamp.map(|t| t.to_rfc3339()),
            Some("2023-05-03T23:18:48+00:00".to_string())
        );
        assert_eq!(ctx.current_retry_count, 2);
    }

    #[test]
    fn bad_guids_become_nil_and_never_panic() {
        let mut r = raw();
        r.agent_id = "not-a-guid".into();
        r.job_id = String::new();
        r.job_type_id = "{49B3A17D-5F1C-4A0E-9C2B-7D8E1F2A3B4C}".into();
        let ctx = Context::from(r);
        assert!(ctx.agent_id.is_nil());
        assert!(ctx.job_id.is_nil());
        // Braced upper-case GUIDs are still GUIDs.
        assert_eq!(
            ctx.job_type_id.to_string(),
            "49b3a17d-5f1c-4a0e-9c2b-7d8e1f2a3b4c"
        );
    }

    #[test]
    fn out_of_range_datetimes_become_none() {
        for parts in [
            (i64::MAX, 0),
            (i64::MIN, 0),
            (0, 1_000_000_000),
            (0, u32::MAX),
        ] {
            let mut r = raw();
            r.request_timestamp = Some(parts);
            assert_eq!(Context::from(r).request_timestamp, None, "{parts:?}");
        }
        let mut r = raw();
        r.request_timestamp = Some((-1, 999_999_999));
        assert!(Context::from(r).request_timestamp.is_some());
    }
}
