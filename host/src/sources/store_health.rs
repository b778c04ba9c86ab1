//! Whether the store takes events, as ingest and the JobHistory poller last found it, for
//! `GET /healthz`.
//!
//! `/healthz` answers `200` for as long as the process serves: it is a liveness check, and
//! restarting jobhook mends no full disk, read-only file system or unreachable database. What
//! it adds is whether the store took the latest event posted or polled (on a node that only
//! polls, the poller's commits are all there is to tell) and, if it ever refused one, why
//! and when the latest refusal was — only the reason's class (the same words as
//! `jobhook_ingest_store_failures_total`'s `reason`) and its time, never the store's own
//! message: `/healthz` needs no token, and a store's error names paths and servers.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::metrics::STORE_FAILURE_REASONS;
use crate::queue::store::StoreError;

/// What ingest found of the store: updated by every commit it tries, read by `/healthz`.
#[derive(Debug)]
pub struct StoreHealth {
    /// Whether the latest commit ingest tried was answered by the store (the event stored, or
    /// found stored under its key): true until one is refused.
    taking_events: AtomicBool,
    /// When the latest refusal was, in milliseconds since the epoch; 0 for none yet.
    refused_at_ms: AtomicI64,
    /// Its reason, an index into [`STORE_FAILURE_REASONS`].
    refused_reason: AtomicUsize,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            taking_events: AtomicBool::new(true),
            refused_at_ms: AtomicI64::new(0),
            refused_reason: AtomicUsize::new(0),
        }
    }
}

/// The store's part of `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreReport {
    /// Whether the store took the latest event posted (true before any was).
    pub taking_events: bool,
    /// The latest event the store could not take, if any was refused since the start.
    pub last_refusal: Option<Refusal>,
}

/// An event the store could not take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// One of [`STORE_FAILURE_REASONS`].
    pub reason: &'static str,
    /// When.
    pub at: DateTime<Utc>,
}

/// The word for `e`, a store's failure to take an event: one of [`STORE_FAILURE_REASONS`].
pub fn reason_of(e: &StoreError) -> &'static str {
    match e {
        StoreError::DiskFull(_) => "disk-full",
        StoreError::ReadOnly(_) => "read-only",
        StoreError::Unreachable(_) => "unreachable",
        StoreError::Refused(_) => "refused",
        StoreError::NoAnswer(_) => "timeout",
        _ => "error",
    }
}

impl StoreHealth {
    /// The store answered a commit: it takes events. Costs a load while that was already so.
    pub fn answered(&self) {
        if !self.taking_events.load(Ordering::Relaxed) {
            self.taking_events.store(true, Ordering::Relaxed);
        }
    }

    /// The store could not take an event, for `reason` (one of [`STORE_FAILURE_REASONS`]; any
    /// other word is told as `error`).
    pub fn refused(&self, reason: &'static str, at: DateTime<Utc>) {
        let index = STORE_FAILURE_REASONS
            .iter()
            .position(|known| *known == reason)
            .or_else(|| STORE_FAILURE_REASONS.iter().position(|r| *r == "error"))
            .unwrap_or(0);
        self.refused_reason.store(index, Ordering::Relaxed);
        // At least 1: 0 stands for no refusal (a clock set before 1970 is not one).
        self.refused_at_ms
            .store(at.timestamp_millis().max(1), Ordering::Relaxed);
        self.taking_events.store(false, Ordering::Relaxed);
    }

    /// What `/healthz` tells.
    pub fn report(&self) -> StoreReport {
        let at_ms = self.refused_at_ms.load(Ordering::Relaxed);
        let last_refusal = (at_ms != 0)
            .then(|| DateTime::<Utc>::from_timestamp_millis(at_ms))
            .flatten()
            .map(|at| Refusal {
                reason: STORE_FAILURE_REASONS
                    .get(self.refused_reason.load(Ordering::Relaxed))
                    .copied()
                    .unwrap_or("error"),
                at,
            });
        StoreReport {
            taking_events: self.taking_events.load(Ordering::Relaxed),
            last_refusal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_told_until_the_store_takes_an_event_again_and_remembered_after() {
        let health = StoreHealth::default();
        assert_eq!(
            health.report(),
            StoreReport {
                taking_events: true,
                last_refusal: None
            }
        );
        let at = DateTime::<Utc>::from_timestamp_millis(1_800_000_000_123).unwrap();
        health.refused("disk-full", at);
        let refusal = Some(Refusal {
            reason: "disk-full",
            at,
        });
        assert_eq!(
            health.report(),
            StoreReport {
                taking_events: false,
                last_refusal: refusal.clone()
            }
        );
        health.answered();
        assert_eq!(
            health.report(),
            StoreReport {
                taking_events: true,
                last_refusal: refusal
            }
        );
    }

    #[test]
    fn a_reason_outside_the_known_ones_is_told_as_error() {
        let health = StoreHealth::default();
        let at = Utc::now();
        health.refused("a store's own words: /var/lib/jobhook", at);
        let told = health.report().last_refusal.expect("a refusal");
        assert_eq!(told.reason, "error");
        // Milliseconds are what is kept.
        assert_eq!(told.at.timestamp_millis(), at.timestamp_millis());
    }
}
