//! A small, honest SMTP server for tests: it speaks enough of RFC 5321 for a real client
//! (`lettre`) — `EHLO`/`HELO`, optional `AUTH PLAIN`/`AUTH LOGIN`, `MAIL FROM`, `RCPT TO`,
//! `DATA` with dot-unstuffing, `RSET`, `NOOP`, `QUIT` — and records every message it accepts,
//! envelope and content, for assertions. It listens on `127.0.0.1` only and never relays.
//!
//! [`SmtpServer::start_lax`] starts one that behaves like the relays SMTP smuggling works
//! against: it ends a message's data at a `.` line with any mix of bare CR, bare LF and CRLF
//! around it (`LF.LF`, `CR.CR`, `LF.CRLF`, ...) and reads whatever follows as new commands, so a
//! client that lets such a sequence through lets its data start a second transaction — which
//! the server records like any other.
//!
//! [`FloodingRelay`] is a hostile relay of another kind: it floods its client with a reply that
//! never ends, to show how much of it the client reads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Longest command or data line accepted (RFC 5321 §4.5.3.1.6 allows 1000 with CRLF).
const MAX_LINE_BYTES: usize = 4096;

/// Largest message accepted (advertised as `SIZE`).
const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// Commands one connection may send before it is closed.
const MAX_COMMANDS: usize = 1000;

/// Most bytes [`FloodingRelay`] writes on one connection: far beyond any real SMTP exchange, and
/// still small enough that the test machine survives a client that buffers all of it.
pub const FLOOD_CAP_BYTES: u64 = 256 * 1024 * 1024;

/// More than a [`FloodingRelay`] can have written into the socket buffers between it and a client
/// that stopped reading (loopback buffers grow to tens of MiB), and far less than
/// [`FLOOD_CAP_BYTES`]: a flood that got this far was being read.
pub const FLOOD_SLACK_BYTES: u64 = 64 * 1024 * 1024;

// The bound tells a read flood from a refused one only while the flood is much larger.
const _: () = assert!(FLOOD_SLACK_BYTES * 2 < FLOOD_CAP_BYTES);

/// What [`FloodingRelay`] writes at a time.
const FLOOD_CHUNK_BYTES: usize = 64 * 1024;

/// Where [`FloodingRelay`] starts its flood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// The greeting: `220 ` and then `x` without end, never a line end — what a relay, or anyone
    /// on the path before STARTTLS, can send before the client has said a word.
    Greeting,
    /// The reply to `EHLO`, after a proper greeting: `250-` and then `x` without end.
    EhloReply,
    /// The reply to `DATA`, after a proper greeting, EHLO reply and `250` to every `MAIL` and
    /// `RCPT`: `354-` and then `x` without end.
    DataReply,
}

/// A hostile SMTP relay on `127.0.0.1` that answers every connection with a reply line that
/// never ends ([`Flood`]): `x` after `x`, with no line end, up to [`FLOOD_CAP_BYTES`]. A client
/// that buffers a reply line until its LF buffers all of it. For each connection it records how
/// many bytes the client's kernel took before the client closed the connection (a write failed)
/// or the cap was reached — what the client read, plus at most the socket buffers between
/// them. Stopped when dropped.
pub struct FloodingRelay {
    server: Recording<u64>,
}

impl FloodingRelay {
    /// Starts a relay flooding at `flood`.
    pub async fn start(flood: Flood) -> std::io::Result<FloodingRelay> {
        let server =
            Recording::start(move |stream, store| flood_session(stream, flood, store)).await?;
        Ok(FloodingRelay { server })
    }

    /// `127.0.0.1`.
    pub fn host(&self) -> String {
        self.server.host()
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// The bytes written on each connection whose flood has ended, in the order they ended.
    pub fn floods(&self) -> Vec<u64> {
        self.server.records()
    }

    /// Waits up to `timeout` for at least `count` floods to end and returns them.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<u64> {
        self.server.wait_for(count, timeout).await
    }
}

/// A server on `127.0.0.1` that runs one session per connection and keeps what the sessions
/// record; stopped when dropped. What [`SmtpServer`] and [`FloodingRelay`] share.
struct Recording<T> {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<T>>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl<T: Clone + Send + 'static> Recording<T> {
    /// Binds a port and runs `session` on each connection, with the shared record store.
    async fn start<F, Fut>(session: F) -> std::io::Result<Recording<T>>
    where
        F: Fn(TcpStream, Arc<Mutex<Vec<T>>>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = oneshot::channel::<()>();
        let store = Arc::clone(&records);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        tokio::spawn(session(stream, Arc::clone(&store)));
                    }
                }
            }
        });
        Ok(Recording {
            addr,
            records,
            shutdown: Some(tx),
        })
    }

    fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Everything recorded so far.
    fn records(&self) -> Vec<T> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for at least `count` records and returns what there is.
    async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let records = self.records();
            if records.len() >= count || tokio::time::Instant::now() >= deadline {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl<T> Drop for Recording<T> {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// One connection of [`FloodingRelay`]: the flood, its size recorded when a write fails or the
/// cap is reached, then (after the cap) the connection held open until the client closes it.
async fn flood_session(stream: TcpStream, flood: Flood, floods: Arc<Mutex<Vec<u64>>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = Reader {
        read,
        buf: Vec::new(),
    };
    let start: &[u8] = match flood {
        Flood::Greeting => b"220 ",
        Flood::EhloReply | Flood::DataReply => {
            if write
                .write_all(b"220 jobhook-testkit ESMTP ready\r\n")
                .await
                .is_err()
            {
                return;
            }
            loop {
                let Ok(Some(line)) = lines.read_line().await else {
                    return;
                };
                let command = line.to_ascii_uppercase();
                if flood == Flood::EhloReply || command.starts_with("DATA") {
                    break;
                }
                if write.write_all(b"250 ok\r\n").await.is_err() {
                    return;
                }
            }
            if flood == Flood::EhloReply {
                b"250-"
            } else {
                b"354-"
            }
        }
    };
    let mut written = 0u64;
    let mut closed = write.write_all(start).await.is_err();
    let chunk = vec![b'x'; FLOOD_CHUNK_BYTES];
    while !closed && written < FLOOD_CAP_BYTES {
        match write.write(&chunk).await {
            Ok(0) | Err(_) => closed = true,
            Ok(n) => written += n as u64,
        }
    }
    if let Ok(mut floods) = floods.lock() {
        floods.push(written);
    }
    if !closed {
        let mut buf = [0u8; 1024];
        while matches!(lines.read.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// One message the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The `EHLO`/`HELO` argument.
    pub helo: String,
    /// The `MAIL FROM` address (without brackets).
    pub mail_from: String,
    /// The `RCPT TO` addresses (without brackets), in order.
    pub rcpt_to: Vec<String>,
    /// The user and password of a successful `AUTH`, if any.
    pub auth: Option<(String, String)>,
    /// The message as transmitted (headers and body, CRLF line ends, dots unstuffed).
    pub data: String,
}

impl ReceivedMail {
    /// The value of the first header named `name` (any case), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or_default();
        let mut found: Option<String> = None;
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some(value) = found.as_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                continue;
            }
            if found.is_some() {
                break;
            }
            if let Some((key, value)) = line.split_once(':')
                && key.eq_ignore_ascii_case(name)
            {
                found = Some(value.trim().to_owned());
            }
        }
        found
    }

    /// The body, with quoted-printable or base64 transfer encoding undone.
    pub fn body(&self) -> String {
        let body = self
            .data
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        match self
            .header("Content-Transfer-Encoding")
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("quoted-printable") => decode_quoted_printable(body),
            Some("base64") => {
                let compact: String = body.split_whitespace().collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            }
            _ => body.to_owned(),
        }
    }
}

fn decode_quoted_printable(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'=' if bytes.get(i + 1..i + 3) == Some(b"\r\n") => i += 3,
            b'=' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'=');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How the server finds the end of a message's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndOfData {
    /// A line holding only `.`, lines ending at LF (with or without CR before it).
    #[default]
    Lines,
    /// Also a `.` between bare CRs: any of CR, LF and CRLF before and after the dot ends the
    /// data, like relays vulnerable to SMTP smuggling; what follows is read as commands.
    Lax,
}

/// A running SMTP server on `127.0.0.1`; stopped when dropped.
pub struct SmtpServer {
    server: Recording<ReceivedMail>,
}

impl SmtpServer {
    /// Starts a server that accepts mail without authentication.
    pub async fn start() -> std::io::Result<SmtpServer> {
        Self::start_inner(None, EndOfData::Lines).await
    }

    /// Starts a server that accepts mail without authentication and ends data at the lax forms
    /// of end-of-data ([`EndOfData::Lax`]), like relays SMTP smuggling works against.
    pub async fn start_lax() -> std::io::Result<SmtpServer> {
        Self::start_inner(None, EndOfData::Lax).await
    }

    /// Starts a server that advertises `AUTH PLAIN LOGIN` and requires these credentials.
    pub async fn start_with_auth(user: &str, password: &str) -> std::io::Result<SmtpServer> {
        Self::start_inner(
            Some((user.to_owned(), password.to_owned())),
            EndOfData::Lines,
        )
        .await
    }

    async fn start_inner(
        auth: Option<(String, String)>,
        end_of_data: EndOfData,
    ) -> std::io::Result<SmtpServer> {
        let server = Recording::start(move |stream, store| {
            let auth = auth.clone();
            async move {
                let _ = session(stream, store, auth, end_of_data).await;
            }
        })
        .await?;
        Ok(SmtpServer { server })
    }

    /// `127.0.0.1`.
    pub fn host(&self) -> String {
        self.server.host()
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Every message accepted so far.
    pub fn received(&self) -> Vec<ReceivedMail> {
        self.server.records()
    }

    /// Waits up to `timeout` for at least `count` messages and returns what arrived.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<ReceivedMail> {
        self.server.wait_for(count, timeout).await
    }
}

async fn session(
    stream: TcpStream,
    store: Arc<Mutex<Vec<ReceivedMail>>>,
    required_auth: Option<(String, String)>,
    end_of_data: EndOfData,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = Reader {
        read,
        buf: Vec::new(),
    };
    write
        .write_all(b"220 jobhook-testkit ESMTP ready\r\n")
        .await?;

    let mut helo = String::new();
    let mut authenticated: Option<(String, String)> = None;
    let mut mail_from: Option<String> = None;
    let mut rcpt_to: Vec<String> = Vec::new();

    for _ in 0..MAX_COMMANDS {
        let Some(line) = lines.read_line().await? else {
            return Ok(());
        };
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO ") || upper.starts_with("HELO ") {
            helo = line.get(5..).unwrap_or_default().trim().to_owned();
            mail_from = None;
            rcpt_to.clear();
            if upper.starts_with("HELO") {
                "250 jobhook-testkit\r\n".into()
            } else {
                let auth = if required_auth.is_some() {
                    "250-AUTH PLAIN LOGIN\r\n"
                } else {
                    ""
                };
                format!(
                    "250-jobhook-testkit\r\n250-8BITMIME\r\n{auth}250 SIZE {MAX_MESSAGE_BYTES}\r\n"
                )
            }
        } else if upper.starts_with("AUTH PLAIN") {
            let initial = line.get(10..).unwrap_or_default().trim().to_owned();
            let encoded = if initial.is_empty() {
                write.write_all(b"334 \r\n").await?;
                lines.read_line().await?.unwrap_or_default()
            } else {
                initial
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .unwrap_or_default();
            let parts: Vec<String> = decoded
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let pair = match parts.as_slice() {
                [_, user, pass] => Some((user.clone(), pass.clone())),
                _ => None,
            };
            check_auth(pair, &required_auth, &mut authenticated)
        } else if upper.starts_with("AUTH LOGIN") {
            write.write_all(b"334 VXNlcm5hbWU6\r\n").await?;
            let user = decode_b64(&lines.read_line().await?.unwrap_or_default());
            write.write_all(b"334 UGFzc3dvcmQ6\r\n").await?;
            let pass = decode_b64(&lines.read_line().await?.unwrap_or_default());
            check_auth(Some((user, pass)), &required_auth, &mut authenticated)
        } else if upper.starts_with("MAIL FROM:") {
            if helo.is_empty() {
                "503 5.5.1 EHLO first\r\n".into()
            } else if required_auth.is_some() && authenticated.is_none() {
                "530 5.7.0 Authentication required\r\n".into()
            } else {
                mail_from = Some(path_arg(line.get(10..).unwrap_or_default()));
                rcpt_to.clear();
                "250 2.1.0 OK\r\n".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            if mail_from.is_none() {
                "503 5.5.1 MAIL first\r\n".into()
            } else {
                rcpt_to.push(path_arg(line.get(8..).unwrap_or_default()));
                "250 2.1.5 OK\r\n".into()
            }
        } else if upper == "DATA" {
            if rcpt_to.is_empty() {
                "503 5.5.1 RCPT first\r\n".into()
            } else {
                write
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut data = String::new();
                let mut too_large = false;
                if end_of_data == EndOfData::Lax {
                    match lines.read_lax_data().await? {
                        Some(Some(raw)) => data = raw,
                        Some(None) => too_large = true,
                        None => return Ok(()),
                    }
                }
                let mut reading = end_of_data == EndOfData::Lines;
                while reading {
                    let Some(line) = lines.read_line().await? else {
                        return Ok(());
                    };
                    if line == "." {
                        reading = false;
                        continue;
                    }
                    let line = line.strip_prefix('.').unwrap_or(&line);
                    if data.len() + line.len() + 2 > MAX_MESSAGE_BYTES {
                        too_large = true;
                        continue;
                    }
                    data.push_str(line);
                    data.push_str("\r\n");
                }
                if too_large {
                    "552 5.3.4 Message too big\r\n".into()
                } else {
                    let mail = ReceivedMail {
                        helo: helo.clone(),
                        mail_from: mail_from.take().unwrap_or_default(),
                        rcpt_to: std::mem::take(&mut rcpt_to),
                        auth: authenticated.clone(),
                        data,
                    };
                    if let Ok(mut store) = store.lock() {
                        store.push(mail);
                    }
                    "250 2.0.0 OK queued\r\n".into()
                }
            }
        } else if upper == "RSET" {
            mail_from = None;
            rcpt_to.clear();
            "250 2.0.0 OK\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK\r\n".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Command not implemented\r\n".into()
        };
        write.write_all(reply.as_bytes()).await?;
    }
    write.write_all(b"421 4.7.0 Too many commands\r\n").await?;
    Ok(())
}

fn check_auth(
    pair: Option<(String, String)>,
    required: &Option<(String, String)>,
    authenticated: &mut Option<(String, String)>,
) -> String {
    match (pair, required) {
        (Some(pair), Some(required)) if &pair == required => {
            *authenticated = Some(pair);
            "235 2.7.0 Authentication successful\r\n".into()
        }
        (_, None) => "503 5.5.1 AUTH not advertised\r\n".into(),
        _ => "535 5.7.8 Authentication credentials invalid\r\n".into(),
    }
}

fn decode_b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// `<a@b> SIZE=123` -> `a@b`.
fn path_arg(arg: &str) -> String {
    let arg = arg.trim();
    let path = arg.split_whitespace().next().unwrap_or_default();
    path.trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

/// The reading half of a connection with the bytes read but not yet consumed: what follows a
/// lax end-of-data stays here and is read as commands.
struct Reader {
    read: OwnedReadHalf,
    buf: Vec<u8>,
}

impl Reader {
    /// Reads more bytes; `false` at end of stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), self.read.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow"))??;
        self.buf
            .extend_from_slice(chunk.get(..n).unwrap_or_default());
        Ok(n > 0)
    }

    /// One LF-terminated line (at most [`MAX_LINE_BYTES`]), without CR/LF at its end; `None`
    /// at end of stream.
    async fn read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            let end = self.buf.iter().position(|b| *b == b'\n');
            let take = match end {
                Some(i) => Some(i + 1),
                None if self.buf.len() >= MAX_LINE_BYTES => Some(MAX_LINE_BYTES),
                None => None,
            };
            if let Some(take) = take {
                let mut line: Vec<u8> = self.buf.drain(..take).collect();
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let line: Vec<u8> = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
        }
    }

    /// A message's data up to the first lax end-of-data (a `.` with CR, LF or CRLF on each
    /// side, or at the very start), dots unstuffed; `Some(None)` when it is larger than
    /// [`MAX_MESSAGE_BYTES`], `None` at end of stream. The bytes after the terminator stay
    /// buffered as commands.
    async fn read_lax_data(&mut self) -> std::io::Result<Option<Option<String>>> {
        loop {
            if let Some((dot, after)) = lax_end(&self.buf) {
                let raw: Vec<u8> = self.buf.drain(..after).collect();
                let data = raw.get(..dot).unwrap_or_default();
                let mut out = Vec::with_capacity(data.len());
                for (i, &b) in data.iter().enumerate() {
                    let line_start = i == 0 || matches!(data.get(i - 1), Some(b'\r' | b'\n'));
                    if !(b == b'.' && line_start) {
                        out.push(b);
                    }
                }
                return Ok(Some(Some(String::from_utf8_lossy(&out).into_owned())));
            }
            if self.buf.len() > MAX_MESSAGE_BYTES + MAX_LINE_BYTES {
                self.buf.clear();
                return Ok(Some(None));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

/// The first lax end-of-data in `data`: the index of its `.` and the index just after it.
fn lax_end(data: &[u8]) -> Option<(usize, usize)> {
    let eol = |b: Option<&u8>| matches!(b, Some(b'\r' | b'\n'));
    (0..data.len()).find_map(|i| {
        let starts_line = i == 0 || eol(data.get(i - 1));
        if data.get(i) != Some(&b'.') || !starts_line || !eol(data.get(i + 1)) {
            return None;
        }
        let after = if data.get(i + 1..i + 3) == Some(b"\r\n") {
            i + 3
        } else {
            i + 2
        };
        Some((i, after))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_unfold_and_bodies_decode() {
        let mail = ReceivedMail {
            helo: String::new(),
            mail_from: String::new(),
            rcpt_to: vec![],
            auth: None,
            data: "Subject: a\r\n b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nx=3Dy=\r\nz\r\n".into(),
        };
        assert_eq!(mail.header("subject").as_deref(), Some("a b"));
        assert_eq!(mail.body(), "x=yz\r\n");
    }

    #[test]
    fn lax_end_of_data_forms() {
        assert_eq!(lax_end(b"a\r\n.\r\nMAIL"), Some((3, 6)));
        assert_eq!(lax_end(b"a\n.\nMAIL"), Some((2, 4)));
        assert_eq!(lax_end(b"a\r.\rMAIL"), Some((2, 4)));
        assert_eq!(lax_end(b"a\n.\r\nMAIL"), Some((2, 5)));
        assert_eq!(lax_end(b".\r\n"), Some((0, 3)));
        assert_eq!(lax_end(b"a\r\n..x\r\n"), None);
        assert_eq!(lax_end(b"a.\r\n"), None);
    }
}
