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

use crate::capabilities::properties::Properties;
use crate::context::{JobContext, MAX_CONTEXT_BYTES};
use crate::outcome::Outcome;
use crate::runtime::engine::Engine;
use crate::runtime::loader::{self, Inspection, LoadOptions};
use crate::runtime::sandbox::SandboxedHandler;
use crate::runtime::state::{Delivery, SandboxSpec};

/// Sandboxes the one-shot commands need; a small pool keeps start-up cheap.
const CLI_MAX_CONCURRENT_SANDBOXES: u32 = 4;

/// Runs Keyfactor Command job complete handlers as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "jobhook", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one handler on one job context and print the outcome (the handler author's harness).
    Run(RunArgs),
    /// Show whether a component fits the handler world and which capabilities it imports.
    Inspect(InspectArgs),
    /// Serve a stand-in for the Keyfactor Command API (seeded data, well-known credentials)
    /// for trying handlers on a workstation.
    Standin(crate::app::devtools::StandinArgs),
    /// Run the engine: the HTTP API, the durable queue and the handlers of a configuration.
    Serve(ConfigArgs),
    /// Validate a configuration and load every handler, without serving.
    Check(ConfigArgs),
    /// List the job-type GUIDs of the configured Keyfactor Command (store types and custom job
    /// types) and print them as TOML for `job_types` and `[poller.job_types]`.
    JobTypes(ConfigArgs),
    /// Post realistic job-complete events to a running engine and report throughput and latency.
    Load(LoadArgs),
    /// Print `[[handlers]]` stanzas for the Job Complete Handler registrations of a Keyfactor
    /// web.config (Command 9-10) or manifest.json (11+); warnings go to stderr.
    Import(ImportArgs),
    /// Print the registration of jobhook's Keyfactor forwarder (web.config for Command 9-10,
    /// manifest.json for 11+) for a jobhook configuration; warnings go to stderr.
    ForwarderConfig(ForwarderArgs),
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
    /// The engine's base URL as Keyfactor reaches it (default: from [server] listen and tls).
    #[arg(long, value_name = "URL")]
    engine_url: Option<String>,
    /// Which Keyfactor Command generation: 10 (web.config, 9-10), 11 (manifest.json, 11+) or both.
    #[arg(long, default_value = "both", value_parser = ["10", "11", "both"])]
    generation: String,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The engine's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8480")]
    url: String,
    /// Events per second.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Bearer token (or set JOBHOOK_TOKEN).
    #[arg(long, env = "JOBHOOK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Append the id of every accepted event to this file.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Seed of the event mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send an Idempotency-Key with every event and resend it (same key, same body) after a
    /// timeout, a connection error or a 5xx until it gets an answer, as the forwarder does.
    #[arg(long)]
    resend: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct RunArgs {
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
    /// Wall-clock budget in milliseconds (default: the engine default).
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Total memory budget in bytes (default: the engine default).
    #[arg(long, value_name = "BYTES")]
    memory_bytes: Option<u64>,
    /// The services behind the keyfactor, mail and http capabilities.
    #[command(flatten)]
    services: Box<crate::app::devtools::ServiceArgs>,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// The component to inspect.
    component: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Entry point of the binary: parses arguments, runs the command, maps the result to an exit
/// code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Inspect(args) => inspect(args).await,
            Command::Standin(args) => crate::app::devtools::standin(args).await,
            Command::JobTypes(args) => crate::app::jobtypes::job_types(&args.config).await,
            Command::Serve(args) => crate::app::server::serve(args.config)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Check(args) => check(args).await,
            Command::Load(args) => load(args).await,
            Command::Import(args) => import(args),
            Command::ForwarderConfig(args) => forwarder_config(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default, which shows only engine errors so the
/// printed outcome is not repeated.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let context = read_context(&args.context)?;
    let properties = parse_properties(&args.properties)?;
    let options = LoadOptions::default();
    let bytes = read_component(&args.component, &options)?;
    let engine = Engine::new(CLI_MAX_CONCURRENT_SANDBOXES)?;

    let name = args
        .component
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "handler".into());
    let mut spec = SandboxSpec::new(name);
    spec.properties = Properties::new(properties);
    // The author's harness grants every capability; `jobhook serve` grants per configuration.
    let run_services = args.services.build().await?;
    spec.grants = run_services.grants.clone();
    if let Some(ms) = args.timeout_ms {
        spec.limits.timeout = Duration::from_millis(ms);
    }
    if let Some(bytes) = args.memory_bytes {
        spec.limits.memory_bytes = bytes;
    }

    let handler = SandboxedHandler::load(&engine, &run_services.services, bytes, spec, &options)
        .await
        .with_context(|| format!("cannot load {}", args.component.display()))?;
    let outcome = handler
        .invoke(
            &context,
            Delivery {
                attempt: args.attempt,
                event_id: None,
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
        }
        println!("{}", serde_json::to_string(&value)?);
    } else {
        print!("{}", render_outcome(&args.component, &outcome));
    }
    Ok(if outcome.kind.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let options = LoadOptions::default();
    let bytes = read_component(&args.component, &options)?;
    let engine = Engine::new(CLI_MAX_CONCURRENT_SANDBOXES)?;
    let inspection = loader::inspect(&engine, bytes, &options)
        .await
        .with_context(|| format!("cannot inspect {}", args.component.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&inspection)?);
    } else {
        print!("{}", render_inspection(&args.component, &inspection));
    }
    Ok(if inspection.world_error.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number");
    }
    let report = crate::app::loadgen::run(crate::app::loadgen::LoadOptions {
        url: args.url,
        rate: args.rate,
        duration: Duration::from_secs_f64(args.seconds),
        token: args.token,
        record: args.record,
        seed: args.seed,
        resend: args.resend,
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let l = &report.latency_ms;
        println!(
            "sent {} | accepted {} ({:.0}/s) | rejected {} | errors {} | resent {} | unanswered {} | ingest latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            report.sent,
            report.accepted,
            report.accepted_per_second,
            report.rejected,
            report.errors,
            report.resent,
            report.unanswered,
            l.p50,
            l.p90,
            l.p99,
            l.max
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let names = crate::app::server::check(&args.config).await?;
    println!(
        "{}: configuration is valid; {} handler(s) loaded: {}",
        args.config.display(),
        names.len(),
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let (toml, warnings) = crate::app::migrate::import(&args.file)?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    print!("{toml}");
    Ok(ExitCode::SUCCESS)
}

fn forwarder_config(args: ForwarderArgs) -> anyhow::Result<ExitCode> {
    use crate::app::migrate::{Generation, forwarder_config};
    let config = crate::app::config::Config::load(&args.config)?;
    let generation = match args.generation.as_str() {
        "10" => Generation::Unity,
        "11" => Generation::Manifest,
        _ => Generation::Both,
    };
    let (text, warnings) = forwarder_config(&config, args.engine_url.as_deref(), generation);
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn read_component(path: &Path, options: &LoadOptions) -> anyhow::Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if size > options.max_bytes as u64 {
        bail!(
            "{} is {size} bytes; the component size limit is {} bytes",
            path.display(),
            options.max_bytes
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
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
    JobContext::from_json_bytes(&bytes).with_context(|| format!("invalid context in {what}"))
}

fn parse_properties(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut properties = BTreeMap::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--property {pair:?}: expected KEY=VALUE");
        };
        let key = key.trim();
        if key.is_empty() {
            bail!("--property {pair:?}: the property name is empty");
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

fn render_outcome(component: &Path, outcome: &Outcome) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "handler   {}", component.display());
    let _ = writeln!(out, "outcome   {}", outcome.kind.class());
    match &outcome.kind {
        crate::OutcomeKind::Succeeded => {}
        crate::OutcomeKind::Trapped { backtrace, .. } => {
            let _ = writeln!(out, "reason    {}", outcome.kind);
            for frame in backtrace {
                let _ = writeln!(out, "          at {frame}");
            }
        }
        other => {
            let _ = writeln!(out, "reason    {other}");
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
            let _ = writeln!(out, "  {:<5} {}", line.level, line.message);
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
            for line in text.lines() {
                let _ = writeln!(out, "  {line}");
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

fn render_inspection(component: &Path, inspection: &Inspection) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "component     {}", component.display());
    let _ = writeln!(out, "size          {} bytes", inspection.size);
    match &inspection.world_error {
        None => {
            let _ = writeln!(
                out,
                "world         fits jobhook:handler@{}.{}.{}",
                loader::WIT_VERSION.0,
                loader::WIT_VERSION.1,
                loader::WIT_VERSION.2
            );
        }
        Some(e) => {
            let _ = writeln!(out, "world         DOES NOT FIT: {e}");
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
            items.join(", ")
        }
    };
    let _ = writeln!(out, "capabilities  {}", list(&caps));
    let _ = writeln!(out, "jobhook       {}", list(&inspection.imports.jobhook));
    let _ = writeln!(out, "wasi          {}", list(&inspection.imports.wasi));
    if !inspection.imports.unsupported.is_empty() {
        let _ = writeln!(
            out,
            "unsupported   {}",
            inspection.imports.unsupported.join(", ")
        );
    }
    let _ = writeln!(out, "exports       {}", list(&inspection.exports));
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
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
