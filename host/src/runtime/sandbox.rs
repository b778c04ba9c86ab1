//! One handler's sandboxes: a fresh `Store` and instance per invocation, with the handler's
//! limits, its granted capabilities and nothing else.
//!
//! Where each limit is enforced:
//! - time: the epoch deadline callback interrupts guest code at the deadline, and an outer
//!   `tokio::time::timeout` also covers time spent waiting in host calls ([`SandboxedHandler::invoke`]);
//! - memory, tables, instances: [`crate::runtime::limiter::SandboxLimiter`], installed on
//!   every store;
//! - wasm stack: the engine's `max_wasm_stack` ([`crate::runtime::engine`]);
//! - bytes crossing into the host: `Store::set_hostcall_fuel`;
//! - stdout/stderr, log lines, capability calls: the capability state of the store.
//!
//! The store is dropped at the end of every invocation, whatever happened, so no state crosses
//! from one invocation to the next.

use std::time::{Duration, Instant};

use wasmtime::{Store, UpdateDeadline};

use crate::bindings::jobhook::handler as wit;
use crate::capabilities::Services;
use crate::capabilities::stdio::CappedOutput;
use crate::caught::caught;
use crate::context::{JobContext, JobResult, OperationType};
use crate::outcome::{MAX_REASON_BYTES, Outcome, OutcomeKind, truncate};
use crate::runtime::classify::{classify, timed_out};
use crate::runtime::engine::{Engine, SandboxThreads};
use crate::runtime::loader::{self, LoadError, LoadOptions, LoadedComponent};
use crate::runtime::state::{Delivery, SandboxSpec, SandboxState};

/// Slack on top of the time budget before the outer timeout drops the call. The epoch deadline
/// normally fires first (within one [`crate::runtime::engine::EPOCH_TICK`]); the outer timeout catches
/// time spent in host calls. Kept at 30 ms (it used to be three 10 ms ticks) so that on a busy
/// machine the epoch interrupt, which records a backtrace, still wins the race.
pub(crate) const TIMEOUT_GRACE: Duration = Duration::from_millis(30);

/// A loaded, checked handler, ready to be invoked any number of times.
pub struct SandboxedHandler {
    spec: SandboxSpec,
    engine: Engine,
    services: Services,
    component: LoadedComponent,
}

impl std::fmt::Debug for SandboxedHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxedHandler")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl SandboxedHandler {
    /// Loads a component through the load gate (see [`crate::runtime::loader`]) for `spec`.
    pub async fn load(
        engine: &Engine,
        services: &Services,
        bytes: Vec<u8>,
        spec: SandboxSpec,
        options: &LoadOptions,
    ) -> Result<Self, LoadError> {
        let component = loader::load(engine, bytes, &spec.grants, options).await?;
        loader::check_needs(component.needs(), &spec.limits)?;
        Ok(SandboxedHandler {
            spec,
            engine: engine.clone(),
            services: services.clone(),
            component,
        })
    }

    /// The operator's configuration of this handler.
    pub fn spec(&self) -> &SandboxSpec {
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
        // For the line of a delivery that did not succeed: the operator looks its event up.
        let attempt = delivery.attempt;
        let event_id = delivery.event_id.clone();
        let mut store = self.new_store(delivery, &stdout, &stderr);

        let deadline = start + limits.timeout;
        store.set_epoch_deadline(1);
        // At every tick of guest code: stop at the deadline; otherwise give the thread back,
        // for a while if this delivery is one of too many long runners (crate::runtime::cpu_share).
        let mut ticks = self.engine.cpu_share().sandbox();
        let long_runner = ticks.long_runner();
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
        // The ticks that interrupt guest code, for as long as the run exists: it goes wherever
        // the run goes and ends with it.
        let ticking = self.engine.ticking();
        // Owns everything it touches, so that it can run on other threads (the engine's sandbox
        // threads; the idle threads, as a long runner); gives the store back for the outcome.
        let run = async move {
            let _ticking = ticking;
            let call = async {
                let instance = pre.instantiate_async(&mut store).await?;
                instance.call_run_handler(&mut store, &wit_context).await
            };
            (tokio::time::timeout(budget, call).await, store)
        };
        let run = long_runner.at_idle_priority(run);
        let ran = run_to_end(self.engine.sandbox_threads(), run).await;
        let stderr_text = stderr.contents();
        let (kind, state) = match ran {
            Ok((result, store)) => {
                let kind = match result {
                    Err(_elapsed) => timed_out(limits, store.data().waiting()),
                    Ok(Ok(Ok(()))) => OutcomeKind::Succeeded,
                    Ok(Ok(Err(reason))) => OutcomeKind::HandlerFailed {
                        reason: truncate(reason, MAX_REASON_BYTES),
                    },
                    Ok(Err(error)) => classify(&error, &stderr_text, limits),
                };
                (kind, Some(store.into_data()))
            }
            // The run panicked (a host bug) or the runtime is shutting down; the store went
            // with it.
            Err(why) => (
                OutcomeKind::EngineError {
                    message: format!("the sandbox task did not complete: {why}"),
                },
                None,
            ),
        };
        let duration = start.elapsed();
        let memory_bytes = state.as_ref().map_or(0, |s| s.limiter.memory_used());
        let (logs, logs_dropped) = state.map(|s| s.log.finish()).unwrap_or_default();
        if !kind.is_success() {
            // The handler's target: shown with its own warnings, not by `serve`'s default
            // filter (the outcome and `/metrics` have every failure).
            tracing::warn!(
                target: "jobhook::guest",
                handler = %crate::escape::escape(&self.spec.name),
                // `-` where there is no event (`jobhook run`).
                event_id = %crate::escape::escape(event_id.as_deref().unwrap_or("-")),
                attempt,
                class = kind.class(),
                // Three decimals (microseconds): an f64 product would print float noise.
                duration_ms = %format_args!("{:.3}", duration.as_secs_f64() * 1000.0),
                // A reason or panic message is the guest's text: the last field, quoted and
                // escaped by `Debug`, it stays one line and cannot pass for the line's fields.
                reason = kind.to_string(),
                "handler did not succeed"
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
        let state = SandboxState::new(&self.spec, &self.services, delivery, stdout, stderr);
        let mut store = Store::new(self.engine.wasmtime(), state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(limits.hostcall_bytes);
        store
    }
}

/// Awaits a sandbox's `run` (as [`crate::runtime::cpu_share::LongRunner::at_idle_priority`]
/// made it) on the engine's sandbox threads when it has them, else in this task. A panic
/// anywhere in the run — host code a capability calls, wasmtime — is answered as `Err` with
/// what it said, wherever the run was polled: on other threads the panic ends their task (a
/// `JoinError`); here it is caught, so that it cannot end the delivery's task before an outcome
/// is recorded (the delivery would stay claimed, its lease renewed, until a restart).
async fn run_to_end<F, T>(threads: Option<&SandboxThreads>, run: F) -> Result<T, String>
where
    F: Future<Output = Result<T, tokio::task::JoinError>> + Send + 'static,
    T: Send + 'static,
{
    match threads {
        Some(threads) => threads
            .run(run)
            .await
            .and_then(|ran| ran)
            .map_err(|join| join.to_string()),
        None => caught(run)
            .await
            .and_then(|ran| ran.map_err(|join| join.to_string())),
    }
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
        // A leap second (a fraction of a second of 1e9 ns or more in chrono) is refused where
        // contexts are decoded; should one get here, it is the second's last nanosecond, not a
        // value the contract's `datetime` says cannot be.
        request_timestamp: c.request_timestamp.map(|t| Datetime {
            seconds: t.timestamp(),
            nanoseconds: t.timestamp_subsec_nanos().min(999_999_999),
        }),
        current_retry_count: c.current_retry_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::cpu_share::CpuShare;
    use crate::runtime::engine::EPOCH_TICK;

    /// A panic in host code during a run in the delivery's own task is an answer, not the end
    /// of that task: the delivery gets an outcome.
    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_in_a_run_in_the_deliverys_task_is_answered() {
        let long = CpuShare::new(1.0, EPOCH_TICK).sandbox().long_runner();
        let run = long.at_idle_priority(async {
            tokio::task::yield_now().await;
            panic!("a host call broke");
        });
        let ran: Result<(), String> = run_to_end(None, run).await;
        assert_eq!(ran, Err("panic: a host call broke".to_owned()));
        let long = CpuShare::new(1.0, EPOCH_TICK).sandbox().long_runner();
        let ran = run_to_end(None, long.at_idle_priority(async { 42 })).await;
        assert_eq!(ran, Ok(42));
    }
}
