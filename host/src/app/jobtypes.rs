//! `jobhook job-types --config <file>`: the job-type GUIDs of a Keyfactor Command instance, read
//! through the `[keyfactor]` client and printed as TOML for a handler's `job_types` and for
//! `[poller.job_types]`.
//!
//! Store-type job types are created per instance when a store type is configured, so their
//! GUIDs differ from one Command to the next (`reference/keyfactor.md` §4). They come from
//! `GET /CertificateStoreTypes` (`InventoryJobType`, `ManagementJobType`, `EnrollmentJobType`,
//! `DiscoveryJobType`); the job type *name* a context and a JobHistory row carry is the store
//! type's internal name followed by `Inventory`, `Management`, `Reenrollment` (the enrollment job
//! type) or `Discovery`. Keyfactor's sample handler calls that name the store type's "capability
//! name": its `Capability` field, which is its `ShortName` for the store types seen (`WinCert`);
//! where an answer has no `Capability`, the `ShortName` stands in. Custom job types come from `GET /JobTypes/Custom` (`Id`,
//! `JobTypeName`). Everything read is remote text: names are checked before they become TOML
//! keys, and only GUIDs are printed as values.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::app::config::Config;
use crate::bindings::jobhook::handler::keyfactor::Request;
use crate::bindings::types::{CapabilityError, Method};
use crate::capabilities::keyfactor::{KeyfactorClient, KeyfactorGrant};
use crate::context::parse_guid;
use crate::excerpt::excerpt;

/// The job type of fetching an orchestrator's logs (`Custom.FetchLogs`), built into Command and
/// listed by no endpoint: the GUID Keyfactor's C agent has for it (`reference/keyfactor.md` §4).
const FETCH_LOGS_JOB_TYPE: &str = "0D8CF0C8-56CA-4B8A-B16A-C062018E170D";

/// Rows per page when listing (Keyfactor's lists are paged; its default page is 50).
const PAGE_SIZE: usize = 500;

/// Most pages read per list: bounds the work on an answer that never ends.
const MAX_PAGES: usize = 100;

/// Longest job-type name printed; longer ones are reported and left out.
const MAX_NAME_BYTES: usize = 200;

/// The store-type fields holding job-type GUIDs, with the job name suffix each stands for.
const STORE_JOBS: &[(&str, &str)] = &[
    ("InventoryJobType", "Inventory"),
    ("ManagementJobType", "Management"),
    ("EnrollmentJobType", "Reenrollment"),
    ("DiscoveryJobType", "Discovery"),
];

/// One job type found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobType {
    /// The name a context's `JobType` carries (e.g. `WinCertInventory`).
    pub name: String,
    /// Its GUID on this instance.
    pub id: uuid::Uuid,
    /// Where it came from, for the comment (`store type WinCert`, `custom`).
    pub origin: String,
}

/// Whether `name` can be printed as a bare TOML key and is a plausible job type name.
fn printable(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Most characters of an entry left out that are printed: the answer is the server's, and one
/// entry may be megabytes long; the start says which entry it is.
const MAX_SKIPPED_CHARS: usize = 300;

/// A left-out entry as printed, cut to [`MAX_SKIPPED_CHARS`].
fn shown(entry: String) -> String {
    excerpt(&entry, MAX_SKIPPED_CHARS).into_owned()
}

/// The job types in `store_types` (`GET /CertificateStoreTypes`) and `custom`
/// (`GET /JobTypes/Custom`), and the entries left out, with why.
pub fn collect(store_types: &[Value], custom: &[Value]) -> (Vec<JobType>, Vec<String>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for store_type in store_types {
        let text = |field: &str| {
            store_type
                .get(field)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        // The name job types are made of, and how the comment calls the store type: by both
        // names where they differ, so an operator can tell which one the job names follow. The
        // comment is TOML too: a short name is in it only if it could be a job name itself.
        let (internal, origin) = match (text("Capability"), text("ShortName")) {
            (Some(capability), Some(short)) if capability != short && printable(short) => (
                capability,
                format!("store type {short}, capability {capability}"),
            ),
            (Some(name), _) | (None, Some(name)) => (name, format!("store type {name}")),
            // Job names would be a bare `Inventory`, `Management`, …: the store type's job
            // types are left out, said once.
            (None, None) => {
                let has_jobs = STORE_JOBS
                    .iter()
                    .any(|(field, _)| store_type.get(*field).is_some_and(|v| !v.is_null()));
                if has_jobs {
                    let id = store_type
                        .get("StoreType")
                        .filter(|id| id.is_number() || id.is_string());
                    skipped.push(shown(match id {
                        Some(id) => format!(
                            "store type with StoreType {id}: it has no Capability or ShortName to \
                             name its job types after"
                        ),
                        None => format!(
                            "store type with no Capability or ShortName to name its job types \
                             after: {store_type}"
                        ),
                    }));
                }
                continue;
            }
        };
        for (field, suffix) in STORE_JOBS {
            let Some(raw) = store_type.get(*field) else {
                continue;
            };
            if raw.is_null() {
                continue;
            }
            let name = format!("{internal}{suffix}");
            match raw.as_str().and_then(parse_guid) {
                Some(id) if printable(&name) && !id.is_nil() => found.push(JobType {
                    name,
                    id,
                    origin: origin.clone(),
                }),
                Some(id) if id.is_nil() => {}
                _ => skipped.push(shown(format!("store type {internal:?}: {field} {raw}"))),
            }
        }
    }
    for job in custom {
        let name = job
            .get("JobTypeName")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match job.get("Id").and_then(Value::as_str).and_then(parse_guid) {
            Some(id) if printable(name) => found.push(JobType {
                name: name.to_owned(),
                id,
                origin: "custom job type".into(),
            }),
            _ => skipped.push(shown(format!("custom job type {name:?}: {job}"))),
        }
    }
    (found, skipped)
}

/// The TOML: a `job_types` array for a `[[handlers]]` entry (every job type, one per line with
/// its name, to be trimmed by the operator) and the `[poller.job_types]` table.
pub fn render(found: &[JobType], source: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Job types of {source} (jobhook job-types).");
    let _ = writeln!(
        out,
        "# In a [[handlers]] entry: keep the lines of the job types the handler runs for."
    );
    let _ = writeln!(out, "job_types = [");
    for job in found {
        let _ = writeln!(out, "    \"{}\", # {} ({})", job.id, job.name, job.origin);
    }
    let _ = writeln!(out, "]");
    let _ = writeln!(
        out,
        "# Not listed: job types built into Command that no store type or custom job type \
         declares\n# (no endpoint lists them), e.g. fetching an orchestrator's logs, \
         Custom.FetchLogs:\n# {FETCH_LOGS_JOB_TYPE}, and SSL discovery and monitoring. \
         Add their GUIDs by hand."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "# JobHistory rows carry the job type name only: the poller routes by this map."
    );
    let _ = writeln!(out, "[poller.job_types]");
    let mut seen = BTreeMap::new();
    for job in found {
        if let Some(previous) = seen.insert(job.name.to_ascii_lowercase(), job.id) {
            let _ = writeln!(
                out,
                "# {} also names {previous}; the first one is kept",
                job.name
            );
            seen.insert(job.name.to_ascii_lowercase(), previous);
            continue;
        }
        let _ = writeln!(out, "{} = \"{}\"", toml_key(&job.name), job.id);
    }
    out
}

/// `name` as a TOML key: bare when it can be, quoted when it holds a `.`, which a bare key reads
/// as a nested table (`Custom.FetchLogs` would be `Custom = { FetchLogs = … }`). A
/// [`printable`] name holds nothing a quoted key must escape.
fn toml_key(name: &str) -> std::borrow::Cow<'_, str> {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.into()
    } else {
        format!("\"{name}\"").into()
    }
}

/// Most left-out entries printed; past it, only their number. A server can answer thousands of
/// unusable entries, and the operator needs a few to see what is wrong.
const MAX_SKIPPED_SHOWN: usize = 50;

/// What the pages read so far gave. A page is reduced to its job types as soon as it is read,
/// so at most one page's parsed JSON is held however many pages the server answers.
#[derive(Debug, Default)]
struct Gathered {
    /// Each job type once, in the order first seen (a server that ignores the page number
    /// answers the same rows on every page).
    found: Vec<JobType>,
    seen: std::collections::HashSet<(String, uuid::Uuid)>,
    /// The first [`MAX_SKIPPED_SHOWN`] entries left out, and how many more there were.
    skipped: Vec<String>,
    more_skipped: usize,
}

impl Gathered {
    fn add(&mut self, (found, skipped): (Vec<JobType>, Vec<String>)) {
        for job in found {
            if self.seen.insert((job.name.clone(), job.id)) {
                self.found.push(job);
            }
        }
        for entry in skipped {
            if self.skipped.len() < MAX_SKIPPED_SHOWN {
                self.skipped.push(entry);
            } else {
                self.more_skipped += 1;
            }
        }
    }

    /// The job types, and the left-out entries to print.
    fn finish(mut self) -> (Vec<JobType>, Vec<String>) {
        if self.more_skipped > 0 {
            self.skipped.push(format!(
                "{} more entries (only the first {MAX_SKIPPED_SHOWN} are shown)",
                self.more_skipped
            ));
        }
        (self.found, self.skipped)
    }
}

/// The paging parameters' prefix of `GET /CertificateStoreTypes`: Command binds that list's
/// query to a parameter named `cstquery` (the Go SDK generated from its API spec sends
/// `cstquery.pageReturned` / `cstquery.returnLimit`); `pq.*` is not bound there, and the list
/// would stop at its default page of 50.
const STORE_TYPES_QUERY: &str = "cstquery.";

/// The paging parameters' prefix of `GET /JobTypes/Custom` (and most lists): `pq`.
const LIST_QUERY: &str = "pq.";

/// Reads every page of a Keyfactor list (at most [`MAX_PAGES`]), its paging parameters under
/// `prefix`, handing each page's rows to `page_read` before the next is read.
async fn each_page(
    client: &KeyfactorClient,
    grant: &KeyfactorGrant,
    path: &str,
    prefix: &str,
    mut page_read: impl FnMut(&[Value]),
) -> anyhow::Result<()> {
    for page in 1..=MAX_PAGES {
        let (response, location) = client
            .send_with_location(
                grant,
                Request {
                    method: Method::Get,
                    path: path.into(),
                    query: vec![
                        (format!("{prefix}returnLimit"), PAGE_SIZE.to_string()),
                        (format!("{prefix}pageReturned"), page.to_string()),
                    ],
                    headers: Vec::new(),
                    body: None,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!(call_failed(path, &e)))?;
        if !(200..300).contains(&response.status) {
            let body = String::from_utf8_lossy(response.body.get(..300).unwrap_or(&response.body))
                .escape_debug()
                .to_string();
            bail!(
                "{}",
                refused(path, response.status, &body, location.as_deref())
            );
        }
        let rows = match serde_json::from_slice::<Value>(&response.body) {
            Ok(Value::Array(rows)) => rows,
            Ok(_) => bail!("GET {path} did not answer a JSON array"),
            Err(e) => bail!("GET {path} answered invalid JSON: {e}"),
        };
        page_read(&rows);
        if rows.len() < PAGE_SIZE {
            break;
        }
    }
    Ok(())
}

/// What a call that got no answer says: the client's words (escaped: they may quote a remote
/// server) and, where the address is what to check, the setting that holds it.
fn call_failed(path: &str, error: &CapabilityError) -> String {
    let (words, setting) = match error {
        CapabilityError::Failed(m) | CapabilityError::Timeout(m) => (
            m,
            Some("check [keyfactor] base_url: the Keyfactor API must answer there"),
        ),
        CapabilityError::NotGranted(m)
        | CapabilityError::NotAvailable(m)
        | CapabilityError::Denied(m)
        | CapabilityError::LimitExceeded(m) => (m, None),
    };
    let words = crate::escape::escape(words);
    match setting {
        Some(setting) => format!("GET {path}: {words}; {setting}"),
        None => format!("GET {path}: {words}"),
    }
}

/// What an answer other than 2xx says: for a redirection where it pointed (`location`) and that
/// it is not followed, for 401 and 403 what to check
/// ([`refusal_hint`](crate::capabilities::keyfactor::refusal_hint), as the poller says it), and
/// the start of the body when there is one. Keyfactor's documentation, as far as the reference
/// goes, names no permission for the lists read here, so none is named.
fn refused(path: &str, status: u16, body: &str, location: Option<&str>) -> String {
    let setting = crate::capabilities::keyfactor::refusal_hint(status, None);
    let redirect = if (300..400).contains(&status) {
        crate::capabilities::keyfactor::redirect_note(location)
    } else {
        String::new()
    };
    let body = if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    };
    format!("GET {path} answered {status}{redirect}{body}{setting}")
}

/// Reads the job types through `client` and renders them (see [`render`]); entries that could
/// not be printed are returned as warnings.
pub async fn job_types_toml(client: &KeyfactorClient) -> anyhow::Result<(String, Vec<String>)> {
    let grant = KeyfactorGrant::read_only(&["CertificateStoreTypes", "JobTypes/Custom"])
        .map_err(|e| anyhow::anyhow!("grant: {e}"))?;
    let mut gathered = Gathered::default();
    each_page(
        client,
        &grant,
        "CertificateStoreTypes",
        STORE_TYPES_QUERY,
        |rows| gathered.add(collect(rows, &[])),
    )
    .await?;
    each_page(client, &grant, "JobTypes/Custom", LIST_QUERY, |rows| {
        gathered.add(collect(&[], rows))
    })
    .await?;
    let (found, skipped) = gathered.finish();
    Ok((render(&found, "the configured Keyfactor Command"), skipped))
}

/// The warning line for an entry left out ([`collect`]: names in it are quoted already, the
/// rest is the server's JSON): escaped once, for the terminal ([`crate::escape::escape`]).
fn warning_line(entry: &str) -> String {
    format!("warning: left out {}", crate::escape::escape(entry))
}

/// `jobhook job-types --config <file>`.
pub async fn job_types(path: &Path) -> anyhow::Result<std::process::ExitCode> {
    let config = Config::load(path)?;
    let services = crate::app::server::services(&config)?;
    let client = services
        .keyfactor
        .clone()
        .with_context(|| format!("{}: configure [keyfactor] first", path.display()))?;
    let (toml, skipped) = job_types_toml(&client).await?;
    for entry in skipped {
        crate::app::output::print_err(&warning_line(&entry));
    }
    crate::app::output::print_out(&toml)?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that got no answer says so in words (not `Failed("…")`) and names the setting to
    /// check; a 401 or 403 names `[keyfactor.auth]`.
    #[test]
    fn a_failed_call_names_the_setting_to_check() {
        let text = call_failed(
            "CertificateStoreTypes",
            &CapabilityError::Failed("cannot connect to the Keyfactor API".into()),
        );
        assert_eq!(
            text,
            "GET CertificateStoreTypes: cannot connect to the Keyfactor API; check [keyfactor] \
             base_url: the Keyfactor API must answer there"
        );
        let text = call_failed(
            "JobTypes/Custom",
            &CapabilityError::Timeout("no answer\nin 30 s".into()),
        );
        assert!(!text.contains("Timeout(") && !text.contains('\n'), "{text}");
        assert!(text.contains("[keyfactor] base_url"), "{text}");
        for status in [401, 403] {
            let text = refused("CertificateStoreTypes", status, "", None);
            assert!(text.contains("[keyfactor.auth]"), "{text}");
        }
        assert!(!refused("CertificateStoreTypes", 500, "x", None).contains("[keyfactor"));
    }
    use jobhook_standin::{Standin, data};
    use serde_json::json;

    /// A client of `standin` with its Basic credentials, the password in a file in `dir`.
    fn client_of(standin: &Standin, dir: &Path) -> KeyfactorClient {
        std::fs::write(dir.join("pw"), &standin.credentials().password).expect("pw");
        let auth = crate::capabilities::keyfactor::auth::AuthConfig::Basic {
            username: standin.credentials().username.clone(),
            password: crate::secret::SecretRef::File(dir.join("pw")),
        };
        KeyfactorClient::from_config(&crate::capabilities::keyfactor::KeyfactorConfig::new(
            standin.base_url(),
            auth,
        ))
        .expect("client")
    }

    /// More store types than one page holds are all listed: the store-type list is paged by
    /// its own parameters (`cstquery.*`), which the stand-in binds as Command does, ignoring
    /// `pq.*` (with which the list stopped at Command's default page of 50).
    #[tokio::test]
    async fn every_page_of_store_types_is_read() {
        let mut config = jobhook_standin::StandinConfig::default();
        let extra = PAGE_SIZE + 100;
        for i in 0..extra {
            config.data.store_types.push(json!({
                "ShortName": format!("Extra{i}"),
                "InventoryJobType": uuid::Uuid::new_v4().to_string(),
            }));
        }
        let standin = Standin::start_with(config).await.expect("stand-in");
        let dir = tempfile::tempdir().expect("tempdir");
        let (toml, skipped) = job_types_toml(&client_of(&standin, dir.path()))
            .await
            .expect("job types");
        assert!(skipped.is_empty(), "{skipped:?}");
        for i in [0, 49, 50, PAGE_SIZE - 1, PAGE_SIZE, extra - 1] {
            assert!(
                toml.contains(&format!("\nExtra{i}Inventory = ")),
                "Extra{i}"
            );
        }
    }

    #[tokio::test]
    async fn the_printed_toml_parses_with_the_engine_config_parser() {
        let standin = Standin::start().await.expect("stand-in");
        let dir = tempfile::tempdir().expect("tempdir");
        // The parser checks that the component exists; any file will do here.
        std::fs::write(dir.path().join("h.wasm"), b"\0asm").expect("component");
        let client = client_of(&standin, dir.path());
        let (toml, skipped) = job_types_toml(&client).await.expect("job types");
        assert!(skipped.is_empty(), "{skipped:?}");
        assert!(
            toml.contains(&format!(
                "WinCertInventory = \"{}\"",
                data::WINCERT_INVENTORY
            )),
            "{toml}"
        );
        assert!(toml.contains("Reenrollment = "), "{toml}");
        assert!(toml.contains(data::CUSTOM_JOB_TYPE_ID), "{toml}");
        // Pasted into a configuration, after a [[handlers]] entry's keys.
        let text = format!(
            "[keyfactor]\nbase_url = \"{}\"\n[keyfactor.auth]\nkind = \"basic\"\nusername = \"u\"\npassword = {{ file = \"pw\" }}\n\n[[handlers]]\nname = \"h\"\ncomponent = \"h.wasm\"\n{toml}",
            standin.base_url()
        );
        let config = Config::parse(&text, &dir.path().join("jobhook.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let poller = config.poller.expect("[poller]");
        assert_eq!(
            poller.job_types.get("WinCertInventory").map(String::as_str),
            Some(data::WINCERT_INVENTORY)
        );
        let ids = poller.job_type_ids().expect("GUIDs");
        assert!(ids.len() >= 5, "{ids:?}");
        match &config.handlers[0].job_types {
            crate::queue::registration::JobTypes::Only(set) => assert_eq!(set.len(), ids.len()),
            other => panic!("{other:?}"),
        }
    }

    /// A name with a dot (Command's built-in `Custom.FetchLogs` has one) is printed as one key,
    /// beside a name it extends, and reads back as the names it was.
    #[test]
    fn names_with_dots_read_back_as_themselves() {
        let job = |name: &str| JobType {
            name: name.to_owned(),
            id: uuid::Uuid::new_v4(),
            origin: "custom".to_owned(),
        };
        let found = [
            job("Custom.FetchLogs"),
            job("X"),
            job("X.Y"),
            job("Plain-Name_1"),
        ];
        let toml = render(&found, "a test");
        assert!(toml.contains("\n\"X.Y\" = "), "{toml}");
        assert!(toml.contains("\nPlain-Name_1 = "), "{toml}");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("h.wasm"), b"\0asm").expect("component");
        let text = format!(
            "[keyfactor]\nbase_url = \"https://kf.example/KeyfactorAPI\"\n[keyfactor.auth]\n\
             kind = \"basic\"\nusername = \"u\"\npassword = {{ file = \"pw\" }}\n\n\
             [[handlers]]\nname = \"h\"\ncomponent = \"h.wasm\"\n{toml}"
        );
        let config = Config::parse(&text, &dir.path().join("jobhook.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let poller = config.poller.expect("[poller]");
        for job in &found {
            assert_eq!(
                poller.job_types.get(&job.name),
                Some(&job.id.to_string()),
                "{toml}"
            );
        }
    }

    #[test]
    fn an_entry_left_out_is_printed_cut_short() {
        let huge = json!([{ "JobTypeName": "x".repeat(100_000), "Id": "not a guid" }]);
        let (_, skipped) = collect(&[], huge.as_array().unwrap());
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].chars().count() <= MAX_SKIPPED_CHARS + 1,
            "{}",
            skipped[0].len()
        );
        assert!(
            skipped[0].starts_with("custom job type"),
            "{}",
            &skipped[0][..40]
        );
    }

    #[test]
    fn pages_repeated_by_the_server_give_each_job_type_once_and_few_warnings() {
        let page = json!([
            {"ShortName": "WinCert", "InventoryJobType": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"},
            {"ShortName": "Bad", "InventoryJobType": "not-a-guid"},
        ]);
        let mut gathered = Gathered::default();
        for _ in 0..MAX_PAGES {
            gathered.add(collect(page.as_array().unwrap(), &[]));
        }
        let (found, skipped) = gathered.finish();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(skipped.len(), MAX_SKIPPED_SHOWN + 1);
        assert_eq!(
            skipped.last(),
            Some(&format!(
                "{} more entries (only the first {MAX_SKIPPED_SHOWN} are shown)",
                MAX_PAGES - MAX_SKIPPED_SHOWN
            ))
        );
    }

    /// A job type's name is made of the store type's `Capability` (the name Keyfactor's sample
    /// handler says job names follow), the `ShortName` standing in where there is none.
    #[test]
    fn job_names_follow_the_capability_name_and_fall_back_to_the_short_name() {
        let (found, skipped) = collect(
            &[
                json!({"ShortName": "K8SCluster", "Capability": "K8SClusterCap",
                       "InventoryJobType": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
                json!({"ShortName": "PEM", "Capability": "PEM",
                       "ManagementJobType": "59b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
                json!({"ShortName": "Old", "Capability": null,
                       "EnrollmentJobType": "69b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
                json!({"ShortName": "Empty", "Capability": "",
                       "DiscoveryJobType": "79b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
            ],
            &[],
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|j| (j.name.as_str(), j.origin.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                (
                    "K8SClusterCapInventory",
                    "store type K8SCluster, capability K8SClusterCap"
                ),
                ("PEMManagement", "store type PEM"),
                ("OldReenrollment", "store type Old"),
                ("EmptyDiscovery", "store type Empty"),
            ]
        );
        // A short name that could break the printed comment is not in it.
        let (found, _) = collect(
            &[json!({"ShortName": "Evil\n[server]", "Capability": "Fine",
                     "InventoryJobType": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"})],
            &[],
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].origin, "store type Fine");
        let text = render(&found, "x");
        assert!(!text.contains("Evil"));
        // What it cannot list is said, and the whole is still TOML.
        assert!(text.contains(FETCH_LOGS_JOB_TYPE), "{text}");
        assert!(toml::from_str::<toml::Value>(&text).is_ok(), "{text}");
    }

    /// A store type with neither `Capability` nor `ShortName` has no name to make job names
    /// of (they came out as plain `Inventory`): its job types are left out with a warning
    /// naming its `StoreType` id, or the entry itself when it has none.
    #[test]
    fn a_store_type_without_a_name_is_left_out_naming_its_id() {
        let (found, skipped) = collect(
            &[
                json!({"StoreType": 104, "InventoryJobType": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
                       "ManagementJobType": "59b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
                json!({"Capability": "", "ShortName": null,
                       "InventoryJobType": "69b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
            ],
            &[],
        );
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(
            skipped,
            [
                "store type with StoreType 104: it has no Capability or ShortName to name its \
                 job types after"
                    .to_owned(),
                "store type with no Capability or ShortName to name its job types after: \
                 {\"Capability\":\"\",\"InventoryJobType\":\
                 \"69b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f\",\"ShortName\":null}"
                    .to_owned(),
            ]
        );
    }

    /// A warning is escaped once, for the terminal: names keep their one quoting, and a bidi
    /// override or an escape sequence in one is shown as an escape, not acted on (they were
    /// escaped twice: `\"E\\u{202e}vil\"`).
    #[test]
    fn warnings_are_escaped_once() {
        let (_, skipped) = collect(
            &[json!({"ShortName": "E\u{202e}vil\u{1b}[2J", "InventoryJobType": "not-a-guid"})],
            &[],
        );
        let line = warning_line(&skipped[0]);
        assert_eq!(
            line,
            "warning: left out store type \"E\\u{202e}vil\\u{1b}[2J\": InventoryJobType \
             \"not-a-guid\""
        );
        assert!(!line.chars().any(crate::escape::needs_escape), "{line:?}");
    }

    /// An answer that redirects is reported with where it pointed — whatever host it names,
    /// quoted, without its user information — and that redirections are not followed, with the
    /// setting to check; the redirection is not followed.
    #[tokio::test]
    async fn a_redirect_is_reported_with_its_location_and_not_followed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let followed = std::sync::Arc::new(AtomicUsize::new(0));
        let seen = std::sync::Arc::clone(&followed);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let elsewhere = format!("http://u:p@{addr}/elsewhere");
        let app = axum::Router::new()
            .route(
                "/KeyfactorAPI/CertificateStoreTypes",
                axum::routing::get(move || {
                    let elsewhere = elsewhere.clone();
                    async move { (axum::http::StatusCode::FOUND, [("location", elsewhere)], "") }
                }),
            )
            .route(
                "/elsewhere",
                axum::routing::get(move || {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async { "[]" }
                }),
            );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pw"), "pw").expect("pw");
        let auth = crate::capabilities::keyfactor::auth::AuthConfig::Basic {
            username: "u".into(),
            password: crate::secret::SecretRef::File(dir.path().join("pw")),
        };
        let client =
            KeyfactorClient::from_config(&crate::capabilities::keyfactor::KeyfactorConfig::new(
                format!("http://{addr}/KeyfactorAPI/"),
                auth,
            ))
            .expect("client");
        let error = job_types_toml(&client).await.unwrap_err().to_string();
        server.abort();
        assert_eq!(
            error,
            format!(
                "GET CertificateStoreTypes answered 302 (a redirection to \"http://…@{addr}/elsewhere\"; \
                 redirections are not followed: is [keyfactor] base_url the API's own address, \
                 https and ending in /KeyfactorAPI/?)"
            )
        );
        assert_eq!(followed.load(Ordering::SeqCst), 0, "not followed");
    }

    #[test]
    fn hostile_names_and_ids_are_left_out() {
        let (found, skipped) = collect(
            &[
                json!({"ShortName": "Evil\"]\n[server]", "InventoryJobType": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
                json!({"ShortName": "Ok", "InventoryJobType": "not-a-guid", "ManagementJobType": null}),
            ],
            &[
                json!({"JobTypeName": "x = 1", "Id": "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f"}),
                json!({"JobTypeName": "Fine", "Id": 7}),
            ],
        );
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(skipped.len(), 4, "{skipped:?}");
    }
}
