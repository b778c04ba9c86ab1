//! Probe guest for the event path: logs the delivery it sees (`attempt N of event E`), waits
//! `SleepMs` milliseconds (property, default 0) so that deliveries are in flight long enough to
//! be interrupted, then succeeds — or fails when the job result is `Failure` and the property
//! `FailOnFailure` is `true`.

use std::time::Duration;

use jobhook_sdk::{Context, Handler, JobResult, Result, delivery, export_handler, properties};

struct AttemptProbe;

impl Handler for AttemptProbe {
    fn run(ctx: &Context) -> Result<()> {
        let attempt = delivery::attempt();
        let event = delivery::event_id().unwrap_or_default();
        jobhook_sdk::info!("attempt {attempt} of event {event}");
        let sleep_ms: u64 = properties::parse_or("SleepMs", 0)?;
        if sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(sleep_ms));
        }
        let fail: bool = properties::parse_or("FailOnFailure", false)?;
        if fail && ctx.job_result == JobResult::Failure {
            return Err(format!("job {} failed (attempt {attempt})", ctx.job_id).into());
        }
        Ok(())
    }
}

export_handler!(AttemptProbe);
