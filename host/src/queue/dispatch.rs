//! Routing and dispatch: which handlers an event goes to, and the workers that run deliveries.
//!
//! Routing uses each handler's `job_types`, like Keyfactor's `JobTypes`. Dispatch claims due
//! deliveries from the store with bounded global and per-handler concurrency (the global slots
//! shared between handlers when fewer are free than deliveries are due), runs each in a
//! fresh sandbox, applies quarantine and the retry policy, and records every outcome. The event
//! path never waits for any of this: it only commits and wakes the dispatcher.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::bindings::jobhook::handler::delivery::EventSource;
use crate::metrics::Metrics;
use crate::outcome::OutcomeKind;
use crate::queue::delivery_state::{AttemptEnd, Transition, after_attempt};
use crate::queue::quarantine::QuarantineConfig;
use crate::queue::quarantine::{Admission, Change, Quarantine, QuarantineStatus};
use crate::queue::registration::{JobTypes, Registration};
use crate::queue::retry::RetryPolicy;
use crate::queue::store::config::DEFAULT_LEASE;
use crate::queue::store::{
    AttemptRecord, Claim, ClaimLimits, EventStore, Finish, MAX_CLAIM_BATCH, SOURCE_POLLER, Share,
    StoreError,
};
use crate::runtime::sandbox::SandboxedHandler;
use crate::runtime::state::Delivery;

/// Longest the dispatcher sleeps without looking at the store, so retries that become due are
/// picked up even when no new event wakes it.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Pause after a store error before claiming again, so a broken disk does not spin a core.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Longest [`Dispatcher::waiting_for_unconfigured`] waits for the store: it runs at start and
/// at the end of a reload, whose answer (and the next SIGHUP) a store that stopped answering
/// must not hold. The count takes milliseconds.
const PENDING_COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Shortest lease the dispatcher uses, whatever it is given: renewals run every third of it.
const MIN_LEASE: Duration = Duration::from_millis(300);

/// Outcomes recorded in one store transaction at most. Deliveries that end while a batch is being
/// committed wait for the next one (group commit): under load one transaction records many
/// outcomes. A failed delivery holds its slot until its own outcome is on record; a success
/// frees it once its outcome is queued here (see `Dispatcher::deliver`).
const MAX_RECORD_BATCH: usize = 256;

/// Deliveries a handler may run at once before it has succeeded: it earns the rest of its
/// `max_concurrency` by succeeding (each success doubles its places, each failure halves them,
/// never below this). A handler that loops until its time budget or bombs its memory limit
/// thus runs one delivery at a time, not `max_concurrency` of them, until quarantine sets it
/// aside; a healthy one reaches its cap after a handful of deliveries (16 after four rounds of
/// successes).
const FIRST_PLACES: usize = 1;

/// Fewest places a claim on a shared store ([`EventStore::claims_are_dear`]) takes while this
/// node runs at least as many deliveries: with fewer free, it first waits [`GATHER_WAIT`] for
/// more to come free. Otherwise a handler keeping every place busy (CPU-bound work) is claimed
/// for one delivery each time one finishes — a transaction per delivery, which cost a
/// PostgreSQL server on the same machine 2.6–3.5 ms of its CPU per delivery against 1.6–2.4 ms
/// gathered (docs/PERFORMANCE.md, "Changes the figures justified").
const GATHER_PLACES: usize = 4;

/// How long a claim waits for more places to come free (see [`GATHER_PLACES`]): what it adds at
/// most to the start of a delivery that waits behind running ones.
const GATHER_WAIT: Duration = Duration::from_millis(2);

/// A handler's places after an outcome: doubled by a success (up to `cap`), halved by a
/// failure (down to [`FIRST_PLACES`]).
fn places_after(places: usize, cap: usize, succeeded: bool) -> usize {
    if succeeded {
        places.saturating_mul(2).min(cap.max(FIRST_PLACES))
    } else {
        (places / 2).max(FIRST_PLACES)
    }
}

/// A running delivery's slot (one of `max_concurrent_deliveries`) and its place among its
/// handler's running deliveries. Dropping it gives both back and tells the dispatcher, which
/// claims again if its last claim left due deliveries behind for want of a place.
struct Places<'a> {
    slot: Option<OwnedSemaphorePermit>,
    handler: Option<&'a RegisteredHandler>,
    freed: &'a Notify,
}

impl Drop for Places<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.handler {
            h.running.fetch_sub(1, Ordering::Relaxed);
        }
        drop(self.slot.take());
        self.freed.notify_one();
    }
}

/// A finished attempt on its way to the store, with whom to tell what became of it.
struct Finished {
    claim: Claim,
    record: AttemptRecord,
    recorded: oneshot::Sender<Finish>,
}

/// A loaded handler with its routing, policies and live state.
pub struct RegisteredHandler {
    /// Its configuration.
    pub config: Registration,
    /// The loaded component.
    pub handler: SandboxedHandler,
    /// Deliveries of the handler by this name running now, shared with the handler it
    /// replaced at a reload ([`RegisteredHandler::replacing`]): those still running count
    /// against `max_concurrency` until they end.
    running: Arc<AtomicUsize>,
    /// Deliveries it has earned the right to run at once (see [`FIRST_PLACES`]).
    earned: AtomicUsize,
    /// The dispatcher's count of claims when it last claimed a delivery of the handler (0:
    /// never), shared like `running`: of handlers with as many deliveries running, a claim
    /// short of slots serves the one served longest ago first ([`Share::served`]).
    served: Arc<AtomicU64>,
    quarantine: Mutex<Quarantine>,
}

impl std::fmt::Debug for RegisteredHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredHandler")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl RegisteredHandler {
    /// Wraps a loaded handler.
    pub fn new(
        config: Registration,
        handler: SandboxedHandler,
        quarantine: QuarantineConfig,
    ) -> Self {
        RegisteredHandler {
            config,
            handler,
            running: Arc::new(AtomicUsize::new(0)),
            earned: AtomicUsize::new(FIRST_PLACES),
            served: Arc::new(AtomicU64::new(0)),
            quarantine: Mutex::new(Quarantine::new(quarantine)),
        }
    }

    /// Like [`RegisteredHandler::new`], for a handler a reload changed: the deliveries of
    /// `old` still running are counted with the new one's, so that they and the new one's
    /// together stay within its `max_concurrency` (each reload started a count from zero
    /// before, letting one more batch run beside those of the handler it replaced).
    pub fn replacing(
        old: &RegisteredHandler,
        config: Registration,
        handler: SandboxedHandler,
        quarantine: QuarantineConfig,
    ) -> Self {
        RegisteredHandler {
            running: Arc::clone(&old.running),
            served: Arc::clone(&old.served),
            ..RegisteredHandler::new(config, handler, quarantine)
        }
    }

    /// Like [`RegisteredHandler::new`], for a handler configured again under the name of one a
    /// reload removed while deliveries of its still run ([`Dispatcher::removed_still_running`]):
    /// those count with the new one's, as a changed handler's do ([`RegisteredHandler::replacing`]),
    /// so that together they stay within its `max_concurrency` and are shown under its name.
    pub fn continuing(
        removed: RunningCount,
        config: Registration,
        handler: SandboxedHandler,
        quarantine: QuarantineConfig,
    ) -> Self {
        RegisteredHandler {
            running: removed.0,
            ..RegisteredHandler::new(config, handler, quarantine)
        }
    }

    fn quarantine(&self) -> std::sync::MutexGuard<'_, Quarantine> {
        self.quarantine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a reload's `[quarantine]`, keeping its history (see [`Quarantine::reconfigure`]).
    pub fn reconfigure_quarantine(&self, config: &QuarantineConfig) {
        self.quarantine()
            .reconfigure(config.clone(), Instant::now());
    }

    /// Its quarantine status now.
    pub fn status(&self) -> QuarantineStatus {
        self.quarantine().status(Instant::now())
    }

    /// Deliveries of it running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// How many of its deliveries may run at once now: what it has earned by succeeding, up
    /// to its `max_concurrency`.
    pub fn places(&self) -> usize {
        self.earned
            .load(Ordering::Relaxed)
            .min(self.config.max_concurrency)
    }

    /// How many more of its deliveries may start now: none while it is quarantined (its
    /// deliveries wait in the store until the quarantine ends; then one runs as the probe, a
    /// handler that failed that often having one place left).
    fn room(&self) -> usize {
        if self.quarantine().is_quarantined(Instant::now()) {
            return 0;
        }
        self.places().saturating_sub(self.running())
    }

    /// Takes its places back to [`FIRST_PLACES`]: when it is quarantined, so that after the
    /// quarantine exactly one delivery runs as the probe.
    fn reset_places(&self) {
        self.earned.store(FIRST_PLACES, Ordering::Relaxed);
    }

    /// Counts an outcome towards its places: a success doubles them (up to `max_concurrency`),
    /// a failure halves them (down to [`FIRST_PLACES`]).
    fn earn(&self, succeeded: bool) {
        let cap = self.config.max_concurrency;
        // The closure always returns `Some`, so the update cannot fail.
        let _ = self
            .earned
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |places| {
                Some(places_after(places, cap, succeeded))
            });
    }
}

/// The running deliveries of a handler a reload removed, for a handler configured again under its
/// name to count with its own ([`RegisteredHandler::continuing`]).
#[derive(Debug)]
pub struct RunningCount(Arc<AtomicUsize>);

/// The handlers in force, by name.
#[derive(Debug, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<RegisteredHandler>>,
}

impl Registry {
    /// A registry of these handlers.
    pub fn new(handlers: impl IntoIterator<Item = Arc<RegisteredHandler>>) -> Self {
        Registry {
            handlers: handlers
                .into_iter()
                .map(|h| (h.config.name.clone(), h))
                .collect(),
        }
    }

    /// Names of the handlers an event with `job_type_id` goes to.
    pub fn route(&self, job_type_id: Uuid) -> Vec<String> {
        self.handlers
            .values()
            .filter(|h| h.config.job_types.matches(job_type_id))
            .map(|h| h.config.name.clone())
            .collect()
    }

    /// A handler by name.
    pub fn get(&self, name: &str) -> Option<&Arc<RegisteredHandler>> {
        self.handlers.get(name)
    }

    /// Every handler, by name.
    pub fn handlers(&self) -> impl Iterator<Item = &Arc<RegisteredHandler>> {
        self.handlers.values()
    }

    /// Room left under each handler's concurrency cap, for a claim.
    fn room(&self) -> BTreeMap<String, usize> {
        self.handlers
            .iter()
            .map(|(name, h)| (name.clone(), h.room()))
            .collect()
    }

    /// Each handler's share of the slots, for a claim to share them out fairly.
    fn shares(&self) -> BTreeMap<String, Share> {
        self.handlers
            .iter()
            .map(|(name, h)| {
                let share = Share {
                    running: h.running(),
                    served: h.served.load(Ordering::Relaxed),
                };
                (name.clone(), share)
            })
            .collect()
    }

    /// How many handlers are quarantined now.
    pub fn quarantined(&self) -> usize {
        let now = Instant::now();
        self.handlers
            .values()
            .filter(|h| h.quarantine().is_quarantined(now))
            .count()
    }
}

/// A summary of one handler for the API.
#[derive(Debug, Serialize)]
pub struct HandlerSummary {
    /// Name.
    pub name: String,
    /// Component path.
    pub component: String,
    /// Component size in bytes.
    pub component_bytes: usize,
    /// `["*"]` or the GUIDs.
    pub job_types: Vec<String>,
    /// The `jobhook:handler` contract version it was built against (`None`: it imports no
    /// jobhook interface).
    pub contract: Option<String>,
    /// Capabilities it imports.
    pub imports: Vec<String>,
    /// WASI interfaces it imports (linked, granting nothing).
    pub wasi_imports: Vec<String>,
    /// WASI interfaces it imports that are linked inert, each as
    /// "`name` (linked inert: every call denied)".
    pub inert_imports: Vec<String>,
    /// Its grants.
    pub grants: crate::capabilities::Grants,
    /// Its limits.
    pub limits: crate::limits::Limits,
    /// Its retry policy.
    pub retry: RetryPolicy,
    /// Its concurrency cap.
    pub max_concurrency: usize,
    /// Property names; secret values are never shown.
    pub properties: BTreeMap<String, String>,
    /// Deliveries running now.
    pub running: usize,
    /// Deliveries it may run at once now: earned by succeeding, up to `max_concurrency`.
    pub places: usize,
    /// Quarantine status.
    pub health: QuarantineStatus,
    /// Its deliveries pending in the store (due or waiting for a retry, for its quarantine or
    /// for a place): a handler that keeps failing holds its backlog here. Absent when the store
    /// did not answer in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Its failed deliveries in the store (out of retries; `GET /v1/deliveries/failed` lists
    /// them, `POST /v1/admin/retry-failed` runs them again). Absent when the store did not
    /// answer in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
}

impl HandlerSummary {
    /// Summarises a registered handler.
    pub fn of(h: &RegisteredHandler) -> Self {
        let c = &h.config;
        HandlerSummary {
            name: c.name.clone(),
            component: c.component.display().to_string(),
            component_bytes: h.handler.component().size(),
            job_types: match &c.job_types {
                JobTypes::All => vec!["*".into()],
                JobTypes::Only(ids) => ids.iter().map(Uuid::to_string).collect(),
            },
            contract: h.handler.component().imports().contract.clone(),
            imports: h
                .handler
                .component()
                .imports()
                .capabilities
                .iter()
                .map(|c| c.to_string())
                .collect(),
            wasi_imports: h.handler.component().imports().wasi.clone(),
            inert_imports: h
                .handler
                .component()
                .imports()
                .inert
                .iter()
                .map(|name| format!("{name} ({})", crate::runtime::loader::INERT_NOTE))
                .collect(),
            grants: c.grants.clone(),
            limits: effective_limits(&c.limits),
            retry: c.retry.clone(),
            max_concurrency: c.max_concurrency,
            properties: c
                .properties
                .names()
                .into_iter()
                .map(|name| {
                    let shown = if c.secret_properties.contains(&name) {
                        "(secret)".to_owned()
                    } else {
                        c.properties.get(&name).unwrap_or_default().to_owned()
                    };
                    (name, shown)
                })
                .collect(),
            running: h.running(),
            places: h.places(),
            health: h.status(),
            pending: None,
            failed: None,
        }
    }
}

/// Runs deliveries from the store.
pub struct Dispatcher {
    store: Arc<dyn EventStore>,
    registry: RwLock<Arc<Registry>>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    /// How many `slots` there are (`max_concurrent_deliveries`). The recorder's queue holds as
    /// many outcomes: when it is full, finishing deliveries wait for room and keep their slots,
    /// so a slow disk slows dispatch down instead of growing memory; outcomes not yet on record
    /// are at most this many queued, one per slot waiting for room, and those being recorded
    /// (see [`record_outcomes`]).
    slot_count: usize,
    /// New deliveries may be due: an event was accepted, deliveries were requeued or handed
    /// back, a retry was scheduled, the handlers changed, or the dispatcher is to stop.
    wake: Notify,
    /// A running delivery gave back its place and slot ([`Places`]). Heeded only while the
    /// last claim may have left due deliveries behind for want of one: otherwise a place coming
    /// free lets no claim take more, and at 1,000 events/s × 4 handlers every delivery's end was
    /// an empty claim and a `next_due` query.
    freed: Notify,
    /// Set when the next due time the dispatcher last read from the store may have moved
    /// earlier (a retry scheduled, a delivery requeued or handed back, the handlers changed):
    /// the next pause asks the store again instead of trusting what it read.
    due_moved: AtomicBool,
    stop: watch::Sender<bool>,
    /// Set by [`Dispatcher::hurry`]: the wind-down stops waiting for running deliveries.
    hurry: watch::Sender<bool>,
    lease: Duration,
    /// The running counts of handlers a reload removed while deliveries of theirs ran: those
    /// finish with the handler they started with, and are shown as running under its name
    /// ([`Dispatcher::running_unconfigured`]) until they have. Kept only while one runs.
    retired: Mutex<Vec<(String, Arc<AtomicUsize>)>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A dispatcher over `store` with `registry`, running at most `max_concurrent` deliveries,
    /// with the default claim lease [`DEFAULT_LEASE`].
    pub fn new(
        store: Arc<dyn EventStore>,
        registry: Registry,
        metrics: Arc<Metrics>,
        max_concurrent: usize,
    ) -> Arc<Self> {
        Self::with_lease(store, registry, metrics, max_concurrent, DEFAULT_LEASE)
    }

    /// Like [`Dispatcher::new`], claiming each delivery for `lease` (`[store] lease_ms`):
    /// renewed every third of it while the delivery runs, and taken over by another node once
    /// it has expired unrenewed.
    pub fn with_lease(
        store: Arc<dyn EventStore>,
        registry: Registry,
        metrics: Arc<Metrics>,
        max_concurrent: usize,
        lease: Duration,
    ) -> Arc<Self> {
        let (stop, _) = watch::channel(false);
        let (hurry, _) = watch::channel(false);
        let slot_count = max_concurrent.max(1);
        Arc::new(Dispatcher {
            store,
            registry: RwLock::new(Arc::new(registry)),
            metrics,
            slots: Arc::new(Semaphore::new(slot_count)),
            slot_count,
            wake: Notify::new(),
            freed: Notify::new(),
            due_moved: AtomicBool::new(true),
            stop,
            hurry,
            lease: lease.max(MIN_LEASE),
            retired: Mutex::new(Vec::new()),
        })
    }

    /// The engine's metrics, which the event sources count their events in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The handlers in force.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Pending deliveries of handlers not in force here, by handler: they are not claimed by
    /// this node (see [`ClaimLimits::others`]) and wait for a handler of that name — configured
    /// again by a reload, or on another node — and each is logged as a warning. Empty when the
    /// store cannot say within [`PENDING_COUNT_TIMEOUT`] (the error is logged).
    pub async fn waiting_for_unconfigured(&self) -> std::collections::BTreeMap<String, u64> {
        let counted =
            crate::queue::store::call_within(&self.store, PENDING_COUNT_TIMEOUT, |store| {
                store.pending_by_handler()
            });
        let counts = match counted.await {
            Ok(counts) => counts,
            Err(e) => {
                tracing::error!("cannot count pending deliveries by handler: {e}");
                return Default::default();
            }
        };
        let registry = self.registry();
        let waiting: std::collections::BTreeMap<String, u64> = counts
            .into_iter()
            .filter(|(handler, _)| !registry.handlers.contains_key(handler))
            .collect();
        for (handler, pending) in &waiting {
            // Names are unique in a configuration whatever their case, but deliveries belong to
            // the name exactly as it was: a rename that only changes case is easy to miss.
            let differs_in_case = registry
                .handlers
                .keys()
                .find(|configured| configured.eq_ignore_ascii_case(handler))
                .map(|configured| {
                    format!(
                        " (handler {configured:?} is configured: names must match exactly, \
                         case included)"
                    )
                })
                .unwrap_or_default();
            tracing::warn!(
                handler = %handler,
                pending,
                "deliveries wait for a handler that is not configured here; they stay pending \
                 and run once a handler of that name is configured again (or by a node that has \
                 it){differs_in_case}"
            );
        }
        waiting
    }

    /// Replaces the handlers (configuration reload). Deliveries already running finish with the
    /// handler they started with.
    pub fn replace_registry(&self, registry: Registry) {
        let registry = Arc::new(registry);
        let old = std::mem::replace(
            &mut *self.registry.write().unwrap_or_else(|p| p.into_inner()),
            Arc::clone(&registry),
        );
        let removed = |name: &String| registry.get(name).is_none();
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        // A name configured again is shown by its new handler, which continues the old count
        // (`RegisteredHandler::continuing`): it is dropped here.
        retired.retain(|(name, _)| removed(name));
        retired.extend(
            old.handlers
                .iter()
                .filter(|(name, h)| removed(name) && h.running() > 0)
                .map(|(name, h)| (name.clone(), Arc::clone(&h.running))),
        );
        drop(retired);
        self.due_may_have_moved();
    }

    /// The running count a handler configured again as `name` continues: that of the handler of
    /// that name a reload removed, while deliveries of its still run; None otherwise. Read when
    /// a reload loads its handlers, before [`Dispatcher::replace_registry`].
    pub fn removed_still_running(&self, name: &str) -> Option<RunningCount> {
        let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired
            .iter()
            .find(|(retired, running)| retired == name && running.load(Ordering::Relaxed) > 0)
            .map(|(_, running)| RunningCount(Arc::clone(running)))
    }

    /// Deliveries running now, by handler, of handlers a reload removed (they finish with the
    /// handler they started with). Forgets the handlers none of whose deliveries runs any more.
    pub fn running_unconfigured(&self) -> BTreeMap<String, usize> {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|(_, running)| running.load(Ordering::Relaxed) > 0);
        let mut running = BTreeMap::new();
        for (name, count) in retired.iter() {
            *running.entry(name.clone()).or_insert(0) += count.load(Ordering::Relaxed);
        }
        running
    }

    /// Tells the dispatcher that new deliveries may be due.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Wakes the dispatcher and has it read the next due time again: a delivery may now fall
    /// due earlier than it last read (a retry scheduled, a delivery handed back or requeued,
    /// the handlers changed).
    pub fn due_may_have_moved(&self) {
        self.due_moved.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Asks [`Dispatcher::run`] to stop claiming and wind down.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        self.wake.notify_one();
    }

    /// Stops and ends the wait for running deliveries at once (a second SIGTERM or SIGINT):
    /// they are interrupted and put back in the queue, as when the grace runs out.
    pub fn hurry(&self) {
        // Kept even while nothing watches yet: the wind-down reads it when it starts.
        self.hurry.send_replace(true);
        self.stop();
    }

    /// Resolves once [`Dispatcher::hurry`] has been called.
    pub async fn hurried(&self) {
        let mut hurry = self.hurry.subscribe();
        let _ = hurry.wait_for(|hurried| *hurried).await;
    }

    /// Claims and runs deliveries until [`Dispatcher::stop`]; then waits up to `grace` (or until
    /// [`Dispatcher::hurry`]) for the running ones and puts the rest back in the queue.
    ///
    /// Claims are made in batches as large as the free slots allow (up to
    /// [`MAX_CLAIM_BATCH`]), and outcomes are recorded in batches by one recorder task: a
    /// delivery costs a share of two store transactions instead of two of its own.
    pub async fn run(self: Arc<Self>, grace: Duration) {
        let mut stopped = self.stop.subscribe();
        let mut tasks = JoinSet::new();
        let leases = tokio::spawn(Arc::clone(&self).keep_leases());
        let (record, queue) = mpsc::channel(self.slot_count);
        let recorder = tokio::spawn(record_outcomes(Arc::clone(&self.store), queue));
        // When the earliest pending delivery this node could claim falls due, as last read.
        let mut known_due = KnownDue::default();
        // Claims that took deliveries: what `RegisteredHandler::served` counts in.
        let mut claims_made: u64 = 0;
        loop {
            if *stopped.borrow() {
                break;
            }
            while let Some(ended) = tasks.try_join_next() {
                report_failed_delivery(ended);
            }
            let first = tokio::select! {
                permit = Arc::clone(&self.slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stopped.changed() => break,
            };
            let mut permits = self.more_permits(vec![first]);
            let mut registry = self.registry();
            let mut room = registry.room();
            if self.store.claims_are_dear()
                && gathers(self.holding(&permits), room.values().sum(), permits.len())
            {
                tokio::select! {
                    _ = tokio::time::sleep(GATHER_WAIT) => {}
                    _ = stopped.changed() => break,
                }
                permits = self.more_permits(permits);
                registry = self.registry();
                room = registry.room();
            }
            let mut limits = ClaimLimits {
                max: permits.len(),
                room,
                // Only handlers this node has: another's deliveries wait for it.
                others: 0,
                // With fewer slots free than deliveries due, the slots are shared between
                // handlers: a slow handler's backlog does not take every slot that comes free.
                shares: registry.shares(),
            };
            // Every loaded handler at its cap, or none loaded: nothing to claim. Not claiming
            // spares the store a query per finished delivery (with one CPU-bound handler at its
            // cap, an empty claim and a `next_due` followed every claim), and with no handler a
            // claim and a `next_due` per event.
            let at_cap = limits.room.values().all(|room| *room == 0);
            let lease = self.lease;
            let claimed = if at_cap {
                Ok(Ok(Vec::new()))
            } else if let Some(writes) = self.store.awaited_writes() {
                Ok(writes
                    .claim_batch_awaited(self.store.now(), &limits, lease)
                    .await)
            } else {
                let store = Arc::clone(&self.store);
                let limits = limits.clone();
                tokio::task::spawn_blocking(move || store.claim_batch(store.now(), &limits, lease))
                    .await
            };
            match claimed {
                Ok(Ok(claims)) if !claims.is_empty() => {
                    let filled = claims.len() >= permits.len();
                    let wanted = short_of_places(&limits.room, &claims);
                    // The room these leave, which the wait reads the next due time for: a
                    // handler this claim took to its cap has none, and its deliveries left
                    // behind wait for a place, not for a time.
                    for claim in &claims {
                        if let Some(room) = limits.room.get_mut(&claim.handler) {
                            *room = room.saturating_sub(1);
                        }
                    }
                    claims_made = claims_made.saturating_add(1);
                    // Unused permits are dropped here, freeing their slots.
                    for (claim, permit) in claims.into_iter().zip(permits) {
                        let handler = registry.get(&claim.handler).cloned();
                        if let Some(h) = &handler {
                            h.running.fetch_add(1, Ordering::Relaxed);
                            h.served.store(claims_made, Ordering::Relaxed);
                        }
                        let this = Arc::clone(&self);
                        let record = record.clone();
                        tasks.spawn(async move {
                            // What the claim is recorded by (its delivery and attempt), kept to
                            // hand it back if the delivery's own code panics (the sandbox's run
                            // is caught inside); no allocation on the delivery's path.
                            let held = Claim {
                                context: Err(String::new()),
                                source: String::new(),
                                message: None,
                                handler: String::new(),
                                ..claim
                            };
                            let delivered = crate::caught::caught(
                                this.deliver(claim, handler, &record, permit),
                            )
                            .await;
                            if let Err(panic) = delivered {
                                this.hand_back_after_panic(held, panic, &record).await;
                            }
                        });
                    }
                    // Every slot filled: more may be due, so claim again at once. Otherwise
                    // the claim took every due delivery it had places for, and claiming again
                    // before something changes would find nothing.
                    if !filled
                        && !self
                            .wait(&mut known_due, &limits, wanted, &mut stopped)
                            .await
                    {
                        break;
                    }
                }
                Ok(Ok(_)) => {
                    drop(permits);
                    let wanted = short_of_places(&limits.room, &[]);
                    if !self
                        .wait(&mut known_due, &limits, wanted, &mut stopped)
                        .await
                    {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    drop(permits);
                    CLAIM_FAILURES.tell(|untold| {
                        tracing::error!(
                            more_since_last_error = untold,
                            "cannot claim deliveries: {e}"
                        )
                    });
                    tokio::time::sleep(STORE_ERROR_PAUSE).await;
                }
                Err(join) => {
                    drop(permits);
                    tracing::error!("claim task failed: {join}");
                    tokio::time::sleep(STORE_ERROR_PAUSE).await;
                }
            }
        }
        leases.abort();
        self.wind_down(tasks, grace, record, recorder).await;
    }

    /// Deliveries holding a slot now, besides the claim's own `permits`: those running, and
    /// those whose failures wait to be on record. Not the tasks: a success whose outcome waits
    /// for the recorder has freed its slot and its place.
    fn holding(&self, permits: &[OwnedSemaphorePermit]) -> usize {
        self.slot_count
            .saturating_sub(self.slots.available_permits())
            .saturating_sub(permits.len())
    }

    /// `permits` and as many more free slots as one claim batch can use, without waiting.
    fn more_permits(&self, mut permits: Vec<OwnedSemaphorePermit>) -> Vec<OwnedSemaphorePermit> {
        while permits.len() < MAX_CLAIM_BATCH {
            match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        permits
    }

    /// Keeps the queue's clock ([`EventStore::keep_time`]), renews this node's claims and
    /// requeues abandoned ones, every third of the lease.
    async fn keep_leases(self: Arc<Self>) {
        let lease = self.lease;
        let mut tick = tokio::time::interval(lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let store = Arc::clone(&self.store);
            let result = tokio::task::spawn_blocking(move || {
                // A failed reading leaves the clock carrying on as it was: log, renew anyway.
                if let Err(e) = store.keep_time() {
                    tracing::error!("cannot read the queue clock's reference: {e}");
                }
                let now = store.now();
                store.renew(now, lease)?;
                store.requeue_abandoned(now)
            })
            .await;
            match result {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    tracing::warn!(requeued = n, "abandoned deliveries requeued");
                    self.due_may_have_moved();
                }
                Ok(Err(e)) => tracing::error!("cannot renew delivery leases: {e}"),
                Err(e) => tracing::error!("lease task failed: {e}"),
            }
        }
    }

    /// Waits, after a claim under `limits` that took every due delivery it had places for,
    /// until claiming again may find more: a wake-up ([`Dispatcher::wake`]), a place coming free
    /// if `wanted` (see [`short_of_places`]), or the next delivery a claim under `limits` could
    /// take falling due (at most [`IDLE_POLL`]). False when the dispatcher is to stop.
    ///
    /// `known` is that due time as last read from the store, if it was still to come, and for
    /// which handlers; it is read again only once that time has come, after a wait ran out, when
    /// something may have moved it earlier (`due_moved`), or when the handlers with room are no
    /// longer those it was read for, so that a dispatcher keeping up with a stream of new events
    /// does not ask the store at every one of them.
    async fn wait(
        &self,
        known: &mut KnownDue,
        limits: &ClaimLimits,
        wanted: bool,
        stopped: &mut watch::Receiver<bool>,
    ) -> bool {
        // Every loaded handler at its cap (or none loaded): no delivery is claimable for a time
        // to come, only for a place coming free, a wake-up or the idle poll.
        let at_cap = limits.room.values().all(|room| *room == 0);
        let pause = if at_cap {
            IDLE_POLL
        } else {
            let now = self.store.now();
            let moved = self.due_moved.swap(false, Ordering::AcqRel);
            if moved || !known.read_for(limits) || known.at.is_some_and(|due| due <= now) {
                let store = Arc::clone(&self.store);
                let asked = limits.clone();
                let due = tokio::task::spawn_blocking(move || store.next_due(&asked))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                // One already due was held back (see `pause_until`): what releases it wakes
                // the dispatcher, and the store is asked again when the wait runs out.
                *known = KnownDue::read(due.filter(|due| *due > now), limits);
                pause_until(due, now)
            } else {
                pause_until(known.at, now)
            }
        };
        tokio::select! {
            _ = self.wake.notified() => true,
            _ = self.freed.notified(), if wanted => true,
            _ = tokio::time::sleep(pause) => {
                // Another node may have scheduled a retry since: read it again next time.
                self.due_moved.store(true, Ordering::Release);
                true
            }
            _ = stopped.changed() => false,
        }
    }

    async fn wind_down(
        &self,
        mut tasks: JoinSet<()>,
        grace: Duration,
        record: mpsc::Sender<Finished>,
        recorder: tokio::task::JoinHandle<()>,
    ) {
        // Deliveries that ended since the dispatcher last looked are not running: a task is
        // joined only when the dispatcher next claims.
        while let Some(ended) = tasks.try_join_next() {
            report_failed_delivery(ended);
        }
        let running = tasks.len();
        if running > 0 {
            // A warning: shown by default, it tells an operator why the stop takes its time
            // and how to cut it short.
            tracing::warn!(
                running,
                "waiting up to {grace:?} for running deliveries; a second SIGTERM or SIGINT \
                 interrupts them now (they will run again)"
            );
        }
        let cut_short = tokio::select! {
            drained = tokio::time::timeout(grace, async {
                while tasks.join_next().await.is_some() {}
            }) => drained.is_err(),
            () = self.hurried() => true,
        };
        if cut_short && !tasks.is_empty() {
            let hurried = *self.hurry.borrow();
            tracing::warn!(
                unfinished = tasks.len(),
                "{}; interrupting deliveries, they will run again",
                if hurried {
                    "stop asked again"
                } else {
                    "shutdown grace period over"
                }
            );
            tasks.shutdown().await;
        }
        // Outcomes already handed over are recorded before the rest is requeued.
        drop(record);
        if let Err(e) = recorder.await {
            tracing::error!("outcome recorder failed: {e}");
        }
        let store = Arc::clone(&self.store);
        match tokio::task::spawn_blocking(move || store.release_all()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(requeued = n, "interrupted deliveries requeued"),
            Ok(Err(e)) => tracing::error!("cannot requeue interrupted deliveries: {e}"),
            _ => {}
        }
    }

    /// After the engine's own code panicked while it ran a delivery (outside the sandbox's run,
    /// whose panics are its outcome): the claim is handed back through the recorder, so the
    /// delivery runs again instead of staying `running`, its lease renewed, until a restart.
    async fn hand_back_after_panic(
        &self,
        claim: Claim,
        panic: String,
        recorder: &mpsc::Sender<Finished>,
    ) {
        tracing::error!(
            delivery = claim.delivery_id,
            event_id = %claim.event_id,
            attempt = claim.attempt,
            "a delivery ended with an engine error ({panic}); it was handed back and runs again"
        );
        let (recorded, done) = oneshot::channel();
        let finished = Finished {
            record: handed_back(
                format!("the engine failed while it ran the delivery ({panic}); it runs again"),
                self.store.now(),
            ),
            claim,
            recorded,
        };
        if recorder.send(finished).await.is_err() {
            tracing::error!(
                "the outcome recorder has stopped; the delivery will run again after a restart"
            );
            return;
        }
        // Due again once it is on record.
        let _ = done.await;
        self.due_may_have_moved();
    }

    /// Runs one claimed delivery and records its outcome; `slot` is its place among
    /// `max_concurrent_deliveries`.
    async fn deliver(
        &self,
        claim: Claim,
        handler: Option<Arc<RegisteredHandler>>,
        recorder: &mpsc::Sender<Finished>,
        slot: OwnedSemaphorePermit,
    ) {
        // When the delivery starts, by which quarantine judges its end (see `Quarantine::record`).
        let started = Instant::now();
        // Given back when this delivery is done with them, however it ends.
        let places = Places {
            slot: Some(slot),
            handler: handler.as_deref(),
            freed: &self.freed,
        };
        let record = match (&handler, &claim.context) {
            (_, Err(reason)) => {
                tracing::error!(
                    handler = %crate::escape::escape(&claim.handler),
                    event_id = %claim.event_id,
                    attempt = claim.attempt,
                    "{reason}: it has failed for good"
                );
                unreadable(reason.clone(), self.store.now())
            }
            // Claimed just before a reload took its handler away: handed back to wait for it,
            // as the deliveries a claim leaves alone do.
            (None, Ok(_)) => handed_back(
                format!(
                    "handler {:?} is not configured here now; the delivery waits for it",
                    claim.handler
                ),
                self.store.now(),
            ),
            (Some(h), Ok(context)) => self.run_handler(h, &claim, context, started).await,
        };
        let verdict = quarantine_verdict(&record);
        let (recorded, done) = oneshot::channel();
        let finished = Finished {
            claim,
            record,
            recorded,
        };
        let queued = recorder.send(finished).await.is_ok();
        if !queued {
            tracing::error!(
                "the outcome recorder has stopped; the delivery will run again after a restart"
            );
        }
        // A success frees its places once its outcome is queued for the store, before the
        // store has it: the handler runs no more at once than its cap, and the next delivery
        // does not wait for a commit (with a backlog, places came round at the pace of the
        // store's transactions). Waiting outcomes stay bounded by the recorder's queue, which a
        // delivery waits for room in while it holds its places. Any other outcome holds them
        // until it is on record, so quarantine has counted it before the handler runs again.
        let held = if queued && verdict == Some(true) {
            drop(places);
            None
        } else {
            Some(places)
        };
        // Errors were logged by the recorder. Quarantine counts only what is on record: an
        // attempt the store ignored as late (this node was frozen past its lease and another
        // took the delivery over) says nothing about the handler, as a time-out caused by the
        // freeze itself would otherwise count against it.
        if let (Some(h), Ok(Finish::Recorded), Some(succeeded)) = (&handler, done.await, verdict) {
            let change = h.quarantine().record(succeeded, started, Instant::now());
            log_quarantine(&h.config.name, change);
            h.earn(succeeded);
            if matches!(change, Change::Quarantined { .. }) {
                h.reset_places();
            }
        }
        if verdict != Some(true) {
            // A failure may have scheduled a retry, and a delivery handed back is due again:
            // either may fall due before what the dispatcher last read.
            self.due_may_have_moved();
        }
        drop(held);
    }

    /// Runs `claim` with `h` unless `h` is quarantined at `started` (then hands it back).
    async fn run_handler(
        &self,
        h: &RegisteredHandler,
        claim: &Claim,
        context: &crate::JobContext,
        started: Instant,
    ) -> AttemptRecord {
        let admission = h.quarantine().admit(started);
        if let Admission::Wait(reason) = admission {
            // Claimed just before its handler was quarantined: given back, due at once — this
            // node claims none of the handler's deliveries until the quarantine ends (no room),
            // and another node, or a reload that lifts it, need not wait for it.
            return handed_back(reason, self.store.now());
        }
        self.metrics.running(1);
        let outcome = h
            .handler
            .invoke(
                context,
                Delivery {
                    attempt: claim.attempt,
                    event_id: Some(claim.event_id.to_string()),
                    source: event_source(&claim.source),
                    message: claim.message.clone(),
                },
            )
            .await;
        self.metrics.running(-1);
        self.metrics.delivery(
            &h.config.name,
            outcome.kind.class(),
            outcome.duration.as_secs_f64(),
        );
        let now = self.store.now();
        let Transition { state, retry_at } = after_attempt(
            AttemptEnd::Ran(&outcome.kind),
            claim.attempt,
            &h.config.retry,
            now,
        );
        AttemptRecord {
            state,
            retry_at,
            class: outcome.kind.class().to_owned(),
            reason: (!outcome.kind.is_success()).then(|| outcome.kind.to_string()),
            outcome: Some(outcome),
            finished_at: now,
        }
    }
}

/// Logs a delivery task that ended without finishing. A panic of the delivery's own code is
/// caught inside the task and its claim handed back ([`Dispatcher::hand_back_after_panic`]);
/// what reaches here panicked while handing it back, and its delivery stays claimed until this
/// node's next start requeues it.
fn report_failed_delivery(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        tracing::error!(
            "a delivery ended with an engine error ({e}); it runs again after a restart"
        );
    }
}

/// Logs what recording an outcome changed in `handler`'s quarantine.
fn log_quarantine(handler: &str, change: Change) {
    let handler = crate::escape::escape(handler);
    match change {
        Change::None => {}
        Change::Quarantined {
            consecutive_failures,
            backoff,
        } => tracing::warn!(
            %handler,
            consecutive_failures,
            backoff_s = backoff.as_secs_f64(),
            "handler quarantined: its deliveries wait until the backoff has passed, then one \
             runs as a probe"
        ),
        Change::Released => {
            tracing::warn!(%handler, "handler released from quarantine: its probe succeeded")
        }
    }
}

/// What an attempt tells quarantine once it is on record: whether the handler succeeded, or
/// nothing when it did not run (handed back) or the engine, not the handler, failed.
fn quarantine_verdict(record: &AttemptRecord) -> Option<bool> {
    record
        .outcome
        .as_ref()
        .filter(|o| !matches!(o.kind, OutcomeKind::EngineError { .. }))
        .map(|o| o.kind.is_success())
}

/// How an event's stored source ([`crate::queue::store::NewEvent::source`]) is told to its
/// handlers: the poller's events as `poller`, everything committed through ingest as `event-api`.
fn event_source(stored: &str) -> EventSource {
    if stored == SOURCE_POLLER {
        EventSource::Poller
    } else {
        EventSource::EventApi
    }
}

/// The record of a claimed delivery given back without running it: pending again at once,
/// its attempt listed as interrupted, as after a restart.
fn handed_back(reason: String, now: DateTime<Utc>) -> AttemptRecord {
    AttemptRecord {
        state: crate::queue::store::DeliveryState::Pending,
        retry_at: Some(now),
        class: crate::queue::store::INTERRUPTED_CLASS.into(),
        reason: Some(reason),
        outcome: None,
        finished_at: now,
    }
}

/// The record of a delivery whose event's stored context cannot be read: not run, failed for
/// good, and not counted against its handler (the engine, not the handler, failed).
fn unreadable(reason: String, now: DateTime<Utc>) -> AttemptRecord {
    AttemptRecord {
        state: crate::queue::store::DeliveryState::Failed,
        retry_at: None,
        class: crate::outcome::ENGINE_ERROR_CLASS.into(),
        reason: Some(reason),
        outcome: None,
        finished_at: now,
    }
}

/// `limits` with every capability's call budget written out, its default where the handler
/// left it out: what the API shows is what applies.
fn effective_limits(limits: &crate::limits::Limits) -> crate::limits::Limits {
    let mut limits = limits.clone();
    for c in crate::capabilities::Capability::ALL {
        limits
            .calls
            .entry(c.interface().to_owned())
            .or_insert(c.default_calls());
    }
    limits
}

/// Records finished attempts as they come, many per store transaction (see
/// [`MAX_RECORD_BATCH`]), and tells each delivery when its outcome is on record. Ends when every
/// sender is gone and the queue is empty.
///
/// An outcome the store could not take for a reason that passes (the disk is full, the database
/// is restarting) is kept and tried again every [`STORE_ERROR_PAUSE`], together with the
/// outcomes that arrive meanwhile, until it is recorded: at most [`MAX_RECORD_BATCH`] are kept
/// (what arrives beyond waits in the queue, and then in its delivery, which keeps its slot),
/// and the delivery does not sit `running` until the next restart. Only when the engine stops
/// with the store still failing are the kept outcomes given up (the deliveries run again after
/// the restart).
async fn record_outcomes(store: Arc<dyn EventStore>, mut queue: mpsc::Receiver<Finished>) {
    let mut batch = Vec::with_capacity(MAX_RECORD_BATCH);
    let mut unrecorded: Vec<Finished> = Vec::new();
    let mut closed = false;
    loop {
        if unrecorded.is_empty() {
            if queue.recv_many(&mut batch, MAX_RECORD_BATCH).await == 0 {
                break;
            }
        } else {
            if !closed {
                tokio::time::sleep(STORE_ERROR_PAUSE).await;
            }
            while batch.len() + unrecorded.len() < MAX_RECORD_BATCH {
                match queue.try_recv() {
                    Ok(finished) => batch.push(finished),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        let mut finished = std::mem::take(&mut unrecorded);
        finished.append(&mut batch);
        let recorded = record(&store, finished).await;
        match recorded {
            Ok((errors, finished)) => {
                let mut retries = 0usize;
                for (f, result) in finished.into_iter().zip(errors) {
                    match result {
                        Ok(finish) => {
                            let _ = f.recorded.send(finish);
                        }
                        Err(e) if e.is_transient() && !closed => {
                            retries += 1;
                            unrecorded.push(f);
                        }
                        Err(e) if !e.is_transient() => {
                            // Neither the outcome nor the hand-back taken: an error of these
                            // writes that may pass (a row another session holds locked past
                            // `lock_timeout`), tried again as the store's failures are. Dropped,
                            // the delivery would stay `running`, its lease renewed by this node.
                            if let Some(f) = hand_back_refused(&store, f, e).await {
                                if closed {
                                    log_store_error(&f.claim);
                                } else {
                                    retries += 1;
                                    unrecorded.push(f);
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!("the store's error: {e}");
                            log_store_error(&f.claim);
                        }
                    }
                }
                if retries > 0 {
                    NOT_RECORDED_YET.tell(|untold| {
                        tracing::warn!(
                            outcomes = retries,
                            more_since_last_warning = untold,
                            "delivery outcomes not recorded yet; trying again in \
                             {STORE_ERROR_PAUSE:?}"
                        )
                    });
                }
            }
            Err(e) => tracing::error!("recording delivery outcomes failed: {e}"),
        }
        if closed && unrecorded.is_empty() && queue.is_empty() {
            break;
        }
    }
}

/// When the earliest pending delivery a claim could take falls due, as the dispatcher last read
/// it from the store ([`EventStore::next_due`]), and the handlers with room it was read for: a
/// handler that has room again may have a delivery due sooner.
#[derive(Debug, Default)]
struct KnownDue {
    at: Option<DateTime<Utc>>,
    handlers: Vec<String>,
}

impl KnownDue {
    /// `at`, read for the handlers `limits` leaves room.
    fn read(at: Option<DateTime<Utc>>, limits: &ClaimLimits) -> Self {
        KnownDue {
            at,
            handlers: with_room(limits).map(str::to_owned).collect(),
        }
    }

    /// Whether it was read for the handlers `limits` leaves room (the dispatcher claims only
    /// handlers it lists: `others` is 0).
    fn read_for(&self, limits: &ClaimLimits) -> bool {
        self.handlers
            .iter()
            .map(String::as_str)
            .eq(with_room(limits))
    }
}

/// The handlers `limits` leaves room, in name order.
fn with_room(limits: &ClaimLimits) -> impl Iterator<Item = &str> {
    limits
        .room
        .iter()
        .filter(|(_, room)| **room > 0)
        .map(|(handler, _)| handler.as_str())
}

/// Whether a claim given `room` (each handler's free places) that took `claims` may have left
/// due deliveries behind for want of a place: some handler got as many as it had room for (none,
/// when it had none). Then a place coming free may let the next claim take more; otherwise every
/// handler's due deliveries were all taken, and a place coming free changes nothing.
fn short_of_places(room: &BTreeMap<String, usize>, claims: &[Claim]) -> bool {
    room.iter()
        .any(|(handler, room)| claims.iter().filter(|c| &c.handler == handler).count() >= *room)
}

/// Whether a claim waits [`GATHER_WAIT`] first, with `running` deliveries of this node running,
/// `free` places free across its handlers and `slots` sandbox slots it could fill: only while
/// enough run that more places are about to come free, never with nothing free to claim for
/// (then nothing is claimed at all) and never when the slots, not the places, are what is short.
fn gathers(running: usize, free: usize, slots: usize) -> bool {
    running >= GATHER_PLACES && free > 0 && free < GATHER_PLACES.min(slots)
}

/// The pause after a claim that took every due delivery it had places for, given when the next
/// pending delivery the dispatcher could claim falls due.
///
/// Deliveries of handlers without room (at their cap, quarantined) or not loaded are not
/// counted ([`EventStore::next_due`]). A delivery already due that the claim did not get all the
/// same is held back by something that only a wake-up or time changes: another node is claiming
/// it, or its handler's room changed since. Claiming again at once would find nothing again
/// (with a backlog of a saturated handler, counted, that was a claim and a `next_due` query
/// every millisecond); so a due delivery waits for the dispatcher's other wake-ups or
/// [`IDLE_POLL`]. A delivery due later is waited for.
fn pause_until(due: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Duration {
    match due.map(|at| (at - now).to_std()) {
        Some(Ok(wait)) if !wait.is_zero() => wait.clamp(Duration::from_millis(1), IDLE_POLL),
        _ => IDLE_POLL,
    }
}

/// Records `finished` as [`record_batch`] does; the batch is awaited where the store answers
/// it without a blocking thread, and only the rare one-by-one retry after a failed batch takes
/// one. Gives back `finished` with what became of each.
async fn record(
    store: &Arc<dyn EventStore>,
    finished: Vec<Finished>,
) -> Result<(Vec<Result<Finish, StoreError>>, Vec<Finished>), tokio::task::JoinError> {
    let store = Arc::clone(store);
    let Some(writes) = store.awaited_writes() else {
        return tokio::task::spawn_blocking(move || {
            let results = record_batch(store.as_ref(), &finished);
            (results, finished)
        })
        .await;
    };
    let items: Vec<(&Claim, &AttemptRecord)> =
        finished.iter().map(|f| (&f.claim, &f.record)).collect();
    let pending = writes.finish_batch_awaited(&items);
    drop(items);
    let answer = pending.await;
    match answer {
        Err(e) if !e.is_transient() => {
            tokio::task::spawn_blocking(move || {
                let results = record_one_by_one(store.as_ref(), &finished, &e);
                (results, finished)
            })
            .await
        }
        answer => Ok((batch_results(answer, finished.len()), finished)),
    }
}

/// Records `finished` in one transaction; if that fails (a shared database may abort it, e.g. to
/// break a deadlock with another node's claim), records each on its own, so that one failure
/// costs only its own outcome — unless the whole store is failing (disk full, server
/// unreachable): then each would fail the same way, after waiting on the store again. Gives,
/// for each, what became of it or the error that kept it from being recorded.
fn record_batch(store: &dyn EventStore, finished: &[Finished]) -> Vec<Result<Finish, StoreError>> {
    let items: Vec<(&Claim, &AttemptRecord)> =
        finished.iter().map(|f| (&f.claim, &f.record)).collect();
    match store.finish_batch(&items) {
        Err(e) if !e.is_transient() => record_one_by_one(store, finished, &e),
        answer => batch_results(answer, items.len()),
    }
}

/// What a batch's answer says of each of its `count` outcomes; a failed batch's error
/// (transient: the whole store is failing) for each.
fn batch_results(
    answer: Result<Vec<Finish>, StoreError>,
    count: usize,
) -> Vec<Result<Finish, StoreError>> {
    match answer {
        Ok(results) if results.len() == count => results.into_iter().map(Ok).collect(),
        Ok(_) => (0..count)
            .map(|_| {
                Err(StoreError::Database(
                    "the store did not say what became of each outcome".into(),
                ))
            })
            .collect(),
        Err(e) => (0..count).map(|_| Err(e.for_each_call())).collect(),
    }
}

/// Records each of `finished` on its own, after their batch failed with `batch_error`.
fn record_one_by_one(
    store: &dyn EventStore,
    finished: &[Finished],
    batch_error: &StoreError,
) -> Vec<Result<Finish, StoreError>> {
    tracing::warn!(
        outcomes = finished.len(),
        "recording outcomes together failed ({batch_error}); recording them one by one"
    );
    finished
        .iter()
        .map(|f| store.finish(&f.claim, &f.record))
        .collect()
}

/// How often a failure the recorder meets again and again is told (with how many times it was
/// not): a store down for an hour is tried every [`STORE_ERROR_PAUSE`].
const RECORD_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Outcomes neither recorded nor handed back, told once per [`RECORD_FAILURE_LOG_INTERVAL`].
static NOT_HANDED_BACK: crate::log_limit::LogLimit =
    crate::log_limit::LogLimit::new(RECORD_FAILURE_LOG_INTERVAL);

/// Failed claims, told once per [`RECORD_FAILURE_LOG_INTERVAL`]: the dispatcher tries again
/// every [`STORE_ERROR_PAUSE`] for as long as the store fails.
static CLAIM_FAILURES: crate::log_limit::LogLimit =
    crate::log_limit::LogLimit::new(RECORD_FAILURE_LOG_INTERVAL);

/// Rounds of outcomes kept for another try, told once per [`RECORD_FAILURE_LOG_INTERVAL`].
static NOT_RECORDED_YET: crate::log_limit::LogLimit =
    crate::log_limit::LogLimit::new(RECORD_FAILURE_LOG_INTERVAL);

/// After the store refused `finished`'s outcome (an error about that write, not about the
/// store), gives its claim back instead: pending again, the attempt listed as interrupted with
/// the reason, a write without the outcome that is likely to succeed where the outcome's
/// failed. Otherwise the delivery would stay `running`, its lease renewed by this node, until
/// a restart. The outcome is not reported as recorded, so quarantine does not count it. Gives
/// `finished` back when the hand-back failed too, to be tried again.
async fn hand_back_refused(
    store: &Arc<dyn EventStore>,
    finished: Finished,
    refused: StoreError,
) -> Option<Finished> {
    let store = Arc::clone(store);
    let handed = tokio::task::spawn_blocking(move || {
        let record = handed_back(
            format!("the store refused to record its outcome ({refused}); it runs again"),
            store.now(),
        );
        let result = store.finish(&finished.claim, &record);
        (result, refused, finished)
    })
    .await;
    match handed {
        Ok((Ok(_), refused, _)) => {
            tracing::error!(
                "cannot record a delivery outcome: {refused}; the delivery was handed back and \
                 runs again"
            );
            None
        }
        Ok((Err(e), refused, finished)) => {
            NOT_HANDED_BACK.tell(|untold| {
                tracing::warn!(
                    event_id = %finished.claim.event_id,
                    handler = %crate::escape::escape(&finished.claim.handler),
                    more_since_last_warning = untold,
                    "cannot record a delivery outcome ({refused}), nor hand the delivery back \
                     ({e}); trying again in {STORE_ERROR_PAUSE:?}"
                )
            });
            Some(finished)
        }
        Err(e) => {
            tracing::error!("cannot hand back a delivery whose outcome was refused: {e}");
            None
        }
    }
}

/// An outcome given up as the engine stops with the store still failing.
fn log_store_error(claim: &Claim) {
    tracing::error!(
        event_id = %claim.event_id,
        handler = %crate::escape::escape(&claim.handler),
        "cannot record a delivery outcome as the engine stops; the delivery runs again after \
         the restart"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::JobContext;
    use crate::queue::store::sqlite::SqliteStore;
    use crate::queue::store::{DeliveryState, NewEvent};

    /// SQLite, except that recording more than one outcome in a transaction always fails (as a
    /// shared database may abort such a transaction to break a deadlock), and that the first
    /// `.1` recordings fail as on a full disk. With `.3`, it offers its writes to be awaited
    /// (as SQLite does), failing them the same way; without, only the blocking ones (as
    /// PostgreSQL does).
    struct BatchFails(
        SqliteStore,
        std::sync::atomic::AtomicUsize,
        fn() -> StoreError,
        bool,
    );

    impl BatchFails {
        fn new(store: SqliteStore, disk_full_for: usize) -> Self {
            Self::failing_with(store, disk_full_for, || {
                StoreError::DiskFull("database or disk is full".into())
            })
        }

        /// The first `n` recordings fail with `error()`.
        fn failing_with(store: SqliteStore, n: usize, error: fn() -> StoreError) -> Self {
            BatchFails(store, std::sync::atomic::AtomicUsize::new(n), error, false)
        }

        /// The same, with its writes offered to be awaited (`awaited`) or not.
        fn awaited(self, awaited: bool) -> Self {
            BatchFails(self.0, self.1, self.2, awaited)
        }

        /// The error recording `finished` meets, if it meets one.
        fn failure(&self, finished: &[(&Claim, &AttemptRecord)]) -> Option<StoreError> {
            if finished.len() > 1 {
                return Some(StoreError::Database("deadlock detected".into()));
            }
            let full = self
                .1
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            full.then(self.2)
        }
    }

    impl crate::queue::store::AwaitedWrites for BatchFails {
        fn insert_event_awaited(
            &self,
            event: &NewEvent,
            key: Option<&crate::queue::store::Idempotency>,
        ) -> crate::queue::store::Answer<crate::queue::store::Inserted> {
            crate::queue::store::AwaitedWrites::insert_event_awaited(&self.0, event, key)
        }
        fn claim_batch_awaited(
            &self,
            now: chrono::DateTime<Utc>,
            limits: &ClaimLimits,
            lease: Duration,
        ) -> crate::queue::store::Answer<Vec<Claim>> {
            crate::queue::store::AwaitedWrites::claim_batch_awaited(&self.0, now, limits, lease)
        }
        fn finish_batch_awaited(
            &self,
            finished: &[(&Claim, &AttemptRecord)],
        ) -> crate::queue::store::Answer<Vec<Finish>> {
            match self.failure(finished) {
                Some(e) => Box::pin(std::future::ready(Err(e))),
                None => crate::queue::store::AwaitedWrites::finish_batch_awaited(&self.0, finished),
            }
        }
    }

    impl EventStore for BatchFails {
        crate::queue::store::conformance::pass_on_the_rest!(all but finishes);
        fn awaited_writes(&self) -> Option<&dyn crate::queue::store::AwaitedWrites> {
            if self.3 { Some(self) } else { None }
        }
        fn finish_batch(
            &self,
            finished: &[(&Claim, &AttemptRecord)],
        ) -> Result<Vec<Finish>, StoreError> {
            match self.failure(finished) {
                Some(e) => Err(e),
                None => self.0.finish_batch(finished),
            }
        }
    }

    /// A batch's answer gives each outcome its own result: an answer that does not account for
    /// each, or a failure of the whole store, leaves none of them recorded.
    #[test]
    fn a_batch_answer_says_what_became_of_each_outcome() {
        let recorded = |results: &[Result<Finish, StoreError>]| -> Vec<Option<Finish>> {
            results.iter().map(|r| r.as_ref().ok().copied()).collect()
        };
        let answer = Ok(vec![Finish::Recorded, Finish::Late]);
        assert_eq!(
            recorded(&batch_results(answer, 2)),
            [Some(Finish::Recorded), Some(Finish::Late)]
        );
        for short in [vec![Finish::Recorded], Vec::new()] {
            let results = batch_results(Ok(short), 2);
            assert_eq!(recorded(&results), [None, None]);
        }
        let full = StoreError::DiskFull("database or disk is full".into());
        let results = batch_results(Err(full), 3);
        assert_eq!(results.len(), 3);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::DiskFull(_)))),
            "{results:?}"
        );
    }

    /// Whether the batch is awaited (SQLite) or run on a blocking thread (PostgreSQL), a failed
    /// batch is recorded one outcome at a time.
    #[tokio::test]
    async fn outcomes_are_recorded_one_by_one_when_their_batch_fails() {
        for awaited in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = BatchFails::new(SqliteStore::open(dir.path()).unwrap(), 0).awaited(awaited);
            let claims: Vec<Claim> = (0..3).map(|_| claimed(&store)).collect();
            let finished: Vec<Finished> = claims
                .into_iter()
                .map(|claim| Finished {
                    claim,
                    record: unreadable("test".into(), Utc::now()),
                    recorded: oneshot::channel().0,
                })
                .collect();
            let store: Arc<dyn EventStore> = Arc::new(store);
            let (results, finished) = record(&store, finished).await.unwrap();
            let recorded: Vec<bool> = results
                .iter()
                .map(|r| matches!(r, Ok(Finish::Recorded)))
                .collect();
            assert_eq!(recorded, [true, true, true], "awaited: {awaited}");
            assert_eq!(finished.len(), 3);
            assert_eq!(
                store.count_by_state().unwrap(),
                vec![(DeliveryState::Failed, 3)],
                "awaited: {awaited}"
            );
        }
    }

    /// An outcome the store refuses, whose hand-back is refused too (a row another session
    /// holds locked past `lock_timeout`: an error about the writes, not the store), is kept and
    /// recorded once the store takes it — not dropped, which left the delivery `running` with
    /// its lease renewed by this node until a restart.
    #[tokio::test]
    async fn an_outcome_whose_hand_back_is_refused_too_is_kept_and_recorded_later() {
        let dir = tempfile::tempdir().unwrap();
        // The batch, the outcome on its own and the hand-back fail; the next round succeeds.
        let store = BatchFails::failing_with(SqliteStore::open(dir.path()).unwrap(), 3, || {
            StoreError::Database("canceling statement due to lock timeout (SQLSTATE 55P03)".into())
        });
        let claim = claimed(&store);
        let store: Arc<dyn EventStore> = Arc::new(store);
        let (send, queue) = mpsc::channel(4);
        let recorder = tokio::spawn(record_outcomes(Arc::clone(&store), queue));
        let (recorded, told) = oneshot::channel();
        send.send(Finished {
            claim,
            record: unreadable("test".into(), Utc::now()),
            recorded,
        })
        .await
        .unwrap();
        let told = tokio::time::timeout(STORE_ERROR_PAUSE * 10, told)
            .await
            .expect("recorded in time");
        assert_eq!(told.ok(), Some(Finish::Recorded));
        assert_eq!(
            store.count_by_state().unwrap(),
            vec![(DeliveryState::Failed, 1)]
        );
        drop(send);
        recorder.await.unwrap();
    }

    /// One delivery of a new event, claimed from `store`.
    fn claimed(store: &dyn EventStore) -> Claim {
        inserted(store);
        let limits = ClaimLimits::any(1);
        store
            .claim_batch(Utc::now(), &limits, DEFAULT_LEASE)
            .unwrap()
            .pop()
            .unwrap()
    }

    /// Inserts an event of a failed job for handler `a`.
    fn inserted(store: &dyn EventStore) {
        inserted_for(store, &["a"]);
    }

    /// Inserts an event of a failed job for `handlers`; gives its id.
    fn inserted_for(store: &dyn EventStore, handlers: &[&str]) -> Uuid {
        let id = crate::queue::store::new_event_id();
        let context = JobContext::from_json_value(&serde_json::json!({
            "AgentId": "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11", "Username": "u",
            "ClientMachine": "m", "JobResult": "Failure",
            "JobId": "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01", "JobType": "WinCertInventory",
            "JobTypeId": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f", "OperationType": 0,
            "CurrentRetryCount": 2
        }))
        .unwrap();
        store
            .insert_event(&NewEvent {
                id,
                source: "test".into(),
                context,
                message: None,
                handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
            })
            .unwrap();
        id
    }

    /// SQLite, counting the claims made of it (`.1`); it offers no awaited writes, so every
    /// claim goes through [`EventStore::claim_batch`].
    struct CountsClaims(SqliteStore, AtomicUsize);

    impl EventStore for CountsClaims {
        crate::queue::store::conformance::pass_on_the_rest!();
        fn claim_batch(
            &self,
            now: DateTime<Utc>,
            limits: &ClaimLimits,
            lease: Duration,
        ) -> Result<Vec<Claim>, StoreError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.claim_batch(now, limits, lease)
        }
        fn insert_event(&self, event: &NewEvent) -> Result<(), StoreError> {
            self.0.insert_event(event)
        }
        fn insert_event_once(
            &self,
            event: &NewEvent,
            key: &crate::queue::store::Idempotency,
        ) -> Result<crate::queue::store::Inserted, StoreError> {
            self.0.insert_event_once(event, key)
        }
        fn finish_batch(
            &self,
            finished: &[(&Claim, &AttemptRecord)],
        ) -> Result<Vec<Finish>, StoreError> {
            self.0.finish_batch(finished)
        }
    }

    /// SQLite in `dir`, counting the claims made of it.
    fn counting_claims(dir: &std::path::Path) -> Arc<CountsClaims> {
        Arc::new(CountsClaims(
            SqliteStore::open(dir).unwrap(),
            AtomicUsize::new(0),
        ))
    }

    #[tokio::test]
    async fn a_dispatcher_without_handlers_never_claims() {
        // Nothing is claimable by a node that has no handler: another node's deliveries wait
        // for that node. Before, every event woke it to claim and then to ask when the next
        // delivery falls due.
        let dir = tempfile::tempdir().unwrap();
        let store = counting_claims(dir.path());
        inserted(store.as_ref());
        let shared: Arc<dyn EventStore> = Arc::clone(&store) as _;
        let dispatcher = Dispatcher::new(shared, Registry::default(), Arc::new(Metrics::new()), 8);
        let run = Running(
            Arc::clone(&dispatcher),
            tokio::spawn(Arc::clone(&dispatcher).run(Duration::from_secs(1))),
        );
        for _ in 0..20 {
            dispatcher.wake();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        run.stop().await;
        assert_eq!(store.1.load(Ordering::SeqCst), 0, "claims made");
        assert_eq!(
            store.count_by_state().unwrap(),
            [(DeliveryState::Pending, 1)]
        );
    }

    /// A dispatcher over `store` with `handler`, running.
    fn running_with(store: &Arc<CountsClaims>, handler: Arc<RegisteredHandler>) -> Running {
        running_with_all(store, vec![handler])
    }

    /// A dispatcher over `store` with `handlers`, running.
    fn running_with_all(
        store: &Arc<CountsClaims>,
        handlers: Vec<Arc<RegisteredHandler>>,
    ) -> Running {
        let shared: Arc<dyn EventStore> = Arc::clone(store) as _;
        let registry = Registry::new(handlers);
        let dispatcher = Dispatcher::new(shared, registry, Arc::new(Metrics::new()), 8);
        Running(
            Arc::clone(&dispatcher),
            tokio::spawn(Arc::clone(&dispatcher).run(Duration::from_secs(1))),
        )
    }

    /// Inserts one event for handler `a`, wakes the dispatcher as the API does, and waits
    /// until every delivery has ended (none pending or running); gives the time that took.
    async fn delivered(store: &CountsClaims, run: &Running) -> Duration {
        let start = Instant::now();
        inserted(store);
        run.0.wake();
        let until = start + Duration::from_secs(20);
        loop {
            let counts = store.count_by_state().unwrap();
            let open = counts
                .iter()
                .any(|(state, _)| matches!(state, DeliveryState::Pending | DeliveryState::Running));
            if !open {
                return start.elapsed();
            }
            assert!(Instant::now() < until, "not delivered: {counts:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A dispatcher keeping up with events that come one at a time claims once per event.
    /// Before, it claimed again right after each claim and again when each delivery ended —
    /// claims that found nothing, each followed by a `next_due` query: three store round trips
    /// per event where one does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_that_come_one_at_a_time_are_claimed_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = counting_claims(dir.path());
        let run = running_with(&store, handler_a("log-context").await);
        // The handler earns its places first (one at the start, doubled by each success): a
        // handler with no place to spare is claimed for again when a place comes free.
        for _ in 0..8 {
            delivered(&store, &run).await;
        }
        let before = store.1.load(Ordering::SeqCst);
        const EVENTS: usize = 20;
        for _ in 0..EVENTS {
            delivered(&store, &run).await;
        }
        let claims = store.1.load(Ordering::SeqCst) - before;
        run.stop().await;
        // One more than one per event at most: the idle poll may run out once in between.
        assert!(
            (EVENTS..=EVENTS + 1).contains(&claims),
            "{claims} claims for {EVENTS} events"
        );
    }

    /// A dispatcher stopped after its deliveries ended says nothing of deliveries to wait for:
    /// those that ended are not running, whether or not the dispatcher has joined their tasks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_after_every_delivery_ended_waits_for_none() {
        use tracing::instrument::WithSubscriber as _;
        let dir = tempfile::tempdir().unwrap();
        let store = counting_claims(dir.path());
        let shared: Arc<dyn EventStore> = Arc::clone(&store) as _;
        let registry = Registry::new([handler_a("log-context").await]);
        let dispatcher = Dispatcher::new(shared, registry, Arc::new(Metrics::new()), 8);
        let log = crate::log_capture::Captured::default();
        let run = Running(
            Arc::clone(&dispatcher),
            tokio::spawn(
                Arc::clone(&dispatcher)
                    .run(Duration::from_secs(10))
                    .with_subscriber(log.warnings()),
            ),
        );
        // Its places earned, so that the dispatcher waits for events, not for a place.
        for _ in 0..8 {
            delivered(&store, &run).await;
        }
        // A delivery's task ends moments after its outcome is on record (it counts the outcome
        // towards its handler's places first).
        tokio::time::sleep(Duration::from_millis(200)).await;
        run.stop().await;
        let text = log.text();
        assert!(!text.contains("waiting up to"), "{text}");
    }

    /// A delivery whose engine code panicked is handed back, and the dispatcher is woken and
    /// told to read the next due time again only once the hand-back is on record: woken
    /// before, it would claim, find the delivery still running, and leave it to the idle poll.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panics_hand_back_is_on_record_before_the_dispatcher_is_woken() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let claim = claimed(store.as_ref());
        let dispatcher = Dispatcher::new(
            Arc::clone(&store),
            Registry::default(),
            Arc::new(Metrics::new()),
            8,
        );
        dispatcher.due_moved.store(false, Ordering::SeqCst);
        let (record, queue) = mpsc::channel(4);
        let recorder = tokio::spawn(record_outcomes(Arc::clone(&store), queue));
        dispatcher
            .hand_back_after_panic(claim, "a bug".into(), &record)
            .await;
        assert_eq!(
            store.count_by_state().unwrap(),
            [(DeliveryState::Pending, 1)]
        );
        assert!(dispatcher.due_moved.load(Ordering::SeqCst));
        tokio::time::timeout(Duration::from_secs(1), dispatcher.wake.notified())
            .await
            .expect("the dispatcher was not woken");
        drop(record);
        recorder.await.unwrap();
    }

    /// A failure that schedules a retry moves the next due time earlier than the dispatcher
    /// last read it: the retry runs when it falls due, not at the next idle poll.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_runs_when_it_falls_due_not_at_the_next_idle_poll() {
        const BACKOFF: Duration = Duration::from_millis(20);
        let dir = tempfile::tempdir().unwrap();
        let store = counting_claims(dir.path());
        let retry = RetryPolicy {
            max_attempts: 2,
            backoff: BACKOFF,
            max_backoff: BACKOFF,
        };
        let handler = handler_a_retrying("guest-trap", retry).await;
        // Not set aside by quarantine after the first rounds' failures.
        handler.reconfigure_quarantine(&QuarantineConfig {
            after_failures: 0,
            ..QuarantineConfig::default()
        });
        let run = running_with(&store, handler);
        // Two attempts and the backoff between them take milliseconds; a retry left for the
        // idle poll waits IDLE_POLL after the first. The fastest of three rounds, so that a
        // stalled machine does not fail the test.
        let mut fastest = Duration::MAX;
        for _ in 0..3 {
            fastest = fastest.min(delivered(&store, &run).await);
        }
        run.stop().await;
        assert_eq!(
            store.count_by_state().unwrap(),
            [(DeliveryState::Failed, 3)]
        );
        assert!(
            fastest < IDLE_POLL - Duration::from_millis(100),
            "two attempts {BACKOFF:?} apart took {fastest:?} at best"
        );
    }

    /// Inserts one event for handler `a`, wakes the dispatcher as the API does, and waits
    /// until its delivery has ended, whatever other deliveries do; gives the time that took.
    async fn delivered_to_a(store: &CountsClaims, run: &Running) -> Duration {
        let start = Instant::now();
        let id = inserted_for(store, &["a"]);
        run.0.wake();
        let until = start + Duration::from_secs(20);
        loop {
            let event = store.event(id).unwrap().expect("the event");
            if event.deliveries.iter().all(|d| d.state.is_terminal()) {
                return start.elapsed();
            }
            assert!(Instant::now() < until, "not delivered: {event:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A retry runs when it falls due while another handler's deliveries are overdue and cannot
    /// be claimed here — their handler quarantined, at its cap, or not configured on this node.
    /// Their due time, long past, made the dispatcher wait for its idle poll instead of for the
    /// retry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_runs_when_it_falls_due_while_another_handlers_deliveries_wait() {
        const BACKOFF: Duration = Duration::from_millis(20);
        for held in ["quarantined", "at its cap", "not configured"] {
            let dir = tempfile::tempdir().unwrap();
            let store = counting_claims(dir.path());
            let retry = RetryPolicy {
                max_attempts: 2,
                backoff: BACKOFF,
                max_backoff: BACKOFF,
            };
            let a = handler_named("a", "guest-trap", retry).await;
            a.reconfigure_quarantine(&QuarantineConfig {
                after_failures: 0,
                ..QuarantineConfig::default()
            });
            let mut handlers = vec![a];
            if held != "not configured" {
                let b = handler_named("b", "log-context", RetryPolicy::default()).await;
                if held == "quarantined" {
                    let now = Instant::now();
                    for _ in 0..crate::queue::quarantine::DEFAULT_QUARANTINE_AFTER {
                        b.quarantine().record(false, now, now);
                    }
                    assert!(b.quarantine().is_quarantined(Instant::now()));
                } else {
                    // Its one place taken, as by a delivery running.
                    b.running.fetch_add(b.places(), Ordering::Relaxed);
                }
                handlers.push(b);
            }
            let waiting = inserted_for(store.as_ref(), &["b"]);
            let run = running_with_all(&store, handlers);
            // As in `a_retry_runs_when_it_falls_due_not_at_the_next_idle_poll`.
            let mut fastest = Duration::MAX;
            for _ in 0..3 {
                fastest = fastest.min(delivered_to_a(&store, &run).await);
            }
            run.stop().await;
            let b = store.event(waiting).unwrap().expect("the event");
            assert_eq!(b.deliveries[0].state, DeliveryState::Pending, "{held}");
            assert!(
                fastest < IDLE_POLL - Duration::from_millis(100),
                "{held}: two attempts {BACKOFF:?} apart took {fastest:?} at best"
            );
        }
    }

    /// SQLite, except that no outcome is recorded before `.1` is set: every recording waits
    /// for it.
    struct RecordsHeld(SqliteStore, std::sync::atomic::AtomicBool);

    impl RecordsHeld {
        fn new(dir: &std::path::Path) -> Arc<Self> {
            Arc::new(RecordsHeld(SqliteStore::open(dir).unwrap(), false.into()))
        }

        /// Deliveries claimed so far: all but those still pending.
        fn claimed(&self) -> u64 {
            self.count_by_state()
                .unwrap()
                .iter()
                .filter(|(state, _)| *state != DeliveryState::Pending)
                .map(|(_, n)| n)
                .sum()
        }

        /// [`RecordsHeld::claimed`] once it reaches `n`, or as it is after `within`.
        async fn claimed_within(&self, n: u64, within: Duration) -> u64 {
            let until = Instant::now() + within;
            while self.claimed() < n && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            self.claimed()
        }
    }

    impl EventStore for RecordsHeld {
        crate::queue::store::conformance::pass_on_the_rest!(all but finishes);
        fn finish_batch(
            &self,
            finished: &[(&Claim, &AttemptRecord)],
        ) -> Result<Vec<Finish>, StoreError> {
            let until = Instant::now() + Duration::from_secs(30);
            while !self.1.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.0.finish_batch(finished)
        }
    }

    /// Handler `a`: the test guest `package` with default limits, no grants, for every job type.
    async fn handler_a(package: &str) -> Arc<RegisteredHandler> {
        handler_a_retrying(package, RetryPolicy::default()).await
    }

    /// [`handler_a`] with the retry policy `retry`.
    async fn handler_a_retrying(package: &str, retry: RetryPolicy) -> Arc<RegisteredHandler> {
        handler_named("a", package, retry).await
    }

    /// Handler `name`: as [`handler_a`], with the retry policy `retry`.
    async fn handler_named(
        name: &str,
        package: &str,
        retry: RetryPolicy,
    ) -> Arc<RegisteredHandler> {
        let engine = crate::runtime::engine::Engine::new(4).unwrap();
        let spec = crate::runtime::state::SandboxSpec::new(name);
        let handler = SandboxedHandler::load(
            &engine,
            &crate::capabilities::Services::default(),
            jobhook_testkit::guest_bytes(package),
            spec.clone(),
            &crate::runtime::loader::LoadOptions::default(),
        )
        .await
        .unwrap();
        let registration = Registration {
            name: name.into(),
            component: jobhook_testkit::guest(package),
            job_types: JobTypes::All,
            properties: spec.properties,
            secret_properties: Default::default(),
            grants: spec.grants,
            limits: spec.limits,
            retry,
            max_concurrency: crate::queue::registration::DEFAULT_HANDLER_CONCURRENCY,
            line: 1,
        };
        Arc::new(RegisteredHandler::new(
            registration,
            handler,
            QuarantineConfig::default(),
        ))
    }

    /// A handler a reload removed while deliveries of its ran is counted running under its name
    /// until they end; configured again, its new handler counts them with its own, against its
    /// `max_concurrency`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn running_deliveries_of_a_removed_handler_are_counted_until_they_end() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = counting_claims(dir.path());
        let handler =
            |name: &'static str| handler_named(name, "log-context", RetryPolicy::default());
        let (a, b) = (handler("a").await, handler("b").await);
        a.running.fetch_add(2, Ordering::Relaxed);
        b.running.fetch_add(1, Ordering::Relaxed);
        let dispatcher = Dispatcher::new(
            store,
            Registry::new([Arc::clone(&a), Arc::clone(&b)]),
            Arc::new(Metrics::new()),
            8,
        );
        assert!(dispatcher.running_unconfigured().is_empty());
        // `a` removed, `b` kept: only `a`'s are apart.
        dispatcher.replace_registry(Registry::new([Arc::clone(&b)]));
        assert_eq!(
            dispatcher.running_unconfigured(),
            BTreeMap::from([("a".to_owned(), 2)])
        );
        a.running.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(
            dispatcher.running_unconfigured(),
            BTreeMap::from([("a".to_owned(), 1)])
        );
        // Configured again: its new handler counts the one still running with its own, so it
        // has one place less; removed once more, that one is shown apart again.
        assert!(dispatcher.removed_still_running("b").is_none());
        let fresh = handler("a").await;
        let room_of_a_new_one = fresh.room();
        let RegisteredHandler {
            config, handler, ..
        } = Arc::try_unwrap(fresh).expect("the only reference");
        let again = Arc::new(RegisteredHandler::continuing(
            dispatcher
                .removed_still_running("a")
                .expect("a delivery of `a` runs"),
            config,
            handler,
            QuarantineConfig::default(),
        ));
        assert_eq!(again.running(), 1);
        assert_eq!(again.room(), room_of_a_new_one - 1);
        dispatcher.replace_registry(Registry::new([Arc::clone(&again), Arc::clone(&b)]));
        assert!(dispatcher.running_unconfigured().is_empty());
        dispatcher.replace_registry(Registry::new([Arc::clone(&b)]));
        assert_eq!(
            dispatcher.running_unconfigured(),
            BTreeMap::from([("a".to_owned(), 1)])
        );
        a.running.fetch_sub(1, Ordering::Relaxed);
        assert!(dispatcher.running_unconfigured().is_empty());
        // Ended: forgotten.
        dispatcher.replace_registry(Registry::default());
        assert_eq!(
            dispatcher.running_unconfigured(),
            BTreeMap::from([("b".to_owned(), 1)])
        );
        b.running.fetch_sub(1, Ordering::Relaxed);
        assert!(dispatcher.running_unconfigured().is_empty());
        assert!(dispatcher.retired.lock().unwrap().is_empty());
    }

    /// A success frees its handler's place once its outcome is queued for the store, so the
    /// handler's next delivery does not wait for the commit; a failure holds its place until
    /// its outcome is on record, so quarantine and the earned places have counted it before the
    /// handler runs again. (A new handler has one place: its second delivery waits for the
    /// first's place.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_success_frees_its_place_before_its_outcome_is_on_record_a_failure_after() {
        for (package, succeeds) in [("log-context", true), ("guest-trap", false)] {
            let dir = tempfile::tempdir().unwrap();
            let store = RecordsHeld::new(dir.path());
            inserted(store.as_ref());
            inserted(store.as_ref());
            let run = dispatching(&store, package, 4).await;
            assert!(
                store.claimed_within(1, Duration::from_secs(20)).await >= 1,
                "{package}"
            );
            // Whatever the first delivery did, its outcome is not on record yet.
            if succeeds {
                let before_record = store.claimed_within(2, Duration::from_secs(20)).await;
                assert_eq!(before_record, 2, "{package}: the success held its place");
            } else {
                let before_record = store.claimed_within(2, Duration::from_millis(1500)).await;
                assert_eq!(before_record, 1, "{package}: the failure freed its place");
            }
            store.1.store(true, Ordering::SeqCst);
            let after = store.claimed_within(2, Duration::from_secs(20)).await;
            assert_eq!(after, 2, "{package}");
            run.stop().await;
        }
    }

    /// Outcomes not yet on record stay bounded while the store does not take them: with one
    /// slot, one outcome is being recorded, one waits in the recorder's queue (as large as the
    /// slots), and the next delivery waits for room there holding its slot — no fourth delivery
    /// starts, however many are due.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outcomes_waiting_for_the_store_are_bounded_by_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordsHeld::new(dir.path());
        for _ in 0..6 {
            inserted(store.as_ref());
        }
        let run = dispatching(&store, "log-context", 1).await;
        assert_eq!(store.claimed_within(3, Duration::from_secs(20)).await, 3);
        // Given time, nothing more starts while the store holds the outcomes back.
        assert_eq!(
            store.claimed_within(4, Duration::from_millis(1500)).await,
            3
        );
        store.1.store(true, Ordering::SeqCst);
        assert_eq!(store.claimed_within(6, Duration::from_secs(20)).await, 6);
        run.stop().await;
    }

    /// A dispatcher running handler `a` (the test guest `package`) over `store` with `slots`.
    async fn dispatching(store: &Arc<RecordsHeld>, package: &str, slots: usize) -> Running {
        let registry = Registry::new([handler_a(package).await]);
        let shared: Arc<dyn EventStore> = Arc::clone(store) as _;
        let dispatcher = Dispatcher::new(shared, registry, Arc::new(Metrics::new()), slots);
        let run = tokio::spawn(Arc::clone(&dispatcher).run(Duration::from_secs(10)));
        Running(dispatcher, run)
    }

    /// A dispatcher and the task running it.
    struct Running(Arc<Dispatcher>, tokio::task::JoinHandle<()>);

    impl Running {
        async fn stop(self) {
            self.0.stop();
            self.1.await.unwrap();
        }
    }

    /// A recorder over `store` with a skipped outcome of `claim` sent to it: the sender (drop it
    /// to stop the engine), the recorder, and what says what became of the outcome.
    async fn recording(
        store: Arc<dyn EventStore>,
        claim: Claim,
    ) -> (
        mpsc::Sender<Finished>,
        tokio::task::JoinHandle<()>,
        oneshot::Receiver<Finish>,
    ) {
        let (record, queue) = mpsc::channel(4);
        let recorder = tokio::spawn(record_outcomes(store, queue));
        let (recorded, done) = oneshot::channel();
        record
            .send(Finished {
                claim,
                record: unreadable("test".into(), Utc::now()),
                recorded,
            })
            .await
            .unwrap_or_else(|_| panic!("the recorder stopped"));
        (record, recorder, done)
    }

    /// [`recording`] of one delivery of a new event, claimed from `store`.
    async fn recording_one(
        store: &Arc<BatchFails>,
    ) -> (
        mpsc::Sender<Finished>,
        tokio::task::JoinHandle<()>,
        oneshot::Receiver<Finish>,
    ) {
        let claim = claimed(store.as_ref());
        recording(Arc::clone(store) as Arc<dyn EventStore>, claim).await
    }

    /// What the recorder over `store` answers for `claim`'s outcome.
    async fn report(store: Arc<SqliteStore>, claim: Claim) -> Finish {
        let (record, recorder, done) = recording(store, claim).await;
        let answer = done.await.expect("an answer");
        drop(record);
        recorder.await.unwrap();
        answer
    }

    /// An attempt whose claim was taken over (its node was frozen past the lease, and another
    /// node — here a second process on the same database — requeued and claimed it) is reported
    /// back as late, so quarantine does not count it; the attempt that took over is recorded.
    #[tokio::test]
    async fn a_late_outcome_is_reported_as_late_and_the_takeover_as_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let frozen = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let other = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let stale = claimed(frozen.as_ref());
        let later = crate::queue::store::after(Utc::now(), DEFAULT_LEASE * 2);
        assert_eq!(other.requeue_abandoned(later).unwrap(), 1);
        let limits = ClaimLimits::any(1);
        let fresh = other
            .claim_batch(later, &limits, DEFAULT_LEASE)
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(fresh.attempt, 2);
        assert_eq!(report(frozen, stale).await, Finish::Late);
        assert_eq!(report(Arc::clone(&other), fresh).await, Finish::Recorded);
        assert_eq!(
            other.count_by_state().unwrap(),
            vec![(DeliveryState::Failed, 1)]
        );
    }

    #[test]
    fn places_are_earned_by_successes_and_lost_by_failures() {
        // A new handler: one place; four successes in a row reach a cap of 16, no further.
        let mut places = FIRST_PLACES;
        for expected in [2, 4, 8, 16, 16] {
            places = places_after(places, 16, true);
            assert_eq!(places, expected);
        }
        // Each failure halves them, never below the first place.
        for expected in [8, 4, 2, 1, 1] {
            places = places_after(places, 16, false);
            assert_eq!(places, expected);
        }
        // A cap below the first place count still lets one delivery run.
        assert_eq!(places_after(1, 0, true), FIRST_PLACES);
        assert_eq!(places_after(usize::MAX, usize::MAX, true), usize::MAX);
    }

    #[test]
    fn a_delivery_already_due_that_no_claim_got_is_not_polled_for_in_a_loop() {
        let now = Utc::now();
        // Due now or overdue, yet not claimed: held back by another node; only the
        // dispatcher's wake-ups or the idle poll may claim again.
        assert_eq!(pause_until(Some(now), now), IDLE_POLL);
        assert_eq!(
            pause_until(Some(now - chrono::Duration::seconds(30)), now),
            IDLE_POLL
        );
        // Nothing pending.
        assert_eq!(pause_until(None, now), IDLE_POLL);
        // Due soon: waited for exactly; due later than the idle poll: the idle poll.
        assert_eq!(
            pause_until(Some(now + chrono::Duration::milliseconds(40)), now),
            Duration::from_millis(40)
        );
        assert_eq!(
            pause_until(Some(now + chrono::Duration::microseconds(10)), now),
            Duration::from_millis(1)
        );
        assert_eq!(
            pause_until(Some(now + chrono::Duration::hours(1)), now),
            IDLE_POLL
        );
    }

    /// What the gather wait counts as running: the deliveries holding a slot, not the claim's
    /// own slots (nor tasks whose successes wait for the recorder, which hold none).
    #[test]
    fn deliveries_holding_a_slot_are_counted_without_the_claims_own() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let dispatcher = Dispatcher::new(store, Registry::default(), Arc::new(Metrics::new()), 8);
        let take = |n: usize| -> Vec<OwnedSemaphorePermit> {
            (0..n)
                .map(|_| Arc::clone(&dispatcher.slots).try_acquire_owned().unwrap())
                .collect()
        };
        let running = take(3);
        let own = take(2);
        assert_eq!(dispatcher.holding(&own), 3);
        drop(running);
        assert_eq!(dispatcher.holding(&own), 0);
    }

    #[test]
    fn a_claim_waits_for_places_to_gather_only_behind_enough_running_deliveries() {
        // A CPU-bound handler at its cap: one place free, sixteen running — wait for more.
        assert!(gathers(16, 1, 48));
        assert!(gathers(GATHER_PLACES, GATHER_PLACES - 1, 48));
        // Enough free already, or nothing free to claim for.
        assert!(!gathers(16, GATHER_PLACES, 48));
        assert!(!gathers(16, 0, 48));
        // Too few running for more to come free soon: a handler earning its first places, or a
        // quiet engine, claims at once.
        assert!(!gathers(GATHER_PLACES - 1, 1, 48));
        assert!(!gathers(0, 1, 48));
        // The sandbox slots are what is short: waiting for places would not take more.
        assert!(!gathers(16, 2, 2));
    }

    #[test]
    fn quarantine_counts_what_the_handler_did_only() {
        use crate::outcome::Outcome;
        let ran = |kind: OutcomeKind| AttemptRecord {
            outcome: Some(Outcome::bare(kind, Duration::ZERO)),
            ..unreadable("test".into(), Utc::now())
        };
        assert_eq!(
            quarantine_verdict(&handed_back("quarantined".into(), Utc::now())),
            None
        );
        assert_eq!(quarantine_verdict(&ran(OutcomeKind::Succeeded)), Some(true));
        assert_eq!(
            quarantine_verdict(&ran(OutcomeKind::HandlerFailed {
                reason: "no".into()
            })),
            Some(false)
        );
        assert_eq!(
            quarantine_verdict(&ran(OutcomeKind::EngineError {
                message: "pool".into()
            })),
            None
        );
    }

    /// An outcome the store cannot take while its disk is full is kept and recorded once the
    /// store takes writes again, without a restart: its delivery does not stay `running`.
    #[tokio::test]
    async fn outcomes_the_store_cannot_take_yet_are_recorded_once_it_can() {
        for awaited in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            // The first two rounds fail as on a full disk; the retry after them succeeds.
            let store = Arc::new(
                BatchFails::new(SqliteStore::open(dir.path()).unwrap(), 2).awaited(awaited),
            );
            let (record, recorder, done) = recording_one(&store).await;
            tokio::time::timeout(STORE_ERROR_PAUSE * 5, done)
                .await
                .expect("recorded in time")
                .expect("recorded, not given up");
            assert_eq!(
                store.count_by_state().unwrap(),
                vec![(DeliveryState::Failed, 1)]
            );
            drop(record);
            recorder.await.unwrap();
        }
    }

    /// An outcome that neither its own write nor its hand-back gets into the store is kept and
    /// tried again for as long as the engine runs (the store may take it later), and given up
    /// only when the engine stops: the delivery then runs again after the restart.
    #[tokio::test]
    async fn an_outcome_neither_recorded_nor_handed_back_is_kept_until_the_engine_stops() {
        for awaited in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(
                BatchFails::failing_with(
                    SqliteStore::open(dir.path()).unwrap(),
                    usize::MAX,
                    || StoreError::Database("CHECK constraint failed".into()),
                )
                .awaited(awaited),
            );
            let (record, recorder, mut done) = recording_one(&store).await;
            assert!(
                tokio::time::timeout(STORE_ERROR_PAUSE * 2, &mut done)
                    .await
                    .is_err(),
                "kept, not decided (awaited: {awaited})"
            );
            drop(record);
            tokio::time::timeout(STORE_ERROR_PAUSE * 5, recorder)
                .await
                .expect("the recorder ends when the engine stops")
                .unwrap();
            assert!(done.await.is_err(), "given up at the stop");
        }
    }

    /// An outcome the store refuses once for good is not recorded, and its delivery is handed
    /// back (pending again, the attempt listed as interrupted) rather than left running until
    /// a restart.
    #[tokio::test]
    async fn a_delivery_whose_outcome_is_refused_is_handed_back() {
        for awaited in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            // The batch and the one-by-one retry fail; the hand-back is written.
            let store = Arc::new(
                BatchFails::failing_with(SqliteStore::open(dir.path()).unwrap(), 2, || {
                    StoreError::Database("string or blob too big".into())
                })
                .awaited(awaited),
            );
            let (record, recorder, done) = recording_one(&store).await;
            assert!(done.await.is_err(), "not recorded (awaited: {awaited})");
            drop(record);
            recorder.await.unwrap();
            assert_eq!(
                store.count_by_state().unwrap(),
                vec![(DeliveryState::Pending, 1)],
                "awaited: {awaited}"
            );
        }
    }

    #[tokio::test]
    async fn kept_outcomes_are_given_up_when_the_engine_stops() {
        for awaited in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(
                BatchFails::new(SqliteStore::open(dir.path()).unwrap(), usize::MAX)
                    .awaited(awaited),
            );
            let (record, recorder, done) = recording_one(&store).await;
            // Kept across a retry while the disk stays full.
            tokio::time::sleep(STORE_ERROR_PAUSE + STORE_ERROR_PAUSE / 2).await;
            drop(record);
            tokio::time::timeout(STORE_ERROR_PAUSE * 3, recorder)
                .await
                .expect("the recorder ends once the engine stops")
                .unwrap();
            assert!(
                done.await.is_err(),
                "given up, not recorded (awaited: {awaited})"
            );
        }
    }
}
