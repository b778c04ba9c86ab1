//! `jobhook serve`: wires configuration, engine, store, dispatcher and HTTP API together, and
//! handles the process's life: start-up recovery, reload (SIGHUP or the admin endpoint) and
//! graceful shutdown (SIGTERM / ctrl-c).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::app::component_file::read_component;
use crate::app::config::Config;
use crate::app::connections;
use crate::app::secrets::{self, StartOnlySecrets};
use crate::app::tls::TlsState;
use crate::capabilities::{ConfiguredBy, ServiceEnv, Services};
use crate::metrics::Metrics;
use crate::queue::delivery_threads::DeliveryThreads;
use crate::queue::dispatch::{Dispatcher, RegisteredHandler, Registry};
use crate::queue::registration::Registration;
use crate::queue::retention;
use crate::queue::store::{self, EventStore};
use crate::runtime::engine::Engine;
use crate::runtime::loader::{LoadOptions, Setting};
use crate::runtime::sandbox::SandboxedHandler;
use crate::runtime::state::SandboxSpec;
use crate::sources::api::{self, AppState, BearerTokens, ReloadReport, Reloader};
use crate::sources::forwarders::Forwarders;
use crate::sources::idempotency;
use crate::sources::poller::Poller;

/// The setting that limits a component's size, named when a component is over it.
const MAX_COMPONENT_BYTES_SETTING: &str = "[engine] max_component_bytes";

/// What `check` and the start of `serve` warn of when the configuration has no handler: events
/// are taken and stored, and none is ever delivered.
pub const NO_HANDLERS: &str = "the configuration has no [[handlers]]: events are accepted and \
     stored, but no handler runs for any event (each is counted in jobhook_events_unrouted_total \
     and is not delivered later, when handlers are added); add a [[handlers]] entry";

/// Most handler names a refused reload lists: enough to recognise the configuration that runs.
const MAX_NAMES_LISTED: usize = 10;

/// The line `serve` prints once it accepts connections; tools and tests wait for it.
pub const READY_LINE: &str = "jobhook listening on http://";

/// The same line when the listener speaks TLS.
pub const READY_LINE_TLS: &str = "jobhook listening on https://";

/// How long, past `shutdown_grace`, the dispatcher may take at shutdown to record the last
/// outcomes and requeue interrupted deliveries: store calls, which a store that stopped
/// answering (a frozen PostgreSQL server, a hung disk) would hold for as long as it lasts, and
/// with them the process's end. A store that answers needs well under a second for both. Past
/// this the engine stops anyway; what it could not record or requeue runs again when its lease
/// expires, as after a crash.
pub const STORE_WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest wait for the operator's files when handlers are loaded or the configuration is
/// reloaded: the configuration with its secrets and certificates, then each component. They
/// are read on blocking threads, which a file on a share that hangs holds for as long as it
/// hangs; past this the reload is refused (and the running configuration kept), so that it
/// releases the reload lock: every later reload would otherwise wait behind it for good. A
/// file that answers is read in milliseconds; the reading thread, which cannot be stopped, is
/// left to finish and its result dropped.
pub const FILE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `read` (reads of the operator's files) on a blocking thread, waiting at most
/// [`FILE_READ_TIMEOUT`]; `what` names the files in the error.
async fn read_files<T: Send + 'static>(
    what: &str,
    read: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    match tokio::time::timeout(FILE_READ_TIMEOUT, tokio::task::spawn_blocking(read)).await {
        Ok(joined) => joined.with_context(|| format!("the reader of {what} failed"))?,
        Err(_) => anyhow::bail!(
            "{what} could not be read within {} s (a file on a share or disk that does not \
             answer?); nothing was changed",
            FILE_READ_TIMEOUT.as_secs()
        ),
    }
}

/// A registered handler together with a digest of its component, so that a reload can keep
/// handlers whose component and configuration did not change (and with them their quarantine
/// state and compiled code).
struct Loaded {
    digest: u64,
    handler: Arc<RegisteredHandler>,
}

/// The handlers of one configuration, by name.
#[derive(Default)]
pub struct LoadedHandlers {
    loaded: BTreeMap<String, Loaded>,
}

impl LoadedHandlers {
    /// The registry the dispatcher runs on.
    pub fn registry(&self) -> Registry {
        Registry::new(self.loaded.values().map(|l| Arc::clone(&l.handler)))
    }

    /// The handler names.
    pub fn names(&self) -> Vec<String> {
        self.loaded.keys().cloned().collect()
    }

    /// What a reload from `previous` to this set did: the handlers added, changed (loaded again
    /// because their component or settings differ) and removed, each by name in order.
    pub fn changes_since(&self, previous: &LoadedHandlers) -> HandlerChanges {
        let mut changes = HandlerChanges::default();
        for (name, now) in &self.loaded {
            match previous.loaded.get(name) {
                None => changes.added.push(name.clone()),
                Some(before) if !Arc::ptr_eq(&before.handler, &now.handler) => {
                    changes.changed.push(name.clone());
                }
                Some(_) => {}
            }
        }
        changes.removed = previous
            .loaded
            .keys()
            .filter(|name| !self.loaded.contains_key(*name))
            .cloned()
            .collect();
        changes
    }
}

/// Handlers a reload added, changed and removed ([`LoadedHandlers::changes_since`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HandlerChanges {
    /// Configured now, not before.
    pub added: Vec<String>,
    /// Loaded again: another component or other settings.
    pub changed: Vec<String>,
    /// Configured before, not now.
    pub removed: Vec<String>,
}

/// Loads every handler of `config`, reusing unchanged ones from `previous`. At a reload, a
/// handler configured under the name of one an earlier reload removed continues the running
/// count of that one's deliveries still running, from `dispatcher`.
pub async fn load_handlers(
    engine: &Engine,
    services: &Services,
    config: &Config,
    previous: Option<&LoadedHandlers>,
    dispatcher: Option<&Dispatcher>,
) -> anyhow::Result<LoadedHandlers> {
    let options = LoadOptions {
        max_bytes: config.engine.max_component_bytes,
        compile_timeout: config.engine.compile_timeout,
    };
    let mut set = LoadedHandlers::default();
    for hc in &config.handlers {
        // On a blocking thread: a reload runs on the API's runtime, and a component on a share
        // that hangs (or a FIFO) must not hold a thread that answers ingest.
        let (path, max) = (hc.component.clone(), options.max_bytes);
        let bytes = read_files("the component", move || {
            read_component(&path, max, Some(MAX_COMPONENT_BYTES_SETTING))
        })
        .await
        .with_context(|| {
            format!(
                "{}:{}: handlers.component (handler {:?})",
                config.path.display(),
                hc.line,
                hc.name
            )
        })?;
        let digest = digest(&bytes);
        let before = previous.and_then(|p| p.loaded.get(&hc.name));
        let reusable =
            before.filter(|old| old.digest == digest && old.handler.config.same_settings(hc));
        let handler = match reusable {
            Some(old) => Arc::clone(&old.handler),
            None => {
                let spec = spec_of(hc);
                let handler = SandboxedHandler::load(engine, services, bytes, spec, &options)
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(e.with_setting_named(|setting| match setting {
                            Setting::Engine(key) => format!("[engine] {key}"),
                            Setting::HandlerLimit(key) => format!("[handlers.limits] {key}"),
                        }))
                    })
                    .with_context(|| {
                        format!(
                            "{}:{}: handler {:?} ({}) was refused",
                            config.path.display(),
                            hc.line,
                            hc.name,
                            hc.component.display()
                        )
                    })?;
                let quarantine = config.quarantine.clone();
                // A changed handler continues its predecessor's count; one configured again,
                // that of the removed one of its name.
                Arc::new(match before {
                    Some(old) => {
                        RegisteredHandler::replacing(&old.handler, hc.clone(), handler, quarantine)
                    }
                    None => match dispatcher.and_then(|d| d.removed_still_running(&hc.name)) {
                        Some(running) => {
                            RegisteredHandler::continuing(running, hc.clone(), handler, quarantine)
                        }
                        None => RegisteredHandler::new(hc.clone(), handler, quarantine),
                    },
                })
            }
        };
        set.loaded
            .insert(hc.name.clone(), Loaded { digest, handler });
    }
    Ok(set)
}

fn spec_of(hc: &Registration) -> SandboxSpec {
    SandboxSpec {
        name: hc.name.as_str().into(),
        properties: hc.properties.clone(),
        limits: hc.limits.clone(),
        grants: hc.grants.clone(),
    }
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The engine-wide capability services for `config`; the default mail outbox is `outbox` in
/// the data directory.
pub fn services(config: &Config) -> anyhow::Result<Services> {
    Services::from_config(
        &config.services,
        &ServiceEnv {
            default_outbox: config.store.data_dir.join("outbox"),
            configured_by: ConfiguredBy::ConfigFile,
        },
    )
    .with_context(|| format!("{}: capability services", config.path.display()))
}

/// `jobhook check`: validates the configuration, resolves what `serve` resolves before it
/// serves (the bearer tokens, where the store lives, the sandbox pool at its configured size and
/// its threads) and loads every handler; returns the handler names. Nothing lasting is made: no
/// store is opened or created, no AOT cache written, and the mail outbox is checked, not made.
/// Also returns warnings: what `serve` would run without (an unusable AOT cache directory) and
/// secret files other users may read or change.
pub async fn check(path: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let config = Config::load(path)?;
    let tokens = config.resolve_tokens()?;
    config.check_store_location()?;
    let mut warnings: Vec<String> = config.cache_dir_warning().into_iter().collect();
    warnings.extend(config.short_tokens(&tokens));
    warnings.extend(secrets::exposed_secret_files(&config));
    warnings.extend(secrets::exposed_trusted_files(&config));
    let engine = engine(&config)?;
    let services = services(&config)?;
    let set = load_handlers(&engine, &services, &config, None, None).await?;
    if config.handlers.is_empty() {
        warnings.push(NO_HANDLERS.to_owned());
    }
    Ok((set.names(), warnings))
}

/// Why a reload to `config`, which has no handler, is refused while `running` has some: every
/// event after it would be stored and never delivered, and a configuration file cut short (an
/// editor's save, a copy under way) is far likelier than an operator stopping every handler by
/// a reload. Names the handlers that keep running, and how to run without any.
fn no_handler_left(config: &Config, running: &Config) -> String {
    let names: Vec<&str> = running.handlers.iter().map(|h| h.name.as_str()).collect();
    let mut listed = names
        .iter()
        .take(MAX_NAMES_LISTED)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_NAMES_LISTED {
        listed.push_str(&format!(" and {} more", names.len() - MAX_NAMES_LISTED));
    }
    let runs = match names.len() {
        1 => "1 handler runs".to_owned(),
        n => format!("{n} handlers run"),
    };
    format!(
        "{}: the configuration has no [[handlers]], while {runs} now ({listed}); a reload that \
         would stop every handler is refused (a file cut short while it was written is the usual \
         cause), and the running configuration stays. To run without handlers, restart jobhook \
         with this configuration",
        config.path.display()
    )
}

/// The engine `serve` runs and `check` tries: one pool slot per delivery the dispatcher may run
/// at once (no delivery ever waits for a slot, and no slot is reserved that could never be
/// used), and optionally sandbox threads of their own below the API's priority. No AOT cache.
fn engine(config: &Config) -> anyhow::Result<Engine> {
    let slots = u32::try_from(config.engine.max_concurrent_deliveries).unwrap_or(u32::MAX);
    let engine = Engine::with_pool(slots, &config.engine.pool())?;
    Ok(match config.engine.sandbox_threads {
        0 => engine,
        n => engine.with_sandbox_threads(n)?,
    })
}

/// Prints the ready line on stdout, for whatever started the engine. A stdout nobody reads any
/// more (its reader has exited: `EPIPE`) must not stop a server that is otherwise ready, so a
/// failed write is only logged.
fn announce(line: &str) {
    if let Err(e) = crate::app::output::print_out(&format!("{line}\n")) {
        tracing::warn!("cannot print the ready line on stdout ({e}); serving anyway");
    }
}

/// `jobhook serve`: runs until SIGTERM or ctrl-c.
/// `log_drops` counts the lines its log dropped (see [`crate::metrics::LogDrops`]).
pub async fn serve(path: PathBuf, log_drops: crate::metrics::LogDrops) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let accepted = config.resolve_tokens()?;
    for warning in config
        .short_tokens(&accepted)
        .into_iter()
        .chain(secrets::exposed_secret_files(&config))
        .chain(secrets::exposed_trusted_files(&config))
    {
        tracing::warn!("{warning}");
    }
    let tokens = Arc::new(BearerTokens::new(accepted));
    let engine = engine(&config)?;
    let engine = match &config.engine.cache_dir {
        Some(dir) => engine.with_aot_cache_at(dir),
        None => engine,
    };
    let services = services(&config)?;
    let tls = match &config.server.tls {
        Some(tls) => Some(TlsState::new(
            tls.server_config()
                .with_context(|| config.path.display().to_string())?,
        )),
        None => None,
    };
    // Opening connects and migrates, and store calls block: keep them off the async workers.
    let store_config = config.store.clone();
    let store: Arc<dyn EventStore> =
        tokio::task::spawn_blocking(move || store::open(&store_config))
            .await
            .context("opening the store")??;
    let requeued = {
        let store = Arc::clone(&store);
        tokio::task::spawn_blocking(move || store.requeue_abandoned(store.now()))
            .await
            .context("requeueing interrupted deliveries")??
    };
    if requeued > 0 {
        tracing::warn!(
            requeued,
            "deliveries interrupted by the previous run will run again"
        );
    }
    let handlers = load_handlers(&engine, &services, &config, None, None).await?;
    tracing::info!(handlers = ?handlers.names(), "handlers loaded");
    if config.handlers.is_empty() {
        tracing::warn!("{NO_HANDLERS}");
    }
    let metrics = Arc::new(Metrics::new().with_log_drops(log_drops));
    let dispatcher = Dispatcher::with_lease(
        Arc::clone(&store),
        handlers.registry(),
        Arc::clone(&metrics),
        config.engine.max_concurrent_deliveries,
        config.store.lease,
    );
    dispatcher.waiting_for_unconfigured().await;
    let reload = reloader(Running {
        config: config.clone(),
        secrets: StartOnlySecrets::read(&config),
        engine: engine.clone(),
        services: services.clone(),
        dispatcher: Arc::clone(&dispatcher),
        tls: tls.clone(),
        tokens: Arc::clone(&tokens),
        initial: handlers,
    });
    let state = AppState {
        store,
        dispatcher: Arc::clone(&dispatcher),
        metrics: Arc::clone(&metrics),
        tokens,
        max_body_bytes: config.server.max_body_bytes,
        body_read_timeout: config.server.body_read_timeout,
        reload: Arc::clone(&reload),
        idempotency_retention: config.server.idempotency_retention,
        forwarders: Arc::new(Forwarders::new()),
        store_health: Arc::default(),
    };
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let address = listener.local_addr()?;

    // Deliveries run on threads of their own: an ingest request never queues behind a sandbox.
    let delivery_threads = DeliveryThreads::start().context("cannot start the delivery threads")?;
    let worker = delivery_threads.spawn(Arc::clone(&dispatcher).run(config.server.shutdown_grace));
    if let Some(poller) = &config.poller {
        let client = services
            .keyfactor
            .clone()
            .context("[poller] needs the [keyfactor] service")?;
        let poller = Poller::new(
            poller.clone(),
            client,
            Arc::clone(&state.store),
            Arc::clone(&dispatcher),
        )
        .map_err(anyhow::Error::msg)?
        .reporting_to(Arc::clone(&state.store_health));
        tokio::spawn(poller.run());
    }
    // Every node purges: batches are small and skip each other's rows on a shared store.
    tokio::spawn(idempotency::purge_expired(
        Arc::clone(&state.store),
        config.server.idempotency_retention,
    ));
    // Likewise: each batch locks only the events it deletes, skipping another node's.
    tokio::spawn(retention::purge_finished_events(
        Arc::clone(&state.store),
        config.store.retention(),
        config.server.idempotency_retention,
        Arc::clone(&metrics),
    ));
    // Both before the ready line: see the two functions.
    spawn_sighup_reload(reload);
    let mut stop_asked = StopSignals::install();
    let router = api::router(state);
    let limits = config.server.connection_limits();
    let (scheme, ready) = if tls.is_some() {
        ("https", READY_LINE_TLS)
    } else {
        ("http", READY_LINE)
    };
    announce(&format!("{ready}{address}"));
    tracing::info!(
        %address,
        scheme,
        data_dir = %config.store.data_dir.display(),
        retention_days = config.store.retention_days,
        max_connections = limits.max_connections,
        max_connections_per_client = limits.max_connections_per_client,
        "serving"
    );
    // The running deliveries' grace starts with the signal, beside the connections' drain (not
    // after it): a stop takes `shutdown_grace` once, not twice.
    let stopping = Arc::clone(&dispatcher);
    let signalled = Arc::new(std::sync::OnceLock::new());
    let signalled_at = Arc::clone(&signalled);
    let signal = async move {
        stop_asked.next().await;
        let _ = signalled_at.set(tokio::time::Instant::now());
        stopping.stop();
        // A second signal during the grace: the operator will not wait for it.
        tokio::spawn(async move {
            stop_asked.next().await;
            tracing::warn!(
                "stop asked again: interrupting running deliveries and closing connections now"
            );
            stopping.hurry();
        });
    };
    let hurried = Arc::clone(&dispatcher);
    let grace = config.server.shutdown_grace;
    connections::serve(
        listener,
        tls,
        router,
        limits,
        metrics,
        signal,
        // Polled when the drain begins: the grace counts from then.
        async move {
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                () = hurried.hurried() => {}
            }
        },
    )
    .await;
    tracing::info!("no longer accepting events; finishing running deliveries");
    dispatcher.stop();
    let wind_down = config.server.shutdown_grace + STORE_WIND_DOWN;
    let stopped_at = signalled
        .get()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now);
    if tokio::time::timeout_at(stopped_at + wind_down, worker)
        .await
        .is_err()
    {
        tracing::error!(
            "the store did not answer within {wind_down:?} of the signal; stopping without \
             recording the last outcomes or requeueing interrupted deliveries (they run again \
             when their leases expire)"
        );
    }
    drop(delivery_threads);
    tracing::info!("stopped");
    Ok(())
}

/// What a reload starts from: the configuration and parts built at start, and the handlers
/// loaded last.
struct Running {
    /// The configuration `serve` started with: what the start-only parts were built from.
    config: Config,
    /// The secrets those parts use, as read at start.
    secrets: StartOnlySecrets,
    engine: Engine,
    services: Services,
    dispatcher: Arc<Dispatcher>,
    tls: Option<TlsState>,
    tokens: Arc<BearerTokens>,
    initial: LoadedHandlers,
}

/// A reload: read and validate the file and every secret it references, check its handlers
/// against the sections only a restart applies as they run
/// ([`Config::check_handlers_against_running`]), load changed handlers, swap them and the
/// tokens in, and report what only a restart would apply ([`secrets::restart_required`]). On
/// any error the running configuration stays.
fn reloader(running: Running) -> Reloader {
    let Running {
        config: started,
        secrets: started_secrets,
        engine,
        services,
        dispatcher,
        tls,
        tokens,
        initial,
    } = running;
    let path = started.path.clone();
    let current = Arc::new(tokio::sync::Mutex::new((initial, started.clone())));
    let started = Arc::new((started, started_secrets));
    Arc::new(move || {
        let (path, engine, services, dispatcher, current, tls, tokens, started) = (
            path.clone(),
            engine.clone(),
            services.clone(),
            Arc::clone(&dispatcher),
            Arc::clone(&current),
            tls.clone(),
            Arc::clone(&tokens),
            Arc::clone(&started),
        );
        Box::pin(async move {
            let mut current = current.lock().await;
            let result = async {
                // Files (the configuration, secrets, the certificate) are read on a blocking
                // thread: a reload runs on the API's runtime, and a file on a share that hangs
                // must not hold a thread that answers ingest.
                let has_tls = tls.is_some();
                let previous = current.1.clone();
                let started = Arc::clone(&started);
                let read = read_files("the configuration files", move || {
                    let config = Config::load(&path)?;
                    if config.handlers.is_empty() && !previous.handlers.is_empty() {
                        anyhow::bail!("{}", no_handler_left(&config, &previous));
                    }
                    let (started, started_secrets) = &*started;
                    // The handlers load against the services and the engine built at start.
                    config.check_handlers_against_running(started)?;
                    let new_tokens = config.resolve_tokens()?;
                    // The certificate is read (again) and checked before anything is swapped.
                    let tls_config = match (has_tls, &config.server.tls) {
                        (true, Some(new)) => Some(
                            new.server_config()
                                .with_context(|| config.path.display().to_string())?,
                        ),
                        (false, None) => None,
                        (false, Some(_)) | (true, None) => anyhow::bail!(
                            "{}: [server] tls was added or removed; the listener's protocol \
                             changes only on a restart",
                            config.path.display()
                        ),
                    };
                    let changed = secrets::handler_secrets_changed(&previous, &config);
                    let restart = secrets::restart_required(
                        started,
                        started_secrets,
                        &config,
                        &StartOnlySecrets::read(&config),
                    );
                    for warning in config
                        .short_tokens(&new_tokens)
                        .into_iter()
                        .chain(secrets::exposed_secret_files(&config))
                        .chain(secrets::exposed_trusted_files(&config))
                    {
                        tracing::warn!("{warning}");
                    }
                    Ok((config, new_tokens, tls_config, changed, restart))
                });
                let (config, new_tokens, tls_config, changed, restart) = read.await?;
                let set = load_handlers(
                    &engine,
                    &services,
                    &config,
                    Some(&current.0),
                    Some(&dispatcher),
                )
                .await?;
                Ok((config, new_tokens, set, tls_config, changed, restart))
            }
            .await;
            match result {
                Ok((config, new_tokens, set, tls_config, changed, restart)) => {
                    let HandlerChanges {
                        added,
                        changed: reloaded,
                        removed,
                    } = set.changes_since(&current.0);
                    let mut report = ReloadReport {
                        handlers: set.names(),
                        added,
                        changed: reloaded,
                        removed,
                        ..ReloadReport::default()
                    };
                    let old_tokens = tokens.current();
                    if old_tokens.senders != new_tokens.senders {
                        report.secrets_reloaded.push("server.tokens".to_owned());
                    }
                    if old_tokens.admins != new_tokens.admins {
                        report
                            .secrets_reloaded
                            .push("server.admin_tokens".to_owned());
                    }
                    if *old_tokens != new_tokens {
                        tokens.replace(new_tokens);
                    }
                    report.secrets_reloaded.extend(changed);
                    report.restart_required = restart;
                    // Handlers kept from before take the new `[quarantine]` too, now that the
                    // reload is certain (a refused reload changes nothing).
                    let registry = set.registry();
                    for handler in registry.handlers() {
                        handler.reconfigure_quarantine(&config.quarantine);
                    }
                    dispatcher.replace_registry(registry);
                    *current = (set, config);
                    if let (Some(state), Some(new)) = (&tls, tls_config) {
                        state.replace(new);
                        tracing::info!("TLS certificate reloaded");
                    }
                    // Last, once everything is swapped in: a store call, bounded.
                    report.waiting_for_unconfigured = dispatcher.waiting_for_unconfigured().await;
                    if !report.secrets_reloaded.is_empty() {
                        tracing::info!(
                            secrets = ?report.secrets_reloaded,
                            "secrets changed on reload and are in use now"
                        );
                    }
                    for note in &report.restart_required {
                        tracing::warn!("reload cannot apply this: {note}");
                    }
                    tracing::info!(
                        handlers = ?report.handlers,
                        added = ?report.added,
                        changed = ?report.changed,
                        removed = ?report.removed,
                        "configuration reloaded"
                    );
                    dispatcher.metrics().reloaded(true, chrono::Utc::now());
                    Ok(report)
                }
                Err(e) => {
                    let why = crate::app::output::error_text(&e);
                    tracing::error!("configuration reload refused, keeping the running one: {why}");
                    dispatcher.metrics().reloaded(false, chrono::Utc::now());
                    Err(why)
                }
            }
        })
    })
}

/// Reloads at every SIGHUP. The handler is installed by the time this returns (not when the
/// task first runs): the ready line is printed after it, and a SIGHUP before the handler's
/// installation would end the process (the signal's default action).
fn spawn_sighup_reload(reload: Reloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /v1/admin/reload");
            return;
        };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let _ = reload().await;
            }
        });
    }
    #[cfg(not(unix))]
    drop(reload);
}

/// SIGTERM and SIGINT (ctrl-c), each time they come. On Unix the handlers are installed by
/// [`StopSignals::install`], before the ready line: a stop asked for as soon as the engine says
/// it is ready is a graceful stop, not the signal's default action ending the process; and a
/// second signal is caught too, to end the grace early. (Elsewhere, ctrl-c's handler is
/// installed when [`StopSignals::next`] is first polled.)
struct StopSignals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            StopSignals {
                terminate: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn one(stream: &mut Option<tokio::signal::unix::Signal>) {
                match stream {
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = one(&mut self.terminate) => {}
                () = one(&mut self.interrupt) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
