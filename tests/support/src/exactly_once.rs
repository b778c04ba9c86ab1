//! The check behind the crash tests: every event that got a 202 ends with exactly one terminal
//! delivery per matching handler — none lost, none terminal twice — and a re-run delivery's
//! handler saw its attempt number.
//!
//! It expects the handler set the crash tests configure: `probe` and `log` for every job type,
//! `inventory` for [`INVENTORY_TYPES`]; `probe` and `inventory` run `guest-attempt-probe`, which
//! logs `attempt N of event E` first.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Job types of the load driver's mix that the `inventory` handler is registered for.
pub const INVENTORY_TYPES: [&str; 2] = [
    "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
    "7b6bbc1b-d802-4b09-bec9-f5c221083130",
];

/// Waits until each of `accepted` has settled on the engine at `url` (within `timeout`), checks
/// it, and returns how many deliveries were re-run (attempt > 1).
pub fn check_exactly_once(url: &str, accepted: &[String], timeout: Duration) -> u64 {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    let mut reruns = 0;
    for id in accepted {
        let event = runtime.block_on(settled(&client, url, id, deadline));
        let job_type_id = event["context"]["JobTypeId"].as_str().unwrap_or("");
        let mut expected: BTreeSet<&str> = ["probe", "log"].into();
        if INVENTORY_TYPES.contains(&job_type_id) {
            expected.insert("inventory");
        }
        let deliveries = event["deliveries"].as_array().expect("deliveries");
        let handlers: BTreeSet<&str> = deliveries
            .iter()
            .filter_map(|d| d["handler"].as_str())
            .collect();
        assert_eq!(handlers, expected, "event {id}: {event:#}");
        assert_eq!(deliveries.len(), expected.len(), "event {id}: {event:#}");
        for d in deliveries {
            assert_eq!(d["state"], "succeeded", "event {id}: {d:#}");
            let attempt = d["attempt"].as_u64().expect("attempt");
            let attempts = d["attempts"].as_array().expect("attempts");
            let terminal: Vec<&Value> = attempts.iter().filter(|a| a["terminal"] == true).collect();
            assert_eq!(
                terminal.len(),
                1,
                "event {id}: terminal more than once: {d:#}"
            );
            assert_eq!(terminal[0]["attempt"].as_u64(), Some(attempt), "{d:#}");
            // Every attempt is listed, once; the ones a crash or a takeover cut short as
            // `interrupted` (these handlers never fail on their own).
            let numbers: Vec<u64> = attempts
                .iter()
                .filter_map(|a| a["attempt"].as_u64())
                .collect();
            assert_eq!(
                numbers,
                (1..=attempt).collect::<Vec<_>>(),
                "event {id}: {d:#}"
            );
            for earlier in attempts.iter().filter(|a| a["terminal"] != true) {
                assert_eq!(earlier["class"], "interrupted", "event {id}: {d:#}");
            }
            if attempt > 1 {
                reruns += 1;
            }
            if d["handler"] != "log" {
                let seen = d["logs"][0]["message"].as_str().unwrap_or("");
                assert_eq!(
                    seen,
                    format!("attempt {attempt} of event {id}"),
                    "the handler must see the attempt number: {d:#}"
                );
            }
        }
    }
    reruns
}

/// Polls `GET /v1/events/{id}` until no delivery is pending or running.
pub async fn settled(client: &reqwest::Client, url: &str, id: &str, deadline: Instant) -> Value {
    loop {
        let response = client
            .get(format!("{url}/v1/events/{id}"))
            .send()
            .await
            .expect("GET event");
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            panic!("accepted event {id}: GET answered {status}: {body}");
        }
        let event: Value =
            serde_json::from_slice(&response.bytes().await.expect("body")).expect("event JSON");
        let done = event["deliveries"].as_array().is_some_and(|ds| {
            ds.iter()
                .all(|d| d["state"] != "pending" && d["state"] != "running")
        });
        if done {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "event {id} never settled: {event:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
