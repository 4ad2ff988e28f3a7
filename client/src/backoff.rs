//! Exponential backoff with jitter between retries that have no leader hint to follow.
//!
//! Invariant: every delay lies in `[initial / 2, max]`, and the ceiling a delay is drawn under
//! doubles from `initial` per retry until it reaches `max`. Doubling finds a recovering cluster
//! quickly without hammering one that is down; the jitter (a uniform draw from the upper half of
//! the ceiling, "equal jitter") spreads many clients that failed at the same moment, e.g. when a
//! leader died, while keeping a floor so that no retry happens instantly.

use std::time::Duration;

use rand::Rng;

/// The backoff state of one call.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    ceiling: Duration,
    max: Duration,
}

impl Backoff {
    /// Requires `initial <= max` (checked by `ClientConfig::validate`); a larger `initial` is
    /// clamped to `max` so the bound still holds.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            ceiling: initial.min(max),
            max,
        }
    }

    /// The delay before the next retry.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = ceiling.saturating_mul(2).min(self.max);
        let floor = ceiling / 2;
        let span = ceiling - floor;
        let nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
        floor + Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn ceiling_doubles_until_capped() {
        let mut b = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        let mut rng = StdRng::seed_from_u64(7);
        let ceilings: Vec<_> = (0..8)
            .map(|_| {
                let c = b.ceiling;
                b.next_delay(&mut rng);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [20, 40, 80, 160, 320, 500, 500, 500]);
    }

    #[test]
    fn jitter_actually_varies() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| Backoff::new(Duration::from_millis(100), Duration::from_millis(100)).next_delay(&mut rng))
            .collect();
        assert!(delays.len() > 1, "20 draws gave one value: {delays:?}");
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds(
            initial_ms in 1u64..2_000,
            extra_ms in 0u64..10_000,
            seed in any::<u64>(),
            steps in 1usize..40,
        ) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis(initial_ms + extra_ms);
            let mut b = Backoff::new(initial, max);
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..steps {
                let d = b.next_delay(&mut rng);
                prop_assert!(d >= initial / 2, "{d:?} below floor {:?}", initial / 2);
                prop_assert!(d <= max, "{d:?} above max {max:?}");
            }
        }
    }
}
