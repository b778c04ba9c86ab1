//! Log lines that hostile or failing parts around the engine could repeat without end — a
//! server's malformed rows, refused connections, failing checkpoints, failing outbound calls —
//! told at most once per interval, each line saying how many it stands for. Without it one
//! remote party decides how much the engine writes to its log (a gigabyte in 20 seconds, once).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Occurrences of one kind of log line, told at most once per interval.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    /// When the last line was told, and how many occurrences went untold since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// A limit of one line per `every`.
    pub const fn new(every: Duration) -> Self {
        LogLimit {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one occurrence now; see [`due_at`](Self::due_at).
    pub fn due(&self) -> Option<u64> {
        self.due_at(Instant::now())
    }

    /// Counts one occurrence now and, when a line is due, calls `log` with how many went untold
    /// since the last: for a line written in one place.
    pub fn tell(&self, log: impl FnOnce(u64)) {
        if let Some(untold) = self.due() {
            log(untold);
        }
    }

    /// Counts one occurrence at `now`. When a line is due (the first ever, or `every` after the
    /// last), how many occurrences went untold since the last line, this one not included;
    /// otherwise `None`, and this one is counted as untold.
    pub fn due_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .0
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            state.1 = state.1.saturating_add(1);
            return None;
        }
        state.0 = Some(now);
        Some(std::mem::take(&mut state.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_untold() {
        let limit = LogLimit::new(Duration::from_secs(600));
        let t = Instant::now();
        assert_eq!(limit.due_at(t), Some(0));
        assert_eq!(limit.due_at(t + Duration::from_secs(1)), None);
        assert_eq!(limit.due_at(t + Duration::from_secs(2)), None);
        assert_eq!(limit.due_at(t + Duration::from_secs(600)), Some(2));
        assert_eq!(limit.due_at(t + Duration::from_secs(600)), None);
        // A clock read earlier than the last line (another thread's) is within the interval.
        assert_eq!(limit.due_at(t), None);
    }
}
