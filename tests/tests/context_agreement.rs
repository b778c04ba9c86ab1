//! The engine and the SDK decode Keyfactor-style context JSON with two separate decoders: the
//! engine's `JobContext::from_json_bytes` (the reference) and the SDK's
//! `testing::context_from_json`, which handler tests use to build contexts from the same files.
//! Neither crate may depend on the other, so instead of sharing code this checks that they agree:
//! on every sample context in the repository and on generated documents, valid and malformed,
//! both accept with equal values field by field, or both refuse, naming the same field.
//!
//! Runs `PROPTEST_CASES` cases per property (default 1024).

mod cases;

use std::path::{Path, PathBuf};

use jobhook::JobContext;
use jobhook::context::ContextError;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

mod json_strategy;
use json_strategy::any_json;

/// One decoded context in terms both decoders share: every field, enums by name and number,
/// GUIDs as canonical text, timestamps as seconds and nanoseconds.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    agent_id: String,
    username: String,
    client_machine: String,
    job_result: (&'static str, i64),
    job_id: String,
    job_type: String,
    job_type_id: String,
    operation_type: (&'static str, i64),
    certificate_id: Option<i32>,
    request_timestamp: Option<(i64, u32)>,
    current_retry_count: i32,
}

fn from_host(c: &JobContext) -> Decoded {
    Decoded {
        agent_id: c.agent_id.to_string(),
        username: c.username.clone(),
        client_machine: c.client_machine.clone(),
        job_result: (c.job_result.name(), c.job_result.number()),
        job_id: c.job_id.to_string(),
        job_type: c.job_type.clone(),
        job_type_id: c.job_type_id.to_string(),
        operation_type: (c.operation_type.name(), c.operation_type.number()),
        certificate_id: c.certificate_id,
        request_timestamp: c
            .request_timestamp
            .map(|t| (t.timestamp(), t.timestamp_subsec_nanos())),
        current_retry_count: c.current_retry_count,
    }
}

fn from_sdk(c: &jobhook_sdk::Context) -> Decoded {
    Decoded {
        agent_id: c.agent_id.to_string(),
        username: c.username.clone(),
        client_machine: c.client_machine.clone(),
        job_result: (c.job_result.name(), i64::from(c.job_result.number())),
        job_id: c.job_id.to_string(),
        job_type: c.job_type.clone(),
        job_type_id: c.job_type_id.to_string(),
        operation_type: (
            c.operation_type.name(),
            i64::from(c.operation_type.number()),
        ),
        certificate_id: c.certificate_id,
        request_timestamp: c
            .request_timestamp
            .map(|t| (t.timestamp(), t.timestamp_subsec_nanos())),
        current_retry_count: c.current_retry_count,
    }
}

/// The field a host error is about, if it is about one field.
fn host_error_field(e: &ContextError) -> Option<&'static str> {
    match e {
        ContextError::Missing(field)
        | ContextError::Null(field)
        | ContextError::Duplicate(field)
        | ContextError::Invalid { field, .. } => Some(field),
        _ => None,
    }
}

/// Decodes `json` with both decoders and asserts that they agree; returns whether it was
/// accepted.
fn assert_agree(json: &str) -> bool {
    let host = JobContext::from_json_bytes(json.as_bytes());
    let sdk = jobhook_sdk::testing::context_from_json(json);
    match (&host, &sdk) {
        (Ok(h), Ok(s)) => {
            assert_eq!(
                from_sdk(s),
                from_host(h),
                "SDK (left) and engine disagree on {json}"
            );
            true
        }
        (Err(h), Err(s)) => {
            let s = s.to_string();
            match host_error_field(h) {
                Some(field) => assert!(
                    s.contains(&format!("context field '{field}'")),
                    "the engine refuses field {field} ({h}) but the SDK says: {s}\n  on {json}"
                ),
                None => assert!(
                    !s.contains("context field '"),
                    "the engine refuses the document as a whole ({h}) but the SDK names a \
                     field: {s}\n  on {json}"
                ),
            }
            false
        }
        (Ok(_), Err(s)) => panic!("the engine accepts but the SDK refuses ({s}): {json}"),
        (Err(h), Ok(_)) => panic!("the SDK accepts but the engine refuses ({h}): {json}"),
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Every `contexts/*.json` file of every example.
fn sample_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let examples = std::fs::read_dir(workspace().join("examples")).expect("examples/");
    for example in examples.flatten() {
        let Ok(contexts) = std::fs::read_dir(example.path().join("contexts")) else {
            continue;
        };
        for file in contexts.flatten() {
            if file.path().extension().is_some_and(|e| e == "json") {
                files.push(file.path());
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_sample_context_decodes_the_same() {
    let files = sample_files();
    assert!(
        files.len() >= 8,
        "expected the examples' contexts, found {files:?}"
    );
    for file in &files {
        let json = std::fs::read_to_string(file).expect("readable sample");
        assert!(assert_agree(&json), "{} is refused", file.display());
    }
    let testkit = jobhook_testkit::sample_context_json().to_string();
    assert!(assert_agree(&testkit), "the testkit sample is refused");
}

#[test]
fn hand_picked_edges_agree() {
    let base = jobhook_testkit::sample_context_json();
    let edit = |field: &str, value: Option<Value>| {
        let mut v = base.clone();
        if let Value::Object(map) = &mut v {
            match value {
                Some(value) => {
                    map.insert(field.to_string(), value);
                }
                None => {
                    map.remove(field);
                }
            }
        }
        v.to_string()
    };
    let mut documents = vec![
        String::new(),
        "null".into(),
        "[]".into(),
        "\"x\"".into(),
        "{}".into(),
        "{\"AgentId\": ".into(),
        " ".repeat(64 * 1024 + 1),
        format!("{{\"Client\": \"{}\"}}", "x".repeat(64 * 1024)),
    ];
    let fields = FIELDS;
    let values = [
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(4),
        json!(2.0),
        json!(2.5),
        json!(1e99),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(2_147_483_648_i64),
        json!(""),
        json!(" 4 "),
        json!("+4"),
        json!("failure"),
        json!(" Add "),
        json!("Exploded"),
        json!("x".repeat(4096)),
        json!("x".repeat(4097)),
        json!("FA406103-0B3E-4F0B-8D3B-0C1F8E6C0A11"),
        json!("{fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11}"),
        json!("{fa4061030b3e4f0b8d3b0c1f8e6c0a11}"),
        json!("fa4061030b3e4f0b8d3b0c1f8e6c0a11"),
        json!(" fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11 "),
        json!("urn:uuid:fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11"),
        json!("fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a1"),
        json!("2023-05-03T23:18:48Z"),
        json!("2023-05-04T01:18:48+02:00"),
        json!("2023-05-03T23:18:48"),
        json!("2023-05-03 23:18:48.1234567"),
        json!("2023-05-03t23:18:48z"),
        json!("2023-05-03"),
        json!("May 3"),
        json!("/Date(1683155928000)/"),
        json!("/Date(1683155928000+0200)/"),
        json!("/Date(-62135596800000)/"),
        json!("/Date(-62135596800001)/"),
        json!("/Date(253402300800000)/"),
        json!("/Date(1683155928000+02)/"),
        json!("/Date(+1)/"),
        json!("/Date()/"),
        json!([]),
        json!({}),
    ];
    for field in fields {
        documents.push(edit(field, None));
        for value in &values {
            documents.push(edit(field, Some(value.clone())));
        }
        documents.push(edit(&field.to_lowercase(), Some(base[field].clone())));
        let mut renamed = base.clone();
        if let Value::Object(map) = &mut renamed
            && let Some(v) = map.remove(field)
        {
            map.insert(field.to_uppercase(), v);
        }
        documents.push(renamed.to_string());
    }
    let accepted = documents.iter().filter(|d| assert_agree(d)).count();
    assert!(
        accepted > 50 && accepted < documents.len(),
        "{accepted} accepted"
    );
}

use jobhook::context::FIELDS;

/// A value that does not fit the field, whatever it is.
fn wrong_type() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<f64>().prop_map(|n| json!(n)),
        Just(json!([])),
        Just(json!({"Value": 1})),
        any_json(),
    ]
}

fn guid_text(n: u128) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (n >> 96) as u32,
        (n >> 80) as u16,
        (n >> 64) as u16,
        (n >> 48) as u16,
        n & 0xffff_ffff_ffff
    )
}

fn guid_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => any::<u128>().prop_map(|n| json!(guid_text(n))),
        2 => any::<u128>().prop_map(|n| json!(guid_text(n).to_uppercase())),
        1 => any::<u128>().prop_map(|n| json!(format!("{{{}}}", guid_text(n)))),
        1 => any::<u128>().prop_map(|n| json!(format!("{{{n:032X}}}"))),
        1 => any::<u128>().prop_map(|n| json!(format!("{n:032x}"))),
        1 => any::<u128>().prop_map(|n| json!(format!("  {}\t", guid_text(n)))),
        1 => any::<u128>().prop_map(|n| json!(format!("urn:uuid:{}", guid_text(n)))),
        1 => (any::<u128>(), 0usize..36).prop_map(|(n, cut)| json!(guid_text(n)[..cut].to_string())),
        1 => "[0-9a-fA-F{}-]{30,40}".prop_map(Value::String),
        1 => ".{0,40}".prop_map(Value::String),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => wrong_type(),
    ]
}

fn string_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => ".{0,40}".prop_map(Value::String),
        1 => (4090usize..4100).prop_map(|n| json!("k".repeat(n))),
        1 => (2040usize..2050).prop_map(|n| json!("é".repeat(n))),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => wrong_type(),
    ]
}

const JOB_RESULTS: &[&str] = &["Unknown", "InProcess", "Success", "Warning", "Failure"];
const OPERATION_TYPES: &[&str] = &[
    "Unknown",
    "Inventory",
    "Add",
    "Remove",
    "Create",
    "CreateAdd",
    "Reenrollment",
    "Discovery",
    "SetPassword",
    "FetchLogs",
];

/// `text` with the case of each ASCII letter flipped where `bits` says so.
fn recase(text: &str, bits: u64) -> String {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            if bits >> (i % 64) & 1 == 1 {
                if c.is_ascii_uppercase() {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                }
            } else {
                c
            }
        })
        .collect()
}

fn enum_value(names: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(names).prop_map(|n| json!(n)),
        2 => (prop::sample::select(names), any::<u64>()).prop_map(|(n, bits)| json!(recase(n, bits))),
        1 => (prop::sample::select(names), " {0,2}", " {0,2}")
            .prop_map(|(n, a, b)| json!(format!("{a}{n}{b}"))),
        3 => (-3i64..15).prop_map(|n| json!(n)),
        1 => (-3i64..15, " {0,2}").prop_map(|(n, pad)| json!(format!("{pad}{n}{pad}"))),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => any::<u64>().prop_map(|n| json!(n)),
        1 => prop::sample::select(vec![2.0, 2.5, -0.0, 1e99]).prop_map(|n| json!(n)),
        1 => prop::sample::select(vec!["", "In Process", "Exploded", "+2", "0x2", "Success!"])
            .prop_map(|s| json!(s)),
        1 => ".{0,20}".prop_map(Value::String),
        1 => wrong_type(),
    ]
}

fn int_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (-5i64..100).prop_map(|n| json!(n)),
        2 => prop::sample::select(vec![
            i64::from(i32::MIN) - 1,
            i64::from(i32::MIN),
            i64::from(i32::MAX),
            i64::from(i32::MAX) + 1,
            i64::MIN,
            i64::MAX,
        ])
        .prop_map(|n| json!(n)),
        1 => any::<u64>().prop_map(|n| json!(n)),
        2 => (any::<i64>(), " {0,2}").prop_map(|(n, pad)| json!(format!("{pad}{n}{pad}"))),
        1 => prop::sample::select(vec!["", "lots", "1.0", "1e3", "+7", "-0", "0x10"])
            .prop_map(|s| json!(s)),
        1 => prop::sample::select(vec![1.0, 1.5, -0.0, 1e99]).prop_map(|n| json!(n)),
        1 => wrong_type(),
    ]
}

fn timestamp_value() -> impl Strategy<Value = Value> {
    let valid = (
        0u32..10_000,
        1u32..13,
        1u32..29,
        0u32..24,
        0u32..60,
        0u32..60,
    );
    prop_oneof![
        4 => valid.clone().prop_map(|(y, mo, d, h, mi, s)| json!(format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"))),
        2 => (valid.clone(), -14i32..15, 0u32..60).prop_map(|((y, mo, d, h, mi, s), oh, om)| {
            let sign = if oh < 0 { '-' } else { '+' };
            json!(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{sign}{:02}:{om:02}", oh.abs()))
        }),
        2 => (valid.clone(), "[T ]", "(\\.[0-9]{1,12})?").prop_map(|((y, mo, d, h, mi, s), sep, frac)| {
            json!(format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}"))
        }),
        2 => "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|z|[+-][0-9]{2}:?[0-9]{2})?"
            .prop_map(Value::String),
        1 => (0usize..10).prop_map(|n| json!(format!("{}2023-05-03T23:18:48Z", " ".repeat(n * 10)))),
        1 => ".{0,40}".prop_map(Value::String),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => wrong_type(),
    ]
}

fn value_for(field: &str) -> BoxedStrategy<Value> {
    match field {
        "AgentId" | "JobId" | "JobTypeId" => guid_value().boxed(),
        "Username" | "ClientMachine" | "JobType" => string_value().boxed(),
        "JobResult" => enum_value(JOB_RESULTS).boxed(),
        "OperationType" => enum_value(OPERATION_TYPES).boxed(),
        "CertificateId" | "CurrentRetryCount" => int_value().boxed(),
        _ => timestamp_value().boxed(),
    }
}

/// A well-formed value for `field`, in any of the forms the engine accepts.
fn valid_value_for(field: &str) -> BoxedStrategy<Value> {
    match field {
        "AgentId" | "JobId" | "JobTypeId" => prop_oneof![
            4 => any::<u128>().prop_map(|n| json!(guid_text(n))),
            1 => any::<u128>().prop_map(|n| json!(format!("{{{}}}", guid_text(n).to_uppercase()))),
            1 => any::<u128>().prop_map(|n| json!(format!("{n:032x}"))),
        ]
        .boxed(),
        "Username" | "ClientMachine" | "JobType" => {
            "[A-Za-z0-9.\\\\ ]{0,30}".prop_map(Value::String).boxed()
        }
        "JobResult" => prop_oneof![
            (prop::sample::select(JOB_RESULTS), any::<u64>())
                .prop_map(|(n, bits)| json!(recase(n, bits))),
            (-3i64..15).prop_map(|n| json!(n)),
        ]
        .boxed(),
        "OperationType" => prop_oneof![
            (prop::sample::select(OPERATION_TYPES), any::<u64>())
                .prop_map(|(n, bits)| json!(recase(n, bits))),
            (-3i64..15).prop_map(|n| json!(n)),
        ]
        .boxed(),
        "CertificateId" | "CurrentRetryCount" => prop_oneof![
            any::<i32>().prop_map(|n| json!(n)),
            (0i32..100).prop_map(|n| json!(n.to_string())),
        ]
        .boxed(),
        _ => (
            2000i32..2100,
            1u32..13,
            1u32..29,
            0u32..24,
            0u32..60,
            0u32..60,
            "(Z|[+-]0[0-9]:[0-5][0-9])?",
        )
            .prop_map(|(y, mo, d, h, mi, s, zone)| {
                json!(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{zone}"))
            })
            .boxed(),
    }
}

/// How one field appears in a generated document.
#[derive(Debug, Clone)]
enum Presence {
    Absent,
    Null,
    Value(Value),
    /// Given twice: under its own name and under another casing.
    Twice(Value, Value),
}

fn presence(field: &'static str) -> impl Strategy<Value = Presence> {
    prop_oneof![
        40 => valid_value_for(field).prop_map(Presence::Value),
        4 => value_for(field).prop_map(Presence::Value),
        1 => Just(Presence::Absent),
        1 => Just(Presence::Null),
        1 => (value_for(field), value_for(field)).prop_map(|(a, b)| Presence::Twice(a, b)),
    ]
}

/// A context-shaped document: each field absent, null, well-formed, typed or given
/// twice, under its name in random ASCII case, plus unknown fields.
fn context_document() -> impl Strategy<Value = String> {
    let fields: Vec<_> = FIELDS
        .iter()
        .map(|f| (presence(f), prop_oneof![3 => Just(0u64), 1 => any::<u64>()]))
        .collect();
    (
        fields,
        prop::collection::btree_map("[A-Za-z]{1,16}", any_json(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(fields, extra, pretty)| {
            let mut map = Map::new();
            for (field, (presence, bits)) in FIELDS.iter().zip(fields) {
                let key = recase(field, bits);
                match presence {
                    Presence::Absent => {}
                    Presence::Null => {
                        map.insert(key, Value::Null);
                    }
                    Presence::Value(v) => {
                        map.insert(key, v);
                    }
                    Presence::Twice(a, b) => {
                        let other = if key == field.to_lowercase() {
                            field.to_uppercase()
                        } else {
                            field.to_lowercase()
                        };
                        map.insert(key, a);
                        map.insert(other, b);
                    }
                }
            }
            for (k, v) in extra {
                if !FIELDS.iter().any(|f| f.eq_ignore_ascii_case(&k)) {
                    map.entry(k).or_insert(v);
                }
            }
            let value = Value::Object(map);
            if pretty {
                serde_json::to_string_pretty(&value).expect("serialise")
            } else {
                value.to_string()
            }
        })
}

/// A sample context with one field replaced by a typed or arbitrary value, or removed.
fn one_field_off() -> impl Strategy<Value = String> {
    prop::sample::select(FIELDS.to_vec())
        .prop_flat_map(|field| {
            (
                Just(field),
                prop_oneof![
                    3 => value_for(field).prop_map(Some),
                    1 => any_json().prop_map(Some),
                    1 => Just(None),
                ],
            )
        })
        .prop_map(|(field, value)| {
            let mut v = jobhook_testkit::sample_context_json();
            if let Value::Object(map) = &mut v {
                match value {
                    Some(value) => {
                        map.insert(field.to_string(), value);
                    }
                    None => {
                        map.remove(field);
                    }
                }
            }
            v.to_string()
        })
}

/// A generated context document with one of its keys written a second time under exactly
/// the same name (which a parsed JSON object cannot show: it keeps the last), with the same
/// value or another; mostly a known field, sometimes an unknown one.
fn exact_duplicate() -> impl Strategy<Value = String> {
    (
        context_document(),
        any::<usize>(),
        any::<bool>(),
        any_json(),
        any::<bool>(),
    )
        .prop_map(|(json, pick, same, other, prefer_known)| {
            let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&json) else {
                return json;
            };
            let known: Vec<&String> = map
                .keys()
                .filter(|k| FIELDS.iter().any(|f| f.eq_ignore_ascii_case(k)))
                .collect();
            let keys: Vec<&String> = if prefer_known && !known.is_empty() {
                known
            } else {
                map.keys().collect()
            };
            let Some(key) = keys.get(pick % keys.len().max(1)) else {
                return json;
            };
            let value = if same { map[*key].clone() } else { other };
            let mut entries: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
                .collect();
            let repeat = format!("{}:{value}", Value::String((*key).clone()));
            let at = pick % (entries.len() + 1);
            entries.insert(at, repeat);
            format!("{{{}}}", entries.join(","))
        })
}

proptest! {
    #![proptest_config(cases::config(1024))]

    #[test]
    fn exact_duplicate_keys_agree(json in exact_duplicate()) {
        assert_agree(&json);
    }

    #[test]
    fn generated_contexts_agree(json in context_document()) {
        assert_agree(&json);
    }

    #[test]
    fn single_field_changes_agree(json in one_field_off()) {
        assert_agree(&json);
    }

    #[test]
    fn arbitrary_json_agrees(value in any_json()) {
        assert_agree(&value.to_string());
    }

    #[test]
    fn arbitrary_text_agrees(text in ".{0,200}") {
        assert_agree(&text);
    }
}

/// The generators must reach both outcomes often, or agreement would be cheap.
#[test]
fn generated_contexts_are_both_accepted_and_refused() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let strategy = context_document();
    let mut accepted = 0;
    for _ in 0..500 {
        let json = strategy.new_tree(&mut runner).expect("generate").current();
        if assert_agree(&json) {
            accepted += 1;
        }
    }
    assert!((25..475).contains(&accepted), "{accepted} of 500 accepted");
}

/// Both decoders refuse a known field written twice under the same name, naming it.
#[test]
fn an_exact_duplicate_is_refused_by_both() {
    let sample = std::fs::read_to_string(sample_files().first().expect("a sample context"))
        .expect("read a sample context");
    let body = sample.trim_end().strip_suffix('}').expect("an object");
    for doc in [
        format!("{body},\"JobId\":\"0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a02\"}}"),
        format!("{body},\"CurrentRetryCount\":0,\"CurrentRetryCount\":0}}"),
    ] {
        assert!(!assert_agree(&doc), "accepted: {doc}");
        let e = JobContext::from_json_bytes(doc.as_bytes()).unwrap_err();
        assert!(
            matches!(e, ContextError::Duplicate(_)),
            "refused for another reason: {e}"
        );
    }
}
