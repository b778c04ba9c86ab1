//! `servicenow-incident`: opens an incident in ServiceNow for a failed orchestrator job, through
//! ServiceNow's Table API and the engine's `http` capability — once per job: the incident's
//! `correlation_id` is the job's `JobId`, and an active incident with that correlation id is
//! found first and reused instead of opening another.
//!
//! The calls, as ServiceNow documents the Table API:
//! 1. `GET {InstanceUrl}/api/now/table/{Table}?sysparm_query=correlation_id=<JobId>^active=true
//!    &sysparm_fields=sys_id,number,correlation_id&sysparm_limit=1` → `200 {"result": [...]}`.
//!    An instance ignores the parts of a query it does not understand and would then answer
//!    with unrelated records, so a record counts only if its own `correlation_id` is the JobId.
//! 2. otherwise `POST {InstanceUrl}/api/now/table/{Table}?sysparm_fields=sys_id,number` with a
//!    JSON body (`short_description`, `description`, `urgency`, `impact`, `correlation_id`,
//!    `correlation_display`, and `caller_id` / `assignment_group` when set) →
//!    `201 {"result": {"sys_id": "…", "number": "INC…"}}`.
//!
//! Recurring jobs (inventories) keep their JobId, so a job that keeps failing has one open
//! incident until someone resolves it; the next failure after that opens a new one.
//!
//! Properties:
//! - `InstanceUrl` (required): `https://<instance>.service-now.com` (a path prefix is kept for
//!   instances behind a proxy).
//! - `Username` and `Password` (Basic authentication) or `BearerToken` (an OAuth access token):
//!   exactly one of the two. The password or token is a secret: set it with `{ env = … }` or
//!   `{ file = … }`. The account needs the `itil` role (or another that may read and create
//!   records of the table).
//! - `Table` (optional, default `incident`).
//! - `CallerId`, `AssignmentGroup` (optional): the sys_id (32 hexadecimal characters) of the
//!   `sys_user` and `sys_user_group` records.
//! - `Urgency`, `Impact` (optional, `1` high, `2` medium, `3` low; default `2`).
//! - `NotifyOn` (optional, default `Failure`) and `MinRetries` (optional, default 0): which jobs
//!   open an incident.

use std::fmt::Write as _;

use jobhook_sdk::serde_json::{Value, json};
use jobhook_sdk::text::{self, Lines};
use jobhook_sdk::{
    Context, Error, Handler, JobResult, Response, Result, delivery, export_handler, http, info,
    properties, warn,
};

/// Longest `short_description`, so the instance never cuts it where the handler did not choose:
/// 160 characters, the field's usual length on a default instance (not stated in the Table API
/// reference; an instance's dictionary can differ).
pub const MAX_SHORT_DESCRIPTION_CHARS: usize = 160;

/// Longest context value copied into the description, in characters: Keyfactor's names and ids
/// are far shorter; this bounds what a hostile value can put into a ticket.
pub const MAX_FIELD_CHARS: usize = 200;

/// Longest failure message copied into the description, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4000;

/// Longest table name accepted: ServiceNow table names are at most 80 characters.
const MAX_TABLE_CHARS: usize = 80;

/// What the incident's `correlation_display` says: which system the correlation id belongs to.
pub const CORRELATION_DISPLAY: &str = "Keyfactor Command job";

/// How the handler authenticates to the instance.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Basic` from `Username` and `Password`.
    Basic {
        /// The user name.
        username: String,
        /// The password (a secret).
        password: String,
    },
    /// `Authorization: Bearer` with `BearerToken` (a secret).
    Bearer(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Basic { username, .. } => write!(f, "Basic({username}, <secret>)"),
            Auth::Bearer(_) => write!(f, "Bearer(<secret>)"),
        }
    }
}

impl Auth {
    /// The `Authorization` header value.
    pub fn header(&self) -> String {
        match self {
            Auth::Basic { username, password } => {
                format!(
                    "Basic {}",
                    base64(format!("{username}:{password}").as_bytes())
                )
            }
            Auth::Bearer(token) => format!("Bearer {token}"),
        }
    }
}

/// The handler's settings, read from its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `https://<instance>.service-now.com`, without a trailing `/`.
    pub instance_url: String,
    /// The table incidents go to.
    pub table: String,
    /// Credentials.
    pub auth: Auth,
    /// The caller's sys_id.
    pub caller_id: Option<String>,
    /// The assignment group's sys_id.
    pub assignment_group: Option<String>,
    /// `1`–`3`.
    pub urgency: u8,
    /// `1`–`3`.
    pub impact: u8,
    /// Which results open an incident.
    pub notify_on: Vec<JobResult>,
    /// Retries needed first.
    pub min_retries: i32,
}

/// A property that is set and not blank, trimmed.
fn optional(name: &str) -> Option<String> {
    properties::get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Settings {
    /// Reads and checks the properties; errors name the property and what to fix.
    pub fn from_properties() -> Result<Settings> {
        let instance_url = properties::require("InstanceUrl")?
            .trim()
            .trim_end_matches('/')
            .to_string();
        check_instance_url(&instance_url)?;
        let table = optional("Table").unwrap_or_else(|| "incident".into());
        if table.is_empty()
            || table.chars().count() > MAX_TABLE_CHARS
            || !table
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(Error::new(
                "property 'Table' must be a ServiceNow table name: lowercase letters, digits and \
                 '_' (e.g. incident)",
            ));
        }
        let auth = match (
            optional("Username"),
            properties::get("Password").filter(|p| !p.is_empty()),
            properties::get("BearerToken").map(|t| t.trim().to_string()),
        ) {
            (Some(_), Some(_), Some(t)) if !t.is_empty() => {
                return Err(Error::new(
                    "set either 'Username' and 'Password' or 'BearerToken', not both",
                ));
            }
            (Some(username), Some(password), _) => {
                if username.contains(':') || username.chars().any(char::is_control) {
                    return Err(Error::new(
                        "property 'Username' must not contain ':' or control characters",
                    ));
                }
                if password.chars().any(char::is_control) {
                    return Err(Error::new(
                        "property 'Password' must not contain control characters",
                    ));
                }
                Auth::Basic { username, password }
            }
            (Some(_), None, _) => return Err(Error::new("property 'Password' is not set")),
            (None, Some(_), _) => return Err(Error::new("property 'Username' is not set")),
            (None, None, Some(token)) if !token.is_empty() => {
                if !token.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(Error::new(
                        "property 'BearerToken' must be printable ASCII without spaces",
                    ));
                }
                Auth::Bearer(token)
            }
            _ => {
                return Err(Error::new(
                    "no credentials: set 'Username' and 'Password' (Basic) or 'BearerToken'",
                ));
            }
        };
        let caller_id = optional("CallerId")
            .map(|v| sys_id("CallerId", v))
            .transpose()?;
        let assignment_group = optional("AssignmentGroup")
            .map(|v| sys_id("AssignmentGroup", v))
            .transpose()?;
        let urgency = level("Urgency")?;
        let impact = level("Impact")?;
        let notify_on = match optional("NotifyOn") {
            Some(_) => properties::list("NotifyOn")?
                .iter()
                .map(|name| {
                    name.parse::<JobResult>()
                        .map_err(|e| Error::new(format!("property 'NotifyOn': {}", e.message())))
                })
                .collect::<Result<Vec<_>>>()?,
            None => vec![JobResult::Failure],
        };
        let min_retries: i32 = properties::parse_or("MinRetries", 0)?;
        if min_retries < 0 {
            return Err(Error::new(format!(
                "property 'MinRetries' must be 0 or more, got {min_retries}"
            )));
        }
        Ok(Settings {
            instance_url,
            table,
            auth,
            caller_id,
            assignment_group,
            urgency,
            impact,
            notify_on,
            min_retries,
        })
    }

    /// Whether this job warrants an incident.
    pub fn should_open(&self, ctx: &Context) -> bool {
        self.notify_on.contains(&ctx.job_result) && ctx.current_retry_count >= self.min_retries
    }

    /// `{InstanceUrl}/api/now/table/{Table}`.
    pub fn table_url(&self) -> String {
        format!("{}/api/now/table/{}", self.instance_url, self.table)
    }
}

fn check_instance_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            Error::new(
                "property 'InstanceUrl' must be the https:// address of the ServiceNow instance \
                 (e.g. https://example.service-now.com)",
            )
        })?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty()
        || rest.contains(['?', '#', '@', '\\'])
        || rest.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::new(
            "property 'InstanceUrl' must be a plain https://host[/path] address: no query, \
             fragment, credentials or spaces",
        ));
    }
    Ok(())
}

/// A sys_id property: 32 hexadecimal characters, as ServiceNow stores references.
fn sys_id(name: &str, value: String) -> Result<String> {
    if value.len() == 32 && value.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(Error::new(format!(
            "property '{name}' must be a sys_id (32 hexadecimal characters); copy it from the \
             record's context menu in ServiceNow (Copy sys_id)"
        )))
    }
}

/// `Urgency` / `Impact`: 1, 2 or 3; 2 when unset.
fn level(name: &str) -> Result<u8> {
    let value: u8 = properties::parse_or(name, 2)?;
    if (1..=3).contains(&value) {
        Ok(value)
    } else {
        Err(Error::new(format!(
            "property '{name}' must be 1 (high), 2 (medium) or 3 (low), got {value}"
        )))
    }
}

/// `text` as plain ticket text ([`text::plain`]): one line, or with its line breaks kept when
/// `multiline`, cut to `max_chars` characters with `…`.
pub fn plain_text(text: &str, max_chars: usize, multiline: bool) -> String {
    let lines = if multiline { Lines::Keep } else { Lines::Join };
    text::plain(text, max_chars, lines)
}

/// The incident's `short_description`, e.g. `Keyfactor orchestrator job failed: PEMInventory on
/// orchestrator.kftrain.lab`, at most [`MAX_SHORT_DESCRIPTION_CHARS`] characters.
pub fn short_description(ctx: &Context) -> String {
    let verb = match ctx.job_result {
        JobResult::Failure => "failed",
        JobResult::Warning => "ended with a warning",
        JobResult::Success => "succeeded",
        _ => "ended",
    };
    plain_text(
        &format!(
            "Keyfactor orchestrator job {verb}: {} on {}",
            plain_text(&ctx.job_type, MAX_FIELD_CHARS, false),
            plain_text(&ctx.client_machine, MAX_FIELD_CHARS, false)
        ),
        MAX_SHORT_DESCRIPTION_CHARS,
        false,
    )
}

/// The incident's `description`: every context field an administrator needs to find the job
/// in Keyfactor Command. `message` is Keyfactor's failure message for the run, when the engine
/// has one: it is added as the last paragraph (cleaned, cut to [`MAX_MESSAGE_CHARS`]).
pub fn description(ctx: &Context, message: Option<&str>) -> String {
    let field = |s: &str| plain_text(s, MAX_FIELD_CHARS, false);
    let mut d = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(
        d,
        "An orchestrator job in Keyfactor Command ended {}.",
        ctx.job_result
    );
    let _ = writeln!(d);
    let _ = writeln!(
        d,
        "Job type: {} ({})",
        field(&ctx.job_type),
        ctx.job_type_id
    );
    let _ = writeln!(d, "Job id: {}", ctx.job_id);
    let _ = writeln!(
        d,
        "Orchestrator: {} (agent {})",
        field(&ctx.client_machine),
        ctx.agent_id
    );
    if !ctx.username.trim().is_empty() {
        let _ = writeln!(d, "Orchestrator identity: {}", field(&ctx.username));
    }
    let _ = writeln!(d, "Operation: {}", ctx.operation_type);
    let _ = writeln!(d, "Retries so far: {}", ctx.current_retry_count);
    if let Some(requested) = ctx.request_timestamp {
        let _ = writeln!(
            d,
            "Requested: {}",
            requested.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    if let Some(id) = ctx.certificate_id {
        let _ = writeln!(d, "Certificate id: {id}");
    }
    if let Some(message) = message.filter(|m| !m.trim().is_empty()) {
        let _ = writeln!(d);
        let _ = writeln!(d, "Message from the orchestrator:");
        let _ = writeln!(d, "{}", plain_text(message, MAX_MESSAGE_CHARS, true));
    }
    d
}

/// The JSON body of the new incident.
pub fn incident(ctx: &Context, settings: &Settings, message: Option<&str>) -> Value {
    let mut record = json!({
        "short_description": short_description(ctx),
        "description": description(ctx, message),
        "urgency": settings.urgency.to_string(),
        "impact": settings.impact.to_string(),
        "correlation_id": ctx.job_id.hyphenated().to_string(),
        "correlation_display": CORRELATION_DISPLAY,
    });
    if let Some(caller) = &settings.caller_id {
        record["caller_id"] = json!(caller);
    }
    if let Some(group) = &settings.assignment_group {
        record["assignment_group"] = json!(group);
    }
    record
}

/// The encoded query that finds an active incident of this job.
pub fn dedup_query(ctx: &Context) -> String {
    format!("correlation_id={}^active=true", ctx.job_id.hyphenated())
}

/// Percent-encodes a query parameter value (everything but RFC 3986's unreserved characters).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648 §4), for the Basic credentials.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = ((n >> (18 - 6 * i)) & 0x3f) as usize;
                out.push(char::from(ALPHABET.get(index).copied().unwrap_or(b'=')));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A record's string field, cleaned for a log line.
fn record_field(record: &Value, name: &str) -> Option<String> {
    record
        .get(name)
        .and_then(Value::as_str)
        .map(|s| plain_text(s, 64, false))
}

/// Fails a non-2xx answer with the status, a hint for the usual causes and the start of the
/// body (the SDK's error); passes a 2xx through.
fn checked(response: Response, what: &str) -> Result<Response> {
    let hint = match response.status {
        401 => {
            ": ServiceNow refused the credentials (check 'Username'/'Password' or 'BearerToken')"
        }
        403 => ": the ServiceNow account may not use this table (it needs e.g. the itil role)",
        _ => "",
    };
    response
        .error_for_status()
        .map_err(|e| e.context(format!("{what}{hint}")))
}

/// Opens (at most) one ServiceNow incident per failed job.
pub struct ServiceNowIncident;

impl ServiceNowIncident {
    /// The active incident already open for this job, as `(number, sys_id)`.
    fn existing(ctx: &Context, settings: &Settings) -> Result<Option<(String, String)>> {
        let url = format!(
            "{}?sysparm_query={}&sysparm_fields=sys_id%2Cnumber%2Ccorrelation_id&sysparm_limit=1",
            settings.table_url(),
            encode(&dedup_query(ctx))
        );
        let what = format!("looking for an open incident of job {}", ctx.job_id);
        let response = http::Request::get(url)
            .header("Accept", "application/json")
            .header("Authorization", settings.auth.header())
            .send()
            .map_err(|e| e.context(&what))?;
        let body: Value = checked(response, &what)?
            .json()
            .map_err(|e| e.context(&what))?;
        let Some(records) = body.get("result").and_then(Value::as_array) else {
            return Err(Error::new(format!(
                "{what}: expected {{\"result\": [...]}} from the Table API"
            )));
        };
        let job_id = ctx.job_id.hyphenated().to_string();
        let found = records.iter().find(|r| {
            r.get("correlation_id")
                .and_then(Value::as_str)
                .is_some_and(|c| c.eq_ignore_ascii_case(&job_id))
        });
        if found.is_none() && !records.is_empty() {
            warn!(
                "ServiceNow answered the correlation_id query for job {} with records of other \
                 jobs; does table '{}' have a correlation_id column?",
                ctx.job_id, settings.table
            );
        }
        Ok(found.map(|r| {
            (
                record_field(r, "number").unwrap_or_else(|| "?".into()),
                record_field(r, "sys_id").unwrap_or_else(|| "?".into()),
            )
        }))
    }
}

impl Handler for ServiceNowIncident {
    fn run(ctx: &Context) -> Result<()> {
        let settings = Settings::from_properties()?;
        if !settings.should_open(ctx) {
            info!(
                "{} job {} ended {} (retry {}): no incident",
                ctx.job_type, ctx.job_id, ctx.job_result, ctx.current_retry_count
            );
            return Ok(());
        }
        if let Some((number, sys_id)) = Self::existing(ctx, &settings)? {
            info!(
                "{number} (sys_id {sys_id}) is already open for {} job {}: no new incident",
                ctx.job_type, ctx.job_id
            );
            return Ok(());
        }
        // Keyfactor's text about the job: only events the engine's poller made carry it.
        let message = delivery::message();
        let message = message.as_deref();
        let what = format!("opening an incident for job {}", ctx.job_id);
        let url = format!(
            "{}?sysparm_fields=sys_id%2Cnumber&sysparm_exclude_reference_link=true",
            settings.table_url()
        );
        let response = http::Request::post(url)
            .header("Accept", "application/json")
            .header("Authorization", settings.auth.header())
            .json(&incident(ctx, &settings, message))?
            .send()
            .map_err(|e| e.context(&what))?;
        let status = response.status;
        let created: Value = checked(response, &what)?
            .json()
            .map_err(|e| e.context(&what))?;
        let record = created.get("result").unwrap_or(&Value::Null);
        let (Some(number), Some(sys_id)) = (
            record_field(record, "number"),
            record_field(record, "sys_id"),
        ) else {
            return Err(Error::new(format!(
                "{what}: ServiceNow answered {status} without result.number and result.sys_id"
            )));
        };
        info!(
            "opened {number} (sys_id {sys_id}) in ServiceNow for {} job {} on {}",
            ctx.job_type, ctx.job_id, ctx.client_machine
        );
        Ok(())
    }
}

export_handler!(ServiceNowIncident);

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook_sdk::testing::{self, MockHost};
    use jobhook_sdk::{CapabilityError, Method};

    fn failed() -> Context {
        testing::context_from_json(include_str!("../contexts/failed.json"))
            .expect("failed.json parses")
    }

    const INSTANCE: &str = "https://kftrain.service-now.com";
    const GROUP: &str = "287ebd7da9fe198100f92cc8d1d2154e";
    const CALLER: &str = "5b7c200d0a640069006b3845b5d0fa7c";

    fn configured() -> MockHost {
        MockHost::new()
            .property("InstanceUrl", format!("{INSTANCE}/"))
            .property("Username", "svc_keyfactor")
            .property("Password", "s3cret:pw")
            .property("AssignmentGroup", GROUP)
            .property("CallerId", CALLER)
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn failure_looks_for_an_open_incident_then_opens_one() {
        let host = configured()
            .http_json(200, json!({"result": []}))
            .http_json(
                201,
                json!({"result": {"sys_id": "a1b2c3d4e5f60718293a4b5c6d7e8f90", "number": "INC0010002"}}),
            )
            .install();
        assert_eq!(
            testing::run_handler::<ServiceNowIncident>(&failed()),
            Ok(())
        );
        let calls = host.http_requests();
        assert_eq!(calls.len(), 2);

        assert_eq!(calls[0].method, Method::Get);
        assert_eq!(
            calls[0].url,
            "https://kftrain.service-now.com/api/now/table/incident?sysparm_query=correlation_id%3D0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90%5Eactive%3Dtrue&sysparm_fields=sys_id%2Cnumber%2Ccorrelation_id&sysparm_limit=1"
        );
        // base64("svc_keyfactor:s3cret:pw")
        assert_eq!(
            header(&calls[0].headers, "authorization"),
            Some("Basic c3ZjX2tleWZhY3RvcjpzM2NyZXQ6cHc=")
        );

        assert_eq!(calls[1].method, Method::Post);
        assert_eq!(
            calls[1].url,
            "https://kftrain.service-now.com/api/now/table/incident?sysparm_fields=sys_id%2Cnumber&sysparm_exclude_reference_link=true"
        );
        assert_eq!(
            header(&calls[1].headers, "content-type"),
            Some("application/json")
        );
        assert_eq!(
            header(&calls[1].headers, "accept"),
            Some("application/json")
        );
        let body = calls[1].body_json().expect("JSON");
        assert_eq!(
            body["short_description"],
            "Keyfactor orchestrator job failed: PEMInventory on orchestrator.kftrain.lab"
        );
        assert_eq!(
            body["correlation_id"],
            "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90"
        );
        assert_eq!(body["correlation_display"], CORRELATION_DISPLAY);
        assert_eq!(body["urgency"], "2");
        assert_eq!(body["impact"], "2");
        assert_eq!(body["assignment_group"], GROUP);
        assert_eq!(body["caller_id"], CALLER);
        let description = body["description"].as_str().unwrap();
        assert!(description.contains("Job id: 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90"));
        assert!(description.contains("Retries so far: 5"));
        assert!(host.logged("opened INC0010002 (sys_id a1b2c3d4e5f60718293a4b5c6d7e8f90)"));
        assert!(!host.logs().iter().any(|l| l.message.contains("s3cret")));
    }

    #[test]
    fn an_open_incident_of_the_same_job_is_reused() {
        let host = configured()
            .http_json(
                200,
                json!({"result": [{"sys_id": "ffff0000ffff0000ffff0000ffff0000", "number": "INC0010001",
                                   "correlation_id": "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90"}]}),
            )
            .install();
        assert_eq!(
            testing::run_handler::<ServiceNowIncident>(&failed()),
            Ok(())
        );
        assert_eq!(host.http_requests().len(), 1, "no POST");
        assert!(
            host.logged("INC0010001 (sys_id ffff0000ffff0000ffff0000ffff0000) is already open")
        );
    }

    #[test]
    fn records_of_other_jobs_do_not_count_as_duplicates() {
        // An instance that ignored the query returns unrelated records.
        let host = configured()
            .http_json(
                200,
                json!({"result": [{"sys_id": "1", "number": "INC0000001", "correlation_id": ""}]}),
            )
            .http_json(
                201,
                json!({"result": {"sys_id": "2", "number": "INC0010003"}}),
            )
            .install();
        assert_eq!(
            testing::run_handler::<ServiceNowIncident>(&failed()),
            Ok(())
        );
        assert_eq!(host.http_requests().len(), 2);
        assert!(host.logged("records of other jobs"));
        assert!(host.logged("opened INC0010003"));
    }

    #[test]
    fn bearer_token_and_levels() {
        let host = MockHost::new()
            .property("InstanceUrl", INSTANCE)
            .property("BearerToken", "eyJ0eXAi.token")
            .property("Urgency", "1")
            .property("Impact", "3")
            .property("Table", "u_pki_incident")
            .http_json(200, json!({"result": []}))
            .http_json(
                201,
                json!({"result": {"sys_id": "2", "number": "INC0010003"}}),
            )
            .install();
        assert_eq!(
            testing::run_handler::<ServiceNowIncident>(&failed()),
            Ok(())
        );
        let calls = host.http_requests();
        assert!(
            calls[1]
                .url
                .starts_with("https://kftrain.service-now.com/api/now/table/u_pki_incident?")
        );
        assert_eq!(
            header(&calls[1].headers, "authorization"),
            Some("Bearer eyJ0eXAi.token")
        );
        let body = calls[1].body_json().unwrap();
        assert_eq!(
            (body["urgency"].as_str(), body["impact"].as_str()),
            (Some("1"), Some("3"))
        );
        assert!(body.get("caller_id").is_none() && body.get("assignment_group").is_none());
    }

    #[test]
    fn other_results_open_nothing() {
        let host = configured().install();
        let ok = testing::context_from_json(include_str!("../contexts/succeeded.json")).unwrap();
        assert_eq!(testing::run_handler::<ServiceNowIncident>(&ok), Ok(()));
        assert!(host.http_requests().is_empty());
        assert!(host.logged("no incident"));
    }

    #[test]
    fn bad_properties_fail_with_what_to_fix() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "property 'InstanceUrl' is not set"),
            (
                &[("InstanceUrl", "kftrain.service-now.com")],
                "'InstanceUrl'",
            ),
            (
                &[("InstanceUrl", "https://u:p@kftrain.service-now.com")],
                "'InstanceUrl'",
            ),
            (
                &[("InstanceUrl", "https://kftrain.service-now.com/?x=1")],
                "'InstanceUrl'",
            ),
            (&[("InstanceUrl", INSTANCE)], "no credentials"),
            (
                &[("InstanceUrl", INSTANCE), ("Username", "u")],
                "'Password' is not set",
            ),
            (
                &[("InstanceUrl", INSTANCE), ("Password", "p")],
                "'Username' is not set",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("Username", "u"),
                    ("Password", "p"),
                    ("BearerToken", "t"),
                ],
                "not both",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("Username", "a:b"),
                    ("Password", "p"),
                ],
                "'Username'",
            ),
            (
                &[("InstanceUrl", INSTANCE), ("BearerToken", "a b")],
                "'BearerToken'",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("BearerToken", "t"),
                    ("Table", "Incident;drop"),
                ],
                "'Table'",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("BearerToken", "t"),
                    ("CallerId", "admin"),
                ],
                "'CallerId' must be a sys_id",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("BearerToken", "t"),
                    ("AssignmentGroup", "PKI Team"),
                ],
                "'AssignmentGroup'",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("BearerToken", "t"),
                    ("Urgency", "0"),
                ],
                "'Urgency' must be 1",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("BearerToken", "t"),
                    ("Impact", "high"),
                ],
                "'Impact'",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("BearerToken", "t"),
                    ("NotifyOn", "Sometimes"),
                ],
                "'NotifyOn'",
            ),
            (
                &[
                    ("InstanceUrl", INSTANCE),
                    ("BearerToken", "t"),
                    ("MinRetries", "-3"),
                ],
                "'MinRetries'",
            ),
        ];
        for (props, expected) in cases {
            let mut host = MockHost::new();
            for (k, v) in *props {
                host = host.property(*k, *v);
            }
            let host = host.install();
            let reason = testing::run_handler::<ServiceNowIncident>(&failed()).unwrap_err();
            assert!(reason.contains(expected), "{props:?}: {reason}");
            assert!(host.http_requests().is_empty());
        }
    }

    #[test]
    fn servicenow_errors_fail_the_delivery_with_a_hint() {
        let _host = configured()
            .http_json(
                401,
                json!({"error": {"message": "User Not Authenticated"}, "status": "failure"}),
            )
            .install();
        let reason = testing::run_handler::<ServiceNowIncident>(&failed()).unwrap_err();
        assert!(
            reason.contains("401") && reason.contains("'Username'/'Password'"),
            "{reason}"
        );
        assert!(!reason.contains("s3cret"), "{reason}");

        let _host = configured()
            .http_json(200, json!({"result": []}))
            .http_json(
                400,
                json!({"error": {"message": "Invalid field"}, "status": "failure"}),
            )
            .install();
        let reason = testing::run_handler::<ServiceNowIncident>(&failed()).unwrap_err();
        assert!(
            reason.contains("opening an incident") && reason.contains("Invalid field"),
            "{reason}"
        );

        let _host = configured()
            .http_json(200, json!({"result": []}))
            .http_json(201, json!({"result": {"number": "INC1"}}))
            .install();
        let reason = testing::run_handler::<ServiceNowIncident>(&failed()).unwrap_err();
        assert!(
            reason.contains("without result.number and result.sys_id"),
            "{reason}"
        );

        let _host = configured()
            .http_json(200, json!({"records": []}))
            .install();
        let reason = testing::run_handler::<ServiceNowIncident>(&failed()).unwrap_err();
        assert!(reason.contains("expected {\"result\": [...]}"), "{reason}");

        let _host = configured()
            .http_error(CapabilityError::NotGranted(
                "not under any granted prefix".into(),
            ))
            .install();
        let reason = testing::run_handler::<ServiceNowIncident>(&failed()).unwrap_err();
        assert!(reason.contains("not granted"), "{reason}");
    }

    #[test]
    fn texts_are_plain_and_bounded_and_the_message_has_one_place() {
        let ctx = Context {
            job_type: "PEM\r\nInventory\u{202e}".repeat(100),
            client_machine: "orch\u{7}".into(),
            ..failed()
        };
        let short = short_description(&ctx);
        assert!(short.chars().count() <= MAX_SHORT_DESCRIPTION_CHARS + 1);
        assert!(
            !short.contains(['\r', '\n', '\u{202e}', '\u{7}']),
            "{short:?}"
        );
        let d = description(&ctx, Some("line one\nline two\u{0}"));
        assert!(
            d.ends_with("Message from the orchestrator:\nline one\nline two \n"),
            "{d:?}"
        );
        assert!(!description(&ctx, None).contains("Message from"));
        assert!(!description(&ctx, Some(" ")).contains("Message from"));
    }

    #[test]
    fn base64_and_encoding() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("KFTRAIN\\svc:pä", "S0ZUUkFJTlxzdmM6cMOk"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected, "{input}");
        }
        assert_eq!(encode("a=b^c d/é"), "a%3Db%5Ec%20d%2F%C3%A9");
        assert_eq!(
            format!("{:?}", Auth::Bearer("t0ken".into())),
            "Bearer(<secret>)"
        );
    }
}
