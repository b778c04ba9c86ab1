//! `[server] tls`: HTTPS on the listener, optionally with client certificates (mTLS).
//!
//! ```toml
//! [server]
//! listen = "0.0.0.0:8443"
//! tls = { cert = "server.pem", key = "server.key", client_ca = "clients-ca.pem" }
//! ```
//!
//! `cert` is a PEM chain (leaf first), `key` a PEM private key (PKCS#8, PKCS#1 or SEC1),
//! `client_ca` optional PEM CA certificates: with it, a client must present a certificate signed
//! by one of them or the handshake fails. Paths are relative to the configuration file.
//!
//! The material is read and checked when the configuration is (so `jobhook check` and a reload
//! refuse a bad certificate with the reason), and again on every reload: new connections use the
//! new certificate, established ones keep theirs. The rustls stack is the one reqwest already
//! builds, with the `ring` provider.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use toml::Spanned;

/// Largest PEM file read: a chain of a few certificates is a few KiB; a CA bundle perhaps a
/// few hundred KiB.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// How long a client may take to complete the TLS handshake before the connection is dropped:
/// a slow or silent client must not hold a handshake slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further accepted connections wait for a slot (within
/// [`HANDSHAKE_TIMEOUT`]). Bounds the memory and CPU unauthenticated peers can claim.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// `[server] tls`, as written (paths rebased on the configuration file's directory by
/// [`TlsConfig::rebase`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Spanned<PathBuf>,
    /// PEM private key of the leaf certificate.
    pub key: Spanned<PathBuf>,
    /// PEM CA certificates client certificates must chain to (mTLS); none: no client
    /// certificates are asked for.
    #[serde(default)]
    pub client_ca: Option<Spanned<PathBuf>>,
}

/// A TLS setting that cannot be used: which key (`tls.cert`, `tls.key`, `tls.client_ca`), where
/// it is written (byte span in the configuration file, when known) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[server] {key}: {message}")]
pub struct TlsError {
    /// The key, e.g. `tls.cert`.
    pub key: &'static str,
    /// Where the key's value is in the configuration text.
    pub span: std::ops::Range<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl TlsConfig {
    /// Makes relative paths relative to `base` (the configuration file's directory).
    pub fn rebase(&mut self, base: &Path) {
        for path in [
            Some(&mut self.cert),
            Some(&mut self.key),
            self.client_ca.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            let joined = base.join(path.get_ref());
            *path.get_mut() = joined;
        }
    }

    /// Reads and checks the certificate, the key (and that they belong together) and the client
    /// CA: the configuration check and every reload call this.
    pub fn validate(&self) -> Result<(), TlsError> {
        self.server_config().map(drop)
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The rustls server configuration for the current files.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let fail = |key: &'static str, at: &Spanned<PathBuf>, message: String| TlsError {
            key,
            span: at.span(),
            message: format!("{}: {message}", at.get_ref().display()),
        };

        let chain = read_pem(&self.cert).map_err(|m| fail("tls.cert", &self.cert, m))?;
        let certs = CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                fail(
                    "tls.cert",
                    &self.cert,
                    format!("not a PEM certificate chain ({e})"),
                )
            })?;
        if let Some(leaf) = certs.first() {
            check_served_certificate(leaf, chrono::Utc::now())
                .map_err(|m| fail("tls.cert", &self.cert, m))?;
        }
        if certs.is_empty() {
            return Err(fail(
                "tls.cert",
                &self.cert,
                "contains no \"-----BEGIN CERTIFICATE-----\" block".into(),
            ));
        }
        let key_pem = read_pem(&self.key).map_err(|m| fail("tls.key", &self.key, m))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            fail(
                "tls.key",
                &self.key,
                format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1) ({e})"),
            )
        })?;

        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("tls.cert", &self.cert, e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let pem = read_pem(ca).map_err(|m| fail("tls.client_ca", ca, m))?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| {
                        fail("tls.client_ca", ca, format!("not PEM certificates ({e})"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        fail(
                            "tls.client_ca",
                            ca,
                            format!("not a usable CA certificate ({e})"),
                        )
                    })?;
                }
                if roots.is_empty() {
                    return Err(fail(
                        "tls.client_ca",
                        ca,
                        "contains no \"-----BEGIN CERTIFICATE-----\" block".into(),
                    ));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| fail("tls.client_ca", ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            fail(
                "tls.key",
                &self.key,
                format!("cannot be used with the certificate chain in tls.cert ({e})"),
            )
        })?;
        // The API speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A served certificate this close to its end is warned of at each start and reload: time to
/// renew it before clients (the forwarder verifies it) start refusing the engine.
pub const CERTIFICATE_EXPIRY_WARNING: chrono::TimeDelta = chrono::TimeDelta::days(14);

/// Refuses, in words, a first certificate of `tls.cert` that every client would refuse at `now`:
/// expired, not valid yet, or X.509 v1 (which rustls will not serve; its error blamed the key).
/// Warns when it ends within [`CERTIFICATE_EXPIRY_WARNING`].
fn check_served_certificate(
    leaf: &CertificateDer<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    use x509_parser::prelude::{FromDer as _, X509Certificate, X509Version};
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("the first certificate cannot be read as X.509 ({e})"))?;
    let subject = crate::escape::escape(&cert.subject().to_string()).into_owned();
    if cert.version() != X509Version::V3 {
        return Err(format!(
            "the first certificate ({subject}) is X.509 v{}, which is not served: issue an X.509 \
             v3 certificate (with a subjectAltName for the engine's host name)",
            cert.version().0 + 1
        ));
    }
    let at = |t: x509_parser::time::ASN1Time| {
        chrono::DateTime::from_timestamp(t.timestamp(), 0)
            .map_or_else(|| t.to_string(), |t| t.to_rfc3339())
    };
    let validity = cert.validity();
    if validity.not_after.timestamp() < now.timestamp() {
        return Err(format!(
            "the first certificate ({subject}) expired on {}: every client refuses it; renew it \
             (or check this machine's clock)",
            at(validity.not_after)
        ));
    }
    if validity.not_before.timestamp() > now.timestamp() {
        return Err(format!(
            "the first certificate ({subject}) is valid only from {}: clients refuse it until \
             then; check this machine's clock, or the certificate's issuer",
            at(validity.not_before)
        ));
    }
    if validity.not_after.timestamp() - now.timestamp() < CERTIFICATE_EXPIRY_WARNING.num_seconds() {
        tracing::warn!(
            "[server] tls.cert: the first certificate ({subject}) expires on {}: renew it and \
             reload before clients start refusing the engine",
            at(validity.not_after)
        );
    }
    Ok(())
}

fn read_pem(path: &Spanned<PathBuf>) -> Result<Vec<u8>, String> {
    use crate::files::ReadError;
    let mut bytes =
        crate::files::read_regular(path.get_ref(), MAX_PEM_BYTES).map_err(|e| match e {
            ReadError::Io(e) => {
                format!(
                    "cannot read it ({e}); relative paths are relative to the configuration file"
                )
            }
            ReadError::TooLarge(_) => {
                format!("is over {MAX_PEM_BYTES} bytes; PEM files that large are refused")
            }
            e @ ReadError::NotRegular(_) => e.to_string(),
        })?;
    // A Windows editor saves UTF-8 with a byte-order mark. The PEM reader looks for
    // "-----BEGIN" at the start of a line, so the first block would be skipped: the leaf of a
    // chain, or silently one CA of a bundle.
    if bytes.starts_with(UTF8_BOM) {
        bytes.drain(..UTF8_BOM.len());
    }
    Ok(bytes)
}

/// The UTF-8 byte-order mark, which is no part of a PEM file.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The TLS configuration new connections get; a reload swaps it.
#[derive(Clone)]
pub struct TlsState {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl TlsState {
    /// Starts with `config`.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        TlsState {
            current: Arc::new(RwLock::new(config)),
        }
    }

    /// New connections from now on use `config`.
    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        match self.current.write() {
            Ok(mut current) => *current = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    /// An acceptor with the current configuration, for one new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        TlsAcceptor::from(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike as _;
    use jobhook_testkit::tls::TestCa;

    fn at(path: PathBuf) -> Spanned<PathBuf> {
        Spanned::new(0..0, path)
    }

    /// A served certificate clients would refuse is refused in words naming tls.cert: expired,
    /// not valid yet, X.509 v1 (rustls's own error blamed the key); one that is valid is served,
    /// also when it ends soon (then warned of).
    #[test]
    fn a_certificate_clients_would_refuse_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("server CA");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            at(path)
        };
        let config_of = |leaf: &jobhook_testkit::tls::CertAndKey, name: &str| TlsConfig {
            cert: write(&format!("{name}.pem"), &leaf.cert_pem),
            key: write(&format!("{name}.key"), &leaf.key_pem),
            client_ca: None,
        };
        let expired = ca.server_cert_valid(2, (2020, 1, 1), (2021, 1, 1));
        let e = config_of(&expired, "expired").validate().unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(
            e.message
                .contains("expired on 2021-01-01T00:00:00+00:00: every client refuses it"),
            "{e}"
        );
        let future = ca.server_cert_valid(3, (2999, 1, 1), (3000, 1, 1));
        let e = config_of(&future, "future").validate().unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(e.message.contains("is valid only from 2999-01-01"), "{e}");
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let v1 = TlsConfig {
            cert: at(fixtures.join("x509-v1-server.pem")),
            key: at(fixtures.join("x509-v1-server.key")),
            client_ca: None,
        };
        let e = v1.validate().unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(
            e.message.contains("is X.509 v1, which is not served"),
            "{e}"
        );
        // A block that is no X.509 at all (PEM decodes any base64 between the markers).
        let garbage = TlsConfig {
            cert: write(
                "garbage.pem",
                "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
            ),
            key: write("garbage.key", &expired.key_pem),
            client_ca: None,
        };
        let e = garbage.validate().unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(
            e.message
                .contains("the first certificate cannot be read as X.509"),
            "{e}"
        );
        // Valid now, ending within the warning: served.
        let now = chrono::Utc::now();
        let soon = now + chrono::TimeDelta::days(3);
        let ending = ca.server_cert_valid(
            4,
            (2020, 1, 1),
            (soon.year(), soon.month() as u8, soon.day() as u8),
        );
        config_of(&ending, "ending").validate().expect("served");
        let der = rustls_pki_types::CertificateDer::from(ending.cert_der.clone());
        let warned_at = |at: chrono::DateTime<chrono::Utc>| {
            let captured = crate::log_capture::Captured::default();
            tracing::subscriber::with_default(captured.warnings(), || {
                assert!(check_served_certificate(&der, at).is_ok());
            });
            captured.text()
        };
        let warning = warned_at(now);
        assert!(
            warning.contains("[server] tls.cert: the first certificate (")
                && warning.contains(&format!(
                    "expires on {}T00:00:00+00:00: renew it and reload before clients start \
                     refusing the engine",
                    soon.format("%Y-%m-%d")
                )),
            "{warning}"
        );
        // Further from its end than the warning's days: served without a word.
        let early = now - super::CERTIFICATE_EXPIRY_WARNING - chrono::TimeDelta::days(1);
        assert_eq!(warned_at(early), "", "no warning more than 14 days before");
        assert!(
            check_served_certificate(&der, soon + chrono::TimeDelta::days(1))
                .unwrap_err()
                .contains("expired on")
        );
    }

    /// PEM files saved by a Windows editor (UTF-8 with a byte-order mark, CRLF) are read like
    /// any others: the leaf of the chain, the key and the first client CA are all found.
    #[test]
    fn pem_files_with_a_byte_order_mark_and_crlf_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = TestCa::new("server CA");
        let leaf = server_ca.server_cert(1);
        let (first, second) = (TestCa::new("client CA one"), TestCa::new("client CA two"));
        let windows = |text: &str| format!("\u{feff}{}", text.replace('\n', "\r\n"));
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            at(path)
        };
        let config = TlsConfig {
            cert: write(
                "chain.pem",
                windows(&format!("{}{}", leaf.cert_pem, server_ca.cert_pem)),
            ),
            key: write("key.pem", windows(&leaf.key_pem)),
            client_ca: Some(write(
                "clients.pem",
                windows(&format!("{}{}", first.cert_pem, second.cert_pem)),
            )),
        };
        config
            .validate()
            .expect("files with a byte-order mark load");
        assert_eq!(
            CertificateDer::pem_slice_iter(&read_pem(&config.cert).unwrap()).count(),
            2,
            "both certificates of the chain"
        );
        let clients = read_pem(config.client_ca.as_ref().unwrap()).unwrap();
        assert_eq!(CertificateDer::pem_slice_iter(&clients).count(), 2);
        // A mark anywhere else is left to the PEM reader.
        let inside = write("inside.pem", format!("{}\u{feff}", leaf.cert_pem));
        assert!(read_pem(&inside).unwrap().ends_with("\u{feff}".as_bytes()));
    }
}
