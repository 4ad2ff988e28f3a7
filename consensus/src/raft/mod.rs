//! The Raft implementation of [`Replication`], on openraft.
//!
//! A [`RaftGroup`] is one replica of one group on this node: the openraft instance with its log
//! store ([`log_store`]), state machine ([`state_machine`]) and network ([`network`]); incoming peer
//! traffic arrives through [`peer_service`]. Requests are bounded in time: a proposal or read
//! barrier that cannot finish (no quorum, a partitioned leader) fails after `request_timeout` with
//! an error that says whether anything may have happened, instead of hanging the caller.
//!
//! Bootstrapping is explicit and happens once: [`RaftGroup::initialize`] does nothing on a replica
//! that already has a vote or log, so restarting a node with its original `--initial-cluster`
//! resumes rather than re-forming the cluster.

pub mod blocking;
pub mod closed_time;
pub mod frames;
pub mod hibernation;
pub mod log_store;
pub mod network;
pub mod peer_service;
pub mod read_index;
pub mod reads;
pub mod state_machine;
pub mod types;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use basalt_storage::{Engine, GroupCommitWriter, KvStateMachine, RaftLog, ShardState, WriteRequest, WriteResponse};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ChangeMembershipError, ClientWriteError, LinearizableReadError, PreconditionFailed, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use parking_lot::{Mutex, RwLock};

use self::closed_time::{Closed, ClosedTime};
use self::hibernation::{HibernationConfig, Sleep, SleepCell};
use self::log_store::LogStore;
use self::network::{Network, PeerClients, SnapshotRenewal};
use self::read_index::{ReadIndexBatcher, ReadIndexError};
use self::reads::{LeaseState, PlantedReadBug};
use self::state_machine::{SnapshotDir, StateMachineStore};
use self::types::Raft;
use crate::clock::Clock;
use crate::{
    BoxFuture, ConsensusMetrics, GroupHealth, GroupStatus, MemberInfo, ReadBarrier, ReadGrant, ReadMode, Replication,
    ReplicationError, Role, StateReader,
};

/// Settings of one replica. Timing defaults suit a LAN or loopback. A dead leader is replaced in
/// about one to two election timeouts: followers refuse to vote while their leader lease (openraft
/// sets it to `election_timeout_max`) is still running, so the first candidate may be turned away
/// once. With 300–600 ms that is about one second, well inside the 3 seconds clients are
/// promised, while 6 missed heartbeats are needed before a healthy leader is challenged.
/// Called when this replica applies a split that created `group`, serving the shard given:
/// the node opens the new group's replica. Runs on the apply path, so it must only hand the work
/// off (spawn), never block on it.
pub type SplitHook = Arc<dyn Fn(u64, ShardState) + Send + Sync>;

/// Called when this replica (of the group given) is about to take over a range beyond the one
/// it serves: before it applies a merge, with the shard it will serve, and before it installs a
/// snapshot of a shard wider than its own. The node must stop every *other* local replica whose
/// range overlaps that shard and whose epoch is older (merged-away groups) and remove its
/// records, keeping its data, and only then let the future complete: until then the old replica
/// could still write into keys this one is about to own. Awaited on the apply path, so it must not
/// wait on this group's own progress. An error fails the apply (as a storage error would).
pub type ClaimHook = Arc<dyn Fn(u64, ShardState) -> BoxFuture<'static, Result<(), ReplicationError>> + Send + Sync>;

#[derive(Clone)]
pub struct RaftGroupConfig {
    pub node_id: u64,
    pub group_id: u64,
    /// The shard a replica serves before it has applied anything (a new group's initial range,
    /// or the catalog's view for a replica being added); afterwards its applied state decides.
    pub shard: ShardState,
    pub on_split: Option<SplitHook>,
    pub on_claim: Option<ClaimHook>,
    pub snapshot_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_threshold: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging follower catches up from the
    /// log rather than with a whole snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Upper bound on one proposal, read barrier or membership step.
    pub request_timeout: Duration,
    /// Idle-group hibernation (see [`hibernation`]); `None` keeps the group ticking always.
    /// Must match the node's [`hibernation::Hibernation`], which drives it.
    pub hibernation: Option<HibernationConfig>,
    /// The node's wall clock, for closed timestamps (see [`closed_time`]).
    pub clock: Clock,
    /// The bound on clock offset between nodes (and on timer drift over one lease) that lease
    /// reads and staleness bounds rely on; see [`reads`].
    pub max_clock_drift: Duration,
    /// Simulator only: a read-path bug to plant (see [`reads::PlantedReadBug`]).
    pub planted_read_bug: Option<PlantedReadBug>,
}

impl std::fmt::Debug for RaftGroupConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGroupConfig")
            .field("node_id", &self.node_id)
            .field("group_id", &self.group_id)
            .field("shard", &self.shard)
            .field("snapshot_dir", &self.snapshot_dir)
            .finish_non_exhaustive()
    }
}

/// The default bound on clock offset between nodes: an NTP-synchronised LAN stays well inside
/// it, and it leaves lease reads most of the default 600 ms lease.
pub const DEFAULT_MAX_CLOCK_DRIFT: Duration = Duration::from_millis(100);

impl RaftGroupConfig {
    pub fn new(node_id: u64, group_id: u64, shard: ShardState, snapshot_dir: PathBuf) -> Self {
        Self {
            node_id,
            group_id,
            shard,
            on_split: None,
            on_claim: None,
            snapshot_dir,
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(300),
            election_timeout_max: Duration::from_millis(600),
            snapshot_threshold: 10_000,
            logs_kept_after_snapshot: 1_000,
            request_timeout: Duration::from_secs(5),
            hibernation: None,
            clock: crate::clock::system_clock(),
            max_clock_drift: DEFAULT_MAX_CLOCK_DRIFT,
            planted_read_bug: None,
        }
    }

    fn openraft_config(&self, tick: bool) -> Result<openraft::Config, ReplicationError> {
        let c = openraft::Config {
            enable_tick: tick,
            cluster_name: format!("basalt-group-{}", self.group_id),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_threshold),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            install_snapshot_timeout: 10_000,
            max_payload_entries: 512,
            // A leader that restarts must win a new election, never resume its old term.
            // Resuming is unsafe here: a leader's own log may lose its unsynced tail in a crash
            // while the followers' quorum has already committed those entries, and a resumed leader
            // would then write *different* entries under the same (term, index) log ids, which the
            // followers take for matching ones. The simulator found this as stale reads after a
            // leader crash (seed 23 with `--faults crash`).
            enable_leader_restore: Some(false),
            // A follower whose log comes back shorter than the leader recorded is re-replicated
            // from scratch instead of tripping openraft's assertion. It happens without any
            // data loss when a replica moved off a node and back: the node's new replica is
            // empty while the leader still remembers how far the old one had matched (the
            // simulator's seed 12 with `--nodes 4 --readers 1 --faults all` at `6ef9b02`).
            // Resetting a follower's progress never lowers what the leader counts as committed;
            // it only makes the leader send that follower the log (or a snapshot) again.
            allow_log_reversion: Some(true),
            ..Default::default()
        };
        c.validate()
            .map_err(|e| ReplicationError::Stopped(format!("invalid raft configuration: {e}")))
    }
}

pub struct RaftGroup {
    cfg: RaftGroupConfig,
    raft: Raft,
    reader: StateReader,
    snapshots: SnapshotDir,
    metrics: ConsensusMetrics,
    health: Arc<GroupHealth>,
    sleep: Mutex<SleepCell>,
    /// Serialises [`RaftGroup::compact_for_newcomer`] and remembers the last purge it asked for.
    /// openraft (in debug builds) asserts that a scheduled purge never moves back, and its
    /// policy-based purge after the next snapshot computes `snapshot - logs_kept_after_snapshot`,
    /// which is behind a purge to the snapshot itself that replication has not let finish yet.
    /// So a compaction first waits for the previous one's purge to be done.
    compaction: tokio::sync::Mutex<u64>,
    /// Closed timestamps: claims this replica makes as leader and those it received.
    closed: Arc<ClosedTime>,
    /// The node's peer connections, for the read-index request of follower reads.
    peers: PeerClients,
    /// What lease reads and closed timestamps remember about this replica's leadership.
    lease: Arc<Mutex<LeaseState>>,
    /// Coalesces the ReadIndex rounds of linearizable and follower reads.
    read_index: Arc<ReadIndexBatcher>,
}

/// The leader side of closed timestamps (see [`closed_time`]): while this replica holds its lease
/// and has applied an entry of its term, the wall clock *then* the applied index.
fn closer(
    cfg: &RaftGroupConfig,
    raft: Raft,
    reader: StateReader,
    lease: Arc<Mutex<LeaseState>>,
) -> closed_time::Closer {
    let usable = cfg.election_timeout_max.saturating_sub(cfg.max_clock_drift);
    let clock = cfg.clock.clone();
    Box::new(move || {
        let now = tokio::time::Instant::now();
        let m = raft.metrics();
        let m = m.borrow_watched();
        if m.state == ServerState::Leader {
            // Noted on every heartbeat, so a new leader's wait for lease reads starts promptly.
            lease.lock().leading_since(m.current_term, now);
        }
        if !reads::lease_holds(&m, &lease, usable) {
            return None;
        }
        let at_us = clock.now_us();
        Some(Closed {
            at_us,
            index: reader.applied_index(),
        })
    })
}

impl RaftGroup {
    /// Opens (or creates) the replica's storage and starts its Raft instance. The replica takes
    /// part in elections only once it is a member: a new node waits to be initialized or added.
    pub async fn open(
        cfg: RaftGroupConfig,
        engine: Arc<dyn Engine>,
        writer: Arc<GroupCommitWriter>,
        peers: PeerClients,
        metrics: ConsensusMetrics,
    ) -> Result<Arc<Self>, ReplicationError> {
        let health = Arc::new(GroupHealth::default());
        let sm = KvStateMachine::open(engine.clone(), cfg.group_id, cfg.shard.clone())
            .map_err(|e| health_err(&health, e))?;
        let sm = Arc::new(RwLock::new(sm));
        let snapshots = SnapshotDir::new(cfg.snapshot_dir.clone())
            .map_err(|e| ReplicationError::Stopped(format!("snapshot dir {}: {e}", cfg.snapshot_dir.display())))?;
        let store = StateMachineStore::new(
            sm.clone(),
            engine.clone(),
            cfg.group_id,
            snapshots.clone(),
            metrics.clone(),
            health.clone(),
            state_machine::RangeHooks {
                on_split: cfg.on_split.clone(),
                on_claim: cfg.on_claim.clone(),
            },
        )
        .map_err(|e| ReplicationError::Stopped(format!("state machine: {e}")))?;
        let mut log = LogStore::new(RaftLog::new(engine, writer, cfg.group_id), health.clone());
        // A replica reopened with state (it has seen a term) starts dormant when groups hibernate:
        // its group may be asleep, and campaigning before anyone could reach it would only
        // disturb it (see `hibernation`).
        let restored = {
            use openraft::storage::RaftLogReader;
            log.read_vote()
                .await
                .map_err(|e| ReplicationError::Stopped(format!("reading the vote: {e}")))?
                .is_some_and(|v| v.leader_id().term > 0)
        };
        let sleep = match &cfg.hibernation {
            Some(h) if restored => Sleep::Dormant {
                until: tokio::time::Instant::now() + h.liveness_timeout + h.jitter(cfg.group_id, cfg.node_id),
            },
            _ => Sleep::Awake,
        };
        let closed = Arc::new(ClosedTime::new(cfg.clock.clone()));
        let renewal = Arc::new(SnapshotRenewal::default());
        let network = Network::new(
            cfg.group_id,
            peers.clone(),
            metrics.clone(),
            closed.clone(),
            renewal.clone(),
        );
        let openraft_cfg = cfg.openraft_config(sleep == Sleep::Awake)?;
        let raft = Raft::new(cfg.node_id, Arc::new(openraft_cfg), network, log, store)
            .await
            .map_err(|e| ReplicationError::Stopped(format!("raft failed to start: {e}")))?;
        let reader = StateReader::new(sm, health.clone());
        let lease = Arc::new(Mutex::new(LeaseState::default()));
        closed.set_closer(closer(&cfg, raft.clone(), reader.clone(), lease.clone()));
        let read_index = ReadIndexBatcher::new(raft.clone(), metrics.clone());
        let r = raft.clone();
        renewal.set(Box::new(move || {
            let r = r.clone();
            tokio::spawn(async move {
                // A stopped group has nobody to send a snapshot to: nothing to report.
                let _ = r.trigger().snapshot().await;
            });
        }));
        Ok(Arc::new(Self {
            reader,
            cfg,
            raft,
            snapshots,
            metrics,
            health,
            sleep: Mutex::new(SleepCell::new(sleep)),
            compaction: tokio::sync::Mutex::new(0),
            closed,
            peers,
            lease,
            read_index,
        }))
    }

    /// Forms a new group with `members` (id → address) if this replica has never been part of one.
    /// Returns whether it did. Every initial member may call this with the same set.
    pub async fn initialize(&self, members: &BTreeMap<u64, String>) -> Result<bool, ReplicationError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| ReplicationError::Stopped(e.to_string()))?;
        if initialized {
            return Ok(false);
        }
        let nodes: BTreeMap<u64, BasicNode> = members.iter().map(|(id, a)| (*id, BasicNode::new(a))).collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(true),
            // Another initial member's proposal got here first: the group exists, which is the goal.
            Err(RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(ReplicationError::Stopped(format!("initialize: {e}"))),
        }
    }

    pub(crate) fn raft(&self) -> &Raft {
        &self.raft
    }

    pub(crate) fn snapshot_dir(&self) -> &SnapshotDir {
        &self.snapshots
    }

    pub(crate) fn metrics(&self) -> &ConsensusMetrics {
        &self.metrics
    }

    /// Stops this replica for good because its group was merged into a neighbour whose local
    /// replica owns its range now: Raft stops, then the state machine is fenced off the engine.
    /// openraft's shutdown waits for its core but not for the state machine worker, which may
    /// still hold a queued apply or snapshot install; the fence waits out the one in progress
    /// and refuses the rest, so nothing this replica does can touch the range afterwards.
    pub async fn retire(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = self.cfg.group_id, error = %e, "raft shutdown");
        }
        self.reader.retire();
    }

    pub(crate) fn health(&self) -> &GroupHealth {
        &self.health
    }

    pub(crate) fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    pub(crate) fn hibernation(&self) -> Option<&HibernationConfig> {
        self.cfg.hibernation.as_ref()
    }

    /// Records a closed timestamp that arrived with an AppendEntries this replica accepted.
    pub(crate) fn observe_closed(&self, c: Closed) {
        self.closed.observe(c, self.reader.applied_index());
    }

    pub(crate) fn sleep(&self) -> &Mutex<SleepCell> {
        &self.sleep
    }

    /// Builds a snapshot now (and so allows the log behind it to be purged).
    pub async fn trigger_snapshot(&self) -> Result<(), ReplicationError> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ReplicationError::Stopped(e.to_string()))
    }

    /// Builds a snapshot of everything applied so far and purges the log up to it, so that a
    /// replica added next starts from that snapshot rather than by replaying the log.
    ///
    /// A newcomer must not replay from the group's first entry: a group born from a split has no
    /// log for the data it inherited (its history starts at the split), and a replica opened
    /// with the catalog's current range would refuse, as out of range, the writes and splits the
    /// older entries describe, ending with a state that differs from its peers'. The snapshot
    /// carries the range along with the data. Followers that lag behind the purge point catch up
    /// by snapshot too, which costs bandwidth but never correctness.
    pub async fn compact_for_newcomer(&self) -> Result<(), ReplicationError> {
        let mut requested = self.compaction.lock().await;
        self.wait_purged(*requested).await?;
        let target = self.reader.applied_index();
        self.trigger_snapshot().await?;
        let snapshot_index = self
            .raft
            .wait(Some(self.cfg.request_timeout))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= target),
                "a snapshot covering the applied state",
            )
            .await
            .map_err(|e| ReplicationError::QuorumUnavailable(format!("waiting for a snapshot: {e}")))?
            .snapshot
            .map_or(0, |s| s.index);
        self.raft
            .trigger()
            .purge_log(snapshot_index)
            .await
            .map_err(|f| self.fatal(f))?;
        *requested = (*requested).max(snapshot_index);
        self.wait_purged(snapshot_index).await
    }

    /// Waits (up to the request timeout) until the log is purged through `index`.
    async fn wait_purged(&self, index: u64) -> Result<(), ReplicationError> {
        if index == 0 {
            return Ok(());
        }
        self.raft
            .wait(Some(self.cfg.request_timeout))
            .metrics(
                |m| m.purged.is_some_and(|p| p.index >= index),
                "the log purged up to the snapshot",
            )
            .await
            .map(|_| ())
            .map_err(|e| ReplicationError::QuorumUnavailable(format!("waiting for the log purge: {e}")))
    }

    fn leader_addr(&self, id: u64) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// `NotLeader` naming whoever this replica now believes leads (never itself).
    fn not_leader_now(&self) -> ReplicationError {
        let status = self.status();
        let leader_id = status.leader_id.filter(|&l| l != self.cfg.node_id);
        ReplicationError::NotLeader {
            leader_id,
            leader_addr: leader_id.and(status.leader_addr),
        }
    }

    fn not_leader(&self, f: &openraft::errors::ForwardToLeader<types::TypeConfig>) -> ReplicationError {
        ReplicationError::NotLeader {
            leader_id: f.leader_id,
            leader_addr: f
                .leader_node
                .as_ref()
                .map(|n| n.addr.clone())
                .or_else(|| f.leader_id.and_then(|id| self.leader_addr(id))),
        }
    }

    fn write_error(&self, e: RaftError<types::TypeConfig, ClientWriteError<types::TypeConfig>>) -> ReplicationError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.not_leader(&f),
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                ReplicationError::OutcomeUnknown(format!("leader changed while the write was in flight ({f})"))
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ReplicationError::Membership(e.to_string())
            }
            RaftError::APIError(ClientWriteError::PreconditionFailed(e)) => ReplicationError::Membership(e.to_string()),
            RaftError::Fatal(f) => self.fatal(f),
        }
    }

    /// The read index of a ReadIndex round that started after this call (shared with the other
    /// reads waiting then; see [`read_index`]). Does not wait for the local state machine.
    /// Renews the quorum-ack lease of a leader that `touch` just woke, before it writes. A
    /// sleeping leader sends no heartbeats, so its lease runs out, and openraft refuses writes on
    /// an expired lease (`ForwardToLeader` with reason `LeaseExpired` and no leader to name: raw
    /// clients got "no leader is known yet" on their first write after an idle spell). One
    /// ReadIndex round confirms leadership with a quorum and so renews the lease; it costs a round
    /// trip on that first write only. Its error is left to the write, which reports its own.
    async fn renew_lease_after_sleep(&self, woke: bool) {
        if woke {
            let _ = self.read_index_round().await;
        }
    }

    pub(crate) async fn read_index_round(&self) -> Result<u64, ReplicationError> {
        match self.read_index.read_index().await {
            Ok(index) => Ok(index),
            Err(ReadIndexError::Raft(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(self.not_leader(&f))
            }
            Err(ReadIndexError::Raft(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)))) => {
                Err(ReplicationError::QuorumUnavailable(q.to_string()))
            }
            Err(ReadIndexError::Raft(RaftError::Fatal(f))) => Err(self.fatal(f)),
            Err(ReadIndexError::Abandoned) => Err(ReplicationError::Stopped(
                "the read-index round ended without an answer".into(),
            )),
        }
    }

    fn fatal(&self, f: openraft::errors::Fatal<types::TypeConfig>) -> ReplicationError {
        self.health.stop(format!("raft stopped: {f}"));
        ReplicationError::Stopped(f.to_string())
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, ReplicationError>>,
        on_timeout: impl FnOnce(String) -> ReplicationError,
    ) -> Result<T, ReplicationError> {
        self.health.check()?;
        match tokio::time::timeout(self.cfg.request_timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(on_timeout(format!(
                "{what} did not finish within {:?}",
                self.cfg.request_timeout
            ))),
        }
    }

    /// The voters the group is heading for and every node's address. In a joint configuration
    /// (a change whose second step has not been written yet) the voters are those of the newest
    /// configuration, the one the group ends in.
    fn membership(&self) -> (BTreeSet<u64>, BTreeMap<u64, String>) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let voters = mem.get_joint_config().last().cloned().unwrap_or_default();
        let nodes = mem.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        (voters, nodes)
    }

    /// Brings the group to a state where this node may change its membership, or says where to
    /// go instead. Three things must hold, each found missing by the simulator:
    ///
    /// - **This node leads** (checked here, and again by openraft when the change is written).
    /// - **It stays a voter.** A leader outside the configuration it is heading for keeps its term
    ///   but stops acting as leader once that configuration commits, and openraft asserts on any
    ///   further change there (seeds 1 and 2). Such a leader hands leadership to a voter of the new
    ///   configuration and answers `NotLeader`, so the caller repeats the request there; TiKV
    ///   likewise moves a leader off a peer before removing it.
    /// - **No joint configuration is left over.** openraft writes a change's second, uniform step
    ///   only while the caller waits, so a change whose caller timed out or lost leadership stays
    ///   joint; a further change would then be computed from the half-finished one, and "already a
    ///   voter" would be judged on the union of both. The leftover is finished first.
    async fn prepare_change(&self) -> Result<(), ReplicationError> {
        let (leading, joint, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            let configs = m.membership_config.membership().get_joint_config();
            (
                m.state == ServerState::Leader,
                configs.len() > 1,
                configs.last().cloned().unwrap_or_default(),
            )
        };
        if !leading {
            return Err(self.not_leader_now());
        }
        if !voters.contains(&self.cfg.node_id) {
            return Err(self.hand_over_to_one_of(&voters).await);
        }
        if joint {
            // An empty change writes just the uniform step of the leftover change.
            self.write_change(ChangeMembers::AddVoterIds(BTreeSet::new())).await?;
        }
        Ok(())
    }

    /// Waits until the membership this leader sees is committed and applied, so "already a
    /// voter" is never said of a configuration the group may still drop.
    async fn membership_applied(&self) -> Result<(), ReplicationError> {
        self.read_barrier().await?;
        let index = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            m.membership_config.log_id().as_ref().map_or(0, |l| l.index)
        };
        self.wait_applied(index, "the membership").await
    }

    /// Waits until this leader has replicated its log through `index` to learner `id`; fails
    /// with `NotLeader` if this node stops leading first. Unbounded: callers bound it (a newcomer
    /// receiving a large snapshot takes as long as the transfer does).
    async fn wait_for_learner(&self, id: u64, index: u64) -> Result<(), ReplicationError> {
        let caught_up = |m: &openraft::RaftMetrics<types::TypeConfig>| {
            m.replication
                .as_ref()
                .map(|r| r.get(&id).cloned().flatten().is_some_and(|l| l.index >= index))
        };
        let m = self
            .raft
            .wait(None)
            .metrics(|m| caught_up(m) != Some(false), "the learner holding the log")
            .await
            .map_err(|e| ReplicationError::QuorumUnavailable(format!("waiting for node {id} to catch up: {e}")))?;
        match caught_up(&m) {
            Some(true) => Ok(()),
            _ => Err(self.not_leader_now()),
        }
    }

    /// Hands leadership to the most caught-up node of `voters` other than this one, then answers
    /// `NotLeader` naming the new leader.
    async fn hand_over_to_one_of(&self, voters: &BTreeSet<u64>) -> ReplicationError {
        let successor = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            let matched = |id: &u64| m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten());
            voters
                .iter()
                .filter(|&&v| v != self.cfg.node_id)
                .max_by_key(|v| (matched(v), std::cmp::Reverse(**v)))
                .copied()
        };
        let Some(to) = successor else {
            return ReplicationError::Membership("no other voter to hand leadership to".into());
        };
        match self.transfer_leader(to).await {
            Ok(()) => self.not_leader_now(),
            Err(e) => e,
        }
    }

    /// Writes one membership change, both of its steps, on a task of its own: a caller that
    /// gives up (its deadline, a dropped connection) stops waiting but does not stop the change
    /// halfway, in a joint configuration.
    ///
    /// Raft takes one membership change at a time, and two callers may well ask at once (an
    /// operator's `shard move` and the placement driver finishing the same move). A change
    /// refused because another is in flight waits for that one to apply and is then written
    /// against the configuration it left. That is safe because every change this group makes is
    /// stated relative to the current configuration (add these voters, remove those nodes), and
    /// it is what the refused caller would have got by asking a moment later.
    async fn write_change(&self, change: ChangeMembers<u64, BasicNode>) -> Result<(), ReplicationError> {
        const ATTEMPTS: usize = 8;
        for _ in 1..ATTEMPTS {
            match self.write_change_once(change.clone()).await {
                Err(Busy::InFlight(index)) => self.wait_applied(index, "the membership change in flight").await?,
                Err(Busy::Failed(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
        match self.write_change_once(change).await {
            Ok(()) => Ok(()),
            Err(Busy::Failed(e)) => Err(e),
            Err(Busy::InFlight(index)) => Err(ReplicationError::Membership(format!(
                "another membership change (log index {index}) was still in flight after {ATTEMPTS} attempts"
            ))),
        }
    }

    async fn write_change_once(&self, change: ChangeMembers<u64, BasicNode>) -> Result<(), Busy> {
        let raft = self.raft.clone();
        let task = tokio::spawn(async move { raft.change_membership(change, false).await });
        match task.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(p),
            )))) => Err(Busy::InFlight(p.membership_log_id.map_or(0, |l| l.index))),
            // Another caller's change got in between this one's joint and uniform steps. It
            // was computed from this one's target, so nothing is lost; settle on what it left.
            Ok(Err(RaftError::APIError(ClientWriteError::PreconditionFailed(
                PreconditionFailed::LastMembershipLogIdMismatch { actual, .. },
            )))) => Err(Busy::InFlight(actual.map_or(0, |l| l.index))),
            Ok(Err(e)) => Err(Busy::Failed(self.write_error(e))),
            Err(e) => Err(Busy::Failed(ReplicationError::Stopped(format!(
                "the membership change task ended: {e}"
            )))),
        }
    }

    /// Waits until this replica has applied its log through `index`, within the request timeout.
    async fn wait_applied(&self, index: u64, what: &str) -> Result<(), ReplicationError> {
        self.raft
            .wait(Some(self.cfg.request_timeout))
            .applied_index_at_least(Some(index), what)
            .await
            .map(|_| ())
            .map_err(|e| ReplicationError::QuorumUnavailable(format!("waiting for {what} to apply: {e}")))
    }

    async fn change(&self, change: ChangeMembers<u64, BasicNode>) -> Result<(), ReplicationError> {
        self.prepare_change().await?;
        self.write_change(change).await
    }
}

/// Why one attempt at a membership change did not happen.
enum Busy {
    /// Another change, at this log index, is not applied yet; try again once it is.
    InFlight(u64),
    /// Anything else, final.
    Failed(ReplicationError),
}

fn health_err(health: &GroupHealth, e: basalt_storage::StorageError) -> ReplicationError {
    match health.observe::<()>(Err(e)) {
        Err(e) => e,
        Ok(()) => unreachable!("observe of an Err is an Err"),
    }
}

impl Replication for RaftGroup {
    fn group_id(&self) -> u64 {
        self.cfg.group_id
    }

    fn propose(&self, request: WriteRequest) -> BoxFuture<'_, Result<WriteResponse, ReplicationError>> {
        let woke = self.touch();
        Box::pin(self.bounded(
            "write",
            async move {
                self.renew_lease_after_sleep(woke).await;
                self.raft
                    .client_write(request)
                    .await
                    .map(|r| r.data)
                    .map_err(|e| self.write_error(e))
            },
            ReplicationError::OutcomeUnknown,
        ))
    }

    fn read_barrier(&self) -> BoxFuture<'_, Result<ReadBarrier, ReplicationError>> {
        self.touch();
        Box::pin(self.bounded(
            "read barrier",
            async move {
                let index = self.read_index_round().await?;
                self.wait_applied(index, "the read index").await?;
                Ok(ReadBarrier {
                    applied_index: self.reader.applied_index(),
                })
            },
            ReplicationError::QuorumUnavailable,
        ))
    }

    fn prepare_read(&self, mode: ReadMode) -> BoxFuture<'_, Result<ReadGrant, ReplicationError>> {
        Box::pin(self.prepare_read_in(mode))
    }

    fn reader(&self) -> StateReader {
        self.reader.clone()
    }

    fn add_member(&self, id: u64, addr: String) -> BoxFuture<'_, Result<(), ReplicationError>> {
        let woke = self.touch();
        Box::pin(async move {
            self.renew_lease_after_sleep(woke).await;
            self.health.check()?;
            // Only the leader may judge "already a member": a removed node still lists itself,
            // and answering from its view told the simulator's operator that a node was back
            // when the group had not re-added it.
            self.prepare_change().await?;
            let (voters, nodes) = self.membership();
            if voters.contains(&id) {
                return match nodes.get(&id) {
                    Some(a) if *a == addr => self.membership_applied().await,
                    Some(a) => Err(ReplicationError::Membership(format!(
                        "node {id} is already a member at {a}, not {addr}"
                    ))),
                    None => Ok(()),
                };
            }
            // Join as a learner first and wait until it holds the log up to the entry that added
            // it, so adding a voter never leaves the group counting on a member that has none of
            // the log. openraft's own blocking add only waits until the learner is within
            // `replication_lag_threshold` (5,000 entries) of the leader, which a small group's
            // whole log is: a learner whose node never opened the group passed that check, and
            // the group then had a voter that held nothing.
            let added = self
                .raft
                .add_learner(id, BasicNode::new(&addr), false)
                .await
                .map_err(|e| self.write_error(e))?;
            self.wait_for_learner(id, added.log_id.index).await?;
            self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await
        })
    }

    fn remove_member(&self, id: u64) -> BoxFuture<'_, Result<(), ReplicationError>> {
        let woke = self.touch();
        Box::pin(self.bounded(
            "remove member",
            async move {
                self.renew_lease_after_sleep(woke).await;
                self.prepare_change().await?;
                let (voters, nodes) = self.membership();
                if !nodes.contains_key(&id) {
                    return Err(ReplicationError::UnknownMember(id));
                }
                if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(ReplicationError::Membership(format!(
                            "node {id} is the only voter; removing it would leave no cluster"
                        )));
                    }
                    if id == self.cfg.node_id {
                        return Err(self.hand_over_to_one_of(&voters).await);
                    }
                    self.change(ChangeMembers::RemoveVoters(BTreeSet::from([id]))).await?;
                }
                let (_, nodes) = self.membership();
                if nodes.contains_key(&id) {
                    self.change(ChangeMembers::RemoveNodes(BTreeSet::from([id]))).await?;
                }
                Ok(())
            },
            ReplicationError::OutcomeUnknown,
        ))
    }

    fn transfer_leader(&self, to: u64) -> BoxFuture<'_, Result<(), ReplicationError>> {
        self.touch();
        Box::pin(self.bounded(
            "leader transfer",
            async move {
                let (voters, nodes) = self.membership();
                if !nodes.contains_key(&to) {
                    return Err(ReplicationError::UnknownMember(to));
                }
                if !voters.contains(&to) {
                    return Err(ReplicationError::Membership(format!(
                        "node {to} is not a voting member"
                    )));
                }
                let status = self.status();
                if status.leader_id == Some(to) {
                    return Ok(());
                }
                if status.role != Role::Leader {
                    return Err(self.not_leader_now());
                }
                // From here on the followers may vote for `to` at once, lease or not: this
                // replica's lease means nothing any more (see `reads`).
                self.lease.lock().note_transfer(status.term);
                self.raft
                    .trigger()
                    .transfer_leader(to)
                    .await
                    .map_err(|f| self.fatal(f))?;
                let mut rx = self.raft.metrics();
                loop {
                    if rx.borrow_watched().current_leader == Some(to) {
                        return Ok(());
                    }
                    if rx.changed().await.is_err() {
                        return Err(ReplicationError::Stopped("raft shut down".into()));
                    }
                }
            },
            ReplicationError::QuorumUnavailable,
        ))
    }

    fn status(&self) -> GroupStatus {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        let members = mem
            .nodes()
            .map(|(id, n)| MemberInfo {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let stopped = match (&m.running_state, self.health.stopped()) {
            (_, Some(why)) => Some(why.to_string()),
            (Err(f), None) => Some(f.to_string()),
            _ => None,
        };
        let role = if stopped.is_some() {
            Role::Stopped
        } else {
            match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Stopped,
            }
        };
        let leader_addr = m
            .current_leader
            .and_then(|id| mem.get_node(&id).map(|n| n.addr.clone()));
        GroupStatus {
            group_id: self.cfg.group_id,
            node_id: self.cfg.node_id,
            role,
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: m.local_committed.map(|l| l.index()).unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index()).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index()).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index()).unwrap_or(0),
            members,
            stopped,
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.raft.shutdown().await {
                tracing::warn!(group = self.cfg.group_id, error = %e, "raft shutdown");
            }
        })
    }
}
