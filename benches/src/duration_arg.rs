//! The duration syntax of the command-line tools: a number with a unit, `250ms`, `10s`, `1.5s`,
//! `2m`, or a bare number of seconds.
//!
//! Small enough to own rather than depend on a crate for; strict enough (no negative, NaN or
//! unit-less garbage) that a typo fails at parse time instead of running a zero-length benchmark.

use std::time::Duration;

#[derive(thiserror::Error, Debug, PartialEq, Eq)]
#[error("invalid duration {input:?}: {reason} (examples: 500ms, 10s, 1.5s, 2m)")]
pub struct DurationArgError {
    input: String,
    reason: &'static str,
}

/// Parses `input` as described in the module documentation; usable as a clap `value_parser`.
pub fn parse_duration(input: &str) -> Result<Duration, DurationArgError> {
    let error = |reason| DurationArgError {
        input: input.to_string(),
        reason,
    };
    let trimmed = input.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() {
        return Err(error("expected a number first"));
    }
    let value: f64 = number.parse().map_err(|_| error("malformed number"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(error("unknown unit (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| error("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 3 s "), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "-1s", "10x", "1..5s", "ten seconds", "NaNs", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
