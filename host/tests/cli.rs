//! The `jobhook` binary, run as a process on real components built from this repository.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use jobhook::app::config::MIN_TOKEN_CHARS;
use jobhook_testkit::{guest, sample_context_json, workspace_root};
use serde_json::Value;

fn jobhook(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run jobhook")
}

fn jobhook_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn jobhook");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

/// Runs `jobhook args…` for at most `limit`: a command that should have refused to start and
/// did not (a `serve` that serves) is stopped, and its output shows what it did.
fn jobhook_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn jobhook");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().expect("wait").is_none() {
        child.kill().expect("kill jobhook");
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn context_file(example: &str, file: &str) -> String {
    workspace_root()
        .join("examples")
        .join(example)
        .join("contexts")
        .join(file)
        .display()
        .to_string()
}

fn component(package: &str) -> String {
    guest(package).display().to_string()
}

fn write_temp(name: &str, contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("write");
    (dir, path)
}

/// `--version` names the handler contract versions this engine runs; `-V` stays one line.
#[test]
fn version_names_the_contract_versions_it_runs() {
    let out = jobhook(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let long = text(&out.stdout);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        long,
        format!(
            "jobhook {version}\nhandler contract: jobhook:handler {}\n",
            jobhook::runtime::loader::supported_versions()
        )
    );
    assert!(long.contains(" 0.1.0 or "), "{long}");
    let short = jobhook(&["-V"]);
    assert_eq!(text(&short.stdout), format!("jobhook {version}\n"));
}

#[test]
fn run_succeeds_with_exit_0() {
    let out = jobhook(&[
        "run",
        &component("log-context"),
        "--context",
        &context_file("log-context", "sample.json"),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("outcome   succeeded"), "{stdout}");
    assert!(stdout.contains("logs"), "{stdout}");
}

#[test]
fn run_json_prints_one_object() {
    let out = jobhook(&[
        "run",
        &component("log-context"),
        "--context",
        &context_file("log-context", "sample.json"),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON outcome");
    assert_eq!(v["class"], "succeeded");
    assert!(
        v["handler"]
            .as_str()
            .unwrap_or("")
            .ends_with("log_context.wasm")
    );
    assert!(v["duration_ms"].as_f64().unwrap_or(-1.0) >= 0.0);
    assert!(!v["logs"].as_array().expect("logs").is_empty());
}

/// A misspelt field in a hand-written context would reach the handler as an absent one without
/// a word: `run` warns of every name it ignores (escaped), with the field it likely means, and
/// stdout stays the outcome alone.
#[test]
fn run_warns_of_context_fields_it_ignores() {
    let mut context = sample_context_json();
    let map = context.as_object_mut().expect("object");
    let stamp = map.remove("RequestTimestamp").expect("RequestTimestamp");
    map.insert("RequestTimestmap".into(), stamp);
    map.insert("\u{1b}[31mX".into(), Value::from(1));
    let out = jobhook_stdin(
        &["run", &component("log-context"), "--context", "-", "--json"],
        context.to_string().as_bytes(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("field \"RequestTimestmap\"")
            && stderr.contains("did you mean RequestTimestamp?"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON outcome alone");
    assert_eq!(v["class"], "succeeded");
}

/// The messages `jobhook run` gave the handler as `delivery.message`, read from log-context's
/// `Message:` line.
fn message_seen(extra: &[&str]) -> String {
    let log_context = component("log-context");
    let context = context_file("log-context", "sample.json");
    let mut args = vec!["run", &log_context, "--context", &context, "--json"];
    args.extend_from_slice(extra);
    let out = jobhook(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON outcome");
    v["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .filter_map(|l| l["message"].as_str()?.strip_prefix("Message: "))
        .collect()
}

#[test]
fn run_hands_the_job_message_to_the_handler() {
    assert_eq!(message_seen(&[]), "null");
    assert_eq!(
        message_seen(&["--job-message", "Unable to open the store file"]),
        "Unable to open the store file"
    );
    // Blank is no message, as for a JobHistory row.
    assert_eq!(message_seen(&["--job-message", " \t "]), "null");
    // (Truncation and NUL are `Delivery::job_message`'s, unit-tested with the poller: a log line
    // is cut at 4 KiB, so log-context cannot show a 16 KiB message whole.)
}

#[test]
fn run_reports_a_handler_failure_with_exit_1() {
    let out = jobhook(&[
        "run",
        &component("repeated-failure-email"),
        "--context",
        &context_file("repeated-failure-email", "failed-after-retries.json"),
        "--property",
        "RetryThreshold=abc",
        "--property",
        "EmailRecipients=pki-team@example.com",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("outcome   handler-failed"), "{stdout}");
    assert!(stdout.contains("RetryThreshold"), "{stdout}");
}

#[test]
fn run_reports_a_trap_with_exit_1() {
    let out = jobhook(&[
        "run",
        &component("guest-trap"),
        "--context",
        &context_file("log-context", "sample.json"),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("outcome   trapped"), "{stdout}");
    assert!(stdout.contains("unreachable"), "{stdout}");
}

#[test]
fn run_reads_the_context_from_stdin() {
    let context = serde_json::to_vec(&sample_context_json()).expect("json");
    let out = jobhook_stdin(
        &["run", &component("log-context"), "--context", "-", "--json"],
        &context,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_bad_context_exits_2_naming_the_field() {
    let mut context = sample_context_json();
    context["AgentId"] = "not-a-guid".into();
    let (_dir, path) = write_temp("ctx.json", &serde_json::to_vec(&context).expect("json"));
    let out = jobhook(&[
        "run",
        &component("log-context"),
        "--context",
        &path.display().to_string(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`AgentId`"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn malformed_json_exits_2() {
    let out = jobhook_stdin(
        &["run", &component("log-context"), "--context", "-"],
        b"{\"AgentId\": ",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not valid JSON"), "{stderr}");
}

#[test]
fn a_wrong_type_exits_2_naming_the_field() {
    let mut context = sample_context_json();
    context["CurrentRetryCount"] = "many".into();
    let out = jobhook_stdin(
        &["run", &component("log-context"), "--context", "-"],
        &serde_json::to_vec(&context).expect("json"),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`CurrentRetryCount`"), "{stderr}");
}

#[test]
fn garbage_component_exits_2_with_the_reason() {
    let (_dir, path) = write_temp("handler.wasm", b"this is not wasm at all");
    let out = jobhook(&[
        "run",
        &path.display().to_string(),
        "--context",
        &context_file("log-context", "sample.json"),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a WebAssembly binary"), "{stderr}");
}

#[test]
fn a_missing_component_file_exits_2() {
    let out = jobhook(&[
        "run",
        "/nonexistent/handler.wasm",
        "--context",
        &context_file("log-context", "sample.json"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/handler.wasm"));
}

#[test]
fn a_core_module_is_refused_naming_the_cdylib_fix() {
    // The smallest core module: what a `wasm32-unknown-unknown` or `wasm32-wasip1` build gives.
    let (_dir, path) = write_temp("handler.wasm", b"\0asm\x01\0\0\0");
    let out = jobhook(&[
        "run",
        &path.display().to_string(),
        "--context",
        &context_file("log-context", "sample.json"),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("core WebAssembly module"), "{stderr}");
    assert!(stderr.contains("wasm32-wasip2"), "{stderr}");
    assert!(stderr.contains("crate-type = [\"cdylib\"]"), "{stderr}");
}

#[test]
fn a_missing_cargo_build_output_names_the_cdylib_fix() {
    // What cargo leaves for a handler crate without `crate-type = ["cdylib"]`: an rlib.
    let dir = tempfile::tempdir().expect("tempdir");
    let release = dir.path().join("target/wasm32-wasip2/release");
    std::fs::create_dir_all(&release).expect("mkdir");
    std::fs::write(release.join("libmy_hook.rlib"), b"!<arch>\n").expect("write");
    let wasm = release.join("my_hook.wasm").display().to_string();
    for command in ["run", "inspect"] {
        let mut args = vec![command, &wasm];
        let ctx = context_file("log-context", "sample.json");
        if command == "run" {
            args.extend(["--context", &ctx]);
        }
        let out = jobhook(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(stderr.contains("libmy_hook.rlib"), "{command}: {stderr}");
        assert!(
            stderr.contains("[lib] crate-type = [\"cdylib\"]"),
            "{command}: {stderr}"
        );
    }

    // The configuration's component path gets the same message from `jobhook check`.
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        "[store]\ndata_dir = \"data\"\n\n[[handlers]]\nname = \"h\"\ncomponent = \"target/wasm32-wasip2/release/my_hook.wasm\"\njob_types = [\"*\"]\n",
    )
    .expect("write config");
    let out = jobhook(&["check", "-c", &config.display().to_string()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[lib] crate-type = [\"cdylib\"]"),
        "{stderr}"
    );
}

#[test]
fn a_keyfactor_call_under_run_names_the_run_flag() {
    // job-history-lookup reads JobHistory for inventory jobs; no --keyfactor-url is given.
    let out = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args([
            "run",
            &component("job-history-lookup"),
            "--context",
            &context_file("job-history-lookup", "inventory.json"),
            "--json",
        ])
        .env_remove("RUST_LOG")
        .env_remove("KEYFACTOR_URL")
        .output()
        .expect("run jobhook");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).expect("JSON outcome");
    assert_eq!(v["class"], "handler-failed", "{v:#}");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no Keyfactor API is configured for this engine (--keyfactor-url)"),
        "{reason}"
    );
    assert!(!reason.contains("base_url"), "{reason}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        jobhook(&["run", &component("log-context")]).status.code(),
        Some(2)
    );
    assert_eq!(jobhook(&["frobnicate"]).status.code(), Some(2));
    let out = jobhook(&[
        "run",
        &component("log-context"),
        "--context",
        &context_file("log-context", "sample.json"),
        "--property",
        "no-equals-sign",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("KEY=VALUE"));
    // A name the engine's configuration refuses is refused here too: a handler is never tried
    // with properties it could not be given.
    for (pair, says) in [
        ("=x", "a property name is empty"),
        (" =x", "a property name is empty"),
        (
            "a\nb=hunter2",
            "a property name must not hold control characters",
        ),
        (
            "a\u{1b}[2Jb=1",
            "a property name must not hold control characters",
        ),
    ] {
        let out = jobhook(&[
            "run",
            &component("log-context"),
            "--context",
            &context_file("log-context", "sample.json"),
            "--property",
            pair,
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{pair:?}: {stderr}");
        assert!(stderr.contains(says), "{pair:?}: {stderr}");
        assert!(!stderr.contains('\u{1b}'), "{pair:?}: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "the value is not shown: {stderr}"
        );
    }
}

#[test]
fn inspect_lists_capabilities_and_wasi_imports() {
    let out = jobhook(&["inspect", &component("repeated-failure-email")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("world         fits jobhook:handler"),
        "{stdout}"
    );
    assert!(
        stdout.contains("contract      jobhook:handler@0.2.0\n"),
        "{stdout}"
    );
    assert!(stdout.contains("capabilities  mail\n"), "{stdout}");
    assert!(stdout.contains("wasi:"), "{stdout}");
    assert!(stdout.contains("size"), "{stdout}");
    // What it needs before it runs, and whether a handler at the default limits can run it.
    assert!(
        stdout.contains("needs         3 core instances, 1 linear memories"),
        "{stdout}"
    );
    assert!(
        stdout.contains("limits        within the default [handlers.limits]\n"),
        "{stdout}"
    );

    let out = jobhook(&["inspect", &component("job-history-lookup"), "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        v["imports"]["capabilities"],
        serde_json::json!(["keyfactor"])
    );
    assert!(v["world_error"].is_null());
    assert!(v["size"].as_u64().unwrap_or(0) > 0);

    // wasi:sockets is linked inert: listed as such, never among the WASI imports that work.
    let out = jobhook(&["inspect", &component("guest-sockets")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {stdout}"))
            .to_owned()
    };
    let inert = line("wasi inert    ");
    assert!(inert.contains("wasi:sockets/"), "{inert}");
    assert!(
        inert.ends_with("(linked inert: every call denied)"),
        "{inert}"
    );
    assert!(!line("wasi          ").contains("wasi:sockets"), "{stdout}");
}

#[test]
fn inspect_says_when_a_component_does_not_fit() {
    let out = jobhook(&["inspect", &component("guest-wrong-world")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("DOES NOT FIT"), "{stdout}");
    assert!(stdout.contains("exports       run\n"), "{stdout}");
}

/// `jobhook run` on each hostile component prints the right failure class and exits 1, within
/// its limit (plus generous slack for a loaded machine).
#[test]
fn run_reports_every_hostile_class_with_exit_1() {
    use std::time::Instant;
    let cases = [
        ("guest-loop", "timed-out", None),
        ("guest-sleep", "timed-out", None),
        ("guest-busy-host-calls", "timed-out", None),
        ("guest-memory-bomb", "limit-exceeded", Some("memory")),
        ("guest-huge-alloc", "limit-exceeded", Some("memory")),
        ("guest-recursion", "limit-exceeded", Some("stack")),
        (
            "guest-keyfactor-flood",
            "limit-exceeded",
            Some("keyfactor-calls"),
        ),
        ("guest-mail-flood", "limit-exceeded", Some("mail-calls")),
        ("guest-http-flood", "limit-exceeded", Some("http-calls")),
        ("guest-trap", "trapped", None),
        ("guest-abort", "trapped", None),
        ("guest-exit", "trapped", None),
        ("guest-panic", "panicked", None),
    ];
    let context = context_file("log-context", "sample.json");
    for (package, class, limit) in cases {
        let started = Instant::now();
        let out = jobhook(&[
            "run",
            &component(package),
            "--context",
            &context,
            "--json",
            "--timeout-ms",
            "500",
            "--memory-bytes",
            "16777216",
        ]);
        let elapsed = started.elapsed();
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{package}: {stdout}{}",
            text(&out.stderr)
        );
        let v: Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{package}: {e}: {stdout}"));
        assert_eq!(v["class"], class, "{package}: {v}");
        if let Some(limit) = limit {
            assert_eq!(v["limit"], limit, "{package}: {v}");
        }
        assert!(
            elapsed < Duration::from_secs(15),
            "{package} took {elapsed:?}"
        );
    }
}

#[tokio::test]
async fn job_types_prints_the_instances_guids_as_configuration() {
    let standin = jobhook_testkit::standin::Standin::start()
        .await
        .expect("stand-in");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pw"), &standin.credentials().password).expect("pw");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ndata_dir = \"data\"\n[keyfactor]\nbase_url = \"{}\"\n[keyfactor.auth]\nkind = \"basic\"\nusername = '{}'\npassword = {{ file = \"pw\" }}\n",
            standin.base_url(),
            standin.credentials().username
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let output =
        tokio::task::spawn_blocking(move || jobhook(&["job-types", "--config", &config_arg]))
            .await
            .expect("run");
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}",
        text(&output.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "WinCertInventory = \"{}\"",
            jobhook_testkit::standin::data::WINCERT_INVENTORY
        )),
        "{stdout}"
    );
    assert!(stdout.contains("RebootAfterAdd = "), "{stdout}");
    // The examples' contexts are this instance's jobs: each one's job type, as printed, is the
    // GUID the context carries (what routes it to the examples' handlers).
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for example in std::fs::read_dir(&examples).expect("examples") {
        let Ok(contexts) = std::fs::read_dir(example.expect("entry").path().join("contexts"))
        else {
            continue;
        };
        for context in contexts {
            let path = context.expect("entry").path();
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
            let (Some(name), Some(id)) = (v["JobType"].as_str(), v["JobTypeId"].as_str()) else {
                continue;
            };
            // A context made to carry hostile text is no job of the instance's.
            if !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
                continue;
            }
            let line = format!("{name} = \"{id}\"");
            assert!(
                stdout.contains(&line),
                "{}: {line}\n{stdout}",
                path.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 10, "{seen} example contexts");
    // Every line is TOML: a handler entry around it parses.
    let parsed: toml::Value =
        toml::from_str(&format!("[[handlers]]\nname = \"h\"\n{stdout}")).expect("TOML");
    assert!(parsed.get("poller").is_some(), "{parsed:?}");
    // Without [keyfactor] it says what to configure.
    std::fs::write(&config, "[store]\ndata_dir = \"data\"\n").expect("config");
    let config_arg = config.display().to_string();
    let output =
        tokio::task::spawn_blocking(move || jobhook(&["job-types", "--config", &config_arg]))
            .await
            .expect("run");
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("[keyfactor]"),
        "{}",
        text(&output.stderr)
    );
}

/// Whether a line of output looks like a line the engine's log writes (`<RFC 3339 time>  LEVEL
/// target: ...`) carrying the forged time of `guest-log-forge`.
/// (The report shows the guest's stdout and stderr line by line, indented under their headings:
/// such a line is the guest's, not the engine's.)
fn is_forged_engine_line(line: &str) -> bool {
    line.starts_with("2026-12-02T00:00:00Z")
}

/// `guest-log-forge` puts a fake engine line, a fake `outcome   succeeded`, escape sequences, a
/// NUL and a bidi override into its logs, stdout, stderr and failure reason or panic message:
/// `jobhook run`'s report shows all of it escaped, with one outcome line, the real one.
#[test]
fn run_prints_guest_text_escaped() {
    for (mode, class) in [("fail", "handler-failed"), ("panic", "panicked")] {
        for json in [false, true] {
            let property = format!("mode={mode}");
            let component = component("guest-log-forge");
            let context = context_file("log-context", "sample.json");
            let mut args = vec![
                "run",
                component.as_str(),
                "--context",
                context.as_str(),
                "-p",
                property.as_str(),
            ];
            if json {
                args.push("--json");
            }
            let mut child = Command::new(env!("CARGO_BIN_EXE_jobhook"));
            // With every log line shown, the engine's log (stderr) is checked too.
            child.args(&args).env("RUST_LOG", "jobhook=info");
            let out = child.output().expect("run jobhook");
            assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
            for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                let shown = text(bytes);
                assert!(
                    !bytes.iter().any(|b| matches!(b, 0x1b | 0x07 | 0 | b'\r')),
                    "{mode}: a control byte reached {name}:\n{shown}"
                );
                assert!(!shown.contains('\u{202e}'), "{mode} {name}:\n{shown}");
                for line in shown.lines() {
                    assert!(!is_forged_engine_line(line), "{mode} {name}: {line:?}");
                }
            }
            let stdout = text(&out.stdout);
            if json {
                // The JSON keeps the guest's text exactly, JSON-escaped once.
                let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
                assert_eq!(v["class"], class, "{v}");
                assert!(
                    v["stdout"]
                        .as_str()
                        .unwrap_or("")
                        .contains("\n2026-12-02T00:00:00Z  INFO jobhook: forged engine line\r"),
                    "{v}"
                );
            } else {
                let outcomes: Vec<&str> = stdout
                    .lines()
                    .filter(|l| l.starts_with("outcome"))
                    .collect();
                assert_eq!(outcomes, [format!("outcome   {class}")], "{stdout}");
                assert!(
                    stdout.contains("innocent\\n2026-12-02T00:00:00Z  INFO jobhook: forged engine line\\routcome   succeeded\\n\\x1b[2J"),
                    "{stdout}"
                );
            }
            // The engine's own log of the guest's lines is escaped the same way.
            assert!(
                text(&out.stderr).contains("innocent\\n2026-12-02T00:00:00Z"),
                "{}",
                text(&out.stderr)
            );
        }
    }
}

/// The operator's binary carries no test tooling: no `standin` or `load` command, and none of
/// the Keyfactor stand-in's code (its credential-echoing test route, its well-known password).
/// Those live in the author's tool, `jobhook-dev`.
#[test]
fn the_operator_binary_has_no_test_tooling() {
    let out = jobhook(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"run"), "{help}");
    for tool in ["standin", "load"] {
        assert!(
            !commands.contains(&tool),
            "`jobhook {tool}` exists:\n{help}"
        );
    }
    let run_help = text(&jobhook(&["run", "--help"]).stdout);
    assert!(!run_help.contains("--keyfactor-standin"), "{run_help}");

    let binary = std::fs::read(env!("CARGO_BIN_EXE_jobhook")).expect("read the binary");
    for needle in [&b"x-echo-authorization"[..], b"standin-password"] {
        assert!(
            !binary.windows(needle.len()).any(|w| w == needle),
            "the jobhook binary contains {:?}",
            String::from_utf8_lossy(needle)
        );
    }
}

/// A plain-HTTP receiver on loopback: records each request's first line and answers 200.
fn http_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            log.lock().unwrap().push(first.trim_end().to_owned());
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

/// `jobhook run`'s outbound HTTP flags: `--allow-http` narrows the grant to its prefixes and
/// `--allow-private-http` is what lets a handler reach loopback (plain http only there).
#[test]
fn run_grants_outbound_http_by_its_flags() {
    let (port, seen) = http_receiver();
    let url = format!("http://127.0.0.1:{port}/hooks/jobhook");
    let property = format!("WebhookUrl={url}");
    let component_path = component("webhook-notify");
    let context_path = context_file("webhook-notify", "failed.json");
    let call = |flags: &[&str]| -> Output {
        let mut args = vec![
            "run",
            &component_path,
            "--context",
            &context_path,
            "--property",
            &property,
        ];
        args.extend_from_slice(flags);
        jobhook(&args)
    };
    let run = |flags: &[&str]| -> Value {
        let out = call(&[flags, &["--json"]].concat());
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)))
    };
    let granted = format!("http://127.0.0.1:{port}/hooks/");
    let elsewhere = format!("http://127.0.0.1:{port}/other/");

    // A plain http prefix without --allow-private-http could never be called: refused at once.
    let out = call(&["--allow-http", &granted]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("plain http:// is allowed only with --allow-private-http"),
        "{}",
        text(&out.stderr)
    );
    // Without --allow-http, every https URL is granted and plain http is refused at the call.
    let v = run(&[]);
    assert_eq!(v["class"], "handler-failed", "{v:#}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("plain http is refused"),
        "{v:#}"
    );
    let v = run(&["--allow-http", &elsewhere, "--allow-private-http"]);
    assert_eq!(v["class"], "handler-failed", "{v:#}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not under any of the prefixes granted"),
        "{v:#}"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );

    let v = run(&["--allow-http", &granted, "--allow-private-http"]);
    assert_eq!(v["class"], "succeeded", "{v:#}");
    assert_eq!(
        *seen.lock().unwrap(),
        ["POST /hooks/jobhook HTTP/1.1".to_owned()]
    );
}

/// `jobhook run`'s Keyfactor authentication flags against the stand-in: `--keyfactor-auth
/// bearer` sends the token from `KEYFACTOR_AUTH_ACCESS_TOKEN`, `oauth2` fetches one with
/// `--keyfactor-token-url`, `--keyfactor-client-id` and `KEYFACTOR_AUTH_CLIENT_SECRET`; a wrong
/// secret fails the handler, a missing flag is a usage error naming it.
#[test]
fn run_authenticates_to_keyfactor_by_its_flags() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let standin = runtime
        .block_on(jobhook_standin::Standin::start())
        .expect("stand-in");
    let credentials = standin.credentials().clone();
    let base = standin.base_url();
    let component_path = component("job-history-lookup");
    let context_path = context_file("job-history-lookup", "inventory.json");
    let run = |flags: &[&str], env: &[(&str, &str)]| -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_jobhook"));
        command
            .args(["run", &component_path, "--context", &context_path, "--json"])
            .args(["--keyfactor-url", &base])
            .args(flags)
            .env_remove("RUST_LOG");
        for var in [
            "KEYFACTOR_USERNAME",
            "KEYFACTOR_PASSWORD",
            "KEYFACTOR_AUTH_ACCESS_TOKEN",
            "KEYFACTOR_AUTH_CLIENT_SECRET",
            "KEYFACTOR_AUTH_TOKEN_URL",
            "KEYFACTOR_AUTH_CLIENT_ID",
        ] {
            command.env_remove(var);
        }
        command.envs(env.iter().copied());
        command.output().expect("run jobhook")
    };
    let class = |out: &Output| -> Value {
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
        v["class"].clone()
    };

    let token = credentials.bearer_tokens[0].as_str();
    let out = run(
        &["--keyfactor-auth", "bearer"],
        &[("KEYFACTOR_AUTH_ACCESS_TOKEN", token)],
    );
    assert_eq!(class(&out), "succeeded", "{}", text(&out.stdout));
    let sent = standin.api_requests();
    assert_eq!(
        sent.last().and_then(|r| r.header("authorization")),
        Some(format!("Bearer {token}").as_str())
    );
    let out = run(
        &["--keyfactor-auth", "bearer"],
        &[("KEYFACTOR_AUTH_ACCESS_TOKEN", "not-the-token")],
    );
    assert_eq!(class(&out), "handler-failed", "{}", text(&out.stdout));

    let token_url = standin.token_url();
    let oauth = [
        "--keyfactor-auth",
        "oauth2",
        "--keyfactor-token-url",
        &token_url,
        "--keyfactor-client-id",
        &credentials.client_id,
    ];
    let out = run(
        &oauth,
        &[(
            "KEYFACTOR_AUTH_CLIENT_SECRET",
            credentials.client_secret.as_str(),
        )],
    );
    assert_eq!(class(&out), "succeeded", "{}", text(&out.stdout));
    assert_eq!(standin.tokens_issued(), 1);
    // The API call carried the token the identity provider issued, not the static one.
    let sent = standin.api_requests();
    let authorization = sent
        .last()
        .and_then(|r| r.header("authorization"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        authorization.starts_with("Bearer ") && authorization != format!("Bearer {token}"),
        "{authorization}"
    );
    let out = run(&oauth, &[("KEYFACTOR_AUTH_CLIENT_SECRET", "wrong-secret")]);
    assert_eq!(class(&out), "handler-failed", "{}", text(&out.stdout));

    let out = run(
        &[
            "--keyfactor-auth",
            "oauth2",
            "--keyfactor-client-id",
            "jobhook",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--keyfactor-token-url"),
        "{}",
        text(&out.stderr)
    );
}

/// `jobhook run --smtp HOST:PORT --smtp-tls none` sends a handler's mail through that relay (a
/// real SMTP server on loopback), from `--mail-from`, to the recipients the handler chose.
#[test]
fn run_sends_mail_through_the_smtp_flag() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let relay = runtime
        .block_on(jobhook_testkit::smtp::SmtpServer::start())
        .expect("SMTP server");
    let address = format!("{}:{}", relay.host(), relay.port());
    let out = jobhook(&[
        "run",
        &component("repeated-failure-email"),
        "--context",
        &context_file("repeated-failure-email", "failed-after-retries.json"),
        "--property",
        "RetryThreshold=3",
        "--property",
        "EmailRecipients=pki-team@example.com",
        "--smtp",
        &address,
        "--smtp-tls",
        "none",
        "--mail-from",
        "jobhook-run@example.com",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let mails = relay.received();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert_eq!(mails[0].mail_from, "jobhook-run@example.com");
    assert_eq!(mails[0].rcpt_to, ["pki-team@example.com"]);
    assert!(mails[0].data.contains("Subject: "), "{}", mails[0].data);
}

/// Which stream of a command has a reader that is already gone.
#[derive(Clone, Copy, Debug)]
enum Gone {
    Stdout,
    Stderr,
}

/// Runs `jobhook args` with `gone` a pipe whose reader has already exited, as `| head -0` leaves
/// it: every write there fails with EPIPE. The other stream is captured.
fn jobhook_with_reader_gone(args: &[&str], gone: Gone) -> Output {
    jobhook_with_reader_gone_and_log(args, gone, None)
}

/// [`jobhook_with_reader_gone`] with `RUST_LOG` set to `rust_log`.
fn jobhook_with_reader_gone_and_log(args: &[&str], gone: Gone, rust_log: Option<&str>) -> Output {
    // The reader is closed before the child starts: closed after, a fast command could write
    // its output into the pipe first and exit 0.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut command = Command::new(env!("CARGO_BIN_EXE_jobhook"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    if let Some(rust_log) = rust_log {
        command.env("RUST_LOG", rust_log);
    }
    match gone {
        Gone::Stdout => command.stdout(writer).stderr(Stdio::piped()),
        Gone::Stderr => command.stdout(Stdio::piped()).stderr(writer),
    };
    let child = command.spawn().expect("spawn jobhook");
    // The command's copy of the write end is the child's; this process keeps none.
    drop(command);
    child.wait_with_output().expect("wait")
}

#[test]
fn output_to_a_reader_that_has_gone_ends_the_command_quietly_with_141() {
    let context = context_file("log-context", "sample.json");
    let noop = component("log-context");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ndata_dir = \"data\"\n\n[[handlers]]\nname = \"h\"\ncomponent = \"{noop}\"\njob_types = [\"44340a94-9b99-410d-8011-598fb176c3c5\"]\n"
        ),
    )
    .expect("write config");
    let config = config.display().to_string();
    let manifest = workspace_root().join("host/tests/fixtures/manifest.json");
    let manifest = manifest.display().to_string();
    for args in [
        vec!["run", noop.as_str(), "--context", context.as_str()],
        vec![
            "run",
            noop.as_str(),
            "--context",
            context.as_str(),
            "--json",
        ],
        vec!["inspect", noop.as_str()],
        vec!["inspect", noop.as_str(), "--json"],
        vec!["check", "--config", config.as_str()],
        vec!["import", manifest.as_str()],
        vec![
            "forwarder-config",
            "--config",
            config.as_str(),
            "--engine-url",
            "https://jobhook.example.com:8480",
        ],
    ] {
        let out = jobhook_with_reader_gone(&args, Gone::Stdout);
        assert_eq!(
            out.status.code(),
            Some(i32::from(jobhook::app::output::EXIT_STDOUT_CLOSED)),
            "jobhook {args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "jobhook {args:?} must end quietly: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn an_error_or_warning_told_to_a_stderr_whose_reader_has_gone_changes_no_exit_code() {
    // An error: exit code 2, as with a stderr that is read.
    let out = jobhook_with_reader_gone(
        &["run", "/nonexistent/handler.wasm", "--context", "-"],
        Gone::Stderr,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    // Warnings before the output (web.config has registrations import leaves out): the output
    // still comes, with exit code 0.
    let web_config = workspace_root().join("host/tests/fixtures/web.config");
    let out =
        jobhook_with_reader_gone(&["import", &web_config.display().to_string()], Gone::Stderr);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("[[handlers]]"),
        "{}",
        text(&out.stdout)
    );
}

/// A warning about `RUST_LOG` (one that cannot be read, one that shows nothing) told to a stderr
/// whose reader has gone is lost: the command ends with its own exit code, not a panic's 101.
#[test]
fn a_rust_log_warning_told_to_a_stderr_whose_reader_has_gone_is_no_panic() {
    for rust_log in ["info,jobhook=bogus", "warning"] {
        let out = jobhook_with_reader_gone_and_log(
            &["check", "--config", "/nonexistent/jobhook.toml"],
            Gone::Stderr,
            Some(rust_log),
        );
        assert_eq!(out.status.code(), Some(2), "RUST_LOG={rust_log}");
    }
}

/// `RUST_LOG=warning` (a bare word, read as a target) would show nothing, not even errors: the
/// command says so, and what to write instead.
#[test]
fn a_rust_log_word_that_shows_nothing_is_warned_of() {
    for (command, rust_log) in [("check", "warning"), ("check", "verbose")] {
        let out = Command::new(env!("CARGO_BIN_EXE_jobhook"))
            .args([command, "--config", "/nonexistent/jobhook.toml"])
            .env("RUST_LOG", rust_log)
            .output()
            .expect("run jobhook");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "warning: RUST_LOG={rust_log}: \"{rust_log}\" is neither a level"
            )),
            "{stderr}"
        );
        assert!(stderr.contains("e.g. RUST_LOG=warn"), "{stderr}");
    }
    let out = jobhook_stdin(&["check", "--config", "/nonexistent/jobhook.toml"], b"");
    assert!(
        !text(&out.stderr).contains("RUST_LOG"),
        "{}",
        text(&out.stderr)
    );
}

/// A configuration of one handler (log-context) in a directory of its own, with `server` and
/// `store` put before the handler.
fn check_config(before: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jobhook.toml");
    let component = component("log-context");
    std::fs::write(
        &path,
        format!(
            "{before}\n[[handlers]]\nname = \"log\"\ncomponent = {component:?}\njob_types = [\"*\"]\n"
        ),
    )
    .expect("write");
    (dir, path.display().to_string())
}

/// `check` refuses what `serve` would refuse at start: tokens that cannot be read, a data
/// directory or a mail outbox that cannot be one; and it creates no store and no outbox doing
/// so.
#[test]
fn check_resolves_what_serve_resolves_and_creates_nothing() {
    for (before, says) in [
        (
            "[server]\ntokens = [{ env = \"JOBHOOK_TEST_SURELY_UNSET_TOKEN\" }]",
            "server.tokens: environment variable JOBHOOK_TEST_SURELY_UNSET_TOKEN is not set",
        ),
        (
            "[server]\ntokens = [{ file = \"/dev/zero\" }]",
            "server.tokens: the secret file /dev/zero is a device, not a regular file",
        ),
        (
            "[store]\ndata_dir = \"/dev/null\"",
            "[store] data_dir: /dev/null exists and is not a directory",
        ),
        (
            "[store]\ndata_dir = \"/dev/null/data\"",
            "/dev/null/data cannot be created: /dev/null is not a directory",
        ),
        (
            "[mail]\nfrom = \"jobhook@example.com\"\noutbox = \"/dev/null/outbox\"",
            "[mail] outbox /dev/null/outbox: cannot be a directory for mail: /dev/null exists and \
             is not a directory",
        ),
    ] {
        let (_dir, config) = check_config(before);
        let out = jobhook(&["check", "--config", &config]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{before}: {stderr}");
        assert!(stderr.contains(says), "{before}: {stderr}");
    }
    // The store's directory, and the mail outbox in it, are checked, not made.
    let (dir, config) = check_config(
        "[store]\ndata_dir = \"state/data\"\n\n[mail]\nfrom = \"jobhook@example.com\"",
    );
    let out = jobhook(&["check", "--config", &config]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !dir.path().join("state").exists(),
        "check created the store or the outbox"
    );
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
}

/// An empty configuration file (no byte, or only white space and comments: a file cut short
/// while it was written) is refused by `check` and by `serve`, naming the file and the likely
/// cause; a configuration that is not empty but has no handler is valid, and `check` warns that
/// every event would be routed to none.
#[test]
fn an_empty_configuration_is_refused_and_one_without_handlers_is_warned_of() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jobhook.toml");
    let config = path.display().to_string();
    for written in ["", "\n   \n", "# only a comment\n"] {
        std::fs::write(&path, written).expect("write");
        for command in ["check", "serve"] {
            let out = jobhook_within(&[command, "--config", &config], Duration::from_secs(60));
            let stderr = text(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command} {written:?}: {stderr}"
            );
            assert!(
                stderr.contains(&format!("{config}: the configuration file is empty"))
                    && stderr.contains("cut short"),
                "{command} {written:?}: {stderr}"
            );
        }
    }
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n[store]\ndata_dir = \"data\"\n",
    )
    .expect("write");
    let out = jobhook(&["check", "--config", &config]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: the configuration has no [[handlers]]")
            && stderr.contains("no handler runs for any event"),
        "{stderr}"
    );
    assert!(
        text(&out.stdout).contains("configuration is valid; 0 handler(s) loaded\n"),
        "{}",
        text(&out.stdout)
    );
    // With a handler, no such warning.
    let (_dir, config) = check_config("");
    let out = jobhook(&["check", "--config", &config]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("no [[handlers]]"),
        "{}",
        text(&out.stderr)
    );
}

/// An AOT cache directory `serve` could not use is a warning of `check` (serve runs without the
/// cache, compiling every handler at every start), naming the key and the path.
#[test]
fn check_warns_of_a_cache_dir_serve_could_not_use() {
    for (cache_dir, says) in [
        ("/dev/null", "/dev/null exists and is not a directory"),
        (
            "/dev/null/cache",
            "/dev/null/cache cannot be created: /dev/null is not a directory",
        ),
    ] {
        let (_dir, config) = check_config(&format!("[engine]\ncache_dir = \"{cache_dir}\""));
        let out = jobhook(&["check", "--config", &config]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{cache_dir}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "warning: [engine] cache_dir: {says}; serve will run without the AOT cache"
            )),
            "{cache_dir}: {stderr}"
        );
    }
    // A directory serve would not trust for compiled code: others may write it.
    let (dir, config) = check_config("[engine]\ncache_dir = \"open-cache\"");
    let open = dir.path().join("open-cache");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let out = jobhook(&["check", "--config", &config]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: [engine] cache_dir: serve will run without the AOT cache")
            && stderr
                .contains("is not private to this user (its mode 777 lets other users write it)")
            && stderr.contains("`chmod 700` it"),
        "{stderr}"
    );
    // Its fix is where it is: no advice to write elsewhere, which the directory allows.
    assert!(!stderr.contains("may write in"), "{stderr}");
}

/// A secret file every user may read, or someone other than the engine's user and root may
/// change (by its mode, its owner or its directory), is a warning of `check`: one per file,
/// naming every setting that reads it and why. Modes 600 and 640 (a group the engine's user is
/// in), in a directory only its owner writes or one with the sticky bit, are not.
#[test]
fn check_warns_of_secret_files_other_users_can_read_or_change() {
    use std::os::unix::fs::PermissionsExt as _;
    let component = component("log-context");
    let (dir, config) = check_config(&format!(
        "[server]\ntokens = [{{ file = \"token\" }}]\nadmin_tokens = [{{ file = \"admin\" }}]\n\n\
         [[handlers]]\nname = \"mailer\"\ncomponent = {component:?}\njob_types = [\"*\"]\n\
         properties = {{ Password = {{ file = \"shared\" }}, Again = {{ file = \"shared\" }}, \
         Key = {{ env = \"PATH\" }}, Other = {{ file = \"open/other\" }}, \
         Owned = {{ file = \"owned\" }}, Linked = {{ file = \"linked\" }} }}\n"
    ));
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    let file = |name: &str, mode: u32| {
        let path = dir.path().join(name);
        // Long enough not to be warned of as short.
        let token = format!("{}-t0ken-long-enough-to-pass\n", name.replace('/', "-"));
        std::fs::write(&path, token).expect("write");
        chmod(&path, mode);
        path.display().to_string()
    };
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    chmod(&open, 0o777);
    let token = file("token", 0o644);
    let admin = file("admin", 0o620);
    let shared = file("shared", 0o666);
    let other = file("open/other", 0o600);
    let owned = file("owned", 0o600);
    // A link in a private directory to a file in one others may write: the file read can be
    // replaced there.
    file("open/link-target", 0o600);
    let linked = dir.path().join("linked");
    std::os::unix::fs::symlink(open.join("link-target"), &linked).expect("symlink");
    // Another user's file: only root can give one away (the CI runs as root).
    let given_away = std::os::unix::fs::chown(&owned, Some(1000), None).is_ok();
    let out = jobhook(&["check", "--config", &config]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let mut warnings = vec![
        format!(
            "warning: server.tokens: the secret file {token}: its mode 644 lets every user read \
             it; make it the engine's user's"
        ),
        format!(
            "warning: server.admin_tokens: the secret file {admin}: its mode 620 lets others than \
             its owner change it;"
        ),
        format!(
            "warning: handlers.mailer.properties.Again, handlers.mailer.properties.Password: the \
             secret file {shared}: its mode 666 lets every user read it; its mode 666 lets others \
             than its owner change it;"
        ),
        format!(
            "warning: handlers.mailer.properties.Other: the secret file {other}: its directory \
             {} (mode 777) lets others replace it;",
            open.display()
        ),
        format!(
            "warning: handlers.mailer.properties.Linked: the secret file {}: its directory {} \
             (mode 777) lets others replace it;",
            linked.display(),
            std::fs::canonicalize(&open).expect("canonical").display()
        ),
    ];
    if given_away {
        warnings.push(format!(
            "warning: handlers.mailer.properties.Owned: the secret file {owned}: it belongs to \
             uid 1000, not the engine's user, and its owner can change it;"
        ));
    } else {
        println!("not root: the other user's file is not checked");
    }
    for warning in &warnings {
        assert!(stderr.contains(warning), "{warning}\n{stderr}");
    }
    assert_eq!(stderr.matches(&shared).count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("warning").count(),
        warnings.len(),
        "{stderr}"
    );
    file("token", 0o600);
    file("admin", 0o640);
    file("shared", 0o400);
    chmod(&open, 0o1777);
    if given_away {
        std::os::unix::fs::chown(&owned, Some(0), None).expect("chown back");
    }
    let out = jobhook(&["check", "--config", &config]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// A bearer token shorter than `MIN_TOKEN_CHARS` is a warning of `check` (and of `serve` and
/// every reload) that names its list and file and its length, never its value; the
/// configuration is still valid.
#[test]
fn check_warns_of_a_short_token_without_showing_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let component = component("log-context");
    let (dir, config) = check_config(&format!(
        "[server]\ntokens = [{{ file = \"token\" }}]\n\n\
         [[handlers]]\nname = \"all\"\ncomponent = {component:?}\njob_types = [\"*\"]\n"
    ));
    let token = dir.path().join("token");
    let write = |value: &str| {
        std::fs::write(&token, value).expect("write");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    write("hunter2\n");
    let out = jobhook(&["check", "--config", &config]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: server.tokens: the token from file token has 7 characters; one shorter \
             than {MIN_TOKEN_CHARS} can be guessed"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    write(&"k".repeat(MIN_TOKEN_CHARS));
    let out = jobhook(&["check", "--config", &config]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// A configuration or a handler's component that someone other than the engine's user and root
/// may change is a warning of `check` (and of `serve` and every reload): whoever changes them
/// decides what runs with the engine's Keyfactor credentials. Mode 644 is not.
#[test]
fn check_warns_of_a_configuration_or_component_others_can_change() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let component = dir.path().join("handler.wasm");
    std::fs::copy(guest("log-context"), &component).expect("copy component");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        "[[handlers]]\nname = \"log\"\ncomponent = \"handler.wasm\"\njob_types = [\"*\"]\n",
    )
    .expect("config");
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    chmod(&config, 0o666);
    chmod(&component, 0o664);
    let out = jobhook(&["check", "--config", &config.display().to_string()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for warning in [
        format!(
            "warning: the configuration file {}: its mode 666 lets others than its owner change \
             it; whoever can change it decides what the engine does with the credentials it holds",
            config.display()
        ),
        format!(
            "warning: handler \"log\"'s component {}: its mode 664 lets others than its owner \
             change it;",
            component.display()
        ),
    ] {
        assert!(stderr.contains(&warning), "{warning}\n{stderr}");
    }
    chmod(&config, 0o644);
    chmod(&component, 0o644);
    let out = jobhook(&["check", "--config", &config.display().to_string()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// The `jobhook run` commands the examples' READMEs give run as written: every flag they pass
/// exists and every capability the handler calls is configured by them (a run that answers
/// `not-available` means the README left a flag out). The component is the one the tests
/// build; `--mail-outbox` goes to a temporary directory. Commands for components built by
/// other toolchains (`target/lang/`) are run by the languages' tests, and `jobhook-dev run`
/// commands are the author's tool's.
#[test]
fn example_readme_run_commands_run_as_written() {
    let root = workspace_root();
    let outbox = tempfile::tempdir().expect("tempdir");
    let mut ran = Vec::new();
    for example in std::fs::read_dir(root.join("examples")).expect("examples") {
        let readme = example.expect("entry").path().join("README.md");
        let Ok(markdown) = std::fs::read_to_string(&readme) else {
            continue;
        };
        // Commands in code blocks (lines joined at a trailing `\`) and in inline code.
        let joined = markdown.replace("\\\n", " ");
        let commands = joined
            .lines()
            .flat_map(|line| line.split('`'))
            .filter_map(|part| part.trim().strip_prefix("jobhook run "))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        for command in commands {
            let words: Vec<String> = command
                .split_whitespace()
                .map(|w| w.trim_matches('\'').to_owned())
                .collect();
            let Some(package) = words.first().and_then(|c| {
                c.strip_prefix("target/wasm32-wasip2/release/")?
                    .strip_suffix(".wasm")
                    .map(|n| n.replace('_', "-"))
            }) else {
                continue;
            };
            // A placeholder (`https://…`) is for the reader to fill in.
            if command.contains('…') {
                continue;
            }
            let mut args = vec!["run".to_owned(), component(&package)];
            let mut rest = words[1..].iter();
            while let Some(word) = rest.next() {
                args.push(word.clone());
                if word == "--mail-outbox" {
                    rest.next();
                    args.push(outbox.path().display().to_string());
                }
            }
            let out = Command::new(env!("CARGO_BIN_EXE_jobhook"))
                .args(&args)
                .current_dir(&root)
                .env_remove("RUST_LOG")
                .output()
                .expect("run jobhook");
            let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(
                matches!(out.status.code(), Some(0 | 1)) && !said.contains("not available"),
                "{}: jobhook run {command}\n{said}",
                readme.display()
            );
            ran.push(package);
        }
    }
    for package in ["log-context", "repeated-failure-email", "webhook-notify"] {
        assert!(ran.iter().any(|p| p == package), "{package}: {ran:?}");
    }
}

/// A service `jobhook run` cannot build from its flags is refused naming the flag the user
/// typed, never the configuration key behind it (`[keyfactor.auth]`, `[mail.smtp]`, ...).
#[test]
fn run_names_its_flags_when_a_service_cannot_be_built() {
    let component = component("job-history-lookup");
    let context = context_file("job-history-lookup", "inventory.json");
    let outbox_file = write_temp("not-a-dir", b"x");
    let not_a_dir = outbox_file.1.display().to_string();
    let kf = ["--keyfactor-url", "https://kf.example.com/KeyfactorAPI/"];
    for (flags, token, says) in [
        (
            &[&kf[..], &["--keyfactor-auth", "bearer"]].concat()[..],
            false,
            "--keyfactor-auth: environment variable KEYFACTOR_AUTH_ACCESS_TOKEN is not set",
        ),
        (
            &[&kf[..], &["--keyfactor-username", "u"]].concat()[..],
            false,
            "--keyfactor-auth: environment variable KEYFACTOR_PASSWORD is not set",
        ),
        (
            &[
                &kf[..],
                &[
                    "--keyfactor-auth",
                    "bearer",
                    "--keyfactor-ca-bundle",
                    "/nonexistent/ca.pem",
                ],
            ]
            .concat()[..],
            true,
            "--keyfactor-ca-bundle /nonexistent/ca.pem:",
        ),
        (
            &[
                "--keyfactor-url",
                "ftp://kf.example.com/",
                "--keyfactor-auth",
                "bearer",
            ][..],
            true,
            "--keyfactor-url: the Keyfactor API base must use https",
        ),
        (
            &["--smtp", "smtp.example.com", "--smtp-username", "u"][..],
            false,
            "--smtp-username (the password comes from JOBHOOK_SMTP_PASSWORD): environment variable",
        ),
        (
            &["--smtp", "smtp.example.com", "--smtp-tls", "none"][..],
            false,
            "--smtp-tls \"none\" is allowed only for a relay on loopback",
        ),
        (&["--smtp", ""][..], false, "--smtp's host is empty"),
        (
            &["--mail-outbox", not_a_dir.as_str()][..],
            false,
            "--mail-outbox ",
        ),
        (
            &["--allow-http", "http://10.0.0.5/hooks/"][..],
            false,
            "--allow-http: URL prefix \"http://10.0.0.5/hooks/\": plain http:// is allowed only to a \
             loopback host",
        ),
        (
            &["--allow-http", "http://127.0.0.1:9/"][..],
            false,
            "--allow-http http://127.0.0.1:9/: plain http:// is allowed only with --allow-private-http",
        ),
        (
            &[
                "--mail-outbox",
                "outbox",
                "--mail-from",
                "Ops <ops@example.com>",
            ][..],
            false,
            "--mail-from: \"Ops <ops@example.com>\" is not a bare e-mail address",
        ),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_jobhook"));
        command
            .args(["run", &component, "--context", &context])
            .args(flags)
            .env_remove("RUST_LOG")
            .env_remove("KEYFACTOR_PASSWORD")
            .env_remove("KEYFACTOR_AUTH_ACCESS_TOKEN")
            .env_remove("JOBHOOK_SMTP_PASSWORD")
            .current_dir(outbox_file.0.path());
        if token {
            command.env("KEYFACTOR_AUTH_ACCESS_TOKEN", "t0ken");
        }
        let out = command.output().expect("run jobhook");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(says), "{flags:?}: {says}\n{stderr}");
        assert!(
            !stderr.contains("[keyfactor") && !stderr.contains("[mail"),
            "{flags:?}: {stderr}"
        );
    }
}

/// `run`'s budget flags have the bounds of the configuration's handler limits, and the error
/// names the flag.
#[test]
fn run_budget_flags_are_bounded_like_the_configuration() {
    for (flag, value) in [
        ("--timeout-ms", "0"),
        ("--timeout-ms", "18446744073709551615"),
        ("--memory-bytes", "0"),
        ("--memory-bytes", "1048575"),
        ("--memory-bytes", "1073741825"),
        ("--memory-bytes", "18446744073709551615"),
    ] {
        let out = jobhook(&[
            "run",
            &component("log-context"),
            "--context",
            &context_file("log-context", "sample.json"),
            flag,
            value,
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(stderr.contains("between"), "{flag} {value}: {stderr}");
    }
    let out = jobhook(&[
        "run",
        &component("log-context"),
        "--context",
        &context_file("log-context", "sample.json"),
        "--memory-bytes",
        "1073741824",
        "--timeout-ms",
        "5000",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn forwarder_config_refuses_engine_urls_keyfactor_cannot_use() {
    let (_dir, config) = check_config("");
    for bad in [
        "",
        "not a url",
        ":99999",
        "http://a:b@host/",
        "ftp://host/",
        "https://jobhook.example.com:8443/v1/job-complete",
        "https://jobhook.example.com/base/V1/Job-Complete/",
    ] {
        let out = jobhook(&["forwarder-config", "--config", &config, "--engine-url", bad]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains("--engine-url"), "{bad:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{bad:?}");
        assert!(!stderr.contains("a:b@"), "{stderr}");
    }
    let out = jobhook(&[
        "forwarder-config",
        "--config",
        &config,
        "--engine-url",
        "https://jobhook.example.com:8443/",
        "--generation",
        "11",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"EngineUrl\": \"https://jobhook.example.com:8443\""));
}

/// What `import` prints is TOML, whatever the property names of the web.config are; no raw
/// bidi character of a registration reaches stdout.
#[test]
fn import_prints_toml_that_parses_whatever_the_names() {
    let (_dir, web_config) = write_temp(
        "web.config",
        br#"<configuration><unity><container>
<register type="IOrchestratorJobCompleteHandler" mapTo="Acme.Hook, Acme" name="Hook&#x202E;txt.exe">
  <property name="JobTypes" value="7b6bbc1b-d802-4b09-bec9-f5c221083130"/>
  <property name="Weird&quot; = 1 [server]" value="x"/>
  <property name="Password" value="a"/>
  <property name="password" value="b"/>
</register>
</container></unity></configuration>
"#,
    );
    let out = jobhook(&["import", &web_config.display().to_string()]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stdout.contains('\u{202e}'), "{stdout}");
    let table: toml::Table = toml::from_str(&stdout).unwrap_or_else(|e| panic!("{e}\n{stdout}"));
    let properties = &table["handlers"][0]["properties"];
    assert_eq!(properties["Weird\" = 1 [server]"].as_str(), Some("x"));
    assert!(table.get("server").is_none(), "{stdout}");
    assert_ne!(
        properties["Password"]["env"].as_str(),
        properties["password"]["env"].as_str(),
        "{stdout}"
    );
    assert!(stderr.contains("would both read"), "{stderr}");
}

/// Text from the configuration that holds a line break (here a component path) cannot make a
/// line of `jobhook check`'s output that passes for an error of its own: every line after the
/// first is indented.
#[test]
fn configuration_text_with_a_line_break_cannot_forge_an_error_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        "[[handlers]]\nname = \"h\"\ncomponent = \"x\\nerror: forged.wasm\"\njob_types = [\"*\"]\n",
    )
    .expect("write");
    let out = jobhook(&["check", "--config", &config.display().to_string()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("forged.wasm"), "{stderr}");
    let starts = stderr.lines().filter(|l| l.starts_with("error:")).count();
    assert_eq!(starts, 1, "one error, one line starting with it:\n{stderr}");
}

/// Limits below what a component needs before it runs — its core instances, its first memory
/// and table, as the binary declares them — are refused by `check`, naming the key and the
/// need: every delivery would fail at instantiation. At the need itself the handler loads.
/// `jobhook run` has a flag for each such limit and names it, so an author can go as far as an
/// operator.
#[test]
fn check_refuses_limits_below_what_the_component_needs_to_start() {
    let (dir, config) = check_config("");
    let path = std::path::Path::new(&config);
    let base = std::fs::read_to_string(path).expect("read");
    let with = |limits: &str| {
        std::fs::write(path, format!("{base}[handlers.limits]\n{limits}\n")).expect("write");
        jobhook(&["check", "--config", &config])
    };
    let cases = [
        ("memory_bytes", "1048576"),
        ("instances", "1"),
        ("tables", "1"),
        ("table_elements", "1"),
    ];
    for (key, value) in cases {
        let limits = format!("{key} = {value}");
        let out = with(&limits);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{limits}: {stderr}");
        for says in [
            format!("the handler's limit `{key}` is {value}: every delivery would fail"),
            format!("raise [handlers.limits] {key} if"),
        ] {
            assert!(stderr.contains(&says), "{limits}: {stderr}");
        }
    }
    // log-context makes 3 core instances and 2 tables: at exactly that, it loads.
    let out = with("instances = 3\ntables = 2");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log_context = component("log-context");
    let context = context_file("log-context", "sample.json");
    let run = |flags: &[&str]| {
        let mut args = vec!["run", &log_context, "--context", &context, "--no-cache"];
        args.extend_from_slice(flags);
        jobhook(&args)
    };
    for (key, value) in cases {
        let flag = format!("--{}", key.replace('_', "-"));
        let out = run(&[&flag, value]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("raise {flag} if")),
            "{flag}: {stderr}"
        );
        assert!(!stderr.contains("[handlers.limits]"), "{flag}: {stderr}");
    }
    let out = run(&["--instances", "3", "--tables", "2", "--memories", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    drop(dir);
}

/// A handler that cannot be loaded for a reason the engine's settings decide is reported with
/// the configuration file, the line and the key: a component that cannot be read (named with
/// `handlers.component`), over `[engine] max_component_bytes`, over one of the sandbox pool's
/// per-component caps, or slower to compile than `[engine] compile_timeout_ms` (each naming the
/// `[engine]` key to raise). `jobhook run` and `inspect` name their flags instead.
#[test]
fn load_errors_name_the_configuration_and_the_setting_to_change() {
    let (_dir, config) = check_config("");
    let path = std::path::Path::new(&config);
    let base = std::fs::read_to_string(path).expect("read");
    let check = |written: &str| {
        std::fs::write(path, written).expect("write");
        let out = jobhook(&["check", "--config", &config]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{written}: {stderr}");
        stderr
    };
    // The handler's [[handlers]] is on line 2, after the empty `before`.
    let at = format!("{config}:2: ");
    // A regular file that cannot be read, even by root.
    let stderr = check(&base.replace(&component("log-context"), "/proc/self/mem"));
    assert!(
        stderr.contains(&format!(
            "{at}handlers.component (handler \"log\"): cannot read /proc/self/mem"
        )),
        "{stderr}"
    );
    for (engine, says) in [
        (
            "max_component_bytes = 1",
            "the component size limit is 1 bytes (raise [engine] max_component_bytes",
        ),
        (
            "max_core_instances_per_component = 1",
            "raise [engine] max_core_instances_per_component",
        ),
        (
            "max_tables_per_component = 1",
            "raise [engine] max_tables_per_component",
        ),
        (
            "compile_timeout_ms = 1",
            "raise [engine] compile_timeout_ms",
        ),
    ] {
        let stderr = check(&format!("[engine]\n{engine}\n{base}"));
        let at = format!("{config}:4: ");
        assert!(stderr.contains(&at), "{engine}: {stderr}");
        assert!(stderr.contains(says), "{engine}: {stderr}");
    }
    // The one-shot commands name their flags.
    let log_context = component("log-context");
    let context = context_file("log-context", "sample.json");
    for (flag, value, says) in [
        (
            "--max-core-instances-per-component",
            "1",
            "raise --max-core-instances-per-component",
        ),
        (
            "--max-tables-per-component",
            "1",
            "raise --max-tables-per-component",
        ),
        ("--compile-timeout-ms", "1", "raise --compile-timeout-ms"),
    ] {
        for args in [
            vec![
                "run",
                &log_context,
                "--context",
                &context,
                "--no-cache",
                flag,
                value,
            ],
            vec!["inspect", &log_context, "--no-cache", flag, value],
        ] {
            let out = jobhook(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(says), "{args:?}: {stderr}");
            assert!(!stderr.contains("[engine]"), "{args:?}: {stderr}");
        }
    }
}
