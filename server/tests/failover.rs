//! Failover against real `basaltd` processes: SIGKILL of the leader under load. SIGKILL gives the
//! node no chance to flush, so this checks that acknowledgement waits for a durable quorum, and it
//! times how long the cluster is without a leader. It is alone in its test binary (cargo runs test
//! binaries one after another) so that the timing is not distorted by other tests' clusters.

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
    cfg.backoff_max = Duration::from_millis(100);
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
