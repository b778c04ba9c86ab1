//! The state of one sandbox and the linker it is instantiated against: WASI (linked, but its
//! context grants nothing) and the `jobhook:handler` interfaces with the handler's grants.
//!
//! The load gate ([`crate::runtime::loader`]) pre-instantiates components against [`linker`];
//! the sandbox ([`crate::runtime::sandbox`]) builds a fresh [`SandboxState`] for every delivery.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::jobhook::handler as wit;
use crate::bindings::jobhook::handler::delivery::EventSource;
use crate::capabilities::delivery::DeliveryCapability;
use crate::capabilities::log::LogCollector;
use crate::capabilities::properties::Properties;
use crate::capabilities::stdio::CappedOutput;
use crate::capabilities::{CapabilityStates, Grants, HasCapabilities, Services};
use crate::limits::{Limits, MAX_JOB_MESSAGE_BYTES};
use crate::outcome::{TRUNCATED_MARK, truncate};
use crate::runtime::compat;
use crate::runtime::engine::Engine;
use crate::runtime::limiter::SandboxLimiter;

/// Resource handles (streams, pollables) one sandbox may hold. A Rust handler uses a handful for
/// stdio; the cap stops a guest from growing the host-side table without bound.
pub(crate) const MAX_RESOURCE_HANDLES: usize = 256;

/// Random bytes a guest may ask for in one call (wasmtime's default is 64 MiB, which a hostile
/// guest could use to make the host allocate).
pub(crate) const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// What the operator configured for one handler.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique name of this handler instance.
    pub name: Arc<str>,
    /// Its properties.
    pub properties: Properties,
    /// Its limits.
    pub limits: Limits,
    /// The capabilities it may import.
    pub grants: Grants,
}

impl SandboxSpec {
    /// A spec with default limits, no properties and no grants.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        SandboxSpec {
            name: name.into(),
            properties: Properties::default(),
            limits: Limits::default(),
            grants: Grants::default(),
        }
    }
}

/// Which delivery an invocation is, and what the engine knows of its event beyond the context.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// 1 on the first attempt.
    pub attempt: u32,
    /// The engine's event id, when there is one.
    pub event_id: Option<String>,
    /// How the event reached the engine.
    pub source: EventSource,
    /// Keyfactor's text about the job, when the source had it.
    pub message: Option<String>,
}

impl Delivery {
    /// Keyfactor's text about a job as handlers receive it through `delivery.message`, whoever
    /// supplies it (the poller from JobHistory, `jobhook run --job-message`): blank is `None`;
    /// NUL (which PostgreSQL text cannot hold) becomes U+FFFD, so both stores keep the same text;
    /// longer than [`MAX_JOB_MESSAGE_BYTES`] is cut on a character boundary so that, with the
    /// mark of the cut, it is at most that long.
    pub fn job_message(text: &str) -> Option<String> {
        if text.trim().is_empty() {
            return None;
        }
        Some(truncate(
            text.replace('\0', "\u{FFFD}"),
            MAX_JOB_MESSAGE_BYTES - TRUNCATED_MARK.len(),
        ))
    }
}

impl Default for Delivery {
    /// The first attempt of an event handed over directly, with no event path.
    fn default() -> Self {
        Delivery {
            attempt: 1,
            event_id: None,
            source: EventSource::Direct,
            message: None,
        }
    }
}

/// The state of one sandbox: WASI (locked down) and the handler's capabilities.
pub struct SandboxState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// The memory and table limiter, installed on the store by the sandbox.
    pub(crate) limiter: SandboxLimiter,
    properties: Properties,
    /// The log lines collected so far.
    pub(crate) log: LogCollector,
    delivery: DeliveryCapability,
    /// The grantable capabilities, each behind its gate.
    capabilities: CapabilityStates,
}

impl WasiView for SandboxState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HasCapabilities for SandboxState {
    fn capabilities(&mut self) -> &mut CapabilityStates {
        &mut self.capabilities
    }
}

impl SandboxState {
    /// The capability call this sandbox is waiting on, if any, and how long it has waited.
    pub fn waiting(&self) -> Option<(String, std::time::Duration)> {
        self.capabilities.waiting()
    }
}

/// `jobhook:handler/types` defines types only; its host side is empty.
impl wit::types::Host for SandboxState {}

/// The linker every handler is instantiated against: WASI p2 (whose context grants nothing) and
/// the `jobhook:handler` interfaces, in the current contract version and every earlier one the
/// engine still runs ([`compat`]). Which of them a component may actually import is decided by
/// the load gate in [`crate::runtime::loader`].
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<SandboxState>> {
    let mut linker = Linker::new(engine.wasmtime());
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wit::types::add_to_linker::<_, HasSelf<SandboxState>>(&mut linker, |s| s)?;
    wit::properties::add_to_linker::<_, HasSelf<Properties>>(&mut linker, |s| &mut s.properties)?;
    wit::log::add_to_linker::<_, HasSelf<LogCollector>>(&mut linker, |s| &mut s.log)?;
    wit::delivery::add_to_linker::<_, HasSelf<DeliveryCapability>>(&mut linker, |s| {
        &mut s.delivery
    })?;
    CapabilityStates::add_to_linker(&mut linker)?;
    compat::add_to_linker(
        &mut linker,
        compat::StateAccess {
            properties: |s| &mut s.properties,
            log: |s| &mut s.log,
            delivery: |s| &mut s.delivery,
        },
    )?;
    Ok(linker)
}

impl SandboxState {
    /// The state of a fresh sandbox for one delivery of the handler `spec`: WASI with nothing
    /// but bounded stdout/stderr, and each capability with its grant, its service and its call
    /// budget.
    pub fn new(
        spec: &SandboxSpec,
        services: &Services,
        delivery: Delivery,
        stdout: &CappedOutput,
        stderr: &CappedOutput,
    ) -> Self {
        let limits = &spec.limits;
        // No args, no env, no preopens, no sockets, no name lookup: WASI is linked but empty.
        // `wasi:sockets` is linked too (libpython imports it), and inert: with TCP, UDP and name
        // lookup disallowed and the default address check (which refuses every address),
        // wasmtime-wasi fails every socket creation with `access-denied` before an OS socket
        // exists and every lookup before resolving (see `loader::INERT_WASI`).
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
        SandboxState {
            wasi,
            table,
            limiter: SandboxLimiter::new(limits),
            properties: spec.properties.clone(),
            log: LogCollector::new(Arc::clone(&spec.name), limits),
            delivery: DeliveryCapability {
                attempt: delivery.attempt,
                event_id: delivery.event_id,
                handler_name: Arc::clone(&spec.name),
                source: delivery.source,
                message: delivery.message,
            },
            capabilities: CapabilityStates::new(&spec.grants, services, limits),
        }
    }
}
