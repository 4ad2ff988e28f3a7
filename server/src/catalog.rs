//! The cluster catalog: keyspaces and shard descriptors, stored in the meta group.
//!
//! The meta group (group [`META_GROUP`]) is an ordinary replica group whose shard is the whole
//! system keyspace; every member of the cluster holds a replica of it. The catalog is a handful
//! of keys in it:
//!
//! | key | value |
//! | --- | --- |
//! | `ks/<name>` | a [`KeyspaceDesc`] |
//! | `shard/<id BE>` | a [`ShardDesc`] |
//! | `seq/keyspace`, `seq/group` | the last id handed out (u32 / u64, BE) |
//!
//! Invariants and why:
//! - **Writes are transactions on the meta leader** ([`CatalogTxn`]): each compares the keys it
//!   read and writes all its changes in one `Txn` entry, so two concurrent changes (two splits, a
//!   split and a drop) cannot both apply on a stale view; the loser re-reads and retries.
//! - **Every node reads its own meta replica** ([`Catalog::load`]). Its view may lag but never
//!   goes back (a replica's applied index only grows), which is what the per-node reconciler
//!   needs: it acts on monotonic knowledge. Clients get routes from it and the data groups
//!   check every request against their own, authoritative, shard state.
//! - **Ids are never reused**: groups and keyspaces are numbered from counters that only grow,
//!   so a descriptor, a stale route or a leftover replica can never be mistaken for a newer one.

use std::collections::BTreeMap;

use basalt_consensus::StateReader;
use basalt_proto::keycodec::{self, DEFAULT_KEYSPACE, DEFAULT_KEYSPACE_NAME, SYSTEM_KEYSPACE};
use basalt_proto::v1::{Keyspace as PbKeyspace, Replica, Shard as PbShard, Sharding};
use basalt_storage::{Command, Compare, ShardState, TxnOp, WriteRequest, MAX_SCAN_LIMIT};
use serde::{Deserialize, Serialize};

use crate::node::DEFAULT_GROUP;
use crate::read_mode::DefaultRead;

/// The meta group's id. Data groups are numbered after it.
pub const META_GROUP: u64 = 1;

/// The meta group's shard: the whole system keyspace.
pub fn meta_shard() -> ShardState {
    ShardState::whole_keyspace(SYSTEM_KEYSPACE, false)
}

const KS_PREFIX: &[u8] = b"ks/";
const SHARD_PREFIX: &[u8] = b"shard/";
const SEQ_KEYSPACE: &[u8] = b"seq/keyspace";
const SEQ_GROUP: &[u8] = b"seq/group";

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog record {key:?} does not decode: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("reading the catalog: {0}")]
    Read(#[from] basalt_consensus::ReplicationError),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeyspaceDesc {
    pub name: String,
    pub id: u32,
    pub hashed: bool,
    pub replicas: u32,
    pub initial_shards: u32,
    /// The mode of reads that name none.
    pub default_read: DefaultRead,
}

impl KeyspaceDesc {
    pub fn to_pb(&self) -> PbKeyspace {
        PbKeyspace {
            name: self.name.clone(),
            id: self.id,
            sharding: if self.hashed { Sharding::Hash } else { Sharding::Range } as i32,
            replicas: self.replicas,
            initial_shards: self.initial_shards,
            default_read: Some(self.default_read.to_pb()),
        }
    }

    /// The stored key of `user_key` in this keyspace.
    pub fn encode(&self, user_key: &[u8]) -> Vec<u8> {
        keycodec::encode_key(self.id, self.hashed, user_key)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShardDesc {
    pub id: u64,
    /// Keyspace, kind, range and epoch: the group's own record as of the last catalog update.
    pub shard: ShardState,
    pub replicas: Vec<u64>,
    /// Created with its keyspace: its first replicas form the group from nothing (each calls
    /// `initialize` with `replicas`). Shards born from a split are not: they start from their
    /// parent's data on the parent's replicas.
    pub bootstrap: bool,
    /// A replica move in progress. Invariant: `replicas` plus `moving.to` always includes every
    /// member of the group's own Raft configuration (voters and learners), because the driver
    /// names the newcomer here before adding it and drops the leaver from `replicas` only after
    /// the group has removed it. A reconciler may therefore destroy a local replica that the
    /// catalog does not name: the group no longer counts on it.
    #[serde(default)]
    pub moving: Option<ReplicaMove>,
    /// Set while this shard is being merged into its left neighbour (see [`crate::merge`]).
    #[serde(default)]
    pub merge: Option<MergeMark>,
}

/// One replica of a shard moving from node `from` to node `to`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaMove {
    pub from: u64,
    pub to: u64,
}

impl ShardDesc {
    /// Whether node `id` is, or is about to be, one of the shard's replicas.
    pub fn names(&self, id: u64) -> bool {
        self.replicas.contains(&id) || self.moving.is_some_and(|m| m.to == id)
    }
}

/// A merge in progress, recorded on the right shard's descriptor before anything else happens,
/// so that a new meta leader finds it and finishes or undoes it. The epochs are those the merge
/// was planned with: the freeze expects `right_epoch`, the merge proposal `left_epoch`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MergeMark {
    /// The left neighbour absorbing this shard.
    pub into: u64,
    pub left_epoch: u64,
    pub right_epoch: u64,
}

impl ShardDesc {
    /// The descriptor in the public form, with member addresses from `addrs`.
    pub fn to_pb(&self, keyspace: &str, addrs: &BTreeMap<u64, String>, leader_id: u64) -> PbShard {
        let s = &self.shard;
        PbShard {
            id: self.id,
            keyspace: keyspace.to_string(),
            keyspace_id: s.keyspace,
            start: s.start.clone().into(),
            end: s.end.clone().into(),
            epoch: s.epoch,
            replicas: self
                .replicas
                .iter()
                .map(|id| Replica {
                    node_id: *id,
                    address: addrs.get(id).cloned().unwrap_or_default(),
                })
                .collect(),
            leader_id,
            start_display: keycodec::display_bound(s.keyspace, s.hashed, &s.start),
            end_display: keycodec::display_bound(s.keyspace, s.hashed, &s.end),
            applied_index: 0,
            approximate_bytes: 0,
            approximate_keys: 0,
            moving_from: self.moving.map_or(0, |m| m.from),
            moving_to: self.moving.map_or(0, |m| m.to),
        }
    }
}

fn shard_key(id: u64) -> Vec<u8> {
    let mut k = SHARD_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn ks_key(name: &str) -> Vec<u8> {
    let mut k = KS_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("catalog records are plain structs of integers, strings and byte vectors")
}

/// One consistent view of the catalog, as of `applied_index` of the local meta replica.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub applied_index: u64,
    pub keyspaces: BTreeMap<String, KeyspaceDesc>,
    /// By id.
    pub shards: BTreeMap<u64, ShardDesc>,
    pub last_keyspace_id: u32,
    pub last_group_id: u64,
    /// The raw records read, for the compare half of a transaction.
    raw: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Catalog {
    /// Reads the catalog from the local meta replica (no barrier: see the module docs).
    pub fn load(reader: &StateReader) -> Result<Catalog, CatalogError> {
        let applied_index = reader.applied_index();
        let mut raw = BTreeMap::new();
        let mut start = Vec::new();
        loop {
            let (kvs, more) = reader.scan(&start, None, MAX_SCAN_LIMIT)?;
            if let Some((last, _)) = kvs.last() {
                start = last.clone();
                start.push(0);
            }
            raw.extend(kvs);
            if !more {
                break;
            }
        }
        let mut c = Catalog {
            applied_index,
            ..Default::default()
        };
        for (k, v) in &raw {
            let corrupt = |reason: String| CatalogError::Corrupt {
                key: String::from_utf8_lossy(k).into_owned(),
                reason,
            };
            if k.starts_with(KS_PREFIX) {
                let d: KeyspaceDesc = postcard::from_bytes(v).map_err(|e| corrupt(e.to_string()))?;
                c.keyspaces.insert(d.name.clone(), d);
            } else if k.starts_with(SHARD_PREFIX) {
                let d: ShardDesc = postcard::from_bytes(v).map_err(|e| corrupt(e.to_string()))?;
                c.shards.insert(d.id, d);
            } else if k == SEQ_KEYSPACE {
                c.last_keyspace_id =
                    u32::from_be_bytes(v.as_slice().try_into().map_err(|_| corrupt("not 4 bytes".into()))?);
            } else if k == SEQ_GROUP {
                c.last_group_id =
                    u64::from_be_bytes(v.as_slice().try_into().map_err(|_| corrupt("not 8 bytes".into()))?);
            }
        }
        c.raw = raw;
        Ok(c)
    }

    pub fn keyspace(&self, name: &str) -> Option<&KeyspaceDesc> {
        self.keyspaces.get(name)
    }

    pub fn keyspace_by_id(&self, id: u32) -> Option<&KeyspaceDesc> {
        self.keyspaces.values().find(|k| k.id == id)
    }

    /// The shards of keyspace `id` in key order.
    pub fn shards_of(&self, id: u32) -> Vec<&ShardDesc> {
        let mut v: Vec<&ShardDesc> = self.shards.values().filter(|s| s.shard.keyspace == id).collect();
        v.sort_by(|a, b| a.shard.start.cmp(&b.shard.start));
        v
    }

    /// The shard holding stored key `key`, if the catalog knows one.
    pub fn shard_for(&self, keyspace: u32, key: &[u8]) -> Option<&ShardDesc> {
        self.shards
            .values()
            .find(|s| s.shard.keyspace == keyspace && s.shard.contains(key))
    }

    /// Whether shard `id` takes part in a merge under way: marked to be merged away, or the left
    /// neighbour a marked shard merges into. Such a shard is neither moved nor split until the
    /// merge ends (see [`crate::merge`]).
    pub fn in_merge(&self, id: u64) -> bool {
        self.shards
            .values()
            .any(|s| s.merge.as_ref().is_some_and(|m| s.id == id || m.into == id))
    }

    /// Whether a keyspace with this id existed and was dropped (ids are never reused).
    pub fn dropped(&self, keyspace: u32) -> bool {
        // The default keyspace cannot be dropped; before it is recorded it is merely missing.
        keyspace != SYSTEM_KEYSPACE
            && keyspace != DEFAULT_KEYSPACE
            && keyspace <= self.last_keyspace_id
            && self.keyspace_by_id(keyspace).is_none()
    }

    /// Starts a transaction over this view.
    pub fn txn(&self) -> CatalogTxn<'_> {
        CatalogTxn {
            base: self,
            compares: BTreeMap::new(),
            ops: Vec::new(),
            next_group: self.last_group_id,
            next_keyspace: self.last_keyspace_id,
        }
    }
}

/// A change to the catalog built on one view: it applies only if every key it read or wrote is
/// still as in that view.
pub struct CatalogTxn<'a> {
    base: &'a Catalog,
    compares: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    ops: Vec<TxnOp>,
    next_group: u64,
    next_keyspace: u32,
}

impl CatalogTxn<'_> {
    fn guard(&mut self, key: &[u8]) {
        let current = self.base.raw.get(key).cloned();
        self.compares.entry(key.to_vec()).or_insert(current);
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.guard(&key);
        self.ops.push(TxnOp::Put { key, value });
    }

    /// Makes the transaction apply only if shard `id`'s descriptor is still as in the view,
    /// though it does not write it: for decisions that depend on a neighbour's state.
    pub fn guard_shard(&mut self, id: u64) {
        self.guard(&shard_key(id));
    }

    pub fn new_group_id(&mut self) -> u64 {
        // The meta group is 1 and the default keyspace's first shard is 2, formed by the founders
        // at bootstrap before the catalog records it (`Placement::ensure_default_keyspace`): a
        // keyspace created before that record must not be given group 2 too.
        self.next_group = self.next_group.max(DEFAULT_GROUP) + 1;
        let id = self.next_group;
        self.put(SEQ_GROUP.to_vec(), id.to_be_bytes().to_vec());
        id
    }

    pub fn new_keyspace_id(&mut self) -> u32 {
        // Keyspace 0 is the system keyspace and 1 the default one, recorded with its fixed id
        // whenever the reconciler gets to it (`Placement::ensure_default_keyspace`); user
        // keyspaces start at 2 even if they are created first.
        self.next_keyspace = self.next_keyspace.max(DEFAULT_KEYSPACE) + 1;
        let id = self.next_keyspace;
        self.put(SEQ_KEYSPACE.to_vec(), id.to_be_bytes().to_vec());
        id
    }

    pub fn put_keyspace(&mut self, d: &KeyspaceDesc) {
        self.put(ks_key(&d.name), encode(d));
    }

    pub fn put_shard(&mut self, d: &ShardDesc) {
        self.put(shard_key(d.id), encode(d));
    }

    pub fn delete_keyspace(&mut self, name: &str) {
        let k = ks_key(name);
        self.guard(&k);
        self.ops.push(TxnOp::Delete { key: k });
    }

    pub fn delete_shard(&mut self, id: u64) {
        let k = shard_key(id);
        self.guard(&k);
        self.ops.push(TxnOp::Delete { key: k });
    }

    /// The write to propose to the meta group.
    pub fn into_request(self) -> WriteRequest {
        WriteRequest {
            session: None,
            command: Command::Txn {
                compares: self
                    .compares
                    .into_iter()
                    .map(|(key, expected)| Compare { key, expected })
                    .collect(),
                ops: self.ops,
            },
        }
    }
}

/// The shards of a new keyspace: `n` equal hash ranges, or one range shard (a range keyspace
/// grows by splitting, since nothing is known yet of its keys' distribution).
pub fn initial_ranges(keyspace: u32, hashed: bool, n: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    if hashed {
        let b = keycodec::hash_shard_bounds(keyspace, n);
        b.windows(2).map(|w| (w[0].clone(), w[1].clone())).collect()
    } else {
        vec![keycodec::keyspace_range(keyspace)]
    }
}

/// The descriptor of the default keyspace every cluster has.
pub fn default_keyspace(replicas: u32) -> KeyspaceDesc {
    KeyspaceDesc {
        name: DEFAULT_KEYSPACE_NAME.to_string(),
        id: DEFAULT_KEYSPACE,
        hashed: false,
        replicas,
        initial_shards: 1,
        default_read: DefaultRead::Linearizable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_txn_compares_every_key_it_writes_against_its_view() {
        let cat = Catalog::default();
        let mut t = cat.txn();
        // Groups 1 and 2 (meta, default keyspace) and keyspaces 0 and 1 are never allocated.
        assert_eq!(t.new_group_id(), 3);
        assert_eq!(t.new_group_id(), 4);
        assert_eq!(t.new_keyspace_id(), 2);
        t.put_keyspace(&default_keyspace(3));
        let WriteRequest {
            command: Command::Txn { compares, ops },
            ..
        } = t.into_request()
        else {
            panic!("not a txn");
        };
        // seq/group is compared once (against its absence), even though written twice.
        assert_eq!(compares.len(), 3);
        assert!(compares.iter().all(|c| c.expected.is_none()));
        assert_eq!(ops.len(), 4);
        assert!(!cat.dropped(DEFAULT_KEYSPACE), "the default keyspace is never dropped");
    }

    #[test]
    fn hash_keyspaces_start_with_equal_ranges_and_range_keyspaces_with_one() {
        let r = initial_ranges(5, true, 16);
        assert_eq!(r.len(), 16);
        assert_eq!(r[0].0, keycodec::keyspace_range(5).0);
        assert_eq!(r[15].1, keycodec::keyspace_range(5).1);
        assert!(r.windows(2).all(|w| w[0].1 == w[1].0));
        assert_eq!(initial_ranges(5, false, 16), vec![keycodec::keyspace_range(5)]);
    }
}
