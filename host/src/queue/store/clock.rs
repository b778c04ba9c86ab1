//! The queue's clock: the time in which due times, leases and idempotency retention are kept.
//!
//! The system clock can step: an operator sets it, NTP corrects a clock that drifted while a VM
//! was paused, a host resumes with a stale one. Measured against the system clock directly, a
//! step backwards of an hour would hold every retry back by an hour, and a step forwards would
//! run retries before their backoff, end idempotency retention early and — with several nodes —
//! take over deliveries whose leases are alive.
//!
//! So the queue reads its reference (the system clock for SQLite; the database server's clock
//! for PostgreSQL, which all nodes share) only at an *observation*, and carries the time
//! forward between observations with the kernel's boot-time clock (`CLOCK_BOOTTIME`: it never
//! steps, and unlike `CLOCK_MONOTONIC` it counts the time a suspended machine slept, which did
//! pass). An observation that finds the reference further from the carried time than
//! [`STEP_TOLERANCE`] has found a step; the store then decides what to do with what it
//! scheduled (see its `keep_time`) and follows the reference from then on.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// Smallest difference between a reading of the reference and the carried time that counts as a
/// step. NTP slews a clock by at most 500 ppm, so between two observations (a third of the lease
/// apart: seconds) a slewed clock moves by milliseconds, and a loaded machine delays a reading
/// by milliseconds more; a step worth acting on (a hand-set clock, a resync after a pause) is
/// seconds to hours. Differences below this are followed as drift.
pub const STEP_TOLERANCE: Duration = Duration::from_secs(1);

/// Longest a reading of a remote reference (the database server's clock) may take to arrive
/// and still be compared: a reading delayed by a starved pool or a slow server is older than
/// the carried time it is compared with, and a delay of a good part of [`STEP_TOLERANCE`] would
/// look like a step backwards. Such a reading is dropped; the next one is a third of a lease
/// later.
pub const MAX_READING_DELAY: Duration = Duration::from_millis(250);

/// The queue's clock (see the module documentation). Shared by every caller of one store.
#[derive(Debug)]
pub struct QueueClock {
    anchor: Mutex<Anchor>,
}

/// A reading of the reference and the boot-time clock at that moment.
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    at: DateTime<Utc>,
    boot: Duration,
}

impl QueueClock {
    /// A clock that starts at `reference`, read just now.
    pub fn new(reference: DateTime<Utc>) -> Self {
        QueueClock {
            anchor: Mutex::new(Anchor {
                at: reference,
                boot: boot_time(),
            }),
        }
    }

    /// The queue's time now.
    pub fn now(&self) -> DateTime<Utc> {
        self.hold().now()
    }

    /// Observes a reading of a remote reference (the database server's clock) that took `took`
    /// to arrive, and follows it; answers the step, if it is one. A reading that took longer
    /// than [`MAX_READING_DELAY`] is dropped: it is older than the carried time it would be
    /// compared with.
    pub fn observe_remote(&self, reference: DateTime<Utc>, took: Duration) -> Option<TimeDelta> {
        if took > MAX_READING_DELAY {
            return None;
        }
        let mut anchor = self.hold();
        let step = anchor.step(reference);
        anchor.follow(reference);
        step
    }

    /// The clock held: no other caller reads it until the guard is dropped. A store holds it
    /// while it moves what it scheduled after a step, so that nothing is scheduled meanwhile
    /// in the time from before the step and then left unmoved.
    pub fn hold(&self) -> MutexGuard<'_, Anchor> {
        // The anchor is two plain values, always written together: a panic elsewhere while
        // holding the lock cannot leave it half-written.
        self.anchor.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Anchor {
    /// The carried time now.
    pub fn now(&self) -> DateTime<Utc> {
        let elapsed = boot_time().saturating_sub(self.boot);
        crate::queue::delivery_state::after(self.at, elapsed)
    }

    /// How far `reference` (read just now) is from the carried time, if that is a step
    /// (positive: the reference jumped forwards). Changes nothing: see [`Anchor::follow`].
    pub fn step(&self, reference: DateTime<Utc>) -> Option<TimeDelta> {
        step_between(self.now(), reference)
    }

    /// Follows `reference` (read just now) from here on.
    pub fn follow(&mut self, reference: DateTime<Utc>) {
        self.at = reference;
        self.boot = boot_time();
    }
}

/// How far `reference` is from `expected`, if that is a step: more than [`STEP_TOLERANCE`]
/// either way (positive: the reference is ahead).
pub fn step_between(expected: DateTime<Utc>, reference: DateTime<Utc>) -> Option<TimeDelta> {
    let difference = reference.signed_duration_since(expected);
    let tolerance = TimeDelta::from_std(STEP_TOLERANCE).unwrap_or(TimeDelta::MAX);
    (difference.abs() > tolerance).then_some(difference)
}

/// The kernel's `CLOCK_BOOTTIME`: time since boot, suspend included; it never steps.
#[cfg(target_os = "linux")]
fn boot_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, which is all
    // clock_gettime requires; CLOCK_BOOTTIME exists on every Linux since 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return monotonic_fallback();
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// Elsewhere (and should `CLOCK_BOOTTIME` ever fail): the standard monotonic clock, which
/// does not count a suspended machine's sleep.
#[cfg(not(target_os = "linux"))]
fn boot_time() -> Duration {
    monotonic_fallback()
}

fn monotonic_fallback() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_carries_time_forward_from_its_reference() {
        let start = Utc::now() - TimeDelta::hours(3);
        let clock = QueueClock::new(start);
        std::thread::sleep(Duration::from_millis(20));
        let now = clock.now();
        assert!(
            now >= start + TimeDelta::milliseconds(20),
            "{now} vs {start}"
        );
        assert!(now < start + TimeDelta::seconds(5), "{now} vs {start}");
    }

    #[test]
    fn a_reading_within_the_tolerance_is_drift_and_beyond_it_a_step() {
        let reference = Utc::now();
        let clock = QueueClock::new(reference);
        let anchor = clock.hold();
        assert_eq!(
            anchor.step(anchor.now() + TimeDelta::milliseconds(300)),
            None
        );
        assert_eq!(
            anchor.step(anchor.now() - TimeDelta::milliseconds(300)),
            None
        );
        let forwards = anchor
            .step(anchor.now() + TimeDelta::hours(1))
            .expect("a step");
        assert!(
            (forwards - TimeDelta::hours(1)).abs() < TimeDelta::seconds(1),
            "{forwards}"
        );
        let backwards = anchor
            .step(anchor.now() - TimeDelta::hours(1))
            .expect("a step");
        assert!(
            (backwards + TimeDelta::hours(1)).abs() < TimeDelta::seconds(1),
            "{backwards}"
        );
    }

    #[test]
    fn after_following_a_step_the_clock_tells_the_new_time() {
        let clock = QueueClock::new(Utc::now());
        let stepped = Utc::now() - TimeDelta::days(2);
        {
            let mut anchor = clock.hold();
            assert!(anchor.step(stepped).is_some());
            anchor.follow(stepped);
            assert_eq!(anchor.step(stepped), None);
        }
        let now = clock.now();
        assert!(
            (now - stepped).abs() < TimeDelta::seconds(1),
            "{now} vs {stepped}"
        );
    }

    #[test]
    fn a_remote_reading_is_followed_unless_it_arrived_too_late() {
        let clock = QueueClock::new(Utc::now());
        let ahead = Utc::now() + TimeDelta::hours(1);
        // Late: neither a step nor followed, however far off it is.
        let late = MAX_READING_DELAY + Duration::from_millis(1);
        assert_eq!(clock.observe_remote(ahead, late), None);
        assert!((clock.now() - Utc::now()).abs() < TimeDelta::seconds(1));
        // In time: a step, and followed.
        let step = clock
            .observe_remote(ahead, MAX_READING_DELAY)
            .expect("a step");
        assert!(
            (step - TimeDelta::hours(1)).abs() < TimeDelta::seconds(1),
            "{step}"
        );
        assert!((clock.now() - ahead).abs() < TimeDelta::seconds(1));
        // Drift within the tolerance is followed without a step.
        let drifted = clock.now() + TimeDelta::milliseconds(400);
        assert_eq!(clock.observe_remote(drifted, Duration::ZERO), None);
        assert!((clock.now() - drifted).abs() < TimeDelta::milliseconds(100));
    }

    #[test]
    fn the_boot_time_clock_never_goes_backwards() {
        let mut last = boot_time();
        for _ in 0..1000 {
            let now = boot_time();
            assert!(now >= last);
            last = now;
        }
    }
}
