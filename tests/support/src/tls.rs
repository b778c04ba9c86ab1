//! Test certificates made at test time with rcgen: a CA, server certificates for `127.0.0.1`
//! and `localhost`, and client certificates — for the engine's TLS tests and for anything else
//! (the forwarder's tests) that needs a trusted HTTPS endpoint.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertAndKey {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The PKCS#8 private key (PEM).
    pub key_pem: String,
    /// The certificate (DER), e.g. to compare with what a peer presents.
    pub cert_der: Vec<u8>,
}

/// A test certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), what clients trust.
    pub cert_pem: String,
}

impl TestCa {
    /// A new CA named `name`; panics if rcgen fails (test code).
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        }
    }

    /// A server certificate for `127.0.0.1` and `localhost` with serial number `serial`.
    pub fn server_cert(&self, serial: u64) -> CertAndKey {
        self.sign(server_params(serial))
    }

    /// A server certificate as [`server_cert`](Self::server_cert), valid from `not_before` to
    /// `not_after` (year, month, day).
    pub fn server_cert_valid(
        &self,
        serial: u64,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> CertAndKey {
        let mut params = server_params(serial);
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        self.sign(params)
    }

    /// A client certificate with common name `name`.
    pub fn client_cert(&self, name: &str) -> CertAndKey {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> CertAndKey {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        }
    }
}

/// A server certificate's parameters: for `127.0.0.1` and `localhost`, serial number `serial`.
fn server_params(serial: u64) -> CertificateParams {
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.serial_number = Some(SerialNumber::from(serial));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

/// The files [`write_test_pki`] wrote.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// `ca.pem`: trust this.
    pub ca_cert: PathBuf,
    /// `server.pem`: the server certificate (for `127.0.0.1` and `localhost`).
    pub server_cert: PathBuf,
    /// `server.key`: its private key (PKCS#8 PEM).
    pub server_key: PathBuf,
}

/// Writes a fresh test CA (`ca.pem`) and a server certificate and key for `127.0.0.1` and
/// `localhost` (`server.pem`, `server.key`) into `dir`.
pub fn write_test_pki(dir: &Path) -> std::io::Result<TestPki> {
    let ca = TestCa::new("jobhook test CA");
    let server = ca.server_cert(1);
    let pki = TestPki {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    std::fs::write(&pki.ca_cert, &ca.cert_pem)?;
    std::fs::write(&pki.server_cert, &server.cert_pem)?;
    std::fs::write(&pki.server_key, &server.key_pem)?;
    Ok(pki)
}
