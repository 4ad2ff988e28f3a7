//! Flipped bytes on disk are detected, never served: every stored record carries a crc32 over its
//! key and payload (RocksDB's own block checksums do not help here, since the record is rewritten
//! through RocksDB with valid blocks around a bad payload, as a buggy write path or a bad disk
//! underneath the block layer would leave it).

mod common;

use basalt_bench::local_cluster::ClusterError;
use basalt_proto::v1::kv_client::KvClient;
use basalt_proto::v1::{GetRequest, PutRequest};
use basalt_storage::keys::{data_key, log_range};
use basalt_storage::{Cf, Engine, EngineRead, RocksEngine, WriteBatch, DEFAULT_KEYSPACE};
use bytes::Bytes;
use common::start_cluster;
use tonic::Code;

/// Flips the last byte of the value stored under `key` in `cf`, bypassing the record layer.
fn flip_last_byte(db: &std::path::Path, cf: Cf, key: &[u8]) {
    let engine = RocksEngine::open(db).expect("the stopped node's database opens");
    let mut stored = engine.get(cf, key).expect("read").expect("the record exists");
    *stored.last_mut().expect("a record is never empty") ^= 0x01;
    let mut batch = WriteBatch::default();
    batch.put(cf, key.to_vec(), stored);
    engine.write(batch, true).expect("write the damaged record");
}

async fn put(kv: &mut KvClient<tonic::transport::Channel>, key: &'static str, value: &'static str) {
    kv.put(PutRequest {
        keyspace: String::new(),
        key: Bytes::from_static(key.as_bytes()),
        value: Bytes::from_static(value.as_bytes()),
        session: None,
    })
    .await
    .expect("put");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_stored_value_is_detected_and_the_replica_stops_serving() {
    let (cluster, id) = start_cluster(1, None).await;
    let endpoint = format!("http://{}", cluster.endpoint(id).expect("node"));
    let mut kv = KvClient::connect(endpoint.clone()).await.expect("connect");
    put(&mut kv, "victim", "the original value").await;
    put(&mut kv, "bystander", "fine").await;
    assert!(cluster.terminate(id).await.expect("stops").success());

    let db = cluster.data_dir(id).expect("node").join("db");
    flip_last_byte(&db, Cf::Data, &data_key(DEFAULT_KEYSPACE, &[], b"victim"));

    cluster
        .restart(id)
        .await
        .expect("the node starts: the damage is in data, not the log");
    // A restarted leader wins a new election before it serves (it never resumes its old term).
    cluster
        .wait_for_leader(std::time::Duration::from_secs(10))
        .await
        .expect("the node elects itself");
    let mut kv = KvClient::connect(endpoint).await.expect("connect");
    let get = |key: &'static str| GetRequest {
        keyspace: String::new(),
        key: Bytes::from_static(key.as_bytes()),
        read: None,
    };
    let status = kv
        .get(get("victim"))
        .await
        .expect_err("a corrupt value is never returned");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("corrupt"), "{status:?}");
    // Once corruption is found the replica stops serving everything, not only the damaged key.
    let status = kv
        .get(get("bystander"))
        .await
        .expect_err("a replica that found corruption serves nothing");
    assert!(
        matches!(status.code(), Code::DataLoss | Code::Unavailable),
        "{status:?}"
    );
    let log = std::fs::read_to_string(cluster.log_path(id).expect("node")).expect("log");
    assert!(log.to_lowercase().contains("corrupt"), "the node logs the corruption");
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_stored_log_record_is_detected_and_the_node_refuses_to_start() {
    let (cluster, id) = start_cluster(1, None).await;
    let endpoint = format!("http://{}", cluster.endpoint(id).expect("node"));
    let mut kv = KvClient::connect(endpoint).await.expect("connect");
    put(&mut kv, "a", "1").await;
    put(&mut kv, "b", "2").await;
    assert!(cluster.terminate(id).await.expect("stops").success());

    let db = cluster.data_dir(id).expect("node").join("db");
    let last_log_key = {
        let engine = RocksEngine::open(&db).expect("opens");
        let (start, end) = log_range(basalt_server::node::DEFAULT_GROUP);
        let (key, _) = engine
            .last_in_range(Cf::RaftLog, &start, &end)
            .expect("read")
            .expect("the log has entries");
        key
    };
    flip_last_byte(&db, Cf::RaftLog, &last_log_key);

    match cluster.restart(id).await {
        Err(ClusterError::ExitedDuringStartup { log_tail, .. }) => {
            assert!(log_tail.to_lowercase().contains("corrupt"), "{log_tail}");
        }
        other => panic!("a node with a corrupt log record must refuse to start, got {other:?}"),
    }
}
