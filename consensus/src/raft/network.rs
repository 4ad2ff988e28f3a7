//! The outgoing half of the peer transport: openraft's network traits over tonic.
//!
//! One [`PeerClients`] per node holds one lazily connected HTTP/2 channel per peer address, shared
//! by every group on the node: each message names its group, so adding groups adds no connections.
//! Every payload carries a crc32; a reply that fails it is treated as a network error (openraft
//! retries), never decoded.
//!
//! Snapshots travel as a client stream of [`SnapshotChunk`]s read from the snapshot file. The first
//! chunk carries the metadata and the leader's vote; each chunk carries its offset and a checksum,
//! so the receiver can reject a corrupt, missing or duplicated chunk.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::v1::raft_peer_client::RaftPeerClient;
use basalt_proto::v1::{RaftMessage, SnapshotChunk};
use basalt_proto::Dialer;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, OptionalSend, RaftNetworkFactory, RaftNetworkV2};
use parking_lot::Mutex;
use prost::Message as _;
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::{Channel, Endpoint};

use super::closed_time::{Closed, ClosedTime};
use super::frames::ReplicationCodec;
use super::types::{NodeId, Snapshot, SnapshotFile, TypeConfig, Vote};
use super::wire;
use crate::{ConsensusMetrics, PeerKind};

/// Size of one snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// A reply as it travels back: the remote call's result, errors flattened to text (the remote
/// error types are not actionable across nodes beyond "it failed").
pub(crate) type RemoteResult<T> = Result<T, String>;

/// One channel per peer address, shared by all groups on this node.
#[derive(Clone, Default)]
pub struct PeerClients {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    dialer: Dialer,
    codec: ReplicationCodec,
}

impl PeerClients {
    /// Peers reached over TCP.
    pub fn new() -> Self {
        Self::default()
    }

    /// Peers reached through `dialer` (the simulator's network, for one).
    pub fn with_dialer(dialer: Dialer) -> Self {
        Self {
            channels: Arc::default(),
            dialer,
            codec: ReplicationCodec::default(),
        }
    }

    /// Frames replication traffic with `codec` (the node's configured backend choice).
    pub fn with_codec(mut self, codec: ReplicationCodec) -> Self {
        self.codec = codec;
        self
    }

    pub fn codec(&self) -> &ReplicationCodec {
        &self.codec
    }

    /// The shared channel to `addr`, created on first use. The server also uses it to forward
    /// client requests to the leader, so a node pair never needs a second connection.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock();
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            // A connection whose packets vanish (a silent partition, a middlebox that dropped the
            // flow) never errors by itself; pings find it within two seconds so the next RPC
            // reconnects instead of timing out on it forever.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true);
        let ch = self.dialer.channel(endpoint);
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    pub fn client(&self, addr: &str) -> Result<RaftPeerClient<Channel>, tonic::transport::Error> {
        Ok(RaftPeerClient::new(self.channel(addr)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }
}

/// Reads the next chunk (up to [`SNAPSHOT_CHUNK_BYTES`]; shorter only at the end) from `file`,
/// handing the file back so the caller can keep reading through `blocking::run`.
fn read_chunk(mut file: std::fs::File) -> std::io::Result<(std::fs::File, Vec<u8>)> {
    use std::io::Read;
    let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok((file, buf))
}

/// AppendEntries as it travels: the request, and the leader's closed timestamp when it can make
/// one (see [`super::closed_time`]); both under the message's checksum. Its postcard bytes are
/// what the replication codec frames; public so that `basalt-bench codec` measures the codec on
/// exactly these bytes rather than on a look-alike.
#[derive(Serialize)]
pub struct AppendOut<'a> {
    pub rpc: &'a AppendEntriesRequest<TypeConfig>,
    pub closed: Option<Closed>,
}

/// The receiving side of [`AppendOut`].
#[derive(serde::Deserialize)]
pub struct AppendIn {
    pub rpc: AppendEntriesRequest<TypeConfig>,
    pub closed: Option<Closed>,
}

/// Creates per-target network clients for one group.
#[derive(Clone)]
pub struct Network {
    group: u64,
    peers: PeerClients,
    metrics: ConsensusMetrics,
    closed: Arc<ClosedTime>,
    renewal: Arc<SnapshotRenewal>,
}

impl Network {
    pub fn new(
        group: u64,
        peers: PeerClients,
        metrics: ConsensusMetrics,
        closed: Arc<ClosedTime>,
        renewal: Arc<SnapshotRenewal>,
    ) -> Self {
        Self {
            group,
            peers,
            metrics,
            closed,
            renewal,
        }
    }
}

/// A leader's way to replace a snapshot that a follower refused because the data it holds is
/// newer than the snapshot (see `PeerService::overlap_conflict`): openraft resends its current
/// snapshot on every retry, and a group that receives few writes may not build another for a
/// long time, so the refusal asks for one built now.
#[derive(Default)]
pub struct SnapshotRenewal {
    rebuild: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    last: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl SnapshotRenewal {
    /// At most one rebuild per this long: every follower retry refuses again until it is built.
    const MIN_INTERVAL: Duration = Duration::from_secs(1);

    pub(crate) fn set(&self, rebuild: Box<dyn Fn() + Send + Sync>) {
        let _ = self.rebuild.set(rebuild);
    }

    fn request(&self) {
        let now = std::time::Instant::now();
        {
            let mut last = self.last.lock();
            if last.is_some_and(|l| now < l + Self::MIN_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        if let Some(rebuild) = self.rebuild.get() {
            rebuild();
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            group: self.group,
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
            metrics: self.metrics.clone(),
            closed: self.closed.clone(),
            renewal: self.renewal.clone(),
        }
    }
}

pub struct PeerConnection {
    group: u64,
    target: NodeId,
    addr: String,
    peers: PeerClients,
    metrics: ConsensusMetrics,
    closed: Arc<ClosedTime>,
    renewal: Arc<SnapshotRenewal>,
}

fn unreachable<E: std::error::Error + 'static>(e: &E) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(e))
}

fn network_err(msg: impl ToString) -> NetworkError<TypeConfig> {
    NetworkError::new(&AnyError::error(msg))
}

impl PeerConnection {
    fn client(&self) -> Result<RaftPeerClient<Channel>, RPCError<TypeConfig>> {
        self.peers.client(&self.addr).map_err(|e| unreachable(&e))
    }

    /// The request as it travels: AppendEntries with entries framed by the replication codec
    /// (see [`super::frames`]), everything else plain with a crc32.
    fn message<T: Serialize>(
        &self,
        kind: PeerKind,
        what: &'static str,
        req: &T,
    ) -> Result<RaftMessage, RPCError<TypeConfig>> {
        let payload = wire::encode(what, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if kind == PeerKind::Append {
            let framed = self
                .peers
                .codec()
                .encode(kind, &payload, &self.metrics)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            return Ok(RaftMessage {
                group_id: self.group,
                crc32: 0,
                payload: framed.into(),
                framed: true,
            });
        }
        Ok(RaftMessage {
            group_id: self.group,
            crc32: wire::crc(&[&payload]),
            payload: payload.into(),
            framed: false,
        })
    }

    fn reply<T: DeserializeOwned>(&self, what: &'static str, reply: RaftMessage) -> Result<T, RPCError<TypeConfig>> {
        let decoded = wire::verify_crc(what, &[&reply.payload], reply.crc32)
            .and_then(|()| wire::decode::<RemoteResult<T>>(what, &reply.payload));
        match decoded {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(remote)) => Err(RPCError::Network(network_err(format!(
                "node {} refused {what}: {remote}",
                self.target
            )))),
            Err(e) => {
                self.metrics.corrupt_messages.inc();
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
    }

    fn request<T>(msg: T, option: &RPCOption) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(option.hard_ttl());
        r
    }

    /// Sends one request and decodes its reply, counting the traffic by `kind`.
    async fn call<Req, Resp, F, Fut>(
        &self,
        kind: PeerKind,
        what: &'static str,
        req: &Req,
        option: &RPCOption,
        send: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftPeerClient<Channel>, tonic::Request<RaftMessage>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let msg = self.message(kind, what, req)?;
        let sent = msg.encoded_len();
        let reply = match send(self.client()?, Self::request(msg, option)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                self.metrics.rpc_sent(kind, sent, 0);
                return Err(self.map_status(s));
            }
        };
        self.metrics.rpc_sent(kind, sent, reply.encoded_len());
        self.reply(what, reply)
    }

    fn map_status(&self, s: tonic::Status) -> RPCError<TypeConfig> {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => unreachable(&s),
            _ => RPCError::Network(NetworkError::new(&s)),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let kind = if rpc.entries.is_empty() {
            PeerKind::Heartbeat
        } else {
            PeerKind::Append
        };
        let msg = AppendOut {
            rpc: &rpc,
            closed: self.closed.close(),
        };
        self.call(kind, "append entries", &msg, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(PeerKind::Vote, "vote", &rpc, &option, |mut c, r| async move {
            c.vote(r).await
        })
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(PeerKind::PreVote, "pre-vote", &rpc, &option, |mut c, r| async move {
            c.pre_vote(r).await
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            PeerKind::TransferLeader,
            "transfer leader",
            &req,
            &option,
            |mut c, r| async move { c.transfer_leader(r).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let meta = wire::encode("snapshot meta", &(vote, snapshot.meta.clone()))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let group = self.group;
        let path = snapshot.snapshot.path.clone();
        let codec = self.peers.codec().clone();
        let metrics = self.metrics.clone();
        // The reader runs beside the RPC so disk reads (and framing) overlap with the transfer.
        let reader = tokio::spawn(async move {
            let mut file = super::blocking::run(move || std::fs::File::open(path)).await??;
            let mut offset = 0u64;
            let mut wire_bytes = 0usize;
            let mut meta = Some(meta);
            loop {
                let (c, m) = (codec.clone(), metrics.clone());
                let (f, filled, framed) = super::blocking::run(move || {
                    let (f, buf) = read_chunk(file)?;
                    let framed = c
                        .encode(PeerKind::Snapshot, &buf, &m)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    Ok::<_, std::io::Error>((f, buf.len(), framed))
                })
                .await??;
                file = f;
                let done = filled < SNAPSHOT_CHUNK_BYTES;
                let m = meta.take().unwrap_or_default();
                let chunk = SnapshotChunk {
                    group_id: group,
                    crc32: wire::crc(&[&m]),
                    meta: m.into(),
                    offset,
                    data: framed.into(),
                    done,
                    framed: true,
                };
                offset += filled as u64;
                wire_bytes += chunk.encoded_len();
                if tx.send(chunk).await.is_err() || done {
                    return Ok::<usize, std::io::Error>(wire_bytes);
                }
            }
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.set_timeout(option.hard_ttl().max(Duration::from_secs(60)));
        let mut client = self.client().map_err(|e| StreamingError::Network(network_err(e)))?;
        let call = client.install_snapshot(req);
        let reply = tokio::select! {
            closed = cancel => {
                reader.abort();
                return Err(StreamingError::Closed(closed));
            }
            r = call => r,
        };
        let sent = reader.await;
        let sent_bytes = match &sent {
            Ok(Ok(n)) => *n,
            _ => 0,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(s) => {
                self.metrics.rpc_sent(PeerKind::Snapshot, sent_bytes, 0);
                self.metrics.snapshot_event("send_failed");
                if s.code() == tonic::Code::FailedPrecondition {
                    tracing::info!(
                        group,
                        target = self.target,
                        reason = s.message(),
                        "snapshot refused; building a newer one"
                    );
                    self.renewal.request();
                }
                return Err(StreamingError::Network(NetworkError::new(&s)));
            }
        };
        self.metrics
            .rpc_sent(PeerKind::Snapshot, sent_bytes, reply.encoded_len());
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                self.metrics.snapshot_event("send_failed");
                return Err(StreamingError::Network(NetworkError::new(&e)));
            }
            Err(e) => {
                self.metrics.snapshot_event("send_failed");
                return Err(StreamingError::Network(network_err(e)));
            }
        }
        let resp: SnapshotResponse<TypeConfig> = self
            .reply("install snapshot", reply)
            .map_err(|e| StreamingError::Network(network_err(e)))?;
        self.metrics.snapshot_event("sent");
        Ok(resp)
    }
}
