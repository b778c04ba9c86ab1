//! `jobhook-dev load`: a load driver that posts realistic job-complete events to a running engine at
//! a given rate and reports accepted events per second and ingest latency.
//!
//! The mix resembles a Keyfactor estate: inventory jobs dominate, management and reenrollment
//! jobs are rarer, most jobs succeed, failures carry retry counts. With `--record` the id of
//! every accepted event is appended to a file, one per line, as soon as its 202 arrives — the
//! crash test uses that list to check that nothing accepted is ever lost.
//!
//! With `--resend` the driver behaves like the Keyfactor forwarder: every event carries an
//! `Idempotency-Key`, and a request that timed out, failed (e.g. the connection was reset by a
//! killed engine) or got a 5xx is sent again with the same key and body until it gets an answer
//! (or [`RESEND_GIVE_UP`] passes). The crash test uses it to check that resends commit each
//! event exactly once.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Requests in flight at once; past it the driver falls behind its rate rather than opening
/// unbounded connections. Each needs a connection of its own, and the driver is one client: it
/// stays within the connections an engine allows one client by default, as the forwarder (one
/// sender) does, less [`OBSERVER_CONNECTIONS`]. Beyond the cap the engine refuses each further
/// connection with a `503`, and a driver that kept more in flight measured those refusals
/// instead of ingest.
pub const MAX_IN_FLIGHT: usize =
    jobhook::app::connections::DEFAULT_MAX_CONNECTIONS_PER_CLIENT - OBSERVER_CONNECTIONS;

/// Connections from the driver's address left for whoever watches the engine while it runs
/// (the benchmark reads `/metrics` and events; an operator's `curl`). With none left, the
/// watcher's one kept-alive connection made every connection the driver opened at the cap a
/// refusal: 24,527 of 222,804 requests in a 20 s run at full speed.
pub const OBSERVER_CONNECTIONS: usize = 8;

/// Timeout of one request: an ingest answer should take milliseconds.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest 202 answer read for its event id: the engine's names at most 256 handlers (about
/// 17 KiB); a target answering more is not the engine, and its body is not held.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The event id of a 202 answer, when it is one: read up to [`MAX_ANSWER_BYTES`], and only a
/// UUID (what goes into `--record`, one per line, is never the target's other text).
async fn event_id(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ANSWER_BYTES {
            return None;
        }
    }
    let answer: Value = serde_json::from_slice(&body).ok()?;
    let id = uuid::Uuid::parse_str(answer.get("event_id")?.as_str()?).ok()?;
    Some(id.to_string())
}

/// Pause before resending a request that got no answer: short, so that a restarted engine is
/// found quickly, but not a busy loop against a refused connection.
const RESEND_PAUSE: Duration = Duration::from_millis(100);

/// How long one event is resent before the driver gives up on it (counted as unanswered).
pub const RESEND_GIVE_UP: Duration = Duration::from_secs(60);

/// Job types of the mix: (JobType, JobTypeId, operation type, weight).
const JOB_TYPES: &[(&str, &str, &str, u32)] = &[
    (
        "WinCertInventory",
        "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
        "Unknown",
        40,
    ),
    (
        "IISUInventory",
        "7b6bbc1b-d802-4b09-bec9-f5c221083130",
        "Unknown",
        20,
    ),
    (
        "PEMInventory",
        "44340a94-9b99-410d-8011-598fb176c3c5",
        "Unknown",
        15,
    ),
    (
        "WinCertManagement",
        "4be14534-5c7d-4e2a-9b3f-8a6d1c0e2f47",
        "Add",
        10,
    ),
    (
        "PEMManagement",
        "a1c2e3f4-5b6d-4789-8abc-def012345678",
        "Remove",
        5,
    ),
    (
        "WinCertReenrollment",
        "e868b3f8-2c4d-4b7a-a1e9-5d3f8c6b2a07",
        "Reenrollment",
        5,
    ),
    (
        "SSLDiscovery",
        "0f9e8d7c-6b5a-4493-8271-605f4e3d2c1b",
        "Discovery",
        5,
    ),
];

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The engine's base URL, e.g. `http://127.0.0.1:8480`.
    pub url: String,
    /// Events per second to aim for.
    pub rate: u32,
    /// How long to send.
    pub duration: Duration,
    /// Bearer token, if the engine wants one.
    pub token: Option<String>,
    /// Append accepted event ids here.
    pub record: Option<PathBuf>,
    /// Seed of the event mix, for reproducible runs.
    pub seed: u64,
    /// Send an `Idempotency-Key` with every event and resend it until it gets an answer.
    pub resend: bool,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: u64,
    /// 202 answers.
    pub accepted: u64,
    /// Other HTTP answers.
    pub rejected: u64,
    /// Connection errors and timeouts (e.g. while the engine restarts); with resends, each
    /// failed try counts.
    pub errors: u64,
    /// Requests sent again with the same idempotency key (with `resend`).
    pub resent: u64,
    /// Events that got no answer before [`RESEND_GIVE_UP`] (with `resend`).
    pub unanswered: u64,
    /// 202 answers marked `Idempotency-Replayed`: a resend of an event an earlier try had
    /// already committed (its answer was lost).
    pub replayed: u64,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Accepted events per second.
    pub accepted_per_second: f64,
    /// Ingest latency of accepted requests, milliseconds.
    pub latency_ms: Percentiles,
}

#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    resent: AtomicU64,
    unanswered: AtomicU64,
    replayed: AtomicU64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `samples` (milliseconds).
    pub fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(index).copied().unwrap_or_default()
        };
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

/// A small deterministic generator (xorshift64*) for the event mix: reproducible from a seed and
/// free of dependencies. Not for anything security-related.
#[derive(Debug, Clone)]
pub struct Mix {
    state: u64,
}

impl Mix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Mix { state: seed.max(1) }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// The next event: a job context with the .NET field names.
    pub fn event(&mut self) -> Value {
        let total: u32 = JOB_TYPES.iter().map(|j| j.3).sum();
        let mut pick = self.below(u64::from(total)) as u32;
        let (job_type, job_type_id, operation, _) = JOB_TYPES
            .iter()
            .find(|j| {
                if pick < j.3 {
                    true
                } else {
                    pick -= j.3;
                    false
                }
            })
            .copied()
            .unwrap_or(JOB_TYPES[0]);
        let roll = self.below(100);
        let (result, retries) = match roll {
            0..=79 => ("Success", 0),
            80..=84 => ("Warning", 0),
            _ => ("Failure", self.below(6)),
        };
        let management = operation != "Unknown" && operation != "Discovery";
        let agent = self.below(8);
        json!({
            "AgentId": format!("fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a{agent:02x}"),
            "Username": "KFTRAIN\\SVC_Orchestrator",
            "ClientMachine": format!("orchestrator{agent}.kftrain.lab"),
            "JobResult": result,
            "JobId": uuid::Uuid::from_u64_pair(self.next(), self.next()).to_string(),
            "JobType": job_type,
            "JobTypeId": job_type_id,
            "OperationType": operation,
            "CertificateId": if management { Some(1 + self.below(5000)) } else { None },
            "RequestTimestamp": chrono::Utc::now().to_rfc3339(),
            "CurrentRetryCount": retries,
        })
    }
}

/// Runs the load and reports.
pub async fn run(options: LoadOptions) -> anyhow::Result<LoadReport> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let endpoint = format!("{}/v1/job-complete", options.url.trim_end_matches('/'));
    let record = match &options.record {
        Some(path) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ))),
        None => None,
    };
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let counts = Arc::new(Counts::default());
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut mix = Mix::new(options.seed);
    let period = Duration::from_secs_f64(1.0 / f64::from(options.rate.max(1)));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let run_id = chrono::Utc::now().timestamp_millis();
    let mut sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while start.elapsed() < options.duration {
        ticker.tick().await;
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let body = mix.event().to_string();
        // Unique per run and event: the seed and the run's start tell runs apart.
        let key = options
            .resend
            .then(|| format!("load-{}-{run_id}-{sent}", options.seed));
        let (client, endpoint, token) = (client.clone(), endpoint.clone(), options.token.clone());
        let send = move || {
            let mut request = client
                .post(&endpoint)
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            if let Some(key) = &key {
                request = request.header("idempotency-key", key);
            }
            request.send()
        };
        let resend = options.resend;
        let (latencies, counts, record) =
            (Arc::clone(&latencies), Arc::clone(&counts), record.clone());
        sent += 1;
        tasks.spawn(async move {
            let began = Instant::now();
            let mut answer = send().await;
            loop {
                let retry = match &answer {
                    Ok(response) => response.status().is_server_error(),
                    Err(_) => true,
                };
                if !(resend && retry) {
                    break;
                }
                counts.errors.fetch_add(1, Ordering::Relaxed);
                if began.elapsed() > RESEND_GIVE_UP {
                    counts.unanswered.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    return;
                }
                tokio::time::sleep(RESEND_PAUSE).await;
                counts.resent.fetch_add(1, Ordering::Relaxed);
                answer = send().await;
            }
            let elapsed = began.elapsed().as_secs_f64() * 1000.0;
            match answer {
                Ok(response) if response.status().as_u16() == 202 => {
                    counts.accepted.fetch_add(1, Ordering::Relaxed);
                    if response.headers().contains_key("idempotency-replayed") {
                        counts.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    latencies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(elapsed);
                    let id = event_id(response).await;
                    if let (Some(file), Some(id)) = (record, id) {
                        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = writeln!(f, "{id}");
                        let _ = f.flush();
                    }
                }
                Ok(_) => {
                    counts.rejected.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let seconds = start.elapsed().as_secs_f64();
    let (accepted, rejected, errors, resent, unanswered) = (
        counts.accepted.load(Ordering::Relaxed),
        counts.rejected.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
        counts.resent.load(Ordering::Relaxed),
        counts.unanswered.load(Ordering::Relaxed),
    );
    let samples = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(LoadReport {
        sent,
        accepted,
        rejected,
        errors,
        resent,
        unanswered,
        replayed: counts.replayed.load(Ordering::Relaxed),
        seconds,
        accepted_per_second: accepted as f64 / seconds.max(f64::EPSILON),
        latency_ms: Percentiles::of(samples),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook::context::JobContext;

    /// Answers one request on a loopback port with `body` and returns the URL.
    async fn answering(body: String) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 202 Accepted\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        });
        url
    }

    /// Only a UUID is taken from an answer, and only from an answer of a bounded size: a
    /// target that is not the engine can neither add lines to `--record` nor fill memory.
    #[tokio::test]
    async fn an_answers_event_id_is_a_uuid_from_a_bounded_body() {
        let id = "01938f2e-7c4b-7d2a-9c1e-3f5a6b7c8d9e";
        for (body, expected) in [
            (
                format!(r#"{{"event_id":"{id}","deliveries":[]}}"#),
                Some(id),
            ),
            (
                r#"{"event_id":"x
forged-id"}"#
                    .to_owned(),
                None,
            ),
            (
                format!(
                    r#"{{"event_id":"{id}","pad":"{}"}}"#,
                    "a".repeat(MAX_ANSWER_BYTES)
                ),
                None,
            ),
        ] {
            let response = reqwest::get(answering(body).await).await.unwrap();
            assert_eq!(event_id(response).await.as_deref(), expected);
        }
    }

    #[test]
    fn every_generated_event_is_a_valid_context() {
        let mut mix = Mix::new(7);
        let mut failures = 0;
        for _ in 0..1000 {
            let c = JobContext::from_json_value(&mix.event()).unwrap();
            if c.job_result == jobhook::JobResult::Failure {
                failures += 1;
            }
        }
        assert!((50..300).contains(&failures), "{failures}");
    }

    #[test]
    fn the_mix_is_reproducible() {
        let (mut a, mut b) = (Mix::new(42), Mix::new(42));
        assert_eq!(a.event()["JobId"], b.event()["JobId"]);
    }

    #[test]
    fn percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!(p.p50, 51.0);
        assert_eq!(p.p99, 99.0);
        assert_eq!(p.max, 100.0);
    }
}
