//! `jobhook:handler/mail`: e-mail through the operator's SMTP relay, or into the engine's file
//! outbox (`.eml` files in a directory, the embedded default and the handler author's way to
//! see what would be sent).
//!
//! Checks, all before anything is written or sent:
//!
//! 1. the call budget ([`CallBudget`](crate::capabilities::gate::CallBudget): mails per invocation; exceeding it traps the sandbox);
//! 2. the grant: every `To`/`Cc` address must be allowed by the handler's [`MailGrant`]
//!    (an address, `@domain`, or `*`), and a `From` chosen by the handler must be one of the
//!    grant's `from` addresses — otherwise the operator's configured From is used;
//! 3. the message: bare, valid addresses ([`MAX_RECIPIENTS`] at most), a subject without
//!    control characters (no CR/LF header injection) of at most [`MAX_SUBJECT_BYTES`], a body
//!    of at most [`MAX_BODY_BYTES`].
//!
//! Addresses are read strictly ([`parse_address`]): a plain `local@domain` whose every
//! character means the same to the grant check and to any relay. Forms that relays route
//! differently from how they read — the percent hack `a%b@c`, source routes `@a,@b:c@d`,
//! UUCP bang paths `a!b@c`, quoted local parts (which may hold `@`), comments `(...)`,
//! escapes, trailing or doubled dots, single-label domains a relay may qualify, non-ASCII, IP
//! literals `a@[192.0.2.1]` (which bypass the relay's DNS routing; the transport cannot
//! address them either) — are refused, in grants as in messages. So is `=?`, which opens an
//! RFC 2047 encoded word: the relay routes `=?utf-8?q?x=40evil.example?=@corp.example.com` to
//! corp.example.com, but a client that decodes it reads `x@evil.example`.
//!
//! The body never reaches the wire as the handler wrote it ([`encode_body`]): every line ending
//! (CR, LF or CRLF) becomes CRLF, and a body that is not short printable ASCII lines is sent
//! quoted-printable, so no bare CR or LF, NUL, over-long line or line starting with `.` can
//! form an end-of-data sequence — for this relay or a lax one — before the real one. This is
//! what keeps a handler from smuggling a second SMTP transaction past its grant. Headers are
//! built by `lettre` (non-ASCII as RFC 2047 encoded-words, lines folded), and the subject is
//! refused if it holds a control character, so no text of the handler's is ever written raw
//! into the header block.
//! An outbox message is on disk, whole, before the handler is told it was sent: it is written
//! under a temporary name no outbox consumer reads (`.<id>.eml.tmp`), fsync'ed, renamed to
//! `<id>.eml` and the directory fsync'ed, so a crash or power cut leaves either the whole
//! `.eml` or none (and perhaps a temporary file, removed once stale).
//! SMTP uses STARTTLS (default), implicit TLS, or — only for a relay on loopback — no TLS,
//! with the operator's credentials; the handler never sees them. Every byte read from the relay
//! counts against [`MAX_RELAY_READ_BYTES`] per message ([`relay`]): a relay, or anyone on the
//! path before STARTTLS, that sends a reply without end is cut off there, and the handler is
//! told so, instead of the engine buffering whatever arrives until the timeout. Plain text that
//! follows the relay's go-ahead to STARTTLS (what anyone on the path can append to inject
//! replies) closes the connection before TLS; it is never read as a reply from inside TLS.

mod relay;

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use lettre::Address;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::TlsParameters;
use serde::{Deserialize, Serialize};
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::jobhook::handler::mail::{Host, Message as WitMessage, add_to_linker};
use crate::bindings::types::CapabilityError;
use crate::capabilities::gate::{Gate, Grantable, ServiceEnv};
use crate::capabilities::outbound::{self, quote};
use crate::log_limit::LogLimit;
use crate::secret::{SecretError, SecretRef, rebase};

pub use self::relay::MAX_RELAY_READ_BYTES;
use self::relay::{Relay, RelayError, RelayTls};

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

/// Longest line of a body sent as it is (7bit), without its CRLF: RFC 5322 §2.1.1 allows 998;
/// anything longer is sent quoted-printable.
pub const MAX_PLAIN_LINE_BYTES: usize = 998;

/// Longest line of quoted-printable text, without its CRLF (RFC 2045 §6.7).
const QP_LINE_BYTES: usize = 76;

/// Default SMTP timeout: the whole exchange for one message (connect, greeting, commands, data)
/// must end within 10 s, or the relay counts as down — a relay that accepts the connection and
/// never greets, or trickles its replies, included. (What the relay may send in that time is
/// bounded separately, by [`MAX_RELAY_READ_BYTES`].)
pub const DEFAULT_SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler is told when the engine has no mail service configured.
const NOT_CONFIGURED: &str = "no mail transport is configured for this engine";

/// Space the mail outbox leaves free on its disk: mail is refused below it. The outbox is by
/// default in the data directory, on the disk of the durable queue, and nothing empties it but
/// the operator; a handler mailing as fast as its budgets allow writes some 17 MB per delivery
/// (five 1 MiB bodies, quoted-printable). Refusing mail here keeps the queue's commits — every
/// handler's events — from failing for want of space.
pub const OUTBOX_FREE_RESERVE_BYTES: u64 = 256 * 1024 * 1024;

/// What a handler is told when its mail could not be written to the outbox (the OS error and
/// the path go to the engine's log).
const OUTBOX_WRITE_FAILED: &str = "the engine could not write the mail to its outbox";

/// A message is written as `.<id>.eml.tmp` in the outbox — the leading dot hides it from `ls`
/// and `*` globs, and the `.tmp` suffix keeps it out of `*.eml` — and renamed to `<id>.eml`
/// only once it is whole and on disk. An outbox consumer takes `*.eml` files that do not start
/// with a dot; a temporary file is never mail.
const TEMP_PREFIX: &str = ".";
/// See [`TEMP_PREFIX`].
const TEMP_SUFFIX: &str = ".eml.tmp";

/// Age past which a temporary file in the outbox is a crash's leftover and is removed. They are
/// looked for when the transport first writes (after each start or configuration reload) and
/// then at most once per this period, so a leftover lives at most about twice as long. Writing
/// one message (a few MiB at most, one fsync) takes far less; an hour is long enough that no
/// write still under way — by this engine's transport from before a reload, or another engine
/// sharing the directory — is ever taken for a leftover, and short enough that leftovers do not
/// pile up.
const STALE_TEMP_AGE: Duration = Duration::from_secs(60 * 60);

/// Outbox writes in progress at once, engine-wide. A write (free-space check, file, fsync,
/// rename, directory fsync) holds a thread of the delivery runtime's blocking pool until the
/// disk answers, and a delivery whose time budget ends does not stop it: on a disk that hangs
/// (an outbox on a network share that stopped answering) each mail attempt would keep one more
/// thread, until the pool the store's calls share was full and every handler's deliveries
/// stopped. A mail waits up to [`OUTBOX_WRITE_WAIT`] for a place, then is refused (the
/// delivery fails and is retried as usual); a write on a working disk takes milliseconds, so
/// 16 at once is far more than a healthy outbox ever has.
pub const MAX_OUTBOX_WRITES_IN_PROGRESS: usize = 16;

/// How long a mail waits for one of the [`MAX_OUTBOX_WRITES_IN_PROGRESS`] places: a burst on
/// a slow but working disk (a network share at tens of milliseconds an fsync) waits its turn;
/// a disk that does not answer frees no place, and its mail is refused.
pub const OUTBOX_WRITE_WAIT: Duration = Duration::from_millis(250);

/// The engine's outbox writes in progress (see [`MAX_OUTBOX_WRITES_IN_PROGRESS`]).
static OUTBOX_WRITES: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_OUTBOX_WRITES_IN_PROGRESS);

/// Bytes an unprivileged process may still write on the file system holding `dir`; `None` when
/// the system cannot tell.
#[cfg(unix)]
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` reads the NUL-terminated path and writes only into `stats`.
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: `statvfs` returned 0, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    // The field types are 32 bits wide on some targets.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stats.f_bavail), u64::from(stats.f_frsize));
    Some(blocks.saturating_mul(size))
}

/// See the Unix version: elsewhere the reserve is not checked.
#[cfg(not(unix))]
fn free_bytes(_dir: &std::path::Path) -> Option<u64> {
    None
}

/// The `mail` capability: e-mail through the engine's relay or outbox.
#[derive(Debug)]
pub struct Mail;

impl Grantable for Mail {
    const INTERFACE: &'static str = "mail";
    const CALLS_LIMIT: &'static str = "mail-calls";
    /// A notification handler sends one.
    const DEFAULT_CALLS: u32 = 5;
    const NOT_CONFIGURED: &'static str = NOT_CONFIGURED;
    const CONFIG_KEY: &'static str = "[mail]";

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

    fn configured(config: &Option<MailConfig>) -> bool {
        config.is_some()
    }

    /// A grant of no recipient would refuse every message the handler sends.
    fn check_grant(_config: &Option<MailConfig>, grant: &MailGrant) -> Result<(), String> {
        if grant.recipients.is_empty() {
            return Err(crate::capabilities::gate::empty_grant_list(
                "recipients",
                "message",
                "list who the handler may mail, e.g. recipients = [\"pki-team@example.com\", \
                 \"@example.com\"] (\"*\" for anyone), or remove [handlers.grants.mail]",
            ));
        }
        Ok(())
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
        let under_way = self.under_way();
        let (grant, service) = match self.admit()? {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(Err(refused)),
        };
        under_way.start("the mail relay or outbox");
        let answer = service.send(grant, message).await;
        under_way.end();
        Ok(answer)
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
            // Validate the domain by validating an address in it, with the same strict rules
            // as every recipient.
            parse_address(&format!("x@{domain}"))
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
    /// Parses a bare address, as strictly as a handler's ([`parse_address`]).
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
    #[error("{} is not a valid @domain", quote(.0))]
    Domain(String),
    /// A form relays may route differently from how the grant check reads it.
    #[error("{} is refused: {why}", quote(.0), why = .1)]
    Ambiguous(String, &'static str),
    /// An IP-literal domain.
    #[error(
        "{} is refused: IP-literal domains bypass the relay's routing and are not accepted",
        quote(.0)
    )]
    IpLiteral(String),
}

/// Characters of a local part besides ASCII letters and digits. RFC 5321's atom also allows
/// `!` and `%`, which relays still treat as UUCP bang paths and the percent hack (routing to
/// another host than the one after `@`), and its quoted strings may hold `@`, spaces and
/// escapes; none of them is needed for a real mailbox, so they are refused.
const LOCAL_PART_SYMBOLS: &[u8] = b".+-_=#$&'*/?^`{|}~";

/// A bare `local@domain` address, read strictly (see the module documentation): a dot-atom
/// local part of letters, digits and [`LOCAL_PART_SYMBOLS`]; a domain of two or more LDH labels
/// without a trailing dot; no IP literal ([`AddressError::IpLiteral`]).
pub fn parse_address(text: &str) -> Result<Address, AddressError> {
    if text.len() > MAX_ADDRESS_BYTES {
        return Err(AddressError::TooLong);
    }
    let ambiguous = |why: &'static str| Err(AddressError::Ambiguous(text.to_owned(), why));
    if text
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | ',' | ';'))
    {
        return Err(AddressError::NotBare(text.to_owned()));
    }
    if !text.is_ascii() {
        return ambiguous("only ASCII addresses are accepted (write an IDN domain as xn--)");
    }
    if text.contains(['(', ')']) {
        return ambiguous("comments are not accepted in an address");
    }
    if text.contains(['"', '\\']) {
        return ambiguous("quoted local parts and escapes are not accepted");
    }
    if text.contains('%') {
        return ambiguous("`%` routes through another host (the percent hack)");
    }
    if text.contains('!') {
        return ambiguous("`!` routes through another host (a UUCP bang path)");
    }
    if text.contains('[') || text.contains(']') {
        return Err(AddressError::IpLiteral(text.to_owned()));
    }
    if text.contains("=?") {
        return ambiguous(
            "`=?` opens an RFC 2047 encoded word, which a mail reader may decode to another address",
        );
    }
    if text.starts_with('@') || text.contains(':') {
        return ambiguous("source routes (`@a,@b:c@d`) are not accepted");
    }
    let Some((local, domain)) = text.split_once('@') else {
        return Err(AddressError::Invalid(text.to_owned()));
    };
    if domain.contains('@') {
        return ambiguous("an address has exactly one `@`");
    }
    let atoms_ok = !local.is_empty()
        && local.split('.').all(|atom| {
            !atom.is_empty()
                && atom
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || LOCAL_PART_SYMBOLS.contains(&b))
        });
    if !atoms_ok {
        return ambiguous(
            "the local part must be dot-separated words, no leading, trailing or doubled dot",
        );
    }
    if domain.ends_with('.') {
        return ambiguous("a trailing dot in the domain is not accepted");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return ambiguous(
            "the domain must be fully qualified (a relay may complete a single label)",
        );
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !labels.iter().all(|l| label_ok(l)) {
        return Err(AddressError::Invalid(text.to_owned()));
    }
    Address::from_str(text).map_err(|_| AddressError::Invalid(text.to_owned()))
}

/// The body as it goes on the wire, and its transfer encoding.
///
/// Every line ending — CR, LF or CRLF — becomes CRLF. The result is sent as it is (`7bit`) only
/// when every line is printable ASCII (and tab) of at most [`MAX_PLAIN_LINE_BYTES`] and none
/// starts with `.`; otherwise it is quoted-printable with every byte outside printable ASCII
/// encoded, whitespace before a line end encoded, and `.` at the start of a line encoded as
/// `=2E`. Either way the output holds only CRLF line ends and printable ASCII (and tab) and no
/// line starting with `.`, so no end-of-data sequence — strict `CRLF.CRLF` or any of the lax
/// forms some relays accept (`LF.LF`, `CR.CR`, `LF.CRLF`, ...) — can appear in it, whether or not
/// the transport dot-stuffs.
pub fn encode_body(text: &str) -> (Vec<u8>, ContentTransferEncoding) {
    let lines = split_lines(text.as_bytes());
    let plain = lines.iter().all(|line| {
        line.len() <= MAX_PLAIN_LINE_BYTES
            && line.first() != Some(&b'.')
            && line
                .iter()
                .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    });
    let mut out = Vec::with_capacity(text.len() + text.len() / 8 + 16);
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        if plain {
            out.extend_from_slice(line);
        } else {
            quoted_printable_line(line, &mut out);
        }
    }
    let encoding = if plain {
        ContentTransferEncoding::SevenBit
    } else {
        ContentTransferEncoding::QuotedPrintable
    };
    (out, encoding)
}

/// `text` split at every CRLF, CR and LF.
fn split_lines(text: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        match text.get(i) {
            Some(b'\r') => {
                lines.push(text.get(start..i).unwrap_or_default());
                i += if text.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            Some(b'\n') => {
                lines.push(text.get(start..i).unwrap_or_default());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    lines.push(text.get(start..).unwrap_or_default());
    lines
}

/// One hard line, quoted-printable, with soft line breaks keeping each output line within
/// [`QP_LINE_BYTES`].
fn quoted_printable_line(line: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut column = 0usize;
    for (i, &b) in line.iter().enumerate() {
        let last = i + 1 == line.len();
        let token = |column: usize| -> ([u8; 3], usize) {
            let literal = match b {
                b'=' => false,
                b'.' => column > 0,
                b' ' | b'\t' => !last,
                0x21..=0x7e => true,
                _ => false,
            };
            if literal {
                ([b, 0, 0], 1)
            } else {
                let hi = HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0');
                let lo = HEX.get(usize::from(b & 0x0f)).copied().unwrap_or(b'0');
                ([b'=', hi, lo], 3)
            }
        };
        let (mut bytes, mut len) = token(column);
        // Room for the token and, unless this is the line's last, a soft break's `=`.
        let room = if last {
            QP_LINE_BYTES
        } else {
            QP_LINE_BYTES - 1
        };
        if column + len > room {
            out.extend_from_slice(b"=\r\n");
            column = 0;
            (bytes, len) = token(column);
        }
        out.extend_from_slice(bytes.get(..len).unwrap_or_default());
        column += len;
    }
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

/// Where the operator fixes a relay certificate the engine refused: `[mail.smtp]` has no CA
/// setting (the relay's TLS trusts the system's roots, [`MailTransport::from_config`]), and its
/// `host` is the name the certificate must carry.
pub const TRUST: outbound::TrustSettings = outbound::TrustSettings {
    section: "[mail.smtp]",
    ca_key: None,
    name: "[mail.smtp] host must be a name the relay's certificate is issued for",
};

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
    /// Longest the exchange with the relay for one message may take, in milliseconds.
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
    #[error("[mail] outbox {path}: cannot be a directory for mail: {source}")]
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
    /// A user name or password the relay would read otherwise than written: which, and why
    /// (never the value).
    #[error("[mail.smtp] {0}")]
    Credential(String),
    /// TLS setup.
    #[error("[mail.smtp]: cannot set up TLS for {host}: {reason}")]
    Tls {
        /// The relay.
        host: String,
        /// Why.
        reason: String,
    },
    /// A timeout out of its range ([`crate::capabilities::outbound::check_call_settings`]).
    #[error("{0}")]
    OutOfRange(String),
    /// No relay host, or port 0.
    #[error("[mail.smtp] {0}")]
    Relay(&'static str),
}

/// The engine-wide mail transport, shared by every sandbox.
pub struct MailTransport {
    from: Mailbox,
    kind: TransportKind,
    /// Failed mail, told in the log at most once per [`outbound::FAILURE_LOG_INTERVAL`] for each
    /// kind (with how many more): a relay refusing every message, or handlers sending mail into
    /// an outbox that cannot be written, must not decide how much the engine logs.
    failures: MailFailureLogs,
}

/// One [`LogLimit`] per kind of mail failure, so that one kind (an outbox that is full) never
/// hides another (STARTTLS tampered with).
#[derive(Debug)]
struct MailFailureLogs {
    outbox_busy: LogLimit,
    outbox_full: LogLimit,
    outbox_write: LogLimit,
    relay_timeout: LogLimit,
    relay_too_much: LogLimit,
    starttls: LogLimit,
    relay_unreachable: LogLimit,
    relay_refused: LogLimit,
}

impl Default for MailFailureLogs {
    fn default() -> Self {
        let limit = || LogLimit::new(outbound::FAILURE_LOG_INTERVAL);
        MailFailureLogs {
            outbox_busy: limit(),
            outbox_full: limit(),
            outbox_write: limit(),
            relay_timeout: limit(),
            relay_too_much: limit(),
            starttls: limit(),
            relay_unreachable: limit(),
            relay_refused: limit(),
        }
    }
}

enum TransportKind {
    Outbox {
        dir: PathBuf,
        /// When crash leftovers were last looked for ([`STALE_TEMP_AGE`]).
        swept: Mutex<Option<Instant>>,
    },
    Smtp {
        relay: String,
        transport: Relay,
        /// `[mail.smtp] timeout_ms`: the bound on one message's whole exchange.
        timeout: Duration,
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

/// Whether `dir` is a directory, or can become one: the nearest part of its path that exists
/// must be a directory (a file in the way, or a path that cannot be looked at, is an error).
fn can_hold_directory(dir: &std::path::Path) -> std::io::Result<()> {
    missing_directories(dir).map(drop)
}

/// The parts of `dir`'s path that do not exist yet, deepest first (empty when `dir` is a
/// directory); an error when the nearest part that exists is not a directory, or cannot be
/// looked at. A relative path none of which exists is made under the working directory.
fn missing_directories(dir: &std::path::Path) -> std::io::Result<Vec<&std::path::Path>> {
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(meta) if meta.is_dir() => return Ok(missing),
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    format!("{} exists and is not a directory", at.display()),
                ));
            }
            // Not there, or a file above it (which the parent reports): look further up.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                missing.push(at);
                match at.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => at = parent,
                    _ => return Ok(missing),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

impl MailTransport {
    /// Builds the transport; `default_outbox` is used when the configuration names neither an
    /// outbox nor a relay. Nothing is created: the outbox directory is checked (it, or the
    /// nearest part of its path that exists, must be a directory) and made when mail is first
    /// written to it, so `jobhook check` leaves no trace and an outbox deleted while the engine
    /// runs comes back with the next message.
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
                can_hold_directory(&dir).map_err(|source| MailConfigError::Outbox {
                    path: dir.clone(),
                    source,
                })?;
                TransportKind::Outbox {
                    dir,
                    swept: Mutex::new(None),
                }
            }
        };
        Ok(MailTransport {
            from,
            kind,
            failures: MailFailureLogs::default(),
        })
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
            TransportKind::Outbox { dir, swept } => {
                let Ok(Ok(permit)) =
                    tokio::time::timeout(OUTBOX_WRITE_WAIT, OUTBOX_WRITES.acquire()).await
                else {
                    if let Some(untold) = self.failures.outbox_busy.due() {
                        tracing::warn!(
                            more_since_last_warning = untold,
                            outbox = %dir.display(),
                            "{MAX_OUTBOX_WRITES_IN_PROGRESS} writes to the mail outbox are in progress \
                             (its disk is not answering); mail is refused until they finish"
                        );
                    }
                    return Err(CapabilityError::Failed(
                        "the engine's mail outbox is not keeping up; the message was not written"
                            .into(),
                    ));
                };
                let sweep = {
                    let mut last = swept.lock().unwrap_or_else(|p| p.into_inner());
                    let due = last.is_none_or(|at| at.elapsed() >= STALE_TEMP_AGE);
                    if due {
                        *last = Some(Instant::now());
                    }
                    due
                };
                let job = {
                    let dir = dir.clone();
                    // The same bytes lettre's file transport wrote (`Message::formatted`), under
                    // the same name scheme (`<random UUID>.eml`); lettre wrote no side file.
                    let wire = email.formatted();
                    move || {
                        // Held until the disk answers, however long after the delivery ended.
                        let _permit = permit;
                        write_to_outbox(&dir, &uuid::Uuid::new_v4().to_string(), &wire, sweep)
                    }
                };
                match tokio::task::spawn_blocking(job).await {
                    Ok(Ok(written)) => {
                        if written.stale_removed > 0 {
                            tracing::info!(
                                outbox = %dir.display(),
                                removed = written.stale_removed,
                                "removed temporary files a crash left in the mail outbox"
                            );
                        }
                        tracing::debug!(file = %written.path.display(), "mail written to the outbox");
                        Ok(())
                    }
                    Ok(Err(OutboxError::Full { free })) => {
                        if let Some(untold) = self.failures.outbox_full.due() {
                            tracing::warn!(
                                more_since_last_warning = untold,
                                outbox = %dir.display(),
                                free_bytes = free,
                                "the mail outbox's disk has less than {OUTBOX_FREE_RESERVE_BYTES} bytes \
                                 free; mail is refused until space returns (empty the outbox)"
                            );
                        }
                        Err(CapabilityError::Failed(
                            "the engine's mail outbox is full; the message was not written".into(),
                        ))
                    }
                    Ok(Err(OutboxError::Create { path, source })) => {
                        if let Some(untold) = self.failures.outbox_write.due() {
                            tracing::warn!(outbox = %dir.display(), path = %path.display(), error = %source, more_since_last_warning = untold, "cannot create the mail outbox");
                        }
                        Err(CapabilityError::Failed(OUTBOX_WRITE_FAILED.into()))
                    }
                    Ok(Err(OutboxError::Write { path, source })) => {
                        if let Some(untold) = self.failures.outbox_write.due() {
                            tracing::warn!(outbox = %dir.display(), path = %path.display(), error = %source, more_since_last_warning = untold, "cannot write to the mail outbox");
                        }
                        Err(CapabilityError::Failed(OUTBOX_WRITE_FAILED.into()))
                    }
                    Err(e) => {
                        if let Some(untold) = self.failures.outbox_write.due() {
                            tracing::warn!(outbox = %dir.display(), error = %outbound::cause_line(&e), more_since_last_warning = untold, "cannot write to the mail outbox");
                        }
                        Err(CapabilityError::Failed(OUTBOX_WRITE_FAILED.into()))
                    }
                }
            }
            TransportKind::Smtp {
                relay,
                transport,
                timeout,
            } => {
                let wire = email.formatted();
                let exchange = transport.send(email.envelope(), &wire);
                let Ok(sent) = tokio::time::timeout(*timeout, exchange).await else {
                    if let Some(untold) = self.failures.relay_timeout.due() {
                        tracing::warn!(
                            more_since_last_warning = untold,
                            relay = %relay,
                            "the mail relay did not finish the exchange within [mail.smtp] timeout_ms ({timeout:?})"
                        );
                    }
                    return Err(CapabilityError::Timeout(
                        "the mail relay did not answer in time".into(),
                    ));
                };
                sent.map(|_| ()).map_err(|e| {
                    if let Some(hint) = outbound::certificate_hint(&e, &TRUST) {
                        if let Some(untold) = self.failures.relay_unreachable.due() {
                            tracing::warn!(relay = %relay, error = %outbound::cause_line(&e), more_since_last_warning = untold, "the mail relay did not take the message: {hint}");
                        }
                        return CapabilityError::Failed(format!(
                            "cannot connect to the mail relay: {hint}"
                        ));
                    }
                    let e = match e {
                        RelayError::TooMuch => {
                            if let Some(untold) = self.failures.relay_too_much.due() {
                                tracing::warn!(
                                    more_since_last_warning = untold,
                                    relay = %relay,
                                    "the mail relay sent more than {MAX_RELAY_READ_BYTES} bytes for one message (a reply without end?); the engine stopped reading and closed the connection"
                                );
                            }
                            return CapabilityError::Failed(format!(
                                "the mail relay sent more than {MAX_RELAY_READ_BYTES} bytes of replies; the engine stopped reading, and the message may not have been sent"
                            ));
                        }
                        RelayError::PlaintextAfterStarttls => {
                            if let Some(untold) = self.failures.starttls.due() {
                                tracing::warn!(
                                    more_since_last_warning = untold,
                                    relay = %relay,
                                    error = %outbound::cause_line(&e),
                                    "STARTTLS to the mail relay refused: plain text followed its go-ahead, which would have been read as replies from inside TLS (STARTTLS command injection); the message was not sent"
                                );
                            }
                            return CapabilityError::Failed(
                                "the mail relay's STARTTLS was tampered with (plain text after its go-ahead); the engine closed the connection before TLS, and the message was not sent".into(),
                            );
                        }
                        RelayError::Connect(_) | RelayError::Socket(_) | RelayError::NoStarttls => {
                            if let Some(untold) = self.failures.relay_unreachable.due() {
                                tracing::warn!(relay = %relay, error = %outbound::cause_line(&e), more_since_last_warning = untold, "the mail relay did not take the message");
                            }
                            return CapabilityError::Failed(
                                "the mail relay could not be reached or did not take the message".into(),
                            );
                        }
                        RelayError::Smtp(e) => e,
                    };
                    if let Some(untold) = self.failures.relay_refused.due() {
                        tracing::warn!(relay = %relay, error = %outbound::cause_line(&e), more_since_last_warning = untold, "the mail relay did not take the message");
                    }
                    let code = e.status().map(|c| format!(" ({c})")).unwrap_or_default();
                    if e.is_timeout() {
                        CapabilityError::Timeout("the mail relay did not answer in time".into())
                    } else if e.is_permanent() {
                        CapabilityError::Failed(format!(
                            "the mail relay refused the message{code}"
                        ))
                    } else if e.is_transient() {
                        // A 4xx (greylisting, a full queue, the relay shutting down): not a
                        // refusal of this message for good, and not a relay that is down.
                        CapabilityError::Failed(format!(
                            "the mail relay deferred the message{code}: it was not sent; \
                             a later attempt may be taken"
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
        let (body, encoding) = encode_body(&message.body);
        builder
            .header(ContentType::TEXT_PLAIN)
            .body(Body::dangerous_pre_encoded(body, encoding))
            .map_err(|e| denied(format!("the message cannot be built: {e}")))
    }
}

/// Why a message did not reach the outbox.
#[derive(Debug)]
enum OutboxError {
    /// The outbox directory (or a directory above it) could not be made; `path` is the one that
    /// failed.
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Less than [`OUTBOX_FREE_RESERVE_BYTES`] free.
    Full { free: u64 },
    /// Writing, syncing or renaming the message failed; `path` is the file or directory.
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A message written to the outbox.
#[derive(Debug)]
struct Written {
    /// Its file, `<id>.eml`.
    path: PathBuf,
    /// Crash leftovers removed on the way ([`STALE_TEMP_AGE`]).
    stale_removed: usize,
}

/// Writes `wire` to `dir` as `<id>.eml` so that the file is, under that name, either absent or
/// whole and on disk, even across a power cut: the outbox is made if missing (its new directory
/// entries synced), the message is written to a temporary name ([`TEMP_PREFIX`],
/// [`TEMP_SUFFIX`]), fsync'ed, renamed to `<id>.eml`, and the directory is fsync'ed; only then
/// does it return `Ok`. On an error nothing is left under either name (as far as removing it
/// works). With `sweep`, temporary files older than [`STALE_TEMP_AGE`] are removed first.
/// Blocking: run it off the async workers.
fn write_to_outbox(dir: &Path, id: &str, wire: &[u8], sweep: bool) -> Result<Written, OutboxError> {
    create_outbox(dir)?;
    // Before the free-space check: what a crash left behind is space given back, and a sweep
    // that is due is not put off by a refusal.
    let stale_removed = if sweep {
        remove_stale_temp_files(dir)
    } else {
        0
    };
    if let Some(free) = free_bytes(dir)
        && free < OUTBOX_FREE_RESERVE_BYTES
    {
        return Err(OutboxError::Full { free });
    }
    let temp = dir.join(format!("{TEMP_PREFIX}{id}{TEMP_SUFFIX}"));
    let path = dir.join(format!("{id}.eml"));
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| OutboxError::Write { path, source }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(write_error(&temp))
        .and_then(|mut file| {
            file.write_all(wire).map_err(write_error(&temp))?;
            file.sync_all().map_err(write_error(&temp))
        })
        .and_then(|()| std::fs::rename(&temp, &path).map_err(write_error(&path)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    if let Err(e) = sync_directory(dir) {
        // The handler is told the mail was not written: it should not be sent either.
        let _ = std::fs::remove_file(&path);
        return Err(write_error(dir)(e));
    }
    Ok(Written {
        path,
        stale_removed,
    })
}

/// Makes `dir` and any missing directory above it, and syncs the directory holding each new
/// entry, so that an outbox made for a message is still there after a power cut.
fn create_outbox(dir: &Path) -> Result<(), OutboxError> {
    let create_error = |path: &Path| {
        let path = path.to_owned();
        move |source| OutboxError::Create { path, source }
    };
    let missing = missing_directories(dir).map_err(create_error(dir))?;
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(create_error(dir))?;
    for made in missing {
        let parent = match made.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        sync_directory(parent).map_err(create_error(parent))?;
    }
    Ok(())
}

/// fsyncs the directory `dir`, making the entries made, renamed or removed in it durable.
#[cfg(unix)]
fn sync_directory(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// See the Unix version: elsewhere a directory cannot be opened to be synced.
#[cfg(not(unix))]
fn sync_directory(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Removes the temporary files in `dir` older than [`STALE_TEMP_AGE`] (what a crash left
/// mid-write); returns how many. Only plain files named as this transport names them are
/// touched; errors are skipped (a leftover is harmless: no outbox consumer reads it).
fn remove_stale_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let is_temp = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
            .is_some_and(|id| uuid::Uuid::try_parse(id).is_ok());
        if !is_temp {
            continue;
        }
        // Not followed: a symbolic link is not one of ours.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let stale = meta
            .modified()
            .ok()
            .and_then(|at| now.duration_since(at).ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if meta.is_file() && stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn smtp_transport(config: &SmtpConfig) -> Result<TransportKind, MailConfigError> {
    crate::capabilities::outbound::check_call_settings(
        "[mail.smtp]",
        &[("timeout_ms", config.timeout_ms)],
        &[],
    )
    .map_err(MailConfigError::OutOfRange)?;
    let host = config.host.trim();
    if host.is_empty() {
        return Err(MailConfigError::Relay(
            "host is empty: give the relay's name or address",
        ));
    }
    if config.port == Some(0) {
        return Err(MailConfigError::Relay(
            "port = 0 is out of range: give 1 to 65535, or leave it out for the usual port of tls",
        ));
    }
    let tls_error = |reason: String| MailConfigError::Tls {
        host: host.to_owned(),
        reason,
    };
    // The same TLS parameters lettre's transport was given: the system roots, and `host` as
    // the name the relay's certificate must carry.
    let (tls, default_port) = match config.tls {
        SmtpTls::Starttls => (
            RelayTls::Starttls(
                TlsParameters::new(host.into()).map_err(|e| tls_error(e.to_string()))?,
            ),
            587,
        ),
        SmtpTls::Implicit => (
            RelayTls::Implicit(
                TlsParameters::new(host.into()).map_err(|e| tls_error(e.to_string()))?,
            ),
            465,
        ),
        SmtpTls::None => {
            if !is_loopback_name(host) {
                return Err(MailConfigError::PlainSmtp);
            }
            (RelayTls::None, 25)
        }
    };
    let port = config.port.unwrap_or(default_port);
    let credentials = match (&config.username, &config.password) {
        (Some(user), Some(reference)) => {
            // AUTH PLAIN sends the user name and the password separated by NULs, AUTH LOGIN
            // each as a line: a control character would end one early or pass for more.
            if user.is_empty() {
                return Err(MailConfigError::Credential(
                    "username is empty: give the relay's account, or leave out both username \
                     and password"
                        .into(),
                ));
            }
            if user.chars().any(char::is_control) {
                return Err(MailConfigError::Credential(
                    "username holds a control character (a line break, a NUL, ...), which SMTP \
                     authentication cannot carry: remove it"
                        .into(),
                ));
            }
            let password = reference.resolve()?;
            if password.expose().chars().any(char::is_control) {
                return Err(MailConfigError::Credential(format!(
                    "password: the password from {} holds a control character (a line break, a \
                     carriage return, a NUL, ...), which SMTP authentication cannot carry: only \
                     a secret file's one last line ending is left out; fix the secret",
                    crate::escape::escape(&reference.to_string())
                )));
            }
            Some(Credentials::new(user.clone(), password.expose().to_owned()))
        }
        (None, None) => None,
        _ => return Err(MailConfigError::HalfCredentials),
    };
    Ok(TransportKind::Smtp {
        relay: format!("{host}:{port}"),
        transport: Relay {
            host: host.to_owned(),
            port,
            tls,
            credentials,
        },
        timeout: Duration::from_millis(config.timeout_ms),
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
    use jobhook_testkit::memory::peak_rss_kib;
    use jobhook_testkit::smtp::{FLOOD_SLACK_BYTES, Flood, FloodingRelay};
    use proptest::strategy::Strategy as _;

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

    /// A relay with no host, port 0 or a timeout out of range is refused when the engine
    /// starts (and by `jobhook check`), naming the key, not when the first mail is sent.
    #[test]
    fn relay_settings_out_of_range_are_refused_naming_the_key() {
        let relay = |change: fn(&mut SmtpConfig)| {
            let mut smtp = SmtpConfig::new("127.0.0.1", 2525, SmtpTls::None);
            change(&mut smtp);
            let config = MailConfig {
                from: MailAddress::parse("jobhook@example.com").unwrap(),
                outbox: None,
                smtp: Some(smtp),
            };
            MailTransport::from_config(&config, std::path::Path::new("/nonexistent"))
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert_eq!(relay(|_| {}), Ok(()));
        for (change, says) in [
            (
                (|s| s.host = "  ".into()) as fn(&mut SmtpConfig),
                "[mail.smtp] host is empty",
            ),
            (|s| s.port = Some(0), "[mail.smtp] port = 0 is out of range"),
            (
                |s| s.timeout_ms = 0,
                "[mail.smtp] timeout_ms = 0 is out of range",
            ),
            (
                |s| s.timeout_ms = u64::MAX,
                "[mail.smtp] timeout_ms = 18446744073709551615 is out of range",
            ),
        ] {
            let err = relay(change).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
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
        // `recipients` is required: a grant without it allows nothing rather than everything.
        let e =
            serde_json::from_str::<MailGrant>(r#"{"from": ["alerts@example.com"]}"#).unwrap_err();
        assert!(e.to_string().contains("recipients"), "{e}");
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
    fn addresses_relays_route_differently_are_refused_by_class() {
        for bad in [
            "a%b@example.com",
            "a%b%c@example.com",
            "@relay.example:victim@evil.example",
            "@a.example,@b.example:c@d.example",
            "evil.example!victim@example.com",
            "\"victim@evil.example\"@example.com",
            "\"a b\"@example.com",
            "a\\@b@example.com",
            "a@b@example.com",
            "a(comment)@example.com",
            "a@example.com(evil.example)",
            "a@example.com.",
            "a.@example.com",
            ".a@example.com",
            "a..b@example.com",
            "a@example..com",
            "a@localhost",
            "a@-x.example.com",
            "a@[192.0.2.1]",
            "a@[IPv6:2001:db8::1]",
            "a@[not-an-ip]",
            "jörg@example.com",
            "a@exämple.com",
            // The same classes in other spellings: a comma route without the leading `@`, a
            // fullwidth `@`, separators that are whitespace to one reader and not to another.
            "victim@evil.example,a@example.com",
            "a\u{FF20}evil.example@example.com",
            "a\tb@example.com",
            "a\u{2028}b@example.com",
            "a@example.com\u{2029}",
            "a\u{0}@example.com",
            // RFC 2047 encoded words: routed by the envelope's domain, read by a decoding
            // client (a ticket system's intake) as another address.
            "=?utf-8?q?attacker=40evil.example=3e?=@corp.example.com",
            "=?x?b?YXR0YWNrZXJAZXZpbC5leGFtcGxl?=@corp.example.com",
            "a=?b@example.com",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} was accepted");
            let (_dir, t) = outbox();
            let grant = MailGrant::to(&["*"]).unwrap();
            assert!(
                matches!(
                    t.build(&grant, message(&[bad])),
                    Err(CapabilityError::Denied(_))
                ),
                "{bad:?} was sent under a `*` grant"
            );
        }
        // The refusal names the routing form, so the author knows what to change.
        for (bad, named) in [
            ("a%b@example.com", "percent hack"),
            ("evil.example!victim@example.com", "bang path"),
            ("@a.example:c@d.example", "source routes"),
            ("=?utf-8?q?a=40b.example?=@example.com", "encoded word"),
        ] {
            let why = parse_address(bad).unwrap_err().to_string();
            assert!(why.contains(named), "{bad:?}: {why}");
        }
        for good in [
            "a@example.com",
            "first.last+tag@mail.example.com",
            "o'brien@example.co.uk",
            "x_y-z=1@xn--bcher-kva.example",
            // `=` and `?` alone are atoms (SRS and VERP addresses carry `=`).
            "SRS0=HHH=TT=example.org=a@example.com",
            "a?b=c@example.com",
        ] {
            assert!(parse_address(good).is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn routed_address_forms_are_refused_in_grants_and_from_too() {
        for bad in [
            "a%b@example.com",
            "@relay.example:victim@evil.example",
            "evil.example!victim@example.com",
            "\"victim@evil.example\"@example.com",
            "a(comment)@example.com",
            "a@example.com.",
            "a..b@example.com",
            "a@localhost",
            "jörg@example.com",
            "=?utf-8?q?a=40evil.example?=@example.com",
        ] {
            assert!(RecipientRule::parse(bad).is_err(), "grant rule {bad:?}");
            assert!(MailAddress::parse(bad).is_err(), "from {bad:?}");
            let grant = format!(r#"{{"recipients": ["pki@example.com"], "from": [{bad:?}]}}"#);
            assert!(
                serde_json::from_str::<MailGrant>(&grant).is_err(),
                "grant from {bad:?}"
            );
        }
        for bad in [
            "@example.com.",
            "@localhost",
            "@relay.example:evil.example",
            "@ex%ample.com",
            "@exämple.com",
        ] {
            assert!(RecipientRule::parse(bad).is_err(), "grant rule {bad:?}");
        }
    }

    #[test]
    fn control_characters_in_addresses_and_subjects_are_refused() {
        let (_dir, t) = outbox();
        let grant = MailGrant::to(&["*"]).unwrap();
        for control in ['\r', '\n', '\0', '\x1b', '\x7f', '\u{85}'] {
            let mut m = message(&["a@example.com"]);
            m.subject = format!("before{control}after");
            assert!(
                matches!(t.build(&grant, m), Err(CapabilityError::Denied(_))),
                "subject with {control:?}"
            );
            let address = format!("a{control}b@example.com");
            assert!(
                matches!(
                    t.build(&grant, message(&[&address])),
                    Err(CapabilityError::Denied(_))
                ),
                "address with {control:?}"
            );
        }
    }

    #[test]
    fn ip_literals_are_refused_in_grants_too() {
        for rule in ["a@[192.0.2.1]", "@[192.0.2.1]", "a@[IPv6:2001:db8::1]"] {
            assert!(RecipientRule::parse(rule).is_err(), "{rule}");
        }
        assert!(MailAddress::parse("jobhook@[127.0.0.1]").is_err());
    }

    /// Undoes [`encode_body`] (quoted-printable or not) for the round-trip checks.
    fn decode(wire: &[u8], encoding: ContentTransferEncoding) -> Vec<u8> {
        if encoding != ContentTransferEncoding::QuotedPrintable {
            return wire.to_vec();
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < wire.len() {
            if wire[i] == b'=' {
                if wire.get(i + 1..i + 3) == Some(b"\r\n") {
                    i += 3;
                    continue;
                }
                let hex = std::str::from_utf8(&wire[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(wire[i]);
                i += 1;
            }
        }
        out
    }

    /// Every CR, LF and CRLF as CRLF: what the receiver should read.
    fn normalised(text: &str) -> Vec<u8> {
        text.replace("\r\n", "\n")
            .replace('\r', "\n")
            .replace('\n', "\r\n")
            .into_bytes()
    }

    /// The wire rules: only CRLF line ends and printable ASCII (and tab), lines within the
    /// limit, and no line starting with `.` (so no end-of-data form, strict or lax).
    fn assert_wire_safe(wire: &[u8], limit: usize) {
        for (i, &b) in wire.iter().enumerate() {
            match b {
                b'\r' => assert_eq!(wire.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                b'\n' => assert_eq!(wire.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF at {i}"),
                b'\t' | 0x20..=0x7e => {}
                other => panic!("byte {other:#04x} at {i} on the wire"),
            }
        }
        let text = std::str::from_utf8(wire).unwrap();
        for line in text.split("\r\n") {
            assert!(line.len() <= limit, "line of {} bytes", line.len());
            assert!(!line.starts_with('.'), "a line starts with a dot: {line:?}");
        }
    }

    #[test]
    fn smuggling_bodies_are_normalised_and_encoded() {
        for body in [
            "hi\r\n.\r\nMAIL FROM:<x@evil.example>\r\n",
            "hi\n.\nMAIL FROM:<x@evil.example>\n",
            "hi\r.\rMAIL FROM:<x@evil.example>\r",
            "hi\n.\r\nRCPT TO:<v@evil.example>",
            "hi\r\n.\nDATA",
            "nul\0byte",
            "esc\x1b[2J",
            "grüße",
            &"x".repeat(5000),
            ".",
            "..",
            "trailing space \nx",
        ] {
            let (wire, encoding) = encode_body(body);
            assert_wire_safe(&wire, MAX_PLAIN_LINE_BYTES);
            assert_eq!(decode(&wire, encoding), normalised(body), "{body:?}");
        }
        let (wire, encoding) = encode_body("Job failed.\nRetries: 5\n");
        assert_eq!(encoding, ContentTransferEncoding::SevenBit);
        assert_eq!(wire, b"Job failed.\r\nRetries: 5\r\n");
        assert_eq!(
            encode_body("a\n.b").1,
            ContentTransferEncoding::QuotedPrintable
        );
    }

    #[test]
    fn the_whole_message_is_wire_safe() {
        let (_dir, t) = outbox();
        let grant = MailGrant::to(&["*"]).unwrap();
        let mut m = message(&["a@example.com"]);
        m.subject = "Zertifikat läuft ab \u{202e}gnp.exe".into();
        m.body = "x\n.\nMAIL FROM:<e@evil.example>\r.\r\0".into();
        let email = t.build(&grant, m).unwrap();
        let wire = email.formatted();
        assert_wire_safe(&wire, MAX_PLAIN_LINE_BYTES);
        let text = String::from_utf8(wire).unwrap();
        assert!(text.contains("=?utf-8?b?4oCuZ25wLmV4ZQ==?="), "{text}");
        assert!(
            text.contains("Content-Transfer-Encoding: quoted-printable"),
            "{text}"
        );
    }

    #[test]
    fn unicode_line_separators_in_a_subject_start_no_header() {
        let (_dir, t) = outbox();
        let grant = MailGrant::to(&["*"]).unwrap();
        let mut m = message(&["a@example.com"]);
        m.subject = "x\u{2028}Bcc: victim@evil.example\u{2029}y".into();
        let wire = t.build(&grant, m).unwrap().formatted();
        assert_wire_safe(&wire, MAX_PLAIN_LINE_BYTES);
        let text = String::from_utf8(wire).unwrap();
        assert!(!text.to_ascii_lowercase().contains("\nbcc:"), "{text}");
        assert!(
            !text.contains('\u{2028}') && !text.contains('\u{2029}'),
            "{text}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// For any body — any characters, with CR, LF, dots and NULs made likely — the wire
        /// holds no bare CR or LF and no end-of-data form, and decodes to the body with its
        /// line ends normalised.
        #[test]
        fn any_body_is_wire_safe(
            body in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just('\r'),
                    proptest::prelude::Just('\n'),
                    proptest::prelude::Just('.'),
                    proptest::prelude::Just('\0'),
                    proptest::prelude::Just(' '),
                    proptest::prelude::any::<char>(),
                    proptest::char::range('a', 'z'),
                ],
                0..400,
            ).prop_map(|c| c.into_iter().collect::<String>()),
            long in 0usize..3,
        ) {
            let body = body.repeat(long * 10 + 1);
            let (wire, encoding) = encode_body(&body);
            assert_wire_safe(&wire, MAX_PLAIN_LINE_BYTES);
            if encoding == ContentTransferEncoding::QuotedPrintable {
                assert_wire_safe(&wire, QP_LINE_BYTES);
            }
            proptest::prop_assert_eq!(decode(&wire, encoding), normalised(&body));
        }
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

    /// `[mail.smtp] timeout_ms` bounds the whole exchange, whatever the relay stalls on: never
    /// greeting, trickling its greeting a byte at a time (each byte would satisfy a per-read
    /// timeout), or greeting and then never answering. Each ends as a capability time-out, soon
    /// after the timeout.
    #[tokio::test]
    async fn a_stalling_relay_is_given_up_after_the_timeout_whatever_it_stalls_on() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for stall in ["silent", "trickle", "after-greeting"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let relay = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                if stall == "trickle" {
                    for b in b"220 relay.example ESMTP".iter().cycle() {
                        if s.write_all(&[*b]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                if stall == "after-greeting" {
                    let _ = s.write_all(b"220 relay.example ESMTP\r\n").await;
                }
                let mut buf = [0u8; 256];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
            let mut smtp = SmtpConfig::new("127.0.0.1", port, SmtpTls::None);
            smtp.timeout_ms = 300;
            let config = MailConfig::smtp("jobhook@example.com", smtp).unwrap();
            let t = MailTransport::from_config(&config, Path::new("unused")).unwrap();
            let started = std::time::Instant::now();
            let grant = MailGrant::to(&["*"]).unwrap();
            let result = t.send(&grant, message(&["a@example.com"])).await;
            let took = started.elapsed();
            assert!(
                matches!(result, Err(CapabilityError::Timeout(_))),
                "{stall}: {result:?}"
            );
            assert!(took < Duration::from_secs(3), "{stall}: {took:?}");
            relay.abort();
        }
    }

    /// A relay whose TLS certificate the engine refuses is told, to the handler and to the
    /// log, with why and that `[mail.smtp]` has no CA setting, instead of as out of reach.
    #[tokio::test]
    async fn a_refused_relay_certificate_says_mail_smtp_has_no_ca_setting() {
        let (cert, key) = outbound::refused_tls::untrusted();
        let (port, server) = outbound::refused_tls::serve(&cert, &key).await;
        let smtp = SmtpConfig::new("localhost", port, SmtpTls::Implicit);
        let config = MailConfig::smtp("jobhook@example.com", smtp).unwrap();
        let t = MailTransport::from_config(&config, Path::new("unused")).unwrap();
        let grant = MailGrant::to(&["*"]).unwrap();
        let kept = crate::log_capture::Captured::default();
        let result = {
            let _guard = tracing::subscriber::set_default(kept.warnings());
            t.send(&grant, message(&["a@example.com"])).await
        };
        let says = "the server's TLS certificate is not issued by a certificate authority the engine trusts";
        match &result {
            Err(CapabilityError::Failed(m)) => {
                assert!(
                    m.starts_with(&format!("cannot connect to the mail relay: {says}")),
                    "{m}"
                );
                assert!(m.contains("[mail.smtp] has no CA setting"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let text = kept.text();
        assert!(
            text.contains(says) && text.contains("[mail.smtp] has no CA setting"),
            "{text}"
        );
        server.abort();
    }

    /// A relay that answers 4xx — greylisting a recipient, a full queue at MAIL, shutting down
    /// after the message — has deferred the message, not refused it for good nor been out of
    /// reach: the handler is told so, with the code, and that a later attempt may be taken.
    #[tokio::test]
    async fn a_relay_that_defers_the_message_says_so_with_its_code() {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        for (defer_at, reply, code) in [
            ("RCPT", "450 4.2.0 greylisted, try again later", "450"),
            ("MAIL", "452 4.3.1 insufficient system storage", "452"),
            (".", "421 4.3.2 shutting down", "421"),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let relay = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                let (read, mut write) = s.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                let _ = write.write_all(b"220 relay.example ESMTP\r\n").await;
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        "."
                    } else {
                        line.split([' ', ':']).next().unwrap_or_default()
                    };
                    let answer = match verb {
                        v if v == defer_at => format!("{reply}\r\n"),
                        "EHLO" => "250 relay.example\r\n".into(),
                        "DATA" => {
                            in_data = true;
                            "354 go ahead\r\n".into()
                        }
                        "QUIT" => "221 bye\r\n".into(),
                        _ => "250 ok\r\n".into(),
                    };
                    if write.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
            let smtp = SmtpConfig::new("127.0.0.1", port, SmtpTls::None);
            let config = MailConfig::smtp("jobhook@example.com", smtp).unwrap();
            let t = MailTransport::from_config(&config, Path::new("unused")).unwrap();
            let grant = MailGrant::to(&["*"]).unwrap();
            let result = t.send(&grant, message(&["a@example.com"])).await;
            match &result {
                Err(CapabilityError::Failed(m)) => assert!(
                    m.starts_with(&format!("the mail relay deferred the message ({code})"))
                        && m.contains("not sent"),
                    "{defer_at}: {m}"
                ),
                other => panic!("{defer_at}: {other:?}"),
            }
            relay.abort();
        }
    }

    /// A relay that floods a reply line without end — the greeting (which anyone on the path
    /// can send before STARTTLS), its EHLO reply (read a byte at a time before STARTTLS, each
    /// byte counted) or its reply to DATA — is cut off: the handler is told the relay
    /// sent too much, at once and not at the timeout, and the relay got rid of no more than the
    /// engine's read limit plus the socket buffers before the engine closed the connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_flooding_a_reply_without_end_is_cut_off() {
        for (flood, tls) in [
            (Flood::Greeting, SmtpTls::None),
            (Flood::Greeting, SmtpTls::Starttls),
            (Flood::EhloReply, SmtpTls::None),
            (Flood::EhloReply, SmtpTls::Starttls),
            (Flood::DataReply, SmtpTls::None),
        ] {
            let relay = FloodingRelay::start(flood).await.unwrap();
            let smtp = SmtpConfig::new(relay.host(), relay.port(), tls);
            let config = MailConfig::smtp("jobhook@example.com", smtp).unwrap();
            let t = MailTransport::from_config(&config, Path::new("unused")).unwrap();
            let grant = MailGrant::to(&["*"]).unwrap();
            let rss_before = peak_rss_kib(std::process::id());
            let started = std::time::Instant::now();
            let result = t.send(&grant, message(&["a@example.com"])).await;
            let took = started.elapsed();
            let floods = relay.wait_for(1, Duration::from_secs(10)).await;
            eprintln!(
                "{flood:?} {tls:?}: {result:?} after {took:?}; the relay wrote {floods:?} bytes; \
                 peak RSS {rss_before} KiB before, {} KiB after",
                peak_rss_kib(std::process::id())
            );
            assert!(
                matches!(&result, Err(CapabilityError::Failed(m))
                    if m.contains(&format!("more than {MAX_RELAY_READ_BYTES} bytes"))),
                "{flood:?} {tls:?}: {result:?}"
            );
            assert!(
                took < DEFAULT_SMTP_TIMEOUT / 2,
                "{flood:?} {tls:?}: {took:?}"
            );
            let written = floods.first().copied().unwrap_or(u64::MAX);
            assert!(
                written < FLOOD_SLACK_BYTES,
                "{flood:?} {tls:?}: the relay wrote {written} bytes"
            );
        }
    }

    /// The entries of `dir`, by name.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Whether `name` is `<UUID>.eml`, the name lettre's file transport gave mail.
    fn is_mail_name(name: &str) -> bool {
        name.strip_suffix(".eml")
            .is_some_and(|id| uuid::Uuid::try_parse(id).is_ok())
    }

    #[tokio::test]
    async fn the_outbox_receives_whole_eml_files_and_no_temporary_file_remains() {
        let (dir, t) = outbox();
        let outbox = dir.path().join("outbox");
        let grant = MailGrant::to(&["@example.com"]).unwrap();
        let mut sent = message(&["pki@example.com"]);
        // A body at the limit, quoted-printable: the largest file a handler can make.
        sent.body = "é".repeat(MAX_BODY_BYTES / 2);
        t.send(&grant, sent).await.unwrap();
        let names = entries(&outbox);
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(is_mail_name(&names[0]), "{names:?}");
        let wire = std::fs::read(outbox.join(&names[0])).unwrap();
        let text = String::from_utf8(wire.clone()).unwrap();
        assert!(text.contains("To: pki@example.com"), "{text}");
        assert!(
            text.contains("Subject: Orchestrator WinCertInventory Job Failed"),
            "{text}"
        );
        // The whole body, to its last line.
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let (expected, encoding) = encode_body(&"é".repeat(MAX_BODY_BYTES / 2));
        assert_eq!(encoding, ContentTransferEncoding::QuotedPrintable);
        assert!(
            body.as_bytes().starts_with(&expected),
            "the body is cut short"
        );
        assert!(wire.len() > 3 * MAX_BODY_BYTES, "{} bytes", wire.len());

        // The bytes are the formatted message, as lettre's file transport wrote them.
        let email = t
            .build(&grant, message(&["pki@example.com"]))
            .unwrap()
            .formatted();
        let written = write_to_outbox(
            &outbox,
            "00000000-0000-4000-8000-000000000000",
            &email,
            false,
        )
        .unwrap();
        assert_eq!(
            written.path,
            outbox.join("00000000-0000-4000-8000-000000000000.eml")
        );
        assert_eq!(std::fs::read(&written.path).unwrap(), email);
        assert!(entries(&outbox).iter().all(|n| is_mail_name(n)));
    }

    #[tokio::test]
    async fn an_outbox_deleted_while_the_engine_runs_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("spool").join("outbox");
        let config = MailConfig::outbox("jobhook@example.com", &outbox).unwrap();
        let t = MailTransport::from_config(&config, dir.path()).unwrap();
        let grant = MailGrant::to(&["@example.com"]).unwrap();
        t.send(&grant, message(&["pki@example.com"])).await.unwrap();
        // An operator's clean-up takes the outbox and the directory above it.
        std::fs::remove_dir_all(dir.path().join("spool")).unwrap();
        t.send(&grant, message(&["pki@example.com"])).await.unwrap();
        let names = entries(&outbox);
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(is_mail_name(&names[0]), "{names:?}");
    }

    /// What the engine logs at warn and above while `f` runs on this thread.
    async fn logged<F: std::future::Future>(f: F) -> (F::Output, String) {
        let kept = crate::log_capture::Captured::default();
        let guard = tracing::subscriber::set_default(kept.warnings());
        let out = f.await;
        drop(guard);
        let text = kept.text();
        (out, text)
    }

    /// A message the outbox cannot take: the handler gets the engine's answer, the log the OS
    /// error and the path, and nothing is left in the outbox.
    async fn assert_refused(t: &MailTransport, outbox: &Path) {
        let grant = MailGrant::to(&["@example.com"]).unwrap();
        let (sent, log) = logged(t.send(&grant, message(&["pki@example.com"]))).await;
        match sent {
            Err(CapabilityError::Failed(reason)) => assert_eq!(reason, OUTBOX_WRITE_FAILED),
            other => panic!("{other:?}"),
        }
        assert!(log.contains("cannot write to the mail outbox"), "{log}");
        assert!(log.contains(&outbox.display().to_string()), "{log}");
        assert!(log.contains("error="), "{log}");
        assert_eq!(entries(outbox), Vec::<String>::new());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn an_outbox_that_cannot_be_written_gives_the_handler_the_engines_error() {
        use std::os::unix::fs::PermissionsExt as _;

        // A read-only outbox. A privileged user writes anyway: then it proves nothing here, and
        // the next case, which holds for everyone, stands in for it.
        let (dir, t) = outbox();
        let read_only = dir.path().join("outbox");
        std::fs::create_dir(&read_only).unwrap();
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::File::create(read_only.join("probe")).is_err() {
            assert_refused(&t, &read_only).await;
        }
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o755)).unwrap();

        // An outbox whose path leaves no room for a file name in it (PATH_MAX is 4096 bytes):
        // the file cannot be made, whoever the engine runs as.
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_owned();
        while deep.as_os_str().len() < 4060 - 201 {
            deep.push("d".repeat(200));
        }
        let room = 4060 - deep.as_os_str().len() - 1;
        deep.push("d".repeat(room));
        std::fs::create_dir_all(&deep).unwrap();
        let config = MailConfig::outbox("jobhook@example.com", &deep).unwrap();
        let t = MailTransport::from_config(&config, dir.path()).unwrap();
        assert_refused(&t, &deep).await;

        // A file where the outbox should be (put there after the engine started).
        let (dir, t) = outbox();
        std::fs::write(dir.path().join("outbox"), "x").unwrap();
        let grant = MailGrant::to(&["@example.com"]).unwrap();
        let (sent, log) = logged(t.send(&grant, message(&["pki@example.com"]))).await;
        match sent {
            Err(CapabilityError::Failed(reason)) => assert_eq!(reason, OUTBOX_WRITE_FAILED),
            other => panic!("{other:?}"),
        }
        assert!(log.contains("cannot create the mail outbox"), "{log}");
        assert!(log.contains("error="), "{log}");
    }

    #[tokio::test]
    async fn temporary_files_a_crash_left_are_removed_once_stale() {
        let (dir, t) = outbox();
        let outbox = dir.path().join("outbox");
        std::fs::create_dir(&outbox).unwrap();
        let temp = |id: &str| outbox.join(format!("{TEMP_PREFIX}{id}{TEMP_SUFFIX}"));
        let stale = temp("11111111-1111-4111-8111-111111111111");
        let fresh = temp("22222222-2222-4222-8222-222222222222");
        let foreign = outbox.join(".notes.eml.tmp");
        let old = SystemTime::now() - STALE_TEMP_AGE - Duration::from_secs(60);
        for path in [&stale, &fresh, &foreign] {
            let file = std::fs::File::create(path).unwrap();
            if path != &fresh {
                file.set_modified(old).unwrap();
            }
        }
        let grant = MailGrant::to(&["@example.com"]).unwrap();
        t.send(&grant, message(&["pki@example.com"])).await.unwrap();
        assert!(!stale.exists());
        // One still being written (by another engine sharing the outbox), and what is not ours.
        assert!(fresh.exists() && foreign.exists());
        let mails: Vec<_> = entries(&outbox)
            .into_iter()
            .filter(|n| is_mail_name(n))
            .collect();
        assert_eq!(mails.len(), 1);
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
        // Checked, not made.
        assert!(!dir.path().join("default-outbox").exists());
        // A file in the way, at the outbox or above it, is a configuration error.
        std::fs::write(dir.path().join("file"), "x").unwrap();
        for blocked in ["file", "file/outbox", "file/a/b"] {
            let e = MailTransport::from_config(&c, &dir.path().join(blocked)).unwrap_err();
            assert!(matches!(e, MailConfigError::Outbox { .. }), "{e}");
            assert!(e.to_string().contains("is not a directory"), "{e}");
        }
        assert!(serde_json::from_str::<MailConfig>(r#"{"from": "not an address"}"#).is_err());
        let c: MailConfig = serde_json::from_str(
            r#"{"from": "a@example.com", "smtp": {"host": "smtp.example.com", "tls": "implicit", "username": "u", "password": {"env": "X"}}}"#,
        ).unwrap();
        assert_eq!(c.smtp.unwrap().tls, SmtpTls::Implicit);
    }

    /// SMTP AUTH credentials the relay would read otherwise than written are refused, naming
    /// the key and not the value: an empty user name, and a control character in the user name
    /// or the password (AUTH PLAIN separates them with NULs, AUTH LOGIN sends each as a line).
    #[test]
    fn smtp_credentials_the_relay_would_misread_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("pw");
        let with = |username: &str, secret: &str| {
            std::fs::write(&password, secret).unwrap();
            let mut smtp = SmtpConfig::new("smtp.example.com", 587, SmtpTls::Starttls);
            smtp.username = Some(username.into());
            smtp.password = Some(SecretRef::File(password.clone()));
            let config = MailConfig::smtp("a@example.com", smtp).unwrap();
            MailTransport::from_config(&config, dir.path())
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert!(with("jobhook", "pass word:1\n").is_ok());
        for (username, secret, says) in [
            ("", "pw", "[mail.smtp] username is empty"),
            (
                "job\0hook",
                "pw",
                "[mail.smtp] username holds a control character",
            ),
            (
                "job\r\nhook",
                "pw",
                "[mail.smtp] username holds a control character",
            ),
            (
                "jobhook",
                "p\0w",
                "[mail.smtp] password: the password from file",
            ),
            ("jobhook", "pw\r", "holds a control character"),
        ] {
            let e = with(username, secret).unwrap_err();
            assert!(e.contains(says), "{username:?} {secret:?}: {e}");
            assert!(!e.contains("hook\0") && !e.contains("p\0w"), "{e:?}");
        }
    }
}
