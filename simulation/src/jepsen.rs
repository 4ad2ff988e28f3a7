//! The Jepsen-style runner: real `basaltd` processes, the real client, real faults.
//!
//! A run starts a local cluster ([`LocalCluster`]), lets concurrent client processes read,
//! write and compare-and-swap a handful of keys (few keys, so operations conflict), and meanwhile
//! a nemesis SIGKILLs and restarts nodes and freezes them with SIGSTOP/SIGCONT. Every operation
//! is recorded as invoke / ok / fail / info in one [`History`]. At the end the faults are healed,
//! every node is killed and restarted (so only what was durable survives), every key is read
//! from every replica (leadership is moved to each in turn), and the checkers judge the run:
//! per-key linearizability, no acknowledged write lost, and replicas that agree.
//!
//! How client results become history events, which is what makes the checking sound:
//! - ok: the store answered; a CAS whose comparison failed is recorded as `fail` (it definitely
//!   did not apply, see [`crate::model`]);
//! - fail: an error that proves nothing was applied (invalid argument), or a read that failed
//!   (a read has no effect, so its failure proves nothing either way and constrains nothing);
//! - info: anything else for a write or CAS (timeout, connection lost, no leader): it may have
//!   been applied, now or later, and the checker treats it so.
//!
//! Time is one monotonic clock for all processes, read under the history's lock, so the event
//! order in the history is the real-time order the checker relies on.
//!
//! The nemesis faults at most one node at a time, so a majority always remains and the cluster
//! should stay available apart from elections; the longest gap between successful writes is
//! reported so availability regressions show up next to correctness.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_bench::local_cluster::{ClusterError, LocalCluster, LocalClusterOptions};
use basalt_client::{Client, ClientConfig, ClientError, Expect};
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::convergence::{self, Divergence};
use crate::durability::{self, DurabilityFinding};
use crate::history::{Event, EventKind, History, HistoryError, Op, Value};
use crate::linearizability::{self, CheckConfig, Report};

/// The faults the nemesis may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// SIGKILL a node, restart it one interval later.
    pub kill: bool,
    /// SIGSTOP a node, SIGCONT it one interval later.
    pub pause: bool,
}

#[derive(Debug, Clone)]
pub struct JepsenConfig {
    pub basaltd: PathBuf,
    pub nodes: usize,
    /// How long the workload runs (faults included).
    pub duration: Duration,
    /// Concurrent client processes.
    pub clients: usize,
    /// Distinct keys the clients share.
    pub keys: usize,
    pub faults: Faults,
    /// Time between nemesis actions; a fault lasts one interval.
    pub fault_interval: Duration,
    /// Drives key and operation choice and the nemesis' choice of node and fault.
    pub seed: u64,
}

#[derive(thiserror::Error, Debug)]
pub enum JepsenError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("local cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("client: {0}")]
    Client(#[from] ClientError),
    #[error("the recorded history is malformed (a recorder bug): {0}")]
    History(#[from] HistoryError),
    #[error("node {id} did not become leader within 10 s of a transfer to it")]
    LeaderTransfer { id: u64 },
    #[error("final read of {key:?} after healing failed: {source}")]
    FinalRead { key: String, source: ClientError },
}

/// What a run saw and what the checkers concluded.
#[derive(Debug)]
pub struct JepsenOutcome {
    pub history: History,
    pub linearizability: Report,
    pub durability: Vec<DurabilityFinding>,
    /// Keys on which the replicas ended with different values.
    pub convergence: Vec<Divergence>,
    /// Operations by final event type: ok, fail, info.
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    /// The nemesis' actions, with seconds since the start.
    pub faults: Vec<(f64, String)>,
    /// The longest time without a successful write or CAS during the workload.
    pub longest_write_gap: Duration,
}

impl JepsenOutcome {
    /// True when every checker passed (a key whose check ran out of budget is not a pass).
    pub fn passed(&self) -> bool {
        self.linearizability.ok() && self.durability.is_empty() && self.convergence.is_empty()
    }
}

/// One clock and one history for all processes.
struct Recorder {
    start: Instant,
    history: Mutex<History>,
}

impl Recorder {
    fn record(&self, process: u64, kind: EventKind, f: Op, key: &str, value: Value) {
        let mut h = self.history.lock();
        let time = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        h.push(Event::new(process, kind, f, key, value, time));
    }
}

pub async fn run(cfg: &JepsenConfig) -> Result<JepsenOutcome, JepsenError> {
    if cfg.nodes < 3 || cfg.clients == 0 || cfg.keys == 0 {
        return Err(JepsenError::Config(
            "need at least 3 nodes (so one can fail), 1 client and 1 key".into(),
        ));
    }
    let mut opts = LocalClusterOptions::new(cfg.nodes, cfg.basaltd.clone());
    // Small enough that snapshots and log compaction happen during a run.
    opts.snapshot_threshold = Some(500);
    let cluster = Arc::new(LocalCluster::start(opts).await?);
    cluster.wait_for_leader(Duration::from_secs(15)).await?;

    let mut client_cfg: ClientConfig = cluster.client_config();
    client_cfg.attempt_timeout = Duration::from_millis(1000);
    client_cfg.deadline = Duration::from_secs(5);
    let client = Client::connect(client_cfg).await?;

    let recorder = Arc::new(Recorder {
        start: Instant::now(),
        history: Mutex::new(History::new()),
    });
    let deadline = Instant::now() + cfg.duration;
    let keys: Arc<Vec<String>> = Arc::new((0..cfg.keys).map(|k| format!("k{k}")).collect());
    let mut workers = JoinSet::new();
    for process in 0..cfg.clients as u64 {
        let (client, recorder, keys) = (client.clone(), recorder.clone(), keys.clone());
        let seed = cfg.seed.wrapping_add(process.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        workers.spawn(worker(process, client, recorder, keys, seed, deadline));
    }
    let faults = nemesis(&cluster, cfg, recorder.start, deadline).await?;
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r {
            return Err(JepsenError::Config(format!("a client task failed: {e}")));
        }
    }

    // Heal, then crash and restart everything: only what was durable may survive.
    for id in cluster.node_ids() {
        if cluster.is_paused(id) {
            cluster.resume(id)?;
        }
        if cluster.is_running(id) {
            cluster.kill(id)?;
        }
    }
    for id in cluster.node_ids() {
        cluster.restart(id).await?;
    }
    cluster.wait_for_leader(Duration::from_secs(15)).await?;
    let mut final_cfg = cluster.client_config();
    final_cfg.deadline = Duration::from_secs(30);
    let admin = Client::connect(final_cfg.clone()).await?;
    // Every replica's state, read from that replica: leadership is moved to each node in turn,
    // so a linearizable read served there comes from its own state machine.
    let mut states = BTreeMap::new();
    for id in cluster.node_ids() {
        admin.transfer_leader(id).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.cluster_status(id).await?.leader_id != id {
            if Instant::now() > deadline {
                return Err(JepsenError::LeaderTransfer { id });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut cfg = final_cfg.clone();
        cfg.endpoints = vec![cluster.endpoint(id)?];
        let reader = Client::connect(cfg).await?;
        states.insert(id, read_all(&reader, &keys).await?);
    }
    let convergence = convergence::check(&states);
    let final_state = states.into_values().next().unwrap_or_default();
    cluster.terminate_all().await?;

    let history = std::mem::take(&mut *recorder.history.lock());
    let linearizability = linearizability::check(&history, &CheckConfig::default())?;
    let durability = durability::check(&history, &final_state)?;
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
    write_oks.push(u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX));
    let longest_write_gap = Duration::from_nanos(
        write_oks
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
            .max()
            .unwrap_or(0),
    );
    Ok(JepsenOutcome {
        history,
        linearizability,
        durability,
        convergence,
        ok,
        failed,
        unknown,
        faults,
        longest_write_gap,
    })
}

/// The value of every key, as `reader` sees it.
async fn read_all(reader: &Client, keys: &[String]) -> Result<BTreeMap<String, Option<String>>, JepsenError> {
    let mut state = BTreeMap::new();
    for key in keys {
        let v = reader
            .get(Bytes::from(key.clone()))
            .await
            .map_err(|source| JepsenError::FinalRead {
                key: key.clone(),
                source,
            })?;
        state.insert(key.clone(), v.map(|b| String::from_utf8_lossy(&b).into_owned()));
    }
    Ok(state)
}

/// One sequential client process: 50 % reads, 30 % writes, 20 % compare-and-swaps.
async fn worker(
    process: u64,
    client: Client,
    recorder: Arc<Recorder>,
    keys: Arc<Vec<String>>,
    seed: u64,
    deadline: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    // The last value this process saw per key, so its CAS operations have a fair chance to win.
    let mut seen: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let key = keys[rng.random_range(0..keys.len())].clone();
        let roll: u8 = rng.random_range(0..10);
        n += 1;
        if roll < 5 {
            recorder.record(process, EventKind::Invoke, Op::Read, &key, Value::Nil);
            match client.get(Bytes::from(key.clone())).await {
                Ok(v) => {
                    let v = v.map(|b| String::from_utf8_lossy(&b).into_owned());
                    seen.insert(key.clone(), v.clone());
                    recorder.record(process, EventKind::Ok, Op::Read, &key, Value::read_result(v));
                }
                Err(_) => recorder.record(process, EventKind::Fail, Op::Read, &key, Value::Nil),
            }
        } else if roll < 8 {
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

/// Injects one fault per interval on a random node, healing it one interval later, until the
/// deadline; returns what it did.
async fn nemesis(
    cluster: &LocalCluster,
    cfg: &JepsenConfig,
    start: Instant,
    deadline: Instant,
) -> Result<Vec<(f64, String)>, JepsenError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed.rotate_left(17) ^ 0xA5A5_A5A5_A5A5_A5A5);
    let mut log = Vec::new();
    let kinds: Vec<&str> = [("kill", cfg.faults.kill), ("pause", cfg.faults.pause)]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect();
    let ids = cluster.node_ids();
    let mut note = |what: String| log.push((start.elapsed().as_secs_f64(), what));
    loop {
        tokio::time::sleep(cfg.fault_interval).await;
        if kinds.is_empty() || Instant::now() + cfg.fault_interval > deadline {
            break;
        }
        let id = ids[rng.random_range(0..ids.len())];
        match kinds[rng.random_range(0..kinds.len())] {
            "kill" => {
                cluster.kill(id)?;
                note(format!("SIGKILL node {id}"));
                tokio::time::sleep(cfg.fault_interval).await;
                cluster.restart(id).await?;
                note(format!("restarted node {id}"));
            }
            _ => {
                cluster.pause(id)?;
                note(format!("SIGSTOP node {id}"));
                tokio::time::sleep(cfg.fault_interval).await;
                cluster.resume(id)?;
                note(format!("SIGCONT node {id}"));
            }
        }
    }
    Ok(log)
}
