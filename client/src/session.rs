//! The client's write session: the bookkeeping behind exactly-once writes (Raft thesis, 6.3).
//!
//! Each client instance has a random non-zero `client_id` and numbers its writes 1, 2, 3, ...
//! A write takes its number once, when it starts, and every retry of it sends the same number, so
//! the server, which caches the response of each `(client_id, sequence)`, applies it at most once.
//!
//! Invariants:
//! - Sequence numbers are handed out exactly once each, in increasing order, even when many tasks
//!   write through one client at the same time.
//! - `acked_through` is the largest `n` such that every write numbered `1..=n` has finished, so it
//!   is always below the number of every write still in flight. The server drops its cached
//!   responses for sequences `<= acked_through` and treats a request numbered at or below it as
//!   expired, so reporting a number too high would lose the outcome of a write still being
//!   retried; reporting it too low only costs server memory.
//! - "Finished" means the client stopped waiting for the outcome: it learned it, or it gave up
//!   (deadline, definite error, or the caller dropped the future). A write the client gave up on
//!   will never be asked about again, so its cached response is of no use; keeping it unfinished
//!   forever would pin `acked_through` and make the server's session cache grow without bound.
//!   [`WriteTicket`] finishes its write when dropped, so every exit path, cancellation included,
//!   releases the number.
//! - Memory is bounded by the writes in flight: the set of finished numbers above
//!   `acked_through` only holds numbers that have an unfinished number below them.

use std::collections::BTreeSet;

use basalt_proto::v1::WriteSession;
use parking_lot::Mutex;

/// Sequence numbering and acknowledgement tracking for one client instance.
#[derive(Debug)]
pub(crate) struct SessionTracker {
    client_id: u64,
    state: Mutex<SessionState>,
}

#[derive(Debug, Default)]
struct SessionState {
    /// The last sequence handed out.
    last_issued: u64,
    acked_through: u64,
    /// Finished writes numbered above `acked_through + 1`, waiting for the gap below them to close.
    finished_above: BTreeSet<u64>,
}

impl SessionTracker {
    /// A tracker for a fresh client with a random non-zero id.
    pub(crate) fn new() -> Self {
        Self::with_client_id(rand::random_range(1..=u64::MAX))
    }

    /// A tracker for a given client id; the id must be non-zero because the server reads 0 as
    /// "no session".
    pub(crate) fn with_client_id(client_id: u64) -> Self {
        debug_assert_ne!(client_id, 0, "client id 0 means no session on the wire");
        Self {
            client_id,
            state: Mutex::new(SessionState::default()),
        }
    }

    pub(crate) fn client_id(&self) -> u64 {
        self.client_id
    }

    pub(crate) fn acked_through(&self) -> u64 {
        self.state.lock().acked_through
    }

    /// Starts a write: takes the next sequence number. The write finishes when the ticket drops.
    pub(crate) fn begin(&self) -> WriteTicket<'_> {
        let mut state = self.state.lock();
        state.last_issued += 1;
        WriteTicket {
            tracker: self,
            sequence: state.last_issued,
        }
    }

    fn finish(&self, sequence: u64) {
        let mut state = self.state.lock();
        if sequence != state.acked_through + 1 {
            state.finished_above.insert(sequence);
            return;
        }
        state.acked_through = sequence;
        // Close the gap: every finished number directly above is now acknowledged too.
        while let Some(&next) = state.finished_above.first() {
            if next != state.acked_through + 1 {
                break;
            }
            state.finished_above.pop_first();
            state.acked_through = next;
        }
    }
}

/// One write's claim on a sequence number; finishing is tied to its lifetime.
#[derive(Debug)]
pub(crate) struct WriteTicket<'a> {
    tracker: &'a SessionTracker,
    sequence: u64,
}

impl WriteTicket<'_> {
    pub(crate) fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The session to send with an attempt of this write. `acked_through` is read afresh for
    /// every attempt so a long-retried write still lets the server forget finished ones; it is
    /// below `sequence` because this write has not finished.
    pub(crate) fn session(&self) -> WriteSession {
        WriteSession {
            client_id: self.tracker.client_id,
            sequence: self.sequence,
            acked_through: self.tracker.acked_through(),
        }
    }
}

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        self.tracker.finish(self.sequence);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[test]
    fn random_client_ids_are_non_zero_and_differ() {
        let a = SessionTracker::new();
        let b = SessionTracker::new();
        assert_ne!(a.client_id(), 0);
        assert_ne!(b.client_id(), 0);
        assert_ne!(a.client_id(), b.client_id());
    }

    #[test]
    fn sequential_writes_ack_in_order() {
        let t = SessionTracker::with_client_id(5);
        for n in 1..=3 {
            let w = t.begin();
            assert_eq!(w.sequence(), n);
            let s = w.session();
            assert_eq!((s.client_id, s.sequence, s.acked_through), (5, n, n - 1));
            drop(w);
            assert_eq!(t.acked_through(), n);
        }
    }

    #[test]
    fn out_of_order_finish_waits_for_the_gap() {
        let t = SessionTracker::with_client_id(1);
        let w1 = t.begin();
        let w2 = t.begin();
        let w3 = t.begin();
        drop(w3);
        assert_eq!(t.acked_through(), 0);
        drop(w2);
        assert_eq!(t.acked_through(), 0);
        assert_eq!(w1.session().acked_through, 0);
        drop(w1);
        assert_eq!(t.acked_through(), 3);
        assert!(t.state.lock().finished_above.is_empty());
        assert_eq!(t.begin().sequence(), 4);
    }

    #[test]
    fn a_retry_reuses_the_sequence_and_sees_newer_acks() {
        let t = SessionTracker::with_client_id(1);
        let slow = t.begin();
        let fast = t.begin();
        let first_attempt = slow.session();
        drop(fast);
        let second_attempt = slow.session();
        assert_eq!(first_attempt.sequence, second_attempt.sequence);
        assert_eq!(second_attempt.acked_through, 0, "write 1 still in flight");
    }

    #[test]
    fn concurrent_threads_get_unique_numbers_and_full_ack() {
        let t = Arc::new(SessionTracker::with_client_id(1));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    for _ in 0..500 {
                        let w = t.begin();
                        let s = w.session();
                        assert!(s.acked_through < s.sequence);
                        seen.push(w.sequence());
                    }
                    seen
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread panicked"))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=4000).collect::<Vec<_>>());
        assert_eq!(t.acked_through(), 4000);
    }

    /// One step of an interleaving: start a new write, or finish the in-flight write at a
    /// position (taken modulo the number in flight).
    #[derive(Debug, Clone)]
    enum Step {
        Begin,
        Finish(usize),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![Just(Step::Begin), any::<usize>().prop_map(Step::Finish)],
            0..200,
        )
    }

    proptest! {
        #[test]
        fn acked_through_matches_a_model(steps in steps()) {
            let t = SessionTracker::with_client_id(42);
            let mut in_flight: Vec<WriteTicket<'_>> = Vec::new();
            let mut finished: BTreeSet<u64> = BTreeSet::new();
            let mut issued = 0u64;
            for step in steps {
                match step {
                    Step::Begin => {
                        let w = t.begin();
                        issued += 1;
                        prop_assert_eq!(w.sequence(), issued);
                        in_flight.push(w);
                    }
                    Step::Finish(i) if !in_flight.is_empty() => {
                        let w = in_flight.swap_remove(i % in_flight.len());
                        finished.insert(w.sequence());
                        drop(w);
                    }
                    Step::Finish(_) => {}
                }
                // Model: the longest prefix 1..=n that is entirely finished.
                let mut expected = 0;
                while finished.contains(&(expected + 1)) {
                    expected += 1;
                }
                prop_assert_eq!(t.acked_through(), expected);
                for w in &in_flight {
                    let s = w.session();
                    prop_assert!(s.acked_through < s.sequence);
                    prop_assert_eq!(s.client_id, 42);
                }
                // Bounded by the writes in flight: every parked number has an unfinished one below.
                let lowest_in_flight = in_flight.iter().map(WriteTicket::sequence).min();
                let parked = t.state.lock().finished_above.clone();
                match lowest_in_flight {
                    None => prop_assert!(parked.is_empty()),
                    Some(low) => prop_assert!(parked.iter().all(|&n| n > low)),
                }
            }
            let last = issued;
            drop(in_flight);
            prop_assert_eq!(t.acked_through(), last);
            prop_assert!(t.state.lock().finished_above.is_empty());
        }
    }
}
