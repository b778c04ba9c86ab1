//! Many events through a mix of hostile and healthy handlers at once, on one engine.
//!
//! Asserts that the process survives, that every healthy outcome is exactly right, that every
//! hostile outcome has the right class, and that the host's memory returns to its baseline after
//! 1,000 hostile invocations. Only generous per-run time bounds are asserted: no throughput or
//! latency figures, so a loaded CI machine cannot make this flaky.

mod corpus;

use std::sync::Arc;
use std::time::{Duration, Instant};

use corpus::{CoreModule, SLACK, load, returning, spec};
use jobhook::capabilities::Grants;
use jobhook::{
    Delivery, JobContext, JobResult, LimitKind, Outcome, OutcomeKind, SandboxSpec, SandboxedHandler,
};
use jobhook_testkit::{guest_bytes, sample_context_json};
use serde_json::json;
use tokio::sync::Semaphore;

/// Events in the stream.
const EVENTS: usize = 400;
/// Invocations in flight at once.
const CONCURRENCY: usize = 16;
/// Hostile invocations measured by the memory test (after [`WARM_UP`] more).
const HOSTILE_INVOCATIONS: usize = 1_000;
/// Hostile invocations of each kind, at full concurrency, before the memory baseline is taken.
///
/// The pooling allocator gives each component its own warm slots (copy-on-write images, up to
/// 1 MiB of each memory kept resident for reuse, tables, fiber stacks), bounded by the pool's
/// size and `max_unused_warm_slots`. The first runs of a kind at full concurrency therefore
/// raise RSS by a fixed amount that later runs reuse; the warm-up pays for that, together with
/// the allocator's arenas and tokio's workers reaching their working size, so that what is
/// measured afterwards is growth per invocation — a leak.
const WARM_UP_PER_KIND: usize = 2 * CONCURRENCY;
/// Largest growth of the process's resident memory accepted over the 1,000 invocations. The
/// hostile handlers together allocate gigabytes of guest memory over the run; a leak of even a
/// few hundred bytes per invocation of host-side state shows up well before a real leak of
/// guest memory would, so this is generous on purpose.
const MAX_RSS_GROWTH: u64 = 32 * 1024 * 1024;

/// Time budget of the handlers meant to time out (the others get [`corpus::BUDGET`]).
const TIMED_OUT_BUDGET: Duration = Duration::from_millis(100);

/// Serialises this file's tests: the memory test's figures must not include the stream test's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a subject's outcome must be for a given event.
type Check = fn(&Outcome, &JobContext) -> Result<(), String>;

struct Subject {
    handler: SandboxedHandler,
    check: Check,
}

fn class(outcome: &Outcome, expected: &str) -> Result<(), String> {
    if outcome.kind.class() == expected {
        Ok(())
    } else {
        Err(format!("expected {expected}, got {}", outcome.kind))
    }
}

fn limit(outcome: &Outcome, expected: LimitKind) -> Result<(), String> {
    match &outcome.kind {
        OutcomeKind::LimitExceeded { limit, .. } if *limit == expected => Ok(()),
        other => Err(format!("expected {} limit, got {other}", expected.as_str())),
    }
}

fn trap(outcome: &Outcome, expected: &str) -> Result<(), String> {
    match &outcome.kind {
        OutcomeKind::Trapped { code, .. } if code == expected => Ok(()),
        other => Err(format!("expected trapped ({expected}), got {other}")),
    }
}

/// The healthy handlers, each with the exact outcome it must produce for an event.
async fn healthy_subjects() -> Vec<Subject> {
    let mut log = spec("log-context", &[]);
    log.grants = Grants::default();
    let mail = spec(
        "repeated-failure-email",
        &[
            ("RetryThreshold", "3"),
            ("EmailRecipients", "pki-team@example.com"),
        ],
    );
    vec![
        Subject {
            handler: load(guest_bytes("log-context"), log).await.expect("load"),
            check: |o, ctx| {
                if !o.kind.is_success() {
                    return Err(format!("log-context: {}", o.kind));
                }
                let lines: Vec<&str> = o.logs.iter().map(|l| l.message.as_str()).collect();
                let expected = [
                    format!("JobId: {}", ctx.job_id),
                    format!("JobResult: {}", ctx.job_result.name()),
                    format!("CurrentRetryCount: {}", ctx.current_retry_count),
                ];
                for line in &expected {
                    if !lines.contains(&line.as_str()) {
                        return Err(format!("log-context did not log {line:?}: {lines:?}"));
                    }
                }
                // The eleven context fields, then the delivery's Source and Message.
                if lines.len() != 13 || o.logs_dropped != 0 {
                    return Err(format!("log-context logged {lines:?}"));
                }
                Ok(())
            },
        },
        Subject {
            handler: load(guest_bytes("guest-counter"), spec("counter", &[]))
                .await
                .expect("load"),
            check: |o, _| class(o, "succeeded"),
        },
        Subject {
            handler: load(guest_bytes("repeated-failure-email"), mail)
                .await
                .expect("load"),
            // No mail transport is configured: a mail it decides to send is answered
            // `not-available`, which it reports as its failure.
            check: |o, ctx| {
                let mails = ctx.job_result == JobResult::Failure && ctx.current_retry_count >= 3;
                match (&o.kind, mails) {
                    (OutcomeKind::Succeeded, false) => Ok(()),
                    (OutcomeKind::HandlerFailed { reason }, true)
                        if reason.contains("not available") =>
                    {
                        Ok(())
                    }
                    (other, _) => Err(format!("repeated-failure-email (mails: {mails}): {other}")),
                }
            },
        },
    ]
}

/// The hostile handlers, each with the class its outcome must have. Time-outs use a short
/// budget so the stream stays quick.
async fn hostile_subjects() -> Vec<Subject> {
    let short = |name: &str| {
        let mut s = spec(name, &[]);
        s.limits.timeout = TIMED_OUT_BUDGET;
        s
    };
    let rust =
        |package: &'static str, check: Check| (guest_bytes(package), spec(package, &[]), check);
    let mut table: Vec<(Vec<u8>, SandboxSpec, Check)> = vec![
        (guest_bytes("guest-loop"), short("loop"), |o, _| {
            class(o, "timed-out")
        }),
        (
            guest_bytes("guest-busy-host-calls"),
            short("busy"),
            |o, _| class(o, "timed-out"),
        ),
        (guest_bytes("guest-sleep"), short("sleep"), |o, _| {
            class(o, "timed-out")
        }),
        rust("guest-memory-bomb", |o, _| limit(o, LimitKind::Memory)),
        rust("guest-huge-alloc", |o, _| limit(o, LimitKind::Memory)),
        rust("guest-recursion", |o, _| limit(o, LimitKind::Stack)),
        rust("guest-stack-smash", |o, _| trap(o, "memory-out-of-bounds")),
        rust("guest-trap", |o, _| trap(o, "unreachable")),
        rust("guest-abort", |o, _| trap(o, "unreachable")),
        rust("guest-exit", |o, _| trap(o, "exit")),
        rust("guest-panic", |o, _| class(o, "panicked")),
        rust("guest-keyfactor-flood", |o, _| {
            limit(o, LimitKind::Calls("keyfactor-calls"))
        }),
        rust("guest-mail-flood", |o, _| {
            limit(o, LimitKind::Calls("mail-calls"))
        }),
        rust("guest-http-flood", |o, _| {
            limit(o, LimitKind::Calls("http-calls"))
        }),
        rust("guest-handle-flood", |o, _| trap(o, "guest-error")),
        rust("guest-random-drain", |o, _| trap(o, "guest-error")),
        (
            returning(r"\01\00\00\00\40\00\00\00\03\00\00\00", r"\ff\fe\fd"),
            spec("bad-utf8-result", &[]),
            |o, _| trap(o, "invalid-value"),
        ),
        (
            CoreModule {
                run: "(block $done (loop $grow
                        (br_if $done (i32.eq (table.grow $t (ref.null func) (i32.const 1024))
                                             (i32.const -1)))
                        (br $grow)))
                      (i32.const 0)",
                extra: "(table $t 1 funcref)",
                ..CoreModule::default()
            }
            .component(),
            spec("table-grow", &[]),
            |o, _| limit(o, LimitKind::Table),
        ),
    ];
    // Floods that succeed, sized to keep the stream quick.
    table.push((
        guest_bytes("guest-log-flood"),
        spec("log-flood", &[("lines", "5000")]),
        |o, _| match class(o, "succeeded") {
            Ok(()) if o.logs_dropped == 5000 - o.logs.len() as u64 => Ok(()),
            Ok(()) => Err(format!("log flood dropped {}", o.logs_dropped)),
            e => e,
        },
    ));
    table.push((
        guest_bytes("guest-stdout-flood"),
        spec("stdout-flood", &[("bytes", "262144")]),
        |o, _| match class(o, "succeeded") {
            Ok(()) if o.output_dropped > 0 => Ok(()),
            Ok(()) => Err("stdout flood dropped nothing".into()),
            e => e,
        },
    ));
    let mut subjects = Vec::new();
    for (bytes, spec, check) in table {
        let name = spec.name.clone();
        let handler = load(bytes, spec)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        subjects.push(Subject { handler, check });
    }
    subjects
}

/// Event `i` of the stream: its own job id, and job results and retry counts that make
/// `repeated-failure-email` mail for some events and not others.
fn event(i: usize) -> JobContext {
    let mut v = sample_context_json();
    v["JobId"] = json!(format!("00000000-0000-4000-8000-{i:012x}"));
    v["JobResult"] = json!(["Success", "Warning", "Failure", "Unknown", "Failure"][i % 5]);
    v["CurrentRetryCount"] = json!(i % 7);
    JobContext::from_json_value(&v).expect("event context")
}

/// Runs every `(subject, event)` pair with bounded concurrency; returns the failed checks.
async fn run_all(subjects: Arc<Vec<Subject>>, pairs: Vec<(usize, usize)>) -> Vec<String> {
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for (subject, i) in pairs {
        let subjects = Arc::clone(&subjects);
        let permits = Arc::clone(&permits);
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire().await.expect("semaphore");
            let s = &subjects[subject];
            let ctx = event(i);
            let started = Instant::now();
            let outcome = s.handler.invoke(&ctx, Delivery::default()).await;
            let bound = s.handler.spec().limits.timeout + SLACK;
            let name = &s.handler.spec().name;
            if started.elapsed() > bound {
                return Err(format!("{name} on event {i} took {:?}", started.elapsed()));
            }
            (s.check)(&outcome, &ctx).map_err(|e| format!("{name} on event {i}: {e}"))
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("task failed: {e}")),
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_healthy_handlers_share_a_stream_of_events() {
    let _serial = SERIAL.lock().await;
    let healthy = healthy_subjects().await;
    let hostile = hostile_subjects().await;
    let healthy_count = healthy.len();
    let hostile_count = hostile.len();
    let subjects: Arc<Vec<Subject>> = Arc::new(healthy.into_iter().chain(hostile).collect());

    // Every event goes to every healthy handler and to one hostile handler, in turn.
    let mut pairs = Vec::new();
    for i in 0..EVENTS {
        for h in 0..healthy_count {
            pairs.push((h, i));
        }
        pairs.push((healthy_count + i % hostile_count, i));
    }
    let invocations = pairs.len();
    let started = Instant::now();
    let failures = run_all(Arc::clone(&subjects), pairs).await;
    eprintln!(
        "stream: {EVENTS} events, {invocations} invocations ({EVENTS} hostile) in {:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {invocations} outcomes were wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    corpus::assert_healthy().await;
}

/// Resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_memory_returns_to_baseline_after_1000_hostile_invocations() {
    let _serial = SERIAL.lock().await;
    // The hostile handlers that allocate: guest memory bombs and huge allocations, traps that
    // leave a full memory behind, floods that fill host-side buffers, invalid values, tables.
    let subjects: Arc<Vec<Subject>> = Arc::new(
        hostile_subjects()
            .await
            .into_iter()
            .filter(|s| s.handler.spec().limits.timeout > TIMED_OUT_BUDGET)
            .collect(),
    );
    let n = subjects.len();
    let pairs = |count: usize, offset: usize| -> Vec<(usize, usize)> {
        (0..count).map(|i| ((i + offset) % n, i)).collect()
    };

    let start = rss_bytes();
    for kind in 0..n {
        let batch = (0..WARM_UP_PER_KIND).map(|i| (kind, i)).collect();
        let failures = run_all(Arc::clone(&subjects), batch).await;
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
    let failures = run_all(Arc::clone(&subjects), pairs(WARM_UP_PER_KIND * n, 0)).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let baseline = rss_bytes();

    let started = Instant::now();
    let failures = run_all(Arc::clone(&subjects), pairs(HOSTILE_INVOCATIONS, 7)).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let after = rss_bytes();

    let growth = after.saturating_sub(baseline);
    eprintln!(
        "memory: RSS {:.1} MiB before warm-up; {HOSTILE_INVOCATIONS} hostile invocations of {n} \
         kinds in {:?}; RSS {:.1} MiB after warm-up, {:.1} MiB after; growth {:.1} MiB \
         (bound {} MiB)",
        start as f64 / 1048576.0,
        started.elapsed(),
        baseline as f64 / 1048576.0,
        after as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        MAX_RSS_GROWTH >> 20
    );
    assert!(
        growth <= MAX_RSS_GROWTH,
        "RSS grew by {growth} bytes over {HOSTILE_INVOCATIONS} hostile invocations"
    );
    corpus::assert_healthy().await;
}
