//! A shard as its replicas know it: keyspace, kind, `[start, end)` of encoded keys, and epoch.
//!
//! This is the state machine's own, replicated record of what it serves. It changes only by
//! applying log entries (a split) or installing a snapshot, so every replica that has applied the
//! same prefix of the log agrees on it, and a write is checked against it at apply time: a write
//! routed by a stale view (proposed before a split, applied after) is refused, never applied to
//! keys that another group now owns. The cluster catalog holds copies of these descriptors for
//! routing; this record is the authority.
//!
//! A shard being merged into its left neighbour is first *frozen* (see `crate::merge`): it keeps
//! serving reads but refuses every write at apply time, so the data its neighbour takes over
//! through its own log is final. `frozen` is part of the state, so restarts and snapshots keep it.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::keys;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShardState {
    pub keyspace: u32,
    /// Hash-sharded keyspace: stored keys carry a hash prefix.
    pub hashed: bool,
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub end: Vec<u8>,
    /// Changes on every split, freeze, unfreeze and merge.
    pub epoch: u64,
    /// Refuses every write (it is being merged into its left neighbour); reads still work.
    #[serde(default)]
    pub frozen: bool,
}

impl ShardState {
    /// The whole of `keyspace`, at epoch 1.
    pub fn whole_keyspace(keyspace: u32, hashed: bool) -> Self {
        let (start, end) = keys::keyspace_range(keyspace);
        ShardState {
            keyspace,
            hashed,
            start,
            end,
            epoch: 1,
            frozen: false,
        }
    }

    /// Refuses a reserved keyspace or a range that is empty or leaves its keyspace.
    pub fn validate(&self) -> Result<()> {
        if self.keyspace > keys::MAX_KEYSPACE {
            return Err(StorageError::InvalidArgument(format!(
                "keyspace {} is reserved",
                self.keyspace
            )));
        }
        let (ks_start, ks_end) = keys::keyspace_range(self.keyspace);
        if self.start >= self.end || self.start < ks_start || self.end > ks_end {
            return Err(StorageError::InvalidArgument(format!(
                "shard range {:?}..{:?} is empty or leaves keyspace {}",
                self.start, self.end, self.keyspace
            )));
        }
        Ok(())
    }

    pub fn prefix_len(&self) -> usize {
        if self.hashed {
            keys::HASH_PREFIX_LEN
        } else {
            0
        }
    }

    /// The stored key of `user_key` in this shard's keyspace.
    pub fn data_key(&self, user_key: &[u8]) -> Vec<u8> {
        keys::encode_key(self.keyspace, self.hashed, user_key)
    }

    pub fn contains(&self, stored_key: &[u8]) -> bool {
        self.start.as_slice() <= stored_key && stored_key < self.end.as_slice()
    }

    pub fn contains_user_key(&self, user_key: &[u8]) -> bool {
        self.contains(&self.data_key(user_key))
    }

    /// Whether `other`'s range lies entirely inside this shard's (same keyspace).
    pub fn covers(&self, other: &ShardState) -> bool {
        self.keyspace == other.keyspace && self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share at least one key.
    pub fn overlaps(&self, other: &ShardState) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Where a scan with this cursor and start key reads next (see `keycodec::scan_position`).
    pub fn scan_position(&self, cursor: Option<&[u8]>, start: &[u8]) -> Vec<u8> {
        keys::scan_position(self.keyspace, self.hashed, cursor, start)
    }

    /// The two halves of a split at `at`, both at the next epoch.
    pub fn split(&self, at: Vec<u8>) -> (ShardState, ShardState) {
        let epoch = self.epoch + 1;
        let left = ShardState {
            end: at.clone(),
            epoch,
            ..self.clone()
        };
        let right = ShardState {
            start: at,
            epoch,
            ..self.clone()
        };
        (left, right)
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|source| StorageError::Codec {
            context: "encoding a shard state".into(),
            source,
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|e| StorageError::corruption(format!("shard state does not decode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_partitions_the_range_and_bumps_the_epoch() {
        let s = ShardState::whole_keyspace(4, false);
        let at = s.data_key(b"m");
        let (l, r) = s.split(at.clone());
        assert_eq!((l.start.clone(), l.end.clone()), (s.start.clone(), at.clone()));
        assert_eq!((r.start.clone(), r.end.clone()), (at, s.end.clone()));
        assert_eq!((l.epoch, r.epoch), (2, 2));
        assert!(l.contains_user_key(b"a") && !l.contains_user_key(b"m"));
        assert!(r.contains_user_key(b"m") && r.contains_user_key(b"zzz"));
        assert_eq!(ShardState::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn invalid_ranges_are_refused() {
        let mut s = ShardState::whole_keyspace(4, true);
        assert!(s.validate().is_ok());
        s.end = s.start.clone();
        assert!(s.validate().is_err());
        let mut t = ShardState::whole_keyspace(4, true);
        t.end = keys::keyspace_range(5).1;
        assert!(t.validate().is_err());
    }
}
