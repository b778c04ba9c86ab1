//! Which forwarders deliver, and when each last did: `X-Jobhook-Forwarder: <name>` on
//! `POST /v1/job-complete`, shown by `GET /v1/forwarders`.
//!
//! An operator with several Keyfactor servers, each running the forwarder, wants to see that
//! every one of them is still sending. The record is in memory (per node, since the process
//! started), bounded by [`MAX_FORWARDERS`]; names are client input, so they are checked
//! ([`name_of`]) and never become metric labels — the metrics show how many forwarders are
//! known and how long the quietest one has been silent.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// The request header that names the forwarder.
pub const FORWARDER_HEADER: &str = "x-jobhook-forwarder";

/// Longest forwarder name recorded, in bytes: a host name (at most 253) fits.
pub const MAX_FORWARDER_NAME_BYTES: usize = 253;

/// Most forwarders remembered. A site has one per Keyfactor server, a handful; the bound keeps a
/// client that invents names from growing the engine's memory. When it is full, a new name is
/// recorded only in place of one silent for longer than [`FORGET_SILENT_AFTER`]; otherwise it is
/// not recorded (its events are accepted all the same). Forgetting the quietest at once would
/// let a client inventing names push out exactly the forwarder that has gone silent — the one
/// the silence gauge is there to show.
pub const MAX_FORWARDERS: usize = 1024;

/// How long a forwarder stays listed after its last event when the list is full: long past any
/// outage an operator would still be looking into.
pub const FORGET_SILENT_AFTER: chrono::Duration = chrono::Duration::days(30);

/// A forwarder as shown by `GET /v1/forwarders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForwarderView {
    /// Its name, as it sent it.
    pub name: String,
    /// When this node last accepted an event from it (`202`, including answers to resends).
    pub last_accepted_at: DateTime<Utc>,
    /// How many of its requests this node accepted since it started.
    pub accepted: u64,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    last: DateTime<Utc>,
    count: u64,
}

/// The forwarders this node has heard from.
#[derive(Debug, Default)]
pub struct Forwarders {
    seen: Mutex<HashMap<String, Seen>>,
}

/// The request's forwarder name: the `X-Jobhook-Forwarder` header when it is sent once and is 1
/// to [`MAX_FORWARDER_NAME_BYTES`] visible ASCII characters; else `None` (nothing is recorded,
/// the event itself is still accepted: a name is bookkeeping, not input).
pub fn name_of(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(FORWARDER_HEADER).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let bytes = value.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= MAX_FORWARDER_NAME_BYTES
        && bytes.iter().all(u8::is_ascii_graphic);
    valid
        .then(|| std::str::from_utf8(bytes).ok().map(str::to_owned))
        .flatten()
}

impl Forwarders {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an accepted request of `name` at `now`.
    pub fn accepted(&self, name: &str, now: DateTime<Utc>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = seen.get_mut(name) {
            entry.last = entry.last.max(now);
            entry.count = entry.count.saturating_add(1);
            return;
        }
        if seen.len() >= MAX_FORWARDERS {
            let forgettable = seen
                .iter()
                .min_by_key(|(_, s)| s.last)
                .filter(|(_, s)| now.signed_duration_since(s.last) > FORGET_SILENT_AFTER)
                .map(|(n, _)| n.clone());
            match forgettable {
                Some(quietest) => {
                    seen.remove(&quietest);
                }
                None => return,
            }
        }
        seen.insert(
            name.to_owned(),
            Seen {
                last: now,
                count: 1,
            },
        );
    }

    /// Every forwarder, by name.
    pub fn list(&self) -> Vec<ForwarderView> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<ForwarderView> = seen
            .iter()
            .map(|(name, s)| ForwarderView {
                name: name.clone(),
                last_accepted_at: s.last,
                accepted: s.count,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// How many forwarders are known, and how long (seconds before `now`) the quietest one has
    /// been silent (0 when none is known).
    pub fn summary(&self, now: DateTime<Utc>) -> (usize, f64) {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let silence = seen
            .values()
            .map(|s| (now - s.last).num_milliseconds().max(0))
            .max()
            .unwrap_or(0);
        (seen.len(), silence as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn named(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(FORWARDER_HEADER, HeaderValue::from_bytes(value).unwrap());
        headers
    }

    #[test]
    fn names_are_bounded_visible_ascii_or_nothing() {
        assert_eq!(name_of(&HeaderMap::new()), None);
        assert_eq!(name_of(&named(b"kf-01.lab")), Some("kf-01.lab".into()));
        assert_eq!(name_of(&named(b"")), None);
        assert_eq!(name_of(&named(b"two words")), None);
        assert_eq!(name_of(&named("k\u{e9}".as_bytes())), None);
        // Every other byte a header value can carry that is not visible ASCII: TAB, obs-text
        // (C1 controls such as CSI 0x9b, Latin-1, 0xff).
        for bad in [&b"tab\there"[..], b"csi\x9b[2J", b"\x80", b"\xff"] {
            assert_eq!(name_of(&named(bad)), None, "{bad:?}");
        }
        let longest = vec![b'n'; MAX_FORWARDER_NAME_BYTES];
        assert_eq!(
            name_of(&named(&longest)),
            Some("n".repeat(MAX_FORWARDER_NAME_BYTES))
        );
        assert_eq!(
            name_of(&named(&vec![b'n'; MAX_FORWARDER_NAME_BYTES + 1])),
            None
        );
        let mut twice = named(b"a");
        twice.append(FORWARDER_HEADER, HeaderValue::from_static("b"));
        assert_eq!(name_of(&twice), None);
    }

    #[test]
    fn counts_last_times_and_forgets_only_the_long_silent_when_full() {
        let forwarders = Forwarders::new();
        let t0 = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        forwarders.accepted("old", t0);
        for n in 1..MAX_FORWARDERS {
            forwarders.accepted(&format!("f{n}"), t0 + chrono::Duration::seconds(10));
        }
        forwarders.accepted("f1", t0 + chrono::Duration::seconds(20));
        let list = forwarders.list();
        assert_eq!(list.len(), MAX_FORWARDERS);
        let f1 = list.iter().find(|f| f.name == "f1").unwrap();
        assert_eq!(f1.accepted, 2);
        assert_eq!(f1.last_accepted_at, t0 + chrono::Duration::seconds(20));
        assert_eq!(
            forwarders.summary(t0 + chrono::Duration::seconds(30)),
            (MAX_FORWARDERS, 30.0)
        );
        // Full, and nobody silent for long: a new name is not recorded, and the silent one
        // stays listed (a client inventing names cannot push it out).
        forwarders.accepted("new", t0 + chrono::Duration::seconds(40));
        let names: Vec<String> = forwarders.list().into_iter().map(|f| f.name).collect();
        assert_eq!(names.len(), MAX_FORWARDERS);
        assert!(!names.contains(&"new".to_owned()));
        assert!(names.contains(&"old".to_owned()), "the silent one stays");
        // Once the quietest has been silent past FORGET_SILENT_AFTER, it makes room.
        let later = t0 + FORGET_SILENT_AFTER + chrono::Duration::seconds(1);
        forwarders.accepted("new", later);
        let names: Vec<String> = forwarders.list().into_iter().map(|f| f.name).collect();
        assert_eq!(names.len(), MAX_FORWARDERS);
        assert!(names.contains(&"new".to_owned()));
        assert!(
            !names.contains(&"old".to_owned()),
            "the quietest is forgotten"
        );
    }
}
