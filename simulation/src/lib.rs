//! Basalt's simulation and Jepsen-style testing.
//!
//! `basalt-sim` runs whole Basalt clusters inside one deterministic simulation (simulated
//! network and clock, in-memory disks that lose unsynced writes on a crash, all driven by a seed)
//! and, separately, drives real clusters with a Jepsen-style runner that kills and pauses real
//! processes. Both produce the same artefact, an operation [`History`], from the same workload,
//! and judge it with the same checkers, so a bug found by one can be replayed and understood with
//! the other.
//!
//! - [`history`]: the recorded events, their canonical JSON-lines form and stable hash, and
//!   their pairing into [`Operation`]s;
//! - [`model`]: the sequential specification of a key (a register with read, write and CAS);
//! - [`linearizability`]: a per-key Wing–Gong–Lowe search with memoization and a deterministic
//!   step budget;
//! - [`durability`]: no acknowledged write is missing from the final state;
//! - [`convergence`]: every replica ends with the same state;
//! - [`staleness`]: `bounded_staleness` and `stale` reads return real values, never older than
//!   the bound they report;
//! - [`workload`]: the client processes, the recorder and the judgement, shared by both harnesses;
//! - [`sim`]: the deterministic simulator (turmoil hosts running the real server and client code,
//!   the seeded nemesis, the phases of a run);
//! - [`jepsen`]: the runner against real `basaltd` processes (SIGKILL, SIGSTOP/SIGCONT,
//!   restarts, partitions);
//! - [`netns`]: the network namespaces that let the Jepsen runner partition real processes.
//!
//! Every checker is deterministic: the same history gives the same verdict, byte for byte, on
//! every machine, which is what lets a failing seed be shared and replayed.

pub mod convergence;
pub mod durability;
pub mod history;
pub mod jepsen;
pub mod linearizability;
pub mod model;
pub mod netns;
pub mod sim;
pub mod staleness;
pub mod workload;

pub use convergence::Divergence;
pub use durability::{AckedWrite, DurabilityFinding};
pub use history::{Event, EventKind, History, HistoryError, Op, OpKind, Operation, Value};
pub use linearizability::{CheckConfig, Report, Verdict};
pub use model::{Register, RegisterOp, Response};
pub use staleness::{StaleRead, StalenessFinding};
