//! Handlers written in C, JavaScript (QuickJS) and Python, built from source with the pinned
//! toolchains (`scripts/lang-toolchains.sh`) and run through the `jobhook` binary: the
//! repeated-failure-email example in each language on the sample contexts (mails asserted), the
//! hostile guests of `tests/guests-js`, `tests/guests-py` and `tests/guests-c` contained with
//! the outcome classes docs/LANGUAGES.md reports, the import pre-check refusing an 18 MB Python component without
//! compiling it, and `jobhook run` reusing its AOT cache.
//!
//! Every component is built once per test binary (into `CARGO_TARGET_TMPDIR/lang`); runs share
//! one AOT cache directory there, so the Python components are compiled once per engine build,
//! not once per run. The JavaScript, Python and C guests are one component each
//! (`tests/guests-js/guests.js`, `tests/guests-py/guests.py`, `tests/guests-c/guests.c` run the
//! guest their handler property `guest` names), so QuickJS and CPython are built and compiled once for all their guests. A missing toolchain fails the tests with a message naming
//! `scripts/lang-toolchains.sh`, unless `JOBHOOK_SKIP_LANGS=1` is set explicitly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jobhook_testkit::workspace_root;
use serde_json::Value;

/// Where the components, outboxes and the AOT cache of these tests live.
fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lang")
}

fn toolchains() -> PathBuf {
    std::env::var_os("JOBHOOK_LANG_TOOLCHAINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/lang-toolchains"))
}

/// `true` when the tests should run; `false` only when `JOBHOOK_SKIP_LANGS=1` and a toolchain is
/// missing. Panics naming the install script otherwise.
fn toolchains_ready() -> bool {
    let t = toolchains();
    let missing: Vec<String> = [
        t.join("py/bin/componentize-py"),
        t.join("npm/node_modules/.bin/componentize-qjs"),
        PathBuf::from("/usr/bin/clang-19"),
    ]
    .into_iter()
    .filter(|p| !p.exists())
    .map(|p| p.display().to_string())
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("JOBHOOK_SKIP_LANGS").as_deref() == Ok("1") {
        eprintln!("JOBHOOK_SKIP_LANGS=1: skipping; missing {missing:?}");
        return false;
    }
    panic!(
        "the C/JavaScript/Python toolchains are not installed (missing {missing:?}): run \
         scripts/lang-toolchains.sh (or set JOBHOOK_SKIP_LANGS=1 to skip these tests explicitly)"
    );
}

fn run_script(script: &str, out: &Path) {
    let started = Instant::now();
    let output = Command::new(workspace_root().join(script))
        .arg(out)
        .output()
        .expect("run build script");
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{script}: built in {:?}", started.elapsed());
}

/// Builds everything once per test binary; returns the directory holding it.
fn built() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = work_dir();
        std::fs::create_dir_all(&dir).expect("work dir");
        for lang in ["c", "js", "py"] {
            run_script(
                &format!("examples/repeated-failure-email-{lang}/build.sh"),
                &dir.join(format!("repeated_failure_email_{lang}.wasm")),
            );
        }
        run_script("tests/guests-js/build.sh", &dir.join("guests-js"));
        run_script("tests/guests-py/build.sh", &dir.join("guests-py"));
        run_script("tests/guests-c/build.sh", &dir.join("guests-c"));
        dir
    })
}

fn jobhook(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run jobhook");
    (output, started.elapsed())
}

fn cache_dir() -> String {
    work_dir().join("aot").display().to_string()
}

fn context(name: &str) -> String {
    workspace_root()
        .join("examples/repeated-failure-email/contexts")
        .join(format!("{name}.json"))
        .display()
        .to_string()
}

/// `jobhook run --json` of `component` with `extra` flags; the parsed outcome.
fn run_json(component: &Path, extra: &[&str]) -> Value {
    let component = component.display().to_string();
    let cache = cache_dir();
    let mut args = vec!["run", &component, "--json", "--cache-dir", &cache];
    args.extend_from_slice(extra);
    let (output, _) = jobhook(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "no JSON outcome from jobhook run {args:?} ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn mails_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Err(_) => Vec::new(),
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .map(|e| std::fs::read_to_string(e.path()).expect("read mail"))
            .collect(),
    }
}

/// A mail as the outbox wrote it, without the headers that differ from one sending to the next
/// (`Date`, `Message-ID`), line endings normalised.
fn comparable(mail: &str) -> String {
    mail.replace("\r\n", "\n")
        .lines()
        .filter(|l| !l.starts_with("Date:") && !l.starts_with("Message-ID:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What one run of `component` gave, for comparing languages: the outcome class, the reason,
/// the log lines' messages, and each mail (see [`comparable`]).
fn result_of(component: &Path, context: &str, properties: &[&str], outbox: &Path) -> Value {
    let _ = std::fs::remove_dir_all(outbox);
    let outbox_arg = outbox.display().to_string();
    let mut args = vec!["--context", context, "--mail-outbox", &outbox_arg];
    for p in properties {
        args.extend(["--property", p]);
    }
    let outcome = run_json(component, &args);
    let mut mails: Vec<String> = mails_in(outbox).iter().map(|m| comparable(m)).collect();
    mails.sort();
    let logs: Vec<&Value> = outcome["logs"]
        .as_array()
        .map(|lines| lines.iter().map(|l| &l["message"]).collect())
        .unwrap_or_default();
    serde_json::json!({
        "class": outcome["class"],
        "reason": outcome["reason"],
        "logs": logs,
        "mails": mails,
    })
}

/// The example in `lang` gives what the Rust example gives, byte for byte (mails without `Date`
/// and `Message-ID`; reasons; log lines) on the sample contexts, with bad properties, and with
/// a context whose text holds a NUL (the Rust example's mail is refused for the control
/// character; a C string function would have cut the subject short and sent it), and with a
/// request in year 1 (.NET's `DateTime.MinValue`: four digits in every port's mail).
fn example_runs_like_the_rust_one(lang: &str) {
    if !toolchains_ready() {
        return;
    }
    let component = built().join(format!("repeated_failure_email_{lang}.wasm"));
    let reference = jobhook_testkit::guest("repeated-failure-email");
    let with_nul = work_dir().join(format!("nul-{lang}.json"));
    let mut context_with_nul: Value = serde_json::from_str(
        &std::fs::read_to_string(context("failed-after-retries")).expect("context"),
    )
    .expect("context JSON");
    context_with_nul["JobType"] = Value::String("Win\u{0}Cert".into());
    std::fs::write(&with_nul, context_with_nul.to_string()).expect("write context");
    let year_one = work_dir().join(format!("year-one-{lang}.json"));
    let mut context_year_one = context_with_nul.clone();
    context_year_one["JobType"] = Value::String("WinCertInventory".into());
    context_year_one["RequestTimestamp"] = Value::String("0001-01-01T00:00:00Z".into());
    std::fs::write(&year_one, context_year_one.to_string()).expect("write context");
    let good = [
        "RetryThreshold=3",
        "EmailRecipients=pki-team@example.com, oncall@example.com",
    ];
    let bad = ["RetryThreshold=abc", "EmailRecipients=pki-team@example.com"];
    let cases: [(&str, String, &[&str], usize); 6] = [
        (
            "failed-after-retries",
            context("failed-after-retries"),
            &good,
            1,
        ),
        ("failed-first-try", context("failed-first-try"), &good, 0),
        ("succeeded", context("succeeded"), &good, 0),
        ("bad-properties", context("failed-after-retries"), &bad, 0),
        ("nul-in-job-type", with_nul.display().to_string(), &good, 0),
        ("year-one", year_one.display().to_string(), &good, 1),
    ];
    for (case, ctx, properties, want_mails) in cases {
        let mut theirs = result_of(
            &component,
            &ctx,
            properties,
            &work_dir().join(format!("outbox-{lang}-{case}")),
        );
        let mut ours = result_of(
            &reference,
            &ctx,
            properties,
            &work_dir().join(format!("outbox-rust-{lang}-{case}")),
        );
        // A property that is not a number: the Rust SDK names the type and its parser's error
        // ("not a valid i32 (invalid digit found in string)"), the ports say "not a valid
        // 32-bit integer"; the reasons agree up to there.
        for result in [&mut theirs, &mut ours] {
            if let Some(reason) = result["reason"].as_str()
                && let Some((start, _)) = reason.split_once(", which is not a valid ")
            {
                result["reason"] = Value::String(start.to_owned());
            }
        }
        assert_eq!(
            theirs, ours,
            "{lang}/{case}: {lang} (left) and Rust (right) differ"
        );
        assert_eq!(
            ours["mails"].as_array().map(Vec::len),
            Some(want_mails),
            "{case}: {ours:#}"
        );
    }
}

/// The narrowed worlds import what the WIT says they do (`scripts/check-wit-worlds.sh`, with
/// the wasm-tools the Python toolchain brings), and the checked-in C bindings of the example and
/// of `jobhook new --lang c` were generated from the current WIT (`scripts/check-c-bindings.sh`).
#[test]
fn the_wit_worlds_and_the_c_bindings_match_the_wit() {
    if !toolchains_ready() {
        return;
    }
    for script in ["scripts/check-wit-worlds.sh", "scripts/check-c-bindings.sh"] {
        let output = Command::new(workspace_root().join(script))
            .env("JOBHOOK_LANG_TOOLCHAINS", toolchains())
            .output()
            .expect("run check script");
        assert!(
            output.status.success(),
            "{script} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_c_example_runs_and_mails() {
    example_runs_like_the_rust_one("c");
}

#[test]
fn the_javascript_example_runs_and_mails() {
    example_runs_like_the_rust_one("js");
}

#[test]
fn the_python_example_runs_and_mails() {
    example_runs_like_the_rust_one("py");
}

/// The time budget of a hostile guest that must be stopped by its time limit.
const TIME_LIMITED_MS: &str = "2000";

/// The time budget of every other guest: ample, so that on a busy machine a bomb still meets
/// the limit it is there to test (memory, stack) before its time runs out.
const AMPLE_MS: &str = "60000";

/// What `jobhook run` says of guest `name` of `dir` (`guests-js`, `guests-py`), expected to end
/// as `class`. Each folder builds one component for all its guests (the language's runtime is
/// built and compiled once), which runs the guest its handler property `guest` names.
fn guest_outcome(dir: &str, name: &str, class: &str) -> Value {
    let budget = if class == "timed-out" {
        TIME_LIMITED_MS
    } else {
        AMPLE_MS
    };
    let ctx = context("failed-after-retries");
    let selector = format!("guest={name}");
    run_json(
        &built().join(dir).join("guests.wasm"),
        &[
            "--context",
            &ctx,
            "--timeout-ms",
            budget,
            "--property",
            &selector,
        ],
    )
}

fn expect_class(outcome: &Value, class: &str, what: &str) {
    assert_eq!(outcome["class"], class, "{what}: {outcome:#}");
}

fn expect_bounded_logs(outcome: &Value, what: &str) {
    let kept = outcome["logs"].as_array().map_or(0, Vec::len);
    let dropped = outcome["logs_dropped"].as_u64().unwrap_or(0);
    assert!(
        kept <= jobhook::limits::DEFAULT_LOG_LINES && dropped > 0,
        "{what}: kept {kept}, dropped {dropped}"
    );
}

#[test]
fn hostile_javascript_guests_are_contained() {
    if !toolchains_ready() {
        return;
    }
    for (name, class) in [
        ("healthy", "succeeded"),
        ("throw", "handler-failed"),
        ("type-error", "handler-failed"),
        ("throw-value", "panicked"),
        ("loop", "timed-out"),
        ("memory-bomb", "limit-exceeded"),
        ("recursion", "limit-exceeded"),
        ("log-flood", "succeeded"),
        // The property selects the guest: a name no module has is the dispatcher's own err,
        // also the names every JavaScript object has through its prototype.
        ("no-such-guest", "handler-failed"),
        ("constructor", "handler-failed"),
        ("__proto__", "handler-failed"),
    ] {
        let outcome = guest_outcome("guests-js", name, class);
        expect_class(&outcome, class, name);
        match name {
            "memory-bomb" => assert_eq!(outcome["limit"], "memory", "{outcome:#}"),
            "log-flood" => expect_bounded_logs(&outcome, name),
            "no-such-guest" | "constructor" | "__proto__" => {
                let reason = outcome["reason"].to_string();
                assert!(reason.contains("memory-bomb"), "{outcome:#}");
            }
            _ => {}
        }
    }
}

/// The C guests (`tests/guests-c`, built against the `jobhook new --lang c` template's bindings)
/// end as docs/LANGUAGES.md says a C handler's faults do: `abort()` traps as `unreachable`,
/// `exit(3)` as `exit` (read as 1), endless recursion as a memory access out of bounds (no guard
/// page), a malloc bomb as `limit-exceeded (memory)` rather than a NULL from malloc.
#[test]
fn hostile_c_guests_are_contained() {
    if !toolchains_ready() {
        return;
    }
    for (name, class) in [
        ("healthy", "succeeded"),
        ("abort", "trapped"),
        ("exit", "trapped"),
        ("loop", "timed-out"),
        ("memory-bomb", "limit-exceeded"),
        ("recursion", "trapped"),
        ("log-flood", "succeeded"),
        // The property selects the guest: a name no guest has is the dispatcher's own err.
        ("no-such-guest", "handler-failed"),
    ] {
        let outcome = guest_outcome("guests-c", name, class);
        expect_class(&outcome, class, name);
        match name {
            "abort" => assert_eq!(outcome["code"], "unreachable", "{outcome:#}"),
            "exit" => {
                assert_eq!(outcome["code"], "exit", "{outcome:#}");
                let message = outcome["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("called exit(1)") && message.contains("reads as 1"),
                    "{outcome:#}"
                );
            }
            "recursion" => assert_eq!(outcome["code"], "memory-out-of-bounds", "{outcome:#}"),
            "memory-bomb" => assert_eq!(outcome["limit"], "memory", "{outcome:#}"),
            "log-flood" => expect_bounded_logs(&outcome, name),
            "no-such-guest" => {
                let reason = outcome["reason"].to_string();
                assert!(reason.contains("memory-bomb"), "{outcome:#}");
            }
            _ => {}
        }
    }
}

#[test]
fn hostile_python_guests_are_contained() {
    if !toolchains_ready() {
        return;
    }
    for (name, class) in [
        ("healthy", "succeeded"),
        ("hostile_raise", "panicked"),
        ("hostile_exit", "trapped"),
        ("hostile_abort", "trapped"),
        ("hostile_loop", "timed-out"),
        ("hostile_memory_bomb", "limit-exceeded"),
        ("hostile_recursion", "limit-exceeded"),
        ("hostile_log_flood", "succeeded"),
        ("hostile_sockets", "succeeded"),
        // The property selects the guest: a name no module has is the dispatcher's own err.
        ("no_such_guest", "handler-failed"),
    ] {
        let outcome = guest_outcome("guests-py", name, class);
        expect_class(&outcome, class, name);
        match name {
            "hostile_memory_bomb" => assert_eq!(outcome["limit"], "memory", "{outcome:#}"),
            "hostile_log_flood" => expect_bounded_logs(&outcome, name),
            "hostile_sockets" => {
                let logs = outcome["logs"].to_string();
                // `succeeded` means nothing worked (the guest returns err naming what did).
                assert!(logs.contains("PermissionError"), "{outcome:#}");
            }
            "no_such_guest" => {
                let reason = outcome["reason"].to_string();
                assert!(reason.contains("hostile_loop"), "{outcome:#}");
            }
            _ => {}
        }
    }
}

/// Appends a component import section importing `name` as an instance to a component binary.
/// Only the import section is read before compiling, so the (unvalidated) type index does not
/// matter there; the component would be refused at validation anyway.
fn with_extra_import(component: &[u8], name: &str) -> Vec<u8> {
    fn leb(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = vec![1u8, 0x00];
    leb(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(&[0x05, 0x00]); // an instance of type 0
    let mut bytes = component.to_vec();
    bytes.push(10); // the component import section
    leb(body.len(), &mut bytes);
    bytes.extend_from_slice(&body);
    bytes
}

#[test]
fn an_unfit_python_component_is_refused_before_it_is_compiled() {
    if !toolchains_ready() {
        return;
    }
    let component = built().join("repeated_failure_email_py.wasm");
    let path = component.display().to_string();
    // The reference: inspecting the component compiles it (no cache).
    let (compiled, compile_time) = jobhook(&["inspect", &path, "--json", "--no-cache"]);
    assert!(compiled.status.success(), "{compiled:?}");
    let inspection: Value = serde_json::from_slice(&compiled.stdout).expect("json");
    assert_eq!(inspection["compiled"], true, "{inspection:#}");
    let inert = inspection["imports"]["inert"].to_string();
    assert!(inert.contains("wasi:sockets/tcp"), "{inspection:#}");

    // Ungranted: a configuration that does not grant `mail` to it (`jobhook run` grants all).
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ndata_dir = \"data\"\n\n[[handlers]]\nname = \"py\"\ncomponent = {:?}\njob_types = [\"*\"]\n",
            path
        ),
    )
    .expect("write config");
    let (refused, refuse_time) = jobhook(&["check", "-c", &config.display().to_string()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("`mail` capability"), "{stderr}");

    // Not provided: the same 18 MB with an extra import of an interface the engine lacks.
    let unfit = work_dir().join("py-with-foreign-import.wasm");
    let bytes = std::fs::read(&component).expect("read");
    std::fs::write(&unfit, with_extra_import(&bytes, "evil:net/raw@0.1.0")).expect("write");
    let unfit_path = unfit.display().to_string();
    let (inspected, inspect_time) = jobhook(&["inspect", &unfit_path, "--json", "--no-cache"]);
    assert_eq!(inspected.status.code(), Some(1), "{inspected:?}");
    let unfit: Value = serde_json::from_slice(&inspected.stdout).expect("json");
    assert_eq!(unfit["compiled"], false, "{unfit:#}");
    assert!(
        unfit["world_error"]
            .as_str()
            .is_some_and(|e| e.contains("evil:net/raw@0.1.0")),
        "{unfit:#}"
    );
    assert!(
        unfit["imports"]["unsupported"]
            .to_string()
            .contains("evil:net/raw"),
        "{unfit:#}"
    );
    assert!(
        unfit["imports"]["inert"]
            .to_string()
            .contains("wasi:sockets/tcp"),
        "inspect shows what it found: {unfit:#}"
    );
    eprintln!(
        "inspect with compile: {compile_time:?}; refused check: {refuse_time:?}; refused inspect: {inspect_time:?}"
    );
    // Whole processes (start, pool reservation, reading 18 MB): a compile takes seconds here.
    let (run, run_time) = jobhook(&[
        "run",
        &unfit_path,
        "--no-cache",
        "--context",
        &context("failed-after-retries"),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("evil:net/raw@0.1.0"), "{stderr}");
    for (what, took) in [
        ("check", refuse_time),
        ("inspect", inspect_time),
        ("run", run_time),
    ] {
        assert!(
            took * 5 < compile_time && took < Duration::from_secs(2),
            "the refused {what} took {took:?}; a compiling inspect took {compile_time:?}"
        );
    }
}

#[test]
fn a_second_run_loads_the_compiled_component_from_the_cache() {
    if !toolchains_ready() {
        return;
    }
    let component = built().join("repeated_failure_email_js.wasm");
    let cache = tempfile::tempdir().expect("tempdir");
    let cache_arg = cache.path().display().to_string();
    let path = component.display().to_string();
    let ctx = context("succeeded");
    let run = || {
        let (output, took) = jobhook(&[
            "run",
            &path,
            "--json",
            "--cache-dir",
            &cache_arg,
            "--context",
            &ctx,
        ]);
        let value: Value = serde_json::from_slice(&output.stdout).expect("json");
        (value, took)
    };
    let (first, first_time) = run();
    let (second, second_time) = run();
    assert_eq!(first["load"]["cache"], "miss", "{first:#}");
    assert_eq!(second["load"]["cache"], "hit", "{second:#}");
    let (first_ms, second_ms) = (
        first["load"]["ms"].as_f64().unwrap_or(0.0),
        second["load"]["ms"].as_f64().unwrap_or(f64::MAX),
    );
    eprintln!("load: {first_ms:.0} ms then {second_ms:.0} ms ({first_time:?}, {second_time:?})");
    assert!(
        second_ms * 2.0 < first_ms,
        "{first_ms} ms then {second_ms} ms"
    );

    let (off, _) = jobhook(&["run", &path, "--json", "--no-cache", "--context", &ctx]);
    let off: Value = serde_json::from_slice(&off.stdout).expect("json");
    assert_eq!(off["load"]["cache"], "off", "{off:#}");
}
