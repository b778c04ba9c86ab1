//! What handler authors use on their own machine: the capability flags of `jobhook run` and the
//! `jobhook standin` Keyfactor API stand-in.
//!
//! `jobhook run` grants every capability (the author's harness), but a capability still needs a
//! service behind it. These flags build them, with secrets from the environment (the variable
//! names of Keyfactor's own `keyfactor-auth-client-go`), never from the command line:
//!
//! ```sh
//! jobhook standin --listen 127.0.0.1:8081 &
//! KEYFACTOR_USERNAME='KFTRAIN\svc-jobhook' KEYFACTOR_PASSWORD=standin-password \
//!   jobhook run job_history_lookup.wasm --context inventory.json \
//!   --keyfactor-url http://127.0.0.1:8081/KeyfactorAPI/
//!
//! jobhook run job_history_lookup.wasm --context inventory.json --keyfactor-standin
//! jobhook run repeated_failure_email.wasm --context failed.json --mail-outbox ./outbox ...
//! jobhook run webhook_notify.wasm --context failed.json --allow-http https://hooks.example.com/x/
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::capabilities::http::UrlPrefix;
use crate::capabilities::keyfactor::auth::{Auth, AuthConfig};
use crate::capabilities::keyfactor::{KeyfactorClient, KeyfactorConfig};
use crate::capabilities::mail::{MailConfig, MailTransport, SmtpConfig, SmtpTls};
use crate::capabilities::{Grants, ServiceEnv, Services, ServicesConfig};
use crate::secret::{Secret, SecretRef};

/// Environment variable holding the Basic password (as in `keyfactor-auth-client-go`).
pub const ENV_PASSWORD: &str = "KEYFACTOR_PASSWORD";
/// Environment variable holding a static Bearer token.
pub const ENV_ACCESS_TOKEN: &str = "KEYFACTOR_AUTH_ACCESS_TOKEN";
/// Environment variable holding the OAuth client secret.
pub const ENV_CLIENT_SECRET: &str = "KEYFACTOR_AUTH_CLIENT_SECRET";
/// Environment variable holding the SMTP password.
pub const ENV_SMTP_PASSWORD: &str = "JOBHOOK_SMTP_PASSWORD";

/// How `jobhook run` authenticates to Keyfactor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthKind {
    /// `--keyfactor-username` / `KEYFACTOR_USERNAME` and `KEYFACTOR_PASSWORD`.
    Basic,
    /// `KEYFACTOR_AUTH_ACCESS_TOKEN`.
    Bearer,
    /// `--keyfactor-token-url`, `--keyfactor-client-id` and `KEYFACTOR_AUTH_CLIENT_SECRET`.
    Oauth2,
}

/// TLS mode of `--smtp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsFlag {
    /// STARTTLS (port 587 by default).
    Starttls,
    /// Implicit TLS (port 465 by default).
    Implicit,
    /// None: loopback relays only (port 25 by default).
    None,
}

/// The capability flags of `jobhook run`.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Keyfactor API base URL, e.g. https://command.example.com/KeyfactorAPI/ (enables the
    /// keyfactor capability).
    #[arg(
        long,
        value_name = "URL",
        env = "KEYFACTOR_URL",
        conflicts_with = "keyfactor_standin"
    )]
    keyfactor_url: Option<String>,
    /// Start the built-in Keyfactor stand-in for this run and point the keyfactor capability
    /// at it (seeded data; see `jobhook standin`).
    #[arg(long)]
    keyfactor_standin: bool,
    /// How to authenticate to Keyfactor; secrets come from the environment.
    #[arg(long, value_enum, default_value = "basic", value_name = "KIND")]
    keyfactor_auth: AuthKind,
    /// Basic user, usually DOMAIN\user.
    #[arg(long, value_name = "USER", env = "KEYFACTOR_USERNAME")]
    keyfactor_username: Option<String>,
    /// OAuth token endpoint.
    #[arg(long, value_name = "URL", env = "KEYFACTOR_AUTH_TOKEN_URL")]
    keyfactor_token_url: Option<String>,
    /// OAuth client id.
    #[arg(long, value_name = "ID", env = "KEYFACTOR_AUTH_CLIENT_ID")]
    keyfactor_client_id: Option<String>,
    /// PEM file of extra CA certificates for the Keyfactor server.
    #[arg(long, value_name = "FILE")]
    keyfactor_ca_bundle: Option<PathBuf>,
    /// Write mail as .eml files into this directory (enables the mail capability).
    #[arg(long, value_name = "DIR", conflicts_with = "smtp")]
    mail_outbox: Option<PathBuf>,
    /// Send mail through this SMTP relay, HOST[:PORT] (enables the mail capability).
    #[arg(long, value_name = "HOST[:PORT]")]
    smtp: Option<String>,
    /// TLS mode for --smtp.
    #[arg(long, value_enum, default_value = "starttls")]
    smtp_tls: TlsFlag,
    /// SMTP user (the password comes from JOBHOOK_SMTP_PASSWORD).
    #[arg(long, value_name = "USER", env = "JOBHOOK_SMTP_USERNAME")]
    smtp_username: Option<String>,
    /// The From address of mail.
    #[arg(long, value_name = "ADDRESS", default_value = "jobhook@localhost")]
    mail_from: String,
    /// Allow outbound HTTP only under this URL prefix (repeatable); without it, any public
    /// https URL is allowed.
    #[arg(long = "allow-http", value_name = "PREFIX")]
    allow_http: Vec<String>,
    /// Allow outbound HTTP to loopback and private addresses (and plain http to loopback).
    #[arg(long)]
    allow_private_http: bool,
}

/// What `jobhook run` runs with: the services, the grants, and a stand-in kept alive for the
/// run if one was started.
pub struct RunServices {
    /// The services.
    pub services: Services,
    /// The grants: everything, with http narrowed by `--allow-http`.
    pub grants: Grants,
    /// The stand-in started by `--keyfactor-standin`.
    pub standin: Option<jobhook_standin::Standin>,
}

impl ServiceArgs {
    /// Builds the services the flags ask for.
    pub async fn build(&self) -> anyhow::Result<RunServices> {
        // Every capability as an engine with no sections configured has it (http with its
        // defaults); the flags below add keyfactor and mail.
        let env = ServiceEnv {
            default_outbox: PathBuf::from("outbox"),
        };
        let mut services = Services::from_config(&ServicesConfig::default(), &env)?;
        let mut standin = None;
        if self.keyfactor_standin {
            let s = jobhook_standin::Standin::start()
                .await
                .context("cannot start the Keyfactor stand-in")?;
            // The stand-in's credentials are public; they are handed over in memory.
            let auth = Auth::basic(
                &s.credentials().username,
                &Secret::new(s.credentials().password.clone()),
            )?;
            // `with_auth` uses `auth` instead of `config.auth`, which is only a placeholder here.
            let config = KeyfactorConfig::new(
                s.base_url(),
                AuthConfig::Bearer {
                    token: SecretRef::Env(String::new()),
                },
            );
            services.keyfactor = Some(Arc::new(KeyfactorClient::with_auth(&config, auth)?));
            standin = Some(s);
        } else if let Some(url) = &self.keyfactor_url {
            let auth = match self.keyfactor_auth {
                AuthKind::Basic => AuthConfig::Basic {
                    username: self.keyfactor_username.clone().context(
                        "--keyfactor-auth basic needs --keyfactor-username (or KEYFACTOR_USERNAME)",
                    )?,
                    password: SecretRef::Env(ENV_PASSWORD.into()),
                },
                AuthKind::Bearer => AuthConfig::Bearer {
                    token: SecretRef::Env(ENV_ACCESS_TOKEN.into()),
                },
                AuthKind::Oauth2 => AuthConfig::Oauth2 {
                    token_url: self
                        .keyfactor_token_url
                        .clone()
                        .context("--keyfactor-auth oauth2 needs --keyfactor-token-url")?,
                    client_id: self
                        .keyfactor_client_id
                        .clone()
                        .context("--keyfactor-auth oauth2 needs --keyfactor-client-id")?,
                    client_secret: SecretRef::Env(ENV_CLIENT_SECRET.into()),
                    scopes: Vec::new(),
                    audience: None,
                },
            };
            let mut config = KeyfactorConfig::new(url.clone(), auth);
            config.ca_bundle = self.keyfactor_ca_bundle.clone();
            services.keyfactor = Some(Arc::new(KeyfactorClient::from_config(&config)?));
        }

        let mail = if let Some(dir) = &self.mail_outbox {
            Some(MailConfig::outbox(&self.mail_from, dir).map_err(anyhow::Error::msg)?)
        } else if let Some(relay) = &self.smtp {
            let (host, port) = match relay.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (
                    h.to_owned(),
                    Some(
                        p.parse::<u16>()
                            .with_context(|| format!("--smtp {relay}: bad port"))?,
                    ),
                ),
                _ => (relay.clone(), None),
            };
            let tls = match self.smtp_tls {
                TlsFlag::Starttls => SmtpTls::Starttls,
                TlsFlag::Implicit => SmtpTls::Implicit,
                TlsFlag::None => SmtpTls::None,
            };
            let mut smtp = SmtpConfig::new(host, 0, tls);
            smtp.port = port;
            if let Some(user) = &self.smtp_username {
                smtp.username = Some(user.clone());
                smtp.password = Some(SecretRef::Env(ENV_SMTP_PASSWORD.into()));
            }
            Some(MailConfig::smtp(&self.mail_from, smtp).map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        if let Some(config) = mail {
            services.mail = Some(Arc::new(MailTransport::from_config(
                &config,
                &env.default_outbox,
            )?));
        }

        let mut grants = Grants::permissive();
        if let Some(http) = grants.http.as_mut() {
            if !self.allow_http.is_empty() {
                http.urls = self
                    .allow_http
                    .iter()
                    .map(|p| UrlPrefix::parse(p))
                    .collect::<Result<_, _>>()?;
            }
            http.allow_private = self.allow_private_http;
        }
        Ok(RunServices {
            services,
            grants,
            standin,
        })
    }
}

/// `jobhook standin`: serve the Keyfactor API stand-in for handler authors.
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
