//! The JobHistory poller against the Keyfactor stand-in: paging, the durable cursor (a restart
//! neither loses nor repeats a job), unfinished and stale rows, first start without backfill,
//! and API errors that leave the cursor alone.

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
use jobhook::sources::poller::{CURSOR, Poller, PollerConfig};
use jobhook::{Engine, LoadOptions, SandboxSpec, SandboxedHandler};
use jobhook_testkit::guest_bytes;
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
        "Result": result,
        "Status": status,
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
        let handler = SandboxedHandler::load(
            &engine,
            &Services::default(),
            guest_bytes("log-context"),
            SandboxSpec::new("all"),
            &LoadOptions::default(),
        )
        .await
        .expect("load");
        let config = jobhook::app::config::Config::parse(
            &format!(
                "[[handlers]]\nname = \"all\"\ncomponent = \"{}\"\njob_types = [\"*\"]\n",
                jobhook_testkit::guest("log-context").display()
            ),
            &dir.path().join("jobhook.toml"),
        )
        .expect("config");
        let hc = config.handlers[0].clone();
        assert_eq!(hc.job_types, JobTypes::All);
        let registry = Registry::new([Arc::new(RegisteredHandler::new(
            hc,
            handler,
            config.quarantine.clone(),
        ))]);
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

    fn cursor(&self) -> Option<String> {
        self.store.cursor(CURSOR).expect("cursor")
    }
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
    assert_eq!(
        (report.events, report.cursor, report.more),
        (2, Some(102), true)
    );
    let report = poller.poll_once().await.expect("poll");
    assert_eq!(
        (report.events, report.cursor, report.more),
        (0, Some(102), false)
    );
    assert_eq!(f.events(), 2);
    assert_eq!(f.cursor().as_deref(), Some("102"));

    // The requests follow Keyfactor's conventions.
    let requests = first.api_requests();
    let last = requests.last().expect("requests");
    assert_eq!(
        last.query_value("pq.queryString").as_deref(),
        Some("JobHistoryId -gt 102")
    );
    assert_eq!(
        last.query_value("pq.sortField").as_deref(),
        Some("JobHistoryId")
    );
    assert_eq!(last.header("x-keyfactor-requested-with"), Some("APIClient"));

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
    assert_eq!(f.cursor().as_deref(), Some("105"));
    assert_eq!(f.events(), 5, "each finished job exactly once");
    // Nothing new: nothing committed.
    assert_eq!(poller.poll_once().await.expect("poll").events, 0);
    assert_eq!(f.events(), 5);
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
    assert_eq!((report.events, report.cursor), (1, Some(8)));
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
    assert_eq!((report.events, report.cursor), (0, Some(30)));
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
    assert!(!error.contains("wrong-password"), "{error}");
    assert_eq!(f.cursor(), None);
    assert_eq!(f.events(), 0);
}
