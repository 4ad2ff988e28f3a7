//! Parsing human durations for `--timeout` (`10s`, `500ms`, `1.5s`, `2m`, `1h`; a bare number is
//! seconds).
//!
//! Invariant: a parsed duration is greater than zero, because a zero timeout could never succeed
//! and is almost certainly a typo; rejecting it here reports it as a usage error (exit 2) rather
//! than as a failed call.

use std::time::Duration;

/// Parses a duration argument; the error text is shown by clap after "invalid value".
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {raw:?} (use ms, s, m or h, e.g. 10s)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let duration = Duration::try_from_secs_f64(value * scale).map_err(|_| format!("{raw:?} is out of range"))?;
    if duration.is_zero() {
        return Err("the timeout must be greater than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration(" 7 s "), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn rejects_garbage_and_zero() {
        for bad in ["", "s", "ten", "10x", "1.2.3s", "-1s", "0", "0ms", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
