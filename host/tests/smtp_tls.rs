//! The mail capability's TLS to the relay, through `jobhook run --smtp ... --smtp-tls
//! starttls|implicit` as a process, against a relay on loopback that speaks STARTTLS or implicit
//! TLS with a certificate from a test CA. Which roots the engine trusts is chosen with
//! `SSL_CERT_FILE` (the system store the engine reads its roots from honours it):
//!
//! - trusting the test CA, mail goes through, over TLS, in both modes;
//! - trusting another CA, or reaching the relay under a name its certificate does not carry,
//!   the handler is refused and the relay gets no transaction;
//! - with `starttls`, a relay that does not offer STARTTLS gets no transaction either (no
//!   fallback to plain text);
//! - with `starttls`, plain text sent right after the relay's go-ahead to STARTTLS (an
//!   attacker on the path appending a reply to the relay's `220`, CVE-2011-0411's class) ends
//!   the exchange before TLS: the engine never takes it for a reply from inside TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use jobhook_testkit::tls::{CertAndKey, TestCa};
use jobhook_testkit::{guest, workspace_root};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How the test relay secures its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Plain greeting and EHLO offering STARTTLS, then TLS.
    Starttls,
    /// TLS from the first byte.
    Implicit,
    /// As [`Mode::Starttls`], but with what an attacker on the path appends to the relay's go-ahead
    /// in the same TCP segment: [`INJECTED`], plain text the client must not read as a reply
    /// from inside TLS. The relay then refuses the message at the end of its data, so a client
    /// whose replies the injection shifted by one believes it was delivered.
    StarttlsInjected,
    /// As [`Mode::Implicit`], but the greeting inside TLS is `220 ` and then `x` without end
    /// (up to [`TLS_FLOOD_BYTES`]): what the client reads of it must stay within its read limit.
    ImplicitFlood,
}

/// Most bytes [`Mode::ImplicitFlood`] writes inside TLS: far past the engine's read limit.
const TLS_FLOOD_BYTES: usize = 64 * 1024 * 1024;

/// The relay's go-ahead to STARTTLS.
const GO_AHEAD: &[u8] = b"220 2.0.0 go ahead\r\n";

/// What [`Mode::StarttlsInjected`] writes right behind [`GO_AHEAD`], in the same write: a reply
/// a client that keeps it past the TLS upgrade reads as the answer to its EHLO inside TLS.
const INJECTED: &[u8] = b"250 injected\r\n";

/// What the relay saw: TLS handshakes that succeeded, and the commands it was sent (plain text
/// and inside TLS alike).
#[derive(Debug, Default)]
struct Seen {
    handshakes: usize,
    commands: Vec<String>,
    mails: usize,
}

/// A relay on `ip` speaking `mode` with `cert`/`key`; returns its address and what it saw.
async fn tls_relay(
    ip: &str,
    mode: Mode,
    cert: &[u8],
    key_pem: &str,
) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![CertificateDer::from(cert.to_vec())], key)
    .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let store = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&store);
            tokio::spawn(async move {
                let mut plain = BufReader::new(tcp);
                let implicit = matches!(mode, Mode::Implicit | Mode::ImplicitFlood);
                if !implicit {
                    let _ = plain.get_mut().write_all(b"220 tls-relay ESMTP\r\n").await;
                    let go_ahead = if mode == Mode::StarttlsInjected {
                        [GO_AHEAD, INJECTED].concat()
                    } else {
                        GO_AHEAD.to_vec()
                    };
                    loop {
                        let Some(line) = read_line(&mut plain, &seen).await else {
                            return;
                        };
                        let reply: &[u8] = match line.to_ascii_uppercase().as_str() {
                            l if l.starts_with("EHLO") => b"250-tls-relay\r\n250 STARTTLS\r\n",
                            // One write: the go-ahead and what follows it share a segment.
                            "STARTTLS" => &go_ahead,
                            "QUIT" => return,
                            _ => b"530 5.7.0 STARTTLS first\r\n",
                        };
                        if plain.get_mut().write_all(reply).await.is_err() {
                            return;
                        }
                        if line.eq_ignore_ascii_case("STARTTLS") {
                            break;
                        }
                    }
                }
                let Ok(mut tls) = acceptor.accept(plain.into_inner()).await else {
                    return;
                };
                if let Ok(mut seen) = seen.lock() {
                    seen.handshakes += 1;
                }
                if mode == Mode::ImplicitFlood {
                    let chunk = [b'x'; 16 * 1024];
                    let mut written = 0;
                    let mut ok = tls.write_all(b"220 ").await.is_ok();
                    while ok && written < TLS_FLOOD_BYTES {
                        ok = tls.write_all(&chunk).await.is_ok();
                        written += chunk.len();
                    }
                    return;
                }
                session(
                    BufReader::new(tls),
                    implicit,
                    mode == Mode::StarttlsInjected,
                    &seen,
                )
                .await;
            });
        }
    });
    (addr, seen)
}

/// One line, recorded; `None` at the end of the stream.
async fn read_line<S: AsyncRead + Unpin>(
    reader: &mut BufReader<S>,
    seen: &Mutex<Seen>,
) -> Option<String> {
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(n) if n > 0 => {
            let line = line.trim_end().to_owned();
            if let Ok(mut seen) = seen.lock() {
                seen.commands.push(line.clone());
            }
            Some(line)
        }
        _ => None,
    }
}

/// The SMTP session inside TLS: a greeting first for implicit TLS, then EHLO, MAIL, RCPT,
/// DATA, QUIT; a message is queued, or refused at the end of its data when `refuse`.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: BufReader<S>,
    greet: bool,
    refuse: bool,
    seen: &Mutex<Seen>,
) {
    if greet
        && s.get_mut()
            .write_all(b"220 tls-relay ESMTP\r\n")
            .await
            .is_err()
    {
        return;
    }
    while let Some(line) = read_line(&mut s, seen).await {
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-tls-relay\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("MAIL FROM:") || upper.starts_with("RCPT TO:") {
            b"250 2.1.0 OK\r\n"
        } else if upper == "DATA" {
            if s.get_mut().write_all(b"354 go on\r\n").await.is_err() {
                return;
            }
            loop {
                let mut data = String::new();
                match s.read_line(&mut data).await {
                    Ok(n) if n > 0 && data.trim_end() != "." => {}
                    Ok(n) if n > 0 => break,
                    _ => return,
                }
            }
            if refuse {
                b"554 5.7.1 refused\r\n"
            } else {
                if let Ok(mut seen) = seen.lock() {
                    seen.mails += 1;
                }
                b"250 2.0.0 queued\r\n"
            }
        } else if upper == "QUIT" {
            let _ = s.get_mut().write_all(b"221 2.0.0 bye\r\n").await;
            return;
        } else {
            b"502 5.5.2 not implemented\r\n"
        };
        if s.get_mut().write_all(reply).await.is_err() {
            return;
        }
    }
}

/// `jobhook run` of the mail example through `relay` (HOST:PORT) in TLS mode `tls`, trusting the
/// certificates in `roots` only, with its warnings on stderr.
fn run_mail(relay: &str, tls: &str, roots: &Path) -> Output {
    let context = workspace_root()
        .join("examples/repeated-failure-email/contexts/failed-after-retries.json")
        .display()
        .to_string();
    Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args([
            "run",
            &guest("repeated-failure-email").display().to_string(),
            "--context",
            &context,
            "--property",
            "RetryThreshold=3",
            "--property",
            "EmailRecipients=pki-team@example.com",
            "--smtp",
            relay,
            "--smtp-tls",
            tls,
            "--mail-from",
            "jobhook-run@example.com",
        ])
        // The engine's warnings say why a relay was refused.
        .env("RUST_LOG", "warn")
        .env_remove("SSL_CERT_DIR")
        .env("SSL_CERT_FILE", roots)
        .output()
        .expect("run jobhook")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What every case starts with: a runtime, a test CA and a relay certificate it issued, and a
/// roots file (`trusted.pem` in `dir`) holding that CA only.
struct Setup {
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    server: CertAndKey,
    trusted: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new("jobhook smtp test CA");
        let server = ca.server_cert(1);
        let trusted = dir.path().join("trusted.pem");
        std::fs::write(&trusted, &ca.cert_pem).expect("write");
        Setup {
            runtime,
            dir,
            server,
            trusted,
        }
    }

    /// A [`tls_relay`] on `ip` speaking `mode` with the CA's relay certificate.
    fn relay(&self, ip: &str, mode: Mode) -> (SocketAddr, Arc<Mutex<Seen>>) {
        self.runtime.block_on(tls_relay(
            ip,
            mode,
            &self.server.cert_der,
            &self.server.key_pem,
        ))
    }
}

/// `jobhook run` failed, its output says each of `says`, and the relay saw neither a TLS
/// handshake nor a transaction.
fn assert_refused(out: &Output, seen: &Mutex<Seen>, case: &str, says: &[&str]) {
    assert_ne!(out.status.code(), Some(0), "{case}: {}", text(out));
    assert!(
        says.iter().all(|needle| text(out).contains(needle)),
        "{case}: {}",
        text(out)
    );
    assert_no_transaction(seen, case);
    assert_eq!(seen.lock().expect("seen").handshakes, 0);
}

/// The relay did not get as far as a transaction: no MAIL FROM, in plain text or inside TLS.
fn assert_no_transaction(seen: &Mutex<Seen>, case: &str) {
    let seen = seen.lock().expect("seen");
    assert_eq!(seen.mails, 0, "{case}: {seen:?}");
    assert!(
        !seen
            .commands
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("MAIL")),
        "{case}: {seen:?}"
    );
}

#[test]
fn starttls_and_implicit_tls_verify_the_relays_certificate_and_name() {
    let setup = Setup::new();
    let (runtime, trusted) = (&setup.runtime, &setup.trusted);
    let _guard = runtime.enter();
    let other = setup.dir.path().join("other.pem");
    std::fs::write(&other, TestCa::new("another CA").cert_pem).expect("write");

    for (mode, flag) in [(Mode::Starttls, "starttls"), (Mode::Implicit, "implicit")] {
        // Trusted: delivered, inside TLS.
        let (addr, seen) = setup.relay("127.0.0.1", mode);
        let out = run_mail(&addr.to_string(), flag, trusted);
        assert_eq!(out.status.code(), Some(0), "{flag} trusted: {}", text(&out));
        {
            let seen = seen.lock().expect("seen");
            assert_eq!(seen.mails, 1, "{flag} trusted: {seen:?}");
            assert_eq!(seen.handshakes, 1, "{flag} trusted: {seen:?}");
        }

        // A certificate from a CA the engine does not trust: refused before any transaction.
        let (addr, seen) = setup.relay("127.0.0.1", mode);
        let out = run_mail(&addr.to_string(), flag, &other);
        assert_refused(
            &out,
            &seen,
            &format!("{flag} untrusted"),
            &[
                "cannot connect to the mail relay",
                "not issued by a certificate authority the engine trusts",
                "[mail.smtp] has no CA setting",
                "UnknownIssuer",
            ],
        );

        // A trusted certificate, but not for the name the relay was reached by (127.0.0.2):
        // refused.
        let (addr, seen) = setup.relay("127.0.0.2", mode);
        let out = run_mail(&addr.to_string(), flag, trusted);
        assert_refused(
            &out,
            &seen,
            &format!("{flag} wrong name"),
            &[
                "not issued for the host name the engine connected to",
                "not valid for name",
            ],
        );
    }

    // `starttls` against a relay that does not offer it: no transaction in plain text.
    let plain = runtime
        .block_on(jobhook_testkit::smtp::SmtpServer::start())
        .expect("SMTP server");
    let out = run_mail(
        &format!("{}:{}", plain.host(), plain.port()),
        "starttls",
        trusted,
    );
    assert_ne!(out.status.code(), Some(0), "no STARTTLS: {}", text(&out));
    assert!(
        text(&out).contains("STARTTLS is not supported"),
        "no STARTTLS: {}",
        text(&out)
    );
    assert!(plain.received().is_empty(), "{:?}", plain.received());
}

/// An attacker on the path appends a reply to the relay's go-ahead to STARTTLS, in the same
/// TCP segment. A client that keeps that plain text past the upgrade reads it as the first
/// reply from inside TLS, and every later reply one command late — it takes the relay's `354`
/// to DATA for the verdict on the message, and reports a message the relay refused as sent.
/// The engine must close the connection before TLS instead, and say why.
#[test]
fn plain_text_after_the_starttls_go_ahead_ends_the_exchange_before_tls() {
    let setup = Setup::new();
    let (runtime, trusted) = (&setup.runtime, &setup.trusted);
    let _guard = runtime.enter();

    let (addr, seen) = setup.relay("127.0.0.1", Mode::StarttlsInjected);
    let out = run_mail(&addr.to_string(), "starttls", trusted);
    let case = format!(
        "{}\nthe relay saw {:?}",
        text(&out),
        seen.lock().expect("seen")
    );
    assert_ne!(out.status.code(), Some(0), "injected: {case}");
    assert!(
        text(&out).contains("plain text after its go-ahead to STARTTLS"),
        "injected: {case}"
    );
    // Closed before TLS: no handshake, so nothing inside TLS either.
    assert_eq!(seen.lock().expect("seen").handshakes, 0, "injected: {case}");
    assert_no_transaction(&seen, "injected");
}

/// A relay that, inside implicit TLS, greets with a reply line without end is cut off at the
/// engine's read limit — every TLS record counts against it — and the handler is told so, at
/// once and not at the timeout.
#[test]
fn a_greeting_without_end_inside_implicit_tls_is_cut_off() {
    let setup = Setup::new();
    let _guard = setup.runtime.enter();
    let (addr, seen) = setup.relay("127.0.0.1", Mode::ImplicitFlood);
    let started = std::time::Instant::now();
    let out = run_mail(&addr.to_string(), "implicit", &setup.trusted);
    let took = started.elapsed();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "more than {} bytes",
            jobhook::capabilities::mail::MAX_RELAY_READ_BYTES
        )),
        "{}",
        text(&out)
    );
    assert!(
        took < std::time::Duration::from_secs(8),
        "{took:?}: {}",
        text(&out)
    );
    assert_eq!(seen.lock().expect("seen").handshakes, 1);
    assert_no_transaction(&seen, "implicit flood");
}
