//! jobhook: runs Keyfactor Command job complete handlers as sandboxed WebAssembly components.
//!
//! Keyfactor Command calls `IOrchestratorJobCompleteHandler.RunHandler(context)` after every
//! orchestrator job. jobhook keeps that programming model — the same context, job-type routing,
//! per-handler properties, Keyfactor API and e-mail uses — but runs each handler as a
//! `wasm32-wasip2` component in a fresh sandbox per event, with only the capabilities its operator
//! granted and with time, memory and call budgets. A handler failure of any kind becomes a
//! recorded [`Outcome`], never an engine failure.
//!
//! The folders follow the data flow of one event:
//!
//! ```text
//! sources/ ──► queue/ ──────────────► runtime/ ─────────► capabilities/
//! api, poller  store, dispatch,        engine, loader,     properties, log, keyfactor,
//!              delivery state,         sandbox, limits     mail, http, …
//!              quarantine                     │
//!                  ▲                          ▼
//!                  └──────────── outcome (recorded per delivery)
//! ```
//!
//! - [`sources`]: where events come from — the HTTP API and the JobHistory poller;
//! - [`queue`]: the durable store, routing and dispatch of deliveries, the delivery state
//!   machine (retry and failure), quarantine of handlers that keep failing;
//! - [`runtime`]: the wasmtime engine, the load gate, the AOT cache, the per-delivery sandbox
//!   and where its time, CPU and memory limits are enforced;
//! - [`capabilities`]: the interfaces a handler may import, each in its own module;
//! - [`app`]: the process edge — configuration file, `jobhook serve` (with its TLS listener),
//!   the CLI, its dev tools and the migration to and from Keyfactor registrations;
//! - shared vocabulary at the top: [`context`] (the job context and its decoding), [`outcome`]
//!   (the record of one invocation), [`limits`] (per-handler budgets), [`secret`] (secrets by
//!   reference, never printed), [`duration_ms`] (milliseconds in serde), [`metrics`] (Prometheus metrics), [`bindings`] (the WIT types), [`escape`] (guest and
//!   configuration text made safe to print), [`excerpt`] (text cut short for a message), [`files`] (the operator's files, read as regular files only and bounded), [`caught`] (a panic of the engine's own code turned
//!   into an error its caller records).

#![deny(missing_docs)]
// The documentation is for the people who work on the engine, and links the private items that
// say why (limits, helpers): read it with `cargo doc --no-deps --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod app;
pub mod bindings;
pub mod capabilities;
pub mod caught;
pub mod context;
pub mod duration_ms;
pub mod error_chain;
pub mod escape;
pub mod excerpt;
pub mod files;
pub mod limits;
#[cfg(test)]
pub(crate) mod log_capture;
pub mod log_limit;
pub mod metrics;
pub mod outcome;
pub mod queue;
pub mod runtime;
pub mod secret;
pub mod sources;

pub use context::{ContextError, JobContext, JobResult, OperationType};
pub use limits::{LimitKind, Limits};
pub use outcome::{Outcome, OutcomeKind};
pub use runtime::engine::Engine;
pub use runtime::loader::{LoadError, LoadOptions};
pub use runtime::sandbox::SandboxedHandler;
pub use runtime::state::{Delivery, SandboxSpec};

#[cfg(test)]
mod layout_tests {
    use std::path::Path;

    /// The README's Layout table names every folder and module of `host/src` down to the
    /// second level, so a newcomer finds a module by reading it.
    #[test]
    fn the_readme_layout_names_every_module() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
        let start = readme.find("## Layout").unwrap();
        let end = start + readme[start..].find("\n## ").unwrap();
        let layout = &readme[start..end];
        let mut missing = Vec::new();
        let src = root.join("src");
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !layout.contains(&format!("`host/src/{name}/`")) {
                    missing.push(format!("host/src/{name}/"));
                }
                for inner in std::fs::read_dir(&path).unwrap() {
                    let inner = inner.unwrap().path();
                    let file = inner.file_name().unwrap().to_string_lossy().into_owned();
                    let shown = if inner.is_dir() {
                        format!("`{file}/`")
                    } else {
                        format!("`{file}`")
                    };
                    if file != "mod.rs" && !layout.contains(&shown) {
                        missing.push(format!("host/src/{name}/{file}"));
                    }
                }
            } else if !matches!(name.as_str(), "lib.rs" | "main.rs")
                && !layout.contains(&format!("`{name}`"))
            {
                missing.push(format!("host/src/{name}"));
            }
        }
        assert!(
            missing.is_empty(),
            "README.md's Layout table does not name: {missing:?}"
        );
    }
}

#[cfg(test)]
mod documented_defaults {
    use std::time::Duration;

    use crate::app::{config, connections, migrate, tls};
    use crate::capabilities::Capability;
    use crate::capabilities::http::HttpConfig;
    use crate::capabilities::keyfactor::KeyfactorConfig;
    use crate::queue::{quarantine, retention, store};
    use crate::runtime::{engine, loader, sandbox, state};
    use crate::sources::{forwarders, idempotency};
    use crate::{context, limits, outcome};

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    /// Every default and bound in docs/SECURITY.md's limit tables, as a number here and as the
    /// doc writes it: changing a constant fails this test until the doc (and the number below)
    /// say the same.
    #[test]
    fn the_security_doc_states_every_limit_as_the_code_has_it() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(root.join("../docs/SECURITY.md")).unwrap();
        let secs = Duration::from_secs;
        // (the constant as the doc's table names it, what its row says, whether the code agrees)
        let rows: &[(&str, &str, bool)] = &[
            (
                "`limits::DEFAULT_TIMEOUT`",
                "| 10 s |",
                limits::DEFAULT_TIMEOUT == secs(10),
            ),
            (
                "`engine::EPOCH_TICK`",
                "ticks every 1 ms",
                engine::EPOCH_TICK == Duration::from_millis(1),
            ),
            (
                "`sandbox::TIMEOUT_GRACE`",
                "budget + 30 ms",
                sandbox::TIMEOUT_GRACE == Duration::from_millis(30),
            ),
            (
                "`limits::DEFAULT_MEMORY_BYTES`",
                "| 64 MiB |",
                limits::DEFAULT_MEMORY_BYTES == 64 * MIB,
            ),
            (
                "`limits::DEFAULT_TABLE_ELEMENTS`",
                "| 20,000 |",
                limits::DEFAULT_TABLE_ELEMENTS == 20_000,
            ),
            (
                "`limits::DEFAULT_MAX_INSTANCES`",
                "| 16 / 2 / 4 |",
                (
                    limits::DEFAULT_MAX_INSTANCES,
                    limits::DEFAULT_MAX_MEMORIES,
                    limits::DEFAULT_MAX_TABLES,
                ) == (16, 2, 4),
            ),
            (
                "`engine::MAX_WASM_STACK`",
                "| 512 KiB |",
                engine::MAX_WASM_STACK as u64 == 512 * KIB,
            ),
            (
                "`engine::ASYNC_STACK`",
                "own 2 MiB fiber stack",
                engine::ASYNC_STACK as u64 == 2 * MIB,
            ),
            (
                "`limits::DEFAULT_HOSTCALL_BYTES`",
                "| 4 MiB |",
                limits::DEFAULT_HOSTCALL_BYTES as u64 == 4 * MIB,
            ),
            (
                "`limits::DEFAULT_OUTPUT_BYTES`",
                "| 64 KiB |",
                limits::DEFAULT_OUTPUT_BYTES as u64 == 64 * KIB,
            ),
            (
                "`limits::DEFAULT_LOG_LINES`",
                "| 200 / 64 KiB |",
                limits::DEFAULT_LOG_LINES == 200 && limits::DEFAULT_LOG_BYTES as u64 == 64 * KIB,
            ),
            (
                "`limits::MAX_LOG_LINE_BYTES`",
                "| 4 KiB |",
                limits::MAX_LOG_LINE_BYTES as u64 == 4 * KIB,
            ),
            (
                "`outcome::MAX_REASON_BYTES`",
                "| 4 KiB |",
                outcome::MAX_REASON_BYTES as u64 == 4 * KIB,
            ),
            (
                "`state::MAX_RESOURCE_HANDLES`",
                "| 256 |",
                state::MAX_RESOURCE_HANDLES == 256,
            ),
            (
                "`state::MAX_RANDOM_BYTES`",
                "| 64 KiB |",
                state::MAX_RANDOM_BYTES == 64 * KIB,
            ),
            (
                "`engine::MAX_MEMORY_PER_SANDBOX`",
                "| 1 GiB |",
                engine::MAX_MEMORY_PER_SANDBOX as u64 == 1024 * MIB,
            ),
            (
                "`config::DEFAULT_MAX_CONCURRENT_DELIVERIES`",
                "| 64 (1 to 4,096) |",
                crate::runtime::config::DEFAULT_MAX_CONCURRENT_DELIVERIES == 64
                    && crate::runtime::config::MAX_CONCURRENT_DELIVERIES == 4096,
            ),
            (
                "`loader::DEFAULT_MAX_COMPONENT_BYTES`",
                "| 32 MiB |",
                loader::DEFAULT_MAX_COMPONENT_BYTES as u64 == 32 * MIB,
            ),
            (
                "`loader::DEFAULT_COMPILE_TIMEOUT`",
                "| 60 s |",
                loader::DEFAULT_COMPILE_TIMEOUT == secs(60),
            ),
            (
                "`engine::MAX_COMPONENT_INSTANCE_SIZE`",
                "| 4 MiB |",
                engine::MAX_COMPONENT_INSTANCE_SIZE as u64 == 4 * MIB,
            ),
            (
                "`engine::DEFAULT_MAX_CORE_INSTANCES_PER_COMPONENT`",
                "| 16 / 2 / 4 (1 to 1,024 / 16 / 256; never above",
                engine::DEFAULT_MAX_CORE_INSTANCES_PER_COMPONENT == 16
                    && (
                        engine::MAX_CORE_INSTANCES_SETTING,
                        engine::MAX_MEMORIES_SETTING,
                        engine::MAX_TABLES_SETTING,
                    ) == (1024, 16, 256),
            ),
            (
                "`engine::DEFAULT_CORE_INSTANCES_PER_DELIVERY`",
                "| 16 / 2 / 4 |",
                (
                    engine::DEFAULT_CORE_INSTANCES_PER_DELIVERY,
                    engine::DEFAULT_MEMORIES_PER_DELIVERY,
                    engine::DEFAULT_TABLES_PER_DELIVERY,
                ) == (16, 2, 4),
            ),
            (
                "`context::MAX_CONTEXT_BYTES`",
                "| 64 KiB / 4 KiB |",
                context::MAX_CONTEXT_BYTES as u64 == 64 * KIB
                    && context::MAX_STRING_FIELD_BYTES as u64 == 4 * KIB,
            ),
            (
                "`tls::HANDSHAKE_TIMEOUT`",
                "| 10 s / 256 |",
                tls::HANDSHAKE_TIMEOUT == secs(10) && tls::MAX_PENDING_HANDSHAKES == 256,
            ),
            (
                "`config::DEFAULT_MAX_BODY_BYTES`",
                "| 64 KiB (1 KiB to 64 KiB, the largest context ingest decodes) |",
                config::DEFAULT_MAX_BODY_BYTES as u64 == 64 * KIB
                    && crate::context::MAX_CONTEXT_BYTES as u64 == 64 * KIB,
            ),
            (
                "`connections::DEFAULT_HEADER_READ_TIMEOUT`",
                "(100 ms to 10 min each) | `[server] header_read_timeout_ms`, `body_read_timeout_ms`, `idle_timeout_ms` | 10 s / 10 s / 60 s |",
                (
                    connections::DEFAULT_HEADER_READ_TIMEOUT,
                    connections::DEFAULT_BODY_READ_TIMEOUT,
                    connections::DEFAULT_IDLE_TIMEOUT,
                ) == (secs(10), secs(10), secs(60))
                    && connections::MIN_TIMEOUT == Duration::from_millis(100)
                    && connections::MAX_TIMEOUT == secs(600),
            ),
            (
                "`connections::DEFAULT_MAX_CONNECTIONS`",
                "| 512 / 128 (1 to 65,536; per client at most the total; unset, the per-client cap is 128 or the total when that is lower) |",
                (
                    connections::DEFAULT_MAX_CONNECTIONS,
                    connections::DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                    connections::MAX_CONNECTIONS_LIMIT,
                ) == (512, 128, 65_536),
            ),
            (
                "`connections::LINGER_TIMEOUT`",
                "| 2 s / 1 MiB |",
                connections::LINGER_TIMEOUT == secs(2)
                    && connections::LINGER_MAX_BYTES as u64 == MIB,
            ),
            (
                "`tls::MAX_PEM_BYTES`",
                "| 1 MiB |",
                tls::MAX_PEM_BYTES == MIB,
            ),
            (
                "`migrate::MAX_IMPORT_BYTES`",
                "| 4 MiB; 200,000 |",
                migrate::MAX_IMPORT_BYTES == 4 * MIB && migrate::MAX_XML_NODES == 200_000,
            ),
            (
                "`queue::quarantine::DEFAULT_QUARANTINE_AFTER`",
                "| 5; 30 s / 1 h |",
                quarantine::DEFAULT_QUARANTINE_AFTER == 5
                    && quarantine::DEFAULT_QUARANTINE_BACKOFF == secs(30)
                    && quarantine::DEFAULT_QUARANTINE_MAX_BACKOFF == secs(3600),
            ),
            (
                "`idempotency::MAX_KEY_BYTES`",
                "(1 s to 366 days); expired keys deleted per purge batch | `[server] idempotency_retention_ms` | 255 bytes of visible ASCII; 7 days; 1,000 every 60 s |",
                idempotency::MAX_KEY_BYTES == 255
                    && idempotency::DEFAULT_RETENTION == secs(7 * 24 * 3600)
                    && idempotency::MIN_RETENTION == secs(1)
                    && idempotency::MAX_RETENTION == secs(366 * 24 * 3600)
                    && store::MAX_PURGE_BATCH == 1000
                    && idempotency::PURGE_INTERVAL == secs(60),
            ),
            (
                "`store::config::DEFAULT_RETENTION_DAYS`",
                "(0 to 3,650 days; 0 keeps everything, and the store grows without end); events deleted per purge batch | `[store] retention_days` | 30 days; 500 every 5 min |",
                store::config::DEFAULT_RETENTION_DAYS == 30
                    && store::config::MAX_RETENTION_DAYS == 3650
                    && store::MAX_EVENT_PURGE_BATCH == 500
                    && retention::RETENTION_INTERVAL == secs(300),
            ),
            (
                "`Grantable::DEFAULT_CALLS`",
                "| 20 / 5 / 5 |",
                [Capability::Keyfactor, Capability::Mail, Capability::Http]
                    .map(Capability::default_calls)
                    == [20, 5, 5],
            ),
            (
                "`forwarders::MAX_FORWARDER_NAME_BYTES`",
                "| 253 bytes of visible ASCII; 1,024 |",
                forwarders::MAX_FORWARDER_NAME_BYTES == 253 && forwarders::MAX_FORWARDERS == 1024,
            ),
        ];
        assert_eq!(
            Capability::ALL.len(),
            3,
            "a new capability: add its budget here and to the doc"
        );
        for (constant, says, agrees) in rows {
            assert!(
                agrees,
                "{constant} no longer has the value docs/SECURITY.md gives ({says}): update the doc and this test"
            );
            let row = doc
                .lines()
                .find(|l| l.starts_with('|') && l.contains(constant))
                .unwrap_or_else(|| panic!("docs/SECURITY.md has no table row naming {constant}"));
            assert!(
                row.contains(says),
                "docs/SECURITY.md's row for {constant} does not say {says:?}: {row}"
            );
        }
    }

    /// CAPABILITIES.md's engine configuration parses, and its `[http]` section (which says
    /// "these are the defaults") and the `[keyfactor]` timeout and response size are the
    /// defaults of the code.
    #[test]
    fn the_capabilities_doc_shows_the_defaults() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(root.join("../docs/CAPABILITIES.md")).unwrap();
        let start = doc.find("```toml\n[keyfactor]").unwrap() + "```toml\n".len();
        let block = &doc[start..start + doc[start..].find("```").unwrap()];
        let table: toml::Table = toml::from_str(block).unwrap();
        let http: HttpConfig = table["http"].clone().try_into().unwrap();
        let defaults = HttpConfig::default();
        assert_eq!(
            (
                http.timeout_ms,
                http.max_request_bytes,
                http.max_response_bytes
            ),
            (
                defaults.timeout_ms,
                defaults.max_request_bytes,
                defaults.max_response_bytes
            )
        );
        let keyfactor: KeyfactorConfig = table["keyfactor"].clone().try_into().unwrap();
        let standard = KeyfactorConfig::new(keyfactor.base_url.clone(), keyfactor.auth.clone());
        assert_eq!(keyfactor.timeout_ms, standard.timeout_ms);
        assert_eq!(keyfactor.max_response_bytes, standard.max_response_bytes);
        assert_eq!(keyfactor.api_version, standard.api_version);
    }
}
