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
//!   says so — in its answer (`restart_required`) and as a warning in the log — rather than
//!   keeping the old value silently.
//!
//! The secrets only a start reads are compared by SHA-256 digest; the tokens and handler
//! property secrets, which the running configuration holds anyway, by value. Changes are
//! reported by name only; no value is ever logged.

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

use crate::app::config::{Config, ServerConfig};
use crate::capabilities::keyfactor::auth::AuthConfig;
use crate::runtime::config::EngineConfig;
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
/// handler loaded again is checked against.
fn start_only_engine(engine: &EngineConfig) -> EngineConfig {
    EngineConfig {
        max_component_bytes: 0,
        compile_timeout: std::time::Duration::ZERO,
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

/// What differs between the running parts (built from `running` at start, with the secrets
/// `running_secrets`) and a new configuration that a reload cannot apply; one sentence each,
/// naming the key and what to do.
pub fn restart_required(
    running: &Config,
    running_secrets: &StartOnlySecrets,
    new: &Config,
    new_secrets: &StartOnlySecrets,
) -> Vec<String> {
    let mut notes = Vec::new();
    let mut section = |changed: bool, name: &str| {
        if changed {
            notes.push(format!(
                "[{name}] changed; it is used only from the next start: restart jobhook to \
                 apply it"
            ));
        }
    };
    section(
        start_only_server(&running.server) != start_only_server(&new.server),
        "server",
    );
    section(running.store != new.store, "store");
    section(
        start_only_engine(&running.engine) != start_only_engine(&new.engine),
        "engine",
    );
    section(running.poller != new.poller, "poller");
    section(
        running.services.keyfactor != new.services.keyfactor,
        "keyfactor",
    );
    section(running.services.mail != new.services.mail, "mail");
    section(running.services.http != new.services.http, "http");
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
        assert!(notes[0].starts_with("[engine] changed"), "{notes:?}");
        new.engine = running.engine.clone();
        new.server.max_connections = 7;
        let notes = restart_required(&running, &secrets, &new, &secrets);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("[server] changed"), "{notes:?}");
    }
}
