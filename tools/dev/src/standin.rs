//! `jobhook-dev standin`: the Keyfactor API stand-in (`tests/standin`) on loopback, for trying
//! handlers on a workstation (`jobhook run --keyfactor-url ...`) and for the benchmarks. It
//! accepts well-known credentials and has test endpoints (one echoes the request's
//! credentials), which is why it is not part of the operator's `jobhook` binary.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use clap::Args;

/// `jobhook-dev standin`: serve the Keyfactor API stand-in for handler authors.
#[derive(Debug, Clone, Args)]
pub struct StandinArgs {
    /// Where to listen. Keep it on loopback: the stand-in's credentials are public.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// The API base path (Keyfactor's default IIS application is /KeyfactorAPI/).
    #[arg(long, default_value = "/KeyfactorAPI/")]
    base_path: String,
}

/// Runs the stand-in until the process is stopped.
pub async fn standin(args: StandinArgs) -> anyhow::Result<std::process::ExitCode> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {}: the stand-in accepts well-known credentials; listen on a loopback address such as 127.0.0.1",
            args.listen
        );
    }
    let config = jobhook_standin::StandinConfig {
        base_path: args.base_path,
        ..jobhook_standin::StandinConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let c = &config.credentials;
    let mut base = config.base_path.clone();
    if !base.ends_with('/') {
        base.push('/');
    }
    println!("Keyfactor API stand-in at http://{addr}{base}");
    println!(
        "  Basic:   user {:?}, password {:?}",
        c.username, c.password
    );
    println!(
        "  Bearer:  {:?}",
        c.bearer_tokens
            .first()
            .map(String::as_str)
            .unwrap_or_default()
    );
    println!(
        "  OAuth2:  token URL http://{addr}{}, client id {:?}, secret {:?}",
        jobhook_standin::TOKEN_PATH,
        c.client_id,
        c.client_secret
    );
    println!(
        "Try: KEYFACTOR_USERNAME='{}' KEYFACTOR_PASSWORD={} jobhook run HANDLER.wasm --context CONTEXT.json --keyfactor-url http://{addr}{base}",
        c.username, c.password
    );
    jobhook_standin::serve(listener, config).await?;
    Ok(std::process::ExitCode::SUCCESS)
}
