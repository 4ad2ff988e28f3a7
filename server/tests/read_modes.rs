//! Read modes against real `basaltd` processes: each mode answers with what it promises and says
//! how it served the read; on the minority side of a cluster that lost its quorum, `stale` keeps
//! answering (and says how stale it may be), `bounded_staleness` answers only while its bound
//! allows, and `linearizable` refuses rather than answer with data it cannot vouch for.

mod common;

use std::time::{Duration, Instant};

use basalt_client::cli::args::Cli;
use basalt_client::{Client, ClientConfig, ClientError, ReadMode, ServedRead, Sharding};
use basalt_proto::v1::kv_client::KvClient;
use basalt_proto::v1::{GetRequest, ReadMode as PbMode, ReadOptions};
use clap::Parser as _;
use common::{client, settled_leader, settled_shard_leader, start_cluster};

fn options(mode: ReadMode) -> ReadOptions {
    let (mode, max_staleness_ms) = match mode {
        ReadMode::Linearizable => (PbMode::Linearizable, 0),
        ReadMode::Lease => (PbMode::Lease, 0),
        ReadMode::Follower => (PbMode::Follower, 0),
        ReadMode::BoundedStaleness(d) => (PbMode::BoundedStaleness, d.as_millis() as u64),
        ReadMode::Stale => (PbMode::Stale, 0),
        ReadMode::KeyspaceDefault => (PbMode::Unspecified, 0),
    };
    ReadOptions {
        mode: mode as i32,
        max_staleness_ms,
    }
}

fn served(s: Option<ServedRead>) -> ServedRead {
    s.expect("a read-mode server says how it served the read")
}

/// A client of one endpoint alone, with a short deadline: what that node itself answers.
async fn only(endpoint: String, deadline: Duration, mode: ReadMode) -> Client {
    let mut cfg = ClientConfig::new([endpoint]);
    cfg.deadline = deadline;
    cfg.attempt_timeout = deadline.min(Duration::from_secs(1));
    Client::connect(cfg).await.expect("valid config").with_read_mode(mode)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mode_answers_and_says_how_and_the_minority_side_serves_only_stale_reads() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(20)).await;
    admin.put("k", "v1").await.expect("put");

    // Every mode reads the acknowledged value on every node asked directly (raw gRPC, so the
    // node asked is the node that answers or forwards).
    for mode in [
        ReadMode::Linearizable,
        ReadMode::Lease,
        ReadMode::Follower,
        ReadMode::BoundedStaleness(Duration::from_secs(5)),
        ReadMode::Stale,
    ] {
        for id in cluster.node_ids() {
            let mut kv = KvClient::connect(format!("http://{}", cluster.endpoint(id).expect("endpoint")))
                .await
                .expect("connect");
            // Stale reads may trail the write by a moment on a follower: wait for it to apply.
            let deadline = Instant::now() + Duration::from_secs(5);
            let resp = loop {
                let r = kv
                    .get(GetRequest {
                        keyspace: String::new(),
                        key: "k".into(),
                        read: Some(options(mode)),
                    })
                    .await
                    .expect("read")
                    .into_inner();
                if r.value.as_deref() == Some(&b"v1"[..]) || Instant::now() > deadline {
                    break r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert_eq!(resp.value.as_deref(), Some(&b"v1"[..]), "{mode} on node {id}");
            let info = resp.read.expect("the response says how it was served");
            let header = resp.header.expect("header");
            assert!(info.applied_index > 0, "{mode} on node {id}: {info:?}");
            let served = PbMode::try_from(info.mode).expect("a known mode");
            let leader = header.leader_id;
            match mode {
                // A lease read may fall back to ReadIndex (a new leader waits out the old lease).
                ReadMode::Lease => assert!(matches!(served, PbMode::Lease | PbMode::Linearizable), "{info:?}"),
                // Served locally within the bound, or by the leader as a linearizable read.
                ReadMode::BoundedStaleness(_) => match served {
                    PbMode::BoundedStaleness => {
                        assert!(info.staleness_bound_ms <= 5_000 && !info.staleness_unknown, "{info:?}");
                        assert_eq!(info.node_id, id, "served where it was asked");
                    }
                    PbMode::Linearizable => assert_eq!(info.staleness_bound_ms, 0),
                    other => panic!("bounded read served as {other:?}"),
                },
                ReadMode::Stale => {
                    assert_eq!(served, PbMode::Stale);
                    assert!(
                        !info.staleness_unknown,
                        "a replica that heard its leader has a safe time"
                    );
                    assert_eq!(info.node_id, id, "stale reads are never forwarded");
                }
                ReadMode::Follower => {
                    assert_eq!(served, PbMode::Follower);
                    assert_eq!(info.node_id, id, "a follower read is served where it was asked");
                    assert_eq!(info.staleness_bound_ms, 0);
                }
                _ => {
                    assert_eq!(served, PbMode::Linearizable);
                    assert_eq!(info.node_id, leader, "linearizable reads are served by the leader");
                }
            }
        }
    }

    // The client library spreads reads any replica may serve over the shard's replicas.
    let spread = client(&cluster, Duration::from_secs(10))
        .await
        .with_read_mode(ReadMode::Follower);
    let mut nodes = std::collections::BTreeSet::new();
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let c = spread.clone();
        reads.spawn(async move { c.read("k").await });
    }
    while let Some(r) = reads.join_next().await {
        let r = r.expect("task").expect("follower read");
        nodes.insert(served(r.served).node_id);
    }
    assert!(nodes.len() >= 2, "64 concurrent follower reads all went to {nodes:?}");

    // A keyspace whose default mode is stale serves stale reads without asking.
    admin
        .create_keyspace_with_read_mode("feed", Sharding::Range, 1, 3, ReadMode::Stale)
        .await
        .expect("create");
    let feed = admin.with_keyspace("feed");
    feed.put("item", "1").await.expect("put");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = feed.read("item").await.expect("read");
        if r.value.is_some() {
            assert_eq!(served(r.served).mode, ReadMode::Stale);
            break;
        }
        assert!(Instant::now() < deadline, "the default-mode read never saw the write");
    }
    let ks = admin.describe_keyspace("feed").await.expect("describe");
    let default = ks.keyspace.default_read.expect("the keyspace says its default");
    assert_eq!(default.mode, basalt_proto::v1::ReadMode::Stale as i32);

    // The minority side: two of three nodes die; the third has no quorum.
    let meta_leader = settled_leader(&cluster, Duration::from_secs(10)).await;
    let _ = settled_shard_leader(&cluster, basalt_server::node::DEFAULT_GROUP, Duration::from_secs(10)).await;
    let survivor = cluster
        .node_ids()
        .into_iter()
        .find(|id| *id != meta_leader)
        .expect("a node");
    for id in cluster.node_ids().into_iter().filter(|id| *id != survivor) {
        cluster.kill(id).expect("kill");
    }
    let endpoint = cluster.endpoint(survivor).expect("endpoint");

    // Linearizable refuses: it cannot confirm leadership, so it must not answer.
    let lin = only(endpoint.clone(), Duration::from_secs(3), ReadMode::Linearizable).await;
    let err = lin
        .get("k")
        .await
        .expect_err("a minority must not serve linearizable reads");
    assert!(matches!(err, ClientError::DeadlineExceeded { .. }), "{err:?}");

    // Stale answers, with a bound that grows as time passes without a leader.
    let stale = only(endpoint.clone(), Duration::from_secs(3), ReadMode::Stale).await;
    let first = stale.read("k").await.expect("stale reads stay available");
    assert_eq!(first.value.as_deref(), Some(&b"v1"[..]));
    let s1 = served(first.served).staleness.expect("bounded");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s2 = served(stale.read("k").await.expect("still available").served)
        .staleness
        .expect("bounded");
    assert!(s2 >= s1 + Duration::from_secs(1), "the bound grows: {s1:?} then {s2:?}");

    // What an operator sees: `basaltctl get --read-mode stale` on the minority node.
    let cli = Cli::try_parse_from([
        "basaltctl",
        "--endpoints",
        &endpoint,
        "--timeout",
        "3s",
        "--read-mode",
        "stale",
        "get",
        "k",
    ])
    .expect("a valid command line");
    let out = basalt_client::cli::run(&cli).await.expect("basaltctl answers");
    assert_eq!(out.stdout, "v1\n");
    let note = out.note.expect("the read says how it was served");
    assert!(
        note.starts_with(&format!("read: mode=stale node={survivor} ")) && note.contains("staleness<="),
        "{note}"
    );

    // Bounded staleness answers while its bound covers the age, then refuses.
    let wide = only(
        endpoint.clone(),
        Duration::from_secs(3),
        ReadMode::BoundedStaleness(Duration::from_secs(60)),
    )
    .await;
    assert_eq!(wide.get("k").await.expect("within 60 s").as_deref(), Some(&b"v1"[..]));
    let narrow = only(
        endpoint,
        Duration::from_secs(3),
        ReadMode::BoundedStaleness(Duration::from_millis(500)),
    )
    .await;
    let err = narrow.get("k").await.expect_err("older than 500 ms by now");
    // Retried until the deadline, the last error says why.
    match err {
        ClientError::DeadlineExceeded { last_error, .. } => {
            assert!(last_error.contains("not fresh enough"), "{last_error}")
        }
        other => panic!("expected the deadline with a freshness error, got {other:?}"),
    }
}

/// A new leader serves no lease read until the old leader's lease (plus the drift bound) has run
/// out: right after a transfer its lease reads fall back to ReadIndex and say so; a second later
/// they are lease reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_waits_out_the_old_lease_before_serving_lease_reads() {
    let (cluster, _) = start_cluster(3, None).await;
    let admin = client(&cluster, Duration::from_secs(20)).await;
    admin.put("k", "v").await.expect("put");
    let shard = basalt_server::node::DEFAULT_GROUP;
    let old = settled_shard_leader(&cluster, shard, Duration::from_secs(10)).await;
    let new = cluster
        .node_ids()
        .into_iter()
        .find(|id| *id != old)
        .expect("another node");
    admin.transfer_shard_leader(shard, new).await.expect("transfer");
    let mut kv = KvClient::connect(format!("http://{}", cluster.endpoint(new).expect("endpoint")))
        .await
        .expect("connect");
    let lease_read = || GetRequest {
        keyspace: String::new(),
        key: "k".into(),
        read: Some(options(ReadMode::Lease)),
    };
    let first = kv.get(lease_read()).await.expect("read").into_inner();
    let info = first.read.expect("read info");
    assert_eq!(info.node_id, new, "the new leader served it");
    assert_eq!(
        PbMode::try_from(info.mode),
        Ok(PbMode::Linearizable),
        "inside the old lease the new leader falls back to ReadIndex: {info:?}"
    );
    // One lease (600 ms) and the drift bound (100 ms) later, with margin.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let later = kv.get(lease_read()).await.expect("read").into_inner();
    let info = later.read.expect("read info");
    assert_eq!(PbMode::try_from(info.mode), Ok(PbMode::Lease), "{info:?}");
    assert_eq!(later.value.as_deref(), Some(&b"v"[..]));
}
