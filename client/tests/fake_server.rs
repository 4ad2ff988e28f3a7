//! The client (and `basaltctl`'s command layer) against small in-process fake Basalt nodes.
//!
//! Each fake node is a real tonic server on `127.0.0.1:0` implementing the `Kv` and `Admin`
//! services over in-memory keyspaces. It records every request it receives, so the tests can check
//! what went over the wire: which node an attempt reached, which session a write carried on each
//! attempt, which keyspace every key-value request named, and how a scan followed its cursor. A
//! node can be scripted to answer `NotLeader` with a hint, to answer `WrongShard` (for the first N
//! key-value requests, or always, naming another node as the shard's replica), to fail the first N
//! write attempts with UNAVAILABLE after recording them, to reject writes with a typed error, or
//! to answer scans with a cursor that never moves.
//!
//! Scans are served one shard at a time, as the real server does: each keyspace is divided into
//! shards (key ranges, or ranges of a 16-bit hash for hash keyspaces), a response never crosses a
//! shard boundary, and the cursor names the shard and position to continue from, so a page at a
//! boundary can come back empty with `more` set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_client::cli::args::Cli;
use basalt_client::cli::commands::execute;
use basalt_client::cli::exit::{CliError, EXIT_FAILURE, EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE};
use basalt_client::{Client, ClientConfig, ClientError, Expect, Sharding};
use basalt_proto::status_with_detail;
use basalt_proto::v1::admin_server::{Admin, AdminServer};
use basalt_proto::v1::compare_and_swap_request::Expected;
use basalt_proto::v1::kv_server::{Kv, KvServer};
use basalt_proto::v1::*;
use basalt_proto::ErrorKind;
use bytes::Bytes;
use clap::Parser;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};

/// Largest scan page the fake serves, small so paging is exercised.
const PAGE_MAX: usize = 2;

#[derive(Clone, Debug)]
enum Mode {
    /// Serve requests.
    Leader,
    /// Answer every request with NotLeader pointing at this leader.
    Follower { leader_id: u64, leader_addr: String },
    /// Reject writes with this error (reads are served).
    RejectWrites(fn() -> Status),
    /// Hold no replica of any shard: answer every key-value request with WrongShard naming this
    /// address (none when empty) as the shard's replica. Admin requests are served.
    NoReplica { replica_addr: String },
    /// Never answer `add_member`, as a leader waiting for a newcomer that is not running.
    StallAddMember,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Admin,
}

#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Put(Option<WriteSession>),
    Delete(Option<WriteSession>),
    Cas(Option<WriteSession>),
    Get,
    Scan {
        start: Bytes,
        end: Bytes,
        limit: u32,
        cursor: Bytes,
    },
    Admin(&'static str),
    AdminCall(AdminCall),
}

/// The sharding-era admin requests, recorded whole so tests can check every field.
#[derive(Clone, Debug, PartialEq)]
enum AdminCall {
    CreateKeyspace(CreateKeyspaceRequest),
    ListKeyspaces,
    DescribeKeyspace(String),
    DropKeyspace(String),
    ListShards(ListShardsRequest),
    SplitShard(SplitShardRequest),
    MergeShard(MergeShardRequest),
    MoveShard(MoveShardRequest),
    TransferShardLeader(TransferShardLeaderRequest),
}

/// A position in a keyspace's order: (hash, key) for hash keyspaces, (0, key) for range ones.
type Position = (u16, Bytes);

fn position(sharding: Sharding, key: &Bytes) -> Position {
    match sharding {
        Sharding::Range => (0, key.clone()),
        Sharding::Hash => (basalt_proto::keycodec::hash_of(key), key.clone()),
    }
}

struct FakeKeyspace {
    meta: Keyspace,
    sharding: Sharding,
    /// Each shard's lower bound in the keyspace's order, ascending; the first is `(0, "")`.
    bounds: Vec<Position>,
    data: BTreeMap<Bytes, Bytes>,
}

impl FakeKeyspace {
    fn new(name: &str, id: u32, sharding: Sharding, bounds: Vec<Position>) -> Self {
        Self {
            meta: Keyspace {
                name: name.into(),
                id,
                sharding: sharding.to_wire(),
                replicas: 3,
                initial_shards: bounds.len() as u32,
                default_read: None,
            },
            sharding,
            bounds,
            data: BTreeMap::new(),
        }
    }

    /// `shards` range shards split at `splits`, or `shards` even hash shards.
    fn with_layout(name: &str, id: u32, sharding: Sharding, shards: u32, splits: &[&str]) -> Self {
        let bounds = match sharding {
            Sharding::Range => std::iter::once((0, Bytes::new()))
                .chain(splits.iter().map(|s| (0, Bytes::copy_from_slice(s.as_bytes()))))
                .collect(),
            Sharding::Hash => (0..shards.max(1))
                .map(|i| ((u64::from(i) * 65_536 / u64::from(shards.max(1))) as u16, Bytes::new()))
                .collect(),
        };
        Self::new(name, id, sharding, bounds)
    }

    fn shard_of(&self, pos: &Position) -> usize {
        self.bounds.iter().rposition(|b| b <= pos).unwrap_or(0)
    }

    fn display(&self, pos: Option<&Position>) -> String {
        match (pos, self.sharding) {
            (None, _) => String::new(),
            (Some((_, key)), Sharding::Range) => String::from_utf8_lossy(key).into_owned(),
            (Some((0, _)), Sharding::Hash) => String::new(),
            (Some((hash, _)), Sharding::Hash) => hash.to_string(),
        }
    }

    /// A shard bound encoded as the server encodes it (`None`: the keyspace's start or end).
    fn encoded_bound(&self, pos: Option<&Position>, lower: bool) -> Vec<u8> {
        let (start, end) = basalt_proto::keycodec::keyspace_range(self.meta.id);
        match (pos, self.sharding) {
            (None, _) if lower => start,
            (None, _) => end,
            (Some((_, key)), Sharding::Range) => basalt_proto::keycodec::data_key(self.meta.id, &[], key),
            (Some((hash, _)), Sharding::Hash) => basalt_proto::keycodec::hash_bound(self.meta.id, u32::from(*hash)),
        }
    }

    fn shards(&self, node_id: u64, with_stats: bool) -> Vec<Shard> {
        (0..self.bounds.len())
            .map(|i| {
                let lower = &self.bounds[i];
                let upper = self.bounds.get(i + 1);
                let inside: Vec<(&Bytes, &Bytes)> = self
                    .data
                    .iter()
                    .filter(|(k, _)| {
                        let p = position(self.sharding, k);
                        p >= *lower && upper.is_none_or(|u| p < *u)
                    })
                    .collect();
                Shard {
                    id: u64::from(self.meta.id) * 100 + i as u64,
                    keyspace: self.meta.name.clone(),
                    keyspace_id: self.meta.id,
                    start: self.encoded_bound(Some(lower).filter(|_| i > 0), true).into(),
                    end: self.encoded_bound(upper, false).into(),
                    epoch: 1,
                    replicas: vec![Replica {
                        node_id,
                        address: "fake".into(),
                    }],
                    leader_id: node_id,
                    start_display: if i == 0 {
                        String::new()
                    } else {
                        self.display(Some(lower))
                    },
                    end_display: self.display(upper),
                    applied_index: if with_stats { 42 } else { 0 },
                    approximate_bytes: if with_stats {
                        inside.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
                    } else {
                        0
                    },
                    approximate_keys: if with_stats { inside.len() as u64 } else { 0 },
                    moving_from: 0,
                    moving_to: 0,
                }
            })
            .collect()
    }

    /// The keys of `[start, end)` in this keyspace's order: what a whole scan must return.
    fn ordered_keys(&self, start: &[u8], end: &[u8]) -> Vec<Bytes> {
        let mut keys: Vec<Bytes> = self
            .data
            .keys()
            .filter(|k| k.as_ref() >= start && (end.is_empty() || k.as_ref() < end))
            .cloned()
            .collect();
        keys.sort_by_key(|k| position(self.sharding, k));
        keys
    }

    /// One page: pairs of one shard only, from the cursor's position (or the range's start).
    fn scan(&self, req: &ScanRequest) -> Result<(Vec<KeyValue>, bool, Bytes), Status> {
        let (shard, pos) = if req.cursor.is_empty() {
            let pos = match self.sharding {
                Sharding::Range => (0, req.start.clone()),
                Sharding::Hash => (0, Bytes::new()),
            };
            (self.shard_of(&pos), pos)
        } else {
            decode_cursor(&req.cursor)
                .filter(|(shard, _)| *shard < self.bounds.len())
                .ok_or_else(|| Status::invalid_argument("malformed cursor"))?
        };
        let upper = self.bounds.get(shard + 1);
        let mut items: Vec<(Position, &Bytes, &Bytes)> = self
            .data
            .iter()
            .filter(|(k, _)| **k >= req.start && (req.end.is_empty() || **k < req.end))
            .map(|(k, v)| (position(self.sharding, k), k, v))
            .filter(|(p, _, _)| *p >= pos && upper.is_none_or(|u| p < u))
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let page = if req.limit == 0 {
            PAGE_MAX
        } else {
            PAGE_MAX.min(req.limit as usize)
        };
        let kvs = items
            .iter()
            .take(page)
            .map(|(_, k, v)| KeyValue {
                key: (*k).clone(),
                value: (*v).clone(),
            })
            .collect();
        if let Some((next, _, _)) = items.get(page) {
            return Ok((kvs, true, encode_cursor(shard, next)));
        }
        let next_shard_in_range = upper.is_some_and(|u| match self.sharding {
            Sharding::Range => req.end.is_empty() || u.1 < req.end,
            Sharding::Hash => true,
        });
        match upper {
            Some(u) if next_shard_in_range => Ok((kvs, true, encode_cursor(shard + 1, u))),
            _ => Ok((kvs, false, Bytes::new())),
        }
    }
}

fn encode_cursor(shard: usize, (hash, key): &Position) -> Bytes {
    let mut c = (shard as u32).to_be_bytes().to_vec();
    c.extend_from_slice(&hash.to_be_bytes());
    c.extend_from_slice(key);
    c.into()
}

fn decode_cursor(cursor: &[u8]) -> Option<(usize, Position)> {
    let shard = u32::from_be_bytes(cursor.get(..4)?.try_into().ok()?) as usize;
    let hash = u16::from_be_bytes(cursor.get(4..6)?.try_into().ok()?);
    Some((shard, (hash, Bytes::copy_from_slice(cursor.get(6..)?))))
}

struct FakeNode {
    node_id: u64,
    mode: Mode,
    /// Write attempts still to fail with UNAVAILABLE (after recording them).
    fail_writes: AtomicUsize,
    /// Key-value requests still to answer with WrongShard (after recording them).
    wrong_shard: AtomicUsize,
    /// Answer scans with an empty page whose cursor never moves.
    stuck_scan: AtomicBool,
    seen: Mutex<Vec<Seen>>,
    /// The keyspace each key-value request named, with the request's kind.
    kv_keyspaces: Mutex<Vec<(&'static str, String)>>,
    keyspaces: Mutex<BTreeMap<String, FakeKeyspace>>,
}

impl FakeNode {
    fn new(node_id: u64, mode: Mode) -> Arc<Self> {
        let mut keyspaces = BTreeMap::new();
        keyspaces.insert(
            "default".to_owned(),
            FakeKeyspace::with_layout("default", 1, Sharding::Range, 1, &[]),
        );
        Arc::new(Self {
            node_id,
            mode,
            fail_writes: AtomicUsize::new(0),
            wrong_shard: AtomicUsize::new(0),
            stuck_scan: AtomicBool::new(false),
            seen: Mutex::new(Vec::new()),
            kv_keyspaces: Mutex::new(Vec::new()),
            keyspaces: Mutex::new(keyspaces),
        })
    }

    /// Adds keyspace `name` with a given layout (see `FakeKeyspace::with_layout`).
    fn add_keyspace(&self, name: &str, sharding: Sharding, shards: u32, splits: &[&str]) {
        let mut keyspaces = self.keyspaces.lock();
        let id = keyspaces.len() as u32 + 1;
        keyspaces.insert(
            name.to_owned(),
            FakeKeyspace::with_layout(name, id, sharding, shards, splits),
        );
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    fn scans(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| matches!(s, Seen::Scan { .. }))
            .collect()
    }

    fn admin_calls(&self) -> Vec<AdminCall> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::AdminCall(call) => Some(call),
                _ => None,
            })
            .collect()
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            node_id: self.node_id,
            leader_id: self.node_id,
            ..Default::default()
        })
    }

    fn wrong_shard_status(&self, keyspace: &str, replica_addr: &str) -> Status {
        status_with_detail(
            "no replica of the key's shard here",
            ErrorKind::WrongShard(WrongShard {
                keyspace: keyspace.to_owned(),
                current: Some(Shard {
                    id: 9,
                    keyspace: keyspace.to_owned(),
                    replicas: if replica_addr.is_empty() {
                        vec![]
                    } else {
                        vec![Replica {
                            node_id: 0,
                            address: replica_addr.to_owned(),
                        }]
                    },
                    ..Default::default()
                }),
            }),
        )
    }

    /// Records a key-value request and its keyspace, then decides whether it is served.
    fn admit_kv(&self, seen: Seen, op: &'static str, keyspace: &str, is_write: bool) -> Result<String, Status> {
        let keyspace = if keyspace.is_empty() { "default" } else { keyspace };
        self.kv_keyspaces.lock().push((op, keyspace.to_owned()));
        self.admit(seen, if is_write { Op::Write } else { Op::Read }, keyspace)?;
        Ok(keyspace.to_owned())
    }

    /// Records the request, then decides whether it is served.
    fn admit(&self, seen: Seen, op: Op, keyspace: &str) -> Result<(), Status> {
        self.seen.lock().push(seen);
        let is_write = op == Op::Write;
        match &self.mode {
            Mode::Follower { leader_id, leader_addr } => {
                return Err(status_with_detail(
                    "not the leader",
                    ErrorKind::NotLeader(NotLeader {
                        leader_id: *leader_id,
                        leader_addr: leader_addr.clone(),
                    }),
                ))
            }
            Mode::NoReplica { replica_addr } if op != Op::Admin => {
                return Err(self.wrong_shard_status(keyspace, replica_addr))
            }
            Mode::RejectWrites(make) if is_write => return Err(make()),
            _ => {}
        }
        if op != Op::Admin
            && self
                .wrong_shard
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(self.wrong_shard_status(keyspace, ""));
        }
        if is_write
            && self
                .fail_writes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Status::unavailable("scripted failure after recording"));
        }
        Ok(())
    }

    /// Runs `f` on keyspace `name`'s data, or answers NOT_FOUND.
    fn with_keyspace<T>(&self, name: &str, f: impl FnOnce(&mut FakeKeyspace) -> T) -> Result<T, Status> {
        let mut keyspaces = self.keyspaces.lock();
        let ks = keyspaces
            .get_mut(name)
            .ok_or_else(|| Status::not_found(format!("no keyspace {name:?}")))?;
        Ok(f(ks))
    }
}

#[tonic::async_trait]
impl Kv for FakeNode {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        let ks = self.admit_kv(Seen::Put(req.session), "put", &req.keyspace, true)?;
        self.with_keyspace(&ks, |ks| ks.data.insert(req.key, req.value))?;
        Ok(Response::new(PutResponse { header: self.header() }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = req.into_inner();
        let ks = self.admit_kv(Seen::Get, "get", &req.keyspace, false)?;
        let value = self.with_keyspace(&ks, |ks| ks.data.get(&req.key).cloned())?;
        Ok(Response::new(GetResponse {
            header: self.header(),
            value,
            read: None,
        }))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let req = req.into_inner();
        let ks = self.admit_kv(Seen::Delete(req.session), "delete", &req.keyspace, true)?;
        let existed = self.with_keyspace(&ks, |ks| ks.data.remove(&req.key).is_some())?;
        Ok(Response::new(DeleteResponse {
            header: self.header(),
            existed,
        }))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let req = req.into_inner();
        let seen = Seen::Scan {
            start: req.start.clone(),
            end: req.end.clone(),
            limit: req.limit,
            cursor: req.cursor.clone(),
        };
        let ks = self.admit_kv(seen, "scan", &req.keyspace, false)?;
        if self.stuck_scan.load(Ordering::SeqCst) {
            let cursor = if req.cursor.is_empty() {
                Bytes::from_static(b"stuck")
            } else {
                req.cursor.clone()
            };
            return Ok(Response::new(ScanResponse {
                header: self.header(),
                kvs: vec![],
                more: true,
                cursor,
                read: None,
            }));
        }
        let (kvs, more, cursor) = self.with_keyspace(&ks, |ks| ks.scan(&req))??;
        Ok(Response::new(ScanResponse {
            header: self.header(),
            kvs,
            more,
            cursor,
            read: None,
        }))
    }

    async fn compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let req = req.into_inner();
        let ks = self.admit_kv(Seen::Cas(req.session), "cas", &req.keyspace, true)?;
        let (succeeded, current) = self.with_keyspace(&ks, |ks| {
            let current = ks.data.get(&req.key).cloned();
            let succeeded = match req.expected {
                Some(Expected::ExpectedValue(v)) => current.as_ref() == Some(&v),
                Some(Expected::ExpectAbsent(true)) => current.is_none(),
                _ => return Err(Status::invalid_argument("expected must be set")),
            };
            if succeeded {
                ks.data.insert(req.key, req.new_value);
            }
            Ok((succeeded, current))
        })??;
        Ok(Response::new(CompareAndSwapResponse {
            header: self.header(),
            succeeded,
            current_value: current,
        }))
    }
}

#[tonic::async_trait]
impl Admin for FakeNode {
    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.admit(Seen::Admin("cluster_status"), Op::Admin, "")?;
        Ok(Response::new(ClusterStatusResponse {
            header: self.header(),
            leader_id: self.node_id,
            members: vec![Member {
                id: self.node_id,
                address: "fake".into(),
                role: Role::Leader as i32,
                term: 1,
                applied_index: 1,
                voter: true,
            }],
            commit_index: 1,
        }))
    }

    async fn add_member(&self, _: Request<AddMemberRequest>) -> Result<Response<AddMemberResponse>, Status> {
        self.admit(Seen::Admin("add_member"), Op::Admin, "")?;
        if matches!(self.mode, Mode::StallAddMember) {
            std::future::pending::<()>().await;
        }
        Ok(Response::new(AddMemberResponse { header: self.header() }))
    }

    async fn remove_member(&self, _: Request<RemoveMemberRequest>) -> Result<Response<RemoveMemberResponse>, Status> {
        self.admit(Seen::Admin("remove_member"), Op::Admin, "")?;
        Ok(Response::new(RemoveMemberResponse { header: self.header() }))
    }

    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.admit(Seen::Admin("transfer_leader"), Op::Admin, "")?;
        Ok(Response::new(TransferLeaderResponse { header: self.header() }))
    }

    async fn create_keyspace(
        &self,
        req: Request<CreateKeyspaceRequest>,
    ) -> Result<Response<CreateKeyspaceResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::AdminCall(AdminCall::CreateKeyspace(req.clone())), Op::Admin, "")?;
        let sharding = Sharding::from_wire(req.sharding).ok_or_else(|| Status::invalid_argument("sharding"))?;
        let mut keyspaces = self.keyspaces.lock();
        if keyspaces.contains_key(&req.name) {
            return Err(Status::already_exists(format!("keyspace {:?} exists", req.name)));
        }
        let shards = match (req.shards, sharding) {
            (0, Sharding::Range) => 1,
            (0, Sharding::Hash) => 16,
            (n, _) => n,
        };
        // Range keyspaces start as one shard here whatever was asked: the fake has no data to
        // pick split points from.
        let mut ks = FakeKeyspace::with_layout(&req.name, keyspaces.len() as u32 + 1, sharding, shards, &[]);
        ks.meta.initial_shards = shards;
        if req.replicas != 0 {
            ks.meta.replicas = req.replicas;
        }
        let keyspace = ks.meta.clone();
        keyspaces.insert(req.name, ks);
        Ok(Response::new(CreateKeyspaceResponse {
            header: self.header(),
            keyspace: Some(keyspace),
        }))
    }

    async fn list_keyspaces(
        &self,
        _: Request<ListKeyspacesRequest>,
    ) -> Result<Response<ListKeyspacesResponse>, Status> {
        self.admit(Seen::AdminCall(AdminCall::ListKeyspaces), Op::Admin, "")?;
        Ok(Response::new(ListKeyspacesResponse {
            header: self.header(),
            keyspaces: self.keyspaces.lock().values().map(|ks| ks.meta.clone()).collect(),
        }))
    }

    async fn describe_keyspace(
        &self,
        req: Request<DescribeKeyspaceRequest>,
    ) -> Result<Response<DescribeKeyspaceResponse>, Status> {
        let req = req.into_inner();
        self.admit(
            Seen::AdminCall(AdminCall::DescribeKeyspace(req.name.clone())),
            Op::Admin,
            "",
        )?;
        let (keyspace, shards) =
            self.with_keyspace(&req.name, |ks| (ks.meta.clone(), ks.shards(self.node_id, true)))?;
        Ok(Response::new(DescribeKeyspaceResponse {
            header: self.header(),
            keyspace: Some(keyspace),
            shards,
        }))
    }

    async fn drop_keyspace(&self, req: Request<DropKeyspaceRequest>) -> Result<Response<DropKeyspaceResponse>, Status> {
        let req = req.into_inner();
        self.admit(
            Seen::AdminCall(AdminCall::DropKeyspace(req.name.clone())),
            Op::Admin,
            "",
        )?;
        self.keyspaces
            .lock()
            .remove(&req.name)
            .ok_or_else(|| Status::not_found(format!("no keyspace {:?}", req.name)))?;
        Ok(Response::new(DropKeyspaceResponse { header: self.header() }))
    }

    async fn list_shards(&self, req: Request<ListShardsRequest>) -> Result<Response<ListShardsResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::AdminCall(AdminCall::ListShards(req.clone())), Op::Admin, "")?;
        let shards = if req.keyspace.is_empty() {
            self.keyspaces
                .lock()
                .values()
                .flat_map(|ks| ks.shards(self.node_id, req.with_stats))
                .collect()
        } else {
            self.with_keyspace(&req.keyspace, |ks| ks.shards(self.node_id, req.with_stats))?
        };
        Ok(Response::new(ListShardsResponse {
            header: self.header(),
            shards,
        }))
    }

    async fn split_shard(&self, req: Request<SplitShardRequest>) -> Result<Response<SplitShardResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::AdminCall(AdminCall::SplitShard(req.clone())), Op::Admin, "")?;
        let at = String::from_utf8_lossy(&req.at).into_owned();
        Ok(Response::new(SplitShardResponse {
            header: self.header(),
            left: Some(Shard {
                id: req.shard_id,
                end_display: at.clone(),
                ..Default::default()
            }),
            right: Some(Shard {
                id: req.shard_id + 1000,
                start_display: at,
                ..Default::default()
            }),
        }))
    }

    async fn move_shard(&self, req: Request<MoveShardRequest>) -> Result<Response<MoveShardResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::AdminCall(AdminCall::MoveShard(req)), Op::Admin, "")?;
        Ok(Response::new(MoveShardResponse {
            header: self.header(),
            shard: Some(Shard {
                id: req.shard_id,
                epoch: 2,
                replicas: [2, 3, req.to_node]
                    .into_iter()
                    .map(|node_id| Replica {
                        node_id,
                        address: "fake".into(),
                    })
                    .collect(),
                ..Default::default()
            }),
        }))
    }

    async fn transfer_shard_leader(
        &self,
        req: Request<TransferShardLeaderRequest>,
    ) -> Result<Response<TransferShardLeaderResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::AdminCall(AdminCall::TransferShardLeader(req)), Op::Admin, "")?;
        Ok(Response::new(TransferShardLeaderResponse { header: self.header() }))
    }

    async fn placement_status(
        &self,
        _: Request<PlacementStatusRequest>,
    ) -> Result<Response<PlacementStatusResponse>, Status> {
        self.admit(Seen::Admin("placement_status"), Op::Admin, "")?;
        Ok(Response::new(PlacementStatusResponse {
            header: self.header(),
            driver_node: self.node_id,
            nodes: vec![NodePlacement {
                node_id: self.node_id,
                replicas: 3,
                leaders: 2,
                state: "live".into(),
                last_report_ms: 10,
            }],
            steps: vec![PlacementStep {
                kind: "move".into(),
                shard_id: 7,
                from_node: 2,
                to_node: 4,
                state: "running".into(),
                detail: "node 2 was removed from the cluster".into(),
                started_at_ms: 1,
                finished_at_ms: 0,
            }],
        }))
    }

    async fn change_shard_replicas(
        &self,
        _: Request<ChangeShardReplicasRequest>,
    ) -> Result<Response<ChangeShardReplicasResponse>, Status> {
        Err(Status::unimplemented("internal; the fake server has no shards"))
    }

    async fn node_report(&self, _: Request<NodeReportRequest>) -> Result<Response<NodeReportResponse>, Status> {
        Err(Status::unimplemented("internal; the fake server has no shards"))
    }

    /// Merges shard `keyspace id * 100 + i` with shard `i + 1` of its keyspace (the fake numbers
    /// shards by position, so the shards after them are renumbered).
    async fn merge_shard(&self, req: Request<MergeShardRequest>) -> Result<Response<MergeShardResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::AdminCall(AdminCall::MergeShard(req)), Op::Admin, "")?;
        let (ks_id, index) = ((req.shard_id / 100) as u32, (req.shard_id % 100) as usize);
        let mut keyspaces = self.keyspaces.lock();
        let ks = keyspaces
            .values_mut()
            .find(|ks| ks.meta.id == ks_id && index < ks.bounds.len())
            .ok_or_else(|| Status::not_found(format!("no shard {}", req.shard_id)))?;
        if index + 1 >= ks.bounds.len() {
            return Err(Status::invalid_argument("the last shard has no right neighbour"));
        }
        if req.right_shard_id != 0 && req.right_shard_id != req.shard_id + 1 {
            return Err(Status::invalid_argument("not the right neighbour"));
        }
        ks.bounds.remove(index + 1);
        let shard = Shard {
            epoch: 2,
            ..ks.shards(self.node_id, false).swap_remove(index)
        };
        Ok(Response::new(MergeShardResponse {
            header: self.header(),
            shard: Some(shard),
        }))
    }

    async fn merge_step(&self, _: Request<MergeStepRequest>) -> Result<Response<MergeStepResponse>, Status> {
        Err(Status::unimplemented("internal to basaltd"))
    }
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding an ephemeral port on loopback");
    let addr = listener.local_addr().expect("a bound listener has an address");
    (listener, addr)
}

fn serve(listener: TcpListener, node: Arc<FakeNode>) {
    tokio::spawn(
        Server::builder()
            .add_service(KvServer::from_arc(Arc::clone(&node)))
            .add_service(AdminServer::from_arc(node))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
}

async fn start(node: Arc<FakeNode>) -> SocketAddr {
    let (listener, addr) = bind().await;
    serve(listener, node);
    addr
}

/// A leader and a follower that points at it.
async fn leader_and_follower() -> (Arc<FakeNode>, SocketAddr, Arc<FakeNode>, SocketAddr) {
    let leader = FakeNode::new(2, Mode::Leader);
    let leader_addr = start(Arc::clone(&leader)).await;
    let follower = FakeNode::new(
        1,
        Mode::Follower {
            leader_id: 2,
            leader_addr: leader_addr.to_string(),
        },
    );
    let follower_addr = start(Arc::clone(&follower)).await;
    (leader, leader_addr, follower, follower_addr)
}

fn config(endpoints: &[SocketAddr]) -> ClientConfig {
    let mut cfg = ClientConfig::new(endpoints.iter().map(ToString::to_string));
    cfg.deadline = Duration::from_secs(5);
    cfg.attempt_timeout = Duration::from_secs(1);
    cfg.backoff_initial = Duration::from_millis(5);
    cfg.backoff_max = Duration::from_millis(20);
    cfg
}

async fn client(endpoints: &[SocketAddr]) -> Client {
    Client::connect(config(endpoints))
        .await
        .expect("the test configuration is valid")
}

/// The key-value requests among `seen`: without the routing lookups (`DescribeKeyspace`) the
/// client makes on first use of a keyspace, and without admin calls.
fn kv(seen: Vec<Seen>) -> Vec<Seen> {
    seen.into_iter()
        .filter(|s| !matches!(s, Seen::Admin(_) | Seen::AdminCall(_)))
        .collect()
}

fn sessions(seen: &[Seen]) -> Vec<WriteSession> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Put(s) | Seen::Delete(s) | Seen::Cas(s) => *s,
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn not_leader_hint_is_followed_and_remembered() {
    let (leader, leader_addr, follower, follower_addr) = leader_and_follower().await;
    let client = client(&[follower_addr]).await;

    client.put("k", "v").await.expect("put through the hint");
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from("v")));
    assert!(client.delete("k").await.expect("delete"));

    assert_eq!(client.leader_hint(), Some(2));
    assert_eq!(client.endpoints(), [follower_addr.to_string(), leader_addr.to_string()]);
    // Only the first request went to the follower (the routing lookup of the keyspace, made on
    // its first use); the client then stayed with the leader. That a write redirected by a hint
    // keeps its session is shown in `routing_fake.rs`.
    assert_eq!(
        follower.seen(),
        [Seen::AdminCall(AdminCall::DescribeKeyspace("default".into()))]
    );
    let on_leader = kv(leader.seen());
    assert_eq!(on_leader.len(), 3, "{on_leader:?}");
    assert_eq!(sessions(&on_leader).len(), 2);
}

#[tokio::test]
async fn admin_calls_follow_hints_too() {
    let (leader, _, follower, follower_addr) = leader_and_follower().await;
    let client = client(&[follower_addr]).await;
    let status = client.cluster_status().await.expect("cluster status");
    assert_eq!(status.leader_id, 2);
    client.add_member(3, "127.0.0.1:9").await.expect("add member");
    client.remove_member(3).await.expect("remove member");
    client.transfer_leader(1).await.expect("transfer leader");
    assert_eq!(follower.seen(), [Seen::Admin("cluster_status")]);
    assert_eq!(
        leader.seen(),
        [
            Seen::Admin("cluster_status"),
            Seen::Admin("add_member"),
            Seen::Admin("remove_member"),
            Seen::Admin("transfer_leader")
        ]
    );
}

#[tokio::test]
async fn a_retried_write_carries_the_same_session_sequence() {
    let node = FakeNode::new(1, Mode::Leader);
    node.fail_writes.store(1, Ordering::SeqCst);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;

    client.put("k", "v1").await.expect("put succeeds on retry");
    let s = sessions(&node.seen());
    assert_eq!(s.len(), 2, "one failed attempt, one retry: {s:?}");
    assert_ne!(s[0].client_id, 0);
    assert_eq!(s[0], s[1], "the retry must be the same write");
    assert_eq!(
        (s[0].client_id, s[0].sequence, s[0].acked_through),
        (client.client_id(), 1, 0)
    );
    assert_eq!(client.acked_through(), 1);

    // The next write is numbered 2 and acknowledges write 1; its retry is again identical.
    node.fail_writes.store(1, Ordering::SeqCst);
    let cas = client
        .compare_and_swap("k", Expect::Value("v1".into()), "v2")
        .await
        .expect("cas succeeds on retry");
    assert!(cas.succeeded);
    assert_eq!(cas.current, Some(Bytes::from("v1")));
    let s = sessions(&node.seen());
    assert_eq!(s.len(), 4);
    assert_eq!(s[2], s[3]);
    assert_eq!((s[2].sequence, s[2].acked_through), (2, 1));
    assert_eq!(client.acked_through(), 2);
}

#[tokio::test]
async fn concurrent_writes_get_distinct_sequences_and_full_acknowledgement() {
    let node = FakeNode::new(1, Mode::Leader);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.put(format!("k{i}"), "v").await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task ran").expect("put");
    }
    let s = sessions(&node.seen());
    let mut seqs: Vec<u64> = s.iter().map(|s| s.sequence).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=64).collect::<Vec<_>>());
    for session in &s {
        assert_eq!(session.client_id, client.client_id());
        assert!(session.acked_through < session.sequence, "{session:?}");
    }
    assert_eq!(client.acked_through(), 64);
}

#[tokio::test]
async fn definite_errors_are_typed_and_not_retried() {
    let node = FakeNode::new(
        1,
        Mode::RejectWrites(|| {
            status_with_detail(
                "bad key",
                ErrorKind::InvalidArgument(InvalidArgument {
                    field: "key".into(),
                    reason: "must not be empty".into(),
                }),
            )
        }),
    );
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;
    let err = client.put("", "v").await.expect_err("rejected");
    assert_eq!(
        err,
        ClientError::InvalidArgument {
            field: "key".into(),
            reason: "must not be empty".into()
        }
    );
    assert_eq!(kv(node.seen()).len(), 1);
    // A definite error still finishes the write's sequence.
    assert_eq!(client.acked_through(), 1);

    let node = FakeNode::new(
        1,
        Mode::RejectWrites(|| {
            status_with_detail(
                "expired",
                ErrorKind::SessionExpired(SessionExpired {
                    client_id: 1,
                    sequence: 1,
                }),
            )
        }),
    );
    let addr = start(Arc::clone(&node)).await;
    let client = self::client(&[addr]).await;
    assert_eq!(client.delete("k").await, Err(ClientError::SessionExpired));
    assert_eq!(kv(node.seen()).len(), 1);
}

#[tokio::test]
async fn an_unreachable_cluster_ends_at_the_deadline() {
    // A port that was just bound and released has no listener: connections are refused.
    let (listener, dead) = bind().await;
    drop(listener);
    let mut cfg = config(&[dead]);
    cfg.deadline = Duration::from_millis(300);
    let client = Client::connect(cfg).await.expect("valid config");
    let started = Instant::now();
    let err = client.get("k").await.expect_err("nobody is listening");
    let elapsed = started.elapsed();
    match err {
        ClientError::DeadlineExceeded { after, last_error } => {
            assert!(after >= Duration::from_millis(300), "{after:?}");
            assert!(last_error.contains(&dead.to_string()), "{last_error}");
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn a_dead_seed_is_skipped_for_a_live_one() {
    let (listener, dead) = bind().await;
    drop(listener);
    let node = FakeNode::new(7, Mode::Leader);
    let live = start(Arc::clone(&node)).await;
    let client = client(&[dead, live]).await;
    client.put("k", "v").await.expect("served by the live node");
    assert_eq!(client.leader_hint(), Some(7));
    assert_eq!(sessions(&node.seen()).len(), 1);
}

#[tokio::test]
async fn scan_sends_bounds_and_limit_as_documented() {
    let node = FakeNode::new(1, Mode::Leader);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;
    for k in ["a", "b", "c"] {
        client.put(k, format!("{k}!")).await.expect("put");
    }
    let page = client.scan("a", None, 0).await.expect("scan");
    assert_eq!(
        page.kvs,
        [
            (Bytes::from("a"), Bytes::from("a!")),
            (Bytes::from("b"), Bytes::from("b!"))
        ]
    );
    assert!(page.more);
    let page = client.scan("b", Some(Bytes::from("c")), 5).await.expect("scan");
    assert_eq!(page.kvs, [(Bytes::from("b"), Bytes::from("b!"))]);
    assert!(!page.more);
    // An empty range is answered locally; an inverted one is rejected locally.
    assert!(client
        .scan("b", Some(Bytes::from("b")), 0)
        .await
        .expect("empty")
        .kvs
        .is_empty());
    assert!(matches!(
        client.scan("b", Some(Bytes::from("a")), 0).await,
        Err(ClientError::InvalidArgument { .. })
    ));
    assert_eq!(
        node.scans(),
        [
            Seen::Scan {
                start: "a".into(),
                end: Bytes::new(),
                limit: 0,
                cursor: Bytes::new()
            },
            Seen::Scan {
                start: "b".into(),
                end: "c".into(),
                limit: 5,
                cursor: Bytes::new()
            }
        ]
    );
}

async fn ctl(client: &Client, args: &[&str]) -> Result<(String, u8), CliError> {
    let cli = Cli::try_parse_from(std::iter::once("basaltctl").chain(args.iter().copied()))
        .expect("test command lines are valid");
    execute(client, &cli).await.map(|out| (out.stdout, out.code))
}

#[tokio::test]
async fn basaltctl_commands_against_a_fake_node() {
    let node = FakeNode::new(1, Mode::Leader);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;

    assert_eq!(
        ctl(&client, &["put", "user/1", "ann"]).await.expect("put"),
        ("OK\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["get", "user/1"]).await.expect("get"),
        ("ann\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["get", "--hex", "user/1"]).await.expect("get"),
        ("616e6e\n".into(), EXIT_OK)
    );
    let missing = ctl(&client, &["get", "user/9"]).await.expect_err("missing key");
    assert_eq!(missing.to_string(), "key not found: user/9");
    assert_eq!(missing.exit_code(), EXIT_NEGATIVE);

    assert_eq!(
        ctl(&client, &["cas", "user/1", "--expect", "bob", "carl"])
            .await
            .expect("cas"),
        ("not swapped: current value is ann\n".into(), EXIT_NEGATIVE)
    );
    assert_eq!(
        ctl(&client, &["cas", "user/2", "--expect", "bob", "carl"])
            .await
            .expect("cas"),
        ("not swapped: key is absent\n".into(), EXIT_NEGATIVE)
    );
    assert_eq!(
        ctl(&client, &["cas", "user/2", "--expect-absent", "bea"])
            .await
            .expect("cas"),
        ("swapped\n".into(), EXIT_OK)
    );
    for (k, v) in [("user/3", "cid"), ("user/4", "dan"), ("users", "x"), ("user0", "y")] {
        client.put(k, v).await.expect("put");
    }
    // Four keys under the prefix, served two per page: paging must neither skip nor repeat.
    assert_eq!(
        ctl(&client, &["scan", "--prefix", "user/"]).await.expect("scan"),
        ("user/1\tann\nuser/2\tbea\nuser/3\tcid\nuser/4\tdan\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["scan", "user/2", "user/4", "--limit", "5"])
            .await
            .expect("scan"),
        ("user/2\tbea\nuser/3\tcid\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["scan", "--limit", "3"]).await.expect("scan"),
        ("user/1\tann\nuser/2\tbea\nuser/3\tcid\n".into(), EXIT_OK)
    );

    assert_eq!(
        ctl(&client, &["del", "user/1"]).await.expect("del"),
        ("deleted\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["del", "user/1"]).await.expect("del"),
        ("not found\n".into(), EXIT_NEGATIVE)
    );

    let (json, code) = ctl(&client, &["cluster", "status", "-o", "json"])
        .await
        .expect("status");
    assert_eq!(code, EXIT_OK);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json output");
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["members"][0]["role"], "leader");
    assert_eq!(v["placement"]["nodes"][0]["leaders"], 2);
    assert_eq!(v["placement"]["steps"][0]["kind"], "move");
    assert_eq!(v["placement"]["steps"][0]["state"], "running");
    let (table, code) = ctl(&client, &["cluster", "status"]).await.expect("status");
    assert_eq!(code, EXIT_OK);
    assert!(table.contains("placement driver on node 1\n"), "{table}");
    assert!(
        table.contains("move  7      2     4   running  node 2 was removed from the cluster"),
        "{table}"
    );
    assert_eq!(
        ctl(&client, &["member", "add", "4", "10.0.0.4:7379"])
            .await
            .expect("add"),
        ("added member 4 at 10.0.0.4:7379\n".into(), EXIT_OK)
    );
}

#[tokio::test]
async fn a_member_add_that_runs_out_of_time_says_how_to_finish_it() {
    let node = FakeNode::new(1, Mode::StallAddMember);
    let addr = start(Arc::clone(&node)).await;
    let mut cfg = config(&[addr]);
    cfg.deadline = Duration::from_millis(300);
    let client = Client::connect(cfg).await.expect("valid config");
    let err = ctl(&client, &["member", "add", "4", "10.0.0.4:7379"])
        .await
        .expect_err("the leader never answers");
    assert!(matches!(err, CliError::MemberAddUnfinished { id: 4, .. }), "{err:?}");
    assert_eq!(err.exit_code(), EXIT_FAILURE);
    let message = err.to_string();
    assert!(message.contains("deadline exceeded"), "{message}");
    assert!(message.contains("basaltctl member add 4 10.0.0.4:7379"), "{message}");
    // Other failures of other commands keep their own message.
    let err = ctl(&client, &["member", "remove", "4"]).await;
    assert!(!matches!(err, Err(CliError::MemberAddUnfinished { .. })), "{err:?}");
}

fn pairs(kvs: &[(Bytes, Bytes)]) -> Vec<(&str, &str)> {
    kvs.iter()
        .map(|(k, v)| {
            (
                std::str::from_utf8(k).expect("test keys are UTF-8"),
                std::str::from_utf8(v).expect("test values are UTF-8"),
            )
        })
        .collect()
}

#[tokio::test]
async fn wrong_shard_answers_are_retried_transparently() {
    let node = FakeNode::new(1, Mode::Leader);
    node.wrong_shard.store(2, Ordering::SeqCst);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;

    client
        .put("k", "v")
        .await
        .expect("put succeeds after two WrongShard answers");
    let s = sessions(&node.seen());
    assert_eq!(s.len(), 3, "two answered WrongShard, the third was served: {s:?}");
    assert!(s.iter().all(|x| *x == s[0]), "every attempt is the same write: {s:?}");
    assert_eq!(client.acked_through(), 1);

    node.wrong_shard.store(1, Ordering::SeqCst);
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from("v")));
    node.wrong_shard.store(1, Ordering::SeqCst);
    let page = client.scan("", None, 0).await.expect("scan");
    assert_eq!(pairs(&page.kvs), [("k", "v")]);
}

#[tokio::test]
async fn wrong_shard_leads_to_a_replica_the_seeds_do_not_list() {
    let replica = FakeNode::new(5, Mode::Leader);
    let replica_addr = start(Arc::clone(&replica)).await;
    let outsider = FakeNode::new(
        1,
        Mode::NoReplica {
            replica_addr: replica_addr.to_string(),
        },
    );
    let outsider_addr = start(Arc::clone(&outsider)).await;
    let client = client(&[outsider_addr]).await;

    client.put("k", "v").await.expect("put reaches the replica");
    assert_eq!(client.get("k").await.expect("get"), Some(Bytes::from("v")));
    assert_eq!(
        client.endpoints(),
        [outsider_addr.to_string(), replica_addr.to_string()]
    );
    // Only the first request went to the node without a replica; the client then stayed put.
    assert_eq!(kv(outsider.seen()).len(), 1);
    assert_eq!(kv(replica.seen()).len(), 2);
    assert_eq!(sessions(&outsider.seen()), sessions(&replica.seen()));
}

#[tokio::test]
async fn wrong_shard_until_the_deadline_reports_that_routing_kept_failing() {
    let node = FakeNode::new(
        1,
        Mode::NoReplica {
            replica_addr: String::new(),
        },
    );
    let addr = start(Arc::clone(&node)).await;
    let mut cfg = config(&[addr]);
    cfg.deadline = Duration::from_millis(300);
    let client = Client::connect(cfg)
        .await
        .expect("valid config")
        .with_keyspace("orders");
    let started = Instant::now();
    let err = client.get("k").await.expect_err("no node serves the shard");
    match &err {
        ClientError::DeadlineExceeded { after, last_error } => {
            assert!(*after >= Duration::from_millis(300), "{after:?}");
            assert!(last_error.contains("routing kept failing"), "{last_error}");
            assert!(last_error.contains("\"orders\""), "{last_error}");
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(err.to_string().contains("routing kept failing"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert!(
        node.seen().len() > 2,
        "retried until the deadline: {:?}",
        node.seen().len()
    );
}

/// A range keyspace in three shards, `[..c)`, `[c..f)` (empty) and `[f..)`, with five keys.
async fn ranged() -> (Arc<FakeNode>, Client) {
    let node = FakeNode::new(1, Mode::Leader);
    node.add_keyspace("ranged", Sharding::Range, 3, &["c", "f"]);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await.with_keyspace("ranged");
    for k in ["a", "b", "g", "h", "i"] {
        client.put(k, k.to_uppercase()).await.expect("put");
    }
    (node, client)
}

#[tokio::test]
async fn scan_follows_cursors_across_shards_and_an_empty_one() {
    let (node, client) = ranged().await;
    let page = client.scan("", None, 10).await.expect("scan");
    assert_eq!(
        pairs(&page.kvs),
        [("a", "A"), ("b", "B"), ("g", "G"), ("h", "H"), ("i", "I")]
    );
    assert!(!page.more);
    assert_eq!(page.cursor, None);

    let scans = node.scans();
    // Shard 1 with a,b; shard 2 (empty, more=true); shard 3 in two pages of at most PAGE_MAX.
    assert_eq!(scans.len(), 4, "{scans:?}");
    let mut previous_cursor: Option<Bytes> = None;
    for (i, (seen, want_limit)) in scans.iter().zip([10, 8, 8, 6]).enumerate() {
        let Seen::Scan {
            start,
            end,
            limit,
            cursor,
        } = seen
        else {
            unreachable!("filtered to scans")
        };
        assert!(
            start.is_empty() && end.is_empty(),
            "the range is resent unchanged: {seen:?}"
        );
        assert_eq!(*limit, want_limit, "request {i} asks for what is still wanted");
        assert_eq!(
            cursor.is_empty(),
            i == 0,
            "only the first request has no cursor: {seen:?}"
        );
        assert_ne!(Some(cursor), previous_cursor.as_ref(), "the cursor moves on: {seen:?}");
        previous_cursor = Some(cursor.clone());
    }
}

#[tokio::test]
async fn scan_respects_the_limit_and_can_be_continued() {
    let (node, client) = ranged().await;
    let page = client.scan("", None, 3).await.expect("scan");
    assert_eq!(pairs(&page.kvs), [("a", "A"), ("b", "B"), ("g", "G")]);
    assert!(page.more);
    let cursor = page.cursor.clone().expect("a cursor to continue from");

    // Continuing from the cursor, with the same range.
    let rest = client
        .scan_from_cursor("", None, 10, Some(cursor.clone()))
        .await
        .expect("continue");
    assert_eq!(pairs(&rest.kvs), [("h", "H"), ("i", "I")]);
    assert!(!rest.more);
    assert_eq!(
        node.scans().last(),
        Some(&Seen::Scan {
            start: Bytes::new(),
            end: Bytes::new(),
            limit: 10,
            cursor
        })
    );

    // In a range keyspace, a fresh scan after the last key continues just as well.
    let rest = client.scan("g\0", None, 10).await.expect("restart after g");
    assert_eq!(pairs(&rest.kvs), [("h", "H"), ("i", "I")]);

    // Limit 0 is one server page: the empty shard is crossed, then the first page with pairs.
    let page = client.scan("c", None, 0).await.expect("scan from the empty shard");
    assert_eq!(pairs(&page.kvs), [("g", "G"), ("h", "H")]);
    assert!(page.more && page.cursor.is_some());

    // The end bound holds across shards, and no shard past it is asked.
    let before = node.scans().len();
    let page = client
        .scan("b", Some(Bytes::from("h")), 10)
        .await
        .expect("bounded scan");
    assert_eq!(pairs(&page.kvs), [("b", "B"), ("g", "G")]);
    assert!(!page.more);
    assert_eq!(node.scans().len() - before, 3);
}

#[tokio::test]
async fn a_scan_whose_cursor_never_moves_fails_fast() {
    let node = FakeNode::new(1, Mode::Leader);
    node.stuck_scan.store(true, Ordering::SeqCst);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;
    let started = Instant::now();
    let err = client.scan("", None, 10).await.expect_err("no progress");
    assert!(
        matches!(&err, ClientError::Server { code: Code::Internal, message } if message.contains("protocol violation")),
        "{err:?}"
    );
    assert_eq!(
        node.scans().len(),
        2,
        "one request to get the cursor, one to see it stuck"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn keyspace_is_sent_on_every_kv_request() {
    let node = FakeNode::new(1, Mode::Leader);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;
    let created = client
        .create_keyspace("blue", Sharding::Hash, 4, 0)
        .await
        .expect("create");
    assert_eq!((created.name.as_str(), created.initial_shards), ("blue", 4));
    assert_eq!(Sharding::from_wire(created.sharding), Some(Sharding::Hash));

    let blue = client.with_keyspace("blue");
    assert_eq!(blue.keyspace(), "blue");
    node.fail_writes.store(1, Ordering::SeqCst);
    blue.put("k", "1").await.expect("put (retried once)");
    assert_eq!(blue.get("k").await.expect("get"), Some(Bytes::from("1")));
    let cas = blue
        .compare_and_swap("k", Expect::Value("1".into()), "2")
        .await
        .expect("cas");
    assert!(cas.succeeded);
    assert_eq!(pairs(&blue.scan("", None, 0).await.expect("scan").kvs), [("k", "2")]);
    // The keyspaces are separate: the default one does not have the key.
    assert_eq!(client.get("k").await.expect("get"), None);
    assert!(blue.delete("k").await.expect("delete"));

    let sent = node.kv_keyspaces.lock().clone();
    // The put was sent twice (a retry); the scan made one request per shard it crossed.
    assert_eq!(sent.iter().filter(|(op, _)| *op == "put").count(), 2, "{sent:?}");
    let mut sent = sent;
    sent.dedup();
    let want: Vec<(&str, String)> = [
        ("put", "blue"),
        ("get", "blue"),
        ("cas", "blue"),
        ("scan", "blue"),
        ("get", "default"),
        ("delete", "blue"),
    ]
    .into_iter()
    .map(|(op, ks)| (op, ks.to_owned()))
    .collect();
    assert_eq!(sent, want);
    // Both handles share one write session.
    let s = sessions(&node.seen());
    assert!(s.iter().all(|x| x.client_id == client.client_id()), "{s:?}");
    assert_eq!(blue.acked_through(), client.acked_through());

    // An unknown keyspace is the server's definite answer, not retried. (Its routing lookup
    // fails the same way first; the request is then sent by rotation.)
    let before = kv(node.seen()).len();
    let lookups_before = node.admin_calls().len();
    let err = client
        .with_keyspace("nope")
        .get("k")
        .await
        .expect_err("no such keyspace");
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: Code::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(kv(node.seen()).len(), before + 1);
    assert_eq!(
        node.admin_calls()[lookups_before..],
        [AdminCall::DescribeKeyspace("nope".into())]
    );
}

#[tokio::test]
async fn admin_keyspace_and_shard_calls_send_what_they_are_given() {
    let (leader, _, follower, follower_addr) = leader_and_follower().await;
    let client = client(&[follower_addr]).await;
    client
        .create_keyspace("logs", Sharding::Range, 0, 3)
        .await
        .expect("create");
    let names: Vec<String> = client
        .list_keyspaces()
        .await
        .expect("list")
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["default", "logs"]);
    let desc = client.describe_keyspace("logs").await.expect("describe");
    assert_eq!(desc.keyspace.name, "logs");
    assert_eq!(desc.shards.len(), 1);
    assert_eq!(client.list_shards(None, false).await.expect("all shards").len(), 2);
    assert_eq!(client.list_shards(Some("logs"), true).await.expect("shards").len(), 1);
    let split = client.split_shard(200, Some(Bytes::from("m"))).await.expect("split");
    assert_eq!((split.left.id, split.right.id), (200, 1200));
    assert_eq!(split.left.end_display, "m");
    client.split_shard(200, None).await.expect("split in the middle");
    let moved = client.move_shard(200, 1, 4).await.expect("move");
    assert!(moved.replicas.iter().any(|r| r.node_id == 4), "{moved:?}");
    client.transfer_shard_leader(200, 3).await.expect("transfer");
    client.drop_keyspace("logs").await.expect("drop");
    let err = client.describe_keyspace("logs").await.expect_err("dropped");
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: Code::NotFound,
                ..
            }
        ),
        "{err:?}"
    );

    // The first call followed the follower's hint; everything reached the leader as sent.
    assert_eq!(follower.admin_calls().len(), 1);
    assert_eq!(
        leader.admin_calls(),
        [
            AdminCall::CreateKeyspace(CreateKeyspaceRequest {
                name: "logs".into(),
                sharding: Sharding::Range.to_wire(),
                shards: 0,
                replicas: 3,
                default_read: None,
            }),
            AdminCall::ListKeyspaces,
            AdminCall::DescribeKeyspace("logs".into()),
            AdminCall::ListShards(ListShardsRequest {
                keyspace: String::new(),
                with_stats: false
            }),
            AdminCall::ListShards(ListShardsRequest {
                keyspace: "logs".into(),
                with_stats: true
            }),
            AdminCall::SplitShard(SplitShardRequest {
                shard_id: 200,
                at: "m".into(),
                ..Default::default()
            }),
            AdminCall::SplitShard(SplitShardRequest {
                shard_id: 200,
                at: Bytes::new(),
                ..Default::default()
            }),
            AdminCall::MoveShard(MoveShardRequest {
                shard_id: 200,
                from_node: 1,
                to_node: 4
            }),
            AdminCall::TransferShardLeader(TransferShardLeaderRequest {
                shard_id: 200,
                to_node: 3
            }),
            AdminCall::DropKeyspace("logs".into()),
            AdminCall::DescribeKeyspace("logs".into()),
        ]
    );
}

#[tokio::test]
async fn merge_shard_names_the_right_neighbour_it_found() {
    let (leader, _, follower, follower_addr) = leader_and_follower().await;
    leader.add_keyspace("blue", Sharding::Hash, 4, &[]);
    let client = client(&[follower_addr]).await;
    let merge = client.merge_shard(201).await.expect("merge");
    assert_eq!((merge.shard.id, merge.absorbed, merge.shard.epoch), (201, 202, 2));
    assert_eq!(
        (merge.shard.start_display.as_str(), merge.shard.end_display.as_str()),
        ("16384", "49152")
    );
    // The last shard has none; the server says so and the call is not retried.
    let err = client.merge_shard(202).await.expect_err("last shard");
    assert!(matches!(err, ClientError::InvalidArgument { .. }), "{err:?}");
    // An unknown shard is sent as is (no neighbour named), for the server to refuse.
    let err = client.merge_shard(999).await.expect_err("unknown shard");
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: Code::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(follower.admin_calls().len(), 1, "the first call followed the hint");
    let merges: Vec<AdminCall> = leader
        .admin_calls()
        .into_iter()
        .filter(|c| matches!(c, AdminCall::MergeShard(_)))
        .collect();
    assert_eq!(
        merges,
        [
            AdminCall::MergeShard(MergeShardRequest {
                shard_id: 201,
                right_shard_id: 202
            }),
            AdminCall::MergeShard(MergeShardRequest {
                shard_id: 202,
                right_shard_id: 0
            }),
            AdminCall::MergeShard(MergeShardRequest {
                shard_id: 999,
                right_shard_id: 0
            }),
        ]
    );
}

#[tokio::test]
async fn basaltctl_keyspace_and_shard_commands() {
    let node = FakeNode::new(1, Mode::Leader);
    let addr = start(Arc::clone(&node)).await;
    let client = client(&[addr]).await;

    assert_eq!(
        ctl(
            &client,
            &["keyspace", "create", "blue", "--sharding", "hash", "--shards", "4"]
        )
        .await
        .expect("create"),
        (
            "created keyspace blue (id 2, hash sharding, 4 shards, 3 replicas each)\n".into(),
            EXIT_OK
        )
    );
    assert_eq!(
        node.admin_calls().last(),
        Some(&AdminCall::CreateKeyspace(CreateKeyspaceRequest {
            name: "blue".into(),
            sharding: Sharding::Hash.to_wire(),
            shards: 4,
            replicas: 0,
            default_read: None,
        }))
    );
    let (json, code) = ctl(&client, &["keyspace", "list", "-o", "json"]).await.expect("list");
    assert_eq!(code, EXIT_OK);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json output");
    assert_eq!(v["keyspaces"][0]["name"], "blue");
    assert_eq!(v["keyspaces"][0]["sharding"], "hash");
    assert_eq!(v["keyspaces"][1]["name"], "default");
    let (table, _) = ctl(&client, &["keyspace", "list"]).await.expect("list");
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.starts_with("NAME "), "{table}");

    // Keys written through -k land in that keyspace only.
    let keys: Vec<String> = (0..9).map(|i| format!("key{i}")).collect();
    for k in &keys {
        assert_eq!(
            ctl(&client, &["-k", "blue", "put", k, &k.to_uppercase()])
                .await
                .expect("put"),
            ("OK\n".into(), EXIT_OK)
        );
    }
    assert_eq!(
        ctl(&client, &["--keyspace", "blue", "get", "key3"]).await.expect("get"),
        ("KEY3\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["scan"]).await.expect("scan default"),
        (String::new(), EXIT_OK)
    );
    let missing = ctl(&client, &["get", "key3"]).await.expect_err("not in default");
    assert_eq!(missing.exit_code(), EXIT_NEGATIVE);

    // A hash keyspace scans in hash order across its four shards: every key exactly once, in the
    // order only the cursor preserves (restarting after the last key would skip or repeat keys).
    let order = node
        .keyspaces
        .lock()
        .get("blue")
        .expect("created")
        .ordered_keys(b"", b"");
    assert_ne!(
        order.iter().map(|k| k.to_vec()).collect::<Vec<_>>(),
        {
            let mut sorted: Vec<Vec<u8>> = order.iter().map(|k| k.to_vec()).collect();
            sorted.sort();
            sorted
        },
        "the test needs hash order to differ from key order"
    );
    let expected: String = order
        .iter()
        .map(|k| {
            let k = std::str::from_utf8(k).expect("UTF-8 keys");
            format!("{k}\t{}\n", k.to_uppercase())
        })
        .collect();
    assert_eq!(
        ctl(&client, &["-k", "blue", "scan"]).await.expect("scan"),
        (expected.clone(), EXIT_OK)
    );
    let first_five: String = expected.lines().take(5).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        ctl(&client, &["-k", "blue", "scan", "--limit", "5"])
            .await
            .expect("scan"),
        (first_five, EXIT_OK)
    );

    let (json, _) = ctl(&client, &["keyspace", "describe", "blue", "-o", "json"])
        .await
        .expect("describe");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json output");
    assert_eq!(v["keyspace"]["name"], "blue");
    assert_eq!(v["shards"].as_array().map(Vec::len), Some(4));
    let keys_in_shards: u64 = v["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["stats"]["approximate_keys"].as_u64().expect("stats"))
        .sum();
    assert_eq!(keys_in_shards, 9);

    // shard list: every keyspace without -k, one keyspace with it.
    let (json, _) = ctl(&client, &["shard", "list", "-o", "json"]).await.expect("list");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json output");
    assert_eq!(v["shards"].as_array().map(Vec::len), Some(5));
    assert!(v["shards"][0].get("stats").is_none());
    let (table, code) = ctl(&client, &["shard", "list", "-k", "blue", "--stats"])
        .await
        .expect("list");
    assert_eq!(code, EXIT_OK);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows[0],
        ["ID", "KEYSPACE", "RANGE", "EPOCH", "REPLICAS", "LEADER", "STATE", "APPLIED", "BYTES", "KEYS"],
        "{table}"
    );
    let shard_cells: Vec<[&str; 3]> = rows[1..].iter().map(|r| [r[0], r[1], r[2]]).collect();
    assert_eq!(
        shard_cells,
        [
            ["200", "blue", "..16384"],
            ["201", "blue", "16384..32768"],
            ["202", "blue", "32768..49152"],
            ["203", "blue", "49152.."]
        ],
        "{table}"
    );
    let keys_column: u64 = rows[1..].iter().map(|r| r[9].parse::<u64>().expect("a count")).sum();
    assert_eq!(keys_column, 9, "{table}");
    let lists: Vec<ListShardsRequest> = node
        .admin_calls()
        .into_iter()
        .filter_map(|c| match c {
            AdminCall::ListShards(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(
        lists,
        [
            ListShardsRequest {
                keyspace: String::new(),
                with_stats: false
            },
            ListShardsRequest {
                keyspace: "blue".into(),
                with_stats: true
            }
        ]
    );

    assert_eq!(
        ctl(&client, &["shard", "split", "7", "--at", "m"])
            .await
            .expect("split"),
        ("split shard 7 into 7 (..m) and 1007 (m..)\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["shard", "move", "7", "--from", "1", "--to", "4"])
            .await
            .expect("move"),
        (
            "moved shard 7 from node 1 to node 4; replicas 2,3,4 (epoch 2)\n".into(),
            EXIT_OK
        )
    );
    assert_eq!(
        ctl(&client, &["shard", "leader-transfer", "7", "--to", "2"])
            .await
            .expect("transfer"),
        ("leader transfer of shard 7 to 2 accepted\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["leader", "transfer", "3", "--shard", "7"])
            .await
            .expect("transfer"),
        ("leader transfer of shard 7 to 3 accepted\n".into(), EXIT_OK)
    );
    assert_eq!(
        ctl(&client, &["leader", "transfer", "3"]).await.expect("transfer"),
        ("leader transfer to 3 accepted\n".into(), EXIT_OK)
    );
    let calls = node.admin_calls();
    assert_eq!(
        calls[calls.len() - 4..],
        [
            AdminCall::SplitShard(SplitShardRequest {
                shard_id: 7,
                at: "m".into(),
                ..Default::default()
            }),
            AdminCall::MoveShard(MoveShardRequest {
                shard_id: 7,
                from_node: 1,
                to_node: 4
            }),
            AdminCall::TransferShardLeader(TransferShardLeaderRequest {
                shard_id: 7,
                to_node: 2
            }),
            AdminCall::TransferShardLeader(TransferShardLeaderRequest {
                shard_id: 7,
                to_node: 3
            }),
        ]
    );
    assert_eq!(node.seen().last(), Some(&Seen::Admin("transfer_leader")));

    assert_eq!(
        ctl(&client, &["shard", "merge", "201"]).await.expect("merge"),
        (
            "merged shard 202 into 201; 201 now covers 16384..49152 (epoch 2)\n".into(),
            EXIT_OK
        )
    );
    let (json, code) = ctl(&client, &["shard", "merge", "201", "-o", "json"])
        .await
        .expect("merge");
    assert_eq!(code, EXIT_OK);
    let v: serde_json::Value = serde_json::from_str(&json).expect("output is JSON");
    assert_eq!(
        (v["absorbed"].as_u64(), v["shard"]["id"].as_u64()),
        (Some(202), Some(201))
    );
    assert_eq!(
        (v["shard"]["start"].as_str(), v["shard"]["end"].as_str()),
        (Some("16384"), Some(""))
    );
    let merges: Vec<MergeShardRequest> = node
        .admin_calls()
        .into_iter()
        .filter_map(|c| match c {
            AdminCall::MergeShard(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(
        merges,
        [
            MergeShardRequest {
                shard_id: 201,
                right_shard_id: 202
            },
            MergeShardRequest {
                shard_id: 201,
                right_shard_id: 202
            }
        ]
    );
    let err = ctl(&client, &["shard", "merge", "201"])
        .await
        .expect_err("no neighbour");
    assert_eq!(err.exit_code(), EXIT_USAGE, "the server refused the request itself");

    assert_eq!(
        ctl(&client, &["keyspace", "drop", "blue"]).await.expect("drop"),
        ("dropped keyspace blue\n".into(), EXIT_OK)
    );
    let err = ctl(&client, &["keyspace", "describe", "blue"])
        .await
        .expect_err("dropped");
    assert_eq!(err.exit_code(), EXIT_FAILURE);
    let err = ctl(&client, &["-k", "blue", "get", "key1"]).await.expect_err("dropped");
    assert_eq!(err.exit_code(), EXIT_FAILURE);
}
