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
//!   Two local replicas over one key would write the same engine keys.
//! - **Lookup by key trusts the state machines, not the index**: the index (shard start → group)
//!   is a cache refreshed when a lookup finds it stale; the group's own applied shard decides.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::raft::peer_service::GroupRegistry;
use basalt_consensus::raft::{RaftGroup, RaftGroupConfig, SplitHook};
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
    on_split: RwLock<Option<SplitHook>>,
}

impl Replicas {
    pub fn new(
        cfg: NodeConfig,
        engine: Arc<dyn Engine>,
        writer: Arc<GroupCommitWriter>,
        peers: PeerClients,
        metrics: ConsensusMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id: cfg.node_id,
            cfg,
            engine,
            writer,
            peers,
            metrics,
            registry: GroupRegistry::default(),
            index: RwLock::new(BTreeMap::new()),
            creating: tokio::sync::Mutex::new(()),
            on_split: RwLock::new(None),
        })
    }

    /// Installs what a replica does when it applies a split (open the new group's replica).
    pub fn set_split_hook(&self, hook: SplitHook) {
        *self.on_split.write() = Some(hook);
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
        g.on_split = self.on_split.read().clone();
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
        if let Some(g) = self.get(group) {
            return Ok(g);
        }
        let _guard = self.creating.lock().await;
        if let Some(g) = self.get(group) {
            return Ok(g);
        }
        if let Some(other) = self.overlapping(group, &shard) {
            return Err(ReplicationError::Membership(format!(
                "group {group} would overlap local group {other}"
            )));
        }
        let key = replica_key(group);
        if self.engine.get(Cf::Meta, &key)?.is_none() {
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
        Ok(g)
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
        let dir: PathBuf = self.cfg.data_dir.join("snapshots").join(format!("group-{group}"));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(group, error = %e, "could not remove the snapshot directory");
            }
        }
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
