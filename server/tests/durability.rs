//! Whole-cluster crash against real `basaltd` processes: every node is SIGKILLed mid-load, so
//! nothing gets a chance to flush; after a restart every acknowledged write must be there, and the
//! nodes must resume from their data directories rather than bootstrap a new cluster.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{client, start_cluster, verify, Load};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_every_node_mid_load_then_restart_keeps_every_acknowledged_write() {
    let (cluster, _) = start_cluster(3, None).await;
    let c = client(&cluster, Duration::from_secs(3)).await;
    let load = Load::start(&c, 6, "kill-all");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in cluster.node_ids() {
        cluster.kill(id).expect("node is running");
    }
    let result = load.finish().await;
    assert!(result.acked.len() > 100, "the load made progress: {result:?}");

    for id in cluster.node_ids() {
        cluster
            .restart(id)
            .await
            .expect("node restarts from its data directory");
    }
    cluster
        .wait_for_leader(Duration::from_secs(15))
        .await
        .expect("the restarted cluster elects a leader");
    let c = client(&cluster, Duration::from_secs(20)).await;
    verify(&c, &result.acked).await;
    // The restarted cluster is the old one (not a fresh bootstrap) and still accepts writes.
    c.put(Bytes::from_static(b"after-restart"), Bytes::from_static(b"1"))
        .await
        .expect("writes after the restart");
    let status = c.cluster_status().await.expect("status");
    assert_eq!(status.members.len(), 3);
    for id in cluster.node_ids() {
        let log = std::fs::read_to_string(cluster.log_path(id).expect("node")).expect("node log");
        assert!(
            log.matches("bootstrapped a new cluster").count() <= 1,
            "node {id} bootstrapped again on restart"
        );
    }
    let exits = cluster.terminate_all().await.expect("clean shutdown");
    for (id, status) in exits {
        assert!(status.success(), "node {id} exited with {status} on SIGTERM");
    }
}
