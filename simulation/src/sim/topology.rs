//! The `topology` fault kind: shard splits, merges, replica moves and leader transfers under the
//! workload, and reading the final state of a keyspace whose shards live on different nodes.
//!
//! The workload runs on a range keyspace of its own ([`KEYSPACE`], 3 replicas) so that a cluster
//! of more than 3 nodes has somewhere to move replicas to; the default keyspace's group always
//! spans every founder. The operator works through the real Admin API, as `basaltctl` would, so
//! each change goes through the server's own checks (epochs, merge marks, moves recorded in the
//! catalog) and races the placement driver, which runs as usual.
//!
//! What a change picks is derived from its `pick` and the shard list it reads when it runs, so a
//! run stays a function of its seed. A change the cluster refuses or that times out (a fault is
//! in force, the shard just split) is logged and the schedule goes on: the checkers, not the
//! operator, decide whether the run is good.
//!
//! The final state ([`final_states`]) is read per shard, on each node the catalog names as its
//! replica, once every such replica has applied all its group committed and agrees with the
//! catalog on the shard's range and epoch. A node's state therefore holds exactly the keys of
//! the shards it replicates, which is what the convergence checker compares key by key.

use std::collections::BTreeMap;
use std::time::Duration;

use basalt_client::{Client, Sharding};
use basalt_consensus::Replication;
use basalt_proto::keycodec;
use basalt_proto::v1::Shard;
use bytes::Bytes;
use parking_lot::Mutex;

use super::nemesis::{TopologyAction, TopologyChange};
use super::{elapsed, note, ReplicaSlot, RECOVERY_LIMIT};
use crate::workload::State;

/// The keyspace the workload uses when topology changes are on.
pub const KEYSPACE: &str = "sim";
/// Its replication factor.
const REPLICAS: u32 = 3;

/// Creates the workload keyspace, retrying until the cluster has accepted it.
pub(crate) async fn create_keyspace(client: &Client) -> Result<(), String> {
    let deadline = elapsed() + RECOVERY_LIMIT;
    loop {
        match client.create_keyspace(KEYSPACE, Sharding::Range, 1, REPLICAS).await {
            Ok(_) => return Ok(()),
            // A retried create whose first attempt landed.
            Err(_) if client.describe_keyspace(KEYSPACE).await.is_ok() => return Ok(()),
            Err(e) if elapsed() > deadline => return Err(format!("creating keyspace {KEYSPACE}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs `changes` at their times through `client`, logging each outcome.
pub(crate) async fn operate(
    client: &Client,
    changes: &[TopologyChange],
    keys: &[String],
    nodes: &[u64],
    log: &Mutex<Vec<(f64, String)>>,
) {
    for change in changes {
        tokio::time::sleep(change.at.saturating_sub(elapsed())).await;
        let what = match apply(client, change, keys, nodes).await {
            Ok(done) => done,
            Err(e) => format!("topology: {:?} failed: {e}", change.action),
        };
        note(log, what);
    }
}

async fn apply(client: &Client, change: &TopologyChange, keys: &[String], nodes: &[u64]) -> Result<String, String> {
    let shards = client
        .list_shards(Some(KEYSPACE), false)
        .await
        .map_err(|e| format!("listing shards: {e}"))?;
    if shards.is_empty() {
        return Err("the keyspace has no shards".into());
    }
    let pick = change.pick as usize;
    let shard = &shards[pick % shards.len()];
    match change.action {
        TopologyAction::Split => {
            // A workload key strictly inside the shard, so the keys really change shards.
            let inside: Vec<&String> = keys
                .iter()
                .filter(|k| {
                    let stored = keycodec::encode_key(shard.keyspace_id, false, k.as_bytes());
                    stored.as_slice() > shard.start.as_ref()
                        && (shard.end.is_empty() || stored.as_slice() < shard.end.as_ref())
                })
                .collect();
            let Some(at) = inside.get(pick / shards.len() % inside.len().max(1)) else {
                return Ok(format!("topology: shard {} holds no key to split at", shard.id));
            };
            let split = client
                .split_shard(shard.id, Some(Bytes::from((*at).clone())))
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "topology: split shard {} at {at:?} into {} and {}",
                shard.id, split.left.id, split.right.id
            ))
        }
        TopologyAction::Merge => {
            if shards.len() < 2 {
                return Ok("topology: one shard, nothing to merge".into());
            }
            // Any shard but the last has a right neighbour.
            let left = &shards[pick % (shards.len() - 1)];
            client.merge_shard(left.id).await.map_err(|e| e.to_string())?;
            Ok(format!("topology: merged shard {} with its right neighbour", left.id))
        }
        TopologyAction::Move => {
            let holders: Vec<u64> = shard.replicas.iter().map(|r| r.node_id).collect();
            let free: Vec<u64> = nodes.iter().copied().filter(|n| !holders.contains(n)).collect();
            if free.is_empty() || holders.is_empty() {
                return Ok(format!("topology: no node to move shard {} to", shard.id));
            }
            let from = holders[pick % holders.len()];
            let to = free[pick / holders.len() % free.len()];
            client.move_shard(shard.id, from, to).await.map_err(|e| e.to_string())?;
            Ok(format!(
                "topology: moved shard {}'s replica from node {from} to node {to}",
                shard.id
            ))
        }
        TopologyAction::TransferLeader => {
            let others: Vec<u64> = shard
                .replicas
                .iter()
                .map(|r| r.node_id)
                .filter(|n| *n != shard.leader_id)
                .collect();
            let Some(&to) = others.get(pick % others.len().max(1)) else {
                return Ok(format!("topology: shard {} has no other replica", shard.id));
            };
            client
                .transfer_shard_leader(shard.id, to)
                .await
                .map_err(|e| e.to_string())?;
            Ok(format!("topology: shard {}'s leadership to node {to}", shard.id))
        }
    }
}

/// Each node's final state of the workload keyspace: the keys of the shards the catalog places
/// on it, read from its own replicas once they have caught up (see the module docs).
pub(crate) async fn final_states(
    client: &Client,
    keys: &[String],
    slots: &BTreeMap<u64, ReplicaSlot>,
) -> Result<BTreeMap<u64, State>, String> {
    let deadline = elapsed() + RECOVERY_LIMIT;
    loop {
        let why = match client.list_shards(Some(KEYSPACE), false).await {
            Ok(shards) => match read_settled(&shards, keys, slots) {
                Ok(states) => return Ok(states),
                Err(why) => why,
            },
            Err(e) => format!("listing shards: {e}"),
        };
        if elapsed() > deadline {
            let all = client.list_shards(None, false).await.map(|v| {
                v.iter()
                    .map(|s| {
                        format!(
                            "{}:{}:{:?}",
                            s.id,
                            s.keyspace,
                            s.replicas.iter().map(|r| r.node_id).collect::<Vec<_>>()
                        )
                    })
                    .collect::<Vec<_>>()
            });
            let groups: Vec<String> = slots
                .iter()
                .filter_map(|(id, slot)| Some((id, slot.lock().replicas.upgrade()?)))
                .map(|(id, replicas)| {
                    let mut local: Vec<String> = replicas
                        .all()
                        .iter()
                        .map(|g| {
                            let s = g.status();
                            let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
                            format!(
                                "g{}:{:?}/t{}/leader {:?}/voters {voters:?}/applied {}",
                                g.group_id(),
                                s.role,
                                s.term,
                                s.leader_id,
                                s.applied_index
                            )
                        })
                        .collect();
                    local.sort();
                    format!("node {id}: {}", local.join(", "))
                })
                .collect();
            return Err(format!(
                "the workload keyspace did not settle: {why}; all shards {all:?}; groups: {}",
                groups.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The states if every shard of `shards` is settled on every node that should hold it.
fn read_settled(
    shards: &[Shard],
    keys: &[String],
    slots: &BTreeMap<u64, ReplicaSlot>,
) -> Result<BTreeMap<u64, State>, String> {
    let mut states: BTreeMap<u64, State> = BTreeMap::new();
    let mut placed = 0;
    for shard in shards {
        if shard.moving_to != 0 {
            return Err(format!("shard {} is moving a replica", shard.id));
        }
        let mut groups = Vec::new();
        for r in &shard.replicas {
            let node = r.node_id;
            let replicas = slots
                .get(&node)
                .and_then(|s| s.lock().replicas.upgrade())
                .ok_or_else(|| format!("node {node} is down"))?;
            let group = replicas.get(shard.id).ok_or_else(|| {
                format!(
                    "node {node} has no replica of shard {} (replicas {:?}; it holds {:?})",
                    shard.id,
                    shard.replicas.iter().map(|r| r.node_id).collect::<Vec<_>>(),
                    replicas.shards().keys().collect::<Vec<_>>()
                )
            })?;
            let local = replicas.shards().get(&shard.id).cloned();
            if local.as_ref().is_none_or(|l| {
                l.epoch != shard.epoch
                    || l.start.as_slice() != shard.start.as_ref()
                    || l.end.as_slice() != shard.end.as_ref()
            }) {
                return Err(format!(
                    "node {node}'s shard {} is not the catalog's yet: {local:?}",
                    shard.id
                ));
            }
            groups.push((node, group));
        }
        let commit = groups.iter().map(|(_, g)| g.status().commit_index).max().unwrap_or(0);
        if let Some((node, _)) = groups.iter().find(|(_, g)| g.status().applied_index != commit) {
            return Err(format!("node {node} has not applied shard {}'s log", shard.id));
        }
        for (node, group) in groups {
            let reader = group.reader();
            let state = states.entry(node).or_default();
            for key in keys {
                let stored = keycodec::encode_key(shard.keyspace_id, false, key.as_bytes());
                if stored.as_slice() < shard.start.as_ref()
                    || (!shard.end.is_empty() && stored.as_slice() >= shard.end.as_ref())
                {
                    continue;
                }
                let v = reader.get(key.as_bytes()).map_err(|e| format!("node {node}: {e}"))?;
                state.insert(key.clone(), v.map(|b| String::from_utf8_lossy(&b).into_owned()));
                placed += 1;
            }
        }
    }
    // Every key on exactly REPLICAS nodes, or the shards do not cover the keyspace.
    if placed != keys.len() * REPLICAS as usize {
        return Err(format!(
            "{placed} key replicas read, expected {}",
            keys.len() * REPLICAS as usize
        ));
    }
    Ok(states)
}
