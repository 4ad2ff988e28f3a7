//! Replica life cycle against real `basaltd` processes: a node that missed compacted history
//! catches up through a snapshot, and membership changes keep the cluster serving.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    client, client_of, shard_applied, snapshot_events, start_cluster, verify, wait_shard_applied, write_keys,
};

/// The default keyspace's shard, formed at bootstrap.
const SHARD: u64 = basalt_server::node::DEFAULT_GROUP;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_while_the_log_is_compacted_catches_up_through_a_snapshot() {
    let (cluster, leader) = start_cluster(3, Some(300)).await;
    let c = client(&cluster, Duration::from_secs(20)).await;
    let down = cluster
        .node_ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("3 nodes have a follower");
    let mut expected = write_keys(&c, "before", 100).await;
    cluster.kill(down).expect("follower is running");

    expected.extend(write_keys(&c, "while-down", 3000).await);
    let leader = cluster.wait_for_leader(Duration::from_secs(5)).await.expect("leader");
    assert!(
        snapshot_events(&cluster, leader, "built").await >= 1,
        "the leader built a snapshot (and so compacted its log) while node {down} was down"
    );
    let target = shard_applied(&cluster, leader, SHARD)
        .await
        .expect("the leader holds the shard");

    cluster.restart(down).await.expect("the follower restarts");
    wait_shard_applied(&cluster, down, SHARD, target, Duration::from_secs(30)).await;
    assert!(
        snapshot_events(&cluster, down, "installed").await >= 1,
        "node {down} caught up by installing a snapshot, not from the log"
    );

    // Make the caught-up node the shard's leader, so the reads below are served from its state
    // machine.
    c.transfer_shard_leader(SHARD, down)
        .await
        .expect("the shard's leadership moves to the caught-up node");
    verify(
        &client_of(cluster.endpoint(down).expect("node exists")).await,
        &expected,
    )
    .await;
    cluster.terminate_all().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fourth_member_joins_and_a_member_leaves_while_the_cluster_serves() {
    let (cluster, leader) = start_cluster(3, None).await;
    let c = client(&cluster, Duration::from_secs(20)).await;
    let mut expected = write_keys(&c, "three", 200).await;

    let endpoint = cluster.start_joining_node(4).await.expect("node 4 starts empty");
    c.add_member(4, &endpoint).await.expect("node 4 is added");
    let status = c.cluster_status().await.expect("status");
    assert_eq!(status.members.len(), 4, "{status:?}");
    assert!(status.members.iter().all(|m| m.voter), "every member votes: {status:?}");
    expected.extend(write_keys(&c, "four", 200).await);

    // Remove the leader itself: the hardest case. It hands leadership to another voter and
    // answers NotLeader; the client repeats the request there, and the new leader removes it.
    c.remove_member(leader).await.expect("the leader is removed");
    // Status probes may still reach a stale view for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let new_leader = loop {
        let now = cluster.wait_for_leader(Duration::from_secs(10)).await.expect("leader");
        if now != leader {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "removed node {leader} never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Status is each node's own view, and the removed node never receives the configuration
    // that leaves it out; the leader's view is the group's.
    let status = client_of(cluster.endpoint(new_leader).expect("node exists"))
        .await
        .cluster_status()
        .await
        .expect("status");
    let ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 3, "{status:?}");
    assert!(!ids.contains(&leader) && ids.contains(&4), "{status:?}");

    expected.extend(write_keys(&c, "after-remove", 200).await);
    // Node 4 holds everything: make it the leader and read there.
    c.transfer_leader(4).await.expect("leadership moves to node 4");
    verify(&client_of(endpoint.clone()).await, &expected).await;

    // Unknown members are refused and change nothing.
    assert!(c.remove_member(99).await.is_err(), "removing an unknown member fails");
    assert!(
        c.transfer_leader(99).await.is_err(),
        "transferring to an unknown member fails"
    );
    let at_node_4 = client_of(endpoint).await;
    assert_eq!(at_node_4.cluster_status().await.expect("status").members.len(), 3);
    c.put(Bytes::from_static(b"still"), Bytes::from_static(b"serving"))
        .await
        .expect("the cluster keeps serving");
    cluster.terminate_all().await.expect("clean shutdown");
}
