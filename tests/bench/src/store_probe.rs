//! `jobhook-bench store-probe`: what the SQLite store costs per delivery, without HTTP, sandboxes
//! or threads — claims and finishes one after another on one thread, with a real outcome
//! (`log-context`'s) recorded each time: first one delivery per transaction, then in batches as
//! the dispatcher makes them. It separates the store's own cost from the dispatcher's (thread
//! hand-overs, sandbox, metrics) when reading scenario c's deliveries/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// Runs the probe and prints per-operation medians, then the mixed workload ([`mixed`]).
pub fn run() -> anyhow::Result<()> {
    sequential()?;
    mixed()
}

/// Claims and finishes one delivery after another on one thread, then in batches.
fn sequential() -> anyhow::Result<()> {
    let rig = DeliveryRig::new()?;
    let outcome = rig
        .runtime
        .block_on(rig.log_context.invoke(&rig.context, Delivery::default()));
    let dir = crate::runs_dir().join("store-probe");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let store = SqliteStore::open(&dir)?;
    let context: JobContext = rig.context.clone();
    let insert_start = Instant::now();
    let mut insert = Vec::with_capacity(EVENTS);
    for _ in 0..EVENTS {
        let t = Instant::now();
        store.insert_event(&probe_event(&context))?;
        insert.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let insert_total = insert_start.elapsed();
    let (mut claim, mut finish) = (Vec::new(), Vec::new());
    let start = Instant::now();
    loop {
        let t = Instant::now();
        let Some(c) = store.claim(store.now(), &[], LEASE)? else {
            break;
        };
        claim.push(t.elapsed().as_secs_f64() * 1e6);
        let record = AttemptRecord {
            state: DeliveryState::Succeeded,
            retry_at: None,
            class: "succeeded".into(),
            reason: None,
            outcome: Some(outcome.clone()),
            finished_at: chrono::Utc::now(),
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
        "insert_event (synced, one at a time): median {:.0} µs, p99 {:.0} µs; {:.0} events/s",
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
        store.insert_event(&probe_event(&context))?;
    }
    let limits = ClaimLimits::any(MAX_CLAIM_BATCH);
    let record = AttemptRecord {
        state: DeliveryState::Succeeded,
        retry_at: None,
        class: "succeeded".into(),
        reason: None,
        outcome: Some(outcome.clone()),
        finished_at: chrono::Utc::now(),
    };
    let (mut claimed, mut batches) = (0usize, 0usize);
    let start = Instant::now();
    loop {
        let claims = store.claim_batch(store.now(), &limits, LEASE)?;
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

/// An event of the probe: `context`, routed to four handlers.
fn probe_event(context: &JobContext) -> NewEvent {
    NewEvent {
        id: jobhook::queue::store::new_event_id(),
        source: "probe".into(),
        context: context.clone(),
        message: None,
        handlers: (1..=4).map(|i| format!("healthy-{i}")).collect(),
    }
}

/// Events per second the mixed workload offers (scenario c's latency run).
const MIXED_RATE: f64 = 1_000.0;

/// How long each phase of the mixed workload offers events.
const MIXED_SECONDS: f64 = 10.0;

/// Threads that insert events in the mixed workload (an HTTP server's concurrent requests).
const INGEST_THREADS: usize = 4;

/// The store alone under scenario c's mix, without HTTP or sandboxes: `INGEST_THREADS`
/// threads insert `MIXED_RATE` events/s (four deliveries each) on a fixed schedule while one
/// thread claims in batches and another records their outcomes, as the dispatcher does. Prints
/// the ingest latency (from each event's scheduled time, so queueing counts) with and without
/// the dispatch side, and the deliveries recorded per second.
pub fn mixed() -> anyhow::Result<()> {
    let rig = DeliveryRig::new()?;
    let outcome = rig
        .runtime
        .block_on(rig.log_context.invoke(&rig.context, Delivery::default()));
    for with_dispatch in [false, true] {
        // A directory per phase: the first phase's store may still be closing.
        let dir = crate::runs_dir().join(if with_dispatch {
            "store-probe-mixed-dispatch"
        } else {
            "store-probe-mixed-alone"
        });
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&dir)?);
        let stop = Arc::new(AtomicBool::new(false));
        let recorded = Arc::new(AtomicUsize::new(0));
        let dispatch = with_dispatch.then(|| {
            spawn_dispatch(
                Arc::clone(&store),
                outcome.clone(),
                Arc::clone(&stop),
                Arc::clone(&recorded),
            )
        });
        let start = Instant::now();
        let ingest: Vec<_> = (0..INGEST_THREADS)
            .map(|thread| {
                let store = Arc::clone(&store);
                let context = rig.context.clone();
                std::thread::spawn(move || paced_ingest(store.as_ref(), &context, thread))
            })
            .collect();
        let mut latency = Vec::new();
        for t in ingest {
            let samples = t
                .join()
                .map_err(|_| anyhow::anyhow!("an ingest thread panicked"))??;
            latency.extend(samples);
        }
        let sent_for = start.elapsed().as_secs_f64();
        let delivered = recorded.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        if let Some(d) = dispatch {
            d.join()
                .map_err(|_| anyhow::anyhow!("the dispatch thread panicked"))??;
        }
        let l = Summary::of(&latency);
        println!(
            "mixed, {}: ingest latency p50 {:.2} ms, p99 {:.2} ms ({} events); deliveries recorded {:.0} /s (offered {:.0} /s); load {}",
            if with_dispatch {
                "with claims and outcomes"
            } else {
                "ingest alone"
            },
            l.p50,
            l.p99,
            l.n,
            delivered as f64 / sent_for,
            MIXED_RATE * 4.0,
            crate::machine::load_average()
        );
    }
    Ok(())
}

/// One ingest thread's share of [`MIXED_RATE`] for [`MIXED_SECONDS`]; answers each event's
/// latency (ms) from its scheduled time.
fn paced_ingest(
    store: &dyn EventStore,
    context: &JobContext,
    thread: usize,
) -> anyhow::Result<Vec<f64>> {
    let period = Duration::from_secs_f64(INGEST_THREADS as f64 / MIXED_RATE);
    let count = (MIXED_SECONDS * MIXED_RATE) as usize / INGEST_THREADS;
    let start = Instant::now() + period.mul_f64(thread as f64 / INGEST_THREADS as f64);
    let mut latency = Vec::with_capacity(count);
    for i in 0..count {
        let due = start + period.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        store.insert_event(&probe_event(context))?;
        latency.push(due.elapsed().as_secs_f64() * 1e3);
    }
    Ok(latency)
}

/// The dispatcher's store traffic: one thread claims batches, another records their outcomes.
fn spawn_dispatch(
    store: Arc<dyn EventStore>,
    outcome: jobhook::Outcome,
    stop: Arc<AtomicBool>,
    recorded: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let (send, receive) = std::sync::mpsc::sync_channel::<Vec<jobhook::queue::store::Claim>>(4);
        let recorder_store = Arc::clone(&store);
        let recorder = std::thread::spawn(move || -> anyhow::Result<()> {
            let record = AttemptRecord {
                state: DeliveryState::Succeeded,
                retry_at: None,
                class: "succeeded".into(),
                reason: None,
                outcome: Some(outcome),
                finished_at: chrono::Utc::now(),
            };
            for claims in receive {
                let finished: Vec<_> = claims.iter().map(|c| (c, &record)).collect();
                recorder_store.finish_batch(&finished)?;
                recorded.fetch_add(claims.len(), Ordering::Relaxed);
            }
            Ok(())
        });
        let limits = ClaimLimits::any(MAX_CLAIM_BATCH);
        while !stop.load(Ordering::Relaxed) {
            let claims = store.claim_batch(store.now(), &limits, LEASE)?;
            if claims.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            } else if send.send(claims).is_err() {
                break;
            }
        }
        drop(send);
        recorder
            .join()
            .map_err(|_| anyhow::anyhow!("the recorder thread panicked"))?
    })
}

/// What the disk under the benchmark's data directories does: 4 KiB appended and `fsync`ed, one
/// after another, for `duration`. Every accepted event waits for one such sync (the store's
/// syncer `fdatasync`s the WAL before the event is answered), so a stall here is a stall of every
/// event being ingested at that moment; reported
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
