//! A running Basalt node: storage, replica groups, gRPC services and metrics, from start to
//! clean shutdown.
//!
//! Start-up order matters and is:
//! 1. claim the data directory (it records the node id; a different id is refused, so two configs
//!    can never share one directory's Raft state),
//! 2. open the engine and the group-commit writer,
//! 3. open the meta group's replica and every replica the engine records (their Raft state, if
//!    any, is recovered here),
//! 4. bind the gRPC and metrics ports (failing fast on a taken port) and start serving,
//! 5. bootstrap, if and only if this node is a founding member whose state is new: the meta group
//!    and the default keyspace's first shard (group 2), both with the founding members,
//! 6. start the reconciler ([`crate::reconciler`]) and the placement driver ([`crate::driver`]).
//!
//! Serving starts before bootstrap because founding members must already answer each other's
//! votes when the first election begins.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use basalt_consensus::raft::frames::ReplicationCodec;
use basalt_consensus::raft::hibernation::Hibernation;
use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::raft::peer_service::PeerService;
use basalt_consensus::{ConsensusMetrics, Replication, ReplicationError};
use basalt_proto::v1::admin_server::AdminServer;
use basalt_proto::v1::kv_server::KvServer;
use basalt_proto::v1::raft_peer_server::RaftPeerServer;
use basalt_proto::Dialer;
use basalt_storage::{
    Engine, GroupCommitWriter, RocksEngine, ShardState, StorageError, StorageMetrics, DEFAULT_KEYSPACE,
};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::Connected;

use crate::admin_service::AdminService;
use crate::catalog::{meta_shard, META_GROUP};
use crate::config::NodeConfig;
use crate::driver::Driver;
use crate::forward::Forwarder;
use crate::kv_service::KvService;
use crate::metrics::{bind_metrics, serve_metrics, ServerMetrics};
use crate::placement::Placement;
use crate::planted::PlantedBug;
use crate::replicas::Replicas;
use basalt_consensus::clock::Clock;

/// The default keyspace's first shard, formed at bootstrap by the founding members.
pub const DEFAULT_GROUP: u64 = 2;
const NODE_ID_FILE: &str = "NODE_ID";
/// Largest gRPC message accepted: a maximal value plus headroom.
const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Still a bound (a peer resetting streams without end is cut off), sized for one connection
/// carrying many groups.
const MAX_PENDING_RESET_STREAMS: usize = 1024;
/// How long a forwarded request may wait on the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("data directory {path} belongs to node {found}, not node {configured}")]
    WrongNode {
        path: String,
        found: String,
        configured: u64,
    },
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("replication codec: {0}")]
    Codec(#[from] basalt_gpu::CodecError),
}

pub struct Node {
    cfg: NodeConfig,
    replicas: Arc<Replicas>,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn claim_data_dir(dir: &Path, node_id: u64) -> Result<(), NodeError> {
    let path = dir.display().to_string();
    let io = |source| NodeError::DataDir {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&file) {
        Ok(found) if found.trim() == node_id.to_string() => Ok(()),
        Ok(found) => Err(NodeError::WrongNode {
            path,
            found: found.trim().to_string(),
            configured: node_id,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&file, format!("{node_id}\n")).map_err(io)?;
            Ok(())
        }
        Err(e) => Err(io(e)),
    }
}

/// What a node runs on. `basaltd` uses the default: RocksDB in the data directory, a
/// group-commit thread, TCP, a metrics endpoint, no planted bug. The deterministic simulator
/// supplies an in-memory engine that outlives the simulated process (so a crash loses exactly
/// what was not fsynced), a writer task, and its simulated network; everything else is the same
/// code.
pub struct NodeEnv {
    /// The storage engine; `None` opens RocksDB under `<data_dir>/db`.
    pub engine: Option<Arc<dyn Engine>>,
    /// Run the group-commit writer as a tokio task rather than a thread. Only for an engine whose
    /// calls never block (see `GroupCommitWriter::new_on_task`).
    pub writer_on_task: bool,
    /// How connections to peers are opened.
    pub dialer: Dialer,
    /// Serve Prometheus text on `metrics_listen`.
    pub serve_metrics: bool,
    /// A deliberate bug for the simulator's checkers to catch (see [`crate::planted`]).
    pub planted_bug: Option<PlantedBug>,
    /// The wall clock closed timestamps are read from (the simulator's is skewed per node).
    pub clock: Clock,
}

impl Default for NodeEnv {
    fn default() -> Self {
        Self {
            engine: None,
            writer_on_task: false,
            dialer: Dialer::Tcp,
            serve_metrics: true,
            planted_bug: None,
            clock: basalt_consensus::clock::system_clock(),
        }
    }
}

impl Node {
    /// Starts the node on this machine (see [`NodeEnv`]) and returns once it serves (and, for a
    /// founding member of a new cluster, once it has proposed the initial membership).
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let listener = TcpListener::bind(cfg.listen).await.map_err(|source| NodeError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let listen = listener.local_addr().map_err(|source| NodeError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        Self::start_with(cfg, NodeEnv::default(), incoming, listen).await
    }

    /// Starts the node in `env`, serving the connections `incoming` yields (bound at `listen`).
    pub async fn start_with<I, IO, IE>(
        cfg: NodeConfig,
        env: NodeEnv,
        incoming: I,
        listen: SocketAddr,
    ) -> Result<Node, NodeError>
    where
        I: Stream<Item = Result<IO, IE>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        claim_data_dir(&cfg.data_dir, cfg.node_id)?;
        let metrics = ServerMetrics::new()?;
        let engine: Arc<dyn Engine> = match env.engine {
            Some(engine) => engine,
            None => RocksEngine::open(&cfg.data_dir.join("db"))?,
        };
        let storage_metrics = StorageMetrics::new(&metrics.registry)?;
        let writer = if env.writer_on_task {
            GroupCommitWriter::new_on_task(engine.clone(), storage_metrics)
        } else {
            GroupCommitWriter::new(engine.clone(), storage_metrics)
        };
        let consensus_metrics = ConsensusMetrics::new(&metrics.registry)?;
        let codec = ReplicationCodec::new(basalt_gpu::DispatcherConfig {
            choice: cfg.codec_backend,
            ..basalt_gpu::DispatcherConfig::default()
        })?;
        match codec.dispatcher().gpu_unavailable_reason() {
            None => tracing::info!("replication codec: GPU for large batches, CPU for the rest"),
            Some(why) => tracing::info!(reason = why, "replication codec: CPU only"),
        }
        let peers = PeerClients::with_dialer(env.dialer).with_codec(codec.clone());

        let replicas = Replicas::new(
            cfg.clone(),
            engine,
            writer,
            peers.clone(),
            consensus_metrics.clone(),
            env.clock.clone(),
            env.planted_bug.and_then(PlantedBug::read_bug),
        );
        let weak = Arc::downgrade(&replicas);
        replicas.set_split_hook(Arc::new(move |group: u64, shard: ShardState| {
            let weak = weak.clone();
            tokio::spawn(async move {
                let Some(replicas) = weak.upgrade() else { return };
                match replicas.open(group, shard).await {
                    Ok(_) => tracing::info!(group, "opened the replica a split created"),
                    Err(e) => tracing::error!(group, error = %e, "could not open the replica a split created"),
                }
            });
        }));
        let claims = Arc::downgrade(&replicas);
        replicas.set_claim_hook(Arc::new(move |group: u64, shard: ShardState| {
            let claims = claims.clone();
            Box::pin(async move {
                match claims.upgrade() {
                    Some(replicas) => replicas.claim(group, &shard).await,
                    None => Err(ReplicationError::Stopped("the node is shutting down".into())),
                }
            })
        }));
        let meta = replicas.open(META_GROUP, meta_shard()).await?;
        for (group, shard) in replicas.recorded()? {
            replicas.reopen(group, shard).await?;
        }
        let registry = replicas.registry();
        let placement = Placement::new(cfg.node_id, replicas.clone());

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let metrics_listen = if env.serve_metrics {
            let bind_err = |source| NodeError::Bind {
                addr: cfg.metrics_listen,
                source,
            };
            let metrics_listener = bind_metrics(cfg.metrics_listen).await.map_err(bind_err)?;
            let addr = metrics_listener.local_addr().map_err(bind_err)?;
            tasks.push(tokio::spawn(serve_metrics(
                metrics_listener,
                metrics.clone(),
                registry.clone(),
                shutdown_rx.clone(),
            )));
            Some(addr)
        } else {
            None
        };

        let forwarder = Forwarder::new(peers.clone(), FORWARD_TIMEOUT);
        let kv =
            KvService::new(placement.clone(), forwarder.clone(), metrics.clone()).with_planted_bug(env.planted_bug);
        let driver = Driver::new(
            placement.clone(),
            peers.clone(),
            forwarder.clone(),
            cfg.placement.clone(),
        );
        let admin = AdminService::new(
            placement.clone(),
            driver.clone(),
            peers.clone(),
            forwarder,
            metrics.clone(),
        );
        let mut peer = PeerService::new(cfg.node_id, registry.clone(), consensus_metrics.clone()).with_codec(codec);
        if let Some(h) = cfg.hibernation() {
            let h = Hibernation::new(cfg.node_id, h, registry, peers.clone(), consensus_metrics);
            peer = peer.with_hibernation(h.clone());
            tasks.push(tokio::spawn(h.run(shutdown_rx.clone())));
        }

        let mut rx = shutdown_rx.clone();
        let grpc = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Peers multiplex every group's traffic on one connection, and requests there are
            // cancelled routinely (a forward abandoned when the leader moves, a heartbeat
            // superseded): h2's default of 20 pending reset streams before GOAWAY (its
            // rapid-reset guard) then drops the whole connection and every request on it.
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
            .add_service(
                KvServer::new(kv)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(AdminServer::new(admin))
            .add_service(
                RaftPeerServer::new(peer)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.changed().await;
            });
        tasks.push(tokio::spawn(async move {
            if let Err(e) = grpc.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));

        let founders: Vec<u64> = if cfg.join {
            Vec::new()
        } else {
            cfg.initial_cluster.keys().copied().collect()
        };
        // The default keyspace's first shard is formed with the cluster, by the founders, and
        // only then: a founder restarting later must not form it again (its replica may have
        // moved away since). A founder that crashed between the two steps gets its replica from
        // the reconciler, which opens bootstrap shards that name the node.
        if !cfg.join && meta.initialize(&cfg.initial_cluster).await? {
            tracing::info!(members = ?cfg.initial_cluster, "bootstrapped a new cluster");
            let default = replicas
                .open(DEFAULT_GROUP, ShardState::whole_keyspace(DEFAULT_KEYSPACE, false))
                .await?;
            default.initialize(&cfg.initial_cluster).await?;
        }
        tasks.push(tokio::spawn(crate::reconciler::run(
            placement,
            founders,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(driver.run(shutdown_rx.clone())));
        tracing::info!(node_id = cfg.node_id, %listen, metrics = ?metrics_listen, "node serving");
        Ok(Node {
            cfg,
            replicas,
            listen,
            metrics_listen,
            shutdown_tx,
            tasks,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where Prometheus metrics are served, unless the node was started without them.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listen
    }

    /// This node's replica of the default keyspace's first shard, or of the meta group when it
    /// holds none (its status and local state, for tests and the simulator).
    pub fn replica(&self) -> Arc<dyn Replication> {
        match self.replicas.get(DEFAULT_GROUP) {
            Some(g) => g,
            None => self
                .replicas
                .get(META_GROUP)
                .expect("the meta replica is open while the node runs"),
        }
    }

    /// Every replica this node holds.
    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// Stops serving, then stops the group; in-flight requests end with an error, and everything
    /// acknowledged is already durable (acknowledgement waits for the fsync).
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        self.replicas.shutdown().await;
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t).await.is_err() {
                tracing::warn!("a server task did not stop within 5s");
            }
        }
        tracing::info!(node_id = self.cfg.node_id, "node stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_belongs_to_one_node() {
        let dir = tempfile::tempdir().unwrap();
        claim_data_dir(dir.path(), 3).unwrap();
        claim_data_dir(dir.path(), 3).unwrap();
        assert!(matches!(
            claim_data_dir(dir.path(), 4),
            Err(NodeError::WrongNode { .. })
        ));
    }
}
