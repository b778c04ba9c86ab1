//! `[server] tls` on a real `jobhook serve` process: HTTPS, client certificates, certificate
//! rotation on SIGHUP, a bad certificate refused on reload, and the refusal to start with
//! tokens or without authentication off loopback. Certificates are made at test time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jobhook_testkit::engine::EngineProcess;
use jobhook_testkit::sample_context_json;
use jobhook_testkit::tls::{CertAndKey, TestCa};

/// How long a reload may take to show on new connections.
const RELOAD_DEADLINE: Duration = Duration::from_secs(20);

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).expect("write");
    }

    fn write_server(&self, cert: &CertAndKey) {
        self.write("server.pem", &cert.cert_pem);
        self.write("server.key", &cert.key_pem);
    }

    fn config(&self, server: &str) -> PathBuf {
        let path = self.path("jobhook.toml");
        std::fs::write(
            &path,
            format!("[server]\n{server}\n\n[store]\ndata_dir = \"data\"\n"),
        )
        .expect("write config");
        path
    }

    /// `jobhook serve` over HTTPS with a certificate from `ca` and `extra` `[server]` settings:
    /// the engine and the address it listens on.
    fn start_tls(&self, ca: &TestCa, extra: &str) -> (EngineProcess, std::net::SocketAddr) {
        self.write_server(&ca.server_cert(1));
        let engine = self.start(&format!(
            "listen = \"127.0.0.1:0\"\ntls = {{ cert = \"server.pem\", key = \"server.key\" }}\n{extra}"
        ));
        let to = engine
            .url
            .trim_start_matches("https://")
            .parse()
            .expect("address");
        (engine, to)
    }

    fn start(&self, server: &str) -> EngineProcess {
        let config = self.config(server);
        EngineProcess::start(
            Path::new(env!("CARGO_BIN_EXE_jobhook")),
            &config,
            &self.path("engine.log"),
        )
    }
}

/// A fresh client (no pooled connection) trusting `ca`, optionally with a client certificate.
fn client(ca: &TestCa, identity: Option<&CertAndKey>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).expect("CA"))
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert_pem, id.key_pem);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
    }
    builder.build().expect("client")
}

/// POSTs an event; the status and the certificate the server presented.
async fn post(client: &reqwest::Client, url: &str) -> reqwest::Result<(u16, Vec<u8>)> {
    let response = client
        .post(format!("{url}/v1/job-complete"))
        .header("content-type", "application/json")
        .body(sample_context_json().to_string())
        .send()
        .await?;
    let peer = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok((response.status().as_u16(), peer))
}

#[tokio::test]
async fn https_plaintext_refused_rotation_and_bad_reload() {
    let setup = Setup::new();
    let ca = TestCa::new("jobhook test CA");
    let first = ca.server_cert(1);
    setup.write_server(&first);
    let server = "listen = \"127.0.0.1:0\"\ntls = { cert = \"server.pem\", key = \"server.key\" }";
    let engine = setup.start(server);
    assert!(engine.url.starts_with("https://"), "{}", engine.url);

    // HTTPS with the test CA: accepted, and the certificate is the one configured.
    let (status, peer) = post(&client(&ca, None), &engine.url)
        .await
        .expect("POST over TLS");
    assert_eq!(status, 202);
    assert_eq!(peer, first.cert_der);

    // Plain HTTP on the TLS port gets no answer.
    let plain = engine.url.replacen("https://", "http://", 1);
    let result = reqwest::Client::new()
        .post(format!("{plain}/v1/job-complete"))
        .body(sample_context_json().to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(result.is_err(), "plain HTTP was answered: {result:?}");

    // A client that does not trust the server's CA refuses it.
    let stranger = TestCa::new("another CA");
    assert!(post(&client(&stranger, None), &engine.url).await.is_err());

    // Rotate the files and SIGHUP: new connections get the new certificate.
    let second = ca.server_cert(2);
    setup.write_server(&second);
    engine.hangup();
    let deadline = Instant::now() + RELOAD_DEADLINE;
    loop {
        let (status, peer) = post(&client(&ca, None), &engine.url).await.expect("POST");
        assert_eq!(status, 202);
        if peer == second.cert_der {
            break;
        }
        assert_eq!(peer, first.cert_der);
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A key that does not belong to the certificate: the reload is refused with the reason,
    // and the running certificate stays.
    let third = ca.server_cert(3);
    setup.write("server.pem", &third.cert_pem);
    setup.write("server.key", &first.key_pem);
    let response = client(&ca, None)
        .post(format!("{}/v1/admin/reload", engine.url))
        .send()
        .await
        .expect("reload");
    let status = response.status().as_u16();
    let body = response.text().await.expect("body");
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("tls.key"), "{body}");
    engine.hangup();
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while !engine.log_text().contains("reload refused") {
        assert!(
            Instant::now() < deadline,
            "the SIGHUP reload was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, peer) = post(&client(&ca, None), &engine.url).await.expect("POST");
    assert_eq!(status, 202);
    assert_eq!(peer, second.cert_der, "the refused certificate is served");

    // Not a PEM file at all: refused too, naming the key.
    setup.write("server.pem", "not a certificate");
    let body = client(&ca, None)
        .post(format!("{}/v1/admin/reload", engine.url))
        .send()
        .await
        .expect("reload")
        .text()
        .await
        .expect("body");
    assert!(body.contains("tls.cert"), "{body}");
    let (_, peer) = post(&client(&ca, None), &engine.url).await.expect("POST");
    assert_eq!(peer, second.cert_der);
}

#[tokio::test]
async fn client_certificates_are_required_with_client_ca() {
    let setup = Setup::new();
    let ca = TestCa::new("jobhook test CA");
    setup.write_server(&ca.server_cert(1));
    let clients = TestCa::new("forwarder clients");
    setup.write("clients.pem", &clients.cert_pem);
    setup.write("token", "t0ken");
    let engine = setup.start(
        "listen = \"127.0.0.1:0\"\n\
         tls = { cert = \"server.pem\", key = \"server.key\", client_ca = \"clients.pem\" }\n\
         tokens = [{ file = \"token\" }]",
    );

    // No client certificate: the connection fails.
    let result = post(&client(&ca, None), &engine.url).await;
    assert!(
        result.is_err(),
        "answered without a client certificate: {result:?}"
    );
    // A certificate from another CA: fails too.
    let other = TestCa::new("not the client CA").client_cert("intruder");
    let result = post(&client(&ca, Some(&other)), &engine.url).await;
    assert!(
        result.is_err(),
        "answered a foreign client certificate: {result:?}"
    );
    // The right one, but tokens are configured too: both are required.
    let forwarder = clients.client_cert("forwarder");
    let (status, _) = post(&client(&ca, Some(&forwarder)), &engine.url)
        .await
        .expect("POST with a client certificate");
    assert_eq!(status, 401);
    let response = client(&ca, Some(&forwarder))
        .post(format!("{}/v1/job-complete", engine.url))
        .bearer_auth("t0ken")
        .header("content-type", "application/json")
        .body(sample_context_json().to_string())
        .send()
        .await
        .expect("POST with a client certificate and the token");
    assert_eq!(response.status().as_u16(), 202);
}

/// Runs `serve` on a configuration with `server` as its `[server]` section and returns its
/// stderr, once it has exited with 2 (a refused configuration). One that starts serving instead
/// is stopped after [`REFUSAL_BOUND`] and fails the test, rather than holding it forever.
fn refused(setup: &Setup, server: &str) -> String {
    let config = setup.config(server);
    let stderr_path = setup.dir.path().join("refused.stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("JOBHOOK_TEST_TLS_TOKEN", "t0ken")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("run jobhook serve");
    let deadline = std::time::Instant::now() + REFUSAL_BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).expect("read stderr");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "serve was not refused ({server}): {stderr}"
    );
    stderr
}

/// How long a refused `serve` may take to exit: it reads a configuration and exits.
const REFUSAL_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

#[test]
fn exposed_listeners_need_tls_for_tokens_and_some_authentication() {
    let setup = Setup::new();
    // Tokens in plain text on every interface: refused, saying how to fix it and where.
    let stderr = refused(
        &setup,
        "listen = \"0.0.0.0:0\"\ntokens = [{ env = \"JOBHOOK_TEST_TLS_TOKEN\" }]",
    );
    assert!(stderr.contains("jobhook.toml:3"), "{stderr}");
    assert!(stderr.contains("[server] tokens"), "{stderr}");
    assert!(stderr.contains("[server] tls"), "{stderr}");
    assert!(stderr.contains("127.0.0.1"), "{stderr}");
    assert!(stderr.contains("allow_plaintext_tokens = true"), "{stderr}");
    // Admin tokens are bearer tokens too.
    let stderr = refused(
        &setup,
        "listen = \"0.0.0.0:0\"\nadmin_tokens = [{ env = \"JOBHOOK_TEST_TLS_TOKEN\" }]",
    );
    assert!(stderr.contains("jobhook.toml:3"), "{stderr}");
    assert!(stderr.contains("[server] admin_tokens"), "{stderr}");
    assert!(stderr.contains("allow_plaintext_tokens = true"), "{stderr}");
    // But they do not guard ingest: over TLS, admin tokens alone leave posting events open.
    let ca = TestCa::new("jobhook test CA");
    setup.write_server(&ca.server_cert(2));
    let stderr = refused(
        &setup,
        "listen = \"0.0.0.0:0\"\nadmin_tokens = [{ env = \"JOBHOOK_TEST_TLS_TOKEN\" }]\n\
         tls = { cert = \"server.pem\", key = \"server.key\" }",
    );
    assert!(stderr.contains("anyone could post events"), "{stderr}");
    assert!(
        stderr.contains("admin_tokens guard only the administrator's endpoints"),
        "{stderr}"
    );

    // Nothing at all on every interface: refused.
    let stderr = refused(&setup, "listen = \"0.0.0.0:0\"");
    assert!(stderr.contains("jobhook.toml:2"), "{stderr}");
    assert!(stderr.contains("allow_unauthenticated = true"), "{stderr}");

    // A missing certificate names the key and its line.
    let stderr = refused(
        &setup,
        "listen = \"127.0.0.1:0\"\ntls = { cert = \"missing.pem\", key = \"missing.key\" }",
    );
    assert!(stderr.contains("jobhook.toml:3"), "{stderr}");
    assert!(stderr.contains("tls.cert"), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");

    // A PEM file over 1 MiB is refused whatever it holds (here a valid certificate padded with
    // comment lines), before it is parsed.
    let ca = TestCa::new("jobhook test CA");
    let mut cert = ca.server_cert(2);
    let padding = "# padding\n".repeat(1024 * 1024 / 10 + 1);
    cert.cert_pem = format!("{padding}{}", cert.cert_pem);
    setup.write_server(&cert);
    let stderr = refused(
        &setup,
        "listen = \"127.0.0.1:0\"\ntls = { cert = \"server.pem\", key = \"server.key\" }",
    );
    assert!(stderr.contains("server.pem"), "{stderr}");
    assert!(stderr.contains("is over 1048576 bytes"), "{stderr}");

    // The explicit opt-in is honoured (checked without serving).
    let config = setup.config(
        "listen = \"0.0.0.0:0\"\ntokens = [{ env = \"JOBHOOK_TEST_TLS_TOKEN\" }]\n\
         allow_plaintext_tokens = true",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["check", "--config"])
        .arg(&config)
        .env("JOBHOOK_TEST_TLS_TOKEN", "t0ken")
        .output()
        .expect("run jobhook check");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A raw TLS client trusting `ca`, from the loopback address `from`.
async fn tls_connect(
    ca: &TestCa,
    from: &str,
    to: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("CA"))
        .expect("CA");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tcp_connect(from, to).await;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(rustls_pki_types::ServerName::from(to.ip()), tcp)
        .await
}

/// The status of an event posted over TLS (trusting `ca`) from the loopback address `from`,
/// within 2 s.
async fn post_from(ca: &TestCa, url: &str, from: &str) -> u16 {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).expect("CA"))
        .local_address(from.parse::<std::net::IpAddr>().expect("address"))
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client")
        .post(format!("{url}/v1/job-complete"))
        .header("content-type", "application/json")
        .body(sample_context_json().to_string())
        .send()
        .await
        .expect("POST")
        .status()
        .as_u16()
}

async fn tcp_connect(from: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let local: std::net::IpAddr = from.parse().expect("address");
    socket
        .bind(std::net::SocketAddr::new(local, 0))
        .expect("bind");
    socket.connect(to).await.expect("connect")
}

#[tokio::test]
async fn tls_connections_get_the_header_timeout_and_the_body_limit() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let setup = Setup::new();
    let ca = TestCa::new("jobhook test CA");
    let (_engine, to) = setup.start_tls(
        &ca,
        "header_read_timeout_ms = 600\nmax_body_bytes = 4096\nmax_connections_per_client = 4",
    );

    // Headers that never end, after a completed handshake: closed after the header timeout.
    let mut slow = tls_connect(&ca, "127.0.0.1", to).await.expect("handshake");
    slow.write_all(b"POST /v1/job-complete HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_millis(2100), slow.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a TLS connection with an unfinished request head is still open: {closed:?}"
    );

    // A Content-Length over the limit: 413 naming it, over TLS.
    let mut big = tls_connect(&ca, "127.0.0.1", to).await.expect("handshake");
    big.write_all(b"POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        .await
        .expect("write");
    let mut text = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut text)).await;
    let text = String::from_utf8_lossy(&text);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(
        text.contains("larger than the limit of 4096 bytes"),
        "{text}"
    );

    drop((slow, big));
}

/// Four connections from one address that never start a handshake fill its cap: a fifth from
/// there is closed without a handshake, another address still gets in. (A header timeout long
/// enough that the four are not closed by it meanwhile: it covers the handshake.)
#[tokio::test]
async fn tls_connections_over_the_per_client_cap_are_closed_at_accept() {
    let setup = Setup::new();
    let ca = TestCa::new("jobhook test CA");
    let (engine, to) = setup.start_tls(
        &ca,
        "header_read_timeout_ms = 10000\nmax_connections_per_client = 4",
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_connect("127.0.0.1", to).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tls_connect(&ca, "127.0.0.1", to).await {
            Err(_) => break,
            // A connection that closed a moment ago may not have given its place back yet.
            Ok(_) => assert!(Instant::now() < deadline, "a fifth connection was admitted"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post_from(&ca, &engine.url, "127.0.0.2").await, 202);
    assert!(
        engine
            .log_text()
            .contains("connection refused: [server] max_connections_per_client (4) reached"),
        "{}",
        engine.log_text()
    );
    drop(held);
}

/// What the HTTPS Keyfactor API of [`keyfactor_over_https`] saw.
#[derive(Default)]
struct HttpsSeen {
    /// Request heads read after a completed handshake.
    requests: Vec<String>,
    /// Handshakes that failed.
    failed_handshakes: usize,
}

/// A Keyfactor API over HTTPS with a certificate from `ca`: answers every request with an empty
/// JSON list (no JobHistory rows) and records what it saw.
async fn keyfactor_over_https(
    ca: &TestCa,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<HttpsSeen>>,
) {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = ca.server_cert(7);
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())
        .expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![rustls_pki_types::CertificateDer::from(server.cert_der)],
        key,
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(HttpsSeen::default()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    log.lock().unwrap().failed_handshakes += 1;
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                log.lock()
                    .unwrap()
                    .requests
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// `jobhook run` of job-history-lookup against `url`, with `extra` flags: its JSON outcome.
async fn run_history_lookup(url: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "run".to_owned(),
        jobhook_testkit::guest("job-history-lookup")
            .display()
            .to_string(),
        "--context".to_owned(),
        jobhook_testkit::workspace_root()
            .join("examples/job-history-lookup/contexts/inventory.json")
            .display()
            .to_string(),
        "--keyfactor-url".to_owned(),
        url.to_owned(),
        "--json".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_jobhook"))
            .args(&args)
            .env_remove("RUST_LOG")
            .env("KEYFACTOR_USERNAME", "KFTRAIN\\svc-jobhook")
            .env("KEYFACTOR_PASSWORD", "ca-bundle-test-password")
            .output()
            .expect("run jobhook")
    })
    .await
    .expect("join");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON outcome ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// `[keyfactor] ca_bundle` (here `--keyfactor-ca-bundle`): a Keyfactor server whose certificate
/// an internal CA issued is trusted with the bundle, and refused without it — before any
/// request, so no credential is sent to a server the engine cannot authenticate.
#[tokio::test(flavor = "multi_thread")]
async fn a_keyfactor_server_of_an_internal_ca_is_trusted_only_with_its_bundle() {
    let ca = TestCa::new("jobhook internal CA");
    let (addr, seen) = keyfactor_over_https(&ca).await;
    let url = format!("https://127.0.0.1:{}/KeyfactorAPI/", addr.port());
    let setup = Setup::new();
    setup.write("internal-ca.pem", &ca.cert_pem);
    let bundle = setup.path("internal-ca.pem").display().to_string();

    let refused = run_history_lookup(&url, &[]).await;
    assert_eq!(refused["class"], "handler-failed", "{refused:#}");
    // The server task counts the failed handshake on its own time: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().failed_handshakes == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let seen = seen.lock().unwrap();
        assert!(seen.requests.is_empty(), "{:?}", seen.requests);
        assert!(seen.failed_handshakes >= 1, "no handshake was tried");
    }

    let trusted = run_history_lookup(&url, &["--keyfactor-ca-bundle", &bundle]).await;
    assert_eq!(trusted["class"], "succeeded", "{trusted:#}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.requests.len(), 1, "{:?}", seen.requests);
    let head = &seen.requests[0];
    assert!(
        head.starts_with("GET /KeyfactorAPI/OrchestratorJobs/JobHistory?"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("authorization: basic "),
        "{head}"
    );
}

/// A client that connects and never starts its TLS handshake is dropped after
/// `tls::HANDSHAKE_TIMEOUT` (10 s) however long the header timeout, and does not keep others
/// out meanwhile.
#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt as _;
    let setup = Setup::new();
    let ca = TestCa::new("jobhook test CA");
    let (engine, to) = setup.start_tls(&ca, "header_read_timeout_ms = 600000");
    let started = Instant::now();
    let mut silent = tcp_connect("127.0.0.1", to).await;
    // Another client completes its handshake and is served while the silent one waits.
    let (status, _) = post(&client(&ca, None), &engine.url).await.expect("post");
    assert_eq!(status, 202);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await;
    let waited = started.elapsed();
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the silent connection is still open after 20 s: {closed:?}"
    );
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(16),
        "dropped after {waited:?}, not after the 10 s handshake timeout"
    );
}

/// Silent connections that fill every place under the total cap, from two addresses within
/// their own caps, do not keep a client out: one of them is closed to admit it (its handshake
/// not begun). A handshake that does not complete within the header timeout is closed then, not
/// only at the 10 s handshake timeout.
#[tokio::test]
async fn silent_connections_at_the_total_cap_make_room_and_the_header_timeout_covers_the_handshake()
{
    use tokio::io::AsyncReadExt as _;
    let setup = Setup::new();
    let ca = TestCa::new("jobhook test CA");
    let (engine, to) = setup.start_tls(
        &ca,
        "header_read_timeout_ms = 3000\nmax_connections = 4\nmax_connections_per_client = 2",
    );
    let mut held = Vec::new();
    for from in ["127.0.0.3", "127.0.0.3", "127.0.0.4", "127.0.0.4"] {
        held.push(tcp_connect(from, to).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    // Well before the held connections' header timeout (3 s) could have freed a place.
    assert_eq!(post_from(&ca, &engine.url, "127.0.0.2").await, 202);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    // The held connections are closed: one to make room, the rest at the header timeout.
    for mut stream in held {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(7), stream.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0) | Err(_))),
            "a silent connection is open 7 s on (the header timeout is 3 s): {closed:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
    assert!(
        engine.log_text().contains("was closed to admit a new one"),
        "{}",
        engine.log_text()
    );
}

/// At most `tls::MAX_PENDING_HANDSHAKES` (256) handshakes are in progress at once: with 255
/// silent connections a client still completes its handshake at once; with 256 a further client
/// waits for a slot, which the silent ones free when their handshake timeout drops them.
#[tokio::test]
async fn handshakes_in_progress_are_bounded() {
    let setup = Setup::new();
    let ca = TestCa::new("jobhook test CA");
    let (_engine, to) = setup.start_tls(
        &ca,
        "max_connections = 1000\nmax_connections_per_client = 1000",
    );
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..255 {
        silent.push(tcp_connect("127.0.0.1", to).await);
    }
    let quick = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(5), tls_connect(&ca, "127.0.0.1", to))
        .await
        .expect("a handshake with a slot free completes at once")
        .expect("handshake");
    let quick = quick.elapsed();
    silent.push(tcp_connect("127.0.0.1", to).await);
    // Let the 256 hold every slot for a while, then try again: the handshake waits until the
    // silent connections are dropped (10 s after they were accepted).
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let waiting = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(20), tls_connect(&ca, "127.0.0.1", to))
        .await
        .expect("the handshake completes once slots are free")
        .expect("handshake");
    let waited = waiting.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited > quick * 2,
        "a 257th handshake did not wait for a slot: {waited:?} (with a slot free: {quick:?})"
    );
    drop((first, second, silent));
}
