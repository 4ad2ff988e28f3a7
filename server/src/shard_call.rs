//! Reaching a shard's leader from any node, for the internal steps the placement driver asks
//! of a shard's group (a membership change, a split proposal).
//!
//! The catalog names the shard's replicas; each is asked in turn (the newcomer of a move in
//! progress last, since it may have become the leader). A replica that is not the leader
//! answers `NotLeader` without forwarding (the request is marked as forwarded once already), and
//! the next one is tried; so one round reaches the leader unless leadership moves during it, and
//! the driver simply tries again on its next round. Errors that are the leader's own answer (the
//! change was refused) end the round at once.
//!
//! A replica's `NotLeader` names the leader with its address from the *group's* membership, and
//! that leader is tried next even when it is no longer a member of the cluster: a node removed
//! from the cluster still leads its groups until they drop it, and the membership change that
//! drops it can only be made by the leader. Without this hop a removed leader's shards could
//! never be moved off it while it kept running.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;

use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::ErrorDetail;
use basalt_proto::ErrorKind;
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
    let newcomer = desc.moving.map(|m| m.to);
    let mut queue: VecDeque<(u64, String)> = order
        .into_iter()
        .filter_map(|n| addrs.get(&n).map(|a| (n, a.clone())))
        .collect();
    let mut tried = BTreeSet::new();
    let mut last: Option<(u8, Status)> = None;
    while let Some((node, addr)) = queue.pop_front() {
        if !tried.insert(node) {
            continue;
        }
        let attempt = forwarder
            .forward(Some(node), &addr, req.clone(), |ch, r| call(AdminClient::new(ch), r))
            .await;
        match attempt {
            Ok(resp) => return Ok(resp.into_inner()),
            // Not the leader, not hosting the shard (yet or any more), or unreachable: next.
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                if let Some(ErrorKind::NotLeader(hint)) = ErrorDetail::from_status(&s) {
                    if hint.leader_id != 0 && !hint.leader_addr.is_empty() && !tried.contains(&hint.leader_id) {
                        queue.push_front((hint.leader_id, hint.leader_addr));
                    }
                }
                let rank = rank(&s, Some(node) == newcomer);
                if last.as_ref().is_none_or(|(r, _)| rank >= *r) {
                    last = Some((rank, s));
                }
            }
            Err(s) => return Err(s),
        }
    }
    Err(last.map_or_else(
        || Status::unavailable(format!("no replica of shard {shard_id} is reachable")),
        |(_, s)| s,
    ))
}

/// How much a failed attempt says, to report the most telling one when all fail: the leader's
/// own failure (unreachable, no quorum, outcome unknown) over a redirect naming a leader, over a
/// replica that knows none. The newcomer of a move knows no leader until it has been added, so
/// its answer ranks lowest.
fn rank(s: &Status, newcomer: bool) -> u8 {
    match ErrorDetail::from_status(s) {
        _ if newcomer => 0,
        Some(ErrorKind::NotLeader(hint)) if hint.leader_id == 0 => 1,
        Some(ErrorKind::NotLeader(_)) => 2,
        _ => 3,
    }
}
