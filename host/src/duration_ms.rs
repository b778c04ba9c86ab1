//! Durations in configuration and records are written in milliseconds (`timeout_ms = 250`,
//! `"duration_ms": 3.2`). One serde helper for every such field: `#[serde(with =
//! "crate::duration_ms")]` for whole milliseconds, [`serialize_fractional`] for measured times.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes whole milliseconds (saturating at `u64::MAX`).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads whole milliseconds.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// Writes milliseconds with their fraction: what a measured duration is reported as.
pub fn serialize_fractional<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Whole(#[serde(with = "super")] Duration);

    #[test]
    fn whole_milliseconds_round_trip() {
        let text = serde_json::to_string(&Whole(Duration::from_millis(250))).unwrap();
        assert_eq!(text, "250");
        let back: Whole = serde_json::from_str(&text).unwrap();
        assert_eq!(back.0, Duration::from_millis(250));
        assert!(serde_json::from_str::<Whole>("-1").is_err());
    }
}
