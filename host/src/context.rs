//! The job context a handler receives, and its decoding from Keyfactor-style JSON.
//!
//! The JSON uses the field names of Keyfactor's `OrchestratorJobCompleteHandlerContext`
//! (`AgentId`, `JobResult`, ...). Field names are matched case-insensitively so that both the
//! .NET names and a camelCase serialisation are accepted. Enums are accepted by name
//! (case-insensitive) or by Keyfactor's number; an unknown *number* decodes to `Unknown` so that
//! a newer Keyfactor never makes an event undeliverable, while an unknown *name* is an error
//! (it is far more likely a typo than a new enum member).
//!
//! Every byte of the input is untrusted: sizes are bounded, errors name the field and say what
//! was expected, and nothing here panics.

use chrono::{DateTime, Datelike as _, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

/// Largest context document accepted, in bytes. A real context is a few hundred bytes; this
/// leaves room for long user and machine names while keeping a hostile body cheap to reject.
pub const MAX_CONTEXT_BYTES: usize = 64 * 1024;

/// Longest string field accepted, in bytes. Keyfactor's strings here are account names, host
/// names and job type names (FQDNs are at most 253 bytes); 4 KiB is generous and bounded.
pub const MAX_STRING_FIELD_BYTES: usize = 4 * 1024;

/// Final status of the job, mirroring Keyfactor's `OrchestratorJobStatusJobResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum JobResult {
    /// 0, and every number Keyfactor may add later.
    Unknown,
    /// 1: the job is still being processed (seen on the agent wire protocol).
    InProcess,
    /// 2
    Success,
    /// 3
    Warning,
    /// 4
    Failure,
}

impl JobResult {
    const NAMES: &'static [(&'static str, JobResult, i64)] = &[
        ("Unknown", JobResult::Unknown, 0),
        ("InProcess", JobResult::InProcess, 1),
        ("Success", JobResult::Success, 2),
        ("Warning", JobResult::Warning, 3),
        ("Failure", JobResult::Failure, 4),
    ];

    /// Keyfactor's numeric value.
    pub fn number(self) -> i64 {
        Self::NAMES
            .iter()
            .find(|(_, v, _)| *v == self)
            .map_or(0, |(_, _, n)| *n)
    }

    /// The .NET member name.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, v, _)| *v == self)
            .map_or("Unknown", |(n, _, _)| n)
    }

    /// Decodes a number; numbers Keyfactor does not (yet) define become `Unknown`.
    pub fn from_number(n: i64) -> Self {
        Self::NAMES
            .iter()
            .find(|(_, _, num)| *num == n)
            .map_or(JobResult::Unknown, |(_, v, _)| *v)
    }
}

/// The kind of certificate store operation, mirroring Keyfactor's `CertStoreOperationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OperationType {
    /// 0, and every number Keyfactor may add later. Inventory jobs report this.
    Unknown,
    /// 1
    Inventory,
    /// 2
    Add,
    /// 3
    Remove,
    /// 4
    Create,
    /// 5
    CreateAdd,
    /// 6 (by declaration order)
    Reenrollment,
    /// 7 (by declaration order)
    Discovery,
    /// 8 (by declaration order)
    SetPassword,
    /// 9 (by declaration order)
    FetchLogs,
}

impl OperationType {
    const NAMES: &'static [(&'static str, OperationType, i64)] = &[
        ("Unknown", OperationType::Unknown, 0),
        ("Inventory", OperationType::Inventory, 1),
        ("Add", OperationType::Add, 2),
        ("Remove", OperationType::Remove, 3),
        ("Create", OperationType::Create, 4),
        ("CreateAdd", OperationType::CreateAdd, 5),
        ("Reenrollment", OperationType::Reenrollment, 6),
        ("Discovery", OperationType::Discovery, 7),
        ("SetPassword", OperationType::SetPassword, 8),
        ("FetchLogs", OperationType::FetchLogs, 9),
    ];

    /// Keyfactor's numeric value.
    pub fn number(self) -> i64 {
        Self::NAMES
            .iter()
            .find(|(_, v, _)| *v == self)
            .map_or(0, |(_, _, n)| *n)
    }

    /// The .NET member name.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, v, _)| *v == self)
            .map_or("Unknown", |(n, _, _)| n)
    }

    /// Decodes a number; numbers Keyfactor does not (yet) define become `Unknown`.
    pub fn from_number(n: i64) -> Self {
        Self::NAMES
            .iter()
            .find(|(_, _, num)| *num == n)
            .map_or(OperationType::Unknown, |(_, v, _)| *v)
    }
}

/// All eleven fields of Keyfactor's `OrchestratorJobCompleteHandlerContext` (its `Client` is the
/// `keyfactor` capability instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobContext {
    /// `AgentId`: the orchestrator that ran the job.
    pub agent_id: Uuid,
    /// `Username`: the account the orchestrator authenticated as.
    pub username: String,
    /// `ClientMachine`: the orchestrator's name.
    pub client_machine: String,
    /// `JobResult`: the final status of the job.
    pub job_result: JobResult,
    /// `JobId`: the job (stable for recurring jobs).
    pub job_id: Uuid,
    /// `JobType`: e.g. `WinCertInventory`.
    pub job_type: String,
    /// `JobTypeId`: the job type GUID that handlers are routed by.
    pub job_type_id: Uuid,
    /// `OperationType`: e.g. `Add` for a management add job.
    pub operation_type: OperationType,
    /// `CertificateId`: Keyfactor's certificate id, when the job concerns one certificate.
    pub certificate_id: Option<i32>,
    /// `RequestTimestamp`: when the job was requested, when known.
    pub request_timestamp: Option<DateTime<Utc>>,
    /// `CurrentRetryCount`: 0 on the first run, incremented on each automatic reschedule.
    pub current_retry_count: i32,
}

/// Why a context document was refused. The message names the field and says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// The document is larger than [`MAX_CONTEXT_BYTES`].
    #[error("context is larger than the limit of {MAX_CONTEXT_BYTES} bytes")]
    TooLarge {
        /// Size of the refused document (as much of it as was read: at least one byte more
        /// than the limit).
        size: usize,
    },
    /// The document is not UTF-8 (JSON's encoding on the wire, RFC 8259 §8.1).
    #[error(
        "context is not UTF-8 (the first byte that is not, at offset {offset}, is {byte:#04x}): \
         send the JSON encoded as UTF-8 — Windows PowerShell 5.1 sends a string body as \
         ISO-8859-1; pass it bytes instead, [Text.Encoding]::UTF8.GetBytes($json)"
    )]
    NotUtf8 {
        /// Where the first invalid byte is.
        offset: usize,
        /// That byte.
        byte: u8,
    },
    /// The document is empty (or only whitespace).
    #[error("context is empty: send the job context as a JSON object")]
    Empty,
    /// The document is not JSON at all.
    #[error("context is not valid JSON: {0}")]
    Json(String),
    /// The document is JSON, but not an object.
    #[error(
        "context must be a JSON object with the fields AgentId, JobResult, JobId, ...; got {0}"
    )]
    NotAnObject(&'static str),
    /// A required field is absent.
    #[error("field `{0}` is missing{hint}", hint = default_omitted_hint(.0))]
    Missing(&'static str),
    /// A required field of a .NET value type (an enum, an integer, a GUID) is `null`, which
    /// such a field cannot be.
    #[error("field `{0}` is null; it is a .NET value type and always has a value: send it")]
    Null(&'static str),
    /// The same field appears twice under differently-cased names.
    #[error("field `{0}` is given more than once (field names are matched case-insensitively)")]
    Duplicate(&'static str),
    /// A field is present but its value is unusable.
    #[error("field `{field}`: {message}")]
    Invalid {
        /// The .NET name of the field.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// The eleven context fields, by their .NET names, in Keyfactor's declaration order.
pub const FIELDS: [&str; 11] = [
    "AgentId",
    "Username",
    "ClientMachine",
    "JobResult",
    "JobId",
    "JobType",
    "JobTypeId",
    "OperationType",
    "CertificateId",
    "RequestTimestamp",
    "CurrentRetryCount",
];

/// serde_json's error, with the context field it happened in when the text before it names one
/// (`number out of range at line 12 column 28` says nothing of `CurrentRetryCount`).
fn json_error_text(e: &serde_json::Error, bytes: &[u8]) -> String {
    let text = e.to_string();
    if e.line() == 0 {
        return text;
    }
    // The byte offset of the error's line and column (columns count bytes from 1).
    let line_start = if e.line() == 1 {
        Some(0)
    } else {
        bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(e.line() - 2)
            .map(|(i, _)| i + 1)
    };
    let Some(before) =
        line_start.and_then(|start| bytes.get(..(start + e.column()).min(bytes.len())))
    else {
        return text;
    };
    // The last member name before the error, `"Name"` followed by a colon, if the error lies in
    // its value still (no `,`, `}` or `]` after the colon).
    let field = String::from_utf8_lossy(before)
        .rsplit_once(':')
        .filter(|(_, value)| !value.contains([',', '}', ']']))
        .and_then(|(head, _)| head.trim_end().strip_suffix('"').map(str::to_owned))
        .and_then(|head| head.rsplit_once('"').map(|(_, name)| name.to_owned()))
        .and_then(|name| {
            FIELDS
                .iter()
                .find(|f| f.eq_ignore_ascii_case(&name))
                .copied()
        });
    match field {
        Some(field) => format!("field `{field}`: {text}"),
        None => text,
    }
}

/// The top-level names of a JSON object document that are none of the [`FIELDS`] (in any
/// case), each with the field it most likely misspells, if one is close: the decoder ignores
/// them (a sender may add its own), which for a context written by hand turns a typo into a
/// field silently absent. Empty for anything that is not an object.
pub fn unknown_fields(bytes: &[u8]) -> Vec<(String, Option<&'static str>)> {
    /// Smallest similarity (0 to 1, `strsim::normalized_damerau_levenshtein` of the lower-case
    /// names) at which a name is taken for a misspelling of a field.
    const MISSPELT_SIMILARITY: f64 = 0.75;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(bytes) else {
        return Vec::new();
    };
    object
        .keys()
        .filter(|key| !FIELDS.iter().any(|f| f.eq_ignore_ascii_case(key)))
        .map(|key| {
            let lower = key.to_ascii_lowercase();
            let nearest = FIELDS
                .iter()
                .map(|f| {
                    let similarity =
                        strsim::normalized_damerau_levenshtein(&lower, &f.to_ascii_lowercase());
                    (similarity, *f)
                })
                .filter(|(similarity, _)| *similarity >= MISSPELT_SIMILARITY)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, f)| f);
            (key.clone(), nearest)
        })
        .collect()
}

impl JobContext {
    /// Decodes a context from JSON bytes (see the module documentation for the format).
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, ContextError> {
        if bytes.len() > MAX_CONTEXT_BYTES {
            return Err(ContextError::TooLarge { size: bytes.len() });
        }
        // A byte order mark, as .NET's UTF-8 StreamWriter and Windows editors write one, is
        // ignored (RFC 8259 §8.1 allows it) rather than refused as "expected value at column 1".
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        if let Err(e) = std::str::from_utf8(bytes) {
            let offset = e.valid_up_to();
            return Err(ContextError::NotUtf8 {
                offset,
                byte: bytes.get(offset).copied().unwrap_or_default(),
            });
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ContextError::Empty);
        }
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ContextError::Json(json_error_text(&e, bytes)))?;
        if value.is_object() {
            // A parsed object keeps only the last of two equal keys: look at the document's
            // own keys, so that `{"JobId": a, "JobId": b}` is refused like two casings are.
            let keys: ObjectKeys =
                serde_json::from_slice(bytes).map_err(|e| ContextError::Json(e.to_string()))?;
            if let Some(field) = first_repeated_field(&keys.0) {
                return Err(ContextError::Duplicate(field));
            }
        }
        Self::from_json_value(&value)
    }

    /// Decodes a context from an already parsed JSON value.
    pub fn from_json_value(value: &Value) -> Result<Self, ContextError> {
        let object = match value {
            Value::Object(map) => map,
            other => return Err(ContextError::NotAnObject(json_kind(other))),
        };
        let fields = Fields::collect(object)?;
        Ok(JobContext {
            agent_id: fields.guid("AgentId")?,
            username: fields.string("Username")?,
            client_machine: fields.string("ClientMachine")?,
            job_result: fields.enumeration(
                "JobResult",
                JobResult::NAMES,
                JobResult::from_number,
            )?,
            job_id: fields.guid("JobId")?,
            job_type: fields.string("JobType")?,
            job_type_id: fields.guid("JobTypeId")?,
            operation_type: fields.enumeration(
                "OperationType",
                OperationType::NAMES,
                OperationType::from_number,
            )?,
            certificate_id: fields.optional_i32("CertificateId")?,
            request_timestamp: fields.optional_timestamp("RequestTimestamp")?,
            current_retry_count: fields.required_i32("CurrentRetryCount")?,
        })
    }

    /// Encodes the context as JSON with the .NET field names, the inverse of
    /// [`JobContext::from_json_value`].
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "AgentId": self.agent_id.to_string(),
            "Username": self.username,
            "ClientMachine": self.client_machine,
            "JobResult": self.job_result.name(),
            "JobId": self.job_id.to_string(),
            "JobType": self.job_type,
            "JobTypeId": self.job_type_id.to_string(),
            "OperationType": self.operation_type.name(),
            "CertificateId": self.certificate_id,
            "RequestTimestamp": self.request_timestamp.map(|t| t.to_rfc3339()),
            "CurrentRetryCount": self.current_retry_count,
        })
    }
}

/// The keys of a JSON object document as written, in order and with repeats (a parsed
/// [`Value`] keeps only the last of equal keys). Values are skipped, not kept.
struct ObjectKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for ObjectKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = ObjectKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ObjectKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(ObjectKeys(keys))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// The first known field that `keys` (in document order) name twice, exactly or under another
/// casing.
fn first_repeated_field(keys: &[String]) -> Option<&'static str> {
    let mut seen = [false; FIELDS.len()];
    for key in keys {
        let Some(index) = FIELDS.iter().position(|f| f.eq_ignore_ascii_case(key)) else {
            continue;
        };
        let slot = seen.get_mut(index)?;
        if *slot {
            return FIELDS.get(index).copied();
        }
        *slot = true;
    }
    None
}

/// The known fields of one document, looked up case-insensitively. Unknown fields are ignored so
/// that a newer Keyfactor that adds fields does not break delivery.
struct Fields<'a> {
    values: [Option<&'a Value>; FIELDS.len()],
}

impl<'a> Fields<'a> {
    fn collect(object: &'a Map<String, Value>) -> Result<Self, ContextError> {
        let mut values = [None; FIELDS.len()];
        for (key, value) in object {
            let Some(index) = FIELDS.iter().position(|f| f.eq_ignore_ascii_case(key)) else {
                continue;
            };
            let (Some(slot), Some(name)) = (values.get_mut(index), FIELDS.get(index)) else {
                continue;
            };
            if slot.is_some() {
                return Err(ContextError::Duplicate(name));
            }
            *slot = Some(value);
        }
        Ok(Fields { values })
    }

    /// The value of a field as given, `null` included; `None` when it is absent.
    fn raw(&self, field: &'static str) -> Option<&'a Value> {
        let index = FIELDS.iter().position(|f| *f == field)?;
        self.values.get(index).copied().flatten()
    }

    /// The value of a field, treating JSON `null` like absence.
    fn get(&self, field: &'static str) -> Option<&'a Value> {
        self.raw(field).filter(|v| !v.is_null())
    }

    /// The value of a required field of a .NET value type, which can be neither absent nor null.
    fn required(&self, field: &'static str) -> Result<&'a Value, ContextError> {
        match self.raw(field) {
            None => Err(ContextError::Missing(field)),
            Some(Value::Null) => Err(ContextError::Null(field)),
            Some(value) => Ok(value),
        }
    }

    fn guid(&self, field: &'static str) -> Result<Uuid, ContextError> {
        let text = self
            .required(field)?
            .as_str()
            .ok_or_else(|| ContextError::Invalid {
                field,
                message: format!(
                    "expected a GUID string, got {}",
                    json_kind(self.get(field).unwrap_or(&Value::Null))
                ),
            })?;
        parse_guid(text).ok_or_else(|| ContextError::Invalid {
            field,
            message: format!(
                "{:?} is not a GUID (expected e.g. \"fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11\")",
                truncate_for_message(text)
            ),
        })
    }

    /// A .NET `string` field: required to be present; `null` (which .NET allows) becomes "".
    fn string(&self, field: &'static str) -> Result<String, ContextError> {
        match self.raw(field) {
            None => Err(ContextError::Missing(field)),
            Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) if s.len() > MAX_STRING_FIELD_BYTES => {
                Err(ContextError::Invalid {
                    field,
                    message: format!(
                        "is {} bytes long; the limit is {MAX_STRING_FIELD_BYTES}",
                        s.len()
                    ),
                })
            }
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(ContextError::Invalid {
                field,
                message: format!("expected a string, got {}", json_kind(other)),
            }),
        }
    }

    fn enumeration<E: Copy>(
        &self,
        field: &'static str,
        names: &[(&'static str, E, i64)],
        from_number: fn(i64) -> E,
    ) -> Result<E, ContextError> {
        let allowed = || {
            names
                .iter()
                .map(|(n, _, num)| format!("{n} ({num})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.required(field)? {
            Value::Number(n) => match n.as_i64() {
                Some(n) => Ok(from_number(n)),
                None => Err(ContextError::Invalid {
                    field,
                    message: format!("{n} is not a whole number; expected one of {}", allowed()),
                }),
            },
            Value::String(s) => {
                let trimmed = s.trim();
                if let Some((_, v, _)) = names
                    .iter()
                    .find(|(n, _, _)| n.eq_ignore_ascii_case(trimmed))
                {
                    return Ok(*v);
                }
                if let Ok(n) = trimmed.parse::<i64>() {
                    return Ok(from_number(n));
                }
                Err(ContextError::Invalid {
                    field,
                    message: format!(
                        "{:?} is not a known name; expected one of {} (names are case-insensitive)",
                        truncate_for_message(s),
                        allowed()
                    ),
                })
            }
            other => Err(ContextError::Invalid {
                field,
                message: format!("expected a name or number, got {}", json_kind(other)),
            }),
        }
    }

    fn int(field: &'static str, value: &Value) -> Result<i32, ContextError> {
        let number = match value {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            other => {
                return Err(ContextError::Invalid {
                    field,
                    message: format!("expected a whole number, got {}", json_kind(other)),
                });
            }
        };
        number
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| ContextError::Invalid {
                field,
                message: format!(
                    "{} is not a whole number in the 32-bit range",
                    truncate_for_message(&value.to_string())
                ),
            })
    }

    fn required_i32(&self, field: &'static str) -> Result<i32, ContextError> {
        Self::int(field, self.required(field)?)
    }

    fn optional_i32(&self, field: &'static str) -> Result<Option<i32>, ContextError> {
        self.get(field).map(|v| Self::int(field, v)).transpose()
    }

    fn optional_timestamp(
        &self,
        field: &'static str,
    ) -> Result<Option<DateTime<Utc>>, ContextError> {
        let Some(value) = self.get(field) else {
            return Ok(None);
        };
        let text = value.as_str().ok_or_else(|| ContextError::Invalid {
            field,
            message: format!(
                "expected an ISO 8601 date-time string, got {}",
                json_kind(value)
            ),
        })?;
        parse_timestamp(text)
            .map(Some)
            .ok_or_else(|| ContextError::Invalid {
                field,
                message: format!(
                    "{:?} is not a date-time as .NET writes one (ISO 8601's extended form, \
                     `-` and `:` separated, an offset as `Z` or `+02:00`), in the years 0001 to \
                     9999 with seconds 00 to 59 (expected e.g. \"2023-05-03T23:18:48Z\"; \
                     Microsoft's \"/Date(1683155928000)/\" is read too)",
                    truncate_for_message(text)
                ),
            })
    }
}

/// Parses a GUID in any form .NET's `Guid.Parse` commonly produces: hyphenated, braced
/// (`{...}`), or 32 hex digits. Returns `None` for anything else.
pub fn parse_guid(text: &str) -> Option<Uuid> {
    let text = text.trim();
    if text.len() > 38 {
        return None;
    }
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(text);
    match inner.len() {
        32 | 36 => Uuid::try_parse(inner).ok(),
        _ => None,
    }
}

/// The years a timestamp may have, in UTC: those of .NET's `DateTime` (0001–9999), so nothing
/// Keyfactor could not have sent is taken. RFC 3339, in which the engine stores and hands on
/// timestamps, has four-digit years, so a timestamp outside them could be accepted but not read
/// back.
pub const TIMESTAMP_YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

/// Longest timestamp text parsed: an RFC 3339 time with nanoseconds and an offset is 35 bytes,
/// a `/Date(ms+zzzz)/` under 30; anything longer is no timestamp, and is refused before any
/// parser looks at it.
const MAX_TIMESTAMP_BYTES: usize = 64;

/// Parses an ISO 8601 timestamp. With an offset (`Z`, `+02:00`) it is converted to UTC; without
/// one (how .NET serialises a `DateTime` of unspecified kind) it is taken as UTC. Microsoft's
/// `/Date(ms)/` form is read too ([`parse_microsoft_date`]). `None` for anything else, and for a
/// time outside [`TIMESTAMP_YEARS`] once in UTC, or one in a 60th second (a leap second, which
/// chrono accepts at any minute and .NET's `DateTime` cannot hold: Keyfactor never sends one, and
/// the contract's `datetime` has no way to carry it).
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if text.len() > MAX_TIMESTAMP_BYTES {
        return None;
    }
    let parsed = match DateTime::parse_from_rfc3339(text) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
            .map(|naive| naive.and_utc())
            .or_else(|| parse_microsoft_date(text)),
    };
    parsed.filter(|t| {
        TIMESTAMP_YEARS.contains(&t.year()) && t.timestamp_subsec_nanos() < NANOS_PER_SECOND
    })
}

/// Nanoseconds in a second: chrono keeps a leap second as a fraction of this many or more.
const NANOS_PER_SECOND: u32 = 1_000_000_000;

/// Why a value-type field whose value is 0 may be absent, for its "missing" error: serializers
/// set to leave out default values (Newtonsoft's `DefaultValueHandling.Ignore`, System.Text.Json's
/// `JsonIgnoreCondition.WhenWritingDefault`) drop `JobResult` Unknown, `OperationType` Unknown and
/// `CurrentRetryCount` 0 — every first run of an inventory job.
fn default_omitted_hint(field: &str) -> &'static str {
    if ["JobResult", "OperationType", "CurrentRetryCount"].contains(&field) {
        " (a serializer that leaves out default values, such as Newtonsoft's \
         DefaultValueHandling.Ignore or System.Text.Json's WhenWritingDefault, drops it when it \
         is 0: have it write every field)"
    } else {
        ""
    }
}

/// Microsoft's JSON date, `/Date(1683155928000)/` or `/Date(1683155928000+0200)/`: milliseconds
/// since 1970 in UTC, then an offset that says only which local time the writer had (the instant
/// does not depend on it). DataContractJsonSerializer, JavaScriptSerializer and Windows
/// PowerShell 5.1's `ConvertTo-Json` write a `DateTime` so.
fn parse_microsoft_date(text: &str) -> Option<DateTime<Utc>> {
    let inner = text.strip_prefix("/Date(")?.strip_suffix(")/")?;
    // The offset starts at a sign after the first character (which may be the number's own).
    let end = inner
        .char_indices()
        .skip(1)
        .find(|(_, c)| *c == '+' || *c == '-')
        .map_or(inner.len(), |(i, _)| i);
    let (millis, offset) = inner.split_at(end);
    if !offset.is_empty() {
        let digits = offset.get(1..)?;
        if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let unsigned = millis.strip_prefix('-').unwrap_or(millis);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    DateTime::from_timestamp_millis(millis.parse().ok()?)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Keeps error messages bounded when they quote hostile input.
fn truncate_for_message(text: &str) -> String {
    const MAX: usize = 80;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// What to change when a body that failed to decode has none of the context's fields: the usual
/// cause is `System.Text.Json` with its defaults, which writes only properties, while Keyfactor's
/// `OrchestratorJobCompleteHandlerContext` has public *fields* (it writes `{}`). `None` when the
/// body is not such an object.
pub fn serializer_hint(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() > MAX_CONTEXT_BYTES {
        return None;
    }
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(bytes) else {
        return None;
    };
    let known = map
        .keys()
        .any(|k| FIELDS.iter().any(|f| f.eq_ignore_ascii_case(k)));
    (!known).then_some(
        "the body has none of the context's fields. Keyfactor's context has public fields, not \
         properties: System.Text.Json skips them unless JsonSerializerOptions.IncludeFields = true \
         (Newtonsoft.Json writes them by default); see docs/FORWARDER-WIRE.md",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        let text = serde_json::to_vec(&jobhook_testkit::sample_context_json()).unwrap();
        let mut with_bom = b"\xEF\xBB\xBF".to_vec();
        with_bom.extend_from_slice(&text);
        let plain = JobContext::from_json_bytes(&text);
        assert!(plain.is_ok(), "{plain:?}");
        assert_eq!(
            JobContext::from_json_bytes(&with_bom).map(|c| c.to_json()),
            plain.map(|c| c.to_json())
        );
        // Only at the start: one inside the document is still refused.
        let mut inside = text.clone();
        inside.insert(1, b' ');
        inside.splice(1..2, b"\xEF\xBB\xBF".iter().copied());
        assert!(JobContext::from_json_bytes(&inside).is_err());
    }

    fn sample() -> Value {
        json!({
            "AgentId": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11",
            "Username": "KFTRAIN\\SVC_Orchestrator",
            "ClientMachine": "orchestrator.kftrain.lab",
            "JobResult": "Failure",
            "JobId": "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01",
            "JobType": "WinCertInventory",
            "JobTypeId": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
            "OperationType": "Unknown",
            "CertificateId": 14,
            "RequestTimestamp": "2023-05-03T23:18:48Z",
            "CurrentRetryCount": 5
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = sample();
        if let Value::Object(map) = &mut v {
            map.insert(field.to_owned(), value);
        }
        v
    }

    fn without(field: &str) -> Value {
        let mut v = sample();
        if let Value::Object(map) = &mut v {
            map.remove(field);
        }
        v
    }

    fn decode(v: &Value) -> Result<JobContext, ContextError> {
        JobContext::from_json_value(v)
    }

    #[test]
    fn decodes_every_field() {
        let c = decode(&sample()).unwrap();
        assert_eq!(
            c.agent_id.to_string(),
            "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11"
        );
        assert_eq!(c.username, "KFTRAIN\\SVC_Orchestrator");
        assert_eq!(c.client_machine, "orchestrator.kftrain.lab");
        assert_eq!(c.job_result, JobResult::Failure);
        assert_eq!(c.job_id.to_string(), "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01");
        assert_eq!(c.job_type, "WinCertInventory");
        assert_eq!(
            c.job_type_id.to_string(),
            "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"
        );
        assert_eq!(c.operation_type, OperationType::Unknown);
        assert_eq!(c.certificate_id, Some(14));
        assert_eq!(c.request_timestamp.unwrap().timestamp(), 1_683_155_928);
        assert_eq!(c.current_retry_count, 5);
    }

    #[test]
    fn round_trips_through_json() {
        let c = decode(&sample()).unwrap();
        assert_eq!(decode(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn job_result_by_name_any_case_and_by_number() {
        for (input, expected) in [
            (json!("success"), JobResult::Success),
            (json!("WARNING"), JobResult::Warning),
            (json!("Failure"), JobResult::Failure),
            (json!("InProcess"), JobResult::InProcess),
            (json!("unknown"), JobResult::Unknown),
            (json!(0), JobResult::Unknown),
            (json!(1), JobResult::InProcess),
            (json!(2), JobResult::Success),
            (json!(3), JobResult::Warning),
            (json!(4), JobResult::Failure),
            (json!("4"), JobResult::Failure),
            (json!(17), JobResult::Unknown),
            (json!(-1), JobResult::Unknown),
        ] {
            let c = decode(&with("JobResult", input.clone())).unwrap();
            assert_eq!(c.job_result, expected, "input {input}");
        }
    }

    #[test]
    fn operation_type_by_name_any_case_and_by_number() {
        let names = [
            "Unknown",
            "Inventory",
            "Add",
            "Remove",
            "Create",
            "CreateAdd",
            "Reenrollment",
            "Discovery",
            "SetPassword",
            "FetchLogs",
        ];
        for (number, name) in names.iter().enumerate() {
            let by_name = decode(&with("OperationType", json!(name.to_lowercase()))).unwrap();
            let by_number = decode(&with("OperationType", json!(number))).unwrap();
            assert_eq!(by_name.operation_type, by_number.operation_type);
            assert_eq!(by_name.operation_type.name(), *name);
            assert_eq!(by_name.operation_type.number(), number as i64);
        }
        let c = decode(&with("OperationType", json!(42))).unwrap();
        assert_eq!(c.operation_type, OperationType::Unknown);
    }

    #[test]
    fn unknown_enum_name_is_an_error_naming_the_field() {
        let e = decode(&with("JobResult", json!("Exploded"))).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("field `JobResult`"), "{msg}");
        assert!(msg.contains("Failure (4)"), "{msg}");
    }

    #[test]
    fn non_integral_enum_number_is_an_error() {
        let e = decode(&with("OperationType", json!(2.5))).unwrap_err();
        assert!(
            matches!(
                e,
                ContextError::Invalid {
                    field: "OperationType",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn guid_forms() {
        for form in [
            "FA406103-0B3E-4F0B-8D3B-0C1F8E6C0A11",
            "{fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11}",
            "fa4061030b3e4f0b8d3b0c1f8e6c0a11",
        ] {
            let c = decode(&with("AgentId", json!(form))).unwrap();
            assert_eq!(
                c.agent_id.to_string(),
                "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11"
            );
        }
        for bad in [
            "",
            "not-a-guid",
            "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a1",
            "urn:uuid:x",
        ] {
            let e = decode(&with("JobTypeId", json!(bad))).unwrap_err();
            assert!(
                matches!(
                    e,
                    ContextError::Invalid {
                        field: "JobTypeId",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        let e = decode(&with("JobId", json!(12))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field `JobId`: expected a GUID string, got a number"
        );
    }

    /// A value-type field sent as `null` is told apart from one left out, and one a
    /// default-omitting serializer drops (its value 0) says how that happens.
    #[test]
    fn null_and_omitted_value_fields_say_which_and_why() {
        for field in [
            "AgentId",
            "JobResult",
            "JobId",
            "JobTypeId",
            "OperationType",
            "CurrentRetryCount",
        ] {
            let e = decode(&with(field, Value::Null)).unwrap_err();
            assert_eq!(e, ContextError::Null(field));
            assert!(e.to_string().contains("is null"), "{e}");
        }
        for field in ["JobResult", "OperationType", "CurrentRetryCount"] {
            let e = decode(&without(field)).unwrap_err().to_string();
            assert!(
                e.contains("missing") && e.contains("WhenWritingDefault"),
                "{e}"
            );
        }
        let e = decode(&without("JobId")).unwrap_err().to_string();
        assert_eq!(e, "field `JobId` is missing");
    }

    /// Microsoft's `/Date(ms)/` (with or without an offset, which does not move the instant) is
    /// read as the instant it names; anything malformed in it, or past the years a .NET
    /// `DateTime` has, is refused.
    /// A 60th second (chrono takes one at any minute) is refused: .NET cannot have sent it, and
    /// a handler would get no time at all (the contract's nanoseconds stop below a second).
    #[test]
    fn a_leap_second_is_refused_with_the_field_named() {
        for text in [
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2016-12-31 23:59:60",
            "2023-05-03T10:15:60.9999999+02:00",
        ] {
            assert_eq!(parse_timestamp(text), None, "{text}");
        }
        assert!(parse_timestamp("2016-12-31T23:59:59.999999999Z").is_some());
        let e = decode(&with("RequestTimestamp", json!("2016-12-31T23:59:60Z")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("RequestTimestamp") && e.contains("seconds 00 to 59"),
            "{e}"
        );
    }

    #[test]
    fn microsoft_json_dates_are_read() {
        let at = |text: &str| parse_timestamp(text).map(|t| t.to_rfc3339());
        let expected = Some("2023-05-03T23:18:48+00:00".to_owned());
        assert_eq!(at("/Date(1683155928000)/"), expected);
        assert_eq!(at("/Date(1683155928000+0200)/"), expected);
        assert_eq!(at("/Date(1683155928000-0700)/"), expected);
        assert_eq!(
            at("/Date(-62135596800000)/"),
            Some("0001-01-01T00:00:00+00:00".to_owned())
        );
        for bad in [
            "/Date()/",
            "/Date(abc)/",
            "/Date(1683155928000+02)/",
            "/Date(1683155928000+0200x)/",
            "/Date(+1683155928000)/",
            "/Date(--1)/",
            "/Date(1683155928000)",
            "Date(1683155928000)/",
            "/Date(99999999999999999999)/",
            "/Date(-62135596800001)/",
            "/Date(253402300800000)/",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
        let context = decode(&with("RequestTimestamp", json!("/Date(1683155928000)/")))
            .expect("a context with a Microsoft date");
        assert_eq!(context.request_timestamp.map(|t| t.to_rfc3339()), expected);
    }

    #[test]
    fn missing_required_fields_are_named() {
        for field in [
            "AgentId",
            "Username",
            "ClientMachine",
            "JobResult",
            "JobId",
            "JobType",
            "JobTypeId",
            "OperationType",
            "CurrentRetryCount",
        ] {
            let e = decode(&without(field)).unwrap_err();
            assert_eq!(e, ContextError::Missing(field));
        }
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        for v in [without("CertificateId"), with("CertificateId", Value::Null)] {
            assert_eq!(decode(&v).unwrap().certificate_id, None);
        }
        for v in [
            without("RequestTimestamp"),
            with("RequestTimestamp", Value::Null),
        ] {
            assert_eq!(decode(&v).unwrap().request_timestamp, None);
        }
    }

    #[test]
    fn null_strings_become_empty() {
        assert_eq!(decode(&with("Username", Value::Null)).unwrap().username, "");
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (field, value) in [
            ("Username", json!(5)),
            ("ClientMachine", json!([])),
            ("JobType", json!({})),
            ("CurrentRetryCount", json!("lots")),
            ("CurrentRetryCount", json!(1.5)),
            ("CurrentRetryCount", json!(1_u64 << 40)),
            ("CertificateId", json!(true)),
            ("RequestTimestamp", json!(12)),
            ("RequestTimestamp", json!("yesterday")),
            ("JobResult", json!(true)),
        ] {
            match decode(&with(field, value.clone())) {
                Err(ContextError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}={value}: {other:?}"),
            }
        }
    }

    #[test]
    fn timestamps_with_and_without_offset() {
        let at = |s: &str| {
            decode(&with("RequestTimestamp", json!(s)))
                .unwrap()
                .request_timestamp
                .unwrap()
                .timestamp()
        };
        assert_eq!(at("2023-05-03T23:18:48Z"), 1_683_155_928);
        assert_eq!(at("2023-05-04T01:18:48+02:00"), 1_683_155_928);
        assert_eq!(at("2023-05-03T23:18:48"), 1_683_155_928);
        assert_eq!(at("2023-05-03T23:18:48.1234567"), 1_683_155_928);
    }

    #[test]
    fn timestamps_outside_the_years_dotnet_holds_are_refused() {
        for text in [
            "-0001-01-01T00:00:00",
            "0000-12-31T23:59:59Z",
            "+10000-01-01T00:00:00",
            "-262143-01-01T00:00:00",
            // 9999 in its own zone, 10000 in UTC.
            "9999-12-31T23:59:59-05:00",
            // 0001 in its own zone, year 0 in UTC.
            "0001-01-01T00:00:00+01:00",
        ] {
            match decode(&with("RequestTimestamp", json!(text))) {
                Err(ContextError::Invalid { field, message }) => {
                    assert_eq!(field, "RequestTimestamp");
                    assert!(message.contains("0001 to 9999"), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        for text in ["0001-01-01T00:00:00", "9999-12-31T23:59:59.9999999Z"] {
            assert!(
                decode(&with("RequestTimestamp", json!(text))).is_ok(),
                "{text}"
            );
        }
    }

    /// Text for a timestamp field: ISO 8601 shapes with years, offsets and fractions from
    /// anywhere, and other text.
    fn timestamp_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            (
                -300_000i32..300_000,
                1u32..13,
                1u32..32,
                0u32..25,
                0u32..61,
                prop_oneof![
                    Just(String::new()),
                    Just("Z".to_owned()),
                    (-23i32..24, 0u32..60).prop_map(|(h, m)| format!("{h:+03}:{m:02}")),
                ],
                prop_oneof![Just(String::new()), "\\.[0-9]{1,9}"],
                prop_oneof![Just('T'), Just(' '), Just('t')],
            )
                .prop_map(|(y, mo, d, h, mi, offset, fraction, t)| {
                    let year = if (0..=9999).contains(&y) {
                        format!("{y:04}")
                    } else {
                        format!("{y:+05}")
                    };
                    format!("{year}-{mo:02}-{d:02}{t}{h:02}:{mi:02}:00{fraction}{offset}")
                }),
            any::<String>(),
        ]
    }

    proptest::proptest! {
        /// Whatever the decoder accepts, the engine can store and read back unchanged: a
        /// context is stored as [`JobContext::to_json`] and read with the same decoder, so an
        /// accepted context that does not come back would be an event no delivery can run.
        #[test]
        fn every_accepted_context_reads_back_the_same(
            timestamp in timestamp_text(),
            username in proptest::prelude::any::<String>(),
            machine in proptest::prelude::any::<String>(),
            job_type in proptest::prelude::any::<String>(),
            // A GUID as .NET may write it: braces, upper case, no hyphens.
            agent in proptest::strategy::Strategy::prop_map((proptest::prelude::any::<u128>(), 0u8..4), |(n, form)| {
                let id = Uuid::from_u128(n);
                match form {
                    0 => id.to_string(),
                    1 => format!("{{{id}}}"),
                    2 => id.to_string().to_uppercase(),
                    _ => id.simple().to_string(),
                }
            }),
            job_result in -1i64..6,
            operation_type in -1i64..11,
            certificate_id in proptest::prelude::any::<Option<i32>>(),
            retries in proptest::prelude::any::<i32>(),
        ) {
            let mut v = with("RequestTimestamp", json!(timestamp));
            if let Value::Object(map) = &mut v {
                map.insert("Username".into(), json!(username));
                map.insert("ClientMachine".into(), json!(machine));
                map.insert("JobType".into(), json!(job_type));
                map.insert("AgentId".into(), json!(agent));
                map.insert("JobResult".into(), json!(job_result));
                map.insert("OperationType".into(), json!(operation_type));
                map.insert("CertificateId".into(), json!(certificate_id));
                map.insert("CurrentRetryCount".into(), json!(retries));
            }
            if let Ok(context) = decode(&v) {
                let again = decode(&context.to_json());
                proptest::prop_assert_eq!(again.as_ref().ok(), Some(&context), "{:?}", again);
            }
        }
    }

    #[test]
    fn field_names_are_case_insensitive_but_unique() {
        let camel = json!({
            "agentId": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11", "username": "u",
            "clientMachine": "m", "jobResult": 2, "jobId": "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01",
            "jobType": "WinCertInventory", "jobTypeId": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
            "operationType": 0, "currentRetryCount": 0
        });
        assert_eq!(decode(&camel).unwrap().job_result, JobResult::Success);
        let dup = with("agentid", json!("fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11"));
        assert_eq!(
            decode(&dup).unwrap_err(),
            ContextError::Duplicate("AgentId")
        );
    }

    #[test]
    fn a_field_given_twice_under_the_same_name_is_refused() {
        let text = sample().to_string();
        let body = text.strip_suffix('}').unwrap();
        let twice = format!("{body},\"JobId\":\"0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a02\"}}");
        assert_eq!(
            JobContext::from_json_bytes(twice.as_bytes()).unwrap_err(),
            ContextError::Duplicate("JobId")
        );
        // Also when both values are equal, and for a field given three times.
        let same = format!("{body},\"Username\":\"u\",\"Username\":\"u\"}}");
        assert_eq!(
            JobContext::from_json_bytes(same.as_bytes()).unwrap_err(),
            ContextError::Duplicate("Username")
        );
        // An unknown key given twice is ignored, as unknown keys are.
        let unknown = format!("{body},\"Extra\":1,\"Extra\":2}}");
        assert!(JobContext::from_json_bytes(unknown.as_bytes()).is_ok());
        assert!(JobContext::from_json_bytes(text.as_bytes()).is_ok());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert!(decode(&with("Client", json!({"BaseAddress": "x"}))).is_ok());
    }

    /// What Newtonsoft.Json writes from Keyfactor's context object with its defaults (public
    /// fields in declaration order, enums as numbers, a `DateTime` of kind Unspecified without an
    /// offset, the `HttpClient` as an object or null) is accepted; so is System.Text.Json with
    /// `IncludeFields = true` (the same shape). Its default, `{}`, is refused with a hint.
    #[test]
    fn dotnet_serializer_defaults() {
        let newtonsoft = br#"{"AgentId":"fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11","Username":"KFTRAIN\\SVC_Orchestrator","ClientMachine":"orchestrator.kftrain.lab","JobResult":4,"JobId":"0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90","JobType":"WinCertInventory","JobTypeId":"49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f","OperationType":0,"CertificateId":null,"RequestTimestamp":"2023-05-03T23:18:48.123","CurrentRetryCount":5,"Client":{"DefaultRequestHeaders":[],"BaseAddress":"https://command.example.com/KeyfactorAPI/","Timeout":"00:01:40","MaxResponseContentBufferSize":2147483647}}"#;
        let c = JobContext::from_json_bytes(newtonsoft).expect("Newtonsoft.Json's output");
        assert_eq!(c.job_result, JobResult::Failure);
        assert_eq!(c.current_retry_count, 5);
        assert_eq!(
            c.request_timestamp.map(|t| t.to_rfc3339()),
            Some("2023-05-03T23:18:48.123+00:00".to_owned()),
            "a DateTime without an offset is read as UTC"
        );
        let local = String::from_utf8_lossy(newtonsoft)
            .replace("23:18:48.123", "23:18:48.123+02:00")
            .replace("\"Client\":{", "\"Client\":null,\"X\":{");
        let c = JobContext::from_json_bytes(local.as_bytes()).expect("an offset and a null client");
        assert_eq!(
            c.request_timestamp.map(|t| t.to_rfc3339()),
            Some("2023-05-03T21:18:48.123+00:00".to_owned())
        );
        assert!(serializer_hint(newtonsoft).is_none());
        assert!(JobContext::from_json_bytes(b"{}").is_err());
        assert!(serializer_hint(b"{}").is_some_and(|h| h.contains("IncludeFields")));
        assert!(serializer_hint(b"[]").is_none());
    }

    /// Names the decoder would ignore are listed, with the field a misspelt one most likely
    /// means; the fields themselves in any case are not.
    #[test]
    fn unknown_fields_are_named_with_the_field_they_likely_misspell() {
        let mut v = sample();
        v["RequestTimestmap"] = json!("2023-05-03T23:18:48Z");
        v["CertificatId"] = json!(42);
        v["jobid"] = json!("x");
        v["Comment"] = json!("mine");
        let mut found = unknown_fields(v.to_string().as_bytes());
        found.sort();
        assert_eq!(
            found,
            [
                ("CertificatId".to_owned(), Some("CertificateId")),
                ("Comment".to_owned(), None),
                ("RequestTimestmap".to_owned(), Some("RequestTimestamp")),
            ]
        );
        assert!(unknown_fields(sample().to_string().as_bytes()).is_empty());
        assert!(unknown_fields(b"[1]").is_empty());
    }

    /// A number serde_json cannot hold is named with its field, found in the text before it.
    #[test]
    fn a_json_error_inside_a_field_names_the_field() {
        let text = sample()
            .to_string()
            .replace("\"CurrentRetryCount\":5", "\"CurrentRetryCount\": 1e400");
        let e = JobContext::from_json_bytes(text.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `CurrentRetryCount`: number out of range"),
            "{e}"
        );
        let pretty = serde_json::to_string_pretty(&sample())
            .unwrap()
            .replace("\"CertificateId\": 14", "\"CertificateId\": -1e999");
        let e = JobContext::from_json_bytes(pretty.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("field `CertificateId`"), "{e}");
        // Past a member's value, serde_json's words alone.
        let e = JobContext::from_json_bytes(b"{\"AgentId\": \"x\", ")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("field `"), "{e}");
    }

    #[test]
    fn malformed_and_oversized_documents() {
        assert!(matches!(
            JobContext::from_json_bytes(b"{\"AgentId\": "),
            Err(ContextError::Json(_))
        ));
        assert_eq!(
            JobContext::from_json_bytes(b"[1,2]").unwrap_err(),
            ContextError::NotAnObject("an array")
        );
        let big = vec![b' '; MAX_CONTEXT_BYTES + 1];
        assert!(matches!(
            JobContext::from_json_bytes(&big),
            Err(ContextError::TooLarge { .. })
        ));
        assert_eq!(
            JobContext::from_json_bytes(&big).unwrap_err().to_string(),
            format!("context is larger than the limit of {MAX_CONTEXT_BYTES} bytes")
        );
        // Latin-1 (Windows PowerShell 5.1's string bodies): named, with where and what to do.
        let latin1 = b"{\"Username\": \"Jos\xe9\"}";
        assert_eq!(
            JobContext::from_json_bytes(latin1).unwrap_err(),
            ContextError::NotUtf8 {
                offset: 17,
                byte: 0xe9
            }
        );
        assert!(
            JobContext::from_json_bytes(latin1)
                .unwrap_err()
                .to_string()
                .contains("UTF8.GetBytes"),
        );
        for empty in [&b""[..], b" \r\n", b"\xEF\xBB\xBF"] {
            assert_eq!(
                JobContext::from_json_bytes(empty).unwrap_err(),
                ContextError::Empty
            );
        }
        let long = "x".repeat(MAX_STRING_FIELD_BYTES + 1);
        assert!(matches!(
            decode(&with("Username", json!(long))),
            Err(ContextError::Invalid {
                field: "Username",
                ..
            })
        ));
    }

    #[test]
    fn error_messages_quoting_input_are_bounded() {
        let long = "é".repeat(1000);
        let e = decode(&with("JobResult", json!(long)))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 600, "{}", e.len());
    }
}
