//! Secrets in configuration: given *by reference* (an environment variable or a file), resolved
//! when the configuration is read (at start, and again on every reload: see
//! [`crate::app::secrets`] for which of them a reload applies), and never printed.
//!
//! A configuration file is copied, diffed, pasted into tickets and checked into repositories, so
//! it must not hold a password. [`SecretRef`] is what an operator writes:
//!
//! ```toml
//! password = { env = "KEYFACTOR_PASSWORD" }
//! client_secret = { file = "/run/secrets/keyfactor-client-secret" }
//! ```
//!
//! A literal string (`password = "hunter2"`) is refused with a message saying how to write it.
//! [`SecretRef::resolve`] turns the reference into a [`Secret`], whose `Debug` prints
//! `Secret(***)` and which has no `Display`, so it cannot end up in a log line or an error
//! message by accident; the one way to read it is [`Secret::expose`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::excerpt::{MAX_QUOTED_CHARS, excerpt};

/// Largest secret file read. Passwords, tokens and client secrets are well under 1 KiB; the cap
/// stops a mistyped path (say, a log file) from being read into memory and sent as a password.
pub const MAX_SECRET_FILE_BYTES: u64 = 16 * 1024;

/// The two ways to write a secret, for messages that say how.
pub const SECRET_REF_FORMS: &str = "{ env = \"NAME\" } or { file = \"PATH\" }";

/// Where a secret comes from.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretRef {
    /// The value of an environment variable of the engine process.
    Env(String),
    /// The contents of a file (one trailing newline is removed).
    File(PathBuf),
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The reference itself is not secret; say where the value comes from.
        match self {
            SecretRef::Env(name) => write!(f, "SecretRef(env {name})"),
            SecretRef::File(path) => write!(f, "SecretRef(file {})", path.display()),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "environment variable {name}"),
            SecretRef::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// Why a secret could not be resolved. Messages name the reference, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set (or not Unicode). The name is shown cut to
    /// [`MAX_QUOTED_CHARS`] characters.
    #[error(
        "environment variable {} is not set (or is not valid Unicode); set it before starting jobhook",
        excerpt(.0, MAX_QUOTED_CHARS)
    )]
    EnvMissing(String),
    /// The file cannot be read.
    #[error("cannot read the secret file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The path names a FIFO, device, socket or directory ([`crate::files`]).
    #[error("the secret file {path} is {kind}, not a regular file; give the path of a file")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The file is bigger than [`MAX_SECRET_FILE_BYTES`].
    #[error(
        "the secret file {0} is larger than {MAX_SECRET_FILE_BYTES} bytes; is it the right file?"
    )]
    FileTooLarge(PathBuf),
    /// The file is not UTF-8.
    #[error("the secret file {0} is not valid UTF-8")]
    NotUtf8(PathBuf),
    /// The secret is empty.
    #[error("the secret from {0} is empty")]
    Empty(String),
}

impl SecretRef {
    /// Reads the secret now.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        let value = match self {
            SecretRef::Env(name) => {
                std::env::var(name).map_err(|_| SecretError::EnvMissing(name.clone()))?
            }
            SecretRef::File(path) => read_secret_file(path)?,
        };
        if value.is_empty() {
            return Err(SecretError::Empty(self.to_string()));
        }
        Ok(Secret(value))
    }
}

fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    use crate::files::ReadError;
    let bytes = crate::files::read_regular(path, MAX_SECRET_FILE_BYTES).map_err(|e| match e {
        ReadError::Io(source) => SecretError::File {
            path: path.to_owned(),
            source,
        },
        ReadError::TooLarge(_) => SecretError::FileTooLarge(path.to_owned()),
        ReadError::NotRegular(kind) => SecretError::NotRegular {
            path: path.to_owned(),
            kind,
        },
    })?;
    let mut text = String::from_utf8(bytes).map_err(|_| SecretError::NotUtf8(path.to_owned()))?;
    // A file saved as UTF-8 by a Windows editor starts with a byte-order mark, which is no part
    // of the secret (kept, it would make a password that silently never matches).
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    // Files written with `echo` or an editor end in a newline that is not part of the secret.
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RefVisitor;

        const HOW: &str =
            "a secret is given by reference: { env = \"NAME\" } or { file = \"PATH\" }";

        impl<'de> Visitor<'de> for RefVisitor {
            type Value = SecretRef;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a secret by reference, {SECRET_REF_FORMS}")
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretRef, E> {
                Err(E::custom(format!(
                    "a literal secret is not accepted in configuration; {HOW}"
                )))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretRef, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(HOW));
                };
                let value: String = map.next_value()?;
                let secret = match key.as_str() {
                    "env" if !value.is_empty() => SecretRef::Env(value),
                    "file" if !value.is_empty() => SecretRef::File(PathBuf::from(value)),
                    "env" | "file" => {
                        return Err(de::Error::custom(format!("`{key}` is empty; {HOW}")));
                    }
                    other => {
                        return Err(de::Error::custom(format!(
                            "unknown key `{}`; {HOW}",
                            excerpt(other, MAX_QUOTED_CHARS)
                        )));
                    }
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(format!(
                        "give exactly one of env or file; {HOW}"
                    )));
                }
                Ok(secret)
            }
        }

        deserializer.deserialize_any(RefVisitor)
    }
}

/// Why `token` cannot be sent as `Authorization: Bearer <token>`, with the usual mistake's fix;
/// `None` when it can. A Bearer token is one word of visible ASCII (RFC 6750's `b64token` is
/// narrower still): one with a space or a control character is split, refused or cut by what
/// reads the header, so it can never match. Never quotes the token.
pub fn bearer_token_problem(token: &str) -> Option<String> {
    if !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let prefixed = token
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("bearer "));
    Some(format!(
        "is not usable: a token must be visible ASCII characters, without spaces (it is sent as \
         `Authorization: Bearer <token>`){}",
        if prefixed {
            "; remove the `Bearer ` at its start: the token is what follows it"
        } else {
            ""
        }
    ))
}

/// A resolved secret value. Never printed: `Debug` shows `Secret(***)`, there is no `Display`
/// and no `Serialize`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from a value the program already holds (tests, values read from a prompt).
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The mode bit that lets every user read a file. Group read is not warned of: a file of mode
/// `0640` in a group the engine's user belongs to is the usual way of handing a service its
/// secret. (Others' write, [`crate::files::FOREIGN_WRITE_BITS`], lets them choose the value
/// jobhook uses — for a bearer token, who gets in.)
#[cfg(unix)]
const EVERYONE_READ_BIT: u32 = 0o004;

/// What to tell the operator when the secret file at `path` (links followed, as it is read) may
/// be read by every user or changed by someone other than the engine's user and root: by its
/// mode, by its owner (another user can change their own file, whatever its mode), or by its
/// directory (one others may write, without the sticky bit, lets them replace it). A warning,
/// not a refusal — the operator may have meant it, and the value is already where they can
/// reach it. `None` when nothing is exposed or the file cannot be looked at (reading it says
/// why).
#[cfg(unix)]
pub fn file_exposure(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode() & 0o777;
    let mut problems = Vec::new();
    if mode & EVERYONE_READ_BIT != 0 {
        problems.push(format!("its mode {mode:03o} lets every user read it"));
    }
    problems.extend(crate::files::foreign_changes(path)?);
    if problems.is_empty() {
        return None;
    }
    Some(format!(
        "the secret file {}: {}; make it the engine's user's (or root's), `chmod 600` it (or \
         640, for a group the engine's user is in), in a directory only they may write",
        path.display(),
        problems.join("; ")
    ))
}

/// See the Unix version: other systems' permissions are not modes.
#[cfg(not(unix))]
pub fn file_exposure(_path: &Path) -> Option<String> {
    None
}

/// Makes a relative secret file path relative to `base` (the configuration file's directory).
pub fn rebase(secret: &mut SecretRef, base: &Path) {
    if let SecretRef::File(path) = secret
        && path.is_relative()
    {
        *path = base.join(&*path);
    }
}

/// Resolves a secret reference, reading relative file paths against `base` (the directory of
/// the configuration file). The error names the reference, never a value.
pub fn resolve_secret(secret: &SecretRef, base: &Path) -> Result<Secret, SecretError> {
    let mut rebased = secret.clone();
    rebase(&mut rebased, base);
    rebased.resolve()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Holder {
        s: SecretRef,
    }

    #[test]
    fn references_parse_and_literals_are_refused() {
        let h: Holder = serde_json::from_str(r#"{"s": {"env": "KF_PASSWORD"}}"#).unwrap();
        assert_eq!(h.s, SecretRef::Env("KF_PASSWORD".into()));
        let h: Holder = serde_json::from_str(r#"{"s": {"file": "/run/x"}}"#).unwrap();
        assert_eq!(h.s, SecretRef::File("/run/x".into()));
        let e = serde_json::from_str::<Holder>(r#"{"s": "hunter2"}"#).unwrap_err();
        assert!(
            e.to_string().contains("literal secret is not accepted"),
            "{e}"
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(serde_json::from_str::<Holder>(r#"{"s": {"env": "A", "file": "b"}}"#).is_err());
        assert!(serde_json::from_str::<Holder>(r#"{"s": {"value": "x"}}"#).is_err());
        assert!(serde_json::from_str::<Holder>(r#"{"s": {"env": ""}}"#).is_err());
    }

    /// A secret file in a private directory below one others may write: that one could be
    /// renamed away with the private directory in it and put back with another token — warned
    /// of, naming the directory above; the same chain made private is not.
    #[cfg(unix)]
    #[test]
    fn a_secret_below_a_directory_others_may_write_is_warned_of() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let private = shared.join("private");
        std::fs::create_dir_all(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let token = private.join("token");
        std::fs::write(&token, "t").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let warned = file_exposure(&token).expect("a warning");
        assert!(
            warned.contains(&format!(
                "the directory {} above it (mode 777) lets others replace it",
                shared.display()
            )),
            "{warned}"
        );
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(file_exposure(&token), None);
    }

    /// A secret file saved by a Windows editor (UTF-8 with a byte-order mark, CRLF) resolves to
    /// the secret alone; a mark anywhere but at the start is kept.
    #[test]
    fn files_resolve_without_a_leading_byte_order_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        for (written, secret) in [
            ("\u{feff}s3cret\r\n", "s3cret"),
            ("\u{feff}s3cret", "s3cret"),
            ("s3\u{feff}cret\n", "s3\u{feff}cret"),
        ] {
            std::fs::write(&path, written).unwrap();
            let resolved = SecretRef::File(path.clone()).resolve().unwrap();
            assert_eq!(resolved.expose(), secret, "{written:?}");
        }
        // A file holding only the mark holds no secret.
        std::fs::write(&path, "\u{feff}\n").unwrap();
        assert!(matches!(
            SecretRef::File(path).resolve(),
            Err(SecretError::Empty(_))
        ));
    }

    #[test]
    fn files_resolve_without_their_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let secret = SecretRef::File(path.clone()).resolve().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(format!("{secret:?}"), "Secret(***)");

        std::fs::write(&path, "").unwrap();
        assert!(matches!(
            SecretRef::File(path.clone()).resolve(),
            Err(SecretError::Empty(_))
        ));
        std::fs::write(&path, vec![b'x'; MAX_SECRET_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            SecretRef::File(path).resolve(),
            Err(SecretError::FileTooLarge(_))
        ));
        let missing = SecretRef::Env("JOBHOOK_TEST_SURELY_UNSET_VARIABLE".into()).resolve();
        assert!(matches!(missing, Err(SecretError::EnvMissing(_))));
    }
}
