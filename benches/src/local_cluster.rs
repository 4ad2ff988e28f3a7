//! Local clusters of real `basaltd` processes on 127.0.0.1, for tests, benchmarks, the demo and
//! the Jepsen-style harness.
//!
//! A [`LocalCluster`] owns every process it starts and can kill (SIGKILL), terminate (SIGTERM),
//! pause (SIGSTOP), resume (SIGCONT) and restart any of them, or add a node started with `--join`.
//!
//! Invariants, and why they hold:
//! - **No orphans.** Dropping the cluster SIGKILLs and reaps every process it started, before the
//!   temporary base directory is removed (the `Drop` body runs before the fields are dropped). A
//!   Ctrl-C in a terminal reaches the nodes too: they stay in the caller's process group.
//! - **Signals never hit a stranger.** A process is signalled only through a `Child` that has not
//!   been reaped yet, so its pid cannot have been recycled for another process. Reaping happens in
//!   one place ([`Node::reap`]), which also records the exit status for whoever asks next.
//! - **Stable addresses.** Each node keeps its client/peer port and metrics port for the cluster's
//!   whole life, so a restart rejoins under the address its peers know. Ports come from binding
//!   127.0.0.1:0 and are never handed to two nodes of the same cluster (a killed node's port stays
//!   reserved for its restart).
//! - **Ready means serving.** `start`, `restart` and `start_joining_node` return only after the node
//!   printed `basaltd ready node_id=N ...` (the server prints it once its listener serves) *in this
//!   launch*: the log is appended to across restarts, so the search starts at the launch's offset.
//! - **Logs survive.** Each node's stdout and stderr go to `<base>/node-N.log`, next to its data
//!   directory `<base>/node-N`, and every launch writes a header line with its full command line.
//!   Start-up errors quote the tail of that log so a failure is diagnosable without the files.
//!
//! - **Where nodes run.** By default every node is a plain child process on 127.0.0.1. With
//!   [`LocalClusterOptions::hosts`] each node runs through the given [`NodeHosts`] instead (the
//!   Jepsen runner puts each node in a network namespace of its own, so it can cut links), on that
//!   host's address and the fixed ports [`HOSTED_PORT`] and [`HOSTED_METRICS_PORT`]. The wrapper must
//!   exec the node in place, so the child's pid is the node's and signals reach it.
//!
//! All methods take `&self` (state sits behind one mutex, never held across an `.await`), so a
//! harness can share one cluster between a nemesis task and its clients through an `Arc`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use basalt_client::{Client, ClientConfig, ClientError};
use basalt_proto::v1::ClusterStatusResponse;
use tempfile::TempDir;

/// How long a node may take from launch to its `basaltd ready` line. Generous because debug
/// builds on a loaded machine open RocksDB slowly, and a false timeout is worse than a slow one.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`LocalCluster::terminate`] waits after SIGTERM before it falls back to SIGKILL.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The client/peer port of a node run through [`NodeHosts`]: each such node has an address of
/// its own, so every node can use the same port.
pub const HOSTED_PORT: u16 = 7379;
/// The metrics port of a node run through [`NodeHosts`].
pub const HOSTED_METRICS_PORT: u16 = 9100;

/// Runs nodes somewhere other than as plain processes on 127.0.0.1; see the module documentation.
pub trait NodeHosts: Send + Sync + std::fmt::Debug {
    /// The address node `id` listens on (with [`HOSTED_PORT`] and [`HOSTED_METRICS_PORT`]).
    fn ip(&self, id: u64) -> IpAddr;
    /// A command that runs `program` as node `id`, replacing itself with it (exec, not fork).
    fn command(&self, id: u64, program: &Path) -> Command;
}

const POLL_INTERVAL: Duration = Duration::from_millis(20);
const LEADER_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Status probes are short so that a node that is down does not delay noticing the leader, but
/// longer than the server's own probe of its peers (0.7 s): a node asked for the status of a
/// cluster with a paused member answers only after that probe times out.
const STATUS_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
const STATUS_DEADLINE: Duration = Duration::from_millis(2500);
const LOG_TAIL_LINES: usize = 25;
/// Only the end of a log is read for error messages; a debug-level log can be large.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// What [`LocalCluster::start`] launches.
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    /// Number of nodes in the initial cluster, with ids `1..=nodes`.
    pub nodes: usize,
    /// The `basaltd` binary; see [`basaltd_path`].
    pub basaltd: PathBuf,
    /// Where data directories and logs go. `None`: a temporary directory removed on drop.
    /// `Some(dir)`: kept for inspection; it must not already hold data of these nodes.
    pub base_dir: Option<PathBuf>,
    /// Appended to every node's command line (for example `--log-level debug`).
    pub extra_args: Vec<String>,
    /// Passed as `--snapshot-threshold` when set.
    pub snapshot_threshold: Option<u64>,
    /// Where nodes run; `None`: plain processes on 127.0.0.1 with reserved free ports.
    pub hosts: Option<Arc<dyn NodeHosts>>,
}

impl LocalClusterOptions {
    /// `nodes` nodes of `basaltd`, temporary directory, no extra arguments.
    pub fn new(nodes: usize, basaltd: impl Into<PathBuf>) -> Self {
        LocalClusterOptions {
            nodes,
            basaltd: basaltd.into(),
            base_dir: None,
            extra_args: Vec::new(),
            snapshot_threshold: None,
            hosts: None,
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum ClusterError {
    #[error("invalid local cluster options: {0}")]
    InvalidOptions(String),
    #[error(
        "basaltd binary not found (looked at: {}); build it with \
         `cargo build -p basalt-server --bin basaltd` or set BASALTD=/path/to/basaltd",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    BasaltdNotFound { searched: Vec<PathBuf> },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("no node {id} in this local cluster")]
    UnknownNode { id: u64 },
    #[error("node id {id} is already used in this local cluster")]
    DuplicateNode { id: u64 },
    #[error("data directory {} already exists; pick a fresh base directory", path.display())]
    DataDirExists { path: PathBuf },
    #[error("node {id} is already running")]
    AlreadyRunning { id: u64 },
    #[error("node {id} is not running")]
    NotRunning { id: u64 },
    #[error("node {id} is paused (SIGSTOP); resume it first")]
    Paused { id: u64 },
    #[error("node {id} exited during start-up ({status}); last lines of {}:\n{log_tail}", log.display())]
    ExitedDuringStartup {
        id: u64,
        status: ExitStatus,
        log: PathBuf,
        log_tail: String,
    },
    #[error(
        "node {id} did not print `basaltd ready` within {waited:?} (killed it); last lines of {}:\n{log_tail}",
        log.display()
    )]
    StartupTimeout {
        id: u64,
        waited: Duration,
        log: PathBuf,
        log_tail: String,
    },
    #[error("sending {signal} to node {id} (pid {pid}) failed: {source}")]
    Signal {
        id: u64,
        pid: u32,
        signal: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("node {id} did not exit within {waited:?} of SIGTERM (killed it with SIGKILL)")]
    ShutdownTimeout { id: u64, waited: Duration },
    #[error("no leader within {waited:?} (last observation: {last_observation})")]
    NoLeader { waited: Duration, last_observation: String },
    #[error("cluster status from node {id}: {source}")]
    Status {
        id: u64,
        #[source]
        source: ClientError,
    },
    #[error("client: {0}")]
    Client(#[from] ClientError),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// Finds `basaltd`: `$BASALTD` if set (it must exist), else the `basaltd` next to the running
/// executable, else the one in its parent directory (test binaries live in `target/*/deps`).
pub fn basaltd_path() -> Result<PathBuf, ClusterError> {
    if let Some(path) = std::env::var_os("BASALTD") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ClusterError::BasaltdNotFound { searched: vec![path] })
        };
    }
    let exe = std::env::current_exe().map_err(io_error("locating the current executable"))?;
    let searched: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(format!("basaltd{}", std::env::consts::EXE_SUFFIX)))
        .collect();
    match searched.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => Err(ClusterError::BasaltdNotFound { searched }),
    }
}

#[derive(Clone, Copy, Debug)]
enum Signal {
    Kill,
    Term,
    Stop,
    Cont,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Kill => "SIGKILL",
            Signal::Term => "SIGTERM",
            Signal::Stop => "SIGSTOP",
            Signal::Cont => "SIGCONT",
        }
    }
}

fn send_signal(id: u64, child: &Child, signal: Signal) -> Result<(), ClusterError> {
    let pid = child.id();
    let failed = |source| ClusterError::Signal {
        id,
        pid,
        signal: signal.name(),
        source,
    };
    let raw_pid = libc::pid_t::try_from(pid)
        .map_err(|_| failed(io::Error::new(io::ErrorKind::InvalidInput, "pid overflows pid_t")))?;
    // SAFETY: kill(2) has no memory-safety preconditions. The pid belongs to a child we have not
    // reaped (see the module invariants), so it still names that child, possibly as a zombie.
    let rc = unsafe { libc::kill(raw_pid, signal.raw()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(failed(io::Error::last_os_error()))
    }
}

/// Everything needed to (re)launch one node; fixed for the cluster's life.
#[derive(Debug)]
struct NodeSpec {
    id: u64,
    listen: SocketAddr,
    metrics: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<OsString>,
}

#[derive(Debug)]
struct Node {
    spec: NodeSpec,
    /// `Some` exactly while the process has not been reaped.
    process: Option<Child>,
    paused: bool,
    last_exit: Option<ExitStatus>,
    launches: u32,
}

impl Node {
    fn new(spec: NodeSpec) -> Self {
        Node {
            spec,
            process: None,
            paused: false,
            last_exit: None,
            launches: 0,
        }
    }

    /// Reaps the process if it has exited. The only place `process` becomes `None` after an
    /// exit, so the exit status is never lost between callers.
    fn reap(&mut self) {
        let Some(child) = self.process.as_mut() else {
            return;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                self.last_exit = Some(status);
                self.process = None;
                self.paused = false;
            }
            Ok(None) => {}
            // Only ECHILD is possible here: the child is gone and cannot be signalled any more.
            Err(_) => {
                self.process = None;
                self.paused = false;
            }
        }
    }

    fn running(&mut self) -> Result<&Child, ClusterError> {
        self.reap();
        self.process
            .as_ref()
            .ok_or(ClusterError::NotRunning { id: self.spec.id })
    }

    /// SIGKILLs and reaps the process, if any. Waiting cannot block for long: SIGKILL ends even a
    /// stopped process, and the kernel reaps nothing until we wait.
    fn kill_and_reap(&mut self) -> Result<(), ClusterError> {
        let id = self.spec.id;
        self.reap();
        let Some(child) = self.process.as_mut() else {
            return Err(ClusterError::NotRunning { id });
        };
        send_signal(id, child, Signal::Kill)?;
        let status = child
            .wait()
            .map_err(io_error(format!("waiting for node {id} after SIGKILL")))?;
        self.last_exit = Some(status);
        self.process = None;
        self.paused = false;
        Ok(())
    }

    /// Starts the process and returns the log offset at which this launch's output begins.
    fn launch(&mut self, basaltd: &Path, hosts: Option<&dyn NodeHosts>) -> Result<u64, ClusterError> {
        let id = self.spec.id;
        let log_path = &self.spec.log_path;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io_error(format!("opening {}", log_path.display())))?;
        self.launches += 1;
        let command_line: Vec<String> = std::iter::once(basaltd.as_os_str())
            .chain(self.spec.args.iter().map(OsString::as_os_str))
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        writeln!(
            log,
            "--- local cluster: launch #{} of node {id}: {}",
            self.launches,
            command_line.join(" ")
        )
        .map_err(io_error(format!("writing {}", log_path.display())))?;
        let offset = log
            .metadata()
            .map_err(io_error(format!("reading metadata of {}", log_path.display())))?
            .len();
        let stderr = log
            .try_clone()
            .map_err(io_error(format!("duplicating the handle of {}", log_path.display())))?;
        let mut command = match hosts {
            Some(hosts) => hosts.command(id, basaltd),
            None => Command::new(basaltd),
        };
        let child = command
            .args(&self.spec.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(io_error(format!("spawning node {id} ({})", basaltd.display())))?;
        self.process = Some(child);
        self.paused = false;
        Ok(offset)
    }
}

/// A cluster of local `basaltd` processes. See the module documentation for its guarantees.
#[derive(Debug)]
pub struct LocalCluster {
    base_dir: PathBuf,
    /// Dropped (and so removed) after `Drop::drop` has reaped every process.
    temp_dir: Option<TempDir>,
    keep_data: AtomicBool,
    basaltd: PathBuf,
    /// `--snapshot-threshold` and the caller's extra arguments, appended to every node.
    common_args: Vec<OsString>,
    nodes: Mutex<BTreeMap<u64, Node>>,
    /// One single-endpoint client per node for status probes, created on first use.
    status_clients: Mutex<BTreeMap<u64, Client>>,
    hosts: Option<Arc<dyn NodeHosts>>,
}

/// Attempts at starting a cluster whose ports were taken in the meantime (see [`LocalCluster::start`]).
const START_ATTEMPTS: u32 = 3;

impl LocalCluster {
    /// Launches `options.nodes` nodes bootstrapped together with `--initial-cluster` and returns
    /// once every one of them is serving. Does not wait for a leader: see
    /// [`LocalCluster::wait_for_leader`].
    ///
    /// Ports are reserved by binding and releasing them, so another process (another test's node,
    /// or any outgoing connection given an ephemeral port) can take one before the node binds it.
    /// A start that fails that way is retried with fresh ports and a fresh temporary directory,
    /// up to [`START_ATTEMPTS`] times; with a caller-given directory it is not retried, since the
    /// failed attempt may have bootstrapped data there with the old addresses.
    pub async fn start(options: LocalClusterOptions) -> Result<Self, ClusterError> {
        let retry = options.base_dir.is_none() && options.hosts.is_none();
        let mut attempt = 1;
        loop {
            match Self::start_once(options.clone()).await {
                Err(ClusterError::ExitedDuringStartup { ref log_tail, .. })
                    if retry && attempt < START_ATTEMPTS && log_tail.contains("Address already in use") =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(options: LocalClusterOptions) -> Result<Self, ClusterError> {
        if options.nodes == 0 {
            return Err(ClusterError::InvalidOptions("a cluster needs at least one node".into()));
        }
        if !options.basaltd.is_file() {
            return Err(ClusterError::BasaltdNotFound {
                searched: vec![options.basaltd],
            });
        }
        let (temp_dir, base_dir) = match options.base_dir {
            Some(dir) => {
                fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
                (None, dir)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("basalt-cluster-")
                    .tempdir()
                    .map_err(io_error("creating a temporary directory"))?;
                let path = temp.path().to_path_buf();
                (Some(temp), path)
            }
        };

        let ids: Vec<u64> = (1..=options.nodes as u64).collect();
        let addresses: Vec<(SocketAddr, SocketAddr)> = match &options.hosts {
            Some(hosts) => ids.iter().map(|&id| hosted_addresses(hosts.as_ref(), id)).collect(),
            None => {
                let ports =
                    reserve_ports(2 * ids.len(), &BTreeSet::new()).map_err(io_error("reserving local ports"))?;
                let (listen, metrics) = ports.split_at(ids.len());
                listen
                    .iter()
                    .zip(metrics)
                    .map(|(&l, &m)| (loopback(l), loopback(m)))
                    .collect()
            }
        };
        let initial_cluster = ids
            .iter()
            .zip(&addresses)
            .map(|(id, (listen, _))| format!("{id}={listen}"))
            .collect::<Vec<_>>()
            .join(",");

        let mut common_args = Vec::new();
        if let Some(threshold) = options.snapshot_threshold {
            common_args.push("--snapshot-threshold".into());
            common_args.push(threshold.to_string().into());
        }
        common_args.extend(options.extra_args.into_iter().map(OsString::from));

        let mut nodes = BTreeMap::new();
        for (&id, &(listen, metrics)) in ids.iter().zip(&addresses) {
            let mut spec = node_spec(&base_dir, id, listen, metrics)?;
            spec.args.push("--initial-cluster".into());
            spec.args.push(initial_cluster.clone().into());
            spec.args.extend(common_args.iter().cloned());
            nodes.insert(id, Node::new(spec));
        }

        // Built before anything is launched, so an error below drops it and kills what started.
        let cluster = LocalCluster {
            base_dir,
            temp_dir,
            keep_data: AtomicBool::new(false),
            basaltd: options.basaltd,
            common_args,
            nodes: Mutex::new(nodes),
            status_clients: Mutex::new(BTreeMap::new()),
            hosts: options.hosts,
        };
        let mut launched = Vec::with_capacity(ids.len());
        {
            let mut nodes = cluster.lock_nodes();
            for id in &ids {
                let node = nodes
                    .get_mut(id)
                    .expect("every id in `ids` was inserted into `nodes` above");
                launched.push((*id, node.launch(&cluster.basaltd, cluster.hosts.as_deref())?));
            }
        }
        // Nodes start concurrently, so one deadline covers them all.
        let deadline = Instant::now() + READY_TIMEOUT;
        for (id, offset) in launched {
            cluster.wait_ready(id, offset, deadline).await?;
        }
        Ok(cluster)
    }

    /// The directory holding every node's data directory and log.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Keep (`true`) or remove (`false`, the default) a temporary base directory on drop, for
    /// example to inspect logs after a failed test. A caller-given base directory is always kept.
    pub fn set_keep_data(&self, keep: bool) {
        self.keep_data.store(keep, Ordering::Relaxed);
    }

    /// Every node ever added to this cluster, in ascending order, running or not.
    pub fn node_ids(&self) -> Vec<u64> {
        self.lock_nodes().keys().copied().collect()
    }

    /// Client addresses (`host:port`) of every node, in node id order.
    pub fn endpoints(&self) -> Vec<String> {
        self.lock_nodes()
            .values()
            .map(|node| node.spec.listen.to_string())
            .collect()
    }

    /// The client (and peer) address of node `id`.
    pub fn endpoint(&self, id: u64) -> Result<String, ClusterError> {
        self.with_node(id, |node| node.spec.listen.to_string())
    }

    /// The Prometheus endpoint of node `id` (`GET /metrics`).
    pub fn metrics_addr(&self, id: u64) -> Result<SocketAddr, ClusterError> {
        self.with_node(id, |node| node.spec.metrics)
    }

    pub fn data_dir(&self, id: u64) -> Result<PathBuf, ClusterError> {
        self.with_node(id, |node| node.spec.data_dir.clone())
    }

    /// The file collecting node `id`'s stdout and stderr across all its launches.
    pub fn log_path(&self, id: u64) -> Result<PathBuf, ClusterError> {
        self.with_node(id, |node| node.spec.log_path.clone())
    }

    /// The process id of node `id` while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        let mut nodes = self.lock_nodes();
        let node = nodes.get_mut(&id)?;
        node.running().ok().map(Child::id)
    }

    /// Whether node `id`'s process is alive (a paused node is alive).
    pub fn is_running(&self, id: u64) -> bool {
        self.pid(id).is_some()
    }

    pub fn is_paused(&self, id: u64) -> bool {
        let mut nodes = self.lock_nodes();
        nodes.get_mut(&id).is_some_and(|node| {
            node.reap();
            node.paused
        })
    }

    /// The exit status of node `id`'s last process, once it has exited and been reaped.
    pub fn last_exit_status(&self, id: u64) -> Option<ExitStatus> {
        let mut nodes = self.lock_nodes();
        let node = nodes.get_mut(&id)?;
        node.reap();
        node.last_exit
    }

    /// A client configuration listing every node; adjust timeouts before connecting if needed.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.endpoints())
    }

    /// A client of the whole cluster with the default configuration.
    pub async fn client(&self) -> Result<Client, ClusterError> {
        Ok(Client::connect(self.client_config()).await?)
    }

    /// Node `id`'s own view of the cluster (its leader, every member's role and applied index),
    /// asked of that node alone with a short deadline.
    pub async fn cluster_status(&self, id: u64) -> Result<ClusterStatusResponse, ClusterError> {
        let client = self.status_client(id).await?;
        client
            .cluster_status()
            .await
            .map_err(|source| ClusterError::Status { id, source })
    }

    /// The index each of node `id`'s own replicas of `keyspace`'s shards has applied, by shard id,
    /// asked of that node alone. `cluster_status` reports the meta group's indexes; this is where
    /// the data's progress shows (a listing with figures describes the answering node's replicas).
    pub async fn applied_by_shard(&self, id: u64, keyspace: &str) -> Result<BTreeMap<u64, u64>, ClusterError> {
        let client = self.status_client(id).await?;
        let shards = client
            .list_shards(Some(keyspace), true)
            .await
            .map_err(|source| ClusterError::Status { id, source })?;
        Ok(shards
            .into_iter()
            .filter(|s| s.replicas.iter().any(|r| r.node_id == id))
            .map(|s| (s.id, s.applied_index))
            .collect())
    }

    /// Polls every running, unpaused node until one of them says it is the leader, and returns
    /// its id. When several claim leadership (a deposed leader that has not heard the news), the
    /// one reporting the highest term wins.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, ClusterError> {
        let started = Instant::now();
        let mut last_observation = String::from("no node is running");
        loop {
            let mut probes = tokio::task::JoinSet::new();
            for id in self.serving_node_ids() {
                let client = self.status_client(id).await?;
                probes.spawn(async move {
                    let outcome = tokio::time::timeout(STATUS_DEADLINE, client.cluster_status()).await;
                    (id, outcome)
                });
            }
            let mut best: Option<(u64, u64)> = None;
            while let Some(joined) = probes.join_next().await {
                let Ok((id, outcome)) = joined else {
                    last_observation = "a status probe task failed".into();
                    continue;
                };
                match outcome {
                    Ok(Ok(status)) if status.leader_id == id => {
                        let term = status.header.as_ref().map_or(0, |header| header.term);
                        best = best.max(Some((term, id)));
                    }
                    Ok(Ok(status)) if status.leader_id == 0 => {
                        last_observation = format!("node {id} knows no leader");
                    }
                    Ok(Ok(status)) => {
                        last_observation = format!("node {id} follows node {}", status.leader_id);
                    }
                    Ok(Err(error)) => last_observation = format!("node {id}: {error}"),
                    Err(_) => {
                        last_observation = format!("node {id} did not answer within {STATUS_DEADLINE:?}");
                    }
                }
            }
            if let Some((_, leader)) = best {
                return Ok(leader);
            }
            if started.elapsed() >= timeout {
                return Err(ClusterError::NoLeader {
                    waited: timeout,
                    last_observation,
                });
            }
            tokio::time::sleep(LEADER_POLL_INTERVAL).await;
        }
    }

    /// SIGKILLs node `id` and reaps it: a crash, with no chance to flush anything.
    pub fn kill(&self, id: u64) -> Result<(), ClusterError> {
        let mut nodes = self.lock_nodes();
        nodes
            .get_mut(&id)
            .ok_or(ClusterError::UnknownNode { id })?
            .kill_and_reap()
    }

    /// SIGTERMs node `id` (resuming it first if paused, or the signal would wait) and waits for it
    /// to exit, returning its exit status. After [`TERMINATE_TIMEOUT`] it is SIGKILLed and this
    /// returns [`ClusterError::ShutdownTimeout`].
    pub async fn terminate(&self, id: u64) -> Result<ExitStatus, ClusterError> {
        self.send_term(id)?;
        self.wait_exit(id, Instant::now() + TERMINATE_TIMEOUT).await
    }

    /// SIGTERMs every running node at once, then waits for each; returns their exit statuses.
    pub async fn terminate_all(&self) -> Result<BTreeMap<u64, ExitStatus>, ClusterError> {
        let running: Vec<u64> = self.node_ids().into_iter().filter(|id| self.is_running(*id)).collect();
        for id in &running {
            self.send_term(*id)?;
        }
        let deadline = Instant::now() + TERMINATE_TIMEOUT;
        let mut statuses = BTreeMap::new();
        for id in running {
            statuses.insert(id, self.wait_exit(id, deadline).await?);
        }
        Ok(statuses)
    }

    /// SIGSTOPs node `id`: it stays alive but answers nothing, like a long GC pause or a VM stall.
    pub fn pause(&self, id: u64) -> Result<(), ClusterError> {
        let mut nodes = self.lock_nodes();
        let node = nodes.get_mut(&id).ok_or(ClusterError::UnknownNode { id })?;
        send_signal(id, node.running()?, Signal::Stop)?;
        node.paused = true;
        Ok(())
    }

    /// SIGCONTs node `id` after [`LocalCluster::pause`].
    pub fn resume(&self, id: u64) -> Result<(), ClusterError> {
        let mut nodes = self.lock_nodes();
        let node = nodes.get_mut(&id).ok_or(ClusterError::UnknownNode { id })?;
        send_signal(id, node.running()?, Signal::Cont)?;
        node.paused = false;
        Ok(())
    }

    /// Launches a stopped node again with the same arguments, ports and data directory, and
    /// returns once it serves.
    pub async fn restart(&self, id: u64) -> Result<(), ClusterError> {
        let offset = {
            let mut nodes = self.lock_nodes();
            let node = nodes.get_mut(&id).ok_or(ClusterError::UnknownNode { id })?;
            node.reap();
            if node.process.is_some() {
                return Err(ClusterError::AlreadyRunning { id });
            }
            node.launch(&self.basaltd, self.hosts.as_deref())?
        };
        self.wait_ready(id, offset, Instant::now() + READY_TIMEOUT).await
    }

    /// Launches a new, empty node `id` with `--join` and returns its endpoint once it serves. It
    /// is not a member yet: add it with `Client::add_member(id, &endpoint)`. A later restart
    /// reuses the same command line (a non-empty data directory makes the node resume).
    pub async fn start_joining_node(&self, id: u64) -> Result<String, ClusterError> {
        let offset = {
            let mut nodes = self.lock_nodes();
            if nodes.contains_key(&id) {
                return Err(ClusterError::DuplicateNode { id });
            }
            let (listen, metrics) = match &self.hosts {
                Some(hosts) => hosted_addresses(hosts.as_ref(), id),
                None => {
                    let taken: BTreeSet<u16> = nodes
                        .values()
                        .flat_map(|node| [node.spec.listen.port(), node.spec.metrics.port()])
                        .collect();
                    let ports = reserve_ports(2, &taken).map_err(io_error("reserving local ports"))?;
                    (loopback(ports[0]), loopback(ports[1]))
                }
            };
            let mut spec = node_spec(&self.base_dir, id, listen, metrics)?;
            spec.args.push("--join".into());
            spec.args.extend(self.common_args.iter().cloned());
            let node = nodes.entry(id).or_insert(Node::new(spec));
            node.launch(&self.basaltd, self.hosts.as_deref())?
        };
        self.wait_ready(id, offset, Instant::now() + READY_TIMEOUT).await?;
        self.endpoint(id)
    }

    fn lock_nodes(&self) -> MutexGuard<'_, BTreeMap<u64, Node>> {
        // A panic while holding the lock cannot leave a node half-updated in a way that matters:
        // every field is valid on its own, and `reap` re-derives liveness from the OS.
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_node<T>(&self, id: u64, f: impl FnOnce(&Node) -> T) -> Result<T, ClusterError> {
        self.lock_nodes()
            .get(&id)
            .map(f)
            .ok_or(ClusterError::UnknownNode { id })
    }

    /// Nodes that can answer right now: running and not paused.
    fn serving_node_ids(&self) -> Vec<u64> {
        let mut nodes = self.lock_nodes();
        nodes
            .values_mut()
            .filter_map(|node| {
                node.reap();
                (node.process.is_some() && !node.paused).then_some(node.spec.id)
            })
            .collect()
    }

    async fn status_client(&self, id: u64) -> Result<Client, ClusterError> {
        let cached = self
            .status_clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(client) = cached {
            return Ok(client);
        }
        let mut config = ClientConfig::new(vec![self.endpoint(id)?]);
        config.attempt_timeout = STATUS_ATTEMPT_TIMEOUT;
        config.deadline = STATUS_DEADLINE;
        let client = Client::connect(config)
            .await
            .map_err(|source| ClusterError::Status { id, source })?;
        self.status_clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, client.clone());
        Ok(client)
    }

    fn send_term(&self, id: u64) -> Result<(), ClusterError> {
        let mut nodes = self.lock_nodes();
        let node = nodes.get_mut(&id).ok_or(ClusterError::UnknownNode { id })?;
        node.reap();
        let paused = node.paused;
        let child = node.running()?;
        if paused {
            send_signal(id, child, Signal::Cont)?;
        }
        send_signal(id, child, Signal::Term)?;
        node.paused = false;
        Ok(())
    }

    async fn wait_exit(&self, id: u64, deadline: Instant) -> Result<ExitStatus, ClusterError> {
        let started = Instant::now();
        loop {
            {
                let mut nodes = self.lock_nodes();
                let node = nodes.get_mut(&id).ok_or(ClusterError::UnknownNode { id })?;
                node.reap();
                if node.process.is_none() {
                    return node.last_exit.ok_or(ClusterError::NotRunning { id });
                }
                if Instant::now() >= deadline {
                    node.kill_and_reap()?;
                    return Err(ClusterError::ShutdownTimeout {
                        id,
                        waited: started.elapsed(),
                    });
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn wait_ready(&self, id: u64, offset: u64, deadline: Instant) -> Result<(), ClusterError> {
        let started = Instant::now();
        let log_path = self.log_path(id)?;
        loop {
            {
                let mut nodes = self.lock_nodes();
                let node = nodes.get_mut(&id).ok_or(ClusterError::UnknownNode { id })?;
                node.reap();
                if node.process.is_none() {
                    return Err(match node.last_exit {
                        Some(status) => ClusterError::ExitedDuringStartup {
                            id,
                            status,
                            log_tail: log_tail(&log_path),
                            log: log_path,
                        },
                        None => ClusterError::NotRunning { id },
                    });
                }
            }
            if ready_line_seen(&log_path, offset, id)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // A node that never became ready must not linger half-started.
                let mut nodes = self.lock_nodes();
                if let Some(node) = nodes.get_mut(&id) {
                    // Already dead is fine here: the timeout is the error worth reporting.
                    let _ = node.kill_and_reap();
                }
                return Err(ClusterError::StartupTimeout {
                    id,
                    waited: started.elapsed(),
                    log_tail: log_tail(&log_path),
                    log: log_path,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let nodes = self.nodes.get_mut().unwrap_or_else(PoisonError::into_inner);
        for node in nodes.values_mut() {
            // Nothing useful can be done with an error while dropping; the process is either
            // already gone or beyond our reach.
            let _ = node.kill_and_reap();
        }
        if self.keep_data.load(Ordering::Relaxed) {
            if let Some(temp) = self.temp_dir.take() {
                let _kept: PathBuf = temp.keep();
            }
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn hosted_addresses(hosts: &dyn NodeHosts, id: u64) -> (SocketAddr, SocketAddr) {
    let ip = hosts.ip(id);
    (
        SocketAddr::new(ip, HOSTED_PORT),
        SocketAddr::new(ip, HOSTED_METRICS_PORT),
    )
}

fn node_spec(base_dir: &Path, id: u64, listen: SocketAddr, metrics: SocketAddr) -> Result<NodeSpec, ClusterError> {
    let data_dir = base_dir.join(format!("node-{id}"));
    if data_dir.exists() {
        return Err(ClusterError::DataDirExists { path: data_dir });
    }
    let args = vec![
        "--node-id".into(),
        id.to_string().into(),
        "--listen".into(),
        listen.to_string().into(),
        "--data-dir".into(),
        data_dir.clone().into_os_string(),
        "--metrics-listen".into(),
        metrics.to_string().into(),
    ];
    Ok(NodeSpec {
        id,
        listen,
        metrics,
        log_path: base_dir.join(format!("node-{id}.log")),
        data_dir,
        args,
    })
}

/// `count` distinct free loopback ports, none in `taken`. All listeners stay open until every
/// port is chosen, so the OS cannot hand out the same port twice; the small window between
/// closing them and `basaltd` binding is unavoidable without passing sockets to the child.
fn reserve_ports(count: usize, taken: &BTreeSet<u16>) -> io::Result<Vec<u16>> {
    let mut held = Vec::with_capacity(count);
    let mut ports = Vec::with_capacity(count);
    // A port in `taken` belongs to a stopped node of ours; skip it, but never loop forever.
    let mut attempts = 0;
    while ports.len() < count {
        attempts += 1;
        if attempts > count + 1000 {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "could not find enough free loopback ports",
            ));
        }
        let listener = TcpListener::bind(loopback(0))?;
        let port = listener.local_addr()?.port();
        if !taken.contains(&port) {
            ports.push(port);
        }
        held.push(listener);
    }
    Ok(ports)
}

/// Whether `line` is node `id`'s `basaltd ready node_id=N ...` line. Tolerates a prefix (a log
/// formatter, say) so that only the contract's words matter.
fn is_ready_line(line: &str, id: u64) -> bool {
    let Some(at) = line.find("basaltd ready") else {
        return false;
    };
    let expected = format!("node_id={id}");
    line[at..].split_whitespace().any(|token| token == expected)
}

/// Whether a complete ready line for `id` was written at or after `offset` of the log.
fn ready_line_seen(log_path: &Path, offset: u64, id: u64) -> Result<bool, ClusterError> {
    let mut file = File::open(log_path).map_err(io_error(format!("opening {}", log_path.display())))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(io_error(format!("seeking in {}", log_path.display())))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io_error(format!("reading {}", log_path.display())))?;
    // A line still being written is ignored until its newline arrives.
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(end) => &bytes[..end],
        None => return Ok(false),
    };
    Ok(String::from_utf8_lossy(complete)
        .lines()
        .any(|line| is_ready_line(line, id)))
}

/// The last lines of a log, for error messages; a read failure is described instead of raised
/// because it must not hide the error being reported.
fn log_tail(log_path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(log_path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => last_lines(&text, LOG_TAIL_LINES),
        Err(error) => format!("(could not read the log: {error})"),
    }
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_can_be_shared_between_tasks() {
        // A harness shares one cluster between its nemesis and its clients through an `Arc`.
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<LocalCluster>();
        assert_send_sync::<ClusterError>();
    }

    #[test]
    fn ready_line_must_name_the_node() {
        assert!(is_ready_line(
            "basaltd ready node_id=2 listen=127.0.0.1:5 metrics=127.0.0.1:6",
            2
        ));
        assert!(is_ready_line(
            "2025-01-01T00:00:00Z INFO basaltd ready node_id=12 listen=x",
            12
        ));
        assert!(!is_ready_line("basaltd ready node_id=12 listen=x", 1));
        assert!(!is_ready_line("basaltd ready node_id=1", 12));
        assert!(!is_ready_line("node_id=1 starting", 1));
    }

    #[test]
    fn ready_line_is_found_only_after_the_launch_offset_and_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node-1.log");
        let first = "basaltd ready node_id=1 listen=a metrics=b\n";
        fs::write(&log, first).unwrap();
        assert!(ready_line_seen(&log, 0, 1).unwrap());
        // A restart appends after the old ready line: it must not count.
        let offset = first.len() as u64;
        assert!(!ready_line_seen(&log, offset, 1).unwrap());
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(b"opening engine\nbasaltd ready node_id=1").unwrap();
        assert!(!ready_line_seen(&log, offset, 1).unwrap(), "line is incomplete");
        file.write_all(b" listen=a metrics=b\n").unwrap();
        assert!(ready_line_seen(&log, offset, 1).unwrap());
    }

    #[test]
    fn reserved_ports_are_distinct_and_avoid_taken_ones() {
        let first = reserve_ports(4, &BTreeSet::new()).unwrap();
        let taken: BTreeSet<u16> = first.iter().copied().collect();
        assert_eq!(taken.len(), 4);
        let second = reserve_ports(4, &taken).unwrap();
        assert!(second.iter().all(|port| !taken.contains(port)));
        assert_eq!(second.iter().collect::<BTreeSet<_>>().len(), 4);
    }

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a\n", 5), "a");
        assert_eq!(last_lines("", 5), "");
    }

    #[test]
    fn node_spec_refuses_an_existing_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("node-3")).unwrap();
        assert!(matches!(
            node_spec(dir.path(), 3, loopback(1000), loopback(1001)),
            Err(ClusterError::DataDirExists { .. })
        ));
        let spec = node_spec(dir.path(), 4, loopback(1000), loopback(1001)).unwrap();
        assert_eq!(spec.log_path, dir.path().join("node-4.log"));
        assert_eq!(spec.data_dir, dir.path().join("node-4"));
        assert_eq!(spec.listen.to_string(), "127.0.0.1:1000");
    }

    #[tokio::test]
    async fn start_rejects_bad_options_before_launching_anything() {
        let missing = LocalClusterOptions::new(3, "/nonexistent/basaltd");
        assert!(matches!(
            LocalCluster::start(missing).await,
            Err(ClusterError::BasaltdNotFound { .. })
        ));
        let empty = LocalClusterOptions::new(0, "/bin/sh");
        assert!(matches!(
            LocalCluster::start(empty).await,
            Err(ClusterError::InvalidOptions(_))
        ));
    }
}

/// Process management against a stand-in for `basaltd`: a shell script that follows the parts of
/// the command-line contract the launcher relies on (ready line, clean exit on SIGTERM).
#[cfg(test)]
mod process_tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::{RwLock, RwLockReadGuard};

    use super::*;

    const FAKE_BASALTD: &str = r#"#!/bin/sh
echo "args: $*"
while [ $# -gt 0 ]; do
  case "$1" in --node-id) id=$2; shift;; esac
  shift
done
if [ -n "$FAKE_BASALTD_FAIL" ]; then echo "cannot open data dir" >&2; exit 3; fi
trap 'kill $! 2>/dev/null; exit 0' TERM
echo "basaltd ready node_id=$id listen=x metrics=y"
while :; do sleep 1 & wait $!; done
"#;

    /// Writing an executable races with other tests forking: a child forked while the file is
    /// open for writing holds it until it execs, and exec of the script then fails with ETXTBSY.
    /// Scripts are written under the write lock; tests spawn only while holding a read lock.
    static SPAWN_LOCK: RwLock<()> = RwLock::new(());

    fn fake_basaltd(dir: &Path, script: &str) -> (PathBuf, RwLockReadGuard<'static, ()>) {
        let path = dir.join("basaltd");
        {
            let _writing = SPAWN_LOCK.write().unwrap_or_else(PoisonError::into_inner);
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let spawning = SPAWN_LOCK.read().unwrap_or_else(PoisonError::into_inner);
        (path, spawning)
    }

    /// The tests run their async part on a runtime of their own so that the spawn guard is
    /// held by plain synchronous code, never across an `.await`.
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds in tests")
            .block_on(future)
    }

    fn process_exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn lifecycle_of_a_three_node_cluster() {
        let bin_dir = tempfile::tempdir().unwrap();
        let (basaltd, _spawning) = fake_basaltd(bin_dir.path(), FAKE_BASALTD);
        block_on(async move {
            let mut options = LocalClusterOptions::new(3, &basaltd);
            options.snapshot_threshold = Some(500);
            options.extra_args = vec!["--log-level".into(), "debug".into()];
            let cluster = LocalCluster::start(options).await.unwrap();
            let base = cluster.base_dir().to_path_buf();

            assert_eq!(cluster.node_ids(), vec![1, 2, 3]);
            let endpoints = cluster.endpoints();
            assert_eq!(endpoints.len(), 3);
            assert_eq!(endpoints.iter().collect::<BTreeSet<_>>().len(), 3);
            assert_eq!(cluster.endpoint(2).unwrap(), endpoints[1]);
            assert!(matches!(cluster.endpoint(9), Err(ClusterError::UnknownNode { id: 9 })));
            let log = fs::read_to_string(cluster.log_path(1).unwrap()).unwrap();
            let initial_cluster = format!("1={},2={},3={}", endpoints[0], endpoints[1], endpoints[2]);
            assert!(log.contains(&format!("--initial-cluster {initial_cluster}")), "{log}");
            assert!(log.contains("--snapshot-threshold 500 --log-level debug"), "{log}");
            assert!(log.contains(&format!("--metrics-listen {}", cluster.metrics_addr(1).unwrap())));

            cluster.pause(2).unwrap();
            assert!(cluster.is_paused(2) && cluster.is_running(2));
            cluster.resume(2).unwrap();
            assert!(!cluster.is_paused(2));

            // SIGTERM reaches a paused node too.
            cluster.pause(1).unwrap();
            let status = cluster.terminate(1).await.unwrap();
            assert!(status.success(), "{status}");
            assert!(!cluster.is_running(1));
            assert!(matches!(
                cluster.terminate(1).await,
                Err(ClusterError::NotRunning { id: 1 })
            ));

            cluster.restart(1).await.unwrap();
            assert!(cluster.is_running(1));
            assert!(matches!(
                cluster.restart(1).await,
                Err(ClusterError::AlreadyRunning { id: 1 })
            ));
            let log = fs::read_to_string(cluster.log_path(1).unwrap()).unwrap();
            assert_eq!(log.matches("basaltd ready node_id=1").count(), 2);

            let pid3 = cluster.pid(3).unwrap();
            cluster.kill(3).unwrap();
            assert!(!cluster.is_running(3));
            assert_eq!(
                cluster.last_exit_status(3).and_then(|s| s.signal()),
                Some(libc::SIGKILL)
            );
            assert!(matches!(cluster.pause(3), Err(ClusterError::NotRunning { id: 3 })));

            let joined = cluster.start_joining_node(4).await.unwrap();
            assert!(!endpoints.contains(&joined));
            let log = fs::read_to_string(cluster.log_path(4).unwrap()).unwrap();
            assert!(log.contains("--join --snapshot-threshold 500"), "{log}");
            assert!(!log.contains("--initial-cluster"), "{log}");
            assert!(matches!(
                cluster.start_joining_node(4).await,
                Err(ClusterError::DuplicateNode { id: 4 })
            ));
            assert_eq!(cluster.endpoints().len(), 4);

            let pids: Vec<u32> = [1, 2, 4].iter().map(|id| cluster.pid(*id).unwrap()).collect();
            assert!(!process_exists(pid3));
            drop(cluster);
            for pid in pids {
                assert!(!process_exists(pid), "pid {pid} outlived the cluster");
            }
            assert!(!base.exists(), "temporary base dir must be removed");
        });
    }

    #[test]
    fn terminate_all_reports_every_exit_and_kept_dirs_survive() {
        let bin_dir = tempfile::tempdir().unwrap();
        let (basaltd, _spawning) = fake_basaltd(bin_dir.path(), FAKE_BASALTD);
        block_on(async move {
            let base = bin_dir.path().join("cluster");
            let mut options = LocalClusterOptions::new(2, &basaltd);
            options.base_dir = Some(base.clone());
            let cluster = LocalCluster::start(options).await.unwrap();
            cluster.kill(2).unwrap();
            let statuses = cluster.terminate_all().await.unwrap();
            assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), vec![1]);
            assert!(statuses[&1].success());
            drop(cluster);
            assert!(base.join("node-1.log").is_file());

            // The same base directory now holds node logs; a second cluster there is refused only
            // if a data directory exists, which the fake never creates, so create one.
            fs::create_dir(base.join("node-1")).unwrap();
            let mut options = LocalClusterOptions::new(2, &basaltd);
            options.base_dir = Some(base);
            assert!(matches!(
                LocalCluster::start(options).await,
                Err(ClusterError::DataDirExists { .. })
            ));
        });
    }

    #[test]
    fn a_node_exiting_during_start_up_is_reported_with_its_log() {
        let bin_dir = tempfile::tempdir().unwrap();
        let failing = FAKE_BASALTD.replace("$FAKE_BASALTD_FAIL", "always");
        let (basaltd, _spawning) = fake_basaltd(bin_dir.path(), &failing);
        block_on(async move {
            let error = LocalCluster::start(LocalClusterOptions::new(1, &basaltd))
                .await
                .unwrap_err();
            match error {
                ClusterError::ExitedDuringStartup {
                    id, status, log_tail, ..
                } => {
                    assert_eq!(id, 1);
                    assert_eq!(status.code(), Some(3));
                    assert!(log_tail.contains("cannot open data dir"), "{log_tail}");
                }
                other => panic!("unexpected error: {other}"),
            }
        });
    }
}
