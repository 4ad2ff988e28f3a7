//! The Jepsen-style runner: real `basaltd` processes, the real client, real faults.
//!
//! A run starts a local cluster ([`LocalCluster`]), lets concurrent client processes read,
//! write and compare-and-swap a handful of keys (few keys, so operations conflict), and meanwhile
//! a nemesis SIGKILLs and restarts nodes, freezes them with SIGSTOP/SIGCONT and, where the machine
//! allows it, partitions them (each node in a network namespace of its own, see [`crate::netns`];
//! the partitions are those of the simulator: an isolated leader, majority/minority, and with five
//! nodes a bridge). Every operation
//! is recorded as invoke / ok / fail / info in one [`History`]. At the end the faults are healed,
//! every node is killed and restarted (so only what was durable survives), every key is read
//! from every replica (leadership is moved to each in turn), and the checkers judge the run:
//! per-key linearizability, no acknowledged write lost, and replicas that agree.
//!
//! The workload, the recording rules and the checkers are those of [`crate::workload`], shared
//! with the simulator; here time is one monotonic real clock for all processes.
//!
//! The nemesis injects one fault at a time, so a majority always remains and the cluster should
//! stay available apart from elections; the longest gap between successful writes is reported so
//! availability regressions show up next to correctness.
//!
//! [`run`] owns its thread and runtime: with partitions on, that thread joins the namespaces' hub
//! before the runtime's workers are born, so every client socket is made there.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_bench::local_cluster::{ClusterError, LocalCluster, LocalClusterOptions};
use basalt_client::{Client, ClientConfig, ClientError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::history::{History, HistoryError};
use crate::netns::{Namespaces, NetnsError};
use crate::sim::nemesis::Split;
use crate::workload::{client_process, read_all, Judgement, Mix, Recorder};

/// The faults the nemesis may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// SIGKILL a node, restart it one interval later.
    pub kill: bool,
    /// SIGSTOP a node, SIGCONT it one interval later.
    pub pause: bool,
    /// Cut links between nodes (not to clients), healed one interval later. Needs network
    /// namespaces, so root.
    pub partition: bool,
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
    #[error("partitions: {0}")]
    Netns(#[from] NetnsError),
    #[error("the runner: {0}")]
    Runner(String),
}

/// What a run saw and what the checkers concluded.
#[derive(Debug)]
pub struct JepsenOutcome {
    pub history: History,
    pub judgement: Judgement,
    /// The nemesis' actions, with seconds since the start.
    pub faults: Vec<(f64, String)>,
}

impl JepsenOutcome {
    /// True when every checker passed.
    pub fn passed(&self) -> bool {
        self.judgement.passed()
    }
}

/// Runs the workload against a fresh cluster and judges it, on a thread and runtime of its own
/// (see the module documentation).
pub fn run(cfg: &JepsenConfig) -> Result<JepsenOutcome, JepsenError> {
    if cfg.nodes < 3 || cfg.clients == 0 || cfg.keys == 0 {
        return Err(JepsenError::Config(
            "need at least 3 nodes (so one can fail), 1 client and 1 key".into(),
        ));
    }
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("jepsen".into())
        .spawn(move || {
            let namespaces = if cfg.faults.partition {
                let ids: Vec<u64> = (1..=cfg.nodes as u64).collect();
                let ns = Arc::new(Namespaces::create(&ids)?);
                ns.enter_hub()?;
                Some(ns)
            } else {
                None
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| JepsenError::Runner(format!("cannot start the async runtime: {e}")))?;
            let outcome = runtime.block_on(run_in_runtime(&cfg, namespaces.clone()));
            // The cluster (and its processes) is gone by now; the namespaces go last.
            drop(runtime);
            drop(namespaces);
            outcome
        })
        .map_err(|e| JepsenError::Runner(format!("cannot start the runner thread: {e}")))?
        .join()
        .map_err(|_| JepsenError::Runner("the runner thread panicked".into()))?
}

async fn run_in_runtime(cfg: &JepsenConfig, namespaces: Option<Arc<Namespaces>>) -> Result<JepsenOutcome, JepsenError> {
    let mut opts = LocalClusterOptions::new(cfg.nodes, cfg.basaltd.clone());
    opts.hosts = namespaces
        .clone()
        .map(|ns| ns as Arc<dyn basalt_bench::local_cluster::NodeHosts>);
    // Small enough that snapshots and log compaction happen during a run.
    opts.snapshot_threshold = Some(500);
    let cluster = Arc::new(LocalCluster::start(opts).await?);
    cluster.wait_for_leader(Duration::from_secs(15)).await?;

    let mut client_cfg: ClientConfig = cluster.client_config();
    client_cfg.attempt_timeout = Duration::from_millis(1000);
    client_cfg.deadline = Duration::from_secs(5);
    let client = Client::connect(client_cfg).await?;

    let start = Instant::now();
    let recorder = Arc::new(Recorder::new(
        move || u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        u64::MAX,
    ));
    let deadline = start + cfg.duration;
    let until = u64::try_from(cfg.duration.as_nanos()).unwrap_or(u64::MAX);
    let keys: Arc<Vec<String>> = Arc::new((0..cfg.keys).map(|k| format!("k{k}")).collect());
    let mut workers = JoinSet::new();
    for process in 0..cfg.clients as u64 {
        let (client, recorder, keys) = (client.clone(), recorder.clone(), keys.clone());
        let seed = cfg.seed.wrapping_add(process.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        workers.spawn(async move { client_process(process, Mix::Mixed, client, &recorder, &keys, seed, until).await });
    }
    let faults = nemesis(&cluster, namespaces.as_deref(), cfg, start, deadline).await?;
    while let Some(r) = workers.join_next().await {
        if let Err(e) = r {
            return Err(JepsenError::Config(format!("a client task failed: {e}")));
        }
    }

    // Heal, then crash and restart everything: only what was durable may survive.
    if let Some(ns) = &namespaces {
        ns.heal()?;
    }
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
        let state = read_all(&reader, &keys)
            .await
            .map_err(|(key, source)| JepsenError::FinalRead { key, source })?;
        states.insert(id, state);
    }
    cluster.terminate_all().await?;

    let history = recorder.take();
    let stale_reads = recorder.take_stale_reads();
    let judgement = Judgement::of(&history, &stale_reads, &states, cfg.duration)?;
    Ok(JepsenOutcome {
        history,
        judgement,
        faults,
    })
}

/// Injects one fault per interval on a random node, healing it one interval later, until the
/// deadline; returns what it did.
async fn nemesis(
    cluster: &LocalCluster,
    namespaces: Option<&Namespaces>,
    cfg: &JepsenConfig,
    start: Instant,
    deadline: Instant,
) -> Result<Vec<(f64, String)>, JepsenError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed.rotate_left(17) ^ 0xA5A5_A5A5_A5A5_A5A5);
    let mut log = Vec::new();
    let kinds: Vec<&str> = [
        ("kill", cfg.faults.kill),
        ("pause", cfg.faults.pause),
        ("partition", cfg.faults.partition && namespaces.is_some()),
    ]
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
            "partition" => {
                let ns = namespaces.expect("partitions are drawn only when namespaces exist");
                let split = Split::random(&mut rng, &ids);
                let leader = current_leader(cluster).await.unwrap_or(id);
                let pairs = split.pairs(&ids, leader);
                ns.cut(&pairs)?;
                note(format!("partition ({}) cutting {pairs:?}", describe(&split, leader)));
                tokio::time::sleep(cfg.fault_interval).await;
                ns.heal()?;
                note("healed the partition".to_string());
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

/// The leader, if one answers quickly; a partition that isolates "the leader" falls back to a
/// random node when none does (mid-election, say).
async fn current_leader(cluster: &LocalCluster) -> Option<u64> {
    cluster.wait_for_leader(Duration::from_secs(2)).await.ok()
}

fn describe(split: &Split, leader: u64) -> String {
    match split {
        Split::IsolateLeader => format!("isolate leader {leader}"),
        Split::Sides(a, b) => format!("{a:?} | {b:?}"),
        Split::Links(_) => "bridge".to_string(),
    }
}
