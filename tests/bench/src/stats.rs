//! Order statistics of samples.

use serde::Serialize;

/// Summary of a set of samples, in the unit the samples were taken in.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples` (nearest-rank percentiles). Empty input gives all zeros.
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
            sorted.get(index).copied().unwrap_or_default()
        };
        Summary {
            n: sorted.len(),
            min: sorted.first().copied().unwrap_or_default(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: sorted.last().copied().unwrap_or_default(),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }
}

/// `a / b`, or NaN when `b` is zero (printed as "n/a").
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { f64::NAN } else { a / b }
}

/// The resolution of delivery latencies read from a store, in milliseconds: its times are
/// whole milliseconds, so a latency of 0 ms means "within the same millisecond".
pub const STORE_RESOLUTION_MS: f64 = 1.0;

/// `a ÷ b` for two delivery latencies read from a store, each counted as at least
/// [`STORE_RESOLUTION_MS`]: two deliveries that both ended within their event's millisecond
/// are equally fast (1.0), not infinitely apart.
pub fn latency_ratio(a: f64, b: f64) -> f64 {
    ratio(a.max(STORE_RESOLUTION_MS), b.max(STORE_RESOLUTION_MS))
}
