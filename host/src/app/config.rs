//! The engine's configuration: one TOML file with `[server]`, `[store]`, `[engine]`,
//! `[quarantine]`, the capability services (`[keyfactor]`, `[mail]`, `[http]`), an optional
//! `[poller]`, and one `[[handlers]]` table per handler registration. Relative paths (components,
//! data directory, mail outbox, CA bundle, property secret files) are relative to the file's
//! directory.
//!
//! A handler registration mirrors a Keyfactor `<register>` element / Command 11 manifest entry:
//! a unique name, the component, `job_types` (required, like Keyfactor's `JobTypes`; GUIDs are
//! compared case-insensitively; `["*"]` is the explicit wildcard), string `properties` (a value
//! may instead reference a secret in an environment variable or a file), `grants`, `limits` and a
//! `retry` policy. Unknown keys are errors. Every error names the file and the key, and the line
//! where the parser knows it (range checks of a section's values name the key without one).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use toml::Spanned;

use crate::app::connections::{self, ConnectionLimits};
use crate::app::tls::TlsConfig;
use crate::capabilities::properties::Properties;
use crate::capabilities::{Capability, GrantProblem, Grants, ServicesConfig};
use crate::context::parse_guid;
use crate::excerpt::{MAX_QUOTED_CHARS, excerpt, quoted};
use crate::limits::Limits;
use crate::queue::quarantine::QuarantineConfig;
use crate::queue::registration::{
    DEFAULT_HANDLER_CONCURRENCY, JobTypes, MAX_HANDLER_NAME, Registration, is_handler_name,
};
use crate::queue::retry::{MAX_RETRY_ATTEMPTS, RetryPolicy};
use crate::queue::store::config::StoreConfig;
use crate::runtime::config::{
    DEFAULT_CACHE_DIR, EngineConfig, MAX_COMPONENT_BYTES, MAX_CONCURRENT_DELIVERIES,
    MAX_MEMORY_SLOTS, MAX_SANDBOX_THREADS,
};
use crate::secret::{SECRET_REF_FORMS, SecretRef, resolve_secret};
use crate::sources::api::AcceptedTokens;
use crate::sources::poller::PollerConfig;

/// Where the HTTP API listens by default: loopback only, so an unconfigured engine is not
/// reachable from the network.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8480";

/// The port of [`DEFAULT_LISTEN`]: unassigned by IANA, above the privileged ports, so an
/// engine started as an ordinary user can bind it.
pub const DEFAULT_PORT: u16 = 8480;

/// Largest request body the ingest endpoint reads. A context is a few hundred bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a graceful shutdown waits for running deliveries before requeueing them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Longest `shutdown_grace_ms`: 10 minutes, already far past what a process supervisor waits
/// for a stop before it kills the process (systemd's default `TimeoutStopSec` is 90 s,
/// Kubernetes' `terminationGracePeriodSeconds` 30 s); a longer grace would only be cut short
/// by SIGKILL, which leaves the interrupted deliveries to wait for their leases. (A second
/// SIGTERM or SIGINT ends the grace at once.)
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(10 * 60);

/// Largest configuration file read (a config with hundreds of handlers is far smaller).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Most `[[handlers]]` one configuration may have. Keyfactor sites register a handful of Job
/// Complete Handlers; each here is a compiled component held in memory, loaded (or read from the
/// AOT cache) at every start and reload, with a queue claimed on its own. Without a bound a
/// configuration within [`MAX_CONFIG_BYTES`] could name some 30,000 (2,000 took two minutes and
/// 800 MB to check).
pub const MAX_HANDLERS: usize = 256;

/// Most characters of a path an error message quotes: Linux's `PATH_MAX`, so any path that can
/// name a file is shown whole.
pub const MAX_QUOTED_PATH_CHARS: usize = 4096;

/// Most characters of one configuration error's message: a safety net under the caps above for
/// messages other parts compose (a path, a list of allowed keys and the fix fit well within it).
pub const MAX_ERROR_MESSAGE_CHARS: usize = 8192;

/// Smallest `memory_bytes` of a handler (and `jobhook run --memory-bytes`): below 1 MiB not even
/// a minimal component instantiates, so a smaller budget is a typo, not a limit.
pub const MIN_HANDLER_MEMORY_BYTES: u64 = 1024 * 1024;

/// Largest `memory_bytes` of a handler (and `jobhook run --memory-bytes`): the size of a sandbox
/// pool slot, which no sandbox can grow past whatever it is given.
pub const MAX_HANDLER_MEMORY_BYTES: u64 = crate::runtime::engine::MAX_MEMORY_PER_SANDBOX as u64;

/// A path for an error message, cut to [`MAX_QUOTED_PATH_CHARS`] characters.
pub fn shown_path(path: &Path) -> String {
    excerpt(&path.display().to_string(), MAX_QUOTED_PATH_CHARS).into_owned()
}

/// `message` cut to [`MAX_ERROR_MESSAGE_CHARS`] characters.
fn capped(message: String) -> String {
    match excerpt(&message, MAX_ERROR_MESSAGE_CHARS) {
        Cow::Borrowed(_) => message,
        Cow::Owned(short) => short,
    }
}

/// `message` (a parser's or serde's) with every run of text it quotes in backticks or double
/// quotes cut to [`MAX_QUOTED_CHARS`] characters: serde quotes the operator's keys (``unknown
/// field `…` ``) and values (`invalid type: string "…"`) whole.
fn cap_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_ERROR_MESSAGE_CHARS));
    let mut chars = message.chars();
    while let Some(open) = chars.next() {
        out.push(open);
        if open != '`' && open != '"' {
            continue;
        }
        let mut inner = String::new();
        let (mut closed, mut escaped) = (false, false);
        for c in chars.by_ref() {
            if c == open && !escaped {
                closed = true;
                break;
            }
            // Double-quoted text is Rust's `Debug` of a string: `\"` does not end it.
            escaped = open == '"' && c == '\\' && !escaped;
            inner.push(c);
        }
        if closed {
            out.push_str(&excerpt(&inner, MAX_QUOTED_CHARS));
            out.push(open);
        } else {
            out.push_str(&inner);
        }
    }
    capped(out)
}

/// The dotted key path (`server.listen`) a TOML deserialization error was raised under, if the
/// parser recorded one. `toml::de::Error` keeps it private and shows it only when printed
/// without its source text, as a last line ``in `a.b` ``; that is read back here, exactly.
fn toml_key_path(e: &toml::de::Error) -> Option<String> {
    let mut bare = e.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let keys = shown
        .strip_prefix(e.message())?
        .strip_prefix('\n')?
        .strip_prefix("in `")?
        .strip_suffix("`\n")?;
    if keys.is_empty() {
        return None;
    }
    Some(
        keys.split('.')
            .map(|key| excerpt(key, MAX_QUOTED_CHARS))
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// The text of the line holding byte `offset` of `text`, trimmed and cut short, for an error
/// whose key is unknown.
fn source_line(text: &str, offset: usize) -> Option<String> {
    let line = text.get(..offset.min(text.len()))?.rsplit('\n').next()?;
    let rest = text.get(offset.min(text.len())..)?.split('\n').next()?;
    let whole = format!("{line}{rest}");
    let whole = whole.trim();
    (!whole.is_empty()).then(|| excerpt(whole, MAX_QUOTED_CHARS).into_owned())
}

/// What is said of a configuration file with nothing in it but white space and comments.
const EMPTY_CONFIGURATION: &str = "the configuration file is empty (nothing but white space and \
     comments); a file cut short while it was written or copied is the usual cause: restore it \
     (examples/jobhook.toml shows every section)";

/// Whether `text` holds nothing a configuration is made of: only white space (a byte-order mark
/// too) and comments. Such a file is valid TOML, read as every default and no handler; it is
/// almost always one cut short — by an editor, a `> jobhook.toml`, a copy that failed — and
/// loading it, at a reload above all, would stop every handler without a word, so it is refused.
/// A configuration without handlers written on purpose has at least a section.
fn is_empty_text(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        line.is_empty() || line.starts_with('#')
    })
}

/// A configuration error: which file, where, which key, and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong, naming the key.
    pub message: String,
}

/// The whole configuration, validated, with paths resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[server]`
    pub server: ServerConfig,
    /// `[store]`
    pub store: StoreConfig,
    /// `[engine]`
    pub engine: EngineConfig,
    /// `[quarantine]`
    pub quarantine: QuarantineConfig,
    /// `[keyfactor]`, `[mail]`, `[http]`: the services behind the capabilities.
    pub services: ServicesConfig,
    /// `[poller]`, when JobHistory is polled.
    pub poller: Option<PollerConfig>,
    /// `[[handlers]]`, in file order.
    pub handlers: Vec<Registration>,
    /// The files handler property secrets were read from, by setting
    /// (`handlers.<name>.properties.<key>`), for [`crate::app::secrets::exposed_secret_files`].
    pub property_secret_files: Vec<(String, PathBuf)>,
}

/// `[server]`: the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on.
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Bearer tokens for senders (the forwarder, a metrics scraper): they guard
    /// `POST /v1/job-complete` and `GET /metrics`, and, without `admin_tokens`, every endpoint
    /// but `/healthz` (which needs no token). None: posting events and `/metrics` need no token
    /// (only sensible on loopback, or with client certificates).
    pub tokens: Vec<SecretRef>,
    /// Bearer tokens for operators: they guard reading events and handlers, the forwarders'
    /// list and reloading, and open every endpoint.
    pub admin_tokens: Vec<SecretRef>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Graceful shutdown bound, in milliseconds.
    #[serde(rename = "shutdown_grace_ms", with = "crate::duration_ms")]
    pub shutdown_grace: Duration,
    /// HTTPS (and optionally client certificates) on the listener.
    pub tls: Option<TlsConfig>,
    /// Accept bearer tokens over plain HTTP on a non-loopback address (they can be read on the
    /// wire); refused unless set.
    pub allow_plaintext_tokens: bool,
    /// Listen on a non-loopback address with neither tokens nor client certificates (anyone
    /// who can reach the port can post events); refused unless set.
    pub allow_unauthenticated: bool,
    /// How long an ingest `Idempotency-Key` holds, in milliseconds: a resend with the same key
    /// within it gets the original event. An API promise to the forwarder, hence here rather
    /// than under `[store]` (which only keeps the keys).
    #[serde(rename = "idempotency_retention_ms", with = "crate::duration_ms")]
    pub idempotency_retention: Duration,
    /// How long a connection may take to deliver a complete request head, in milliseconds
    /// (from accept, or from the first byte of a kept-alive connection's next request): slow
    /// clients (headers trickled a byte at a time) cannot hold connections.
    #[serde(rename = "header_read_timeout_ms", with = "crate::duration_ms")]
    pub header_read_timeout: Duration,
    /// How long the ingest request body may take to arrive, in milliseconds; over it: `408`.
    #[serde(rename = "body_read_timeout_ms", with = "crate::duration_ms")]
    pub body_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request, in milliseconds.
    #[serde(rename = "idle_timeout_ms", with = "crate::duration_ms")]
    pub idle_timeout: Duration,
    /// Connections open at once; more are refused (plain HTTP: `503`; TLS: closed).
    pub max_connections: usize,
    /// Connections open at once from one client IP address; more are refused the same way.
    /// Unset: [`connections::DEFAULT_MAX_CONNECTIONS_PER_CLIENT`], or `max_connections` when
    /// that is lower (lowering the total alone must not make the default per-client cap an
    /// error).
    pub max_connections_per_client: Option<usize>,
}

impl ServerConfig {
    /// The listener's caps and timeouts.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client.unwrap_or(
                connections::DEFAULT_MAX_CONNECTIONS_PER_CLIENT.min(self.max_connections),
            ),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))),
            tokens: Vec::new(),
            admin_tokens: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            tls: None,
            allow_plaintext_tokens: false,
            allow_unauthenticated: false,
            idempotency_retention: crate::sources::idempotency::DEFAULT_RETENTION,
            header_read_timeout: connections::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: connections::DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: connections::DEFAULT_IDLE_TIMEOUT,
            max_connections: connections::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: None,
        }
    }
}

/// What a property value may be, for errors about one that is not.
const PROPERTY_VALUE_FORMS: &str = "a string (numbers and booleans in quotes: \"5\", \"true\"), \
     { env = \"NAME\" } or { file = \"PATH\" }";

/// A property value: a plain string, or a secret reference `{ env = "NAME" }` /
/// `{ file = "path" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// The value itself.
    Plain(String),
    /// A reference to the value.
    Secret(SecretRef),
}

/// Read by hand rather than as an untagged enum, whose only error is "data did not match any
/// variant": every refusal says what a property value may be.
impl<'de> Deserialize<'de> for PropertyValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;

        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = PropertyValue;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(PROPERTY_VALUE_FORMS)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<PropertyValue, E> {
                Ok(PropertyValue::Plain(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<PropertyValue, E> {
                Ok(PropertyValue::Plain(value))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PropertyValue, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(format!(
                        "an empty table is not a property value; a property value is \
                         {PROPERTY_VALUE_FORMS}"
                    )));
                };
                let secret = match key.as_str() {
                    "env" | "file" => {
                        let value: String = map.next_value()?;
                        match (key.as_str(), value.is_empty()) {
                            (_, true) => {
                                return Err(de::Error::custom(format!(
                                    "`{key}` is empty; a secret property is {SECRET_REF_FORMS}"
                                )));
                            }
                            ("env", false) => SecretRef::Env(value),
                            _ => SecretRef::File(PathBuf::from(value)),
                        }
                    }
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown key `{}` in a property value; a property value is \
                             {PROPERTY_VALUE_FORMS}",
                            excerpt(other, MAX_QUOTED_CHARS)
                        )));
                    }
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(format!(
                        "a secret property gives either env or file, not both: \
                         {SECRET_REF_FORMS}"
                    )));
                }
                Ok(PropertyValue::Secret(secret))
            }
        }

        deserializer.deserialize_any(ValueVisitor)
    }
}

/// Reads `[server] listen`: an IP address and port. `SocketAddr`'s own error ("invalid socket
/// address syntax") says neither that a host name is not accepted nor what to write instead.
fn listen_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.trim().parse().map_err(|_| {
        // An address with a port past 65535 is a port mistake, not a host name.
        let port = text.trim().rsplit_once(':').map(|(_, port)| port);
        if let Some(port) = port.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && port.parse::<u16>().is_err()
        {
            return de::Error::custom(format!(
                "{}: port {} is out of range; give 1 to 65535 (or 0 for any free port)",
                quoted(&text),
                excerpt(port, MAX_QUOTED_CHARS)
            ));
        }
        de::Error::custom(format!(
            "{} is not an IP address and port; write e.g. \"127.0.0.1:{DEFAULT_PORT}\", \
             \"0.0.0.0:{DEFAULT_PORT}\" or \"[::1]:{DEFAULT_PORT}\" (a host name such as localhost is not \
             accepted: the listener binds an address)",
            quoted(&text)
        ))
    })
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    engine: EngineConfig,
    #[serde(default)]
    quarantine: QuarantineConfig,
    // One section per grantable capability, named here rather than flattened from
    // `ServicesConfig`: serde's `flatten` buffers what it takes, and an error inside lost its
    // place (a literal secret in `[keyfactor.auth]` was reported at line 1, "in `[server]`").
    // A capability added to `ServicesConfig` without its field here does not compile
    // (`services` below builds it field by field).
    /// `[keyfactor]`.
    #[serde(default)]
    keyfactor:
        <crate::capabilities::keyfactor::Keyfactor as crate::capabilities::Grantable>::Config,
    /// `[mail]`.
    #[serde(default)]
    mail: <crate::capabilities::mail::Mail as crate::capabilities::Grantable>::Config,
    /// `[http]`.
    #[serde(default)]
    http: <crate::capabilities::http::Http as crate::capabilities::Grantable>::Config,
    poller: Option<PollerConfig>,
    #[serde(default)]
    handlers: Vec<Spanned<RawHandler>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    name: Spanned<String>,
    component: Spanned<PathBuf>,
    job_types: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    properties: BTreeMap<String, Spanned<PropertyValue>>,
    grants: Option<Spanned<Grants>>,
    limits: Option<Spanned<Limits>>,
    retry: Option<Spanned<RetryPolicy>>,
    max_concurrency: Option<Spanned<usize>>,
}

/// Where `[server]` keys are written, for errors about their combination.
#[derive(Debug, Default, Deserialize)]
struct SpansDoc {
    #[serde(default)]
    server: ServerSpans,
}

#[derive(Debug, Default, Deserialize)]
struct ServerSpans {
    listen: Option<Spanned<toml::Value>>,
    tokens: Option<Spanned<toml::Value>>,
    admin_tokens: Option<Spanned<toml::Value>>,
}

/// A `Spanned` for a key that was left out: no line of its own.
fn absent<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

/// Shortest bearer token taken without a warning: 24 characters are 96 bits as hexadecimal
/// and 144 as base64, beyond guessing over the network; a word or a short phrase is not.
/// Shorter ones still work (a test rig's, a migration's), with a warning at `check`, at start
/// and at every reload.
pub const MIN_TOKEN_CHARS: usize = 24;

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |message: String| ConfigError {
            file: path.to_path_buf(),
            line: None,
            message,
        };
        // Read as bytes, so that a cut through a character at the limit is not mistaken for a
        // file that is not UTF-8; a FIFO or device is refused (crate::files).
        let bytes = crate::files::read_regular(path, MAX_CONFIG_BYTES).map_err(|e| match e {
            crate::files::ReadError::TooLarge(_) => fail(format!(
                "the configuration file holds more than {MAX_CONFIG_BYTES} bytes, the limit"
            )),
            e => fail(format!("cannot read the configuration file: {e}")),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let valid = e.as_bytes().get(..at).unwrap_or_default();
            let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
            let column = at - valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) + 1;
            fail(format!(
                "cannot read the configuration file: it is not valid UTF-8 (line {line}, byte \
                 {column} of the line: {:#04x}); save it as UTF-8",
                e.as_bytes().get(at).copied().unwrap_or_default()
            ))
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in errors and resolves relative
    /// paths. Text with nothing but white space and comments is refused ([`is_empty_text`]).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        if is_empty_text(text) {
            return Err(ConfigError {
                file: path.to_path_buf(),
                line: None,
                message: EMPTY_CONFIGURATION.to_owned(),
            });
        }
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&e, text, path))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let v = Validator {
            text,
            path,
            base: &base,
        };
        let mut server = raw.server;
        if let Some(tls) = server.tls.as_mut() {
            tls.rebase(&base);
        }
        v.check_server(&server)?;
        v.check_store_section(&raw.store)?;
        if !(1..=MAX_CONCURRENT_DELIVERIES).contains(&raw.engine.max_concurrent_deliveries) {
            return Err(v.error(
                None,
                &format!(
                    "[engine] max_concurrent_deliveries must be between 1 and {MAX_CONCURRENT_DELIVERIES}"
                ),
            ));
        }
        let slots = raw.engine.max_concurrent_deliveries.saturating_mul(
            usize::try_from(raw.engine.memories_per_delivery).unwrap_or(usize::MAX),
        );
        if slots > MAX_MEMORY_SLOTS {
            return Err(v.error(
                None,
                &format!(
                    "[engine] max_concurrent_deliveries ({}) × memories_per_delivery ({}) is {slots} \
                     memory slots; the sandbox pool reserves about 4 GiB of address space for \
                     each and may hold at most {MAX_MEMORY_SLOTS}: lower one of them",
                    raw.engine.max_concurrent_deliveries, raw.engine.memories_per_delivery
                ),
            ));
        }
        if raw.engine.sandbox_threads > MAX_SANDBOX_THREADS {
            return Err(v.error(
                None,
                &format!(
                    "[engine] sandbox_threads must be at most {MAX_SANDBOX_THREADS} (0: deliveries run on the engine's own delivery threads, apart from ingest, with no threads of their own)"
                ),
            ));
        }
        if !(1..=MAX_COMPONENT_BYTES).contains(&raw.engine.max_component_bytes) {
            return Err(v.error(
                None,
                &format!(
                    "[engine] max_component_bytes must be between 1 and {MAX_COMPONENT_BYTES} (the default is {})",
                    crate::runtime::loader::DEFAULT_MAX_COMPONENT_BYTES
                ),
            ));
        }
        if raw.engine.compile_timeout.is_zero() {
            return Err(v.error(
                None,
                "[engine] compile_timeout_ms must be at least 1 (the default is 60000)",
            ));
        }
        if let Err(e) = raw.engine.pool().validate() {
            return Err(v.error(None, &format!("[engine] {e}")));
        }
        let q = &raw.quarantine;
        if q.after_failures > 0 && q.initial_backoff.is_zero() {
            return Err(v.error(
                None,
                "[quarantine] initial_backoff_ms must be at least 1 (a quarantine of 0 ms sets \
                 nothing aside); to turn quarantine off, set after_failures = 0",
            ));
        }
        if q.after_failures > 0 && q.max_backoff < q.initial_backoff {
            return Err(v.error(
                None,
                &format!(
                    "[quarantine] max_backoff_ms ({}) must be at least initial_backoff_ms ({})",
                    q.max_backoff.as_millis(),
                    q.initial_backoff.as_millis()
                ),
            ));
        }
        let mut services = ServicesConfig {
            keyfactor: raw.keyfactor,
            mail: raw.mail,
            http: raw.http,
        };
        if let Some(first_over) = raw.handlers.get(MAX_HANDLERS) {
            return Err(v.error(
                Some(line_of(text, first_over.span().start)),
                &format!(
                    "{} [[handlers]] are configured; at most {MAX_HANDLERS} are accepted (each is \
                     a compiled component kept in memory, loaded at every start and reload, with \
                     a queue of its own); this is the first past the limit",
                    raw.handlers.len()
                ),
            ));
        }
        let mut handlers = Vec::with_capacity(raw.handlers.len());
        let mut property_secret_files = Vec::new();
        let mut seen = BTreeMap::new();
        let pool = raw.engine.pool();
        for raw_handler in raw.handlers {
            let line = line_of(text, raw_handler.span().start);
            let handler = v.handler(
                raw_handler.into_inner(),
                line,
                &services,
                &pool,
                &mut property_secret_files,
            )?;
            if let Some(first) = seen.insert(handler.name.to_ascii_lowercase(), handler.line) {
                return Err(v.error(
                    Some(handler.line),
                    &format!(
                        "handlers.name: {:?} is already used by the handler at line {first}; \
                         names must be unique (compared case-insensitively)",
                        handler.name
                    ),
                ));
            }
            handlers.push(handler);
        }
        let mut store = raw.store;
        store.data_dir = base.join(&store.data_dir);
        if let Some(SecretRef::File(path)) = store.password.as_mut() {
            *path = base.join(&*path);
        }
        let mut engine = raw.engine;
        engine.cache_dir = Some(match &engine.cache_dir {
            Some(dir) => base.join(dir),
            None => store.data_dir.join(DEFAULT_CACHE_DIR),
        });
        services.rebase(&base);
        if let Some(poller) = &raw.poller {
            poller
                .job_type_ids()
                .map_err(|e| v.error(None, &e.to_string()))?;
            if services.keyfactor.is_none() {
                return Err(v.error(
                    None,
                    "[poller] polls the Keyfactor API: configure [keyfactor] base_url and auth too",
                ));
            }
        }
        Ok(Config {
            path: path.to_path_buf(),
            server,
            store,
            engine,
            quarantine: raw.quarantine,
            services,
            poller: raw.poller,
            handlers,
            property_secret_files,
        })
    }

    /// One warning for each bearer token of `tokens` (as [`Config::resolve_tokens`] resolved
    /// them) shorter than [`MIN_TOKEN_CHARS`], naming where it comes from — never its value.
    pub fn short_tokens(&self, tokens: &AcceptedTokens) -> Vec<String> {
        [
            ("tokens", &self.server.tokens, &tokens.senders),
            ("admin_tokens", &self.server.admin_tokens, &tokens.admins),
        ]
        .into_iter()
        .flat_map(|(key, references, values)| {
            references
                .iter()
                .zip(values)
                .filter(|(_, value)| value.chars().count() < MIN_TOKEN_CHARS)
                .map(move |(reference, value)| {
                    format!(
                        "server.{key}: the token from {} has {} characters; one shorter than \
                         {MIN_TOKEN_CHARS} can be guessed: make a long random one (`openssl rand \
                         -hex 32`) and give it to the clients that use this one",
                        crate::escape::escape(&reference.to_string()),
                        value.chars().count()
                    )
                })
        })
        .collect()
    }

    /// The bearer tokens of both kinds, resolved. One token in both lists is refused: it would
    /// open everything, which is not what listing it as a sender's says.
    pub fn resolve_tokens(&self) -> Result<AcceptedTokens, ConfigError> {
        let senders = self.resolve_token_list("tokens", &self.server.tokens)?;
        let admins = self.resolve_token_list("admin_tokens", &self.server.admin_tokens)?;
        for (reference, token) in self.server.admin_tokens.iter().zip(&admins) {
            if let Some(sender) = senders.iter().position(|s| s == token) {
                let named = |r: &SecretRef| crate::escape::escape(&r.to_string()).into_owned();
                return Err(ConfigError {
                    file: self.path.clone(),
                    line: None,
                    message: format!(
                        "server.admin_tokens: the token from {} is also in [server] tokens (from \
                         {}); a sender's token opens only posting events and metrics, an admin \
                         token everything: give each its own token",
                        named(reference),
                        self.server
                            .tokens
                            .get(sender)
                            .map(named)
                            .unwrap_or_default(),
                    ),
                });
            }
        }
        Ok(AcceptedTokens { senders, admins })
    }

    /// The tokens of `[server] <key>`, resolved; a message names the key and which reference.
    fn resolve_token_list(
        &self,
        key: &str,
        references: &[SecretRef],
    ) -> Result<Vec<String>, ConfigError> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        references
            .iter()
            .map(|t| {
                let fail = |message: String| ConfigError {
                    file: self.path.clone(),
                    line: None,
                    message: format!("server.{key}: {message}"),
                };
                let token = resolve_secret(t, base)
                    .map(|s| s.expose().to_owned())
                    .map_err(|e| fail(e.to_string()))?;
                // A client sends it after `Bearer ` in a header, trimmed: a token with a space
                // or a control character could never match, and loading one would lock every
                // client out (by a reload as well). Which of the tokens is named, never its value.
                if let Some(problem) = crate::secret::bearer_token_problem(&token) {
                    return Err(fail(format!(
                        "the token from {} {problem}",
                        crate::escape::escape(&t.to_string()),
                    )));
                }
                Ok(token)
            })
            .collect()
    }

    /// Whether `serve` could open the store where the configuration puts it, found out without
    /// creating or opening anything: for SQLite, `[store] data_dir` must be a directory this
    /// process may write in, or not exist yet below one (`serve` creates it). A PostgreSQL
    /// store is reached only by `serve`.
    pub fn check_store_location(&self) -> Result<(), ConfigError> {
        if self.store.kind != crate::queue::store::config::StoreKind::Sqlite {
            return Ok(());
        }
        usable_directory(&self.store.data_dir).map_err(|problem| ConfigError {
            file: self.path.clone(),
            line: None,
            message: capped(format!(
                "[store] data_dir: {problem}; point data_dir at a directory jobhook may write \
                 in, or at one it can create (relative paths are relative to the configuration \
                 file)"
            )),
        })
    }

    /// What `serve` would meet at `[engine] cache_dir` when it is not a directory this process
    /// may write in or create, or one it would not trust (a symbolic link, another user's, one
    /// others may write, or below a directory another user could swap it through:
    /// [`crate::runtime::aot::check_trusted`]): a warning for `check`, not an
    /// error, since the cache is an optimisation and `serve` runs without it (saying so in its
    /// log).
    pub fn cache_dir_warning(&self) -> Option<String> {
        let dir = self.engine.cache_dir.as_ref()?;
        // What to do differs: a directory serve cannot use wants another place; the message
        // about one it would not trust says how to fix it already.
        let consequence = "serve will run without the AOT cache and compile every handler at \
                           every start";
        Some(capped(match usable_directory(dir) {
            Err(problem) => format!(
                "[engine] cache_dir: {problem}; {consequence}: point cache_dir at a directory \
                 jobhook may write in"
            ),
            Ok(()) => {
                std::fs::symlink_metadata(dir).ok()?;
                let untrusted = crate::runtime::aot::check_trusted(dir).err()?;
                format!("[engine] cache_dir: {consequence}: {untrusted}")
            }
        }))
    }

    /// Checks every handler of this configuration, read for a reload, against the sections a
    /// reload cannot apply as the running engine has them: `running` is the configuration it
    /// started with, which its capability services and its sandbox pool were built from. The
    /// file was checked against its own sections when it was read; a handler that needs what
    /// only a restart applies (a grant of mail with `[mail]` added, a grant of an identity added
    /// under `[keyfactor.identities]`, a limit above the pool caps it raises) would otherwise be
    /// taken and fail at every delivery, or be held below the limit it shows, until a restart.
    /// The rules are the ones [`Config::parse`] checks each handler by
    /// ([`ServicesConfig::check_grants`], [`above_pool`]), run against the running sections.
    pub fn check_handlers_against_running(&self, running: &Config) -> Result<(), ConfigError> {
        let pool = running.engine.pool();
        for handler in &self.handlers {
            let name = &handler.name;
            let refused = |message: String| ConfigError {
                file: self.path.clone(),
                line: Some(handler.line),
                message: capped(message),
            };
            if let Err(grant) = running.services.check_grants(&handler.grants) {
                let interface = grant.capability.interface();
                let section = format!("[{interface}]");
                let problem = match &grant.problem {
                    GrantProblem::NotConfigured => format!(
                        "handlers.grants.{interface} (handler {name:?}): the running engine was \
                         started without {}, so every call would answer not-available",
                        grant.capability.config_key()
                    ),
                    GrantProblem::Grant(_) => format!(
                        "handlers.grants.{grant} (handler {name:?}), in the running engine, \
                         which has the {section} it was started with"
                    ),
                };
                return Err(refused(format!(
                    "{problem}; {section} is applied only at a restart: restart jobhook to \
                     apply {section} first, or reload without the grant"
                )));
            }
            if let Some(AbovePool {
                limit,
                value,
                engine_key,
                cap,
            }) = above_pool(&handler.limits, &pool)
            {
                return Err(refused(format!(
                    "handlers.limits (handler {name:?}): {limit} = {value} is above [engine] \
                     {engine_key} of the running engine ({cap}), which its sandbox pool holds \
                     every component to; [engine] is applied only at a restart: restart jobhook \
                     to apply [engine] first, or reload with {limit} at most {cap}"
                )));
            }
        }
        Ok(())
    }
}

/// Whether `dir` is a directory this process may write in, or one it could create below the
/// nearest of its ancestors that exists (what `serve` finds); the problem, naming the path,
/// otherwise. Nothing is created.
fn usable_directory(dir: &Path) -> Result<(), String> {
    // The nearest of the directory and its ancestors that exists: what `serve` finds.
    let mut existing = None;
    for at in dir.ancestors() {
        let at = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        match std::fs::metadata(at) {
            Ok(meta) => {
                existing = Some((at, meta));
                break;
            }
            // Missing, or below a file: look further up.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) => {}
            Err(e) => {
                return Err(format!("cannot inspect {}: {e}", shown_path(at)));
            }
        }
    }
    let Some((at, meta)) = existing else {
        return Ok(());
    };
    let shown = shown_path(dir);
    if !meta.is_dir() {
        return Err(if at == dir {
            format!("{shown} exists and is not a directory")
        } else {
            format!(
                "{shown} cannot be created: {} is not a directory",
                shown_path(at)
            )
        });
    }
    if let Err(e) = crate::files::writable(at) {
        return Err(if at == dir {
            format!("{shown} is not writable ({e})")
        } else {
            format!(
                "{shown} cannot be created: {} is not writable ({e})",
                shown_path(at)
            )
        });
    }
    Ok(())
}

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
    base: &'a Path,
}

impl Validator<'_> {
    fn error(&self, line: Option<usize>, message: &str) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line,
            message: capped(message.to_owned()),
        }
    }

    fn line(&self, span: std::ops::Range<usize>) -> Option<usize> {
        (span.start > 0 || span.end > 0).then(|| line_of(self.text, span.start))
    }

    fn check_server(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        use crate::context::MAX_CONTEXT_BYTES;
        if !(1024..=MAX_CONTEXT_BYTES).contains(&server.max_body_bytes) {
            // Above the context's own limit a larger body would be read and then refused all
            // the same: the setting would promise what ingest never does.
            return Err(self.error(
                None,
                &format!(
                    "[server] max_body_bytes must be between 1024 and {MAX_CONTEXT_BYTES} (the \
                     largest job context ingest accepts), not {}",
                    server.max_body_bytes
                ),
            ));
        }
        use crate::sources::idempotency::{MAX_RETENTION, MIN_RETENTION};
        if !(MIN_RETENTION..=MAX_RETENTION).contains(&server.idempotency_retention) {
            return Err(self.error(
                None,
                &format!(
                    "[server] idempotency_retention_ms must be between {} and {}",
                    MIN_RETENTION.as_millis(),
                    MAX_RETENTION.as_millis()
                ),
            ));
        }
        if server.shutdown_grace > MAX_SHUTDOWN_GRACE {
            return Err(self.error(
                None,
                &format!(
                    "[server] shutdown_grace_ms must be at most {} (10 minutes: longer than a \
                     service manager waits for a stop), not {}; a second SIGTERM or SIGINT ends \
                     the grace early",
                    MAX_SHUTDOWN_GRACE.as_millis(),
                    server.shutdown_grace.as_millis()
                ),
            ));
        }
        server
            .connection_limits()
            .validate()
            .map_err(|e| self.error(None, &e))?;
        if let Some(tls) = &server.tls {
            tls.validate()
                .map_err(|e| self.error(self.line(e.span.clone()), &e.to_string()))?;
        }
        self.check_exposure(server)
    }

    /// Who can reach the listener and what protects it: tokens only over TLS, and something
    /// (tokens or client certificates) off loopback — unless the operator explicitly allows it.
    fn check_exposure(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        let address = server.listen;
        if address.ip().is_loopback() {
            return Ok(());
        }
        // Lines of the keys involved, from a second, lenient read of the text.
        let spans: SpansDoc = toml::from_str(self.text).unwrap_or_default();
        let listen_line = spans.server.listen.and_then(|l| self.line(l.span()));
        let tokens_line = spans.server.tokens.and_then(|t| self.line(t.span()));
        let admin_tokens_line = spans.server.admin_tokens.and_then(|t| self.line(t.span()));
        let mtls = server
            .tls
            .as_ref()
            .is_some_and(TlsConfig::requires_client_certificates);
        let tokens = !server.tokens.is_empty() || !server.admin_tokens.is_empty();
        if tokens && server.tls.is_none() && !server.allow_plaintext_tokens {
            let (key, line) = if server.tokens.is_empty() {
                ("admin_tokens", admin_tokens_line)
            } else {
                ("tokens", tokens_line)
            };
            return Err(self.error(
                line.or(listen_line),
                &format!(
                    "[server] {key}: bearer tokens would travel in plain text on {address}; \
                     configure [server] tls = {{ cert = \"server.pem\", key = \"server.key\" }}, \
                     or listen on 127.0.0.1, or set [server] allow_plaintext_tokens = true"
                ),
            ));
        }
        // Admin tokens guard administration, not ingest: posting events needs `tokens` or
        // client certificates.
        if server.tokens.is_empty() && !mtls && !server.allow_unauthenticated {
            let admin_only = if server.admin_tokens.is_empty() {
                ""
            } else {
                " ([server] admin_tokens guard only the administrator's endpoints)"
            };
            return Err(self.error(
                listen_line,
                &format!(
                    "[server] listen: {address} is reachable from the network but neither \
                     [server] tokens nor [server] tls.client_ca is set, so anyone could post \
                     events{admin_only}; configure tokens or client certificates, or listen on \
                     127.0.0.1, or set [server] allow_unauthenticated = true"
                ),
            ));
        }
        Ok(())
    }

    fn check_store_section(&self, store: &StoreConfig) -> Result<(), ConfigError> {
        store
            .validate(self.base)
            .map_err(|e| self.error(None, &e.to_string()))
    }

    fn handler(
        &self,
        raw: RawHandler,
        line: usize,
        services: &ServicesConfig,
        pool: &crate::runtime::engine::PoolSettings,
        secret_files: &mut Vec<(String, PathBuf)>,
    ) -> Result<Registration, ConfigError> {
        let name_line = self.line(raw.name.span()).or(Some(line));
        let name = raw.name.into_inner();
        if !is_handler_name(&name) {
            return Err(self.error(
                name_line,
                &format!(
                    "handlers.name: {} is not a valid name; use 1 to {MAX_HANDLER_NAME} \
                     letters, digits, '-', '_' or '.'",
                    quoted(&name)
                ),
            ));
        }
        // A key in messages: its path under `handlers`, then which handler
        // (`handlers.retry.max_attempts (handler "h")`).
        let key_of = |key: &str| format!("handlers.{key} (handler {name:?})");
        let at =
            |key: &str, span: std::ops::Range<usize>| (self.line(span).or(Some(line)), key_of(key));

        let (component_line, key) = at("component", raw.component.span());
        if raw.component.get_ref().as_os_str().is_empty() {
            return Err(self.error(
                component_line,
                &format!("{key} is empty: give the path of the handler's .wasm file"),
            ));
        }
        let component = self.base.join(raw.component.into_inner());
        if !component.is_file() {
            let build = crate::app::component_file::missing_build_output_hint(&component)
                .unwrap_or_else(|| {
                    format!(
                        "build the handler ({})",
                        crate::runtime::loader::BUILD_COMMAND
                    )
                });
            return Err(self.error(
                component_line,
                &format!(
                    "{key}: {} does not exist or is not a file; {build}, or fix the path \
                     (relative paths are relative to the configuration file)",
                    shown_path(&component)
                ),
            ));
        }

        let job_types = self.job_types(raw.job_types, &name, line)?;

        let mut values = BTreeMap::new();
        let mut secret_properties = BTreeSet::new();
        for (key, value) in raw.properties {
            // A name of plain characters as written; any other quoted, so that it cannot
            // break the message's line or pass for more of it.
            let plain = key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            let shown = if plain {
                excerpt(&key, MAX_QUOTED_CHARS).into_owned()
            } else {
                quoted(&key)
            };
            let (value_line, what) = at(&format!("properties.{shown}"), value.span());
            if let Some(problem) = crate::capabilities::properties::name_problem(&key) {
                return Err(self.error(value_line, &format!("{what}: {problem}")));
            }
            let resolved = match value.into_inner() {
                PropertyValue::Plain(v) => v,
                PropertyValue::Secret(secret) => {
                    secret_properties.insert(key.clone());
                    if let SecretRef::File(file) = &secret {
                        secret_files.push((
                            format!("handlers.{name}.properties.{shown}"),
                            self.base.join(file),
                        ));
                    }
                    resolve_secret(&secret, self.base)
                        .map(|s| s.expose().to_owned())
                        .map_err(|e| self.error(value_line, &format!("{what}: {e}")))?
                }
            };
            values.insert(key, resolved);
        }

        let raw_grants = raw.grants.unwrap_or_else(|| absent(Grants::default()));
        let (grants_line, _) = at("grants", raw_grants.span());
        let grants = raw_grants.into_inner();
        services.check_grants(&grants).map_err(|e| {
            self.error(
                grants_line,
                &format!("handlers.grants.{e} (handler {name:?})"),
            )
        })?;
        let raw_limits = raw.limits.unwrap_or_else(|| absent(Limits::default()));
        let (limits_line, key) = at("limits", raw_limits.span());
        let limits = raw_limits.into_inner();
        self.check_limits(&limits, pool, limits_line, &key)?;

        let raw_retry = raw.retry.unwrap_or_else(|| absent(RetryPolicy::default()));
        let (retry_line, _) = at("retry", raw_retry.span());
        let retry = raw_retry.into_inner();
        if retry.max_attempts == 0 || retry.max_attempts > MAX_RETRY_ATTEMPTS {
            return Err(self.error(
                retry_line,
                &format!(
                    "{} must be between 1 and {MAX_RETRY_ATTEMPTS}",
                    key_of("retry.max_attempts")
                ),
            ));
        }
        // As `[quarantine]` refuses a quarantine of 0 ms: a retry without a wait is a loop
        // against what just failed, not a policy.
        if retry.max_attempts > 1 && retry.backoff.is_zero() {
            return Err(self.error(
                retry_line,
                &format!(
                    "{} must be at least 1 when max_attempts is above 1: a retry without a wait \
                     runs again at once against what just failed (a relay or an API that is \
                     down), as often as max_attempts allows",
                    key_of("retry.backoff_ms")
                ),
            ));
        }
        if retry.max_backoff < retry.backoff {
            return Err(self.error(
                retry_line,
                &format!(
                    "{} must be at least backoff_ms ({}), not {}: it caps the doubled waits, \
                     not the first one",
                    key_of("retry.max_backoff_ms"),
                    retry.backoff.as_millis(),
                    retry.max_backoff.as_millis()
                ),
            ));
        }

        let raw_concurrency = raw
            .max_concurrency
            .unwrap_or_else(|| absent(DEFAULT_HANDLER_CONCURRENCY));
        let (concurrency_line, key) = at("max_concurrency", raw_concurrency.span());
        let max_concurrency = raw_concurrency.into_inner();
        if !(1..=MAX_CONCURRENT_DELIVERIES).contains(&max_concurrency) {
            return Err(self.error(
                concurrency_line,
                &format!(
                    "{key} must be between 1 and {MAX_CONCURRENT_DELIVERIES} (no engine runs \
                     more deliveries at once)"
                ),
            ));
        }

        Ok(Registration {
            name,
            component,
            job_types,
            properties: Properties::new(values),
            secret_properties,
            grants,
            limits,
            retry,
            max_concurrency,
            line,
        })
    }

    fn job_types(
        &self,
        raw: Spanned<Vec<Spanned<String>>>,
        name: &str,
        line: usize,
    ) -> Result<JobTypes, ConfigError> {
        let list_line = self.line(raw.span()).or(Some(line));
        let entries = raw.into_inner();
        if entries.is_empty() {
            return Err(self.error(
                list_line,
                &format!(
                    "handlers.job_types (handler {name:?}) is empty; list the job type GUIDs \
                     the handler runs for, or [\"*\"] for every job type"
                ),
            ));
        }
        let mut ids = BTreeSet::new();
        let mut wildcard = false;
        for entry in entries {
            let entry_line = self.line(entry.span()).or(list_line);
            let text = entry.into_inner();
            if text.trim() == "*" {
                wildcard = true;
            } else if let Some(id) = parse_guid(&text) {
                ids.insert(id);
            } else {
                return Err(self.error(
                    entry_line,
                    &format!(
                        "handlers.job_types (handler {name:?}): {} is not a job type GUID \
                         (e.g. \"7b6bbc1b-d802-4b09-bec9-f5c221083130\") or \"*\"",
                        quoted(&text)
                    ),
                ));
            }
        }
        match (wildcard, ids.is_empty()) {
            (true, true) => Ok(JobTypes::All),
            (true, false) => Err(self.error(
                list_line,
                &format!(
                    "handlers.job_types (handler {name:?}) mixes \"*\" with GUIDs; use either \
                     [\"*\"] or a list of GUIDs"
                ),
            )),
            (false, _) => Ok(JobTypes::Only(ids)),
        }
    }

    fn check_limits(
        &self,
        l: &Limits,
        pool: &crate::runtime::engine::PoolSettings,
        line: Option<usize>,
        key: &str,
    ) -> Result<(), ConfigError> {
        use crate::limits::{
            MAX_HOSTCALL_BYTES, MAX_LOG_BYTES, MAX_LOG_LINES, MAX_OUTPUT_BYTES, MAX_TABLE_ELEMENTS,
            MIN_HOSTCALL_BYTES,
        };
        let problem = if l.timeout.is_zero() {
            Some("timeout_ms must be at least 1".to_owned())
        } else if !(MIN_HANDLER_MEMORY_BYTES..=MAX_HANDLER_MEMORY_BYTES).contains(&l.memory_bytes) {
            Some(format!(
                "memory_bytes must be between {MIN_HANDLER_MEMORY_BYTES} ({} MiB) and \
                 {MAX_HANDLER_MEMORY_BYTES} ({} MiB); it is {}",
                MIN_HANDLER_MEMORY_BYTES >> 20,
                MAX_HANDLER_MEMORY_BYTES >> 20,
                l.memory_bytes
            ))
        } else if l.instances == 0 || l.memories == 0 || l.tables == 0 {
            Some("instances, memories and tables must be at least 1".to_owned())
        } else if let Some(AbovePool {
            limit,
            value,
            engine_key,
            cap,
        }) = above_pool(l, pool)
        {
            Some(format!(
                "{limit} = {value} is above [engine] {engine_key} ({cap}), which the sandbox \
                 pool holds every component to: lower {limit}, or raise {engine_key}"
            ))
        } else if !(1..=MAX_TABLE_ELEMENTS).contains(&l.table_elements) {
            Some(format!(
                "table_elements must be between 1 and {MAX_TABLE_ELEMENTS} (the sandbox pool's \
                 room per table)"
            ))
        } else if !(MIN_HOSTCALL_BYTES..=MAX_HOSTCALL_BYTES).contains(&l.hostcall_bytes) {
            Some(format!(
                "hostcall_bytes must be between {MIN_HOSTCALL_BYTES} and {MAX_HOSTCALL_BYTES}"
            ))
        } else if l.output_bytes > MAX_OUTPUT_BYTES {
            Some(format!("output_bytes must be at most {MAX_OUTPUT_BYTES}"))
        } else if l.log_lines > MAX_LOG_LINES || l.log_bytes > MAX_LOG_BYTES {
            Some(format!(
                "log_lines must be at most {MAX_LOG_LINES} and log_bytes at most {MAX_LOG_BYTES} \
                 (a delivery's log is stored with its outcome and sent whole by GET \
                 /v1/events/{{id}})"
            ))
        } else if let Some(unknown) = l
            .calls
            .keys()
            .find(|name| Capability::from_interface(name).is_none())
        {
            let known: Vec<String> = Capability::ALL
                .iter()
                .map(|c| format!("{}_calls", c.interface()))
                .collect();
            Some(format!(
                "{}_calls: there is no capability called {} (call limits: {})",
                excerpt(unknown, MAX_QUOTED_CHARS),
                quoted(unknown),
                known.join(", ")
            ))
        } else {
            None
        };
        match problem {
            Some(p) => Err(self.error(line, &format!("{key}: {p}"))),
            None => Ok(()),
        }
    }
}

/// A handler limit above a per-component cap of the sandbox pool (`[engine]`), which would stop
/// the component there while the handler's listing showed the larger number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AbovePool {
    /// The key under `handlers.limits` (`instances`).
    limit: &'static str,
    /// The handler's value.
    value: usize,
    /// The `[engine]` key of the cap (`max_core_instances_per_component`).
    engine_key: &'static str,
    /// The cap.
    cap: u32,
}

/// The first limit of `l` above `pool`'s cap for it, if any. A limit left at its default is
/// not compared: the handler is then held to the engine's cap, which an operator may lower.
/// Checked when a configuration is read (against its own `[engine]`) and at a reload (against
/// the pool the running engine was built with, which only a restart replaces).
fn above_pool(l: &Limits, pool: &crate::runtime::engine::PoolSettings) -> Option<AbovePool> {
    let defaults = Limits::default();
    [
        (
            "instances",
            l.instances,
            defaults.instances,
            "max_core_instances_per_component",
            pool.max_core_instances_per_component,
        ),
        (
            "memories",
            l.memories,
            defaults.memories,
            "max_memories_per_component",
            pool.max_memories_per_component,
        ),
        (
            "tables",
            l.tables,
            defaults.tables,
            "max_tables_per_component",
            pool.max_tables_per_component,
        ),
    ]
    .into_iter()
    .find(|(_, value, default, _, cap)| {
        value != default && *value > usize::try_from(*cap).unwrap_or(usize::MAX)
    })
    .map(|(limit, value, _, engine_key, cap)| AbovePool {
        limit,
        value,
        engine_key,
        cap,
    })
}

/// A TOML syntax or type error as a [`ConfigError`]: its line, the key path the parser was in
/// (`server.max_body_bytes: invalid type: …`) or, when it recorded none, the text of the line,
/// and its message with the text it quotes cut short.
fn toml_error(e: &toml::de::Error, text: &str, path: &Path) -> ConfigError {
    if e.span().is_none() && e.message() == "recursion limit" {
        return key_too_deep(text, path);
    }
    let span = e.span();
    let message = cap_quoted(e.message());
    let message = match (toml_key_path(e), span.clone()) {
        (Some(keys), _) => format!("{keys}: {message}"),
        (None, Some(span)) => match source_line(text, span.start) {
            Some(source) => format!("{message} (in `{source}`)"),
            None => message,
        },
        (None, None) => message,
    };
    ConfigError {
        file: path.to_path_buf(),
        line: span.map(|s| line_of(text, s.start)),
        message: capped(message),
    }
}

/// Most parts a dotted key or table header may have: the `toml` crate's parser takes 80 and
/// refuses 81 (its recursion limit), saying only "recursion limit", with no place.
const TOML_KEY_PARTS_LIMIT: usize = 80;

/// The error for a key of more than [`TOML_KEY_PARTS_LIMIT`] dotted parts: the parser gave no
/// place, so the first line whose key or table header has that many is named
/// ([`deep_key_line`]).
fn key_too_deep(text: &str, path: &Path) -> ConfigError {
    let message = format!(
        "a key or table header has more than {TOML_KEY_PARTS_LIMIT} dotted parts, more than \
         the TOML reader takes; jobhook's settings are a few levels deep (`[handlers.limits]` \
         then `timeout_ms = ...`), so a key this long is a mistake"
    );
    let found = deep_key_line(text);
    ConfigError {
        file: path.to_path_buf(),
        line: found.map(|offset| line_of(text, offset)),
        message: capped(match found.and_then(|offset| source_line(text, offset)) {
            Some(source) => format!("{message} (in `{source}`)"),
            None => message,
        }),
    }
}

/// Where the first line starts (a byte offset) whose key or table header has more than
/// [`TOML_KEY_PARTS_LIMIT`] parts. Dots are counted only in a key (before the `=` of a key/value
/// line) or a table header (inside its brackets), outside quoted parts; values, comments and
/// the lines of multi-line strings are not looked at.
fn deep_key_line(text: &str) -> Option<usize> {
    let mut in_multiline: Option<&str> = None;
    let mut start = 0;
    for line in text.split('\n') {
        let at = start;
        start += line.len() + 1;
        if let Some(delimiter) = in_multiline {
            // What follows a string's end on its last line is the end of a value, not a key.
            if line.contains(delimiter) {
                in_multiline = None;
            }
            continue;
        }
        let (dots, value) = key_dots(line);
        if dots >= TOML_KEY_PARTS_LIMIT {
            return Some(at);
        }
        in_multiline = value.and_then(opened_multiline);
    }
    None
}

/// The most dots outside quotes in one of `line`'s keys — its table header, the key before its
/// `=`, or a key of an inline table in its value (`a = { b.c = 1 }`) — and its value (after the
/// first `=`) if it is a key/value line. Dots elsewhere (values, comments) are not counted.
fn key_dots(line: &str) -> (usize, Option<&str>) {
    let trimmed = line.trim_start();
    let header = trimmed.starts_with('[');
    // Whether the text read is a key, the dots of that key, the most of any key so far, and
    // how deep in inline tables the text is.
    let (mut in_key, mut dots, mut most, mut tables) = (!header, 0, 0, 0usize);
    let mut value = None;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (at, c) in trimmed.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '.' if header || in_key => dots += 1,
                '#' => break,
                ']' if header => return (dots, None),
                '=' if in_key => {
                    most = most.max(dots);
                    in_key = false;
                    value = value.or_else(|| trimmed.get(at + 1..));
                }
                // Each member of an inline table starts with its key.
                '{' | ',' if c == '{' || tables > 0 => {
                    tables += usize::from(c == '{');
                    in_key = true;
                    dots = 0;
                }
                '}' => {
                    tables = tables.saturating_sub(1);
                    in_key = false;
                }
                _ => {}
            },
        }
    }
    (most, value)
}

/// The delimiter of a multi-line string that `value` opens and does not close, if it does.
fn opened_multiline(value: &str) -> Option<&'static str> {
    let mut rest = value;
    while let Some(c) = rest.chars().next() {
        let delimiter = match c {
            '#' => return None,
            '"' | '\'' if rest.starts_with("\"\"\"") || rest.starts_with("\'\'\'") => {
                let delimiter = if c == '"' { "\"\"\"" } else { "\'\'\'" };
                match rest.get(3..).and_then(|after| after.find(delimiter)) {
                    Some(end) => {
                        rest = rest.get(3 + end + 3..).unwrap_or("");
                        continue;
                    }
                    None => return Some(delimiter),
                }
            }
            '"' | '\'' => c,
            _ => {
                rest = rest.get(c.len_utf8()..).unwrap_or("");
                continue;
            }
        };
        // A one-line string: skip to its end (a basic string's `\"` does not end it).
        let mut escaped = false;
        let mut end = rest.len();
        for (at, d) in rest.char_indices().skip(1) {
            if delimiter == '"' && escaped {
                escaped = false;
            } else if delimiter == '"' && d == '\\' {
                escaped = true;
            } else if d == delimiter {
                end = at + 1;
                break;
            }
        }
        rest = rest.get(end..).unwrap_or("");
    }
    None
}

/// The 1-based line of byte offset `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::store::config::StoreKind;
    use uuid::Uuid;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("h.wasm"), b"\0asm").unwrap();
            Fixture { dir }
        }

        fn parse(&self, text: &str) -> Result<Config, ConfigError> {
            Config::parse(text, &self.dir.path().join("jobhook.toml"))
        }
    }

    const MINIMAL: &str = r#"
[[handlers]]
name = "mail"
component = "h.wasm"
job_types = ["*"]
"#;

    #[test]
    fn idempotency_retention_has_a_default_and_bounds() {
        use crate::sources::idempotency::DEFAULT_RETENTION;
        let f = Fixture::new();
        let c = f.parse(MINIMAL).unwrap();
        assert_eq!(c.server.idempotency_retention, DEFAULT_RETENTION);
        let day = f
            .parse(&format!(
                "[server]\nidempotency_retention_ms = 86400000\n{MINIMAL}"
            ))
            .unwrap();
        assert_eq!(
            day.server.idempotency_retention,
            Duration::from_secs(86_400)
        );
        for bad in ["0", "999", "31708800001"] {
            let e = f
                .parse(&format!(
                    "[server]\nidempotency_retention_ms = {bad}\n{MINIMAL}"
                ))
                .unwrap_err();
            assert!(
                e.to_string()
                    .contains("idempotency_retention_ms must be between"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn connection_limits_have_defaults_and_are_checked() {
        let f = Fixture::new();
        let c = f.parse(MINIMAL).unwrap();
        assert_eq!(c.server.connection_limits(), ConnectionLimits::default());
        let set = f
            .parse(&format!(
                "[server]\nheader_read_timeout_ms = 500\nbody_read_timeout_ms = 600\n\
                 idle_timeout_ms = 700\nmax_connections = 20\nmax_connections_per_client = 5\n\
                 {MINIMAL}"
            ))
            .unwrap()
            .server
            .connection_limits();
        assert_eq!(set.header_read_timeout, Duration::from_millis(500));
        assert_eq!(set.body_read_timeout, Duration::from_millis(600));
        assert_eq!(set.idle_timeout, Duration::from_millis(700));
        assert_eq!(
            (set.max_connections, set.max_connections_per_client),
            (20, 5)
        );
        // Lowering the total below the per-client default lowers that default with it; a
        // per-client cap written above the total is still refused (below).
        let lowered = f
            .parse(&format!("[server]\nmax_connections = 100\n{MINIMAL}"))
            .unwrap()
            .server
            .connection_limits();
        assert_eq!(
            (lowered.max_connections, lowered.max_connections_per_client),
            (100, 100)
        );
        for (bad, says) in [
            (
                "idle_timeout_ms = 0",
                "idle_timeout_ms must be between 100 and 600000",
            ),
            (
                "body_read_timeout_ms = 600001",
                "body_read_timeout_ms must be between",
            ),
            (
                "max_connections = 0",
                "max_connections must be between 1 and 65536",
            ),
            (
                "shutdown_grace_ms = 600001",
                "[server] shutdown_grace_ms must be at most 600000 (10 minutes",
            ),
            (
                "shutdown_grace_ms = 315360000000",
                "shutdown_grace_ms must be at most 600000",
            ),
            (
                "max_connections = 10\nmax_connections_per_client = 11",
                "max_connections_per_client must be between 1 and max_connections (10)",
            ),
        ] {
            let e = f.parse(&format!("[server]\n{bad}\n{MINIMAL}")).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let f = Fixture::new();
        let c = f.parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.server.listen.port(), DEFAULT_PORT);
        assert_eq!(c.store.data_dir, f.dir.path().join("data"));
        assert_eq!(c.handlers.len(), 1);
        let h = &c.handlers[0];
        assert_eq!(h.job_types, JobTypes::All);
        assert_eq!(h.limits, Limits::default());
        assert_eq!(h.retry.max_attempts, 1);
        assert_eq!(h.component, f.dir.path().join("h.wasm"));
        assert_eq!(h.line, 2);
    }

    #[test]
    fn full_handler_entry() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("pw"), "s3cret\n").unwrap();
        let c = f
            .parse(
                r#"
[server]
listen = "0.0.0.0:9000"
tokens = [{ file = "pw" }]
allow_plaintext_tokens = true

[[handlers]]
name = "repeated-failure-email"
component = "h.wasm"
job_types = ["7B6BBC1B-D802-4B09-BEC9-F5C221083130", "44340a94-9b99-410d-8011-598fb176c3c5"]
properties = { RetryThreshold = "3", Password = { file = "pw" } }
max_concurrency = 2
[handlers.limits]
timeout_ms = 2500
memory_bytes = 33554432
[handlers.retry]
max_attempts = 3
backoff_ms = 100
"#,
            )
            .unwrap();
        let h = &c.handlers[0];
        let id = Uuid::parse_str("7b6bbc1b-d802-4b09-bec9-f5c221083130").unwrap();
        assert!(h.job_types.matches(id));
        assert!(!h.job_types.matches(Uuid::nil()));
        assert_eq!(h.properties.get("RetryThreshold"), Some("3"));
        assert_eq!(h.properties.get("Password"), Some("s3cret"));
        assert!(h.secret_properties.contains("Password"));
        assert_eq!(h.limits.timeout, Duration::from_millis(2500));
        assert_eq!(h.limits.memory_bytes, 32 << 20);
        assert_eq!(h.retry.delay_before(2), Duration::from_millis(100));
        assert_eq!(h.retry.delay_before(3), Duration::from_millis(200));
        assert_eq!(h.max_concurrency, 2);
        assert_eq!(
            c.resolve_tokens().unwrap().senders,
            vec!["s3cret".to_owned()]
        );
        assert!(c.resolve_tokens().unwrap().admins.is_empty());
    }

    /// Both kinds of token are resolved, each list named in its errors; one token in both lists
    /// is refused, naming both references and never the value.
    #[test]
    fn sender_and_admin_tokens_are_resolved_apart_and_never_shared() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("send"), "sender-t0ken\n").unwrap();
        std::fs::write(f.dir.path().join("admin"), "admin-t0ken\n").unwrap();
        let config = f
            .parse(&format!(
                "[server]\ntokens = [{{ file = \"send\" }}]\n\
                 admin_tokens = [{{ file = \"admin\" }}]\n{MINIMAL}"
            ))
            .unwrap();
        let tokens = config.resolve_tokens().unwrap();
        assert_eq!(tokens.senders, vec!["sender-t0ken".to_owned()]);
        assert_eq!(tokens.admins, vec!["admin-t0ken".to_owned()]);

        std::fs::write(f.dir.path().join("admin"), "sender-t0ken").unwrap();
        let e = config.resolve_tokens().unwrap_err();
        assert!(
            e.message.starts_with(
                "server.admin_tokens: the token from file admin is also in [server] tokens \
                 (from file send)"
            ),
            "{e}"
        );
        assert!(!e.message.contains("sender-t0ken"), "{e}");

        std::fs::write(f.dir.path().join("admin"), "Bearer x").unwrap();
        let e = config.resolve_tokens().unwrap_err();
        assert!(
            e.message
                .starts_with("server.admin_tokens: the token from file admin is not usable"),
            "{e}"
        );
    }

    /// A token shorter than [`MIN_TOKEN_CHARS`] is taken with a warning naming its list and
    /// file and its length, never its value; one of that length or longer, and one from the
    /// environment that is long enough, with none.
    #[test]
    fn short_tokens_are_warned_of_by_where_they_come_from() {
        let f = Fixture::new();
        let short = "x".repeat(MIN_TOKEN_CHARS - 1);
        let long = "y".repeat(MIN_TOKEN_CHARS);
        std::fs::write(f.dir.path().join("send"), format!("{short}\n")).unwrap();
        std::fs::write(f.dir.path().join("send2"), &long).unwrap();
        std::fs::write(f.dir.path().join("admin"), "adm1n").unwrap();
        let config = f
            .parse(&format!(
                "[server]\ntokens = [{{ file = \"send\" }}, {{ file = \"send2\" }}]\n\
                 admin_tokens = [{{ file = \"admin\" }}]\n{MINIMAL}"
            ))
            .unwrap();
        let tokens = config.resolve_tokens().unwrap();
        let warnings = config.short_tokens(&tokens);
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(
            warnings[0].starts_with(&format!(
                "server.tokens: the token from file send has {} characters; one shorter than \
                 {MIN_TOKEN_CHARS} can be guessed",
                MIN_TOKEN_CHARS - 1
            )),
            "{warnings:#?}"
        );
        assert!(
            warnings[1].starts_with("server.admin_tokens: the token from file admin has 5"),
            "{warnings:#?}"
        );
        for w in &warnings {
            assert!(!w.contains(&short) && !w.contains("adm1n"), "{w}");
        }
        std::fs::write(f.dir.path().join("send"), &long).unwrap();
        std::fs::write(f.dir.path().join("admin"), format!("{long}z")).unwrap();
        let tokens = config.resolve_tokens().unwrap();
        assert_eq!(config.short_tokens(&tokens), Vec::<String>::new());
    }

    fn error(text: &str) -> ConfigError {
        Fixture::new().parse(text).unwrap_err()
    }

    /// A key of 80 or more dotted parts, which the TOML reader refuses without a place, is
    /// named with its line, as a table header or a key; a string full of dots is not it.
    #[test]
    fn keys_too_deep_for_the_toml_reader_are_named_with_their_line() {
        let parts = |n: usize| format!("x{}", ".x".repeat(n - 1));
        let dotted = parts(81);
        // Dots that are not a key's: in strings (with an escaped quote, multi-line), in
        // comments, in numbers, and in the lines of a multi-line array.
        let decoys = [
            format!("note = \"{}\" # {}", ".".repeat(200), ".".repeat(200)),
            format!("screen = \"6\\\" wide {}\"", ".".repeat(100)),
            format!(
                "text = \"\"\"\n{}\n[{}]\n\"\"\"",
                ".".repeat(100),
                parts(90)
            ),
            format!("raw = \'\'\'{}\n{}\'\'\'", ".".repeat(90), ".".repeat(90)),
            format!("weights = [{}]", ["1.5"; 90].join(", ")),
            format!("weights = [\n{}\n]", ["1.5"; 90].join(", ")),
            format!("w = {{ v = [{}], n = 1.5 }}", ["1.5"; 90].join(", ")),
        ];
        for decoy in &decoys {
            let above = decoy.matches('\n').count() + 1;
            for (text, line) in [
                (format!("[server]\n{decoy}\n{dotted} = 1\n"), above + 2),
                (format!("{decoy}\n[{dotted}]\n"), above + 1),
                (format!("{decoy}\na = 1\n[[{dotted}]]\n"), above + 2),
                (
                    format!("{decoy}\na = {{ b = 1, {dotted} = 1 }}\n"),
                    above + 1,
                ),
                (
                    format!("{decoy}\na = {{ b = {{ {dotted} = 1 }} }}\n"),
                    above + 1,
                ),
            ] {
                let e = error(&text);
                assert_eq!(e.line, Some(line), "{decoy:?}: {e}");
                assert!(
                    e.message
                        .starts_with("a key or table header has more than 80 dotted parts"),
                    "{e}"
                );
                assert!(e.message.contains("(in `"), "{e}");
            }
        }
        // 80 parts are within the reader's limit: the usual unknown-key error, with its line.
        let e = error(&format!("[server]\n{} = 1\n", parts(80)));
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    /// A token a client could never send back — blank, with a space or a control character —
    /// is refused where tokens are resolved (serve, check, reload), not loaded to lock every
    /// client out.
    #[test]
    fn tokens_no_client_could_send_are_refused() {
        let f = Fixture::new();
        let config = f
            .parse(&format!(
                "[server]\ntokens = [{{ file = \"token\" }}]\n{MINIMAL}"
            ))
            .unwrap();
        let token = f.dir.path().join("token");
        // The line end an editor leaves, Unix or Windows, is not part of the token.
        for good in ["t0ken-value\n", "t0ken-value\r\n", "t0ken-value"] {
            std::fs::write(&token, good).unwrap();
            assert_eq!(
                config.resolve_tokens().unwrap().senders,
                vec!["t0ken-value".to_owned()],
                "{good:?}"
            );
        }
        for bad in [
            "   ",
            "two words",
            "tab\there",
            "caf\u{e9}",
            " lead",
            "trail \n",
            "t0ken\r",
            "t0ken\r\n\r\n",
            "t0ken\n\n",
            "\r\n\r\n",
            "nul\0",
            "del\x7f",
        ] {
            std::fs::write(&token, bad).unwrap();
            let e = config.resolve_tokens().unwrap_err();
            assert!(
                e.message.contains(
                    "server.tokens: the token from file token is not usable: a token must be \
                     visible ASCII"
                ),
                "{bad:?}: {e}"
            );
            assert!(!e.message.contains("Bearer ` at its start"), "{e}");
        }
        // The usual mistake is named.
        std::fs::write(&token, "Bearer t0ken-value\n").unwrap();
        let e = config.resolve_tokens().unwrap_err();
        assert!(
            e.message
                .contains("remove the `Bearer ` at its start: the token is what follows it"),
            "{e}"
        );
        // Nothing but a line end is no token at all.
        for empty in ["", "\n", "\r\n"] {
            std::fs::write(&token, empty).unwrap();
            let e = config.resolve_tokens().unwrap_err();
            assert!(e.message.starts_with("server.tokens: "), "{empty:?}: {e}");
        }
    }

    /// An error inside a capability's section names its own key and line: the sections are
    /// not flattened and `[keyfactor.auth]` is not an internally tagged enum, either of which
    /// buffers the table and loses the place (a literal password was reported at line 1, in
    /// `[server]`).
    #[test]
    fn errors_in_capability_sections_name_their_key_and_line() {
        let keyfactor = "[server]\nlisten = \"127.0.0.1:0\"\n\n[keyfactor]\n\
                         base_url = \"https://kf.example.com/KeyfactorAPI/\"\n\n[keyfactor.auth]\n";
        for (text, line, says) in [
            (
                format!("{keyfactor}kind = \"basic\"\nusername = \"u\"\npassword = \"literal\"\n"),
                10,
                "keyfactor.auth.password: a literal secret is not accepted",
            ),
            (
                format!("{keyfactor}kind = \"oauth\"\n"),
                8,
                "keyfactor.auth.kind: unknown variant `oauth`",
            ),
            (
                format!("{keyfactor}kind = \"bearer\"\n"),
                7,
                "keyfactor.auth: kind = \"bearer\" needs `token`",
            ),
            (
                format!(
                    "{keyfactor}kind = \"bearer\"\ntoken = {{ env = \"T\" }}\nusername = \"u\"\n"
                ),
                7,
                "keyfactor.auth: `username` is not a key of kind = \"bearer\"",
            ),
            (
                "[mail]\nfrom = \"a@example.com\"\n\n[mail.smtp]\nhost = \"smtp.example.com\"\n\
                 tls = \"starttls\"\nusername = \"u\"\npassword = \"lit\"\n"
                    .to_owned(),
                8,
                "mail.smtp.password: a literal secret is not accepted",
            ),
            (
                "[http]\nconnect_timeout_ms = \"soon\"\n".to_owned(),
                2,
                "http.connect_timeout_ms",
            ),
            // A handler's limits: the call budgets were read through `flatten`, which lost the
            // key and line of an error inside the table too.
            (
                format!(
                    "{MINIMAL}\n[handlers.limits]\ntimeout_ms = 1000\nkeyfactor_calls = \"many\"\n"
                ),
                MINIMAL.lines().count() + 4,
                "handlers.limits.keyfactor_calls: invalid type",
            ),
            (
                format!("{MINIMAL}\n[handlers.limits]\ntimeout_ms = \"soon\"\n"),
                MINIMAL.lines().count() + 3,
                "handlers.limits.timeout_ms",
            ),
        ] {
            let e = error(&text);
            assert!(e.message.starts_with(says), "{text}\n{e}");
            assert_eq!(e.line, Some(line), "{text}\n{e}");
        }
    }

    #[test]
    fn a_retry_cap_below_the_first_backoff_is_refused() {
        let e = error(&format!(
            "{MINIMAL}\n[handlers.retry]\nmax_attempts = 3\nbackoff_ms = 5000\nmax_backoff_ms = 10\n"
        ));
        assert_eq!(
            e.message,
            "handlers.retry.max_backoff_ms (handler \"mail\") must be at least backoff_ms \
             (5000), not 10: it caps the doubled waits, not the first one",
        );
        assert!(e.line.is_some(), "{e}");
        // A long first wait written alone is what was meant: the cap nobody wrote follows it.
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{MINIMAL}\n[handlers.retry]\nmax_attempts = 3\nbackoff_ms = 600000\n"
            ))
            .unwrap();
        let retry = &c.handlers[0].retry;
        assert_eq!(
            (retry.backoff, retry.max_backoff),
            (Duration::from_secs(600), Duration::from_secs(600))
        );
        let c = f
            .parse(&format!("{MINIMAL}\n[handlers.retry]\nmax_attempts = 3\n"))
            .unwrap();
        assert_eq!(c.handlers[0].retry.max_backoff, Duration::from_secs(300));
        let c = f
            .parse(&format!(
                "[quarantine]\ninitial_backoff_ms = 7200000\n{MINIMAL}"
            ))
            .unwrap();
        assert_eq!(
            (c.quarantine.initial_backoff, c.quarantine.max_backoff),
            (Duration::from_secs(7200), Duration::from_secs(7200))
        );
        // Unknown keys are still refused, with their line.
        let e = error(&format!(
            "{MINIMAL}\n[handlers.retry]\nmax_attempts = 3\nmax_backof_ms = 10\n"
        ));
        assert!(e.message.contains("max_backof_ms"), "{e}");
        assert!(e.line.is_some(), "{e}");
    }

    /// A retry with no wait runs again at once against what just failed (a relay or an API
    /// that is down), in a loop as long as max_attempts: refused as `[quarantine]` refuses a
    /// quarantine of 0 ms, with the key and its line; without retries the wait is never used
    /// and 0 is taken.
    #[test]
    fn a_retry_without_a_wait_is_refused() {
        for max_backoff in ["", "max_backoff_ms = 0\n", "max_backoff_ms = 1000\n"] {
            let e = error(&format!(
                "{MINIMAL}\n[handlers.retry]\nmax_attempts = 100\nbackoff_ms = 0\n{max_backoff}"
            ));
            assert_eq!(
                e.message,
                "handlers.retry.backoff_ms (handler \"mail\") must be at least 1 when \
                 max_attempts is above 1: a retry without a wait runs again at once against \
                 what just failed (a relay or an API that is down), as often as max_attempts \
                 allows",
                "{max_backoff}"
            );
            assert!(e.line.is_some(), "{e}");
        }
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{MINIMAL}\n[handlers.retry]\nmax_attempts = 1\nbackoff_ms = 0\n"
            ))
            .unwrap();
        assert_eq!(c.handlers[0].retry.backoff, Duration::ZERO);
        let c = f
            .parse(&format!(
                "{MINIMAL}\n[handlers.retry]\nmax_attempts = 2\nbackoff_ms = 1\n"
            ))
            .unwrap();
        assert_eq!(c.handlers[0].retry.backoff, Duration::from_millis(1));
    }

    #[test]
    fn a_quarantine_that_sets_nothing_aside_is_refused() {
        let e = error("[quarantine]\ninitial_backoff_ms = 0\n");
        assert!(
            e.message.contains("initial_backoff_ms must be at least 1"),
            "{e}"
        );
        assert!(e.message.contains("after_failures = 0"), "{e}");
        let e = error("[quarantine]\ninitial_backoff_ms = 5000\nmax_backoff_ms = 1000\n");
        assert!(e.message.contains("max_backoff_ms (1000)"), "{e}");
        // Turned off, its backoffs do not matter.
        let dir = tempfile::tempdir().unwrap();
        let text = "[quarantine]\nafter_failures = 0\ninitial_backoff_ms = 0\n";
        assert!(Config::parse(text, &dir.path().join("jobhook.toml")).is_ok());
    }

    #[test]
    fn missing_job_types_names_the_key_and_line() {
        let e = error("\n\n[[handlers]]\nname = \"a\"\ncomponent = \"h.wasm\"\n");
        assert!(e.message.contains("job_types"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    /// More handlers than [`MAX_HANDLERS`]: refused at the first past the limit, with the count;
    /// exactly the limit is fine.
    #[test]
    fn more_handlers_than_the_limit_are_refused_at_the_first_past_it() {
        let handlers = |n: usize| {
            (0..n)
                .map(|i| {
                    format!("[[handlers]]\nname = \"h{i}\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n")
                })
                .collect::<String>()
        };
        let at_the_limit = Fixture::new().parse(&handlers(MAX_HANDLERS));
        assert!(at_the_limit.is_ok(), "{:?}", at_the_limit.err());
        let e = error(&handlers(MAX_HANDLERS + 5));
        assert_eq!(e.line, Some(MAX_HANDLERS * 4 + 1), "{e}");
        assert!(
            e.message.contains(&format!(
                "{} [[handlers]] are configured; at most {MAX_HANDLERS}",
                MAX_HANDLERS + 5
            )),
            "{e}"
        );
    }

    /// A file that is not UTF-8 is refused with where the first bad byte is; an empty
    /// component path is named as empty, not as a missing `./`.
    #[test]
    fn a_file_not_in_utf8_and_an_empty_component_say_where_and_what() {
        let f = Fixture::new();
        let path = f.dir.path().join("latin1.toml");
        std::fs::write(&path, b"[server]\nlisten = \"127.0.0.1:0\"\n# caf\xe9\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("not valid UTF-8 (line 3, byte 6 of the line: 0xe9)"),
            "{e}"
        );
        let e = error("[[handlers]]\nname = \"a\"\ncomponent = \"\"\njob_types = [\"*\"]\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(
            e.message.contains("component (handler \"a\") is empty"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_names_are_refused_with_both_lines() {
        let e = error(&format!("{MINIMAL}{}", MINIMAL.replace("mail", "MAIL")));
        assert_eq!(e.line, Some(7), "{e}");
        assert!(e.message.contains("line 2"), "{e}");
        assert!(e.to_string().contains("jobhook.toml:7:"), "{e}");
    }

    const IDENTITIES: &str = r#"
[keyfactor]
base_url = "https://kf.example.com/KeyfactorAPI/"
auth = { kind = "bearer", token = { env = "KF_ENGINE" } }

[keyfactor.identities.reader]
kind = "bearer"
token = { env = "KF_READER" }

[keyfactor.identities.writer]
kind = "basic"
username = 'KFTRAIN\svc-writer'
password = { env = "KF_WRITER" }

[[handlers]]
name = "reads"
component = "h.wasm"
job_types = ["*"]

[handlers.grants.keyfactor]
paths = ["*"]
identity = "reader"

[[handlers]]
name = "writes"
component = "h.wasm"
job_types = ["*"]

[handlers.grants.keyfactor]
methods = ["GET", "POST"]
paths = ["*"]
identity = "writer"
"#;

    #[test]
    fn keyfactor_identities_are_named_by_grants() {
        let f = Fixture::new();
        let c = f.parse(IDENTITIES).unwrap();
        let identity = |i: usize| {
            c.handlers[i]
                .grants
                .keyfactor
                .as_ref()
                .and_then(|g| g.identity.clone())
        };
        assert_eq!(identity(0).as_deref(), Some("reader"));
        assert_eq!(identity(1).as_deref(), Some("writer"));
        assert_eq!(
            c.services.keyfactor.as_ref().map(|k| k.identities.len()),
            Some(2)
        );
        // Revoking one identity refuses the handler that uses it, by file, line and key.
        let revoked = IDENTITIES.replace(
            "[keyfactor.identities.writer]\nkind = \"basic\"\nusername = 'KFTRAIN\\svc-writer'\npassword = { env = \"KF_WRITER\" }\n",
            "",
        );
        assert_ne!(revoked, IDENTITIES);
        // The identities listed with the refusal are the operator's keys, quoted and escaped.
        let hostile = revoked.replace(
            "[keyfactor.identities.reader]",
            "[keyfactor.identities.\"reader\\u001b[2J\"]",
        );
        let e = f.parse(&hostile).unwrap_err();
        assert!(!e.message.contains('\u{1b}'), "{e:?}");
        assert!(e.message.contains("\"reader\\u{1b}[2J\""), "{e:?}");
        let e = f.parse(&revoked).unwrap_err();
        assert!(
            e.message.contains("handlers.grants.keyfactor.identity"),
            "{e}"
        );
        assert!(e.message.contains("\"writer\""), "{e}");
        assert!(e.message.contains("\"writes\""), "{e}");
        assert!(e.to_string().contains("jobhook.toml:"), "{e}");
        let line = e.line.unwrap();
        let grants_line = revoked
            .lines()
            .position(|l| l.contains("identity = \"writer\""))
            .unwrap()
            + 1;
        assert!(
            (grants_line.saturating_sub(4)..=grants_line).contains(&line),
            "{e} (identity at line {grants_line})"
        );
        // The other handler alone is fine.
        let only_reader = revoked
            .split("[[handlers]]\nname = \"writes\"")
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(f.parse(&only_reader).unwrap().handlers.len(), 1);
        // An identity with no [keyfactor] at all is refused: there is no Keyfactor API.
        let e = error(
            "[[handlers]]\nname = \"a\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n[handlers.grants.keyfactor]\npaths = [\"*\"]\nidentity = \"x\"\n",
        );
        assert!(e.message.contains("handlers.grants.keyfactor"), "{e}");
        assert!(e.message.contains("[keyfactor] base_url"), "{e}");
    }

    /// A grant of a capability this engine does not configure is refused by file, line and
    /// handler, naming the section to add: every call would answer not-available (and the
    /// handler's failures would walk it into quarantine). `http` works on its defaults.
    #[test]
    fn a_grant_of_a_capability_the_engine_does_not_configure_is_refused() {
        let handler = |grant: &str| {
            format!(
                "[[handlers]]\nname = \"a\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n{grant}"
            )
        };
        for (grant, section) in [
            (
                "[handlers.grants.mail]\nrecipients = [\"@example.com\"]\n",
                "[mail]",
            ),
            (
                "[handlers.grants.keyfactor]\npaths = [\"*\"]\n",
                "[keyfactor] base_url",
            ),
        ] {
            let e = error(&handler(grant));
            assert!(
                e.message.contains("but this engine does not configure it"),
                "{e}"
            );
            assert!(e.message.contains(section), "{e}");
            assert!(e.message.contains("(handler \"a\")"), "{e}");
            assert!(e.line.is_some(), "{e}");
        }
        let f = Fixture::new();
        let configured = format!(
            "[mail]\nfrom = \"jobhook@example.com\"\n\n{}",
            handler("[handlers.grants.mail]\nrecipients = [\"@example.com\"]\n")
        );
        assert!(f.parse(&configured).is_ok());
        let http = handler("[handlers.grants.http]\nurls = [\"https://hooks.example.com/\"]\n");
        assert!(f.parse(&http).is_ok());
        // A plain http prefix every call under which would be refused: named, with its line.
        for (grant, says) in [
            (
                "urls = [\"http://10.0.0.5/hooks/\"]\nallow_private = true",
                "plain http:// is allowed only to a loopback host",
            ),
            (
                "urls = [\"http://127.0.0.1:9000/\"]",
                "handlers.grants.http.urls: \"http://127.0.0.1:9000/\": plain http:// is allowed only \
                 with allow_private = true",
            ),
        ] {
            let e = f
                .parse(&handler(&format!("[handlers.grants.http]\n{grant}\n")))
                .unwrap_err();
            assert!(e.message.contains(says), "{grant}: {e}");
            assert!(e.line.is_some(), "{grant}: {e}");
        }
        let loopback = handler(
            "[handlers.grants.http]\nurls = [\"http://127.0.0.1:9000/\"]\nallow_private = true\n",
        );
        assert!(f.parse(&loopback).is_ok());
    }

    /// A configuration read for a reload is checked against the sections the running engine
    /// was started with: a grant that needs a section only a restart applies, and a limit above
    /// a pool cap only a restart raises, are refused naming the handler, the key and the
    /// section to restart for; what the running sections serve passes.
    #[test]
    fn a_reload_checks_handlers_against_the_sections_the_engine_runs_with() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("kf-token"), "token").unwrap();
        let handler = |extra: &str| {
            format!(
                "[[handlers]]\nname = \"a\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n{extra}"
            )
        };
        let keyfactor = "[keyfactor]\nbase_url = \"https://kf.example.com/KeyfactorAPI\"\n\
                         auth = { kind = \"bearer\", token = { file = \"kf-token\" } }\n";
        let identity = "[keyfactor.identities]\nreader = { kind = \"bearer\", token = { file = \
                        \"kf-token\" } }\n";
        let mail = "[mail]\nfrom = \"jobhook@example.com\"\n";
        let bare = f.parse(MINIMAL).unwrap();
        let with_keyfactor = f.parse(&format!("{keyfactor}{MINIMAL}")).unwrap();
        let mut refused = vec![
            (
                &bare,
                format!(
                    "{mail}{}",
                    handler("[handlers.grants.mail]\nrecipients = [\"@example.com\"]\n")
                ),
                [
                    "handlers.grants.mail (handler \"a\"): the running engine was started \
                     without [mail]",
                    "restart jobhook to apply [mail] first, or reload without the grant",
                ],
            ),
            (
                &bare,
                format!(
                    "{keyfactor}{}",
                    handler("[handlers.grants.keyfactor]\npaths = [\"*\"]\n")
                ),
                [
                    "handlers.grants.keyfactor (handler \"a\"): the running engine was started \
                     without [keyfactor] base_url",
                    "restart jobhook to apply [keyfactor] first, or reload without the grant",
                ],
            ),
            (
                &with_keyfactor,
                format!(
                    "{keyfactor}{identity}{}",
                    handler(
                        "[handlers.grants.keyfactor]\npaths = [\"*\"]\nidentity = \"reader\"\n"
                    )
                ),
                [
                    "handlers.grants.keyfactor.identity: \"reader\" is not a Keyfactor identity \
                     of this engine (configured under [keyfactor.identities]: none) (handler \
                     \"a\")",
                    "restart jobhook to apply [keyfactor] first, or reload without the grant",
                ],
            ),
        ];
        let mut limits = Vec::new();
        for (limit, value, cap, reserved, running) in [
            (
                "instances",
                32,
                "max_core_instances_per_component",
                "core_instances_per_delivery",
                16,
            ),
            (
                "memories",
                4,
                "max_memories_per_component",
                "memories_per_delivery",
                2,
            ),
            (
                "tables",
                8,
                "max_tables_per_component",
                "tables_per_delivery",
                4,
            ),
        ] {
            limits.push((
                format!(
                    "[engine]\n{cap} = {value}\n{reserved} = {value}\n{}",
                    handler(&format!("[handlers.limits]\n{limit} = {value}\n"))
                ),
                [
                    format!(
                        "handlers.limits (handler \"a\"): {limit} = {value} is above [engine] \
                         {cap} of the running engine ({running})"
                    ),
                    format!(
                        "restart jobhook to apply [engine] first, or reload with {limit} at \
                         most {running}"
                    ),
                ],
            ));
        }
        refused.extend(
            limits
                .iter()
                .map(|(text, says)| (&bare, text.clone(), [says[0].as_str(), says[1].as_str()])),
        );
        for (running, text, says) in refused {
            let new = f.parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            // The file passes against its own sections; not against the running ones.
            assert!(new.check_handlers_against_running(&new).is_ok(), "{text}");
            let e = new.check_handlers_against_running(running).unwrap_err();
            for words in says {
                assert!(e.message.contains(words), "{words:?} missing from: {e}");
            }
            assert_eq!(e.line, Some(new.handlers[0].line), "{e}");
        }
        // What the running sections serve passes: the http capability works on its defaults.
        let http = f
            .parse(&handler(
                "[handlers.grants.http]\nurls = [\"https://hooks.example.com/\"]\n",
            ))
            .unwrap();
        assert!(http.check_handlers_against_running(&bare).is_ok());
        let granted = f
            .parse(&format!(
                "{keyfactor}{}",
                handler("[handlers.grants.keyfactor]\npaths = [\"*\"]\n")
            ))
            .unwrap();
        assert!(
            granted
                .check_handlers_against_running(&with_keyfactor)
                .is_ok()
        );
    }

    /// An empty list in a grant would deny the handler every call at run time: refused when the
    /// configuration is read, naming the handler, the key and what to write.
    #[test]
    fn a_grant_with_an_empty_list_is_refused() {
        let f = Fixture::new();
        let handler = |grant: &str| {
            format!(
                "[[handlers]]\nname = \"a\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n{grant}"
            )
        };
        for (config, key, example) in [
            (
                format!(
                    "[mail]\nfrom = \"jobhook@example.com\"\n\n{}",
                    handler("[handlers.grants.mail]\nrecipients = []\n")
                ),
                "handlers.grants.mail.recipients: the list is empty",
                "recipients = [\"pki-team@example.com\"",
            ),
            (
                format!(
                    "[keyfactor]\nbase_url = \"https://kf.example.com/KeyfactorAPI/\"\nauth = {{ kind = \"bearer\", token = {{ env = \"KF_ENGINE\" }} }}\n\n{}",
                    handler("[handlers.grants.keyfactor]\npaths = []\n")
                ),
                "handlers.grants.keyfactor.paths: the list is empty",
                "paths = [\"Certificates/\"]",
            ),
            (
                format!(
                    "[keyfactor]\nbase_url = \"https://kf.example.com/KeyfactorAPI/\"\nauth = {{ kind = \"bearer\", token = {{ env = \"KF_ENGINE\" }} }}\n\n{}",
                    handler("[handlers.grants.keyfactor]\npaths = [\"*\"]\nmethods = []\n")
                ),
                "handlers.grants.keyfactor.methods: the list is empty",
                "methods = [\"GET\"]",
            ),
            (
                handler("[handlers.grants.http]\nurls = []\n"),
                "handlers.grants.http.urls: the list is empty",
                "urls = [\"https://hooks.example.com/\"]",
            ),
            (
                handler(
                    "[handlers.grants.http]\nurls = [\"https://hooks.example.com/\"]\nmethods = []\n",
                ),
                "handlers.grants.http.methods: the list is empty",
                "methods = [\"POST\"]",
            ),
        ] {
            let e = f.parse(&config).unwrap_err();
            assert!(e.message.contains(key), "{config}: {e}");
            assert!(e.message.contains(example), "{config}: {e}");
            assert!(e.message.contains("(handler \"a\")"), "{config}: {e}");
            assert!(e.line.is_some(), "{config}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = error(&format!("{MINIMAL}colour = \"blue\"\n"));
        assert!(e.message.contains("colour"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        let e = error("[sever]\nlisten = \"127.0.0.1:1\"\n");
        assert!(e.message.contains("sever"), "{e}");
        let e = error(&format!("{MINIMAL}[handlers.limits]\nmemory = 5\n"));
        assert!(e.message.contains("memory"), "{e}");
        let e = error(&format!("{MINIMAL}[handlers.limits]\nfax_calls = 5\n"));
        assert!(
            e.message.contains("fax_calls") && e.message.contains("mail_calls"),
            "{e}"
        );
    }

    #[test]
    fn call_budgets_are_read_by_capability() {
        let f = Fixture::new();
        let c = f
            .parse(&format!("{MINIMAL}[handlers.limits]\nmail_calls = 2\n"))
            .unwrap();
        let limits = &c.handlers[0].limits;
        assert_eq!(limits.calls("mail", 5), 2);
        assert_eq!(limits.calls("keyfactor", 20), 20);
    }

    #[test]
    fn concurrent_deliveries_are_bounded_both_ways() {
        for bad in [0, MAX_CONCURRENT_DELIVERIES + 1] {
            let e = error(&format!(
                "[engine]\nmax_concurrent_deliveries = {bad}\n\n{MINIMAL}"
            ));
            assert!(e.message.contains("max_concurrent_deliveries"), "{e}");
            assert!(e.message.contains("4096"), "{e}");
        }
        let e = error(&format!("[engine]\nsandbox_threads = 100000\n\n{MINIMAL}"));
        assert!(e.message.contains("sandbox_threads"), "{e}");
    }

    /// Numbers too large for what reads them are refused where the configuration is read, not
    /// met later as an overflow: a component size limit, any duration.
    #[test]
    fn sizes_and_durations_past_their_bounds_are_refused_naming_them() {
        for bad in [
            "0".to_owned(),
            (MAX_COMPONENT_BYTES + 1).to_string(),
            u64::MAX.to_string(),
        ] {
            let e = error(&format!(
                "[engine]\nmax_component_bytes = {bad}\n\n{MINIMAL}"
            ));
            assert!(e.message.contains("max_component_bytes"), "{bad}: {e}");
        }
        let e = error(&format!("[engine]\ncompile_timeout_ms = 0\n\n{MINIMAL}"));
        assert!(e.message.contains("compile_timeout_ms"), "{e}");
        for key in ["backoff_ms", "max_backoff_ms"] {
            let e = error(&format!(
                "{MINIMAL}[handlers.retry]\nmax_attempts = 4\n{key} = 10000000000000000\n"
            ));
            assert!(e.message.contains("longer than ten years"), "{key}: {e}");
            assert_eq!(e.line, Some(8), "{key}: {e}");
        }
    }

    /// The bounds docs/SECURITY.md gives for `[engine]` pool settings, `[server] max_body_bytes`
    /// and a handler's `memory_bytes`, as numbers: each refused one past its bound, naming the
    /// key, and accepted at the bound.
    #[test]
    fn documented_bounds_of_engine_server_and_limits() {
        // Each cap with the reservation it may not exceed, and the reservation alone.
        for (key, reserved, max) in [
            (
                "max_core_instances_per_component",
                "core_instances_per_delivery",
                1024,
            ),
            ("core_instances_per_delivery", "", 1024),
            ("max_memories_per_component", "memories_per_delivery", 16),
            ("memories_per_delivery", "", 16),
            ("max_tables_per_component", "tables_per_delivery", 256),
            ("tables_per_delivery", "", 256),
        ] {
            let with = |value: u32| {
                let reservation = if reserved.is_empty() {
                    String::new()
                } else {
                    format!("{reserved} = {value}\n")
                };
                format!("[engine]\n{key} = {value}\n{reservation}\n{MINIMAL}")
            };
            for bad in [0, max + 1] {
                let e = error(&with(bad));
                assert!(e.message.contains(key), "{e}");
                assert!(e.message.contains(&format!("between 1 and {max}")), "{e}");
            }
            let f = Fixture::new();
            assert!(f.parse(&with(max)).is_ok(), "{key} = {max}");
            // A cap above its reservation is refused, naming both.
            if !reserved.is_empty() {
                let e = error(&format!(
                    "[engine]\n{key} = {max}\n{reserved} = 1\n\n{MINIMAL}"
                ));
                assert!(
                    e.message
                        .contains(&format!("{key} ({max}) is above {reserved} (1)")),
                    "{e}"
                );
                assert!(
                    e.message.contains("one handler could hold every slot"),
                    "{e}"
                );
            }
        }
        for bad in [1023, crate::context::MAX_CONTEXT_BYTES + 1] {
            let e = error(&format!("[server]\nmax_body_bytes = {bad}\n\n{MINIMAL}"));
            assert!(
                e.message
                    .contains("max_body_bytes must be between 1024 and 65536"),
                "{e}"
            );
            assert!(e.message.contains(&format!("not {bad}")), "{e}");
        }
        for good in [1024, crate::context::MAX_CONTEXT_BYTES] {
            assert!(
                Fixture::new()
                    .parse(&format!("[server]\nmax_body_bytes = {good}\n\n{MINIMAL}"))
                    .is_ok()
            );
        }
        let gib: u64 = 1 << 30;
        let e = error(&format!(
            "{MINIMAL}[handlers.limits]\nmemory_bytes = {}\n",
            gib + 1
        ));
        assert!(
            e.message
                .contains("memory_bytes must be between 1048576 (1 MiB) and 1073741824 (1024 MiB); it is 1073741825"),
            "{e}"
        );
        assert!(
            Fixture::new()
                .parse(&format!(
                    "{MINIMAL}[handlers.limits]\nmemory_bytes = {gib}\n"
                ))
                .is_ok()
        );
    }

    /// Every per-handler limit that protects the engine has an upper bound, and each is
    /// accepted at it and refused one past it, naming the key; a pool cap of `[engine]` below
    /// a limit a handler sets is refused naming both keys.
    #[test]
    fn handler_limits_are_bounded_each_by_name() {
        use crate::limits::{
            MAX_HOSTCALL_BYTES, MAX_LOG_BYTES, MAX_LOG_LINES, MAX_OUTPUT_BYTES, MAX_TABLE_ELEMENTS,
        };
        let limits = |body: &str| format!("{MINIMAL}[handlers.limits]\n{body}\n");
        for (key, max, says) in [
            (
                "table_elements",
                MAX_TABLE_ELEMENTS as usize,
                "table_elements must be between 1 and",
            ),
            (
                "hostcall_bytes",
                MAX_HOSTCALL_BYTES,
                "hostcall_bytes must be between 65536 and",
            ),
            (
                "output_bytes",
                MAX_OUTPUT_BYTES,
                "output_bytes must be at most",
            ),
            ("log_lines", MAX_LOG_LINES, "log_lines must be at most"),
            ("log_bytes", MAX_LOG_BYTES, "log_bytes at most"),
        ] {
            let e = error(&limits(&format!("{key} = {}", max + 1)));
            assert!(e.message.contains(says), "{key}: {e}");
            assert!(
                Fixture::new()
                    .parse(&limits(&format!("{key} = {max}")))
                    .is_ok(),
                "{key}"
            );
        }
        let e = error(&limits("table_elements = 0"));
        assert!(
            e.message.contains("table_elements must be between 1"),
            "{e}"
        );
        // Each pool setting within its range, their product past the address space: refused
        // naming both, not left to fail in mmap at start.
        let e = error(&format!(
            "[engine]\nmax_concurrent_deliveries = 4096\nmemories_per_delivery = 8\n\
             max_memories_per_component = 8\n\n{MINIMAL}"
        ));
        assert!(
            e.message.contains(
                "max_concurrent_deliveries (4096) × memories_per_delivery (8) is 32768 memory slots"
            ),
            "{e}"
        );
        assert!(
            Fixture::new()
                .parse(&format!(
                    "[engine]\nmax_concurrent_deliveries = 4096\n\n{MINIMAL}"
                ))
                .is_ok()
        );
        let e = error(&format!("{MINIMAL}max_concurrency = 4097\n"));
        assert!(e.message.contains("must be between 1 and 4096"), "{e}");
        // A handler's instances above the engine's cap: refused, both keys named.
        let e = error(&format!(
            "[engine]\nmax_core_instances_per_component = 8\ncore_instances_per_delivery = 8\n\n{}",
            limits("instances = 12")
        ));
        assert!(
            e.message
                .contains("instances = 12 is above [engine] max_core_instances_per_component (8)"),
            "{e}"
        );
        // A handler left at the default takes the lower cap without a word.
        assert!(
            Fixture::new()
                .parse(&format!(
                    "[engine]\nmax_core_instances_per_component = 8\ncore_instances_per_delivery = 8\n\n{MINIMAL}"
                ))
                .is_ok()
        );
    }

    /// A path that is not a regular file — a device that never ends, a named pipe nobody
    /// writes to (which would hold the open for good) — is refused at once, naming what it is.
    #[cfg(unix)]
    #[test]
    fn a_configuration_path_that_is_not_a_file_is_refused_at_once() {
        use std::os::unix::ffi::OsStrExt as _;
        let e = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert!(e.message.contains("is a device, not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("jobhook.toml");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let e = Config::load(&fifo).unwrap_err();
        assert!(e.message.contains("is a named pipe (FIFO)"), "{e}");
    }

    /// A file with nothing to read — no byte at all, only white space, only comments, a
    /// byte-order mark — is refused as empty (a file cut short while it was written is the
    /// usual cause) rather than read as a configuration of defaults without handlers; a file
    /// with one section is not empty.
    #[test]
    fn an_empty_configuration_file_is_refused_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobhook.toml");
        for text in [
            "",
            "\n\n",
            "  \t\r\n \n",
            "# jobhook\n\n   # [server]\n",
            "\u{feff}",
            "\u{feff}# a comment\r\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::load(&path).unwrap_err();
            assert_eq!(e.file, path, "{text:?}: {e}");
            assert_eq!(e.line, None, "{text:?}: {e}");
            assert!(
                e.message.starts_with("the configuration file is empty"),
                "{text:?}: {e}"
            );
            assert!(e.message.contains("cut short"), "{text:?}: {e}");
            let parsed = Config::parse(text, &path).unwrap_err();
            assert_eq!(parsed, e, "{text:?}");
        }
        let c = Config::parse("[server]\n", &path).expect("a section is not empty");
        assert!(c.handlers.is_empty());
    }

    /// A file past the limit is refused at the limit, even when the read stops in the middle
    /// of a character: the limit is what is reported, not the cut.
    #[test]
    fn a_file_past_the_limit_is_refused_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobhook.toml");
        // Two-byte characters, one byte past the limit: the read stops inside one.
        std::fs::write(&path, "é".repeat(MAX_CONFIG_BYTES as usize / 2 + 1)).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert!(
            e.message
                .contains(&format!("holds more than {MAX_CONFIG_BYTES} bytes")),
            "{e}"
        );
    }

    #[test]
    fn missing_component_file_is_named() {
        let e = error(&MINIMAL.replace("h.wasm", "missing.wasm"));
        assert!(e.message.contains("missing.wasm"), "{e}");
        assert!(e.message.contains("handlers.component"), "{e}");
        assert_eq!(e.line, Some(4), "{e}");
    }

    /// A path is shown whole up to [`MAX_QUOTED_PATH_CHARS`] characters and cut past it; no
    /// message, whatever it quotes, is longer than [`MAX_ERROR_MESSAGE_CHARS`].
    #[test]
    fn paths_are_shown_whole_to_their_cap_and_messages_are_capped() {
        let whole = format!("{}.wasm", "d/".repeat(1000));
        let e = error(&MINIMAL.replace("h.wasm", &whole));
        assert!(e.message.contains(&whole), "{e}");
        assert!(!e.message.contains('…'), "{e}");
        let long = format!("{}.wasm", "d/".repeat(3000));
        let e = error(&MINIMAL.replace("h.wasm", &long));
        assert!(e.message.contains(&"d/".repeat(1000)), "{e}");
        assert!(!e.message.contains(&long), "{}", excerpt(&e.message, 600));
        assert!(e.message.contains('…'), "{}", excerpt(&e.message, 600));
        assert!(
            e.message.chars().count() < MAX_QUOTED_PATH_CHARS + 600,
            "{}",
            e.message.chars().count()
        );
        let message = capped("m".repeat(3 * MAX_ERROR_MESSAGE_CHARS));
        assert_eq!(message.chars().count(), MAX_ERROR_MESSAGE_CHARS + 1);
        assert!(message.ends_with('…'), "{message}");
        assert_eq!(capped("short".to_owned()), "short");
    }

    #[test]
    fn bad_job_types() {
        let e = error(&MINIMAL.replace("[\"*\"]", "[]"));
        assert!(e.message.contains("empty"), "{e}");
        let e = error(&MINIMAL.replace("[\"*\"]", "[\"WinCertInventory\"]"));
        assert!(e.message.contains("WinCertInventory"), "{e}");
        let e = error(&MINIMAL.replace(
            "[\"*\"]",
            "[\"*\", \"7b6bbc1b-d802-4b09-bec9-f5c221083130\"]",
        ));
        assert!(e.message.contains("mixes"), "{e}");
        let e = error(&MINIMAL.replace("[\"*\"]", "\"*\""));
        assert!(
            e.message.contains("sequence") || e.message.contains("array"),
            "{e}"
        );
    }

    #[test]
    fn bad_names_and_values() {
        for (from, to, needle) in [
            ("\"mail\"", "\"has space\"", "not a valid name"),
            ("\"mail\"", "\"\"", "not a valid name"),
        ] {
            let e = error(&MINIMAL.replace(from, to));
            assert!(e.message.contains(needle), "{e}");
        }
        let e = error(&format!("{MINIMAL}[handlers.retry]\nmax_attempts = 0\n"));
        assert!(
            e.message.starts_with(
                "handlers.retry.max_attempts (handler \"mail\") must be between 1 and"
            ),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}[handlers.limits]\nmemory_bytes = 10\n"));
        assert!(e.message.contains("memory_bytes"), "{e}");
        let e = error(&format!("{MINIMAL}max_concurrency = 0\n"));
        assert!(e.message.contains("max_concurrency"), "{e}");
        let e = error("[server]\nlisten = \"not an address\"\n");
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn missing_secrets_are_errors_that_do_not_leak_values() {
        let e = error(&format!(
            "{MINIMAL}properties = {{ P = {{ env = \"JOBHOOK_TEST_SURELY_UNSET\" }} }}\n"
        ));
        assert!(e.message.contains("JOBHOOK_TEST_SURELY_UNSET"), "{e}");
        let secret = SecretRef::Env("X".into());
        assert_eq!(format!("{secret:?}"), "SecretRef(env X)");
    }

    #[test]
    fn store_defaults_to_sqlite_with_the_standard_lease() {
        let c = Fixture::new().parse(MINIMAL).unwrap();
        assert_eq!(c.store.kind, StoreKind::Sqlite);
        assert_eq!(c.store.lease, crate::queue::store::config::DEFAULT_LEASE);
        assert_eq!(c.store.url, None);
    }

    /// `[store] retention_days`: 30 days unless set, 0 (keep everything) to ten years, and a
    /// value past the bound is refused naming the key and the range.
    #[test]
    fn store_retention_has_a_default_and_bounds() {
        use crate::queue::store::config::{DEFAULT_RETENTION_DAYS, MAX_RETENTION_DAYS};
        let f = Fixture::new();
        let c = f.parse(MINIMAL).unwrap();
        assert_eq!(c.store.retention_days, DEFAULT_RETENTION_DAYS);
        assert_eq!(DEFAULT_RETENTION_DAYS, 30);
        assert_eq!(c.store.retention(), Some(Duration::from_secs(30 * 86_400)));
        let with = |days: &str| format!("[store]\nretention_days = {days}\n{MINIMAL}");
        let all = f.parse(&with("0")).unwrap();
        assert_eq!(all.store.retention(), None, "0 keeps everything");
        let longest = f.parse(&with(&MAX_RETENTION_DAYS.to_string())).unwrap();
        assert_eq!(longest.store.retention_days, 3650);
        let e = error(&with("3651"));
        assert!(
            e.message.contains(
                "[store] retention_days must be between 0 (keep every event) and 3650, not 3651"
            ),
            "{e}"
        );
        for bad in ["-1", "\"30d\"", "1.5"] {
            let e = error(&with(bad));
            assert!(e.to_string().contains("retention_days"), "{bad}: {e}");
        }
    }

    #[test]
    fn postgres_store_with_a_password_reference() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("db-pw"), "s3cret\n").unwrap();
        let c = f
            .parse(&format!(
                "[store]\nkind = \"postgres\"\nurl = \"postgres://jobhook@127.0.0.1:5432/jobhook\"\n\
                 password = {{ file = \"db-pw\" }}\nlease_ms = 2000\n{MINIMAL}"
            ))
            .unwrap();
        assert_eq!(c.store.kind, StoreKind::Postgres);
        assert_eq!(
            c.store.url.as_deref(),
            Some("postgres://jobhook@127.0.0.1:5432/jobhook")
        );
        assert_eq!(
            c.store.password,
            Some(SecretRef::File(f.dir.path().join("db-pw")))
        );
        assert_eq!(c.store.lease, Duration::from_secs(2));
        // The reference, never the value, shows up when the configuration is printed.
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn bad_store_settings_name_the_key_and_hide_passwords() {
        let store = |body: &str| error(&format!("[store]\n{body}\n{MINIMAL}"));
        let e = store("kind = \"postgres\"");
        assert!(e.message.contains("[store] url is required"), "{e}");
        let e = store("kind = \"mysql\"");
        assert!(e.message.contains("mysql"), "{e}");
        let e = store("url = \"postgres://jobhook@db/jobhook\"");
        assert!(
            e.message.contains("only used with kind = \"postgres\""),
            "{e}"
        );
        let e = store("kind = \"postgres\"\nurl = \"postgres://jobhook:hunter2@db/jobhook\"");
        assert!(e.message.contains("contains a password"), "{e}");
        assert!(e.message.contains("password = { env"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = store("kind = \"postgres\"\nurl = \"https://db/jobhook\"");
        assert!(e.message.contains("[store] url"), "{e}");
        // A URL that could never connect is refused by `check`, not met at the start.
        let e =
            store("kind = \"postgres\"\nurl = \"postgres://jobhook@db/jobhook?sslmode=require\"");
        assert!(
            e.message.contains("[store] url sets sslmode=require"),
            "{e}"
        );
        let e = store("kind = \"postgres\"\nurl = \"postgres://db/jobhook\"");
        assert!(e.message.contains("[store] url names no user"), "{e}");
        let e = store(
            "kind = \"postgres\"\nurl = \"postgres://jobhook@db/jobhook\"\n\
             password = \"hunter2\"",
        );
        assert!(e.message.contains("literal secret is not accepted"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = store(
            "kind = \"postgres\"\nurl = \"postgres://jobhook@db/jobhook\"\n\
             password = { env = \"JOBHOOK_TEST_SURELY_UNSET_DB_PASSWORD\" }",
        );
        assert!(e.message.contains("[store] password"), "{e}");
        assert!(
            e.message.contains("JOBHOOK_TEST_SURELY_UNSET_DB_PASSWORD"),
            "{e}"
        );
        let e = store("lease_ms = 10");
        assert!(e.message.contains("[store] lease_ms"), "{e}");
        let e = store("data_dir = \"\"");
        assert!(
            e.message
                .contains("[store] data_dir is empty; name the directory"),
            "{e}"
        );
    }

    #[test]
    fn malformed_toml_reports_a_line() {
        let e = error("[[handlers]\nname = 1");
        assert!(e.line.is_some(), "{e}");
        // No key to name: the line's text is quoted instead.
        assert!(e.message.contains("(in `[[handlers]`)"), "{e}");
    }

    /// A value of the wrong type names its key path, not only serde's "invalid type".
    #[test]
    fn type_errors_name_their_key_path() {
        let e = error(&format!("[server]\nmax_body_bytes = \"x\"\n{MINIMAL}"));
        assert!(
            e.message.starts_with("server.max_body_bytes: invalid type"),
            "{e}"
        );
        assert_eq!(e.line, Some(2), "{e}");
        let e = error(&MINIMAL.replace("name = \"mail\"", "name = 5"));
        assert!(e.message.starts_with("handlers.name: "), "{e}");
        let e = error(&format!(
            "{MINIMAL}[handlers.retry]\nmax_attempts = \"3\"\n"
        ));
        assert!(
            e.message.starts_with("handlers.retry.max_attempts: "),
            "{e}"
        );
    }

    /// Whatever a property value is instead of a string or a reference, the error names the
    /// property and says what a value may be.
    /// A property name with a control character is refused, and shown quoted on one line: it
    /// cannot break the message into a line that passes for another error.
    #[test]
    fn property_names_with_control_characters_are_refused_on_one_line() {
        let e = error(&format!(
            "{MINIMAL}properties = {{ \"k\\nerror: nothing wrong here\\u001b[2J\" = \"v\" }}\n"
        ));
        assert!(
            e.message
                .starts_with("handlers.properties.\"k\\nerror: nothing wrong here\\u{1b}[2J\""),
            "{e}"
        );
        assert!(
            e.message
                .contains("a property name must not hold control characters"),
            "{e}"
        );
        assert!(
            !e.message.contains('\n') && !e.message.contains('\u{1b}'),
            "{e}"
        );
        // Names of other printable characters are kept, and shown quoted.
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{MINIMAL}properties = {{ \"Email Recipients\" = \"a\" }}\n"
            ))
            .unwrap();
        assert_eq!(c.handlers[0].properties.get("Email Recipients"), Some("a"));
    }

    #[test]
    fn property_values_say_what_they_may_be() {
        for bad in [
            "5",
            "true",
            "[1]",
            "{}",
            "{ envv = \"X\" }",
            "{ env = \"X\", file = \"y\" }",
        ] {
            let e = error(&format!("{MINIMAL}properties = {{ P = {bad} }}\n"));
            assert!(e.message.starts_with("handlers.properties.P"), "{bad}: {e}");
            assert!(
                e.message
                    .contains("{ env = \"NAME\" } or { file = \"PATH\" }"),
                "{bad}: {e}"
            );
            assert!(!e.message.contains("untagged"), "{bad}: {e}");
            assert_eq!(e.line, Some(6), "{bad}: {e}");
        }
        let e = error(&format!("{MINIMAL}properties = {{ P = 5 }}\n"));
        assert!(e.message.contains("\"5\""), "{e}");
        let e = error(&format!(
            "{MINIMAL}properties = {{ P = {{ env = \"\" }} }}\n"
        ));
        assert!(e.message.contains("`env` is empty"), "{e}");
        // What is accepted still is.
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("pw"), "s3cret").unwrap();
        let c = f
            .parse(&format!(
                "{MINIMAL}properties = {{ A = \"1\", B = {{ file = \"pw\" }} }}\n"
            ))
            .unwrap();
        assert_eq!(c.handlers[0].properties.get("A"), Some("1"));
        assert_eq!(c.handlers[0].properties.get("B"), Some("s3cret"));
    }

    #[test]
    fn listen_must_be_an_ip_address_and_port() {
        for bad in ["localhost:8480", "127.0.0.1", "8480", "[::1]"] {
            let e = error(&format!("[server]\nlisten = \"{bad}\"\n{MINIMAL}"));
            assert!(e.message.starts_with("server.listen: "), "{bad}: {e}");
            assert!(e.message.contains("IP address and port"), "{bad}: {e}");
            assert!(e.message.contains("127.0.0.1:8480"), "{bad}: {e}");
            assert!(e.message.contains("[::1]:8480"), "{bad}: {e}");
            assert_eq!(e.line, Some(2), "{bad}: {e}");
        }
        // A port past 65535 is named as the mistake it is.
        for bad in ["127.0.0.1:99999", "[::1]:65536"] {
            let e = error(&format!("[server]\nlisten = \"{bad}\"\n{MINIMAL}"));
            assert!(
                e.message.contains("is out of range; give 1 to 65535"),
                "{bad}: {e}"
            );
        }
        let f = Fixture::new();
        let c = f
            .parse(&format!("[server]\nlisten = \"[::1]:9000\"\n{MINIMAL}"))
            .unwrap();
        assert_eq!(c.server.listen.to_string(), "[::1]:9000");
    }

    /// Text the operator wrote is echoed at most [`MAX_QUOTED_CHARS`] characters long, however
    /// long it is, wherever the error comes from.
    #[test]
    fn echoed_text_is_cut_short() {
        let long = "a".repeat(100_000);
        let cases = [
            MINIMAL.replace("\"mail\"", &format!("\"{long}\"")),
            MINIMAL.replace("\"*\"", &format!("\"{long}\"")),
            format!("{MINIMAL}{long} = 1\n"),
            format!("{MINIMAL}properties = {{ {long} = 5 }}\n"),
            format!("{MINIMAL}properties = {{ P = {{ {long} = \"x\" }} }}\n"),
            format!("{MINIMAL}properties = {{ P = {{ env = \"{long}\" }} }}\n"),
            format!("[server]\nlisten = \"{long}\"\n{MINIMAL}"),
            format!("[server]\nmax_body_bytes = \"{long}\"\n{MINIMAL}"),
            format!("{MINIMAL}[handlers.limits]\n{long}_calls = 1\n"),
        ];
        for text in &cases {
            let e = error(text);
            let shown = e.to_string();
            assert!(shown.len() < 600, "{}", excerpt(&shown, 600));
            assert!(shown.contains(&"a".repeat(MAX_QUOTED_CHARS)), "{shown}");
            assert!(shown.contains('…'), "{shown}");
        }
    }

    #[test]
    fn serde_quotes_are_cut() {
        let long = "y".repeat(100);
        let capped = cap_quoted(&format!(
            "field `{long}`, value \"{long}\\\"{long}\" end `open"
        ));
        assert_eq!(
            capped,
            format!("field `{0}…`, value \"{0}…\" end `open", "y".repeat(64))
        );
    }

    /// The key path is read back from how `toml` prints an error without its input; if a new
    /// `toml` prints it differently, this fails rather than errors silently losing their key.
    #[test]
    fn toml_errors_still_carry_their_key_path() {
        #[derive(Debug, Deserialize)]
        struct Outer {
            #[allow(dead_code)]
            a: Inner,
        }
        #[derive(Debug, Deserialize)]
        struct Inner {
            #[allow(dead_code)]
            b: u8,
        }
        let e = toml::from_str::<Outer>("[a]\nb = \"x\"\n").unwrap_err();
        assert_eq!(toml_key_path(&e).as_deref(), Some("a.b"));
    }

    /// `check` learns what `serve` would meet opening the SQLite store, without creating it.
    #[test]
    fn the_store_location_is_checked_without_creating_anything() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("a-file"), "").unwrap();
        let location = |data_dir: &str| {
            f.parse(&format!("[store]\ndata_dir = \"{data_dir}\"\n{MINIMAL}"))
                .unwrap()
                .check_store_location()
        };
        let e = location("a-file").unwrap_err();
        assert!(e.message.contains("exists and is not a directory"), "{e}");
        assert!(e.message.starts_with("[store] data_dir: "), "{e}");
        let e = location("a-file/data/deeper").unwrap_err();
        assert!(
            e.message.contains("cannot be created")
                && e.message.contains("a-file is not a directory"),
            "{e}"
        );
        location("new/data").unwrap();
        assert!(!f.dir.path().join("new").exists());
        location(".").unwrap();
        #[cfg(unix)]
        {
            let e = location("/dev/null").unwrap_err();
            assert!(
                e.message
                    .contains("/dev/null exists and is not a directory"),
                "{e}"
            );
        }
        // A PostgreSQL store does not live in data_dir.
        let c = f
            .parse(&format!(
                "[store]\nkind = \"postgres\"\nurl = \"postgres://jobhook@db/jobhook\"\n\
                 data_dir = \"a-file\"\n{MINIMAL}"
            ))
            .unwrap();
        c.check_store_location().unwrap();
    }
}
