//! Reaching a shard's leader from any node, for the internal steps the placement driver asks
//! of a shard's group (a membership change, a split proposal).
//!
//! The catalog names the shard's replicas; each is asked in turn (the newcomer of a move in
//! progress last, since it may have become the leader). A replica that is not the leader
//! answers `NotLeader` without forwarding (the request is marked as forwarded once already), and
//! the next one is tried; so one round reaches the leader unless leadership moves during it, and
//! the driver simply tries again on its next round. Errors that are the leader's own answer (the
//! change was refused) end the round at once.

use std::future::Future;

use basalt_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::forward::Forwarder;
use crate::placement::Placement;

/// Sends `req` to the leader of `shard_id` through `call`, trying the replicas the local
/// catalog lists.
pub async fn on_shard_leader<Req, Resp, F, Fut>(
    placement: &Placement,
    forwarder: &Forwarder,
    shard_id: u64,
    req: Req,
    call: F,
) -> Result<Resp, Status>
where
    Req: Clone,
    F: Fn(AdminClient<Channel>, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    let cat = placement.cached().map_err(|e| Status::internal(e.to_string()))?;
    let desc = cat
        .shards
        .get(&shard_id)
        .ok_or_else(|| Status::not_found(format!("shard {shard_id} does not exist")))?;
    let mut order = desc.replicas.clone();
    // A local replica's view of the leader, if any, goes first: usually right, saves a round.
    if let Some(leader) = placement
        .replicas()
        .get(shard_id)
        .and_then(|g| basalt_consensus::Replication::status(g.as_ref()).leader_id)
    {
        order.retain(|r| *r != leader);
        order.insert(0, leader);
    }
    if let Some(m) = desc.moving {
        if !order.contains(&m.to) {
            order.push(m.to);
        }
    }
    let addrs = placement.addresses();
    let mut last = Status::unavailable(format!("no replica of shard {shard_id} is reachable"));
    for node in order {
        let Some(addr) = addrs.get(&node) else { continue };
        let attempt = forwarder
            .forward(Some(node), addr, req.clone(), |ch, r| call(AdminClient::new(ch), r))
            .await;
        match attempt {
            Ok(resp) => return Ok(resp.into_inner()),
            // Not the leader, not hosting the shard (yet or any more), or unreachable: next.
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => last = s,
            Err(s) => return Err(s),
        }
    }
    Err(last)
}
