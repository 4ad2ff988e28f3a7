//! The placement driver: on the meta group's leader, the loop that keeps shards healthy, sized
//! and spread (TiKV's PD, CockroachDB's replicate and split queues, in one place).
//!
//! Every round ([`PlacementConfig::interval`]) it asks every member for a report (its replicas,
//! which it leads, their sizes and request rates; see [`crate::load`]) and then decides its
//! steps, in this order of urgency (steps 1 and 2 exclude the rest of the round; splits run on
//! up to [`MAX_PARALLEL_STEPS`] shards at once, and merges, rebalancing and leader balancing
//! contribute at most one step each, on distinct shards):
//!
//! 1. **Finish moves** the catalog records as under way (a previous driver may have died
//!    midway), or abandon those whose newcomer is gone.
//! 2. **Re-replicate**: a replica on a node that is no longer a member, or that has not
//!    reported for [`PlacementConfig::dead_after`], is moved to the live member holding the
//!    fewest replicas.
//! 3. **Split** a shard whose leader reports more than [`PlacementConfig::split_bytes`] of data,
//!    or more than [`PlacementConfig::split_qps`] requests per second in two reports running.
//!    **Merge** two adjacent shards of a range keyspace that together hold less than
//!    [`PlacementConfig::merge_bytes`] and serve less than half the split load, once the pair has
//!    stayed so for [`PlacementConfig::merge_delay`] (see "Merges" below).
//! 4. **Rebalance replicas**: while the live members' replica counts differ by 2 or more, move one
//!    replica from the fullest node to the emptiest (a node that joined gets its share this way).
//! 5. **Balance leaders** the same way, by leadership transfers.
//!
//! Merges, and why they are conservative: a merge freezes the right shard's writes for its
//! duration, so merging and re-splitting the same range would be pure churn. Hysteresis keeps
//! them apart: the merged shard holds at most `merge_bytes`, which the configuration keeps at or
//! below half the split size, and at most half the split load; and a pair must stay small and cool
//! for `merge_delay`, so a split's two halves are not merged back while the load that split them
//! is still ramping. Hash keyspaces are never merged automatically: their shard count is the
//! user's choice (`keyspace create --shards N`), and `basaltctl shard merge` still merges them by
//! hand. Shards in a merge (marked, or the target of a mark) are neither moved nor re-replicated
//! until it ends: `merge::resume_merges` finishes or undoes it within a round or two, and a
//! membership change of a frozen shard would race its export.
//!
//! Why so few steps per round: steps compete for the same shards (a split of a shard being
//! moved, a rebalance that undoes a repair), and a round is short, so "most urgent first, then
//! look again" converges without the driver reasoning about interactions. Repairs are the
//! exception (up to [`MAX_PARALLEL_STEPS`] at once, on distinct shards): a dead node's replicas
//! are the cluster's exposure. So are splits: each touches only its own shard, and a keyspace
//! growing under load outruns one split per round (it kept splitting long after its writes
//! stopped, each child landing on its parent's nodes faster than balancing could spread them).
//! Splits and balancing share a round because under a steady load some shard is always due a
//! split, and balancing must not wait for that to end.
//!
//! The driver keeps no state that matters for safety: moves are recorded in the catalog before
//! they start, splits are guarded by the shard's epoch, and everything else it holds (reports,
//! liveness, the step history shown by `basaltctl cluster status`) is advisory and rebuilt by a
//! new leader. A new driver treats every member as live until `dead_after` has passed since it
//! took over, so a leader change never makes healthy nodes look dead.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::{Replication, Role};
use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::{
    NodePlacement, NodeReportRequest, NodeReportResponse, PlacementStatusResponse, PlacementStep, SplitShardRequest,
    TransferShardLeaderRequest,
};
use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::Request;

use basalt_storage::ShardState;

use crate::catalog::{Catalog, ReplicaMove, ShardDesc, META_GROUP};
use crate::forward::Forwarder;
use crate::placement::Placement;
use crate::replica_move;

/// Steps of one kind run together on at most this many shards.
pub const MAX_PARALLEL_STEPS: usize = 4;
/// Steps kept for `cluster status`.
const HISTORY: usize = 64;
/// How long one member's report may take.
const REPORT_TIMEOUT: Duration = Duration::from_millis(800);
/// How long a driver-issued split or leader transfer may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one step sent to a shard's leader may take: adding a replica includes building and
/// sending a snapshot and catching up (bounded there by `NEWCOMER_TIMEOUT`, 60 s).
pub const PLACEMENT_STEP_TIMEOUT: Duration = Duration::from_secs(75);
/// A new driver balances leaders only after this long: shards are still electing before.
const LEADER_BALANCE_GRACE: Duration = Duration::from_secs(10);
/// Reports in a row over the load threshold before a shard is split for load.
const HOT_REPORTS: u32 = 2;
/// How long a live node may report no replica of a shard the catalog places on it before the
/// replica is re-created elsewhere. Long enough for a split's child to be opened everywhere (its
/// replicas open it as they apply the split) and for a newcomer's reconciler to open its replica.
const MISSING_GRACE: Duration = Duration::from_secs(5);

/// The driver's knobs (flags of `basaltd`; see `config.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementConfig {
    pub interval: Duration,
    /// Split a shard holding more than this many bytes (keys and values); 0 disables.
    pub split_bytes: u64,
    /// Split a shard serving more than this many requests per second; 0 disables.
    pub split_qps: u64,
    /// A member that has not reported for this long is dead: its replicas are re-created.
    pub dead_after: Duration,
    /// Merge adjacent range shards holding less than this many bytes together; 0 disables.
    /// At most half of `split_bytes` (checked by the configuration), so a merge never makes a
    /// shard that the next round splits again.
    pub merge_bytes: u64,
    /// How long a pair must stay mergeable before it is merged.
    pub merge_delay: Duration,
    /// Move replicas and leaders to even out the nodes.
    pub rebalance: bool,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            split_bytes: 64 << 20,
            split_qps: 2_000,
            merge_bytes: 16 << 20,
            merge_delay: Duration::from_secs(60),
            dead_after: Duration::from_secs(60),
            rebalance: true,
        }
    }
}

#[derive(Default)]
struct DriverState {
    /// When this node became the driver (None while it is not the meta leader).
    leading_since: Option<Instant>,
    last_seen: HashMap<u64, Instant>,
    reports: HashMap<u64, NodeReportResponse>,
    /// Shard → reports in a row over the load threshold.
    hot: HashMap<u64, u32>,
    /// (left, right) → since when the adjacent pair has been small and cool enough to merge.
    mergeable_since: HashMap<(u64, u64), Instant>,
    /// (shard, node) → since when a live node the catalog names as a replica of the shard has
    /// reported holding none.
    missing_since: HashMap<(u64, u64), Instant>,
    steps: VecDeque<PlacementStep>,
}

pub struct Driver {
    placement: Placement,
    peers: PeerClients,
    forwarder: Forwarder,
    cfg: PlacementConfig,
    state: Mutex<DriverState>,
}

/// What the driver decided to do in a round.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Move {
        shard: u64,
        m: ReplicaMove,
        why: String,
    },
    Abort {
        shard: u64,
        m: ReplicaMove,
        why: String,
    },
    Split {
        shard: u64,
        why: String,
    },
    /// Record in the catalog a split that shard `shard` applied but the catalog missed (its
    /// driver died or timed out between the split and the record).
    RecordSplit {
        shard: u64,
        child: u64,
        left: ShardState,
        right: ShardState,
        why: String,
    },
    /// Merge `right` into its left neighbour `shard`.
    Merge {
        shard: u64,
        right: u64,
        why: String,
    },
    TransferLeader {
        shard: u64,
        from: u64,
        to: u64,
        why: String,
    },
}

impl Step {
    fn shard(&self) -> u64 {
        match self {
            Step::Move { shard, .. }
            | Step::Abort { shard, .. }
            | Step::Split { shard, .. }
            | Step::RecordSplit { shard, .. }
            | Step::Merge { shard, .. }
            | Step::TransferLeader { shard, .. } => *shard,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Driver {
    pub fn new(placement: Placement, peers: PeerClients, forwarder: Forwarder, cfg: PlacementConfig) -> Arc<Self> {
        Arc::new(Self {
            placement,
            peers,
            forwarder: forwarder.with_timeout(PLACEMENT_STEP_TIMEOUT),
            cfg,
            state: Mutex::new(DriverState::default()),
        })
    }

    pub fn config(&self) -> &PlacementConfig {
        &self.cfg
    }

    /// Runs rounds until `shutdown` fires; a round does nothing unless this node leads the meta
    /// group.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.interval) => {}
                _ = shutdown.changed() => return,
            }
            if self.placement.meta().status().role != Role::Leader {
                let mut st = self.state.lock();
                st.leading_since = None;
                st.reports.clear();
                continue;
            }
            self.round().await;
        }
    }

    async fn round(&self) {
        let members = self.placement.addresses();
        {
            let mut st = self.state.lock();
            if st.leading_since.is_none() {
                let now = Instant::now();
                st.leading_since = Some(now);
                st.last_seen = members.keys().map(|id| (*id, now)).collect();
                st.hot.clear();
                st.mergeable_since.clear();
                st.missing_since.clear();
                tracing::info!("placement driver started on this node");
            }
        }
        self.collect_reports(&members).await;
        let cat = match self.placement.catalog() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "placement driver could not read the catalog");
                return;
            }
        };
        let steps = {
            let mut st = self.state.lock();
            let live = self.live_members(&st, &members);
            plan(&cat, &members, &live, &mut st, &self.cfg)
        };
        if steps.is_empty() {
            return;
        }
        let runs = steps.into_iter().map(|s| self.execute(s));
        futures::future::join_all(runs).await;
    }

    async fn collect_reports(&self, members: &BTreeMap<u64, String>) {
        let asks = members.iter().map(|(id, addr)| async move {
            let ch = self.peers.channel(addr).ok()?;
            let mut req = Request::new(NodeReportRequest {});
            req.set_timeout(REPORT_TIMEOUT);
            let r = tokio::time::timeout(REPORT_TIMEOUT, AdminClient::new(ch).node_report(req)).await;
            match r {
                Ok(Ok(r)) => Some((*id, r.into_inner())),
                Ok(Err(e)) => {
                    tracing::debug!(node = id, error = %e, "no report");
                    None
                }
                Err(_) => None,
            }
        });
        let got = futures::future::join_all(asks).await;
        let now = Instant::now();
        let mut st = self.state.lock();
        st.reports.retain(|id, _| members.contains_key(id));
        for (id, report) in got.into_iter().flatten() {
            st.last_seen.insert(id, now);
            st.reports.insert(id, report);
        }
    }

    /// Members that reported within `dead_after` (or since this driver started, if sooner).
    fn live_members(&self, st: &DriverState, members: &BTreeMap<u64, String>) -> Vec<u64> {
        let since = st.leading_since.unwrap_or_else(Instant::now);
        members
            .keys()
            .copied()
            .filter(|id| {
                let seen = st.last_seen.get(id).copied().unwrap_or(since);
                seen.elapsed() < self.cfg.dead_after
            })
            .collect()
    }

    fn record(&self, step: &Step, state: &str, detail: String) {
        let (kind, shard, from, to) = match step {
            Step::Move { shard, m, .. } => ("move", *shard, m.from, m.to),
            Step::Abort { shard, m, .. } => ("abandon-move", *shard, m.from, m.to),
            Step::Split { shard, .. } => ("split", *shard, 0, 0),
            Step::Merge { shard, right, .. } => ("merge", *shard, *right, *shard),
            Step::RecordSplit { shard, child, .. } => ("record-split", *shard, 0, *child),
            Step::TransferLeader { shard, from, to, .. } => ("leader-transfer", *shard, *from, *to),
        };
        let mut st = self.state.lock();
        let running = st
            .steps
            .iter_mut()
            .find(|s| s.state == "running" && s.kind == kind && s.shard_id == shard);
        match running {
            Some(s) => {
                s.state = state.to_string();
                s.detail = detail;
                s.finished_at_ms = now_ms();
            }
            None => {
                st.steps.push_front(PlacementStep {
                    kind: kind.to_string(),
                    shard_id: shard,
                    from_node: from,
                    to_node: to,
                    state: state.to_string(),
                    detail,
                    started_at_ms: now_ms(),
                    finished_at_ms: 0,
                });
                st.steps.truncate(HISTORY);
            }
        }
    }

    async fn execute(&self, step: Step) {
        let why = match &step {
            Step::Move { why, .. } | Step::Abort { why, .. } | Step::Split { why, .. } | Step::Merge { why, .. } => {
                why.clone()
            }
            Step::TransferLeader { why, .. } | Step::RecordSplit { why, .. } => why.clone(),
        };
        self.record(&step, "running", why.clone());
        tracing::info!(?step, "placement step");
        let result: Result<(), String> = match &step {
            Step::Move { shard, m, .. } => {
                let r = match self
                    .placement
                    .catalog()
                    .ok()
                    .and_then(|c| c.shards.get(shard).and_then(|d| d.moving))
                {
                    Some(current) if current == *m => {
                        replica_move::continue_move(&self.placement, &self.forwarder, *shard, *m).await
                    }
                    _ => replica_move::move_replica(&self.placement, &self.forwarder, *shard, m.from, m.to).await,
                };
                r.map(|_| ()).map_err(|e| e.to_string())
            }
            Step::Abort { shard, m, .. } => replica_move::abort_move(&self.placement, &self.forwarder, *shard, *m)
                .await
                .map_err(|e| e.to_string()),
            Step::Split { shard, .. } => self.split(*shard).await,
            Step::RecordSplit {
                shard,
                child,
                left,
                right,
                ..
            } => self
                .placement
                .record_split(*shard, *child, left.clone(), right.clone())
                .await
                .map_err(|e| e.to_string()),
            Step::Merge { shard, right, .. } => crate::merge::merge_shard(&self.placement, *shard, Some(*right))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Step::TransferLeader { shard, from, to, .. } => self.transfer_leader(*shard, *from, *to).await,
        };
        match result {
            Ok(()) => self.record(&step, "done", why),
            Err(e) => {
                tracing::warn!(?step, error = %e, "placement step failed");
                self.record(&step, "failed", e);
            }
        }
    }

    /// Splits through this node's own Admin service (`SplitShard`), the one implementation of the
    /// split protocol, at the address the cluster knows this node by.
    async fn split(&self, shard: u64) -> Result<(), String> {
        let me = self.placement.node_id();
        let addr = self
            .placement
            .addresses()
            .get(&me)
            .cloned()
            .ok_or_else(|| format!("node {me} is not a member"))?;
        let ch = self.peers.channel(&addr).map_err(|e| e.to_string())?;
        let mut req = Request::new(SplitShardRequest {
            shard_id: shard,
            ..Default::default()
        });
        req.set_timeout(STEP_TIMEOUT);
        AdminClient::new(ch)
            .split_shard(req)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    async fn transfer_leader(&self, shard: u64, from: u64, to: u64) -> Result<(), String> {
        let addr = self
            .placement
            .addresses()
            .get(&from)
            .cloned()
            .ok_or_else(|| format!("node {from} is no longer a member"))?;
        let ch = self.peers.channel(&addr).map_err(|e| e.to_string())?;
        let mut req = Request::new(TransferShardLeaderRequest {
            shard_id: shard,
            to_node: to,
        });
        req.set_timeout(STEP_TIMEOUT);
        AdminClient::new(ch)
            .transfer_shard_leader(req)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    /// The node whose latest report (at most one driver round old) says it leads `shard`:
    /// what a listing on the meta leader shows for a shard it holds no replica of. `None` off
    /// the meta leader, or while no report names a leader. If two reports claim the shard (a
    /// leadership that moved between them) the one with the higher applied index wins, being
    /// the more recent.
    pub fn reported_leader(&self, shard: u64) -> Option<u64> {
        reported_leader(&self.state.lock(), shard)
    }

    /// The driver's view for `basaltctl cluster status`.
    pub fn status(&self, node_id: u64) -> PlacementStatusResponse {
        let members = self.placement.addresses();
        let cat = self.placement.cached().ok();
        let st = self.state.lock();
        let live = self.live_members(&st, &members);
        let mut replicas: BTreeMap<u64, u32> = members.keys().map(|id| (*id, 0)).collect();
        if let Some(cat) = &cat {
            for r in cat.shards.values().flat_map(|d| &d.replicas) {
                *replicas.entry(*r).or_default() += 1;
            }
        }
        let nodes = replicas
            .into_iter()
            .map(|(id, count)| NodePlacement {
                node_id: id,
                replicas: count,
                leaders: st
                    .reports
                    .get(&id)
                    .map_or(0, |r| r.shards.iter().filter(|s| s.leader).count() as u32),
                state: if !members.contains_key(&id) {
                    "removed"
                } else if live.contains(&id) {
                    "live"
                } else {
                    "dead"
                }
                .to_string(),
                last_report_ms: st
                    .last_seen
                    .get(&id)
                    .map_or(u64::MAX, |t| t.elapsed().as_millis() as u64),
            })
            .collect();
        let mut steps: Vec<PlacementStep> = st.steps.iter().cloned().collect();
        steps.sort_by_key(|s| (s.state != "running", std::cmp::Reverse(s.started_at_ms)));
        PlacementStatusResponse {
            header: None,
            driver_node: if st.leading_since.is_some() { node_id } else { 0 },
            nodes,
            steps,
        }
    }
}

/// The shards counted against each node: its replicas, plus those it is receiving.
/// See [`Driver::reported_leader`].
fn reported_leader(st: &DriverState, shard: u64) -> Option<u64> {
    st.leading_since?;
    st.reports
        .iter()
        .filter_map(|(node, r)| {
            r.shards
                .iter()
                .find(|l| l.shard_id == shard && l.leader)
                .map(|l| (l.applied_index, *node))
        })
        .max()
        .map(|(_, node)| node)
}

fn replica_counts(cat: &Catalog, nodes: &[u64]) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for d in cat.shards.values().filter(|d| d.id != META_GROUP) {
        for r in d.replicas.iter().chain(d.moving.iter().map(|m| &m.to)) {
            if let Some(c) = counts.get_mut(r) {
                *c += 1;
            }
        }
    }
    counts
}

/// The live node without a replica of `d` that holds the fewest replicas (ties by id).
fn emptiest_target(d: &ShardDesc, counts: &BTreeMap<u64, usize>) -> Option<u64> {
    counts
        .iter()
        .filter(|(n, _)| !d.names(**n))
        .min_by_key(|(n, c)| (**c, **n))
        .map(|(n, _)| *n)
}

/// Decides this round's steps (see the module docs for the order). Pure but for `st.hot`, the
/// load streaks it updates, so it is tested without a cluster.
fn plan(
    cat: &Catalog,
    members: &BTreeMap<u64, String>,
    live: &[u64],
    st: &mut DriverState,
    cfg: &PlacementConfig,
) -> Vec<Step> {
    let data: Vec<&ShardDesc> = cat.shards.values().filter(|d| d.id != META_GROUP).collect();
    let is_live = |n: &u64| live.contains(n);

    // 0. Splits the shards applied but the catalog missed come first: every other step reads
    // the catalog's ranges, and a move planned on a stale range cannot open its newcomer.
    let repairs = missed_splits(cat, st);
    if !repairs.is_empty() {
        return repairs;
    }

    // 1. Moves under way.
    let mut steps: Vec<Step> = data
        .iter()
        .filter_map(|d| {
            let m = d.moving?;
            if is_live(&m.to) {
                Some(Step::Move {
                    shard: d.id,
                    m,
                    why: "finishing a move under way".into(),
                })
            } else {
                Some(Step::Abort {
                    shard: d.id,
                    m,
                    why: format!("node {} is no longer live", m.to),
                })
            }
        })
        .take(MAX_PARALLEL_STEPS)
        .collect();
    if !steps.is_empty() {
        return steps;
    }

    // 2. Re-replication, of replicas on dead or removed nodes and of replicas their live node
    // does not hold (see `missing_replicas`).
    let missing = missing_replicas(cat, live, st, cfg.interval * 3);
    tracing::debug!(?missing, pending = ?st.missing_since, "replicas their nodes do not hold");
    let mut counts = replica_counts(cat, live);
    for d in &data {
        if steps.len() == MAX_PARALLEL_STEPS {
            break;
        }
        let lost = d.replicas.iter().copied().find(|r| !is_live(r));
        let absent = d.replicas.iter().copied().find(|r| missing.contains(&(d.id, *r)));
        let Some(lost) = lost.or(absent) else {
            continue;
        };
        if cat.in_merge(d.id) {
            continue; // The merge ends first (see the module docs).
        }
        let Some(to) = emptiest_target(d, &counts) else {
            continue; // Nowhere to go: as many replicas as live nodes already.
        };
        *counts.entry(to).or_default() += 1;
        let why = if is_live(&lost) {
            format!("node {lost} has reported no replica of the shard for {MISSING_GRACE:?}")
        } else if members.contains_key(&lost) {
            format!("node {lost} has not reported for {:?}", cfg.dead_after)
        } else {
            format!("node {lost} was removed from the cluster")
        };
        steps.push(Step::Move {
            shard: d.id,
            m: ReplicaMove { from: lost, to },
            why,
        });
    }
    if !steps.is_empty() {
        return steps;
    }

    // 3. Splits, judged on each shard's leader's report.
    let mut leaders: BTreeMap<u64, (u64, &basalt_proto::v1::ShardLoad)> = BTreeMap::new();
    for (node, report) in &st.reports {
        for s in report.shards.iter().filter(|s| s.leader) {
            leaders.insert(s.shard_id, (*node, s));
        }
    }
    let mut hot_now = HashMap::new();
    for d in &data {
        let Some((_, load)) = leaders.get(&d.id) else { continue };
        if cfg.split_qps > 0 && load.requests_per_second > cfg.split_qps as f64 {
            hot_now.insert(d.id, st.hot.get(&d.id).copied().unwrap_or(0) + 1);
        }
    }
    st.hot = hot_now;
    for d in &data {
        let Some((_, load)) = leaders.get(&d.id) else { continue };
        if load.epoch != d.shard.epoch || cat.in_merge(d.id) {
            continue; // The catalog has not caught up with a split of this shard yet.
        }
        let why = if cfg.split_bytes > 0 && load.approximate_bytes > cfg.split_bytes {
            format!(
                "{} bytes, over the split size {}",
                load.approximate_bytes, cfg.split_bytes
            )
        } else if st.hot.get(&d.id).copied().unwrap_or(0) >= HOT_REPORTS {
            format!(
                "{:.0} requests/s, over the split load {}",
                load.requests_per_second, cfg.split_qps
            )
        } else {
            continue;
        };
        if d.shard.hashed && hash_width(d) < 2 {
            continue;
        }
        st.hot.remove(&d.id);
        steps.push(Step::Split { shard: d.id, why });
        if steps.len() == MAX_PARALLEL_STEPS {
            break;
        }
    }
    if steps.is_empty() {
        steps.extend(plan_merge(cat, &leaders, &mut st.mergeable_since, cfg));
    } else {
        st.mergeable_since.clear();
    }
    // Splits and merges never wait for balancing or the reverse (under a steady load some shard
    // is always due a split), so one of each may run in a round, on different shards.
    let splitting: Vec<u64> = steps
        .iter()
        .flat_map(|s| match s {
            Step::Merge { shard, right, .. } => vec![*shard, *right],
            other => vec![other.shard()],
        })
        .collect();
    if !cfg.rebalance || live.len() < 2 {
        return steps;
    }
    // 4. Replica balance.
    let counts = replica_counts(cat, live);
    if let (Some((&full, &most)), Some((&empty, &least))) = (
        counts.iter().max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n))),
        counts.iter().min_by_key(|(n, c)| (**c, **n)),
    ) {
        if most >= least + 2 {
            if let Some(d) = data.iter().find(|d| {
                d.moving.is_none()
                    && d.replicas.contains(&full)
                    && !d.names(empty)
                    && !splitting.contains(&d.id)
                    && !cat.in_merge(d.id)
            }) {
                steps.push(Step::Move {
                    shard: d.id,
                    m: ReplicaMove { from: full, to: empty },
                    why: format!("node {full} holds {most} replicas, node {empty} {least}"),
                });
            }
        }
    }
    // 5. Leader balance, among the shards whose leader reported.
    let mut led: BTreeMap<u64, Vec<u64>> = live.iter().map(|n| (*n, Vec::new())).collect();
    for (shard, (node, _)) in &leaders {
        if *shard != META_GROUP {
            if let Some(v) = led.get_mut(node) {
                v.push(*shard);
            }
        }
    }
    let (Some((&busy, busy_shards)), Some((&idle, idle_shards))) = (
        led.iter().max_by_key(|(n, v)| (v.len(), std::cmp::Reverse(**n))),
        led.iter().min_by_key(|(n, v)| (v.len(), **n)),
    ) else {
        return steps;
    };
    // Leadership moves cost a short pause on the shard, so only a clear excess is corrected: the
    // busiest node leads more than its even share and 2 more than the idlest. Right after a
    // driver starts, shards are still electing; their leaders settle first.
    let total: usize = led.values().map(Vec::len).sum();
    let even_share = total.div_ceil(led.len().max(1));
    let settled = st.leading_since.is_some_and(|t| t.elapsed() >= LEADER_BALANCE_GRACE);
    if !settled || busy_shards.len() <= even_share || busy_shards.len() < idle_shards.len() + 2 {
        return steps;
    }
    let candidate = busy_shards.iter().find(|s| {
        !splitting.contains(s)
            && !cat.in_merge(**s)
            && cat
                .shards
                .get(s)
                .is_some_and(|d| d.moving.is_none() && d.replicas.contains(&idle))
    });
    if let Some(&shard) = candidate {
        steps.push(Step::TransferLeader {
            shard,
            from: busy,
            to: idle,
            why: format!(
                "node {busy} leads {} shards, node {idle} {}",
                busy_shards.len(),
                idle_shards.len()
            ),
        });
    }
    steps
}

/// (shard, node) pairs where a live node the catalog names as a replica has reported holding
/// no replica of the shard for [`MISSING_GRACE`]. Such a replica is a member of the group that
/// holds nothing: its node lost the parent before applying the split that would have created it
/// (a move or a merge retired the parent first), or lost the replica itself. Re-creating it
/// elsewhere through a move gives the group its replication factor back; the move's removal
/// step takes the empty member out of the group's configuration. Updates `st.missing_since`.
/// Only reports received within `fresh` count: an old report says nothing about replicas the
/// node has opened since.
fn missing_replicas(cat: &Catalog, live: &[u64], st: &mut DriverState, fresh: Duration) -> Vec<(u64, u64)> {
    let now = Instant::now();
    let mut since = HashMap::new();
    for d in cat.shards.values() {
        if d.id == META_GROUP || d.moving.is_some() || cat.in_merge(d.id) {
            continue;
        }
        for node in d.replicas.iter().filter(|n| live.contains(n)) {
            let Some(report) = st.reports.get(node) else { continue };
            let recent = st.last_seen.get(node).is_some_and(|t| t.elapsed() < fresh);
            if !recent || report.shards.iter().any(|s| s.shard_id == d.id) {
                continue;
            }
            let first = st.missing_since.get(&(d.id, *node)).copied().unwrap_or(now);
            since.insert((d.id, *node), first);
        }
    }
    st.missing_since = since;
    st.missing_since
        .iter()
        .filter(|(_, t)| t.elapsed() >= MISSING_GRACE)
        .map(|(k, _)| *k)
        .collect()
}

/// Splits that shards applied and the catalog does not record. A shard's leader reporting a
/// newer epoch and a range that is a strict prefix of the catalog's, while some replica reports
/// an uncatalogued group at the same epoch starting where that prefix ends, split there: the
/// split gives both halves the same new epoch, and nothing else shrinks a shard from the right
/// (a merge grows it, a freeze keeps its range). The right half is recorded to the parent's old
/// end; if the child split again since, its own leader's report repairs that the next round.
fn missed_splits(cat: &Catalog, st: &DriverState) -> Vec<Step> {
    use basalt_proto::v1::ShardLoad;
    let all: Vec<&ShardLoad> = st.reports.values().flat_map(|r| &r.shards).collect();
    let mut steps = Vec::new();
    for l in all.iter().filter(|l| l.leader) {
        let Some(d) = cat.shards.get(&l.shard_id) else { continue };
        let shrunk = l.start.as_ref() == d.shard.start.as_slice() && l.end.as_ref() < d.shard.end.as_slice();
        if l.epoch <= d.shard.epoch || !shrunk || cat.in_merge(d.id) || d.id == META_GROUP {
            continue;
        }
        let Some(child) = all.iter().find(|c| {
            !cat.shards.contains_key(&c.shard_id)
                && c.keyspace_id == l.keyspace_id
                && c.epoch == l.epoch
                && c.start == l.end
        }) else {
            continue;
        };
        let half = |start: &[u8], end: &[u8]| ShardState {
            keyspace: d.shard.keyspace,
            hashed: d.shard.hashed,
            start: start.to_vec(),
            end: end.to_vec(),
            epoch: l.epoch,
            frozen: false,
        };
        steps.push(Step::RecordSplit {
            shard: d.id,
            child: child.shard_id,
            left: half(&l.start, &l.end),
            right: half(&l.end, &d.shard.end),
            why: format!(
                "shard {} applied a split into group {} at epoch {} that the catalog (epoch {}) missed",
                d.id, child.shard_id, l.epoch, d.shard.epoch
            ),
        });
        if steps.len() == MAX_PARALLEL_STEPS {
            break;
        }
    }
    steps
}

/// At most one merge: the first adjacent pair of a range keyspace that has been small and cool
/// for `merge_delay` (see the module docs). Tracks the candidate pairs in `mergeable_since`.
fn plan_merge(
    cat: &Catalog,
    leaders: &BTreeMap<u64, (u64, &basalt_proto::v1::ShardLoad)>,
    mergeable_since: &mut HashMap<(u64, u64), Instant>,
    cfg: &PlacementConfig,
) -> Option<Step> {
    if cfg.merge_bytes == 0 {
        mergeable_since.clear();
        return None;
    }
    // A pair is judged only on current reports from both leaders, at the catalog's epochs.
    let load_of = |d: &ShardDesc| leaders.get(&d.id).map(|(_, l)| *l).filter(|l| l.epoch == d.shard.epoch);
    let cool_qps = if cfg.split_qps > 0 {
        cfg.split_qps as f64 / 2.0
    } else {
        f64::INFINITY
    };
    let mut candidates = Vec::new();
    for ks in cat.keyspaces.values().filter(|k| !k.hashed) {
        for pair in cat.shards_of(ks.id).windows(2) {
            let (l, r) = (pair[0], pair[1]);
            let free = |d: &ShardDesc| d.moving.is_none() && !cat.in_merge(d.id) && d.id != META_GROUP;
            if !free(l) || !free(r) || l.shard.end != r.shard.start {
                continue;
            }
            let (Some(ll), Some(rl)) = (load_of(l), load_of(r)) else {
                continue;
            };
            let bytes = ll.approximate_bytes.saturating_add(rl.approximate_bytes);
            let qps = ll.requests_per_second + rl.requests_per_second;
            if bytes < cfg.merge_bytes && qps < cool_qps {
                candidates.push((l.id, r.id, bytes, qps));
            }
        }
    }
    let now = Instant::now();
    let since: HashMap<(u64, u64), Instant> = candidates
        .iter()
        .map(|(l, r, ..)| {
            let t = mergeable_since.get(&(*l, *r)).copied().unwrap_or(now);
            ((*l, *r), t)
        })
        .collect();
    *mergeable_since = since;
    let (l, r, bytes, qps) = candidates
        .into_iter()
        .find(|(l, r, ..)| mergeable_since[&(*l, *r)].elapsed() >= cfg.merge_delay)?;
    mergeable_since.remove(&(l, r));
    Some(Step::Merge {
        shard: l,
        right: r,
        why: format!(
            "together {bytes} bytes and {qps:.0} requests/s, under the merge size {} for {:?}",
            cfg.merge_bytes, cfg.merge_delay
        ),
    })
}

/// How many hash values a hash shard covers (a shard of one value cannot split).
fn hash_width(d: &ShardDesc) -> u32 {
    let lo = crate::placement::hash_of_bound(&d.shard, &d.shard.start);
    let hi = crate::placement::hash_of_bound(&d.shard, &d.shard.end);
    hi.saturating_sub(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_proto::v1::ShardLoad;
    use basalt_storage::ShardState;

    fn shard(id: u64, replicas: &[u64]) -> ShardDesc {
        let mut start = vec![0, 0, 0, 9];
        start.extend_from_slice(&id.to_be_bytes());
        let mut end = start.clone();
        end.push(0xff);
        ShardDesc {
            id,
            shard: ShardState {
                keyspace: 9,
                hashed: false,
                start,
                end,
                epoch: 1,
                frozen: false,
            },
            replicas: replicas.to_vec(),
            bootstrap: false,
            moving: None,
            merge: None,
        }
    }

    fn catalog(shards: Vec<ShardDesc>) -> Catalog {
        let mut c = Catalog::default();
        c.shards = shards.into_iter().map(|s| (s.id, s)).collect();
        c
    }

    fn members(ids: &[u64]) -> BTreeMap<u64, String> {
        ids.iter().map(|id| (*id, format!("10.0.0.{id}:7379"))).collect()
    }

    fn report(node: u64, led: &[(u64, u64, f64)]) -> NodeReportResponse {
        NodeReportResponse {
            node_id: node,
            shards: led
                .iter()
                .map(|(id, bytes, rps)| ShardLoad {
                    shard_id: *id,
                    leader: true,
                    applied_index: 1,
                    approximate_bytes: *bytes,
                    approximate_keys: 1,
                    requests_per_second: *rps,
                    epoch: 1,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn listings_name_the_leader_the_freshest_report_claims() {
        let mut st = settled_state();
        assert_eq!(reported_leader(&st, 10), None, "no reports yet");
        st.reports.insert(1, report(1, &[(10, 0, 0.0)]));
        st.reports.insert(2, report(2, &[(11, 0, 0.0)]));
        assert_eq!(reported_leader(&st, 10), Some(1));
        assert_eq!(reported_leader(&st, 11), Some(2));
        assert_eq!(reported_leader(&st, 12), None, "nobody leads it");
        // Leadership moved between two reports: the higher applied index is the later view.
        let mut newer = report(3, &[(10, 0, 0.0)]);
        newer.shards[0].applied_index = 7;
        st.reports.insert(3, newer);
        assert_eq!(reported_leader(&st, 10), Some(3));
        st.leading_since = None;
        assert_eq!(
            reported_leader(&st, 10),
            None,
            "a node that is not the driver knows nothing"
        );
    }

    fn settled_state() -> DriverState {
        DriverState {
            leading_since: Some(Instant::now() - LEADER_BALANCE_GRACE * 2),
            ..Default::default()
        }
    }

    /// Shards 10.. of keyspace 9 (`hashed` as given), adjacent: shard i ends where i + 1 starts.
    fn adjacent(count: u64, hashed: bool) -> Catalog {
        let bound = |i: u64| {
            let mut b = vec![0, 0, 0, 9];
            b.extend_from_slice(&i.to_be_bytes());
            b
        };
        let shards = (0..count)
            .map(|i| {
                let mut d = shard(10 + i, &[1, 2, 3]);
                d.shard.start = bound(i);
                d.shard.end = bound(i + 1);
                d.shard.hashed = hashed;
                d
            })
            .collect();
        let mut cat = catalog(shards);
        cat.keyspaces.insert(
            "ks".into(),
            crate::catalog::KeyspaceDesc {
                name: "ks".into(),
                id: 9,
                hashed,
                replicas: 3,
                initial_shards: 1,
                default_read: Default::default(),
            },
        );
        cat
    }

    fn merge_cfg(delay: Duration) -> PlacementConfig {
        PlacementConfig {
            split_bytes: 1000,
            split_qps: 100,
            merge_bytes: 250,
            merge_delay: delay,
            rebalance: false,
            ..Default::default()
        }
    }

    fn merges(steps: &[Step]) -> Vec<(u64, u64)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Merge { shard, right, .. } => Some((*shard, *right)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn small_cool_neighbours_merge_once_they_stay_so_for_the_delay() {
        let cat = adjacent(3, false);
        let nodes = members(&[1, 2, 3]);
        let mut st = settled_state();
        // 10+11 are too big together, 11+12 are small, but 12 is busy.
        st.reports
            .insert(1, report(1, &[(10, 200, 0.0), (11, 100, 1.0), (12, 100, 60.0)]));
        assert!(plan(&cat, &nodes, &[1, 2, 3], &mut st, &merge_cfg(Duration::ZERO)).is_empty());
        // Once 12 cools down, 11+12 qualify; with a delay, not at first sight.
        st.reports
            .insert(1, report(1, &[(10, 200, 0.0), (11, 100, 1.0), (12, 100, 10.0)]));
        let cfg = merge_cfg(Duration::from_millis(200));
        assert!(plan(&cat, &nodes, &[1, 2, 3], &mut st, &cfg).is_empty());
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(merges(&plan(&cat, &nodes, &[1, 2, 3], &mut st, &cfg)), vec![(11, 12)]);
        // A pair that stops qualifying starts its delay over.
        let mut st = settled_state();
        st.reports.insert(1, report(1, &[(10, 100, 0.0), (11, 100, 0.0)]));
        let cat = adjacent(2, false);
        assert!(plan(&cat, &nodes, &[1, 2, 3], &mut st, &cfg).is_empty());
        st.reports.insert(1, report(1, &[(10, 100, 0.0), (11, 500, 0.0)]));
        assert!(plan(&cat, &nodes, &[1, 2, 3], &mut st, &cfg).is_empty());
        std::thread::sleep(Duration::from_millis(250));
        st.reports.insert(1, report(1, &[(10, 100, 0.0), (11, 100, 0.0)]));
        assert!(
            plan(&cat, &nodes, &[1, 2, 3], &mut st, &cfg).is_empty(),
            "the delay restarted"
        );
    }

    #[test]
    fn no_automatic_merge_of_hash_shards_moving_shards_or_on_stale_reports() {
        let nodes = members(&[1, 2, 3]);
        let cfg = merge_cfg(Duration::ZERO);
        let small = report(1, &[(10, 10, 0.0), (11, 10, 0.0)]);
        let mut st = settled_state();
        st.reports.insert(1, small.clone());
        assert!(plan(&adjacent(2, true), &nodes, &[1, 2, 3], &mut st, &cfg).is_empty());
        // A move under way is finished first, and its shard is not merged meanwhile.
        let mut cat = adjacent(2, false);
        cat.shards.get_mut(&11).expect("shard 11").moving = Some(ReplicaMove { from: 3, to: 1 });
        let steps = plan(&cat, &nodes, &[1, 2, 3], &mut st, &cfg);
        assert!(matches!(steps.as_slice(), [Step::Move { shard: 11, .. }]), "{steps:?}");
        // A report from an older epoch of a shard says nothing about it now.
        let mut stale = small.clone();
        stale.shards[1].epoch = 0;
        st.reports.insert(1, stale);
        assert!(plan(&adjacent(2, false), &nodes, &[1, 2, 3], &mut st, &cfg).is_empty());
        // Disabled with merge_bytes = 0.
        st.reports.insert(1, small);
        let off = PlacementConfig {
            merge_bytes: 0,
            ..cfg.clone()
        };
        assert!(plan(&adjacent(2, false), &nodes, &[1, 2, 3], &mut st, &off).is_empty());
        assert_eq!(
            merges(&plan(&adjacent(2, false), &nodes, &[1, 2, 3], &mut st, &cfg)),
            vec![(10, 11)]
        );
    }

    #[test]
    fn a_split_the_catalog_missed_is_recorded_before_anything_else() {
        // The catalog knows shard 10 as [b0, b1) at epoch 1; its group split at m into 10 and
        // group 12 (epoch 2), and a rebalance would be due too.
        let cat = adjacent(2, false);
        let d = cat.shards[&10].clone();
        let mut mid = d.shard.start.clone();
        mid.push(b'm');
        let load = |id: u64, leader: bool, start: &[u8], end: &[u8], epoch: u64| ShardLoad {
            shard_id: id,
            leader,
            epoch,
            keyspace_id: 9,
            start: start.to_vec().into(),
            end: end.to_vec().into(),
            ..Default::default()
        };
        let mut st = settled_state();
        st.reports.insert(
            1,
            NodeReportResponse {
                node_id: 1,
                shards: vec![load(10, true, &d.shard.start, &mid, 2)],
            },
        );
        st.reports.insert(
            2,
            NodeReportResponse {
                node_id: 2,
                shards: vec![load(12, false, &mid, &d.shard.end, 2)],
            },
        );
        let steps = plan(
            &cat,
            &members(&[1, 2, 3, 4]),
            &[1, 2, 3, 4],
            &mut st,
            &PlacementConfig::default(),
        );
        let [Step::RecordSplit {
            shard: 10,
            child: 12,
            left,
            right,
            ..
        }] = steps.as_slice()
        else {
            panic!("{steps:?}");
        };
        assert_eq!(
            (left.start.clone(), left.end.clone(), left.epoch),
            (d.shard.start.clone(), mid.clone(), 2)
        );
        assert_eq!(
            (right.start.clone(), right.end.clone(), right.epoch),
            (mid.clone(), d.shard.end.clone(), 2)
        );
        // A freeze (same range, newer epoch) is not a split.
        st.reports.insert(
            1,
            NodeReportResponse {
                node_id: 1,
                shards: vec![load(10, true, &d.shard.start, &d.shard.end, 2)],
            },
        );
        let steps = plan(
            &cat,
            &members(&[1, 2, 3]),
            &[1, 2, 3],
            &mut st,
            &PlacementConfig::default(),
        );
        assert!(
            steps.iter().all(|s| !matches!(s, Step::RecordSplit { .. })),
            "{steps:?}"
        );
    }

    #[test]
    fn shards_in_a_merge_are_neither_re_replicated_nor_rebalanced() {
        let mut cat = adjacent(2, false);
        cat.shards.get_mut(&11).expect("shard 11").merge = Some(crate::catalog::MergeMark {
            into: 10,
            left_epoch: 1,
            right_epoch: 1,
        });
        assert!(cat.in_merge(10) && cat.in_merge(11));
        let mut st = settled_state();
        // Node 3 is dead: both of its replicas wait for the merge to end.
        let steps = plan(
            &cat,
            &members(&[1, 2, 3, 4]),
            &[1, 2, 4],
            &mut st,
            &PlacementConfig::default(),
        );
        assert!(steps.is_empty(), "{steps:?}");
    }

    #[test]
    fn a_dead_nodes_replicas_go_to_the_emptiest_live_nodes_first() {
        let cat = catalog(vec![
            shard(10, &[1, 2, 3]),
            shard(11, &[1, 2, 4]),
            shard(12, &[2, 3, 4]),
        ]);
        let mut st = settled_state();
        let steps = plan(
            &cat,
            &members(&[1, 2, 3, 4, 5]),
            &[2, 3, 4, 5],
            &mut st,
            &PlacementConfig::default(),
        );
        // Node 1 is dead. Node 5 holds nothing, so it takes shard 10's copy; counting that, it
        // still holds the fewest (1) among the nodes without shard 11, so it takes that one too.
        let moves: Vec<(u64, u64, u64)> = steps
            .iter()
            .map(|s| match s {
                Step::Move { shard, m, .. } => (*shard, m.from, m.to),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(moves, vec![(10, 1, 5), (11, 1, 5)]);
        // A removed node (no longer a member) is treated the same.
        let steps = plan(
            &cat,
            &members(&[2, 3, 4, 5]),
            &[2, 3, 4, 5],
            &mut st,
            &PlacementConfig::default(),
        );
        assert_eq!(steps.len(), 2, "{steps:?}");
    }

    #[test]
    fn a_move_whose_newcomer_died_is_abandoned_and_blocks_other_steps() {
        let mut d = shard(10, &[1, 2, 3]);
        d.moving = Some(ReplicaMove { from: 1, to: 4 });
        let cat = catalog(vec![d, shard(11, &[1, 2, 3])]);
        let mut st = settled_state();
        let steps = plan(
            &cat,
            &members(&[1, 2, 3, 4]),
            &[1, 2, 3],
            &mut st,
            &PlacementConfig::default(),
        );
        assert!(matches!(steps.as_slice(), [Step::Abort { shard: 10, .. }]), "{steps:?}");
        let steps = plan(
            &cat,
            &members(&[1, 2, 3, 4]),
            &[1, 2, 3, 4],
            &mut st,
            &PlacementConfig::default(),
        );
        assert!(matches!(steps.as_slice(), [Step::Move { shard: 10, .. }]), "{steps:?}");
    }

    #[test]
    fn big_shards_split_and_busy_ones_only_after_two_hot_reports() {
        let cat = catalog(vec![shard(10, &[1, 2, 3]), shard(11, &[1, 2, 3])]);
        let cfg = PlacementConfig {
            split_bytes: 1000,
            split_qps: 100,
            rebalance: false,
            ..Default::default()
        };
        let mut st = settled_state();
        st.reports.insert(1, report(1, &[(10, 5000, 0.0), (11, 10, 0.0)]));
        let steps = plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut st, &cfg);
        assert!(matches!(steps.as_slice(), [Step::Split { shard: 10, .. }]), "{steps:?}");

        st.reports.insert(1, report(1, &[(10, 10, 0.0), (11, 10, 500.0)]));
        assert!(
            plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut st, &cfg).is_empty(),
            "one hot report is not enough"
        );
        let steps = plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut st, &cfg);
        assert!(matches!(steps.as_slice(), [Step::Split { shard: 11, .. }]), "{steps:?}");
        // A report from before the catalog recorded a split (older epoch) does not split again.
        let mut stale = report(1, &[(10, 5000, 0.0)]);
        stale.shards[0].epoch = 0;
        st.reports.insert(1, stale);
        assert!(plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut st, &cfg).is_empty());
    }

    #[test]
    fn a_new_node_receives_replicas_until_the_counts_are_within_one() {
        let mut shards: Vec<ShardDesc> = (10..16).map(|id| shard(id, &[1, 2, 3])).collect();
        let cfg = PlacementConfig::default();
        let mut st = settled_state();
        let mut moved = 0;
        loop {
            let cat = catalog(shards.clone());
            let steps = plan(&cat, &members(&[1, 2, 3, 4]), &[1, 2, 3, 4], &mut st, &cfg);
            let Some(Step::Move { shard, m, .. }) = steps.first() else {
                break;
            };
            let d = shards
                .iter_mut()
                .find(|d| d.id == *shard)
                .expect("planned shard exists");
            d.replicas.retain(|r| *r != m.from);
            d.replicas.push(m.to);
            moved += 1;
            assert!(moved < 20, "rebalancing does not converge");
        }
        let counts = replica_counts(&catalog(shards.clone()), &[1, 2, 3, 4]);
        let (min, max) = (counts.values().min().copied(), counts.values().max().copied());
        assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{counts:?}");
        assert_eq!(counts[&4], 4, "18 replicas over 4 nodes: the new one takes 4");
        assert!(shards.iter().all(|d| d.replicas.len() == 3));
    }

    #[test]
    fn leaders_move_only_from_a_clear_excess_and_only_once_settled() {
        let cat = catalog((10..16).map(|id| shard(id, &[1, 2, 3])).collect());
        let cfg = PlacementConfig::default();
        let leads_all = report(
            1,
            &[
                (10, 0, 0.0),
                (11, 0, 0.0),
                (12, 0, 0.0),
                (13, 0, 0.0),
                (14, 0, 0.0),
                (15, 0, 0.0),
            ],
        );
        let mut fresh = DriverState {
            leading_since: Some(Instant::now()),
            ..Default::default()
        };
        fresh.reports.insert(1, leads_all.clone());
        assert!(
            plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut fresh, &cfg).is_empty(),
            "not before the grace period"
        );
        let mut st = settled_state();
        st.reports.insert(1, leads_all);
        let steps = plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut st, &cfg);
        assert!(
            matches!(steps.as_slice(), [Step::TransferLeader { from: 1, to: 2, .. }]),
            "{steps:?}"
        );
        // 3, 2, 1 is corrected (to 2, 2, 2): the busiest leads more than its even share of 2.
        st.reports
            .insert(1, report(1, &[(10, 0, 0.0), (11, 0, 0.0), (12, 0, 0.0)]));
        st.reports.insert(2, report(2, &[(13, 0, 0.0), (14, 0, 0.0)]));
        st.reports.insert(3, report(3, &[(15, 0, 0.0)]));
        let steps = plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut st, &cfg);
        assert!(
            matches!(steps.as_slice(), [Step::TransferLeader { from: 1, to: 3, .. }]),
            "{steps:?}"
        );
        // With 7 shards, 3, 2, 2 is as even as it gets.
        let cat = catalog((10..17).map(|id| shard(id, &[1, 2, 3])).collect());
        st.reports.insert(3, report(3, &[(15, 0, 0.0), (16, 0, 0.0)]));
        let steps = plan(&cat, &members(&[1, 2, 3]), &[1, 2, 3], &mut st, &cfg);
        assert!(steps.is_empty(), "{steps:?}");
    }
}
