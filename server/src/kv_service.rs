//! The public `Kv` gRPC service.
//!
//! Each call: validate (see [`crate::limits`]), then either propose a write through the group or
//! pass a ReadIndex barrier and read the local state machine. On a follower both end in
//! `NotLeader` from the group, and the request is forwarded to the leader (see [`crate::forward`]).
//! Every response carries a header describing the node that built it.
//!
//! Keys and values arrive as `Bytes` and are copied once into the proposed command, which the log
//! needs to own anyway.

use basalt_consensus::{Replication, ReplicationError, Role};
use basalt_proto::v1::kv_client::KvClient;
use basalt_proto::v1::kv_server::Kv;
use basalt_proto::v1::{
    compare_and_swap_request::Expected, CompareAndSwapRequest, CompareAndSwapResponse, DeleteRequest, DeleteResponse,
    GetRequest, GetResponse, KeyValue, PutRequest, PutResponse, ResponseHeader, ScanRequest, ScanResponse,
    SessionExpired, WriteSession,
};
use basalt_proto::{status_with_detail, ErrorKind};
use basalt_storage::{Command, WriteRequest, WriteResponse};
use std::sync::Arc;
use tonic::{Request, Response, Status};

use crate::errors::to_status;
use crate::forward::{is_forwarded, Forwarder};
use crate::limits::{check_key, check_scan, check_session, check_value, invalid};
use crate::metrics::ServerMetrics;
use crate::planted::PlantedBug;

pub struct KvService {
    group: Arc<dyn Replication>,
    forwarder: Forwarder,
    metrics: ServerMetrics,
    planted_bug: Option<PlantedBug>,
}

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
    pub fn new(group: Arc<dyn Replication>, forwarder: Forwarder, metrics: ServerMetrics) -> Self {
        Self {
            group,
            forwarder,
            metrics,
            planted_bug: None,
        }
    }

    /// The same service with `bug` planted (see [`crate::planted`]).
    pub fn with_planted_bug(mut self, bug: Option<PlantedBug>) -> Self {
        self.planted_bug = bug;
        self
    }

    fn believes_it_leads(&self) -> bool {
        self.group.status().role == Role::Leader
    }

    /// The group refused `original`: forward it to the leader through `call` when that is
    /// what the refusal asks for (see [`Forwarder::forward_not_leader`]), else fail with it.
    async fn refused<Req, Resp, F, Fut>(
        &self,
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
        let group = self.group.as_ref();
        self.forwarder
            .forward_not_leader(group, &self.metrics, method, error, original, forwarded, |ch, r| {
                call(KvClient::new(ch), r)
            })
            .await
    }

    /// Proposes `cmd`; on a follower forwards `original` to the leader through `call` instead.
    async fn write<Req, Resp, F, Fut>(
        &self,
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
            && self.believes_it_leads()
        {
            let group = self.group.clone();
            tokio::spawn(async move {
                let _ = group.propose(cmd).await;
            });
            return Ok(Ok(WriteResponse::Put));
        }
        match self.group.propose(cmd).await {
            Ok(r) => Ok(Ok(r)),
            Err(e) => self.refused(method, e, original, forwarded, call).await.map(Err),
        }
    }

    /// Passes a read barrier (then the caller reads locally); on a follower forwards `original`
    /// to the leader instead and returns its answer.
    async fn read<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        original: Req,
        forwarded: bool,
        call: F,
    ) -> Result<Option<Response<Resp>>, Status>
    where
        F: FnOnce(KvClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        if self.planted_bug == Some(PlantedBug::StaleReadWithoutBarrier) && self.believes_it_leads() {
            return Ok(None);
        }
        match self.group.read_barrier().await {
            Ok(_) => Ok(None),
            Err(e) => self.refused(method, e, original, forwarded, call).await.map(Some),
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("kv", self.group.status().node_id, "put", async {
                check_key("key", &req.key)?;
                check_value("value", &req.value)?;
                let cmd = WriteRequest {
                    session: check_session(req.session.as_ref())?,
                    command: Command::Put {
                        key: req.key.to_vec(),
                        value: req.value.to_vec(),
                    },
                };
                let session = req.session;
                match self
                    .write(
                        "put",
                        cmd,
                        req.clone(),
                        forwarded,
                        |mut c, r| async move { c.put(r).await },
                    )
                    .await?
                {
                    Ok(WriteResponse::Put) => Ok(Response::new(PutResponse {
                        header: Some(header(self.group.as_ref())),
                    })),
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
            .timed("kv", self.group.status().node_id, "get", async {
                check_key("key", &req.key)?;
                if let Some(resp) = self
                    .read("get", req.clone(), forwarded, |mut c, r| async move { c.get(r).await })
                    .await?
                {
                    return Ok(resp);
                }
                let value = self.group.reader().get(&req.key).map_err(to_status)?;
                Ok(Response::new(GetResponse {
                    header: Some(header(self.group.as_ref())),
                    value: value.map(Into::into),
                }))
            })
            .await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let forwarded = is_forwarded(&req);
        let req = req.into_inner();
        self.metrics
            .timed("kv", self.group.status().node_id, "delete", async {
                check_key("key", &req.key)?;
                let cmd = WriteRequest {
                    session: check_session(req.session.as_ref())?,
                    command: Command::Delete { key: req.key.to_vec() },
                };
                let session = req.session;
                match self
                    .write("delete", cmd, req.clone(), forwarded, |mut c, r| async move {
                        c.delete(r).await
                    })
                    .await?
                {
                    Ok(WriteResponse::Delete { existed }) => Ok(Response::new(DeleteResponse {
                        header: Some(header(self.group.as_ref())),
                        existed,
                    })),
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
            .timed("kv", self.group.status().node_id, "scan", async {
                let limit = check_scan(&req.start, &req.end, req.limit)?;
                if let Some(resp) = self
                    .read(
                        "scan",
                        req.clone(),
                        forwarded,
                        |mut c, r| async move { c.scan(r).await },
                    )
                    .await?
                {
                    return Ok(resp);
                }
                let end = (!req.end.is_empty()).then_some(&req.end[..]);
                let (kvs, more) = self.group.reader().scan(&req.start, end, limit).map_err(to_status)?;
                Ok(Response::new(ScanResponse {
                    header: Some(header(self.group.as_ref())),
                    kvs: kvs
                        .into_iter()
                        .map(|(k, v)| KeyValue {
                            key: k.into(),
                            value: v.into(),
                        })
                        .collect(),
                    more,
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
            .timed("kv", self.group.status().node_id, "compare_and_swap", async {
                check_key("key", &req.key)?;
                check_value("new_value", &req.new_value)?;
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
                    .write("compare_and_swap", cmd, req.clone(), forwarded, |mut c, r| async move {
                        c.compare_and_swap(r).await
                    })
                    .await?
                {
                    Ok(WriteResponse::CompareAndSwap { succeeded, current }) => {
                        Ok(Response::new(CompareAndSwapResponse {
                            header: Some(header(self.group.as_ref())),
                            succeeded,
                            current_value: current.map(Into::into),
                        }))
                    }
                    Ok(WriteResponse::SessionExpired) => Err(session_expired(session.as_ref())),
                    Ok(other) => Err(unexpected("compare_and_swap", other)),
                    Err(forwarded) => Ok(forwarded),
                }
            })
            .await
    }
}
