//! `jobhook-dev`, the author's tool, as a process: `run --keyfactor-standin` gives a handler the
//! Keyfactor API stand-in in-process, so a handler that reads the API runs with no server and no
//! credentials to set up.

use std::process::{Command, Output};

use jobhook_testkit::{guest, workspace_root};
use serde_json::Value;

fn jobhook_dev(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jobhook-dev"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("KEYFACTOR_URL")
        .output()
        .expect("run jobhook-dev")
}

#[test]
fn run_with_the_in_process_standin_reads_the_job_history() {
    let component = guest("job-history-lookup").display().to_string();
    let context = workspace_root()
        .join("examples/job-history-lookup/contexts/inventory.json")
        .display()
        .to_string();
    let run = [
        "run",
        &component,
        "--context",
        &context,
        "--keyfactor-standin",
    ];
    let out = jobhook_dev(&[&run[..], &["--json"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).expect("JSON outcome");
    assert_eq!(v["class"], "succeeded", "{v:#}");
    let logs: Vec<&str> = v["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l.starts_with("JobHistory for WinCertInventory job ")),
        "{logs:#?}"
    );

    // The stand-in and a real Keyfactor URL are one or the other.
    let out = jobhook_dev(
        &[
            &run[..],
            &[
                "--keyfactor-url",
                "https://command.example.com/KeyfactorAPI/",
            ],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used together"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
