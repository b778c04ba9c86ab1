//! What handler authors use on their own machine: the capability flags of `jobhook run`. The
//! Keyfactor API stand-in is not in the operator's binary: it is in the author's tool,
//! `jobhook-dev` (`tools/dev`).
//!
//! `jobhook run` grants every capability (the author's harness), but a capability still needs a
//! service behind it. These flags build them, with secrets from the environment (the variable
//! names of Keyfactor's own `keyfactor-auth-client-go`), never from the command line:
//!
//! ```sh
//! jobhook-dev standin --listen 127.0.0.1:8081 &
//! KEYFACTOR_USERNAME='KFTRAIN\svc-jobhook' KEYFACTOR_PASSWORD=standin-password \
//!   jobhook run job_history_lookup.wasm --context inventory.json \
//!   --keyfactor-url http://127.0.0.1:8081/KeyfactorAPI/
//!
//! jobhook-dev run job_history_lookup.wasm --context inventory.json --keyfactor-standin
//! jobhook run repeated_failure_email.wasm --context failed.json --mail-outbox ./outbox ...
//! jobhook run webhook_notify.wasm --context failed.json --allow-http https://hooks.example.com/x/
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::capabilities::http::UrlPrefix;
use crate::capabilities::keyfactor::Keyfactor;
use crate::capabilities::keyfactor::auth::AuthConfig;
use crate::capabilities::keyfactor::{KeyfactorClient, KeyfactorConfig};
use crate::capabilities::mail::Mail;
use crate::capabilities::mail::{MailConfig, MailTransport, SmtpConfig, SmtpTls};
use crate::capabilities::{ConfiguredBy, Grantable, Grants, ServiceEnv, Services, ServicesConfig};
use crate::secret::SecretRef;

/// Environment variable holding the Basic password (as in `keyfactor-auth-client-go`).
pub const ENV_PASSWORD: &str = "KEYFACTOR_PASSWORD";
/// Environment variable holding a static Bearer token.
pub const ENV_ACCESS_TOKEN: &str = "KEYFACTOR_AUTH_ACCESS_TOKEN";
/// Environment variable holding the OAuth client secret.
pub const ENV_CLIENT_SECRET: &str = "KEYFACTOR_AUTH_CLIENT_SECRET";
/// Environment variable holding the SMTP password.
pub const ENV_SMTP_PASSWORD: &str = "JOBHOOK_SMTP_PASSWORD";

/// The flags that configure each capability's service (by interface name), named to a handler
/// that calls a capability `jobhook run` was started without.
const FLAGS: [(&str, &str); 2] = [
    (<Keyfactor as Grantable>::INTERFACE, "--keyfactor-url"),
    (<Mail as Grantable>::INTERFACE, "--mail-outbox or --smtp"),
];

/// The configuration keys the services' errors name, with the `jobhook run` flags that set
/// them, longest key first: an error from building a service out of the flags names what the
/// user typed ([`in_flag_terms`]).
const KEYS_AS_FLAGS: &[(&str, &str)] = &[
    ("[keyfactor.auth] token_url", "--keyfactor-token-url"),
    ("[keyfactor.auth]", "--keyfactor-auth"),
    ("[keyfactor] base_url", "--keyfactor-url"),
    ("[keyfactor] ca_bundle", "--keyfactor-ca-bundle"),
    (
        "[mail.smtp] password",
        "--smtp-username (the password comes from JOBHOOK_SMTP_PASSWORD)",
    ),
    ("[mail.smtp] tls = ", "--smtp-tls "),
    ("[mail.smtp] port", "--smtp's port"),
    ("[mail.smtp] host", "--smtp's host"),
    ("[mail.smtp]", "--smtp"),
    ("[mail] outbox", "--mail-outbox"),
    ("[mail]", "--mail-outbox or --smtp"),
];

/// `error` with the configuration keys it names put in terms of `jobhook run`'s flags.
fn in_flag_terms(error: impl std::fmt::Display) -> anyhow::Error {
    let mut text = error.to_string();
    for (key, flag) in KEYS_AS_FLAGS {
        text = text.replace(key, flag);
    }
    anyhow::Error::msg(text)
}

/// A refused `--mail-from` (the one thing a mail configuration's making checks).
fn from_address(error: crate::capabilities::mail::AddressError) -> anyhow::Error {
    anyhow::anyhow!("--mail-from: {error}")
}

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
    /// Keyfactor API base URL, e.g. `https://command.example.com/KeyfactorAPI/` (enables the
    /// keyfactor capability).
    #[arg(long, value_name = "URL", env = "KEYFACTOR_URL")]
    keyfactor_url: Option<String>,
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
    /// Send mail through this SMTP relay, `HOST[:PORT]` (enables the mail capability).
    #[arg(long, value_name = "HOST[:PORT]")]
    smtp: Option<String>,
    /// TLS mode for --smtp.
    #[arg(long, value_enum, default_value = "starttls")]
    smtp_tls: TlsFlag,
    /// SMTP user (the password comes from JOBHOOK_SMTP_PASSWORD).
    #[arg(long, value_name = "USER", env = "JOBHOOK_SMTP_USERNAME")]
    smtp_username: Option<String>,
    /// The From address of mail.
    #[arg(
        long,
        value_name = "ADDRESS",
        default_value = "jobhook@localhost.localdomain"
    )]
    mail_from: String,
    /// Allow outbound HTTP only under this URL prefix (repeatable); without it, any public
    /// https URL is allowed.
    #[arg(long = "allow-http", value_name = "PREFIX")]
    allow_http: Vec<String>,
    /// Allow outbound HTTP to loopback and private addresses (and plain http to loopback).
    #[arg(long)]
    allow_private_http: bool,
}

/// What `jobhook run` runs with: the services and the grants.
pub struct RunServices {
    /// The services.
    pub services: Services,
    /// The grants: everything, with http narrowed by `--allow-http`.
    pub grants: Grants,
}

impl ServiceArgs {
    /// Builds the services the flags ask for. `keyfactor`, when given, is the keyfactor service
    /// to use instead of `--keyfactor-url` (the author's tool passes its in-process stand-in's).
    pub async fn build(
        &self,
        keyfactor: Option<Arc<KeyfactorClient>>,
    ) -> anyhow::Result<RunServices> {
        // Every capability as an engine with no sections configured has it (http with its
        // defaults); the flags below add keyfactor and mail.
        let env = ServiceEnv {
            default_outbox: PathBuf::from("outbox"),
            configured_by: ConfiguredBy::Flags(&FLAGS),
        };
        let mut services = Services::from_config(&ServicesConfig::default(), &env)?;
        if let Some(client) = keyfactor {
            if self.keyfactor_url.is_some() {
                bail!(
                    "--keyfactor-url and an in-process Keyfactor stand-in cannot be used together"
                );
            }
            services.keyfactor = Some(client);
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
            services.keyfactor = Some(Arc::new(
                KeyfactorClient::from_config(&config).map_err(in_flag_terms)?,
            ));
        }

        let mail = if let Some(dir) = &self.mail_outbox {
            Some(MailConfig::outbox(&self.mail_from, dir).map_err(from_address)?)
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
            Some(MailConfig::smtp(&self.mail_from, smtp).map_err(from_address)?)
        } else {
            None
        };
        if let Some(config) = mail {
            services.mail = Some(Arc::new(
                MailTransport::from_config(&config, &env.default_outbox).map_err(in_flag_terms)?,
            ));
        }

        let mut grants = Grants::permissive();
        if let Some(http) = grants.http.as_mut() {
            if !self.allow_http.is_empty() {
                http.urls = self
                    .allow_http
                    .iter()
                    .map(|p| UrlPrefix::parse(p))
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("--allow-http: {e}"))?;
            }
            http.allow_private = self.allow_private_http;
            if let Some(prefix) = http.plain_http_prefix()
                && !http.allow_private
            {
                bail!(
                    "--allow-http {prefix}: plain http:// is allowed only with \
                     --allow-private-http (and only to loopback); use https:// or add \
                     --allow-private-http"
                );
            }
        }
        Ok(RunServices { services, grants })
    }
}
