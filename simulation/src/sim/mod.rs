//! The deterministic simulator: whole Basalt clusters in one thread, on simulated time and a
//! simulated network, driven by one seed.
//!
//! A run is a [turmoil] simulation whose hosts run the real code: each node is
//! `basalt_server::Node` (gRPC services, forwarding, openraft groups, the peer transport, the
//! group-commit writer and the state machine) over the in-memory engine, whose crash model loses
//! every write that was not fsynced; each client is the real `basalt_client::Client`. Only the
//! edges are swapped: the [`net`] dialer and listener, a writer task instead of a thread, and
//! inline blocking work (see `basalt_consensus::raft::blocking`).
//!
//! Phases of a run:
//! 1. the workload ([`crate::workload`]) runs for the configured time while the [`nemesis`]
//!    injects its schedule;
//! 2. every fault is healed, every node crashes (losing unsynced writes) and restarts;
//! 3. a final client waits for a leader, then the replicas are left to catch up and each one's
//!    local state is read directly from its state machine;
//! 4. the history and those states are judged: linearizability, no acknowledged write lost,
//!    replicas converged.
//!
//! Determinism: a run owns a fresh thread whose OS randomness is seeded ([`entropy`]); turmoil's
//! own generator (latency, loss, host order) and the nemesis schedule derive from the seed; time
//! is simulated everywhere the code path reads it (tokio's clock; the recorder reads turmoil's).
//! Two runs of one seed therefore produce the same history and the same trace, which
//! [`SimOutcome::trace_hash`] summarises; `tests/simulation.rs` checks it across processes.

pub mod entropy;
pub mod nemesis;
pub mod net;
pub mod topology;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use basalt_client::{Client, ClientConfig, ReadMode};
use basalt_consensus::clock::SimClock;
use basalt_consensus::Replication;
use basalt_server::config::NodeConfig;
use basalt_server::replicas::Replicas;
use basalt_server::{Node, NodeEnv, PlantedBug};
use basalt_storage::MemoryEngine;
use parking_lot::Mutex;

use self::nemesis::{Fault, Faults, Schedule};
use crate::history::{Fnv1a, History, HistoryError};
use crate::workload::{client_process, read_all, Judgement, Mix, Recorder, State};

/// The port every simulated node listens on.
const PORT: u16 = 7379;
/// Latency of a healthy link: a fast LAN.
const BASE_MIN_LATENCY: Duration = Duration::from_micros(200);
const BASE_MAX_LATENCY: Duration = Duration::from_millis(3);
/// Bound on phases 2 and 3 in simulated time; a cluster that has not recovered by then is a
/// liveness failure worth reporting.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// One run's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub clients: usize,
    /// Client processes that only read, beside `clients` (see [`Mix::ReadOnly`]).
    pub readers: usize,
    /// Distinct keys the clients share (few, so operations conflict).
    pub keys: usize,
    /// Simulated time the workload runs.
    pub duration: Duration,
    /// Stop invoking operations after this many (all clients together).
    pub max_ops: u64,
    pub faults: Faults,
    pub planted_bug: Option<PlantedBug>,
    /// Log entries between snapshots: small, so snapshots and compaction happen in a run.
    pub snapshot_threshold: u64,
    /// The read modes of the client processes, given to them in turn.
    pub read_modes: Vec<ReadMode>,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3,
            clients: 4,
            readers: 0,
            keys: 3,
            duration: Duration::from_secs(20),
            max_ops: u64::MAX,
            faults: Faults::all(),
            planted_bug: None,
            snapshot_threshold: 200,
            read_modes: vec![ReadMode::Linearizable],
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        if self.read_modes.is_empty() {
            return Err(SimError::Config("name at least one read mode".into()));
        }
        if !(3..=9).contains(&self.nodes) || self.clients == 0 || self.keys == 0 {
            return Err(SimError::Config(
                "need 3 to 9 nodes (so one can fail), at least 1 client and 1 key".into(),
            ));
        }
        if self.duration < Duration::from_secs(1) {
            return Err(SimError::Config("the workload must run for at least 1s".into()));
        }
        Ok(())
    }
}

#[derive(thiserror::Error, Debug)]
pub enum SimError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("simulation: {0}")]
    Turmoil(String),
    #[error("the cluster did not recover within {RECOVERY_LIMIT:?} of healing: {0}")]
    NoRecovery(String),
    #[error("the recorded history is malformed (a recorder bug): {0}")]
    History(#[from] HistoryError),
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("the simulation thread panicked: {0}")]
    Panicked(String),
}

/// What a run saw and what the checkers concluded.
#[derive(Debug)]
pub struct SimOutcome {
    pub seed: u64,
    pub history: History,
    pub judgement: Judgement,
    /// What the nemesis did, with simulated seconds since the start.
    pub faults: Vec<(f64, String)>,
    /// A hash of the history, the fault log and every replica's final Raft position: equal for
    /// two runs of one seed, and in practice different for any two runs that differ.
    pub trace_hash: u64,
    /// Simulated time the whole run took, recovery included.
    pub simulated: Duration,
    /// Panics inside the simulation (a node's or client's task), each with its location. Tokio
    /// contains a task's panic, so without this list a panicking Raft core would only show as a
    /// node that stopped answering; any panic fails the run.
    pub panics: Vec<String>,
}

impl SimOutcome {
    pub fn passed(&self) -> bool {
        self.judgement.passed() && self.panics.is_empty()
    }
}

thread_local! {
    /// Set on a simulation thread: the panic hook records panics raised on it.
    static PANICS: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

/// Starts recording panics raised on this thread (see [`SimOutcome::panics`]). The hook is
/// process-wide and installed once; it keeps the previous hook's output, so a recorded panic is
/// still printed with its backtrace.
fn record_panics_on_this_thread() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| {
                if let Some(list) = p.borrow_mut().as_mut() {
                    let at = turmoil::sim_elapsed().unwrap_or_default().as_secs_f64();
                    list.push(format!("at {at:.2}s: {}", info.to_string().replace('\n', " ")));
                }
            });
            previous(info);
        }));
    });
    PANICS.with(|p| *p.borrow_mut() = Some(Vec::new()));
}

fn recorded_panics() -> Vec<String> {
    PANICS.with(|p| p.borrow_mut().take().unwrap_or_default())
}

/// Runs one seed on a fresh thread (see the module documentation) and judges it.
pub fn run(cfg: &SimConfig) -> Result<SimOutcome, SimError> {
    cfg.validate()?;
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name(format!("sim-{}", cfg.seed))
        // Whole servers' futures nest deeply and all run on this one thread.
        .stack_size(64 << 20)
        .spawn(move || run_on_this_thread(&cfg))?
        .join()
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            SimError::Panicked(msg)
        })?
}

/// A node's replica as seen from outside the simulation: gone while the node is down.
pub(crate) type ReplicaSlot = Arc<Mutex<NodeHandles>>;

/// What the harness reaches into on a running node: its replica of the default keyspace's first
/// shard (status, and the final state without topology changes) and all its replicas.
pub(crate) struct NodeHandles {
    replica: Weak<dyn Replication>,
    pub(crate) replicas: Weak<Replicas>,
}

fn host(id: u64) -> String {
    format!("n{id}")
}

fn no_replica() -> NodeHandles {
    NodeHandles {
        replica: Weak::<basalt_consensus::raft::RaftGroup>::new(),
        replicas: Weak::new(),
    }
}

fn empty_slot() -> ReplicaSlot {
    Arc::new(Mutex::new(no_replica()))
}

/// Kills node `id`'s process and drops its disk's unsynced writes; `sim.bounce` restarts it.
fn crash_node(
    sim: &mut turmoil::Sim<'_>,
    id: u64,
    slots: &BTreeMap<u64, ReplicaSlot>,
    engines: &BTreeMap<u64, Arc<MemoryEngine>>,
) {
    *slots[&id].lock() = no_replica();
    sim.crash(host(id));
    engines[&id].crash();
}

fn run_on_this_thread(cfg: &SimConfig) -> Result<SimOutcome, SimError> {
    entropy::seed_this_thread(cfg.seed);
    record_panics_on_this_thread();
    basalt_consensus::raft::blocking::run_inline_on_this_thread();
    let schedule = Schedule::generate(cfg.seed, &cfg.faults, cfg.nodes, cfg.duration);
    let dir = tempfile::tempdir()?;
    let mut sim = turmoil::Builder::new()
        .rng_seed(cfg.seed)
        .simulation_duration(cfg.duration + 2 * RECOVERY_LIMIT + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(BASE_MIN_LATENCY)
        .max_message_latency(BASE_MAX_LATENCY)
        .build();

    let ids: Vec<u64> = (1..=cfg.nodes as u64).collect();
    let initial_cluster: BTreeMap<u64, String> = ids.iter().map(|&id| (id, format!("{}:{PORT}", host(id)))).collect();
    let mut engines = BTreeMap::new();
    let mut slots = BTreeMap::new();
    for &id in &ids {
        let engine = MemoryEngine::new();
        let slot = empty_slot();
        let lease_reads = cfg.read_modes.contains(&ReadMode::Lease);
        let rate = f64::from(within_drift_bound(schedule.clock_rates[(id - 1) as usize], lease_reads)) / 1000.0;
        let ncfg = node_config(
            id,
            &initial_cluster,
            dir.path().join(host(id)),
            rate,
            cfg.snapshot_threshold,
        );
        let (e, s, bug) = (engine.clone(), slot.clone(), cfg.planted_bug);
        let (offset, ahead) = wall_clock_offset(cfg.seed, id, cfg.faults.skew);
        sim.host(host(id), move || {
            let (engine, slot, ncfg) = (e.clone(), s.clone(), ncfg.clone());
            async move {
                let (incoming, listen) = net::listen(PORT).await?;
                let env = NodeEnv {
                    engine: Some(engine),
                    writer_on_task: true,
                    dialer: net::dialer(),
                    serve_metrics: false,
                    planted_bug: bug,
                    // Created when the host (re)starts: its clock reads the same simulated wall
                    // time as before a crash, as a real machine's would.
                    clock: Arc::new(SimClock::new(SIM_EPOCH_US + nanos(elapsed()) / 1_000, offset, ahead)),
                };
                let node = Node::start_with(ncfg, env, incoming, listen).await?;
                *slot.lock() = NodeHandles {
                    replica: Arc::downgrade(&node.replica()),
                    replicas: Arc::downgrade(node.replicas()),
                };
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        engines.insert(id, engine);
        slots.insert(id, slot);
    }

    let endpoints: Vec<String> = initial_cluster.values().cloned().collect();
    let topology = cfg.faults.topology;
    if topology {
        // Phase 0: the workload's keyspace exists before any client uses it.
        let endpoints = endpoints.clone();
        sim.client("setup", async move {
            let client = Client::connect_with(client_config(endpoints), net::dialer()).await?;
            topology::create_keyspace(&client).await?;
            Ok(())
        });
        while !sim.step().map_err(|e| SimError::Turmoil(e.to_string()))? {}
    }
    let recorder = Arc::new(Recorder::new(sim_now, cfg.max_ops));
    let keys: Arc<Vec<String>> = Arc::new((0..cfg.keys).map(|k| format!("k{k}")).collect());
    let until = nanos(cfg.duration);
    for process in 0..(cfg.clients + cfg.readers) as u64 {
        let mix = if process < cfg.clients as u64 {
            Mix::Mixed
        } else {
            Mix::ReadOnly
        };
        let (recorder, keys, endpoints) = (recorder.clone(), keys.clone(), endpoints.clone());
        let seed = cfg.seed.wrapping_add((process + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mode = cfg.read_modes[process as usize % cfg.read_modes.len()];
        sim.client(format!("c{process}"), async move {
            let mut client = Client::connect_with(client_config(endpoints), net::dialer()).await?;
            if topology {
                client = client.with_keyspace(topology::KEYSPACE);
            }
            client_process(process, mix, client.with_read_mode(mode), &recorder, &keys, seed, until).await;
            Ok(())
        });
    }
    let log: Arc<Mutex<Vec<(f64, String)>>> = Arc::default();
    if !schedule.membership.is_empty() {
        let (changes, log, endpoints) = (schedule.membership.clone(), log.clone(), endpoints.clone());
        let addrs = initial_cluster.clone();
        sim.client("operator", async move {
            let mut ccfg = client_config(endpoints);
            ccfg.deadline = Duration::from_secs(10);
            let client = Client::connect_with(ccfg, net::dialer()).await?;
            for change in changes {
                tokio::time::sleep(change.remove.saturating_sub(elapsed())).await;
                match client.remove_member(change.node).await {
                    Ok(()) => note(&log, format!("removed node {} from the group", change.node)),
                    Err(e) => note(&log, format!("removing node {} failed: {e}", change.node)),
                }
                tokio::time::sleep(change.add.saturating_sub(elapsed())).await;
                restore_member(&client, change.node, &addrs[&change.node], &log).await?;
            }
            Ok(())
        });
    }

    if !schedule.topology.is_empty() {
        let (changes, log, endpoints, keys) = (schedule.topology.clone(), log.clone(), endpoints.clone(), keys.clone());
        let nodes = ids.clone();
        sim.client("topologist", async move {
            let mut ccfg = client_config(endpoints);
            ccfg.deadline = Duration::from_secs(10);
            let client = Client::connect_with(ccfg, net::dialer()).await?;
            topology::operate(&client, &changes, &keys, &nodes, &log).await;
            Ok(())
        });
    }

    // Phase 1: the workload under the nemesis.
    let mut pending: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, s) in schedule.faults.iter().enumerate() {
        pending.push((s.start, true, i));
        pending.push((s.end, false, i));
    }
    pending.sort();
    let mut next = 0;
    let mut isolated: BTreeMap<usize, Vec<(u64, u64)>> = BTreeMap::new();
    loop {
        while next < pending.len() && pending[next].0 <= sim.elapsed() {
            let (_, start, i) = pending[next];
            let fault = &schedule.faults[i].fault;
            let at = sim.elapsed().as_secs_f64();
            if start {
                let cut = inject(&mut sim, fault, &ids, &slots, &engines);
                isolated.insert(i, cut);
                log.lock().push((at, fault.to_string()));
            } else {
                heal(&mut sim, fault, isolated.remove(&i).unwrap_or_default(), &ids);
                log.lock().push((at, format!("healed: {fault}")));
            }
            next += 1;
        }
        if sim.step().map_err(|e| SimError::Turmoil(e.to_string()))? {
            break;
        }
    }
    // Faults whose heal falls after the last client finished are still in force.
    for (i, cut) in std::mem::take(&mut isolated) {
        heal(&mut sim, &schedule.faults[i].fault, cut, &ids);
    }
    let workload_end = sim.elapsed();

    // Phase 2: heal, then crash and restart every node.
    sim.set_max_message_latency(BASE_MAX_LATENCY);
    sim.set_fail_rate(0.0);
    for &id in &ids {
        crash_node(&mut sim, id, &slots, &engines);
    }
    for &id in &ids {
        sim.bounce(host(id));
    }
    log.lock().push((
        sim.elapsed().as_secs_f64(),
        "healed; crashed and restarted every node".into(),
    ));

    // Phase 3: a leader serves the keys, then every replica catches up and is read directly.
    let states: Arc<Mutex<Result<BTreeMap<u64, State>, String>>> = Arc::new(Mutex::new(Err("not read".into())));
    {
        let (keys, endpoints, slots, states) = (keys.clone(), endpoints.clone(), slots.clone(), states.clone());
        let addrs = initial_cluster.clone();
        sim.client("checker", async move {
            *states.lock() = final_states(&keys, endpoints, &addrs, &slots, topology).await;
            Ok(())
        });
    }
    while !sim.step().map_err(|e| SimError::Turmoil(e.to_string()))? {}
    let states = std::mem::replace(&mut *states.lock(), Err(String::new())).map_err(SimError::NoRecovery)?;

    let history = recorder.take();
    let stale_reads = recorder.take_stale_reads();
    let judgement = Judgement::of(&history, &stale_reads, &states, workload_end)?;
    let faults = std::mem::take(&mut *log.lock());
    let mut trace = Fnv1a::default();
    let positions: Vec<_> = ids
        .iter()
        .map(|id| {
            slots[id]
                .lock()
                .replica
                .upgrade()
                .map(|r| (r.status().term, r.status().applied_index))
        })
        .collect();
    write!(trace, "{:016x}|{faults:?}|{positions:?}", history.hash()).expect("the FNV writer never fails");
    Ok(SimOutcome {
        seed: cfg.seed,
        history,
        judgement,
        faults,
        trace_hash: trace.0,
        simulated: sim.elapsed(),
        panics: recorded_panics(),
    })
}

fn node_config(
    id: u64,
    initial_cluster: &BTreeMap<u64, String>,
    data_dir: std::path::PathBuf,
    clock_rate: f64,
    snapshot_threshold: u64,
) -> NodeConfig {
    use basalt_server::config::{
        DEFAULT_ELECTION_TIMEOUT_MAX, DEFAULT_ELECTION_TIMEOUT_MIN, DEFAULT_HEARTBEAT_INTERVAL,
        DEFAULT_HIBERNATE_AFTER, DEFAULT_LIVENESS_INTERVAL, DEFAULT_LIVENESS_TIMEOUT, DEFAULT_LOG_LEVEL,
    };
    // A clock that runs fast fires its timers early in true time, and the reverse.
    let scaled = |d: Duration| d.div_f64(clock_rate);
    let listen = SocketAddr::from(([0, 0, 0, 0], PORT));
    NodeConfig {
        node_id: id,
        listen,
        data_dir,
        initial_cluster: initial_cluster.clone(),
        join: false,
        metrics_listen: listen,
        snapshot_threshold,
        log_level: DEFAULT_LOG_LEVEL.into(),
        request_timeout: Duration::from_secs(5),
        heartbeat_interval: scaled(DEFAULT_HEARTBEAT_INTERVAL),
        election_timeout_min: scaled(DEFAULT_ELECTION_TIMEOUT_MIN),
        election_timeout_max: scaled(DEFAULT_ELECTION_TIMEOUT_MAX),
        placement: Default::default(),
        hibernate_idle_groups: true,
        liveness_interval: scaled(DEFAULT_LIVENESS_INTERVAL),
        liveness_timeout: scaled(DEFAULT_LIVENESS_TIMEOUT),
        hibernate_after: scaled(DEFAULT_HIBERNATE_AFTER),
        max_clock_drift: basalt_consensus::raft::DEFAULT_MAX_CLOCK_DRIFT,
        // Deterministic runs: the CPU, never a device that one machine has and another lacks.
        codec_backend: basalt_gpu::BackendChoice::Cpu,
    }
}

/// A node's clock rate (thousandths), narrowed when lease reads are in the workload to the skew
/// the drift bound covers: from 0.75x–1.33x to 0.92x–1.08x. Lease reads are only promised while
/// clocks stay within the bound (docs/read-modes.md), and at these rates a leader's lease (the
/// 600 ms election timeout less the 100 ms bound, by its clock) ends before any follower's vote
/// refusal (600 ms by its clock): 600/0.92 - 100 = 552 ms <= 600/1.08 = 555 ms. Narrowing rather
/// than drawing anew keeps every seed's schedule otherwise the same.
fn within_drift_bound(rate: u32, lease_reads: bool) -> u32 {
    match (lease_reads, rate) {
        (false, r) => r,
        (true, r) if r < 1000 => 1000 - (1000 - r) * 80 / 250,
        (true, r) => 1000 + (r - 1000) * 80 / 333,
    }
}

/// The simulated wall clock's reading at the start of every run (2026-01-01T00:00:00Z), so that
/// runs are deterministic.
const SIM_EPOCH_US: u64 = 1_767_225_600_000_000;

/// Node `id`'s wall-clock offset: with `skew` on, up to half the drift bound either way (so two
/// nodes differ by less than the bound, as the configuration promises); else none.
fn wall_clock_offset(seed: u64, id: u64, skew: bool) -> (Duration, bool) {
    if !skew {
        return (Duration::ZERO, true);
    }
    let half = basalt_consensus::raft::DEFAULT_MAX_CLOCK_DRIFT.as_micros() as u64 / 2;
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(id.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    (Duration::from_micros(mix % half), (mix >> 32) & 1 == 0)
}

fn client_config(endpoints: Vec<String>) -> ClientConfig {
    let mut c = ClientConfig::new(endpoints);
    c.attempt_timeout = Duration::from_secs(1);
    c.deadline = Duration::from_secs(5);
    c
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Simulated time since the run began; only meaningful inside the simulation.
fn elapsed() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn sim_now() -> u64 {
    nanos(elapsed())
}

/// Records an operator action for the run's report. With `BASALT_SIM_ECHO` set it is also printed
/// at once, which interleaves it with the nodes' log lines (`RUST_LOG`) when debugging a seed,
/// and shows it even for a run that ends in an error rather than a report.
fn note(log: &Mutex<Vec<(f64, String)>>, what: String) {
    let at = elapsed().as_secs_f64();
    if std::env::var_os("BASALT_SIM_ECHO").is_some() {
        eprintln!("{at:7.2}s {what}");
    }
    log.lock().push((at, what));
}

/// Adds `node` back until the group lists it as a voter.
async fn restore_member(
    client: &Client,
    node: u64,
    addr: &str,
    log: &Mutex<Vec<(f64, String)>>,
) -> Result<(), Box<dyn std::error::Error>> {
    // An add that the leader acknowledges is authoritative: it runs there, and succeeds only
    // once the node is a voter in the committed membership (or already was).
    let deadline = elapsed() + RECOVERY_LIMIT;
    loop {
        match client.add_member(node, addr).await {
            Ok(()) => {
                note(log, format!("node {node} is a voter again"));
                return Ok(());
            }
            Err(e) if elapsed() > deadline => {
                return Err(format!("node {node} could not be added back: {e}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Applies `fault`; returns the node pairs it cut, for [`heal`].
fn inject(
    sim: &mut turmoil::Sim<'_>,
    fault: &Fault,
    ids: &[u64],
    slots: &BTreeMap<u64, ReplicaSlot>,
    engines: &BTreeMap<u64, Arc<MemoryEngine>>,
) -> Vec<(u64, u64)> {
    match fault {
        Fault::Partition(split) => {
            let leader = ids
                .iter()
                .find_map(|id| slots[id].lock().replica.upgrade().and_then(|r| r.status().leader_id))
                .unwrap_or(ids[0]);
            let pairs = split.pairs(ids, leader);
            for &(a, b) in &pairs {
                sim.partition(host(a), host(b));
            }
            pairs
        }
        Fault::Loss { fail_rate_per_mille } => {
            sim.set_fail_rate(f64::from(*fail_rate_per_mille) / 1000.0);
            Vec::new()
        }
        Fault::Delay { max_latency } => {
            sim.set_max_message_latency(*max_latency);
            Vec::new()
        }
        Fault::Crash { node } => {
            crash_node(sim, *node, slots, engines);
            Vec::new()
        }
        Fault::Pause { node } => {
            for other in ids.iter().filter(|&o| o != node) {
                sim.hold(host(*node), host(*other));
            }
            Vec::new()
        }
    }
}

fn heal(sim: &mut turmoil::Sim<'_>, fault: &Fault, cut: Vec<(u64, u64)>, ids: &[u64]) {
    match fault {
        Fault::Partition(_) => {
            for (a, b) in cut {
                sim.repair(host(a), host(b));
            }
        }
        Fault::Loss { .. } => sim.set_fail_rate(0.0),
        Fault::Delay { .. } => sim.set_max_message_latency(BASE_MAX_LATENCY),
        Fault::Crash { node } => sim.bounce(host(*node)),
        Fault::Pause { node } => {
            for other in ids.iter().filter(|&o| o != node) {
                sim.release(host(*node), host(*other));
            }
        }
    }
}

/// Phase 3: wait until a leader serves every key, then until every replica has applied the same
/// index, and read each replica's state from its own state machine.
async fn final_states(
    keys: &[String],
    endpoints: Vec<String>,
    addrs: &BTreeMap<u64, String>,
    slots: &BTreeMap<u64, ReplicaSlot>,
    topology: bool,
) -> Result<BTreeMap<u64, State>, String> {
    let deadline = elapsed() + RECOVERY_LIMIT;
    let mut ccfg = client_config(endpoints);
    ccfg.deadline = RECOVERY_LIMIT;
    let mut client = Client::connect_with(ccfg, net::dialer())
        .await
        .map_err(|e| e.to_string())?;
    if topology {
        client = client.with_keyspace(topology::KEYSPACE);
    }
    // A removal whose outcome the operator never learned may have landed after its re-add.
    let log = Mutex::new(Vec::new());
    for (id, addr) in addrs {
        restore_member(&client, *id, addr, &log)
            .await
            .map_err(|e| e.to_string())?;
    }
    read_all(&client, keys)
        .await
        .map_err(|(key, e)| format!("reading {key:?} after healing: {e}"))?;
    if topology {
        return topology::final_states(&client, keys, slots).await;
    }
    loop {
        let replicas: Vec<Arc<dyn Replication>> = slots.values().filter_map(|s| s.lock().replica.upgrade()).collect();
        let applied: Vec<u64> = replicas.iter().map(|r| r.status().applied_index).collect();
        let commit = replicas.iter().map(|r| r.status().commit_index).max().unwrap_or(0);
        if replicas.len() == slots.len() && applied.iter().all(|&a| a == commit) {
            let mut states = BTreeMap::new();
            for (id, slot) in slots {
                let replica = slot
                    .lock()
                    .replica
                    .upgrade()
                    .ok_or("a replica stopped during the final read")?;
                let reader = replica.reader();
                let mut state = BTreeMap::new();
                for key in keys {
                    let v = reader.get(key.as_bytes()).map_err(|e| format!("node {id}: {e}"))?;
                    state.insert(key.clone(), v.map(|b| String::from_utf8_lossy(&b).into_owned()));
                }
                states.insert(*id, state);
            }
            return Ok(states);
        }
        if elapsed() > deadline {
            let detail: Vec<String> = replicas
                .iter()
                .map(|r| {
                    let s = r.status();
                    let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
                    format!(
                        "node {} {:?} term {} leader {:?} log {} commit {} applied {} snapshot {} voters {voters:?}",
                        s.node_id,
                        s.role,
                        s.term,
                        s.leader_id,
                        s.last_log_index,
                        s.commit_index,
                        s.applied_index,
                        s.snapshot_index
                    )
                })
                .collect();
            return Err(format!("replicas did not catch up: {}", detail.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
