//! The delivery state machine: where a delivery is marked succeeded, failed or due for a retry.
//!
//! ```text
//!            claim                 after_attempt
//! pending ──────────► running ─────────────────────► succeeded | failed
//!    ▲                   │ (outcome, attempt, retry policy, now)
//!    │                   ├──────────► pending, not before retry_at   (a retry)
//!    └───────────────────┘
//!      interrupted: lease expired (crash, frozen node) or shutdown — attempt kept, run again
//! ```
//!
//! [`after_attempt`] is the one decision of what an attempt leads to, a pure function; dispatch
//! calls it for every attempt and both stores refuse a record that is not one of its results
//! ([`check_finish`]). Claiming and the requeue of interrupted attempts are the stores' other two
//! transitions (`pending → running`, `running → pending`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::outcome::OutcomeKind;
use crate::queue::retry::RetryPolicy;

/// Delay before re-running a delivery that the engine itself could not run (e.g. every sandbox
/// slot was busy). Not the handler's fault, so the delivery runs again whatever its attempt
/// number, even past the retry policy's `max_attempts`, and quarantine does not count it. Its
/// attempt is counted all the same, as an interrupted one is: a later failure of the handler
/// is retried only while the attempt number is below `max_attempts`, after the backoff for that
/// number, so each engine error costs the delivery one of its handler's retries.
///
/// [`ENGINE_ERROR_FAST_RETRIES`] attempts past `max_attempts`, the wait doubles with each
/// further engine error, up to [`MAX_ENGINE_ERROR_RETRY`]: a sandbox pool that is full (long
/// runners holding every slot) frees up within that half minute, while an engine error that
/// comes back every time for this delivery (a host bug some guest or event meets) would
/// otherwise run it once a second for ever. The delivery is never given up.
pub const ENGINE_ERROR_RETRY: Duration = Duration::from_secs(1);

/// Engine-error retries after [`ENGINE_ERROR_RETRY`] past the policy's `max_attempts` before
/// the wait grows: half a minute of a full sandbox pool.
pub const ENGINE_ERROR_FAST_RETRIES: u32 = 30;

/// Longest wait between engine-error retries ([`ENGINE_ERROR_RETRY`]): a delivery the engine
/// keeps failing to run costs one attempt every five minutes, and runs within five minutes of
/// the engine being able to.
pub const MAX_ENGINE_ERROR_RETRY: Duration = Duration::from_secs(300);

/// The wait before attempt `attempt + 1` after an engine error on `attempt`:
/// [`ENGINE_ERROR_RETRY`] up to [`ENGINE_ERROR_FAST_RETRIES`] attempts past `max_attempts`, then
/// doubled per attempt, at most [`MAX_ENGINE_ERROR_RETRY`].
fn engine_error_retry(attempt: u32, max_attempts: u32) -> Duration {
    let past = attempt
        .saturating_sub(max_attempts)
        .saturating_sub(ENGINE_ERROR_FAST_RETRIES);
    // 2^31 s is past any cap already.
    let factor = 1u32 << past.min(31);
    ENGINE_ERROR_RETRY
        .saturating_mul(factor)
        .min(MAX_ENGINE_ERROR_RETRY)
}

/// The state of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting to run (first time, retry, or after an interruption).
    Pending,
    /// Claimed by a worker.
    Running,
    /// The handler succeeded.
    Succeeded,
    /// The handler failed and no attempts remain.
    Failed,
    /// Not run: what versions of jobhook that skipped a quarantined handler's deliveries
    /// recorded; read from such a store, never written now (a quarantined handler's deliveries
    /// wait for it).
    Skipped,
}

impl DeliveryState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Running => "running",
            DeliveryState::Succeeded => "succeeded",
            DeliveryState::Failed => "failed",
            DeliveryState::Skipped => "skipped",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [
            DeliveryState::Pending,
            DeliveryState::Running,
            DeliveryState::Succeeded,
            DeliveryState::Failed,
            DeliveryState::Skipped,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Whether the delivery is finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeliveryState::Succeeded | DeliveryState::Failed | DeliveryState::Skipped
        )
    }
}

/// Adds a duration to a time, saturating: when a retry, a lease or a quarantine ends.
pub fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(t)
}

/// How an attempt ended, as the state machine sees it.
#[derive(Debug, Clone, Copy)]
pub enum AttemptEnd<'a> {
    /// The handler ran and this is how it ended.
    Ran(&'a OutcomeKind),
}

/// Where an attempt leads: the delivery's next state and, for a retry, when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state after the attempt.
    pub state: DeliveryState,
    /// For a retry (`Pending`): not before this time.
    pub retry_at: Option<DateTime<Utc>>,
}

/// The next state of a delivery whose attempt number `attempt` (1 for the first) ended as `end`,
/// under the handler's retry `policy`, at `now`:
/// - succeeded → `succeeded`;
/// - an engine error (not the handler's doing) → `pending` after [`ENGINE_ERROR_RETRY`]
///   (longer past the policy's attempts: [`MAX_ENGINE_ERROR_RETRY`]);
/// - any other failure with attempts left → `pending` after the policy's backoff;
/// - any other failure on the last attempt → `failed`.
pub fn after_attempt(
    end: AttemptEnd<'_>,
    attempt: u32,
    policy: &RetryPolicy,
    now: DateTime<Utc>,
) -> Transition {
    let (state, retry_at) = match end {
        AttemptEnd::Ran(OutcomeKind::Succeeded) => (DeliveryState::Succeeded, None),
        AttemptEnd::Ran(OutcomeKind::EngineError { .. }) => {
            let delay = engine_error_retry(attempt, policy.max_attempts);
            (DeliveryState::Pending, Some(after(now, delay)))
        }
        AttemptEnd::Ran(_) if attempt < policy.max_attempts => {
            let delay = policy.delay_before(attempt.saturating_add(1));
            (DeliveryState::Pending, Some(after(now, delay)))
        }
        AttemptEnd::Ran(_) => (DeliveryState::Failed, None),
    };
    Transition { state, retry_at }
}

/// Why a store refused to record an attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an attempt cannot leave a delivery {state}{}", if *.retry_at { " with a retry time" } else { "" }, state = .state.as_str())]
pub struct InvalidFinish {
    /// The state the record asked for.
    pub state: DeliveryState,
    /// Whether it carried a retry time.
    pub retry_at: bool,
}

/// Whether `state` (with or without a retry time) is a result [`after_attempt`] can give: the
/// check both stores make before they write an attempt's record.
pub fn check_finish(state: DeliveryState, retry_at: bool) -> Result<(), InvalidFinish> {
    let valid = match state {
        DeliveryState::Pending => retry_at,
        DeliveryState::Succeeded | DeliveryState::Failed | DeliveryState::Skipped => !retry_at,
        DeliveryState::Running => false,
    };
    if valid {
        Ok(())
    } else {
        Err(InvalidFinish { state, retry_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LimitKind;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// Every transition out of `running`, as a table: (how the attempt ended, attempt, max
    /// attempts) → (state, retry delay in seconds).
    #[test]
    fn every_transition() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let failed = OutcomeKind::HandlerFailed {
            reason: "no".into(),
        };
        let trapped = OutcomeKind::Trapped {
            code: "unreachable".into(),
            message: String::new(),
            backtrace: vec![],
        };
        let timed_out = OutcomeKind::TimedOut {
            limit_ms: 10,
            waiting_for: None,
        };
        let limit = OutcomeKind::LimitExceeded {
            limit: LimitKind::Memory,
            detail: String::new(),
        };
        let panicked = OutcomeKind::Panicked {
            message: String::new(),
        };
        let engine = OutcomeKind::EngineError {
            message: String::new(),
        };
        use DeliveryState::*;
        let table: Vec<(AttemptEnd<'_>, u32, u32, DeliveryState, Option<i64>)> = vec![
            (
                AttemptEnd::Ran(&OutcomeKind::Succeeded),
                1,
                1,
                Succeeded,
                None,
            ),
            (
                AttemptEnd::Ran(&OutcomeKind::Succeeded),
                3,
                3,
                Succeeded,
                None,
            ),
            // No retry policy: the first failure is final, whatever the class.
            (AttemptEnd::Ran(&failed), 1, 1, Failed, None),
            (AttemptEnd::Ran(&trapped), 1, 1, Failed, None),
            (AttemptEnd::Ran(&timed_out), 1, 1, Failed, None),
            (AttemptEnd::Ran(&limit), 1, 1, Failed, None),
            (AttemptEnd::Ran(&panicked), 1, 1, Failed, None),
            // Attempts left: retry after the backoff, doubled, capped at max_backoff.
            (AttemptEnd::Ran(&failed), 1, 3, Pending, Some(2)),
            (AttemptEnd::Ran(&trapped), 2, 4, Pending, Some(4)),
            (AttemptEnd::Ran(&timed_out), 3, 5, Pending, Some(5)),
            // The last attempt fails for good.
            (AttemptEnd::Ran(&failed), 3, 3, Failed, None),
            (AttemptEnd::Ran(&failed), 7, 3, Failed, None),
            // The engine's own fault: always run again, attempts or not; after a second for
            // 30 attempts past the policy's, then twice as long per attempt, at most 5 minutes.
            (AttemptEnd::Ran(&engine), 1, 1, Pending, Some(1)),
            (AttemptEnd::Ran(&engine), 9, 3, Pending, Some(1)),
            (AttemptEnd::Ran(&engine), 33, 3, Pending, Some(1)),
            (AttemptEnd::Ran(&engine), 34, 3, Pending, Some(2)),
            (AttemptEnd::Ran(&engine), 35, 3, Pending, Some(4)),
            (AttemptEnd::Ran(&engine), 41, 3, Pending, Some(256)),
            (AttemptEnd::Ran(&engine), 42, 3, Pending, Some(300)),
            (AttemptEnd::Ran(&engine), u32::MAX, 1, Pending, Some(300)),
        ];
        for (end, attempt, max, state, delay) in table {
            let t = after_attempt(end, attempt, &policy(max), now);
            assert_eq!(t.state, state, "{end:?} attempt {attempt}/{max}");
            assert_eq!(
                t.retry_at.map(|at| (at - now).num_seconds()),
                delay,
                "{end:?} attempt {attempt}/{max}"
            );
            assert!(check_finish(t.state, t.retry_at.is_some()).is_ok());
        }
    }

    #[test]
    fn stores_refuse_what_no_attempt_can_lead_to() {
        assert!(check_finish(DeliveryState::Running, false).is_err());
        assert!(check_finish(DeliveryState::Running, true).is_err());
        assert!(check_finish(DeliveryState::Pending, false).is_err());
        assert!(check_finish(DeliveryState::Failed, true).is_err());
        assert!(check_finish(DeliveryState::Succeeded, false).is_ok());
    }
}
