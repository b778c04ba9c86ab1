//! Prometheus metrics for `/metrics` (OpenMetrics text): events accepted, deliveries by handler
//! and outcome, delivery durations, queue depth, running deliveries and quarantined handlers.
//!
//! Label values come only from the configuration (handler names) and from the fixed set of
//! outcome classes, never from event input, so a hostile event cannot grow the label space.
//! That is why forwarders (named by a request header) appear here only as a count and as the
//! silence of the quietest one; `GET /v1/forwarders` lists them by name.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    handler: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// The sources events are counted by (`queue::store::SOURCE_API`, `SOURCE_POLLER`).
pub const EVENT_SOURCES: [&str; 2] = ["api", "poller"];

/// The reasons `jobhook_ingest_store_failures_total` counts (`sources::api`'s answers when the
/// store cannot commit an event), and `/healthz` names (`sources::store_health::reason_of`):
/// a fixed set, so that no store's words ever become a label. Its help text lists them.
pub const STORE_FAILURE_REASONS: [&str; 6] = [
    "disk-full",
    "read-only",
    "unreachable",
    "refused",
    "timeout",
    "error",
];

/// The caps `jobhook_connections_refused_total` counts by (`connections::Refusal::setting`).
pub const CONNECTION_CAPS: [&str; 2] = ["max_connections", "max_connections_per_client"];

/// The phases `jobhook_connections_timed_out_total` counts by.
pub const SLOW_CLIENT_PHASES: [&str; 3] = ["header", "body", "idle"];

/// At most this many `jobhook_handler_deliveries_pending` (and as many
/// `jobhook_handler_deliveries_failed`) series per scrape, the first by name: a store that holds
/// deliveries under many names (renamed handlers, or another node's configuration) must not make
/// every scrape that many series long. The totals are always in `jobhook_deliveries_in_state`.
pub const MAX_PENDING_SERIES: usize = 1_000;

/// What the store said at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct StoreCounts<'a> {
    /// Deliveries by state.
    pub by_state: &'a [(&'a str, u64)],
    /// Pending deliveries by handler, in name order.
    pub pending_by_handler: &'a [(String, u64)],
    /// Failed deliveries by handler, in name order.
    pub failed_by_handler: &'a [(String, u64)],
}

/// The engine's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    events: Family<SourceLabels, Counter>,
    unrouted: Family<SourceLabels, Counter>,
    rejected: Counter,
    deliveries: Family<DeliveryLabels, Counter>,
    durations: Family<HandlerLabels, Histogram>,
    deliveries_by_state: Family<StateLabels, Gauge>,
    pending_by_handler: Family<HandlerLabels, Gauge>,
    failed_by_handler: Family<HandlerLabels, Gauge>,
    running: Gauge,
    quarantined: Gauge,
    replays: Counter,
    key_conflicts: Counter,
    store_failures: Family<ReasonLabels, Counter>,
    forwarders: Gauge,
    forwarder_silence: Gauge,
    connections_open: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    connections_evicted: Counter,
    connections_timed_out: Family<PhaseLabels, Counter>,
    bodies_too_large: Counter,
    log_lines_dropped: Counter,
    log_drops: LogDrops,
    poller_failures: Counter,
    poller_last_success: Gauge,
    poller_held_since: Gauge,
    reload_successful: Gauge,
    reload_last_success: Gauge,
    retention_deleted: Counter,
}

/// Where the engine's log counts the lines it dropped because its writer fell behind
/// (`jobhook serve` logs through a writer thread that drops rather than blocks;
/// crate::app::engine_log::init_serve_tracing). The default counts nothing: a log written in place
/// drops no line.
#[derive(Clone, Debug, Default)]
pub struct LogDrops(Option<tracing_appender::non_blocking::ErrorCounter>);

impl LogDrops {
    /// Counts what `counter` counts.
    pub fn new(counter: tracing_appender::non_blocking::ErrorCounter) -> Self {
        LogDrops(Some(counter))
    }

    /// Lines dropped so far.
    pub fn count(&self) -> u64 {
        self.0
            .as_ref()
            .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events = Family::<SourceLabels, Counter>::default();
        registry.register(
            "jobhook_events_accepted",
            "Events committed to the store, by source",
            events.clone(),
        );
        let unrouted = Family::<SourceLabels, Counter>::default();
        registry.register(
            "jobhook_events_unrouted",
            "Events committed that no configured handler's job_types matched (no deliveries), by \
             source",
            unrouted.clone(),
        );
        let rejected = Counter::default();
        registry.register(
            "jobhook_events_rejected",
            "Ingest requests refused (bad input, auth, size)",
            rejected.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "jobhook_deliveries",
            "Delivery attempts by handler and outcome class",
            deliveries.clone(),
        );
        // 0.5 ms .. ~16 s: sandboxes take microseconds to milliseconds, timeouts seconds.
        let durations = Family::<HandlerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "jobhook_delivery_duration_seconds",
            "Wall-clock duration of delivery attempts",
            durations.clone(),
        );
        let deliveries_by_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "jobhook_deliveries_in_state",
            "Deliveries in the store by state (pending = queue depth)",
            deliveries_by_state.clone(),
        );
        let pending_by_handler = Family::<HandlerLabels, Gauge>::default();
        registry.register(
            "jobhook_handler_deliveries_pending",
            "Pending deliveries in the store by handler (a quarantined handler's backlog, or \
             deliveries of a handler no node runs)",
            pending_by_handler.clone(),
        );
        let failed_by_handler = Family::<HandlerLabels, Gauge>::default();
        registry.register(
            "jobhook_handler_deliveries_failed",
            "Failed deliveries in the store by handler: out of retries, kept until retention \
             removes them or an operator runs them again",
            failed_by_handler.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "jobhook_deliveries_running",
            "Deliveries running in this engine now",
            running.clone(),
        );
        let quarantined = Gauge::default();
        registry.register(
            "jobhook_handlers_quarantined",
            "Handlers currently quarantined",
            quarantined.clone(),
        );
        let replays = Counter::default();
        registry.register(
            "jobhook_ingest_replays",
            "Ingest requests answered with the event committed earlier under the same \
             Idempotency-Key (resends)",
            replays.clone(),
        );
        let key_conflicts = Counter::default();
        registry.register(
            "jobhook_ingest_key_conflicts",
            "Ingest requests refused because their Idempotency-Key belongs to another event",
            key_conflicts.clone(),
        );
        let store_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "jobhook_ingest_store_failures",
            // From the list the series are made from: the help cannot leave a reason out.
            format!(
                "Ingest requests answered 503 because the store could not commit the event, by \
                 reason ({})",
                STORE_FAILURE_REASONS.join(", ")
            ),
            store_failures.clone(),
        );
        let forwarders = Gauge::default();
        registry.register(
            "jobhook_forwarders_known",
            "Forwarders (X-Jobhook-Forwarder) this node accepted events from",
            forwarders.clone(),
        );
        let forwarder_silence = Gauge::default();
        registry.register(
            "jobhook_forwarder_max_silence_seconds",
            "Seconds since the quietest known forwarder last had an event accepted",
            forwarder_silence.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "jobhook_connections_open",
            "HTTP connections open now (counted against [server] max_connections)",
            connections_open.clone(),
        );
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "jobhook_connections_refused",
            "HTTP connections refused at accept, by the cap that was reached \
             (max_connections, max_connections_per_client)",
            connections_refused.clone(),
        );
        let connections_evicted = Counter::default();
        registry.register(
            "jobhook_connections_evicted",
            "HTTP connections between requests (no complete request head yet, or idle) closed at \
             [server] max_connections to admit a new one, taken from the address holding the \
             most",
            connections_evicted.clone(),
        );
        let connections_timed_out = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "jobhook_connections_timed_out",
            "HTTP connections closed or requests refused because the client was too slow, by \
             phase (header, body, idle)",
            connections_timed_out.clone(),
        );
        let bodies_too_large = Counter::default();
        registry.register(
            "jobhook_request_bodies_too_large",
            "Ingest requests answered 413 because the body exceeds [server] max_body_bytes",
            bodies_too_large.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "jobhook_log_lines_dropped",
            "Lines of the engine's own log dropped because its writer (stderr) fell behind",
            log_lines_dropped.clone(),
        );
        let poller_failures = Counter::default();
        registry.register(
            "jobhook_poller_failures",
            "JobHistory polls that failed (the Keyfactor API or the store); the log says why",
            poller_failures.clone(),
        );
        let poller_last_success = Gauge::default();
        registry.register(
            "jobhook_poller_last_success_timestamp_seconds",
            "When this node's JobHistory poller last completed a poll (Unix time; 0: never)",
            poller_last_success.clone(),
        );
        let poller_held_since = Gauge::default();
        registry.register(
            "jobhook_poller_held_since_timestamp_seconds",
            "OperationStart of the unfinished JobHistory job this node's poller waits at: no \
             later job becomes an event until it finishes or is older than [poller] \
             stale_after_ms (Unix time; 0: it waits for none)",
            poller_held_since.clone(),
        );
        let retention_deleted = Counter::default();
        registry.register(
            "jobhook_retention_deleted_events",
            "Finished events this node deleted past [store] retention_days, with their \
             deliveries and attempts",
            retention_deleted.clone(),
        );
        let reload_successful = Gauge::default();
        reload_successful.set(1);
        registry.register(
            "jobhook_config_last_reload_successful",
            "Whether the last configuration reload (SIGHUP or POST /v1/admin/reload) was taken: \
             1, or 0 when it was refused and the running configuration kept (1 before any)",
            reload_successful.clone(),
        );
        let reload_last_success = Gauge::default();
        reload_last_success.set(chrono::Utc::now().timestamp());
        registry.register(
            "jobhook_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded: the start, or the last reload taken \
             (Unix time)",
            reload_last_success.clone(),
        );
        // Every series whose label values are known up front exists from the start, at zero: a
        // family without series is not written at all, so an alert or a dashboard built from the
        // documented names would find nothing to match until the first increment.
        for source in EVENT_SOURCES {
            let labels = SourceLabels {
                source: source.to_owned(),
            };
            drop(events.get_or_create(&labels));
            drop(unrouted.get_or_create(&labels));
        }
        for reason in STORE_FAILURE_REASONS {
            drop(store_failures.get_or_create(&ReasonLabels { reason }));
        }
        for reason in CONNECTION_CAPS {
            drop(connections_refused.get_or_create(&ReasonLabels { reason }));
        }
        for phase in SLOW_CLIENT_PHASES {
            drop(connections_timed_out.get_or_create(&PhaseLabels { phase }));
        }
        Metrics {
            poller_failures,
            poller_last_success,
            poller_held_since,
            reload_successful,
            reload_last_success,
            retention_deleted,
            log_lines_dropped,
            log_drops: LogDrops::default(),
            registry: Mutex::new(registry),
            connections_open,
            connections_refused,
            connections_evicted,
            connections_timed_out,
            bodies_too_large,
            replays,
            key_conflicts,
            store_failures,
            forwarders,
            forwarder_silence,
            events,
            unrouted,
            rejected,
            deliveries,
            durations,
            deliveries_by_state,
            pending_by_handler,
            failed_by_handler,
            running,
            quarantined,
        }
    }

    /// These metrics, with the engine log's dropped lines counted from `drops`.
    pub fn with_log_drops(mut self, drops: LogDrops) -> Self {
        self.log_drops = drops;
        self
    }

    /// Counts a committed event with `deliveries` deliveries (0: no handler matched it, also
    /// counted as unrouted).
    pub fn event_accepted(&self, source: &str, deliveries: usize) {
        let labels = SourceLabels {
            source: source.to_owned(),
        };
        self.events.get_or_create(&labels).inc();
        if deliveries == 0 {
            self.unrouted.get_or_create(&labels).inc();
        }
    }

    /// Counts a refused ingest request.
    pub fn event_rejected(&self) {
        self.rejected.inc();
    }

    /// Tracks open HTTP connections.
    pub fn connections_open(&self, delta: i64) {
        self.connections_open.inc_by(delta);
    }

    /// Counts a connection refused because the cap named `reason` was reached.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a connection closed between requests to make room for a new one.
    pub fn connection_evicted(&self) {
        self.connections_evicted.inc();
    }

    /// Counts a connection or request given up on because the client was too slow in `phase`
    /// (`header`, `body`, `idle`).
    pub fn connection_timed_out(&self, phase: &'static str) {
        self.connections_timed_out
            .get_or_create(&PhaseLabels { phase })
            .inc();
    }

    /// Counts an ingest request refused with 413.
    pub fn body_too_large(&self) {
        self.bodies_too_large.inc();
    }

    /// Counts a request answered with an earlier request's event (same idempotency key).
    pub fn ingest_replayed(&self) {
        self.replays.inc();
    }

    /// Counts a request refused because its idempotency key belongs to another event.
    pub fn ingest_key_conflict(&self) {
        self.key_conflicts.inc();
    }

    /// Counts an ingest request the store could not commit; `reason` is one of
    /// [`STORE_FAILURE_REASONS`], never input.
    pub fn ingest_store_failed(&self, reason: &'static str) {
        self.store_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a failed JobHistory poll.
    pub fn poll_failed(&self) {
        self.poller_failures.inc();
    }

    /// Counts `events` deleted past their retention.
    pub fn retention_deleted(&self, events: u64) {
        self.retention_deleted.inc_by(events);
    }

    /// Records a configuration reload at `at`: taken (`ok`) or refused.
    pub fn reloaded(&self, ok: bool, at: chrono::DateTime<chrono::Utc>) {
        self.reload_successful.set(i64::from(ok));
        if ok {
            self.reload_last_success.set(at.timestamp());
        }
    }

    /// Records a completed JobHistory poll at `at`.
    pub fn polled(&self, at: chrono::DateTime<chrono::Utc>) {
        self.poller_last_success.set(at.timestamp());
    }

    /// Records the `OperationStart` of the unfinished job the poller waits at after a poll that
    /// read to its end, or that it waits for none (`None`: 0).
    pub fn poller_held(&self, since: Option<chrono::DateTime<chrono::Utc>>) {
        self.poller_held_since
            .set(since.map_or(0, |since| since.timestamp()));
    }

    /// Sets the forwarder gauges: how many are known, and the quietest one's silence.
    pub fn forwarders(&self, known: usize, max_silence_seconds: f64) {
        self.forwarders
            .set(i64::try_from(known).unwrap_or(i64::MAX));
        self.forwarder_silence.set(max_silence_seconds as i64);
    }

    /// Records a finished delivery attempt.
    pub fn delivery(&self, handler: &str, outcome: &str, seconds: f64) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                handler: handler.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.durations
            .get_or_create(&HandlerLabels {
                handler: handler.to_owned(),
            })
            .observe(seconds);
    }

    /// Tracks deliveries running now.
    pub fn running(&self, delta: i64) {
        self.running.inc_by(delta);
    }

    /// Renders every metric, after setting the gauges read at scrape time. `store` is `None`
    /// when the store could not be read: the delivery-state and per-handler pending series are
    /// then left out (absent, not zero: an empty queue and an unknown one must not look alike).
    pub fn render(&self, store: Option<&StoreCounts<'_>>, quarantined: usize) -> String {
        self.pending_by_handler.clear();
        self.failed_by_handler.clear();
        match store {
            Some(StoreCounts {
                by_state,
                pending_by_handler,
                failed_by_handler,
            }) => {
                set_by_handler(&self.pending_by_handler, pending_by_handler);
                set_by_handler(&self.failed_by_handler, failed_by_handler);
                for state in ["pending", "running", "succeeded", "failed", "skipped"] {
                    let n = by_state
                        .iter()
                        .find(|(s, _)| *s == state)
                        .map_or(0, |(_, n)| *n);
                    self.deliveries_by_state
                        .get_or_create(&StateLabels {
                            state: state.to_owned(),
                        })
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            None => self.deliveries_by_state.clear(),
        }
        self.quarantined
            .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
        // The log writer keeps its own total; the counter catches up with it.
        let dropped = self.log_drops.count();
        let shown = self.log_lines_dropped.get();
        if dropped > shown {
            self.log_lines_dropped.inc_by(dropped - shown);
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Sets one gauge per handler of `counts` (in name order), at most [`MAX_PENDING_SERIES`].
fn set_by_handler(family: &Family<HandlerLabels, Gauge>, counts: &[(String, u64)]) {
    for (handler, n) in counts.iter().take(MAX_PENDING_SERIES) {
        family
            .get_or_create(&HandlerLabels {
                handler: handler.clone(),
            })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every documented series whose labels are known up front is written from the start, at
    /// zero; the label values are the ones the engine counts with.
    #[test]
    fn known_series_exist_from_the_start() {
        assert_eq!(
            EVENT_SOURCES,
            [
                crate::queue::store::SOURCE_API,
                crate::queue::store::SOURCE_POLLER
            ]
        );
        let text = Metrics::new().render(None, 0);
        for series in [
            "jobhook_events_accepted_total{source=\"api\"} 0",
            "jobhook_events_unrouted_total{source=\"poller\"} 0",
            "jobhook_ingest_store_failures_total{reason=\"disk-full\"} 0",
            "jobhook_ingest_store_failures_total{reason=\"timeout\"} 0",
            "jobhook_ingest_store_failures_total{reason=\"refused\"} 0",
            "# HELP jobhook_ingest_store_failures Ingest requests answered 503 because the store \
             could not commit the event, by reason (disk-full, read-only, unreachable, refused, \
             timeout, error).",
            "jobhook_connections_refused_total{reason=\"max_connections_per_client\"} 0",
            "jobhook_connections_evicted_total 0",
            "jobhook_connections_timed_out_total{phase=\"idle\"} 0",
            "jobhook_poller_failures_total 0",
            "jobhook_poller_last_success_timestamp_seconds 0",
            "jobhook_poller_held_since_timestamp_seconds 0",
            "jobhook_config_last_reload_successful 1",
            "jobhook_retention_deleted_events_total 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    /// The help of the store failures names every reason a series is counted by.
    #[test]
    fn the_store_failures_help_names_every_reason() {
        let text = Metrics::new().render(None, 0);
        let help = text
            .lines()
            .find(|l| l.starts_with("# HELP jobhook_ingest_store_failures "))
            .unwrap_or_else(|| panic!("no help for the store failures in:\n{text}"));
        for reason in STORE_FAILURE_REASONS {
            assert!(help.contains(reason), "{reason} missing from: {help}");
            assert!(
                text.contains(&format!(
                    "jobhook_ingest_store_failures_total{{reason=\"{reason}\"}} 0"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let m = Metrics::new();
        m.event_accepted("api", 2);
        m.event_accepted("poller", 0);
        m.delivery("mail", "succeeded", 0.002);
        m.delivery("mail", "timed-out", 1.5);
        let pending = [("mail".to_owned(), 5), ("odd\"name\n".to_owned(), 2)];
        let failed = [("mail".to_owned(), 3)];
        let text = m.render(
            Some(&StoreCounts {
                by_state: &[("pending", 7)],
                pending_by_handler: &pending,
                failed_by_handler: &failed,
            }),
            1,
        );
        assert!(
            text.contains("jobhook_events_accepted_total{source=\"api\"} 1"),
            "{text}"
        );
        // An event no handler matched is counted as unrouted too.
        assert!(
            text.contains("jobhook_events_unrouted_total{source=\"poller\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("jobhook_events_unrouted_total{source=\"api\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("jobhook_deliveries_total{handler=\"mail\",outcome=\"timed-out\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("jobhook_deliveries_in_state{state=\"pending\"} 7"),
            "{text}"
        );
        assert!(text.contains("jobhook_handlers_quarantined 1"), "{text}");
        assert!(
            text.contains("jobhook_delivery_duration_seconds_count{handler=\"mail\"} 2"),
            "{text}"
        );
        // Per handler; a name is a label value, escaped, never a line of its own.
        assert!(
            text.contains("jobhook_handler_deliveries_pending{handler=\"mail\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("jobhook_handler_deliveries_pending{handler=\"odd\\\"name\\n\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("jobhook_handler_deliveries_failed{handler=\"mail\"} 3"),
            "{text}"
        );
        // A handler whose backlog drained, or a store that did not answer, leaves no series.
        let text = m.render(
            Some(&StoreCounts {
                by_state: &[("pending", 5)],
                pending_by_handler: &pending[..1],
                failed_by_handler: &[],
            }),
            0,
        );
        assert!(!text.contains("odd"), "{text}");
        assert!(
            !text.contains("jobhook_handler_deliveries_failed{"),
            "{text}"
        );
        let text = m.render(None, 0);
        for family in [
            "jobhook_handler_deliveries_pending{",
            "jobhook_handler_deliveries_failed{",
        ] {
            assert!(!text.contains(family), "{text}");
        }
    }

    /// A store with deliveries under more names than [`MAX_PENDING_SERIES`] gives that many
    /// series, not one per name.
    #[test]
    fn pending_series_are_bounded() {
        let m = Metrics::new();
        let pending: Vec<(String, u64)> = (0..MAX_PENDING_SERIES + 50)
            .map(|i| (format!("h{i:05}"), 1))
            .collect();
        let text = m.render(
            Some(&StoreCounts {
                by_state: &[],
                pending_by_handler: &pending,
                failed_by_handler: &pending,
            }),
            0,
        );
        for family in [
            "jobhook_handler_deliveries_pending{",
            "jobhook_handler_deliveries_failed{",
        ] {
            let series = text.lines().filter(|l| l.starts_with(family)).count();
            assert_eq!(series, MAX_PENDING_SERIES, "{family}");
        }
    }
}
