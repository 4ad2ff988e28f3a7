//! The Basalt node (`basaltd`).
//!
//! Where a request flows: a client's gRPC call arrives at [`kv_service`] or [`admin_service`],
//! is validated against [`limits`], finds its keyspace in the [`catalog`] and the local replica
//! whose shard holds its key in [`replicas`], and goes to that replica group through the
//! `basalt_consensus::Replication` trait; on a follower it is forwarded to the leader
//! ([`forward`]). Catalog changes (keyspaces, splits, [`merge`]s, [`replica_move`]s) go through [`placement`]
//! on the meta group's leader, whose [`driver`] also decides them by itself from the nodes'
//! reports ([`load`]): re-replication, automatic splits, rebalancing; every node's
//! [`reconciler`] opens and removes replicas to match, and [`shard_call`] reaches a shard's leader
//! for the steps its group must take. Errors become gRPC statuses in one place ([`errors`]). [`node`] assembles the
//! engine, the group-commit writer, the groups and the servers; [`config`] resolves flags, file and
//! defaults; [`metrics`] serves Prometheus text on `/metrics`. [`planted`] holds the deliberate bugs
//! that only the simulator can switch on, to test its checkers.

pub mod admin_service;
pub mod catalog;
pub mod config;
pub mod driver;
pub mod errors;
pub mod forward;
pub mod kv_service;
pub mod limits;
pub mod load;
pub mod merge;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod planted;
pub mod read_mode;
pub mod reconciler;
pub mod replica_move;
pub mod replicas;
pub mod shard_call;

pub use node::{Node, NodeEnv};
pub use planted::PlantedBug;
