//! `[store]`: which database keeps events and deliveries, and how long a node's claim lasts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::store::postgres_url::{UrlError, check_url};
use crate::secret::{SecretError, SecretRef, resolve_secret};

/// How long a claim on a delivery lasts without renewal by default. Running deliveries are
/// renewed well within it; a crashed node's deliveries are taken over this long after its last
/// renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Shortest `[store] lease_ms`: leases are renewed every third of the lease, and a renewal is a
/// database round trip that must fit comfortably.
pub const MIN_STORE_LEASE: Duration = Duration::from_secs(1);

/// Longest `[store] lease_ms`: a longer lease only delays the takeover of a dead node's work.
pub const MAX_STORE_LEASE: Duration = Duration::from_secs(3600);

/// How many days a finished event is kept by default (`[store] retention_days`): a month of
/// history to look an event up by (`GET /v1/events/{id}`) and to compare with Keyfactor's own
/// job history, while a busy Command (~2 KB per event with one handler) does not fill the disk.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;

/// Longest `[store] retention_days` (ten years): longer than any audit rule asks for; `0` keeps
/// everything for anyone who wants more. It also keeps the cutoff (days as milliseconds before
/// now) far inside the range of every clock and column type the stores use.
pub const MAX_RETENTION_DAYS: u32 = 3650;

/// Seconds in a day, for [`StoreConfig::retention`].
const SECONDS_PER_DAY: u64 = 24 * 3600;

/// Which database keeps events and deliveries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// SQLite under `data_dir`: embedded, for one engine process.
    #[default]
    Sqlite,
    /// A PostgreSQL database at `url`, shared by several engine nodes.
    Postgres,
}

/// `[store]`: where events and deliveries are kept.
///
/// ```toml
/// [store]
/// kind = "postgres"                                  # default "sqlite"
/// url = "postgres://jobhook@127.0.0.1:5432/jobhook"  # no password in the URL
/// password = { env = "JOBHOOK_DB_PASSWORD" }         # or { file = "path" }; optional
/// lease_ms = 60000                                   # how long a node's claim lasts unrenewed
/// retention_days = 30                                # finished events older than this are deleted; 0 keeps all
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` (the default) or `postgres`.
    pub kind: StoreKind,
    /// Directory of the SQLite database and of other local files such as the default mail
    /// outbox (relative paths are relative to the config file).
    pub data_dir: PathBuf,
    /// For `postgres`: `postgres://USER@HOST:PORT/DATABASE`, without a password.
    pub url: Option<String>,
    /// For `postgres`: the password, by reference (relative files are made absolute against
    /// the config file's directory). Never logged.
    pub password: Option<SecretRef>,
    /// How long a claim on a delivery lasts without renewal, in milliseconds. A dead node's
    /// deliveries are taken over by another node this long after its last renewal.
    #[serde(rename = "lease_ms", with = "crate::duration_ms")]
    pub lease: Duration,
    /// How many days a finished event (one whose every delivery succeeded or failed for good,
    /// or that was routed to no handler) is kept before the engine deletes it, with its
    /// deliveries and attempts; `0` keeps everything. An event with a delivery still pending or
    /// running is never deleted.
    pub retention_days: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            data_dir: PathBuf::from("data"),
            url: None,
            password: None,
            lease: DEFAULT_LEASE,
            retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

/// Why a `[store]` section was refused; each message names the key and says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    /// `lease_ms` out of bounds.
    #[error(
        "[store] lease_ms must be between {} and {}",
        MIN_STORE_LEASE.as_millis(),
        MAX_STORE_LEASE.as_millis()
    )]
    Lease,
    /// `retention_days` out of bounds.
    #[error(
        "[store] retention_days must be between 0 (keep every event) and {MAX_RETENTION_DAYS}, \
         not {0}"
    )]
    Retention(u32),
    /// `data_dir = ""`: the directory would be the configuration file's own.
    #[error(
        "[store] data_dir is empty; name the directory of the store and the engine's other \
         local files (AOT cache, mail outbox), e.g. data_dir = \"data\" (beside this file) or \
         \"/var/lib/jobhook\""
    )]
    DataDirEmpty,
    /// `url` or `password` given for SQLite.
    #[error(
        "[store] url and password are only used with kind = \"postgres\"; \
         add kind = \"postgres\" or remove them"
    )]
    NotPostgres,
    /// `kind = "postgres"` without a `url`.
    #[error(
        "[store] url is required with kind = \"postgres\", e.g. \
         url = \"postgres://jobhook@127.0.0.1:5432/jobhook\""
    )]
    UrlMissing,
    /// A bad `url`.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The password reference cannot be resolved.
    #[error("[store] password: {0}")]
    Password(#[from] SecretError),
}

impl StoreConfig {
    /// How long a finished event is kept, or `None` to keep every event (`retention_days = 0`).
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_days > 0)
            .then(|| Duration::from_secs(u64::from(self.retention_days) * SECONDS_PER_DAY))
    }

    /// Checks the section. `base` is the configuration file's directory (for a password file).
    pub fn validate(&self, base: &Path) -> Result<(), StoreConfigError> {
        if self.lease < MIN_STORE_LEASE || self.lease > MAX_STORE_LEASE {
            return Err(StoreConfigError::Lease);
        }
        if self.retention_days > MAX_RETENTION_DAYS {
            return Err(StoreConfigError::Retention(self.retention_days));
        }
        // Relative paths are taken from the configuration file's directory: an empty one would
        // put the store and the engine's files there (`/etc/jobhook`, say), which nobody means.
        if self.data_dir.as_os_str().is_empty() {
            return Err(StoreConfigError::DataDirEmpty);
        }
        match (self.kind, &self.url) {
            (StoreKind::Sqlite, None) if self.password.is_none() => Ok(()),
            (StoreKind::Sqlite, _) => Err(StoreConfigError::NotPostgres),
            (StoreKind::Postgres, None) => Err(StoreConfigError::UrlMissing),
            (StoreKind::Postgres, Some(url)) => {
                check_url(url)?;
                if let Some(password) = &self.password {
                    resolve_secret(password, base)?;
                }
                Ok(())
            }
        }
    }
}
