//! The JobHistory poller against the Keyfactor stand-in, which is as strict as Command about
//! query fields: paging, the durable cursor (a restart neither loses nor repeats a job, rows
//! that share a timestamp or show up late inside the overlap window), unfinished and stale
//! rows, first start without backfill (and jobs still running then), a cursor left by an older
//! jobhook, starts ahead of the clock (the position stays at the poll's time; the row is
//! delivered once, also after the clock has passed it), and API errors that leave the cursor
//! alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{Duration as Age, Utc};
use jobhook::capabilities::Services;
use jobhook::capabilities::keyfactor::auth::AuthConfig;
use jobhook::capabilities::keyfactor::{KeyfactorClient, KeyfactorConfig};
use jobhook::metrics::Metrics;
use jobhook::queue::dispatch::{Dispatcher, RegisteredHandler, Registry};
use jobhook::queue::registration::JobTypes;
use jobhook::queue::store::sqlite::SqliteStore;
use jobhook::queue::store::{DeliveryState, EventStore};
use jobhook::secret::SecretRef;
use jobhook::sources::poller::{CURSOR, Cursor, OVERLAP, Poller, PollerConfig};
use jobhook::sources::store_health::StoreHealth;
use jobhook::{Engine, LoadOptions, SandboxSpec, SandboxedHandler};
use jobhook_testkit::guest_bytes;
use jobhook_testkit::standin::data::{result_number, status_number};
use jobhook_testkit::standin::{Dataset, Standin, StandinConfig};
use serde_json::{Value, json};

fn row(id: i64, status: &str, result: &str, started: chrono::DateTime<Utc>) -> Value {
    json!({
        "JobHistoryId": id,
        "AgentMachine": "orchestrator.kftrain.lab",
        "JobId": format!("0b4b411a-2a4c-4c55-9d0e-{id:012}"),
        "JobType": "WinCertInventory",
        "OperationStart": started.format("%Y-%m-%dT%H:%M:%S").to_string(),
        "OperationEnd": null,
        "Message": "",
        "Result": result_number(result),
        "Status": status_number(status),
        "StorePath": "My",
        "ClientMachine": "iistarget.kftrain.lab",
    })
}

async fn standin(rows: Vec<Value>) -> Standin {
    let mut data = Dataset::seeded();
    data.job_history = rows;
    Standin::start_with(StandinConfig {
        data,
        ..StandinConfig::default()
    })
    .await
    .expect("stand-in")
}

fn client(standin: &Standin, password_file: &Path, password: &str) -> Arc<KeyfactorClient> {
    std::fs::write(password_file, password).expect("write password");
    let auth = AuthConfig::Basic {
        username: standin.credentials().username.clone(),
        password: SecretRef::File(password_file.to_path_buf()),
    };
    Arc::new(
        KeyfactorClient::from_config(&KeyfactorConfig::new(standin.base_url(), auth))
            .expect("client"),
    )
}

/// The guest `guest` loaded with `spec` and registered, through the engine's own configuration
/// parser, for every job type (`job_types = ["*"]`) under the spec's name.
async fn registered_for_every_job_type(
    engine: &Engine,
    services: &Services,
    guest: &str,
    spec: SandboxSpec,
    dir: &Path,
) -> Arc<RegisteredHandler> {
    let name = spec.name.to_string();
    let handler = SandboxedHandler::load(
        engine,
        services,
        guest_bytes(guest),
        spec,
        &LoadOptions::default(),
    )
    .await
    .expect("load");
    let config = jobhook::app::config::Config::parse(
        &format!(
            "[[handlers]]\nname = \"{name}\"\ncomponent = \"{}\"\njob_types = [\"*\"]\n",
            jobhook_testkit::guest(guest).display()
        ),
        &dir.join("jobhook.toml"),
    )
    .expect("config");
    let registration = config.handlers[0].clone();
    assert_eq!(registration.job_types, JobTypes::All);
    Arc::new(RegisteredHandler::new(
        registration,
        handler,
        config.quarantine.clone(),
    ))
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<dyn EventStore>,
    dispatcher: Arc<Dispatcher>,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn EventStore> =
            Arc::new(SqliteStore::open(&dir.path().join("data")).expect("store"));
        // One handler for every job type, so each event gets exactly one (pending) delivery.
        let engine = Engine::new(4).expect("engine");
        let registry = Registry::new([registered_for_every_job_type(
            &engine,
            &Services::default(),
            "log-context",
            SandboxSpec::new("all"),
            dir.path(),
        )
        .await]);
        let dispatcher = Dispatcher::new(Arc::clone(&store), registry, Arc::new(Metrics::new()), 4);
        Fixture {
            dir,
            store,
            dispatcher,
        }
    }

    fn poller(&self, client: Arc<KeyfactorClient>, config: PollerConfig) -> Poller {
        Poller::new(
            config,
            client,
            Arc::clone(&self.store),
            Arc::clone(&self.dispatcher),
        )
        .expect("poller")
    }

    fn events(&self) -> u64 {
        self.store
            .count_by_state()
            .expect("counts")
            .into_iter()
            .filter(|(s, _)| *s == DeliveryState::Pending)
            .map(|(_, n)| n)
            .sum()
    }

    /// A connection of its own to the store's SQLite database, for reading what it holds.
    fn database(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(
            self.dir
                .path()
                .join("data")
                .join(jobhook::queue::store::sqlite::DATABASE_FILE),
        )
        .expect("open the store's database")
    }

    fn cursor(&self) -> Option<String> {
        self.store.cursor(CURSOR).expect("cursor")
    }

    /// Lets `by` pass on the poller's clock: every time the stored cursor holds moves back by
    /// `by`, as the rows of the next stand-in do (which the caller builds from `now - by`).
    /// Times in the cursor and in JobHistory are absolute, so moving both back is the same to
    /// the poller as its clock moving on.
    fn age_cursor(&self, by: Age) {
        let text = self.cursor().expect("a cursor");
        let mut cursor = Cursor::parse(&text).expect("readable cursor");
        cursor.since = cursor.since.map(|t| t - by);
        cursor.horizon = cursor.horizon.map(|t| t - by);
        for start in cursor.seen.values_mut() {
            *start -= by;
        }
        self.store
            .insert_events_with_cursor(&[], CURSOR, &cursor.to_text())
            .expect("aged cursor");
    }

    /// The ids the stored cursor remembers.
    fn seen(&self) -> Vec<i64> {
        let text = self.cursor().expect("a cursor");
        Cursor::parse(&text)
            .expect("readable cursor")
            .seen
            .keys()
            .copied()
            .collect()
    }
}

/// Polls until the poller has nothing more to read at once; the events committed.
async fn poll_all(poller: &Poller) -> usize {
    let mut total = 0;
    for _ in 0..20 {
        let report = poller.poll_once().await.expect("poll");
        total += report.events;
        if !report.more {
            return total;
        }
    }
    panic!("the poller kept finding more")
}

/// The job results of the events stored, sorted.
fn stored_results(f: &Fixture) -> Vec<String> {
    let db = f.database();
    let mut results: Vec<String> = db
        .prepare("SELECT context FROM events")
        .expect("prepare")
        .query_map([], |r| r.get::<_, String>(0))
        .expect("query")
        .map(|t| {
            let context: Value = serde_json::from_str(&t.expect("row")).expect("JSON");
            context["JobResult"].as_str().unwrap_or("?").to_owned()
        })
        .collect();
    results.sort();
    results
}

fn config(page_size: u32, backfill: bool) -> PollerConfig {
    let mut job_types = BTreeMap::new();
    job_types.insert(
        "WinCertInventory".to_owned(),
        "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f".to_owned(),
    );
    PollerConfig {
        page_size,
        backfill,
        job_types,
        ..PollerConfig::default()
    }
}

#[tokio::test]
async fn finished_jobs_become_events_exactly_once_across_restarts() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");

    // 103 is still running: the cursor must stop before it.
    let first = standin(vec![
        row(101, "Completed", "Success", now),
        row(102, "CompletedWillRetry", "Failure", now),
        row(103, "InProcess", "Unknown", now),
        row(104, "Completed", "Success", now),
    ])
    .await;
    let poller = f.poller(
        client(&first, &pw, &first.credentials().password),
        config(2, true),
    );
    let report = poller.poll_once().await.expect("poll");
    assert_eq!((report.events, report.more), (2, true));
    let ids: Vec<i64> = report.cursor.seen.keys().copied().collect();
    assert_eq!(ids, [101, 102]);
    let report = poller.poll_once().await.expect("poll");
    assert_eq!((report.events, report.more), (0, false));
    assert_eq!(f.events(), 2);
    assert_eq!(f.seen(), [101, 102], "103 is unfinished: not remembered");

    // The requests follow Keyfactor's conventions and use documented query fields only.
    let requests = first.api_requests();
    let last = requests.last().expect("requests");
    let since = Cursor::parse(&f.cursor().expect("cursor"))
        .expect("cursor")
        .since
        .expect("since");
    assert_eq!(
        last.query_value("pq.queryString"),
        Some(format!(
            "OperationStart -ge \"{}\"",
            (since - OVERLAP).format("%Y-%m-%dT%H:%M:%S")
        ))
    );
    assert_eq!(
        last.query_value("pq.sortField").as_deref(),
        Some("OperationStart")
    );
    assert_eq!(last.query_value("pq.sortAscending").as_deref(), Some("0"));
    assert_eq!(last.header("x-keyfactor-requested-with"), Some("APIClient"));
    for request in &requests {
        let query = request.query.as_deref().unwrap_or_default();
        assert!(!query.contains("JobHistoryId"), "{query}");
    }

    // A restart (new poller, same store) against the updated history: 103 finished, 105 new.
    let second = standin(vec![
        row(101, "Completed", "Success", now),
        row(102, "CompletedWillRetry", "Failure", now),
        row(103, "Completed", "Warning", now),
        row(104, "Completed", "Success", now),
        row(105, "Completed", "Failure", now),
    ])
    .await;
    let poller = f.poller(
        client(&second, &pw, &second.credentials().password),
        config(2, true),
    );
    let mut total = 0;
    for _ in 0..5 {
        let report = poller.poll_once().await.expect("poll");
        total += report.events;
        if !report.more {
            break;
        }
    }
    assert_eq!(total, 3);
    assert_eq!(f.seen(), [101, 102, 103, 104, 105]);
    assert_eq!(f.events(), 5, "each finished job exactly once");
    let metrics = f.dispatcher.metrics().render(
        Some(&jobhook::metrics::StoreCounts {
            by_state: &[],
            pending_by_handler: &[],
            failed_by_handler: &[],
        }),
        0,
    );
    assert!(
        metrics.contains("jobhook_events_accepted_total{source=\"poller\"} 5"),
        "{metrics}"
    );
    // Nothing new: nothing committed.
    assert_eq!(poller.poll_once().await.expect("poll").events, 0);
    assert_eq!(f.events(), 5);
}

/// JobHistory rows whose `Result` and `Status` are names, as Command 10's own trace shows them
/// (`"Result":"Success","Status":"Completed"`; its API spec declares numbers): the same events,
/// with the same job results, as rows with numbers.
#[tokio::test]
async fn rows_with_result_and_status_as_names_become_the_same_events() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let named = |id: i64, status: &str, result: &str| {
        let mut r = row(id, status, result, now);
        r["Status"] = json!(status);
        r["Result"] = json!(result);
        r
    };
    let s = standin(vec![
        named(201, "Completed", "Failure"),
        named(202, "CompletedWillRetry", "Warning"),
        named(203, "Completed", "Success"),
        named(204, "InProcess", "Unknown"),
    ])
    .await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(report.events, 3, "{report:?}");
    assert!(!report.cursor.seen.contains_key(&204), "204 is unfinished");
    let claims = f
        .store
        .claim_batch(
            Utc::now(),
            &jobhook::queue::store::ClaimLimits::any(10),
            std::time::Duration::from_secs(60),
        )
        .expect("claims");
    let mut results: Vec<&str> = claims
        .iter()
        .map(|c| c.context.as_ref().expect("context").job_result.name())
        .collect();
    results.sort_unstable();
    assert_eq!(results, ["Failure", "Success", "Warning"]);
}

#[tokio::test]
async fn polled_events_get_ids_that_sort_in_the_order_they_were_stored() {
    // As the API's do (host/tests/serve.rs): the store's indexes by event id grow at one end.
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");
    let rows = (201..=206)
        .map(|id| row(id, "Completed", "Success", now))
        .collect();
    let standin = standin(rows).await;
    let poller = f.poller(
        client(&standin, &pw, &standin.credentials().password),
        config(10, true),
    );
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(report.events, 6);
    let db = f.database();
    let ids: Vec<String> = db
        .prepare("SELECT id FROM events ORDER BY rowid")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("ids");
    assert_eq!(ids.len(), 6);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
}

/// Hostile or broken JobHistory rows cost only themselves: a start at .NET's
/// `DateTime.MaxValue` does not move the poller past every job still to come, a start with a
/// negative year does not panic it, and a row whose text is longer than ingest accepts is
/// skipped rather than handed to handlers.
#[tokio::test]
async fn a_row_from_year_9999_or_with_oversized_text_does_not_stop_the_poller() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let mut forever = row(10, "Completed", "Success", now - Age::minutes(2));
    forever["OperationStart"] = json!("9999-12-31T23:59:59");
    let mut negative = row(11, "Completed", "Success", now - Age::minutes(2));
    negative["OperationStart"] = json!("-262143-01-01T00:00:00");
    let mut huge = row(12, "Completed", "Success", now - Age::minutes(2));
    huge["JobType"] = json!("x".repeat(5000));
    let first = vec![
        row(8, "Completed", "Success", now - Age::minutes(3)),
        forever,
        negative,
        huge,
    ];
    let s = standin(first.clone()).await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    let report = poller.poll_once().await.expect("poll");
    // 8, 10 and 11 are jobs (10 and 11 without a usable start); 12 is skipped.
    assert_eq!(report.events, 3, "{report:?}");
    assert_eq!(f.events(), 3);
    for id in [8, 10, 11, 12] {
        assert!(report.cursor.seen.contains_key(&id), "{id}: {report:?}");
    }
    let since = report.cursor.since.expect("a position");
    assert!(since <= now, "the position moved to {since}");

    // A job that finishes later is still found (a new stand-in with one more row, the same
    // store and cursor).
    let mut later = first;
    later.push(row(13, "Completed", "Success", now));
    let s = standin(later).await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(report.events, 1, "{report:?}");
    assert!(report.cursor.seen.contains_key(&13));
    assert_eq!(f.events(), 4);
}

/// An unfinished row without a usable start never becomes stale, so the poller does not wait
/// for it: one far ahead (9999-12-31, as .NET's `DateTime.MaxValue` reads) is passed over and
/// turned into an event once it has finished (every later query still finds it); one with no
/// start or a start before 1970, which no later query can find, is handled at once.
#[tokio::test]
async fn an_unfinished_job_without_a_usable_start_does_not_stop_the_poller() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let mut forever = row(20, "InProcess", "Unknown", now - Age::minutes(3));
    forever["OperationStart"] = json!("9999-12-31T23:59:59");
    let mut none = row(21, "InProcess", "Unknown", now - Age::minutes(3));
    none["OperationStart"] = Value::Null;
    let mut ancient = row(23, "InProcess", "Unknown", now - Age::minutes(3));
    ancient["OperationStart"] = json!("1601-01-01T00:00:00");
    let first = vec![
        row(19, "Completed", "Success", now - Age::minutes(4)),
        forever.clone(),
        none,
        ancient,
        row(22, "Completed", "Failure", now - Age::minutes(2)),
    ];
    let s = standin(first.clone()).await;
    let pw = f.dir.path().join("pw");
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(report.events, 2, "19 and 22: {report:?}");
    assert!(report.cursor.seen.contains_key(&22), "{report:?}");
    assert!(!report.cursor.seen.contains_key(&20), "{report:?}");
    for handled in [21, 23] {
        assert!(
            report.cursor.seen.contains_key(&handled),
            "{handled}: {report:?}"
        );
    }

    // 20 finishes (its start still unusable): it is found and becomes an event.
    let mut later = first;
    later[1]["Status"] = json!(status_number("Completed"));
    later[1]["Result"] = json!(result_number("Failure"));
    let s = standin(later).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(report.events, 1, "{report:?}");
    assert!(report.cursor.seen.contains_key(&20), "{report:?}");
    assert_eq!(f.events(), 3);
}

#[tokio::test]
async fn a_stale_unfinished_job_does_not_hold_the_cursor_forever() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let s = standin(vec![
        row(7, "InProcess", "Unknown", now - Age::days(3)),
        row(8, "Completed", "Success", now),
        row(9, "Waiting", "Unknown", now),
    ])
    .await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(report.events, 1);
    assert!(report.cursor.seen.contains_key(&8));
    assert!(
        !report.cursor.seen.contains_key(&9),
        "9 is waiting: read again"
    );
    assert_eq!(poller.poll_once().await.expect("poll").events, 0);
    assert_eq!(f.events(), 1);
}

#[tokio::test]
async fn first_start_without_backfill_begins_after_the_newest_job() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let s = standin(
        (1..=30)
            .map(|id| row(id, "Completed", "Success", now))
            .collect(),
    )
    .await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, false),
    );
    let report = poller.poll_once().await.expect("poll");
    assert_eq!((report.events, report.cursor.floor), (0, Some(30)));
    assert_eq!(poller.poll_once().await.expect("poll").events, 0);
    assert_eq!(f.events(), 0);
}

#[tokio::test]
async fn api_errors_leave_the_cursor_alone() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let s = standin(vec![row(1, "Completed", "Success", now)]).await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), "wrong-password"),
        config(10, true),
    );
    let error = poller
        .poll_once()
        .await
        .expect_err("401 is an error")
        .to_string();
    assert!(error.contains("401"), "{error}");
    assert!(
        error.contains("the Keyfactor API refused the credential: check [keyfactor.auth]"),
        "{error}"
    );
    assert!(!error.contains("wrong-password"), "{error}");
    assert_eq!(f.cursor(), None);
    assert_eq!(f.events(), 0);
}

/// A store that cannot take the events a poll found — another connection holds SQLite's write
/// lock, as an operator's `sqlite3` shell in a transaction does — is told where `/healthz` reads
/// it: the poll fails and the store is reported not taking events, with the reason's word; once
/// the lock is gone the next poll commits them, and the store takes events again, the refusal
/// still told. On a node that only polls, nothing else would say it.
#[tokio::test]
async fn a_store_refusing_polled_events_is_told_where_healthz_reads_it() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let s = standin(vec![row(1, "Completed", "Success", now)]).await;
    let health = Arc::new(StoreHealth::default());
    let poller = f
        .poller(
            client(&s, &f.dir.path().join("pw"), &s.credentials().password),
            config(10, true),
        )
        .reporting_to(Arc::clone(&health));
    let shell = f.database();
    shell
        .execute_batch("BEGIN IMMEDIATE")
        .expect("hold the write lock");
    let error = poller.poll_once().await.expect_err("the store is locked");
    assert!(error.to_string().starts_with("store: "), "{error}");
    let report = health.report();
    assert!(!report.taking_events, "{report:?}");
    assert_eq!(report.last_refusal.map(|r| r.reason), Some("error"));
    assert_eq!(f.events(), 0);

    shell.execute_batch("ROLLBACK").expect("let go");
    assert_eq!(poll_all(&poller).await, 1);
    let report = health.report();
    assert!(report.taking_events, "{report:?}");
    assert!(report.last_refusal.is_some(), "still told: {report:?}");
    assert_eq!(f.events(), 1);
}

#[tokio::test]
async fn the_strict_standin_refuses_job_history_id_like_command() {
    let s = standin(vec![row(1, "Completed", "Success", Utc::now())]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client(&s, &dir.path().join("pw"), &s.credentials().password);
    let grant = jobhook::capabilities::keyfactor::KeyfactorGrant::read_only(&["OrchestratorJobs/"])
        .expect("grant");
    for query in [
        ("pq.queryString", "JobHistoryId -gt 0"),
        ("pq.sortField", "JobHistoryId"),
    ] {
        let response = client
            .send(
                &grant,
                jobhook::bindings::jobhook::handler::keyfactor::Request {
                    method: jobhook::bindings::types::Method::Get,
                    path: "OrchestratorJobs/JobHistory".into(),
                    query: vec![(query.0.into(), query.1.into())],
                    headers: Vec::new(),
                    body: None,
                },
            )
            .await
            .expect("answer");
        assert_eq!(response.status, 400, "{query:?}");
        let body = String::from_utf8_lossy(&response.body);
        assert!(body.contains("JobHistoryId"), "{body}");
    }
}

#[tokio::test]
async fn rows_sharing_a_second_or_showing_up_late_are_neither_lost_nor_repeated() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");
    // Five jobs in the same second, read two at a time.
    let same: Vec<Value> = (1..=5)
        .map(|id| row(id, "Completed", "Success", now))
        .collect();
    let s = standin(same.clone()).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(2, true));
    let mut total = 0;
    for _ in 0..10 {
        let report = poller.poll_once().await.expect("poll");
        total += report.events;
        if !report.more {
            break;
        }
    }
    assert_eq!(total, 5);
    // A row that started a minute earlier becomes visible only now (a late commit).
    let mut late = same;
    late.push(row(6, "Completed", "Failure", now - Age::minutes(1)));
    let s = standin(late).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(2, true));
    let mut total = 0;
    for _ in 0..10 {
        let report = poller.poll_once().await.expect("poll");
        total += report.events;
        if !report.more {
            break;
        }
    }
    assert_eq!(total, 1, "only the late row");
    assert_eq!(f.events(), 6);
}

#[tokio::test]
async fn a_cursor_from_an_older_jobhook_is_honoured() {
    let now = Utc::now();
    let f = Fixture::new().await;
    // An older jobhook stored the highest JobHistoryId it had turned into events.
    f.store
        .insert_events_with_cursor(&[], CURSOR, "102")
        .expect("old cursor");
    let s = standin(
        (100..=105)
            .map(|id| row(id, "Completed", "Success", now))
            .collect(),
    )
    .await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    assert_eq!(poller.poll_once().await.expect("poll").events, 3);
    assert_eq!(poller.poll_once().await.expect("poll").events, 0);
    assert_eq!(f.events(), 3);
    assert_eq!(f.seen(), [100, 101, 102, 103, 104, 105]);
}

#[tokio::test]
async fn an_unreadable_cursor_is_an_error_not_a_restart_from_scratch() {
    let f = Fixture::new().await;
    f.store
        .insert_events_with_cursor(&[], CURSOR, "{\"since\": 5}")
        .expect("cursor");
    let s = standin(vec![row(1, "Completed", "Success", Utc::now())]).await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    let error = poller
        .poll_once()
        .await
        .expect_err("unreadable")
        .to_string();
    assert!(error.contains("cursor"), "{error}");
    assert_eq!(f.events(), 0);
}

/// A failing recurring job: `count` runs, each failed and rescheduled by Command (Status 5,
/// CompletedWillRetry), except the last, which failed for good (Status 3).
fn failing_runs(first_id: i64, count: i64, started: chrono::DateTime<Utc>) -> Vec<Value> {
    (0..count)
        .map(|n| {
            let status = if n + 1 == count {
                "Completed"
            } else {
                "CompletedWillRetry"
            };
            let mut r = row(
                first_id + n,
                status,
                "Failure",
                started + Age::minutes(n * 5),
            );
            r["JobId"] = json!("7a07f123-8d4e-4c5b-9f60-1b2c3d4e5f60");
            r["JobType"] = json!("PEMInventory");
            r["Message"] = json!("Unable to open the store file: permission denied");
            r
        })
        .collect()
}

#[tokio::test]
async fn retries_agent_and_request_time_come_from_the_api_and_the_mail_example_fires() {
    use jobhook::capabilities::Grants;
    use jobhook::capabilities::mail::{MailConfig, MailGrant, MailTransport};
    use jobhook::capabilities::properties::Properties;

    let started = Utc::now() - Age::minutes(30);
    let s = standin(failing_runs(500, 3, started)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(&dir.path().join("data")).expect("store"));
    let outbox = dir.path().join("outbox");
    let services = Services {
        mail: Some(Arc::new(
            MailTransport::from_config(
                &MailConfig::outbox("jobhook@example.com", &outbox).expect("mail config"),
                dir.path(),
            )
            .expect("transport"),
        )),
        ..Services::default()
    };
    let engine = Engine::new(2).expect("engine");
    let mut spec = SandboxSpec::new("mailer");
    spec.properties = Properties::new(
        [
            ("RetryThreshold", "1"),
            ("EmailRecipients", "pki-team@example.com"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>(),
    );
    spec.grants = Grants {
        mail: Some(MailGrant::to(&["pki-team@example.com"]).expect("grant")),
        ..Grants::default()
    };
    let registry = Registry::new([registered_for_every_job_type(
        &engine,
        &services,
        "repeated-failure-email",
        spec,
        dir.path(),
    )
    .await]);
    let dispatcher = Dispatcher::new(Arc::clone(&store), registry, Arc::new(Metrics::new()), 2);
    let poller = Poller::new(
        config_of(10),
        client(&s, &dir.path().join("pw"), &s.credentials().password),
        Arc::clone(&store),
        Arc::clone(&dispatcher),
    )
    .expect("poller");
    assert_eq!(poller.poll_once().await.expect("poll").events, 3);

    // The contexts as stored: retries 0, 1, 2; AgentId and Username from GET /Agents; the
    // request time of a retry is the first run's start.
    let db = rusqlite::Connection::open(
        dir.path()
            .join("data")
            .join(jobhook::queue::store::sqlite::DATABASE_FILE),
    )
    .expect("open the database");
    let messages: Vec<Option<String>> = db
        .prepare("SELECT message FROM events")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .map(|m| m.expect("row"))
        .collect();
    assert_eq!(
        messages,
        vec![Some("Unable to open the store file: permission denied".to_owned()); 3],
        "JobHistory's Message is kept with each event"
    );
    let mut contexts: Vec<Value> = db
        .prepare("SELECT context FROM events")
        .expect("query")
        .query_map([], |r| r.get::<_, String>(0))
        .expect("rows")
        .map(|t| serde_json::from_str(&t.expect("row")).expect("JSON"))
        .collect();
    drop(db);
    contexts.sort_by_key(|c| c["CurrentRetryCount"].as_i64());
    let retries: Vec<i64> = contexts
        .iter()
        .map(|c| c["CurrentRetryCount"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(retries, [0, 1, 2]);
    for c in &contexts {
        assert_eq!(
            c["AgentId"],
            json!(jobhook_testkit::standin::data::AGENT_ID),
            "{c}"
        );
        assert_eq!(c["Username"], json!("KFTRAIN\\SVC_Orchestrator"), "{c}");
        assert_eq!(
            c["RequestTimestamp"].as_str().map(|t| t.get(..16)),
            Some(Some(started.format("%Y-%m-%dT%H:%M").to_string().as_str())),
            "{c}"
        );
    }
    assert!(
        s.api_requests()
            .iter()
            .any(|r| r.path == "/KeyfactorAPI/Agents"),
        "GET /Agents was asked"
    );
    let agent_reads = s
        .api_requests()
        .iter()
        .filter(|r| r.path == "/KeyfactorAPI/Agents")
        .count();
    assert_eq!(agent_reads, 1, "the agent list is cached");

    // The example mails for the runs with CurrentRetryCount >= 1: two mails.
    let running = tokio::spawn(Arc::clone(&dispatcher).run(std::time::Duration::from_secs(5)));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mails = loop {
        let mails: Vec<_> = std::fs::read_dir(&outbox)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if mails.len() >= 2 || std::time::Instant::now() > deadline {
            break mails;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    dispatcher.stop();
    let _ = running.await;
    let mails: Vec<_> = std::fs::read_dir(&outbox)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or(mails);
    assert_eq!(mails.len(), 2, "{mails:?}");
    let texts: Vec<String> = mails
        .iter()
        .map(|m| std::fs::read_to_string(m).expect("mail"))
        .collect();
    assert!(
        texts
            .iter()
            .all(|t| t.contains("Subject: Orchestrator PEMInventory Job Failed")),
        "{texts:?}"
    );
    assert!(texts.iter().any(|t| t.contains("Retries: 2")), "{texts:?}");
    // JobHistory's Message reached the handler through delivery.message and is in the mail.
    assert!(
        texts
            .iter()
            .all(|t| t.contains("Unable to open the store file: permission denied")),
        "{texts:?}"
    );
}

fn config_of(page_size: u32) -> PollerConfig {
    config(page_size, true)
}

/// A finished row whose `OperationStart` lies two hours ahead (a Command server or orchestrator
/// with a wrong clock) becomes an event, but the cursor's position stays at the poll's own time:
/// jobs with correct clocks finished afterwards are still found, and the row ahead is not
/// delivered again once the clock catches up with it and passes it.
#[tokio::test]
async fn a_start_ahead_of_the_clock_does_not_move_the_cursor_past_later_jobs() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");
    // The history as it stands when the poller's clock reads `at`.
    let history = |at: chrono::DateTime<Utc>, later: &[i64]| {
        let mut rows = vec![
            row(1, "Completed", "Success", at - Age::minutes(1)),
            row(2, "Completed", "Failure", at + Age::hours(2)),
        ];
        rows.extend(
            later
                .iter()
                .map(|&id| row(id, "Completed", "Warning", at + Age::seconds(id))),
        );
        rows
    };
    let s = standin(history(now, &[])).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    assert_eq!(poll_all(&poller).await, 2);
    let since = Cursor::parse(&f.cursor().expect("cursor"))
        .expect("cursor")
        .since
        .expect("a position");
    assert!(since <= Utc::now(), "the position moved ahead to {since}");

    // Two jobs with correct clocks finish afterwards: both become events, 2 is not repeated.
    let s = standin(history(now, &[3, 4])).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    assert_eq!(poll_all(&poller).await, 2);
    assert_eq!(f.events(), 4);

    // The clock catches up with 2 (now five minutes in the past), then passes it by more than
    // the overlap; each time one new job: only that one becomes an event.
    let mut at = now;
    for (id, passed) in [(5, Age::hours(2) + Age::minutes(5)), (6, OVERLAP * 2)] {
        f.age_cursor(passed);
        at -= passed;
        let s = standin(history(at, &[3, 4, id])).await;
        let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
        assert_eq!(poll_all(&poller).await, 1, "only {id}");
        assert_eq!(poll_all(&poller).await, 0);
    }
    assert_eq!(f.events(), 6, "each job exactly once");
}

/// A cursor whose position an earlier jobhook moved ahead of the clock (following a start
/// ahead) is brought back to the poll's time, so jobs started since are found.
#[tokio::test]
async fn a_cursor_left_ahead_of_the_clock_is_brought_back() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let mut ahead = Cursor {
        since: Some(now + Age::hours(2)),
        ..Cursor::default()
    };
    ahead.seen.insert(2, now + Age::hours(2));
    f.store
        .insert_events_with_cursor(&[], CURSOR, &ahead.to_text())
        .expect("cursor");
    let s = standin(vec![
        row(2, "Completed", "Failure", now + Age::hours(2)),
        row(3, "Completed", "Success", now),
        row(4, "Completed", "Success", now),
    ])
    .await;
    let poller = f.poller(
        client(&s, &f.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    assert_eq!(poll_all(&poller).await, 2, "3 and 4, not 2 again");
    assert_eq!(poll_all(&poller).await, 0);
    let since = Cursor::parse(&f.cursor().expect("cursor"))
        .expect("cursor")
        .since
        .expect("a position");
    assert!(since <= Utc::now(), "the position stayed ahead at {since}");
}

/// A row whose start is .NET's `DateTime.MaxValue` matches every later query: the cursor keeps
/// it for as long, so it is not delivered again once the position has moved on by more than the
/// overlap.
#[tokio::test]
async fn a_row_from_year_9999_is_not_delivered_again_as_time_passes() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");
    let history = |at: chrono::DateTime<Utc>, later: bool| {
        let mut forever = row(2, "Completed", "Failure", at);
        forever["OperationStart"] = json!("9999-12-31T23:59:59");
        let mut rows = vec![
            row(1, "Completed", "Success", at - Age::minutes(1)),
            forever,
        ];
        if later {
            rows.push(row(3, "Completed", "Success", at + OVERLAP * 3));
        }
        rows
    };
    let s = standin(history(now, false)).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    assert_eq!(poll_all(&poller).await, 2);
    // Three overlaps later, one new job.
    f.age_cursor(OVERLAP * 3);
    let s = standin(history(now - OVERLAP * 3, true)).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    assert_eq!(poll_all(&poller).await, 1, "only 3");
    assert_eq!(f.events(), 3);
}

/// First start without backfill: a job still running then (on the newest page, or older inside
/// the overlap window and so on no page read for the floor) becomes an event when it finishes;
/// the jobs that had finished do not.
#[tokio::test]
async fn a_job_running_at_first_start_becomes_an_event_when_it_finishes() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");
    let history = |running: &str, result: &str| {
        let mut rows = vec![
            row(1, running, result, now - Age::minutes(5)),
            row(2, running, result, now),
        ];
        rows.extend((10..=14).map(|id| row(id, "Completed", "Success", now - Age::minutes(2))));
        rows.push(row(15, "Completed", "Success", now));
        rows
    };
    let s = standin(history("InProcess", "Unknown")).await;
    // Pages of two: the newest page holds 2 and 15, not 1.
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(2, false));
    let report = poller.poll_once().await.expect("first start");
    assert_eq!(report.events, 0);
    assert_eq!(poll_all(&poller).await, 0, "nothing has finished since");

    // 1 and 2 finish as failures and 16 is new: three events.
    let mut rows = history("Completed", "Failure");
    rows.push(row(16, "Completed", "Success", now + Age::seconds(1)));
    let s = standin(rows).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(2, false));
    assert_eq!(poll_all(&poller).await, 3);
    assert_eq!(poll_all(&poller).await, 0);
    assert_eq!(f.events(), 3);
    assert_eq!(stored_results(&f), ["Failure", "Failure", "Success"]);
}

/// A cursor from an older jobhook (a plain id) says nothing about which rows up to it were
/// finished: a row at or below it that is still running when the poller reaches it is not taken
/// as handled, and becomes an event when it finishes.
#[tokio::test]
async fn a_job_running_below_an_older_jobhooks_cursor_becomes_an_event_when_it_finishes() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");
    f.store
        .insert_events_with_cursor(&[], CURSOR, "102")
        .expect("old cursor");
    let history = |running: &str, result: &str| {
        vec![
            row(100, "Completed", "Success", now - Age::minutes(4)),
            row(101, running, result, now - Age::minutes(3)),
            row(102, "Completed", "Success", now - Age::minutes(2)),
            row(103, "Completed", "Success", now - Age::minutes(1)),
        ]
    };
    let s = standin(history("InProcess", "Unknown")).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    let first = poll_all(&poller).await;
    let s = standin(history("Completed", "Failure")).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    let second = poll_all(&poller).await;
    assert_eq!(first + second, 2, "101 and 103 ({first} + {second})");
    assert_eq!(poll_all(&poller).await, 0);
    assert_eq!(stored_results(&f), ["Failure", "Success"]);
}

/// A Keyfactor API that is not Command: every `GET …/OrchestratorJobs/JobHistory` is answered
/// by `answer` from its decoded `pq.queryString` (empty when absent), `GET …/Agents` with no
/// orchestrators. Its base URL, and how many JobHistory requests it has answered.
async fn unlike_command(
    answer: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    unlike_command_with(move |query| answer(query.get("pq.queryString").map_or("", String::as_str)))
        .await
}

/// [`unlike_command`], answering from every query parameter (paging included).
async fn unlike_command_with(
    answer: impl Fn(&BTreeMap<String, String>) -> (u16, String) + Send + Sync + 'static,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::extract::{Query, State};
    use std::sync::atomic::{AtomicUsize, Ordering};
    type Answer = Arc<dyn Fn(&BTreeMap<String, String>) -> (u16, String) + Send + Sync>;
    let requests = Arc::new(AtomicUsize::new(0));
    let answer: Answer = Arc::new(answer);
    let app = axum::Router::new()
        .route(
            "/KeyfactorAPI/OrchestratorJobs/JobHistory",
            axum::routing::get(
                |State((answer, requests)): State<(Answer, Arc<AtomicUsize>)>,
                 Query(query): Query<BTreeMap<String, String>>| async move {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = answer(&query);
                    (
                        axum::http::StatusCode::from_u16(status).expect("status"),
                        [("content-type", "application/json")],
                        body,
                    )
                },
            ),
        )
        .route(
            "/KeyfactorAPI/Agents",
            axum::routing::get(|| async { ([("content-type", "application/json")], "[]") }),
        )
        .with_state((answer, Arc::clone(&requests)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/KeyfactorAPI/"), requests)
}

fn client_of(base_url: String, password_file: &Path) -> Arc<KeyfactorClient> {
    std::fs::write(password_file, "pw").expect("write password");
    let auth = AuthConfig::Basic {
        username: "KFTRAIN\\svc".into(),
        password: SecretRef::File(password_file.to_path_buf()),
    };
    Arc::new(KeyfactorClient::from_config(&KeyfactorConfig::new(base_url, auth)).expect("client"))
}

/// What the poller logs while the returned guard lives (this thread's subscriber).
fn captured_log() -> (
    Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    #[derive(Clone)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Sink(Arc::clone(&buffer));
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || sink.clone())
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

fn lines_with(log: &std::sync::Mutex<Vec<u8>>, text: &str) -> usize {
    String::from_utf8_lossy(&log.lock().expect("log buffer"))
        .lines()
        .filter(|line| line.contains(text))
        .count()
}

/// A server that ignores `pq.returnLimit` and sends thousands of rows without ids on every
/// page: each page is read to the page size only, and the log gets one line for each kind of
/// trouble however often it recurs, not one per row (a hostile server once made a poller write
/// a gigabyte of warnings in 20 seconds). It ignores `pq.pageReturned` as well, so each poll
/// fails at its second page, which is the first again.
#[tokio::test]
async fn a_server_sending_more_rows_than_asked_and_rows_without_ids_costs_bounded_log() {
    let f = Fixture::new().await;
    let now = Utc::now();
    let mut rows: Vec<Value> = (0..4_000).map(|_| json!({})).collect();
    rows.extend((1..=1_000).map(|id| {
        let mut row = row(id, "Completed", "Success", now - Age::minutes(1));
        row["JobId"] = Value::Null;
        row
    }));
    let page = Value::Array(rows).to_string();
    let (url, requests) = unlike_command(move |_| (200, page.clone())).await;
    let poller = f.poller(client_of(url, &f.dir.path().join("pw")), config(10, true));
    let (log, _guard) = captured_log();
    for _ in 0..3 {
        let error = poller.poll_once().await.expect_err("page 2 is page 1");
        assert!(
            error.to_string().contains("ignores pq.pageReturned"),
            "{error}"
        );
    }
    let pages = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(pages, 6, "two pages a poll");
    assert_eq!(lines_with(&log, "more rows than asked"), 1);
    assert_eq!(lines_with(&log, "without a JobHistoryId"), 1);
    assert_eq!(
        lines_with(&log, "WARN"),
        2,
        "{:?}",
        log.lock().expect("log")
    );
    assert_eq!(f.events(), 0);
}

/// One job whose earlier-runs lookup keeps failing: the polls fail (a passing error gets the
/// whole context at the next poll) only until it has failed `LOOKUP_FAILURES_TOLERATED` times;
/// then every job becomes an event, that one with what its own row tells. Counted per job: a
/// later job whose lookup fails once is waited for, not given up on with the first.
#[tokio::test]
async fn a_lookup_that_keeps_failing_for_one_job_holds_the_others_back_only_a_few_polls() {
    use jobhook::sources::poller::LOOKUP_FAILURES_TOLERATED;
    let f = Fixture::new().await;
    let now = Utc::now();
    let rows: Vec<Value> = (1..=3)
        .map(|id| row(id, "Completed", "Failure", now - Age::minutes(5 - id)))
        .collect();
    let failing_job = rows[1]["JobId"].as_str().expect("job id").to_owned();
    let passing_failure = rows[2]["JobId"].as_str().expect("job id").to_owned();
    let page = Value::Array(rows).to_string();
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    let (url, _) = unlike_command(move |query| {
        if query.contains(&format!("JobID -eq \"{failing_job}\"")) {
            (503, "busy".into())
        } else if query.contains(&format!("JobID -eq \"{passing_failure}\""))
            && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            (503, "busy for a moment".into())
        } else if query.contains("JobID -eq") {
            (200, "[]".into())
        } else {
            (200, page.clone())
        }
    })
    .await;
    let poller = f.poller(client_of(url, &f.dir.path().join("pw")), config(10, true));
    let (log, _guard) = captured_log();
    for _ in 0..LOOKUP_FAILURES_TOLERATED {
        let error = poller.poll_once().await.expect_err("the lookup failed");
        assert!(error.to_string().contains("busy"), "{error}");
        assert_eq!(f.events(), 0);
    }
    // The second job is given up on; the third's first failure fails this poll too.
    let error = poller
        .poll_once()
        .await
        .expect_err("the third job's lookup failed once");
    assert!(error.to_string().contains("busy for a moment"), "{error}");
    assert_eq!(f.events(), 0);
    assert_eq!(poll_all(&poller).await, 3);
    assert_eq!(f.events(), 3);
    assert_eq!(lines_with(&log, "cannot read the job's earlier runs"), 1);
    assert_eq!(poll_all(&poller).await, 0);
}

/// A page larger than the client may read: the error says what to change, in words.
#[tokio::test]
async fn a_page_over_the_response_limit_says_which_setting_to_change() {
    let f = Fixture::new().await;
    let huge = format!("[\"{}\"]", "x".repeat(5 * 1024 * 1024));
    let (url, _) = unlike_command(move |_| (200, huge.clone())).await;
    let poller = f.poller(client_of(url, &f.dir.path().join("pw")), config(10, true));
    let error = poller.poll_once().await.expect_err("too large").to_string();
    assert!(
        error.contains("[poller] page_size") && error.contains("max_response_bytes"),
        "{error}"
    );
    assert!(!error.contains("LimitExceeded("), "{error}");
}

/// An API that reads the query's `OperationStart` in a zone `shift` away from UTC (the zone of
/// its answers): it answers the rows of `rows` (as they are at each request) that start at or
/// after the asked time plus `shift`, oldest first, paged as asked.
async fn shifted_api(rows: Arc<std::sync::Mutex<Vec<Value>>>, shift: Age) -> String {
    let (url, _) = unlike_command_with(move |params| {
        let number = |key: &str| {
            params
                .get(key)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1)
        };
        let (limit, page) = (number("pq.returnLimit"), number("pq.pageReturned"));
        let query = params.get("pq.queryString").map_or("", String::as_str);
        let asked = query
            .split('"')
            .nth(1)
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S").ok())
            .map(|t| t.and_utc() + shift);
        let start = |row: &Value| {
            chrono::NaiveDateTime::parse_from_str(
                row["OperationStart"].as_str().expect("start"),
                "%Y-%m-%dT%H:%M:%S",
            )
            .expect("start")
            .and_utc()
        };
        let rows = rows.lock().expect("rows");
        let answer: Vec<&Value> = rows
            .iter()
            .filter(|row| asked.is_none_or(|asked| start(row) >= asked))
            .skip(limit.saturating_mul(page.saturating_sub(1)))
            .take(limit)
            .collect();
        (200, serde_json::to_string(&answer).expect("JSON"))
    })
    .await;
    url
}

/// Whether Command reads the query's time as UTC is not documented. A server that reads it in
/// a zone east of UTC answers rows from before the time asked: they are skipped, with one
/// warning, instead of becoming events again on every poll that also finds a new job, once the
/// cursor has forgotten them (17 events for 9 jobs in four such polls). One that reads it west
/// of UTC leaves out the jobs the cursor saw start after that time: a warning says jobs may be
/// missed (nothing said so).
#[tokio::test]
async fn a_server_reading_the_query_time_in_another_zone_is_noticed_and_repeats_no_job() {
    let now = Utc::now();
    let rows: Vec<Value> = (1..=5)
        .map(|id| {
            row(
                id,
                "Completed",
                "Success",
                now - Age::hours(5 - id) - Age::minutes(1),
            )
        })
        .collect();

    let east = Fixture::new().await;
    let east_rows = Arc::new(std::sync::Mutex::new(rows.clone()));
    let url = shifted_api(Arc::clone(&east_rows), Age::hours(-2)).await;
    let poller = east.poller(
        client_of(url, &east.dir.path().join("pw")),
        config(10, true),
    );
    let (log, _guard) = captured_log();
    for n in 0..4 {
        poller.poll_once().await.expect("poll");
        // A new job finishes between polls.
        let id = 6 + n;
        east_rows
            .lock()
            .expect("rows")
            .push(row(id, "Completed", "Success", Utc::now()));
    }
    poller.poll_once().await.expect("poll");
    assert_eq!(east.events(), 9, "each job once");
    assert_eq!(lines_with(&log, "starts before the OperationStart"), 1);
    drop(_guard);

    let west = Fixture::new().await;
    let url = shifted_api(Arc::new(std::sync::Mutex::new(rows)), Age::hours(2)).await;
    let poller = west.poller(
        client_of(url, &west.dir.path().join("pw")),
        config(10, true),
    );
    let (log, _guard) = captured_log();
    for _ in 0..4 {
        poller.poll_once().await.expect("poll");
    }
    assert_eq!(west.events(), 5);
    assert_eq!(lines_with(&log, "jobs may be missed"), 1);
    drop(_guard);

    // East of UTC on a busy site: a whole page of rows from before the time asked for. The
    // poller would read such pages on every poll and never reach a new job; it fails the poll
    // saying so instead (counted and retried, not a quiet stall).
    let busy = Fixture::new().await;
    let url = shifted_api(Arc::clone(&east_rows), Age::hours(-2)).await;
    let poller = busy.poller(client_of(url, &busy.dir.path().join("pw")), config(2, true));
    let mut error = None;
    for _ in 0..20 {
        if let Err(e) = poller.poll_once().await {
            error = Some(e.to_string());
            break;
        }
    }
    let error = error.expect("a page from before the bound fails the poll");
    assert!(error.contains("cannot move on"), "{error}");
}

/// What `/metrics` shows of this fixture's poller.
fn poller_metric(f: &Fixture, name: &str) -> f64 {
    let text = f.dispatcher.metrics().render(None, 0);
    jobhook_testkit::metric_value(&text, name).unwrap_or(-1.0)
}

/// A poll answered with a redirection names where it pointed and what to check, one answered
/// 429 with `Retry-After` is not retried before that time, and `/metrics` counts the failed
/// polls and tells when the last one succeeded (a poller failing on every poll was invisible
/// there: `/healthz` and `/metrics` looked the same as a healthy one's).
#[tokio::test]
async fn failed_polls_say_what_the_server_said_and_show_in_metrics() {
    let f = Fixture::new().await;
    let answer = Arc::new(std::sync::Mutex::new((302u16, String::new())));
    let given = Arc::clone(&answer);
    let app = axum::Router::new().route(
        "/KeyfactorAPI/OrchestratorJobs/JobHistory",
        axum::routing::get(move || {
            let (status, body) = given.lock().expect("answer").clone();
            async move {
                let status = axum::http::StatusCode::from_u16(status).expect("status");
                (
                    status,
                    [
                        ("location", "/elsewhere/KeyfactorAPI/"),
                        ("retry-after", "3"),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/KeyfactorAPI/");

    let poller = f.poller(
        client_of(url.clone(), &f.dir.path().join("pw")),
        config(10, true),
    );
    let error = poller
        .poll_once()
        .await
        .expect_err("a redirection")
        .to_string();
    assert!(
        error.contains("redirection to \"/elsewhere/KeyfactorAPI/\"")
            && error.contains("[keyfactor] base_url"),
        "{error}"
    );
    *answer.lock().expect("answer") = (429, "slow down".into());
    let error = poller.poll_once().await.expect_err("429").to_string();
    assert!(error.contains("asked for 3 s"), "{error}");

    // The loop: a failed poll is counted, and the next waits for the server's 3 s, not the
    // 100 ms interval.
    assert_eq!(poller_metric(&f, "jobhook_poller_failures_total"), 0.0);
    assert_eq!(
        poller_metric(&f, "jobhook_poller_last_success_timestamp_seconds"),
        0.0
    );
    let mut config = config(10, true);
    config.interval_ms = 100;
    let running = tokio::spawn(
        f.poller(client_of(url, &f.dir.path().join("pw")), config)
            .run(),
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(poller_metric(&f, "jobhook_poller_failures_total"), 1.0);
    *answer.lock().expect("answer") = (200, "[]".into());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while poller_metric(&f, "jobhook_poller_last_success_timestamp_seconds") <= 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no successful poll counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    running.abort();
    let at = poller_metric(&f, "jobhook_poller_last_success_timestamp_seconds");
    assert!((at - Utc::now().timestamp() as f64).abs() < 30.0, "{at}");
}

/// One unfinished job holds every later poller event until it ends or is older than
/// `stale_after_ms` (a day by default). While it does, the log says which job it waits at, when
/// it started and when `stale_after_ms` lets it go (once per 10 minutes, not once per poll), and
/// `/metrics` shows the job's start: the poller looked healthy for up to a day, every poll
/// succeeding. A `Status` the poller cannot read is warned of as such at once, however young
/// the row; one written as a digit string is read as the number.
#[tokio::test]
async fn a_poller_held_by_an_unfinished_or_unreadable_row_says_so() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let pw = f.dir.path().join("pw");
    let held_metric = "jobhook_poller_held_since_timestamp_seconds";
    let started = now - Age::hours(2);
    let history = |status: &str, result: &str| {
        vec![
            row(1, status, result, started),
            row(2, "Completed", "Success", now - Age::minutes(1)),
            row(3, "Completed", "Failure", now),
        ]
    };
    let s = standin(history("InProcess", "Unknown")).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    let (log, guard) = captured_log();
    for _ in 0..3 {
        let report = poller.poll_once().await.expect("poll");
        assert_eq!(report.events, 0);
        assert_eq!(
            report.held_since.map(|t| t.timestamp()),
            Some(started.timestamp())
        );
    }
    let text = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
    assert_eq!(
        lines_with(&log, "waits at a job that has not finished"),
        1,
        "{text}"
    );
    let released = (started + Age::days(1)).format("%Y-%m-%dT%H:%M:%S");
    for says in [
        "job_history_id=1".to_owned(),
        format!("operation_start={}", started.format("%Y-%m-%dT%H:%M:%S")),
        format!("until {released} UTC, when [poller] stale_after_ms skips it"),
    ] {
        assert!(text.contains(&says), "{says} missing from {text}");
    }
    assert_eq!(
        poller_metric(&f, held_metric),
        started.timestamp() as f64,
        "the gauge shows the held job's start"
    );
    drop(guard);

    // The job finishes: it and the two it held become events, and the gauge goes back to 0.
    let s = standin(history("Completed", "Failure")).await;
    let poller = f.poller(client(&s, &pw, &s.credentials().password), config(10, true));
    assert_eq!(poll_all(&poller).await, 3);
    assert_eq!(poller_metric(&f, held_metric), 0.0);

    // A Status of "3" is Completed; "Bogus" cannot be read: it is warned of at once (the row
    // is a minute old) and waited for as unfinished, and the warning says so.
    let odd = Fixture::new().await;
    let mut digits = row(10, "Completed", "Success", now - Age::minutes(3));
    digits["Status"] = json!("3");
    let mut bogus = row(11, "Completed", "Success", now - Age::minutes(2));
    bogus["Status"] = json!("Bogus\u{1b}[2J");
    let s = standin(vec![
        digits,
        bogus,
        row(12, "Completed", "Success", now - Age::minutes(1)),
    ])
    .await;
    let poller = odd.poller(
        client(&s, &odd.dir.path().join("pw"), &s.credentials().password),
        config(10, true),
    );
    let (log, _guard) = captured_log();
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(report.events, 1, "10 only: {report:?}");
    assert!(report.cursor.seen.contains_key(&10), "{report:?}");
    let text = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
    assert_eq!(lines_with(&log, "Status cannot be read"), 1, "{text}");
    for says in [
        "job_history_id=11",
        "its Status is \"Bogus\\u{1b}[2J\", which Command does not document",
        "it is taken as unfinished",
    ] {
        assert!(text.contains(says), "{says} missing from {text}");
    }
    assert!(!text.contains('\u{1b}'), "{text:?}");
    assert_eq!(
        poller_metric(&odd, held_metric),
        (now - Age::minutes(2)).timestamp() as f64
    );
}

/// A server (or a gateway in front of Command) that honours `pq.returnLimit` but ignores
/// `pq.pageReturned` answers every page with the first. The poller delivered that page, then
/// on every later poll read all 2,002 pages it may read, back to back, found nothing new, and
/// never moved on, saying nothing. The second page now fails the poll, naming the parameter,
/// after two requests.
#[tokio::test]
async fn a_server_ignoring_page_returned_fails_the_poll_after_two_pages() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let now = Utc::now();
    let f = Fixture::new().await;
    let rows: Vec<Value> = (1..=12)
        .map(|id| row(id, "Completed", "Success", now - Age::minutes(13 - id)))
        .collect();
    let pages = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&pages);
    let (url, _) = unlike_command_with(move |params| {
        let query = params.get("pq.queryString").map_or("", String::as_str);
        if query.contains("JobID -eq") {
            return (200, "[]".into());
        }
        counted.fetch_add(1, Ordering::SeqCst);
        let limit = params
            .get("pq.returnLimit")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(50);
        let first: Vec<&Value> = rows.iter().take(limit).collect();
        (200, serde_json::to_string(&first).expect("JSON"))
    })
    .await;
    let poller = f.poller(client_of(url, &f.dir.path().join("pw")), config(5, true));
    let report = poller.poll_once().await.expect("the first page");
    assert_eq!((report.events, report.more), (5, true));
    assert_eq!(pages.load(Ordering::SeqCst), 1);
    let error = poller
        .poll_once()
        .await
        .expect_err("page 2 is page 1")
        .to_string();
    assert!(
        error.contains("answered page 2 with page 1's rows: it ignores pq.pageReturned"),
        "{error}"
    );
    assert_eq!(
        pages.load(Ordering::SeqCst),
        3,
        "pages 1 and 2 of the second poll"
    );
    assert_eq!(f.events(), 5);
}

/// A server that ignores `pq.sortAscending` answers the newest rows first. The poller moved
/// its position to them, stopped at an older unfinished job, and its next query's lower bound
/// then left the older jobs out for good: two of five jobs were delivered, and nothing said
/// why. Rows out of `OperationStart` order now fail the poll, committing nothing; once the
/// server answers in order, every job becomes an event.
#[tokio::test]
async fn rows_out_of_start_order_fail_the_poll_and_lose_nothing() {
    let now = Utc::now();
    let f = Fixture::new().await;
    let history = |third: &str| {
        vec![
            row(1, "Completed", "Success", now - Age::seconds(2200)),
            row(2, "Completed", "Success", now - Age::seconds(2100)),
            row(3, third, "Failure", now - Age::seconds(2000)),
            row(4, "Completed", "Success", now - Age::seconds(60)),
            row(5, "Completed", "Success", now - Age::seconds(50)),
        ]
    };
    // What the server holds, and whether it answers newest first.
    let state = Arc::new(std::sync::Mutex::new((history("InProcess"), true)));
    let answers = Arc::clone(&state);
    let (url, _) = unlike_command_with(move |params| {
        let query = params.get("pq.queryString").map_or("", String::as_str);
        if query.contains("JobID -eq") {
            return (200, "[]".into());
        }
        let (rows, reversed) = &*answers.lock().expect("state");
        let from = query
            .split('"')
            .nth(1)
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S").ok());
        let mut answer: Vec<&Value> = rows
            .iter()
            .filter(|row| {
                from.is_none_or(|from| {
                    row["OperationStart"].as_str().expect("start")
                        >= from.format("%Y-%m-%dT%H:%M:%S").to_string().as_str()
                })
            })
            .collect();
        if *reversed {
            answer.reverse();
        }
        (200, serde_json::to_string(&answer).expect("JSON"))
    })
    .await;
    let poller = f.poller(client_of(url, &f.dir.path().join("pw")), config(10, true));
    let error = poller
        .poll_once()
        .await
        .expect_err("newest first")
        .to_string();
    assert!(
        error.contains(
            "the server answered rows out of OperationStart order (JobHistoryId 4 starts at"
        ) && error.contains("it ignores pq.sortField or pq.sortAscending"),
        "{error}"
    );
    assert_eq!(f.events(), 0);
    assert_eq!(f.cursor(), None, "nothing committed");

    // In order: 1 and 2, then the poller waits at 3; once 3 has finished, 3, 4 and 5.
    state.lock().expect("state").1 = false;
    assert_eq!(poll_all(&poller).await, 2);
    state.lock().expect("state").0 = history("Completed");
    assert_eq!(poll_all(&poller).await, 3);
    assert_eq!(f.events(), 5, "every job once");
}
