//! The placement driver (on the meta group's leader) and the reconciler (on every node).
//!
//! The driver turns catalog-level requests into safe steps: creating a keyspace writes its
//! shard descriptors in one catalog transaction; splitting a shard allocates the new group's id,
//! has the shard's leader propose the split through the shard's own log, and only then records
//! both halves in the catalog; dropping a keyspace deletes its descriptors. Each step is
//! idempotent or guarded by a compare, so a driver that dies midway (its meta leadership lost)
//! leaves a state the next leader can read and continue from.
//!
//! The reconciler makes each node match the catalog: it opens the replicas a new keyspace's
//! descriptors assign to the node (each forms its group with `initialize`, which a group does
//! once), and destroys the replicas of dropped keyspaces. Replicas born from a split are opened
//! directly by the split's apply hook, on every node that holds the parent, so they never wait
//! for the catalog.
//!
//! Not yet here (next steps of the sharding work): replica moves, re-replication when a node
//! leaves, rebalancing when one joins, leader balancing, automatic split by size and load, and
//! choosing small neighbours to merge (carrying a merge out, and finishing one a previous meta
//! leader left, is [`crate::merge`]'s).

use std::collections::BTreeMap;
use std::sync::Arc;

use basalt_consensus::raft::RaftGroup;
use basalt_consensus::{Replication, ReplicationError};
use basalt_proto::keycodec::{self, DEFAULT_KEYSPACE, HASH_SPACE, MAX_KEYSPACE};
use basalt_storage::{Command, ShardScan, ShardState, WriteRequest, WriteResponse};

use crate::catalog::{self, Catalog, KeyspaceDesc, ReplicaMove, ShardDesc, META_GROUP};
use crate::load::LoadTracker;
use crate::read_mode::DefaultRead;
use crate::replicas::Replicas;

/// Catalog transactions that lost a race are retried this many times on a fresh view.
const TXN_ATTEMPTS: usize = 20;
/// The most shards a keyspace may be created with.
pub const MAX_INITIAL_SHARDS: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
    /// A change that was tried and given up on for good (a merge refused by its shards).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
}

/// The node's access to the meta group and its own replicas.
#[derive(Clone)]
pub struct Placement {
    node_id: u64,
    replicas: Arc<Replicas>,
    /// The last catalog read, reused while the meta replica has applied nothing newer.
    cache: Arc<parking_lot::RwLock<Arc<Catalog>>>,
    load: Arc<LoadTracker>,
    /// Held by whoever drives merges on this node (see [`crate::merge`]).
    merges: Arc<tokio::sync::Mutex<()>>,
}

impl Placement {
    pub fn new(node_id: u64, replicas: Arc<Replicas>) -> Self {
        Self {
            node_id,
            replicas,
            cache: Arc::default(),
            load: Arc::default(),
            merges: Arc::default(),
        }
    }

    /// Request counts and sizes of the local replicas, for the driver's reports.
    pub fn load(&self) -> &LoadTracker {
        &self.load
    }

    /// The lock merge drivers on this node take (see [`crate::merge`]).
    pub(crate) fn merge_lock(&self) -> &Arc<tokio::sync::Mutex<()>> {
        &self.merges
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    /// The catalog as of the local meta replica's applied index, read again only when that
    /// index moved (the request path calls this on every request).
    pub fn cached(&self) -> Result<Arc<Catalog>, PlacementError> {
        let applied = self.meta().reader().applied_index();
        let current = self.cache.read().clone();
        if current.applied_index == applied && applied != 0 {
            return Ok(current);
        }
        let fresh = Arc::new(self.catalog()?);
        *self.cache.write() = fresh.clone();
        Ok(fresh)
    }

    pub fn meta(&self) -> Arc<RaftGroup> {
        self.replicas
            .get(META_GROUP)
            .expect("the meta replica is opened before any service starts and never closed")
    }

    /// The catalog as the local meta replica has applied it.
    pub fn catalog(&self) -> Result<Catalog, PlacementError> {
        Ok(Catalog::load(&self.meta().reader())?)
    }

    /// Node id → address, from the meta group's membership (the cluster's members).
    pub fn addresses(&self) -> BTreeMap<u64, String> {
        self.meta()
            .status()
            .members
            .into_iter()
            .map(|m| (m.id, m.addr))
            .collect()
    }

    fn voters(&self) -> Vec<u64> {
        self.meta()
            .status()
            .members
            .into_iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect()
    }

    /// Runs `build` on a fresh, linearizable view of the catalog and proposes its transaction,
    /// retrying on a fresh view when another change got in first. Only the meta leader can
    /// propose; elsewhere this fails with `NotLeader`, which callers forward.
    pub(crate) async fn change<T>(
        &self,
        mut build: impl FnMut(&Catalog, &mut catalog::CatalogTxn<'_>) -> Result<T, PlacementError>,
    ) -> Result<T, PlacementError> {
        let meta = self.meta();
        for _ in 0..TXN_ATTEMPTS {
            meta.read_barrier().await?;
            let view = Catalog::load(&meta.reader())?;
            let mut txn = view.txn();
            let out = build(&view, &mut txn)?;
            match meta.propose(txn.into_request()).await? {
                WriteResponse::Txn { succeeded: true } => return Ok(out),
                WriteResponse::Txn { succeeded: false } => continue,
                other => {
                    return Err(PlacementError::Conflict(format!(
                        "the meta group answered {other:?} to a catalog transaction"
                    )))
                }
            }
        }
        Err(PlacementError::Conflict(
            "the catalog kept changing under this request; try again".into(),
        ))
    }

    /// Picks `n` nodes for each of `count` new shards, spreading them: each pick takes the
    /// nodes holding the fewest replicas so far (ties by id), counting the picks already made.
    fn place(view: &Catalog, voters: &[u64], n: usize, count: usize) -> Vec<Vec<u64>> {
        let mut load: BTreeMap<u64, usize> = voters.iter().map(|v| (*v, 0)).collect();
        for s in view.shards.values() {
            for r in &s.replicas {
                if let Some(l) = load.get_mut(r) {
                    *l += 1;
                }
            }
        }
        (0..count)
            .map(|_| {
                let mut by_load: Vec<(usize, u64)> = load.iter().map(|(id, l)| (*l, *id)).collect();
                by_load.sort();
                let pick: Vec<u64> = by_load.into_iter().take(n).map(|(_, id)| id).collect();
                for id in &pick {
                    *load.get_mut(id).expect("picked from the load map") += 1;
                }
                let mut pick = pick;
                pick.sort();
                pick
            })
            .collect()
    }

    /// Records the default keyspace and its first shard, which the founding members created at
    /// bootstrap (group 2 on every founder), if the catalog does not have them yet.
    pub async fn ensure_default_keyspace(&self, founders: &[u64]) -> Result<(), PlacementError> {
        if self.catalog()?.keyspace(keycodec::DEFAULT_KEYSPACE_NAME).is_some() {
            return Ok(());
        }
        self.change(|view, txn| {
            if view.keyspace(keycodec::DEFAULT_KEYSPACE_NAME).is_some() {
                return Ok(());
            }
            // Fixed ids, which the allocators never hand out (see `CatalogTxn::new_group_id`), so
            // keyspaces created before this record cannot have taken them.
            let group = crate::node::DEFAULT_GROUP;
            if view.shards.contains_key(&group) {
                return Err(PlacementError::Conflict(format!(
                    "group {group} of the default keyspace is recorded for another shard"
                )));
            }
            let ks = catalog::default_keyspace(founders.len() as u32);
            txn.put_keyspace(&ks);
            txn.put_shard(&ShardDesc {
                id: group,
                shard: ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
                replicas: founders.to_vec(),
                bootstrap: true,
                moving: None,
                merge: None,
            });
            Ok(())
        })
        .await
    }

    pub async fn create_keyspace(
        &self,
        name: &str,
        hashed: bool,
        shards: u32,
        replicas: u32,
        default_read: DefaultRead,
    ) -> Result<KeyspaceDesc, PlacementError> {
        check_keyspace_name(name)?;
        let voters = self.voters();
        let replicas = if replicas == 0 {
            voters.len().min(3) as u32
        } else {
            replicas
        };
        if replicas as usize > voters.len() {
            return Err(PlacementError::Invalid(format!(
                "{replicas} replicas asked for, but the cluster has {} voting members",
                voters.len()
            )));
        }
        let shards = match (shards, hashed) {
            (0, true) => 16,
            (0, false) => 1,
            (n, _) => n,
        };
        if shards > MAX_INITIAL_SHARDS || (hashed && shards > HASH_SPACE) {
            return Err(PlacementError::Invalid(format!(
                "{shards} shards asked for; at most {MAX_INITIAL_SHARDS}"
            )));
        }
        if !hashed && shards != 1 {
            return Err(PlacementError::Invalid(
                "a range keyspace starts with 1 shard and grows by splitting, since nothing is known yet of \
                 where its keys fall"
                    .into(),
            ));
        }
        self.change(|view, txn| {
            if view.keyspace(name).is_some() {
                return Err(PlacementError::AlreadyExists(format!(
                    "keyspace {name:?} already exists"
                )));
            }
            let id = txn.new_keyspace_id();
            if id > MAX_KEYSPACE {
                return Err(PlacementError::Invalid("no keyspace ids left".into()));
            }
            let ks = KeyspaceDesc {
                name: name.to_string(),
                id,
                hashed,
                replicas,
                initial_shards: shards,
                default_read,
            };
            txn.put_keyspace(&ks);
            let ranges = catalog::initial_ranges(id, hashed, shards);
            let placements = Self::place(view, &voters, replicas as usize, ranges.len());
            for ((start, end), replicas) in ranges.into_iter().zip(placements) {
                let group = txn.new_group_id();
                txn.put_shard(&ShardDesc {
                    id: group,
                    shard: ShardState {
                        keyspace: id,
                        hashed,
                        start,
                        end,
                        epoch: 1,
                        frozen: false,
                    },
                    replicas,
                    bootstrap: true,
                    moving: None,
                    merge: None,
                });
            }
            Ok(ks)
        })
        .await
    }

    pub async fn drop_keyspace(&self, name: &str) -> Result<(), PlacementError> {
        if name == keycodec::DEFAULT_KEYSPACE_NAME {
            return Err(PlacementError::Invalid("the default keyspace cannot be dropped".into()));
        }
        self.change(|view, txn| {
            let Some(ks) = view.keyspace(name) else {
                return Err(PlacementError::NotFound(format!("keyspace {name:?} does not exist")));
            };
            txn.delete_keyspace(name);
            for s in view.shards_of(ks.id) {
                txn.delete_shard(s.id);
            }
            Ok(())
        })
        .await
    }

    /// Allocates the id of the group a split of `shard` creates.
    pub async fn allocate_group(&self) -> Result<u64, PlacementError> {
        self.change(|_, txn| Ok(txn.new_group_id())).await
    }

    /// Records a split that the shard's group has applied: the parent shrinks to `left`, the new
    /// group serves `right` on the parent's replicas. Guarded by the parent's descriptor, so a
    /// split recorded twice (a retried request) or over a newer change is refused.
    pub async fn record_split(
        &self,
        parent: u64,
        new_group: u64,
        left: ShardState,
        right: ShardState,
    ) -> Result<(), PlacementError> {
        self.change(|view, txn| {
            let Some(p) = view.shards.get(&parent) else {
                return Err(PlacementError::NotFound(format!(
                    "shard {parent} is not in the catalog"
                )));
            };
            if view.shards.contains_key(&new_group) {
                return Ok(());
            }
            // A move under way on the parent is under way on the child too: the child's group was
            // born with the parent's membership, newcomer included if it had joined by then, so the
            // driver finishes the move on both (each step is idempotent).
            let child = ShardDesc {
                id: new_group,
                shard: right.clone(),
                replicas: p.replicas.clone(),
                bootstrap: false,
                moving: p.moving,
                merge: None,
            };
            let mut p = p.clone();
            p.shard = left.clone();
            txn.put_shard(&p);
            txn.put_shard(&child);
            Ok(())
        })
        .await
    }
}

impl Placement {
    /// Step 1 of a replica move: names `to` as joining the shard, so its reconciler opens an
    /// empty replica for the group to fill. Idempotent; refused while a different move is under
    /// way on the shard.
    pub async fn begin_move(&self, shard: u64, from: u64, to: u64) -> Result<ShardDesc, PlacementError> {
        self.change(|view, txn| {
            let Some(d) = view.shards.get(&shard) else {
                return Err(PlacementError::NotFound(format!("shard {shard} does not exist")));
            };
            let want = ReplicaMove { from, to };
            match d.moving {
                Some(m) if m == want => return Ok(d.clone()),
                Some(m) => {
                    return Err(PlacementError::Conflict(format!(
                        "shard {shard} is already moving a replica from node {} to node {}",
                        m.from, m.to
                    )))
                }
                None => {}
            }
            if view.in_merge(shard) {
                return Err(PlacementError::Conflict(format!(
                    "shard {shard} is being merged; move it once the merge has finished"
                )));
            }
            if !d.replicas.contains(&from) {
                return Err(PlacementError::Invalid(format!(
                    "node {from} holds no replica of shard {shard} (its replicas: {:?})",
                    d.replicas
                )));
            }
            if d.replicas.contains(&to) {
                return Err(PlacementError::Invalid(format!(
                    "node {to} already holds a replica of shard {shard}"
                )));
            }
            // A merge marks the right neighbour, naming this shard: the move holds only while
            // that neighbour is unmarked.
            if let Some(right) = view
                .shards
                .values()
                .find(|r| r.shard.keyspace == d.shard.keyspace && r.shard.start == d.shard.end)
            {
                txn.guard_shard(right.id);
            }
            let mut d = d.clone();
            d.moving = Some(want);
            txn.put_shard(&d);
            Ok(d)
        })
        .await
    }

    /// Last step of a move, once the group has added `to` and removed `from`: the catalog says
    /// so, and `from`'s reconciler may destroy its replica.
    pub async fn finish_move(&self, shard: u64, m: ReplicaMove) -> Result<ShardDesc, PlacementError> {
        self.change(|view, txn| {
            let Some(d) = view.shards.get(&shard) else {
                return Err(PlacementError::NotFound(format!("shard {shard} does not exist")));
            };
            if d.moving != Some(m) {
                return Ok(d.clone()); // Finished (or aborted) already.
            }
            let mut d = d.clone();
            d.replicas.retain(|r| *r != m.from);
            if !d.replicas.contains(&m.to) {
                d.replicas.push(m.to);
                d.replicas.sort_unstable();
            }
            d.moving = None;
            // The group's membership is no longer the one it was created with: initializing
            // from this list would form a second group.
            d.bootstrap = false;
            txn.put_shard(&d);
            Ok(d)
        })
        .await
    }

    /// Abandons a move whose newcomer is gone, after the group has dropped it again.
    pub async fn abort_move(&self, shard: u64, m: ReplicaMove) -> Result<(), PlacementError> {
        self.change(|view, txn| {
            let Some(d) = view.shards.get(&shard) else {
                return Ok(());
            };
            if d.moving != Some(m) {
                return Ok(());
            }
            let mut d = d.clone();
            d.moving = None;
            txn.put_shard(&d);
            Ok(())
        })
        .await
    }
}

/// Keyspace names are identifiers: 1 to 64 of ASCII letters, digits, `_` and `-`.
fn check_keyspace_name(name: &str) -> Result<(), PlacementError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PlacementError::Invalid(format!(
            "keyspace name {name:?} must be 1 to 64 ASCII letters, digits, '_' or '-'"
        )))
    }
}

/// The stored key to split `shard` at, from a user's `at`: a user key for a range keyspace, a
/// decimal hash value for a hash keyspace; empty picks the middle (the median stored key of a
/// range shard, the middle hash value of a hash shard).
pub fn split_point(shard: &ShardState, at: &[u8], local: Option<&Arc<RaftGroup>>) -> Result<Vec<u8>, PlacementError> {
    if !at.is_empty() {
        let key = if shard.hashed {
            let h: u32 = std::str::from_utf8(at)
                .ok()
                .and_then(|s| s.trim().trim_start_matches('#').parse().ok())
                .filter(|h| *h < HASH_SPACE)
                .ok_or_else(|| {
                    PlacementError::Invalid(format!(
                        "a hash shard splits at a hash value 0..{HASH_SPACE}, not {:?}",
                        String::from_utf8_lossy(at)
                    ))
                })?;
            keycodec::hash_bound(shard.keyspace, h)
        } else {
            keycodec::data_key(shard.keyspace, &[], at)
        };
        if !(shard.start < key && key < shard.end) {
            return Err(PlacementError::Invalid(
                "the split point must lie strictly inside the shard".into(),
            ));
        }
        return Ok(key);
    }
    if shard.hashed {
        let lo = hash_of_bound(shard, &shard.start);
        let hi = hash_of_bound(shard, &shard.end);
        if hi - lo < 2 {
            return Err(PlacementError::Invalid("the shard covers a single hash value".into()));
        }
        return Ok(keycodec::hash_bound(shard.keyspace, lo + (hi - lo) / 2));
    }
    let Some(g) = local else {
        return Err(PlacementError::Invalid(
            "no local replica to find the middle key".into(),
        ));
    };
    let page = g
        .reader()
        .scan_shard(&ShardScan {
            cursor: Some(shard.start.clone()),
            start: Vec::new(),
            end: None,
            limit: basalt_storage::MAX_SCAN_LIMIT,
        })
        .map_err(PlacementError::Replication)?;
    if page.kvs.len() < 2 {
        return Err(PlacementError::Invalid(
            "the shard holds fewer than 2 keys; give a split key".into(),
        ));
    }
    Ok(shard.data_key(&page.kvs[page.kvs.len() / 2].0))
}

/// The hash value a bound of a hash shard stands for (0 and [`HASH_SPACE`] at the keyspace's ends).
pub fn hash_of_bound(shard: &ShardState, bound: &[u8]) -> u32 {
    let (ks_start, ks_end) = keycodec::keyspace_range(shard.keyspace);
    if bound <= ks_start.as_slice() {
        0
    } else if bound >= ks_end.as_slice() {
        HASH_SPACE
    } else {
        u32::from(u16::from_be_bytes([bound[4], *bound.get(5).unwrap_or(&0)]))
    }
}

/// Proposes the split of the local replica's group (on its leader).
pub async fn propose_split(
    group: &Arc<RaftGroup>,
    at: Vec<u8>,
    new_group: u64,
    expected_epoch: u64,
) -> Result<(ShardState, ShardState), PlacementError> {
    let req = WriteRequest {
        session: None,
        command: Command::Split {
            at,
            new_group,
            expected_epoch,
        },
    };
    match group.propose(req).await? {
        WriteResponse::Split { left, right } => Ok((left, right)),
        WriteResponse::SplitRefused { reason, .. } => Err(PlacementError::Conflict(format!("split refused: {reason}"))),
        other => Err(PlacementError::Conflict(format!(
            "the group answered {other:?} to a split"
        ))),
    }
}
