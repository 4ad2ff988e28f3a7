//! Basalt's storage layer, independent of any consensus algorithm.
//!
//! One [`Engine`] per node (RocksDB in production, [`MemoryEngine`] in tests and the
//! simulator), and on top of it, written once: key encodings ([`keys`]), checksummed records
//! ([`record`]), the node-wide [`GroupCommitWriter`], each group's raw [`RaftLog`], the
//! replicated key-value [`KvStateMachine`] with exactly-once client sessions, shard merges
//! ([`merge`]), and snapshot files ([`snapshot`]).
//!
//! Two rules hold across the crate. Every persisted value goes through [`record`] and is
//! verified on every read, so corruption surfaces as [`StorageError::Corruption`] and never as
//! a wrong answer. And every multi-key change that must be atomic is one [`WriteBatch`], so a
//! crash leaves either all of it or none of it.

pub mod engine;
pub mod error;
pub mod group_commit;
pub mod keys;
pub mod merge;
pub mod metrics;
pub mod raft_log;
pub mod record;
pub mod replica;
pub mod session;
pub mod shard;
pub mod snapshot;
pub mod state_machine;

pub use engine::{Cf, Engine, EngineRead, KvPair, MemoryEngine, RocksEngine, ScanIter, WriteBatch, WriteOp};
pub use error::{Result, StorageError};
pub use group_commit::{Durable, GroupCommitWriter, Submitted};
pub use keys::{RaftStateItem, DEFAULT_KEYSPACE};
pub use merge::{MergeExport, MergePair, MergeSource, MAX_MERGE_BYTES};
pub use metrics::StorageMetrics;
pub use raft_log::RaftLog;
pub use replica::{destroy_replica, destroy_replica_keeping};
pub use session::Session;
pub use shard::ShardState;
pub use snapshot::{build_snapshot, prepare_snapshot, read_snapshot_info, PreparedSnapshot, SnapshotInfo};
pub use state_machine::{
    ApplyEntry, Command, Compare, KvStateMachine, ShardScan, ShardScanPage, StateMachineConfig, TxnOp, WriteRequest,
    WriteResponse, MAX_SCAN_LIMIT,
};

// The consensus and server layers move these across threads and tasks: fail the build, not a
// deployment, if one of them stops being shareable.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<StorageError>();
    send_sync::<Durable>();
    send_sync::<GroupCommitWriter>();
    send_sync::<RaftLog>();
    send_sync::<KvStateMachine>();
    send_sync::<StorageMetrics>();
    send_sync::<RocksEngine>();
    send_sync::<MemoryEngine>();
};
