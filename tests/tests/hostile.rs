//! The hostile-handler corpus: every way we know for a handler to misbehave, each as a real
//! component, run through the load gate and a sandbox on one shared engine.
//!
//! Each test asserts the exact outcome class (and limit kind, trap code or panic message), that
//! the run ended within its time budget (plus [`corpus::SLACK`]), and that a healthy handler
//! still runs correctly on the same engine afterwards. Rust guests live in `tests/guests/*`;
//! shapes Rust cannot produce are core modules in WAT wrapped by `wit-component` (see
//! [`corpus::CoreModule`]).

mod corpus;

use corpus::{CoreModule, MEMORY, TIMEOUT, refuse, returning, run_hostile, spec, timed};
use jobhook::capabilities::Capability;
use jobhook::limits::{DEFAULT_HOSTCALL_BYTES, DEFAULT_LOG_LINES, DEFAULT_OUTPUT_BYTES};
use jobhook::outcome::MAX_REASON_BYTES;
use jobhook::{LimitKind, LoadError, Outcome, OutcomeKind};
use jobhook_testkit::guest_bytes;

fn expect_timed_out(outcome: &Outcome) {
    assert_eq!(
        outcome.kind,
        OutcomeKind::TimedOut {
            limit_ms: TIMEOUT.as_millis() as u64,
            waiting_for: None,
        },
        "{outcome:#?}"
    );
    assert!(outcome.duration >= TIMEOUT, "{:?}", outcome.duration);
}

fn expect_limit(outcome: &Outcome, expected: LimitKind) -> String {
    match &outcome.kind {
        OutcomeKind::LimitExceeded { limit, detail } if *limit == expected => detail.clone(),
        other => panic!(
            "expected limit-exceeded ({}), got {other:#?}",
            expected.as_str()
        ),
    }
}

fn expect_trap(outcome: &Outcome, expected_code: &str) -> String {
    match &outcome.kind {
        OutcomeKind::Trapped { code, message, .. } if code == expected_code => message.clone(),
        other => panic!("expected trapped ({expected_code}), got {other:#?}"),
    }
}

async fn rust_guest(package: &str, properties: &[(&str, &str)]) -> Outcome {
    run_hostile(guest_bytes(package), spec(package, properties)).await
}

/// Time budget of the output floods: they are about what is kept and what is counted, not about
/// speed. 100,000 log calls or 20 MiB of writes take about a second alone, and several times
/// that on two cores shared with the rest of this file's sandboxes and a build (the default
/// [`corpus::BUDGET`] of 5 s was missed so in a CI run).
const FLOOD_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

/// [`rust_guest`] with [`FLOOD_BUDGET`].
async fn flooding_guest(package: &str) -> Outcome {
    let mut spec = spec(package, &[]);
    spec.limits.timeout = FLOOD_BUDGET;
    run_hostile(guest_bytes(package), spec).await
}

// ---------------------------------------------------------------------------------------------
// CPU and wall-clock time
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn infinite_loop_times_out() {
    expect_timed_out(&run_hostile(guest_bytes("guest-loop"), timed("loop")).await);
}

#[tokio::test]
async fn busy_loop_between_host_calls_times_out() {
    expect_timed_out(&run_hostile(guest_bytes("guest-busy-host-calls"), timed("busy")).await);
}

#[tokio::test]
async fn sleeping_in_a_host_call_times_out() {
    // No guest code runs while the guest waits in `poll`: only the outer timeout can end this.
    expect_timed_out(&run_hostile(guest_bytes("guest-sleep"), timed("sleep")).await);
}

#[tokio::test]
async fn looping_in_realloc_while_the_host_passes_the_context_times_out() {
    let component = CoreModule {
        realloc: "(loop $spin (br $spin)) (unreachable)",
        ..CoreModule::default()
    }
    .component();
    expect_timed_out(&run_hostile(component, timed("realloc-loop")).await);
}

#[tokio::test]
async fn looping_in_the_start_function_times_out_during_instantiation() {
    let component = CoreModule {
        extra: "(func $start (loop $spin (br $spin))) (start $start)",
        ..CoreModule::default()
    }
    .component();
    expect_timed_out(&run_hostile(component, timed("start-loop")).await);
}

// ---------------------------------------------------------------------------------------------
// Memory, tables, stacks, instances
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn memory_growth_bomb_hits_the_memory_limit() {
    let outcome = rust_guest("guest-memory-bomb", &[]).await;
    expect_limit(&outcome, LimitKind::Memory);
    assert!(outcome.memory_bytes <= MEMORY, "{}", outcome.memory_bytes);
}

#[tokio::test]
async fn one_huge_allocation_hits_the_memory_limit() {
    let outcome = rust_guest("guest-huge-alloc", &[]).await;
    let detail = expect_limit(&outcome, LimitKind::Memory);
    assert!(detail.contains(&MEMORY.to_string()), "{detail}");
    assert!(outcome.memory_bytes <= MEMORY, "{}", outcome.memory_bytes);
}

/// A memory declared larger than the handler's budget is seen in the binary: refused at load,
/// naming the need, instead of failing every delivery at instantiation. (Growth past the
/// budget at run time is the limiter's: the memory bombs below.)
#[tokio::test]
async fn a_start_time_memory_larger_than_the_limit_is_refused_at_load() {
    // 2,000 pages = 125 MiB of initial memory against a 16 MiB budget.
    let component = CoreModule {
        memory: r#"(memory (export "memory") 2000)"#,
        ..CoreModule::default()
    }
    .component();
    let error = refuse(component, spec("big-memory", &[])).await;
    match &error {
        LoadError::LimitsTooSmall { key, need, .. } => {
            assert_eq!(*key, "memory_bytes");
            assert!(need.contains("131072000 bytes"), "{need}");
        }
        other => panic!("expected LimitsTooSmall, got {other:?}"),
    }
}

#[tokio::test]
async fn a_start_time_memory_larger_than_any_sandbox_is_refused_at_load() {
    // 20,000 pages = 1.22 GiB: over the pool's per-memory cap, so it can never be instantiated.
    let component = CoreModule {
        memory: r#"(memory (export "memory") 20000)"#,
        ..CoreModule::default()
    }
    .component();
    let error = refuse(component, spec("huge-memory", &[])).await;
    match &error {
        LoadError::LargerThanAnySandbox { what, need, most } => {
            assert_eq!(*what, "memory");
            assert!(need.contains("1310720000 bytes"), "{need}");
            assert!(most.contains("1073741824 bytes (1024 MiB)"), "{most}");
        }
        other => panic!("expected LargerThanAnySandbox, got {other:?}"),
    }
    assert!(!error.to_string().contains("0x"), "{error}");
}

/// `inspect` says what a component needs before it runs and whether a handler at the default
/// limits could run it, naming the setting and the `jobhook run` flag to raise.
#[tokio::test]
async fn inspect_tells_a_component_over_the_default_limits() {
    let component = CoreModule {
        extra: "(table 50000 funcref)",
        ..CoreModule::default()
    }
    .component();
    let inspection = jobhook::runtime::loader::inspect(
        corpus::engine(),
        component,
        &jobhook::LoadOptions::default(),
    )
    .await
    .expect("inspected");
    assert_eq!(inspection.world_error, None);
    let needs = inspection.needs.expect("compiled");
    assert_eq!(needs.table_elements, 50_000);
    let problem = inspection.over_default_limits.expect("over the defaults");
    assert!(
        problem
            .contains("raise [handlers.limits] table_elements (--table-elements on jobhook run)"),
        "{problem}"
    );
    let healthy = jobhook::runtime::loader::inspect(
        corpus::engine(),
        guest_bytes("log-context"),
        &jobhook::LoadOptions::default(),
    )
    .await
    .expect("inspected");
    assert_eq!(healthy.over_default_limits, None);
    assert_eq!(healthy.needs.map(|n| n.core_instances), Some(3));
}

#[tokio::test]
async fn a_start_time_table_larger_than_any_sandbox_is_refused_at_load() {
    // 10,000,000 elements: over the pool's room per table, so it can never be instantiated.
    let component = CoreModule {
        extra: "(table 10000000 funcref)",
        ..CoreModule::default()
    }
    .component();
    let error = refuse(component, spec("huge-table", &[])).await;
    match &error {
        LoadError::LargerThanAnySandbox { what, need, .. } => {
            assert_eq!(*what, "table");
            assert!(need.contains("10000000 elements"), "{need}");
        }
        other => panic!("expected LargerThanAnySandbox, got {other:?}"),
    }
}

#[tokio::test]
async fn table_growth_hits_the_table_limit() {
    let component = CoreModule {
        run: "(block $done
                (loop $grow
                  (br_if $done (i32.eq (table.grow $t (ref.null func) (i32.const 1024)) (i32.const -1)))
                  (br $grow)))
              (i32.const 0)",
        extra: "(table $t 1 funcref)",
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("table-grow", &[])).await;
    expect_limit(&outcome, LimitKind::Table);
}

#[tokio::test]
async fn deep_recursion_hits_the_stack_limit() {
    let outcome = rust_guest("guest-recursion", &[]).await;
    let detail = expect_limit(&outcome, LimitKind::Stack);
    assert!(detail.contains("recursion"), "{detail}");
}

#[tokio::test]
async fn overflowing_the_shadow_stack_traps_out_of_bounds() {
    let outcome = rust_guest("guest-stack-smash", &[]).await;
    expect_trap(&outcome, "memory-out-of-bounds");
}

#[tokio::test]
async fn an_instance_bomb_beyond_the_pool_is_refused_at_load() {
    let component = corpus::with_extra_instances(&CoreModule::default().component(), "", 64);
    let error = refuse(component, spec("instance-bomb", &[])).await;
    match &error {
        LoadError::Invalid(message) => {
            assert!(message.contains("core module instances"), "{message}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn an_instance_bomb_within_the_pool_hits_the_handler_limit_at_instantiation() {
    // Made inside a nested component: the load gate counts the top level only.
    let component = corpus::with_nested_extra_instances(&CoreModule::default().component(), "", 10);
    let mut s = spec("instance-bomb", &[]);
    s.limits.instances = 8;
    let outcome = run_hostile(component, s).await;
    let detail = expect_limit(&outcome, LimitKind::Instances);
    assert!(detail.contains("instance count"), "{detail}");
}

/// The same bomb at the top level is seen in the binary: refused at load, naming the limit.
#[tokio::test]
async fn an_instance_bomb_at_the_top_level_past_the_handler_limit_is_refused_at_load() {
    let component = corpus::with_extra_instances(&CoreModule::default().component(), "", 10);
    let mut s = spec("instance-bomb", &[]);
    s.limits.instances = 8;
    let error = refuse(component, s).await;
    assert!(
        matches!(
            error,
            LoadError::LimitsTooSmall {
                key: "instances",
                ..
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_memory_count_bomb_beyond_the_pool_is_refused_at_load() {
    let component =
        corpus::with_extra_instances(&CoreModule::default().component(), "(memory 1)", 8);
    let error = refuse(component, spec("memory-count-bomb", &[])).await;
    match &error {
        LoadError::Invalid(message) => assert!(message.contains("linear memories"), "{message}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Memories are declared, never made at run time: more than the handler's limit is seen in
/// the binary and refused at load (nested components included), naming the limit.
#[tokio::test]
async fn a_memory_count_bomb_within_the_pool_past_the_handler_limit_is_refused_at_load() {
    for component in [
        corpus::with_extra_instances(&CoreModule::default().component(), "(memory 1)", 1),
        corpus::with_nested_extra_instances(&CoreModule::default().component(), "(memory 1)", 1),
    ] {
        let mut s = spec("memory-count-bomb", &[]);
        s.limits.memories = 1;
        let error = refuse(component, s).await;
        assert!(
            matches!(
                error,
                LoadError::LimitsTooSmall {
                    key: "memories",
                    ..
                }
            ),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn a_table_count_bomb_beyond_the_pool_is_refused_at_load() {
    // The template defines no table of its own: every table is one of the bomb's.
    let component =
        corpus::with_extra_instances(&CoreModule::default().component(), "(table 1 funcref)", 5);
    let error = refuse(component, spec("table-count-bomb", &[])).await;
    match &error {
        LoadError::Invalid(message) => {
            assert!(message.contains("contains 5 tables"), "{message}");
            assert!(message.contains("maximum of 4"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn as_many_tables_as_the_pool_allows_load_and_run() {
    // The other side of the pool's cap: 4 tables (what a delivery reserves) load, and run
    // within the default handler limit of 4 tables.
    let component =
        corpus::with_extra_instances(&CoreModule::default().component(), "(table 1 funcref)", 4);
    let outcome = run_hostile(component, spec("four-tables", &[])).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:#?}");
}

/// Tables too are declared: more than the handler's limit is refused at load, nested
/// components included, naming the limit.
#[tokio::test]
async fn a_table_count_bomb_within_the_pool_past_the_handler_limit_is_refused_at_load() {
    for component in [
        corpus::with_extra_instances(&CoreModule::default().component(), "(table 1 funcref)", 3),
        corpus::with_nested_extra_instances(
            &CoreModule::default().component(),
            "(table 1 funcref)",
            3,
        ),
    ] {
        let mut s = spec("table-count-bomb", &[]);
        s.limits.tables = 2;
        let error = refuse(component, s).await;
        assert!(
            matches!(error, LoadError::LimitsTooSmall { key: "tables", .. }),
            "{error:?}"
        );
    }
}

/// Loads the template with one extra core instance of `module_wat`, which uses a WebAssembly
/// proposal the engine switches off, and returns the refusal's message.
async fn refused_for_a_switched_off_proposal(name: &str, module_wat: &str) -> String {
    let component = corpus::with_extra_instances(&CoreModule::default().component(), module_wat, 1);
    match refuse(component, spec(name, &[])).await {
        LoadError::Invalid(message) => message,
        other => panic!("{name}: expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn the_same_extra_memory_without_a_switched_off_proposal_loads() {
    // The baseline of the proposal cases below: an extra instance with a plain memory runs.
    let component =
        corpus::with_extra_instances(&CoreModule::default().component(), "(memory 1 1)", 1);
    let outcome = run_hostile(component, spec("plain-memory", &[])).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:#?}");
}

#[tokio::test]
async fn a_shared_memory_is_refused_at_load_with_threads_switched_off() {
    let message = refused_for_a_switched_off_proposal("shared-memory", "(memory 1 1 shared)").await;
    assert!(
        message.contains("threads must be enabled for shared memories"),
        "{message}"
    );
}

#[tokio::test]
async fn a_64_bit_memory_is_refused_at_load_with_memory64_switched_off() {
    let message = refused_for_a_switched_off_proposal("memory64", "(memory i64 1)").await;
    assert!(
        message.contains("memory64 must be enabled for 64-bit memories"),
        "{message}"
    );
}

#[tokio::test]
async fn an_exception_tag_is_refused_at_load_with_exceptions_switched_off() {
    let message = refused_for_a_switched_off_proposal("exceptions", "(tag)").await;
    assert!(
        message.contains("exceptions proposal not enabled"),
        "{message}"
    );
}

#[tokio::test]
async fn a_gc_struct_type_is_refused_at_load_with_gc_switched_off() {
    let message = refused_for_a_switched_off_proposal("gc", "(type (struct))").await;
    assert!(
        message.contains("not supported without the gc feature"),
        "{message}"
    );
}

#[tokio::test]
async fn a_typed_function_reference_is_refused_at_load_with_function_references_switched_off() {
    let message = refused_for_a_switched_off_proposal(
        "function-references",
        "(type $f (func)) (func (param (ref null $f)))",
    )
    .await;
    assert!(
        message.contains("function references required"),
        "{message}"
    );
}

#[tokio::test]
async fn holding_resource_handles_is_bounded() {
    let outcome = rust_guest("guest-handle-flood", &[]).await;
    let message = expect_trap(&outcome, "guest-error");
    assert!(message.contains("resource table"), "{message}");
    // The cap counts host table entries (256), the few the guest's start-up opened included,
    // and each clock pollable takes two of them: the guest got close to 128 pollables, not past.
    let held = outcome
        .logs
        .iter()
        .filter_map(|l| l.message.strip_prefix("held ")?.parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    assert!((112..=128).contains(&held), "{held} {:?}", outcome.logs);
}

// ---------------------------------------------------------------------------------------------
// Crashes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unreachable_traps() {
    let outcome = rust_guest("guest-trap", &[]).await;
    expect_trap(&outcome, "unreachable");
    match &outcome.kind {
        OutcomeKind::Trapped { backtrace, .. } => assert!(!backtrace.is_empty()),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_panic_is_recorded_with_its_message() {
    let outcome = rust_guest("guest-panic", &[]).await;
    match &outcome.kind {
        OutcomeKind::Panicked { message } => assert!(
            message.starts_with("handler exploded on job 0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01"),
            "{message}"
        ),
        other => panic!("expected panicked, got {other:#?}"),
    }
}

#[tokio::test]
async fn a_huge_panic_message_is_bounded() {
    let outcome = rust_guest("guest-big-panic", &[]).await;
    match &outcome.kind {
        OutcomeKind::Panicked { message } => {
            assert!(message.starts_with("PPPP"), "{message}");
            assert!(message.len() <= MAX_REASON_BYTES + 32, "{}", message.len());
        }
        other => panic!("expected panicked, got {other:#?}"),
    }
    assert!(outcome.stderr.len() <= DEFAULT_OUTPUT_BYTES);
    assert!(outcome.output_dropped > 0);
}

/// A core module whose `run-handler` recurses `depth` calls deep through `$dive`, then executes
/// `unreachable` in the innermost call.
fn trapping_at_depth(depth: u32) -> Vec<u8> {
    let run = format!("(call $dive (i32.const {depth})) (i32.const 0)");
    CoreModule {
        run: &run,
        extra: "(func $dive (param $n i32)
                  (if (i32.eqz (local.get $n)) (then (unreachable)))
                  (call $dive (i32.sub (local.get $n) (i32.const 1))))",
        ..CoreModule::default()
    }
    .component()
}

fn backtrace_of(outcome: &Outcome) -> &[String] {
    match &outcome.kind {
        OutcomeKind::Trapped { backtrace, .. } => backtrace,
        _ => unreachable!("checked by expect_trap"),
    }
}

#[tokio::test]
async fn a_trap_deep_in_recursion_keeps_its_32_innermost_frames() {
    // 1,001 guest frames deep. SECURITY.md: a trap's backtrace has at most 32 frames
    // (`engine::MAX_BACKTRACE_FRAMES`, which the engine asks wasmtime to capture, above
    // its default of 20): a deep trap keeps exactly 32.
    let outcome = run_hostile(trapping_at_depth(1000), spec("deep-trap", &[])).await;
    expect_trap(&outcome, "unreachable");
    let backtrace = backtrace_of(&outcome);
    assert_eq!(backtrace.len(), 32, "{backtrace:#?}");
    // The innermost frames are the ones kept: all are the recursion, none is run-handler.
    assert!(
        backtrace.iter().all(|frame| frame.starts_with("dive ")),
        "{backtrace:#?}"
    );
}

#[tokio::test]
async fn a_trap_in_shallow_recursion_keeps_its_whole_backtrace() {
    // The baseline of the case above: below any cap, every guest frame is there, the
    // recursion's 5 and then run-handler's (unnamed in the module's name section).
    let outcome = run_hostile(trapping_at_depth(4), spec("shallow-trap", &[])).await;
    expect_trap(&outcome, "unreachable");
    let backtrace = backtrace_of(&outcome);
    assert_eq!(backtrace.len(), 6, "{backtrace:#?}");
    assert!(
        backtrace[..5]
            .iter()
            .all(|frame| frame.starts_with("dive ")),
        "{backtrace:#?}"
    );
    assert!(!backtrace[5].starts_with("dive "), "{backtrace:#?}");
}

#[tokio::test]
async fn abort_traps_as_unreachable_not_as_a_panic() {
    let outcome = rust_guest("guest-abort", &[]).await;
    expect_trap(&outcome, "unreachable");
}

#[tokio::test]
async fn exit_is_recorded_as_an_exit_trap() {
    let outcome = rust_guest("guest-exit", &[]).await;
    let message = expect_trap(&outcome, "exit");
    // exit(3) arrives as exit(1): `wasi:cli/exit@0.2` carries only success or failure.
    assert!(message.contains("called exit(1)"), "{message}");
}

#[tokio::test]
async fn a_trap_in_post_return_is_recorded() {
    let component = CoreModule {
        extra: r#"(func (export "cabi_post_run-handler") (param i32) (unreachable))"#,
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("post-return-trap", &[])).await;
    expect_trap(&outcome, "unreachable");
}

#[tokio::test]
async fn calling_an_import_from_post_return_traps_as_cannot_leave_component() {
    // The component model forbids leaving the component during post-return; wasmtime's check
    // traps with its own code, which the classifier passes on in kebab-case.
    let component = CoreModule {
        imports: LOG_IMPORT,
        extra: r#"(data (i32.const 64) "abc")
            (func (export "cabi_post_run-handler") (param i32)
                (call $log (i32.const 2) (i32.const 64) (i32.const 3)))"#,
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("post-return-import", &[])).await;
    expect_trap(&outcome, "cannot-leave-component");
    assert!(outcome.logs.is_empty(), "{:?}", outcome.logs);
}

// ---------------------------------------------------------------------------------------------
// Huge and invalid values across the boundary
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_huge_failure_reason_hits_the_hostcall_bytes_limit() {
    // 50 MiB reason: the guest needs twice that while building it.
    let mut s = spec("guest-huge-reason", &[]);
    s.limits.memory_bytes = 256 << 20;
    let outcome = run_hostile(guest_bytes("guest-huge-reason"), s).await;
    let detail = expect_limit(&outcome, LimitKind::HostcallBytes);
    assert!(
        detail.contains(&DEFAULT_HOSTCALL_BYTES.to_string()),
        "{detail}"
    );
}

#[tokio::test]
async fn a_long_failure_reason_under_the_limit_is_truncated() {
    let outcome = rust_guest("guest-huge-reason", &[("bytes", "1000000")]).await;
    match &outcome.kind {
        OutcomeKind::HandlerFailed { reason } => {
            assert!(reason.starts_with("RRRR"), "{reason}");
            assert!(reason.ends_with(" [truncated]"), "{reason}");
            assert!(reason.len() <= MAX_REASON_BYTES + 16, "{}", reason.len());
        }
        other => panic!("expected handler-failed, got {other:#?}"),
    }
}

#[tokio::test]
async fn a_huge_string_passed_to_an_import_hits_the_hostcall_bytes_limit() {
    // 100 MiB log message.
    let mut s = spec("guest-huge-log", &[]);
    s.limits.memory_bytes = 256 << 20;
    let outcome = run_hostile(guest_bytes("guest-huge-log"), s).await;
    expect_limit(&outcome, LimitKind::HostcallBytes);
    assert!(outcome.logs.is_empty());
}

#[tokio::test]
async fn a_long_log_line_under_the_limit_is_truncated() {
    let outcome = rust_guest("guest-huge-log", &[("bytes", "1000000")]).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:#?}");
    assert_eq!(outcome.logs.len(), 1);
    assert!(outcome.logs[0].message.len() <= jobhook::limits::MAX_LOG_LINE_BYTES + 16);
}

#[tokio::test]
async fn invalid_utf8_in_the_result_traps() {
    // err("\xff\xfe\xfd")
    let component = returning(r"\01\00\00\00\40\00\00\00\03\00\00\00", r"\ff\fe\fd");
    let outcome = run_hostile(component, spec("bad-utf8-result", &[])).await;
    let message = expect_trap(&outcome, "invalid-value");
    assert!(message.contains("utf-8"), "{message}");
    // err("\xc2"): a sequence cut short (found by fuzz_components).
    let component = returning(r"\01\00\00\00\40\00\00\00\01\00\00\00", r"\c2");
    let outcome = run_hostile(component, spec("short-utf8-result", &[])).await;
    let message = expect_trap(&outcome, "invalid-value");
    assert!(message.contains("incomplete utf-8"), "{message}");
}

#[tokio::test]
async fn an_out_of_bounds_string_in_the_result_traps() {
    // err(string at 0xfffffff0, 16 bytes)
    let component = returning(r"\01\00\00\00\f0\ff\ff\ff\10\00\00\00", "");
    let outcome = run_hostile(component, spec("oob-result", &[])).await;
    let message = expect_trap(&outcome, "invalid-value");
    assert!(message.contains("out of bounds"), "{message}");
}

#[tokio::test]
async fn a_result_string_longer_than_memory_traps() {
    // err(string at 64, 2 GiB - 1 bytes) in a 64 KiB memory.
    let component = returning(r"\01\00\00\00\40\00\00\00\ff\ff\ff\7f", "abc");
    let outcome = run_hostile(component, spec("long-result", &[])).await;
    expect_trap(&outcome, "invalid-value");
}

#[tokio::test]
async fn an_invalid_result_discriminant_traps() {
    let component = returning(r"\07\00\00\00\00\00\00\00\00\00\00\00", "");
    let outcome = run_hostile(component, spec("bad-discriminant", &[])).await;
    let message = expect_trap(&outcome, "invalid-value");
    assert!(message.contains("discriminant"), "{message}");
}

#[tokio::test]
async fn an_out_of_bounds_result_pointer_traps() {
    let component = CoreModule {
        run: "(i32.const -16)",
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("oob-return-pointer", &[])).await;
    expect_trap(&outcome, "invalid-value");
}

#[tokio::test]
async fn a_misaligned_result_pointer_traps() {
    let component = CoreModule {
        run: "(i32.const 17)",
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("misaligned-return-pointer", &[])).await;
    expect_trap(&outcome, "invalid-value");
}

#[tokio::test]
async fn realloc_returning_an_out_of_bounds_pointer_traps() {
    let component = CoreModule {
        realloc: "(i32.const -64)",
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("oob-realloc", &[])).await;
    expect_trap(&outcome, "invalid-value");
}

#[tokio::test]
async fn realloc_returning_a_misaligned_pointer_traps() {
    let component = CoreModule {
        realloc: "(i32.const 4097)",
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("misaligned-realloc", &[])).await;
    expect_trap(&outcome, "invalid-value");
}

#[tokio::test]
async fn realloc_trapping_is_recorded() {
    let component = CoreModule {
        realloc: "(unreachable)",
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("trapping-realloc", &[])).await;
    expect_trap(&outcome, "unreachable");
}

use corpus::LOG_IMPORT;

#[tokio::test]
async fn an_invalid_enum_passed_to_an_import_traps() {
    let component = CoreModule {
        imports: LOG_IMPORT,
        run: "(call $log (i32.const 99) (i32.const 64) (i32.const 3)) (i32.const 0)",
        extra: r#"(data (i32.const 64) "abc")"#,
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("bad-enum-import", &[])).await;
    expect_trap(&outcome, "invalid-value");
    assert!(outcome.logs.is_empty());
}

#[tokio::test]
async fn invalid_utf8_passed_to_an_import_traps() {
    let component = CoreModule {
        imports: LOG_IMPORT,
        run: "(call $log (i32.const 2) (i32.const 64) (i32.const 3)) (i32.const 0)",
        extra: r#"(data (i32.const 64) "\ff\fe\fd")"#,
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("bad-utf8-import", &[])).await;
    expect_trap(&outcome, "invalid-value");
    assert!(outcome.logs.is_empty());
}

#[tokio::test]
async fn an_out_of_bounds_string_passed_to_an_import_traps() {
    let component = CoreModule {
        imports: LOG_IMPORT,
        run: "(call $log (i32.const 2) (i32.const 65000) (i32.const 100000)) (i32.const 0)",
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("oob-import", &[])).await;
    expect_trap(&outcome, "invalid-value");
}

#[tokio::test]
async fn the_well_behaved_wat_template_succeeds() {
    // The baseline of every WAT case above: only the part a case replaces makes it fail.
    let component = CoreModule {
        imports: LOG_IMPORT,
        run: "(call $log (i32.const 2) (i32.const 64) (i32.const 3)) (i32.const 0)",
        extra: r#"(data (i32.const 64) "abc")"#,
        ..CoreModule::default()
    }
    .component();
    let outcome = run_hostile(component, spec("wat-baseline", &[])).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:#?}");
    assert_eq!(outcome.logs.len(), 1);
    assert_eq!(outcome.logs[0].message, "abc");
    let component = returning(r"\01\00\00\00\40\00\00\00\03\00\00\00", "abc");
    let outcome = run_hostile(component, spec("wat-baseline-err", &[])).await;
    assert_eq!(
        outcome.kind,
        OutcomeKind::HandlerFailed {
            reason: "abc".into()
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Floods
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_log_flood_succeeds_with_lines_dropped_and_counted() {
    let outcome = flooding_guest("guest-log-flood").await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{:#?}", outcome.kind);
    assert_eq!(outcome.logs.len(), DEFAULT_LOG_LINES);
    assert_eq!(outcome.logs[0].message, "flood line 0");
    assert_eq!(outcome.logs_dropped, 100_000 - DEFAULT_LOG_LINES as u64);
}

#[tokio::test]
async fn a_stdout_and_stderr_flood_succeeds_truncated_and_counted() {
    let outcome = flooding_guest("guest-stdout-flood").await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{:#?}", outcome.kind);
    assert_eq!(outcome.stdout.len(), DEFAULT_OUTPUT_BYTES);
    assert_eq!(outcome.stderr.len(), DEFAULT_OUTPUT_BYTES);
    assert_eq!(
        outcome.output_dropped,
        2 * (10 << 20) - 2 * DEFAULT_OUTPUT_BYTES as u64
    );
}

#[tokio::test]
async fn a_keyfactor_call_flood_hits_its_budget() {
    let outcome = rust_guest("guest-keyfactor-flood", &[]).await;
    expect_limit(&outcome, LimitKind::Calls("keyfactor-calls"));
}

#[tokio::test]
async fn a_mail_flood_hits_its_budget() {
    let outcome = rust_guest("guest-mail-flood", &[]).await;
    expect_limit(&outcome, LimitKind::Calls("mail-calls"));
}

#[tokio::test]
async fn an_http_flood_hits_its_budget() {
    let outcome = rust_guest("guest-http-flood", &[]).await;
    expect_limit(&outcome, LimitKind::Calls("http-calls"));
}

#[tokio::test]
async fn a_huge_random_request_is_refused() {
    let outcome = rust_guest("guest-random-drain", &[]).await;
    let message = expect_trap(&outcome, "guest-error");
    assert!(message.contains("1073741824"), "{message}");
    // The cap is 64 KiB (SECURITY.md): exactly that much is handed over, one byte more is not.
    let outcome = rust_guest("guest-random-drain", &[("bytes", "65536")]).await;
    assert_eq!(
        outcome.kind,
        OutcomeKind::HandlerFailed {
            reason: "got 65536 random bytes".into()
        },
        "{:#?}",
        outcome.kind
    );
    let outcome = rust_guest("guest-random-drain", &[("bytes", "65537")]).await;
    let message = expect_trap(&outcome, "guest-error");
    assert!(message.contains("65537"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Reaching outside the sandbox
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn env_args_files_and_stdin_are_empty() {
    let outcome = rust_guest("guest-snoop", &[]).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{:#?}", outcome.kind);
    let log: Vec<&str> = outcome.logs.iter().map(|l| l.message.as_str()).collect();
    assert!(log.contains(&"env: 0 variables"), "{log:#?}");
    assert!(log.contains(&"args: 0 arguments"), "{log:#?}");
    assert!(
        log.iter().any(|l| l.starts_with("read /etc/passwd: ")),
        "{log:#?}"
    );
}

#[tokio::test]
async fn a_component_using_sockets_links_and_every_attempt_is_denied() {
    use std::io::ErrorKind;
    use std::net::{TcpListener, UdpSocket};
    // Real listeners on loopback: if any socket call got through, something would arrive here.
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp listener");
    tcp.set_nonblocking(true).expect("nonblocking");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    udp.set_nonblocking(true).expect("nonblocking");
    let tcp_port = tcp.local_addr().expect("addr").port().to_string();
    let udp_port = udp.local_addr().expect("addr").port().to_string();

    let bytes = guest_bytes("guest-sockets");
    let handler = corpus::load(
        bytes,
        spec(
            "sockets",
            &[("tcp_port", &tcp_port), ("udp_port", &udp_port)],
        ),
    )
    .await
    .expect("a component importing wasi:sockets loads");
    let imports = handler.component().imports();
    assert!(
        imports.inert.iter().any(|i| i.starts_with("wasi:sockets/")),
        "{imports:?}"
    );
    assert!(
        !imports.wasi.iter().any(|i| i.starts_with("wasi:sockets/")),
        "sockets are reported as inert, not as working WASI: {imports:?}"
    );
    let outcome = corpus::invoke(&handler).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:#?}");
    let log: Vec<&str> = outcome.logs.iter().map(|l| l.message.as_str()).collect();
    for attempt in [
        "tcp connect",
        "udp send",
        "tcp listen",
        "udp bind",
        "dns lookup",
    ] {
        assert!(
            log.iter()
                .any(|line| line.starts_with(&format!("{attempt}: "))),
            "{attempt} was not attempted and refused: {log:#?}"
        );
    }
    assert!(
        log.iter()
            .filter(|l| !l.starts_with("dns lookup"))
            .all(|l| l.contains("Permission denied") || l.contains("denied")),
        "{log:#?}"
    );
    match tcp.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("something connected to the test's TCP listener: {other:?}"),
    }
    let mut buf = [0u8; 64];
    match udp.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("a datagram reached the test's UDP socket: {other:?}"),
    }
    corpus::assert_healthy().await;
}

fn foreign_import_component(foreign_wit: &str, import: &str, core_import: &str) -> Vec<u8> {
    let (mut resolve, _) = corpus::handler_wit();
    let package = resolve
        .push_str(
            "foreign.wit",
            &format!(
                "package jobhook-tests:foreign;
                 world foreign {{ include jobhook:handler/handler@0.2.0; import {import}; }}
                 {foreign_wit}"
            ),
        )
        .expect("foreign WIT parses");
    let world = resolve
        .select_world(&[package], Some("foreign"))
        .expect("world");
    let wat = CoreModule {
        imports: core_import,
        ..CoreModule::default()
    }
    .wat();
    corpus::encode_component(wat::parse_str(wat).expect("wat"), &resolve, world)
}

#[tokio::test]
async fn an_import_the_engine_does_not_provide_is_refused_at_load() {
    let component = foreign_import_component(
        "package evil:net@0.1.0 { interface raw { connect: func(addr: string) -> u32; } }",
        "evil:net/raw@0.1.0",
        r#"(import "evil:net/raw@0.1.0" "connect" (func (param i32 i32) (result i32)))"#,
    );
    let error = refuse(component, spec("foreign-import", &[])).await;
    assert!(
        matches!(&error, LoadError::NotProvided { import, .. } if import == "evil:net/raw@0.1.0"),
        "{error:?}"
    );
}

#[tokio::test]
async fn wasi_http_is_refused_at_load_pointing_to_the_http_capability() {
    let component = foreign_import_component(
        "package wasi:http@0.2.0 { interface outgoing-handler { handle: func(url: string) -> u32; } }",
        "wasi:http/outgoing-handler@0.2.0",
        r#"(import "wasi:http/outgoing-handler@0.2.0" "handle" (func (param i32 i32) (result i32)))"#,
    );
    let error = refuse(component, spec("wasi-http", &[])).await;
    match &error {
        LoadError::NotProvided { hint, .. } => {
            assert!(hint.contains("jobhook:handler/http"), "{hint}")
        }
        other => panic!("expected NotProvided, got {other:?}"),
    }
}

/// A WASI import of another release than the one the engine links (WASI 0.3's, an unversioned
/// one) is refused before compiling, naming the release to build for.
#[tokio::test]
async fn a_wasi_import_of_another_release_is_refused_before_compiling() {
    for (version, says) in [("@0.3.0", "WASI 0.3.0"), ("", "no WASI release")] {
        let import = format!("wasi:cli/environment{version}");
        let component = foreign_import_component(
            &format!(
                "package wasi:cli{version} {{ interface environment {{ initial-cwd: func() -> u32; }} }}"
            ),
            &import,
            &format!(r#"(import "{import}" "initial-cwd" (func (result i32)))"#),
        );
        let options = jobhook::LoadOptions::default();
        let error = jobhook::runtime::loader::precheck(&component, None, &options)
            .expect_err("refused before compiling");
        match &error {
            LoadError::NotProvided { import: i, hint } => {
                assert_eq!(*i, import);
                assert!(hint.contains(says), "{hint}");
                assert!(hint.contains("build the handler for WASI 0.2"), "{hint}");
            }
            other => panic!("{import}: expected NotProvided, got {other:?}"),
        }
    }
}

/// An import of an interface the engine provides, in a form it does not — a WASI 0.2 interface
/// wasmtime-wasi lacks, jobhook's `log` with a function an edited WIT added — is named with what
/// to do for its kind, not reported as the exports not fitting.
#[tokio::test]
async fn an_import_of_an_interface_the_engine_lacks_is_named_with_what_to_do() {
    let wasi = foreign_import_component(
        "package wasi:cli@0.2.6 { interface nonexistent { probe: func() -> u32; } }",
        "wasi:cli/nonexistent@0.2.6",
        r#"(import "wasi:cli/nonexistent@0.2.6" "probe" (func (result i32)))"#,
    );
    let text = std::fs::read_to_string(jobhook_testkit::workspace_root().join("wit/jobhook.wit"))
        .expect("wit");
    let declared = "    log: func(level: level, message: string);\n";
    assert!(text.contains(declared), "wit/jobhook.wit's log changed");
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve
        .push_str(
            "jobhook.wit",
            &text.replace(declared, &format!("{declared}    flush: func();\n")),
        )
        .expect("parses");
    let world = resolve
        .select_world(&[package], Some("handler"))
        .expect("world");
    let wat = CoreModule {
        imports: r#"(import "jobhook:handler/log@0.2.0" "flush" (func))"#,
        ..CoreModule::default()
    }
    .wat();
    let edited = corpus::encode_component(wat::parse_str(wat).expect("wat"), &resolve, world);
    for (name, component, import, says) in [
        (
            "wasi-nonexistent",
            wasi,
            "wasi:cli/nonexistent@0.2.6",
            "jobhook links WASI 0.2",
        ),
        (
            "edited-log",
            edited,
            "jobhook:handler/log@0.2.0",
            "make its bindings again from wit/ of this engine",
        ),
    ] {
        let error = refuse(component, spec(name, &[])).await;
        match &error {
            LoadError::ImportMismatch {
                import: i, hint, ..
            } => {
                assert_eq!(i, import);
                assert!(hint.contains(says), "{name}: {hint}");
            }
            other => panic!("{name}: expected ImportMismatch, got {other:?}"),
        }
        assert!(!error.to_string().contains("export_handler"), "{error}");
    }
}

#[tokio::test]
async fn a_newer_world_version_is_refused_at_load() {
    let (major, minor, _) = jobhook::runtime::loader::WIT_VERSION;
    let current = format!("@{major}.{minor}.0;");
    let newer = format!("{major}.{}.0", minor + 1);
    let text = std::fs::read_to_string(jobhook_testkit::workspace_root().join("wit/jobhook.wit"))
        .expect("wit");
    assert!(
        text.contains(&current),
        "wit/jobhook.wit is not at {current}"
    );
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve
        .push_str(
            "jobhook.wit",
            &text.replace(&current, &format!("@{newer};")),
        )
        .expect("parses");
    let world = resolve
        .select_world(&[package], Some("handler"))
        .expect("world");
    let import = format!("jobhook:handler/log@{newer}");
    let imports = format!(r#"(import "{import}" "log" (func $log (param i32 i32 i32)))"#);
    let wat = CoreModule {
        imports: &imports,
        ..CoreModule::default()
    }
    .wat();
    let component = corpus::encode_component(wat::parse_str(wat).expect("wat"), &resolve, world);
    let error = refuse(component, spec("newer-world", &[])).await;
    assert!(
        matches!(&error, LoadError::UnsupportedVersion { import: i, .. } if *i == import),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(&jobhook::runtime::loader::supported_versions()),
        "the refusal names the versions this engine runs: {error}"
    );
    // Named as an author reads them, not only as the loader lists them.
    assert!(error.to_string().contains("0.1.0"), "{error}");
    assert!(error.to_string().contains("0.2.0"), "{error}");
}

#[tokio::test]
async fn an_ungranted_capability_is_refused_at_load() {
    let mut s = spec("keyfactor-flood", &[]);
    s.grants.keyfactor = None;
    let error = refuse(guest_bytes("guest-keyfactor-flood"), s).await;
    assert_eq!(
        error,
        LoadError::NotGranted {
            capability: Capability::Keyfactor
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Not a handler at all
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_component_for_another_world_is_refused() {
    let error = refuse(guest_bytes("guest-wrong-world"), spec("wrong-world", &[])).await;
    assert!(matches!(error, LoadError::WrongWorld(_)), "{error:?}");
}

#[tokio::test]
async fn a_core_module_is_refused() {
    let module = wat::parse_str(CoreModule::default().wat()).expect("wat");
    assert_eq!(
        refuse(module, spec("core", &[])).await,
        LoadError::CoreModule
    );
}

#[tokio::test]
async fn garbage_bytes_are_refused() {
    assert_eq!(
        refuse(Vec::new(), spec("empty", &[])).await,
        LoadError::Empty
    );
    for bytes in [b"\x7fELF\x02\x01\x01 not wasm".to_vec(), vec![0u8; 1 << 20]] {
        assert_eq!(
            refuse(bytes, spec("garbage", &[])).await,
            LoadError::NotWasm
        );
    }
}

#[tokio::test]
async fn a_truncated_component_is_refused_as_invalid() {
    let mut bytes = guest_bytes("guest-trap");
    bytes.truncate(bytes.len() * 2 / 3);
    let error = refuse(bytes, spec("truncated", &[])).await;
    assert!(matches!(error, LoadError::Invalid(_)), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// Isolation between invocations
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_runs_leave_no_state_behind() {
    let handler = corpus::load(guest_bytes("guest-counter"), spec("counter", &[]))
        .await
        .expect("load");
    for _ in 0..3 {
        assert_eq!(corpus::invoke(&handler).await.kind, OutcomeKind::Succeeded);
        let _ = rust_guest("guest-memory-bomb", &[]).await;
    }
    // A slot reused after a trap starts clean too.
    let _ = rust_guest("guest-trap", &[]).await;
    assert_eq!(corpus::invoke(&handler).await.kind, OutcomeKind::Succeeded);
}
