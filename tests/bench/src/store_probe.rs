//! `jobhook-bench store-probe`: what the SQLite store costs per delivery, without HTTP, sandboxes
//! or threads — claims and finishes one after another on one thread, with a real outcome
//! (`log-context`'s) recorded each time: first one delivery per transaction, then in batches as
//! the dispatcher makes them. It separates the store's own cost from the dispatcher's (thread
//! hand-overs, sandbox, metrics) when reading scenario c's deliveries/s.

use std::time::{Duration, Instant};

use jobhook::queue::store::sqlite::SqliteStore;
use jobhook::queue::store::{
    AttemptRecord, ClaimLimits, DeliveryState, EventStore, MAX_CLAIM_BATCH, NewEvent,
};
use jobhook::{Delivery, JobContext};

use crate::delivery::DeliveryRig;
use crate::stats::Summary;

/// Events inserted (each with four deliveries).
const EVENTS: usize = 2_500;

/// The claim lease (as the dispatcher's).
const LEASE: Duration = Duration::from_secs(60);

/// Runs the probe and prints per-operation medians.
pub fn run() -> anyhow::Result<()> {
    let rig = DeliveryRig::new()?;
    let outcome = rig
        .runtime
        .block_on(rig.log_context.invoke(&rig.context, Delivery::default()));
    let dir = crate::runs_dir().join("store-probe");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let store = SqliteStore::open(&dir)?;
    let handlers: Vec<String> = (1..=4).map(|i| format!("healthy-{i}")).collect();
    let context: JobContext = rig.context.clone();
    let insert_start = Instant::now();
    let mut insert = Vec::with_capacity(EVENTS);
    for _ in 0..EVENTS {
        let t = Instant::now();
        store.insert_event(&NewEvent {
            id: uuid::Uuid::new_v4(),
            source: "probe".into(),
            context: context.clone(),
            message: None,
            handlers: handlers.clone(),
        })?;
        insert.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let insert_total = insert_start.elapsed();
    let (mut claim, mut finish) = (Vec::new(), Vec::new());
    let start = Instant::now();
    loop {
        let t = Instant::now();
        let Some(c) = store.claim(chrono::Utc::now(), &[], LEASE)? else {
            break;
        };
        claim.push(t.elapsed().as_secs_f64() * 1e6);
        let record = AttemptRecord {
            state: DeliveryState::Succeeded,
            retry_at: None,
            class: "succeeded".into(),
            reason: None,
            outcome: Some(outcome.clone()),
        };
        let t = Instant::now();
        store.finish(&c, &record)?;
        finish.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = start.elapsed();
    let (i, c, f) = (
        Summary::of(&insert),
        Summary::of(&claim),
        Summary::of(&finish),
    );
    println!("load average: {}", crate::machine::load_average());
    println!(
        "insert_event (synchronous=FULL, one at a time): median {:.0} µs, p99 {:.0} µs; {:.0} events/s",
        i.p50,
        i.p99,
        EVENTS as f64 / insert_total.as_secs_f64()
    );
    println!("claim:  median {:.0} µs, p99 {:.0} µs", c.p50, c.p99);
    println!("finish: median {:.0} µs, p99 {:.0} µs", f.p50, f.p99);
    println!(
        "{} deliveries claimed and finished on one thread in {:.2} s: {:.0} deliveries/s",
        c.n,
        total.as_secs_f64(),
        c.n as f64 / total.as_secs_f64()
    );
    // The same again, in batches of MAX_CLAIM_BATCH claims and as many finishes.
    for _ in 0..EVENTS {
        store.insert_event(&NewEvent {
            id: uuid::Uuid::new_v4(),
            source: "probe".into(),
            context: context.clone(),
            message: None,
            handlers: handlers.clone(),
        })?;
    }
    let limits = ClaimLimits {
        max: MAX_CLAIM_BATCH,
        room: Default::default(),
    };
    let record = AttemptRecord {
        state: DeliveryState::Succeeded,
        retry_at: None,
        class: "succeeded".into(),
        reason: None,
        outcome: Some(outcome.clone()),
    };
    let (mut claimed, mut batches) = (0usize, 0usize);
    let start = Instant::now();
    loop {
        let claims = store.claim_batch(chrono::Utc::now(), &limits, LEASE)?;
        if claims.is_empty() {
            break;
        }
        let finished: Vec<_> = claims.iter().map(|c| (c, &record)).collect();
        store.finish_batch(&finished)?;
        claimed += claims.len();
        batches += 1;
    }
    let total = start.elapsed();
    println!(
        "{claimed} deliveries claimed and finished in {batches} batches in {:.2} s: {:.0} deliveries/s",
        total.as_secs_f64(),
        claimed as f64 / total.as_secs_f64()
    );
    Ok(())
}

/// What the disk under the benchmark's data directories does: 4 KiB appended and `fsync`ed, one
/// after another, for `duration`. Every ingest commit waits for one such sync (`synchronous =
/// FULL`), so a stall here is a stall of every event being ingested at that moment; reported
/// beside scenario c so that its latency tail can be read against the disk's.
pub struct FsyncProbe {
    /// Per-sync latency, ms.
    pub latency_ms: Summary,
    /// Syncs that took longer than [`FSYNC_STALL`].
    pub stalls: usize,
}

/// A sync slower than this counts as a stall.
pub const FSYNC_STALL: Duration = Duration::from_millis(50);

/// Runs the probe in the runs directory.
pub fn fsync_probe(duration: Duration) -> anyhow::Result<FsyncProbe> {
    use std::io::Write as _;
    let dir = crate::runs_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("fsync-probe.tmp");
    let mut file = std::fs::File::create(&path)?;
    let block = [0u8; 4096];
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        file.write_all(&block)?;
        let t = Instant::now();
        file.sync_data()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    let stall_ms = FSYNC_STALL.as_secs_f64() * 1e3;
    Ok(FsyncProbe {
        stalls: samples.iter().filter(|ms| **ms > stall_ms).count(),
        latency_ms: Summary::of(&samples),
    })
}
