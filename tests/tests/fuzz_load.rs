//! Fuzzing the load gate (`SandboxedHandler::load`, i.e. `jobhook::runtime::loader`) on stable with proptest:
//! arbitrary bytes, bytes behind a valid component header, and mutations of real components never
//! make it panic; garbage is always refused with a `LoadError`; a mutant that does load runs to
//! an outcome within its budget; and the engine keeps running a healthy handler throughout.
//!
//! Runs `PROPTEST_CASES` cases per target (default 64); see docs/SECURITY.md to run longer.

mod cases;
mod corpus;

use std::sync::OnceLock;

use corpus::{CoreModule, spec};
use jobhook::LoadError;
use jobhook_testkit::guest_bytes;
use proptest::prelude::*;

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

/// Loads `bytes`; when they load, runs them once. Either way the engine must stay healthy.
fn load_and_maybe_run(bytes: Vec<u8>) -> Result<(), LoadError> {
    runtime().block_on(async {
        let result = corpus::load(bytes, spec("fuzzed", &[])).await;
        if let Ok(handler) = &result {
            corpus::invoke(handler).await;
        }
        corpus::assert_healthy().await;
        result.map(|_| ())
    })
}

const COMPONENT_HEADER: &[u8] = b"\0asm\x0d\0\x01\0";

/// One edit of a byte string: overwrite, insert or delete at a position given as a fraction.
#[derive(Debug, Clone)]
enum Edit {
    Set(f64, u8),
    Insert(f64, u8),
    Delete(f64),
    Truncate(f64),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => (0.0..1.0f64, any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        2 => (0.0..1.0f64, any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        2 => (0.0..1.0f64).prop_map(Edit::Delete),
        1 => (0.0..1.0f64).prop_map(Edit::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    let at = |p: f64, len: usize| ((p * len as f64) as usize).min(len.saturating_sub(1));
    for edit in edits {
        let len = bytes.len();
        if len == 0 {
            break;
        }
        match *edit {
            Edit::Set(p, b) => bytes[at(p, len)] = b,
            Edit::Insert(p, b) => bytes.insert(at(p, len), b),
            Edit::Delete(p) => {
                bytes.remove(at(p, len));
            }
            Edit::Truncate(p) => bytes.truncate(at(p, len)),
        }
    }
    bytes
}

fn real_component() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| guest_bytes("log-context"))
}

fn small_component() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        CoreModule {
            imports: corpus::LOG_IMPORT,
            run: "(call $log (i32.const 2) (i32.const 64) (i32.const 3)) (i32.const 0)",
            extra: r#"(data (i32.const 64) "abc")"#,
            ..CoreModule::default()
        }
        .component()
    })
}

proptest! {
    #![proptest_config(cases::config(64))]

    #[test]
    fn arbitrary_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let result = load_and_maybe_run(bytes);
        prop_assert!(result.is_err(), "garbage loaded");
    }

    #[test]
    fn arbitrary_bytes_behind_a_component_header_are_refused(
        body in prop::collection::vec(any::<u8>(), 0..4096)
    ) {
        let mut bytes = COMPONENT_HEADER.to_vec();
        bytes.extend(body);
        let result = load_and_maybe_run(bytes);
        prop_assert!(result.is_err(), "garbage loaded");
    }

    #[test]
    fn mutated_small_components_never_panic(edits in prop::collection::vec(edit(), 1..6)) {
        let _ = load_and_maybe_run(mutate(small_component().to_vec(), &edits));
    }

    #[test]
    fn mutated_real_components_never_panic(edits in prop::collection::vec(edit(), 1..4)) {
        let _ = load_and_maybe_run(mutate(real_component().to_vec(), &edits));
    }
}

#[test]
fn the_unmutated_components_load_and_succeed() {
    for bytes in [small_component(), real_component()] {
        runtime().block_on(async {
            let handler = corpus::load(bytes.to_vec(), spec("original", &[]))
                .await
                .expect("load");
            assert!(corpus::invoke(&handler).await.kind.is_success());
        });
    }
}
