//! Key encodings for every column family.
//!
//! All keys are built so that **byte order equals logical order**, because the engine only
//! knows byte order: a scan over encoded keys must return user keys in ascending order, a log
//! range must be contiguous per group, and a shard (a range of user keys, or a range of hash
//! values for a hash-sharded keyspace) must be one contiguous range of encoded keys so that
//! split, merge, snapshot and move are written once.
//!
//! Layouts:
//!
//! | column family | key |
//! | --- | --- |
//! | `data` | `keyspace (u32 BE) | shard prefix | encode_bytes(user key)` |
//! | `raft_log` | `group (u64 BE) | index (u64 BE)` |
//! | `raft_state` | `group (u64 BE) | item tag (u8)` |
//! | `meta` | `group (u64 BE) | item bytes` (applied state, `session/` + client id BE) |
//!
//! The data-key encoding is shared with clients (they route by it), so it lives in
//! `basalt_proto::keycodec` and is re-exported here. User keys go through [`encode_bytes`], a
//! memcomparable escape, rather than being appended raw, so that something can follow them later
//! (the descending MVCC version suffix) without breaking order. Integers are big-endian because
//! that is the encoding whose byte order is numeric order.

use crate::error::{Result, StorageError};

pub use basalt_proto::keycodec::{
    data_key, encode_bytes, encode_key, keyspace_range, scan_position, DEFAULT_KEYSPACE, HASH_PREFIX_LEN, MAX_KEYSPACE,
    SYSTEM_KEYSPACE,
};

/// [`basalt_proto::keycodec::decode_bytes`], failing as corruption: every encoded key this crate
/// decodes was read from inside its own range.
pub fn decode_bytes(input: &[u8]) -> Result<(Vec<u8>, usize)> {
    basalt_proto::keycodec::decode_bytes(input).map_err(|e| StorageError::corruption(e.0))
}

/// [`basalt_proto::keycodec::decode_data_key`], failing as corruption.
pub fn decode_data_key(keyspace: u32, prefix_len: usize, key: &[u8]) -> Result<Vec<u8>> {
    basalt_proto::keycodec::decode_data_key(keyspace, prefix_len, key).map_err(|e| StorageError::corruption(e.0))
}

/// The raft-log-CF key of entry `index` of `group`.
pub fn log_key(group: u64, index: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

/// Inverse of [`log_key`].
pub fn decode_log_key(k: &[u8]) -> Result<(u64, u64)> {
    let bytes: [u8; 16] = k
        .try_into()
        .map_err(|_| StorageError::corruption(format!("raft log key {k:?} is {} bytes, not 16", k.len())))?;
    let (group, index) = bytes.split_at(8);
    Ok((
        u64::from_be_bytes(group.try_into().expect("split_at(8) of 16 bytes leaves 8")),
        u64::from_be_bytes(index.try_into().expect("split_at(8) of 16 bytes leaves 8")),
    ))
}

/// `[start, end)` covering every log key of `group`, including index `u64::MAX`: the end is
/// the largest log key of the group plus one byte, which sorts after it and before the first
/// key of the next group (this works even for `group = u64::MAX`, where `group + 1` would
/// overflow).
pub fn log_range(group: u64) -> (Vec<u8>, Vec<u8>) {
    let start = log_key(group, 0).to_vec();
    let mut end = log_key(group, u64::MAX).to_vec();
    end.push(0);
    (start, end)
}

/// The per-group items of the Raft hard state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RaftStateItem {
    Vote,
    Committed,
    LastPurged,
}

impl RaftStateItem {
    /// Persisted tags: never renumber.
    fn tag(self) -> u8 {
        match self {
            RaftStateItem::Vote => 1,
            RaftStateItem::Committed => 2,
            RaftStateItem::LastPurged => 3,
        }
    }
}

/// The raft-state-CF key of `item` of `group`.
pub fn raft_state_key(group: u64, item: RaftStateItem) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.extend_from_slice(&group.to_be_bytes());
    key.push(item.tag());
    key
}

/// A meta-CF key of `group` (applied state, sessions).
pub fn group_meta_key(group: u64, item: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + item.len());
    key.extend_from_slice(&group.to_be_bytes());
    key.extend_from_slice(item);
    key
}

/// The pseudo-group under which node-wide items live in the meta CF. Group ids are allocated by
/// the catalog from 1 upwards and never reach it.
pub const NODE_ITEMS: u64 = u64::MAX;
const REPLICA_ITEM: &[u8] = b"replica/";
const REPLICA_ITEM_END: &[u8] = b"replica0";

/// The meta-CF key recording that this node holds a replica of `group` (value: the shard it was
/// created for). The node opens exactly these groups at start-up.
pub fn replica_key(group: u64) -> Vec<u8> {
    let mut key = group_meta_key(NODE_ITEMS, REPLICA_ITEM);
    key.extend_from_slice(&group.to_be_bytes());
    key
}

/// `[start, end)` of every [`replica_key`].
pub fn replica_range() -> (Vec<u8>, Vec<u8>) {
    (
        group_meta_key(NODE_ITEMS, REPLICA_ITEM),
        group_meta_key(NODE_ITEMS, REPLICA_ITEM_END),
    )
}

/// Inverse of [`replica_key`].
pub fn decode_replica_key(key: &[u8]) -> Result<u64> {
    let prefix = group_meta_key(NODE_ITEMS, REPLICA_ITEM);
    key.strip_prefix(prefix.as_slice())
        .and_then(|id| <[u8; 8]>::try_from(id).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::corruption(format!("{key:?} is not a replica key")))
}

const APPLIED_ITEM: &[u8] = b"applied";
const SESSION_ITEM: &[u8] = b"session/";
/// The byte after `/`, so that `[session/, session0)` holds exactly the session keys.
const SESSION_ITEM_END: &[u8] = b"session0";

/// The meta-CF key of the state machine's applied state of `group`.
pub fn applied_state_key(group: u64) -> Vec<u8> {
    group_meta_key(group, APPLIED_ITEM)
}

/// The meta-CF key of one client session of `group`.
pub fn session_key(group: u64, client_id: u64) -> Vec<u8> {
    let mut key = group_meta_key(group, SESSION_ITEM);
    key.extend_from_slice(&client_id.to_be_bytes());
    key
}

/// `[start, end)` of every session key of `group`.
pub fn session_range(group: u64) -> (Vec<u8>, Vec<u8>) {
    (
        group_meta_key(group, SESSION_ITEM),
        group_meta_key(group, SESSION_ITEM_END),
    )
}

/// Inverse of [`session_key`].
pub fn decode_session_key(group: u64, key: &[u8]) -> Result<u64> {
    let prefix = group_meta_key(group, SESSION_ITEM);
    key.strip_prefix(prefix.as_slice())
        .and_then(|id| <[u8; 8]>::try_from(id).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::corruption(format!("{key:?} is not a session key of group {group}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_bytes(&mut out, b);
        out
    }

    #[test]
    fn escapes_zero_bytes_and_terminates() {
        assert_eq!(enc(b""), vec![0x00, 0x01]);
        assert_eq!(enc(&[0x00, 0x07]), vec![0x00, 0xFF, 0x07, 0x00, 0x01]);
    }

    #[test]
    fn rejects_malformed_encodings() {
        assert!(decode_bytes(&[0x61]).unwrap_err().is_corruption());
        assert!(decode_bytes(&[0x61, 0x00]).unwrap_err().is_corruption());
        assert!(decode_bytes(&[0x00, 0x02]).unwrap_err().is_corruption());
        assert!(decode_data_key(DEFAULT_KEYSPACE, 0, &data_key(2, b"", b"k")).is_err());
        let mut trailing = data_key(DEFAULT_KEYSPACE, b"", b"k");
        trailing.push(9);
        assert!(decode_data_key(DEFAULT_KEYSPACE, 0, &trailing).is_err());
        assert!(decode_log_key(&[0; 15]).is_err());
        assert!(decode_session_key(1, &session_key(2, 5)).is_err());
    }

    #[test]
    fn meta_keys_do_not_collide() {
        let (start, end) = session_range(7);
        let applied = applied_state_key(7);
        assert!(!(start <= applied && applied < end));
        assert!(session_key(7, u64::MAX) < end);
        assert!(session_key(7, 0) >= start);
        assert!(session_key(8, 0) >= end);
    }

    #[test]
    fn raft_state_keys_are_distinct_per_group_and_item() {
        let items = [RaftStateItem::Vote, RaftStateItem::Committed, RaftStateItem::LastPurged];
        let mut keys: Vec<Vec<u8>> = [1u64, 2]
            .iter()
            .flat_map(|g| items.iter().map(move |i| raft_state_key(*g, *i)))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 6);
    }

    proptest! {
        #[test]
        fn encode_bytes_preserves_order(a in proptest::collection::vec(any::<u8>(), 0..24),
                                        b in proptest::collection::vec(any::<u8>(), 0..24)) {
            prop_assert_eq!(a.cmp(&b), enc(&a).cmp(&enc(&b)));
        }

        /// Zero and 0xFF bytes are where escaping schemes go wrong; bias inputs towards them.
        #[test]
        fn encode_bytes_preserves_order_on_edge_bytes(
            a in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8)], 0..8),
            b in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), Just(0xFFu8)], 0..8)) {
            prop_assert_eq!(a.cmp(&b), enc(&a).cmp(&enc(&b)));
        }

        #[test]
        fn encode_bytes_round_trips_with_a_suffix(a in proptest::collection::vec(any::<u8>(), 0..32),
                                                  suffix in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut buf = enc(&a);
            let encoded_len = buf.len();
            buf.extend_from_slice(&suffix);
            let (decoded, used) = decode_bytes(&buf).unwrap();
            prop_assert_eq!(decoded, a);
            prop_assert_eq!(used, encoded_len);
        }

        #[test]
        fn data_keys_preserve_order_and_round_trip(ks in 0..=MAX_KEYSPACE,
                                                   prefix in proptest::collection::vec(any::<u8>(), 0..3),
                                                   a in proptest::collection::vec(any::<u8>(), 0..16),
                                                   b in proptest::collection::vec(any::<u8>(), 0..16)) {
            let (ka, kb) = (data_key(ks, &prefix, &a), data_key(ks, &prefix, &b));
            prop_assert_eq!(a.cmp(&b), ka.cmp(&kb));
            prop_assert_eq!(decode_data_key(ks, prefix.len(), &ka).unwrap(), a);
        }

        #[test]
        fn data_keys_fall_inside_their_keyspace_range_only(ks in 0..=MAX_KEYSPACE,
                                                           other in 0..=MAX_KEYSPACE,
                                                           prefix in proptest::collection::vec(any::<u8>(), 0..3),
                                                           key in proptest::collection::vec(any::<u8>(), 0..16)) {
            let k = data_key(ks, &prefix, &key);
            let (start, end) = keyspace_range(ks);
            prop_assert!(start <= k && k < end);
            if other != ks {
                let (os, oe) = keyspace_range(other);
                prop_assert!(!(os <= k && k < oe));
            }
        }

        #[test]
        fn log_keys_preserve_order_round_trip_and_stay_in_their_group(g1 in any::<u64>(), i1 in any::<u64>(),
                                                                      g2 in any::<u64>(), i2 in any::<u64>()) {
            let (k1, k2) = (log_key(g1, i1), log_key(g2, i2));
            prop_assert_eq!((g1, i1).cmp(&(g2, i2)), k1.cmp(&k2));
            prop_assert_eq!(decode_log_key(&k1).unwrap(), (g1, i1));
            let (start, end) = log_range(g1);
            prop_assert!(start.as_slice() <= k1.as_slice() && k1.as_slice() < end.as_slice());
            prop_assert_eq!(start.as_slice() <= k2.as_slice() && k2.as_slice() < end.as_slice(), g1 == g2);
        }

        #[test]
        fn session_keys_round_trip_and_stay_in_range(g in any::<u64>(), c in any::<u64>()) {
            let k = session_key(g, c);
            prop_assert_eq!(decode_session_key(g, &k).unwrap(), c);
            let (start, end) = session_range(g);
            prop_assert!(start <= k && k < end);
        }
    }
}
