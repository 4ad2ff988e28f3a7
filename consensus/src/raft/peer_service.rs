//! The incoming half of the peer transport: the `RaftPeer` gRPC service.
//!
//! One service per node serves every group hosted there; it looks the group up by the id each
//! message carries. Checks before anything reaches openraft: the payload checksum, the encoding,
//! and for snapshots the order and checksum of every chunk and then the whole file's own record
//! checksums. A failed check is answered with an error (the sender retries); it never reaches the
//! state machine.
//!
//! Hibernation (see [`super::hibernation`]) hooks in here: every Raft message lets a sleeping
//! replica check whether it must wake, a sleeping follower whose leader is confirmed alive
//! refuses votes, and the node-level liveness exchange is served here.

use std::collections::HashMap;
use std::sync::Arc;

use basalt_proto::v1::raft_peer_server::RaftPeer;
use basalt_proto::v1::{NodeStatusRequest, NodeStatusResponse, RaftMessage, Role as PbRole, SnapshotChunk};
use futures::StreamExt;
use parking_lot::RwLock;
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status, Streaming};

use openraft::raft::{TransferLeaderRequest, VoteRequest};
use prost::Message as _;

use super::frames::ReplicationCodec;
use super::hibernation::{Hibernation, LivenessRequest};
use super::network::{AppendIn, RemoteResult};
use super::types::{Snapshot, SnapshotFile, SnapshotMeta, TypeConfig, Vote};
use super::wire;
use super::RaftGroup;
use crate::{ConsensusMetrics, PeerKind, Replication, Role};

/// The groups hosted on this node, by id.
#[derive(Clone, Default)]
pub struct GroupRegistry {
    groups: Arc<RwLock<HashMap<u64, Arc<RaftGroup>>>>,
}

impl GroupRegistry {
    pub fn insert(&self, group: Arc<RaftGroup>) {
        self.groups.write().insert(group.group_id(), group);
    }

    /// Stops routing to group `id` (its replica is closing); peers get "not hosted" until a new
    /// replica is inserted.
    pub fn remove(&self, id: u64) -> Option<Arc<RaftGroup>> {
        self.groups.write().remove(&id)
    }

    pub fn get(&self, id: u64) -> Option<Arc<RaftGroup>> {
        self.groups.read().get(&id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<RaftGroup>> {
        self.groups.read().values().cloned().collect()
    }
}

pub struct PeerService {
    node_id: u64,
    registry: GroupRegistry,
    metrics: ConsensusMetrics,
    hibernation: Option<Arc<Hibernation>>,
    codec: ReplicationCodec,
}

impl PeerService {
    /// Why a snapshot of `group` serving `shard` must not be installed here, if it must not.
    ///
    /// All local replicas write one engine, so installing a snapshot writes its whole range. A
    /// range another local replica serves at the same or a newer epoch is that replica's: a
    /// snapshot taken before a split (the parent's, arriving at a node that already holds a
    /// child moved to it) would overwrite newer data there, and the parent would go on applying
    /// pre-split writes into it. An older replica that the snapshot's range covers is a
    /// neighbour this group absorbed, which the install claims (see `ClaimHook`); an older one
    /// reaching beyond it is a parent that has not applied its split here yet, whose data the
    /// snapshot would tear. Either conflict is refused: the sender retries, and a snapshot
    /// built after the split, or this node catching up, removes the overlap.
    fn overlap_conflict(&self, group: u64, shard: &basalt_storage::ShardState) -> Option<String> {
        self.registry.all().into_iter().find_map(|g| {
            let local = g.reader().shard();
            (g.group_id() != group && snapshot_would_tear(&local, shard)).then(|| {
                format!(
                    "snapshot of group {group} (epoch {}) overlaps local group {} (epoch {}), which serves part of its range; retry with a newer snapshot",
                    shard.epoch,
                    g.group_id(),
                    local.epoch
                )
            })
        })
    }

    /// The service of node `node_id`, whose groups do not hibernate.
    pub fn new(node_id: u64, registry: GroupRegistry, metrics: ConsensusMetrics) -> Self {
        Self {
            node_id,
            registry,
            metrics,
            hibernation: None,
            codec: ReplicationCodec::default(),
        }
    }

    /// Unframes replication traffic with `codec` (the node's, shared with its `PeerClients`).
    pub fn with_codec(mut self, codec: ReplicationCodec) -> Self {
        self.codec = codec;
        self
    }

    /// Serves the liveness exchange of `h` (the node's groups hibernate).
    pub fn with_hibernation(mut self, h: Arc<Hibernation>) -> Self {
        self.hibernation = Some(h);
        self
    }

    /// Handles one request-reply Raft RPC for its group, counting its traffic and letting a
    /// sleeping replica check whether the message woke it.
    async fn serve<T, R, E, F, Fut>(
        &self,
        kind: impl FnOnce(&T) -> PeerKind,
        what: &'static str,
        req: Request<RaftMessage>,
        handle: F,
    ) -> Result<Response<RaftMessage>, Status>
    where
        T: DeserializeOwned,
        R: Serialize,
        E: std::fmt::Display,
        F: FnOnce(Arc<RaftGroup>, T) -> Fut,
        Fut: std::future::Future<Output = Result<R, E>>,
    {
        let msg = req.into_inner();
        let size = msg.encoded_len();
        let (g, rpc) = self.open::<T>(what, &msg)?;
        let kind = kind(&rpc);
        let r = handle(g.clone(), rpc).await;
        g.after_message();
        let reply = Self::reply(msg.group_id, what, r)?;
        self.metrics.rpc_served(kind, size, reply.get_ref().encoded_len());
        Ok(reply)
    }

    /// A vote or pre-vote: refused on the spot by a sleeping follower whose leader is confirmed
    /// alive, otherwise handled by openraft.
    async fn serve_vote(
        &self,
        kind: PeerKind,
        what: &'static str,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let timeout = self.hibernation.as_ref().map(|h| h.config().liveness_timeout);
        self.serve(
            |_: &VoteRequest<TypeConfig>| kind,
            what,
            req,
            |g, rpc| async move {
                if let Some(refusal) = timeout.and_then(|t| g.refuse_vote(&rpc, t)) {
                    return Ok(refusal);
                }
                match kind {
                    PeerKind::PreVote => g.raft().pre_vote(rpc).await,
                    _ => g.raft().vote(rpc).await,
                }
            },
        )
        .await
    }

    fn group(&self, id: u64) -> Result<Arc<RaftGroup>, Status> {
        self.registry
            .get(id)
            .ok_or_else(|| Status::not_found(format!("group {id} is not hosted on this node")))
    }

    /// Verifies and decodes a request (unframing it first if it is framed), looks up its group.
    fn open<T: DeserializeOwned>(&self, what: &'static str, msg: &RaftMessage) -> Result<(Arc<RaftGroup>, T), Status> {
        let group = self.group(msg.group_id)?;
        let corrupt = |e: String| {
            group.metrics().corrupt_messages.inc();
            Status::data_loss(e)
        };
        let decoded = if msg.framed {
            let plain = self
                .codec
                .decode(&msg.payload, &self.metrics)
                .map_err(|e| corrupt(format!("{what}: {e}")))?;
            wire::decode::<T>(what, &plain)
        } else {
            wire::verify_crc(what, &[&msg.payload], msg.crc32).and_then(|()| wire::decode::<T>(what, &msg.payload))
        };
        match decoded {
            Ok(v) => Ok((group, v)),
            Err(e) => Err(corrupt(e.to_string())),
        }
    }

    fn reply<T: Serialize, E: std::fmt::Display>(
        group: u64,
        what: &'static str,
        r: Result<T, E>,
    ) -> Result<Response<RaftMessage>, Status> {
        let r: RemoteResult<T> = r.map_err(|e| e.to_string());
        let payload = wire::encode(what, &r).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage {
            group_id: group,
            crc32: wire::crc(&[&payload]),
            payload: payload.into(),
            framed: false,
        }))
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.serve(
            |m: &AppendIn| {
                if m.rpc.entries.is_empty() {
                    PeerKind::Heartbeat
                } else {
                    PeerKind::Append
                }
            },
            "append entries",
            req,
            |g, m| async move {
                let r = g.raft().append_entries(m.rpc).await;
                // A claim counts only from a message this replica accepted from its leader.
                if let (Ok(resp), Some(c)) = (&r, m.closed) {
                    if resp.is_success() {
                        g.observe_closed(c);
                    }
                }
                r
            },
        )
        .await
    }

    async fn read_index(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.serve(
            |_: &()| PeerKind::ReadIndex,
            "read index",
            req,
            |g, ()| async move { g.leader_read_index().await },
        )
        .await
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.serve_vote(PeerKind::Vote, "vote", req).await
    }

    async fn pre_vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.serve_vote(PeerKind::PreVote, "pre-vote", req).await
    }

    async fn transfer_leader(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.serve(
            |_: &TransferLeaderRequest<TypeConfig>| PeerKind::TransferLeader,
            "transfer leader",
            req,
            |g, rpc| async move { g.raft().handle_transfer_leader(rpc).await },
        )
        .await
    }

    async fn node_liveness(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = req.into_inner();
        let size = msg.encoded_len();
        let decoded = wire::verify_crc("liveness", &[&msg.payload], msg.crc32)
            .and_then(|()| wire::decode::<LivenessRequest>("liveness", &msg.payload));
        let request = match decoded {
            Ok(r) => r,
            Err(e) => {
                self.metrics.corrupt_messages.inc();
                return Err(Status::data_loss(e.to_string()));
            }
        };
        let answer = match &self.hibernation {
            Some(h) => h.on_request(request),
            None => Hibernation::refuse_all(self.node_id, request),
        };
        let reply = Self::reply(0, "liveness reply", Ok::<_, String>(answer))?;
        self.metrics
            .rpc_served(PeerKind::Liveness, size, reply.get_ref().encoded_len());
        Ok(reply)
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftMessage>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let mut size = first.encoded_len();
        let group = self.group(first.group_id)?;
        let group_id = first.group_id;
        let (vote, meta): (Vote, SnapshotMeta) = {
            verify_chunk(&first)
                .and_then(|()| wire::decode("snapshot meta", &first.meta))
                .map_err(|e| {
                    group.metrics().snapshot_event("receive_rejected");
                    Status::data_loss(e.to_string())
                })?
        };
        let path = group.snapshot_dir().temp_path("incoming");
        let received = receive_chunks(
            &path,
            group_id,
            first,
            &mut stream,
            &mut size,
            (&self.codec, &self.metrics),
        )
        .await;
        if let Err(st) = received {
            remove_quietly(&path).await;
            group.metrics().snapshot_event("receive_rejected");
            return Err(st);
        }
        // Verify the file's own record checksums before openraft sees it: a bad file must cost a
        // retry, not a replica.
        let p = path.clone();
        let verified = super::blocking::run(move || basalt_storage::read_snapshot_info(&p))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let info = match verified {
            Ok(info) => info,
            Err(e) => {
                remove_quietly(&path).await;
                group.metrics().snapshot_event("receive_rejected");
                return Err(Status::data_loss(format!("received snapshot is corrupt: {e}")));
            }
        };
        if let Some(conflict) = info.shard.as_ref().and_then(|s| self.overlap_conflict(group_id, s)) {
            remove_quietly(&path).await;
            group.metrics().snapshot_event("receive_rejected");
            return Err(Status::failed_precondition(conflict));
        }
        group.metrics().snapshot_event("received");
        let snapshot = Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        };
        let r = group.raft().install_full_snapshot(vote, snapshot).await;
        group.after_message();
        let reply = Self::reply(group_id, "install snapshot reply", r)?;
        self.metrics
            .rpc_served(PeerKind::Snapshot, size, reply.get_ref().encoded_len());
        Ok(reply)
    }

    async fn node_status(&self, req: Request<NodeStatusRequest>) -> Result<Response<NodeStatusResponse>, Status> {
        let g = self.group(req.into_inner().group_id)?;
        let s = g.status();
        let role = match s.role {
            Role::Leader => PbRole::Leader,
            Role::Follower => PbRole::Follower,
            Role::Candidate => PbRole::Candidate,
            Role::Learner => PbRole::Learner,
            Role::Stopped => PbRole::Unreachable,
        };
        Ok(Response::new(NodeStatusResponse {
            node_id: s.node_id,
            role: role as i32,
            term: s.term,
            applied_index: s.applied_index,
            commit_index: s.commit_index,
            leader_id: s.leader_id.unwrap_or(0),
        }))
    }
}

/// Writes the chunks of one transfer to `path`, checking each chunk's checksum and that offsets are
/// contiguous, and fsyncs the file. The stream must end with a chunk marked `done`.
async fn receive_chunks(
    path: &std::path::Path,
    group_id: u64,
    first: SnapshotChunk,
    stream: &mut Streaming<SnapshotChunk>,
    wire_bytes: &mut usize,
    (codec, metrics): (&ReplicationCodec, &ConsensusMetrics),
) -> Result<(), Status> {
    let io = |e: std::io::Error| Status::internal(format!("writing received snapshot: {e}"));
    let owned = path.to_path_buf();
    let mut file = super::blocking::run(move || std::fs::File::create(owned))
        .await
        .and_then(|r| r)
        .map_err(io)?;
    let mut expected_offset = 0u64;
    let mut chunk = first;
    loop {
        if chunk.group_id != group_id {
            return Err(Status::invalid_argument("snapshot chunk for another group"));
        }
        if chunk.offset != expected_offset {
            return Err(Status::data_loss(format!(
                "snapshot chunk at offset {} where {expected_offset} was expected",
                chunk.offset
            )));
        }
        if expected_offset > 0 {
            verify_chunk(&chunk).map_err(|e| {
                metrics.corrupt_messages.inc();
                Status::data_loss(e.to_string())
            })?;
        }
        let (data, framed) = (chunk.data.clone(), chunk.framed);
        let (c, m) = (codec.clone(), metrics.clone());
        let written = super::blocking::run(move || {
            use std::io::Write;
            let plain = if framed {
                match c.decode(&data, &m) {
                    Ok(plain) => plain,
                    Err(e) => return Ok(Err(e)),
                }
            } else {
                data.to_vec()
            };
            file.write_all(&plain).map(|()| Ok((file, plain.len())))
        })
        .await
        .and_then(|r| r)
        .map_err(io)?;
        let (f, len) = written.map_err(|e| {
            metrics.corrupt_messages.inc();
            Status::data_loss(format!("snapshot chunk at offset {expected_offset}: {e}"))
        })?;
        file = f;
        expected_offset += len as u64;
        if chunk.done {
            break;
        }
        chunk = match stream.next().await {
            Some(c) => c?,
            None => return Err(Status::data_loss("snapshot stream ended before its last chunk")),
        };
        *wire_bytes += chunk.encoded_len();
    }
    super::blocking::run(move || file.sync_all())
        .await
        .and_then(|r| r)
        .map_err(io)?;
    Ok(())
}

/// Checks a chunk's crc32: over `meta` and `data`, or `meta` alone when `data` is a framed batch
/// (which carries its own checksums, verified when it is decoded).
fn verify_chunk(chunk: &SnapshotChunk) -> Result<(), wire::WireError> {
    if chunk.framed {
        wire::verify_crc("snapshot chunk", &[&chunk.meta], chunk.crc32)
    } else {
        wire::verify_crc("snapshot chunk", &[&chunk.meta, &chunk.data], chunk.crc32)
    }
}

/// Whether installing a snapshot serving `incoming` would write over data that the local replica
/// serving `local` owns (see `PeerService::overlap_conflict`).
fn snapshot_would_tear(local: &basalt_storage::ShardState, incoming: &basalt_storage::ShardState) -> bool {
    local.keyspace == incoming.keyspace
        && local.overlaps(incoming)
        && (local.epoch >= incoming.epoch || !incoming.covers(local))
}

/// Removes a rejected incoming snapshot; a failure only leaves a temp file behind.
async fn remove_quietly(path: &std::path::Path) {
    let owned = path.to_path_buf();
    if let Ok(Err(e)) = super::blocking::run(move || std::fs::remove_file(owned)).await {
        tracing::debug!(error = %e, "could not remove a rejected snapshot file");
    }
}

#[cfg(test)]
mod tests {
    use super::snapshot_would_tear;
    use basalt_storage::ShardState;

    fn shard(start: &[u8], end: &[u8], epoch: u64) -> ShardState {
        ShardState {
            keyspace: 2,
            hashed: false,
            start: start.to_vec(),
            end: end.to_vec(),
            epoch,
            frozen: false,
        }
    }

    #[test]
    fn a_snapshot_may_not_overwrite_a_newer_or_wider_local_replica() {
        let parent_before_split = shard(b"a", b"z", 1);
        let left_after_split = shard(b"a", b"m", 2);
        let child = shard(b"m", b"z", 2);
        // The case CI found: a parent's snapshot from before its split reaches a node that
        // already holds the child (moved there): refused.
        assert!(snapshot_would_tear(&child, &parent_before_split));
        // The parent's own snapshot after the split does not touch the child's range.
        assert!(!snapshot_would_tear(&child, &left_after_split));
        // A child's snapshot reaching a node whose parent has not applied the split yet: the
        // parent would go on writing pre-split data into the child's range. Refused.
        assert!(snapshot_would_tear(&parent_before_split, &child));
        // After a merge: the merged shard's snapshot covers an absorbed neighbour at an older
        // epoch, which the install claims. Allowed.
        let merged = shard(b"a", b"z", 3);
        assert!(!snapshot_would_tear(&child, &merged));
        assert!(!snapshot_would_tear(&left_after_split, &merged));
        // Same range, same epoch, another group: never two owners.
        assert!(snapshot_would_tear(&child, &child.clone()));
        // Other keyspaces and disjoint ranges never conflict.
        let mut elsewhere = child.clone();
        elsewhere.keyspace = 3;
        assert!(!snapshot_would_tear(&elsewhere, &parent_before_split));
        assert!(!snapshot_would_tear(&shard(b"0", b"a", 9), &parent_before_split));
    }
}
