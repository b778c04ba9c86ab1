//! Facts about this delivery of the event to this handler.
//!
//! jobhook delivers at least once: after an engine crash or under a retry policy a handler can
//! run again for the same event. [`attempt`] and [`event_id`] let a handler notice that, e.g. to
//! avoid sending the same e-mail twice. [`source`] and [`message`] say how the event reached
//! the engine and what Keyfactor said about the job.

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

/// How the event reached the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Posted to the engine's event API, normally by the Keyfactor-side forwarder from inside
    /// Command's own handler call: the context is Keyfactor's.
    EventApi,
    /// Made by the engine's poller from a row of Keyfactor's JobHistory: some context fields
    /// are derived (the README's field table says which and how).
    Poller,
    /// Handed to the handler directly, with no event path (`jobhook run`, a test).
    Direct,
}

impl std::fmt::Display for Source {
    /// The WIT name: `event-api`, `poller` or `direct`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::EventApi => "event-api",
            Source::Poller => "poller",
            Source::Direct => "direct",
        })
    }
}

/// How the event reached the engine.
pub fn source() -> Source {
    backend::source()
}

/// Keyfactor's text about the job's outcome (e.g. `Unable to open the store file ...`), when
/// the engine has it: the JobHistory `Message` of events the poller made, at most 16 KiB.
/// Keyfactor's handler context carries no message, so events from the forwarder have none.
/// The text comes from the orchestrator: treat it as untrusted input.
pub fn message() -> Option<String> {
    backend::message()
}
