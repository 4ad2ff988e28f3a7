//! The storage engine abstraction: one ordered key-value store per node, split into column
//! families by role, with atomic write batches, ordered scans and point-in-time snapshots.
//!
//! Everything above this module (key encoding, the Raft log, the state machine, snapshots) is
//! written once against [`Engine`], and two engines implement it:
//!
//! * [`RocksEngine`]: the real one, one RocksDB instance shared by every replica group on the
//!   node, so that all groups' log appends can share one WAL and one fsync.
//! * [`MemoryEngine`]: an in-memory engine for tests and the deterministic simulator that
//!   models exactly what an fsync does and does not make durable.
//!
//! Durability model, shared by both engines and relied upon by every caller: writes are applied
//! in one total order (the WAL order). A write made with `sync = true`, or a call to
//! [`Engine::sync`], makes that write **and every earlier write** durable: prefix durability,
//! which is what a single RocksDB WAL provides. After a crash the engine holds exactly a prefix
//! of the write order that includes every synced write, and never a torn batch: a
//! [`WriteBatch`] is all-or-nothing. The state machine depends on this to skip fsyncs when
//! applying (its writes become durable with the next synced log append), and the Raft log
//! depends on it to make many groups durable with one fsync.

mod memory;
mod rocks;

pub use memory::MemoryEngine;
pub use rocks::RocksEngine;

use crate::error::Result;

/// The column families of a node's engine. Roles are kept apart so that each can be tuned (the
/// log is written once and deleted in ranges; data is read randomly) and so that a range
/// deletion in one role can never touch another's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Raft log entries of every group, keyed `group | index`.
    RaftLog,
    /// Raft hard state of every group (vote, committed, last purged log id).
    RaftState,
    /// The replicated key-value data of every keyspace.
    Data,
    /// Per-group state-machine metadata: applied state and client sessions.
    Meta,
}

impl Cf {
    /// Every column family, in a fixed order (used as an array index by the memory engine).
    pub const ALL: [Cf; 4] = [Cf::RaftLog, Cf::RaftState, Cf::Data, Cf::Meta];

    /// The column family's name inside RocksDB. Changing a name orphans existing data.
    pub fn name(self) -> &'static str {
        match self {
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
            Cf::Data => "data",
            Cf::Meta => "meta",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Cf::RaftLog => 0,
            Cf::RaftState => 1,
            Cf::Data => 2,
            Cf::Meta => 3,
        }
    }
}

impl std::fmt::Display for Cf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One operation of a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes every key in `[start, end)`.
    DeleteRange {
        cf: Cf,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// An ordered list of writes applied atomically: after a crash either all of them are present
/// or none. Operations apply in insertion order, so a put after a range deletion survives it.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put {
            cf,
            key: key.into(),
            value: value.into(),
        });
    }

    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete { cf, key: key.into() });
    }

    /// Deletes every key in `[start, end)` of `cf`.
    pub fn delete_range(&mut self, cf: Cf, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteRange {
            cf,
            start: start.into(),
            end: end.into(),
        });
    }

    /// Number of operations (a range deletion counts as one).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends `other`'s operations after this batch's, preserving both orders.
    pub fn extend(&mut self, other: WriteBatch) {
        if self.ops.is_empty() {
            self.ops = other.ops;
        } else {
            self.ops.extend(other.ops);
        }
    }

    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    pub fn into_ops(self) -> Vec<WriteOp> {
        self.ops
    }
}

/// An owned key-value pair as returned by scans.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// The iterator type returned by [`EngineRead::scan`].
pub type ScanIter<'a> = Box<dyn Iterator<Item = Result<KvPair>> + 'a>;

/// Read access to an engine or to one consistent snapshot of it.
pub trait EngineRead: Send + Sync {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Ascending over `[start, end)`; `end = None` is unbounded. The iterator reads one
    /// consistent view: writes made after the call do not appear in it.
    fn scan<'a>(&'a self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter<'a>>;

    /// The last pair in `[start, end)` (used for "last log entry").
    fn last_in_range(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>>;
}

/// A node's storage engine. See the module documentation for the durability model.
pub trait Engine: EngineRead {
    /// Applies `batch` atomically. With `sync`, the batch and every earlier write are durable
    /// when this returns.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;

    /// Makes every write so far durable (RocksDB: `flush_wal(true)`).
    fn sync(&self) -> Result<()>;

    /// Runs `f` over one consistent point-in-time view across all column families.
    fn with_snapshot(&self, f: &mut dyn FnMut(&dyn EngineRead) -> Result<()>) -> Result<()>;
}

#[cfg(test)]
mod tests;
