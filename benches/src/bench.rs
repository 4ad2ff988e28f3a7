//! `basalt-bench`: command-line options and the orchestration of one run (target cluster,
//! connections, preload, warm-up, measurement, server metrics, report).
//!
//! Invariants, and why:
//! - Progress goes to stderr and the report to stdout, so `--json` output can be piped as is.
//! - Server metrics are read exactly at the window's edges (end of warm-up, end of measurement)
//!   and reported as deltas, so preload and warm-up traffic never dilute the entries-per-fsync
//!   figure. A node whose metrics cannot be read makes the server figures "n/a" rather than a
//!   partial sum that would look like a real number.
//! - A local cluster is started fresh for each run and shut down with SIGTERM afterwards.

use std::path::PathBuf;
use std::time::Duration;

use basalt_client::{Client, ClientConfig, ClientError, ReadMode, Sharding};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::codec::CodecArgs;
use crate::idle::IdleArgs;
use crate::local_cluster::{basaltd_path, ClusterError, LocalCluster, LocalClusterOptions};
use crate::metrics_scrape::{fetch_metrics, parse_metric, ScrapeError};
use crate::report::{BenchReport, LatencySummary, ServerStats};
use crate::workload::{preload, run_closed_loop, value_of_size, KeySpace, LoadPlan, Window, Workload, WorkloadError};
use basalt_client::cli::duration::{parse_duration, parse_duration_or_zero};

const ENTRIES_PER_FSYNC_SUM: &str = "basalt_storage_entries_per_fsync_sum";
const ENTRIES_PER_FSYNC_COUNT: &str = "basalt_storage_entries_per_fsync_count";
const FSYNCS_TOTAL: &str = "basalt_storage_fsyncs_total";
const READS_SERVED: &str = "basalt_reads_served_total";
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    Put,
    Get,
    Mixed,
}

/// Closed-loop load generator for Basalt; `idle-groups` measures idle replica groups instead, and
/// `codec` the replication codec.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "basalt-bench",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub load: BenchArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Measure what idle replica groups cost each node: memory, CPU and peer traffic.
    IdleGroups(IdleArgs),
    /// Measure the replication codec: checksum, compression and decompression GB/s per batch size
    /// and backend (CPU, GPU), the GPU crossover, and compression ratios. Starts no cluster.
    Codec(CodecArgs),
}

/// What `--create` makes before the run: a keyspace of one kind with its initial shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateSpec {
    pub sharding: Sharding,
    pub shards: u32,
}

/// Parses `hash:N`, `hash` (16 shards, the server's default) or `range` (one shard, which grows
/// by splitting).
pub fn parse_create(s: &str) -> Result<CreateSpec, String> {
    match s.split_once(':') {
        None if s == "range" => Ok(CreateSpec {
            sharding: Sharding::Range,
            shards: 1,
        }),
        None if s == "hash" => Ok(CreateSpec {
            sharding: Sharding::Hash,
            shards: 16,
        }),
        Some(("hash", n)) => match n.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(CreateSpec {
                sharding: Sharding::Hash,
                shards: n,
            }),
            _ => Err(format!("{n:?} is not a shard count of at least 1")),
        },
        _ => Err(format!("expected hash:N, hash or range, not {s:?}")),
    }
}

/// Options of the closed-loop load run.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Client endpoints of a running cluster (host:port, comma-separated).
    #[arg(long, value_delimiter = ',', required_unless_present = "local_cluster")]
    pub endpoints: Vec<String>,
    /// Metrics addresses (host:port) of the nodes behind --endpoints, to report entries per fsync.
    #[arg(long, value_delimiter = ',', requires = "endpoints")]
    pub metrics: Vec<String>,
    /// Start a local cluster of basaltd processes for this run instead of using --endpoints.
    #[arg(long, conflicts_with = "endpoints")]
    pub local_cluster: bool,
    /// Nodes in the local cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// The basaltd binary for --local-cluster (default: $BASALTD, else next to this program).
    #[arg(long)]
    pub basaltd: Option<PathBuf>,
    /// Keep the local cluster's data and logs in this (new) directory instead of a temporary one.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// An extra argument for every basaltd of --local-cluster, repeatable; for example
    /// `--basaltd-arg=--split-load=0` keeps the keyspace in one shard while it is read hard.
    #[arg(
        long = "basaltd-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        conflicts_with = "endpoints"
    )]
    pub basaltd_args: Vec<String>,
    #[arg(long, value_enum, default_value_t = WorkloadArg::Put)]
    pub workload: WorkloadArg,
    /// Fraction of reads in the mixed workload.
    #[arg(long, default_value_t = 0.5)]
    pub read_ratio: f64,
    /// Concurrent closed-loop clients (each waits for its operation before the next).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Client instances (separate connections) the clients are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 128)]
    pub value_size: usize,
    /// Number of distinct keys; read workloads write them all first.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Length of the measurement (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before measurement starts, not counted.
    #[arg(long, default_value = "2s", value_parser = parse_duration_or_zero)]
    pub warmup: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seed for key choice and values (default: random; the report shows it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The keyspace the workload uses (default: the default keyspace).
    #[arg(long)]
    pub keyspace: Option<String>,
    /// Create --keyspace before the run: `hash:N` (N hash shards), `hash` (16) or `range`
    /// (one shard); replicas are min(3, nodes).
    #[arg(long, value_parser = parse_create, requires = "keyspace", value_name = "hash:N|range")]
    pub create: Option<CreateSpec>,
    /// Read mode of the workload's reads: linearizable, lease, follower, bounded:DURATION or
    /// stale [default: the keyspace's].
    #[arg(long, value_name = "MODE")]
    pub read_mode: Option<ReadMode>,
}

#[derive(thiserror::Error, Debug)]
pub enum BenchError {
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("local cluster: {0}")]
    Cluster(#[from] ClusterError),
    #[error("creating a client: {0}")]
    Client(#[from] ClientError),
    #[error("the load generator task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("keyspace {keyspace:?}: {reason}")]
    Keyspace { keyspace: String, reason: String },
}

impl BenchArgs {
    fn workload(&self) -> Result<Workload, BenchError> {
        Ok(match self.workload {
            WorkloadArg::Put => Workload::Put,
            WorkloadArg::Get => Workload::Get,
            WorkloadArg::Mixed => Workload::mixed(self.read_ratio)?,
        })
    }

    fn validate(&self) -> Result<(), BenchError> {
        let invalid = |reason: &str| Err(BenchError::InvalidArgs(reason.to_string()));
        if self.clients == 0 {
            return invalid("--clients must be at least 1");
        }
        if self.connections == 0 || self.connections > self.clients {
            return invalid("--connections must be between 1 and --clients");
        }
        if self.duration.is_zero() {
            return invalid("--duration must be longer than zero");
        }
        if self.local_cluster && self.nodes == 0 {
            return invalid("--nodes must be at least 1");
        }
        if !self.metrics.is_empty() && self.metrics.len() != self.endpoints.len() {
            return invalid("--metrics needs one address per --endpoints entry");
        }
        if self.keyspace.as_deref() == Some("") {
            return invalid("--keyspace must not be empty");
        }
        Ok(())
    }
}

/// Sums of the storage metrics over a set of nodes at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FsyncCounters {
    pub entries_sum: f64,
    pub fsync_count: f64,
    pub fsyncs_total: f64,
}

impl FsyncCounters {
    fn from_exposition(text: &str) -> Result<Self, String> {
        let read = |name| parse_metric(text, name).ok_or_else(|| format!("metric {name} missing"));
        Ok(FsyncCounters {
            entries_sum: read(ENTRIES_PER_FSYNC_SUM)?,
            fsync_count: read(ENTRIES_PER_FSYNC_COUNT)?,
            fsyncs_total: read(FSYNCS_TOTAL)?,
        })
    }

    fn add(self, other: FsyncCounters) -> Self {
        FsyncCounters {
            entries_sum: self.entries_sum + other.entries_sum,
            fsync_count: self.fsync_count + other.fsync_count,
            fsyncs_total: self.fsyncs_total + other.fsyncs_total,
        }
    }

    /// Server stats over the window from `before` to `after` of length `window`.
    pub fn delta(before: Self, after: Self, window: Duration, nodes: usize) -> ServerStats {
        let entries = after.entries_sum - before.entries_sum;
        let fsyncs = after.fsync_count - before.fsync_count;
        ServerStats {
            entries_per_fsync: (fsyncs > 0.0).then(|| entries / fsyncs),
            fsyncs_per_sec: (after.fsyncs_total - before.fsyncs_total) / window.as_secs_f64(),
            nodes_scraped: nodes,
            reads_served_per_node: Vec::new(),
        }
    }
}

/// Scrapes every node; any failure makes the whole reading unusable (see module invariants).
/// Also returns each node's count of reads served (0 for a node that served none yet).
async fn scrape_all(metrics: &[String]) -> Result<(FsyncCounters, Vec<f64>), String> {
    let mut total = FsyncCounters::default();
    let mut reads = Vec::with_capacity(metrics.len());
    for addr in metrics {
        let text = fetch_metrics(addr.as_str())
            .await
            .map_err(|e: ScrapeError| e.to_string())?;
        total = total.add(FsyncCounters::from_exposition(&text).map_err(|e| format!("{addr}: {e}"))?);
        reads.push(parse_metric(&text, READS_SERVED).unwrap_or(0.0));
    }
    Ok((total, reads))
}

/// How long a created keyspace's shards may take to elect their leaders.
const KEYSPACE_LEADERS_TIMEOUT: Duration = Duration::from_secs(60);

/// Creates keyspace `name` if asked, then waits until every one of its shards has a leader (as
/// the answering node sees it) and returns how many shards it has. Without `create` the
/// keyspace must exist.
async fn prepare_keyspace(
    endpoints: &[String],
    name: &str,
    create: Option<CreateSpec>,
    nodes: usize,
) -> Result<u32, BenchError> {
    let failed = |reason: String| BenchError::Keyspace {
        keyspace: name.to_string(),
        reason,
    };
    let mut cfg = ClientConfig::new(endpoints.to_vec());
    cfg.deadline = Duration::from_secs(30);
    let admin = Client::connect(cfg).await?;
    if let Some(spec) = create {
        crate::idle::wait_for_default_keyspace(&admin, KEYSPACE_LEADERS_TIMEOUT)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let replicas = nodes.clamp(1, 3) as u32;
        eprintln!(
            "creating keyspace {name:?} ({:?}, {} shards)...",
            spec.sharding, spec.shards
        );
        admin
            .create_keyspace(name, spec.sharding, spec.shards, replicas)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    let deadline = tokio::time::Instant::now() + KEYSPACE_LEADERS_TIMEOUT;
    loop {
        let shards = admin
            .list_shards(Some(name), false)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let led = shards.iter().filter(|s| s.leader_id != 0).count();
        if !shards.is_empty() && led == shards.len() {
            return Ok(shards.len() as u32);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(failed(format!(
                "{led} of {} shards have a leader after {KEYSPACE_LEADERS_TIMEOUT:?}",
                shards.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the benchmark described by `args` and returns its report.
pub async fn run(args: BenchArgs) -> Result<BenchReport, BenchError> {
    args.validate()?;
    let workload = args.workload()?;
    let keys = KeySpace::new(args.keys)?;
    let seed = args.seed.unwrap_or_else(rand::random);

    let cluster = if args.local_cluster {
        let basaltd = match &args.basaltd {
            Some(path) => path.clone(),
            None => basaltd_path()?,
        };
        let mut options = LocalClusterOptions::new(args.nodes, basaltd);
        options.base_dir = args.data_dir.clone();
        options.extra_args = args.basaltd_args.clone();
        eprintln!("starting a local cluster of {} basaltd nodes...", args.nodes);
        let cluster = LocalCluster::start(options).await?;
        eprintln!("  data and logs in {}", cluster.base_dir().display());
        let leader = cluster.wait_for_leader(LEADER_TIMEOUT).await?;
        eprintln!("  node {leader} is the leader");
        Some(cluster)
    } else {
        None
    };
    let (endpoints, metrics, target) = match &cluster {
        Some(cluster) => {
            let metrics = cluster
                .node_ids()
                .into_iter()
                .map(|id| cluster.metrics_addr(id).map(|addr| addr.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            let target = format!("local cluster of {} nodes", args.nodes);
            (cluster.endpoints(), metrics, target)
        }
        None => {
            let target = format!("{} endpoints", args.endpoints.len());
            (args.endpoints.clone(), args.metrics.clone(), target)
        }
    };

    let mut shards = None;
    if let Some(name) = &args.keyspace {
        shards = Some(prepare_keyspace(&endpoints, name, args.create, args.nodes).await?);
    }
    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let client = Client::connect(ClientConfig::new(endpoints.clone())).await?;
        let client = match &args.keyspace {
            Some(name) => client.with_keyspace(name.clone()),
            None => client,
        };
        connections.push(client.with_read_mode(args.read_mode.unwrap_or_default()));
    }
    let value = value_of_size(args.value_size, seed);
    if workload.needs_preload() {
        eprintln!("preloading {} keys...", keys.count());
        preload(&connections, keys, value.clone(), args.clients).await?;
    }

    eprintln!(
        "running {} for {:?} after {:?} of warm-up...",
        workload.name(),
        args.duration,
        args.warmup
    );
    let window = Window::starting_now(args.warmup, args.duration);
    let plan = LoadPlan {
        workload,
        keys,
        value,
        clients: args.clients,
        seed,
    };
    let load = tokio::spawn(run_closed_loop(connections, plan, window));
    let (server, server_note) = if metrics.is_empty() {
        (
            None,
            Some("pass --metrics with --endpoints to read server metrics".to_string()),
        )
    } else {
        tokio::time::sleep_until(window.measure_from.into()).await;
        let before = scrape_all(&metrics).await;
        tokio::time::sleep_until(window.until.into()).await;
        let after = scrape_all(&metrics).await;
        match (before, after) {
            (Ok((before, reads_before)), Ok((after, reads_after))) => {
                let mut stats = FsyncCounters::delta(before, after, window.measured(), metrics.len());
                stats.reads_served_per_node = reads_after
                    .iter()
                    .zip(&reads_before)
                    .map(|(a, b)| (a - b).max(0.0).round() as u64)
                    .collect();
                (Some(stats), None)
            }
            (Err(e), _) | (_, Err(e)) => (None, Some(e)),
        }
    };
    let outcome = load.await??;

    if let Some(cluster) = cluster {
        if let Err(e) = cluster.terminate_all().await {
            eprintln!("warning: stopping the local cluster: {e}");
        }
    }

    Ok(BenchReport {
        keyspace: args.keyspace.clone(),
        shards,
        workload: workload.name().to_string(),
        read_ratio: workload.read_ratio(),
        read_mode: args.read_mode.map(|m| m.to_string()),
        target,
        clients: args.clients,
        connections: args.connections,
        value_size: args.value_size,
        keys: keys.count(),
        seed,
        warmup_secs: args.warmup.as_secs_f64(),
        duration_secs: window.measured().as_secs_f64(),
        ops: outcome.ops,
        errors: outcome.errors,
        first_error: outcome.first_error.clone(),
        throughput_ops_per_sec: outcome.throughput(),
        latency: LatencySummary::from_histogram(&outcome.latency_us),
        server,
        server_note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("basalt-bench").chain(args.iter().copied()))
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli = parse_cli(args)?;
        assert!(cli.command.is_none(), "{args:?} is a load run");
        Ok(cli.load)
    }

    #[test]
    fn idle_groups_is_a_subcommand_with_its_own_options() {
        let cli = parse_cli(&[
            "idle-groups",
            "--groups",
            "100",
            "--window",
            "20s",
            "--hibernate",
            "false",
        ])
        .unwrap();
        let Some(BenchCommand::IdleGroups(a)) = cli.command else {
            panic!("not parsed as idle-groups")
        };
        assert_eq!(a.groups, 100);
        assert_eq!(a.window, Duration::from_secs(20));
        assert_eq!(a.hibernate, Some(false));
        assert_eq!(a.nodes, 3);
        assert!(parse_cli(&["idle-groups"]).is_err(), "--groups is required");
        assert!(parse_cli(&["--local-cluster", "idle-groups", "--groups", "1"]).is_err());
    }

    #[test]
    fn a_keyspace_can_be_named_and_created() {
        let args = parse(&["--local-cluster", "--keyspace", "k", "--create", "hash:16"]).unwrap();
        assert_eq!(args.keyspace.as_deref(), Some("k"));
        assert_eq!(
            args.create,
            Some(CreateSpec {
                sharding: Sharding::Hash,
                shards: 16
            })
        );
        assert_eq!(parse_create("range").unwrap().shards, 1);
        assert_eq!(parse_create("hash").unwrap().shards, 16);
        for bad in ["hash:0", "hash:x", "range:2", "list", ""] {
            assert!(parse_create(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse(&["--local-cluster", "--create", "range"]).is_err(),
            "--create needs --keyspace"
        );
        assert!(parse(&["--local-cluster", "--keyspace", ""])
            .unwrap()
            .validate()
            .is_err());
    }

    #[test]
    fn basaltd_args_pass_through_to_the_local_cluster_only() {
        let args = parse(&[
            "--local-cluster",
            "--basaltd-arg=--split-load=0",
            "--basaltd-arg",
            "--no-rebalance",
        ])
        .unwrap();
        assert_eq!(args.basaltd_args, ["--split-load=0", "--no-rebalance"]);
        assert!(parse(&["--endpoints", "a:1", "--basaltd-arg=--no-rebalance"]).is_err());
    }

    #[test]
    fn defaults_match_the_documentation() {
        let args = parse(&["--local-cluster"]).unwrap();
        assert_eq!(args.clients, 64);
        assert_eq!(args.value_size, 128);
        assert_eq!(args.keys, 10_000);
        assert_eq!(args.duration, Duration::from_secs(10));
        assert_eq!(args.warmup, Duration::from_secs(2));
        assert_eq!(args.workload, WorkloadArg::Put);
        assert_eq!(args.nodes, 3);
        args.validate().unwrap();
    }

    #[test]
    fn a_target_is_required_and_exclusive() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--local-cluster", "--endpoints", "a:1"]).is_err());
        let args = parse(&["--endpoints", "a:1,b:2,c:3", "--metrics", "a:9,b:9,c:9"]).unwrap();
        assert_eq!(args.endpoints, ["a:1", "b:2", "c:3"]);
        args.validate().unwrap();
        let mismatched = parse(&["--endpoints", "a:1,b:2", "--metrics", "a:9"]).unwrap();
        assert!(mismatched.validate().is_err());
    }

    #[test]
    fn mixed_workload_takes_the_read_ratio() {
        let args = parse(&["--local-cluster", "--workload", "mixed", "--read-ratio", "0.9"]).unwrap();
        assert_eq!(args.workload().unwrap(), Workload::Mixed { read_ratio: 0.9 });
        let args = parse(&["--local-cluster", "--workload", "mixed", "--read-ratio", "2"]).unwrap();
        assert!(args.workload().is_err());
    }

    #[test]
    fn nonsensical_sizes_are_refused() {
        for bad in [
            &["--local-cluster", "--clients", "0"][..],
            &["--local-cluster", "--clients", "2", "--connections", "3"],
            &["--local-cluster", "--connections", "0"],
        ] {
            assert!(parse(bad).unwrap().validate().is_err(), "{bad:?}");
        }
        assert!(parse(&["--local-cluster", "--duration", "ten"]).is_err());
        assert!(parse(&["--local-cluster", "--duration", "0s"]).is_err());
        assert_eq!(
            parse(&["--local-cluster", "--warmup", "0s"]).unwrap().warmup,
            Duration::ZERO,
            "no warm-up is allowed"
        );
    }

    #[test]
    fn server_stats_are_deltas_over_the_window() {
        let exposition = "basalt_storage_entries_per_fsync_sum 100\n\
                          basalt_storage_entries_per_fsync_count 20\n\
                          basalt_storage_fsyncs_total 25\n";
        let before = FsyncCounters::from_exposition(exposition).unwrap();
        let after = before.add(FsyncCounters {
            entries_sum: 400.0,
            fsync_count: 50.0,
            fsyncs_total: 60.0,
        });
        let stats = FsyncCounters::delta(before, after, Duration::from_secs(10), 3);
        assert_eq!(stats.entries_per_fsync, Some(8.0), "(500-100)/(70-20)");
        assert_eq!(stats.fsyncs_per_sec, 6.0);
        assert_eq!(stats.nodes_scraped, 3);
        let idle = FsyncCounters::delta(before, before, Duration::from_secs(1), 3);
        assert_eq!(idle.entries_per_fsync, None);
        assert!(FsyncCounters::from_exposition("basalt_storage_fsyncs_total 1\n").is_err());
    }
}
