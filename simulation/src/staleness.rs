//! The staleness checker: `bounded_staleness` and `stale` reads against the history's writes.
//!
//! These reads are not linearizable by design, so the linearizability checker never sees them;
//! what they promise instead (docs/read-modes.md) is checked here:
//!
//! 1. **No value from nowhere.** A read returns the initial state (absent) or a value some write or
//!    compare-and-swap wrote, invoked before the read completed.
//! 2. **Never older than its bound.** A read that reports a staleness bound `B` reflects every
//!    write acknowledged more than `B` before it was served. It was served after it was invoked,
//!    so every write acknowledged before `invoke - B` must be reflected. "Not reflected" is judged
//!    soundly from real time alone: values are unique, and the workload never deletes, so a read
//!    that returns value `v` (or absent) does not reflect write `w` when `v`'s write completed
//!    before `w` was invoked (or `v` is the initial absence). A `bounded_staleness` read must also
//!    report a bound no larger than the one it asked for.
//!
//! Together these make each key's stale reads a consistent prefix of its history: a read shows
//! a state the key really had, no older than it says.
//!
//! Invariant: every finding is a real violation, given unique values and the history's clock;
//! a read the rules cannot judge (its value's write has no known completion) is let pass.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::history::{Event, EventKind, History, Op, Value};

/// One `bounded_staleness` or `stale` read as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleRead {
    pub process: u64,
    pub key: String,
    /// Nanoseconds on the history's clock.
    pub invoke: u64,
    pub complete: u64,
    /// `None`: the key was absent.
    pub value: Option<String>,
    /// The bound the response reported: `Some(ZERO)` for a read served as linearizable, `None`
    /// when the replica could not bound it (a stale read without a safe time).
    pub bound: Option<Duration>,
    /// The bound a `bounded_staleness` read asked for; `None` for `stale`.
    pub asked: Option<Duration>,
}

/// A read that broke its promise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StalenessFinding {
    pub read: StaleRead,
    pub problem: String,
}

/// A write (or CAS) of a value: when it was invoked, and when it was acknowledged if it was.
#[derive(Debug, Clone, Copy)]
struct Write {
    invoke: u64,
    acked: Option<u64>,
}

/// Checks every read in `reads` against the writes in `history` (see the module docs).
pub fn check(history: &History, reads: &[StaleRead]) -> Vec<StalenessFinding> {
    let writes = writes_by_key(history.events());
    let mut findings = Vec::new();
    for r in reads {
        let empty = HashMap::new();
        let of_key = writes.get(&r.key).unwrap_or(&empty);
        if let Some(problem) = judge(r, of_key) {
            findings.push(StalenessFinding {
                read: r.clone(),
                problem,
            });
        }
    }
    findings
}

fn judge(r: &StaleRead, writes: &HashMap<String, Write>) -> Option<String> {
    if let (Some(asked), Some(bound)) = (r.asked, r.bound) {
        if bound > asked {
            return Some(format!(
                "reported a bound of {bound:?} for a read that asked for at most {asked:?}"
            ));
        }
    }
    // Rule 1: the value exists.
    let read_write = match &r.value {
        None => None,
        Some(v) => match writes.get(v) {
            Some(w) if w.invoke < r.complete => Some(*w),
            Some(_) => return Some(format!("returned {v:?}, written only after the read completed")),
            None => return Some(format!("returned {v:?}, which nothing wrote")),
        },
    };
    // Rule 2: no acknowledged write before `invoke - bound` is newer than what was returned.
    let bound = r.bound?;
    let horizon = r
        .invoke
        .saturating_sub(u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX));
    let missed = writes
        .iter()
        .filter(|(_, w)| w.acked.is_some_and(|a| a < horizon))
        .filter(|(_, w)| match read_write {
            // The initial absence is older than every write.
            None => true,
            // The returned value's write finished before this one began.
            Some(rw) => rw.acked.is_some_and(|a| a < w.invoke),
        })
        .max_by_key(|(_, w)| w.acked);
    missed.map(|(v, w)| {
        format!(
            "returned {:?} with a bound of {bound:?}, but {v:?} was acknowledged at {} ns, before {} ns \
             (the read's invoke minus its bound), and the returned value is older",
            r.value,
            w.acked.unwrap_or_default(),
            horizon
        )
    })
}

/// Per key, every value written (by a write or a CAS that may have applied) with its times.
fn writes_by_key(events: &[Event]) -> HashMap<String, HashMap<String, Write>> {
    let mut out: HashMap<String, HashMap<String, Write>> = HashMap::new();
    for e in events {
        let value = match (&e.f, &e.value) {
            (Op::Write, Value::Str(v)) => v.clone(),
            (Op::Cas, Value::Cas { new, .. }) => new.clone(),
            _ => continue,
        };
        let entry = out.entry(e.key.clone()).or_default();
        match e.kind {
            EventKind::Invoke => {
                entry.insert(
                    value,
                    Write {
                        invoke: e.time,
                        acked: None,
                    },
                );
            }
            EventKind::Ok => {
                if let Some(w) = entry.get_mut(&value) {
                    w.acked = Some(e.time);
                }
            }
            // A failed write never applied; a failed CAS's comparison failed.
            EventKind::Fail => {
                entry.remove(&value);
            }
            EventKind::Info => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn history(ops: &[(&str, u64, Option<u64>)]) -> History {
        let mut h = History::new();
        let mut events = Vec::new();
        for (i, (v, invoke, ok)) in ops.iter().enumerate() {
            events.push(Event::new(
                i as u64,
                EventKind::Invoke,
                Op::Write,
                "k",
                Value::Str(v.to_string()),
                *invoke,
            ));
            if let Some(t) = ok {
                events.push(Event::new(
                    i as u64,
                    EventKind::Ok,
                    Op::Write,
                    "k",
                    Value::Str(v.to_string()),
                    *t,
                ));
            }
        }
        events.sort_by_key(|e| e.time);
        for e in events {
            h.push(e);
        }
        h
    }

    fn read(value: Option<&str>, invoke: u64, bound_ms: Option<u64>) -> StaleRead {
        StaleRead {
            process: 9,
            key: "k".into(),
            invoke,
            complete: invoke + MS,
            value: value.map(str::to_string),
            bound: bound_ms.map(Duration::from_millis),
            asked: None,
        }
    }

    #[test]
    fn a_read_within_its_bound_passes_and_one_past_it_is_caught() {
        // a acked at 10 ms, b invoked at 20 ms and acked at 30 ms.
        let h = history(&[("a", 0, Some(10 * MS)), ("b", 20 * MS, Some(30 * MS))]);
        // At 100 ms with a 80 ms bound, b (acked at 30 ms) need not be reflected: "a" is fine.
        assert!(check(&h, &[read(Some("a"), 100 * MS, Some(80))]).is_empty());
        // With a 50 ms bound it must be: "a" is older than b. The planted bug's shape.
        let found = check(&h, &[read(Some("a"), 100 * MS, Some(50))]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].problem.contains("\"b\""), "{}", found[0].problem);
        // Absent is older than everything.
        assert_eq!(check(&h, &[read(None, 100 * MS, Some(50))]).len(), 1);
        // b itself is fine at any bound.
        assert!(check(&h, &[read(Some("b"), 100 * MS, Some(0))]).is_empty());
    }

    #[test]
    fn concurrent_writes_are_not_judged_older() {
        // a and b overlap: neither is known to be older than the other.
        let h = history(&[("a", 0, Some(30 * MS)), ("b", 10 * MS, Some(20 * MS))]);
        assert!(check(&h, &[read(Some("a"), 100 * MS, Some(0))]).is_empty());
    }

    #[test]
    fn invented_and_future_values_are_caught_and_unknown_bounds_only_checked_for_existence() {
        let h = history(&[("a", 0, Some(10 * MS)), ("late", 500 * MS, Some(510 * MS))]);
        assert_eq!(check(&h, &[read(Some("zzz"), 100 * MS, None)]).len(), 1);
        assert_eq!(check(&h, &[read(Some("late"), 100 * MS, None)]).len(), 1);
        assert!(
            check(&h, &[read(None, 100 * MS, None)]).is_empty(),
            "no bound, no freshness claim"
        );
    }

    #[test]
    fn a_bound_over_the_one_asked_for_is_caught() {
        let h = history(&[("a", 0, Some(10 * MS))]);
        let mut r = read(Some("a"), 100 * MS, Some(900));
        r.asked = Some(Duration::from_millis(500));
        assert_eq!(check(&h, &[r]).len(), 1);
    }
}
