//! The listener of `jobhook serve`: accepts connections (plain HTTP or TLS), gives each a place
//! under the connection caps, and bounds how long a connection may stay silent, so that idle,
//! slow or half-sent connections cannot pile up until file descriptors run out and valid events
//! time out.
//!
//! - **Caps.** At most `[server] max_connections` connections are open at once, and at most
//!   `max_connections_per_client` from one client (an IPv4 address, or an IPv6 /64: one host
//!   commonly holds a whole /64). A plain-HTTP connection over a cap is answered `503 Service
//!   Unavailable` with a one-line text body naming the cap, `Retry-After: 1` and `Connection:
//!   close`, then closed; a TLS connection over a cap is closed right after accept (no handshake
//!   is spent on it, and a plain-text answer would be unreadable to a TLS client). Either way
//!   `jobhook_connections_refused_total{reason}` counts it and a warning is logged, at most once
//!   a second with the number refused.
//! - **Room at the total cap.** Connections that hold a place without a request under way —
//!   no complete request head yet (a TLS handshake included), or idle after a response — would
//!   let a few addresses that open connections and send nothing keep every forwarder out. So at
//!   `max_connections` a new connection within its client's cap is admitted by closing one such
//!   connection: first one that has never completed a request, then one of the client holding
//!   the most such connections, then the longest-waiting; counted in
//!   `jobhook_connections_evicted_total` and logged (at most once a second) with its client (an
//!   IPv6 one as its /64). A request whose head has arrived is never cut short: a connection
//!   marked while one starts closes once it is idle again. Only when every connection has a
//!   request under way is the new one refused. The open connections can exceed the cap by the
//!   ones marked and not yet closed, which close at once (a TLS one waiting for a handshake
//!   slot is signalled too).
//! - **Request head.** A new connection must deliver a complete request head within
//!   `header_read_timeout_ms` of being accepted (a TLS handshake included), and a kept-alive connection within that time of
//!   the first byte of its next request; otherwise it is closed (headers trickled a byte at a
//!   time cannot hold a connection).
//! - **Idle.** A kept-alive connection that starts no new request within `idle_timeout_ms` of
//!   its previous response is closed; so is one whose client stops reading a response.
//! - **Body.** The ingest endpoint reads its body within `body_read_timeout_ms` (see
//!   [`crate::sources::api::read_body`]), or answers `408` and closes.
//! - **Lingering close.** When the server closes a connection after a response (for example a
//!   `413` sent before an oversized body was read), it first shuts its sending side and reads
//!   and discards what the client still sends, for at most [`LINGER_TIMEOUT`] and
//!   [`LINGER_MAX_BYTES`]: closing at once with unread data would reset the connection and could
//!   destroy the response before the client reads it.
//!
//! hyper's own `header_read_timeout` is not used: its clock starts whenever a connection waits
//! for a request head, so it cannot give an idle kept-alive connection a longer allowance than
//! a slow request head. The clock here ([`Clock`]) knows the difference.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Sleep;

use crate::app::tls::{HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, TlsState};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;

/// Default for `[server] header_read_timeout_ms`: a client sends its request head in one or two
/// packets, so 10 s is generous on any link; a slow-loris client holds a connection no longer.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for `[server] body_read_timeout_ms`: a context is a few hundred bytes and the body at
/// most `max_body_bytes` (64 KiB by default); 10 s is ample for that even on a slow link.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for `[server] idle_timeout_ms`: long enough for a forwarder to reuse its connection
/// between events in a busy period, short enough that forgotten connections give their file
/// descriptors back within a minute.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default for `[server] max_connections`. Each connection is a file descriptor, and a process's
/// soft limit is often 1,024; 512 leaves room for the store, components and outbound clients.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// Default for `[server] max_connections_per_client`: a forwarder in IIS opens up to about a
/// dozen connections per CPU core; 128 covers a large Keyfactor server while one misbehaving
/// address can take at most a quarter of [`DEFAULT_MAX_CONNECTIONS`].
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 128;

/// Shortest timeout accepted: anything shorter would cut off clients on an ordinary network.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// Longest timeout accepted: beyond it a timeout no longer protects anything.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest connection cap accepted (a port's worth; far beyond any file-descriptor limit).
pub const MAX_CONNECTIONS_LIMIT: usize = 65_536;

/// How long a closing connection keeps reading (and discarding) after the response, so that the
/// response is not destroyed by a reset; see the module documentation.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// How much a closing connection reads and discards at most before it closes anyway.
pub const LINGER_MAX_BYTES: usize = 1024 * 1024;

/// Bytes a lingering connection reads and discards per read, into a buffer on the stack: what
/// a client still sends after the response is a request's leftover, seldom more than a few KiB.
const LINGER_READ_BYTES: usize = 8192;

/// Refusals (503 answers to connections over a cap) being written at once; beyond it a refused
/// connection is closed without an answer, so a flood cannot make refusing itself expensive.
/// A refusal closes as a 413 does: the answer, then lingering for [`LINGER_TIMEOUT`] and
/// [`LINGER_MAX_BYTES`], so a client still sending its request gets the 503 rather than a reset.
const MAX_REFUSALS_IN_FLIGHT: usize = 32;

/// Back-off after a failed `accept` (out of file descriptors and the like), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often at most a refusal is logged (with the number refused since the last line).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Leading bits of an IPv6 address that name one client for the per-client cap: a /64 is the
/// usual allocation to one host or network, and its addresses cost their holder nothing.
const IPV6_CLIENT_PREFIX_BITS: u32 = 64;

/// The connection caps and timeouts of the listener (`[server]` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to deliver a complete request head (from accept, or from the first byte of a
    /// kept-alive connection's next request).
    pub header_read_timeout: Duration,
    /// Time to deliver the ingest request body.
    pub body_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one client IP address.
    pub max_connections_per_client: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        }
    }
}

impl ConnectionLimits {
    /// Checks every value; `Err` names the `[server]` key and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("header_read_timeout_ms", self.header_read_timeout),
            ("body_read_timeout_ms", self.body_read_timeout),
            ("idle_timeout_ms", self.idle_timeout),
        ] {
            if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&value) {
                return Err(format!(
                    "[server] {key} must be between {} and {} (milliseconds)",
                    MIN_TIMEOUT.as_millis(),
                    MAX_TIMEOUT.as_millis()
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            return Err(format!(
                "[server] max_connections must be between 1 and {MAX_CONNECTIONS_LIMIT}"
            ));
        }
        if !(1..=self.max_connections).contains(&self.max_connections_per_client) {
            return Err(format!(
                "[server] max_connections_per_client must be between 1 and max_connections ({})",
                self.max_connections
            ));
        }
        Ok(())
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` connections are open.
    Total,
    /// `max_connections_per_client` connections from this address are open.
    PerClient,
}

impl Refusal {
    /// The metric label and the name of the setting.
    pub fn setting(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerClient => "max_connections_per_client",
        }
    }

    /// The value of that setting.
    pub fn limit(self, limits: &ConnectionLimits) -> usize {
        match self {
            Refusal::Total => limits.max_connections,
            Refusal::PerClient => limits.max_connections_per_client,
        }
    }
}

/// Counts open connections, in total and per client address.
#[derive(Debug)]
pub struct Admission {
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    open: Mutex<OpenConnections>,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
    /// Each open connection's client and clock, by a number of its own: what eviction looks at.
    clocks: HashMap<u64, (IpAddr, Arc<Clock>)>,
    next_id: u64,
}

/// A connection's place under the caps; dropping it frees the place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    client: IpAddr,
    id: u64,
    clock: Arc<Clock>,
}

impl Permit {
    /// The connection's clock (its phase, deadlines and eviction).
    fn clock(&self) -> Arc<Clock> {
        Arc::clone(&self.clock)
    }
}

/// A connection closed to make room: whose, and how many its client held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// The client (see [`client_key`]) whose connection is closed.
    pub client: IpAddr,
    /// The connections that client held.
    pub held: usize,
}

/// The client a connection from `ip` counts for: the IPv4 address (also when mapped into
/// IPv6), or the IPv6 address's /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (128 - IPV6_CLIENT_PREFIX_BITS);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        v4 => v4,
    }
}

impl Admission {
    /// Caps from `limits`; the open-connection gauge is kept in `metrics`.
    pub fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            metrics,
            open: Mutex::new(OpenConnections::default()),
        })
    }

    /// A place for a connection from `ip` (counted for [`client_key`]), with the connection
    /// closed to make room for it at the total cap, if one was; or which cap is reached.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<(Permit, Option<Eviction>), Refusal> {
        let client = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open
            .by_client
            .get(&client)
            .is_some_and(|n| *n >= self.limits.max_connections_per_client)
        {
            return Err(Refusal::PerClient);
        }
        let eviction = if open.total >= self.limits.max_connections {
            Some(open.evict().ok_or(Refusal::Total)?)
        } else {
            None
        };
        *open.by_client.entry(client).or_insert(0) += 1;
        open.total += 1;
        let id = open.next_id;
        open.next_id = open.next_id.wrapping_add(1);
        let clock = Clock::new();
        open.clocks.insert(id, (client, Arc::clone(&clock)));
        self.metrics.connections_open(1);
        if eviction.is_some() {
            self.metrics.connection_evicted();
        }
        Ok((
            Permit {
                admission: Arc::clone(self),
                client,
                id,
                clock,
            },
            eviction,
        ))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl OpenConnections {
    /// Marks one connection without a request under way for closing, and says whose: first one
    /// that has never completed a request (a sender that got its answer is less likely a
    /// place-holder than a connection that never said anything), then of the client holding
    /// the most such connections, then the longest-waiting. `None` when every connection has a
    /// request under way (or is already marked). A candidate whose request starts between the
    /// look and the mark is passed over for the next.
    fn evict(&self) -> Option<Eviction> {
        let now = Instant::now();
        let candidates: Vec<(bool, Duration, IpAddr, &Arc<Clock>)> = self
            .clocks
            .values()
            .filter_map(|(client, clock)| {
                let (since, served) = clock.evictable_since()?;
                Some((
                    !served,
                    now.saturating_duration_since(since),
                    *client,
                    clock,
                ))
            })
            .collect();
        let mut idle_by_client: HashMap<IpAddr, usize> = HashMap::new();
        for (_, _, client, _) in &candidates {
            *idle_by_client.entry(*client).or_insert(0) += 1;
        }
        let mut ranked: Vec<_> = candidates
            .into_iter()
            .map(|(never_served, waited, client, clock)| {
                let held = idle_by_client.get(&client).copied().unwrap_or(0);
                ((never_served, held, waited), client, clock)
            })
            .collect();
        ranked.sort_unstable_by_key(|candidate| std::cmp::Reverse(candidate.0));
        ranked
            .into_iter()
            .find(|(_, _, clock)| clock.evict())
            .map(|(_, client, _)| Eviction {
                client,
                held: self.by_client.get(&client).copied().unwrap_or(0),
            })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        open.clocks.remove(&self.id);
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_client.remove(&self.client);
            }
        }
        self.admission.metrics.connections_open(-1);
    }
}

/// Logs refusals, and evictions, each at most once per [`REFUSAL_LOG_INTERVAL`], with how
/// many there were.
#[derive(Debug)]
struct RefusalLog {
    refusals: LogLimit,
    evictions: LogLimit,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog {
            refusals: LogLimit::new(REFUSAL_LOG_INTERVAL),
            evictions: LogLimit::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

/// A client as the caps count it ([`client_key`]), for the log: an IPv6 one as its /64, which
/// is what holds the places (blocking its one address would not help).
fn client_label(ip: IpAddr) -> String {
    match client_key(ip) {
        IpAddr::V6(prefix) => format!("{prefix}/{IPV6_CLIENT_PREFIX_BITS}"),
        v4 => v4.to_string(),
    }
}

impl RefusalLog {
    /// A refusal of a connection from `peer`: the client named is the one the cap counts (for
    /// the total cap, the one refused).
    fn note(&self, refusal: Refusal, peer: IpAddr, limits: &ConnectionLimits) {
        // The line stands for this refusal and those untold since the last.
        let Some(refused) = self.refusals.due().map(|untold| untold + 1) else {
            return;
        };
        let limit = refusal.limit(limits);
        let client = client_label(peer);
        tracing::warn!(
            %client,
            refused,
            "connection refused: [server] {} ({limit}) reached; {refused} refused since the \
             last such line",
            refusal.setting()
        );
    }

    fn evicted(&self, eviction: Eviction, limits: &ConnectionLimits) {
        let Some(evicted) = self.evictions.due().map(|untold| untold + 1) else {
            return;
        };
        let holder = client_label(eviction.client);
        tracing::warn!(
            %holder,
            held = eviction.held,
            evicted,
            "[server] max_connections ({}) reached: a connection without a request under way \
             was closed to admit a new one, one of the {} connections of {holder}; {evicted} \
             closed since the last such line",
            limits.max_connections,
            eviction.held,
        );
    }
}

/// Where a connection is in its request cycle, which decides the deadline that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// A request is being served: no connection deadline (the body has its own).
    Busy,
    /// Kept alive after a response, waiting for the next request.
    Idle,
    /// The server has shut its side and reads what is left before closing.
    Closing,
}

/// The phase of one connection and since when; the service sets `Busy`/`Idle`, the I/O wrapper
/// sees the first byte of a request and the close.
#[derive(Debug)]
struct Clock {
    state: Mutex<(Phase, Instant)>,
    /// Marked to be closed to make room ([`Admission::try_admit`]); acted on only while no
    /// request is under way.
    evicted: std::sync::atomic::AtomicBool,
    /// Whether a request of this connection has ever been under way (it reached `Busy`).
    served: std::sync::atomic::AtomicBool,
    /// Signalled when the connection is marked: a connection that reads nothing (a TLS
    /// connection waiting for a handshake slot) is told so, not only one waiting for bytes.
    marked: tokio::sync::Notify,
    /// The connection task, as last seen waiting for bytes: hyper does not read again after a
    /// response until it is woken, so a phase change wakes it to arm the new deadline.
    waker: Mutex<Option<Waker>>,
}

impl Clock {
    fn new() -> Arc<Self> {
        Arc::new(Clock {
            state: Mutex::new((Phase::Head, Instant::now())),
            evicted: std::sync::atomic::AtomicBool::new(false),
            served: std::sync::atomic::AtomicBool::new(false),
            marked: tokio::sync::Notify::new(),
            waker: Mutex::new(None),
        })
    }

    fn waiting(&self, waker: &Waker) {
        let mut current = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        if !current.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *current = Some(waker.clone());
        }
    }

    fn wake(&self) {
        if let Some(waker) = self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            waker.wake_by_ref();
        }
    }

    fn get(&self) -> (Phase, Instant) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (phase, Instant::now());
        if phase == Phase::Busy {
            self.served
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.wake();
    }

    /// Since when the connection has been without a request under way (waiting for a head, or
    /// idle), and whether it ever completed one, if it is and is not marked for eviction yet.
    fn evictable_since(&self) -> Option<(Instant, bool)> {
        let (phase, since) = self.get();
        let between = matches!(phase, Phase::Head | Phase::Idle);
        let served = self.served.load(std::sync::atomic::Ordering::Relaxed);
        (between && !self.evicted.load(std::sync::atomic::Ordering::Relaxed))
            .then_some((since, served))
    }

    /// Resolves once the connection is marked to be closed and has no request under way.
    async fn closing(&self) {
        while !self.must_close() {
            self.marked.notified().await;
        }
    }

    /// Marks the connection to be closed if no request is under way; whether it was marked.
    fn evict(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(state.0, Phase::Head | Phase::Idle)
            || self
                .evicted
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return false;
        }
        drop(state);
        self.wake();
        self.marked.notify_one();
        true
    }

    /// Whether the connection is marked to be closed and has no request under way (no complete
    /// head yet, or idle): a request whose head arrived after it was marked is served first.
    fn must_close(&self) -> bool {
        // Every read asks: the mark alone, without the lock, in the usual case of none.
        if !self.evicted.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        matches!(state.0, Phase::Head | Phase::Idle)
    }

    /// Bytes arrived: an idle connection is now reading a request head.
    fn bytes_arrived(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 == Phase::Idle {
            *state = (Phase::Head, Instant::now());
        }
    }
}

/// A connection's stream with the deadlines of [`Clock`] and a lingering shutdown.
struct Guarded<I> {
    io: I,
    clock: Arc<Clock>,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    write_shut: bool,
    discarded: usize,
}

impl<I> Guarded<I> {
    fn new(
        io: I,
        clock: Arc<Clock>,
        limits: ConnectionLimits,
        metrics: Arc<Metrics>,
        peer: SocketAddr,
    ) -> Self {
        Guarded {
            io,
            clock,
            limits,
            metrics,
            peer,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
            write_shut: false,
            discarded: 0,
        }
    }

    /// Whether the deadline of the current phase has passed (registering a wake-up for it if
    /// not); the phase that expired.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<Phase> {
        let (phase, since) = self.clock.get();
        let allowance = match phase {
            Phase::Head => self.limits.header_read_timeout,
            Phase::Idle => self.limits.idle_timeout,
            Phase::Closing => LINGER_TIMEOUT,
            Phase::Busy => return None,
        };
        let deadline = since + allowance;
        if self.armed != Some(deadline) {
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
            self.armed = Some(deadline);
        }
        self.sleep.as_mut().poll(cx).is_ready().then_some(phase)
    }

    /// The error that ends a connection whose deadline passed; counts and logs it.
    fn timed_out(&self, phase: Phase) -> io::Error {
        let peer = self.peer;
        let message = match phase {
            Phase::Head => {
                self.metrics.connection_timed_out("header");
                tracing::info!(
                    %peer,
                    "connection closed: no complete request head within \
                     [server] header_read_timeout_ms ({} ms)",
                    self.limits.header_read_timeout.as_millis()
                );
                "no complete request head within header_read_timeout_ms"
            }
            _ => {
                self.metrics.connection_timed_out("idle");
                tracing::debug!(
                    %peer,
                    "connection closed: idle for [server] idle_timeout_ms ({} ms)",
                    self.limits.idle_timeout.as_millis()
                );
                "idle for idle_timeout_ms"
            }
        };
        io::Error::new(io::ErrorKind::TimedOut, message)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.clock.must_close() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection ([server] max_connections reached)",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.clock.bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.clock.waiting(cx.waker());
                match this.expired(cx) {
                    Some(phase) => Poll::Ready(Err(this.timed_out(phase))),
                    None => Poll::Pending,
                }
            }
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending => match this.expired(cx) {
                Some(phase) => Poll::Ready(Err(this.timed_out(phase))),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => match this.expired(cx) {
                Some(phase) => Poll::Ready(Err(this.timed_out(phase))),
                None => Poll::Pending,
            },
            ready => ready,
        }
    }

    /// Shuts the sending side, then reads and discards until the client closes, for at most
    /// [`LINGER_TIMEOUT`] and [`LINGER_MAX_BYTES`]. Never fails: the response is out.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_shut {
            let shut = Pin::new(&mut this.io).poll_shutdown(cx);
            if shut.is_pending() {
                // A client that does not take the last bytes gets the idle allowance.
                return match this.expired(cx) {
                    Some(_) => Poll::Ready(Ok(())),
                    None => Poll::Pending,
                };
            }
            this.write_shut = true;
            this.clock.set(Phase::Closing);
            if let Poll::Ready(Err(_)) = shut {
                return Poll::Ready(Ok(()));
            }
        }
        let mut scratch = [0u8; LINGER_READ_BYTES];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.discarded = this.discarded.saturating_add(buf.filled().len());
                    if this.discarded > LINGER_MAX_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return match this.expired(cx) {
                        Some(_) => Poll::Ready(Ok(())),
                        None => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// What every connection task shares.
#[derive(Clone)]
struct Shared {
    router: Router,
    stop: watch::Receiver<bool>,
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` resolves; then stops
/// accepting, lets open connections finish their requests until `drain_over` resolves (first
/// polled when the drain begins: the shutdown grace, or a second stop signal), and returns.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsState>,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    drain_over: impl Future<Output = ()>,
) {
    let admission = Admission::new(limits, Arc::clone(&metrics));
    let (stop_tx, stop) = watch::channel(false);
    let shared = Shared { router, stop };
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let refusal_log = RefusalLog::default();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let permit = match admission.try_admit(peer.ip()) {
            Ok((permit, eviction)) => {
                if let Some(eviction) = eviction {
                    refusal_log.evicted(eviction, &limits);
                }
                permit
            }
            Err(refusal) => {
                metrics.connection_refused(refusal.setting());
                refusal_log.note(refusal, peer.ip().to_canonical(), &limits);
                // TLS clients cannot read a plain answer: they are closed (dropped) at once.
                if tls.is_none()
                    && let Ok(slot) = Arc::clone(&refusals).try_acquire_owned()
                {
                    let guarded =
                        Guarded::new(stream, Clock::new(), limits, Arc::clone(&metrics), peer);
                    tokio::spawn(async move {
                        refuse(guarded, refusal).await;
                        drop(slot);
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        // The connection's deadlines (and eviction) hold from accept, through a TLS handshake.
        let clock = permit.clock();
        let stream = Guarded::new(
            stream,
            Arc::clone(&clock),
            limits,
            Arc::clone(&metrics),
            peer,
        );
        match &tls {
            None => {
                connections.spawn(async move {
                    http(stream, clock, peer, shared).await;
                    drop(permit);
                });
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                let handshakes = Arc::clone(&handshakes);
                connections.spawn(async move {
                    // Closed to make room while it waits for a handshake slot, too: it reads
                    // nothing then, so only the clock's signal reaches it.
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                        tokio::select! {
                            accepted = async {
                                let _slot = handshakes.acquire().await;
                                acceptor.accept(stream).await
                            } => Some(accepted),
                            () = clock.closing() => None,
                        }
                    })
                    .await;
                    match handshake {
                        Ok(Some(Ok(stream))) => http(stream, clock, peer, shared).await,
                        Ok(Some(Err(e))) => tracing::info!(%peer, "TLS handshake failed: {e}"),
                        Ok(None) => {
                            tracing::debug!(%peer, "closed before its TLS handshake to make room")
                        }
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let open = admission.open();
    if open > 0 {
        tracing::info!(
            open,
            "waiting for open connections to finish their requests"
        );
    }
    let cut_short = tokio::select! {
        () = async { while connections.join_next().await.is_some() {} } => false,
        () = drain_over => true,
    };
    if cut_short && !connections.is_empty() {
        tracing::warn!(
            open = admission.open(),
            "connections still open after the shutdown grace period (or a second stop signal) \
             are closed"
        );
        connections.abort_all();
    }
}

/// Answers a connection over a cap with `503` and closes it the way every closing connection
/// is closed ([`Guarded::poll_shutdown`]): writing gets the header allowance, then what the
/// client still sends is read and discarded for at most [`LINGER_TIMEOUT`] and
/// [`LINGER_MAX_BYTES`].
async fn refuse(mut stream: Guarded<TcpStream>, refusal: Refusal) {
    let limit = refusal.limit(&stream.limits);
    let body = format!(
        "jobhook is refusing connections: [server] {} ({limit}) is reached; retry shortly\n",
        refusal.setting()
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(response.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// Serves HTTP/1.1 on one connection until it closes, times out or the server stops. `io` is
/// the connection's [`Guarded`] stream (under TLS, the TLS stream over it), `clock` its clock.
async fn http<I>(io: I, clock: Arc<Clock>, peer: SocketAddr, shared: Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = shared.router;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        clock.set(Phase::Busy);
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        let clock = Arc::clone(&clock);
        async move {
            let response =
                tower_service::Service::call(&mut router, request.map(axum::body::Body::new)).await;
            clock.set(Phase::Idle);
            response
        }
    });
    let connection = http1::Builder::new()
        .keep_alive(true)
        // A client that shuts its sending side once its request is out (`nc -N`, socat) still
        // waits for the answer: the end of its input does not end the request.
        .half_close(true)
        // The deadlines are the Clock's (see the module documentation); without a timer hyper
        // sets none of its own.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut stop = shared.stop;
    // The watch guard is dropped inside: it must not be held across the select.
    let stopping = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stopping => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_client: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: total,
            max_connections_per_client: per_client,
            ..ConnectionLimits::default()
        }
    }

    /// A permit whose connection has a request under way (never evicted).
    fn busy(admission: &Arc<Admission>, ip: IpAddr) -> Permit {
        let (permit, eviction) = admission.try_admit(ip).unwrap();
        assert_eq!(eviction, None);
        permit.clock.set(Phase::Busy);
        permit
    }

    #[test]
    fn caps_count_per_address_and_in_total_and_free_on_drop() {
        let admission = Admission::new(limits(3, 2), Arc::new(Metrics::new()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let first = busy(&admission, a);
        let _second = busy(&admission, mapped);
        assert_eq!(admission.try_admit(a).unwrap_err(), Refusal::PerClient);
        let _third = busy(&admission, b);
        assert_eq!(admission.try_admit(b).unwrap_err(), Refusal::Total);
        drop(first);
        assert_eq!(admission.open(), 2);
        let _again = busy(&admission, a);
    }

    /// At the total cap a newcomer within its client's cap is admitted by closing a connection
    /// without a request under way, of the client holding the most, the longest-waiting one;
    /// a connection with a request under way is never taken, and one already marked not twice.
    #[test]
    fn at_the_total_cap_an_idle_connection_of_the_biggest_holder_makes_room() {
        let admission = Admission::new(limits(5, 3), Arc::new(Metrics::new()));
        let hog: IpAddr = "10.0.0.66".parse().unwrap();
        let forwarder: IpAddr = "10.0.0.9".parse().unwrap();
        let other: IpAddr = "10.0.0.7".parse().unwrap();
        let (oldest, _) = admission.try_admit(hog).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let (newer, _) = admission.try_admit(hog).unwrap();
        let hog_busy = busy(&admission, hog);
        let (quiet_other, _) = admission.try_admit(other).unwrap();
        let serving = busy(&admission, forwarder);
        // Full: the forwarder's next connection takes the hog's longest-waiting one.
        let (second, eviction) = admission.try_admit(forwarder).unwrap();
        assert_eq!(
            eviction,
            Some(Eviction {
                client: hog,
                held: 3
            })
        );
        assert!(oldest.clock.must_close());
        assert!(!newer.clock.must_close() && !hog_busy.clock.must_close());
        // A request that starts on a marked connection is served; it closes when idle again.
        oldest.clock.set(Phase::Busy);
        assert!(!oldest.clock.must_close());
        oldest.clock.set(Phase::Idle);
        assert!(oldest.clock.must_close());
        // Next: the hog still holds the most; its other unmarked idle one goes.
        second.clock.set(Phase::Busy);
        let (third, eviction) = admission.try_admit(other).unwrap();
        assert_eq!(eviction.map(|e| e.client), Some(hog));
        assert!(newer.clock.must_close());
        // Then the quiet other client's; then nothing is left without a request under way.
        let (fourth, eviction) = admission.try_admit(forwarder).unwrap();
        assert_eq!(eviction.map(|e| e.client), Some(other));
        assert!(quiet_other.clock.must_close());
        fourth.clock.set(Phase::Busy);
        third.clock.set(Phase::Busy);
        let newcomer: IpAddr = "10.0.0.8".parse().unwrap();
        assert_eq!(admission.try_admit(newcomer).unwrap_err(), Refusal::Total);
        drop((serving, hog_busy));
    }

    /// A connection that has never completed a request goes before an idle one that has, even
    /// of a client holding fewer: a forwarder's kept-alive connections are not the first to go
    /// when many addresses each hold one silent connection.
    #[test]
    fn a_connection_that_never_completed_a_request_goes_first() {
        let admission = Admission::new(limits(4, 4), Arc::new(Metrics::new()));
        let forwarder: IpAddr = "10.0.0.9".parse().unwrap();
        let (kept_alive_1, _) = admission.try_admit(forwarder).unwrap();
        let (kept_alive_2, _) = admission.try_admit(forwarder).unwrap();
        for permit in [&kept_alive_1, &kept_alive_2] {
            permit.clock.set(Phase::Busy);
            permit.clock.set(Phase::Idle);
        }
        let (silent, _) = admission.try_admit("10.0.0.66".parse().unwrap()).unwrap();
        let (busy, _) = admission.try_admit("10.0.0.67".parse().unwrap()).unwrap();
        busy.clock.set(Phase::Busy);
        let (_newcomer, eviction) = admission.try_admit(forwarder).unwrap();
        assert_eq!(
            eviction.map(|e| e.client),
            Some("10.0.0.66".parse().unwrap())
        );
        assert!(silent.clock.must_close());
        assert!(!kept_alive_1.clock.must_close() && !kept_alive_2.clock.must_close());
        assert_eq!(
            client_label("2001:db8:1:2::7".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            client_label("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1"
        );
    }

    /// IPv6 addresses of one /64 are one client; IPv4 (also mapped) addresses each their own.
    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let admission = Admission::new(limits(10, 2), Arc::new(Metrics::new()));
        let _a = busy(&admission, "2001:db8:1:2::1".parse().unwrap());
        let _b = busy(&admission, "2001:db8:1:2:ffff::7".parse().unwrap());
        assert_eq!(
            admission
                .try_admit("2001:db8:1:2:1234::1".parse().unwrap())
                .unwrap_err(),
            Refusal::PerClient
        );
        let _c = busy(&admission, "2001:db8:1:3::1".parse().unwrap());
        assert_eq!(
            client_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn limits_are_validated_with_the_key_named() {
        assert!(ConnectionLimits::default().validate().is_ok());
        let e = ConnectionLimits {
            header_read_timeout: Duration::from_millis(5),
            ..ConnectionLimits::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("header_read_timeout_ms"), "{e}");
        let e = limits(0, 1).validate().unwrap_err();
        assert!(e.contains("max_connections must"), "{e}");
        let e = limits(10, 11).validate().unwrap_err();
        assert!(e.contains("max_connections_per_client"), "{e}");
    }
}
