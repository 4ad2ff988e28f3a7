//! Moving one replica of a shard from node `from` to node `to`, as a sequence of safe steps.
//!
//! 1. The catalog names `to` as the move's newcomer ([`Placement::begin_move`]); `to`'s
//!    reconciler opens an empty replica of the group.
//! 2. The shard's leader snapshots and compacts its log, then adds `to`: as a learner first,
//!    filled from that snapshot and caught up, then as a voter (a joint-consensus change).
//! 3. The shard's leader removes `from` (handing leadership away first if it is `from`).
//! 4. The catalog drops `from` and lists `to` ([`Placement::finish_move`]); `from`'s
//!    reconciler destroys its replica.
//!
//! At no point does the group depend on fewer replicas than it had: the newcomer votes only
//! once it has caught up, and the leaver goes only after that. Every step is idempotent (adding
//! a voter that is one already, removing a node that is gone), so a driver that loses the meta
//! leadership midway leaves a move its successor finishes by running the same steps again
//! ([`continue_move`]). A newcomer that is no longer a live member is dropped again and the move
//! abandoned ([`abort_move`]).

use basalt_proto::v1::ChangeShardReplicasRequest;
use tonic::Status;

use crate::catalog::{ReplicaMove, ShardDesc};
use crate::forward::Forwarder;
use crate::placement::{Placement, PlacementError};
use crate::shard_call::on_shard_leader;

fn step_failed(step: &str, shard: u64, s: Status) -> PlacementError {
    match s.code() {
        tonic::Code::NotFound => PlacementError::NotFound(format!("shard {shard}: {}", s.message())),
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            PlacementError::Invalid(format!("{step} of shard {shard} refused: {}", s.message()))
        }
        _ => PlacementError::Conflict(format!("{step} of shard {shard} did not finish: {}", s.message())),
    }
}

/// Moves the replica of `shard` on `from` to `to` (all four steps).
pub async fn move_replica(
    p: &Placement,
    forwarder: &Forwarder,
    shard: u64,
    from: u64,
    to: u64,
) -> Result<ShardDesc, PlacementError> {
    if from == to {
        return Err(PlacementError::Invalid("--from and --to name the same node".into()));
    }
    if !p.addresses().contains_key(&to) {
        return Err(PlacementError::Invalid(format!(
            "node {to} is not a member of the cluster"
        )));
    }
    p.begin_move(shard, from, to).await?;
    continue_move(p, forwarder, shard, ReplicaMove { from, to }).await
}

/// Runs steps 2 to 4 of a move the catalog records.
pub async fn continue_move(
    p: &Placement,
    forwarder: &Forwarder,
    shard: u64,
    m: ReplicaMove,
) -> Result<ShardDesc, PlacementError> {
    let Some(addr) = p.addresses().get(&m.to).cloned() else {
        return Err(PlacementError::Invalid(format!(
            "node {} is no longer a member; the move must be abandoned",
            m.to
        )));
    };
    let add = ChangeShardReplicasRequest {
        shard_id: shard,
        add_node: m.to,
        add_address: addr,
        remove_node: 0,
    };
    on_shard_leader(p, forwarder, shard, add, |mut c, r| async move {
        c.change_shard_replicas(r).await
    })
    .await
    .map_err(|s| step_failed("adding the new replica", shard, s))?;
    let remove = ChangeShardReplicasRequest {
        shard_id: shard,
        add_node: 0,
        add_address: String::new(),
        remove_node: m.from,
    };
    on_shard_leader(p, forwarder, shard, remove, |mut c, r| async move {
        c.change_shard_replicas(r).await
    })
    .await
    .map_err(|s| step_failed("removing the old replica", shard, s))?;
    let d = p.finish_move(shard, m).await?;
    tracing::info!(shard, from = m.from, to = m.to, "moved replica");
    Ok(d)
}

/// Drops the newcomer from the group again (if it got in) and clears the move.
pub async fn abort_move(
    p: &Placement,
    forwarder: &Forwarder,
    shard: u64,
    m: ReplicaMove,
) -> Result<(), PlacementError> {
    let remove = ChangeShardReplicasRequest {
        shard_id: shard,
        add_node: 0,
        add_address: String::new(),
        remove_node: m.to,
    };
    on_shard_leader(p, forwarder, shard, remove, |mut c, r| async move {
        c.change_shard_replicas(r).await
    })
    .await
    .map_err(|s| step_failed("removing the abandoned newcomer", shard, s))?;
    p.abort_move(shard, m).await?;
    tracing::info!(shard, from = m.from, to = m.to, "abandoned replica move");
    Ok(())
}
