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

use basalt_client::{Client, ClientError, Expect, ReadMode};
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::convergence::{self, Divergence};
use crate::durability::{self, DurabilityFinding};
use crate::history::{Event, EventKind, History, HistoryError, Op, Value};
use crate::linearizability::{self, CheckConfig, Report};
use crate::staleness::{self, StaleRead, StalenessFinding};

/// The value of every key, as one replica or one reader sees it.
pub type State = BTreeMap<String, Option<String>>;

/// One clock and one history for all client processes.
pub struct Recorder {
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
    inner: Mutex<(History, u64)>,
    /// Reads in the modes that are not linearizable, for the staleness checker.
    stale_reads: Mutex<Vec<StaleRead>>,
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
            stale_reads: Mutex::new(Vec::new()),
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

    /// The `bounded_staleness` and `stale` reads recorded so far, leaving none behind.
    pub fn take_stale_reads(&self) -> Vec<StaleRead> {
        std::mem::take(&mut self.stale_reads.lock())
    }

    fn stale_read(&self, read: StaleRead) {
        self.invoked.fetch_add(1, Ordering::Relaxed);
        self.stale_reads.lock().push(read);
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
        if roll < read_below && !client.read_mode().linearizable() {
            // Not linearizable by design: judged by the staleness checker, not the history's.
            let invoke = recorder.now();
            if let Ok(r) = client.read(Bytes::from(key.clone())).await {
                let value = r.value.map(|b| String::from_utf8_lossy(&b).into_owned());
                seen.insert(key.clone(), value.clone());
                let served = r.served;
                recorder.stale_read(StaleRead {
                    process,
                    key: key.clone(),
                    invoke,
                    complete: recorder.now(),
                    value,
                    bound: match served {
                        Some(s) if s.staleness_unknown => None,
                        Some(s) => Some(s.staleness.unwrap_or(Duration::ZERO)),
                        None => None,
                    },
                    asked: match client.read_mode() {
                        ReadMode::BoundedStaleness(max) => Some(max),
                        _ => None,
                    },
                });
            }
        } else if roll < read_below {
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
    /// `bounded_staleness` and `stale` reads that returned something they must not.
    pub staleness: Vec<StalenessFinding>,
    /// How many such reads were checked.
    pub stale_reads: usize,
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
    pub fn of(
        history: &History,
        stale_reads: &[StaleRead],
        replicas: &BTreeMap<u64, State>,
        workload: Duration,
    ) -> Result<Self, HistoryError> {
        let linearizability = linearizability::check(history, &CheckConfig::default())?;
        let staleness = staleness::check(history, stale_reads);
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
            staleness,
            stale_reads: stale_reads.len(),
            ok,
            failed,
            unknown,
            longest_write_gap,
        })
    }

    /// True when every checker passed (a key whose check ran out of budget is not a pass).
    pub fn passed(&self) -> bool {
        self.linearizability.ok()
            && self.durability.is_empty()
            && self.convergence.is_empty()
            && self.staleness.is_empty()
    }
}
