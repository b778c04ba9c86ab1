//! Real handler components, built from this repository's sources, run through the host's load
//! gate and sandbox: the examples, and guests that fail in each way a handler can.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jobhook::capabilities::properties::Properties;
use jobhook::capabilities::{Capability, Grants, Services};
#[cfg(target_os = "linux")]
use jobhook::runtime::threads::policy_of_this_thread;
use jobhook::{
    Delivery, Engine, JobContext, LimitKind, LoadError, LoadOptions, Outcome, OutcomeKind,
    SandboxSpec, SandboxedHandler,
};
use jobhook_testkit::{guest_bytes, sample_context_json, workspace_root};
use serde_json::{Value, json};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::new(32).expect("engine"))
}

fn spec(name: &str, properties: &[(&str, &str)]) -> SandboxSpec {
    let mut spec = SandboxSpec::new(name);
    spec.properties = Properties::new(
        properties
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    spec.grants = Grants::permissive();
    spec
}

async fn load(package: &str, spec: SandboxSpec) -> Result<SandboxedHandler, LoadError> {
    SandboxedHandler::load(
        engine(),
        &Services::default(),
        guest_bytes(package),
        spec,
        &LoadOptions::default(),
    )
    .await
}

async fn run(package: &str, spec: SandboxSpec, context: &Value) -> Outcome {
    let handler = load(package, spec).await.expect("load");
    let context = JobContext::from_json_value(context).expect("context");
    handler.invoke(&context, Delivery::default()).await
}

fn example_context(example: &str, file: &str) -> Value {
    let path = workspace_root()
        .join("examples")
        .join(example)
        .join("contexts")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("sample context is JSON")
}

fn with(field: &str, value: Value) -> Value {
    let mut v = sample_context_json();
    v[field] = value;
    v
}

#[tokio::test]
async fn log_context_succeeds_and_logs_every_field() {
    let outcome = run(
        "log-context",
        spec("log-context", &[]),
        &sample_context_json(),
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    let text: String = outcome
        .logs
        .iter()
        .map(|l| format!("{} {}\n", l.level, l.message))
        .collect();
    for needle in [
        "fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11",
        "KFTRAIN\\SVC_Orchestrator",
        "orchestrator.kftrain.lab",
        "Success",
        "0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01",
        "WinCertInventory",
        "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
        "2023-05-03",
    ] {
        assert!(text.contains(needle), "log lacks {needle}:\n{text}");
    }
    assert!(outcome.memory_bytes > 0);
}

#[tokio::test]
async fn log_context_sample_context_succeeds() {
    let outcome = run(
        "log-context",
        spec("log-context", &[]),
        &example_context("log-context", "sample.json"),
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

const MAIL_PROPS: &[(&str, &str)] = &[
    ("RetryThreshold", "3"),
    ("EmailRecipients", "pki-team@example.com"),
];

#[tokio::test]
async fn repeated_failure_email_does_nothing_for_a_successful_job() {
    let outcome = run(
        "repeated-failure-email",
        spec("mail", MAIL_PROPS),
        &example_context("repeated-failure-email", "succeeded.json"),
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn repeated_failure_email_below_threshold_does_nothing() {
    let outcome = run(
        "repeated-failure-email",
        spec("mail", MAIL_PROPS),
        &example_context("repeated-failure-email", "failed-first-try.json"),
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn repeated_failure_email_over_threshold_tries_to_mail() {
    // This engine has no mail transport configured: the handler's attempt to send is answered
    // `not-available`, which it reports as its failure reason.
    let outcome = run(
        "repeated-failure-email",
        spec("mail", MAIL_PROPS),
        &example_context("repeated-failure-email", "failed-after-retries.json"),
    )
    .await;
    match &outcome.kind {
        OutcomeKind::HandlerFailed { reason } => {
            assert!(reason.contains("not available"), "{reason}");
            assert!(reason.contains("mail"), "{reason}");
        }
        other => panic!("expected handler-failed, got {other:?}"),
    }
}

#[tokio::test]
async fn repeated_failure_email_bad_threshold_is_a_handler_failure_naming_it() {
    let outcome = run(
        "repeated-failure-email",
        spec(
            "mail",
            &[
                ("RetryThreshold", "abc"),
                ("EmailRecipients", "pki-team@example.com"),
            ],
        ),
        &example_context("repeated-failure-email", "failed-after-retries.json"),
    )
    .await;
    match &outcome.kind {
        OutcomeKind::HandlerFailed { reason } => {
            assert!(reason.contains("RetryThreshold"), "{reason}");
            assert!(reason.contains("abc"), "{reason}");
        }
        other => panic!("expected handler-failed, got {other:?}"),
    }
}

#[tokio::test]
async fn repeated_failure_email_missing_property_is_a_handler_failure() {
    let outcome = run(
        "repeated-failure-email",
        spec("mail", &[("RetryThreshold", "3")]),
        &example_context("repeated-failure-email", "failed-after-retries.json"),
    )
    .await;
    match &outcome.kind {
        OutcomeKind::HandlerFailed { reason } => {
            assert!(reason.contains("EmailRecipients"), "{reason}")
        }
        other => panic!("expected handler-failed, got {other:?}"),
    }
}

#[tokio::test]
async fn job_history_lookup_skips_management_jobs() {
    let outcome = run(
        "job-history-lookup",
        spec("history", &[]),
        &example_context("job-history-lookup", "management-add.json"),
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn job_history_lookup_reports_an_unavailable_api() {
    let outcome = run(
        "job-history-lookup",
        spec("history", &[]),
        &example_context("job-history-lookup", "inventory.json"),
    )
    .await;
    match &outcome.kind {
        OutcomeKind::HandlerFailed { reason } => {
            assert!(reason.contains("not available"), "{reason}")
        }
        other => panic!("expected handler-failed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_trap_is_classified_with_its_code() {
    let outcome = run("guest-trap", spec("trap", &[]), &sample_context_json()).await;
    match &outcome.kind {
        OutcomeKind::Trapped { code, .. } => assert_eq!(code, "unreachable"),
        other => panic!("expected trapped, got {other:?}"),
    }
}

#[tokio::test]
async fn a_panic_is_classified_with_its_message() {
    let outcome = run("guest-panic", spec("panic", &[]), &sample_context_json()).await;
    match &outcome.kind {
        OutcomeKind::Panicked { message } => assert!(
            message.contains("handler exploded on job 0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01"),
            "{message}"
        ),
        other => panic!("expected panicked, got {other:?}"),
    }
}

#[tokio::test]
async fn an_infinite_loop_times_out_at_its_budget() {
    #[cfg(target_os = "linux")]
    let before = policy_of_this_thread();
    let mut s = spec("loop", &[]);
    // Long enough to run past `cpu_share::IDLE_AFTER_TICKS` (100 ms of guest code) at half
    // speed (a long runner's share on two cores).
    s.limits.timeout = Duration::from_millis(500);
    let outcome = run("guest-loop", s, &sample_context_json()).await;
    assert_eq!(
        outcome.kind,
        OutcomeKind::TimedOut {
            limit_ms: 500,
            waiting_for: None
        }
    );
    assert!(outcome.duration >= Duration::from_millis(500));
    // It started on this thread (one-thread runtime) and ended on the idle threads as a long
    // runner; this thread's policy never changed.
    #[cfg(target_os = "linux")]
    assert_eq!(policy_of_this_thread(), before);
}

#[tokio::test]
async fn a_memory_bomb_hits_the_memory_limit() {
    let mut s = spec("bomb", &[]);
    s.limits.memory_bytes = 16 * 1024 * 1024;
    let outcome = run("guest-memory-bomb", s, &sample_context_json()).await;
    match &outcome.kind {
        OutcomeKind::LimitExceeded { limit, .. } => assert_eq!(*limit, LimitKind::Memory),
        other => panic!("expected limit-exceeded(memory), got {other:?}"),
    }
    assert!(outcome.memory_bytes <= 16 * 1024 * 1024);
}

#[tokio::test]
async fn no_state_survives_between_invocations() {
    let handler = load("guest-counter", spec("counter", &[]))
        .await
        .expect("load");
    let context = JobContext::from_json_value(&sample_context_json()).expect("context");
    for _ in 0..5 {
        let outcome = handler.invoke(&context, Delivery::default()).await;
        assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    }
}

#[tokio::test]
async fn a_failed_invocation_does_not_affect_the_next_one() {
    let handler = load("guest-trap", spec("trap", &[])).await.expect("load");
    let healthy = load("log-context", spec("log", &[])).await.expect("load");
    let context = JobContext::from_json_value(&sample_context_json()).expect("context");
    for _ in 0..3 {
        assert_eq!(
            handler
                .invoke(&context, Delivery::default())
                .await
                .kind
                .class(),
            "trapped"
        );
        assert!(
            healthy
                .invoke(&context, Delivery::default())
                .await
                .kind
                .is_success()
        );
    }
}

#[tokio::test]
async fn every_context_field_reaches_the_guest_with_odd_values() {
    // Unknown enum numbers, no optional fields, empty strings: still delivered.
    let mut context = with("JobResult", json!(99));
    context["OperationType"] = json!(12);
    context["CertificateId"] = Value::Null;
    context["RequestTimestamp"] = Value::Null;
    context["Username"] = json!("");
    let outcome = run("log-context", spec("log", &[]), &context).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn a_component_for_another_world_is_refused() {
    let err = load("guest-wrong-world", spec("other", &[]))
        .await
        .unwrap_err();
    match &err {
        LoadError::WrongWorld(message) => assert!(message.contains("run-handler"), "{message}"),
        other => panic!("expected WrongWorld, got {other:?}"),
    }
}

#[tokio::test]
async fn a_core_module_is_refused() {
    let module = wat::parse_str("(module (func (export \"run\")))").expect("wat");
    let err = SandboxedHandler::load(
        engine(),
        &Services::default(),
        module,
        spec("core", &[]),
        &LoadOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err, LoadError::CoreModule);
    assert!(err.to_string().contains("wasm32-wasip2"), "{err}");
}

#[tokio::test]
async fn garbage_bytes_are_refused() {
    for bytes in [
        b"MZ\x90\x00 this is a Windows DLL".to_vec(),
        vec![0xff; 4096],
    ] {
        let err = SandboxedHandler::load(
            engine(),
            &Services::default(),
            bytes,
            spec("garbage", &[]),
            &LoadOptions::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err, LoadError::NotWasm);
    }
}

#[tokio::test]
async fn a_truncated_component_is_refused_as_invalid() {
    let mut bytes = guest_bytes("log-context");
    bytes.truncate(bytes.len() / 2);
    let err = SandboxedHandler::load(
        engine(),
        &Services::default(),
        bytes,
        spec("cut", &[]),
        &LoadOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LoadError::Invalid(_)), "{err:?}");
}

#[tokio::test]
async fn an_oversized_component_is_refused_before_compiling() {
    let options = LoadOptions {
        max_bytes: 1024,
        ..LoadOptions::default()
    };
    let err = SandboxedHandler::load(
        engine(),
        &Services::default(),
        guest_bytes("log-context"),
        spec("big", &[]),
        &options,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, LoadError::TooLarge { max: 1024, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_compile_over_its_time_out_is_refused_without_waiting_for_it() {
    assert_eq!(
        LoadOptions::default().compile_timeout,
        Duration::from_secs(60),
        "SECURITY.md documents a 60 s default"
    );
    let timeout = Duration::from_millis(1);
    let options = LoadOptions {
        compile_timeout: timeout,
        ..LoadOptions::default()
    };
    let started = Instant::now();
    let err = SandboxedHandler::load(
        engine(),
        &Services::default(),
        guest_bytes("log-context"),
        spec("slow-compile", &[]),
        &options,
    )
    .await
    .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err, LoadError::CompileTimeout(timeout));
    assert!(err.to_string().contains("took longer than 1ms"), "{err}");
    // The refusal does not wait for the compile, which finishes on its own thread.
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    // With the default time-out the same component loads and runs on the same engine.
    let outcome = run(
        "log-context",
        spec("log-context", &[]),
        &sample_context_json(),
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn an_ungranted_capability_is_refused_at_load() {
    let mut s = spec("mail", MAIL_PROPS);
    s.grants = Grants::default();
    let err = load("repeated-failure-email", s).await.unwrap_err();
    assert_eq!(
        err,
        LoadError::NotGranted {
            capability: Capability::Mail
        }
    );
    // A handler that needs no capability loads without grants.
    let mut s = spec("log", &[]);
    s.grants = Grants::default();
    assert!(load("log-context", s).await.is_ok());
}

#[tokio::test]
async fn import_lists_are_the_capability_lists() {
    let imports = |package: &str| {
        let package = package.to_owned();
        async move {
            load(&package, spec("x", &[]))
                .await
                .expect("load")
                .component()
                .imports()
                .capabilities
                .clone()
        }
    };
    assert_eq!(imports("log-context").await, vec![]);
    assert_eq!(
        imports("repeated-failure-email").await,
        vec![Capability::Mail]
    );
    assert_eq!(
        imports("job-history-lookup").await,
        vec![Capability::Keyfactor]
    );
}

/// `package` loaded on an engine of a test's own.
async fn load_on(
    engine: &Engine,
    package: &'static str,
    spec: SandboxSpec,
) -> std::sync::Arc<SandboxedHandler> {
    SandboxedHandler::load(
        engine,
        &Services::default(),
        guest_bytes(package),
        spec,
        &LoadOptions::default(),
    )
    .await
    .map(std::sync::Arc::new)
    .expect("load")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_beyond_the_cpu_share_are_throttled_and_still_end_at_their_deadline() {
    // An engine of its own: the other tests' sandboxes must not count here.
    let engine = Engine::new(16).expect("engine");
    let loops = engine.cpu_share().cores().ceil() as usize + 3;
    let budget = Duration::from_millis(800);
    let mut looping = spec("loop", &[]);
    looping.limits.timeout = budget;
    let looping = load_on(&engine, "guest-loop", looping).await;
    let healthy = load_on(&engine, "log-context", spec("log-context", &[])).await;
    let context = JobContext::from_json_value(&sample_context_json()).expect("context");
    let runs: Vec<_> = (0..loops)
        .map(|_| {
            let (handler, context) = (std::sync::Arc::clone(&looping), context.clone());
            tokio::spawn(async move { handler.invoke(&context, Delivery::default()).await })
        })
        .collect();
    // Every loop becomes a long runner after its free ticks, more than the share allows.
    let waited = std::time::Instant::now();
    while engine.cpu_share().long_runners() < loops {
        assert!(
            waited.elapsed() < budget,
            "only {} of {loops} loops counted as long runners",
            engine.cpu_share().long_runners()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Meanwhile a healthy delivery runs as usual.
    let outcome = healthy.invoke(&context, Delivery::default()).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    // Throttled or not, each loop is stopped at its own deadline by the epoch interrupt.
    for run in runs {
        let outcome = run.await.expect("join");
        assert_eq!(
            outcome.kind,
            OutcomeKind::TimedOut {
                limit_ms: budget.as_millis() as u64,
                waiting_for: None,
            },
            "{outcome:?}"
        );
        assert!(outcome.duration >= budget, "{:?}", outcome.duration);
    }
    assert_eq!(engine.cpu_share().long_runners(), 0, "no long runner left");
}

#[tokio::test]
async fn an_engine_sized_for_the_most_concurrent_deliveries_runs_handlers() {
    // `serve` sizes its pool to `[engine] max_concurrent_deliveries`; the largest accepted value
    // must fit the process's address space.
    let slots = u32::try_from(jobhook::runtime::config::MAX_CONCURRENT_DELIVERIES).expect("fits");
    let engine = Engine::new(slots).expect("engine");
    let handler = SandboxedHandler::load(
        &engine,
        &Services::default(),
        guest_bytes("log-context"),
        spec("log-context", &[]),
        &LoadOptions::default(),
    )
    .await
    .expect("load");
    let context = JobContext::from_json_value(&sample_context_json()).expect("context");
    let outcome = handler.invoke(&context, Delivery::default()).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn a_delivery_with_no_sandbox_slot_free_is_an_engine_error() {
    // An engine of its own with one slot, held by a delivery that sleeps in a host call.
    let engine = Engine::new(1).expect("engine");
    let budget = Duration::from_secs(2);
    let mut sleeping = spec("sleep", &[]);
    sleeping.limits.timeout = budget;
    let sleeping = load_on(&engine, "guest-sleep", sleeping).await;
    let healthy = load_on(&engine, "log-context", spec("log-context", &[])).await;
    let context = JobContext::from_json_value(&sample_context_json()).expect("context");
    let hold = || {
        let (handler, context) = (std::sync::Arc::clone(&sleeping), context.clone());
        tokio::spawn(async move { handler.invoke(&context, Delivery::default()).await })
    };
    let mut holder = hold();
    // Once the sleeper has instantiated it keeps the slot for its whole budget, and every healthy
    // delivery meanwhile finds no slot. Until then the healthy one may still find the slot free —
    // or take it while the sleeper instantiates, so that the sleeper is the one refused; then
    // the sleeper starts again. The bound only stops a broken engine from hanging the test.
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        let outcome = healthy.invoke(&context, Delivery::default()).await;
        if matches!(outcome.kind, OutcomeKind::EngineError { .. }) || Instant::now() > deadline {
            break outcome;
        }
        if holder.is_finished() {
            let lost = holder.await.expect("join");
            assert_eq!(lost.kind.class(), "engine-error", "{lost:?}");
            holder = hold();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    match &outcome.kind {
        OutcomeKind::EngineError { message } => {
            assert!(message.contains("no sandbox slot is free"), "{message}")
        }
        other => panic!("expected engine-error, got {other:?}"),
    }
    assert_eq!(outcome.kind.class(), "engine-error");
    // The holder really held the slot until its budget ran out.
    let held = holder.await.expect("join");
    assert_eq!(
        held.kind,
        OutcomeKind::TimedOut {
            limit_ms: budget.as_millis() as u64,
            waiting_for: None,
        },
        "{held:?}"
    );
    // The slot is free again: the healthy handler runs on the same engine.
    let outcome = healthy.invoke(&context, Delivery::default()).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
}

/// The needs the load gate checks limits against are the ones instantiation has: at exactly
/// the core instances, memories, tables and first memory and table a component declares, it
/// runs; one below any of them, it is refused at load, not at every delivery.
#[tokio::test]
async fn limits_at_a_components_declared_needs_run_and_below_them_are_refused_at_load() {
    let mut at_needs = spec("log", &[]);
    at_needs.limits.instances = 3;
    at_needs.limits.memories = 1;
    at_needs.limits.tables = 2;
    let handler = load("log-context", at_needs.clone())
        .await
        .expect("load at its needs");
    let context = JobContext::from_json_value(&sample_context_json()).expect("context");
    let outcome = handler.invoke(&context, Delivery::default()).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    for below in [
        |s: &mut SandboxSpec| s.limits.instances = 2,
        |s: &mut SandboxSpec| s.limits.tables = 1,
        |s: &mut SandboxSpec| s.limits.memory_bytes = 1024 * 1024,
    ] {
        let mut s = at_needs.clone();
        below(&mut s);
        let refused = load("log-context", s).await.expect_err("refused at load");
        assert!(
            refused.to_string().contains("every delivery would fail"),
            "{refused}"
        );
    }
}

/// The epoch ticker sleeps while no sandbox runs; a loop that starts then is still interrupted
/// at its budget, since every run wakes it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_on_an_idle_engine_still_times_out_at_its_budget() {
    // An engine of its own: the other tests' sandboxes would keep its ticker awake.
    loop_on_an_idle_engine_times_out(Engine::new(4).expect("engine")).await;
}

/// As above, with the run on the engine's sandbox threads (`[engine] sandbox_threads`): the
/// guard goes with the run to those threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_on_an_idle_engine_with_sandbox_threads_still_times_out() {
    let engine = Engine::new(4)
        .and_then(|e| e.with_sandbox_threads(2))
        .expect("engine");
    loop_on_an_idle_engine_times_out(engine).await;
}

/// Waits for `engine`'s ticker to sleep, then runs a loop with a 300 ms budget: it times out.
async fn loop_on_an_idle_engine_times_out(engine: Engine) {
    let mut looping = spec("loop", &[]);
    looping.limits.timeout = Duration::from_millis(300);
    let looping = load_on(&engine, "guest-loop", looping).await;
    let waited = std::time::Instant::now();
    while !engine.ticker_state().0 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the ticker never slept"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let context = JobContext::from_json_value(&sample_context_json()).expect("context");
    // On a thread of its own: a loop never interrupted holds that thread, not this test's.
    let (ran, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = ran.send(runtime.block_on(looping.invoke(&context, Delivery::default())));
    });
    let outcome = outcome
        .recv_timeout(Duration::from_secs(30))
        .expect("the loop was never interrupted");
    assert_eq!(
        outcome.kind,
        OutcomeKind::TimedOut {
            limit_ms: 300,
            waiting_for: None
        }
    );
}
