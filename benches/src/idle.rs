//! `basalt-bench idle-groups`: what idle replica groups cost a node.
//!
//! Starts a local cluster of real `basaltd` processes, creates a hash keyspace with `--groups`
//! shards (3 replicas each, so on 3 nodes every node holds every shard), waits until every node
//! knows a leader for every shard, lets the cluster settle, and then measures each node over an
//! idle window: resident memory, CPU time, and peer traffic.
//!
//! Invariants, and why:
//! - **Nothing but the cluster's own background work runs in the window.** No client request is
//!   sent after the settle period starts; the scrapes at the window's edges are the only requests,
//!   and they do not touch any group. So the figures are the cost of the groups being there.
//! - **CPU is read from the kernel, per process**: `utime + stime` from `/proc/PID/stat` at both
//!   edges, as a percentage of one core. Memory is `VmRSS` from `/proc/PID/status` at the end.
//! - **Traffic comes from the nodes' own counters** (`basalt_peer_rpcs_sent_total`,
//!   `basalt_peer_bytes_{sent,received}_total`, by kind) as deltas over the window. A node whose
//!   counters cannot be read fails the run rather than printing a partial figure.
//! - The local groups counted per node are the node's replicas of every group, the meta group
//!   and the default keyspace's shard included (read from `basalt_raft_hibernation_groups`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use basalt_client::cli::duration::{parse_duration, parse_duration_or_zero};
use basalt_client::{Client, ClientConfig, ClientError, Sharding};
use clap::Args;
use serde::Serialize;

use crate::local_cluster::{basaltd_path, ClusterError, LocalCluster, LocalClusterOptions};
use crate::metrics_scrape::{fetch_metrics, parse_metric, parse_metric_labeled, ScrapeError};
use crate::report::{format_duration, group_thousands};

/// The keyspace the idle groups belong to.
pub const IDLE_KEYSPACE: &str = "idle";
const RPCS_SENT: &str = "basalt_peer_rpcs_sent_total";
const BYTES_SENT: &str = "basalt_peer_bytes_sent_total";
const BYTES_RECEIVED: &str = "basalt_peer_bytes_received_total";
const HIBERNATION: &str = "basalt_raft_hibernation_groups";
const LEADER_POLL: Duration = Duration::from_millis(500);

/// Measure the cost of idle replica groups on a local cluster.
#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    /// Shards of the hash keyspace to create (each a replica group on `min(3, nodes)` nodes);
    /// 0 measures the cluster with only its meta group and default keyspace.
    #[arg(long)]
    pub groups: u32,
    /// Length of the idle measurement window.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub window: Duration,
    /// Idle time between "every shard has a leader" and the window, for the cluster to reach
    /// its steady state (for hibernation: long enough for idle groups to go to sleep).
    #[arg(long, default_value = "10s", value_parser = parse_duration_or_zero)]
    pub settle: Duration,
    /// Nodes in the local cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Pass `--hibernate-idle-groups BOOL` to every node (default: the server's default).
    #[arg(long, value_name = "BOOL")]
    pub hibernate: Option<bool>,
    /// How long the shards may take to elect their leaders.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub leader_timeout: Duration,
    /// The basaltd binary (default: $BASALTD, else next to this program).
    #[arg(long)]
    pub basaltd: Option<PathBuf>,
    /// Keep the cluster's data and logs in this (new) directory instead of a temporary one.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(thiserror::Error, Debug)]
pub enum IdleError {
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    #[error("local cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("client: {0}")]
    Client(#[from] ClientError),
    #[error("the shards did not all elect a leader within {waited:?}: {last}")]
    NoLeaders { waited: Duration, last: String },
    #[error("node {id}: {source}")]
    Scrape {
        id: u64,
        #[source]
        source: ScrapeError,
    },
    #[error("node {id}: metric {metric} missing")]
    MissingMetric { id: u64, metric: String },
    #[error("node {id} (pid {pid}): reading /proc: {reason}")]
    Proc { id: u64, pid: u32, reason: String },
    #[error("node {id} is not running")]
    NotRunning { id: u64 },
}

/// Peer traffic counters of one node at one instant, by kind and in total.
#[derive(Clone, Debug, Default, PartialEq)]
struct Traffic {
    rpcs_sent: f64,
    bytes_sent: f64,
    bytes_received: f64,
    by_kind: BTreeMap<String, f64>,
}

/// The kinds whose RPCs/s the report breaks out.
const KINDS: [&str; 3] = ["heartbeat", "append", "liveness"];

impl Traffic {
    fn from_exposition(text: &str) -> Result<Self, String> {
        let read = |name: &str| parse_metric(text, name).ok_or_else(|| name.to_string());
        let mut by_kind = BTreeMap::new();
        for kind in KINDS {
            by_kind.insert(
                kind.to_string(),
                parse_metric_labeled(text, RPCS_SENT, "kind", kind).unwrap_or(0.0),
            );
        }
        Ok(Traffic {
            rpcs_sent: read(RPCS_SENT)?,
            bytes_sent: read(BYTES_SENT)?,
            bytes_received: read(BYTES_RECEIVED)?,
            by_kind,
        })
    }
}

/// The replicas of one node by hibernation state.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GroupStates {
    pub total: u64,
    /// Leaders and followers that stopped ticking.
    pub sleeping: u64,
    pub by_state: BTreeMap<String, u64>,
}

impl GroupStates {
    fn from_exposition(text: &str) -> Option<Self> {
        let mut by_state = BTreeMap::new();
        for state in ["awake", "quiescing", "quiesced", "asleep", "dormant"] {
            let n = parse_metric_labeled(text, HIBERNATION, "state", state)?;
            by_state.insert(state.to_string(), n as u64);
        }
        Some(GroupStates {
            total: by_state.values().sum(),
            sleeping: by_state["quiesced"] + by_state["asleep"],
            by_state,
        })
    }
}

/// What one node cost over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeCost {
    pub node: u64,
    /// Replicas the node holds (every group it is a member of).
    pub groups: GroupStates,
    pub rss_mib: f64,
    /// CPU time over the window as a percentage of one core.
    pub cpu_percent: f64,
    /// Peer RPCs this node sent per second, all kinds.
    pub rpcs_per_sec: f64,
    /// Of those, per kind (heartbeat, append, liveness).
    pub rpcs_per_sec_by_kind: BTreeMap<String, f64>,
    /// Peer message bytes per second this node sent (requests and replies).
    pub bytes_sent_per_sec: f64,
    pub bytes_received_per_sec: f64,
}

/// The result of an idle-groups run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IdleReport {
    pub groups_created: u32,
    pub hibernate: Option<bool>,
    pub nodes: Vec<NodeCost>,
    /// From creating the keyspace to every node knowing every shard's leader.
    pub leaders_after_secs: f64,
    pub settle_secs: f64,
    pub window_secs: f64,
}

impl IdleReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("IdleReport holds only strings, numbers and maps, which serialise")
    }

    pub fn render_text(&self) -> String {
        let mode = match self.hibernate {
            Some(true) => "hibernation on",
            Some(false) => "hibernation off",
            None => "server default hibernation",
        };
        let mut out = format!(
            "basalt-bench idle-groups: {} shards, {} nodes, {mode}\n\
             every shard led after {}; settled {}; measured {} idle\n\n",
            group_thousands(u64::from(self.groups_created)),
            self.nodes.len(),
            format_duration(Duration::from_secs_f64(self.leaders_after_secs)),
            format_duration(Duration::from_secs_f64(self.settle_secs)),
            format_duration(Duration::from_secs_f64(self.window_secs)),
        );
        out += "  node  groups  sleeping  RSS MiB   CPU %   RPCs/s  heartbeat/s  liveness/s  KB/s out  KB/s in\n";
        for n in &self.nodes {
            let kind = |k: &str| n.rpcs_per_sec_by_kind.get(k).copied().unwrap_or(0.0);
            out += &format!(
                "  {:>4}  {:>6}  {:>8}  {:>7.1}  {:>6.1}  {:>7.0}  {:>11.0}  {:>10.1}  {:>8.1}  {:>7.1}\n",
                n.node,
                n.groups.total,
                n.groups.sleeping,
                n.rss_mib,
                n.cpu_percent,
                n.rpcs_per_sec,
                kind("heartbeat"),
                kind("liveness"),
                n.bytes_sent_per_sec / 1024.0,
                n.bytes_received_per_sec / 1024.0,
            );
        }
        out
    }
}

/// Process CPU time and resident memory, read from `/proc`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kib: u64,
}

fn read_proc(id: u64, pid: u32) -> Result<ProcSample, IdleError> {
    let fail = |reason: String| IdleError::Proc { id, pid, reason };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| fail(e.to_string()))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| fail(e.to_string()))?;
    Ok(ProcSample {
        cpu_ticks: parse_cpu_ticks(&stat).ok_or_else(|| fail("malformed stat".into()))?,
        rss_kib: parse_rss_kib(&status).ok_or_else(|| fail("no VmRSS in status".into()))?,
    })
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2) is
/// in parentheses and may itself hold spaces or parentheses, so fields are counted after the last
/// `)`: the first field there is the 3rd.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name, handled below.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Waits until the catalog records the default keyspace. The meta leader records it shortly
/// after bootstrap; a keyspace created before that would take the default keyspace's id, so
/// anything that creates a keyspace on a fresh cluster waits for this first.
pub async fn wait_for_default_keyspace(admin: &Client, timeout: Duration) -> Result<(), IdleError> {
    let started = Instant::now();
    loop {
        let last = match admin.list_shards(Some(basalt_client::DEFAULT_KEYSPACE), false).await {
            Ok(shards) if !shards.is_empty() => return Ok(()),
            Ok(_) => "no shard listed yet".to_string(),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > timeout {
            return Err(IdleError::NoLeaders { waited: timeout, last });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node reports a leader for every shard of every keyspace, all nodes naming
/// the same one, and returns how long that took.
pub async fn wait_for_all_shard_leaders(
    cluster: &LocalCluster,
    expected_shards: usize,
    timeout: Duration,
) -> Result<Duration, IdleError> {
    let started = Instant::now();
    let mut clients = BTreeMap::new();
    for id in cluster.node_ids() {
        let mut cfg = ClientConfig::new([cluster.endpoint(id)?]);
        cfg.deadline = Duration::from_secs(30);
        clients.insert(id, Client::connect(cfg).await?);
    }
    loop {
        let mut views: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
        let mut last = String::new();
        for (id, c) in &clients {
            match c.list_shards(None, false).await {
                Ok(shards) => {
                    views.insert(*id, shards.iter().map(|s| (s.id, s.leader_id)).collect());
                }
                Err(e) => last = format!("node {id}: {e}"),
            }
        }
        if views.len() == clients.len() {
            let first = views.values().next().cloned().unwrap_or_default();
            let led = first.values().filter(|l| **l != 0).count();
            let agreed = views.values().all(|v| *v == first);
            if first.len() >= expected_shards && led == first.len() && agreed {
                return Ok(started.elapsed());
            }
            last = format!("{led} of {} shards led; nodes agree: {agreed}", first.len());
        }
        if started.elapsed() > timeout {
            return Err(IdleError::NoLeaders { waited: timeout, last });
        }
        tokio::time::sleep(LEADER_POLL).await;
    }
}

struct NodeSample {
    proc: ProcSample,
    traffic: Traffic,
    groups: Option<GroupStates>,
}

async fn sample(cluster: &LocalCluster, id: u64) -> Result<NodeSample, IdleError> {
    let pid = cluster.pid(id).ok_or(IdleError::NotRunning { id })?;
    let addr = cluster.metrics_addr(id)?;
    let text = fetch_metrics(addr)
        .await
        .map_err(|source| IdleError::Scrape { id, source })?;
    let proc = read_proc(id, pid)?;
    let traffic = Traffic::from_exposition(&text).map_err(|metric| IdleError::MissingMetric { id, metric })?;
    Ok(NodeSample {
        proc,
        traffic,
        groups: GroupStates::from_exposition(&text),
    })
}

/// Runs the measurement described by `args`.
pub async fn run(args: IdleArgs) -> Result<IdleReport, IdleError> {
    if args.nodes == 0 {
        return Err(IdleError::InvalidArgs("--nodes must be at least 1".into()));
    }
    if args.groups > 1024 {
        return Err(IdleError::InvalidArgs("--groups is at most 1024 (one keyspace)".into()));
    }
    let basaltd = match &args.basaltd {
        Some(p) => p.clone(),
        None => basaltd_path()?,
    };
    let mut options = LocalClusterOptions::new(args.nodes, basaltd);
    options.base_dir = args.data_dir.clone();
    if let Some(h) = args.hibernate {
        options.extra_args = vec!["--hibernate-idle-groups".into(), h.to_string()];
    }
    eprintln!("starting a local cluster of {} basaltd nodes...", args.nodes);
    let cluster = LocalCluster::start(options).await?;
    eprintln!("  data and logs in {}", cluster.base_dir().display());
    cluster.wait_for_leader(Duration::from_secs(60)).await?;

    let mut cfg = cluster.client_config();
    cfg.deadline = Duration::from_secs(120);
    let admin = Client::connect(cfg).await?;
    wait_for_default_keyspace(&admin, Duration::from_secs(60)).await?;
    let created = Instant::now();
    if args.groups > 0 {
        eprintln!(
            "creating keyspace {IDLE_KEYSPACE:?} with {} hash shards...",
            args.groups
        );
        let replicas = args.nodes.min(3) as u32;
        admin
            .create_keyspace(IDLE_KEYSPACE, Sharding::Hash, args.groups, replicas)
            .await?;
    }
    // Every shard of the new keyspace, plus the default keyspace's one.
    let expected = args.groups as usize + 1;
    eprintln!("waiting for every shard to elect a leader...");
    wait_for_all_shard_leaders(&cluster, expected, args.leader_timeout).await?;
    let leaders_after = created.elapsed();
    eprintln!(
        "  every shard led after {}; settling for {}...",
        format_duration(leaders_after),
        format_duration(args.settle)
    );
    drop(admin);
    tokio::time::sleep(args.settle).await;

    let ids = cluster.node_ids();
    let mut before = BTreeMap::new();
    for &id in &ids {
        before.insert(id, sample(&cluster, id).await?);
    }
    let window_start = Instant::now();
    eprintln!("measuring {} of idleness...", format_duration(args.window));
    tokio::time::sleep(args.window).await;
    let mut after = BTreeMap::new();
    for &id in &ids {
        after.insert(id, sample(&cluster, id).await?);
    }
    let window = window_start.elapsed().as_secs_f64();

    let hz = clock_ticks_per_sec();
    let nodes = ids
        .iter()
        .map(|id| {
            let (b, a) = (&before[id], &after[id]);
            let per_sec = |x: f64, y: f64| (y - x).max(0.0) / window;
            NodeCost {
                node: *id,
                groups: a.groups.clone().unwrap_or_default(),
                rss_mib: a.proc.rss_kib as f64 / 1024.0,
                cpu_percent: (a.proc.cpu_ticks.saturating_sub(b.proc.cpu_ticks)) as f64 / hz / window * 100.0,
                rpcs_per_sec: per_sec(b.traffic.rpcs_sent, a.traffic.rpcs_sent),
                rpcs_per_sec_by_kind: KINDS
                    .iter()
                    .map(|k| {
                        let get = |t: &Traffic| t.by_kind.get(*k).copied().unwrap_or(0.0);
                        (k.to_string(), per_sec(get(&b.traffic), get(&a.traffic)))
                    })
                    .collect(),
                bytes_sent_per_sec: per_sec(b.traffic.bytes_sent, a.traffic.bytes_sent),
                bytes_received_per_sec: per_sec(b.traffic.bytes_received, a.traffic.bytes_received),
            }
        })
        .collect();

    if let Err(e) = cluster.terminate_all().await {
        eprintln!("warning: stopping the local cluster: {e}");
    }
    Ok(IdleReport {
        groups_created: args.groups,
        hibernate: args.hibernate,
        nodes,
        leaders_after_secs: leaders_after.as_secs_f64(),
        settle_secs: args.settle.as_secs_f64(),
        window_secs: window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let stat = "4242 (basal) d) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn rss_is_read_from_vmrss() {
        let status = "Name:\tbasaltd\nVmPeak:\t  999 kB\nVmRSS:\t   51234 kB\nThreads:\t9\n";
        assert_eq!(parse_rss_kib(status), Some(51234));
        assert_eq!(parse_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn traffic_and_group_states_come_from_the_exposition() {
        let text = "basalt_peer_rpcs_sent_total{kind=\"heartbeat\"} 40\n\
                    basalt_peer_rpcs_sent_total{kind=\"liveness\"} 2\n\
                    basalt_peer_rpcs_sent_total{kind=\"vote\"} 1\n\
                    basalt_peer_bytes_sent_total{kind=\"heartbeat\"} 4000\n\
                    basalt_peer_bytes_received_total{kind=\"heartbeat\"} 3000\n\
                    basalt_raft_hibernation_groups{state=\"awake\"} 2\n\
                    basalt_raft_hibernation_groups{state=\"quiescing\"} 0\n\
                    basalt_raft_hibernation_groups{state=\"quiesced\"} 5\n\
                    basalt_raft_hibernation_groups{state=\"asleep\"} 10\n\
                    basalt_raft_hibernation_groups{state=\"dormant\"} 1\n";
        let t = Traffic::from_exposition(text).unwrap();
        assert_eq!(t.rpcs_sent, 43.0);
        assert_eq!(t.by_kind["heartbeat"], 40.0);
        assert_eq!(t.by_kind["append"], 0.0);
        assert_eq!(t.bytes_sent, 4000.0);
        let g = GroupStates::from_exposition(text).unwrap();
        assert_eq!((g.total, g.sleeping), (18, 15));
        assert!(Traffic::from_exposition("x 1\n").is_err());
        assert!(GroupStates::from_exposition("x 1\n").is_none());
    }
}
