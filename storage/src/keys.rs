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
//! User keys go through [`encode_bytes`], a memcomparable escape, rather than being appended
//! raw, so that something can follow them later (the descending MVCC version suffix) without
//! breaking order: raw `"a"` + suffix could sort after raw `"a\x00"`, the escaped form cannot.
//! Integers are big-endian because that is the encoding whose byte order is numeric order.

use crate::error::{Result, StorageError};

/// The keyspace of the single range-sharded keyspace that exists until keyspaces can be created.
pub const DEFAULT_KEYSPACE: u32 = 1;

/// The largest valid keyspace id. `u32::MAX` is reserved so that every keyspace has an
/// exclusive upper bound (`keyspace + 1`) inside the 4-byte prefix space.
pub const MAX_KEYSPACE: u32 = u32::MAX - 1;

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;

/// Appends the memcomparable encoding of `b`: every `0x00` becomes `0x00 0xFF` and the string
/// ends with `0x00 0x01`. The terminator sorts below every escaped or ordinary continuation
/// byte, so a string sorts before each of its extensions, exactly as raw bytes do.
pub fn encode_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.reserve(b.len() + 2);
    for &byte in b {
        if byte == ESCAPE {
            out.extend_from_slice(&[ESCAPE, ESCAPED_ZERO]);
        } else {
            out.push(byte);
        }
    }
    out.extend_from_slice(&[ESCAPE, TERMINATOR]);
}

/// Decodes one [`encode_bytes`] string from the front of `input`; returns it and the number of
/// bytes consumed, so that a suffix may follow.
pub fn decode_bytes(input: &[u8]) -> Result<(Vec<u8>, usize)> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let byte = input[i];
        if byte != ESCAPE {
            out.push(byte);
            i += 1;
            continue;
        }
        match input.get(i + 1) {
            Some(&ESCAPED_ZERO) => {
                out.push(0);
                i += 2;
            }
            Some(&TERMINATOR) => return Ok((out, i + 2)),
            Some(other) => {
                return Err(StorageError::corruption(format!(
                    "encoded byte string has invalid escape 0x00 0x{other:02x} at offset {i}"
                )))
            }
            None => break,
        }
    }
    Err(StorageError::corruption(format!(
        "encoded byte string of {} bytes has no terminator",
        input.len()
    )))
}

/// The data-CF key of `user_key` in `keyspace`. `shard_prefix` is empty for range-sharded
/// keyspaces and a fixed-width hash of the user key for hash-sharded ones.
pub fn data_key(keyspace: u32, shard_prefix: &[u8], user_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + shard_prefix.len() + user_key.len() + 2);
    key.extend_from_slice(&keyspace.to_be_bytes());
    key.extend_from_slice(shard_prefix);
    encode_bytes(&mut key, user_key);
    key
}

/// Recovers the user key from a data key of `keyspace` whose shard prefix is `prefix_len`
/// bytes long. Anything else (another keyspace, trailing bytes) is corruption: the caller read
/// it from inside its own key range.
pub fn decode_data_key(keyspace: u32, prefix_len: usize, key: &[u8]) -> Result<Vec<u8>> {
    let header = 4 + prefix_len;
    if key.len() < header || key[..4] != keyspace.to_be_bytes() {
        return Err(StorageError::corruption(format!(
            "data key {key:?} does not belong to keyspace {keyspace}"
        )));
    }
    let (user_key, used) = decode_bytes(&key[header..])?;
    if header + used != key.len() {
        return Err(StorageError::corruption(format!(
            "data key {key:?} has {} unexpected trailing bytes",
            key.len() - header - used
        )));
    }
    Ok(user_key)
}

/// `[start, end)` of every data key of `keyspace`.
///
/// # Panics
/// If `keyspace` is `u32::MAX`, which is reserved (see [`MAX_KEYSPACE`]); keyspace ids come
/// from the metadata layer, which never allocates it.
pub fn keyspace_range(keyspace: u32) -> (Vec<u8>, Vec<u8>) {
    let next = keyspace
        .checked_add(1)
        .expect("keyspace id u32::MAX is reserved so that every keyspace has an upper bound");
    (keyspace.to_be_bytes().to_vec(), next.to_be_bytes().to_vec())
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
