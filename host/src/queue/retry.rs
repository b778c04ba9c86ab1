//! `[handlers.retry]`: the retry policy of a handler, and the wait before each attempt.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bound on `retry.max_attempts`, so a misconfiguration cannot retry forever.
pub const MAX_RETRY_ATTEMPTS: u32 = 100;

/// Longest wait between attempts unless `max_backoff_ms` is written (or `backoff_ms`, when
/// that is longer).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Most times the first wait is doubled: the factor `1 << doublings` must fit a `u32`, and 2^30
/// times even a 1 ms backoff is over 12 days, past any cap, so later retries wait the cap.
const MAX_DOUBLINGS: u32 = 30;

/// `[handlers.retry]`: what happens after a handler fails (reports failure, traps, times out).
/// A delivery interrupted by an engine crash or shutdown is always run again, regardless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WrittenRetryPolicy")]
pub struct RetryPolicy {
    /// Attempts in total, including the first (1 = no retry, the default).
    pub max_attempts: u32,
    /// Wait before the first retry, in milliseconds; doubled for each further retry.
    #[serde(rename = "backoff_ms", with = "crate::duration_ms")]
    pub backoff: Duration,
    /// Longest wait between attempts, in milliseconds.
    #[serde(rename = "max_backoff_ms", with = "crate::duration_ms")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            backoff: Duration::from_secs(1),
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// `[handlers.retry]` as written. `max_backoff_ms` left out is [`DEFAULT_MAX_BACKOFF`], or
/// `backoff_ms` when that is longer: a long first wait written alone is what was meant, not a
/// conflict with a cap nobody wrote (a written cap below it is still refused).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WrittenRetryPolicy {
    max_attempts: u32,
    #[serde(rename = "backoff_ms", with = "crate::duration_ms")]
    backoff: Duration,
    #[serde(
        rename = "max_backoff_ms",
        deserialize_with = "crate::duration_ms::deserialize_some"
    )]
    max_backoff: Option<Duration>,
}

impl Default for WrittenRetryPolicy {
    fn default() -> Self {
        let policy = RetryPolicy::default();
        WrittenRetryPolicy {
            max_attempts: policy.max_attempts,
            backoff: policy.backoff,
            max_backoff: None,
        }
    }
}

impl From<WrittenRetryPolicy> for RetryPolicy {
    fn from(written: WrittenRetryPolicy) -> Self {
        RetryPolicy {
            max_attempts: written.max_attempts,
            backoff: written.backoff,
            max_backoff: written
                .max_backoff
                .unwrap_or(DEFAULT_MAX_BACKOFF.max(written.backoff)),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `next_attempt` (2 for the first retry).
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(MAX_DOUBLINGS);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}
