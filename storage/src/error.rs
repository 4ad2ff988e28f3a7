//! The one error type of the storage layer.
//!
//! Every variant carries enough context to act on without a debugger: which operation failed,
//! on which file, or what exactly did not verify. Callers branch on the *kind* of failure rather
//! than on messages, and the most important branch is [`StorageError::is_corruption`]: a replica
//! that read a record whose checksum does not match must stop serving, because every answer it
//! gives from then on may be silently wrong. Everything else (an I/O error, a malformed request)
//! is an ordinary failure of one operation.

use std::path::PathBuf;
use std::sync::Arc;

/// Result alias used throughout the crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything that can go wrong in the storage layer.
#[derive(thiserror::Error, Debug)]
pub enum StorageError {
    /// The storage engine (RocksDB) reported a failure other than corruption.
    #[error("storage engine failed during {op}: {source}")]
    Engine {
        op: &'static str,
        #[source]
        source: rocksdb::Error,
    },

    /// A persisted record failed verification (checksum mismatch, undecodable record, a hole in
    /// the log). The data on this replica can no longer be trusted: it must stop serving.
    #[error("corruption detected: {what}")]
    Corruption { what: String },

    /// A file-system operation outside the engine failed (snapshot files).
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A value could not be serialised. Decoding failures of *persisted* values are reported as
    /// [`StorageError::Corruption`] instead, because their checksum already matched.
    #[error("codec error while {context}: {source}")]
    Codec {
        context: String,
        #[source]
        source: postcard::Error,
    },

    /// A snapshot file is damaged, truncated or belongs to another group. The local state is
    /// untouched and trustworthy; the file should be discarded and fetched again.
    #[error("invalid snapshot file {}: {reason}", path.display())]
    SnapshotInvalid { path: PathBuf, reason: String },

    /// A read named a key outside the replica's shard (it split, or the request was routed by a
    /// stale view). Carries the shard this replica serves, for the caller to re-route.
    #[error("key outside shard {:?}..{:?} of keyspace {}", .0.start, .0.end, .0.keyspace)]
    WrongShard(Box<crate::shard::ShardState>),

    /// The replica's group was merged away from this node and its state machine fenced off the
    /// engine (another local replica owns its range now); it applies nothing more.
    #[error("group {group} was retired from this node (merged into a neighbour)")]
    Retired { group: u64 },

    /// The caller broke a precondition of the API (for example appended a log entry that would
    /// leave a hole). This is a bug in the caller, not a storage failure.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The group-commit writer failed a write or an fsync. After a failed fsync the contents of
    /// the WAL are unknown (the kernel may have dropped dirty pages), so the writer refuses every
    /// later write with this same error rather than pretend a retry could succeed.
    #[error("group commit {stage} failed: {source}")]
    CommitFailed {
        stage: &'static str,
        #[source]
        source: Arc<StorageError>,
    },

    /// The group-commit thread has exited (the writer was dropped) before handling a request.
    #[error("group commit writer stopped before completing the request")]
    WriterStopped,

    /// Registering the storage metrics with a Prometheus registry failed.
    #[error("registering storage metrics failed: {source}")]
    Metrics {
        #[source]
        source: prometheus::Error,
    },
}

impl StorageError {
    /// Whether this error means that data persisted on this replica is corrupt. A replica that
    /// sees `true` must stop serving (the gRPC layer maps it to `DATA_LOSS`).
    pub fn is_corruption(&self) -> bool {
        match self {
            StorageError::Corruption { .. } => true,
            StorageError::CommitFailed { source, .. } => source.is_corruption(),
            _ => false,
        }
    }

    /// Shorthand used by readers that found a record they cannot trust.
    pub fn corruption(what: impl Into<String>) -> Self {
        StorageError::Corruption { what: what.into() }
    }

    /// Maps a RocksDB error, keeping RocksDB's own corruption reports (block checksum
    /// mismatches, bad WAL records) in the corruption class so that they stop the replica too.
    pub fn engine(op: &'static str, source: rocksdb::Error) -> Self {
        if source.kind() == rocksdb::ErrorKind::Corruption {
            StorageError::Corruption {
                what: format!("RocksDB reported corruption during {op}: {source}"),
            }
        } else {
            StorageError::Engine { op, source }
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}
