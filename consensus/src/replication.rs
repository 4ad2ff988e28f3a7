//! The replication trait: what the rest of Basalt needs from a replica group.
//!
//! A group is a replicated state machine over one contiguous range of keys. Writes are proposed
//! and answered with the state machine's response after they apply; reads go to the local state
//! machine after a read barrier that makes them linearizable, or after whatever check the read's
//! [`ReadMode`] asks for (a lease, the leader's read index, the replica's safe time). The trait is
//! object safe (futures are boxed) so a node can hold groups of different consensus kinds side by
//! side.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use basalt_storage::{KvStateMachine, MergeExport, ShardScan, ShardScanPage, ShardState, WriteRequest, WriteResponse};
use parking_lot::RwLock;

use crate::ReplicationError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A replica's role in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Stopped,
}

/// One member of a group, as the local replica knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
}

/// A point-in-time view of the local replica, cheap to take (no I/O).
#[derive(Debug, Clone)]
pub struct GroupStatus {
    pub group_id: u64,
    pub node_id: u64,
    pub role: Role,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub members: Vec<MemberInfo>,
    /// Why the replica stopped serving, if it did.
    pub stopped: Option<String>,
}

/// Proof that a read barrier passed: the state machine has applied at least `applied_index`,
/// which covers every write acknowledged before the barrier started.
#[derive(Debug, Clone, Copy)]
pub struct ReadBarrier {
    pub applied_index: u64,
}

/// How a read asks to be served: the consensus layer's side of `basalt.v1.ReadMode` (the table
/// in `docs/read-modes.md` is the contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// The leader, after a ReadIndex quorum round.
    Linearizable,
    /// The leader inside its lease, no round trip; outside it, as `Linearizable`.
    Lease,
    /// Any replica, once it has applied the leader's read index.
    Follower,
    /// Any replica whose safe time is at most this old (the drift bound included).
    BoundedStaleness(Duration),
    /// Any replica, as fresh as it happens to be.
    Stale,
}

/// How old a non-linearizable read may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Linearizable: it reflects every write acknowledged before the read began.
    Fresh,
    /// It reflects every write acknowledged more than this long before the read, by the serving
    /// replica's clock, the configured drift bound included.
    AtMost(Duration),
    /// The replica has no safe time (it never heard a closed timestamp): no bound is known.
    Unknown,
}

/// Permission to read the local state machine, as a [`Replication::prepare_read`] gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadGrant {
    /// The mode that made the read safe: the one asked for, or a stronger one when the replica
    /// fell back (a lease read outside a valid lease is a ReadIndex read).
    pub mode: ReadMode,
    /// The state machine has applied at least this much.
    pub applied_index: u64,
    pub staleness: Staleness,
}

/// One page of a scan: pairs in key order, and whether the range holds more after them.
pub type ScanPage = (Vec<(Vec<u8>, Vec<u8>)>, bool);

/// Read access to a group's state machine, shared with the apply path.
///
/// Reads take the lock shared; the apply path takes it exclusively only for the in-memory part of
/// an apply, so readers never see a half-applied batch (the engine write itself is atomic).
///
/// A read that finds corrupt data stops the whole replica through [`GroupHealth`]: once one
/// record is known bad, nothing this replica holds is trusted to be served.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<RwLock<KvStateMachine>>,
    health: Arc<GroupHealth>,
}

impl StateReader {
    pub fn new(inner: Arc<RwLock<KvStateMachine>>, health: Arc<GroupHealth>) -> Self {
        Self { inner, health }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ReplicationError> {
        self.health.check()?;
        let got = self.inner.read().get(key);
        self.health.observe(got)
    }

    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<ScanPage, ReplicationError> {
        self.health.check()?;
        let got = self.inner.read().scan(start, end, limit);
        self.health.observe(got)
    }

    /// One shard's part of a scan; a position outside the shard is a `WrongShard` storage error.
    pub fn scan_shard(&self, scan: &ShardScan) -> Result<ShardScanPage, ReplicationError> {
        self.health.check()?;
        let got = self.inner.read().scan_shard(scan);
        self.health.observe(got)
    }

    pub fn applied_index(&self) -> u64 {
        self.inner.read().applied_index()
    }

    /// Whether the shard, as of the last apply, holds stored key `key` (no copy of the shard:
    /// the request path asks this on every request).
    pub fn holds(&self, key: &[u8]) -> bool {
        self.inner.read().shard().contains(key)
    }

    /// The shard as of the last apply.
    pub fn shard(&self) -> ShardState {
        self.inner.read().shard().clone()
    }

    /// The data and sessions of the frozen shard, for a merge into its left neighbour (see
    /// `basalt_storage::merge`). Any replica that has applied the freeze gives the same answer.
    pub fn export_for_merge(&self, limit: u64) -> Result<MergeExport, ReplicationError> {
        self.health.check()?;
        let got = self.inner.read().export_for_merge(limit);
        self.health.observe(got)
    }

    /// Fences the state machine off the engine for good (see `KvStateMachine::retire`): its
    /// range belongs to another local replica now.
    pub(crate) fn retire(&self) {
        self.inner.write().retire();
    }
}

/// Whether a replica may serve. Set once, never cleared: a replica that found corruption or hit a
/// fatal storage error stays stopped until an operator restarts it (and repairs its data).
#[derive(Debug, Default)]
pub struct GroupHealth {
    stopped: OnceLock<Stop>,
}

#[derive(Debug)]
struct Stop {
    why: String,
    corruption: bool,
}

impl GroupHealth {
    /// Stops the replica for a reason other than corruption (a fatal Raft or storage error).
    pub fn stop(&self, why: impl Into<String>) {
        self.set(why.into(), false);
    }

    /// Stops the replica because it found corrupt data.
    pub fn stop_corrupt(&self, why: impl Into<String>) {
        self.set(why.into(), true);
    }

    fn set(&self, why: String, corruption: bool) {
        if self
            .stopped
            .set(Stop {
                why: why.clone(),
                corruption,
            })
            .is_ok()
        {
            tracing::error!(reason = %why, corruption, "replica stopped serving");
        }
    }

    pub fn stopped(&self) -> Option<&str> {
        self.stopped.get().map(|s| s.why.as_str())
    }

    pub fn check(&self) -> Result<(), ReplicationError> {
        match self.stopped.get() {
            Some(Stop { why, corruption: true }) => Err(ReplicationError::Corrupted(why.clone())),
            Some(Stop { why, corruption: false }) => Err(ReplicationError::Stopped(why.clone())),
            None => Ok(()),
        }
    }

    /// Passes a storage result through, stopping the replica if it reports corruption.
    pub fn observe<T>(&self, r: Result<T, basalt_storage::StorageError>) -> Result<T, ReplicationError> {
        r.map_err(|e| {
            if e.is_corruption() {
                let why = format!("corruption detected: {e}");
                self.stop_corrupt(why.clone());
                ReplicationError::Corrupted(why)
            } else {
                ReplicationError::Storage(e)
            }
        })
    }
}

/// A replica group as seen by the node hosting one of its replicas.
pub trait Replication: Send + Sync + 'static {
    fn group_id(&self) -> u64;

    /// Proposes a write through the group; resolves with the state machine's response once the
    /// write is committed and applied. Fails with `NotLeader` on a non-leader.
    fn propose(&self, request: WriteRequest) -> BoxFuture<'_, Result<WriteResponse, ReplicationError>>;

    /// A linearizable read barrier (ReadIndex): confirms leadership with a quorum and waits until
    /// the local state machine has applied everything committed before the call.
    fn read_barrier(&self) -> BoxFuture<'_, Result<ReadBarrier, ReplicationError>>;

    /// Makes a read in `mode` safe to serve from this replica's state machine, waiting where the
    /// mode needs it. Fails with `NotLeader` where only the leader may serve it
    /// (`Linearizable`, `Lease`, or `Follower` with no known leader), and with `TooStale` when a
    /// bounded-staleness read cannot be proven fresh enough here; the caller forwards those.
    fn prepare_read(&self, mode: ReadMode) -> BoxFuture<'_, Result<ReadGrant, ReplicationError>>;

    /// Read access to the local state machine; use after [`Replication::read_barrier`].
    fn reader(&self) -> StateReader;

    /// Adds a member: it joins as a non-voter, catches up, then is promoted to voter.
    fn add_member(&self, id: u64, addr: String) -> BoxFuture<'_, Result<(), ReplicationError>>;

    /// Removes a member (voter or not). Refused for an id that is not a member.
    fn remove_member(&self, id: u64) -> BoxFuture<'_, Result<(), ReplicationError>>;

    /// Asks the leader to hand leadership to `to`, and waits until it has.
    fn transfer_leader(&self, to: u64) -> BoxFuture<'_, Result<(), ReplicationError>>;

    fn status(&self) -> GroupStatus;

    /// Stops the replica's background tasks. Idempotent.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
