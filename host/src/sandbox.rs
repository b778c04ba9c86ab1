//! One handler's sandboxes: a fresh `Store` and instance per invocation, with the handler's
//! limits, its granted capabilities and nothing else.
//!
//! Where each limit is enforced:
//! - time: the epoch deadline callback interrupts guest code at the deadline, and an outer
//!   `tokio::time::timeout` also covers time spent waiting in host calls ([`Handler::invoke`]);
//! - memory, tables, instances: [`SandboxLimiter`], installed on every store;
//! - wasm stack: the engine's `max_wasm_stack` ([`crate::engine`]);
//! - bytes crossing into the host: `Store::set_hostcall_fuel`;
//! - stdout/stderr, log lines, capability calls: the capability state of the store.
//!
//! The store is dropped at the end of every invocation, whatever happened, so no state crosses
//! from one invocation to the next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Store, Trap, UpdateDeadline, WasmBacktrace};
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxView, WasiView};

use crate::bindings::jobhook::handler as wit;
use crate::capabilities::delivery::DeliveryInfo;
use crate::capabilities::http::HttpCapability;
use crate::capabilities::keyfactor::KeyfactorCapability;
use crate::capabilities::log::LogCollector;
use crate::capabilities::mail::MailCapability;
use crate::capabilities::properties::Properties;
use crate::capabilities::stdio::CappedOutput;
use crate::capabilities::{CallBudget, Grants, Services};
use crate::context::{JobContext, JobResult, OperationType};
use crate::engine::Engine;
use crate::limits::{LimitExceeded, LimitKind, Limits, SandboxLimiter};
use crate::loader::{self, LoadError, LoadOptions, LoadedComponent};
use crate::outcome::{MAX_REASON_BYTES, Outcome, OutcomeKind, truncate};

/// Resource handles (streams, pollables) one sandbox may hold. A Rust handler uses a handful for
/// stdio; the cap stops a guest from growing the host-side table without bound.
const MAX_RESOURCE_HANDLES: usize = 256;

/// Random bytes a guest may ask for in one call (wasmtime's default is 64 MiB, which a hostile
/// guest could use to make the host allocate).
const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// Slack on top of the time budget before the outer timeout drops the call. The epoch deadline
/// normally fires first (within one [`crate::engine::EPOCH_TICK`]); the outer timeout catches
/// time spent in host calls. Kept at 30 ms (it used to be three 10 ms ticks) so that on a busy
/// machine the epoch interrupt, which records a backtrace, still wins the race.
const TIMEOUT_GRACE: Duration = Duration::from_millis(30);

/// Guest frames kept in a trap's backtrace.
const MAX_BACKTRACE_FRAMES: usize = 32;

/// The state of one sandbox: WASI (locked down) and the handler's capabilities.
pub struct SandboxState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: SandboxLimiter,
    properties: Properties,
    log: LogCollector,
    delivery: DeliveryInfo,
    keyfactor: KeyfactorCapability,
    mail: MailCapability,
    http: HttpCapability,
}

impl WasiView for SandboxState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// `jobhook:handler/types` defines types only; its host side is empty.
impl wit::types::Host for SandboxState {}

/// The linker every handler is instantiated against: WASI p2 (whose context grants nothing) and
/// the `jobhook:handler` interfaces. Which of them a component may actually import is decided by
/// the load gate in [`crate::loader`].
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<SandboxState>> {
    let mut linker = Linker::new(engine.wasmtime());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wit::types::add_to_linker::<_, HasSelf<SandboxState>>(&mut linker, |s| s)?;
    wit::properties::add_to_linker::<_, HasSelf<Properties>>(&mut linker, |s| &mut s.properties)?;
    wit::log::add_to_linker::<_, HasSelf<LogCollector>>(&mut linker, |s| &mut s.log)?;
    wit::delivery::add_to_linker::<_, HasSelf<DeliveryInfo>>(&mut linker, |s| &mut s.delivery)?;
    wit::keyfactor::add_to_linker::<_, HasSelf<KeyfactorCapability>>(&mut linker, |s| {
        &mut s.keyfactor
    })?;
    wit::mail::add_to_linker::<_, HasSelf<MailCapability>>(&mut linker, |s| &mut s.mail)?;
    wit::http::add_to_linker::<_, HasSelf<HttpCapability>>(&mut linker, |s| &mut s.http)?;
    Ok(linker)
}

/// What the operator configured for one handler.
#[derive(Debug, Clone)]
pub struct HandlerSpec {
    /// Unique name of this handler instance.
    pub name: Arc<str>,
    /// Its properties.
    pub properties: Properties,
    /// Its limits.
    pub limits: Limits,
    /// The capabilities it may import.
    pub grants: Grants,
}

impl HandlerSpec {
    /// A spec with default limits, no properties and no grants.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        HandlerSpec {
            name: name.into(),
            properties: Properties::default(),
            limits: Limits::default(),
            grants: Grants::default(),
        }
    }
}

/// Which delivery an invocation is.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// 1 on the first attempt.
    pub attempt: u32,
    /// The engine's event id, when there is one.
    pub event_id: Option<String>,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            attempt: 1,
            event_id: None,
        }
    }
}

/// A loaded, checked handler, ready to be invoked any number of times.
pub struct Handler {
    spec: HandlerSpec,
    engine: Engine,
    services: Services,
    component: LoadedComponent,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Handler {
    /// Loads a component through the load gate (see [`crate::loader`]) for `spec`.
    pub async fn load(
        engine: &Engine,
        services: &Services,
        bytes: Vec<u8>,
        spec: HandlerSpec,
        options: &LoadOptions,
    ) -> Result<Self, LoadError> {
        let component = loader::load(engine, bytes, &spec.grants, options).await?;
        Ok(Handler {
            spec,
            engine: engine.clone(),
            services: services.clone(),
            component,
        })
    }

    /// The operator's configuration of this handler.
    pub fn spec(&self) -> &HandlerSpec {
        &self.spec
    }

    /// The loaded component.
    pub fn component(&self) -> &LoadedComponent {
        &self.component
    }

    /// Runs `run-handler` once in a fresh sandbox and records what happened. Never fails: every
    /// way the handler can misbehave ends up in the outcome.
    pub async fn invoke(&self, context: &JobContext, delivery: Delivery) -> Outcome {
        let start = Instant::now();
        let limits = &self.spec.limits;
        let stdout = CappedOutput::new(limits.output_bytes);
        let stderr = CappedOutput::new(limits.output_bytes);
        let mut store = self.new_store(delivery, &stdout, &stderr);

        let deadline = start + limits.timeout;
        store.set_epoch_deadline(1);
        // At every tick of guest code: stop at the deadline; otherwise give the thread back,
        // for a while if this delivery is one of too many long runners (crate::cpu_share).
        let mut ticks = self.engine.cpu_share().sandbox();
        store.epoch_deadline_callback(move |_| {
            let now = Instant::now();
            if now >= deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            let pause: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match ticks.on_tick() {
                None => Box::pin(tokio::task::yield_now()),
                Some(pause) => Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                    (now + pause).min(deadline),
                ))),
            };
            Ok(UpdateDeadline::YieldCustom(1, pause))
        });

        let wit_context = to_wit(context);
        let pre = self.component.pre().clone();
        let budget = limits.timeout + TIMEOUT_GRACE;
        // Owns everything it touches, so that it can run on the engine's sandbox threads; gives
        // the store back for the outcome.
        let run = async move {
            let call = async {
                let instance = pre.instantiate_async(&mut store).await?;
                instance.call_run_handler(&mut store, &wit_context).await
            };
            let result = tokio::time::timeout(budget, call).await;
            (result, store)
        };
        let ran = match self.engine.sandbox_threads() {
            Some(threads) => threads.run(run).await,
            None => Ok(run.await),
        };
        let stderr_text = stderr.contents();
        let (kind, state) = match ran {
            Ok((result, store)) => {
                let kind = match result {
                    Err(_elapsed) => timed_out(limits),
                    Ok(Ok(Ok(()))) => OutcomeKind::Succeeded,
                    Ok(Ok(Err(reason))) => OutcomeKind::HandlerFailed {
                        reason: truncate(reason, MAX_REASON_BYTES),
                    },
                    Ok(Err(error)) => classify(&error, &stderr_text, limits),
                };
                (kind, Some(store.into_data()))
            }
            // The sandbox task panicked (a host bug) or the runtime is shutting down; the store
            // went with it.
            Err(join) => (
                OutcomeKind::EngineError {
                    message: format!("the sandbox task did not complete: {join}"),
                },
                None,
            ),
        };
        let duration = start.elapsed();
        let memory_bytes = state.as_ref().map_or(0, |s| s.limiter.memory_used());
        let (logs, logs_dropped) = state.map(|s| s.log.finish()).unwrap_or_default();
        if !kind.is_success() {
            tracing::warn!(
                handler = %self.spec.name,
                class = kind.class(),
                duration_ms = duration.as_secs_f64() * 1000.0,
                "handler did not succeed: {kind}"
            );
        }
        Outcome {
            kind,
            duration,
            logs,
            logs_dropped,
            stdout: stdout.contents(),
            stderr: stderr_text,
            output_dropped: stdout.dropped().saturating_add(stderr.dropped()),
            memory_bytes,
        }
    }

    fn new_store(
        &self,
        delivery: Delivery,
        stdout: &CappedOutput,
        stderr: &CappedOutput,
    ) -> Store<SandboxState> {
        let limits = &self.spec.limits;
        let grants = &self.spec.grants;
        // No args, no env, no preopens, no sockets, no name lookup: WASI is linked but empty.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCE_HANDLES);
        let state = SandboxState {
            wasi,
            table,
            limiter: SandboxLimiter::new(limits),
            properties: self.spec.properties.clone(),
            log: LogCollector::new(Arc::clone(&self.spec.name), limits),
            delivery: DeliveryInfo {
                attempt: delivery.attempt,
                event_id: delivery.event_id,
                handler_name: Arc::clone(&self.spec.name),
            },
            keyfactor: KeyfactorCapability::new(
                CallBudget::new(LimitKind::KeyfactorCalls, limits.keyfactor_calls),
                grants.keyfactor.clone(),
                self.services.keyfactor.clone(),
            ),
            mail: MailCapability::new(
                CallBudget::new(LimitKind::MailCalls, limits.mail_calls),
                grants.mail.clone(),
                self.services.mail.clone(),
            ),
            http: HttpCapability::new(
                CallBudget::new(LimitKind::HttpCalls, limits.http_calls),
                grants.http.clone(),
                self.services.http.clone(),
            ),
        };
        let mut store = Store::new(self.engine.wasmtime(), state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(limits.hostcall_bytes);
        store
    }
}

fn timed_out(limits: &Limits) -> OutcomeKind {
    OutcomeKind::TimedOut {
        limit_ms: u64::try_from(limits.timeout.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Turns the error of a failed instantiation or call into an outcome class.
fn classify(error: &wasmtime::Error, stderr: &str, limits: &Limits) -> OutcomeKind {
    if let Some(hit) = error.downcast_ref::<LimitExceeded>() {
        return OutcomeKind::LimitExceeded {
            limit: hit.kind,
            detail: hit.detail.clone(),
        };
    }
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return OutcomeKind::Trapped {
            code: "exit".into(),
            message: format!(
                "the handler called exit({}) instead of returning from run-handler",
                exit.0
            ),
            backtrace: Vec::new(),
        };
    }
    if error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return OutcomeKind::EngineError {
            message: format!("no sandbox slot is free: {error}"),
        };
    }
    let message = truncate(format!("{error:#}"), MAX_REASON_BYTES);
    if message.contains("fuel allocated for hostcalls has been exhausted") {
        return OutcomeKind::LimitExceeded {
            limit: LimitKind::HostcallBytes,
            detail: format!(
                "the handler passed more than {} bytes to the host in one call",
                limits.hostcall_bytes
            ),
        };
    }
    let root = error.root_cause().to_string();
    if root.starts_with("resource limit exceeded:") {
        // wasmtime's own count check against `SandboxLimiter::{instances,memories,tables}`.
        return OutcomeKind::LimitExceeded {
            limit: LimitKind::Instances,
            detail: format!(
                "{root} (the limits are {} core instances, {} memories, {} tables)",
                limits.instances, limits.memories, limits.tables
            ),
        };
    }
    let backtrace = backtrace_of(error);
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => timed_out(limits),
        Some(Trap::StackOverflow) => OutcomeKind::LimitExceeded {
            limit: LimitKind::Stack,
            detail: format!(
                "wasm stack overflow (the stack limit is {} bytes): deep or infinite recursion",
                crate::engine::MAX_WASM_STACK
            ),
        },
        Some(Trap::UnreachableCodeReached) if panic_message(stderr).is_some() => {
            OutcomeKind::Panicked {
                message: panic_message(stderr).unwrap_or_default(),
            }
        }
        Some(trap) => OutcomeKind::Trapped {
            code: trap_code(*trap),
            message,
            backtrace,
        },
        None if is_invalid_value(&root) => OutcomeKind::Trapped {
            code: "invalid-value".into(),
            message,
            backtrace,
        },
        None => OutcomeKind::Trapped {
            code: "guest-error".into(),
            message,
            backtrace,
        },
    }
}

/// Whether `root` (the innermost error message) is wasmtime refusing a value the guest handed
/// across the component boundary: a string, list or pointer outside its memory, a misaligned
/// pointer, an invalid discriminant, invalid UTF-8, or a bad `cabi_realloc` result.
fn is_invalid_value(root: &str) -> bool {
    const SIGNS: &[&str] = &[
        "out of bounds",
        "not aligned",
        "realloc return:",
        "discriminant",
        // std's `Utf8Error`: "invalid utf-8 sequence ..." or "incomplete utf-8 byte sequence ...".
        "utf-8",
        "utf-16",
        "latin1",
        "invalid char",
        "size overflow",
        "length overflow",
    ];
    SIGNS.iter().any(|sign| root.contains(sign))
}

/// A stable, kebab-case code for a trap.
fn trap_code(trap: Trap) -> String {
    match trap {
        Trap::UnreachableCodeReached => "unreachable".into(),
        Trap::MemoryOutOfBounds => "memory-out-of-bounds".into(),
        Trap::TableOutOfBounds => "table-out-of-bounds".into(),
        Trap::IndirectCallToNull => "indirect-call-to-null".into(),
        Trap::BadSignature => "bad-signature".into(),
        Trap::IntegerOverflow => "integer-overflow".into(),
        Trap::IntegerDivisionByZero => "integer-division-by-zero".into(),
        Trap::BadConversionToInteger => "bad-conversion-to-integer".into(),
        Trap::CannotEnterComponent => "cannot-enter-component".into(),
        other => {
            let mut code = String::new();
            for (i, c) in format!("{other:?}").chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    code.push('-');
                }
                code.push(c.to_ascii_lowercase());
            }
            code
        }
    }
}

/// The panic message a Rust guest printed to stderr before trapping, if any.
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.find("panicked at ")?;
    let text = stderr.get(start + "panicked at ".len()..)?;
    let text = text.split("\nnote: ").next().unwrap_or(text);
    // "src/lib.rs:5:5:\nmessage" -> "message (at src/lib.rs:5:5)"
    let (location, message) = match text.split_once(":\n") {
        Some((location, message)) => (location.trim(), message.trim()),
        None => ("", text.trim()),
    };
    let message = if location.is_empty() {
        message.to_owned()
    } else {
        format!("{message} (at {location})")
    };
    Some(truncate(message, MAX_REASON_BYTES))
}

fn backtrace_of(error: &wasmtime::Error) -> Vec<String> {
    let Some(bt) = error.downcast_ref::<WasmBacktrace>() else {
        return Vec::new();
    };
    bt.frames()
        .iter()
        .take(MAX_BACKTRACE_FRAMES)
        .map(|frame| {
            let name = frame.func_name().unwrap_or("<unnamed>");
            format!("{name} (function {})", frame.func_index())
        })
        .collect()
}

/// The WIT form of a context, as every `run-handler` call receives it.
pub fn to_wit(c: &JobContext) -> wit::types::JobContext {
    use wit::types::{Datetime, JobResult as R, OperationType as O};
    wit::types::JobContext {
        agent_id: c.agent_id.to_string(),
        username: c.username.clone(),
        client_machine: c.client_machine.clone(),
        job_result: match c.job_result {
            JobResult::Unknown => R::Unknown,
            JobResult::InProcess => R::InProcess,
            JobResult::Success => R::Success,
            JobResult::Warning => R::Warning,
            JobResult::Failure => R::Failure,
        },
        job_id: c.job_id.to_string(),
        job_type: c.job_type.clone(),
        job_type_id: c.job_type_id.to_string(),
        operation_type: match c.operation_type {
            OperationType::Unknown => O::Unknown,
            OperationType::Inventory => O::Inventory,
            OperationType::Add => O::Add,
            OperationType::Remove => O::Remove,
            OperationType::Create => O::Create,
            OperationType::CreateAdd => O::CreateAdd,
            OperationType::Reenrollment => O::Reenrollment,
            OperationType::Discovery => O::Discovery,
            OperationType::SetPassword => O::SetPassword,
            OperationType::FetchLogs => O::FetchLogs,
        },
        certificate_id: c.certificate_id,
        request_timestamp: c.request_timestamp.map(|t| Datetime {
            seconds: t.timestamp(),
            nanoseconds: t.timestamp_subsec_nanos(),
        }),
        current_retry_count: c.current_retry_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_extracted_from_rust_stderr() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:12:9:\nboom: 42\n\
                      note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).unwrap(),
            "boom: 42 (at src/lib.rs:12:9)"
        );
        assert_eq!(panic_message("plain output"), None);
    }

    #[test]
    fn trap_codes_are_kebab_case() {
        assert_eq!(trap_code(Trap::UnreachableCodeReached), "unreachable");
        assert_eq!(trap_code(Trap::NullReference), "null-reference");
    }

    #[test]
    fn boundary_errors_are_invalid_values() {
        for root in [
            "invalid utf-8 sequence of 1 bytes from index 0",
            "incomplete utf-8 byte sequence from index 0",
            "string pointer/length out of bounds of memory",
            "return pointer not aligned",
            "realloc return: beyond end of memory",
            "invalid expected discriminant",
            "unexpected discriminant: 99",
        ] {
            assert!(is_invalid_value(root), "{root}");
        }
        assert!(!is_invalid_value("resource table has no free keys"));
    }
}
