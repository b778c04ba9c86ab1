//! Idempotent ingest: the `Idempotency-Key` header of `POST /v1/job-complete`.
//!
//! The Keyfactor forwarder spools every context and resends it after a timeout, with a key it
//! made for that event. The first request with a key commits the event; any later one with the
//! same key — after a lost answer, a restart of the engine, or on another node of a shared
//! store — within the retention window is answered `202` with the original `event_id` and
//! deliveries and commits nothing ([`crate::queue::store::EventStore::insert_event_once`]).
//!
//! A key is compared with the event it was first used for by a SHA-256 of the *decoded*
//! context ([`crate::queue::store::fingerprint`]): a resend that differs only in whitespace,
//! field order or casing is the same event; the same key with another context is refused
//! (`409`), because answering it with the first event would silently lose the second.
//!
//! Keys live for [`DEFAULT_RETENTION`] (or `[server] idempotency_retention_ms`); a key first used
//! longer ago counts as new, and [`purge_expired`] deletes expired keys in the background.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;

use crate::queue::store::{EventStore, MAX_PURGE_BATCH};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Longest key accepted, in bytes. A UUID, a ULID or "forwarder/spool-file/sequence" fit many
/// times over; the bound keeps one key a small, fixed-size row in the unique index.
pub const MAX_KEY_BYTES: usize = 255;

/// How long a key holds by default: 7 days. The forwarder resends from its spool for as long
/// as the engine is unreachable; a week covers a long weekend of outage with margin, and the
/// keys of a week at 100 events/s (~60 million short rows) are still a modest table.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Shortest retention the configuration accepts: a forwarder's resend timeout is seconds.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);

/// Longest retention the configuration accepts (a year): beyond it the key table only grows.
pub const MAX_RETENTION: Duration = Duration::from_secs(366 * 24 * 3600);

/// How often each node looks for expired keys.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Pause between two purge batches, so that a large backlog of expired keys (after a
/// retention was shortened) is deleted without crowding out ingest commits.
const PURGE_PAUSE: Duration = Duration::from_millis(50);

/// Why an `Idempotency-Key` header was refused; the message says what to send instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header was sent more than once.
    #[error("send one Idempotency-Key header, not several")]
    Repeated,
    /// The header is empty.
    #[error(
        "the Idempotency-Key header is empty; send 1 to {MAX_KEY_BYTES} visible ASCII characters, or no header"
    )]
    Empty,
    /// The header is longer than [`MAX_KEY_BYTES`].
    #[error("the Idempotency-Key header is {0} bytes long; at most {MAX_KEY_BYTES} are accepted")]
    TooLong(usize),
    /// The header holds something else than visible ASCII.
    #[error(
        "the Idempotency-Key header may hold only visible ASCII characters (no spaces, no \
         control characters, no non-ASCII); e.g. a UUID"
    )]
    NotVisibleAscii,
}

/// The request's idempotency key: `None` without the header, else the key if it is 1 to
/// [`MAX_KEY_BYTES`] visible ASCII characters (`!` to `~`).
pub fn key_of(headers: &HeaderMap) -> Result<Option<String>, KeyError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(KeyError::Empty);
    }
    if bytes.len() > MAX_KEY_BYTES {
        return Err(KeyError::TooLong(bytes.len()));
    }
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(KeyError::NotVisibleAscii);
    }
    // Visible ASCII is UTF-8.
    Ok(std::str::from_utf8(bytes).ok().map(str::to_owned))
}

/// Deletes the keys older than `retention`, every [`PURGE_INTERVAL`], in batches of
/// [`MAX_PURGE_BATCH`]; runs until the task is dropped. Errors are logged and retried at the
/// next interval.
pub async fn purge_expired(store: Arc<dyn EventStore>, retention: Duration) {
    let mut interval = tokio::time::interval(PURGE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        loop {
            let before = chrono::Duration::from_std(retention)
                .ok()
                .and_then(|r| store.now().checked_sub_signed(r))
                .unwrap_or_default();
            let store = Arc::clone(&store);
            let purged = tokio::task::spawn_blocking(move || {
                store.purge_idempotency_keys(before, MAX_PURGE_BATCH)
            })
            .await;
            match purged {
                Ok(Ok(n)) => {
                    if n > 0 {
                        tracing::debug!(purged = n, "expired idempotency keys deleted");
                    }
                    if n < MAX_PURGE_BATCH as u64 {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!("cannot purge expired idempotency keys (will retry): {e}");
                    break;
                }
                Err(e) => {
                    tracing::warn!("the idempotency key purge failed (will retry): {e}");
                    break;
                }
            }
            tokio::time::sleep(PURGE_PAUSE).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_bytes(v).unwrap());
        }
        headers
    }

    #[test]
    fn keys_are_one_bounded_run_of_visible_ascii() {
        assert_eq!(key_of(&HeaderMap::new()), Ok(None));
        assert_eq!(
            key_of(&with(&[b"fwd-1/0b4b411a:7"])),
            Ok(Some("fwd-1/0b4b411a:7".into()))
        );
        let longest = vec![b'k'; MAX_KEY_BYTES];
        assert_eq!(
            key_of(&with(&[&longest])),
            Ok(Some("k".repeat(MAX_KEY_BYTES)))
        );
        let too_long = vec![b'k'; MAX_KEY_BYTES + 1];
        assert_eq!(
            key_of(&with(&[&too_long])),
            Err(KeyError::TooLong(MAX_KEY_BYTES + 1))
        );
        assert_eq!(key_of(&with(&[b""])), Err(KeyError::Empty));
        assert_eq!(key_of(&with(&[b"a", b"b"])), Err(KeyError::Repeated));
        for bad in [
            &b"a b"[..],
            b"tab\there",
            "caf\u{e9}".as_bytes(),
            b"csi\x9b[2J",
            b"\x80",
            b"\xff",
        ] {
            assert_eq!(
                key_of(&with(&[bad])),
                Err(KeyError::NotVisibleAscii),
                "{bad:?}"
            );
        }
    }
}
