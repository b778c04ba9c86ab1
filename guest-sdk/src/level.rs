//! The log [`Level`], public as [`log::Level`](crate::log::Level). It lives in a leaf module
//! because both the [`log`](crate::log) module and the backend that carries log lines to the
//! host need it, and the log module itself depends on the backend.

use std::fmt;

/// How important a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Step-by-step detail for debugging a handler.
    Trace,
    /// Diagnostic detail.
    Debug,
    /// Normal progress worth keeping.
    Info,
    /// Something unexpected that the handler worked around.
    Warn,
    /// Something failed.
    Error,
}

impl Level {
    /// The level's name in upper case (`"INFO"`), as log lines print it.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
