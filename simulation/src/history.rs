//! The operation history, as a Jepsen-style client workload records it.
//!
//! A history is the ordered list of [`Event`]s the clients observed: each operation appears as an
//! `invoke` when a client issues it and, later, as at most one completion from the same process:
//! `ok` (it happened, with this result), `fail` (it definitely did not happen) or `info` (the
//! client gave up without learning the outcome: a timeout, a dropped connection). A history is
//! the checkers' only input, so it is also the unit of reproducibility: it serialises to one
//! canonical JSON-lines form ([`History::to_json_lines`]) whose [`History::hash`] two runs of
//! the same seed must agree on.
//!
//! Invariants, checked when the history is turned into [`Operation`]s (and the value shapes also
//! when it is parsed), because a checker fed a malformed history would give a meaningless
//! verdict rather than an error:
//!
//! - a process has at most one outstanding operation (processes are sequential clients, so a
//!   second invoke before the first completes is a bug in the recorder, not a concurrency fact);
//! - a completion names the same function and key as its invoke, and for writes and CAS carries
//!   the same value, and never happens before its invoke;
//! - each event's value has the shape its function and type call for (see [`Value`]).
//!
//! Conventions the checkers rely on: `fail` means *definitely not applied*, so failed operations
//! are dropped; `info`, or no completion at all, means *unknown*: the operation may have taken
//! effect at any time after its invoke, or never, so its return time is +infinity. The workload
//! records a CAS whose comparison failed as `fail`: it had no effect, exactly like an operation
//! that was never applied.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};

use serde::de::{Deserializer, Error as _};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

/// What an event records: the start of an operation or one of its three possible endings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The client issued the operation.
    Invoke,
    /// The operation took effect, with the recorded result.
    Ok,
    /// The operation definitely did not take effect.
    Fail,
    /// The client does not know whether the operation took effect.
    Info,
}

/// The function an operation applies to its key's register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Read,
    Write,
    Cas,
}

/// An event's value. Its JSON form is `null`, a string, or a two-element array, and which one
/// is legal depends on the event's function and type:
///
/// | f       | invoke                 | ok                               | fail / info            |
/// |---------|------------------------|----------------------------------|------------------------|
/// | `read`  | `null`                 | `null` (key absent) or `"v"`     | `null`                 |
/// | `write` | `"v"`                  | same as invoke                   | same as invoke         |
/// | `cas`   | `[expected, "new"]`    | same as invoke                   | same as invoke         |
///
/// where `expected` is `null` for "expect the key to be absent".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// JSON `null`: no value (a read's invoke) or "the key is absent" (a read's result).
    Nil,
    /// A string: the value a write writes or a read returned.
    Str(String),
    /// A CAS's operands: set `new` iff the current value equals `expected` (`None` = absent).
    Cas { expected: Option<String>, new: String },
}

impl Value {
    /// The value a read returned: `None` means the key was absent.
    pub fn read_result(value: Option<String>) -> Value {
        value.map_or(Value::Nil, Value::Str)
    }

    /// Interprets this value as a read's result (`Nil` = absent), if it has that shape.
    pub fn as_read_result(&self) -> Option<Option<&str>> {
        match self {
            Value::Nil => Some(None),
            Value::Str(s) => Some(Some(s)),
            Value::Cas { .. } => None,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Nil => serializer.serialize_none(),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Cas { expected, new } => {
                let mut tuple = serializer.serialize_tuple(2)?;
                tuple.serialize_element(expected)?;
                tuple.serialize_element(new)?;
                tuple.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Untagged matching is unambiguous here: null, string and array are distinct JSON types.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Str(String),
            Cas(Option<String>, String),
        }
        match Option::<Repr>::deserialize(deserializer) {
            Ok(None) => Ok(Value::Nil),
            Ok(Some(Repr::Str(s))) => Ok(Value::Str(s)),
            Ok(Some(Repr::Cas(expected, new))) => Ok(Value::Cas { expected, new }),
            Err(_) => Err(D::Error::custom(
                "value must be null, a string, or a [expected-or-null, new] pair of strings",
            )),
        }
    }
}

/// One line of the history. Field order is the canonical JSON field order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The client (a sequential process) that issued the operation.
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub f: Op,
    pub key: String,
    pub value: Value,
    /// Nanoseconds on a monotonic clock shared by every process of the run.
    pub time: u64,
}

impl Event {
    pub fn new(process: u64, kind: EventKind, f: Op, key: impl Into<String>, value: Value, time: u64) -> Event {
        Event {
            process,
            kind,
            f,
            key: key.into(),
            value,
            time,
        }
    }

    /// Checks that the value has the shape the table on [`Value`] prescribes.
    fn check_value_shape(&self) -> Result<(), &'static str> {
        match (self.f, self.kind, &self.value) {
            (Op::Read, EventKind::Ok, Value::Nil | Value::Str(_)) => Ok(()),
            (Op::Read, EventKind::Ok, Value::Cas { .. }) => Err("a read's result must be null or a string"),
            (Op::Read, _, Value::Nil) => Ok(()),
            (Op::Read, _, _) => Err("a read's invoke, fail and info carry no value (null)"),
            (Op::Write, _, Value::Str(_)) => Ok(()),
            (Op::Write, _, _) => Err("a write carries the written value as a string"),
            (Op::Cas, _, Value::Cas { .. }) => Ok(()),
            (Op::Cas, _, _) => Err("a CAS carries [expected-or-null, new]"),
        }
    }
}

/// What an operation did, with its result where the outcome is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `observed` is `Some(result)` for a completed read (`Some(None)`: key absent) and `None`
    /// when the outcome is unknown.
    Read {
        observed: Option<Option<String>>,
    },
    Write {
        value: String,
    },
    /// Only successful or unknown CASes become operations: a CAS whose comparison failed is
    /// recorded as `fail` and dropped.
    Cas {
        expected: Option<String>,
        new: String,
    },
}

/// An invoke paired with its completion: one operation with a real-time interval.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Operation {
    pub process: u64,
    pub key: String,
    pub kind: OpKind,
    /// Time of the invoke.
    pub call: u64,
    /// Time of the `ok` completion; `None` when the outcome is unknown (+infinity).
    pub ret: Option<u64>,
    /// Position of the invoke in the history, to point a reader at it.
    pub index: usize,
}

impl Operation {
    /// Whether the outcome is unknown: the operation may have taken effect, or never.
    pub fn is_unknown(&self) -> bool {
        self.ret.is_none()
    }

    /// The function this operation applies.
    pub fn f(&self) -> Op {
        match self.kind {
            OpKind::Read { .. } => Op::Read,
            OpKind::Write { .. } => Op::Write,
            OpKind::Cas { .. } => Op::Cas,
        }
    }

    /// Whether `self` finished strictly before `other` started. Equal timestamps count as
    /// concurrent: that can only add legal orders, never hide a violation that exists.
    pub fn precedes(&self, other: &Operation) -> bool {
        self.ret.is_some_and(|ret| ret < other.call)
    }
}

fn fmt_opt(value: &Option<String>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "absent".to_owned(),
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{} ", self.process)?;
        match &self.kind {
            OpKind::Read { observed: Some(v) } => write!(f, "read -> {}", fmt_opt(v))?,
            OpKind::Read { observed: None } => write!(f, "read -> ?")?,
            OpKind::Write { value } => write!(f, "write {value:?}")?,
            OpKind::Cas { expected, new } => write!(f, "cas {} -> {new:?}", fmt_opt(expected))?,
        }
        match self.ret {
            Some(ret) => write!(f, " [{}, {}]", self.call, ret),
            None => write!(f, " [{}, unknown outcome]", self.call),
        }
    }
}

/// A history that cannot be read or does not follow the recording protocol.
#[derive(thiserror::Error, Debug)]
pub enum HistoryError {
    #[error("line {line}: cannot read history: {source}")]
    Io {
        line: usize,
        #[source]
        source: std::io::Error,
    },

    #[error("line {line}: invalid event: {source}")]
    Json {
        line: usize,
        #[source]
        source: serde_json::Error,
    },

    /// An event's value has the wrong shape for its function and type. `index` is the event's
    /// position (0-based); in a JSON-lines file it is on line `index + 1`.
    #[error("event {index} (line {}): invalid value: {reason}", index + 1)]
    InvalidValue { index: usize, reason: &'static str },

    #[error("event {index} (line {}): process {process} completes an operation it never invoked", index + 1)]
    CompletionWithoutInvoke { index: usize, process: u64 },

    #[error(
        "event {index} (line {}): process {process} invokes while its operation invoked at event {outstanding} is \
         still outstanding",
        index + 1
    )]
    ConcurrentInvoke {
        index: usize,
        process: u64,
        outstanding: usize,
    },

    #[error(
        "event {index} (line {}): process {process}'s completion does not match its invoke at event {invoke}: {reason}",
        index + 1
    )]
    CompletionMismatch {
        index: usize,
        process: u64,
        invoke: usize,
        reason: String,
    },
}

/// The recorded history of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct History {
    events: Vec<Event>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// Appends an event. Recording never fails; the protocol is checked by
    /// [`History::operations`], so a recorder bug surfaces as a typed error at check time.
    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Writes the canonical form: one compact JSON object per line, fields in the order
    /// `process, type, f, key, value, time`, each line ending in `\n`.
    pub fn to_json_lines<W: Write>(&self, out: &mut W) -> std::io::Result<()> {
        for event in &self.events {
            serde_json::to_writer(&mut *out, event).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Parses the canonical form. Every line must be one event (no blank lines), so event `i`
    /// is on line `i + 1` and errors from [`History::operations`] point at the right line too.
    pub fn from_json_lines<R: BufRead>(input: R) -> Result<History, HistoryError> {
        let mut history = History::new();
        for (index, line) in input.lines().enumerate() {
            let line_no = index + 1;
            let line = line.map_err(|source| HistoryError::Io { line: line_no, source })?;
            let event: Event =
                serde_json::from_str(&line).map_err(|source| HistoryError::Json { line: line_no, source })?;
            event
                .check_value_shape()
                .map_err(|reason| HistoryError::InvalidValue { index, reason })?;
            history.push(event);
        }
        Ok(history)
    }

    /// FNV-1a (64-bit) of the canonical JSON-lines bytes. Implemented here because std's
    /// hashers are not guaranteed stable across Rust releases, and this hash is compared across
    /// runs and machines to prove a seed reproduces the same history.
    pub fn hash(&self) -> u64 {
        let mut hasher = Fnv1a::default();
        self.to_json_lines(&mut hasher)
            .expect("invariant: the FNV writer never fails and events hold only strings and integers");
        hasher.0
    }

    /// Pairs each invoke with its completion from the same process, in invoke order.
    ///
    /// `ok` gives a completed operation; `info` or a missing completion gives one of unknown
    /// outcome (`ret: None`); `fail` drops the operation, since it definitely did not happen.
    pub fn operations(&self) -> Result<Vec<Operation>, HistoryError> {
        // Slots are indexed by invoke position so the output keeps invoke order; `None` marks a
        // failed operation, which is dropped at the end.
        let mut slots: Vec<Option<Operation>> = Vec::new();
        let mut outstanding: BTreeMap<u64, (usize, usize)> = BTreeMap::new(); // process -> (event, slot)
        for (index, event) in self.events.iter().enumerate() {
            event
                .check_value_shape()
                .map_err(|reason| HistoryError::InvalidValue { index, reason })?;
            if event.kind == EventKind::Invoke {
                if let Some(&(outstanding, _)) = outstanding.get(&event.process) {
                    return Err(HistoryError::ConcurrentInvoke {
                        index,
                        process: event.process,
                        outstanding,
                    });
                }
                outstanding.insert(event.process, (index, slots.len()));
                slots.push(Some(invoked_operation(index, event)));
                continue;
            }
            let Some((invoke_index, slot)) = outstanding.remove(&event.process) else {
                return Err(HistoryError::CompletionWithoutInvoke {
                    index,
                    process: event.process,
                });
            };
            let invoke = &self.events[invoke_index];
            let mismatch = |reason: String| HistoryError::CompletionMismatch {
                index,
                process: event.process,
                invoke: invoke_index,
                reason,
            };
            if event.f != invoke.f {
                return Err(mismatch(format!("f is {:?}, invoke's is {:?}", event.f, invoke.f)));
            }
            if event.key != invoke.key {
                return Err(mismatch(format!(
                    "key is {:?}, invoke's is {:?}",
                    event.key, invoke.key
                )));
            }
            if event.f != Op::Read && event.value != invoke.value {
                return Err(mismatch(format!(
                    "value is {:?}, invoke's is {:?}",
                    event.value, invoke.value
                )));
            }
            if event.time < invoke.time {
                return Err(mismatch(format!(
                    "completes at {} before its invoke at {}",
                    event.time, invoke.time
                )));
            }
            match event.kind {
                EventKind::Ok => {
                    if let Some(op) = &mut slots[slot] {
                        op.ret = Some(event.time);
                        if let OpKind::Read { observed } = &mut op.kind {
                            // The shape check above admits only null (absent) or a string here.
                            *observed = Some(match &event.value {
                                Value::Str(value) => Some(value.clone()),
                                _ => None,
                            });
                        }
                    }
                }
                EventKind::Fail => slots[slot] = None,
                // Unknown outcome: the operation stays as invoked, with an infinite return time.
                EventKind::Info => {}
                EventKind::Invoke => unreachable!("invokes are handled above"),
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

/// The operation an invoke starts, before its outcome is known.
fn invoked_operation(index: usize, event: &Event) -> Operation {
    let kind = match &event.value {
        Value::Cas { expected, new } => OpKind::Cas {
            expected: expected.clone(),
            new: new.clone(),
        },
        Value::Str(value) if event.f == Op::Write => OpKind::Write { value: value.clone() },
        // The shape check leaves only reads here.
        _ => OpKind::Read { observed: None },
    };
    Operation {
        process: event.process,
        key: event.key.clone(),
        kind,
        call: event.time,
        ret: None,
        index,
    }
}

/// 64-bit FNV-1a as an `io::Write`: stable across platforms and Rust versions, unlike `std`'s
/// hashers, which is what lets a hash printed on one machine be compared on another.
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Write for Fnv1a {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &str) -> String {
        v.to_owned()
    }

    pub(crate) fn ev(process: u64, kind: EventKind, f: Op, key: &str, value: Value, time: u64) -> Event {
        Event::new(process, kind, f, key, value, time)
    }

    #[test]
    fn one_line_has_the_exact_canonical_bytes() {
        let mut history = History::new();
        history.push(ev(
            3,
            EventKind::Invoke,
            Op::Cas,
            "k",
            Value::Cas {
                expected: None,
                new: s("b"),
            },
            17,
        ));
        history.push(ev(
            3,
            EventKind::Ok,
            Op::Cas,
            "k",
            Value::Cas {
                expected: Some(s("a")),
                new: s("b"),
            },
            18,
        ));
        history.push(ev(1, EventKind::Ok, Op::Read, "k\"1", Value::Nil, 19));
        history.push(ev(2, EventKind::Info, Op::Write, "k", Value::Str(s("v")), 20));
        let mut out = Vec::new();
        history.to_json_lines(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            concat!(
                r#"{"process":3,"type":"invoke","f":"cas","key":"k","value":[null,"b"],"time":17}"#,
                "\n",
                r#"{"process":3,"type":"ok","f":"cas","key":"k","value":["a","b"],"time":18}"#,
                "\n",
                r#"{"process":1,"type":"ok","f":"read","key":"k\"1","value":null,"time":19}"#,
                "\n",
                r#"{"process":2,"type":"info","f":"write","key":"k","value":"v","time":20}"#,
                "\n",
            )
        );
    }

    #[test]
    fn hash_is_fnv1a_of_the_canonical_bytes() {
        // Reference values of 64-bit FNV-1a: pin the implementation, since the hash is compared
        // across runs and machines.
        let mut empty = Fnv1a::default();
        empty.write_all(b"").unwrap();
        assert_eq!(empty.0, 0xcbf2_9ce4_8422_2325);
        let mut a = Fnv1a::default();
        a.write_all(b"a").unwrap();
        assert_eq!(a.0, 0xaf63_dc4c_8601_ec8c);

        let mut history = History::new();
        history.push(ev(1, EventKind::Invoke, Op::Write, "k", Value::Str(s("v")), 1));
        let mut bytes = Vec::new();
        history.to_json_lines(&mut bytes).unwrap();
        let mut direct = Fnv1a::default();
        direct.write_all(&bytes).unwrap();
        assert_eq!(history.hash(), direct.0);

        let mut other = history.clone();
        other.push(ev(1, EventKind::Ok, Op::Write, "k", Value::Str(s("v")), 2));
        assert_ne!(history.hash(), other.hash());
    }

    #[test]
    fn parse_errors_carry_line_numbers() {
        let good = r#"{"process":1,"type":"invoke","f":"read","key":"k","value":null,"time":1}"#;
        let cases = [
            (format!("{good}\n{{not json\n"), 2),
            (format!("{good}\n{good}\n\n{good}\n"), 3),
            (format!("{good}\n{}\n", good.replace("\"read\"", "\"delete\"")), 2),
            (format!("{}\n", good.replace("null", "[1,2]")), 1),
            (
                format!("{good}\n{}\n", good.replace("\"time\"", "\"extra\":1,\"time\"")),
                2,
            ),
        ];
        for (input, line) in cases {
            match History::from_json_lines(input.as_bytes()) {
                Err(HistoryError::Json { line: got, .. }) => assert_eq!(got, line, "{input}"),
                other => panic!("expected a JSON error on line {line}, got {other:?}"),
            }
        }
        // Well-formed JSON whose value has the wrong shape for its function.
        let bad_shape = format!("{good}\n{}\n", good.replace("null", "\"x\""));
        match History::from_json_lines(bad_shape.as_bytes()) {
            Err(err @ HistoryError::InvalidValue { index: 1, .. }) => assert!(err.to_string().contains("line 2")),
            other => panic!("expected an invalid value on line 2, got {other:?}"),
        }
    }

    fn op_of(process: u64, key: &str, kind: OpKind, call: u64, ret: Option<u64>, index: usize) -> Operation {
        Operation {
            process,
            key: key.to_owned(),
            kind,
            call,
            ret,
            index,
        }
    }

    #[test]
    fn pairing_gives_ok_unknown_and_drops_fail() {
        let w = |v: &str| Value::Str(s(v));
        let mut h = History::new();
        h.push(ev(1, EventKind::Invoke, Op::Write, "a", w("1"), 1)); // 0: ok
        h.push(ev(2, EventKind::Invoke, Op::Write, "a", w("2"), 2)); // 1: info
        h.push(ev(3, EventKind::Invoke, Op::Write, "b", w("3"), 3)); // 2: fail
        h.push(ev(4, EventKind::Invoke, Op::Read, "a", Value::Nil, 4)); // 3: ok, reads "1"
        h.push(ev(1, EventKind::Ok, Op::Write, "a", w("1"), 5));
        h.push(ev(2, EventKind::Info, Op::Write, "a", w("2"), 6));
        h.push(ev(3, EventKind::Fail, Op::Write, "b", w("3"), 7));
        h.push(ev(4, EventKind::Ok, Op::Read, "a", w("1"), 8));
        h.push(ev(5, EventKind::Invoke, Op::Read, "b", Value::Nil, 9)); // 8: ok, reads absent
        h.push(ev(5, EventKind::Ok, Op::Read, "b", Value::Nil, 10));
        h.push(ev(
            6,
            EventKind::Invoke,
            Op::Cas,
            "b",
            Value::Cas {
                expected: None,
                new: s("x"),
            },
            11,
        )); // 10: never completes
        h.push(ev(7, EventKind::Invoke, Op::Read, "b", Value::Nil, 12)); // 11: info read
        h.push(ev(7, EventKind::Info, Op::Read, "b", Value::Nil, 13));
        // The same process may invoke again once its previous operation completed.
        h.push(ev(1, EventKind::Invoke, Op::Read, "a", Value::Nil, 14)); // 13: never completes
        let ops = h.operations().unwrap();
        assert_eq!(
            ops,
            vec![
                op_of(1, "a", OpKind::Write { value: s("1") }, 1, Some(5), 0),
                op_of(2, "a", OpKind::Write { value: s("2") }, 2, None, 1),
                op_of(
                    4,
                    "a",
                    OpKind::Read {
                        observed: Some(Some(s("1")))
                    },
                    4,
                    Some(8),
                    3
                ),
                op_of(5, "b", OpKind::Read { observed: Some(None) }, 9, Some(10), 8),
                op_of(
                    6,
                    "b",
                    OpKind::Cas {
                        expected: None,
                        new: s("x")
                    },
                    11,
                    None,
                    10
                ),
                op_of(7, "b", OpKind::Read { observed: None }, 12, None, 11),
                op_of(1, "a", OpKind::Read { observed: None }, 14, None, 13),
            ]
        );
        assert!(ops[1].is_unknown() && !ops[0].is_unknown());
        assert!(ops[0].precedes(&ops[3]) && !ops[0].precedes(&ops[2]) && !ops[1].precedes(&ops[6]));
    }

    #[test]
    fn protocol_violations_are_typed_errors() {
        let w = |v: &str| Value::Str(s(v));
        let check = |events: Vec<Event>| {
            let mut h = History::new();
            events.into_iter().for_each(|e| h.push(e));
            h.operations().unwrap_err()
        };
        let err = check(vec![ev(1, EventKind::Ok, Op::Write, "a", w("1"), 1)]);
        assert!(
            matches!(err, HistoryError::CompletionWithoutInvoke { index: 0, process: 1 }),
            "{err}"
        );

        let err = check(vec![
            ev(1, EventKind::Invoke, Op::Write, "a", w("1"), 1),
            ev(2, EventKind::Invoke, Op::Write, "a", w("2"), 2),
            ev(1, EventKind::Invoke, Op::Read, "a", Value::Nil, 3),
        ]);
        assert!(
            matches!(
                err,
                HistoryError::ConcurrentInvoke {
                    index: 2,
                    process: 1,
                    outstanding: 0
                }
            ),
            "{err}"
        );

        let mismatches = [
            ev(1, EventKind::Ok, Op::Read, "a", Value::Nil, 2),
            ev(1, EventKind::Ok, Op::Write, "b", w("1"), 2),
            ev(1, EventKind::Info, Op::Write, "a", w("other"), 2),
            ev(1, EventKind::Ok, Op::Write, "a", w("1"), 0),
        ];
        for completion in mismatches {
            let err = check(vec![
                ev(1, EventKind::Invoke, Op::Write, "a", w("1"), 1),
                completion.clone(),
            ]);
            assert!(
                matches!(
                    err,
                    HistoryError::CompletionMismatch {
                        index: 1,
                        process: 1,
                        invoke: 0,
                        ..
                    }
                ),
                "{completion:?}: {err}"
            );
        }

        // A pushed (not parsed) event with a wrong value shape is caught too.
        let err = check(vec![ev(1, EventKind::Invoke, Op::Write, "a", Value::Nil, 1)]);
        assert!(matches!(err, HistoryError::InvalidValue { index: 0, .. }), "{err}");
    }

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-c]{1,3}", any::<String>()]
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let kind = prop_oneof![
            Just(EventKind::Invoke),
            Just(EventKind::Ok),
            Just(EventKind::Fail),
            Just(EventKind::Info)
        ];
        let f = prop_oneof![Just(Op::Read), Just(Op::Write), Just(Op::Cas)];
        (
            any::<u64>(),
            kind,
            f,
            arb_string(),
            proptest::option::of(arb_string()),
            arb_string(),
            any::<u64>(),
        )
            .prop_map(|(process, kind, f, key, a, b, time)| {
                let value = match (f, kind) {
                    (Op::Read, EventKind::Ok) => Value::read_result(a),
                    (Op::Read, _) => Value::Nil,
                    (Op::Write, _) => Value::Str(b),
                    (Op::Cas, _) => Value::Cas { expected: a, new: b },
                };
                Event {
                    process,
                    kind,
                    f,
                    key,
                    value,
                    time,
                }
            })
    }

    proptest! {
        #[test]
        fn json_lines_round_trip(events in proptest::collection::vec(arb_event(), 0..20)) {
            let mut history = History::new();
            events.into_iter().for_each(|e| history.push(e));
            let mut bytes = Vec::new();
            history.to_json_lines(&mut bytes).unwrap();
            prop_assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), history.events().len());
            let parsed = History::from_json_lines(bytes.as_slice()).unwrap();
            prop_assert_eq!(parsed.hash(), history.hash());
            prop_assert_eq!(parsed, history);
        }
    }
}
