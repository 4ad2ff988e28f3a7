//! `basalt-demo`: the first thing a newcomer runs. It starts a 3-node cluster of real `basaltd`
//! processes, writes keys, SIGKILLs the leader, measures the failover, proves that every
//! acknowledged write survived, restarts the dead node, watches it catch up, and shuts down.
//!
//! Invariants, and why:
//! - Only *acknowledged* writes are checked, and every one of them is: a write whose call
//!   failed may or may not have been applied (its outcome is unknown), so it proves nothing
//!   either way, while a single acknowledged write that reads back missing or wrong is a
//!   durability bug and fails the demo (exit code non-zero).
//! - Each key is written once with a value derived from its index and phase, so a read that
//!   returns anything else is unambiguous evidence of corruption, not a benign overwrite.
//! - Any failed step stops the demo with an error naming the step, keeps the cluster's data
//!   and logs, and prints where they are, so a newcomer's first failure is diagnosable.
//! - Every node is stopped on every exit path: at the end with SIGTERM (and a non-zero exit
//!   status from a node fails the demo, since the contract says SIGTERM exits 0), and on an error
//!   or Ctrl-C by dropping the [`LocalCluster`], which SIGKILLs whatever is left.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_client::{Client, ClientError};
use basalt_proto::keycodec::DEFAULT_KEYSPACE_NAME;
use bytes::Bytes;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use crate::local_cluster::{basaltd_path, ClusterError, LocalCluster, LocalClusterOptions};
use crate::report::{format_duration, group_thousands};

const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A failover that takes longer than this is a failure, not a slow success.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
const CATCH_UP_POLL: Duration = Duration::from_millis(100);
const MAX_KEYS: u64 = 500_000;
const STEPS: u32 = 8;

/// Watch a Basalt cluster survive the loss of its leader without losing a write.
#[derive(Parser, Debug, Clone)]
#[command(name = "basalt-demo", version)]
pub struct DemoArgs {
    /// Keys written before the leader is killed (a third as many more are written while it is down).
    #[arg(long, default_value_t = 3000)]
    pub keys: u64,
    /// Nodes in the cluster (at least 3, so that losing one keeps a majority).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// The basaltd binary (default: $BASALTD, else the one next to this program).
    #[arg(long)]
    pub basaltd: Option<PathBuf>,
    /// Put the cluster's data and logs in this new directory and keep them.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the temporary data directory after the demo instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

#[derive(thiserror::Error, Debug)]
pub enum DemoError {
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("creating a client: {0}")]
    Client(#[from] ClientError),
    #[error("step {step} failed: {reason}")]
    Step { step: &'static str, reason: String },
    #[error(
        "{lost} of {checked} acknowledged writes were LOST ({missing} missing, {wrong} with a \
         wrong value); first: {example}"
    )]
    LostWrites {
        lost: u64,
        checked: u64,
        missing: u64,
        wrong: u64,
        example: String,
    },
    #[error("interrupted")]
    Interrupted,
}

fn step_failed(step: &'static str, reason: impl Into<String>) -> DemoError {
    DemoError::Step {
        step,
        reason: reason.into(),
    }
}

/// What a successful demo established.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub acknowledged: u64,
    pub killed_leader: u64,
    pub new_leader: u64,
    pub election: Duration,
    pub writes_resumed: Duration,
    pub catch_up_entries: u64,
    pub catch_up: Duration,
}

/// Runs the demo; returns once the cluster is stopped (or has been killed on failure).
pub async fn run(args: DemoArgs) -> Result<DemoSummary, DemoError> {
    if args.nodes < 3 {
        return Err(DemoError::InvalidArgs(
            "--nodes must be at least 3: with fewer, losing the leader loses the majority".into(),
        ));
    }
    if !(1..=MAX_KEYS).contains(&args.keys) {
        return Err(DemoError::InvalidArgs(format!("--keys must be within 1..={MAX_KEYS}")));
    }
    if args.clients == 0 {
        return Err(DemoError::InvalidArgs("--clients must be at least 1".into()));
    }
    let basaltd = match &args.basaltd {
        Some(path) => path.clone(),
        None => basaltd_path()?,
    };

    println!("Basalt demo: crash the leader of a live cluster and check that no acknowledged write is lost.\n");
    step(1, &format!("Starting {} basaltd processes", args.nodes));
    let mut options = LocalClusterOptions::new(args.nodes, basaltd);
    options.base_dir = args.data_dir.clone();
    let cluster = LocalCluster::start(options).await?;
    cluster.set_keep_data(args.keep);
    detail(&format!("data and logs: {}", cluster.base_dir().display()));
    for id in cluster.node_ids() {
        detail(&format!("node {id}: {}", cluster.endpoint(id)?));
    }

    let outcome = tokio::select! {
        outcome = walkthrough(&cluster, &args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
    };
    match &outcome {
        Ok(_) if args.keep || args.data_dir.is_some() => {
            println!("\nData and logs kept in {}", cluster.base_dir().display());
        }
        Ok(_) => {}
        Err(_) => {
            cluster.set_keep_data(true);
            eprintln!(
                "\nThe cluster's data and logs are kept for inspection in {}",
                cluster.base_dir().display()
            );
        }
    }
    // Dropping the cluster kills whatever still runs (nothing, after a successful walkthrough).
    drop(cluster);
    outcome
}

async fn walkthrough(cluster: &LocalCluster, args: &DemoArgs) -> Result<DemoSummary, DemoError> {
    step(2, "Waiting for the nodes to elect a leader");
    let started = Instant::now();
    let leader = cluster.wait_for_leader(LEADER_TIMEOUT).await?;
    detail(&format!(
        "node {leader} is the leader (elected in {})",
        format_duration(started.elapsed())
    ));

    let client = cluster.client().await?;
    let before = 0..args.keys;
    step(
        3,
        &format!(
            "Writing {} keys with {} concurrent clients",
            group_thousands(args.keys),
            args.clients
        ),
    );
    let mut acknowledged = write_phase(&client, before, Phase::BeforeCrash, args.clients).await?;

    // The killed node's replicas of the data now are where its catch-up will start from.
    let killed_at_index = applied_data_entries(cluster, leader).await.unwrap_or(0);
    step(4, &format!("Killing the leader, node {leader}, with SIGKILL"));
    let killed_at = Instant::now();
    cluster.kill(leader)?;
    // Both clocks run concurrently from the kill: who leads, and when writes work again.
    let (election, resumed) = tokio::join!(
        async {
            let leader = cluster.wait_for_leader(FAILOVER_TIMEOUT).await;
            (leader, killed_at.elapsed())
        },
        first_successful_write(&client, killed_at)
    );
    let (new_leader, election_time) = (election.0?, election.1);
    let (probe, writes_resumed) = resumed?;
    acknowledged.push(probe);
    detail(&format!(
        "node {new_leader} was elected after {}; writes succeeded again after {}",
        format_duration(election_time),
        format_duration(writes_resumed)
    ));

    let during_count = (args.keys / 3).max(1);
    step(
        5,
        &format!(
            "Writing {} more keys while node {leader} is down",
            group_thousands(during_count)
        ),
    );
    let during = args.keys..args.keys + during_count;
    acknowledged.extend(write_phase(&client, during, Phase::WhileDown, args.clients).await?);

    step(
        6,
        &format!(
            "Reading back all {} acknowledged keys",
            group_thousands(acknowledged.len() as u64)
        ),
    );
    let acknowledged_count = acknowledged.len() as u64;
    verify(&client, acknowledged, args.clients).await?;

    step(7, &format!("Restarting node {leader} and letting it catch up"));
    cluster.restart(leader).await?;
    let (catch_up_to, catch_up) = catch_up(cluster, leader).await?;
    let catch_up_entries = catch_up_to.saturating_sub(killed_at_index);
    detail(&format!(
        "node {leader}'s replicas of the data went from {} to {} applied entries in {}",
        group_thousands(killed_at_index),
        group_thousands(catch_up_to),
        format_duration(catch_up)
    ));

    step(8, "Stopping every node with SIGTERM");
    let statuses = cluster.terminate_all().await?;
    if let Some((id, status)) = statuses.iter().find(|(_, status)| !status.success()) {
        return Err(step_failed(
            "8 (shutdown)",
            format!("node {id} exited with {status} after SIGTERM; expected a clean exit 0"),
        ));
    }
    detail(&format!("{} nodes exited cleanly", statuses.len()));

    let summary = DemoSummary {
        acknowledged: acknowledged_count,
        killed_leader: leader,
        new_leader,
        election: election_time,
        writes_resumed,
        catch_up_entries,
        catch_up,
    };
    println!("\n{}", render_summary(&summary));
    Ok(summary)
}

fn step(number: u32, title: &str) {
    println!("[{number}/{STEPS}] {title}");
}

fn detail(text: &str) {
    println!("      {text}");
}

/// The closing lines of a successful demo.
pub fn render_summary(summary: &DemoSummary) -> String {
    format!(
        "All {} acknowledged writes survived the crash of leader node {}.\n  \
         failover   node {} led {} after the kill; writes succeeded again after {}\n  \
         catch-up   node {} applied {} entries in {} after restarting",
        group_thousands(summary.acknowledged),
        summary.killed_leader,
        summary.new_leader,
        format_duration(summary.election),
        format_duration(summary.writes_resumed),
        summary.killed_leader,
        group_thousands(summary.catch_up_entries),
        format_duration(summary.catch_up),
    )
}

/// When a key was written, which is also part of its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    BeforeCrash,
    WhileDown,
    Failover,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::BeforeCrash => "written before the crash",
            Phase::WhileDown => "written while a node was down",
            Phase::Failover => "the first write after the crash",
        }
    }
}

fn demo_key(index: u64) -> Bytes {
    Bytes::from(format!("demo/key-{index:06}"))
}

fn demo_value(index: u64, phase: Phase) -> Bytes {
    Bytes::from(format!("value {index}, {}", phase.describe()))
}

fn progress_bar(len: u64) -> ProgressBar {
    let style = ProgressStyle::with_template("      [{bar:40}] {pos}/{len} {msg}")
        .expect("the progress template is a valid constant")
        .progress_chars("=> ");
    ProgressBar::new(len).with_style(style)
}

/// Writes the keys of `indices` concurrently and returns every acknowledged `(key, value)`.
/// The cluster is healthy during these phases, so any failed write fails the step.
async fn write_phase(
    client: &Client,
    indices: Range<u64>,
    phase: Phase,
    concurrency: usize,
) -> Result<Vec<(Bytes, Bytes)>, DemoError> {
    let step_name = match phase {
        Phase::WhileDown => "5 (writes with a node down)",
        _ => "3 (writes)",
    };
    let total = indices.end - indices.start;
    let bar = progress_bar(total);
    let next = Arc::new(AtomicU64::new(indices.start));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, bar, next) = (client.clone(), bar.clone(), Arc::clone(&next));
        let end = indices.end;
        tasks.spawn(async move {
            let mut acked = Vec::new();
            let mut failed = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= end {
                    return (acked, failed);
                }
                let (key, value) = (demo_key(index), demo_value(index, phase));
                match client.put(key.clone(), value.clone()).await {
                    Ok(()) => acked.push((key, value)),
                    Err(error) => failed.push((key, error)),
                }
                bar.inc(1);
            }
        });
    }
    let mut acked = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut failed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (task_acked, task_failed) =
            joined.map_err(|e| step_failed(step_name, format!("a writer task failed: {e}")))?;
        acked.extend(task_acked);
        failed.extend(task_failed);
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    if let Some((key, error)) = failed.first() {
        return Err(step_failed(
            step_name,
            format!(
                "{} of {} writes failed; first: {} -> {error}",
                failed.len(),
                total,
                String::from_utf8_lossy(key)
            ),
        ));
    }
    detail(&format!(
        "{} writes acknowledged in {} ({} writes/s)",
        group_thousands(acked.len() as u64),
        format_duration(elapsed),
        group_thousands((acked.len() as f64 / elapsed.as_secs_f64().max(1e-3)).round() as u64)
    ));
    Ok(acked)
}

/// Keeps writing one probe key until a write is acknowledged; returns it and the time since
/// `since`. The client retries internally (following leader hints, with backoff), so this is
/// the failover time an application would see.
async fn first_successful_write(client: &Client, since: Instant) -> Result<((Bytes, Bytes), Duration), DemoError> {
    let (key, value) = (
        Bytes::from_static(b"demo/failover-probe"),
        demo_value(0, Phase::Failover),
    );
    loop {
        match client.put(key.clone(), value.clone()).await {
            Ok(()) => return Ok(((key, value), since.elapsed())),
            Err(error) if since.elapsed() >= FAILOVER_TIMEOUT => {
                return Err(step_failed(
                    "4 (failover)",
                    format!(
                        "no write succeeded within {} of the kill; last error: {error}",
                        format_duration(FAILOVER_TIMEOUT)
                    ),
                ));
            }
            Err(_) => {}
        }
    }
}

/// How the read-back of acknowledged writes went.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verification {
    intact: u64,
    missing: u64,
    wrong: u64,
    unreadable: u64,
    first_problem: Option<String>,
}

impl Verification {
    fn note(&mut self, problem: impl FnOnce() -> String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(problem());
        }
    }

    fn check(&mut self, key: &[u8], expected: &[u8], read: Result<Option<Bytes>, ClientError>) {
        let shown = || String::from_utf8_lossy(key).into_owned();
        match read {
            Ok(Some(found)) if found == expected => self.intact += 1,
            Ok(Some(found)) => {
                self.wrong += 1;
                self.note(|| {
                    format!(
                        "{} holds {:?}, expected {:?}",
                        shown(),
                        String::from_utf8_lossy(&found),
                        String::from_utf8_lossy(expected)
                    )
                });
            }
            Ok(None) => {
                self.missing += 1;
                self.note(|| format!("{} is missing", shown()));
            }
            Err(error) => {
                self.unreadable += 1;
                self.note(|| format!("reading {} failed: {error}", shown()));
            }
        }
    }

    fn merge(&mut self, other: Verification) {
        self.intact += other.intact;
        self.missing += other.missing;
        self.wrong += other.wrong;
        self.unreadable += other.unreadable;
        if self.first_problem.is_none() {
            self.first_problem = other.first_problem;
        }
    }

    fn checked(&self) -> u64 {
        self.intact + self.missing + self.wrong + self.unreadable
    }

    /// Lost writes are the worst outcome, so they are reported even when reads also failed.
    fn into_result(self) -> Result<Verification, DemoError> {
        let example = self.first_problem.clone().unwrap_or_default();
        if self.missing + self.wrong > 0 {
            return Err(DemoError::LostWrites {
                lost: self.missing + self.wrong,
                checked: self.checked(),
                missing: self.missing,
                wrong: self.wrong,
                example,
            });
        }
        if self.unreadable > 0 {
            return Err(step_failed(
                "6 (read-back)",
                format!(
                    "{} of {} keys could not be read; first: {example}",
                    self.unreadable,
                    self.checked()
                ),
            ));
        }
        Ok(self)
    }
}

/// Reads back every acknowledged write; fails on any that is missing, wrong or unreadable.
async fn verify(client: &Client, acknowledged: Vec<(Bytes, Bytes)>, concurrency: usize) -> Result<(), DemoError> {
    let bar = progress_bar(acknowledged.len() as u64);
    let work = Arc::new(acknowledged);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, bar, work, next) = (client.clone(), bar.clone(), Arc::clone(&work), Arc::clone(&next));
        tasks.spawn(async move {
            let mut verification = Verification::default();
            loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some((key, expected)) = usize::try_from(at).ok().and_then(|at| work.get(at)) else {
                    return verification;
                };
                let read = client.get(key.clone()).await;
                verification.check(key, expected, read);
                bar.inc(1);
            }
        });
    }
    let mut total = Verification::default();
    while let Some(joined) = tasks.join_next().await {
        total.merge(joined.map_err(|e| step_failed("6 (read-back)", format!("a reader task failed: {e}")))?);
    }
    bar.finish_and_clear();
    let total = total.into_result()?;
    detail(&format!(
        "{} of {} intact, 0 missing, 0 wrong",
        group_thousands(total.intact),
        group_thousands(total.checked())
    ));
    Ok(())
}

/// Entries node `node` has applied in its replicas of the default keyspace's shards (the
/// demo's data), summed over the shards; `None` if it does not answer.
async fn applied_data_entries(cluster: &LocalCluster, node: u64) -> Option<u64> {
    let applied = cluster.applied_by_shard(node, DEFAULT_KEYSPACE_NAME).await.ok()?;
    Some(applied.values().sum())
}

/// Polls until every replica of the data on `node` has applied as far as the meta leader's
/// replica of the same shard; returns the entries `node` has then applied (summed over the
/// shards) and how long it took. The meta group's index would say nothing about the data: the
/// keys live in the default keyspace's own groups.
async fn catch_up(cluster: &LocalCluster, node: u64) -> Result<(u64, Duration), DemoError> {
    const STEP: &str = "7 (catch-up)";
    let started = Instant::now();
    let bar = progress_bar(0);
    loop {
        let leader = cluster.wait_for_leader(LEADER_TIMEOUT).await?;
        let views = (
            cluster.applied_by_shard(leader, DEFAULT_KEYSPACE_NAME).await,
            cluster.applied_by_shard(node, DEFAULT_KEYSPACE_NAME).await,
        );
        let last_observation = match views {
            (Ok(lead), Ok(mine)) if !lead.is_empty() => {
                let target: u64 = lead.values().sum();
                let reached: u64 = lead
                    .iter()
                    .map(|(shard, &to)| mine.get(shard).copied().unwrap_or(0).min(to))
                    .sum();
                bar.set_length(target);
                bar.set_position(reached);
                bar.set_message(format!("applied on node {node}"));
                if lead
                    .iter()
                    .all(|(shard, &to)| mine.get(shard).is_some_and(|&at| at >= to))
                {
                    bar.finish_and_clear();
                    return Ok((mine.values().sum(), started.elapsed()));
                }
                format!("node {node} at {reached} of {target} applied entries")
            }
            (Ok(_), Ok(_)) => format!("node {leader} holds no replica of the data"),
            (Err(error), _) | (_, Err(error)) => error.to_string(),
        };
        if started.elapsed() >= CATCH_UP_TIMEOUT {
            bar.finish_and_clear();
            return Err(step_failed(
                STEP,
                format!(
                    "node {node} did not catch up within {}: {last_observation}",
                    format_duration(CATCH_UP_TIMEOUT)
                ),
            ));
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_their_key_and_phase() {
        assert_eq!(&demo_key(42)[..], b"demo/key-000042");
        assert_ne!(demo_value(1, Phase::BeforeCrash), demo_value(1, Phase::WhileDown));
        assert_ne!(demo_value(1, Phase::BeforeCrash), demo_value(2, Phase::BeforeCrash));
    }

    #[test]
    fn verification_separates_lost_from_unreadable() {
        let mut v = Verification::default();
        v.check(b"k1", b"v", Ok(Some(Bytes::from_static(b"v"))));
        v.check(b"k2", b"v", Ok(None));
        v.check(b"k3", b"v", Ok(Some(Bytes::from_static(b"x"))));
        v.check(b"k4", b"v", Err(ClientError::Config("down".into())));
        assert_eq!((v.intact, v.missing, v.wrong, v.unreadable), (1, 1, 1, 1));
        assert_eq!(v.first_problem.as_deref(), Some("k2 is missing"));
        match v.into_result() {
            Err(DemoError::LostWrites {
                lost: 2, checked: 4, ..
            }) => {}
            other => panic!("expected lost writes, got {other:?}"),
        }
    }

    #[test]
    fn unreadable_keys_fail_the_step_without_claiming_loss() {
        let mut v = Verification::default();
        v.check(b"k1", b"v", Ok(Some(Bytes::from_static(b"v"))));
        v.check(b"k2", b"v", Err(ClientError::Config("down".into())));
        let mut total = Verification::default();
        total.merge(v);
        assert!(matches!(total.into_result(), Err(DemoError::Step { .. })));

        let mut clean = Verification::default();
        clean.check(b"k1", b"v", Ok(Some(Bytes::from_static(b"v"))));
        assert_eq!(clean.into_result().unwrap().intact, 1);
    }

    #[test]
    fn summary_reads_well() {
        let text = render_summary(&DemoSummary {
            acknowledged: 4001,
            killed_leader: 2,
            new_leader: 3,
            election: Duration::from_millis(850),
            writes_resumed: Duration::from_millis(1_150),
            catch_up_entries: 1012,
            catch_up: Duration::from_millis(420),
        });
        assert!(text.starts_with("All 4,001 acknowledged writes survived the crash of leader node 2."));
        assert!(text.contains("node 3 led 850ms after the kill; writes succeeded again after 1.1s"));
        assert!(text.contains("node 2 applied 1,012 entries in 420ms after restarting"));
    }

    #[test]
    fn too_few_nodes_are_refused_before_anything_starts() {
        let args = DemoArgs::try_parse_from(["basalt-demo", "--nodes", "2"]).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(matches!(runtime.block_on(run(args)), Err(DemoError::InvalidArgs(_))));
    }
}
