//! The durable queue between the sources and the sandboxes.
//!
//! - [`store`]: events, deliveries and outcomes on disk (SQLite, or PostgreSQL for several
//!   nodes); an event is committed before the source answers;
//! - [`dispatch`]: routing by job type and the workers that claim deliveries, run them and
//!   record their outcomes;
//! - [`delivery_threads`]: the threads the dispatcher and its deliveries run on, apart from the
//!   event path's;
//! - [`delivery_state`]: the delivery state machine — where a delivery is marked succeeded,
//!   failed, skipped or due for a retry;
//! - [`registration`]: a handler's `[[handlers]]` entry as routing and dispatch see it;
//! - [`retry`]: the retry policy of a handler;
//! - [`quarantine`]: setting aside handlers that keep failing;
//! - [`retention`]: deleting finished events past `[store] retention_days`.

pub mod delivery_state;
pub mod delivery_threads;
pub mod dispatch;
pub mod quarantine;
pub mod registration;
pub mod retention;
pub mod retry;
pub mod store;
