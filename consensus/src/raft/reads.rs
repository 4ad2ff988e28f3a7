//! The read modes of a Raft replica: what makes a read in each mode safe to serve from the local
//! state machine (`docs/read-modes.md` is the user's side of this).
//!
//! - **Linearizable**: ReadIndex: a quorum round confirms leadership, then the state machine
//!   waits for the read index. Concurrent reads share rounds ([`super::read_index`]).
//! - **Lease**: the leader reuses a quorum acknowledgement no older than the lease minus the drift
//!   bound, with no round trip. The lease is openraft's: followers refuse to vote for
//!   `election_timeout_max` after they last heard the leader, and the leader counts from when it
//!   *sent* what they acknowledged, so its lease ends first as long as clocks run at rates that
//!   differ by less than the drift bound over one lease. Two more rules keep it safe across leader
//!   changes: a leader that starts handing its leadership over stops serving lease reads at once
//!   (a transfer bypasses the followers' lease), and a new leader serves none until one lease plus
//!   the drift bound has passed since it took over, so any lease its predecessor could still
//!   believe in has run out. Outside a valid lease the read falls back to ReadIndex and says so.
//! - **Follower**: the replica asks the leader for its read index (the leader runs the ReadIndex
//!   round) and waits until it has applied that far: linearizable, and the reading itself happens
//!   off the leader.
//! - **Bounded staleness** and **stale**: local, with the staleness that the replica's safe time
//!   ([`super::closed_time`]) proves. A bounded read that cannot be proven fresh enough fails
//!   with `TooStale` (the server then forwards it to the leader); a leader in its lease is always
//!   fresh.
//!
//! Planted bugs ([`PlantedReadBug`], simulator only) switch off one rule each, so that the
//! checkers can be shown to catch what the rule prevents.

use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{LinearizableReadError, RaftError};
use openraft::raft::linearizable_read::LinearizerOption;
use openraft::{Instant as _, ServerState};
use parking_lot::Mutex;
use prost::Message as _;
use tokio::time::Instant;

use super::network::RemoteResult;
use super::wire;
use super::RaftGroup;
use crate::{PeerKind, ReadGrant, ReadMode, Replication, ReplicationError, Role, Staleness};

/// A bug the simulator can plant in the read path, to show that its checkers catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedReadBug {
    /// Lease reads trust the leader's belief that it leads, as if its lease never ended: no
    /// expiry (neither this module's nor openraft's), no wait for a predecessor's lease, no stop
    /// during a transfer. A leader cut off from its quorum keeps serving after the others have
    /// elected a new one.
    LeaseIgnoresOldLeader,
    /// Follower reads serve whatever the replica has applied, without the leader's read index.
    FollowerReadWithoutIndex,
    /// A replica reports its staleness as the drift bound alone, whatever its safe time: a
    /// replica cut off from its leader claims to be fresh.
    StalenessUnderstated,
}

/// What lease reads remember about this replica's leadership.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    /// The term this replica was first seen leading in, and when.
    leading: Option<(u64, Instant)>,
    /// A term in which this replica started a leadership transfer: no lease reads, no closed
    /// timestamps for the rest of it.
    transferred_in: Option<u64>,
}

impl LeaseState {
    /// When this replica took over in `term`, as far as it knows (the first time it looked).
    pub(crate) fn leading_since(&mut self, term: u64, now: Instant) -> Instant {
        match self.leading {
            Some((t, since)) if t == term => since,
            _ => {
                self.leading = Some((term, now));
                now
            }
        }
    }

    pub(crate) fn note_transfer(&mut self, term: u64) {
        self.transferred_in = Some(term);
    }

    pub(crate) fn transferring(&self, term: u64) -> bool {
        self.transferred_in == Some(term)
    }
}

/// Whether a leader may act on its lease now: it leads, has applied an entry of its own term, has
/// a quorum acknowledgement younger than `usable`, and is not handing over.
pub(crate) fn lease_holds(
    m: &openraft::RaftMetrics<super::types::TypeConfig>,
    lease: &Mutex<LeaseState>,
    usable: Duration,
) -> bool {
    if m.state != ServerState::Leader {
        return false;
    }
    let term = m.current_term;
    if lease.lock().transferring(term) {
        return false;
    }
    let own_term_applied = m
        .last_applied
        .as_ref()
        .is_some_and(|l| l.committed_leader_id().term == term);
    // openraft's clock: the acknowledgement was timed with it.
    let now = openraft::TokioInstant::now();
    let acked = m.last_quorum_acked.as_ref().map(|i| **i);
    own_term_applied && acked.is_some_and(|a| now < a + usable)
}

impl RaftGroup {
    /// The part of the lease left for reads: the drift bound is taken off it.
    pub(crate) fn usable_lease(&self) -> Duration {
        self.cfg.election_timeout_max.saturating_sub(self.cfg.max_clock_drift)
    }

    pub(crate) async fn prepare_read_in(&self, mode: ReadMode) -> Result<ReadGrant, ReplicationError> {
        match mode {
            ReadMode::Linearizable => self.linearizable().await,
            ReadMode::Lease => self.lease_read().await,
            ReadMode::Follower => self.follower_read().await,
            ReadMode::BoundedStaleness(max) => self.bounded_read(max).await,
            ReadMode::Stale => {
                self.health().check()?;
                let applied = self.reader.applied_index();
                Ok(ReadGrant {
                    mode,
                    applied_index: applied,
                    staleness: self.staleness(applied).map_or(Staleness::Unknown, Staleness::AtMost),
                })
            }
        }
    }

    async fn linearizable(&self) -> Result<ReadGrant, ReplicationError> {
        let b = self.read_barrier().await?;
        Ok(ReadGrant {
            mode: ReadMode::Linearizable,
            applied_index: b.applied_index,
            staleness: Staleness::Fresh,
        })
    }

    /// Whether this leader may serve a lease read now (see the module docs).
    fn lease_allows_reads(&self) -> bool {
        let now = Instant::now();
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if !lease_holds(&m, &self.lease, self.usable_lease()) {
            return false;
        }
        let since = self.lease.lock().leading_since(m.current_term, now);
        now >= since + self.cfg.election_timeout_max + self.cfg.max_clock_drift
    }

    async fn lease_read(&self) -> Result<ReadGrant, ReplicationError> {
        self.touch();
        if self.status().role != Role::Leader {
            return Err(self.not_leader_now());
        }
        if self.cfg.planted_read_bug == Some(PlantedReadBug::LeaseIgnoresOldLeader) {
            return Ok(ReadGrant {
                mode: ReadMode::Lease,
                applied_index: self.reader.applied_index(),
                staleness: Staleness::Fresh,
            });
        }
        if !self.lease_allows_reads() {
            return self.linearizable().await;
        }
        let option = LinearizerOption::new(Some(self.usable_lease()), false).with_wait_timeout(Duration::ZERO);
        let linearizer = match self.raft.get_read_linearizer(option).await {
            Ok(l) => l,
            // The lease ran out between the check and openraft's own: a ReadIndex round instead.
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_))) => return self.linearizable().await,
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => return Err(self.not_leader(&f)),
            Err(RaftError::Fatal(f)) => return Err(self.fatal(f)),
        };
        let ready = self.bounded(
            "lease read",
            async { linearizer.await_ready(&self.raft).await.map_err(|f| self.fatal(f)) },
            ReplicationError::QuorumUnavailable,
        );
        ready.await?;
        Ok(ReadGrant {
            mode: ReadMode::Lease,
            applied_index: self.reader.applied_index(),
            staleness: Staleness::Fresh,
        })
    }

    /// The leader's side of a follower read: confirm leadership with a quorum, answer the index
    /// the follower must apply. Does not wait for this replica's own state machine.
    pub(crate) async fn leader_read_index(&self) -> Result<u64, ReplicationError> {
        self.touch();
        self.bounded(
            "read index",
            self.read_index_round(),
            ReplicationError::QuorumUnavailable,
        )
        .await
    }

    async fn follower_read(&self) -> Result<ReadGrant, ReplicationError> {
        self.health().check()?;
        let status = self.status();
        if status.role == Role::Leader {
            let b = self.read_barrier().await?;
            return Ok(ReadGrant {
                mode: ReadMode::Follower,
                applied_index: b.applied_index,
                staleness: Staleness::Fresh,
            });
        }
        if self.cfg.planted_read_bug == Some(PlantedReadBug::FollowerReadWithoutIndex) {
            return Ok(ReadGrant {
                mode: ReadMode::Follower,
                applied_index: self.reader.applied_index(),
                staleness: Staleness::Fresh,
            });
        }
        let (Some(leader), Some(addr)) = (status.leader_id, status.leader_addr) else {
            return Err(ReplicationError::NotLeader {
                leader_id: None,
                leader_addr: None,
            });
        };
        let index = self
            .bounded(
                "read index from the leader",
                self.ask_read_index(leader, &addr),
                ReplicationError::QuorumUnavailable,
            )
            .await?;
        let waited = self
            .raft
            .wait(Some(self.cfg.request_timeout))
            .applied_index_at_least(Some(index), "the leader's read index")
            .await;
        if let Err(e) = waited {
            return Err(ReplicationError::QuorumUnavailable(format!(
                "applying up to the read index {index}: {e}"
            )));
        }
        Ok(ReadGrant {
            mode: ReadMode::Follower,
            applied_index: self.reader.applied_index(),
            staleness: Staleness::Fresh,
        })
    }

    async fn ask_read_index(&self, leader: u64, addr: &str) -> Result<u64, ReplicationError> {
        let unreachable = |e: String| ReplicationError::NotLeader {
            leader_id: Some(leader),
            leader_addr: Some(format!("{addr} (unreachable from this replica: {e})")),
        };
        let mut client = self.peers.client(addr).map_err(|e| unreachable(e.to_string()))?;
        let payload = wire::encode("read index", &()).map_err(|e| ReplicationError::Stopped(e.to_string()))?;
        let msg = basalt_proto::v1::RaftMessage {
            group_id: self.cfg.group_id,
            crc32: wire::crc(&[&payload]),
            payload: payload.into(),
            framed: false,
        };
        let sent = msg.encoded_len();
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.cfg.request_timeout);
        let reply = client.read_index(req).await;
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(s) => {
                self.metrics.rpc_sent(PeerKind::ReadIndex, sent, 0);
                return Err(unreachable(s.message().to_string()));
            }
        };
        self.metrics.rpc_sent(PeerKind::ReadIndex, sent, reply.encoded_len());
        let answer = wire::verify_crc("read index", &[&reply.payload], reply.crc32)
            .and_then(|()| wire::decode::<RemoteResult<u64>>("read index", &reply.payload));
        match answer {
            Ok(Ok(index)) => Ok(index),
            // The node asked is not (or no longer) the leader, or has no quorum: no read.
            Ok(Err(remote)) => Err(ReplicationError::QuorumUnavailable(format!(
                "node {leader} could not give a read index: {remote}"
            ))),
            Err(e) => {
                self.metrics.corrupt_messages.inc();
                Err(ReplicationError::QuorumUnavailable(e.to_string()))
            }
        }
    }

    async fn bounded_read(&self, max: Duration) -> Result<ReadGrant, ReplicationError> {
        self.health().check()?;
        let applied = self.reader.applied_index();
        let age = self.staleness(applied);
        if let Some(a) = age.filter(|a| *a <= max) {
            return Ok(ReadGrant {
                mode: ReadMode::BoundedStaleness(max),
                applied_index: applied,
                staleness: Staleness::AtMost(a),
            });
        }
        // The leader outside its lease (asleep, or a bound under the drift bound): a ReadIndex
        // round is always fresh enough.
        if self.status().role == Role::Leader {
            return self.linearizable().await;
        }
        Err(ReplicationError::TooStale { age, max })
    }

    /// How old this replica's data may be, by its clock: now minus its safe time, plus the
    /// drift bound. `None` without a safe time.
    pub(crate) fn staleness(&self, applied: u64) -> Option<Duration> {
        if self.cfg.planted_read_bug == Some(PlantedReadBug::StalenessUnderstated) {
            return Some(self.cfg.max_clock_drift);
        }
        let safe = self.closed.safe_time(applied)?;
        let now = self.closed.clock().now_us();
        Some(Duration::from_micros(now.saturating_sub(safe)) + self.cfg.max_clock_drift)
    }
}
