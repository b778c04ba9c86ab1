//! Migration both ways between Keyfactor's registrations and jobhook's configuration.
//!
//! - [`import`] (`jobhook import`): reads the Job Complete Handler registrations of a Command
//!   9–10 `web.config` (Unity `<register type="IOrchestratorJobCompleteHandler" …>` blocks with
//!   `<property name=… value=…/>`) or a Command 11+ `manifest.json` (the
//!   `Keyfactor.Platform.Extensions.IOrchestratorJobCompleteHandler` section) and writes the
//!   matching `[[handlers]]` stanzas. `JobTypes` becomes `job_types`; properties whose names look
//!   secret become `{ env = "JOBHOOK_<HANDLER>_<PROP>" }` references (their values are never
//!   copied); `component` is a placeholder the operator fills in.
//! - [`forwarder_config`] (`jobhook forwarder-config`): the other way — the registration of
//!   jobhook's C# forwarder for both Command generations, built from a jobhook configuration.
//!
//! Input files are hostile: their size is bounded, the XML parser expands no DTD or entity and
//! counts nodes, a manifest that names a handler (or an option) twice is refused rather than
//! read as one of them, every key and value that reaches the output is a one-line TOML key or
//! string (control, bidi and line-separator characters written as `\u` escapes), an XML or
//! JSON value, comments carry names escaped ([`crate::escape::escape`]), and names echoed in
//! errors and warnings are cut short ([`crate::excerpt::quoted`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;
use uuid::Uuid;

use crate::app::config::Config;
use crate::context::parse_guid;
use crate::escape::{escape, needs_escape};
use crate::excerpt::quoted;
use crate::queue::registration::JobTypes;

/// Largest registration file read: a web.config is tens of KiB, a manifest a few KiB.
pub const MAX_IMPORT_BYTES: u64 = 4 * 1024 * 1024;

/// Most XML nodes parsed: a real web.config has a few thousand; this bounds memory on
/// hostile input well below what [`MAX_IMPORT_BYTES`] of tiny elements would take.
pub const MAX_XML_NODES: u32 = 200_000;

/// Longest handler name the configuration accepts (see `handlers.name`).
const MAX_HANDLER_NAME: usize = 64;

/// The Unity registration type of a Job Complete Handler (9–10).
pub const UNITY_HANDLER_TYPE: &str = "IOrchestratorJobCompleteHandler";

/// The manifest section of Job Complete Handlers (11+): also the interface's full name.
pub const MANIFEST_SECTION: &str = "Keyfactor.Platform.Extensions.IOrchestratorJobCompleteHandler";

/// The namespace of the handler interface.
const HANDLER_NAMESPACE: &str = "Keyfactor.Platform.Extensions";

/// How a Unity `type` attribute (`IOrchestratorJobCompleteHandler`, its full name, or either
/// with `, Assembly`) stands to the handler interface.
#[derive(Debug, PartialEq, Eq)]
enum HandlerType {
    /// It names the interface (or, in another namespace, a type of that name: taken as one).
    Is,
    /// It would, but for the case of a letter: .NET and Unity match type names
    /// case-sensitively, so Keyfactor does not take it for the interface. What to write.
    CaseOnly(&'static str),
    /// Another type.
    Not,
}

fn handler_type(kind: &str) -> HandlerType {
    let type_name = kind.split(',').next().unwrap_or_default().trim();
    let (namespace, short) = match type_name.rsplit_once('.') {
        Some((namespace, short)) => (Some(namespace), short),
        None => (None, type_name),
    };
    let ours = |ns: &str| ns.eq_ignore_ascii_case(HANDLER_NAMESPACE);
    let exact = short == UNITY_HANDLER_TYPE
        && namespace.is_none_or(|ns| ns == HANDLER_NAMESPACE || !ours(ns));
    if exact {
        HandlerType::Is
    } else if short.eq_ignore_ascii_case(UNITY_HANDLER_TYPE) && namespace.is_none_or(ours) {
        HandlerType::CaseOnly(if namespace.is_some() {
            MANIFEST_SECTION
        } else {
            UNITY_HANDLER_TYPE
        })
    } else {
        HandlerType::Not
    }
}

/// The property every Keyfactor handler has: comma-separated job type GUIDs.
const JOB_TYPES_PROPERTY: &str = "JobTypes";

/// Words in a property name that make its value a secret (compared case-insensitively, with
/// `_`, `-` and `.` removed): such values are replaced by environment references.
pub const SECRET_NAME_PARTS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "apikey",
    "authheader",
    "authorization",
    "credential",
    "privatekey",
    "passphrase",
    "connectionstring",
    "sharedaccesskey",
];

/// A message for the operator printed on stderr (never a secret value).
pub type Warning = String;

/// Most warnings `jobhook import` prints; past it, only how many more there were. A file within
/// [`MAX_IMPORT_BYTES`] can hold tens of thousands of registrations with a warning each, and
/// the operator needs the first few to see what is wrong (every environment variable to set is
/// in the printed configuration as well).
pub const MAX_WARNINGS_SHOWN: usize = 50;

/// The warnings to print of `warnings`: the first [`MAX_WARNINGS_SHOWN`], then one saying how
/// many more were left out.
pub fn shown_warnings(mut warnings: Vec<Warning>) -> Vec<Warning> {
    if let Some(more) = warnings
        .len()
        .checked_sub(MAX_WARNINGS_SHOWN)
        .filter(|n| *n > 0)
    {
        warnings.truncate(MAX_WARNINGS_SHOWN);
        warnings.push(format!(
            "{more} more warnings left out (only the first {MAX_WARNINGS_SHOWN} are shown); every \
             environment variable to set is named in the printed configuration"
        ));
    }
    warnings
}

/// A migration input that cannot be used, with the line when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct MigrateError {
    /// The input file.
    pub file: String,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// One Keyfactor registration, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The Unity `name` / manifest entry name.
    pub name: String,
    /// The .NET type it mapped to (`mapTo` / `TypeFullName`, plus `assemblypath`).
    pub dotnet_type: String,
    /// Where it is in the input.
    pub line: usize,
    /// `JobTypes` as written, when present.
    pub job_types: Option<String>,
    /// The other properties / options, in file order.
    pub properties: Vec<(String, String)>,
}

/// `jobhook import`: reads `path` (web.config or manifest.json) and returns the TOML stanzas
/// and the warnings for the operator.
pub fn import(path: &Path) -> Result<(String, Vec<Warning>), MigrateError> {
    let file = path.display().to_string();
    let fail = |message: String| MigrateError {
        file: file.clone(),
        line: None,
        message,
    };
    let bytes = crate::files::read_regular(path, MAX_IMPORT_BYTES).map_err(|e| match e {
        crate::files::ReadError::Io(e) => fail(format!("cannot read it: {e}")),
        crate::files::ReadError::TooLarge(_) => fail(format!(
            "is over {MAX_IMPORT_BYTES} bytes; registration files that large are refused"
        )),
        e @ crate::files::ReadError::NotRegular(_) => fail(e.to_string()),
    })?;
    let text = decode_text(bytes).map_err(fail)?;
    let registrations = read_registrations(&text, &file)?;
    Ok(to_toml(&registrations, &file))
}

/// The file's text: UTF-8, or UTF-16 with its byte-order mark (what Windows PowerShell 5's
/// `Out-File` and Notepad's "Unicode" write), decoded. Anything else is refused saying which.
fn decode_text(bytes: Vec<u8>) -> Result<String, String> {
    let utf16 = |bytes: &[u8], unit: fn([u8; 2]) -> u16| -> Result<String, String> {
        let units: Vec<u16> = bytes
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => Ok(unit([*a, *b])),
                _ => Err("is UTF-16 text with an odd number of bytes (cut short?)".to_owned()),
            })
            .collect::<Result<_, _>>()?;
        char::decode_utf16(units)
            .collect::<Result<String, _>>()
            .map_err(|e| format!("is UTF-16 text with an invalid code unit ({e})"))
    };
    match bytes.as_slice() {
        [0xFF, 0xFE, rest @ ..] => utf16(rest, u16::from_le_bytes),
        [0xFE, 0xFF, rest @ ..] => utf16(rest, u16::from_be_bytes),
        _ => String::from_utf8(bytes).map_err(|e| {
            // Text in UTF-16 has a NUL in every other byte of its ASCII part.
            let nuls = e.as_bytes().iter().take(128).filter(|b| **b == 0).count();
            let hint = if nuls > 16 {
                "; it looks like UTF-16 without a byte-order mark: save it as UTF-8"
            } else {
                ""
            };
            format!("is not UTF-8 text ({}){hint}", e.utf8_error())
        }),
    }
}

/// Reads registrations from web.config or manifest.json text, told apart by the first
/// character that is not white space or a byte-order mark.
pub fn read_registrations(text: &str, file: &str) -> Result<Vec<Registration>, MigrateError> {
    let first = |text: &str| {
        text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}')
            .chars()
            .next()
    };
    let registrations = match first(text) {
        Some('<') => read_web_config(text, file)?,
        Some('{') => read_manifest(text, file)?,
        // A manifest.json may open with a `//` or `/* */` comment (Keyfactor's sample does).
        Some('/') if first(&strip_json_comments(text)) == Some('{') => read_manifest(text, file)?,
        _ => {
            return Err(MigrateError {
                file: file.to_owned(),
                line: None,
                message: "is neither a web.config (XML) nor a manifest.json (JSON object)".into(),
            });
        }
    };
    if registrations.is_empty() {
        return Err(MigrateError {
            file: file.to_owned(),
            line: None,
            message: format!(
                "contains no Job Complete Handler registration (a <register type=\"{UNITY_HANDLER_TYPE}\"> \
                 element outside comments, or a manifest.json \"{MANIFEST_SECTION}\" entry)"
            ),
        });
    }
    Ok(registrations)
}

/// The line a roxmltree error is on. Most of its errors carry their position; the rest report
/// 1:1 wherever they are, so their line is found here instead: a refused DOCTYPE's by looking
/// for it ([`doctype_line`]), an input that ended too soon at its last line; a document with no
/// root element or over a count limit is wrong as a whole, and no line is given.
fn xml_error_line(error: &roxmltree::Error, text: &str) -> Option<usize> {
    use roxmltree::Error as E;
    match error {
        E::DtdDetected => doctype_line(text),
        E::UnclosedRootNode | E::UnexpectedEndOfStream => {
            Some(line_at(text.trim_end().len(), text))
        }
        E::NoRootNode
        | E::NodesLimitReached
        | E::AttributesLimitReached
        | E::NamespacesLimitReached => None,
        positioned => Some(positioned.pos().row as usize),
    }
}

/// The line of the DOCTYPE roxmltree refuses: the first thing after the byte order mark, the
/// XML declaration, comments, processing instructions and white space (where roxmltree looks
/// for it, `<!DOCTYPE` compared in any case); `None` when there is none there.
fn doctype_line(text: &str) -> Option<usize> {
    let start = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rest = start;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
        let skipped = if rest.starts_with("<?") {
            rest.find("?>").map(|end| end + "?>".len())
        } else if rest.starts_with("<!--") {
            rest.find("-->").map(|end| end + "-->".len())
        } else {
            break;
        };
        rest = rest.get(skipped?..)?;
    }
    const DOCTYPE: &str = "<!DOCTYPE";
    let found = rest
        .get(..DOCTYPE.len())
        .is_some_and(|open| open.eq_ignore_ascii_case(DOCTYPE));
    found.then(|| line_at(text.len() - rest.len(), text))
}

/// Where each line of a text starts, found once, so that the line of any byte is a binary
/// search: counting from the start of the text for each registration and property (roxmltree's
/// `text_pos_at` does) made reading a registration file grow with the square of its size — a
/// minute for a web.config within [`MAX_IMPORT_BYTES`].
struct LineStarts(Vec<usize>);

impl LineStarts {
    fn of(text: &str) -> Self {
        LineStarts(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(at, _)| at)
                .collect(),
        )
    }

    /// The 1-based line of byte `at` (as [`line_at`] counts).
    fn line(&self, at: usize) -> usize {
        self.0.partition_point(|newline| *newline < at) + 1
    }
}

/// The 1-based line of byte `at` of `text`.
fn line_at(at: usize, text: &str) -> usize {
    let before = text.get(..at).unwrap_or(text);
    before.bytes().filter(|b| *b == b'\n').count() + 1
}

fn read_web_config(text: &str, file: &str) -> Result<Vec<Registration>, MigrateError> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| {
        let hint = match e {
            roxmltree::Error::DtdDetected => {
                " (a DOCTYPE/DTD is refused: entity definitions are never expanded)"
            }
            roxmltree::Error::NodesLimitReached => " (too many XML nodes for a web.config)",
            _ => "",
        };
        MigrateError {
            file: file.to_owned(),
            line: xml_error_line(&e, text),
            message: format!("not well-formed XML: {e}{hint}"),
        }
    })?;
    let lines = LineStarts::of(text);
    let line_of = |node: roxmltree::Node| lines.line(node.range().start);
    // .NET resolves type names and Unity its aliases case-sensitively: a registration whose
    // type differs from the handler interface (or an alias of it) only in case is no handler
    // to Keyfactor, and its configuration fails to load. Refused saying so, never dropped
    // unsaid: the operator meant a handler there.
    let refuse_case = |node: roxmltree::Node, written: &str, meant: &str| MigrateError {
        file: file.to_owned(),
        line: Some(line_of(node)),
        message: format!(
            "type {} differs from {} only in case; .NET and Unity match type names and aliases \
             case-sensitively, so Keyfactor does not load it as a Job Complete Handler: write \
             it as {}",
            // The type's name, without the assembly after its comma.
            quoted(written.split(',').next().unwrap_or_default().trim()),
            quoted(meant),
            quoted(meant)
        ),
    };
    // Unity's `<alias alias="JCH" type="…IOrchestratorJobCompleteHandler, …"/>`: a
    // `<register type="JCH">` registers a handler as surely as the type's own name.
    let mut aliases = std::collections::BTreeSet::new();
    for alias in doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "alias")
    {
        let (Some(kind), Some(name)) = (alias.attribute("type"), alias.attribute("alias")) else {
            continue;
        };
        match handler_type(kind) {
            HandlerType::Is => {
                aliases.insert(name.trim());
            }
            HandlerType::CaseOnly(meant) => return Err(refuse_case(alias, kind, meant)),
            HandlerType::Not => {}
        }
    }
    let mut out = Vec::new();
    for register in doc
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "register")
    {
        let line = line_of(register);
        let Some(kind) = register.attribute("type") else {
            continue;
        };
        match handler_type(kind) {
            HandlerType::Is => {}
            _ if aliases.contains(kind.trim()) => {}
            HandlerType::CaseOnly(meant) => return Err(refuse_case(register, kind, meant)),
            HandlerType::Not => {
                if let Some(alias) = aliases.iter().find(|a| a.eq_ignore_ascii_case(kind.trim())) {
                    return Err(refuse_case(register, kind, alias));
                }
                continue;
            }
        }
        let fail = |message: String| MigrateError {
            file: file.to_owned(),
            line: Some(line),
            message,
        };
        let map_to = register.attribute("mapTo").unwrap_or_default().trim();
        let name = match register.attribute("name") {
            Some(name) if !name.trim().is_empty() => name.trim().to_owned(),
            _ => {
                return Err(fail(format!(
                    "<register type=\"{UNITY_HANDLER_TYPE}\"> has no name attribute; Keyfactor \
                     needs a unique name per registration"
                )));
            }
        };
        let mut job_types = None;
        let mut properties = Vec::new();
        for property in register
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == "property")
        {
            let at = line_of(property);
            let pname = property
                .attribute("name")
                .map(str::trim)
                .unwrap_or_default();
            if pname.is_empty() {
                return Err(MigrateError {
                    file: file.to_owned(),
                    line: Some(at),
                    message: format!("a <property> of registration {} has no name", quoted(&name)),
                });
            }
            if let Some(problem) = crate::capabilities::properties::name_problem(pname) {
                return Err(MigrateError {
                    file: file.to_owned(),
                    line: Some(at),
                    message: refused_name(pname, &name, problem),
                });
            }
            // `<property name="x" value="v"/>`, or Unity's `<property name="x"><value value="v"/></property>`.
            let value = property.attribute("value").or_else(|| {
                property
                    .children()
                    .find(|n| n.is_element() && n.tag_name().name() == "value")
                    .and_then(|v| v.attribute("value"))
            });
            let Some(value) = value else {
                return Err(MigrateError {
                    file: file.to_owned(),
                    line: Some(at),
                    message: format!(
                        "property {} of registration {} has no value attribute \
                         (only string values can be imported)",
                        quoted(pname),
                        quoted(&name)
                    ),
                });
            };
            if pname.eq_ignore_ascii_case(JOB_TYPES_PROPERTY) {
                if job_types.is_some() {
                    return Err(MigrateError {
                        file: file.to_owned(),
                        line: Some(at),
                        message: twice_job_types(&name),
                    });
                }
                // Unity sets a property by its exact name (manifest.json's options are bound
                // whatever their case, and are read so there).
                if pname != JOB_TYPES_PROPERTY {
                    return Err(MigrateError {
                        file: file.to_owned(),
                        line: Some(at),
                        message: format!(
                            "property {} of registration {} differs from {} only in case; Unity \
                             sets properties by their exact name, so Keyfactor would fail to \
                             load this registration: write it as {}",
                            quoted(pname),
                            quoted(&name),
                            quoted(JOB_TYPES_PROPERTY),
                            quoted(JOB_TYPES_PROPERTY)
                        ),
                    });
                }
                job_types = Some(value.to_owned());
            } else {
                properties.push((pname.to_owned(), value.to_owned()));
            }
        }
        out.push(Registration {
            name,
            dotnet_type: map_to.to_owned(),
            line,
            job_types,
            properties,
        });
    }
    Ok(out)
}

/// Why a property name the engine refuses ([`crate::capabilities::properties::name_problem`]:
/// empty, or with a control character, which a .NET property name never holds) is refused here
/// too: the import would write a file `check` refuses.
fn refused_name(property: &str, registration: &str, problem: &str) -> String {
    format!(
        "property {} of registration {}: {problem}; the engine refuses such names: rename the \
         property",
        quoted(property),
        quoted(registration)
    )
}

/// Why a registration that gives `JobTypes` twice is refused: one of the two would be lost
/// without a word, and which one Keyfactor reads is not something to guess.
fn twice_job_types(registration: &str) -> String {
    format!(
        "registration {} gives {JOB_TYPES_PROPERTY} twice (in any case); keep the one Keyfactor \
         should use, or join their GUIDs with commas in one",
        quoted(registration)
    )
}

/// Replaces `//` and `/* */` comments outside strings with spaces (newlines kept), as
/// Keyfactor's extension loader tolerates them: line numbers stay right.
fn strip_json_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut strings = JsonStrings::default();
    while let Some(c) = chars.next() {
        if strings.feed(c) {
            out.push(c);
            continue;
        }
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                    out.push(' ');
                }
            }
            ('/', Some('*')) => {
                chars.next();
                out.push_str("  ");
                let mut star = false;
                for c in chars.by_ref() {
                    out.push(if c == '\n' { '\n' } else { ' ' });
                    if star && c == '/' {
                        break;
                    }
                    star = c == '*';
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// Tells, one character of JSON text at a time, which are part of a string literal.
#[derive(Default)]
struct JsonStrings {
    inside: bool,
    escaped: bool,
}

impl JsonStrings {
    /// Takes the next character: whether it belongs to a string, its quotes included.
    fn feed(&mut self, c: char) -> bool {
        if !self.inside {
            self.inside = c == '"';
            return self.inside;
        }
        match (self.escaped, c) {
            (true, _) => self.escaped = false,
            (false, '\\') => self.escaped = true,
            (false, '"') => self.inside = false,
            _ => {}
        }
        true
    }
}

/// Replaces each comma outside strings that only white space separates from a closing `}` or
/// `]` with a space (positions kept), as the JSON configuration reader of .NET, which reads
/// manifest.json, allows trailing commas. Run on text without comments
/// ([`strip_json_comments`]).
fn strip_trailing_commas(text: &str) -> String {
    let mut out: Vec<char> = text.chars().collect();
    let mut strings = JsonStrings::default();
    let mut pending_comma: Option<usize> = None;
    // The last character outside white space: a comma after `{`, `[` or another comma follows
    // no value, and is left for the parser to refuse.
    let mut previous = None;
    for (i, c) in text.chars().enumerate() {
        if strings.feed(c) {
            pending_comma = None;
            previous = Some('"');
            continue;
        }
        let after = previous;
        if !c.is_whitespace() {
            previous = Some(c);
        }
        match c {
            ',' => {
                pending_comma = match after {
                    Some('{' | '[' | ',') | None => None,
                    Some(_) => Some(i),
                }
            }
            '}' | ']' => {
                if let Some(at) = pending_comma.take()
                    && let Some(comma) = out.get_mut(at)
                {
                    *comma = ' ';
                }
            }
            c if c.is_whitespace() => {}
            _ => pending_comma = None,
        }
    }
    out.into_iter().collect()
}

/// A member of a JSON object by name, compared case-insensitively.
fn member<'a>(object: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    object
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// A key written twice in one JSON object that matters to the import.
#[derive(Debug)]
struct DuplicateKey {
    /// The keys leading to the object.
    path: Vec<String>,
    /// The key as first written.
    first: String,
    /// The key as written again.
    again: String,
}

/// Whether a key of the object at `path` matters to the import: `extensions` at the top, the
/// handler section in it, and everything inside that section.
fn in_handler_section(path: &[String], key: &str) -> bool {
    match path {
        [] => key.eq_ignore_ascii_case("extensions"),
        [extensions] => {
            extensions.eq_ignore_ascii_case("extensions")
                && key.eq_ignore_ascii_case(MANIFEST_SECTION)
        }
        [extensions, section, ..] => {
            extensions.eq_ignore_ascii_case("extensions")
                && section.eq_ignore_ascii_case(MANIFEST_SECTION)
        }
    }
}

/// Walks a JSON document and stops at the first key written twice (compared as [`member`]
/// compares: ASCII case-insensitively) where [`in_handler_section`]: `serde_json` keeps only the
/// last of them, silently, and Keyfactor's loader gives no promise about which one it loads.
struct DuplicateFinder<'a> {
    path: Vec<String>,
    found: &'a std::cell::RefCell<Option<DuplicateKey>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for DuplicateFinder<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for DuplicateFinder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(DuplicateFinder {
                path: self.path.clone(),
                found: self.found,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if in_handler_section(&self.path, &key)
                && let Some(first) = seen.insert(key.to_ascii_lowercase(), key.clone())
            {
                *self.found.borrow_mut() = Some(DuplicateKey {
                    path: self.path.clone(),
                    first,
                    again: key,
                });
                return Err(serde::de::Error::custom("a key is written twice"));
            }
            let mut path = self.path.clone();
            path.push(key);
            map.next_value_seed(DuplicateFinder {
                path,
                found: self.found,
            })?;
        }
        Ok(())
    }
}

/// Refuses a manifest that writes a key of the handler section twice (see [`DuplicateFinder`]),
/// naming both spellings and the line of the second. `stripped` is valid JSON.
fn refuse_duplicate_keys(stripped: &str, file: &str) -> Result<(), MigrateError> {
    use serde::de::DeserializeSeed as _;
    let found = std::cell::RefCell::new(None);
    let walked = DuplicateFinder {
        path: Vec::new(),
        found: &found,
    }
    .deserialize(&mut serde_json::Deserializer::from_str(stripped));
    let Err(e) = walked else {
        return Ok(());
    };
    let message = match found.into_inner() {
        Some(duplicate) => duplicate.message(stripped),
        None => format!("not valid JSON: {e}"),
    };
    Err(MigrateError {
        file: file.to_owned(),
        line: Some(e.line()),
        message,
    })
}

impl DuplicateKey {
    /// What is wrong, naming both spellings and where they are.
    fn message(&self, stripped: &str) -> String {
        let both = if self.first == self.again {
            format!("{} is written twice", quoted(&self.again))
        } else {
            format!(
                "{} and {} are the same key",
                quoted(&self.first),
                quoted(&self.again)
            )
        };
        let place = match self.path.as_slice() {
            [] => "at the top level".to_owned(),
            [_] => "in \"extensions\"".to_owned(),
            [_, _] => {
                let first = key_lines(stripped, [self.first.as_str()])
                    .get(self.first.as_str())
                    .map_or_else(String::new, |l| format!(" (the first at line {l})"));
                return format!(
                    "handler {both} in \"{MANIFEST_SECTION}\"{first}; JSON readers keep only \
                     one of them, so which handler Keyfactor loads is not certain: remove or \
                     rename one"
                );
            }
            [_, _, inner @ ..] => format!(
                "in {}",
                inner
                    .iter()
                    .map(|key| quoted(key))
                    .collect::<Vec<_>>()
                    .join(" → ")
            ),
        };
        format!(
            "{both} {place}; JSON readers keep only one of them, so which one Keyfactor uses is \
             not certain: remove one"
        )
    }
}

/// The 1-based line where each of `keys` is first written as a key (a JSON string followed by
/// `:`) in `text`, JSON without comments (`serde_json` keeps no positions); a key written in
/// another way than `serde_json` writes it (`\u` escapes where none is needed) is not found.
/// One pass over the text whatever the number of keys: looking each up from the start of the
/// text made reading a manifest grow with the square of its entries.
fn key_lines<'k>(text: &str, keys: impl IntoIterator<Item = &'k str>) -> HashMap<&'k str, usize> {
    let mut wanted: HashMap<String, &'k str> = keys
        .into_iter()
        .filter_map(|key| Some((serde_json::to_string(key).ok()?, key)))
        .collect();
    let mut found = HashMap::new();
    let bytes = text.as_bytes();
    let (mut at, mut line) = (0, 1);
    while !wanted.is_empty()
        && let Some(&byte) = bytes.get(at)
    {
        match byte {
            b'\n' => {
                line += 1;
                at += 1;
            }
            b'"' => {
                let start = at;
                at += 1;
                // A string holds no raw line break in JSON; an escape is two bytes or more.
                while let Some(&c) = bytes.get(at) {
                    match c {
                        b'\\' => at += 2,
                        b'"' => break,
                        _ => at += 1,
                    }
                }
                at = (at + 1).min(bytes.len());
                let is_key = bytes
                    .get(at..)
                    .and_then(|rest| rest.iter().find(|b| !b.is_ascii_whitespace()))
                    == Some(&b':');
                if is_key
                    && let Some(key) = text.get(start..at).and_then(|quoted| wanted.remove(quoted))
                {
                    found.insert(key, line);
                }
            }
            _ => at += 1,
        }
    }
    found
}

fn read_manifest(text: &str, file: &str) -> Result<Vec<Registration>, MigrateError> {
    let fail = |line: Option<usize>, message: String| MigrateError {
        file: file.to_owned(),
        line,
        message,
    };
    // A byte-order mark, which Windows editors put before UTF-8, is no part of the JSON (the
    // first character is told apart past it, in `read_registrations`).
    let stripped = strip_trailing_commas(&strip_json_comments(
        text.strip_prefix('\u{feff}').unwrap_or(text),
    ));
    let root: Value = serde_json::from_str(&stripped)
        .map_err(|e| fail(Some(e.line()), format!("not valid JSON: {e}")))?;
    refuse_duplicate_keys(&stripped, file)?;
    let Some(extensions) = root.as_object().and_then(|o| member(o, "extensions")) else {
        return Err(fail(None, "has no \"extensions\" object".into()));
    };
    let Some(section) = extensions
        .as_object()
        .and_then(|o| member(o, MANIFEST_SECTION))
    else {
        return Ok(Vec::new());
    };
    let Some(entries) = section.as_object() else {
        return Err(fail(
            None,
            format!("\"{MANIFEST_SECTION}\" is not an object"),
        ));
    };
    // serde_json keeps no positions: an entry's line is where its name is first written as a
    // key.
    let lines = key_lines(&stripped, entries.keys().map(String::as_str));
    let line_of = |name: &str| lines.get(name).copied();
    let mut out = Vec::new();
    for (name, entry) in entries {
        let line = line_of(name);
        let Some(entry) = entry.as_object() else {
            return Err(fail(
                line,
                format!("extension {} is not an object", quoted(name)),
            ));
        };
        let text_of = |key: &str| {
            member(entry, key)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        let dotnet_type = match (text_of("TypeFullName"), text_of("assemblypath")) {
            ("", _) => {
                return Err(fail(
                    line,
                    format!("extension {} has no \"TypeFullName\"", quoted(name)),
                ));
            }
            (t, "") => t.to_owned(),
            (t, assembly) => format!("{t} ({assembly})"),
        };
        let mut job_types = None;
        let mut properties = Vec::new();
        if let Some(options) = member(entry, "Options") {
            let Some(options) = options.as_object() else {
                return Err(fail(
                    line,
                    format!("\"Options\" of extension {} is not an object", quoted(name)),
                ));
            };
            for (key, value) in options {
                if let Some(problem) = crate::capabilities::properties::name_problem(key) {
                    return Err(fail(line, refused_name(key, name, problem)));
                }
                let value = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(fail(
                            line,
                            format!(
                                "option {} of extension {} is not a string, number or \
                                 boolean (handler properties are strings)",
                                quoted(key),
                                quoted(name)
                            ),
                        ));
                    }
                };
                if key.eq_ignore_ascii_case(JOB_TYPES_PROPERTY) {
                    // Twice in any case is refused above (refuse_duplicate_keys).
                    job_types = Some(value);
                } else {
                    properties.push((key.clone(), value));
                }
            }
        }
        out.push(Registration {
            name: name.clone(),
            dotnet_type,
            line: line.unwrap_or(0),
            job_types,
            properties,
        });
    }
    Ok(out)
}

/// Parses Keyfactor's `JobTypes` (GUIDs separated by commas, semicolons or white space).
/// `Ok(empty)` when none is given.
pub fn parse_job_types(value: &str) -> Result<Vec<Uuid>, String> {
    let mut ids = Vec::new();
    // Seen ones in a set: a JobTypes of tens of thousands of GUIDs is checked in linear time.
    let mut seen = HashSet::new();
    for part in value
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|p| !p.is_empty())
    {
        let id =
            parse_guid(part).ok_or_else(|| format!("{} is not a job type GUID", quoted(part)))?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Whether a property's name says its value is a secret.
pub fn looks_secret(name: &str) -> bool {
    let folded: String = name
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .flat_map(char::to_lowercase)
        .collect();
    SECRET_NAME_PARTS.iter().any(|part| folded.contains(part))
}

/// `JOBHOOK_<HANDLER>_<PROP>`: upper case, anything but letters and digits as `_`.
pub fn env_var_name(handler: &str, property: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("JOBHOOK_{}_{}", clean(handler), clean(property))
}

/// Names given out so far, and where to go on numbering each one given again.
#[derive(Debug, Default)]
struct UniqueNames {
    /// Every name given out, lower-cased.
    taken: BTreeSet<String>,
    /// For a name given out (lower-cased), the number its next copy tries first: tens of
    /// thousands of registrations of one name each trying `-2`, `-3`, … from the start made the
    /// import grow with the square of their number.
    next: HashMap<String, u64>,
}

impl UniqueNames {
    /// `base`, or the first `base-N` (N from 2) not given out yet, compared lower-cased.
    fn claim(&mut self, base: &str) -> String {
        let key = base.to_ascii_lowercase();
        let mut n = self.next.get(&key).copied().unwrap_or(1);
        let suffixed = |n: u64| {
            if n == 1 {
                base.to_owned()
            } else {
                format!("{base}-{n}")
            }
        };
        let mut name = suffixed(n);
        while !self.taken.insert(name.to_ascii_lowercase()) {
            n += 1;
            name = suffixed(n);
        }
        self.next.insert(key, n + 1);
        name
    }
}

/// A handler name the configuration accepts, unique among `names`.
fn handler_name(raw: &str, names: &mut UniqueNames) -> String {
    let mut base: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_HANDLER_NAME - 4)
        .collect();
    if base.is_empty() {
        base = "handler".into();
    }
    names.claim(&base)
}

/// A TOML basic string on one line: `"` and `\` escaped, and every character
/// [`needs_escape`] (controls, line separators, bidi overrides) written as a `\u` escape, so
/// the output is valid TOML that parses back to `s` and shows nothing a terminal would act on.
/// (The `toml` writer would keep a bidi override raw and make a multi-line string of a value
/// with a line break, which is not allowed as a key.)
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) => {
                let _ = match u32::from(c) {
                    code @ 0..=0xFFFF => write!(out, "\\u{code:04X}"),
                    code => write!(out, "\\U{code:08X}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML key: bare when it can be, a basic string ([`toml_string`]) otherwise.
fn toml_key(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        s.to_owned()
    } else {
        toml_string(s)
    }
}

/// Text safe inside a one-line comment (TOML `#`, XML `<!-- -->`): control, line-separator and
/// bidi characters written visibly ([`escape`]), no `--`.
fn comment_text(s: &str) -> String {
    let mut out = escape(s).into_owned();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    out
}

/// The `[[handlers]]` stanzas for `registrations`, and the warnings for the operator.
pub fn to_toml(registrations: &[Registration], source: &str) -> (String, Vec<Warning>) {
    let mut out = String::new();
    let mut warnings = Vec::new();
    let mut taken = UniqueNames::default();
    let _ = writeln!(
        out,
        "# Imported by `jobhook import` from {}: {} Job Complete Handler registration(s).\n\
         # For each handler: set `component` to its WebAssembly build (wasm32-wasip2, relative to\n\
         # this file), grant the capabilities it imports (`jobhook inspect` lists them), set the\n\
         # environment variables named below, then run `jobhook check`.",
        comment_text(source),
        registrations.len()
    );
    // Environment variable → the handler and property that read it, across every handler:
    // names that differ only in case or punctuation (`Password`, `password`; handlers `svc.now`
    // and `svc_now`) map to the same variable, and one secret must never reach two readers.
    let mut variables: BTreeMap<String, (String, String)> = BTreeMap::new();
    // For a variable wanted again, the suffix to try first (see `UniqueNames::next`).
    let mut next_suffix: HashMap<String, u64> = HashMap::new();
    for r in registrations {
        let name = handler_name(&r.name, &mut taken);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "# Keyfactor registration {} (line {}), was: {}",
            comment_text(&r.name),
            r.line,
            comment_text(&r.dotnet_type)
        );
        if name != r.name {
            warnings.push(format!(
                "registration {} (line {}) is named {name:?}: handler names use letters, digits, '-', '_' and '.'",
                quoted(&r.name),
                r.line
            ));
        }
        let _ = writeln!(out, "[[handlers]]");
        let _ = writeln!(out, "name = {}", toml_string(&name));
        let _ = writeln!(
            out,
            "# TODO: the handler's WebAssembly component; it must exist for `jobhook check`."
        );
        let _ = writeln!(
            out,
            "component = {}",
            toml_string(&format!("handlers/{name}.wasm"))
        );
        let ids = r.job_types.as_deref().map(parse_job_types);
        match ids {
            Some(Ok(ids)) if !ids.is_empty() => {
                let list: Vec<String> = ids
                    .iter()
                    .map(|id| toml_string(&id.hyphenated().to_string().to_ascii_uppercase()))
                    .collect();
                let _ = writeln!(out, "job_types = [{}]", list.join(", "));
            }
            Some(Err(e)) => {
                warnings.push(format!(
                    "registration {} (line {}): JobTypes: {e}; its job_types are left empty \
                     for you to fill in",
                    quoted(&r.name),
                    r.line
                ));
                let _ = writeln!(
                    out,
                    "# TODO: JobTypes could not be read ({}); list the job type GUIDs, or [\"*\"] for every job type.",
                    comment_text(&e)
                );
                let _ = writeln!(out, "job_types = []");
            }
            _ => {
                warnings.push(format!(
                    "registration {} (line {}) has no JobTypes: Keyfactor requires them; fill in \
                     job_types (GUIDs, or [\"*\"] for every job type) before `jobhook check`",
                    quoted(&r.name),
                    r.line
                ));
                let _ = writeln!(
                    out,
                    "# TODO: JobTypes was empty or absent in the registration; list the job type GUIDs\n\
                     # the handler runs for, or [\"*\"] for every job type (`jobhook check` refuses [])."
                );
                let _ = writeln!(out, "job_types = []");
            }
        }
        if !r.properties.is_empty() {
            let _ = writeln!(out, "[handlers.properties]");
            let mut seen = BTreeSet::new();
            for (key, value) in &r.properties {
                if !seen.insert(key.as_str()) {
                    warnings.push(format!(
                        "registration {}: property {} is given twice; the first is kept",
                        quoted(&r.name),
                        quoted(key)
                    ));
                    continue;
                }
                if looks_secret(key) {
                    let wanted = env_var_name(&name, key);
                    let mut var = wanted.clone();
                    let mut n = next_suffix.get(&wanted).copied().unwrap_or(2);
                    while variables.contains_key(&var) {
                        var = format!("{wanted}_{n}");
                        n += 1;
                    }
                    next_suffix.insert(wanted.clone(), n);
                    if let Some((other_handler, other)) = variables.get(&wanted) {
                        let other = if *other_handler == name {
                            format!("properties {} and {}", quoted(other), quoted(key))
                        } else {
                            format!(
                                "property {} of handler {other_handler:?} and property {} of \
                                 handler {name:?}",
                                quoted(other),
                                quoted(key)
                            )
                        };
                        warnings.push(format!(
                            "handler {name:?}: {other} would both read the environment variable \
                             {wanted} (their names differ only in case or punctuation); {} \
                             reads {var} instead",
                            quoted(key)
                        ));
                    }
                    variables.insert(var.clone(), (name.clone(), key.clone()));
                    let _ = writeln!(out, "{} = {{ env = {} }}", toml_key(key), toml_string(&var));
                    warnings.push(format!(
                        "handler {name:?}: property {} looks secret; its value was not copied \
                         — set the environment variable {var} to it (or use {{ file = \"…\" }})",
                        quoted(key)
                    ));
                } else {
                    let _ = writeln!(out, "{} = {}", toml_key(key), toml_string(value));
                }
            }
        }
    }
    (out, warnings)
}

/// The forwarder's .NET class.
pub const FORWARDER_TYPE: &str = "Jobhook.Forwarder.JobhookForwarder";
/// The forwarder's assembly.
pub const FORWARDER_ASSEMBLY: &str = "Jobhook.Forwarder";
/// The registration name used for the forwarder.
pub const FORWARDER_NAME: &str = "JobhookForwarder";

/// One property of the C# forwarder: the contract between `forwarder-config` and the
/// forwarder (`forwarder/src/JobhookForwarder.cs`: its public properties for Unity, its nested
/// `Options` members for the manifest).
#[derive(Debug, Clone, Copy)]
pub struct ForwarderProperty {
    /// The property name, exactly as the forwarder declares it.
    pub name: &'static str,
    /// What it is for (printed as a comment in web.config).
    pub doc: &'static str,
    /// The value printed when the jobhook configuration does not decide it: the forwarder's
    /// own default (empty: the forwarder picks it).
    pub default: &'static str,
}

/// The forwarder's properties, in the order they are printed. `JobTypes`, `EngineUrl`,
/// `BearerToken` and `TrustedCaFile` come from the jobhook configuration; the others carry the
/// forwarder's defaults so the operator sees every knob. Adjust here when the forwarder's
/// contract changes.
pub const FORWARDER_PROPERTIES: &[ForwarderProperty] = &[
    ForwarderProperty {
        name: "JobTypes",
        doc: "job type GUIDs to forward: every job type a jobhook handler is registered for",
        default: "",
    },
    ForwarderProperty {
        name: "EngineUrl",
        doc: "the jobhook engine's base URL (events go to EngineUrl/v1/job-complete)",
        default: "",
    },
    ForwarderProperty {
        name: "BearerToken",
        doc: "one of the engine's [server] tokens (replace the placeholder; empty: none)",
        default: "",
    },
    ForwarderProperty {
        name: "SpoolDirectory",
        doc: "where events wait for delivery; one directory per registration",
        default: r"C:\ProgramData\Jobhook\Forwarder\spool",
    },
    ForwarderProperty {
        name: "RequestTimeoutMs",
        doc: "timeout of one POST to the engine, in ms",
        default: "10000",
    },
    ForwarderProperty {
        name: "InitialBackoffMs",
        doc: "first retry delay after a failed POST, in ms; doubled per failure",
        default: "1000",
    },
    ForwarderProperty {
        name: "MaxBackoffMs",
        doc: "longest retry delay, in ms",
        default: "60000",
    },
    ForwarderProperty {
        name: "MaxSpoolFiles",
        doc: "most events kept in the spool; the oldest are dropped beyond it",
        default: "100000",
    },
    ForwarderProperty {
        name: "MaxSpoolBytes",
        doc: "most bytes kept in the spool; the oldest are dropped beyond it",
        default: "268435456",
    },
    ForwarderProperty {
        name: "MaxQueuedEvents",
        doc: "most events waiting in memory for their spool file",
        default: "10000",
    },
    ForwarderProperty {
        name: "TrustedCaFile",
        doc: "a CA certificate (PEM or DER) to trust for an https:// engine, besides the system store",
        default: "",
    },
    ForwarderProperty {
        name: "UseProxy",
        doc: "true to reach the engine through the system proxy",
        default: "false",
    },
    ForwarderProperty {
        name: "DebugLog",
        doc: "true to log one line per event queued and delivered",
        default: "false",
    },
    ForwarderProperty {
        name: "ForwarderName",
        doc: "the name GET /v1/forwarders shows for this forwarder (empty: the machine name)",
        default: "",
    },
];

/// Where `TrustedCaFile` points when the engine serves TLS: a placeholder for the operator.
const FORWARDER_CA_PLACEHOLDER: &str = r"C:\ProgramData\Jobhook\Forwarder\engine-ca.pem";
/// What `BearerToken` says when tokens are configured: never a resolved secret.
pub const TOKEN_PLACEHOLDER: &str = "REPLACE-WITH-ONE-OF-THE-ENGINE-TOKENS";

/// Which Command generation(s) to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// 9–10: the Unity `<register>` for `WebAgentServices\web.config`.
    Unity,
    /// 11+: `manifest.json` for `WebAgentServices\Extensions\JobCompleteHandlers\…`.
    Manifest,
    /// Both.
    Both,
}

/// Checks `--engine-url`, the engine's base URL as Keyfactor reaches it, and returns it without
/// a trailing `/`: an `http` or `https` URL with a host and a valid port, and neither
/// credentials (the forwarder's token is `BearerToken`, and a URL is printed and logged) nor a
/// query or fragment (the forwarder appends `/v1/job-complete` to it). The error says what to
/// write.
pub fn engine_url(text: &str) -> Result<String, String> {
    const EXAMPLE: &str = "e.g. https://jobhook.example.com:8480";
    // Quoted without any user information, which no message repeats.
    let what = quoted(&crate::capabilities::outbound::without_credentials(text));
    let url = url::Url::parse(text.trim()).map_err(|e| {
        format!(
            "--engine-url {what} is not a URL ({e}); give the engine's base URL as Keyfactor \
             reaches it, {EXAMPLE}"
        )
    })?;
    // Named first, whatever else is wrong: a credential in the URL is one to take out.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "--engine-url must not hold a user name or password (it is printed into Keyfactor's \
             configuration); the forwarder authenticates with BearerToken — {EXAMPLE}"
        ));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "--engine-url {what}: the scheme must be http or https, {EXAMPLE}"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("--engine-url {what} has no host; {EXAMPLE}"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "--engine-url {what} has a query or fragment; the forwarder appends \
             /v1/job-complete to it: give only scheme, host, port and path, {EXAMPLE}"
        ));
    }
    use crate::sources::api::INGEST_PATH;
    // The endpoint's own URL pasted (the forwarder appends the engine's ingest path itself):
    // the forwarder would report it as a problem (and post to
    // the URL without that ending); a generated configuration should hold what it wants.
    let path = url.path().trim_end_matches('/');
    if path
        .len()
        .checked_sub(INGEST_PATH.len())
        .and_then(|at| path.get(at..))
        .is_some_and(|end| end.eq_ignore_ascii_case(INGEST_PATH))
    {
        return Err(format!(
            "--engine-url {what} ends with {INGEST_PATH}, the endpoint the forwarder \
             adds itself: give the engine's base URL without it, {EXAMPLE}"
        ));
    }
    // As written (not as the parser normalised it), but for a trailing `/`.
    Ok(text.trim().trim_end_matches('/').to_owned())
}

/// The forwarder's property values for `config`, in [`FORWARDER_PROPERTIES`] order, and the
/// warnings for the operator.
pub fn forwarder_values(
    config: &Config,
    engine_url: Option<&str>,
) -> (Vec<(&'static str, String)>, Vec<Warning>) {
    let mut warnings = Vec::new();
    let mut ids = BTreeSet::new();
    let mut wildcard = Vec::new();
    for h in &config.handlers {
        match &h.job_types {
            JobTypes::All => wildcard.push(h.name.clone()),
            JobTypes::Only(set) => ids.extend(set.iter().copied()),
        }
    }
    if !wildcard.is_empty() {
        warnings.push(format!(
            "handler(s) {} run for every job type (\"*\"), which no documented Keyfactor JobTypes \
             value expresses (Keyfactor says a handler can run for every job type, not how; an \
             empty value's effect is not documented): add the GUID of every job type they \
             should see to JobTypes",
            wildcard.join(", ")
        ));
    }
    if ids.is_empty() {
        warnings.push(
            "JobTypes is empty: what Keyfactor does with an empty list is not documented (every \
             job or none); list job type GUIDs"
                .to_owned(),
        );
    }
    let job_types = ids
        .iter()
        .map(|id| id.hyphenated().to_string().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(",");
    let tls = config.server.tls.is_some();
    let url = match engine_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let listen = config.server.listen;
            let scheme = if tls { "https" } else { "http" };
            if listen.ip().is_unspecified() {
                warnings.push(format!(
                    "[server] listen is {listen}: EngineUrl uses the placeholder host \
                     jobhook.example.invalid; pass --engine-url with the name Keyfactor reaches \
                     the engine by (the name in its TLS certificate)"
                ));
                format!("{scheme}://jobhook.example.invalid:{}", listen.port())
            } else {
                if listen.ip().is_loopback() {
                    warnings.push(format!(
                        "[server] listen is {listen} (loopback): the forwarder must run on this \
                         machine, or pass --engine-url"
                    ));
                }
                format!("{scheme}://{listen}")
            }
        }
    };
    let token = if !config.server.tokens.is_empty() {
        warnings.push(format!(
            "BearerToken is the placeholder {TOKEN_PLACEHOLDER}: put one of the engine's [server] \
             tokens there"
        ));
        TOKEN_PLACEHOLDER.to_owned()
    } else {
        // No sender's tokens: posting needs none (admin tokens guard only administration, and
        // are never the forwarder's).
        String::new()
    };
    let ca = if tls {
        warnings.push(format!(
            "TrustedCaFile is {FORWARDER_CA_PLACEHOLDER}: copy the CA that signed the \
             engine's certificate there (or leave it empty if the system trusts it)"
        ));
        FORWARDER_CA_PLACEHOLDER.to_owned()
    } else {
        String::new()
    };
    if config
        .server
        .tls
        .as_ref()
        .is_some_and(|t| t.requires_client_certificates())
    {
        warnings.push(
            "[server] tls.client_ca is set: the Keyfactor server must present a client \
             certificate signed by it"
                .to_owned(),
        );
    }
    let values = FORWARDER_PROPERTIES
        .iter()
        .map(|p| {
            let value = match p.name {
                "JobTypes" => job_types.clone(),
                "EngineUrl" => url.clone(),
                "BearerToken" => token.clone(),
                "TrustedCaFile" => ca.clone(),
                _ => p.default.to_owned(),
            };
            (p.name, value)
        })
        .collect();
    (values, warnings)
}

/// XML attribute text.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {
                let _ = write!(out, "&#{};", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// The Unity `<register>` (Command 9–10).
pub fn unity_register(values: &[(&'static str, String)], wildcard_note: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!-- jobhook forwarder for Keyfactor Command 9-10: inside <unity><container> of\n     \
         WebAgentServices\\web.config; copy {FORWARDER_ASSEMBLY}.dll to WebAgentServices\\bin, then iisreset. -->"
    );
    if wildcard_note {
        let _ = writeln!(
            out,
            "<!-- Some jobhook handlers run for every job type (\"*\"), which no documented JobTypes value\n     \
             expresses: add the GUID of every job type they should see. -->"
        );
    }
    let _ = writeln!(
        out,
        "<register type=\"{UNITY_HANDLER_TYPE}\" mapTo=\"{FORWARDER_TYPE}, {FORWARDER_ASSEMBLY}\" name=\"{FORWARDER_NAME}\">"
    );
    for (name, value) in values {
        let doc = FORWARDER_PROPERTIES
            .iter()
            .find(|p| p.name == *name)
            .map(|p| p.doc)
            .unwrap_or_default();
        let _ = writeln!(out, "    <!-- {} -->", comment_text(doc));
        let _ = writeln!(
            out,
            "    <property name=\"{}\" value=\"{}\" />",
            xml_escape(name),
            xml_escape(value)
        );
    }
    let _ = writeln!(out, "</register>");
    out
}

/// The `manifest.json` (Command 11+), strict JSON.
pub fn manifest(values: &[(&'static str, String)]) -> String {
    let options: serde_json::Map<String, Value> = values
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
        .collect();
    let doc = serde_json::json!({
        "extensions": {
            MANIFEST_SECTION: {
                FORWARDER_NAME: {
                    "assemblypath": format!("{FORWARDER_ASSEMBLY}.dll"),
                    "TypeFullName": FORWARDER_TYPE,
                    "Options": options,
                }
            }
        }
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// `jobhook forwarder-config`: the forwarder's registration for `generation`, and the warnings.
pub fn forwarder_config(
    config: &Config,
    engine_url: Option<&str>,
    generation: Generation,
) -> (String, Vec<Warning>) {
    let (values, warnings) = forwarder_values(config, engine_url);
    let wildcard = config
        .handlers
        .iter()
        .any(|h| matches!(h.job_types, JobTypes::All));
    let mut out = String::new();
    if matches!(generation, Generation::Unity | Generation::Both) {
        out.push_str(&unity_register(&values, wildcard));
    }
    if generation == Generation::Both {
        out.push('\n');
    }
    if matches!(generation, Generation::Manifest | Generation::Both) {
        out.push_str(&manifest(&values));
        out.push('\n');
    }
    (out, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        for name in [
            "Password",
            "SmtpPassword",
            "ClientSecret",
            "ApiKey",
            "API_KEY",
            "AuthHeader",
            "BearerToken",
            "pwd",
        ] {
            assert!(looks_secret(name), "{name}");
        }
        for name in [
            "SmtpServer",
            "Username",
            "EmailRecipients",
            "RetryThreshold",
            "KeyfactorUrl",
        ] {
            assert!(!looks_secret(name), "{name}");
        }
        assert_eq!(
            env_var_name("Send-Email.1", "Api Key"),
            "JOBHOOK_SEND_EMAIL_1_API_KEY"
        );
    }

    #[test]
    fn json_comments_are_stripped_outside_strings() {
        let text = "{ // note\n \"a\": \"http://x//y\", /* b\n c */ \"d\": 1 }";
        let v: Value = serde_json::from_str(&strip_json_comments(text)).unwrap();
        assert_eq!(v["a"], "http://x//y");
        assert_eq!(v["d"], 1);
        assert_eq!(strip_json_comments(text).matches('\n').count(), 2);
    }

    /// Trailing commas before `}` and `]`, as .NET's configuration reader takes them, are read;
    /// commas in strings and between values are kept; line numbers stay right.
    #[test]
    fn trailing_commas_are_read_as_dotnet_reads_them() {
        let text = "{ \"a\": [1, 2,\n ], \"b\": \"x,}\", \"c\": { \"d\": \",]\", },\n}";
        let relaxed = strip_trailing_commas(text);
        let v: Value = serde_json::from_str(&relaxed).unwrap();
        assert_eq!(v["a"], serde_json::json!([1, 2]));
        assert_eq!(v["b"], "x,}");
        assert_eq!(v["c"]["d"], ",]");
        assert_eq!(relaxed.matches('\n').count(), 2);
        assert_eq!(relaxed.chars().count(), text.chars().count());
        // A comma with nothing before it is still no JSON.
        assert!(serde_json::from_str::<Value>(&strip_trailing_commas("{ , }")).is_err());
        assert!(serde_json::from_str::<Value>(&strip_trailing_commas("[1,,]")).is_err());
    }

    /// UTF-16 with a byte-order mark (Windows PowerShell's `Out-File`) reads as the same text;
    /// UTF-16 without one is refused saying so.
    #[test]
    fn utf16_text_is_decoded() {
        let text = "<configuration>é</configuration>";
        let le: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let be: Vec<u8> = [0xFE, 0xFF]
            .into_iter()
            .chain(text.encode_utf16().flat_map(u16::to_be_bytes))
            .collect();
        assert_eq!(decode_text(le.clone()).as_deref(), Ok(text));
        assert_eq!(decode_text(be).as_deref(), Ok(text));
        let bare = le.get(2..).unwrap_or_default().to_vec();
        let e = decode_text(bare).unwrap_err();
        assert!(e.contains("looks like UTF-16"), "{e}");
        let cut = le.get(..le.len() - 1).unwrap_or_default().to_vec();
        assert!(
            decode_text(cut)
                .unwrap_err()
                .contains("odd number of bytes")
        );
        assert_eq!(decode_text(text.as_bytes().to_vec()).as_deref(), Ok(text));
    }

    /// A registration through a Unity alias of the handler type is imported like one naming
    /// the type; an alias of another type is not.
    #[test]
    fn a_registration_through_an_alias_is_imported() {
        let text = r#"<configuration><unity>
            <alias alias="JCH" type="Keyfactor.Platform.Extensions.IOrchestratorJobCompleteHandler, Keyfactor.Platform.IOrchestratorJobCompleteHandler"/>
            <alias alias="Other" type="Keyfactor.Something.IOther, Other"/>
            <container>
              <register type="JCH" mapTo="Acme.Handler, Acme" name="ViaAlias">
                <property name="JobTypes" value="49b3a17d-a6c4-4e4c-8a6b-2ad8c0c6e5a1"/>
              </register>
              <register type="Other" mapTo="Acme.Other, Acme" name="NotAHandler"/>
            </container></unity></configuration>"#;
        let found = read_web_config(text, "web.config").unwrap();
        let names: Vec<&str> = found.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ViaAlias"]);
    }

    /// A registration whose type is the handler interface, or an alias of it, in another case
    /// (which .NET and Unity do not match) is refused at its line saying what to write, not
    /// skipped as if it were another type; so is such an alias.
    #[test]
    fn a_handler_type_written_in_another_case_is_refused_at_its_line() {
        let alias = r#"<alias alias="JCH" type="Keyfactor.Platform.Extensions.IOrchestratorJobCompleteHandler, Keyfactor"/>"#;
        for (register, written, meant) in [
            (
                r#"<register type="iorchestratorjobcompletehandler" mapTo="Acme.H, Acme" name="H"/>"#,
                "iorchestratorjobcompletehandler",
                UNITY_HANDLER_TYPE,
            ),
            (
                r#"<register type="Keyfactor.Platform.Extensions.IORCHESTRATORJOBCOMPLETEHANDLER, Keyfactor" mapTo="Acme.H, Acme" name="H"/>"#,
                "Keyfactor.Platform.Extensions.IORCHESTRATORJOBCOMPLETEHANDLER",
                MANIFEST_SECTION,
            ),
            (
                r#"<register type="keyfactor.platform.extensions.IOrchestratorJobCompleteHandler" mapTo="Acme.H, Acme" name="H"/>"#,
                "keyfactor.platform.extensions.IOrchestratorJobCompleteHandler",
                MANIFEST_SECTION,
            ),
            (
                r#"<register type="jch" mapTo="Acme.H, Acme" name="H"/>"#,
                "jch",
                "JCH",
            ),
        ] {
            let text = format!(
                "<configuration><unity>\n{alias}\n<container>\n{register}\n</container></unity></configuration>"
            );
            let e = read_web_config(&text, "web.config").unwrap_err();
            assert_eq!(e.line, Some(4), "{e}");
            assert!(
                e.message.contains(&format!(
                    "type \"{written}\" differs from \"{meant}\" only in case"
                )) && e.message.contains(&format!("write it as \"{meant}\"")),
                "{e}"
            );
        }
        let text = r#"<configuration><unity>
            <alias alias="JCH" type="IOrchestratorJobCompleteHandler"/>
            <alias alias="Bad" type="Keyfactor.Platform.Extensions.IOrchestratorJobCompletehandler, Keyfactor"/>
            </unity></configuration>"#;
        let e = read_web_config(text, "web.config").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("only in case"), "{e}");
        // In another namespace, a type of that name in any case is another product's: as before.
        assert_eq!(
            handler_type("Acme.IOrchestratorJobCompleteHandler"),
            HandlerType::Is
        );
        assert_eq!(
            handler_type("Acme.iorchestratorjobcompletehandler"),
            HandlerType::Not
        );
        // Another type whose name merely resembles it is still someone else's registration.
        let text = r#"<configuration><unity><container>
            <register type="IOrchestratorJobCompleteHandlerFactory" mapTo="A, A" name="F"/>
            <register type="IOrchestratorJobCompleteHandler" mapTo="A, A" name="H"/>
            </container></unity></configuration>"#;
        let found = read_web_config(text, "web.config").unwrap();
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn names_are_made_valid_and_unique() {
        let mut taken = UniqueNames::default();
        assert_eq!(handler_name("My Handler", &mut taken), "My-Handler");
        assert_eq!(handler_name("my handler", &mut taken), "my-handler-2");
        assert_eq!(handler_name("", &mut taken), "handler");
    }

    /// A web.config within the byte limit but with more than [`MAX_XML_NODES`] (200,000) nodes
    /// is refused with the reason, not parsed into memory.
    #[test]
    fn xml_node_count_is_bounded() {
        let config = |elements: u32| {
            let mut text = String::from("<configuration>");
            text.push_str(&"<a/>".repeat(elements as usize));
            text.push_str("</configuration>");
            text
        };
        assert_eq!(MAX_XML_NODES, 200_000);
        let text = config(MAX_XML_NODES + 1);
        assert!(text.len() < MAX_IMPORT_BYTES as usize);
        let e = read_web_config(&text, "web.config").unwrap_err();
        assert!(e.message.contains("too many XML nodes"), "{e:?}");
        // Within the limit the same shape parses (and holds no registration).
        assert!(read_web_config(&config(1000), "web.config").is_ok());
    }

    /// A refused DOCTYPE is reported on its own line, wherever the declaration and comments
    /// before it put it (roxmltree itself says 1:1 for it).
    #[test]
    fn a_doctype_is_reported_on_its_line() {
        let body = "<!DOCTYPE configuration [ <!ENTITY x \"y\"> ]>\n<configuration/>\n";
        for (prolog, line) in [
            ("<?xml version=\"1.0\"?>\n", 2),
            (
                "\u{feff}<?xml version=\"1.0\"?>\n<!-- a\n b -->\n<?pi x?>\n",
                5,
            ),
            ("", 1),
        ] {
            let text = format!("{prolog}{body}");
            let e = read_web_config(&text, "web.config").unwrap_err();
            assert!(e.message.contains("DOCTYPE"), "{e}");
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
        }
        // A DOCTYPE roxmltree refuses but this scan does not see is reported without a line,
        // never at a line it is not on.
        assert_eq!(doctype_line("<!-- never closed <!DOCTYPE x>"), None);
    }

    /// Errors roxmltree gives no position for are not reported at 1:1: an input that ends too
    /// soon at its last line, a document without a root element without a line.
    #[test]
    fn xml_errors_without_a_position_are_not_put_on_line_one() {
        let e =
            read_web_config("<?xml version=\"1.0\"?>\n<configuration>\n  <a/>\n", "w").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let e = read_web_config("<?xml version=\"1.0\"?>\n<!-- only -->\n", "w").unwrap_err();
        assert_eq!(e.line, None, "{e}");
        // Errors that carry their position keep it.
        let e = read_web_config("<configuration>\n\n<a></b>\n</configuration>", "w").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn comments_cannot_break_out() {
        assert_eq!(comment_text("a\nb --> c"), "a\\nb -> c");
        assert_eq!(comment_text("a\u{202e}b\u{2028}"), "a\\u{202e}b\\u{2028}");
        assert_eq!(xml_escape("a\"<&\n"), "a&quot;&lt;&amp;&#10;");
    }

    fn registration(name: &str, properties: &[(&str, &str)]) -> Registration {
        Registration {
            name: name.to_owned(),
            dotnet_type: "Acme.Handler, Acme".to_owned(),
            line: 3,
            job_types: Some("7b6bbc1b-d802-4b09-bec9-f5c221083130".to_owned()),
            properties: properties
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// Whatever names and values a registration holds, what import prints is TOML the engine's
    /// own parser reads back to the same properties, and shows no raw control or bidi character.
    #[test]
    fn imported_keys_and_values_parse_back_with_the_engine_parser() {
        let hostile = [
            (
                "Weird\" = 1 [server]",
                "x\n[server]\nlisten = \"0.0.0.0:1\"",
            ),
            ("trailing\\", "'''\"\"\"\u{0}"),
            ("a.b", "\u{202e}reversed\u{2028}\u{85}\t"),
            ("Ünïcödé key", "é"),
            ("plain_Key-1", ""),
        ];
        let r = registration("Evil\u{202e}\nname", &hostile);
        let (text, _) = to_toml(std::slice::from_ref(&r), "web.config\u{202e}");
        assert!(
            !text.chars().any(|c| needs_escape(c) && c != '\n'),
            "{text}"
        );
        assert!(!text.contains("\"\"\""), "{text}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("handlers")).unwrap();
        std::fs::write(dir.path().join("handlers/Evil--name.wasm"), b"\0asm").unwrap();
        let config = Config::parse(&text, &dir.path().join("jobhook.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let properties = &config.handlers[0].properties;
        for (key, value) in hostile {
            assert_eq!(properties.get(key), Some(value), "{key:?}\n{text}");
        }
        assert_eq!(properties.names().len(), hostile.len());
    }

    proptest::proptest! {
        /// Every key and string import writes is one line of TOML that parses back to itself.
        #[test]
        fn keys_and_strings_round_trip(
            key in proptest::prelude::any::<String>(),
            value in proptest::prelude::any::<String>(),
        ) {
            let line = format!("{} = {}\n", toml_key(&key), toml_string(&value));
            proptest::prop_assert_eq!(line.matches('\n').count(), 1);
            proptest::prop_assert!(!line.trim_end().chars().any(needs_escape), "{}", line);
            let table: toml::Table = toml::from_str(&line).map_err(|e| {
                proptest::test_runner::TestCaseError::fail(format!("{e}: {line}"))
            })?;
            proptest::prop_assert_eq!(table.len(), 1);
            proptest::prop_assert_eq!(
                table.get(&key).and_then(toml::Value::as_str),
                Some(value.as_str())
            );
        }
    }

    /// Two handlers whose names differ only in punctuation (`svc.now`, `svc_now`), each with a
    /// secret property of the same name: each reads a variable of its own, and the operator is
    /// told which two would have shared one — one handler must never get another's secret.
    #[test]
    fn secrets_of_handlers_named_alike_get_their_own_variables() {
        let (text, warnings) = to_toml(
            &[
                registration("svc.now", &[("Password", "pw-one")]),
                registration("svc_now", &[("Password", "pw-two")]),
            ],
            "web.config",
        );
        let table: toml::Table = toml::from_str(&text).unwrap();
        let var = |i: usize| {
            table["handlers"][i]["properties"]["Password"]["env"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(var(0), "JOBHOOK_SVC_NOW_PASSWORD", "{text}");
        assert_eq!(var(1), "JOBHOOK_SVC_NOW_PASSWORD_2", "{text}");
        let told: Vec<_> = warnings
            .iter()
            .filter(|w| w.contains("would both read the environment variable"))
            .collect();
        assert_eq!(told.len(), 1, "{warnings:#?}");
        assert!(
            told[0].contains("svc.now") && told[0].contains("svc_now"),
            "{}",
            told[0]
        );
    }

    /// Two secret properties whose names differ only in case read two variables, and the
    /// operator is told.
    #[test]
    fn secrets_named_alike_get_their_own_variables() {
        let r = registration(
            "hook",
            &[("Password", "a"), ("password", "b"), ("PASS-WORD", "c")],
        );
        let (text, warnings) = to_toml(&[r], "web.config");
        let table: toml::Table = toml::from_str(&text).unwrap();
        let properties = &table["handlers"][0]["properties"];
        let var = |key: &str| properties[key]["env"].as_str().unwrap().to_owned();
        let vars: BTreeSet<String> = ["Password", "password", "PASS-WORD"]
            .iter()
            .map(|k| var(k))
            .collect();
        assert_eq!(vars.len(), 3, "{text}");
        assert_eq!(var("Password"), "JOBHOOK_HOOK_PASSWORD");
        assert_eq!(var("password"), "JOBHOOK_HOOK_PASSWORD_2");
        let told: Vec<_> = warnings
            .iter()
            .filter(|w| {
                w.contains("would both read the environment variable JOBHOOK_HOOK_PASSWORD ")
            })
            .collect();
        assert_eq!(told.len(), 1, "{warnings:#?}");
        assert!(
            told[0].contains("\"Password\" and \"password\""),
            "{}",
            told[0]
        );
    }

    /// A property name holding a control character is refused at import in either format,
    /// naming it: the engine would refuse the file written.
    #[test]
    fn property_names_the_engine_refuses_are_refused_at_import() {
        let web = format!(
            "<configuration><unity><container>\n\
             <register type=\"{UNITY_HANDLER_TYPE}\" mapTo=\"A.B, A\" name=\"Hook\">\n\
             <property name=\"Bad&#10;Name\" value=\"x\" />\n\
             </register></container></unity></configuration>"
        );
        let manifest = format!(
            "{{\n \"extensions\": {{\n  \"{MANIFEST_SECTION}\": {{\n   \"Hook\": {{ \
             \"TypeFullName\": \"A.B\", \"Options\": {{ \"Bad\\tName\": \"x\" }} }}\n  }}\n }}\n}}\n"
        );
        for (text, file) in [(web, "web.config"), (manifest, "manifest.json")] {
            let e = read_registrations(&text, file).unwrap_err();
            assert!(
                e.message
                    .contains("a property name must not hold control characters"),
                "{file}: {e:?}"
            );
            assert!(e.message.contains("\"Hook\""), "{file}: {e:?}");
        }
        // An empty name, which a manifest's Options can hold, is refused the same way.
        let empty = format!(
            "{{\n \"extensions\": {{\n  \"{MANIFEST_SECTION}\": {{\n   \"Hook\": {{ \
             \"TypeFullName\": \"A.B\", \"Options\": {{ \"\": \"x\" }} }}\n  }}\n }}\n}}\n"
        );
        let e = read_registrations(&empty, "manifest.json").unwrap_err();
        assert!(e.message.contains("a property name is empty"), "{e:?}");
    }

    /// A web.config registering handler "Hook" with these `<property>` lines, the first on line 3.
    fn hook_web_config(properties: &str) -> String {
        format!(
            "<configuration><unity><container>\n\
             <register type=\"{UNITY_HANDLER_TYPE}\" mapTo=\"A.B, A\" name=\"Hook\">\n\
             {properties}\
             </register></container></unity></configuration>"
        )
    }

    /// A registration giving `JobTypes` twice, in either format and in any case, is refused
    /// (in web.config naming it and the line of the second), instead of keeping one silently.
    #[test]
    fn job_types_given_twice_are_refused() {
        let web = hook_web_config(
            "<property name=\"JobTypes\" value=\"7B6BBC1B-0C54-4D2F-8C52-7C6A4E0D1C10\" />\n\
             <property name=\"jobtypes\" value=\"A809CE1F-1EEA-4738-A38E-15708C89C981\" />\n",
        );
        let manifest = format!(
            "{{\n \"extensions\": {{\n  \"{MANIFEST_SECTION}\": {{\n   \"Hook\": {{ \
             \"TypeFullName\": \"A.B\", \"Options\": {{ \"JobTypes\": \"*\",\n \"jobTypes\": \"*\" }} }}\n  }}\n }}\n}}\n"
        );
        let e = read_registrations(&web, "web.config").unwrap_err();
        assert!(e.message.contains("gives JobTypes twice"), "{e:?}");
        assert!(e.message.contains("\"Hook\""), "{e:?}");
        assert_eq!(e.line, Some(4), "{e:?}");
        let e = read_registrations(&manifest, "manifest.json").unwrap_err();
        assert!(e.message.contains("are the same key"), "{e:?}");
    }

    /// `JobTypes` in another case alone: refused at its line in a web.config (Unity sets
    /// properties by their exact name), read in a manifest.json (its options are bound
    /// whatever their case).
    #[test]
    fn job_types_in_another_case_is_refused_where_keyfactor_would_not_read_it() {
        let web = hook_web_config(
            "<property name=\"jobTypes\" value=\"7B6BBC1B-0C54-4D2F-8C52-7C6A4E0D1C10\" />\n",
        );
        let e = read_registrations(&web, "web.config").unwrap_err();
        assert_eq!(e.line, Some(3), "{e:?}");
        assert!(
            e.message.contains(
                "property \"jobTypes\" of registration \"Hook\" differs from \"JobTypes\" only in case"
            ) && e.message.ends_with("write it as \"JobTypes\""),
            "{e:?}"
        );
        let manifest = format!(
            "{{\"extensions\": {{\"{MANIFEST_SECTION}\": {{\"Hook\": {{ \"TypeFullName\": \"A.B\", \
             \"Options\": {{ \"jobtypes\": \"7B6BBC1B-0C54-4D2F-8C52-7C6A4E0D1C10\" }} }}}}}}}}"
        );
        let found = read_registrations(&manifest, "manifest.json").unwrap();
        assert_eq!(
            found[0].job_types.as_deref(),
            Some("7B6BBC1B-0C54-4D2F-8C52-7C6A4E0D1C10")
        );
    }

    /// A manifest saved with a UTF-8 byte-order mark (as Windows editors do) reads as the same
    /// manifest without it.
    #[test]
    fn a_manifest_with_a_byte_order_mark_reads_as_without_it() {
        let text = format!(
            "{{\n \"extensions\": {{\n  \"{MANIFEST_SECTION}\": {{\n   \"Hook\": {{ \
             \"TypeFullName\": \"A.B\", \"Options\": {{ \"JobTypes\": \"*\" }} }}\n  }}\n }}\n}}\n"
        );
        let plain = read_registrations(&text, "manifest.json").expect("without a mark");
        let marked = read_registrations(&format!("\u{feff}{text}"), "manifest.json")
            .expect("with a byte-order mark");
        assert_eq!(format!("{marked:?}"), format!("{plain:?}"));
        assert_eq!(plain.len(), 1);
        // Comments before the object, after a mark or not, are no part of it either.
        for opening in [
            "// Command 11 manifest\n",
            "/* one\n two */ ",
            "\u{feff}  // note\n/* and */\n",
        ] {
            let mut commented = read_registrations(&format!("{opening}{text}"), "manifest.json")
                .unwrap_or_else(|e| panic!("{opening:?}: {e}"));
            // The entry's line counts the comment's lines.
            for r in &mut commented {
                r.line -= opening.matches('\n').count();
            }
            assert_eq!(
                format!("{commented:?}"),
                format!("{plain:?}"),
                "{opening:?}"
            );
        }
        // Trailing commas, as .NET's configuration reader allows them, change nothing.
        let trailing = text
            .replace("\"*\" }", "\"*\", }")
            .replace("} }\n  }", "}, },\n  }");
        assert_ne!(trailing, text);
        let relaxed = read_registrations(&trailing, "manifest.json").expect("trailing commas");
        assert_eq!(format!("{relaxed:?}"), format!("{plain:?}"));
        // A comment before something else is still neither format.
        let e = read_registrations("// note\n[1]", "manifest.json").unwrap_err();
        assert!(e.message.contains("is neither a web.config"), "{e:?}");
    }

    /// A manifest that names a handler (or an option) twice is refused naming both, not read
    /// as whichever `serde_json` kept.
    #[test]
    fn manifest_keys_given_twice_are_refused_naming_both() {
        let manifest = |entries: &str| {
            format!(
                "{{\n \"extensions\": {{\n  \"{MANIFEST_SECTION}\": {{\n{entries}\n  }}\n }}\n}}\n"
            )
        };
        let first =
            "   \"Hook\": { \"TypeFullName\": \"A.B\", \"Options\": { \"JobTypes\": \"*\" } },";
        for again in ["Hook", "hook"] {
            let text = manifest(&format!(
                "{first}\n   \"{again}\": {{ \"TypeFullName\": \"A.C\" }}"
            ));
            let e = read_registrations(&text, "manifest.json").unwrap_err();
            assert_eq!(e.line, Some(5), "{e}");
            assert!(e.message.contains("\"Hook\""), "{e}");
            assert!(e.message.contains(&format!("\"{again}\"")), "{e}");
            assert!(e.message.contains("the first at line 4"), "{e}");
        }
        let text = manifest(
            "   \"Hook\": { \"TypeFullName\": \"A.B\", \"Options\": { \"Url\": \"a\", \"URL\": \"b\" } }",
        );
        let e = read_registrations(&text, "manifest.json").unwrap_err();
        assert!(e.message.contains("\"Url\" and \"URL\""), "{e}");
        assert!(e.message.contains("\"Hook\" → \"Options\""), "{e}");
        // Keys written twice elsewhere in the file are not the import's business.
        let text = format!(
            "{{ \"other\": 1, \"other\": 2, \"extensions\": {{ \"X\": {{ \"a\": 1, \"a\": 2 }}, \
             \"{MANIFEST_SECTION}\": {{ {} }} }} }}",
            first.trim_end_matches(',')
        );
        assert_eq!(read_registrations(&text, "manifest.json").unwrap().len(), 1);
    }

    #[test]
    fn engine_urls_are_checked() {
        for (bad, says) in [
            ("", "is not a URL"),
            ("not a url", "is not a URL"),
            (":99999", "is not a URL"),
            ("http://jobhook:99999/", "invalid port"),
            ("ftp://jobhook/", "http or https"),
            ("http://a:b@jobhook/", "user name or password"),
            ("https://jobhook/?a=1", "query or fragment"),
            ("file:///etc/passwd", "http or https"),
        ] {
            let e = engine_url(bad).unwrap_err();
            assert!(e.starts_with("--engine-url"), "{bad}: {e}");
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains("e.g. https://"), "{bad}: {e}");
        }
        // A user name or password is the problem named, before the scheme or the port, and
        // no message repeats it.
        for bad in [
            "http://a:hunter2@jobhook/",
            "ftp://a:hunter2@jobhook/",
            "http://a:hunter2@jobhook:99999/",
            "https://a:hunter2@jobhook/v1/job-complete",
        ] {
            let e = engine_url(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
        assert!(
            engine_url("ftp://a:hunter2@jobhook/")
                .unwrap_err()
                .contains("user name or password")
        );
        assert_eq!(
            engine_url("https://jobhook.example.com:8443/").unwrap(),
            "https://jobhook.example.com:8443"
        );
        assert_eq!(
            engine_url("http://10.0.0.5:8480/proxy").unwrap(),
            "http://10.0.0.5:8480/proxy"
        );
        let long = format!("{}:", "x".repeat(100_000));
        assert!(engine_url(&long).unwrap_err().len() < 400);
    }
}
