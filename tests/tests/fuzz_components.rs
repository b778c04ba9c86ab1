//! Fuzzing with random **valid** components of our world, on stable with proptest.
//!
//! - Random core modules with exactly the core ABI of the `jobhook:handler` world
//!   (`wit_component::dummy_module` as the shape, `wasm-smith` for random bodies, then
//!   `embed_component_metadata` and `ComponentEncoder`), loaded and invoked: random code in
//!   `run-handler`, `cabi_realloc`, the post-return function and the initializer, calling the
//!   world's imports with random arguments. Each must load (or be refused with a `LoadError`)
//!   and each run must end in an outcome within its budget, without a host panic.
//! - Random values across the boundary with an exact oracle: a `run-handler` returning a
//!   random `result<_, string>` area, and a random call to `log`, whose correct outcome the test
//!   computes from the canonical ABI.
//!
//! Runs `PROPTEST_CASES` cases per target (defaults 64–128); see docs/SECURITY.md to run longer.

mod cases;
mod corpus;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arbitrary::Unstructured;
use corpus::{CoreModule, spec};
use jobhook::OutcomeKind;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use wit_parser::{LiftLowerAbi, ManglingAndAbi};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// The core module shape of the handler world (imports, exports and their types).
fn world_shape() -> &'static [u8] {
    static SHAPE: OnceLock<Vec<u8>> = OnceLock::new();
    SHAPE.get_or_init(|| {
        let (resolve, world) = corpus::handler_wit();
        wit_component::dummy_module(&resolve, world, ManglingAndAbi::Legacy(LiftLowerAbi::Sync))
    })
}

/// wasm-smith settings: only proposals the engine enables, small memories and tables, short
/// functions. Traps and infinite loops are allowed: they are what the engine must contain.
fn smith_config() -> wasm_smith::Config {
    wasm_smith::Config {
        module_shape: Some(world_shape().to_vec()),
        gc_enabled: false,
        exceptions_enabled: false,
        threads_enabled: false,
        shared_everything_threads_enabled: false,
        memory64_enabled: false,
        custom_page_sizes_enabled: false,
        custom_descriptors_enabled: false,
        wide_arithmetic_enabled: false,
        tail_call_enabled: false,
        relaxed_simd_enabled: false,
        // `externref` needs the GC, which the engine switches off (funcref tables remain).
        reference_types_enabled: false,
        max_memories: 1,
        max_memory32_bytes: 4 << 20,
        max_tables: 1,
        max_table_elements: 1_000,
        max_funcs: 16,
        max_instructions: 200,
        max_data_segments: 8,
        max_element_segments: 8,
        max_globals: 16,
        allow_start_export: false,
        ..wasm_smith::Config::default()
    }
}

#[derive(Default, Debug)]
struct Tally {
    cases: AtomicUsize,
    not_generated: AtomicUsize,
    not_encoded: AtomicUsize,
    refused: AtomicUsize,
    refusals: std::sync::Mutex<BTreeMap<String, usize>>,
    outcomes: std::sync::Mutex<BTreeMap<String, usize>>,
}

#[test]
fn random_components_of_the_world_load_and_run_without_host_panics() {
    let tally = Tally::default();
    let mut runner = TestRunner::new(cases::config(64));
    let result = runner.run(&prop::collection::vec(any::<u8>(), 64..8192), |data| {
        tally.cases.fetch_add(1, Ordering::Relaxed);
        let module = match wasm_smith::Module::new(smith_config(), &mut Unstructured::new(&data)) {
            Ok(module) => module.to_bytes(),
            Err(_) => {
                tally.not_generated.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        let (resolve, world) = corpus::handler_wit();
        let mut module = module;
        let component = wit_component::embed_component_metadata(
            &mut module,
            &resolve,
            world,
            wit_component::StringEncoding::UTF8,
        )
        .and_then(|()| {
            wit_component::ComponentEncoder::default()
                .validate(true)
                .module(&module)?
                .encode()
        });
        let Ok(component) = component else {
            tally.not_encoded.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        runtime().block_on(async {
            let mut s = spec("random", &[]);
            s.limits.timeout = Duration::from_millis(100);
            match corpus::load(component, s).await {
                Err(e) => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    *tally
                        .refusals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(
                            e.to_string()
                                .chars()
                                .filter(|c| !c.is_ascii_digit())
                                .take(120)
                                .collect(),
                        )
                        .or_default() += 1;
                }
                Ok(handler) => {
                    let outcome = corpus::invoke(&handler).await;
                    let key = match &outcome.kind {
                        OutcomeKind::Trapped { code, .. } => format!("trapped/{code}"),
                        OutcomeKind::LimitExceeded { limit, .. } => {
                            format!("limit-exceeded/{}", limit.as_str())
                        }
                        other => other.class().to_owned(),
                    };
                    *tally
                        .outcomes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(key)
                        .or_default() += 1;
                }
            }
            corpus::assert_healthy().await;
        });
        Ok(())
    });
    eprintln!("random components: {tally:#?}");
    result.expect("no failure");
    let ran: usize = tally
        .outcomes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .sum();
    assert!(
        ran * 2 >= tally.cases.load(Ordering::Relaxed),
        "fewer than half the generated cases became runnable components: {tally:#?}"
    );
}

/// Memory image below the context (which the host copies in at 4096 and up): the result area at
/// 16..28 and the payload at 64.., zeros elsewhere.
fn image(area: &[u8; 12], payload: &[u8]) -> Vec<u8> {
    let mut memory = vec![0u8; 4096];
    memory[16..28].copy_from_slice(area);
    memory[64..64 + payload.len()].copy_from_slice(payload);
    memory
}

fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// What the canonical ABI makes of a `result<_, string>` area, or `None` when the answer
/// depends on memory the test does not control (the host-written context).
fn expected_result(area: &[u8; 12], payload: &[u8]) -> Option<Result<Option<String>, ()>> {
    let word = |at: usize| u32::from_le_bytes([area[at], area[at + 1], area[at + 2], area[at + 3]]);
    match area[0] {
        0 => Some(Ok(None)),
        1 => {
            let (ptr, len) = (u64::from(word(4)), u64::from(word(8)));
            if ptr + len > 65536 {
                return Some(Err(()));
            }
            if ptr + len > 4096 {
                return None;
            }
            let memory = image(area, payload);
            let bytes = &memory[ptr as usize..(ptr + len) as usize];
            Some(String::from_utf8(bytes.to_vec()).map(Some).map_err(|_| ()))
        }
        _ => Some(Err(())),
    }
}

fn u32_near(interesting: Vec<u32>) -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(interesting),
        0u32..128,
        4000u32..4200,
        65400u32..65600,
        any::<u32>(),
    ]
}

#[test]
fn random_result_values_are_lifted_exactly_or_refused() {
    let strategy = (
        prop_oneof![Just(0u8), Just(1u8), Just(1u8), any::<u8>()],
        u32_near(vec![16, 28, 64, 4095, 4096, 65535, 65536, u32::MAX]),
        u32_near(vec![0, 1, 3, 12, 64, 4096, 65536, u32::MAX, u32::MAX / 2]),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 3),
    );
    let mut runner = TestRunner::new(cases::config(128));
    runner
        .run(&strategy, |(discriminant, ptr, len, payload, padding)| {
            let mut area = [0u8; 12];
            area[0] = discriminant;
            area[1..4].copy_from_slice(&padding);
            area[4..8].copy_from_slice(&ptr.to_le_bytes());
            area[8..12].copy_from_slice(&len.to_le_bytes());
            let component = corpus::returning(&wat_bytes(&area), &wat_bytes(&payload));
            let outcome = runtime().block_on(async {
                let handler = corpus::load(component, spec("result", &[]))
                    .await
                    .expect("load");
                let outcome = corpus::invoke(&handler).await;
                corpus::assert_healthy().await;
                outcome
            });
            match (expected_result(&area, &payload), &outcome.kind) {
                (Some(Ok(None)), OutcomeKind::Succeeded) => {}
                (Some(Ok(Some(reason))), OutcomeKind::HandlerFailed { reason: got }) => {
                    prop_assert_eq!(got, &reason)
                }
                (Some(Err(())), OutcomeKind::Trapped { code, .. }) => {
                    prop_assert_eq!(code, "invalid-value")
                }
                (None, OutcomeKind::HandlerFailed { .. }) => {}
                (None, OutcomeKind::Trapped { code, .. }) => {
                    prop_assert_eq!(code, "invalid-value")
                }
                (expected, got) => {
                    prop_assert!(false, "area {area:?}: expected {expected:?}, got {got:?}")
                }
            }
            Ok(())
        })
        .expect("every result area is lifted exactly or refused");
}

#[test]
fn random_log_calls_are_lifted_exactly_or_refused() {
    let strategy = (
        prop_oneof![0u32..5, any::<u32>()],
        u32_near(vec![64, 4096, 65535, 65536, u32::MAX]),
        u32_near(vec![0, 3, 64, 4096, 65536, u32::MAX]),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    let mut runner = TestRunner::new(cases::config(128));
    runner
        .run(&strategy, |(level, ptr, len, payload)| {
            let run = format!(
                "(call $log (i32.const {level}) (i32.const {ptr}) (i32.const {len})) (i32.const 0)",
                level = level as i32,
                ptr = ptr as i32,
                len = len as i32
            );
            let extra = format!(r#"(data (i32.const 64) "{}")"#, wat_bytes(&payload));
            let component = CoreModule {
                imports: corpus::LOG_IMPORT,
                run: &run,
                extra: &extra,
                ..CoreModule::default()
            }
            .component();
            let outcome = runtime().block_on(async {
                let handler = corpus::load(component, spec("log", &[]))
                    .await
                    .expect("load");
                let outcome = corpus::invoke(&handler).await;
                corpus::assert_healthy().await;
                outcome
            });
            let (start, end) = (u64::from(ptr), u64::from(ptr) + u64::from(len));
            let in_bounds = end <= 65536;
            let message = (end <= 4096).then(|| {
                let memory = image(&[0; 12], &payload);
                String::from_utf8(memory[start as usize..end as usize].to_vec())
            });
            match &outcome.kind {
                OutcomeKind::Succeeded => {
                    prop_assert!(
                        level < 5 && in_bounds,
                        "accepted level {level}, {ptr}+{len}"
                    );
                    prop_assert_eq!(outcome.logs.len(), 1);
                    if let Some(Ok(text)) = message {
                        let kept =
                            jobhook::outcome::truncate(text, jobhook::limits::MAX_LOG_LINE_BYTES);
                        prop_assert_eq!(&outcome.logs[0].message, &kept);
                    }
                }
                OutcomeKind::Trapped { code, .. } => {
                    prop_assert_eq!(code, "invalid-value");
                    prop_assert!(
                        level >= 5 || !in_bounds || matches!(message, Some(Err(_)) | None),
                        "refused a valid call: level {level}, {ptr}+{len}"
                    );
                }
                other => prop_assert!(false, "unexpected outcome {other:?}"),
            }
            Ok(())
        })
        .expect("every log call is lifted exactly or refused");
}
