//! basaltd's configuration: command-line flags, an optional TOML file, and the defaults.
//!
//! Precedence is flag > file > default, resolved once at start into a [`NodeConfig`] that the rest
//! of the node trusts without re-checking. With no flags at all the node is a single-node cluster
//! on `127.0.0.1:7379` with data in `./basalt-data`, like `etcd` with no arguments.
//!
//! `--initial-cluster` only matters the first time a data directory is used: a node whose data
//! directory already holds Raft state resumes from it and never bootstraps again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_consensus::raft::hibernation::HibernationConfig;
use basalt_consensus::raft::DEFAULT_MAX_CLOCK_DRIFT;
use clap::Parser;
use serde::Deserialize;

use crate::driver::PlacementConfig;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7379";
pub const DEFAULT_DATA_DIR: &str = "./basalt-data";
/// The metrics port defaults to the gRPC port plus this, so several nodes started by hand on one
/// machine (7401, 7402, …) get distinct metrics ports (8401, 8402, …) without more flags.
pub const METRICS_PORT_OFFSET: u16 = 1000;
/// openraft logs every vote and state change at `info`; those belong at debug for operators, who
/// still see its warnings (unreachable peers, failed replication).
pub const DEFAULT_LOG_LEVEL: &str = "info,openraft=warn";
/// Raft timing defaults; why these values is explained on `RaftGroupConfig`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);
pub const DEFAULT_ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(300);
pub const DEFAULT_ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(600);
/// Idle-group hibernation timing; why these values is explained on `NodeConfig`.
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HIBERNATE_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    ParseFile { path: PathBuf, source: toml::de::Error },
    #[error("invalid --initial-cluster entry {entry:?}: {reason}")]
    InitialCluster { entry: String, reason: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Command-line flags. Every setting is optional here so that the file and defaults can fill in.
#[derive(Debug, Default, Parser)]
#[command(
    name = "basaltd",
    version,
    about = "Basalt node: a replicated, strongly consistent key-value store"
)]
pub struct Flags {
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Address for clients and peers (gRPC), host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Directory for this node's data; created if missing.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The founding members, `ID=HOST:PORT,...`. Used only when the data directory is new.
    #[arg(long, value_name = "ID=ADDR,...")]
    pub initial_cluster: Option<String>,
    /// Start without bootstrapping and wait to be added with `basaltctl member add`.
    #[arg(long)]
    pub join: bool,
    /// Address of the Prometheus metrics endpoint (`/metrics`); default: gRPC port + 1000.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Log entries between snapshots (and log compactions).
    #[arg(long)]
    pub snapshot_threshold: Option<u64>,
    /// Log filter, e.g. `info` or `basalt_server=debug` (RUST_LOG also works).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Split a shard when its data grows past this many bytes (0: never split by size).
    #[arg(long, value_name = "BYTES")]
    pub split_size: Option<u64>,
    /// Split a shard when it serves more than this many requests per second (0: never).
    #[arg(long, value_name = "REQUESTS_PER_SEC")]
    pub split_load: Option<u64>,
    /// Merge two adjacent shards of a range keyspace when together they hold fewer bytes than
    /// this (0: never merge automatically; default a quarter of the split size, and at most
    /// half of it).
    #[arg(long, value_name = "BYTES")]
    pub merge_size: Option<u64>,
    /// Seconds a pair of shards must stay small and cool before it is merged (default 60).
    #[arg(long, value_name = "SECS")]
    pub merge_delay: Option<u64>,
    /// Seconds without a report after which a node counts as dead and its replicas are re-created
    /// elsewhere.
    #[arg(long, value_name = "SECS")]
    pub dead_node_timeout: Option<u64>,
    /// Do not move replicas and leaders to even out the nodes (re-replication still happens).
    #[arg(long)]
    pub no_rebalance: bool,
    /// Let idle replica groups stop ticking and heartbeating (default true); see
    /// `NodeConfig::hibernate_idle_groups`.
    #[arg(long, value_name = "BOOL")]
    pub hibernate_idle_groups: Option<bool>,
    /// The most two nodes' wall clocks may differ, in milliseconds (default 100); see
    /// `NodeConfig::max_clock_drift`. Every node of a cluster must use the same value.
    #[arg(long, value_name = "MS")]
    pub max_clock_drift: Option<u64>,
    /// Which backend frames replication traffic: `auto` (a GPU for large batches when one is
    /// usable, the CPU otherwise), `cpu`, or `gpu` (refuses to start without a usable GPU).
    #[arg(long, value_name = "auto|cpu|gpu")]
    pub codec_backend: Option<String>,
}

/// The same settings as a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<u64>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Either the flag's string form or a table `{ 1 = "127.0.0.1:7401", ... }`.
    pub initial_cluster: Option<InitialClusterSpec>,
    pub join: Option<bool>,
    pub metrics_listen: Option<String>,
    pub snapshot_threshold: Option<u64>,
    pub log_level: Option<String>,
    pub split_size: Option<u64>,
    pub split_load: Option<u64>,
    pub merge_size: Option<u64>,
    pub merge_delay: Option<u64>,
    pub dead_node_timeout: Option<u64>,
    pub rebalance: Option<bool>,
    pub hibernate_idle_groups: Option<bool>,
    pub max_clock_drift: Option<u64>,
    pub codec_backend: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InitialClusterSpec {
    Text(String),
    Table(BTreeMap<String, String>),
}

/// The resolved configuration the node runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_id: u64,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Founding members by id; empty when joining an existing cluster.
    pub initial_cluster: BTreeMap<u64, String>,
    pub join: bool,
    pub metrics_listen: SocketAddr,
    pub snapshot_threshold: u64,
    pub log_level: String,
    pub request_timeout: Duration,
    /// Raft timing (see `RaftGroupConfig`): not yet flags, since the defaults suit a LAN; the
    /// simulator varies them per node to model clocks that run at different rates.
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// The placement driver's knobs (used while this node leads the meta group).
    pub placement: PlacementConfig,
    /// Idle-group hibernation (`basalt_consensus::raft::hibernation`), on by default. A group
    /// with no client activity for `hibernate_after`, fully replicated and committed, stops
    /// ticking on every replica: no heartbeats, no timers. One liveness exchange per node pair
    /// every `liveness_interval` replaces the heartbeats of all sleeping groups; a follower
    /// whose leader's node stays silent for `liveness_timeout` wakes and elects a new leader
    /// (so a sleeping group's failover takes about `liveness_timeout` plus an election, where an
    /// awake group's takes one to two election timeouts), and any request wakes a group.
    ///
    /// Safe to leave on: only openraft's tick (elections and heartbeats) is switched, never
    /// replication, voting or the ReadIndex round, so linearizability and durability do not
    /// depend on it. Turn it off to trade the idle cost (about 100 timer wake-ups and 20
    /// heartbeats per second per group) for the faster failover of awake groups. Mixed settings
    /// in one cluster are safe: a node that does not hibernate refuses to sleep, and its groups'
    /// leaders keep heartbeating it.
    pub hibernate_idle_groups: bool,
    /// Timing of hibernation: not flags, since the defaults suit a LAN (5 exchanges per timeout,
    /// so one lost exchange wakes nothing); the simulator scales them with its clocks.
    pub liveness_interval: Duration,
    pub liveness_timeout: Duration,
    pub hibernate_after: Duration,
    /// The bound on clock differences that read modes rely on (docs/read-modes.md): lease reads
    /// use the lease minus this (so timers that drift apart by less than it over one lease keep
    /// them safe), and every staleness bound a bounded-staleness or stale read reports includes
    /// it (so a wall-clock offset under it never makes an answer older than reported). If real
    /// clocks differ by more, lease reads may be stale and staleness bounds understated; nothing
    /// else depends on it. Must be below half the minimum election timeout.
    pub max_clock_drift: Duration,
    /// Which backend the replication codec uses (`consensus::raft::frames`).
    pub codec_backend: basalt_gpu::BackendChoice,
}

/// Parses `--codec-backend`.
fn parse_codec_backend(s: &str) -> Result<basalt_gpu::BackendChoice, ConfigError> {
    match s {
        "auto" => Ok(basalt_gpu::BackendChoice::Auto),
        "cpu" => Ok(basalt_gpu::BackendChoice::Cpu),
        "gpu" => Ok(basalt_gpu::BackendChoice::Gpu),
        other => Err(ConfigError::Invalid {
            field: "codec-backend",
            reason: format!("{other:?} is not one of auto, cpu, gpu"),
        }),
    }
}

impl NodeConfig {
    /// The hibernation settings groups run with, or `None` when it is off.
    pub fn hibernation(&self) -> Option<HibernationConfig> {
        self.hibernate_idle_groups.then(|| HibernationConfig {
            liveness_interval: self.liveness_interval,
            liveness_timeout: self.liveness_timeout,
            idle_after: self.hibernate_after,
            wake_jitter: self.election_timeout_max.saturating_sub(self.election_timeout_min),
        })
    }
}

pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let err = |reason: &str| ConfigError::InitialCluster {
            entry: entry.to_string(),
            reason: reason.to_string(),
        };
        let (id, addr) = entry.split_once('=').ok_or_else(|| err("expected ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().map_err(|_| err("the id is not a positive integer"))?;
        if id == 0 {
            return Err(err("node ids start at 1"));
        }
        let addr = addr.trim();
        parse_addr("initial-cluster address", addr).map_err(|_| err("the address is not HOST:PORT"))?;
        if out.insert(id, addr.to_string()).is_some() {
            return Err(err("the id appears twice"));
        }
    }
    if out.is_empty() {
        return Err(ConfigError::InitialCluster {
            entry: s.to_string(),
            reason: "no members".into(),
        });
    }
    Ok(out)
}

fn parse_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConfigError::Invalid {
            field,
            reason: format!("{s:?} is not a HOST:PORT address"),
        })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_path_buf(),
        source,
    })
}

impl NodeConfig {
    /// Resolves flags, the file they name (if any) and defaults.
    pub fn resolve(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let node_id = flags.node_id.or(file.node_id).unwrap_or(1);
        if node_id == 0 {
            return Err(ConfigError::Invalid {
                field: "node-id",
                reason: "node ids start at 1".into(),
            });
        }
        let listen_text = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = parse_addr("listen", &listen_text)?;
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let join = flags.join || file.join.unwrap_or(false);
        let initial_cluster = match (flags.initial_cluster, file.initial_cluster) {
            (Some(s), _) | (None, Some(InitialClusterSpec::Text(s))) => parse_initial_cluster(&s)?,
            (None, Some(InitialClusterSpec::Table(t))) => {
                let text = t.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                parse_initial_cluster(&text)?
            }
            (None, None) if join => BTreeMap::new(),
            // Alone: a single-node cluster of this node.
            (None, None) => BTreeMap::from([(node_id, listen_text.clone())]),
        };
        if join && !initial_cluster.is_empty() {
            return Err(ConfigError::Invalid {
                field: "join",
                reason: "--join and --initial-cluster exclude each other".into(),
            });
        }
        if !join && !initial_cluster.contains_key(&node_id) {
            return Err(ConfigError::Invalid {
                field: "initial-cluster",
                reason: format!("it does not include this node (id {node_id}); use --join to join an existing cluster"),
            });
        }
        let metrics_listen = match flags.metrics_listen.or(file.metrics_listen) {
            Some(s) => parse_addr("metrics-listen", &s)?,
            None => {
                let port = match listen.port() {
                    0 => 0,
                    p => p.checked_add(METRICS_PORT_OFFSET).ok_or_else(|| ConfigError::Invalid {
                        field: "metrics-listen",
                        reason: format!("no default for gRPC port {p}; set --metrics-listen"),
                    })?,
                };
                SocketAddr::new(listen.ip(), port)
            }
        };
        let snapshot_threshold = flags.snapshot_threshold.or(file.snapshot_threshold).unwrap_or(10_000);
        if snapshot_threshold == 0 {
            return Err(ConfigError::Invalid {
                field: "snapshot-threshold",
                reason: "must be at least 1".into(),
            });
        }
        let defaults = PlacementConfig::default();
        let dead_secs = flags
            .dead_node_timeout
            .or(file.dead_node_timeout)
            .unwrap_or(defaults.dead_after.as_secs());
        if dead_secs == 0 {
            return Err(ConfigError::Invalid {
                field: "dead-node-timeout",
                reason: "must be at least 1 second".into(),
            });
        }
        let split_bytes = flags.split_size.or(file.split_size).unwrap_or(defaults.split_bytes);
        let merge_bytes = flags.merge_size.or(file.merge_size).unwrap_or(split_bytes / 4);
        if merge_bytes > 0 && (split_bytes == 0 || merge_bytes > split_bytes / 2) {
            return Err(ConfigError::Invalid {
                field: "merge-size",
                reason: format!(
                    "{merge_bytes} bytes is more than half the split size ({split_bytes}): merged shards \
                     would be split again"
                ),
            });
        }
        let merge_delay = Duration::from_secs(
            flags
                .merge_delay
                .or(file.merge_delay)
                .unwrap_or(defaults.merge_delay.as_secs()),
        );
        let max_clock_drift = Duration::from_millis(
            flags
                .max_clock_drift
                .or(file.max_clock_drift)
                .unwrap_or(DEFAULT_MAX_CLOCK_DRIFT.as_millis() as u64),
        );
        if max_clock_drift >= DEFAULT_ELECTION_TIMEOUT_MIN / 2 {
            return Err(ConfigError::Invalid {
                field: "max-clock-drift",
                reason: format!(
                    "{} ms leaves lease reads no lease: it must be under {} ms (half the minimum election \
                     timeout)",
                    max_clock_drift.as_millis(),
                    (DEFAULT_ELECTION_TIMEOUT_MIN / 2).as_millis()
                ),
            });
        }
        let codec_backend = match flags.codec_backend.or(file.codec_backend) {
            Some(s) => parse_codec_backend(&s)?,
            None => basalt_gpu::BackendChoice::Auto,
        };
        let placement = PlacementConfig {
            split_bytes,
            split_qps: flags.split_load.or(file.split_load).unwrap_or(defaults.split_qps),
            merge_bytes,
            merge_delay,
            dead_after: Duration::from_secs(dead_secs),
            rebalance: !flags.no_rebalance && file.rebalance.unwrap_or(true),
            ..defaults
        };
        Ok(Self {
            node_id,
            listen,
            data_dir,
            initial_cluster,
            join,
            metrics_listen,
            snapshot_threshold,
            log_level: flags
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| DEFAULT_LOG_LEVEL.into()),
            request_timeout: Duration::from_secs(5),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            election_timeout_min: DEFAULT_ELECTION_TIMEOUT_MIN,
            election_timeout_max: DEFAULT_ELECTION_TIMEOUT_MAX,
            placement,
            hibernate_idle_groups: flags
                .hibernate_idle_groups
                .or(file.hibernate_idle_groups)
                .unwrap_or(true),
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
            hibernate_after: DEFAULT_HIBERNATE_AFTER,
            max_clock_drift,
            codec_backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("basaltd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn no_arguments_is_a_single_node_cluster_on_7379() {
        let c = NodeConfig::resolve(flags(&[])).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.listen.to_string(), "127.0.0.1:7379");
        assert_eq!(c.data_dir, PathBuf::from("./basalt-data"));
        assert_eq!(c.initial_cluster, BTreeMap::from([(1, "127.0.0.1:7379".to_string())]));
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:8379");
        assert!(c.hibernate_idle_groups, "hibernation is on by default");
        let h = c.hibernation().unwrap();
        assert_eq!(
            h.wake_jitter,
            DEFAULT_ELECTION_TIMEOUT_MAX - DEFAULT_ELECTION_TIMEOUT_MIN
        );
        assert!(h.liveness_timeout >= 3 * h.liveness_interval);
    }

    #[test]
    fn hibernation_can_be_turned_off_by_flag_or_file() {
        let c = NodeConfig::resolve(flags(&["--hibernate-idle-groups", "false"])).unwrap();
        assert!(!c.hibernate_idle_groups && c.hibernation().is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("basalt.toml");
        std::fs::write(&path, "hibernate_idle_groups = false\n").unwrap();
        let c = NodeConfig::resolve(flags(&["--config", path.to_str().unwrap()])).unwrap();
        assert!(!c.hibernate_idle_groups);
        let c = NodeConfig::resolve(flags(&[
            "--config",
            path.to_str().unwrap(),
            "--hibernate-idle-groups",
            "true",
        ]))
        .unwrap();
        assert!(c.hibernate_idle_groups, "the flag wins over the file");
    }

    #[test]
    fn the_merge_size_follows_the_split_size_and_stays_under_half_of_it() {
        let c = NodeConfig::resolve(flags(&["--split-size", "1000"])).unwrap();
        assert_eq!(c.placement.merge_bytes, 250);
        let c = NodeConfig::resolve(flags(&["--split-size", "1000", "--merge-size", "0"])).unwrap();
        assert_eq!(c.placement.merge_bytes, 0);
        let e = NodeConfig::resolve(flags(&["--split-size", "1000", "--merge-size", "600"])).unwrap_err();
        assert!(e.to_string().contains("half the split size"), "{e}");
        let c = NodeConfig::resolve(flags(&["--merge-delay", "5"])).unwrap();
        assert_eq!(c.placement.merge_delay, Duration::from_secs(5));
    }

    #[test]
    fn initial_cluster_parses_and_rejects_bad_entries() {
        let m = parse_initial_cluster("1=127.0.0.1:7401, 2=127.0.0.1:7402,3=127.0.0.1:7403").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[&2], "127.0.0.1:7402");
        for bad in [
            "",
            "1",
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "1=nope",
            "1=127.0.0.1:1,1=127.0.0.1:2",
        ] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn cluster_must_include_this_node_unless_joining() {
        let e = NodeConfig::resolve(flags(&["--node-id", "4", "--initial-cluster", "1=127.0.0.1:7401"]));
        assert!(e.is_err());
        let c = NodeConfig::resolve(flags(&["--node-id", "4", "--listen", "127.0.0.1:7404", "--join"])).unwrap();
        assert!(c.join && c.initial_cluster.is_empty());
    }

    #[test]
    fn file_settings_apply_and_flags_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("basalt.toml");
        std::fs::write(
            &path,
            "node_id = 2\nlisten = \"127.0.0.1:7402\"\ndata_dir = \"/tmp/x\"\nsnapshot_threshold = 50\n\
             [initial_cluster]\n1 = \"127.0.0.1:7401\"\n2 = \"127.0.0.1:7402\"\n",
        )
        .unwrap();
        let c = NodeConfig::resolve(flags(&[
            "--config",
            path.to_str().unwrap(),
            "--snapshot-threshold",
            "70",
        ]))
        .unwrap();
        assert_eq!(c.node_id, 2);
        assert_eq!(c.listen.port(), 7402);
        assert_eq!(c.metrics_listen.port(), 8402);
        assert_eq!(c.snapshot_threshold, 70);
        assert_eq!(c.initial_cluster.len(), 2);
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("basalt.toml");
        std::fs::write(&path, "node_idd = 2\n").unwrap();
        assert!(matches!(
            NodeConfig::resolve(flags(&["--config", path.to_str().unwrap()])),
            Err(ConfigError::ParseFile { .. })
        ));
    }
}
