//! Levelled logging into the engine's log and the delivery's recorded outcome.
//!
//! Use the crate-root macros [`trace!`](crate::trace), [`debug!`](crate::debug),
//! [`info!`](crate::info), [`warn!`](crate::warn) and [`error!`](crate::error), which take
//! `format!` arguments. The engine bounds lines and bytes per invocation; lines past the bound
//! are dropped and counted, so logging can never fail a handler.

use std::fmt;

use crate::backend;

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

/// Records one log line at `level`. Prefer the macros, which format for you.
pub fn log(level: Level, message: &str) {
    backend::log(level, message);
}

/// Logs a `format!`-style message at [`Level::Trace`].
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Trace, &::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at [`Level::Debug`](crate::log::Level::Debug).
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Debug, &::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at [`Level::Info`](crate::log::Level::Info).
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Info, &::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at [`Level::Warn`](crate::log::Level::Warn).
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Warn, &::std::format!($($arg)+))
    };
}

/// Logs a `format!`-style message at [`Level::Error`](crate::log::Level::Error).
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log::log($crate::log::Level::Error, &::std::format!($($arg)+))
    };
}
