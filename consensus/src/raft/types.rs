//! The openraft type configuration of a Basalt group, and the aliases the adapters use.
//!
//! Application data is `basalt_storage::WriteRequest` and the response `WriteResponse`, so the
//! state machine's types are the log's types with no translation layer. A node is identified by a
//! `u64` and reached at `BasicNode::addr`, its gRPC address (clients and peers share one port).

use std::path::PathBuf;

use basalt_storage::{WriteRequest, WriteResponse};

openraft::declare_raft_types!(
    /// Type configuration of every Raft group in Basalt.
    pub TypeConfig:
        D = WriteRequest,
        R = WriteResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A snapshot on disk. openraft hands it between the state machine, the sender and the receiver
/// by value; the bytes stay in the file (snapshots can be far larger than memory should hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, super::state_machine::StateMachineStore>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>;
