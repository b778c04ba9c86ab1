//! Durations in configuration and records are written in milliseconds (`timeout_ms = 250`,
//! `"duration_ms": 3.2`). One serde helper for every such field: `#[serde(with =
//! "crate::duration_ms")]` for whole milliseconds, [`serialize_fractional`] for measured times.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes whole milliseconds (saturating at `u64::MAX`).
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Longest duration any setting accepts: ten years. No timeout, back-off, lease or retention of
/// the engine means anything that long (the longest bound of a setting is the idempotency
/// retention's, a year and two days), and a larger number would reach past what date arithmetic
/// holds (a retry due "now + 10¹⁶ ms" overflowed to "now" and ran at once; `u64::MAX` overflowed
/// the clock outright), so it is refused where it is read, naming the value.
pub const MAX_MILLISECONDS: u64 = 3650 * 24 * 60 * 60 * 1000;

/// Reads whole milliseconds, at most [`MAX_MILLISECONDS`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let ms = u64::deserialize(d)?;
    if ms > MAX_MILLISECONDS {
        return Err(serde::de::Error::custom(format!(
            "{ms} ms is longer than ten years; a duration is at most {MAX_MILLISECONDS} ms"
        )));
    }
    Ok(Duration::from_millis(ms))
}

/// [`deserialize`] for an `Option<Duration>` field (with `#[serde(default)]`): a setting whose
/// absence means something of its own.
pub fn deserialize_some<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    deserialize(d).map(Some)
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

    #[test]
    fn a_duration_past_ten_years_is_refused_naming_it() {
        let most: Whole = serde_json::from_str(&MAX_MILLISECONDS.to_string()).unwrap();
        assert_eq!(most.0, Duration::from_secs(3650 * 24 * 60 * 60));
        for past in [MAX_MILLISECONDS + 1, 10_000_000_000_000_000, u64::MAX] {
            let e = serde_json::from_str::<Whole>(&past.to_string())
                .err()
                .expect("refused")
                .to_string();
            assert!(
                e.contains(&format!("{past} ms is longer than ten years")),
                "{e}"
            );
        }
    }
}
