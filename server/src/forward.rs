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
use basalt_consensus::ReplicationError;
use basalt_proto::v1::NotLeader;
use basalt_proto::{status_with_detail, ErrorKind};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::errors::to_status;
use crate::metrics::ServerMetrics;

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
            Err(s) if s.code() == tonic::Code::Unavailable && s.details().is_empty() => Err(status_with_detail(
                format!("the leader at {addr} is unreachable from this node: {}", s.message()),
                ErrorKind::NotLeader(NotLeader {
                    leader_id: leader_id.unwrap_or(0),
                    leader_addr: addr.to_string(),
                }),
            )),
            r => r,
        }
    }

    /// What a service does when its group refuses a request: a `NotLeader` that names the
    /// leader's address is forwarded there, unless `forwarded` says this request already took its
    /// one hop; every other error becomes its status.
    pub async fn forward_not_leader<Req, Resp, F, Fut>(
        &self,
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
                self.forward(leader_id, &addr, original, call).await
            }
            e => Err(to_status(e)),
        }
    }
}
