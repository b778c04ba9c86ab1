//! The exchange with the operator's SMTP relay, one connection per message, with every byte the
//! engine reads from the relay bounded by [`MAX_RELAY_READ_BYTES`].
//!
//! Why: lettre reads each reply line into a `String` until its line feed arrives and checks the
//! line's length only then. A relay — or, before STARTTLS, anyone on the network path — that
//! sends `220 ` and then bytes without a line end would have all of them buffered, as fast as
//! the link delivers (hundreds of MB a second on a LAN), until `[mail.smtp] timeout_ms` ends the
//! exchange: a way to run the engine out of memory, once per concurrent mail call.
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

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use lettre::address::Envelope;
use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
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
        Ok(result?)
    }

    /// The SMTP exchange on `socket`, as lettre's transport does it.
    async fn exchange(
        &self,
        socket: ReadBudget,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, SmtpError> {
        // lettre's default, as its transport used: `[127.0.0.1]` without the `hostname` feature.
        let hello = ClientId::default();
        let mut conn = match &self.tls {
            RelayTls::None => {
                AsyncSmtpConnection::connect_with_transport(Box::new(socket), &hello).await?
            }
            RelayTls::Starttls(parameters) => {
                let mut conn =
                    AsyncSmtpConnection::connect_with_transport(Box::new(socket), &hello).await?;
                // Fails when the relay does not offer STARTTLS: no fallback to plain text.
                conn.starttls(parameters.clone(), &hello).await?;
                conn
            }
            RelayTls::Implicit(parameters) => {
                // lettre's own TLS upgrade, the one its transport ran, on the budgeted socket.
                // `AsyncNetworkStream` is deprecated as public API but is what lettre's
                // transport itself uses; its TLS stays lettre's, configured as before.
                #[allow(deprecated)]
                let mut tls = AsyncNetworkStream::use_existing_tokio1(Box::new(socket));
                tls.upgrade_tls(parameters.clone()).await?;
                AsyncSmtpConnection::connect_with_transport(Box::new(Encrypted(tls)), &hello)
                    .await?
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
}

/// The refusal of a read past [`MAX_RELAY_READ_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error("the relay sent more than {MAX_RELAY_READ_BYTES} bytes on one connection")]
struct ReadLimitReached;

/// The relay's TCP socket, delivering at most a fixed number of bytes over its life: each read
/// asks the socket for no more than what is left, and once nothing is left every read fails
/// ([`ReadLimitReached`]) and raises `over`, without reading anything.
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
            return Poll::Ready(Err(io::Error::other(ReadLimitReached)));
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

/// lettre's TLS stream over the budgeted socket (implicit TLS), handed back to lettre as the
/// connection's stream: lettre's stream speaks the `futures` I/O traits, a connection is built
/// on the `tokio` ones.
#[allow(deprecated)]
#[derive(Debug)]
struct Encrypted(AsyncNetworkStream);

impl AsyncRead for Encrypted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        let room = unfilled.len();
        let n = ready!(futures_util::io::AsyncRead::poll_read(
            Pin::new(&mut self.0),
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
        futures_util::io::AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        futures_util::io::AsyncWrite::poll_close(Pin::new(&mut self.0), cx)
    }
}

impl AsyncTokioStream for Encrypted {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

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
