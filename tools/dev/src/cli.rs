//! The `jobhook-dev` command line. Exit codes as `jobhook`'s: 0 success, 1 the handler did not
//! succeed, 2 usage, load and input errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use jobhook::app::cli::RunArgs;
use jobhook::capabilities::keyfactor::auth::{Auth, AuthConfig};
use jobhook::capabilities::keyfactor::{KeyfactorClient, KeyfactorConfig};
use jobhook::secret::{Secret, SecretRef};

/// jobhook's author and bench tool: a Keyfactor API stand-in, `run` against it, and a load
/// driver. Not for production hosts.
#[derive(Debug, Parser)]
#[command(name = "jobhook-dev", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// `jobhook run`, optionally against an in-process Keyfactor stand-in.
    Run(DevRunArgs),
    /// Serve a stand-in for the Keyfactor Command API (seeded data, well-known credentials)
    /// for trying handlers on a workstation.
    Standin(crate::standin::StandinArgs),
    /// Post realistic job-complete events to a running engine and report throughput and latency.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
struct DevRunArgs {
    /// Start the Keyfactor stand-in for this run and point the keyfactor capability at it
    /// (seeded data; see `jobhook-dev standin`).
    #[arg(long)]
    keyfactor_standin: bool,
    #[command(flatten)]
    run: RunArgs,
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

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    jobhook::app::engine_log::init_tracing();
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
            Command::Standin(args) => crate::standin::standin(args).await,
            Command::Load(args) => load(args).await,
        }
    });
    jobhook::app::cli::exit_code(result)
}

async fn run(args: DevRunArgs) -> anyhow::Result<ExitCode> {
    if !args.keyfactor_standin {
        return jobhook::app::cli::run(args.run, None).await;
    }
    let standin = jobhook_standin::Standin::start()
        .await
        .context("cannot start the Keyfactor stand-in")?;
    // The stand-in's credentials are public; they are handed over in memory.
    let auth = Auth::basic(
        &standin.credentials().username,
        &Secret::new(standin.credentials().password.clone()),
    )?;
    // `with_auth` uses `auth` instead of `config.auth`, which is only a placeholder here.
    let config = KeyfactorConfig::new(
        standin.base_url(),
        AuthConfig::Bearer {
            token: SecretRef::Env(String::new()),
        },
    );
    let client = Arc::new(KeyfactorClient::with_auth(&config, auth)?);
    let code = jobhook::app::cli::run(args.run, Some(client)).await;
    drop(standin);
    code
}

async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let duration = Duration::try_from_secs_f64(args.seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--seconds must be a positive, finite number of seconds"))?;
    let report = crate::loadgen::run(crate::loadgen::LoadOptions {
        url: args.url,
        rate: args.rate,
        duration,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
