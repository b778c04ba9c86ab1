//! Quarantine: a handler that fails again and again is set aside for a while, with exponential
//! backoff, so it stops costing sandboxes and log volume while the other handlers keep running
//! (the idea of Envoy's and Redpanda's restart backoff).
//!
//! After `after_failures` consecutive failures the handler is quarantined for the current
//! backoff; its deliveries wait in the store meanwhile (none is claimed for it, and none is
//! lost: the failures may be a relay's or an API's outage, not the handler's). When the backoff
//! has passed the next delivery runs as a probe: success releases the handler and resets the
//! backoff, failure quarantines it again for twice as long (up to the maximum). Deliveries that
//! were already running when the quarantine began decide nothing when they end, however late
//! (see [`Quarantine::record`]).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use serde::Deserialize;

/// Consecutive failures after which a handler is quarantined.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 5;
/// First quarantine period; doubled on each failed probe.
pub const DEFAULT_QUARANTINE_BACKOFF: Duration = Duration::from_secs(30);
/// Longest quarantine period.
pub const DEFAULT_QUARANTINE_MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// `[quarantine]`: when a failing handler is set aside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WrittenQuarantineConfig")]
pub struct QuarantineConfig {
    /// Consecutive failures that quarantine a handler (0 disables quarantine).
    pub after_failures: u32,
    /// First quarantine period, in milliseconds.
    #[serde(rename = "initial_backoff_ms", with = "crate::duration_ms")]
    pub initial_backoff: Duration,
    /// Longest quarantine period, in milliseconds.
    #[serde(rename = "max_backoff_ms", with = "crate::duration_ms")]
    pub max_backoff: Duration,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            after_failures: DEFAULT_QUARANTINE_AFTER,
            initial_backoff: DEFAULT_QUARANTINE_BACKOFF,
            max_backoff: DEFAULT_QUARANTINE_MAX_BACKOFF,
        }
    }
}

/// `[quarantine]` as written. `max_backoff_ms` left out is [`DEFAULT_QUARANTINE_MAX_BACKOFF`],
/// or `initial_backoff_ms` when that is longer: a long first quarantine written alone is what
/// was meant, not a conflict with a cap nobody wrote (a written cap below it is still refused).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WrittenQuarantineConfig {
    after_failures: u32,
    #[serde(rename = "initial_backoff_ms", with = "crate::duration_ms")]
    initial_backoff: Duration,
    #[serde(
        rename = "max_backoff_ms",
        deserialize_with = "crate::duration_ms::deserialize_some"
    )]
    max_backoff: Option<Duration>,
}

impl Default for WrittenQuarantineConfig {
    fn default() -> Self {
        WrittenQuarantineConfig {
            after_failures: DEFAULT_QUARANTINE_AFTER,
            initial_backoff: DEFAULT_QUARANTINE_BACKOFF,
            max_backoff: None,
        }
    }
}

impl From<WrittenQuarantineConfig> for QuarantineConfig {
    fn from(written: WrittenQuarantineConfig) -> Self {
        QuarantineConfig {
            after_failures: written.after_failures,
            initial_backoff: written.initial_backoff,
            max_backoff: written
                .max_backoff
                .unwrap_or(DEFAULT_QUARANTINE_MAX_BACKOFF.max(written.initial_backoff)),
        }
    }
}

/// Whether a delivery may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Run it.
    Run,
    /// Not now: the handler is quarantined; the delivery waits for it, for this reason.
    Wait(String),
}

/// What recording an outcome changed, for the log (which names the handler).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Nothing worth a line.
    None,
    /// Quarantined after `consecutive_failures` in a row, for `backoff`.
    Quarantined {
        /// Failures in a row.
        consecutive_failures: u32,
        /// How long.
        backoff: Duration,
    },
    /// A probe succeeded: the handler is released.
    Released,
}

/// What health and the handler list show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum QuarantineStatus {
    /// Running normally.
    Healthy {
        /// Failures in a row so far.
        consecutive_failures: u32,
    },
    /// Set aside.
    Quarantined {
        /// Until when (UTC).
        until: DateTime<Utc>,
        /// Failures in a row that led here.
        consecutive_failures: u32,
    },
}

/// The quarantine state of one handler.
#[derive(Debug, Clone)]
pub struct Quarantine {
    config: QuarantineConfig,
    consecutive_failures: u32,
    until: Option<Instant>,
    /// When the last quarantine began: a delivery that started before it was already running
    /// then, and its end is no news about the handler ([`Quarantine::record`]).
    began: Option<Instant>,
    next_backoff: Duration,
}

impl Quarantine {
    /// A healthy handler under `config`.
    pub fn new(config: QuarantineConfig) -> Self {
        let next_backoff = config.initial_backoff;
        Quarantine {
            config,
            consecutive_failures: 0,
            until: None,
            began: None,
            next_backoff,
        }
    }

    /// Whether a delivery starting at `now` may run.
    pub fn admit(&self, now: Instant) -> Admission {
        match self.until {
            Some(until) if now < until => Admission::Wait(format!(
                "handler quarantined for another {} s after {} consecutive failures; the \
                     delivery waits for it",
                until.saturating_duration_since(now).as_secs().max(1),
                self.consecutive_failures
            )),
            _ => Admission::Run,
        }
    }

    /// Records the result of a delivery that was admitted ([`Quarantine::admit`]) at `started`
    /// and ended at `now`; says what changed.
    pub fn record(&mut self, success: bool, started: Instant, now: Instant) -> Change {
        // A delivery that was already running when the last quarantine began says nothing new
        // when it ends, failed or succeeded, however late: only the probe, admitted once the
        // quarantine has ended, decides. It is judged by when it started, not when it ended: a
        // failure would otherwise lengthen the quarantine (one outage's deliveries in flight
        // each doubling it, up to the maximum) or, ending after the quarantine ran out, be taken
        // for the probe's and double it; a success would lift it as "the probe succeeded"
        // although no probe ran.
        if self.began.is_some_and(|began| started < began) {
            // Still counted among the failures in a row (which the handler's status shows)
            // while the quarantine stands; not once a probe has released the handler.
            if !success && self.until.is_some() {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            }
            return Change::None;
        }
        if success {
            // Released: after a quarantine (its probe succeeded), not after failures below
            // the threshold.
            let released = self.config.after_failures > 0
                && self.consecutive_failures >= self.config.after_failures;
            self.consecutive_failures = 0;
            self.until = None;
            self.next_backoff = self.config.initial_backoff;
            return if released {
                Change::Released
            } else {
                Change::None
            };
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.config.after_failures > 0 && self.consecutive_failures >= self.config.after_failures
        {
            let backoff = self.next_backoff.min(self.config.max_backoff);
            self.until = now.checked_add(backoff);
            self.began = Some(now);
            self.next_backoff = backoff.saturating_mul(2).min(self.config.max_backoff);
            return Change::Quarantined {
                consecutive_failures: self.consecutive_failures,
                backoff,
            };
        }
        Change::None
    }

    /// The current status, with `until` in wall-clock time.
    pub fn status(&self, now: Instant) -> QuarantineStatus {
        match self.until {
            Some(until) if now < until => QuarantineStatus::Quarantined {
                until: crate::queue::store::after(Utc::now(), until.saturating_duration_since(now)),
                consecutive_failures: self.consecutive_failures,
            },
            _ => QuarantineStatus::Healthy {
                consecutive_failures: self.consecutive_failures,
            },
        }
    }

    /// Whether it is quarantined at `now`.
    pub fn is_quarantined(&self, now: Instant) -> bool {
        matches!(self.until, Some(until) if now < until)
    }

    /// Takes a new `[quarantine]` (a reload) without forgetting what the handler has done: its
    /// failures in a row still count. Whatever the new settings cannot allow ends at once: with
    /// quarantine turned off (`after_failures = 0`) a quarantine under way is lifted; a period
    /// longer than the new `max_backoff` is cut to it from `now`; the next period is brought
    /// within the new bounds.
    pub fn reconfigure(&mut self, config: QuarantineConfig, now: Instant) {
        if config == self.config {
            return;
        }
        if config.after_failures == 0 {
            self.until = None;
        } else if let Some(until) = self.until {
            self.until = Some(until.min(now.checked_add(config.max_backoff).unwrap_or(until)));
        }
        self.next_backoff = if self.until.is_some() {
            self.next_backoff
                .max(config.initial_backoff)
                .min(config.max_backoff)
        } else {
            config.initial_backoff
        };
        self.config = config;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QuarantineConfig {
        QuarantineConfig {
            after_failures: 3,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(25),
        }
    }

    #[test]
    fn quarantines_after_n_failures_and_backs_off_exponentially() {
        let t0 = Instant::now();
        let mut q = Quarantine::new(config());
        assert_eq!(q.record(false, t0, t0), Change::None);
        q.record(false, t0, t0);
        assert_eq!(q.admit(t0), Admission::Run);
        assert_eq!(
            q.record(false, t0, t0),
            Change::Quarantined {
                consecutive_failures: 3,
                backoff: Duration::from_secs(10)
            }
        );
        assert!(
            matches!(q.admit(t0), Admission::Wait(reason) if reason.contains("3 consecutive failures"))
        );
        assert!(q.is_quarantined(t0 + Duration::from_secs(9)));
        // Held exactly the first backoff.
        assert_eq!(q.admit(t0 + Duration::from_secs(10)), Admission::Run);
        // The probe after the backoff fails: quarantined twice as long.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(q.admit(t1), Admission::Run);
        q.record(false, t1, t1);
        assert!(q.is_quarantined(t1 + Duration::from_secs(19)));
        assert!(!q.is_quarantined(t1 + Duration::from_secs(20)));
        // ... capped at the maximum.
        let t2 = t1 + Duration::from_secs(20);
        q.record(false, t2, t2);
        assert!(!q.is_quarantined(t2 + Duration::from_secs(25)));
        // A probe that succeeds releases it, and says so once.
        let t3 = t2 + Duration::from_secs(25);
        assert_eq!(q.record(true, t3, t3), Change::Released);
        assert_eq!(q.record(true, t3, t3), Change::None);
        assert_eq!(q.admit(t3), Admission::Run);
    }

    /// Failures of deliveries that were running when the quarantine began neither lengthen it
    /// nor double the next one (sixteen in flight during a blip once made it an hour); the
    /// probe's failure after it does.
    #[test]
    fn failures_during_a_quarantine_do_not_lengthen_it() {
        // Twelve deliveries start, then the quarantine begins (at t0) and they fail in it.
        let started = Instant::now();
        let t0 = started + Duration::from_secs(1);
        let mut q = Quarantine::new(config());
        for _ in 0..3 {
            q.record(false, t0, t0);
        }
        for n in 1..=12 {
            let ended = t0 + Duration::from_millis(n);
            assert_eq!(q.record(false, started, ended), Change::None);
        }
        assert!(!q.is_quarantined(t0 + Duration::from_secs(10)));
        let probe = t0 + Duration::from_secs(10);
        assert_eq!(
            q.record(false, probe, probe),
            Change::Quarantined {
                consecutive_failures: 16,
                backoff: Duration::from_secs(20)
            }
        );
    }

    /// A delivery that started before the quarantine and succeeds during it does not lift it:
    /// only the probe, once the quarantine has ended, does.
    #[test]
    fn a_success_in_flight_during_a_quarantine_does_not_lift_it() {
        let started = Instant::now();
        let t0 = started + Duration::from_secs(1);
        let mut q = Quarantine::new(config());
        for _ in 0..3 {
            q.record(false, t0, t0);
        }
        assert!(q.is_quarantined(t0 + Duration::from_millis(1)));
        assert_eq!(
            q.record(true, started, t0 + Duration::from_millis(1)),
            Change::None
        );
        assert!(q.is_quarantined(t0 + Duration::from_millis(2)));
        // The probe, after the backoff, releases it.
        let probe = t0 + Duration::from_secs(10);
        assert_eq!(q.record(true, probe, probe), Change::Released);
        assert!(!q.is_quarantined(probe));
    }

    /// A delivery already running when the quarantine began that ends only after the
    /// quarantine has run out is not the probe either: its failure neither quarantines the
    /// handler again nor doubles the backoff, its success does not release it. The probe, which
    /// starts after it, decides. And once a probe has released the handler, a failure of a
    /// delivery that was running before the quarantine is not counted against it.
    #[test]
    fn a_delivery_running_since_before_the_quarantine_is_not_its_probe_however_late_it_ends() {
        let started = Instant::now();
        let t0 = started + Duration::from_secs(1);
        let over = t0 + Duration::from_secs(10);
        let late = over + Duration::from_secs(5);
        for succeeded in [false, true] {
            let mut q = Quarantine::new(config());
            for _ in 0..3 {
                q.record(false, t0, t0);
            }
            assert!(!q.is_quarantined(over));
            assert_eq!(
                q.record(succeeded, started, late),
                Change::None,
                "{succeeded}"
            );
            assert!(!q.is_quarantined(late), "{succeeded}");
            // The probe fails: quarantined for the second period (20 s), not the third (25 s).
            let probe = late + Duration::from_millis(1);
            assert_eq!(
                q.record(false, probe, probe),
                Change::Quarantined {
                    consecutive_failures: if succeeded { 4 } else { 5 },
                    backoff: Duration::from_secs(20)
                },
                "{succeeded}"
            );
            // Its probe succeeds: released, by the probe.
            let next = probe + Duration::from_secs(20);
            assert_eq!(q.record(true, next, next), Change::Released, "{succeeded}");
            // Released, a failure of a delivery that started before that quarantine counts for
            // nothing: two more failures of new deliveries do not reach the threshold of three.
            q.record(false, started, next);
            q.record(false, next, next);
            assert_eq!(q.record(false, next, next), Change::None, "{succeeded}");
            assert!(!q.is_quarantined(next), "{succeeded}");
        }
    }

    /// A reload's new `[quarantine]` applies to a handler it kept: the failures so far count
    /// against the new threshold, a quarantine is cut to the new maximum or lifted when
    /// quarantine is turned off, and later periods follow the new backoff.
    #[test]
    fn a_new_quarantine_configuration_applies_to_a_handler_with_its_history() {
        let t0 = Instant::now();
        // Two failures under a threshold of three; the new threshold of two quarantines at the
        // next failure, for the new first period.
        let mut q = Quarantine::new(config());
        q.record(false, t0, t0);
        q.record(false, t0, t0);
        q.reconfigure(
            QuarantineConfig {
                after_failures: 2,
                initial_backoff: Duration::from_secs(4),
                max_backoff: Duration::from_secs(6),
            },
            t0,
        );
        assert_eq!(q.admit(t0), Admission::Run);
        q.record(false, t0, t0);
        assert!(q.is_quarantined(t0 + Duration::from_secs(3)));
        assert!(!q.is_quarantined(t0 + Duration::from_secs(4)));
        // Its next period doubles within the new maximum.
        let t1 = t0 + Duration::from_secs(4);
        q.record(false, t1, t1);
        assert!(q.is_quarantined(t1 + Duration::from_secs(5)));
        assert!(!q.is_quarantined(t1 + Duration::from_secs(6)));

        // A quarantine of 25 s under way is cut to a new maximum of 5 s from the reload.
        let mut q = Quarantine::new(config());
        for _ in 0..3 {
            q.record(false, t0, t0);
        }
        assert!(q.is_quarantined(t0 + Duration::from_secs(9)));
        q.reconfigure(
            QuarantineConfig {
                max_backoff: Duration::from_secs(5),
                ..config()
            },
            t0 + Duration::from_secs(1),
        );
        assert!(q.is_quarantined(t0 + Duration::from_secs(5)));
        assert!(!q.is_quarantined(t0 + Duration::from_secs(6)));

        // Turned off: lifted at once, and failures no longer quarantine.
        let mut q = Quarantine::new(config());
        for _ in 0..3 {
            q.record(false, t0, t0);
        }
        q.reconfigure(
            QuarantineConfig {
                after_failures: 0,
                ..config()
            },
            t0,
        );
        assert_eq!(q.admit(t0), Admission::Run);
        q.record(false, t0, t0);
        assert_eq!(q.admit(t0), Admission::Run);
    }

    #[test]
    fn a_success_releases_and_resets() {
        let t0 = Instant::now();
        let mut q = Quarantine::new(config());
        for _ in 0..3 {
            q.record(false, t0, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        q.record(true, t1, t1);
        assert_eq!(q.admit(t1), Admission::Run);
        assert_eq!(
            q.status(t1),
            QuarantineStatus::Healthy {
                consecutive_failures: 0
            }
        );
        for _ in 0..3 {
            q.record(false, t1, t1);
        }
        assert!(!q.is_quarantined(t1 + Duration::from_secs(10)));
    }

    #[test]
    fn zero_disables_quarantine() {
        let mut q = Quarantine::new(QuarantineConfig {
            after_failures: 0,
            ..config()
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            q.record(false, t0, t0);
        }
        assert_eq!(q.admit(t0), Admission::Run);
    }
}
