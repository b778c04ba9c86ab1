//! The load gate: turns untrusted bytes into a checked, pre-instantiated handler component, or
//! refuses them with a message that says what is wrong and what to do.
//!
//! Checks, in order: size; WebAssembly magic and binary kind (component, not core module); the
//! pre-check, read from the binary without compiling ([`crate::runtime::imports`]): every
//! import is an interface the host provides, of a supported version, and — for capabilities —
//! granted to the handler, and the component exports `run-handler`; validation and compilation
//! (off the async runtime, with a time bound); the same import checks on the compiled
//! component's types; finally the component's exports match the `handler` world.

use std::time::Duration;

use serde::Serialize;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use crate::bindings::HandlerPre;
use crate::capabilities::{ALWAYS_AVAILABLE, Capability, Grants};
use crate::runtime::aot::CacheOutcome;
use crate::runtime::engine::Engine;
use crate::runtime::imports::{ImportKind, read_surface};
use crate::runtime::state::{SandboxState, linker};

/// The WIT package handlers are built against, and its version.
pub const WIT_PACKAGE: &str = "jobhook:handler";
/// The version of [`WIT_PACKAGE`] this engine implements (`wit/jobhook.wit`).
pub const WIT_VERSION: (u64, u64, u64) = (0, 2, 0);

/// Every released version of [`WIT_PACKAGE`] a component may be built against: the current one
/// and each earlier one kept verbatim under `wit/released/` and linked by
/// [`crate::runtime::compat`]. A component built against an older patch release of one of them
/// is accepted too.
pub const SUPPORTED_VERSIONS: &[(u64, u64, u64)] = &[(0, 1, 0), WIT_VERSION];

/// The command that builds a Rust handler into the component every message and document
/// points to, `target/wasm32-wasip2/release/<crate>.wasm`: a release build, so one command
/// names one file wherever the engine or its documentation says how to build a handler.
pub const BUILD_COMMAND: &str = "cargo build --release --target wasm32-wasip2";

/// Largest component accepted. A release-built Rust handler is 100 KiB–2 MiB; a debug build can be
/// 10 MiB. Compilation time grows with size, so the cap also bounds the cost of hostile input.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 32 * 1024 * 1024;

/// Longest a component may take to validate and compile. Real handlers compile in well under a
/// second here; the bound turns a pathological input into a clear refusal.
pub const DEFAULT_COMPILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bytes in a WebAssembly page, the unit in which a component states its memories' initial
/// sizes (fixed by the core specification).
const WASM_PAGE_BYTES: u64 = 65_536;

/// The WASI release the engine links (wasmtime-wasi's WASI 0.2, what the `wasm32-wasip2` target
/// builds against): a WASI import at another `major.minor` — WASI 0.3's, an unversioned one —
/// can never be linked, so it is refused before compiling, naming this release.
const WASI_RELEASE: &str = "0.2";

/// WASI packages a handler may import. They are linked with a context that grants nothing: no
/// files, no environment, no arguments; stdout/stderr go to bounded buffers.
const PROVIDED_WASI: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
];

/// WASI packages that are linked *inert*: a component may import them, and every call is denied
/// at run time. libpython imports `wasi:sockets` whatever the handler does, so refusing it would
/// refuse every Python handler. Each sandbox's `WasiCtx` allows no TCP, no UDP and no name
/// lookup and checks every socket address against a policy that refuses all of them; in
/// wasmtime-wasi 48, creating a TCP or UDP socket fails with `access-denied` before any OS socket
/// exists, and a name lookup fails before resolving (`sandbox::new_store`; the hostile test
/// `a_component_using_sockets_links_and_every_attempt_is_denied` holds this to a real listener).
/// Reports list them apart from the WASI that works ([`ImportSummary::inert`]).
pub const INERT_WASI: &[&str] = &["wasi:sockets/"];

/// How reports describe an [`INERT_WASI`] import.
pub const INERT_NOTE: &str = "linked inert: every call denied";

/// The name of the one export of the `handler` world.
pub const HANDLER_EXPORT: &str = "run-handler";

/// WASI packages that are refused outright, with the capability to use instead.
const REFUSED_WASI: &[(&str, &str)] = &[(
    "wasi:http/",
    "wasi:http is not available to handlers; use the `http` capability (jobhook:handler/http)",
)];

/// How a component is checked.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Largest component accepted, in bytes.
    pub max_bytes: usize,
    /// Longest compilation allowed.
    pub compile_timeout: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            compile_timeout: DEFAULT_COMPILE_TIMEOUT,
        }
    }
}

/// Why a component was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// Bigger than [`LoadOptions::max_bytes`].
    #[error(
        "the component is {size} bytes; the limit is {max} bytes (raise `max_component_bytes` if this handler is trusted to be that large)"
    )]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An empty file (a build that was interrupted, a copy that failed).
    #[error(
        "the file is empty (0 bytes); build the handler again (`{}`)",
        BUILD_COMMAND
    )]
    Empty,
    /// Not WebAssembly at all.
    #[error(
        "not a WebAssembly binary (it does not start with the `\\0asm` magic bytes); give the handler's .wasm component (Rust: `{}`; other languages: docs/LANGUAGES.md)",
        BUILD_COMMAND
    )]
    NotWasm,
    /// A core module, not a component.
    #[error(
        "this is a core WebAssembly module, not a component; build the handler for the `wasm32-wasip2` target (Rust: `{}`, with `[lib] crate-type = [\"cdylib\"]` in the crate's Cargo.toml; C: link with wasm-component-ld (`clang -fuse-ld=<wasm-component-ld>`, as the `jobhook new --lang c` build.sh does); Python and JavaScript: componentize-py, componentize-qjs — docs/LANGUAGES.md), or wrap a core module with `wasm-tools component new`",
        BUILD_COMMAND
    )]
    CoreModule,
    /// A WebAssembly binary of a version or layer this engine does not know.
    #[error(
        "unsupported WebAssembly binary version/layer {0:#010x}; jobhook runs WebAssembly components (wasm32-wasip2)"
    )]
    UnknownBinary(u32),
    /// Failed validation or compilation.
    #[error("the component is invalid: {0}")]
    Invalid(String),
    /// Compilation took longer than allowed.
    #[error("compiling the component took longer than {0:?}; it was refused")]
    CompileTimeout(Duration),
    /// Imports the handler package at a version this engine does not implement.
    #[error(
        "the component imports `{import}`, but this engine runs components built against jobhook:handler {supported}; rebuild the handler against one of them (a newer engine may run it as it is)"
    )]
    UnsupportedVersion {
        /// The import name.
        import: String,
        /// The versions this engine runs, e.g. `0.1.0 or 0.2.0`.
        supported: String,
    },
    /// Imports the handler package at two versions.
    #[error(
        "the component imports jobhook:handler at two versions ({first} and {second}); a component is built against one contract version: regenerate its bindings from one WIT"
    )]
    MixedVersions {
        /// The first version seen.
        first: String,
        /// Another version.
        second: String,
    },
    /// Imports a capability the operator did not grant to this handler.
    #[error(
        "the component imports the `{capability}` capability, which is not granted to this handler; grant it in the handler's configuration ([handlers.grants.{capability}]) or rebuild the handler without it"
    )]
    NotGranted {
        /// The capability.
        capability: Capability,
    },
    /// Imports something the engine does not provide.
    #[error("the component imports `{import}`, which jobhook does not provide: {hint}")]
    NotProvided {
        /// The import name.
        import: String,
        /// What to do instead.
        hint: String,
    },
    /// Imports an interface the engine provides, in a form it does not: a function or type the
    /// engine's interface lacks or declares differently (bindings made from an edited or other
    /// WIT, a WASI function another release has). Found when the imports are linked.
    #[error(
        "the component's import `{import}` does not match what this engine provides ({detail}); {hint}"
    )]
    ImportMismatch {
        /// The import name.
        import: String,
        /// What the linker found, in its words.
        detail: String,
        /// What to do.
        hint: String,
    },
    /// The exports do not match the `handler` world.
    #[error(
        "the component does not fit the jobhook:handler world: {0}; build it against wit/ of this engine, exporting `run-handler` (Rust: jobhook-sdk's `export_handler!`; Python, JavaScript, C: docs/LANGUAGES.md)"
    )]
    WrongWorld(String),
    /// The component declares a memory or table at start larger than any sandbox may ever have
    /// (the pool's per-sandbox room, which no setting raises): it could never run.
    #[error(
        "the component declares {need} at start, and no sandbox may have more than {most}: it could never run; build it with a smaller initial {what}"
    )]
    LargerThanAnySandbox {
        /// `memory` or `table`.
        what: &'static str,
        /// What it declares, in words.
        need: String,
        /// The most any sandbox has, in words.
        most: String,
    },
    /// The handler's limits are below what the component needs before it runs a line: every
    /// delivery would fail at instantiation ([`check_needs`]).
    #[error(
        "the component needs {need} before it runs, and the handler's limit `{key}` is {given}: every delivery would fail"
    )]
    LimitsTooSmall {
        /// The limit's key in `[handlers.limits]`.
        key: &'static str,
        /// What the limit is.
        given: u64,
        /// What the component needs, in words.
        need: String,
    },
    /// An internal error that is not the component's fault.
    #[error("internal error while loading: {0}")]
    Internal(String),
}

/// The sandbox pool's per-component caps wasmtime refuses a component for, each with the
/// words of its refusal ("…transitively contains N core module instances, which exceeds the
/// configured maximum of M in the pooling allocator"), its `[engine]` key and the per-delivery
/// reservation the cap may not exceed.
const POOL_CAPS: &[(&str, &str, &str)] = &[
    (
        "core module instances",
        "max_core_instances_per_component",
        "core_instances_per_delivery",
    ),
    (
        "linear memories",
        "max_memories_per_component",
        "memories_per_delivery",
    ),
    ("tables", "max_tables_per_component", "tables_per_delivery"),
];

/// A setting a refusal can tell the operator to raise, by its key: [`LoadError::with_setting_named`]
/// names it as the caller's user sets it (a configuration key, a `jobhook run` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting<'a> {
    /// A key of `[engine]` (`compile_timeout_ms`, the pool caps).
    Engine(&'a str),
    /// A key of the handler's `[handlers.limits]` (`instances`, `memory_bytes`, ...).
    HandlerLimit(&'a str),
}

impl Setting<'_> {
    /// The key, whatever its section.
    pub fn key(&self) -> &str {
        match self {
            Setting::Engine(key) | Setting::HandlerLimit(key) => key,
        }
    }
}

impl LoadError {
    /// This refusal's message, and, when a setting decided it rather than the component alone —
    /// the compile time limit, a per-component cap of the sandbox pool, a handler limit below
    /// what the component needs — which setting to raise, named by `name` (`[engine]
    /// compile_timeout_ms` for a configuration, `--compile-timeout-ms` for `jobhook run`).
    pub fn with_setting_named(&self, name: impl Fn(Setting<'_>) -> String) -> String {
        let raise = match self {
            LoadError::CompileTimeout(_) => Some(format!(
                "raise {} if the component is trusted to take that long",
                name(Setting::Engine("compile_timeout_ms"))
            )),
            LoadError::LimitsTooSmall { key, .. } => Some(format!(
                "raise {} if the component is trusted to need that much",
                name(Setting::HandlerLimit(key))
            )),
            LoadError::Invalid(message) if message.contains("in the pooling allocator") => {
                POOL_CAPS
                    .iter()
                    .find(|(words, _, _)| message.contains(words))
                    .map(|(_, cap, per_delivery)| {
                        format!(
                            "raise {} (and {}, which it may not exceed) if the component is \
                             trusted to need that many",
                            name(Setting::Engine(cap)),
                            name(Setting::Engine(per_delivery))
                        )
                    })
            }
            _ => None,
        };
        match raise {
            Some(raise) => format!("{self}; {raise}"),
            None => self.to_string(),
        }
    }
}

/// What a component needs before it runs a line, as its binary declares it: the core instances
/// its top level makes, its memories and tables, the largest initial memory and table. A
/// component that imports its memories or tables declares none of them (zero here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// Core instances its top level makes ([`crate::runtime::imports::Surface`]).
    pub core_instances: usize,
    /// Linear memories it defines.
    pub memories: u32,
    /// Tables it defines.
    pub tables: u32,
    /// Bytes of its largest memory at start.
    pub memory_bytes: u64,
    /// Elements of its largest table at start.
    pub table_elements: u64,
}

impl Needs {
    /// The needs of a compiled `component` whose top level makes `core_instances`.
    fn of(core_instances: usize, component: &Component) -> Self {
        let declared = component.resources_required();
        Needs {
            core_instances,
            memories: declared.as_ref().map_or(0, |d| d.num_memories),
            tables: declared.as_ref().map_or(0, |d| d.num_tables),
            memory_bytes: declared
                .as_ref()
                .and_then(|d| d.max_initial_memory_size)
                .unwrap_or(0)
                .saturating_mul(WASM_PAGE_BYTES),
            table_elements: declared
                .as_ref()
                .and_then(|d| d.max_initial_table_size)
                .unwrap_or(0),
        }
    }
}

impl std::fmt::Display for Needs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} core instances, {} linear memories (the largest {} bytes at start), {} tables \
             (the largest {} elements at start)",
            self.core_instances, self.memories, self.memory_bytes, self.tables, self.table_elements
        )
    }
}

/// Checks `limits` against what a component `needs` at instantiation. A limit below one of
/// these fails every delivery, so it is refused at load (by `jobhook check` too) instead. What
/// a component allocates later is its own: only the declared start is checked.
pub fn check_needs(needs: &Needs, limits: &crate::limits::Limits) -> Result<(), LoadError> {
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let short = [
        (
            "instances",
            as_u64(limits.instances),
            as_u64(needs.core_instances),
            format!("{} core instances", needs.core_instances),
        ),
        (
            "memories",
            as_u64(limits.memories),
            u64::from(needs.memories),
            format!("{} linear memories", needs.memories),
        ),
        (
            "tables",
            as_u64(limits.tables),
            u64::from(needs.tables),
            format!("{} tables", needs.tables),
        ),
        (
            "memory_bytes",
            limits.memory_bytes,
            needs.memory_bytes,
            format!("a linear memory of {} bytes", needs.memory_bytes),
        ),
        (
            "table_elements",
            limits.table_elements,
            needs.table_elements,
            format!("a table of {} elements", needs.table_elements),
        ),
    ]
    .into_iter()
    .find(|(_, given, need, _)| given < need);
    match short {
        Some((key, given, _, need)) => Err(LoadError::LimitsTooSmall { key, given, need }),
        None => Ok(()),
    }
}

/// What a component imports, grouped as the operator needs to see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    /// The version of [`WIT_PACKAGE`] its jobhook imports were built against (e.g. `0.1.0`;
    /// empty for imports without a version), also when this engine does not run that version
    /// ([`version_supported`]); `None` when it imports no jobhook interface.
    pub contract: Option<String>,
    /// Grantable capabilities it imports (`keyfactor`, `mail`, `http`).
    pub capabilities: Vec<Capability>,
    /// Always-available jobhook interfaces it imports (`properties`, `log`, `delivery`, `types`).
    pub jobhook: Vec<String>,
    /// WASI interfaces it imports (linked, but granting nothing).
    pub wasi: Vec<String>,
    /// WASI interfaces it imports that are linked inert: every call is denied ([`INERT_WASI`]).
    pub inert: Vec<String>,
    /// Imports the engine does not provide (a component with any is refused).
    pub unsupported: Vec<String>,
}

/// A component that passed the load gate.
#[derive(Clone)]
pub struct LoadedComponent {
    pre: HandlerPre<SandboxState>,
    imports: ImportSummary,
    size: usize,
    cache: Option<CacheOutcome>,
    /// What it needs before it runs a line ([`check_needs`] holds a handler's limits to it).
    needs: Needs,
}

impl LoadedComponent {
    /// The pre-instantiated component: imports resolved and type-checked once.
    pub fn pre(&self) -> &HandlerPre<SandboxState> {
        &self.pre
    }

    /// What it imports.
    pub fn imports(&self) -> &ImportSummary {
        &self.imports
    }

    /// Its size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// What the engine's AOT cache did when it was loaded (`None`: the engine has no cache, so
    /// it was compiled).
    pub fn cache_outcome(&self) -> Option<&CacheOutcome> {
        self.cache.as_ref()
    }

    /// What it needs before it runs a line.
    pub fn needs(&self) -> &Needs {
        &self.needs
    }
}

/// The result of `jobhook inspect`: everything the gate learns about a component, without
/// refusing it for missing grants.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Size in bytes.
    pub size: usize,
    /// `None` when the component fits the world; otherwise why not.
    pub world_error: Option<String>,
    /// Its imports, grouped.
    pub imports: ImportSummary,
    /// Names of its exports.
    pub exports: Vec<String>,
    /// Whether it was compiled. A component whose imports or exports, read from the binary,
    /// already rule it out is reported without compiling it.
    pub compiled: bool,
    /// What it needs before it runs a line (known once compiled).
    pub needs: Option<Needs>,
    /// Why a handler at the default `[handlers.limits]` could not run it ([`check_needs`]);
    /// `None` when the defaults suffice or it was not compiled.
    pub over_default_limits: Option<String>,
}

/// Reads the component's imports and exports from the binary, without compiling it, and
/// refuses it when they cannot fit: an import the engine does not provide or at a version it
/// does not implement, a capability `grants` does not allow (skipped when `grants` is `None`),
/// or no `run-handler` export. Milliseconds even for an 18 MB component; the compile that
/// follows checks everything again on the compiled types. Also gives the core instances its
/// top level makes, read in the same pass ([`check_needs`] compares them with the limit).
pub fn precheck(
    bytes: &[u8],
    grants: Option<&Grants>,
    options: &LoadOptions,
) -> Result<(ImportSummary, usize), LoadError> {
    check_header(bytes, options)?;
    let surface = read_surface(bytes).map_err(|e| LoadError::Invalid(e.to_string()))?;
    let (summary, problem) = classify_imports(
        surface
            .imports
            .iter()
            .map(|(name, kind)| (name.as_str(), *kind == ImportKind::Instance)),
    );
    if let Some(problem) = problem {
        return Err(problem);
    }
    if let Some(grants) = grants {
        check_grants(&summary, grants)?;
    }
    check_handler_export(&surface.exports)?;
    Ok((summary, surface.core_instances))
}

/// Checks and prepares a component for a handler with `grants`.
pub async fn load(
    engine: &Engine,
    bytes: Vec<u8>,
    grants: &Grants,
    options: &LoadOptions,
) -> Result<LoadedComponent, LoadError> {
    let size = bytes.len();
    let (_, core_instances) = precheck(&bytes, Some(grants), options)?;
    let (component, cache) = compile(engine, bytes, options).await?;
    let needs = Needs::of(core_instances, &component);
    let imports = summarize_imports(engine, &component)?;
    check_grants(&imports, grants)?;
    let pre = prepare(engine, &component)?;
    Ok(LoadedComponent {
        pre,
        imports,
        size,
        cache,
        needs,
    })
}

fn check_grants(imports: &ImportSummary, grants: &Grants) -> Result<(), LoadError> {
    for capability in &imports.capabilities {
        if !grants.allows(*capability) {
            return Err(LoadError::NotGranted {
                capability: *capability,
            });
        }
    }
    Ok(())
}

fn check_handler_export(exports: &[String]) -> Result<(), LoadError> {
    if exports.iter().any(|e| e == HANDLER_EXPORT) {
        return Ok(());
    }
    let found = if exports.is_empty() {
        "none".to_owned()
    } else {
        exports.join(", ")
    };
    Err(LoadError::WrongWorld(format!(
        "it does not export `{HANDLER_EXPORT}` (its exports: {found})"
    )))
}

/// Inspects a component: lists its imports and exports and checks it against the world,
/// compiling it only when what the binary declares can fit. Fails only when the bytes are not a
/// usable component at all.
pub async fn inspect(
    engine: &Engine,
    bytes: Vec<u8>,
    options: &LoadOptions,
) -> Result<Inspection, LoadError> {
    let size = bytes.len();
    check_header(&bytes, options)?;
    let surface = read_surface(&bytes).map_err(|e| LoadError::Invalid(e.to_string()))?;
    let (imports, problem) = classify_imports(
        surface
            .imports
            .iter()
            .map(|(name, kind)| (name.as_str(), *kind == ImportKind::Instance)),
    );
    if let Some(problem) = problem.or_else(|| check_handler_export(&surface.exports).err()) {
        return Ok(Inspection {
            size,
            world_error: Some(problem.to_string()),
            imports,
            exports: surface.exports,
            compiled: false,
            needs: None,
            over_default_limits: None,
        });
    }
    let (component, _) = compile(engine, bytes, options).await?;
    let ty = component.component_type();
    let exports = ty
        .exports(engine.wasmtime())
        .map(|(n, _)| n.escape_debug().to_string())
        .collect();
    let (imports, problem) = classify_compiled(engine, &component);
    let world_error = match problem {
        Some(e) => Some(e.to_string()),
        None => prepare(engine, &component).err().map(|e| e.to_string()),
    };
    let needs = Needs::of(surface.core_instances, &component);
    let over_default_limits = check_needs(&needs, &crate::limits::Limits::default())
        .err()
        .map(|e| {
            e.with_setting_named(|s| {
                format!(
                    "[handlers.limits] {} (--{} on jobhook run)",
                    s.key(),
                    s.key().replace('_', "-")
                )
            })
        });
    Ok(Inspection {
        size,
        world_error,
        imports,
        exports,
        compiled: true,
        needs: Some(needs),
        over_default_limits,
    })
}

/// Checks the binary's kind, then validates and compiles it off the async runtime (or loads it
/// from the engine's AOT cache, saying which).
async fn compile(
    engine: &Engine,
    bytes: Vec<u8>,
    options: &LoadOptions,
) -> Result<(Component, Option<CacheOutcome>), LoadError> {
    check_header(&bytes, options)?;
    let wasmtime_engine = engine.wasmtime().clone();
    let cache = engine.aot_cache().cloned();
    // An in-process compile cannot be cancelled; on timeout the blocking thread finishes on its
    // own (bounded by the size cap) and its result is discarded.
    let task = tokio::task::spawn_blocking(move || match cache {
        Some(cache) => cache
            .load_or_compile(&wasmtime_engine, &bytes)
            .map(|(component, outcome)| (component, Some(outcome))),
        None => Component::new(&wasmtime_engine, &bytes).map(|c| (c, None)),
    });
    match tokio::time::timeout(options.compile_timeout, task).await {
        Err(_) => Err(LoadError::CompileTimeout(options.compile_timeout)),
        Ok(Err(join)) => Err(LoadError::Internal(format!("compiler task failed: {join}"))),
        Ok(Ok(Err(e))) => {
            let message = format!("{e:#}");
            Err(larger_than_any_sandbox(&message).unwrap_or(LoadError::Invalid(message)))
        }
        Ok(Ok(Ok(compiled))) => Ok(compiled),
    }
}

/// The compiler's refusal of a memory or table whose declared start is larger than the pool's
/// room per sandbox ("…minimum byte size of N which exceeds the limit of 0x… bytes", "…minimum
/// element size of N which exceeds the limit of M"), in the operator's words; `None` for any
/// other refusal. The room is the engine's own constant, not a setting, so the words say what
/// the component must change.
fn larger_than_any_sandbox(message: &str) -> Option<LoadError> {
    let number_after = |words: &str| -> Option<u64> {
        let rest = &message[message.find(words)? + words.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    if !message.contains("pooling allocator") {
        return None;
    }
    if let Some(bytes) = number_after("minimum byte size of ") {
        return Some(LoadError::LargerThanAnySandbox {
            what: "memory",
            need: format!("a linear memory of {bytes} bytes"),
            most: format!(
                "{} bytes ({} MiB) of linear memory",
                crate::runtime::engine::MAX_MEMORY_PER_SANDBOX,
                crate::runtime::engine::MAX_MEMORY_PER_SANDBOX >> 20
            ),
        });
    }
    number_after("minimum element size of ").map(|elements| LoadError::LargerThanAnySandbox {
        what: "table",
        need: format!("a table of {elements} elements"),
        most: format!("{} elements in a table", crate::limits::MAX_TABLE_ELEMENTS),
    })
}

/// Size, magic and binary-kind checks, before any parsing.
fn check_header(bytes: &[u8], options: &LoadOptions) -> Result<(), LoadError> {
    if bytes.len() > options.max_bytes {
        return Err(LoadError::TooLarge {
            size: bytes.len(),
            max: options.max_bytes,
        });
    }
    if bytes.is_empty() {
        return Err(LoadError::Empty);
    }
    let (Some(magic), Some(version)) = (bytes.get(0..4), bytes.get(4..8)) else {
        return Err(LoadError::NotWasm);
    };
    if magic != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // Bytes 4..8 are a little-endian version (u16) and layer (u16): 1/0 is a core module,
    // 0x0d/1 the component-model binary format.
    match version {
        [0x01, 0x00, 0x00, 0x00] => Err(LoadError::CoreModule),
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        other => Err(LoadError::UnknownBinary(u32::from_le_bytes([
            other.first().copied().unwrap_or(0),
            other.get(1).copied().unwrap_or(0),
            other.get(2).copied().unwrap_or(0),
            other.get(3).copied().unwrap_or(0),
        ]))),
    }
}

/// Resolves imports against the linker and checks the exports against the world. An import the
/// linker cannot satisfy is reported as that import's mismatch ([`import_mismatch`]), anything
/// else as the exports not fitting the world.
fn prepare(engine: &Engine, component: &Component) -> Result<HandlerPre<SandboxState>, LoadError> {
    let linker = linker(engine).map_err(|e| LoadError::Internal(format!("{e:#}")))?;
    let pre = linker.instantiate_pre(component).map_err(|e| {
        let message = format!("{e:#}");
        import_mismatch(&message).unwrap_or(LoadError::WrongWorld(message))
    })?;
    HandlerPre::new(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))
}

/// The linker's words for an import it has no match for: "component imports instance `NAME`,
/// but a matching implementation was not found in the linker: DETAIL" (wasmtime 48; the test
/// `an_import_of_an_interface_the_engine_lacks_is_named_with_what_to_do` in
/// `tests/tests/hostile.rs` holds this to the real linker).
const LINKER_IMPORT_WORDS: (&str, &str) = ("component imports instance `", "`");

/// An [`LoadError::ImportMismatch`] for the linker's refusal of an import, with what to do for
/// its kind (jobhook's own interfaces: bindings from this engine's WIT; WASI: the release the
/// engine links); `None` when the refusal is not about an import.
fn import_mismatch(message: &str) -> Option<LoadError> {
    let (opening, closing) = LINKER_IMPORT_WORDS;
    let start = message.find(opening)? + opening.len();
    let rest = message.get(start..)?;
    let end = rest.find(closing)?;
    let import = rest.get(..end)?.to_owned();
    let detail = rest
        .get(end + closing.len()..)
        .and_then(|after| after.split_once(": "))
        .map(|(_, detail)| detail.to_owned())
        .unwrap_or_else(|| "no matching implementation".to_owned());
    let hint = if import.starts_with(WIT_PACKAGE) {
        format!(
            "the component was built against a {WIT_PACKAGE} WIT that differs from this \
             engine's: make its bindings again from wit/ of this engine, unedited (jobhook \
             runs {})",
            supported_versions()
        )
    } else {
        format!(
            "jobhook links WASI {WASI_RELEASE} as wasmtime-wasi implements it (the \
             `wasm32-wasip2` target): build the handler against that WASI release, importing \
             only the interfaces and functions it has"
        )
    };
    Some(LoadError::ImportMismatch {
        import,
        detail,
        hint,
    })
}

/// The compiled component's imports, sorted as [`classify_imports`] does.
fn classify_compiled(engine: &Engine, component: &Component) -> (ImportSummary, Option<LoadError>) {
    let ty = component.component_type();
    let names: Vec<(String, bool)> = ty
        .imports(engine.wasmtime())
        .map(|(name, item)| {
            (
                name.escape_debug().to_string(),
                matches!(item.ty, ComponentItem::ComponentInstance(_)),
            )
        })
        .collect();
    classify_imports(names.iter().map(|(n, i)| (n.as_str(), *i)))
}

/// Sorts the compiled component's imports, refusing anything the engine does not provide.
fn summarize_imports(engine: &Engine, component: &Component) -> Result<ImportSummary, LoadError> {
    match classify_compiled(engine, component) {
        (_, Some(problem)) => Err(problem),
        (summary, None) => Ok(summary),
    }
}

/// Sorts every import (its name, and whether it is an instance) into capability / jobhook /
/// WASI / inert WASI; what the engine does not provide, or not at this version, goes to
/// `unsupported`, and the first such import is returned as the reason to refuse the component.
fn classify_imports<'a>(
    imports: impl IntoIterator<Item = (&'a str, bool)>,
) -> (ImportSummary, Option<LoadError>) {
    let mut summary = ImportSummary::default();
    let mut first_problem = None;
    for (name, is_instance) in imports {
        match classify_import(name, is_instance, &mut summary) {
            Ok(()) => {}
            Err(problem) => {
                summary.unsupported.push(name.to_owned());
                first_problem.get_or_insert(problem);
            }
        }
    }
    summary.capabilities.sort();
    summary.capabilities.dedup();
    (summary, first_problem)
}

/// Puts one import where it belongs in `summary`, or says why the engine cannot provide it.
fn classify_import(
    name: &str,
    is_instance: bool,
    summary: &mut ImportSummary,
) -> Result<(), LoadError> {
    if !is_instance {
        return Err(LoadError::NotProvided {
            import: name.to_owned(),
            hint: "handlers may import only interfaces (jobhook:handler/* and WASI), not bare functions, types, modules or components".into(),
        });
    }
    if let Some(rest) = name
        .strip_prefix(WIT_PACKAGE)
        .and_then(|r| r.strip_prefix('/'))
    {
        let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
        if !version_supported(version) {
            // Recorded all the same: `inspect` shows what the component was built against.
            summary.contract.get_or_insert_with(|| version.to_owned());
            return Err(LoadError::UnsupportedVersion {
                import: name.to_owned(),
                supported: supported_versions(),
            });
        }
        match &summary.contract {
            None => summary.contract = Some(version.to_owned()),
            Some(first) if first != version => {
                return Err(LoadError::MixedVersions {
                    first: first.clone(),
                    second: version.to_owned(),
                });
            }
            Some(_) => {}
        }
        if let Some(capability) = Capability::from_interface(interface) {
            summary.capabilities.push(capability);
        } else if ALWAYS_AVAILABLE.contains(&interface) {
            summary.jobhook.push(interface.to_owned());
        } else {
            return Err(LoadError::NotProvided {
                import: name.to_owned(),
                hint: format!("{WIT_PACKAGE} has no interface `{interface}` in this engine"),
            });
        }
    } else if let Some((_, hint)) = REFUSED_WASI.iter().find(|(p, _)| name.starts_with(p)) {
        return Err(LoadError::NotProvided {
            import: name.to_owned(),
            hint: (*hint).to_owned(),
        });
    } else if INERT_WASI
        .iter()
        .chain(PROVIDED_WASI)
        .any(|p| name.starts_with(p))
    {
        check_wasi_release(name)?;
        let inert = INERT_WASI.iter().any(|p| name.starts_with(p));
        let list = if inert {
            &mut summary.inert
        } else {
            &mut summary.wasi
        };
        list.push(name.to_owned());
    } else {
        return Err(LoadError::NotProvided {
            import: name.to_owned(),
            hint: "only jobhook:handler/* interfaces and WASI cli, io, clocks, random, filesystem and (inert) sockets are available".into(),
        });
    }
    Ok(())
}

/// Refuses a WASI import of another release than [`WASI_RELEASE`] (`wasi:cli/environment@0.3.0`,
/// an unversioned `wasi:cli/environment`): the linker could never satisfy it, and saying so
/// before compiling spares an 18 MB component its compile.
fn check_wasi_release(name: &str) -> Result<(), LoadError> {
    let version = name.split_once('@').map(|(_, v)| v).unwrap_or("");
    let release = version
        .strip_prefix(WASI_RELEASE)
        .is_some_and(|rest| rest.starts_with('.'));
    if release {
        return Ok(());
    }
    let built_for = if version.is_empty() {
        "no WASI release (the import has no version)".to_owned()
    } else {
        format!("WASI {version}")
    };
    Err(LoadError::NotProvided {
        import: name.to_owned(),
        hint: format!(
            "jobhook links WASI {WASI_RELEASE} (the `wasm32-wasip2` target), and this import is \
             of {built_for}: build the handler for WASI {WASI_RELEASE}"
        ),
    })
}

/// Whether a component built against `version` of the handler package can run here: the
/// `major.minor` of one of the [`SUPPORTED_VERSIONS`], at or below its patch level.
pub fn version_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    let (Some(Some(major)), Some(Some(minor)), Some(Some(patch)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    SUPPORTED_VERSIONS
        .iter()
        .any(|&(ma, mi, pa)| major == ma && minor == mi && patch <= pa)
}

/// [`SUPPORTED_VERSIONS`] for a message: `0.1.0 or 0.2.0`.
pub fn supported_versions() -> String {
    let all: Vec<String> = SUPPORTED_VERSIONS
        .iter()
        .map(|(ma, mi, pa)| format!("{ma}.{mi}.{pa}"))
        .collect();
    all.join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks() {
        let o = LoadOptions::default();
        assert_eq!(check_header(b"", &o), Err(LoadError::Empty));
        assert_eq!(check_header(b"\0asm", &o), Err(LoadError::NotWasm));
        assert_eq!(check_header(b"GIF89a\0\0\0", &o), Err(LoadError::NotWasm));
        assert_eq!(
            check_header(b"\0asm\x01\0\0\0", &o),
            Err(LoadError::CoreModule)
        );
        // Both hints name the release build, whose output is the `.../release/...wasm` every
        // other message and the README point to.
        let not_wasm = LoadError::NotWasm.to_string();
        assert!(
            not_wasm.contains("`cargo build --release --target wasm32-wasip2`"),
            "{not_wasm}"
        );
        let core = LoadError::CoreModule.to_string();
        assert!(core.contains("wasm32-wasip2"), "{core}");
        assert!(
            core.contains("`cargo build --release --target wasm32-wasip2`"),
            "{core}"
        );
        assert!(core.contains("crate-type = [\"cdylib\"]"), "{core}");
        assert_eq!(check_header(b"\0asm\x0d\0\x01\0", &o), Ok(()));
        assert!(matches!(
            check_header(b"\0asm\x02\0\0\0", &o),
            Err(LoadError::UnknownBinary(2))
        ));
        let small = LoadOptions {
            max_bytes: 4,
            ..LoadOptions::default()
        };
        assert!(matches!(
            check_header(b"\0asm\x0d\0\x01\0", &small),
            Err(LoadError::TooLarge { size: 8, max: 4 })
        ));
    }

    /// The package version a WIT file declares (`package jobhook:handler@X;`).
    fn declared(wit: &str) -> Option<String> {
        wit.lines()
            .find_map(|l| l.trim().strip_prefix("package jobhook:handler@"))
            .map(|v| v.trim_end_matches(';').to_owned())
    }

    #[test]
    fn the_wit_files_are_the_versions_the_engine_runs() {
        use sha2::{Digest, Sha256};
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let fmt = |(a, b, c): (u64, u64, u64)| format!("{a}.{b}.{c}");
        let current = std::fs::read_to_string(wit.join("jobhook.wit")).unwrap();
        assert_eq!(declared(&current), Some(fmt(WIT_VERSION)));
        // Every released version is kept under wit/released/<version>/ and is run.
        let mut released: Vec<String> = std::fs::read_dir(wit.join("released"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        released.sort();
        for version in &released {
            let text =
                std::fs::read_to_string(wit.join("released").join(version).join("jobhook.wit"))
                    .unwrap();
            assert_eq!(declared(&text).as_ref(), Some(version));
            assert!(version_supported(version), "{version} is not run");
        }
        let mut supported: Vec<String> = SUPPORTED_VERSIONS.iter().map(|v| fmt(*v)).collect();
        supported.retain(|v| *v != fmt(WIT_VERSION));
        assert_eq!(released, supported);
        // A released version is frozen: 0.1.0 is byte for byte what was released.
        let frozen = std::fs::read(wit.join("released/0.1.0/jobhook.wit")).unwrap();
        let digest: String = Sha256::digest(&frozen)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest,
            "b9d3fc2d3005c1eb26203be3e721d79a5a3c65ad72b6ed319fc6917a808f5217"
        );
    }

    #[test]
    fn the_contract_version_is_recorded_and_must_be_one() {
        let (summary, problem) = classify_imports([
            ("jobhook:handler/log@0.1.0", true),
            ("jobhook:handler/delivery@0.1.0", true),
            ("wasi:cli/stdout@0.2.6", true),
        ]);
        assert_eq!(problem, None);
        assert_eq!(summary.contract.as_deref(), Some("0.1.0"));

        let (summary, problem) = classify_imports([("wasi:cli/stdout@0.2.6", true)]);
        assert_eq!(problem, None);
        assert_eq!(summary.contract, None);

        let (_, problem) = classify_imports([
            ("jobhook:handler/log@0.1.0", true),
            ("jobhook:handler/delivery@0.2.0", true),
        ]);
        assert_eq!(
            problem,
            Some(LoadError::MixedVersions {
                first: "0.1.0".into(),
                second: "0.2.0".into()
            })
        );

        // A version this engine does not run is recorded all the same (`inspect` shows it),
        // and refused.
        for (import, recorded) in [
            ("jobhook:handler/log@0.3.0", "0.3.0"),
            ("jobhook:handler/log@1.0.0", "1.0.0"),
            ("jobhook:handler/log", ""),
        ] {
            let (summary, problem) = classify_imports([(import, true)]);
            assert_eq!(summary.contract.as_deref(), Some(recorded), "{import}");
            assert!(
                matches!(problem, Some(LoadError::UnsupportedVersion { .. })),
                "{import}: {problem:?}"
            );
        }
    }

    /// WASI imports are WASI 0.2's, at any patch level; another release is refused before
    /// compiling, inert sockets included.
    #[test]
    fn wasi_imports_must_be_of_the_linked_release() {
        for fits in [
            "wasi:cli/stdout@0.2.0",
            "wasi:io/streams@0.2.99",
            "wasi:sockets/tcp@0.2.6",
        ] {
            let (_, problem) = classify_imports([(fits, true)]);
            assert_eq!(problem, None, "{fits}");
        }
        for refused in [
            "wasi:cli/stdout@0.3.0",
            "wasi:io/streams@0.20.1",
            "wasi:io/streams",
            "wasi:sockets/tcp@0.3.0-rc-2025-08-15",
            "wasi:clocks/wall-clock@1.0.0",
        ] {
            let (summary, problem) = classify_imports([(refused, true)]);
            assert!(
                matches!(&problem, Some(LoadError::NotProvided { import, .. }) if import == refused),
                "{refused}: {problem:?}"
            );
            assert_eq!(summary.unsupported, vec![refused.to_owned()]);
        }
    }

    /// The linker's refusal of an import becomes that import's mismatch, with what to do for
    /// its kind; any other refusal is left to the caller.
    #[test]
    fn the_linkers_import_refusals_are_named() {
        let wasi = import_mismatch(
            "component imports instance `wasi:cli/nonexistent@0.2.6`, but a matching \
             implementation was not found in the linker: instance export `probe` has the wrong \
             type: function implementation is missing",
        );
        match wasi {
            Some(LoadError::ImportMismatch {
                import,
                detail,
                hint,
            }) => {
                assert_eq!(import, "wasi:cli/nonexistent@0.2.6");
                assert!(detail.starts_with("instance export `probe`"), "{detail}");
                assert!(hint.contains("WASI 0.2"), "{hint}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(import_mismatch("expected `record` found `string`"), None);
    }

    #[test]
    fn versions() {
        assert!(version_supported("0.1.0"));
        assert!(version_supported("0.2.0"));
        assert!(!version_supported("0.1.1"));
        assert!(!version_supported("0.2.1"));
        assert!(!version_supported("0.3.0"));
        assert!(!version_supported("0.0.1"));
        assert!(!version_supported("1.1.0"));
        assert!(!version_supported("1.2.0"));
        assert!(!version_supported(""));
        assert!(!version_supported("0.1"));
        assert!(!version_supported("0.1.0.0"));
        assert!(!version_supported("0.1.x"));
    }
}
