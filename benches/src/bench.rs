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

use basalt_client::{Client, ClientConfig, ClientError};
use clap::{Parser, ValueEnum};

use crate::local_cluster::{basaltd_path, ClusterError, LocalCluster, LocalClusterOptions};
use crate::metrics_scrape::{fetch_metrics, parse_metric, ScrapeError};
use crate::report::{BenchReport, LatencySummary, ServerStats};
use crate::workload::{preload, run_closed_loop, value_of_size, KeySpace, LoadPlan, Window, Workload, WorkloadError};
use basalt_client::cli::duration::{parse_duration, parse_duration_or_zero};

const ENTRIES_PER_FSYNC_SUM: &str = "basalt_storage_entries_per_fsync_sum";
const ENTRIES_PER_FSYNC_COUNT: &str = "basalt_storage_entries_per_fsync_count";
const FSYNCS_TOTAL: &str = "basalt_storage_fsyncs_total";
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    Put,
    Get,
    Mixed,
}

/// Closed-loop load generator for Basalt.
#[derive(Parser, Debug, Clone)]
#[command(name = "basalt-bench", version)]
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
        }
    }
}

/// Scrapes every node; any failure makes the whole reading unusable (see module invariants).
async fn scrape_all(metrics: &[String]) -> Result<FsyncCounters, String> {
    let mut total = FsyncCounters::default();
    for addr in metrics {
        let text = fetch_metrics(addr.as_str())
            .await
            .map_err(|e: ScrapeError| e.to_string())?;
        total = total.add(FsyncCounters::from_exposition(&text).map_err(|e| format!("{addr}: {e}"))?);
    }
    Ok(total)
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

    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        connections.push(Client::connect(ClientConfig::new(endpoints.clone())).await?);
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
            (Ok(before), Ok(after)) => (
                Some(FsyncCounters::delta(before, after, window.measured(), metrics.len())),
                None,
            ),
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
        workload: workload.name().to_string(),
        read_ratio: workload.read_ratio(),
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

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        BenchArgs::try_parse_from(std::iter::once("basalt-bench").chain(args.iter().copied()))
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
