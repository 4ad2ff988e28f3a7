//! Parsing human durations for the command-line tools (`basaltctl --timeout`, `basalt-bench
//! --duration`/`--warmup`): `10s`, `500ms`, `1.5s`, `2m`, `1h`; a bare number is seconds.
//!
//! Invariant of [`parse_duration`]: the result is greater than zero, because a zero timeout or
//! measurement window could never succeed and is almost certainly a typo; rejecting it here
//! reports it as a usage error (exit 2) rather than as a failed run. Only settings for which zero
//! means "none" (a warm-up) use [`parse_duration_or_zero`].

use std::time::Duration;

/// Parses a duration that may be zero; the error text is shown by clap after "invalid value".
pub fn parse_duration_or_zero(raw: &str) -> Result<Duration, String> {
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
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("{raw:?} is out of range"))
}

/// Parses a duration that must be greater than zero (see the module invariant).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let duration = parse_duration_or_zero(raw)?;
    if duration.is_zero() {
        return Err("the duration must be greater than zero".into());
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
    fn zero_only_where_allowed() {
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration_or_zero("-1s").is_err());
    }

    #[test]
    fn rejects_garbage_and_zero() {
        for bad in ["", "s", "ten", "10x", "1.2.3s", "-1s", "0", "0ms", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
