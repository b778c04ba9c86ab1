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

/// Smallest RSA key the TLS library signs with: ring refuses RSA keys below 2048 bits, as too
/// weak to serve.
pub const MIN_RSA_KEY_BITS: usize = 2048;

/// Largest RSA key the TLS library signs with: ring takes none above 4096 bits.
pub const MAX_RSA_KEY_BITS: usize = 4096;

/// The kinds of key the TLS library signs with, for the message about one it does not.
const USABLE_KEYS: &str = "RSA keys of 2048 to 4096 bits, ECDSA keys on the P-256 or P-384 \
     curve, and Ed25519 keys";

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
        // The PEM reader skips an encrypted key as a block it does not know ("no items found").
        if is_encrypted_key(&key_pem) {
            return Err(fail(
                "tls.key",
                &self.key,
                format!(
                    "the private key is encrypted with a passphrase, which the engine has no way \
                     to be given: write it out unencrypted (`openssl pkey -in {0} -out \
                     {0}.plain`, which asks for the passphrase), make that file readable by the \
                     engine's user only (chmod 600) and point tls.key at it",
                    self.key.get_ref().display()
                ),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            fail(
                "tls.key",
                &self.key,
                format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1) ({e})"),
            )
        })?;
        // rustls says only "failed to parse private key" of a key it cannot sign with.
        if let Some(bits) =
            rsa_key_bits(&key).filter(|b| !(MIN_RSA_KEY_BITS..=MAX_RSA_KEY_BITS).contains(b))
        {
            return Err(fail(
                "tls.key",
                &self.key,
                format!(
                    "is an RSA key of {bits} bits; the TLS library (rustls with ring) signs with \
                     RSA keys of {MIN_RSA_KEY_BITS} to {MAX_RSA_KEY_BITS} bits only: make a new \
                     key (`openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out \
                     server.key`) and a certificate for it"
                ),
            ));
        }
        if provider
            .key_provider
            .load_private_key(key.clone_key())
            .is_err()
        {
            return Err(fail(
                "tls.key",
                &self.key,
                format!(
                    "is a key the TLS library (rustls with ring) cannot sign with; it takes \
                     {USABLE_KEYS}: make a new key of one of these (`openssl genpkey -algorithm \
                     EC -pkeyopt ec_paramgen_curve:P-256 -out server.key`) and a certificate for \
                     it"
                ),
            ));
        }

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
            // X.509 numbers its versions from 0; a hostile file may hold any u32 there.
            u64::from(cert.version().0) + 1
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

/// Whether a PEM key file holds a key encrypted with a passphrase: PKCS#8's `ENCRYPTED PRIVATE
/// KEY` block, or OpenSSL's legacy form (a `Proc-Type: 4,ENCRYPTED` header in the block).
fn is_encrypted_key(pem: &[u8]) -> bool {
    const MARKS: [&[u8]; 2] = [
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
        b"Proc-Type: 4,ENCRYPTED",
    ];
    MARKS
        .iter()
        .any(|mark| pem.windows(mark.len()).any(|window| window == *mark))
}

/// The size in bits of an RSA private key's modulus — PKCS#1, or PKCS#8 holding one — read from
/// its DER; `None` for any other key, or one that cannot be read that far.
fn rsa_key_bits(key: &PrivateKeyDer<'_>) -> Option<usize> {
    use x509_parser::der_parser::parse_der;
    /// `rsaEncryption` (PKCS #1): the algorithm of a PKCS#8 RSA key.
    const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
    let pkcs1 = match key {
        PrivateKeyDer::Pkcs1(key) => key.secret_pkcs1_der(),
        // PrivateKeyInfo: version, algorithm, the PKCS#1 key in an OCTET STRING.
        PrivateKeyDer::Pkcs8(key) => {
            let (_, info) = parse_der(key.secret_pkcs8_der()).ok()?;
            let fields = info.as_sequence().ok()?;
            let algorithm = fields.get(1)?.as_sequence().ok()?;
            if algorithm.first()?.as_oid().ok()?.to_id_string() != RSA_ENCRYPTION {
                return None;
            }
            fields.get(2)?.as_slice().ok()?
        }
        _ => return None,
    };
    // RSAPrivateKey: version, modulus, ...
    let (_, rsa) = parse_der(pkcs1).ok()?;
    let modulus = rsa.as_sequence().ok()?.get(1)?.as_slice().ok()?;
    let first = modulus.iter().position(|b| *b != 0)?;
    let top = modulus.get(first)?;
    let leading = usize::try_from(top.leading_zeros()).ok()?;
    Some((modulus.len() - first - 1) * 8 + (8 - leading))
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
        // A version field of u32::MAX (any u32 parses) is named, never overflowed: the same
        // certificate with its `[0] INTEGER 2` made `[0] INTEGER 4294967295`, the two
        // enclosing SEQUENCEs' lengths (long form) grown by the four bytes added.
        let mut bytes = ending.cert_der.to_vec();
        let v3: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];
        let at = bytes
            .windows(v3.len())
            .position(|w| w == v3)
            .expect("a v3 version field");
        bytes.splice(
            at..at + v3.len(),
            [0xa0, 0x07, 0x02, 0x05, 0x00, 0xff, 0xff, 0xff, 0xff],
        );
        let mut sequence = 0;
        for _ in 0..2 {
            assert_eq!(bytes[sequence], 0x30, "a SEQUENCE");
            match bytes[sequence + 1] {
                0x81 => bytes[sequence + 2] += 4,
                0x82 => {
                    let length = u16::from_be_bytes([bytes[sequence + 2], bytes[sequence + 3]]);
                    bytes[sequence + 2..sequence + 4].copy_from_slice(&(length + 4).to_be_bytes());
                }
                other => panic!("not a long-form length: {other:#x}"),
            }
            // The certificate's SEQUENCE holds the TBS one right after its header.
            sequence += 2 + usize::from(bytes[sequence + 1] - 0x80);
        }
        let odd = rustls_pki_types::CertificateDer::from(bytes);
        let refused = check_served_certificate(&odd, now).unwrap_err();
        assert!(refused.contains("is X.509 v4294967296"), "{refused}");

        // Further from its end than the warning's days: served without a word.
        let early = now - super::CERTIFICATE_EXPIRY_WARNING - chrono::TimeDelta::days(1);
        assert_eq!(warned_at(early), "", "no warning more than 14 days before");
        assert!(
            check_served_certificate(&der, soon + chrono::TimeDelta::days(1))
                .unwrap_err()
                .contains("expired on")
        );
    }

    /// A key the TLS library cannot serve is refused saying what is wrong with it and what to
    /// do, naming tls.key: an RSA key outside the sizes ring signs with (here 1024 bits, in
    /// PKCS#8 and PKCS#1; rustls said only "failed to parse private key"), and a key encrypted
    /// with a passphrase (PKCS#8 or OpenSSL's legacy form; rustls found "no items").
    #[test]
    fn a_key_that_cannot_be_served_is_refused_saying_why_and_what_to_do() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let with_key = |key: &str| TlsConfig {
            cert: at(fixtures.join("rsa-1024-server.pem")),
            key: at(fixtures.join(key)),
            client_ca: None,
        };
        for key in ["rsa-1024-server.key", "rsa-1024-server-pkcs1.key"] {
            let e = with_key(key).validate().unwrap_err();
            assert_eq!(e.key, "tls.key", "{e}");
            assert!(
                e.message.contains("is an RSA key of 1024 bits")
                    && e.message.contains("2048 to 4096 bits")
                    && e.message.contains("openssl genpkey -algorithm RSA")
                    && e.message.contains("and a certificate for it"),
                "{key}: {e}"
            );
            assert!(!e.message.contains("failed to parse"), "{e}");
        }
        for key in ["encrypted-server.key", "encrypted-legacy-server.key"] {
            let e = with_key(key).validate().unwrap_err();
            assert_eq!(e.key, "tls.key", "{e}");
            assert!(
                e.message.contains("is encrypted with a passphrase")
                    && e.message.contains("openssl pkey -in")
                    && e.message.contains("chmod 600"),
                "{key}: {e}"
            );
            assert!(!e.message.contains("no items found"), "{e}");
        }
        // The sizes read from the key itself, past ring's largest too.
        let pkcs1 = |modulus: &[u8]| {
            let mut n = vec![0x02, 0x82];
            n.extend_from_slice(&u16::try_from(modulus.len()).unwrap().to_be_bytes());
            n.extend_from_slice(modulus);
            let mut body = vec![0x02, 0x01, 0x00];
            body.extend(n);
            let mut der = vec![0x30, 0x82];
            der.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
            der.extend(body);
            PrivateKeyDer::Pkcs1(der.into())
        };
        // DER integers: no leading zero byte unless the next has its top bit set.
        let mut big = vec![0x01];
        big.extend(vec![0u8; 512]);
        assert_eq!(rsa_key_bits(&pkcs1(&big)), Some(4097));
        let mut exact = vec![0x00, 0xff];
        exact.extend(vec![0u8; 511]);
        assert_eq!(rsa_key_bits(&pkcs1(&exact)), Some(4096));
        assert_eq!(rsa_key_bits(&pkcs1(&[])), None);
        let ec = jobhook_testkit::tls::TestCa::new("server CA").server_cert(1);
        let ec = PrivateKeyDer::from_pem_slice(ec.key_pem.as_bytes()).unwrap();
        assert_eq!(rsa_key_bits(&ec), None, "not an RSA key");
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
