//! Per-key linearizability checking: Wing–Gong–Lowe search with Lowe's memoization, in the
//! style of Porcupine.
//!
//! Keys are independent registers, and linearizability is local (a history is linearizable iff
//! each object's sub-history is), so the history is partitioned by key and each key is checked
//! alone, in sorted key order so reports are reproducible.
//!
//! For one key the search looks for a total order of its operations that respects real time (an
//! operation that returned before another was invoked comes first) and that the sequential
//! [`Register`] accepts, result by result. It keeps the operations' call and return events in a
//! time-ordered doubly linked list; the operations that may take effect next are exactly those
//! whose call precedes the first remaining return. It tries each, removes it from the list
//! ("lifts" it) when the model accepts it, and backtracks by relinking it. Lowe's memoization
//! records every (set of linearized operations, register state) pair reached: reaching one
//! again cannot lead anywhere new, which turns the exponential search into one that is usually
//! fast on real histories.
//!
//! Operations of unknown outcome (`info`, or never completed) are *optional*: they may take
//! effect at any point after their call, with any result, or never. Their return time is
//! +infinity, so they never constrain other operations, and the search succeeds as soon as every
//! completed operation is linearized, whatever unknown operations remain. Unknown reads have no
//! effect and nothing to check, so they are dropped up front.
//!
//! Two operations with equal timestamps are treated as concurrent: that can only add orders the
//! search may pick, so a reported violation is never an artefact of clock resolution.
//!
//! The search is bounded by a step budget ([`CheckConfig::max_steps_per_key`]) rather than wall
//! time so the verdict, including [`Verdict::Unknown`], is the same on every machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use crate::history::{History, HistoryError, OpKind, Operation};
use crate::model::{Register, RegisterOp, Response};

/// Bounds on the search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    /// Search steps (candidate operations tried, plus backtracks) allowed for one key before the
    /// verdict for that key is [`Verdict::Unknown`]. Each step may add one memo entry, so this
    /// also bounds memory.
    pub max_steps_per_key: u64,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            max_steps_per_key: 1_000_000,
        }
    }
}

/// The outcome for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No linearization exists. The explanation names the longest linearizable prefix found and
    /// the operations that could not be placed after it.
    Violation {
        explanation: String,
    },
    /// The step budget ran out before the search concluded.
    Unknown {
        steps: u64,
    },
}

/// Verdicts for every key that appears in the checked operations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub keys: BTreeMap<String, Verdict>,
}

impl Report {
    /// Whether every key was proven linearizable. A key whose search ran out of budget is not
    /// ok: nothing was proven about it.
    pub fn ok(&self) -> bool {
        self.keys.values().all(|v| *v == Verdict::Linearizable)
    }

    /// `(key, explanation)` for every key with a violation, in key order.
    pub fn violations(&self) -> Vec<(&str, &str)> {
        self.keys
            .iter()
            .filter_map(|(key, verdict)| match verdict {
                Verdict::Violation { explanation } => Some((key.as_str(), explanation.as_str())),
                _ => None,
            })
            .collect()
    }

    /// Keys whose search ran out of budget, in key order.
    pub fn unknown(&self) -> Vec<&str> {
        self.keys
            .iter()
            .filter(|(_, verdict)| matches!(verdict, Verdict::Unknown { .. }))
            .map(|(key, _)| key.as_str())
            .collect()
    }
}

/// Pairs the history's events into operations and checks every key.
pub fn check(history: &History, config: &CheckConfig) -> Result<Report, HistoryError> {
    Ok(check_operations(&history.operations()?, config))
}

/// Checks every key of `ops` (as produced by [`History::operations`]: each `call <= ret`).
pub fn check_operations(ops: &[Operation], config: &CheckConfig) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let keys = by_key
        .into_iter()
        .map(|(key, ops)| (key.to_owned(), check_key(key, &ops, config)))
        .collect();
    Report { keys }
}

/// An operation translated for the search: values interned to small ids.
struct Prepared<'a> {
    input: RegisterOp<u32>,
    /// `None` for an unknown outcome.
    observed: Option<Response<u32>>,
    call: u64,
    ret: Option<u64>,
    source: &'a Operation,
}

/// Maps each distinct value of one key to a small id, so memo entries hold integers, not strings.
#[derive(Default)]
struct Interner<'a> {
    ids: HashMap<&'a str, u32>,
    values: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, value: &'a str) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = u32::try_from(self.values.len()).expect("invariant: fewer than 2^32 distinct values per key");
        self.ids.insert(value, id);
        self.values.push(value);
        id
    }

    fn describe(&self, value: Option<u32>) -> String {
        match value {
            Some(id) => format!("{:?}", self.values[id as usize]),
            None => "absent".to_owned(),
        }
    }

    /// "holds \"v\"" or "is absent", to finish a sentence about the register.
    fn state(&self, register: &Register<u32>) -> String {
        match register.value() {
            Some(&id) => format!("holds {}", self.describe(Some(id))),
            None => "is absent".to_owned(),
        }
    }
}

fn prepare<'a>(ops: &[&'a Operation], interner: &mut Interner<'a>) -> Vec<Prepared<'a>> {
    let mut prepared = Vec::with_capacity(ops.len());
    for &op in ops {
        debug_assert!(
            op.ret.is_none_or(|ret| ret >= op.call),
            "operation returns before its call: {op}"
        );
        let (input, observed) = match &op.kind {
            // An unknown read has no effect and any result: nothing to check.
            OpKind::Read { observed: None } => continue,
            OpKind::Read { observed: Some(value) } => (
                RegisterOp::Read,
                Some(Response::Read(value.as_deref().map(|v| interner.id(v)))),
            ),
            OpKind::Write { value } => (RegisterOp::Write(interner.id(value)), Some(Response::Written)),
            OpKind::Cas { expected, new } => {
                let expected = expected.as_deref().map(|v| interner.id(v));
                (
                    RegisterOp::Cas {
                        expected,
                        new: interner.id(new),
                    },
                    Some(Response::CasApplied),
                )
            }
        };
        let observed = if op.is_unknown() { None } else { observed };
        prepared.push(Prepared {
            input,
            observed,
            call: op.call,
            ret: op.ret,
            source: op,
        });
    }
    prepared
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// The time-ordered list of call and return events, with O(1) removal and reinsertion of an
/// operation (dancing links). Node 0 is the head sentinel.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// For each node, its operation.
    op: Vec<usize>,
    /// For call nodes, the node of the matching return; `NIL` for return nodes.
    ret_node: Vec<usize>,
}

impl EventList {
    fn new(ops: &[Prepared<'_>]) -> EventList {
        // (time, call-before-return at equal times, op) gives a total, deterministic order; an
        // unknown return sorts after every real time.
        let mut events: Vec<(u128, u8, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            events.push((u128::from(op.call), 0, i));
            events.push((op.ret.map_or(u128::MAX, u128::from), 1, i));
        }
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut list = EventList {
            next: (1..=nodes).map(|n| if n == nodes { NIL } else { n }).collect(),
            prev: (0..nodes).map(|n| if n == 0 { NIL } else { n - 1 }).collect(),
            op: vec![NIL; nodes],
            ret_node: vec![NIL; nodes],
        };
        let mut call_node = vec![NIL; ops.len()];
        for (position, &(_, is_return, op)) in events.iter().enumerate() {
            let node = position + 1;
            list.op[node] = op;
            if is_return == 0 {
                call_node[op] = node;
            } else {
                list.ret_node[call_node[op]] = node;
            }
        }
        list
    }

    fn is_call(&self, node: usize) -> bool {
        self.ret_node[node] != NIL
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    /// Removes a call node and its return node.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.ret_node[call]);
    }

    /// Undoes the most recent [`EventList::lift`] still in effect, which must be of `call`.
    fn unlift(&mut self, call: usize) {
        self.relink(self.ret_node[call]);
        self.relink(call);
    }
}

fn set_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

fn clear_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] &= !(1 << (i % 64));
}

/// Checks one key's operations.
pub fn check_key(key: &str, ops: &[&Operation], config: &CheckConfig) -> Verdict {
    let mut interner = Interner::default();
    let ops = prepare(ops, &mut interner);
    let mut list = EventList::new(&ops);
    let mut remaining_required = ops.iter().filter(|op| op.observed.is_some()).count();

    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    let mut memo: HashSet<(Vec<u64>, Register<u32>)> = HashSet::new();
    let mut state = Register::default();
    // The lifted call nodes, in linearization order, with the state before each.
    let mut stack: Vec<(usize, Register<u32>)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut steps = 0u64;
    let mut node = list.next[HEAD];

    while remaining_required > 0 {
        if steps >= config.max_steps_per_key {
            return Verdict::Unknown { steps };
        }
        steps += 1;
        if node != NIL && list.is_call(node) {
            let op = list.op[node];
            if let Some(next_state) = state.step(&ops[op].input, ops[op].observed.as_ref()) {
                set_bit(&mut linearized, op);
                if memo.insert((linearized.clone(), next_state.clone())) {
                    stack.push((node, std::mem::replace(&mut state, next_state)));
                    list.lift(node);
                    if ops[op].observed.is_some() {
                        remaining_required -= 1;
                    }
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|&(node, _)| list.op[node]).collect();
                    }
                    node = list.next[HEAD];
                    continue;
                }
                clear_bit(&mut linearized, op);
            }
            node = list.next[node];
        } else {
            // A return (or, defensively, the end): an operation that had to take effect before
            // everything after this point could not. Undo the last choice and try the next one.
            let Some((call, previous)) = stack.pop() else {
                return Verdict::Violation {
                    explanation: explain(key, &ops, &longest, &interner),
                };
            };
            let op = list.op[call];
            list.unlift(call);
            clear_bit(&mut linearized, op);
            if ops[op].observed.is_some() {
                remaining_required += 1;
            }
            state = previous;
            node = list.next[call];
        }
    }
    Verdict::Linearizable
}

/// How many operations an explanation lists before eliding the rest.
const EXPLAIN_LIMIT: usize = 8;

/// Describes a failed search: the longest linearizable prefix, the state after it, and why each
/// operation that could have come next could not.
fn explain(key: &str, ops: &[Prepared<'_>], longest: &[usize], interner: &Interner<'_>) -> String {
    let mut state = Register::default();
    let mut placed = vec![false; ops.len()];
    for &op in longest {
        state = state
            .step(&ops[op].input, ops[op].observed.as_ref())
            .expect("invariant: the longest prefix was accepted by the model when it was recorded");
        placed[op] = true;
    }
    let required = ops.iter().filter(|op| op.observed.is_some()).count();
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let mut out = format!(
        "key {key:?}: no linearization of its {required} completed operation{}; the longest linearizable prefix has {} \
         operation{}",
        plural(required),
        longest.len(),
        plural(longest.len())
    );
    if !longest.is_empty() {
        out.push_str(": ");
        let shown = longest.len().saturating_sub(EXPLAIN_LIMIT);
        if shown > 0 {
            let _ = write!(out, "({shown} earlier), ");
        }
        let prefix: Vec<String> = longest[shown..].iter().map(|&op| ops[op].source.to_string()).collect();
        out.push_str(&prefix.join(", "));
    }
    let _ = write!(out, "; after it the register {}", interner.state(&state));

    // Everything invoked before the earliest pending return could have come next.
    let deadline = ops
        .iter()
        .zip(&placed)
        .filter(|(_, &placed)| !placed)
        .filter_map(|(op, _)| op.ret)
        .min();
    let next: Vec<String> = ops
        .iter()
        .zip(&placed)
        .filter(|(op, &placed)| !placed && deadline.is_none_or(|deadline| op.call <= deadline))
        .take(EXPLAIN_LIMIT)
        .map(|(op, _)| format!("{} ({})", op.source, why_not(op, &state, interner)))
        .collect();
    let _ = write!(
        out,
        ". None of the operations that could come next leads to a linearization: {}",
        next.join(", ")
    );
    out
}

fn why_not(op: &Prepared<'_>, state: &Register<u32>, interner: &Interner<'_>) -> String {
    if state.step(&op.input, op.observed.as_ref()).is_some() {
        return "it can take effect, but the remaining operations cannot all follow".to_owned();
    }
    match &op.input {
        RegisterOp::Read => format!("the register {}", interner.state(state)),
        RegisterOp::Cas { expected, .. } => {
            format!(
                "it expects {} but the register {}",
                interner.describe(*expected),
                interner.state(state)
            )
        }
        RegisterOp::Write(_) => "unreachable: a write always takes effect".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, EventKind, Op, Value};
    use crate::model::{Register, RegisterOp, Response};
    use proptest::prelude::*;

    /// Builds a single-key history from operations given as (process, f, result, call,
    /// completion), completion `None` meaning the invoke is never completed.
    struct Builder {
        events: Vec<Event>,
    }

    impl Builder {
        fn new() -> Self {
            Builder { events: Vec::new() }
        }

        fn op(
            &mut self,
            process: u64,
            f: Op,
            key: &str,
            result: Value,
            call: u64,
            end: Option<(EventKind, u64)>,
        ) -> &mut Self {
            // Writes and CASes carry the same value on every event; only a read's ok differs.
            let invoke_value = if f == Op::Read { Value::Nil } else { result.clone() };
            self.events
                .push(Event::new(process, EventKind::Invoke, f, key, invoke_value, call));
            if let Some((kind, time)) = end {
                let value = if f == Op::Read && kind != EventKind::Ok {
                    Value::Nil
                } else {
                    result
                };
                self.events.push(Event::new(process, kind, f, key, value, time));
            }
            self
        }

        fn write(&mut self, p: u64, v: &str, call: u64, ret: u64) -> &mut Self {
            self.op(
                p,
                Op::Write,
                "k",
                Value::Str(v.into()),
                call,
                Some((EventKind::Ok, ret)),
            )
        }

        fn read(&mut self, p: u64, v: Option<&str>, call: u64, ret: u64) -> &mut Self {
            let result = Value::read_result(v.map(str::to_owned));
            self.op(p, Op::Read, "k", result, call, Some((EventKind::Ok, ret)))
        }

        fn cas(&mut self, p: u64, expected: Option<&str>, new: &str, call: u64, ret: u64) -> &mut Self {
            let v = Value::Cas {
                expected: expected.map(str::to_owned),
                new: new.into(),
            };
            self.op(p, Op::Cas, "k", v, call, Some((EventKind::Ok, ret)))
        }

        fn check_with(&self, config: &CheckConfig) -> Report {
            let mut events = self.events.clone();
            events.sort_by_key(|e| e.time); // stable: an invoke stays before its completion
            let mut history = History::new();
            events.into_iter().for_each(|e| history.push(e));
            check(&history, config).unwrap()
        }

        fn verdict(&self) -> Verdict {
            let report = self.check_with(&CheckConfig::default());
            report.keys.get("k").cloned().expect("the history has key k")
        }
    }

    fn assert_violation(verdict: Verdict, mentions: &[&str]) {
        match verdict {
            Verdict::Violation { explanation } => {
                for m in mentions {
                    assert!(explanation.contains(m), "explanation lacks {m:?}: {explanation}");
                }
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let v = Builder::new()
            .read(1, None, 0, 1)
            .write(1, "a", 2, 3)
            .read(2, Some("a"), 4, 5)
            .cas(2, Some("a"), "b", 6, 7)
            .cas(1, Some("b"), "c", 8, 9)
            .read(1, Some("c"), 10, 11)
            .verdict();
        assert_eq!(v, Verdict::Linearizable);
    }

    #[test]
    fn concurrent_write_and_read_may_go_either_way() {
        for seen in [None, Some("v1")] {
            let v = Builder::new().write(1, "v1", 0, 100).read(2, seen, 10, 20).verdict();
            assert_eq!(v, Verdict::Linearizable, "read saw {seen:?}");
        }
        // Equal timestamps are concurrent, not ordered.
        assert_eq!(
            Builder::new().write(1, "v1", 0, 10).read(2, None, 10, 20).verdict(),
            Verdict::Linearizable
        );
        assert_violation(
            Builder::new().write(1, "v1", 0, 10).read(2, None, 11, 20).verdict(),
            &["p2 read -> absent"],
        );
    }

    #[test]
    fn planted_stale_read_is_a_violation() {
        // A deposed leader serving a read without a read barrier: v2 is acknowledged before the
        // read starts, yet the read returns v1.
        let v = Builder::new()
            .write(1, "v1", 0, 10)
            .write(2, "v2", 20, 30)
            .read(3, Some("v1"), 40, 50)
            .verdict();
        assert_violation(
            v,
            &[
                "p3 read -> \"v1\" [40, 50]",
                "the register holds \"v2\"",
                "prefix has 2 operations",
                "after it the register holds \"v2\"",
            ],
        );
    }

    #[test]
    fn planted_lost_acknowledged_write_is_a_violation() {
        let v = Builder::new()
            .write(1, "v1", 0, 10)
            .write(2, "v2", 20, 30)
            .read(3, Some("v1"), 40, 50)
            .read(1, Some("v1"), 60, 70)
            .read(2, Some("v1"), 80, 90)
            .verdict();
        assert_violation(v, &["p3 read -> \"v1\""]);
    }

    #[test]
    fn unknown_write_may_or_may_not_take_effect() {
        let unknown_write = |b: &mut Builder, end: Option<(EventKind, u64)>| {
            b.op(9, Op::Write, "k", Value::Str("v2".into()), 20, end);
        };
        for end in [None, Some((EventKind::Info, 25))] {
            for seen in ["v1", "v2"] {
                let mut b = Builder::new();
                b.write(1, "v1", 0, 10);
                unknown_write(&mut b, end);
                b.read(2, Some(seen), 30, 40).read(3, Some(seen), 50, 60);
                assert_eq!(b.verdict(), Verdict::Linearizable, "reads saw {seen}, end {end:?}");
            }
            // Seeing it and then not seeing it: the write cannot be undone.
            let mut b = Builder::new();
            b.write(1, "v1", 0, 10);
            unknown_write(&mut b, end);
            b.read(2, Some("v2"), 30, 40).read(3, Some("v1"), 50, 60);
            assert_violation(b.verdict(), &["p3 read -> \"v1\" [50, 60]"]);
        }
        // An unknown write can still not take effect before its invoke.
        let mut b = Builder::new();
        b.read(2, Some("v2"), 0, 10);
        unknown_write(&mut b, None);
        assert_violation(b.verdict(), &["p2 read -> \"v2\""]);
    }

    #[test]
    fn failed_operations_are_ignored() {
        let mut b = Builder::new();
        b.write(1, "v1", 0, 10);
        b.op(
            2,
            Op::Write,
            "k",
            Value::Str("v2".into()),
            20,
            Some((EventKind::Fail, 30)),
        );
        b.read(3, Some("v1"), 40, 50);
        assert_eq!(b.verdict(), Verdict::Linearizable);
        let mut b = Builder::new();
        b.op(
            2,
            Op::Write,
            "k",
            Value::Str("v2".into()),
            0,
            Some((EventKind::Fail, 30)),
        );
        b.read(3, Some("v2"), 40, 50);
        assert_violation(b.verdict(), &["p3 read -> \"v2\""]);
    }

    #[test]
    fn cas_succeeding_twice_from_the_same_state_is_a_violation() {
        let v = Builder::new()
            .write(1, "a", 0, 10)
            .cas(2, Some("a"), "b", 20, 40)
            .cas(3, Some("a"), "c", 25, 45)
            .verdict();
        assert_violation(v, &["it expects \"a\" but the register holds \""]);
        let v = Builder::new()
            .cas(2, None, "b", 20, 40)
            .cas(3, None, "c", 25, 45)
            .verdict();
        assert_violation(v, &["it expects absent but the register holds \""]);
        // One of them succeeding and a read of its value is fine.
        let v = Builder::new()
            .write(1, "a", 0, 10)
            .cas(2, Some("a"), "b", 20, 40)
            .read(3, Some("b"), 25, 45)
            .verdict();
        assert_eq!(v, Verdict::Linearizable);
    }

    #[test]
    fn unknown_cas_may_apply_only_where_its_comparison_holds() {
        let unknown_cas = |b: &mut Builder, expected: &str| {
            let v = Value::Cas {
                expected: Some(expected.into()),
                new: "b".into(),
            };
            b.op(2, Op::Cas, "k", v, 20, Some((EventKind::Info, 30)));
        };
        let mut b = Builder::new();
        b.write(1, "a", 0, 10);
        unknown_cas(&mut b, "a");
        b.read(3, Some("b"), 40, 50);
        assert_eq!(b.verdict(), Verdict::Linearizable);
        let mut b = Builder::new();
        b.write(1, "x", 0, 10);
        unknown_cas(&mut b, "a");
        b.read(3, Some("b"), 40, 50);
        assert_violation(b.verdict(), &["p3 read -> \"b\""]);
        // ... and, whatever its comparison, it may also never have taken effect.
        let mut b = Builder::new();
        b.write(1, "x", 0, 10);
        unknown_cas(&mut b, "a");
        b.read(3, Some("x"), 40, 50);
        assert_eq!(b.verdict(), Verdict::Linearizable);
    }

    #[test]
    fn keys_are_checked_independently_in_sorted_order() {
        let mut b = Builder::new();
        b.op(1, Op::Write, "z", Value::Str("1".into()), 0, Some((EventKind::Ok, 10)));
        b.op(2, Op::Read, "a", Value::Str("1".into()), 20, Some((EventKind::Ok, 30)));
        b.op(3, Op::Read, "m", Value::Nil, 20, Some((EventKind::Ok, 30)));
        b.op(4, Op::Read, "b", Value::Nil, 20, None); // only an unknown read
        let report = b.check_with(&CheckConfig::default());
        assert_eq!(report.keys.keys().collect::<Vec<_>>(), ["a", "b", "m", "z"]);
        assert_eq!(report.keys["z"], Verdict::Linearizable);
        assert_eq!(report.keys["b"], Verdict::Linearizable);
        assert!(!report.ok());
        let violations = report.violations();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].0, "a");
        assert!(violations[0].1.starts_with("key \"a\""), "{}", violations[0].1);
        assert!(report.unknown().is_empty());
    }

    #[test]
    fn exceeding_the_step_budget_gives_unknown() {
        let mut b = Builder::new();
        for p in 0..40 {
            b.write(p, &format!("v{p}"), p, 1000 + p);
        }
        b.read(99, Some("v39"), 2000, 2010);
        let report = b.check_with(&CheckConfig { max_steps_per_key: 10 });
        assert_eq!(report.keys["k"], Verdict::Unknown { steps: 10 });
        assert!(!report.ok());
        assert_eq!(report.unknown(), ["k"]);
        assert!(report.violations().is_empty());
        // With a real budget the same history is decided.
        assert_eq!(b.verdict(), Verdict::Linearizable);
    }

    #[test]
    fn memoization_keeps_wide_concurrency_fast() {
        // 12 fully concurrent writes and a read that sees none of them: proving the violation
        // means exhausting every order of the writes, 12! (about 5e8) of them, far beyond the
        // step budget; memoized, it is at most 2^12 sets times 13 states.
        let mut b = Builder::new();
        for p in 0..12 {
            b.write(p, &format!("v{p}"), p, 1000 + p);
        }
        b.read(99, Some("never"), 2000, 2010);
        assert_violation(b.verdict(), &["p99 read -> \"never\""]);
    }

    /// One generated operation: the input, whether its completion is known, and whether (if
    /// unknown) it actually took effect.
    #[derive(Debug, Clone)]
    struct Planned {
        input: RegisterOp<String>,
        unknown: bool,
        applied: bool,
        before: u64,
        after: u64,
    }

    fn arb_planned() -> impl Strategy<Value = Planned> {
        let value = prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("c".to_owned())];
        let input = prop_oneof![
            2 => Just(RegisterOp::Read),
            2 => value.clone().prop_map(RegisterOp::Write),
            1 => (proptest::option::of(value.clone()), value).prop_map(|(expected, new)| RegisterOp::Cas { expected, new }),
        ];
        (input, proptest::bool::weighted(0.15), any::<bool>(), 0u64..40, 0u64..40).prop_map(
            |(input, unknown, applied, before, after)| Planned {
                input,
                unknown,
                applied,
                before,
                after,
            },
        )
    }

    /// Runs the planned operations against a real register in list order (their linearization
    /// order), gives each an interval around its linearization point, and records the history.
    /// Returns the history and the event index of every completed read.
    fn record(plan: &[Planned]) -> (History, Vec<usize>) {
        let mut register = Register::<String>::default();
        let mut events = Vec::new();
        for (i, planned) in plan.iter().enumerate() {
            let process = i as u64;
            let point = 10 * (i as u64) + 100;
            let (call, ret) = (point - planned.before, point + planned.after);
            // An unknown operation that did not take effect leaves the register alone.
            let response = if planned.unknown && !planned.applied {
                None
            } else {
                Some(register.apply(&planned.input))
            };
            let (f, invoke_value) = match &planned.input {
                RegisterOp::Read => (Op::Read, Value::Nil),
                RegisterOp::Write(v) => (Op::Write, Value::Str(v.clone())),
                RegisterOp::Cas { expected, new } => (
                    Op::Cas,
                    Value::Cas {
                        expected: expected.clone(),
                        new: new.clone(),
                    },
                ),
            };
            events.push(Event::new(
                process,
                EventKind::Invoke,
                f,
                "k",
                invoke_value.clone(),
                call,
            ));
            let (kind, value) = match response {
                _ if planned.unknown => (EventKind::Info, if f == Op::Read { Value::Nil } else { invoke_value }),
                Some(Response::Read(v)) => (EventKind::Ok, Value::read_result(v)),
                Some(Response::CasFailed) => (EventKind::Fail, invoke_value),
                _ => (EventKind::Ok, invoke_value),
            };
            events.push(Event::new(process, kind, f, "k", value, ret));
        }
        events.sort_by_key(|e| e.time); // stable, and call < ret for each operation
        let mut history = History::new();
        events.into_iter().for_each(|e| history.push(e));
        let reads = history
            .events()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.f == Op::Read && e.kind == EventKind::Ok)
            .map(|(i, _)| i)
            .collect();
        (history, reads)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn histories_of_a_real_register_are_linearizable(plan in proptest::collection::vec(arb_planned(), 1..14)) {
            let (history, _) = record(&plan);
            let report = check(&history, &CheckConfig::default()).unwrap();
            prop_assert!(report.ok(), "{:?}", report);
        }

        #[test]
        fn a_read_of_a_value_never_written_is_a_violation(
            plan in proptest::collection::vec(arb_planned(), 1..14),
            pick in any::<proptest::sample::Index>(),
        ) {
            let (history, reads) = record(&plan);
            prop_assume!(!reads.is_empty());
            let mut events = history.events().to_vec();
            events[reads[pick.index(reads.len())]].value = Value::Str("never-written".into());
            let mut mutated = History::new();
            events.into_iter().for_each(|e| mutated.push(e));
            let report = check(&mutated, &CheckConfig::default()).unwrap();
            prop_assert!(matches!(report.keys["k"], Verdict::Violation { .. }), "{:?}", report);
        }
    }
}
