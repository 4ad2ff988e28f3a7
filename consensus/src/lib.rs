//! Basalt's replication layer.
//!
//! Everything above this crate (the server's gRPC services, later the placement driver and the
//! transaction coordinator) talks to a replica group through one trait, [`Replication`]: propose a
//! write and get the state machine's answer, pass a read barrier, change membership, and ask for
//! leadership and progress. The trait says nothing about Raft, so the BFT mode (HotStuff) can be a
//! second implementation over the same storage and state machine.
//!
//! [`raft`] is the implementation on `openraft`: storage adapters over `basalt-storage`, a tonic
//! peer transport whose messages carry a group id (so every group on a node shares one connection
//! per peer), and chunked, checksummed snapshot streaming.
//!
//! Where a request flows: `server` → [`Replication::propose`] → openraft (`raft::RaftGroup`) →
//! log append through the node's group-commit writer (`raft::log_store`) → replication to peers
//! (`raft::network` → peer's `raft::peer_service`) → commit → `raft::state_machine` applies it to
//! `basalt_storage::KvStateMachine` → the response travels back to the proposer.

pub mod clock;
mod error;
mod metrics;
pub mod raft;
mod replication;

pub use error::ReplicationError;
pub use metrics::{ConsensusMetrics, PeerKind};
pub use replication::{
    BoxFuture, GroupHealth, GroupStatus, MemberInfo, ReadBarrier, ReadGrant, ReadMode, Replication, Role, Staleness,
    StateReader,
};
