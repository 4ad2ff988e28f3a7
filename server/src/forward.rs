//! Forwarding client requests from a follower to the leader.
//!
//! A client that reaches a follower should not have to care: writes and linearizable reads are
//! sent on to the leader over the node's existing peer connection, and the leader's answer (its
//! header included) goes back unchanged. A forwarded request is marked, and a marked request is
//! never forwarded again, so a stale leader hint can cost one hop but never a loop: the second
//! node answers `NotLeader` and the client's own retry takes over.

use std::future::Future;
use std::time::Duration;

use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::{Replication, ReplicationError};
use basalt_proto::v1::NotLeader;
use basalt_proto::{status_with_detail, ErrorKind};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::errors::to_status;
use crate::metrics::ServerMetrics;

/// How often a follower re-reads its view of the leader while a forward is in flight.
const LEADER_WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Metadata key that marks a request as already forwarded once.
pub const FORWARDED_HEADER: &str = "x-basalt-forwarded";

pub fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED_HEADER)
}

#[derive(Clone)]
pub struct Forwarder {
    peers: PeerClients,
    timeout: Duration,
}

impl Forwarder {
    pub fn new(peers: PeerClients, timeout: Duration) -> Self {
        Self { peers, timeout }
    }

    /// The same forwarder with another time limit per forwarded request (placement steps, such
    /// as filling a new replica, take longer than a client's request).
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            peers: self.peers.clone(),
            timeout,
        }
    }

    /// Sends `msg` to the leader at `addr` through `call` (which picks the service and method).
    pub async fn forward<Req, Resp, F, Fut>(
        &self,
        leader_id: Option<u64>,
        addr: &str,
        msg: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let channel = self
            .peers
            .channel(addr)
            .map_err(|e| Status::internal(format!("leader address {addr:?} is unusable: {e}")))?;
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        req.set_timeout(self.timeout);
        match call(channel, req).await {
            // The leader could not be reached: hand the client the hint so it can try itself.
            // So can a connection that broke under the request (tonic reports it as `Unknown`
            // with the transport error as its source): passed on as it is, it would reach the
            // client as a server error it cannot retry.
            Err(s)
                if (s.code() == tonic::Code::Unavailable && s.details().is_empty())
                    || (s.code() == tonic::Code::Unknown && std::error::Error::source(&s).is_some()) =>
            {
                Err(status_with_detail(
                    format!("the leader at {addr} is unreachable from this node: {}", s.message()),
                    ErrorKind::NotLeader(NotLeader {
                        leader_id: leader_id.unwrap_or(0),
                        leader_addr: addr.to_string(),
                    }),
                ))
            }
            r => r,
        }
    }

    /// What a service does when its group refuses a request: a `NotLeader` that names the
    /// leader's address is forwarded there, unless `forwarded` says this request already took its
    /// one hop; every other error becomes its status.
    ///
    /// A leader that stops answering without closing its connections (frozen, partitioned) would
    /// hold a forwarded request until the client gives up on this node. So while the forward is
    /// in flight the group's view of the leader is watched, and once a new leader is known the
    /// forward is abandoned and the client gets `NotLeader` naming it, at once (naming this very
    /// node when it won the election; the client then asks it again). Abandoning a forwarded write is safe: its outcome is unknown to the client, which
    /// retries it with the same session, and the state machine applies a session write once.
    #[allow(clippy::too_many_arguments)] // One call site shape per service; a struct would only rename them.
    pub async fn forward_not_leader<Req, Resp, F, Fut>(
        &self,
        group: &dyn Replication,
        metrics: &ServerMetrics,
        method: &'static str,
        error: ReplicationError,
        original: Req,
        forwarded: bool,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        match error {
            ReplicationError::NotLeader {
                leader_id,
                leader_addr: Some(addr),
            } if !forwarded => {
                metrics.forwarded(method);
                let leader_moved = async {
                    loop {
                        tokio::time::sleep(LEADER_WATCH_INTERVAL).await;
                        // Only a known new leader ends the wait: "no leader" mid-election
                        // would send the client off to rotate, possibly onto the frozen node.
                        let s = group.status();
                        if s.leader_id.is_some() && s.leader_id != leader_id {
                            return ReplicationError::NotLeader {
                                leader_id: s.leader_id,
                                leader_addr: s.leader_addr,
                            };
                        }
                    }
                };
                tokio::select! {
                    r = self.forward(leader_id, &addr, original, call) => r,
                    moved = leader_moved => {
                        metrics.forward_abandoned(method);
                        Err(to_status(moved))
                    }
                }
            }
            e => Err(to_status(e)),
        }
    }
}
