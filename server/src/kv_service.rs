//! The public `Kv` gRPC service.
//!
//! Each call: validate (see [`crate::limits`]), route (the keyspace from the catalog, then the
//! local replica whose shard holds the key), then either propose a write through that group or
//! pass a ReadIndex barrier and read its local state machine. On a follower both end in
//! `NotLeader` from the group, and the request is forwarded to the group's leader (see
//! [`crate::forward`]). A node with no replica of the key's shard answers `WrongShard` with the
//! catalog's descriptor of it, and so does a group whose range no longer holds the key when the
//! write applies or the read runs (it split after the request was routed): the client retries
//! where the descriptor says. Every response carries a header describing the node and group that
//! built it.
//!
//! Keys and values arrive as `Bytes` and are copied once into the proposed command, which the log
//! needs to own anyway.

use basalt_consensus::{ReadGrant, ReadMode, Replication, ReplicationError, Role, Staleness};
use basalt_proto::keycodec;
use basalt_proto::v1::kv_client::KvClient;
use basalt_proto::v1::kv_server::Kv;
use basalt_proto::v1::{
    compare_and_swap_request::Expected, CompareAndSwapRequest, CompareAndSwapResponse, DeleteRequest, DeleteResponse,
    GetRequest, GetResponse, KeyValue, PutRequest, PutResponse, ReadOptions, ResponseHeader, ScanRequest, ScanResponse,
    SessionExpired, WriteSession, WrongShard,
};
use basalt_proto::{status_with_detail, ErrorKind};
use basalt_storage::{Command, ShardScan, StorageError, WriteRequest, WriteResponse};
use std::sync::Arc;
use tonic::{Request, Response, Status};

use crate::catalog::KeyspaceDesc;
use crate::errors::to_status;
use crate::forward::{is_forwarded, Forwarder};
use crate::limits::{check_key, check_scan, check_session, check_value, invalid};
use crate::metrics::ServerMetrics;
use crate::placement::Placement;
use crate::planted::PlantedBug;
use crate::read_mode::{read_info, requested};

pub struct KvService {
    placement: Placement,
    forwarder: Forwarder,
    metrics: ServerMetrics,
    planted_bug: Option<PlantedBug>,
}

type Group = Arc<dyn Replication>;

/// Builds the header every response carries from the group's current status.
pub fn header(group: &dyn Replication) -> ResponseHeader {
    let s = group.status();
    ResponseHeader {
        node_id: s.node_id,
        leader_id: s.leader_id.unwrap_or(0),
        leader_addr: s.leader_addr.unwrap_or_default(),
        term: s.term,
        applied_index: s.applied_index,
    }
}

fn unexpected(what: &str, r: WriteResponse) -> Status {
    Status::internal(format!("state machine answered {r:?} to a {what}"))
}

fn session_expired(s: Option<&WriteSession>) -> Status {
    let (client_id, sequence) = s.map(|s| (s.client_id, s.sequence)).unwrap_or_default();
    status_with_detail(
        format!("write session {client_id}/{sequence} has expired; its outcome is no longer known"),
        ErrorKind::SessionExpired(SessionExpired { client_id, sequence }),
    )
}

impl KvService {
    pub fn new(placement: Placement, forwarder: Forwarder, metrics: ServerMetrics) -> Self {
        Self {
            placement,
            forwarder,
            metrics,
            planted_bug: None,
        }
    }

    fn node_id(&self) -> u64 {
        self.placement.meta().status().node_id
    }

    /// The keyspace named by a request (empty: the default one).
    ///
    /// A name this node's catalog lacks may be a keyspace created a moment ago that its meta
    /// replica has not applied yet (a client that creates a keyspace and writes to it at once
    /// meets this): only after a ReadIndex barrier on the meta group, which brings the local
    /// replica up to the leader's commit point, is "does not exist" the truth.
    async fn keyspace(&self, name: &str) -> Result<KeyspaceDesc, Status> {
        let name = if name.is_empty() {
            keycodec::DEFAULT_KEYSPACE_NAME
        } else {
            name
        };
        if let Some(ks) = self.cached_keyspace(name)? {
            return Ok(ks);
        }
        self.placement.meta().read_barrier().await.map_err(to_status)?;
        match self.cached_keyspace(name)? {
            Some(ks) => Ok(ks),
            None => Err(Status::not_found(format!("keyspace {name:?} does not exist"))),
        }
    }

    fn cached_keyspace(&self, name: &str) -> Result<Option<KeyspaceDesc>, Status> {
        let catalog = self
            .placement
            .cached()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(match catalog.keyspace(name) {
            Some(ks) => Some(ks.clone()),
            // The default keyspace's shard is formed at bootstrap, before the meta leader has
            // recorded it in the catalog: serve it from the first moment.
            None if name == keycodec::DEFAULT_KEYSPACE_NAME => Some(crate::catalog::default_keyspace(0)),
            None => None,
        })
    }

    /// The local replica whose shard holds stored key `key`, or `WrongShard`.
    fn route(&self, ks: &KeyspaceDesc, key: &[u8]) -> Result<Group, Status> {
        match self.placement.replicas().for_key(key) {
            Some(g) => {
                self.placement.load().record(g.group_id());
                Ok(g)
            }
            None => Err(self.wrong_shard(ks, key)),
        }
    }

    /// `WrongShard` for `key`, carrying the catalog's descriptor of the shard that holds it.
    fn wrong_shard(&self, ks: &KeyspaceDesc, key: &[u8]) -> Status {
        let current = self.placement.cached().ok().and_then(|c| {
            c.shard_for(ks.id, key)
                .map(|s| s.to_pb(&ks.name, &self.placement.addresses(), 0))
        });
        status_with_detail(
            format!(
                "node {} holds no replica of the shard of this key in keyspace {:?}",
                self.node_id(),
                ks.name
            ),
            ErrorKind::WrongShard(WrongShard {
                keyspace: ks.name.clone(),
                current,
            }),
        )
    }

    /// A read's error: a key the group no longer holds becomes `WrongShard`.
    fn read_error(&self, ks: &KeyspaceDesc, key: &[u8], e: ReplicationError) -> Status {
        match e {
            ReplicationError::Storage(StorageError::WrongShard(_)) => self.wrong_shard(ks, key),
            e => to_status(e),
        }
    }

    /// The same service with `bug` planted (see [`crate::planted`]).
    pub fn with_planted_bug(mut self, bug: Option<PlantedBug>) -> Self {
        self.planted_bug = bug;
        self
    }

    fn believes_it_leads(group: &Group) -> bool {
        group.status().role == Role::Leader
    }

    /// The group refused `original`: forward it to the leader through `call` when that is
    /// what the refusal asks for (see [`Forwarder::forward_not_leader`]), else fail with it.
    async fn refused<Req, Resp, F, Fut>(
        &self,
        group: &Group,
        method: &'static str,
        error: ReplicationError,
        original: Req,
        forwarded: bool,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(KvClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        self.forwarder
            .forward_not_leader(
                group.as_ref(),
                &self.metrics,
                method,
                error,
                original,
                forwarded,
                |ch, r| call(KvClient::new(ch), r),
            )
            .await
    }

    /// Proposes `cmd`; on a follower forwards `original` to the leader through `call` instead.
    async fn write<Req, Resp, F, Fut>(
        &self,
        group: &Group,
        method: &'static str,
        cmd: WriteRequest,
        original: Req,
        forwarded: bool,
        call: F,
    ) -> Result<Result<WriteResponse, Response<Resp>>, Status>
    where
        F: FnOnce(KvClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        if self.planted_bug == Some(PlantedBug::AckBeforeQuorum)
            && matches!(cmd.command, Command::Put { .. })
            && Self::believes_it_leads(group)
        {
            let group = group.clone();
            tokio::spawn(async move {
                let _ = group.propose(cmd).await;
            });
            return Ok(Ok(WriteResponse::Put));
        }
        match group.propose(cmd).await {
            Ok(r) => Ok(Ok(r)),
            Err(e) => self.refused(group, method, e, original, forwarded, call).await.map(Err),
        }
    }

    /// Makes a read in `mode` safe here (then the caller reads locally and reports the grant);
    /// where this replica may not serve it (only the leader may, or it cannot prove itself fresh
    /// enough) forwards `original` to the leader instead and returns its answer.
    async fn read<Req, Resp, F, Fut>(
        &self,
        group: &Group,
        method: &'static str,
        mode: ReadMode,
        original: Req,
        forwarded: bool,
        call: F,
    ) -> Result<Result<ReadGrant, Response<Resp>>, Status>
    where
        F: FnOnce(KvClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        if self.planted_bug == Some(PlantedBug::StaleReadWithoutBarrier) && Self::believes_it_leads(group) {
            return Ok(Ok(ReadGrant {
                mode,
                applied_index: group.reader().applied_index(),
                staleness: Staleness::Fresh,
            }));
        }
        match group.prepare_read(mode).await {
            Ok(grant) => {
                self.metrics.read_served(method, &grant);
                Ok(Ok(grant))
            }
            // The leader can serve it fresh: forward it there like a NotLeader. If that fails
            // too (no leader, or none reachable: a minority), the answer says why this replica
            // could not serve it itself, which is what the caller can act on.
            Err(too_stale @ ReplicationError::TooStale { .. }) if !forwarded => {
                let s = group.status();
                let not_leader = ReplicationError::NotLeader {
                    leader_id: s.leader_id,
                    leader_addr: s.leader_addr,
                };
                match self.refused(group, method, not_leader, original, forwarded, call).await {
                    Ok(resp) => Ok(Err(resp)),
                    Err(status) => Err(Status::unavailable(format!(
                        "{too_stale}; the leader could not serve it either: {}",
                        status.message()
                    ))),
                }
            }
            Err(e) => self.refused(group, method, e, original, forwarded, call).await.map(Err),
        }
    }

    /// The mode a read asks for: its own, else its keyspace's default.
    fn read_mode(&self, ks: &KeyspaceDesc, o: Option<&ReadOptions>) -> Result<ReadMode, Status> {
        Ok(requested(o, "read")?.unwrap_or_else(|| ks.default_read.mode()))
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("kv", self.node_id(), "put", async {
                check_key("key", &req.key)?;
                check_value("value", &req.value)?;
                let ks = self.keyspace(&req.keyspace).await?;
                let stored = ks.encode(&req.key);
                let group = self.route(&ks, &stored)?;
                let cmd = WriteRequest {
                    session: check_session(req.session.as_ref())?,
                    command: Command::Put {
                        key: req.key.to_vec(),
                        value: req.value.to_vec(),
                    },
                };
                let session = req.session;
                match self
                    .write(&group, "put", cmd, req.clone(), forwarded, |mut c, r| async move {
                        c.put(r).await
                    })
                    .await?
                {
                    Ok(WriteResponse::Put) => Ok(Response::new(PutResponse {
                        header: Some(header(group.as_ref())),
                    })),
                    Ok(WriteResponse::WrongShard { .. }) => Err(self.wrong_shard(&ks, &stored)),
                    Ok(WriteResponse::SessionExpired) => Err(session_expired(session.as_ref())),
                    Ok(other) => Err(unexpected("put", other)),
                    Err(forwarded) => Ok(forwarded),
                }
            })
            .await
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("kv", self.node_id(), "get", async {
                check_key("key", &req.key)?;
                let ks = self.keyspace(&req.keyspace).await?;
                let stored = ks.encode(&req.key);
                let mode = self.read_mode(&ks, req.read.as_ref())?;
                let group = self.route(&ks, &stored)?;
                let grant = match self
                    .read(&group, "get", mode, req.clone(), forwarded, |mut c, r| async move {
                        c.get(r).await
                    })
                    .await?
                {
                    Ok(grant) => grant,
                    Err(resp) => return Ok(resp),
                };
                let value = group
                    .reader()
                    .get(&req.key)
                    .map_err(|e| self.read_error(&ks, &stored, e))?;
                Ok(Response::new(GetResponse {
                    header: Some(header(group.as_ref())),
                    value: value.map(Into::into),
                    read: Some(read_info(&grant, self.node_id())),
                }))
            })
            .await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("kv", self.node_id(), "delete", async {
                check_key("key", &req.key)?;
                let ks = self.keyspace(&req.keyspace).await?;
                let stored = ks.encode(&req.key);
                let group = self.route(&ks, &stored)?;
                let cmd = WriteRequest {
                    session: check_session(req.session.as_ref())?,
                    command: Command::Delete { key: req.key.to_vec() },
                };
                let session = req.session;
                match self
                    .write(&group, "delete", cmd, req.clone(), forwarded, |mut c, r| async move {
                        c.delete(r).await
                    })
                    .await?
                {
                    Ok(WriteResponse::Delete { existed }) => Ok(Response::new(DeleteResponse {
                        header: Some(header(group.as_ref())),
                        existed,
                    })),
                    Ok(WriteResponse::WrongShard { .. }) => Err(self.wrong_shard(&ks, &stored)),
                    Ok(WriteResponse::SessionExpired) => Err(session_expired(session.as_ref())),
                    Ok(other) => Err(unexpected("delete", other)),
                    Err(forwarded) => Ok(forwarded),
                }
            })
            .await
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("kv", self.node_id(), "scan", async {
                let limit = check_scan(&req.start, &req.end, req.limit)?;
                let ks = self.keyspace(&req.keyspace).await?;
                let cursor = (!req.cursor.is_empty()).then(|| req.cursor.to_vec());
                let position = keycodec::scan_position(ks.id, ks.hashed, cursor.as_deref(), &req.start);
                if !position.starts_with(&ks.id.to_be_bytes()) {
                    return Err(invalid("cursor", "does not belong to this keyspace"));
                }
                let mode = self.read_mode(&ks, req.read.as_ref())?;
                let group = self.route(&ks, &position)?;
                let grant = match self
                    .read(&group, "scan", mode, req.clone(), forwarded, |mut c, r| async move {
                        c.scan(r).await
                    })
                    .await?
                {
                    Ok(grant) => grant,
                    Err(resp) => return Ok(resp),
                };
                let scan = ShardScan {
                    cursor,
                    start: req.start.to_vec(),
                    end: (!req.end.is_empty()).then(|| req.end.to_vec()),
                    limit,
                };
                let page = group
                    .reader()
                    .scan_shard(&scan)
                    .map_err(|e| self.read_error(&ks, &position, e))?;
                Ok(Response::new(ScanResponse {
                    header: Some(header(group.as_ref())),
                    kvs: page
                        .kvs
                        .into_iter()
                        .map(|(k, v)| KeyValue {
                            key: k.into(),
                            value: v.into(),
                        })
                        .collect(),
                    more: page.cursor.is_some(),
                    cursor: page.cursor.unwrap_or_default().into(),
                    read: Some(read_info(&grant, self.node_id())),
                }))
            })
            .await
    }

    async fn compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("kv", self.node_id(), "compare_and_swap", async {
                check_key("key", &req.key)?;
                check_value("new_value", &req.new_value)?;
                let ks = self.keyspace(&req.keyspace).await?;
                let stored = ks.encode(&req.key);
                let group = self.route(&ks, &stored)?;
                let expected = match &req.expected {
                    Some(Expected::ExpectedValue(v)) => {
                        check_value("expected_value", v)?;
                        Some(v.to_vec())
                    }
                    Some(Expected::ExpectAbsent(true)) => None,
                    Some(Expected::ExpectAbsent(false)) => {
                        return Err(invalid("expect_absent", "must be true when set"));
                    }
                    None => {
                        return Err(invalid(
                            "expected",
                            "one of expected_value or expect_absent is required",
                        ))
                    }
                };
                let cmd = WriteRequest {
                    session: check_session(req.session.as_ref())?,
                    command: Command::CompareAndSwap {
                        key: req.key.to_vec(),
                        expected,
                        new_value: req.new_value.to_vec(),
                    },
                };
                let session = req.session;
                match self
                    .write(
                        &group,
                        "compare_and_swap",
                        cmd,
                        req.clone(),
                        forwarded,
                        |mut c, r| async move { c.compare_and_swap(r).await },
                    )
                    .await?
                {
                    Ok(WriteResponse::CompareAndSwap { succeeded, current }) => {
                        Ok(Response::new(CompareAndSwapResponse {
                            header: Some(header(group.as_ref())),
                            succeeded,
                            current_value: current.map(Into::into),
                        }))
                    }
                    Ok(WriteResponse::WrongShard { .. }) => Err(self.wrong_shard(&ks, &stored)),
                    Ok(WriteResponse::SessionExpired) => Err(session_expired(session.as_ref())),
                    Ok(other) => Err(unexpected("compare_and_swap", other)),
                    Err(forwarded) => Ok(forwarded),
                }
            })
            .await
    }
}
