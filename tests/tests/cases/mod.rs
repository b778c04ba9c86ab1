//! How many cases a proptest target runs: its own default, or `PROPTEST_CASES` when set (longer
//! runs, docs/SECURITY.md). Failing cases are not persisted to files in the checkout: proptest
//! prints the minimal one in the failure.

use proptest::test_runner::Config;

/// The proptest configuration of a target whose default is `default_cases` cases.
pub fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}
