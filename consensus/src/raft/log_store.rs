//! openraft's log storage over `basalt_storage::RaftLog`.
//!
//! The storage layer keeps opaque, checksummed entries per group; this adapter decides what goes in
//! them: each openraft entry is postcard-encoded at its index. Invariants openraft relies on and
//! how they hold:
//!
//! - Appended entries are readable when `append` returns, and `callback` fires only once they are
//!   durable: `RaftLog::append` returns once the group-commit writer applied the batch to the engine
//!   and hands back a `Durable` that resolves after the shared fsync.
//! - No holes: truncation removes a suffix and purge a prefix, each in one atomic batch, and the
//!   last purged log id is stored with the purge so `get_log_state` is right after a crash.
//! - The vote is durable before `save_vote` returns (a synced write), so a node never votes twice
//!   in a term across a crash.
//!
//! Any storage error, corruption included, is returned as an `io::Error`; openraft then stops the
//! group, and the server reports the replica as stopped rather than serving from a damaged log.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use basalt_storage::{RaftLog, RaftStateItem, StorageError};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;

use super::types::{Entry, LogId, TypeConfig, Vote};
use super::wire;
use crate::GroupHealth;

#[derive(Clone)]
pub struct LogStore {
    log: RaftLog,
    health: Arc<GroupHealth>,
}

impl LogStore {
    pub fn new(log: RaftLog, health: Arc<GroupHealth>) -> Self {
        Self { log, health }
    }

    /// Converts a storage error for openraft, first marking the replica corrupt if it is: openraft
    /// will stop on the error either way, but clients should learn that data is damaged.
    fn fail(&self, e: StorageError) -> io::Error {
        if e.is_corruption() {
            self.health.stop_corrupt(format!("raft log: {e}"));
        }
        io::Error::other(e)
    }

    fn decode_entry(&self, index: u64, bytes: &[u8]) -> io::Result<Entry> {
        decode_entry(index, bytes).inspect_err(|e| self.health.stop_corrupt(format!("raft log: {e}")))
    }
}

fn decode_entry(index: u64, bytes: &[u8]) -> io::Result<Entry> {
    let entry: Entry = wire::decode("log entry", bytes).map_err(wire::to_io)?;
    if entry.index() != index {
        // The checksum covered the bytes but not their placement; a mismatch means the entry
        // was written under the wrong key.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("log entry at index {index} claims index {}", entry.index()),
        ));
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let log = self.log.clone();
        let raw = super::blocking::run(move || log.entries(start, end))
            .await?
            .map_err(|e| self.fail(e))?;
        raw.iter().map(|(i, b)| self.decode_entry(*i, b)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.log.read_state(RaftStateItem::Vote).map_err(|e| self.fail(e))? {
            Some(b) => Ok(Some(wire::decode("vote", &b).map_err(wire::to_io)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = match self
            .log
            .read_state(RaftStateItem::LastPurged)
            .map_err(|e| self.fail(e))?
        {
            Some(b) => Some(wire::decode("last purged log id", &b).map_err(wire::to_io)?),
            None => None,
        };
        let last = match self.log.last_entry().map_err(|e| self.fail(e))? {
            Some((i, b)) => Some(self.decode_entry(i, &b)?.log_id()),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = wire::encode("vote", vote).map_err(wire::to_io)?;
        self.log
            .save_state(RaftStateItem::Vote, bytes)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            encoded.push((e.index(), wire::encode("log entry", &e).map_err(wire::to_io)?));
        }
        let durable = self.log.append(encoded).await.map_err(|e| self.fail(e))?;
        let health = self.health.clone();
        durable.on_durable(move |r| {
            callback.io_completed(r.map_err(|e| {
                if e.is_corruption() {
                    health.stop_corrupt(format!("raft log: {e}"));
                }
                io::Error::other(e)
            }))
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.log.truncate_from(from).await.map_err(|e| self.fail(e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let marker = wire::encode("last purged log id", &log_id).map_err(wire::to_io)?;
        self.log
            .purge_through(log_id.index(), marker)
            .await
            .map_err(|e| self.fail(e))
    }
}
