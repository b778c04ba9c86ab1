//! Facts about this delivery of the event to this handler.
//!
//! jobhook delivers at least once: after an engine crash or under a retry policy a handler can
//! run again for the same event. [`attempt`] and [`event_id`] let a handler notice that, e.g. to
//! avoid sending the same e-mail twice.

use crate::backend;

/// 1 on the first attempt; higher when the delivery is re-run (engine restart, retry policy).
pub fn attempt() -> u32 {
    backend::attempt()
}

/// The engine's id of the event being delivered, if it came through the engine's event path
/// (`None` e.g. under `jobhook run`).
pub fn event_id() -> Option<String> {
    backend::event_id()
}

/// The operator's name for this handler instance (one component can be configured several
/// times under different names).
pub fn handler_name() -> String {
    backend::handler_name()
}
