//! The client (and `basaltctl`'s command layer) against small in-process fake Basalt nodes.
//!
//! Each fake node is a real tonic server on `127.0.0.1:0` implementing the `Kv` and `Admin`
//! services over an in-memory map. It records every request it receives, so the tests can check
//! what went over the wire: which node an attempt reached, and which session a write carried on
//! each attempt. A node can be scripted to answer `NotLeader` with a hint, to fail the first N
//! write attempts with UNAVAILABLE after recording them, or to reject writes with a typed error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_client::cli::args::{Cli, Command};
use basalt_client::cli::commands::execute;
use basalt_client::cli::exit::{CliError, EXIT_NEGATIVE, EXIT_OK};
use basalt_client::cli::format::ByteStyle;
use basalt_client::{Client, ClientConfig, ClientError, Expect};
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
use tonic::{Request, Response, Status};

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
}

#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Put(Option<WriteSession>),
    Delete(Option<WriteSession>),
    Cas(Option<WriteSession>),
    Get,
    Scan { start: Bytes, end: Bytes, limit: u32 },
    Admin(&'static str),
}

struct FakeNode {
    node_id: u64,
    mode: Mode,
    /// Write attempts still to fail with UNAVAILABLE (after recording them).
    fail_writes: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    data: Mutex<BTreeMap<Bytes, Bytes>>,
}

impl FakeNode {
    fn new(node_id: u64, mode: Mode) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            mode,
            fail_writes: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            data: Mutex::new(BTreeMap::new()),
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            node_id: self.node_id,
            leader_id: self.node_id,
            ..Default::default()
        })
    }

    /// Records the request, then decides whether it is served.
    fn admit(&self, seen: Seen, is_write: bool) -> Result<(), Status> {
        self.seen.lock().push(seen);
        match &self.mode {
            Mode::Follower { leader_id, leader_addr } => Err(status_with_detail(
                "not the leader",
                ErrorKind::NotLeader(NotLeader {
                    leader_id: *leader_id,
                    leader_addr: leader_addr.clone(),
                }),
            )),
            Mode::RejectWrites(make) if is_write => Err(make()),
            _ if is_write
                && self
                    .fail_writes
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok() =>
            {
                Err(Status::unavailable("scripted failure after recording"))
            }
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl Kv for FakeNode {
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::Put(req.session), true)?;
        self.data.lock().insert(req.key, req.value);
        Ok(Response::new(PutResponse { header: self.header() }))
    }

    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::Get, false)?;
        Ok(Response::new(GetResponse {
            header: self.header(),
            value: self.data.lock().get(&req.key).cloned(),
        }))
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::Delete(req.session), true)?;
        let existed = self.data.lock().remove(&req.key).is_some();
        Ok(Response::new(DeleteResponse {
            header: self.header(),
            existed,
        }))
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let req = req.into_inner();
        self.admit(
            Seen::Scan {
                start: req.start.clone(),
                end: req.end.clone(),
                limit: req.limit,
            },
            false,
        )?;
        let page = if req.limit == 0 {
            PAGE_MAX
        } else {
            PAGE_MAX.min(req.limit as usize)
        };
        let data = self.data.lock();
        let mut in_range = data
            .range(req.start.clone()..)
            .filter(|(k, _)| req.end.is_empty() || **k < req.end);
        let kvs: Vec<KeyValue> = in_range
            .by_ref()
            .take(page)
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let more = in_range.next().is_some();
        Ok(Response::new(ScanResponse {
            header: self.header(),
            kvs,
            more,
        }))
    }

    async fn compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let req = req.into_inner();
        self.admit(Seen::Cas(req.session), true)?;
        let mut data = self.data.lock();
        let current = data.get(&req.key).cloned();
        let succeeded = match req.expected {
            Some(Expected::ExpectedValue(v)) => current.as_ref() == Some(&v),
            Some(Expected::ExpectAbsent(true)) => current.is_none(),
            _ => return Err(Status::invalid_argument("expected must be set")),
        };
        if succeeded {
            data.insert(req.key, req.new_value);
        }
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
        self.admit(Seen::Admin("cluster_status"), false)?;
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
        self.admit(Seen::Admin("add_member"), false)?;
        Ok(Response::new(AddMemberResponse { header: self.header() }))
    }

    async fn remove_member(&self, _: Request<RemoveMemberRequest>) -> Result<Response<RemoveMemberResponse>, Status> {
        self.admit(Seen::Admin("remove_member"), false)?;
        Ok(Response::new(RemoveMemberResponse { header: self.header() }))
    }

    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.admit(Seen::Admin("transfer_leader"), false)?;
        Ok(Response::new(TransferLeaderResponse { header: self.header() }))
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
    // Only the first attempt went to the follower; the client then stayed with the leader.
    assert_eq!(follower.seen().len(), 1);
    let on_leader = leader.seen();
    assert_eq!(on_leader.len(), 3);
    // The redirected write kept the session it was first sent with.
    assert_eq!(sessions(&follower.seen()), sessions(&on_leader)[..1]);
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
    assert_eq!(node.seen().len(), 1);
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
    assert_eq!(node.seen().len(), 1);
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
    let scans: Vec<Seen> = node
        .seen()
        .into_iter()
        .filter(|s| matches!(s, Seen::Scan { .. }))
        .collect();
    assert_eq!(
        scans,
        [
            Seen::Scan {
                start: "a".into(),
                end: Bytes::new(),
                limit: 0
            },
            Seen::Scan {
                start: "b".into(),
                end: "c".into(),
                limit: 5
            }
        ]
    );
}

async fn ctl(client: &Client, args: &[&str]) -> Result<(String, u8), CliError> {
    let cli = Cli::try_parse_from(std::iter::once("basaltctl").chain(args.iter().copied()))
        .expect("test command lines are valid");
    let style = ByteStyle::from_hex_flag(cli.hex);
    let command: Command = cli.command;
    execute(client, &command, style).await.map(|out| (out.stdout, out.code))
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
    assert_eq!(
        ctl(&client, &["member", "add", "4", "10.0.0.4:7379"])
            .await
            .expect("add"),
        ("added member 4 at 10.0.0.4:7379\n".into(), EXIT_OK)
    );
}
