//! `jobhook serve` under hostile and careless HTTP clients, over real sockets: headers trickled a
//! byte at a time, connections that say nothing, a body that stops halfway, a flood of
//! connections from one address, and bodies far over the limit. While each of these runs, a
//! well-behaved client on another address posts events on fresh connections, and every one must
//! be accepted within [`ACCEPT_BOUND`].
//!
//! Timeouts are set small in the configuration so that the tests are short.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jobhook_testkit::engine::EngineProcess;
use jobhook_testkit::sample_context_json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// How long a valid event may take to be accepted while the server is under attack.
const ACCEPT_BOUND: Duration = Duration::from_secs(2);

/// The timeouts of the test configuration (see [`LIMITS`]).
const HEADER_TIMEOUT: Duration = Duration::from_millis(600);
const BODY_TIMEOUT: Duration = Duration::from_millis(600);
const IDLE_TIMEOUT: Duration = Duration::from_millis(900);

/// What a close may take beyond its timeout (scheduling on a loaded test machine).
const SLACK: Duration = Duration::from_millis(1500);

/// The `[server]` settings of these tests.
const LIMITS: &str = "header_read_timeout_ms = 600\nbody_read_timeout_ms = 600\n\
                      idle_timeout_ms = 900\nmax_body_bytes = 4096\n\
                      max_connections = 64\nmax_connections_per_client = 16\n";

/// The address the attacking clients use; the well-behaved one uses [`GOOD_CLIENT`].
const ATTACKER: &str = "127.0.0.1";
const GOOD_CLIENT: &str = "127.0.0.2";

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn start(&self, server: &str) -> EngineProcess {
        let path = self.dir.path().join("jobhook.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n[store]\ndata_dir = \"data\"\n"
            ),
        )
        .expect("write config");
        EngineProcess::start(
            Path::new(env!("CARGO_BIN_EXE_jobhook")),
            &path,
            &self.dir.path().join("engine.log"),
        )
    }
}

fn address(engine: &EngineProcess) -> SocketAddr {
    engine
        .url
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", engine.url))
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let local: IpAddr = from.parse().expect("address");
    socket.bind(SocketAddr::new(local, 0)).expect("bind");
    socket.connect(to).await.expect("connect")
}

/// Waits until the server closes `stream` (EOF or reset); how long that took, or `None` after
/// `bound`. Whatever arrives before the close is returned too.
async fn closed_within(
    stream: &mut (impl AsyncRead + Unpin),
    bound: Duration,
) -> Option<(Duration, String)> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(bound, read).await.ok()?;
    Some((start.elapsed(), String::from_utf8_lossy(&seen).into_owned()))
}

/// A connection from `from` that has sent the head of an event POST with a chunked body, and
/// none of the body yet.
async fn chunked_post_from(from: &str, to: SocketAddr) -> TcpStream {
    let mut stream = connect_from(from, to).await;
    stream
        .write_all(
            b"POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .expect("write");
    stream
}

/// Reads until EOF: the whole answer, and whether the connection ended cleanly (EOF, not a
/// reset). Panics after `bound`.
async fn answer(stream: &mut TcpStream, bound: Duration) -> (String, bool) {
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return true,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(_) => return false,
            }
        }
    };
    let clean = tokio::time::timeout(bound, read)
        .await
        .unwrap_or_else(|_| panic!("no complete answer within {bound:?}"));
    (String::from_utf8_lossy(&seen).into_owned(), clean)
}

/// A well-behaved client on [`GOOD_CLIENT`]: posts an event on a fresh connection every 50 ms
/// until stopped.
struct Steady {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Steady {
    fn start(engine: &EngineProcess) -> Steady {
        let client = reqwest::Client::builder()
            .local_address(GOOD_CLIENT.parse::<IpAddr>().expect("address"))
            .pool_max_idle_per_host(0)
            .timeout(ACCEPT_BOUND)
            .build()
            .expect("client");
        let url = format!("{}/v1/job-complete", engine.url);
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut accepted = 0;
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let result = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(sample_context_json().to_string())
                        .send()
                        .await;
                    let took = start.elapsed();
                    match result {
                        Ok(r) if r.status() == 202 && took <= ACCEPT_BOUND => accepted += 1,
                        Ok(r) => failures.push(format!("{} after {took:?}", r.status())),
                        Err(e) => failures.push(format!("{e} after {took:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (accepted, failures)
            }
        });
        Steady { stop, task }
    }

    /// Stops, and checks that every event was accepted in time.
    async fn finish(self, engine: &EngineProcess) {
        // Long enough for a few events even when the attack was over quickly.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stop.store(true, Ordering::Relaxed);
        let (accepted, failures) = self.task.await.expect("steady client");
        assert!(
            failures.is_empty(),
            "valid events were not accepted within {ACCEPT_BOUND:?}: {failures:?}\n{}",
            engine.log_text()
        );
        assert!(accepted >= 3, "only {accepted} events were posted");
    }
}

async fn metrics(engine: &EngineProcess) -> String {
    reqwest::Client::builder()
        .local_address(GOOD_CLIENT.parse::<IpAddr>().expect("address"))
        .build()
        .expect("client")
        .get(format!("{}/metrics", engine.url))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

#[tokio::test]
async fn trickled_headers_are_cut_off_after_the_header_timeout() {
    let setup = Setup::new();
    let engine = setup.start(LIMITS);
    let to = address(&engine);
    let steady = Steady::start(&engine);
    let mut attackers = Vec::new();
    for _ in 0..8 {
        let stream = connect_from(ATTACKER, to).await;
        let (mut read, mut write) = stream.into_split();
        // One byte every 100 ms: a request head that never ends.
        let writer = tokio::spawn(async move {
            let head = b"POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            for byte in head.iter().chain(std::iter::repeat(&b'a')) {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        attackers.push(tokio::spawn(async move {
            let closed = closed_within(&mut read, HEADER_TIMEOUT + SLACK).await;
            writer.abort();
            closed
        }));
    }
    for attacker in attackers {
        let closed = attacker.await.expect("attacker");
        let (after, _) = closed.unwrap_or_else(|| {
            panic!(
                "a connection trickling its headers was still open after {:?}\n{}",
                HEADER_TIMEOUT + SLACK,
                engine.log_text()
            )
        });
        assert!(after >= HEADER_TIMEOUT / 2, "closed too early: {after:?}");
    }
    steady.finish(&engine).await;
    let metrics = metrics(&engine).await;
    assert!(
        metrics.contains("jobhook_connections_timed_out_total{phase=\"header\"} 8"),
        "{metrics}"
    );
    assert!(
        engine
            .log_text()
            .contains("no complete request head within"),
        "{}",
        engine.log_text()
    );
}

#[tokio::test]
async fn silent_and_idle_kept_alive_connections_are_closed() {
    let setup = Setup::new();
    let engine = setup.start(LIMITS);
    let to = address(&engine);
    let steady = Steady::start(&engine);

    // Connections that never send a byte are closed after the header timeout.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(connect_from(ATTACKER, to).await);
    }
    // A connection that sends one request, reads the answer and then keeps quiet is closed
    // after the idle timeout (not the shorter header timeout).
    let mut kept = connect_from(ATTACKER, to).await;
    let body = sample_context_json().to_string();
    kept.write_all(
        format!(
            "POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).await.expect("answer");
    assert_eq!(&first, b"HTTP/1.1 202");
    let idle_since = Instant::now();

    for mut stream in silent {
        let closed = closed_within(&mut stream, HEADER_TIMEOUT + SLACK).await;
        assert!(
            closed.is_some(),
            "a silent connection was still open after {:?}\n{}",
            HEADER_TIMEOUT + SLACK,
            engine.log_text()
        );
    }
    let closed = closed_within(&mut kept, IDLE_TIMEOUT + SLACK).await;
    assert!(
        closed.is_some(),
        "an idle kept-alive connection was still open after {:?}",
        IDLE_TIMEOUT + SLACK
    );
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= IDLE_TIMEOUT - Duration::from_millis(100),
        "the kept-alive connection was closed after {idle_for:?}, before the idle timeout"
    );
    steady.finish(&engine).await;
    let metrics = metrics(&engine).await;
    assert!(
        metrics.contains("jobhook_connections_timed_out_total{phase=\"idle\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_body_that_stops_halfway_gets_408_and_the_connection_is_closed() {
    let setup = Setup::new();
    let engine = setup.start(LIMITS);
    let to = address(&engine);
    let steady = Steady::start(&engine);
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut stream = connect_from(ATTACKER, to).await;
        stream
            .write_all(
                b"POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 1000\r\n\r\n{\"AgentId\": \"",
            )
            .await
            .expect("write");
        streams.push(stream);
    }
    for mut stream in streams {
        let (text, clean) = answer(&mut stream, BODY_TIMEOUT + SLACK).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("body_read_timeout_ms"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        assert!(clean, "the connection was reset instead of closed: {text}");
    }
    steady.finish(&engine).await;
    let metrics = metrics(&engine).await;
    assert!(
        metrics.contains("jobhook_connections_timed_out_total{phase=\"body\"} 8"),
        "{metrics}"
    );
}

/// A chunked body whose framing breaks part way (a proxy or a link that damaged it): 400 with
/// `"resend": true`, so a sender does not set the event aside as refused, and the connection is
/// closed. Nothing was accepted, so nothing is committed.
#[tokio::test]
async fn a_body_whose_framing_breaks_gets_400_marked_for_resending() {
    use jobhook::sources::api::RESEND_MEMBER;
    let setup = Setup::new();
    let engine = setup.start(LIMITS);
    let to = address(&engine);
    let broken: [&[u8]; 3] = [
        // A chunk size that is not hexadecimal.
        b"10\r\n{\"AgentId\": \"a\",\r\nzz\r\n",
        // A chunk longer than its size says, so its end is not where the framing needs it.
        b"4\r\n{\"Ag\r\nentId\": 1}\r\n0\r\n\r\n",
        // A chunk size line that never ends in CRLF.
        b"5\nxxxxx\r\n",
    ];
    for body in broken {
        let mut stream = chunked_post_from(ATTACKER, to).await;
        stream.write_all(body).await.expect("write");
        let (text, _) = answer(&mut stream, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        let json = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(json).expect("a JSON body");
        assert_eq!(json[RESEND_MEMBER], serde_json::Value::Bool(true), "{text}");
        let reason = json["error"].as_str().unwrap_or_default();
        assert!(reason.contains("could not be read"), "{text}");
    }
    let metrics = metrics(&engine).await;
    assert!(
        metrics.contains("jobhook_events_rejected_total 3"),
        "{metrics}"
    );
    assert_eq!(
        jobhook_testkit::metric_value(&metrics, "jobhook_events_accepted_total{source=\"api\"}"),
        Some(0.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_flood_from_one_address_is_refused_beyond_its_cap_and_others_still_get_in() {
    let setup = Setup::new();
    // Long timeouts: the held connections must stay open while the flood arrives.
    let engine = setup.start(
        "header_read_timeout_ms = 10000\nmax_connections = 64\nmax_connections_per_client = 8\n",
    );
    let to = address(&engine);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(ATTACKER, to).await);
    }
    let steady = Steady::start(&engine);
    let mut refused = 0;
    for _ in 0..40 {
        let mut stream = connect_from(ATTACKER, to).await;
        let _ = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let (text, _) = answer(&mut stream, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("max_connections_per_client (8)"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        refused += 1;
    }
    // A refused client still sending a large request, as a forwarder does: the server keeps
    // reading (and discarding) while it sends, so none of its writes meets a reset, and then the
    // 503 reaches it and the connection ends cleanly.
    let mut stream = connect_from(ATTACKER, to).await;
    const CHUNK: usize = 16 * 1024;
    const CHUNKS: usize = 30;
    let head = format!(
        "POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        CHUNK * CHUNKS
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    for n in 0..CHUNKS {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Err(e) = stream.write_all(&[b'x'; CHUNK]).await {
            panic!("the refused connection was reset while the client sent chunk {n}: {e}");
        }
    }
    let (text, clean) = answer(&mut stream, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        clean,
        "the refused connection was reset instead of closed: {text}"
    );
    refused += 1;
    // The held connections still work: they were admitted.
    let first = held.first_mut().expect("held");
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let (text, _) = answer(first, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    steady.finish(&engine).await;
    let metrics = metrics(&engine).await;
    assert!(
        metrics.contains(&format!(
            "jobhook_connections_refused_total{{reason=\"max_connections_per_client\"}} {refused}"
        )),
        "{metrics}"
    );
    assert!(
        engine
            .log_text()
            .contains("connection refused: [server] max_connections_per_client (8) reached"),
        "{}",
        engine.log_text()
    );
}

/// Every place taken by a connection with a request under way (a body that has not come yet):
/// nothing can be closed to make room, so the next connection is refused.
#[tokio::test]
async fn connections_over_the_total_cap_are_refused_with_503() {
    let setup = Setup::new();
    let engine = setup.start(
        "header_read_timeout_ms = 10000\nbody_read_timeout_ms = 10000\nmax_connections = 6\n\
         max_connections_per_client = 6\n",
    );
    let to = address(&engine);
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut stream = connect_from(ATTACKER, to).await;
        stream
            .write_all(
                b"POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 100\r\n\r\n",
            )
            .await
            .expect("head");
        held.push(stream);
    }
    // Each head reaches the engine before the next connection comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut other = connect_from(GOOD_CLIENT, to).await;
    let _ = other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (text, _) = answer(&mut other, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("[server] max_connections (6)"), "{text}");
    // A place frees up when a connection closes.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = connect_from(GOOD_CLIENT, to).await;
        let _ = again
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let (text, _) = answer(&mut again, Duration::from_secs(5)).await;
        if text.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "no place freed: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A few addresses that open connections up to their own cap, send nothing and open them again
/// as soon as they are closed would take every place under the total cap and keep forwarders
/// out for good. At the total cap a connection without a request under way, of the address
/// holding the most, is closed to admit a new one: a forwarder's events still get in, and the
/// log names the address that held the places.
#[tokio::test]
async fn silent_connections_at_the_total_cap_make_room_for_a_forwarder() {
    const HOLDERS: [&str; 4] = ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"];
    let setup = Setup::new();
    let engine = setup.start(
        "header_read_timeout_ms = 10000\nidle_timeout_ms = 10000\nmax_connections = 8\n\
         max_connections_per_client = 2\n",
    );
    let to = address(&engine);
    let stop = Arc::new(AtomicBool::new(false));
    let mut holders = Vec::new();
    for from in HOLDERS {
        let stop = Arc::clone(&stop);
        holders.push(tokio::spawn(async move {
            // Two silent connections, each opened again as soon as the server closes it.
            let mut opened = 0usize;
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Still open: nothing to read yet (the server sends a silent client nothing).
                held.retain(|stream| {
                    let mut probe = [0u8; 1];
                    matches!(
                        stream.try_read(&mut probe),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                    )
                });
                while held.len() < 2 {
                    held.push(connect_from(from, to).await);
                    opened += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            opened
        }));
    }
    // The holders fill every place before the forwarder comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let steady = Steady::start(&engine);
    tokio::time::sleep(Duration::from_secs(2)).await;
    steady.finish(&engine).await;
    stop.store(true, Ordering::Relaxed);
    let mut reopened = 0;
    for holder in holders {
        reopened += holder.await.expect("holder");
    }
    assert!(
        reopened > 8,
        "the holders never had to open again ({reopened})"
    );
    let metrics = metrics(&engine).await;
    let evicted = jobhook_testkit::metric_value(&metrics, "jobhook_connections_evicted_total");
    assert!(evicted.is_some_and(|n| n >= 3.0), "{metrics}");
    let log = engine.log_text();
    assert!(
        log.contains("was closed to admit a new one")
            && HOLDERS
                .iter()
                .any(|holder| log.contains(&format!("holder={holder}"))),
        "{log}"
    );
}

/// A client that shuts its sending side once its request is out (`nc -N`, `socat`) gets its
/// answer, and every event answered 202 is counted as accepted: the request is not dropped
/// at the end of the client's input, committed or not.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let setup = Setup::new();
    let engine = setup.start(LIMITS);
    let to = address(&engine);
    let body = sample_context_json().to_string();
    let request = format!(
        "POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    const REQUESTS: usize = 10;
    for _ in 0..REQUESTS {
        let mut stream = connect_from(GOOD_CLIENT, to).await;
        stream.write_all(request.as_bytes()).await.expect("request");
        stream.shutdown().await.expect("half-close");
        let (text, _) = answer(&mut stream, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 202"), "{text:?}");
    }
    let metrics = metrics(&engine).await;
    assert_eq!(
        jobhook_testkit::metric_value(&metrics, "jobhook_events_accepted_total{source=\"api\"}"),
        Some(REQUESTS as f64),
        "{metrics}"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_naming_the_limit_before_they_are_read() {
    let setup = Setup::new();
    let engine = setup.start(LIMITS);
    let to = address(&engine);
    let steady = Steady::start(&engine);

    // A 10 MB Content-Length: the client sends the head and a little of the body and then waits
    // for an early answer, as HTTP clients do; the answer comes before the body is read.
    for _ in 0..4 {
        let mut stream = connect_from(ATTACKER, to).await;
        stream
            .write_all(
                b"POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 10000000\r\n\r\n",
            )
            .await
            .expect("write");
        stream.write_all(&[b' '; 2048]).await.expect("write");
        let (text, clean) = answer(&mut stream, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(
            text.contains("larger than the limit of 4096 bytes"),
            "{text}"
        );
        assert!(text.contains("max_body_bytes"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        assert!(clean, "the connection was reset instead of closed: {text}");
    }

    // A client that sends all 10 MB without looking reads the 413 too.
    let (status, writer) = sending_without_looking(to, 10_000_000).await;
    assert_eq!(&status, b"HTTP/1.1 413");
    writer.abort();

    // A chunked body that grows past the limit: 413 as soon as it does, then a clean close.
    for _ in 0..4 {
        let mut stream = chunked_post_from(ATTACKER, to).await;
        for _ in 0..6 {
            let mut chunk = b"400\r\n".to_vec();
            chunk.extend_from_slice(&[b' '; 0x400]);
            chunk.extend_from_slice(b"\r\n");
            stream.write_all(&chunk).await.expect("write");
        }
        let (text, clean) = answer(&mut stream, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(
            text.contains("larger than the limit of 4096 bytes"),
            "{text}"
        );
        assert!(clean, "the connection was reset instead of closed: {text}");
    }
    steady.finish(&engine).await;
    let metrics = metrics(&engine).await;
    assert!(
        metrics.contains("jobhook_request_bodies_too_large_total 9"),
        "{metrics}"
    );
}

/// A client that posts a body of `total` bytes and sends all of it without waiting for an
/// answer: the first 12 bytes of the answer (read within 5 s), and the sender, which gives how
/// many body bytes it wrote before the connection was closed on it.
async fn sending_without_looking(
    to: SocketAddr,
    total: usize,
) -> ([u8; 12], tokio::task::JoinHandle<usize>) {
    let stream = connect_from(ATTACKER, to).await;
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head =
            format!("POST /v1/job-complete HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n");
        let mut written = 0usize;
        if write.write_all(head.as_bytes()).await.is_err() {
            return written;
        }
        let chunk = vec![b' '; 64 * 1024];
        while written < total {
            if write.write_all(&chunk).await.is_err() {
                break;
            }
            written += chunk.len();
        }
        written
    });
    let mut status = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), read.read_exact(&mut status))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    (status, writer)
}

/// After a 413 the engine reads and discards what the client still sends for at most 2 s and
/// 1 MiB (`connections::LINGER_TIMEOUT`, `LINGER_MAX_BYTES`), then closes: a client that keeps
/// sending a 64 MB body is cut off long before the end, within seconds, and the engine does not
/// read an unbounded body to be polite.
#[tokio::test]
async fn lingering_after_a_413_is_bounded() {
    let setup = Setup::new();
    let engine = setup.start(LIMITS);
    let to = address(&engine);
    const TOTAL: usize = 64 * 1024 * 1024;
    let started = std::time::Instant::now();
    let (status, writer) = sending_without_looking(to, TOTAL).await;
    assert_eq!(&status, b"HTTP/1.1 413");
    let written = tokio::time::timeout(Duration::from_secs(15), writer)
        .await
        .expect("the sender is cut off within 15 s")
        .expect("join");
    assert!(
        written < TOTAL / 2,
        "{written} bytes were taken after the 413 in {:?}",
        started.elapsed()
    );
}
