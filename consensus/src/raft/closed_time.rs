//! Closed timestamps: how a replica proves how fresh its data is, for bounded-staleness and
//! stale reads (CockroachDB's closed timestamps and TiKV's resolved-ts play the same part).
//!
//! **The claim.** A leader that holds its lease samples its wall clock, `T`, and *then* its
//! applied index, `A`, and sends the pair [`Closed`] `{T, A}` with its AppendEntries and
//! heartbeats. The claim it makes: every write acknowledged to a client before `T` sits at or
//! below log index `A`. It holds because
//! - a write is acknowledged only after the leader applied it, and `A` was read after `T`, so
//!   every write this leader acknowledged before `T` is at or below `A`;
//! - a write a *previous* leader acknowledged was committed, so it is in this leader's log, and
//!   it is at or below `A` because the leader closes only once it has applied an entry of its own
//!   term (everything committed before lies below that entry);
//! - no *later* leader can have acknowledged anything before `T`: the leader closes only while
//!   its lease holds (a quorum acknowledged it within the lease, shortened by the drift bound, so
//!   the quorum still refuses to vote for anyone else), and never once it has started handing
//!   its leadership over (a transfer bypasses the followers' lease).
//!
//! **The safe time.** A replica whose applied index has reached `A` holds every write
//! acknowledged before `T`, so `T` is its *safe time*; a read it serves is at most
//! `now - T + max_clock_drift` old by its own clock. Claims are facts about the log, true whichever
//! leader made them, so a replica keeps the newest one its applied index satisfies. Claims it
//! cannot use yet (it has not applied far enough) wait in a short queue, where a newer claim that
//! needs no more than an older one replaces it.
//!
//! A sleeping group (see [`super::hibernation`]) sends no heartbeats, so its followers' safe time
//! stops moving; reads that need a fresher one go to the leader. That is the price of a group
//! costing nothing while idle, and only bounded-staleness reads on followers pay it.

use std::collections::VecDeque;
use std::sync::OnceLock;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::clock::Clock;

/// A leader's claim: every write acknowledged before wall time `at_us` is at or below `index`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    pub at_us: u64,
    pub index: u64,
}

/// Claims waiting for the applied index to catch up; a bound on memory, not on correctness (a
/// claim dropped only costs freshness).
const PENDING: usize = 32;

/// How the leader side samples a claim; installed once the group's Raft instance exists.
pub(crate) type Closer = Box<dyn Fn() -> Option<Closed> + Send + Sync>;

/// One replica's closed-time state: the leader side's sampler and the follower side's tracker.
pub struct ClosedTime {
    clock: Clock,
    closer: OnceLock<Closer>,
    tracker: Mutex<Tracker>,
}

impl ClosedTime {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            closer: OnceLock::new(),
            tracker: Mutex::new(Tracker::default()),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Installs the leader side's sampler (once; later calls are ignored).
    pub(crate) fn set_closer(&self, closer: Closer) {
        let _ = self.closer.set(closer);
    }

    /// The claim this replica can make now as the leader, if it can make one. Also counts as
    /// observed here: a leader's own claims are satisfied at once.
    pub fn close(&self) -> Option<Closed> {
        let c = (self.closer.get()?)()?;
        // The leader sampled its applied index for the claim: it has applied that far.
        self.tracker.lock().observe(c, c.index);
        Some(c)
    }

    /// Records a claim that arrived from the leader.
    pub fn observe(&self, c: Closed, applied: u64) {
        self.tracker.lock().observe(c, applied);
    }

    /// This replica's safe time (µs since the epoch by the leaders' clocks) given its applied
    /// index, or `None` if it has never been able to use a claim.
    pub fn safe_time(&self, applied: u64) -> Option<u64> {
        if let Some(c) = self.close() {
            return Some(c.at_us);
        }
        self.tracker.lock().advance(applied)
    }
}

#[derive(Default, Debug)]
struct Tracker {
    /// Waiting claims, by increasing `at_us` and increasing `index`: a claim that needs no more
    /// than an older one (and is newer) replaces it.
    pending: VecDeque<Closed>,
    /// The newest claim the applied index satisfies.
    safe: Option<u64>,
}

impl Tracker {
    fn observe(&mut self, c: Closed, applied: u64) {
        if self.safe.is_some_and(|s| s >= c.at_us) {
            return; // Nothing newer than what is already safe.
        }
        if c.index <= applied {
            self.safe = Some(c.at_us);
            self.pending.retain(|p| p.at_us > c.at_us);
            return;
        }
        // Older claims that need at least as much are dominated by this one.
        while self.pending.back().is_some_and(|p| p.index >= c.index) {
            self.pending.pop_back();
        }
        if self.pending.back().is_some_and(|p| p.at_us >= c.at_us) {
            return; // Out of order (an older leader's late message): the newer claim wins.
        }
        if self.pending.len() == PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(c);
    }

    fn advance(&mut self, applied: u64) -> Option<u64> {
        while let Some(p) = self.pending.front().copied() {
            if p.index > applied {
                break;
            }
            self.pending.pop_front();
            self.safe = Some(self.safe.map_or(p.at_us, |s| s.max(p.at_us)));
        }
        self.safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(at_us: u64, index: u64) -> Closed {
        Closed { at_us, index }
    }

    #[test]
    fn a_claim_counts_once_the_applied_index_reaches_it() {
        let mut t = Tracker::default();
        t.observe(c(100, 10), 5);
        assert_eq!(t.advance(9), None);
        assert_eq!(t.advance(10), Some(100));
        t.observe(c(200, 12), 10);
        t.observe(c(300, 15), 10);
        assert_eq!(t.advance(12), Some(200));
        assert_eq!(t.advance(20), Some(300));
    }

    #[test]
    fn a_newer_claim_needing_less_replaces_older_ones_and_late_ones_are_ignored() {
        let mut t = Tracker::default();
        t.observe(c(100, 20), 0);
        t.observe(c(200, 15), 0); // A new leader closing lower: it dominates.
        assert_eq!(t.pending.len(), 1);
        t.observe(c(150, 18), 0); // Late and older: ignored.
        assert_eq!(t.advance(15), Some(200));
        t.observe(c(120, 1), 30); // Older than the safe time: ignored.
        assert_eq!(t.advance(30), Some(200));
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut t = Tracker::default();
        for i in 1..=100 {
            t.observe(c(i * 10, i), 0);
        }
        assert_eq!(t.pending.len(), PENDING);
        assert_eq!(t.advance(100), Some(1000));
    }

    proptest! {
        /// Whatever order claims arrive in, the safe time is always a claim whose index the
        /// applied index has reached (never one it has not), and it never goes back.
        #[test]
        fn the_safe_time_is_always_backed_by_an_applied_claim(
            claims in proptest::collection::vec((1u64..1_000, 1u64..100), 1..60),
            steps in proptest::collection::vec(0u64..5, 1..60),
        ) {
            let mut t = Tracker::default();
            let mut applied = 0;
            let mut last = None;
            for (i, (at, idx)) in claims.iter().enumerate() {
                applied += steps[i % steps.len()];
                t.observe(c(*at, *idx), applied);
                let safe = t.advance(applied);
                if let Some(s) = safe {
                    prop_assert!(claims[..=i].iter().any(|(a, x)| *a == s && *x <= applied));
                }
                prop_assert!(safe >= last, "went back from {last:?} to {safe:?}");
                last = safe;
            }
        }
    }
}
