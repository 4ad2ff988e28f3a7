//! Coalesced ReadIndex rounds: one leadership confirmation serves every read that was waiting
//! when it started.
//!
//! A ReadIndex read needs a quorum to confirm, *after the read arrived*, that this replica still
//! leads; openraft runs one heartbeat round per request for that. Under load that is one
//! AppendEntries RPC per follower per read, which on a small machine costs more than the read.
//! Here reads queue, and one round at a time runs for the whole queue:
//!
//! - A round takes every read queued before it starts, so each read's confirmation began after
//!   the read arrived: the read index it gets is at least the commit index at its arrival, which
//!   is what linearizability needs (the argument of Raft §6.4, unchanged).
//! - Reads that arrive while a round is in flight wait for the next one, never join the running
//!   one: joining would give them a confirmation that may predate them.
//! - Rounds run on a task of their own, so a caller that gives up (its deadline) does not strand
//!   the others queued with it.
//!
//! The cost: a read waits for at most two rounds instead of one, and the leader sends one
//! heartbeat per follower per round instead of per read.

use std::sync::Arc;

use openraft::errors::{LinearizableReadError, RaftError};
use openraft::ReadPolicy;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::types::{Raft, TypeConfig};
use crate::ConsensusMetrics;

/// What a round answers: the read index, or openraft's refusal.
pub(crate) type RoundResult = Result<u64, RaftError<TypeConfig, LinearizableReadError<TypeConfig>>>;

/// Why a read got no answer from a round.
#[derive(Debug)]
pub(crate) enum ReadIndexError {
    /// openraft refused the round (not the leader, no quorum, stopped).
    Raft(RaftError<TypeConfig, LinearizableReadError<TypeConfig>>),
    /// The round's task ended without answering (the runtime is shutting down).
    Abandoned,
}

#[derive(Default)]
struct Queue {
    /// Whether a task is running rounds; it clears this itself when it finds the queue empty.
    running: bool,
    waiting: Vec<oneshot::Sender<RoundResult>>,
}

/// The read-index queue of one replica.
pub(crate) struct ReadIndexBatcher {
    raft: Raft,
    queue: Mutex<Queue>,
    metrics: ConsensusMetrics,
}

impl ReadIndexBatcher {
    pub(crate) fn new(raft: Raft, metrics: ConsensusMetrics) -> Arc<Self> {
        Arc::new(ReadIndexBatcher {
            raft,
            queue: Mutex::new(Queue::default()),
            metrics,
        })
    }

    /// The read index of a leadership confirmation that started after this call.
    pub(crate) async fn read_index(self: &Arc<Self>) -> Result<u64, ReadIndexError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.waiting.push(tx);
            !std::mem::replace(&mut q.running, true)
        };
        if start {
            tokio::spawn(self.clone().run());
        }
        match rx.await {
            Ok(r) => r.map_err(ReadIndexError::Raft),
            Err(_) => Err(ReadIndexError::Abandoned),
        }
    }

    async fn run(self: Arc<Self>) {
        loop {
            let batch = {
                let mut q = self.queue.lock();
                if q.waiting.is_empty() {
                    q.running = false;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            self.metrics.read_index_rounds.inc();
            self.metrics.read_index_reads.inc_by(batch.len() as u64);
            let r = self
                .raft
                .get_read_linearizer(ReadPolicy::ReadIndex)
                .await
                .map(|l| l.read_log_id().index());
            for tx in batch {
                // A receiver that is gone gave up waiting; nothing to tell it.
                let _ = tx.send(r.clone());
            }
        }
    }
}
