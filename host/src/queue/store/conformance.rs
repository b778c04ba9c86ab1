//! The [`EventStore`] contract as tests. Every implementation runs this suite through [`suite!`], so
//! SQLite and PostgreSQL are held to the same semantics.
//!
//! A [`Backend`] is one database; [`Backend::node`] opens another store on it — another engine
//! node for a shared store, another process (after a crash, say) for SQLite. Where the two
//! differ by design, the test says so and checks each side: a single-node store treats every
//! claim of another process as abandoned at once, a shared store only claims whose lease has
//! expired, because another node cannot tell a dead node from a busy one any sooner.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use uuid::Uuid;

use super::{
    ABANDONED_REASON, AttemptRecord, ClaimLimits, DeliveryState, EventStore, FailedFilter, Finish,
    INTERRUPTED_CLASS, Idempotency, Inserted, MAX_CLAIM_BATCH, MAX_FAILED_PAGE, MAX_RETRY_BATCH,
    NewEvent, RELEASED_REASON, SOURCE_API, SOURCE_POLLER, Share, StoreError, after, new_event_id,
    to_ms,
};
use crate::context::JobContext;
use crate::outcome::LogLine;
use crate::outcome::{Outcome, OutcomeKind};

/// The lease the tests claim with; expiry is simulated by passing later times, not by waiting.
pub(crate) const LEASE: Duration = Duration::from_secs(60);

/// One database under test.
pub(crate) trait Backend: Sync {
    /// The store type.
    type S: EventStore;
    /// Opens a new store on this database: a new node (or process) with its own identity.
    fn node(&self) -> Self::S;
    /// Whether several live nodes share the database (PostgreSQL), rather than one process
    /// at a time (SQLite).
    fn shared(&self) -> bool;
    /// Overwrites the stored context of `event` in `store`'s database with JSON the decoder
    /// refuses: what a database written by another version, or edited by hand, can hold.
    fn spoil_context(&self, store: &Self::S, event: Uuid);
}

/// Defines one `#[test]` per contract test for the backend that `$backend` (an expression of
/// type `Option<impl Backend>`, `None` to skip) creates.
macro_rules! suite {
    ($backend:expr) => {
        $crate::queue::store::conformance::suite!(@each $backend;
            events_are_delivered_once_per_handler_and_survive_reopen,
            an_events_source_and_message_reach_its_claims_and_its_view,
            busy_handlers_are_skipped_when_claiming,
            interrupted_deliveries_run_again_with_a_higher_attempt,
            release_all_gives_back_only_this_nodes_claims,
            release_all_leaves_other_nodes_claims_alone,
            retries_wait_until_due,
            the_next_due_time_counts_only_handlers_a_claim_could_take,
            cursor_and_events_commit_together,
            failed_writes_commit_nothing,
            unknown_events_are_none,
            an_empty_store_has_nothing_due,
            a_late_finish_after_takeover_is_ignored,
            claims_of_other_nodes_are_requeued_only_when_abandoned,
            interrupted_attempts_are_listed_as_interrupted,
            renewing_keeps_this_nodes_claims_and_no_others,
            claims_and_renewals_asked_for_before_a_wait_are_stamped_when_taken,
            concurrent_claims_hand_out_each_delivery_once,
            a_stored_context_that_cannot_be_read_fails_only_its_own_claims,
            any_text_ingest_accepts_is_stored_and_read_back_unchanged,
            deliveries_of_handlers_not_listed_stay_pending_when_others_is_zero,
            batch_claims_respect_the_batch_size_and_each_handlers_room,
            batch_claims_are_oldest_first_and_decode_each_context,
            a_claim_short_of_slots_shares_them_between_handlers,
            concurrent_batch_claims_hand_out_each_delivery_once,
            a_batch_finish_records_all_and_ignores_only_stale_claims,
            a_batch_with_a_record_no_attempt_leads_to_records_none_of_it,
            outcomes_logs_and_attempt_history_are_kept,
            one_node_leads_a_role_until_it_is_gone,
            nodes_starting_together_migrate_once,
            a_key_used_twice_commits_one_event,
            a_key_reused_for_another_context_conflicts,
            a_key_past_its_retention_is_new,
            concurrent_inserts_with_one_key_commit_one_event,
            expired_keys_are_purged_in_bounded_batches,
            finished_events_past_retention_are_deleted_with_their_deliveries,
            events_with_a_delivery_not_finished_are_kept_however_old,
            event_purges_are_bounded_batches,
            concurrent_event_purges_delete_each_event_once,
            failed_deliveries_are_listed_newest_first_and_filtered,
            failed_deliveries_run_again_with_their_next_attempt,
            failed_deliveries_run_again_in_bounded_batches_newest_first,
            a_delivery_run_again_keeps_its_event_from_retention,
        );
    };
    (@each $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(backend) = $backend {
                    $crate::queue::store::conformance::$name(&backend);
                }
            }
        )*
    };
}
pub(crate) use suite;

/// Inside `impl EventStore for W`, where `W.0` is the store a test wrapper changes a few calls
/// of: every call a wrapper has no reason to change, passed on to `self.0` (the event path's
/// inserts, claims and finishes, and `awaited_writes`, are left to the wrapper; with
/// `all but finishes`, the inserts and claims are passed on too).
macro_rules! pass_on_the_rest {
    (all but finishes) => {
        $crate::queue::store::conformance::pass_on_the_rest!();
        fn claim_batch(
            &self,
            now: chrono::DateTime<chrono::Utc>,
            limits: &$crate::queue::store::ClaimLimits,
            lease: std::time::Duration,
        ) -> Result<Vec<$crate::queue::store::Claim>, $crate::queue::store::StoreError> {
            self.0.claim_batch(now, limits, lease)
        }
        fn insert_event(
            &self,
            event: &$crate::queue::store::NewEvent,
        ) -> Result<(), $crate::queue::store::StoreError> {
            self.0.insert_event(event)
        }
        fn insert_event_once(
            &self,
            event: &$crate::queue::store::NewEvent,
            key: &$crate::queue::store::Idempotency,
        ) -> Result<$crate::queue::store::Inserted, $crate::queue::store::StoreError> {
            self.0.insert_event_once(event, key)
        }
    };
    () => {
        fn now(&self) -> chrono::DateTime<chrono::Utc> {
            self.0.now()
        }
        fn keep_time(
            &self,
        ) -> Result<Option<chrono::TimeDelta>, $crate::queue::store::StoreError> {
            self.0.keep_time()
        }
        fn purge_idempotency_keys(
            &self,
            before: chrono::DateTime<chrono::Utc>,
            max: usize,
        ) -> Result<u64, $crate::queue::store::StoreError> {
            self.0.purge_idempotency_keys(before, max)
        }
        fn purge_finished(
            &self,
            before: chrono::DateTime<chrono::Utc>,
            max: usize,
            from: Option<$crate::queue::store::PurgePosition>,
        ) -> Result<$crate::queue::store::PurgeRound, $crate::queue::store::StoreError> {
            self.0.purge_finished(before, max, from)
        }
        fn renew(
            &self,
            now: chrono::DateTime<chrono::Utc>,
            lease: std::time::Duration,
        ) -> Result<(), $crate::queue::store::StoreError> {
            self.0.renew(now, lease)
        }
        fn requeue_abandoned(
            &self,
            now: chrono::DateTime<chrono::Utc>,
        ) -> Result<u64, $crate::queue::store::StoreError> {
            self.0.requeue_abandoned(now)
        }
        fn release_all(&self) -> Result<u64, $crate::queue::store::StoreError> {
            self.0.release_all()
        }
        fn event(
            &self,
            id: uuid::Uuid,
        ) -> Result<Option<$crate::queue::store::EventView>, $crate::queue::store::StoreError>
        {
            self.0.event(id)
        }
        fn failed_deliveries(
            &self,
            filter: &$crate::queue::store::FailedFilter,
            max: usize,
        ) -> Result<Vec<$crate::queue::store::FailedDelivery>, $crate::queue::store::StoreError>
        {
            self.0.failed_deliveries(filter, max)
        }
        fn retry_failed(
            &self,
            filter: &$crate::queue::store::FailedFilter,
            now: chrono::DateTime<chrono::Utc>,
            max: usize,
        ) -> Result<Vec<i64>, $crate::queue::store::StoreError> {
            self.0.retry_failed(filter, now, max)
        }
        fn next_due(
            &self,
            limits: &$crate::queue::store::ClaimLimits,
        ) -> Result<Option<chrono::DateTime<chrono::Utc>>, $crate::queue::store::StoreError> {
            self.0.next_due(limits)
        }
        fn count_by_state(
            &self,
        ) -> Result<
            Vec<($crate::queue::store::DeliveryState, u64)>,
            $crate::queue::store::StoreError,
        > {
            self.0.count_by_state()
        }
        fn pending_by_handler(
            &self,
        ) -> Result<Vec<(String, u64)>, $crate::queue::store::StoreError> {
            self.0.pending_by_handler()
        }
        fn failed_by_handler(
            &self,
        ) -> Result<Vec<(String, u64)>, $crate::queue::store::StoreError> {
            self.0.failed_by_handler()
        }
        fn cursor(
            &self,
            name: &str,
        ) -> Result<Option<String>, $crate::queue::store::StoreError> {
            self.0.cursor(name)
        }
        fn insert_events_with_cursor(
            &self,
            events: &[$crate::queue::store::NewEvent],
            cursor_name: &str,
            cursor: &str,
        ) -> Result<(), $crate::queue::store::StoreError> {
            self.0.insert_events_with_cursor(events, cursor_name, cursor)
        }
        fn try_lead(&self, role: &str) -> Result<bool, $crate::queue::store::StoreError> {
            self.0.try_lead(role)
        }
    };
}
pub(crate) use pass_on_the_rest;

/// Limits that leave every handler room: [`EventStore::next_due`] over every pending delivery.
pub(crate) fn every_handler() -> ClaimLimits {
    ClaimLimits::any(MAX_CLAIM_BATCH)
}

/// A sample job context.
pub(crate) fn context() -> JobContext {
    JobContext::from_json_value(&serde_json::json!({
        "AgentId": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11", "Username": "u",
        "ClientMachine": "m", "JobResult": "Failure",
        "JobId": "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01", "JobType": "WinCertInventory",
        "JobTypeId": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f", "OperationType": 0,
        "CurrentRetryCount": 2
    }))
    .unwrap()
}

/// A new event routed to `handlers`.
pub(crate) fn event(handlers: &[&str]) -> NewEvent {
    NewEvent {
        id: new_event_id(),
        source: "test".into(),
        context: context(),
        message: None,
        handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
    }
}

/// A failed attempt's record ending in `state`.
pub(crate) fn record(state: DeliveryState) -> AttemptRecord {
    AttemptRecord {
        state,
        retry_at: None,
        class: "handler-failed".into(),
        reason: Some("nope".into()),
        outcome: None,
        finished_at: Utc::now(),
    }
}

fn outcome(kind: OutcomeKind, log: &str) -> Outcome {
    Outcome {
        kind,
        duration: Duration::from_millis(12),
        logs: vec![LogLine {
            level: "info",
            message: log.to_owned(),
        }],
        logs_dropped: 0,
        stdout: String::new(),
        stderr: String::new(),
        output_dropped: 0,
        memory_bytes: 65536,
    }
}

fn sorted(mut counts: Vec<(DeliveryState, u64)>) -> Vec<(&'static str, u64)> {
    counts.sort_by_key(|(s, _)| s.as_str());
    counts.into_iter().map(|(s, n)| (s.as_str(), n)).collect()
}

pub(crate) fn events_are_delivered_once_per_handler_and_survive_reopen(b: &impl Backend) {
    let e = event(&["a", "b"]);
    {
        let store = b.node();
        store.insert_event(&e).unwrap();
    }
    let store = b.node();
    let c1 = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    let c2 = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    assert!(store.claim(Utc::now(), &[], LEASE).unwrap().is_none());
    assert_eq!(c1.event_id, e.id);
    assert_eq!(c1.context.as_ref().ok(), Some(&e.context));
    assert_eq!(c1.attempt, 1);
    let mut handlers = vec![c1.handler.clone(), c2.handler.clone()];
    handlers.sort();
    assert_eq!(handlers, ["a", "b"]);
    store
        .finish(&c1, &record(DeliveryState::Succeeded))
        .unwrap();
    store.finish(&c2, &record(DeliveryState::Failed)).unwrap();
    let view = store.event(e.id).unwrap().unwrap();
    assert_eq!(view.deliveries.len(), 2);
    assert!(view.deliveries.iter().all(|d| d.state.is_terminal()));
    assert!(view.deliveries.iter().all(|d| d.attempts.len() == 1));
    assert_eq!(view.context["JobResult"], "Failure");
    assert_eq!(view.source, "test");
    // Deliveries are listed in the order of the event's handlers.
    let listed: Vec<&str> = view.deliveries.iter().map(|d| d.handler.as_str()).collect();
    assert_eq!(listed, ["a", "b"]);
}

pub(crate) fn an_events_source_and_message_reach_its_claims_and_its_view(b: &impl Backend) {
    let store = b.node();
    let text = "Unable to open the store file \"C:\\certs\\é.pfx\": access denied\nline 2";
    let polled = NewEvent {
        source: SOURCE_POLLER.into(),
        message: Some(text.into()),
        ..event(&["a", "b"])
    };
    let posted = NewEvent {
        source: SOURCE_API.into(),
        ..event(&["a"])
    };
    store.insert_event(&polled).unwrap();
    store.insert_event(&posted).unwrap();
    // A batch claims both of the polled event's deliveries (read once for both) and the other's.
    let claims = store
        .claim_batch(Utc::now(), &limits(10, &[]), LEASE)
        .unwrap();
    assert_eq!(claims.len(), 3);
    for claim in &claims {
        if claim.event_id == polled.id {
            assert_eq!(claim.source, SOURCE_POLLER);
            assert_eq!(claim.message.as_deref(), Some(text));
        } else {
            assert_eq!(claim.source, SOURCE_API);
            assert_eq!(claim.message, None);
        }
    }
    let view = store.event(polled.id).unwrap().unwrap();
    assert_eq!(
        (view.source.as_str(), view.message.as_deref()),
        (SOURCE_POLLER, Some(text))
    );
    let view = store.event(posted.id).unwrap().unwrap();
    assert_eq!((view.source.as_str(), view.message), (SOURCE_API, None));
}

pub(crate) fn busy_handlers_are_skipped_when_claiming(b: &impl Backend) {
    let store = b.node();
    store.insert_event(&event(&["slow"])).unwrap();
    store.insert_event(&event(&["fast"])).unwrap();
    let c = store
        .claim(Utc::now(), &["slow".into()], LEASE)
        .unwrap()
        .unwrap();
    assert_eq!(c.handler, "fast");
    assert!(
        store
            .claim(Utc::now(), &["slow".into()], LEASE)
            .unwrap()
            .is_none()
    );
}

pub(crate) fn interrupted_deliveries_run_again_with_a_higher_attempt(b: &impl Backend) {
    let store = b.node();
    let e = event(&["a"]);
    store.insert_event(&e).unwrap();
    let first = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    // This process still holds the claim: nothing is abandoned.
    assert_eq!(store.requeue_abandoned(Utc::now()).unwrap(), 0);
    drop(store);
    // A new process (after a crash) finds the claim of the old one abandoned: at once for a
    // single-node store; for a shared one when the lease has expired.
    let store = b.node();
    if b.shared() {
        assert_eq!(store.requeue_abandoned(Utc::now()).unwrap(), 0);
        let expired = after(Utc::now(), LEASE + Duration::from_secs(1));
        assert_eq!(store.requeue_abandoned(expired).unwrap(), 1);
    } else {
        assert_eq!(store.requeue_abandoned(Utc::now()).unwrap(), 1);
    }
    let second = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    assert_eq!(second.attempt, 2);
    // The first (interrupted) attempt can no longer finish the delivery.
    store
        .finish(&first, &record(DeliveryState::Succeeded))
        .unwrap();
    store
        .finish(&second, &record(DeliveryState::Failed))
        .unwrap();
    let view = store.event(e.id).unwrap().unwrap();
    assert_eq!(view.deliveries[0].state, DeliveryState::Failed);
    // Both attempts are listed: the interrupted one (recorded by the requeue, not by its late
    // finish) and the one that finished the delivery.
    let attempts = &view.deliveries[0].attempts;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(attempts[0].class, INTERRUPTED_CLASS);
    assert!(!attempts[0].terminal);
    assert_eq!(attempts[1].attempt, 2);
    assert!(attempts[1].terminal);
}

pub(crate) fn release_all_gives_back_only_this_nodes_claims(b: &impl Backend) {
    let store = b.node();
    store.insert_event(&event(&["a", "b"])).unwrap();
    let _claim = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    store.renew(Utc::now(), LEASE).unwrap();
    assert_eq!(store.release_all().unwrap(), 1);
    assert_eq!(
        store.count_by_state().unwrap(),
        vec![(DeliveryState::Pending, 2)]
    );
}

pub(crate) fn release_all_leaves_other_nodes_claims_alone(b: &impl Backend) {
    let mine = b.node();
    let other = b.node();
    mine.insert_event(&event(&["a", "b", "c"])).unwrap();
    let _mine = mine.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    let theirs = other.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    assert_eq!(mine.release_all().unwrap(), 1);
    assert_eq!(
        sorted(mine.count_by_state().unwrap()),
        [("pending", 2), ("running", 1)]
    );
    // The other node's claim is intact: it can still record its attempt.
    other
        .finish(&theirs, &record(DeliveryState::Succeeded))
        .unwrap();
    assert_eq!(
        sorted(mine.count_by_state().unwrap()),
        [("pending", 2), ("succeeded", 1)]
    );
}

pub(crate) fn retries_wait_until_due(b: &impl Backend) {
    let store = b.node();
    store.insert_event(&event(&["a"])).unwrap();
    let c = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    let at = after(Utc::now(), Duration::from_secs(60));
    let mut r = record(DeliveryState::Pending);
    r.retry_at = Some(at);
    store.finish(&c, &r).unwrap();
    assert!(store.claim(Utc::now(), &[], LEASE).unwrap().is_none());
    assert_eq!(
        store.next_due(&every_handler()).unwrap().map(to_ms),
        Some(to_ms(at))
    );
    let again = store
        .claim(after(at, Duration::from_millis(1)), &[], LEASE)
        .unwrap()
        .unwrap();
    assert_eq!(again.attempt, 2);
}

/// The next due time a claim could act on: deliveries of a handler without room (at its cap,
/// quarantined) or not listed while `others` is 0 (not configured on this node) are left out,
/// however overdue, so that a retry of another handler due sooner is waited for.
pub(crate) fn the_next_due_time_counts_only_handlers_a_claim_could_take(b: &impl Backend) {
    let store = b.node();
    store.insert_event(&event(&["ready"])).unwrap();
    let c = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    let at = after(Utc::now(), Duration::from_secs(60));
    let mut r = record(DeliveryState::Pending);
    r.retry_at = Some(at);
    store.finish(&c, &r).unwrap();
    // Due now, and overdue by the time they are looked at.
    store.insert_event(&event(&["capped", "gone"])).unwrap();
    let now = after(Utc::now(), Duration::from_millis(1));
    let due_now = |limits: &ClaimLimits| {
        store
            .next_due(limits)
            .unwrap()
            .is_some_and(|due| due <= now)
    };
    assert!(due_now(&every_handler()));
    // This node has "capped" (no room left) and "ready", not "gone": the retry is next.
    let mut here = limits(8, &[("capped", 0), ("ready", 1)]);
    here.others = 0;
    assert_eq!(store.next_due(&here).unwrap().map(to_ms), Some(to_ms(at)));
    // A place comes free, or a node takes any handler: what is due now counts again.
    assert!(due_now(&limits(8, &[("capped", 1), ("ready", 1)])));
    assert!(due_now(&limits(8, &[("capped", 0), ("ready", 1)])));
    // No room anywhere: nothing to wait for.
    let mut none = limits(8, &[("capped", 0), ("ready", 0)]);
    none.others = 0;
    assert_eq!(store.next_due(&none).unwrap(), None);
}

pub(crate) fn cursor_and_events_commit_together(b: &impl Backend) {
    let store = b.node();
    assert_eq!(store.cursor("poller").unwrap(), None);
    store
        .insert_events_with_cursor(&[event(&["a"]), event(&[])], "poller", "2171")
        .unwrap();
    assert_eq!(store.cursor("poller").unwrap().as_deref(), Some("2171"));
    let counts = store.count_by_state().unwrap();
    assert_eq!(counts, vec![(DeliveryState::Pending, 1)]);
    store
        .insert_events_with_cursor(&[], "poller", "2200")
        .unwrap();
    assert_eq!(store.cursor("poller").unwrap().as_deref(), Some("2200"));
    // A cursor is durable: another node (or a restart) reads the same value.
    assert_eq!(b.node().cursor("poller").unwrap().as_deref(), Some("2200"));
}

pub(crate) fn failed_writes_commit_nothing(b: &impl Backend) {
    let store = b.node();
    let e = event(&["a"]);
    store.insert_event(&e).unwrap();
    assert!(store.insert_event(&e).is_err(), "an event id is unique");
    store
        .insert_events_with_cursor(&[event(&["a"])], "poller", "1")
        .unwrap();
    let twice = event(&["b"]);
    assert!(
        store
            .insert_events_with_cursor(&[twice.clone(), twice.clone()], "poller", "2")
            .is_err()
    );
    // Neither the events of the failed batch nor its cursor were committed.
    assert_eq!(store.cursor("poller").unwrap().as_deref(), Some("1"));
    assert!(store.event(twice.id).unwrap().is_none());
    assert_eq!(
        store.count_by_state().unwrap(),
        vec![(DeliveryState::Pending, 2)]
    );
}

pub(crate) fn unknown_events_are_none(b: &impl Backend) {
    let store = b.node();
    assert!(store.event(Uuid::new_v4()).unwrap().is_none());
}

pub(crate) fn an_empty_store_has_nothing_due(b: &impl Backend) {
    let store = b.node();
    assert_eq!(store.next_due(&every_handler()).unwrap(), None);
    assert!(store.count_by_state().unwrap().is_empty());
    assert!(store.claim(Utc::now(), &[], LEASE).unwrap().is_none());
    assert_eq!(store.requeue_abandoned(Utc::now()).unwrap(), 0);
    assert_eq!(store.release_all().unwrap(), 0);
    store.renew(Utc::now(), LEASE).unwrap();
    // An event no handler matches is kept, with no deliveries.
    let e = event(&[]);
    store.insert_event(&e).unwrap();
    assert!(store.event(e.id).unwrap().unwrap().deliveries.is_empty());
    assert_eq!(store.next_due(&every_handler()).unwrap(), None);
}

pub(crate) fn a_late_finish_after_takeover_is_ignored(b: &impl Backend) {
    let slow = b.node();
    let other = b.node();
    let e = event(&["a"]);
    slow.insert_event(&e).unwrap();
    let stale = slow.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    // `slow` stops renewing (hung, partitioned, killed); once its lease has expired another
    // node takes the delivery over.
    let later = after(Utc::now(), LEASE + Duration::from_secs(1));
    assert_eq!(other.requeue_abandoned(later).unwrap(), 1);
    let fresh = other.claim(later, &[], LEASE).unwrap().unwrap();
    assert_eq!(fresh.attempt, 2);
    // `slow` comes back and reports its attempt: too late, ignored, and it is told so.
    assert_eq!(
        slow.finish(&stale, &record(DeliveryState::Succeeded))
            .unwrap(),
        Finish::Late
    );
    let view = other.event(e.id).unwrap().unwrap();
    assert_eq!(view.deliveries[0].state, DeliveryState::Running);
    // Only the interrupted first attempt is listed, as the requeue recorded it.
    assert_eq!(view.deliveries[0].attempts.len(), 1);
    assert_eq!(view.deliveries[0].attempts[0].class, INTERRUPTED_CLASS);
    assert_eq!(
        other
            .finish(&fresh, &record(DeliveryState::Failed))
            .unwrap(),
        Finish::Recorded
    );
    // A repeated report of the same attempt changes nothing either.
    assert_eq!(
        other
            .finish(&fresh, &record(DeliveryState::Succeeded))
            .unwrap(),
        Finish::Late
    );
    let view = other.event(e.id).unwrap().unwrap();
    let d = &view.deliveries[0];
    assert_eq!(d.state, DeliveryState::Failed);
    assert_eq!(d.attempt, 2);
    assert_eq!(d.attempts.len(), 2);
    assert_eq!(d.attempts[0].attempt, 1);
    assert_eq!(d.attempts[0].class, INTERRUPTED_CLASS);
    assert!(!d.attempts[0].terminal);
    assert_eq!(d.attempts[1].attempt, 2);
    assert!(d.attempts[1].terminal);
    assert_eq!(d.reason.as_deref(), Some("nope"));
}

pub(crate) fn interrupted_attempts_are_listed_as_interrupted(b: &impl Backend) {
    let dead = b.node();
    let e = event(&["a", "b"]);
    dead.insert_event(&e).unwrap();
    let first = dead.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    let second = dead.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    drop(dead);
    // Another node (another process, for SQLite) finds both abandoned once the lease is over.
    let other = b.node();
    let later = after(Utc::now(), LEASE + Duration::from_secs(1));
    assert_eq!(other.requeue_abandoned(later).unwrap(), 2);
    // Nothing is recorded twice when the requeue runs again.
    assert_eq!(other.requeue_abandoned(later).unwrap(), 0);
    let view = other.event(e.id).unwrap().unwrap();
    for d in &view.deliveries {
        assert_eq!(d.state, DeliveryState::Pending, "{d:?}");
        assert_eq!(d.attempts.len(), 1, "{d:?}");
        let a = &d.attempts[0];
        assert_eq!(
            (a.attempt, a.class.as_str(), a.terminal),
            (1, INTERRUPTED_CLASS, false)
        );
        assert_eq!(a.reason.as_deref(), Some(ABANDONED_REASON));
        assert!(a.started_at.is_some(), "{a:?}");
    }
    assert_ne!(first.delivery_id, second.delivery_id);
    // Run again and handed back by a node shutting down: that attempt is listed too, and the
    // one after it finishes the delivery.
    let again = other.claim(later, &[], LEASE).unwrap().unwrap();
    assert_eq!(again.attempt, 2);
    assert_eq!(other.release_all().unwrap(), 1);
    let last = other.claim(later, &[], LEASE).unwrap().unwrap();
    assert_eq!((last.delivery_id, last.attempt), (again.delivery_id, 3));
    other
        .finish(&last, &record(DeliveryState::Succeeded))
        .unwrap();
    let view = other.event(e.id).unwrap().unwrap();
    let d = view
        .deliveries
        .iter()
        .find(|d| d.handler == again.handler)
        .unwrap();
    let listed: Vec<(u32, &str, bool)> = d
        .attempts
        .iter()
        .map(|a| (a.attempt, a.class.as_str(), a.terminal))
        .collect();
    assert_eq!(listed[0], (1, INTERRUPTED_CLASS, false));
    assert_eq!(listed[1], (2, INTERRUPTED_CLASS, false));
    assert_eq!(d.attempts[1].reason.as_deref(), Some(RELEASED_REASON));
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed[2].0 == 3 && listed[2].2, "{listed:?}");
}

pub(crate) fn claims_of_other_nodes_are_requeued_only_when_abandoned(b: &impl Backend) {
    let owner = b.node();
    let other = b.node();
    owner.insert_event(&event(&["a"])).unwrap();
    let now = Utc::now();
    let _claim = owner.claim(now, &[], LEASE).unwrap().unwrap();
    if b.shared() {
        // A live node's claim is kept while its lease runs, whoever looks.
        assert_eq!(other.requeue_abandoned(Utc::now()).unwrap(), 0);
        let almost = after(now, LEASE - Duration::from_secs(1));
        assert_eq!(other.requeue_abandoned(almost).unwrap(), 0);
        assert_eq!(owner.requeue_abandoned(almost).unwrap(), 0);
        let expired = after(now, LEASE + Duration::from_secs(1));
        assert_eq!(other.requeue_abandoned(expired).unwrap(), 1);
    } else {
        // One process per database: any claim of another process is a dead process's.
        assert_eq!(owner.requeue_abandoned(Utc::now()).unwrap(), 0);
        assert_eq!(other.requeue_abandoned(Utc::now()).unwrap(), 1);
    }
    assert_eq!(
        other.count_by_state().unwrap(),
        vec![(DeliveryState::Pending, 1)]
    );
}

pub(crate) fn renewing_keeps_this_nodes_claims_and_no_others(b: &impl Backend) {
    let renewer = b.node();
    let other = b.node();
    renewer.insert_event(&event(&["a", "b"])).unwrap();
    let t0 = Utc::now();
    let _mine = renewer.claim(t0, &[], LEASE).unwrap().unwrap();
    let _theirs = other.claim(t0, &[], LEASE).unwrap().unwrap();
    renewer.renew(after(t0, LEASE / 2), LEASE).unwrap();
    if !b.shared() {
        // Leases only matter between live nodes; a renewal must still leave the claim as is.
        assert_eq!(
            renewer.count_by_state().unwrap(),
            vec![(DeliveryState::Running, 2)]
        );
        return;
    }
    // Past the first lease only the claim that was not renewed is abandoned...
    let first_expiry = after(t0, LEASE + Duration::from_secs(1));
    assert_eq!(renewer.requeue_abandoned(first_expiry).unwrap(), 1);
    assert_eq!(
        sorted(renewer.count_by_state().unwrap()),
        [("pending", 1), ("running", 1)]
    );
    // ...and the renewed one when its renewed lease runs out.
    let second_expiry = after(t0, LEASE * 3 / 2 + Duration::from_secs(1));
    assert_eq!(other.requeue_abandoned(second_expiry).unwrap(), 1);
    assert_eq!(
        renewer.count_by_state().unwrap(),
        vec![(DeliveryState::Pending, 2)]
    );
}

/// A claim or a renewal asked for before a wait longer than its lease (for a pooled connection
/// while the server restarts) is stamped when the store takes it: it does not begin already
/// expired, for another node to requeue while this one runs the delivery.
pub(crate) fn claims_and_renewals_asked_for_before_a_wait_are_stamped_when_taken(b: &impl Backend) {
    if !b.shared() {
        // One process per database: its own claims are never requeued while it runs.
        return;
    }
    let owner = b.node();
    let other = b.node();
    owner.insert_event(&event(&["a", "b"])).unwrap();
    let lease = Duration::from_millis(400);
    let asked = owner.now();
    std::thread::sleep(lease * 2);
    let claims = owner
        .claim_batch(asked, &ClaimLimits::any(1), lease)
        .unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        other.requeue_abandoned(other.now()).unwrap(),
        0,
        "a claim began with its lease run out"
    );
    let renewal_asked = owner.now();
    std::thread::sleep(lease * 2);
    owner.renew(renewal_asked, lease).unwrap();
    assert_eq!(
        other.requeue_abandoned(other.now()).unwrap(),
        0,
        "a renewal ended the lease at once"
    );
}

pub(crate) fn concurrent_claims_hand_out_each_delivery_once(b: &impl Backend) {
    claim_everything_concurrently(b, 20, &["a", "b"], |node| {
        let claim = node.claim(Utc::now(), &[], LEASE).unwrap();
        if let Some(claim) = &claim {
            node.finish(claim, &record(DeliveryState::Succeeded))
                .unwrap();
        }
        claim.map(|c| c.delivery_id).into_iter().collect()
    });
}

/// Commits `events` events routed to `handlers` on one node, then has three threads on each of
/// two nodes `take` (claim and finish) until it gets nothing; checks that every delivery was
/// taken exactly once and finished.
fn claim_everything_concurrently<S: EventStore>(
    b: &impl Backend<S = S>,
    events: usize,
    handlers: &[&str],
    take: impl Fn(&S) -> Vec<i64> + Sync,
) {
    const THREADS_PER_NODE: usize = 3;
    let nodes = [b.node(), b.node()];
    for _ in 0..events {
        nodes[0].insert_event(&event(handlers)).unwrap();
    }
    let take = &take;
    let claimed: Vec<i64> = std::thread::scope(|scope| {
        let workers: Vec<_> = nodes
            .iter()
            .flat_map(|node| std::iter::repeat_n(node, THREADS_PER_NODE))
            .map(|node| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let taken = take(node);
                        if taken.is_empty() {
                            break mine;
                        }
                        mine.extend(taken);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let deliveries = events * handlers.len();
    let distinct: BTreeSet<i64> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), deliveries, "every delivery claimed once");
    assert_eq!(distinct.len(), deliveries, "no delivery claimed twice");
    assert_eq!(
        nodes[1].count_by_state().unwrap(),
        vec![(DeliveryState::Succeeded, deliveries as u64)]
    );
}

/// Limits of `max` in all, with these handlers' room.
fn limits(max: usize, room: &[(&str, usize)]) -> ClaimLimits {
    ClaimLimits {
        max,
        room: room.iter().map(|(h, n)| ((*h).to_owned(), *n)).collect(),
        others: usize::MAX,
        shares: Default::default(),
    }
}

fn handlers_of(claims: &[super::Claim]) -> Vec<&str> {
    let mut names: Vec<&str> = claims.iter().map(|c| c.handler.as_str()).collect();
    names.sort();
    names
}

pub(crate) fn batch_claims_respect_the_batch_size_and_each_handlers_room(b: &impl Backend) {
    let store = b.node();
    for _ in 0..3 {
        store
            .insert_event(&event(&["capped", "free", "off"]))
            .unwrap();
    }
    // Nothing asked, nothing claimed.
    assert!(
        store
            .claim_batch(Utc::now(), &limits(0, &[]), LEASE)
            .unwrap()
            .is_empty()
    );
    // Room for one "capped", none for "off", "free" unlimited: 1 + 3 of the 9.
    let room = [("capped", 1), ("off", 0)];
    let first = store
        .claim_batch(Utc::now(), &limits(100, &room), LEASE)
        .unwrap();
    assert_eq!(handlers_of(&first), ["capped", "free", "free", "free"]);
    assert!(first.iter().all(|c| c.attempt == 1));
    // What was claimed is running: only the unclaimed ones are left, and the total is capped.
    let second = store
        .claim_batch(Utc::now(), &limits(3, &[("off", 0)]), LEASE)
        .unwrap();
    assert_eq!(handlers_of(&second), ["capped", "capped"]);
    let third = store
        .claim_batch(Utc::now(), &limits(2, &[]), LEASE)
        .unwrap();
    assert_eq!(handlers_of(&third), ["off", "off"]);
    let rest = store
        .claim_batch(Utc::now(), &limits(usize::MAX, &[]), LEASE)
        .unwrap();
    assert_eq!(handlers_of(&rest), ["off"]);
    assert_eq!(
        store.count_by_state().unwrap(),
        vec![(DeliveryState::Running, 9)]
    );
    // However much is asked, one batch is bounded.
    for _ in 0..MAX_CLAIM_BATCH {
        store.insert_event(&event(&["x", "y"])).unwrap();
    }
    let big = store
        .claim_batch(Utc::now(), &limits(usize::MAX, &[]), LEASE)
        .unwrap();
    assert_eq!(big.len(), MAX_CLAIM_BATCH);
}

pub(crate) fn batch_claims_are_oldest_first_and_decode_each_context(b: &impl Backend) {
    let store = b.node();
    let mut contexts = Vec::new();
    let mut ids = Vec::new();
    for retry in 0..4 {
        let mut e = event(&["a", "b"]);
        let mut json = e.context.to_json();
        json["CurrentRetryCount"] = serde_json::json!(retry);
        e.context = JobContext::from_json_value(&json).unwrap();
        store.insert_event(&e).unwrap();
        contexts.push(e.context.clone());
        ids.push(e.id);
        // Distinct commit times, so "oldest" is well defined across events.
        std::thread::sleep(Duration::from_millis(3));
    }
    let claims = store
        .claim_batch(Utc::now(), &limits(8, &[]), LEASE)
        .unwrap();
    let events: Vec<Uuid> = claims.iter().map(|c| c.event_id).collect();
    let expected: Vec<Uuid> = ids.iter().flat_map(|id| [*id, *id]).collect();
    assert_eq!(events, expected, "oldest event first");
    for claim in &claims {
        let index = ids.iter().position(|id| *id == claim.event_id).unwrap();
        assert_eq!(
            claim.context.as_ref().ok(),
            Some(&contexts[index]),
            "each claim has its own event's context"
        );
    }
}

/// A claim with fewer slots than due deliveries shares them between handlers: each next one to
/// the handler with the fewest running on the node (plus those the claim already gave it), among
/// those to the one served longest ago, then to the oldest due delivery; within a handler the
/// oldest first. Oldest first across handlers gave every slot to the handler with the oldest
/// backlog, however many of its deliveries were running already. The claim is answered oldest
/// first.
pub(crate) fn a_claim_short_of_slots_shares_them_between_handlers(b: &impl Backend) {
    let store = b.node();
    let mut ids = std::collections::BTreeMap::<&str, Vec<Uuid>>::new();
    // The slow handler's backlog is the oldest.
    for handler in [
        "slow", "slow", "slow", "slow", "quick", "quick", "other", "other",
    ] {
        let e = event(&[handler]);
        store.insert_event(&e).unwrap();
        ids.entry(handler).or_default().push(e.id);
        // Distinct due times, so "oldest" is well defined.
        std::thread::sleep(Duration::from_millis(3));
    }
    let share = |running, served| Share { running, served };
    let events = |claims: &[super::Claim]| claims.iter().map(|c| c.event_id).collect::<Vec<_>>();
    // "slow" runs two already, the others none: three slots go to "quick" and "other", the
    // third to the older of their second deliveries.
    let mut three = limits(3, &[]);
    three.shares = [("slow".to_owned(), share(2, 1))].into();
    let claims = store.claim_batch(Utc::now(), &three, LEASE).unwrap();
    assert_eq!(
        events(&claims),
        [ids["quick"][0], ids["quick"][1], ids["other"][0]],
        "{:?}",
        handlers_of(&claims)
    );
    // "slow" and "other" run one each: of the two slots, the first goes to the one served
    // longest ago ("other"), the second to "slow", which then runs as many.
    let mut two = limits(2, &[]);
    two.shares = [
        ("slow".to_owned(), share(1, 9)),
        ("other".to_owned(), share(1, 4)),
    ]
    .into();
    let claims = store.claim_batch(Utc::now(), &two, LEASE).unwrap();
    assert_eq!(events(&claims), [ids["slow"][0], ids["other"][1]]);
    // Slots to spare: everything due, within each handler's room, oldest first.
    let mut spare = limits(8, &[("slow", 2)]);
    spare.shares = [("slow".to_owned(), share(5, 9))].into();
    let claims = store.claim_batch(Utc::now(), &spare, LEASE).unwrap();
    assert_eq!(events(&claims), [ids["slow"][1], ids["slow"][2]]);
}

pub(crate) fn a_stored_context_that_cannot_be_read_fails_only_its_own_claims(b: &impl Backend) {
    let store = b.node();
    let events: Vec<NewEvent> = (0..3).map(|_| event(&["a", "b"])).collect();
    for e in &events {
        store.insert_event(e).unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    let spoiled = events[1].id;
    b.spoil_context(&store, spoiled);
    let claims = store
        .claim_batch(Utc::now(), &limits(8, &[]), LEASE)
        .expect("the claim itself succeeds");
    assert_eq!(claims.len(), 6, "every delivery is claimed");
    for claim in &claims {
        match (&claim.context, claim.event_id == spoiled) {
            (Err(reason), true) => {
                assert!(reason.contains("cannot be read"), "{reason}");
                assert!(reason.contains(&spoiled.to_string()), "{reason}");
            }
            (Ok(context), false) => {
                let e = events.iter().find(|e| e.id == claim.event_id).unwrap();
                assert_eq!(*context, e.context);
            }
            (context, spoiled) => panic!("spoiled: {spoiled}, context: {context:?}"),
        }
    }
    // Each is finished as any claim is.
    for claim in &claims {
        let record = AttemptRecord {
            state: DeliveryState::Failed,
            retry_at: None,
            class: "engine-error".into(),
            reason: claim.context.as_ref().err().cloned(),
            outcome: None,
            finished_at: Utc::now(),
        };
        assert!(matches!(store.finish(claim, &record), Ok(Finish::Recorded)));
    }
    assert_eq!(
        store.count_by_state().unwrap(),
        vec![(DeliveryState::Failed, 6)]
    );
}

/// A context's text fields hold whatever JSON strings can: NUL (which PostgreSQL's `jsonb` and
/// `text` refuse), other control characters, line and paragraph separators, characters outside
/// the BMP. What ingest accepts is stored, claimed and shown unchanged.
pub(crate) fn any_text_ingest_accepts_is_stored_and_read_back_unchanged(b: &impl Backend) {
    let store = b.node();
    let text = "a\u{0}b\u{1}\u{7f}\u{2028}\u{2029}\u{feff}é😀\\\"'";
    let mut json = context().to_json();
    json["Username"] = serde_json::json!(text);
    json["ClientMachine"] = serde_json::json!(text);
    json["JobType"] = serde_json::json!(text);
    let mut e = event(&["a"]);
    e.context = JobContext::from_json_value(&json).unwrap();
    // A message has had its NULs replaced before it reaches a store
    // (`Delivery::job_message`); the rest of the text is kept.
    let message = text.replace('\0', "\u{fffd}");
    e.message = Some(message.clone());
    store.insert_event(&e).unwrap();
    let claims = store
        .claim_batch(Utc::now(), &limits(8, &[]), LEASE)
        .unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].context.as_ref().ok(), Some(&e.context));
    assert_eq!(claims[0].message.as_deref(), Some(message.as_str()));
    let view = store.event(e.id).unwrap().expect("the event");
    assert_eq!(view.context["Username"], serde_json::json!(text));
}

/// A node claims only the handlers it lists when `others` is 0: a delivery of a handler it does
/// not have stays pending, for a node (or a later configuration) that has it.
pub(crate) fn deliveries_of_handlers_not_listed_stay_pending_when_others_is_zero(b: &impl Backend) {
    let store = b.node();
    store.insert_event(&event(&["a", "gone"])).unwrap();
    let mut only_a = limits(8, &[("a", 4)]);
    only_a.others = 0;
    let claims = store.claim_batch(Utc::now(), &only_a, LEASE).unwrap();
    assert_eq!(handlers_of(&claims), ["a"]);
    assert!(
        store
            .claim_batch(Utc::now(), &only_a, LEASE)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.pending_by_handler().unwrap(),
        [("gone".to_owned(), 1)]
    );
    // A node that has `gone` claims it.
    let claims = store
        .claim_batch(Utc::now(), &limits(8, &[("gone", 1)]), LEASE)
        .unwrap();
    assert_eq!(handlers_of(&claims), ["gone"]);
}

pub(crate) fn concurrent_batch_claims_hand_out_each_delivery_once(b: &impl Backend) {
    claim_everything_concurrently(b, 60, &["a", "b", "c"], |node| {
        let claims = node
            .claim_batch(Utc::now(), &limits(7, &[]), LEASE)
            .unwrap();
        let done = record(DeliveryState::Succeeded);
        let finished: Vec<_> = claims.iter().map(|c| (c, &done)).collect();
        if !finished.is_empty() {
            node.finish_batch(&finished).unwrap();
        }
        claims.iter().map(|c| c.delivery_id).collect()
    });
}

pub(crate) fn a_batch_finish_records_all_and_ignores_only_stale_claims(b: &impl Backend) {
    let store = b.node();
    store.insert_event(&event(&["a", "b", "c"])).unwrap();
    let claims = store
        .claim_batch(Utc::now(), &limits(3, &[]), LEASE)
        .unwrap();
    assert_eq!(claims.len(), 3);
    // The first claim goes stale: its delivery is released and claimed again.
    assert_eq!(store.release_all().unwrap(), 3);
    let again = store
        .claim_batch(Utc::now(), &limits(3, &[]), LEASE)
        .unwrap();
    assert_eq!(again.len(), 3);
    let (stale, fresh) = (&claims[0], &again[1..]);
    let failed = record(DeliveryState::Failed);
    let done = record(DeliveryState::Succeeded);
    let mut finished = vec![(stale, &done)];
    finished.extend(fresh.iter().map(|c| (c, &failed)));
    store.finish_batch(&finished).unwrap();
    // The stale attempt recorded nothing; the two fresh ones were recorded; the delivery of
    // the stale claim is still running under its new claim.
    assert_eq!(
        sorted(store.count_by_state().unwrap()),
        [("failed", 2), ("running", 1)]
    );
    let still_running = again
        .iter()
        .find(|c| c.delivery_id == stale.delivery_id)
        .unwrap();
    store.finish(still_running, &done).unwrap();
    assert_eq!(
        sorted(store.count_by_state().unwrap()),
        [("failed", 2), ("succeeded", 1)]
    );
    let view = store.event(claims[0].event_id).unwrap().unwrap();
    // Each delivery lists its interrupted first attempt and its recorded second one.
    assert!(view.deliveries.iter().all(|d| d.attempts.len() == 2));
    assert!(view.deliveries.iter().all(|d| {
        d.attempts[0].class == INTERRUPTED_CLASS
            && !d.attempts[0].terminal
            && d.attempts[1].attempt == 2
            && d.attempts[1].terminal
    }));
    assert!(view.deliveries.iter().all(|d| d.attempt == 2));
}

/// A record no attempt can lead to (here: back to pending with no time to retry at) is refused
/// before anything is written, and so is the rest of its batch: the deliveries stay running
/// under their claims, and the same claims finish once the records are right.
pub(crate) fn a_batch_with_a_record_no_attempt_leads_to_records_none_of_it(b: &impl Backend) {
    let store = b.node();
    store.insert_event(&event(&["a", "b"])).unwrap();
    let claims = store
        .claim_batch(Utc::now(), &limits(2, &[]), LEASE)
        .unwrap();
    assert_eq!(claims.len(), 2);
    let done = record(DeliveryState::Succeeded);
    let nowhere = record(DeliveryState::Pending);
    for wrong in [
        vec![(&claims[0], &done), (&claims[1], &nowhere)],
        vec![(&claims[0], &nowhere)],
    ] {
        let refused = store.finish_batch(&wrong);
        assert!(
            matches!(refused, Err(StoreError::InvalidTransition(_))),
            "{refused:?}"
        );
        assert_eq!(sorted(store.count_by_state().unwrap()), [("running", 2)]);
    }
    store
        .finish_batch(&[(&claims[0], &done), (&claims[1], &done)])
        .unwrap();
    assert_eq!(sorted(store.count_by_state().unwrap()), [("succeeded", 2)]);
}

pub(crate) fn outcomes_logs_and_attempt_history_are_kept(b: &impl Backend) {
    let store = b.node();
    let e = event(&["a"]);
    store.insert_event(&e).unwrap();
    let first = store.claim(Utc::now(), &[], LEASE).unwrap().unwrap();
    // A handler's text can hold anything, NUL included; recording it must not fail.
    let failed = OutcomeKind::HandlerFailed {
        reason: "bad\0input".into(),
    };
    store
        .finish(
            &first,
            &AttemptRecord {
                state: DeliveryState::Pending,
                retry_at: Some(Utc::now()),
                class: failed.class().into(),
                reason: Some(failed.to_string()),
                outcome: Some(outcome(failed, "first\0try")),
                finished_at: Utc::now(),
            },
        )
        .unwrap();
    let second = store
        .claim(after(Utc::now(), Duration::from_secs(1)), &[], LEASE)
        .unwrap()
        .unwrap();
    assert_eq!(second.attempt, 2);
    // The attempt ends; its record is committed later (as a group commit does).
    let ended = Utc::now();
    std::thread::sleep(Duration::from_millis(30));
    store
        .finish(
            &second,
            &AttemptRecord {
                state: DeliveryState::Succeeded,
                retry_at: None,
                class: "succeeded".into(),
                reason: None,
                outcome: Some(outcome(OutcomeKind::Succeeded, "done\0")),
                finished_at: ended,
            },
        )
        .unwrap();
    let view = store.event(e.id).unwrap().unwrap();
    let d = &view.deliveries[0];
    assert_eq!(d.state, DeliveryState::Succeeded);
    assert_eq!(d.attempt, 2);
    assert_eq!(d.outcome.as_deref(), Some("succeeded"));
    assert_eq!(d.reason, None);
    assert_eq!(d.duration_ms, Some(12.0));
    assert!(d.started_at.is_some());
    // Recorded as ending when it ended, not when its record was committed.
    let millis = |t: Option<chrono::DateTime<Utc>>| t.map(|t| t.timestamp_millis());
    assert_eq!(millis(d.finished_at), millis(Some(ended)));
    assert_eq!(
        millis(d.attempts.last().map(|a| a.finished_at)),
        millis(Some(ended))
    );
    // The last attempt's logs, exactly as the handler wrote them.
    assert_eq!(d.logs.len(), 1);
    assert_eq!(d.logs[0]["message"], "done\0");
    assert_eq!(d.logs[0]["level"], "info");
    let history: Vec<(u32, &str, bool)> = d
        .attempts
        .iter()
        .map(|a| (a.attempt, a.class.as_str(), a.terminal))
        .collect();
    assert_eq!(
        history,
        [(1, "handler-failed", false), (2, "succeeded", true)]
    );
    let reason = d.attempts[0].reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("handler failed: bad"), "{reason:?}");
    assert!(d.attempts.iter().all(|a| a.started_at.is_some()));
}

pub(crate) fn one_node_leads_a_role_until_it_is_gone(b: &impl Backend) {
    let first = b.node();
    let second = b.node();
    assert!(first.try_lead("poller").unwrap());
    assert!(first.try_lead("poller").unwrap(), "leadership is kept");
    if !b.shared() {
        // One node per database: it always leads.
        assert!(second.try_lead("poller").unwrap());
        return;
    }
    assert!(!second.try_lead("poller").unwrap(), "one leader at a time");
    assert!(second.try_lead("janitor").unwrap(), "roles are independent");
    assert!(first.try_lead("poller").unwrap());
    drop(first);
    // The lock goes with the first node's session; the server releases it once the session
    // has ended, which it notices as soon as the connection closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.try_lead("poller").unwrap() {
        assert!(
            Instant::now() < deadline,
            "leadership did not move to the surviving node"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(second.try_lead("poller").unwrap());
}

pub(crate) fn nodes_starting_together_migrate_once(b: &impl Backend) {
    if !b.shared() {
        // One process opens a SQLite database at a time.
        return;
    }
    // Every node applies pending migrations on start; on a fresh database they all do at once.
    let nodes: Vec<_> = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..4).map(|_| scope.spawn(|| b.node())).collect();
        starting.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let e = event(&["a"]);
    nodes[0].insert_event(&e).unwrap();
    for node in &nodes {
        assert!(node.event(e.id).unwrap().is_some());
    }
}

/// A retention no test outlives.
const HOUR: Duration = Duration::from_secs(3600);

fn pending(store: &impl EventStore) -> u64 {
    store
        .count_by_state()
        .unwrap()
        .into_iter()
        .filter(|(s, _)| *s == DeliveryState::Pending)
        .map(|(_, n)| n)
        .sum()
}

pub(crate) fn a_key_used_twice_commits_one_event(b: &impl Backend) {
    let first = event(&["a", "b"]);
    let key = Idempotency::new("fwd-1/evt-1", &first.context, HOUR);
    {
        let store = b.node();
        assert_eq!(
            store.insert_event_once(&first, &key).unwrap(),
            Inserted::New
        );
    }
    // Again after a restart (another store on the database), with a new event id and the
    // handlers routed differently: the original event and its deliveries are the answer.
    let store = b.node();
    let again = event(&["c"]);
    assert_eq!(
        store.insert_event_once(&again, &key).unwrap(),
        Inserted::Existing {
            event_id: first.id,
            handlers: vec!["a".into(), "b".into()],
        }
    );
    assert!(
        store.event(again.id).unwrap().is_none(),
        "nothing new committed"
    );
    assert_eq!(pending(&store), 2);
    // Another key is another event.
    let other = event(&["a"]);
    let other_key = Idempotency::new("fwd-1/evt-2", &other.context, HOUR);
    assert_eq!(
        store.insert_event_once(&other, &other_key).unwrap(),
        Inserted::New
    );
    assert_eq!(pending(&store), 3);
}

pub(crate) fn a_key_reused_for_another_context_conflicts(b: &impl Backend) {
    let store = b.node();
    let first = event(&["a"]);
    let key = Idempotency::new("k", &first.context, HOUR);
    store.insert_event_once(&first, &key).unwrap();
    let mut different = event(&["a"]);
    different.context.current_retry_count += 1;
    let reused = Idempotency::new("k", &different.context, HOUR);
    assert_ne!(reused.fingerprint, key.fingerprint);
    match store.insert_event_once(&different, &reused) {
        Err(StoreError::IdempotencyConflict { event_id }) => assert_eq!(event_id, first.id),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(store.event(different.id).unwrap().is_none());
    assert_eq!(pending(&store), 1);
}

pub(crate) fn a_key_past_its_retention_is_new(b: &impl Backend) {
    let store = b.node();
    let first = event(&["a"]);
    store
        .insert_event_once(&first, &Idempotency::new("k", &first.context, HOUR))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // A retention shorter than the key's age: the key counts as new, and is the new event's.
    let later = event(&["a"]);
    let short = Idempotency::new("k", &later.context, Duration::from_millis(10));
    assert_eq!(
        store.insert_event_once(&later, &short).unwrap(),
        Inserted::New
    );
    assert_eq!(pending(&store), 2);
    let again = event(&["a"]);
    assert_eq!(
        store
            .insert_event_once(&again, &Idempotency::new("k", &again.context, HOUR))
            .unwrap(),
        Inserted::Existing {
            event_id: later.id,
            handlers: vec!["a".into()],
        }
    );
}

pub(crate) fn concurrent_inserts_with_one_key_commit_one_event(b: &impl Backend) {
    const THREADS_PER_NODE: usize = 4;
    const ROUNDS: usize = 10;
    // Two nodes (two stores on the database: two engine nodes on PostgreSQL), several threads
    // each, all sending the same key at once, for several keys.
    let nodes = [b.node(), b.node()];
    for round in 0..ROUNDS {
        let key = format!("race-{round}");
        let barrier = std::sync::Barrier::new(nodes.len() * THREADS_PER_NODE);
        let results: Vec<(uuid::Uuid, Inserted)> = std::thread::scope(|scope| {
            let workers: Vec<_> = nodes
                .iter()
                .flat_map(|node| std::iter::repeat_n(node, THREADS_PER_NODE))
                .map(|node| {
                    let (key, barrier) = (&key, &barrier);
                    scope.spawn(move || {
                        let e = event(&["a"]);
                        let k = Idempotency::new(key.clone(), &e.context, HOUR);
                        barrier.wait();
                        (e.id, node.insert_event_once(&e, &k).unwrap())
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let new: Vec<uuid::Uuid> = results
            .iter()
            .filter(|(_, r)| *r == Inserted::New)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(new.len(), 1, "exactly one insert wins: {results:?}");
        for (_, result) in &results {
            if let Inserted::Existing { event_id, handlers } = result {
                assert_eq!(*event_id, new[0]);
                assert_eq!(handlers, &vec!["a".to_owned()]);
            }
        }
    }
    assert_eq!(pending(&nodes[1]), ROUNDS as u64, "one event per key");
}

pub(crate) fn expired_keys_are_purged_in_bounded_batches(b: &impl Backend) {
    let store = b.node();
    for n in 0..5 {
        let e = event(&["a"]);
        store
            .insert_event_once(&e, &Idempotency::new(format!("k{n}"), &e.context, HOUR))
            .unwrap();
    }
    let before_all = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.purge_idempotency_keys(before_all, 100).unwrap(), 0);
    std::thread::sleep(Duration::from_millis(5));
    let now = Utc::now();
    assert_eq!(store.purge_idempotency_keys(now, 2).unwrap(), 2);
    assert_eq!(store.purge_idempotency_keys(now, 100).unwrap(), 3);
    assert_eq!(store.purge_idempotency_keys(now, 100).unwrap(), 0);
    // The events stay; a purged key is new again.
    assert_eq!(pending(&store), 5);
    let e = event(&["a"]);
    assert_eq!(
        store
            .insert_event_once(&e, &Idempotency::new("k0", &e.context, HOUR))
            .unwrap(),
        Inserted::New
    );
}

/// Claims every due delivery of `store` and ends each as `end` says of its (event, handler);
/// returns the claims by (event, handler).
fn run_all(
    store: &impl EventStore,
    end: impl Fn(Uuid, &str) -> DeliveryState,
) -> std::collections::BTreeMap<(Uuid, String), super::Claim> {
    let mut claimed = std::collections::BTreeMap::new();
    loop {
        let claims = store
            .claim_batch(store.now(), &ClaimLimits::any(MAX_CLAIM_BATCH), LEASE)
            .unwrap();
        if claims.is_empty() {
            return claimed;
        }
        for claim in claims {
            let state = end(claim.event_id, &claim.handler);
            let mut r = record(state);
            if state == DeliveryState::Pending {
                r.retry_at = Some(after(store.now(), Duration::from_secs(3600)));
            }
            assert_eq!(store.finish(&claim, &r).unwrap(), Finish::Recorded);
            claimed.insert((claim.event_id, claim.handler.clone()), claim);
        }
    }
}

/// The failed list's (event, handler) pairs, in its order.
fn failed_pairs(store: &impl EventStore, filter: &FailedFilter, max: usize) -> Vec<(Uuid, String)> {
    store
        .failed_deliveries(filter, max)
        .unwrap()
        .into_iter()
        .map(|d| (d.event_id, d.handler))
        .collect()
}

pub(crate) fn failed_deliveries_are_listed_newest_first_and_filtered(b: &impl Backend) {
    let store = b.node();
    let (e1, e2, e3) = (event(&["a", "b"]), event(&["a", "b"]), event(&["a", "b"]));
    for e in [&e1, &e2, &e3] {
        store.insert_event(e).unwrap();
    }
    // Failed for good: e1's a, e2's a and b, e3's b. e1's b succeeded; e3's a failed with a
    // retry to come (pending): neither is listed.
    let claims = run_all(&store, |e, h| match (e == e1.id, e == e3.id, h) {
        (true, _, "b") => DeliveryState::Succeeded,
        (_, true, "a") => DeliveryState::Pending,
        _ => DeliveryState::Failed,
    });
    let id = |e: &NewEvent, h: &str| claims[&(e.id, h.to_owned())].delivery_id;
    let pair = |e: &NewEvent, h: &str| (e.id, h.to_owned());
    let all = FailedFilter::default();
    assert_eq!(
        failed_pairs(&store, &all, 100),
        [
            pair(&e3, "b"),
            pair(&e2, "b"),
            pair(&e2, "a"),
            pair(&e1, "a")
        ],
        "newest first"
    );
    // Counted by handler, beside the one pending for its retry.
    let count = |h: &str, n: u64| (h.to_owned(), n);
    assert_eq!(
        store.failed_by_handler().unwrap(),
        [count("a", 2), count("b", 2)]
    );
    assert_eq!(store.pending_by_handler().unwrap(), [count("a", 1)]);
    let listed = store.failed_deliveries(&all, 1).unwrap();
    let [only] = listed.as_slice() else {
        panic!("one asked for: {listed:?}")
    };
    assert_eq!(only.id, id(&e3, "b"));
    assert_eq!(only.attempt, 1);
    assert_eq!(only.outcome.as_deref(), Some("handler-failed"));
    assert_eq!(only.reason.as_deref(), Some("nope"));
    assert!(only.finished_at.is_some());

    let of_a = FailedFilter {
        handler: Some("a".into()),
        ..all.clone()
    };
    assert_eq!(
        failed_pairs(&store, &of_a, 100),
        [pair(&e2, "a"), pair(&e1, "a")]
    );
    let of_e2 = FailedFilter {
        event: Some(e2.id),
        ..all.clone()
    };
    assert_eq!(
        failed_pairs(&store, &of_e2, 100),
        [pair(&e2, "b"), pair(&e2, "a")]
    );
    let both = FailedFilter {
        handler: Some("b".into()),
        event: Some(e1.id),
        before: None,
    };
    assert_eq!(failed_pairs(&store, &both, 100), []);
    // The next page starts below the last one shown.
    let next = FailedFilter {
        before: Some(id(&e2, "b")),
        ..all.clone()
    };
    assert_eq!(
        failed_pairs(&store, &next, 100),
        [pair(&e2, "a"), pair(&e1, "a")]
    );
    let unknown = FailedFilter {
        handler: Some("no-such-handler".into()),
        ..all
    };
    assert_eq!(failed_pairs(&store, &unknown, 100), []);
    // Another node reads the same list.
    assert_eq!(failed_pairs(&b.node(), &of_a, 100).len(), 2);
}

pub(crate) fn failed_deliveries_run_again_with_their_next_attempt(b: &impl Backend) {
    let store = b.node();
    let (e1, e2) = (event(&["a", "b"]), event(&["a"]));
    store.insert_event(&e1).unwrap();
    store.insert_event(&e2).unwrap();
    run_all(&store, |_, _| DeliveryState::Failed);
    assert_eq!(states(&store), [("failed", 3)]);

    // e1's a only: its b and e2's a stay failed.
    let which = FailedFilter {
        handler: Some("a".into()),
        event: Some(e1.id),
        before: None,
    };
    let requeued = store.retry_failed(&which, store.now(), 100).unwrap();
    assert_eq!(requeued.len(), 1);
    assert_eq!(states(&store), [("failed", 2), ("pending", 1)]);
    assert_eq!(
        store.failed_by_handler().unwrap(),
        [("a".to_owned(), 1), ("b".to_owned(), 1)],
        "a delivery run again is no longer counted as failed"
    );
    assert_eq!(
        store.retry_failed(&which, store.now(), 100).unwrap(),
        Vec::<i64>::new()
    );
    let again = store.claim(store.now(), &[], LEASE).unwrap().unwrap();
    assert_eq!((again.event_id, again.handler.as_str()), (e1.id, "a"));
    assert_eq!(again.delivery_id, requeued[0]);
    assert_eq!(again.attempt, 2, "the next attempt number");
    assert!(store.claim(store.now(), &[], LEASE).unwrap().is_none());
    store
        .finish(&again, &record(DeliveryState::Succeeded))
        .unwrap();
    let view = store.event(e1.id).unwrap().unwrap();
    let a = view.deliveries.iter().find(|d| d.handler == "a").unwrap();
    assert_eq!(a.state, DeliveryState::Succeeded);
    let history: Vec<(u32, bool)> = a.attempts.iter().map(|t| (t.attempt, t.terminal)).collect();
    assert_eq!(history, [(1, true), (2, true)], "both attempts kept");

    // Every failed delivery of handler a: e2's (e1's succeeded).
    let of_a = FailedFilter {
        handler: Some("a".into()),
        ..FailedFilter::default()
    };
    assert_eq!(
        store.retry_failed(&of_a, store.now(), 100).unwrap().len(),
        1
    );
    assert_eq!(
        states(&store),
        [("failed", 1), ("pending", 1), ("succeeded", 1)]
    );
    // Made due at the time given, no sooner.
    let later = after(store.now(), Duration::from_secs(3600));
    let b_only = FailedFilter {
        handler: Some("b".into()),
        ..FailedFilter::default()
    };
    assert_eq!(store.retry_failed(&b_only, later, 100).unwrap().len(), 1);
    let due = store
        .claim_batch(store.now(), &ClaimLimits::any(10), LEASE)
        .unwrap();
    assert_eq!(handlers_of(&due), ["a"]);
    assert_eq!(
        store.next_due(&every_handler()).unwrap().map(to_ms),
        Some(to_ms(later))
    );
}

pub(crate) fn failed_deliveries_run_again_in_bounded_batches_newest_first(b: &impl Backend) {
    let store = b.node();
    // More than a page of the list and two batches of a retry.
    let events: Vec<NewEvent> = (0..MAX_FAILED_PAGE + 1).map(|_| event(&["a"])).collect();
    for e in &events {
        store.insert_event(e).unwrap();
    }
    let claims = run_all(&store, |_, _| DeliveryState::Failed);
    let mut ids: Vec<i64> = claims.values().map(|c| c.delivery_id).collect();
    ids.sort_unstable_by(|x, y| y.cmp(x));
    let newest_first = |mut v: Vec<i64>| {
        v.sort_unstable_by(|x, y| y.cmp(x));
        v
    };
    let all = FailedFilter::default();
    // However many are asked for, one page of the list is bounded.
    let page = store.failed_deliveries(&all, usize::MAX).unwrap();
    assert_eq!(page.len(), MAX_FAILED_PAGE);
    assert_eq!(
        page.first().map(|d| d.id),
        ids.first().copied(),
        "newest first"
    );
    let first = newest_first(store.retry_failed(&all, store.now(), 2).unwrap());
    assert_eq!(first, ids[..2], "the newest two");
    // However many are asked for, one batch is bounded.
    let below = |v: &[i64]| FailedFilter {
        before: v.last().copied(),
        ..all.clone()
    };
    let second = newest_first(
        store
            .retry_failed(&below(&first), store.now(), usize::MAX)
            .unwrap(),
    );
    assert_eq!(second, ids[2..2 + MAX_RETRY_BATCH]);
    let third = newest_first(
        store
            .retry_failed(&below(&second), store.now(), usize::MAX)
            .unwrap(),
    );
    assert_eq!(third, ids[2 + MAX_RETRY_BATCH..]);
    assert_eq!(states(&store), [("pending", ids.len() as u64)]);
    assert_eq!(
        store.retry_failed(&all, store.now(), 100).unwrap(),
        Vec::<i64>::new()
    );
}

pub(crate) fn a_delivery_run_again_keeps_its_event_from_retention(b: &impl Backend) {
    let store = b.node();
    let (kept, gone) = (event(&["a"]), event(&["b"]));
    store.insert_event(&kept).unwrap();
    store.insert_event(&gone).unwrap();
    run_all(&store, |_, _| DeliveryState::Failed);
    let before = cutoff(&store);
    let of = |h: &str| FailedFilter {
        handler: Some(h.into()),
        ..FailedFilter::default()
    };
    // Run again first: the event is not finished any more, and stays.
    assert_eq!(
        store.retry_failed(&of("a"), store.now(), 10).unwrap().len(),
        1
    );
    assert_eq!(purged(&store, before), 1);
    assert!(store.event(kept.id).unwrap().is_some());
    // Deleted first: nothing is left to run again, and nothing is counted.
    assert!(store.event(gone.id).unwrap().is_none());
    assert_eq!(
        store.retry_failed(&of("b"), store.now(), 10).unwrap(),
        Vec::<i64>::new()
    );
    assert_eq!(states(&store), [("pending", 1)]);
}

/// How many deliveries `store` holds in each state, by name, omitting states with none.
fn states(store: &impl EventStore) -> Vec<(&'static str, u64)> {
    sorted(store.count_by_state().unwrap())
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Waits until the queue clock of `store` has moved past every time it has given so far and
/// returns it: a cutoff every event inserted until now is before, and every later one is not.
fn cutoff(store: &impl EventStore) -> chrono::DateTime<Utc> {
    std::thread::sleep(Duration::from_millis(5));
    let now = store.now();
    std::thread::sleep(Duration::from_millis(5));
    now
}

pub(crate) fn finished_events_past_retention_are_deleted_with_their_deliveries(b: &impl Backend) {
    let store = b.node();
    // Finished: one delivery succeeded and one failed for good, each after an attempt.
    let done = event(&["a", "b"]);
    store.insert_event(&done).unwrap();
    for state in [DeliveryState::Succeeded, DeliveryState::Failed] {
        let claim = store.claim(store.now(), &[], LEASE).unwrap().unwrap();
        assert_eq!(claim.event_id, done.id);
        assert_eq!(
            store.finish(&claim, &record(state)).unwrap(),
            Finish::Recorded
        );
    }
    // Finished too: routed to no handler.
    let unrouted = event(&[]);
    store.insert_event(&unrouted).unwrap();
    let before = cutoff(&store);
    // Finished, but received after the cutoff.
    let recent = event(&[]);
    store.insert_event(&recent).unwrap();
    assert_eq!(states(&store), [("failed", 1), ("succeeded", 1)]);

    assert_eq!(purged(&store, before), 2);
    assert!(store.event(done.id).unwrap().is_none());
    assert!(store.event(unrouted.id).unwrap().is_none());
    assert!(store.event(recent.id).unwrap().is_some());
    // The deliveries went with their event (and their attempts with them: the foreign keys of
    // both stores refuse a delivery deleted under its attempts).
    assert_eq!(states(&store), []);
    assert_eq!(purged(&store, before), 0);
    // Another node sees the same.
    let other = b.node();
    assert!(other.event(done.id).unwrap().is_none());
    assert!(other.event(recent.id).unwrap().is_some());
}

pub(crate) fn events_with_a_delivery_not_finished_are_kept_however_old(b: &impl Backend) {
    let store = b.node();
    let running = event(&["a"]);
    store.insert_event(&running).unwrap();
    let run = store.claim(store.now(), &[], LEASE).unwrap().unwrap();
    assert_eq!(run.event_id, running.id);
    // One delivery finished, the other waiting for a retry.
    let half = event(&["b", "c"]);
    store.insert_event(&half).unwrap();
    let first = store.claim(store.now(), &[], LEASE).unwrap().unwrap();
    let second = store.claim(store.now(), &[], LEASE).unwrap().unwrap();
    store
        .finish(&first, &record(DeliveryState::Succeeded))
        .unwrap();
    let mut retry = record(DeliveryState::Pending);
    retry.retry_at = Some(store.now() + chrono::Duration::hours(1));
    store.finish(&second, &retry).unwrap();
    let waiting = event(&["d"]);
    store.insert_event(&waiting).unwrap();
    let before = cutoff(&store);

    assert_eq!(purged(&store, before), 0);
    for id in [running.id, half.id, waiting.id] {
        assert!(store.event(id).unwrap().is_some(), "{id} kept");
    }
    assert_eq!(
        states(&store),
        [("pending", 2), ("running", 1), ("succeeded", 1)]
    );
    // Once its delivery has ended, the running one's event is finished, and goes.
    store.finish(&run, &record(DeliveryState::Failed)).unwrap();
    assert_eq!(purged(&store, before), 1);
    assert!(store.event(running.id).unwrap().is_none());
    assert_eq!(states(&store), [("pending", 2), ("succeeded", 1)]);
}

pub(crate) fn event_purges_are_bounded_batches(b: &impl Backend) {
    let store = b.node();
    // Five old events not finished, then three finished ones.
    let waiting: Vec<NewEvent> = (0..5).map(|_| event(&["a"])).collect();
    let done: Vec<NewEvent> = (0..3).map(|_| event(&[])).collect();
    for e in waiting.iter().chain(&done) {
        store.insert_event(e).unwrap();
    }
    let long_ago = store.now() - chrono::Duration::hours(1);
    let none = store.purge_finished(long_ago, 100, None).unwrap();
    assert_eq!((none.deleted, none.next), (0, None));
    let before = cutoff(&store);
    // Two at a time: the unfinished ones are looked at once each, and passed.
    let mut rounds = Vec::new();
    let mut positions = Vec::new();
    let mut from = None;
    loop {
        let round = store.purge_finished(before, 2, from).unwrap();
        rounds.push(round.deleted);
        match round.next {
            Some(next) => {
                positions.push(next);
                from = Some(next);
            }
            None => break,
        }
        assert!(rounds.len() < 10, "the walk ends");
    }
    assert_eq!(rounds, [0, 0, 1, 2, 0], "two looked at per round");
    for e in &done {
        assert!(store.event(e.id).unwrap().is_none());
    }
    for e in &waiting {
        assert!(store.event(e.id).unwrap().is_some());
    }
    // A round goes on after the position it is given, whatever was deleted since: after the
    // second event, the third and fourth are looked at.
    let after_second = store.purge_finished(before, 2, Some(positions[0])).unwrap();
    assert_eq!(after_second.next, Some(positions[1]));
    // At least one event is looked at, at most the bound, whatever is asked: after the first,
    // one more brings the walk to where two did.
    let one = store.purge_finished(before, 0, None).unwrap();
    assert!(one.next.is_some_and(|p| p != positions[0]), "{one:?}");
    let another = store.purge_finished(before, 1, one.next).unwrap();
    assert_eq!(another.next, Some(positions[0]));
    for _ in 0..super::MAX_EVENT_PURGE_BATCH + 1 {
        store.insert_event(&event(&[])).unwrap();
    }
    let before = cutoff(&store);
    // From where the third round ended: only the new events are left to look at.
    let first = store
        .purge_finished(before, usize::MAX, Some(positions[2]))
        .unwrap();
    assert_eq!(first.deleted, super::MAX_EVENT_PURGE_BATCH as u64);
    let last = store
        .purge_finished(before, usize::MAX, first.next)
        .unwrap();
    assert_eq!((last.deleted, last.next), (1, None));
}

/// Deletes every finished event received before `before`, walking from the oldest; returns how
/// many.
fn purged(store: &impl EventStore, before: chrono::DateTime<Utc>) -> u64 {
    let mut deleted = 0;
    let mut from = None;
    loop {
        let round = store.purge_finished(before, 100, from).unwrap();
        deleted += round.deleted;
        match round.next {
            Some(next) => from = Some(next),
            None => return deleted,
        }
    }
}

pub(crate) fn concurrent_event_purges_delete_each_event_once(b: &impl Backend) {
    const EVENTS: usize = 60;
    const BATCH: usize = 7;
    let nodes = [b.node(), b.node()];
    for n in 0..EVENTS {
        nodes[n % 2]
            .insert_event(&event(if n % 3 == 0 { &[] } else { &["a"] }))
            .unwrap();
    }
    // Every delivery finished, by whichever node claims it.
    while let Some(claim) = nodes[0].claim(nodes[0].now(), &[], LEASE).unwrap() {
        nodes[0]
            .finish(&claim, &record(DeliveryState::Succeeded))
            .unwrap();
    }
    let before = cutoff(&nodes[0]);
    let barrier = std::sync::Barrier::new(nodes.len());
    let deleted: u64 = std::thread::scope(|scope| {
        let purgers: Vec<_> = nodes
            .iter()
            .map(|node| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let (mut total, mut from) = (0, None);
                    loop {
                        let round = node.purge_finished(before, BATCH, from).unwrap();
                        total += round.deleted;
                        match round.next {
                            Some(next) => from = Some(next),
                            None => return total,
                        }
                    }
                })
            })
            .collect();
        purgers.into_iter().map(|p| p.join().unwrap()).sum()
    });
    assert_eq!(deleted, EVENTS as u64);
    assert_eq!(states(&nodes[1]), []);
}
