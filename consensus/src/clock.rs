//! Wall clocks, for the one place Basalt's correctness reads one: closed timestamps (the safe
//! time that bounded-staleness and stale reads report, see [`crate::raft::closed_time`]).
//!
//! Everything else times itself with monotonic timers (`tokio::time::Instant`): elections,
//! leases and request deadlines measure durations on one node and never compare instants across
//! nodes. A closed timestamp is different: a leader stamps "every write acknowledged before wall
//! time T is at or below log index A", and a follower compares T with *its own* wall clock to say
//! how old its data may be. The two clocks differ by some offset, which the operator bounds with
//! `--max-clock-drift`; every staleness a replica reports includes that bound, so an answer is
//! never older than it claims as long as the real offset stays under it.
//!
//! The simulator gives each node a [`SimClock`] (the simulated time, shifted by a per-node
//! offset) so that runs stay deterministic and skew stays inside the bound it is told.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time, in microseconds since the Unix epoch.
pub trait WallClock: Send + Sync + 'static {
    fn now_us(&self) -> u64;
}

/// The shared handle every group of a node reads its wall clock through.
pub type Clock = Arc<dyn WallClock>;

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_us(&self) -> u64 {
        // A clock before 1970 is a misconfigured machine; 0 makes every staleness it reports
        // huge (so nothing is served as fresh) rather than failing requests.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }
}

/// The system clock, as the [`Clock`] handle groups take.
pub fn system_clock() -> Clock {
    Arc::new(SystemClock)
}

/// A deterministic clock for the simulator: `base + (tokio's now - start) + offset`, where tokio's
/// time is the simulation's. `offset` is the node's skew; it may be negative.
#[derive(Debug, Clone)]
pub struct SimClock {
    start: tokio::time::Instant,
    base_us: u64,
    offset_us: i64,
}

impl SimClock {
    /// A clock that reads `base_us` now, shifted by `offset`.
    pub fn new(base_us: u64, offset: Duration, ahead: bool) -> Self {
        let off = offset.as_micros() as i64;
        Self {
            start: tokio::time::Instant::now(),
            base_us,
            offset_us: if ahead { off } else { -off },
        }
    }
}

impl WallClock for SimClock {
    fn now_us(&self) -> u64 {
        let elapsed = self.start.elapsed().as_micros() as i64;
        (self.base_us as i64 + elapsed + self.offset_us).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_is_after_2020() {
        assert!(SystemClock.now_us() > 1_577_836_800_000_000);
    }

    #[tokio::test]
    async fn a_sim_clock_follows_tokio_time_with_its_offset() {
        let ahead = SimClock::new(1_000_000, Duration::from_millis(5), true);
        let behind = SimClock::new(1_000_000, Duration::from_millis(5), false);
        let (a, b) = (ahead.now_us(), behind.now_us());
        assert!(a >= 1_005_000 && a - b >= 10_000 && a - b < 60_000, "{a} {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(ahead.now_us() >= a + 20_000);
    }
}
