//! The placement driver against real `basaltd` processes: a range keyspace that grows by
//! automatic splits under load, a node that joins and receives replicas, a node that is removed
//! and one that dies, whose replicas are re-created elsewhere; and a manual `shard move`.
//!
//! Nodes run with small thresholds (`--split-size`, `--dead-node-timeout`) so that each step
//! happens within seconds.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use basalt_bench::local_cluster::{LocalCluster, LocalClusterOptions};
use basalt_client::{Client, Shard, Sharding};
use bytes::Bytes;
use common::{basaltd, client, client_of, settled_leader, settled_shard_leader, verify, write_keys, Load};

/// Small enough that the range keyspace splits within seconds of load, large enough that the
/// data written before the load stops makes a dozen or two shards rather than a hundred (each
/// extra group is work for the 2 cores that run all the nodes).
const SPLIT_SIZE: u64 = 128 * 1024;

async fn start(nodes: usize) -> LocalCluster {
    let mut opts = LocalClusterOptions::new(nodes, basaltd());
    opts.extra_args = [
        "--split-size",
        &SPLIT_SIZE.to_string(),
        "--split-load",
        "0",
        "--dead-node-timeout",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Ok(dir) = std::env::var("BASALT_TEST_KEEP") {
        // One directory per test: the tests of this file run in parallel.
        let test = std::thread::current().name().unwrap_or("test").replace("::", "-");
        opts.base_dir = Some(std::path::PathBuf::from(dir).join(test));
    }
    let cluster = LocalCluster::start(opts).await.expect("cluster starts");
    settled_leader(&cluster, Duration::from_secs(20)).await;
    settled_shard_leader(&cluster, basalt_server::node::DEFAULT_GROUP, Duration::from_secs(20)).await;
    cluster
}

/// Polls `check` on the catalog's shards until it returns true, failing with `what` after
/// `timeout`.
async fn wait_for_shards(
    admin: &Client,
    what: &str,
    timeout: Duration,
    check: impl Fn(&[Shard]) -> bool,
) -> Vec<Shard> {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    loop {
        if let Ok(shards) = admin.list_shards(None, false).await {
            if check(&shards) {
                return shards;
            }
            last = shards;
        }
        if Instant::now() > deadline {
            let summary: Vec<String> = last
                .iter()
                .map(|s| {
                    let r: Vec<u64> = s.replicas.iter().map(|r| r.node_id).collect();
                    format!("{}:{:?}->{}", s.id, r, s.moving_to)
                })
                .collect();
            panic!("timed out waiting for {what}; shards: {summary:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// 4 nodes, a range keyspace `orders` of 3 replicas holding `count` written keys, and its one
/// shard: the start of the tests that move a single replica.
async fn four_nodes_with_orders(count: usize) -> (LocalCluster, Client, Client, BTreeMap<Bytes, Bytes>, Shard) {
    let cluster = start(4).await;
    let admin = client(&cluster, Duration::from_secs(30)).await;
    admin
        .create_keyspace("orders", Sharding::Range, 0, 3)
        .await
        .expect("create the keyspace");
    let orders = admin.with_keyspace("orders");
    let keys = write_keys(&orders, "order", count).await;
    let shard = admin
        .list_shards(Some("orders"), false)
        .await
        .expect("list")
        .into_iter()
        .next()
        .expect("one shard");
    (cluster, admin, orders, keys, shard)
}

/// Whether `s` has its keyspace's number of replicas: 3 for the keyspaces this file creates, 5
/// (one per founding node) for the default keyspace of a 5-node cluster.
fn full(s: &Shard) -> bool {
    s.replicas.len() == if s.keyspace == "default" { 5 } else { 3 }
}

fn replica_counts(shards: &[Shard]) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for s in shards.iter().filter(|s| s.id != 1) {
        for r in &s.replicas {
            *counts.entry(r.node_id).or_default() += 1;
        }
    }
    counts
}

/// The scenario end to end: 5 nodes, then a sixth, then one removed and one dead. Six
/// processes and a few dozen groups on 2 cores: about 75 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_split_by_size_spread_to_a_new_node_and_leave_removed_and_dead_ones() {
    let cluster = start(5).await;
    let admin = client(&cluster, Duration::from_secs(30)).await;
    admin
        .create_keyspace("users", Sharding::Hash, 16, 3)
        .await
        .expect("create the hash keyspace");
    admin
        .create_keyspace("events", Sharding::Range, 0, 3)
        .await
        .expect("create the range keyspace");
    let users = admin.with_keyspace("users");
    let events = admin.with_keyspace("events");
    let user_keys = write_keys(&users, "user", 2_000).await;

    // 1. The range keyspace grows from 1 shard by automatic splits while it is written to.
    let load = Load::start_sized(&events, 8, "ev", 512);
    wait_for_shards(
        &admin,
        "the range keyspace to split into 4 or more shards",
        Duration::from_secs(120),
        |s| s.iter().filter(|s| s.keyspace == "events").count() >= 4,
    )
    .await;

    // The writes stop here: what follows is about placement, and every further split would
    // only add groups for 2 cores to carry.
    let result = load.finish().await;
    assert!(
        result.acked.len() > 100,
        "the load made progress: {}",
        result.acked.len()
    );
    assert_eq!(result.unknown, 0, "no write failed while the range keyspace split");

    // 2. A sixth node joins: the driver moves replicas to it until the nodes are even.
    let endpoint = cluster.start_joining_node(6).await.expect("node 6 starts");
    admin.add_member(6, &endpoint).await.expect("node 6 is added");
    let shards = wait_for_shards(&admin, "node 6 to receive its share", Duration::from_secs(180), |s| {
        let c = replica_counts(s);
        let (min, max) = (c.values().min().copied(), c.values().max().copied());
        c.get(&6).copied().unwrap_or(0) >= 3 && max.zip(min).is_some_and(|(max, min)| max - min <= 2)
    })
    .await;
    eprintln!("replicas per node after node 6 joined: {:?}", replica_counts(&shards));

    // 3. Node 2 is removed: its replicas are re-created on the others.
    admin.remove_member(2).await.expect("node 2 is removed");
    wait_for_shards(
        &admin,
        "node 2's replicas to be re-created",
        Duration::from_secs(180),
        |s| {
            s.iter()
                .filter(|s| s.id != 1)
                .all(|s| full(s) && s.moving_to == 0 && s.replicas.iter().all(|r| r.node_id != 2))
        },
    )
    .await;

    // The removed node is stopped, as an operator stops a decommissioned machine: still
    // running, it would keep campaigning for the meta group it no longer belongs to.
    cluster.kill(2).expect("stop the removed node");

    // 4. Node 3 dies (killed, never comes back): after --dead-node-timeout the driver moves
    //    its replicas away too. Not the meta leader, so the driver keeps its history.
    let meta_leader = settled_leader(&cluster, Duration::from_secs(20)).await;
    let victim = if meta_leader == 3 { 4 } else { 3 };
    cluster.kill(victim).expect("kill");
    let shards = wait_for_shards(
        &admin,
        "the dead node's replicas to be re-created",
        Duration::from_secs(360),
        |s| {
            s.iter().filter(|s| s.id != 1).all(|s| {
                // The default keyspace has a replica on each of the 5 founders: with 4 live
                // nodes its fifth has nowhere to go and stays, under-replicated, on the dead one.
                let placed = s.keyspace == "default" || (full(s) && s.replicas.iter().all(|r| r.node_id != victim));
                placed && s.moving_to == 0 && s.replicas.iter().all(|r| r.node_id != 2)
            })
        },
    )
    .await;
    eprintln!("replicas per node at the end: {:?}", replica_counts(&shards));

    // Everything acknowledged while the range keyspace split is still there after the moves.
    verify(&events, &result.acked).await;
    verify(&users, &user_keys).await;

    // The driver's steps are visible, with the kinds this test caused.
    let placement = admin.placement_status().await.expect("placement status");
    let kinds: Vec<&str> = placement.steps.iter().map(|s| s.kind.as_str()).collect();
    assert!(kinds.contains(&"move"), "steps: {:?}", placement.steps);
    let dead = placement
        .nodes
        .iter()
        .find(|n| n.node_id == victim)
        .expect("the dead node is listed");
    assert_eq!(dead.state, "dead");

    // The survivors hold no replica the catalog does not give them.
    for id in [1u64, 4, 5, 6, 3].into_iter().filter(|id| *id != victim) {
        let node = client_of(cluster.endpoint(id).expect("endpoint")).await;
        let status = node.cluster_status().await.expect("status");
        assert!(status.members.iter().all(|m| m.id != 2), "node 2 is no longer a member");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manual_move_relocates_one_replica_and_the_data_stays() {
    let (cluster, admin, orders, keys, shard) = four_nodes_with_orders(300).await;
    let from = shard.replicas[0].node_id;
    let to = (1..=4u64)
        .find(|n| shard.replicas.iter().all(|r| r.node_id != *n))
        .expect("a node without a replica");

    let load = Load::start(&orders, 4, "during-move");
    let moved = admin.move_shard(shard.id, from, to).await.expect("move");
    let replicas: Vec<u64> = moved.replicas.iter().map(|r| r.node_id).collect();
    assert!(replicas.contains(&to) && !replicas.contains(&from), "{replicas:?}");
    assert_eq!(moved.moving_to, 0, "the move is finished");
    let result = load.finish().await;
    assert_eq!(result.unknown, 0, "no write failed during the move");

    // The newcomer serves the data: ask it alone, after it has applied everything.
    let newcomer = client_of(cluster.endpoint(to).expect("endpoint"))
        .await
        .with_keyspace("orders");
    verify(&newcomer, &keys).await;
    verify(&newcomer, &result.acked).await;

    // The old node's replica is destroyed: it no longer answers for the shard by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let old = client_of(cluster.endpoint(from).expect("endpoint")).await;
        let shards = old.list_shards(Some("orders"), true).await.expect("list");
        if shards[0].applied_index == 0 {
            break; // No local replica left to report figures.
        }
        assert!(
            Instant::now() < deadline,
            "node {from} still holds a replica of shard {}",
            shard.id
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A bad move is refused with a reason and changes nothing.
    let err = admin
        .move_shard(shard.id, from, to)
        .await
        .expect_err("from no longer holds it");
    assert!(err.to_string().contains("holds no replica"), "{err}");
}

/// A removed node that still runs and still leads a shard: the driver must reach that leader (or
/// have its leadership taken away) to re-create the replica elsewhere. Before the fix the driver
/// looked for the leader only among the cluster's members and the move waited forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_node_that_leads_a_shard_hands_it_over_and_its_replica_is_re_created() {
    let (cluster, admin, orders, keys, shard) = four_nodes_with_orders(200).await;
    let meta_leader = settled_leader(&cluster, Duration::from_secs(20)).await;
    let victim = shard
        .replicas
        .iter()
        .map(|r| r.node_id)
        .find(|n| *n != meta_leader)
        .expect("a replica off the meta leader");
    // The placement driver balances leaders too and may move this one on: ask again until the
    // victim holds it.
    let mut attempts = 0;
    while settled_shard_leader(&cluster, shard.id, Duration::from_secs(20)).await != victim {
        attempts += 1;
        assert!(attempts <= 5, "node {victim} never kept the shard's leadership");
        admin.transfer_shard_leader(shard.id, victim).await.expect("transfer");
    }

    admin.remove_member(victim).await.expect("remove");
    wait_for_shards(
        &admin,
        "the removed leader's replica to be re-created",
        Duration::from_secs(60),
        |s| {
            s.iter()
                .filter(|s| s.keyspace == "orders")
                .all(|s| s.replicas.len() == 3 && s.moving_to == 0 && s.replicas.iter().all(|r| r.node_id != victim))
        },
    )
    .await;
    verify(&orders, &keys).await;
}
