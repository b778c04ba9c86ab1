//! `[handlers.retry]`: the retry policy of a handler, and the wait before each attempt.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bound on `retry.max_attempts`, so a misconfiguration cannot retry forever.
pub const MAX_RETRY_ATTEMPTS: u32 = 100;

/// `[handlers.retry]`: what happens after a handler fails (reports failure, traps, times out).
/// A delivery interrupted by an engine crash or shutdown is always run again, regardless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `next_attempt` (2 for the first retry).
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(30);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}
