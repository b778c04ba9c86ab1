//! `jobhook serve` as a real process: ingest, routing, recorded outcomes, retries, quarantine,
//! authentication, reload, metrics and graceful shutdown, with handlers built from this
//! repository's sources.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use jobhook::runtime::cpu_share::IDLE_THREAD_NAME;
#[cfg(target_os = "linux")]
use jobhook::runtime::engine::EPOCH_THREAD_NAME;
use jobhook_testkit::engine::EngineProcess;
use jobhook_testkit::{guest, sample_context_json};
use serde_json::{Value, json};

const INVENTORY_TYPE: &str = "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f";
const OTHER_TYPE: &str = "7b6bbc1b-d802-4b09-bec9-f5c221083130";

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn config(&self, body: &str) -> PathBuf {
        self.config_with_server("", body)
    }

    /// [`Setup::config`] with more lines of `[server]` (tokens, limits); with none, the file
    /// is line for line what the tests that name a line number expect.
    fn config_with_server(&self, server: &str, body: &str) -> PathBuf {
        let path = self.dir.path().join("jobhook.toml");
        let server = if server.is_empty() {
            String::new()
        } else {
            format!("{server}\n")
        };
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[store]\ndata_dir = \"data\"\n\n{body}"
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn start(&self, body: &str) -> EngineProcess {
        let config = self.config(body);
        EngineProcess::start(
            Path::new(env!("CARGO_BIN_EXE_jobhook")),
            &config,
            &self.dir.path().join("engine.log"),
        )
    }
}

fn handler(name: &str, package: &str, job_types: &str, extra: &str) -> String {
    format!(
        "[[handlers]]\nname = \"{name}\"\ncomponent = \"{}\"\njob_types = {job_types}\n{extra}\n",
        guest(package).display()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// A reload that must be taken: its answer.
async fn reload_report(engine: &EngineProcess) -> Value {
    let response = reload(engine).await;
    assert_eq!(response.status().as_u16(), 200);
    serde_json::from_str(&response.text().await.expect("report")).expect("json")
}

/// That a reload's answer names these handlers as added, changed and removed, and no others.
fn assert_touched(report: &Value, added: &[&str], changed: &[&str], removed: &[&str]) {
    assert_eq!(report["added"], json!(added), "{report}");
    assert_eq!(report["changed"], json!(changed), "{report}");
    assert_eq!(report["removed"], json!(removed), "{report}");
}

/// Asks the engine to reload its configuration (no token: the tests' engines have none).
async fn reload(engine: &EngineProcess) -> reqwest::Response {
    client()
        .post(format!("{}/v1/admin/reload", engine.url))
        .send()
        .await
        .expect("reload")
}

async fn post(engine: &EngineProcess, body: &Value) -> (u16, Value) {
    post_raw(engine, body.to_string(), None).await
}

async fn post_raw(engine: &EngineProcess, body: String, token: Option<&str>) -> (u16, Value) {
    post_to(engine, "/v1/job-complete", body, token).await
}

/// `body` posted to `path` as it is, with `token` if any; the status and the answer's JSON
/// (`null` if it has none).
async fn post_to(
    engine: &EngineProcess,
    path: &str,
    body: String,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = client()
        .post(format!("{}{path}", engine.url))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn get(engine: &EngineProcess, path: &str) -> (u16, String) {
    let response = client()
        .get(format!("{}{path}", engine.url))
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

/// Polls the event until every delivery is terminal.
async fn settled(engine: &EngineProcess, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = get(engine, &format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).expect("event JSON");
        let done = v["deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .all(|d| {
                matches!(
                    d["state"].as_str(),
                    Some("succeeded" | "failed" | "skipped")
                )
            });
        if done {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} did not settle: {v:#}\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The event `id` once `handler`'s delivery of it is `pending` with `attempts` attempts on
/// record: a delivery waiting (for a retry or for its quarantined handler).
async fn waiting(engine: &EngineProcess, id: &str, handler: &str, attempts: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = get(engine, &format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).expect("event JSON");
        let d = delivery(&v, handler);
        if d["state"] == "pending" && d["attempts"].as_array().map(Vec::len) == Some(attempts) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}'s delivery of {id} is not waiting with {attempts} attempts: {v:#}\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delivery<'a>(event: &'a Value, handler: &str) -> &'a Value {
    event["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["handler"] == handler))
        .unwrap_or_else(|| panic!("no delivery for {handler}: {event:#}"))
}

fn context(job_type_id: &str, result: &str) -> Value {
    let mut c = sample_context_json();
    c["JobTypeId"] = json!(job_type_id);
    c["JobResult"] = json!(result);
    c
}

#[tokio::test]
async fn events_are_routed_by_job_type_and_every_outcome_is_recorded() {
    let setup = Setup::new();
    let engine = setup.start(&format!(
        "{}{}{}",
        handler("all", "log-context", "[\"*\"]", ""),
        handler(
            "inventory-only",
            "guest-attempt-probe",
            &format!("[\"{}\"]", INVENTORY_TYPE.to_uppercase()),
            ""
        ),
        handler("crasher", "guest-trap", &format!("[\"{OTHER_TYPE}\"]"), ""),
    ));

    let (status, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    assert_eq!(status, 202, "{body}");
    let mut routed: Vec<String> = serde_json::from_value(body["deliveries"].clone()).expect("list");
    routed.sort();
    assert_eq!(routed, ["all", "inventory-only"]);
    let event = settled(&engine, body["event_id"].as_str().expect("id")).await;
    assert_eq!(event["context"]["JobTypeId"], INVENTORY_TYPE);
    let all = delivery(&event, "all");
    assert_eq!(all["state"], "succeeded");
    assert_eq!(all["outcome"], "succeeded");
    assert_eq!(all["attempt"], 1);
    assert!(all["duration_ms"].as_f64().expect("duration") > 0.0);
    let lines: Vec<&str> = all["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .filter_map(|l| l["message"].as_str())
        .collect();
    // The handler is told the event came through the event API, with no job message.
    assert!(lines.contains(&"Source: event-api"), "{lines:?}");
    assert!(lines.contains(&"Message: null"), "{lines:?}");
    assert_eq!(event["source"], "api");
    assert!(event["message"].is_null(), "{event}");
    let probe = delivery(&event, "inventory-only");
    let logged = probe["logs"][0]["message"].as_str().expect("log line");
    assert_eq!(
        logged,
        format!(
            "attempt 1 of event {}",
            body["event_id"].as_str().unwrap_or("")
        )
    );

    let (status, body) = post(&engine, &context(OTHER_TYPE, "Failure")).await;
    assert_eq!(status, 202);
    let event = settled(&engine, body["event_id"].as_str().expect("id")).await;
    let crash = delivery(&event, "crasher");
    assert_eq!(crash["state"], "failed");
    assert_eq!(crash["outcome"], "trapped");
    assert!(
        crash["reason"]
            .as_str()
            .unwrap_or("")
            .contains("unreachable"),
        "{crash}"
    );
    assert_eq!(delivery(&event, "all")["state"], "succeeded");

    // An event no handler matches is still accepted and recorded.
    let (status, body) = post(
        &engine,
        &context("00000000-0000-0000-0000-000000000001", "Success"),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(body["deliveries"], json!(["all"]));
}

/// An event no handler's job types match is accepted with no deliveries, and counted in
/// `/metrics` as unrouted, so that a `job_types` list that misses a job type shows.
#[tokio::test]
async fn an_event_no_handler_matches_is_counted_as_unrouted() {
    let setup = Setup::new();
    let engine = setup.start(&handler(
        "inventory-only",
        "log-context",
        &format!("[\"{INVENTORY_TYPE}\"]"),
        "",
    ));
    let (status, body) = post(&engine, &context(OTHER_TYPE, "Failure")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deliveries"], json!([]));
    let (status, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    assert_eq!(status, 202, "{body}");
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_events_accepted_total{source=\"api\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jobhook_events_unrouted_total{source=\"api\"} 1"),
        "{metrics}"
    );
}

/// A stored context the engine cannot read (a database written by another version, or edited
/// by hand) fails that event's deliveries for good, with the reason, and does not hold up the
/// events claimed with it: they are delivered as usual.
#[tokio::test]
async fn an_unreadable_stored_context_fails_its_own_deliveries_and_no_others() {
    use jobhook::queue::store::sqlite::{DATABASE_FILE, SqliteStore};
    use jobhook::queue::store::{EventStore as _, NewEvent, SOURCE_API, new_event_id};
    let setup = Setup::new();
    let data = setup.dir.path().join("data");
    let ids: Vec<uuid::Uuid> = {
        let store = SqliteStore::open(&data).expect("store");
        (0..3)
            .map(|_| {
                let event = NewEvent {
                    id: new_event_id(),
                    source: SOURCE_API.into(),
                    context: jobhook::JobContext::from_json_value(&sample_context_json())
                        .expect("context"),
                    message: None,
                    handlers: vec!["log".into()],
                };
                store.insert_event(&event).expect("insert");
                event.id
            })
            .collect()
    };
    let spoiled = ids[1];
    let changed = rusqlite::Connection::open(data.join(DATABASE_FILE))
        .expect("database")
        .execute(
            "UPDATE events SET context = '{\"JobId\": 7}' WHERE id = ?1",
            [spoiled.to_string()],
        )
        .expect("spoil");
    assert_eq!(changed, 1);

    let engine = setup.start(&handler("log", "log-context", "[\"*\"]", ""));
    for id in &ids {
        let event = settled(&engine, &id.to_string()).await;
        let d = delivery(&event, "log");
        if *id == spoiled {
            assert_eq!(d["state"], "failed", "{event:#}");
            let reason = d["attempts"][0]["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("cannot be read"), "{event:#}");
            assert_eq!(d["attempts"][0]["class"], "engine-error", "{event:#}");
        } else {
            assert_eq!(d["state"], "succeeded", "{event:#}");
        }
    }
}

/// Retention at work in a running engine, on a store that already holds events received more
/// than `[store] retention_days` (the default, 30) ago: the finished one is deleted at the first
/// round, at start, and its `GET` answers 404; an old one with a delivery still pending (its
/// handler is not configured) and a recent finished one stay.
#[tokio::test]
async fn finished_events_past_their_retention_are_deleted_and_the_others_kept() {
    use jobhook::queue::store::sqlite::{DATABASE_FILE, SqliteStore};
    use jobhook::queue::store::{EventStore as _, NewEvent, SOURCE_API, new_event_id};
    const DAYS_AGO: i64 = 31;
    let setup = Setup::new();
    let data = setup.dir.path().join("data");
    let [old_finished, old_pending, recent] = {
        let store = SqliteStore::open(&data).expect("store");
        [vec![], vec!["gone".to_owned()], vec![]].map(|handlers| {
            let event = NewEvent {
                id: new_event_id(),
                source: SOURCE_API.into(),
                context: jobhook::JobContext::from_json_value(&sample_context_json())
                    .expect("context"),
                message: None,
                handlers,
            };
            store.insert_event(&event).expect("insert");
            event.id.to_string()
        })
    };
    let aged = rusqlite::Connection::open(data.join(DATABASE_FILE))
        .expect("database")
        .execute(
            "UPDATE events SET received_at = received_at - ?1 WHERE id IN (?2, ?3)",
            rusqlite::params![DAYS_AGO * 86_400_000, old_finished, old_pending],
        )
        .expect("age two events");
    assert_eq!(aged, 2);

    let engine = setup.start(&handler("log", "log-context", "[\"*\"]", ""));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&engine, &format!("/v1/events/{old_finished}")).await;
        if status == 404 {
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            Instant::now() < deadline,
            "the old finished event is still there a minute after the start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for kept in [&old_pending, &recent] {
        let (status, body) = get(&engine, &format!("/v1/events/{kept}")).await;
        assert_eq!(status, 200, "{kept}: {body}");
    }
    // The round's line comes once its last batch has come back: soon after the 404, not with it.
    let told = |log: &str| {
        log.contains("finished events past their retention deleted") && log.contains("events=1")
    };
    while !told(&engine.log_text()) {
        assert!(
            Instant::now() < deadline,
            "the round was not logged: {}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_retention_deleted_events_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn event_ids_sort_in_the_order_the_events_were_accepted() {
    // The store's indexes by event id grow at one end only when ids are time-ordered.
    let setup = Setup::new();
    let engine = setup.start(&handler("all", "log-context", "[\"*\"]", ""));
    let ids = post_samples(&engine, 20).await;
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
}

/// Posts `n` copies of the sample context; returns their event ids.
async fn post_samples(engine: &EngineProcess, n: usize) -> Vec<String> {
    post_copies(engine, &sample_context_json(), n).await
}

/// Posts `n` copies of `context`; returns their event ids.
async fn post_copies(engine: &EngineProcess, context: &Value, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (status, body) = post(engine, context).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["event_id"].as_str().expect("id").to_owned());
    }
    ids
}

/// The most of `runs` (start, finish) that were running at once, counted at every start.
fn most_at_once(runs: &[(Timestamp, Timestamp)]) -> usize {
    runs.iter()
        .map(|(start, _)| runs.iter().filter(|(s, f)| s <= start && start < f).count())
        .max()
        .unwrap_or(0)
}

type Timestamp = chrono::DateTime<chrono::FixedOffset>;

fn time(d: &Value, field: &str) -> Timestamp {
    d[field]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("no {field}: {d}"))
}

#[tokio::test]
async fn a_handlers_concurrency_cap_holds_and_does_not_hold_up_the_others() {
    const EVENTS: usize = 6;
    const CAP: usize = 2;
    let setup = Setup::new();
    // Every "slow" delivery takes 250 ms and succeeds; "quick" has no cap of its own.
    let engine = setup.start(&format!(
        "{}{}",
        handler(
            "slow",
            "guest-attempt-probe",
            "[\"*\"]",
            &format!("max_concurrency = {CAP}\nproperties = {{ SleepMs = \"250\" }}"),
        ),
        handler("quick", "log-context", "[\"*\"]", ""),
    ));
    let ids = post_samples(&engine, EVENTS).await;
    let (mut slow, mut quick) = (Vec::new(), Vec::new());
    for id in &ids {
        let event = settled(&engine, id).await;
        let s = delivery(&event, "slow");
        assert_eq!(s["state"], "succeeded", "{s}");
        slow.push((time(s, "started_at"), time(s, "finished_at")));
        let q = delivery(&event, "quick");
        assert_eq!(q["state"], "succeeded", "{q}");
        quick.push(time(q, "finished_at"));
    }
    // Its first success earned it its second place; never more than the cap.
    assert_eq!(most_at_once(&slow), CAP, "runs: {slow:?}");
    // The capped handler's backlog did not keep the other handler waiting.
    let last_slow_start = slow.iter().map(|(s, _)| *s).max().expect("runs");
    assert!(
        quick.iter().all(|f| *f < last_slow_start),
        "quick: {quick:?}, slow: {slow:?}"
    );
}

/// Slow handlers that succeed, whose caps add up to every slot of the engine, do not hold a
/// quick handler's delivery back behind their backlogs: the first slot that comes free goes to
/// the handler with none running. Before, each freed slot went to the oldest due delivery, which
/// was always in the slow backlogs, and the quick delivery ran after all of them had started.
#[tokio::test]
async fn slow_handlers_holding_every_slot_do_not_hold_up_another_handlers_delivery() {
    const BACKLOG: usize = 6;
    let setup = Setup::new();
    // Two slots; each slow delivery takes 300 ms and succeeds, one at a time per handler.
    let slow = |name: &str| {
        handler(
            name,
            "guest-attempt-probe",
            &format!("[\"{INVENTORY_TYPE}\"]"),
            "max_concurrency = 1\nproperties = { SleepMs = \"300\" }",
        )
    };
    let engine = setup.start(&format!(
        "[engine]\nmax_concurrent_deliveries = 2\n\n{}{}{}",
        slow("slow-a"),
        slow("slow-b"),
        handler("quick", "log-context", &format!("[\"{OTHER_TYPE}\"]"), ""),
    ));
    let backlog = post_copies(&engine, &context(INVENTORY_TYPE, "Success"), BACKLOG).await;
    // Both slots taken by the slow handlers, their backlogs waiting behind.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = get(&engine, "/v1/handlers").await;
        assert_eq!(status, 200, "{text}");
        let listed: Value = serde_json::from_str(&text).expect("handlers JSON");
        let running = |name: &str| listed_handler(&listed, name).map(|h| h["running"].clone());
        if running("slow-a") == Some(json!(1)) && running("slow-b") == Some(json!(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "{listed:#}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let quick = post_copies(&engine, &context(OTHER_TYPE, "Success"), 1).await;
    let event = settled(&engine, &quick[0]).await;
    let q = delivery(&event, "quick");
    assert_eq!(q["state"], "succeeded", "{q}");
    let quick_done = time(q, "finished_at");
    let mut slow_starts = Vec::new();
    for id in &backlog {
        let event = settled(&engine, id).await;
        for name in ["slow-a", "slow-b"] {
            let d = delivery(&event, name);
            assert_eq!(d["state"], "succeeded", "{d}");
            slow_starts.push(time(d, "started_at"));
        }
    }
    slow_starts.sort();
    // Ran as soon as a slot came free, with most of the slow backlogs still waiting: the two
    // running when it came had started, and at most one or two more on a busy machine.
    let started_before = slow_starts.iter().filter(|s| **s < quick_done).count();
    assert!(
        started_before <= slow_starts.len() / 2,
        "{started_before} of {} slow deliveries started before the quick one ended at \
         {quick_done}: {slow_starts:?}",
        slow_starts.len()
    );
}

#[tokio::test]
async fn a_handler_that_has_not_succeeded_runs_one_delivery_at_a_time() {
    const EVENTS: usize = 4;
    // One handler per way of failing, each allowed 4 at once; quarantine stays out of the way,
    // so only the earned places keep each to one at a time. Only the sleeper has a short time
    // budget: the others fail by themselves, and must not time out on a busy machine instead.
    // (Only the probe reads `FailOnFailure`; the contexts posted are failed jobs.)
    let failing = [
        ("sleepy", "guest-sleep", "timeout_ms = 250", "timed-out"),
        (
            "bomb",
            "guest-memory-bomb",
            "timeout_ms = 30000",
            "limit-exceeded",
        ),
        ("trap", "guest-trap", "timeout_ms = 30000", "trapped"),
        ("panic", "guest-panic", "timeout_ms = 30000", "panicked"),
        (
            "error",
            "guest-attempt-probe",
            "timeout_ms = 30000",
            "handler-failed",
        ),
    ];
    let setup = Setup::new();
    let handlers: String = failing
        .iter()
        .map(|(name, package, budget, _)| {
            handler(
                name,
                package,
                "[\"*\"]",
                &format!(
                    "properties = {{ FailOnFailure = \"true\" }}\nmax_concurrency = 4\n\
                     [handlers.limits]\n{budget}\n[handlers.retry]\nmax_attempts = 1"
                ),
            )
        })
        .collect();
    let engine = setup.start(&format!("[quarantine]\nafter_failures = 100\n\n{handlers}"));
    let ids = post_copies(&engine, &context(INVENTORY_TYPE, "Failure"), EVENTS).await;
    let mut runs = vec![Vec::new(); failing.len()];
    for id in &ids {
        let event = settled(&engine, id).await;
        for ((name, _, _, class), runs) in failing.iter().zip(&mut runs) {
            let d = delivery(&event, name);
            assert_eq!(d["outcome"], *class, "{d}");
            runs.push((time(d, "started_at"), time(d, "finished_at")));
        }
    }
    let (status, text) = get(&engine, "/v1/handlers").await;
    assert_eq!(status, 200, "{text}");
    let listed: Value = serde_json::from_str(&text).expect("handlers JSON");
    for ((name, ..), runs) in failing.iter().zip(&runs) {
        assert_eq!(most_at_once(runs), 1, "{name}: {runs:?}");
        let h = listed_handler(&listed, name)
            .unwrap_or_else(|| panic!("{name} not listed: {listed:#}"));
        assert_eq!(h["places"], 1, "{h}");
        assert_eq!(h["max_concurrency"], 4, "{h}");
    }
}

#[tokio::test]
async fn bad_input_gets_400_with_the_reason() {
    let setup = Setup::new();
    let engine = setup.start(&handler(
        "all",
        "log-context",
        "[\"*\"]",
        "max_concurrency = 1",
    ));
    let (status, body) = post_raw(&engine, "{\"AgentId\":".into(), None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("not valid JSON"),
        "{body}"
    );

    let mut bad = sample_context_json();
    bad["JobId"] = json!("nope");
    let (status, body) = post(&engine, &bad).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("`JobId`"),
        "{body}"
    );

    let mut bad = sample_context_json();
    bad["CurrentRetryCount"] = json!([1]);
    let (status, body) = post(&engine, &bad).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("`CurrentRetryCount`"),
        "{body}"
    );

    // System.Text.Json's default output for Keyfactor's context (public fields are skipped).
    let (status, body) = post_raw(&engine, "{}".into(), None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("IncludeFields = true"),
        "{body}"
    );

    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(200_000));
    let (status, body) = post_raw(&engine, huge, None).await;
    assert_eq!(status, 413);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("larger than the limit of 65536 bytes"),
        "{body}"
    );

    // A body in ISO-8859-1 (Windows PowerShell 5.1's string bodies), none at all, and a
    // compressed one: each named for what it is, with what to do.
    let mut latin1 = sample_context_json();
    latin1["Username"] = json!("KFTRAIN\\Jos\u{e9}");
    let latin1: Vec<u8> = latin1
        .to_string()
        .chars()
        .map(|c| u8::try_from(u32::from(c)).expect("Latin-1"))
        .collect();
    let response = client()
        .post(format!("{}/v1/job-complete", engine.url))
        .header("content-type", "application/json")
        .body(latin1)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 400);
    let body: Value =
        serde_json::from_slice(&response.bytes().await.expect("answer")).expect("JSON answer");
    assert!(
        body["error"].as_str().unwrap_or("").contains("not UTF-8"),
        "{body}"
    );
    // An empty body: reqwest sends it without a Content-Length (no framing: 411), curl's
    // `-d ''` with `Content-Length: 0` (400).
    let (status, body) = post_raw(&engine, String::new(), None).await;
    assert_eq!(status, 411, "{body}");
    let (status, body) = post_with(&engine, "", &[("content-length", "0")]).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("context is empty"),
        "{body}"
    );
    let (status, body) = post_with(
        &engine,
        &sample_context_json().to_string(),
        &[("content-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 415);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("Content-Encoding \"gzip\""),
        "{body}"
    );
    // A form (PowerShell's Invoke-RestMethod without -ContentType labels its body so) is named
    // for its label; a JSON context under any label is taken.
    let labelled = |body: String, content_type: &'static str| {
        client()
            .post(format!("{}/v1/job-complete", engine.url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let response = labelled(
        "JobId=1&Result=2".into(),
        "application/x-www-form-urlencoded",
    )
    .await
    .expect("POST");
    assert_eq!(response.status().as_u16(), 400);
    let body: Value =
        serde_json::from_slice(&response.bytes().await.expect("answer")).expect("JSON answer");
    assert!(
        body["error"].as_str().unwrap_or("").contains(
            "Content-Type is \"application/x-www-form-urlencoded\": send the job context as a JSON object"
        ),
        "{body}"
    );
    let response = labelled(sample_context_json().to_string(), "text/plain")
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 202);

    let (status, _) = get(&engine, "/v1/events/not-a-uuid").await;
    assert_eq!(status, 400);
    let (status, _) = get(&engine, "/v1/events/8c5b3a59-5a1e-4c55-8c1e-000000000000").await;
    assert_eq!(status, 404);
    // Nothing bad was committed; a good event still works.
    let (status, _) = post(&engine, &sample_context_json()).await;
    assert_eq!(status, 202);
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_events_rejected_total 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jobhook_events_accepted_total{source=\"api\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn tokens_protect_everything_but_healthz() {
    let setup = Setup::new();
    std::fs::write(setup.dir.path().join("token"), "t0ken-value\n").expect("write");
    let config = setup.config_with_server(
        "tokens = [{ file = \"token\" }]",
        &handler("all", "log-context", "[\"*\"]", ""),
    );
    let engine = EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine.log"),
    );
    let body = sample_context_json().to_string();
    let (status, answer) = post_raw(&engine, body.clone(), None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, _) = post_raw(&engine, body.clone(), Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = post_raw(&engine, body.clone(), Some("t0ken-value")).await;
    assert_eq!(status, 202);
    let (status, _) = get(&engine, "/v1/handlers").await;
    assert_eq!(status, 401);
    let (status, _) = get(&engine, "/metrics").await;
    assert_eq!(status, 401);
    // A client without the token keeps no connection open after its 401.
    let refused = client()
        .get(format!("{}/metrics", engine.url))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(refused.status().as_u16(), 401);
    assert_eq!(
        refused
            .headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close")
    );
    let (status, _) = get(&engine, "/healthz").await;
    assert_eq!(status, 200);
    // The scheme's name in any case (RFC 9110): `bearer` is `Bearer`.
    let response = client()
        .post(format!("{}/v1/job-complete", engine.url))
        .header("content-type", "application/json")
        .header("authorization", "bearer t0ken-value")
        .body(body)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 202);
    // Only the refused events count as refused events; the scraper without the token does not.
    let metrics = client()
        .get(format!("{}/metrics", engine.url))
        .bearer_auth("t0ken-value")
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("jobhook_events_rejected_total 2"),
        "{metrics}"
    );
}

/// A second engine on the data directory of a running one is refused, naming the first one's
/// process, and changes nothing: the first goes on accepting. Once the first is killed (the
/// kernel drops its lock), an engine starts there and has the events it accepted.
#[tokio::test]
async fn a_second_engine_on_the_same_sqlite_store_is_refused_and_the_first_goes_on() {
    let setup = Setup::new();
    let first = setup.start(&handler("all", "log-context", "[\"*\"]", ""));
    let (status, answer) = post(&first, &sample_context_json()).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["event_id"].as_str().expect("event id").to_owned();
    let config = setup.dir.path().join("jobhook.toml");
    let stderr_path = setup.dir.path().join("second.stderr");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start a second jobhook serve");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = std::fs::read_to_string(&stderr_path).expect("read stderr");
    let status = status.unwrap_or_else(|| {
        panic!("a second engine on the same data directory was not refused within 60 s: {stderr}")
    });
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another jobhook (process {}) is using this data directory",
            first.pid()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("[store] data_dir"), "{stderr}");
    let (status, _) = post(&first, &sample_context_json()).await;
    assert_eq!(status, 202, "the first engine goes on accepting");
    first.kill();
    let after = EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine-after.log"),
    );
    let (status, event) = get(&after, &format!("/v1/events/{id}")).await;
    assert_eq!(status, 200, "{event}");
}

/// `method path` with `token`: the status and the body.
async fn call_with(engine: &EngineProcess, method: &str, path: &str, token: &str) -> (u16, String) {
    let url = format!("{}{path}", engine.url);
    let request = match method {
        "POST" if path == "/v1/job-complete" => client()
            .post(url)
            .header("content-type", "application/json")
            .body(sample_context_json().to_string()),
        "POST" => client().post(url),
        _ => client().get(url),
    };
    let response = request.bearer_auth(token).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("text"))
}

/// `request` written as it is on a connection of its own; the answer's status and the rest of
/// what came back until the engine closed the connection (within 10 s).
async fn raw_exchange(engine: &EngineProcess, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = engine.url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    socket.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("the engine closed the connection")
        .expect("read");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    (status, text)
}

/// Requests a web page makes through a browser — any with `Origin`, or a script's
/// `Sec-Fetch-Mode` — are refused on every endpoint, before they reach it, where no token
/// guards the API: no event is stored, no reload or run again happens. A navigation (an
/// operator opening `/metrics`) and the API's own clients are answered.
#[tokio::test]
async fn requests_a_web_page_makes_are_refused_where_no_token_guards_the_api() {
    let setup = Setup::new();
    let engine = setup.start(&handler("all", "log-context", "[\"*\"]", ""));
    let loaded_at = |metrics: &str| {
        jobhook_testkit::metric_value(
            metrics,
            "jobhook_config_last_reload_success_timestamp_seconds",
        )
        .unwrap_or_else(|| panic!("{metrics}"))
    };
    let (_, metrics) = get(&engine, "/metrics").await;
    let loaded = loaded_at(&metrics);
    // A reload would be seen in the timestamp, which has whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let page = [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("sec-fetch-mode", "cors"),
        ("sec-fetch-mode", "no-cors"),
        ("sec-fetch-mode", "same-origin"),
        ("sec-fetch-mode", "websocket"),
        ("sec-fetch-mode", ""),
    ];
    for (name, value) in page {
        for (method, path, body) in [
            (
                "POST",
                "/v1/job-complete",
                sample_context_json().to_string(),
            ),
            ("POST", "/v1/admin/reload", String::new()),
            (
                "POST",
                "/v1/admin/retry-failed",
                r#"{"handler": "all"}"#.into(),
            ),
            ("GET", "/v1/handlers", String::new()),
            ("GET", "/healthz", String::new()),
        ] {
            let request = match method {
                "POST" => client().post(format!("{}{path}", engine.url)).body(body),
                _ => client().get(format!("{}{path}", engine.url)),
            };
            let response = request
                .header("content-type", "text/plain")
                .header(name, value)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            let answer = response.text().await.expect("text");
            assert_eq!(status, 403, "{name}: {value} {method} {path}: {answer}");
            assert!(
                answer.contains("does not answer requests a web page makes")
                    && !answer.contains("evil"),
                "{answer}"
            );
        }
    }
    let (_, metrics) = get(&engine, "/metrics").await;
    let accepted =
        jobhook_testkit::metric_value(&metrics, "jobhook_events_accepted_total{source=\"api\"}");
    assert_eq!(accepted, Some(0.0), "{metrics}");
    assert_eq!(loaded_at(&metrics), loaded, "no reload happened");
    // An operator's navigation, and the API's clients.
    for mode in ["navigate", "Navigate"] {
        let navigation = client()
            .get(format!("{}/metrics", engine.url))
            .header("sec-fetch-mode", mode)
            .send()
            .await
            .expect("GET");
        assert_eq!(navigation.status().as_u16(), 200, "{mode}");
    }
    let (status, body) = post(&engine, &sample_context_json()).await;
    assert_eq!(status, 202, "{body}");
}

/// A body the engine cannot read as sent is refused saying what to send instead, on each
/// endpoint that takes one: no framing (neither `Content-Length` nor chunked: `411`, and the
/// connection closed, so the body is not read as the next request), a compressed body
/// (`415`), a run again's body that is not an object; and two `Authorization` headers (`400`:
/// which counts would be a guess).
#[tokio::test]
async fn a_body_or_a_credential_sent_in_a_way_the_engine_cannot_take_is_refused_saying_how() {
    let setup = Setup::new();
    let engine = setup.start(&handler("all", "log-context", "[\"*\"]", ""));
    let context = sample_context_json().to_string();
    for (path, body) in [
        ("/v1/job-complete", context.as_str()),
        ("/v1/admin/retry-failed", r#"{"handler": "all"}"#),
    ] {
        let request = format!("POST {path} HTTP/1.1\r\nhost: x\r\n\r\n{body}");
        let (status, answer) = raw_exchange(&engine, request.as_bytes()).await;
        assert_eq!(status, 411, "{path}: {answer}");
        assert!(
            answer.contains("neither Content-Length nor Transfer-Encoding")
                && answer.contains("connection: close"),
            "{path}: {answer}"
        );
        // HTTP/1.0 without a length: the same.
        let request = format!("POST {path} HTTP/1.0\r\n\r\n{body}");
        let (status, answer) = raw_exchange(&engine, request.as_bytes()).await;
        assert_eq!(status, 411, "{path}: {answer}");
    }
    let gzipped = client()
        .post(format!("{}/v1/admin/retry-failed", engine.url))
        .header("content-encoding", "gzip")
        .body(r#"{"handler": "all"}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(gzipped.status().as_u16(), 415);
    let answer = gzipped.text().await.expect("text");
    assert!(answer.contains("send it uncompressed"), "{answer}");
    for body in [r#"["all", null]"#, "[]", "\"all\"", "null"] {
        let (status, answer) = post_to(&engine, "/v1/admin/retry-failed", body.into(), None).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("the body is not a JSON object") && !error.contains("struct"),
            "{body}: {answer}"
        );
    }
    // A field given twice is refused, not read as one of its values.
    for body in [
        r#"{"handler": "all", "handler": "other"}"#,
        r#"{"event_id": "01a252ea-160d-7636-9580-3337962edb8f", "handler": "all", "event_id": "x"}"#,
        // The same name written with an escape.
        r#"{"handler": "all", "hand\u006cer": "other"}"#,
    ] {
        let (status, answer) = post_to(&engine, "/v1/admin/retry-failed", body.into(), None).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains("duplicate field"),
            "{body}: {answer}"
        );
    }
    let (_, metrics) = get(&engine, "/metrics").await;
    assert_eq!(
        jobhook_testkit::metric_value(&metrics, "jobhook_events_accepted_total{source=\"api\"}"),
        Some(0.0),
        "{metrics}"
    );

    // Two credentials, on an engine that takes tokens.
    let dir = setup.dir.path();
    std::fs::write(dir.join("token"), "a-sender-token-long-enough-0001\n").expect("write");
    chmod(&dir.join("token"), 0o600);
    setup.config_with_server(
        "tokens = [{ file = \"token\" }]",
        &handler("all", "log-context", "[\"*\"]", ""),
    );
    assert_eq!(reload(&engine).await.status().as_u16(), 200);
    for order in [
        ["Bearer a-sender-token-long-enough-0001", "Bearer wrong"],
        ["Bearer wrong", "Bearer a-sender-token-long-enough-0001"],
    ] {
        let response = client()
            .post(format!("{}/v1/job-complete", engine.url))
            .header("content-type", "application/json")
            .header("authorization", order[0])
            .header("authorization", order[1])
            .body(context.clone())
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        let answer = response.text().await.expect("text");
        assert_eq!(status, 400, "{order:?}: {answer}");
        assert!(
            answer.contains("more than one Authorization header"),
            "{answer}"
        );
    }
}

/// With admin tokens configured, a sender's token (the one the Keyfactor server holds) opens
/// only ingest and metrics: reading events and handlers, the forwarders' list and reloading
/// answer 403 to it, and an admin token opens all of them. A reload replaces both kinds; with
/// the sender's tokens gone, posting needs no token and administration still does.
#[tokio::test]
async fn a_senders_token_opens_only_ingest_and_metrics_beside_admin_tokens() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    std::fs::write(dir.join("send"), "sender-t0ken\n").expect("write");
    std::fs::write(dir.join("admin"), "admin-t0ken\n").expect("write");
    // Token files of their owner's only: nothing to warn of at start.
    for file in ["send", "admin"] {
        chmod(&dir.join(file), 0o600);
    }
    let config = setup.config_with_server(
        "tokens = [{ file = \"send\" }]\nadmin_tokens = [{ file = \"admin\" }]",
        &handler("all", "log-context", "[\"*\"]", ""),
    );
    let engine = EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &dir.join("engine.log"),
    );
    let (status, answer) = call_with(&engine, "POST", "/v1/job-complete", "sender-t0ken").await;
    assert_eq!(status, 202, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).expect("JSON")["event_id"]
        .as_str()
        .expect("event id")
        .to_owned();
    let (status, _) = call_with(&engine, "GET", "/metrics", "sender-t0ken").await;
    assert_eq!(status, 200);
    // The admin token file changes now: a reload the sender's token could make would put the
    // new admin token in use and the old one out. Every user may read it now, which the
    // reload warns of.
    std::fs::write(dir.join("admin"), "admin-t0ken-2\n").expect("write");
    chmod(&dir.join("admin"), 0o644);
    let event = format!("/v1/events/{id}");
    for (method, path) in [
        ("GET", event.as_str()),
        ("GET", "/v1/handlers"),
        ("GET", "/v1/forwarders"),
        ("POST", "/v1/admin/reload"),
        ("GET", "/v1/deliveries/failed"),
        ("POST", "/v1/admin/retry-failed"),
    ] {
        let (status, answer) = call_with(&engine, method, path, "sender-t0ken").await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(answer.contains("[server] admin_tokens"), "{answer}");
        let (status, _) = call_with(&engine, method, path, "wrong").await;
        assert_eq!(status, 401, "{method} {path}");
    }
    // Other spellings of an administrator's endpoint, and a sender's path in the query, reach
    // no administrator's handler with a sender's token: refused or no endpoint at all.
    for path in [
        "/v1/handlers/",
        "//v1/handlers",
        "/v1//handlers",
        "/V1/handlers",
        "/v1/%68andlers",
        "/v1/handlers?next=/metrics",
        "/v1/handlers#/metrics",
        "/metrics/../v1/handlers",
        "/v1/job-complete/../handlers",
        "/v1/handlers;/metrics",
    ] {
        let (status, answer) = call_with(&engine, "GET", path, "sender-t0ken").await;
        assert!(
            status == 403 || status == 404,
            "GET {path} with a sender's token: {status} {answer}"
        );
        assert!(!answer.contains("\"grants\""), "GET {path}: {answer}");
    }
    for (method, path) in [
        ("POST", "/v1/job-complete"),
        ("GET", "/metrics"),
        ("GET", event.as_str()),
        ("GET", "/v1/handlers"),
        ("GET", "/v1/forwarders"),
        ("GET", "/v1/deliveries/failed"),
    ] {
        let (status, answer) = call_with(&engine, method, path, "admin-t0ken").await;
        assert!(
            status == 200 || status == 202,
            "{method} {path}: {status} {answer}"
        );
        if path == "/v1/handlers" {
            // What the spellings above must not show.
            assert!(answer.contains("\"grants\""), "{answer}");
        }
    }
    // The admin's reload puts the new admin token in use; the sender's token is unchanged.
    assert!(
        !engine.log_text().contains("the secret file"),
        "{}",
        engine.log_text()
    );
    let (status, answer) = call_with(&engine, "POST", "/v1/admin/reload", "admin-t0ken").await;
    assert_eq!(status, 200, "{answer}");
    let report: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(
        report["secrets_reloaded"],
        json!(["server.admin_tokens"]),
        "{report}"
    );
    let warned = format!(
        "server.admin_tokens: the secret file {}: its mode 644 lets every user read it",
        dir.join("admin").display()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !engine.log_text().contains(&warned) {
        assert!(
            Instant::now() < deadline,
            "no warning of the token file's mode:\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = call_with(&engine, "GET", "/v1/handlers", "admin-t0ken").await;
    assert_eq!(status, 401);
    let (status, _) = call_with(&engine, "GET", "/v1/handlers", "admin-t0ken-2").await;
    assert_eq!(status, 200);
    let (status, _) = call_with(&engine, "POST", "/v1/job-complete", "sender-t0ken").await;
    assert_eq!(status, 202);

    // Without sender tokens, admin tokens guard only administration: events are posted
    // without a token (on loopback here; off it, `check` wants client certificates then).
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        text.replace("tokens = [{ file = \"send\" }]\n", ""),
    )
    .expect("write");
    let (status, answer) = call_with(&engine, "POST", "/v1/admin/reload", "admin-t0ken-2").await;
    assert_eq!(status, 200, "{answer}");
    let report: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(
        report["secrets_reloaded"],
        json!(["server.tokens"]),
        "{report}"
    );
    let (status, answer) = post(&engine, &sample_context_json()).await;
    assert_eq!(status, 202, "{answer}");
    let (status, _) = get(&engine, "/metrics").await;
    assert_eq!(status, 200);
    let (status, _) = get(&engine, "/v1/handlers").await;
    assert_eq!(status, 401);
    let (status, _) = call_with(&engine, "GET", "/v1/handlers", "sender-t0ken").await;
    assert_eq!(status, 401, "a removed sender's token opens nothing");
    let (status, _) = call_with(&engine, "GET", "/v1/handlers", "admin-t0ken-2").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn retries_follow_the_policy_and_quarantine_holds_a_failing_handlers_deliveries_back() {
    let setup = Setup::new();
    let engine = setup.start(&format!(
        "[quarantine]\nafter_failures = 4\ninitial_backoff_ms = 600000\n\n{}{}",
        handler(
            "retrying",
            "guest-trap",
            &format!("[\"{INVENTORY_TYPE}\"]"),
            "[handlers.retry]\nmax_attempts = 3\nbackoff_ms = 10"
        ),
        handler("healthy", "log-context", "[\"*\"]", ""),
    ));
    // First event: 3 attempts, all trap -> failed, 3 attempts recorded.
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    let event = settled(&engine, body["event_id"].as_str().expect("id")).await;
    let d = delivery(&event, "retrying");
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["attempt"], 3);
    assert_eq!(d["attempts"].as_array().map(Vec::len), Some(3));
    // Second event: one more failure reaches 4 in a row -> quarantined; its retry waits.
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    let second = body["event_id"].as_str().expect("id").to_owned();
    waiting(&engine, &second, "retrying", 1).await;
    // Later deliveries wait too, none run; the healthy handler keeps running.
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    let third = body["event_id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, text) = get(&engine, &format!("/v1/events/{third}")).await;
        let event: Value = serde_json::from_str(&text).expect("event JSON");
        if delivery(&event, "healthy")["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "{event:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The dispatcher has looked at the store since (it does every 500 ms): still waiting.
    tokio::time::sleep(Duration::from_millis(600)).await;
    waiting(&engine, &third, "retrying", 0).await;
    waiting(&engine, &second, "retrying", 1).await;
    assert!(
        engine
            .log_text()
            .contains("handler quarantined: its deliveries wait"),
        "{}",
        engine.log_text()
    );
    assert!(
        engine.log_text().contains("handler=retrying"),
        "the quarantine's line names its handler: {}",
        engine.log_text()
    );
    let (_, health) = get(&engine, "/healthz").await;
    let health: Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["quarantined"], 1);
    let (_, handlers) = get(&engine, "/v1/handlers").await;
    let handlers: Value = serde_json::from_str(&handlers).expect("json");
    let retrying = listed_handler(&handlers, "retrying").expect("listed");
    assert_eq!(retrying["health"]["state"], "quarantined");
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_handlers_quarantined 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jobhook_deliveries_total{handler=\"retrying\",outcome=\"trapped\"} 4"),
        "{metrics}"
    );
}

/// `GET /v1/deliveries/failed` with `query`: the status and the answer's JSON.
async fn failed_list(engine: &EngineProcess, query: &str) -> (u16, Value) {
    let (status, text) = get(engine, &format!("/v1/deliveries/failed{query}")).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The event ids of a page of the failed list, in its order.
fn listed_events(page: &Value) -> Vec<&str> {
    page["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| d["event_id"].as_str().expect("event id"))
        .collect()
}

/// A handler whose configuration made it fail: its failed deliveries are listed newest first,
/// a page at a time; once the operator has mended the configuration, they run again when asked
/// (one event's, then the handler's), each with its next attempt number, and every bad request
/// is answered 400 saying what to fix.
#[tokio::test]
async fn failed_deliveries_are_listed_and_run_again_when_an_operator_asks() {
    let setup = Setup::new();
    let probe = |fail: bool| {
        handler(
            "probe",
            "guest-attempt-probe",
            "[\"*\"]",
            &format!(
                "properties = {{ FailOnFailure = \"{fail}\" }}\n[handlers.retry]\nmax_attempts = 1"
            ),
        )
    };
    let config = |fail: bool| {
        format!(
            "[quarantine]\nafter_failures = 0\n\n{}{}",
            probe(fail),
            handler("healthy", "log-context", "[\"*\"]", "")
        )
    };
    let engine = setup.start(&config(true));
    let mut failed = Vec::new();
    for result in ["Failure", "Success", "Failure", "Failure"] {
        let (status, body) = post(&engine, &context(INVENTORY_TYPE, result)).await;
        assert_eq!(status, 202, "{body}");
        let id = body["event_id"].as_str().expect("id").to_owned();
        let event = settled(&engine, &id).await;
        let expected = if result == "Failure" {
            "failed"
        } else {
            "succeeded"
        };
        assert_eq!(delivery(&event, "probe")["state"], expected, "{event:#}");
        if result == "Failure" {
            failed.push(id);
        }
    }
    let newest_first: Vec<&str> = failed.iter().rev().map(String::as_str).collect();

    let (status, page) = failed_list(&engine, "").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(listed_events(&page), newest_first);
    assert_eq!(page["next_before"], Value::Null, "{page}");
    let first = &page["deliveries"][0];
    assert_eq!(first["handler"], "probe");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["outcome"], "handler-failed", "{first}");
    assert!(
        first["reason"]
            .as_str()
            .is_some_and(|r| r.contains("(attempt 1)")),
        "{first}"
    );
    // A page at a time.
    let (_, page) = failed_list(&engine, "?limit=2").await;
    assert_eq!(listed_events(&page), newest_first[..2]);
    let next = page["next_before"]
        .as_i64()
        .expect("a full page says where to go on");
    let (_, page) = failed_list(&engine, &format!("?limit=2&before={next}")).await;
    assert_eq!(listed_events(&page), newest_first[2..]);
    assert_eq!(page["next_before"], Value::Null);
    let (_, page) = failed_list(&engine, "?handler=healthy").await;
    assert_eq!(listed_events(&page), Vec::<&str>::new());
    let (_, page) = failed_list(&engine, &format!("?event_id={}", failed[1])).await;
    assert_eq!(listed_events(&page), [failed[1].as_str()]);

    // Bad requests: 400 saying what to fix; nothing is run again.
    for (query, says) in [
        ("?limit=0", "limit must be 1-1000"),
        ("?limit=1001", "limit must be 1-1000"),
        ("?before=0", "before must be a delivery id"),
        ("?before=abc", "before (a delivery id)"),
        ("?event_id=nope", "event_id must be an event's id"),
        ("?handler=", "handler must be a handler's name"),
        ("?handler=pro%20be", "handler must be a handler's name"),
        (
            "?handler=probe%E2%80%AE",
            "handler must be a handler's name",
        ),
        (
            "?handler=probe%E2%80%8B",
            "handler must be a handler's name",
        ),
        ("?handler=probe%0A", "handler must be a handler's name"),
        ("?state=failed", "the list takes handler, event_id, before"),
        (
            "?handler=x&handler=y",
            "the list takes handler, event_id, before",
        ),
        (
            "?%1B%5B31mred=1",
            "the list takes handler, event_id, before",
        ),
        (
            &format!("?handler={}", "x".repeat(65)),
            "handler must be a handler's name",
        ),
    ] {
        let (status, answer) = failed_list(&engine, query).await;
        assert_eq!(status, 400, "{query}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{query}: {answer}");
        assert!(
            !error.contains('\u{1b}'),
            "the query's text is escaped: {answer}"
        );
    }
    let retry = "/v1/admin/retry-failed";
    let oversized = format!("{{\"handler\": \"{}\"}}", "x".repeat(5000));
    for (body, status, says) in [
        ("", 411, "send a JSON object naming a handler"),
        ("{}", 400, "name a handler, an event_id or both"),
        (
            "{\"handler\": \"probe\", \"all\": true}",
            400,
            "unknown field",
        ),
        // The same name in another case is another field, not a second value of it.
        (
            "{\"handler\": \"probe\", \"Handler\": \"other\"}",
            400,
            "unknown field `Handler`",
        ),
        (
            "{\"event_id\": \"zz\"}",
            400,
            "event_id must be an event's id",
        ),
        (
            "{\"handler\": \"a\\u0000b\"}",
            400,
            "letters, digits, '-', '_' or '.'",
        ),
        (
            "{\"handler\": \"probe\\u202e\"}",
            400,
            "letters, digits, '-', '_' or '.'",
        ),
        ("[1]", 400, "the body is not a JSON object"),
        (oversized.as_str(), 413, "the body is over 4096 bytes"),
    ] {
        let (got, answer) = post_to(&engine, retry, body.to_owned(), None).await;
        assert_eq!(got, status, "{body:.60}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| e.contains(says)),
            "{body:.60}: {answer}"
        );
    }
    let (_, page) = failed_list(&engine, "").await;
    assert_eq!(listed_events(&page).len(), 3, "{page}");
    // Counted by handler where the operator looks first.
    assert_eq!(
        failed_counts(&engine).await,
        [("healthy".into(), 0), ("probe".into(), 3)]
    );
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_handler_deliveries_failed{handler=\"probe\"} 3"),
        "{metrics}"
    );

    // The operator mends the configuration, then runs one event's delivery again.
    setup.config(&config(false));
    assert_eq!(reload(&engine).await.status().as_u16(), 200);
    let one = json!({ "handler": "probe", "event_id": failed[0] }).to_string();
    let (status, answer) = post_to(&engine, retry, one, None).await;
    assert_eq!((status, &answer), (200, &json!({ "requeued": 1 })));
    let event = settled(&engine, &failed[0]).await;
    let d = delivery(&event, "probe");
    assert_eq!(d["state"], "succeeded", "{event:#}");
    assert_eq!(d["attempt"], 2, "the next attempt number: {d}");
    assert_eq!(d["attempts"].as_array().map(Vec::len), Some(2), "{d}");
    assert_eq!(
        delivery(&event, "healthy")["attempt"],
        1,
        "only what was asked: {event:#}"
    );
    // Then every failed delivery of the handler: the other two.
    let (status, answer) = post_to(&engine, retry, r#"{"handler": "probe"}"#.into(), None).await;
    assert_eq!((status, &answer), (200, &json!({ "requeued": 2 })));
    for id in &failed[1..] {
        let event = settled(&engine, id).await;
        assert_eq!(delivery(&event, "probe")["state"], "succeeded", "{event:#}");
    }
    let (_, page) = failed_list(&engine, "").await;
    assert_eq!(listed_events(&page), Vec::<&str>::new());
    assert_eq!(
        failed_counts(&engine).await,
        [("healthy".into(), 0), ("probe".into(), 0)]
    );
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        !metrics.contains("jobhook_handler_deliveries_failed{"),
        "{metrics}"
    );
    let (status, answer) = post_to(&engine, retry, r#"{"handler": "probe"}"#.into(), None).await;
    assert_eq!((status, &answer), (200, &json!({ "requeued": 0 })));
}

/// Each handler's `failed` count in `GET /v1/handlers`, by name.
async fn failed_counts(engine: &EngineProcess) -> Vec<(String, u64)> {
    let (status, text) = get(engine, "/v1/handlers").await;
    assert_eq!(status, 200, "{text}");
    let listed: Value = serde_json::from_str(&text).expect("handlers JSON");
    let mut counts: Vec<(String, u64)> = listed["handlers"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|h| {
            let failed = h["failed"].as_u64().unwrap_or_else(|| panic!("{h}"));
            (h["name"].as_str().expect("name").to_owned(), failed)
        })
        .collect();
    counts.sort();
    counts
}

/// `[mail]` with a `from` and neither `smtp` nor `outbox`: under `serve`, mail is written to
/// `outbox` in the data directory, one .eml per mail.
#[tokio::test]
async fn mail_without_a_relay_goes_to_the_outbox_in_the_data_directory() {
    let setup = Setup::new();
    let engine = setup.start(&format!(
        "[mail]\nfrom = \"jobhook@example.com\"\n\n{}",
        handler(
            "mail",
            "repeated-failure-email",
            "[\"*\"]",
            "properties = { RetryThreshold = \"3\", EmailRecipients = \"pki@example.com\" }\n\
             [handlers.grants.mail]\nrecipients = [\"pki@example.com\"]",
        )
    ));
    let mut failed = context(INVENTORY_TYPE, "Failure");
    failed["CurrentRetryCount"] = json!(5);
    let (status, body) = post(&engine, &failed).await;
    assert_eq!(status, 202, "{body}");
    let event = settled(&engine, body["event_id"].as_str().expect("id")).await;
    assert_eq!(delivery(&event, "mail")["state"], "succeeded", "{event:#}");
    let outbox = setup.dir.path().join("data/outbox");
    let mails: Vec<_> = std::fs::read_dir(&outbox)
        .unwrap_or_else(|e| panic!("{}: {e}", outbox.display()))
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .collect();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = std::fs::read_to_string(mails[0].path()).expect("read mail");
    assert!(mail.contains("To: pki@example.com"), "{mail}");
}

/// `GET /v1/handlers` shows a handler's WASI imports that are linked inert (wasi:sockets: every
/// call denied) as such, apart from its capabilities.
#[tokio::test]
async fn handlers_endpoint_lists_inert_imports() {
    let setup = Setup::new();
    let engine = setup.start(&handler(
        "sockets",
        "guest-sockets",
        "[\"*\"]",
        "properties = { tcp_port = \"9\", udp_port = \"9\" }",
    ));
    let (status, text) = get(&engine, "/v1/handlers").await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let h = &v["handlers"][0];
    let inert: Vec<&str> = h["inert_imports"]
        .as_array()
        .unwrap_or_else(|| panic!("no inert_imports: {h:#}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!inert.is_empty(), "{h:#}");
    assert!(
        inert
            .iter()
            .all(|i| i.starts_with("wasi:sockets/")
                && i.ends_with("(linked inert: every call denied)")),
        "{inert:?}"
    );
    assert_eq!(h["imports"], json!([]), "{h:#}");
}

#[tokio::test]
async fn handlers_endpoint_hides_secrets() {
    let setup = Setup::new();
    std::fs::write(setup.dir.path().join("pw"), "hunter2").expect("write");
    let engine = setup.start(&format!(
        "[mail]\nfrom = \"jobhook@example.com\"\n\n{}",
        handler(
            "mail",
            "repeated-failure-email",
            "[\"*\"]",
            "properties = { RetryThreshold = \"3\", EmailRecipients = \"a@example.com\", SmtpPassword = { file = \"pw\" } }\n[handlers.grants.mail]\nrecipients = [\"a@example.com\"]",
        )
    ));
    let (status, text) = get(&engine, "/v1/handlers").await;
    assert_eq!(status, 200);
    assert!(!text.contains("hunter2"), "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let h = &v["handlers"][0];
    assert_eq!(h["properties"]["SmtpPassword"], "(secret)");
    assert_eq!(h["properties"]["RetryThreshold"], "3");
    assert_eq!(h["imports"], json!(["mail"]));
    assert_eq!(h["job_types"], json!(["*"]));
    assert!(!engine.log_text().contains("hunter2"));
}

/// A handler renamed by a reload keeps its deliveries: those waiting under the old name stay
/// pending (not skipped), the reload answer counts them (a rename of the case alone is pointed
/// out), and once a handler of that name is configured again they run.
#[tokio::test]
async fn deliveries_of_a_handler_renamed_by_reload_wait_for_it_instead_of_being_skipped() {
    let setup = Setup::new();
    let named = |name: &str| {
        format!(
            "{}{}",
            handler(
                name,
                "guest-trap",
                &format!("[\"{INVENTORY_TYPE}\"]"),
                "[handlers.retry]\nmax_attempts = 2\nbackoff_ms = 2000"
            ),
            handler("healthy", "log-context", "[\"*\"]", "")
        )
    };
    let engine = setup.start(&named("trapper"));
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    let id = body["event_id"].as_str().expect("event id").to_owned();
    // The first attempt fails; the retry waits 2 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = get(&engine, &format!("/v1/events/{id}")).await;
        let event: Value = serde_json::from_str(&text).expect("event");
        let d = delivery(&event, "trapper");
        if d["state"] == "pending" && d["attempts"].as_array().is_some_and(|a| a.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "{event:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    setup.config(&named("trapper-v2"));
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 200);
    let report: Value =
        serde_json::from_str(&response.text().await.expect("reload answer")).expect("JSON");
    assert_eq!(
        report["waiting_for_unconfigured"],
        json!({ "trapper": 1 }),
        "{report}"
    );
    // And so does the list of handlers, for as long as they wait.
    let (_, text) = get(&engine, "/v1/handlers").await;
    let listed: Value = serde_json::from_str(&text).expect("handlers");
    assert_eq!(
        listed["unconfigured"],
        json!([{ "name": "trapper", "pending": 1, "failed": 0, "running": 0 }]),
        "{listed:#}"
    );
    // Past the retry's time, it still waits: not claimed, not skipped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, text) = get(&engine, &format!("/v1/events/{id}")).await;
    let event: Value = serde_json::from_str(&text).expect("event");
    assert_eq!(delivery(&event, "trapper")["state"], "pending", "{event:#}");
    assert!(
        engine
            .log_text()
            .contains("deliveries wait for a handler that is not configured here"),
        "{}",
        engine.log_text()
    );

    // A rename that changes only the case keeps them waiting too, and the warning says why.
    setup.config(&named("Trapper"));
    assert_eq!(reload(&engine).await.status().as_u16(), 200);
    assert!(
        engine
            .log_text()
            .contains("handler \"Trapper\" is configured: names must match exactly, case included"),
        "{}",
        engine.log_text()
    );

    // The old name again: the delivery runs its second attempt.
    setup.config(&named("trapper"));
    assert_eq!(reload(&engine).await.status().as_u16(), 200);
    let event = settled(&engine, &id).await;
    let d = delivery(&event, "trapper");
    assert_eq!(d["state"], "failed", "{event:#}");
    assert_eq!(d["attempts"].as_array().map(Vec::len), Some(2), "{event:#}");
    // Configured again, it is listed among the handlers, with its failure, and no longer apart.
    let (_, text) = get(&engine, "/v1/handlers").await;
    let listed: Value = serde_json::from_str(&text).expect("handlers");
    assert_eq!(listed["unconfigured"], json!([]), "{listed:#}");
    let trapper = listed_handler(&listed, "trapper");
    assert_eq!(trapper.map(|h| &h["failed"]), Some(&json!(1)), "{listed:#}");
}

/// A handler removed by a reload while one of its deliveries runs: the delivery finishes with
/// the handler it started with, and `GET /v1/handlers` shows it running under that name
/// meanwhile, then failed once it has ended (here by its time limit).
#[tokio::test]
async fn a_delivery_running_when_its_handler_is_removed_is_still_shown() {
    let setup = Setup::new();
    let sleeper = handler(
        "sleeper",
        "guest-sleep",
        "[\"*\"]",
        "[handlers.limits]\ntimeout_ms = 4000\n[handlers.retry]\nmax_attempts = 1",
    );
    let healthy = handler("healthy", "log-context", "[\"*\"]", "");
    let engine = setup.start(&format!("{sleeper}{healthy}"));
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    let id = body["event_id"].as_str().expect("event id").to_owned();
    let listed = |text: String| -> Value { serde_json::from_str(&text).expect("handlers") };
    wait_until_running(&engine, "sleeper").await;

    setup.config(&healthy);
    assert_touched(&reload_report(&engine).await, &[], &[], &["sleeper"]);
    let handlers = listed(get(&engine, "/v1/handlers").await.1);
    assert_eq!(
        handlers["unconfigured"],
        json!([{ "name": "sleeper", "running": 1, "pending": 0, "failed": 0 }]),
        "{handlers:#}"
    );
    let event = settled(&engine, &id).await;
    assert_eq!(delivery(&event, "sleeper")["state"], "failed", "{event:#}");
    // Its place is given back as its outcome is recorded: within moments of it.
    let ended = json!([{ "name": "sleeper", "running": 0, "pending": 0, "failed": 1 }]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let handlers = listed(get(&engine, "/v1/handlers").await.1);
        if handlers["unconfigured"] == ended {
            break;
        }
        assert!(Instant::now() < deadline, "{handlers:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The entry of the handler `name` in an answer of `GET /v1/handlers`.
fn listed_handler<'a>(listed: &'a Value, name: &str) -> Option<&'a Value> {
    listed["handlers"]
        .as_array()
        .and_then(|all| all.iter().find(|h| h["name"] == name))
}

/// Waits until `GET /v1/handlers` shows one delivery of the handler `name` running.
async fn wait_until_running(engine: &EngineProcess, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = get(engine, "/v1/handlers").await.1;
        let handlers: Value = serde_json::from_str(&text).expect("handlers");
        let running = listed_handler(&handlers, name).map(|h| h["running"].clone());
        if running == Some(json!(1)) {
            return;
        }
        assert!(Instant::now() < deadline, "{handlers:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A handler removed by a reload while a delivery of its runs, then configured again before
/// that delivery ends: the new handler counts it with its own, so its `max_concurrency` of one
/// holds (the next delivery starts after it ended) and it is shown under the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_configured_again_counts_the_delivery_its_removed_one_still_runs() {
    let setup = Setup::new();
    let sleeper = handler(
        "sleeper",
        "guest-sleep",
        "[\"*\"]",
        "max_concurrency = 1\n[handlers.limits]\ntimeout_ms = 3000\n[handlers.retry]\nmax_attempts = 1",
    );
    let healthy = handler("healthy", "log-context", "[\"*\"]", "");
    let both = format!("{sleeper}{healthy}");
    let engine = setup.start(&both);
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    let first = body["event_id"].as_str().expect("event id").to_owned();
    wait_until_running(&engine, "sleeper").await;

    setup.config(&healthy);
    assert_touched(&reload_report(&engine).await, &[], &[], &["sleeper"]);
    setup.config(&both);
    assert_touched(&reload_report(&engine).await, &["sleeper"], &[], &[]);
    let (_, text) = get(&engine, "/v1/handlers").await;
    let handlers: Value = serde_json::from_str(&text).expect("handlers");
    let shown = listed_handler(&handlers, "sleeper").map(|h| h["running"].clone());
    assert_eq!(
        (shown, &handlers["unconfigured"]),
        (Some(json!(1)), &json!([])),
        "the running delivery is the configured handler's: {handlers:#}"
    );

    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    let second = body["event_id"].as_str().expect("event id").to_owned();
    let (first, second) = (
        settled(&engine, &first).await,
        settled(&engine, &second).await,
    );
    let (ended, started) = (
        delivery(&first, "sleeper")["finished_at"].clone(),
        delivery(&second, "sleeper")["started_at"].clone(),
    );
    let time = |v: &Value| {
        v.as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .unwrap_or_else(|| panic!("a time: {v}"))
    };
    assert!(
        time(&started) >= time(&ended),
        "the second delivery started at {started} while the first ran until {ended}"
    );
}

#[tokio::test]
async fn reload_adds_handlers_and_refuses_a_bad_config() {
    let setup = Setup::new();
    let first = handler("all", "log-context", "[\"*\"]", "");
    let engine = setup.start(&first);
    let second = format!(
        "{first}{}",
        handler(
            "probe",
            "guest-attempt-probe",
            &format!("[\"{INVENTORY_TYPE}\"]"),
            ""
        )
    );
    setup.config(&second);
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 200);
    // The answer and the log say what the reload did, handler by handler.
    let report: Value =
        serde_json::from_str(&response.text().await.expect("report")).expect("json");
    assert_touched(&report, &["probe"], &[], &[]);
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    assert_eq!(body["deliveries"], json!(["all", "probe"]));
    // One handler's settings changed, one removed, one added, one kept as it is.
    let changed_and_kept = format!(
        "{}{}",
        handler(
            "all",
            "log-context",
            "[\"*\"]",
            "properties = { Note = \"new\" }"
        ),
        handler("kept", "log-context", "[\"*\"]", ""),
    );
    setup.config(&format!(
        "{changed_and_kept}{}",
        handler("gone-soon", "log-context", "[\"*\"]", "")
    ));
    let report = reload_report(&engine).await;
    assert_touched(&report, &["gone-soon", "kept"], &["all"], &["probe"]);
    setup.config(&changed_and_kept);
    let report = reload_report(&engine).await;
    assert_touched(&report, &[], &[], &["gone-soon"]);
    assert!(
        engine
            .log_text()
            .contains("added=[] changed=[] removed=[\"gone-soon\"]"),
        "{}",
        engine.log_text()
    );
    setup.config(&second);
    assert_eq!(reload(&engine).await.status().as_u16(), 200);

    // A broken configuration is refused and the running one stays.
    setup.config(&format!(
        "{second}{}",
        handler("all", "log-context", "[\"*\"]", "")
    ));
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 400);
    let text = response.text().await.expect("text");
    assert!(text.contains("already used"), "{text}");
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    assert_eq!(body["deliveries"], json!(["all", "probe"]));
    // A refused reload is a metric, for an alert: a SIGHUP has no answer to read it from.
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_config_last_reload_successful 0"),
        "{metrics}"
    );

    // SIGHUP reloads too.
    setup.config(&first);
    engine.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
        if body["deliveries"] == json!(["all"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_config_last_reload_successful 1"),
        "{metrics}"
    );
}

/// A reload of a configuration file cut short — empty, or whole but for its handlers — would
/// leave no handler, and every event after it would be stored and never delivered: both are
/// refused (by the endpoint and by SIGHUP), saying why, and the running handlers stay.
#[tokio::test]
async fn a_reload_that_would_leave_no_handler_is_refused() {
    let setup = Setup::new();
    let all = handler("all", "log-context", "[\"*\"]", "");
    let engine = setup.start(&all);
    let path = setup.dir.path().join("jobhook.toml");
    let still_routed = || async {
        let (status, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["deliveries"], json!(["all"]), "{}", engine.log_text());
    };
    // Cut to nothing, to white space, to a comment.
    for written in ["", "\n\n  \n", "# jobhook\n"] {
        std::fs::write(&path, written).expect("truncate");
        let response = reload(&engine).await;
        assert_eq!(response.status().as_u16(), 400, "{written:?}");
        let text = response.text().await.expect("text");
        assert!(
            text.contains("the configuration file is empty") && text.contains("cut short"),
            "{written:?}: {text}"
        );
        still_routed().await;
    }
    // Whole but for its handlers: the reload says what it would have stopped.
    setup.config("");
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 400);
    let text = response.text().await.expect("text");
    assert!(
        text.contains("has no [[handlers]]")
            && text.contains("1 handler runs now (all)")
            && text.contains("the running configuration stays"),
        "{text}"
    );
    still_routed().await;
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_config_last_reload_successful 0"),
        "{metrics}"
    );
    // By SIGHUP too: refused, logged, the handler kept.
    let refusals = || {
        engine
            .log_text()
            .matches("reload refused, keeping the running one")
            .count()
    };
    let before = refusals();
    std::fs::write(&path, "").expect("truncate");
    engine.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while refusals() == before {
        assert!(
            Instant::now() < deadline,
            "the refused SIGHUP reload was not logged:\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_routed().await;
    let (_, health) = get(&engine, "/healthz").await;
    let health: Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["handlers"], 1, "{health}");
    // Handlers back: the reload is taken.
    setup.config(&all);
    assert_eq!(reload(&engine).await.status().as_u16(), 200);
}

/// Starts an engine on `running` followed by a handler `all`, then reloads `reloaded` (whose
/// handlers the file's own sections allow, but not the sections the running engine started
/// with): the whole reload is refused — 400 from the endpoint with every text of `named`, an
/// ERROR line in the log, `jobhook_config_last_reload_successful 0` — and `all` alone goes on
/// running. Then a reload of `without` (the same sections, without what needed them) is taken,
/// saying what needs a restart.
async fn reload_refused_for_the_running_engine(
    setup: &Setup,
    running: &str,
    reloaded: &str,
    named: &[&str],
    without: &str,
) {
    let all = handler("all", "log-context", "[\"*\"]", "");
    let engine = setup.start(&format!("{running}{all}"));
    setup.config(reloaded);
    let response = reload(&engine).await;
    let status = response.status().as_u16();
    let answer: Value = serde_json::from_str(&response.text().await.expect("text")).expect("json");
    assert_eq!(status, 400, "{answer}\n{}", engine.log_text());
    let text = answer["error"].as_str().unwrap_or_default();
    for words in named {
        assert!(text.contains(words), "{words:?} missing from: {text}");
    }
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    assert_eq!(body["deliveries"], json!(["all"]), "{}", engine.log_text());
    let (_, handlers) = get(&engine, "/v1/handlers").await;
    let handlers: Value = serde_json::from_str(&handlers).expect("json");
    let names: Vec<&str> = handlers["handlers"]
        .as_array()
        .expect("handlers")
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["all"], "{handlers:#}");
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_config_last_reload_successful 0"),
        "{metrics}"
    );
    let log = engine.log_text();
    assert!(
        log.lines().any(|l| l.contains(" ERROR ")
            && l.contains("configuration reload refused, keeping the running one")
            && l.contains(named[0])),
        "{log}"
    );

    // Without what needed the start-only section, the same file is taken.
    setup.config(without);
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 200, "{}", engine.log_text());
    let report: Value = serde_json::from_str(&response.text().await.expect("text")).expect("json");
    assert_ne!(report["restart_required"], json!([]), "{report}");
}

/// A reload that adds `[mail]` and a handler granted mail is refused: the mail transport is
/// built at start only, and every delivery of the handler would fail with "no mail transport".
#[tokio::test]
async fn a_reload_granting_mail_the_running_engine_has_not_got_is_refused() {
    let setup = Setup::new();
    let all = handler("all", "log-context", "[\"*\"]", "");
    let mail = "[mail]\nfrom = \"jobhook@example.com\"\n\n";
    let mailer = handler(
        "mailer",
        "repeated-failure-email",
        "[\"*\"]",
        "properties = { RetryThreshold = \"3\", EmailRecipients = \"pki@example.com\" }\n\
         [handlers.grants.mail]\nrecipients = [\"pki@example.com\"]",
    );
    reload_refused_for_the_running_engine(
        &setup,
        "",
        &format!("{mail}{all}{mailer}"),
        &[
            "handlers.grants.mail (handler \"mailer\")",
            "the running engine was started without [mail]",
            "restart jobhook to apply [mail] first, or reload without the grant",
        ],
        &format!("{mail}{all}"),
    )
    .await;
}

/// A reload that adds a Keyfactor identity and a grant of it is refused: the identities are
/// built at start only, and every call of the handler would fail with "identity not configured".
#[tokio::test]
async fn a_reload_granting_a_keyfactor_identity_the_running_engine_has_not_got_is_refused() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    std::fs::write(dir.join("kf-token"), "kf-engine").expect("write");
    std::fs::write(dir.join("kf-reader"), "kf-reader").expect("write");
    let keyfactor = "[keyfactor]\nbase_url = \"https://keyfactor.example.com/KeyfactorAPI\"\n\
                     auth = { kind = \"bearer\", token = { file = \"kf-token\" } }\n";
    let identity = "[keyfactor.identities]\nreader = { kind = \"bearer\", token = { file = \
                    \"kf-reader\" } }\n\n";
    let all = handler("all", "log-context", "[\"*\"]", "");
    let lookup = handler(
        "lookup",
        "job-history-lookup",
        "[\"*\"]",
        "[handlers.grants.keyfactor]\npaths = [\"OrchestratorJobs/\"]\nidentity = \"reader\"",
    );
    reload_refused_for_the_running_engine(
        &setup,
        &format!("{keyfactor}\n"),
        &format!("{keyfactor}{identity}{all}{lookup}"),
        &[
            "handlers.grants.keyfactor.identity",
            "(handler \"lookup\")",
            "is not a Keyfactor identity of this engine (configured under \
             [keyfactor.identities]: none)",
            "restart jobhook to apply [keyfactor] first, or reload without the grant",
        ],
        &format!("{keyfactor}{identity}{all}"),
    )
    .await;
}

/// A reload that raises the sandbox pool's per-component caps and, with them, a handler's
/// limit is refused: the pool is built at start only and would hold the component to the old
/// cap while `/v1/handlers` showed the new limit.
#[tokio::test]
async fn a_reload_raising_a_handler_limit_with_the_pool_caps_is_refused() {
    let setup = Setup::new();
    let engine = "[engine]\nmax_core_instances_per_component = 32\n\
                  core_instances_per_delivery = 32\n\n";
    let all = handler("all", "log-context", "[\"*\"]", "");
    let big = handler(
        "big",
        "log-context",
        "[\"*\"]",
        "[handlers.limits]\ninstances = 32",
    );
    reload_refused_for_the_running_engine(
        &setup,
        "",
        &format!("{engine}{all}{big}"),
        &[
            "handlers.limits (handler \"big\")",
            "instances = 32 is above [engine] max_core_instances_per_component of the running \
             engine (16)",
            "restart jobhook to apply [engine] first, or reload with instances at most 16",
        ],
        &format!("{engine}{all}"),
    )
    .await;
}

/// A handler that traps on every inventory job and is not retried: each event is one failure.
fn failing_inventory_handler() -> String {
    handler(
        "failing",
        "guest-trap",
        &format!("[\"{INVENTORY_TYPE}\"]"),
        "[handlers.retry]\nmax_attempts = 1",
    )
}

/// A reload that changes only `[quarantine]` applies it to the handlers it keeps (their
/// component and settings unchanged), with the failures they already had: before, a kept
/// handler went on under the old settings and nothing said so.
#[tokio::test]
async fn reload_applies_a_new_quarantine_to_the_handlers_it_keeps() {
    let setup = Setup::new();
    let failing = failing_inventory_handler();
    let quarantine = |after: u32| {
        format!("[quarantine]\nafter_failures = {after}\ninitial_backoff_ms = 600000\n\n{failing}")
    };
    let engine = setup.start(&quarantine(100));
    let failed_once = |event: &Value| {
        let d = delivery(event, "failing");
        assert_eq!(d["state"], "failed", "{d}");
    };
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    failed_once(&settled(&engine, body["event_id"].as_str().expect("id")).await);

    setup.config(&quarantine(2));
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 200);
    // The second failure in a row reaches the new threshold...
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    failed_once(&settled(&engine, body["event_id"].as_str().expect("id")).await);
    // ...and the next delivery waits for the quarantine to end.
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    let id = body["event_id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(600)).await;
    waiting(&engine, &id, "failing", 0).await;
    let (_, health) = get(&engine, "/healthz").await;
    let health: Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["quarantined"], 1, "{health}");
}

/// A quarantine holds a handler's deliveries back and loses none: those that arrive while it
/// lasts wait in the store, and when it ends they run (the first as the probe that releases
/// the handler). The failures that set it aside may be a relay's or an API's outage, not the
/// handler's; they were skipped for good before, whatever the retry policy said.
#[tokio::test]
async fn a_quarantined_handlers_deliveries_wait_and_run_when_the_quarantine_ends() {
    let setup = Setup::new();
    let engine = setup.start(&format!(
        "[quarantine]\nafter_failures = 2\ninitial_backoff_ms = 3000\n\n{}",
        handler(
            "probe",
            "guest-attempt-probe",
            "[\"*\"]",
            "[handlers.retry]\nmax_attempts = 1\n[handlers.properties]\nFailOnFailure = \"true\""
        ),
    ));
    for _ in 0..2 {
        let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
        let event = settled(&engine, body["event_id"].as_str().expect("id")).await;
        assert_eq!(delivery(&event, "probe")["state"], "failed", "{event:#}");
    }
    let quarantined_at = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["event_id"].as_str().expect("id").to_owned());
    }
    let (_, health) = get(&engine, "/healthz").await;
    let health: Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["quarantined"], 1, "{health}");
    let (_, handlers) = get(&engine, "/v1/handlers").await;
    let handlers: Value = serde_json::from_str(&handlers).expect("json");
    assert_eq!(
        handlers["handlers"][0]["pending"], 3,
        "the held deliveries are counted: {handlers:#}"
    );
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_handler_deliveries_pending{handler=\"probe\"} 3"),
        "the held deliveries are a metric too: {metrics}"
    );
    let until = handlers["handlers"][0]["health"]["until"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("no quarantine end: {handlers:#}"));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for id in &ids {
        if quarantined_at.elapsed() < Duration::from_millis(2500) {
            waiting(&engine, id, "probe", 0).await;
        }
    }
    // Each ran once, and not before the quarantine's end (the store's times are whole
    // milliseconds; the end is told to the millisecond too).
    for id in &ids {
        let event = settled(&engine, id).await;
        let d = delivery(&event, "probe");
        assert_eq!(d["state"], "succeeded", "{d}");
        let attempts = d["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1, "{d}");
        let started = attempts[0]["started_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .unwrap_or_else(|| panic!("no start: {d}"));
        assert!(
            started >= until - chrono::Duration::milliseconds(2),
            "ran at {started}, before the quarantine ended at {until}: {d}"
        );
    }
    let (_, health) = get(&engine, "/healthz").await;
    let health: Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["quarantined"], 0, "{health}");
    let (_, handlers) = get(&engine, "/v1/handlers").await;
    let handlers: Value = serde_json::from_str(&handlers).expect("json");
    assert_eq!(handlers["handlers"][0]["pending"], 0, "{handlers:#}");
    let log = engine.log_text();
    assert!(
        log.contains("handler released from quarantine") && log.contains("handler=probe"),
        "{log}"
    );
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(!metrics.contains("outcome=\"skipped\""), "{metrics}");
    assert!(
        !metrics.contains("jobhook_handler_deliveries_pending{"),
        "a drained backlog leaves no series: {metrics}"
    );
}

/// A reload that only moves a handler to another line (a comment added above it) keeps it as
/// it is: its quarantine goes on. It was rebuilt before, as if changed, and came back healthy.
#[tokio::test]
async fn a_reload_that_only_moves_a_handler_keeps_its_quarantine() {
    let setup = Setup::new();
    let failing = failing_inventory_handler();
    let text = |comment: &str| {
        format!(
            "[quarantine]\nafter_failures = 1\ninitial_backoff_ms = 600000\n\n{comment}{failing}"
        )
    };
    let engine = setup.start(&text(""));
    let (_, body) = post(&engine, &context(INVENTORY_TYPE, "Failure")).await;
    settled(&engine, body["event_id"].as_str().expect("id")).await;
    let quarantined = || async {
        let (_, health) = get(&engine, "/healthz").await;
        let health: Value = serde_json::from_str(&health).expect("json");
        health["quarantined"].clone()
    };
    assert_eq!(quarantined().await, 1);
    setup.config(&text(
        "# the handler that traps\n# (moved down two lines)\n",
    ));
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        quarantined().await,
        1,
        "the quarantine was lifted by a moved line"
    );
}

/// Reloads that change a busy handler (here its property) do not let it run more than its
/// `max_concurrency` at once: the deliveries of the handler it replaced still count. Each
/// reload let one more run beside them before.
#[tokio::test]
async fn reloads_that_change_a_busy_handler_keep_it_within_its_max_concurrency() {
    let setup = Setup::new();
    let slow = |ms: u32| {
        handler(
            "slow",
            "guest-attempt-probe",
            "[\"*\"]",
            &format!(
                "max_concurrency = 1\nproperties = {{ SleepMs = \"{ms}\" }}\n\
                 [handlers.limits]\ntimeout_ms = 20000"
            ),
        )
    };
    let engine = setup.start(&slow(4000));
    for _ in 0..3 {
        let (status, body) = post(&engine, &sample_context_json()).await;
        assert_eq!(status, 202, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let running = || async {
        let (_, metrics) = get(&engine, "/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("jobhook_deliveries_running "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("jobhook_deliveries_running")
    };
    assert_eq!(running().await, 1.0);
    for ms in [4001, 4002] {
        setup.config(&slow(ms));
        let response = reload(&engine).await;
        assert_eq!(response.status().as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(running().await, 1.0, "after a reload to SleepMs {ms}");
    }
}

#[tokio::test]
async fn sigterm_finishes_running_deliveries_and_exits_cleanly() {
    let setup = Setup::new();
    let engine = setup.start(&handler(
        "slow",
        "guest-attempt-probe",
        "[\"*\"]",
        "properties = { SleepMs = \"300\" }",
    ));
    let (_, body) = post(&engine, &sample_context_json()).await;
    let id = body["event_id"].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = engine.terminate(Duration::from_secs(30)).expect("exited");
    assert!(status.success(), "{status:?}");
    // Restart on the same data: the delivery finished before the exit, exactly once.
    let config = setup.dir.path().join("jobhook.toml");
    let engine = EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine.log"),
    );
    let event = settled(&engine, &id).await;
    let d = delivery(&event, "slow");
    assert_eq!(d["state"], "succeeded", "{d}");
    assert_eq!(d["attempt"], 1, "{d}");
}

/// Writes `setup`'s configuration: one handler, `slow`, that runs for a minute on every event,
/// a shutdown grace of `grace`, and `server` added to `[server]`; its path.
fn minute_long_handler_config(setup: &Setup, grace: Duration, server: &str) -> PathBuf {
    let config = setup.dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = {grace}\n{server}\n\
             [store]\ndata_dir = \"data\"\n\n{handler}",
            grace = grace.as_millis(),
            handler = handler(
                "slow",
                "guest-attempt-probe",
                "[\"*\"]",
                "properties = { SleepMs = \"60000\" }\n[handlers.limits]\ntimeout_ms = 120000",
            )
        ),
    )
    .expect("config");
    config
}

/// The running deliveries' grace and the connections' drain run side by side: with a delivery
/// that outlasts the grace and a request whose body never finishes (each holding its part of
/// the stop for the whole grace), SIGTERM ends the process after about one grace, not two (one
/// after the other, as before: 12 s with a 6 s grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_takes_the_grace_once_for_deliveries_and_connections_together() {
    use tokio::io::AsyncWriteExt as _;
    const GRACE: Duration = Duration::from_secs(10);
    /// One grace, and half of one for the process's own end on a loaded machine (two graces
    /// took 20 s).
    const BOUND: Duration = Duration::from_secs(15);
    let setup = Setup::new();
    let config = minute_long_handler_config(&setup, GRACE, "body_read_timeout_ms = 60000\n");
    let engine = EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine.log"),
    );
    let (status, body) = post(&engine, &sample_context_json()).await;
    assert_eq!(status, 202, "{body}");
    // A request whose body stops half way: the drain waits for it.
    let address = engine.url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    slow.write_all(
        b"POST /v1/job-complete HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"JobId\":",
    )
    .await
    .expect("write");
    // The delivery is running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = Instant::now();
    let status = engine.terminate(Duration::from_secs(60)).expect("exited");
    let took = began.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < BOUND,
        "SIGTERM took {took:?} with a {GRACE:?} grace (bound {BOUND:?})"
    );
    drop(slow);
}

/// A second SIGTERM or SIGINT during the grace ends it at once: the running delivery is
/// interrupted and requeued as when the grace runs out, instead of the stop taking the whole
/// 20 s grace. The wait is a warning, shown at the default log level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_ends_the_grace_at_once() {
    const GRACE: Duration = Duration::from_secs(20);
    /// Well under the grace, with room for a loaded machine.
    const BOUND: Duration = Duration::from_secs(8);
    for second in ["INT", "TERM"] {
        let setup = Setup::new();
        let config = minute_long_handler_config(&setup, GRACE, "");
        let log = setup.dir.path().join("engine.log");
        let engine = EngineProcess::start_at_default_log_level(
            Path::new(env!("CARGO_BIN_EXE_jobhook")),
            &config,
            &log,
        );
        let (status, body) = post(&engine, &sample_context_json()).await;
        assert_eq!(status, 202, "{body}");
        let id = body["event_id"].as_str().expect("id").to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, text) = get(&engine, &format!("/v1/events/{id}")).await;
            if text.contains("\"running\"") {
                break;
            }
            assert!(Instant::now() < deadline, "not running: {text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        engine.signal("TERM");
        let waiting = "waiting up to 20s for running deliveries";
        let deadline = Instant::now() + Duration::from_secs(10);
        while !engine.log_text().contains(waiting) {
            assert!(Instant::now() < deadline, "{}", engine.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let began = Instant::now();
        engine.signal(second);
        let status = engine.wait(Duration::from_secs(60)).expect("exited");
        let took = began.elapsed();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "SIG{second}: {status:?}\n{text}");
        assert!(
            took < BOUND,
            "a second SIG{second} took {took:?} to end a {GRACE:?} grace\n{text}"
        );
        let line = text
            .lines()
            .find(|l| l.contains(waiting))
            .expect("the wait's line");
        assert!(line.contains(" WARN "), "{line}");
        assert!(
            text.contains("stop asked again; interrupting deliveries, they will run again"),
            "{text}"
        );
    }
}

/// A reload whose files do not answer (on a file system that hangs: here
/// `jobhook-powerloss-fs` with its process stopped) leaves ingest answering, even with one
/// thread for the API (`TOKIO_WORKER_THREADS=1`, a one-CPU container): the reload reads its
/// files on blocking threads, not on the thread that answers requests (it held that thread,
/// before: the event below was not answered). Both kinds of read are tried: the handler's
/// component, and the configuration file itself (the first of the files read with it: the
/// tokens, secrets and certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_files_hang_leaves_ingest_answering() {
    use jobhook_testkit::powerloss::fuse_or_skip;
    if !fuse_or_skip() {
        return;
    }
    for hung in [HungFile::Component, HungFile::Config] {
        reload_with_a_hung_file(hung).await;
    }
}

/// Which of a reload's files sits on the file system that hangs.
#[derive(Debug, Clone, Copy)]
enum HungFile {
    Component,
    Config,
}

async fn reload_with_a_hung_file(hung: HungFile) {
    use jobhook_testkit::powerloss::PowerLossFs;
    let setup = Setup::new();
    let (backing, mount) = (setup.dir.path().join("disk"), setup.dir.path().join("mnt"));
    for d in [&backing, &mount] {
        std::fs::create_dir(d).expect("create dir");
    }
    let disk = PowerLossFs::mount(&jobhook_testkit::powerloss_fs_binary(), &backing, &mount);
    let (component, config) = match hung {
        HungFile::Component => (
            disk.mountpoint().join("log.wasm"),
            setup.dir.path().join("jobhook.toml"),
        ),
        HungFile::Config => (
            setup.dir.path().join("log.wasm"),
            disk.mountpoint().join("jobhook.toml"),
        ),
    };
    std::fs::copy(guest("log-context"), &component).expect("copy the component");
    // The store stays off the file system that hangs: only the reload's reads may.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"{}\"\n\n\
             [[handlers]]\nname = \"log\"\ncomponent = \"{}\"\njob_types = [\"*\"]\n",
            setup.dir.path().join("data").display(),
            component.display()
        ),
    )
    .expect("write config");
    let engine = EngineProcess::start_with_env(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine.log"),
        &[("TOKIO_WORKER_THREADS", "1")],
    );
    disk.freeze().expect("freeze the file system");
    engine.hangup();
    // The reload has begun to read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        post(&engine, &sample_context_json()),
    )
    .await;
    let (status, body) = answered.unwrap_or_else(|_| {
        panic!(
            "with the {hung:?} hung, the event was not answered within 10 s while the reload hung"
        )
    });
    assert_eq!(status, 202, "{hung:?}: {body}");
    if matches!(hung, HungFile::Config) {
        // The reload gives up on its files (FILE_READ_TIMEOUT, 30 s) and with it the reload
        // lock: once the files answer again, the next reload is made (it waited for good
        // behind the first before).
        let refused = "could not be read within 30 s";
        let began = Instant::now();
        while !engine.log_text().contains(refused) {
            assert!(
                began.elapsed() < Duration::from_secs(45),
                "the hung reload was not given up: {}",
                engine.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        disk.thaw().expect("thaw");
        let answer = tokio::time::timeout(Duration::from_secs(10), reload(&engine))
            .await
            .expect("the next reload is answered");
        assert_eq!(
            answer.status(),
            200,
            "{}",
            answer.text().await.unwrap_or_default()
        );
    } else {
        disk.thaw().expect("thaw");
    }
    engine.kill();
    disk.cut_power();
}

/// A secret file replaced by a named pipe (FIFO) nobody writes to is refused at once, naming
/// what it is: opening it would wait for a writer for good, and hold the reload lock with it.
/// The running configuration stays, and the next reload, with the file back, is made.
#[cfg(unix)]
#[tokio::test]
async fn a_reload_meeting_a_fifo_is_refused_at_once_and_the_next_is_made() {
    let setup = Setup::new();
    let token = setup.dir.path().join("token.txt");
    std::fs::write(&token, "t0ken-for-reload\n").expect("token");
    let config = setup.dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntokens = [{{ file = \"{}\" }}]\n\n\
             [store]\ndata_dir = \"data\"\n\n{}",
            token.display(),
            handler("all", "log-context", "[\"*\"]", "")
        ),
    )
    .expect("write config");
    let engine = EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine.log"),
    );
    let aside = setup.dir.path().join("token.aside");
    std::fs::rename(&token, &aside).expect("move the token aside");
    let status = std::process::Command::new("mkfifo")
        .arg(&token)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let client = reqwest::Client::new();
    let reload = || {
        client
            .post(format!("{}/v1/admin/reload", engine.url))
            .bearer_auth("t0ken-for-reload")
            .send()
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), reload())
        .await
        .expect("the reload is answered at once")
        .expect("sent");
    assert_eq!(answer.status(), 400);
    let why = answer.text().await.unwrap_or_default();
    assert!(why.contains("named pipe (FIFO)"), "{why}");
    std::fs::remove_file(&token).expect("remove the FIFO");
    std::fs::rename(&aside, &token).expect("put the token back");
    let answer = tokio::time::timeout(Duration::from_secs(10), reload())
        .await
        .expect("the next reload is answered")
        .expect("sent");
    assert_eq!(
        answer.status(),
        200,
        "{}",
        answer.text().await.unwrap_or_default()
    );
    engine.kill();
}

#[test]
fn check_validates_and_names_the_line() {
    let setup = Setup::new();
    let good = setup.config(&handler("all", "log-context", "[\"*\"]", ""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 handler(s) loaded: all"));

    let bad = setup.config(&format!(
        "{}{}",
        handler("all", "log-context", "[\"*\"]", ""),
        handler("wrong", "guest-wrong-world", "[\"*\"]", "")
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("jobhook.toml:12"), "{stderr}");
    assert!(stderr.contains("\"wrong\""), "{stderr}");
    assert!(
        stderr.contains("does not fit the jobhook:handler world"),
        "{stderr}"
    );

    let missing = setup.config("[[handlers]]\nname = \"x\"\ncomponent = \"nope.wasm\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["check", "--config"])
        .arg(&missing)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("job_types"), "{stderr}");
}

#[test]
fn the_example_configuration_used_by_the_readme_is_valid() {
    // Builds the guests the example configuration points at.
    guest("log-context");
    let config = jobhook_testkit::workspace_root()
        .join("examples")
        .join("jobhook.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "4 handler(s) loaded: acknowledge-failed-job, job-history-lookup, log-context, repeated-failure-email"
        ),
        "{stdout}"
    );
}

/// The log line of a delivery that did not succeed names its event and attempt: the operator
/// can look the delivery up (`GET /v1/events/{id}`) from the line alone.
#[tokio::test]
async fn the_line_of_a_failed_delivery_names_its_event_and_attempt() {
    let setup = Setup::new();
    let engine = setup.start(&handler(
        "panicker",
        "guest-panic",
        "[\"*\"]",
        "[handlers.retry]\nmax_attempts = 1\n",
    ));
    let (status, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["event_id"].as_str().expect("id");
    let event = settled(&engine, id).await;
    assert_eq!(
        delivery(&event, "panicker")["outcome"],
        "panicked",
        "{event:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = engine.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("handler did not succeed") && l.contains("handler=panicker"));
        if let Some(line) = line {
            assert!(line.contains(&format!("event_id={id}")), "{line}");
            assert!(line.contains("attempt=1"), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "no line of the failure:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine.kill();
}

/// `guest-log-forge` logs, prints, fails and panics with a fake engine line, a fake outcome
/// line, escape sequences, a NUL and a bidi override: the engine's log shows all of it escaped —
/// no forged line, no ESC byte — and the API keeps the text exactly (JSON-escaped once).
#[tokio::test]
async fn guest_text_cannot_forge_engine_log_lines() {
    let setup = Setup::new();
    let engine = setup.start(&format!(
        "{}{}",
        handler(
            "forger",
            "guest-log-forge",
            "[\"*\"]",
            "[handlers.properties]\nmode = \"fail\"\n"
        ),
        handler(
            "panicker",
            "guest-log-forge",
            "[\"*\"]",
            "[handlers.properties]\nmode = \"panic\"\n"
        ),
    ));
    let (status, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    assert_eq!(status, 202, "{body}");
    let event = settled(&engine, body["event_id"].as_str().expect("id")).await;
    let failed = delivery(&event, "forger");
    assert_eq!(failed["outcome"], "handler-failed", "{failed}");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap_or("")
            .contains("\n2026-12-02T00:00:00Z  INFO jobhook: forged engine line\routcome"),
        "{failed}"
    );
    assert_eq!(delivery(&event, "panicker")["outcome"], "panicked");

    let bytes = engine.log_bytes();
    engine.kill();
    let log = String::from_utf8_lossy(&bytes);
    assert!(
        !bytes.iter().any(|b| matches!(b, 0x1b | 0x07 | 0 | b'\r')),
        "a control byte reached the engine log:\n{log}"
    );
    assert!(!log.contains('\u{202e}'), "{log}");
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-12-02T00:00:00Z") && !line.starts_with("outcome"),
            "forged line in the engine log: {line:?}\n{log}"
        );
    }
    // The guest's lines and its failure are there, escaped, each a quoted field after the
    // line's own fields: what the guest wrote cannot pass for them.
    let forged = "innocent\\n2026-12-02T00:00:00Z  INFO jobhook: forged engine line\\routcome   \
                  succeeded\\n\\u{1b}[2J";
    assert!(
        log.contains(&format!("handler=forger line=\"{forged}")),
        "{log}"
    );
    assert!(
        log.contains("class=\"handler-failed\" duration_ms="),
        "{log}"
    );
    assert!(
        log.contains(&format!("reason=\"handler failed: {forged}")),
        "{log}"
    );
}

/// At its default log filter, as an operator runs it, `jobhook serve` shows the warnings
/// docs/OPERATIONS.md tells an operator to look for (here: a reload that cannot apply a change)
/// and of a handler's own lines only its errors, escaped — not its info and warning lines, nor
/// a line for each delivery it fails (the outcome has those).
#[tokio::test]
async fn at_its_default_log_filter_serve_shows_the_operators_warnings_and_only_handler_errors() {
    let setup = Setup::new();
    let handlers = handler(
        "forger",
        "guest-log-forge",
        "[\"*\"]",
        "[handlers.properties]\nmode = \"fail\"\n",
    );
    let config = setup.config(&handlers);
    let engine = EngineProcess::start_at_default_log_level(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine.log"),
    );
    let (status, body) = post(&engine, &context(INVENTORY_TYPE, "Success")).await;
    assert_eq!(status, 202, "{body}");
    let event = settled(&engine, body["event_id"].as_str().expect("id")).await;
    assert_eq!(delivery(&event, "forger")["outcome"], "handler-failed");

    // A change only a restart applies.
    let text = std::fs::read_to_string(&config).expect("read");
    let changed = text.replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nmax_connections = 1000",
    );
    assert_ne!(text, changed);
    std::fs::write(&config, changed).expect("write");
    let response = reload(&engine).await;
    assert_eq!(response.status().as_u16(), 200);
    let warning = "reload cannot apply this: [server] max_connections changed";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !engine.log_text().contains(warning) {
        assert!(
            Instant::now() < deadline,
            "no warning about the reload at the default filter:\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = engine.log_text();
    engine.kill();
    let lines: Vec<&str> = log.lines().collect();
    // A line is `<time> <level> <target>: …`, with the level padded to five characters.
    let level = |line: &str| line.split_whitespace().nth(1).map(str::to_owned);
    assert!(
        lines
            .iter()
            .all(|l| level(l).is_some_and(|l| l == "WARN" || l == "ERROR")),
        "{log}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains(warning)).count(),
        1,
        "{log}"
    );
    // The handler logged its forgery at info, warn and error: the error alone is shown, in
    // one line, escaped.
    let guest: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("jobhook::guest"))
        .collect();
    assert_eq!(guest.len(), 1, "{log}");
    assert!(guest[0].contains(" ERROR jobhook::guest"), "{log}");
    assert!(
        guest[0].contains("innocent\\n2026-12-02T00:00:00Z  INFO jobhook: forged engine line"),
        "{log}"
    );
    assert!(!log.contains("handler did not succeed"), "{log}");
}

/// Posts `body` with these extra headers; answers the status, the JSON body and whether the
/// answer was marked as a replay.
async fn post_with(engine: &EngineProcess, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = client()
        .post(format!("{}/v1/job-complete", engine.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotency-replayed").is_some();
    let body = response.bytes().await.expect("body");
    let mut json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if replayed {
        json["(replayed)"] = json!(true);
    }
    (status, json)
}

#[tokio::test]
async fn an_idempotency_key_commits_one_event_across_restarts() {
    let setup = Setup::new();
    let config = handler("all", "log-context", "[\"*\"]", "");
    let engine = setup.start(&config);
    let context = context(INVENTORY_TYPE, "Failure");
    let key = "kf-01/spool/0b4b411a-0001";
    let headers = [
        ("idempotency-key", key),
        ("x-jobhook-forwarder", "kf-01.lab"),
    ];

    let (status, first) = post_with(&engine, &context.to_string(), &headers).await;
    assert_eq!(status, 202, "{first}");
    let event_id = first["event_id"].as_str().expect("event id").to_owned();
    assert_eq!(first["deliveries"], json!(["all"]));
    assert!(first.get("(replayed)").is_none());

    // The same event, written differently (field order, whitespace, casing of names and enums):
    // the original answer, nothing new.
    let mut fields: Vec<(String, Value)> = context
        .as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| (k.to_lowercase(), v.clone()))
        .collect();
    fields.reverse();
    let mut rewritten = String::from("{\n");
    for (n, (k, v)) in fields.iter().enumerate() {
        let v = if k == "jobresult" {
            json!("FAILURE")
        } else {
            v.clone()
        };
        let comma = if n + 1 < fields.len() { "," } else { "" };
        rewritten.push_str(&format!("   {}  :  {v}{comma}\n", json!(k)));
    }
    rewritten.push('}');
    let (status, again) = post_with(&engine, &rewritten, &headers).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["event_id"], json!(event_id));
    assert_eq!(again["deliveries"], json!(["all"]));
    assert_eq!(again["(replayed)"], json!(true));

    // The same key with another event: 409, saying so.
    let mut other = context.clone();
    other["CurrentRetryCount"] = json!(99);
    let (status, refused) = post_with(&engine, &other.to_string(), &headers).await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("already used for a different event"),
        "{refused}"
    );

    // Bad keys: 400 with what to fix.
    let too_long = "k".repeat(256);
    for (bad, says) in [
        ("", "empty"),
        (too_long.as_str(), "at most 255"),
        ("two words", "visible ASCII"),
    ] {
        let (status, body) =
            post_with(&engine, &context.to_string(), &[("idempotency-key", bad)]).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(says),
            "{bad:?}: {body}"
        );
    }

    // The forwarder is listed; a name that is not visible ASCII is not recorded.
    let (status, _) = post_with(
        &engine,
        &context.to_string(),
        &[("x-jobhook-forwarder", "bad name")],
    )
    .await;
    assert_eq!(status, 202);
    let (status, text) = get(&engine, "/v1/forwarders").await;
    assert_eq!(status, 200, "{text}");
    let list: Value = serde_json::from_str(&text).expect("JSON");
    let forwarders = list["forwarders"].as_array().expect("list");
    assert_eq!(forwarders.len(), 1, "{list}");
    assert_eq!(forwarders[0]["name"], "kf-01.lab");
    assert_eq!(forwarders[0]["accepted"], 2);
    assert!(forwarders[0]["last_accepted_at"].is_string());
    let (_, metrics) = get(&engine, "/metrics").await;
    assert!(
        metrics.contains("jobhook_ingest_replays_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("jobhook_ingest_key_conflicts_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("jobhook_forwarders_known 1"), "{metrics}");

    // Killed and started again on the same data: the key still holds.
    engine.kill();
    let engine = setup.start(&config);
    let (status, after) = post_with(&engine, &context.to_string(), &headers).await;
    assert_eq!(status, 202, "{after}");
    assert_eq!(after["event_id"], json!(event_id));
    assert_eq!(after["(replayed)"], json!(true));
    let event = settled(&engine, &event_id).await;
    assert_eq!(delivery(&event, "all")["state"], "succeeded");
}

#[tokio::test]
async fn a_reload_reads_the_token_file_again_and_says_what_needs_a_restart() {
    let setup = Setup::new();
    let dir = setup.dir.path();
    std::fs::write(dir.join("token"), "first-token\n").expect("write");
    std::fs::write(dir.join("kf-token"), "kf-first").expect("write");
    let server = "tokens = [{ file = \"token\" }]";
    let keyfactor = "[keyfactor]\nbase_url = \"https://keyfactor.example.com/KeyfactorAPI\"\n\
                     auth = { kind = \"bearer\", token = { file = \"kf-token\" } }\n";
    let write_config = || setup.config_with_server(server, keyfactor);
    let config = write_config();
    let engine = EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &dir.join("engine.log"),
    );
    let body = sample_context_json().to_string();
    let (status, _) = post_raw(&engine, body.clone(), Some("first-token")).await;
    assert_eq!(status, 202);
    let (status, _) = post_raw(&engine, body.clone(), Some("second-token")).await;
    assert_eq!(status, 401);

    // The token file is rewritten and the reload endpoint called (with the old token, which is
    // still the valid one): the new token works, the old one no longer does.
    std::fs::write(dir.join("token"), "second-token\n").expect("write");
    let response = client()
        .post(format!("{}/v1/admin/reload", engine.url))
        .bearer_auth("first-token")
        .send()
        .await
        .expect("reload");
    assert_eq!(response.status().as_u16(), 200);
    let report: Value =
        serde_json::from_str(&response.text().await.expect("report")).expect("report JSON");
    assert_eq!(
        report["secrets_reloaded"],
        json!(["server.tokens"]),
        "{report}"
    );
    assert_eq!(report["restart_required"], json!([]), "{report}");
    let (status, _) = post_raw(&engine, body.clone(), Some("first-token")).await;
    assert_eq!(status, 401);
    let (status, _) = post_raw(&engine, body.clone(), Some("second-token")).await;
    assert_eq!(status, 202);

    // SIGHUP does the same; the Keyfactor credential, which only a start reads, is reported
    // as needing a restart instead of being kept silently.
    std::fs::write(dir.join("token"), "third-token").expect("write");
    std::fs::write(dir.join("kf-token"), "kf-second").expect("write");
    engine.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = post_raw(&engine, body.clone(), Some("third-token")).await;
        if status == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply the new token:\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = post_raw(&engine, body.clone(), Some("second-token")).await;
    assert_eq!(status, 401);
    let log = engine.log_text();
    assert!(
        log.contains("secrets changed on reload and are in use now")
            && log.contains("server.tokens"),
        "{log}"
    );
    assert!(
        log.contains("reload cannot apply this: keyfactor.auth: the secret changed"),
        "{log}"
    );
    for value in [
        "first-token",
        "second-token",
        "third-token",
        "kf-first",
        "kf-second",
    ] {
        assert!(
            !log.contains(value),
            "the log shows a secret value ({value}):\n{log}"
        );
    }

    // A token file that cannot be read refuses the reload; the running tokens stay.
    std::fs::remove_file(dir.join("token")).expect("remove");
    let response = client()
        .post(format!("{}/v1/admin/reload", engine.url))
        .bearer_auth("third-token")
        .send()
        .await
        .expect("reload");
    assert_eq!(response.status().as_u16(), 400);
    let text = response.text().await.expect("text");
    assert!(
        text.contains("server.tokens: cannot read the secret file"),
        "{text}"
    );
    let (status, _) = post_raw(&engine, body, Some("third-token")).await;
    assert_eq!(status, 202);
}

/// One thread of a process as `/proc/<pid>/task/<tid>/stat` shows it.
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct ThreadSample {
    tid: String,
    name: String,
    /// `SCHED_OTHER` 0, `SCHED_BATCH` 3, `SCHED_IDLE` 5 (`sched(7)`).
    policy: u32,
    /// The nice value (0 for a normal thread).
    nice: i64,
    /// User and system CPU time, in clock ticks.
    cpu_ticks: u64,
}

/// Every thread of `pid` now. The name is in parentheses and may hold spaces: the fields after
/// it are counted from its closing parenthesis (`proc(5)`: state is field 3, utime 14, stime 15,
/// nice 19, policy 41).
#[cfg(target_os = "linux")]
fn threads_of(pid: u32) -> Vec<ThreadSample> {
    let mut threads = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir");
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (open, close) = (stat.find('(').expect("("), stat.rfind(')').expect(")"));
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |n: usize| -> i64 { fields[n - 3].parse().expect("numeric field") };
        threads.push(ThreadSample {
            tid: task.file_name().to_string_lossy().into_owned(),
            name: stat[open + 1..close].to_owned(),
            policy: u32::try_from(field(41)).expect("policy"),
            nice: field(19),
            cpu_ticks: u64::try_from(field(14) + field(15)).expect("CPU ticks"),
        });
    }
    threads
}

/// A handler that loops on every event for up to 30 s: a long runner, moved to the idle threads
/// after its first 100 ms of guest code.
#[cfg(target_os = "linux")]
fn spinner() -> String {
    handler(
        "spinner",
        "guest-loop",
        "[\"*\"]",
        "[handlers.limits]\ntimeout_ms = 30000",
    )
}

/// Every thread of the engine while a looping handler runs and ten events are posted, and the
/// one that used the most CPU meanwhile (the epoch ticker aside); `engine` is the `[engine]`
/// section, if any. `ordinary_user`: the engine runs with an ordinary user's scheduling
/// privileges (no CAP_SYS_NICE, an `RLIMIT_NICE` of 0).
#[cfg(target_os = "linux")]
async fn busiest_thread_while_a_handler_spins(
    engine: &str,
    ordinary_user: bool,
) -> (ThreadSample, Vec<ThreadSample>) {
    let setup = Setup::new();
    let body = format!("{engine}\n{}", spinner());
    let engine = if ordinary_user {
        EngineProcess::start_without_cap_sys_nice(
            Path::new(env!("CARGO_BIN_EXE_jobhook")),
            &setup.config(&body),
            &setup.dir.path().join("engine.log"),
        )
    } else {
        setup.start(&body)
    };
    let (status, _) = post(&engine, &sample_context_json()).await;
    assert_eq!(status, 202);
    // Let the delivery start spinning, then see which threads its CPU time lands on while
    // ingest keeps answering.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = threads_of(engine.pid());
    for _ in 0..10 {
        let (status, _) = post(&engine, &context(OTHER_TYPE, "Failure")).await;
        assert_eq!(status, 202);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let used = |t: &ThreadSample| {
        let was = before
            .iter()
            .find(|b| b.tid == t.tid)
            .map_or(0, |b| b.cpu_ticks);
        t.cpu_ticks.saturating_sub(was)
    };
    // At least 50 ms of CPU since `before` (long runners are held to a share of the cores, and
    // at idle priority they get only what the rest of the machine leaves: on a machine busy
    // with other tests that can take longer than the 2 s above, so the count goes on, without
    // more events, for up to 20 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut after = threads_of(engine.pid());
        let busiest = (0..after.len())
            // The epoch ticker's CPU time is its wake-ups every millisecond (on a crowded
            // machine, tens of ms in a few seconds), never a handler's.
            .filter(|&i| after[i].name != EPOCH_THREAD_NAME)
            .max_by_key(|&i| used(&after[i]))
            .expect("threads");
        if used(&after[busiest]) >= 5 {
            return (after.swap_remove(busiest), after);
        }
        assert!(
            Instant::now() < deadline,
            "the spinning handler used no CPU: {after:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A looping handler burns its CPU on the idle threads (`SCHED_IDLE`), where it has moved
/// as a long runner, never on the threads that answer ingest; every thread keeps the
/// scheduling it was started with. Also as an ordinary user runs the engine (no CAP_SYS_NICE,
/// an `RLIMIT_NICE` of 0), which may move a thread to `SCHED_IDLE` but not take it back.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_handler_burns_cpu_on_the_idle_threads_never_on_the_threads_that_answer_ingest() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    const SCHED_IDLE: u32 = 5;
    for ordinary_user in [false, true] {
        let (busiest, others) = busiest_thread_while_a_handler_spins("", ordinary_user).await;
        assert!(
            busiest.name == IDLE_THREAD_NAME && busiest.policy == SCHED_IDLE,
            "the handler's CPU time is on {busiest:?}, not on an idle thread \
             (ordinary user: {ordinary_user}): {others:#?}"
        );
        for t in &others {
            let expected = if t.name == IDLE_THREAD_NAME {
                SCHED_IDLE
            } else if t.name.starts_with("jobhook-deliver") {
                SCHED_BATCH
            } else {
                // The API's workers that answered the events above, the store's writer and
                // syncer.
                SCHED_OTHER
            };
            assert_eq!(t.policy, expected, "ordinary user: {ordinary_user}: {t:?}");
        }
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn with_sandbox_threads_a_handler_starts_on_them_at_nice_10() {
    let (busiest, others) =
        busiest_thread_while_a_handler_spins("[engine]\nsandbox_threads = 1\n", false).await;
    // It ran its first 100 ticks of guest code on the sandbox thread, then moved to the idle
    // threads. Ticks are counted while the guest runs, not by its CPU time: on a crowded
    // machine those ticks may hold little CPU, but a sandbox thread that never ran it has none.
    let sandbox: Vec<&ThreadSample> = others
        .iter()
        .filter(|t| t.name.starts_with("jobhook-sandbox"))
        .collect();
    assert!(
        !sandbox.is_empty() && sandbox.iter().all(|t| t.nice == 10),
        "{others:#?}"
    );
    assert!(
        sandbox.iter().map(|t| t.cpu_ticks).sum::<u64>() >= 1,
        "the handler did not start on the sandbox thread: {others:#?}"
    );
    assert_eq!(busiest.name, IDLE_THREAD_NAME, "{busiest:?}; {others:#?}");
    // The threads that answer ingest keep the normal nice value.
    for t in others.iter().filter(|t| !t.name.starts_with("jobhook-")) {
        assert_eq!(t.nice, 0, "{t:?}");
    }
}

/// An engine whose every change of a thread's scheduling policy is refused (a container's
/// seccomp profile may refuse `sched_setscheduler`) says so in its log and runs every thread as
/// a normal one: long runners still move to the idle threads, at the normal policy, and
/// deliveries go on.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[tokio::test]
async fn an_engine_refused_every_scheduling_change_says_so_and_still_delivers() {
    const SCHED_OTHER: u32 = 0;
    let setup = Setup::new();
    let config = setup.config(&format!(
        "{}{}",
        handler("log", "log-context", "[\"*\"]", ""),
        spinner(),
    ));
    let engine = EngineProcess::start_with_scheduling_refused(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &setup.dir.path().join("engine.log"),
    );
    let (status, body) = post(&engine, &sample_context_json()).await;
    assert_eq!(status, 202, "{body}");
    let id = body["event_id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = get(&engine, &format!("/v1/events/{id}")).await;
        assert_eq!(status, 200, "{text}");
        let event: Value = serde_json::from_str(&text).expect("event JSON");
        if delivery(&event, "log")["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered: {event:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Well past the 100 ms of guest code after which the spinner moves.
    let deadline = Instant::now() + Duration::from_secs(20);
    let threads = loop {
        let threads = threads_of(engine.pid());
        if threads.iter().any(|t| t.name == IDLE_THREAD_NAME) {
            break threads;
        }
        assert!(Instant::now() < deadline, "no idle thread: {threads:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for t in &threads {
        assert_eq!(t.policy, SCHED_OTHER, "{t:?}");
    }
    let log = engine.log_text();
    assert!(
        log.contains("threads cannot be scheduled as Batch")
            && log.contains("they run as normal threads"),
        "{log}"
    );
}

/// A path that is no endpoint, or an endpoint asked with another method, is answered in JSON
/// like every other error, listing the endpoints, and the path asked is not echoed.
#[tokio::test]
async fn unknown_paths_and_methods_are_answered_in_json_naming_the_endpoints() {
    let setup = Setup::new();
    let engine = setup.start(&handler("all", "log-context", "[\"*\"]", ""));
    let answer = client()
        .get(format!("{}/nope%0d%0aX-Injected:1", engine.url))
        .send()
        .await
        .expect("send");
    assert_eq!(answer.status().as_u16(), 404);
    let body: Value = serde_json::from_str(&answer.text().await.expect("text")).expect("json");
    let text = body["error"].as_str().expect("error");
    assert!(text.contains("POST /v1/job-complete"), "{text}");
    assert!(
        !text.contains("nope") && !text.contains("Injected"),
        "{text}"
    );
    let answer = client()
        .get(format!("{}/v1/job-complete", engine.url))
        .send()
        .await
        .expect("send");
    assert_eq!(answer.status().as_u16(), 405);
    let body: Value = serde_json::from_str(&answer.text().await.expect("text")).expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not take that method")),
        "{body}"
    );
}

/// When the ready line is printed, SIGHUP, SIGTERM and SIGINT are already caught: a reload or
/// a stop asked for as soon as the engine says it is ready is a reload or a graceful stop, not
/// the signal's default action ending the process. Checked in the kernel's view of the
/// process (`SigCgt`) right at the ready line, and by a SIGHUP then a SIGTERM sent at once,
/// which must end in exit status 0; with one async worker, as a small machine has.
#[tokio::test]
async fn signals_are_caught_by_the_time_the_engine_says_it_is_ready() {
    for round in 0..5 {
        let setup = Setup::new();
        let config = setup.config(&handler("all", "log-context", "[\"*\"]", ""));
        let engine = EngineProcess::start_with_env(
            Path::new(env!("CARGO_BIN_EXE_jobhook")),
            &config,
            &setup.dir.path().join("engine.log"),
            &[("TOKIO_WORKER_THREADS", "1")],
        );
        let status = std::fs::read_to_string(format!("/proc/{}/status", engine.pid()))
            .expect("/proc status");
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .expect("SigCgt");
        for (name, number) in [("SIGHUP", 1), ("SIGINT", 2), ("SIGTERM", 15)] {
            assert!(
                caught & (1 << (number - 1)) != 0,
                "round {round}: {name} is not caught at the ready line (SigCgt {caught:x})"
            );
        }
        engine.hangup();
        let exit = engine.terminate(Duration::from_secs(60));
        assert!(exit.is_some_and(|s| s.success()), "round {round}: {exit:?}");
    }
}

/// Sets `path`'s permission bits to `mode`.
fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
}
