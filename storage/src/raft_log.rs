//! The raw Raft log of one replica group, stored in the node's shared engine.
//!
//! Entries are opaque bytes (the consensus layer serialises them) keyed `group | index` in
//! [`Cf::RaftLog`], each wrapped in a checksummed record. Hard state (vote, committed, last
//! purged) lives in [`Cf::RaftState`]. All writes go through the node's
//! [`GroupCommitWriter`], so appends from every group share fsyncs.
//!
//! Invariants:
//!
//! * **No holes**: the stored indexes of a group are always one contiguous run. An append must
//!   start right after the last entry (or, on an empty log, right after the last purged index);
//!   an append that starts earlier replaces the suffix from its first index in the same atomic
//!   batch (Raft's "delete the conflicting entry and all that follow"). Truncation removes a
//!   suffix and purging removes a prefix, both of which keep a run contiguous.
//! * **Purge is atomic with its record**: purging deletes `..= index` and stores `LastPurged`
//!   in one batch, so after a crash the log never claims entries it no longer has, nor lacks
//!   entries it still claims. The purged index is kept inside the `LastPurged` record (ahead of
//!   the consensus layer's opaque blob) so that appends can check continuity after a purge.
//!   It never moves backwards.
//! * **Verified reads**: every entry is checked against its checksum and the run is checked for
//!   holes; a failure is [`StorageError::Corruption`] and is counted in the metrics.
//!
//! A group's log has a single writer (the consensus layer serialises log I/O per group, as
//! openraft does); the continuity checks read the current last entry and are not meant to
//! arbitrate between racing appenders.

use std::sync::Arc;

use crate::engine::{Cf, Engine, WriteBatch};
use crate::error::{Result, StorageError};
use crate::group_commit::{Durable, GroupCommitWriter};
use crate::keys::{decode_log_key, log_key, log_range, raft_state_key, RaftStateItem};
use crate::record::{decode_record, encode_record};

/// Bytes of the purged index stored ahead of the `LastPurged` blob.
const PURGED_INDEX_LEN: usize = 8;

/// The log of one replica group. Cheap to clone.
#[derive(Clone)]
pub struct RaftLog {
    engine: Arc<dyn Engine>,
    writer: Arc<GroupCommitWriter>,
    group: u64,
}

impl RaftLog {
    pub fn new(engine: Arc<dyn Engine>, writer: Arc<GroupCommitWriter>, group: u64) -> Self {
        RaftLog { engine, writer, group }
    }

    pub fn group(&self) -> u64 {
        self.group
    }

    /// Appends consecutive `entries` (index, payload). Returns once they are visible; the
    /// [`Durable`] resolves once they are fsynced. An empty append is a durability barrier for
    /// everything written before it.
    pub async fn append(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<Durable> {
        let Some(&(first, _)) = entries.first() else {
            return self.writer.write(WriteBatch::new(), 0).await;
        };
        for pair in entries.windows(2) {
            if pair[0].0.checked_add(1) != Some(pair[1].0) {
                return Err(StorageError::InvalidArgument(format!(
                    "group {}: appended entries are not consecutive ({} then {})",
                    self.group, pair[0].0, pair[1].0
                )));
            }
        }

        let mut batch = WriteBatch::new();
        match self.last_index()? {
            Some(last) if first <= last => {
                if let Some(purged) = self.purged_index()? {
                    if first <= purged {
                        return Err(StorageError::InvalidArgument(format!(
                            "group {}: append at {first} overwrites purged entries (purged through {purged})",
                            self.group
                        )));
                    }
                }
                let (_, end) = log_range(self.group);
                batch.delete_range(Cf::RaftLog, log_key(self.group, first).to_vec(), end);
            }
            Some(last) => {
                if last.checked_add(1) != Some(first) {
                    return Err(StorageError::InvalidArgument(format!(
                        "group {}: append at {first} would leave a hole after last entry {last}",
                        self.group
                    )));
                }
            }
            None => {
                if let Some(purged) = self.purged_index()? {
                    if purged.checked_add(1) != Some(first) {
                        return Err(StorageError::InvalidArgument(format!(
                            "group {}: append at {first} to an empty log purged through {purged} must start at {}",
                            self.group,
                            purged.saturating_add(1)
                        )));
                    }
                }
            }
        }

        let count = entries.len();
        for (index, payload) in entries {
            let key = log_key(self.group, index);
            batch.put(Cf::RaftLog, key.to_vec(), encode_record(&key, &payload));
        }
        self.writer.write(batch, count).await
    }

    /// The entries with indexes in `[start, end)` that exist, verified. Absent indexes at either
    /// end (purged, or not yet appended) are simply not returned.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if start >= end {
            return Ok(Vec::new());
        }
        self.read_entries(start, end)
            .map_err(|e| self.writer.metrics().observe_error(e))
    }

    fn read_entries(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let from = log_key(self.group, start);
        let to = log_key(self.group, end);
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for item in self.engine.scan(Cf::RaftLog, &from, Some(&to))? {
            let (key, value) = item?;
            let index = self.index_of(&key)?;
            if let Some(&(prev, _)) = out.last() {
                if prev.checked_add(1) != Some(index) {
                    return Err(StorageError::corruption(format!(
                        "group {}: raft log has a hole between entries {prev} and {index}",
                        self.group
                    )));
                }
            }
            let payload = decode_record(Cf::RaftLog, &key, &value)?;
            out.push((index, payload.to_vec()));
        }
        Ok(out)
    }

    /// The last entry, verified.
    pub fn last_entry(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let (start, end) = log_range(self.group);
        let result = match self.engine.last_in_range(Cf::RaftLog, &start, &end)? {
            None => Ok(None),
            Some((key, value)) => self.index_of(&key).and_then(|index| {
                let payload = decode_record(Cf::RaftLog, &key, &value)?;
                Ok(Some((index, payload.to_vec())))
            }),
        };
        result.map_err(|e| self.writer.metrics().observe_error(e))
    }

    /// The index of the last entry, without reading its payload.
    pub fn last_index(&self) -> Result<Option<u64>> {
        let (start, end) = log_range(self.group);
        match self.engine.last_in_range(Cf::RaftLog, &start, &end)? {
            None => Ok(None),
            Some((key, _)) => self.index_of(&key).map(Some),
        }
    }

    fn index_of(&self, key: &[u8]) -> Result<u64> {
        let (group, index) = decode_log_key(key)?;
        if group != self.group {
            return Err(StorageError::corruption(format!(
                "raft log scan of group {} returned key of group {group}",
                self.group
            )));
        }
        Ok(index)
    }

    /// Deletes every entry with index `>= index`; returns once durable.
    pub async fn truncate_from(&self, index: u64) -> Result<()> {
        let (_, end) = log_range(self.group);
        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::RaftLog, log_key(self.group, index).to_vec(), end);
        self.writer.write_durable(batch, 0).await
    }

    /// Deletes every entry with index `<= index` and stores `last_purged` (the consensus layer's
    /// serialised log id) in the same atomic batch; returns once durable. Purging beyond the
    /// last entry empties the log, and the next append must then start at `index + 1`.
    pub async fn purge_through(&self, index: u64, last_purged: Vec<u8>) -> Result<()> {
        if let Some(purged) = self.purged_index()? {
            if index < purged {
                return Err(StorageError::InvalidArgument(format!(
                    "group {}: purge through {index} would move the purge point back from {purged}",
                    self.group
                )));
            }
        }
        let (start, range_end) = log_range(self.group);
        let end = match index.checked_add(1) {
            Some(next) => log_key(self.group, next).to_vec(),
            None => range_end,
        };
        let mut payload = Vec::with_capacity(PURGED_INDEX_LEN + last_purged.len());
        payload.extend_from_slice(&index.to_be_bytes());
        payload.extend_from_slice(&last_purged);
        let key = raft_state_key(self.group, RaftStateItem::LastPurged);

        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::RaftLog, start, end);
        batch.put(Cf::RaftState, key.clone(), encode_record(&key, &payload));
        self.writer.write_durable(batch, 0).await
    }

    /// The index given to the last [`RaftLog::purge_through`], if any.
    pub fn purged_index(&self) -> Result<Option<u64>> {
        Ok(self.read_purged()?.map(|(index, _)| index))
    }

    fn read_purged(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(payload) = self.read_raw_state(RaftStateItem::LastPurged)? else {
            return Ok(None);
        };
        let Some((index, blob)) = payload.split_first_chunk::<PURGED_INDEX_LEN>() else {
            return Err(self.writer.metrics().observe_error(StorageError::corruption(format!(
                "group {}: LastPurged record of {} bytes lacks its purged index",
                self.group,
                payload.len()
            ))));
        };
        Ok(Some((u64::from_be_bytes(*index), blob.to_vec())))
    }

    fn read_raw_state(&self, item: RaftStateItem) -> Result<Option<Vec<u8>>> {
        let key = raft_state_key(self.group, item);
        let Some(stored) = self.engine.get(Cf::RaftState, &key)? else {
            return Ok(None);
        };
        decode_record(Cf::RaftState, &key, &stored)
            .map(|payload| Some(payload.to_vec()))
            .map_err(|e| self.writer.metrics().observe_error(e))
    }

    /// Reads a hard-state item, verified. For `LastPurged` this is the blob given to
    /// [`RaftLog::purge_through`].
    pub fn read_state(&self, item: RaftStateItem) -> Result<Option<Vec<u8>>> {
        match item {
            RaftStateItem::LastPurged => Ok(self.read_purged()?.map(|(_, blob)| blob)),
            _ => self.read_raw_state(item),
        }
    }

    /// Stores a hard-state item; returns once durable. `LastPurged` is refused: it is only
    /// written together with the deletion it describes, by [`RaftLog::purge_through`].
    pub async fn save_state(&self, item: RaftStateItem, value: Vec<u8>) -> Result<()> {
        if item == RaftStateItem::LastPurged {
            return Err(StorageError::InvalidArgument(format!(
                "group {}: LastPurged is written by purge_through, atomically with the purge",
                self.group
            )));
        }
        let key = raft_state_key(self.group, item);
        let mut batch = WriteBatch::new();
        batch.put(Cf::RaftState, key.clone(), encode_record(&key, &value));
        self.writer.write_durable(batch, 0).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineRead, MemoryEngine};
    use crate::metrics::StorageMetrics;
    use proptest::prelude::*;

    fn setup() -> (Arc<MemoryEngine>, RaftLog) {
        let engine = MemoryEngine::new();
        let writer = GroupCommitWriter::new(engine.clone(), StorageMetrics::unregistered());
        (engine.clone(), RaftLog::new(engine, writer, 7))
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime needs no OS resources beyond this thread")
    }

    fn entries(range: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, format!("entry-{i}").into_bytes())).collect()
    }

    async fn append_durable(log: &RaftLog, e: Vec<(u64, Vec<u8>)>) -> Result<()> {
        log.append(e).await?.wait().await
    }

    #[tokio::test]
    async fn append_read_and_survive_a_crash() {
        let (engine, log) = setup();
        append_durable(&log, entries(1..6)).await.unwrap();
        assert_eq!(log.entries(1, 6).unwrap(), entries(1..6));
        assert_eq!(log.entries(3, 100).unwrap(), entries(3..6));
        assert_eq!(log.last_entry().unwrap(), Some((5, b"entry-5".to_vec())));
        engine.crash();
        assert_eq!(log.entries(0, u64::MAX).unwrap(), entries(1..6));
    }

    #[tokio::test]
    async fn groups_do_not_see_each_other() {
        let (engine, log) = setup();
        let other = RaftLog::new(engine, log.writer.clone(), 8);
        append_durable(&log, entries(1..4)).await.unwrap();
        append_durable(&other, entries(10..12)).await.unwrap();
        assert_eq!(log.entries(0, u64::MAX).unwrap(), entries(1..4));
        assert_eq!(other.last_entry().unwrap().map(|e| e.0), Some(11));
        log.truncate_from(0).await.unwrap();
        assert_eq!(other.entries(0, u64::MAX).unwrap(), entries(10..12));
    }

    #[tokio::test]
    async fn rejects_holes() {
        let (_, log) = setup();
        append_durable(&log, entries(1..3)).await.unwrap();
        let err = append_durable(&log, entries(4..5)).await.unwrap_err();
        assert!(matches!(err, StorageError::InvalidArgument(_)), "{err}");
        let err = append_durable(&log, vec![(3, vec![]), (5, vec![])]).await.unwrap_err();
        assert!(matches!(err, StorageError::InvalidArgument(_)), "{err}");
        assert_eq!(log.entries(0, 10).unwrap(), entries(1..3));
    }

    #[tokio::test]
    async fn overlapping_append_replaces_the_suffix() {
        let (_, log) = setup();
        append_durable(&log, entries(1..6)).await.unwrap();
        append_durable(&log, vec![(3, b"new-3".to_vec())]).await.unwrap();
        let mut expected = entries(1..3);
        expected.push((3, b"new-3".to_vec()));
        assert_eq!(log.entries(0, 10).unwrap(), expected);
    }

    #[tokio::test]
    async fn purge_records_last_purged_and_constrains_appends() {
        let (engine, log) = setup();
        append_durable(&log, entries(1..6)).await.unwrap();
        log.purge_through(3, b"log-id-3".to_vec()).await.unwrap();
        assert_eq!(log.entries(0, 10).unwrap(), entries(4..6));
        assert_eq!(
            log.read_state(RaftStateItem::LastPurged).unwrap(),
            Some(b"log-id-3".to_vec())
        );
        assert_eq!(log.purged_index().unwrap(), Some(3));

        // Purging past the end (snapshot install) empties the log; appends resume after it.
        log.purge_through(20, b"log-id-20".to_vec()).await.unwrap();
        assert_eq!(log.last_entry().unwrap(), None);
        assert!(append_durable(&log, entries(5..6)).await.is_err());
        append_durable(&log, entries(21..23)).await.unwrap();
        assert!(log.purge_through(10, vec![]).await.is_err(), "purge point moved back");
        assert!(
            append_durable(&log, entries(20..21)).await.is_err(),
            "overwrote purged entry"
        );

        engine.crash();
        assert_eq!(log.entries(0, u64::MAX).unwrap(), entries(21..23));
        assert_eq!(
            log.read_state(RaftStateItem::LastPurged).unwrap(),
            Some(b"log-id-20".to_vec())
        );
    }

    #[tokio::test]
    async fn hard_state_round_trips_durably() {
        let (engine, log) = setup();
        assert_eq!(log.read_state(RaftStateItem::Vote).unwrap(), None);
        log.save_state(RaftStateItem::Vote, b"term 3 for 2".to_vec())
            .await
            .unwrap();
        log.save_state(RaftStateItem::Committed, b"9".to_vec()).await.unwrap();
        engine.crash();
        assert_eq!(
            log.read_state(RaftStateItem::Vote).unwrap(),
            Some(b"term 3 for 2".to_vec())
        );
        assert_eq!(log.read_state(RaftStateItem::Committed).unwrap(), Some(b"9".to_vec()));
        assert!(log.save_state(RaftStateItem::LastPurged, vec![]).await.is_err());
    }

    #[tokio::test]
    async fn a_flipped_byte_in_an_entry_is_corruption() {
        let (engine, log) = setup();
        append_durable(&log, entries(1..4)).await.unwrap();
        let key = log_key(7, 2);
        let mut stored = engine.get(Cf::RaftLog, &key).unwrap().unwrap();
        let last = stored.len() - 1;
        stored[last] ^= 0x01;
        let mut batch = WriteBatch::new();
        batch.put(Cf::RaftLog, key.to_vec(), stored);
        engine.write(batch, true).unwrap();

        let err = log.entries(1, 4).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert_eq!(
            log.entries(3, 4).unwrap(),
            entries(3..4),
            "other entries still readable"
        );
        assert_eq!(log.writer.metrics().corruptions.get(), 1);
    }

    #[tokio::test]
    async fn a_hole_in_the_stored_log_is_corruption() {
        let (engine, log) = setup();
        append_durable(&log, entries(1..4)).await.unwrap();
        let mut batch = WriteBatch::new();
        batch.delete(Cf::RaftLog, log_key(7, 2).to_vec());
        engine.write(batch, true).unwrap();
        assert!(log.entries(1, 4).unwrap_err().is_corruption());
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Append `len` entries starting `back` positions before the next free index.
        Append {
            back: u64,
            len: u64,
        },
        /// Append starting `gap + 2` past the next free index (must be refused).
        AppendWithHole {
            gap: u64,
        },
        Truncate {
            at: u64,
        },
        Purge {
            through: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..4, 1u64..5).prop_map(|(back, len)| Op::Append { back, len }),
            1 => (0u64..3).prop_map(|gap| Op::AppendWithHole { gap }),
            1 => (0u64..30).prop_map(|at| Op::Truncate { at }),
            1 => (0u64..30).prop_map(|through| Op::Purge { through }),
        ]
    }

    proptest! {
        /// Against a model: the stored log is always one contiguous run equal to the model,
        /// truncation removes exactly a suffix, purge exactly a prefix, and refused operations
        /// change nothing.
        #[test]
        fn log_matches_model(ops in proptest::collection::vec(op(), 1..30)) {
            let rt = runtime();
            let (_, log) = setup();
            let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut purged: Option<u64> = None;
            for (generation, op) in ops.into_iter().enumerate() {
                let next = model.last().map(|e| e.0 + 1).or(purged.map(|p| p + 1)).unwrap_or(1);
                match op {
                    Op::Append { back, len } => {
                        let floor = purged.map(|p| p + 1).unwrap_or(0);
                        let first = next.saturating_sub(back).max(floor);
                        let new: Vec<(u64, Vec<u8>)> = (first..first + len)
                            .map(|i| (i, format!("{generation}/{i}").into_bytes()))
                            .collect();
                        rt.block_on(append_durable(&log, new.clone())).unwrap();
                        model.retain(|e| e.0 < first);
                        model.extend(new);
                    }
                    // A fresh log (never appended to nor purged) may start anywhere.
                    Op::AppendWithHole { .. } if model.is_empty() && purged.is_none() => {}
                    Op::AppendWithHole { gap } => {
                        let first = next + gap + 1;
                        let refused = rt.block_on(append_durable(&log, vec![(first, vec![])]));
                        prop_assert!(refused.is_err());
                    }
                    Op::Truncate { at } => {
                        rt.block_on(log.truncate_from(at)).unwrap();
                        model.retain(|e| e.0 < at);
                    }
                    Op::Purge { through } => {
                        let result = rt.block_on(log.purge_through(through, through.to_be_bytes().to_vec()));
                        if purged.is_some_and(|p| through < p) {
                            prop_assert!(result.is_err());
                        } else {
                            result.unwrap();
                            model.retain(|e| e.0 > through);
                            purged = Some(through);
                        }
                    }
                }
                let stored = log.entries(0, u64::MAX).unwrap();
                prop_assert_eq!(&stored, &model);
                prop_assert_eq!(log.last_entry().unwrap(), model.last().cloned());
                prop_assert_eq!(log.purged_index().unwrap(), purged);
                prop_assert_eq!(
                    log.read_state(RaftStateItem::LastPurged).unwrap(),
                    purged.map(|p| p.to_be_bytes().to_vec())
                );
            }
        }
    }
}
