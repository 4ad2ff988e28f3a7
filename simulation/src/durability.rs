//! "No acknowledged write is lost": the final state, read after the cluster healed and every
//! node restarted, must be one the history could have produced.
//!
//! For each key, the final value must be the value of some write or successful CAS that is
//! acknowledged (`ok`) or of unknown outcome, and that is not *superseded*: completed strictly
//! before another acknowledged write to the key was invoked. A superseded write cannot be the
//! last to take effect in any linearization, because the acknowledged write after it took effect
//! later. And if the key has any acknowledged write, the final value cannot be absent: this
//! history model has no delete.
//!
//! The check is sound (never reports a state a correct store could reach) but deliberately not
//! complete: it ignores reads and does not look for a linearization, which is the
//! [`crate::linearizability`] checker's job. What it adds is the final state itself, which no
//! client read during the run, so a write lost in a crash or a restart after the last read is
//! caught here and only here.
//!
//! A key missing from the final state map is taken to be absent: the caller must read every key
//! the history touched, which a final read of all keys naturally does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::history::{History, HistoryError, Op, OpKind, Operation};

/// An acknowledged write (or successful CAS) the final state should reflect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedWrite {
    pub process: u64,
    pub f: Op,
    pub value: String,
    pub call: u64,
    pub ret: u64,
    /// Position of its invoke in the history.
    pub index: usize,
}

impl fmt::Display for AckedWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.f == Op::Cas { "cas" } else { "write" };
        write!(
            f,
            "p{} {name} {:?} [{}, {}] (event {})",
            self.process, self.value, self.call, self.ret, self.index
        )
    }
}

/// A key whose final value the history cannot explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurabilityFinding {
    /// The final value is absent, superseded, or never written, while acknowledged writes exist.
    /// `lost` lists the acknowledged writes not superseded by another: the final value should
    /// have come from one of them (or from a later unknown write), and none survived.
    LostWrite {
        key: String,
        final_value: Option<String>,
        lost: Vec<AckedWrite>,
    },
    /// The key has no acknowledged write, and its final value was not written by any
    /// acknowledged or unknown operation: the store made it up (or revived a failed write).
    UnwrittenValue { key: String, final_value: String },
}

impl fmt::Display for DurabilityFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurabilityFinding::LostWrite { key, final_value, lost } => {
                let lost: Vec<String> = lost.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "key {key:?}: final value {final_value:?} loses acknowledged write(s) {}",
                    lost.join(", ")
                )
            }
            DurabilityFinding::UnwrittenValue { key, final_value } => {
                write!(
                    f,
                    "key {key:?}: final value {final_value:?} was never written by an ok or unknown operation"
                )
            }
        }
    }
}

/// Checks the final state against the history's writes; findings are in key order.
pub fn check(
    history: &History,
    final_state: &BTreeMap<String, Option<String>>,
) -> Result<Vec<DurabilityFinding>, HistoryError> {
    Ok(check_operations(&history.operations()?, final_state))
}

/// [`check`], on already paired operations.
pub fn check_operations(ops: &[Operation], final_state: &BTreeMap<String, Option<String>>) -> Vec<DurabilityFinding> {
    // Only writes and CASes that are ok or unknown can have produced a value: reads change
    // nothing and failed operations were already dropped by the pairing.
    let mut writes: BTreeMap<&str, Vec<(&Operation, &str)>> = BTreeMap::new();
    for op in ops {
        let value = match &op.kind {
            OpKind::Write { value } => value,
            OpKind::Cas { new, .. } => new,
            OpKind::Read { .. } => continue,
        };
        writes.entry(op.key.as_str()).or_default().push((op, value));
    }
    let keys: BTreeSet<&str> = writes
        .keys()
        .copied()
        .chain(final_state.keys().map(String::as_str))
        .collect();

    let mut findings = Vec::new();
    for key in keys {
        let final_value = final_state.get(key).cloned().flatten();
        let writes = writes.get(key).map(Vec::as_slice).unwrap_or_default();
        let acked: Vec<&(&Operation, &str)> = writes.iter().filter(|(op, _)| !op.is_unknown()).collect();
        let superseded = |candidate: &Operation| acked.iter().any(|(acked, _)| candidate.precedes(acked));
        let producible = match &final_value {
            None => acked.is_empty(),
            Some(value) => writes.iter().any(|(op, written)| written == value && !superseded(op)),
        };
        if producible {
            continue;
        }
        if acked.is_empty() {
            // Only reachable with a value: an absent final value is producible without acks.
            if let Some(final_value) = final_value {
                findings.push(DurabilityFinding::UnwrittenValue {
                    key: key.to_owned(),
                    final_value,
                });
            }
            continue;
        }
        let lost = acked
            .iter()
            .filter(|(op, _)| !superseded(op))
            .map(|&&(op, value)| AckedWrite {
                process: op.process,
                f: op.f(),
                value: value.to_owned(),
                call: op.call,
                // `acked` holds only operations with a known return.
                ret: op.ret.unwrap_or(u64::MAX),
                index: op.index,
            })
            .collect();
        findings.push(DurabilityFinding::LostWrite {
            key: key.to_owned(),
            final_value,
            lost,
        });
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, EventKind, Value};

    fn history(ops: &[(u64, &str, Op, &str, EventKind, u64, u64)]) -> History {
        let mut events = Vec::new();
        for &(process, key, f, value, end, call, ret) in ops {
            let value = match f {
                Op::Cas => Value::Cas {
                    expected: None,
                    new: value.into(),
                },
                _ => Value::Str(value.into()),
            };
            events.push(Event::new(process, EventKind::Invoke, f, key, value.clone(), call));
            if end != EventKind::Invoke {
                events.push(Event::new(process, end, f, key, value, ret));
            }
        }
        events.sort_by_key(|e| e.time);
        let mut history = History::new();
        events.into_iter().for_each(|e| history.push(e));
        history
    }

    fn state(entries: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    const W: Op = Op::Write;
    const OK: EventKind = EventKind::Ok;

    #[test]
    fn missing_acknowledged_write_is_a_finding() {
        let h = history(&[(1, "a", W, "v1", OK, 0, 10), (2, "b", W, "x", OK, 0, 10)]);
        let findings = check(&h, &state(&[("a", None), ("b", Some("x"))])).unwrap();
        assert_eq!(
            findings,
            vec![DurabilityFinding::LostWrite {
                key: "a".into(),
                final_value: None,
                lost: vec![AckedWrite {
                    process: 1,
                    f: W,
                    value: "v1".into(),
                    call: 0,
                    ret: 10,
                    index: 0
                }],
            }]
        );
        // A key left out of the final state counts as absent.
        let findings = check(&h, &state(&[("b", Some("x"))])).unwrap();
        assert_eq!(findings.len(), 1);
        assert!(
            findings[0].to_string().contains("p1 write \"v1\" [0, 10]"),
            "{}",
            findings[0]
        );
    }

    #[test]
    fn final_value_from_an_unknown_write_is_fine() {
        for end in [EventKind::Info, EventKind::Invoke] {
            let h = history(&[(1, "a", W, "v1", OK, 0, 10), (2, "a", W, "v2", end, 20, 30)]);
            assert_eq!(check(&h, &state(&[("a", Some("v2"))])).unwrap(), vec![]);
            assert_eq!(check(&h, &state(&[("a", Some("v1"))])).unwrap(), vec![]);
        }
        // Nothing acknowledged: absent is fine too.
        let h = history(&[(2, "a", W, "v2", EventKind::Info, 20, 30)]);
        assert_eq!(check(&h, &state(&[("a", None)])).unwrap(), vec![]);
    }

    #[test]
    fn final_value_older_than_a_later_acknowledged_write_is_a_finding() {
        let h = history(&[(1, "a", W, "v1", OK, 0, 10), (2, "a", Op::Cas, "v2", OK, 20, 30)]);
        let findings = check(&h, &state(&[("a", Some("v1"))])).unwrap();
        match &findings[..] {
            [DurabilityFinding::LostWrite { key, final_value, lost }] => {
                assert_eq!((key.as_str(), final_value.as_deref()), ("a", Some("v1")));
                assert_eq!(lost.len(), 1);
                assert_eq!((lost[0].f, lost[0].value.as_str()), (Op::Cas, "v2"));
            }
            other => panic!("expected one lost write, got {other:?}"),
        }
        // Overlapping acknowledged writes may land in either order.
        let h = history(&[(1, "a", W, "v1", OK, 0, 25), (2, "a", W, "v2", OK, 20, 30)]);
        assert_eq!(check(&h, &state(&[("a", Some("v1"))])).unwrap(), vec![]);
        assert_eq!(check(&h, &state(&[("a", Some("v2"))])).unwrap(), vec![]);
    }

    #[test]
    fn failed_or_never_written_values_are_findings() {
        let h = history(&[(1, "a", W, "v1", EventKind::Fail, 0, 10)]);
        assert_eq!(check(&h, &state(&[("a", None)])).unwrap(), vec![]);
        assert_eq!(
            check(&h, &state(&[("a", Some("v1")), ("z", Some("ghost"))])).unwrap(),
            vec![
                DurabilityFinding::UnwrittenValue {
                    key: "a".into(),
                    final_value: "v1".into()
                },
                DurabilityFinding::UnwrittenValue {
                    key: "z".into(),
                    final_value: "ghost".into()
                },
            ]
        );
    }
}
