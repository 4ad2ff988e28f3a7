//! The public `Admin` gRPC service: cluster status and membership.
//!
//! Membership changes and leader transfer run on the leader (forwarded there from a follower,
//! like writes). Cluster status can be asked of any node: it reports its own view and asks every
//! member for theirs over the peer connection, so the answer shows each member's own role, term and
//! applied index, and marks members that did not answer as unreachable rather than guessing.

use std::sync::Arc;
use std::time::Duration;

use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::{GroupStatus, Replication, ReplicationError, Role};
use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::admin_server::Admin;
use basalt_proto::v1::{
    AddMemberRequest, AddMemberResponse, ClusterStatusRequest, ClusterStatusResponse, Member, NodeStatusRequest,
    RemoveMemberRequest, RemoveMemberResponse, Role as PbRole, TransferLeaderRequest, TransferLeaderResponse,
};
use tonic::{Request, Response, Status};

use crate::forward::{is_forwarded, Forwarder};
use crate::kv_service::header;
use crate::limits::{check_member_address, invalid};
use crate::metrics::ServerMetrics;

/// How long a status probe of one member may take before it counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

pub struct AdminService {
    group: Arc<dyn Replication>,
    peers: PeerClients,
    forwarder: Forwarder,
    metrics: ServerMetrics,
}

fn pb_role(r: Role) -> PbRole {
    match r {
        Role::Leader => PbRole::Leader,
        Role::Follower => PbRole::Follower,
        Role::Candidate => PbRole::Candidate,
        Role::Learner => PbRole::Learner,
        Role::Stopped => PbRole::Unreachable,
    }
}

impl AdminService {
    pub fn new(group: Arc<dyn Replication>, peers: PeerClients, forwarder: Forwarder, metrics: ServerMetrics) -> Self {
        Self {
            group,
            peers,
            forwarder,
            metrics,
        }
    }

    async fn probe(&self, id: u64, addr: &str, group_id: u64) -> Option<basalt_proto::v1::NodeStatusResponse> {
        let mut client = self.peers.client(addr).ok()?;
        let mut req = Request::new(NodeStatusRequest { group_id });
        req.set_timeout(PROBE_TIMEOUT);
        match tokio::time::timeout(PROBE_TIMEOUT, client.node_status(req)).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(e)) => {
                tracing::debug!(member = id, error = %e, "status probe failed");
                None
            }
            Err(_) => None,
        }
    }

    fn local_member(s: &GroupStatus, id: u64, addr: String, voter: bool) -> Member {
        Member {
            id,
            address: addr,
            role: pb_role(s.role) as i32,
            term: s.term,
            applied_index: s.applied_index,
            voter,
        }
    }

    /// Runs a leader-only operation, forwarding it to the leader when this node is not.
    async fn on_leader<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        result: Result<(), ReplicationError>,
        original: Req,
        forwarded: bool,
        call: F,
        ok: impl FnOnce() -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(AdminClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        match result {
            Ok(()) => Ok(Response::new(ok())),
            Err(e) => {
                self.forwarder
                    .forward_not_leader(
                        self.group.as_ref(),
                        &self.metrics,
                        method,
                        e,
                        original,
                        forwarded,
                        |ch, r| call(AdminClient::new(ch), r),
                    )
                    .await
            }
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.metrics
            .timed("admin", self.group.status().node_id, "cluster_status", async {
                let local = self.group.status();
                let probes = local.members.iter().map(|m| {
                    let (id, addr, voter) = (m.id, m.addr.clone(), m.voter);
                    let local = &local;
                    async move {
                        if id == local.node_id {
                            return (Self::local_member(local, id, addr, voter), None);
                        }
                        match self.probe(id, &addr, local.group_id).await {
                            Some(r) => (
                                Member {
                                    id,
                                    address: addr,
                                    role: r.role,
                                    term: r.term,
                                    applied_index: r.applied_index,
                                    voter,
                                },
                                Some(r),
                            ),
                            None => (
                                Member {
                                    id,
                                    address: addr,
                                    role: PbRole::Unreachable as i32,
                                    term: 0,
                                    applied_index: 0,
                                    voter,
                                },
                                None,
                            ),
                        }
                    }
                });
                let results = futures::future::join_all(probes).await;
                // Prefer the leader's own word for who leads and how far it has committed.
                let mut leader_id = local.leader_id.unwrap_or(0);
                let mut commit_index = local.commit_index;
                for (m, r) in &results {
                    if m.role == PbRole::Leader as i32 {
                        leader_id = m.id;
                        if let Some(r) = r {
                            commit_index = r.commit_index;
                        }
                    }
                }
                if local.role == Role::Leader {
                    leader_id = local.node_id;
                    commit_index = local.commit_index;
                }
                Ok(Response::new(ClusterStatusResponse {
                    header: Some(header(self.group.as_ref())),
                    leader_id,
                    members: results.into_iter().map(|(m, _)| m).collect(),
                    commit_index,
                }))
            })
            .await
    }

    async fn add_member(&self, req: Request<AddMemberRequest>) -> Result<Response<AddMemberResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "add_member", async {
                if req.id == 0 {
                    return Err(invalid("id", "node ids start at 1"));
                }
                check_member_address("address", &req.address)?;
                let r = self.group.add_member(req.id, req.address.clone()).await;
                if r.is_ok() {
                    tracing::info!(id = req.id, addr = %req.address, "member added");
                }
                let g = self.group.clone();
                self.on_leader(
                    "add_member",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.add_member(r).await },
                    || AddMemberResponse {
                        header: Some(header(g.as_ref())),
                    },
                )
                .await
            })
            .await
    }

    async fn remove_member(&self, req: Request<RemoveMemberRequest>) -> Result<Response<RemoveMemberResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "remove_member", async {
                if req.id == 0 {
                    return Err(invalid("id", "node ids start at 1"));
                }
                let r = self.group.remove_member(req.id).await;
                if r.is_ok() {
                    tracing::info!(id = req.id, "member removed");
                }
                let g = self.group.clone();
                self.on_leader(
                    "remove_member",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.remove_member(r).await },
                    || RemoveMemberResponse {
                        header: Some(header(g.as_ref())),
                    },
                )
                .await
            })
            .await
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "transfer_leader", async {
                if req.to == 0 {
                    return Err(invalid("to", "node ids start at 1"));
                }
                let r = self.group.transfer_leader(req.to).await;
                let g = self.group.clone();
                self.on_leader(
                    "transfer_leader",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.transfer_leader(r).await },
                    || TransferLeaderResponse {
                        header: Some(header(g.as_ref())),
                    },
                )
                .await
            })
            .await
    }
}
