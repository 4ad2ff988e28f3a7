//! Basalt's load generator, newcomer demo, and the local-cluster launcher they share.
//!
//! Everything here drives *real* `basaltd` processes through the public client API: nothing reaches
//! into server internals, so what these tools measure and demonstrate is what a user would see.
//! [`local_cluster`] is also the fixture for the server's integration tests and the Jepsen-style
//! harness, which is why it is a library module and not private to the binaries.
//!
//! - [`local_cluster`]: spawns, signals, restarts and cleans up local `basaltd` processes.
//! - [`metrics_scrape`]: reads Prometheus text metrics over plain HTTP.
//! - [`workload`], [`report`], [`bench`]: the closed-loop load generator behind `basalt-bench`.
//! - [`idle`]: `basalt-bench idle-groups`, the cost of idle replica groups per node.
//! - [`codec`]: `basalt-bench codec`, throughput and compression of the replication codec (`basalt-gpu`)
//!   per batch size and backend; runs no cluster.
//! - [`demo`]: the guided failover walkthrough behind `basalt-demo`.

pub mod bench;
pub mod codec;
pub mod demo;
pub mod idle;
pub mod local_cluster;
pub mod metrics_scrape;
pub mod report;
pub mod workload;
