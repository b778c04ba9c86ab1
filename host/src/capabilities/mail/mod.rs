//! `jobhook:handler/mail`: e-mail through the operator's SMTP relay, or into the engine's file
//! outbox (`.eml` files in a directory, the embedded default and the handler author's way to
//! see what would be sent).
//!
//! Checks, all before anything is written or sent:
//!
//! 1. the call budget ([`CallBudget`]: mails per invocation; exceeding it traps the sandbox);
//! 2. the grant: every `To`/`Cc` address must be allowed by the handler's [`MailGrant`]
//!    (an address, `@domain`, or `*`), and a `From` chosen by the handler must be one of the
//!    grant's `from` addresses — otherwise the operator's configured From is used;
//! 3. the message: bare, valid addresses ([`MAX_RECIPIENTS`] at most), a subject without
//!    control characters (no CR/LF header injection) of at most [`MAX_SUBJECT_BYTES`], a body
//!    of at most [`MAX_BODY_BYTES`].
//!
//! The message itself is built by `lettre` (headers encoded, lines folded, body
//! transfer-encoded), so no text of the handler's is ever written raw into the header block.
//! SMTP uses STARTTLS (default), implicit TLS, or — only for a relay on loopback — no TLS,
//! with the operator's credentials; the handler never sees them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{Address, AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde::{Deserialize, Serialize};
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::jobhook::handler::mail::{Host, Message as WitMessage, add_to_linker};
use crate::bindings::types::CapabilityError;
use crate::capabilities::gate::{Gate, Grantable, ServiceEnv};
use crate::capabilities::outbound::quote;
use crate::secret::{SecretError, SecretRef, rebase};

/// Recipients (`To` and `Cc` together) per message. A notification goes to a team list or a
/// few people; 50 allows a real distribution and stops a handler from spamming a directory.
pub const MAX_RECIPIENTS: usize = 50;

/// Longest subject, in bytes. RFC 5322 lines stop at 998 characters; a subject is read in a
/// list view, and 512 bytes is more than any list shows.
pub const MAX_SUBJECT_BYTES: usize = 512;

/// Largest plain-text body. A job report is a few KiB; 1 MiB is generous and well under every
/// relay's message size limit once encoded.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Longest address (RFC 5321 path limit).
pub const MAX_ADDRESS_BYTES: usize = 254;

/// Default SMTP command timeout: a relay that does not answer a command in 10 s is down.
pub const DEFAULT_SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler is told when the engine has no mail service configured.
const NOT_CONFIGURED: &str = "no mail transport is configured for this engine ([mail])";

/// The `mail` capability: e-mail through the engine's relay or outbox.
#[derive(Debug)]
pub struct Mail;

impl Grantable for Mail {
    const INTERFACE: &'static str = "mail";
    const CALLS_LIMIT: &'static str = "mail-calls";
    /// A notification handler sends one.
    const DEFAULT_CALLS: u32 = 5;
    const NOT_CONFIGURED: &'static str = NOT_CONFIGURED;

    type Config = Option<MailConfig>;
    type Grant = MailGrant;
    type Service = MailTransport;
    type ConfigError = MailConfigError;

    fn permissive_grant() -> MailGrant {
        MailGrant::permissive()
    }

    fn rebase(config: &mut Option<MailConfig>, base: &Path) {
        let Some(m) = config.as_mut() else {
            return;
        };
        m.outbox = m.outbox.as_ref().map(|p| base.join(p));
        if let Some(password) = m.smtp.as_mut().and_then(|smtp| smtp.password.as_mut()) {
            rebase(password, base);
        }
    }

    fn service(
        config: &Option<MailConfig>,
        env: &ServiceEnv,
    ) -> Result<Option<MailTransport>, MailConfigError> {
        config
            .as_ref()
            .map(|c| MailTransport::from_config(c, &env.default_outbox))
            .transpose()
    }

    fn add_to_linker<T: Send + 'static>(
        linker: &mut Linker<T>,
        get: fn(&mut T) -> &mut Gate<Self>,
    ) -> wasmtime::Result<()> {
        add_to_linker::<T, HasSelf<Gate<Self>>>(linker, get)
    }
}

/// The mail capability of one sandbox.
pub type MailCapability = Gate<Mail>;

impl Host for Gate<Mail> {
    async fn send(&mut self, message: WitMessage) -> wasmtime::Result<Result<(), CapabilityError>> {
        let (grant, service) = match self.admit()? {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(Err(refused)),
        };
        Ok(service.send(grant, message).await)
    }
}

/// One entry of a grant's recipient list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientRule {
    /// Any address.
    Any,
    /// Any address at this domain (lowercase; subdomains are not included).
    Domain(String),
    /// Exactly this address (compared without regard to ASCII case).
    Address(String),
}

impl RecipientRule {
    /// Parses `*`, `@example.com` or `pki-team@example.com`.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let text = text.trim();
        if text == "*" {
            return Ok(RecipientRule::Any);
        }
        if let Some(domain) = text.strip_prefix('@') {
            // Validate the domain by validating an address in it.
            Address::from_str(&format!("x@{domain}"))
                .map_err(|_| AddressError::Domain(text.to_owned()))?;
            return Ok(RecipientRule::Domain(domain.to_ascii_lowercase()));
        }
        let address = parse_address(text)?;
        Ok(RecipientRule::Address(address.to_string()))
    }

    fn allows(&self, address: &Address) -> bool {
        match self {
            RecipientRule::Any => true,
            RecipientRule::Domain(d) => address.domain().eq_ignore_ascii_case(d),
            RecipientRule::Address(a) => address_text(address).eq_ignore_ascii_case(a),
        }
    }
}

impl fmt::Display for RecipientRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecipientRule::Any => f.write_str("*"),
            RecipientRule::Domain(d) => write!(f, "@{d}"),
            RecipientRule::Address(a) => f.write_str(a),
        }
    }
}

impl Serialize for RecipientRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RecipientRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RecipientRule::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A bare e-mail address in configuration, checked when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailAddress(Address);

impl MailAddress {
    /// Parses a bare address.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        parse_address(text.trim()).map(MailAddress)
    }
}

impl fmt::Display for MailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(address_text(&self.0))
    }
}

impl Serialize for MailAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(address_text(&self.0))
    }
}

impl<'de> Deserialize<'de> for MailAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        MailAddress::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The text of an address.
fn address_text(address: &Address) -> &str {
    <Address as AsRef<str>>::as_ref(address)
}

/// Why an address or a recipient rule was refused; the message is for the guest or the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Longer than [`MAX_ADDRESS_BYTES`].
    #[error("an address is longer than {MAX_ADDRESS_BYTES} bytes")]
    TooLong,
    /// A display name, brackets, a list, whitespace or a control character.
    #[error(
        "{} is not a bare e-mail address (write user@example.com, without a name or brackets)",
        quote(.0)
    )]
    NotBare(String),
    /// Not an address.
    #[error("{} is not a valid e-mail address", quote(.0))]
    Invalid(String),
    /// An `@domain` rule whose domain is not valid.
    #[error("{0:?} is not a valid @domain")]
    Domain(String),
}

/// A bare `local@domain` address: no display name, no angle brackets, no whitespace or control
/// characters.
fn parse_address(text: &str) -> Result<Address, AddressError> {
    if text.len() > MAX_ADDRESS_BYTES {
        return Err(AddressError::TooLong);
    }
    if text
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | ',' | ';'))
    {
        return Err(AddressError::NotBare(text.to_owned()));
    }
    Address::from_str(text).map_err(|_| AddressError::Invalid(text.to_owned()))
}

/// What one handler may do with mail:
///
/// ```toml
/// [handlers.grants.mail]
/// recipients = ["pki-team@example.com", "@ops.example.com"]  # required; "*" for anyone
/// from = ["keyfactor-alerts@example.com"]                     # optional: From addresses the
///                                                             # handler may choose
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailGrant {
    /// Who the handler may mail.
    pub recipients: Vec<RecipientRule>,
    /// From addresses the handler may set; without one, the operator's `[mail] from` is used.
    #[serde(default)]
    pub from: Vec<MailAddress>,
}

impl MailGrant {
    /// Anyone, with the operator's From: what `jobhook run`, the author's harness, grants.
    pub fn permissive() -> Self {
        MailGrant {
            recipients: vec![RecipientRule::Any],
            from: Vec::new(),
        }
    }

    /// Mail to `recipients` (convenient for tests and examples).
    pub fn to(recipients: &[&str]) -> Result<Self, AddressError> {
        Ok(MailGrant {
            recipients: recipients
                .iter()
                .map(|r| RecipientRule::parse(r))
                .collect::<Result<_, _>>()?,
            from: Vec::new(),
        })
    }
}

/// How the engine talks to its relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which must succeed (port 587 by default).
    #[default]
    Starttls,
    /// TLS from the first byte, "SMTPS" (port 465 by default).
    Implicit,
    /// No TLS at all: only for a relay on loopback (port 25 by default).
    None,
}

/// The engine's SMTP relay (`[mail.smtp]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// The relay's host name (also the name its certificate must carry).
    pub host: String,
    /// The port; by default 587, 465 or 25 according to `tls`.
    #[serde(default)]
    pub port: Option<u16>,
    /// TLS mode.
    #[serde(default)]
    pub tls: SmtpTls,
    /// User name for SMTP AUTH, if the relay needs one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for SMTP AUTH, by reference.
    #[serde(default)]
    pub password: Option<SecretRef>,
    /// Timeout per SMTP command, in milliseconds.
    #[serde(default = "default_smtp_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_smtp_timeout_ms() -> u64 {
    DEFAULT_SMTP_TIMEOUT.as_millis() as u64
}

impl SmtpConfig {
    /// A relay at `host:port` with `tls` and no credentials.
    pub fn new(host: impl Into<String>, port: u16, tls: SmtpTls) -> Self {
        SmtpConfig {
            host: host.into(),
            port: Some(port),
            tls,
            username: None,
            password: None,
            timeout_ms: default_smtp_timeout_ms(),
        }
    }
}

/// The engine's mail settings (`[mail]`):
///
/// ```toml
/// [mail]
/// from = "jobhook@example.com"        # required: the From of every mail
/// outbox = "/var/lib/jobhook/outbox"  # either a file outbox ...
///
/// [mail.smtp]                         # ... or an SMTP relay
/// host = "smtp.example.com"
/// tls = "starttls"                    # "implicit", or "none" for a loopback relay
/// username = "jobhook"
/// password = { env = "SMTP_PASSWORD" }
/// ```
///
/// With neither `outbox` nor `[mail.smtp]`, [`MailTransport::from_config`] uses the default
/// outbox directory its caller passes (the engine's data directory + `outbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    /// The From address of every mail a handler does not (or may not) choose.
    pub from: MailAddress,
    /// A directory receiving one `.eml` file per mail.
    #[serde(default)]
    pub outbox: Option<PathBuf>,
    /// An SMTP relay.
    #[serde(default)]
    pub smtp: Option<SmtpConfig>,
}

impl MailConfig {
    /// Mail into the file outbox `dir`, from `from`.
    pub fn outbox(from: &str, dir: impl Into<PathBuf>) -> Result<Self, AddressError> {
        Ok(MailConfig {
            from: MailAddress::parse(from)?,
            outbox: Some(dir.into()),
            smtp: None,
        })
    }

    /// Mail through `smtp`, from `from`.
    pub fn smtp(from: &str, smtp: SmtpConfig) -> Result<Self, AddressError> {
        Ok(MailConfig {
            from: MailAddress::parse(from)?,
            outbox: None,
            smtp: Some(smtp),
        })
    }
}

/// Why the `[mail]` configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum MailConfigError {
    /// Both transports.
    #[error("[mail]: set either `outbox` or [mail.smtp], not both")]
    BothTransports,
    /// The outbox directory.
    #[error("[mail] outbox {path}: cannot create the directory: {source}")]
    Outbox {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Plain SMTP to a non-loopback relay.
    #[error(
        "[mail.smtp] tls = \"none\" is allowed only for a relay on loopback (localhost, 127.0.0.1, ::1); use \"starttls\" or \"implicit\""
    )]
    PlainSmtp,
    /// Half the credentials.
    #[error("[mail.smtp]: set both username and password, or neither")]
    HalfCredentials,
    /// The password.
    #[error("[mail.smtp] password: {0}")]
    Secret(#[from] SecretError),
    /// TLS setup.
    #[error("[mail.smtp]: cannot set up TLS for {host}: {reason}")]
    Tls {
        /// The relay.
        host: String,
        /// Why.
        reason: String,
    },
    /// A zero timeout.
    #[error("[mail.smtp] timeout_ms must be greater than 0")]
    ZeroTimeout,
}

/// The engine-wide mail transport, shared by every sandbox.
pub struct MailTransport {
    from: Mailbox,
    kind: TransportKind,
}

enum TransportKind {
    Outbox {
        dir: PathBuf,
        transport: AsyncFileTransport<Tokio1Executor>,
    },
    Smtp {
        relay: String,
        transport: AsyncSmtpTransport<Tokio1Executor>,
    },
}

impl fmt::Debug for MailTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            TransportKind::Outbox { dir, .. } => write!(
                f,
                "MailTransport(outbox {}, from {})",
                dir.display(),
                self.from
            ),
            TransportKind::Smtp { relay, .. } => {
                write!(f, "MailTransport(smtp {relay}, from {})", self.from)
            }
        }
    }
}

impl MailTransport {
    /// Builds the transport; `default_outbox` is used when the configuration names neither an
    /// outbox nor a relay. The outbox directory is created if needed.
    pub fn from_config(
        config: &MailConfig,
        default_outbox: &std::path::Path,
    ) -> Result<Self, MailConfigError> {
        let from = Mailbox::new(None, config.from.0.clone());
        let kind = match (&config.outbox, &config.smtp) {
            (Some(_), Some(_)) => return Err(MailConfigError::BothTransports),
            (_, Some(smtp)) => smtp_transport(smtp)?,
            (outbox, None) => {
                let dir = outbox.clone().unwrap_or_else(|| default_outbox.to_owned());
                std::fs::create_dir_all(&dir).map_err(|source| MailConfigError::Outbox {
                    path: dir.clone(),
                    source,
                })?;
                TransportKind::Outbox {
                    transport: AsyncFileTransport::new(&dir),
                    dir,
                }
            }
        };
        Ok(MailTransport { from, kind })
    }

    /// The outbox directory, when mail goes to files.
    pub fn outbox_dir(&self) -> Option<&std::path::Path> {
        match &self.kind {
            TransportKind::Outbox { dir, .. } => Some(dir),
            TransportKind::Smtp { .. } => None,
        }
    }

    /// Checks `message` against `grant` and the engine's rules, then delivers it.
    pub async fn send(
        &self,
        grant: &MailGrant,
        message: WitMessage,
    ) -> Result<(), CapabilityError> {
        let email = self.build(grant, message)?;
        match &self.kind {
            TransportKind::Outbox { dir, transport } => {
                transport.send(email).await.map(|_| ()).map_err(|e| {
                    tracing::warn!(outbox = %dir.display(), error = %e, "cannot write to the mail outbox");
                    CapabilityError::Failed("the engine could not write the mail to its outbox".into())
                })
            }
            TransportKind::Smtp { relay, transport } => {
                transport.send(email).await.map(|_| ()).map_err(|e| {
                    tracing::warn!(relay = %relay, error = %e, "the mail relay did not take the message");
                    if e.is_timeout() {
                        CapabilityError::Timeout("the mail relay did not answer in time".into())
                    } else if e.is_permanent() {
                        let code = e.status().map(|c| format!(" ({c})")).unwrap_or_default();
                        CapabilityError::Failed(format!(
                            "the mail relay refused the message{code}"
                        ))
                    } else {
                        CapabilityError::Failed(
                            "the mail relay could not be reached or did not take the message".into(),
                        )
                    }
                })
            }
        }
    }

    /// Validates the guest's message and builds the e-mail.
    fn build(&self, grant: &MailGrant, message: WitMessage) -> Result<Message, CapabilityError> {
        let denied = CapabilityError::Denied;
        let count = message.to.len().saturating_add(message.cc.len());
        if count == 0 {
            return Err(denied("the message has no recipients".into()));
        }
        if count > MAX_RECIPIENTS {
            return Err(CapabilityError::LimitExceeded(format!(
                "the message has {count} recipients; the limit is {MAX_RECIPIENTS}"
            )));
        }
        let check = |text: &String| -> Result<Mailbox, CapabilityError> {
            let address = parse_address(text).map_err(|e| denied(e.to_string()))?;
            if !grant.recipients.iter().any(|r| r.allows(&address)) {
                return Err(denied(format!(
                    "{} is not an allowed recipient for this handler (allowed: {})",
                    quote(text),
                    grant
                        .recipients
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            Ok(Mailbox::new(None, address))
        };
        let to = message
            .to
            .iter()
            .map(check)
            .collect::<Result<Vec<_>, _>>()?;
        let cc = message
            .cc
            .iter()
            .map(check)
            .collect::<Result<Vec<_>, _>>()?;
        let from = match &message.from {
            None => self.from.clone(),
            Some(text) => {
                let address = parse_address(text).map_err(|e| denied(e.to_string()))?;
                if !grant.from.iter().any(|allowed| {
                    address_text(&allowed.0).eq_ignore_ascii_case(address_text(&address))
                }) {
                    return Err(denied(format!(
                        "From {} is not allowed for this handler; leave `from` unset to use the engine's From address",
                        quote(text)
                    )));
                }
                Mailbox::new(None, address)
            }
        };
        if message.subject.len() > MAX_SUBJECT_BYTES {
            return Err(CapabilityError::LimitExceeded(format!(
                "the subject is longer than {MAX_SUBJECT_BYTES} bytes"
            )));
        }
        if message.subject.chars().any(char::is_control) {
            return Err(denied(
                "the subject contains a control character (CR/LF would start a new header)".into(),
            ));
        }
        if message.body.len() > MAX_BODY_BYTES {
            return Err(CapabilityError::LimitExceeded(format!(
                "the body is longer than {MAX_BODY_BYTES} bytes"
            )));
        }
        let mut builder = Message::builder().from(from).subject(message.subject);
        for mailbox in to {
            builder = builder.to(mailbox);
        }
        for mailbox in cc {
            builder = builder.cc(mailbox);
        }
        builder
            .header(ContentType::TEXT_PLAIN)
            .body(message.body)
            .map_err(|e| denied(format!("the message cannot be built: {e}")))
    }
}

fn smtp_transport(config: &SmtpConfig) -> Result<TransportKind, MailConfigError> {
    if config.timeout_ms == 0 {
        return Err(MailConfigError::ZeroTimeout);
    }
    let host = config.host.trim();
    let tls_error = |reason: String| MailConfigError::Tls {
        host: host.to_owned(),
        reason,
    };
    let (tls, default_port) = match config.tls {
        SmtpTls::Starttls => (
            Tls::Required(TlsParameters::new(host.into()).map_err(|e| tls_error(e.to_string()))?),
            587,
        ),
        SmtpTls::Implicit => (
            Tls::Wrapper(TlsParameters::new(host.into()).map_err(|e| tls_error(e.to_string()))?),
            465,
        ),
        SmtpTls::None => {
            if !is_loopback_name(host) {
                return Err(MailConfigError::PlainSmtp);
            }
            (Tls::None, 25)
        }
    };
    let port = config.port.unwrap_or(default_port);
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .tls(tls)
        .timeout(Some(Duration::from_millis(config.timeout_ms)));
    match (&config.username, &config.password) {
        (Some(user), Some(password)) => {
            let password = password.resolve()?;
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        (None, None) => {}
        _ => return Err(MailConfigError::HalfCredentials),
    }
    Ok(TransportKind::Smtp {
        relay: format!("{host}:{port}"),
        transport: builder.build(),
    })
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(to: &[&str]) -> WitMessage {
        WitMessage {
            from: None,
            to: to.iter().map(|s| s.to_string()).collect(),
            cc: vec![],
            subject: "Orchestrator WinCertInventory Job Failed".into(),
            body: "Orchestrator Job failed too many times".into(),
        }
    }

    fn outbox() -> (tempfile::TempDir, MailTransport) {
        let dir = tempfile::tempdir().unwrap();
        let config = MailConfig::outbox("jobhook@example.com", dir.path().join("outbox")).unwrap();
        let transport = MailTransport::from_config(&config, dir.path()).unwrap();
        (dir, transport)
    }

    #[test]
    fn rules_parse_and_match() {
        let grant = MailGrant::to(&["pki@example.com", "@Ops.Example.com"]).unwrap();
        let allowed = |a: &str| {
            let a = Address::from_str(a).unwrap();
            grant.recipients.iter().any(|r| r.allows(&a))
        };
        assert!(allowed("pki@example.com"));
        assert!(allowed("PKI@Example.com"));
        assert!(allowed("anyone@ops.example.com"));
        assert!(!allowed("anyone@sub.ops.example.com"));
        assert!(!allowed("other@example.com"));
        assert!(RecipientRule::parse("@").is_err());
        assert!(RecipientRule::parse("Name <a@b.c>").is_err());
        assert!(RecipientRule::parse("a@b.c, d@e.f").is_err());
        let g: MailGrant =
            serde_json::from_str(r#"{"recipients": ["*"], "from": ["alerts@example.com"]}"#)
                .unwrap();
        assert_eq!(g.recipients, vec![RecipientRule::Any]);
        assert!(
            serde_json::from_str::<MailGrant>(r#"{"recipients": ["not an address"]}"#).is_err()
        );
        assert!(serde_json::from_str::<MailGrant>(r#"{"recipients": [], "bcc": []}"#).is_err());
    }

    #[test]
    fn refusals() {
        let (_dir, t) = outbox();
        let grant = MailGrant::to(&["@example.com"]).unwrap();
        let refused = |m: WitMessage| t.build(&grant, m).unwrap_err();

        assert!(matches!(refused(message(&[])), CapabilityError::Denied(_)));
        assert!(
            matches!(refused(message(&["x@evil.example"])), CapabilityError::Denied(m) if m.contains("not an allowed recipient"))
        );
        assert!(matches!(
            refused(message(&["Boss <boss@example.com>"])),
            CapabilityError::Denied(_)
        ));
        assert!(matches!(
            refused(message(&["a@example.com\r\nBcc: x@evil.example"])),
            CapabilityError::Denied(_)
        ));
        let many: Vec<String> = (0..=MAX_RECIPIENTS)
            .map(|i| format!("u{i}@example.com"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            refused(message(&many)),
            CapabilityError::LimitExceeded(_)
        ));

        let mut m = message(&["a@example.com"]);
        m.subject = "Hi\r\nBcc: victim@evil.example".into();
        assert!(
            matches!(refused(m), CapabilityError::Denied(r) if r.contains("control character"))
        );
        let mut m = message(&["a@example.com"]);
        m.subject = "x".repeat(MAX_SUBJECT_BYTES + 1);
        assert!(matches!(refused(m), CapabilityError::LimitExceeded(_)));
        let mut m = message(&["a@example.com"]);
        m.body = "x".repeat(MAX_BODY_BYTES + 1);
        assert!(matches!(refused(m), CapabilityError::LimitExceeded(_)));
        let mut m = message(&["a@example.com"]);
        m.from = Some("ceo@example.com".into());
        assert!(matches!(refused(m), CapabilityError::Denied(r) if r.contains("From")));
    }

    #[test]
    fn from_is_the_operators_unless_granted() {
        let (_dir, t) = outbox();
        let mut grant = MailGrant::to(&["*"]).unwrap();
        let email = t.build(&grant, message(&["a@example.com"])).unwrap();
        let text = String::from_utf8(email.formatted()).unwrap();
        assert!(text.contains("From: jobhook@example.com\r\n"), "{text}");

        grant.from = vec![MailAddress::parse("alerts@example.com").unwrap()];
        let mut m = message(&["a@example.com"]);
        m.from = Some("Alerts@example.com".into());
        let email = t.build(&grant, m).unwrap();
        let text = String::from_utf8(email.formatted()).unwrap();
        assert!(text.contains("From: Alerts@example.com\r\n"), "{text}");
    }

    #[tokio::test]
    async fn the_outbox_receives_eml_files() {
        let (dir, t) = outbox();
        let grant = MailGrant::to(&["@example.com"]).unwrap();
        t.send(&grant, message(&["pki@example.com"])).await.unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].extension().and_then(|e| e.to_str()), Some("eml"));
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert!(text.contains("To: pki@example.com"), "{text}");
        assert!(
            text.contains("Subject: Orchestrator WinCertInventory Job Failed"),
            "{text}"
        );
    }

    #[test]
    fn config_checks() {
        let dir = tempfile::tempdir().unwrap();
        let plain = MailConfig::smtp(
            "a@example.com",
            SmtpConfig::new("smtp.example.com", 25, SmtpTls::None),
        )
        .unwrap();
        assert!(matches!(
            MailTransport::from_config(&plain, dir.path()),
            Err(MailConfigError::PlainSmtp)
        ));
        let local = MailConfig::smtp(
            "a@example.com",
            SmtpConfig::new("127.0.0.1", 2525, SmtpTls::None),
        )
        .unwrap();
        assert!(MailTransport::from_config(&local, dir.path()).is_ok());
        let mut half = SmtpConfig::new("smtp.example.com", 587, SmtpTls::Starttls);
        half.username = Some("u".into());
        let half = MailConfig::smtp("a@example.com", half).unwrap();
        assert!(matches!(
            MailTransport::from_config(&half, dir.path()),
            Err(MailConfigError::HalfCredentials)
        ));
        let c: MailConfig = serde_json::from_str(r#"{"from": "jobhook@example.com"}"#).unwrap();
        let t = MailTransport::from_config(&c, &dir.path().join("default-outbox")).unwrap();
        assert_eq!(
            t.outbox_dir(),
            Some(dir.path().join("default-outbox").as_path())
        );
        assert!(serde_json::from_str::<MailConfig>(r#"{"from": "not an address"}"#).is_err());
        let c: MailConfig = serde_json::from_str(
            r#"{"from": "a@example.com", "smtp": {"host": "smtp.example.com", "tls": "implicit", "username": "u", "password": {"env": "X"}}}"#,
        ).unwrap();
        assert_eq!(c.smtp.unwrap().tls, SmtpTls::Implicit);
    }
}
