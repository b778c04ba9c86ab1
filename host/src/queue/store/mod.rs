//! The durable store: events, one delivery per (event, matching handler), every attempt's
//! outcome, and the poller's cursor.
//!
//! An event and its deliveries are committed in one transaction before the ingest call answers.
//! A delivery moves `pending → running → succeeded | failed | skipped`, or back to `pending` for a
//! retry or after an interrupted run. Claiming marks it `running` and increments its attempt, so
//! a delivery interrupted by a crash is run again with a higher attempt number
//! (at-least-once). A terminal state is written in the same transaction as its attempt record,
//! so no attempt is ever terminal twice; only an operator makes a failed delivery pending again
//! ([`EventStore::retry_failed`]), and it then runs with the next attempt number.
//!
//! [`EventStore`] is the interface; [`sqlite::SqliteStore`] the embedded default, for one engine
//! process; [`postgres::PostgresStore`] a shared database, so that several engine nodes work off
//! one queue. [`open`] chooses between them from the `[store]` configuration. Both pass the same
//! test suite (`conformance.rs`).

pub mod clock;
pub mod config;
#[cfg(test)]
pub(crate) mod conformance;
mod interface;
pub mod postgres;
pub mod postgres_url;
pub mod sqlite;
mod sqlite_writer;

use std::sync::Arc;

use crate::secret::resolve_secret;
use config::{StoreConfig, StoreKind};
pub use interface::*;

/// Opens the store `config` chooses: SQLite under `data_dir` (the default) or the PostgreSQL
/// database at `url`, with the password resolved from its reference.
///
/// Blocks (connecting, migrating): call it from a blocking context, e.g. `spawn_blocking`.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn EventStore>, StoreError> {
    match config.kind {
        StoreKind::Sqlite => Ok(Arc::new(sqlite::SqliteStore::open_exclusive(
            &config.data_dir,
        )?)),
        StoreKind::Postgres => {
            let url = config.url.as_deref().ok_or_else(|| StoreError::Open {
                path: "[store] url".into(),
                message: "kind = \"postgres\" needs url = \"postgres://USER@HOST:PORT/DATABASE\""
                    .into(),
            })?;
            let password = config
                .password
                .as_ref()
                .map(|reference| {
                    // Relative file references were made absolute when the config was read.
                    resolve_secret(reference, std::path::Path::new(".")).map_err(|e| {
                        StoreError::Open {
                            path: postgres_url::redact_url(url),
                            message: format!("[store] password: {e}"),
                        }
                    })
                })
                .transpose()?;
            Ok(Arc::new(postgres::PostgresStore::open_with_lease(
                url,
                password.as_ref(),
                config.lease,
            )?))
        }
    }
}
