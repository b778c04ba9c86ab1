//! The `jobhook` command line.
//!
//! Exit codes: 0 when the handler succeeded (or the command did what it was asked), 1 when the
//! handler ran and did not succeed in any way, 2 for usage, load and input errors.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

use crate::app::component_file::read_component;
use crate::app::output::{EXIT_STDOUT_CLOSED, StdoutClosed, print_err, print_out};
use crate::capabilities::properties::Properties;
use crate::context::{JobContext, MAX_CONTEXT_BYTES};
use crate::escape::escape;
use crate::outcome::Outcome;
use crate::runtime::loader::{self, Inspection};
use crate::runtime::sandbox::SandboxedHandler;
use crate::runtime::state::{Delivery, SandboxSpec};

/// `--version`'s long form: the engine's version and the handler contract versions it runs, so
/// that a handler author or an operator can tell whether a component built against a version of
/// the WIT contract runs on this engine without loading it.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}\nhandler contract: {} {}",
        env!("CARGO_PKG_VERSION"),
        loader::WIT_PACKAGE,
        loader::supported_versions()
    )
});

/// Runs Keyfactor Command job complete handlers as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "jobhook", version, long_version = LONG_VERSION.as_str(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a handler project (Rust, Python, JavaScript or C) that builds, tests and runs as
    /// created: the handler, a sample context and a README with the commands.
    New(NewArgs),
    /// Run one handler on one job context and print the outcome (the handler author's harness).
    Run(RunArgs),
    /// Show whether a component fits the handler world and which capabilities it imports.
    Inspect(InspectArgs),
    /// Run the engine: the HTTP API, the durable queue and the handlers of a configuration.
    Serve(ConfigArgs),
    /// Validate a configuration and load every handler, without serving.
    Check(ConfigArgs),
    /// Copy the SQLite store of a configuration to a new file, consistently, while the engine
    /// runs, and check the copy (PostgreSQL: use pg_dump).
    Backup(BackupArgs),
    /// List the job-type GUIDs of the configured Keyfactor Command (store types and custom job
    /// types) and print them as TOML for `job_types` and `[poller.job_types]`.
    JobTypes(ConfigArgs),
    /// Print `[[handlers]]` stanzas for the Job Complete Handler registrations of a Keyfactor
    /// web.config (Command 9-10) or manifest.json (11+); warnings go to stderr.
    Import(ImportArgs),
    /// Print the registration of jobhook's Keyfactor forwarder (web.config for Command 9-10,
    /// manifest.json for 11+) for a jobhook configuration; warnings go to stderr.
    ForwarderConfig(ForwarderArgs),
}

#[derive(Debug, Args)]
struct NewArgs {
    /// The handler's name: an ASCII letter, then letters, digits, `-` or `_`. It names the
    /// directory, the crate and the component file.
    name: String,
    /// The language.
    #[arg(long, value_enum, default_value = "rust")]
    lang: crate::app::new_project::Lang,
    /// The directory to create (default: ./NAME); it must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Rust: the `guest-sdk` directory the project depends on by path (default: the SDK source
    /// this jobhook was built from).
    #[arg(long, value_name = "DIR")]
    sdk_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// The configuration file (TOML) whose `[store]` to copy.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// The backup file to write; it must not exist.
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// Keyfactor's `WebAgentServices\web.config` or an extension's `manifest.json`.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct ForwarderArgs {
    /// The jobhook configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// The engine's base URL as Keyfactor reaches it (default: from `[server]` listen and tls).
    #[arg(long, value_name = "URL")]
    engine_url: Option<String>,
    /// Which Keyfactor Command generation: 10 (web.config, 9-10), 11 (manifest.json, 11+) or both.
    #[arg(long, default_value = "both", value_parser = ["10", "11", "both"])]
    generation: String,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
}

/// `jobhook run`'s arguments; also used by the author's tool (`jobhook-dev run`), which adds an
/// in-process Keyfactor stand-in.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The handler component (`.wasm`, built for wasm32-wasip2).
    component: PathBuf,
    /// The job context as JSON with Keyfactor's field names (`AgentId`, `JobResult`, ...);
    /// `-` reads standard input.
    #[arg(long, value_name = "FILE|-")]
    context: String,
    /// A handler property, like a `<property name=".." value=".."/>` (repeatable).
    #[arg(long = "property", short = 'p', value_name = "KEY=VALUE")]
    properties: Vec<String>,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    json: bool,
    /// The delivery attempt the handler sees.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    attempt: u32,
    /// The job message the handler sees through `delivery.message` (Keyfactor's text about the
    /// job, e.g. why it failed; in production only poller-made events have one).
    #[arg(long, value_name = "TEXT")]
    job_message: Option<String>,
    /// Wall-clock budget in milliseconds, 1 to ten years (default: the engine default).
    #[arg(long, value_name = "MS", value_parser = timeout_ms)]
    timeout_ms: Option<u64>,
    /// Total memory budget in bytes, 1 MiB to 1 GiB (default: the engine default).
    #[arg(long, value_name = "BYTES", value_parser = memory_bytes)]
    memory_bytes: Option<u64>,
    /// Core instances the handler may create, as `instances` of [handlers.limits] (default:
    /// the engine default; the pool's `--max-core-instances-per-component` bounds it too).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    instances: Option<u32>,
    /// Linear memories the handler may create, as `memories` of [handlers.limits].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    memories: Option<u32>,
    /// Tables the handler may create, as `tables` of [handlers.limits].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    tables: Option<u32>,
    /// Elements a table may hold, as `table_elements` of [handlers.limits] (at most the
    /// sandbox pool's room per table).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=crate::limits::MAX_TABLE_ELEMENTS))]
    table_elements: Option<u64>,
    /// The services behind the keyfactor, mail and http capabilities.
    #[command(flatten)]
    services: Box<crate::app::devtools::ServiceArgs>,
    /// Pool caps, compile time limit and AOT cache.
    #[command(flatten)]
    engine: crate::app::engine_args::EngineArgs,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// The component to inspect.
    component: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Pool caps, compile time limit and AOT cache.
    #[command(flatten)]
    engine: crate::app::engine_args::EngineArgs,
}

/// How long the process's end waits for blocking calls still running when a command is done
/// (see `main`): a call that answers does so well within it.
const BLOCKING_CALLS_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Entry point of the binary: parses arguments, runs the command, maps the result to an exit
/// code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` logs through a writer thread; held to the end, so that its last lines are written.
    let (log_drops, _log) = match cli.command {
        Command::Serve(_) => {
            let (drops, guard) = crate::app::engine_log::init_serve_tracing();
            (drops, Some(guard))
        }
        _ => {
            crate::app::engine_log::init_tracing();
            (crate::metrics::LogDrops::default(), None)
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_err(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::New(args) => new_project(args),
            Command::Run(args) => run(args, None).await,
            Command::Inspect(args) => inspect(args).await,
            Command::JobTypes(args) => crate::app::jobtypes::job_types(&args.config).await,
            Command::Serve(args) => crate::app::server::serve(args.config, log_drops)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Check(args) => check(args).await,
            Command::Backup(args) => backup(args).await,
            Command::Import(args) => import(args),
            Command::ForwarderConfig(args) => forwarder_config(args),
        }
    });
    // A blocking call still waiting on a store or a disk that stopped answering (an ingest
    // commit that was answered 503, a metrics read) is abandoned: dropping the runtime would
    // wait for it for as long as that lasts.
    runtime.shutdown_timeout(BLOCKING_CALLS_AT_EXIT);
    exit_code(result)
}

/// The exit code of a command's result; an error is printed to stderr first (exit code 2), except
/// that stdout closed by its reader ends the command quietly
/// ([`crate::app::output::EXIT_STDOUT_CLOSED`]).
pub fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::from(EXIT_STDOUT_CLOSED),
        Err(e) => {
            // An error may quote a configuration's or a component's text: each line escaped,
            // and every line after the first indented, so that no text in the message can
            // pass for an `error:` line of its own.
            let message = crate::app::output::error_text(&e);
            let lines: Vec<_> = message.split('\n').map(escape).collect();
            print_err(&format!("error: {}", lines.join("\n  ")));
            ExitCode::from(2)
        }
    }
}

/// `jobhook run`: one handler on one context, the outcome printed. `keyfactor`, when given, is
/// the keyfactor service to use (the author's tool passes its in-process stand-in's).
pub async fn run(
    args: RunArgs,
    keyfactor: Option<std::sync::Arc<crate::capabilities::keyfactor::KeyfactorClient>>,
) -> anyhow::Result<ExitCode> {
    let context = read_context(&args.context)?;
    let properties = parse_properties(&args.properties)?;
    let options = args.engine.load_options();
    let bytes = read_component(&args.component, options.max_bytes, None)?;
    let engine = args.engine.engine()?;

    let name = args
        .component
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "handler".into());
    let mut spec = SandboxSpec::new(name);
    spec.properties = Properties::new(properties);
    // The author's harness grants every capability; `jobhook serve` grants per configuration.
    let run_services = args.services.build(keyfactor).await?;
    spec.grants = run_services.grants.clone();
    if let Some(ms) = args.timeout_ms {
        spec.limits.timeout = Duration::from_millis(ms);
    }
    if let Some(bytes) = args.memory_bytes {
        spec.limits.memory_bytes = bytes;
    }
    let count = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
    if let Some(n) = args.instances {
        spec.limits.instances = count(n);
    }
    if let Some(n) = args.memories {
        spec.limits.memories = count(n);
    }
    if let Some(n) = args.tables {
        spec.limits.tables = count(n);
    }
    if let Some(n) = args.table_elements {
        spec.limits.table_elements = n;
    }

    let load_started = std::time::Instant::now();
    let handler = SandboxedHandler::load(&engine, &run_services.services, bytes, spec, &options)
        .await
        .map_err(|e| {
            anyhow::anyhow!(e.with_setting_named(|s| crate::app::engine_args::flag(s.key())))
        })
        .with_context(|| format!("cannot load {}", args.component.display()))?;
    let load = load_report(handler.component(), load_started.elapsed());
    let outcome = handler
        .invoke(
            &context,
            Delivery {
                attempt: args.attempt,
                message: args.job_message.as_deref().and_then(Delivery::job_message),
                ..Delivery::default()
            },
        )
        .await;

    if args.json {
        let mut value = serde_json::to_value(&outcome)?;
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "handler".into(),
                args.component.display().to_string().into(),
            );
            map.insert("load".into(), load);
        }
        print_out(&format!(
            "{}\n",
            terminal_safe_json(&serde_json::to_string(&value)?)
        ))?;
    } else {
        print_out(&render_outcome(&args.component, &outcome))?;
    }
    Ok(if outcome.kind.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// How the component was loaded, for `run --json`: `cache` is `hit` (nothing compiled), `miss`
/// (compiled and stored), `rejected` (a bad entry was replaced) or `off` (no cache).
fn load_report(component: &loader::LoadedComponent, took: Duration) -> serde_json::Value {
    use crate::runtime::aot::CacheOutcome;
    let cache = match component.cache_outcome() {
        None => "off",
        Some(CacheOutcome::Hit) => "hit",
        Some(CacheOutcome::Miss) => "miss",
        Some(CacheOutcome::Rejected(_)) => "rejected",
    };
    serde_json::json!({ "cache": cache, "ms": took.as_secs_f64() * 1000.0 })
}

async fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let options = args.engine.load_options();
    let bytes = read_component(&args.component, options.max_bytes, None)?;
    let engine = args.engine.engine()?;
    let inspection = loader::inspect(&engine, bytes, &options)
        .await
        .map_err(|e| {
            anyhow::anyhow!(e.with_setting_named(|s| crate::app::engine_args::flag(s.key())))
        })
        .with_context(|| format!("cannot inspect {}", args.component.display()))?;
    if args.json {
        print_out(&format!(
            "{}\n",
            terminal_safe_json(&serde_json::to_string(&inspection)?)
        ))?;
    } else {
        print_out(&render_inspection(&args.component, &inspection))?;
    }
    Ok(if inspection.world_error.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn check(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let (names, warnings) = crate::app::server::check(&args.config).await?;
    for warning in warnings {
        print_err(&format!("warning: {}", escape(&warning)));
    }
    let listed = if names.is_empty() {
        String::new()
    } else {
        format!(": {}", escape(&names.join(", ")))
    };
    print_out(&format!(
        "{}: configuration is valid; {} handler(s) loaded{listed}\n",
        escape(&args.config.display().to_string()),
        names.len(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    use crate::queue::store::config::StoreKind;
    let config = crate::app::config::Config::load(&args.config)?;
    if config.store.kind != StoreKind::Sqlite {
        anyhow::bail!(
            "{}: [store] kind is \"postgres\": back the database up with PostgreSQL's own tools \
             (pg_dump, or the server's base backups); `jobhook backup` copies a SQLite store",
            escape(&args.config.display().to_string())
        );
    }
    let data_dir = config.store.data_dir.clone();
    let to = args.to.clone();
    // A copy of a large store takes seconds of disk reads: off the async threads.
    let report =
        tokio::task::spawn_blocking(move || crate::queue::store::sqlite::backup(&data_dir, &to))
            .await??;
    print_out(&format!(
        "{}: backup written and checked (quick_check ok): {} events, {} deliveries not finished \
         when it was taken, {} bytes\n",
        escape(&args.to.display().to_string()),
        report.events,
        report.unfinished,
        report.bytes
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn new_project(args: NewArgs) -> anyhow::Result<ExitCode> {
    use crate::app::new_project::{NewProject, create, next_steps};
    let request = NewProject {
        name: args.name,
        lang: args.lang,
        dir: args.dir,
        sdk_path: args.sdk_path,
    };
    let dir = create(&request)?;
    print_out(&next_steps(&request, &dir))?;
    Ok(ExitCode::SUCCESS)
}

fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let (toml, warnings) = crate::app::migrate::import(&args.file)?;
    for warning in crate::app::migrate::shown_warnings(warnings) {
        print_err(&format!("warning: {warning}"));
    }
    print_out(&toml)?;
    Ok(ExitCode::SUCCESS)
}

fn forwarder_config(args: ForwarderArgs) -> anyhow::Result<ExitCode> {
    use crate::app::migrate::{Generation, engine_url, forwarder_config};
    let engine_url = args
        .engine_url
        .as_deref()
        .map(engine_url)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let config = crate::app::config::Config::load(&args.config)?;
    let generation = match args.generation.as_str() {
        "10" => Generation::Unity,
        "11" => Generation::Manifest,
        _ => Generation::Both,
    };
    let (text, warnings) = forwarder_config(&config, engine_url.as_deref(), generation);
    for warning in warnings {
        print_err(&format!("warning: {warning}"));
    }
    print_out(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn read_context(source: &str) -> anyhow::Result<JobContext> {
    let limit = MAX_CONTEXT_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    let what = if source == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("cannot read the context from standard input")?;
        "standard input".to_owned()
    } else {
        std::fs::File::open(source)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .with_context(|| format!("cannot read the context file {source}"))?;
        source.to_owned()
    };
    let context = JobContext::from_json_bytes(&bytes)
        .with_context(|| format!("invalid context in {what}"))?;
    for (name, nearest) in crate::context::unknown_fields(&bytes) {
        let hint = nearest
            .map(|field| format!("; did you mean {field}?"))
            .unwrap_or_default();
        print_err(&format!(
            "warning: the context in {} has a field {} that is not one of Keyfactor's eleven; it \
             is ignored{hint}",
            escape(&what),
            escape(&format!("{name:?}"))
        ));
    }
    Ok(context)
}

/// `--timeout-ms`: the bounds of a handler's `[handlers.limits] timeout_ms` (at least 1, at most
/// [`crate::duration_ms::MAX_MILLISECONDS`]); clap names the flag in front of the message.
fn timeout_ms(text: &str) -> Result<u64, String> {
    use crate::duration_ms::MAX_MILLISECONDS;
    match text.trim().parse::<u64>() {
        Ok(ms) if (1..=MAX_MILLISECONDS).contains(&ms) => Ok(ms),
        _ => Err(format!(
            "the timeout is a whole number of milliseconds between 1 and {MAX_MILLISECONDS} \
             (ten years), as timeout_ms of [handlers.limits]"
        )),
    }
}

/// `--memory-bytes`: the bounds of a handler's `[handlers.limits] memory_bytes` (a larger value
/// would be cut to the sandbox's slot without a word); clap names the flag in front of the
/// message.
fn memory_bytes(text: &str) -> Result<u64, String> {
    use crate::app::config::{MAX_HANDLER_MEMORY_BYTES, MIN_HANDLER_MEMORY_BYTES};
    match text.trim().parse::<u64>() {
        Ok(bytes) if (MIN_HANDLER_MEMORY_BYTES..=MAX_HANDLER_MEMORY_BYTES).contains(&bytes) => {
            Ok(bytes)
        }
        _ => Err(format!(
            "the memory budget is a number of bytes between {MIN_HANDLER_MEMORY_BYTES} (1 MiB) \
             and {MAX_HANDLER_MEMORY_BYTES} (1 GiB), as memory_bytes of [handlers.limits]"
        )),
    }
}

fn parse_properties(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut properties = BTreeMap::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--property {pair:?}: expected KEY=VALUE");
        };
        let key = key.trim();
        // The name only: the value may be a secret.
        if let Some(problem) = crate::capabilities::properties::name_problem(key) {
            bail!("--property named {key:?}: {problem}");
        }
        if properties
            .insert(key.to_owned(), value.to_owned())
            .is_some()
        {
            bail!("--property {key} is given more than once");
        }
    }
    Ok(properties)
}

/// The human form of an outcome. Every text the handler controls (reason, panic message,
/// backtrace frames, log lines, stdout/stderr) and the path are escaped ([`escape`]), so
/// the handler cannot forge a line of this report or send escape sequences to the terminal.
fn render_outcome(component: &Path, outcome: &Outcome) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "handler   {}",
        escape(&component.display().to_string())
    );
    let _ = writeln!(out, "outcome   {}", outcome.kind.class());
    match &outcome.kind {
        crate::OutcomeKind::Succeeded => {}
        crate::OutcomeKind::Trapped { backtrace, .. } => {
            let _ = writeln!(out, "reason    {}", escape(&outcome.kind.to_string()));
            for frame in backtrace {
                let _ = writeln!(out, "          at {}", escape(frame));
            }
        }
        other => {
            let _ = writeln!(out, "reason    {}", escape(&other.to_string()));
        }
    }
    let _ = writeln!(
        out,
        "duration  {:.2} ms",
        outcome.duration.as_secs_f64() * 1000.0
    );
    let _ = writeln!(
        out,
        "memory    {:.1} MiB",
        outcome.memory_bytes as f64 / (1024.0 * 1024.0)
    );
    if !outcome.logs.is_empty() || outcome.logs_dropped > 0 {
        let _ = writeln!(out, "logs");
        for line in &outcome.logs {
            let _ = writeln!(out, "  {:<5} {}", line.level, escape(&line.message));
        }
        if outcome.logs_dropped > 0 {
            let _ = writeln!(
                out,
                "  ({} more lines dropped: log budget reached)",
                outcome.logs_dropped
            );
        }
    }
    for (name, text) in [("stdout", &outcome.stdout), ("stderr", &outcome.stderr)] {
        if !text.is_empty() {
            let _ = writeln!(out, "{name}");
            // Lines end at LF (a CR before it dropped); a bare CR is escaped like the rest.
            for line in text.lines() {
                let _ = writeln!(out, "  {}", escape(line));
            }
        }
    }
    if outcome.output_dropped > 0 {
        let _ = writeln!(
            out,
            "({} bytes of output dropped: output budget reached)",
            outcome.output_dropped
        );
    }
    out
}

/// `json` with every character [`escape`] would escape (bidi overrides, line separators; control
/// characters are escaped by JSON already) written as a `\uXXXX` escape: the same JSON value,
/// but nothing in it can reorder or break what a terminal shows.
fn terminal_safe_json(json: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if crate::escape::needs_escape(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The human form of an inspection; the names come from the component and are escaped.
fn render_inspection(component: &Path, inspection: &Inspection) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "component     {}",
        escape(&component.display().to_string())
    );
    let _ = writeln!(out, "size          {} bytes", inspection.size);
    match &inspection.world_error {
        None => {
            let _ = writeln!(
                out,
                "world         fits jobhook:handler (this engine runs {})",
                loader::supported_versions()
            );
        }
        Some(e) => {
            let _ = writeln!(
                out,
                "world         DOES NOT FIT: {}",
                escape(&e.to_string())
            );
        }
    }
    match &inspection.imports.contract {
        Some(version) if loader::version_supported(version) => {
            let _ = writeln!(out, "contract      jobhook:handler@{}", escape(version));
        }
        Some(version) if version.is_empty() => {
            let _ = writeln!(
                out,
                "contract      jobhook:handler without a version (not run by this engine)"
            );
        }
        Some(version) => {
            let _ = writeln!(
                out,
                "contract      jobhook:handler@{} (not run by this engine)",
                escape(version)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "contract      none (it imports no jobhook:handler interface)"
            );
        }
    }
    let caps: Vec<String> = inspection
        .imports
        .capabilities
        .iter()
        .map(|c| c.to_string())
        .collect();
    let list = |items: &[String]| {
        if items.is_empty() {
            "(none)".to_owned()
        } else {
            escape(&items.join(", ")).into_owned()
        }
    };
    let _ = writeln!(out, "capabilities  {}", list(&caps));
    let _ = writeln!(out, "jobhook       {}", list(&inspection.imports.jobhook));
    let _ = writeln!(out, "wasi          {}", list(&inspection.imports.wasi));
    if !inspection.imports.inert.is_empty() {
        let _ = writeln!(
            out,
            "wasi inert    {} ({})",
            inspection.imports.inert.join(", "),
            loader::INERT_NOTE
        );
    }
    if !inspection.imports.unsupported.is_empty() {
        let _ = writeln!(
            out,
            "unsupported   {}",
            escape(&inspection.imports.unsupported.join(", "))
        );
    }
    let _ = writeln!(out, "exports       {}", list(&inspection.exports));
    if let Some(needs) = &inspection.needs {
        let _ = writeln!(out, "needs         {needs}");
        let _ = match &inspection.over_default_limits {
            None => writeln!(out, "limits        within the default [handlers.limits]"),
            Some(problem) => writeln!(out, "limits        OVER THE DEFAULTS: {}", escape(problem)),
        };
    }
    if !inspection.compiled {
        let _ = writeln!(
            out,
            "compiled      no: its imports and exports already rule it out"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_and_reject_bad_pairs() {
        let p = parse_properties(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(p["A"], "1");
        assert_eq!(p["B"], "x=y");
        assert_eq!(p["C"], "");
        assert!(parse_properties(&["novalue".into()]).is_err());
        assert!(parse_properties(&["=v".into()]).is_err());
        assert!(parse_properties(&["A=1".into(), "A=2".into()]).is_err());
    }

    #[test]
    fn outcomes_render_guest_text_escaped() {
        let forged =
            "x\n2026-12-02T00:00:00Z  INFO jobhook: fake\routcome   succeeded\x1b[2J\0\u{202e}";
        let outcome = Outcome {
            kind: crate::OutcomeKind::HandlerFailed {
                reason: forged.into(),
            },
            duration: Duration::from_millis(1),
            memory_bytes: 0,
            logs: vec![crate::outcome::LogLine {
                level: "info",
                message: forged.into(),
            }],
            logs_dropped: 0,
            stdout: forged.into(),
            stderr: format!("{forged}\n"),
            output_dropped: 0,
        };
        let text = render_outcome(Path::new("h\n.wasm"), &outcome);
        assert!(!text.contains(['\x1b', '\0', '\r', '\u{202e}']), "{text}");
        let outcome_lines = text.lines().filter(|l| l.starts_with("outcome")).count();
        assert_eq!(outcome_lines, 1, "{text}");
        assert!(!text.lines().any(|l| l.starts_with("2026-")), "{text}");
        assert!(text.contains("\\x1b[2J\\0\\u{202e}"), "{text}");
    }

    #[test]
    fn json_output_keeps_the_value_and_hides_bidi_overrides() {
        let value = serde_json::json!({"m": "a\u{202e}b\u{2028}c\n\u{1b}ü"});
        let text = terminal_safe_json(&serde_json::to_string(&value).unwrap());
        assert!(!text.chars().any(crate::escape::needs_escape), "{text}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            value
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
