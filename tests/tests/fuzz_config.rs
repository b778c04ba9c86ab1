//! Fuzzing the configuration parser on stable with proptest: arbitrary text, and mutations of a
//! valid configuration, never panic, and every refusal names the file.
//!
//! Runs `PROPTEST_CASES` cases per target (default 256); longer:
//! `PROPTEST_CASES=100000 cargo test -p jobhook-tests --test fuzz_config`.

mod cases;

use std::path::Path;

use jobhook::app::config::Config;
use proptest::prelude::*;

const VALID: &str = r#"[server]
listen = "127.0.0.1:8480"
max_body_bytes = 65536
[store]
data_dir = "data"
[engine]
max_concurrent_deliveries = 4
[quarantine]
after_failures = 3
[mail]
from = "jobhook@example.com"
[[handlers]]
name = "mail"
component = "Cargo.toml"
job_types = ["7B6BBC1B-D802-4B09-BEC9-F5C221083130", "{44340a94-9b99-410d-8011-598fb176c3c5}"]
properties = { RetryThreshold = "3", Secret = { env = "JOBHOOK_FUZZ_UNSET" } }
max_concurrency = 2
[handlers.limits]
timeout_ms = 500
[handlers.retry]
max_attempts = 2
[handlers.grants.mail]
recipients = ["@example.com"]
"#;

fn parse(text: &str) {
    // The component path resolves against the test crate's directory, where Cargo.toml exists.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz.toml");
    if let Err(e) = Config::parse(text, &path) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
        assert!(!e.message.is_empty());
    }
}

proptest! {
    #![proptest_config(cases::config(256))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        parse(&text);
    }

    #[test]
    fn mutated_valid_configs_never_panic(
        cut in 0usize..VALID.len(),
        insert in "[\\[\\]{}=\",.#*a-z0-9\n -]{0,12}",
        delete in 0usize..16,
    ) {
        let mut text = VALID.to_owned();
        let cut = (0..=cut).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (cut + delete).min(text.len());
        let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text.replace_range(cut..end, &insert);
        parse(&text);
    }
}

#[test]
fn the_seed_configuration_is_refused_only_for_its_unset_secret() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz.toml");
    let e = Config::parse(VALID, &path).unwrap_err();
    assert!(e.message.contains("JOBHOOK_FUZZ_UNSET"), "{e}");
    assert!(
        Config::parse(
            &VALID.replace(", Secret = { env = \"JOBHOOK_FUZZ_UNSET\" }", ""),
            &path
        )
        .is_ok()
    );
}
