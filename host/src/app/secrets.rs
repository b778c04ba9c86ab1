//! What a reload does with secrets and with settings only a start applies.
//!
//! A reload (`SIGHUP` or `POST /v1/admin/reload`) reads the configuration file and every secret
//! it references again:
//!
//! - the bearer tokens (`[server] tokens`, `admin_tokens`) are replaced at once: a new token
//!   works and a removed one stops working for the next request;
//! - handler property secrets are part of the handler's registration, so a handler whose secret
//!   changed is loaded again with the new value;
//! - the capability services (`[keyfactor]`, `[mail]`, `[http]`), the store, the engine pool and
//!   the listener are built once, at start. A change to their settings or to a secret they use
//!   (Keyfactor credentials, the SMTP password, the store password) is not applied; the reload
//!   says so — in its answer (`restart_required`) and as a warning in the log, one note per
//!   section naming the keys that changed (`[server] listen, max_body_bytes changed; ...`) or
//!   per secret — rather than keeping the old value silently. (A handler that needs such a
//!   change refuses the whole reload: [`Config::check_handlers_against_running`].)
//!
//! The secrets only a start reads are compared by SHA-256 digest; the tokens and handler
//! property secrets, which the running configuration holds anyway, by value. The sections are
//! compared key by key in their serialized form. Changes are reported by name only; no value is
//! ever logged.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use crate::app::config::{Config, ServerConfig};
use crate::capabilities::keyfactor::auth::AuthConfig;
use crate::runtime::config::{DEFAULT_CACHE_DIR, EngineConfig};
use crate::secret::SecretRef;

/// A secret's digest, or why it cannot be read (the message names the reference, never the
/// value).
type Fingerprint = Result<Vec<u8>, String>;

/// The digests of the secrets used by the parts only a start builds, by name
/// (`keyfactor.auth`, `keyfactor.identities.<name>`, `mail.smtp.password`, `store.password`).
#[derive(Clone, PartialEq, Eq)]
pub struct StartOnlySecrets {
    digests: BTreeMap<String, Fingerprint>,
}

impl std::fmt::Debug for StartOnlySecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.digests.keys()).finish()
    }
}

impl StartOnlySecrets {
    /// Reads every such secret of `config` now.
    pub fn read(config: &Config) -> Self {
        let digests = start_only_refs(config)
            .into_iter()
            .map(|(name, secret)| {
                let fingerprint = secret
                    .resolve()
                    .map(|s| Sha256::digest(s.expose().as_bytes()).to_vec())
                    .map_err(|e| e.to_string());
                (name, fingerprint)
            })
            .collect();
        StartOnlySecrets { digests }
    }
}

/// One warning for each secret file other users may read or change
/// ([`crate::secret::file_exposure`]), naming the settings that use it: the bearer tokens, the
/// secrets the parts only a start builds, handler property secrets and `[server] tls.key`. Read
/// at `check`, at start and at every reload (a file's mode may have changed since).
pub fn exposed_secret_files(config: &Config) -> Vec<String> {
    let base = config.path.parent().unwrap_or(std::path::Path::new("."));
    let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
    for (key, list) in [
        ("server.tokens", &config.server.tokens),
        ("server.admin_tokens", &config.server.admin_tokens),
    ] {
        for secret in list {
            if let SecretRef::File(path) = secret {
                files.push((key.to_owned(), base.join(path)));
            }
        }
    }
    files.extend(
        start_only_refs(config)
            .into_iter()
            .filter_map(|(name, secret)| match secret {
                SecretRef::File(path) => Some((name, path)),
                SecretRef::Env(_) => None,
            }),
    );
    files.extend(config.property_secret_files.iter().cloned());
    if let Some(tls) = &config.server.tls {
        files.push(("server.tls.key".to_owned(), tls.key.get_ref().clone()));
    }
    // One warning per file, naming every setting that reads it.
    let mut by_file: BTreeMap<std::path::PathBuf, Vec<String>> = BTreeMap::new();
    for (name, path) in files {
        let names = by_file.entry(path).or_default();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    by_file
        .into_iter()
        .filter_map(|(path, names)| {
            crate::secret::file_exposure(&path).map(|w| format!("{}: {w}", names.join(", ")))
        })
        .collect()
}

/// One warning for each file that decides what the engine does and that someone other than
/// the engine's user and root can change ([`crate::files::trusted_file_exposure`]): the
/// configuration itself, every handler's component, `[server] tls.client_ca` (whom the API
/// admits) and `[keyfactor] ca_bundle` (whom the engine sends its Keyfactor credentials to).
/// Read at `check`, at start and at every reload, with [`exposed_secret_files`].
pub fn exposed_trusted_files(config: &Config) -> Vec<String> {
    let mut files: Vec<(String, std::path::PathBuf)> =
        vec![("the configuration file".to_owned(), config.path.clone())];
    for handler in &config.handlers {
        files.push((
            format!(
                "handler {:?}'s component",
                crate::escape::escape(&handler.name)
            ),
            handler.component.clone(),
        ));
    }
    if let Some(ca) = config
        .server
        .tls
        .as_ref()
        .and_then(|t| t.client_ca.as_ref())
    {
        files.push(("[server] tls.client_ca".to_owned(), ca.get_ref().clone()));
    }
    if let Some(ca) = config
        .services
        .keyfactor
        .as_ref()
        .and_then(|k| k.ca_bundle.as_ref())
    {
        files.push(("[keyfactor] ca_bundle".to_owned(), ca.clone()));
    }
    files
        .into_iter()
        .filter_map(|(what, path)| crate::files::trusted_file_exposure(&path, &what))
        .collect()
}

/// The secret references of the parts only a start builds. Paths are already made absolute by
/// [`Config::parse`].
fn start_only_refs(config: &Config) -> Vec<(String, SecretRef)> {
    let mut refs = Vec::new();
    if let Some(keyfactor) = &config.services.keyfactor {
        refs.push(("keyfactor.auth".to_owned(), auth_secret(&keyfactor.auth)));
        for (name, auth) in &keyfactor.identities {
            refs.push((format!("keyfactor.identities.{name}"), auth_secret(auth)));
        }
    }
    if let Some(password) = config
        .services
        .mail
        .as_ref()
        .and_then(|m| m.smtp.as_ref())
        .and_then(|s| s.password.clone())
    {
        refs.push(("mail.smtp.password".to_owned(), password));
    }
    if let Some(password) = &config.store.password {
        refs.push(("store.password".to_owned(), password.clone()));
    }
    refs
}

fn auth_secret(auth: &AuthConfig) -> SecretRef {
    match auth {
        AuthConfig::Basic { password, .. } => password.clone(),
        AuthConfig::Bearer { token } => token.clone(),
        AuthConfig::Oauth2 { client_secret, .. } => client_secret.clone(),
    }
}

/// The `[engine]` settings a reload cannot apply: everything but the load limits, which every
/// handler loaded again is checked against. A `cache_dir` that is the default one in the data
/// directory (`<data_dir>/cache`, which [`Config::parse`] fills in when the key is left out) is
/// left out too: it follows `[store] data_dir`, which is reported under `[store]`.
fn start_only_engine(engine: &EngineConfig, data_dir: &std::path::Path) -> EngineConfig {
    let default_cache = data_dir.join(DEFAULT_CACHE_DIR);
    EngineConfig {
        max_component_bytes: 0,
        compile_timeout: std::time::Duration::ZERO,
        cache_dir: engine.cache_dir.clone().filter(|dir| *dir != default_cache),
        ..engine.clone()
    }
}

/// The `[server]` settings a reload cannot apply: everything but the tokens of both kinds
/// (replaced) and the TLS material (read again).
fn start_only_server(server: &ServerConfig) -> ServerConfig {
    ServerConfig {
        tokens: Vec::new(),
        admin_tokens: Vec::new(),
        tls: None,
        ..server.clone()
    }
}

/// Most keys one note names; past them it says how many more (a section holds a few dozen
/// keys, but the names of `[keyfactor.identities]` are the operator's and many).
const MAX_KEYS_NAMED: usize = 10;

/// How a start-only section differs between the running configuration and a new one.
#[derive(Debug, PartialEq, Eq)]
enum SectionChange {
    /// The section was left out and now is there.
    Added,
    /// The section was there and now is left out.
    Removed,
    /// These keys differ, dotted below the section as the file writes them (`listen`,
    /// `identities.reader`); empty when they cannot be told apart.
    Keys(Vec<String>),
}

/// How section `new` differs from `running`, if it does: compared as their serialized forms, key
/// by key, so that each section's keys are named without a list of them written here. Only names
/// are taken from the forms, never a value.
fn section_change<T: serde::Serialize + PartialEq>(running: &T, new: &T) -> Option<SectionChange> {
    if running == new {
        return None;
    }
    let (Ok(running), Ok(new)) = (serde_json::to_value(running), serde_json::to_value(new)) else {
        return Some(SectionChange::Keys(Vec::new()));
    };
    Some(match (&running, &new) {
        (serde_json::Value::Null, _) => SectionChange::Added,
        (_, serde_json::Value::Null) => SectionChange::Removed,
        _ => {
            let mut keys = Vec::new();
            differing_keys(&running, &new, "", &mut keys);
            SectionChange::Keys(keys)
        }
    })
}

/// Adds to `keys` the dotted path (below `prefix`) of each value that differs between `a` and
/// `b`: tables are compared key by key, anything else as a whole. A key that is not a plain
/// name (the operator's own, such as an identity's) is quoted and cut short.
fn differing_keys(
    a: &serde_json::Value,
    b: &serde_json::Value,
    prefix: &str,
    keys: &mut Vec<String>,
) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for name in names {
                let shown = if !name.is_empty()
                    && name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
                {
                    name.clone()
                } else {
                    crate::excerpt::quoted(name)
                };
                let path = if prefix.is_empty() {
                    shown
                } else {
                    format!("{prefix}.{shown}")
                };
                match (a.get(name), b.get(name)) {
                    (Some(a), Some(b)) => differing_keys(a, b, &path, keys),
                    _ => keys.push(path),
                }
            }
        }
        _ if a == b => {}
        _ => keys.push(prefix.to_owned()),
    }
}

/// The note for a start-only section `[name]` that changed.
fn section_note(name: &str, change: SectionChange) -> String {
    match change {
        SectionChange::Added => format!(
            "[{name}] was added; it is used only from the next start: restart jobhook to apply it"
        ),
        SectionChange::Removed => format!(
            "[{name}] was removed; the engine goes on using it until the next start: restart \
             jobhook to apply this"
        ),
        SectionChange::Keys(keys) if keys.is_empty() => format!(
            "[{name}] changed; it is used only from the next start: restart jobhook to apply it"
        ),
        SectionChange::Keys(keys) => {
            let mut named = keys
                .iter()
                .take(MAX_KEYS_NAMED)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if keys.len() > MAX_KEYS_NAMED {
                named.push_str(&format!(" and {} more", keys.len() - MAX_KEYS_NAMED));
            }
            let (they, them) = if keys.len() == 1 {
                ("it is", "it")
            } else {
                ("they are", "them")
            };
            format!(
                "[{name}] {named} changed; {they} used only from the next start: restart \
                 jobhook to apply {them}"
            )
        }
    }
}

/// What differs between the running parts (built from `running` at start, with the secrets
/// `running_secrets`) and a new configuration that a reload cannot apply; one sentence each,
/// naming the section and its keys that changed (never a value), or the secret, and what to do.
pub fn restart_required(
    running: &Config,
    running_secrets: &StartOnlySecrets,
    new: &Config,
    new_secrets: &StartOnlySecrets,
) -> Vec<String> {
    let changes = [
        (
            "server",
            section_change(
                &start_only_server(&running.server),
                &start_only_server(&new.server),
            ),
        ),
        ("store", section_change(&running.store, &new.store)),
        (
            "engine",
            section_change(
                &start_only_engine(&running.engine, &running.store.data_dir),
                &start_only_engine(&new.engine, &new.store.data_dir),
            ),
        ),
        ("poller", section_change(&running.poller, &new.poller)),
        (
            "keyfactor",
            section_change(&running.services.keyfactor, &new.services.keyfactor),
        ),
        (
            "mail",
            section_change(&running.services.mail, &new.services.mail),
        ),
        (
            "http",
            section_change(&running.services.http, &new.services.http),
        ),
    ];
    let mut notes: Vec<String> = changes
        .into_iter()
        .filter_map(|(name, change)| change.map(|c| section_note(name, c)))
        .collect();
    let names: std::collections::BTreeSet<&String> = running_secrets
        .digests
        .keys()
        .chain(new_secrets.digests.keys())
        .collect();
    for name in names {
        match (
            running_secrets.digests.get(name),
            new_secrets.digests.get(name),
        ) {
            (_, Some(Err(e))) => notes.push(format!(
                "{name}: cannot be read now ({e}); the value read at start stays in use"
            )),
            (Some(old), Some(new)) if old != new => notes.push(format!(
                "{name}: the secret changed; it is read only at start: restart jobhook to use \
                 the new value (the old one stays in use until then)"
            )),
            // Added or removed together with its section, which is reported above.
            _ => {}
        }
    }
    notes
}

/// The names of handler property secrets whose value differs between `previous` and `new`
/// (`handlers.<name>.properties.<key>`), for handlers present in both: such handlers are loaded
/// again with the new value.
pub fn handler_secrets_changed(previous: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    for handler in &new.handlers {
        let Some(old) = previous.handlers.iter().find(|h| h.name == handler.name) else {
            continue;
        };
        for key in &handler.secret_properties {
            if old.properties.get(key) != handler.properties.get(key) {
                changed.push(format!("handlers.{}.properties.{key}", handler.name));
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, extra: &str) -> Config {
        // Reading a configuration checks only that the component file exists.
        std::fs::write(dir.join("h.wasm"), b"").unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"data\"\n\n{extra}\n\
             [[handlers]]\nname = \"h\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n\
             properties = {{ Password = {{ file = \"handler-pw\" }} }}\n"
        );
        Config::parse(&text, &dir.join("jobhook.toml")).expect("config")
    }

    const KEYFACTOR: &str = "[keyfactor]\nbase_url = \"https://kf.example.com/KeyfactorAPI\"\n\
                             auth = { kind = \"bearer\", token = { file = \"kf-token\" } }\n";

    #[test]
    fn changed_start_only_secrets_are_named_without_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kf-token"), "first-value").unwrap();
        std::fs::write(dir.path().join("handler-pw"), "pw-1").unwrap();
        let running = config(dir.path(), KEYFACTOR);
        let running_secrets = StartOnlySecrets::read(&running);

        // Nothing changed: nothing to report.
        let same = config(dir.path(), KEYFACTOR);
        assert!(
            restart_required(
                &running,
                &running_secrets,
                &same,
                &StartOnlySecrets::read(&same)
            )
            .is_empty()
        );
        assert!(handler_secrets_changed(&running, &same).is_empty());

        std::fs::write(dir.path().join("kf-token"), "second-value").unwrap();
        std::fs::write(dir.path().join("handler-pw"), "pw-2").unwrap();
        let new = config(dir.path(), KEYFACTOR);
        let notes = restart_required(
            &running,
            &running_secrets,
            &new,
            &StartOnlySecrets::read(&new),
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("keyfactor.auth: the secret changed"),
            "{notes:?}"
        );
        assert!(!notes[0].contains("value\""), "{notes:?}");
        assert!(
            !notes
                .iter()
                .any(|n| n.contains("second-value") || n.contains("first-value"))
        );
        assert_eq!(
            handler_secrets_changed(&running, &new),
            vec!["handlers.h.properties.Password".to_owned()]
        );

        std::fs::remove_file(dir.path().join("kf-token")).unwrap();
        let unreadable = StartOnlySecrets::read(&running);
        let notes = restart_required(&running, &running_secrets, &running, &unreadable);
        assert!(notes[0].contains("cannot be read now"), "{notes:?}");
    }

    #[test]
    fn start_only_sections_are_reported_but_tokens_are_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("handler-pw"), "pw").unwrap();
        std::fs::write(dir.path().join("t"), "token").unwrap();
        let running = config(dir.path(), "");
        let secrets = StartOnlySecrets::read(&running);
        let mut new = running.clone();
        new.server.tokens = vec![SecretRef::File(dir.path().join("t"))];
        new.server.admin_tokens = vec![SecretRef::File(dir.path().join("t"))];
        // The load limits apply to every handler a reload loads: nothing to restart for.
        new.engine.max_component_bytes += 1;
        new.engine.compile_timeout += std::time::Duration::from_secs(1);
        assert!(restart_required(&running, &secrets, &new, &secrets).is_empty());
        new.engine.sandbox_threads += 1;
        let notes = restart_required(&running, &secrets, &new, &secrets);
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].starts_with("[engine] sandbox_threads changed; it is used only"),
            "{notes:?}"
        );
        new.engine = running.engine.clone();
        new.server.max_connections = 7;
        let notes = restart_required(&running, &secrets, &new, &secrets);
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].starts_with("[server] max_connections changed"),
            "{notes:?}"
        );
    }

    /// Each note names the keys of its section that changed, as the file writes them, and
    /// never a value; a section added or removed is said to be so.
    #[test]
    fn start_only_notes_name_the_keys_that_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("handler-pw"), "pw").unwrap();
        std::fs::write(dir.path().join("kf-token"), "kf-value").unwrap();
        std::fs::write(dir.path().join("smtp-pw"), "smtp-value").unwrap();
        let mail = "[mail]\nfrom = \"jobhook@example.com\"\n\
                    smtp = { host = \"relay.example.com\", username = \"u\", \
                    password = { file = \"smtp-pw\" } }\n";
        let running = config(dir.path(), &format!("{KEYFACTOR}{mail}"));
        let secrets = StartOnlySecrets::read(&running);
        let notes_for = |new: &Config| restart_required(&running, &secrets, new, &secrets);

        let mut new = running.clone();
        new.server.listen = "127.0.0.1:9".parse().unwrap();
        new.server.max_body_bytes += 1;
        new.engine.sandbox_threads = 2;
        new.engine.max_concurrent_deliveries = 8;
        assert_eq!(
            notes_for(&new),
            [
                "[server] listen, max_body_bytes changed; they are used only from the next \
                 start: restart jobhook to apply them",
                "[engine] max_concurrent_deliveries, sandbox_threads changed; they are used \
                 only from the next start: restart jobhook to apply them",
            ]
        );

        // Below a section: the dotted key, the operator's names quoted when not plain.
        let new = config(
            dir.path(),
            &format!(
                "{KEYFACTOR}timeout_ms = 1234\n[keyfactor.identities]\n\"odd name\" = {{ kind = \
                 \"bearer\", token = {{ file = \"kf-token\" }} }}\n\n{}",
                mail.replace("relay.example.com", "relay2.example.com")
            ),
        );
        let notes = notes_for(&new);
        assert_eq!(
            notes,
            [
                "[keyfactor] identities, timeout_ms changed; they are used only from the next \
                 start: restart jobhook to apply them",
                "[mail] smtp.host changed; it is used only from the next start: restart \
                 jobhook to apply it",
            ]
        );
        let mut more = new.clone();
        if let Some(k) = more.services.keyfactor.as_mut() {
            let reader = k.auth.clone();
            k.identities.insert("reader".to_owned(), reader);
        }
        let notes = restart_required(&new, &secrets, &more, &secrets);
        assert_eq!(
            notes,
            [
                "[keyfactor] identities.reader changed; it is used only from the next start: \
              restart jobhook to apply it"
            ]
        );
        let mut odd = new.clone();
        if let Some(k) = odd.services.keyfactor.as_mut() {
            k.identities.clear();
            let auth = k.auth.clone();
            k.identities.insert("a\u{1b}[2J\nb".to_owned(), auth);
        }
        let notes = restart_required(&new, &secrets, &odd, &secrets);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("identities.\"a\\u{1b}[2J\\nb\"")
                && notes[0].contains("identities.\"odd name\""),
            "{notes:?}"
        );

        // A section added or removed.
        let without_mail = config(dir.path(), KEYFACTOR);
        assert_eq!(
            notes_for(&without_mail),
            [
                "[mail] was removed; the engine goes on using it until the next start: restart \
              jobhook to apply this"
            ]
        );
        assert_eq!(
            restart_required(&without_mail, &secrets, &running, &secrets),
            [
                "[mail] was added; it is used only from the next start: restart jobhook to apply \
              it"
            ]
        );

        // No value, of a secret or of any setting, is ever in a note.
        let mut moved = running.clone();
        moved.store.password = Some(SecretRef::File(dir.path().join("store-pw")));
        let notes = notes_for(&moved);
        assert_eq!(
            notes,
            [
                "[store] password changed; it is used only from the next start: restart jobhook \
              to apply it"
            ]
        );
        for note in notes_for(&new).iter().chain(&notes) {
            for value in [
                "kf-value",
                "smtp-value",
                "relay2",
                "1234",
                "store-pw",
                "kf-token",
            ] {
                assert!(!note.contains(value), "{value} in {note}");
            }
        }
    }

    /// A reload that moves only `[store] data_dir` reports `[store]` alone: the AOT cache's
    /// default place follows the data directory and is not an `[engine]` change. An explicit
    /// `cache_dir` that changes is.
    #[test]
    fn a_moved_data_dir_is_not_an_engine_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("handler-pw"), "pw").unwrap();
        let running = config(dir.path(), "");
        let secrets = StartOnlySecrets::read(&running);
        let moved = Config::parse(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"elsewhere\"\n\n\
             [[handlers]]\nname = \"h\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n\
             properties = { Password = { file = \"handler-pw\" } }\n",
            &dir.path().join("jobhook.toml"),
        )
        .expect("config");
        assert_ne!(running.engine.cache_dir, moved.engine.cache_dir);
        assert_eq!(
            restart_required(&running, &secrets, &moved, &secrets),
            [
                "[store] data_dir changed; it is used only from the next start: restart jobhook \
              to apply it"
            ]
        );
        let cached = config(dir.path(), "[engine]\ncache_dir = \"aot\"\n");
        assert_eq!(
            restart_required(&running, &secrets, &cached, &secrets),
            [
                "[engine] cache_dir changed; it is used only from the next start: restart jobhook \
              to apply it"
            ]
        );
    }
}
