//! The exchange with the operator's SMTP relay, one connection per message, with every byte the
//! engine reads from the relay bounded by [`MAX_RELAY_READ_BYTES`], and nothing read in plain
//! text before STARTTLS ever taken for a reply from inside TLS.
//!
//! Why a budget: lettre reads each reply line into a `String` until its line feed arrives and
//! checks the line's length only then. A relay — or, before STARTTLS, anyone on the network path
//! — that sends `220 ` and then bytes without a line end would have all of them buffered, as
//! fast as the link delivers (hundreds of MB a second on a LAN), until `[mail.smtp]
//! timeout_ms` ends the exchange: a way to run the engine out of memory, once per concurrent
//! mail call.
//!
//! How: lettre builds its connection on a stream the engine hands it
//! ([`AsyncSmtpConnection::connect_with_transport`]). That stream is the TCP socket inside a
//! [`ReadBudget`], which delivers at most [`MAX_RELAY_READ_BYTES`] and then fails every read.
//! TLS — implicit or STARTTLS — is lettre's own code with the same [`TlsParameters`] as
//! before (the system roots, the relay's host name), layered *above* the budget: the TLS
//! handshake, every record and every reply count against it, so nothing above the socket
//! (rustls, lettre's reader, its reply strings) can ever hold more of the relay's bytes. What
//! lettre's transport did besides — the greeting and EHLO, STARTTLS when required, AUTH with
//! its default mechanisms, the transaction, QUIT — is done here in the same order with
//! lettre's own connection methods.
//!
//! Why STARTTLS is not lettre's `starttls`: lettre reads replies through a buffered reader that
//! reads ahead, and upgrades the stream *under* that reader, keeping what it holds. Plain text
//! that follows the relay's go-ahead (`220`) in the same segment — which anyone on the path can
//! append — was then read as the first reply from inside TLS, and every later reply one command
//! late: the engine took the relay's `354` to DATA for its verdict on the message and reported
//! a refused message as sent (STARTTLS command injection, CVE-2011-0411's class). So the plain
//! part ([`Relay::plaintext_phase`]) runs on a lettre connection of its own over a [`Lent`]
//! socket that hands lettre one byte per read — nothing is read ahead of the go-ahead's line
//! feed — and is then dropped, buffer and all. A byte already waiting on the socket after the
//! go-ahead is a protocol violation: the connection is closed before TLS
//! ([`RelayError::PlaintextAfterStarttls`]). What arrives later goes to rustls as TLS records,
//! which authenticate every byte. The TLS connection is then a new lettre connection on the
//! upgraded socket ([`Encrypted`]), which sends EHLO first as lettre's `starttls` did.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use lettre::address::Envelope;
use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::Starttls;
use lettre::transport::smtp::extension::{ClientId, Extension};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes the engine reads from the relay on one connection (one message), TLS included;
/// past it every read fails and the connection is closed.
///
/// What a real relay sends for one message: a TLS server flight (certificate chains are a few
/// KiB; rustls accepts a handshake message of at most 64 KiB), a greeting and one or two EHLO
/// replies (a few KiB), and single-line replies to AUTH, MAIL, each of at most
/// [`MAX_RECIPIENTS`](super::MAX_RECIPIENTS) RCPT, DATA, the end of data and QUIT — RFC 5321
/// §4.5.3.1.5 caps a reply line at 512 bytes, so about 70 lines come to some 35 KiB. That is
/// about 110 KiB at the very worst; 256 KiB leaves room for a chatty relay and still keeps
/// what a hostile one can make the engine hold to a quarter of a MiB per concurrent mail.
pub const MAX_RELAY_READ_BYTES: usize = 256 * 1024;

/// Most bytes lettre is handed per read while it reads the plain-text replies before STARTTLS:
/// one, so its buffered reader never holds a byte past the line it is reading, and when the
/// go-ahead's line feed has been read every later byte is still on the socket, where the
/// engine can see it. A real relay's plain-text replies come to a few hundred bytes.
const PLAINTEXT_READ_BYTES: usize = 1;

/// What lettre reads as the greeting of the connection it builds on the TLS stream after
/// STARTTLS. After STARTTLS the relay sends no greeting — the client speaks first, with EHLO
/// (RFC 3207 §4.2) — but lettre's connect reads one before its EHLO; this line is made up here,
/// never read from the relay, and stands for the greeting the plain-text part already read.
const TLS_GREETING: &[u8] = b"220 TLS started after STARTTLS\r\n";

/// How the connection to the relay is secured.
pub(super) enum RelayTls {
    /// A plain connection upgraded with STARTTLS, which the relay must offer.
    Starttls(TlsParameters),
    /// TLS from the first byte.
    Implicit(TlsParameters),
    /// No TLS (a relay on loopback only; checked by the caller).
    None,
}

/// Where the relay is and how the engine talks to it.
pub(super) struct Relay {
    /// Host name or address (also the name its certificate must carry).
    pub(super) host: String,
    /// TCP port.
    pub(super) port: u16,
    /// TLS mode.
    pub(super) tls: RelayTls,
    /// SMTP AUTH credentials, if the relay needs them.
    pub(super) credentials: Option<Credentials>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Relay({}:{})", self.host, self.port)
    }
}

/// Why a message did not get through the relay.
#[derive(Debug, thiserror::Error)]
pub(super) enum RelayError {
    /// The relay sent more than [`MAX_RELAY_READ_BYTES`]; the engine stopped reading.
    #[error("the relay sent more than {MAX_RELAY_READ_BYTES} bytes on one connection")]
    TooMuch,
    /// The TCP connection could not be made.
    #[error("cannot connect to the relay: {0}")]
    Connect(#[source] io::Error),
    /// The connection to the relay failed outside lettre's exchange.
    #[error("the connection to the relay failed: {0}")]
    Socket(#[source] io::Error),
    /// `tls = "starttls"`, and the relay's EHLO reply does not offer STARTTLS: no fallback to
    /// plain text.
    #[error("STARTTLS is not supported by the relay (no STARTTLS in its EHLO reply)")]
    NoStarttls,
    /// Bytes were waiting in plain text right after the relay's go-ahead to STARTTLS, before
    /// any TLS: what an attacker on the path appends to inject replies the engine would read as
    /// coming from inside TLS. The connection was closed before TLS.
    #[error(
        "the relay sent plain text after its go-ahead to STARTTLS, before TLS began (an injection on the network path?); the connection was closed"
    )]
    PlaintextAfterStarttls,
    /// The SMTP exchange (TLS included) failed, or the relay refused.
    #[error(transparent)]
    Smtp(#[from] SmtpError),
}

impl Relay {
    /// Sends `message` to the envelope's recipients on a new connection, reading at most
    /// [`MAX_RELAY_READ_BYTES`] from the relay. The caller bounds the time.
    pub(super) async fn send(
        &self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, RelayError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(RelayError::Connect)?;
        let over = Arc::new(AtomicBool::new(false));
        let socket = ReadBudget::new(tcp, MAX_RELAY_READ_BYTES, Arc::clone(&over));
        let result = self.exchange(socket, envelope, message).await;
        // Whatever lettre made of the refused read (a network, TLS or response error), the
        // cause is the budget.
        if over.load(Ordering::Relaxed) {
            return Err(RelayError::TooMuch);
        }
        result
    }

    /// The SMTP exchange on `socket`, as lettre's transport does it.
    async fn exchange(
        &self,
        socket: ReadBudget,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, RelayError> {
        // lettre's default, as its transport used: `[127.0.0.1]` without the `hostname` feature.
        let hello = ClientId::default();
        let mut conn = match &self.tls {
            RelayTls::None => {
                AsyncSmtpConnection::connect_with_transport(Box::new(socket), &hello).await?
            }
            RelayTls::Starttls(parameters) => {
                // Fails when the relay does not offer STARTTLS: no fallback to plain text.
                let socket = Self::plaintext_phase(socket, &hello).await?;
                // On a socket nothing has been read ahead of; lettre then sends EHLO inside
                // TLS, as its `starttls` did.
                Self::over_tls(socket, parameters, TLS_GREETING, &hello).await?
            }
            // The relay's own greeting comes inside TLS.
            RelayTls::Implicit(parameters) => {
                Self::over_tls(socket, parameters, b"", &hello).await?
            }
        };
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials).await?;
        }
        let response = conn.send(envelope, message).await?;
        // QUIT and close, as lettre's transport does without a pool; its answer does not matter.
        conn.abort().await;
        Ok(response)
    }

    /// lettre's own TLS upgrade, the one its transport (and its `starttls`) ran, on the
    /// budgeted `socket`, and a lettre connection on the TLS stream that reads `greeting` first
    /// ([`Encrypted`]). `AsyncNetworkStream` is deprecated as public API but is what lettre's
    /// transport itself uses; its TLS stays lettre's, configured as before.
    async fn over_tls(
        socket: ReadBudget,
        parameters: &TlsParameters,
        greeting: &'static [u8],
        hello: &ClientId,
    ) -> Result<AsyncSmtpConnection, RelayError> {
        #[allow(deprecated)]
        let mut tls = AsyncNetworkStream::use_existing_tokio1(Box::new(socket));
        tls.upgrade_tls(parameters.clone()).await?;
        Ok(AsyncSmtpConnection::connect_with_transport(
            Box::new(Encrypted::new(tls, greeting)),
            hello,
        )
        .await?)
    }

    /// The plain-text part of STARTTLS (RFC 3207): the greeting, EHLO, `STARTTLS` and the
    /// relay's go-ahead, read by lettre on a connection of its own over `socket` [`Lent`] one
    /// byte per read. Returns `socket` with nothing read past the go-ahead's line feed, once no
    /// byte is waiting behind it ([`ReadBudget::nothing_waiting`]). The plain-text connection is
    /// dropped here; nothing it read reaches the TLS connection.
    async fn plaintext_phase(
        socket: ReadBudget,
        hello: &ClientId,
    ) -> Result<ReadBudget, RelayError> {
        let slot = Arc::new(Mutex::new(Some(socket)));
        let lent = Lent(Arc::clone(&slot));
        let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(lent), hello).await?;
        if !conn.server_info().supports_feature(Extension::StartTls) {
            conn.abort().await;
            return Err(RelayError::NoStarttls);
        }
        if let Err(e) = conn.command(Starttls).await {
            // As lettre's `starttls`: QUIT and close on a refusal.
            conn.abort().await;
            return Err(e.into());
        }
        drop(conn);
        let mut socket = slot
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .ok_or_else(|| {
                RelayError::Socket(io::Error::other(
                    "the socket lent for STARTTLS was not handed back",
                ))
            })?;
        socket.nothing_waiting()?;
        Ok(socket)
    }
}

/// The relay's TCP socket, delivering at most a fixed number of bytes over its life: each read
/// asks the socket for no more than what is left, and once nothing is left every read fails
/// ([`RelayError::TooMuch`]) and raises `over`, without reading anything.
#[derive(Debug)]
struct ReadBudget {
    inner: TcpStream,
    left: usize,
    over: Arc<AtomicBool>,
}

impl ReadBudget {
    fn new(inner: TcpStream, limit: usize, over: Arc<AtomicBool>) -> Self {
        ReadBudget {
            inner,
            left: limit,
            over,
        }
    }

    /// Checks, without waiting, that no byte from the relay is waiting on the socket: after the
    /// go-ahead to STARTTLS, one is plain text sent before TLS, refused as
    /// [`RelayError::PlaintextAfterStarttls`] (the byte counts against the budget).
    ///
    /// The socket is asked (one non-blocking read) only while tokio holds it readable: tokio
    /// forgets readiness after a read that would block or that filled less than its buffer,
    /// and the go-ahead's line feed came from a one-byte read ([`PLAINTEXT_READ_BYTES`]) that
    /// filled its buffer, so the kernel is asked. A byte that arrives only after this check
    /// goes to rustls as a TLS record, which fails the handshake; it is never a reply. A closed
    /// or failed socket is left to the TLS handshake to report.
    fn nothing_waiting(&mut self) -> Result<(), RelayError> {
        if self.left == 0 {
            self.over.store(true, Ordering::Relaxed);
            return Err(RelayError::TooMuch);
        }
        let mut byte = [0u8; 1];
        match self.inner.try_read(&mut byte) {
            Ok(0) | Err(_) => Ok(()),
            Ok(n) => {
                self.left = self.left.saturating_sub(n);
                Err(RelayError::PlaintextAfterStarttls)
            }
        }
    }
}

impl AsyncRead for ReadBudget {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if self.left == 0 {
            self.over.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::other(RelayError::TooMuch)));
        }
        let this = &mut *self;
        let room = this.left.min(buf.remaining());
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        this.left = this.left.saturating_sub(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadBudget {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for ReadBudget {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }
}

/// The budgeted socket lent to lettre for the plain text before STARTTLS, shared with
/// [`Relay::plaintext_phase`], which takes it back afterwards. Each read hands lettre at most
/// [`PLAINTEXT_READ_BYTES`], so lettre's reader holds nothing past the line it is reading.
#[derive(Debug)]
struct Lent(Arc<Mutex<Option<ReadBudget>>>);

impl Lent {
    /// Runs `f` on the socket, or fails when it has been taken back (or a panic poisoned it).
    fn with<T>(&self, f: impl FnOnce(&mut ReadBudget) -> io::Result<T>) -> io::Result<T> {
        let mut slot = self
            .0
            .lock()
            .map_err(|_| io::Error::other("the lent socket's lock is poisoned"))?;
        match slot.as_mut() {
            Some(socket) => f(socket),
            None => Err(io::Error::other("the lent socket has been taken back")),
        }
    }

    /// [`Lent::with`] for a poll: `f`'s pending stays pending.
    fn poll_with<T>(
        &self,
        f: impl FnOnce(Pin<&mut ReadBudget>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.with(|socket| Ok(f(Pin::new(socket)))) {
            Ok(poll) => poll,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Lent {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining().min(PLAINTEXT_READ_BYTES);
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        ready!(self.poll_with(|socket| socket.poll_read(cx, &mut limited)))?;
        let n = limited.filled().len();
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Lent {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_with(|socket| socket.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_with(|socket| socket.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_with(|socket| socket.poll_shutdown(cx))
    }
}

impl AsyncTokioStream for Lent {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.with(|socket| socket.peer_addr())
    }
}

/// lettre's TLS stream over the budgeted socket, handed back to lettre as the connection's
/// stream: lettre's stream speaks the `futures` I/O traits, a connection is built on the
/// `tokio` ones. Reads deliver `greeting` first (after STARTTLS, [`TLS_GREETING`]; nothing
/// for implicit TLS, where the relay greets inside TLS), then what TLS delivers.
#[allow(deprecated)]
#[derive(Debug)]
struct Encrypted {
    tls: AsyncNetworkStream,
    greeting: &'static [u8],
}

impl Encrypted {
    #[allow(deprecated)]
    fn new(tls: AsyncNetworkStream, greeting: &'static [u8]) -> Self {
        Encrypted { tls, greeting }
    }
}

impl AsyncRead for Encrypted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.greeting.is_empty() {
            let n = self.greeting.len().min(buf.remaining());
            if let Some((now, later)) = self.greeting.split_at_checked(n) {
                buf.put_slice(now);
                self.greeting = later;
                return Poll::Ready(Ok(()));
            }
        }
        let unfilled = buf.initialize_unfilled();
        let room = unfilled.len();
        let n = ready!(futures_util::io::AsyncRead::poll_read(
            Pin::new(&mut self.tls),
            cx,
            unfilled
        ))?;
        if n > room {
            return Poll::Ready(Err(io::Error::other(
                "the TLS stream reported more bytes than it was given room for",
            )));
        }
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Encrypted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        futures_util::io::AsyncWrite::poll_write(Pin::new(&mut self.tls), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_flush(Pin::new(&mut self.tls), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_close(Pin::new(&mut self.tls), cx)
    }
}

impl AsyncTokioStream for Encrypted {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tls.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lettre::transport::smtp::client::CertificateStore;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

    use super::*;

    /// What the scripted relay of [`starttls_relay`] got after its go-ahead to STARTTLS.
    #[derive(Debug, PartialEq, Eq)]
    enum AfterGoAhead {
        /// The first byte of a TLS record (0x16: a handshake, the ClientHello).
        Tls(u8),
        /// The client closed the connection without sending anything.
        Closed,
    }

    /// What the scripted relay of [`starttls_relay`] writes, each in one write.
    #[derive(Clone, Copy)]
    struct Script {
        /// At once on connecting.
        greeting: &'static [u8],
        /// After the client's EHLO.
        ehlo: &'static [u8],
        /// After the client's `STARTTLS`.
        go_ahead: &'static [u8],
        /// 50 ms after the go-ahead, in a TCP segment of its own (nothing when empty).
        late: &'static [u8],
    }

    /// A proper relay offering STARTTLS, its go-ahead alone in its segment.
    const PROPER: Script = Script {
        greeting: b"220 relay ESMTP\r\n",
        ehlo: b"250-relay\r\n250 STARTTLS\r\n",
        go_ahead: b"220 2.0.0 go ahead\r\n",
        late: b"",
    };

    /// A plain-text relay for one connection playing `script`; returns its address and what
    /// the client sent after the go-ahead (and after `late`).
    async fn starttls_relay(script: Script) -> (SocketAddr, tokio::task::JoinHandle<AfterGoAhead>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut s = BufReader::new(s);
            s.get_mut().write_all(script.greeting).await.unwrap();
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            assert!(line.starts_with("EHLO"), "{line}");
            s.get_mut().write_all(script.ehlo).await.unwrap();
            line.clear();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "STARTTLS\r\n");
            s.get_mut().write_all(script.go_ahead).await.unwrap();
            if !script.late.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                // The client may have closed already.
                let _ = s.get_mut().write_all(script.late).await;
            }
            let mut first = [0u8; 1];
            match s.read(&mut first).await {
                Ok(1) => AfterGoAhead::Tls(first[0]),
                _ => AfterGoAhead::Closed,
            }
        });
        (addr, relay)
    }

    /// The engine's STARTTLS exchange with the relay at `addr` (TLS trusting no root: the
    /// handshake, if any, fails).
    async fn send_starttls(addr: SocketAddr) -> Result<Response, RelayError> {
        let parameters = TlsParameters::builder("localhost".into())
            .certificate_store(CertificateStore::None)
            .build_rustls()
            .unwrap();
        let relay = Relay {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: RelayTls::Starttls(parameters),
            credentials: None,
        };
        let address: lettre::Address = "a@example.com".parse().unwrap();
        let envelope = Envelope::new(Some(address.clone()), vec![address]).unwrap();
        tokio::time::timeout(Duration::from_secs(10), relay.send(&envelope, b"x\r\n"))
            .await
            .unwrap()
    }

    /// The relay following `script` sees the connection closed before any TLS, and the send is
    /// refused as tampered with.
    async fn refused_before_tls(script: Script) {
        let (addr, relay) = starttls_relay(script).await;
        let result = send_starttls(addr).await;
        assert!(
            matches!(result, Err(RelayError::PlaintextAfterStarttls)),
            "{result:?}"
        );
        assert_eq!(relay.await.unwrap(), AfterGoAhead::Closed);
    }

    /// The relay following `script` gets a ClientHello, and the send fails in the handshake (the
    /// relay speaks no TLS).
    async fn goes_on_to_tls(script: Script) {
        let (addr, relay) = starttls_relay(script).await;
        let result = send_starttls(addr).await;
        assert_eq!(relay.await.unwrap(), AfterGoAhead::Tls(0x16), "{result:?}");
        assert!(matches!(result, Err(RelayError::Smtp(_))), "{result:?}");
    }

    /// Plain text in the segment of the go-ahead to STARTTLS (an injected reply) closes the
    /// connection before TLS: no ClientHello is sent, and the error says why. Without it, the
    /// same exchange goes on to the TLS handshake.
    #[tokio::test]
    async fn plain_text_after_the_starttls_go_ahead_is_refused_before_tls() {
        refused_before_tls(Script {
            go_ahead: b"220 2.0.0 go ahead\r\n250 injected\r\n",
            ..PROPER
        })
        .await;

        goes_on_to_tls(PROPER).await;
    }

    /// The rest of the injection's class: a multi-line go-ahead is read whole (and what follows
    /// its last line refused), text injected into an earlier segment — pipelined behind the
    /// greeting, ahead of the EHLO reply — is still waiting after the go-ahead and refused, and
    /// text that arrives in a segment of its own after the check goes to TLS, which refuses it:
    /// never a reply.
    #[tokio::test]
    async fn every_way_to_put_plain_text_behind_the_go_ahead_is_refused() {
        // A multi-line go-ahead, clean: on to TLS.
        goes_on_to_tls(Script {
            go_ahead: b"220-2.0.0 go\r\n220 2.0.0 ahead\r\n",
            ..PROPER
        })
        .await;

        // A multi-line go-ahead with an injection behind its last line.
        refused_before_tls(Script {
            go_ahead: b"220-2.0.0 go\r\n220 2.0.0 ahead\r\n250 injected\r\n",
            ..PROPER
        })
        .await;

        // Everything up to the injection sent before the EHLO reply, in the greeting's
        // segment: the relay's own replies come to nothing.
        refused_before_tls(Script {
            greeting: b"220 relay ESMTP\r\n250-relay\r\n250 STARTTLS\r\n\
                        220 2.0.0 go ahead\r\n250 injected\r\n",
            ehlo: b"",
            go_ahead: b"",
            late: b"",
        })
        .await;

        // Injected in a segment of its own, after the go-ahead: the ClientHello has gone, and
        // the injected text fails the TLS handshake.
        goes_on_to_tls(Script {
            late: b"250 injected\r\n",
            ..PROPER
        })
        .await;
    }

    /// The budget delivers exactly its limit, then refuses without reading and raises its flag.
    #[tokio::test]
    async fn the_budget_delivers_its_limit_then_refuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&[b'x'; 100]).await.unwrap();
            s
        });
        let over = Arc::new(AtomicBool::new(false));
        let mut socket = ReadBudget::new(
            TcpStream::connect(addr).await.unwrap(),
            10,
            Arc::clone(&over),
        );
        let _server = server.await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        let refused = loop {
            match socket.read(&mut chunk).await {
                Ok(0) => panic!("end of stream after {} bytes", got.len()),
                Ok(n) => got.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) => break e,
            }
        };
        assert_eq!(got.len(), 10);
        assert!(over.load(Ordering::Relaxed));
        assert!(refused.to_string().contains("more than"), "{refused}");
        // A read into no room is no read, and not a refusal.
        let over = Arc::new(AtomicBool::new(false));
        socket.over = Arc::clone(&over);
        assert_eq!(socket.read(&mut []).await.unwrap(), 0);
        assert!(!over.load(Ordering::Relaxed));
    }
}
