//! Retention: finished events older than `[store] retention_days` are deleted in the background,
//! with their deliveries and attempts, so that the store does not grow without end (about 2 KB
//! per event with one handler: a busy Command filled a disk, and a full disk refuses events).
//!
//! Finished means every delivery of the event succeeded or failed for good (or was skipped by an
//! older version), or the event was routed to no handler. An event with a delivery pending or
//! running — waiting for a retry, for a quarantined handler, for a handler no node has — is
//! never deleted, however old: deleting it would lose work not yet done.
//!
//! An event is kept at least as long as its idempotency key holds (`[server]
//! idempotency_retention_ms`), whichever is longer: a forwarder's resend within the key's window
//! is then still answered with its event, and never run again as a new one for want of it.
//!
//! Every node purges (as with idempotency keys): a batch is small, and on a shared store the
//! nodes skip each other's rows ([`EventStore::purge_finished`]). A round walks the events
//! older than the cutoff once, a bounded batch at a time, so that old events that are not
//! finished cost each round one look, not one per batch.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::log_limit::LogLimit;
use crate::queue::store::{EventStore, MAX_EVENT_PURGE_BATCH, StoreError};

/// How often each node looks for finished events past their retention. Retention is counted in
/// days: a few minutes late costs nothing, and an idle store is asked little.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(300);

/// Pause between two batches, so that a large backlog (the first run after an upgrade, or after
/// the retention was shortened) is deleted without crowding out ingest and outcome commits.
const RETENTION_PAUSE: Duration = Duration::from_millis(100);

/// Shortest time between two warnings that the purge failed: a store that keeps failing (a full
/// disk, a server that is down) is told about once per interval, with how many more failed.
const RETENTION_WARNING_INTERVAL: Duration = Duration::from_secs(3600);

/// The receipt time before which finished events are deleted at `now`: `retention` before it, or
/// `keys` before it when the idempotency keys hold longer. `None` keeps everything: no retention
/// set, or a cutoff before the start of the clock's range.
pub fn cutoff(
    now: DateTime<Utc>,
    retention: Option<Duration>,
    keys: Duration,
) -> Option<DateTime<Utc>> {
    let kept = chrono::Duration::from_std(retention?.max(keys)).ok()?;
    now.checked_sub_signed(kept)
}

/// Deletes the finished events past their retention, every [`RETENTION_INTERVAL`]; runs until
/// the task is dropped. `retention` is `[store] retention_days` (`None`: keep everything, and
/// this returns at once), `keys` the idempotency keys' retention. Errors are logged (rate
/// limited) and retried at the next interval: retention is housekeeping, never a reason to stop.
pub async fn purge_finished_events(
    store: Arc<dyn EventStore>,
    retention: Option<Duration>,
    keys: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) {
    if retention.is_none() {
        return;
    }
    let warnings = LogLimit::new(RETENTION_WARNING_INTERVAL);
    let mut interval = tokio::time::interval(RETENTION_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(before) = cutoff(store.now(), retention, keys) else {
            continue;
        };
        let (events, failed) = purge_all(&store, before, MAX_EVENT_PURGE_BATCH).await;
        if events > 0 {
            metrics.retention_deleted(events);
            tracing::info!(
                events,
                before = %before.to_rfc3339(),
                "finished events past their retention deleted, with their deliveries and attempts"
            );
        }
        if let Some(e) = failed {
            warnings.tell(|more_since_last_warning| {
                tracing::warn!(
                    more_since_last_warning,
                    "cannot delete finished events past their retention (will retry in {}s): {e}",
                    RETENTION_INTERVAL.as_secs()
                );
            });
        }
    }
}

/// Walks the events received before `before`, oldest first, `batch` at a time with a pause
/// between batches, deleting the finished ones, until it has looked at them all or a batch
/// fails; returns how many were deleted, and the error that stopped it early. An error after
/// some batches loses nothing: what was deleted is committed (and counted), and the rest waits
/// for the next round, which walks from the oldest again.
async fn purge_all(
    store: &Arc<dyn EventStore>,
    before: DateTime<Utc>,
    batch: usize,
) -> (u64, Option<StoreError>) {
    let mut total = 0u64;
    let mut from = None;
    loop {
        let store = Arc::clone(store);
        let round = tokio::task::spawn_blocking(move || store.purge_finished(before, batch, from))
            .await
            .map_err(|e| StoreError::Database(format!("the retention purge failed: {e}")))
            .and_then(|round| round);
        match round {
            Ok(round) => {
                total = total.saturating_add(round.deleted);
                match round.next {
                    Some(next) => from = Some(next),
                    None => return (total, None),
                }
            }
            Err(e) => return (total, Some(e)),
        }
        tokio::time::sleep(RETENTION_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::store::conformance::event;
    use crate::queue::store::sqlite::SqliteStore;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_cutoff_keeps_events_as_long_as_their_keys() {
        let now = Utc::now();
        let days = |n: i64| now - chrono::Duration::days(n);
        assert_eq!(cutoff(now, Some(30 * DAY), 7 * DAY), Some(days(30)));
        // A key that holds longer keeps its event as long.
        assert_eq!(cutoff(now, Some(DAY), 7 * DAY), Some(days(7)));
        assert_eq!(cutoff(now, None, 7 * DAY), None, "0 keeps everything");
        assert_eq!(cutoff(now, Some(Duration::MAX), DAY), None);
    }

    /// The purge goes on batch after batch until it has looked at every event before the
    /// cutoff, past the old ones that are not finished, and leaves those.
    #[tokio::test(flavor = "current_thread")]
    async fn a_purge_deletes_every_finished_event_batch_by_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let waiting = event(&["a"]);
        store.insert_event(&waiting).unwrap();
        let finished: Vec<_> = (0..5).map(|_| event(&[])).collect();
        for e in &finished {
            store.insert_event(e).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        let before = store.now();
        assert!(matches!(purge_all(&store, before, 2).await, (5, None)));
        for e in &finished {
            assert!(store.event(e.id).unwrap().is_none());
        }
        assert!(store.event(waiting.id).unwrap().is_some());
        assert!(matches!(purge_all(&store, before, 2).await, (0, None)));
    }

    /// A batch that fails after others succeeded: what they deleted is told (and counted by the
    /// caller), with the error that stopped the round.
    #[tokio::test(flavor = "current_thread")]
    async fn a_purge_stopped_by_an_error_tells_what_it_deleted_before() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        for _ in 0..5 {
            store.insert_event(&event(&[])).unwrap();
        }
        // From the third deletion on, the database refuses to delete an event.
        rusqlite::Connection::open(dir.path().join(crate::queue::store::sqlite::DATABASE_FILE))
            .unwrap()
            .execute_batch(
                "CREATE TABLE gone (n INTEGER);
                 CREATE TRIGGER counted AFTER DELETE ON events BEGIN INSERT INTO gone VALUES (1); END;
                 CREATE TRIGGER refused BEFORE DELETE ON events
                 WHEN (SELECT count(*) FROM gone) >= 2
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let (deleted, failed) = purge_all(&store, store.now(), 2).await;
        assert_eq!(deleted, 2);
        assert!(
            matches!(&failed, Some(StoreError::Database(m)) if m.contains("refused by the test")),
            "{failed:?}"
        );
    }
}
