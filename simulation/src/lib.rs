//! Basalt's simulation and Jepsen-style testing.
//!
//! `basalt-sim` will run whole Basalt clusters inside one deterministic simulation (simulated
//! network, clock and disks, driven by a seed) and, separately, drive real clusters with a
//! Jepsen-style runner that injects partitions, crashes and restarts while clients record what
//! they observed. Both produce the same artefact, an operation [`History`], and judge it with the
//! same checkers, so a bug found by one can be replayed and understood with the other.
//!
//! What is here now is that common half, and the runner against real processes:
//!
//! - [`history`]: the recorded events, their canonical JSON-lines form and stable hash, and
//!   their pairing into [`Operation`]s;
//! - [`model`]: the sequential specification of a key (a register with read, write and CAS);
//! - [`linearizability`]: a per-key Wing–Gong–Lowe search with memoization and a deterministic
//!   step budget;
//! - [`durability`]: no acknowledged write is missing from the final state;
//! - [`convergence`]: every replica ends with the same state;
//! - [`jepsen`]: the runner against real `basaltd` processes (SIGKILL, SIGSTOP/SIGCONT,
//!   restarts), judged by the same checkers.
//!
//! Every checker is deterministic: the same history gives the same verdict, byte for byte, on
//! every machine, which is what lets a failing seed be shared and replayed.

pub mod convergence;
pub mod durability;
pub mod history;
pub mod jepsen;
pub mod linearizability;
pub mod model;

pub use convergence::Divergence;
pub use durability::{AckedWrite, DurabilityFinding};
pub use history::{Event, EventKind, History, HistoryError, Op, OpKind, Operation, Value};
pub use linearizability::{CheckConfig, Report, Verdict};
pub use model::{Register, RegisterOp, Response};
