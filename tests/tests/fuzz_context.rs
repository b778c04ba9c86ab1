//! Fuzzing the context decoder (`JobContext::from_json_bytes` / `from_json_value`) on stable with
//! proptest: arbitrary bytes, arbitrary JSON documents and near-valid contexts never make it
//! panic, and every context it accepts round-trips through `to_json`.
//!
//! Runs `PROPTEST_CASES` cases per target (default 1024); see docs/SECURITY.md to run longer.

mod cases;

use jobhook::JobContext;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

mod json_strategy;
use json_strategy::any_json;

/// A decoded context must survive encoding and decoding again, unchanged, as a value and as bytes.
fn assert_round_trips(context: &JobContext) {
    let encoded = context.to_json();
    let again = JobContext::from_json_value(&encoded)
        .unwrap_or_else(|e| panic!("to_json produced an undecodable context ({e}): {encoded}"));
    assert_eq!(&again, context, "round trip through {encoded}");
    let bytes = serde_json::to_vec(&encoded).expect("serialise");
    assert_eq!(
        JobContext::from_json_bytes(&bytes).as_ref(),
        Ok(context),
        "round trip through bytes"
    );
}

fn decode_bytes(bytes: &[u8]) {
    if let Ok(context) = JobContext::from_json_bytes(bytes) {
        assert_round_trips(&context);
    }
}

fn decode_value(value: &Value) {
    match JobContext::from_json_value(value) {
        Ok(context) => assert_round_trips(&context),
        // Errors must render without panicking, and say something.
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

use jobhook::context::FIELDS;

/// Values that are valid for some field, nearly valid, or at an edge of a type's range.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        // GUIDs: canonical, braced, bare hex, upper case, and near misses.
        any::<u128>().prop_map(|n| json!(format!("{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (n >> 96) as u32, (n >> 80) as u16, (n >> 64) as u16, (n >> 48) as u16,
            n & 0xffff_ffff_ffff))),
        any::<u128>().prop_map(|n| json!(format!("{{{n:032X}}}"))),
        any::<u128>().prop_map(|n| json!(format!("{n:032x}"))),
        "[0-9a-fA-F{}-]{30,40}".prop_map(Value::String),
        // Enum names in any case, numbers in and out of range, numeric strings.
        prop::sample::select(vec![
            "Unknown", "InProcess", "Success", "Warning", "Failure", "Inventory", "Add",
            "Remove", "Create", "CreateAdd", "Reenrollment", "Discovery", "SetPassword",
            "FetchLogs", "success", " FAILURE ", "In Process", "",
        ])
        .prop_map(|s| json!(s)),
        prop::sample::select(vec![
            i64::MIN, -1, 0, 1, 2, 4, 9, 10, 2147483647, 2147483648, -2147483648, -2147483649,
            i64::MAX,
        ])
        .prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n.to_string())),
        any::<f64>().prop_map(|n| json!(n)),
        // Timestamps: well-formed with odd offsets and fractions, and near misses.
        (0u32..10_000, 0u32..14, 0u32..33, 0u32..25, 0u32..61, 0u32..61, 0u32..1_000_000_000)
            .prop_map(|(y, mo, d, h, mi, s, ns)| json!(format!(
                "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ns:09}Z"))),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:?[0-9]{2})?"
            .prop_map(Value::String),
        ".{0,300}".prop_map(Value::String),
        Just(Value::Null),
        any_json(),
    ]
}

/// A context-shaped object: each field present or not, under its name in random ASCII case,
/// with a plausible or arbitrary value, plus unknown fields.
fn near_valid_context() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec((any::<bool>(), any::<u32>(), field_value()), FIELDS.len()),
        prop::collection::btree_map("[A-Za-z]{1,16}", any_json(), 0..3),
    )
        .prop_map(|(fields, extra)| {
            let mut map = Map::new();
            for ((present, case_bits, value), name) in fields.into_iter().zip(FIELDS) {
                if !present {
                    continue;
                }
                let key: String = name
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if case_bits >> (i % 32) & 1 == 1 {
                            c.to_ascii_lowercase()
                        } else {
                            c
                        }
                    })
                    .collect();
                map.insert(key, value);
            }
            for (k, v) in extra {
                map.entry(k).or_insert(v);
            }
            Value::Object(map)
        })
}

/// A valid context with one field replaced: most cases reach the field decoders.
fn one_field_off() -> impl Strategy<Value = Value> {
    (prop::sample::select(FIELDS.to_vec()), field_value()).prop_map(|(field, value)| {
        let mut v = jobhook_testkit::sample_context_json();
        v[field] = value;
        v
    })
}

proptest! {
    #![proptest_config(cases::config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode_bytes(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        decode_value(&value);
        decode_bytes(&serde_json::to_vec(&value).expect("serialise"));
    }

    #[test]
    fn near_valid_contexts_decode_or_are_refused(value in near_valid_context()) {
        decode_value(&value);
    }

    #[test]
    fn single_field_changes_decode_or_are_refused(value in one_field_off()) {
        decode_value(&value);
    }
}

#[test]
fn the_sample_context_round_trips() {
    let context = JobContext::from_json_value(&jobhook_testkit::sample_context_json())
        .expect("sample decodes");
    assert_round_trips(&context);
}
