//! `jobhook new` as a handler author uses it: for each language, a project is created in a
//! temporary directory outside this repository, built exactly as its README says with the real
//! toolchain, unit-tested (Rust), and run with `jobhook run` on its own sample context.
//!
//! The C, JavaScript and Python toolchains are the pinned ones of `scripts/lang-toolchains.sh`
//! (as in `languages.rs`); a missing one fails the test with a message naming the script, unless
//! `JOBHOOK_SKIP_LANGS=1` is set explicitly. The Rust project builds into the guests' target
//! directory under the workspace's `target/`, so its dependencies compile once, not per run.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use jobhook_testkit::workspace_root;
use serde_json::Value;

/// The job id and machine of the templates' `context.json`.
const JOB_ID: &str = "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90";
const MACHINE: &str = "orchestrator.kftrain.lab";

fn toolchains() -> PathBuf {
    std::env::var_os("JOBHOOK_LANG_TOOLCHAINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/lang-toolchains"))
}

/// The directories a language's tools are found in (put first on PATH, as the README's
/// installation would), or `None` when the test is skipped explicitly. Panics naming the
/// install script when a tool is missing.
fn tool_dirs(lang: &str) -> Option<Vec<PathBuf>> {
    let t = toolchains();
    let (needed, dirs) = match lang {
        "python" => (t.join("py/bin/componentize-py"), vec![t.join("py/bin")]),
        "js" => (
            t.join("npm/node_modules/.bin/componentize-qjs"),
            vec![t.join("npm/node_modules/.bin")],
        ),
        "c" => (PathBuf::from("/usr/bin/clang-19"), Vec::new()),
        _ => return Some(Vec::new()),
    };
    if needed.exists() {
        return Some(dirs);
    }
    if std::env::var("JOBHOOK_SKIP_LANGS").as_deref() == Ok("1") {
        eprintln!(
            "JOBHOOK_SKIP_LANGS=1: skipping; missing {}",
            needed.display()
        );
        return None;
    }
    panic!(
        "the {lang} toolchain is not installed (missing {}): run scripts/lang-toolchains.sh (or \
         set JOBHOOK_SKIP_LANGS=1 to skip these tests explicitly)",
        needed.display()
    );
}

fn jobhook(args: &[&str]) -> Output {
    jobhook_in(Path::new("."), args)
}

/// `jobhook` run from the directory `cwd`.
fn jobhook_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("run jobhook")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn check(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// `jobhook new NAME --lang LANG --dir <tmp>/NAME`: the temporary directory and the project.
fn new_project(name: &str, lang: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert!(
        !tmp.path().starts_with(workspace_root()),
        "the project must be outside the repository"
    );
    let dir = tmp.path().join(name);
    let out = jobhook(&[
        "new",
        name,
        "--lang",
        lang,
        "--dir",
        &dir.display().to_string(),
    ]);
    check("jobhook new", &out);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("created the"), "{stdout}");
    assert!(stdout.contains("jobhook run"), "{stdout}");
    (tmp, dir)
}

/// PATH with `dirs` first.
fn path_with(dirs: &[PathBuf]) -> OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(dirs.iter().cloned().chain(std::env::split_paths(&rest))).expect("PATH")
}

/// Runs `./build.sh` in `dir` with `tools` on PATH, as the README says.
fn build_script(dir: &Path, tools: &[PathBuf]) {
    let out = Command::new("./build.sh")
        .current_dir(dir)
        .env("PATH", path_with(tools))
        .output()
        .expect("run build.sh");
    check("build.sh", &out);
}

/// `jobhook run COMPONENT --context CONTEXT --json`, run in the project directory as the
/// README says; the parsed outcome.
fn run(dir: &Path, component: &str, context: &str) -> Value {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("new-project-aot");
    let out = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .current_dir(dir)
        .args([
            "run",
            component,
            "--context",
            context,
            "--json",
            "--cache-dir",
        ])
        .arg(&cache)
        // An 18 MB Python component compiles in 5-16 s alone, far longer beside other builds.
        .args(["--compile-timeout-ms", "600000"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run jobhook");
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "no JSON outcome from jobhook run {component} ({e}):\n{stdout}\n{}",
            text(&out.stderr)
        )
    })
}

/// The log lines of an outcome as (level, message).
fn logs(outcome: &Value) -> Vec<(String, String)> {
    outcome["logs"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|l| {
                    (
                        l["level"].as_str().unwrap_or_default().to_owned(),
                        l["message"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the built component on the sample context (a failed job: an info line and a warning)
/// and on the same context with a successful job (the info line only), and checks that it
/// imports no capability (it needs no grant).
fn runs_as_generated(dir: &Path, component: &str) {
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
    let command = format!("jobhook run {component} --context context.json");
    assert!(
        readme.contains(&command),
        "README lacks `{command}`:\n{readme}"
    );

    let failed = run(dir, component, "context.json");
    assert_eq!(failed["class"], "succeeded", "{failed:#}");
    let lines = logs(&failed);
    assert_eq!(
        lines,
        [
            (
                "info".to_owned(),
                format!("WinCertInventory job {JOB_ID} on {MACHINE} ended Failure (retry 2)")
            ),
            (
                "warn".to_owned(),
                format!("job {JOB_ID} failed on {MACHINE}")
            ),
        ],
        "{failed:#}"
    );

    let sample = std::fs::read_to_string(dir.join("context.json")).expect("context.json");
    let succeeded = sample.replace("\"Failure\"", "\"Success\"");
    assert_ne!(sample, succeeded);
    std::fs::write(dir.join("succeeded.json"), succeeded).expect("write context");
    let outcome = run(dir, component, "succeeded.json");
    assert_eq!(outcome["class"], "succeeded", "{outcome:#}");
    assert_eq!(
        logs(&outcome),
        [(
            "info".to_owned(),
            format!("WinCertInventory job {JOB_ID} on {MACHINE} ended Success (retry 2)")
        )],
        "{outcome:#}"
    );

    assert_imports_capabilities(dir, component, serde_json::json!([]));
}

/// `jobhook inspect` of the built component lists exactly `capabilities` as its imports.
fn assert_imports_capabilities(dir: &Path, component: &str, capabilities: Value) {
    let out = jobhook(&[
        "inspect",
        &dir.join(component).display().to_string(),
        "--json",
    ]);
    check("jobhook inspect", &out);
    let inspection: Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    assert_eq!(
        inspection["imports"]["capabilities"], capabilities,
        "{inspection:#}"
    );
}

fn scripted_language(lang: &str, build_command: &str, component: &str) {
    let Some(tools) = tool_dirs(lang) else {
        return;
    };
    let (_tmp, dir) = new_project("first-hook", lang);
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
    assert!(
        readme.contains(build_command),
        "README lacks `{build_command}`:\n{readme}"
    );
    let script = std::fs::read_to_string(dir.join("build.sh")).expect("build.sh");
    assert!(
        script.contains(build_command),
        "build.sh lacks `{build_command}`:\n{script}"
    );
    let wit = std::fs::read_to_string(dir.join("wit/jobhook.wit")).expect("wit/jobhook.wit");
    let source = std::fs::read_to_string(workspace_root().join("wit/jobhook.wit")).expect("wit");
    assert_eq!(wit, source, "the project's WIT is the engine's");

    build_script(&dir, &tools);
    runs_as_generated(&dir, component);
    text_after_a_nul_is_kept(&dir, component);
    if lang == "js" {
        js_text_helpers_round_trip(&dir, &tools, component);
    }
    if lang == "python" {
        python_exit_is_a_reason(&dir, &tools, component);
    }
    if let Some(edits) = async_and_lone_surrogate_edits(lang) {
        an_async_run_and_a_lone_surrogate_are_reasons(&dir, &tools, component, &edits);
    }
    if lang == "c" {
        c_false_without_a_reason_still_has_one(&dir, &tools, component);
        c_a_capability_it_calls_is_the_only_one_it_imports(&dir, &tools, component);
    }
    if let Some((edits, reason)) = uncaught_mail_error(lang) {
        an_uncaught_capability_error_is_the_reason(&dir, &tools, component, &edits, reason);
    }
}

/// The JavaScript template's `utf8Encode` and `utf8Decode` (the runtime has neither
/// `TextEncoder` nor `TextDecoder`): text beyond ASCII goes to its UTF-8 bytes and back, and
/// bytes that are not UTF-8 (a stray continuation byte, a truncated sequence, an overlong form, a
/// surrogate, a value past U+10FFFF, a sequence cut short by the end) decode to U+FFFD each
/// instead of to other characters, a lone surrogate is encoded as U+FFFD, and text longer than
/// one of the decoder's chunks comes back whole.
fn js_text_helpers_round_trip(dir: &Path, tools: &[PathBuf], component: &str) {
    let probe = "function run(ctx) {\n    const bytes = utf8Encode(\"Grüße ✓ 😀\");\n    \
                 log.log(\"info\", `${utf8Decode(bytes)} ${bytes.length} ` + \
                 utf8Decode(new Uint8Array([0x61, 0x80, 0xe2, 0x9c, 0xc0, 0xaf, 0xed, 0xa0, 0x80, 0x62])) + \
                 ` ${utf8Decode(utf8Encode(\"é😀\".repeat(5000))) === \"é😀\".repeat(5000)}`);\n    \
                 log.log(\"info\", utf8Encode(\"\\ud800\").join(\",\") + \" \" + utf8Decode(new Uint8Array(\
                 [0xf4, 0x90, 0x80, 0x80, 0x7c, 0xe0, 0x80, 0x80, 0x7c, 0xe2, 0x9c])));";
    let outcome = run_edited(
        dir,
        tools,
        component,
        "handler.js",
        "function run(ctx) {",
        probe,
    );
    let lines = logs(&outcome);
    let fffd = |n: usize| "\u{fffd}".repeat(n);
    assert_eq!(
        lines.get(..2),
        Some(
            &[
                (
                    "info".to_owned(),
                    format!("Grüße ✓ 😀 16 a{}b true", fffd(8))
                ),
                // A lone surrogate is sent as U+FFFD; past U+10FFFF, an overlong form and a
                // sequence cut short by the end each decode byte by byte to U+FFFD.
                (
                    "info".to_owned(),
                    format!("239,191,189 {}|{}|{}", fffd(4), fffd(3), fffd(2))
                ),
            ][..]
        ),
        "{outcome:#}"
    );
}

/// Keyfactor's text is a WIT string of known length that may hold a NUL: a generated project
/// logs all of it, not the part before the NUL (C's `%.*s` stops there).
fn text_after_a_nul_is_kept(dir: &Path, component: &str) {
    let sample = std::fs::read_to_string(dir.join("context.json")).expect("context.json");
    let mut context: Value = serde_json::from_str(&sample).expect("context JSON");
    context["ClientMachine"] = Value::String("evil\u{0}.example".into());
    std::fs::write(dir.join("nul.json"), context.to_string()).expect("write context");
    let outcome = run(dir, component, "nul.json");
    assert_eq!(outcome["class"], "succeeded", "{outcome:#}");
    let warned = logs(&outcome)
        .into_iter()
        .find(|(level, _)| level == "warn")
        .unwrap_or_else(|| panic!("no warning:\n{outcome:#}"));
    let after = warned.1.split_once("evil").map(|(_, rest)| rest.to_owned());
    assert!(
        after
            .as_deref()
            .is_some_and(|rest| rest.ends_with(".example")),
        "the text after the NUL is lost: {warned:?}"
    );
}

/// A C project's `run()` returning false without `fail()`: the bindings leave `*err`
/// uninitialised, and the template's export gives a reason instead of handing that memory on.
fn c_false_without_a_reason_still_has_one(dir: &Path, tools: &[PathBuf], component: &str) {
    let returns = "  return true;\n}";
    let outcome = run_edited(
        dir,
        tools,
        component,
        "handler.c",
        returns,
        "  return false;\n}",
    );
    assert_eq!(outcome["class"], "handler-failed", "{outcome:#}");
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|r| r.contains("without a reason")),
        "{outcome:#}"
    );
}

/// The C template's bindings are for the whole `handler` world, and the linker keeps only what
/// `handler.c` calls: with a mail sent, the component imports `mail` and no other capability
/// (as generated it imports none, `runs_as_generated`), and the mail's error (no relay is
/// configured) is the delivery's reason through `fail()`.
fn c_a_capability_it_calls_is_the_only_one_it_imports(
    dir: &Path,
    tools: &[PathBuf],
    component: &str,
) {
    let mailing = "  handler_string_t to = {(uint8_t *)\"pki@example.com\", 15};\n\
                   jobhook_handler_mail_message_t message = {.to = {&to, 1},\n\
                   .subject = {(uint8_t *)\"s\", 1}, .body = {(uint8_t *)\"b\", 1}};\n\
                   jobhook_handler_mail_capability_error_t refused;\n\
                   if (!jobhook_handler_mail_send(&message, &refused))\n\
                   return fail(err, \"mail (%d): %S\", (int)refused.tag, &refused.val.failed);\n\
                   return true;\n}";
    let outcome = run_edited(
        dir,
        tools,
        component,
        "handler.c",
        "  return true;\n}",
        mailing,
    );
    // The component built from the edited source.
    assert_imports_capabilities(dir, component, serde_json::json!(["mail"]));
    assert_eq!(outcome["class"], "handler-failed", "{outcome:#}");
    let reason = outcome["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("mail (1): "), "{outcome:#}");
}

/// `sys.exit(3)` in a Python project's `run` fails the delivery with a reason, like any
/// exception, instead of exiting the component (recorded as a trap, the code lost).
fn python_exit_is_a_reason(dir: &Path, tools: &[PathBuf], component: &str) {
    let marker = "# `raise Err(\"why\")` (or any exception) reports a failure with that reason.";
    let exiting = "import sys\n    sys.exit(3)";
    let outcome = run_edited(dir, tools, component, "app.py", marker, exiting);
    assert_eq!(outcome["class"], "handler-failed", "{outcome:#}");
    assert_eq!(outcome["reason"], "SystemExit: 3", "{outcome:#}");
}

/// The edits that make a generated project's `run` asynchronous, and that make it fail with a
/// reason holding a lone surrogate, with the reasons expected; `None` for a language whose
/// template has neither case (Rust and C strings cannot hold a lone surrogate, nor be async).
fn async_and_lone_surrogate_edits(lang: &str) -> Option<[(Edit, &'static str); 2]> {
    match lang {
        "js" => Some([
            (
                (
                    "handler.js",
                    "function run(ctx) {",
                    "async function run(ctx) {\n    await null;\n    throw \"after the await\";",
                ),
                "run() returned a Promise: handlers run synchronously",
            ),
            (
                (
                    "handler.js",
                    "function run(ctx) {",
                    "function run(ctx) {\n    throw `cut ${\"\\u{1F600}\".slice(0, 1)} here`;",
                ),
                "cut \u{fffd} here",
            ),
        ]),
        "python" => Some([
            (
                (
                    "app.py",
                    "def run(context: JobContext) -> None:",
                    "async def run(context: JobContext) -> None:",
                ),
                "run() returned a coroutine: handlers run synchronously",
            ),
            (
                (
                    "app.py",
                    "# `raise Err(\"why\")` (or any exception) reports a failure with that reason.",
                    "raise ValueError(b\"job \\xff output\".decode(\"utf-8\", \"surrogateescape\"))",
                ),
                "ValueError: job ? output",
            ),
        ]),
        _ => None,
    }
}

/// An `async` `run` (which the synchronous runtime would never finish: it used to end
/// `succeeded`, the code after its first `await` never run) and a reason with a lone surrogate
/// (which would end as `panicked`, the reason lost) both end as `handler-failed` with a reason.
fn an_async_run_and_a_lone_surrogate_are_reasons(
    dir: &Path,
    tools: &[PathBuf],
    component: &str,
    edits: &[(Edit, &'static str); 2],
) {
    for ((file, from, to), reason) in edits {
        let outcome = run_edited(dir, tools, component, file, from, to);
        assert_eq!(outcome["class"], "handler-failed", "{to}: {outcome:#}");
        assert!(
            outcome["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with(reason)),
            "{to}: {outcome:#}"
        );
    }
}

/// Replaces the first `from` in the generated project's `file` with `to`, builds the project and
/// runs it on its sample context; the outcome. The file is as generated again afterwards (the
/// built component stays the edited one).
fn run_edited(
    dir: &Path,
    tools: &[PathBuf],
    component: &str,
    file: &str,
    from: &str,
    to: &str,
) -> Value {
    let path = dir.join(file);
    let generated = std::fs::read_to_string(&path).expect("a generated file");
    assert!(
        generated.contains(from),
        "{from:?} not in {file}:\n{generated}"
    );
    std::fs::write(&path, generated.replacen(from, to, 1)).expect("write the edit");
    build_script(dir, tools);
    let outcome = run(dir, component, "context.json");
    std::fs::write(&path, generated).expect("restore the generated file");
    outcome
}

/// One edit of a generated project's file: (file, text, replacement).
type Edit = (&'static str, &'static str, &'static str);

/// The edits that make a generated project do what its README says to use a capability (build
/// for `with-mail`, import `mail`) and send a mail without handling the error, and the reason
/// its failure is expected to start with; `None` for a language whose template has no such
/// wrapper to test.
fn uncaught_mail_error(lang: &str) -> Option<(Vec<Edit>, &'static str)> {
    match lang {
        "js" => Some((
            vec![
                ("build.sh", "--world core", "--world with-mail"),
                (
                    "handler.js",
                    "import * as log from",
                    "import * as mail from \"jobhook:handler/mail@0.2.0\";\nimport * as log from",
                ),
                (
                    "handler.js",
                    "// `throw \"why\"` reports a failure with that reason.",
                    "mail.send({ to: [\"pki@example.com\"], cc: [], subject: \"s\", body: \"b\" });",
                ),
            ],
            "not-available: ",
        )),
        "python" => Some((
            vec![
                ("build.sh", "-w core", "-w with-mail"),
                (
                    "app.py",
                    "from wit_world.imports import log",
                    "from wit_world.imports import log, mail",
                ),
                (
                    "app.py",
                    "# `raise Err(\"why\")` (or any exception) reports a failure with that reason.",
                    "mail.send(mail.Message(from_=None, to=[\"pki@example.com\"], cc=[], \
                     subject=\"s\", body=\"b\"))",
                ),
            ],
            "NotAvailable: ",
        )),
        _ => None,
    }
}

/// A generated project changed as its README says to use the mail capability, sending a mail
/// and not handling the error (no relay is configured: `not-available`): the delivery fails
/// with the capability's error as its reason, not `panicked` with the reason lost.
fn an_uncaught_capability_error_is_the_reason(
    dir: &Path,
    tools: &[PathBuf],
    component: &str,
    edits: &[Edit],
    reason_starts: &str,
) {
    for (file, from, to) in edits {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).expect("source");
        assert!(text.contains(from), "{from:?} not in {file}:\n{text}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write source");
    }
    build_script(dir, tools);
    let outcome = run(dir, component, "context.json");
    assert_eq!(outcome["class"], "handler-failed", "{outcome:#}");
    let reason = outcome["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with(reason_starts), "{outcome:#}");
    assert!(reason.contains("mail"), "{outcome:#}");
}

#[test]
fn a_new_python_project_builds_and_runs() {
    scripted_language(
        "python",
        "componentize-py -d wit -w core componentize -p . app -o first_hook.wasm",
        "first_hook.wasm",
    );
}

#[test]
fn a_new_javascript_project_builds_and_runs() {
    scripted_language(
        "js",
        "--sync --wit wit --world core --js handler.js -o first_hook.wasm",
        "first_hook.wasm",
    );
}

/// A JavaScript project is an npm package of its own, pinning its build tool: `npm install`
/// in it installs there even when a directory above it is another package (a monorepo, a
/// home directory with a package.json), where npm would otherwise install into that one.
#[test]
fn a_new_javascript_project_is_its_own_npm_package() {
    // npm comes with the JavaScript toolchain's set-up (and is skipped with it, explicitly).
    if tool_dirs("js").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("package.json"),
        r#"{"name":"outer","private":true}"#,
    )
    .expect("outer package.json");
    let dir = tmp.path().join("inner");
    let out = jobhook(&[
        "new",
        "inner",
        "--lang",
        "js",
        "--dir",
        &dir.display().to_string(),
    ]);
    check("jobhook new", &out);
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("package.json")).expect("the project's package.json"),
    )
    .expect("package.json is JSON");
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README");
    let pinned = manifest["devDependencies"]["componentize-qjs"]
        .as_str()
        .expect("componentize-qjs pinned");
    assert!(
        readme.contains(&format!("componentize-qjs {pinned}")),
        "{readme}"
    );
    assert_eq!(manifest["private"], Value::Bool(true));
    let prefix = Command::new("npm")
        .arg("prefix")
        .current_dir(&dir)
        .output()
        .expect("npm (Node 20) runs");
    check("npm prefix", &prefix);
    assert_eq!(
        PathBuf::from(text(&prefix.stdout).trim())
            .canonicalize()
            .expect("npm's prefix exists"),
        dir.canonicalize().expect("project"),
        "npm would install somewhere else than the project"
    );
}

#[test]
fn a_new_c_project_builds_and_runs() {
    scripted_language(
        "c",
        "obj/handler.o obj/bindings.o bindings/handler_component_type.o -o first_hook.wasm",
        "first_hook.wasm",
    );
}

#[test]
fn a_new_rust_project_tests_builds_and_runs() {
    let (_tmp, dir) = new_project("first-hook", "rust");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("Cargo.toml");
    assert!(
        !manifest.contains(".workspace"),
        "a standalone project inherits nothing:\n{manifest}"
    );
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
    for command in ["cargo build --release --target wasm32-wasip2", "cargo test"] {
        assert!(
            readme.contains(command),
            "README lacks `{command}`:\n{readme}"
        );
    }

    // Shared with the guests' builds: the SDK's dependencies compile once.
    let target = workspace_root().join("target/guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo_in_project = |args: &[&str]| {
        Command::new(&cargo)
            .current_dir(&dir)
            .args(args)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("run cargo")
    };
    let tests = cargo_in_project(&["test"]);
    check("cargo test", &tests);
    let report = text(&tests.stdout);
    assert!(
        report.contains("test result: ok. 2 passed"),
        "the template's two unit tests:\n{report}"
    );
    check(
        "cargo build --release --target wasm32-wasip2",
        &cargo_in_project(&["build", "--release", "--target", "wasm32-wasip2"]),
    );

    // `jobhook run target/wasm32-wasip2/release/first_hook.wasm`, as the README says: the
    // project's own target/ is where CARGO_TARGET_DIR put it.
    let built = target.join("wasm32-wasip2/release/first_hook.wasm");
    let expected = dir.join("target/wasm32-wasip2/release");
    std::fs::create_dir_all(&expected).expect("mkdir");
    std::fs::copy(&built, expected.join("first_hook.wasm")).expect("copy the component");
    runs_as_generated(&dir, "target/wasm32-wasip2/release/first_hook.wasm");
}

#[test]
fn jobhook_new_refuses_what_it_cannot_create() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Run from a directory inside `tmp`, so a name or --dir that escaped would land where the
    // checks below look.
    let cwd = tmp.path().join("cwd");
    std::fs::create_dir(&cwd).expect("mkdir");
    let refused = |args: &[&str], why: &str| {
        let out = jobhook_in(&cwd, args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    };
    let inside = |name: &str| tmp.path().join(name).display().to_string();
    refused(&["new", "../escape"], "path separator (use --dir");
    refused(&["new", "a.b", "--dir", &inside("x")], "a dot");
    refused(
        &["new", "9lives", "--dir", &inside("x")],
        "start with a letter",
    );
    refused(&["new", "fn", "--dir", &inside("x")], "Rust keyword");
    refused(&["new", "ok", "--lang", "cobol"], "invalid value 'cobol'");
    std::fs::create_dir(tmp.path().join("taken")).expect("mkdir");
    std::fs::write(tmp.path().join("taken/keep"), "mine").expect("write");
    refused(&["new", "ok", "--dir", &inside("taken")], "is not empty");
    refused(
        &[
            "new",
            "ok",
            "--dir",
            &inside("y"),
            "--sdk-path",
            &inside("taken"),
        ],
        // A directory with no Cargo.toml: the message says which directory to pass instead.
        "pass --sdk-path with the `guest-sdk` directory",
    );
    refused(
        &[
            "new",
            "ok",
            "--lang",
            "js",
            "--dir",
            &inside("z"),
            "--sdk-path",
            &inside("taken"),
        ],
        "--sdk-path is for Rust projects",
    );
    assert!(!tmp.path().join("escape").exists() && !tmp.path().join("x").exists());
    assert!(
        std::fs::read_dir(&cwd).expect("read cwd").next().is_none(),
        "a refused `jobhook new` wrote into the directory it ran in"
    );
    assert!(!tmp.path().join("y").exists() && !tmp.path().join("z").exists());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("taken/keep")).expect("read"),
        "mine"
    );

    // --sdk-path with the SDK itself is accepted and written as an absolute path.
    let sdk = workspace_root().join("guest-sdk");
    let out = jobhook(&[
        "new",
        "ok",
        "--dir",
        &inside("w"),
        "--sdk-path",
        &sdk.display().to_string(),
    ]);
    check("jobhook new --sdk-path", &out);
    let manifest = std::fs::read_to_string(tmp.path().join("w/Cargo.toml")).expect("manifest");
    let canonical = std::fs::canonicalize(&sdk).expect("canonical");
    assert!(
        manifest.contains(&format!("path = \"{}\"", canonical.display())),
        "{manifest}"
    );
}
