//! A handler registration: what routing and dispatch know about one `[[handlers]]` entry — its
//! job types (Keyfactor's `JobTypes`), properties, grants, limits, retry policy and concurrency.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;
use uuid::Uuid;

use crate::capabilities::Grants;
use crate::capabilities::properties::Properties;
use crate::limits::Limits;
use crate::queue::retry::RetryPolicy;

/// Deliveries of one handler running at once, so one slow handler cannot take every slot (a
/// quarter of [`crate::runtime::config::DEFAULT_MAX_CONCURRENT_DELIVERIES`]).
///
/// A delivery holds its place from its claim until its outcome is queued for the store (a
/// failure: until it is on record), so a handler gets through at most this many deliveries per
/// claim-to-outcome time. On two busy cores that time is several milliseconds (a store round
/// trip and a few thread hand-overs): with 4, a handler could not take 1,000 events/s and its
/// backlog grew for as long as they came; with 16 it keeps up with time to spare
/// (docs/PERFORMANCE.md, scenario c).
pub const DEFAULT_HANDLER_CONCURRENCY: usize = 16;

/// Which job types a handler runs for: Keyfactor's `JobTypes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum JobTypes {
    /// `["*"]`: every job type.
    All,
    /// Only these job type GUIDs.
    Only(BTreeSet<Uuid>),
}

impl JobTypes {
    /// Whether a job of type `job_type_id` is routed to the handler.
    pub fn matches(&self, job_type_id: Uuid) -> bool {
        match self {
            JobTypes::All => true,
            JobTypes::Only(ids) => ids.contains(&job_type_id),
        }
    }
}

/// Longest handler name: names appear in logs, metrics labels and URLs.
pub const MAX_HANDLER_NAME: usize = 64;

/// Whether `name` is a handler's name as a configuration may give one: 1 to
/// [`MAX_HANDLER_NAME`] ASCII letters, digits, `-`, `_` or `.` — no space, control, bidi or
/// other character that could hide what a name is.
pub fn is_handler_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HANDLER_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One `[[handlers]]` registration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Unique name.
    pub name: String,
    /// Path of the component, resolved against the config file's directory.
    pub component: PathBuf,
    /// The job types it runs for.
    pub job_types: JobTypes,
    /// Its properties, secrets resolved. Never log these.
    pub properties: Properties,
    /// Names of properties whose values are secrets (shown as such by the API).
    pub secret_properties: BTreeSet<String>,
    /// The capabilities it may use.
    pub grants: Grants,
    /// Its sandbox limits.
    pub limits: Limits,
    /// Its retry policy.
    pub retry: RetryPolicy,
    /// Deliveries of this handler running at once.
    pub max_concurrency: usize,
    /// The 1-based line of its `[[handlers]]` table.
    pub line: usize,
}

impl Registration {
    /// Whether `other` configures the handler the same way: every setting equal, wherever in
    /// the file it is written. A reload keeps a handler (its compiled code, its quarantine
    /// state) when this holds and its component is unchanged; a line added above it must not
    /// count as a change.
    pub fn same_settings(&self, other: &Registration) -> bool {
        let Registration {
            name,
            component,
            job_types,
            properties,
            secret_properties,
            grants,
            limits,
            retry,
            max_concurrency,
            line: _,
        } = self;
        *name == other.name
            && *component == other.component
            && *job_types == other.job_types
            && *properties == other.properties
            && *secret_properties == other.secret_properties
            && *grants == other.grants
            && *limits == other.limits
            && *retry == other.retry
            && *max_concurrency == other.max_concurrency
    }
}
