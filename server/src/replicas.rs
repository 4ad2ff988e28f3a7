//! The replicas hosted on this node: every group's replica, opened, created and found by key.
//!
//! All replicas share the node's one engine, one group-commit writer and one connection per
//! peer (the [`PeerClients`] pool); a replica is its openraft instance, its state machine over
//! its shard's key range, and a snapshot directory.
//!
//! Invariants and why:
//! - **The engine lists the replicas** (`keys::replica_key`): a replica is recorded before its
//!   group first runs (in the same batch as the split that creates it, or before a new group's
//!   bootstrap), so a restart reopens exactly the replicas the node had.
//! - **Local ranges never overlap.** Replicas are created only from a split of a local replica
//!   (which hands over the keys it gives up, atomically) or for a range no local replica covers.
//!   Two local replicas over one key would write the same engine keys. A merge widens a replica
//!   over its neighbour's range only after the neighbour's local replica was retired
//!   ([`Replicas::claim`]), and a leftover replica of a merged-away group is removed keeping the
//!   data other local replicas own ([`Replicas::retire_stale`]); the two run under one lock, so
//!   the second never deletes data the first just handed to the merged replica. (Not under the
//!   creation lock: a replica being opened replays its log, merges included, while that is held.)
//! - **Lookup by key trusts the state machines, not the index**: the index (shard start → group)
//!   is a cache refreshed when a lookup finds it stale; the group's own applied shard decides.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use basalt_consensus::clock::Clock;
use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::raft::peer_service::GroupRegistry;
use basalt_consensus::raft::reads::PlantedReadBug;
use basalt_consensus::raft::{ClaimHook, RaftGroup, RaftGroupConfig, SplitHook};
use basalt_consensus::{ConsensusMetrics, Replication, ReplicationError};
use basalt_storage::keys::{decode_replica_key, replica_key, replica_range};
use basalt_storage::record::{decode_record, encode_record};
use basalt_storage::{Cf, Engine, GroupCommitWriter, ShardState, StorageError, WriteBatch};
use parking_lot::RwLock;

use crate::config::NodeConfig;

/// Everything needed to open one more replica on this node.
pub struct Replicas {
    node_id: u64,
    cfg: NodeConfig,
    engine: Arc<dyn Engine>,
    writer: Arc<GroupCommitWriter>,
    peers: PeerClients,
    metrics: ConsensusMetrics,
    registry: GroupRegistry,
    /// Shard start → group id, per keyspace; a cache (see the module docs).
    index: RwLock<BTreeMap<Vec<u8>, u64>>,
    /// Serialises creation so that two paths (a split hook and the reconciler) never open the same
    /// group twice.
    creating: tokio::sync::Mutex<()>,
    /// Serialises claims (a replica widening over merged-away ones) with the removal of leftover
    /// merged-away replicas.
    claims: tokio::sync::Mutex<()>,
    on_split: RwLock<Option<SplitHook>>,
    on_claim: RwLock<Option<ClaimHook>>,
    /// The node's wall clock, for closed timestamps.
    clock: Clock,
    planted_read_bug: Option<PlantedReadBug>,
}

impl Replicas {
    pub fn new(
        cfg: NodeConfig,
        engine: Arc<dyn Engine>,
        writer: Arc<GroupCommitWriter>,
        peers: PeerClients,
        metrics: ConsensusMetrics,
        clock: Clock,
        planted_read_bug: Option<PlantedReadBug>,
    ) -> Arc<Self> {
        Arc::new(Self {
            clock,
            planted_read_bug,
            node_id: cfg.node_id,
            cfg,
            engine,
            writer,
            peers,
            metrics,
            registry: GroupRegistry::default(),
            index: RwLock::new(BTreeMap::new()),
            creating: tokio::sync::Mutex::new(()),
            claims: tokio::sync::Mutex::new(()),
            on_split: RwLock::new(None),
            on_claim: RwLock::new(None),
        })
    }

    /// Installs what a replica does when it applies a split (open the new group's replica).
    pub fn set_split_hook(&self, hook: SplitHook) {
        *self.on_split.write() = Some(hook);
    }

    /// Installs what a replica does before it takes over a wider range (see [`ClaimHook`]).
    pub fn set_claim_hook(&self, hook: ClaimHook) {
        *self.on_claim.write() = Some(hook);
    }

    /// The node's connections to its peers.
    pub fn peers(&self) -> &PeerClients {
        &self.peers
    }

    pub fn registry(&self) -> GroupRegistry {
        self.registry.clone()
    }

    pub fn get(&self, group: u64) -> Option<Arc<RaftGroup>> {
        self.registry.get(group)
    }

    pub fn all(&self) -> Vec<Arc<RaftGroup>> {
        self.registry.all()
    }

    fn group_config(&self, group: u64, shard: ShardState) -> RaftGroupConfig {
        let cfg = &self.cfg;
        let mut g = RaftGroupConfig::new(
            self.node_id,
            group,
            shard,
            cfg.data_dir.join("snapshots").join(format!("group-{group}")),
        );
        g.snapshot_threshold = cfg.snapshot_threshold;
        g.logs_kept_after_snapshot = (cfg.snapshot_threshold / 10).clamp(1, 1_000);
        g.request_timeout = cfg.request_timeout;
        g.heartbeat_interval = cfg.heartbeat_interval;
        g.election_timeout_min = cfg.election_timeout_min;
        g.election_timeout_max = cfg.election_timeout_max;
        g.hibernation = cfg.hibernation();
        g.max_clock_drift = cfg.max_clock_drift;
        g.clock = self.clock.clone();
        g.planted_read_bug = self.planted_read_bug;
        g.on_split = self.on_split.read().clone();
        g.on_claim = self.on_claim.read().clone();
        g
    }

    /// The groups the engine says this node holds, with the shard each was created for.
    pub fn recorded(&self) -> Result<Vec<(u64, ShardState)>, StorageError> {
        let (start, end) = replica_range();
        let mut out = Vec::new();
        for item in self.engine.scan(Cf::Meta, &start, Some(&end))? {
            let (key, stored) = item?;
            let group = decode_replica_key(&key)?;
            out.push((group, ShardState::decode(decode_record(Cf::Meta, &key, &stored)?)?));
        }
        Ok(out)
    }

    /// Opens the replica of `group` (creating its record first if it has none): the group's
    /// Raft state and state machine are recovered if they exist, else it starts empty.
    pub async fn open(&self, group: u64, shard: ShardState) -> Result<Arc<RaftGroup>, ReplicationError> {
        match self.open_inner(group, shard, true).await? {
            Some(g) => Ok(g),
            None => Err(ReplicationError::Stopped(format!(
                "group {group} has no replica record and none was created"
            ))),
        }
    }

    /// Opens the replica of `group` at start-up, if the engine still records it: a merge replayed
    /// by a replica opened earlier may have removed it since the records were listed.
    pub async fn reopen(&self, group: u64, shard: ShardState) -> Result<Option<Arc<RaftGroup>>, ReplicationError> {
        self.open_inner(group, shard, false).await
    }

    /// [`Replicas::open`]; with `create` false, a group without a replica record is not opened.
    async fn open_inner(
        &self,
        group: u64,
        shard: ShardState,
        create: bool,
    ) -> Result<Option<Arc<RaftGroup>>, ReplicationError> {
        if let Some(g) = self.get(group) {
            return Ok(Some(g));
        }
        let _guard = self.creating.lock().await;
        if let Some(g) = self.get(group) {
            return Ok(Some(g));
        }
        let key = replica_key(group);
        let recorded = self.engine.get(Cf::Meta, &key)?.is_some();
        if !recorded && !create {
            tracing::info!(group, "not reopening a replica merged away since start-up began");
            return Ok(None);
        }
        if let Some(other) = self.overlapping(group, &shard) {
            let theirs = self.get(other).map(|g| g.reader().shard());
            return Err(ReplicationError::Membership(format!(
                "group {group} ({shard:?}) would overlap local group {other} ({theirs:?})"
            )));
        }
        if !recorded {
            let mut batch = WriteBatch::new();
            let record = encode_record(&key, &shard.encode()?);
            batch.put(Cf::Meta, key, record);
            self.engine.write(batch, true)?;
        }
        let g = RaftGroup::open(
            self.group_config(group, shard),
            self.engine.clone(),
            self.writer.clone(),
            self.peers.clone(),
            self.metrics.clone(),
        )
        .await?;
        self.registry.insert(g.clone());
        self.invalidate_index();
        tracing::info!(group, "opened replica");
        Ok(Some(g))
    }

    /// Before `claimer` serves `shard` (a merge it is about to apply, a snapshot of a merged
    /// shard it is about to install): retires every other local replica whose range overlaps
    /// `shard` and whose epoch is older, keeping the data, which is `claimer`'s from now on.
    pub async fn claim(&self, claimer: u64, shard: &ShardState) -> Result<(), ReplicationError> {
        let _guard = self.claims.lock().await;
        for g in self.registry.all() {
            let s = g.reader().shard();
            if g.group_id() == claimer || s.keyspace != shard.keyspace || !s.overlaps(shard) {
                continue;
            }
            if s.epoch >= shard.epoch {
                // Not a merged-away group: nothing it holds may be taken. Never expected; the
                // merge protocol only absorbs a frozen neighbour, at an older epoch.
                tracing::error!(
                    claimer,
                    group = g.group_id(),
                    "a local replica at a newer epoch overlaps the range being claimed; left running"
                );
                continue;
            }
            self.stop_for_good(&g).await;
            self.forget(g.group_id(), &[])?;
            tracing::info!(
                group = g.group_id(),
                into = claimer,
                "retired the replica of a merged-away group"
            );
        }
        Ok(())
    }

    /// Removes the local replica of `group`, a group merged away (the catalog no longer has it and
    /// a newer shard covers its range), deleting only the data no other local replica serves.
    pub async fn retire_stale(&self, group: u64) -> Result<(), ReplicationError> {
        let _guard = self.claims.lock().await;
        let Some(g) = self.registry.get(group) else {
            return Ok(());
        };
        // After the fence the replica's range cannot change any more, and the other local
        // ranges cannot grow while the lock is held (a merge claims under it).
        self.stop_for_good(&g).await;
        let shard = g.reader().shard();
        let others: Vec<ShardState> = self
            .registry
            .all()
            .into_iter()
            .filter(|o| o.group_id() != group)
            .map(|o| o.reader().shard())
            .filter(|s| s.keyspace == shard.keyspace)
            .collect();
        self.forget(group, &uncovered(&shard, &others))?;
        tracing::info!(group, "removed the leftover replica of a merged-away group");
        Ok(())
    }

    /// Unregisters `g` and stops it for good (see [`RaftGroup::retire`]). Under `claims`.
    async fn stop_for_good(&self, g: &Arc<RaftGroup>) {
        self.registry.remove(g.group_id());
        self.invalidate_index();
        g.retire().await;
    }

    /// Deletes a stopped group's records and the `data` ranges, then its snapshots.
    fn forget(&self, group: u64, data: &[(Vec<u8>, Vec<u8>)]) -> Result<(), ReplicationError> {
        basalt_storage::destroy_replica_keeping(self.engine.as_ref(), group, data)?;
        self.remove_snapshot_dir(group);
        Ok(())
    }

    fn remove_snapshot_dir(&self, group: u64) {
        let dir: PathBuf = self.cfg.data_dir.join("snapshots").join(format!("group-{group}"));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(group, error = %e, "could not remove the snapshot directory");
            }
        }
    }

    /// A local group other than `group` whose shard overlaps `shard`.
    fn overlapping(&self, group: u64, shard: &ShardState) -> Option<u64> {
        self.registry.all().into_iter().find_map(|g| {
            let s = g.reader().shard();
            let overlaps = s.start < shard.end && shard.start < s.end;
            (g.group_id() != group && overlaps).then(|| g.group_id())
        })
    }

    fn invalidate_index(&self) {
        self.index.write().clear();
    }

    fn rebuild_index(&self) {
        let mut idx = BTreeMap::new();
        for g in self.registry.all() {
            idx.insert(g.reader().shard().start, g.group_id());
        }
        *self.index.write() = idx;
    }

    /// The local replica whose shard holds stored key `key`, if any.
    pub fn for_key(&self, key: &[u8]) -> Option<Arc<RaftGroup>> {
        for attempt in 0..2 {
            let candidate = {
                let idx = self.index.read();
                idx.range(..=key.to_vec()).next_back().map(|(_, g)| *g)
            };
            if let Some(g) = candidate.and_then(|id| self.get(id)) {
                if g.reader().holds(key) {
                    return Some(g);
                }
            }
            if attempt == 0 {
                self.rebuild_index();
            }
        }
        None
    }

    /// Stops and removes the local replica of `group`, deleting its Raft state, state machine
    /// records and data (its keyspace is gone).
    pub async fn destroy(&self, group: u64) -> Result<(), ReplicationError> {
        let Some(g) = self.registry.remove(group) else {
            return Ok(());
        };
        self.invalidate_index();
        let shard = g.reader().shard();
        g.shutdown().await;
        basalt_storage::destroy_replica(self.engine.as_ref(), group, Some((shard.start, shard.end)))?;
        self.remove_snapshot_dir(group);
        tracing::info!(group, "destroyed replica");
        Ok(())
    }

    /// The local replicas by id, with their current shard.
    pub fn shards(&self) -> HashMap<u64, ShardState> {
        self.registry
            .all()
            .into_iter()
            .map(|g| (g.group_id(), g.reader().shard()))
            .collect()
    }

    pub async fn shutdown(&self) {
        for g in self.registry.all() {
            g.shutdown().await;
        }
    }
}

/// The parts of `shard`'s range that none of `others` covers, in key order.
fn uncovered(shard: &ShardState, others: &[ShardState]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut covering: Vec<&ShardState> = others.iter().filter(|o| o.overlaps(shard)).collect();
    covering.sort_by(|a, b| a.start.cmp(&b.start));
    let mut out = Vec::new();
    let mut from = shard.start.clone();
    for o in covering {
        if o.start > from {
            out.push((from.clone(), o.start.clone().min(shard.end.clone())));
        }
        if o.end > from {
            from = o.end.clone();
        }
        if from >= shard.end {
            return out;
        }
    }
    if from < shard.end {
        out.push((from, shard.end.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &[u8], end: &[u8]) -> ShardState {
        ShardState {
            keyspace: 1,
            hashed: false,
            start: start.to_vec(),
            end: end.to_vec(),
            epoch: 1,
            frozen: false,
        }
    }

    #[test]
    fn uncovered_is_the_range_minus_the_others() {
        let s = range(b"c", b"m");
        let pairs = |v: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<(String, String)> {
            v.into_iter()
                .map(|(a, b)| (String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap()))
                .collect()
        };
        assert_eq!(pairs(uncovered(&s, &[])), vec![("c".into(), "m".into())]);
        assert_eq!(
            pairs(uncovered(
                &s,
                &[range(b"a", b"d"), range(b"f", b"h"), range(b"x", b"z")]
            )),
            vec![("d".into(), "f".into()), ("h".into(), "m".into())]
        );
        assert!(uncovered(&s, &[range(b"a", b"z")]).is_empty());
        assert_eq!(
            pairs(uncovered(&s, &[range(b"e", b"z")])),
            vec![("c".into(), "e".into())]
        );
    }
}
