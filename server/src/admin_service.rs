//! The public `Admin` gRPC service: cluster status and membership, keyspaces and shards.
//!
//! Membership changes and leader transfer act on the meta group (whose members are the cluster's
//! members) and run on its leader (forwarded there from a follower, like writes). So do catalog
//! changes (keyspace create/drop, split), which the placement driver carries out there; catalog
//! listings are served by any node from its own meta replica. A split's proposal itself runs on
//! the shard's leader: the driver sends it there as an internal `SplitShard` carrying the new
//! group's id. Cluster status can be asked of any node: it reports its own view and asks every
//! member for theirs over the peer connection, so the answer shows each member's own role, term and
//! applied index, and marks members that did not answer as unreachable rather than guessing.

use std::sync::Arc;
use std::time::Duration;

use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::{GroupStatus, Replication, ReplicationError, Role};
use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::admin_server::Admin;
use basalt_proto::v1::{
    AddMemberRequest, AddMemberResponse, ChangeShardReplicasRequest, ChangeShardReplicasResponse, ClusterStatusRequest,
    ClusterStatusResponse, CreateKeyspaceRequest, CreateKeyspaceResponse, DescribeKeyspaceRequest,
    DescribeKeyspaceResponse, DropKeyspaceRequest, DropKeyspaceResponse, ListKeyspacesRequest, ListKeyspacesResponse,
    ListShardsRequest, ListShardsResponse, Member, MergeShardRequest, MergeShardResponse, MergeStepRequest,
    MergeStepResponse, MoveShardRequest, MoveShardResponse, NodeReportRequest, NodeReportResponse, NodeStatusRequest,
    PlacementStatusRequest, PlacementStatusResponse, RemoveMemberRequest, RemoveMemberResponse, Role as PbRole,
    Shard as PbShard, ShardLoad, Sharding, SplitShardRequest, SplitShardResponse, TransferLeaderRequest,
    TransferLeaderResponse, TransferShardLeaderRequest, TransferShardLeaderResponse,
};
use tonic::{Request, Response, Status};

use crate::catalog::{Catalog, ShardDesc};
use crate::driver::Driver;
use crate::forward::{is_forwarded, Forwarder};
use crate::kv_service::header;
use crate::limits::{check_member_address, invalid};
use crate::load::ShardSize;
use crate::metrics::ServerMetrics;
use crate::placement::{self, Placement, PlacementError};
use crate::read_mode::DefaultRead;
use crate::replica_move;

/// How long a status probe of one member may take before it counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

pub struct AdminService {
    /// The meta group's local replica.
    group: Arc<dyn Replication>,
    placement: Placement,
    driver: Arc<Driver>,
    peers: PeerClients,
    forwarder: Forwarder,
    metrics: ServerMetrics,
}

fn placement_status(e: PlacementError) -> Status {
    match e {
        PlacementError::Invalid(m) => Status::invalid_argument(m),
        PlacementError::NotFound(m) => Status::not_found(m),
        PlacementError::AlreadyExists(m) => Status::already_exists(m),
        PlacementError::Conflict(m) => Status::aborted(m),
        PlacementError::Refused(m) => Status::failed_precondition(m),
        PlacementError::Replication(e) => crate::errors::to_status(e),
        PlacementError::Catalog(e) => Status::internal(e.to_string()),
    }
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
    pub fn new(
        placement: Placement,
        driver: Arc<Driver>,
        peers: PeerClients,
        forwarder: Forwarder,
        metrics: ServerMetrics,
    ) -> Self {
        Self {
            group: placement.meta(),
            placement,
            driver,
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

    /// Runs a catalog change on the meta leader: here if this node leads the meta group, else
    /// forwarded there.
    async fn on_meta_leader<Req, Resp, T, F, Fut>(
        &self,
        method: &'static str,
        result: Result<T, PlacementError>,
        original: Req,
        forwarded: bool,
        call: F,
        ok: impl FnOnce(T) -> Resp,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(AdminClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        match result {
            Ok(v) => Ok(Response::new(ok(v))),
            Err(PlacementError::Replication(e @ ReplicationError::NotLeader { .. })) => {
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
            Err(e) => Err(placement_status(e)),
        }
    }

    fn catalog(&self) -> Result<Arc<Catalog>, Status> {
        self.placement.cached().map_err(placement_status)
    }

    /// The catalog as of a ReadIndex barrier on the meta group, so that a listing shows every
    /// change acknowledged before it, whichever node answers (a follower's cached catalog may lag:
    /// a keyspace dropped a moment ago would still be listed). On a follower the request goes to
    /// the meta leader through `call` instead, and its answer comes back as `Err`.
    async fn fresh_catalog<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        req: &Request<Req>,
        call: F,
    ) -> Result<Result<Arc<Catalog>, Response<Resp>>, Status>
    where
        Req: Clone,
        F: FnOnce(tonic::transport::Channel, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        match self.group.read_barrier().await {
            Ok(_) => Ok(Ok(self.catalog()?)),
            Err(e) => self
                .forwarder
                .forward_not_leader(
                    self.group.as_ref(),
                    &self.metrics,
                    method,
                    e,
                    req.get_ref().clone(),
                    is_forwarded(req),
                    call,
                )
                .await
                .map(Err),
        }
    }

    fn shard_pb(&self, cat: &Catalog, s: &ShardDesc, stats: bool) -> PbShard {
        let name = cat
            .keyspace_by_id(s.shard.keyspace)
            .map(|k| k.name.clone())
            .unwrap_or_default();
        let local = self.placement.replicas().get(s.id);
        // Listings are answered by the meta leader (see `fresh_catalog`), which holds only some
        // shards; for the others the driver's latest reports name the leader.
        let leader = local
            .as_ref()
            .and_then(|g| g.status().leader_id)
            .or_else(|| self.driver.reported_leader(s.id))
            .unwrap_or(0);
        let mut pb = s.to_pb(&name, &self.placement.addresses(), leader);
        if let (true, Some(g)) = (stats, local) {
            pb.applied_index = g.status().applied_index;
            let ShardSize { bytes, keys } = self.placement.load().size(s.id, &g.reader(), u64::MAX);
            pb.approximate_bytes = bytes;
            pb.approximate_keys = keys;
        }
        pb
    }

    /// The split proposal on the shard's leader (an internal request from the driver).
    async fn split_on_shard_leader(
        &self,
        req: SplitShardRequest,
        forwarded: bool,
    ) -> Result<Response<SplitShardResponse>, Status> {
        let cat = self.catalog()?;
        let Some(g) = self.placement.replicas().get(req.shard_id) else {
            // Not hosted here: try the shard's replicas as the catalog knows them.
            let desc = cat
                .shards
                .get(&req.shard_id)
                .ok_or_else(|| Status::not_found(format!("shard {} does not exist", req.shard_id)))?;
            if forwarded {
                return Err(Status::unavailable(format!(
                    "shard {} is not hosted here",
                    req.shard_id
                )));
            }
            let addrs = self.placement.addresses();
            let mut last = Status::unavailable(format!("no replica of shard {} answered", req.shard_id));
            for r in &desc.replicas {
                let Some(addr) = addrs.get(r) else { continue };
                match self
                    .forwarder
                    .forward(Some(*r), addr, req.clone(), |ch, r| async move {
                        AdminClient::new(ch).split_shard(r).await
                    })
                    .await
                {
                    Ok(resp) => return Ok(resp),
                    Err(e) => last = e,
                }
            }
            return Err(last);
        };
        let shard = g.reader().shard();
        let at = if req.at.is_empty() {
            placement::split_point(&shard, &[], Some(&g)).map_err(placement_status)?
        } else {
            req.at.to_vec()
        };
        let r = placement::propose_split(&g, at, req.new_group, req.expected_epoch).await;
        let keyspace = cat
            .keyspace_by_id(shard.keyspace)
            .map(|k| k.name.clone())
            .unwrap_or_default();
        match r {
            Ok((left, right)) => {
                let addrs = self.placement.addresses();
                let members: Vec<u64> = g.status().members.iter().map(|m| m.id).collect();
                let to_pb = |id: u64, shard: basalt_storage::ShardState| {
                    ShardDesc {
                        id,
                        shard,
                        replicas: members.clone(),
                        bootstrap: false,
                        moving: None,
                        merge: None,
                    }
                    .to_pb(&keyspace, &addrs, 0)
                };
                Ok(Response::new(SplitShardResponse {
                    header: Some(header(g.as_ref())),
                    left: Some(to_pb(req.shard_id, left)),
                    right: Some(to_pb(req.new_group, right)),
                }))
            }
            Err(PlacementError::Replication(e @ ReplicationError::NotLeader { .. })) => {
                self.forwarder
                    .forward_not_leader(
                        g.as_ref(),
                        &self.metrics,
                        "split_shard",
                        e,
                        req,
                        forwarded,
                        |ch, r| async move { AdminClient::new(ch).split_shard(r).await },
                    )
                    .await
            }
            Err(e) => Err(placement_status(e)),
        }
    }

    /// `NotLeader` unless this node leads the meta group (and so runs the driver).
    fn meta_leader_check(&self) -> Result<(), PlacementError> {
        let s = self.group.status();
        if s.role == Role::Leader {
            Ok(())
        } else {
            Err(PlacementError::Replication(ReplicationError::NotLeader {
                leader_id: s.leader_id,
                leader_addr: s.leader_addr,
            }))
        }
    }

    /// A user's split, run by the driver on the meta leader: allocate the new group, have the
    /// shard's leader split, record both halves.
    async fn split_as_driver(&self, req: &SplitShardRequest) -> Result<SplitShardResponse, PlacementError> {
        self.meta_leader_check()?;
        let meta = self.placement.meta();
        meta.read_barrier().await?;
        let cat = self.placement.catalog()?;
        let desc = cat
            .shards
            .get(&req.shard_id)
            .ok_or_else(|| PlacementError::NotFound(format!("shard {} does not exist", req.shard_id)))?
            .clone();
        let local = self.placement.replicas().get(desc.id);
        let at = if req.at.is_empty() && !desc.shard.hashed {
            Vec::new() // the shard's leader picks its median key
        } else {
            placement::split_point(&desc.shard, &req.at, local.as_ref())?
        };
        let new_group = self.placement.allocate_group().await?;
        let internal = SplitShardRequest {
            shard_id: desc.id,
            at: at.into(),
            new_group,
            expected_epoch: desc.shard.epoch,
        };
        let resp = self
            .split_on_shard_leader(internal, false)
            .await
            .map_err(|s| PlacementError::Conflict(format!("the shard's leader refused the split: {}", s.message())))?
            .into_inner();
        let (Some(left), Some(right)) = (&resp.left, &resp.right) else {
            return Err(PlacementError::Conflict(
                "the shard's leader answered without both halves".into(),
            ));
        };
        let state = |s: &PbShard| basalt_storage::ShardState {
            keyspace: s.keyspace_id,
            hashed: desc.shard.hashed,
            start: s.start.to_vec(),
            end: s.end.to_vec(),
            epoch: s.epoch,
            frozen: false,
        };
        self.placement
            .record_split(desc.id, new_group, state(left), state(right))
            .await?;
        tracing::info!(shard = desc.id, new_group, "split shard");
        Ok(SplitShardResponse {
            header: Some(header(meta.as_ref())),
            left: resp.left,
            right: resp.right,
        })
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
        let result = result.map_err(PlacementError::Replication);
        self.on_meta_leader(method, result, original, forwarded, call, |()| ok())
            .await
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

    async fn create_keyspace(
        &self,
        req: Request<CreateKeyspaceRequest>,
    ) -> Result<Response<CreateKeyspaceResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "create_keyspace", async {
                let hashed = match Sharding::try_from(req.sharding) {
                    Ok(Sharding::Hash) => true,
                    Ok(Sharding::Range) => false,
                    _ => return Err(invalid("sharding", "must be range or hash")),
                };
                let default_read = DefaultRead::from_pb(req.default_read.as_ref(), "default_read")?;
                let r = self
                    .placement
                    .create_keyspace(&req.name, hashed, req.shards, req.replicas, default_read)
                    .await;
                if let Ok(ks) = &r {
                    tracing::info!(name = %ks.name, id = ks.id, hashed, shards = ks.initial_shards, "keyspace created");
                }
                let g = self.group.clone();
                self.on_meta_leader(
                    "create_keyspace",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.create_keyspace(r).await },
                    |ks| CreateKeyspaceResponse {
                        header: Some(header(g.as_ref())),
                        keyspace: Some(ks.to_pb()),
                    },
                )
                .await
            })
            .await
    }

    async fn list_keyspaces(
        &self,
        req: Request<ListKeyspacesRequest>,
    ) -> Result<Response<ListKeyspacesResponse>, Status> {
        let cat = match self
            .fresh_catalog("list_keyspaces", &req, |ch, r| async move {
                AdminClient::new(ch).list_keyspaces(r).await
            })
            .await?
        {
            Ok(cat) => cat,
            Err(forwarded) => return Ok(forwarded),
        };
        Ok(Response::new(ListKeyspacesResponse {
            header: Some(header(self.group.as_ref())),
            keyspaces: cat.keyspaces.values().map(|k| k.to_pb()).collect(),
        }))
    }

    async fn describe_keyspace(
        &self,
        req: Request<DescribeKeyspaceRequest>,
    ) -> Result<Response<DescribeKeyspaceResponse>, Status> {
        let cat = match self
            .fresh_catalog("describe_keyspace", &req, |ch, r| async move {
                AdminClient::new(ch).describe_keyspace(r).await
            })
            .await?
        {
            Ok(cat) => cat,
            Err(forwarded) => return Ok(forwarded),
        };
        let req = req.into_inner();
        let ks = cat
            .keyspace(&req.name)
            .ok_or_else(|| Status::not_found(format!("keyspace {:?} does not exist", req.name)))?;
        Ok(Response::new(DescribeKeyspaceResponse {
            header: Some(header(self.group.as_ref())),
            keyspace: Some(ks.to_pb()),
            shards: cat
                .shards_of(ks.id)
                .into_iter()
                .map(|s| self.shard_pb(&cat, s, false))
                .collect(),
        }))
    }

    async fn drop_keyspace(&self, req: Request<DropKeyspaceRequest>) -> Result<Response<DropKeyspaceResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "drop_keyspace", async {
                let r = self.placement.drop_keyspace(&req.name).await;
                if r.is_ok() {
                    tracing::info!(name = %req.name, "keyspace dropped");
                }
                let g = self.group.clone();
                self.on_meta_leader(
                    "drop_keyspace",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.drop_keyspace(r).await },
                    |()| DropKeyspaceResponse {
                        header: Some(header(g.as_ref())),
                    },
                )
                .await
            })
            .await
    }

    async fn list_shards(&self, req: Request<ListShardsRequest>) -> Result<Response<ListShardsResponse>, Status> {
        // Figures (applied index, sizes) describe the answering node's own replicas, so a
        // request for them is answered here, from this node's catalog, not forwarded.
        let cat = if req.get_ref().with_stats {
            self.catalog()?
        } else {
            match self
                .fresh_catalog("list_shards", &req, |ch, r| async move {
                    AdminClient::new(ch).list_shards(r).await
                })
                .await?
            {
                Ok(cat) => cat,
                Err(forwarded) => return Ok(forwarded),
            }
        };
        let req = req.into_inner();
        let shards: Vec<PbShard> = if req.keyspace.is_empty() {
            let mut all: Vec<&ShardDesc> = cat.shards.values().collect();
            all.sort_by(|a, b| a.shard.start.cmp(&b.shard.start));
            all.into_iter()
                .map(|s| self.shard_pb(&cat, s, req.with_stats))
                .collect()
        } else {
            let ks = cat
                .keyspace(&req.keyspace)
                .ok_or_else(|| Status::not_found(format!("keyspace {:?} does not exist", req.keyspace)))?;
            cat.shards_of(ks.id)
                .into_iter()
                .map(|s| self.shard_pb(&cat, s, req.with_stats))
                .collect()
        };
        Ok(Response::new(ListShardsResponse {
            header: Some(header(self.group.as_ref())),
            shards,
        }))
    }

    async fn split_shard(&self, req: Request<SplitShardRequest>) -> Result<Response<SplitShardResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "split_shard", async {
                if req.new_group != 0 {
                    return self.split_on_shard_leader(req, forwarded).await;
                }
                let r = self.split_as_driver(&req).await;
                self.on_meta_leader(
                    "split_shard",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.split_shard(r).await },
                    |resp| resp,
                )
                .await
            })
            .await
    }

    async fn move_shard(&self, req: Request<MoveShardRequest>) -> Result<Response<MoveShardResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "move_shard", async {
                if req.from_node == 0 || req.to_node == 0 {
                    return Err(invalid("from_node/to_node", "node ids start at 1"));
                }
                let r = match self.meta_leader_check() {
                    Err(e) => Err(e),
                    Ok(()) => {
                        replica_move::move_replica(
                            &self.placement,
                            &self.forwarder.with_timeout(crate::driver::PLACEMENT_STEP_TIMEOUT),
                            req.shard_id,
                            req.from_node,
                            req.to_node,
                        )
                        .await
                    }
                };
                let cat = self.catalog()?;
                let g = self.group.clone();
                self.on_meta_leader(
                    "move_shard",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.move_shard(r).await },
                    |d| MoveShardResponse {
                        header: Some(header(g.as_ref())),
                        shard: Some(self.shard_pb(&cat, &d, false)),
                    },
                )
                .await
            })
            .await
    }

    async fn transfer_shard_leader(
        &self,
        req: Request<TransferShardLeaderRequest>,
    ) -> Result<Response<TransferShardLeaderResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "transfer_shard_leader", async {
                if req.to_node == 0 {
                    return Err(invalid("to_node", "node ids start at 1"));
                }
                let Some(g) = self.placement.replicas().get(req.shard_id) else {
                    let cat = self.catalog()?;
                    return Err(match cat.shards.get(&req.shard_id) {
                        Some(s) => Status::unavailable(format!(
                            "node {} holds no replica of shard {}; its replicas are on nodes {:?}",
                            self.group.status().node_id,
                            req.shard_id,
                            s.replicas
                        )),
                        None => Status::not_found(format!("shard {} does not exist", req.shard_id)),
                    });
                };
                let r = g.transfer_leader(req.to_node).await;
                match r {
                    Ok(()) => Ok(Response::new(TransferShardLeaderResponse {
                        header: Some(header(g.as_ref())),
                    })),
                    Err(e) => {
                        self.forwarder
                            .forward_not_leader(
                                g.as_ref(),
                                &self.metrics,
                                "transfer_shard_leader",
                                e,
                                req,
                                forwarded,
                                |ch, r| async move { AdminClient::new(ch).transfer_shard_leader(r).await },
                            )
                            .await
                    }
                }
            })
            .await
    }

    async fn placement_status(
        &self,
        req: Request<PlacementStatusRequest>,
    ) -> Result<Response<PlacementStatusResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        let r = self.meta_leader_check();
        let g = self.group.clone();
        let node_id = g.status().node_id;
        self.on_meta_leader(
            "placement_status",
            r,
            req,
            forwarded,
            |mut c, r| async move { c.placement_status(r).await },
            |()| PlacementStatusResponse {
                header: Some(header(g.as_ref())),
                ..self.driver.status(node_id)
            },
        )
        .await
    }

    async fn change_shard_replicas(
        &self,
        req: Request<ChangeShardReplicasRequest>,
    ) -> Result<Response<ChangeShardReplicasResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "change_shard_replicas", async {
                let Some(g) = self.placement.replicas().get(req.shard_id) else {
                    return Err(Status::unavailable(format!(
                        "shard {} is not hosted on node {}",
                        req.shard_id,
                        self.group.status().node_id
                    )));
                };
                let r = match (req.add_node, req.remove_node) {
                    (0, 0) | (1.., 1..) => {
                        return Err(invalid("add_node/remove_node", "exactly one must be set"));
                    }
                    (add, 0) => {
                        check_member_address("add_address", &req.add_address)?;
                        add_newcomer(&g, add, req.add_address.clone()).await
                    }
                    (0, remove) => match g.remove_member(remove).await {
                        Err(ReplicationError::UnknownMember(_)) => Ok(()), // Gone already.
                        r => r,
                    },
                };
                match r {
                    Ok(()) => Ok(Response::new(ChangeShardReplicasResponse {
                        header: Some(header(g.as_ref())),
                        voters: g.status().members.iter().filter(|m| m.voter).map(|m| m.id).collect(),
                    })),
                    Err(e) => {
                        self.forwarder
                            .forward_not_leader(
                                g.as_ref(),
                                &self.metrics,
                                "change_shard_replicas",
                                e,
                                req,
                                forwarded,
                                |ch, r| async move { AdminClient::new(ch).change_shard_replicas(r).await },
                            )
                            .await
                    }
                }
            })
            .await
    }

    async fn merge_shard(&self, req: Request<MergeShardRequest>) -> Result<Response<MergeShardResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("admin", self.group.status().node_id, "merge_shard", async {
                let right = (req.right_shard_id != 0).then_some(req.right_shard_id);
                let r = crate::merge::merge_shard(&self.placement, req.shard_id, right).await;
                let g = self.group.clone();
                let cat = self.catalog()?;
                self.on_meta_leader(
                    "merge_shard",
                    r,
                    req,
                    forwarded,
                    |mut c, r| async move { c.merge_shard(r).await },
                    |desc| MergeShardResponse {
                        header: Some(header(g.as_ref())),
                        shard: Some(self.shard_pb(&cat, &desc, false)),
                    },
                )
                .await
            })
            .await
    }

    async fn node_report(&self, _req: Request<NodeReportRequest>) -> Result<Response<NodeReportResponse>, Status> {
        let load = self.placement.load();
        let rates = load.rates();
        // Counting past the split size tells the driver nothing more.
        let cap = self.driver.config().split_bytes.saturating_mul(2).max(1);
        let shards = self
            .placement
            .replicas()
            .all()
            .into_iter()
            .map(|g| {
                let status = g.status();
                let leader = status.role == Role::Leader;
                let reader = g.reader();
                let size = if leader {
                    load.size(g.group_id(), &reader, cap)
                } else {
                    ShardSize::default()
                };
                let shard = reader.shard();
                ShardLoad {
                    shard_id: g.group_id(),
                    leader,
                    applied_index: status.applied_index,
                    approximate_bytes: size.bytes,
                    approximate_keys: size.keys,
                    requests_per_second: rates.get(&g.group_id()).copied().unwrap_or(0.0),
                    epoch: shard.epoch,
                    keyspace_id: shard.keyspace,
                    start: shard.start.into(),
                    end: shard.end.into(),
                }
            })
            .collect();
        Ok(Response::new(NodeReportResponse {
            node_id: self.group.status().node_id,
            shards,
        }))
    }

    async fn merge_step(&self, req: Request<MergeStepRequest>) -> Result<Response<MergeStepResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed(
                "admin",
                self.group.status().node_id,
                "merge_step",
                crate::merge::serve_step(&self.placement, req, forwarded),
            )
            .await
    }
}

/// How long a newcomer may take to receive its snapshot and catch up before the step fails
/// (the driver tries again next round).
const NEWCOMER_TIMEOUT: Duration = Duration::from_secs(60);

/// On the shard's leader: compacts the log (so the newcomer starts from a snapshot; see
/// `RaftGroup::compact_for_newcomer`) unless the newcomer is already in the group, then adds it.
async fn add_newcomer(
    g: &Arc<basalt_consensus::raft::RaftGroup>,
    node: u64,
    addr: String,
) -> Result<(), ReplicationError> {
    let status = g.status();
    if status.role != Role::Leader {
        return Err(ReplicationError::NotLeader {
            leader_id: status.leader_id,
            leader_addr: status.leader_addr,
        });
    }
    if !status.members.iter().any(|m| m.id == node) {
        g.compact_for_newcomer().await?;
    }
    match tokio::time::timeout(NEWCOMER_TIMEOUT, g.add_member(node, addr)).await {
        Ok(r) => r,
        Err(_) => Err(ReplicationError::OutcomeUnknown(format!(
            "node {node} did not catch up within {NEWCOMER_TIMEOUT:?}"
        ))),
    }
}
