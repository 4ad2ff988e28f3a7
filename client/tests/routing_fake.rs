//! The client's shard routing cache against a small fake cluster.
//!
//! Several fake nodes (real tonic servers on `127.0.0.1:0`) share one in-memory "world": the
//! keyspaces, their shards as encoded key ranges with epochs, replicas and leaders (exactly as
//! the real catalog describes them, bounds made with `basalt_proto::keycodec`), and the data.
//! Tests change the world under the client (split a shard, move its leader) the way the cluster
//! would. A node answers a key-value request as the real server does: `WrongShard` with the
//! shard's current descriptor when it holds no replica of the key's shard, `NotLeader` with a
//! hint when it is a follower (or, in forwarding mode, the leader's answer with the leader's
//! header), and serves it when it leads the shard. Every key-value request is logged with the
//! node that received it and what it answered, so the tests can see where each attempt went.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use basalt_client::{Client, ClientConfig, RoutingStats, Sharding};
use basalt_proto::keycodec;
use basalt_proto::status_with_detail;
use basalt_proto::v1::admin_server::{Admin, AdminServer};
use basalt_proto::v1::kv_server::{Kv, KvServer};
use basalt_proto::v1::*;
use basalt_proto::ErrorKind;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

/// Largest scan page, small so scans cross shards in several pages.
const PAGE: usize = 2;

#[derive(Clone, Debug)]
struct FakeShard {
    id: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    epoch: u64,
    replicas: Vec<u64>,
    leader: u64,
}

impl FakeShard {
    fn contains(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && key < self.end.as_slice()
    }
}

struct FakeKeyspace {
    name: String,
    id: u32,
    hashed: bool,
    shards: Vec<FakeShard>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Served,
    Forwarded,
    NotLeader,
    WrongShard,
}

/// One key-value request as a node received it.
#[derive(Clone, Debug)]
struct Received {
    node: u64,
    op: &'static str,
    /// The user key (for scans: the position's shard start is not a user key; the request's
    /// cursor is logged instead).
    key: Bytes,
    session: Option<WriteSession>,
    outcome: Outcome,
}

#[derive(Default)]
struct World {
    addrs: BTreeMap<u64, String>,
    keyspaces: Vec<FakeKeyspace>,
    /// Stored key -> (user key, value).
    data: BTreeMap<Vec<u8>, (Bytes, Bytes)>,
    /// Followers forward to the leader instead of answering `NotLeader`.
    forward: bool,
    /// `DescribeKeyspace` names each shard's leader (as a node hosting it would).
    describe_leaders: bool,
    received: Vec<Received>,
    /// `DescribeKeyspace` requests, by node.
    lookups: Vec<u64>,
}

type Shared = Arc<Mutex<World>>;

impl World {
    fn keyspace(&self, name: &str) -> Result<&FakeKeyspace, Status> {
        self.keyspaces
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| Status::not_found(format!("keyspace {name:?} does not exist")))
    }

    fn keyspace_mut(&mut self, name: &str) -> &mut FakeKeyspace {
        self.keyspaces
            .iter_mut()
            .find(|k| k.name == name)
            .expect("tests only change keyspaces they created")
    }

    fn addr(&self, node: u64) -> String {
        self.addrs.get(&node).cloned().unwrap_or_default()
    }

    fn shard_pb(&self, ks: &FakeKeyspace, s: &FakeShard, with_leader: bool) -> Shard {
        Shard {
            id: s.id,
            keyspace: ks.name.clone(),
            keyspace_id: ks.id,
            start: s.start.clone().into(),
            end: s.end.clone().into(),
            epoch: s.epoch,
            replicas: s
                .replicas
                .iter()
                .map(|n| Replica {
                    node_id: *n,
                    address: self.addr(*n),
                })
                .collect(),
            leader_id: if with_leader { s.leader } else { 0 },
            start_display: keycodec::display_bound(ks.id, ks.hashed, &s.start),
            end_display: keycodec::display_bound(ks.id, ks.hashed, &s.end),
            ..Default::default()
        }
    }

    fn header(&self, node: u64, leader: u64) -> ResponseHeader {
        ResponseHeader {
            node_id: node,
            leader_id: leader,
            leader_addr: self.addr(leader),
            ..Default::default()
        }
    }
}

struct FakeNode {
    id: u64,
    world: Shared,
}

impl FakeNode {
    /// Decides, as the real server does, whether node `self.id` serves a request for stored key
    /// `stored`; logs it. Returns the header of the answer and the keyspace id and kind.
    fn admit(
        &self,
        op: &'static str,
        keyspace: &str,
        stored: impl FnOnce(u32, bool) -> Vec<u8>,
        key: Bytes,
        session: Option<WriteSession>,
    ) -> Result<(ResponseHeader, Vec<u8>), Status> {
        let mut w = self.world.lock();
        let ks = w.keyspace(keyspace)?;
        let stored = stored(ks.id, ks.hashed);
        let shard = ks
            .shards
            .iter()
            .find(|s| s.contains(&stored))
            .cloned()
            .ok_or_else(|| Status::internal("the fake's shards do not cover the keyspace"))?;
        let (outcome, result) = if !shard.replicas.contains(&self.id) {
            let current = w.shard_pb(ks, &shard, true);
            (
                Outcome::WrongShard,
                Err(status_with_detail(
                    format!("node {} holds no replica of the key's shard", self.id),
                    ErrorKind::WrongShard(WrongShard {
                        keyspace: keyspace.to_owned(),
                        current: Some(current),
                    }),
                )),
            )
        } else if shard.leader != self.id && !w.forward {
            (
                Outcome::NotLeader,
                Err(status_with_detail(
                    "not the leader",
                    ErrorKind::NotLeader(NotLeader {
                        leader_id: shard.leader,
                        leader_addr: w.addr(shard.leader),
                    }),
                )),
            )
        } else if shard.leader != self.id {
            // Forwarded: the answer (and its header) is the leader's.
            (Outcome::Forwarded, Ok((w.header(shard.leader, shard.leader), stored)))
        } else {
            (Outcome::Served, Ok((w.header(self.id, self.id), stored)))
        };
        w.received.push(Received {
            node: self.id,
            op,
            key,
            session,
            outcome,
        });
        result
    }
}

#[tonic::async_trait]
impl Kv for FakeNode {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        let key = req.key.clone();
        let (header, stored) = self.admit(
            "put",
            &req.keyspace,
            |id, hashed| keycodec::encode_key(id, hashed, &key),
            req.key.clone(),
            req.session,
        )?;
        self.world.lock().data.insert(stored, (req.key, req.value));
        Ok(Response::new(PutResponse { header: Some(header) }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = req.into_inner();
        let key = req.key.clone();
        let (header, stored) = self.admit(
            "get",
            &req.keyspace,
            |id, hashed| keycodec::encode_key(id, hashed, &key),
            req.key.clone(),
            None,
        )?;
        let value = self.world.lock().data.get(&stored).map(|(_, v)| v.clone());
        Ok(Response::new(GetResponse {
            header: Some(header),
            value,
            read: None,
        }))
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    /// One page from the shard holding the scan's position, as the real server serves it: the
    /// cursor is the stored key to continue from, and a page never crosses a shard boundary.
    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let req = req.into_inner();
        let cursor = (!req.cursor.is_empty()).then(|| req.cursor.to_vec());
        let start = req.start.clone();
        let (header, position) = self.admit(
            "scan",
            &req.keyspace,
            |id, hashed| keycodec::scan_position(id, hashed, cursor.as_deref(), &start),
            req.cursor.clone(),
            None,
        )?;
        let w = self.world.lock();
        let ks = w.keyspace(&req.keyspace)?;
        let shard = ks
            .shards
            .iter()
            .find(|s| s.contains(&position))
            .ok_or_else(|| Status::internal("position outside every shard"))?;
        let in_range = |user: &Bytes| *user >= req.start && (req.end.is_empty() || *user < req.end);
        let items: Vec<(&Vec<u8>, &(Bytes, Bytes))> = w
            .data
            .range(position.clone()..shard.end.clone())
            .filter(|(_, (user, _))| in_range(user))
            .take(PAGE + 1)
            .collect();
        let kvs = items
            .iter()
            .take(PAGE)
            .map(|(_, (k, v))| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let keyspace_end = keycodec::keyspace_range(ks.id).1;
        let (more, cursor) = match items.get(PAGE) {
            Some((next, _)) => (true, Bytes::from((*next).clone())),
            None if shard.end != keyspace_end
                && (req.end.is_empty() || shard.end < keycodec::encode_key(ks.id, ks.hashed, &req.end)) =>
            {
                (true, Bytes::from(shard.end.clone()))
            }
            None => (false, Bytes::new()),
        };
        Ok(Response::new(ScanResponse {
            header: Some(header),
            kvs,
            more,
            cursor,
            read: None,
        }))
    }

    async fn compare_and_swap(
        &self,
        _: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }
}

#[tonic::async_trait]
impl Admin for FakeNode {
    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn add_member(&self, _: Request<AddMemberRequest>) -> Result<Response<AddMemberResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn remove_member(&self, _: Request<RemoveMemberRequest>) -> Result<Response<RemoveMemberResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn create_keyspace(
        &self,
        _: Request<CreateKeyspaceRequest>,
    ) -> Result<Response<CreateKeyspaceResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn list_keyspaces(
        &self,
        _: Request<ListKeyspacesRequest>,
    ) -> Result<Response<ListKeyspacesResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    /// Served from the world's catalog, on any node, as the real server serves it.
    async fn describe_keyspace(
        &self,
        req: Request<DescribeKeyspaceRequest>,
    ) -> Result<Response<DescribeKeyspaceResponse>, Status> {
        let req = req.into_inner();
        let mut w = self.world.lock();
        w.lookups.push(self.id);
        let ks = w.keyspace(&req.name)?;
        let sharding = if ks.hashed { Sharding::Hash } else { Sharding::Range };
        let resp = DescribeKeyspaceResponse {
            header: Some(w.header(self.id, 0)),
            keyspace: Some(Keyspace {
                name: ks.name.clone(),
                id: ks.id,
                sharding: sharding.to_wire(),
                replicas: 3,
                initial_shards: ks.shards.len() as u32,
                default_read: None,
            }),
            shards: ks
                .shards
                .iter()
                .map(|s| w.shard_pb(ks, s, w.describe_leaders))
                .collect(),
        };
        Ok(Response::new(resp))
    }

    async fn drop_keyspace(&self, _: Request<DropKeyspaceRequest>) -> Result<Response<DropKeyspaceResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn list_shards(&self, _: Request<ListShardsRequest>) -> Result<Response<ListShardsResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn split_shard(&self, _: Request<SplitShardRequest>) -> Result<Response<SplitShardResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn move_shard(&self, _: Request<MoveShardRequest>) -> Result<Response<MoveShardResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn transfer_shard_leader(
        &self,
        _: Request<TransferShardLeaderRequest>,
    ) -> Result<Response<TransferShardLeaderResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn placement_status(
        &self,
        _: Request<PlacementStatusRequest>,
    ) -> Result<Response<PlacementStatusResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn change_shard_replicas(
        &self,
        _: Request<ChangeShardReplicasRequest>,
    ) -> Result<Response<ChangeShardReplicasResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn node_report(&self, _: Request<NodeReportRequest>) -> Result<Response<NodeReportResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn merge_shard(&self, _: Request<MergeShardRequest>) -> Result<Response<MergeShardResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn merge_step(&self, _: Request<MergeStepRequest>) -> Result<Response<MergeStepResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }
}

/// A fake cluster: nodes 1..=n serving one shared world.
struct Cluster {
    world: Shared,
    addrs: Vec<SocketAddr>,
}

impl Cluster {
    async fn start(n: u64) -> Cluster {
        let world: Shared = Arc::new(Mutex::new(World {
            describe_leaders: true,
            ..Default::default()
        }));
        let mut addrs = Vec::new();
        for id in 1..=n {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding an ephemeral port on loopback");
            let addr = listener.local_addr().expect("a bound listener has an address");
            let node = Arc::new(FakeNode {
                id,
                world: Arc::clone(&world),
            });
            tokio::spawn(
                Server::builder()
                    .add_service(KvServer::from_arc(Arc::clone(&node)))
                    .add_service(AdminServer::from_arc(node))
                    .serve_with_incoming(TcpIncoming::from(listener)),
            );
            world.lock().addrs.insert(id, addr.to_string());
            addrs.push(addr);
        }
        Cluster { world, addrs }
    }

    /// Adds keyspace `name` (id `id`): range shards split at `splits`, or `hash_shards` even hash
    /// shards when that is non-zero. Shard `i` is led by `leaders[i % leaders.len()]` and
    /// replicated on `replicas`.
    fn add_keyspace(&self, name: &str, id: u32, splits: &[&str], hash_shards: u32, leaders: &[u64], replicas: &[u64]) {
        let hashed = hash_shards > 0;
        let bounds: Vec<Vec<u8>> = if hashed {
            keycodec::hash_shard_bounds(id, hash_shards)
        } else {
            let (start, end) = keycodec::keyspace_range(id);
            std::iter::once(start)
                .chain(splits.iter().map(|s| keycodec::encode_key(id, false, s.as_bytes())))
                .chain(std::iter::once(end))
                .collect()
        };
        let shards = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| FakeShard {
                id: u64::from(id) * 100 + i as u64,
                start: w[0].clone(),
                end: w[1].clone(),
                epoch: 1,
                replicas: replicas.to_vec(),
                leader: leaders[i % leaders.len()],
            })
            .collect();
        self.world.lock().keyspaces.push(FakeKeyspace {
            name: name.into(),
            id,
            hashed,
            shards,
        });
    }

    fn received(&self) -> Vec<Received> {
        self.world.lock().received.clone()
    }

    fn lookups(&self) -> Vec<u64> {
        self.world.lock().lookups.clone()
    }

    /// A client seeded with the given nodes only (1-based).
    async fn client(&self, seeds: &[u64], keyspace: &str) -> Client {
        let mut cfg = ClientConfig::new(seeds.iter().map(|n| self.addrs[(*n - 1) as usize].to_string()));
        cfg.deadline = Duration::from_secs(5);
        cfg.attempt_timeout = Duration::from_secs(1);
        cfg.backoff_initial = Duration::from_millis(5);
        cfg.backoff_max = Duration::from_millis(20);
        Client::connect(cfg)
            .await
            .expect("the test configuration is valid")
            .with_keyspace(keyspace)
    }
}

/// The leader of the shard holding user key `key` in keyspace `name`, per the world.
fn leader_of(world: &Shared, name: &str, key: &[u8]) -> u64 {
    let w = world.lock();
    let ks = w.keyspace(name).expect("exists");
    let stored = keycodec::encode_key(ks.id, ks.hashed, key);
    ks.shards
        .iter()
        .find(|s| s.contains(&stored))
        .expect("the shards cover the keyspace")
        .leader
}

fn no_overlap(client: &Client, keyspace: &str) {
    let shards = client.cached_shards(keyspace).expect("routes cached");
    for w in shards.windows(2) {
        assert!(w[0].end <= w[1].start, "overlapping cached shards: {w:?}");
    }
}

#[tokio::test]
async fn every_request_goes_to_the_leader_of_its_shard() {
    let cluster = Cluster::start(3).await;
    // 8 hash shards led round-robin by nodes 1, 2, 3; the client knows only node 1.
    cluster.add_keyspace("users", 5, &[], 8, &[1, 2, 3], &[1, 2, 3]);
    let client = cluster.client(&[1], "users").await;

    let keys: Vec<String> = (0..60).map(|i| format!("user{i}")).collect();
    for k in &keys {
        client.put(k.clone(), format!("v-{k}")).await.expect("put");
    }
    for k in &keys {
        assert_eq!(
            client.get(k.clone()).await.expect("get"),
            Some(Bytes::from(format!("v-{k}")))
        );
    }

    let received = cluster.received();
    assert_eq!(received.len(), 120, "one attempt per request, no retries");
    for r in &received {
        assert_eq!(r.outcome, Outcome::Served, "{r:?}");
        assert_eq!(r.node, leader_of(&cluster.world, "users", &r.key), "{r:?}");
    }
    // Every node got its share: the client learned the others' addresses from the descriptors.
    for node in 1..=3 {
        assert!(received.iter().any(|r| r.node == node), "node {node} got nothing");
    }
    assert_eq!(cluster.lookups(), [1], "one lookup fills the cache");
    let stats = client.routing_stats();
    assert_eq!(
        (
            stats.hits,
            stats.misses,
            stats.fallbacks,
            stats.refreshes,
            stats.answered_by_target
        ),
        (120, 1, 0, 1, 120),
        "{stats:?}"
    );
    let cached = client.cached_shards("users").expect("cached");
    assert_eq!(cached.len(), 8);
    assert!(cached.iter().all(|s| s.leader_id.is_some() && s.replicas == [1, 2, 3]));
    no_overlap(&client, "users");
}

#[tokio::test]
async fn a_wrong_shard_answer_updates_the_cache_and_the_retry_succeeds() {
    let cluster = Cluster::start(2).await;
    // One shard on node 1 only.
    cluster.add_keyspace("logs", 3, &[], 0, &[1], &[1]);
    let client = cluster.client(&[1], "logs").await;
    client.put("a", "1").await.expect("put");
    client.put("x", "1").await.expect("put");
    assert_eq!(client.routing_stats().refreshes, 1);

    // The shard splits at "m" and its upper half moves to node 2 (node 1 holds no replica of
    // it): the client's entry is now stale.
    {
        let mut w = cluster.world.lock();
        let ks = w.keyspace_mut("logs");
        let parent = ks.shards[0].clone();
        let at = keycodec::encode_key(3, false, b"m");
        ks.shards = vec![
            FakeShard {
                end: at.clone(),
                epoch: 2,
                ..parent.clone()
            },
            FakeShard {
                id: 301,
                start: at,
                epoch: 2,
                replicas: vec![2],
                leader: 2,
                ..parent
            },
        ];
        w.received.clear();
    }

    client
        .put("x", "2")
        .await
        .expect("the stale route costs an attempt, not a failure");
    let received = cluster.received();
    let outcomes: Vec<(u64, Outcome)> = received.iter().map(|r| (r.node, r.outcome)).collect();
    assert_eq!(
        outcomes,
        [(1, Outcome::WrongShard), (2, Outcome::Served)],
        "the descriptor in the answer led straight to the new shard's leader"
    );
    assert_eq!(received[0].session, received[1].session, "the retry is the same write");
    let stats = client.routing_stats();
    assert_eq!((stats.wrong_shard, stats.descriptor_updates), (1, 1), "{stats:?}");
    assert_eq!(stats.refreshes, 1, "the answer's descriptor sufficed: no lookup");

    // The new descriptor replaced the parent it overlaps; the lower half is not known yet, so a
    // key there is a miss that a lookup fills.
    let cached = client.cached_shards("logs").expect("cached");
    assert_eq!(cached.iter().map(|s| (s.id, s.epoch)).collect::<Vec<_>>(), [(301, 2)]);
    assert_eq!(client.get("a").await.expect("get"), Some(Bytes::from("1")));
    let cached = client.cached_shards("logs").expect("cached");
    assert_eq!(
        cached.iter().map(|s| (s.id, s.epoch)).collect::<Vec<_>>(),
        [(300, 2), (301, 2)]
    );
    assert_eq!(client.routing_stats().refreshes, 2);
    no_overlap(&client, "logs");
    // From now on both halves are reached at once.
    cluster.world.lock().received.clear();
    assert_eq!(client.get("x").await.expect("get"), Some(Bytes::from("2")));
    assert_eq!(client.get("b").await.expect("get"), None);
    let nodes: Vec<(u64, Outcome)> = cluster.received().iter().map(|r| (r.node, r.outcome)).collect();
    assert_eq!(nodes, [(2, Outcome::Served), (1, Outcome::Served)]);
}

#[tokio::test]
async fn a_not_leader_hint_is_followed_and_remembered() {
    let cluster = Cluster::start(3).await;
    cluster.add_keyspace("orders", 4, &[], 0, &[1], &[1, 2, 3]);
    let client = cluster.client(&[1], "orders").await;
    client.put("k", "1").await.expect("put");

    // Leadership moves to node 3.
    cluster.world.lock().keyspace_mut("orders").shards[0].leader = 3;
    cluster.world.lock().received.clear();
    client.put("k", "2").await.expect("put follows the hint");
    client.put("k", "3").await.expect("put");
    let received = cluster.received();
    let outcomes: Vec<(u64, Outcome)> = received.iter().map(|r| (r.node, r.outcome)).collect();
    assert_eq!(
        outcomes,
        [(1, Outcome::NotLeader), (3, Outcome::Served), (3, Outcome::Served)],
        "the hint was followed at once, and the next write went straight to the new leader"
    );
    assert_eq!(
        received[0].session, received[1].session,
        "the redirected write kept its session"
    );
    assert_ne!(received[1].session, received[2].session);
    let cached = client.cached_shards("orders").expect("cached");
    assert_eq!(cached[0].leader_id, Some(3));
    assert!(client.routing_stats().leader_updates >= 1);
}

#[tokio::test]
async fn a_forwarded_answer_teaches_the_leader() {
    let cluster = Cluster::start(3).await;
    cluster.add_keyspace("events", 6, &[], 0, &[2], &[1, 2, 3]);
    {
        let mut w = cluster.world.lock();
        w.forward = true;
        // As described by a node that knows no leader for the shard.
        w.describe_leaders = false;
    }
    let client = cluster.client(&[1], "events").await;
    client.put("k", "1").await.expect("put");
    client.put("k", "2").await.expect("put");
    let outcomes: Vec<(u64, Outcome)> = cluster.received().iter().map(|r| (r.node, r.outcome)).collect();
    // Without a known leader the first replica is asked; it forwards, and the leader's header
    // in the answer sends the next request to the leader itself.
    assert_eq!(outcomes, [(1, Outcome::Forwarded), (2, Outcome::Served)]);
    let stats = client.routing_stats();
    assert_eq!(
        (stats.answered_elsewhere, stats.answered_by_target),
        (1, 1),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_dead_replica_costs_one_attempt_not_one_per_request() {
    let cluster = Cluster::start(2).await;
    // Node 9's address has no listener: connections to it are refused.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding an ephemeral port on loopback");
    let dead_addr = dead.local_addr().expect("bound").to_string();
    drop(dead);
    cluster.world.lock().addrs.insert(9, dead_addr);
    cluster.add_keyspace("dead", 7, &[], 0, &[9], &[9, 2]);
    {
        let mut w = cluster.world.lock();
        w.forward = true;
    }
    let client = cluster.client(&[1], "dead").await;
    for i in 0..5 {
        client
            .put(format!("k{i}"), "v")
            .await
            .expect("put through the live replica");
    }
    let received = cluster.received();
    assert_eq!(received.len(), 5);
    assert!(received.iter().all(|r| r.node == 2), "{received:?}");
    let endpoints = client.endpoints();
    assert_eq!(endpoints.len(), 3, "seed, dead node, live node: {endpoints:?}");
    // Node 9 leads, but this client cannot reach it (node 2 can, and forwards). It was tried
    // once; while it is suspect the cache sends requests to the live replica, although every
    // answer names node 9 as the leader again.
    let stats = client.routing_stats();
    assert_eq!((stats.hits, stats.answered_elsewhere), (6, 5), "{stats:?}");
    assert_eq!(client.cached_shards("dead").expect("cached")[0].leader_id, Some(9));
}

#[tokio::test]
async fn scans_go_shard_by_shard_to_each_shards_leader() {
    let cluster = Cluster::start(3).await;
    cluster.add_keyspace("ranged", 8, &["g", "p"], 0, &[1, 2, 3], &[1, 2, 3]);
    let client = cluster.client(&[2], "ranged").await;
    let keys = ["a", "b", "c", "h", "i", "q", "r", "s", "t"];
    for k in keys {
        client.put(k, k.to_uppercase()).await.expect("put");
    }
    cluster.world.lock().received.clear();
    let page = client.scan("", None, 100).await.expect("scan");
    let got: Vec<&[u8]> = page.kvs.iter().map(|(k, _)| k.as_ref()).collect();
    assert_eq!(got, keys.map(str::as_bytes));
    assert!(!page.more);
    let received = cluster.received();
    assert!(received.iter().all(|r| r.op == "scan"), "{received:?}");
    let scans: Vec<(u64, Outcome)> = received.iter().map(|r| (r.node, r.outcome)).collect();
    // [..g) on node 1 in two pages, [g..p) on node 2, [p..) on node 3 in two pages; each page
    // went straight to the leader of the shard its cursor is in.
    assert_eq!(
        scans,
        [
            (1, Outcome::Served),
            (1, Outcome::Served),
            (2, Outcome::Served),
            (3, Outcome::Served),
            (3, Outcome::Served)
        ]
    );

    // A scan from inside a shard starts at that shard's leader.
    cluster.world.lock().received.clear();
    let page = client.scan("q", Some(Bytes::from("s")), 10).await.expect("scan");
    assert_eq!(page.kvs.len(), 2);
    assert!(cluster.received().iter().all(|r| r.node == 3));
}

#[tokio::test]
async fn a_failed_lookup_falls_back_to_rotation() {
    let cluster = Cluster::start(1).await;
    // No such keyspace on the fake: the lookup fails, and so does the request, definitely.
    let client = cluster.client(&[1], "missing").await;
    let err = client.get("k").await.expect_err("unknown keyspace");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let stats: RoutingStats = client.routing_stats();
    assert_eq!((stats.refresh_failures, stats.fallbacks), (1, 1), "{stats:?}");
    assert!(client.cached_shards("missing").is_none());
    // Once the keyspace exists, a request after the pause that follows a failed lookup fills
    // the cache.
    cluster.add_keyspace("missing", 9, &[], 0, &[1], &[1]);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    client.put("k", "v").await.expect("put");
    assert_eq!(client.cached_shards("missing").map(|s| s.len()), Some(1));
    assert_eq!(client.routing_stats().refreshes, 1);
}

#[tokio::test]
async fn concurrent_misses_share_one_lookup() {
    let cluster = Cluster::start(3).await;
    cluster.add_keyspace("busy", 10, &[], 4, &[1, 2, 3], &[1, 2, 3]);
    let client = cluster.client(&[1, 2, 3], "busy").await;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.put(format!("k{i}"), "v").await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task ran").expect("put");
    }
    assert_eq!(cluster.lookups().len(), 1, "the first lookup served every waiting call");
    assert_eq!(client.routing_stats().refreshes, 1);
    // Every write, whether it waited for the lookup or not, reached its shard's leader at once.
    let received = cluster.received();
    assert_eq!(received.len(), 32);
    assert!(received.iter().all(|r| r.outcome == Outcome::Served), "{received:?}");
}

#[tokio::test]
async fn a_split_that_causes_no_wrong_shard_is_noticed_by_forwarding() {
    let cluster = Cluster::start(2).await;
    // Every node holds every shard, as in a cluster with as many nodes as replicas.
    cluster.add_keyspace("silent", 11, &[], 0, &[1], &[1, 2]);
    cluster.world.lock().forward = true;
    let client = cluster.client(&[1], "silent").await;
    client.put("a", "1").await.expect("put");

    // Split at "m"; the upper half elects node 2. Node 1 still hosts both halves, so it forwards
    // rather than answering WrongShard.
    {
        let mut w = cluster.world.lock();
        let ks = w.keyspace_mut("silent");
        let parent = ks.shards[0].clone();
        let at = keycodec::encode_key(11, false, b"m");
        ks.shards = vec![
            FakeShard {
                end: at.clone(),
                epoch: 2,
                ..parent.clone()
            },
            FakeShard {
                id: 1101,
                start: at,
                epoch: 2,
                leader: 2,
                ..parent
            },
        ];
        w.received.clear();
    }
    client.put("x", "1").await.expect("put");
    assert_eq!(cluster.received()[0].outcome, Outcome::Forwarded);
    // The next use of the keyspace, once the interval has passed since the last lookup, looks
    // it up again and learns both halves.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    cluster.world.lock().received.clear();
    for k in ["b", "y", "c", "z"] {
        client.put(k, "2").await.expect("put");
    }
    assert_eq!(cluster.lookups().len(), 2);
    let cached = client.cached_shards("silent").expect("cached");
    assert_eq!(
        cached.iter().map(|s| (s.id, s.epoch)).collect::<Vec<_>>(),
        [(1100, 2), (1101, 2)]
    );
    let outcomes: Vec<(u64, Outcome)> = cluster.received().iter().map(|r| (r.node, r.outcome)).collect();
    assert_eq!(
        outcomes,
        [
            (1, Outcome::Served),
            (2, Outcome::Served),
            (1, Outcome::Served),
            (2, Outcome::Served)
        ]
    );
}
