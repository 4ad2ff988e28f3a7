//! The client workload and its judgement, shared by the simulator and the Jepsen-style runner.
//!
//! Both harnesses run the same sequential client processes through the real client library
//! (reads, writes and compare-and-swaps on a few keys, so operations conflict), record them in one
//! [`History`] through a [`Recorder`], and judge the result with the same checkers
//! ([`Judgement::of`]). Only the clock differs: real time for real processes, simulated time in
//! the simulator, which is why the recorder takes its clock as a function.
//!
//! How client results become history events, which is what makes the checking sound:
//! - ok: the store answered; a CAS whose comparison failed is recorded as `fail` (it definitely
//!   did not apply, see [`crate::model`]);
//! - fail: an error that proves nothing was applied (invalid argument), or a read that failed
//!   (a read has no effect, so its failure proves nothing either way and constrains nothing);
//! - info: anything else for a write or CAS (timeout, connection lost, no leader): it may have
//!   been applied, now or later, and the checker treats it so.
//!
//! Invariant: event times strictly increase in history order. The recorder reads the clock under
//! the history's lock and bumps a tie by one nanosecond, so the real-time order the checker relies
//! on is the order events were recorded in, even with a coarse simulated clock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use basalt_client::{Client, ClientError, Expect};
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::convergence::{self, Divergence};
use crate::durability::{self, DurabilityFinding};
use crate::history::{Event, EventKind, History, HistoryError, Op, Value};
use crate::linearizability::{self, CheckConfig, Report};

/// The value of every key, as one replica or one reader sees it.
pub type State = BTreeMap<String, Option<String>>;

/// One clock and one history for all client processes.
pub struct Recorder {
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
    inner: Mutex<(History, u64)>,
    /// Operations invoked so far, for an operation-count limit.
    invoked: AtomicU64,
    max_ops: u64,
}

impl Recorder {
    /// A recorder reading nanoseconds from `clock`, allowing at most `max_ops` invocations.
    pub fn new(clock: impl Fn() -> u64 + Send + Sync + 'static, max_ops: u64) -> Self {
        Self {
            clock: Box::new(clock),
            inner: Mutex::new((History::new(), 0)),
            invoked: AtomicU64::new(0),
            max_ops,
        }
    }

    /// The current time on the recorder's clock, in nanoseconds.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    pub fn record(&self, process: u64, kind: EventKind, f: Op, key: &str, value: Value) {
        if kind == EventKind::Invoke {
            self.invoked.fetch_add(1, Ordering::Relaxed);
        }
        let mut inner = self.inner.lock();
        let time = self.now().max(inner.1 + 1);
        inner.1 = time;
        inner.0.push(Event::new(process, kind, f, key, value, time));
    }

    fn budget_left(&self) -> bool {
        self.invoked.load(Ordering::Relaxed) < self.max_ops
    }

    /// The history recorded so far, leaving an empty one behind.
    pub fn take(&self) -> History {
        std::mem::take(&mut self.inner.lock().0)
    }
}

/// The value of every key in `keys`, read through `reader`.
pub async fn read_all(reader: &Client, keys: &[String]) -> Result<State, (String, ClientError)> {
    let mut state = BTreeMap::new();
    for key in keys {
        let v = reader
            .get(Bytes::from(key.clone()))
            .await
            .map_err(|e| (key.clone(), e))?;
        state.insert(key.clone(), v.map(|b| String::from_utf8_lossy(&b).into_owned()));
    }
    Ok(state)
}

/// What one client process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// 50 % reads, 30 % writes, 20 % compare-and-swaps; every fourth process reads 90 % of the
    /// time instead (read-heavy clients are common).
    Mixed,
    /// Reads only, like a dashboard or a cache filler. Its reads keep succeeding wherever they
    /// are served, so nothing moves it off a node it once reached: a deposed leader that serves
    /// reads it should refuse keeps answering it for as long as the partition lasts, which is
    /// what makes a stale read observable once the new leader has accepted writes.
    ReadOnly,
}

/// One sequential client process doing `mix`, until the recorder's clock passes `until`
/// (nanoseconds) or its operation budget is spent.
pub async fn client_process(
    process: u64,
    mix: Mix,
    client: Client,
    recorder: &Recorder,
    keys: &[String],
    seed: u64,
    until: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    // The last value this process saw per key, so its CAS operations have a fair chance to win.
    let mut seen: State = BTreeMap::new();
    let mut n = 0u64;
    let (read_below, write_below) = match mix {
        Mix::ReadOnly => (10, 10),
        Mix::Mixed if process % 4 == 3 => (9, 10),
        Mix::Mixed => (5, 8),
    };
    while recorder.now() < until && recorder.budget_left() {
        let key = keys[rng.random_range(0..keys.len())].clone();
        let roll: u8 = rng.random_range(0..10);
        n += 1;
        if roll < read_below {
            recorder.record(process, EventKind::Invoke, Op::Read, &key, Value::Nil);
            match client.get(Bytes::from(key.clone())).await {
                Ok(v) => {
                    let v = v.map(|b| String::from_utf8_lossy(&b).into_owned());
                    seen.insert(key.clone(), v.clone());
                    recorder.record(process, EventKind::Ok, Op::Read, &key, Value::read_result(v));
                }
                Err(_) => recorder.record(process, EventKind::Fail, Op::Read, &key, Value::Nil),
            }
        } else if roll < write_below {
            let value = format!("{process}-{n}");
            recorder.record(process, EventKind::Invoke, Op::Write, &key, Value::Str(value.clone()));
            let r = client.put(Bytes::from(key.clone()), Bytes::from(value.clone())).await;
            let kind = match r {
                Ok(()) => EventKind::Ok,
                Err(e) if !e.outcome_unknown() => EventKind::Fail,
                Err(_) => EventKind::Info,
            };
            recorder.record(process, kind, Op::Write, &key, Value::Str(value));
        } else {
            let expected = seen.get(&key).cloned().flatten();
            let new = format!("{process}-{n}");
            let operands = Value::Cas {
                expected: expected.clone(),
                new: new.clone(),
            };
            recorder.record(process, EventKind::Invoke, Op::Cas, &key, operands.clone());
            let expect = match &expected {
                Some(v) => Expect::Value(Bytes::from(v.clone())),
                None => Expect::Absent,
            };
            let r = client
                .compare_and_swap(Bytes::from(key.clone()), expect, Bytes::from(new.clone()))
                .await;
            let kind = match r {
                Ok(outcome) if outcome.succeeded => {
                    seen.insert(key.clone(), Some(new));
                    EventKind::Ok
                }
                Ok(outcome) => {
                    seen.insert(
                        key.clone(),
                        outcome.current.map(|b| String::from_utf8_lossy(&b).into_owned()),
                    );
                    EventKind::Fail
                }
                Err(e) if !e.outcome_unknown() => EventKind::Fail,
                Err(_) => EventKind::Info,
            };
            recorder.record(process, kind, Op::Cas, &key, operands);
        }
    }
}

/// What the checkers concluded about one run, and the counts that summarise it.
#[derive(Debug)]
pub struct Judgement {
    pub linearizability: Report,
    pub durability: Vec<DurabilityFinding>,
    /// Keys on which the replicas ended with different values.
    pub convergence: Vec<Divergence>,
    /// Operations by final event type: ok, fail, info.
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    /// The longest time without a successful write or CAS while the workload ran.
    pub longest_write_gap: Duration,
}

impl Judgement {
    /// Runs every checker. `replicas` holds each replica's final state, read after the cluster
    /// healed and every node restarted; `workload` is how long the workload ran, from time 0.
    pub fn of(history: &History, replicas: &BTreeMap<u64, State>, workload: Duration) -> Result<Self, HistoryError> {
        let linearizability = linearizability::check(history, &CheckConfig::default())?;
        // Convergence is checked separately, so for each key any replica's value stands for the
        // final one (with topology changes a node lists only the keys of its own shards).
        let mut final_state = State::new();
        for state in replicas.values() {
            for (key, value) in state {
                final_state.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        let durability = durability::check(history, &final_state)?;
        let convergence = convergence::check(replicas);
        let (mut ok, mut failed, mut unknown) = (0, 0, 0);
        let mut write_oks = vec![0u64];
        for e in history.events() {
            match e.kind {
                EventKind::Invoke => {}
                EventKind::Ok => {
                    ok += 1;
                    if e.f != Op::Read {
                        write_oks.push(e.time);
                    }
                }
                EventKind::Fail => failed += 1,
                EventKind::Info => unknown += 1,
            }
        }
        write_oks.push(u64::try_from(workload.as_nanos()).unwrap_or(u64::MAX));
        let longest_write_gap = Duration::from_nanos(
            write_oks
                .windows(2)
                .map(|w| w[1].saturating_sub(w[0]))
                .max()
                .unwrap_or(0),
        );
        Ok(Self {
            linearizability,
            durability,
            convergence,
            ok,
            failed,
            unknown,
            longest_write_gap,
        })
    }

    /// True when every checker passed (a key whose check ran out of budget is not a pass).
    pub fn passed(&self) -> bool {
        self.linearizability.ok() && self.durability.is_empty() && self.convergence.is_empty()
    }
}
