//! Errors of the replication layer, in terms a caller can act on.
//!
//! The distinctions matter to clients: `NotLeader` is a routing hint (safe to retry elsewhere,
//! nothing happened), `OutcomeUnknown` means a write may or may not have been applied (retry only
//! with the same write session, which makes the retry exactly-once), `Corrupted` means this
//! replica found corrupt data and refuses to serve at all, and `Stopped` that it hit a fatal error.

use basalt_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// This replica is not the leader; nothing was done.
    #[error("not the leader (leader: {})", leader_display(*.leader_id, .leader_addr))]
    NotLeader {
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    },
    /// Leadership could not be confirmed by a quorum in time; nothing was read.
    #[error("no quorum: {0}")]
    QuorumUnavailable(String),
    /// The write was appended but its leader lost leadership: it may or may not commit.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The named node is not a member of the group; nothing was done.
    #[error("node {0} is not a member")]
    UnknownMember(u64),
    /// A membership change was refused (for example an unknown member).
    #[error("membership change refused: {0}")]
    Membership(String),
    /// The replica stopped serving after a fatal error (storage failure, shutdown).
    #[error("replica stopped: {0}")]
    Stopped(String),
    /// The replica found corrupt data and stopped serving; nothing it holds is served any more.
    #[error("replica stopped, corrupt data: {0}")]
    Corrupted(String),
    /// A bounded-staleness read could not be proven fresh enough on this replica (its safe time
    /// is older than the bound, or it has none); nothing was read. Retry on the leader.
    #[error("replica not fresh enough: {}", too_stale_display(*.age, *.max))]
    TooStale {
        age: Option<std::time::Duration>,
        max: std::time::Duration,
    },
    /// A storage error while serving a read.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn leader_display(id: Option<u64>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("{id} at {addr}"),
        (Some(id), None) => id.to_string(),
        _ => "unknown".to_string(),
    }
}

fn too_stale_display(age: Option<std::time::Duration>, max: std::time::Duration) -> String {
    match age {
        Some(a) => format!("its data may be {a:?} old, over the bound of {max:?}"),
        None => format!("it has no safe time yet, and the bound is {max:?}"),
    }
}
