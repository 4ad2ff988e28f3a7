//! The Basalt node (`basaltd`).
//!
//! Where a request flows: a client's gRPC call arrives at [`kv_service`] or [`admin_service`],
//! is validated against [`limits`], and goes to the replica group through the
//! `basalt_consensus::Replication` trait; on a follower it is forwarded to the leader
//! ([`forward`]). Errors become gRPC statuses in one place ([`errors`]). [`node`] assembles the
//! engine, the group-commit writer, the groups and the servers; [`config`] resolves flags, file and
//! defaults; [`metrics`] serves Prometheus text on `/metrics`. [`planted`] holds the deliberate bugs
//! that only the simulator can switch on, to test its checkers.

pub mod admin_service;
pub mod config;
pub mod errors;
pub mod forward;
pub mod kv_service;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod planted;

pub use node::{Node, NodeEnv};
pub use planted::PlantedBug;
