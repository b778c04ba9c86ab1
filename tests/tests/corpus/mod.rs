//! The hostile-handler corpus shared by `hostile.rs`, `stream.rs` and the fuzz targets: the
//! engine and handler specs the tests use, and the hand-written components for shapes Rust cannot
//! express (invalid values across the boundary, table growth, oversized memories, instance
//! bombs, foreign imports).
//!
//! Those components are real components of the `jobhook:handler` world: a core module written in
//! WAT with the world's exact core ABI (`run-handler`, `cabi_realloc`, `memory`), given the
//! world's metadata and wrapped by `wit-component`, the same way `wasm32-wasip2` builds wrap
//! rustc's output.

#![allow(dead_code)] // each test binary uses its own part of the corpus

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jobhook::capabilities::properties::Properties;
use jobhook::capabilities::{Grants, Services};
use jobhook::{
    Delivery, Engine, JobContext, LoadError, LoadOptions, Outcome, SandboxSpec, SandboxedHandler,
};
use jobhook_testkit::{guest_bytes, sample_context_json, workspace_root};
use wit_component::{ComponentEncoder, StringEncoding, embed_component_metadata};
use wit_parser::Resolve;

/// Time budget of the runs that are meant to time out: short, so the corpus stays fast.
pub const TIMEOUT: Duration = Duration::from_millis(300);

/// Time budget of every other run. Wall-clock budgets include time spent waiting for a CPU, and
/// CI runs many sandboxes on two cores: a memory bomb that needs 20 ms alone must not be
/// recorded as timed out because it was starved, so runs meant to hit another limit get room.
pub const BUDGET: Duration = Duration::from_secs(5);

/// Memory budget of hostile runs in the tests.
pub const MEMORY: u64 = 16 * 1024 * 1024;

/// How far past its time budget any run may end before the test calls it a hang. Generous, so a
/// loaded CI machine does not make the tests flaky; a real hang is minutes, not seconds.
pub const SLACK: Duration = Duration::from_secs(2);

/// One engine per test process, as in production: every test's sandboxes share it, so a hostile
/// run that damaged it would fail the healthy runs of every other test.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::new(64).expect("engine"))
}

/// [`spec`] with the short [`TIMEOUT`], for runs meant to time out.
pub fn timed(name: &str) -> SandboxSpec {
    let mut spec = spec(name, &[]);
    spec.limits.timeout = TIMEOUT;
    spec
}

/// A spec with every capability granted (the flood guests need them), the test limits
/// ([`BUDGET`], [`MEMORY`]) and the given properties.
pub fn spec(name: &str, properties: &[(&str, &str)]) -> SandboxSpec {
    let mut spec = SandboxSpec::new(name);
    spec.grants = Grants::permissive();
    spec.limits.timeout = BUDGET;
    spec.limits.memory_bytes = MEMORY;
    spec.properties = Properties::new(
        properties
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    spec
}

/// Loads `bytes` through the load gate, on the shared engine, with no services configured.
pub async fn load(bytes: Vec<u8>, spec: SandboxSpec) -> Result<SandboxedHandler, LoadError> {
    SandboxedHandler::load(
        engine(),
        &Services::default(),
        bytes,
        spec,
        &LoadOptions::default(),
    )
    .await
}

/// The sample context.
pub fn context() -> JobContext {
    JobContext::from_json_value(&sample_context_json()).expect("sample context")
}

/// Runs `handler` once on the sample context and checks it ended within its time budget.
pub async fn invoke(handler: &SandboxedHandler) -> Outcome {
    let started = Instant::now();
    let outcome = handler.invoke(&context(), Delivery::default()).await;
    let bound = handler.spec().limits.timeout + SLACK;
    assert!(
        started.elapsed() <= bound && outcome.duration <= bound,
        "{}: the run took {:?} (recorded {:?}); its budget is {:?}",
        handler.spec().name,
        started.elapsed(),
        outcome.duration,
        handler.spec().limits.timeout
    );
    outcome
}

/// Loads and runs a hostile component once, then proves the engine still runs a healthy handler
/// correctly. Returns the hostile run's outcome for the caller's precise assertions.
pub async fn run_hostile(bytes: Vec<u8>, spec: SandboxSpec) -> Outcome {
    let name = spec.name.clone();
    let handler = load(bytes, spec)
        .await
        .unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let outcome = invoke(&handler).await;
    assert_healthy().await;
    outcome
}

/// Loads a component that must be refused, then proves the engine still runs a healthy handler.
pub async fn refuse(bytes: Vec<u8>, spec: SandboxSpec) -> LoadError {
    let name = spec.name.clone();
    let error = match load(bytes, spec).await {
        Ok(_) => panic!("{name}: the component was accepted"),
        Err(e) => e,
    };
    assert_healthy().await;
    error
}

/// The healthy handler (`log-context`), loaded once per test process.
pub async fn healthy() -> &'static SandboxedHandler {
    static HEALTHY: tokio::sync::OnceCell<SandboxedHandler> = tokio::sync::OnceCell::const_new();
    HEALTHY
        .get_or_init(|| async {
            let mut s = spec("log-context", &[]);
            s.grants = Grants::default();
            load(guest_bytes("log-context"), s)
                .await
                .expect("log-context loads")
        })
        .await
}

/// Runs the healthy handler and checks its outcome is exactly right: it succeeds and logs every
/// field of the context, one line each, and nothing else goes wrong.
pub async fn assert_healthy() {
    let outcome = healthy()
        .await
        .invoke(&context(), Delivery::default())
        .await;
    assert!(
        outcome.kind.is_success(),
        "the healthy handler failed after a hostile run: {outcome:?}"
    );
    // The eleven context fields, then the delivery's Source and Message.
    assert_eq!(outcome.logs.len(), 13, "{:?}", outcome.logs);
    assert_eq!(
        outcome.logs[4].message,
        "JobId: 0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01"
    );
    assert_eq!(outcome.logs_dropped, 0);
    assert_eq!(outcome.output_dropped, 0);
}

/// The core import of `jobhook:handler/log.log` at the current contract version, for core
/// modules wrapped with [`handler_wit`] (`log(level, ptr, len)`).
pub const LOG_IMPORT: &str =
    r#"(import "jobhook:handler/log@0.2.0" "log" (func $log (param i32 i32 i32)))"#;

/// The `jobhook:handler` WIT package of this repository, resolved.
pub fn handler_wit() -> (Resolve, wit_parser::WorldId) {
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_dir(workspace_root().join("wit"))
        .expect("wit/ parses");
    let world = resolve
        .select_world(&[package], Some("handler"))
        .expect("world handler");
    (resolve, world)
}

/// Wraps a core module (binary) that implements `world` of `resolve` into a component.
pub fn encode_component(
    mut module: Vec<u8>,
    resolve: &Resolve,
    world: wit_parser::WorldId,
) -> Vec<u8> {
    embed_component_metadata(&mut module, resolve, world, StringEncoding::UTF8)
        .expect("embed metadata");
    ComponentEncoder::default()
        .validate(true)
        .module(&module)
        .expect("module fits the world")
        .encode()
        .expect("component encodes")
}

/// A core module of the handler world, written in WAT. Every part has a sane default, so a case
/// replaces only the part that misbehaves; [`CoreModule::default`] itself is a well-behaved
/// handler that returns `ok` (the result area at address 0 is all zeros).
#[derive(Clone, Copy)]
pub struct CoreModule<'a> {
    /// Import declarations.
    pub imports: &'a str,
    /// The memory declaration; must export `memory`.
    pub memory: &'a str,
    /// Body of `cabi_realloc (param $old i32 $old_size i32 $align i32 $size i32) (result i32)`.
    pub realloc: &'a str,
    /// Body of `run-handler (param $context i32) (result i32)`; the result is the address of
    /// the `result<_, string>` area (discriminant byte, then string pointer and length at +4, +8).
    pub run: &'a str,
    /// Anything else: data segments, tables, helper functions, a start function, post-return.
    pub extra: &'a str,
}

impl Default for CoreModule<'_> {
    fn default() -> Self {
        CoreModule {
            imports: "",
            memory: r#"(memory (export "memory") 1)"#,
            // A bump allocator from 4 KiB up: the host copies the context in through it.
            realloc: "(local $p i32)
                (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 7)) (i32.const -8)))
                (global.set $heap (i32.add (local.get $p) (local.get $size)))
                (local.get $p)",
            run: "(i32.const 0)",
            extra: "",
        }
    }
}

impl CoreModule<'_> {
    /// The module's WAT text.
    pub fn wat(&self) -> String {
        let CoreModule {
            imports,
            memory,
            realloc,
            run,
            extra,
        } = self;
        format!(
            r#"(module
  {imports}
  {memory}
  (global $heap (mut i32) (i32.const 4096))
  (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    {realloc})
  (func (export "run-handler") (param $context i32) (result i32)
    {run})
  {extra}
)"#
        )
    }

    /// The module wrapped as a `jobhook:handler` component.
    pub fn component(&self) -> Vec<u8> {
        let module = wat::parse_str(self.wat()).unwrap_or_else(|e| panic!("{e}\n{}", self.wat()));
        let (resolve, world) = handler_wit();
        encode_component(module, &resolve, world)
    }
}

/// A component whose `run-handler` returns a `result<_, string>` area laid out at address 16
/// from `area` (12 bytes: discriminant, pad, pointer, length) with `payload` at address 64.
pub fn returning(area: &str, payload: &str) -> Vec<u8> {
    let extra = format!(r#"(data (i32.const 16) "{area}") (data (i32.const 64) "{payload}")"#);
    CoreModule {
        run: "(i32.const 16)",
        extra: &extra,
        ..CoreModule::default()
    }
    .component()
}

/// `component` with `count` extra core instances of `module_wat` appended (an instance bomb when
/// `count` is large). Done on the printed text: appended items take the next indices, so nothing
/// already in the component is renumbered.
pub fn with_extra_instances(component: &[u8], module_wat: &str, count: usize) -> Vec<u8> {
    let instances = "(core instance (instantiate $bomb))\n".repeat(count);
    extended(
        component,
        &format!("(core module $bomb {module_wat})\n{instances}"),
    )
}

/// Like [`with_extra_instances`], with the `count` instances made inside a nested component the
/// outer one instantiates: the load gate counts only the top level's core instances
/// (`loader::check_needs`), so such a bomb is met by the sandbox's limiter at instantiation.
pub fn with_nested_extra_instances(component: &[u8], module_wat: &str, count: usize) -> Vec<u8> {
    let instances = "(core instance (instantiate $bomb))\n".repeat(count);
    extended(
        component,
        &format!(
            "(component $nest (core module $bomb {module_wat})\n{instances})\n\
             (instance (instantiate $nest))\n"
        ),
    )
}

/// `component` with `wat` added at the end of its top level.
fn extended(component: &[u8], wat: &str) -> Vec<u8> {
    let text = wasmprinter::print_bytes(component).expect("print component");
    let end = text
        .trim_end()
        .rfind(')')
        .expect("component text ends with )");
    let mut extended = text[..end].to_owned();
    extended.push_str(wat);
    extended.push(')');
    wat::parse_str(&extended).expect("extended component parses")
}
