//! Crash tests against real `basaltd` processes: SIGKILL gives a node no chance to flush, so these
//! check that acknowledgement really waits for a durable quorum, and that restarts resume from the
//! data directory instead of bootstrapping again.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client, start_cluster, verify, Load};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_leader_under_load_loses_no_acknowledged_write() {
    let (cluster, old_leader) = start_cluster(3, None).await;
    let c = client(&cluster, Duration::from_secs(20)).await;
    let load = Load::start(&c, 4, "kill-leader");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    cluster.kill(old_leader).expect("the leader is running");
    let killed_at = Instant::now();
    // A fresh client, so the measurement is not helped by state the load's client learned. Its
    // attempts are short: a dead endpoint refuses connections at once, and a live follower
    // answers NotLeader with a hint as soon as it knows the new leader.
    let mut cfg = cluster.client_config();
    cfg.attempt_timeout = Duration::from_millis(300);
    cfg.deadline = Duration::from_secs(10);
    let probe = basalt_client::Client::connect(cfg).await.expect("valid config");
    probe
        .put(Bytes::from_static(b"after-failover"), Bytes::from_static(b"1"))
        .await
        .expect("the new leader accepts writes");
    let failover = killed_at.elapsed();
    let new_leader = cluster
        .wait_for_leader(Duration::from_secs(5))
        .await
        .expect("the survivors have a leader");
    assert_ne!(new_leader, old_leader);
    assert!(
        failover < Duration::from_secs(3),
        "the first write after killing leader {old_leader} succeeded only after {failover:?}"
    );

    // Keep writing against the new leader for a while, then check everything acknowledged.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let result = load.finish().await;
    assert!(result.acked.len() > 100, "the load made progress: {result:?}");
    eprintln!(
        "failover in {failover:?}; {} writes acknowledged, {} unknown",
        result.acked.len(),
        result.unknown
    );
    verify(&c, &result.acked).await;

    // The killed node comes back as a follower and the cluster keeps its data.
    cluster.restart(old_leader).await.expect("the old leader restarts");
    let after = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .expect("a leader after the restart");
    assert!(after == new_leader || after == old_leader);
    verify(&c, &result.acked).await;
    cluster.terminate_all().await.expect("clean shutdown");
}

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
