//! Merging a small shard into its left neighbour: the placement driver's side.
//!
//! `MergeShard{L}` merges shard L with the next shard R of its keyspace (as CockroachDB merges a
//! range with the one after it). R's data and sessions travel through L's own log (see
//! `basalt_storage::merge`), so the two need not have their replicas on the same nodes. The
//! driver runs on the meta leader; each step it asks of a shard runs on that shard's leader (or,
//! to read the frozen R, on any of its replicas) through the internal `MergeStep` RPC:
//!
//! 1. **Mark** (catalog transaction, guarded by compares on both descriptors): R's descriptor
//!    records the merge and the epochs it was planned with ([`MergeMark`]).
//! 2. **Freeze** R at the planned epoch: R refuses writes from then on (clients retry with
//!    `WrongShard` until the range is L's), and its state is final.
//! 3. **Absorb** on L's leader: it reads the frozen R from a local replica, or from any replica of
//!    R that has applied the freeze, refuses if R holds more than `MAX_MERGE_BYTES`, and proposes
//!    `Command::Merge` with L's planned epoch. Each of L's replicas applies it; one holding a
//!    replica of R stops that replica first and removes its records (the claim hook).
//! 4. **Finish** (catalog transaction): L's descriptor gets the merged shard, R's is deleted.
//! 5. **Collect**: nodes that held R but not L find a local group the catalog no longer has,
//!    covered by newer shards, and remove it ([`collect_merged_replicas`], from the reconciler).
//!
//! Invariants and why:
//!
//! * **Every step is idempotent and re-derivable from the catalog mark**, so [`resume_merges`]
//!   (on whichever node leads the meta group, every tick) finishes a merge whose driver died.
//!   It first asks L's leader what L serves: if L already covers R, only the catalog step is
//!   left; a retried freeze answers `Frozen` again; a retried merge is refused by L's moved epoch.
//! * **R is unfrozen only once the merge can never apply.** The merge proposal always carries the
//!   mark's `left_epoch`, so once L's epoch has moved on without covering R (it split, say), no
//!   merge of this mark can apply any more, and undoing is safe even while a deposed meta leader
//!   still drives the same merge. "L moved on without covering R" does mean the merge never
//!   applied: after an applied merge L's range cannot shrink before the catalog step, since a split
//!   is proposed with the catalog's epoch of L (which the merge made stale) and a shard that a
//!   merge targets is not marked for a merge of its own. The only other reason to undo is
//!   deterministic (R is too large: every driver reading the same frozen R finds the same size),
//!   so no driver can hold an acceptable copy of R while another unfreezes it. Otherwise a merge
//!   that cannot proceed (R's replicas unreachable) stays marked, R stays frozen, and the next
//!   tick tries again.
//! * **One merge per shard at a time**: a shard already marked, or the target of a mark, is not
//!   marked again; on one node, merges are driven one at a time ([`Placement::merge_lock`]).
//! * **Merges and replica moves exclude each other**: a shard with a move recorded is not marked,
//!   and a shard in a merge is not moved (`Placement::begin_move`, and the driver skips it), since
//!   the merge's export and claim steps read the replica sets the catalog named at the mark.
//! * **A leftover replica is stale only when the catalog proves it**: absent from the catalog,
//!   and every catalog shard covering its range has a newer epoch. A group born from a split that
//!   the catalog has not recorded yet has an epoch at least its parent's, so it is kept.

use std::time::Duration;

use basalt_consensus::raft::RaftGroup;
use basalt_consensus::{BoxFuture, Replication, ReplicationError, Role};
use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::{MergeStepRequest, MergeStepResponse};
use basalt_storage::{Command, MergeExport, MergeSource, ShardState, WriteRequest, WriteResponse, MAX_MERGE_BYTES};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::{Response, Status};

use crate::catalog::{Catalog, MergeMark, ShardDesc, META_GROUP};
use crate::errors::to_status;
use crate::forward::Forwarder;
use crate::kv_service::header;
use crate::placement::{Placement, PlacementError};

/// How long one step may keep trying the replicas of its shard before the driver gives up for
/// now (the merge stays marked and is resumed later).
const STEP_DEADLINE: Duration = Duration::from_secs(10);
/// Bound on one step's RPC.
const STEP_RPC_TIMEOUT: Duration = Duration::from_secs(8);
/// Pause between rounds over a shard's replicas (an election, a follower applying the freeze).
const STEP_RETRY_PAUSE: Duration = Duration::from_millis(150);
/// Largest step answer accepted: a frozen shard's export is at most `MAX_MERGE_BYTES` plus
/// framing; the rest is headroom, as for peer messages.
const STEP_MESSAGE_LIMIT: usize = 64 << 20;

/// One step of a merge, asked of a shard's replica by the driver (encoded in `MergeStepRequest`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MergeStep {
    /// On the shard's leader: propose `Command::Freeze`.
    Freeze { group: u64, expected_epoch: u64 },
    /// On the shard's leader: propose `Command::Unfreeze`.
    Unfreeze { group: u64, frozen_epoch: u64 },
    /// On the shard's leader, after a read barrier: the shard it serves.
    Describe { group: u64 },
    /// On any replica that has applied the freeze to `frozen_epoch`: the frozen data.
    Export { group: u64, frozen_epoch: u64 },
    /// On the left shard's leader: read the frozen right shard and propose `Command::Merge`.
    Absorb {
        left: u64,
        expected_left_epoch: u64,
        right: u64,
        right_frozen_epoch: u64,
        right_replicas: Vec<u64>,
    },
}

impl MergeStep {
    /// The group whose replica runs the step.
    pub fn group(&self) -> u64 {
        match self {
            MergeStep::Freeze { group, .. }
            | MergeStep::Unfreeze { group, .. }
            | MergeStep::Describe { group }
            | MergeStep::Export { group, .. } => *group,
            MergeStep::Absorb { left, .. } => *left,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            MergeStep::Freeze { .. } => "freeze",
            MergeStep::Unfreeze { .. } => "unfreeze",
            MergeStep::Describe { .. } => "describe",
            MergeStep::Export { .. } => "export",
            MergeStep::Absorb { .. } => "absorb",
        }
    }
}

/// What a step found (encoded in `MergeStepResponse`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// The shard after the step: frozen, unfrozen, merged, or as described.
    Done(ShardState),
    /// The shard's state machine refused the step; nothing changed. `shard` is its state.
    Refused { shard: ShardState, reason: String },
    /// The frozen shard's data and sessions.
    Export(MergeSource),
    /// The replica has not applied the freeze (or the shard is frozen at another epoch).
    NotFrozen(ShardState),
    /// The frozen shard holds more than `limit` bytes.
    TooLarge { limit: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// No replica of the group carried the step out in time; the merge stays marked.
    #[error("the {what} step on shard {group} did not complete in time: {last}")]
    Unreachable {
        group: u64,
        what: &'static str,
        last: String,
    },
    /// The merge was given up and undone (R unfrozen, the mark cleared).
    #[error("merge of shard {right} into shard {left} abandoned: {reason}")]
    Abandoned { left: u64, right: u64, reason: String },
    /// A replica answered something the protocol does not allow at that step.
    #[error("the {what} step on shard {group} was answered with {answer}")]
    Unexpected {
        group: u64,
        what: &'static str,
        answer: String,
    },
}

impl From<MergeError> for PlacementError {
    fn from(e: MergeError) -> Self {
        match e {
            MergeError::Placement(e) => e,
            e @ MergeError::Unreachable { .. } => {
                PlacementError::Replication(ReplicationError::QuorumUnavailable(e.to_string()))
            }
            e @ MergeError::Abandoned { .. } => PlacementError::Refused(e.to_string()),
            e @ MergeError::Unexpected { .. } => PlacementError::Conflict(e.to_string()),
        }
    }
}

fn encode<T: Serialize>(v: &T) -> bytes::Bytes {
    postcard::to_allocvec(v)
        .expect("merge steps and outcomes are plain enums of integers, strings and byte vectors")
        .into()
}

fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, Status> {
    postcard::from_bytes(bytes).map_err(|e| Status::invalid_argument(format!("{what} does not decode: {e}")))
}

fn admin_client(ch: tonic::transport::Channel) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(ch).max_decoding_message_size(STEP_MESSAGE_LIMIT)
}

fn forwarder(p: &Placement) -> Forwarder {
    Forwarder::new(p.replicas().peers().clone(), STEP_RPC_TIMEOUT)
}

// ---------------------------------------------------------------------------------------------
// The steps, as a replica serves them.

/// Serves one `MergeStep` request on this node: runs it on the local replica of its group, or
/// forwards it once to the group's leader when the step needs the leader and this replica is not.
pub async fn serve_step(
    p: &Placement,
    req: MergeStepRequest,
    forwarded: bool,
) -> Result<Response<MergeStepResponse>, Status> {
    let step: MergeStep = decode("merge step", &req.step)?;
    let Some(g) = p.replicas().get(step.group()) else {
        return Err(Status::unavailable(format!(
            "node {} holds no replica of shard {}",
            p.node_id(),
            step.group()
        )));
    };
    match run_step(p, &g, &step).await {
        Ok(outcome) => Ok(Response::new(MergeStepResponse {
            header: Some(header(g.as_ref())),
            outcome: encode(&outcome),
        })),
        Err(StepError::Replication(ReplicationError::NotLeader {
            leader_id,
            leader_addr: Some(addr),
        })) if !forwarded => {
            forwarder(p)
                .forward(leader_id, &addr, req, |ch, r| async move {
                    admin_client(ch).merge_step(r).await
                })
                .await
        }
        Err(StepError::Replication(e)) => Err(to_status(e)),
        Err(StepError::Unexpected(m)) => Err(Status::internal(m)),
    }
}

/// Why a replica could not run a step.
enum StepError {
    Replication(ReplicationError),
    /// The state machine answered what the command cannot produce (a bug, not a condition).
    Unexpected(String),
}

impl From<ReplicationError> for StepError {
    fn from(e: ReplicationError) -> Self {
        StepError::Replication(e)
    }
}

fn not_leader(g: &RaftGroup) -> ReplicationError {
    let s = g.status();
    ReplicationError::NotLeader {
        leader_id: s.leader_id.filter(|l| *l != s.node_id),
        leader_addr: s.leader_addr.filter(|_| s.leader_id != Some(s.node_id)),
    }
}

fn unexpected(what: &str, r: WriteResponse) -> StepError {
    StepError::Unexpected(format!("the state machine answered {r:?} to a {what}"))
}

async fn run_step(p: &Placement, g: &RaftGroup, step: &MergeStep) -> Result<StepOutcome, StepError> {
    let propose = |command| g.propose(WriteRequest { session: None, command });
    match step {
        MergeStep::Freeze { expected_epoch, .. } => {
            match propose(Command::Freeze {
                expected_epoch: *expected_epoch,
            })
            .await?
            {
                WriteResponse::Frozen { shard } => Ok(StepOutcome::Done(shard)),
                WriteResponse::MergeRefused { shard, reason } => Ok(StepOutcome::Refused { shard, reason }),
                other => Err(unexpected("freeze", other)),
            }
        }
        MergeStep::Unfreeze { frozen_epoch, .. } => {
            match propose(Command::Unfreeze {
                frozen_epoch: *frozen_epoch,
            })
            .await?
            {
                WriteResponse::Unfrozen { shard } => Ok(StepOutcome::Done(shard)),
                WriteResponse::MergeRefused { shard, reason } => Ok(StepOutcome::Refused { shard, reason }),
                other => Err(unexpected("unfreeze", other)),
            }
        }
        MergeStep::Describe { .. } => {
            g.read_barrier().await?;
            Ok(StepOutcome::Done(g.reader().shard()))
        }
        MergeStep::Export { frozen_epoch, .. } => Ok(export_local(g, *frozen_epoch)?),
        MergeStep::Absorb {
            expected_left_epoch,
            right,
            right_frozen_epoch,
            right_replicas,
            ..
        } => {
            // Not worth copying the right shard here only to be told to go elsewhere.
            if g.status().role != Role::Leader {
                return Err(not_leader(g).into());
            }
            let source = match fetch_export(p, *right, *right_frozen_epoch, right_replicas).await? {
                StepOutcome::Export(source) => source,
                other => return Ok(other),
            };
            let command = Command::Merge {
                right_group: *right,
                expected_left_epoch: *expected_left_epoch,
                source,
            };
            match propose(command).await? {
                WriteResponse::Merged { shard } => Ok(StepOutcome::Done(shard)),
                WriteResponse::MergeRefused { shard, reason } => Ok(StepOutcome::Refused { shard, reason }),
                other => Err(unexpected("merge", other)),
            }
        }
    }
}

fn export_local(g: &RaftGroup, frozen_epoch: u64) -> Result<StepOutcome, ReplicationError> {
    Ok(match g.reader().export_for_merge(MAX_MERGE_BYTES)? {
        MergeExport::Ready(source) if source.shard.epoch == frozen_epoch => StepOutcome::Export(source),
        MergeExport::Ready(source) => StepOutcome::NotFrozen(source.shard),
        MergeExport::NotFrozen { shard } => StepOutcome::NotFrozen(shard),
        MergeExport::TooLarge { limit } => StepOutcome::TooLarge { limit },
    })
}

/// The frozen right shard's export: from the local replica if it has applied the freeze, else
/// from the first of its replicas that has (followers may still be applying it: a few rounds).
async fn fetch_export(
    p: &Placement,
    right: u64,
    frozen_epoch: u64,
    replicas: &[u64],
) -> Result<StepOutcome, ReplicationError> {
    let deadline = Instant::now() + STEP_DEADLINE / 2;
    let req = MergeStepRequest {
        step: encode(&MergeStep::Export {
            group: right,
            frozen_epoch,
        }),
    };
    let mut last = String::from("no replica of it is known");
    loop {
        if let Some(local) = p.replicas().get(right) {
            match export_local(&local, frozen_epoch) {
                Ok(StepOutcome::NotFrozen(shard)) => last = format!("the local replica is at {shard:?}"),
                Ok(found) => return Ok(found),
                Err(e) => last = e.to_string(),
            }
        }
        let addrs = p.addresses();
        for id in replicas.iter().filter(|id| **id != p.node_id()) {
            let Some(addr) = addrs.get(id) else { continue };
            let answer = forwarder(p)
                .forward(Some(*id), addr, req.clone(), |ch, r| async move {
                    admin_client(ch).merge_step(r).await
                })
                .await
                .and_then(|resp| decode::<StepOutcome>("merge step outcome", &resp.into_inner().outcome));
            match answer {
                Ok(StepOutcome::NotFrozen(shard)) => last = format!("node {id} is at {shard:?}"),
                Ok(found @ (StepOutcome::Export(_) | StepOutcome::TooLarge { .. })) => return Ok(found),
                Ok(other) => last = format!("node {id} answered {other:?}"),
                Err(s) => last = format!("node {id}: {}", s.message()),
            }
        }
        if Instant::now() >= deadline {
            return Err(ReplicationError::QuorumUnavailable(format!(
                "no replica of shard {right} gave its state frozen at epoch {frozen_epoch}: {last}"
            )));
        }
        tokio::time::sleep(STEP_RETRY_PAUSE).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// What the driver needs from the cluster; the real one talks to shard leaders and the meta
/// group, the tests' one to state machines in memory.
pub(crate) trait MergeOps: Sync {
    /// Runs `step` on its group (`replicas`: where its replicas are), retrying for a while.
    fn step<'a>(&'a self, replicas: &'a [u64], step: MergeStep) -> BoxFuture<'a, Result<StepOutcome, MergeError>>;
    /// Records the merge: the left descriptor gets `merged`, the right one is deleted.
    fn finish(&self, left: u64, right: u64, merged: ShardState) -> BoxFuture<'_, Result<ShardDesc, MergeError>>;
    /// Clears the right descriptor's mark, recording `right_now` as its shard if it is newer.
    fn clear_mark(&self, right: u64, right_now: Option<ShardState>) -> BoxFuture<'_, Result<(), MergeError>>;
}

/// Carries out (or finishes, or undoes) the merge `mark` of `right` into `left` from whatever
/// point it reached. Returns the merged left descriptor.
pub(crate) async fn drive<O: MergeOps>(
    ops: &O,
    left: &ShardDesc,
    right: &ShardDesc,
    mark: &MergeMark,
) -> Result<ShardDesc, MergeError> {
    let (l, r) = (left.id, right.id);
    let frozen_epoch = mark.right_epoch + 1;
    let unexpected = |what: &'static str, group: u64, answer: StepOutcome| MergeError::Unexpected {
        group,
        what,
        answer: format!("{answer:?}"),
    };

    // Has L taken R over already (a driver died before the catalog step)?
    let now = match ops.step(&left.replicas, MergeStep::Describe { group: l }).await? {
        StepOutcome::Done(shard) => shard,
        other => return Err(unexpected("describe", l, other)),
    };
    if absorbed(&now, right, mark) {
        return ops.finish(l, r, now).await;
    }
    if now.epoch != mark.left_epoch {
        let reason = format!(
            "shard {l} changed since the merge was planned (epoch {} -> {})",
            mark.left_epoch, now.epoch
        );
        return Err(abandon(ops, left, right, frozen_epoch, reason).await);
    }

    let frozen = match ops
        .step(
            &right.replicas,
            MergeStep::Freeze {
                group: r,
                expected_epoch: mark.right_epoch,
            },
        )
        .await?
    {
        StepOutcome::Done(shard) => shard,
        // R never froze at this epoch (it changed first), so nothing of it was handed over.
        StepOutcome::Refused { shard, reason } => {
            ops.clear_mark(r, Some(shard)).await?;
            return Err(MergeError::Abandoned {
                left: l,
                right: r,
                reason: format!("shard {r} could not be frozen: {reason}"),
            });
        }
        other => return Err(unexpected("freeze", r, other)),
    };
    debug_assert_eq!(frozen.epoch, frozen_epoch);

    let absorb = MergeStep::Absorb {
        left: l,
        expected_left_epoch: mark.left_epoch,
        right: r,
        right_frozen_epoch: frozen_epoch,
        right_replicas: right.replicas.clone(),
    };
    match ops.step(&left.replicas, absorb).await? {
        StepOutcome::Done(merged) => ops.finish(l, r, merged).await,
        StepOutcome::Refused { shard, .. } if absorbed(&shard, right, mark) => ops.finish(l, r, shard).await,
        // L refused at another epoch: no merge of this mark can apply any more. Or L refused at
        // the planned epoch, for the content, which any retry would carry again.
        StepOutcome::Refused { reason, .. } => Err(abandon(ops, left, right, frozen_epoch, reason).await),
        StepOutcome::TooLarge { limit } => {
            let reason = format!("shard {r} holds more than {limit} bytes; only small shards are merged");
            Err(abandon(ops, left, right, frozen_epoch, reason).await)
        }
        other => Err(unexpected("absorb", l, other)),
    }
}

/// Whether `left_now` (the left shard as its leader serves it) has absorbed `right`.
fn absorbed(left_now: &ShardState, right: &ShardDesc, mark: &MergeMark) -> bool {
    left_now.epoch > mark.left_epoch && left_now.covers(&right.shard)
}

/// Undoes a merge that can no longer apply: R is unfrozen (if the freeze applied) and the mark
/// cleared. Returns the error to report (the reason, or why undoing failed: then the mark stays
/// and the next resume tries again).
async fn abandon<O: MergeOps>(
    ops: &O,
    left: &ShardDesc,
    right: &ShardDesc,
    frozen_epoch: u64,
    reason: String,
) -> MergeError {
    let undo = async {
        let step = MergeStep::Unfreeze {
            group: right.id,
            frozen_epoch,
        };
        // Refused: the freeze never applied (or was already undone); either way R serves.
        let right_now = match ops.step(&right.replicas, step).await? {
            StepOutcome::Done(shard) | StepOutcome::Refused { shard, .. } => shard,
            other => {
                return Err(MergeError::Unexpected {
                    group: right.id,
                    what: "unfreeze",
                    answer: format!("{other:?}"),
                })
            }
        };
        ops.clear_mark(right.id, Some(right_now)).await
    };
    match undo.await {
        Ok(()) => {
            tracing::info!(left = left.id, right = right.id, %reason, "merge abandoned");
            MergeError::Abandoned {
                left: left.id,
                right: right.id,
                reason,
            }
        }
        Err(e) => e,
    }
}

/// The cluster's [`MergeOps`], on the meta leader.
struct ClusterOps<'a> {
    placement: &'a Placement,
}

impl MergeOps for ClusterOps<'_> {
    fn step<'a>(&'a self, replicas: &'a [u64], step: MergeStep) -> BoxFuture<'a, Result<StepOutcome, MergeError>> {
        Box::pin(async move {
            let p = self.placement;
            let (group, what) = (step.group(), step.name());
            let req = MergeStepRequest { step: encode(&step) };
            let deadline = Instant::now() + STEP_DEADLINE;
            let mut last = String::from("no replica of it is known");
            loop {
                let mut answers = Vec::new();
                if p.replicas().get(group).is_some() {
                    answers.push(serve_step(p, req.clone(), false).await);
                }
                let addrs = p.addresses();
                for id in replicas.iter().filter(|id| **id != p.node_id()) {
                    if answers.last().is_some_and(Result::is_ok) {
                        break;
                    }
                    let Some(addr) = addrs.get(id) else { continue };
                    let answer = forwarder(p)
                        .forward(Some(*id), addr, req.clone(), |ch, r| async move {
                            admin_client(ch).merge_step(r).await
                        })
                        .await;
                    answers.push(answer);
                }
                for answer in answers {
                    match answer
                        .and_then(|resp| decode::<StepOutcome>("merge step outcome", &resp.into_inner().outcome))
                    {
                        Ok(outcome) => return Ok(outcome),
                        Err(s) => last = s.message().to_string(),
                    }
                }
                if Instant::now() >= deadline {
                    return Err(MergeError::Unreachable { group, what, last });
                }
                tokio::time::sleep(STEP_RETRY_PAUSE).await;
            }
        })
    }

    fn finish(&self, left: u64, right: u64, merged: ShardState) -> BoxFuture<'_, Result<ShardDesc, MergeError>> {
        Box::pin(async move {
            let desc = self
                .placement
                .change(|view, txn| {
                    let Some(l) = view.shards.get(&left) else {
                        return Err(PlacementError::NotFound(format!("shard {left} is not in the catalog")));
                    };
                    let mut l = l.clone();
                    if l.shard.epoch < merged.epoch {
                        l.shard = merged.clone();
                    }
                    txn.put_shard(&l);
                    if view.shards.contains_key(&right) {
                        txn.delete_shard(right);
                    }
                    Ok(l)
                })
                .await?;
            tracing::info!(left, right, epoch = desc.shard.epoch, "merged shard");
            Ok(desc)
        })
    }

    fn clear_mark(&self, right: u64, right_now: Option<ShardState>) -> BoxFuture<'_, Result<(), MergeError>> {
        Box::pin(async move {
            self.placement
                .change(|view, txn| {
                    let Some(r) = view.shards.get(&right) else {
                        return Ok(());
                    };
                    let mut r = r.clone();
                    r.merge = None;
                    if let Some(now) = &right_now {
                        let same_range = now.start == r.shard.start && now.end == r.shard.end;
                        if same_range && now.epoch > r.shard.epoch {
                            r.shard = now.clone();
                        }
                    }
                    txn.put_shard(&r);
                    Ok(())
                })
                .await?;
            Ok(())
        })
    }
}

/// The shard after `left` in its keyspace, if any.
fn right_neighbour<'a>(view: &'a Catalog, left: &ShardDesc) -> Option<&'a ShardDesc> {
    view.shards_of(left.shard.keyspace)
        .into_iter()
        .find(|s| s.shard.start == left.shard.end)
}

/// Checks that `right` may be marked as merging into `left` in `view`.
fn check_mergeable(view: &Catalog, left: &ShardDesc, right: &ShardDesc) -> Result<(), PlacementError> {
    if right.shard.keyspace != left.shard.keyspace || right.shard.start != left.shard.end {
        return Err(PlacementError::Invalid(format!(
            "shard {} does not follow shard {} in its keyspace",
            right.id, left.id
        )));
    }
    if let Some((d, m)) = [left, right].iter().find_map(|d| d.moving.map(|m| (d, m))) {
        return Err(PlacementError::Conflict(format!(
            "shard {} is moving a replica from node {} to node {}; merge once the move has finished",
            d.id, m.from, m.to
        )));
    }
    if left.merge.is_some() {
        return Err(PlacementError::Conflict(format!(
            "shard {} is being merged into its own left neighbour",
            left.id
        )));
    }
    if let Some(other) = view.shards.values().find(|s| {
        s.id != right.id
            && s.merge
                .as_ref()
                .is_some_and(|m| m.into == left.id || m.into == right.id)
    }) {
        return Err(PlacementError::Conflict(format!(
            "shard {} is being merged into a neighbour of this merge",
            other.id
        )));
    }
    Ok(())
}

/// A user's merge of shard `left` with its right neighbour (`right`, or whichever shard follows
/// `left` now), driven here on the meta leader. Elsewhere it fails with the meta group's
/// `NotLeader`, for the caller to forward. A retry naming a `right` that is gone answers with the
/// left shard as it is: the merge it asked for was carried out.
///
/// The merge runs on a task of its own: a caller that stops waiting (its deadline, a dropped
/// connection) does not stop it halfway, which would leave the right shard frozen until the next
/// resume.
pub async fn merge_shard(p: &Placement, left: u64, right: Option<u64>) -> Result<ShardDesc, PlacementError> {
    let p = p.clone();
    tokio::spawn(async move { merge_now(&p, left, right).await })
        .await
        .map_err(|e| PlacementError::Conflict(format!("the merge task ended: {e}")))?
}

async fn merge_now(p: &Placement, left: u64, right: Option<u64>) -> Result<ShardDesc, PlacementError> {
    let meta = p.meta();
    if meta.status().role != Role::Leader {
        return Err(PlacementError::Replication(not_leader(&meta)));
    }
    let _driving = p.merge_lock().lock().await;
    meta.read_barrier().await?;
    let view = p.catalog()?;
    let l = view
        .shards
        .get(&left)
        .ok_or_else(|| PlacementError::NotFound(format!("shard {left} does not exist")))?
        .clone();
    let r = match right {
        Some(id) => match view.shards.get(&id) {
            Some(r) => r.clone(),
            None if id <= view.last_group_id => return Ok(l),
            None => return Err(PlacementError::NotFound(format!("shard {id} does not exist"))),
        },
        None => right_neighbour(&view, &l)
            .ok_or_else(|| {
                PlacementError::Invalid(format!(
                    "shard {left} is the last shard of its keyspace; it has no right neighbour to merge with"
                ))
            })?
            .clone(),
    };
    let (r_id, l_id) = (r.id, l.id);
    let mark = match &r.merge {
        Some(m) if m.into == l_id => m.clone(),
        Some(m) => {
            return Err(PlacementError::Conflict(format!(
                "shard {r_id} is already being merged into shard {}",
                m.into
            )))
        }
        None => {
            p.change(|view, txn| {
                let (Some(l), Some(r)) = (view.shards.get(&l_id), view.shards.get(&r_id)) else {
                    return Err(PlacementError::Conflict(format!(
                        "shard {l_id} or {r_id} disappeared while the merge was being planned"
                    )));
                };
                check_mergeable(view, l, r)?;
                let mark = MergeMark {
                    into: l_id,
                    left_epoch: l.shard.epoch,
                    right_epoch: r.shard.epoch,
                };
                let mut marked = r.clone();
                marked.merge = Some(mark.clone());
                txn.put_shard(&marked);
                // Unchanged, but compared: the plan holds only for this version of the left one.
                txn.put_shard(l);
                Ok(mark)
            })
            .await?
        }
    };
    tracing::info!(left = l_id, right = r_id, ?mark, "merging shards");
    let view = p.catalog()?;
    let (Some(l), Some(r)) = (view.shards.get(&l_id), view.shards.get(&r_id)) else {
        return Err(PlacementError::Conflict(
            "the shards changed while the merge started".into(),
        ));
    };
    Ok(drive(&ClusterOps { placement: p }, l, r, &mark).await?)
}

/// Finishes or undoes every merge the catalog records as under way. Call it on the meta leader,
/// as often as the placement loop ticks; elsewhere, or while a merge is being driven on this node,
/// it returns at once (`Ok(0)`). Returns how many marked merges it worked on; each one that can
/// make no progress now (a shard's replicas unreachable) is left marked for the next call, and
/// its error logged.
pub async fn resume_merges(p: &Placement) -> Result<usize, PlacementError> {
    let meta = p.meta();
    if meta.status().role != Role::Leader || !p.cached()?.shards.values().any(|s| s.merge.is_some()) {
        return Ok(0);
    }
    let Ok(_driving) = p.merge_lock().try_lock() else {
        return Ok(0);
    };
    meta.read_barrier().await?;
    let view = p.catalog()?;
    let mut worked = 0;
    for right in view.shards.values() {
        let Some(mark) = &right.merge else { continue };
        let Some(left) = view.shards.get(&mark.into) else {
            // Only a dropped keyspace removes the left shard, and it removes the right one too.
            continue;
        };
        worked += 1;
        match drive(&ClusterOps { placement: p }, left, right, mark).await {
            Ok(_) => tracing::info!(left = left.id, right = right.id, "resumed and finished a merge"),
            Err(e) => tracing::warn!(left = left.id, right = right.id, error = %e, "resuming a merge"),
        }
    }
    Ok(worked)
}

/// Removes this node's leftover replicas of merged-away groups: a local group the catalog does not
/// have, whose whole range catalog shards of newer epochs cover (see the module docs). The data
/// that other local replicas serve stays. Called by the reconciler with its catalog view.
pub async fn collect_merged_replicas(p: &Placement, view: &Catalog) -> Result<(), PlacementError> {
    for (group, shard) in p.replicas().shards() {
        if group == META_GROUP || view.shards.contains_key(&group) || view.dropped(shard.keyspace) {
            continue;
        }
        if stale(view, &shard) {
            p.replicas().retire_stale(group).await?;
        }
    }
    Ok(())
}

/// Whether catalog shards of a newer epoch than `shard`'s cover its whole range.
fn stale(view: &Catalog, shard: &ShardState) -> bool {
    let mut from = shard.start.clone();
    for c in view.shards_of(shard.keyspace) {
        if !c.shard.overlaps(shard) {
            continue;
        }
        if c.shard.epoch <= shard.epoch || c.shard.start > from {
            return false;
        }
        from = from.max(c.shard.end.clone());
    }
    from >= shard.end
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;

    use basalt_storage::{ApplyEntry, MemoryEngine};
    use basalt_storage::{KvStateMachine, DEFAULT_KEYSPACE};

    use super::*;

    const L: u64 = 2;
    const R: u64 = 3;

    type Interleave = Box<dyn FnOnce(&mut HashMap<u64, KvStateMachine>) + Send>;

    /// Two neighbouring shards as state machines in memory and a catalog as a map: the driver's
    /// decisions against real apply-time checks, without a cluster.
    struct FakeOps {
        sms: Mutex<HashMap<u64, KvStateMachine>>,
        catalog: Mutex<BTreeMap<u64, ShardDesc>>,
        /// Runs just before the absorb step (another change getting in between).
        before_absorb: Mutex<Option<Interleave>>,
        /// The export limit the left leader applies.
        limit: u64,
        steps: Mutex<Vec<&'static str>>,
    }

    fn apply_one(sm: &mut KvStateMachine, command: Command) -> WriteResponse {
        let request = WriteRequest { session: None, command };
        let index = sm.applied_meta().map_or(1, |_| sm.applied_index() + 1);
        let entry = ApplyEntry {
            index,
            request: Some(&request),
        };
        match request.command {
            Command::Merge { .. } => sm.apply_merge(index, &request, vec![]).unwrap(),
            Command::Split { .. } => sm.apply_split(index, &request, vec![], vec![]).unwrap(),
            _ => sm.apply(&[entry], index, vec![]).unwrap().remove(0),
        }
    }

    fn outcome(r: WriteResponse) -> StepOutcome {
        match r {
            WriteResponse::Frozen { shard } | WriteResponse::Unfrozen { shard } | WriteResponse::Merged { shard } => {
                StepOutcome::Done(shard)
            }
            WriteResponse::MergeRefused { shard, reason } => StepOutcome::Refused { shard, reason },
            other => panic!("unexpected {other:?}"),
        }
    }

    impl FakeOps {
        /// The default keyspace split at "m" into L and R (both at epoch 2), `keys` written to R,
        /// and the catalog marking R as merging into L at those epochs.
        fn new(keys: usize, limit: u64) -> FakeOps {
            let engine = MemoryEngine::new();
            let whole = ShardState::whole_keyspace(DEFAULT_KEYSPACE, false);
            let mut left = KvStateMachine::open(engine.clone(), L, whole.clone()).unwrap();
            let WriteResponse::Split { left: ls, right: rs } = apply_one(
                &mut left,
                Command::Split {
                    at: whole.data_key(b"m"),
                    new_group: R,
                    expected_epoch: 1,
                },
            ) else {
                panic!("split refused")
            };
            let mut right = KvStateMachine::open(engine.clone(), R, rs.clone()).unwrap();
            for n in 0..keys {
                apply_one(
                    &mut right,
                    Command::Put {
                        key: format!("r{n:04}").into_bytes(),
                        value: vec![b'v'; 100],
                    },
                );
            }
            let desc = |id, shard: ShardState, merge| ShardDesc {
                id,
                shard,
                replicas: vec![1, 2, 3],
                bootstrap: false,
                moving: None,
                merge,
            };
            let mark = MergeMark {
                into: L,
                left_epoch: 2,
                right_epoch: 2,
            };
            FakeOps {
                sms: Mutex::new(HashMap::from([(L, left), (R, right)])),
                catalog: Mutex::new(BTreeMap::from([(L, desc(L, ls, None)), (R, desc(R, rs, Some(mark)))])),
                before_absorb: Mutex::new(None),
                limit,
                steps: Mutex::new(Vec::new()),
            }
        }

        async fn drive(&self) -> Result<ShardDesc, MergeError> {
            let (left, right) = {
                let c = self.catalog.lock().unwrap();
                (c[&L].clone(), c[&R].clone())
            };
            let mark = right.merge.clone().expect("R is marked");
            drive(self, &left, &right, &mark).await
        }

        fn shard(&self, group: u64) -> ShardState {
            self.sms.lock().unwrap()[&group].shard().clone()
        }

        fn steps(&self) -> Vec<&'static str> {
            self.steps.lock().unwrap().clone()
        }
    }

    impl MergeOps for FakeOps {
        fn step<'a>(&'a self, _: &'a [u64], step: MergeStep) -> BoxFuture<'a, Result<StepOutcome, MergeError>> {
            Box::pin(async move {
                self.steps.lock().unwrap().push(step.name());
                if matches!(step, MergeStep::Absorb { .. }) {
                    if let Some(f) = self.before_absorb.lock().unwrap().take() {
                        f(&mut self.sms.lock().unwrap());
                    }
                }
                let mut sms = self.sms.lock().unwrap();
                Ok(match step {
                    MergeStep::Freeze { group, expected_epoch } => outcome(apply_one(
                        sms.get_mut(&group).unwrap(),
                        Command::Freeze { expected_epoch },
                    )),
                    MergeStep::Unfreeze { group, frozen_epoch } => outcome(apply_one(
                        sms.get_mut(&group).unwrap(),
                        Command::Unfreeze { frozen_epoch },
                    )),
                    MergeStep::Describe { group } => StepOutcome::Done(sms[&group].shard().clone()),
                    MergeStep::Export { .. } => panic!("the driver never exports itself"),
                    MergeStep::Absorb {
                        left,
                        expected_left_epoch,
                        right,
                        right_frozen_epoch,
                        ..
                    } => match sms[&right].export_for_merge(self.limit).unwrap() {
                        MergeExport::Ready(source) if source.shard.epoch == right_frozen_epoch => outcome(apply_one(
                            sms.get_mut(&left).unwrap(),
                            Command::Merge {
                                right_group: right,
                                expected_left_epoch,
                                source,
                            },
                        )),
                        MergeExport::TooLarge { limit } => StepOutcome::TooLarge { limit },
                        other => panic!("export: {other:?}"),
                    },
                })
            })
        }

        fn finish(&self, left: u64, right: u64, merged: ShardState) -> BoxFuture<'_, Result<ShardDesc, MergeError>> {
            Box::pin(async move {
                let mut c = self.catalog.lock().unwrap();
                c.remove(&right);
                let l = c.get_mut(&left).unwrap();
                l.shard = merged;
                Ok(l.clone())
            })
        }

        fn clear_mark(&self, right: u64, right_now: Option<ShardState>) -> BoxFuture<'_, Result<(), MergeError>> {
            Box::pin(async move {
                let mut c = self.catalog.lock().unwrap();
                let r = c.get_mut(&right).unwrap();
                r.merge = None;
                if let Some(now) = right_now {
                    r.shard = now;
                }
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_merge_runs_freeze_absorb_and_records_the_result() {
        let ops = FakeOps::new(20, MAX_MERGE_BYTES);
        let merged = ops.drive().await.expect("merge");
        assert_eq!(merged.id, L);
        assert_eq!(merged.shard, ops.shard(L));
        assert_eq!(merged.shard.end, keycodec_end());
        assert_eq!(merged.shard.epoch, 4, "past the frozen right side's epoch 3");
        assert!(ops.catalog.lock().unwrap().get(&R).is_none());
        assert_eq!(
            ops.sms.lock().unwrap()[&L].get(b"r0007").unwrap(),
            Some(vec![b'v'; 100])
        );
        assert_eq!(ops.steps(), vec!["describe", "freeze", "absorb"]);
        // Driving the same mark again (a resumed driver) only finishes the catalog step.
        let again = {
            let right = ShardDesc {
                merge: None,
                ..merged.clone()
            };
            let right = ShardDesc {
                id: R,
                shard: ShardState {
                    start: ops.shard(L).data_key(b"m"),
                    epoch: 2,
                    ..right.shard
                },
                ..right
            };
            let left = ops.catalog.lock().unwrap()[&L].clone();
            drive(
                &ops,
                &left,
                &right,
                &MergeMark {
                    into: L,
                    left_epoch: 2,
                    right_epoch: 2,
                },
            )
            .await
            .expect("resumed")
        };
        assert_eq!(again.shard, merged.shard);
        assert_eq!(&ops.steps()[3..], ["describe"]);
    }

    fn keycodec_end() -> Vec<u8> {
        basalt_proto::keycodec::keyspace_range(DEFAULT_KEYSPACE).1
    }

    #[tokio::test]
    async fn a_merge_whose_left_side_split_in_between_is_undone() {
        let ops = FakeOps::new(5, MAX_MERGE_BYTES);
        *ops.before_absorb.lock().unwrap() = Some(Box::new(|sms: &mut HashMap<u64, KvStateMachine>| {
            let left = sms.get_mut(&L).unwrap();
            let at = left.shard().data_key(b"c");
            let r = apply_one(
                left,
                Command::Split {
                    at,
                    new_group: 9,
                    expected_epoch: 2,
                },
            );
            assert!(matches!(r, WriteResponse::Split { .. }));
        }));
        let err = ops.drive().await.expect_err("refused");
        assert!(matches!(err, MergeError::Abandoned { left: L, right: R, .. }), "{err}");
        assert_eq!(ops.steps(), vec!["describe", "freeze", "absorb", "unfreeze"]);
        // The right side serves writes again, at a new epoch the catalog records, unmarked.
        let right = ops.shard(R);
        assert!(!right.frozen && right.epoch == 4, "{right:?}");
        let put = apply_one(
            ops.sms.lock().unwrap().get_mut(&R).unwrap(),
            Command::Put {
                key: b"x".to_vec(),
                value: b"1".to_vec(),
            },
        );
        assert_eq!(put, WriteResponse::Put);
        let c = ops.catalog.lock().unwrap();
        assert_eq!((c[&R].merge.clone(), c[&R].shard.clone()), (None, right));
        assert_eq!(c[&L].shard.epoch, 2, "the left descriptor was not touched");
        assert!(ops.sms.lock().unwrap()[&L].get(b"r0001").is_err(), "nothing was merged");
    }

    #[tokio::test]
    async fn a_resumed_merge_whose_left_side_moved_on_unfreezes_the_right_side() {
        let ops = FakeOps::new(5, MAX_MERGE_BYTES);
        {
            // A driver froze R, then died; L split meanwhile.
            let mut sms = ops.sms.lock().unwrap();
            apply_one(sms.get_mut(&R).unwrap(), Command::Freeze { expected_epoch: 2 });
            let left = sms.get_mut(&L).unwrap();
            let at = left.shard().data_key(b"c");
            apply_one(
                left,
                Command::Split {
                    at,
                    new_group: 9,
                    expected_epoch: 2,
                },
            );
        }
        assert!(matches!(ops.drive().await, Err(MergeError::Abandoned { .. })));
        assert_eq!(ops.steps(), vec!["describe", "unfreeze"]);
        assert!(!ops.shard(R).frozen);
        assert!(ops.catalog.lock().unwrap()[&R].merge.is_none());
    }

    #[tokio::test]
    async fn a_right_side_too_large_is_not_merged_and_unfrozen() {
        let ops = FakeOps::new(50, 1_000);
        let err = ops.drive().await.expect_err("too large");
        assert!(err.to_string().contains("more than 1000 bytes"), "{err}");
        assert!(!ops.shard(R).frozen);
        assert_eq!(ops.shard(L).epoch, 2);
        assert!(ops.catalog.lock().unwrap()[&R].merge.is_none());
    }

    #[tokio::test]
    async fn a_right_side_that_changed_before_its_freeze_is_left_alone() {
        let ops = FakeOps::new(5, MAX_MERGE_BYTES);
        {
            let mut sms = ops.sms.lock().unwrap();
            let right = sms.get_mut(&R).unwrap();
            apply_one(right, Command::Freeze { expected_epoch: 2 });
            apply_one(right, Command::Unfreeze { frozen_epoch: 3 });
        }
        assert!(matches!(ops.drive().await, Err(MergeError::Abandoned { .. })));
        assert_eq!(ops.steps(), vec!["describe", "freeze"]);
        let c = ops.catalog.lock().unwrap();
        assert!(c[&R].merge.is_none());
        assert_eq!(c[&R].shard.epoch, 4);
    }

    #[test]
    fn a_local_group_is_stale_only_when_newer_catalog_shards_cover_it() {
        let whole = ShardState::whole_keyspace(DEFAULT_KEYSPACE, false);
        let at = |k: &[u8]| whole.data_key(k);
        let shard = |start: Vec<u8>, end: Vec<u8>, epoch| ShardState {
            start,
            end,
            epoch,
            ..whole.clone()
        };
        let mut view = Catalog::default();
        let put = |view: &mut Catalog, id, s: ShardState| {
            view.shards.insert(
                id,
                ShardDesc {
                    id,
                    shard: s,
                    replicas: vec![1],
                    bootstrap: false,
                    moving: None,
                    merge: None,
                },
            );
        };
        put(&mut view, 2, shard(whole.start.clone(), at(b"m"), 4));
        put(&mut view, 5, shard(at(b"m"), whole.end.clone(), 6));
        // A merged-away group inside shard 2's range, at an older epoch.
        assert!(stale(&view, &shard(at(b"c"), at(b"f"), 3)));
        // Spanning both catalog shards, both newer.
        assert!(stale(&view, &shard(at(b"c"), at(b"x"), 3)));
        // A split child not recorded yet: its epoch is the parent's new one, above the catalog's.
        assert!(!stale(&view, &shard(at(b"c"), at(b"f"), 5)));
        assert!(!stale(&view, &shard(at(b"c"), at(b"x"), 4)), "shard 2 is not newer");
        // Catalog shards that leave a gap prove nothing.
        view.shards.remove(&5);
        assert!(!stale(&view, &shard(at(b"c"), at(b"x"), 1)));
    }
}
