//! Bounded capture of a handler's stdout and stderr.
//!
//! wasmtime's `MemoryOutputPipe` traps the guest once it is full; a handler that prints too much
//! should lose output, not its run. `CappedOutput` keeps the first bytes up to its capacity and
//! counts the rest. It implements the WASI p2 stream directly (not through wasmtime's
//! `AsyncWriteStream` adapter, see GHSA-5m8g-xhq4-4h93).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How many bytes the guest is told it may write at once.
const WRITE_PERMIT: usize = 64 * 1024;

/// A bounded, shareable output buffer for one sandbox's stdout or stderr.
#[derive(Debug, Clone)]
pub struct CappedOutput {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    buffer: Mutex<Vec<u8>>,
    dropped: AtomicU64,
}

impl CappedOutput {
    /// An empty buffer keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        CappedOutput {
            inner: Arc::new(Inner {
                capacity,
                buffer: Mutex::new(Vec::new()),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    fn append(&self, bytes: &[u8]) {
        let mut buffer = self
            .inner
            .buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let room = self.inner.capacity.saturating_sub(buffer.len());
        let kept = bytes.len().min(room);
        buffer.extend_from_slice(bytes.get(..kept).unwrap_or_default());
        let lost = (bytes.len() - kept) as u64;
        if lost > 0 {
            self.inner.dropped.fetch_add(lost, Ordering::Relaxed);
        }
    }

    /// What was kept, as lossy UTF-8.
    pub fn contents(&self) -> String {
        let buffer = self
            .inner
            .buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        String::from_utf8_lossy(&buffer).into_owned()
    }

    /// Bytes written past the capacity.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_the_rest() {
        let out = CappedOutput::new(5);
        let mut stream = out.p2_stream();
        stream.write(Bytes::from_static(b"abc")).unwrap();
        stream.write(Bytes::from_static(b"defgh")).unwrap();
        stream.write(Bytes::from_static(b"ij")).unwrap();
        assert_eq!(out.contents(), "abcde");
        assert_eq!(out.dropped(), 5);
    }
}
