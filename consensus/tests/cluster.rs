//! In-process clusters: real RaftGroups, real tonic peer transport on loopback, in-memory engines.
//!
//! These exercise replication, elections, snapshot streaming and catch-up through the same code
//! paths as `basaltd`, in seconds rather than the minutes process-level tests take.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_consensus::raft::frames::ReplicationCodec;
use basalt_consensus::raft::network::PeerClients;
use basalt_consensus::raft::peer_service::{GroupRegistry, PeerService};
use basalt_consensus::raft::{RaftGroup, RaftGroupConfig};
use basalt_consensus::{ConsensusMetrics, Replication, ReplicationError, Role};
use basalt_proto::v1::raft_peer_server::RaftPeerServer;
use basalt_storage::{
    Command, Engine, GroupCommitWriter, MemoryEngine, Session, StorageMetrics, WriteRequest, WriteResponse,
    DEFAULT_KEYSPACE,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

struct TestNode {
    id: u64,
    addr: String,
    engine: Arc<MemoryEngine>,
    group: Option<Arc<RaftGroup>>,
    /// The node's peer server runs for the whole test; a crash removes the group from the
    /// registry, so peers see "group not hosted" (a network error to openraft) until it reopens.
    registry: GroupRegistry,
    _server: JoinHandle<()>,
    metrics: ConsensusMetrics,
    _dir: tempfile::TempDir,
}

struct TestCluster {
    nodes: Vec<TestNode>,
    threshold: u64,
    codec: ReplicationCodec,
}

fn group_config(id: u64, dir: &std::path::Path, threshold: u64) -> RaftGroupConfig {
    let mut c = RaftGroupConfig::new(
        id,
        1,
        basalt_storage::ShardState::whole_keyspace(DEFAULT_KEYSPACE, false),
        dir.join("snapshots"),
    );
    c.snapshot_threshold = threshold;
    c.logs_kept_after_snapshot = 5;
    c
}

impl TestCluster {
    async fn start(n: u64, threshold: u64) -> Self {
        Self::start_with(n, threshold, ReplicationCodec::default()).await
    }

    /// A cluster whose nodes frame replication traffic with `codec` (a corrupting one, say).
    async fn start_with(n: u64, threshold: u64, codec: ReplicationCodec) -> Self {
        // Logs only when asked (RUST_LOG), captured per test by the harness.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut nodes = Vec::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let registry = GroupRegistry::default();
            let r = registry.clone();
            let metrics = ConsensusMetrics::unregistered().unwrap();
            let service = PeerService::new(id, r, metrics.clone()).with_codec(codec.clone());
            let server = tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(RaftPeerServer::new(service))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                    .await;
            });
            nodes.push(TestNode {
                id,
                addr,
                engine: MemoryEngine::new(),
                group: None,
                registry,
                _server: server,
                metrics,
                _dir: tempfile::tempdir().unwrap(),
            });
        }
        let mut c = TestCluster {
            nodes,
            threshold,
            codec,
        };
        for i in 0..c.nodes.len() {
            c.open(i).await;
        }
        let members: BTreeMap<u64, String> = c.nodes.iter().map(|n| (n.id, n.addr.clone())).collect();
        for n in &c.nodes {
            n.group.as_ref().unwrap().initialize(&members).await.unwrap();
        }
        c
    }

    async fn open(&mut self, i: usize) {
        let threshold = self.threshold;
        let peers = PeerClients::new().with_codec(self.codec.clone());
        let n = &mut self.nodes[i];
        let engine: Arc<dyn Engine> = n.engine.clone();
        let writer = GroupCommitWriter::new(engine.clone(), StorageMetrics::unregistered());
        let group = RaftGroup::open(
            group_config(n.id, n._dir.path(), threshold),
            engine,
            writer,
            peers,
            n.metrics.clone(),
        )
        .await
        .unwrap();
        n.registry.insert(group.clone());
        n.group = Some(group);
    }

    /// Stops node `i` as a crash would: peers can no longer reach its replica and unsynced writes
    /// are lost.
    async fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Some(g) = n.group.take() {
            n.registry.remove(g.group_id());
            g.shutdown().await;
        }
        n.engine.crash();
    }

    fn group(&self, i: usize) -> &Arc<RaftGroup> {
        self.nodes[i].group.as_ref().unwrap()
    }

    async fn leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, n) in self.nodes.iter().enumerate() {
                if let Some(g) = &n.group {
                    if g.status().role == Role::Leader {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes on the current leader, following leadership changes the way a client does:
    /// `NotLeader` is definite (nothing was proposed), so retrying it cannot apply a write twice.
    async fn propose(&self, request: WriteRequest) -> Result<WriteResponse, ReplicationError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let i = self.leader(Duration::from_secs(10)).await;
            match self.group(i).propose(request.clone()).await {
                Err(ReplicationError::NotLeader { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                r => return r,
            }
        }
    }

    async fn put(&self, key: &str, value: &str) -> Result<WriteResponse, ReplicationError> {
        self.propose(WriteRequest {
            session: None,
            command: Command::Put {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
            },
        })
        .await
    }

    async fn wait_applied(&self, i: usize, index: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.group(i).status().applied_index < index {
            assert!(Instant::now() < deadline, "node {} did not apply {index}", i + 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_and_read_linearizably() {
    let c = TestCluster::start(3, 10_000).await;
    for i in 0..50 {
        assert_eq!(
            c.put(&format!("k{i:03}"), &format!("v{i}")).await.unwrap(),
            WriteResponse::Put
        );
    }
    let l = c.leader(Duration::from_secs(5)).await;
    let barrier = c.group(l).read_barrier().await.unwrap();
    assert_eq!(c.group(l).reader().get(b"k007").unwrap(), Some(b"v7".to_vec()));
    for i in 0..3 {
        c.wait_applied(i, barrier.applied_index).await;
        let (kvs, more) = c.group(i).reader().scan(b"k", None, 100).unwrap();
        assert_eq!(kvs.len(), 50, "node {} has every key", i + 1);
        assert!(!more);
    }
    // A follower refuses the barrier with a hint that names the leader.
    let f = (l + 1) % 3;
    match c.group(f).read_barrier().await {
        Err(ReplicationError::NotLeader { leader_id, leader_addr }) => {
            assert_eq!(leader_id, Some(c.nodes[l].id));
            assert_eq!(leader_addr.as_deref(), Some(c.nodes[l].addr.as_str()));
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_session_write_applies_once() {
    let c = TestCluster::start(3, 10_000).await;
    let cas = |seq| WriteRequest {
        session: Some(Session {
            client_id: 42,
            sequence: seq,
            acked_through: 0,
        }),
        command: Command::CompareAndSwap {
            key: b"x".to_vec(),
            expected: None,
            new_value: b"1".to_vec(),
        },
    };
    let first = c.propose(cas(1)).await.unwrap();
    let retry = c.propose(cas(1)).await.unwrap();
    assert_eq!(
        first,
        WriteResponse::CompareAndSwap {
            succeeded: true,
            current: None
        }
    );
    assert_eq!(retry, first, "the retry reports the original success");
    // A genuinely new CAS with the same expectation fails: the key exists now.
    match c.propose(cas(2)).await.unwrap() {
        WriteResponse::CompareAndSwap {
            succeeded: false,
            current,
        } => assert_eq!(current, Some(b"1".to_vec())),
        other => panic!("unexpected {other:?}"),
    }
}

/// Waits until node `l` has purged its log through at least `index`. Snapshots are built and the
/// log purged in the background, so a node reopened before that could catch up from the log and a
/// test meaning to exercise snapshot catch-up would not (the corruption test failed that way in CI).
async fn wait_for_purge(c: &TestCluster, l: usize, index: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.group(l).status().purged_index < index {
        assert!(
            Instant::now() < deadline,
            "node {} did not compact its log through {index} (purged through {})",
            l + 1,
            c.group(l).status().purged_index
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_replica_catches_up_through_a_snapshot() {
    let mut c = TestCluster::start(3, 40).await;
    let l = c.leader(Duration::from_secs(10)).await;
    let down = (l + 1) % 3;
    c.crash(down).await;
    for i in 0..300 {
        c.put(&format!("key-{i:04}"), &format!("value-{i}")).await.unwrap();
    }
    let l = c.leader(Duration::from_secs(5)).await;
    let barrier = c.group(l).read_barrier().await.unwrap();
    wait_for_purge(&c, l, 1).await;
    c.open(down).await;
    c.wait_applied(down, barrier.applied_index).await;
    let installed = c.nodes[down].metrics.snapshots.with_label_values(&["installed"]).get();
    assert!(installed >= 1, "the restarted node caught up through a snapshot");
    let (kvs, _) = c.group(down).reader().scan(b"key-", None, 1000).unwrap();
    assert_eq!(kvs.len(), 300);
    assert_eq!(
        c.group(down).reader().get(b"key-0123").unwrap(),
        Some(b"value-123".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_is_elected_after_the_leader_crashes() {
    let mut c = TestCluster::start(3, 10_000).await;
    c.put("before", "1").await.unwrap();
    let old = c.leader(Duration::from_secs(5)).await;
    c.crash(old).await;
    let started = Instant::now();
    c.put("after", "2").await.unwrap();
    let new = c.leader(Duration::from_secs(5)).await;
    assert_ne!(new, old);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "failover took {:?}",
        started.elapsed()
    );
    c.group(new).read_barrier().await.unwrap();
    assert_eq!(c.group(new).reader().get(b"before").unwrap(), Some(b"1".to_vec()));
}

/// Raft takes one membership change at a time; concurrent callers (an operator's move and the
/// placement driver finishing the same move) must each get their change, not an "already
/// undergoing a configuration change" refusal. CI once failed a manual move on exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_membership_changes_are_applied_one_after_the_other() {
    let c = TestCluster::start(4, 10_000).await;
    c.put("before", "1").await.unwrap();
    let l = c.leader(Duration::from_secs(5)).await;
    let followers: Vec<u64> = c.nodes.iter().map(|n| n.id).filter(|id| *id != c.nodes[l].id).collect();
    let (a, b) = (followers[0], followers[1]);
    let g = c.group(l);
    let (first, again, other) = tokio::join!(g.remove_member(a), g.remove_member(a), g.remove_member(b));
    first.expect("removing a");
    again.expect("removing a again, at the same time");
    other.expect("removing b, at the same time");
    let members: Vec<u64> = g.status().members.iter().map(|m| m.id).collect();
    assert!(!members.contains(&a) && !members.contains(&b), "members: {members:?}");
    assert_eq!(members.len(), 2, "members: {members:?}");
    c.put("after", "2").await.unwrap();
}

/// Concurrent linearizable reads share ReadIndex rounds, and each still sees every write
/// acknowledged before it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_share_read_index_rounds() {
    let c = TestCluster::start(3, 10_000).await;
    // A committed write first, so that `l` is a leader the group settled on, not a candidate's
    // short-lived win at start-up (a read on a deposed leader fails with NotLeader).
    c.put("k", "start").await.unwrap();
    let l = c.leader(Duration::from_secs(5)).await;
    let metrics = &c.nodes[l].metrics;
    for round in 0..5u32 {
        c.put("k", &round.to_string()).await.unwrap();
        let g = c.group(l);
        let reads = (0..64).map(|_| async move {
            g.read_barrier().await.unwrap();
            g.reader().get(b"k").unwrap()
        });
        for value in futures::future::join_all(reads).await {
            assert_eq!(
                value,
                Some(round.to_string().into_bytes()),
                "a read missed an acknowledged write"
            );
        }
    }
    let rounds = metrics.read_index_rounds.get();
    let reads = metrics.read_index_reads.get();
    assert_eq!(reads, 5 * 64);
    assert!(
        rounds * 4 <= reads,
        "{reads} reads took {rounds} rounds: they were not coalesced"
    );
}

/// A transport that flips one bit in every third replication frame (AppendEntries with entries,
/// snapshot chunks): the receivers reject those frames, the senders retry, every write commits,
/// no replica applies damaged data, and the rejections show in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_replication_frames_are_rejected_and_the_cluster_keeps_serving() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sent = Arc::new(AtomicUsize::new(0));
    let damaged = Arc::new(AtomicUsize::new(0));
    let (s, d) = (sent.clone(), damaged.clone());
    let codec = ReplicationCodec::default().with_corruptor(Arc::new(move |_kind, frame: &mut Vec<u8>| {
        let n = s.fetch_add(1, Ordering::Relaxed);
        if n % 3 == 0 && !frame.is_empty() {
            let bit = (n * 7919) % (frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            d.fetch_add(1, Ordering::Relaxed);
        }
    }));
    // A low snapshot threshold, and a node down while writes go on, so that catching up takes
    // a snapshot stream through the same corrupting transport.
    let mut c = TestCluster::start_with(3, 40, codec).await;
    let l = c.leader(Duration::from_secs(10)).await;
    let down = (l + 1) % 3;
    c.crash(down).await;
    for i in 0..200 {
        c.put(&format!("key-{i:04}"), &format!("value-{i}")).await.unwrap();
    }
    // Well past the entries the crashed node holds, so that it cannot catch up from the log.
    let l = c.leader(Duration::from_secs(5)).await;
    wait_for_purge(&c, l, 100).await;
    c.open(down).await;
    for i in 200..300 {
        c.put(&format!("key-{i:04}"), &format!("value-{i}")).await.unwrap();
    }
    let l = c.leader(Duration::from_secs(5)).await;
    let barrier = c.group(l).read_barrier().await.unwrap();
    for i in 0..3 {
        c.wait_applied(i, barrier.applied_index).await;
        let (kvs, _) = c.group(i).reader().scan(b"key-", None, 1000).unwrap();
        assert_eq!(kvs.len(), 300, "node {} holds every key", i + 1);
        for (k, v) in kvs {
            let i: usize = std::str::from_utf8(&k[4..]).unwrap().parse().unwrap();
            assert_eq!(
                v,
                format!("value-{i}").into_bytes(),
                "node {} holds a damaged value",
                i + 1
            );
        }
    }
    assert!(damaged.load(Ordering::Relaxed) > 0, "the transport damaged nothing");
    let rejected: u64 = c.nodes.iter().map(|n| n.metrics.corrupt_messages.get()).sum();
    assert!(rejected > 0, "no receiver counted a rejected frame");
    let installed: u64 = c
        .nodes
        .iter()
        .map(|n| n.metrics.snapshots.with_label_values(&["installed"]).get())
        .sum();
    assert!(installed >= 1, "the restarted node caught up through a snapshot");
    let framed: u64 = c
        .nodes
        .iter()
        .map(|n| {
            n.metrics
                .codec_bytes
                .with_label_values(&["encode", "cpu", "framed"])
                .get()
        })
        .sum();
    assert!(framed > 0, "the codec metrics show the framed bytes");
}
