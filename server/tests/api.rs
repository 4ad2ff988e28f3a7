//! The public API of real `basaltd` processes, called over raw gRPC (so the server's own checks are
//! tested, not the client library's) and through `basaltctl`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_bench::metrics_scrape::{fetch_metrics, parse_metric_labeled};
use basalt_proto::v1::admin_client::AdminClient;
use basalt_proto::v1::compare_and_swap_request::Expected;
use basalt_proto::v1::kv_client::KvClient;
use basalt_proto::v1::ErrorDetail;
use basalt_proto::v1::{
    CompareAndSwapRequest, DeleteRequest, GetRequest, PutRequest, ReadMode, ReadOptions, RemoveMemberRequest,
    ScanRequest, TransferLeaderRequest, WriteSession,
};
use basalt_proto::ErrorKind;
use basalt_server::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use bytes::Bytes;
use common::start_cluster;
use tonic::transport::Channel;
use tonic::Code;

async fn kv(endpoint: &str) -> KvClient<Channel> {
    KvClient::connect(format!("http://{endpoint}"))
        .await
        .expect("node accepts connections")
}

async fn admin(endpoint: &str) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{endpoint}"))
        .await
        .expect("node accepts connections")
}

/// Everything in the keyspace, in order.
async fn dump(kv: &mut KvClient<Channel>) -> Vec<(Bytes, Bytes)> {
    let r = kv
        .scan(ScanRequest {
            keyspace: String::new(),
            cursor: Default::default(),
            start: Bytes::new(),
            end: Bytes::new(),
            limit: 0,
            read: None,
        })
        .await
        .expect("scan")
        .into_inner();
    assert!(!r.more);
    r.kvs.into_iter().map(|p| (p.key, p.value)).collect()
}

async fn value_of(kv: &mut KvClient<Channel>, key: &'static [u8]) -> Option<Bytes> {
    kv.get(GetRequest {
        keyspace: String::new(),
        key: Bytes::from_static(key),
        read: None,
    })
    .await
    .expect("get")
    .into_inner()
    .value
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) {
    let status = r.expect_err("the request must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    match ErrorDetail::from_status(&status) {
        Some(ErrorKind::InvalidArgument(d)) => assert_eq!(d.field, field, "{status:?}"),
        other => panic!("expected an InvalidArgument detail naming {field}, got {other:?}"),
    }
    assert!(!status.message().is_empty());
}

fn put(key: &[u8], value: Vec<u8>) -> PutRequest {
    PutRequest {
        keyspace: String::new(),
        key: Bytes::copy_from_slice(key),
        value: value.into(),
        session: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let (cluster, leader) = start_cluster(1, None).await;
    let endpoint = cluster.endpoint(leader).expect("node exists");
    let mut kv = kv(&endpoint).await;
    kv.put(put(b"existing", b"v".to_vec())).await.expect("a valid put");
    let before = dump(&mut kv).await;

    let long_key = vec![b'k'; MAX_KEY_BYTES + 1];
    let big_value = vec![0u8; MAX_VALUE_BYTES + 1];
    assert_invalid(kv.put(put(b"", b"v".to_vec())).await, "key");
    assert_invalid(kv.put(put(&long_key, b"v".to_vec())).await, "key");
    assert_invalid(kv.put(put(b"existing", big_value.clone())).await, "value");
    assert_invalid(
        kv.get(GetRequest {
            keyspace: String::new(),
            key: Bytes::new(),
            read: None,
        })
        .await,
        "key",
    );
    assert_invalid(
        kv.delete(DeleteRequest {
            keyspace: String::new(),
            key: Bytes::new(),
            session: None,
        })
        .await,
        "key",
    );
    assert_invalid(
        kv.scan(ScanRequest {
            keyspace: String::new(),
            cursor: Default::default(),
            start: Bytes::from_static(b"b"),
            end: Bytes::from_static(b"a"),
            limit: 10,
            read: None,
        })
        .await,
        "end",
    );
    // Read options: a bound only on bounded_staleness, and one above zero there; a known mode.
    for (read, field) in [
        (
            ReadOptions {
                mode: ReadMode::BoundedStaleness as i32,
                max_staleness_ms: 0,
            },
            "read.max_staleness_ms",
        ),
        (
            ReadOptions {
                mode: ReadMode::Stale as i32,
                max_staleness_ms: 10,
            },
            "read.max_staleness_ms",
        ),
        (
            ReadOptions {
                mode: 99,
                max_staleness_ms: 0,
            },
            "read.mode",
        ),
    ] {
        assert_invalid(
            kv.get(GetRequest {
                keyspace: String::new(),
                key: Bytes::from_static(b"existing"),
                read: Some(read),
            })
            .await,
            field,
        );
    }
    assert_invalid(
        kv.compare_and_swap(CompareAndSwapRequest {
            keyspace: String::new(),
            key: Bytes::from_static(b"existing"),
            expected: None,
            new_value: Bytes::from_static(b"x"),
            session: None,
        })
        .await,
        "expected",
    );
    assert_invalid(
        kv.compare_and_swap(CompareAndSwapRequest {
            keyspace: String::new(),
            key: Bytes::from_static(b"existing"),
            expected: Some(Expected::ExpectedValue(Bytes::from_static(b"v"))),
            new_value: big_value.into(),
            session: None,
        })
        .await,
        "new_value",
    );
    // The largest valid key and value are accepted: the limits are inclusive.
    let max_key = vec![b'm'; MAX_KEY_BYTES];
    kv.put(put(&max_key, vec![7u8; MAX_VALUE_BYTES]))
        .await
        .expect("a key and value exactly at the limits");
    kv.delete(DeleteRequest {
        keyspace: String::new(),
        key: max_key.into(),
        session: None,
    })
    .await
    .expect("delete");

    // Unknown members.
    let mut adm = admin(&endpoint).await;
    let status = adm
        .remove_member(RemoveMemberRequest { id: 99 })
        .await
        .expect_err("unknown member");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("99"), "{status:?}");
    let status = adm
        .transfer_leader(TransferLeaderRequest { to: 99 })
        .await
        .expect_err("unknown member");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    assert_eq!(dump(&mut kv).await, before, "refused requests changed nothing");
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_compare_and_swap_applies_once_even_through_another_node() {
    let (cluster, leader) = start_cluster(3, None).await;
    let follower = cluster
        .node_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let mut at_leader = kv(&cluster.endpoint(leader).expect("node")).await;
    let mut at_follower = kv(&cluster.endpoint(follower).expect("node")).await;
    at_leader.put(put(b"counter", b"0".to_vec())).await.expect("put");

    // One logical increment, 0 -> 1, sent three times as a client whose replies were lost would:
    // first to the leader, then twice to a follower (which forwards it).
    let increment = CompareAndSwapRequest {
        keyspace: String::new(),
        key: Bytes::from_static(b"counter"),
        expected: Some(Expected::ExpectedValue(Bytes::from_static(b"0"))),
        new_value: Bytes::from_static(b"1"),
        session: Some(WriteSession {
            client_id: 0xC0FFEE,
            sequence: 1,
            acked_through: 0,
        }),
    };
    let first = at_leader
        .compare_and_swap(increment.clone())
        .await
        .expect("cas")
        .into_inner();
    assert!(first.succeeded);
    for _ in 0..2 {
        let retry = at_follower
            .compare_and_swap(increment.clone())
            .await
            .expect("retried cas")
            .into_inner();
        assert!(retry.succeeded, "a retry of a CAS that succeeded reports success");
        assert_eq!(retry.current_value, first.current_value);
    }
    // Applied once: the value is 1, and the session's next CAS (1 -> 2) is a new operation.
    assert_eq!(value_of(&mut at_leader, b"counter").await.as_deref(), Some(&b"1"[..]));
    let next = CompareAndSwapRequest {
        keyspace: String::new(),
        expected: Some(Expected::ExpectedValue(Bytes::from_static(b"1"))),
        new_value: Bytes::from_static(b"2"),
        session: Some(WriteSession {
            client_id: 0xC0FFEE,
            sequence: 2,
            acked_through: 1,
        }),
        ..increment.clone()
    };
    assert!(
        at_follower
            .compare_and_swap(next)
            .await
            .expect("cas")
            .into_inner()
            .succeeded
    );
    // Sequence 1 is now acknowledged: a late duplicate of it is refused, not re-applied.
    let late = at_leader
        .compare_and_swap(increment)
        .await
        .expect_err("a duplicate behind acked_through");
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert_eq!(value_of(&mut at_leader, b"counter").await.as_deref(), Some(&b"2"[..]));
    cluster.terminate_all().await.expect("clean shutdown");
}

/// `basaltctl` sits next to this test's binary's directory (`target/debug/deps/..`); the
/// workspace test run builds it.
fn basaltctl() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps")
        .join("basaltctl");
    assert!(
        path.is_file(),
        "{} not found; build it with `cargo build --workspace --all-targets`",
        path.display()
    );
    path
}

fn ctl(endpoints: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(basaltctl())
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .output()
        .expect("basaltctl runs");
    (
        out.status.code().expect("basaltctl exits, not killed"),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basaltctl_drives_a_real_cluster() {
    let (cluster, leader) = start_cluster(3, None).await;
    let eps = cluster.endpoints().join(",");
    let e = eps.as_str();
    let run = move |args: &'static [&'static str]| {
        let e = e.to_string();
        async move { tokio::task::spawn_blocking(move || ctl(&e, args)).await.expect("join") }
    };
    assert_eq!(run(&["put", "greeting", "hello"]).await.0, 0);
    assert_eq!(run(&["get", "greeting"]).await, (0, "hello".into(), String::new()));
    assert_eq!(run(&["put", "other", "x"]).await.0, 0);
    let (code, out, _) = run(&["scan", "--prefix", "g"]).await;
    assert_eq!((code, out.as_str()), (0, "greeting\thello"));
    assert_eq!(run(&["cas", "greeting", "--expect", "hello", "bye"]).await.0, 0);
    let (code, out, _) = run(&["cas", "greeting", "--expect", "hello", "again"]).await;
    assert_eq!(code, 1, "a failed comparison exits 1 (a negative answer, as grep does)");
    assert_eq!(out, "not swapped: current value is bye");
    assert_eq!(run(&["get", "greeting"]).await.1, "bye");
    assert_eq!(run(&["del", "greeting"]).await.0, 0);
    let (code, _, err) = run(&["get", "greeting"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = run(&["put", "", "v"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("empty"), "{err}");

    let (code, out, _) = run(&["cluster", "status", "-o", "json"]).await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(json["leader_id"].as_u64(), Some(leader), "{out}");
    let members = json["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    for m in members {
        for field in ["id", "address", "role", "term", "applied_index"] {
            assert!(!m[field].is_null(), "member lacks {field}: {out}");
        }
    }
    let (code, _, err) = run(&["member", "remove", "42"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("42"), "{err}");
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_to_a_follower_is_served_and_readable_everywhere() {
    let (cluster, _) = start_cluster(3, None).await;
    let mut leaders = std::collections::BTreeSet::new();
    for id in cluster.node_ids() {
        let mut c = kv(&cluster.endpoint(id).expect("node")).await;
        let key = format!("via-{id}");
        let r = c
            .put(put(key.as_bytes(), b"v".to_vec()))
            .await
            .expect("put via any node");
        let header = r.into_inner().header.expect("every response has a header");
        // The header names the leader of the key's shard (group 2 here), which need not be the
        // meta group's leader; with no fault injected it is one node for all three writes.
        assert!(cluster.node_ids().contains(&header.leader_id), "{header:?}");
        leaders.insert(header.leader_id);
        assert!(header.term >= 1 && header.applied_index >= 1, "{header:?}");
    }
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    for id in cluster.node_ids() {
        let mut c = kv(&cluster.endpoint(id).expect("node")).await;
        for other in cluster.node_ids() {
            let got = c
                .get(GetRequest {
                    keyspace: String::new(),
                    key: format!("via-{other}").into(),
                    read: None,
                })
                .await
                .expect("get via any node")
                .into_inner()
                .value;
            assert_eq!(
                got.as_deref(),
                Some(&b"v"[..]),
                "node {id} reads the write sent to {other}"
            );
        }
    }
    cluster.terminate_all().await.expect("clean shutdown");
}

/// Once the default shard's group has gone to sleep (hibernation: no heartbeats), the first raw
/// write sent to any node is served, by the leader or through it. Raw gRPC clients do not retry;
/// the leader's quorum-ack lease ran out while it slept, and it used to refuse that first write
/// ("not the leader; no leader is known yet", on every node, the leader included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_after_an_idle_spell_is_served_by_every_node() {
    let (cluster, _) = start_cluster(3, None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in cluster.node_ids() {
        let addr = cluster.metrics_addr(id).expect("node exists");
        loop {
            let text = fetch_metrics(addr).await.expect("metrics endpoint answers");
            let state = |s| parse_metric_labeled(&text, "basalt_raft_hibernation_groups", "state", s).unwrap_or(0.0);
            // The meta group and the default keyspace's shard.
            if state("quiesced") + state("asleep") >= 2.0 {
                break;
            }
            assert!(Instant::now() < deadline, "node {id}'s groups did not go to sleep");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Past any lease the leader's last heartbeats gave it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in cluster.node_ids() {
        let mut at = kv(&cluster.endpoint(id).expect("node")).await;
        let key = format!("after-idle-{id}");
        at.put(put(key.as_bytes(), b"v".to_vec()))
            .await
            .unwrap_or_else(|e| panic!("the first write after the idle spell, sent to node {id}: {e:?}"));
    }
    cluster.terminate_all().await.expect("clean shutdown");
}
