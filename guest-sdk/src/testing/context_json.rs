//! Decoding a Keyfactor-style JSON context for native tests, by the engine's rules.
//!
//! The engine decodes the same documents (`POST /v1/job-complete`, `jobhook run --context`)
//! before a handler ever runs, so a context a test builds from JSON must be one the engine would
//! have delivered, with the same values. The SDK cannot share the engine's decoder (neither
//! crate may depend on the other), so this is a port of it, rule for rule, and the workspace
//! test `tests/tests/context_agreement.rs` runs both decoders on the sample contexts and on
//! generated valid and malformed documents and checks that they agree field by field.
//!
//! The rules:
//! - at most [`MAX_CONTEXT_BYTES`]; a JSON object; unknown fields are ignored;
//! - field names match without regard to ASCII case, and a field given twice (under the same
//!   name or two casings) is an error;
//! - `AgentId`, `JobId`, `JobTypeId`: required GUID strings (hyphenated, braced or 32 hex
//!   digits);
//! - `Username`, `ClientMachine`, `JobType`: required strings of at most
//!   [`MAX_STRING_FIELD_BYTES`]; `null` (which .NET allows) is the empty string;
//! - `JobResult`, `OperationType`: required; a .NET member name (any case) or a whole number,
//!   either as a JSON number or a string; numbers Keyfactor does not define are `Unknown`;
//! - `CurrentRetryCount`: a required and `CertificateId` an optional 32-bit whole number, as a
//!   JSON number or a string;
//! - `RequestTimestamp`: optional; RFC 3339, or ISO 8601 without an offset (taken as UTC), or
//!   Microsoft's `/Date(ms)/` (milliseconds since 1970 in UTC; an offset after them does not move
//!   the instant);
//! - `null` counts as absent everywhere except in the three string fields.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::context::{Context, JobResult, OperationType};
use crate::error::{Error, Result};

/// Largest context document accepted, in bytes (the engine's limit).
pub(super) const MAX_CONTEXT_BYTES: usize = 64 * 1024;

/// Longest string field accepted, in bytes (the engine's limit).
pub(super) const MAX_STRING_FIELD_BYTES: usize = 4 * 1024;

/// The .NET names of the context's fields, in the order they are checked.
const FIELDS: [&str; 11] = [
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

/// Decodes a context document; errors name the field concerned as `context field 'Name'`.
pub(super) fn decode(json: &str) -> Result<Context> {
    if json.len() > MAX_CONTEXT_BYTES {
        return Err(Error::new(format!(
            "context is {} bytes; the limit is {MAX_CONTEXT_BYTES} bytes",
            json.len()
        )));
    }
    let value: Value = serde_json::from_str(json)
        .map_err(|e| Error::new(format!("context is not valid JSON ({e})")))?;
    let Value::Object(object) = value else {
        return Err(Error::new(format!(
            "context must be a JSON object, got {}",
            json_kind(&value)
        )));
    };
    // A parsed object keeps only the last of two equal keys: look at the document's own keys,
    // so that `{"JobId": a, "JobId": b}` is refused like two casings are.
    let keys: ObjectKeys = serde_json::from_str(json)
        .map_err(|e| Error::new(format!("context is not valid JSON ({e})")))?;
    if let Some(field) = first_repeated_field(&keys.0) {
        return Err(duplicate(field));
    }
    let fields = Fields::collect(&object)?;
    Ok(Context {
        agent_id: fields.guid("AgentId")?,
        username: fields.string("Username")?,
        client_machine: fields.string("ClientMachine")?,
        job_result: fields.enumeration("JobResult", JobResult::ALL, JobResult::name, |n| {
            JobResult::from_number(n)
        })?,
        job_id: fields.guid("JobId")?,
        job_type: fields.string("JobType")?,
        job_type_id: fields.guid("JobTypeId")?,
        operation_type: fields.enumeration(
            "OperationType",
            OperationType::ALL,
            OperationType::name,
            OperationType::from_number,
        )?,
        certificate_id: fields
            .get("CertificateId")
            .map(|v| int("CertificateId", v))
            .transpose()?,
        request_timestamp: fields.timestamp("RequestTimestamp")?,
        current_retry_count: int("CurrentRetryCount", fields.required("CurrentRetryCount")?)?,
    })
}

/// An error about field `name`.
fn invalid(name: &str, message: impl std::fmt::Display) -> Error {
    Error::new(format!("context field '{name}': {message}"))
}

/// The error for a field given twice.
fn duplicate(field: &str) -> Error {
    Error::new(format!(
        "context field '{field}' is given more than once (field names are matched \
         case-insensitively)"
    ))
}

/// The keys of a JSON object document as written, in order and with repeats (a parsed
/// [`Value`] keeps only the last of equal keys). Values are skipped, not kept.
struct ObjectKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for ObjectKeys {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = ObjectKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<ObjectKeys, A::Error> {
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
/// casing (the engine's rule).
fn first_repeated_field(keys: &[String]) -> Option<&'static str> {
    let mut seen = [false; FIELDS.len()];
    for key in keys {
        let Some(index) = FIELDS.iter().position(|f| f.eq_ignore_ascii_case(key)) else {
            continue;
        };
        if seen[index] {
            return Some(FIELDS[index]);
        }
        seen[index] = true;
    }
    None
}

/// The known fields of one document, found case-insensitively; unknown fields are ignored.
struct Fields<'a> {
    values: [Option<&'a Value>; FIELDS.len()],
}

impl<'a> Fields<'a> {
    fn collect(object: &'a Map<String, Value>) -> Result<Self> {
        let mut values = [None; FIELDS.len()];
        for (key, value) in object {
            let Some(index) = FIELDS.iter().position(|f| f.eq_ignore_ascii_case(key)) else {
                continue;
            };
            if values[index].is_some() {
                return Err(duplicate(FIELDS[index]));
            }
            values[index] = Some(value);
        }
        Ok(Fields { values })
    }

    /// The field's value as given, `null` included.
    fn raw(&self, name: &str) -> Option<&'a Value> {
        let index = FIELDS.iter().position(|f| *f == name)?;
        self.values[index]
    }

    /// The field's value, `null` counting as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.raw(name).filter(|v| !v.is_null())
    }

    fn required(&self, name: &str) -> Result<&'a Value> {
        self.get(name)
            .ok_or_else(|| Error::new(format!("context field '{name}' is missing")))
    }

    fn guid(&self, name: &str) -> Result<Uuid> {
        let value = self.required(name)?;
        let text = value.as_str().ok_or_else(|| {
            invalid(
                name,
                format!("expected a GUID string, got {}", json_kind(value)),
            )
        })?;
        parse_guid(text).ok_or_else(|| {
            invalid(
                name,
                format!(
                    "'{}' is not a GUID (expected e.g. 'fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11')",
                    truncate(text)
                ),
            )
        })
    }

    /// A .NET `string` field: required to be present; `null` is the empty string.
    fn string(&self, name: &str) -> Result<String> {
        match self.raw(name) {
            None => Err(Error::new(format!("context field '{name}' is missing"))),
            Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) if s.len() > MAX_STRING_FIELD_BYTES => Err(invalid(
                name,
                format!(
                    "is {} bytes long; the limit is {MAX_STRING_FIELD_BYTES}",
                    s.len()
                ),
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(invalid(
                name,
                format!("expected a string, got {}", json_kind(other)),
            )),
        }
    }

    fn enumeration<E: Copy>(
        &self,
        name: &str,
        all: &[E],
        member_name: fn(E) -> &'static str,
        from_number: fn(i64) -> E,
    ) -> Result<E> {
        let expected = || {
            all.iter()
                .map(|v| member_name(*v))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.required(name)? {
            Value::Number(n) => n.as_i64().map(from_number).ok_or_else(|| {
                invalid(
                    name,
                    format!(
                        "{n} is not a whole number; expected a number or one of {}",
                        expected()
                    ),
                )
            }),
            Value::String(s) => {
                let trimmed = s.trim();
                if let Some(v) = all
                    .iter()
                    .find(|v| member_name(**v).eq_ignore_ascii_case(trimmed))
                {
                    return Ok(*v);
                }
                trimmed.parse::<i64>().map(from_number).map_err(|_| {
                    invalid(
                        name,
                        format!(
                            "'{}' is not a known name; expected one of {} (any case) or a number",
                            truncate(s),
                            expected()
                        ),
                    )
                })
            }
            other => Err(invalid(
                name,
                format!("expected a name or a number, got {}", json_kind(other)),
            )),
        }
    }

    fn timestamp(&self, name: &str) -> Result<Option<DateTime<Utc>>> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        let text = value.as_str().ok_or_else(|| {
            invalid(
                name,
                format!(
                    "expected an ISO 8601 date-time string, got {}",
                    json_kind(value)
                ),
            )
        })?;
        parse_timestamp(text).map(Some).ok_or_else(|| {
            invalid(
                name,
                format!(
                    "'{}' is not an RFC 3339 / ISO 8601 date-time (expected e.g. \
                     '2023-05-03T23:18:48Z')",
                    truncate(text)
                ),
            )
        })
    }
}

/// A 32-bit whole number, given as a JSON number or as a string holding one.
fn int(name: &str, value: &Value) -> Result<i32> {
    let number = match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        other => {
            return Err(invalid(
                name,
                format!("expected a whole number, got {}", json_kind(other)),
            ));
        }
    };
    number.and_then(|n| i32::try_from(n).ok()).ok_or_else(|| {
        invalid(
            name,
            format!(
                "{} must be a 32-bit whole number",
                truncate(&value.to_string())
            ),
        )
    })
}

/// A GUID in the forms .NET's `Guid.Parse` commonly produces: hyphenated, braced (`{...}`) or
/// 32 hex digits.
fn parse_guid(text: &str) -> Option<Uuid> {
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

/// RFC 3339 (converted to UTC), or ISO 8601 without an offset (how .NET writes a `DateTime` of
/// unspecified kind), taken as UTC, or Microsoft's `/Date(ms)/`.
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if text.len() > 64 {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
        .or_else(|| microsoft_date(text))
}

/// Microsoft's JSON date (DataContractJsonSerializer, JavaScriptSerializer, Windows PowerShell
/// 5.1): `/Date(1683155928000)/`, optionally with a `+hhmm` or `-hhmm` offset after the
/// milliseconds, which only records the writer's local time and does not move the instant. As
/// the engine reads it: the years of a .NET `DateTime` only.
fn microsoft_date(text: &str) -> Option<DateTime<Utc>> {
    use chrono::Datelike;
    let inner = text.strip_prefix("/Date(")?.strip_suffix(")/")?;
    let sign = inner
        .char_indices()
        .skip(1)
        .find(|(_, c)| matches!(c, '+' | '-'))
        .map_or(inner.len(), |(at, _)| at);
    let (millis, offset) = inner.split_at(sign);
    let offset_ok = offset.is_empty()
        || offset
            .get(1..)
            .is_some_and(|d| d.len() == 4 && d.bytes().all(|b| b.is_ascii_digit()));
    let digits = millis.strip_prefix('-').unwrap_or(millis);
    if !offset_ok || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    DateTime::from_timestamp_millis(millis.parse().ok()?).filter(|t| (1..=9999).contains(&t.year()))
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

/// Input quoted in an error message, cut to 80 bytes so hostile input stays bounded.
fn truncate(text: &str) -> String {
    const MAX: usize = 80;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
