//! Panics of the engine's own code turned into answers.
//!
//! A panic is a bug, but where it happens decides what it costs: inside a delivery's task it
//! would end the task before the delivery's outcome is recorded (the delivery stays claimed,
//! its lease renewed, until a restart); inside the poller it would end the poller for the life
//! of the process, silently. [`caught`] runs such a piece of work and answers a panic as an
//! error with what it said, so the caller records it and goes on.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;

/// Awaits `work`; `Err` with the panic's message if it panicked. Whatever `work` owned is
/// dropped where the panic left it and not looked at again: callers pass work whose state
/// lives elsewhere (a store, a database) or goes with it (a sandbox).
pub async fn caught<F: Future>(work: F) -> Result<F::Output, String> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .map_err(|panic| format!("panic: {}", panic_text(panic.as_ref())))
}

/// What a panic said, when it said it with a string (as `panic!` and `expect` do).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_is_answered_with_its_message_and_work_that_ends_with_its_output() {
        let ran: Result<(), String> = caught(async {
            tokio::task::yield_now().await;
            panic!("a host call broke");
        })
        .await;
        assert_eq!(ran, Err("panic: a host call broke".to_owned()));
        let ran: Result<(), String> = caught(async {
            let index = 7;
            panic!("index {index} out of range");
        })
        .await;
        assert_eq!(ran, Err("panic: index 7 out of range".to_owned()));
        let ran: Result<(), String> = caught(async { std::panic::panic_any(7_u8) }).await;
        assert_eq!(ran, Err("panic: a panic without a message".to_owned()));
        assert_eq!(caught(async { 42 }).await, Ok(42));
    }
}
